"""Creating a configured layout on disk (``eidetic init``); idempotent."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .config import Config
from .fsutil import makedirs
from .inbox import StateDir
from .store import Store

INBOX_MODE = 0o1777      # anyone may drop an entry; only its owner may rename or remove it
STATE_MODE = 0o700


@dataclass
class Action:
    path: str
    what: str            # "created" | "exists"


def init(cfg: Config) -> list[Action]:
    actions: list[Action] = []

    def mkdir(path: str, mode: int) -> None:
        created = makedirs(os.fsencode(path), mode)
        if created:
            os.chmod(path, mode)   # mkdir's mode is filtered by the umask; sticky needs chmod
        actions.append(Action(path, "created" if created else "exists"))

    for inbox, _ in cfg.inboxes():
        mkdir(inbox, INBOX_MODE)
    existed = os.path.isdir(cfg.state)
    StateDir(cfg.state).init()
    actions.append(Action(cfg.state, "exists" if existed else "created"))
    for s in cfg.studies.values():
        existed = os.path.exists(os.path.join(s.store, "eidetic-store"))
        tree_existed = os.path.isdir(s.tree)
        Store.init(s)
        actions.append(Action(s.store, "exists" if existed else "created"))
        actions.append(Action(s.tree, "exists" if tree_existed else "created"))
    return actions

