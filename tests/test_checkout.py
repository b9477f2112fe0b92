"""eidetic checkout never writes where it was not asked to.

A checkout writes only at its destination: never through a symlink (at
DEST or at any folder below it), never into a study's tree or store, and
a refusal or a corrupt object leaves nothing behind.  Everything here runs
the real command on real files and real symlinks.
"""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest
from conftest import drop, fs, one_line_error, tree_files

from eidetic.core import fsutil
from eidetic.core.hashing import hash_bytes

FILES = {"eprime/a.txt": b"a2", "eprime/sub/b.txt": b"b2", "top.txt": b"t"}


def _ingest(lay, files=FILES, name="s1-labA-1"):
    drop(lay.inbox, name, files)
    results = lay.ingest()
    assert results and all(r.outcome == "ingested" for r in results), results


def _snapshot(root) -> dict:
    """Every name under *root* with what identifies it: inode, mode and
    content (a link's target).  LMDB's own files change on every read, so
    the index folder counts by name only."""
    out = {}
    root = fs(root)
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = p[len(root):]
            if b"/index/" in rel:
                out[rel] = None
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = (st.st_ino, st.st_mode, st.st_nlink, f.read())
            else:
                out[rel] = (st.st_ino, st.st_mode)
    return out


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_bytes(b"victim's own")
    return victim


def _no_temp_names(*dirs):
    for d in dirs:
        for dirpath, dirnames, files in os.walk(d):
            leftovers = [n for n in dirnames + files if fsutil.is_temp_name(n)]
            assert not leftovers, (dirpath, leftovers)


def _refused(res, code=2) -> str:
    assert res.returncode == code, (res.returncode, res.stderr)
    return one_line_error(res)


# ------------------------------------------------- symlinks at the destination

@pytest.mark.parametrize("force", [False, True])
def test_a_folder_checkout_onto_a_symlink_to_a_directory_is_refused_and_writes_nothing(layout, tmp_path, force):
    _ingest(layout)
    victim = _victim(tmp_path)
    link = tmp_path / "out"
    link.symlink_to(victim)
    before = _snapshot(victim)
    res = layout.cli("checkout", "s1:eprime", "-o", link, *(["--force"] if force else []))
    line = _refused(res)
    assert "symbolic link" in line and str(link) in line, line
    assert "--force" not in line          # --force would not help: say so, not "use --force"
    assert _snapshot(victim) == before
    assert os.readlink(link) == str(victim)
    _no_temp_names(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_a_file_checkout_onto_a_symlink_to_a_directory_never_writes_into_the_directory(layout, tmp_path, force):
    _ingest(layout)
    victim = _victim(tmp_path)
    link = tmp_path / "out"
    link.symlink_to(victim)
    before = _snapshot(victim)
    res = layout.cli("checkout", "s1:eprime/a.txt", "-o", link, *(["--force"] if force else []))
    if force:
        # --force replaces the name DEST: the link itself, never what it points to.
        assert res.returncode == 0, res.stderr
        assert not link.is_symlink() and link.read_bytes() == b"a2"
    else:
        assert "already exists" in _refused(res)
        assert os.readlink(link) == str(victim)
    assert _snapshot(victim) == before
    _no_temp_names(tmp_path)


def test_force_replaces_a_symlink_to_a_file_not_the_file_it_points_to(layout, tmp_path):
    _ingest(layout)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim's own")
    link = tmp_path / "out.txt"
    link.symlink_to(victim)
    res = layout.cli("checkout", "s1:eprime/a.txt", "-o", link)
    assert "already exists" in _refused(res)
    res = layout.cli("checkout", "s1:eprime/a.txt", "-o", link, "--force")
    assert res.returncode == 0, res.stderr
    assert not link.is_symlink() and link.read_bytes() == b"a2"
    assert victim.read_bytes() == b"victim's own"


def test_a_symlinked_folder_inside_the_destination_is_refused_and_nothing_is_written(layout, tmp_path):
    _ingest(layout)
    victim = _victim(tmp_path)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "eprime").symlink_to(victim)
    before, before_dest = _snapshot(victim), _snapshot(dest)
    res = layout.cli("checkout", "s1:", "-o", dest, "--force")
    line = _refused(res)
    assert "symbolic link" in line and str(dest / "eprime") in line, line
    assert _snapshot(victim) == before
    assert _snapshot(dest) == before_dest      # not even top.txt: refusals come before the first byte
    _no_temp_names(tmp_path)


def test_a_symlinked_file_inside_the_destination_is_replaced_not_followed(layout, tmp_path):
    _ingest(layout)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim's own")
    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / "a.txt").symlink_to(victim)
    (dest / "sub" / "b.txt").symlink_to(tmp_path / "nowhere")    # dangling: replaced all the same
    res = layout.cli("checkout", "s1:eprime", "-o", dest, "--force")
    assert res.returncode == 0, res.stderr
    assert tree_files(dest) == {b"a.txt": b"a2", b"sub/b.txt": b"b2"}
    assert not (dest / "a.txt").is_symlink() and not (dest / "sub" / "b.txt").is_symlink()
    assert victim.read_bytes() == b"victim's own"
    assert not (tmp_path / "nowhere").exists()


def test_a_symlink_swapped_in_during_a_folder_checkout_is_never_followed(layout, tmp_path):
    """A second process keeps turning DEST/eprime into a symlink to a victim
    and back while --force checkouts run: whatever each checkout then says,
    nothing ever lands in the victim."""
    _ingest(layout, {f"eprime/f{i:03}.txt": b"x" * 100 for i in range(300)})
    victim = _victim(tmp_path)
    before = _snapshot(victim)
    dest = tmp_path / "out"
    dest.mkdir()
    sub = dest / "eprime"
    stop = threading.Event()

    def swap():
        while not stop.is_set():
            try:
                if sub.is_symlink():
                    sub.unlink()
                    sub.mkdir()
                elif sub.is_dir():
                    for n in os.listdir(sub):
                        if not fsutil.is_temp_name(n):
                            os.unlink(sub / n)
                    sub.rmdir()
                    sub.symlink_to(victim)
                else:
                    sub.symlink_to(victim)
            except OSError:
                pass    # raced with the checkout itself: fine, go round again

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            res = layout.cli("checkout", "s1:", "-o", dest, "--force")
            assert res.returncode in (0, 2, 3), res.stderr
            if res.returncode:
                one_line_error(res)
    finally:
        stop.set()
        t.join()
    assert _snapshot(victim) == before
    _no_temp_names(tmp_path)


# ------------------------------------------------- never into a tree or a store

def _refused_into(layout, tmp_path, *args):
    """Run a checkout that must be refused; nothing in any tree or store changes."""
    before = {s: (_snapshot(layout.tree(s)), _snapshot(layout.store(s))) for s in ("s1", "s2")}
    res = layout.cli("checkout", *args)
    line = _refused(res)
    assert "tree" in line or "store" in line, line
    assert {s: (_snapshot(layout.tree(s)), _snapshot(layout.store(s))) for s in ("s1", "s2")} == before
    return line


def test_a_checkout_into_a_study_tree_is_refused_however_the_path_is_spelled(layout, tmp_path):
    _ingest(layout)
    tree = layout.tree()
    (link := tmp_path / "tree-link").symlink_to(tree)
    existing = tree / "eprime" / "a.txt"
    for dest in (existing,                                   # replaces a name in the tree
                 tree / "eprime" / "new.txt",                # adds one
                 tree,                                       # the tree itself
                 link / "eprime" / "a.txt",                  # through a symlinked parent
                 fs(tree) + b"/eprime/sub/../a.txt",         # through ..
                 fs(link) + b"/eprime/sub/../new.txt",
                 layout.tree("s2") / "x.txt"):               # another study's tree
        line = _refused_into(layout, tmp_path, "s1:eprime/a.txt", "-o", dest, "--force")
        assert "study s1's tree" in line or "study s2's tree" in line, line
    for dest in (tree / "eprime", tree / "restored", link / "restored", tree):
        _refused_into(layout, tmp_path, "s1:eprime", "-o", dest, "--force")
    # Run from inside the tree, the default destination (./NAME) is in it too.
    res = layout.cli("checkout", "s1:eprime/a.txt", "--force", cwd=tree / "eprime")
    assert "study s1's tree" in _refused(res)
    assert layout.cli("fsck").returncode == 0


def test_a_checkout_into_a_store_is_refused(layout, tmp_path):
    _ingest(layout)
    store = layout.store()
    for dest in (store / "x.txt", store / "objects" / "x.txt", layout.store("s2") / "manifests" / "x"):
        line = _refused_into(layout, tmp_path, "s1:eprime/a.txt", "-o", dest, "--force")
        assert "store" in line, line
    _refused_into(layout, tmp_path, "s1:eprime", "-o", store / "restored")
    _refused_into(layout, tmp_path, "s1:eprime", "-o", store, "--force")
    assert layout.cli("fsck").returncode == 0


def test_a_folder_checkout_that_would_reach_a_tree_through_a_subfolder_is_refused(layout, tmp_path):
    # The study has a folder named like the tree: checked out with --force
    # onto the trees' parent, its files would land inside tree s1.
    _ingest(layout, {"s1/x.txt": b"x", "y.txt": b"y"})
    trees = layout.tree().parent
    line = _refused_into(layout, tmp_path, "s1:", "-o", trees, "--force")
    assert "study s1's tree" in line, line
    assert not (trees / "y.txt").exists()
    assert layout.cli("fsck").returncode == 0


# ------------------------------------------------- files and folders

@pytest.mark.parametrize("force", [False, True])
def test_a_file_checkout_onto_a_folder_is_refused_in_one_accurate_line(layout, tmp_path, force):
    _ingest(layout)
    dest = tmp_path / "out"
    dest.mkdir()
    res = layout.cli("checkout", "s1:eprime/a.txt", "-o", dest, *(["--force"] if force else []))
    line = _refused(res)
    assert "folder" in line and str(dest) in line and "--force" not in line, line
    assert os.listdir(dest) == []
    _no_temp_names(tmp_path)


@pytest.mark.parametrize("force", [False, True])
def test_a_folder_checkout_onto_a_file_is_refused(layout, tmp_path, force):
    _ingest(layout)
    dest = tmp_path / "out"
    dest.write_bytes(b"mine")
    res = layout.cli("checkout", "s1:eprime", "-o", dest, *(["--force"] if force else []))
    line = _refused(res)
    assert str(dest) in line and "--force" not in line, line
    assert dest.read_bytes() == b"mine"
    _no_temp_names(tmp_path)


def test_a_folder_checkout_inside_the_destination_meets_a_file_where_it_has_a_folder(layout, tmp_path):
    _ingest(layout)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "sub").write_bytes(b"mine")
    res = layout.cli("checkout", "s1:eprime", "-o", dest, "--force")
    assert str(dest / "sub") in _refused(res)
    assert sorted(os.listdir(dest)) == ["sub"] and (dest / "sub").read_bytes() == b"mine"
    (dest / "sub").unlink()
    (dest / "a.txt").mkdir()
    res = layout.cli("checkout", "s1:eprime", "-o", dest, "--force")
    assert str(dest / "a.txt") in _refused(res)
    assert sorted(os.listdir(dest)) == ["a.txt"] and os.listdir(dest / "a.txt") == []


def test_force_writes_a_folder_into_an_existing_folder_replacing_files_not_their_inodes(layout, tmp_path):
    _ingest(layout)
    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / "mine.txt").write_bytes(b"kept")
    (dest / "sub" / "mine.txt").write_bytes(b"kept too")
    outside = tmp_path / "hardlinked.txt"
    outside.write_bytes(b"old a")
    os.link(outside, dest / "a.txt")       # a second name for an outside file
    res = layout.cli("checkout", "s1:eprime", "-o", dest)
    assert "already exists" in _refused(res)
    res = layout.cli("checkout", "s1:eprime", "-o", dest, "--force")
    assert res.returncode == 0, res.stderr
    assert tree_files(dest) == {b"a.txt": b"a2", b"sub/b.txt": b"b2", b"mine.txt": b"kept",
                                b"sub/mine.txt": b"kept too"}
    # The name was replaced (a new inode), not the file written in place.
    assert outside.read_bytes() == b"old a"
    _no_temp_names(tmp_path)


def test_a_folder_checkout_restores_nested_folders_modes_and_mtimes(layout, tmp_path):
    mtime = 1_500_000_000_123_456_789
    drop(layout.inbox, "s1-labA-1", {"d/a.sh": b"#!/bin/sh\n", "d/deep/er/b.txt": b"b"}, mtime_ns=mtime,
         prepare=lambda p: os.chmod(p + b"/d/a.sh", 0o750))
    assert all(r.outcome == "ingested" for r in layout.ingest())
    res = layout.cli("checkout", "s1:d", "-o", tmp_path / "d")
    assert res.returncode == 0, res.stderr
    assert tree_files(tmp_path / "d") == {b"a.sh": b"#!/bin/sh\n", b"deep/er/b.txt": b"b"}
    st = os.stat(tmp_path / "d" / "a.sh")
    assert st.st_mtime_ns == mtime and stat.S_IMODE(st.st_mode) == 0o750
    assert "restored 2 files" in res.stdout
    _no_temp_names(tmp_path)


# ------------------------------------------------- corrupt objects

def _corrupt(layout, data: bytes) -> None:
    h = hash_bytes(data)
    obj = layout.store() / "objects" / h[:2] / h[2:]
    os.chmod(obj, 0o644)
    with open(obj, "r+b") as f:
        f.seek(len(data) // 2)
        byte = f.read(1)
        f.seek(len(data) // 2)
        f.write(bytes([byte[0] ^ 0x01]))
    os.chmod(obj, 0o444)


def test_a_corrupt_object_leaves_nothing_at_the_destination(layout, tmp_path):
    bad = b"0123456789" * 1000
    # "a/good.txt" sorts before "bad.bin": a good file is verified and written first.
    _ingest(layout, {"d/a/good.txt": b"good", "d/bad.bin": bad, "d/z.txt": b"z"})
    _corrupt(layout, bad)
    out = tmp_path / "out"
    out.mkdir()
    for args in (["s1:d/bad.bin", "-o", out / "bad.bin"], ["s1:d", "-o", out / "d"]):
        msg = _refused(layout.cli("checkout", *args), code=1)
        assert "corrupt" in msg or "integrity" in msg, msg
        assert os.listdir(out) == []
    # Onto an existing file and into an existing folder with --force: unchanged.
    (out / "bad.bin").write_bytes(b"mine")
    (out / "d" / "a").mkdir(parents=True)
    (out / "d" / "a" / "good.txt").write_bytes(b"mine")
    before = _snapshot(out)
    for args in (["s1:d/bad.bin", "-o", out / "bad.bin"], ["s1:d", "-o", out / "d"]):
        _refused(layout.cli("checkout", *args, "--force"), code=1)
        assert _snapshot(out) == before
    _no_temp_names(tmp_path)


def test_a_checkout_never_restores_an_uploaders_setuid_setgid_or_sticky_bit(tmp_path, layout):
    def special_modes(partial):
        os.chmod(partial + b"/suid.sh", 0o4755)
        os.chmod(partial + b"/sgid.sh", 0o2750)
        os.chmod(partial + b"/sticky.txt", 0o1644)

    drop(layout.inbox, "s1-labA-1", {"suid.sh": b"#!/bin/sh\nid\n", "sgid.sh": b"#!/bin/sh\n", "sticky.txt": b"s"},
         prepare=special_modes)
    [r] = layout.ingest()
    assert r.outcome == "ingested", r.reason
    out = tmp_path / "out"
    res = layout.cli("checkout", "s1:", "-o", str(out))
    assert res.returncode == 0, res.stderr
    modes = {n: stat.S_IMODE(os.lstat(out / n).st_mode) for n in ("suid.sh", "sgid.sh", "sticky.txt")}
    assert modes == {"suid.sh": 0o755, "sgid.sh": 0o750, "sticky.txt": 0o644}
