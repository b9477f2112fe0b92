"""One directory walker, and the one table of file kinds.

Every walk of a folder that someone else can write to (an inbox entry at
ingest and purge, a lab PC's folder at send) and of our own directories
(``init --check``) goes through :func:`walk`.  It

* never follows a symlink below its top: each folder is opened relative to
  its parent's fd with ``O_NOFOLLOW | O_DIRECTORY`` and confirmed with
  ``fstat``; a folder swapped for a link (or a file, a FIFO) between the
  listing and the open is reported as what it is now, never entered;
* never opens anything but a folder: kinds come from the directory entry
  (``d_type``), with an ``lstat`` only where the file system does not say;
  the caller opens files (``fsutil.open_regular_nofollow``);
* holds one open fd and one listing per level of depth, whatever the number
  of files: memory and fds grow with depth only;
* goes in walk order: names sorted bytewise at each level, a folder's
  contents right after the folder, which is ``description.walk_key`` order
  (the order of manifests and upload descriptions).

Where the platform has no ``dir_fd`` (Windows, for the sending client) it
walks by path, checking each folder with ``lstat`` before listing it (a
window it cannot close there); a junction counts as a symlink.  This module
imports nothing that Windows lacks.
"""

from __future__ import annotations

import errno
import os
import stat as _stat
import sys
from typing import Callable, Iterable, Iterator

# ------------------------------------------------------------------ kinds
#
# The names are on-disk format: a manifest's skip record says one of them
# (store/manifest.py SKIP_KINDS is every kind but "file" and "dir").

FILE, DIR, SYMLINK, FIFO, SOCKET = "file", "dir", "symlink", "fifo", "socket"
CHARDEV, BLOCKDEV, UNKNOWN = "chardev", "blockdev", "unknown"
KINDS = (FILE, DIR, SYMLINK, FIFO, SOCKET, CHARDEV, BLOCKDEV, UNKNOWN)

# What the walk yields besides kinds (see Entry).
ERROR = "error"
LEAVE = "leave"

# For messages: "a symbolic link", "is a FIFO, not a regular file".
KIND_WORDS = {FILE: "regular file", DIR: "directory", SYMLINK: "symbolic link", FIFO: "FIFO",
              SOCKET: "socket", CHARDEV: "character device", BLOCKDEV: "block device",
              UNKNOWN: "file of unknown kind"}

_BY_FORMAT = {_stat.S_IFREG: FILE, _stat.S_IFDIR: DIR, _stat.S_IFLNK: SYMLINK, _stat.S_IFIFO: FIFO,
              _stat.S_IFSOCK: SOCKET, _stat.S_IFCHR: CHARDEV, _stat.S_IFBLK: BLOCKDEV}


def kind_of(mode: int) -> str:
    """The kind of a file from its ``st_mode``."""
    return _BY_FORMAT.get(_stat.S_IFMT(mode), UNKNOWN)


def kind_word(kind: str) -> str:
    return KIND_WORDS.get(kind, kind)


def kind_at(dir_fd: int | None, name: bytes | str) -> str:
    """The kind of *name* in the open folder *dir_fd* (a path when None),
    by ``lstat``: never follows it, never opens it; "unknown" if it cannot
    be looked at (gone, say)."""
    try:
        return kind_of(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return UNKNOWN


# --------------------------------------------------------------- listings

_JUNCTIONS = os.name == "nt"     # a junction is a link to a folder: never entered


# os.fsencode's own encoding and error handler, without its Python-level
# call per name (one per entry of every walk).
_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def _entry_kind(e: os.DirEntry) -> str:
    # Files first: most entries are files, and one call then tells.  Neither
    # is_file nor is_dir with follow_symlinks=False is true for a link.
    try:
        if e.is_file(follow_symlinks=False):
            return FILE
        if e.is_dir(follow_symlinks=False):
            if _JUNCTIONS and getattr(e, "is_junction", lambda: False)():
                return SYMLINK
            return DIR
        if e.is_symlink():
            return SYMLINK
        return kind_of(e.stat(follow_symlinks=False).st_mode)    # d_type says neither: lstat
    except OSError:
        return UNKNOWN


def listing(dir_fd: int) -> list[tuple[bytes, str]]:
    """Sorted (name, kind) of an open folder, kinds from the directory
    entries (``d_type``), an ``lstat`` only where they do not say."""
    with os.scandir(dir_fd) as it:
        out = [(e.name.encode(_FS_ENCODING, _FS_ERRORS), _entry_kind(e)) for e in it]
    out.sort()
    return out


def stream(dir_fd: int) -> Iterator[tuple[bytes, str]]:
    """Like :func:`listing` in the order the file system gives: nothing held
    but the open listing (for walks whose order does not matter, of folders
    that may hold millions of names).  The folder is opened for listing now,
    so an error to list it is raised here, not at the first name."""
    it = os.scandir(dir_fd)
    return _streamed(it)


def _streamed(it) -> Iterator[tuple[bytes, str]]:
    with it:
        for e in it:
            yield e.name.encode(_FS_ENCODING, _FS_ERRORS), _entry_kind(e)


def _path_listing(path: str | bytes, sort: bool) -> Iterable[tuple[bytes, str, os.DirEntry]]:
    it = os.scandir(path)
    if not sort:
        return _path_streamed(it)
    with it:
        out = [(os.fsencode(e.name), _entry_kind(e), e) for e in it]   # bytes already for a bytes path
    out.sort(key=lambda t: t[0])
    return out


def _path_streamed(it) -> Iterator[tuple[bytes, str, os.DirEntry]]:
    with it:
        for e in it:
            yield os.fsencode(e.name), _entry_kind(e), e


# ------------------------------------------------------------------ walk

class Entry:
    """One thing the walk found.

    ``kind`` is one of KINDS, or

    * ERROR: a folder that could not be entered (opened, listed, or on another
      file system with ``one_fs``; ``error`` says why) or, with ``stat``, an
      entry that could not be looked at.  ``st`` is its lstat/fstat when one
      was made.  ``listed`` is the kind its directory entry gave.
    * LEAVE (with ``leave=True``): the walk is done with folder ``rel``; its
      own fd is closed, ``dir_fd`` (its parent) is still open, so
      ``os.rmdir(e.name, dir_fd=e.dir_fd)`` removes it.

    A DIR entry comes once the folder is open and listed, before what is in
    it; ``fd`` is then its open fd (the walk closes it).  ``dir_fd`` is the
    open folder holding ``name`` (None when walking by path); ``path`` is
    the top's path joined with ``rel`` (None when the top was an fd).
    """

    __slots__ = ("rel", "name", "kind", "dir_fd", "path", "depth", "st", "fd", "error", "listed", "_de")

    def __init__(self, rel: bytes, name: bytes, kind: str, dir_fd: int | None, path, depth: int,
                 st: os.stat_result | None = None, fd: int | None = None, error: OSError | None = None,
                 listed: str | None = None, de: os.DirEntry | None = None) -> None:
        self.rel = rel
        self.name = name
        self.kind = kind
        self.dir_fd = dir_fd
        self.path = path
        self.depth = depth
        self.st = st
        self.fd = fd
        self.error = error
        self.listed = listed if listed is not None else kind
        self._de = de

    def lstat(self) -> os.stat_result:
        """The entry's own stat (a symlink's, never its target's); the one the
        walk made with ``stat=True``, else made now (while the walk is still
        in the entry's folder: ``dir_fd`` is closed when it leaves)."""
        if self.st is None:
            self.st = _lstat(self.name, self.dir_fd, self._de, self.path)
        return self.st

    def __repr__(self) -> str:
        return f"Entry({self.rel!r}, {self.kind})"


def _lstat(name: bytes, dir_fd: int | None, de: os.DirEntry | None, path) -> os.stat_result:
    """An entry's own stat: by name in its open folder, else (walking by
    path) from its listing's DirEntry, else by path."""
    if dir_fd is not None:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if de is not None:
        return de.stat(follow_symlinks=False)   # Windows: from the listing, no call
    return os.lstat(path)


def _flag(name: str) -> int:
    return getattr(os, name, 0)     # getattr: importable where a flag does not exist


_DIR_FLAGS = os.O_RDONLY | _flag("O_DIRECTORY") | _flag("O_CLOEXEC")
_NOFOLLOW = _flag("O_NOFOLLOW")
_NOATIME = _flag("O_NOATIME")       # only for the folder's owner (or root): tried, then dropped
_REFUSED = (errno.ELOOP, errno.ENOTDIR)     # not a folder (any more): a link, a file, a FIFO
_FD_WALK = (os.scandir in os.supports_fd and os.open in os.supports_dir_fd
            and os.stat in os.supports_dir_fd and bool(_NOFOLLOW))


def walk(top: int | str | bytes, **options) -> "Walk":
    """Walk everything below *top*: see :class:`Walk`."""
    return Walk(top, **options)


class Walk:
    """Walk everything below *top* (see the module doc and :class:`Entry`).

    *top* is an open folder fd (the caller's, never closed here) or a path,
    which is opened as named (a link there is followed: the caller chose it);
    nothing below it is ever followed.  The top is opened and listed when
    ``walk()`` is called, so its OSError comes from the call, before any
    entry.

    * ``stat``: lstat every entry (kinds then come from it); else only
      ``Entry.lstat()`` on demand.
    * ``one_fs``: do not enter a folder on another file system than the top
      (an ERROR entry with EXDEV and the folder's stat).
    * ``leave``: a LEAVE entry after each folder's contents (bottom-up work).
    * ``skip(rel)``: true for an entry that is neither yielded nor entered.
    * ``sort=False``: the file system's order, one listing streamed per level
      (for huge folders whose order does not matter).
    * ``lister``: the function that lists an open folder (fd walks only;
      :func:`listing` or, with ``sort=False``, :func:`stream`).
    * ``by_path``: walk by path even where dir_fd works (tests).

    Use as an iterator, ideally in ``with``: every fd the walk opened is
    closed when it ends, is closed, or is dropped (no reference cycle keeps
    it: the generator holds the walk's state, never this handle).
    """

    def __init__(self, top: int | str | bytes, *, stat: bool = False, one_fs: bool = False,
                 leave: bool = False, skip: Callable[[bytes], bool] | None = None, sort: bool = True,
                 lister: Callable[[int], Iterable[tuple[bytes, str]]] | None = None,
                 by_path: bool | None = None) -> None:
        self._gen: Iterator[Entry] | None = None
        self._first = None
        self._own_fd: int | None = None
        w = _Walker(stat, one_fs, leave, skip, sort, lister or (listing if sort else stream),
                    (not _FD_WALK) if by_path is None else by_path)
        if isinstance(top, int):
            if w.by_path:
                raise ValueError("walk: a top fd needs a platform with dir_fd")
            top_fd, top_path = top, None
        elif w.by_path:
            top_fd, top_path = None, top
        else:
            top_fd = self._own_fd = w.open(top, None, follow=True)
            top_path = top
        try:
            if one_fs:
                w.dev = (os.fstat(top_fd) if top_fd is not None else os.stat(top_path)).st_dev
            self._first = w.list(top_fd, top_path)
        except BaseException:
            self.close()
            raise
        if top_path is not None:
            w.sep = b"/" if isinstance(top_path, bytes) else os.sep
        self._gen = w.run(top_fd, top_path, self._first)

    def __iter__(self) -> Iterator[Entry]:
        return self

    def __next__(self) -> Entry:
        if self._gen is None:
            raise StopIteration
        return next(self._gen)

    def close(self) -> None:
        """Stop the walk and close every fd it opened."""
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        if self._first is not None:
            _close_listing(self._first)     # a streamed top listing the walk never started on
            self._first = None
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None

    def __enter__(self) -> "Walk":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - at interpreter shutdown
            pass


class _Walker:
    """A walk's options and state, and the walk itself (a generator)."""

    def __init__(self, want_stat: bool, one_fs: bool, leave: bool, skip, sort: bool, lister,
                 by_path: bool) -> None:
        self.want_stat = want_stat
        self.one_fs = one_fs
        self.leave = leave
        self.skip = skip
        self.sort = sort
        self.lister = lister
        self.by_path = by_path
        self.noatime = _NOATIME
        self.dev: int | None = None
        self.sep = None

    def open(self, name, dir_fd: int | None, follow: bool = False) -> int:
        flags = _DIR_FLAGS | (0 if follow else _NOFOLLOW)
        if self.noatime:
            try:
                return os.open(name, flags | self.noatime, dir_fd=dir_fd)
            except PermissionError as e:
                if e.errno != errno.EPERM:
                    raise
                self.noatime = 0      # not the owner: not permitted here, nor (likely) below
        return os.open(name, flags, dir_fd=dir_fd)

    def list(self, fd: int | None, path) -> Iterable:
        if fd is not None:
            return self.lister(fd)
        return _path_listing(path, self.sort)

    def join(self, base, name: bytes):
        if isinstance(base, str):
            name = os.fsdecode(name)
        return base + name if base.endswith(self.sep) else base + self.sep + name

    # -- the walk

    def run(self, top_fd: int | None, top_path, first: Iterable) -> Iterator[Entry]:
        want_stat, skip, leave, by_path = self.want_stat, self.skip, self.leave, self.by_path
        # frames: [fd (None by path), path, rel, name in the parent, names left]
        stack: list[list] = [[top_fd, top_path, b"", b"", iter(first)]]
        try:
            while stack:
                frame = stack[-1]
                dfd, base, rel, _own, it = frame
                try:
                    item = next(it, None)
                except OSError as err:        # a streamed listing failing midway
                    item = None
                    yield Entry(rel, _own, ERROR, stack[-2][0] if len(stack) > 1 else None, base,
                                len(stack) - 2, error=err, listed=DIR)
                if item is None:
                    stack.pop()
                    _close_listing(it)
                    if stack:
                        if dfd is not None:
                            os.close(dfd)
                        if leave:
                            yield Entry(rel, _own, LEAVE, stack[-1][0], base, len(stack) - 1, listed=DIR)
                    continue
                name, kind = item[0], item[1]
                r = rel + b"/" + name if rel else name
                if skip is not None and skip(r):
                    continue
                depth = len(stack) - 1
                path = self.join(base, name) if base is not None else None
                de = item[2] if by_path else None
                st = None
                if want_stat and kind != DIR:     # a folder's stat is the one made as it is entered
                    try:
                        st = _lstat(name, dfd, de, path)
                    except OSError as err:
                        yield Entry(r, name, ERROR, dfd, path, depth, error=err, listed=kind, de=de)
                        continue
                    if not (_JUNCTIONS and kind == SYMLINK):     # (a junction stays a link)
                        kind = kind_of(st.st_mode)
                if kind != DIR:     # (positional arguments: this is the hot path)
                    yield Entry(r, name, kind, dfd, path, depth, st, None, None, item[1], de)
                    continue
                # A folder: enter it, never through a link.
                sub = fst = None
                try:
                    if by_path:
                        fst = os.lstat(path)     # the window Windows leaves: as narrow as can be
                        now = kind_of(fst.st_mode)
                        if getattr(fst, "st_file_attributes", 0) & _stat.FILE_ATTRIBUTE_REPARSE_POINT:
                            now = SYMLINK        # a junction swapped in
                        if now != DIR:
                            yield Entry(r, name, now, dfd, path, depth, fst, listed=DIR, de=de)
                            continue
                    else:
                        try:
                            sub = self.open(name, dfd)
                        except OSError as err:
                            if err.errno not in _REFUSED:
                                raise
                            # Swapped for a link, a file or a FIFO since the listing: say
                            # what is there now, without following or opening it.
                            try:
                                now_st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                                now = kind_of(now_st.st_mode)
                            except OSError:
                                now_st, now = None, UNKNOWN
                            if now == DIR:
                                raise
                            yield Entry(r, name, now, dfd, path, depth, now_st, listed=DIR)
                            continue
                        fst = os.fstat(sub)
                        if not _stat.S_ISDIR(fst.st_mode):      # O_DIRECTORY says so; be sure
                            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path or name)
                    if self.one_fs and fst.st_dev != self.dev:
                        raise OSError(errno.EXDEV, "another file system", path or name)
                    names = self.list(sub, path)
                except OSError as err:
                    if sub is not None:
                        os.close(sub)
                    yield Entry(r, name, ERROR, dfd, path, depth, fst if fst is not None else st, error=err,
                                listed=DIR, de=de)
                    continue
                stack.append([sub, path, r, name, iter(names)])
                yield Entry(r, name, DIR, dfd, path, depth, fst, fd=sub, listed=item[1], de=de)
        finally:
            for frame in stack:
                _close_listing(frame[4])
                if frame[0] is not None and frame is not stack[0]:
                    os.close(frame[0])


def _close_listing(it) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()
