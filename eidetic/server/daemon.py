"""The long-running ingest daemon (``eidetic ingest`` without ``--once``).

It is thin on purpose: the Ingester decides *how* an entry is ingested;
the daemon only decides *when*.  One worker thread per served study runs
``Ingester.run_study`` whenever it is woken - by a watch event naming one of
its entries, by the periodic rescan, or by a timer when an entry was still
settling - so entries of one study go one at a time, oldest first, and a
slow study never holds up another.  One more worker does the housekeeping:
mail ticks (disk, unfinished uploads, digests) and refusing entries whose
name maps to no study (only in a daemon serving every study).  The main thread only handles signals (stop,
reload), the rescan timer and systemd's watchdog, so a hung main loop is
noticed by systemd.

Nothing here knows about click: the caller passes *log(priority, message)*
with syslog priorities and gets an exit status back (or an EideticError).
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable

import sdnotify

from . import config as _config
from ..core import layout
from .config import Config, StudyConfig
from ..core.errors import ConfigError, EideticError, LockBusy, StoreIOError
from .inbox import StateDir
from .ingest import EntryResult, Ingester
from .notify import Notifier
from .replication import StudyReplicator
from ..store.store import Store
from .watch import InboxWatch

# sd-daemon / syslog priorities (the CLI turns them into "<3>" etc. for journald)
ERROR, WARNING, INFO, DEBUG = 3, 4, 6, 7

Log = Callable[[int, str], None]

STOP_TIMEOUT = 20.0          # how long shutdown waits for workers to abandon their entries
MAX_BACKOFF = 60.0           # an erring worker retries after 1, 2, 4 ... up to this many seconds
MAX_FAULT_BACKOFF = 300.0    # a study stopped by a full or failing disk: 1, 2, 4 ... up to 5 minutes
MIN_SETTLE_RECHECK = 0.2
SETTLE_MARGIN = 0.05         # look again just after an entry should have settled

# The Ingester's own log lines, by first word.  None: the daemon logs that
# event itself from the EntryResult (with more detail, e.g. where the data lies).
_INGEST_LEVELS = {"waiting": DEBUG, "claimed": INFO, "resuming": INFO, "abandoned": WARNING,
                  "ingested": None, "failed": None, "committed": None, "not": None}   # the last two: _store_fault

_tls = threading.local()


class _Worker:
    """A thread that runs passes over one study (or, with study None, over
    the entries that map to no study) whenever it is woken."""

    def __init__(self, daemon: Daemon, study: str | None) -> None:
        self.daemon = daemon
        self.study = study
        self.wake_event = threading.Event()
        self.stop_event = threading.Event()
        self._rescan = False
        self.store: Store | None = None    # the last store a pass used (None: none opened)
        self.paused: str | None = None     # why the study is left alone until a reload or restart
        self.fault_told = False            # the current run of faults was logged and mailed
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"eidetic-ingest-{study}" if study else "eidetic-housekeeping")

    @property
    def label(self) -> str:
        return f"study {self.study}" if self.study else "housekeeping (mail, entries of no study)"

    def start(self) -> None:
        self.thread.start()

    def wake(self, rescan: bool = False) -> None:
        if rescan:
            self._rescan = True
        self.wake_event.set()

    def resume(self) -> None:
        """End a pause after a failed sync (SIGHUP: a person has looked)."""
        if self.paused is not None:
            self.paused = None
            self.wake(rescan=True)

    def stop(self) -> None:
        """No new entry; an entry not yet committed is abandoned (redone later)."""
        self.stop_event.set()
        self.wake_event.set()

    def _run(self) -> None:
        _tls.worker = self
        d = self.daemon
        failures = 0
        rescan = True          # the first pass is the start-up scan (and recovery)
        try:
            while not self.stop_event.is_set():
                if self.paused is not None:       # only a reload (resume()) or a restart ends it
                    self.wake_event.wait()
                    self.wake_event.clear()
                    continue
                try:
                    retry_in = d._pass(self, d.ingester, rescan)
                    failures = 0
                    if self.fault_told:
                        self.fault_told = False
                        d.log(INFO, f"{self.label}: ingesting again")
                except StoreIOError as e:
                    failures += 1
                    retry_in = d._store_fault(self, e, failures)
                    if retry_in is None:
                        continue                  # paused: loop to the wait above
                    if self.stop_event.wait(retry_in):
                        break
                    rescan = True
                    continue
                except Exception as e:  # noqa: BLE001 - a worker must survive anything
                    failures += 1
                    retry_in = min(MAX_BACKOFF, 2.0 ** (failures - 1))
                    d._log_exception(f"{self.label}: ", e, f"; retrying in {retry_in:.0f} s")
                    if self.stop_event.wait(retry_in):   # back off: events do not cut it short
                        break
                    rescan = True
                    continue
                self.wake_event.wait(retry_in)
                self.wake_event.clear()    # before the pass: an event during it wakes us again
                rescan, self._rescan = self._rescan, False
        finally:
            # A retired worker closes its store for its successor (a study whose
            # settings changed: the store may have moved); at shutdown the
            # Ingester is closed as a whole once every worker has ended.
            if self.store is not None and self in d._retiring:
                try:
                    self.store.close()
                except Exception as e:  # noqa: BLE001
                    d._log_exception(f"{self.label}: closing the store: ", e)


class Daemon:
    """Serve every configured study (or only *study*) until SIGTERM/SIGINT.

    *config_path* is what SIGHUP reloads (None: the usual lookup again);
    *settle* overrides settle_seconds.  ``run()`` returns the exit status."""

    def __init__(self, cfg: Config, log: Log, config_path: str | None = None, study: str | None = None,
                 settle: float | None = None) -> None:
        self.cfg = cfg
        self.log = log
        self.config_path = config_path
        self.only_study = cfg.study(study).name if study else None
        self.settle_override = settle
        self.state = StateDir(cfg.state)
        self.ingester = self._new_ingester(cfg)   # opens a store only when a worker asks
        self.notifier = self._new_notifier(cfg)   # does nothing with mail off
        self.workers: dict[str | None, _Worker] = {}
        self.replicators: dict[str, StudyReplicator] = {}   # studies with replicas: one thread each
        self._retiring: set[_Worker] = set()
        self._locks: dict[str, int] = {}
        self._watch: InboxWatch | None = None
        self._inbox_owner: dict[str, str | None] = {}
        self._stopping = threading.Event()
        self._signals: list[int] = []
        self._sd = sdnotify.SystemdNotifier()
        self._sd_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self.ingested = 0
        self.failed = 0

    # ---------------------------------------------------------------- run

    def run(self) -> int:
        """Must be called from the main thread (it installs signal handlers)."""
        self._sd_notify("STATUS=starting")
        self._check_ready(self.cfg)
        served = self._served(self.cfg)
        self._take_locks(served)
        try:
            return self._run(served)
        finally:
            for fd in self._locks.values():
                os.close(fd)
            self._locks.clear()

    def _run(self, served: list[str]) -> int:
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wfd, warn_on_full_buffer=False)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT,
                                                                       signal.SIGHUP)}
        try:
            self.notifier.start()
            self._start_watch(self.cfg)
            self.log(INFO, self._describe_start(served))
            self._start_workers(served)
            self._start_replicators(served)
            self._sd_notify("READY=1", self._status())   # watches are in place; the backlog may follow
            self._main_loop(rfd)
            return 0
        finally:
            self._shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old_handlers.items():
                signal.signal(s, h)
            os.close(rfd)
            os.close(wfd)

    def _on_signal(self, signum: int, _frame) -> None:
        # Only note it: the main loop is woken through the wakeup fd and acts
        # outside the handler (no locks taken in signal context).
        self._signals.append(signum)

    def _main_loop(self, rfd: int) -> None:
        watchdog = self._watchdog_interval()
        now = time.monotonic()
        next_rescan = now + self.cfg.rescan_seconds
        next_ping = now + watchdog if watchdog else float("inf")
        while True:
            timeout = max(0.0, min(next_rescan, next_ping) - time.monotonic())
            try:
                select.select([rfd], [], [], timeout)
            except InterruptedError:  # pragma: no cover - PEP 475 retries
                pass
            _drain(rfd)
            while self._signals:
                sig = self._signals.pop(0)
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self.log(INFO, f"stopping ({signal.Signals(sig).name}): no new entries; an entry in "
                                   "progress is abandoned and redone at the next start")
                    return
                if sig == signal.SIGHUP:
                    self._reload()
                    next_rescan = time.monotonic() + self.cfg.rescan_seconds
            now = time.monotonic()
            if now >= next_rescan:
                self.log(DEBUG, "periodic rescan")
                for w in list(self.workers.values()):
                    w.wake(rescan=True)
                next_rescan = now + self.cfg.rescan_seconds
            if now >= next_ping:
                self._sd_notify("WATCHDOG=1")
                next_ping = now + watchdog

    def _shutdown(self) -> None:
        self._stopping.set()
        self._sd_notify("STOPPING=1", "STATUS=stopping")
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        workers = list(self.workers.values()) + list(self._retiring)
        for w in workers:
            w.stop()
        stuck = self._join(workers, STOP_TIMEOUT)
        self._stop_replicators(list(self.replicators))
        self.notifier.stop()
        if stuck:   # leave the stores open: closing LMDB under a running thread would crash
            self.log(WARNING, f"{', '.join(w.label for w in stuck)}: still busy after {STOP_TIMEOUT:.0f} s; "
                              "exiting anyway (the entry is redone at the next start)")
        else:
            self.ingester.close()
        self.log(INFO, f"stopped ({self.ingested} ingested, {self.failed} failed since start)")

    def _join(self, workers: list[_Worker], timeout: float) -> list[_Worker]:
        """Wait for *workers* to end, still pinging systemd's watchdog."""
        deadline = time.monotonic() + timeout
        watchdog = self._watchdog_interval()
        for w in workers:
            if not w.thread.is_alive() and w.thread.ident is None:
                continue    # never started
            while w.thread.is_alive() and time.monotonic() < deadline:
                w.thread.join(min(1.0, watchdog or 1.0, max(0.0, deadline - time.monotonic())))
                if watchdog:
                    self._sd_notify("WATCHDOG=1")
        return [w for w in workers if w.thread.is_alive()]

    # ------------------------------------------------------------- passes

    def settle(self) -> float:
        return self.cfg.settle_seconds if self.settle_override is None else self.settle_override

    def _should_stop(self) -> bool:
        w = getattr(_tls, "worker", None)
        return self._stopping.is_set() or (w is not None and w.stop_event.is_set())

    def _pass(self, w: _Worker, ingester: Ingester, rescan: bool) -> float | None:
        """One pass; returns when to look again for an entry still settling
        (None: only when woken)."""
        settle = self.settle()
        if w.study is None:
            # A daemon serving one study (--study) leaves entries of no study to
            # the daemon serving all; mail housekeeping runs in either.
            results = ingester.reject_unknown(settle) if self.only_study is None else []
            if rescan:
                self.notifier.tick()
        else:
            w.store = ingester.store(w.study)
            results = ingester.run_study(w.study, settle)   # waits (stoppably) for the store lock
            if rescan:
                self.notifier.check_disk(w.study)
        waiting = [r for r in results if r.outcome == "waiting"]
        if not waiting or w.stop_event.is_set():
            return None
        # Come back when the first one may have settled, not before (no busy
        # loop); for other waits (vanished, abandoned), after a settle period.
        longest = min(settle, self.cfg.rescan_seconds)
        lefts = [r.settles_in + SETTLE_MARGIN for r in waiting if r.settles_in is not None]
        return max(MIN_SETTLE_RECHECK, min(lefts + [longest]) if lefts else longest)

    def _on_result(self, r: EntryResult) -> None:
        """Called from a worker as each entry is ingested or fails."""
        if r.outcome == "ingested":
            with self._counts_lock:
                self.ingested += 1
            rep = self.replicators.get(r.study or "")
            if rep is not None:
                rep.kick()      # in its own thread: the ingest goes on at once
            self.log(INFO, f"ingested {r.entry} (study {r.study}) as upload {r.upload}: {r.files} files, "
                           f"{r.bytes} bytes ({r.new_bytes} new), {r.new_versions} new versions"
                           + (f", {r.skipped} skipped (not regular files)" if r.skipped else "")
                           + (", verified against the sender's description" if r.verified else "")
                           + f", {r.seconds:.1f} s")
        elif r.outcome == "failed":
            with self._counts_lock:
                self.failed += 1
            who = f"study {r.study}" if r.study else "no study"
            self.log(ERROR, f"failed {r.entry} ({who}, upload {r.upload}): {r.reason}"
                            + (f"; the data is kept at {r.where}" if r.where else ""))
        else:
            return      # "committed" (finishing later) is told with its fault, by _store_fault
        self._sd_notify(self._status())
        self.notifier.report(r)

    def _store_fault(self, w: _Worker, e: StoreIOError, failures: int) -> float | None:
        """A study's store could not be written (store_format.md, "Faults").
        Said once (log and mail) per run of faults.  After a failed sync the
        study is left alone until SIGHUP or a restart (what reached the disk
        is unknown: retrying would trust it); otherwise (a full disk, EIO on a
        write, read-only) retried after 1, 2, 4 ... up to 5 minutes, so that
        freeing space is all it takes.  Returns the wait, None when paused."""
        if e.sync_failed:
            w.paused = e.message
        if not w.fault_told or e.sync_failed:
            w.fault_told = True
            then = ("it is left alone until the daemon is reloaded (systemctl reload eidetic) or restarted"
                    if e.sync_failed else "it is tried again every few minutes")
            self.log(ERROR, f"{w.label}: stopped: {e.message}" + (f"; {e.entry_note}" if e.entry_note else "")
                            + f"; {then}")
            self.notifier.store_fault(w.study or "", e, then)
            self._sd_notify(self._status())
        if e.sync_failed:
            return None
        return min(MAX_FAULT_BACKOFF, 2.0 ** (failures - 1))

    def _ingest_log(self, msg: str) -> None:
        level = WARNING if msg.startswith("  ") else _INGEST_LEVELS.get(msg.split(" ", 1)[0], INFO)
        if level is not None:
            self.log(level, msg.strip())

    def _log_exception(self, prefix: str, e: BaseException, suffix: str = "") -> None:
        if isinstance(e, EideticError):
            text = e.message
        elif isinstance(e, OSError):
            name = e.filename
            shown = layout.display(os.fsencode(name)) if isinstance(name, (str, bytes)) else name
            text = f"{e.strerror or e}" + (f": {shown}" if name else "")   # a byte name never as b'...'
        else:
            text = (f"internal error: {type(e).__name__}: {e} (set EIDETIC_DEBUG=1 for the traceback, "
                    "and please report it)")
        self.log(ERROR, prefix + text + suffix)
        if os.environ.get("EIDETIC_DEBUG") and not isinstance(e, EideticError):
            self.log(DEBUG, "".join(traceback.format_exception(e)).rstrip())

    # -------------------------------------------------------------- watch

    def _on_entry(self, inbox: str, name: bytes) -> None:
        """From watchdog's thread: wake the worker that owns *name*."""
        cfg = self.cfg
        dedicated = self._inbox_owner.get(inbox)
        mapped = layout.parse_entry_name(name, frozenset(cfg.studies), dedicated)
        study = mapped[0] if mapped else None
        w = self.workers.get(study)
        disp = layout.display(name)
        if w is None:
            self.log(DEBUG, f"seen {disp} in {inbox}: study {study} is not served by this daemon")
            return
        self.log(INFO, f"seen {disp} in {inbox} " + (f"(study {study})" if study else "(maps to no study)"))
        w.wake()

    def _start_watch(self, cfg: Config) -> None:
        inboxes = self._watched_inboxes(cfg)
        owner = {os.path.normpath(i): ded for i, ded in cfg.inboxes()}
        self._inbox_owner = owner
        watch = InboxWatch(list(inboxes), self._on_entry, polling=cfg.polling)
        watch.start()
        if watch.fallback_reason:
            self.log(WARNING, watch.fallback_reason)
        old, self._watch = self._watch, watch
        if old is not None:
            old.stop()

    def _watched_inboxes(self, cfg: Config) -> list[str]:
        return [os.path.normpath(i) for i, ded in cfg.inboxes()
                if ded is None or self.only_study is None or ded == self.only_study]

    # ------------------------------------------------------------- set-up

    def _served(self, cfg: Config) -> list[str]:
        return [self.only_study] if self.only_study else sorted(cfg.studies)

    def _check_ready(self, cfg: Config) -> None:
        StateDir(cfg.state).check(cfg.source)
        if self.only_study and self.only_study not in cfg.studies:
            raise ConfigError(f"study {self.only_study!r} is no longer configured", cfg.source)
        for inbox in self._watched_inboxes(cfg):
            if not os.path.isdir(inbox):
                raise ConfigError(f"inbox {inbox} does not exist (run 'eidetic init')", cfg.source)

    def _take_locks(self, studies: list[str]) -> None:
        """Every study's daemon lock, or none (LockBusy naming who holds which)."""
        busy: list[LockBusy] = []
        taken: dict[str, int] = {}
        for s in studies:
            try:
                taken[s] = self.state.daemon_lock(s)
            except LockBusy as e:
                busy.append(e)
        if busy:
            for fd in taken.values():
                os.close(fd)
            if len(busy) == 1:
                raise busy[0]
            pids = {s: self.state.daemon_pid(s) for s in studies if s not in taken}
            raise LockBusy("an ingest daemon is already running for "
                           + ", ".join(f"study {s} (pid {p})" if p else f"study {s}" for s, p in pids.items())
                           + f"; locks in {os.path.join(self.state.root, 'daemon')}")
        self._locks.update(taken)

    def _new_ingester(self, cfg: Config) -> Ingester:
        return Ingester(cfg, log=self._ingest_log, should_stop=self._should_stop,
                        on_result=self._on_result)

    def _new_notifier(self, cfg: Config) -> Notifier:
        def mail_log(msg: str) -> None:
            self.log(ERROR if msg.startswith("MAIL NOT DELIVERED") else WARNING, msg)
        return Notifier(cfg, mail_log, debug=lambda m: self.log(DEBUG, m),
                        studies=[self.only_study] if self.only_study else None)

    def _start_workers(self, studies: list[str]) -> None:
        workers = dict(self.workers)
        new = [_Worker(self, s) for s in studies]
        if None not in workers:   # housekeeping: mail ticks, and entries of no study
            new.append(_Worker(self, None))
        for w in new:
            workers[w.study] = w
        self.workers = workers
        for w in new:
            w.start()

    def _start_replicators(self, studies: list[str]) -> None:
        for s in studies:
            if s in self.cfg.studies and self.cfg.studies[s].replicas and s not in self.replicators:
                self.replicators[s] = StudyReplicator(self.cfg.studies[s], self.log, lambda: self.notifier,
                                                      state_dir=self.cfg.state).start()

    def _stop_replicators(self, studies: list[str]) -> None:
        """Stop between objects (what was sent stays; the next start goes on)."""
        stopping = [self.replicators.pop(s) for s in studies if s in self.replicators]
        for r in stopping:
            r.stop()
        deadline = time.monotonic() + STOP_TIMEOUT
        for r in stopping:
            if not r.join(max(0.0, deadline - time.monotonic())):
                self.log(WARNING, f"study {r.study.name}: replication still busy after {STOP_TIMEOUT:.0f} s; "
                                  "leaving it (the next start goes on from what the replica holds)")

    def _describe_start(self, served: list[str]) -> str:
        inboxes = ", ".join(f"{i} ({ded or 'shared'})" for i, ded in self.cfg.inboxes()
                            if os.path.normpath(i) in self._watched_inboxes(self.cfg))
        mode = self._watch.mode if self._watch else "?"
        return (f"started (pid {os.getpid()}): studies {', '.join(served)}; inboxes {inboxes}; "
                f"mode {mode}, rescan every {self.cfg.rescan_seconds:g} s, settle {self.settle():g} s, "
                f"mail {'on' if self.cfg.notify.enabled else 'off (no notify.sender)'}; "
                f"config {self.cfg.source or '(built-in default layout)'}")

    # ------------------------------------------------------------- reload

    def _reload(self) -> None:
        self._sd_notify("RELOADING=1", "STATUS=reloading the configuration")
        try:
            new = _config.load(self.config_path)
            if new.state != self.cfg.state:
                raise ConfigError(f"key 'state' changed ({self.cfg.state} -> {new.state}); "
                                  "that needs a restart", new.source)
            self._check_ready(new)
        except EideticError as e:
            self.log(ERROR, f"reload failed, keeping the running configuration: {e.message}")
            self._sd_notify("READY=1", self._status())
            return
        # What is served is what this daemon holds the locks of, not what the
        # old config named: a study whose lock was busy at an earlier reload
        # is tried again, and none is ever served without its lock.
        held = set(self._locks)
        wanted = set(self._served(new))
        removed = held - wanted
        added = wanted - held
        changed = {s for s in held & wanted
                   if _ingest_view(self.cfg.studies[s]) != _ingest_view(new.studies[s])}
        # Studies whose worker must go: removed ones, and changed ones (their
        # store may have moved); an entry in progress is abandoned, redone later.
        leaving = [self.workers[s] for s in sorted(removed | changed) if s in self.workers]
        for w in leaving:
            self._retiring.add(w)
            w.stop()
        self.workers = {k: w for k, w in self.workers.items() if w not in leaving}
        for w in self._join(leaving, STOP_TIMEOUT):
            self.log(WARNING, f"{w.label}: still busy after {STOP_TIMEOUT:.0f} s; it stops on its own")
        self._retiring = {w for w in self._retiring if w.thread.is_alive()}
        for s in removed:
            os.close(self._locks.pop(s))
        # A held study gets a worker unless its old one still runs (never two).
        running = {w.study for w in self._retiring}
        starting = [s for s in sorted(held & wanted) if s not in self.workers and s not in running]
        for s in sorted(added):
            try:
                self._locks[s] = self.state.daemon_lock(s)
                starting.append(s)
            except LockBusy as e:
                self.log(ERROR, f"reload: study {s} is not served here: {e.message}")
            except OSError as e:
                self.log(ERROR, f"reload: study {s} is not served here: cannot take its lock: {e.strerror}")
        self.cfg = new
        self.ingester = self._new_ingester(new)
        old_notifier, self.notifier = self.notifier, self._new_notifier(new)
        old_notifier.stop()
        self.notifier.start()
        try:
            self._start_watch(new)
        except OSError as e:
            self.log(ERROR, f"reload: cannot watch the inboxes ({e.strerror or e}); relying on the "
                            f"rescan every {new.rescan_seconds:g} s")
        self._start_workers(starting)
        # Replicas may have been added, changed or removed: new threads on the new config.
        self._stop_replicators(list(self.replicators))
        self._start_replicators(sorted(s for s in self.workers if s))
        for w in list(self.workers.values()):
            w.resume()          # a person reloaded: a study paused after a failed sync is tried again
            w.wake(rescan=True)
        parts = [f"{what} {', '.join(sorted(ss))}" for what, ss in
                 (("added", added), ("removed", removed), ("changed", changed)) if ss]
        self.log(INFO, f"reloaded {new.source or '(built-in default layout)'}: "
                       + ("; ".join(parts) if parts else "no study added, removed or changed")
                       + f"; serving {', '.join(sorted(s for s in self.workers if s)) or 'nothing'}")
        self._sd_notify("READY=1", self._status())

    # ------------------------------------------------------------ systemd

    def _sd_notify(self, *lines: str) -> None:
        with self._sd_lock:
            self._sd.notify("\n".join(lines))

    def _status(self) -> str:
        studies = sorted(s for s in self.workers if s)
        stopped = sorted(s for s, w in self.workers.items() if s and (w.paused or w.fault_told))
        return (f"STATUS=serving {', '.join(studies) or 'nothing'}: {self.ingested} ingested, "
                f"{self.failed} failed since start"
                + (f"; stopped by a store fault: {', '.join(stopped)}" if stopped else ""))

    @staticmethod
    def _watchdog_interval() -> float | None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if not usec.isdigit() or int(usec) <= 0 or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2e6


def _ingest_view(s: StudyConfig) -> StudyConfig:
    """The settings that matter to ingest (who gets mail does not)."""
    return dataclasses.replace(s, notify=(), notify_uploads="none")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass
