"""eidetic send"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from ..common import Ctx, human_bytes, is_tty, note, plural, say, warn


@click.command("send")
@click.argument("source", required=False, type=click.Path(exists=False, file_okay=True, dir_okay=True))
@click.option("--dest", "dest_name", metavar="NAME",
              help="A destination saved in eidetic-client.yaml (study, server, folder, parts); may be left "
                   "out when only one is saved. The options below override what it says.")
@click.option("--study", help="The study name your study runner gave you.")
@click.option("--to", "to", metavar="DEST",
              help="The inbox: a folder (e.g. a mounted share) or sftp://user@host[:port]/path/to/inbox.")
@click.option("--part", "parts", multiple=True, metavar="FOLDER",
              help="Send only this folder inside SOURCE, keeping its path (repeatable; default: the "
                   "destination's parts, else everything).")
@click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
              help="Leave out files and folders whose name matches PATTERN, e.g. '*.tmp' (a PATTERN with "
                   "a '/' matches the path inside SOURCE); repeatable, added to the default excludes.")
@click.option("--no-default-excludes", is_flag=True,
              help="Also send Thumbs.db, desktop.ini, .DS_Store, ._*, ~$*, $RECYCLE.BIN, "
                   "System Volume Information and .Trash-* (left out by default).")
@click.option("--location", help="Where the data comes from, e.g. labA (default: the 'location' in "
                                 "eidetic-client.yaml, else this computer's name).")
@click.option("--changed-only", is_flag=True,
              help="Leave out files sent before to this inbox and study and unchanged since.")
@click.option("--dry-run", is_flag=True,
              help="Only show what would be sent (-v: each file); send nothing and contact no server.")
@click.option("--identity", "-i", type=click.Path(dir_okay=False), help="SSH private key file to log in with.")
@click.option("--accept-host-key", metavar="SHA256:...",
              help="Trust the server's host key if its fingerprint is this one (first contact).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per line on stdout: progress events, then the result (or the error).")
@click.pass_obj
def command(ctx: Ctx, source: str | None, dest_name: str | None, study: str | None, to: str | None,
            parts: tuple[str, ...], excludes: tuple[str, ...], no_default_excludes: bool, location: str | None,
            changed_only: bool, dry_run: bool, identity: str | None, accept_host_key: str | None,
            as_json: bool) -> None:
    """Send the folder (or file) SOURCE to the study's inbox.

    With a saved destination (--dest NAME, or the only one saved) SOURCE,
    --study and --to may come from eidetic-client.yaml.  The upload is
    invisible to the archive until every byte is written; if it is
    interrupted, run the same command again: it resumes.  Exit status 0
    sent, 1 failed, 2 usage error, 3 cannot reach or use the destination,
    130 interrupted.
    """
    out = _JsonOut() if as_json else None
    try:
        _send(ctx, out, source, dest_name, study, to, parts, excludes, no_default_excludes, location,
              changed_only, dry_run, identity, accept_host_key)
    except Exception as e:
        from eidetic.core.errors import EideticError
        if out is None or not isinstance(e, EideticError):
            raise
        out.emit({"event": "error", "ok": False, "exit_status": e.exit_code, "message": str(e),
                  "error": type(e).__name__})
        sys.exit(e.exit_code)


def _send(ctx: Ctx, out: "_JsonOut | None", source, dest_name, study, to, parts, excludes, no_default_excludes,
          location, changed_only, dry_run, identity, accept_host_key) -> None:
    from eidetic.client.excludes import Excludes, check_pattern
    from eidetic.client.send import SendHooks, SendOptions, send
    from eidetic.client.settings import load_settings
    from eidetic.client.state import client_dir
    from eidetic.core.errors import UsageError

    # Never ctx.cfg: the lab PC has no server config.
    saved = settings = None
    if dest_name is not None or to is None:
        settings = load_settings(client_dir())      # handed to the send: read once
        saved = settings.pick(dest_name)
    if saved is None and (study is None or to is None):
        missing = " and ".join(f"--{k}" for k, v in (("study", study), ("to", to)) if v is None)
        raise UsageError(f"say where to send: {missing} (or --dest NAME, a destination saved in "
                         "eidetic-client.yaml)")
    if saved is not None:
        study = study or saved.study
        to = to or saved.to
        source = source or (os.path.expanduser(saved.source) if saved.source else None)
        parts = parts or saved.parts
        excludes = tuple(saved.exclude) + tuple(excludes)
        identity = identity or (os.path.expanduser(saved.identity) if saved.identity else None)
        accept_host_key = accept_host_key or saved.host_key
    if source is None:
        raise UsageError("say what to send: SOURCE, the study folder"
                         + (f" (destination {saved.name} names none)" if saved is not None else ""))
    for pat in excludes:
        why = check_pattern(pat)
        if why:
            raise UsageError(f"--exclude {pat!r}: {why}")

    interactive = sys.stdin.isatty() and sys.stderr.isatty() and out is None
    bar = _Bar() if is_tty() and not dry_run and out is None and not ctx.quiet else None

    def tell(msg: str) -> None:
        if out is not None:
            out.emit({"event": "notice", "message": msg})
        elif bar is not None:
            bar.write(msg)
        else:
            note(msg)      # -q: not said

    def listed(what: str, path: str) -> None:
        if out is not None and what == "excluded":
            out.emit({"event": "excluded", "path": path})
        if ctx.verbose and out is None:
            label = {"send": "would send" if dry_run else "sending", "symlink": "skipped symbolic link",
                     "special": "skipped (not a regular file)", "excluded": "excluded"}[what]
            tell(f"  {label}: {path}")

    def confirm_host_key(info) -> bool:
        if bar is not None:
            bar.pause()
        return click.confirm(info.question() + "\nAre you sure you want to continue connecting?",
                             default=False, err=True)

    def password(prompt: str) -> str | None:
        if bar is not None:
            bar.pause()
        return click.prompt(prompt.rstrip(": "), hide_input=True, default="", show_default=False,
                            err=True) or None

    progress = out.progress if out is not None else bar.update if bar is not None else None
    hooks = SendHooks(progress=progress, notice=tell, listed=listed,
                      confirm_host_key=confirm_host_key if interactive else None,
                      password=password if interactive else None)
    opts = SendOptions(source=source, study=study, to=to, location=location, changed_only=changed_only,
                       dry_run=dry_run, identity=identity, accept_host_key=accept_host_key, parts=tuple(parts),
                       excludes=Excludes(tuple(excludes), defaults=not no_default_excludes), settings=settings)
    try:
        res = send(opts, hooks)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if out is not None:
            out.emit({"event": "error", "ok": False, "exit_status": 130, "message": "interrupted; the "
                      "unfinished upload stays hidden in the inbox: run the same command again to resume it",
                      "error": "Interrupted"})
        elif not dry_run:
            warn("eidetic: interrupted; the unfinished upload stays hidden in the inbox: "
                 "run the same command again to resume it")
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    if out is not None:
        out.emit({"event": "result", "ok": True, "study": res.study, "location": res.location,
                  "destination": res.dest, "saved_destination": saved.name if saved is not None else None,
                  "entry": res.entry, "files": res.files, "bytes": res.bytes, "excluded": res.excluded,
                  "resumed": res.resumed, "resumed_files": res.resumed_files, "unchanged": res.unchanged,
                  "symlinks": res.symlinks, "special": res.special, "parts": list(res.parts),
                  "description_blake3": res.description_blake3, "dry_run": res.dry_run})
        return
    extras = []
    if res.unchanged:
        extras.append(f"{res.unchanged} unchanged files left out (sent before)")
    if res.excluded:
        extras.append(f"excluded {plural(res.excluded, 'file or folder', 'files or folders')} "
                      "(OS and editor files, --exclude)" + ("" if ctx.verbose else " (-v lists them)"))
    if res.symlinks:
        extras.append(f"skipped {plural(res.symlinks, 'symbolic link')}" + ("" if ctx.verbose else " (-v lists them)"))
    if res.special:
        extras.append(f"skipped {res.special} special files (not regular files)")
    tail = f"; {'; '.join(extras)}" if extras else ""
    files = f"{plural(res.files, 'file')} ({human_bytes(res.bytes)})"
    if res.dry_run:
        say(f"would send {files} to {res.dest} for study {res.study} from location {res.location}{tail}"
            + ("" if ctx.verbose else " (-v lists them)" if res.files else ""))
    elif res.entry is None:
        what = "nothing changed since the last send: nothing sent" if changed_only else \
            "nothing to send: no regular files"
        note(f"{what}{tail}")
    else:
        resumed = f", {res.resumed_files} of them sent before the interruption" if res.resumed_files else ""
        note(f"sent {files}{resumed} to {res.dest} as {res.entry}: it will appear in the study's archive "
            f"within a minute{tail}")


class _JsonOut:
    """--json: one object per line on stdout, flushed at once (a script reads
    them as they come); progress at most ten times a second, and at each
    change of phase."""

    def __init__(self) -> None:
        self._last = 0.0
        self._phase = ""

    def emit(self, obj: dict) -> None:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
        sys.stdout.flush()

    def progress(self, p) -> None:
        now = time.monotonic()
        if p.phase == self._phase and now - self._last < 0.1 and p.files_done < p.files_total:
            return
        self._last, self._phase = now, p.phase
        self.emit({"event": "progress", "phase": p.phase, "files_done": p.files_done,
                   "files_total": p.files_total, "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
                   "path": p.path})


class _Bar:
    """A tqdm bar (bytes, files, rate, ETA) on a terminal; created lazily so
    nothing is drawn before there is something to send."""

    def __init__(self) -> None:
        self.bar = None
        self.files_total = 0

    def update(self, p) -> None:
        from tqdm import tqdm

        if p.phase in ("scanning", "checking"):
            return
        files = f"{p.files_done}/{p.files_total} files"
        if self.bar is None:
            self.bar = tqdm(total=p.bytes_total, unit="B", unit_scale=True, unit_divisor=1024,
                            disable=None, file=sys.stderr, dynamic_ncols=True, leave=False, postfix=files)
        if self.bar.total != p.bytes_total:
            self.bar.total = p.bytes_total
        self.bar.set_postfix_str(files, refresh=False)
        self.bar.update(p.bytes_done - self.bar.n)
        if p.phase == "finishing":
            self.bar.refresh()      # the final state, however fast the send was

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stdout)
        else:
            say(msg)

    def pause(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
