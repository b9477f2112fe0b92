"""The object store (eidetic/objects.py): content-addressed, write-once,
never trusting a file by its name alone."""

from __future__ import annotations

import errno
import os
import stat

import blake3
import pytest

from eidetic.core import layout
from eidetic.store import objects
from eidetic.core.errors import IntegrityError
from eidetic.store.objects import EMPTY_ID, SMALL_FILE, ObjectStore

MiB = 1 << 20


def never(_oid: str) -> bool:
    return False


def always(_oid: str) -> bool:
    return True


@pytest.fixture
def store(tmp_path) -> ObjectStore:
    (tmp_path / "store" / "tmp").mkdir(parents=True)
    return ObjectStore(str(tmp_path / "store"), str(tmp_path / "store" / "tmp"))


def content(n: int, seed: int = 0) -> bytes:
    block = bytes((i * 131 + seed) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def put(store: ObjectStore, tmp_path, data: bytes, trusted=never, size_hint: int | None = None,
        maybe_known=lambda size: False):
    src = tmp_path / "src"
    src.write_bytes(data)
    fd = os.open(src, os.O_RDONLY)
    try:
        return store.put_fd(fd, len(data) if size_hint is None else size_hint, trusted, maybe_known)
    finally:
        os.close(fd)


def stored(store: ObjectStore, oid: str, twin: int = 0) -> bytes:
    with open(store.path(oid, twin), "rb") as f:
        return f.read()


def tmp_is_empty(store: ObjectStore) -> bool:
    return os.listdir(store.tmp_dir) == []


# ---------------------------------------------------------------------- put

@pytest.mark.parametrize("size", [0, 1, 4096, SMALL_FILE - 1, SMALL_FILE, SMALL_FILE + 1, 3 * MiB,
                                  objects.CHUNK + 7, 2 * objects.CHUNK + 1])
def test_put_stores_the_bytes_under_their_blake3(store, tmp_path, size):
    data = content(size, seed=size)
    res = put(store, tmp_path, data)
    assert res.oid == blake3.blake3(data).hexdigest()
    assert (res.size, res.new) == (size, True)
    assert stored(store, res.oid) == data
    st = os.stat(store.path(res.oid))
    assert stat.S_IMODE(st.st_mode) == objects.OBJECT_MODE
    assert store.path(res.oid).endswith(layout.object_relpath(res.oid).encode())
    assert tmp_is_empty(store)
    again = put(store, tmp_path, data)
    assert (again.oid, again.size, again.new) == (res.oid, size, False)
    assert os.stat(store.path(res.oid)).st_ino == st.st_ino


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
@pytest.mark.parametrize("size", [10, 3 * MiB])
def test_objects_are_0444_whatever_the_umask(tmp_path, umask, size):
    """Created 0444 at open where the umask keeps that; the daemon's UMask=0027 does not: fchmod then."""
    (tmp_path / "store" / "tmp").mkdir(parents=True)
    old = os.umask(umask)
    try:
        s = ObjectStore(str(tmp_path / "store"), str(tmp_path / "store" / "tmp"))
        assert s._mode_at_open == (umask == 0o022)
        res = put(s, tmp_path, content(size, seed=size))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(s.path(res.oid)).st_mode) == objects.OBJECT_MODE
    assert stored(s, res.oid) == content(size, seed=size)


def test_the_empty_file_is_the_worked_example(store, tmp_path):
    res = put(store, tmp_path, b"")
    assert res.oid == EMPTY_ID
    assert store.path(EMPTY_ID).endswith(b"/objects/af/1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")


@pytest.mark.parametrize("real, hint", [(2 * MiB, 10), (SMALL_FILE + 1, SMALL_FILE), (10, 0), (0, 100),
                                        (5, SMALL_FILE * 4)])
def test_put_stores_what_is_read_whatever_the_size_hint(store, tmp_path, real, hint):
    data = content(real, seed=3)
    res = put(store, tmp_path, data, size_hint=hint)
    assert (res.oid, res.size) == (blake3.blake3(data).hexdigest(), real)
    assert stored(store, res.oid) == data


def test_a_large_resend_is_hashed_first_and_not_copied(store, tmp_path, monkeypatch):
    data = content(3 * MiB, seed=9)
    first = put(store, tmp_path, data, maybe_known=lambda size: True)   # new after all: copied
    assert first.new and stored(store, first.oid) == data
    store._placed.clear()            # a later process: only the index's word counts

    def no_copy(*a, **k):
        raise AssertionError("a known large object was copied again")

    monkeypatch.setattr(store, "_copy_stream", no_copy)
    again = put(store, tmp_path, data, trusted=lambda oid: oid == first.oid, maybe_known=lambda size: True)
    assert (again.oid, again.new) == (first.oid, False)


# ------------------------------------------------------- never trust a name

def _plant(store: ObjectStore, oid: str, garbage: bytes) -> None:
    p = store.path(oid)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(garbage)
    os.chmod(p, 0o444)


@pytest.mark.parametrize("size", [0, 100, SMALL_FILE, 3 * MiB])
def test_a_wrong_leftover_object_is_replaced_on_the_next_put(tmp_path, size):
    (tmp_path / "s" / "tmp").mkdir(parents=True)
    data = content(size, seed=5)
    oid = blake3.blake3(data).hexdigest()
    crashed = ObjectStore(str(tmp_path / "s"), str(tmp_path / "s" / "tmp"))
    _plant(crashed, oid, data[: size // 2] + b"torn write")       # a run killed before its syncfs
    fresh = ObjectStore(str(tmp_path / "s"), str(tmp_path / "s" / "tmp"))
    res = put(fresh, tmp_path, data, trusted=never, maybe_known=lambda s: True)
    assert (res.oid, res.new) == (oid, True)
    assert stored(fresh, oid) == data
    assert fresh.verify(oid)


@pytest.mark.parametrize("size", [1000, 3 * MiB])
def test_a_correct_leftover_object_is_replaced_by_the_same_bytes_without_being_read(store, tmp_path, monkeypatch,
                                                                                   size):
    """Untrusted: never relied on, not even read (store_format.md section 4)."""
    data = content(size, seed=6)
    oid = blake3.blake3(data).hexdigest()
    _plant(store, oid, data)
    ino = os.stat(store.path(oid)).st_ino
    monkeypatch.setattr(store, "verify", lambda *a: pytest.fail("an untrusted leftover was read"))
    res = put(store, tmp_path, data, trusted=never, maybe_known=lambda s: True)
    assert (res.oid, res.new) == (oid, True)
    assert os.stat(store.path(oid)).st_ino != ino
    assert stored(store, oid) == data
    assert stat.S_IMODE(os.stat(store.path(oid)).st_mode) == objects.OBJECT_MODE
    assert tmp_is_empty(store)


@pytest.mark.parametrize("size", [10, 3 * MiB])
def test_a_trusted_object_is_not_read_again(store, tmp_path, monkeypatch, size):
    data = content(size, seed=7)
    oid = blake3.blake3(data).hexdigest()
    _plant(store, oid, b"wrong but trusted")      # the index vouches for it: no re-hash

    def no_reading(*a, **k):
        raise AssertionError("a trusted object was re-read")

    monkeypatch.setattr(store, "hash_of", no_reading)
    monkeypatch.setattr(store, "verify", no_reading)
    asked = []
    res = put(store, tmp_path, data, trusted=lambda o: asked.append(o) or True)
    assert (res.oid, res.new) == (oid, False)
    assert asked == [oid]
    assert stored(store, oid) == b"wrong but trusted"
    assert tmp_is_empty(store)


def test_an_object_placed_by_this_process_is_not_read_again(store, tmp_path, monkeypatch):
    data = content(100, seed=8)
    put(store, tmp_path, data)
    monkeypatch.setattr(store, "verify", lambda *a: pytest.fail("re-read"))
    assert not put(store, tmp_path, data, trusted=lambda o: pytest.fail("asked the index")).new


# ----------------------------------------------------------------- reading

def test_copy_out_returns_the_verified_bytes(store, tmp_path):
    data = content(5 * MiB, seed=1)
    res = put(store, tmp_path, data)
    out = tmp_path / "out"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        assert store.copy_out(res.oid, fd) == len(data)
    finally:
        os.close(fd)
    assert out.read_bytes() == data


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_copy_out_detects_corruption(store, tmp_path, damage):
    data = content(2 * MiB, seed=2)
    res = put(store, tmp_path, data)
    p = store.path(res.oid)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        if damage == "flip":
            f.seek(MiB)
            b = f.read(1)
            f.seek(MiB)
            f.write(bytes([b[0] ^ 1]))
        elif damage == "truncate":
            f.truncate(len(data) - 1)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\0")
    fd = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(IntegrityError, match=res.oid):
            store.copy_out(res.oid, fd)
    finally:
        os.close(fd)
    assert not store.verify(res.oid)
    assert store.hash_of(res.oid)[0] != res.oid


def test_verify_is_false_for_a_missing_object(store):
    assert not store.verify("0" * 64)
    assert not store.exists("0" * 64)


def test_iter_files_names_objects_twins_and_foreign_files(store, tmp_path):
    a = put(store, tmp_path, b"a").oid
    b = put(store, tmp_path, b"b").oid
    os.link(store.path(a), store.path(a, 1))
    foreign = os.path.dirname(store.path(b)) + b"/stray.txt"
    open(foreign, "wb").close()
    found = sorted((oid, twin) for oid, twin, _ in store.iter_files())
    assert found == sorted([(a, 0), (a, 1), (b, 0), ("", 0)])


# ------------------------------------------------------------------ linking

def _emlink_for(monkeypatch, *sources: bytes):
    real_link = os.link
    calls = []

    def link(src, dst, *a, **k):
        calls.append(src)
        if src in sources:
            raise OSError(errno.EMLINK, "Too many links", src)
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(objects.os, "link", link)
    return calls


def test_link_hardlinks_the_object(store, tmp_path):
    oid = put(store, tmp_path, b"hello").oid
    dest = os.fsencode(tmp_path / "tree-file")
    store.link(oid, dest)
    assert os.stat(dest).st_ino == os.stat(store.path(oid)).st_ino
    with pytest.raises(FileExistsError):
        store.link(oid, dest)


def test_link_falls_back_to_a_twin_at_the_link_limit(store, tmp_path, monkeypatch):
    oid = put(store, tmp_path, b"popular").oid
    _emlink_for(monkeypatch, store.path(oid))          # the primary has 65,000 links
    d1, d2 = os.fsencode(tmp_path / "one"), os.fsencode(tmp_path / "two")
    store.link(oid, d1)
    store.link(oid, d2)
    twin = store.path(oid, 1)
    assert os.stat(d1).st_ino == os.stat(d2).st_ino == os.stat(twin).st_ino
    assert os.stat(d1).st_ino != os.stat(store.path(oid)).st_ino
    assert store.verify(oid, 1) and stored(store, oid, 1) == b"popular"
    assert stat.S_IMODE(os.stat(twin).st_mode) == objects.OBJECT_MODE
    assert not os.path.lexists(store.path(oid, 2))
    assert [ino for _, ino in store.inode_ids(oid)] == [os.stat(store.path(oid)).st_ino, os.stat(twin).st_ino]
    assert tmp_is_empty(store)


def test_link_moves_on_to_the_next_twin_when_a_twin_is_full(store, tmp_path, monkeypatch):
    oid = put(store, tmp_path, b"very popular").oid
    store.link(oid, os.fsencode(tmp_path / "warm-up"))
    os.link(store.path(oid), store.path(oid, 1))           # an existing, full twin
    _emlink_for(monkeypatch, store.path(oid), store.path(oid, 1))
    dest = os.fsencode(tmp_path / "dest")
    store.link(oid, dest)
    assert os.stat(dest).st_ino == os.stat(store.path(oid, 2)).st_ino
    assert stored(store, oid, 2) == b"very popular"


def test_a_corrupt_object_is_not_copied_into_a_twin(store, tmp_path, monkeypatch):
    oid = put(store, tmp_path, b"precious").oid
    p = store.path(oid)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"X")
    _emlink_for(monkeypatch, p)
    dest = os.fsencode(tmp_path / "dest")
    with pytest.raises(IntegrityError):
        store.link(oid, dest)
    assert not os.path.lexists(store.path(oid, 1))
    assert not os.path.lexists(dest)
    assert tmp_is_empty(store)


def test_link_reports_other_errors(store, tmp_path):
    oid = put(store, tmp_path, b"x").oid
    with pytest.raises(FileNotFoundError):
        store.link(oid, os.fsencode(tmp_path / "no-such-dir" / "dest"))
    with pytest.raises(FileNotFoundError):
        store.link("1" * 64, os.fsencode(tmp_path / "dest"))
    with pytest.raises(ValueError):
        store.link("not-an-id", os.fsencode(tmp_path / "dest"))


def test_verify_handles_objects_too_large_to_read_in_one_go(store, tmp_path):
    size = 16 * objects.CHUNK + 1          # hash_of maps such files instead of reading them
    h = blake3.blake3()
    h.update(bytes(size))
    oid = h.hexdigest()
    p = store.path(oid)
    os.makedirs(os.path.dirname(p))
    with open(p, "wb") as f:
        f.truncate(size)                   # sparse zeros: cheap to make
    assert store.hash_of(oid) == (oid, size)
    assert store.verify(oid)
    with open(p, "r+b") as f:
        f.seek(size - 1)
        f.write(b"\1")
    assert not store.verify(oid)
