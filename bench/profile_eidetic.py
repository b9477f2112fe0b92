#!/usr/bin/env python3
"""Where does eidetic's time go?  Profile one CLI command on the reference data.

    python3 bench/profile_eidetic.py [--scale F] [--work DIR] [--what ingest|resend|fsck|all]
                             [--strace] [--top N]

Builds a fresh eidetic store (config as in run.py), then runs, each under
``py-spy record`` (sampling, all threads, idle time included; falls back to
cProfile when py-spy is not installed):

* ``ingest``: first ``eidetic ingest --once`` of the data set;
* ``resend``: the same data again at a new path;
* ``fsck``: ``eidetic fsck``.

Prints, per command, the top functions by inclusive and by self time (share
of samples), and with ``--strace`` a syscall count/time summary (strace -c -f;
slows the run, so its wall time is not a measurement).  The raw profiles are
kept under bench/out/.  Install py-spy with ``pip install py-spy`` (any venv;
pass ``--py-spy PATH``).
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run as benchrun  # noqa: E402


def summarize_raw(path: str, top: int) -> str:
    """Top functions per thread from py-spy's collapsed-stack ('raw') output
    (recorded with --threads --idle, so waiting in a syscall counts: shares
    are of wall time for that thread)."""
    threads: dict[str, tuple[collections.Counter, collections.Counter, list]] = {}
    names_of: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            frames = stack.split(";")
            while frames and frames[0].startswith("process "):   # --subprocesses
                frames.pop(0)
            tid = "main"
            if frames and frames[0].startswith("thread ("):
                first = frames.pop(0)               # "thread (0x..): Name" or "thread (0x..)"
                tid = first.split(")", 1)[0] + ")"
                tname = first.split("):", 1)[1].strip() if "):" in first else ""
                if tname:
                    names_of[tid] = tname
            incl, self_, tot = threads.setdefault(tid, (collections.Counter(),
                                                        collections.Counter(), [0]))
            tot[0] += n
            names = []
            for fr in frames:  # "function (path/file.py:line)"
                fn, _, loc = fr.partition(" (")
                loc = loc.rstrip(")").rsplit(":", 1)[0]
                names.append(f"{fn} ({os.path.basename(loc)})" if loc else fn)
            for nm in set(names):
                incl[nm] += n
            if names:
                self_[names[-1]] += n
    lines = []
    order = sorted(threads.items(), key=lambda kv: -kv[1][2][0])
    for tid, (incl, self_, tot) in order:
        total = tot[0]
        if total < 0.05 * order[0][1][2][0]:
            continue
        lines.append(f"-- {tid} {names_of.get(tid, '')}: {total} samples")
        lines.append("  inclusive (click/bootstrap frames omitted):")
        for nm, n in [(nm, n) for nm, n in incl.most_common()
                      if not nm.endswith(("(core.py)", "(decorators.py)", "(main.py)"))
                      and not nm.startswith("<module>")][:top]:
            lines.append(f"    {100 * n / total:5.1f}%  {nm}")
        lines.append("  self:")
        for nm, n in self_.most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {nm}")
    return "\n".join(lines)


def profile_cmd(label: str, cmd: list[str], a, outdir: str) -> None:
    subprocess.run(["sync"], check=True)
    if a.py_spy:
        raw = os.path.join(outdir, f"profile-{label}.txt")
        t0 = time.perf_counter()
        subprocess.run([a.py_spy, "record", "--idle", "--threads", "--subprocesses", "-r", str(a.rate), "-f", "raw",
                        "-o", raw, "--", *cmd], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"\n== {label}: {' '.join(cmd[3:])}  ({time.perf_counter() - t0:.1f} s under py-spy)")
        print(summarize_raw(raw, a.top))
    else:
        prof = os.path.join(outdir, f"profile-{label}.prof")
        t0 = time.perf_counter()
        subprocess.run([a.python, "-m", "cProfile", "-o", prof, *cmd],
                       check=True, stdout=subprocess.DEVNULL)
        print(f"\n== {label}: {' '.join(cmd[3:])}  ({time.perf_counter() - t0:.1f} s under cProfile)")
        import pstats
        pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)


def strace_cmd(label: str, cmd: list[str], outdir: str) -> None:
    out = os.path.join(outdir, f"strace-{label}.txt")
    subprocess.run(["sync"], check=True)
    subprocess.run(["strace", "-f", "-c", "-o", out, *cmd], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(f"\n== {label}: syscalls (strace -c -f)")
    with open(out) as f:
        print("".join(f.readlines()[:25]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", default="/work/bench-work")
    ap.add_argument("--eidetic", default="/work/venv/bin/eidetic")
    ap.add_argument("--what", default="all", choices=["ingest", "resend", "fsck", "all"])
    ap.add_argument("--py-spy", default=None, help="py-spy executable (default: PATH, "
                    "/work/bench-tools/bin/py-spy)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--strace", action="store_true", help="also count syscalls (separate runs)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args(argv)
    a.py_spy = a.py_spy or shutil.which("py-spy") or (
        "/work/bench-tools/bin/py-spy" if os.path.exists("/work/bench-tools/bin/py-spy") else None)
    if not a.py_spy:
        # cProfile must run inside eidetic's interpreter
        with open(a.eidetic) as f:
            a.python = f.readline()[2:].strip()
        print("py-spy not found: using cProfile (slower, distorts many-small-call code)")

    b = benchrun.Bench(argparse.Namespace(drop_caches=False))
    work = os.path.abspath(a.work)
    data, summary = benchrun.ensure_data(b, work, a.scale)
    root = os.path.join(work, f"profile-{time.strftime('%Y%m%dT%H%M%S')}")
    outdir = os.path.join(HERE, "out")
    os.makedirs(outdir, exist_ok=True)
    n_runs = 2 if a.strace else 1
    try:
        for k in range(n_runs):
            use_strace = k == 1
            e_root = os.path.join(root, f"e{k}")
            cfg = benchrun.eidetic_config(e_root)
            subprocess.run([a.eidetic, "--config", cfg, "init"], check=True,
                           stdout=subprocess.DEVNULL)
            stage = os.path.join(e_root, "stage")
            b.say("copying the data set (setup) ...")
            b.copy_tree(data, os.path.join(stage, "bench-labA-1", "ds1"))
            if a.what in ("resend", "fsck", "all"):
                b.copy_tree(data, os.path.join(stage, "bench-labB-2", "ds2"))
            inbox = os.path.join(e_root, "inbox")
            ingest = [a.eidetic, "--config", cfg, "ingest", "--once"]
            fsck = [a.eidetic, "--config", cfg, "fsck"]
            go = strace_cmd if use_strace else (lambda l, c, o: profile_cmd(l, c, a, o))
            benchrun.place_entry(os.path.join(stage, "bench-labA-1"), inbox, "bench-labA-1")
            if a.what in ("ingest", "all"):
                go("ingest", ingest, outdir)
            else:
                subprocess.run(ingest, check=True, stdout=subprocess.DEVNULL)
            if a.what in ("resend", "fsck", "all"):
                benchrun.place_entry(os.path.join(stage, "bench-labB-2"), inbox, "bench-labB-2")
                if a.what in ("resend", "all"):
                    go("resend", ingest, outdir)
                else:
                    subprocess.run(ingest, check=True, stdout=subprocess.DEVNULL)
            if a.what in ("fsck", "all"):
                go("fsck", fsck, outdir)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
