"""Helpers for the daemon tests: a running ``eidetic ingest`` subprocess whose
log lines can be waited for, config edits, a systemd notify socket and a
real SMTP server."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import Layout, clean_env, eidetic_argv

import eidetic.server.config
import eidetic.server.deploy


def wait_until(pred: Callable[[], object], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class DaemonProc:
    """``eidetic --config CFG [-v] ingest ARGS...`` running in the background;
    its stderr lines are collected as they come."""

    def __init__(self, config, *args: str, env: dict | None = None, verbose: bool = True,
                 argv0: list[str] | None = None, prefix: list[str] | None = None, cwd=None) -> None:
        argv = list(prefix or []) + list(argv0 or eidetic_argv()) + ["--config", str(config)]
        argv += (["-v"] if verbose else []) + ["ingest", *args]
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, errors="surrogateescape",
                                     env=env if env is not None else clean_env(), cwd=cwd)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    @property
    def text(self) -> str:
        with self._cv:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10.0) -> str:
        """The first log line matching the regex *pattern* (waiting for it)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                for line in self.lines:
                    if rx.search(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matching {pattern!r} within {timeout:g} s "
                                         f"(exit status {self.proc.poll()}); log:\n" + "\n".join(self.lines))
                self._cv.wait(min(left, 0.2))

    def index_of(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cv:
            return next(i for i, line in enumerate(self.lines) if rx.search(line))

    def started(self, timeout: float = 15.0) -> DaemonProc:
        self.wait_for(r"started \(pid", timeout)
        return self

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def stop(self, timeout: float = 10.0) -> int:
        self.signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def vm_kib(self, field: str) -> int:
        """VmHWM, VmRSS ... of the daemon process, in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.pid}/status")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def set_config(lay: Layout, **keys) -> Layout:
    """Add or change top-level keys of the layout's config file (JSON is YAML)."""
    doc = json.loads(lay.config_path.read_text())
    doc.update(keys)
    lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    lay.cfg = eidetic.server.config.load(str(lay.config_path))
    return lay


def set_study(lay: Layout, study: str, init: bool = False, **keys) -> Layout:
    """Add or change keys of one study in the layout's config file (the study
    is added when missing); with *init*, create its tree and store."""
    doc = json.loads(lay.config_path.read_text())
    doc["studies"].setdefault(study, {}).update(keys)
    lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    lay.cfg = eidetic.server.config.load(str(lay.config_path))
    if init:
        eidetic.server.deploy.init(lay.cfg)
    return lay


@contextmanager
def small_tmpfs(path: Path, size: str = "20m") -> Iterator[Path]:
    """A real, small file system mounted at *path* (created) while the block
    runs, to fill up on purpose; skips the test when not root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def daemon_records(lay: Layout, kind: str = "done") -> dict[str, dict]:
    """Records of finished entries by their original name."""
    out = {}
    d = lay.state / kind
    for n in os.listdir(d):
        if n.endswith(".json"):
            try:
                rec = json.loads((d / n).read_bytes())
            except ValueError:      # being replaced right now
                continue
            out[rec.get("original", "")] = rec
    return out


def big_files(n: int, size: int) -> dict[str, bytes]:
    """*n* distinct files of *size* bytes in folders of 100."""
    blob = os.urandom(size)
    return {f"d{i // 100:03d}/f{i:05d}.bin": blob[: size - 8] + i.to_bytes(8, "big") for i in range(n)}


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []     # one per line of each datagram, in arrival order
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.messages.extend(data.decode("utf-8", "replace").splitlines())

    def seen(self) -> list[str]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def env_with(**extra) -> dict:
    env = clean_env()
    env.update({k: str(v) for k, v in extra.items()})
    return env


def sigterm_ok(d: DaemonProc, timeout: float = 5.0) -> float:
    """SIGTERM; asserts exit status 0 within *timeout*; returns the seconds taken."""
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(timeout)
    took = time.monotonic() - t0
    assert rc == 0, d.text
    return took
