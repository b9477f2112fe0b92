"""The LMDB index of one study: a cache, always rebuildable from manifests.

Databases (one LMDB environment under ``<store>/index``; layouts in
store_format.md, "Index"):

  meta      b"format" -> b"1";  b"applied" -> seq;  b"head" -> digest of last applied manifest;
            b"partial" -> seq, records applied (a manifest being applied in chunks)
  versions  path \\0 version(4 BE) -> VersionRecord
  objects   blake3(32) -> size(8 BE) first seq(8 BE)   (also each upload description's object)
  refs      blake3(32) -> path \\0 version(4 BE)   (dupsort: every path-version using it)
  bysize    size(8 BE) -> b""                      (large objects only: "might this be a re-send?")
  uploads   seq(8 BE) -> JSON summary of the upload (with the manifest's "description", if any)
  upload_ids upload id -> seq(8 BE)
  cutnames  tree relpath -> source relpath [\\0 version(4 BE)]  (names shortened to fit 255 bytes)

A path's versions are derived deterministically from the manifests: a new
version when the content differs from the path's latest one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import lmdb

from . import layout
from .errors import StoreFormatError
from .manifest import FileRecord, Header, ManifestReader

INDEX_FORMAT = b"1"
CHUNK_RECORDS = 5000
LARGE_OBJECT = 1 << 20
_MAP_SIZE = 1 << 40            # virtual address space only (FACTS.md: the 10 MiB default fails)
_VREC = struct.Struct(">QQqI32s")  # seq, size, mtime_ns, mode, blake3

_envs: dict[str, lmdb.Environment] = {}
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
    return path_key(path) + b"\0" + struct.pack(">I", n)


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


def _encode_version(seq: int, rec: FileRecord, received: str) -> bytes:
    value = _VREC.pack(seq, rec.size, rec.mtime_ns, rec.mode, bytes.fromhex(rec.blake3)) + received.encode("ascii")
    if len(rec.path) > KEY_ROOM:  # the key holds only part of it
        value += b"\0" + rec.path
    return value


class Index:
    def __init__(self, path: str, durable: bool = True) -> None:
        """*durable=False* skips the fsync at each commit: for a throwaway
        index (fsck's rebuild to compare with), never for the store's own."""
        self.path = os.path.realpath(path)
        self.env = _open_env(self.path, durable)
        kw = {"create": True}
        with self.env.begin(write=True) as txn:
            try:
                self.meta = self.env.open_db(b"meta", txn=txn, **kw)
                self.versions = self.env.open_db(b"versions", txn=txn, **kw)
                self.objects = self.env.open_db(b"objects", txn=txn, **kw)
                self.refs = self.env.open_db(b"refs", txn=txn, dupsort=True, **kw)
                self.bysize = self.env.open_db(b"bysize", txn=txn, **kw)
                self.uploads = self.env.open_db(b"uploads", txn=txn, **kw)
                self.upload_ids = self.env.open_db(b"upload_ids", txn=txn, **kw)
                self.cutnames = self.env.open_db(b"cutnames", txn=txn, **kw)
            except lmdb.NotFoundError:
                raise StoreFormatError("index is incomplete (run 'eidetic fsck --repair')", self.path) from None
            fmt = txn.get(b"format", db=self.meta)
            if fmt is None:
                txn.put(b"format", INDEX_FORMAT, db=self.meta)
            elif fmt not in (None, INDEX_FORMAT):
                raise StoreFormatError(f"index format {fmt!r} is not understood", self.path)

    # ---------------------------------------------------------------- state

    def applied(self) -> tuple[int, str | None]:
        with self.env.begin() as txn:
            seq = txn.get(b"applied", db=self.meta)
            head = txn.get(b"head", db=self.meta)
        return (struct.unpack(">Q", seq)[0] if seq else 0), (head.decode() if head else None)

    def is_trusted(self, oid: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(bytes.fromhex(oid), db=self.objects) is not None

    def size_seen(self, size: int) -> bool:
        if size < LARGE_OBJECT:
            return False
        with self.env.begin() as txn:
            return txn.get(_seq(size), db=self.bysize) is not None

    # ---------------------------------------------------------------- apply

    def apply_manifest(self, path: str | bytes, visit: Callable[[Version], None] | None = None) -> int:
        """Apply one committed manifest (the next in sequence); idempotent and
        resumable: progress is committed every CHUNK_RECORDS records.

        *visit* is called with each new version before the chunk holding it
        commits (ingest places tree names there, so a committed chunk always
        has its names).  Returns the number of new path-versions."""
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
        pos = 0
        txn = self._begin_write()
        try:
            for rec in reader.records():
                pos += 1
                if pos <= start:
                    continue
                if isinstance(rec, FileRecord):
                    v = self._apply_file(txn, h, rec)
                    if v is not None:
                        new_versions += 1
                        if visit is not None:
                            visit(v)
                if pos % CHUNK_RECORDS == 0:
                    txn.put(b"partial", struct.pack(">QQQ", h.seq, pos, new_versions), db=self.meta)
                    txn.commit()
                    txn = self._begin_write()
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
            txn.abort()
            raise
        return new_versions

    def _begin_write(self) -> lmdb.Transaction:
        return self.env.begin(write=True)

    def _apply_file(self, txn: lmdb.Transaction, h: Header, rec: FileRecord) -> Version | None:
        latest = self._latest_in(txn, rec.path)
        if latest is not None and latest.blake3 == rec.blake3:
            return None
        n = 1 if latest is None else latest.n + 1
        digest = bytes.fromhex(rec.blake3)
        txn.put(_vkey(rec.path, n), _encode_version(h.seq, rec, h.received), db=self.versions)
        txn.put(digest, _vkey(rec.path, n), db=self.refs, dupdata=True)
        txn.put(digest, struct.pack(">QQ", rec.size, h.seq), db=self.objects, overwrite=False)
        if rec.size >= LARGE_OBJECT:
            txn.put(_seq(rec.size), b"", db=self.bysize)
        if layout.may_be_cut(rec.path):
            self._record_cut_names(txn, rec.path, n, layout.compact_stamp(h.received))
        return Version(rec.path, n, h.seq, rec.size, rec.mtime_ns, rec.mode, rec.blake3, h.received)

    def _record_cut_names(self, txn: lmdb.Transaction, path: bytes, n: int, stamp: str) -> None:
        for key, value in _cut_name_entries(path, n, stamp):
            txn.put(path_key(key), value, db=self.cutnames)

    # ---------------------------------------------------------------- query

    def _latest_in(self, txn: lmdb.Transaction, path: bytes) -> Version | None:
        pk = path_key(path)
        cur = txn.cursor(db=self.versions)
        if not cur.set_range(pk + b"\0\xff\xff\xff\xff"):
            if not cur.last():
                return None
        elif not cur.prev():
            return None
        key = cur.key()
        if key[:-5] != pk or key[-5:-4] != b"\0":
            return None
        return _decode_version(key, cur.value())

    def latest(self, path: bytes) -> Version | None:
        with self.env.begin() as txn:
            return self._latest_in(txn, path)

    def versions_of(self, path: bytes) -> list[Version]:
        out = []
        prefix = path_key(path) + b"\0"
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.versions)
            if cur.set_range(prefix):
                for k, v in cur:
                    if not k.startswith(prefix) or len(k) != len(prefix) + 4:
                        break
                    out.append(_decode_version(k, v))
        return out

    def version(self, path: bytes, n: int) -> Version | None:
        with self.env.begin() as txn:
            v = txn.get(_vkey(path, n), db=self.versions)
        return _decode_version(_vkey(path, n), v) if v else None

    def iter_versions(self, prefix: bytes = b"") -> Iterator[Version]:
        """Every version of every path under directory *prefix* (b"" = all), in key order.
        Streams: a read transaction per call, no list in memory."""
        dprefix = prefix.rstrip(b"/") + b"/" if prefix else b""
        scan = dprefix[:KEY_ROOM]   # a long key keeps only its path's first KEY_ROOM bytes
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.versions)
            if not cur.set_range(scan):
                return
            for k, v in cur:
                if not k.startswith(scan):
                    break
                ver = _decode_version(k, v)
                if ver.path.startswith(dprefix):
                    yield ver

    def path_count(self) -> int:
        """How many distinct paths have a version: keys only, nothing decoded
        (every path has exactly one version 1)."""
        first = b"\0" + struct.pack(">I", 1)
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.versions)
            return sum(1 for k in cur.iternext(keys=True, values=False) if k.endswith(first))

    def has_path(self, path: bytes) -> bool:
        prefix = path_key(path) + b"\0"
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.versions)
            return cur.set_range(prefix) and cur.key().startswith(prefix)

    def has_dir(self, path: bytes) -> bool:
        return next(self.iter_versions(path), None) is not None

    def resolve_cut(self, tree_rel: bytes) -> tuple[bytes, int | None] | None:
        with self.env.begin() as txn:
            v = txn.get(path_key(tree_rel), db=self.cutnames)
        if v is None:
            return None
        if len(v) > 5 and v[-5:-4] == b"\0":
            return v[:-5], struct.unpack(">I", v[-4:])[0]
        return v, None

    def upload(self, seq: int) -> dict | None:
        with self.env.begin() as txn:
            v = txn.get(_seq(seq), db=self.uploads)
        return json.loads(v) if v else None

    def upload_seq(self, upload_id: str) -> int | None:
        with self.env.begin() as txn:
            v = txn.get(upload_id.encode(), db=self.upload_ids)
        return struct.unpack(">Q", v)[0] if v else None

    def iter_objects(self) -> Iterator[tuple[str, int]]:
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.objects):
                yield k.hex(), struct.unpack(">QQ", v)[0]

    def stats(self) -> dict:
        with self.env.begin() as txn:
            return {"path_versions": txn.stat(self.versions)["entries"],
                    "objects": txn.stat(self.objects)["entries"],
                    "uploads": txn.stat(self.uploads)["entries"]}

    def dump(self) -> Iterator[tuple[str, bytes, bytes]]:
        """Every (db, key, value) in a fixed order: for comparing two indexes."""
        names = ["meta", "versions", "objects", "refs", "bysize", "uploads", "upload_ids", "cutnames"]
        with self.env.begin() as txn:
            for name in names:
                cur = txn.cursor(db=getattr(self, name))
                for k, v in cur:  # MDB_NEXT visits every duplicate too
                    yield name, bytes(k), bytes(v)

    def close(self) -> None:
        with _envs_lock:
            env = _envs.pop(self.path, None)
        if env is not None:
            env.close()


def _open_env(path: str, durable: bool = True) -> lmdb.Environment:
    # LMDB must not be opened twice in one process (FACTS.md): share one.
    with _envs_lock:
        env = _envs.get(path)
        if env is None:
            os.makedirs(path, mode=0o700, exist_ok=True)
            env = lmdb.open(path, map_size=_MAP_SIZE, max_dbs=16, subdir=True, readahead=False,
                            sync=durable, metasync=durable)
            _envs[path] = env
        return env

