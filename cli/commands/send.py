"""eidetic send"""

from __future__ import annotations

import sys

import click

from ..common import Ctx, human_bytes, is_tty, say, warn


@click.command("send")
@click.argument("source", type=click.Path(exists=False, file_okay=True, dir_okay=True))
@click.option("--study", required=True, help="The study name your study runner gave you.")
@click.option("--to", "to", required=True, metavar="DEST",
              help="The inbox: a folder (e.g. a mounted share) or sftp://user@host[:port]/path/to/inbox.")
@click.option("--location", help="Where the data comes from, e.g. labA (default: the 'location' in "
                                 "eidetic-client.yaml, else this computer's name).")
@click.option("--changed-only", is_flag=True,
              help="Leave out files sent before to this inbox and study and unchanged since.")
@click.option("--dry-run", is_flag=True,
              help="Only show what would be sent (-v: each file); send nothing and contact no server.")
@click.option("--identity", "-i", type=click.Path(dir_okay=False), help="SSH private key file to log in with.")
@click.option("--accept-host-key", metavar="SHA256:...",
              help="Trust the server's host key if its fingerprint is this one (first contact).")
@click.pass_obj
def command(ctx: Ctx, source: str, study: str, to: str, location: str | None, changed_only: bool,
            dry_run: bool, identity: str | None, accept_host_key: str | None) -> None:
    """Send the folder (or file) SOURCE to the study's inbox.

    The upload is invisible to the archive until every byte is written; if it
    is interrupted, run the same command again: it resumes.  Exit status 0
    sent, 1 failed, 2 usage error, 3 cannot reach or use the destination,
    130 interrupted.
    """
    from eidetic.client.send import SendHooks, SendOptions, send

    # Never ctx.cfg: the lab PC has no server config.
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    bar = _Bar() if is_tty() and not dry_run else None

    def out(msg: str) -> None:
        if bar is not None:
            bar.write(msg)
        else:
            say(msg)

    def listed(what: str, path: str) -> None:
        if ctx.verbose:
            label = {"send": "would send" if dry_run else "sending", "symlink": "skipped symbolic link",
                     "special": "skipped (not a regular file)"}[what]
            out(f"  {label}: {path}")

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

    hooks = SendHooks(progress=bar.update if bar is not None else None, notice=out, listed=listed,
                      confirm_host_key=confirm_host_key if interactive else None,
                      password=password if interactive else None)
    opts = SendOptions(source=source, study=study, to=to, location=location, changed_only=changed_only,
                       dry_run=dry_run, identity=identity, accept_host_key=accept_host_key)
    try:
        res = send(opts, hooks)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if not dry_run:
            warn("eidetic: interrupted; the unfinished upload stays hidden in the inbox: "
                 "run the same command again to resume it")
        sys.exit(130)
    finally:
        if bar is not None:
            bar.close()
    extras = []
    if res.unchanged:
        extras.append(f"{res.unchanged} unchanged files left out (sent before)")
    if res.symlinks:
        extras.append(f"skipped {res.symlinks} symbolic link{'s' if res.symlinks != 1 else ''}"
                      + ("" if ctx.verbose else " (-v lists them)"))
    if res.special:
        extras.append(f"skipped {res.special} special files (not regular files)")
    tail = f"; {'; '.join(extras)}" if extras else ""
    files = f"{res.files} file{'s' if res.files != 1 else ''} ({human_bytes(res.bytes)})"
    if res.dry_run:
        say(f"would send {files} to {res.dest} for study {res.study} from location {res.location}{tail}"
            + ("" if ctx.verbose else " (-v lists them)" if res.files else ""))
    elif res.entry is None:
        what = "nothing changed since the last send: nothing sent" if changed_only else \
            "nothing to send: no regular files"
        say(f"{what}{tail}")
    else:
        resumed = f", {res.resumed_files} of them sent before the interruption" if res.resumed_files else ""
        say(f"sent {files}{resumed} to {res.dest} as {res.entry}: it will appear in the study's archive "
            f"within a minute{tail}")


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
