"""Shared CLI plumbing: the lazily loaded config and output helpers."""

from __future__ import annotations

import sys

import click

from eidetic.server import config as _config
from eidetic.core.layout import human_bytes  # noqa: F401 - re-exported for the commands


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


