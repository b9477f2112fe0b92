#!/usr/bin/env python3
"""eidetic benchmark: ``eidetic replicate`` vs ``aws s3 sync`` to a local S3 endpoint.

    python3 bench/replicate.py [--scale F] [--repeat N] [--work DIR] [--aws PATH] ...

One store is made by ingesting the reference data set (bench/gen_data.py,
as run.py does); then, side by side in one run, the same store directory
is copied to a fresh S3 endpoint on 127.0.0.1 by

* ``eidetic replicate`` (objects, manifests, marker, HEAD; SHA-256 checksum
  and BLAKE3 metadata on every PUT, multipart above 8 MiB, 8 objects in flight);
* ``aws s3 sync STORE s3://BUCKET/sync`` (the aws CLI, 10 requests in flight,
  its default), leaving out ``index/``, ``tmp/`` and ``lock`` as replicate does;
* optionally ``eidetic replicate`` into a bucket with Object Lock and
  ``retention_days`` (every PUT also carries the retention).

The endpoint is moto's standalone server (``moto_server``, the only S3
server installable here: /work/shared/FACTS.md), a fresh process for every
measured run so that each starts from an empty server and one run's memory
is not another's.  moto keeps everything in memory and is one Python
process: it is the bottleneck for every client alike, so only the ratio of
the two clients, measured in the same run, means anything.

The aws CLI is not a dependency of eidetic: ``--aws`` names it, else one is
installed into a throw-away venv under the work directory (``pip install
awscli``).  The target (issue 12): eidetic within 1.5x of ``aws s3 sync``,
memory flat.  Rules kept (docs/design.md, "Measuring here"): fresh
directories and buckets for every measured run, ``sync`` before each,
order alternating between repetitions, medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from run import (EIDETIC, MiB, GiB, Bench, count_files, eidetic_config, ensure_data, machine_info,  # noqa: E402
                 place_entry, setup_eidetic_env)

TARGET_RATIO = 1.5
STUDY = "bench"
PROFILE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """``moto_server -H 127.0.0.1 -p PORT`` as a child process (no auth: any key works)."""

    def __init__(self, binary: str, logdir: str, tag: str) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(logdir, f"moto-{tag}.log"), "wb")
        self.proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (see {self.log.name})") from None
                time.sleep(0.2)

    def rss_mib(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def s3_client(endpoint: str):
    import boto3
    from botocore.config import Config
    return boto3.session.Session(aws_access_key_id="bench", aws_secret_access_key="bench",
                                 region_name="us-east-1").client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}))


def bucket_summary(endpoint: str, bucket: str, prefix: str) -> tuple[int, int]:
    n = size = 0
    for page in s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", ()):
            n += 1
            size += o["Size"]
    return n, size


def aws_cli(b: Bench, given: str | None, work: str) -> str:
    if given:
        return given
    venv = os.path.join(work, "awscli-venv")
    aws = os.path.join(venv, "bin", "aws")
    if not os.path.exists(aws):
        b.say(f"installing the aws CLI into {venv} (pip install awscli) ...")
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "awscli"], check=True)
    return aws


def make_store(b: Bench, eidetic: str, data: str, root: str) -> tuple[str, str]:
    """A store holding the data set as one upload (setup: not timed)."""
    cfg = eidetic_config(root, STUDY)
    subprocess.run([eidetic, "--config", cfg, "init"], check=True, stdout=subprocess.DEVNULL, env=EIDETIC["env"])
    staged = os.path.join(root, "staged")
    b.copy_tree(data, staged)
    place_entry(staged, os.path.join(root, "inbox"), f"{STUDY}-lab-1")
    t0 = time.monotonic()
    subprocess.run([eidetic, "--config", cfg, "-q", "ingest", "--once"], check=True, env=EIDETIC["env"])
    b.say(f"store: ingested the data set in {time.monotonic() - t0:.1f} s (setup)")
    return cfg, os.path.join(root, "store")


def with_replica(cfg: str, endpoint: str, bucket: str, retention: bool) -> str:
    """A copy of *cfg* with the study's replica ``offsite`` on *bucket*."""
    out = cfg.replace(".yaml", f"-{bucket}.yaml")
    lines = [f"    replicas:\n", f"      offsite:\n", f"        url: s3://{bucket}/eidetic\n",
             f"        endpoint: {endpoint}\n", f"        region: us-east-1\n", f"        profile: {PROFILE}\n"]
    if retention:
        lines += ["        retention_days: 1\n", "        retention_mode: governance\n"]
    with open(cfg) as f, open(out, "w") as g:
        g.write(f.read() + "".join(lines))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="data set scale (1 = 2.2 GiB / 50,006 files)")
    ap.add_argument("--work", default="/work/bench-work")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--eidetic", default=os.path.join(HERE, "..", ".venv", "bin", "eidetic"))
    ap.add_argument("--moto", default=None, help="moto_server (default: beside the eidetic script)")
    ap.add_argument("--aws", default=None, help="the aws CLI (default: installed into a venv under --work)")
    ap.add_argument("--no-lock", action="store_true", help="leave out the Object Lock (retention) run")
    ap.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    b = Bench(a)
    eidetic = os.path.abspath(a.eidetic)
    moto = a.moto or os.path.join(os.path.dirname(eidetic), "moto_server")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.join(a.work, f"replicate-{stamp}")
    os.makedirs(run_dir)
    b.logdir = os.path.join(run_dir, "logs")
    os.makedirs(b.logdir)
    setup_eidetic_env(eidetic, os.path.join(a.work, "pycache"))
    aws = aws_cli(b, a.aws, a.work)
    data, summary = ensure_data(b, a.work, a.scale)
    cfg, store = make_store(b, eidetic, data, os.path.join(run_dir, "site"))

    creds = os.path.join(run_dir, "aws")
    os.makedirs(creds)
    with open(os.path.join(creds, "credentials"), "w") as f:
        f.write(f"[{PROFILE}]\naws_access_key_id = bench\naws_secret_access_key = bench\n")
    with open(os.path.join(creds, "config"), "w") as f:
        f.write(f"[profile {PROFILE}]\nregion = us-east-1\n")
    env = dict(EIDETIC["env"] or os.environ, AWS_SHARED_CREDENTIALS_FILE=os.path.join(creds, "credentials"),
               AWS_CONFIG_FILE=os.path.join(creds, "config"), AWS_PROFILE=PROFILE)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        env.pop(k, None)

    kinds = ["eidetic replicate", "aws s3 sync"] + ([] if a.no_lock else ["eidetic replicate (Object Lock)"])
    moto_rss: dict[str, list[float]] = {k: [] for k in kinds}
    keys: dict[str, tuple[int, int]] = {}
    for rep in range(a.repeat):
        order = kinds[rep % len(kinds):] + kinds[:rep % len(kinds)]
        for kind in order:
            server = MotoServer(moto, b.logdir, f"{rep}-{kind.split()[0]}")
            try:
                bucket = f"bench-{rep}-{kinds.index(kind)}"
                s3_client(server.endpoint).create_bucket(Bucket=bucket,
                                                         ObjectLockEnabledForBucket="Lock" in kind)
                if kind.startswith("eidetic"):
                    rcfg = with_replica(cfg, server.endpoint, bucket, "Lock" in kind)
                    r = b.timed("replicate", kind, [eidetic, "--config", rcfg, "-q", "replicate"], env=env)
                    prefix = "eidetic/"
                else:
                    r = b.timed("replicate", kind,
                                [aws, "--endpoint-url", server.endpoint, "s3", "sync", store, f"s3://{bucket}/sync",
                                 "--exclude", "index/*", "--exclude", "tmp/*", "--exclude", "lock",
                                 "--only-show-errors"], env=env)
                    prefix = "sync/"
                keys[kind] = bucket_summary(server.endpoint, bucket, prefix)
                moto_rss[kind].append(server.rss_mib())
                r.extra["keys"], r.extra["key_bytes"] = keys[kind]
            finally:
                server.stop()

    def med(kind: str, attr: str) -> float | None:
        vals = [getattr(r, attr) for r in b.results if r.tool == kind and r.ok]
        return statistics.median(vals) if vals else None

    print()
    files, nbytes = count_files(os.path.join(run_dir, "site", "tree"))
    print(f"Store: {summary['files']:,} files ({files:,} in the tree), {nbytes / GiB:.2f} GiB, scale {a.scale:g}")
    print(f"{'tool':<34}{'wall s':>9}{'MiB/s':>8}{'CPU s':>8}{'peak RSS MiB':>14}{'keys':>9}{'moto RSS MiB':>14}")
    table = {}
    for kind in kinds:
        s = med(kind, "seconds")
        if s is None:
            print(f"{kind:<34}   failed")
            continue
        cpu = statistics.median([r.user_s + r.sys_s for r in b.results if r.tool == kind and r.ok])
        rss = max(max(r.maxrss_mib, r.tree_rss_mib) for r in b.results if r.tool == kind and r.ok)
        n, kb = keys.get(kind, (0, 0))
        table[kind] = {"seconds": s, "cpu_s": cpu, "peak_rss_mib": rss, "keys": n, "key_bytes": kb,
                       "moto_rss_mib": max(moto_rss[kind]) if moto_rss[kind] else None}
        print(f"{kind:<34}{s:>9.2f}{kb / MiB / s:>8.0f}{cpu:>8.1f}{rss:>14.1f}{n:>9,}"
              f"{table[kind]['moto_rss_mib'] or float('nan'):>14.0f}")
    ratio = (table["eidetic replicate"]["seconds"] / table["aws s3 sync"]["seconds"]
             if "eidetic replicate" in table and "aws s3 sync" in table else None)
    verdict = "PASS" if ratio is not None and ratio <= TARGET_RATIO else "FAIL"
    print(f"\neidetic replicate / aws s3 sync: {ratio:.2f}x (target <= {TARGET_RATIO}x): {verdict}"
          if ratio is not None else "\nno ratio (a run failed)")
    out = {"when": stamp, "scale": a.scale, "summary": summary, "repeat": a.repeat, "table": table,
           "ratio": ratio, "target": TARGET_RATIO, "verdict": verdict, "machine": machine_info(a.work),
           "results": [dict(r.__dict__) for r in b.results]}
    path = a.json or os.path.join(HERE, "out", f"replicate-{stamp}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, default=str)
    print(f"results: {path}")
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
