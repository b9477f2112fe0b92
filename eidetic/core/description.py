"""Upload descriptions: what the sending client says it sent.

``eidetic send`` writes one into the root of every entry under the reserved
name :data:`DESCRIPTION_NAME`, computing each file's BLAKE3 from the bytes it
read on the lab PC.  Ingest checks every stored file against it, so the
archive can prove that what it stored is what left the lab PC.

The format (store_format.md, "Upload descriptions") is JSON Lines written
with the manifest's canonical encoder: a header line, one line per file in
*walk order* (paths compared component by component, bytewise, which is the
order ingest walks an entry in), then a trailer.  Reading streams and
validates every line, so a description of any size is checked in flat
memory, and any malformed line is a :class:`DescriptionError` naming it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import IO, Iterator

from . import layout
from .fsutil import open_regular_nofollow
from .jsonl import decode_bytes, dumps, encode_bytes, int_field, parse_json_line

DESCRIPTION_NAME = b".eidetic-description.jsonl"
DESCRIPTION_VERSION = 1
MAX_LINE = 1 << 20          # a hostile description must not make us read a gigabyte "line"
_HEADER_KEYS = ("client", "study", "location", "user", "host", "platform", "started", "source")


class DescriptionError(ValueError):
    """A description that is not well formed (the message names the line)."""


def walk_key(path: bytes) -> list[bytes]:
    """Sort key of walk order: component by component, bytewise."""
    return path.split(b"/")


@dataclass
class DescriptionHeader:
    client: str            # e.g. "eidetic 0.2.0"
    study: str
    location: str
    user: str              # the local account on the lab PC
    host: str
    platform: str          # e.g. "Windows-10-10.0.19045-SP0"
    started: str           # UTC, layout.utc_iso
    source: str            # the folder that was sent, as the client named it
    extra: dict = field(default_factory=dict)   # keys added by later clients

    def to_json(self) -> dict:
        d = {"eidetic_upload": DESCRIPTION_VERSION}
        d.update({k: getattr(self, k) for k in _HEADER_KEYS})
        d.update(self.extra)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DescriptionHeader":
        v = d.get("eidetic_upload")
        if isinstance(v, bool) or v != DESCRIPTION_VERSION:
            raise ValueError(f"unknown upload description version {v!r}")
        for k in _HEADER_KEYS:
            if not isinstance(d.get(k), str):
                raise ValueError(f"header field {k!r} must be a string")
        layout.parse_utc_iso(d["started"])
        return cls(**{k: d[k] for k in _HEADER_KEYS},
                   extra={k: v for k, v in d.items() if k not in _HEADER_KEYS and k != "eidetic_upload"})

    def provenance(self) -> dict:
        """What a manifest records of where an upload came from."""
        return {k: getattr(self, k) for k in ("client", "location", "user", "host", "platform",
                                              "started", "source")}


@dataclass
class DescribedFile:
    path: bytes            # relative, "/"-separated, as it will be in the entry
    size: int
    mtime_ns: int
    blake3: str

    def to_json(self) -> dict:
        d: dict = {}
        encode_bytes(d, "path", self.path)
        d.update({"size": self.size, "mtime_ns": self.mtime_ns, "blake3": self.blake3})
        return d

    @classmethod
    def from_json(cls, d: dict) -> "DescribedFile":
        path = decode_bytes(d, "path")
        layout.check_relpath(path)
        if path == DESCRIPTION_NAME:
            raise ValueError("the description cannot describe itself")
        size = d.get("size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("size must be an integer >= 0")
        mtime = int_field(d, "mtime_ns")
        oid = d.get("blake3")
        if not isinstance(oid, str) or not layout.valid_object_id(oid):
            raise ValueError("blake3 must be 64 lowercase hex digits")
        return cls(path, size, mtime, oid)


@dataclass
class DescriptionTrailer:
    ended: str
    files: int
    bytes: int


class DescriptionWriter:
    """Streams a description; files must be added in walk order."""

    def __init__(self, f: IO[bytes], header: DescriptionHeader) -> None:
        self._f = f
        self._last: list[bytes] | None = None
        self.files = 0
        self.bytes = 0
        f.write(dumps(header.to_json()))

    def add(self, rec: DescribedFile) -> None:
        layout.check_relpath(rec.path)
        if rec.path == DESCRIPTION_NAME:
            raise ValueError("the description cannot describe itself")
        key = walk_key(rec.path)
        if self._last is not None and key <= self._last:
            raise ValueError(f"{layout.display(rec.path)} is out of walk order or repeated")
        self._last = key
        self._f.write(dumps(rec.to_json()))
        self.files += 1
        self.bytes += rec.size

    def finish(self, ended: str) -> None:
        self._f.write(dumps({"end": ended, "files": self.files, "bytes": self.bytes}))


class DescriptionReader:
    """``header`` at once; ``files()`` yields each file, checking order, and
    once exhausted ``trailer`` is set.  Reads from an open binary file."""

    def __init__(self, f: IO[bytes], name: str = DESCRIPTION_NAME.decode()) -> None:
        self._f = f
        self.name = name
        self._lineno = 0
        first = self._next()
        if first is None:
            raise DescriptionError(f"{name} is empty")
        try:
            self.header = DescriptionHeader.from_json(first)
        except (ValueError, TypeError) as e:
            raise DescriptionError(f"{name} line 1: {e}") from None
        self.trailer: DescriptionTrailer | None = None

    def _next(self) -> dict | None:
        line = self._f.readline(MAX_LINE + 1)
        if not line:
            return None
        self._lineno += 1
        if len(line) > MAX_LINE:
            raise DescriptionError(f"{self.name} line {self._lineno}: longer than {MAX_LINE} bytes")
        try:
            return parse_json_line(line)
        except ValueError as e:
            raise DescriptionError(f"{self.name} line {self._lineno}: {e}") from None

    def files(self) -> Iterator[DescribedFile]:
        last: list[bytes] | None = None
        count = total = 0
        while True:
            obj = self._next()
            where = f"{self.name} line {self._lineno}"
            if obj is None:
                raise DescriptionError(f"{self.name}: no end line after line {self._lineno} "
                                       "(the send did not finish)")
            if "end" in obj:
                ended, files, nbytes = obj.get("end"), obj.get("files"), obj.get("bytes")
                try:
                    layout.parse_utc_iso(ended)
                except (ValueError, TypeError):
                    raise DescriptionError(f"{where}: bad end time {ended!r}") from None
                if any(isinstance(n, bool) or not isinstance(n, int) for n in (files, nbytes)) \
                        or (files, nbytes) != (count, total):
                    raise DescriptionError(f"{where}: end line counts ({files} files, {nbytes} bytes) "
                                           f"do not match its lines ({count} files, {total} bytes)")
                if self._f.read(1):
                    raise DescriptionError(f"{self.name} line {self._lineno + 1}: data after the end line")
                self.trailer = DescriptionTrailer(ended, count, total)
                return
            try:
                rec = DescribedFile.from_json(obj)
            except (ValueError, TypeError) as e:
                raise DescriptionError(f"{where}: {e}") from None
            key = walk_key(rec.path)
            if last is not None and key <= last:
                raise DescriptionError(f"{where}: {layout.display(rec.path)} is out of walk order "
                                       "or repeated")
            last = key
            count += 1
            total += rec.size
            yield rec


def open_description(path: str | bytes) -> DescriptionReader:
    """Open a description file: never through a final symlink, never blocking
    on a FIFO; anything but a regular file is ``OSError`` (ELOOP/EINVAL)."""
    fd, _ = open_regular_nofollow(path)
    f = os.fdopen(fd, "rb")
    try:
        return DescriptionReader(f, os.path.basename(os.fsdecode(path)))
    except BaseException:
        f.close()
        raise
