"""eidetic ingest"""

from __future__ import annotations

import sys
import time

import click

from ..common import Ctx, human_bytes, say, warn


@click.command("ingest")
@click.option("--once", is_flag=True, help="Process every complete entry, then exit.")
@click.option("--study", help="Only this study's entries.")
@click.option("--settle", "settle", type=float, default=None, metavar="SECONDS",
              help="Override settle_seconds (how long an entry must be unchanged).")
@click.pass_obj
def command(ctx: Ctx, once: bool, study: str | None, settle: float | None) -> None:
    """Ingest complete inbox entries into their studies' stores.

    Exit status 0 when every entry taken was ingested, 1 when any failed.
    """
    from eidetic.ingest import Ingester

    if not once:
        raise click.UsageError("only 'eidetic ingest --once' is available in this version "
                               "(the watching daemon is not part of it yet)")
    cfg = ctx.cfg
    log = (lambda m: warn(f"{time.strftime('%H:%M:%S')} {m}")) if ctx.verbose else (lambda m: None)
    results = Ingester(cfg, log=log).run_once(study=study, settle_seconds=settle)
    failed = 0
    for r in results:
        if r.outcome == "ingested":
            say(f"ingested {r.entry}: upload {r.upload}, {r.files} files ({human_bytes(r.bytes)}), "
                f"{r.new_versions} new versions" + (f", {r.skipped} skipped (not regular files)"
                                                    if r.skipped else ""))
        elif r.outcome == "failed":
            failed += 1
            warn(f"FAILED {r.entry}: {r.reason}")
            if r.where:
                warn(f"  the data is kept at {r.where}")
        else:
            say(f"waiting {r.entry}: {r.reason}")
    if not results:
        say("nothing to ingest")
    sys.exit(1 if failed else 0)
