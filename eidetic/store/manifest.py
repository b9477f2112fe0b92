"""Manifests: the append-only record of each upload (JSON Lines).

Line 1 is the header, then one line per file (or skipped entry) in walk
order, then a trailer.  Each manifest names the BLAKE3 of the previous
manifest's bytes (``prev``), so the manifests of a study form a chain in
which a removed, edited or inserted manifest is detectable.  The exact
format is in store_format.md, "Manifests".

Writing streams (memory stays flat for any number of files); reading
streams and validates every line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Iterator

from ..core import layout
from ..core.errors import IntegrityError
from ..core.hashing import new_hasher
from ..core.jsonl import decode_bytes, dumps, encode_bytes, int_field as _int, parse_json_line, str_field as _str

MANIFEST_VERSION = 2                  # what this eidetic writes
READABLE_VERSIONS = (1, 2)            # 2 added the optional "description" header key
SKIP_KINDS = ("symlink", "fifo", "socket", "chardev", "blockdev", "unknown")


# ------------------------------------------------------------------ records

_HEADER_KEYS = frozenset({"eidetic_manifest", "seq", "upload", "prev", "study", "entry", "entry_b64",
                          "received", "uploader", "source", "description"})
# The "description" header object: what the sender's upload description said
# (store_format.md, "Upload descriptions"); its file is stored as an object.
DESCRIPTION_KEYS = ("blake3", "size", "client", "location", "user", "host", "platform", "started",
                    "ended", "source")


@dataclass
class Header:
    seq: int
    upload: str
    prev: str | None
    study: str
    entry: bytes
    received: str
    uploader_uid: int
    uploader_name: str | None
    source: str
    extra: dict = field(default_factory=dict)   # keys added by later format versions
    description: dict | None = None   # DESCRIPTION_KEYS; None for an upload sent without one
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict:
        d: dict = {"eidetic_manifest": self.version, "seq": self.seq, "upload": self.upload,
                   "prev": self.prev, "study": self.study}
        encode_bytes(d, "entry", self.entry)
        d.update({"received": self.received,
                  "uploader": {"uid": self.uploader_uid, "name": self.uploader_name},
                  "source": self.source})
        if self.description is not None:
            d["description"] = {k: self.description[k] for k in DESCRIPTION_KEYS}
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Header":
        version = d.get("eidetic_manifest")
        if isinstance(version, bool) or not isinstance(version, int) or version not in READABLE_VERSIONS:
            raise ValueError(f"unknown manifest version {version!r} (this eidetic reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))})")
        up = d.get("uploader")
        if not isinstance(up, dict):
            raise ValueError("uploader must be an object")
        h = cls(seq=_int(d, "seq"), upload=_str(d, "upload"), prev=d.get("prev"),
                study=_str(d, "study"), entry=decode_bytes(d, "entry"),
                received=_str(d, "received"), uploader_uid=_int(up, "uid"),
                uploader_name=up.get("name"), source=_str(d, "source"),
                extra={k: v for k, v in d.items() if k not in _HEADER_KEYS},
                description=_description(d, version), version=version)
        if not layout.UPLOAD_ID_RE.match(h.upload):
            raise ValueError(f"bad upload id {h.upload!r}")
        if h.prev is not None and not layout.valid_object_id(h.prev):
            raise ValueError("bad prev hash")
        layout.parse_utc_iso(h.received)
        return h


@dataclass
class FileRecord:
    path: bytes
    size: int
    blake3: str
    mode: int
    mtime_ns: int

    def to_json(self) -> dict:
        d: dict = {}
        encode_bytes(d, "path", self.path)
        d.update({"size": self.size, "blake3": self.blake3, "mode": self.mode, "mtime_ns": self.mtime_ns})
        return d


@dataclass
class SkipRecord:
    path: bytes
    skipped: str          # one of SKIP_KINDS
    target: bytes | None = None   # a symlink's target, recorded, never followed

    def to_json(self) -> dict:
        d: dict = {}
        encode_bytes(d, "path", self.path)
        d["skipped"] = self.skipped
        if self.target is not None:
            encode_bytes(d, "target", self.target)
        return d


@dataclass
class Trailer:
    files: int
    bytes: int
    skipped: int

    def to_json(self) -> dict:
        return {"end": True, "files": self.files, "bytes": self.bytes, "skipped": self.skipped}


def parse_record(d: dict) -> FileRecord | SkipRecord:
    path = decode_bytes(d, "path")
    layout.check_relpath(path)
    if "skipped" in d:
        kind = d["skipped"]
        if kind not in SKIP_KINDS:
            raise ValueError(f"unknown skipped kind {kind!r}")
        target = decode_bytes(d, "target") if ("target" in d or "target_b64" in d) else None
        return SkipRecord(path, kind, target)
    oid = _str(d, "blake3")
    if not layout.valid_object_id(oid):
        raise ValueError(f"bad blake3 {oid!r}")
    size, mode, mtime = _int(d, "size"), _int(d, "mode"), _int(d, "mtime_ns")
    if size < 0 or not 0 <= mode <= 0o7777:
        raise ValueError("size or mode out of range")
    return FileRecord(path, size, oid, mode, mtime)


def _description(d: dict, version: int) -> dict | None:
    if "description" not in d:
        return None
    if version < 2:
        raise ValueError("key description needs manifest version 2")
    desc = d["description"]
    if not isinstance(desc, dict) or set(desc) != set(DESCRIPTION_KEYS):
        raise ValueError(f"description must be an object with exactly the keys {', '.join(DESCRIPTION_KEYS)}")
    try:
        if not layout.valid_object_id(_str(desc, "blake3")):
            raise ValueError("blake3 must be 64 lowercase hex digits")
        if _int(desc, "size") < 0:
            raise ValueError("size must be >= 0")
        for k in DESCRIPTION_KEYS[2:]:
            _str(desc, k)
    except ValueError as e:
        raise ValueError(f"description: {e}") from None
    return {k: desc[k] for k in DESCRIPTION_KEYS}


# ------------------------------------------------------------------- writer

class ManifestWriter:
    """Streams a manifest into a temp file; the store commits it."""

    def __init__(self, f: IO[bytes], header: Header) -> None:
        self._f = f
        self._h = new_hasher()
        self.header = header
        self.files = 0
        self.bytes = 0
        self.skipped = 0
        self._write(header.to_json())

    def _write(self, obj: dict) -> None:
        line = dumps(obj)
        self._h.update(line)
        self._f.write(line)

    def add(self, rec: FileRecord | SkipRecord) -> None:
        if isinstance(rec, FileRecord):
            self.files += 1
            self.bytes += rec.size
        else:
            self.skipped += 1
        self._write(rec.to_json())

    def finish(self) -> str:
        """Write the trailer; returns the manifest's BLAKE3 (the next one's ``prev``)."""
        self._write(Trailer(self.files, self.bytes, self.skipped).to_json())
        self._f.flush()
        return self._h.hexdigest()


# ------------------------------------------------------------------- reader

@dataclass
class ManifestInfo:
    header: Header
    trailer: Trailer
    digest: str


class ManifestReader:
    """Iterate a manifest's records while hashing and validating it.

    ``header`` is available at once; ``records()`` yields each record and,
    once exhausted, ``info`` holds the trailer and the file's digest.  Any
    malformed line raises IntegrityError naming the line.
    """

    def __init__(self, path: str | bytes) -> None:
        self.path = os.fsdecode(path)
        self._f = open(path, "rb")
        self._h = new_hasher()
        self._lineno = 0
        first = self._next_line()
        if first is None:
            self._f.close()
            raise IntegrityError(f"manifest {self.path} is empty")
        try:
            self.header = Header.from_json(first)
        except (ValueError, TypeError) as e:
            self._f.close()
            raise IntegrityError(f"manifest {self.path} line 1: {e}") from None
        self.info: ManifestInfo | None = None

    def _next_line(self) -> dict | None:
        line = self._f.readline()
        if not line:
            return None
        self._lineno += 1
        self._h.update(line)
        try:
            return parse_json_line(line)
        except ValueError as e:
            raise IntegrityError(f"manifest {self.path} line {self._lineno}: {e}") from None

    def records(self) -> Iterator[FileRecord | SkipRecord]:
        files = nbytes = skipped = 0
        try:
            while True:
                obj = self._next_line()
                if obj is None:
                    raise IntegrityError(f"manifest {self.path}: no trailer after line {self._lineno} "
                                         "(truncated)")
                if obj.get("end") is True:
                    where = f"manifest {self.path} line {self._lineno}"
                    try:
                        trailer = Trailer(_int(obj, "files"), _int(obj, "bytes"), _int(obj, "skipped"))
                    except ValueError as e:
                        raise IntegrityError(f"{where}: bad trailer: {e}") from None
                    if self._f.read(1):
                        raise IntegrityError(f"manifest {self.path} line {self._lineno + 1}: "
                                             "data after the trailer")
                    if (trailer.files, trailer.bytes, trailer.skipped) != (files, nbytes, skipped):
                        raise IntegrityError(f"{where}: trailer counts do not match its records")
                    self.info = ManifestInfo(self.header, trailer, self._h.hexdigest())
                    return
                try:
                    rec = parse_record(obj)
                except (ValueError, TypeError) as e:
                    raise IntegrityError(f"manifest {self.path} line {self._lineno}: {e}") from None
                if isinstance(rec, FileRecord):
                    files += 1
                    nbytes += rec.size
                else:
                    skipped += 1
                yield rec
        finally:
            self._f.close()

    def close(self) -> None:
        self._f.close()


def read_all(path: str | bytes) -> tuple[Header, list[FileRecord | SkipRecord], ManifestInfo]:
    """Whole manifest in memory: for tests and small tools only."""
    r = ManifestReader(path)
    recs = list(r.records())
    assert r.info is not None
    return r.header, recs, r.info


def digest_of(path: str | bytes) -> str:
    r = ManifestReader(path)
    for _ in r.records():
        pass
    assert r.info is not None
    return r.info.digest
