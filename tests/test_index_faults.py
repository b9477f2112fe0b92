"""The index is a cache, and every fault of it is said plainly.

Real stores, real damage, the real ``eidetic`` command line: for each kind
of damage (one fixture each) the readers (log, checkout, status) refuse
with exit 3 and the fsck --repair hint, or give the right answer, never a
wrong one and never exit 70; fsck names it; doing exactly what the hint says
makes log right and fsck clean; and ingest --once alone repairs it too.
Then readers beside a running ingest: whole uploads or nothing, a stopped
fsck that holds no lock, and a killed reader's slot.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Layout, clean_env, close_indexes, drop, eidetic_argv, make_layout, one_line_error

from eidetic.store.index import verify_file
from eidetic.server.ingest import Ingester

HINT = "run 'eidetic fsck --repair --study s1' (as the service user)"


# ------------------------------------------------------------------ a store

@dataclass
class Archive:
    lay: Layout
    old_data: Path          # data.mdb as it was after upload 1 of 3
    log: list               # `log s1:dir --json` of the healthy store
    status: dict            # what `status --json` says the store holds

    @property
    def data(self) -> Path:
        return self.lay.store() / "index" / "data.mdb"


def _uploads(n: int) -> list[dict]:
    """Three uploads, a few hundred versions: dir/ changes, new/ appears."""
    one = {f"dir/f{i:03d}.txt": b"one %d\n" % i for i in range(200)}
    two = {**{f"dir/f{i:03d}.txt": b"two %d\n" % i for i in range(150)},
           **{f"new/g{i:03d}.bin": b"g%d" % i * 40 for i in range(60)}}
    three = {f"dir/f{i:03d}.txt": b"three %d\n" % i for i in range(0, 200, 2)}
    return [one, two, three][:n]


LATEST_F001 = b"two 1\n"                # f001 changed in upload 2, not in 3


def _store_numbers(status_json: dict) -> dict:
    s1 = status_json["studies"]["s1"]
    return {k: s1[k] for k in ("uploads", "paths", "versions", "objects")}


@pytest.fixture
def archive(tmp_path) -> Archive:
    lay = make_layout(tmp_path, studies=("s1",))
    old = tmp_path / "data-after-upload-1.mdb"
    for i, files in enumerate(_uploads(3), 1):
        drop(lay.inbox, f"s1-labA-{i}", files)
        assert [r.outcome for r in lay.ingest()] == ["ingested"]
        if i == 1:
            close_indexes()
            shutil.copyfile(lay.store() / "index" / "data.mdb", old)
    close_indexes()
    log = lay.cli("log", "s1:dir", "--json")
    assert log.returncode == 0, log.stderr
    status = lay.cli("status", "--study", "s1", "--json")
    assert status.returncode == 0, status.stderr
    numbers = _store_numbers(json.loads(status.stdout))
    assert numbers == {"uploads": 3, "paths": 260, "versions": 510, "objects": 510}
    return Archive(lay, old, json.loads(log.stdout), numbers)


# ---------------------------------------------------------------- damage

def index_deleted(a: Archive) -> str:
    shutil.rmtree(a.lay.store() / "index")
    return "E041"


def data_truncated(a: Archive) -> str:
    os.truncate(a.data, a.data.stat().st_size // 2)
    return "E043"


def zero_filled(a: Archive) -> str:
    a.data.write_bytes(b"\0" * a.data.stat().st_size)
    return "E043"


def garbage_in_the_middle(a: Archive) -> str:
    """8 KiB of random bytes over the middle of data.mdb, moved a page at a time
    until they land on pages the index uses (LMDB's verifier then objects:
    garbage on a free page would change nothing)."""
    original = a.data.read_bytes()
    rnd = random.Random(20261204)
    middle = len(original) // 2 // 4096 * 4096
    for step in range(0, len(original) // 4096):
        off = middle + (step // 2 + 1) * 4096 * (1 if step % 2 else -1)
        if not 2 * 4096 <= off <= len(original) - 8192:
            continue
        with open(a.data, "r+b") as f:
            f.seek(off)
            f.write(rnd.randbytes(8192))
        if verify_file(str(a.data.parent)):
            return "E043"
        a.data.write_bytes(original)
    pytest.fail("no used page in the middle of data.mdb")


def older_copy_put_back(a: Archive) -> str:
    shutil.copyfile(a.old_data, a.data)      # over the file in place, as a restore from a backup would
    return "E044"


DAMAGE = [index_deleted, data_truncated, zero_filled, garbage_in_the_middle, older_copy_put_back]


def _refused(r: subprocess.CompletedProcess) -> bool:
    """Exit 3 with one line naming the study, what is wrong and the command that fixes it."""
    assert r.returncode != 70 and "Traceback" not in r.stderr, r.stderr
    if r.returncode != 3:
        return False
    line = one_line_error(r)
    assert line.startswith("eidetic: study s1: its index ") and line.endswith(HINT + " to rebuild it from "
                                                                                    "the manifests"), line
    return True


def _readers_refuse_or_are_right(a: Archive, tmp: Path) -> None:
    lay = a.lay
    r = lay.cli("log", "s1:dir", "--json")
    assert _refused(r) or (r.returncode == 0 and json.loads(r.stdout) == a.log), r.stderr
    out = tmp / "f001.txt"
    r = lay.cli("checkout", "s1:dir/f001.txt", "-o", out, "--force")
    assert _refused(r) or (r.returncode == 0 and out.read_bytes() == LATEST_F001), r.stderr
    r = lay.cli("status", "--study", "s1", "--json")
    assert r.returncode in (0, 3) and "Traceback" not in r.stderr, r.stderr
    s1 = json.loads(r.stdout)["studies"]["s1"]
    if r.returncode == 3:
        assert HINT in s1["index_error"] and s1["uploads"] is None     # unknown, never 0
    else:
        assert _store_numbers(json.loads(r.stdout)) == a.status


def _all_right(a: Archive) -> None:
    r = a.lay.cli("log", "s1:dir", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == a.log, r.stderr
    r = a.lay.cli("fsck", "--study", "s1", "--quick")
    assert r.returncode == 0 and r.stdout.startswith("fsck: clean"), r.stdout


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.__name__)
def test_a_damaged_index_is_refused_reported_and_rebuilt_by_doing_what_the_hint_says(archive, damage, tmp_path):
    code = damage(archive)
    _readers_refuse_or_are_right(archive, tmp_path)
    r = archive.lay.cli("fsck", "--study", "s1", "--quick")
    assert r.returncode == 1 and r.stdout.startswith(code + " "), r.stdout + r.stderr
    r = archive.lay.cli("fsck", "--repair", "--study", "s1")    # what the hint says, word for word
    assert r.returncode == 0, r.stdout + r.stderr
    _all_right(archive)


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda d: d.__name__)
def test_ingest_alone_repairs_a_damaged_index_and_says_so(archive, damage):
    damage(archive)
    r = archive.lay.cli("-v", "ingest", "--once", "--settle", "0")
    assert r.returncode == 0, r.stdout + r.stderr
    said = [ln for ln in r.stderr.splitlines() if "study s1: its index was" in ln]
    assert len(said) == 1 and ("rebuilt it from 3 manifest(s)" in said[0] or "caught it up" in said[0]), r.stderr
    _all_right(archive)


@pytest.mark.parametrize("inject, strerror", [
    ("writev:error=ENOSPC", "No space left on device"),      # LMDB writes its pages with writev
    ("fdatasync:error=EIO", "Input/output error"),          # and makes a commit durable with fdatasync
], ids=["disk_full", "io_error_at_sync"])
def test_an_index_that_cannot_be_written_stops_the_study_in_one_line_and_the_next_run_finishes(tmp_path, inject,
                                                                                               strerror):
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    lay = make_layout(tmp_path, studies=("s1",))
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"one\n"})
    assert [r.outcome for r in lay.ingest()] == ["ingested"]
    close_indexes()
    drop(lay.inbox, "s1-labA-2", {"a.txt": b"two\n"})
    syscall = inject.split(":")[0]
    r = lay.cli("ingest", "--once", "--settle", "0",
                prefix=["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", f"trace={syscall}",
                        "-e", f"inject={inject}"])
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert f"eidetic: study s1: the index could not be written ({strerror}; {lay.store() / 'index'}): " \
        in r.stderr.splitlines()[0], r.stderr
    assert _refused(lay.cli("log", "s1:a.txt"))       # committed, not applied: readers wait for it whole
    r = lay.cli("ingest", "--once", "--settle", "0")
    assert r.returncode == 0 and "ingested s1-labA-2" in r.stdout, r.stdout + r.stderr
    r = lay.cli("log", "s1:a.txt", "--json")
    assert r.returncode == 0 and [e["version"] for e in json.loads(r.stdout)] == [2, 1]


def test_a_writer_that_keeps_the_index_open_writes_to_the_one_fsck_repair_swapped_in(tmp_path):
    lay = make_layout(tmp_path, studies=("s1",))
    ingester = Ingester(lay.cfg)       # like the daemon: its store and LMDB environment stay open
    try:
        drop(lay.inbox, "s1-labA-1", {"a.txt": b"one\n"})
        assert [r.outcome for r in ingester.run_once(settle_seconds=0)] == ["ingested"]
        shutil.rmtree(lay.store() / "index")          # (the open environment keeps its files)
        r = lay.cli("fsck", "--repair", "--study", "s1")
        assert r.returncode == 0 and "rebuilt the index from 1 manifest(s)" in r.stdout, r.stdout + r.stderr
        drop(lay.inbox, "s1-labA-2", {"a.txt": b"two\n"})
        assert [r.outcome for r in ingester.run_once(settle_seconds=0)] == ["ingested"]
    finally:
        ingester.close()
    r = lay.cli("log", "s1:a.txt", "--json")
    assert r.returncode == 0 and [e["version"] for e in json.loads(r.stdout)] == [2, 1], r.stderr
    r = lay.cli("fsck", "--study", "s1", "--quick")
    assert r.returncode == 0, r.stdout


def test_a_study_with_uploads_never_shows_0_versions_without_an_index(archive):
    index_deleted(archive)
    r = archive.lay.cli("log", "s1:")
    assert _refused(r)
    assert not (archive.lay.store() / "index").exists()      # readers make nothing


def test_a_study_with_no_upload_and_no_index_file_shows_empty_and_gets_none(tmp_path):
    lay = make_layout(tmp_path, studies=("s1",))
    assert (lay.store() / "index" / "data.mdb").exists()        # init makes it, as its owner
    shutil.rmtree(lay.store() / "index")                        # (a store made before it did)
    r = lay.cli("log", "s1:")
    assert r.returncode == 0 and "0 versions" in r.stdout, r.stderr
    r = lay.cli("status", "--study", "s1", "--json")
    assert r.returncode == 0 and _store_numbers(json.loads(r.stdout)) == {"uploads": 0, "paths": 0,
                                                                          "versions": 0, "objects": 0}
    assert not (lay.store() / "index").exists()


def test_readers_make_no_lock_file_for_an_index_that_has_none(archive):
    """lock.mdb made by root running log would lock the service user out of its index."""
    (archive.lay.store() / "index" / "lock.mdb").unlink()
    before = sorted(os.listdir(archive.lay.store() / "index"))     # data.mdb and the writer's verdict
    assert "data.mdb" in before
    r = archive.lay.cli("log", "s1:dir", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == archive.log, r.stderr
    r = archive.lay.cli("fsck", "--study", "s1", "--quick")
    assert r.returncode == 0, r.stdout
    assert sorted(os.listdir(archive.lay.store() / "index")) == before    # readers made nothing


# ------------------------------------------------------ beside an ingest

BIG = 30_000


def _poll_log(lay: Layout, stop: threading.Event, seen: list, problems: list) -> None:
    """`log s1:dir --json` every 100 ms: how many of the big upload's files each shows."""
    while True:
        last = stop.is_set()
        head = (lay.store() / "HEAD").read_text().split()[0]
        r = lay.cli("log", "s1:dir", "--json")
        if r.returncode != 0:
            problems.append(f"log exit {r.returncode}: {r.stderr.strip()}")
        else:
            entries = json.loads(r.stdout)
            if any(e["upload"] == "?" for e in entries):
                problems.append("an entry with upload '?'")
            seen.append((head, sum(1 for e in entries if e["path"].startswith("dir/big/"))))
        if last:
            return
        time.sleep(0.1)


def _poll_fsck(lay: Layout, stop: threading.Event, runs: list, problems: list) -> None:
    while not stop.is_set():
        r = lay.cli("fsck", "--study", "s1", "--quick")
        runs.append(r.returncode)
        if r.returncode != 0 or not r.stdout.startswith("fsck: clean"):
            problems.append(f"fsck exit {r.returncode}: {r.stdout.strip()} {r.stderr.strip()}")


def _big_upload(tmp_path) -> Layout:
    lay = make_layout(tmp_path, studies=("s1",))
    drop(lay.inbox, "s1-labA-1", {"dir/seed.txt": b"seed"})
    assert [r.outcome for r in lay.ingest()] == ["ingested"]
    close_indexes()
    drop(lay.inbox, "s1-labA-2", {f"dir/big/d{i % 100:02d}/f{i:05d}": b"%d" % i for i in range(BIG)})
    return lay


SLOW_DISK = ["strace", "-f", "-qq", "--seccomp-bpf", "-o", "/dev/null", "-e", "trace=fdatasync,fsync",
             "-e", "inject=fdatasync,fsync:delay_enter=300ms"]


@pytest.mark.parametrize("disk", ["plain", "slow_fsync"])
def test_readers_beside_an_ingest_of_30000_files_see_whole_uploads_and_fsck_finds_nothing(tmp_path, disk):
    """log polls every 100 ms and fsck --quick runs again and again while one
    upload of 30,000 files is ingested (its index applied in 6 chunks; with
    every fsync and fdatasync slowed to 300 ms, the chunks take seconds)."""
    if disk == "slow_fsync" and shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    lay = _big_upload(tmp_path)
    stop = threading.Event()
    seen: list = []
    runs: list = []
    problems: list = []
    pollers = [threading.Thread(target=_poll_log, args=(lay, stop, seen, problems)),
               threading.Thread(target=_poll_fsck, args=(lay, stop, runs, problems))]
    prefix = SLOW_DISK if disk == "slow_fsync" else []
    ingest = subprocess.Popen([*prefix, *eidetic_argv(), "--config", str(lay.config_path), "ingest", "--once",
                               "--settle", "0"], env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for t in pollers:
        t.start()
    out, err = ingest.communicate(timeout=180)
    stop.set()
    for t in pollers:
        t.join(60)
    assert ingest.returncode == 0, err
    assert problems == []
    assert {n for _, n in seen} <= {0, BIG} and seen[-1][1] == BIG, seen
    assert len(seen) >= 3 and len(runs) >= 2, (seen, runs)
    if disk == "slow_fsync":
        # Some poll ran while the upload was committed (HEAD 2) but not yet applied whole: it saw none of it.
        assert ("2", 0) in seen, seen


def test_a_stopped_fsck_holds_no_lock_and_is_clean_after_an_ingest_beside_it(archive, tmp_path):
    lay = archive.lay
    fscktmp = tmp_path / "fscktmp"
    fscktmp.mkdir()
    fsck = subprocess.Popen([*eidetic_argv(), "--config", str(lay.config_path), "fsck", "--study", "s1"],
                            env=clean_env(TMPDIR=str(fscktmp)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 30
        while not any((d / "index" / "data.mdb").exists() for d in fscktmp.iterdir()):   # its fresh index
            assert fsck.poll() is None and time.monotonic() < deadline, "fsck ended before it could be stopped"
            time.sleep(0.005)
        time.sleep(0.05)
        fsck.send_signal(signal.SIGSTOP)
        drop(lay.inbox, "s1-labB-4", {"dir/f001.txt": b"four\n", "added/h.txt": b"h\n"})
        t0 = time.monotonic()
        r = lay.cli("ingest", "--once", "--settle", "0", timeout=60)
        took = time.monotonic() - t0
        assert r.returncode == 0 and "ingested s1-labB-4" in r.stdout, r.stdout + r.stderr
        assert took < 20, took
    finally:
        fsck.send_signal(signal.SIGCONT)
    out, err = fsck.communicate(timeout=120)
    assert fsck.returncode == 0 and out.startswith("fsck: clean"), out + err


READER = """
import sys, time
from eidetic.server.config import load
from eidetic.store.store import Store
store = Store.open(*load(sys.argv[1]).study("s1").store_args())
txn = store.index.begin_read() if sys.argv[2] == "txn" else None
print("ready", flush=True)
for line in sys.stdin:
    print(store.index.env.readers().replace("\\n", "|"), flush=True)
"""


def test_a_reader_killed_mid_read_leaves_no_reader_slot_once_a_command_opened_the_index(archive):
    """A reader slot held by a dead process stops LMDB reusing the pages of its
    snapshot (the index grows); any eidetic command opening the index clears it."""
    cfg = str(archive.lay.config_path)

    def start(mode: str) -> subprocess.Popen:
        p = subprocess.Popen([*_python(), "-c", READER, cfg, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=clean_env())
        assert p.stdout.readline().strip() == "ready"
        return p

    def readers() -> str:
        watcher.stdin.write("readers\n")
        watcher.stdin.flush()
        return watcher.stdout.readline()

    watcher = start("none")         # keeps the environment open, so no open resets the reader table
    killed = start("txn")
    try:
        assert f" {killed.pid} " in f" {readers()} "       # it reads, in a slot of its own
        killed.kill()
        killed.wait()
        assert f" {killed.pid} " in f" {readers()} "       # dead, its slot is still taken
        r = archive.lay.cli("log", "s1:dir/f001.txt")
        assert r.returncode == 0, r.stderr
        assert f" {killed.pid} " not in f" {readers()} "
    finally:
        watcher.kill()
        watcher.wait()


def _python() -> list[str]:
    argv = eidetic_argv()
    if len(argv) == 1:          # the console script: its interpreter is the venv's
        return [str(Path(argv[0]).parent / "python")]
    return argv[:1]
