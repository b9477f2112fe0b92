"""Ingest checks an entry against the sender's upload description
(store_format.md, "Upload descriptions"): entries are built the way
``eidetic send`` builds them (files, then a description written with
DescriptionWriter from the bytes on disk, then the rename), ingested for
real, and inspected through the store, the state records, the CLI and fsck.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest
from conftest import Layout, check_store, fs, make_layout, plain_files, run_cli, tree_files

from eidetic.server import config as C
from eidetic.core import layout as L
from eidetic.core.description import (DESCRIPTION_NAME, DescribedFile, DescriptionHeader, DescriptionWriter,
                                 walk_key)
from eidetic.store.manifest import FileRecord, read_all
from eidetic.core.hashing import hash_bytes

CLIENT = "eidetic 0.2.0"


def now_iso() -> str:
    return L.utc_iso(datetime.now(timezone.utc))


def regular_files(top: bytes) -> list[bytes]:
    """Relative paths of the regular files under *top* (no links followed), walk order."""
    out = []
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            p = dirpath + b"/" + name
            if stat.S_ISREG(os.lstat(p).st_mode):
                out.append(p[len(top) + 1:])
    return sorted((p for p in out if p != DESCRIPTION_NAME), key=walk_key)


def write_description(top: bytes, study: str = "s1", location: str = "labA", **header) -> bytes:
    """Describe the regular files now under *top*, as ``eidetic send`` does."""
    fields = dict(client=CLIENT, study=study, location=location, user="jdoe", host="LAB-PC-3",
                  platform="Linux-6.1-x86_64", started=now_iso(), source="/home/jdoe/study")
    fields.update(header)
    with open(top + b"/" + DESCRIPTION_NAME, "wb") as f:
        w = DescriptionWriter(f, DescriptionHeader(**fields))
        for rel in regular_files(top):
            data = Path(os.fsdecode(top + b"/" + rel)).read_bytes()
            w.add(DescribedFile(rel, len(data), os.lstat(top + b"/" + rel).st_mtime_ns, hash_bytes(data)))
        w.finish(now_iso())
    return Path(os.fsdecode(top + b"/" + DESCRIPTION_NAME)).read_bytes()


def send(inbox, name: str | bytes, files: dict, *, study: str = "s1", location: str = "labA",
         after: Callable[[bytes], None] | None = None, describe: bool = True, **header) -> bytes:
    """Write *files* under ``.<name>``, describe them, let *after(partial)*
    change things behind the description's back, then rename: returns the
    final path of the entry."""
    partial = fs(inbox) + b"/." + fs(name)
    os.mkdir(partial)
    for rel, data in files.items():
        p = partial + b"/" + fs(rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    if describe:
        write_description(partial, study, location, **header)
    if after is not None:
        after(partial)
    final = fs(inbox) + b"/" + fs(name)
    os.rename(partial, final)
    return final


def one_result(lay: Layout, outcome: str, **kw):
    (r,) = lay.ingest(**kw)
    assert r.outcome == outcome, r
    return r


def assert_failed_and_kept(lay: Layout, r, expect_files: dict[bytes, bytes]) -> str:
    """Nothing of the entry is visible; it sits at its failed name, data intact;
    the state record holds the same reason.  Returns the reason."""
    assert lay.manifests() == [] and tree_files(lay.tree()) == {}
    failed = [n for n in os.listdir(fs(lay.inbox)) if n.startswith(b".eidetic~failed~")]
    assert len(failed) == 1, os.listdir(fs(lay.inbox))
    kept = fs(lay.inbox) + b"/" + failed[0]
    for rel, data in expect_files.items():
        assert Path(os.fsdecode(kept + b"/" + rel)).read_bytes() == data
    (rec,) = lay.records("failed")
    assert rec["reason"] == r.reason
    assert lay.records("done") == [] and lay.records("claims") == []
    assert not r.verified
    return r.reason


FILES = {b"eprime/s1.txt": b"trial,rt\n1,512\n", b"eprime/s2.txt": b"trial,rt\n1,498\n",
         b"raw/big.bin": bytes(range(256)) * 8192, b"empty": b"", b"README": b"study foo"}


# ------------------------------------------------------------- success

def test_a_matching_described_entry_is_ingested_with_its_provenance(layout):
    desc = None

    def keep(partial):
        nonlocal desc
        desc = Path(os.fsdecode(partial + b"/" + DESCRIPTION_NAME)).read_bytes()

    send(layout.inbox, "s1-labA-20261121T205041Z-7f3a", FILES, after=keep)
    r = one_result(layout, "ingested")
    assert r.verified and r.files == len(FILES)
    assert layout.records("done")[0]["verified"] is True

    header, recs, _ = read_all(layout.manifests()[0])
    assert header.version == 2
    d = header.description
    assert d["blake3"] == hash_bytes(desc) and d["size"] == len(desc)
    assert (d["client"], d["location"], d["user"], d["host"], d["source"]) == \
        (CLIENT, "labA", "jdoe", "LAB-PC-3", "/home/jdoe/study")
    L.parse_utc_iso(d["started"]), L.parse_utc_iso(d["ended"])
    # The claim is archived as an object, but it is not a path of the upload.
    assert (layout.store() / "objects" / d["blake3"][:2] / d["blake3"][2:]).read_bytes() == desc
    assert sorted(r.path for r in recs if isinstance(r, FileRecord)) == sorted(FILES)
    assert plain_files(layout.tree()) == FILES
    check_store(layout)

    res = layout.cli("log", "-w", "s1:eprime/s1.txt")
    assert res.returncode == 0, res.stderr
    assert "from labA by jdoe@LAB-PC-3 (eidetic 0.2.0), verified" in res.stdout
    res = layout.cli("log", "--json", "s1:eprime")
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)
    assert len(entries) == 2
    for e in entries:
        p = e["provenance"]
        assert p["verified"] is True
        assert (p["location"], p["user"], p["host"], p["client"], p["folder"]) == \
            ("labA", "jdoe", "LAB-PC-3", CLIENT, "/home/jdoe/study")
        assert p["uploader"] == {"uid": 0, "name": "root"} and p["received"] == header.received
        assert p["description"] == d["blake3"]


def test_a_bare_drop_is_still_ingested_and_log_says_it_was_not_verified(layout):
    send(layout.inbox, "s1-labB-1", {b"a.txt": b"a"}, describe=False)
    r = one_result(layout, "ingested")
    assert not r.verified
    assert read_all(layout.manifests()[0])[0].description is None
    (e,) = json.loads(layout.cli("log", "--json", "s1:a.txt").stdout)
    assert e["provenance"]["verified"] is False and e["provenance"]["location"] == "labB"
    assert "user" not in e["provenance"]
    res = layout.cli("log", "-w", "s1:a.txt")
    assert "from labB by root, no description" in res.stdout


def test_odd_names_are_verified(layout):
    files = {b"\xff\xfe not utf-8.txt": b"latin", b"line\nbreak.txt": b"nl", b"back\\slash": b"bs",
             b"with spaces/and  more .txt": b"sp", b"d\xe9j\xe0/vu": b"dv", b"a/x": b"ax", b"a.txt": b"at",
             b"a-b": b"ab", b"a0": b"a0", b"~v0001~": b"tilde"}
    send(layout.inbox, "s1-labA-1", files)
    r = one_result(layout, "ingested")
    assert r.verified and r.files == len(files)
    assert plain_files(layout.tree()) == {L.tree_relpath(p): c for p, c in files.items()}
    check_store(layout)


def test_a_deep_tree_in_tricky_walk_order_is_verified(layout):
    """Names where per-component order differs from whole-path order ('a/x' < 'a.txt' < 'a0')."""
    files = {}
    for top in (b"a", b"a.b", b"a-", b"a0", b"ab", b"A"):
        for sub in (b"x", b"x.y", b"x/y", b"x-", b"z/z/z"):
            key = top + b"/" + sub
            if any(k.startswith(key + b"/") or key.startswith(k + b"/") for k in files):
                continue
            files[key] = key
        files[top + b".txt"] = top
    send(layout.inbox, "s1-labA-1", files)
    r = one_result(layout, "ingested")
    assert r.verified and r.files == len(files)


def test_a_reserved_name_deeper_in_the_entry_is_an_ordinary_file(layout):
    files = {b"sub/" + DESCRIPTION_NAME: b"not ours", b"x": b"x"}
    send(layout.inbox, "s1-labA-1", files)
    one_result(layout, "ingested")
    assert plain_files(layout.tree()) == files


# ----------------------------------------------------------- mismatches

@pytest.mark.parametrize("how, detail", [
    ("same-size", "same size, other content"),
    ("truncated", "9 bytes here, 15 described"),
    ("appended", "16 bytes here, 15 described"),
])
def test_a_file_changed_after_it_was_described_fails_the_entry_naming_it(layout, how, detail):
    changed = {"same-size": b"trial,rt\n1,999\n", "truncated": b"trial,rt\n", "appended": b"trial,rt\n1,512\n\n"}
    new = changed[how]

    def tamper(partial):
        with open(partial + b"/eprime/s1.txt", "wb") as f:
            f.write(new)

    send(layout.inbox, "s1-labA-1", FILES, after=tamper)
    r = one_result(layout, "failed")
    reason = assert_failed_and_kept(layout, r, {**FILES, b"eprime/s1.txt": new})
    assert f"eprime/s1.txt (different: {detail})" in reason
    assert "1 different" in reason and "eprime/s2.txt" not in reason
    assert "nothing of this upload was ingested" in reason


def test_missing_extra_and_undescribed_symlink_fail_the_entry_naming_each(layout):
    def tamper(partial):
        os.unlink(partial + b"/eprime/s2.txt")
        with open(partial + b"/extra.txt", "wb") as f:
            f.write(b"not described")
        os.symlink(b"/etc/passwd", partial + b"/eprime/link")

    send(layout.inbox, "s1-labA-1", FILES, after=tamper)
    r = one_result(layout, "failed")
    reason = assert_failed_and_kept(layout, r, {b"extra.txt": b"not described", b"README": b"study foo"})
    assert "(1 missing, 2 extra)" in reason
    assert "eprime/s2.txt (missing: described, not in the entry)" in reason
    assert "extra.txt (extra: not in the description)" in reason
    assert "eprime/link (extra: a symbolic link, not in the description)" in reason


def test_a_described_file_that_is_a_symlink_or_fifo_here_is_different(layout):
    def tamper(partial):
        os.unlink(partial + b"/README")
        os.symlink(b"eprime/s1.txt", partial + b"/README")
        os.unlink(partial + b"/empty")
        os.mkfifo(partial + b"/empty")

    send(layout.inbox, "s1-labA-1", FILES, after=tamper)
    res = layout.cli("ingest", "--once", "--settle", "0", timeout=60)   # a blocked open would time out
    assert res.returncode == 1
    (rec,) = layout.records("failed")
    assert "README (different: described as a file, here a symbolic link)" in rec["reason"]
    assert "empty (different: described as a file, here a FIFO)" in rec["reason"]
    assert layout.manifests() == [] and tree_files(layout.tree()) == {}


def test_the_reason_names_twenty_files_and_counts_the_rest(layout):
    def tamper(partial):
        for i in range(25):
            with open(partial + b"/zz%02d" % i, "wb") as f:
                f.write(b"x")

    send(layout.inbox, "s1-labA-1", {b"a": b"a"}, after=tamper)
    r = one_result(layout, "failed")
    assert "(25 extra)" in r.reason and "zz19 (extra" in r.reason and "zz20" not in r.reason
    assert "(and 5 more)" in r.reason


# ------------------------------------------------------ bad descriptions

def _rewrite(partial: bytes, edit: Callable[[list[bytes]], list[bytes]]) -> None:
    p = partial + b"/" + DESCRIPTION_NAME
    with open(p, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    with open(p, "wb") as f:
        f.write(b"".join(edit(lines)))


def _replace_with(kind: str) -> Callable[[bytes], None]:
    def go(partial: bytes) -> None:
        p = partial + b"/" + DESCRIPTION_NAME
        os.unlink(p)
        if kind == "symlink":
            os.symlink(b"/etc/passwd", p)
        elif kind == "fifo":
            os.mkfifo(p)
        else:
            os.mkdir(p)
    return go


def _bad_hash(lines):
    d = json.loads(lines[1])
    d["blake3"] = "0" * 63 + "g"
    return lines[:1] + [json.dumps(d, separators=(",", ":")).encode() + b"\n"] + lines[2:]


@pytest.mark.parametrize("case, after, expect", [
    ("no end line", lambda p: _rewrite(p, lambda ls: ls[:-1]), "is incomplete"),
    ("cut mid-line", lambda p: _rewrite(p, lambda ls: ls[:-1] + [ls[-1][:10]]), "is incomplete"),
    ("empty", lambda p: _rewrite(p, lambda ls: []), "is incomplete"),
    ("bad hash", lambda p: _rewrite(p, _bad_hash), "line 2: blake3 must be 64 lowercase hex digits"),
    ("counts", lambda p: _rewrite(p, lambda ls: ls[:2] + ls[-1:]), "end line counts"),
    ("out of order", lambda p: _rewrite(p, lambda ls: [ls[0], ls[2], ls[1]] + ls[3:]), "out of walk order"),
    ("not json", lambda p: _rewrite(p, lambda ls: ls[:3] + [b"{oops\n"] + ls[3:]), "line 4: not JSON"),
    ("bad header", lambda p: _rewrite(p, lambda ls: [b'{"eidetic_upload":7}\n'] + ls[1:]), "line 1"),
    # json.loads raises RecursionError for deep nesting: it crashed ingest and left the entry
    # claimed, so every later run of the study crashed on it again.
    ("nested too deep", lambda p: _rewrite(p, lambda ls: ls[:3] + [b"[" * 100_000 + b"\n"] + ls[3:]),
     "line 4: not JSON"),
    ("symlink", _replace_with("symlink"), ".eidetic-description.jsonl is a symbolic link, not a regular file"),
    ("fifo", _replace_with("fifo"), ".eidetic-description.jsonl is a FIFO, not a regular file"),
    ("directory", _replace_with("dir"), ".eidetic-description.jsonl is a directory, not a regular file"),
])
def test_a_bad_description_fails_the_entry_with_a_clear_reason(layout, case, after, expect):
    send(layout.inbox, "s1-labA-1", FILES, after=after)
    res = layout.cli("ingest", "--once", "--settle", "0", timeout=60)   # a FIFO must never block
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    (rec,) = layout.records("failed")
    assert expect in rec["reason"], rec["reason"]
    assert layout.manifests() == [] and tree_files(layout.tree()) == {}
    assert layout.records("done") == []


def test_a_description_for_another_study_never_lets_the_entry_choose_it(layout):
    send(layout.inbox, "s1-labA-1", FILES, study="s2")
    results = layout.ingest()
    assert [r.outcome for r in results] == ["failed"]
    reason = results[0].reason
    assert "sent for study 's2' but its entry name 's1-labA-1' puts it in study s1" in reason
    assert "renaming the entry cannot fix it" in reason and "--study s1 --to" in reason   # the fix, as a command
    assert layout.manifests("s1") == [] and layout.manifests("s2") == []
    assert tree_files(layout.tree("s1")) == {} and tree_files(layout.tree("s2")) == {}


def test_a_description_naming_another_location_fails(layout):
    send(layout.inbox, "s1-labA-1", FILES, location="labB")
    r = one_result(layout, "failed")
    assert "says location 'labB' but the entry name 's1-labA-1' says 'labA'" in r.reason


# -------------------------------------------------- require_description

def _requiring(root: Path) -> Layout:
    lay = make_layout(root, studies=("s1", "s2"))
    doc = json.loads(lay.config_path.read_text())
    doc["studies"]["s1"]["require_description"] = True
    lay.config_path.write_text(json.dumps(doc))
    return Layout(lay.root, lay.config_path, C.load(str(lay.config_path)))


def test_require_description_refuses_a_bare_drop_and_takes_a_described_one(tmp_path):
    lay = _requiring(tmp_path)
    send(lay.inbox, "s1-labA-1", {b"a.txt": b"bare"}, describe=False)
    send(lay.inbox, "s2-labA-1", {b"a.txt": b"bare elsewhere"}, describe=False, study="s2")
    by_study = {r.study: r for r in lay.ingest()}
    assert by_study["s2"].outcome == "ingested"        # only the configured study insists
    assert by_study["s1"].outcome == "failed"
    assert "study s1 requires an upload description" in by_study["s1"].reason
    assert "'eidetic send'" in by_study["s1"].reason
    assert lay.manifests("s1") == []

    send(lay.inbox, "s1-labA-2", {b"a.txt": b"described"})
    r = one_result(lay, "ingested", study="s1")
    assert r.verified
    assert plain_files(lay.tree("s1")) == {b"a.txt": b"described"}


# ---------------------------------------------------------------- crashes

def _strace_or_skip() -> None:
    import shutil
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed: repeatable kill points need it")


@pytest.mark.parametrize("syscall, when", [
    ("link", 1),      # the manifest's commit point: killed just before it
    ("linkat", 3),    # after the commit, while the tree gets its names
])
def test_a_verified_ingest_killed_then_rerun_is_finished_and_verified(tmp_path, syscall, when):
    _strace_or_skip()
    lay = make_layout(tmp_path, studies=("s1",))
    send(lay.inbox, "s1-labA-1", FILES)
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path,
                  prefix=["strace", "-f", "-qq", "-o", "/dev/null", "-e", f"trace={syscall}",
                          "-e", f"inject={syscall}:signal=SIGKILL:when={when}"])
    assert res.returncode == -signal.SIGKILL, res.stderr
    res = lay.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    (done,) = lay.records("done")
    assert done["verified"] is True
    (m,) = lay.manifests()
    assert read_all(m)[0].description is not None
    assert plain_files(lay.tree()) == FILES
    check_store(lay)
    res = lay.cli("fsck")
    assert res.returncode == 0, res.stdout + res.stderr


# -------------------------------------------------------------------- fsck

def test_fsck_counts_the_description_as_referenced_and_flags_it_when_deleted(layout):
    send(layout.inbox, "s1-labA-1", FILES)
    send(layout.inbox, "s1-labA-2", {b"other.txt": b"2"})
    assert [r.outcome for r in layout.ingest()] == ["ingested", "ingested"]
    res = layout.cli("fsck", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout) == []          # never an orphan (W024), nothing else either
    check_store(layout)

    d = read_all(layout.manifests()[0])[0].description
    obj = layout.store() / "objects" / d["blake3"][:2] / d["blake3"][2:]
    os.unlink(obj)
    res = layout.cli("fsck")
    assert res.returncode == 1
    assert "E021" in res.stdout and "upload description of upload" in res.stdout, res.stdout
    res = layout.cli("fsck", "--repair")
    assert "restore it from a backup" in res.stdout + res.stderr


def test_fsck_flags_a_corrupted_description_object(layout):
    send(layout.inbox, "s1-labA-1", {b"a": b"a"})
    one_result(layout, "ingested")
    d = read_all(layout.manifests()[0])[0].description
    obj = layout.store() / "objects" / d["blake3"][:2] / d["blake3"][2:]
    os.chmod(obj, 0o644)
    data = bytearray(obj.read_bytes())
    data[5] ^= 1
    obj.write_bytes(bytes(data))
    os.chmod(obj, 0o444)
    res = layout.cli("fsck", "--json")
    assert res.returncode == 1
    found = [(f["code"], f["detail"]) for f in json.loads(res.stdout)]
    assert any(code == "E020" and "upload description" in detail for code, detail in found), found


def test_the_index_rebuilt_from_manifests_equals_the_live_one_with_descriptions(layout):
    send(layout.inbox, "s1-labA-1", FILES)
    one_result(layout, "ingested")
    store = layout.open_store()
    live = list(store.index.dump())
    d = read_all(layout.manifests()[0])[0].description
    assert ("objects", bytes.fromhex(d["blake3"])) in {(db, k) for db, k, _ in live}
    store.close()
    import shutil
    shutil.rmtree(layout.store() / "index")
    res = layout.cli("fsck", "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(layout.open_store().index.dump()) == live


def test_a_verified_ingest_abandoned_on_shutdown_is_redone_and_verified(layout):
    from eidetic.server.ingest import Ingester

    send(layout.inbox, "s1-labA-1", FILES)
    polls = iter(range(1000))
    ing = Ingester(layout.cfg, should_stop=lambda: next(polls) >= 4)   # stops a few files in
    try:
        results = ing.run_once(settle_seconds=0)
    finally:
        ing.close()
    assert [r.outcome for r in results] == ["waiting"]
    assert layout.manifests() == [] and tree_files(layout.tree()) == {}
    r = one_result(layout, "ingested")
    assert r.verified and plain_files(layout.tree()) == FILES
    check_store(layout)
