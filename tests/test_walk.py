"""core/walk.py: the one directory walker, the kind table, and layout's "first N, and N more"."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eidetic.core import layout
from eidetic.core.description import walk_key
from eidetic.core.walk import (BLOCKDEV, CHARDEV, DIR, ERROR, FIFO, FILE, KIND_WORDS, KINDS, LEAVE, SOCKET,
                               SYMLINK, UNKNOWN, kind_of, listing, walk)
from eidetic.store.manifest import SKIP_KINDS

REPO = Path(__file__).resolve().parent.parent


def fs(p) -> bytes:
    return os.fsencode(p)


def make_tree(top: bytes, files: dict[bytes, bytes]) -> None:
    for rel, data in files.items():
        path = top + b"/" + rel
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)


def entries(top, **kw) -> list[tuple[bytes, str]]:
    with walk(top, **kw) as w:
        return [(e.rel, e.kind) for e in w]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------- order

# Any name a POSIX file system takes: bytes that are not "/" or NUL, not "."
# or "..", undecodable UTF-8, newlines and "~" included.
names = st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_")) \
    .filter(lambda b: b not in (b".", b".."))
trees = st.dictionaries(st.lists(names, min_size=1, max_size=4).map(tuple), st.binary(max_size=4),
                        min_size=1, max_size=12)


def _prefix_free(paths) -> dict[bytes, bytes]:
    """Drop every path that is a folder of another (a name is a file or a folder, not both)."""
    out: dict[bytes, bytes] = {}
    for parts, data in sorted(paths.items(), key=lambda kv: len(kv[0])):
        if any(parts[:i] in out for i in range(1, len(parts))) or \
                any(k[:len(parts)] == parts for k in out):
            continue
        out[parts] = data
    return {b"/".join(p): d for p, d in out.items()}


@settings(max_examples=60)
@given(trees)
def test_files_come_in_walk_key_order_by_fd_and_by_path_alike(tmp_path_factory, tree):
    files = _prefix_free(tree)
    top = fs(tmp_path_factory.mktemp("t"))
    make_tree(top, files)
    by_fd = [rel for rel, kind in entries(top) if kind == FILE]
    assert by_fd == sorted(files, key=walk_key)
    assert entries(top) == entries(top, by_path=True)
    assert sorted(entries(top)) == sorted(entries(top, sort=False))


def test_a_folder_comes_before_its_contents_and_leave_after(tmp_path):
    top = fs(tmp_path)
    make_tree(top, {b"a/b/x": b"", b"a.txt": b"", b"a/c": b""})
    assert entries(top, leave=True) == [(b"a", DIR), (b"a/b", DIR), (b"a/b/x", FILE), (b"a/b", LEAVE),
                                        (b"a/c", FILE), (b"a", LEAVE), (b"a.txt", FILE)]


def test_entries_carry_their_parent_fd_path_and_depth(tmp_path):
    top = fs(tmp_path)
    make_tree(top, {b"d/\xff\nodd": b"x"})
    with walk(top) as w:
        d, f = list(w)[:2]
    assert (d.depth, f.depth) == (0, 1)
    assert f.path == top + b"/d/\xff\nodd" and f.name == b"\xff\nodd"
    fd = os.open(top, os.O_RDONLY)
    try:
        with walk(fd) as w:
            for e in w:
                assert e.path is None
                assert os.path.samestat(os.stat(e.name, dir_fd=e.dir_fd, follow_symlinks=False), e.lstat())
        os.fstat(fd)           # the caller's fd is the caller's: still open
    finally:
        os.close(fd)
    with walk(str(tmp_path)) as w:        # a str top gives str paths (the sending client's)
        assert [e.path for e in w] == [str(tmp_path / "d"), os.path.join(str(tmp_path), "d", os.fsdecode(b"\xff\nodd"))]


def test_the_tops_own_error_comes_from_the_call(tmp_path):
    with pytest.raises(FileNotFoundError):
        walk(fs(tmp_path / "missing"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        walk(fs(tmp_path / "file"))


# ---------------------------------------------------------- never followed

def _swapping_lister(victim: bytes, swap):
    done = []

    def lister(dfd):
        out = listing(dfd)
        if not done and victim in [n for n, _ in out]:
            done.append(True)
            os.rename(victim, b".old-" + victim, src_dir_fd=dfd, dst_dir_fd=dfd)
            swap(dfd)
        return out
    return lister, done


@pytest.mark.parametrize("now", [SYMLINK, FIFO, FILE])
@pytest.mark.parametrize("stat_all", [False, True])
def test_a_folder_swapped_after_the_listing_is_reported_as_what_it_is_now_never_entered(tmp_path, now, stat_all):
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "s.txt").write_bytes(b"SECRET")
    top = fs(tmp_path / "top")
    make_tree(top, {b"victim/inner.txt": b"inner", b"ok.txt": b"ok"})

    def swap(dfd):
        if now == SYMLINK:
            os.symlink(str(secret), b"victim", dir_fd=dfd)
        elif now == FIFO:
            os.mkfifo(b"victim", dir_fd=dfd)
        else:
            os.close(os.open(b"victim", os.O_WRONLY | os.O_CREAT, dir_fd=dfd))

    lister, done = _swapping_lister(b"victim", swap)
    got = run_bounded(lambda: entries(top, lister=lister, stat=stat_all))
    assert done
    assert [(r, k) for r, k in got if not r.startswith(b".old-")] == [(b"ok.txt", FILE), (b"victim", now)]


def test_a_symlink_to_a_folder_is_never_entered(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "x").write_bytes(b"x")
    top = tmp_path / "top"
    top.mkdir()
    (top / "link").symlink_to(tmp_path / "outside")
    (top / "dangling").symlink_to(tmp_path / "nowhere")
    assert entries(fs(top)) == [(b"dangling", SYMLINK), (b"link", SYMLINK)]
    assert entries(fs(top), stat=True) == entries(fs(top), by_path=True) == entries(fs(top))
    with walk(fs(top)) as w:
        assert stat.S_ISLNK(next(w).lstat().st_mode)     # while the walk is on: its dir_fd is open


def run_bounded(fn, seconds: float = 20):
    """fn() in a thread: a walk that opened a FIFO would block forever."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert out, "the walk blocked (did it open a FIFO?)"
    return out[0]


def test_fifos_sockets_and_devices_are_reported_and_never_opened(tmp_path):
    import socket
    top = tmp_path / "top"
    top.mkdir()
    os.mkfifo(top / "fifo")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(top / "sock"))
        kinds = {FIFO, SOCKET}
        if os.geteuid() == 0:
            os.mknod(top / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
            kinds.add(CHARDEV)
        for kw in ({}, {"stat": True}, {"by_path": True}):
            got = run_bounded(lambda: entries(fs(top), **kw))
            assert {k for _, k in got} == kinds
    finally:
        s.close()


def test_a_fifo_listed_as_a_folder_is_not_opened(tmp_path):
    """Even a listing that lies (d_type says folder) cannot make the walk open a FIFO."""
    top = fs(tmp_path)
    os.mkfifo(top + b"/f")
    got = run_bounded(lambda: entries(top, lister=lambda dfd: [(b"f", DIR)]))
    assert got == [(b"f", FIFO)]


def test_a_folder_that_vanishes_after_the_listing_is_an_error_entry(tmp_path):
    top = fs(tmp_path)
    make_tree(top, {b"gone/x": b"", b"kept": b""})

    def lister(dfd):
        out = listing(dfd)
        if b"gone" in [n for n, _ in out]:
            os.unlink(b"gone/x", dir_fd=dfd)
            os.rmdir(b"gone", dir_fd=dfd)
        return out
    with walk(top, lister=lister) as w:
        got = list(w)
    assert [(e.rel, e.kind) for e in got] == [(b"gone", ERROR), (b"kept", FILE)]
    assert isinstance(got[0].error, FileNotFoundError) and got[0].listed == DIR


def test_skip_leaves_an_entry_out_without_entering_it(tmp_path):
    top = fs(tmp_path)
    make_tree(top, {b"skip/x": b"", b"a/skip": b"", b"b": b""})
    listed = []

    def lister(dfd):
        listed.append(os.fstat(dfd).st_ino)
        return listing(dfd)
    got = entries(top, skip=lambda rel: rel == b"skip", lister=lister)
    assert got == [(b"a", DIR), (b"a/skip", FILE), (b"b", FILE)]
    assert os.stat(top + b"/skip").st_ino not in listed


# ------------------------------------------------------------------ depth

def _deep(top: bytes, depth: int, wide: int = 0) -> None:
    """A chain of *depth* folders (made fd by fd: the path outgrows PATH_MAX),
    with *wide* sibling folders at the top."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(wide):
        os.mkdir(b"w%04d" % i, dir_fd=fd)
    try:
        for _ in range(depth):
            os.mkdir(b"d" * 50, dir_fd=fd)
            sub = os.open(b"d" * 50, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
        os.close(os.open(b"leaf", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)


def test_fds_grow_with_depth_only_and_all_are_closed_however_the_walk_ends(tmp_path):
    top = fs(tmp_path)
    depth = 300                        # 15,000 bytes of path: only fd by fd
    _deep(top, depth, wide=500)
    before = open_fds()
    most = 0
    n = 0
    with walk(top) as w:
        for e in w:
            n += 1
            most = max(most, open_fds() - before)
            if e.name == b"leaf":
                assert e.depth == depth
    assert n == depth + 1 + 500
    assert depth <= most <= depth + 2          # one fd per level, none per sibling
    assert open_fds() == before
    w = walk(top)
    for e in w:
        if e.depth == depth // 2:
            break
    w.close()                          # stopped halfway
    assert open_fds() == before
    w = walk(top)
    next(w)
    del w                              # dropped halfway
    assert open_fds() == before
    for kw in ({"sort": False}, {"by_path": False, "stat": True, "leave": True}):
        assert sum(1 for _ in walk(top, **kw)) >= depth
        assert open_fds() == before


def test_leave_entries_remove_a_tree_bottom_up_through_fds(tmp_path):
    top = fs(tmp_path / "t")
    os.mkdir(top)
    make_tree(top, {b"a/b/c/x": b"", b"a/y": b"", b"z": b""})
    os.symlink(b"/", top + b"/a/b/root-link")
    with walk(top, leave=True) as w:
        for e in w:
            if e.kind == LEAVE:
                os.rmdir(e.name, dir_fd=e.dir_fd)
            elif e.kind != DIR:
                os.unlink(e.name, dir_fd=e.dir_fd)
    assert os.listdir(top) == []
    assert os.path.isdir("/etc")


def test_stat_gives_every_entry_its_own_lstat_and_one_fs_stays_on_the_top_file_system(tmp_path):
    top = fs(tmp_path)
    make_tree(top, {b"d/f": b"abc"})
    os.symlink(b"d/f", top + b"/l")
    with walk(top, stat=True, one_fs=True) as w:
        got = {e.rel: e.st for e in w}
    assert got[b"d/f"].st_size == 3 and stat.S_ISLNK(got[b"l"].st_mode) and stat.S_ISDIR(got[b"d"].st_mode)
    if os.path.ismount("/proc") and os.stat("/").st_dev != os.stat("/proc").st_dev:
        # "/" holds other file systems (/proc at least): each is an ERROR (EXDEV) with its stat, not entered
        with walk(b"/", one_fs=True, skip=lambda rel: b"/" in rel) as w:
            proc = {e.rel: e for e in w}[b"proc"]
        assert proc.kind == ERROR and proc.error.errno == errno.EXDEV and stat.S_ISDIR(proc.st.st_mode)


# ------------------------------------------------------------------- kinds

def test_every_kind_has_a_word_and_the_skip_kinds_are_the_manifests():
    assert set(KIND_WORDS) == set(KINDS)
    assert set(SKIP_KINDS) == set(KINDS) - {FILE, DIR}
    assert kind_of(stat.S_IFREG | 0o644) == FILE and kind_of(stat.S_IFDIR) == DIR
    assert kind_of(stat.S_IFLNK) == SYMLINK and kind_of(stat.S_IFIFO) == FIFO
    assert kind_of(stat.S_IFSOCK) == SOCKET and kind_of(stat.S_IFCHR) == CHARDEV
    assert kind_of(stat.S_IFBLK) == BLOCKDEV and kind_of(0) == UNKNOWN


def test_the_walker_imports_where_there_is_no_fcntl_pwd_grp_or_dir_fd():
    """The sending client runs on Windows: core must import there and walk by path."""
    code = (
        "import sys, os\n"
        "for m in ('fcntl', 'pwd', 'grp', 'resource', 'termios'): sys.modules[m] = None\n"
        "os.supports_dir_fd = set(); os.supports_fd = set()\n"
        "from eidetic.core import walk, fsutil, layout\n"
        "from eidetic.client import excludes\n"
        "assert not walk._FD_WALK\n"
        "w = walk.walk(sys.argv[1])\n"
        "print(sorted((e.rel.decode(), e.kind) for e in w))\n")
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "a"))
        Path(d, "a", "f").write_bytes(b"")
        res = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, cwd=str(REPO),
                             env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[('a', 'dir'), ('a/f', 'file')]"


# --------------------------------------------------------- first N, N more

def test_first_and_more_in_each_style_the_messages_use():
    problems = [f"p{i}" for i in range(25)]
    assert layout.first_and_more(problems, limit=20) == "; ".join(problems[:20]) + " (and 5 more)"
    assert layout.first_and_more(problems[:3], limit=20) == "p0; p1; p2"
    assert layout.first_and_more(problems[:20], limit=20) == "; ".join(problems[:20])
    assert layout.first_and_more(["bad page 3", "x"], limit=1, more=" and {} more") == "bad page 3 and 1 more"
    assert layout.first_and_more(["a", "b"], total=7, more="; and {} more") == "a; b; and 5 more"
    assert layout.first_and_more(problems, limit=5, more="") == "; ".join(problems[:5])
    assert layout.first_and_more([]) == ""


@given(st.lists(st.text(max_size=5), max_size=40), st.integers(1, 30))
def test_first_n_keeps_the_first_and_counts_all(items, limit):
    f = layout.FirstN(limit)
    for i in items:
        f.add(i)
    assert f.count == len(f) == len(items) and f.named == items[:limit]
    assert f.text() == layout.first_and_more(items, limit=limit)
    assert bool(f) == bool(items)


# ------------------------------------------------------------ its callers

def test_an_entrys_last_change_is_its_newest_time_inside_never_a_links_target(tmp_path):
    from eidetic.server.inbox import last_change
    entry = tmp_path / "entry"
    make_tree(fs(entry), {b"a/b/deep.txt": b"x", b"top.txt": b"y"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (entry / "link").symlink_to(outside)
    for p in (entry / "a" / "b" / "deep.txt", entry / "a" / "b", entry / "a", entry / "top.txt", entry):
        os.utime(p, (1_000_000, 1_000_000))
    os.utime(entry / "link", (1_000_000, 1_000_000), follow_symlinks=False)
    os.utime(outside, (4_000_000_000, 4_000_000_000))       # a link's target never counts
    ctime = max(os.lstat(p).st_ctime for p in (entry, entry / "a" / "b" / "deep.txt"))
    assert ctime - 5 <= last_change(fs(entry)) <= ctime + 5 < 4_000_000_000
    os.utime(entry / "a" / "b" / "deep.txt", (4_000_000_000, 4_000_000_000))
    assert last_change(fs(entry)) == 4_000_000_000
