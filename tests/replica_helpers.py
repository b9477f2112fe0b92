"""A study with a replica, for the restore and fsck --replica tests.

``Site`` is a study made by really ingesting entries, with one replica
``offsite`` configured: a file:// directory, or a bucket of the moto S3
server of tests/s3_peer.py (reached through a real shared-credentials
file and profile).  ``site.replicate()`` copies the store to the replica
with eidetic.replica.replicate (store_format.md, "Replicas").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from eidetic.replica.backend import open_backend
from eidetic.replica.replicate import replicate
from eidetic.server import config, deploy
from eidetic.server.ingest import Ingester
from eidetic.store.store import Store

STUDY = "s"
REPLICA = "offsite"


class Site:
    def __init__(self, root: Path, kind: str, s3=None, creds=None, object_lock: bool = False,
                 retention_days: int | None = None) -> None:
        self.root = root
        self.kind = kind
        self.inbox = str(root / "inbox")
        self.tree = str(root / "tree")
        self.store_dir = str(root / "store")
        if kind == "file":
            self.replica_dir = root / "site2" / "s"
            self.replica_dir.mkdir(parents=True)
            rdoc: dict = {"url": f"file://{self.replica_dir}"}
        else:
            self.bucket = s3.new_bucket(object_lock=object_lock, versioning=True)
            rdoc = {"url": f"s3://{self.bucket}/archive/s", "endpoint": s3.endpoint, "region": s3.region,
                    "profile": creds.profile}
            if retention_days:
                rdoc.update(retention_days=retention_days, retention_mode="governance")
        self.s3 = s3
        self.doc = {"inbox": self.inbox, "state": str(root / "state"), "settle_seconds": 0,
                    "studies": {STUDY: {"tree": self.tree, "store": self.store_dir,
                                        "replicas": {REPLICA: rdoc}}}}
        self.config_path = root / "eidetic.yaml"
        self.config_path.write_text(yaml.safe_dump(self.doc))
        self.cfg = config.load(str(self.config_path))
        deploy.init(self.cfg)
        self.sent = 0

    @property
    def rcfg(self):
        return self.cfg.study(STUDY).replica(REPLICA)

    def backend(self):
        return open_backend(self.rcfg)

    def store(self) -> Store:
        return Store(*self.cfg.study(STUDY).store_args())

    def send(self, files: dict[str, bytes]) -> None:
        self.sent += 1
        name = f"{STUDY}-labA-{self.sent}"
        part = os.path.join(self.inbox, "." + name)
        for rel, data in files.items():
            p = os.path.join(part, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        os.rename(part, os.path.join(self.inbox, name))
        results = Ingester(self.cfg).run_once(settle_seconds=0)
        assert [r.outcome for r in results] == ["ingested"], [(r.outcome, r.reason) for r in results]

    def three_uploads(self) -> None:
        """d/a.txt in three versions, a shared file, a large object, an empty file."""
        self.send({"d/a.txt": b"alpha 1\n", "d/b.bin": b"\x00\x01" * 300, "top.txt": b"top\n"})
        self.send({"d/a.txt": b"alpha 2\n", "big.dat": os.urandom(3 << 20), "empty": b""})
        self.send({"d/a.txt": b"alpha 3\n", "d/b.bin": b"\x00\x01" * 300, "new/x.txt": b"x\n"})

    def replicate(self) -> None:
        """What 'eidetic replicate' does: the store copied in its commit order."""
        b = self.backend()
        try:
            replicate(self.store(), b)
        finally:
            b.close()

    # -- what a restore must reproduce
    def snapshot(self) -> dict:
        """Every tree name with its bytes, every manifest's bytes, HEAD and the marker."""
        out = {}
        tree = os.fsencode(self.tree)
        for dirpath, _dirs, files in os.walk(tree):
            for f in files:
                p = dirpath + b"/" + f
                with open(p, "rb") as fh:
                    out[b"tree/" + p[len(tree) + 1:]] = fh.read()
        for sub in ("manifests",):
            d = os.path.join(self.store_dir, sub)
            for n in sorted(os.listdir(d)):
                out[f"store/{sub}/{n}".encode()] = Path(d, n).read_bytes()
        for n in ("HEAD", "eidetic-store"):
            out[f"store/{n}".encode()] = Path(self.store_dir, n).read_bytes()
        objs = os.path.join(self.store_dir, "objects")
        for dirpath, _dirs, files in os.walk(objs):
            for f in files:
                out[f"store/objects/{os.path.basename(dirpath)}/{f}".encode()] = b"present"
        return out

    def lose_everything(self) -> None:
        shutil.rmtree(self.store_dir)
        shutil.rmtree(self.tree)


def make_site(request, tmp_path, kind: str, **kw) -> Site:
    if kind == "s3-locked":     # Object Lock on the bucket, retention in the config
        kind = "s3"
        kw.update(object_lock=True, retention_days=1)
    if kind == "s3":
        s3 = request.getfixturevalue("s3_peer")
        creds = request.getfixturevalue("s3_creds")
        return Site(tmp_path, "s3", s3=s3, creds=creds, **kw)
    return Site(tmp_path, "file", **kw)


def close_envs(prefix: str) -> None:
    from eidetic.store import index as index_mod

    with index_mod._envs_lock:
        paths = [p for p in index_mod._envs if p.startswith(prefix)]
        envs = [index_mod._envs.pop(p) for p in paths]
    for e in envs:
        e.close()


KINDS = [pytest.param("file", id="file"), pytest.param("s3", id="s3")]
