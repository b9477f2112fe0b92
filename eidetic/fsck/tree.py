"""The tree pass: the tree against the fresh index at HEAD, as one merge of two streams.

The index lists versions in key order, which is a depth-first order of the
uploaded paths (everything under ``d/`` is contiguous).  The scan keeps a
stack of the tree directories it is inside; each is listed once
(``scandir``: names, kinds and inode numbers in one go) and every expected
name is popped from its listing.  A name not in the listing is missing;
whatever is left when the scan leaves a directory is a name no version
accounts for.  Per path: no index lookup, one lstat (of the object, to
compare inode numbers), and memory for one listing per level.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from itertools import groupby
from operator import itemgetter
from typing import Callable

from ..core import layout
from ..core.fsutil import is_temp_name
from ..store.index import Index, Version
from ..store.objects import ObjectStore
from .codes import Finding, Findings

ID_CACHE = 1 << 17      # objects whose inode numbers the scan remembers (~20 MiB at most)


@dataclass(slots=True)
class _Dir:
    """One tree directory while the scan is inside it."""

    src: bytes                        # source directory path (b"" = the study's root)
    rel: bytes                        # its tree path relative to the tree root
    abs: bytes
    dev: int
    entries: dict = field(default_factory=dict)   # name -> DirEntry, popped when a version accounts for it
    state: str = "listed"             # | "missing" (names in it are missing) | "unknown" (unreadable)
    pending_plain: dict = field(default_factory=dict)   # plain name not found (yet: may be a dir) -> latest
    plain_is_dir: dict = field(default_factory=dict)    # file's plain name found as a directory -> latest

    def rel_of(self, name: bytes) -> bytes:
        return self.rel + b"/" + name if self.rel else name


class TreeScan:
    def __init__(self, out: Findings, progress: Callable, idx: Index, objects: ObjectStore, root: bytes,
                 pending: Callable[[int], bool]) -> None:
        self.out, self.progress, self.idx, self.objects, self.root = out, progress, idx, objects, root
        self.pending = pending             # is manifest seq not yet applied to the live index?
        self.entries = 0
        self.closed: set[bytes] = set()    # source dirs already left (only a key order anomaly revisits one)
        # (st_dev, st_ino) of objects already looked up (None: missing): a path's version and plain
        # names ask about one object, and a study's copies of the same data (the same files sent
        # again at another path) about the same objects.  Bounded: cleared when it is full.
        self._ids: dict[str, tuple[int, int] | None] = {}

    def run(self) -> None:
        try:
            st = os.lstat(self.root)
        except FileNotFoundError:
            return self.out.add("E035", self.root, "'fsck --repair' re-creates it")
        if not stat.S_ISDIR(st.st_mode):
            return self.out.add("E035", self.root, "not a directory")
        top = _Dir(b"", b"", self.root, st.st_dev)
        self._dir_mode(self.root, st)
        self._list(top)
        stack = [top]
        for _, vs in groupby(self.idx.iter_scan(), itemgetter(0)):     # by path
            self._path(stack, list(vs))
        while stack:
            self._close(stack.pop())
        self._ids.clear()       # settle asks again later: an object may have been added meanwhile
        self.out.stats["tree_entries"] = self.entries

    def _missing(self, rel: bytes, v: Version, kind: str) -> None:
        what = f"version {v.n} of {layout.display(v.path)}" if kind == "version" else \
            f"plain name of {layout.display(v.path)} (latest: version {v.n})"
        path, data = self.root + b"/" + rel, {"rel": rel, "seq": v.seq}
        if self.pending(v.seq):
            self.out.add("W036", path, f"{what}, from manifest {v.seq} which the index has not applied yet", data)
        else:
            self.out.add("E030", path, what + ("" if self.objects.exists(v.blake3) else
                                               "; its object is missing too"), data)

    # ------------------------------------------------------------ directories

    def _list(self, d: _Dir) -> None:
        try:
            with os.scandir(d.abs) as it:
                d.entries = {e.name: e for e in it}
        except FileNotFoundError:
            d.state = "missing"
        except OSError as e:
            self.out.add("E037", d.abs, e.strerror or str(e))
            d.state = "unknown"
        else:
            self.entries += len(d.entries)
            self.progress("tree", self.entries, None)

    def _dir_mode(self, path: bytes, st: os.stat_result) -> None:
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self.out.add("E034", path, f"mode {stat.S_IMODE(st.st_mode):04o}: others could add, remove or "
                                       "rename names")

    def _dir_for(self, stack: list, src: bytes) -> _Dir | None:
        """The stack moved to source directory *src*; None if the key order came back to a directory
        already left (then the path is checked on its own)."""
        while stack[-1].src and stack[-1].src != src and not src.startswith(stack[-1].src + b"/"):
            self._close(stack.pop())
        top = stack[-1]
        if top.src == src:
            return top
        rest = src[len(top.src) + 1:] if top.src else src
        for comp in rest.split(b"/"):
            child = top.src + b"/" + comp if top.src else comp
            if child in self.closed:
                return None
            top = self._open(top, comp, child)
            stack.append(top)
        return top

    def _open(self, parent: _Dir, comp: bytes, src: bytes) -> _Dir:
        pn = layout.plain_name(comp)
        parent.pending_plain.pop(pn, None)       # a file's plain name that is (rightly) this directory
        parent.plain_is_dir.pop(pn, None)
        d = _Dir(src, parent.rel_of(pn), parent.abs + b"/" + pn, parent.dev)
        if parent.state != "listed":
            d.state = parent.state
            return d
        e = parent.entries.pop(pn, None)
        if e is None:
            d.state = "missing"
        elif not e.is_dir(follow_symlinks=False):
            self.out.add("E031", e.path, f"a {_kind(e)} where the directory {layout.display(src)} belongs",
                         data={"rel": d.rel})
            d.state = "missing"
        else:
            st = e.stat(follow_symlinks=False)
            d.dev = st.st_dev
            self._dir_mode(e.path, st)
            self._list(d)
        return d

    def _close(self, d: _Dir) -> None:
        self.closed.add(d.src)
        if d.state == "unknown":
            return
        for pn, v in d.pending_plain.items():
            self._missing(d.rel_of(pn), v, "plain")
        for name in sorted(d.entries):
            e = d.entries[name]
            v = d.plain_is_dir.get(name)
            if v is not None:
                self.out.add("E031", e.path, f"a directory where {layout.display(v.path)} (version {v.n}) belongs",
                             data={"rel": d.rel_of(name)})
            else:
                self._leftover(d, name, e)

    # ---------------------------------------------------------------- names

    def _path(self, stack: list, vs: list) -> None:
        """All versions *vs* of one path (oldest first)."""
        latest = vs[-1]
        head, _, comp = latest.path.rpartition(b"/")
        d = stack[-1]
        if d.src != head:
            d = self._dir_for(stack, head)
            if d is None:
                return self._path_alone(vs)
        if d.state == "unknown":
            return
        entries = d.entries
        for v in vs:
            vn = layout.version_name(comp, v.n, v.stamp)
            e = entries.pop(vn, None)
            if e is None:
                self._missing(d.rel_of(vn), v, "version")
            else:
                self._judge_file(e, d, d.rel_of(vn), v)
        pn = layout.plain_name(comp)
        e = entries.get(pn)
        if e is None:
            d.pending_plain[pn] = latest          # missing, unless the path is also a directory
            return
        if e.is_dir(follow_symlinks=False):
            d.plain_is_dir[pn] = latest           # right if the path is also a directory
            return
        del entries[pn]
        data = {"rel": d.rel_of(pn), "path": latest.path}
        if not e.is_file(follow_symlinks=False):
            return self.out.add("E031", e.path, f"a {_kind(e)} where {layout.display(latest.path)} (version "
                                                f"{latest.n}) belongs", data={"rel": d.rel_of(pn)})
        ino = e.inode()
        if self._is_object(ino, d.dev, latest.blake3) is not False:
            return
        older = next((o for o in reversed(vs[:-1]) if self._is_object(ino, d.dev, o.blake3)), None)
        if older is not None:
            self.out.add("E032", e.path, f"shows version {older.n}, the latest is {latest.n}", data=data)
        else:
            self.out.add("E031", e.path, f"the latest version ({latest.n}) is object {latest.blake3}", data=data)

    def _is_object(self, ino: int, dev: int, oid: str) -> bool | None:
        """Is (dev, ino) the object *oid* (or a twin)?  None when the object is missing (E021 says so).
        Answers are remembered (self._ids) for the rest of the scan."""
        ids = self._ids
        if oid in ids:
            want = ids[oid]
        else:
            try:    # once per object: the answer is remembered
                st = os.lstat(self.objects.path(oid))
                want = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                want = None
            if len(ids) >= ID_CACHE:
                ids.clear()
            ids[oid] = want
        if want is None:
            return None
        if want[1] == ino and want[0] == dev:
            return True
        return (dev, ino) in set(self.objects.inode_ids(oid))      # a twin (hardlink limit)

    def _path_alone(self, vs: list) -> None:
        """A path met after its directory was left (a key order anomaly of very long paths): its names
        were judged one by one when the directory was left; only missing ones remain to report."""
        for v in vs:
            rel = layout.version_relpath(v.path, v.n, v.stamp)
            if not os.path.lexists(self.root + b"/" + rel):
                self._missing(rel, v, "version")
        rel = layout.tree_relpath(vs[-1].path)
        if not os.path.lexists(self.root + b"/" + rel):
            self._missing(rel, vs[-1], "plain")

    def _leftover(self, d: _Dir, name: bytes, e) -> None:
        """A name no version popped: a temp name, a hand-made entry, or (rarely) the name of a path
        the key order has not reached here; the index decides."""
        rel = d.rel_of(name)
        if is_temp_name(name):
            return self.out.add("W051", e.path, "left by an interrupted tree update", data={"rel": rel})
        if e.is_dir(follow_symlinks=False) and self._is_source_dir(d, name, rel):
            return
        v = self._lookup(d, name, rel)
        if v is None:
            self.out.add("E033", e.path, f"a {_kind(e)} no version accounts for", data={"rel": rel, "src": d.src})
        else:
            self._judge_file(e, d, rel, v)

    def _judge_file(self, e, d: _Dir, rel: bytes, v: Version) -> None:
        """The tree name *e* of version *v*: a hardlink to its object, or E031."""
        if not e.is_file(follow_symlinks=False):
            self.out.add("E031", e.path, f"a {_kind(e)} where version {v.n} of {layout.display(v.path)} belongs",
                         data={"rel": rel})
        elif self._is_object(e.inode(), d.dev, v.blake3) is False:
            self.out.add("E031", e.path, f"version {v.n} of {layout.display(v.path)} should be object {v.blake3}",
                         data={"rel": rel})

    # ------------------------------------- by index lookups (slow path, and settle)

    def _is_source_dir(self, d: _Dir, name: bytes, rel: bytes) -> bool:
        orig = layout.unplain_name(name)
        if orig is None:
            r = self.idx.resolve_cut(rel)
            path = r[0] if r is not None and r[1] is None else None
        else:
            path = d.src + b"/" + orig if d.src else orig
        return path is not None and self.idx.has_dir(path)

    def _lookup(self, d: _Dir, name: bytes, rel: bytes) -> Version | None:
        """The version a tree name stands for (the latest, for a plain name)."""
        parsed = layout.parse_version_name(name)
        orig, n, stamp = parsed if parsed is not None else (layout.unplain_name(name), None, None)
        if orig is None:        # a name cut to fit 255 bytes: only the index knows its path
            r = self.idx.resolve_cut(rel)
            if r is None or (r[1] is None) != (n is None):
                return None
            path, n = r
        else:
            path = d.src + b"/" + orig if d.src else orig
        try:
            if n is None:
                plain = layout.tree_relpath(path) == rel and not self.idx.has_dir(path)
                return self.idx.latest(path) if plain else None
            v = self.idx.version(path, n)
            return v if v is not None and v.stamp == stamp and layout.version_relpath(path, n, stamp) == rel else None
        except ValueError:
            return None

    def explains(self, f: Finding, st: os.stat_result) -> bool:
        """Does the index (since caught up with manifests committed during the check) now account
        for the tree entry of E031/E032/E033 finding *f* (now *st*)?"""
        data = f.data or {}
        if f.code == "E033":
            rel, src = data.get("rel"), data.get("src")
            if rel is None or src is None:
                return False
            head, _, name = rel.rpartition(b"/")
            d = _Dir(src, head, b"", 0)
            if stat.S_ISDIR(st.st_mode) and self._is_source_dir(d, name, rel):
                return True
            return self._lookup(d, name, rel) is not None
        path = data.get("path")       # E031/E032 of a plain name: does it show the latest version now?
        if path is None or not stat.S_ISREG(st.st_mode):
            return False
        v = self.idx.latest(path)
        return v is not None and self._is_object(st.st_ino, st.st_dev, v.blake3) is True


def _kind(e) -> str:
    if e.is_symlink():
        return "symlink"
    if e.is_dir(follow_symlinks=False):
        return "directory"
    if e.is_file(follow_symlinks=False):
        return "file"
    return "special file"
