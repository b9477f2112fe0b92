"""The LMDB index of one study: a cache, always rebuildable from manifests.

Databases (one LMDB environment under ``<store>/index``; layouts in
store_format.md, "Index"):

  meta      b"format" -> b"2";  b"applied" -> seq;  b"head" -> digest of last applied manifest;
            b"partial" -> seq, records applied (a manifest being applied in chunks)
  versions  path \\0 version(4 BE) -> VersionRecord
  objects   blake3(32) -> size(8 BE) first seq(8 BE)   (also each upload description's object)
  bysize    size(8 BE) -> b""                      (large objects only: "might this be a re-send?")
  uploads   seq(8 BE) -> JSON summary of the upload (with the manifest's "description", if any)
  upload_ids upload id -> seq(8 BE)
  cutnames  tree relpath -> source relpath [\\0 version(4 BE)]  (names shortened to fit 255 bytes)

A path's versions are derived deterministically from the manifests: a new
version when the content differs from the path's latest one.

Whole uploads or nothing: a manifest is applied in chunks (memory stays flat
for any size of upload), so the records of the manifest being applied
(seq ``applied + 1``) are already in the databases before it is finished.
Every query therefore reads ``applied`` in its own read transaction and
leaves out what belongs to a later manifest; only the writer's own lookups
during an apply see everything.

Every LMDB error becomes one eidetic error here (nothing above this module
sees lmdb): a failed write or read of the disk (full, quota, I/O error,
read-only) is a StoreIOError, anything else (a file LMDB did not write:
corrupt, invalid, truncated, of another version) is IndexUnusable.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import itertools
import json
import operator
import os
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple

import lmdb

from ..core import layout
from ..core.errors import EideticError, IndexUnusable, LockBusy, StoreFormatError, StoreIOError
from .manifest import FileRecord, Header, ManifestReader

INDEX_FORMAT = b"2"
# Format 1 also had a "refs" database (object -> every path-version using it),
# written at a random place for each new version and read only by fsck's
# reports and repair, which now scan "versions" instead: a format 1 index is
# read as it is and upgraded by the first writer that opens it (_upgrade).
READ_FORMATS = (b"1", INDEX_FORMAT)
CHUNK_RECORDS = 5000
LARGE_OBJECT = 1 << 20
_MAP_SIZE = 1 << 40            # virtual address space only (docs/design.md, "LMDB": the 10 MiB default fails)
_VREC = struct.Struct(">QQqI32s")  # seq, size, mtime_ns, mode, blake3
_SEQ = struct.Struct(">Q")
_N = struct.Struct(">I")               # a version number in a versions key
DB_NAMES = ("meta", "versions", "objects", "bysize", "uploads", "upload_ids", "cutnames")
_MIN_FILE = 2 * 4096           # two meta pages: anything shorter was never an LMDB file

# One environment per data file per process (docs/design.md, "LMDB": never open one twice);
# _idents remembers which data.mdb (st_dev, st_ino) each was opened on, so a
# directory swapped in by 'fsck --repair' in another process is noticed.
_envs: dict[str, lmdb.Environment] = {}
_idents: dict[str, tuple[int, int]] = {}
_envs_lock = threading.Lock()


@dataclass(frozen=True)
class Version:
    path: bytes
    n: int
    seq: int
    size: int
    mtime_ns: int
    mode: int
    blake3: str
    received: str

    @property
    def stamp(self) -> str:
        return layout.compact_stamp(self.received)


class ScanVersion(NamedTuple):
    """The part of a Version fsck's tree scan reads (Index.iter_scan)."""
    path: bytes
    n: int
    seq: int
    blake3: str
    stamp: str


KEY_ROOM = 400  # bytes of a path kept verbatim in a key (LMDB keys hold at most 511)


def path_key(path: bytes) -> bytes:
    """A path as an index key.  Paths up to KEY_ROOM bytes are their own key;
    longer ones keep their first KEY_ROOM bytes (so directory prefix scans
    still find them), then ``\x01`` and the hex BLAKE2b-128 of the whole
    path.  Long keys are longer than any short one, so the two never meet."""
    if len(path) <= KEY_ROOM:
        return path
    return path[:KEY_ROOM] + b"\x01" + hashlib.blake2b(path, digest_size=16).hexdigest().encode()


def _vkey(path: bytes, n: int) -> bytes:
    return _version_key(path_key(path), n)


def _version_key(pk: bytes, n: int) -> bytes:
    """The versions key of version *n* of path key *pk*: pk \\0 u32 (the one place it is spelt)."""
    return pk + b"\0" + _N.pack(n)


def _cut_name_entries(path: bytes, n: int, stamp: str) -> Iterator[tuple[bytes, bytes]]:
    """The cutnames records of version *n* of *path*: (tree relpath, source path [\\0 n])."""
    parts = path.split(b"/")
    mapped: list[bytes] = []
    for i, part in enumerate(parts):
        p = layout.plain_name(part)
        mapped.append(p)
        if layout.unplain_name(p) is None:
            yield b"/".join(mapped), b"/".join(parts[: i + 1])
    vrel = layout.version_relpath(path, n, stamp)
    parsed = layout.parse_version_name(vrel.rpartition(b"/")[2])
    if parsed is None or parsed[0] is None:
        yield vrel, path + b"\0" + struct.pack(">I", n)


def _seq(seq: int) -> bytes:
    return struct.pack(">Q", seq)


def _decode_version(key: bytes, value: bytes) -> Version:
    n = struct.unpack(">I", key[-4:])[0]
    seq, size, mtime, mode, digest = _VREC.unpack_from(value)
    received, _, long_path = value[_VREC.size:].partition(b"\0")
    path = long_path if long_path else key[:-5]
    return Version(path, n, seq, size, mtime, mode, digest.hex(), received.decode("ascii"))


_OREC = struct.Struct(">QQ")           # objects: size, first seq
_DIGEST_AT = _VREC.size - 32          # where the blake3 starts in a versions value
_DIGEST_END = _DIGEST_AT + 32


def _is_key_of(key: bytes, pk: bytes) -> bool:
    """Is *key* of the versions database (pk \\0 u32) one of path key *pk*?"""
    return len(key) == len(pk) + 5 and key[-5] == 0 and key.startswith(pk)


def _seek_last(cur: lmdb.Cursor, pk: bytes) -> bool:
    """Put *cur* (on versions) on the latest version of path key *pk*: the
    last key before pk \\0 ffffffff.  False when the path has none."""
    found = cur.prev() if cur.set_range(_version_key(pk, 0xFFFFFFFF)) else cur.last()
    return found and _is_key_of(cur.key(), pk)


class _Writer:
    """What applying one manifest in one write transaction keeps at hand:
    a cursor per database written (py-lmdb's txn.put parses keyword
    arguments and looks the database up at each call) and the manifest's
    constants, encoded once."""

    __slots__ = ("txn", "h", "seq", "versions", "objects", "bysize", "received", "stamp", "want_version")

    def __init__(self, index: "Index", txn: lmdb.Transaction, h: Header, want_version: bool) -> None:
        self.txn, self.h, self.seq = txn, h, h.seq
        self.versions = txn.cursor(db=index.versions)
        self.objects = txn.cursor(db=index.objects)
        self.bysize = txn.cursor(db=index.bysize)
        self.received = h.received.encode("ascii")
        self.stamp = layout.compact_stamp(h.received)
        self.want_version = want_version     # does a visitor take each new Version?


# ------------------------------------------------------------------ faults

_ADVICE = {
    errno.ENOSPC: "free space on the study's disk, then run ingest again",
    errno.EDQUOT: "raise the service user's quota or free space, then run ingest again",
    errno.EFBIG: "free space on the study's disk (or raise the file size limit), then run ingest again",
    errno.EIO: "check the disk (dmesg, smartctl), then run 'eidetic fsck --repair --study {study}'",
    errno.EROFS: "the kernel may have remounted the file system after an error: check the disk (dmesg), "
                 "then run ingest again",
    errno.EACCES: "run this as the service user (the index is its file)",
    errno.EPERM: "run this as the service user (the index is its file)",
}


def io_fault(code: int, doing: str, path: str, study: str) -> StoreIOError:
    """A system error *code* met while *doing* ("written", "read", "opened") the index at *path*."""
    advice = _ADVICE.get(code, "check the disk and the index's permissions, then run ingest again")
    return StoreIOError(f"the index could not be {doing} ({os.strerror(code)}; {path}): "
                        + advice.format(study=study), study, errno=code)


def _fault(e: lmdb.Error, doing: str, path: str, study: str) -> EideticError:
    """One eidetic error for an LMDB error: the disk's fault, or the file's."""
    code = getattr(e, "code", None)
    if isinstance(e, lmdb.MapFullError):   # the map is 1 TiB of address space: only a huge index fills it
        return StoreIOError(f"the index could not be {doing} (its LMDB map is full: {e}; {path}): "
                            "rebuild it with 'eidetic fsck --repair --study " + study + "'", study,
                            errno=errno.ENOSPC)
    if isinstance(code, int) and code > 0:   # errno from the system: the disk, not the file
        return io_fault(code, doing, path, study)
    return IndexUnusable(f"its index is damaged ({e})", study)


def _undecodable(e: Exception, study: str) -> IndexUnusable:
    return IndexUnusable(f"its index is damaged (a record does not decode: {type(e).__name__}: {e})", study)


_DECODE_ERRORS = (struct.error, UnicodeDecodeError, ValueError)   # json.JSONDecodeError is a ValueError


@contextmanager
def _reading(index: "Index") -> Iterator[None]:
    """Every LMDB or decoding error met while reading becomes one eidetic error."""
    try:
        yield
    except lmdb.Error as e:
        raise _fault(e, "read", index.path, index.study) from None
    except _DECODE_ERRORS as e:
        raise _undecodable(e, index.study) from None


# A reader that may not write lock.mdb (a study member: docs/design.md,
# "Members read the index") opens the environment without LMDB's lock.  The
# writer then does not know of it and may reuse the pages of the snapshot it
# reads, but not at once: pages a commit frees are reused only by a write
# transaction at least two later (LMDB's mdb_find_oldest: with no reader, the
# oldest snapshot kept is the last one committed).  So whatever a lockless
# reader read at snapshot N is sound as long as, *after* the read, the last
# committed transaction is at most N + 1.  Checked after every query (retried
# if not) and before every item a stream yields (an error if not: what was
# yielded cannot be taken back).  Such reads never write anything anywhere.
_LOCKLESS_TRIES = 5


def _reads(fn):
    """A query, under :func:`_reading`; checked and retried when lockless."""
    @functools.wraps(fn)
    def wrapper(self: "Index", *args, **kw):
        if not self.lockless:
            with _reading(self):
                return fn(self, *args, **kw)
        for _ in range(_LOCKLESS_TRIES):
            start = self._txnid_now()
            try:
                with _reading(self):
                    out = fn(self, *args, **kw)
            except EideticError:
                if self._moved_since(start):
                    continue    # a page read was reused under us: the error says nothing of the index
                raise
            if not self._moved_since(start):
                return out
        raise self._busy()
    return wrapper


def _streams(fn):
    """:func:`_reads` for a generator."""
    @functools.wraps(fn)
    def wrapper(self: "Index", *args, **kw):
        start = self._txnid_now() if self.lockless else 0
        try:
            with _reading(self):
                for item in fn(self, *args, **kw):
                    if self.lockless and self._moved_since(start):
                        raise self._busy()
                    yield item
        except EideticError:
            if self.lockless and self._moved_since(start):
                raise self._busy() from None
            raise
    return wrapper


def _writes(fn):
    """A writer's method: LMDB errors become eidetic errors (the manifest's own stay as they are)."""
    @functools.wraps(fn)
    def wrapper(self: "Index", *args, **kw):
        try:
            return fn(self, *args, **kw)
        except lmdb.Error as e:
            raise _fault(e, "written", self.path, self.study) from None
    return wrapper


@dataclass(frozen=True)
class IndexState:
    """What meta says, read in one transaction."""
    applied: int
    head: str | None
    partial: tuple[int, int, int] | None     # (seq, records applied, versions added)
    format: bytes | None


class Index:
    def __init__(self, path: str, durable: bool = True, study: str | None = None, create: bool = True,
                 write: bool = True) -> None:
        """Open the index at *path* for *study* (named in every error).

        *create*: make what is missing (a rebuild, fsck's throwaway copy,
        tests).  Without it nothing is ever created: a missing, empty, cut
        short or damaged index raises IndexUnusable; with *write=False* (a
        reader) an index whose lock.mdb is missing is opened read-only
        without one rather than have one made by whoever reads (root's
        lock.mdb would lock the service user out).  *durable=False* skips the
        fsync at each commit: for a throwaway index, or a rebuild that is
        synced once at the end (:meth:`sync`)."""
        self.path = os.path.realpath(path)
        self.study = study or "?"
        self.verified = False          # verify_structure() found it sound
        self.ident: tuple[int, int] | None = None
        self.lockless = False          # opened without LMDB's lock (a reader that may not write it)
        try:
            if create:
                self._create(durable)
            else:
                self._open_existing(durable, write)
        except lmdb.Error as e:
            raise _fault(e, "opened", self.path, self.study) from None

    def _create(self, durable: bool) -> None:
        self.env = _open_env(self.path, durable, create=True)
        self.ident = _idents.get(self.path)
        with self.env.begin(write=True) as txn:
            try:
                for name in DB_NAMES:
                    setattr(self, name, self.env.open_db(name.encode(), txn=txn, create=True))
            except lmdb.NotFoundError:
                raise StoreFormatError("index is incomplete (run 'eidetic fsck --repair')", self.path) from None
            fmt = txn.get(b"format", db=self.meta)
            if fmt is None:
                txn.put(b"format", INDEX_FORMAT, db=self.meta)
            elif fmt not in READ_FORMATS:
                raise StoreFormatError(f"index format {fmt!r} is not understood", self.path)
            elif fmt != INDEX_FORMAT:
                self._upgrade(txn)

    def _upgrade(self, txn: lmdb.Transaction) -> None:
        """Format 1 -> 2 in the writer's transaction *txn*: drop "refs" (its
        pages go to LMDB's free list and are reused) and say format 2.  Every
        other database is the same in both formats, so nothing is rebuilt."""
        try:
            refs = self.env.open_db(b"refs", txn=txn, create=False, dupsort=True)
        except lmdb.NotFoundError:
            refs = None
        if refs is not None:
            txn.drop(refs, delete=True)
        txn.put(b"format", INDEX_FORMAT, db=self.meta)

    def _open_existing(self, durable: bool, write: bool) -> None:
        data = os.path.join(self.path, "data.mdb")
        try:
            size = os.stat(data).st_size
        except FileNotFoundError:
            raise IndexUnusable("its index is missing", self.study) from None
        except OSError as e:
            raise io_fault(e.errno or errno.EIO, "opened", self.path, self.study) from None
        if size < _MIN_FILE:    # LMDB would take an empty file for a new environment and write one
            raise IndexUnusable(f"its index is damaged (data.mdb is {size} bytes: empty or cut short)", self.study)
        # Lockless when lock.mdb is missing (whoever reads must not make one:
        # root's would lock the service user out) or not ours to write (a
        # study member: see _reads).
        lockless = not write and not (os.access(os.path.join(self.path, "lock.mdb"), os.W_OK)
                                      and os.access(data, os.W_OK))
        self.env = _open_env(self.path, durable, create=False, lockless=lockless)
        self.lockless = not self.env.flags()["lock"]    # a cached environment may be either
        self.ident = _idents.get(self.path)
        try:
            self._check_size(data)
            if not lockless:
                self.env.reader_check()   # slots of readers killed mid-read: else LMDB cannot reuse their pages
            name = ""
            try:
                for name in DB_NAMES:
                    setattr(self, name, self.env.open_db(name.encode(), create=False))
            except lmdb.NotFoundError:
                raise IndexUnusable(f"its index is damaged (it has no {name!r} database)", self.study) from None
            fmt = self.state().format
            if fmt is None:
                raise IndexUnusable("its index is damaged (it records no format)", self.study)
            if fmt not in READ_FORMATS:
                raise IndexUnusable(f"its index has format {fmt.decode('ascii', 'replace')!r}, which this "
                                    "eidetic does not read", self.study)
            if fmt != INDEX_FORMAT and write and not self.lockless:
                with self.env.begin(write=True) as txn:
                    self._upgrade(txn)
        except BaseException:
            self.close()    # a damaged environment is not kept for the next open
            raise

    def _check_size(self, data: str) -> None:
        """LMDB maps data.mdb and trusts its meta page: a page past the end of
        a file cut short would kill the process (SIGBUS) when touched."""
        need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
        size = os.stat(data).st_size
        if size < need:
            raise IndexUnusable(f"its index is damaged (data.mdb is {size} bytes, its last page ends at "
                                f"{need}: cut short)", self.study)

    def _txnid_now(self) -> int:
        try:
            return self.env.info()["last_txnid"]
        except lmdb.Error as e:
            raise _fault(e, "read", self.path, self.study) from None

    def _moved_since(self, start: int) -> bool:
        """Has the writer committed twice since *start* (see _reads)?"""
        return self._txnid_now() > start + 1

    def _busy(self) -> "LockBusy":
        return LockBusy(f"study {self.study}: the index changed under a read {_LOCKLESS_TRIES} times (an "
                        "ingest is busy); run the command again")

    # ---------------------------------------------------------------- state

    @_reads
    def state(self, txn: lmdb.Transaction | None = None) -> IndexState:
        if txn is not None:
            return self._state_in(txn)
        with self.env.begin() as t:
            return self._state_in(t)

    def _state_in(self, txn: lmdb.Transaction) -> IndexState:
        seq = txn.get(b"applied", db=self.meta)
        head = txn.get(b"head", db=self.meta)
        partial = txn.get(b"partial", db=self.meta)
        return IndexState(_SEQ.unpack(seq)[0] if seq else 0, head.decode("ascii") if head else None,
                          struct.unpack(">QQQ", partial) if partial else None, txn.get(b"format", db=self.meta))

    def applied(self) -> tuple[int, str | None]:
        st = self.state()
        return st.applied, st.head

    @staticmethod
    def _limit(txn: lmdb.Transaction, meta) -> int:
        """The last manifest a reader may see in *txn*: the last one applied whole."""
        v = txn.get(b"applied", db=meta)
        return _SEQ.unpack(v)[0] if v else 0

    @_reads
    def is_trusted(self, oid: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(bytes.fromhex(oid), db=self.objects) is not None

    @_reads
    def size_seen(self, size: int) -> bool:
        if size < LARGE_OBJECT:
            return False
        with self.env.begin() as txn:
            return txn.get(_seq(size), db=self.bysize) is not None

    def writable(self) -> bool:
        """Still open, read-write, and on the data.mdb in place (a writer may keep using it)."""
        with _envs_lock:
            if _envs.get(self.path) is not self.env:
                return False
        try:
            if self.env.flags()["readonly"]:
                return False
        except lmdb.Error:
            return False
        return not self.replaced()

    def replaced(self) -> bool:
        """Is data.mdb no longer the file this environment has open (swapped
        by 'fsck --repair' in another process, or removed)?"""
        return _ident(os.path.join(self.path, "data.mdb")) != self.ident

    def verify_structure(self) -> list[str]:
        """Every structural problem of data.mdb, [] when sound (see :func:`verify_file`)."""
        try:
            problems = verify_file(self.path)
        except OSError as e:
            raise io_fault(e.errno or errno.EIO, "read", self.path, self.study) from None
        self.verified = not problems
        return problems

    @_reads
    def last_txnid(self) -> int:
        return self.env.info()["last_txnid"]

    @_reads
    def begin_read(self) -> lmdb.Transaction:
        """A read transaction to pin (fsck): one snapshot for every query given it."""
        return self.env.begin()

    def snapshot(self) -> "Snapshot":
        """The index as it is now, for as long as the snapshot is open (fsck)."""
        return Snapshot(self)

    # ---------------------------------------------------------------- apply

    @_writes
    def apply_manifest(self, path: str | bytes, visit: Callable[[Version], None] | None = None,
                       stop_after: int | None = None) -> int:
        """Apply one committed manifest (the next in sequence); idempotent and
        resumable: progress is committed every CHUNK_RECORDS records.

        *visit* is called with each new version before the chunk holding it
        commits (ingest places tree names there, so a committed chunk always
        has its names).  *stop_after* commits after that many records and
        stops, as if interrupted there (fsck: to compare with an index caught
        half-way).  Returns the number of new path-versions."""
        reader = ManifestReader(path)
        h = reader.header
        done_seq, _ = self.applied()
        if h.seq <= done_seq:
            reader.close()
            return 0
        if h.seq != done_seq + 1:
            reader.close()
            raise StoreFormatError(f"index is at manifest {done_seq}, cannot apply {h.seq}", self.path)
        with self.env.begin() as txn:
            partial = txn.get(b"partial", db=self.meta)
        start, new_versions = 0, 0
        if partial:
            pseq, start, new_versions = struct.unpack(">QQQ", partial)
            if pseq != h.seq:
                start, new_versions = 0, 0
        if stop_after is not None and stop_after <= start:
            reader.close()
            return new_versions
        pos = 0
        w = self._begin_write(h, visit is not None)
        txn = w.txn
        try:
            for rec in reader.records():
                pos += 1
                if pos <= start:
                    continue
                if isinstance(rec, FileRecord):
                    v = self._apply_file(w, rec)
                    if v is not None:
                        new_versions += 1
                        if visit is not None:
                            visit(v)
                if pos % CHUNK_RECORDS == 0 or pos == stop_after:
                    txn.put(b"partial", struct.pack(">QQQ", h.seq, pos, new_versions), db=self.meta)
                    txn.commit()
                    if pos == stop_after:
                        reader.close()
                        return new_versions
                    w = self._begin_write(h, visit is not None)
                    txn = w.txn
            info = reader.info
            assert info is not None
            summary = {"upload": h.upload, "seq": h.seq, "received": h.received, "source": h.source,
                       "uploader": {"uid": h.uploader_uid, "name": h.uploader_name},
                       "entry": h.entry.decode("utf-8", "backslashreplace"),
                       "files": info.trailer.files, "bytes": info.trailer.bytes,
                       "skipped": info.trailer.skipped, "new_versions": new_versions,
                       "digest": info.digest}
            if h.description is not None:
                # The sender's description is archived as an object that no path uses:
                # listing it here makes it trusted and referenced (fsck checks it).
                desc = h.description
                txn.put(bytes.fromhex(desc["blake3"]), struct.pack(">QQ", desc["size"], h.seq),
                        db=self.objects, overwrite=False)
                summary["description"] = desc
            summary.update(h.extra)
            txn.put(_seq(h.seq), json.dumps(summary).encode(), db=self.uploads)
            txn.put(h.upload.encode(), _seq(h.seq), db=self.upload_ids)
            txn.put(b"applied", _seq(h.seq), db=self.meta)
            txn.put(b"head", info.digest.encode(), db=self.meta)
            txn.delete(b"partial", db=self.meta)
            txn.commit()
        except BaseException:
            try:
                txn.abort()
            except lmdb.Error:   # already ended by the failed commit: the error being raised says why
                pass
            raise
        return new_versions

    def _begin_write(self, h: Header, want_version: bool) -> _Writer:
        """A write transaction for applying records of *h*, with its cursors."""
        return _Writer(self, self.env.begin(write=True), h, want_version)

    def _apply_file(self, w: _Writer, rec: FileRecord) -> Version | bool | None:
        """One file record: None when it is no new version; else the new Version
        (True instead when no visitor wants it: building one costs as much as
        the lookups, and fsck's replay has no visitor).

        The hot path of every apply (ingest and fsck's replay): the writer's
        cursors are made once per transaction, the latest version is read
        in place (no Version decoded) and only its digest compared."""
        path = rec.path
        pk = path_key(path)
        cur = w.versions
        digest = bytes.fromhex(rec.blake3)
        n = 1
        if _seek_last(cur, pk):
            if cur.value()[_DIGEST_AT:_DIGEST_END] == digest:
                return None
            n = _N.unpack_from(cur.key(), len(pk) + 1)[0] + 1
        vkey = _version_key(pk, n)
        value = _VREC.pack(w.seq, rec.size, rec.mtime_ns, rec.mode, digest) + w.received
        if len(path) > KEY_ROOM:  # the key holds only part of it
            value += b"\0" + path
        cur.put(vkey, value)
        w.objects.put(digest, _OREC.pack(rec.size, w.seq), overwrite=False)
        if rec.size >= LARGE_OBJECT:
            w.bysize.put(_SEQ.pack(rec.size), b"")
        if layout.may_be_cut(path):
            self._record_cut_names(w.txn, path, n, w.stamp)
        if not w.want_version:
            return True
        return Version(path, n, w.seq, rec.size, rec.mtime_ns, rec.mode, rec.blake3, w.h.received)

    def _record_cut_names(self, txn: lmdb.Transaction, path: bytes, n: int, stamp: str) -> None:
        for key, value in _cut_name_entries(path, n, stamp):
            txn.put(path_key(key), value, db=self.cutnames)

    @_writes
    def sync(self) -> None:
        """Make everything committed durable (after building with durable=False)."""
        self.env.sync(True)

    # ---------------------------------------------------------------- query
    #
    # Each query filters to versions whose seq is at most `applied`, read in
    # its own transaction: a manifest being applied (seq applied+1) is seen
    # whole or not at all.  A path has at most one version per manifest.

    def _latest_in(self, txn: lmdb.Transaction, path: bytes, limit: int | None = None) -> Version | None:
        """The path's latest version; *limit* None (the writer, mid-apply) sees every one."""
        pk = path_key(path)
        cur = txn.cursor(db=self.versions)
        if not _seek_last(cur, pk):
            return None
        while True:
            value = cur.value()
            if limit is None or _SEQ.unpack_from(value)[0] <= limit:
                return _decode_version(cur.key(), value)
            if not cur.prev() or not _is_key_of(cur.key(), pk):
                return None

    @_reads
    def latest(self, path: bytes) -> Version | None:
        with self.env.begin() as txn:
            return self._latest_in(txn, path, self._limit(txn, self.meta))

    @_reads
    def versions_of(self, path: bytes) -> list[Version]:
        out = []
        prefix = path_key(path) + b"\0"
        with self.env.begin() as txn:
            limit = self._limit(txn, self.meta)
            cur = txn.cursor(db=self.versions)
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix) or len(k) != len(prefix) + 4 or _SEQ.unpack_from(v)[0] > limit:
                        break
                    out.append(_decode_version(k, v))
        return out

    @_reads
    def version(self, path: bytes, n: int) -> Version | None:
        if not 0 < n < 1 << 32:     # a number typed by a user, not one of a stored version
            return None
        with self.env.begin() as txn:
            v = txn.get(_vkey(path, n), db=self.versions)
            if v is None or _SEQ.unpack_from(v)[0] > self._limit(txn, self.meta):
                return None
        return _decode_version(_vkey(path, n), v)

    @_streams
    def iter_versions(self, prefix: bytes = b"") -> Iterator[Version]:
        """Every version of every path under directory *prefix* (b"" = all), in key order.
        Streams: a read transaction per call, no list in memory."""
        with self.env.begin() as txn:
            yield from self._iter_in(txn, prefix, self._limit(txn, self.meta))

    def _iter_in(self, txn: lmdb.Transaction, prefix: bytes, limit: int) -> Iterator[Version]:
        dprefix = prefix.rstrip(b"/") + b"/" if prefix else b""
        scan = dprefix[:KEY_ROOM]   # a long key keeps only its path's first KEY_ROOM bytes
        cur = txn.cursor(db=self.versions)
        if not cur.set_range(scan):
            return
        for k, v in cur:
            if not k.startswith(scan):
                break
            if _SEQ.unpack_from(v)[0] > limit:
                continue
            ver = _decode_version(k, v)
            if ver.path.startswith(dprefix):
                yield ver

    @_reads
    def path_count(self) -> int:
        """How many distinct paths have a version: keys only, nothing decoded
        (every path has exactly one version 1), unless a manifest is being
        applied (then the seq of each version 1 is read too)."""
        first = b"\0" + struct.pack(">I", 1)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.versions)
            if txn.get(b"partial", db=self.meta) is None:
                return sum(1 for k in cur.iternext(keys=True, values=False) if k.endswith(first))
            limit = self._limit(txn, self.meta)
            return sum(1 for k, v in cur if k.endswith(first) and _SEQ.unpack_from(v)[0] <= limit)

    def _has_path_in(self, txn: lmdb.Transaction, path: bytes, limit: int) -> bool:
        prefix = path_key(path) + b"\0"
        cur = txn.cursor(db=self.versions)
        # the first key of a path is its version 1, the oldest: visible if any is
        return (cur.set_range(prefix) and cur.key().startswith(prefix)
                and _SEQ.unpack_from(cur.value())[0] <= limit)

    @_reads
    def has_path(self, path: bytes) -> bool:
        with self.env.begin() as txn:
            return self._has_path_in(txn, path, self._limit(txn, self.meta))

    @_reads
    def has_dir(self, path: bytes) -> bool:
        with self.env.begin() as txn:
            return next(self._iter_in(txn, path, self._limit(txn, self.meta)), None) is not None

    @_reads
    def resolve_cut(self, tree_rel: bytes) -> tuple[bytes, int | None] | None:
        with self.env.begin() as txn:
            v = txn.get(path_key(tree_rel), db=self.cutnames)
            if v is None:
                return None
            limit = self._limit(txn, self.meta)
            if len(v) > 5 and v[-5:-4] == b"\0":
                path, n = v[:-5], struct.unpack(">I", v[-4:])[0]
                ver = txn.get(_vkey(path, n), db=self.versions)
                return (path, n) if ver is not None and _SEQ.unpack_from(ver)[0] <= limit else None
            if self._has_path_in(txn, v, limit) or next(self._iter_in(txn, v, limit), None) is not None:
                return v, None
            return None

    @_reads
    def upload(self, seq: int) -> dict | None:
        with self.env.begin() as txn:
            if seq > self._limit(txn, self.meta):
                return None
            v = txn.get(_seq(seq), db=self.uploads)
        return json.loads(v) if v else None

    @_reads
    def upload_seq(self, upload_id: str) -> int | None:
        with self.env.begin() as txn:
            v = txn.get(upload_id.encode(), db=self.upload_ids)
            seq = _SEQ.unpack(v)[0] if v else None
            return seq if seq is not None and seq <= self._limit(txn, self.meta) else None

    @_streams
    def iter_objects(self) -> Iterator[tuple[str, int]]:
        with self.env.begin() as txn:
            limit = self._limit(txn, self.meta)
            for k, v in txn.cursor(db=self.objects):
                size, seq = struct.unpack(">QQ", v)
                if seq <= limit:
                    yield k.hex(), size

    # ------------------------------------------------------- fsck's queries
    #
    # Unfiltered, like dump(): fsck asks them of its own rebuild, in which
    # every manifest it could read is applied.

    @_streams
    def iter_scan(self) -> Iterator[ScanVersion]:
        """What fsck's tree scan needs of every version (as iter_versions()
        of everything, in key order): path, n, seq, blake3 and stamp, in a
        tuple, the stamp derived once per upload.  A Version's decoding (a
        frozen dataclass, a compact_stamp per version) was a quarter of the
        scan."""
        stamps: dict[bytes, str] = {}
        unpack, tail = _VREC.unpack_from, _VREC.size
        with self.env.begin() as txn:
            limit = self._limit(txn, self.meta)
            for k, v in txn.cursor(db=self.versions):
                seq, _size, _mtime, _mode, digest = unpack(v)
                if seq > limit:
                    continue
                received, _, long_path = v[tail:].partition(b"\0")
                stamp = stamps.get(received)
                if stamp is None:
                    stamp = stamps[received] = layout.compact_stamp(received.decode("ascii"))
                yield ScanVersion(long_path or k[:-5], _N.unpack_from(k, len(k) - 4)[0], seq, digest.hex(), stamp)

    @_reads
    def users_of(self, oids: Iterable[str], limit: int) -> dict[str, tuple[list[Version], int]]:
        """For each object of *oids*: the versions that use it (the first
        *limit*, in key order) and their number; an object no version uses
        is left out.  One pass over every version (there is no reverse
        database, see READ_FORMATS): ask for all the objects at once."""
        want = {bytes.fromhex(o): o for o in oids}
        out: dict[str, tuple[list[Version], int]] = {}
        if not want:
            return out
        lo, hi = _DIGEST_AT, _DIGEST_END
        with self.env.begin() as txn:
            limit_seq = self._limit(txn, self.meta)
            for k, v in txn.cursor(db=self.versions):
                oid = want.get(v[lo:hi])
                if oid is None or _SEQ.unpack_from(v)[0] > limit_seq:
                    continue
                users, total = out.get(oid, ([], 0))
                if len(users) < limit:
                    users.append(_decode_version(bytes(k), bytes(v)))
                out[oid] = (users, total + 1)
        return out

    @_reads
    def first_seq(self, oid: str) -> int | None:
        """The manifest that first referred to object *oid* (a path's or an upload description's)."""
        with self.env.begin() as txn:
            v = txn.get(bytes.fromhex(oid), db=self.objects)
        return None if v is None else struct.unpack(">QQ", v)[1]

    @_writes
    def force_applied(self, seq: int) -> None:
        """Say manifest *seq* is applied whole (fsck: its private rebuild goes on past a broken
        link of the chain)."""
        with self.env.begin(write=True) as txn:
            txn.put(b"applied", _seq(seq), db=self.meta)
            txn.delete(b"partial", db=self.meta)

    @_reads
    def stats(self) -> dict:
        with self.env.begin() as txn:
            versions = txn.stat(self.versions)["entries"]
            objects = txn.stat(self.objects)["entries"]
            partial = txn.get(b"partial", db=self.meta)
            if partial:   # leave out what the manifest being applied added so far
                versions -= struct.unpack(">QQQ", partial)[2]
                limit = self._limit(txn, self.meta)
                objects -= sum(1 for v in txn.cursor(db=self.objects).iternext(keys=False, values=True)
                               if struct.unpack_from(">QQ", v)[1] > limit)
            return {"path_versions": versions, "objects": objects,
                    "uploads": txn.stat(self.uploads)["entries"]}

    @_streams
    def dump(self, txn: lmdb.Transaction | None = None) -> Iterator[tuple[str, bytes, bytes]]:
        """Every (db, key, value) in a fixed order, unfiltered (in *txn*, if
        given): for comparing two indexes."""
        if txn is not None:
            yield from self._dump_in(txn)
            return
        with self.env.begin() as t:
            yield from self._dump_in(t)

    def _dump_in(self, txn: lmdb.Transaction) -> Iterator[tuple[str, bytes, bytes]]:
        for name in DB_NAMES:
            for k, v in self._records(txn, name):
                yield name, bytes(k), bytes(v)

    def _records(self, txn: lmdb.Transaction, name: str) -> Iterator[tuple[bytes, bytes]]:
        """The records of database *name* that say what the index holds: its
        format is left out (a format 1 index holds what a format 2 one does)."""
        cur = txn.cursor(db=getattr(self, name)).iternext()
        return cur if name != "meta" else (kv for kv in cur if kv[0] != b"format")

    def close(self) -> None:
        env = getattr(self, "env", None)
        if env is None:
            return
        with _envs_lock:
            if _envs.get(self.path) is env:
                del _envs[self.path]
                _idents.pop(self.path, None)
        env.close()


class Snapshot:
    """One read transaction pinned on an index: state() and dump() see the
    index as it was when the snapshot was taken, however a writer goes on
    (LMDB's MVCC).  close() lets go of it (also when the index is gone)."""

    def __init__(self, index: Index) -> None:
        self.index = index
        self._txn: lmdb.Transaction | None = index.begin_read()

    def state(self) -> IndexState:
        return self.index.state(txn=self._txn)

    def dump(self) -> Iterator[tuple[str, bytes, bytes]]:
        return self.index.dump(self._txn)

    def same_as(self, other: "Snapshot") -> bool:
        """Do the two hold the same records?  (Quicker than comparing two
        dumps: no Python per record; dump() then says where they differ.)"""
        with _reading(self.index):
            for name in DB_NAMES:
                mine = self.index._records(self._txn, name)
                theirs = other.index._records(other._txn, name)
                if not all(itertools.starmap(operator.eq, itertools.zip_longest(mine, theirs))):
                    return False
        return True

    def close(self) -> None:
        txn, self._txn = self._txn, None
        if txn is not None:
            try:
                txn.abort()
            except lmdb.Error:   # its environment was closed: nothing is pinned any more
                pass


class EmptyIndex:
    """What readers see of a study with no upload and no index file yet:
    nothing (and nothing is created for them)."""

    path = ""
    verified = True

    def state(self, txn=None) -> IndexState:
        return IndexState(0, None, None, INDEX_FORMAT)

    def applied(self) -> tuple[int, str | None]:
        return 0, None

    def latest(self, path: bytes) -> None:
        return None

    def version(self, path: bytes, n: int) -> None:
        return None

    def versions_of(self, path: bytes) -> list[Version]:
        return []

    def iter_versions(self, prefix: bytes = b"") -> Iterator[Version]:
        return iter(())

    def iter_objects(self) -> Iterator[tuple[str, int]]:
        return iter(())

    def path_count(self) -> int:
        return 0

    def has_path(self, path: bytes) -> bool:
        return False

    def has_dir(self, path: bytes) -> bool:
        return False

    def resolve_cut(self, tree_rel: bytes) -> None:
        return None

    def upload(self, seq: int) -> None:
        return None

    def upload_seq(self, upload_id: str) -> None:
        return None

    def stats(self) -> dict:
        return {"path_versions": 0, "objects": 0, "uploads": 0}

    def replaced(self) -> bool:
        return True      # never kept by a writer: prepare_index opens or makes the real one

    def close(self) -> None:
        pass


def verify_file(path: str) -> list[str]:
    """Every structural problem of the index at *path* (a directory), [] when
    sound: lmdb's own offline verifier, in pure Python, so damage that would
    make LMDB abort the process (its assertions do) is found without LMDB
    touching the file.  About 0.2 s for the index of 30,000 paths."""
    from lmdb import verify as lmdb_verify

    try:
        return lmdb_verify.verify(path)
    except lmdb_verify.VerifyError as e:
        return [str(e)]


def _ident(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_env(path: str, durable: bool = True, create: bool = True, lockless: bool = False) -> lmdb.Environment:
    """This process's environment on the index at *path* (one per data file:
    docs/design.md, "LMDB"), opened anew if data.mdb is not the file it has open."""
    data = os.path.join(path, "data.mdb")
    with _envs_lock:
        env = _envs.get(path)
        if env is not None:
            if _ident(data) == _idents.get(path) and (lockless or not env.flags()["readonly"]):
                return env
            # Swapped in by 'fsck --repair' elsewhere, removed, or a read-only view a writer
            # now needs: the old environment is of no more use (and may hold the same lock.mdb).
            del _envs[path]
            _idents.pop(path, None)
            env.close()
        if create:
            os.makedirs(path, mode=layout.READABLE_DIR_MODE, exist_ok=True)
        env = lmdb.open(path, map_size=_MAP_SIZE, max_dbs=16, subdir=True, readahead=False,
                        sync=durable, metasync=durable, create=create, readonly=lockless, lock=not lockless,
                        mode=layout.READABLE_FILE_MODE)     # data.mdb (and lock.mdb): group-readable
        _envs[path] = env
        ident = _ident(data)
        if ident is not None:
            _idents[path] = ident
        return env


def close_env_at(path: str) -> None:
    """Close this process's environment on the index at *path*, if open (before it is swapped)."""
    path = os.path.realpath(path)
    with _envs_lock:
        env = _envs.pop(path, None)
        _idents.pop(path, None)
    if env is not None:
        env.close()
