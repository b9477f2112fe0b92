#!/usr/bin/env python3
"""eidetic benchmark: the ingest daemon and the uploader (``eidetic send``).

    python3 bench/daemon_send.py [--out results.json] [--repeat 3] [--keep] ...

Four measurements, all through the real console script and, for SFTP, a real
OpenSSH server on 127.0.0.1 (a throwaway sshd started and stopped here):

1. latency: a running ``eidetic ingest`` daemon (settle_seconds 0.5 and 5,
   rescan 60); 20 small entries dropped one after another the way a client
   does (write ``.name``, rename); time from the rename to the entry's files
   existing under their plain names in the tree;
2. flood: 1,000 small entries (3 files each) present at start-up: time until
   every one is ingested, entries/s, and the daemon's VmHWM just before SIGTERM;
3. send: ``eidetic send`` of a ~500 MiB / ~5,000-file folder to a local inbox
   vs ``cp -a`` + ``sync``, and over SFTP vs ``scp -r`` (+ ``sync``) and
   ``rsync -a`` over ssh (+ ``sync``), side by side, order rotated, medians of
   the per-repetition ratios; then ``--changed-only`` after touching one file
   vs ``rsync -a`` / ``rsync -ac``;
4. verification: ``ingest --once`` of the sent entry (with its upload
   description, checked file by file) vs the same bytes dropped bare.

Rules kept (see docs/design.md, "Measuring here"): every measured run
writes into a fresh directory and nothing is deleted before the end; a
``sync`` precedes every timed command; only ratios measured in the same run
are compared.  Helpers (timing, rusage, bytecode cache, machine notes) come
from bench/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import gen_data  # noqa: E402
from run import (EIDETIC, MiB, Bench, cached_data, count_files, eidetic_config, machine_info,  # noqa: E402
                 place_entry, priority_preexec, setup_eidetic_env, tool_versions, verify_ingest)

SSHD_BIN = "/usr/sbin/sshd"
STUDY = "bench"
SEED = 20240601
# the daemon's per-entry log lines (stderr, "<ISO time> [error: ]ingested|failed <entry> ...")
INGESTED = re.compile(r"^\S+ ingested ")
FAILED = re.compile(r"^\S+ (error: )?failed ")

TARGETS = {
    # key: (description, limit, unit); the latency limits are settle + 1 s
    "latency_median_settle0.5": ("daemon latency, median, settle_seconds 0.5", 1.5, "s"),
    "latency_median_settle5": ("daemon latency, median, settle_seconds 5 (default)", 6.0, "s"),
    "flood_peak_rss": ("daemon peak RSS (VmHWM), 1,000-entry flood", 150.0, "MiB"),
}


# ------------------------------------------------------------------ data

def ensure_data(b: Bench, work: str, medium: int) -> tuple[str, dict]:
    """gen_data.py at scale 0.1 (6 files of 30-35 MiB, 5,000 small files),
    plus *medium* incompressible files of 1-8 MiB under raw/medium/: about
    500 MiB in about 5,000 files of mixed sizes.  Reused when present."""
    def make(data: str) -> dict:
        t0 = time.monotonic()
        s = gen_data.generate(data, scale=0.1, seed=SEED, quiet=True)
        rng = random.Random(SEED + 1)
        os.makedirs(os.path.join(data, "raw", "medium"))
        for i in range(medium):
            size = rng.randint(1 * MiB, 8 * MiB)
            gen_data.write_large(os.path.join(data, "raw", "medium", f"block-{i:03d}.bin"), size, rng)
            s["files"] += 1
            s["bytes"] += size
        s["medium_files"] = medium
        s["seconds"] = round(time.monotonic() - t0, 1)
        return s
    return cached_data(b, os.path.join(work, f"ds-data-m{medium}"), make)


def init_layout(eidetic: str, root: str, settle: float) -> str:
    cfg = eidetic_config(root, STUDY, settle, rescan=60)
    subprocess.run([eidetic, "--config", cfg, "init"], check=True, stdout=subprocess.DEVNULL,
                   env=EIDETIC["env"])
    return cfg


def drop_entry(inbox: str, name: str, files: dict[str, bytes]) -> float:
    """Write an entry as a client does (under '.name', then rename); returns
    the monotonic time right after the rename."""
    dot = os.path.join(inbox, "." + name)
    for rel, data in files.items():
        p = os.path.join(dot, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.rename(dot, os.path.join(inbox, name))
    return time.monotonic()


def small_files(rng: random.Random, tag: str, n: int) -> dict[str, bytes]:
    return {f"{tag}/file-{j}.{'txt' if j % 2 else 'bin'}": rng.randbytes(rng.randint(100, 4096))
            for j in range(n)}


# ---------------------------------------------------------------- daemon

def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within *timeout* seconds."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


class DaemonProc:
    """``eidetic --config CFG ingest`` (the daemon) with its stderr lines
    collected (monotonic time, line) as they arrive."""

    def __init__(self, eidetic: str, cfg: str, nice: int, logpath: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self._cv = threading.Condition()
        self.logpath = logpath
        env = {k: v for k, v in EIDETIC["env"].items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen([eidetic, "--config", cfg, "ingest"], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, preexec_fn=priority_preexec(nice))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with open(self.logpath, "ab") as log:
            for raw in self.proc.stderr:
                now = time.monotonic()
                log.write(raw)
                with self._cv:
                    self.lines.append((now, raw.decode(errors="replace").rstrip("\n")))
                    self._cv.notify_all()

    def wait_for(self, pred, timeout: float, what: str) -> float:
        """Wait until pred(lines) is true; returns the time of the last line."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred(self.lines):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    tail = "\n".join(ln for _t, ln in self.lines[-15:])
                    raise RuntimeError(f"daemon: no {what} within {timeout:g} s "
                                       f"(exit {self.proc.poll()}); last lines:\n{tail}")
                self._cv.wait(min(left, 0.5))
            return self.lines[-1][0] if self.lines else time.monotonic()

    def status_kib(self) -> dict[str, int]:
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Threads"):
                    out[k] = int(v.split()[0])
        return out

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as f:
            st = f.read()
        fields = st[st.rindex(")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 30.0) -> int | None:
        terminate(self.proc, timeout)
        self._reader.join(5)
        return self.proc.returncode


def wait_paths(paths: list[str], timeout: float, poll: float = 0.005) -> float | None:
    """Monotonic time at which every path exists (polled), None on timeout."""
    deadline = time.monotonic() + timeout
    left = list(paths)
    while True:
        left = [p for p in left if not os.path.lexists(p)]
        now = time.monotonic()
        if not left:
            return now
        if now > deadline:
            return None
        time.sleep(poll)


def latency_phase(b: Bench, eidetic: str, root: str, settle: float, n: int, out: dict) -> None:
    tag = f"{settle:g}".replace(".", "")
    b.say(f"phase: daemon latency, settle_seconds {settle:g}, {n} entries one after another")
    cfg = init_layout(eidetic, root, settle)
    inbox, tree = os.path.join(root, "inbox"), os.path.join(root, "tree")
    rng = random.Random(SEED + int(settle * 10))
    d = DaemonProc(eidetic, cfg, b.a.nice, os.path.join(b.logdir, f"daemon-latency-{tag}.log"))
    lat: list[float] = []
    warm = None
    try:
        d.wait_for(lambda ls: any("started (pid" in ln for _t, ln in ls), 30, "start line")
        for i in range(n + 1):          # entry 0 warms the daemon up (store opened, imports): not counted
            rel = f"lat{tag}/e{i:03d}"
            files = small_files(rng, rel, 2)
            t0 = drop_entry(inbox, f"{STUDY}-labL{tag}-{i:03d}", files)
            t1 = wait_paths([os.path.join(tree, r) for r in files], timeout=settle + 60)
            if t1 is None:
                raise RuntimeError(f"entry {i} did not reach the tree within {settle + 60:g} s")
            if i == 0:
                warm = t1 - t0
            else:
                lat.append(t1 - t0)
            time.sleep(0.1)
        rss = d.status_kib()
    finally:
        rc = d.stop()
    med, mx = statistics.median(lat), max(lat)
    b.say(f"  settle {settle:g} s: median {med:.3f} s, max {mx:.3f} s, min {min(lat):.3f} s "
          f"(warm-up entry {warm:.3f} s); daemon exit {rc}")
    out[f"settle{settle:g}"] = {"settle_seconds": settle, "entries": n, "median_s": med, "max_s": mx,
                                "min_s": min(lat), "p90_s": sorted(lat)[int(0.9 * (len(lat) - 1))],
                                "warmup_s": warm, "latencies_s": [round(x, 4) for x in lat],
                                "daemon_exit": rc, "daemon_status_kib": rss}


def flood_phase(b: Bench, eidetic: str, root: str, n: int, out: dict) -> None:
    settle = 5.0
    b.say(f"phase: flood, {n} entries x 3 files present at start-up (settle_seconds {settle:g})")
    cfg = init_layout(eidetic, root, settle)
    inbox, tree = os.path.join(root, "inbox"), os.path.join(root, "tree")
    rng = random.Random(SEED + 7)
    t0 = time.monotonic()
    for i in range(n):
        drop_entry(inbox, f"{STUDY}-labF-{i:04d}", small_files(rng, f"flood/e{i:04d}", 3))
    staged = time.monotonic() - t0
    # Entries present at start-up have long settled in real life: start the
    # daemon once the newest is older than settle_seconds, so settling is
    # not what is timed.
    time.sleep(settle + 0.5)
    subprocess.run(["sync"], check=True)
    d = DaemonProc(eidetic, cfg, b.a.nice, os.path.join(b.logdir, "daemon-flood.log"))
    try:
        def done(ls):
            return sum(1 for _t, ln in ls if INGESTED.match(ln) or FAILED.match(ln)) >= n
        t_last = d.wait_for(done, timeout=600, what=f"{n} ingested/failed lines")
        rss = d.status_kib()            # VmHWM just before SIGTERM
        cpu = d.cpu_seconds()
    finally:
        rc = d.stop()
    ingested_t = [t for t, ln in d.lines if INGESTED.match(ln)]
    failed = sum(1 for _t, ln in d.lines if FAILED.match(ln))
    t_started = next((t for t, ln in d.lines if "started (pid" in ln), d.t_start)
    total = t_last - d.t_start
    steady = (ingested_t[-1] - ingested_t[0]) if len(ingested_t) > 1 else float("nan")
    nfiles, _ = count_files(os.path.join(tree, "flood")) if os.path.isdir(os.path.join(tree, "flood")) \
        else (0, 0)
    left = [x for x in os.listdir(inbox) if not x.startswith(".")]
    res = {"entries": n, "files_per_entry": 3, "staging_s": staged, "seconds_from_launch": total,
           "seconds_from_started_line": t_last - t_started, "start_up_s": t_started - d.t_start,
           "entries_per_s": n / total, "steady_entries_per_s": (len(ingested_t) - 1) / steady,
           "ingested": len(ingested_t), "failed": failed, "tree_files": nfiles,
           "inbox_left": len(left), "vmhwm_mib": rss.get("VmHWM", 0) / 1024,
           "vmrss_mib": rss.get("VmRSS", 0) / 1024, "rss_anon_mib": rss.get("RssAnon", 0) / 1024,
           "threads": rss.get("Threads"), "cpu_s": cpu, "daemon_exit": rc}
    ok = len(ingested_t) == n and nfiles == 3 * n and not left and failed == 0
    res["ok"] = ok
    b.say(f"  {n} entries in {total:.2f} s from launch ({n / total:.1f} entries/s; steady "
          f"{res['steady_entries_per_s']:.1f}/s), start-up {res['start_up_s']:.2f} s, cpu {cpu:.1f} s, "
          f"VmHWM {res['vmhwm_mib']:.1f} MiB (anon now {res['rss_anon_mib']:.1f} MiB)"
          + ("" if ok else f"  !! NOT ALL INGESTED: {len(ingested_t)} ingested, {failed} failed, "
                           f"{nfiles} tree files, {len(left)} left in the inbox"))
    out.update(res)


# ------------------------------------------------------------------- sshd

class SSHD:
    """A throwaway OpenSSH server on 127.0.0.1 (the same set-up as
    tests/sshd_peer.py, copied because that module needs pytest)."""

    def __init__(self, workdir: str) -> None:
        self.dir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.host_key = os.path.join(workdir, "host_ed25519")
        self.user_key = os.path.join(workdir, "user_ed25519")
        for k in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "eidetic-bench", "-f", k],
                           check=True, capture_output=True)
        self.authorized_keys = os.path.join(workdir, "authorized_keys")
        shutil.copyfile(self.user_key + ".pub", self.authorized_keys)
        self.known_hosts = os.path.join(workdir, "known_hosts")
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", self.host_key + ".pub"],
                             check=True, capture_output=True, text=True).stdout
        return out.split()[1]

    def send_opts(self, inbox: str, fp: str) -> list[str]:
        """``eidetic send`` options for sending to *inbox* on this server (host key fingerprint *fp*)."""
        return ["--to", f"sftp://root@127.0.0.1:{self.port}{inbox}", "--identity", self.user_key,
                "--accept-host-key", fp]

    def start(self) -> SSHD:
        os.makedirs("/run/sshd", exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        cfg = os.path.join(self.dir, "sshd_config")
        with open(cfg, "w") as f:
            f.write("\n".join([f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
                               f"AuthorizedKeysFile {self.authorized_keys}", "PasswordAuthentication no",
                               "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
                               "StrictModes no", "UsePAM no", "PidFile none",
                               "Subsystem sftp internal-sftp", ""]))
        with open(os.path.join(self.dir, "sshd.log"), "ab") as log:
            self.proc = subprocess.Popen([SSHD_BIN, "-D", "-e", "-f", cfg], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        with open(self.host_key + ".pub") as f:
            kind, b64 = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {kind} {b64}\n")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("sshd did not start")

    def _key_opts(self) -> str:
        """The same key and a strict host key check for ssh, scp and rsync."""
        return (f"-i {shlex.quote(self.user_key)} -o IdentitiesOnly=yes -o BatchMode=yes "
                f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={shlex.quote(self.known_hosts)}")

    def ssh_cmd(self) -> str:
        """The ssh command line rsync uses."""
        return f"ssh -p {self.port} {self._key_opts()}"

    def scp_opts(self) -> str:
        return f"-P {self.port} {self._key_opts()}"

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc, 10)
        self.proc = None


# ------------------------------------------------------------------ send

def q(s: str) -> str:
    return shlex.quote(s)


def check_tree(b: Bench, r, top: str, summary: dict) -> None:
    """Untimed: the destination holds the data set (ignoring the description)."""
    if not r.ok:
        return
    n = nbytes = 0
    for dirpath, _dirs, files in os.walk(top):
        for fn in files:
            if fn == ".eidetic-description.jsonl":
                continue
            n += 1
            nbytes += os.lstat(os.path.join(dirpath, fn)).st_size
    r.extra.update(dest_files=n, dest_bytes=nbytes)
    if (n, nbytes) != (summary["files"], summary["bytes"]):
        r.ok = False
        r.note = f"destination has {n} files / {nbytes} B, expected {summary['files']} / {summary['bytes']}"
        b.say(f"  !! {r.tool}: {r.note}")


def client_env(run_dir: str) -> dict:
    """The environment of every ``eidetic send``: one client home (its --changed-only records) per run."""
    return dict(EIDETIC["env"], EIDETIC_CLIENT_HOME=os.path.join(run_dir, "client"))


def only_entry(inbox: str) -> str:
    names = [x for x in os.listdir(inbox) if not x.startswith(".")]
    if len(names) != 1:
        raise RuntimeError(f"{inbox}: expected one entry, found {names}")
    return os.path.join(inbox, names[0])


def send_phase(b: Bench, eidetic: str, sshd: SSHD, src: str, summary: dict, run_dir: str,
               reps: int, sftp_only: bool = False, baseline: str | None = None) -> list[dict]:
    """Full sends, side by side; returns per-repetition directories for the
    verification phase."""
    env = client_env(run_dir)
    fp = sshd.fingerprint()
    reps_info = []
    for k in range(reps):
        rep = os.path.join(run_dir, "send", f"rep{k + 1}")
        desc_root, bare_root = os.path.join(rep, "desc"), os.path.join(rep, "bare")
        desc_cfg = init_layout(eidetic, desc_root, 0)
        bare_cfg = init_layout(eidetic, bare_root, 0)
        os.makedirs(os.path.join(bare_root, "stage"))
        sftp_inbox = os.path.join(rep, "sftp-inbox")
        os.makedirs(sftp_inbox)
        info = {"rep": rep, "desc_cfg": desc_cfg, "bare_cfg": bare_cfg, "desc_root": desc_root,
                "bare_root": bare_root, "bare_name": f"{STUDY}-labB-r{k + 1}",
                "sftp_inbox": sftp_inbox, "rsync_dest": os.path.join(rep, "rsync-dest")}
        reps_info.append(info)
        b.say(f"phase: send, repetition {k + 1}/{reps}")
        _send_rep(b, eidetic, sshd, src, summary, env, fp, info, k, sftp_only, baseline)
    return reps_info


def _send_rep(b: Bench, eidetic: str, sshd: SSHD, src: str, summary: dict, env: dict, fp: str,
              info: dict, k: int, sftp_only: bool = False, baseline: str | None = None) -> None:
    """One repetition: the five sends (with --sftp-only the SFTP ones; with
    --baseline-eidetic one more SFTP send by that executable), in an order
    rotated by *k*."""
    def eid_local():
        inbox = os.path.join(info["desc_root"], "inbox")
        r = b.timed("send local", "eidetic send (local inbox)",
                    [eidetic, "send", src, "--study", STUDY, "--to", inbox, "--location", "labA"], env=env)
        if r.ok:
            check_tree(b, r, only_entry(inbox), summary)

    def cp():
        dst = os.path.join(info["bare_root"], "stage", info["bare_name"])
        r = b.timed("send local", "cp -a + sync", f"cp -a {q(src)} {q(dst)} && sync", shell=True)
        check_tree(b, r, dst, summary)

    def eid_sftp(exe: str = eidetic, tool: str = "eidetic send (sftp)", inbox: str = info["sftp_inbox"]):
        r = b.timed("send sftp", tool,
                    [exe, "send", src, "--study", STUDY, "--location", "labS", *sshd.send_opts(inbox, fp)], env=env)
        if r.ok:
            check_tree(b, r, only_entry(inbox), summary)

    def eid_sftp_baseline():
        inbox = info["sftp_inbox"] + "-baseline"
        os.makedirs(inbox)
        eid_sftp(baseline, BASELINE_TOOL, inbox)

    def scp():
        dst = os.path.join(info["rep"], "scp-dest")
        r = b.timed("send sftp", "scp -r + sync",
                    f"scp -q -r {sshd.scp_opts()} {q(src)} root@127.0.0.1:{q(dst)} && sync", shell=True)
        check_tree(b, r, dst, summary)

    def rsync():
        if shutil.which("rsync") is None:
            return b.skipped("send sftp", "rsync -a over ssh + sync", "rsync not installed")
        dst = info["rsync_dest"]
        r = b.timed("send sftp", "rsync -a over ssh + sync",
                    f"rsync -a -e {q(sshd.ssh_cmd())} {q(src)}/ root@127.0.0.1:{q(dst)}/ && sync",
                    shell=True)
        check_tree(b, r, dst, summary)

    jobs = [eid_sftp, scp, rsync] if sftp_only else [eid_local, cp, eid_sftp, scp, rsync]
    if baseline:
        jobs.insert(1, eid_sftp_baseline)
    s = k % len(jobs)
    for job in jobs[s:] + jobs[:s]:
        job()


def changed_only_phase(b: Bench, eidetic: str, sshd: SSHD, src: str, run_dir: str, reps_info: list[dict],
                       reps: int) -> None:
    """Touch one file, then re-send with --changed-only (local and SFTP) to
    the destinations of repetition 1, next to rsync -a / -ac into copies that
    rsync made earlier.  Each round touches a different file."""
    env = client_env(run_dir)
    fp = sshd.fingerprint()
    r1 = reps_info[0]
    local_inbox = os.path.join(r1["desc_root"], "inbox")
    have_rsync = shutil.which("rsync") is not None
    small = sorted(os.path.join(dp, f) for dp, _d, fs in os.walk(src) for f in fs if "sub-0" in dp)
    for k in range(reps):
        victim = small[(k + 1) * 997 % len(small)]
        now = time.time() + k + 1
        os.utime(victim, (now, now))
        b.say(f"phase: --changed-only re-send, round {k + 1}/{reps} (touched {os.path.relpath(victim, src)})")

        def eid_local():
            r = b.timed("changed-only local", "eidetic send --changed-only (local)",
                        [eidetic, "send", src, "--study", STUDY, "--to", local_inbox, "--location", "labA",
                         "--changed-only"], env=env)
            r.extra["stdout_tail"] = _tail(r.extra.get("log"))

        def eid_sftp():
            r = b.timed("changed-only sftp", "eidetic send --changed-only (sftp)",
                        [eidetic, "send", src, "--study", STUDY, "--location", "labS",
                         *sshd.send_opts(r1["sftp_inbox"], fp), "--changed-only"], env=env)
            r.extra["stdout_tail"] = _tail(r.extra.get("log"))

        def rs_local():
            b.timed("changed-only local", "rsync -a (local) + sync",
                    f"rsync -a {q(src)}/ {q(reps_info[1 % len(reps_info)]['rsync_dest'])}/ && sync", shell=True)

        def rs_ssh():
            b.timed("changed-only sftp", "rsync -a over ssh + sync",
                    f"rsync -a -e {q(sshd.ssh_cmd())} {q(src)}/ root@127.0.0.1:{q(r1['rsync_dest'])}/ && sync",
                    shell=True)

        def rs_ssh_c():
            b.timed("changed-only sftp", "rsync -ac over ssh + sync",
                    f"rsync -ac -e {q(sshd.ssh_cmd())} {q(src)}/ "
                    f"root@127.0.0.1:{q(reps_info[-1]['rsync_dest'])}/ && sync", shell=True)

        jobs = [eid_local, eid_sftp] + ([rs_local, rs_ssh, rs_ssh_c] if have_rsync else [])
        s = k % len(jobs)
        for job in jobs[s:] + jobs[:s]:
            job()


def _tail(path: str | None) -> str:
    if not path:
        return ""
    with open(path, "rb") as f:
        return f.read()[-400:].decode(errors="replace").strip()


def verify_phase(b: Bench, eidetic: str, reps_info: list[dict], summary: dict) -> None:
    """ingest --once of the sent entry (with its description) vs the same
    bytes dropped bare, each into its own fresh store."""
    for k, info in enumerate(reps_info):
        b.say(f"phase: verification at ingest, repetition {k + 1}/{len(reps_info)}")
        bare_inbox = os.path.join(info["bare_root"], "inbox")
        place_entry(os.path.join(info["bare_root"], "stage", info["bare_name"]), bare_inbox, info["bare_name"])
        desc_entry = only_entry(os.path.join(info["desc_root"], "inbox"))

        def desc(info=info, desc_entry=desc_entry):
            r = b.timed("ingest", "ingest --once, with description",
                        [eidetic, "--config", info["desc_cfg"], "ingest", "--once"])
            _check_ingest(b, r, info["desc_root"], desc_entry, summary, expect_verified=True)

        def bare(info=info, bare_inbox=bare_inbox):
            r = b.timed("ingest", "ingest --once, bare",
                        [eidetic, "--config", info["bare_cfg"], "ingest", "--once"])
            _check_ingest(b, r, info["bare_root"], os.path.join(bare_inbox, info["bare_name"]), summary,
                          expect_verified=False)

        for job in ([desc, bare] if k % 2 == 0 else [bare, desc]):
            job()


def _check_ingest(b: Bench, r, root: str, entry: str, summary: dict, expect_verified: bool) -> None:
    if not r.ok:
        return
    verified = "verified against the sender's description" in _tail(r.extra.get("log"))
    r.extra["verified"] = verified
    verify_ingest(b, r, os.path.join(root, "tree"), summary, entry,
                  [] if verified == expect_verified else [f"verified={verified}, expected {expect_verified}"])


# ------------------------------------------------------------- reporting

BASELINE_TOOL = "eidetic send (sftp), --baseline-eidetic"


def med(results, phase: str, tool: str) -> float | None:
    xs = [r.seconds for r in results if r.phase == phase and r.tool == tool and r.ok]
    return statistics.median(xs) if xs else None


def paired_ratios(results, phase: str, a: str, ref: str) -> list[float]:
    """eidetic/reference per repetition (the n-th run of each, same repetition)."""
    xa = [r.seconds for r in results if r.phase == phase and r.tool == a]
    xr = [r.seconds for r in results if r.phase == phase and r.tool == ref]
    ok_a = [r.ok for r in results if r.phase == phase and r.tool == a]
    ok_r = [r.ok for r in results if r.phase == phase and r.tool == ref]
    return [x / y for x, y, oa, orf in zip(xa, xr, ok_a, ok_r) if oa and orf and y > 0]


def report(results, lat: dict, flood: dict, summary: dict, meta: dict) -> tuple[str, dict]:
    rows = []
    verdicts = {}

    def verdict(key, value):
        _desc, limit, unit = TARGETS[key]
        v = "n/a" if value is None else ("PASS" if value <= limit else "FAIL")
        verdicts[key] = {"value": value, "limit": limit, "unit": unit, "verdict": v}
        return v, f"<= {limit:g} {unit}"

    for s in ("0.5", "5"):
        x = lat.get(f"settle{s}")
        if not x:
            continue
        v, lim = verdict(f"latency_median_settle{s}", x["median_s"])
        rows.append((f"daemon latency, settle_seconds {s}, {x['entries']} entries: median (max)",
                     f"{x['median_s']:.2f} s ({x['max_s']:.2f} s)", lim, v))
    if flood:
        v, lim = verdict("flood_peak_rss", flood["vmhwm_mib"])
        rows.append((f"flood: {flood['entries']:,} entries x 3 files present at start-up, all ingested",
                     (f"{flood['seconds_from_launch']:.1f} s = {flood['entries_per_s']:.1f} entries/s "
                      f"(steady {flood['steady_entries_per_s']:.1f}/s)"), "(none)", "info"))
        rows.append(("flood: daemon peak RSS (VmHWM before SIGTERM)", f"{flood['vmhwm_mib']:.1f} MiB", lim, v))
    mib = summary["bytes"] / MiB
    pairs = [("send local", "eidetic send (local inbox)", "cp -a + sync", "send to a local inbox"),
             ("send sftp", "eidetic send (sftp)", "scp -r + sync", "send over SFTP"),
             ("send sftp", "eidetic send (sftp)", "rsync -a over ssh + sync", "send over SFTP"),
             ("send sftp", BASELINE_TOOL, "scp -r + sync", "send over SFTP"),
             ("send sftp", "eidetic send (sftp)", BASELINE_TOOL, "send over SFTP"),
             ("changed-only local", "eidetic send --changed-only (local)", "rsync -a (local) + sync",
              "--changed-only re-send, 1 file touched, local"),
             ("changed-only sftp", "eidetic send --changed-only (sftp)", "rsync -a over ssh + sync",
              "--changed-only re-send, 1 file touched, SFTP"),
             ("changed-only sftp", "eidetic send --changed-only (sftp)", "rsync -ac over ssh + sync",
              "--changed-only re-send, 1 file touched, SFTP"),
             ("ingest", "ingest --once, with description", "ingest --once, bare",
              "ingest --once: sent entry with description vs bare")]
    ratios = {}
    for phase, a, ref, label in pairs:
        rs = paired_ratios(results, phase, a, ref)
        ma, mr = med(results, phase, a), med(results, phase, ref)
        if not rs or ma is None or mr is None:
            continue
        key = f"{label}: {a} / {ref}"
        ratios[key] = {"per_rep": rs, "median": statistics.median(rs), "eidetic_s": ma, "ref_s": mr}
        rate = f", {mib / ma:.0f} vs {mib / mr:.0f} MiB/s" if phase in ("send local", "send sftp") else ""
        rows.append((f"{label}: `{a}` / `{ref}`",
                     (f"**{statistics.median(rs):.2f}x** ({', '.join(f'{x:.2f}' for x in rs)}); "
                      f"{ma:.2f} s vs {mr:.2f} s{rate}"), "(none)", "info"))
    lines = [(f"Date {meta['date']}, eidetic commit {meta['commit']}, {meta['machine']}; data set "
              f"{summary['files']:,} files, {mib:.0f} MiB; medians over {meta['reps']} repetitions "
              "(ratios: median of the per-repetition ratios, each pair measured side by side)."), "",
             "| measurement | measured | target | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b_} | {c} | {d} |" for a, b_, c, d in rows]
    lines += ["", "| phase | tool | wall s (median) | wall s, each run | CPU s user + sys (median) |",
              "| --- | --- | ---: | --- | ---: |"]
    seen = []
    for r in results:
        if (r.phase, r.tool) not in seen and r.cmd:
            seen.append((r.phase, r.tool))
    for phase, tool in seen:
        rs = [r for r in results if r.phase == phase and r.tool == tool]
        ok = [r for r in rs if r.ok]
        if not ok:
            lines.append(f"| {phase} | {tool} | failed | | |")
            continue
        lines.append(f"| {phase} | {tool} | {statistics.median(r.seconds for r in ok):.2f} | "
                     + ", ".join(f"{r.seconds:.2f}" + ("" if r.ok else "!") for r in rs) + " | "
                     f"{statistics.median(r.user_s for r in ok):.1f} + {statistics.median(r.sys_s for r in ok):.1f} |")
    return "\n".join(lines), {"verdicts": verdicts, "ratios": ratios}


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None,
                    help="write results as JSON here (default bench/out/daemon-send-<time>.json)")
    ap.add_argument("--work", default="/work/bench-work",
                    help="scratch directory, outside the repository (default %(default)s)")
    ap.add_argument("--eidetic", default="/work/venv/bin/eidetic")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions of the send and ingest pairs")
    ap.add_argument("--latency-entries", type=int, default=20)
    ap.add_argument("--settles", default="0.5,5", help="settle_seconds values for the latency phase")
    ap.add_argument("--flood", type=int, default=1000, help="entries in the flood (0: skip)")
    ap.add_argument("--medium-files", type=int, default=64,
                    help="1-8 MiB files added to gen_data's scale-0.1 set (64: ~500 MiB in total)")
    ap.add_argument("--skip-daemon", action="store_true", help="skip latency and flood")
    ap.add_argument("--skip-send", action="store_true", help="skip send, --changed-only and verification")
    ap.add_argument("--sftp-only", action="store_true",
                    help="of the send measurements, run only the full sends over SFTP (eidetic, scp, rsync)")
    ap.add_argument("--baseline-eidetic", default=None, metavar="EXE",
                    help="also send over SFTP with this eidetic executable (e.g. an older commit), side by side")
    ap.add_argument("--nice", type=int, default=-15 if os.geteuid() == 0 else 0,
                    help="CPU priority of every measured command and the daemon (default -15 as root)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--keep-data", action="store_true", help="keep the generated data set for the next run")
    a = ap.parse_args(argv)
    a.drop_caches = False           # Bench.settle reads it
    work = os.path.abspath(a.work)
    repo_root = os.path.dirname(HERE)
    if os.path.commonpath([work, repo_root]) == repo_root:
        ap.error("--work must be outside the repository")
    if not os.access(a.eidetic, os.X_OK):
        ap.error(f"{a.eidetic}: not executable")
    need_sshd = not a.skip_send
    if need_sshd and (os.geteuid() != 0 or not os.access(SSHD_BIN, os.X_OK)):
        ap.error(f"the SFTP measurements need root and {SSHD_BIN} (or --skip-send)")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = os.path.join(work, f"daemon-send-{stamp}")
    b = Bench(a)
    b.logdir = os.path.join(run_dir, "logs")
    os.makedirs(b.logdir)
    setup_eidetic_env(a.eidetic, os.path.join(run_dir, "pycache"))
    subprocess.run([a.eidetic, "send", "--help"], env=EIDETIC["env"], capture_output=True)
    versions = tool_versions({})
    for tool, cmd in (("openssh", ["ssh", "-V"]), ("rsync", ["rsync", "--version"])):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True)
            versions[tool] = (p.stdout or p.stderr).splitlines()[0].strip()
        except (OSError, IndexError):
            versions[tool] = "not installed"
    b.say(f"work directory: {run_dir}; eidetic code: {versions.get('eidetic_commit')} "
          f"(+{versions.get('eidetic_uncommitted_changes', 0)} uncommitted files)")
    started = time.monotonic()
    lat: dict = {}
    flood: dict = {}
    sshd = None
    data = None
    summary: dict = {}
    try:
        if not a.skip_daemon:
            for s in [float(x) for x in a.settles.split(",") if x]:
                latency_phase(b, a.eidetic, os.path.join(run_dir, f"latency-{s:g}"), s, a.latency_entries, lat)
            if a.flood:
                flood_phase(b, a.eidetic, os.path.join(run_dir, "flood"), a.flood, flood)
        if not a.skip_send:
            data, summary = ensure_data(b, work, a.medium_files)
            src = os.path.join(run_dir, "src", "ds")
            b.say("setup: copying the data set to the send source (cp -a, not timed)")
            Bench.copy_tree(data, src)
            subprocess.run(["sync"], check=True)
            sshd = SSHD(os.path.join(run_dir, "sshd")).start()
            b.say(f"sshd on 127.0.0.1:{sshd.port}")
            reps_info = send_phase(b, a.eidetic, sshd, src, summary, run_dir, a.repeat, a.sftp_only,
                                   a.baseline_eidetic)
            if not a.sftp_only:
                verify_phase(b, a.eidetic, reps_info, summary)
                changed_only_phase(b, a.eidetic, sshd, src, run_dir, reps_info, a.repeat)
    finally:
        if sshd is not None:
            sshd.stop()
        if not a.keep:
            b.say("cleaning up the work directory ...")
            shutil.rmtree(run_dir, ignore_errors=True)
            if data and not a.keep_data:
                shutil.rmtree(data, ignore_errors=True)
                try:
                    os.unlink(data + ".json")
                except FileNotFoundError:
                    pass
        else:
            b.say(f"kept {run_dir}")

    mi = machine_info(work)
    commit = (versions.get("eidetic_commit") or "?").split()[0]
    meta = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "machine": f"{mi.get('nproc')} vCPU {mi.get('cpu', '')}, {mi.get('mem_total_gib')} GiB RAM, "
                       f"Linux {mi.get('kernel')}, {(mi.get('fs') or '').split(' ')[0]}",
            "reps": a.repeat}
    table, out = report(b.results, lat, flood, summary or {"files": 0, "bytes": 0}, meta)
    print("\n" + table)
    doc = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": mi,
           "versions": versions, "args": vars(a), "data": summary, "latency": lat, "flood": flood,
           "total_seconds": round(time.monotonic() - started, 1),
           "results": [asdict(r) for r in b.results], "markdown": table, **out}
    path = a.out or os.path.join(HERE, "out", f"daemon-send-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    print(f"\nresults: {path} (total {doc['total_seconds']:.0f} s)")
    bad = [r for r in b.results if r.cmd and not r.ok] or (flood and not flood.get("ok"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
