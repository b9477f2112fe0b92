"""eidetic fsck"""

from __future__ import annotations

import click

from ..common import Ctx


@click.command("fsck")
@click.option("--study")
@click.pass_obj
def command(ctx: Ctx, study: str | None) -> None:
    """Audit the integrity of the stores."""
    raise click.UsageError("fsck is being written")
