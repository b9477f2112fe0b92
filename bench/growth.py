#!/usr/bin/env python3
"""Does an upload cost more as its study grows?  (issue "Ingest at the speed
of the disk", item 3: the 10th upload <= 1.2x the 1st, private memory flat.)

    python3 bench/growth.py [--files N] [--uploads N] [--work DIR] [--keep]

Makes one study and sends it --uploads entries of --files small files each
(the same paths every time, every file changed, 200 folders), each entry
placed by rename and taken by `eidetic ingest --once` through the CLI.  For
each upload it prints the wall time, the peak RSS and the peak anonymous
memory (the heap: "Anonymous" of /proc/PID/smaps_rollup, sampled every
50 ms; the LMDB map is file-backed and counts in RSS and in smaps'
Private_* lines, not here), and at the end the ratio of the last upload to
the first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time


def anonymous_kib(pid: int) -> int:
    """The process's anonymous memory (its heap and stacks): smaps' Private_*
    would also count the LMDB map's file pages, which only this process maps."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Anonymous:"))
    except (OSError, ValueError, IndexError):
        return 0


def run_ingest(argv: list[str]) -> tuple[float, int, int, float, float]:
    """(seconds, peak RSS KiB, peak anonymous KiB, CPU seconds, MiB written to
    storage) of one command.  CPU time and written blocks (getrusage of the
    waited-for children) hardly move with what else the machine runs, so
    they show growth where the wall time on a shared machine cannot."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            # the console script execs python: sample its children too
            for pid in [proc.pid, *children(proc.pid)]:
                peak[0] = max(peak[0], anonymous_kib(pid))
            time.sleep(0.05)

    th = threading.Thread(target=sample)
    th.start()
    _, err = proc.communicate()
    secs = time.perf_counter() - t
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed ({proc.returncode}): {err.decode(errors='replace')}")
    # The largest peak RSS of any command so far (getrusage of the waited-for children).
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return secs, r1.ru_maxrss, peak[0], cpu, (r1.ru_oublock - r0.ru_oublock) * 512 / 2**20


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--work", default="/work/bench-work/growth")
    ap.add_argument("--eidetic", default=os.path.join(os.path.dirname(sys.executable), "eidetic"))
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(a.work)
    cfg = os.path.join(a.work, "eidetic.yaml")
    with open(cfg, "w") as f:
        json.dump({"inbox": f"{a.work}/inbox", "state": f"{a.work}/state", "settle_seconds": 0,
                   "studies": {"s1": {"tree": f"{a.work}/tree", "store": f"{a.work}/store"}}}, f)
    eidetic = [a.eidetic, "--config", cfg]
    subprocess.run(eidetic + ["init"], check=True, capture_output=True)
    rows = []
    for u in range(1, a.uploads + 1):
        part = f"{a.work}/inbox/.s1-lab-{u}"
        for i in range(a.files):
            d = f"{part}/d{i % 200:03d}"
            if i < 200:
                os.makedirs(d)
            with open(f"{d}/f{i:06d}.txt", "wb") as f:
                f.write(b"upload %d file %d\n" % (u, i))
        os.rename(part, f"{a.work}/inbox/s1-lab-{u}")
        subprocess.run(["sync"], check=True)
        secs, rss, anon, cpu, written = run_ingest(eidetic + ["ingest", "--once", "--settle", "0"])
        rows.append({"upload": u, "seconds": round(secs, 2), "cpu_seconds": round(cpu, 2),
                     "written_mib": round(written, 1), "peak_rss_mib_so_far": round(rss / 1024, 1),
                     "peak_anonymous_mib": round(anon / 1024, 1)})
        print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"files": a.files, "uploads": a.uploads,
                      "last_vs_first": round(rows[-1]["seconds"] / rows[0]["seconds"], 2),
                      "cpu_last_vs_first": round(rows[-1]["cpu_seconds"] / rows[0]["cpu_seconds"], 2)}))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)


if __name__ == "__main__":
    main()
