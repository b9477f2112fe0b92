"""eidetic log"""

from __future__ import annotations

import json

import click

from ..common import Ctx, human_bytes, plural, say

WIDTH = 100   # the human output fits this many columns unless --wide


def fit(text: str, width: int) -> str:
    """*text* cut in the middle with '…' to at most *width* characters."""
    if len(text) <= width:
        return text
    if width <= 1:
        return "…"[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "…" + (text[-tail:] if tail else "")


@click.command("log")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-w", "--wide", is_flag=True,
              help="Full width: nothing cut short, with each version's BLAKE3, its name in the "
                   "tree and its whole provenance.")
@click.pass_obj
def command(ctx: Ctx, path: str, as_json: bool, wide: bool) -> None:
    """Show the version history of PATH, newest first.

    PATH is a file or folder in a study's tree (plain name or any version
    name) or STUDY:relative/path.

    \b
    A table that fits 100 columns (-w: as wide as it needs):
      VER       the version number (1 = oldest)
      RECEIVED  when the archive received it (UTC)
      SIZE      in IEC units (KiB = 1024 bytes)
      BLAKE3    the content's BLAKE3 (with -w)
      UPLOAD    the upload it came in (checkout --upload takes it)
      NAME      the version's own name in the tree (with -w)
      FROM      the location and sender; "verified": checked against the
                sender's upload description
    For a folder, each file has a heading line with its versions under it
    (files in path order).  Long names are cut in the middle with '…'.
    """
    from eidetic.server import history
    from eidetic.core import layout

    t = history.resolve(ctx.cfg, path)
    entries = history.history(t)
    if as_json:
        click.echo(json.dumps([e.to_json(t.store.name) for e in entries], indent=1))
        return
    limit = None if wide else WIDTH
    shorten = (lambda text, width: text) if wide else fit
    groups: dict[bytes, list] = {}
    for e in entries:
        groups.setdefault(e.version.path, []).append(e)
    count = plural(len(entries), "version")
    if t.is_dir:
        count += f" of {plural(len(groups), 'file')}"
    title = f"study {t.store.name}, "
    if not t.path:
        title += "the whole study"
    else:
        kind = "folder " if t.is_dir else "file "
        title += kind + shorten(layout.display(t.path), (limit or 0) - len(title) - len(kind) - len(count) - 2)
    say(f"{title}: {count}")
    if not entries:
        return
    indent = "  " if t.is_dir else ""
    b3 = f"{'BLAKE3':<64}  " if wide else ""     # the narrow table leaves it to -w and --json
    names = {id(e): layout.display(layout.version_relpath(e.version.path, e.version.n, e.version.stamp))
             for e in entries} if wide else {}
    nw = max(map(len, names.values()), default=0)
    name_col = f"{'NAME':<{nw}}  " if wide else ""
    cols = f"{indent}{'VER':<5}  {'RECEIVED (UTC)':<19}  {'SIZE':>10}  {b3}{'UPLOAD':<25}  {name_col}"
    rest = None if limit is None else max(limit - len(cols), 8)
    say(cols + "FROM")
    for p in sorted(groups):
        if t.is_dir:
            say(shorten(layout.display(p), limit or 0))
        for e in groups[p]:
            v = e.version
            row = (f"{indent}{'v' + str(v.n):<5}  {v.received[:19].replace('T', ' '):<19}  "
                   f"{human_bytes(v.size):>10}  {v.blake3 + '  ' if wide else ''}{e.upload:<25}  ")
            if wide:
                say(row + f"{names[id(e)]:<{nw}}  {history.provenance_text(e.provenance)}")
            else:
                say(row + fit(history.provenance_short(e.provenance), rest))
