"""eidetic status"""

from __future__ import annotations

import json
import sys

import click

from ..common import Ctx, human_bytes, plural, say


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _replica_line(r) -> str:
    if not r.reachable:
        return f"{r.name}: UNREACHABLE ({r.error})"
    if not r.uploads:
        return f"{r.name}: up to date (upload {r.replica_seq})"
    return (f"{r.name}: {plural(r.uploads, 'upload')} not replicated, the oldest received "
            f"{_hours(r.lag_seconds or 0)} ago")


@click.command("status")
@click.option("--study", help="Only this study.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object (stable keys) instead of text.")
@click.option("--prometheus", is_flag=True,
              help="node_exporter's textfile-collector format (docs/monitoring.md) instead of text.")
@click.pass_obj
def command(ctx: Ctx, study: str | None, as_json: bool, prometheus: bool) -> None:
    """Per study: entries waiting, in processing, failed, stale partial
    uploads, the last ingest, what the store holds, how full its file system
    is, and whether a daemon serves it; then entries that map to no study.

    Takes no lock: safe while the daemon runs.  A study member sees their
    study's store; what only the service user or root may see is listed as
    such, never guessed (replicas: only the service user, whose credentials
    reach them).  Exit status 3 when a study's index may not be used
    (it says which command rebuilds it) or something could not be seen
    (it says who may) or a store fault stopped ingest of a study (a full
    disk, an I/O error: it says what to do), else 1 when a failed entry is waiting in an inbox for
    someone to act on it, else 0.
    """
    from eidetic.core.layout import display
    from eidetic.server.status import status

    if as_json and prometheus:
        raise click.UsageError("--json and --prometheus cannot be used together")
    st = status(ctx.cfg, study)
    code = 3 if st.index_unusable or st.incomplete or st.faulted else 1 if st.has_failed else 0
    if as_json:
        click.echo(json.dumps(st.to_json(), indent=1, sort_keys=False))
        sys.exit(code)
    if prometheus:
        from eidetic.server.status import to_prometheus
        click.echo(to_prometheus(st), nl=False)
        sys.exit(code)
    for name, s in st.studies.items():
        daemon = ("daemon running" + (f" (pid {s.daemon_pid})" if s.daemon_pid and s.daemon_pid > 0 else "")
                  if s.daemon_running else "daemon unknown" if s.daemon_running is None else "no daemon running")
        say(f"study {name}: {daemon}")
        if s.fault is not None:
            f = s.fault
            say(f"  STOPPED      since {f.get('since', '?')}: {f['message']}"
                + (f"; {f['entry']}" if f.get("entry") else ""))
        say(f"  waiting      {len(s.waiting)}" + (": " + ", ".join(display(w.entry) for w in s.waiting[:5])
                                                  + (", ..." if len(s.waiting) > 5 else "") if s.waiting else ""))
        if s.records_known:
            say(f"  processing   {len(s.processing)}"
                + "".join(f"\n    {display(p.entry)} (upload {p.upload}, since {p.received})" for p in s.processing))
            say(f"  failed       {len(s.failed)}")
        else:
            say("  processing   unknown")       # unseen below says who may see them
            say("  failed       unknown")
        for f in s.failed:
            say(f"    {display(f.entry)} (upload {f.upload}, {f.finished}): {f.reason}")
            say(f"      kept as {display(f.where)}")
        say(f"  uploading    {s.partial} in progress, {len(s.stale)} stale")
        for p in s.stale:
            who = p.user or f"uid {p.uid}"
            say(f"    {display(p.entry)} in {p.inbox}: untouched for {_hours(p.idle_seconds)} ({who})")
        if s.last_ingest:
            li = s.last_ingest
            say(f"  last ingest  {li.time} {display(li.entry)} (upload {li.upload}): {plural(li.files, 'file')}, "
                f"{human_bytes(li.bytes)}")
        elif not s.records_known and s.uploads != 0:
            say("  last ingest  unknown")      # neither the records nor the store could say
        else:
            say("  last ingest  none")
        if s.versions is not None:
            paths = "? paths" if s.paths is None else plural(s.paths, "path")
            size = "?" if s.store_bytes is None else human_bytes(s.store_bytes)
            say(f"  store        {plural(s.uploads, 'upload')}, {paths}, {plural(s.versions, 'version')}, "
                f"{plural(s.objects, 'object')}, {size}")
        if s.percent_used is not None:
            say(f"  filesystem   {s.percent_used}% used, {human_bytes(s.free_bytes or 0)} free of "
                f"{human_bytes(s.total_bytes or 0)}")
        for e in s.errors:
            say(f"  error        {e}")
        for u in s.unseen:
            say(f"  unseen       {u}")
        for r in s.replicas:
            say(f"  replica      {_replica_line(r)}")
    if st.unknown:
        say("entries that map to no study:")
        for u in st.unknown:
            say(f"  {display(u.entry)} in {u.inbox}: {u.state}" + (f" ({u.reason})" if u.reason else ""))
    sys.exit(code)
