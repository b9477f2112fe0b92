"""Disaster recovery: rebuild a study's store and tree from a replica.

``eidetic restore --from NAME --study S`` writes into the study's configured
store and tree, which must be absent or empty (as ``eidetic init`` leaves
them); anything else is refused untouched.  What comes from the replica is
verified before it counts: the marker must be this study's, the manifests
must form the chain up to the replica's HEAD (``prev`` digests, sequence
numbers, study, trailers), and every object's downloaded bytes must hash to
its id.  They are written in the store's own commit order
(store_format.md, section 11): every object (temp file in tmp/, rename,
mode 0444), one ``syncfs``, the manifests, HEAD, and the marker last.  Then
the index is rebuilt from the manifests and every tree name made, with the
code ``fsck --repair`` uses (``Store.rebuild_index``, ``tree.place_all``),
so the tree has the same version names as before the disaster.

**Resumable.**  The first thing restore writes is ``tmp/restore.json``
(store_format.md, "Replicas"): while it exists the store is a restore in
progress, every other eidetic command refuses it (``Store.check_format``),
and ``restore`` run again with the same replica goes on where it stopped:
objects already present are re-hashed (a killed run's bytes may never have
reached the disk) and kept when sound, everything else is fetched again.
The file is removed when the tree is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

from ..core import layout
from ..core.errors import IntegrityError, ReplicaCorrupt, ReplicaMissing, RestoreRefused
from ..core.fsutil import fsync, fsync_dir, makedirs, open_temp, rename, write_atomic
from ..core.hashing import new_hasher, write_all
from ..store.manifest import FileRecord, ManifestReader
from ..store.objects import OBJECT_MODE, ObjectStore
from ..store.store import MARKER_TEXT, RESTORE_MARKER, STORE_DIRS, Store
from ..store.tree import place_all
from .backend import HEAD_KEY, MARKER_KEY, Backend, bounded_map

Progress = Callable[[str, int, "int | None"], None]
READ_CHUNK = 1 << 20
WORKERS = 4         # downloads in flight: S3 latency, not bandwidth, bounds small objects


@dataclass
class RestoreReport:
    manifests: int = 0
    objects: int = 0
    object_bytes: int = 0
    fetched: int = 0               # objects downloaded (the rest were found sound from a killed run)
    resumed: bool = False
    versions: int = 0
    notes: list[str] = field(default_factory=list)


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


# ------------------------------------------------------------ one object

def fetch_object(backend: Backend, oid: str, objects: ObjectStore, durable: bool,
                 size: int | None = None, before_place: Callable[[], None] | None = None) -> int:
    """Download object *oid* into *objects*: streamed into a new temp file
    of the store's tmp/ while hashed, refused (ReplicaCorrupt) unless the
    bytes hash to *oid* (and have *size*, when given), then made 0444 and
    renamed to its object path.  *durable*: fsync the file and its shard
    before and after the rename (a single repair); a restore passes False and
    makes everything durable with one syncfs.  *before_place* runs once the
    bytes are verified, before the rename (a repair moves a corrupt file
    aside there).  Returns the size."""
    key = layout.object_relpath(oid)
    tmp, fd = open_temp(objects.tmp_dir)
    try:
        h = new_hasher()
        total = 0
        with backend.open_read(key) as src:
            while True:
                chunk = src.read(READ_CHUNK)
                if not chunk:
                    break
                h.update(chunk)
                write_all(fd, chunk)
                total += len(chunk)
        got = h.hexdigest()
        if got != oid or (size is not None and total != size):
            why = f"its {total} bytes hash to {got}" if got != oid else f"{total} bytes, the manifest says {size}"
            raise ReplicaCorrupt(f"object {oid} on the replica is corrupt ({why})", backend.name)
        os.fchmod(fd, OBJECT_MODE)
        if durable:
            fsync(fd, tmp)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    final = objects.path(oid)
    shard = os.path.dirname(final)
    try:
        if before_place is not None:
            before_place()
        makedirs(shard, 0o700, 0o700)
        rename(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    if durable:
        fsync_dir(shard)
    return total


def _unlink_quiet(p: bytes) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------- the restore

def restore(store: Store, backend: Backend, progress: Progress | None = None,
            log: Callable[[str], None] | None = None) -> RestoreReport:
    """Rebuild *store* (and its tree) from *backend*; see the module's doc.
    *store* is made with ``Store(name, root, tree)`` (not ``Store.open``: the
    store may not exist yet, or be a restore in progress)."""
    progress = progress or _no_progress
    say = log or (lambda _line: None)
    rep = RestoreReport()
    backend.check_ready()
    _claim(store, backend, write=False)     # refused before anything is made, even the lock file
    makedirs(os.fsencode(store.root), 0o700)
    with store.lock():
        # Again under the lock: a second restore started meanwhile has claimed it, or not.
        rep.resumed = _claim(store, backend, write=True)
        if rep.resumed:
            say(f"study {store.name}: resuming the restore from replica {backend.name}")
        _clean_tmp(store)
        try:
            marker = _replica_marker(store, backend)
            head_seq, head_digest = _replica_head(backend)
            manifests, needed = _fetch_manifests(store, backend, head_seq, head_digest, progress)
        except BaseException:
            if not rep.resumed:
                # Nothing but downloads in tmp/ yet: leave the store empty, as found,
                # rather than a restore in progress that cannot go on.
                _clean_tmp(store)
                os.unlink(os.path.join(store.root, "tmp", RESTORE_MARKER))
            raise
        _fetch_objects(store, backend, needed, progress, rep)
        store.sync()                                        # every object durable before any manifest
        mdir = os.path.join(store.root, "manifests")
        for seq, tmp in manifests:
            rename(tmp, store.manifest_path(seq))
        fsync_dir(mdir)
        if head_seq:
            store.set_head(head_seq, head_digest)           # type: ignore[arg-type]
        write_atomic(os.path.join(store.root, layout.STORE_MARKER), marker, mode=0o444)
        rep.manifests = head_seq
        store.rebuild_index()
        progress("index", 1, 1)
        rep.versions, problems = place_all(store)
        progress("tree", rep.versions, rep.versions)
        if problems:
            raise IntegrityError(f"study {store.name}: the tree could not be made whole: "
                                 + layout.first_and_more(problems, limit=3, more=" and {} more"))
        store.close()
        os.unlink(os.path.join(store.root, "tmp", RESTORE_MARKER))
        fsync_dir(os.path.join(store.root, "tmp"))
    return rep


def _clean_tmp(store: Store) -> None:
    """What a killed restore left in tmp/ (downloads in flight), all but its note."""
    tmp = os.path.join(store.root, "tmp")
    for name in os.listdir(tmp):
        if name == RESTORE_MARKER:
            continue
        p = os.path.join(tmp, name)
        if stat.S_ISDIR(os.lstat(p).st_mode):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)


def _claim(store: Store, backend: Backend, write: bool) -> bool:
    """Make sure restore may write here and (*write*) say so in
    tmp/restore.json; True when a restore started earlier is being resumed.
    It may be resumed from another replica only while it has placed no
    manifest (objects are verified by their ids whichever replica sent them)."""
    root, tree = store.root, store.tree
    note = os.path.join(root, "tmp", RESTORE_MARKER)
    try:
        with open(note, "rb") as f:
            started = json.loads(f.read(1 << 16))
    except FileNotFoundError:
        started = None
    except (OSError, ValueError) as e:
        raise RestoreRefused(f"{note} is unreadable ({e}); it marks a restore in progress: look at the store "
                             "by hand", backend.name) from None
    doc = {"replica": backend.name, "url": backend.url,
           "started": layout.utc_iso(datetime.now(timezone.utc))}
    if started is not None:
        if started.get("replica") != backend.name:
            if any(_files_under(os.path.join(root, "manifests"))):
                raise RestoreRefused(f"the store {root} is being restored from replica "
                                     f"{started.get('replica')!r}, not {backend.name!r}, and has its manifests "
                                     f"already: run 'eidetic restore --from {started.get('replica')} --study "
                                     f"{store.name}' to finish that restore", backend.name)
            if write:
                write_atomic(note, (json.dumps(doc) + "\n").encode(), mode=0o600)
        return True
    problem = _not_empty(root, store.name) or _tree_not_empty(tree)
    if problem:
        raise RestoreRefused(f"refusing to restore study {store.name}: {problem}; restore writes only into an "
                             "empty (or absent) store and tree", backend.name)
    if not write:
        return False
    for d in STORE_DIRS:
        makedirs(os.fsencode(os.path.join(root, d)), 0o700, 0o700)
    makedirs(os.fsencode(tree), 0o755)
    write_atomic(note, (json.dumps(doc) + "\n").encode(), mode=0o600)
    return False


def _not_empty(root: str, study: str) -> str | None:
    """Why the store at *root* is not one restore may fill (None: absent, or
    as 'eidetic init' leaves it: the marker of this study, the lock, empty
    objects/, manifests/ and tmp/, and an index of nothing)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return f"{root} is not a directory"
    for name in sorted(names):
        p = os.path.join(root, name)
        st = os.lstat(p)
        if name == layout.STORE_MARKER and stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                if f.read(4096) != MARKER_TEXT.format(version=layout.FORMAT_VERSION, study=study).encode():
                    return f"{p} is not the marker of an empty store of study {study}"
        elif name == "lock" and stat.S_ISREG(st.st_mode):
            continue
        elif name in ("objects", "manifests", "tmp") and stat.S_ISDIR(st.st_mode):
            if any(_files_under(p)):
                return f"the store {root} is not empty ({name}/ holds files)"
        elif name == "index" and stat.S_ISDIR(st.st_mode):
            continue        # a cache of no manifests (init makes an empty one); rebuilt anyway
        else:
            return f"the store {root} is not empty (it holds {name})"
    return None


def _files_under(path: str) -> Iterator[str]:
    for dirpath, _dirs, files in os.walk(path):
        yield from (os.path.join(dirpath, f) for f in files)


def _tree_not_empty(tree: str) -> str | None:
    try:
        names = os.listdir(tree)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return f"the tree {tree} is not a directory"
    return f"the tree {tree} is not empty" if names else None


def _replica_marker(store: Store, backend: Backend) -> bytes:
    try:
        data = backend.read_bytes(MARKER_KEY, 4096)
    except ReplicaMissing:
        raise ReplicaMissing("it has no eidetic-store marker: nothing was ever replicated there (or the URL "
                             "is wrong)", backend.name) from None
    want = MARKER_TEXT.format(version=layout.FORMAT_VERSION, study=store.name).encode()
    if data != want:
        first = data.decode("utf-8", "replace").replace("\n", "; ").strip("; ")
        raise ReplicaCorrupt(f"its marker is not that of study {store.name} in store format "
                             f"{layout.FORMAT_VERSION} ({first!r}): wrong replica or study?", backend.name)
    return data


def _replica_head(backend: Backend) -> tuple[int, str | None]:
    try:
        text = backend.read_bytes(HEAD_KEY, 200).decode("ascii")
    except ReplicaMissing:
        return 0, None      # a marker and no HEAD: no upload was replicated yet (an empty study)
    except UnicodeDecodeError:
        raise ReplicaCorrupt("its HEAD is unreadable", backend.name) from None
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or not layout.valid_object_id(parts[1]):
        raise ReplicaCorrupt(f"its HEAD is unreadable ({text[:80]!r})", backend.name)
    return int(parts[0]), parts[1]


def _fetch_manifests(store: Store, backend: Backend, head_seq: int, head_digest: str | None,
                     progress: Progress) -> tuple[list[tuple[int, bytes]], dict[str, int]]:
    """Manifests 1..HEAD downloaded into tmp/ and checked as a chain (the
    checks of fsck's chain pass): each parses whole, has its seq and this
    study, names the previous one's digest, and the last one's digest is
    HEAD's.  Returns [(seq, temp path)] and every object they refer to (file
    records and description objects): id -> size."""
    out: list[tuple[int, bytes]] = []
    need: dict[str, int] = {}
    prev: str | None = None
    tmp_dir = os.fsencode(os.path.join(store.root, "tmp"))
    for seq in range(1, head_seq + 1):
        key = layout.manifest_relpath(seq)
        tmp, fd = open_temp(tmp_dir)
        try:
            with backend.open_read(key) as src:
                while True:
                    chunk = src.read(READ_CHUNK)
                    if not chunk:
                        break
                    write_all(fd, chunk)
            os.fchmod(fd, 0o444)
        except ReplicaMissing:
            os.close(fd)
            _unlink_quiet(tmp)
            raise ReplicaMissing(f"manifest {seq} is missing although its HEAD names manifest {head_seq}; "
                                 "'eidetic fsck --replica' shows what else is wrong", backend.name) from None
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        out.append((seq, tmp))
        try:
            r = ManifestReader(tmp)
            for rec in r.records():
                if isinstance(rec, FileRecord):
                    need[rec.blake3] = rec.size
        except IntegrityError as e:
            detail = str(e.kwargs["detail"]).replace(f"manifest {os.fsdecode(tmp)} ", "")
            raise ReplicaCorrupt(f"manifest {seq} is damaged ({detail})", backend.name) from None
        assert r.info is not None
        h = r.header
        if h.seq != seq or h.study != store.name or h.prev != prev:
            what = (f"its header says seq {h.seq}" if h.seq != seq else
                    f"it belongs to study {h.study!r}" if h.study != store.name else
                    f"its prev is {h.prev}, but manifest {seq - 1} hashes to {prev}")
            raise ReplicaCorrupt(f"manifest {seq} does not continue the chain ({what})", backend.name)
        if h.description:
            need[h.description["blake3"]] = h.description["size"]
        prev = r.info.digest
        progress("manifests", seq, head_seq)
    if head_seq and prev != head_digest:
        raise ReplicaCorrupt(f"its HEAD records digest {head_digest} but manifest {head_seq} hashes to {prev}",
                             backend.name)
    return out, need


def _fetch_objects(store: Store, backend: Backend, need: dict[str, int], progress: Progress,
                   rep: RestoreReport) -> None:
    total = sum(need.values())
    rep.objects, rep.object_bytes = len(need), total
    done = 0
    progress("objects", 0, total)

    def one(oid: str) -> tuple[int, bool]:
        size = need[oid]
        if os.path.lexists(store.objects.path(oid)):
            # Left by a killed run, maybe before its syncfs: kept only if sound.
            if store.objects.verify(oid):
                return size, False
        return fetch_object(backend, oid, store.objects, durable=False, size=size), True

    with ThreadPoolExecutor(WORKERS) as pool:
        # Results in order; the first failure stops the restore.
        for n, fetched in bounded_map(pool, one, sorted(need)):
            done += n
            rep.fetched += fetched
            progress("objects", done, total)
