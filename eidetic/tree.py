"""The browsable read-only tree: hardlinks to objects, named by layout.py.

Every version of a file has an immutable version name; the plain name is
replaced atomically (link in the store's tmp/, rename into place) to show
the latest version.  Everything here is idempotent, so a re-run after a
crash, or ``fsck --repair``, simply calls it again.
"""

from __future__ import annotations

import errno
import os
import stat

from . import layout
from .errors import EideticError
from .fsutil import makedirs, temp_name
from .index import Version
from .objects import ObjectStore

DIR_MODE = 0o755


class TreeConflict(EideticError):
    """tree name {path} exists but is not the expected object; run 'eidetic fsck'"""

    def __init__(self, path: bytes) -> None:
        super().__init__("", path=layout.display(path))


class Tree:
    def __init__(self, root: str, objects: ObjectStore, tmp_dir: str) -> None:
        self.root = os.fsencode(root)
        self.objects = objects
        self.tmp_dir = os.fsencode(tmp_dir)
        self._dirs_ok: set[bytes] = set()

    def abs(self, rel: bytes) -> bytes:
        return self.root + b"/" + rel

    def _ensure_parent(self, path: bytes) -> bytes | None:
        """Create the mapped parent directories of *path*; returns the tree
        directory, or None when a parent name is taken by something that is
        not a directory and cannot be (a version name never is)."""
        head = path.rpartition(b"/")[0]
        if not head:
            return self.root
        trel = layout.tree_relpath(head)
        if trel in self._dirs_ok:
            return self.abs(trel)
        cur = self.root
        for comp in trel.split(b"/"):
            cur = cur + b"/" + comp
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                os.mkdir(cur, DIR_MODE)
                continue
            if stat.S_ISDIR(st.st_mode):
                continue
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                # A file's plain name now needed as a directory: the file's
                # content stays reachable under its version names.
                os.unlink(cur)
                os.mkdir(cur, DIR_MODE)
                continue
            return None
        self._dirs_ok.add(trel)
        return self.abs(trel)

    def _is_object(self, st: os.stat_result, oid: str) -> bool:
        return (st.st_dev, st.st_ino) in set(self.objects.inode_ids(oid))

    def place_version(self, v: Version) -> bool:
        """Make the immutable name of version *v*; returns True if created."""
        parent = self._ensure_parent(v.path)
        if parent is None:
            raise TreeConflict(v.path)
        dest = parent + b"/" + layout.version_name(v.path.rpartition(b"/")[2], v.n, v.stamp)
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            self.objects.link(v.blake3, dest)
            return True
        if not self._is_object(st, v.blake3):
            raise TreeConflict(dest)
        return False

    def place_plain(self, v: Version) -> bool:
        """Point the plain name at version *v* (the latest); False when the
        name is a directory (the path was later sent as a directory)."""
        parent = self._ensure_parent(v.path)
        if parent is None:
            return False
        dest = parent + b"/" + layout.plain_name(v.path.rpartition(b"/")[2])
        try:
            st = os.lstat(dest)
            if stat.S_ISDIR(st.st_mode):
                return False
            if self._is_object(st, v.blake3):
                return True
        except FileNotFoundError:
            pass
        tmp = self.tmp_dir + b"/" + temp_name().encode()
        self.objects.link(v.blake3, tmp)
        try:
            os.rename(tmp, dest)
        except OSError as e:
            os.unlink(tmp)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY):
                return False
            raise
        return True

    def ensure_root(self) -> None:
        makedirs(self.root, DIR_MODE)
