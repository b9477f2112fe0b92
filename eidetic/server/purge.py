"""Removing ingested entries from the inbox once the store provably holds them.

For root's cron (``eidetic purge --older-than DAYS``): an ingested entry
stays in its sticky inbox as ``.eidetic~done~<upload>~<name>`` and belongs to
its uploader, so the service user cannot delete it.  An entry is removed only
when

* its done record (``<state>/done/<upload>.json``) finished more than DAYS ago,
  and the inbox name still holds the very directory that was ingested (inode);
* every regular file in it hashes (its bytes, read now) to what that upload's
  manifest recorded for the same path, and that object exists in the store
  with that size (the upload description at the entry root: the manifest
  header's ``description``).  Symlinks, FIFOs and the like were recorded as
  skips and are removed with the rest.

One file not proven (added or changed after the ingest, unreadable) keeps the
whole entry.  Removal never follows a symlink (directory fds, ``unlink`` and
``rmdir`` relative to them) and unlinks a file only if it is still the inode,
size, mtime and ctime that was proven; anything else found then is left, and
so is the directory holding it.  Failed and claimed entries are never touched.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from ..core import layout
from .config import Config, StudyConfig
from ..core.description import DESCRIPTION_NAME
from ..core.errors import EideticError, UsageError
from ..core.fsutil import AtomicFile, open_regular_nofollow
from .inbox import Claim, StateDir
from ..core.jsonl import encode_bytes
from ..core.walk import DIR, ERROR, FILE, LEAVE, walk
from ..store.manifest import FileRecord, ManifestReader
from ..store.objects import hash_fd
from ..store.store import Store

MAX_REASONS = 5
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class PurgeResult:
    entry: bytes                 # the name it was sent under
    upload: str
    study: str | None
    where: bytes                 # its done name in the inbox
    outcome: str                 # "removed" | "would remove" | "kept" | "gone"
    files: int = 0
    bytes: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_json(self) -> dict:
        d: dict = {"upload": self.upload, "study": self.study, "outcome": self.outcome, "files": self.files,
                   "bytes": self.bytes, "reason": self.reason or None}
        encode_bytes(d, "entry", self.entry)
        encode_bytes(d, "where", self.where)
        return d


@dataclass
class _Proof:
    files: int = 0
    bytes: int = 0
    proven: dict = field(default_factory=dict)    # (dev, ino) -> (size, mtime_ns, ctime_ns)
    problems: layout.FirstN = field(default_factory=lambda: layout.FirstN(MAX_REASONS))

    def problem(self, text: str) -> None:
        self.problems.add(text)


def purge(cfg: Config, older_than_days: float, dry_run: bool = False, study: str | None = None,
          now: float | None = None, log: Callable[[PurgeResult], None] | None = None) -> list[PurgeResult]:
    """Handle every done entry finished more than *older_than_days* ago; returns
    one result per candidate (entries already purged are not candidates)."""
    if older_than_days < 0:
        raise UsageError("--older-than must be a number of days >= 0")
    if study is not None:
        cfg.study(study)      # ConfigError for an unknown one
    now = time.time() if now is None else now
    state = StateDir(cfg.state)
    state.check(cfg.source)
    busy = {r.get("upload") for r in state.list("claims")} | {r.get("upload") for r in state.list("failed")}
    out: list[PurgeResult] = []
    for rec in state.list("done"):
        if rec.get("purged") or (study is not None and rec.get("study") != study):
            continue
        try:
            finished = layout.parse_utc_iso(rec["finished"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if now - finished <= older_than_days * 86400:
            continue
        res = _one(cfg, state, rec, busy, dry_run, now)
        if res is None:
            continue
        out.append(res)
        if log is not None:
            log(res)
    return out


def _one(cfg: Config, state: StateDir, rec: dict, busy: set, dry_run: bool, now: float) -> PurgeResult | None:
    cl = Claim.from_record(rec)
    if cl is None:
        return None
    where = cl.path_in("done")
    res = PurgeResult(cl.original, cl.upload, cl.study, where, "kept")
    if cl.upload in busy:
        res.reasons.append("the upload also has a claim or failure record")
        return res
    try:
        st = os.lstat(where)
    except FileNotFoundError:
        res.outcome = "gone"
        return res
    if (st.st_dev, st.st_ino) != (cl.dev, cl.ino) or not stat.S_ISDIR(st.st_mode):
        res.reasons.append("the done name no longer holds the directory that was ingested")
        return res
    s = cfg.studies.get(cl.study or "")
    if s is None:
        res.reasons.append(f"study {cl.study!r} is not configured")
        return res
    seq = rec.get("seq")
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
        res.reasons.append("the done record names no manifest")
        return res
    try:
        expected, desc, store = _expected(s, seq, cl.upload)
        proof = _prove(cl, where, expected, desc, store)
    except (OSError, EideticError) as e:
        res.reasons.append(e.message if isinstance(e, EideticError) else f"{e.strerror}: "
                           f"{os.fsdecode(e.filename) if e.filename else ''}")
        return res
    res.files, res.bytes = proof.files, proof.bytes
    if proof.problems:
        res.reasons.append(proof.problems.text(more="; and {} more"))
        return res
    if dry_run:
        res.outcome = "would remove"
        return res
    problems = _remove(cl, where, proof)
    if problems:
        res.reasons.append("partly removed; left: " + layout.first_and_more(problems, limit=MAX_REASONS, more=""))
        return res
    res.outcome = "removed"
    _mark_purged(state, cl.upload, now)
    return res


def _expected(s: StudyConfig, seq: int, upload: str) -> tuple[dict[bytes, tuple[str, int]], tuple[str, int] | None, Store]:
    """path -> (blake3, size) of the upload's manifest, and its description's (blake3, size)."""
    store = Store.open(*s.store_args())
    r = ManifestReader(store.manifest_path(seq))
    if r.header.upload != upload:
        r.close()
        raise UsageError(f"manifest {seq} of study {s.name} is upload {r.header.upload}, not {upload}")
    expected = {rec.path: (rec.blake3, rec.size) for rec in r.records() if isinstance(rec, FileRecord)}
    d = r.header.description      # validated by the manifest reader
    return expected, (d["blake3"], d["size"]) if d else None, store


def _object_ok(store: Store, oid: str, size: int) -> bool:
    try:
        st = os.lstat(store.objects.path(oid))
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_size == size


def _prove(cl: Claim, where: bytes, expected: dict, desc: tuple[str, int] | None, store: Store) -> _Proof:
    proof = _Proof()
    top = os.open(where, _DIR_FLAGS)
    try:
        top_st = os.fstat(top)
        if (top_st.st_dev, top_st.st_ino) != (cl.dev, cl.ino):
            proof.problem("the entry was replaced")
            return proof
        with walk(top, one_fs=True) as entries:
            for e in entries:
                if e.kind == FILE:
                    _prove_file(proof, store, e.dir_fd, e.name, e.rel, layout.display(e.rel), expected, desc)
                elif e.kind == ERROR:       # a folder not entered
                    if isinstance(e.error, FileNotFoundError):
                        continue
                    shown = layout.display(e.rel)
                    proof.problem(f"{shown}/ is another file system mounted into the entry"
                                  if e.error.errno == errno.EXDEV else f"{shown}/: {e.error.strerror}")
                # anything else (symlink, FIFO, socket, device) was a skip record: removable
    finally:
        os.close(top)
    return proof


def _prove_file(proof: _Proof, store: Store, dfd: int, name: bytes, relpath: bytes, shown: str,
                expected: dict, desc: tuple[str, int] | None) -> None:
    want = expected.get(relpath)
    if want is None and relpath == DESCRIPTION_NAME:
        want = desc
    if want is None:
        proof.problem(f"{shown} is not in the upload's manifest (added after the ingest?)")
        return
    try:
        fd, before = open_regular_nofollow(name, dir_fd=dfd)
    except FileNotFoundError:
        return      # gone since the listing: nothing of it to remove
    except OSError as e:
        proof.problem(f"{shown}: {e.strerror}")
        return
    try:
        oid, n = hash_fd(fd)
        after = os.fstat(fd)
    except OSError as e:
        proof.problem(f"{shown}: {e.strerror}")
        return
    finally:
        os.close(fd)
    if (oid, n) != want:
        proof.problem(f"{shown} differs from what was ingested (changed after the ingest?)")
        return
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (before.st_size, before.st_mtime_ns,
                                                                  before.st_ctime_ns):
        proof.problem(f"{shown} changed while being read")
        return
    if not _object_ok(store, oid, n):
        proof.problem(f"{shown}: its object {oid} is not in the store with size {n}")
        return
    proof.proven[(before.st_dev, before.st_ino)] = (before.st_size, before.st_mtime_ns, before.st_ctime_ns)
    proof.files += 1
    proof.bytes += n


def _remove(cl: Claim, where: bytes, proof: _Proof) -> list[str]:
    """Remove the proven entry bottom-up through directory fds; returns what was left and why."""
    problems: list[str] = []
    inbox_fd = os.open(os.fsencode(cl.inbox), _DIR_FLAGS)
    try:
        entry = where.rpartition(b"/")[2]
        top = os.open(entry, _DIR_FLAGS, dir_fd=inbox_fd)
        try:
            top_st = os.fstat(top)
            if (top_st.st_dev, top_st.st_ino) != (cl.dev, cl.ino):
                return ["the entry was replaced"]
            with walk(top, stat=True, leave=True) as entries:
                for e in entries:
                    kind = e.kind
                    if kind == DIR:
                        continue
                    try:
                        if kind == LEAVE:
                            _rmdir(e.name, e.dir_fd, e.rel, problems)
                        elif kind == ERROR:
                            raise e.error
                        elif kind == FILE:
                            st = e.st
                            if proof.proven.get((st.st_dev, st.st_ino)) != (st.st_size, st.st_mtime_ns,
                                                                             st.st_ctime_ns):
                                problems.append(f"{layout.display(e.rel)} appeared or changed during the purge")
                                continue
                            os.unlink(e.name, dir_fd=e.dir_fd)
                        else:
                            os.unlink(e.name, dir_fd=e.dir_fd)
                    except FileNotFoundError:
                        continue
                    except OSError as err:
                        problems.append(f"{layout.display(e.rel)}: {err.strerror}")
        finally:
            os.close(top)
        _rmdir(entry, inbox_fd, b"", problems)
    finally:
        os.close(inbox_fd)
    return problems


def _rmdir(name: bytes, dir_fd: int, rel: bytes, problems: list[str]) -> None:
    try:
        os.rmdir(name, dir_fd=dir_fd)
    except OSError as e:
        what = "not empty" if e.errno in (errno.ENOTEMPTY, errno.EEXIST) else e.strerror
        problems.append(f"{layout.display(rel) or '(the entry)'}/: {what}")


def _mark_purged(state: StateDir, upload: str, now: float) -> None:
    """Add "purged" to the done record, keeping its owner: purge runs as root,
    and a record root owns (mode 0600) would be unreadable for the daemon."""
    path = os.path.join(state.root, "done", upload + ".json")
    st = os.lstat(path)
    with open(path, "rb") as f:
        rec = json.load(f)
    rec["purged"] = layout.utc_iso(datetime.fromtimestamp(now, timezone.utc))
    af = AtomicFile(path, mode=stat.S_IMODE(st.st_mode))
    f = af.open()
    try:
        f.write(json.dumps(rec, indent=1).encode() + b"\n")
        if (os.geteuid(), os.getegid()) != (st.st_uid, st.st_gid):
            os.fchown(f.fileno(), st.st_uid, st.st_gid)
    except BaseException:
        af.abort()
        raise
    af.commit()
