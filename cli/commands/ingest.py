"""eidetic ingest"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from datetime import datetime

import click

from ..common import Ctx, human_bytes, iec_bar, is_tty, note, plural, say, warn


class _EntryBar:
    """On a terminal, while an entry's files are stored: one tqdm bar on
    stderr with its name, files, bytes and rate (tqdm throttles the drawing;
    each call costs a counter update).  Gone once the entry is done: the
    result lines say the rest."""

    def __init__(self) -> None:
        self.bar = None

    def start(self, entry: str) -> None:
        self.close()
        self.bar = iec_bar(None, desc=entry, postfix="0 files", disable=None, leave=False, file=sys.stderr,
                           dynamic_ncols=True)

    def progress(self, files: int, nbytes: int) -> None:
        bar = self.bar
        if bar is not None:
            bar.postfix = f"{files} files" if files != 1 else "1 file"
            bar.update(nbytes - bar.n)

    def write(self, text: str) -> None:
        """A log line on stderr without tearing the bar."""
        if self.bar is None:
            warn(text)
            return
        with self.bar.external_write_mode(file=sys.stderr):
            warn(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command("ingest")
@click.option("--once", is_flag=True, help="Process every complete entry, then exit.")
@click.option("--study", help="Only this study's entries.")
@click.option("--settle", "settle", type=float, default=None, metavar="SECONDS",
              help="Override settle_seconds (how long an entry must be unchanged).")
@click.option("--json", "as_json", is_flag=True,
              help="With --once: print one JSON document (see below) instead of text.")
@click.pass_obj
def command(ctx: Ctx, once: bool, study: str | None, settle: float | None, as_json: bool) -> None:
    """Ingest complete inbox entries into their studies' stores.

    Without --once this is the daemon: it watches every configured inbox
    (inotify, or polling with `polling: true`), rescans every rescan_seconds,
    and ingests each entry once it has been unchanged for settle_seconds,
    one at a time per study, until SIGTERM or SIGINT (an entry in progress is
    abandoned and redone at the next start; exit status 0).  SIGHUP reloads
    the config file; a bad one is logged and the running one kept.  Log lines
    go to stderr (with sd-daemon priority prefixes under journald); -v adds
    detail.  A study is served by one daemon at a time: when another daemon
    already serves one of them, this one names that study and pid and exits
    with status 3.  `--once` still works while a daemon runs (it waits for
    the study's store).  With --study, only that study is served.

    With --once: exit status 0 when every entry taken was ingested, 1 when
    any failed, 3 when a study's store could not be written (disk full, I/O
    error, read-only, a failed sync): that study stops, the entry in hand
    stays in the inbox (not committed: taken again by the next run;
    committed: finished by the next run) and is never reported failed.
    On a terminal, --once shows a progress bar per entry on stderr (files,
    bytes, rate); not with -q or --json, and never off a terminal.

    \b
    With --once --json, stdout is one JSON object (printed at the end):
      results   one object per entry: entry, study, outcome ("ingested",
                "failed", "committed" or "waiting"), upload, files, bytes,
                new_bytes, new_versions, skipped, seconds, verified, reason,
                where (a failed entry's data), settles_in (a waiting entry)
      summary   counts per outcome, "faults" (one message per study stopped
                by its store) and "exit_status"
    Failures are also said on stderr, as without --json.
    """
    if as_json and not once:
        raise click.UsageError("--json needs --once (the daemon logs to stderr)")
    from eidetic.server.deploy import become_service_user
    become_service_user(ctx.cfg)   # as root: go on as the configured service user, before any write
    if not once:
        sys.exit(_daemon(ctx, study, settle))
    from eidetic.server.ingest import Ingester
    from eidetic.server.notify import Notifier

    cfg = ctx.cfg

    # Progress on a terminal only (and not with -q or --json): per entry, files, bytes, rate.
    bar = _EntryBar() if is_tty() and not ctx.quiet and not as_json else None

    def log(msg: str) -> None:
        # Without -v only a wait on another process is worth a line: silence
        # there looks like a hang (and -q silences even that).
        if ctx.verbose or ("another eidetic process" in msg and not ctx.quiet):
            line = f"{time.strftime('%H:%M:%S')} {msg}"
            if bar is not None:
                bar.write(line)
            else:
                warn(line)

    # Mails are queued as each entry finishes, as in the daemon; one delivery
    # attempt at the end, and what is not delivered waits in the outbox.
    notifier = Notifier(cfg, warn, debug=warn if ctx.verbose else None)

    def on_result(r) -> None:
        if bar is not None:
            bar.close()
        notifier.report(r)

    ingester = Ingester(cfg, log=log, on_result=on_result, progress=bar.progress if bar is not None else None,
                        on_entry=bar.start if bar is not None else None)
    try:
        results = ingester.run_once(study=study, settle_seconds=settle)
    finally:
        if bar is not None:
            bar.close()
    tell = (lambda _msg: None) if as_json else note   # stdout is the JSON document
    # An entry left waiting by a store fault is said with the fault, below.
    shown = [r for r in results if r.outcome != "waiting" or r.fault is None]
    counts = {k: sum(r.outcome == k for r in shown) for k in ("ingested", "failed", "committed", "waiting")}
    for r in shown:
        if r.outcome == "ingested":
            tell(f"ingested {r.entry}: upload {r.upload}, {plural(r.files, 'file')} ({human_bytes(r.bytes)}), "
                 f"{plural(r.new_versions, 'new version')}"
                 + (f", {r.skipped} skipped (not regular files)" if r.skipped else "")
                 + (", verified against the sender's description" if r.verified else ""))
        elif r.outcome == "failed":
            warn(f"FAILED {r.entry}: {r.reason}")
            if r.where:
                warn(f"  the data is kept at {r.where}")
        elif r.outcome == "committed":
            tell(f"committed {r.entry}: upload {r.upload}, finishing later (the next run completes it)")
        else:
            tell(f"waiting {r.entry}: {r.reason}")
    if not results and not ingester.faults:
        tell("nothing to ingest")
    notifier.deliver()
    for fault in ingester.faults:
        warn(f"eidetic: {fault.message}")
        if fault.entry_note:
            warn(f"  {fault.entry_note}")
    code = 3 if ingester.faults else 1 if counts["failed"] else 0
    if as_json:
        say(json.dumps({"results": [_result_json(r) for r in shown],
                        "summary": {**counts, "faults": [f.message for f in ingester.faults],
                                    "exit_status": code}}, indent=1))
    sys.exit(code)


def _result_json(r) -> dict:
    return {"entry": r.entry, "study": r.study, "outcome": r.outcome, "upload": r.upload,
            "files": r.files, "bytes": r.bytes, "new_bytes": r.new_bytes, "new_versions": r.new_versions,
            "skipped": r.skipped, "seconds": round(r.seconds, 3), "verified": r.verified,
            "reason": r.reason, "where": r.where, "settles_in": r.settles_in}


def _daemon(ctx: Ctx, study: str | None, settle: float | None) -> int:
    from eidetic.server.daemon import Daemon

    return Daemon(ctx.cfg, _line_logger(ctx.verbose, ctx.quiet), config_path=ctx.config_path, study=study,
                  settle=settle).run()


def _line_logger(verbose: int, quiet: bool = False):
    """One line per event on stderr, flushed at once.  Under journald
    ($JOURNAL_STREAM set) with an sd-daemon priority prefix and no time
    (the journal adds its own); otherwise with an ISO local time stamp.
    Debug lines only with -v; with -q only warnings and errors."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    lock = threading.Lock()
    tags = {3: "error: ", 4: "warning: "}

    def log(priority: int, msg: str) -> None:
        if priority >= 7 and not verbose or priority > 4 and quiet:
            return
        lines = msg.splitlines() or [""]
        if journal:
            text = "".join(f"<{priority}>{ln}\n" for ln in lines)
        else:
            stamp = datetime.now().astimezone().isoformat(timespec="seconds")
            text = "".join(f"{stamp} {tags.get(priority, '')}{ln}\n" for ln in lines)
        with lock:
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):   # no one is listening: ingest goes on
                pass
    return log
