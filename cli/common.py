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
from eidetic.core.layout import human_bytes  # noqa: F401 - re-exported for the commands

if TYPE_CHECKING:
    from eidetic.server.config import Config

# The distribution (pyproject.toml's name; the import name stays eidetic).
DISTRIBUTION = "eidetic-archive"
# What the [server] extra adds to the client install (pyproject.toml).
SERVER_LIBRARIES = ("lmdb", "watchdog", "sdnotify")


class Ctx:
    def __init__(self, config_path: str | None, verbose: int) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._cfg = None

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


def say(msg: str) -> None:
    click.echo(msg)


def warn(msg: str) -> None:
    click.echo(msg, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()
