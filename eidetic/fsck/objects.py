"""The objects pass: objects/ merged with the objects the manifests need,
and every object re-hashed (unless *quick*).

The re-hash of a store with many objects runs in a worker process pool,
started before the other passes so that it goes on while this process
replays the manifests and walks the tree (a process, not a thread: those
passes are mostly Python, and a thread would wait for the GIL behind them).
A small store is hashed in this process, without the pool's start-up cost.
The workers are spawned, so a script that calls check() on a large store
needs multiprocessing's usual ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import stat
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import chain
from typing import Callable, Iterator

from ..core import layout
from ..core.errors import IntegrityError
from ..core.fsutil import is_temp_name, open_regular_nofollow
from ..core.hashing import SMALL_FILE, hash_bytes
from ..store.index import Index
from ..store.objects import ObjectStore
from .codes import Findings, first_of

POOL_MIN_SHARDS = 64   # fewer shard directories than this: a small store, hashed in this process
REF_LIMIT = 1000       # affected versions remembered per bad object
SHOWN = 5              # affected versions named in a finding's detail
USED = ("E020", "E021", "E022")   # findings that name the versions an object holds

Bad = tuple[str, str, bytes, str]     # (code, object id or "", path, detail)


class Rehash:
    """The re-hash of every object file: started at once in a pool, or run here when collected."""

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        try:
            shards = sorted(os.listdir(objects.root + b"/objects"))
        except OSError:
            shards = []
        dirs = [objects.root + b"/objects/" + s for s in shards]
        self.pool: ProcessPoolExecutor | None = None
        self.futures: list[Future] = []
        workers = max(1, min(8, (os.cpu_count() or 2) - 1))    # this process has the other passes to run
        step = -(-len(dirs) // (4 * workers)) or 1
        self.batches = [dirs[i:i + step] for i in range(0, len(dirs), step)]
        if len(dirs) < POOL_MIN_SHARDS:
            return
        try:
            # spawned, never forked: this process may have an LMDB environment open (docs/design.md, "LMDB")
            ctx = multiprocessing.get_context("spawn")
            self.stop = ctx.Event()      # set by close(): a check that failed need not wait for the hashing
            self.pool = ProcessPoolExecutor(workers, ctx, initializer=_worker, initargs=(self.stop,))
            self.futures = [self.pool.submit(hash_shards, objects, b) for b in self.batches]
        except OSError:     # no process to start: hash in this process
            self.close()

    def results(self) -> Iterator[tuple[list[Bad], int]]:
        """(problems, bytes hashed) per batch of shards, in turn."""
        if self.pool is None:
            yield from (hash_shards(self.objects, b) for b in self.batches)
            return
        try:
            for fut in self.futures:
                yield fut.result()
        except BrokenProcessPool as e:
            raise IntegrityError(f"re-hashing objects failed: {e}") from None

    def close(self) -> None:
        if self.pool is not None:
            self.stop.set()
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None


_stop = None    # in a worker: the pool's stop event


def _worker(stop) -> None:
    global _stop
    _stop = stop


def hash_shards(objects: ObjectStore, dirs: list[bytes]) -> tuple[list[Bad], int]:
    """Re-hash the objects under some shard directories (small ones read whole,
    large ones with blake3's own threads): (problems, bytes hashed)."""
    bad: list[Bad] = []
    done = 0
    # (a shard that is no directory is a foreign file: the merge reports it)
    files = ((sdir, name) for sdir in dirs if os.path.isdir(sdir) and not os.path.islink(sdir)
             for name in sorted(os.listdir(sdir)))
    for sdir, name in files:
        parsed = layout.parse_object_relpath(os.path.basename(sdir).decode("ascii", "replace"),
                                             name.decode("ascii", "replace"))
        if parsed is None:
            continue
        if _stop is not None and _stop.is_set():
            break
        oid, twin = parsed
        path = sdir + b"/" + name
        try:
            fd, st = open_regular_nofollow(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            not_file = e.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO)
            bad.append(("E023", oid, path, "not a regular file") if not_file else
                       ("E020", oid, path, f"unreadable: {e.strerror}"))
            continue
        problem = stat_problem(st)
        if problem is not None:
            bad.append((problem[0], oid, path, problem[1]))
        try:
            try:
                data = os.read(fd, st.st_size + 1) if st.st_size <= SMALL_FILE else None
            finally:
                os.close(fd)
            if data is not None and len(data) <= st.st_size:
                actual, size = hash_bytes(data), len(data)
            else:           # large, or grown since fstat: hash it the long way
                actual, size = objects.hash_of(oid, twin)
        except FileNotFoundError:
            continue
        except OSError as e:
            bad.append(("E020", oid, path, f"unreadable: {e.strerror}"))
            continue
        done += size
        if actual != oid:
            bad.append(("E020", oid, path, f"its {size} bytes hash to {actual}"))
    return bad, done


def stat_problem(st: os.stat_result) -> tuple[str, str] | None:
    if not stat.S_ISREG(st.st_mode):
        return "E023", "not a regular file"
    if st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return "E022", f"mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def check_objects(out: Findings, objects: ObjectStore, fresh: Index, rehash: Rehash | None,
                  progress: Callable) -> None:
    """objects/ against what the fresh index (every manifest) needs, then the re-hash's problems."""
    found: list[Bad] = []       # named with the versions they hold at the end: one pass over the index for all
    out.stats["objects"], out.stats["object_bytes"] = merge(objects, fresh, rehash is None,
                                                            lambda *bad: found.append(bad))
    if rehash is not None:
        total = out.stats["object_bytes"]       # what the merge just summed: the bytes the re-hash will read
        done = 0
        progress("objects", done, total)
        for bad, n in rehash.results():
            found.extend(bad)
            done += n
            progress("objects", done, total)
        out.stats["hashed_bytes"] = done
    users = fresh.users_of({oid for code, oid, _, _ in found if code in USED and layout.valid_object_id(oid)},
                           REF_LIMIT)
    for code, oid, path, detail in found:
        out.add(code, path, *_enrich(code, oid, path, detail, fresh, objects, users))


def merge(objects: ObjectStore, fresh: Index, check_stat: bool, emit: Callable[[str, str, bytes, str], None]
          ) -> tuple[int, int]:
    """Names under objects/ against the objects the manifests need: two
    sorted streams, merged (nothing held in memory).  *check_stat* adds
    what lstat can tell (type, write bits, size) when nothing re-hashes.
    Returns (object files, bytes the manifests need)."""
    need = fresh.iter_objects()
    cur, cur_seen = next(need, None), False
    need_bytes = count = 0
    for oid, _twin, path in chain(objects.iter_files(), [("~", 0, b"")]):     # "~": after every object id
        if not oid:
            if is_temp_name(path.rpartition(b"/")[2]):
                emit("W050", "", path, "temp file of an interrupted object write")
            else:
                emit("E023", "", path, "not an object name")
            continue
        while cur is not None and cur[0] < oid:
            need_bytes += cur[1]
            if not cur_seen:
                emit("E021", cur[0], objects.path(cur[0]), "")
            cur, cur_seen = next(need, None), False
        if oid == "~":
            break
        count += 1
        referenced = cur is not None and cur[0] == oid
        cur_seen = cur_seen or referenced
        if not referenced:
            emit("W024", oid, path, "referenced by no manifest; harmless, it only takes space")
        if check_stat:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            problem = stat_problem(st)
            if problem is not None:
                emit(problem[0], oid, path, problem[1])
            elif referenced and st.st_size != cur[1]:
                emit("E020", oid, path, f"size {st.st_size}, recorded {cur[1]}")
    return count, need_bytes


def _enrich(code: str, oid: str, path: bytes, detail: str, fresh: Index, objects: ObjectStore,
            used_by: dict[str, tuple[list, int]]) -> tuple[str, dict | None]:
    """(detail, data) of an object finding: which versions (or which upload's description) a bad
    object holds, for the report and for repair."""
    if code == "W024":
        return detail, {"oid": oid}
    if code == "E023":
        return detail, {"store_rel": path[len(objects.root) + 1:]}
    if code not in USED or not layout.valid_object_id(oid):
        return detail, None
    users, total = used_by.get(oid, ([], 0))
    versions = [(v.path, v.n, v.stamp) for v in users]
    data: dict = {"oid": oid, "versions": versions, "total": total}
    if versions:
        said = "used by " + name_versions(versions, total, SHOWN)
    else:
        said = description_of(fresh, oid)
        if said:
            data["description"] = said
    if said:
        detail = f"{detail}; {said}" if detail else said
    return detail, data


def description_of(fresh: Index, oid: str) -> str | None:
    """"the upload description of upload X (manifest N)" when *oid* is one (the
    objects database names the first manifest that referred to it)."""
    seq = fresh.first_seq(oid)
    summary = (fresh.upload(seq) if seq is not None else None) or {}
    if (summary.get("description") or {}).get("blake3") != oid:
        return None
    return f"the upload description of upload {summary.get('upload')} (manifest {seq}), kept as the sender's claim"


def name_versions(vs: list[tuple[bytes, int, str]], total: int, limit: int) -> str:
    """``a/b v1, c v2 and 7 more``: the first *limit* of *total* versions."""
    return first_of([f"{layout.display(p)} v{n}" for p, n, _ in vs[:limit]], total, limit)
