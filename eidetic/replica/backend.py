"""Where a replica lives: the backend interface, its config, and file://.

A replica (store_format.md, "Replicas") mirrors a store's marker, objects,
manifests and HEAD under keys relative to its URL's prefix::

    eidetic-store   objects/<id[0:2]>/<id[2:]>   manifests/<seq:010d>.jsonl   HEAD

replicate, restore and fsck speak only :class:`Backend`, so a backend must
behave like S3 as they see it: a put replaces the key as a whole (readers
see the old bytes or the new, never a mix), ``list`` yields every key under
a folder in bytewise order with its size, ``head`` returns None for an
absent key, and ``open_read`` raises :class:`ReplicaMissing` for one.

The S3 backend is ``eidetic.replica.s3`` (the only module that imports
boto3), imported on first use so that ``import eidetic.replica`` and a
file:// replica work without boto3 installed.
"""

from __future__ import annotations

import abc
import errno
import io
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from collections import deque
from concurrent.futures import Executor, Future
from typing import BinaryIO, Callable, Iterable, Iterator, TypeVar
from urllib.parse import unquote, urlsplit

from ..core.errors import ConfigError, ReplicaError, ReplicaMissing, ReplicaNotLocked, ReplicaUnreachable
from ..core.fsutil import AtomicFile, is_temp_name, mkdir_open, open_dir_nofollow, open_regular_nofollow
from ..core.hashing import CHUNK, write_all

T = TypeVar("T")
R = TypeVar("R")
RETENTION_MODES = ("compliance", "governance")
MARKER_KEY = "eidetic-store"
HEAD_KEY = "HEAD"


@dataclass(frozen=True)
class ReplicaConfig:
    """One entry of ``studies.<s>.replicas`` (the server's config parses it;
    this package knows no config file)."""

    name: str
    url: str
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None
    retention_days: int | None = None
    retention_mode: str = "compliance"


@dataclass(frozen=True)
class RemoteInfo:
    key: str                    # relative to the prefix, e.g. "objects/af/1349…"
    size: int
    blake3: str | None          # from metadata (S3); None when not recorded (file://, or a listing)
    sha256: str | None          # S3's checksum, base64 as S3 returns it; None when not known
    retain_until: datetime | None
    mode: str | None            # "COMPLIANCE" | "GOVERNANCE" | None


class Backend(abc.ABC):
    """A replica's storage.  Keys are relative to the URL's prefix and use
    "/" (never a leading one, never "." or ".." components)."""

    name: str
    url: str
    # Does a put record the BLAKE3 as metadata that head() returns (S3: yes)?
    # Where it does, a key without it was not written by eidetic (fsck E077).
    records_metadata: bool = True

    @abc.abstractmethod
    def list(self, under: str) -> Iterator[RemoteInfo]:
        """Every key under *under* ("objects/", "manifests/"), in bytewise
        order, with its size; blake3 and retention may be None here."""

    @abc.abstractmethod
    def head(self, key: str) -> RemoteInfo | None:
        """One key's full metadata and retention; None when absent."""

    @abc.abstractmethod
    def put_file(self, key: str, fd_or_path: int | str | bytes, size: int, blake3: str) -> None:
        """Write *size* bytes read from an open fd (from its current offset)
        or a path, streamed with bounded memory, checksummed, with retention."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, blake3: str | None) -> None:
        """Write a small value (a manifest, HEAD, the marker) whole."""

    @abc.abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A streamed download of *key*; ReplicaMissing when absent."""

    @abc.abstractmethod
    def check_ready(self) -> None:
        """Reachable, credentials work, bucket or directory exists, and it can
        hold retention when retention_days is set; a ReplicaError otherwise."""

    def close(self) -> None:
        """Let go of connections (nothing to do for most backends)."""

    def read_bytes(self, key: str, limit: int = 1 << 30) -> bytes:
        """A whole (small) value: a manifest, HEAD, the marker."""
        with self.open_read(key) as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ReplicaError(f"{key} is larger than {limit} bytes", self.name)
        return data


def bounded_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T], window: int = 64) -> Iterator[R]:
    """``pool.map(fn, items)`` with at most *window* calls in flight: results
    in order, and memory flat however many items (Executor.map submits every
    item at once: a million objects would be a million futures)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        if len(pending) >= window:
            yield pending.popleft().result()
        pending.append(pool.submit(fn, item))
    try:
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:       # a failure (or a caller that stopped) cancels the rest
            f.cancel()


def check_key(key: str) -> str:
    """Validate a key before any path is built from it (STYLE.md, habit 3)."""
    parts = key.split("/")
    if (not key or key.startswith("/") or "\0" in key
            or any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in (".", "..")):
        raise ValueError(f"invalid replica key {key!r}")
    return key


class FileBackend(Backend):
    """A replica in a directory (a second file system mounted here).

    Every file is written as temp + fsync + rename + fsync of its directory
    (fsutil.AtomicFile), mode 0444, so a reader sees a whole file or none,
    like S3.  Below the configured root nothing is followed: each folder is
    opened relative to its parent's fd with O_NOFOLLOW, as checkout does, so
    a symlink planted inside the replica can neither redirect a write nor
    pass for a key.  (The root itself may be reached through a symlink: it
    is the admin's mount point.)  No retention: a file system cannot refuse
    root's deletion, which is why retention_days on file:// is refused.
    """

    records_metadata = False    # a file holds its bytes only

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.url = cfg.url
        self.root = file_url_path(cfg.url)

    # ------------------------------------------------------------ folders

    def _open_root(self) -> int:
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ReplicaUnreachable(f"{self.root} does not exist (is the file system mounted?)",
                                     self.name) from None
        except OSError as e:
            raise ReplicaUnreachable(f"cannot open {self.root}: {e.strerror}", self.name) from None

    def _open_dir(self, parts: list[str], create: bool) -> int:
        """An fd on the folder root/parts[0]/parts[1]/…, each component
        opened without following a symlink (made, mode 0755, if *create*)."""
        fd = self._open_root()
        try:
            for p in parts:
                if create:
                    nfd, _ = mkdir_open(p, fd, 0o755)
                else:
                    nfd = open_dir_nofollow(p, fd)
                os.close(fd)
                fd = nfd
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _split(self, key: str) -> tuple[list[str], str]:
        parts = check_key(key).split("/")
        return parts[:-1], parts[-1]

    # ------------------------------------------------------------- reading

    def _open_file(self, key: str) -> tuple[int, os.stat_result] | None:
        folders, name = self._split(key)
        try:
            dfd = self._open_dir(folders, create=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:      # a symlink where a folder should be: no such key
                return None
            raise ReplicaError(f"cannot read {key}: {e.strerror}", self.name) from None
        try:
            return open_regular_nofollow(name, dir_fd=dfd)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EINVAL):  # a symlink or special file is not a key
                return None
            raise ReplicaError(f"cannot read {key}: {e.strerror}", self.name) from None
        finally:
            os.close(dfd)

    def head(self, key: str) -> RemoteInfo | None:
        opened = self._open_file(key)
        if opened is None:
            return None
        fd, st = opened
        os.close(fd)
        return RemoteInfo(key, st.st_size, None, None, None, None)

    def open_read(self, key: str) -> BinaryIO:
        opened = self._open_file(key)
        if opened is None:
            raise ReplicaMissing(f"{key} is not on the replica", self.name)
        return io.FileIO(opened[0], "rb", closefd=True)   # type: ignore[return-value]

    def list(self, under: str) -> Iterator[RemoteInfo]:
        prefix = under.rstrip("/")
        try:
            fd = self._open_dir(self._split(prefix + "/x")[0], create=False) if prefix else self._open_root()
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                return
            raise ReplicaError(f"cannot list {under}: {e.strerror}", self.name) from None
        yield from self._walk(fd, prefix)

    def _walk(self, fd: int, prefix: str) -> Iterator[RemoteInfo]:
        # S3 lists keys in bytewise order; a folder's keys sort as "<folder>/…",
        # so sorting each level's names with "/" appended to folders gives the
        # same order as a flat listing of the whole tree.
        try:
            entries = []
            with os.scandir(fd) as it:
                for e in it:
                    if is_temp_name(e.name):    # a put in progress, or a killed one's leftover
                        continue
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        entries.append((e.name + "/", e.name, None))
                    elif stat.S_ISREG(st.st_mode):
                        entries.append((e.name, e.name, st.st_size))
            entries.sort(key=lambda t: t[0].encode("utf-8", "surrogateescape"))
            for _sort, name, size in entries:
                key = f"{prefix}/{name}" if prefix else name
                if size is not None:
                    yield RemoteInfo(key, size, None, None, None, None)
                    continue
                try:
                    sub = open_dir_nofollow(name, fd)
                except OSError:
                    continue    # replaced meanwhile, or by a symlink: not a folder of keys
                yield from self._walk(sub, key)
        finally:
            os.close(fd)

    # ------------------------------------------------------------- writing

    def _atomic(self, key: str):
        folders, name = self._split(key)
        try:
            dfd = self._open_dir(folders, create=True)
        except ReplicaError:
            raise
        except OSError as e:
            raise ReplicaError(f"cannot write {key}: {e.strerror}", self.name) from None
        return dfd, AtomicFile(name, mode=0o444, dir_fd=dfd)

    def put_bytes(self, key: str, data: bytes, blake3: str | None) -> None:
        dfd, af = self._atomic(key)
        try:
            with af as f:
                f.write(data)
        except OSError as e:
            raise ReplicaError(f"cannot write {key}: {e.strerror}", self.name) from None
        finally:
            os.close(dfd)

    def put_file(self, key: str, fd_or_path: int | str | bytes, size: int, blake3: str) -> None:
        own = not isinstance(fd_or_path, int)
        src = open_regular_nofollow(fd_or_path)[0] if own else fd_or_path   # type: ignore[arg-type]
        dfd, af = self._atomic(key)
        try:
            with af as f:
                out = f.fileno()
                total = 0
                while total < size:
                    chunk = os.read(src, min(CHUNK, size - total))
                    if not chunk:
                        break
                    write_all(out, chunk)
                    total += len(chunk)
                # Like S3's Content-Length: a source that is not the size it
                # was said to be is an error, and nothing takes the key.
                if total != size or os.read(src, 1):
                    raise ReplicaError(f"{key}: the source is not {size} bytes long (it changed?)", self.name)
        except OSError as e:
            raise ReplicaError(f"cannot write {key}: {e.strerror}", self.name) from None
        finally:
            os.close(dfd)
            if own:
                os.close(src)

    # --------------------------------------------------------------- ready

    def check_ready(self) -> None:
        if self.cfg.retention_days:
            raise ReplicaNotLocked("retention_days is set, but a file:// replica cannot hold retention "
                                   "(any account that can write it can delete it): use an S3 bucket with "
                                   "Object Lock, or remove retention_days", self.name)
        fd = self._open_root()
        os.close(fd)


def file_url_path(url: str) -> str:
    """The absolute directory of a ``file:///ABS/PATH`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
        raise ConfigError(f"replica url {url!r}: a file replica is file:///absolute/path")
    path = unquote(parts.path)
    if "\0" in path or ".." in path.split("/"):
        raise ConfigError(f"replica url {url!r}: the path must not contain '..'")
    return path.rstrip("/") or "/"


def open_backend(cfg: ReplicaConfig) -> Backend:
    """The backend for a replica's URL: file:// here, s3:// in eidetic.replica.s3."""
    scheme = urlsplit(cfg.url).scheme
    if cfg.retention_mode not in RETENTION_MODES:
        raise ConfigError(f"replica {cfg.name}: retention_mode must be one of {', '.join(RETENTION_MODES)}, "
                          f"not {cfg.retention_mode!r}")
    if scheme == "file":
        return FileBackend(cfg)
    if scheme == "s3":
        try:
            from .s3 import S3Backend
        except ImportError as e:
            raise ReplicaError(f"s3:// replicas need boto3 ({e}): pip install 'eidetic-archive[s3]'",
                               cfg.name) from None
        return S3Backend(cfg)
    raise ConfigError(f"replica {cfg.name}: url {cfg.url!r} is neither s3://BUCKET/PREFIX nor file:///PATH")
