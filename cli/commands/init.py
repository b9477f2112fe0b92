"""eidetic init"""

from __future__ import annotations

import click

from ..common import Ctx, say


@click.command("init")
@click.pass_obj
def command(ctx: Ctx) -> None:
    """Create every configured directory (inboxes, state, stores, trees).

    Safe to run again: what exists is left as it is.
    """
    from eidetic import deploy

    cfg = ctx.cfg
    if cfg.is_default_layout:
        say(f"no config file: using the default layout under {cfg.state.rsplit('/', 1)[0]}")
    for a in deploy.init(cfg):
        say(f"{a.what:8} {a.path}")
