"""What each study's inbox, state and store look like right now (``eidetic status``).

Read-only and lock-free: it never takes a store lock, so it works while a
daemon ingests (LMDB readers do not block its writer; an upload being applied
is counted once it is whole).  It never creates anything either (an index
created by root here would later be unwritable for the service user): an
index that is missing, damaged or out of step with HEAD is reported as such
(``index_error``, exit status 3), with the command that rebuilds it.
"""

from __future__ import annotations

import errno
import math
import os
import pwd
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from . import inbox as inbox_mod
from .config import Config, StudyConfig
from ..core.errors import AccessDenied, EideticError, IndexUnusable, StoreIOError
from .access import reading
from .deploy import service_ids, user_name_of
from ..core.fsutil import disk_percent_used
from .inbox import RECORD_KINDS, Candidate, Claim, PartialEntry, StateDir, user_name
from ..core.jsonl import encode_bytes
from ..core.layout import parse_utc_iso
from ..store.store import Store


def _named(d: dict, key: str, value: bytes) -> dict:
    encode_bytes(d, key, value)
    return d


@dataclass
class Waiting:
    entry: bytes
    inbox: str

    def to_json(self) -> dict:
        return _named({"inbox": self.inbox}, "entry", self.entry)


@dataclass
class Processing:
    entry: bytes
    upload: str
    received: str

    def to_json(self) -> dict:
        return _named({"upload": self.upload, "received": self.received}, "entry", self.entry)


@dataclass
class Failed:
    entry: bytes          # the name it was sent under
    upload: str
    reason: str
    where: bytes          # its failed name in the inbox now
    finished: str

    def to_json(self) -> dict:
        d = _named({"upload": self.upload, "reason": self.reason, "finished": self.finished}, "entry", self.entry)
        return _named(d, "where", self.where)


@dataclass
class Stale:
    entry: bytes          # the dot name
    inbox: str
    idle_seconds: float
    uid: int
    user: str | None

    def to_json(self) -> dict:
        return _named({"inbox": self.inbox, "idle_seconds": round(self.idle_seconds), "uid": self.uid,
                       "user": self.user}, "entry", self.entry)


@dataclass
class LastIngest:
    time: str             # when it finished (or was received, when only the index knows it)
    upload: str
    entry: bytes
    files: int
    bytes: int
    seq: int | None

    def to_json(self) -> dict:
        return _named({"time": self.time, "upload": self.upload, "files": self.files, "bytes": self.bytes,
                       "seq": self.seq}, "entry", self.entry)


@dataclass
class Unknown:
    """An entry whose name maps to no configured study."""
    entry: bytes
    inbox: str
    state: str            # "waiting" (not taken yet) | "failed" (refused, still in the inbox)
    upload: str | None = None
    reason: str | None = None
    where: bytes | None = None

    def to_json(self) -> dict:
        d = _named({"inbox": self.inbox, "state": self.state, "upload": self.upload, "reason": self.reason},
                   "entry", self.entry)
        if self.where is not None:
            encode_bytes(d, "where", self.where)
        else:
            d["where"] = None
        return d


@dataclass
class ReplicaStatus:
    """How far one replica is behind the store (eidetic.replica.replicate.Lag),
    or why that is unknown: *error* set means unreachable or unreadable, and
    then *uploads* and the age are None, never 0 ("up to date")."""
    name: str
    url: str
    uploads: int | None = None             # uploads not yet on the replica
    oldest_received: str | None = None     # when the oldest of them was received
    lag_seconds: float | None = None       # its age; 0 when up to date
    replica_seq: int | None = None
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, "reachable": self.reachable, "uploads": self.uploads,
                "oldest_received": self.oldest_received,
                "lag_seconds": None if self.lag_seconds is None else round(self.lag_seconds),
                "replica_seq": self.replica_seq, "error": self.error}


@dataclass
class StudyStatus:
    name: str
    waiting: list[Waiting] = field(default_factory=list)
    processing: list[Processing] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    stale: list[Stale] = field(default_factory=list)
    partial: int = 0                       # uploads in progress (dot-entries), stale ones included
    last_ingest: LastIngest | None = None
    uploads: int | None = None             # None: unknown (no index yet, or unreadable)
    paths: int | None = None
    versions: int | None = None
    objects: int | None = None
    store_bytes: int | None = None
    percent_used: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    daemon_pid: int | None = None          # -1: running, pid unknown
    daemon_known: bool = True              # False: this user may not see whether a daemon runs
    records_known: bool = True             # False: may not see the state's records (processing, failed)
    errors: list[str] = field(default_factory=list)
    index_error: str | None = None         # the index may not be used (IndexUnusable's message)
    unseen: list[str] = field(default_factory=list)   # what this user may not see, and who may
    fault: dict | None = None              # the store fault that stopped ingest of the study, until it is over
    replicas: list[ReplicaStatus] = field(default_factory=list)

    @property
    def daemon_running(self) -> bool | None:
        """None: unknown (never reported as "no daemon" for a user who cannot look)."""
        if not self.daemon_known:
            return None
        return self.daemon_pid is not None

    def last_ingest_timestamp(self) -> float | None:
        """When the last ingest finished, as Unix time (None: never, or a time not understood)."""
        if self.last_ingest is None:
            return None
        try:
            return parse_utc_iso(self.last_ingest.time).timestamp()
        except ValueError:
            return None

    def to_json(self) -> dict:
        return {
            "waiting": [w.to_json() for w in self.waiting],
            "processing": [p.to_json() for p in self.processing] if self.records_known else None,
            "failed": [f.to_json() for f in self.failed] if self.records_known else None,
            "stale": [s.to_json() for s in self.stale],
            "partial": self.partial,
            "last_ingest": self.last_ingest.to_json() if self.last_ingest else None,
            "uploads": self.uploads,
            "paths": self.paths,
            "versions": self.versions,
            "objects": self.objects,
            "store_bytes": self.store_bytes,
            "filesystem": {"percent_used": self.percent_used, "free_bytes": self.free_bytes,
                           "total_bytes": self.total_bytes},
            "daemon": {"running": self.daemon_running,
                       "pid": self.daemon_pid if self.daemon_pid and self.daemon_pid > 0 else None},
            "errors": list(self.errors),
            "index_error": self.index_error,
            "unseen": list(self.unseen),
            "fault": self.fault,
            "replicas": [r.to_json() for r in self.replicas],
        }


@dataclass
class Status:
    studies: dict[str, StudyStatus]
    unknown: list[Unknown]

    @property
    def daemon_running(self) -> bool | None:
        known = [s.daemon_running for s in self.studies.values()]
        return True if any(known) else None if None in known else False

    @property
    def faulted(self) -> bool:
        return any(s.fault is not None for s in self.studies.values())

    @property
    def incomplete(self) -> bool:
        """Something could not be seen by this user (exit status 3, like an unusable index)."""
        return any(s.unseen for s in self.studies.values())

    @property
    def index_unusable(self) -> bool:
        return any(s.index_error is not None for s in self.studies.values())

    @property
    def has_failed(self) -> bool:
        return any(s.failed for s in self.studies.values()) or any(u.state == "failed" for u in self.unknown)

    def to_json(self) -> dict:
        return {"studies": {n: s.to_json() for n, s in self.studies.items()},
                "unknown": [u.to_json() for u in self.unknown],
                "daemon_running": self.daemon_running}


# --------------------------------------------------------------- prometheus

# (name, type, help, value of a StudyStatus or None when unknown): the samples
# of ``eidetic status --prometheus``, one per study, in this order.  An unknown
# value (no index, an unreadable store, never ingested) has no sample at all,
# never a made-up 0.
def _age(s: StudyStatus, now: float) -> float | None:
    t = s.last_ingest_timestamp()
    return None if t is None else max(0.0, now - t)


PROMETHEUS_METRICS = [
    ("entries_waiting", "gauge", "Complete inbox entries waiting to be ingested.", lambda s, now: len(s.waiting)),
    ("entries_failed", "gauge", "Refused entries still in the inbox, waiting for someone to act.",
     lambda s, now: len(s.failed) if s.records_known else None),
    ("entries_processing", "gauge", "Entries claimed by an ingest and not finished yet.",
     lambda s, now: len(s.processing) if s.records_known else None),
    ("entries_stale", "gauge", "Partial uploads (dot entries) untouched for stale_hours or more.",
     lambda s, now: len(s.stale)),
    ("uploads_in_progress", "gauge", "Partial uploads (dot entries) in the inbox, stale ones included.",
     lambda s, now: s.partial),
    ("seconds_since_last_ingest", "gauge", "Seconds since the study's last ingest finished.", _age),
    ("last_ingest_timestamp_seconds", "gauge", "When the study's last ingest finished (Unix time).",
     lambda s, now: s.last_ingest_timestamp()),
    ("store_uploads", "gauge", "Uploads in the study's store.", lambda s, now: s.uploads),
    ("store_bytes", "gauge", "Bytes the study's store holds (objects, manifests, index).",
     lambda s, now: s.store_bytes),
    ("store_objects", "gauge", "Distinct file contents in the study's store.", lambda s, now: s.objects),
    ("store_paths", "gauge", "Paths in the study's tree that have a history.", lambda s, now: s.paths),
    ("store_versions", "gauge", "Versions of all paths in the study's store.", lambda s, now: s.versions),
    ("filesystem_percent_used", "gauge", "Percent used of the file system holding the study's store.",
     lambda s, now: s.percent_used),
    ("filesystem_free_bytes", "gauge", "Bytes free on the file system holding the study's store.",
     lambda s, now: s.free_bytes),
    ("index_usable", "gauge", "1 when the study's index may be used, 0 when it must be rebuilt.",
     lambda s, now: 0 if s.index_error is not None else 1),
    ("store_fault", "gauge", "1 while a store fault (full disk, I/O error, failed sync) stops ingest of the study.",
     lambda s, now: None if not s.records_known else 1 if s.fault is not None else 0),
    ("status_errors", "gauge", "Things status could not read for the study (eidetic status lists them).",
     lambda s, now: len(s.errors)),
    ("daemon_up", "gauge", "1 when an ingest daemon serves the study, else 0.",
     lambda s, now: None if s.daemon_running is None else 1 if s.daemon_running else 0),
    ("status_unseen", "gauge", "Things this user may not see for the study (run as the service user or root).",
     lambda s, now: len(s.unseen)),
]


def _label_value(v: str) -> str:
    """A label value in the text exposition format: backslash, double quote
    and line feed escaped."""
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample_value(v: float) -> str:
    if isinstance(v, bool):
        v = int(v)
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def to_prometheus(st: Status, now: float | None = None) -> str:
    """The Prometheus text exposition format (node_exporter's textfile
    collector): every metric named ``eidetic_...`` with its HELP and TYPE
    lines, one sample per study labelled ``study="NAME"``."""
    now = time.time() if now is None else now
    out = []
    for name, kind, help_text, get in PROMETHEUS_METRICS:
        full = "eidetic_" + name
        out.append(f"# HELP {full} {help_text}")
        out.append(f"# TYPE {full} {kind}")
        for study, s in st.studies.items():
            v = get(s, now)
            if v is not None:
                out.append(f'{full}{{study="{_label_value(study)}"}} {_sample_value(v)}')
    out.extend(_replica_prometheus(st))
    return "\n".join(out) + "\n"


# One sample per study and replica, labelled {study, replica}.  An unreachable
# replica has no lag samples (unknown, never a made-up 0) and replica_up 0.
REPLICA_METRICS = [
    ("replica_up", "gauge", "1 when the replica could be read by status, else 0.",
     lambda r: 1 if r.reachable else 0),
    ("replica_lag_uploads", "gauge", "Uploads in the store that are not yet on the replica.",
     lambda r: r.uploads),
    ("replica_lag_seconds", "gauge", "Age of the oldest upload not yet on the replica (0: up to date).",
     lambda r: r.lag_seconds),
]


def _replica_prometheus(st: Status) -> list[str]:
    if not any(s.replicas for s in st.studies.values()):
        return []
    out = []
    for name, kind, help_text, get in REPLICA_METRICS:
        full = "eidetic_" + name
        out += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
        for study, s in st.studies.items():
            for r in s.replicas:
                v = get(r)
                if v is not None:
                    out.append(f'{full}{{study="{_label_value(study)}",replica="{_label_value(r.name)}"}} '
                               f"{_sample_value(v)}")
    return out


# ------------------------------------------------------------------- gather

def status(cfg: Config, study: str | None = None, now: float | None = None) -> Status:
    names = [cfg.study(study).name] if study else sorted(cfg.studies)
    state = StateDir(cfg.state)
    records = {kind: _records(state, kind) for kind in RECORD_KINDS}
    # One look at the inboxes for every study, not one per study.
    waiting = inbox_mod.scan(cfg, study)
    partial = inbox_mod.partial_entries(cfg, study, now=now)
    out = Status({}, [])
    for name in names:
        out.studies[name] = _study(cfg, cfg.study(name), state, records,
                                   [c for c in waiting if c.study == name], [p for p in partial if p.study == name])
    if study is None:
        out.unknown = _unknown(records, [c for c in waiting if c.study is None])
    return out


def _records(state: StateDir, kind: str) -> list[dict] | OSError:
    try:
        return state.list(kind)
    except OSError as e:
        return e


def _still_failed(rec: dict) -> Claim | None:
    """The failed record's entry, if it is still in the inbox under its failed name
    (checked by inode).  One lstat: a directory has one name, so the other names
    StateDir.locate tries cannot hold it too."""
    cl = Claim.from_record(rec)
    if cl is None:
        return None
    try:
        st = os.lstat(cl.path_in("failed"))
    except FileNotFoundError:
        return None
    return cl if (st.st_dev, st.st_ino) == (cl.dev, cl.ino) else None


def _study(cfg: Config, s: StudyConfig, state: StateDir, records: dict, waiting: list[Candidate],
           partial: list[PartialEntry]) -> StudyStatus:
    st = StudyStatus(s.name)
    st.waiting = [Waiting(c.name, c.inbox) for c in waiting]
    hidden = []       # what of the state directory this user may not see
    if any(isinstance(records[kind], PermissionError) for kind in RECORD_KINDS):
        hidden.append("uploads being ingested, failed and done")
        st.records_known = False
    for kind in RECORD_KINDS:
        if isinstance(records[kind], OSError) and not isinstance(records[kind], PermissionError):
            st.errors.append(f"cannot read {os.path.join(cfg.state, kind)}: {records[kind].strerror}")
    claims = [r for r in _ok(records["claims"]) if r.get("study") == s.name]
    for r in claims:
        cl = Claim.from_record(r)
        if cl is not None:
            st.processing.append(Processing(cl.original, cl.upload, cl.received))
    for r in _ok(records["failed"]):
        if r.get("study") != s.name:
            continue
        cl = _still_failed(r)
        if cl is not None:
            st.failed.append(Failed(cl.original, cl.upload, str(r.get("reason") or cl.reason or ""),
                                    cl.path_in("failed"), str(r.get("finished", ""))))
    stale_after = cfg.stale_hours * 3600
    st.partial = len(partial)
    st.stale = [Stale(p.name, p.inbox, p.idle_seconds, p.uid, user_name(p.uid)) for p in partial
                if stale_after > 0 and p.idle_seconds >= stale_after]     # stale_hours 0: never stale
    done = [r for r in _ok(records["done"]) if r.get("study") == s.name and r.get("finished")]
    if done:
        r = max(done, key=lambda r: r["finished"])
        cl = Claim.from_record(r)
        if cl is not None:
            st.last_ingest = LastIngest(r["finished"], cl.upload, cl.original, int(r.get("files", 0)),
                                        int(r.get("bytes", 0)), r.get("seq"))
    try:
        with reading(cfg, s):
            _store_numbers(s, st)
    except AccessDenied as e:
        st.unseen.append(f"cannot see study {s.name}'s store: {e.message}")
    try:
        u = shutil.disk_usage(s.store)
        st.percent_used = disk_percent_used(s.store)
        st.free_bytes, st.total_bytes = u.free, u.total
    except PermissionError:
        pass        # the store's line above says who may see it
    except OSError as e:
        st.errors.append(f"cannot stat {s.store}: {e.strerror}")
    if st.records_known:
        st.fault = state.fault(s.name)
    try:
        st.daemon_pid = state.daemon_pid(s.name)
    except PermissionError:
        st.daemon_known = False
        hidden.insert(0, "whether a daemon runs")
    if hidden:
        st.unseen.insert(0, f"cannot see {cfg.state} ({' and '.join(hidden)}): run as the service user "
                            f"({_service_user(cfg)}) or root")
    if s.replicas:
        ids = service_ids(cfg)
        if ids.uid is None or os.geteuid() == ids.uid:
            st.replicas = _replicas(s)
        elif os.geteuid() == 0:
            with _service_credentials(ids.uid):
                st.replicas = _replicas(s)
        else:
            # Its credentials are the service user's (~/.aws): anyone else's
            # lookup would find none or others, and call a sound replica unreachable.
            st.unseen.append(f"cannot check the replicas ({', '.join(r.name for r in s.replicas)}): their "
                             f"credentials are the service user's; run as the service user ({_service_user(cfg)})")
    return st


_AWS_FILES = {"AWS_SHARED_CREDENTIALS_FILE": "credentials", "AWS_CONFIG_FILE": "config"}


@contextmanager
def _service_credentials(uid: int) -> Iterator[None]:
    """Root checks the replicas with the service user's credential files
    (~eidetic/.aws/), as the daemon and 'eidetic replicate' use them, unless
    the environment names others.  Root's own ~/.aws is not the service's."""
    try:
        home = pwd.getpwuid(uid).pw_dir
    except KeyError:
        home = None
    saved = {k: os.environ.get(k) for k in _AWS_FILES}
    try:
        for var, name in _AWS_FILES.items():
            if home and saved[var] is None:
                os.environ[var] = os.path.join(home, ".aws", name)
        yield
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _service_user(cfg: Config) -> str:
    ids = service_ids(cfg)
    return user_name_of(ids.uid) if ids.uid is not None else "the owner of " + cfg.state


def _replicas(s: StudyConfig) -> list[ReplicaStatus]:
    """Each replica's lag: one GET of its HEAD (eidetic.replica.replicate.replica_lag)."""
    from ..replica.backend import open_backend
    from ..replica.replicate import replica_lag

    out = []
    for r in s.replicas:
        rs = ReplicaStatus(r.name, r.url)
        try:
            backend = open_backend(r)
            quick = getattr(backend, "fail_fast", None)
            if quick is not None:
                quick()       # status must not hang for minutes on a dead endpoint
            try:
                lag = replica_lag(Store.open(*s.store_args()), backend)
            finally:
                backend.close()
        except (OSError, EideticError) as e:
            rs.error = e.message if isinstance(e, EideticError) else f"{e.strerror or e}"
        else:
            rs.uploads, rs.replica_seq = lag.uploads, lag.replica_seq
            rs.lag_seconds = lag.seconds()
            rs.oldest_received = lag.oldest_received.strftime("%Y-%m-%dT%H:%M:%S.%fZ") \
                if lag.oldest_received else None
        out.append(rs)
    return out


def _ok(records: list[dict] | OSError) -> list[dict]:
    return [] if isinstance(records, OSError) else records


def _store_numbers(s: StudyConfig, st: StudyStatus) -> None:
    store = Store(*s.store_args())
    try:
        store.check_format()
        manifests = [store.manifest_path(n) for n in store.manifest_seqs()]
        manifest_bytes = sum(os.lstat(p).st_size for p in manifests)
        index_dir = os.path.join(s.store, "index")
        idx = store.index      # checked against HEAD; nothing is made (IndexUnusable otherwise)
        stats = idx.stats()
        st.uploads = stats["uploads"]
        st.versions = stats["path_versions"]
        st.objects = stats["objects"]
        st.paths = idx.path_count()
        index_bytes = sum(os.lstat(os.path.join(index_dir, n)).st_size for n in os.listdir(index_dir)) \
            if os.path.isdir(index_dir) else 0
        st.store_bytes = sum(size for _oid, size in idx.iter_objects()) + manifest_bytes + index_bytes
        if st.last_ingest is None and st.uploads:
            applied, _ = idx.applied()
            up = idx.upload(applied) if applied else None
            if up:
                st.last_ingest = LastIngest(up.get("received", ""), up.get("upload", ""),
                                            str(up.get("entry", "")).encode("utf-8", "surrogateescape"),
                                            int(up.get("files", 0)), int(up.get("bytes", 0)), applied)
    except IndexUnusable as e:
        # What the store holds is unknown; never a count of 0 for a study with uploads.
        st.uploads = st.paths = st.versions = st.objects = st.store_bytes = None
        st.index_error = e.message
        st.errors.append(e.message)
    except PermissionError:
        st.uploads = st.paths = st.versions = st.objects = st.store_bytes = None
        raise       # reading() says who may see it
    except StoreIOError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            st.uploads = st.paths = st.versions = st.objects = st.store_bytes = None
            raise
        st.errors.append(f"store {s.store}: {e.message}")
    except (OSError, EideticError) as e:
        msg = e.message if isinstance(e, EideticError) else f"{e.strerror}: {e.filename}"
        st.errors.append(f"store {s.store}: {msg}")
    # The index stays open: LMDB environments are shared per process (index.py).


def _unknown(records: dict, waiting: list[Candidate]) -> list[Unknown]:
    out = [Unknown(c.name, c.inbox, "waiting") for c in waiting]
    for r in _ok(records["failed"]):
        if r.get("study") is not None:
            continue
        cl = _still_failed(r)
        if cl is not None:
            out.append(Unknown(cl.original, cl.inbox, "failed", cl.upload, str(r.get("reason") or ""),
                               cl.path_in("failed")))
    return out
