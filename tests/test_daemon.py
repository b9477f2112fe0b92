"""The ingest daemon (``eidetic ingest`` without --once), as real subprocesses
with real inotify, signals, a systemd notify socket and an SMTP server."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest
from conftest import (
    DAEMON_UID,
    UPLOADER_UID,
    check_store,
    chown_tree,
    drop,
    make_layout,
    one_line_error,
    plain_files,
    run_as,
    run_cli,
)
from daemon_helpers import (
    DaemonProc,
    NotifySocket,
    big_files,
    daemon_records,
    env_with,
    set_config,
    set_study,
    sigterm_ok,
    small_tmpfs,
    wait_until,
)

from eidetic.server.inbox import StateDir

SYSTEM_PYTHON = "/usr/bin/python3"
ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d ")


@pytest.fixture
def daemons():
    """Start daemons with ``daemons(config, *args, **kw)``; any still running
    at the end of the test is killed."""
    started: list[DaemonProc] = []

    def start(config, *args, **kw) -> DaemonProc:
        d = DaemonProc(config, *args, **kw)
        started.append(d)
        return d
    yield start
    for d in started:
        d.kill()


def daemon_layout(tmp_path, studies=("s1", "s2"), settle=0.5, rescan=30, **keys):
    lay = make_layout(tmp_path, studies=studies, settle_seconds=settle)
    return set_config(lay, rescan_seconds=rescan, **keys)


def reloads(d: DaemonProc) -> list[str]:
    return [ln for ln in d.lines if " reloaded " in ln]


def done(lay, name: str):
    return daemon_records(lay).get(name)


# ------------------------------------------------------------- basics

def test_backlog_and_dropped_entries_are_ingested_and_a_partial_one_waits_for_its_rename(tmp_path, daemons):
    lay = daemon_layout(tmp_path)
    drop(lay.inbox, "s1-labA-1", {"eprime/a.txt": b"backlog"})
    d = daemons(lay.config_path).started()
    wait_until(lambda: done(lay, "s1-labA-1"), 10, "the backlog entry")

    # An upload still being written (dot name) is left alone, however long it sits.
    partial = lay.inbox / ".s1-labB-1"
    (partial / "sub").mkdir(parents=True)
    (partial / "sub" / "b.txt").write_bytes(b"partial")
    time.sleep(1.5)      # three settle periods
    assert partial.exists() and done(lay, ".s1-labB-1") is None and lay.records("claims") == []
    os.rename(partial, lay.inbox / "s1-labB-1")
    wait_until(lambda: done(lay, "s1-labB-1"), 10, "the renamed entry")

    drop(lay.inbox, "s2-labC-1", {"c.txt": b"other study"})
    wait_until(lambda: done(lay, "s2-labC-1"), 10, "the s2 entry")
    sigterm_ok(d)

    assert plain_files(lay.tree("s1")) == {b"eprime/a.txt": b"backlog", b"sub/b.txt": b"partial"}
    assert plain_files(lay.tree("s2")) == {b"c.txt": b"other study"}
    lines = d.lines
    assert all(ISO_LINE.match(ln) for ln in lines), d.text
    started = d.wait_for(r"started \(pid")
    assert "s1, s2" in started and str(lay.inbox) in started and "inotify" in started
    assert re.search(r"seen s1-labB-1 in .* \(study s1\)", d.text)
    assert re.search(r"ingested s1-labB-1 \(study s1\) as upload \S+: 1 files, 7 bytes .*1 new versions, "
                     r"[\d.]+ s", d.text)
    assert "waiting s1-labB-1" in d.text or "claimed s1-labB-1" in d.text
    assert "Traceback" not in d.text
    check_store(lay, "s1")
    check_store(lay, "s2")


def test_sigint_stops_it_and_journald_gets_priority_prefixes(tmp_path, daemons):
    lay = daemon_layout(tmp_path)
    d = daemons(lay.config_path, env=env_with(JOURNAL_STREAM="8:12345"), verbose=False)
    d.wait_for(r"^<6>started \(pid")
    drop(lay.inbox, "nostudy-labA-1", {"x.txt": b"x"})
    line = d.wait_for(r"failed nostudy-labA-1")
    assert line.startswith("<3>failed nostudy-labA-1 (no study") and "the data is kept at" in line
    (rec,) = lay.records("failed")
    assert rec["where"] in line
    t0 = time.monotonic()
    d.signal(signal.SIGINT)
    assert d.wait_exit(5) == 0
    assert time.monotonic() - t0 < 5
    assert all(re.match(r"^<[3467]>", ln) for ln in d.lines), d.text
    assert d.wait_for(r"^<6>stopping \(SIGINT\)")
    assert not any(ln.startswith("<7>") for ln in d.lines)     # debug lines only with -v


# ------------------------------------------------- stopping and crashing

@pytest.mark.slow
def test_sigterm_during_a_large_entry_exits_0_quickly_and_a_restart_finishes_it(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",), settle=0)
    files = big_files(6000, 32 * 1024)          # ~190 MiB in 6,000 files: seconds to ingest
    drop(lay.inbox, "s1-big-1", files)
    d = daemons(lay.config_path)
    d.wait_for(r"claimed s1-big-1", 20)
    took = sigterm_ok(d, timeout=10)
    assert took < 5, f"took {took:.1f} s to stop"
    assert "abandoned s1-big-1" in d.text and "Traceback" not in d.text
    assert len(lay.records("claims")) == 1 and lay.manifests() == []
    assert os.listdir(lay.store() / "tmp") == []

    d2 = daemons(lay.config_path)
    d2.wait_for(r"resuming upload", 15)
    wait_until(lambda: done(lay, "s1-big-1"), 60, "the resumed entry")
    sigterm_ok(d2)
    (rec,) = lay.records("done")
    assert rec["files"] == 6000 and rec["new_versions"] == 6000
    assert len(lay.manifests()) == 1 and lay.records("claims") == []
    assert len(plain_files(lay.tree())) == 6000
    check_store(lay)


@pytest.mark.slow
def test_kill_9_mid_ingest_then_a_restart_finishes_without_duplicate_versions(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",), settle=0)
    drop(lay.inbox, "s1-small-1", {"a.txt": b"first"})
    drop(lay.inbox, "s1-big-1", big_files(4000, 32 * 1024))
    d = daemons(lay.config_path)
    d.wait_for(r"claimed s1-big-1", 20)
    time.sleep(0.3)
    d.proc.kill()
    d.wait_exit(5)
    assert done(lay, "s1-big-1") is None and len(lay.records("claims")) == 1

    d2 = daemons(lay.config_path)
    wait_until(lambda: done(lay, "s1-big-1"), 60, "the resumed entry")
    sigterm_ok(d2)
    assert "resuming upload" in d2.text
    assert [r["seq"] for r in sorted(lay.records("done"), key=lambda r: r["seq"])] == [1, 2]
    assert len(lay.manifests()) == 2 and lay.records("claims") == []
    tree = plain_files(lay.tree())
    assert len(tree) == 4001 and tree[b"a.txt"] == b"first"
    versioned = [n for n in os.listdir(lay.tree() / "d000") if "~v" in n]
    assert len(versioned) == 100 and not any("~v0002~" in n for n in versioned)
    check_store(lay)


def test_a_second_daemon_names_the_running_one_and_exits_3_while_ingest_once_still_works(tmp_path, daemons):
    lay = daemon_layout(tmp_path)
    d = daemons(lay.config_path).started()
    res = run_cli("ingest", config=lay.config_path, timeout=30)
    assert res.returncode == 3, res.stderr
    line = one_line_error(res)
    assert f"pid {d.pid}" in line and "s1" in line and "s2" in line, line
    res = run_cli("ingest", "--study", "s2", config=lay.config_path, timeout=30)
    assert res.returncode == 3 and f"study s2: an ingest daemon is already running (pid {d.pid})" in \
        one_line_error(res)
    # --once takes no daemon lock: it only waits for a store while the daemon writes to it.
    res = run_cli("ingest", "--once", config=lay.config_path, timeout=30)
    assert res.returncode == 0, res.stderr
    sigterm_ok(d)


def test_a_worker_that_fails_logs_one_line_backs_off_and_recovers_while_others_go_on(tmp_path, daemons):
    lay = daemon_layout(tmp_path)
    away = tmp_path / "s1-store-away"
    os.rename(lay.store("s1"), away)
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"a"})
    d = daemons(lay.config_path).started()
    line = d.wait_for(r"study s1: .*not an eidetic store.*; retrying in 1 s")
    assert "error: " in line
    drop(lay.inbox, "s2-labA-1", {"b.txt": b"b"})
    wait_until(lambda: done(lay, "s2-labA-1"), 10, "the other study's entry")
    os.rename(away, lay.store("s1"))
    wait_until(lambda: done(lay, "s1-labA-1"), 15, "the entry after the store came back")
    sigterm_ok(d)
    assert "Traceback" not in d.text
    check_store(lay, "s1")


def test_a_worker_retired_at_reload_before_it_opened_its_store_does_not_open_it_to_close_it(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",))
    os.rename(lay.store("s1"), tmp_path / "s1-store-away")
    d = daemons(lay.config_path).started()
    d.wait_for(r"study s1: .*not an eidetic store.*; retrying in 1 s")
    set_study(lay, "s1", require_description=True)
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded .*changed s1")
    sigterm_ok(d)
    assert "closing the store" not in d.text, d.text


def test_sigterm_while_another_process_holds_a_store_lock_still_stops_at_once(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",))
    fd = os.open(lay.store() / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # as `eidetic ingest --once` would while it writes
        d = daemons(lay.config_path).started()
        d.wait_for(r"study s1: another eidetic process is writing to the store; waiting")
        assert sigterm_ok(d, timeout=5) < 3
    finally:
        os.close(fd)


# ------------------------------------------------------------ a flood

@pytest.mark.slow
def test_a_thousand_entries_are_ingested_in_order_with_flat_memory(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",), settle=0.2)
    d = daemons(lay.config_path, verbose=False).started()
    n = 1000
    rss_early = None
    for i in range(n):
        drop(lay.inbox, f"s1-lab-{i:04d}", {"data/trial.csv": f"{i}\n".encode() * (i % 50 + 1),
                                            f"data/only-{i}.txt": b"x"})
        if i == 200:
            wait_until(lambda: len(os.listdir(lay.state / "done")) >= 150, 30, "the first entries")
            rss_early = d.vm_kib("VmRSS")
    wait_until(lambda: len(os.listdir(lay.state / "done")) >= n, 90, "all entries", interval=0.2)
    hwm, rss_late = d.vm_kib("VmHWM"), d.vm_kib("VmRSS")
    print(f"RSS after ~150 entries {rss_early} KiB, after {n} {rss_late} KiB, peak {hwm} KiB")
    sigterm_ok(d)
    recs = sorted(lay.records("done"), key=lambda r: r["seq"])
    assert [r["original"] for r in recs] == [f"s1-lab-{i:04d}" for i in range(n)]
    assert lay.records("failed") == [] and lay.records("claims") == []
    assert hwm < 200 * 1024, f"peak RSS {hwm} KiB"
    assert rss_late < rss_early + 40 * 1024, (rss_early, rss_late)
    st = lay.open_store()
    assert st.index.applied()[0] == n
    assert [v.n for v in st.index.versions_of(b"data/trial.csv")] == list(range(1, n + 1))
    check_store(lay)


# -------------------------------------------------------------- reload

def test_sighup_serves_a_newly_configured_study_and_a_broken_config_keeps_the_old_one(tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",))
    d = daemons(lay.config_path).started()
    doc = json.loads(lay.config_path.read_text())
    doc["studies"]["s3"] = {"tree": str(tmp_path / "trees" / "s3"), "store": str(tmp_path / "stores" / "s3")}
    lay.config_path.write_text(json.dumps(doc))
    assert run_cli("init", config=lay.config_path).returncode == 0
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded .*added s3.*serving s1, s3")
    drop(lay.inbox, "s3-labA-1", {"new.txt": b"new study"})
    wait_until(lambda: done(lay, "s3-labA-1"), 10, "the new study's entry")
    assert plain_files(tmp_path / "trees" / "s3") == {b"new.txt": b"new study"}
    assert run_cli("ingest", "--study", "s3", config=lay.config_path).returncode == 3   # its lock is held

    good = lay.config_path.read_text()
    lay.config_path.write_text(good.replace('"studies"', '"studies": {}, "oops"', 1))
    d.signal(signal.SIGHUP)
    line = d.wait_for(r"reload failed")
    assert "keeping the running configuration" in line and "oops" in line
    drop(lay.inbox, "s1-labA-1", {"still.txt": b"running"})
    drop(lay.inbox, "s3-labA-2", {"new.txt": b"again"})
    wait_until(lambda: done(lay, "s1-labA-1") and done(lay, "s3-labA-2"), 10, "entries after a bad reload")

    # Changed (its own inbox now): its worker restarts and the new inbox is watched.
    doc["studies"]["s3"]["inbox"] = str(tmp_path / "inbox-s3")
    lay.config_path.write_text(json.dumps(doc))
    assert run_cli("init", config=lay.config_path).returncode == 0
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded .*changed s3")
    drop(tmp_path / "inbox-s3", "labB-1", {"own.txt": b"own inbox"})
    wait_until(lambda: done(lay, "labB-1"), 10, "the entry in the new inbox")
    d.wait_for(r"seen labB-1 in .*inbox-s3 \(study s3\)")

    # Removed again: its worker ends and its daemon lock is released.
    del doc["studies"]["s3"]
    lay.config_path.write_text(json.dumps(doc))
    d.signal(signal.SIGHUP)
    d.wait_for(r"reloaded .*removed s3.*serving s1$")
    state = StateDir(str(lay.state))
    assert state.daemon_pid("s3") is None and state.daemon_pid("s1") == d.pid
    sigterm_ok(d)
    assert "Traceback" not in d.text
    check_store(lay, "s1")


def test_a_study_another_daemon_serves_at_reload_is_never_served_without_its_lock_and_taken_up_later(
        tmp_path, daemons):
    lay = daemon_layout(tmp_path, studies=("s1",))
    a = daemons(lay.config_path).started()
    set_study(lay, "s3", init=True, tree=str(tmp_path / "trees" / "s3"), store=str(tmp_path / "stores" / "s3"))
    b = daemons(lay.config_path, "--study", "s3").started()
    a.signal(signal.SIGHUP)
    assert f"(pid {b.pid})" in a.wait_for(r"reload: study s3 is not served here")
    a.wait_for(r"reloaded .*serving s1$")

    # s3's settings change while b still serves it: a must not start a worker for it.
    set_study(lay, "s3", require_description=True)
    a.signal(signal.SIGHUP)
    b.signal(signal.SIGHUP)
    b.wait_for(r"reloaded .*changed s3")
    second = wait_until(lambda: reloads(a)[1:], 10, "a's second reload")[0]
    assert second.endswith("serving s1"), a.text
    state = StateDir(str(lay.state))
    assert state.daemon_pid("s3") == b.pid

    # Once b has gone, the next reload takes s3 up.
    sigterm_ok(b)
    a.signal(signal.SIGHUP)
    assert wait_until(lambda: reloads(a)[2:], 10, "a's third reload")[0].endswith("serving s1, s3"), a.text
    assert state.daemon_pid("s3") == a.pid
    set_study(lay, "s3", require_description=False)
    a.signal(signal.SIGHUP)
    assert re.search(r"changed s3.*serving s1, s3$",
                     wait_until(lambda: reloads(a)[3:], 10, "a's fourth reload")[0]), a.text
    drop(lay.inbox, "s3-labA-1", {"a.txt": b"taken up"})
    wait_until(lambda: done(lay, "s3-labA-1"), 10, "the entry of the study taken up")
    sigterm_ok(a)
    assert "Traceback" not in a.text + b.text


def test_polling_mode_ingests_too(tmp_path, daemons):
    lay = daemon_layout(tmp_path, polling=True)
    d = daemons(lay.config_path).started()
    assert "mode polling" in d.wait_for(r"started \(pid")
    time.sleep(1.0)     # past the start-up scan and the observer's first snapshot
    drop(lay.inbox, "s2-labA-1", {"p.txt": b"polled"})
    wait_until(lambda: done(lay, "s2-labA-1"), 10, "the entry")
    d.wait_for(r"seen s2-labA-1 ")      # from the observer, not the 30 s rescan
    sigterm_ok(d)
    assert plain_files(lay.tree("s2")) == {b"p.txt": b"polled"}


# --------------------------------------------------------- other uids

_UPLOAD = """
import os, sys
os.umask(0o022)
inbox, name = sys.argv[1], sys.argv[2]
partial = os.path.join(inbox, "." + name)
os.makedirs(os.path.join(partial, "d"))
with open(os.path.join(partial, "d", "f.txt"), "w") as f:
    f.write("from the uploader")
os.rename(partial, os.path.join(inbox, name))
"""


@pytest.mark.slow
def test_the_daemon_as_service_uid_ingests_an_uploader_uids_entry(world_tmp, nonroot_venv, daemons):
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to act as the uploader")
    srv = world_tmp / "srv"
    srv.mkdir()
    chown_tree(srv, DAEMON_UID)
    lay = make_layout(srv, studies=("s1",), settle_seconds=0.5, init=False)
    set_config(lay, rescan_seconds=30)
    os.chmod(lay.config_path, 0o644)
    eidetic = [str(nonroot_venv / "bin" / "eidetic")]
    res = run_as(DAEMON_UID, eidetic + ["--config", str(lay.config_path), "init"], cwd=world_tmp)
    assert res.returncode == 0, res.stderr
    d = daemons(lay.config_path, argv0=eidetic, cwd=world_tmp,
                prefix=["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups"],
                env=env_with(HOME="/nonexistent", PATH="/usr/bin:/bin")).started()
    res = run_as(UPLOADER_UID, [SYSTEM_PYTHON, "-c", _UPLOAD, str(lay.inbox), "s1-labA-1"], cwd=world_tmp)
    assert res.returncode == 0, res.stderr
    wait_until(lambda: done(lay, "s1-labA-1"), 15, "the uploader's entry")
    sigterm_ok(d)
    (kept,) = [n for n in os.listdir(lay.inbox) if n.startswith(".eidetic~done~")]
    st = os.lstat(lay.inbox / kept)
    assert (st.st_uid, stat.S_IMODE(st.st_mode) & 0o777) == (UPLOADER_UID, 0o755)   # the uploader keeps it
    assert plain_files(lay.tree()) == {b"d/f.txt": b"from the uploader"}
    assert os.lstat(lay.tree() / "d" / "f.txt").st_uid == DAEMON_UID
    assert os.lstat(lay.state / "daemon").st_uid == DAEMON_UID
    assert "Traceback" not in d.text
    check_store(lay)


# ------------------------------------------------------- two studies

@pytest.mark.slow
def test_a_slow_entry_in_one_study_does_not_delay_another_study(tmp_path, daemons):
    lay = daemon_layout(tmp_path, settle=0)
    drop(lay.inbox, "s1-big-1", big_files(5000, 32 * 1024))
    d = daemons(lay.config_path)
    d.wait_for(r"claimed s1-big-1", 20)
    drop(lay.inbox, "s2-small-1", {"s.txt": b"small"})
    wait_until(lambda: done(lay, "s2-small-1"), 10, "the small entry of s2")
    assert done(lay, "s1-big-1") is None, "the big entry finished first: not a useful test"
    wait_until(lambda: done(lay, "s1-big-1"), 60, "the big entry of s1")
    sigterm_ok(d)
    assert d.index_of(r"ingested s2-small-1") < d.index_of(r"ingested s1-big-1")
    check_store(lay, "s1")
    check_store(lay, "s2")


# ------------------------------------------------------------ systemd

def test_systemd_hears_ready_reloading_watchdog_and_stopping(tmp_path, daemons):
    lay = daemon_layout(tmp_path)
    sock = NotifySocket(tmp_path / "notify.sock")
    try:
        d = daemons(lay.config_path, env=env_with(NOTIFY_SOCKET=sock.path, WATCHDOG_USEC=200_000))
        wait_until(lambda: "READY=1" in sock.seen(), 15, "READY=1")
        assert any(m.startswith("STATUS=serving s1, s2") for m in sock.seen())
        time.sleep(1.0)
        assert sock.seen().count("WATCHDOG=1") >= 4          # every 0.1 s
        d.signal(signal.SIGHUP)
        wait_until(lambda: sock.seen().count("READY=1") == 2, 10, "READY=1 after the reload")
        seen = sock.seen()
        assert seen.index("RELOADING=1") < len(seen) - 1 - seen[::-1].index("READY=1")
        sigterm_ok(d)
        seen = sock.seen()
        assert "STOPPING=1" in seen and seen.index("STOPPING=1") > seen.index("RELOADING=1")
    finally:
        sock.close()


# ------------------------------------------------------------- mail

def test_a_refused_entry_sends_a_failure_mail_through_a_real_smtp_server(tmp_path, daemons):
    from smtp_peer import SMTPServer

    with SMTPServer(tmp_path / "smtp") as smtp:
        lay = daemon_layout(tmp_path / "srv", notify={"smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                                                      "sender": "eidetic@example.org",
                                                      "admin": ["admin@example.org"]})
        d = daemons(lay.config_path).started()
        assert "mail on" in d.wait_for(r"started \(pid")
        drop(lay.inbox, "nostudy-labA-1", {"x.txt": b"x"})
        (m,) = smtp.wait_for(1, timeout=15)
        sigterm_ok(d)
        # --once queues the same kind of mail and delivers it before it exits.
        drop(lay.inbox, "nostudy-labB-1", {"y.txt": b"y"})
        res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path)
        assert res.returncode == 1 and "FAILED nostudy-labB-1" in res.stderr
        assert len(smtp.received) == 2
        m2 = smtp.received[1]
    assert m.rcpt_tos == ["admin@example.org"]
    assert "nostudy-labA-1" in m.subject and "nostudy-labA-1" in m.body
    assert "nostudy-labB-1" in m2.subject


def test_a_filling_disk_mails_one_warning_per_crossing_while_the_daemon_ingests(tmp_path, daemons):
    """The whole chain: real uploads fill the study's file system through
    ingest; the daemon's mail goes to a real SMTP server once per crossing."""
    from smtp_peer import SMTPServer

    with small_tmpfs(tmp_path / "fs") as fsdir, SMTPServer(tmp_path / "smtp") as smtp:
        lay = daemon_layout(tmp_path / "srv", studies=("s1",),
                            notify={"smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                                    "sender": "eidetic@example.org", "admin": ["admin@example.org"]})
        set_study(lay, "s1", init=True, tree=str(fsdir / "tree"), store=str(fsdir / "store"),
                  notify=["pi@example.org"])

        def fill_to(percent: float) -> bytes:
            """Random content that takes the file system to about *percent*."""
            u = shutil.disk_usage(fsdir)
            return os.urandom(max(0, int((u.used + u.free) * percent / 100) - u.used))

        def disk_mails() -> list:
            return [m for m in smtp.received if "disk" in m.subject]

        d = daemons(lay.config_path).started()
        drop(lay.inbox, "s1-labA-1", {"small.bin": os.urandom(1000)})
        wait_until(lambda: done(lay, "s1-labA-1"), 10, "a first small upload")
        drop(lay.inbox, "s1-labA-2", {"big.bin": fill_to(91.5)})
        wait_until(lambda: done(lay, "s1-labA-2"), 15, "the upload that crosses 90%")
        (m,) = smtp.wait_for(1, timeout=15)
        assert "(warning at 90%)" in m.subject and sorted(m.rcpt_tos) == ["admin@example.org",
                                                                          "pi@example.org"]
        for n in (3, 4):     # more uploads above 90% but below 95%: silence
            drop(lay.inbox, f"s1-labA-{n}", {"more.bin": os.urandom(20_000)})
            wait_until(lambda n=n: done(lay, f"s1-labA-{n}"), 10, "an upload above 90%")
        drop(lay.inbox, "s1-labA-5", {"bigger.bin": fill_to(96.5)})
        wait_until(lambda: done(lay, "s1-labA-5"), 15, "the upload that crosses 95%")
        smtp.wait_for(2, timeout=15)
        time.sleep(1.0)       # a third mail, if any were wrongly sent, would have arrived
        sigterm_ok(d)
        subjects = [m.subject for m in disk_mails()]
    assert len(subjects) == 2, subjects
    assert "(warning at 95%)" in subjects[1]
    assert not [m for m in smtp.received if "FAILED" in m.subject]


# ------------------------------------------------------------- store faults

def test_a_full_disk_stops_the_study_without_failing_the_upload_and_freeing_space_resumes_it(tmp_path, daemons):
    """The study's disk fills up under an upload: it is not committed and not
    failed (no one need send it again); one log line and one mail say ingest
    stopped and why; once space is freed the daemon ingests it by itself."""
    from smtp_peer import SMTPServer

    with small_tmpfs(tmp_path / "fs", size="8m") as fsdir, SMTPServer(tmp_path / "smtp") as smtp:
        lay = daemon_layout(tmp_path / "srv", studies=("s1",),
                            notify={"smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                                    "sender": "eidetic@example.org", "admin": ["admin@example.org"]})
        set_study(lay, "s1", init=True, tree=str(fsdir / "tree"), store=str(fsdir / "store"))
        u = shutil.disk_usage(fsdir)
        filler = fsdir / "filler"
        filler.write_bytes(b"\0" * (u.free - (1 << 20)))          # 1 MiB left
        d = daemons(lay.config_path).started()
        drop(lay.inbox, "s1-labA-1", {"big.bin": os.urandom(3 << 20), "small.txt": b"small"})
        d.wait_for(r"study s1: stopped: .*disk is full", 15)
        (m,) = smtp.wait_for(1, timeout=15)
        assert m.subject == "[eidetic] s1: ingest stopped (disk full)" and "none is lost" in m.body
        time.sleep(2.5)                     # retries meanwhile: said once, never failed
        assert len([ln for ln in d.lines if "stopped:" in ln]) == 1
        assert not lay.records("failed") and len(lay.records("claims")) == 1
        assert lay.manifests() == []
        filler.unlink()
        wait_until(lambda: done(lay, "s1-labA-1"), 20, "the upload, once there is space")
        d.wait_for("study s1: ingesting again", 5)
        sigterm_ok(d)
        assert not [m for m in smtp.received if "FAILED" in m.subject]
        check_store(lay)
        from conftest import close_indexes
        close_indexes()


def test_a_failed_sync_pauses_the_study_until_a_reload(tmp_path, daemons):
    """fsyncgate: after a failed syncfs the daemon does not retry on its own
    (what reached the disk is unknown); entries wait, claimed, never failed;
    a reload (SIGHUP) after a person looked resumes the study."""
    lay = daemon_layout(tmp_path, studies=("s1",))
    d = daemons(lay.config_path, prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=syncfs",
                                         "-e", "inject=syncfs:error=EIO:when=1"]).started()
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"first"})
    d.wait_for(r"study s1: stopped: .*durable.*reloaded", 15)
    drop(lay.inbox, "s1-labA-2", {"b.txt": b"second"})
    time.sleep(2.0)
    assert lay.manifests() == [] and not lay.records("failed") and not lay.records("done")
    assert os.path.isdir(lay.inbox / "s1-labA-2")          # not even claimed while paused
    eidetic_pid = int(subprocess.run(["pgrep", "-P", str(d.pid)], capture_output=True,
                                     text=True).stdout.split()[0])
    os.kill(eidetic_pid, signal.SIGHUP)
    wait_until(lambda: done(lay, "s1-labA-1") and done(lay, "s1-labA-2"), 15, "both entries after the reload")
    os.kill(eidetic_pid, signal.SIGTERM)
    assert d.wait_exit(10) == 0
    check_store(lay)
