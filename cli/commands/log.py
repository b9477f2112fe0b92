"""eidetic log"""

from __future__ import annotations

import json

import click

from ..common import Ctx, human_bytes, say


@click.command("log")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def command(ctx: Ctx, path: str, as_json: bool) -> None:
    """Show the version history of PATH, newest first.

    PATH is a file or folder in a study's tree (plain name or any version
    name) or STUDY:relative/path.
    """
    from eidetic.server import history
    from eidetic.core import layout

    t = history.resolve(ctx.cfg, path)
    entries = history.history(t)
    if as_json:
        click.echo(json.dumps([e.to_json(t.store.name) for e in entries], indent=1))
        return
    what = layout.display(t.path) or "(whole study)"
    say(f"{what}  study {t.store.name}, {len(entries)} version(s)")
    for e in entries:
        v = e.version
        vrel = layout.version_relpath(v.path, v.n, v.stamp)
        shown = layout.display(vrel if t.is_dir else vrel.rpartition(b"/")[2])
        # The location is in the provenance text, escaped: it is the uploader's string.
        say(f"  v{v.n:<4} {v.received[:19].replace('T', ' ')}Z  {e.upload}  "
            f"{human_bytes(v.size):>10}  {v.blake3[:12]}  {shown}  [{history.provenance_text(e.provenance)}]")
