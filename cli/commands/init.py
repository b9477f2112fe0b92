"""eidetic init"""

from __future__ import annotations

import json
import sys

import click

from ..common import Ctx, note, say


@click.command("init")
@click.option("--check", is_flag=True,
              help="Change nothing: report what differs from the deployment design (modes; owners, "
                   "also of everything inside the stores, trees and state directory, with the chown that "
                   "fixes them; file systems, free space, inotify limits, network file systems). "
                   "Also says per study whether its inbox and store can clone files ('clones: yes', "
                   "zero-copy ingest; information only, with --json under -v). "
                   "Exit status 3 if something could not be seen by this user (it says who may look), "
                   "else 1 if anything differs, 0 if all is well.")
@click.option("--json", "as_json", is_flag=True, help="With --check: the findings as a JSON list.")
@click.option("--systemd-dropin", is_flag=True,
              help="Print a systemd drop-in (ReadWritePaths= for every configured directory) for "
                   "/etc/systemd/system/eidetic.service.d/paths.conf; changes nothing.")
@click.pass_obj
def command(ctx: Ctx, check: bool, as_json: bool, systemd_dropin: bool) -> None:
    """Create every configured directory (inboxes, state, stores, trees) with
    the modes and owners of the deployment design.

    \b
      inbox  service:service        3777 (sticky: uploaders keep off each other's entries)
      state  service:service        0700
      store  service:<study group>  2750 (members read history; tmp/ and the lock stay 0700/0600)
      tree   service:<study group>  2750 (setgid: new directories keep the study group)

    Owners come from the config keys 'user', 'group' and 'studies.<s>.group';
    without them nothing is chowned.  Safe to run again: it says what it
    created or changed, and 'ok' for what was already right.
    """
    from eidetic.server import deploy

    cfg = ctx.cfg
    if systemd_dropin:
        click.echo(deploy.systemd_dropin(cfg), nl=False)
        return
    if check:
        findings = deploy.check(cfg)
        # Information, not a difference from the design: never changes the exit status.
        clones = deploy.clones(cfg)
        if as_json:
            # The list holds findings ([] when all is well); the clone lines join it with -v only,
            # as entries of severity "info".
            infos = [c.to_json() for c in clones] if ctx.verbose else []
            click.echo(json.dumps([{"code": f.code, "severity": f.severity, "path": f.path,
                                    "detail": f.detail, **f.data} for f in findings] + infos, indent=1))
        else:
            for f in findings:
                say(str(f))
            for c in clones:
                note(str(c))
            if not findings:
                note("all is well: every directory matches the deployment design")
        unseen = any(f.code == "unreadable" for f in findings)
        sys.exit(3 if unseen else 1 if findings else 0)
    if cfg.is_default_layout:
        note(f"no config file: using the default layout under {cfg.state.rsplit('/', 1)[0]}")
    for a in deploy.init(cfg):
        note(str(a))
