"""The LMDB index (eidetic/index.py): versions derived from manifests,
resumable application, and a cache that can always be rebuilt."""

from __future__ import annotations

import os
import pathlib
import shutil
import struct
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eidetic.server.config
import eidetic.server.deploy
import eidetic.server.ingest
from eidetic.store import index as index_mod
from eidetic.core import layout
from eidetic.core.errors import StoreFormatError
from eidetic.store.index import Index
from eidetic.store.manifest import FileRecord, Header, ManifestWriter, SkipRecord
from eidetic.core.hashing import hash_bytes
from eidetic.store.store import Store


RECEIVED = ["2026-11-21T20:44:55.000001Z", "2026-11-22T09:00:00.000002Z", "2026-11-23T10:15:00.000003Z",
            "2026-11-24T11:00:00.000004Z", "2026-11-25T12:00:00.000005Z", "2026-11-26T13:00:00.000006Z"]


def oid(content: bytes | str) -> str:
    return hash_bytes(content.encode() if isinstance(content, str) else content)


def frec(path: bytes, content: str, size: int | None = None, mode: int = 0o644, mtime: int = 1) -> FileRecord:
    return FileRecord(path, len(content) if size is None else size, oid(content), mode, mtime)


class Manifests:
    """Hand-written manifests in one directory, chained like a store's."""

    def __init__(self, root) -> None:
        self.dir = os.path.join(root, "manifests")
        os.makedirs(self.dir, exist_ok=True)
        self.paths: list[str] = []
        self.prev: str | None = None

    def add(self, records) -> str:
        seq = len(self.paths) + 1
        path = os.path.join(self.dir, f"{seq:010d}.jsonl")
        h = Header(seq=seq, upload=f"2026112{seq % 10}T000000Z-{seq:08x}", prev=self.prev, study="foo",
                   entry=b"foo-labA-%d" % seq, received=RECEIVED[(seq - 1) % len(RECEIVED)],
                   uploader_uid=1000, uploader_name="alice", source="labA")
        with open(path, "wb") as f:
            w = ManifestWriter(f, h)
            for r in records:
                w.add(r)
            self.prev = w.finish()
        self.paths.append(path)
        return path


# LMDB fsyncs every commit and ingest runs syncfs: on a busy disk that is most
# of the run time, so these tests work on a tmpfs when there is one.
_FAST_BASE = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@pytest.fixture
def fast_tmp(tmp_path):
    if _FAST_BASE is None:
        yield tmp_path
        return
    d = pathlib.Path(tempfile.mkdtemp(prefix="eidetic-test-index-", dir=_FAST_BASE))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def open_index(fast_tmp):
    opened: list[Index] = []

    def _open(name: str = "index") -> Index:
        idx = Index(str(fast_tmp / name))
        opened.append(idx)
        return idx

    yield _open
    for idx in opened:
        idx.close()


def dump(idx: Index) -> list:
    return list(idx.dump())


# ------------------------------------------------------------ version numbers

def test_a_new_version_only_when_the_content_changes(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    assert idx.apply_manifest(m.add([frec(b"s1.txt", "A")])) == 1
    assert idx.apply_manifest(m.add([frec(b"s1.txt", "B")])) == 1
    assert idx.apply_manifest(m.add([frec(b"s1.txt", "A")])) == 1          # A, B, A: three versions
    assert idx.apply_manifest(m.add([frec(b"s1.txt", "A", mtime=99)])) == 0  # identical re-send
    vs = idx.versions_of(b"s1.txt")
    assert [(v.n, v.blake3, v.seq) for v in vs] == [(1, oid("A"), 1), (2, oid("B"), 2), (3, oid("A"), 3)]
    assert [v.received for v in vs] == RECEIVED[:3]
    assert vs[0].stamp == "20261121T204455Z"
    assert idx.latest(b"s1.txt") == vs[-1]
    assert idx.version(b"s1.txt", 2) == vs[1]
    assert idx.version(b"s1.txt", 4) is None
    assert idx.applied() == (4, m.prev)
    assert idx.upload(4)["new_versions"] == 0 and idx.upload(4)["files"] == 1
    assert idx.upload_seq("20261124T000000Z-00000004") == 4


def test_applying_a_manifest_twice_changes_nothing(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    p = m.add([frec(b"a", "1"), frec(b"b", "2")])
    assert idx.apply_manifest(p) == 2
    before = dump(idx)
    assert idx.apply_manifest(p) == 0
    assert dump(idx) == before


def test_manifests_must_be_applied_in_sequence(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    m.add([frec(b"a", "1")])
    p2 = m.add([frec(b"a", "2")])
    with pytest.raises(StoreFormatError, match="cannot apply 2"):
        idx.apply_manifest(p2)
    assert idx.applied() == (0, None)


def test_objects_users_and_large_sizes_are_recorded(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    big = index_mod.LARGE_OBJECT
    idx.apply_manifest(m.add([frec(b"x", "same"), frec(b"y", "same"), frec(b"big", "B", size=big),
                              SkipRecord(b"link", "symlink", b"/etc/passwd")]))
    assert idx.is_trusted(oid("same")) and idx.is_trusted(oid("B"))
    assert not idx.is_trusted(oid("never stored"))
    assert idx.size_seen(big) and not idx.size_seen(big + 1) and not idx.size_seen(4)
    assert sorted(idx.iter_objects()) == sorted([(oid("same"), 4), (oid("B"), big)])
    assert idx.stats() == {"path_versions": 3, "objects": 2, "uploads": 1}
    assert idx.upload(1)["skipped"] == 1
    assert idx.versions_of(b"link") == []
    used = idx.users_of([oid("same"), oid("B"), oid("never stored")], 10)
    assert {o: ([(v.path, v.n) for v in vs], n) for o, (vs, n) in used.items()} == {
        oid("same"): ([(b"x", 1), (b"y", 1)], 2), oid("B"): ([(b"big", 1)], 1)}


def test_cut_names_resolve_to_their_source_paths(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    long_dir = b"~v" + b"d" * 253
    long_file = b"f" * 230 + b".txt"
    path = long_dir + b"/" + long_file
    idx.apply_manifest(m.add([frec(path, "A")]))
    tdir = layout.plain_name(long_dir)
    assert layout.unplain_name(tdir) is None
    assert idx.resolve_cut(tdir) == (long_dir, None)
    vrel = layout.version_relpath(path, 1, "20261121T204455Z")
    assert idx.resolve_cut(vrel) == (path, 1)
    assert idx.resolve_cut(b"nothing") is None


KEY_ROOM = index_mod.KEY_ROOM
LONG_A = b"/".join([b"d" * 200, b"e" * 200, b"same-prefix-a"])          # 415 bytes
LONG_B = b"/".join([b"d" * 200, b"e" * 200, b"same-prefix-b"])          # first 400 bytes as LONG_A
DEEP = b"/".join([b"x" * 250] * 4) + b"/f.txt"                       # 1009 bytes
_C = b"c" * 200 + b"/" + b"c" * (KEY_ROOM - 205)
BOUNDARY = [b"b" * 200 + b"/" + b"b" * (KEY_ROOM - 201), _C + b"/0/1", _C + b"/0/12"]   # 400, 400, 401 bytes


def test_paths_longer_than_an_lmdb_key_are_indexed(fast_tmp, open_index):
    assert [len(p) for p in BOUNDARY] == [KEY_ROOM, KEY_ROOM, KEY_ROOM + 1]
    assert LONG_A[:KEY_ROOM] == LONG_B[:KEY_ROOM]
    m = Manifests(fast_tmp)
    idx = open_index()
    paths = [LONG_A, LONG_B, DEEP, *BOUNDARY]
    assert idx.apply_manifest(m.add([frec(p, "A") for p in paths])) == len(paths)
    assert idx.apply_manifest(m.add([frec(p, "B" if p != LONG_B else "A") for p in paths])) == len(paths) - 1
    for p in paths:
        vs = idx.versions_of(p)
        assert [(v.path, v.n) for v in vs] == ([(p, 1)] if p == LONG_B else [(p, 1), (p, 2)])
        assert idx.latest(p) == vs[-1] and idx.version(p, 1) == vs[0]
        assert idx.has_path(p)
    for key in (k for db, k, _ in idx.dump() if db in ("versions", "cutnames")):
        assert len(key) <= 511
    used = idx.users_of([oid("A")], 100)[oid("A")]
    assert sorted(v.path for v in used[0]) == sorted(paths) and used[1] == len(paths)     # long paths whole
    assert idx.latest(LONG_A[:-1]) is None and not idx.has_path(LONG_A[:-1])
    assert idx.latest(LONG_A + b"x") is None


@pytest.mark.parametrize("prefix, expected", [
    (b"d" * 200, [LONG_A, LONG_A, LONG_B]),
    (b"d" * 200 + b"/" + b"e" * 200, [LONG_A, LONG_A, LONG_B]),       # 401-byte directory prefix
    (b"d" * 200 + b"/" + b"e" * 199, []),
    (b"x" * 250 + b"/" + b"x" * 250, [DEEP, DEEP]),
    (DEEP.rpartition(b"/")[0], [DEEP, DEEP]),
    (DEEP, []),
    (_C + b"/0", [BOUNDARY[1], BOUNDARY[1], BOUNDARY[2], BOUNDARY[2]]),
    (_C + b"/0/1", []),
])
def test_directory_scans_find_long_paths(fast_tmp, open_index, prefix, expected):
    m = Manifests(fast_tmp)
    idx = open_index()
    paths = [LONG_A, LONG_B, DEEP, *BOUNDARY]
    idx.apply_manifest(m.add([frec(p, "A") for p in paths]))
    idx.apply_manifest(m.add([frec(p, "B") for p in paths if p != LONG_B]))
    assert sorted(v.path for v in idx.iter_versions(prefix)) == sorted(expected)
    assert idx.has_dir(prefix) == bool(expected)


def test_long_cut_tree_names_resolve(fast_tmp, open_index):
    path = b"/".join([b"~v" * 60, b"~v" * 60, b"~v" * 127])     # the last name is cut, under a 617-byte key
    m = Manifests(fast_tmp)
    idx = open_index()
    idx.apply_manifest(m.add([frec(path, "A")]))
    tree_rel = layout.tree_relpath(path)
    assert len(tree_rel) == 617 and layout.unplain_name(tree_rel.rpartition(b"/")[2]) is None
    assert idx.resolve_cut(tree_rel) == (path, None)
    vrel = layout.version_relpath(path, 1, "20261121T204455Z")
    assert idx.resolve_cut(vrel) == (path, 1)


_long_components = st.one_of(
    st.builds(lambda c, n, tail: (c * n + tail)[:255], st.sampled_from([b"~", b"~v", b"x", b"\xc3\xa9", b"~-"]),
              st.integers(1, 255), st.sampled_from([b"", b".txt", b"~", b"~v1"])),
    st.sampled_from([b"a", b"b.txt", b"~v0001~20260101T000000Z.txt"]),
).filter(lambda c: c not in (b".", b".."))


@settings(max_examples=40)
@given(st.lists(st.lists(_long_components, min_size=1, max_size=6).map(b"/".join), min_size=1, max_size=8,
                unique=True))
def test_any_path_can_be_indexed_and_found_again(paths):
    root = pathlib.Path(tempfile.mkdtemp(prefix="keys-", dir=_FAST_BASE))
    m = Manifests(root)
    idx = Index(str(root / "index"))
    try:
        assert idx.apply_manifest(m.add([frec(p, "A") for p in paths])) == len(paths)
        assert idx.apply_manifest(m.add([frec(p, "B") for p in paths])) == len(paths)
        for p in paths:
            assert [v.n for v in idx.versions_of(p)] == [1, 2]
            assert idx.latest(p).blake3 == oid("B")
            head = p.rpartition(b"/")[0]
            if head:
                assert p in {v.path for v in idx.iter_versions(head)}
            for i, _ in enumerate(p.split(b"/")):
                mapped = layout.tree_relpath(b"/".join(p.split(b"/")[: i + 1]))
                if layout.unplain_name(mapped.rpartition(b"/")[2]) is None:
                    assert idx.resolve_cut(mapped) is not None
        assert sorted(v.path for v in idx.iter_versions(b"")) == sorted(paths * 2)
    finally:
        idx.close()
        shutil.rmtree(root)


def test_an_index_of_an_unknown_format_is_refused(fast_tmp, open_index):
    idx = open_index()
    with idx.env.begin(write=True) as txn:
        txn.put(b"format", b"99", db=idx.meta)
    idx.close()
    with pytest.raises(StoreFormatError, match="not understood"):
        Index(str(fast_tmp / "index"))
    index_mod._envs.pop(os.path.realpath(fast_tmp / "index")).close()


def _as_format_1(path: str) -> None:
    """Turn the index at *path* into what eidetic 0.3 wrote (format 1): the
    same databases plus "refs" (dupsort: object -> path key \\0 u32 version
    of every version using it)."""
    import lmdb     # the tests may: only the library keeps to one module per third-party import
    env = lmdb.open(path, max_dbs=16, map_size=1 << 30)
    with env.begin(write=True) as txn:
        versions = env.open_db(b"versions", txn=txn, create=False)
        refs = env.open_db(b"refs", txn=txn, dupsort=True)
        for k, v in txn.cursor(db=versions):
            txn.put(v[index_mod._DIGEST_AT:index_mod._DIGEST_END], k, db=refs, dupdata=True)
        txn.put(b"format", b"1", db=env.open_db(b"meta", txn=txn, create=False))
    env.close()


def _databases(path: str) -> dict[bytes, int]:
    import lmdb
    env = lmdb.open(path, max_dbs=16, map_size=1 << 30, readonly=True, lock=False)
    with env.begin() as txn:
        names = [k for k, _ in txn.cursor()]
        out = {n: txn.stat(env.open_db(n, txn=txn, create=False))["entries"] for n in names}
    env.close()
    return out


def test_a_format_1_index_is_read_as_it_is_and_upgraded_in_place_by_a_writer(fast_tmp):
    """Format 2 only drops "refs": readers take a format 1 index unchanged; the
    first writer drops refs and says 2, keeping every other record (no rebuild)."""
    m = Manifests(fast_tmp)
    path = str(fast_tmp / "index")
    idx = Index(path)
    for content in ("one", "two"):
        idx.apply_manifest(m.add([frec(b"a.txt", content), frec(b"d/b.txt", "one")]))
    before = list(idx.dump())
    idx.close()
    _as_format_1(path)
    assert _databases(path)[b"refs"] == 3
    reader = Index(path, create=False, write=False)
    assert reader.state().format == b"1" and [v.n for v in reader.versions_of(b"a.txt")] == [1, 2]
    assert list(reader.dump()) == before                      # what a format 2 index holds, refs aside
    reader.close()
    assert b"refs" in _databases(path)                        # a reader never writes
    writer = Index(path, create=False)
    assert writer.state().format == b"2" and list(writer.dump()) == before
    writer.apply_manifest(m.add([frec(b"a.txt", "three")]))
    assert [v.n for v in writer.versions_of(b"a.txt")] == [1, 2, 3]
    writer.close()
    assert b"refs" not in _databases(path)


# ------------------------------------------------------------------ queries

PREFIX_PATHS = [b"a", b"a/b", b"a/b/c", b"a/bc", b"ab", b"ab/c", b"a.b/x", b"a-b", b"a\x01/z", b"a b/q",
                b"b", b"zz/top"]


@pytest.fixture
def prefix_index(fast_tmp, open_index):
    m = Manifests(fast_tmp)
    idx = open_index()
    idx.apply_manifest(m.add([frec(p, "1:" + repr(p)) for p in PREFIX_PATHS]))
    idx.apply_manifest(m.add([frec(b"a", "2"), frec(b"a/b", "2"), frec(b"ab", "2")]))
    return idx


@pytest.mark.parametrize("prefix, expected", [
    (b"a", [b"a/b", b"a/b", b"a/b/c", b"a/bc"]),
    (b"a/", [b"a/b", b"a/b", b"a/b/c", b"a/bc"]),
    (b"a//", [b"a/b", b"a/b", b"a/b/c", b"a/bc"]),
    (b"a/b", [b"a/b/c"]),
    (b"a/b/c", []),
    (b"ab", [b"ab/c"]),
    (b"a.b", [b"a.b/x"]),
    (b"a-b", []),
    (b"zz", [b"zz/top"]),
    (b"zzz", []),
    (b"", sorted(PREFIX_PATHS + [b"a", b"a/b", b"ab"], key=lambda p: p + b"\0")),
])
def test_iter_versions_lists_exactly_the_directory(prefix_index, prefix, expected):
    assert [v.path for v in prefix_index.iter_versions(prefix)] == expected


def test_iter_versions_yields_versions_in_order(prefix_index):
    assert [(v.path, v.n) for v in prefix_index.iter_versions(b"a")] == \
        [(b"a/b", 1), (b"a/b", 2), (b"a/b/c", 1), (b"a/bc", 1)]


@pytest.mark.parametrize("path, ns", [
    (b"a", [1, 2]), (b"a/b", [1, 2]), (b"ab", [1, 2]), (b"a/b/c", [1]), (b"a-b", [1]), (b"zz/top", [1]),
    (b"a/", []), (b"zz", []), (b"zzz", []), (b"", []), (b"a/b/c/d", []), (b"\x00", []),
])
def test_versions_of_and_latest_see_only_that_path(prefix_index, path, ns):
    assert [v.n for v in prefix_index.versions_of(path)] == ns
    assert all(v.path == path for v in prefix_index.versions_of(path))
    latest = prefix_index.latest(path)
    if ns:
        assert latest is not None and (latest.path, latest.n) == (path, ns[-1])
    else:
        assert latest is None


def test_has_path_and_has_dir_tell_files_from_directories(prefix_index):
    assert prefix_index.has_path(b"a") and prefix_index.has_dir(b"a")
    assert prefix_index.has_path(b"a/b/c") and not prefix_index.has_dir(b"a/b/c")
    assert not prefix_index.has_path(b"zz") and prefix_index.has_dir(b"zz")
    assert not prefix_index.has_path(b"z") and not prefix_index.has_dir(b"z")


# --------------------------------------------------------------- resumable

def _two_manifests(fast_tmp) -> Manifests:
    m = Manifests(fast_tmp)
    m.add([frec(b"d/f%02d" % i, "v1-%d" % i) for i in range(12)])
    second = []
    for i in range(12):
        if i % 3 == 0:
            second.append(frec(b"d/f%02d" % i, "v1-%d" % i))        # unchanged: no new version
        else:
            second.append(frec(b"d/f%02d" % i, "v2-%d" % i))        # changed
        if i % 4 == 0:
            second.append(SkipRecord(b"d/l%02d" % i, "symlink", b"x"))
        if i % 5 == 0:
            second.append(frec(b"e/new%02d" % i, "new-%d" % i, size=index_mod.LARGE_OBJECT + i))
    m.add(second)
    return m


class Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, calls: int) -> None:
    real = Index._apply_file
    count = {"n": 0}

    def flaky(self, *args):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupt(f"killed after {calls} records")
        return real(self, *args)

    monkeypatch.setattr(Index, "_apply_file", flaky)


@pytest.mark.parametrize("chunk", [1, 4, 5, 1000])
@pytest.mark.parametrize("cuts", [[0], [1], [3], [4], [5], [9], [13], [3, 4], [4, 1, 6], [0, 0, 2]])
def test_an_interrupted_apply_resumes_to_the_same_index(fast_tmp, open_index, monkeypatch, chunk, cuts):
    m = _two_manifests(fast_tmp)
    ref = open_index("ref")
    assert ref.apply_manifest(m.paths[0]) == 12
    expected_new = ref.apply_manifest(m.paths[1])
    assert expected_new == 8 + 3

    idx = open_index("resumed")
    idx.apply_manifest(m.paths[0])
    monkeypatch.setattr(index_mod, "CHUNK_RECORDS", chunk)
    for calls in cuts:   # each run gets a little further (or not) before it is killed
        with monkeypatch.context() as mp:
            _interrupt_after(mp, calls)
            with pytest.raises(Interrupt):
                idx.apply_manifest(m.paths[1])
        assert idx.applied()[0] == 1
    assert idx.apply_manifest(m.paths[1]) == expected_new
    assert dump(idx) == dump(ref)
    with idx.env.begin() as txn:
        assert txn.get(b"partial", db=idx.meta) is None


def test_progress_is_committed_per_chunk(fast_tmp, open_index, monkeypatch):
    m = _two_manifests(fast_tmp)
    idx = open_index()
    idx.apply_manifest(m.paths[0])
    monkeypatch.setattr(index_mod, "CHUNK_RECORDS", 4)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 6)
        with pytest.raises(Interrupt):
            idx.apply_manifest(m.paths[1])
    with idx.env.begin() as txn:
        seq, pos, new = struct.unpack(">QQQ", txn.get(b"partial", db=idx.meta))
    assert seq == 2 and pos % 4 == 0 and pos > 0
    # the committed chunks are in the database, nothing past them ...
    with idx.env.begin() as txn:
        assert txn.stat(idx.versions)["entries"] == 12 + new
    # ... but a reader sees only whole uploads: manifest 2 is not applied yet
    assert idx.stats()["path_versions"] == 12
    assert all(v.seq == 1 for v in idx.iter_versions())


def _what_readers_see(idx: Index, upload2: str) -> dict:
    return {"latest": idx.latest(b"d/f01"), "versions_of": idx.versions_of(b"d/f01"),
            "version": idx.version(b"d/f01", 2), "has_path": idx.has_path(b"e/new00"),
            "has_dir": idx.has_dir(b"e"), "iter_versions": list(idx.iter_versions()),
            "path_count": idx.path_count(), "stats": idx.stats(), "upload": idx.upload(2),
            "upload_seq": idx.upload_seq(upload2), "objects": sorted(idx.iter_objects())}


def test_every_query_shows_whole_uploads_only_while_a_manifest_is_half_applied(fast_tmp, open_index, monkeypatch):
    m = _two_manifests(fast_tmp)
    idx = open_index()
    idx.apply_manifest(m.paths[0])
    upload2 = "20261122T000000Z-00000002"
    before = _what_readers_see(idx, upload2)
    monkeypatch.setattr(index_mod, "CHUNK_RECORDS", 4)
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 9)          # two chunks of manifest 2 committed: f01, f02, f04 v2 and e/new00 v1
        with pytest.raises(Interrupt):
            idx.apply_manifest(m.paths[1])
    with idx.env.begin() as txn:
        assert struct.unpack(">QQQ", txn.get(b"partial", db=idx.meta))[:2] == (2, 8)
        assert idx._latest_in(txn, b"d/f01").n == 2          # the writer sees its own chunks
    assert _what_readers_see(idx, upload2) == before
    idx.apply_manifest(m.paths[1])
    after = _what_readers_see(idx, upload2)
    assert after["latest"].n == 2 and after["has_dir"] and after["upload"]["upload"] == upload2


# ---------------------------------------------------------------- a cache

def _rebuild(index_dir: str, manifest_paths: list[str]) -> list:
    idx = Index(index_dir)
    try:
        for p in manifest_paths:
            idx.apply_manifest(p)
        return dump(idx)
    finally:
        idx.close()


def test_the_index_is_a_cache_rebuilt_from_manifests(fast_tmp, open_index):
    m = _two_manifests(fast_tmp)
    m.add([frec(b"d/f01", "v1-1"), frec(b"~v" + b"x" * 253, "cut"), frec(LONG_A, "long"), frec(DEEP, "deep"),
           frec(b"/".join([b"~v" * 60, b"~v" * 60, b"~v" * 127]), "long cut")])
    idx = open_index()
    for p in m.paths:
        idx.apply_manifest(p)
    original = dump(idx)
    idx.close()
    shutil.rmtree(fast_tmp / "index")
    assert _rebuild(str(fast_tmp / "index"), m.paths) == original


# ------------------------------------------------------------- real ingest

@pytest.fixture
def deployment(fast_tmp):
    cfg = eidetic.server.config.parse({
        "inbox": str(fast_tmp / "inbox"), "state": str(fast_tmp / "state"),
        "studies": {"foo": {"tree": str(fast_tmp / "tree"), "store": str(fast_tmp / "store")}},
    }, "test")
    eidetic.server.deploy.init(cfg)
    yield cfg
    Index(os.path.join(cfg.study("foo").store, "index")).close()


def send(cfg, name: str, files: dict[bytes, bytes]):
    """Upload like a client: write under a dot name, rename when complete, ingest."""
    inbox = os.fsencode(cfg.inbox)
    partial = inbox + b"/." + name.encode()
    for rel, data in files.items():
        p = partial + b"/" + rel
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
    os.rename(partial, inbox + b"/" + name.encode())
    results = eidetic.server.ingest.Ingester(cfg).run_once(settle_seconds=0)
    assert [r.outcome for r in results] == ["ingested"], [r.reason for r in results]
    return results[0]


def test_ingesting_a_b_a_gives_three_versions_and_a_resend_none(deployment):
    cfg = deployment
    r1 = send(cfg, "foo-labA-1", {b"eprime/s1.txt": b"A", b"eprime/other": b"same"})
    r2 = send(cfg, "foo-labA-2", {b"eprime/s1.txt": b"B", b"eprime/other": b"same"})
    r3 = send(cfg, "foo-labA-3", {b"eprime/s1.txt": b"A", b"eprime/other": b"same"})
    r4 = send(cfg, "foo-labA-4", {b"eprime/s1.txt": b"A", b"eprime/other": b"same"})
    assert [r.new_versions for r in (r1, r2, r3, r4)] == [2, 1, 1, 0]
    store = Store.open(*cfg.study("foo").store_args())
    idx = store.index
    vs = idx.versions_of(b"eprime/s1.txt")
    assert [(v.n, v.blake3, v.seq) for v in vs] == [(1, oid(b"A"), 1), (2, oid(b"B"), 2), (3, oid(b"A"), 3)]
    assert [v.n for v in idx.versions_of(b"eprime/other")] == [1]
    assert idx.applied()[0] == 4 and store.head() == idx.applied()
    tree = os.path.join(cfg.study("foo").tree, "eprime")
    names = sorted(os.listdir(tree))
    assert names == sorted(["s1.txt", "other", *(os.fsdecode(layout.version_name(b"s1.txt", v.n, v.stamp))
                                                  for v in vs),
                            os.fsdecode(layout.version_name(b"other", 1, idx.latest(b"eprime/other").stamp))])
    with open(os.path.join(tree, "s1.txt"), "rb") as f:
        assert f.read() == b"A"


def test_a_deleted_index_is_rebuilt_identically_after_real_ingests(deployment):
    cfg = deployment
    send(cfg, "foo-labA-1", {b"a/x": b"1", b"a/y": b"2", "ü/é.txt".encode(): b"3", b"raw/\xff": b"4"})
    send(cfg, "foo-labB-2", {b"a/x": b"1b", b"a/y": b"2", b"big": b"\0" * (index_mod.LARGE_OBJECT + 1)})
    send(cfg, "foo-labA-3", {b"a/x": b"1"})
    store = Store.open(*cfg.study("foo").store_args())
    original = dump(store.index)
    index_dir = os.path.join(cfg.study("foo").store, "index")
    store.index.close()
    shutil.rmtree(index_dir)
    assert _rebuild(index_dir, [store.manifest_path(s) for s in store.manifest_seqs()]) == original
    # and the next ingest run rebuilds it by itself
    shutil.rmtree(index_dir)
    eidetic.server.ingest.Ingester(cfg).run_once(settle_seconds=0)
    idx = Index(index_dir)
    assert dump(idx) == original


def test_an_upload_with_a_very_deep_path_is_ingested(deployment):
    cfg = deployment
    deep = b"/".join([b"d" * 200] * 3) + b"/f.txt"
    send(cfg, "foo-labA-1", {deep: b"A", b"fine": b"y"})
    send(cfg, "foo-labA-2", {deep: b"B"})
    store = Store.open(*cfg.study("foo").store_args())
    assert [v.n for v in store.index.versions_of(deep)] == [1, 2]
    tree = os.fsencode(cfg.study("foo").tree)
    with open(tree + b"/" + layout.tree_relpath(deep), "rb") as f:
        assert f.read() == b"B"
    v1 = store.index.version(deep, 1)
    with open(tree + b"/" + layout.version_relpath(deep, 1, v1.stamp), "rb") as f:
        assert f.read() == b"A"


def test_path_count_counts_each_path_once_whatever_its_versions_and_length(deployment):
    cfg = deployment
    deep = b"/".join([b"d" * 200] * 3) + b"/f.txt"          # over 400 bytes: a hashed key
    send(cfg, "foo-labA-1", {b"a.txt": b"1", b"b/c.txt": b"1", deep: b"1"})
    send(cfg, "foo-labA-2", {b"a.txt": b"2", deep: b"2", b"new.txt": b"x"})
    idx = Index(os.path.join(cfg.study("foo").store, "index"))
    assert idx.path_count() == 4
    assert idx.path_count() == len({v.path for v in idx.iter_versions()})
    assert idx.stats()["path_versions"] == 6
