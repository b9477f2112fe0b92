"""Durable, symlink-safe file-system primitives.

This is the only module that fsyncs, syncfs's, renames or links into place
(:func:`fsync`, :func:`fsync_dir`, :func:`syncfs`, :func:`rename`,
:func:`rename_at`, :func:`link`, :class:`AtomicFile`).  Everything that
writes into a store, a tree or the state directory goes through
:class:`AtomicFile` (temp file in the target directory, fsync,
``os.replace``, fsync of the directory) or, for bulk object writes whose
durability is batched per upload, through :func:`open_temp`,
:func:`rename` and one :func:`syncfs` (an object may be a clone of its
source, :func:`clone_into`, made durable the same way).  Writes that must never follow a
symlink (checkout) go through directory fds: ``AtomicFile(dir_fd=)``,
:func:`open_dir_nofollow`, :func:`mkdir_open` and :func:`rename_at`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import math
import os
import shutil
import secrets
import stat
from typing import IO, Callable

# Temp names never collide with anything layout.py produces (see store_format.md,
# "Reserved names"): "~#" cannot occur in a mapped tree name except before hex.
TEMP_PREFIX = ".~#tmp-"

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        # The symbols already loaded (libc among them): ctypes.util.find_library
        # would run ldconfig -p in a child process, slower than the call it serves,
        # and a second process under the fault tests' strace.
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.syncfs     # noqa: B018 - is it there?
        except (OSError, AttributeError):
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


_TEMP_SALT = secrets.token_hex(4)
_temp_counter = itertools.count()
_temp_pid = os.getpid()         # getpid(2) is a real system call: once per process, not per file


def _after_fork_in_child() -> None:
    global _temp_pid
    _temp_pid = os.getpid()


if hasattr(os, "register_at_fork"):     # POSIX; Windows (the client) has no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def temp_name() -> str:
    # Unique per process (pid + random salt) and per call (counter): no
    # getrandom(2) per temp file, and still unguessable for a fresh process.
    return f"{TEMP_PREFIX}{_TEMP_SALT}-{_temp_pid}-{next(_temp_counter)}"


def is_temp_name(name: bytes | str) -> bool:
    if isinstance(name, bytes):
        return name.startswith(TEMP_PREFIX.encode())
    return name.startswith(TEMP_PREFIX)


class SyncFailed(OSError):
    """fsync(2), fdatasync(2) or syncfs(2) reported an error.

    What reached the disk is then unknown, and asking again may well say
    "success" for pages the kernel already dropped ("fsyncgate"): a caller
    never retries as if the first call had succeeded.  It stops writing to
    that store and tells a person (store_format.md, "Faults")."""


def fsync(fd: int, what: str | bytes | None = None) -> None:
    try:
        os.fsync(fd)
    except OSError as e:
        raise SyncFailed(e.errno, f"fsync: {e.strerror}", what) from None


def fsync_dir(path: str | bytes) -> None:
    if not hasattr(os, "O_DIRECTORY"):
        # Windows (the uploader's settings): a folder cannot be opened or
        # fsynced there; NTFS journals the rename itself.
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd, path)
    finally:
        os.close(fd)


def syncfs(path: str | bytes) -> None:
    """Make everything written to the file system holding *path* durable.

    One syncfs per upload replaces an fsync per object (which the benchmark
    shows makes ingest several times slower); falls back to sync(2).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        libc = _load_libc()
        if hasattr(libc, "syncfs"):
            if libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise SyncFailed(err, f"syncfs: {os.strerror(err)}", path)
        else:  # pragma: no cover - every Linux libc has syncfs
            os.sync()
    finally:
        os.close(fd)


# O_BINARY: on Windows an fd opened without it translates "\n" to "\r\n".
_TEMP_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_BINARY", 0))


class AtomicFile:
    """Write a file so that readers see either the old content or the new.

    Usage::

        with AtomicFile(path, mode=0o444) as f:
            f.write(b"...")

    On a clean exit the data is fsynced, renamed over *path* and the
    directory fsynced.  On an exception the temp file is removed and *path*
    is untouched.  ``sync_file=False`` leaves the data's durability to a
    caller that batches it (``before_rename=`` runs, e.g. a syncfs, after the
    file is closed and before its name appears).  ``exclusive=True`` never
    replaces an existing *path* (link then unlink; FileExistsError).
    ``dir_fd=`` makes *path* a name in an open directory (see ``__init__``).
    """

    def __init__(self, path: str | bytes, mode: int = 0o444, sync_file: bool = True,
                 exclusive: bool = False, tmp_dir: str | bytes | None = None,
                 dir_fd: int | None = None) -> None:
        self.path = os.fsdecode(path)
        self.mode = mode
        self.sync_file = sync_file
        self.exclusive = exclusive
        # With *dir_fd*, *path* is a name in that open directory and the temp,
        # the rename and the directory's fsync all go through the fd: a
        # symlink swapped in for the directory, or for any folder above it,
        # after it was opened is never followed.  A symlink at *path* itself
        # is replaced (rename never follows its target), never written through.
        self.dir_fd = dir_fd
        if dir_fd is not None:
            if tmp_dir is not None or "/" in self.path:
                raise ValueError("AtomicFile: with dir_fd, path is a bare name and tmp_dir is not used")
            self.dir = None
            self.tmp = temp_name()
        else:
            self.dir = os.path.dirname(self.path) or "."
            self.tmp = os.path.join(os.fsdecode(tmp_dir) if tmp_dir else self.dir, temp_name())
        self._file: IO[bytes] | None = None
        self.placed = False    # the new content has its final name (set even if commit then raised)

    def open(self) -> IO[bytes]:
        fd = os.open(self.tmp, _TEMP_FLAGS, 0o600, dir_fd=self.dir_fd)
        self._file = os.fdopen(fd, "wb")
        return self._file

    __enter__ = open

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.commit()

    def commit(self, before_rename: Callable[[], None] | None = None) -> None:
        assert self._file is not None
        try:
            self._file.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(self._file.fileno(), self.mode)
            if self.sync_file:
                fsync(self._file.fileno(), self.path)
            self._file.close()
            if not hasattr(os, "fchmod"):    # Windows before 3.13 (the uploader): only read-only exists
                os.chmod(self.tmp, self.mode)
            if before_rename is not None:
                before_rename()
            fd = self.dir_fd
            if self.exclusive:
                os.link(self.tmp, self.path, src_dir_fd=fd, dst_dir_fd=fd)
                self.placed = True
                os.unlink(self.tmp, dir_fd=fd)
            else:
                os.replace(self.tmp, self.path, src_dir_fd=fd, dst_dir_fd=fd)
                self.placed = True
            if fd is None:
                fsync_dir(self.dir)
            else:
                fsync(fd, self.path)
        except BaseException:
            # Once placed, the file is visible under its name whatever fails
            # next (the temp's unlink, the directory's fsync): a caller for
            # whom that is a commit point must look at .placed, not only at
            # the exception.
            self.abort()
            raise

    def abort(self) -> None:
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except OSError:     # a write-back error on close: the temp goes anyway
                pass
        try:
            os.unlink(self.tmp, dir_fd=self.dir_fd)
        except OSError:
            # Gone already, or the unlink itself failed (EIO): a temp name is
            # garbage by definition and the next run's clean-up removes it; the
            # error that brought us here is the one to report.
            pass


def open_temp(directory: bytes, mode: int = 0o600) -> tuple[bytes, int]:
    """A new temp file in *directory* (private: 0600 unless *mode* says
    otherwise), open for writing: (its path, its fd).  Nothing about its
    durability: the caller fsyncs it, or leaves that to a later
    :func:`syncfs`, before :func:`rename`.

    The fd is writable whatever *mode* is (open(2) checks permissions only
    for an existing file), so a file meant to end read-only can be created
    with its final mode and needs no fchmod(2); but *mode* passes through the
    umask, so such a caller first asks :func:`umask_keeps`."""
    tmp = directory + b"/" + temp_name().encode()
    return tmp, os.open(tmp, _TEMP_FLAGS, mode)


def current_umask() -> int | None:
    """This process's umask, read from /proc (Linux >= 4.7) so that no thread
    ever sees it changed; None when it cannot be read that way."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return None


def umask_keeps(mode: int) -> bool:
    """True when a file created now with *mode* gets exactly *mode* (the
    umask clears none of its bits).  Unknown umask: False (fchmod instead)."""
    u = current_umask()
    return u is not None and not (mode & u)


def write_atomic(path: str | bytes, data: bytes, mode: int = 0o644) -> None:
    with AtomicFile(path, mode=mode) as f:
        f.write(data)


def makedirs(path: bytes, mode: int = 0o755, parent_mode: int = 0o755) -> bool:
    """mkdir -p (missing parents get *parent_mode*); returns True if *path* was created."""
    try:
        os.mkdir(path, mode)
        return True
    except FileExistsError:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", os.fsdecode(path))
        return False
    except FileNotFoundError:
        parent = os.path.dirname(path.rstrip(b"/"))
        if parent == path or not parent:
            raise
        makedirs(parent, parent_mode, parent_mode)
        return makedirs(path, mode, parent_mode)


# Directory fds for writing where a symlink must never be followed (checkout):
# every component is opened with O_NOFOLLOW relative to its parent's fd.
_DIR_NOFOLLOW = os.O_RDONLY
for _flag in ("O_DIRECTORY", "O_NOFOLLOW", "O_CLOEXEC"):
    _DIR_NOFOLLOW |= getattr(os, _flag, 0)     # getattr: importable on Windows (see below)


def open_dir_nofollow(name: bytes | str, dir_fd: int | None = None) -> int:
    """Open directory *name* (relative to *dir_fd*) for use as a dir_fd and
    for fsync.  A symlink at *name* is refused (ELOOP), a non-directory too
    (ENOTDIR); only the last component is checked, so callers descend one
    component at a time."""
    return os.open(name, _DIR_NOFOLLOW, dir_fd=dir_fd)


def mkdir_open(name: bytes | str, dir_fd: int, mode: int = 0o755) -> tuple[int, bool]:
    """mkdirat + :func:`open_dir_nofollow`: (fd, created).  An existing
    directory is opened; a symlink or anything else there is an OSError."""
    created = True
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        created = False
    return open_dir_nofollow(name, dir_fd), created


_RENAME_NOREPLACE = 1


def rename(src: bytes | str, dst: bytes | str, replace: bool = True, src_dir_fd: int | None = None,
           dst_dir_fd: int | None = None) -> None:
    """rename(2)/renameat(2): give *src* the name *dst*, atomically.  Nothing
    is fsynced here: the caller decides when the directory's entry must be
    durable (:func:`fsync_dir`, or one :func:`syncfs` for many).  Whatever is
    at *dst* (a file, a symlink) is replaced as a name, never followed;
    ``replace=False`` never replaces anything (renameat2 RENAME_NOREPLACE;
    FileExistsError).  A file system without that flag gets an lstat first:
    a race window it cannot close, and the rename still follows nothing."""
    if replace:
        os.replace(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    libc = _load_libc()
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        at = -100       # AT_FDCWD
        if fn(at if src_dir_fd is None else src_dir_fd, os.fsencode(src),
              at if dst_dir_fd is None else dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), os.fsdecode(dst))
    try:
        os.lstat(dst, dir_fd=dst_dir_fd)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        return
    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))


def rename_at(src_dir_fd: int, src: bytes | str, dst_dir_fd: int, dst: bytes | str,
              replace: bool = True) -> None:
    """:func:`rename` between directory fds."""
    rename(src, dst, replace, src_dir_fd, dst_dir_fd)


def link(src: bytes | str, dst: bytes | str) -> None:
    """Hardlink *src* (a link there is linked itself, never followed) as
    *dst*, which must not exist (FileExistsError).  Not fsynced: see
    :func:`rename`."""
    os.link(src, dst, follow_symlinks=False)


FICLONE = 0x40049409    # _IOW(0x94, 9, int), linux/fs.h: the whole-file clone (reflink) ioctl


def clone_into(dst_fd: int, src_fd: int) -> None:
    """Make the (empty, new) file open for writing at *dst_fd* a clone of the
    file open for reading at *src_fd*: ``ioctl(FICLONE)``, a new inode that
    shares the source's extents copy-on-write (XFS with reflink=1, Btrfs), so
    later writes to either never show in the other.  Raises OSError where the
    file systems cannot (EXDEV: two file systems; EOPNOTSUPP, ENOTTY, EINVAL:
    this one cannot clone; EPERM, ETXTBSY: this file may not be cloned).
    Nothing about durability: the clone is made durable like a written temp
    file (:func:`syncfs` before it is relied on)."""
    import fcntl     # here: the sending client (Windows too) never clones
    fcntl.ioctl(dst_fd, FICLONE, src_fd)


# getattr: the sending client runs on Windows too, which has none of these
# but O_BINARY (it follows no symlink it was not asked to, and has no FIFOs).
_READ_NOFOLLOW = os.O_RDONLY
for _flag in ("O_NOFOLLOW", "O_NONBLOCK", "O_NOCTTY", "O_CLOEXEC", "O_BINARY"):
    _READ_NOFOLLOW |= getattr(os, _flag, 0)


def open_regular_nofollow(name: bytes | str, dir_fd: int | None = None) -> tuple[int, os.stat_result]:
    """Open a regular file for reading without following a symlink, without
    blocking on a FIFO and without acquiring a controlling terminal.  Raises
    ``OSError(ELOOP)``/``OSError(EINVAL)`` when *name* is not a regular file."""
    fd = os.open(name, _READ_NOFOLLOW, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fsdecode(name))
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def raise_nofile_limit() -> None:
    """Deep entries hold one directory fd per level: use the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


def disk_percent_used(path: str | bytes) -> int:
    """How full the file system holding *path* is, the way ``df`` shows it
    (blocks reserved for root count as neither used nor free)."""
    u = shutil.disk_usage(path)
    total = u.used + u.free
    return math.ceil(100 * u.used / total) if total else 0


PROC_LOCKS = "/proc/locks"


def flock_holder(path: str | bytes, proc_locks: str = PROC_LOCKS) -> int | None:
    """The pid holding an exclusive flock(2) on *path*, 0 when none does,
    None when it cannot be told (no /proc, the file cannot be stat'ed).

    For a process that may not open *path* (a study member and the store's
    private lock): /proc/locks lists every lock by device and inode, and
    stat(2) needs no read permission.  Opening the file to probe it would
    need read access, and whoever may open a lock file may also hold it and
    stop its writer for good."""
    try:
        st = os.stat(path)
        with open(proc_locks, "rb") as f:
            text = f.read()
    except OSError:
        return None
    want = b"%02x:%02x:%d" % (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 14636 fe:00:2146386 0 EOF" ("-> " marks a waiter)
        fields = line.split()
        if len(fields) >= 6 and fields[1] == b"FLOCK" and fields[3] == b"WRITE" and fields[5] == want:
            return int(fields[4]) if fields[4].isdigit() else -1
    return 0
