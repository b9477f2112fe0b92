"""The manifest chain pass: HEAD, then the manifests in sequence order
(``prev``, sequence numbers, study), each replayed into a *fresh* index in
the system's temp directory (not fsynced, thrown away afterwards): the truth
about the store.  The live index is read through one pinned snapshot (plain
fsck takes no lock: an ingest may go on beside it) once lmdb's offline
verifier found its pages sound, and compared with the fresh one where both
have applied the same manifests (and records of a manifest caught half-applied).
At the end, :meth:`Chain.settle` drops what an ingest running beside explains."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from itertools import zip_longest
from typing import TYPE_CHECKING

from ..core import layout
from ..core.errors import EideticError, IndexUnusable, IntegrityError, StoreFormatError
from ..core.fsutil import TEMP_PREFIX, is_temp_name
from ..store.index import Index, Snapshot
from ..store.manifest import ManifestReader
from .codes import CONCURRENT, Finding, Findings, Progress, first_of

if TYPE_CHECKING:
    from ..store.store import Store
    from .tree import TreeScan

REBUILDS = "'fsck --repair' rebuilds it from the manifests"


class Chain:
    def __init__(self, store: Store, out: Findings, progress: Progress, exclusive: bool, start_ns: int) -> None:
        self.store, self.out, self.progress, self.start_ns = store, out, progress, start_ns
        self.exclusive = exclusive            # the store lock is held: nothing changes under the check
        self.ipath, self.hp = store.index_path, os.path.join(store.root, "HEAD")
        self.fresh_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX + "fsck-")
        self.fresh = Index(os.path.join(self.fresh_dir, "index"), durable=False, study=store.name)
        self.live: Index | None = None        # None: missing, unreadable or damaged
        self.snap: Snapshot | None = None     # pinned on it for the whole check
        self.live_applied, self.live_partial = 0, None
        self.index_missing = self.broken = self.behind = False
        self.head_seq, self.head_digest, self.head_readable, self.head_ok = 0, None, True, True
        self.stop = 0                         # the last manifest of the chain HEAD names
        self.seqs: list[int] = []
        # the replay so far: next seq expected, last one applied, its digest (None: unknown)
        self.expected, self.applied, self.prev, self.prev_known = 1, 0, None, True

    def close(self) -> None:
        if self.snap is not None:
            self.snap.close()
        if self.live is not None:
            self.live.close()
        self.fresh.close()
        shutil.rmtree(self.fresh_dir, ignore_errors=True)

    # ------------------------------------------------------------ live index

    def open_live(self) -> None:
        try:
            self.live = Index(self.ipath, study=self.store.name, create=False, write=False)
        except IndexUnusable as e:
            if str(e.kwargs["detail"]) == "its index is missing":
                self.index_missing = True     # an error only if there are manifests to index
            else:
                self.out.add("E043", self.ipath, f"{_what_damage(e)}; {REBUILDS}")
            return
        except EideticError as e:             # cannot open it: permissions, or the disk
            # LMDB opens need write access (lock.mdb): a reader who lacks it has a sound index
            fix = REBUILDS if os.access(self.ipath, os.W_OK) else "run fsck as the service user (or root) to check it"
            return self.out.add("E041", self.ipath, f"{e.kwargs.get('detail', e)}; {fix}")
        try:
            self.snap = self.live.snapshot()
            if self._pages_sound():
                st = self.snap.state()
                self.live_applied, self.live_partial = st.applied, st.partial
        except IndexUnusable as e:
            self._damaged(_what_damage(e))

    def _pages_sound(self) -> bool:
        """lmdb's offline verifier over data.mdb: LMDB itself aborts the
        process on some damage, so nothing reads the live index through LMDB
        before this says it is sound.  Pages reachable from the newest meta
        cannot be reused while the snapshot is pinned, so a concurrent ingest
        cannot make it see damage; a meta page torn by a commit during the
        walk can, so problems count only if no commit happened meanwhile."""
        assert self.live is not None
        for _ in range(3):
            before = self.live.last_txnid()
            problems = self.live.verify_structure()
            if not problems:
                return True
            if self.exclusive or self.live.last_txnid() == before:
                self._damaged(f"its pages are not as LMDB wrote them ({first_of(problems, len(problems), 1)})")
                return False
        return True     # it kept changing under an ingest: the comparison still finds real damage

    def _damaged(self, what: str) -> None:
        self.out.add("E043", self.ipath, f"{what}; {REBUILDS}")
        if self.snap is not None:
            self.snap.close()
        if self.live is not None:
            self.live.close()       # a damaged environment is not kept open for the repair to trip over
        self.snap = self.live = None

    def applied_now(self) -> int:
        """How many manifests the live index has applied now (not in the snapshot)."""
        try:
            return self.live.state().applied if self.live is not None else self.live_applied
        except EideticError:
            return self.live_applied

    def report_behind(self, busy: bool, applied: int) -> None:
        if not busy:
            self.out.add("E044", self.ipath, f"the index has applied {applied} of {self.stop} manifest(s) and no "
                         "ingest is applying the rest, so 'eidetic log' and checkout refuse it; 'eidetic ingest' "
                         "or 'fsck --repair' catches it up")
        elif self.stop - applied > 1:         # (one behind: the upload being applied right now)
            self.out.add("W042", self.ipath, f"the index has applied {applied} of {self.stop} manifest(s) and an "
                                             "ingest holding the store lock is applying the rest")

    # -------------------------------------------------------- HEAD and order

    def _manifest_seqs(self) -> list[int]:
        """Manifest sequence numbers in manifests/; those past HEAD (as read
        at the start) that were committed after the check began are left out:
        an ingest made them, and this check is of the store as it was."""
        mdir = os.path.join(self.store.broot, b"manifests")
        seqs: list[int] = []
        for name in os.listdir(mdir) if os.path.isdir(mdir) else []:
            p = mdir + b"/" + name
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            seq = layout.parse_manifest_name(name.decode("ascii", "replace"))
            if is_temp_name(name):
                self.out.add("W050", p, "temp file of an interrupted manifest write")
            elif seq is None or not stat.S_ISREG(st.st_mode):
                self.out.add("E014", p, "not a manifest" if seq is None else "not a regular file",
                             data={"store_rel": b"manifests/" + name})
            elif seq <= self.head_seq or st.st_ctime_ns < self.start_ns or self.exclusive:
                seqs.append(seq)
        return sorted(seqs)

    def _judge_head(self) -> None:
        """HEAD (read after the snapshot was pinned, before manifests/ is listed) against the manifests."""
        try:
            self.head_seq, self.head_digest = self.store.head()
        except StoreFormatError:
            self.head_readable = False
        seqs = self.seqs = self._manifest_seqs()
        add, hp, head, last = self.out.add, self.hp, self.head_seq, (self.seqs or [0])[-1]
        if not self.head_readable and seqs:
            add("E017", hp, "HEAD is unreadable; 'fsck --repair' rewrites it from the manifests")
        elif not self.head_readable:
            add("E015", hp, "HEAD is unreadable and there are no manifests")
        elif head == 0 and seqs and not os.path.exists(hp):
            add("E017", hp, "HEAD is missing; 'fsck --repair' rewrites it from the manifests")
        if self.index_missing and seqs:
            add("E041", self.ipath, f"no index: {REBUILDS}")
        if head > last:
            self._head_wrong(f"HEAD names manifest {head} but " + (f"the last manifest is {last}: manifests after "
                             f"{last} were removed" if last else "there are no manifests: they were removed"))
        elif head == 0 and seqs and self.head_readable and os.path.exists(hp):
            self._head_wrong(f"HEAD names no manifest but manifests go up to {last}")
        elif head and head < last - 1:
            self._head_wrong(f"HEAD names manifest {head} but manifests go up to {last}")
        self.stop = head if head and head <= last else last

    def _head_wrong(self, detail: str) -> None:
        self.head_ok, self.broken = False, True
        self.out.add("E015", self.hp, detail)

    # ---------------------------------------------------------------- passes

    def run(self) -> None:
        """Every manifest up to HEAD, the live index compared on the way."""
        self._judge_head()
        compared = False
        for seq in (s for s in self.seqs if s <= self.stop):
            if not compared and self.applied == self.live_applied:
                compared = True
                self._compare(seq)
            self._replay(seq)
        stop, head = self.stop, self.head_seq
        if head and head == stop == self.applied and self.prev_known and self.prev != self.head_digest:
            self._head_wrong(f"HEAD records digest {self.head_digest} but manifest {stop} hashes to {self.prev}: "
                             f"manifest {stop} (or HEAD) was edited")
        if not compared and self.applied == self.live_applied:
            self._compare(None)
        elif not compared and self.live is not None and not self.broken:
            self.out.add("E040", self.ipath, f"the index has applied {self.live_applied} manifest(s) but HEAD "
                                             f"names {stop}; 'fsck --repair' rebuilds it")
        self.out.stats["manifests"] = len(self.seqs)

    def past_head(self) -> None:
        """Manifests past HEAD (after the tree pass: the tree is of HEAD's
        uploads): only their objects still matter, and whether the next one
        continues the chain (an ingest interrupted at its commit point)."""
        beyond = [s for s in self.seqs if s > self.stop]
        valid = [self._replay(seq) for seq in beyond]
        nxt = self.stop + 1
        if beyond == [nxt] and self.head_ok and self.head_seq:
            if valid[0]:
                self.out.add("W016", self.store.manifest_path(nxt), f"HEAD names manifest {self.stop}; manifest "
                             f"{nxt} was committed but HEAD not yet advanced: re-running 'eidetic ingest' (or "
                             "'fsck --repair') finishes that upload", data={"seq": nxt})
            else:
                self.out.add("E015", self.hp, f"HEAD names manifest {self.stop} and manifest {nxt} after it is not "
                                              "a valid continuation of the chain")

    def _replay(self, seq: int) -> bool:
        """Validate manifest *seq* against the chain and apply it to the fresh index: is it valid?"""
        add, path = self.out.add, self.store.manifest_path(seq)
        if seq != self.expected:
            gap = f"manifest {self.expected}" if seq == self.expected + 1 else \
                f"manifests {self.expected} to {seq - 1}"
            add("E012", self.store.manifest_path(self.expected),
                f"{gap} missing: removed by hand? (the chain goes on at {seq})")
            self.broken, self.prev, self.prev_known = True, None, False
        self.expected = seq + 1
        try:
            reader = ManifestReader(path)
            reader.close()
            h = reader.header
            if h.seq != seq:
                add("E013", path, f"its header says seq {h.seq}: a copy or an inserted manifest")
                self.broken, self.prev_known = True, False
                return False
            ok = h.study == self.store.name
            if not ok:
                add("E018", path, f"it belongs to study {h.study!r}")
            if self.prev_known and h.prev != self.prev:
                ok = False
                before = f"manifest {seq - 1} hashes to {self.prev}" if self.prev else "it is the first manifest"
                add("E011", path, f"its prev is {h.prev} but {before}: manifest {seq - 1} (or this one's header) "
                                  "was edited")
            self.broken = self.broken or not ok
            if self.applied != seq - 1:
                self.fresh.force_applied(seq - 1)
            self.fresh.apply_manifest(path)
        except (IntegrityError, OSError) as e:
            add("E010", path, _why(e, path))
            self.broken, self.prev_known = True, False
            return False
        self.applied, self.prev, self.prev_known = seq, (self.fresh.upload(seq) or {}).get("digest"), True
        self.progress("manifests", seq, len(self.seqs))
        return ok

    def _compare(self, next_seq: int | None) -> None:
        """The pinned snapshot of the live index against the fresh one, which
        has applied as many manifests.  An ingest caught half-way through
        manifest *next_seq* left `partial` (records applied so far): the fresh
        index applies that manifest up to the same record first, so the two
        compare exactly (its apply goes on from there afterwards)."""
        if self.snap is None or self.broken:
            return
        if self.live_partial is not None and next_seq is not None and self.live_partial[0] == next_seq:
            try:
                self.fresh.apply_manifest(self.store.manifest_path(next_seq), stop_after=self.live_partial[1])
            except (IntegrityError, OSError):
                pass       # the replay reports the manifest; the indexes then differ
        fresh = self.fresh.snapshot()
        try:
            diff = None if self.snap.same_as(fresh) else _first_difference(self.snap.dump(), fresh.dump())
        except IndexUnusable as e:   # LMDB met damage while reading it
            return self._damaged(_what_damage(e))
        finally:
            fresh.close()
        if diff is not None:
            self.out.add("E040", self.ipath, f"{diff}; 'fsck --repair' rebuilds it")
        elif self.live_applied < self.stop:
            self.behind = True          # judged at the end: an ingest may be applying it

    def catch_up(self) -> None:
        """Manifests committed since HEAD was read, into the fresh index (so
        their objects and tree names are accounted for)."""
        try:
            head = 0 if self.broken else self.store.head()[0]
            for seq in range(max(self.fresh.applied()[0], self.stop) + 1, head + 1):
                self.fresh.apply_manifest(self.store.manifest_path(seq))
        except (IntegrityError, OSError, StoreFormatError):
            pass

    def settle(self, scan: TreeScan | None) -> None:
        """Drop what an ingest running beside this check explains: a finding of
        a kind its writes can cause, whose file changed at or after the check
        began (inode ctime), or which a fresh look at the end accounts for
        (manifests committed meanwhile replayed into the fresh index first; while
        the store lock is held, what the upload in progress wrote since the last
        commit is its own)."""
        out, store = self.out, self.store
        suspects = [f for f in out if f.code in CONCURRENT]
        if not suspects and not self.behind:
            return
        busy = store.lock_busy()
        self.catch_up()
        try:
            head_ctime = os.lstat(self.hp).st_ctime_ns
        except OSError:
            head_ctime = 0

        def explained(f: Finding) -> bool:
            if f.code == "W036":                     # the ingest applying its manifest places it
                return busy or os.path.lexists(f.raw)
            if f.code == "W016":                     # the ingest at its commit point advances HEAD
                try:
                    return busy or store.head()[0] >= f.data["seq"]
                except StoreFormatError:
                    return False
            try:
                st = os.lstat(f.raw)
            except FileNotFoundError:
                return True                          # gone: it was in flight
            except OSError:
                return False
            if st.st_ctime_ns >= self.start_ns:
                return True                          # written after the check began
            if f.code == "W024":                     # referred to by a manifest committed meanwhile, or
                return self.fresh.is_trusted(f.data["oid"]) or (busy and st.st_ctime_ns >= head_ctime)  # in progress
            if f.code in ("W050", "W051"):
                return busy                          # a writer's own temp file, while it writes
            return scan is not None and scan.explains(f, st)     # E031, E032, E033

        live_now = self.applied_now()
        gone = {id(f) for f in suspects if explained(f)}
        out[:] = [f for f in out if id(f) not in gone]
        if self.behind and live_now < self.stop:
            self.report_behind(busy, live_now)


def _what_damage(e: IndexUnusable) -> str:
    """"its index is damaged (X)" as X: the finding's title already says damaged."""
    detail = str(e.kwargs["detail"])
    inner = detail.removeprefix("its index is damaged (")
    return inner[:-1] if inner != detail and inner.endswith(")") else detail


def _why(e: Exception, path: str) -> str:
    if isinstance(e, EideticError):
        text = str(e.kwargs.get("detail", e))
        return text.replace(f"manifest {path}", "", 1).lstrip(": ") or text   # the finding names the file
    return getattr(e, "strerror", None) or str(e)


def _first_difference(live, fresh) -> str | None:
    """The first entry in which two dumps of (db, key, value) differ."""
    for a, b in zip_longest(live, fresh):
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
