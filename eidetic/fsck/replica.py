"""fsck --replica: is the replica a sound copy of the local chain?

The local manifests (1 … HEAD, read and parsed here: the local check is
plain fsck's) are the truth.  On the replica (store_format.md, "Replicas"):

- the marker equals the store's, byte for byte (``E070``);
- HEAD names a manifest of the local chain with its digest (``E073``), or
  is missing only while nothing was replicated;
- every manifest up to the replica's HEAD is there (``E071``) and
  byte-identical (``E072``): its recorded BLAKE3 and size, or, where no
  BLAKE3 is recorded (file://) or with *read_data*, the BLAKE3 of its
  downloaded bytes; manifests replicated past HEAD (a replicate in flight)
  are compared too; local manifests not replicated yet are one warning
  (``W074``); replica manifests past the local chain are ``E079``;
- every object of the replicated manifests is there (``E075``) with its
  size (``E076``), and, where the replica records metadata (S3), its
  BLAKE3 metadata is there and is its id (``E077``: a version put by hand
  has none);
- with retention configured: every object and manifest carries Object Lock
  retention of the configured mode, until at least the upload's received
  time plus ``retention_days`` (``E078``);
- with *read_data*: every object is downloaded and re-hashed (``E077``).

Without *read_data* no object is downloaded: sizes come from one listing
(LIST pages of 1,000 keys); an object is HEADed only for what a listing
does not carry, its BLAKE3 metadata and retention, and only where the
replica records them (not file://), in a thread pool, so 100,000 objects
stay a matter of a few minutes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Iterator

from ..core import layout
from ..core.errors import IntegrityError, ReplicaError, ReplicaMissing
from ..core.hashing import new_hasher
from ..replica.backend import HEAD_KEY, MARKER_KEY, Backend, RemoteInfo, bounded_map
from ..store.manifest import FileRecord, ManifestReader
from .codes import Findings, Progress, no_progress

WORKERS = 8                   # HEADs and downloads in flight: latency-bound
SLACK = timedelta(hours=1)    # clock skew between this server and the replica's
READ_CHUNK = 1 << 20


class _Local:
    """What the local chain holds: per manifest its digest, size and received
    time; per object its size and the first manifest that refers to it."""

    def __init__(self, store) -> None:
        self.head, _ = store.head()
        self.manifests: dict[int, tuple[str, int, datetime]] = {}
        self.objects: dict[str, tuple[int, int]] = {}
        for seq in range(1, self.head + 1):
            path = store.manifest_path(seq)
            try:
                r = ManifestReader(path)
                if r.header.description:
                    d = r.header.description
                    self.objects.setdefault(d["blake3"], (d["size"], seq))
                for rec in r.records():
                    if isinstance(rec, FileRecord):
                        self.objects.setdefault(rec.blake3, (rec.size, seq))
            except (IntegrityError, OSError) as e:
                raise IntegrityError(f"study {store.name}: local manifest {seq} cannot be read "
                                     f"({getattr(e, 'strerror', None) or e}): run 'eidetic fsck' first") from None
            assert r.info is not None
            self.manifests[seq] = (r.info.digest, os.path.getsize(path), _parse_time(r.header.received))


def _parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


def check_replica(store, backend: Backend, retention_days: int | None = None, retention_mode: str = "compliance",
                  read_data: bool = False, progress: Progress | None = None) -> Findings:
    """Every finding about *backend* as a copy of *store* (see the module's doc)."""
    progress = progress or no_progress
    out = Findings()
    out.stats.update(replica_manifests=0, replica_objects=0, downloaded_bytes=0)
    backend.check_ready()
    local = _Local(store)
    where = backend.url.rstrip("/") + "/"

    def add(code: str, key: str, detail: str) -> None:
        out.add(code, where + key, detail)

    _check_marker(store, backend, add)
    rhead = _check_head(backend, local, add)
    listed = {i.key: i for i in backend.list("manifests/")}
    replicated = _check_manifests(backend, local, rhead, listed, read_data, add, out, progress)
    lock = (retention_days, retention_mode.upper()) if retention_days else None
    if lock is not None:
        _check_manifest_retention(backend, local, replicated, lock, add)
    _check_objects(backend, local, replicated, lock, read_data, add, out, progress)
    out.sort(key=lambda f: (f.code, f.path))
    return out


# ----------------------------------------------------------------- marker

def _check_marker(store, backend: Backend, add) -> None:
    with open(os.path.join(store.root, layout.STORE_MARKER), "rb") as f:
        mine = f.read(4096)
    try:
        theirs = backend.read_bytes(MARKER_KEY, 4096)
    except ReplicaMissing:
        return add("E070", MARKER_KEY, "missing: nothing was replicated yet, or the URL is wrong")
    except ReplicaError as e:
        return add("E070", MARKER_KEY, f"unreadable: {e.kwargs['detail']}")
    if theirs != mine:
        first = theirs.decode("utf-8", "replace").replace("\n", "; ").strip("; ")
        add("E070", MARKER_KEY, f"it says {first!r}: another study's replica, or another store format")


# ------------------------------------------------------------------- HEAD

def _check_head(backend: Backend, local: _Local, add) -> int:
    """The replica's HEAD seq as far as it agrees with the local chain (0: none)."""
    try:
        text = backend.read_bytes(HEAD_KEY, 200).decode("ascii", "replace")
    except ReplicaMissing:
        return 0
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit() or not layout.valid_object_id(parts[1]):
        add("E073", HEAD_KEY, f"unreadable ({text[:80]!r})")
        return 0
    seq, digest = int(parts[0]), parts[1]
    if seq > local.head:
        add("E079", HEAD_KEY, f"it names manifest {seq}, the local chain ends at {local.head}: the store lost "
                              "uploads the replica holds (restore them from it) or the replica is of another store")
        return local.head
    if seq and local.manifests[seq][0] != digest:
        add("E073", HEAD_KEY, f"it names manifest {seq} as {digest}, the local manifest hashes to "
                              f"{local.manifests[seq][0]}: another history")
    return seq


# -------------------------------------------------------------- manifests

def _check_manifests(backend: Backend, local: _Local, rhead: int, listed: dict[str, RemoteInfo], read_data: bool,
                     add, out: Findings, progress: Progress) -> list[int]:
    """Compare every replicated manifest; returns the seqs whose objects must be on the replica."""
    replicated: list[int] = []
    for key in sorted(listed):
        seq = layout.parse_manifest_name(key.rpartition("/")[2])
        if seq is not None and seq > local.head:
            add("E079", key, f"the local chain ends at manifest {local.head}: the store lost uploads the "
                             "replica holds (restore them from it) or the replica is of another store")
    behind = []
    for seq in range(1, local.head + 1):
        key = layout.manifest_relpath(seq)
        info = listed.get(key)
        progress("replica manifests", seq, local.head)
        if info is None:
            if seq <= rhead:
                add("E071", key, f"the replica's HEAD names manifest {rhead}")
            else:
                behind.append(seq)
            continue
        out.stats["replica_manifests"] += 1
        digest, size, _ = local.manifests[seq]
        problem = _manifest_differs(backend, key, info, digest, size, read_data, out)
        if problem:
            add("E072", key, problem)
        replicated.append(seq)
    if behind:
        add("W074", layout.manifest_relpath(behind[0]),
            f"{len(behind)} upload(s) not replicated yet (manifests {behind[0]} to {behind[-1]}); "
            "'eidetic replicate' (or the daemon) sends them")
    return replicated


def _manifest_differs(backend: Backend, key: str, info: RemoteInfo, digest: str, size: int, read_data: bool,
                      out: Findings) -> str | None:
    if info.size != size:
        return f"{info.size} bytes on the replica, {size} in the store"
    recorded = info.blake3
    if recorded is None and not read_data:
        head = backend.head(key)
        recorded = head.blake3 if head is not None else None
    if recorded is not None and not read_data:
        return None if recorded == digest else f"its recorded BLAKE3 is {recorded}, the store's manifest hashes to {digest}"
    actual, n = _download_hash(backend, key)
    out.stats["downloaded_bytes"] += n
    return None if actual == digest else f"its bytes hash to {actual}, the store's manifest to {digest}"


def _download_hash(backend: Backend, key: str) -> tuple[str, int]:
    h = new_hasher()
    n = 0
    with backend.open_read(key) as f:
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


# -------------------------------------------------------------- retention

def _retention_problem(info: RemoteInfo | None, lock: tuple[int, str], received: datetime) -> str | None:
    days, mode = lock
    if info is None:
        return None          # gone meanwhile: the missing-key check reports it
    if info.retain_until is None or info.mode is None:
        return "no Object Lock retention on it: it can be deleted or overwritten"
    if info.mode.upper() != mode:
        return f"retention mode {info.mode}, the config says {mode}"
    want = received + timedelta(days=days)
    until = info.retain_until if info.retain_until.tzinfo else info.retain_until.replace(tzinfo=timezone.utc)
    if until + SLACK < want:
        return (f"retained until {until:%Y-%m-%dT%H:%M:%SZ}, earlier than its upload's received time plus "
                f"{days} days ({want:%Y-%m-%dT%H:%M:%SZ})")
    return None


def _check_manifest_retention(backend: Backend, local: _Local, seqs: list[int], lock, add) -> None:
    keys = [layout.manifest_relpath(s) for s in seqs]
    with ThreadPoolExecutor(WORKERS) as pool:
        for seq, key, info in zip(seqs, keys, bounded_map(pool, backend.head, keys)):
            problem = _retention_problem(info, lock, local.manifests[seq][2])
            if problem:
                add("E078", key, problem)


# ---------------------------------------------------------------- objects

def _check_objects(backend: Backend, local: _Local, seqs: list[int], lock, read_data: bool, add,
                   out: Findings, progress: Progress) -> None:
    wanted = set(seqs)
    need = sorted((oid, size, seq) for oid, (size, seq) in local.objects.items() if seq in wanted)
    present: list[tuple[str, int, int, RemoteInfo]] = []
    for oid, size, seq, info in _merge(need, backend.list("objects/")):
        key = layout.object_relpath(oid)
        if info is None:
            add("E075", key, f"manifest {seq} refers to it")
            continue
        out.stats["replica_objects"] += 1
        if info.size != size:
            add("E076", key, f"{info.size} bytes on the replica, {size} recorded in manifest {seq}")
            continue
        if info.blake3 is not None and info.blake3 != oid:
            add("E077", key, f"its recorded BLAKE3 is {info.blake3}")
            continue
        present.append((oid, size, seq, info))
    if lock is not None or backend.records_metadata:
        _head_objects(backend, local, present, lock, add, progress)
    if read_data:
        _read_objects(backend, present, add, out, progress)


def _merge(need: list[tuple[str, int, int]], listing: Iterator[RemoteInfo]
           ) -> Iterator[tuple[str, int, int, RemoteInfo | None]]:
    """The objects the manifests need against the replica's sorted listing:
    (id, size, first seq, what the listing says or None), memory flat in the
    listing (keys nobody needs are skipped)."""
    cur = next(listing, None)
    for oid, size, seq in need:
        key = layout.object_relpath(oid)
        while cur is not None and cur.key < key:
            cur = next(listing, None)
        if cur is not None and cur.key == key:
            yield oid, size, seq, cur
            cur = next(listing, None)
        else:
            yield oid, size, seq, None


def _head_objects(backend: Backend, local: _Local, present, lock, add, progress: Progress) -> None:
    keys = [layout.object_relpath(oid) for oid, *_ in present]
    with ThreadPoolExecutor(WORKERS) as pool:
        for n, ((oid, _size, seq, _), info) in enumerate(zip(present, bounded_map(pool, backend.head, keys)), 1):
            key = keys[n - 1]
            progress("replica metadata", n, len(keys))
            if info is None:
                add("E075", key, "gone while it was checked")
                continue
            if info.blake3 is not None and info.blake3 != oid:
                add("E077", key, f"its recorded BLAKE3 is {info.blake3}")
            elif info.blake3 is None and backend.records_metadata:
                add("E077", key, "it has no BLAKE3 metadata, so eidetic did not write it: replaced by hand? "
                                 "('--read-data' checks its bytes)")
            problem = _retention_problem(info, lock, local.manifests[seq][2]) if lock is not None else None
            if problem:
                add("E078", key, problem)


def _read_objects(backend: Backend, present, add, out: Findings, progress: Progress) -> None:
    total = sum(size for _oid, size, _seq, _ in present)
    done = 0
    progress("replica data", 0, total)

    def one(item) -> tuple[str, str | None, str, int]:
        oid = item[0]
        key = layout.object_relpath(oid)
        try:
            actual, n = _download_hash(backend, key)
        except ReplicaMissing:
            return key, "E075", "gone while it was read", 0
        return key, (None if actual == oid else "E077"), f"its {n} bytes hash to {actual}", n

    with ThreadPoolExecutor(min(WORKERS, 4)) as pool:
        for key, code, problem, n in bounded_map(pool, one, present):
            if code:
                add(code, key, problem)
            done += n
            out.stats["downloaded_bytes"] += n
            progress("replica data", done, total)

