#!/usr/bin/env python3
"""eidetic benchmark: eidetic vs borg 1.2 vs restic vs durable ``cp -a``, side by side.

    python3 bench/run.py [--scale F] [--work DIR] [--skip-borg] [--skip-restic]
                         [--log-store] [--repeat N] [--drop-caches] ...

Everything is measured in ONE run on the SAME generated data set, so only the
ratios matter (absolute times swing from run to run on shared VMs).  See
bench/README.md for what each number means.

Rules kept here (see docs/design.md, "Measuring here"):
* every measured run writes into a fresh directory; nothing is deleted
  between measured runs (only at the very end);
* the copies a tool reads or ingests are made before the timed part, and a
  ``sync`` (plus, with --drop-caches, ``echo 3 > drop_caches``) precedes every
  timed command, for every tool alike;
* eidetic is driven through its CLI only; uploads are placed by rename.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import loopfs  # noqa: E402  (bench/loopfs.py)

MiB = 1 << 20
GiB = 1 << 30

TARGETS = {
    # key: (description, limit, unit)
    "first_ingest_vs_borg": ("first ingest: eidetic / borg create", 0.8, "x"),
    "resend_vs_borg": ("re-send: eidetic / borg create (new path)", 0.25, "x"),
    "fsck_vs_restic": ("fsck: eidetic fsck / restic check --read-data", 0.3, "x"),
    "fsck_quick_vs_restic": ("fsck --quick: eidetic / restic check --read-data", 0.1, "x"),
    "ingest_peak_rss": ("peak RSS of eidetic ingest (50k-file entry)", 150.0, "MiB"),
    "log_path_ms": ("eidetic log --json STUDY:path (median, 1M path-versions)", 150.0, "ms"),
}


# --------------------------------------------------------------- measuring

@dataclass
class Result:
    phase: str
    tool: str
    cmd: list
    seconds: float = float("nan")
    user_s: float = float("nan")
    sys_s: float = float("nan")
    maxrss_mib: float = float("nan")      # ru_maxrss of the child (max over its reaped descendants)
    tree_rss_mib: float = float("nan")    # sampled peak of the summed RSS of the whole process tree
    tree_anon_mib: float = float("nan")   # same, private (non file-backed) pages only
    rc: int | None = None
    ok: bool = False
    note: str = ""
    load_before: float = float("nan")
    other_cores: float = float("nan")     # mean CPU (in cores) used by processes not ours meanwhile
    extra: dict = field(default_factory=dict)


_HZ = os.sysconf("SC_CLK_TCK")

# eidetic runs as installed software would: with its bytecode cached.  The
# session environment may carry PYTHONDONTWRITEBYTECODE=1, which makes every
# start re-compile eidetic from source (~15 ms per command, more for `log`);
# borg's Debian package ships compiled bytecode, so that would be unfair.
# Bytecode goes to a cache under the work directory, never into the repo.
EIDETIC = {"path": None, "env": None}


def env_for(cmd, env):
    if env is None and isinstance(cmd, list) and cmd and cmd[0] == EIDETIC["path"]:
        return EIDETIC["env"]
    return env


def setup_eidetic_env(path: str, cache_dir: str) -> None:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = cache_dir
    EIDETIC["path"] = path
    EIDETIC["env"] = env
    # warm the bytecode cache (every module a command may import)
    subprocess.run([path, "--help"], env=env, capture_output=True)
    for sub in ("ingest", "fsck", "log", "init", "checkout"):
        subprocess.run([path, sub, "--help"], env=env, capture_output=True)


def cpu_busy_seconds() -> float:
    """Machine-wide busy CPU seconds so far (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _HZ


def priority_preexec(nice: int):
    """Child set-up: the same raised CPU priority for every measured command."""
    if not nice:
        return None

    def f():
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError:
            pass
    return f


class TreeRssSampler(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (/proc)."""

    def __init__(self, root: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak = 0           # resident: anonymous + file-backed (e.g. mmap'd LMDB pages)
        self.peak_anon = 0      # resident minus shared (statm): roughly the private heap
        self._halt = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> int:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    st = f.read()
            except OSError:
                continue
            ppid = int(st[st.rindex(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d))
        total = anon = 0
        todo = [self.root]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    fields = f.read().split()
                resident, shared = int(fields[1]), int(fields[2])
                total += resident * self._page
                anon += (resident - shared) * self._page
            except (OSError, IndexError, ValueError):
                pass
            todo.extend(children.get(pid, ()))
        return total, anon

    def run(self):
        while not self._halt.is_set():
            try:
                total, anon = self._sample()
                self.peak = max(self.peak, total)
                self.peak_anon = max(self.peak_anon, anon)
            except Exception:
                pass
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


class Bench:
    def __init__(self, args):
        self.a = args
        self.results: list[Result] = []
        self.logdir = None

    # -- helpers
    def say(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def settle(self) -> None:
        """What precedes every timed command, for every tool alike."""
        subprocess.run(["sync"], check=True)
        # On a loop image (ext4.py, xfs.py) one sync can leave what it pushed
        # into the image's file dirty in the file system below, and the next
        # tool's own sync would pay for the previous tool's writes.
        subprocess.run(["sync"], check=True)
        if self.a.drop_caches:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")

    def timed(self, phase: str, tool: str, cmd, cwd=None, env=None,
              shell=False, settle=True, quiet_ok=False) -> Result:
        r = Result(phase, tool, cmd if isinstance(cmd, list) else [cmd])
        if settle:
            self.settle()
        r.load_before = os.getloadavg()[0]
        logname = f"{len(self.results):02d}-{phase}-{tool}".replace(" ", "_").replace("/", "_")
        logpath = os.path.join(self.logdir, logname + ".log")
        with open(logpath, "wb") as log:
            busy0 = cpu_busy_seconds()
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, cwd=cwd, env=env_for(cmd, env), shell=shell,
                                 stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT,
                                 preexec_fn=priority_preexec(self.a.nice))
            sampler = TreeRssSampler(p.pid)
            sampler.start()
            _, status, ru = os.wait4(p.pid, 0)
            t1 = time.perf_counter()
            busy1 = cpu_busy_seconds()
            sampler.stop()
            p.returncode = os.waitstatus_to_exitcode(status)
        r.seconds = t1 - t0
        r.user_s = ru.ru_utime
        r.sys_s = ru.ru_stime
        r.maxrss_mib = ru.ru_maxrss / 1024.0        # Linux: KiB
        r.tree_rss_mib = sampler.peak / MiB
        r.tree_anon_mib = sampler.peak_anon / MiB
        r.rc = p.returncode
        r.ok = p.returncode == 0
        r.other_cores = max(0.0, (busy1 - busy0) - (ru.ru_utime + ru.ru_stime)) / r.seconds
        r.extra["log"] = logpath
        if not r.ok:
            with open(logpath, "rb") as f:
                tail = f.read()[-1500:].decode(errors="replace")
            r.note = f"exit {p.returncode}"
            self.say(f"  !! {tool} {phase} failed (exit {p.returncode}); log {logpath}:\n{tail}")
        elif not quiet_ok:
            self.say(f"  {phase:<13} {tool:<22} {r.seconds:8.2f} s  "
                     f"cpu {r.user_s + r.sys_s:7.2f} s  rss {r.maxrss_mib:7.1f} MiB "
                     f"(private {r.tree_anon_mib:.0f} MiB)  others {r.other_cores:.2f} cores")
        self.results.append(r)
        return r

    def skipped(self, phase: str, tool: str, why: str) -> Result:
        r = Result(phase, tool, [], note=why)
        self.results.append(r)
        self.say(f"  {phase:<13} {tool:<22} skipped: {why}")
        return r

    @staticmethod
    def copy_tree(src: str, dst: str) -> None:
        """A real copy (cp -a), never hardlinks.  Setup only: not timed."""
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        subprocess.run(["cp", "-a", src, dst], check=True)


# ------------------------------------------------------------- the phases

def eidetic_config(root: str, study: str = "bench", settle: float = 0, rescan: float | None = None) -> str:
    cfg = os.path.join(root, "eidetic.yaml")
    os.makedirs(root, exist_ok=True)
    with open(cfg, "w") as f:
        f.write(
            f"inbox: {root}/inbox\n"
            f"state: {root}/state\n"
            f"settle_seconds: {settle:g}\n"
            + (f"rescan_seconds: {rescan:g}\n" if rescan is not None else "")
            + f"studies:\n"
            f"  {study}:\n"
            f"    tree: {root}/tree\n"
            f"    store: {root}/store\n")
    return cfg


def place_entry(staged: str, inbox: str, name: str) -> None:
    """Move a staged entry into the inbox the way an uploader must: under a
    dot name first, then rename to its final name."""
    dot = os.path.join(inbox, "." + name)
    os.rename(staged, dot)
    os.rename(dot, os.path.join(inbox, name))


VERSION_NAME_RE = re.compile(r"~v[0-9]{4,}~[0-9]{8}T[0-9]{6}Z")


def count_files(top: str) -> tuple[int, int]:
    """Plain (current) files under an eidetic tree directory and their bytes;
    the immutable version names (``name~v0001~<stamp>.ext``) beside them are
    not counted."""
    n = b = 0
    for dirpath, _dirs, files in os.walk(top):
        for fn in files:
            if VERSION_NAME_RE.search(fn):
                continue
            st = os.lstat(os.path.join(dirpath, fn))
            n += 1
            b += st.st_size
    return n, b


WHY_MISSING: dict[str, str] = {}


def why(tool: str) -> str:
    return WHY_MISSING.get(tool, "not installed")


def tools_available(a) -> dict:
    if a.skip_borg:
        WHY_MISSING["borg"] = "skipped (--skip-borg)"
    if a.skip_restic:
        WHY_MISSING["restic"] = "skipped (--skip-restic)"
    have = {}
    have["eidetic"] = a.eidetic if a.eidetic and os.access(a.eidetic, os.X_OK) else None
    have["borg"] = None if a.skip_borg else shutil.which("borg")
    have["restic"] = None if a.skip_restic else shutil.which("restic")
    return have


def tool_versions(have: dict) -> dict:
    v = {}
    for tool, cmd in (("borg", ["borg", "--version"]), ("restic", ["restic", "version"])):
        if have.get(tool):
            try:
                v[tool] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
            except OSError:
                pass
    v["python"] = sys.version.split()[0]
    try:  # the eidetic code measured: last commit touching it, and local edits
        repo = os.path.dirname(HERE)
        v["eidetic_commit"] = subprocess.run(
            ["git", "-C", repo, "log", "-1", "--format=%h %cI %s", "--", "eidetic", "cli"],
            capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "eidetic", "cli"],
                               capture_output=True, text=True).stdout.strip()
        v["eidetic_uncommitted_changes"] = len(dirty.splitlines())
    except OSError:
        pass
    return v


def cached_data(b: Bench, data: str, make: Callable[[str], dict]) -> tuple[str, dict]:
    """The data set in *data*, made by *make(data)* (which returns its summary)
    unless a finished one is there (its summary is kept in ``<data>.json``)."""
    marker = data + ".json"
    if os.path.exists(marker) and os.path.isdir(data):
        with open(marker) as f:
            summary = json.load(f)
        b.say(f"data set: reusing {data} ({summary['files']} files, {summary['bytes'] / GiB:.2f} GiB)")
        return data, summary
    if os.path.exists(data):
        # A half-written data set from an interrupted run: set it aside
        # rather than deleting thousands of files now.
        os.rename(data, f"{data}.stale-{int(time.time())}")
    b.say(f"data set: generating into {data} ...")
    summary = make(data)
    with open(marker, "w") as f:
        json.dump(summary, f)
    b.say(f"data set: {summary['files']} files, {summary['bytes'] / GiB:.2f} GiB "
          f"in {summary['seconds']} s")
    return data, summary


def ensure_data(b: Bench, work: str, scale: float) -> tuple[str, dict]:
    def make(data: str) -> dict:
        out = subprocess.run([sys.executable, os.path.join(HERE, "gen_data.py"), data,
                              "--scale", str(scale), "--quiet"],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    return cached_data(b, os.path.join(work, f"data-scale{scale:g}"), make)


def main_phases(b: Bench, have: dict, data: str, summary: dict, rep_dir: str,
                order_shift: int) -> None:
    a = b.a
    src_a = os.path.join(rep_dir, "src", "A")          # ds1: first ingest source
    src_b = os.path.join(rep_dir, "src", "B")          # ds2: re-send source
    e_root = os.path.join(rep_dir, "eidetic")
    stage = os.path.join(e_root, "stage")

    # ---- setup (not timed): real copies of the data set
    b.say("setup: copying the data set (real copies, not timed) ...")
    t0 = time.monotonic()
    if have["borg"] or have["restic"] or a.cp_baseline:
        b.copy_tree(data, os.path.join(src_a, "ds1"))
    if have["borg"] or have["restic"]:
        b.copy_tree(data, os.path.join(src_b, "ds2"))
    cfg = None
    if have["eidetic"]:
        cfg = eidetic_config(e_root)
        subprocess.run([have["eidetic"], "--config", cfg, "init"], check=True,
                       stdout=subprocess.DEVNULL, env=EIDETIC["env"])
        b.copy_tree(data, os.path.join(stage, "bench-labA-1", "ds1"))
        b.copy_tree(data, os.path.join(stage, "bench-labB-2", "ds2"))
    b.say(f"setup: copies made in {time.monotonic() - t0:.1f} s; syncing ...")
    subprocess.run(["sync"], check=True)

    env_borg = dict(os.environ,
                    BORG_BASE_DIR=os.path.join(rep_dir, "borg-home"),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")
    borg_repo = os.path.join(rep_dir, "borg-repo")
    env_restic = dict(os.environ, RESTIC_PASSWORD="bench",
                      RESTIC_CACHE_DIR=os.path.join(rep_dir, "restic-cache"))
    restic_repo = os.path.join(rep_dir, "restic-repo")
    if have["borg"]:
        subprocess.run(["borg", "init", "--encryption=none", borg_repo], env=env_borg,
                       check=True, capture_output=True)
    if have["restic"]:
        subprocess.run(["restic", "-r", restic_repo, "init"], env=env_restic,
                       check=True, capture_output=True)

    def rotate(jobs):
        k = order_shift % len(jobs)
        return jobs[k:] + jobs[:k]

    def ingest_phase(phase: str, entry: str, ds: str, src: str, archive: str, with_cp: bool) -> None:
        """One round of ingesting the data set: eidetic takes *entry* (tree folder
        *ds*), borg and restic back up *src*/*ds*, (with *with_cp*) cp -a copies it."""
        def eid():
            if not have["eidetic"]:
                return b.skipped(phase, "eidetic", why("eidetic"))
            place_entry(os.path.join(stage, entry), os.path.join(e_root, "inbox"), entry)
            r = b.timed(phase, "eidetic", [have["eidetic"], "--config", cfg, "ingest", "--once"])
            verify_ingest(b, r, os.path.join(e_root, "tree", ds), summary,
                          os.path.join(e_root, "inbox", entry))

        def borg():
            if not have["borg"]:
                return b.skipped(phase, "borg create", why("borg"))
            b.timed(phase, "borg create", ["borg", "create", f"{borg_repo}::{archive}", ds], cwd=src, env=env_borg)

        def restic():
            if not have["restic"]:
                return b.skipped(phase, "restic backup", why("restic"))
            b.timed(phase, "restic backup", ["restic", "-r", restic_repo, "backup", ds], cwd=src, env=env_restic)

        def cp():
            if not a.cp_baseline:
                return
            dst = os.path.join(rep_dir, "cp-dest")
            os.makedirs(dst)
            b.timed(phase, "cp -a + sync", f"cp -a {shq(os.path.join(src, ds))} {shq(dst)}/ && sync", shell=True)

        for job in rotate([eid, borg, restic] + ([cp] if with_cp else [])):
            job()

    # ---- phase 1: first ingest
    b.say("phase: first ingest")
    ingest_phase("first ingest", "bench-labA-1", "ds1", src_a, "first", with_cp=True)

    # ---- phase 2: re-send of the same data at a new path
    b.say("phase: re-send (same data, new entry name / new path)")
    ingest_phase("re-send", "bench-labB-2", "ds2", src_b, "second", with_cp=False)

    # ---- phase 3: full verification
    b.say("phase: fsck / check (re-read and re-hash everything)")

    def eid_fsck():
        if not have["eidetic"]:
            return b.skipped("fsck", "eidetic fsck", why("eidetic"))
        b.timed("fsck", "eidetic fsck", [have["eidetic"], "--config", cfg, "fsck"])

    def eid_fsck_quick():
        if not have["eidetic"]:
            return b.skipped("fsck", "eidetic fsck --quick", why("eidetic"))
        b.timed("fsck", "eidetic fsck --quick", [have["eidetic"], "--config", cfg, "fsck", "--quick"])

    def restic_check():
        if not have["restic"]:
            return b.skipped("fsck", "restic check", why("restic"))
        b.timed("fsck", "restic check",
                ["restic", "-r", restic_repo, "check", "--read-data"], env=env_restic)

    def borg_check():
        if not have["borg"]:
            return b.skipped("fsck", "borg check", why("borg"))
        b.timed("fsck", "borg check", ["borg", "check", "--verify-data", borg_repo],
                env=env_borg)

    for job in rotate([eid_fsck, eid_fsck_quick, restic_check, borg_check]):
        job()

    # ---- info: log on this (small-history) store
    if have["eidetic"] and cfg:
        some = first_file(os.path.join(e_root, "tree", "ds1"))
        if some:
            rel = os.path.relpath(some, os.path.join(e_root, "tree"))
            time_log(b, have["eidetic"], cfg, f"bench:{rel}", "log (main store)",
                     "eidetic log --json", json_flag=True, runs=5)


def shq(s: str) -> str:
    import shlex
    return shlex.quote(s)


def first_file(top: str) -> str | None:
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        if files:
            return os.path.join(dirpath, sorted(files)[0])
    return None


def verify_ingest(b: Bench, r: Result, tree_dir: str, summary: dict, entry: str,
                  problems: list[str] | None = None) -> None:
    """Untimed sanity check that the ingest really did the work (*problems*:
    what the caller found wrong already)."""
    if not r.ok:
        return
    n, nbytes = count_files(tree_dir) if os.path.isdir(tree_dir) else (0, 0)
    r.extra["tree_files"] = n
    r.extra["tree_bytes"] = nbytes
    problems = list(problems or [])
    if n != summary["files"] or nbytes != summary["bytes"]:
        problems.append(f"tree has {n} files / {nbytes} B, expected "
                        f"{summary['files']} / {summary['bytes']}")
    if os.path.exists(entry):
        problems.append("entry still in the inbox")
    if problems:
        r.ok = False
        r.note = "; ".join(problems)
        b.say(f"  !! {r.tool}: ingest not verified: {r.note}")


def time_log(b: Bench, eidetic: str, cfg: str, target: str, phase: str, tool: str,
             json_flag: bool, runs: int = 10) -> dict:
    cmd = [eidetic, "--config", cfg, "log"] + (["--json"] if json_flag else []) + [target]
    times = []
    out = b""
    rc = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                           env=env_for(cmd, None), preexec_fn=priority_preexec(b.a.nice))
        times.append(time.perf_counter() - t0)
        rc = rc or p.returncode
        out = p.stdout
    med = statistics.median(times)
    r = Result(phase, tool, cmd, seconds=med, rc=rc, ok=rc == 0)
    r.extra = {"runs": runs, "times_s": [round(t, 4) for t in times],
               "min_s": min(times), "max_s": max(times), "target": target,
               "output_bytes": len(out), "output_lines": out.count(b"\n")}
    if json_flag and rc == 0:
        r.extra["versions"] = count_json_versions(out)
    if rc != 0:
        r.note = f"exit {rc}: {p.stderr[-300:].decode(errors='replace')}"
    b.results.append(r)
    b.say(f"  {phase:<13} {tool:<22} median {med * 1000:7.1f} ms over {runs} runs "
          f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f}); "
          f"{len(out)} B output" + (f"; {r.note}" if r.note else ""))
    return r.extra


def count_json_versions(out: bytes):
    """Best effort: the number of versions in `log --json` output (a JSON list,
    an object with a list inside, or JSON lines)."""
    text = out.decode(errors="replace").strip()
    if not text:
        return 0
    try:
        doc = json.loads(text)
    except ValueError:
        return sum(1 for line in text.splitlines() if line.strip().startswith("{"))
    if isinstance(doc, list):
        return len(doc)
    if isinstance(doc, dict):
        for v in doc.values():
            if isinstance(v, list):
                return len(v)
    return None


# ------------------------------------------------------------ log store

def log_store_phase(b: Bench, eidetic: str, root: str, n_files: int, uploads: int,
                    reuse: bool = False) -> None:
    """A store with n_files * uploads path-versions: `uploads` uploads of the
    same n_files paths, each changing every file.  Then time `log`.
    With *reuse*, *root* holds such a store already (from a --keep run)."""
    b.say(f"log store: {uploads} uploads x {n_files} tiny files "
          f"= {uploads * n_files:,} path-versions" + (f" (reusing {root})" if reuse else ""))
    cfg = os.path.join(root, "eidetic.yaml") if reuse else eidetic_config(root)
    if not reuse:
        subprocess.run([eidetic, "--config", cfg, "init"], check=True,
                       stdout=subprocess.DEVNULL, env=EIDETIC["env"])
    inbox = os.path.join(root, "inbox")
    stage = os.path.join(root, "stage")
    per_dir = 100
    rels = []
    for i in range(n_files):
        d = i // per_dir
        rels.append(f"logset/sub-{d // 10:03d}/ses-{d % 10}/trial-{i % per_dir:03d}.txt")
    dirs = sorted({os.path.dirname(r) for r in rels})
    ingest_times = []
    for v in range(1, 0 if reuse else uploads + 1):
        name = f"bench-labL-{v}"
        top = os.path.join(stage, name)
        t0 = time.monotonic()
        for d in dirs:
            os.makedirs(os.path.join(top, d))
        for r in rels:
            with open(os.path.join(top, r), "wb") as f:
                f.write(f"{r} version {v}\n".encode())
        gen_s = time.monotonic() - t0
        place_entry(top, inbox, name)
        r = b.timed("log store build", f"eidetic ingest #{v}",
                    [eidetic, "--config", cfg, "ingest", "--once"], quiet_ok=True)
        ingest_times.append(r.seconds)
        b.say(f"  upload {v}/{uploads}: staged in {gen_s:.1f} s, ingest {r.seconds:.1f} s, "
              f"rss {r.maxrss_mib:.0f} MiB (private {r.tree_anon_mib:.0f} MiB)" + ("" if r.ok else f"  FAILED ({r.note})"))
        if not r.ok:
            return
    path = rels[min(len(rels) - 1, 4207)]
    small_dir = os.path.dirname(path)
    # Process start-up alone, for reference.
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run([eidetic, "--help"], capture_output=True, env=env_for([eidetic], None),
                       preexec_fn=priority_preexec(b.a.nice))
        times.append(time.perf_counter() - t0)
    r = Result("log", "eidetic --help (start-up)", [eidetic, "--help"],
               seconds=statistics.median(times), rc=0, ok=True)
    r.extra = {"runs": 10, "times_s": [round(t, 4) for t in times]}
    b.results.append(r)
    b.say(f"  {'log':<13} {'eidetic --help':<22} median {r.seconds * 1000:7.1f} ms (start-up only)")
    ex = time_log(b, eidetic, cfg, f"bench:{path}", "log", "eidetic log --json path",
                  json_flag=True, runs=10)
    if ex.get("versions") not in (None, uploads):
        b.say(f"  !! expected {uploads} versions of {path}, log --json showed {ex.get('versions')}")
    time_log(b, eidetic, cfg, f"bench:{small_dir}", "log", "eidetic log dir",
             json_flag=False, runs=10)
    b.say(f"  (directory {small_dir} holds {per_dir} files x {uploads} versions)")


# ------------------------------------------------------------- reporting

def med_result(results, phase, tool):
    rs = [r for r in results if r.phase == phase and r.tool == tool and r.ok]
    if not rs:
        return None
    return {"seconds": statistics.median(r.seconds for r in rs),
            "maxrss_mib": max(r.maxrss_mib for r in rs),
            "tree_rss_mib": max(r.tree_rss_mib for r in rs),
            "tree_anon_mib": max(r.tree_anon_mib for r in rs),
            "cpu_s": statistics.median(r.user_s + r.sys_s for r in rs),
            "other_cores": max(r.other_cores for r in rs),
            "n": len(rs)}


def report(results, summary) -> dict:
    rows = [("first ingest", "eidetic"), ("first ingest", "borg create"),
            ("first ingest", "restic backup"), ("first ingest", "cp -a + sync"),
            ("re-send", "eidetic"), ("re-send", "borg create"), ("re-send", "restic backup"),
            ("fsck", "eidetic fsck"), ("fsck", "eidetic fsck --quick"), ("fsck", "restic check"),
            ("fsck", "borg check"),
            ("log (main store)", "eidetic log --json"),
            ("log", "eidetic --help (start-up)"), ("log", "eidetic log --json path"),
            ("log", "eidetic log dir")]
    table = {}
    print()
    size = summary["bytes"] / MiB
    print(f"Data set: {summary['files']:,} files, {summary['bytes'] / GiB:.2f} GiB "
          f"(scale {summary['scale']:g})")
    print(f"{'phase':<17}{'tool':<27}{'wall s':>9}{'MiB/s':>8}{'CPU s':>8}"
          f"{'maxRSS MiB':>12}{'treeRSS MiB':>13}{'private MiB':>13}{'others':>8}")
    for phase, tool in rows:
        m = med_result(results, phase, tool)
        if m is None:
            failed = [r for r in results if r.phase == phase and r.tool == tool]
            if failed:
                print(f"{phase:<17}{tool:<27}{'--':>9}   ({failed[0].note or 'failed'})")
            continue
        table[f"{phase}|{tool}"] = m
        if phase.startswith("log"):
            print(f"{phase:<17}{tool:<27}{m['seconds'] * 1000:>7.1f}ms")
            continue
        rate = f"{size / m['seconds']:8.0f}" if phase != "fsck" else f"{'':>8}"
        print(f"{phase:<17}{tool:<27}{m['seconds']:>9.2f}{rate}{m['cpu_s']:>8.1f}"
              f"{m['maxrss_mib']:>12.1f}{m['tree_rss_mib']:>13.1f}{m['tree_anon_mib']:>13.1f}"
              f"{m['other_cores']:>8.2f}")
    builds = [r.seconds for r in results if r.phase == "log store build" and r.ok]
    if builds:
        print(f"{'log store build':<17}{'eidetic ingest (each)':<27}"
              f"{statistics.median(builds):>9.2f}   (median of {len(builds)} uploads; "
              f"max RSS {max(r.maxrss_mib for r in results if r.phase == 'log store build'):.0f} MiB)")

    def sec(phase, tool):
        m = table.get(f"{phase}|{tool}")
        return m["seconds"] if m else None

    def ratio(x, y):
        return (x / y) if (x is not None and y) else None

    checks = {}
    e1, b1, r1, c1 = (sec("first ingest", t) for t in
                      ("eidetic", "borg create", "restic backup", "cp -a + sync"))
    e2, b2, r2 = (sec("re-send", t) for t in ("eidetic", "borg create", "restic backup"))
    ef, rf, bf = (sec("fsck", t) for t in ("eidetic fsck", "restic check", "borg check"))
    checks["first_ingest_vs_borg"] = ratio(e1, b1)
    checks["resend_vs_borg"] = ratio(e2, b2)
    checks["fsck_vs_restic"] = ratio(ef, rf)
    checks["fsck_quick_vs_restic"] = ratio(sec("fsck", "eidetic fsck --quick"), rf)
    m = table.get("first ingest|eidetic")
    checks["ingest_peak_rss"] = max(m["maxrss_mib"], m["tree_rss_mib"]) if m else None
    lg = sec("log", "eidetic log --json path")
    checks["log_path_ms"] = lg * 1000 if lg is not None else None

    print("\nTargets")
    verdicts = {}
    for key, (desc, limit, unit) in TARGETS.items():
        v = checks.get(key)
        if v is None:
            verdicts[key] = "n/a"
            print(f"  {desc:<60} {'n/a':>9}   target <= {limit:g}{unit}  n/a")
            continue
        ok = v <= limit
        verdicts[key] = "PASS" if ok else "FAIL"
        val = f"{v:.2f}x" if unit == "x" else f"{v:.1f} {unit}"
        print(f"  {desc:<60} {val:>9}   target <= {limit:g}{unit}  {verdicts[key]}")
    info = {
        "first ingest: eidetic / restic backup": ratio(e1, r1),
        "first ingest: eidetic / cp -a + sync": ratio(e1, c1),
        "first ingest: borg / cp -a + sync": ratio(b1, c1),
        "re-send: eidetic / restic backup": ratio(e2, r2),
        "re-send: eidetic / eidetic first ingest": ratio(e2, e1),
        "fsck: eidetic fsck / borg check --verify-data": ratio(ef, bf),
    }
    print("Other ratios (information)")
    for k, v in info.items():
        if v is not None:
            print(f"  {k:<60} {v:8.2f}x")
    return {"table": table, "checks": checks, "verdicts": verdicts, "info_ratios": info}


def machine_info(work: str) -> dict:
    info = {"nproc": os.cpu_count(), "kernel": platform.release(),
            "python": sys.version.split()[0]}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        info["fs"] = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", "-T", work],
                                    capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    journal = loopfs.journal_of(work)
    if journal is not None:
        info["ext4_journal"] = journal
    return info


# ----------------------------------------------------------------- main

def default_eidetic() -> str | None:
    """The eidetic executable when --eidetic does not say: /work/venv's, else PATH's."""
    return "/work/venv/bin/eidetic" if os.path.exists("/work/venv/bin/eidetic") else shutil.which("eidetic")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="data set size factor (1 = 2.2 GiB / 50,006 files)")
    ap.add_argument("--work", default="/work/bench-work",
                    help="scratch directory, outside the repository (default %(default)s)")
    ap.add_argument("--eidetic", default=None,
                    help="eidetic executable (default /work/venv/bin/eidetic, else PATH)")
    ap.add_argument("--skip-borg", action="store_true")
    ap.add_argument("--skip-restic", action="store_true")
    ap.add_argument("--no-cp", dest="cp_baseline", action="store_false",
                    help="skip the durable cp -a + sync baseline")
    ap.add_argument("--skip-main", action="store_true",
                    help="skip ingest / re-send / fsck (e.g. with --log-store only)")
    ap.add_argument("--log-store", action="store_true",
                    help="also build the ~1,000,000 path-version store and time `log`")
    ap.add_argument("--log-files", type=int, default=None,
                    help="files per log-store upload (default 100000 x scale)")
    ap.add_argument("--log-uploads", type=int, default=10)
    ap.add_argument("--reuse-log-store", metavar="DIR", default=None,
                    help="time `log` on a log store kept by an earlier --log-store --keep run "
                         "(DIR = <that run>/logstore; same --log-files/--log-uploads) "
                         "instead of building one")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repeat the main phases N times (fresh dirs, rotated tool "
                         "order) and report medians; each repeat needs ~8x the data size on disk")
    ap.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0,
                    help="CPU priority of every measured command (default -15 as root, "
                         "so other work on the machine disturbs less; 0 = unchanged)")
    ap.add_argument("--order-shift", type=int, default=0,
                    help="rotate the order of the tools within each phase by K "
                         "(to vary the order across separate invocations)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="echo 3 > /proc/sys/vm/drop_caches before every timed command (root)")
    ap.add_argument("--keep", action="store_true", help="keep the work directories")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the generated data set for the next run (reused by scale)")
    ap.add_argument("--json", dest="json_out", default=None,
                    help="write results as JSON here (default bench/out/results-<time>.json)")
    a = ap.parse_args(argv)
    if a.eidetic is None:
        a.eidetic = default_eidetic()
    work = os.path.abspath(a.work)
    repo_root = os.path.dirname(HERE)
    if os.path.commonpath([work, repo_root]) == repo_root:
        ap.error("--work must be outside the repository")
    os.makedirs(work, exist_ok=True)

    b = Bench(a)
    have = tools_available(a)
    for tool in ("eidetic", "borg", "restic"):
        if not have[tool]:
            b.say(f"{tool}: {why(tool)}")
    if have["eidetic"]:
        chk = subprocess.run([have["eidetic"], "--help"], capture_output=True)
        if chk.returncode != 0:
            b.say(f"eidetic: `{have['eidetic']} --help` fails (exit {chk.returncode}): "
                  "treating it as not installed")
            have["eidetic"] = None
            WHY_MISSING["eidetic"] = "not working (--help fails)"

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.join(work, f"run-{stamp}")
    os.makedirs(run_dir)
    b.logdir = os.path.join(run_dir, "logs")
    os.makedirs(b.logdir)
    if have["eidetic"]:
        setup_eidetic_env(have["eidetic"], os.path.join(run_dir, "pycache"))
    b.say(f"work directory: {run_dir}")
    if loopfs.journal_of(run_dir) == "no":
        b.say("  !! ext4 without a journal here: creating files is 10-30x slower for minutes after a mass "
              "delete (bench/loopfs.py); bench/ext4.py runs these phases on a journaled ext4 image")

    versions = tool_versions(have)
    b.say(f"eidetic code: {versions.get('eidetic_commit')} "
          f"(+{versions.get('eidetic_uncommitted_changes', 0)} uncommitted files)")
    started = time.monotonic()
    data, summary = ensure_data(b, work, a.scale)
    try:
        if not a.skip_main:
            for rep in range(a.repeat):
                if a.repeat > 1:
                    b.say(f"=== repeat {rep + 1}/{a.repeat}")
                main_phases(b, have, data, summary, os.path.join(run_dir, f"rep{rep + 1}"),
                            rep + a.order_shift)
        if a.log_store or a.reuse_log_store:
            if have["eidetic"]:
                n = a.log_files or max(100, int(round(100_000 * a.scale)))
                log_store_phase(b, have["eidetic"],
                                os.path.abspath(a.reuse_log_store) if a.reuse_log_store
                                else os.path.join(run_dir, "logstore"),
                                n, a.log_uploads, reuse=bool(a.reuse_log_store))
            else:
                b.skipped("log", "eidetic log --json path", why("eidetic"))
        out = report(b.results, summary)
    finally:
        if not a.keep:
            b.say("cleaning up work directories ...")
            shutil.rmtree(run_dir, ignore_errors=True)
            if not a.keep_data:
                shutil.rmtree(data, ignore_errors=True)
                try:
                    os.unlink(data + ".json")
                except FileNotFoundError:
                    pass
        else:
            b.say(f"kept {run_dir}")

    doc = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(work),
        "versions": versions, "args": vars(a), "data": summary, "total_seconds": round(time.monotonic() - started, 1),
        "results": [asdict(r) for r in b.results], **out,
    }
    path = a.json_out or os.path.join(HERE, "out", f"results-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
