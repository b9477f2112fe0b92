"""Ingest and the tree, end to end: entries dropped like a client drops
them, ingested, then inspected through the store, the tree and the CLI."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    DAEMON_UID,
    check_store,
    chown_tree,
    drop,
    eidetic_argv,
    fs,
    make_layout,
    one_line_error,
    plain_files,
    run_as,
    tree_files,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from eidetic.core import layout as L
from eidetic.store.manifest import FileRecord, SkipRecord, read_all
from eidetic.store.objects import ObjectStore, hash_bytes


def ingest_ok(lay, **kw):
    results = lay.ingest(**kw)
    assert results, "nothing was ingested"
    for r in results:
        assert r.outcome == "ingested", r
    return results


def log_json(lay, arg) -> list[dict]:
    res = lay.cli("log", "--json", arg)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def entry_path(e: dict) -> bytes:
    if "path" in e:
        return e["path"].encode()
    import base64
    return base64.b64decode(e["path_b64"])


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def inbox_names(inbox) -> list[bytes]:
    return sorted(os.listdir(fs(inbox)))


def versions_in(tree_dir, name: bytes) -> list[bytes]:
    """Version names of the file *name* (a plain uploaded name) in a tree directory."""
    out = []
    for n in os.listdir(fs(tree_dir)):
        parsed = L.parse_version_name(n)
        if parsed is not None and parsed[0] == name:
            out.append(n)
    return sorted(out)


# ---------------------------------------------------------------- versions

def test_plain_name_shows_the_latest_version(layout):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"A"})
    ingest_ok(layout)
    assert (layout.tree() / "d/f.txt").read_bytes() == b"A"
    drop(layout.inbox, "s1-labA-2", {"d/f.txt": b"B"})
    ingest_ok(layout)
    assert (layout.tree() / "d/f.txt").read_bytes() == b"B"
    check_store(layout)


def test_resend_a_then_b_then_a_is_three_versions(layout):
    for i, content in enumerate([b"A", b"B", b"A"]):
        drop(layout.inbox, f"s1-labA-{i}", {"f.txt": content})
        (r,) = ingest_ok(layout)
        assert r.new_versions == 1
    entries = log_json(layout, "s1:f.txt")
    assert [e["version"] for e in entries] == [3, 2, 1]
    assert entries[0]["blake3"] == entries[2]["blake3"] == hash_bytes(b"A")
    assert entries[1]["blake3"] == hash_bytes(b"B")
    names = versions_in(layout.tree(), b"f.txt")
    assert [Path(os.fsdecode(layout.tree() / os.fsdecode(n))).read_bytes() for n in names] == [b"A", b"B", b"A"]
    assert (layout.tree() / "f.txt").read_bytes() == b"A"
    check_store(layout)


def test_identical_resend_adds_no_version_but_the_manifest_records_it(layout):
    files = {"d/a.txt": b"alpha", "d/b.bin": b"\0" * 5000, "e.txt": b""}
    drop(layout.inbox, "s1-labA-1", files)
    (first,) = ingest_ok(layout)
    assert first.new_versions == 3
    drop(layout.inbox, "s1-labA-2", files)
    (second,) = ingest_ok(layout)
    assert second.new_versions == 0 and second.files == 3
    _, m2 = layout.manifests()
    recs = [r for r in read_all(m2)[1] if isinstance(r, FileRecord)]
    assert sorted(r.path for r in recs) == [b"d/a.txt", b"d/b.bin", b"e.txt"]
    assert read_all(m2)[0].upload == second.upload
    for p in (b"d/a.txt", b"d/b.bin", b"e.txt"):
        assert len(log_json(layout, "s1:" + p.decode())) == 1
    assert sorted(versions_in(layout.tree() / "d", b"a.txt")) == versions_in(layout.tree() / "d", b"a.txt")
    assert len(versions_in(layout.tree() / "d", b"a.txt")) == 1
    check_store(layout)


def test_one_object_per_distinct_content_across_uploads(layout):
    drop(layout.inbox, "s1-labA-1", {"a": b"X", "b": b"X", "c": b"Y", "d/e": b"Z", "d/f/g": b"X",
                                     "empty1": b"", "big1": b"L" * (3 << 20)})
    ingest_ok(layout)
    drop(layout.inbox, "s1-labA-2", {"a": b"X", "new": b"Y", "w": b"W", "d/empty2": b"",
                                     "big2": b"L" * (3 << 20)})
    ingest_ok(layout)
    distinct = {b"X", b"Y", b"Z", b"W", b"", b"L" * (3 << 20)}
    objects = layout.object_files()
    assert len(objects) == len(distinct)
    assert {p.parent.name + p.name for p in objects} == {hash_bytes(c) for c in distinct}
    check_store(layout)


def test_tree_files_are_read_only_hardlinks_of_objects_in_closed_directories(layout):
    drop(layout.inbox, "s1-labA-1", {"a.txt": b"1", "d/b.txt": b"2", "d/e/f/c.txt": b"3"},
         prepare=lambda p: [os.chmod(p + b"/a.txt", 0o666), os.chmod(p + b"/d", 0o777)])
    ingest_ok(layout)
    drop(layout.inbox, "s1-labA-2", {"a.txt": b"1b", "d/b.txt": b"2"})
    ingest_ok(layout)
    object_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in layout.object_files()}
    n_files = 0
    for dirpath, dirs, files in os.walk(layout.tree()):
        for d in dirs:
            mode = stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode)
            assert mode & 0o022 == 0, f"{dirpath}/{d} is group/other writable ({mode:o})"
        for f in files:
            st_ = os.lstat(os.path.join(dirpath, f))
            assert stat.S_ISREG(st_.st_mode)
            assert (st_.st_dev, st_.st_ino) in object_inodes, f"{f} is not a hardlink of an object"
            assert st_.st_mode & 0o222 == 0, f"{f} has write bits ({st_.st_mode:o})"
            n_files += 1
    assert n_files == 3 + 3 + 1    # three plain names, four version names
    assert stat.S_IMODE(os.lstat(layout.tree()).st_mode) & 0o022 == 0


def test_version_names_keep_the_extension_and_sort_chronologically(layout):
    names = ["r.tar.gz", "noext", ".hidden", "Table.CSV", "x.json"]
    n_versions = 11      # past v0009 -> v0010: the fixed-width counter must keep sorting
    for i in range(n_versions):
        drop(layout.inbox, f"s1-labA-{i}", {f"d/{n}": f"{n} {i}".encode() for n in names})
        ingest_ok(layout)
    tree_d = layout.tree() / "d"
    for n in names:
        vnames = versions_in(tree_d, n.encode())
        assert len(vnames) == n_versions
        stem, ext = L.split_ext(n.encode())
        for v in vnames:
            assert v.startswith(stem + b"~v") and v.endswith(ext), v
        # name order == version order == content order == received order
        contents = [(tree_d / os.fsdecode(v)).read_bytes() for v in vnames]
        assert contents == [f"{n} {i}".encode() for i in range(n_versions)]
        entries = list(reversed(log_json(layout, f"s1:d/{n}")))
        assert [os.fsencode(os.path.basename(e["tree_path"])) for e in entries] == vnames
        assert [e["received"] for e in entries] == sorted(e["received"] for e in entries)
    assert (tree_d / "r.tar.gz").read_bytes() == f"r.tar.gz {n_versions - 1}".encode()


def test_uploaded_name_that_looks_like_a_version_name_never_collides(layout):
    lookalike = b"s1~v0001~20260101T000000Z.txt"
    drop(layout.inbox, "s1-labA-1", {b"s1.txt": b"real s1 v1", lookalike: b"uploader's look-alike"})
    ingest_ok(layout)
    tree = layout.tree()
    (real_v1,) = versions_in(tree, b"s1.txt")
    # Second upload: a file named exactly like eidetic's own version name.
    drop(layout.inbox, "s1-labA-2", {real_v1: b"uploader's copy of a version name", b"s1.txt": b"real s1 v2"})
    ingest_ok(layout)
    assert (tree / os.fsdecode(real_v1)).read_bytes() == b"real s1 v1"
    assert (tree / "s1.txt").read_bytes() == b"real s1 v2"
    by_path = {entry_path(e): e for e in log_json(layout, str(tree))}
    assert set(by_path) == {b"s1.txt", lookalike, real_v1}
    for path, content in ((lookalike, b"uploader's look-alike"), (real_v1, b"uploader's copy of a version name")):
        e = by_path[path]
        assert Path(e["tree_path"]).read_bytes() == content
        plain = tree / os.fsdecode(L.plain_name(path))
        assert plain.read_bytes() == content and plain.name.encode() != path
    files = tree_files(tree)
    assert len(files) == 2 + 2 + 2 + 1      # s1.txt plain + 2 versions, two look-alikes x (plain + version)
    check_store(layout)


# ------------------------------------------------ links, FIFOs, odd entries

def test_symlinks_are_recorded_as_skipped_with_their_target_and_never_followed(layout, tmp_path):
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"SECRET OUTSIDE THE INBOX")
    outside_dir = tmp_path / "outside-dir"
    (outside_dir / "deep").mkdir(parents=True)
    (outside_dir / "deep" / "leak.txt").write_bytes(b"LEAK")

    def links(p: bytes) -> None:
        os.symlink(str(secret), p + b"/to_secret.txt")
        os.symlink(str(outside_dir), p + b"/results")              # looks like a folder
        os.symlink(str(outside_dir) + "/", p + b"/d/results.d")    # trailing slash
        os.symlink("../data.txt", p + b"/d/rel_link")
        os.symlink("nowhere/at/all", p + b"/dangling")

    drop(layout.inbox, "s1-labA-1", {"data.txt": b"real", "d/x.txt": b"x"}, prepare=links)
    (r,) = ingest_ok(layout)
    assert r.files == 2 and r.skipped == 5
    _, recs, _ = read_all(layout.manifests()[0])
    skipped = {s.path: s for s in recs if isinstance(s, SkipRecord)}
    assert {p: (s.skipped, s.target) for p, s in skipped.items()} == {
        b"to_secret.txt": ("symlink", fs(secret)),
        b"results": ("symlink", fs(outside_dir)),
        b"d/results.d": ("symlink", fs(outside_dir) + b"/"),
        b"d/rel_link": ("symlink", b"../data.txt"),
        b"dangling": ("symlink", b"nowhere/at/all"),
    }
    files = tree_files(layout.tree())
    assert set(plain_files(layout.tree())) == {b"data.txt", b"d/x.txt"}
    assert b"SECRET OUTSIDE THE INBOX" not in files.values() and b"LEAK" not in files.values()
    contents = {p.read_bytes() for p in layout.object_files()}
    assert contents == {b"real", b"x"}
    assert not any(os.path.islink(os.path.join(d, f)) for d, ds, fs_ in os.walk(layout.tree()) for f in fs_ + ds)
    res = layout.cli("log", "s1:results")
    assert res.returncode == 1
    one_line_error(res)


def test_entry_that_is_itself_a_symlink_fails_without_being_followed(layout, tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "f.txt").write_bytes(b"not an upload")
    os.symlink(str(target), str(layout.inbox / "s1-labA-1"))
    (r,) = layout.ingest()
    assert r.outcome == "failed"
    assert "symbolic link" in r.reason
    assert layout.manifests() == [] and layout.object_files() == []
    assert tree_files(layout.tree()) == {}
    (failed_name,) = [n for n in inbox_names(layout.inbox) if n.startswith(b".eidetic~failed~")]
    assert os.path.islink(fs(layout.inbox) + b"/" + failed_name)
    assert (target / "f.txt").read_bytes() == b"not an upload"
    assert sorted(os.listdir(target)) == ["f.txt"]
    (rec,) = layout.records("failed")
    assert "symbolic link" in rec["reason"]


@pytest.mark.parametrize("swap", ["file-to-symlink", "dir-to-symlink", "file-to-fifo"])
def test_parts_swapped_for_links_after_listing_are_never_followed(layout, tmp_path, monkeypatch, swap):
    """An uploader replaces a file or folder right after ingest listed its parent."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.txt").write_bytes(b"SECRET")
    import eidetic.server.ingest as ingest_mod
    orig = ingest_mod._listing
    swapped = []

    def listing(dfd):
        out = orig(dfd)
        names = [n for n, _ in out]
        if not swapped and b"victim" in names:
            swapped.append(True)
            os.rename(b"victim", b".old-victim", src_dir_fd=dfd, dst_dir_fd=dfd)
            if swap == "file-to-fifo":
                os.mkfifo(b"victim", dir_fd=dfd)
            else:
                target = str(secret / "s.txt") if swap == "file-to-symlink" else str(secret)
                os.symlink(target, b"victim", dir_fd=dfd)
        return out

    monkeypatch.setattr(ingest_mod, "_listing", listing)
    files = {"ok.txt": b"ok"}
    files.update({"victim": b"plain"} if swap.startswith("file") else {"victim/inner.txt": b"inner"})
    drop(layout.inbox, "s1-labA-1", files)
    (r,) = ingest_ok(layout)
    assert swapped
    _, recs, _ = read_all(layout.manifests()[0])
    assert {rec.path for rec in recs if isinstance(rec, FileRecord)} == {b"ok.txt"}
    (skip,) = [rec for rec in recs if isinstance(rec, SkipRecord)]
    assert (skip.path, skip.skipped) == (b"victim", "fifo" if swap == "file-to-fifo" else "symlink")
    assert b"SECRET" not in {p.read_bytes() for p in layout.object_files()}
    assert plain_files(layout.tree()) == {b"ok.txt": b"ok"}


@pytest.mark.parametrize("kind", ["file", "fifo"])
def test_entry_that_is_not_a_folder_fails_without_blocking(layout, kind):
    path = fs(layout.inbox) + b"/s1-labA-1"
    if kind == "file":
        with open(path, "wb") as f:
            f.write(b"a lone file")
    else:
        os.mkfifo(path)
    res = layout.cli("ingest", "--once", "--settle", "0", timeout=60)   # a blocked open would time out
    assert res.returncode == 1
    assert "not a folder" in res.stderr
    (name,) = inbox_names(layout.inbox)
    assert name.startswith(b".eidetic~failed~")
    assert layout.manifests() == [] and tree_files(layout.tree()) == {}


def test_file_replaced_by_a_folder_of_the_same_name_keeps_every_version_reachable(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/x": b"a file"})
    ingest_ok(layout)
    drop(layout.inbox, "s1-labA-2", {"d/x/y": b"now a folder"})
    ingest_ok(layout)
    files = tree_files(layout.tree())
    assert files[b"d/x/y"] == b"now a folder"
    assert sorted(c for p, c in files.items() if p.startswith(b"d/x~v0001~")) == [b"a file"]
    (v1,) = [p for p in files if p.startswith(b"d/x~v0001~")]
    res = layout.cli("checkout", fs(layout.tree()) + b"/" + v1, "-o", tmp_path / "x")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "x").read_bytes() == b"a file"
    check_store(layout)


def test_checkout_of_a_folder_where_a_file_later_became_a_folder(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/x": b"a file"})
    ingest_ok(layout)
    drop(layout.inbox, "s1-labA-2", {"d/x/y": b"now a folder"})
    ingest_ok(layout)
    res = layout.cli("checkout", "s1:d", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    files = tree_files(tmp_path / "out")
    assert files[b"x/y"] == b"now a folder"
    # As in the tree: the folder takes the name, the file keeps its version name.
    assert [c for p, c in files.items() if p.startswith(b"x~v0001~")] == [b"a file"]
    # Before the folder existed, the file had its plain name.
    first = read_all(layout.manifests()[0])[0].upload
    res = layout.cli("checkout", "s1:d", "--upload", first, "-o", tmp_path / "before")
    assert res.returncode == 0, res.stderr
    assert tree_files(tmp_path / "before") == {b"x": b"a file"}


def test_fifo_in_an_entry_is_skipped_without_blocking(layout):
    drop(layout.inbox, "s1-labA-1", {"data.txt": b"data", "d/after.txt": b"after"},
         prepare=lambda p: [os.mkfifo(p + b"/pipe"), os.mkfifo(p + b"/d/another")])
    res = layout.cli("ingest", "--once", "--settle", "0", timeout=60)   # a blocked open would time out
    assert res.returncode == 0, res.stderr
    _, recs, _ = read_all(layout.manifests()[0])
    assert {(s.path, s.skipped) for s in recs if isinstance(s, SkipRecord)} == {
        (b"pipe", "fifo"), (b"d/another", "fifo")}
    assert plain_files(layout.tree()) == {b"data.txt": b"data", b"d/after.txt": b"after"}
    check_store(layout)


# ------------------------------------------------------- arbitrary names

_NAME_BYTE = st.one_of(st.sampled_from(list(b"~v-#.\n\t 09TZ:\\*?\"'$")),
                       st.integers(1, 255).filter(lambda b: b != 0x2F))
_NAMES = st.lists(_NAME_BYTE, min_size=1, max_size=255).map(bytes).filter(lambda n: n not in (b".", b".."))

_ODD_NAMES = [
    b"\xff\xfe not utf-8 \xe9.txt",
    b"line\nbreak.txt",
    b"x" * 255,
    b"~v" + b"a" * 253,                        # escaped form exceeds 255 bytes: cut + hash
    b"a~b~-c~#d.txt",
    b"-rf",
    b"--help",
    b"s1~v0001~20260101T000000Z.txt",
    "ümlaut ✓.txt".encode(),
    b".eidetic~done~x",
]


def _round_trip(base: Path, names: list[bytes]) -> None:
    lay = make_layout(base)
    mtime = 1_600_000_000_123_456_789
    files = {b"d/" + n: b"content of " + n for n in names}
    drop(lay.inbox, "s1-labA-1", files, mtime_ns=mtime)
    (r,) = ingest_ok(lay)
    assert r.files == len(names)
    # manifest
    _, recs, _ = read_all(lay.manifests()[0])
    assert {rec.path for rec in recs if isinstance(rec, FileRecord)} == set(files)
    # tree: one plain and one version name per file, right contents
    tree_d = fs(lay.tree()) + b"/d"
    listing = os.listdir(tree_d)
    assert len(listing) == 2 * len(names)
    plain = {n for n in listing if not L.is_version_name(n)}
    assert {read(tree_d + b"/" + n) for n in plain} == set(files.values())
    # log --json: exact paths, tree paths that exist
    entries = log_json(lay, tree_d)
    assert {entry_path(e) for e in entries} == set(files)
    for i, e in enumerate(entries):
        tp = os.fsencode(e["tree_path"])
        assert read(tp) == files[entry_path(e)]
        # checkout by the version's tree path
        out = fs(base) + b"/one-%d" % i
        res = lay.cli("checkout", tp, "-o", out)
        assert res.returncode == 0, res.stderr
        assert read(out) == files[entry_path(e)]
        assert os.stat(out).st_mtime_ns == mtime
    # checkout of the folder: exactly the uploaded names
    res = lay.cli("checkout", tree_d, "-o", fs(base) + b"/all")
    assert res.returncode == 0, res.stderr
    got = os.listdir(fs(base) + b"/all")
    assert sorted(got) == sorted(names)
    for n in names:
        p = fs(base) + b"/all/" + n
        assert read(p) == b"content of " + n
        assert os.stat(p).st_mtime_ns == mtime


@settings(max_examples=8, derandomize=True, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@example(names=_ODD_NAMES)
@given(names=st.lists(_NAMES, min_size=1, max_size=3, unique=True))
def test_any_byte_names_round_trip_through_manifest_tree_log_and_checkout(tmp_path_factory, names):
    try:
        _round_trip(tmp_path_factory.mktemp("names"), names)
    finally:
        from conftest import close_indexes
        close_indexes()


def test_odd_directory_names_round_trip(layout, tmp_path):
    files = {b"-dash/\xff\xfe/a~v0001~20260101T000000Z/f": b"1",
             b"new\nline/x": b"2",
             b"~-#/" + b"d" * 255 + b"/g.txt": b"3"}
    drop(layout.inbox, "s1-labA-1", files)
    ingest_ok(layout)
    assert {entry_path(e) for e in log_json(layout, "s1:")} == set(files)
    res = layout.cli("checkout", "s1:", "-o", tmp_path / "out")
    assert res.returncode == 0, res.stderr
    for p, c in files.items():
        assert read(fs(tmp_path) + b"/out/" + p) == c
    check_store(layout)


def test_log_prints_undecodable_names_without_crashing(layout):
    drop(layout.inbox, "s1-labA-1", {b"d/\xff\xfe.txt": b"x"})
    ingest_ok(layout)
    for arg in (b"s1:d", b"s1:d/\xff\xfe.txt"):
        res = layout.cli("log", arg)
        assert res.returncode == 0, res.stderr
        assert "\\xff\\xfe" in res.stdout


def test_log_shows_a_location_from_the_entry_name_escaped(layout):
    # The location is the uploader's text: an escape sequence must not reach the
    # terminal, and an undecodable byte shows as itself.
    drop(layout.inbox, b"s1-lab\x1b[31mRED-1", {"d/f.txt": b"one"})
    drop(layout.inbox, b"s1-lab\xff-2", {"d/f.txt": b"two"})
    assert len(ingest_ok(layout)) == 2
    res = layout.cli("log", "s1:d/f.txt")
    assert res.returncode == 0, res.stderr
    assert "\x1b" not in res.stdout and "\udcff" not in res.stdout, res.stdout
    assert "lab\\x1b[31mRED by " in res.stdout and "lab\\xff by " in res.stdout, res.stdout


# ------------------------------------------------------- routing to studies

def test_entry_for_an_unknown_study_is_refused_and_left_in_the_inbox(layout):
    drop(layout.inbox, "zz-labA-1", {"f.txt": b"data"})
    drop(layout.inbox, "nodash", {"g.txt": b"more"})
    res = layout.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 1
    assert "zz-labA-1" in res.stderr and "nodash" in res.stderr
    names = inbox_names(layout.inbox)
    assert len(names) == 2 and all(n.startswith(b".eidetic~failed~") for n in names)
    assert {n.rpartition(b"~")[2] for n in names} == {b"zz-labA-1", b"nodash"}
    for n in names:
        contents = tree_files(fs(layout.inbox) + b"/" + n)
        assert contents in ({b"f.txt": b"data"}, {b"g.txt": b"more"})
    recs = layout.records("failed")
    assert len(recs) == 2
    for rec in recs:
        assert "configured study" in rec["reason"]
        assert os.path.lexists(rec["where"])
    assert layout.records("claims") == [] and layout.records("done") == []
    for s in ("s1", "s2"):
        assert layout.manifests(s) == [] and layout.object_files(s) == []
        assert tree_files(layout.tree(s)) == {}


def test_study_inbox_takes_entries_whatever_their_name(tmp_path):
    lay = make_layout(tmp_path, own_inbox=["s1"])
    drop(lay.study_inbox("s1"), "anything at all", {"a.txt": b"1"})
    drop(lay.study_inbox("s1"), "s2-labB-1", {"b.txt": b"2"})     # named for s2, but in s1's inbox
    drop(lay.study_inbox("s1"), "s1-labC-1", {"c.txt": b"3"})
    results = ingest_ok(lay)
    assert {r.study for r in results} == {"s1"}
    assert plain_files(lay.tree("s1")) == {b"a.txt": b"1", b"b.txt": b"2", b"c.txt": b"3"}
    assert lay.manifests("s2") == [] and tree_files(lay.tree("s2")) == {}
    # The location is read from the name after an optional leading "s1-".
    sources = sorted(read_all(p)[0].source for p in lay.manifests("s1"))
    assert sources == ["anything at all", "labC", "s2"]


def test_shared_inbox_entry_named_for_a_study_never_lands_in_another(tmp_path):
    lay = make_layout(tmp_path, own_inbox=["s1"])
    drop(lay.inbox, "s1-labA-1", {"one.txt": b"for s1"})
    drop(lay.inbox, "s2-labA-1", {"two.txt": b"for s2"})
    # Only s2 asked for: the s1 entry stays untouched.
    results = lay.ingest(study="s2")
    assert [(r.entry, r.study, r.outcome) for r in results] == [("s2-labA-1", "s2", "ingested")]
    assert b"s1-labA-1" in inbox_names(lay.inbox)
    assert lay.manifests("s1") == []
    results = lay.ingest()
    assert [(r.entry, r.study, r.outcome) for r in results] == [("s1-labA-1", "s1", "ingested")]
    assert plain_files(lay.tree("s1")) == {b"one.txt": b"for s1"}
    assert plain_files(lay.tree("s2")) == {b"two.txt": b"for s2"}
    for s in ("s1", "s2"):
        check_store(lay, s)


def test_study_names_sharing_a_prefix_are_not_confused(tmp_path):
    lay = make_layout(tmp_path, studies=("s1", "s10", "s1_x"))
    drop(lay.inbox, "s10-labA-1", {"f": b"for s10"})
    drop(lay.inbox, "s1_x-labA-1", {"f": b"for s1_x"})
    drop(lay.inbox, "s1-0-1", {"f": b"for s1"})
    drop(lay.inbox, "s100-labA-1", {"f": b"for nobody"})
    results = {r.entry: (r.study, r.outcome) for r in lay.ingest()}
    assert results == {"s10-labA-1": ("s10", "ingested"), "s1_x-labA-1": ("s1_x", "ingested"),
                       "s1-0-1": ("s1", "ingested"), "s100-labA-1": (None, "failed")}
    for s in ("s1", "s10", "s1_x"):
        assert plain_files(lay.tree(s)) == {b"f": f"for {s}".encode()}


# ----------------------------------------------------- unreadable, unsettled

def test_unreadable_file_fails_the_entry_naming_it_and_leaves_the_data(world_tmp, nonroot_venv):
    """As a non-root daemon uid (root reads everything): a chmod-000 file."""
    lay = make_layout(world_tmp)
    entry = drop(lay.inbox, "s1-labA-1", {"d/ok.txt": b"fine", "d/secret.dat": b"private", "z.txt": b"z"},
                 prepare=lambda p: os.chmod(p + b"/d/secret.dat", 0o000))
    chown_tree(world_tmp, DAEMON_UID)
    res = run_as(DAEMON_UID, eidetic_argv(str(nonroot_venv / "bin" / "python"))
                 + ["--config", str(lay.config_path), "ingest", "--once", "--settle", "0"], cwd=world_tmp)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "d/secret.dat" in res.stderr and "Traceback" not in res.stderr
    (rec,) = lay.records("failed")
    assert "d/secret.dat" in rec["reason"] and "ermission" in rec["reason"]
    assert not os.path.lexists(entry)
    kept = fs(rec["where"])
    assert os.path.basename(kept).startswith(b".eidetic~failed~")
    assert (Path(os.fsdecode(kept)) / "d/ok.txt").read_bytes() == b"fine"
    assert stat.S_IMODE(os.lstat(kept + b"/d/secret.dat").st_mode) == 0
    assert (Path(os.fsdecode(kept)) / "d/secret.dat").read_bytes() == b"private"   # as root
    assert tree_files(lay.tree()) == {}
    assert lay.manifests() == []
    assert os.listdir(lay.store() / "tmp") == []
    assert lay.records("claims") == []


def test_entry_not_yet_settled_is_left_alone(layout):
    entry = drop(layout.inbox, "s1-labA-1", {"f.txt": b"still coming"})
    (r,) = layout.ingest(settle_seconds=3600)
    assert r.outcome == "waiting" and "settle" in r.reason
    assert os.path.isdir(entry)
    assert inbox_names(layout.inbox) == [b"s1-labA-1"]
    assert layout.records("claims") == [] and layout.manifests() == []
    res = layout.cli("ingest", "--once", "--settle", "3600")
    assert res.returncode == 0 and "waiting" in res.stdout
    assert inbox_names(layout.inbox) == [b"s1-labA-1"]
    time.sleep(0.05)
    (r,) = layout.ingest(settle_seconds=0.02)
    assert r.outcome == "ingested"


def test_recent_change_deep_inside_an_entry_keeps_it_waiting(layout):
    quiet = drop(layout.inbox, "s1-labA-1", {"d/e/f.txt": b"x"})
    busy = drop(layout.inbox, "s1-labA-2", {"d/e/f.txt": b"y"})
    time.sleep(1.6)
    with open(busy + b"/d/e/f.txt", "ab") as f:
        f.write(b"late")
    results = {r.entry: r.outcome for r in layout.ingest(settle_seconds=1.3)}
    assert results == {"s1-labA-1": "ingested", "s1-labA-2": "waiting"}
    assert not os.path.exists(quiet) and os.path.isdir(busy)


# ---------------------------------------------------- files changing mid-read

def _wrap_put_fd(monkeypatch, target: bytes, change):
    """After the object store has read *target*, call change(path) (while
    ingest still holds the file open, before it re-checks it)."""
    orig = ObjectStore.put_fd
    calls = []

    def put_fd(self, src, *a, **kw):
        res = orig(self, src, *a, **kw)
        path = os.readlink(f"/proc/self/fd/{src}").encode()
        if path.endswith(target):
            calls.append(path)
            change(path, len(calls))
        return res

    monkeypatch.setattr(ObjectStore, "put_fd", put_fd)
    return calls


@pytest.mark.parametrize("size", [1000, 3 << 20])
def test_file_appended_while_read_is_read_again_never_stored_inconsistently(layout, monkeypatch, size):
    def append_once(path, n):
        if n == 1:
            with open(path, "ab") as f:
                f.write(b"+appended")

    calls = _wrap_put_fd(monkeypatch, b"/grow.bin", append_once)
    drop(layout.inbox, "s1-labA-1", {"grow.bin": b"g" * size, "other.txt": b"o"})
    ingest_ok(layout)
    assert len(calls) == 2
    final = b"g" * size + b"+appended"
    (rec,) = [x for x in read_all(layout.manifests()[0])[1] if x.path == b"grow.bin"]
    assert rec.size == len(final) and rec.blake3 == hash_bytes(final)
    assert (layout.tree() / "grow.bin").read_bytes() == final
    check_store(layout)


@pytest.mark.parametrize("how", ["append", "chmod"])
def test_file_that_keeps_changing_while_read_fails_the_entry(layout, monkeypatch, how):
    def change(path, n):
        if how == "append":
            with open(path, "ab") as f:
                f.write(b"more")
        else:
            os.chmod(path, 0o600 if n % 2 else 0o640)

    calls = _wrap_put_fd(monkeypatch, b"/busy.log", change)
    entry = drop(layout.inbox, "s1-labA-1", {"a.txt": b"a", "busy.log": b"log line\n"})
    (r,) = layout.ingest()
    assert len(calls) >= 2
    assert r.outcome == "failed"
    assert "busy.log" in r.reason and "chang" in r.reason
    assert layout.manifests() == [] and tree_files(layout.tree()) == {}
    assert not os.path.exists(entry)
    assert os.path.exists(fs(r.where) + b"/busy.log")


def test_background_writer_never_causes_a_silent_mismatch(layout):
    """A thread appends to a big file while ingest reads it: ingest either
    fails the entry naming the file, or stores bytes that are exactly a
    prefix of the file with the recorded size and hash."""
    big = b"".join(bytes([i % 251]) * 4096 for i in range(4096))   # 16 MiB
    entry = drop(layout.inbox, "s1-labA-1", {"big.dat": big})
    path = entry + b"/big.dat"
    stop = threading.Event()

    def writer():
        with open(path, "ab") as f:
            while not stop.is_set():
                f.write(os.urandom(65536))
                f.flush()
                time.sleep(0.001)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        time.sleep(0.05)
        (r,) = layout.ingest()
    finally:
        stop.set()
        t.join(10)
    if r.outcome == "failed":
        assert "big.dat" in r.reason and "chang" in r.reason
        assert layout.manifests() == [] and tree_files(layout.tree()) == {}
        return
    assert r.outcome == "ingested"
    (rec,) = [x for x in read_all(layout.manifests()[0])[1] if isinstance(x, FileRecord)]
    stored = (layout.tree() / "big.dat").read_bytes()
    assert len(stored) == rec.size and hash_bytes(stored) == rec.blake3
    with open(fs(r.where) + b"/big.dat", "rb") as f:
        assert f.read(rec.size) == stored
    check_store(layout)


# ---------------------------------------------------------------------- log

def test_log_of_a_directory_lists_the_files_under_it(layout):
    drop(layout.inbox, "s1-labA-1", {"d/a.txt": b"a", "d/sub/b.txt": b"b", "dx/c.txt": b"c", "e.txt": b"e"})
    ingest_ok(layout)
    drop(layout.inbox, "s1-labA-2", {"d/a.txt": b"a2"})
    ingest_ok(layout)
    entries = log_json(layout, "s1:d")
    assert sorted((entry_path(e), e["version"]) for e in entries) == [
        (b"d/a.txt", 1), (b"d/a.txt", 2), (b"d/sub/b.txt", 1)]
    assert entries[0]["version"] == 2        # newest upload first
    res = layout.cli("log", "-w", str(layout.tree() / "d"))     # -w: with the names in the tree
    assert res.returncode == 0
    assert "d/a~v0002~" in res.stdout and "d/a~v0001~" in res.stdout and "d/sub/b~v0001~" in res.stdout
    assert "dx/" not in res.stdout and "e~v" not in res.stdout
    assert {entry_path(e) for e in log_json(layout, "s1:")} == {b"d/a.txt", b"d/sub/b.txt", b"dx/c.txt", b"e.txt"}


# ----------------------------------------------------------------- checkout

def _two_uploads(lay):
    drop(lay.inbox, "s1-labA-1", {"d/a.txt": b"a1", "d/b.txt": b"b1", "top.txt": b"t1"})
    (r1,) = ingest_ok(lay)
    time.sleep(0.01)
    drop(lay.inbox, "s1-labA-2", {"d/a.txt": b"a2", "d/c.txt": b"c2", "top.txt": b"t2"})
    (r2,) = ingest_ok(lay)
    return r1, r2


def test_checkout_of_an_older_version(layout, tmp_path):
    _two_uploads(layout)
    res = layout.cli("checkout", "s1:d/a.txt", "--version", "1", "-o", tmp_path / "v1")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "v1").read_bytes() == b"a1"
    res = layout.cli("checkout", "s1:d/a.txt", "-o", tmp_path / "latest")
    assert (tmp_path / "latest").read_bytes() == b"a2"
    (v1name,) = [n for n in versions_in(layout.tree() / "d", b"a.txt") if b"~v0001~" in n]
    res = layout.cli("checkout", fs(layout.tree()) + b"/d/" + v1name, "-o", tmp_path / "byname")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "byname").read_bytes() == b"a1"
    res = layout.cli("checkout", "s1:d/a.txt", "--version", "3", "-o", tmp_path / "v3")
    assert res.returncode == 1 and not (tmp_path / "v3").exists()
    one_line_error(res)


def test_checkout_of_a_directory_at_a_time(layout, tmp_path):
    _two_uploads(layout)
    received1 = layout.open_store().index.upload(1)["received"]
    res = layout.cli("checkout", "s1:d", "--at", received1, "-o", tmp_path / "at1")
    assert res.returncode == 0, res.stderr
    assert tree_files(tmp_path / "at1") == {b"a.txt": b"a1", b"b.txt": b"b1"}
    res = layout.cli("checkout", "s1:d", "-o", tmp_path / "now")
    assert tree_files(tmp_path / "now") == {b"a.txt": b"a2", b"b.txt": b"b1", b"c.txt": b"c2"}
    res = layout.cli("checkout", "s1:", "--at", received1, "-o", tmp_path / "all1")
    assert tree_files(tmp_path / "all1") == {b"d/a.txt": b"a1", b"d/b.txt": b"b1", b"top.txt": b"t1"}
    res = layout.cli("checkout", "s1:d", "--at", "2000-01-01T00:00:00Z", "-o", tmp_path / "before")
    assert res.returncode == 1 and not (tmp_path / "before").exists()
    one_line_error(res)
    res = layout.cli("checkout", "s1:d", "--at", "yesterday", "-o", tmp_path / "bad")
    assert res.returncode == 2
    one_line_error(res)


def test_checkout_of_a_directory_as_of_an_upload(layout, tmp_path):
    r1, r2 = _two_uploads(layout)
    res = layout.cli("checkout", "s1:d", "--upload", r1.upload, "-o", tmp_path / "u1")
    assert res.returncode == 0, res.stderr
    assert tree_files(tmp_path / "u1") == {b"a.txt": b"a1", b"b.txt": b"b1"}
    res = layout.cli("checkout", "s1:d", "--upload", r2.upload, "-o", tmp_path / "u2")
    assert tree_files(tmp_path / "u2") == {b"a.txt": b"a2", b"b.txt": b"b1", b"c.txt": b"c2"}
    res = layout.cli("checkout", "s1:d", "--upload", "20000101T000000Z-00000000", "-o", tmp_path / "u0")
    assert res.returncode == 1 and not (tmp_path / "u0").exists()
    one_line_error(res)


def test_checkout_refuses_an_existing_destination_without_force(layout, tmp_path):
    _two_uploads(layout)
    dest = tmp_path / "dest.txt"
    dest.write_bytes(b"precious")
    res = layout.cli("checkout", "s1:d/a.txt", "-o", dest)
    assert res.returncode == 2
    assert "exists" in one_line_error(res)
    assert dest.read_bytes() == b"precious"
    ddir = tmp_path / "dir"
    ddir.mkdir()
    res = layout.cli("checkout", "s1:d", "-o", ddir)
    assert res.returncode == 2 and os.listdir(ddir) == []
    res = layout.cli("checkout", "s1:d/a.txt", "-o", dest, "--force")
    assert res.returncode == 0, res.stderr
    assert dest.read_bytes() == b"a2"


def test_checkout_restores_mtimes_and_modes(layout, tmp_path):
    mtime = 1_500_000_000_987_654_321
    drop(layout.inbox, "s1-labA-1", {"d/a.sh": b"#!/bin/sh\n", "d/b.txt": b"b"}, mtime_ns=mtime,
         prepare=lambda p: [os.chmod(p + b"/d/a.sh", 0o750), os.chmod(p + b"/d/b.txt", 0o640)])
    ingest_ok(layout)
    res = layout.cli("checkout", "s1:d/a.sh", "-o", tmp_path / "a.sh")
    assert res.returncode == 0, res.stderr
    st_ = os.stat(tmp_path / "a.sh")
    assert st_.st_mtime_ns == mtime and stat.S_IMODE(st_.st_mode) == 0o750
    res = layout.cli("checkout", "s1:d", "-o", tmp_path / "d")
    for name, mode in (("a.sh", 0o750), ("b.txt", 0o640)):
        st_ = os.stat(tmp_path / "d" / name)
        assert st_.st_mtime_ns == mtime and stat.S_IMODE(st_.st_mode) == mode


def test_checkout_detects_a_corrupted_object_and_leaves_no_output(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/good.txt": b"good", "d/bad.bin": b"0123456789" * 1000})
    ingest_ok(layout)
    obj = layout.store() / "objects" / hash_bytes(b"0123456789" * 1000)[:2] / hash_bytes(b"0123456789" * 1000)[2:]
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0x01]))
    os.chmod(obj, 0o444)
    out = tmp_path / "out"
    out.mkdir()
    res = layout.cli("checkout", "s1:d/bad.bin", "-o", out / "bad.bin")
    assert res.returncode == 1
    msg = one_line_error(res)
    assert "corrupt" in msg or "integrity" in msg
    assert os.listdir(out) == []
    res = layout.cli("checkout", "s1:d", "-o", out / "d")
    assert res.returncode == 1
    one_line_error(res)
    if (out / "d").exists():      # nothing but complete, verified files
        assert set(os.listdir(out / "d")) <= {"good.txt"}


def test_an_entry_with_no_files_is_refused_with_its_reason_and_kept(layout):
    """A folder sent empty, or emptied by its sender after it was handed in
    (store_format.md 11.1): no upload of "0 files" is recorded; the entry is
    failed with one line that says so, and stays where a person finds it."""
    entry = layout.inbox / "s1-labA-1"
    (entry / "sub").mkdir(parents=True)        # folders only: still no file
    [r] = layout.ingest()
    assert r.outcome == "failed" and "holds no files" in r.reason and "emptied" in r.reason
    assert layout.manifests() == []
    assert os.path.isdir(os.fsdecode(r.where)) and os.path.basename(r.where).startswith(".eidetic~failed~")


def test_an_entry_whose_files_are_only_links_is_ingested_as_skipped_records(layout):
    """Not empty: a symlink is recorded (skipped), so the upload says what was there."""
    entry = layout.inbox / ".s1-labA-1"
    entry.mkdir()
    os.symlink("/etc/passwd", entry / "link")
    os.rename(entry, layout.inbox / "s1-labA-1")
    [r] = layout.ingest()
    assert r.outcome == "ingested" and r.files == 0 and r.skipped == 1
