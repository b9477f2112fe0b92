#!/usr/bin/env python3
"""The XFS variant of the benchmark: run.py's phases on a loop-mounted XFS file
system made with ``mkfs.xfs -m reflink=1``, where eidetic's ingest clones large
files (zero-copy) and ``cp -a`` clones too; plus one 256 MiB file ingested with
the clone path and with it turned off, side by side in the same run.

    python3 bench/xfs.py [--scale F] [--repeat N] [--micro-runs N] [--image-gib G]
                         [--work DIR] [--eidetic PATH] [run.py options after --]

The image (a sparse file under --work) is made, mounted, and unmounted and
removed at the end, also on failure or Ctrl-C.  Where that cannot be done (not
root, no mkfs.xfs or losetup, no loop device) it says so in one line and exits
0 without measuring.  The copies every tool reads are real copies
(``cp -a --reflink=never``): no source shares extents with another before the
timed part.  Results: a table on stdout and JSON in bench/out/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loopfs  # noqa: E402  (bench/loopfs.py: the loop image)
import run  # noqa: E402  (bench/run.py: the harness this variant reuses)

MiB = 1 << 20

# The ingest of the micro-benchmark: the same CLI entry point, with cloning
# refused ("stream") or allowed ("clone") by replacing the one ioctl wrapper.
MICRO = r"""
import errno, sys
mode, cfg = sys.argv[1], sys.argv[2]
if mode == "stream":
    import eidetic.store.objects as objects
    def refuse(dst_fd, src_fd):
        raise OSError(errno.EOPNOTSUPP, "cloning turned off by bench/xfs.py")
    objects.clone_into = refuse
from eidetic_cli.main import main
sys.argv = ["eidetic", "--config", cfg, "ingest", "--once"]
main()
"""


def used_mib(path: str) -> float:
    subprocess.run(["sync"], check=True)
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize / MiB


def micro(b: run.Bench, python: str, eidetic: str, root: str, runs: int, size: int) -> dict:
    """One file of *size* bytes, ingested *runs* times with each path, order alternating;
    every ingest into a fresh study (nothing deleted between measurements)."""
    os.makedirs(root)
    seed = os.path.join(root, "seed.bin")
    with open(seed, "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))
    times: dict[str, list[float]] = {"clone": [], "stream": []}
    grew: dict[str, list[float]] = {"clone": [], "stream": []}
    for i in range(runs):
        for mode in (("clone", "stream") if i % 2 == 0 else ("stream", "clone")):
            site = os.path.join(root, f"{mode}-{i}")
            cfg = run.eidetic_config(site)
            subprocess.run([eidetic, "--config", cfg, "init"], check=True, stdout=subprocess.DEVNULL,
                           env=run.EIDETIC["env"])
            stage = os.path.join(site, "stage", "bench-big-1")
            os.makedirs(stage)
            # A real copy with its own extents, as an uploader's file would be.
            subprocess.run(["cp", "--reflink=never", seed, os.path.join(stage, "big.bin")], check=True)
            before = used_mib(root)
            run.place_entry(stage, os.path.join(site, "inbox"), "bench-big-1")
            r = b.timed(f"{size // MiB} MiB file", f"eidetic ingest ({mode})", [python, "-c", MICRO, mode, cfg],
                        env=run.EIDETIC["env"])
            if not r.ok:
                raise RuntimeError(f"the {mode} ingest failed: see {r.extra['log']}")
            times[mode].append(r.seconds)
            grew[mode].append(used_mib(root) - before)
    out = {mode: {"median_s": statistics.median(t), "runs_s": [round(x, 3) for x in t],
                  "space_mib_median": round(statistics.median(grew[mode]), 1)} for mode, t in times.items()}
    out["clone_vs_stream"] = out["clone"]["median_s"] / out["stream"]["median_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="data set size factor (run.py's)")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of run.py's phases (medians)")
    ap.add_argument("--micro-runs", type=int, default=5, help="runs of each path of the 256 MiB file")
    ap.add_argument("--micro-mib", type=int, default=256)
    ap.add_argument("--image-gib", type=int, default=None,
                    help="size of the (sparse) XFS image (default: (1 + 7 x repeat) x the data set + 4 GiB)")
    ap.add_argument("--work", default="/work/bench-work", help="where the image lives (outside the repository)")
    ap.add_argument("--eidetic", default=None, help="eidetic executable (default: run.py's)")
    ap.add_argument("--skip-main", action="store_true", help="only the 256 MiB file")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("rest", nargs="*", help="further run.py options (after --)")
    a = ap.parse_args(argv)

    work = os.path.abspath(a.work)
    # run.py keeps every repeat's copies until the end: the data set, then ~7x it per repeat.
    writes = int((1 + 7 * a.repeat) * 2.2 * a.scale) + 4
    gib = a.image_gib or writes
    eidetic = a.eidetic or run.default_eidetic()
    ready = loopfs.prepare("xfs", "XFS", eidetic, work, gib, writes)
    if ready is None:
        return 0
    img, mnt = ready
    python = os.path.join(os.path.dirname(eidetic), "python")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "image_gib": gib,
                 "scale": a.scale, "repeat": a.repeat, "loadavg_start": os.getloadavg()}
    try:
        # Real copies for every tool's source (coreutils 9's cp -a would clone them on XFS).
        run.Bench.copy_tree = staticmethod(lambda src, dst: (
            os.makedirs(os.path.dirname(dst), exist_ok=True),
            subprocess.run(["cp", "-a", "--reflink=never", src, dst], check=True)))
        b = run.Bench(argparse.Namespace(nice=-15, drop_caches=False))
        b.logdir = os.path.join(mnt, "micro-logs")
        os.makedirs(b.logdir)
        run.setup_eidetic_env(eidetic, os.path.join(mnt, "pycache"))
        b.say(f"XFS (reflink=1) loop image of {gib} GiB mounted at {mnt}")
        doc["micro"] = micro(b, python, eidetic, os.path.join(mnt, "micro"), a.micro_runs, a.micro_mib << 20)
        m = doc["micro"]
        b.say(f"{a.micro_mib} MiB file: clone {m['clone']['median_s']:.2f} s (+{m['clone']['space_mib_median']} MiB), "
              f"stream {m['stream']['median_s']:.2f} s (+{m['stream']['space_mib_median']} MiB): "
              f"{m['clone_vs_stream']:.2f}x")
        if not a.skip_main:
            out = os.path.join(HERE, "out", f"results-xfs-{stamp}.json")
            rc = run.main(["--work", os.path.join(mnt, "work"), "--eidetic", eidetic, "--scale", str(a.scale),
                           "--repeat", str(a.repeat), "--json", out, *a.rest])
            doc["main"] = {"exit": rc, "results": out}
    finally:
        loopfs.remove(img, mnt)
    doc["loadavg_end"] = os.getloadavg()
    path = a.json_out or os.path.join(HERE, "out", f"xfs-{stamp}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"\nXFS results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
