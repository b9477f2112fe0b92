"""Who may read or check a study, and the one line that says so.

A study's store and tree belong to the service user and the study's group
(deploy.py): members of the group read history (``log``, ``checkout``,
``status``); only the service user (or root) may write, and ``fsck`` needs
all of its access (the index's lock file, ``tmp/``).  A permission problem
is never reported as damage: it becomes :class:`AccessDenied` (exit status
3) naming the user or group that can, from the config.
"""

from __future__ import annotations

import errno
import os
import shlex
from collections.abc import Iterator
from contextlib import contextmanager

from ..core.errors import AccessDenied, StoreIOError
from .config import Config, StudyConfig
from .deploy import group_name_of, readers_of, user_name_of

_DENIED = (errno.EACCES, errno.EPERM)


def _my_groups() -> set[int]:
    return {os.getegid(), *os.getgroups()}


def is_reader(cfg: Config, s: StudyConfig) -> bool | None:
    """Is this process root, the service user or in the study's group?
    None when the config names neither (the default layout: the owner's)."""
    ids = readers_of(cfg, s)
    if ids.uid is None and ids.gid is None:
        return None
    euid = os.geteuid()
    return euid == 0 or euid == ids.uid or (ids.gid is not None and ids.gid in _my_groups())


def denied_reading(cfg: Config, s: StudyConfig, path: str | bytes | None) -> AccessDenied:
    """What to say when reading study *s* met a permission error at *path*."""
    ids = readers_of(cfg, s)
    where = os.fsdecode(path) if path else s.store
    if is_reader(cfg, s) is False and ids.gid is not None:
        return AccessDenied(f"you are not in group {group_name_of(ids.gid)}, which may read study {s.name}")
    if ids.gid is None:
        return AccessDenied(f"cannot read {where} (permission denied): study {s.name} is readable by "
                            f"{_owner(s)} only; run this as that user or root")
    return AccessDenied(f"cannot read {where} (permission denied), although you may read study {s.name} "
                        f"(group {group_name_of(ids.gid)}): its permissions differ from the design; an admin "
                        "sees how with 'eidetic init --check' and sets them with 'eidetic init' (as root)")


def denied_service(cfg: Config, s: StudyConfig, path: str | bytes | None, command: str) -> AccessDenied:
    """What to say when *command* needs the service user's access to study *s*."""
    ids = readers_of(cfg, s)
    where = os.fsdecode(path) if path else s.store
    user = user_name_of(ids.uid) if ids.uid is not None else _owner(s)
    line = " ".join(["eidetic", *(["--config", shlex.quote(cfg.source)] if cfg.source else []), command,
                     "--study", s.name])
    who, sudo = ("root", "sudo") if user == "root" else (f"{user} or root", f"sudo -u {shlex.quote(user)}")
    return AccessDenied(f"'eidetic {command}' needs the service user's access to study {s.name} (it cannot use "
                        f"{where}): run it as {who}, e.g. '{sudo} {line}'")


def _owner(s: StudyConfig) -> str:
    try:
        return user_name_of(os.stat(s.store).st_uid)
    except OSError:
        return "the service user"


@contextmanager
def reading(cfg: Config, s: StudyConfig) -> Iterator[None]:
    """Read study *s*: a permission error (from the file system or the
    index) becomes :func:`denied_reading`'s one line."""
    try:
        yield
    except PermissionError as e:
        raise denied_reading(cfg, s, e.filename) from None
    except StoreIOError as e:
        if e.errno in _DENIED:
            raise denied_reading(cfg, s, os.path.join(s.store, "index")) from None
        raise


def check_service_access(cfg: Config, s: StudyConfig, command: str) -> None:
    """Refuse *command* (fsck) up front, with :func:`denied_service`, when this
    process cannot do all it needs in study *s*: read and search the store,
    its directories and the tree, write the index's lock file.  A check that
    could not look everywhere would report what it missed as damage.  What
    is really missing is left to the command (fsck says E001/E003)."""
    need = [(s.store, os.R_OK | os.X_OK), (s.tree, os.R_OK | os.X_OK)]
    need += [(os.path.join(s.store, d), os.R_OK | os.X_OK) for d in ("objects", "manifests", "index", "tmp")]
    need += [(os.path.join(s.store, "index", "lock.mdb"), os.W_OK)]
    for path, mode in need:
        if os.path.lexists(path):
            if not _may(path, mode):
                raise denied_service(cfg, s, path, command)
        elif os.path.isdir(os.path.dirname(path)) and not _may(os.path.dirname(path), os.X_OK):
            raise denied_service(cfg, s, os.path.dirname(path), command)


def _may(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)
