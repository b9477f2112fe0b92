#!/usr/bin/env python3
"""The ext4 variant of the benchmark: run.py's phases on a new, loop-mounted
ext4 made with mkfs.ext4's defaults (so with its journal, as on a
production server), in which nothing was ever deleted.

    python3 bench/ext4.py [--scale F] [--repeat N] [--image-gib G] [--work DIR]
                          [--eidetic PATH] [-- run.py options]

Why a variant: the root file systems of these benchmark machines are ext4
without a journal, where file creation slows 10-30x for minutes after a
mass delete (bench/loopfs.py), so the file-creating tools (eidetic, cp -a)
were measured against a background that borg and restic, which create few
files, never meet.  The image (a sparse file under --work) is made and
mounted first, unmounted and removed at the end, also on failure or
Ctrl-C; where that cannot be done it prints one "ext4 variant skipped:
<why>" line and exits 0.  Results: run.py's table and JSON (bench/out/).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loopfs  # noqa: E402  (bench/loopfs.py: the loop image)
import run  # noqa: E402  (bench/run.py: the harness this variant reuses)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0, help="data set size factor (run.py's)")
    ap.add_argument("--repeat", type=int, default=2, help="repeats of run.py's phases (medians)")
    ap.add_argument("--image-gib", type=int, default=None,
                    help="size of the (sparse) image (default: (1 + 10 x repeat) x the data set + 8 GiB)")
    ap.add_argument("--work", default="/work/bench-work", help="where the image lives (outside the repository)")
    ap.add_argument("--eidetic", default=None, help="eidetic executable (default: run.py's)")
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("rest", nargs="*", help="further run.py options (after --)")
    a = ap.parse_args(argv)

    work = os.path.abspath(a.work)
    # Room for xfs.py's estimate and more: without clones every copy takes its
    # own (a 40 GiB image filled up in the 2nd repeat at scale 1).  The image is
    # sparse: under --work it takes what the runs write (~7x the data per repeat).
    gib = a.image_gib or int((1 + 10 * a.repeat) * 2.2 * a.scale) + 8
    eidetic = a.eidetic or run.default_eidetic()
    ready = loopfs.prepare("ext4", "ext4", eidetic, work, gib, int((1 + 7 * a.repeat) * 2.2 * a.scale) + 4)
    if ready is None:
        return 0
    img, mnt = ready
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    try:
        print(f"ext4 (journaled) loop image of {gib} GiB mounted at {mnt}", flush=True)
        out = a.json_out or os.path.join(HERE, "out", f"results-ext4-{stamp}.json")
        return run.main(["--work", os.path.join(mnt, "work"), "--eidetic", eidetic, "--scale", str(a.scale),
                         "--repeat", str(a.repeat), "--json", out, *a.rest])
    finally:
        loopfs.remove(img, mnt)


if __name__ == "__main__":
    sys.exit(main())
