"""Shared CLI plumbing: the lazily loaded config, the server-install check
and output helpers."""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
import urllib.parse
from typing import TYPE_CHECKING

import click

from eidetic.core.errors import ServerNotInstalled
from eidetic.core.layout import human_bytes, plural  # noqa: F401 - re-exported for the commands

if TYPE_CHECKING:
    from eidetic.server.config import Config

# The distribution (pyproject.toml's name; the import name stays eidetic).
DISTRIBUTION = "eidetic-archive"
# What the [server] extra adds to the client install (pyproject.toml).
SERVER_LIBRARIES = ("lmdb", "watchdog", "sdnotify")


class Ctx:
    """What the group's options say, shared by every command.  -v and -q may
    be given before and after the command (``eidetic -v fsck -v``); their
    counts add up, -q taking one -v back: *verbose* is how much more than
    usual to say, *quiet* whether to say only errors, warnings and the
    results that are the point of the command."""

    def __init__(self, config_path: str | None, verbose: int, quiet: int = 0) -> None:
        self.config_path = config_path
        self._v = verbose
        self._q = quiet
        self._cfg = None
        self._publish()

    def add_verbosity(self, verbose: int, quiet: int) -> None:
        self._v += verbose
        self._q += quiet
        self._publish()

    @property
    def verbose(self) -> int:
        return max(self._v - self._q, 0)

    @property
    def quiet(self) -> bool:
        return self._q > self._v

    def _publish(self) -> None:
        global _quiet
        _quiet = self.quiet

    @property
    def cfg(self) -> Config:
        if self._cfg is None:
            # Imported here: the lab PC's `eidetic send` never loads server code.
            from eidetic.server import config as _config
            self._cfg = _config.load(self.config_path)
        return self._cfg


def missing_server_libraries() -> list[str]:
    """The server libraries this install cannot import, found without importing
    them (find_spec only: `eidetic log` must start fast)."""
    missing = []
    for name in SERVER_LIBRARIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def server_install_command() -> str:
    """The pip command line that adds the [server] extra to this very install:
    this interpreter's pip, and the clone it was installed from if it was
    installed from a folder (editable or not), else the distribution's name."""
    target = shlex.quote(f"{DISTRIBUTION}[server]")
    try:
        from importlib import metadata
        info = json.loads(metadata.distribution(DISTRIBUTION).read_text("direct_url.json") or "null")
    except Exception:   # not installed as a distribution (e.g. run from a source tree): the name
        info = None
    if isinstance(info, dict) and "dir_info" in info and str(info.get("url", "")).startswith("file://"):
        folder = urllib.parse.unquote(urllib.parse.urlsplit(info["url"]).path)
        if os.path.isdir(folder):
            editable = "-e " if (info.get("dir_info") or {}).get("editable") else ""
            target = editable + shlex.quote(f"{folder}[server]")
    return f"{shlex.quote(sys.executable or 'python3')} -m pip install {target}"


def require_server(command: str) -> None:
    """Raise ServerNotInstalled (one line, exit 3) unless the [server] extra is installed."""
    missing = missing_server_libraries()
    if missing:
        raise ServerNotInstalled(command, missing, server_install_command())


_quiet = False


def say(msg: str) -> None:
    """A result: what the command is run for (printed even with -q)."""
    click.echo(msg)


def note(msg: str) -> None:
    """Progress and confirmations on stdout, left out with -q."""
    if not _quiet:
        click.echo(msg)


def quiet() -> bool:
    return _quiet


def warn(msg: str) -> None:
    click.echo(msg, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


def iec_bar(total: int | None, **kw):
    """A tqdm bar counting bytes, shown in IEC units ("1.5 MiB of 3.0 GiB [00:12, 250.0 MiB/s]")."""
    from tqdm import tqdm

    class IecBar(tqdm):
        @property
        def format_dict(self):
            d = super().format_dict
            rate = d.get("rate") or (d["n"] / d["elapsed"] if d.get("elapsed") else None)
            d.update(iec_n=human_bytes(d["n"]),
                     iec_total="?" if d["total"] is None else human_bytes(d["total"]),
                     iec_rate="?" if not rate else human_bytes(int(rate)) + "/s")
            return d

    fmt = ("{l_bar}{bar}| {iec_n} of {iec_total} [{elapsed}<{remaining}, {iec_rate}]" if total is not None
           else "{desc}: {iec_n} [{elapsed}, {iec_rate}{postfix}]")
    return IecBar(total=total, bar_format=fmt, **kw)


class PhaseBars:
    """tqdm bars on stderr, one per phase (fsck, restore); silent when stderr is not a terminal."""

    UNITS = {"manifests": ("manifest", False), "tree": ("name", False), "objects": ("B", True),
             "replica manifests": ("manifest", False), "replica metadata": ("object", False),
             "replica data": ("B", True)}

    def __init__(self, study: str) -> None:
        self.study = study
        self.phase: str | None = None
        self.bar = None

    def __call__(self, phase: str, done: int, total: int | None) -> None:
        from tqdm import tqdm

        if phase != self.phase:
            self.close()
            unit, in_bytes = self.UNITS.get(phase, ("", False))
            self.phase = phase
            if in_bytes:     # tqdm's own scaling says k, M, G (powers of 1000): ours, in IEC units
                self.bar = iec_bar(desc=f"{self.study}: {phase}", total=total, disable=None, leave=False,
                                   file=sys.stderr)
            else:
                self.bar = tqdm(desc=f"{self.study}: {phase}", total=total, unit=unit,
                                disable=None, leave=False, file=sys.stderr)
        if self.bar is not None:
            if total is not None and self.bar.total != total:
                self.bar.total = total
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
