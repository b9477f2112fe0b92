"""Shared CLI plumbing: the lazily loaded config and output helpers."""

from __future__ import annotations

import sys

import click

from eidetic import config as _config


class Ctx:
    def __init__(self, config_path: str | None, verbose: int) -> None:
        self.config_path = config_path
        self.verbose = verbose
        self._cfg = None

    @property
    def cfg(self) -> _config.Config:
        if self._cfg is None:
            self._cfg = _config.load(self.config_path)
        return self._cfg


def say(msg: str) -> None:
    click.echo(msg)


def warn(msg: str) -> None:
    click.echo(msg, err=True)


def is_tty() -> bool:
    return sys.stderr.isatty()


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"

