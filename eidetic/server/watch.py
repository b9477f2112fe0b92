"""Noticing new inbox entries (the only module that imports watchdog).

An upload shows up under inotify as ``created .name`` then ``moved .name ->
name``; watchdog's PollingObserver (for NFS/SMB inboxes, where inotify sees
nothing) may report only ``created name``.  Both are treated alike: a name
without a leading '.' that appears in a watched inbox is reported, nothing
else.  Reports are hints only: watchdog drops events on an inotify queue
overflow, so the daemon also rescans every inbox periodically and at start.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

OnEntry = Callable[[str, bytes], None]     # (inbox directory, entry name)

POLL_INTERVAL = 1.0


class _Handler(FileSystemEventHandler):
    def __init__(self, inboxes: set[str], on_entry: OnEntry) -> None:
        self.inboxes = inboxes
        self.on_entry = on_entry

    def _report(self, path: str | bytes) -> None:
        path = os.fsdecode(path)
        inbox, name = os.path.split(path)
        if inbox in self.inboxes and name and not name.startswith("."):
            self.on_entry(inbox, os.fsencode(name))

    def on_created(self, event: FileSystemEvent) -> None:
        self._report(event.src_path)

    def on_moved(self, event: FileSystemEvent) -> None:
        self._report(event.dest_path)


class InboxWatch:
    """Non-recursive watches on inbox directories; *on_entry* is called from
    watchdog's thread and must be quick (the daemon only wakes a worker)."""

    def __init__(self, inboxes: list[str], on_entry: OnEntry, polling: bool = False,
                 poll_interval: float = POLL_INTERVAL) -> None:
        self.inboxes = [os.path.normpath(i) for i in inboxes]
        self.on_entry = on_entry
        self.polling = polling
        self.poll_interval = poll_interval
        self._observer = None
        self.fallback_reason: str | None = None

    @property
    def mode(self) -> str:
        return "polling" if self.polling else "inotify"

    def start(self) -> None:
        """Start watching.  If inotify cannot be set up (watch or instance
        limits), fall back to polling and say why in *fallback_reason*."""
        try:
            self._observer = self._start(self.polling)
        except OSError as e:
            if self.polling:
                raise
            self.fallback_reason = f"inotify unavailable ({e.strerror or e}); polling instead"
            self.polling = True
            self._observer = self._start(True)

    def _start(self, polling: bool):
        obs = PollingObserver(timeout=self.poll_interval) if polling else Observer()
        handler = _Handler(set(self.inboxes), self.on_entry)
        try:
            for inbox in self.inboxes:
                obs.schedule(handler, inbox, recursive=False)
            obs.start()
        except BaseException:
            _stop(obs)
            raise
        return obs

    def stop(self) -> None:
        if self._observer is not None:
            _stop(self._observer)
            self._observer = None


def _stop(obs) -> None:
    try:
        obs.stop()
        if obs.is_alive():
            obs.join(timeout=5)
    except (OSError, RuntimeError):   # never started, or already gone
        pass
