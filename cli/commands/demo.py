"""eidetic demo"""

from __future__ import annotations

import os
import time

import click

from ..common import Ctx, human_bytes, plural, say


def _drop(inbox: str, name: str, files: dict[str, bytes]) -> None:
    """Place an upload the way a client does: write under a dot name, then rename."""
    tmp = os.path.join(inbox, "." + name)
    for rel, data in files.items():
        p = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.rename(tmp, os.path.join(inbox, name))


def _ingest(cfg) -> None:
    from eidetic.server.ingest import Ingester

    for r in Ingester(cfg).run_once(study="demo", settle_seconds=0):
        if r.outcome == "ingested":
            say(f"   ingested {r.entry}: {plural(r.files, 'file')}, {plural(r.new_versions, 'new version')}")
        else:
            say(f"   {r.outcome} {r.entry}: {r.reason}")


@click.command("demo")
@click.pass_obj
def command(ctx: Ctx) -> None:
    """Walk through eidetic on the default layout: send, re-send, log, fsck.

    Creates the layout if needed, drops two uploads of study 'demo' into the
    inbox, ingests them and shows the history.  Safe to run repeatedly.
    """
    from eidetic.server import deploy
    from eidetic import fsck
    from eidetic.server.history import history, resolve
    from eidetic.store.store import Store

    cfg = ctx.cfg
    if "demo" not in cfg.studies:
        raise click.UsageError("the demo needs a study named 'demo' (the default layout has one)")
    deploy.init(cfg)
    study = cfg.studies["demo"]
    inbox = study.inbox or cfg.inbox
    stamp = time.strftime("%Y%m%dT%H%M%S")
    say(f"1. A collector drops a folder into the inbox {inbox}")
    _drop(inbox, f"demo-labA-{stamp}-1", {
        "eprime/sub-01_run-1.txt": b"trial,rt\n1,512\n2,498\n",
        "biopac/sub-01.acq": os.urandom(4096),
        "notes.txt": b"session notes\n"})
    _ingest(cfg)
    say("2. The same folder is sent again with one file changed")
    _drop(inbox, f"demo-labA-{stamp}-2", {
        "eprime/sub-01_run-1.txt": b"trial,rt\n1,512\n2,498\n3,530\n",
        "notes.txt": b"session notes\n"})
    _ingest(cfg)
    say(f"3. The tree keeps every version: {study.tree}/eprime")
    for name in sorted(os.listdir(os.path.join(study.tree, "eprime"))):
        say(f"   {name}")
    say("4. eidetic log demo:eprime/sub-01_run-1.txt")
    for e in history(resolve(cfg, "demo:eprime/sub-01_run-1.txt")):
        v = e.version
        say(f"   v{v.n}  {v.received[:19]}Z  upload {e.upload}  {human_bytes(v.size)}  {v.blake3[:12]}")
    say("5. eidetic fsck")
    store = Store.open(*study.store_args())
    errors = [f for f in fsck.check(store) if f.severity == "error"]
    say("   clean" if not errors else f"   {plural(len(errors), 'problem')}: run 'eidetic fsck' for details")
    say("Try: eidetic log demo:eprime   eidetic checkout demo:eprime/sub-01_run-1.txt --version 1")
