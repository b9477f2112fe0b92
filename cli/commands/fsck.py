"""eidetic fsck"""

from __future__ import annotations

import json
import sys

import click

from ..common import Ctx, PhaseBars as _Bars, human_bytes, is_tty, plural, say, warn


def _check(store, name: str, quick: bool, lock: bool):
    """fsck.check with progress bars on a terminal (tqdm(disable=None) would be silent anyway).
    Only --repair holds the store lock while checking: a plain check never makes an ingest wait."""
    from eidetic import fsck

    bars = _Bars(name) if is_tty() else None
    try:
        return fsck.check(store, quick=quick, progress=bars, lock=lock)
    finally:
        if bars is not None:
            bars.close()


@click.command("fsck")
@click.option("--study", help="Only this study.")
@click.option("--quick", is_flag=True, help="Do not re-hash object contents (sizes are still compared).")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as a JSON list.")
@click.option("--repair", is_flag=True,
              help="Repair what can be derived again (index, tree names, modes, temp files); "
                   "move hand-made files to <store>/lost+found; fetch corrupt or missing objects from a "
                   "replica (--replica, else each configured one); say what cannot be repaired.")
@click.option("--replica", "replica", metavar="NAME",
              help="Check replica NAME against the local chain (E07x findings); with --repair, the replica "
                   "to fetch lost objects from.")
@click.option("--read-data", is_flag=True,
              help="With --replica: download every object and manifest and re-hash it.")
@click.pass_obj
def command(ctx: Ctx, study: str | None, quick: bool, as_json: bool, repair: bool, replica: str | None,
            read_data: bool) -> None:
    """Audit the stores and trees; one line per finding.

    Codes E0NN are errors (exit status 1), W0NN warnings (exit status 0).
    With --replica NAME (and no --repair) the replica is checked instead:
    every manifest and object of the local chain on it, byte-identical, with
    its size, checksum and retention; --read-data downloads and re-hashes.
    """
    from eidetic.core.errors import UsageError
    if read_data and (not replica or repair):
        raise UsageError("--read-data checks a replica: use it with --replica NAME (and without --repair)")
    from eidetic.server.deploy import become_service_user
    become_service_user(ctx.cfg)   # as root: go on as the configured service user, before any write
    from eidetic import fsck
    from eidetic.store.store import Store

    cfg = ctx.cfg
    names = [cfg.study(study).name] if study else sorted(cfg.studies)
    if replica:
        if study:
            cfg.study(study).replica(replica)     # the error names the replicas the study has
        names = [n for n in names if any(r.name == replica for r in cfg.study(n).replicas)]
        if not names:
            raise UsageError(f"no study has a replica {replica!r}")
    if replica and not repair:
        return _check_replicas(ctx, names, replica, read_data, as_json)
    report: list[dict] = []
    errors = warnings = 0
    hashed = objects = 0
    out = warn if as_json else say
    from eidetic.server.access import check_service_access
    for name in names:
        # A permission problem is never reported as damage: refused up front, naming who may.
        check_service_access(cfg, cfg.study(name), "fsck")
        store = Store(*cfg.study(name).store_args())
        findings = _check(store, name, quick, repair)
        if repair and findings:
            rep = _repair_with_replicas(cfg.study(name), store, findings, replica)
            for line in rep.done:
                out(f"{name}: repaired: {line}")
            for line in rep.cannot:
                out(f"{name}: NOT REPAIRED: {line}")
            for line in rep.notes:
                out(f"{name}: note: {line}")
            if rep.lost_and_found:
                out(f"{name}: files moved aside are in {rep.lost_and_found}")
            findings = _check(store, name, quick, repair)
        hashed += findings.stats["hashed_bytes"]
        objects += findings.stats["objects"]
        for f in findings:
            if f.is_error:
                errors += 1
            else:
                warnings += 1
            if as_json:
                report.append(dict(f.to_json(), study=name))
            else:
                say(f.line())
    if as_json:
        click.echo(json.dumps(report, indent=1))
    what = f"{plural(len(names), 'study')}, {plural(objects, 'object')}"
    what += ", sizes only (--quick)" if quick else f", {human_bytes(hashed)} re-hashed"
    verdict = "clean" if not errors and not warnings else \
        f"{plural(errors, 'error')}, {plural(warnings, 'warning')}" + (" remain" if repair else "")
    if not ctx.quiet:    # the findings are the result; -q leaves out the summary line
        out(f"fsck: {verdict} ({what})")
    sys.exit(1 if errors else 0)


def _repair_with_replicas(scfg, store, findings, replica: str | None):
    """fsck.repair, with the replicas it may fetch lost objects from: the one
    named, else every configured one in config order (opened only if needed)."""
    from eidetic import fsck
    from eidetic.replica.backend import open_backend

    from eidetic.core.errors import ReplicaError

    wanted = [scfg.replica(replica)] if replica else list(scfg.replicas)
    if not any(f.code in ("E020", "E021") for f in findings):
        wanted = []
    backends = []
    for r in wanted:
        try:
            backends.append(open_backend(r))
        except ReplicaError as e:
            if replica:
                raise           # the one asked for: its error is the answer
            warn(f"{scfg.name}: {e.message}; repairing without it")
    try:
        return fsck.repair(store, findings, replicas=backends)
    finally:
        for b in backends:
            b.close()


def _check_replicas(ctx: Ctx, names: list[str], replica: str, read_data: bool, as_json: bool) -> None:
    from eidetic import fsck
    from eidetic.replica.backend import open_backend
    from eidetic.store.store import Store

    cfg = ctx.cfg
    report: list[dict] = []
    errors = warnings = objects = downloaded = 0
    out = warn if as_json else say
    for name in names:
        scfg = cfg.study(name)
        rcfg = scfg.replica(replica)
        backend = open_backend(rcfg)
        bars = _Bars(name) if is_tty() else None
        try:
            findings = fsck.check_replica(Store.open(*scfg.store_args()), backend, rcfg.retention_days,
                                          rcfg.retention_mode, read_data=read_data, progress=bars)
        finally:
            if bars is not None:
                bars.close()
            backend.close()
        objects += findings.stats["replica_objects"]
        downloaded += findings.stats["downloaded_bytes"]
        for f in findings:
            if f.is_error:
                errors += 1
            else:
                warnings += 1
            if as_json:
                report.append(dict(f.to_json(), study=name, replica=replica))
            else:
                say(f.line())
    if as_json:
        click.echo(json.dumps(report, indent=1))
    what = f"{plural(len(names), 'study')}, {plural(objects, 'object')} on replica {replica}"
    what += f", {human_bytes(downloaded)} downloaded and re-hashed" if read_data else ", sizes and metadata"
    verdict = "clean" if not errors and not warnings else f"{plural(errors, 'error')}, {plural(warnings, 'warning')}"
    if not ctx.quiet:
        out(f"fsck --replica: {verdict} ({what})")
    sys.exit(1 if errors else 0)
