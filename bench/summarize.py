#!/usr/bin/env python3
"""Combine several bench/run.py result files into one Markdown summary.

    python3 bench/summarize.py bench/out/results-*.json

Each run's ratios are computed inside that run (tools side by side); this
prints every run's ratios and their median, plus the median time / peak
memory of every tool over the runs.  Times are not comparable across runs,
ratios are.
"""

from __future__ import annotations

import json
import statistics
import sys

from run import TARGETS   # the limits run.py judges by: one place to change them


def fmt(v, unit):
    if v is None:
        return "n/a"
    if unit == "x":
        return f"{v:.2f}x"
    return f"{v:.0f} {unit}" if unit == "ms" else f"{v:.1f} {unit}"


def main(paths: list[str]) -> int:
    runs = [json.load(open(p)) for p in paths]
    if not runs:
        print(__doc__)
        return 2
    print(f"Runs: {len(runs)} ({', '.join(r['date'] for r in runs)})\n")

    # -- targets: per-run values and median
    head = "| target | limit | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + \
        " | median | verdict |"
    print(head)
    print("|" + " --- |" * (len(runs) + 4))
    for key, (desc, limit, unit) in TARGETS.items():
        vals = [r["checks"].get(key) for r in runs]
        have = [v for v in vals if v is not None]
        med = statistics.median(have) if have else None
        verdict = "n/a" if med is None else ("PASS" if med <= limit else "FAIL")
        print(f"| {desc} | <= {limit:g}{'' if unit == 'x' else ' ' + unit} | " +
              " | ".join(fmt(v, unit) for v in vals) + f" | {fmt(med, unit)} | **{verdict}** |")

    # -- other ratios
    print("\n| other ratio (information) | " + " | ".join(f"run {i + 1}" for i in range(len(runs)))
          + " | median |")
    print("|" + " --- |" * (len(runs) + 2))
    keys = list(runs[0].get("info_ratios", {}))
    for k in keys:
        vals = [r.get("info_ratios", {}).get(k) for r in runs]
        have = [v for v in vals if v is not None]
        if not have:
            continue
        print(f"| {k} | " + " | ".join(fmt(v, "x") for v in vals) +
              f" | {fmt(statistics.median(have), 'x')} |")

    # -- tool table: medians over runs
    print("\n| phase | tool | wall s (median) | wall s (each run) | CPU s user + sys (median) | peak RSS MiB "
          "| private MiB | others (cores, max) |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    rows: dict[str, list[dict]] = {}
    for r in runs:
        for k, m in r["table"].items():
            rows.setdefault(k, []).append(m)
    split: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        for x in r["results"]:
            if x.get("ok"):
                split.setdefault(f"{x['phase']}|{x['tool']}", []).append((x["user_s"], x["sys_s"]))
    for k, ms in rows.items():
        phase, tool = k.split("|", 1)
        us = split.get(k, [])
        cpu = (f"{statistics.median(u for u, _ in us):.1f} + {statistics.median(s for _, s in us):.1f}"
               if us else "")
        secs = [m["seconds"] for m in ms]
        if phase.startswith("log"):
            print(f"| {phase} | {tool} | {statistics.median(secs) * 1000:.0f} ms | "
                  + ", ".join(f"{s * 1000:.0f}" for s in secs) + " | | | | |")
            continue
        rss = max(max(m["maxrss_mib"], m["tree_rss_mib"]) for m in ms)
        anon = max(m.get("tree_anon_mib", float("nan")) for m in ms)
        print(f"| {phase} | {tool} | {statistics.median(secs):.2f} | "
              + ", ".join(f"{s:.2f}" for s in secs)
              + f" | {cpu} | {rss:.0f} | {anon:.0f} | "
              + f"{max(m.get('other_cores', float('nan')) for m in ms):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
