"""Copy what a replica lacks, in the store's own commit order (issue 12).

The order (store_format.md, "Replicas"): the marker first, once; then for
each local manifest in seq order that the replica lacks, every object it
refers to that the replica lacks, then the manifest; then HEAD.  So a
manifest on a replica always has all its objects there, as in the store,
and a run killed anywhere (even ``kill -9`` mid-object) leaves a replica
that the next run completes: every key is written whole or not at all
(S3 PUT / multipart completion, file:// rename), keys are content
addresses, and what the replica holds is read back at the start of each
run (one LIST of manifests/ and of objects/, a GET of the marker and HEAD),
never taken from a local note.

A key that is present but cannot be the local one (another size, another
marker, another HEAD digest) is never overwritten: the replica may be
locked, and a difference means something to look at with
``eidetic fsck --replica NAME``.

Memory stays flat in the number of objects: the listing of objects/ is
kept as a set of 32-byte ids, manifests are streamed record by record, and
objects are sent by a few threads with a bounded number in flight.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

from ..core import layout
from ..core.errors import IntegrityError, ReplicaCorrupt, ReplicaError, ReplicaMissing
from ..core.fsutil import open_regular_nofollow
from ..core.hashing import hash_fd
from ..store.manifest import FileRecord, ManifestReader
from ..store.store import Store
from .backend import HEAD_KEY, MARKER_KEY, Backend

S3_WORKERS = 8           # objects in flight against an S3 endpoint (latency-bound for small objects)
FILE_WORKERS = 4         # a file:// replica: each file is fsynced, a few overlap well
HEAD_EVERY_SECONDS = 60  # a long run also moves HEAD along now and then (it is only a marker)


@dataclass
class ReplicateResult:
    replica: str
    objects: int = 0          # objects sent
    bytes: int = 0            # their bytes (manifests not counted)
    manifests: int = 0        # manifests sent
    head: int = 0             # the replica's HEAD seq after the run
    local_head: int = 0
    elapsed: float = 0.0
    stopped: bool = False     # should_stop() ended it early (the next run goes on)

    @property
    def up_to_date(self) -> bool:
        return self.head == self.local_head

    def to_json(self) -> dict:
        d = asdict(self)
        d["elapsed"] = round(self.elapsed, 3)
        return d


class Progress:
    """What replicate() tells as it goes (the CLI draws a bar; the daemon says nothing)."""

    def planned(self, manifests: int, last_seq: int) -> None:
        """*manifests* manifests are to be sent, up to *last_seq*."""

    def manifest(self, seq: int) -> None:
        """Manifest *seq* (and all its objects) is on the replica."""

    def sent(self, nbytes: int) -> None:
        """*nbytes* more bytes went out (called from the sending threads)."""


class Throttle:
    """--bwlimit: at most *rate* bytes per second on average, with a quarter
    second's worth of burst.  Thread-safe; sleeps in the caller's thread."""

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = float(rate)
        self._free_at = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            now = time.monotonic()
            start = max(self._free_at, now - 0.25)
            self._free_at = start + nbytes / self.rate
            delay = self._free_at - now - 0.25
        if delay > 0:
            time.sleep(delay)


def replicate(store: Store, backend: Backend, *, bwlimit: float | None = None, progress: Progress | None = None,
              should_stop: Callable[[], bool] | None = None, workers: int | None = None) -> ReplicateResult:
    """Bring *backend* up to the store's HEAD.  Raises ReplicaError (and its
    subclasses) for anything that stops it; what was sent before stays."""
    t0 = time.monotonic()
    progress = progress or Progress()
    stop = should_stop or (lambda: False)
    name = backend.name
    local_head, local_digest = store.head()
    result = ReplicateResult(name, local_head=local_head)

    backend.check_ready()
    throttle = Throttle(bwlimit) if bwlimit else None
    meter = _Meter(throttle, progress)
    wire_level = hasattr(type(backend), "on_send")    # the backend meters bytes as they are sent
    abort_stale = getattr(backend, "abort_stale_uploads", None)
    if abort_stale is not None:
        try:
            abort_stale()
        except ReplicaError:
            pass    # a key allowed to write may not be allowed to list uploads; only storage is at stake

    _ensure_marker(store, backend)
    remote_head = read_head(backend)
    if remote_head is not None:
        _check_same_history(store, backend, remote_head, local_head, local_digest)
    result.head = remote_head[0] if remote_head else 0

    remote_manifests = {}
    for info in backend.list("manifests/"):
        seq = layout.parse_manifest_name(info.key.rpartition("/")[2])
        if seq is not None and info.key == layout.manifest_relpath(seq):
            remote_manifests[seq] = info.size
    todo = []
    for seq in range(1, local_head + 1):
        if seq in remote_manifests:
            size = os.stat(store.manifest_path(seq)).st_size
            if remote_manifests[seq] != size:
                raise ReplicaCorrupt(f"{layout.manifest_relpath(seq)} is on the replica with "
                                     f"{remote_manifests[seq]} bytes, the local one has {size}: not overwritten; "
                                     f"run 'eidetic fsck --replica {name}'", name)
        else:
            todo.append(seq)
    del remote_manifests
    progress.planned(len(todo), local_head)
    complete = (todo[0] - 1) if todo else local_head   # every manifest 1..complete is on the replica

    if todo:
        have = _remote_objects(store, backend)
        nworkers = workers or (S3_WORKERS if wire_level else FILE_WORKERS)
        pool = ThreadPoolExecutor(max_workers=nworkers, thread_name_prefix=f"replicate-{name}")
        last_head_write = time.monotonic()
        if wire_level:
            backend.on_send = meter       # type: ignore[attr-defined]
        try:
            for i, seq in enumerate(todo):
                digest = None if stop() else _send_upload(store, backend, seq, have, pool, 2 * nworkers, meter,
                                                          wire_level, result, stop)
                if digest is None:       # stopped: the next run goes on from here
                    result.stopped = True
                    break
                result.manifests += 1
                progress.manifest(seq)
                # Every manifest up to the next one to send is on the replica now.
                complete = todo[i + 1] - 1 if i + 1 < len(todo) else local_head
                if time.monotonic() - last_head_write > HEAD_EVERY_SECONDS and complete < local_head:
                    _put_head(backend, complete, digest if complete == seq else _manifest_digest(store, complete))
                    result.head = complete
                    last_head_write = time.monotonic()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if wire_level:
                backend.on_send = None   # type: ignore[attr-defined]
    if complete > result.head:
        _put_head(backend, complete, local_digest if complete == local_head else _manifest_digest(store, complete))
        result.head = complete
    result.elapsed = time.monotonic() - t0
    return result


class _Meter:
    def __init__(self, throttle: Throttle | None, progress: Progress) -> None:
        self.throttle = throttle
        self.progress = progress

    def __call__(self, nbytes: int) -> None:
        if self.throttle is not None:
            self.throttle(nbytes)
        self.progress.sent(nbytes)


# ------------------------------------------------------------------ steps

def _ensure_marker(store: Store, backend: Backend) -> None:
    """The marker is written first and once; one already there must be this
    store's (same format, same study), else this is another store's place."""
    with open(os.path.join(store.root, layout.STORE_MARKER), "rb") as f:
        local = f.read(4096)
    try:
        remote = backend.read_bytes(MARKER_KEY, limit=4096)
    except ReplicaMissing:
        backend.put_bytes(MARKER_KEY, local, None)
        return
    if remote != local:
        first = remote.decode("utf-8", "replace").replace("\n", " ").strip()[:80]
        raise ReplicaCorrupt(f"the replica holds another store's marker ({first!r}), not study {store.name}'s: "
                             "nothing was written; give each study's replica a place of its own", backend.name)


def read_head(backend: Backend) -> tuple[int, str] | None:
    """The replica's HEAD as (seq, digest); None when it has none yet."""
    try:
        data = backend.read_bytes(HEAD_KEY, limit=200)
    except ReplicaMissing:
        return None
    try:
        seq, digest = data.decode("ascii").split()
        if not layout.valid_object_id(digest) or int(seq) < 1:
            raise ValueError
        return int(seq), digest
    except ValueError:
        raise ReplicaCorrupt(f"its HEAD is unreadable ({data[:40]!r}): run 'eidetic fsck --replica "
                             f"{backend.name}'", backend.name) from None


def _check_same_history(store: Store, backend: Backend, remote: tuple[int, str], local_head: int,
                        local_digest: str | None) -> None:
    seq, digest = remote
    if seq > local_head:
        raise ReplicaCorrupt(f"the replica's HEAD is at upload {seq}, ahead of this store's {local_head} (was the "
                             "store restored from an older copy?): nothing was written; run 'eidetic fsck "
                             f"--replica {backend.name}', and 'eidetic restore' if the replica is the newer copy",
                             backend.name)
    mine = local_digest if seq == local_head else _manifest_digest(store, seq)
    if mine != digest:
        raise ReplicaCorrupt(f"the replica's manifest {seq} is not this store's (another history): nothing was "
                             f"written; run 'eidetic fsck --replica {backend.name}'", backend.name)


def _manifest_digest(store: Store, seq: int) -> str:
    fd = open_regular_nofollow(store.manifest_path(seq))[0]
    try:
        return hash_fd(fd)[0]
    finally:
        os.close(fd)


def _remote_objects(store: Store, backend: Backend) -> set[bytes]:
    """The ids of the objects on the replica (32 bytes each).  A key of the
    wrong size is refused here, before anything is sent."""
    have: set[bytes] = set()
    for info in backend.list("objects/"):
        shard, _, rest = info.key[len("objects/"):].partition("/")
        parsed = layout.parse_object_relpath(shard, rest)
        if parsed is None or parsed[1] != 0:
            continue    # not a key replicate writes (twins are not replicated)
        oid = parsed[0]
        try:
            local = os.lstat(store.objects.path(oid)).st_size
        except FileNotFoundError:
            local = None
        if local is not None and local != info.size:
            raise ReplicaCorrupt(f"{info.key} is on the replica with {info.size} bytes, the local object has "
                                 f"{local}: not overwritten; run 'eidetic fsck' and 'eidetic fsck --replica "
                                 f"{backend.name}'", backend.name)
        have.add(bytes.fromhex(oid))
    return have


def _objects_of(store: Store, seq: int):
    """(id, size) of every object manifest *seq* refers to, streamed."""
    try:
        r = ManifestReader(store.manifest_path(seq))
        if r.header.description is not None:
            yield r.header.description["blake3"], r.header.description["size"]
        for rec in r.records():
            if isinstance(rec, FileRecord):
                yield rec.blake3, rec.size
    except IntegrityError as e:
        raise ReplicaError(f"the local manifest {seq} cannot be read ({e}): run 'eidetic fsck'",
                           store.name) from None


def _send_upload(store: Store, backend: Backend, seq: int, have: set[bytes], pool: ThreadPoolExecutor,
                 limit: int, meter: _Meter, wire_level: bool, result: ReplicateResult,
                 stop: Callable[[], bool]) -> str | None:
    """Manifest *seq*'s missing objects, then the manifest; its digest, or
    None when *stop* said so before the manifest went."""
    inflight: set[Future] = set()
    # At most *limit* objects in flight: memory does not grow with the upload.
    failed: list[BaseException] = []
    stopped = False

    def reap(block: bool) -> None:
        done, _ = wait(inflight, timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for f in done:
            inflight.discard(f)
            e = f.exception()
            if e is not None:
                failed.append(e)
            else:
                result.objects += 1
                result.bytes += f.result()

    try:
        for oid, size in _objects_of(store, seq):
            key = bytes.fromhex(oid)
            if key in have:
                continue
            if stop():
                stopped = True
                break
            have.add(key)
            inflight.add(pool.submit(_send_object, store, backend, oid, size, meter, wire_level))
            while len(inflight) >= limit and not failed:
                reap(block=True)
            if inflight:
                reap(block=False)
            if failed:
                break
    finally:
        while inflight:
            reap(block=True)
    if failed:
        # Those not sent are not on the replica: the next run's listing knows.
        raise failed[0]
    if stopped:
        return None
    path = store.manifest_path(seq)
    fd, st = open_regular_nofollow(path)
    try:
        digest = hash_fd(fd)[0]
        os.lseek(fd, 0, os.SEEK_SET)
        backend.put_file(layout.manifest_relpath(seq), fd, st.st_size, digest)
    finally:
        os.close(fd)
    return digest


def _send_object(store: Store, backend: Backend, oid: str, size: int, meter: _Meter, wire_level: bool) -> int:
    try:
        fd, st = open_regular_nofollow(store.objects.path(oid))
    except FileNotFoundError:
        raise ReplicaError(f"the local object {oid} is missing: run 'eidetic fsck' on study {store.name} "
                           "(--repair may fetch it from a replica that has it)", backend.name) from None
    try:
        if st.st_size != size:
            raise ReplicaError(f"the local object {oid} has {st.st_size} bytes, its manifest says {size}: "
                               f"nothing was sent; run 'eidetic fsck' on study {store.name}", backend.name)
        backend.put_file(layout.object_relpath(oid), fd, size, oid)
    finally:
        os.close(fd)
    if not wire_level:
        meter(size)
    return size


def _put_head(backend: Backend, seq: int, digest: str) -> None:
    backend.put_bytes(HEAD_KEY, f"{seq} {digest}\n".encode(), None)


# ------------------------------------------------------------------- lag

@dataclass
class Lag:
    """How far a replica is behind its store: *uploads* not yet on it, the
    oldest of which was received at *oldest_received* (None when none)."""

    replica: str
    uploads: int
    oldest_received: datetime | None
    replica_seq: int
    local_seq: int

    def seconds(self, now: datetime | None = None) -> float:
        if self.oldest_received is None:
            return 0.0
        now = now or datetime.now(timezone.utc)
        return max(0.0, (now - self.oldest_received).total_seconds())

    def over(self, hours: float, now: datetime | None = None) -> bool:
        return self.uploads > 0 and self.seconds(now) > hours * 3600


def replica_lag(store: Store, backend: Backend) -> Lag:
    """Cheap enough for every ``status``: one GET of the replica's HEAD (a
    LIST of manifests/ only when it has no HEAD yet) and one manifest header
    read locally.  Raises ReplicaError when the replica cannot be read."""
    local_seq = store.head()[0]
    head = read_head(backend)
    if head is not None:
        replica_seq = min(head[0], local_seq)
        first = replica_seq + 1
        uploads = local_seq - replica_seq
    else:
        present = set()
        for info in backend.list("manifests/"):
            seq = layout.parse_manifest_name(info.key.rpartition("/")[2])
            if seq is not None:
                present.add(seq)
        missing = [s for s in range(1, local_seq + 1) if s not in present]
        uploads = len(missing)
        first = missing[0] if missing else local_seq + 1
        replica_seq = first - 1
    return _lag(store, backend.name, replica_seq, uploads, first, local_seq)


def lag_since(store: Store, replica: str, replica_seq: int) -> Lag:
    """The lag computed locally from a replica seq known from before (the
    last successful run): what the daemon uses while a replica cannot be read."""
    local_seq = store.head()[0]
    replica_seq = min(replica_seq, local_seq)
    return _lag(store, replica, replica_seq, local_seq - replica_seq, replica_seq + 1, local_seq)


def _lag(store: Store, replica: str, replica_seq: int, uploads: int, first: int, local_seq: int) -> Lag:
    oldest = None
    if uploads:
        r = ManifestReader(store.manifest_path(first))
        r.close()
        oldest = layout.parse_utc_iso(r.header.received)
    return Lag(replica, uploads, oldest, replica_seq, local_seq)


def lag_age_text(lag: Lag, now: datetime | None = None) -> str:
    """"3 uploads, the oldest 2 h 5 min old" / "up to date"."""
    if not lag.uploads:
        return "up to date"
    return f"{layout.plural(lag.uploads, 'upload')} behind, the oldest received {_age(lag.seconds(now))} ago"


def _age(seconds: float) -> str:
    d = timedelta(seconds=int(seconds))
    if d.days:
        return f"{d.days} d {d.seconds // 3600} h"
    h, rem = divmod(d.seconds, 3600)
    return f"{h} h {rem // 60} min" if h else f"{rem // 60} min {rem % 60} s"
