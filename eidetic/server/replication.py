"""The daemon's replication: one background thread per study with replicas.

Ingest never waits for it: a finished ingest only *kicks* the study's
replicator, which runs ``replicate()`` for each of the study's replicas in
its own thread, one run at a time per study (kicks during a run make one
more run after it).  A replica that fails is retried after 1 min, then 2,
4, ... up to 1 h (kicks do not cut a back-off short: a dead endpoint is not
hammered at every upload), and its error is logged in one line when it
first fails and when it recovers, not at every retry.  After each attempt,
and every few minutes, the lag is checked and the study's people mailed
once when it passes ``replica_lag_hours`` (Notifier.check_replica_lag).

While a replica cannot be read, its lag is computed from the HEAD seq
this thread last saw, else from a hint kept in
``<state>/replica/<study>/<replica>.json`` by the last successful run
(a restart does not forget how far it had got), else from upload 1 (a
replica never reached holds nothing we know of).  The hint only feeds the
lag: what to send is always read back from the replica.

Reading the store needs no lock: manifests up to HEAD never change, and
their objects are in place before HEAD moves.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from ..core import layout
from ..core.errors import EideticError
from ..replica.backend import ReplicaConfig, open_backend
from ..replica.replicate import Lag, lag_since, replica_lag, replicate
from ..store.store import Store
from .config import StudyConfig
from .outbox import read_json, write_json

ERROR, WARNING, INFO, DEBUG = 3, 4, 6, 7

MIN_BACKOFF = 60.0          # the first retry after a failure
MAX_BACKOFF = 3600.0        # doubling up to this
LAG_CHECK_SECONDS = 300.0   # the lag is looked at this often even without ingests


@dataclass
class _ReplicaState:
    cfg: ReplicaConfig
    pending: bool = True                 # a run is owed (start-up catch-up, or an ingest since)
    failures: int = 0
    next_try: float = 0.0                # monotonic time before which it is not retried
    known_seq: int | None = None         # the replica's HEAD seq as last read or written
    error: str | None = None             # the last failure's one line, None once it works


class StudyReplicator:
    """Replicates one study in a thread.  *log(priority, line)* as the
    daemon's; *notifier()* returns the daemon's current Notifier (it is
    replaced on reload); *now()* the wall clock (injectable for the lag)."""

    def __init__(self, study: StudyConfig, log: Callable[[int, str], None], notifier: Callable[[], object],
                 *, now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 min_backoff: float = MIN_BACKOFF, max_backoff: float = MAX_BACKOFF,
                 lag_check_seconds: float = LAG_CHECK_SECONDS, state_dir: str | None = None) -> None:
        self.study = study
        self.state_dir = state_dir
        self.log = log
        self.notifier = notifier
        self.now = now
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.lag_check_seconds = lag_check_seconds
        self.replicas = [_ReplicaState(r) for r in study.replicas]
        self._kicked = threading.Event()
        self._stop = threading.Event()
        self.runs = 0                       # attempts made (for tests and the log)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"eidetic-replicate-{study.name}")

    # ---------------------------------------------------------------- control

    def start(self) -> "StudyReplicator":
        self.thread.start()
        return self

    def kick(self) -> None:
        """An upload was ingested: replicate it when the replica is not backing off."""
        self._kicked.set()

    def stop(self) -> None:
        self._stop.set()
        self._kicked.set()

    def join(self, timeout: float) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # ------------------------------------------------------------------- loop

    def _run(self) -> None:
        next_lag_check = 0.0
        while not self._stop.is_set():
            if self._kicked.is_set():
                self._kicked.clear()        # before the runs: a kick during them makes another
                for r in self.replicas:
                    r.pending = True
            for r in self.replicas:
                if self._stop.is_set():
                    return
                if r.pending and time.monotonic() >= r.next_try:
                    self.pass_once(r)
            if time.monotonic() >= next_lag_check:
                for r in self.replicas:
                    self.check_lag(r)
                next_lag_check = time.monotonic() + self.lag_check_seconds
            waits = [r.next_try for r in self.replicas if r.pending] + [next_lag_check]
            self._kicked.wait(max(0.05, min(waits) - time.monotonic()))

    def pass_once(self, r: _ReplicaState) -> None:
        """One replicate() of one replica, its log line and its lag check."""
        name = f"study {self.study.name}: replica {r.cfg.name}"
        self.runs += 1
        try:
            store = Store.open(*self.study.store_args())
            backend = open_backend(r.cfg)
            try:
                res = replicate(store, backend, should_stop=self._stop.is_set)
            finally:
                backend.close()
        except Exception as e:  # noqa: BLE001 - the thread must survive anything; told in one line
            r.failures += 1
            delay = min(self.max_backoff, self.min_backoff * 2 ** (r.failures - 1))
            r.next_try = time.monotonic() + delay
            text = e.message if isinstance(e, EideticError) else f"internal error: {type(e).__name__}: {e}"
            if text != r.error:             # said when it starts failing or fails differently
                self.log(ERROR, f"{name}: replication failed: {text}; retrying in {delay / 60:.0f} min "
                                "(doubling up to 1 h)")
            else:
                self.log(DEBUG, f"{name}: replication failed again; retrying in {delay / 60:.0f} min")
            r.error = text
            self.check_lag(r)
            return
        if res.head != r.known_seq:
            self._write_hint(r, res.head)
        r.known_seq = res.head
        r.pending = res.stopped
        if r.error is not None:
            self.log(INFO, f"{name}: replicating again after {layout.plural(r.failures, 'failed attempt')}")
        r.failures, r.error, r.next_try = 0, None, 0.0
        if res.manifests or res.objects:
            self.log(INFO, f"{name}: replicated {layout.plural(res.manifests, 'upload')} "
                           f"({layout.plural(res.objects, 'object')}, {layout.human_bytes(res.bytes)}) in "
                           f"{res.elapsed:.1f} s; at upload {res.head} of {res.local_head}")
        self.check_lag(r)

    def lag(self, r: _ReplicaState) -> Lag | None:
        """The replica's lag: from what this thread last knew of it, else read
        from the replica (None when neither is possible)."""
        store = Store.open(*self.study.store_args())
        if r.known_seq is not None:
            return lag_since(store, r.cfg.name, r.known_seq)
        try:
            backend = open_backend(r.cfg)
            try:
                lag = replica_lag(store, backend)
            finally:
                backend.close()
        except EideticError:
            return lag_since(store, r.cfg.name, self._read_hint(r))
        r.known_seq = lag.replica_seq
        return lag

    def _hint_path(self, r: _ReplicaState) -> str | None:
        if self.state_dir is None:
            return None
        return os.path.join(self.state_dir, "replica", self.study.name, r.cfg.name + ".json")

    def _read_hint(self, r: _ReplicaState) -> int:
        path = self._hint_path(r)
        d = read_json(path) if path else {}
        seq = d.get("seq") if d.get("url") == r.cfg.url else None     # a replica moved: nothing known
        return seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else 0

    def _write_hint(self, r: _ReplicaState, seq: int) -> None:
        path = self._hint_path(r)
        if path is None:
            return
        try:
            write_json(path, {"seq": seq, "url": r.cfg.url, "at": layout.utc_iso(self.now())})
        except OSError as e:     # a hint only: the lag is still read from the replica when it answers
            self.log(DEBUG, f"study {self.study.name}: replica {r.cfg.name}: cannot note its seq: {e.strerror}")

    def check_lag(self, r: _ReplicaState) -> None:
        try:
            lag = self.lag(r)
        except Exception as e:  # noqa: BLE001 - a lag that cannot be computed is told at debug level only
            self.log(DEBUG, f"study {self.study.name}: replica {r.cfg.name}: lag unknown: {e}")
            return
        if lag is None:
            return
        notifier = self.notifier()
        check = getattr(notifier, "check_replica_lag", None)
        if check is not None:
            check(self.study.name, r.cfg.name, lag.uploads, lag.oldest_received, lag.seconds(self.now()),
                  r.error)
