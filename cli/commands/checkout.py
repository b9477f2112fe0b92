"""eidetic checkout"""

from __future__ import annotations

import json
import sys

import click

from ..common import Ctx, human_bytes, iec_bar, is_tty, note, plural, say


class _Bar:
    """On a terminal: files and bytes written so far, with the rate (tqdm
    throttles the drawing); made at the first file written, gone at the end."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.bar = None

    def __call__(self, files: int, nbytes: int) -> None:
        count = f"{files} files" if files != 1 else "1 file"
        bar = self.bar
        if bar is None:
            # Its first drawing (at once) already counts: tqdm may draw
            # nothing more before a quick checkout ends.
            self.bar = iec_bar(None, desc=self.what, initial=nbytes, postfix=count, disable=None, leave=False,
                               file=sys.stderr, dynamic_ncols=True)
            return
        bar.postfix = count
        bar.update(nbytes - bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command("checkout")
@click.argument("path")
@click.option("--version", "version", type=int, help="Version number (1 = oldest).")
@click.option("--at", "at", metavar="TIME", help="As it stood at TIME (ISO 8601; UTC if no zone).")
@click.option("--upload", "upload", metavar="ID", help="As it stood right after upload ID.")
@click.option("-o", "--output", "dest", type=click.Path(), help="Destination (default ./<name>).")
@click.option("--force", is_flag=True,
              help="Replace an existing file at DEST (a symlink: the link itself, never its target), "
                   "or write a folder into an existing folder (its files replaced).")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object: {"dest", "files", "bytes", "version" (a file\'s; null '
                   'for a folder), "path" (PATH as given)}.')
@click.pass_obj
def command(ctx: Ctx, path: str, version: int | None, at: str | None, upload: str | None,
            dest: str | None, force: bool, as_json: bool) -> None:
    """Restore a version of a file, or a folder as it stood, to DEST.

    Every byte is verified against its BLAKE3; recorded mtimes and modes are
    restored.  A corrupt object leaves nothing at DEST: a folder appears, or
    its files are moved into an existing one, only once all were verified.
    On a terminal a progress bar on stderr counts files, bytes and the rate
    (not with -q or --json).

    Refused, before anything is written (exit 2): DEST in a study's tree or
    store (however the path is spelled); a symbolic link where a folder goes
    (at DEST or inside it; links are never followed); a file where the
    checkout has a folder, or a folder where it has a file, even with --force.
    """
    from eidetic.server.checkout import checkout

    bar = _Bar(f"checkout {path}") if is_tty() and not ctx.quiet and not as_json else None
    try:
        r = checkout(ctx.cfg, path, version=version, at=at, upload=upload, dest=dest, force=force, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        say(json.dumps({"dest": r.dest, "files": r.files, "bytes": r.bytes, "version": r.version,
                        "path": path}, indent=1))
        return
    what = f"version {r.version}, " if r.version is not None else ""
    note(f"restored {what}{plural(r.files, 'file')}, {human_bytes(r.bytes)}, verified, to {r.dest}")
