"""The life of an inbox entry: found, settled, claimed, done or failed.

The inbox is world-writable with the sticky bit and each entry belongs to
its uploader, so the service user cannot move an entry to another directory
(renaming a directory to a new parent needs write permission on it).  An
entry therefore stays in its inbox and changes name:

    foo-labA-1                                     complete upload
    .eidetic~claimed~<upload id>~foo-labA-1        being ingested
    .eidetic~done~<upload id>~foo-labA-1           ingested
    .eidetic~failed~<upload id>~foo-labA-1         refused; reason in state/failed/

Progress is recorded in ``<state>/claims/<upload id>.json`` *before* each
rename, so a process killed at any instant leaves a record from which the
next run finds the entry again (by name and inode) and finishes the job.
An uploader could create a name that looks reserved; such a name without a
matching record is never acted on.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pwd
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone

from ..core import layout
from .config import Config
from ..core.errors import ConfigError, LockBusy
from ..core.fsutil import fsync_dir, is_temp_name, makedirs, open_dir_nofollow, rename, write_atomic
from ..core.walk import walk
from ..core.jsonl import decode_bytes, encode_bytes

RECORD_KINDS = ("claims", "done", "failed")


@dataclass
class Candidate:
    inbox: str
    name: bytes
    study: str | None
    location: str
    ctime_ns: int

    @property
    def path(self) -> bytes:
        return os.fsencode(self.inbox) + b"/" + self.name


@dataclass
class Claim:
    upload: str
    study: str | None
    inbox: str
    original: bytes
    location: str
    dev: int
    ino: int
    uid: int
    received: str
    reason: str | None = None

    def name_in(self, state: str) -> bytes:
        return layout.inbox_state_name(state, self.upload, self.original)

    def path_in(self, state: str) -> bytes:
        return os.fsencode(self.inbox) + b"/" + self.name_in(state)

    @property
    def original_path(self) -> bytes:
        return os.fsencode(self.inbox) + b"/" + self.original

    @property
    def uploader_name(self) -> str | None:
        return user_name(self.uid)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["original"]
        encode_bytes(d, "original", self.original)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Claim":
        """The claim part of a claims, done or failed record (those add keys of their own)."""
        return cls(original=decode_bytes(d, "original"),
                   **{k: v for k, v in d.items() if k in _CLAIM_FIELDS and k != "original"})

    @classmethod
    def from_record(cls, d: dict) -> "Claim | None":
        """Like from_json, but None for a record that is not a valid claim."""
        try:
            return cls.from_json(d)
        except (TypeError, ValueError, KeyError):
            return None


_CLAIM_FIELDS = frozenset(f.name for f in fields(Claim))


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def new_upload_id(now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(4)


def _entries(cfg: Config, study: str | None,
             partial: bool) -> Iterator[tuple[str, bytes, tuple[str, str] | None]]:
    """(inbox, name, (study, location) or None) of every complete entry (no
    leading '.') or, with *partial*, every upload in progress ('.name', not one
    of our reserved names); only *study*'s when given."""
    studies = frozenset(cfg.studies)
    for inbox, dedicated in cfg.inboxes():
        if study is not None and dedicated is not None and dedicated != study:
            continue
        try:
            names = os.listdir(os.fsencode(inbox))
        except FileNotFoundError:
            if partial:
                continue   # the daemon's periodic stale check must not die of it; scan reports it
            raise ConfigError(f"inbox {inbox} does not exist (run 'eidetic init')", cfg.source) from None
        for name in names:
            if name.startswith(b".") != partial:
                continue
            if partial and (layout.is_reserved_inbox_name(name) or is_temp_name(name)):
                continue
            mapped = layout.parse_entry_name(name[1:] if partial else name, studies, dedicated)
            if study is not None and (mapped is None or mapped[0] != study):
                continue
            yield inbox, name, mapped


def scan(cfg: Config, study: str | None = None) -> list[Candidate]:
    """Complete-looking entries (no leading '.'), oldest first, across every inbox."""
    out: list[Candidate] = []
    for inbox, name, mapped in _entries(cfg, study, partial=False):
        try:
            st = os.lstat(os.fsencode(inbox) + b"/" + name)
        except FileNotFoundError:
            continue
        out.append(Candidate(inbox, name, mapped[0] if mapped else None,
                             mapped[1] if mapped else "", st.st_ctime_ns))
    out.sort(key=lambda c: (c.ctime_ns, c.name))
    return out


def last_change(path: bytes) -> float:
    """Newest mtime/ctime anywhere in an entry (not following symlinks), in seconds.
    ctime catches the final rename and any chmod; mtime catches writes."""
    return _newest_change(path, os.lstat(path))


def _newest_change(path: bytes, st: os.stat_result) -> float:
    newest = max(st.st_mtime, st.st_ctime)
    if not stat.S_ISDIR(st.st_mode):
        return newest
    try:
        top = open_dir_nofollow(path)
    except OSError:
        return newest       # gone or swapped since the lstat: ingest reports it properly
    try:
        with walk(top, stat=True, sort=False) as entries:
            for e in entries:
                if e.st is not None:     # (an unreadable folder still has its own times)
                    newest = max(newest, e.st.st_mtime, e.st.st_ctime)
    except OSError:
        pass                # unreadable: ingest reports it properly
    finally:
        os.close(top)
    return newest


@dataclass
class PartialEntry:
    """A dot-prefixed entry (an upload still being written, or abandoned)."""
    inbox: str
    name: bytes
    study: str | None
    idle_seconds: float      # since anything in it last changed
    uid: int

    @property
    def path(self) -> bytes:
        return os.fsencode(self.inbox) + b"/" + self.name


def partial_entries(cfg: Config, study: str | None = None, idle_at_least: float = 0.0,
                    now: float | None = None) -> list[PartialEntry]:
    """Uploads in progress (``.name``, not one of our reserved names) idle for at
    least *idle_at_least* seconds; the study is read from the name without the dot."""
    now = time.time() if now is None else now
    out: list[PartialEntry] = []
    for inbox, name, mapped in _entries(cfg, study, partial=True):
        path = os.fsencode(inbox) + b"/" + name
        try:
            st = os.lstat(path)
            idle = now - _newest_change(path, st)
        except FileNotFoundError:
            continue
        if idle >= idle_at_least:
            out.append(PartialEntry(inbox, name, mapped[0] if mapped else None, idle, st.st_uid))
    out.sort(key=lambda p: (-p.idle_seconds, p.name))
    return out


class StateDir:
    """``<state>/claims``, ``done``, ``failed``: one JSON record per upload."""

    def __init__(self, root: str) -> None:
        self.root = root

    def init(self) -> None:
        makedirs(os.fsencode(self.root), 0o700)
        for k in RECORD_KINDS:
            makedirs(os.fsencode(os.path.join(self.root, k)), 0o700)

    # ------------------------------------------------------- daemon lock

    def _daemon_lock_path(self, study: str) -> str:
        return os.path.join(self.root, "daemon", study + ".lock")

    def daemon_lock(self, study: str) -> int:
        """Take the study's daemon lock (held for the daemon's life) and record
        our pid in it; returns the fd to keep open.  LockBusy names the holder."""
        makedirs(os.fsencode(os.path.join(self.root, "daemon")), 0o700)
        path = self._daemon_lock_path(study)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                pid = self.daemon_pid(study)
                raise LockBusy(f"study {study}: an ingest daemon is already running"
                               + (f" (pid {pid})" if pid else "") + f"; lock {path}") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def daemon_pid(self, study: str) -> int | None:
        """The pid of the daemon holding the study's lock, or None when none runs
        (PermissionError: this user may not look)."""
        path = self._daemon_lock_path(study)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except PermissionError:
            raise       # not ours to see (status says so): never taken for "no daemon"
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return None
                text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                return int(text) if text.isdigit() else -1
            return None   # we got the lock: nobody holds it
        finally:
            os.close(fd)

    # ------------------------------------------------------- store faults

    def _fault_path(self, study: str) -> str:
        return os.path.join(self.root, "daemon", study + ".fault.json")

    def record_fault(self, study: str, message: str, entry_note: str | None, sync_failed: bool) -> None:
        """Note that a store fault stopped the study (``status`` shows it until
        a run of the study gets through).  Best effort: the state directory may
        sit on the very disk that failed, and the fault is reported anyway."""
        doc = {"study": study, "since": layout.utc_iso(datetime.now(timezone.utc)), "message": message,
               "entry": entry_note, "sync_failed": sync_failed}
        try:
            makedirs(os.fsencode(os.path.join(self.root, "daemon")), 0o700)
            write_atomic(self._fault_path(study), json.dumps(doc).encode() + b"\n", mode=0o600)
        except OSError:
            pass

    def clear_fault(self, study: str) -> None:
        try:
            os.unlink(self._fault_path(study))
        except OSError:
            pass

    def fault(self, study: str) -> dict | None:
        """The store fault that stopped *study* and is not yet over, if any."""
        try:
            with open(self._fault_path(study), "rb") as f:
                doc = json.loads(f.read(1 << 16))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("message"), str) else None

    def check(self, source: str) -> None:
        """ConfigError unless initialised; a PermissionError (one line, exit 3) for
        a caller who may not look, rather than claiming it was never initialised."""
        for k in RECORD_KINDS:
            try:
                is_dir = stat.S_ISDIR(os.stat(os.path.join(self.root, k)).st_mode)
            except (FileNotFoundError, NotADirectoryError):
                is_dir = False
            if not is_dir:
                raise ConfigError(f"state directory {self.root} is not initialised (run 'eidetic init')", source)

    def _path(self, kind: str, upload: str) -> str:
        return os.path.join(self.root, kind, upload + ".json")

    def write(self, kind: str, claim: Claim, extra: dict | None = None) -> None:
        d = claim.to_json()
        if extra:
            d.update(extra)
        write_atomic(self._path(kind, claim.upload), json.dumps(d, indent=1).encode() + b"\n", mode=0o600)

    def remove(self, kind: str, upload: str) -> None:
        try:
            os.unlink(self._path(kind, upload))
        except FileNotFoundError:
            pass

    def read(self, kind: str, upload: str) -> dict:
        with open(self._path(kind, upload), "rb") as f:
            return json.load(f)

    def list(self, kind: str) -> list[dict]:
        out = []
        d = os.path.join(self.root, kind)
        for name in sorted(os.listdir(d)):
            if is_temp_name(name) or not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(d, name), "rb") as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                continue
        return out

    def claims(self, study: str | None) -> list[Claim]:
        return [Claim.from_json(d) for d in self.list("claims") if d.get("study") == study]

    # ---------------------------------------------------------- transitions

    def claim(self, c: Candidate) -> Claim | None:
        """Take an entry: record first, then rename it to its claimed name.
        None when the entry vanished before we could take it."""
        now = datetime.now(timezone.utc)
        try:
            st = os.lstat(c.path)
        except FileNotFoundError:
            return None
        cl = Claim(upload=new_upload_id(now), study=c.study, inbox=c.inbox, original=c.name,
                   location=c.location, dev=st.st_dev, ino=st.st_ino, uid=st.st_uid,
                   received=layout.utc_iso(now))
        self.write("claims", cl)
        if not rename_entry(cl, cl.original_path, cl.path_in("claimed")):
            self.remove("claims", cl.upload)
            return None
        return cl

    def locate(self, cl: Claim) -> tuple[str, bytes] | None:
        """Where a claimed entry is now: ('claimed'|'done'|'failed'|'original', path),
        checked by inode so a look-alike planted by an uploader is not taken."""
        for state, path in (("claimed", cl.path_in("claimed")), ("done", cl.path_in("done")),
                            ("failed", cl.path_in("failed")), ("original", cl.original_path)):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if (st.st_dev, st.st_ino) == (cl.dev, cl.ino):
                return state, path
        return None

    def finish(self, cl: Claim, outcome: str, reason: str | None = None, extra: dict | None = None) -> None:
        """Rename the entry to its done/failed name and file the record under
        done/ or failed/ (the record goes first so a crash in between is
        finished by the next run)."""
        assert outcome in ("done", "failed")
        if reason is not None:
            cl.reason = reason
            self.write("claims", cl, extra)
        where = self.locate(cl)
        if where is not None and where[0] != outcome:
            rename_entry(cl, where[1], cl.path_in(outcome))
            where = (outcome, cl.path_in(outcome))
        info = dict(extra or {})
        info["where"] = os.fsdecode(where[1]) if where else None
        info["finished"] = layout.utc_iso(datetime.now(timezone.utc))
        self.write(outcome, cl, info)
        self.remove("claims", cl.upload)


def rename_entry(cl: Claim, src: bytes, dst: bytes) -> bool:
    """Rename within the inbox after checking the inode; False if it vanished."""
    try:
        st = os.lstat(src)
    except FileNotFoundError:
        return False
    if (st.st_dev, st.st_ino) != (cl.dev, cl.ino):
        return False
    try:
        rename(src, dst)
    except FileNotFoundError:
        return False
    fsync_dir(cl.inbox)
    return True


def wait_settled(path: bytes, settle_seconds: float, now: float | None = None) -> float:
    """Seconds left before the entry counts as complete (0 when settled)."""
    if settle_seconds <= 0:
        return 0.0  # no need to stat every file of the entry
    age = (now if now is not None else time.time()) - last_change(path)
    return max(0.0, settle_seconds - age)
