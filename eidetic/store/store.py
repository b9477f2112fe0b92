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
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from ..core import layout
from ..core.errors import IndexUnusable, IntegrityError, LockBusy, StoreFormatError, StoreIOError
from ..core.fsutil import (TEMP_PREFIX, AtomicFile, SyncFailed, flock_holder, fsync_dir, makedirs, rename,
                           syncfs, write_atomic)
from .manifest import Header, ManifestWriter
from .objects import ObjectStore

if TYPE_CHECKING:   # lmdb (through index) is loaded only by whoever opens an index
    from .index import EmptyIndex, Index, IndexState

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
PRIVATE_DIRS = ("tmp", "lost+found")     # the service user's alone (core/layout.py, "Modes")
INDEX_VERDICT = "verified"    # <store>/index/verified: see Store._note_verdict
# <store>/tmp/restore.json: 'eidetic restore' is filling this store from a
# replica (eidetic/replica/restore.py); until it finishes no other command
# may use the store, which is incomplete.
RESTORE_MARKER = "restore.json"


class Store:
    """One study's store at *root*, its browsable tree at *tree*.  It is handed
    the three things it needs, not the server's config: the store knows no
    config file."""

    def __init__(self, name: str, root: str, tree: str) -> None:
        self.name = name
        self.root = root
        self.broot = os.fsencode(root)
        self.tree = tree
        self.objects = ObjectStore(self.root, os.path.join(self.root, "tmp"))
        self._index = None
        self._index_sound = False   # prepare_index found (or made) the index sound: note it at unlock

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def init(cls, name: str, root: str, tree: str) -> "Store":
        """Create the store and tree directories (idempotent)."""
        makedirs(os.fsencode(root), layout.READABLE_DIR_MODE)
        for d in STORE_DIRS:
            makedirs(os.fsencode(os.path.join(root, d)),
                     layout.PRIVATE_DIR_MODE if d in PRIVATE_DIRS else layout.READABLE_DIR_MODE)
        makedirs(os.fsencode(tree), 0o755)
        marker = os.path.join(root, layout.STORE_MARKER)
        if not os.path.exists(marker):
            write_atomic(marker, MARKER_TEXT.format(version=layout.FORMAT_VERSION, study=name).encode(),
                         mode=0o444)
        store = cls(name, root, tree)
        store.check_format()
        store._create_empty_index()
        return store

    @classmethod
    def open(cls, name: str, root: str, tree: str) -> "Store":
        store = cls(name, root, tree)
        store.check_format()
        return store

    def check_format(self) -> None:
        if os.path.lexists(os.path.join(self.root, "tmp", RESTORE_MARKER)):
            raise StoreFormatError(f"a restore into this store is in progress or was interrupted (tmp/{RESTORE_MARKER}): "
                                   f"run 'eidetic restore --study {self.name} --from REPLICA' (the replica it "
                                   "names) to finish it", self.root)
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

    # ---------------------------------------------------------------- index
    #
    # The index is a cache of the manifests (store_format.md, "Index").  A
    # reader (log, checkout, status) never writes to the store and never
    # makes an index: it opens the one there, checks it is in step with HEAD
    # and refuses it (IndexUnusable) if not.  A writer, holding the store
    # lock, calls prepare_index(): it catches a merely-behind index up and
    # rebuilds any other from the manifests.

    @property
    def index(self) -> "Index | EmptyIndex":
        """The index: the writer's after :meth:`prepare_index`, else opened for
        reading (checked against HEAD; IndexUnusable when it may not be used)."""
        if self._index is None:
            self._index = self._open_for_reading()
        return self._index

    def close(self) -> None:
        self._index_sound = False
        if self._index is not None:
            self._index.close()
            self._index = None

    @property
    def index_path(self) -> str:
        return os.path.join(self.root, "index")

    def _open_for_reading(self) -> "Index | EmptyIndex":
        from .index import EmptyIndex, Index  # lmdb only when needed

        if not os.path.exists(os.path.join(self.index_path, "data.mdb")):
            head_seq, _ = self.head()
            if head_seq == 0 and not self.manifest_seqs():
                return EmptyIndex()        # nothing uploaded yet: nothing to show, nothing made
            raise IndexUnusable("its index is missing", self.name)
        idx = Index(self.index_path, study=self.name, create=False, write=False)
        try:
            self._check_in_step(idx)
        except BaseException:
            idx.close()
            raise
        return idx

    def _check_in_step(self, idx: "Index") -> None:
        """Refuse an index out of step with HEAD.  HEAD is read after the
        index: a writer finishing in between shows as a change, and the check
        is made again rather than report a state that never was."""
        problem = None
        for _ in range(5):
            st = idx.state()
            head = self.head()
            kind, problem = self._index_problem(st, *head)
            if kind is None:
                return
            if kind == "behind" and st.applied == head[0] - 1 and self.lock_busy():
                # An ingest is applying manifest HEAD: readers see the state as of
                # `applied` (whole uploads only; index.py filters every query to it).
                return
            if idx.state() == st and self.head() == head:
                break
        raise IndexUnusable(problem or "its index is out of step with HEAD", self.name)

    def _index_problem(self, st: "IndexState", head_seq: int, head_digest: str | None) -> tuple[str | None, str]:
        """(None, "") when the index state *st* is in step with HEAD; else
        ("behind", detail) when it is of this chain but has not applied every
        manifest (catching up fixes it), or ("bad", detail) (a rebuild does)."""
        if st.partial is not None and st.partial[0] != st.applied + 1:
            return "bad", (f"its index is damaged (it has applied {st.applied} uploads and part of "
                           f"upload {st.partial[0]})")
        if st.applied > head_seq:
            return "bad", (f"its index is ahead of HEAD: it has applied {st.applied} uploads, HEAD names "
                           f"{head_seq} (it is not of these manifests)")
        want = head_digest if st.applied == head_seq else self._digest_of(st.applied)
        if st.applied and want is not None and st.head != want:
            return "bad", (f"its index does not match the manifests (another history: it records manifest "
                           f"{st.applied} as {st.head}, the manifests say {want})")
        if st.applied < head_seq:
            return "behind", f"its index is behind HEAD: it has applied {st.applied} of {head_seq} uploads"
        return None, ""

    def _digest_of(self, seq: int) -> str | None:
        """The digest of manifest *seq*, as the next manifest's prev records it
        (one header read); None if that cannot be read (the caller's apply or
        fsck will say why)."""
        from .manifest import ManifestReader

        try:
            r = ManifestReader(self.manifest_path(seq + 1))
            r.close()
        except (IntegrityError, OSError):
            return None
        return r.header.prev

    def lock_busy(self) -> bool:
        """Does another process hold the store lock now?  Probed with a
        shared, non-blocking flock on a read-only descriptor, released at
        once: a reader never waits for a writer, nor makes the lock file."""
        path = os.path.join(self.root, "lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except PermissionError:
            # A study member: the lock is the service user's alone (a reader
            # that could open it could hold it); /proc/locks tells instead.
            return bool(flock_holder(path))
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as e:
            return e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
        finally:
            os.close(fd)    # closing releases the probe
        return False

    def prepare_index(self, log: Callable[[str], None] | None = None) -> "Index":
        """The index, fit for the writer: call with the store lock held.

        An index merely behind HEAD (of this chain) is caught up; a missing,
        empty, cut short, damaged, stale (of another history) or ahead-of-HEAD
        one is rebuilt from every manifest and swapped in.  Either is said in
        one *log* line.  An environment this process kept open across lock
        sessions (the daemon) is reopened if 'fsck --repair' swapped the
        index meanwhile; a newly opened one is verified page by page first."""
        from .index import Index

        say = log or (lambda _line: None)
        idx = self._index if isinstance(self._index, Index) and self._index.writable() else None
        if self._index is not None and idx is None:
            self.close()       # not ours to write, or no longer the file in place
            idx = None
        head_seq, head_digest = self.head()
        problem: str | None = None
        if idx is None:
            if not os.path.exists(os.path.join(self.index_path, "data.mdb")):
                problem = "its index was missing"
            else:
                try:
                    idx = Index(self.index_path, study=self.name, create=False)
                except IndexUnusable as e:
                    problem = _past(str(e.kwargs["detail"]))
        if idx is not None and problem is None and not idx.verified and not self._verdict_fresh():
            bad = idx.verify_structure()
            if bad:
                problem = f"its index was damaged ({layout.first_and_more(bad, limit=1, more=' and {} more')})"
        if idx is not None and problem is None:
            try:
                st = idx.state()
                kind, detail = self._index_problem(st, head_seq, head_digest)
                if kind == "behind":
                    for seq in range(st.applied + 1, head_seq + 1):
                        idx.apply_manifest(self.manifest_path(seq))
                    say(f"study {self.name}: {_past(detail)}; caught it up")
                elif kind == "bad":
                    problem = _past(detail)
            except IndexUnusable as e:
                problem = _past(str(e.kwargs["detail"]))
        if problem is None:
            self._index = idx
            self._index_sound = True
            return idx
        self.close()
        if idx is not None:
            idx.close()
        n = self.rebuild_index()
        if problem != "its index was missing" or n:
            say(f"study {self.name}: {problem}; rebuilt it from {n} manifest(s)")
        self._index_sound = True
        assert self._index is not None
        return self._index  # type: ignore[return-value]

    def rebuild_index(self) -> int:
        """Build a new index from every manifest up to HEAD in tmp/ and swap
        it in (call with the store lock held).  Returns how many manifests it
        applied.  The build skips LMDB's fsync per chunk and syncs once."""
        from .index import Index, close_env_at

        head, _ = self.head()
        tmp = os.path.join(self.root, "tmp")
        makedirs(os.fsencode(tmp), layout.PRIVATE_DIR_MODE)
        work = tempfile.mkdtemp(prefix=TEMP_PREFIX + "index-", dir=tmp)
        try:
            new_path = os.path.join(work, "index")
            new = Index(new_path, durable=False, study=self.name)
            try:
                for seq in range(1, head + 1):
                    new.apply_manifest(self.manifest_path(seq))
                new.sync()
            finally:
                new.close()
            fsync_dir(new_path)
            live = self.index_path
            self.close()
            close_env_at(live)     # this process's environment on the old files, if any
            if os.path.lexists(live):
                rename(live, os.path.join(work, "old-index"))
            rename(new_path, live)
            fsync_dir(self.root)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        idx = Index(live, study=self.name, create=False)
        idx.verified = True        # just built by this process
        self._index = idx
        return head

    def _create_empty_index(self) -> None:
        """init: a new store gets its (empty) index now, made by whoever runs
        init (the service user's, after init's chown), not later by a reader.
        A store with manifests and no index is left for a writer to rebuild."""
        from .index import Index

        if os.path.exists(os.path.join(self.index_path, "data.mdb")) or self.manifest_seqs():
            return
        Index(self.index_path, study=self.name).close()

    # ----------------------------------------------------------------- lock

    @contextmanager
    def lock(self, wait: bool = True) -> Iterator[None]:
        fd = os.open(os.path.join(self.root, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     layout.PRIVATE_FILE_MODE)
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
            if self._index_sound and self._index is not None:
                self._note_verdict()      # still under the lock: the file as this writer left it
            os.close(fd)

    # The page-by-page verification of data.mdb (index.verify_file) costs time
    # in proportion to the index, which would make every 'ingest --once' of an
    # old study slower.  A writer that found the index sound, and wrote to it
    # only through LMDB, notes the file's identity, size and mtime when it lets
    # go of the lock; the next writer verifies again only if the file changed
    # in between (an edit, a copy put back, a swap): damage by hand changes
    # them.  Decay that changes no metadata is fsck's to find (it always verifies).

    def _index_stamp(self) -> bytes | None:
        try:
            st = os.stat(os.path.join(self.index_path, "data.mdb"))
        except OSError:
            return None
        return f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns}\n".encode()

    def _verdict_fresh(self) -> bool:
        stamp = self._index_stamp()
        try:
            with open(os.path.join(self.index_path, INDEX_VERDICT), "rb") as f:
                return stamp is not None and f.read(200) == stamp
        except OSError:
            return False

    def _note_verdict(self) -> None:
        stamp = self._index_stamp()
        if stamp is None:
            return
        try:
            write_atomic(os.path.join(self.index_path, INDEX_VERDICT), stamp, mode=0o600)
        except OSError:     # a hint only: without it the next writer verifies again
            pass

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


def _past(detail: str) -> str:
    """An index problem's detail told in the past tense (it is being repaired)."""
    for now, then in (("its index is ", "its index was "), ("its index has ", "its index had "),
                      ("its index does not", "its index did not"), ("it has applied", "it had applied")):
        detail = detail.replace(now, then)
    return detail
