#!/usr/bin/env python3
"""Deterministic generator of eidetic's reference benchmark data set.

    python3 bench/gen_data.py OUT [--scale F] [--seed N]

At scale 1 it writes about 2.2 GiB into OUT (which must not exist yet, or be
empty):

* 6 large files of incompressible pseudo-random bytes, 300-350 MiB each
  (1950 MiB in all), under ``raw/scanner/``;
* 50,000 small files spread over 500 directories
  (``sub-001 .. sub-100`` x ``anat eprime physio beh notes``): sizes from
  1 B to 16 KiB (most uniform in that range, some log-uniform and small),
  about 3 % empty, about 10 % exact duplicates of a pool of 200 contents;
  half text-like (tab-separated event logs, notes), half binary.

``--scale F`` multiplies the size of each large file and the number of small
files (and directories) by F; ``--scale 0.05`` gives a ~110 MiB smoke set.

Everything comes from one ``random.Random(seed)`` stream, consumed in a fixed
order, so the same seed and scale always give byte-identical output on any
machine (Python >= 3.9).  Files are streamed in 4 MiB blocks: memory stays
small whatever the scale.  The pseudo-random large-file bytes never repeat,
so deduplicating tools (borg, restic) cannot shrink the first copy.

A one-line JSON summary (file count, bytes, ...) is printed on stdout;
nothing but the data set is written into OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

MiB = 1 << 20
BLOCK = 4 * MiB

LARGE_SIZES_MIB = [300, 310, 320, 330, 340, 350]          # 1950 MiB
LARGE_NAMES = [
    "raw/scanner/sub-001_ses-1_task-rest_bold.nii",
    "raw/scanner/sub-002_ses-1_task-rest_bold.nii",
    "raw/scanner/sub-003_ses-1_task-nback_bold.nii",
    "raw/scanner/sub-004_ses-2_task-nback_bold.nii",
    "raw/scanner/sub-005_ses-1_dwi.nii",
    "raw/eeg/sub-006_ses-1_task-oddball_eeg.bdf",
]
N_SMALL = 50_000
N_SUBJECTS = 100
MODALITIES = ["anat", "eprime", "physio", "beh", "notes"]  # 5 x 100 = 500 dirs
MAX_SMALL = 16 * 1024

WORDS = (b"onset duration trial_type response_time correct stimulus "
         b"face house go nogo left right fixation cue target block "
         b"accuracy 0 1 2 3 4 5 6 7 8 9 n/a").split()


def _small_name(rng: random.Random, modality: str, idx: int) -> str:
    run = rng.randint(1, 6)
    if modality == "eprime":
        return f"run-{run}-{idx:03d}.txt"
    if modality == "physio":
        return f"task-nback_run-{run:02d}_physio-{idx:03d}.tsv"
    if modality == "beh":
        return f"task-nback_run-{run:02d}_events-{idx:03d}.tsv"
    if modality == "anat":
        return f"T1w-slice-{idx:03d}.dcm"
    return f"note-{idx:03d}.md"


def _text_bytes(rng: random.Random, n: int) -> bytes:
    """n bytes of tab-separated lab-log-looking text."""
    out = bytearray()
    while len(out) < n:
        line = b"\t".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        out += line + b"\n"
    return bytes(out[:n])


def _small_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.03:
        return 0
    if r < 0.30:  # log-uniform 1 B .. 16 KiB: many tiny files
        return max(1, int(2 ** rng.uniform(0, 14)))
    return rng.randint(1, MAX_SMALL)


def _count_dirs(top: str) -> int:
    return sum(len(d) for _p, d, _f in os.walk(top))


def write_large(path: str, size: int, rng: random.Random) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(rng.randbytes(n))
            left -= n


def generate(out: str, scale: float = 1.0, seed: int = 20240601,
             quiet: bool = False) -> dict:
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out}: exists and is not empty")
    os.makedirs(out, exist_ok=True)
    rng = random.Random(seed)
    t0 = time.monotonic()
    files = 0
    total = 0
    empty = 0
    dups = 0

    # Large files first: their bytes are the bulk of the run time.
    for name, mib in zip(LARGE_NAMES, LARGE_SIZES_MIB):
        size = max(1, int(mib * MiB * scale))
        p = os.path.join(out, name)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        write_large(p, size, rng)
        files += 1
        total += size
        if not quiet:
            print(f"  {name}: {size / MiB:.1f} MiB", file=sys.stderr)

    n_small = max(1, int(round(N_SMALL * scale)))
    n_subj = max(1, int(round(N_SUBJECTS * scale)))
    dirs = [f"sub-{s:03d}/{m}" for s in range(1, n_subj + 1) for m in MODALITIES]
    for d in dirs:
        os.makedirs(os.path.join(out, d), exist_ok=True)
    # Pool of contents that get duplicated across the tree (templates,
    # identical stimulus lists, copied config files).
    pool = []
    for _ in range(200):
        n = _small_size(rng)
        pool.append(_text_bytes(rng, n) if rng.random() < 0.5 else rng.randbytes(n))

    per_dir = [0] * len(dirs)
    for i in range(n_small):
        di = i % len(dirs)
        d = dirs[di]
        idx = per_dir[di]
        per_dir[di] += 1
        name = _small_name(rng, d.split("/")[1], idx)
        r = rng.random()
        if r < 0.10:
            data = pool[rng.randrange(len(pool))]
            dups += 1
        else:
            n = _small_size(rng)
            data = _text_bytes(rng, n) if rng.random() < 0.5 else rng.randbytes(n)
        with open(os.path.join(out, d, name), "wb") as f:
            f.write(data)
        files += 1
        total += len(data)
        empty += not data

    summary = {
        "out": os.path.abspath(out), "scale": scale, "seed": seed,
        "files": files, "small_files": n_small, "large_files": len(LARGE_NAMES),
        "directories": _count_dirs(out), "bytes": total, "empty_files": empty,
        "duplicate_small_files": dups, "seconds": round(time.monotonic() - t0, 2),
    }
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output directory (created; must be empty)")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="size factor (1 = 2.2 GiB / 50,006 files; 0.05 = smoke)")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    if a.scale <= 0:
        ap.error("--scale must be > 0")
    s = generate(a.out, a.scale, a.seed, a.quiet)
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
