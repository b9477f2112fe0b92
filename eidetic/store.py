"""One study's store: format marker, objects, manifest chain, index, lock.

Layout (store_format.md, "Layout")::

    <store>/eidetic-store      format marker; readers refuse other versions
            HEAD               "<seq> <blake3 of manifest seq>" - the chain's head
            lock               flock(2) held by whoever writes
            objects/ab/cdef…   content-addressed, read-only
            manifests/0000000001.jsonl
            index/             LMDB (a cache)
            tmp/               temp files; anything here is garbage after a crash
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import stat
from contextlib import contextmanager
from typing import Iterator

from . import layout
from .config import StudyConfig
from .errors import LockBusy, StoreFormatError, StoreIOError
from .fsutil import AtomicFile, SyncFailed, makedirs, syncfs, write_atomic
from .manifest import Header, ManifestWriter
from .objects import ObjectStore

def describe_io_error(e: OSError, doing: str, root: str) -> str:
    """One line for an I/O error of a store: what failed, and what to do."""
    where = f" ({os.fsdecode(e.filename)})" if e.filename else ""
    if isinstance(e, SyncFailed):
        return (f"the disk reported an error while making data durable ({doing}: {e.strerror}{where}); "
                "what reached the disk is unknown, so this study is left alone: check the disk "
                "(dmesg, smartctl), run 'eidetic fsck', then run ingest again")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"the study's disk is full ({doing}: {e.strerror}; {root}): free space on it, "
                "then run ingest again")
    if e.errno == errno.EROFS:
        return (f"the study's file system is read-only ({doing}: {e.strerror}; {root}): "
                "the kernel may have remounted it after an error; check the disk (dmesg), then run ingest again")
    if e.errno == errno.EIO:
        return (f"the disk reported an I/O error ({doing}{where}): check the disk (dmesg, smartctl), "
                "run 'eidetic fsck', then run ingest again")
    return f"{doing} failed: {e.strerror or e}{where}"


MARKER_TEXT = "eidetic store\nformat: {version}\nstudy: {study}\n"
STORE_DIRS = ("objects", "manifests", "index", "tmp")


class Store:
    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.name = study.name
        self.root = study.store
        self.broot = os.fsencode(study.store)
        self.tree = study.tree
        self.objects = ObjectStore(self.root, os.path.join(self.root, "tmp"))
        self._index = None

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def init(cls, study: StudyConfig) -> "Store":
        """Create the store and tree directories (idempotent)."""
        makedirs(os.fsencode(study.store), 0o700)
        for d in STORE_DIRS:
            makedirs(os.fsencode(os.path.join(study.store, d)), 0o700)
        makedirs(os.fsencode(study.tree), 0o755)
        marker = os.path.join(study.store, layout.STORE_MARKER)
        if not os.path.exists(marker):
            write_atomic(marker, MARKER_TEXT.format(version=layout.FORMAT_VERSION, study=study.name).encode(),
                         mode=0o444)
        store = cls(study)
        store.check_format()
        return store

    @classmethod
    def open(cls, study: StudyConfig) -> "Store":
        store = cls(study)
        store.check_format()
        return store

    def check_format(self) -> None:
        marker = os.path.join(self.root, layout.STORE_MARKER)
        try:
            with open(marker, "rb") as f:
                text = f.read(4096).decode("utf-8", "replace")
        except FileNotFoundError:
            raise StoreFormatError("not an eidetic store (run 'eidetic init')", self.root) from None
        lines = dict(line.split(": ", 1) for line in text.splitlines()[1:] if ": " in line)
        if not text.startswith("eidetic store\n") or lines.get("format") != str(layout.FORMAT_VERSION):
            raise StoreFormatError(f"store format {lines.get('format', '?')!r} is not understood by this "
                                   f"eidetic (it reads format {layout.FORMAT_VERSION}); refusing to touch it",
                                   self.root)
        if lines.get("study") != self.name:
            raise StoreFormatError(f"this store belongs to study {lines.get('study')!r}, not {self.name!r}",
                                   self.root)

    @property
    def index(self):
        if self._index is None:
            from .index import Index  # lmdb only when needed
            self._index = Index(os.path.join(self.root, "index"))
        return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()
            self._index = None

    # ----------------------------------------------------------------- lock

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise LockBusy(f"study {self.name}: another eidetic process is writing to "
                                   f"{self.root}") from None
                raise
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ manifests

    def manifest_path(self, seq: int) -> str:
        return os.path.join(self.root, layout.manifest_relpath(seq))

    def manifest_seqs(self) -> list[int]:
        out = []
        for name in os.listdir(os.path.join(self.root, "manifests")):
            seq = layout.parse_manifest_name(name)
            if seq is not None:
                out.append(seq)
        return sorted(out)

    def head(self) -> tuple[int, str | None]:
        """(seq, digest) recorded in HEAD; (0, None) for an empty store."""
        try:
            with open(os.path.join(self.root, "HEAD"), "rb") as f:
                seq, digest = f.read(200).decode("ascii").split()
            return int(seq), digest
        except FileNotFoundError:
            return 0, None
        except (ValueError, UnicodeDecodeError):
            raise StoreFormatError("HEAD is unreadable (run 'eidetic fsck')", self.root) from None

    def set_head(self, seq: int, digest: str) -> None:
        write_atomic(os.path.join(self.root, "HEAD"), f"{seq} {digest}\n".encode(), mode=0o644)

    def recover_head(self) -> tuple[int, str | None]:
        """After a crash between a manifest's commit and HEAD's update the
        newest manifest is one past HEAD: it is committed, so advance HEAD."""
        from .manifest import ManifestReader, digest_of

        seq, digest = self.head()
        nxt = self.manifest_path(seq + 1)
        if os.path.exists(nxt):
            r = ManifestReader(nxt)
            r.close()
            if r.header.prev == digest:
                digest = digest_of(nxt)
                seq += 1
                self.set_head(seq, digest)
        return seq, digest

    def new_manifest(self, header: Header) -> tuple[AtomicFile, ManifestWriter]:
        """Start streaming a manifest into tmp/; commit with :meth:`commit_manifest`
        or drop it with ``atomic.abort()``."""
        af = AtomicFile(self.manifest_path(header.seq), mode=0o444, sync_file=False, exclusive=True,
                        tmp_dir=os.path.join(self.root, "tmp"))
        return af, ManifestWriter(af.open(), header)

    def commit_manifest(self, af: AtomicFile, writer: ManifestWriter) -> str:
        """The commit point of an upload.

        Every object written for it and the manifest's own bytes are made
        durable with one syncfs; only then does the manifest get its final
        name (which must not exist yet), the directory is fsynced and HEAD
        advanced.  A crash before the link leaves an uncommitted upload that
        a re-run redoes; after it, a committed one that a re-run finishes.
        """
        seq = writer.header.seq
        digest = writer.finish()
        try:
            af.commit(before_rename=lambda: syncfs(self.root))
        except FileExistsError:
            raise StoreFormatError(f"manifest {seq} already exists: two writers?", self.root) from None
        except OSError as e:
            if not af.placed:
                raise           # before the commit point: nothing is visible, the caller redoes it
            # The manifest has its name (visible to every reader and to the next
            # run), so the upload IS committed whatever failed after the link:
            # never report it failed.
            raise self.io_error(e, f"finishing the commit of manifest {seq}", committed=True) from None
        try:
            self.set_head(seq, digest)
        except OSError as e:
            raise self.io_error(e, f"advancing HEAD to manifest {seq}", committed=True) from None
        return digest

    def io_error(self, e: OSError, doing: str, committed: bool = False) -> StoreIOError:
        """*e*, met while *doing* something to this store, as the one-line
        StoreIOError the command line and the daemon report (exit 3)."""
        return StoreIOError(describe_io_error(e, doing, self.root), self.name, errno=e.errno,
                            committed=committed, sync_failed=isinstance(e, SyncFailed))

    # ------------------------------------------------------------------ tmp

    def clean_tmp(self, best_effort: bool = False) -> int:
        """Remove what a killed writer left in tmp/ (call with the lock held).
        *best_effort*: after a fault, an error here is not worth reporting over
        the one being reported (what stays is removed by the next run)."""
        n = 0
        tmp = os.path.join(self.root, "tmp")
        try:
            for name in os.listdir(tmp):
                p = os.path.join(tmp, name)
                st = os.lstat(p)
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.unlink(p)
                n += 1
        except OSError:
            if not best_effort:
                raise
        return n

    def sync(self) -> None:
        syncfs(self.root)

