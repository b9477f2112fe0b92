"""Restore a file, or a directory as it stood at a time or upload, to a
destination outside the store.  Every byte is verified against its BLAKE3
while it is copied; recorded modes and mtimes are restored; each file is
written to a temp name and renamed, so an interrupted checkout never leaves
a half-written file under its real name.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from . import layout
from .config import Config
from .errors import DestinationExists, NotFound, UsageError
from .fsutil import AtomicFile, makedirs
from .history import Target, resolve, select
from .index import Version


@dataclass
class CheckoutResult:
    dest: str
    files: int
    bytes: int


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without a zone is taken as UTC (as eidetic log prints)."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--at {text!r}: not an ISO 8601 time (e.g. 2026-11-21T14:30:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t


def checkout(cfg: Config, arg: str, version: int | None = None, at: str | None = None,
             upload: str | None = None, dest: str | None = None, force: bool = False,
             progress: Callable[[int, int], None] | None = None) -> CheckoutResult:
    if sum(x is not None for x in (version, at, upload)) > 1:
        raise UsageError("choose at most one of --version, --at and --upload")
    t = resolve(cfg, arg)
    at_time = parse_time(at) if at is not None else None
    upload_seq = None
    if upload is not None:
        upload_seq = t.store.index.upload_seq(upload)
        if upload_seq is None:
            raise NotFound(f"study {t.store.name} has no upload {upload!r}")
    if version is None and t.version is not None and at is None and upload is None:
        version = t.version
    if t.is_dir and version is not None:
        raise UsageError("--version applies to a file; for a folder use --at or --upload")

    base = t.path.rpartition(b"/")[2] or os.fsencode(t.store.name)
    out = os.fsencode(os.path.abspath(dest)) if dest else os.fsencode(os.path.abspath(os.fsdecode(base)))
    if os.path.lexists(out) and not force:
        raise DestinationExists(os.fsdecode(out))

    objects = t.store.objects
    if not t.is_dir:
        v = select(t.store.index.versions_of(t.path), version, at_time, upload_seq)
        if v is None:
            raise NotFound(_none_msg(t, version, at, upload))
        if os.path.isdir(out):
            raise DestinationExists(os.fsdecode(out))
        n = _write(objects, v, out)
        if progress:
            progress(1, n)
        return CheckoutResult(os.fsdecode(out), 1, n)

    files = nbytes = 0
    prefix_len = len(t.path) + 1 if t.path else 0
    index = t.store.index
    for path, versions in _grouped_under(index, t.path):
        v = select(versions, None, at_time, upload_seq)
        if v is None:
            continue
        rel = path[prefix_len:]
        if index.has_dir(path) and any(select(vs, None, at_time, upload_seq)
                                       for _, vs in _grouped_under(index, path)):
            # The path was also sent as a folder by then: as in the tree, the
            # folder takes the name and the file keeps its version name.
            head, _, name = rel.rpartition(b"/")
            rel = (head + b"/" if head else b"") + layout.version_name(name, v.n, v.stamp)
        target = out + b"/" + rel
        makedirs(os.path.dirname(target), 0o755)
        nbytes += _write(objects, v, target)
        files += 1
        if progress:
            progress(files, nbytes)
    if files == 0:
        raise NotFound(_none_msg(t, version, at, upload))
    return CheckoutResult(os.fsdecode(out), files, nbytes)


def _grouped_under(index, prefix: bytes):
    """(path, versions oldest first) for every path under directory *prefix*, streamed."""
    cur_path, cur = None, []
    for v in index.iter_versions(prefix):
        if v.path != cur_path:
            if cur:
                yield cur_path, cur
            cur_path, cur = v.path, []
        cur.append(v)
    if cur:
        yield cur_path, cur


def _write(objects, v: Version, out: bytes) -> int:
    af = AtomicFile(out, mode=v.mode & 0o7777)
    try:
        f = af.open()
    except OSError as e:   # the temp file sits beside *out*: name the destination, never the temp
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise UsageError(f"cannot write {layout.display(out)}: its folder does not exist") from None
        raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None
    try:
        f.flush()
        n = objects.copy_out(v.blake3, f.fileno())
        os.utime(f.fileno(), ns=(v.mtime_ns, v.mtime_ns))
    except BaseException:
        af.abort()
        raise
    af.commit()
    return n


def _none_msg(t: Target, version, at, upload) -> str:
    what = layout.display(t.path) or f"study {t.store.name}"
    if version is not None:
        return f"{what}: there is no version {version}"
    if at is not None:
        return f"{what}: nothing had been received by {at}"
    if upload is not None:
        return f"{what}: nothing had been received by upload {upload}"
    return f"{what}: no versions"
