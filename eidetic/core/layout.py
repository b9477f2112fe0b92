"""Pure naming rules: where things live and what they are called.

Nothing here touches the file system.  Every rule is specified in
store_format.md and property-tested (tests/test_layout.py): the tree
mapping is injective, plain names and version names never collide, and no
mapped name can escape its directory.

Paths are bytes throughout; a relative path uses ``/`` as separator and has
no empty, ``.`` or ``..`` component and no NUL.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Sequence

import hashlib

FORMAT_VERSION = 1
STORE_MARKER = "eidetic-store"
# Modes inside a store (store_format.md §2.2).  What a study member's log and
# checkout read (the store's top, objects/ and its shards, manifests/, index/
# and its data.mdb) is readable by the store's group, the study group, which
# `eidetic init` gives it (setgid, so later directories inherit it).  What a
# member must never touch stays the service user's alone: tmp/ (half-written
# objects), lost+found/ and the lock, which a reader that could open it could
# hold and so stop every ingest.
READABLE_DIR_MODE = 0o750
READABLE_FILE_MODE = 0o640
PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
NAME_MAX = 255

# Anchored with \Z, not $: $ also matches before a trailing newline ("<id>\n").
OBJECT_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")
UPLOAD_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}\Z")
STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]*\Z")


# ---------------------------------------------------------------- objects

def valid_object_id(oid: str) -> bool:
    return bool(OBJECT_ID_RE.match(oid))


def object_relpath(oid: str, twin: int = 0) -> str:
    """``objects/af/1349b9…`` (git-style two-hex fan-out).  *twin* > 0 names the
    extra copies made when an object reaches the file system's hardlink limit."""
    if not valid_object_id(oid):
        raise ValueError(f"invalid object id {oid!r}")
    name = oid[2:] if twin == 0 else f"{oid[2:]}.{twin}"
    return f"objects/{oid[:2]}/{name}"


def parse_object_relpath(shard: str, name: str) -> tuple[str, int] | None:
    """Inverse of object_relpath for one file found under objects/; None if foreign."""
    base, _, twin = name.partition(".")
    oid = shard + base
    if len(shard) != 2 or not valid_object_id(oid):
        return None
    if not twin:
        return oid, 0
    if not twin.isdigit() or twin.startswith("0"):
        return None
    return oid, int(twin)


# -------------------------------------------------------------- manifests

def manifest_relpath(seq: int) -> str:
    if seq < 1:
        raise ValueError("manifest sequence numbers start at 1")
    return f"manifests/{seq:010d}.jsonl"


MANIFEST_NAME_RE = re.compile(r"^([0-9]{10})\.jsonl\Z")


def parse_manifest_name(name: str) -> int | None:
    m = MANIFEST_NAME_RE.match(name)
    return int(m.group(1)) if m and int(m.group(1)) >= 1 else None


# ------------------------------------------------------------------ times

def utc_iso(ts: datetime) -> str:
    """Received times: ISO 8601, UTC, microseconds, trailing Z."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def compact_stamp(received_iso: str) -> str:
    """``2026-11-21T20:44:55.123456Z`` -> ``20261121T204455Z`` (used in version names)."""
    return received_iso[0:4] + received_iso[5:7] + received_iso[8:10] + "T" + \
        received_iso[11:13] + received_iso[14:16] + received_iso[17:19] + "Z"


# ------------------------------------------------------------- entry names

def parse_entry_name(name: bytes, studies: set[str] | frozenset[str],
                     inbox_study: str | None = None) -> tuple[str, str] | None:
    """Map an inbox entry name to ``(study, source location)``.

    In the shared inbox an entry ``<study>-<location>[-<anything>]`` belongs to
    ``<study>``; in a study's own inbox every entry belongs to that study
    (a leading ``<study>-`` is dropped before the location is read).  Returns
    None when the name maps to no configured study.  Study names cannot
    contain ``-``, so the split is unambiguous.
    """
    text = name.decode("utf-8", "surrogateescape")
    if inbox_study is not None:
        rest = text[len(inbox_study) + 1:] if text.startswith(inbox_study + "-") else text
        return inbox_study, _location(rest)
    study, sep, rest = text.partition("-")
    if not sep or study not in studies:
        return None
    return study, _location(rest)


def _location(rest: str) -> str:
    loc = rest.split("-", 1)[0]
    return loc or "unknown"


# Reserved inbox names for entries the daemon has taken.  They start with "."
# so scanners treat them as not-ready; "~" cannot follow ".<study>" in an
# uploader's partial name because study names cannot contain it.
INBOX_RESERVED_PREFIX = b".eidetic~"
INBOX_STATES = ("claimed", "done", "failed")


def inbox_state_name(state: str, upload_id: str, original: bytes) -> bytes:
    """``.eidetic~claimed~<upload id>~<original name, cut to fit>``."""
    if state not in INBOX_STATES:
        raise ValueError(state)
    head = INBOX_RESERVED_PREFIX + state.encode() + b"~" + upload_id.encode() + b"~"
    return head + original[: NAME_MAX - len(head)]


def is_reserved_inbox_name(name: bytes) -> bool:
    return name.startswith(INBOX_RESERVED_PREFIX)


# --------------------------------------------------------------- tree names
#
# A path component u sent by an uploader appears in the tree as plain(u).
# Version n of a file, received at stamp t, appears as version_name(u, n, t).
#
#   plain(u)   = u                          if u contains none of "~v", "~-", "~#"
#              = u with every "~" -> "~-"   otherwise (the "escaped" form)
#              = cut(escaped) + "~#" + h    if the escaped form exceeds 255 bytes
#   version(u) = stem + "~v" + NNNN + "~" + t + ext     where stem+ext = plain(u)
#
# No plain name contains "~v" followed by a digit, every version name does:
# the two sets are disjoint.  "~#" followed by a non-hex character is free
# for temp names (fsutil.TEMP_PREFIX).

_ESCAPE_TRIGGER = re.compile(rb"~[v#-]")
_EXT_RE = re.compile(rb"^(.+?)(\.[A-Za-z0-9_]{1,16})\Z", re.S)
_VERSION_RE = re.compile(rb"^(.*)~v([0-9]{4,})~([0-9]{8}T[0-9]{6}Z)(.*)\Z", re.S)
_HASH_LEN = 32  # hex digits of BLAKE2b-128 of the original name, used when a name must be cut


def _name_hash(u: bytes) -> bytes:
    return hashlib.blake2b(u, digest_size=_HASH_LEN // 2).hexdigest().encode()


def _cut(b: bytes, limit: int) -> bytes:
    """Cut to at most *limit* bytes without splitting a UTF-8 sequence or a "~-" pair."""
    b = b[:limit]
    while b and (b[-1] & 0xC0) == 0x80:  # continuation byte: drop the partial char
        b = b[:-1]
    if b and b[-1] >= 0xC0:  # a lead byte whose continuation was cut
        b = b[:-1]
    if b.endswith(b"~"):
        b = b[:-1]
    return b


def check_component(u: bytes) -> None:
    if not u or u in (b".", b"..") or b"/" in u or b"\0" in u or len(u) > NAME_MAX:
        raise ValueError(f"invalid path component {u!r}")


def plain_name(u: bytes) -> bytes:
    if b"~" not in u and 0 < len(u) <= NAME_MAX and b"/" not in u and b"\0" not in u \
            and u not in (b".", b".."):
        return u  # the common case, kept cheap: it runs for every component of every path
    check_component(u)
    if not _ESCAPE_TRIGGER.search(u):
        return u
    esc = u.replace(b"~", b"~-")
    if len(esc) <= NAME_MAX:
        return esc
    tail = b"~#" + _name_hash(u)
    return _cut(esc, NAME_MAX - len(tail)) + tail


def unplain_name(t: bytes) -> bytes | None:
    """Inverse of plain_name; None for a cut (hashed) name, which only the index can resolve."""
    if b"~#" in t:
        return None
    if b"~-" in t:
        return t.replace(b"~-", b"~")
    return t


def split_ext(name: bytes) -> tuple[bytes, bytes]:
    m = _EXT_RE.match(name)
    if m is None:
        return name, b""
    return m.group(1), m.group(2)


def version_name(u: bytes, n: int, stamp: str) -> bytes:
    """Immutable name of version *n* (1 = oldest) of a file named *u*."""
    if n < 1:
        raise ValueError("versions start at 1")
    stem, ext = split_ext(plain_name(u))
    marker = b"~v%04d~" % n + stamp.encode("ascii")
    if len(stem) + len(marker) + len(ext) <= NAME_MAX:
        return stem + marker + ext
    tail = b"~#" + _name_hash(u)
    return _cut(stem, NAME_MAX - len(marker) - len(ext) - len(tail)) + tail + marker + ext


def parse_version_name(t: bytes) -> tuple[bytes | None, int, str] | None:
    """``(original component or None if cut, version, stamp)`` for a version name, else None."""
    m = _VERSION_RE.match(t)
    if m is None:
        return None
    stem, n, stamp, ext = m.groups()
    return unplain_name(stem + ext), int(n), stamp.decode()


def is_version_name(t: bytes) -> bool:
    return _VERSION_RE.match(t) is not None


def may_be_cut(path: bytes) -> bool:
    """False when no name derived from *path* can have been cut to fit 255 bytes
    (a cheap pre-check; version markers add at most 24 bytes)."""
    return b"~" in path or (len(path) > NAME_MAX - 40
                            and any(len(c) > NAME_MAX - 40 for c in path.split(b"/")))


def tree_relpath(path: bytes) -> bytes:
    """Plain tree path of an uploaded path (each component mapped)."""
    return b"/".join(plain_name(c) for c in path.split(b"/"))


def version_relpath(path: bytes, n: int, stamp: str) -> bytes:
    head, _, name = path.rpartition(b"/")
    vname = version_name(name, n, stamp)
    return (tree_relpath(head) + b"/" + vname) if head else vname


def check_relpath(path: bytes) -> None:
    if not path:
        raise ValueError("empty path")
    # Whole-path tests first (this runs for every record of every manifest read);
    # the per-component walk only when they cannot decide.  A "." alone does
    # not send a path there (nearly every file name has one): only a "." or
    # ".." component can be wrong, and "/" + path + "/" holds "/./" or "/../"
    # exactly when one is there.  A path within NAME_MAX has no longer component.
    if (b"\0" in path or path[0] == 0x2F or path[-1] == 0x2F or b"//" in path
            or len(path) > NAME_MAX
            or (b"." in path and (b"/./" in (s := b"/" + path + b"/") or b"/../" in s))):
        for c in path.split(b"/"):
            check_component(c)


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def display(path: bytes) -> str:
    """For humans only, never for lookups: undecodable bytes and control
    characters (a newline in a name must not split a line of output) as \\xNN."""
    return path.decode("utf-8", "backslashreplace").translate(_CONTROL)


def human_bytes(n: int) -> str:
    """Sizes for people: 512 B, 1.5 KiB, 3.2 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGT])(?:i?B)?|B)?\s*(?:/s)?\s*\Z", re.I)


def parse_bytes(text: str) -> int:
    """The inverse of :func:`human_bytes` for options like ``--bwlimit 10M``:
    a number with an optional IEC suffix (K, M, G, T = 1024^n; ``KiB``/``KB``
    mean the same, ``/s`` is allowed); ValueError when it is not one."""
    m = _RATE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a size (like 500K, 10M, 1.5G)")
    n = float(m.group(1)) * 1024 ** (" KMGT".index(m.group(2).upper()) if m.group(2) else 0)
    return int(n)


def plural(n: int, word: str, many: str | None = None) -> str:
    """A count with its noun in the right number: ``plural(1, "file")`` is
    "1 file", ``plural(2, "new version")`` "2 new versions", ``plural(3,
    "study")`` "3 studies" (*many* for any other irregular plural)."""
    if n == 1:
        return f"{n} {word}"
    if many is None:
        many = word[:-1] + "ies" if word.endswith("y") and word[-2:-1] not in "aeiou" else word + "s"
    return f"{n} {many}"


# ----------------------------------------------------------------- messages

def first_and_more(named: Sequence[str], total: int | None = None, limit: int | None = None,
                   sep: str = "; ", more: str = " (and {} more)") -> str:
    """A list in a message that stays one readable line: the first *limit*
    of *named* joined by *sep*, then *more* with how many of *total* (all of
    *named* by default) were left out.  ``first_and_more(["a", "b", "c"],
    limit=2)`` is ``"a; b (and 1 more)"``; nothing is added when none were."""
    shown = named if limit is None or len(named) <= limit else named[:limit]
    left = (len(named) if total is None else total) - len(shown)
    return sep.join(shown) + (more.format(left) if left > 0 else "")


class FirstN:
    """Counts every item and keeps the first *limit* (flat memory for any
    number of problems), for :func:`first_and_more`."""

    __slots__ = ("limit", "count", "named")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.named: list[str] = []

    def add(self, item: str) -> None:
        self.count += 1
        if len(self.named) < self.limit:
            self.named.append(item)

    def __len__(self) -> int:
        return self.count

    def text(self, sep: str = "; ", more: str = " (and {} more)") -> str:
        return first_and_more(self.named, self.count, sep=sep, more=more)
