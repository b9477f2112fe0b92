"""Faults never lie: I/O errors and a full disk at single system calls.

``eidetic ingest --once`` runs under strace, which makes the Nth call of one
system call fail with EIO or ENOSPC (``-e inject=fsync:error=EIO:when=N``),
sampled over a small two-entry ingest; and on a small tmpfs filled to 50-99 %.
After each run, what it reported must be true (store_format.md, "Faults"):

* never "failed" and visible: an entry recorded or reported failed has no
  manifest; an entry whose upload is committed is done, or still claimed
  and reported "committed, finishing later";
* nothing lost: an entry that is not committed is still in the inbox (under
  its own, claimed or failed name) with every file intact;
* no internal error (exit 70) and no traceback; exit 3 names the study.

Then a plain re-run finishes everything exactly once and fsck is clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from conftest import close_indexes, drop, make_layout, run_cli, tree_files
from daemon_helpers import set_study, small_tmpfs
from test_crash import ENTRIES, _assert_complete, _prepare, _rerun, _strace_usable, count_calls

from eidetic.server.inbox import Claim, StateDir
from eidetic.store.manifest import read_all

# Points per system call, spread over a full run's calls; the i-th point
# injects EIO when i is even, ENOSPC when odd, so both errors meet every call.
# fsync: claim/done records, HEAD, manifests/ (the commit point's directory
# sync); syncfs: objects + manifest before the link, tree names after;
# fdatasync: the index's commits; link: the manifest's commit point; linkat:
# tree names; rename: objects, records, entry renames; unlink: the manifest's
# temp after its link; write: objects, manifests, records; pwrite64: the
# index's pages; mkdir: object shards and tree folders.
FAULT_POINTS = {"fsync": 8, "syncfs": 4, "fdatasync": 3, "link": 2, "linkat": 4, "rename": 8,
                "unlink": 3, "write": 6, "pwrite64": 2, "mkdir": 3}
ERRORS = ("EIO", "ENOSPC")


@pytest.fixture(scope="module")
def call_counts(tmp_path_factory) -> dict[str, int]:
    """How often an uninterrupted run makes each system call (strace -c)."""
    why = _strace_usable()
    if why:
        pytest.skip(why)
    return count_calls(tmp_path_factory, FAULT_POINTS)


def _cases():
    for sc, k in FAULT_POINTS.items():
        for i in range(k):
            yield pytest.param(sc, i, k, ERRORS[i % 2], id=f"{sc}-{i + 1}of{k}-{ERRORS[i % 2]}")


def _committed_uploads(lay, study: str = "s1") -> set[str]:
    out = set()
    for m in lay.manifests(study):
        out.add(read_all(m)[0].upload)
    return out


def _entry_dirs(lay) -> dict[bytes, bytes]:
    """Where each workload entry is in the inbox now (any of its names), by original name."""
    state = StateDir(lay.cfg.state)
    where: dict[bytes, bytes] = {}
    for kind in ("claims", "failed", "done"):
        for d in state.list(kind):
            cl = Claim.from_json(d)
            found = state.locate(cl)
            if found is not None:
                where[cl.original] = found[1]
    for name, _ in ENTRIES:
        p = os.fsencode(lay.inbox / name)
        if os.path.isdir(p):
            where.setdefault(name.encode(), p)
    return where


def assert_truthful(lay, res: subprocess.CompletedProcess) -> None:
    """What a run that met a fault left, and said, is true."""
    assert res.returncode in (0, 1, 3), f"exit {res.returncode}:\n{res.stdout}\n{res.stderr}"
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    if res.returncode == 3:     # a study's fault names it; a fault writing the report itself names none
        assert "study s1:" in res.stderr or res.stderr.strip() in (
            "eidetic: Input/output error", "eidetic: No space left on device"), res.stderr
    committed = _committed_uploads(lay)
    state = StateDir(lay.cfg.state)
    for d in state.list("failed"):
        assert d["upload"] not in committed, f"upload {d['upload']} recorded failed yet committed"
    assert "FAILED" not in res.stderr, f"an entry was failed by a fault of the store:\n{res.stderr}"
    claimed_committed = [d for d in state.list("claims") if d["upload"] in committed]
    if claimed_committed:      # committed but not done: the run must have said so
        assert "finishing later" in res.stdout or "committed" in res.stderr, res.stdout + res.stderr
    # Nothing lost: an entry that is not committed is in the inbox, whole.
    done_or_committed = {Claim.from_json(d).original for d in state.list("done")}
    done_or_committed |= {Claim.from_json(d).original for d in state.list("claims") if d["upload"] in committed}
    where = _entry_dirs(lay)
    for name, make in ENTRIES:
        if name.encode() in done_or_committed:
            continue
        assert name.encode() in where, f"entry {name} is neither committed nor in the inbox"
        assert tree_files(where[name.encode()]) == make(), f"entry {name}: its files changed"


@pytest.mark.slow
@pytest.mark.parametrize("syscall,i,k,error", list(_cases()))
def test_an_io_error_or_full_disk_at_a_system_call_is_reported_truthfully_and_a_rerun_finishes(
        tmp_path, call_counts, syscall, i, k, error):
    total = call_counts.get(syscall, 0)
    if total == 0:
        pytest.skip(f"a full ingest makes no {syscall} call")
    n = 1 + round(i * (total - 1) / max(k - 1, 1))
    lay = _prepare(tmp_path)
    trace = tmp_path / "strace.txt"
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-o", str(trace), "-e", f"trace={syscall}",
                          "-e", f"inject={syscall}:error={error}:when={n}"])
    # strace counts the Nth call per tracee (thread or child process) while
    # strace -c counts them all: a fault that met no call proves nothing
    # (a child's ldconfig -p once took the last writes' points).
    assert "(INJECTED)" in trace.read_text(errors="replace"), f"no {syscall} #{n} of {total} was made"
    try:
        assert_truthful(lay, res)
        _rerun(lay)
        _assert_complete(lay)
    except AssertionError as e:
        raise AssertionError(f"{error} at {syscall} #{n} of {total}: {e}\n--- first run:\n"
                             f"{res.stdout}\n{res.stderr}") from e


@pytest.mark.slow
def test_a_failed_sync_stops_the_study_and_the_entry_waits_in_the_inbox(tmp_path, call_counts):
    """fsyncgate: the syncfs before the commit point fails; nothing is
    committed, the entry is kept claimed (no one need send it again), the
    run exits 3 with one line saying what to do, and a re-run ingests it."""
    lay = make_layout(tmp_path, studies=("s1",))
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"one", "b/c.txt": b"two"})
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=syncfs",
                          "-e", "inject=syncfs:error=EIO:when=1"])
    assert res.returncode == 3, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("eidetic:")]
    assert len(lines) == 1 and "study s1:" in lines[0] and "durable" in lines[0], res.stderr
    assert "was not committed" in res.stderr and "takes it again" in res.stderr
    assert lay.manifests() == [] and os.listdir(lay.store() / "tmp") == []
    assert len(lay.records("claims")) == 1 and lay.records("failed") == []
    fault = StateDir(lay.cfg.state).fault("s1")            # for eidetic status, until it is over
    assert fault is not None and fault["sync_failed"] and "durable" in fault["message"]
    st = lay.cli("status")
    assert st.returncode == 3 and f"  STOPPED      since {fault['since']}: {fault['message']}" in st.stdout
    assert json.loads(lay.cli("status", "--json").stdout)["studies"]["s1"]["fault"] == fault
    assert 'eidetic_store_fault{study="s1"} 1' in lay.cli("status", "--prometheus").stdout
    res = lay.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0 and "ingested s1-labA-1" in res.stdout, res.stdout + res.stderr
    assert StateDir(lay.cfg.state).fault("s1") is None
    st = lay.cli("status")
    assert st.returncode == 0 and "STOPPED" not in st.stdout
    assert lay.cli("fsck").returncode == 0


@pytest.mark.slow
def test_an_error_after_the_commit_point_reports_committed_never_failed(tmp_path, call_counts):
    """EIO at the fsync of manifests/ right after the manifest's link: the
    upload is committed, so the run says 'finishing later' (exit 3), never
    FAILED, and no mail-worthy failure is recorded; the re-run finishes it
    as the same upload (no duplicate)."""
    lay = make_layout(tmp_path, studies=("s1",))
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"one"})
    # fsyncs of one entry's run: claim record, manifests/ dir, HEAD temp, HEAD dir ...
    # find the one right after the link by tracing link then fsync in order.
    trace = tmp_path / "trace.txt"
    probe = make_layout(tmp_path / "probe", studies=("s1",))
    drop(probe.inbox, "s1-labA-1", {"a.txt": b"one"})
    run_cli("ingest", "--once", "--settle", "0", config=probe.config_path,
            prefix=["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=link,fsync"])
    calls = [ln for ln in trace.read_text().splitlines() if " link(" in ln or " fsync(" in ln or
             ln.startswith(("link(", "fsync("))]
    link_at = next(i for i, ln in enumerate(calls) if "link(" in ln and "manifests" in ln)
    n = sum(1 for ln in calls[: link_at + 1] if "fsync(" in ln) + 1   # the first fsync after the link
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=fsync",
                          "-e", f"inject=fsync:error=EIO:when={n}"])
    assert res.returncode == 3, res.stdout + res.stderr
    assert "FAILED" not in res.stderr and lay.records("failed") == []
    assert "committed s1-labA-1" in res.stdout and "finishing later" in res.stdout
    assert "is committed" in res.stderr
    [upload] = _committed_uploads(lay)
    res = lay.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stderr
    assert _committed_uploads(lay) == {upload} and len(lay.manifests()) == 1
    assert [d["upload"] for d in lay.records("done")] == [upload]
    assert lay.cli("fsck").returncode == 0


# ------------------------------------------------------------ a filling disk

@pytest.mark.slow
@pytest.mark.parametrize("percent", [50, 75, 90, 95, 99])
def test_a_disk_filled_to_a_step_never_fails_an_entry_and_a_rerun_with_space_finishes(tmp_path, percent):
    """The study's store and tree on a 12 MiB tmpfs filled to *percent*
    before a ~4 MiB two-entry ingest: whatever fits is done, the rest waits
    in the inbox; once space is freed a plain re-run finishes everything."""
    with small_tmpfs(tmp_path / "fs", size="12m") as fsdir:
        lay = make_layout(tmp_path / "l", studies=("s1",))
        set_study(lay, "s1", init=True, tree=str(fsdir / "tree"), store=str(fsdir / "store"))
        for name, make in ENTRIES:
            drop(lay.inbox, name, make())
        u = shutil.disk_usage(fsdir)
        filler = fsdir / "filler"
        filler.write_bytes(b"\0" * max(0, int((u.used + u.free) * percent / 100) - u.used))
        res = lay.cli("ingest", "--once", "--settle", "0")
        assert_truthful(lay, res)
        if percent >= 75:       # the second entry's 2 MiB object cannot fit
            assert res.returncode == 3 and "disk is full" in res.stderr, res.stdout + res.stderr
        filler.unlink()
        try:
            _rerun(lay)
            _assert_complete(lay)
        finally:
            close_indexes()     # the tmpfs cannot be unmounted while an index is mapped
