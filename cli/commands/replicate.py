"""eidetic replicate"""

from __future__ import annotations

import json
import sys

import click

from ..common import Ctx, human_bytes, iec_bar, is_tty, note, plural, say, warn


class _Bar:
    """One tqdm bar per replica on stderr, counting bytes sent; the
    description says which manifest it is at.  Only on a terminal."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar = iec_bar(None, desc=label, disable=None, leave=False, file=sys.stderr)
        self.todo = 0
        self.done = 0

    def planned(self, manifests: int, last_seq: int) -> None:
        self.todo = manifests
        self._desc()

    def manifest(self, seq: int) -> None:
        self.done += 1
        self._desc()

    def sent(self, nbytes: int) -> None:
        self.bar.update(nbytes)    # tqdm's update is thread-safe (it holds its own lock)

    def _desc(self) -> None:
        self.bar.set_description_str(f"{self.label}: {self.done}/{self.todo} uploads", refresh=True)

    def close(self) -> None:
        self.bar.close()


def _rate(ctx, param, value: str | None) -> int | None:
    if value is None:
        return None
    from eidetic.core.layout import parse_bytes
    try:
        n = parse_bytes(value)
    except ValueError as e:
        raise click.BadParameter(f"{e}; bytes per second with an IEC suffix, e.g. 10M") from None
    if n <= 0:
        raise click.BadParameter("must be more than 0")
    return n


@click.command("replicate")
@click.option("--study", help="Only this study.")
@click.option("--replica", "replica_name", metavar="NAME", help="Only the replica of this name.")
@click.option("--bwlimit", metavar="RATE", callback=_rate,
              help="At most RATE bytes per second per replica (IEC suffixes: 500K, 10M, 1G).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of results instead of text.")
@click.pass_obj
def command(ctx: Ctx, study: str | None, replica_name: str | None, bwlimit: int | None, as_json: bool) -> None:
    """Copy to each configured replica what it lacks, in commit order.

    Objects first, each upload's manifest once all its objects are there,
    then HEAD (store_format.md, "Replicas").  What a replica holds is read
    back from it first, so an interrupted run (even kill -9) is simply run
    again.  Exit status 0 when every replica is up to date, else that of the
    worst failure (3: unreachable, refused credentials, no such bucket;
    2: retention asked of a bucket without Object Lock; 1: a replica that
    differs from the store, see 'eidetic fsck --replica NAME').
    """
    from eidetic.server.deploy import become_service_user
    become_service_user(ctx.cfg)   # the service user's ~/.aws and file ownership, as the daemon's
    from eidetic.core.errors import ReplicaError, UsageError
    from eidetic.replica.backend import open_backend
    from eidetic.replica.replicate import replicate
    from eidetic.store.store import Store

    cfg = ctx.cfg
    studies = [cfg.study(study)] if study else [cfg.studies[n] for n in sorted(cfg.studies)]
    pairs = [(s, r) for s in studies for r in s.replicas if replica_name is None or r.name == replica_name]
    if not pairs:
        named = f"a replica named {replica_name!r}" if replica_name else "a replica"
        where = f"study {study} has no" if study else "no study has"
        raise UsageError(f"{where} {named} configured (studies.<s>.replicas, docs/admin.md)".replace(
            "has no a ", "has no "))
    report = []
    worst = 0
    for s, r in pairs:
        label = f"{s.name} -> {r.name}"
        bar = _Bar(label) if is_tty() and not as_json and not ctx.quiet else None
        try:
            store = Store.open(*s.store_args())
            backend = open_backend(r)
            try:
                res = replicate(store, backend, bwlimit=bwlimit, progress=bar)
            finally:
                backend.close()
        except ReplicaError as e:
            worst = max(worst, e.exit_code)
            warn(f"eidetic: study {s.name}: {e.message}")
            report.append({"study": s.name, "replica": r.name, "url": r.url, "error": e.message,
                           "exit_code": e.exit_code})
            continue
        finally:
            if bar is not None:
                bar.close()
        report.append(dict(study=s.name, url=r.url, **res.to_json()))
        if as_json:
            continue
        if res.manifests or res.objects:
            rate = res.bytes / res.elapsed if res.elapsed > 0 else 0
            say(f"{label}: sent {plural(res.manifests, 'upload')}, {plural(res.objects, 'object')}, "
                f"{human_bytes(res.bytes)} in {res.elapsed:.1f} s ({human_bytes(int(rate))}/s); "
                f"replica at upload {res.head} of {res.local_head}")
        else:
            note(f"{label}: up to date (upload {res.head})")
    if as_json:
        click.echo(json.dumps(report, indent=1))
    sys.exit(worst)
