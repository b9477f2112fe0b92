"""Zero-copy ingest: where an entry and its study's store are on one file
system that can clone (XFS with reflink=1, Btrfs), a large new object is a
clone of the uploader's file (FICLONE), a new inode that no later write to
that file can change; elsewhere it is streamed as before.  init --check
says which (store_format.md §4, docs/admin.md "Zero-copy ingest").

The XFS tests make a small loop-mounted image (root, xfsprogs, a loop
device); where that cannot be had they are skipped, saying why."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import Layout, check_store, drop, fsck_errors, make_layout, tree_files

import eidetic.server.config
import eidetic.server.deploy
import eidetic.store.objects
from eidetic.core.hashing import hash_bytes
from eidetic.store.objects import ObjectStore

MiB = 1 << 20


# ------------------------------------------------------------ the XFS image

def _unmount(mnt: Path) -> None:
    if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)   # busy: detach it anyway


@pytest.fixture(scope="module")
def xfs(tmp_path_factory) -> Path:
    """A 320 MiB XFS file system with reflink=1 on a loop device, mounted for
    this module's tests; unmounted and removed afterwards, also on failure."""
    if os.geteuid() != 0:
        pytest.skip("mounting an XFS loop image needs root")
    for tool in ("mkfs.xfs", "losetup", "mount", "umount", "filefrag"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install xfsprogs e2fsprogs util-linux)")
    d = tmp_path_factory.mktemp("xfs")
    img, mnt = d / "img", d / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(320 * MiB)
    try:
        made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"mkfs.xfs -m reflink=1 failed: {made.stderr.strip()}")
        mounted = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount an XFS loop image here (no loop devices?): {mounted.stderr.strip()}")
        try:
            yield mnt
        finally:
            _unmount(mnt)
    finally:
        img.unlink(missing_ok=True)


def shared_extents(path) -> bool:
    """Does every extent of *path* carry FIEMAP_EXTENT_SHARED (filefrag -v: 'shared')?"""
    out = subprocess.run(["filefrag", "-v", str(path)], capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in out.splitlines() if ln.strip()[:1].isdigit() and ":" in ln and ".." in ln]
    assert rows, out
    return all("shared" in ln for ln in rows)


def used_bytes(path) -> int:
    os.sync()
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def site(root: Path, name: str, **kw):
    return make_layout(root / name, studies=("s1",), **kw)


def the_object(lay, data: bytes) -> Path:
    oid = hash_bytes(data)
    p = lay.store() / "objects" / oid[:2] / oid[2:]
    assert p.exists(), "the object is not where its id says"
    return p


# ------------------------------------------------------------------- tests

def test_a_large_file_on_a_cloning_file_system_is_stored_as_a_clone_sharing_its_extents(xfs):
    lay = site(xfs, "share")
    data = os.urandom(MiB) * 64                 # 64 MiB, one object
    entry = drop(lay.inbox, "s1-big", {"big.bin": data, "small.txt": b"a small file is written as before"})
    os.sync()
    before = used_bytes(xfs)
    [r] = lay.ingest()
    assert r.outcome == "ingested", r.reason
    grew = used_bytes(xfs) - before
    assert grew < 16 * MiB, f"storing a clone of 64 MiB took {grew / MiB:.1f} MiB more space"
    obj = the_object(lay, data)
    assert shared_extents(obj)
    src = Path(r.where) / "big.bin"            # the uploader's file, kept in the done entry
    assert shared_extents(src)
    s, o = os.stat(src), os.stat(obj)
    assert s.st_ino != o.st_ino                 # a new inode, never a hardlink to the uploader's file
    assert (o.st_mode & 0o7777, o.st_nlink) == (0o444, 3)   # the object, its plain and its version name
    assert not shared_extents(the_object(lay, b"a small file is written as before"))
    assert tree_files(lay.tree())[b"big.bin"] == data
    assert entry and fsck_errors(lay) == []
    check_store(lay)


@pytest.mark.parametrize("change", ["append", "overwrite in place", "truncate"])
def test_a_write_to_the_uploaders_file_after_ingest_changes_neither_object_nor_tree(xfs, change):
    lay = site(xfs, "write-" + change.replace(" ", "-"))
    data = os.urandom(MiB) * 8
    drop(lay.inbox, "s1-w", {"d/data.bin": data})
    [r] = lay.ingest()
    assert r.outcome == "ingested", r.reason
    src = Path(r.where) / "d" / "data.bin"
    obj = the_object(lay, data)
    assert shared_extents(obj)
    # The uploader still owns its file (here: the kept done entry) and writes to it.
    with open(src, "r+b") as f:
        if change == "append":
            f.seek(0, os.SEEK_END)
            f.write(b"more")
        elif change == "overwrite in place":
            f.seek(MiB)
            f.write(b"\xff" * (2 * MiB))
        else:
            f.truncate(100)
        f.flush()
        os.fsync(f.fileno())
    assert Path(src).read_bytes() != data
    assert obj.read_bytes() == data
    assert hash_bytes(obj.read_bytes()) == obj.parent.name + obj.name
    assert tree_files(lay.tree())[b"d/data.bin"] == data
    assert fsck_errors(lay) == []
    check_store(lay)


def test_an_entry_on_another_file_system_is_streamed(xfs, tmp_path):
    """Store and tree on XFS, the study's inbox on this machine's other file
    system: no clone can be made (EXDEV), the object is a plain copy."""
    lay = site(xfs, "other-fs", shared_inbox=False, own_inbox=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc["studies"]["s1"]["inbox"] = str(tmp_path / "inbox")
    lay.config_path.write_text(json.dumps(doc))
    lay = Layout(lay.root, lay.config_path, eidetic.server.config.load(str(lay.config_path)))
    eidetic.server.deploy.init(lay.cfg)
    assert os.stat(lay.study_inbox("s1")).st_dev != os.stat(lay.store()).st_dev
    data = os.urandom(MiB) * 4
    drop(lay.study_inbox("s1"), "s1-far", {"far.bin": data})
    [r] = lay.ingest()
    assert r.outcome == "ingested", r.reason
    obj = the_object(lay, data)
    assert not shared_extents(obj)
    assert obj.read_bytes() == data and tree_files(lay.tree())[b"far.bin"] == data
    assert fsck_errors(lay) == []
    res = lay.cli("init", "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "study s1: clones: no (the inbox is on another file system than the store)" in res.stdout


def test_init_check_says_whether_clones_work_and_stays_exit_0(xfs, tmp_path):
    xlay = site(xfs, "check")
    res = xlay.cli("init", "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "study s1: clones: yes" in res.stdout
    assert "all is well" in res.stdout
    assert not [n for n in os.listdir(xlay.inbox) if n.startswith(".")], "the probe left a file in the inbox"
    assert os.listdir(xlay.store() / "tmp") == []
    # --json: the findings ([] when all is well); the clone lines as "info" entries with -v.
    res = xlay.cli("init", "--check", "--json")
    assert (res.returncode, json.loads(res.stdout)) == (0, [])
    res = xlay.cli("init", "--check", "--json", "-v")
    assert res.returncode == 0
    [info] = json.loads(res.stdout)
    assert (info["code"], info["severity"], info["study"], info["clones"]) == ("clones", "info", "s1", True)
    assert info["inbox"] == str(xlay.inbox) and info["path"] == str(xlay.store())
    # The same layout on a file system that cannot clone (or across two): no, with the reason.
    plain = site(tmp_path, "plain")
    res = plain.cli("init", "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    [line] = [ln for ln in res.stdout.splitlines() if "clones:" in ln]
    assert line.startswith("study s1: clones: no (") and line.endswith(")")


def test_init_check_says_no_without_a_cloning_file_system(tmp_path):
    """Runs everywhere: this machine's test directory cannot clone into
    itself unless it is XFS or Btrfs; either way the answer is one line, exit 0."""
    lay = site(tmp_path, "here")
    res = lay.cli("init", "--check")
    assert res.returncode == 0, res.stdout + res.stderr
    [line] = [ln for ln in res.stdout.splitlines() if "clones:" in ln]
    assert line.startswith(("study s1: clones: no (", "study s1: clones: yes ("))
    res = lay.cli("-q", "init", "--check")
    assert "clones:" not in res.stdout


# ------------------------------------------------- the fallback, anywhere

def _refusing(calls: list, err: int):
    def clone_into(dst_fd, src_fd):
        calls.append((dst_fd, src_fd))
        raise OSError(err, os.strerror(err))
    return clone_into


def test_a_refused_clone_streams_and_is_not_tried_again_on_that_file_system(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(eidetic.store.objects, "clone_into", _refusing(calls, errno.EOPNOTSUPP))
    (tmp_path / "tmp").mkdir()
    store = ObjectStore(tmp_path, tmp_path / "tmp")
    datas = [os.urandom(2 * MiB) for _ in range(3)]
    for i, data in enumerate(datas):
        src = tmp_path / f"src{i}"
        src.write_bytes(data)
        fd = os.open(src, os.O_RDONLY)
        try:
            res = store.put_fd(fd, len(data), lambda oid: False, dev=os.fstat(fd).st_dev)
        finally:
            os.close(fd)
        assert (res.oid, res.size, res.new) == (hash_bytes(data), len(data), True)
        assert Path(store.path(res.oid).decode()).read_bytes() == data
    assert len(calls) == 1 and store.cloned == 0
    assert os.listdir(tmp_path / "tmp") == []


def test_a_store_fault_while_cloning_is_a_store_fault_not_a_silent_fallback(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(eidetic.store.objects, "clone_into", _refusing(calls, errno.ENOSPC))
    (tmp_path / "tmp").mkdir()
    store = ObjectStore(tmp_path, tmp_path / "tmp")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(2 * MiB))
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            store.put_fd(fd, 2 * MiB, lambda oid: False, dev=os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    assert e.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path / "tmp") == []       # no temp left behind


def test_small_files_and_files_without_a_device_are_never_cloned(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(eidetic.store.objects, "clone_into", _refusing(calls, errno.EOPNOTSUPP))
    (tmp_path / "tmp").mkdir()
    store = ObjectStore(tmp_path, tmp_path / "tmp")
    for size, dev in ((1000, 1), (4 * MiB, None)):
        src = tmp_path / f"f{size}"
        src.write_bytes(os.urandom(size))
        fd = os.open(src, os.O_RDONLY)
        try:
            store.put_fd(fd, size, lambda oid: False, dev=dev)
        finally:
            os.close(fd)
    assert calls == []
