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
from itertools import groupby
from operator import attrgetter
from typing import TYPE_CHECKING

from ..core import layout
from ..core.errors import EideticError
from ..core.fsutil import makedirs, rename, temp_name
from .index import Version
from .objects import ObjectStore

if TYPE_CHECKING:
    from .store import Store

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
        self._dirs_ok: dict[bytes, bytes] = {}   # source dir -> tree dir known to exist

    def _ensure_parent(self, path: bytes) -> bytes | None:
        """Create the mapped parent directories of *path*; returns the tree
        directory, or None when a parent name is taken by something that is
        not a directory and cannot become one."""
        head = path.rpartition(b"/")[0]
        if not head:
            return self.root
        known = self._dirs_ok.get(head)
        if known is not None:
            return known
        cur = self.root
        for comp in layout.tree_relpath(head).split(b"/"):
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
        if len(self._dirs_ok) > 100_000:  # bounded memory for huge uploads
            self._dirs_ok.clear()
        self._dirs_ok[head] = cur
        return cur

    def _is_object(self, st: os.stat_result, oid: str) -> bool:
        return (st.st_dev, st.st_ino) in set(self.objects.inode_ids(oid))

    def place_version(self, v: Version) -> bool:
        """Make the immutable name of version *v*; returns True if created."""
        parent = self._ensure_parent(v.path)
        if parent is None:
            raise TreeConflict(v.path)
        dest = parent + b"/" + layout.version_name(v.path.rpartition(b"/")[2], v.n, v.stamp)
        try:
            self.objects.link(v.blake3, dest)
            return True
        except FileExistsError:
            pass
        if not self._is_object(os.lstat(dest), v.blake3):
            raise TreeConflict(dest)
        return False

    def place_plain(self, v: Version) -> bool:
        """Point the plain name at version *v* (the latest); False when the
        name is a directory (the path was later sent as a directory)."""
        parent = self._ensure_parent(v.path)
        if parent is None:
            return False
        dest = parent + b"/" + layout.plain_name(v.path.rpartition(b"/")[2])
        if v.n > 1:
            # A new version of a known path: its plain name is (almost always)
            # there, on an older version.  Replace it at once rather than first
            # fail to link over it and look at it: three system calls per
            # re-sent changed file instead of seven.
            return self._replace_plain(v, dest)
        try:
            self.objects.link(v.blake3, dest)   # a new path: no temp needed
            return True
        except FileExistsError:
            pass
        st = os.lstat(dest)
        if stat.S_ISDIR(st.st_mode):
            return False
        if self._is_object(st, v.blake3):
            return True
        return self._replace_plain(v, dest)

    def _replace_plain(self, v: Version, dest: bytes, other_inode: bool = False) -> bool:
        """*other_inode*: the caller knows the plain name is not on *v*'s
        object, so the rename consumes the temp name and no unlink follows."""
        tmp = self.tmp_dir + b"/" + temp_name().encode()
        self.objects.link(v.blake3, tmp)
        try:
            rename(tmp, dest)
        except OSError as e:
            os.unlink(tmp)
            if e.errno in (errno.EISDIR, errno.ENOTEMPTY):
                return False
            raise
        if other_inode:
            return True
        try:
            # rename(2) between two names of one inode does nothing and keeps
            # the source: a re-run after a crash finds the plain name already
            # on this version.
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        return True

    def place_new(self, v: Version) -> None:
        """A version just added by the index (ingest, before the chunk holding
        it commits): its version name, and the plain name now shows it."""
        self.place_version(v)
        if v.n > 1:
            # The path's plain name is on its previous version, whose content
            # differs (a new version is only made for new content): another
            # inode, so the rename consumes the temp name.  (Were it on this
            # version after all, the temp link would stay in tmp/, which the
            # next ingest empties at its start: nothing is lost either way.)
            # One unlink(2) less per re-sent changed file: 3 system calls in
            # the tree instead of 4.
            parent = self._ensure_parent(v.path)
            if parent is not None:
                self._replace_plain(v, parent + b"/" + layout.plain_name(v.path.rpartition(b"/")[2]),
                                    other_inode=True)
            return
        self.place_plain(v)

    def ensure_root(self) -> None:
        makedirs(self.root, DIR_MODE)


def place_all(store: Store, skip: frozenset[str] | set[str] = frozenset()) -> tuple[int, list[str]]:
    """Give every version in the store's index its tree names (idempotent:
    right names are left alone, stale plain names replaced), then one
    syncfs.  Versions whose object is in *skip* (corrupt or missing) get no
    name.  Used by 'fsck --repair' and by 'restore'.  Returns (version names
    made, one line per name that could not be made)."""
    tree = Tree(store.tree, store.objects, os.path.join(store.root, "tmp"))
    tree.ensure_root()
    made = 0
    problems: list[str] = []
    for _, group in groupby(store.index.iter_versions(), attrgetter("path")):
        vs = list(group)
        for v in vs:
            if v.blake3 in skip:
                continue
            try:
                made += tree.place_version(v)
                if v is vs[-1]:
                    tree.place_plain(v)
            except TreeConflict as e:
                problems.append(f"{e.message} (it could not be moved aside)")
            except OSError as e:
                problems.append(f"could not re-create the names of {layout.display(v.path)} v{v.n}: "
                                f"{e.strerror or e}")
    store.sync()
    return made, problems
