"""eidetic restore"""

from __future__ import annotations

import json
import os
import sys

import click

from ..common import Ctx, PhaseBars as _Bars, human_bytes, is_tty, note, plural, say, warn


@click.command("restore")
@click.option("--from", "source", required=True, metavar="NAME", help="The replica to restore from.")
@click.option("--study", required=True, help="The study to restore.")
@click.option("--json", "as_json", is_flag=True,
              help='Print one JSON object: {"study", "replica", "manifests", "objects", "bytes", "fetched", '
                   '"resumed", "fsck": [findings]}.')
@click.pass_obj
def command(ctx: Ctx, source: str, study: str, as_json: bool) -> None:
    """Rebuild a lost study's store and tree from a replica.

    The study's configured store and tree must be empty or absent (as
    'eidetic init' leaves them); anything else is refused untouched (exit 2).
    Every manifest (as a chain, up to the replica's HEAD) and every object
    (its BLAKE3) is verified as it is downloaded; the index and the tree are
    rebuilt with the same version names, then fsck checks the result.  A
    restore that was interrupted is finished by running the same command
    again.  Run as root it goes on as the configured service user.
    """
    from eidetic.server.deploy import become_service_user, init

    cfg = ctx.cfg
    s = cfg.study(study)
    rcfg = s.replica(source)
    if os.geteuid() == 0 and cfg.user is not None and not (os.path.isdir(s.store) and os.path.isdir(s.tree)):
        # Absent directories are made as 'eidetic init' makes them (owner, group,
        # modes), which the service user could not do itself.
        init(cfg)
    become_service_user(cfg)
    from eidetic import fsck
    from eidetic.replica.backend import open_backend
    from eidetic.replica.restore import restore
    from eidetic.store.store import Store

    backend = open_backend(rcfg)
    bars = _Bars(study) if is_tty() and not as_json else None
    try:
        rep = restore(Store(*s.store_args()), backend, progress=bars, log=warn)
    finally:
        if bars is not None:
            bars.close()
        backend.close()
    findings = fsck.check(Store.open(*s.store_args()))
    errors = [f for f in findings if f.is_error]
    if as_json:
        say(json.dumps({"study": study, "replica": source, "manifests": rep.manifests, "objects": rep.objects,
                        "bytes": rep.object_bytes, "fetched": rep.fetched, "resumed": rep.resumed,
                        "fsck": [f.to_json() for f in findings]}, indent=1))
    else:
        for f in findings:
            say(f.line())
        verdict = "fsck clean" if not findings else f"fsck: {plural(len(errors), 'error')}"
        note(f"restored study {study} from replica {source}: {plural(rep.manifests, 'upload')}, "
             f"{plural(rep.objects, 'object')} ({human_bytes(rep.object_bytes)}), every byte verified; "
             f"{verdict}")
    sys.exit(1 if errors else 0)
