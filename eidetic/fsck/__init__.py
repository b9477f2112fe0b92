"""fsck: a collecting checker (and careful repairer) for one study.

:func:`check` never stops at the first problem: it walks the whole store and
tree and returns every :class:`Finding`, each with an OCFL-style code from
:data:`CODES` (``E0NN`` errors, ``W0NN`` warnings).  Only a missing or
unknown store marker is fatal (nothing else can be read safely).

What is compared with what:

* the manifests are read in sequence order, their chain checked (``prev``,
  sequence numbers, HEAD) and replayed into a *fresh* index in the system's
  temp directory (not fsynced, thrown away afterwards): the truth about the
  store;
* the live index is read through one pinned read transaction (a snapshot:
  plain fsck takes no lock, and an ingest may go on beside it) after lmdb's
  offline verifier found its pages sound, and compared with the fresh one
  (``Index.dump()``) at the point where both have applied the same
  manifests, and the same records of a manifest caught half-applied;
* the tree is checked against the fresh index as one merge of two streams:
  the versions in key order (a depth-first order of the uploaded paths)
  against one ``scandir`` listing per directory (names, kinds and inode
  numbers in one go).  Expected names are popped from the listings; what is
  not there is missing, what is left over no version accounts for;
* objects/ is merged with the objects the manifests need (both sorted), and
  every object is re-hashed (unless *quick*).

For a store with many objects the re-hash runs in a helper process (small
objects read whole, large ones with blake3's own threads), which then merges
objects/ with the fresh index, while this process replays the manifests and
checks the tree.  A process rather than a thread: the work is mostly Python,
and under the GIL a thread would take as long as doing it in turn.  Small
stores are checked in this process.

Findings an ingest running beside a lock-free check can cause are looked at
again at the end (:meth:`_Checker._settle`) and dropped when the ingest
explains them.

Nothing is loaded whole: manifests and indexes are streamed, one directory
listing per level is held.  :func:`repair` fixes what can be derived again
(index, tree names, modes, temp files, HEAD after a crash), moves what it
must not delete into ``<store>/lost+found/<timestamp>/``, and lists plainly
what it cannot fix.

This module prints nothing and imports no CLI code.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import zip_longest
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..core import layout
from ..core.errors import EideticError, IndexUnusable, IntegrityError, StoreFormatError
from ..core.fsutil import TEMP_PREFIX, fsync_dir, is_temp_name, makedirs, open_regular_nofollow
from ..store.objects import SMALL_FILE, ObjectStore, hash_bytes, hash_fd
if TYPE_CHECKING:   # the re-hashing child imports this module: keep its start-up light
    from ..store.store import Store

# ------------------------------------------------------------------- codes
#
# "title: meaning".  The title is what a report line shows before the path.
# E = error (fsck exits 1), W = warning (reported, exit 0).  Copied into
# store_format.md, "fsck finding codes".

CODES: dict[str, str] = {
    # the store itself
    "E001": "store marker missing: the directory has no eidetic-store file, so it is not an eidetic store (fatal)",
    "E002": "store marker not understood: unreadable, of an unknown format version, or of another study (fatal)",
    "E003": "store directory missing: objects/, manifests/ or tmp/ does not exist",
    # manifests and HEAD
    "E010": "manifest unreadable: not valid JSON lines, truncated, or its trailer does not match its records",
    "E011": "manifest chain broken: prev does not match the digest of the previous manifest (a manifest was edited)",
    "E012": "manifest missing: a gap in the sequence numbers (a manifest was removed)",
    "E013": "manifest misnamed: the seq in its header is not the seq in its file name (inserted or renamed)",
    "E014": "foreign file in manifests/: a name that is not a manifest name (inserted by hand)",
    "E015": "HEAD does not match the last manifest: the last manifest was removed or edited, or HEAD was edited",
    "W016": "HEAD one behind a valid next manifest: ingest was interrupted at its commit point; "
            "re-running ingest finishes it",
    "E017": "HEAD missing: HEAD is missing or unreadable although manifests exist",
    "E018": "manifest of another study: its header names a different study",
    # objects
    "E020": "object corrupt: its bytes no longer hash to its name (bit rot, or an edit through a hardlink)",
    "E021": "object missing: a manifest refers to it but objects/ does not hold it",
    "E022": "object writable: it has write bits, and so has every tree name linked to it",
    "E023": "foreign file under objects/: not an object name, or not a regular file",
    "W024": "orphan object: no manifest refers to it (left by a failed or interrupted upload)",
    # tree
    "E030": "tree name missing: a version name or plain name is not in the tree (removed by hand)",
    "E031": "tree file replaced: the name is not a hardlink to the object of its version",
    "E032": "plain name stale: the plain name shows an older version, not the latest",
    "E033": "unexpected tree entry: a file, directory or symlink that no version accounts for (added by hand)",
    "E034": "tree directory writable: group or others could add, remove or rename names in it",
    "E035": "tree missing: the study's tree directory does not exist or is not a directory",
    "W036": "tree name not yet created: its upload is committed but not yet applied to the index "
            "(interrupted ingest; re-running ingest finishes it)",
    "E037": "tree directory unreadable: its entries could not be listed",
    # index
    "E040": "index out of step: it differs from an index rebuilt from the manifests",
    "E041": "index missing: the index is missing or unreadable although there are manifests",
    "W042": "index behind HEAD while an ingest catches it up: it has applied fewer manifests than HEAD names "
            "and an ingest holding the store lock is applying them",
    "E043": "index damaged: data.mdb is empty, cut short, not an LMDB file, or its pages are not as LMDB wrote "
            "them (disk damage, or an edit); readers refuse it",
    "E044": "index behind HEAD: it has applied fewer manifests than HEAD names and no ingest is applying "
            "them (an interrupted ingest, or an old copy put back); readers refuse it until ingest or "
            "'fsck --repair' catches it up",
    # leftovers
    "W050": "leftover temp file in the store: an entry in tmp/, or a temp name elsewhere, left by an interrupted write",
    "W051": "leftover temp file in the tree: a temp name left by an interrupted tree update",
    "W060": "tree and index not compared: the manifest chain is broken, so there is nothing sound to compare "
            "them with",
}

FATAL = frozenset({"E001", "E002"})
# Findings after which the manifests cannot be trusted as a whole: repair
# leaves the index and tree alone (they may hold the only record of what
# the damaged manifests said).
CHAIN_BROKEN = frozenset({"E010", "E011", "E012", "E013", "E015", "E018"})

_REF_LIMIT = 1000          # affected versions remembered per bad object
_SHOWN = 5                 # affected versions named in a detail text
_HASH_WINDOW = 64          # large objects queued ahead of the large-object hasher


@dataclass(frozen=True)
class Finding:
    code: str
    path: str               # for display (undecodable bytes as \xNN)
    detail: str
    severity: str           # "error" | "warning"
    raw: bytes | None = field(default=None, compare=False, repr=False)   # the real path
    data: Any = field(default=None, compare=False, repr=False)          # what repair needs

    @property
    def title(self) -> str:
        return CODES[self.code].split(":", 1)[0]

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def line(self) -> str:
        return f"{self.code} {self.title}: {self.path}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "path": self.path, "detail": self.detail}


class Findings(list):
    """The list :func:`check` returns; ``stats`` says what was looked at."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stats: dict[str, int] = {"manifests": 0, "objects": 0, "object_bytes": 0, "hashed_bytes": 0,
                                      "tree_entries": 0}

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self if f.is_error]


def finding(code: str, path: bytes | str, detail: str = "", data: Any = None) -> Finding:
    if code not in CODES:
        raise ValueError(f"unknown fsck code {code}")
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return Finding(code, layout.display(raw), detail, "error" if code.startswith("E") else "warning", raw, data)


Progress = Callable[[str, int, "int | None"], None]


def _no_progress(phase: str, done: int, total: int | None) -> None:
    pass


# =================================================================== check

def check(store: Store, quick: bool = False, progress: Progress | None = None,
          lock: bool = False) -> Findings:
    """Every problem found in *store* and its tree.

    *quick* skips re-hashing objects (sizes are still compared).
    *progress(phase, done, total)* is called from this thread, phases
    ``"manifests"`` (count), ``"tree"`` (entries), ``"objects"`` (bytes).

    Without *lock* (plain ``eidetic fsck``) no lock is taken: an ingest
    goes on beside the check, which looks at one snapshot of the index (a
    pinned LMDB read transaction) and HEAD as read just after it, and does
    not report what the ingest writes meanwhile (_Checker._settle).  *lock*
    holds the store lock while checking (``fsck --repair``: nothing moves
    between the check and the repair).
    """
    out = Findings()
    fatal = _check_marker(store)
    if fatal is not None:
        out.append(fatal)
        return out
    with _lock_if_possible(store) if lock else nullcontext(False) as held:
        _Checker(store, out, quick, progress or _no_progress, exclusive=bool(held)).run()
    return out


@contextmanager
def _lock_if_possible(store: Store) -> Iterator[bool]:
    """The store lock (yields True); a user who may only read the store (an
    auditor) checks without it (yields False)."""
    with ExitStack() as stack:
        try:
            stack.enter_context(store.lock())
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            yield False
            return
        yield True


def _check_marker(store: Store) -> Finding | None:
    marker = os.path.join(store.root, layout.STORE_MARKER)
    try:
        os.lstat(marker)
    except FileNotFoundError:
        what = "no such directory" if not os.path.isdir(store.root) else "no eidetic-store marker"
        return finding("E001", marker, f"{what}: run 'eidetic init' if this is a new store")
    except OSError as e:     # not "missing": init would not help; the store is the service user's
        return finding("E002", marker, f"{e.strerror}: run fsck as the service user (or root)")
    try:
        store.check_format()
    except StoreFormatError as e:
        return finding("E002", marker, str(e.kwargs.get("detail", e)))
    except OSError as e:
        return finding("E002", marker, e.strerror or str(e))
    return None


class _Checker:
    def __init__(self, store: Store, out: Findings, quick: bool, progress: Progress, exclusive: bool) -> None:
        self.store = store
        self.out = out
        self.quick = quick
        self.progress = progress
        self.exclusive = exclusive        # the store lock is held: nothing can change under the check
        self.start_ns = time.time_ns()    # what changed at or after this is a concurrent writer's
        self.broot = store.broot
        self.objects = store.objects
        self.tree_root = os.fsencode(store.tree)
        self.ipath = os.path.join(store.root, "index")
        self.broken = False
        self.real = None                  # live index (None: missing/unreadable/damaged)
        self.snap = None                  # the one read transaction pinned on it for the whole check
        self.real_applied = 0
        self.real_partial: tuple[int, int, int] | None = None
        self.fresh = None
        self.fresh_dir: str | None = None
        self.head_seq = 0
        self.head_digest: str | None = None
        self.head_ok = True
        self.head_readable = True
        self.head_error: StoreFormatError | None = None
        self.hasher: _Rehasher | _LocalRehasher | None = None     # None: --quick (sizes only)
        self.stop = 0                           # the last manifest of the chain HEAD names
        self.index_missing = False
        self.behind = False                     # the live index has applied fewer manifests than HEAD
        self.scan: _TreeScan | None = None
        self.big = False                        # many objects: a re-hashing process pays off

    def add(self, code: str, path: bytes | str, detail: str = "", data: Any = None) -> None:
        self.out.append(finding(code, path, detail, data))

    # ------------------------------------------------------------ driver

    def run(self) -> None:
        for d in ("objects", "manifests", "tmp"):
            p = os.path.join(self.store.root, d)
            if not os.path.isdir(p):
                self.add("E003", p, "'fsck --repair' re-creates it" if d == "tmp" else
                         "'fsck --repair' re-creates it empty; what it held must come from a backup")
        self.big = _many_objects(self.objects)
        if not self.quick and os.path.isdir(os.path.join(self.store.root, "objects")):
            if self.big:
                try:
                    self.hasher = _Rehasher(self.objects)
                except OSError:        # no interpreter to start (embedded Python): do it here
                    self.big = False
            if self.hasher is None:
                self.hasher = _LocalRehasher(self.objects)
        try:
            self._open_indexes()
            self._check_chain_and_tree()
            if self.hasher is None:
                count, need = _merge_objects(self.objects, self.fresh, True, self._object_finding)
                self.out.stats["objects"], self.out.stats["object_bytes"] = count, need
            else:
                self._finish_rehash()
            self._check_temps()
            self._settle()
            self.out.sort(key=lambda f: (f.code, f.path))
        finally:
            if self.hasher is not None:
                self.hasher.close()
            if self.snap is not None:
                self.snap.abort()
            if self.real is not None:
                self.real.close()
            if self.fresh is not None:
                self.fresh.close()
            if self.fresh_dir is not None:
                shutil.rmtree(self.fresh_dir, ignore_errors=True)

    def _fresh_ready(self) -> None:
        """The fresh index is complete: a child re-hasher may merge objects/ with it now."""
        if isinstance(self.hasher, _Rehasher) and not self.hasher.requested:
            self.hasher.request(self.fresh.path)

    def _finish_rehash(self) -> None:
        """Collect the re-hash.  A child process is handed the fresh index (it
        merges objects/ with it); for a thread this thread does the merge."""
        hasher = self.hasher
        assert hasher is not None
        child = isinstance(hasher, _Rehasher)
        if child:
            self._fresh_ready()
        else:
            self.out.stats["objects"], self.out.stats["object_bytes"] = \
                _merge_objects(self.objects, self.fresh, False, self._object_finding)
        total = None if self.progress is _no_progress else sum(size for _, size in self.fresh.iter_objects())
        while hasher.is_alive():
            hasher.join(0.1)
            self.progress("objects", hasher.bytes_done, total)
        if hasher.error is not None:
            raise hasher.error
        self.progress("objects", hasher.bytes_done, total)
        self.out.stats["hashed_bytes"] = hasher.bytes_done
        for code, oid, path, detail in hasher.results:
            self._object_finding(code, oid, path, detail)
        if child:
            self.out.stats["objects"], self.out.stats["object_bytes"] = hasher.counts

    def _open_indexes(self) -> None:
        """The fresh index (in the system's temp directory: plain fsck writes
        nothing into the store) and the live one, with one read transaction
        pinned on it: every look at the live index is this one snapshot
        (LMDB's MVCC), however an ingest goes on meanwhile."""
        from ..store.index import Index   # lmdb only when needed

        self.fresh_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "fsck-")
        self.fresh = Index(os.path.join(self.fresh_dir, "index"), durable=False,   # thrown away: no fsyncs
                           study=self.store.name)
        ipath = self.ipath
        try:
            real = Index(ipath, study=self.store.name, create=False, write=False)
        except IndexUnusable as e:
            detail = str(e.kwargs["detail"])
            if detail == "its index is missing":
                self.index_missing = True      # an error only if there are manifests to index
            else:
                self.add("E043", ipath, f"{_what_damage(e)}; 'fsck --repair' rebuilds it from the manifests")
            return
        except EideticError as e:   # cannot open it: permissions, or the disk
            msg = str(e.kwargs.get("detail", e))
            # LMDB opens need write access (lock.mdb): a reader who lacks it has a sound index
            fix = "'fsck --repair' rebuilds it from the manifests" if os.access(ipath, os.W_OK) else \
                "run fsck as the service user (or root) to check it"
            self.add("E041", ipath, f"{msg}; {fix}")
            return
        self.real = real
        try:
            self.snap = real.begin_read()
            if not self._pages_sound():
                return
            st = real.state(txn=self.snap)
        except IndexUnusable as e:
            self._damaged(e)
            return
        self.real_applied, self.real_partial = st.applied, st.partial

    def _pages_sound(self) -> bool:
        """lmdb's offline verifier over data.mdb: LMDB itself aborts the
        process on some damage, so nothing reads the live index through LMDB
        before this says it is sound.  Pages reachable from the newest meta
        cannot be reused while the snapshot is pinned, so a concurrent ingest
        cannot make it see damage; a meta page torn by a commit during the
        walk can, so problems count only if no commit happened meanwhile."""
        real = self.real
        assert real is not None
        for _ in range(3):
            before = real.last_txnid()
            problems = real.verify_structure()
            if not problems:
                return True
            if self.exclusive or real.last_txnid() == before:
                more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
                self.add("E043", self.ipath, f"its pages are not as LMDB wrote them ({problems[0]}{more}); "
                                             "'fsck --repair' rebuilds it from the manifests")
                self._drop_live()
                return False
        return True     # it kept changing under an ingest: the comparison still finds real damage

    def _damaged(self, e: IndexUnusable) -> None:
        self.add("E043", self.ipath, f"{_what_damage(e)}; 'fsck --repair' rebuilds it from the manifests")
        self._drop_live()

    def _drop_live(self) -> None:
        if self.snap is not None:
            self.snap.abort()
            self.snap = None
        self.real = None

    # ------------------------------------------------------------ manifests

    def _manifest_seqs(self) -> list[int]:
        """Manifest sequence numbers in manifests/; those past HEAD (as read
        at the start) that were committed after the check began are left out:
        an ingest made them, and this check is of the store as it was."""
        mdir = os.path.join(self.broot, b"manifests")
        seqs = []
        try:
            names = os.listdir(mdir)
        except FileNotFoundError:
            return []
        for name in names:
            p = mdir + b"/" + name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if is_temp_name(name):
                self.add("W050", p, "temp file of an interrupted manifest write")
                continue
            seq = layout.parse_manifest_name(name.decode("ascii", "replace"))
            if seq is None or not stat.S_ISREG(st.st_mode):
                self.add("E014", p, "not a manifest" if seq is None else "not a regular file",
                         data={"store_rel": b"manifests/" + name})
                continue
            if seq > self.head_seq and st.st_ctime_ns >= self.start_ns and not self.exclusive:
                continue
            seqs.append(seq)
        seqs.sort()
        return seqs

    def _take_head(self) -> None:
        try:
            self.head_seq, self.head_digest = self.store.head()
        except StoreFormatError as e:
            self.head_seq, self.head_digest = 0, None
            self.head_readable = False
            self.head_error = e

    def _judge_head(self, have_manifests: bool) -> None:
        hp = os.path.join(self.store.root, "HEAD")
        if not self.head_readable:
            if have_manifests:
                self.add("E017", hp, "HEAD is unreadable; 'fsck --repair' rewrites it from the manifests")
            else:
                self.add("E015", hp, "HEAD is unreadable and there are no manifests")
            return
        if self.head_seq == 0 and have_manifests and not os.path.exists(hp):
            self.add("E017", hp, "HEAD is missing; 'fsck --repair' rewrites it from the manifests")

    def _check_chain_and_tree(self) -> None:
        self._take_head()               # after the snapshot was pinned, before manifests/ is listed
        seqs = self._manifest_seqs()
        self._judge_head(bool(seqs))
        if self.index_missing and seqs:
            self.add("E041", self.ipath, "no index: 'fsck --repair' rebuilds it from the manifests")
        last = seqs[-1] if seqs else 0
        hp = os.path.join(self.store.root, "HEAD")
        head_known = self.head_seq > 0
        if head_known and self.head_seq > last:
            self.head_ok = False
            self.add("E015", hp, f"HEAD names manifest {self.head_seq} but " +
                     (f"the last manifest is {last}: manifests after {last} were removed" if last else
                      "there are no manifests: they were removed"))
            self.broken = True
        elif not head_known and seqs and self.head_readable and os.path.exists(hp):
            self.head_ok = False
            self.add("E015", hp, f"HEAD names no manifest but manifests go up to {last}")
            self.broken = True
        elif head_known and self.head_seq < last - 1:
            self.head_ok = False
            self.add("E015", hp, f"HEAD names manifest {self.head_seq} but manifests go up to {last}")
            self.broken = True
        stop = self.stop = self.head_seq if head_known and self.head_seq <= last else last
        beyond = [s for s in seqs if s > stop]

        state = _ChainState()
        index_compared = False
        for seq in seqs:
            if seq > stop:
                break
            if not index_compared and state.applied == self.real_applied:
                index_compared = True
                self._compare_index(seq)
            self._replay(seq, state, len(seqs))
        if head_known and self.head_seq == stop and state.digests.get(stop) is not None \
                and state.digests[stop] != self.head_digest:
            self.head_ok = False
            self.broken = True
            self.add("E015", hp, f"HEAD records digest {self.head_digest} but manifest {stop} hashes to "
                                 f"{state.digests[stop]}: manifest {stop} (or HEAD) was edited")
        if not index_compared:
            if state.applied == self.real_applied:
                self._compare_index(None)
            elif self.real is not None and not self.broken:
                self.add("E040", self.ipath, f"the index has applied {self.real_applied} manifest(s) but HEAD "
                                             f"names {stop}; 'fsck --repair' rebuilds it")
        if not beyond:
            self._fresh_ready()      # the child merges objects/ while this process checks the tree

        if self.broken:
            self.add("W060", self.tree_root, "fix the manifest chain first (restore the damaged manifests "
                                             "from a backup)")
        else:
            self._check_tree()

        # Manifests past HEAD: only their object references still matter.
        for seq in beyond:
            self._replay(seq, state, len(seqs))
        self._fresh_ready()
        if beyond and self.head_ok and head_known and beyond == [stop + 1]:
            nxt = stop + 1
            if state.valid.get(nxt):
                self.add("W016", self.store.manifest_path(nxt),
                         f"HEAD names manifest {stop}; manifest {nxt} was committed but HEAD not yet advanced: "
                         "re-running 'eidetic ingest' (or 'fsck --repair') finishes that upload",
                         data={"seq": nxt})
            else:
                self.add("E015", hp, f"HEAD names manifest {stop} and manifest {nxt} after it is not a valid "
                                     "continuation of the chain")
        self.out.stats["manifests"] = len(seqs)

    def _replay(self, seq: int, state: "_ChainState", total: int) -> None:
        """Validate manifest *seq* against the chain and apply it to the fresh index."""
        from ..store.manifest import ManifestReader

        path = self.store.manifest_path(seq)
        bpath = os.fsencode(path)
        if seq != state.expected:
            gap = f"manifest {state.expected}" if seq == state.expected + 1 else \
                f"manifests {state.expected} to {seq - 1}"
            self.add("E012", self.store.manifest_path(state.expected),
                     f"{gap} missing: removed by hand? (the chain goes on at {seq})")
            self.broken = True
            state.prev = None
            state.prev_known = False
        state.expected = seq + 1
        try:
            r = ManifestReader(path)
            r.close()
        except (IntegrityError, OSError) as e:
            self.add("E010", bpath, _why(e, path))
            self.broken = True
            state.prev_known = False
            return
        h = r.header
        if h.seq != seq:
            self.add("E013", bpath, f"its header says seq {h.seq}: a copy or an inserted manifest")
            self.broken = True
            state.prev_known = False
            return
        ok = True
        if h.study != self.store.name:
            self.add("E018", bpath, f"it belongs to study {h.study!r}")
            self.broken = True
            ok = False
        if state.prev_known and h.prev != state.prev:
            before = f"manifest {seq - 1} hashes to {state.prev}" if state.prev else "it is the first manifest"
            self.add("E011", bpath, f"its prev is {h.prev} but {before}: manifest {seq - 1} (or this one's "
                                    "header) was edited")
            self.broken = True
            ok = False
        if state.applied != seq - 1:
            _force_applied(self.fresh, seq - 1)
        try:
            self.fresh.apply_manifest(path)
        except (IntegrityError, OSError) as e:
            self.add("E010", bpath, _why(e, path))
            self.broken = True
            state.prev_known = False
            return
        summary = self.fresh.upload(seq) or {}
        digest = summary.get("digest")
        state.applied = seq
        state.digests[seq] = digest
        state.prev, state.prev_known = digest, True
        state.valid[seq] = ok
        self.progress("manifests", seq, total)

    def _compare_index(self, next_seq: int | None) -> None:
        """The pinned snapshot of the live index against the fresh one, which
        has applied as many manifests.  An ingest caught half-way through
        manifest *next_seq* left `partial` (records applied so far): the fresh
        index applies that manifest up to the same record first, so the two
        compare exactly (its apply goes on from there afterwards)."""
        if self.real is None or self.broken:
            return
        if self.real_partial is not None and next_seq is not None and self.real_partial[0] == next_seq:
            try:
                self.fresh.apply_manifest(self.store.manifest_path(next_seq), stop_after=self.real_partial[1])
            except (IntegrityError, OSError):
                pass       # the replay reports the manifest; the indexes then differ
        try:
            diff = _first_difference(self.real, self.fresh, self.snap)
        except IndexUnusable as e:   # LMDB met damage while reading it
            self._damaged(e)
            return
        if diff is not None:
            self.add("E040", self.ipath, f"{diff}; 'fsck --repair' rebuilds it")
        elif self.real_applied < self.stop:
            self.behind = True          # judged at the end (_settle): an ingest may be applying it

    # ----------------------------------------------------------------- tree

    def _check_tree(self) -> None:
        """The tree against the fresh index at HEAD (what the manifests say),
        in this process."""
        root = self.tree_root
        try:
            st = os.lstat(root)
        except FileNotFoundError:
            self.add("E035", root, "'fsck --repair' re-creates it")
            return
        if not stat.S_ISDIR(st.st_mode):
            self.add("E035", root, "not a directory")
            return
        self.scan = _TreeScan(self, root, st)
        self.scan.run()
        self.out.stats["tree_entries"] = self.scan.entries

    def missing_name(self, rel: bytes, v, kind: str) -> None:
        pending = v.seq > self.real_applied and self.real is not None
        code, detail = _missing_detail(v, kind, pending, self.objects)
        self.add(code, self.tree_root + b"/" + rel, detail, data={"rel": rel, "seq": v.seq})

    # -------------------------------------------------------------- objects

    def _object_finding(self, code: str, oid: str, path: bytes, detail: str) -> None:
        data = None
        if code in ("E020", "E021", "E022") and layout.valid_object_id(oid):
            versions, total = _affected(self.fresh, oid)
            data = {"oid": oid, "versions": versions, "total": total}
            if versions:
                used = "used by " + _name_versions(versions, total, _SHOWN)
                detail = f"{detail}; {used}" if detail else used
            else:
                described = _description_of(self.fresh, oid)
                if described:
                    data["description"] = described
                    detail = f"{detail}; {described}" if detail else described
        if code == "W024":
            data = {"oid": oid}
        if code == "E023":
            data = {"store_rel": path[len(self.broot) + 1:]}
        self.add(code, path, detail, data=data)

    # ---------------------------------------------------------------- temps

    def _check_temps(self) -> None:
        tmp = os.path.join(self.broot, b"tmp")
        try:
            names = sorted(os.listdir(tmp))
        except FileNotFoundError:
            names = []
        for name in names:
            self.add("W050", tmp + b"/" + name, "left by an interrupted write")
        for name in sorted(os.listdir(self.broot)):
            if is_temp_name(name):
                self.add("W050", self.broot + b"/" + name, "left by an interrupted write")

    # ------------------------------------------------------ a running ingest

    def _settle(self) -> None:
        """Drop what an ingest running beside this check explains.

        Plain fsck takes no lock, so an ingest may write while it runs: new
        objects, temp files, tree names, a manifest and HEAD.  A finding of
        a kind such writes can cause is dropped when its file changed at or
        after the check began (inode ctime), or when a fresh look at the end
        accounts for it: manifests committed meanwhile are replayed into the
        fresh index first, and while the store lock is still held what the
        upload in progress wrote since the last commit is its own."""
        behind = self.behind
        if self.exclusive:
            if behind:
                self._report_behind(busy=False)
            return
        suspects = [f for f in self.out if f.code in _CONCURRENT]
        if not suspects and not behind:
            return
        busy = self.store.lock_busy()
        self._replay_committed_since()
        try:
            head_ctime = os.lstat(os.path.join(self.store.root, "HEAD")).st_ctime_ns
        except OSError:
            head_ctime = 0
        live_now = self._live_applied_now()
        explained = {id(f) for f in suspects if self._explained(f, busy, head_ctime, live_now)}
        self.out[:] = [f for f in self.out if id(f) not in explained]
        if behind and live_now < self.stop:
            self._report_behind(busy, live_now)

    def _report_behind(self, busy: bool, applied: int | None = None) -> None:
        applied = self.real_applied if applied is None else applied
        if busy:
            if self.stop - applied > 1:     # an ingest is catching the index up
                self.add("W042", self.ipath, f"the index has applied {applied} of {self.stop} manifest(s) and "
                                             "an ingest holding the store lock is applying the rest")
            return                          # one behind: the upload being applied right now
        self.add("E044", self.ipath, f"the index has applied {applied} of {self.stop} manifest(s) and no ingest "
                                     "is applying the rest, so 'eidetic log' and checkout refuse it; "
                                     "'eidetic ingest' or 'fsck --repair' catches it up")

    def _replay_committed_since(self) -> None:
        """Manifests committed since HEAD was read, into the fresh index (so
        their objects and tree names are accounted for)."""
        if self.broken:
            return
        try:
            head2, _ = self.store.head()
        except StoreFormatError:
            return
        applied = self.fresh.applied()[0]
        for seq in range(max(applied, self.stop) + 1, head2 + 1):
            try:
                self.fresh.apply_manifest(self.store.manifest_path(seq))
            except (IntegrityError, OSError, StoreFormatError):
                return

    def _live_applied_now(self) -> int:
        """How many manifests the live index has applied now (a fresh transaction)."""
        if self.real is None:
            return self.real_applied
        try:
            return self.real.state().applied
        except EideticError:
            return self.real_applied

    def _explained(self, f: Finding, busy: bool, head_ctime: int, live_now: int) -> bool:
        raw = f.raw or b""
        if f.code == "W036":                     # the ingest applying its manifest places it
            return busy or os.path.lexists(raw)
        if f.code == "W016":                     # the ingest at its commit point advances HEAD
            return busy or self._head_now() >= (f.data or {}).get("seq", 0)
        try:
            st = os.lstat(raw)
        except FileNotFoundError:
            return True                          # gone: it was in flight
        except OSError:
            return False
        if st.st_ctime_ns >= self.start_ns:
            return True                          # written after the check began
        if f.code == "W024":
            oid = (f.data or {}).get("oid") or ""
            if oid and self.fresh.is_trusted(oid):
                return True                      # a manifest committed meanwhile refers to it
            return busy and st.st_ctime_ns >= head_ctime    # the upload in progress wrote it
        if f.code in ("W050", "W051"):
            return busy                          # a writer's own temp file, while it writes
        if self.scan is None:
            return False
        if f.code == "E033":
            return self.scan.accounted_for(f)
        if f.code in ("E031", "E032"):
            return self.scan.shows_latest(f, st)
        return False

    def _head_now(self) -> int:
        try:
            return self.store.head()[0]
        except StoreFormatError:
            return 0


def _what_damage(e: IndexUnusable) -> str:
    """"its index is damaged (X)" as X: the finding's title already says damaged."""
    detail = str(e.kwargs["detail"])
    inner = detail.removeprefix("its index is damaged (")
    return inner[:-1] if inner != detail and inner.endswith(")") else detail


# Findings an ingest writing beside a lock-free check can cause.
_CONCURRENT = frozenset({"W016", "W024", "W036", "W050", "W051", "E031", "E032", "E033"})


def _missing_detail(v, kind: str, pending: bool, objects: ObjectStore) -> tuple[str, str]:
    """(code, detail) for a missing tree name of version *v*; *pending*: its manifest is not yet
    applied to the live index (an interrupted ingest, W036)."""
    what = f"version {v.n} of {layout.display(v.path)}" if kind == "version" else \
        f"plain name of {layout.display(v.path)} (latest: version {v.n})"
    if pending:
        return "W036", f"{what}, from manifest {v.seq} which the index has not applied yet"
    return "E030", what + ("" if objects.exists(v.blake3) else "; its object is missing too")


def _merge_objects(objects: ObjectStore, fresh, check_stat: bool,
                   emit: Callable[[str, str, bytes, str], None]) -> tuple[int, int]:
    """Names under objects/ against the objects the manifests need: two
    sorted streams, merged (nothing held in memory).  *check_stat* adds
    what lstat can tell (type, write bits, size) when nothing re-hashes.
    Returns (object files, bytes the manifests need)."""
    idx_iter = fresh.iter_objects()
    cur = next(idx_iter, None)
    cur_seen = False
    need_bytes = 0
    count = 0
    for oid, twin, path in objects.iter_files():
        if not oid:
            if is_temp_name(path.rpartition(b"/")[2]):
                emit("W050", "", path, "temp file of an interrupted object write")
            else:
                emit("E023", "", path, "not an object name")
            continue
        count += 1
        while cur is not None and cur[0] < oid:
            need_bytes += cur[1]
            if not cur_seen:
                emit("E021", cur[0], objects.path(cur[0]), "")
            cur, cur_seen = next(idx_iter, None), False
        referenced = cur is not None and cur[0] == oid
        cur_seen = cur_seen or referenced
        if not referenced:
            emit("W024", oid, path, "referenced by no manifest; harmless, it only takes space")
        if check_stat:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            bad = _object_stat_problem(st)
            if bad is not None:
                emit(bad[0], oid, path, bad[1])
            elif referenced and st.st_size != cur[1]:
                emit("E020", oid, path, f"size {st.st_size}, recorded {cur[1]}")
    while cur is not None:
        need_bytes += cur[1]
        if not cur_seen:
            emit("E021", cur[0], objects.path(cur[0]), "")
        cur, cur_seen = next(idx_iter, None), False
    return count, need_bytes


@dataclass
class _ChainState:
    expected: int = 1
    applied: int = 0
    prev: str | None = None
    prev_known: bool = True
    digests: dict = field(default_factory=dict)   # seq -> digest (one entry per manifest)
    valid: dict = field(default_factory=dict)


def _why(e: Exception, path: str) -> str:
    if isinstance(e, EideticError):
        text = str(e.kwargs.get("detail", e))
        return text.replace(f"manifest {path}", "", 1).lstrip(": ") or text   # the finding names the file
    return getattr(e, "strerror", None) or str(e)


def _object_stat_problem(st: os.stat_result) -> tuple[str, str] | None:
    if not stat.S_ISREG(st.st_mode):
        return "E023", "not a regular file"
    if st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return "E022", f"mode {stat.S_IMODE(st.st_mode):04o}"
    return None


def _with_last(it: Iterator) -> Iterator[tuple[Any, bool]]:
    """(version, is the last version of its path) for a stream sorted by path."""
    prev = None
    for v in it:
        if prev is not None:
            yield prev, prev.path != v.path
        prev = v
    if prev is not None:
        yield prev, True


# ----------------------------------------------------------- index helpers
#
# fsck reads two things the Index API does not offer (which versions use an
# object; forcing the applied counter of its *private* rebuild past a gap).

def _affected(idx, oid: str, limit: int = _REF_LIMIT) -> tuple[list[tuple[bytes, int, str]], int]:
    """(path, version, stamp) of the versions using *oid* (up to *limit*), and their number."""
    from ..store.index import _decode_version

    out: list[tuple[bytes, int, str]] = []
    total = 0
    with idx.env.begin() as txn:
        cur = txn.cursor(db=idx.refs)
        if cur.set_key(bytes.fromhex(oid)):
            total = cur.count()
            for vkey in cur.iternext_dup():      # each is a key of the versions database
                if len(out) >= limit:
                    break
                value = txn.get(vkey, db=idx.versions)
                if value is not None:
                    v = _decode_version(bytes(vkey), bytes(value))
                    out.append((v.path, v.n, v.stamp))
    return out, total


def _description_of(idx, oid: str) -> str | None:
    """"the upload description of upload X (manifest N)" when *oid* is one (the
    objects database names the first manifest that referenced it)."""
    with idx.env.begin() as txn:
        v = txn.get(bytes.fromhex(oid), db=idx.objects)
    if v is None:
        return None
    seq = struct.unpack(">QQ", v)[1]
    summary = idx.upload(seq) or {}
    if (summary.get("description") or {}).get("blake3") != oid:
        return None
    return f"the upload description of upload {summary.get('upload')} (manifest {seq}), kept as the sender's claim"


def _force_applied(idx, seq: int) -> None:
    """Let a private rebuild go on past a broken link of the chain."""
    with idx.env.begin(write=True) as txn:
        txn.put(b"applied", struct.pack(">Q", seq), db=idx.meta)
        txn.delete(b"partial", db=idx.meta)


def _first_difference(real, fresh, txn=None) -> str | None:
    """The first entry in which *real* (read in *txn*, if given) and *fresh* differ."""
    for a, b in zip_longest(real.dump(txn), fresh.dump()):
        if a == b:
            continue
        if a is None:
            return f"the index lacks {b[0]} entry {_short(b[1])}"
        if b is None:
            return f"the index has an extra {a[0]} entry {_short(a[1])}"
        if a[:2] == b[:2]:
            return f"{a[0]} entry {_short(a[1])} holds {_short(a[2])}, a rebuild gives {_short(b[2])}"
        return f"first difference in {a[0]}/{b[0]}: {_short(a[1])} vs {_short(b[1])}"
    return None


def _short(b: bytes, n: int = 60) -> str:
    r = repr(bytes(b))
    return r if len(r) <= n else r[: n - 3] + "..."


# --------------------------------------------------------------- tree walk

class _Dir:
    """One tree directory while the scan is inside it."""

    __slots__ = ("src", "rel", "abs", "dev", "entries", "state", "pending_plain", "plain_is_dir")

    def __init__(self, src: bytes, rel: bytes, abs_: bytes, dev: int) -> None:
        self.src = src                # source directory path (b"" = the study's root)
        self.rel = rel                # its tree path relative to the tree root
        self.abs = abs_
        self.dev = dev
        self.entries: dict = {}       # name -> DirEntry, each popped when a version accounts for it
        self.state = "listed"         # | "missing" (names in it are missing) | "unknown" (unreadable)
        self.pending_plain: dict = {}     # plain name not found (yet: may be a directory) -> latest version
        self.plain_is_dir: dict = {}      # file's plain name found as a directory -> latest version

    def rel_of(self, name: bytes) -> bytes:
        return self.rel + b"/" + name if self.rel else name


class _TreeScan:
    """The tree against the index, as one merge of two streams.

    The index lists versions in key order, which is a depth-first order of
    the uploaded paths (everything under ``d/`` is contiguous).  The scan
    keeps a stack of the tree directories it is inside; each is listed once
    (``scandir``: names, kinds and inode numbers in one go) and every
    expected name is popped from its listing.  A name not in the listing is
    missing; whatever is left when the scan leaves a directory is a name no
    version accounts for.  Per path: no index lookup, one lstat (of the
    object, to compare inode numbers), and memory for one listing per level.
    """

    def __init__(self, ck: _Checker, root: bytes, root_st: os.stat_result) -> None:
        self.ck = ck
        self.idx = ck.fresh
        self.root = root
        self.root_st = root_st
        self.entries = 0
        self.closed: set[bytes] = set()    # source dirs already left (only a key order anomaly revisits one)
        self.obj_root = ck.objects.root + b"/objects/"
        self._last_oid = ""
        self._last_ids: tuple[int, int] | None = None

    def run(self) -> None:
        top = _Dir(b"", b"", self.root, self.root_st.st_dev)
        self._dir_mode(self.root, self.root_st)
        self._list(top)
        stack = [top]
        group: list = []
        for v in self.idx.iter_versions():
            if group and group[-1].path != v.path:
                self._path(stack, group)
                group = []
            group.append(v)
        if group:
            self._path(stack, group)
        while stack:
            self._close(stack.pop())

    # ------------------------------------------------------------ directories

    def _list(self, d: _Dir) -> None:
        try:
            with os.scandir(d.abs) as it:
                d.entries = {e.name: e for e in it}
        except FileNotFoundError:
            d.state = "missing"
            return
        except OSError as e:
            self.ck.add("E037", d.abs, e.strerror or str(e))
            d.state = "unknown"
            return
        self.entries += len(d.entries)
        self.ck.progress("tree", self.entries, None)

    def _dir_mode(self, path: bytes, st: os.stat_result) -> None:
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            self.ck.add("E034", path, f"mode {stat.S_IMODE(st.st_mode):04o}: others could add, remove or "
                                      "rename names")

    def _dir_for(self, stack: list, src: bytes) -> _Dir | None:
        """The stack moved to source directory *src*; None if the key order came back to a directory
        already left (then the path is checked on its own)."""
        while True:
            top = stack[-1]
            if top.src == src or not top.src or src.startswith(top.src + b"/"):
                break
            self._close(stack.pop())
        if top.src == src:
            return top
        rest = src[len(top.src) + 1:] if top.src else src
        for comp in rest.split(b"/"):
            child = top.src + b"/" + comp if top.src else comp
            if child in self.closed:
                return None
            top = self._open(top, comp, child)
            stack.append(top)
        return top

    def _open(self, parent: _Dir, comp: bytes, src: bytes) -> _Dir:
        pn = layout.plain_name(comp)
        parent.pending_plain.pop(pn, None)       # a file's plain name that is (rightly) this directory
        parent.plain_is_dir.pop(pn, None)
        d = _Dir(src, parent.rel_of(pn), parent.abs + b"/" + pn, parent.dev)
        if parent.state != "listed":
            d.state = parent.state
            return d
        e = parent.entries.pop(pn, None)
        if e is None:
            d.state = "missing"
        elif not e.is_dir(follow_symlinks=False):
            self.ck.add("E031", e.path, f"a {_kind(e)} where the directory {layout.display(src)} belongs",
                        data={"rel": d.rel})
            d.state = "missing"
        else:
            st = e.stat(follow_symlinks=False)
            d.dev = st.st_dev
            self._dir_mode(e.path, st)
            self._list(d)
        return d

    def _close(self, d: _Dir) -> None:
        self.closed.add(d.src)
        if d.state == "unknown":
            return
        for pn, v in d.pending_plain.items():
            self.ck.missing_name(d.rel_of(pn), v, "plain")
        for name in sorted(d.entries):
            e = d.entries[name]
            v = d.plain_is_dir.get(name)
            if v is not None:
                self.ck.add("E031", e.path, f"a directory where {layout.display(v.path)} (version {v.n}) "
                                            "belongs", data={"rel": d.rel_of(name)})
            else:
                self._leftover(d, name, e)

    # ---------------------------------------------------------------- names

    def _path(self, stack: list, vs: list) -> None:
        """All versions *vs* of one path (oldest first)."""
        latest = vs[-1]
        head, _, comp = latest.path.rpartition(b"/")
        d = stack[-1]
        if d.src != head:
            d = self._dir_for(stack, head)
            if d is None:
                self._path_alone(vs)
                return
        if d.state == "unknown":
            return
        entries = d.entries
        version_name = layout.version_name
        for v in vs:
            vn = version_name(comp, v.n, v.stamp)
            e = entries.pop(vn, None)
            if e is None:
                self.ck.missing_name(d.rel_of(vn), v, "version")
            else:
                self._judge_file(e, d, d.rel_of(vn), v)
        pn = layout.plain_name(comp)
        e = entries.get(pn)
        if e is None:
            d.pending_plain[pn] = latest          # missing, unless the path is also a directory
            return
        if e.is_dir(follow_symlinks=False):
            d.plain_is_dir[pn] = latest           # right if the path is also a directory
            return
        del entries[pn]
        if not e.is_file(follow_symlinks=False):
            self.ck.add("E031", e.path, f"a {_kind(e)} where {layout.display(latest.path)} (version "
                                        f"{latest.n}) belongs", data={"rel": d.rel_of(pn)})
            return
        ino = e.inode()
        if self._is_object(ino, d.dev, latest.blake3) is not False:
            return
        older = next((o for o in reversed(vs[:-1]) if self._is_object(ino, d.dev, o.blake3)), None)
        if older is not None:
            self.ck.add("E032", e.path, f"shows version {older.n}, the latest is {latest.n}",
                        data={"rel": d.rel_of(pn), "path": latest.path})
        else:
            self.ck.add("E031", e.path, f"the latest version ({latest.n}) is object {latest.blake3}",
                        data={"rel": d.rel_of(pn), "path": latest.path})

    def _is_object(self, ino: int, dev: int, oid: str) -> bool | None:
        """Is (dev, ino) the object *oid* (or a twin)?  None when the object is missing (E021 says so).
        The last answer is remembered: a path's version name and plain name ask about one object."""
        if oid == self._last_oid:
            want = self._last_ids
        else:
            try:
                st = os.lstat(self.obj_root + oid[:2].encode() + b"/" + oid[2:].encode())
                want = (st.st_dev, st.st_ino)
            except FileNotFoundError:
                want = None
            self._last_oid, self._last_ids = oid, want
        if want is None:
            return None
        if want[1] == ino and want[0] == dev:
            return True
        return (dev, ino) in set(self.ck.objects.inode_ids(oid))      # a twin (hardlink limit)

    def _path_alone(self, vs: list) -> None:
        """A path met after its directory was left (a key order anomaly of very long paths): its names
        were judged one by one when the directory was left; only missing ones remain to report."""
        latest = vs[-1]
        for v in vs:
            rel = layout.version_relpath(v.path, v.n, v.stamp)
            if not os.path.lexists(self.root + b"/" + rel):
                self.ck.missing_name(rel, v, "version")
        rel = layout.tree_relpath(latest.path)
        if not os.path.lexists(self.root + b"/" + rel):
            self.ck.missing_name(rel, latest, "plain")

    # ------------------------------------------------- looked at again (_settle)

    def accounted_for(self, f: Finding) -> bool:
        """Does the index (since caught up with manifests committed during the
        check) now account for the entry of E033 finding *f*?"""
        rel, src = f.data.get("rel"), f.data.get("src")
        if rel is None or src is None:
            return False
        head, _, name = rel.rpartition(b"/")
        d = _Dir(src, head, b"", 0)
        if os.path.isdir(f.raw) and not os.path.islink(f.raw) and self._is_source_dir(d, name, rel):
            return True
        return self._lookup(d, name, rel) is not None

    def shows_latest(self, f: Finding, st: os.stat_result) -> bool:
        """Does the plain name of E031/E032 finding *f* (now *st*) show the latest version now?"""
        path = (f.data or {}).get("path")
        if path is None or not stat.S_ISREG(st.st_mode):
            return False
        v = self.idx.latest(path)
        return v is not None and self._is_object(st.st_ino, st.st_dev, v.blake3) is True

    def _leftover(self, d: _Dir, name: bytes, e) -> None:
        """A name no version popped: a temp name, a hand-made entry, or (rarely) the name of a path
        the key order has not reached here; the index decides."""
        rel = d.rel_of(name)
        if is_temp_name(name):
            self.ck.add("W051", e.path, "left by an interrupted tree update", data={"rel": rel})
            return
        if e.is_dir(follow_symlinks=False) and self._is_source_dir(d, name, rel):
            return
        v = self._lookup(d, name, rel)
        if v is None:
            self.ck.add("E033", e.path, f"a {_kind(e)} no version accounts for", data={"rel": rel, "src": d.src})
        else:
            self._judge_file(e, d, rel, v)

    def _judge_file(self, e, d: _Dir, rel: bytes, v) -> None:
        """The tree name *e* of version *v*: a hardlink to its object, or E031."""
        if not e.is_file(follow_symlinks=False):
            self.ck.add("E031", e.path, f"a {_kind(e)} where version {v.n} of {layout.display(v.path)} belongs",
                        data={"rel": rel})
        elif self._is_object(e.inode(), d.dev, v.blake3) is False:
            self.ck.add("E031", e.path, f"version {v.n} of {layout.display(v.path)} should be object {v.blake3}",
                        data={"rel": rel})

    def _is_source_dir(self, d: _Dir, name: bytes, rel: bytes) -> bool:
        orig = layout.unplain_name(name)
        if orig is None:
            r = self.idx.resolve_cut(rel)
            path = r[0] if r is not None and r[1] is None else None
        else:
            path = d.src + b"/" + orig if d.src else orig
        return path is not None and self.idx.has_dir(path)

    def _lookup(self, d: _Dir, name: bytes, rel: bytes):
        """The version a tree name stands for, by index lookups (slow path)."""
        idx = self.idx
        prefix = d.src + b"/" if d.src else b""
        parsed = layout.parse_version_name(name)
        if parsed is not None:
            orig, n, stamp = parsed
            if orig is None:
                r = idx.resolve_cut(rel)
                if r is None or r[1] is None:
                    return None
                path, n = r
                orig = path.rpartition(b"/")[2]
            else:
                path = prefix + orig
            try:
                v = idx.version(path, n)
                if v is None or v.stamp != stamp or layout.version_relpath(path, n, stamp) != rel:
                    return None
            except ValueError:
                return None
            return v
        orig = layout.unplain_name(name)
        if orig is None:
            r = idx.resolve_cut(rel)
            if r is None or r[1] is not None:
                return None
            path = r[0]
        else:
            path = prefix + orig
        try:
            if layout.tree_relpath(path) != rel or idx.has_dir(path):
                return None
        except ValueError:
            return None
        return idx.latest(path)


def _kind(e) -> str:
    if e.is_symlink():
        return "symlink"
    if e.is_dir(follow_symlinks=False):
        return "directory"
    if e.is_file(follow_symlinks=False):
        return "file"
    return "special file"


# ------------------------------------------------------------ re-hashing
#
# Re-hashing runs in a child process: in a thread it would wait for the GIL
# behind the (Python-heavy) manifest and tree checks, and the two together
# would take as long as one after the other.  The child walks objects/ on
# its own and reports, one line each on its stdout:
#
#   P <bytes hashed so far>
#   F <code> <oid> <path as hex> <detail>
#   D <bytes hashed>                      (done)

_CHILD_MIN_SHARDS = 64      # fewer object shards than this: a small store, hash in a thread


def _many_objects(objects: ObjectStore) -> bool:
    """Helper processes pay off for many objects; a small store (a few dozen
    objects, fewer shards) is checked in this process, without their start-up cost."""
    try:
        shards = len(os.listdir(objects.root + b"/objects"))
    except OSError:
        shards = 0
    return shards >= _CHILD_MIN_SHARDS


class _LocalRehasher(threading.Thread):
    """The re-hash in a thread of this process (small stores)."""

    def __init__(self, objects: ObjectStore) -> None:
        super().__init__(name="fsck-rehash", daemon=True)
        self.results: list[tuple[str, str, bytes, str]] = []
        self.error: BaseException | None = None
        self._hasher = _Hasher(objects, lambda *r: self.results.append(r), lambda n: None)
        self.start()

    @property
    def bytes_done(self) -> int:
        return self._hasher.bytes_done

    def run(self) -> None:
        try:
            self._hasher.run()
        except BaseException as e:   # raised again by the caller
            self.error = e

    def close(self) -> None:
        pass


class _Child:
    """A helper process (``python -c 'from eidetic.fsck import <main>; <main>()'``)
    and a thread reading its report lines (hex where bytes could hold anything)."""

    what = "a helper process"

    def __init__(self, main: str, args: list[str]) -> None:
        import subprocess
        import sys

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen([sys.executable, "-c", f"from eidetic.fsck import {main}; {main}()", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE,
                                     env=env)
        self.finished = False
        self._reader = threading.Thread(target=self._read, name=f"fsck-{main}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            kind, _, rest = line.rstrip(b"\n").partition(b" ")
            self.line(kind, rest)

    def line(self, kind: bytes, rest: bytes) -> None:
        raise NotImplementedError

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.close()
        except BrokenPipeError:   # the child died; error() says why
            pass

    def is_alive(self) -> bool:
        return self._reader.is_alive()

    def join(self, timeout: float | None = None) -> None:
        self._reader.join(timeout)

    @property
    def error(self) -> BaseException | None:
        if self._reader.is_alive():
            return None
        rc = self.proc.wait()
        if self.finished and rc == 0:
            return None
        err = (self.proc.stderr.read() if self.proc.stderr else b"").decode("utf-8", "replace").strip()
        last = err.splitlines()[-1] if err else f"exit status {rc}"
        return IntegrityError(f"{self.what} failed: {last}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None and not f.closed:
                try:
                    f.close()
                except BrokenPipeError:
                    pass


def _unhex(b: bytes) -> str:
    return bytes.fromhex(b.decode()).decode("utf-8", "surrogateescape")


def _hex(text: str) -> str:
    return text.encode("utf-8", "surrogateescape").hex()


class _Rehasher(_Child):
    """The parent's side of the re-hashing child."""

    what = "re-hashing objects"

    def __init__(self, objects: ObjectStore) -> None:
        self.results: list[tuple[str, str, bytes, str]] = []
        self.bytes_done = 0
        self.counts = (0, 0)
        self.requested = False
        super().__init__("_rehash_main", [os.fsdecode(objects.root), os.fsdecode(objects.tmp_dir)])

    def line(self, kind: bytes, rest: bytes) -> None:
        if kind == b"P":
            self.bytes_done = int(rest)
        elif kind == b"F":
            code, oid, hexpath, detail = rest.split(b" ", 3)
            self.results.append((code.decode(), "" if oid == b"-" else oid.decode(),
                                 bytes.fromhex(hexpath.decode()), _unhex(detail)))
        elif kind == b"S":
            a, b = rest.split()
            self.counts = (int(a), int(b))
        elif kind == b"D":
            self.bytes_done = int(rest)
            self.finished = True

    def request(self, fresh: str) -> None:
        """Once hashing is done: merge objects/ with *fresh*."""
        self.requested = True
        self.send(f"M {os.fsencode(fresh).hex()}\n")


def _emitter():
    import sys

    out = sys.stdout.buffer
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            out.write(line.encode("ascii") + b"\n")
            out.flush()
    return emit


def _rehash_main() -> None:
    """Entry point of the re-hashing child (argv: objects root, tmp dir).

    After hashing it reads one request from stdin, ``M <fresh index>`` (its
    path as hex), and merges objects/ with the fresh index; an empty stdin
    ends it."""
    import sys

    objects = ObjectStore(sys.argv[1], sys.argv[2])
    emit = _emitter()
    hasher = _Hasher(objects, lambda code, oid, path, detail: emit(f"F {code} {oid} {path.hex()} {_hex(detail)}"),
                     lambda n: emit(f"P {n}"))
    hasher.run()
    req = sys.stdin.buffer.readline().split()
    if req and req[0] == b"M":
        from ..store.index import Index

        fresh = Index(os.fsdecode(bytes.fromhex(req[1].decode())), durable=False)
        count, need = _merge_objects(objects, fresh, False,
                                     lambda code, oid, path, detail: emit(f"F {code} {oid or '-'} {path.hex()} "
                                                                          f"{_hex(detail)}"))
        emit(f"S {count} {need}")
    emit(f"D {hasher.bytes_done}")


class _Hasher:
    """Hash every object file: small ones read whole and hashed here, large
    ones handed to a second thread that uses blake3's own threads (mmap for
    the largest), so one large object never stalls the many small ones."""

    REPORT_EVERY = 64 << 20

    def __init__(self, objects: ObjectStore, bad: Callable[[str, str, bytes, str], None],
                 progress: Callable[[int], None]) -> None:
        self.objects = objects
        self.bad = bad
        self.progress = progress
        self.small_bytes = 0
        self.large_bytes = 0
        self._reported = 0
        self._big: list = []
        self._cv = threading.Condition()
        self._big_done = False
        self._error: BaseException | None = None

    @property
    def bytes_done(self) -> int:
        return self.small_bytes + self.large_bytes

    def run(self) -> None:
        big = threading.Thread(target=self._big_loop, name="fsck-rehash-large", daemon=True)
        big.start()
        try:
            for oid, twin, path in self.objects.iter_files():
                if oid:
                    self._one(oid, twin, path)
                if self.bytes_done - self._reported >= self.REPORT_EVERY:
                    self._reported = self.bytes_done
                    self.progress(self._reported)
        finally:
            with self._cv:
                self._big_done = True
                self._cv.notify_all()
            big.join()
        if self._error is not None:
            raise self._error

    def _queue_big(self, item: tuple) -> None:
        with self._cv:
            while len(self._big) >= _HASH_WINDOW:
                self._cv.wait()
            self._big.append(item)
            self._cv.notify_all()

    def _one(self, oid: str, twin: int, path: bytes) -> None:
        try:
            fd, st = open_regular_nofollow(path)
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO):
                self.bad("E023", oid, path, "not a regular file")
            else:
                self.bad("E020", oid, path, f"unreadable: {e.strerror}")
            return
        try:
            bad = _object_stat_problem(st)     # open_regular_nofollow made sure it is a regular file
            if bad is not None:
                self.bad(bad[0], oid, path, bad[1])
            if st.st_size > SMALL_FILE:
                self._queue_big((oid, twin, path))
                return
            try:
                data = os.read(fd, st.st_size + 1)
            except OSError as e:
                self.bad("E020", oid, path, f"unreadable: {e.strerror}")
                return
        finally:
            os.close(fd)
        if len(data) > st.st_size:      # grew since fstat: hash it the long way
            self._queue_big((oid, twin, path))
            return
        actual = hash_bytes(data)
        self.small_bytes += len(data)
        if actual != oid:
            self.bad("E020", oid, path, f"its {len(data)} bytes hash to {actual}")

    def _big_loop(self) -> None:
        while True:
            with self._cv:
                while not self._big and not self._big_done:
                    self._cv.wait()
                if not self._big:
                    return
                oid, twin, path = self._big.pop(0)
                self._cv.notify_all()
            try:
                actual, size = self.objects.hash_of(oid, twin)
            except FileNotFoundError:
                continue
            except OSError as e:
                self.bad("E020", oid, path, f"unreadable: {e.strerror}")
                continue
            except BaseException as e:   # raised again by run()
                self._error = e
                continue
            self.large_bytes += size
            if actual != oid:
                self.bad("E020", oid, path, f"its {size} bytes hash to {actual}")


# ================================================================== repair

@dataclass
class RepairReport:
    done: list[str] = field(default_factory=list)       # what was repaired, one line each
    cannot: list[str] = field(default_factory=list)     # what could not be, and why
    notes: list[str] = field(default_factory=list)      # what was deliberately left as it is
    lost_and_found: str | None = None                   # where moved-aside tree files went


def repair(store: Store, findings: list[Finding], lock: bool = True) -> RepairReport:
    """Repair what *findings* (from :func:`check`) show, as far as it can be
    derived again; never delete anything that is not ours (hand-made or
    replaced files go to ``<store>/lost+found/<timestamp>/``).  Holds the
    store lock unless the caller already does (``lock=False``)."""
    rep = RepairReport()
    fatal = [f for f in findings if f.code in FATAL]
    if fatal:
        for f in fatal:
            rep.cannot.append(f"{f.line()}: fsck does not touch a directory it cannot recognise as a store")
        return rep
    with store.lock() if lock else nullcontext():
        _Repairer(store, findings, rep).run()
    return rep


class _Repairer:
    def __init__(self, store: Store, findings: list[Finding], rep: RepairReport) -> None:
        self.store = store
        self.rep = rep
        self.by_code: dict[str, list[Finding]] = {}
        for f in findings:
            self.by_code.setdefault(f.code, []).append(f)
        self.broot = store.broot
        self.tree_root = os.fsencode(store.tree)
        self._lost: dict[str, bytes] = {}
        self.bad_objects: set[str] = set()

    def get(self, *codes: str) -> list[Finding]:
        return [f for c in codes for f in self.by_code.get(c, [])]

    def has(self, *codes: str) -> bool:
        return any(c in self.by_code for c in codes)

    # -------------------------------------------------------------- driver

    def run(self) -> None:
        rep = self.rep
        for f in self.get("E003"):
            makedirs(f.raw, 0o700)
            rep.done.append(f"re-created {f.path}")
        self._temps()
        broken = self.has(*CHAIN_BROKEN)
        head_changed = self._manifests(broken)
        self._objects()
        if broken:
            rep.cannot.append("the index and the tree were left as they are: with the manifest chain broken "
                              "they may hold the only record of what the damaged manifests said")
            for f in self.get("E034"):
                self._chmod_dir(f)
            self._left_alone()
            return
        rebuilt = False
        if head_changed or self.has("E040", "E041", "E043"):
            n = self.store.rebuild_index()
            self.rep.done.append(f"rebuilt the index from {n} manifest(s)")
            rebuilt = True
        else:       # merely behind (E044, W042) is caught up; a sound one is left as it is
            notes: list[str] = []
            self.store.prepare_index(notes.append)
            rebuilt = bool(notes)
            self.rep.done.extend(line.split(": ", 1)[1] for line in notes)
        for f in self.get("E034"):
            self._chmod_dir(f)
        for f in self.get("E031", "E033"):
            self._move_tree_entry(f)
        if rebuilt or self.has("E030", "E031", "E032", "E035", "W036"):
            self._materialize()
        self._left_alone()
        if "tree" in self._lost:
            rep.lost_and_found = layout.display(self._lost["tree"])

    def _left_alone(self) -> None:
        orphans = self.get("W024")
        if orphans:
            self.rep.notes.append(f"{len(orphans)} orphan object(s) left in place: harmless, and a later upload "
                                  "of the same content uses them")
        for f in self.get("E037"):
            self.rep.cannot.append(f"{f.line()}: fix the directory's permissions, then run fsck again")

    # --------------------------------------------------------- lost+found

    def _lost_dir(self, kind: str) -> bytes:
        """``lost+found/<timestamp>`` for tree entries, ``lost+found/<timestamp>-store`` for store files."""
        if kind not in self._lost:
            base = self.broot + b"/lost+found"
            makedirs(base, 0o700)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ").encode()
            suffix = b"-store" if kind == "store" else b""
            n = 0
            while True:
                cand = base + b"/" + stamp + (b".%d" % n if n else b"") + suffix
                try:
                    os.mkdir(cand, 0o700)
                    break
                except FileExistsError:
                    n += 1
            self._lost[kind] = cand
        return self._lost[kind]

    def _move_aside(self, src: bytes, rel: bytes, what: str, kind: str = "tree") -> bool:
        dest = self._lost_dir(kind) + b"/" + rel
        try:
            makedirs(os.path.dirname(dest), 0o700, 0o700)
            os.rename(src, dest)
        except FileNotFoundError:
            return False
        except OSError as e:
            self.rep.cannot.append(f"could not move {layout.display(src)} aside: {e.strerror}")
            return False
        fsync_dir(os.path.dirname(src))
        self.rep.done.append(f"moved {what} {layout.display(src)} to {layout.display(dest)}")
        return True

    # ---------------------------------------------------------------- temps

    def _temps(self) -> None:
        for f in self.get("W050", "W051"):
            p = f.raw
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            if f.code == "W051" and not is_temp_name(os.path.basename(p)):
                continue   # only ever remove our own temp names from a tree
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.unlink(p)
            self.rep.done.append(f"removed temp file {f.path}")

    # ------------------------------------------------------------ manifests

    def _manifests(self, broken: bool) -> bool:
        rep, store = self.rep, self.store
        for f in self.get("E014"):
            self._move_aside(f.raw, f.data["store_rel"], "foreign file", "store")
        for f in self.get(*sorted(CHAIN_BROKEN)):
            rep.cannot.append(f"{f.line()}: a damaged manifest chain cannot be rebuilt from anything in the "
                              "store; restore the manifest (or HEAD) from a backup")
        if broken:
            return False
        changed = False
        if self.has("E017"):
            from ..store.manifest import digest_of
            seqs = store.manifest_seqs()
            if seqs:
                digest = digest_of(store.manifest_path(seqs[-1]))
                store.set_head(seqs[-1], digest)
                rep.done.append(f"rewrote HEAD: manifest {seqs[-1]}")
                changed = True
        if self.has("W016"):
            before = store.head()[0]
            seq, _ = store.recover_head()
            if seq != before:
                rep.done.append(f"advanced HEAD to manifest {seq} (an ingest was interrupted at its commit "
                                "point; 'eidetic ingest' still finishes its inbox entry)")
                changed = True
        return changed

    # -------------------------------------------------------------- objects

    def _objects(self) -> None:
        rep = self.rep
        for f in self.get("E022"):
            try:
                st = os.lstat(f.raw)
                os.chmod(f.raw, stat.S_IMODE(st.st_mode) & ~0o222)
                rep.done.append(f"removed write bits from {f.path}")
            except FileNotFoundError:
                pass
        for f in self.get("E023"):
            self._move_aside(f.raw, f.data["store_rel"], "foreign file", "store")
        for f in self.get("E021"):
            oid = f.data["oid"]
            if self._restore_from_tree(oid, f.data["versions"]):
                rep.done.append(f"restored missing object {oid} from its tree name")
                continue
            self.bad_objects.add(oid)
            if f.data.get("description"):
                rep.cannot.append(f"object {oid} is missing: {f.data['description']}; restore it from a "
                                  "backup (no tree name holds its bytes)")
                continue
            rep.cannot.append(f"object {oid} is missing and no tree name holds its bytes; "
                              f"{_affected_text(f.data)}: send one of those files again or restore the "
                              "object from a backup, then run 'fsck --repair' again for their tree names")
        for f in self.get("E020"):
            oid = f.data["oid"] if f.data else os.path.basename(f.raw).decode()
            self.bad_objects.add(oid)
            rep.cannot.append(f"object {oid} is corrupt ({f.path}); {_affected_text(f.data)}: restore the "
                              "object from a backup (every tree name shares its bytes; missing names of "
                              "these versions are not re-created from corrupt bytes)")

    def _restore_from_tree(self, oid: str, versions: list[tuple[bytes, int, str]]) -> bool:
        objects = self.store.objects
        for path, n, stamp in versions:
            if not stamp:
                continue
            for rel in (layout.version_relpath(path, n, stamp), layout.tree_relpath(path)):
                src = self.tree_root + b"/" + rel
                try:
                    fd, _ = open_regular_nofollow(src)
                except OSError:
                    continue
                try:
                    if hash_fd(fd)[0] != oid:
                        continue
                    dest = objects.path(oid)
                    makedirs(os.path.dirname(dest), 0o700, 0o700)
                    os.link(src, dest, follow_symlinks=False)
                    os.chmod(dest, 0o444)
                    fsync_dir(os.path.dirname(dest))
                    return True
                except OSError:
                    continue
                finally:
                    os.close(fd)
        return False

    # ----------------------------------------------------------------- tree

    def _chmod_dir(self, f: Finding) -> None:
        try:
            st = os.lstat(f.raw)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            os.chmod(f.raw, stat.S_IMODE(st.st_mode) & ~(stat.S_IWGRP | stat.S_IWOTH))
            self.rep.done.append(f"removed group/other write bits from {f.path}")

    def _move_tree_entry(self, f: Finding) -> None:
        what = "replaced tree entry" if f.code == "E031" else "hand-added tree entry"
        self._move_aside(f.raw, f.data["rel"], what)

    def _materialize(self) -> None:
        """Give every version its names again (idempotent: existing right
        names are left alone, stale plain names replaced)."""
        from ..store.tree import Tree, TreeConflict

        store = self.store
        tree = Tree(store.tree, store.objects, os.path.join(store.root, "tmp"))
        tree.ensure_root()
        made = 0
        for v, is_latest in _with_last(store.index.iter_versions()):
            if v.blake3 in self.bad_objects:
                continue
            try:
                if tree.place_version(v):
                    made += 1
                if is_latest:
                    tree.place_plain(v)
            except TreeConflict as e:
                self.rep.cannot.append(f"{e.message} (it could not be moved aside)")
            except OSError as e:
                self.rep.cannot.append(f"could not re-create the names of {layout.display(v.path)} "
                                       f"v{v.n}: {e.strerror or e}")
        store.sync()
        self.rep.done.append(f"re-created {made} missing version name(s); every plain name shows its "
                             "latest version")


def _affected_text(data: dict | None) -> str:
    if data and data.get("description"):
        return data["description"]
    if not data or not data.get("versions"):
        return "no version uses it"
    vs = data["versions"]
    return "affected: " + _name_versions(vs, data.get("total", len(vs)), 20)


def _name_versions(vs: list[tuple[bytes, int, str]], total: int, limit: int) -> str:
    """``a/b v1, c v2 and 7 more``: the first *limit* of *total* versions."""
    shown = ", ".join(f"{layout.display(p)} v{n}" for p, n, _ in vs[:limit])
    return shown + (f" and {total - limit} more" if total > limit else "")


__all__ = ["CODES", "FATAL", "CHAIN_BROKEN", "Finding", "Findings", "RepairReport", "check", "repair", "finding"]
