#!/usr/bin/env python3
"""`eidetic log` on a study with 10 million path-versions (issue "Ingest at
the speed of the disk", target: <= 150 ms per `log --json STUDY:path`,
start-up included).

    python3 bench/log_10m.py [--work DIR] [--paths N] [--uploads N] [--keep] [--reuse]

Ingesting 10 x 1,000,000 real files would take hours here, and `log` reads
only HEAD, the index and nothing else.  So the store is made by eidetic's own
code, without files: N manifests (uploads) of --paths records each, every
path changed in every upload, written with the store's manifest writer and
committed as ingest commits them; then the index is rebuilt from them by
`Store.rebuild_index` (what `fsck --repair` runs).  Objects are not written:
`log` never opens one (the store is not fsck-clean, and says so if asked).
Then `eidetic log --json` of one path (every version) and of one folder is
timed through the CLI, as a user runs it, 15 times each; medians and ranges
are printed, with the index's size and the build times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from eidetic.store.manifest import FileRecord, Header  # noqa: E402
from eidetic.store.store import Store  # noqa: E402

STUDY = "bench"


def path_of(i: int) -> bytes:
    return b"logset/sub-%03d/ses-%d/trial-%07d.txt" % (i % 1000, (i // 1000) % 10, i)


def build(root: str, paths: int, uploads: int) -> dict:
    store = Store.init(STUDY, os.path.join(root, "store"), os.path.join(root, "tree"))
    t0 = time.perf_counter()
    with store.lock():
        for u in range(1, uploads + 1):
            seq, prev = store.head()
            received = f"2026-12-{u:02d}T10:00:00.000000Z"
            h = Header(seq=seq + 1, upload=f"202612{u:02d}T100000Z-{u:08x}", prev=prev, study=STUDY,
                       entry=b"bench-labA-%d" % u, received=received, uploader_uid=0,
                       uploader_name="bench", source="labA")
            af, w = store.new_manifest(h)
            for i in sorted(range(paths), key=path_of):       # walk order: sorted paths
                digest = hashlib.blake2b(b"%d %d" % (u, i), digest_size=32).hexdigest()
                w.add(FileRecord(path_of(i), 64, digest, 0o644, 1_700_000_000_000_000_000 + u))
            store.commit_manifest(af, w)
            print(f"  manifest {u}/{uploads} written", flush=True)
        t1 = time.perf_counter()
        store.rebuild_index()
        t2 = time.perf_counter()
    store.close()
    return {"manifests_s": round(t1 - t0, 1), "rebuild_s": round(t2 - t1, 1)}


def time_cli(argv: list[str], n: int = 15) -> dict:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run(argv, capture_output=True)
        times.append((time.perf_counter() - t) * 1000)
        if r.returncode != 0:
            raise SystemExit(f"{argv}: exit {r.returncode}: {r.stderr.decode(errors='replace')}")
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1), "bytes_out": len(r.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/bench-work/log10m")
    ap.add_argument("--paths", type=int, default=1_000_000)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--eidetic", default=os.path.join(os.path.dirname(sys.executable), "eidetic"))
    ap.add_argument("--reuse", action="store_true", help="time the store an earlier --keep run left")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    cfg = os.path.join(a.work, "eidetic.yaml")
    out: dict = {"paths": a.paths, "uploads": a.uploads, "path_versions": a.paths * a.uploads}
    if not a.reuse:
        shutil.rmtree(a.work, ignore_errors=True)
        os.makedirs(a.work)
        with open(cfg, "w") as f:
            json.dump({"inbox": os.path.join(a.work, "inbox"), "state": os.path.join(a.work, "state"),
                       "studies": {STUDY: {"store": os.path.join(a.work, "store"),
                                           "tree": os.path.join(a.work, "tree")}}}, f)
        out.update(build(a.work, a.paths, a.uploads))
    idx = os.path.join(a.work, "store", "index", "data.mdb")
    out["index_bytes"] = os.path.getsize(idx)
    one = path_of(4007).decode()
    folder = "logset/sub-007/ses-4"
    out["log_path"] = time_cli([a.eidetic, "--config", cfg, "log", "--json", f"{STUDY}:{one}"])
    out["log_folder"] = time_cli([a.eidetic, "--config", cfg, "log", "--json", f"{STUDY}:{folder}"])
    print(json.dumps(out, indent=1))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
