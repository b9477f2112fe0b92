"""Crash safety with real processes: ``eidetic ingest --once`` killed with
SIGKILL at repeatable points (strace fault injection: the Nth rename, link,
linkat, fsync or syncfs never happens, the process dies instead), at a
random moment, and two ingest processes racing on one config.  After each,
a plain ``eidetic ingest --once`` must leave every file arrived exactly
once, no duplicate versions, the tree complete and the store consistent.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from conftest import (
    check_store,
    clean_env,
    drop,
    eidetic_argv,
    make_layout,
    plain_files,
    run_cli,
)

from eidetic.core import layout as L
from eidetic.store.manifest import FileRecord, read_all

# --------------------------------------------------------------- workload

def _entry1() -> dict[bytes, bytes]:
    files = {}
    for i in range(12):
        files[b"raw/run%02d/trace.csv" % i] = b"t,%d\n" % i * (i + 1)
    for i in range(8):
        files[b"raw/run%02d/deep/er/still/meta.json" % i] = b'{"run": %d}' % i
    files[b"README.txt"] = b"entry one"
    files[b"same/a.bin"] = b"\x00" * 70000
    files[b"same/b.bin"] = b"\x00" * 70000          # same content as a.bin: one object
    files[b"empty"] = b""
    files[b"big.dat"] = bytes(range(256)) * (8 << 10)   # 2 MiB: the streaming path
    for i in range(6):
        files[b"notes/n%d~v0001~20260101T000000Z.txt" % i] = b"look-alike %d" % i
    return files


def _entry2() -> dict[bytes, bytes]:
    """A resend: most files identical, some changed, some new."""
    files = dict(_entry1())
    for i in range(0, 12, 3):
        files[b"raw/run%02d/trace.csv" % i] = b"changed %d\n" % i
    files[b"README.txt"] = b"entry two"
    files[b"new/x.txt"] = b"new in two"
    files[b"new/deeper/y.txt"] = b"also new"
    files[b"big.dat"] = bytes(range(255, -1, -1)) * (8 << 10)
    return files


ENTRIES = [("s1-labA-1", _entry1), ("s1-labA-2", _entry2)]


def _expected_versions() -> dict[bytes, list[bytes]]:
    out: dict[bytes, list[bytes]] = {}
    for _, make in ENTRIES:
        for p, c in make().items():
            vs = out.setdefault(p, [])
            if not vs or vs[-1] != c:
                vs.append(c)
    return out


def _prepare(base) -> object:
    lay = make_layout(base, studies=("s1",))
    for name, make in ENTRIES:
        drop(lay.inbox, name, make())
    return lay


def _assert_complete(lay) -> None:
    """Every file arrived exactly once, each version once, the tree complete."""
    expected = _expected_versions()
    manifests = lay.manifests()
    headers = [read_all(m)[0] for m in manifests]
    assert [h.entry for h in headers] == [n.encode() for n, _ in ENTRIES], "each entry exactly one upload"
    for m, (_, make) in zip(manifests, ENTRIES):
        recs = [r for r in read_all(m)[1] if isinstance(r, FileRecord)]
        assert sorted(r.path for r in recs) == sorted(make()), f"{m.name}: files missing or doubled"
    store = lay.open_store()
    got: dict[bytes, list[str]] = {}
    for v in store.index.iter_versions(b""):
        got.setdefault(v.path, []).append(v.blake3)
    from eidetic.core.hashing import hash_bytes
    assert got == {p: [hash_bytes(c) for c in cs] for p, cs in expected.items()}
    final = {p: cs[-1] for p, cs in expected.items()}
    assert plain_files(lay.tree()) == {L.tree_relpath(p): c for p, c in final.items()}
    n_versions = sum(len(cs) for cs in expected.values())
    assert len(_all_tree_files(lay)) == len(final) + n_versions
    assert lay.records("claims") == [] and lay.records("failed") == []
    assert len(lay.records("done")) == len(ENTRIES)
    names = sorted(os.listdir(lay.inbox))
    assert len(names) == len(ENTRIES) and all(n.startswith(".eidetic~done~") for n in names), names
    check_store(lay)


def _all_tree_files(lay) -> list[str]:
    return [os.path.join(d, f) for d, _, fs_ in os.walk(lay.tree()) for f in fs_]


def _rerun(lay) -> subprocess.CompletedProcess:
    res = lay.cli("ingest", "--once", "--settle", "0", timeout=120)
    assert res.returncode == 0, f"recovery run failed:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr
    return res


# ------------------------------------------------------------ strace kills

def _strace_usable() -> str | None:
    if shutil.which("strace") is None:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(["apt-get", "install", "-y", "-qq", "strace"], capture_output=True, timeout=300)
        if shutil.which("strace") is None:
            return "strace is not installed (apt-get install strace): repeatable kill points need it"
    r = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "true"], capture_output=True, timeout=60)
    if r.returncode != 0:
        return f"strace cannot trace here: {r.stderr.decode(errors='replace').strip()[:200]}"
    return None


SYSCALLS = ("rename", "link", "linkat", "fsync", "syncfs", "fdatasync")
# Kill points per syscall, spread evenly over a full run's calls.  fsync marks
# every metadata step (claim/done records, HEAD, manifest directory): all of
# them.  link is the manifest's commit point; fdatasync is the index's commit.
KILL_POINTS = {"rename": 12, "linkat": 6, "link": 2, "fsync": 18, "syncfs": 4, "fdatasync": 3}


@pytest.fixture(scope="module")
def syscall_counts(tmp_path_factory) -> dict[str, int]:
    """How often a full, uninterrupted run makes each syscall (strace -c)."""
    why = _strace_usable()
    if why:
        pytest.skip(why)
    return count_calls(tmp_path_factory, SYSCALLS)


def count_calls(tmp_path_factory, syscalls) -> dict[str, int]:
    """How often an uninterrupted ingest of the workload makes each of *syscalls* (strace -c)."""
    lay = _prepare(tmp_path_factory.mktemp("count"))
    out = tmp_path_factory.mktemp("count-out") / "strace.txt"
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-c", "-o", str(out), "-e", "trace=" + ",".join(syscalls)])
    assert res.returncode == 0, res.stderr
    _assert_complete(lay)
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[-1] in syscalls and parts[3].isdigit():
            counts[parts[-1]] = int(parts[3])
    from conftest import close_indexes
    close_indexes()
    return counts


def _kill_cases():
    for sc, k in KILL_POINTS.items():
        for i in range(k):
            yield pytest.param(sc, i, k, id=f"{sc}-{i + 1}of{k}")


@pytest.mark.slow
@pytest.mark.parametrize("syscall,i,k", list(_kill_cases()))
def test_ingest_killed_at_a_syscall_then_rerun_ingests_everything_exactly_once(tmp_path, syscall_counts,
                                                                            syscall, i, k):
    total = syscall_counts.get(syscall, 0)
    if total == 0:
        pytest.skip(f"a full ingest makes no {syscall} call")
    n = 1 + round(i * (total - 1) / max(k - 1, 1))
    lay = _prepare(tmp_path)
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                          "-e", f"inject={syscall}:signal=SIGKILL:when={n}"])
    assert res.returncode == -signal.SIGKILL, \
        f"not killed at {syscall} #{n} of {total}: rc={res.returncode}\n{res.stderr}"
    _rerun(lay)
    _assert_complete(lay)
    # A second recovery run finds nothing to do and changes nothing.
    before = sorted(_all_tree_files(lay)), len(lay.manifests())
    res = _rerun(lay)
    assert "nothing to ingest" in res.stdout
    assert (sorted(_all_tree_files(lay)), len(lay.manifests())) == before


@pytest.mark.slow
def test_ingest_killed_twice_in_a_row_then_rerun_ingests_everything_exactly_once(tmp_path, syscall_counts):
    """The recovery run itself is killed (at its first tree link), then a third run finishes."""
    lay = _prepare(tmp_path)
    half = max(1, syscall_counts["rename"] // 2)
    for syscall, n in (("rename", half), ("linkat", 2)):
        res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                      prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                              "-e", f"inject={syscall}:signal=SIGKILL:when={n}"])
        assert res.returncode == -signal.SIGKILL, res.stderr
    _rerun(lay)
    _assert_complete(lay)


# ------------------------------------------------------------ random kills

@pytest.mark.slow
def test_ingest_killed_after_a_random_delay_then_rerun_ingests_everything_exactly_once(tmp_path):
    seed = int(os.environ.get("EIDETIC_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    # How long an uninterrupted run takes here (start-up included).
    lay = _prepare(tmp_path / "timing")
    t0 = time.monotonic()
    _rerun(lay)
    full = time.monotonic() - t0
    for attempt in range(3):
        lay = _prepare(tmp_path / f"run{attempt}")
        delay = rng.uniform(0.0, full * 1.1)
        proc = subprocess.Popen(eidetic_argv() + ["--config", str(lay.config_path), "ingest", "--once",
                                                  "--settle", "0"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
        try:
            _rerun(lay)
            _assert_complete(lay)
        except AssertionError as e:
            raise AssertionError(f"seed {seed} (EIDETIC_CRASH_SEED), attempt {attempt}, "
                                 f"killed after {delay:.3f} s of ~{full:.3f} s: {e}") from e


# ------------------------------------------------------------- two writers

@pytest.mark.slow
def test_two_ingest_processes_at_once_ingest_every_entry_exactly_once(tmp_path):
    lay = make_layout(tmp_path)
    entries = {}
    for i in range(8):
        study = "s1" if i % 2 else "s2"
        name = f"{study}-lab{i}-1"
        entries[name] = study
        drop(lay.inbox, name, {b"d/%d/f%d.txt" % (i, j): b"%d-%d" % (i, j) * 100 for j in range(15)}
             | {b"shared.txt": b"same in every entry", b"who.txt": name.encode()})
    argv = eidetic_argv() + ["--config", str(lay.config_path), "ingest", "--once", "--settle", "0"]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "Traceback" not in err
    reported = [line.split()[1].rstrip(":") for out, _ in outs for line in out.splitlines()
                if line.startswith("ingested ")]
    assert sorted(reported) == sorted(entries), "each entry reported ingested exactly once"
    for study in ("s1", "s2"):
        mine = sorted(n for n, s in entries.items() if s == study)
        heads = sorted(read_all(m)[0].entry.decode() for m in lay.manifests(study))
        assert heads == mine
        files = plain_files(lay.tree(study))
        assert files[b"shared.txt"] == b"same in every entry"
        assert len(lay.open_store(study).index.versions_of(b"shared.txt")) == 1
        assert len(lay.open_store(study).index.versions_of(b"who.txt")) == len(mine)
        check_store(lay, study)
    assert len(lay.records("done")) == len(entries) and lay.records("claims") == []
