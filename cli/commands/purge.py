"""eidetic purge"""

from __future__ import annotations

import json
import os
import sys

import click

from ..common import Ctx, human_bytes, note, plural, say, warn


@click.command("purge")
@click.option("--older-than", "days", type=click.FloatRange(min=0), required=True, metavar="DAYS",
              help="Only entries ingested more than DAYS days ago.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--study", help="Only this study's entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON list of results instead of text.")
@click.pass_obj
def command(ctx: Ctx, days: float, dry_run: bool, study: str | None, as_json: bool) -> None:
    """Remove ingested entries (.eidetic~done~...) from the inboxes once the
    store provably holds every file in them.

    Meant for root's cron: entries belong to their uploaders, so the service
    user cannot delete them.  Each regular file is hashed again and must
    match the upload's manifest and an object in the store; one that does
    not (changed or added after the ingest) keeps the whole entry, and the
    reason is printed.  Failed and in-progress entries are never touched.

    Exit status 0 when every candidate was removed (or would be, with
    --dry-run), 1 when some had to be kept.
    """
    from eidetic.core.layout import display
    from eidetic.server.purge import purge

    def show(r) -> None:
        if as_json:
            return
        if r.outcome in ("removed", "would remove"):
            # what --dry-run is run for; with -q a real purge says only what it kept
            (say if dry_run else note)(f"{r.outcome} {display(r.where)} (study {r.study}, upload {r.upload}): "
                                       f"{plural(r.files, 'file')}, {human_bytes(r.bytes)}")
        elif r.outcome == "kept":
            say(f"kept {display(r.where)} (study {r.study}, upload {r.upload}): {r.reason}")
        elif ctx.verbose:
            say(f"gone {display(r.where)} (upload {r.upload}): no longer in the inbox")

    # Unlike ingest and fsck, purge does not switch to the service user: removing
    # uploaders' entries from the sticky inbox needs root, it writes nothing into a
    # store or tree, and the done record it rewrites keeps its owner.
    if os.geteuid() != 0 and not dry_run:
        warn("eidetic: note: purge normally runs as root (entries belong to their uploaders)")
    results = purge(ctx.cfg, days, dry_run=dry_run, study=study, log=show)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
    elif not any(r.outcome != "gone" for r in results):
        note(f"nothing to purge: no ingested entry older than {days:g} day{'' if days == 1 else 's'}")
    sys.exit(1 if any(r.outcome == "kept" for r in results) else 0)
