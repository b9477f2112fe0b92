"""Ingest: from a claimed inbox entry to a committed, visible upload.

For one entry, in this order (store_format.md, "Write ordering"):

1. store the entry's upload description (if it has one) as an object, then
   walk the entry without following symlinks and stream every regular file
   into the object store (hashing the bytes actually stored; a large file is
   cloned instead where the file system can, and the clone hashed), while the
   manifest streams into tmp/ and each file is checked against the
   description (a merge of two streams in walk order);
2. commit: one syncfs makes objects and manifest durable, then the manifest
   gets its name (the commit point) and HEAD advances;
3. apply the manifest to the index (resumable);
4. materialize the tree (idempotent), syncfs;
5. rename the entry to its done name.

A process killed anywhere is finished by the next run: before step 2 the
upload is redone from the entry (objects already placed are re-verified,
never trusted by name), after it the remaining steps are replayed.

This module has no threads and no watchdog; the daemon (watch.py) only
decides *when* to call it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, NoReturn

from ..core import layout
from .config import Config
from ..core.description import DESCRIPTION_NAME, DescribedFile, DescriptionError, DescriptionReader, walk_key
from ..core.errors import EideticError, EntryChanged, EntryRejected, Interrupted, LockBusy, StoreIOError
from ..core.fsutil import SyncFailed, open_regular_nofollow, raise_nofile_limit
from ..core.walk import DIR, ERROR, FILE, SYMLINK, kind_at, kind_of, kind_word, listing, walk
from .inbox import Candidate, Claim, StateDir, rename_entry, scan, user_name, wait_settled
from ..store.manifest import DESCRIPTION_KEYS, FileRecord, Header, ManifestReader, SkipRecord
from ..store.objects import PutResult
from ..store.store import Store
from ..store.tree import Tree

MAX_FILE_ATTEMPTS = 3
LOCK_POLL = 0.5          # while another process holds a store lock, look again this often
MAX_REPORTED_PROBLEMS = 20

Log = Callable[[str], None]


@dataclass
class EntryResult:
    entry: str                 # original name, for display
    study: str | None
    outcome: str               # "ingested" | "failed" | "waiting" | "committed" (finished by the next run)
    upload: str | None = None
    reason: str | None = None
    files: int = 0
    bytes: int = 0
    new_bytes: int = 0
    new_versions: int = 0
    skipped: int = 0
    seconds: float = 0.0
    where: str | None = None
    settles_in: float | None = None   # "waiting" for an entry still changing: seconds until it may be taken
    verified: bool = False     # every file was checked against the sender's upload description
    resend: bool = False       # failed so that only sending it again can fix it (renaming the entry cannot)
    commands: tuple[str, ...] = ()   # the 'eidetic send' commands the reason names (the mail shows each)
    fault: StoreIOError | None = None   # the store fault that stopped this entry (and its study)


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    new_bytes: int = 0
    new_objects: int = 0
    new_oids: list[str] = field(default_factory=list)   # written by this attempt: dropped if it is not committed
    denied: bool = False       # a file or folder could not be read for lack of permission
    problems: layout.FirstN = field(default_factory=lambda: layout.FirstN(MAX_REPORTED_PROBLEMS))

    def unreadable(self, shown: str, e: OSError) -> None:
        """*shown* (a file, or a folder with its '/') could not be opened or listed."""
        self.denied |= e.errno in (errno.EACCES, errno.EPERM)
        self.problems.add(f"{shown} ({e.strerror})")


def _quiet(_: str) -> None:
    pass


class Ingester:
    def __init__(self, cfg: Config, log: Log = _quiet,
                 progress: Callable[[int, int], None] | None = None,
                 should_stop: Callable[[], bool] | None = None,
                 on_result: Callable[["EntryResult"], None] | None = None,
                 on_entry: Callable[[str], None] | None = None) -> None:
        """*progress(files, bytes)* is called as files are stored (for a UI),
        counting from 0 for each entry; *on_entry(name)* just before an
        entry's files are stored (its name for display).
        *should_stop()* is polled between entries and between files: when it
        turns true, no new entry is taken and an entry not yet committed is
        abandoned (its claim stays; the next run redoes it from the entry).
        *on_result(r)* hears each finished or failed entry as soon as it is
        (a pass over a backlog returns its list only at the end)."""
        self.cfg = cfg
        self.log = log
        self.progress = progress
        self.should_stop = should_stop or (lambda: False)
        self.on_result = on_result
        self.on_entry = on_entry
        self.state = StateDir(cfg.state)
        self._stores: dict[str, Store] = {}
        self.faults: list[StoreIOError] = []   # run_once: the faults that stopped a study (exit 3)
        raise_nofile_limit()

    def store(self, study: str) -> Store:
        """The study's store, opened once per Ingester (one LMDB environment
        per process, as lmdb requires)."""
        if study not in self._stores:
            self._stores[study] = Store.open(*self.cfg.study(study).store_args())
        return self._stores[study]

    def close(self) -> None:
        for store in self._stores.values():
            store.close()
        self._stores.clear()

    def _forget(self, study: str) -> None:
        """After a fault, open the study afresh next time: no object this
        process placed is trusted any more (its sync may have failed) and a
        failed LMDB environment is not reused."""
        store = self._stores.pop(study, None)
        if store is not None:
            try:
                store.close()
            except Exception:  # noqa: BLE001 - closing what already failed; the fault is reported
                pass

    # ---------------------------------------------------------------- top

    def run_once(self, study: str | None = None, settle_seconds: float | None = None) -> list[EntryResult]:
        """Finish interrupted work, then ingest every settled entry once."""
        self.state.check(self.cfg.source)
        settle = self.cfg.settle_seconds if settle_seconds is None else settle_seconds
        studies = [self.cfg.study(study).name] if study else sorted(self.cfg.studies)
        results: list[EntryResult] = []
        self.faults = []
        if study is None:
            results.extend(self.reject_unknown(settle))
        for name in studies:
            if self.should_stop():
                break
            try:
                results.extend(self.run_study(name, settle))
            except StoreIOError as e:   # that study stops; the others (other disks, maybe) go on
                results.extend(e.results)
                self.faults.append(e)
                self.log(f"stopped study {name}: {e.message}")
        return results

    def run_study(self, study: str, settle: float) -> list[EntryResult]:
        """Finish the study's interrupted work, then ingest its settled entries
        one at a time, oldest first.

        A fault of the store (full disk, I/O error, read-only file system, a
        failed sync) stops the study's work at once: it raises StoreIOError,
        whose ``results`` are the entries finished before it (each already
        reported through on_result).  The entry in hand stays claimed: not
        yet committed, it is redone by the next run; committed, finished."""
        store = self.store(study)
        results: list[EntryResult] = []
        try:
            with contextlib.ExitStack() as held:
                if not self._lock(store, held):
                    return results      # told to stop while another process had the store
                results.extend(self.recover(store))
                for c in scan(self.cfg, study):
                    if self.should_stop():
                        break
                    results.append(self._take(store, c, settle))
        except (StoreIOError, OSError) as e:
            fault = e if isinstance(e, StoreIOError) else store.io_error(e, "preparing the store")
            self._forget(study)
            fault.results = results + fault.results    # the entry in hand, if any, comes last
            self.state.record_fault(study, fault.message, fault.entry_note, fault.sync_failed)
            raise fault from None
        self.state.clear_fault(study)      # got through: a fault noted earlier is over
        return results

    def _lock(self, store: Store, held: contextlib.ExitStack) -> bool:
        """Take the store lock into *held*.  While another process (``ingest
        --once``, ``fsck --repair``, a daemon) has it, say so once and poll
        rather than block in flock, so should_stop() is still heard.  False
        when told to stop meanwhile."""
        said = False
        while True:
            try:
                held.enter_context(store.lock(wait=False))
                return True
            except LockBusy:
                if not said:
                    self.log(f"study {store.name}: another eidetic process is writing to the store; "
                             "waiting for it")
                    said = True
            if self.should_stop():
                return False
            time.sleep(LOCK_POLL)

    def reject_unknown(self, settle: float) -> list[EntryResult]:
        """Refuse settled entries whose name maps to no configured study."""
        results: list[EntryResult] = []
        for cl in self.state.claims(None):   # unknown-study entries interrupted mid-refusal
            self.state.finish(cl, "failed", cl.reason or "entry name maps to no configured study")
        for c in scan(self.cfg, None):
            if c.study is None:
                results.append(self._reject_unknown(c, settle))
        return results

    def _reject_unknown(self, c: Candidate, settle: float) -> EntryResult:
        disp = layout.display(c.name)
        waiting = self._unsettled(c, disp, settle)
        if waiting is not None:   # refused or not, an entry still being written is left alone
            return waiting
        named, source = _peek_description(c.path)
        commands: tuple[str, ...] = ()
        if named is not None:     # sent with 'eidetic send --study <no such study>'
            reason, commands = self._wrong_study(c, named, source, None)
        else:                     # copied in by hand: a correct name is all it needs
            known = ", ".join(sorted(self.cfg.studies))
            reason = (f"entry name '{disp}' does not start with a configured study name and '-' "
                      f"(configured: {known}); it was not ingested")
        cl = self.state.claim(c)
        if cl is None:
            return EntryResult(disp, None, "waiting", reason="vanished before it could be examined")
        self.state.finish(cl, "failed", reason, extra={"resend": True} if named is not None else None)
        self.log(f"failed {disp}: {reason}")
        return self._report(EntryResult(disp, None, "failed", upload=cl.upload, reason=reason,
                                        where=os.fsdecode(cl.path_in("failed")), resend=named is not None,
                                        commands=commands))

    # ------------------------------------------------------------ hints

    def _inbox_of(self, study: str) -> str:
        inbox = self.cfg.study(study).inbox or self.cfg.inbox
        return inbox or "<the study's inbox>"

    @staticmethod
    def _send_command(source: str | None, study: str | None, to: str) -> str:
        src = shlex.quote(source) if source else "<the folder you sent>"
        return (f"eidetic send {src} --study {study or '<the study your study runner gave you>'} "
                f"--to {shlex.quote(to)}")

    def _wrong_study(self, c: "Candidate | Claim", named: str, source: str | None,
                     study: str | None) -> tuple[str, tuple[str, ...]]:
        """The reason for an entry whose upload description names study
        *named* while the entry is in *study* (None: its name maps to no
        study), and the send commands it names.  Renaming cannot fix it (the
        description inside decides the study); sending again with the right
        study does: say so, with the command."""
        disp = layout.display(c.name if isinstance(c, Candidate) else c.original)
        known = ", ".join(sorted(self.cfg.studies))
        if study is None and named in self.cfg.studies:     # a hand-made name; the description is right
            guess = named
            what = (f"it was sent for study {named}, but its entry name '{disp}' maps to no study (was it "
                    "renamed?)")
            to = self._inbox_of(named)
        elif study is None:
            guess = next(iter(self.cfg.studies)) if len(self.cfg.studies) == 1 else None
            what = (f"it was sent for study {_quoted(named)}, which is not a study here (configured: {known}), "
                    f"so entry '{disp}' belongs to no study")
            to = c.inbox
        else:
            guess = study
            where = (f"arrived in study {study}'s inbox as '{disp}'" if self.cfg.study(study).inbox
                     else f"its entry name '{disp}' puts it in study {study}")
            what = f"it was sent for study {_quoted(named)} but {where}; an upload cannot change its study"
            to = self._inbox_of(study)
        commands = (self._send_command(source, guess, to),)
        text = (f"{what}. Nothing was ingested, and renaming the entry cannot fix it (the upload description "
                f"inside names study {_quoted(named)}). Send the folder again with the right study: "
                + commands[0])
        if study is not None and named in self.cfg.studies and named != study:
            commands += (self._send_command(source, named, self._inbox_of(named)),)
            text += f" (or, if the data is study {named}'s: {commands[1]})"
        return text + " (over SFTP: the same --to as before)", commands

    def _describe_oserror(self, e: OSError, cl: Claim) -> str:
        """An entry's OSError in plain words: what is wrong and who can fix it."""
        if e.errno in (errno.EACCES, errno.EPERM):
            name = os.fsencode(e.filename) if e.filename else b""
            claimed = cl.path_in("claimed")
            what = (f"{layout.display(name[len(claimed) + 1:])} in the entry" if name.startswith(claimed + b"/")
                    else f"the entry '{layout.display(cl.original)}'" if name in (claimed, b"")
                    else layout.display(name))
            return _unreadable_hint(f"{what} ({e.strerror})", cl.path_in("failed"))
        where = f" ({layout.display(os.fsencode(e.filename))})" if e.filename else ""
        return f"{e.strerror or 'error ' + str(e.errno)}{where}"

    def _unsettled(self, c: Candidate, disp: str, settle: float) -> EntryResult | None:
        try:
            left = wait_settled(c.path, settle)
        except FileNotFoundError:
            return EntryResult(disp, c.study, "waiting", reason="vanished")
        if left <= 0:
            return None
        self.log(f"waiting {disp}: changed recently, settles in {left:.0f} s")
        return EntryResult(disp, c.study, "waiting", reason=f"changed recently (settles in {left:.0f} s)",
                           settles_in=left)

    def _take(self, store: Store, c: Candidate, settle: float) -> EntryResult:
        disp = layout.display(c.name)
        waiting = self._unsettled(c, disp, settle)
        if waiting is not None:
            return waiting
        cl = self.state.claim(c)
        if cl is None:
            return EntryResult(disp, c.study, "waiting", reason="vanished before it could be claimed")
        self.log(f"claimed {disp} as upload {cl.upload} (study {c.study})")
        return self.process(store, cl)

    # ----------------------------------------------------------- recovery

    def recover(self, store: Store) -> list[EntryResult]:
        """Bring the store to a consistent state and finish claimed entries.
        Call with the store lock held."""
        store.clean_tmp()
        store.recover_head()
        store.prepare_index(self.log)   # caught up, or rebuilt if missing/damaged/stale (said in one line)
        results = []
        for cl in self.state.claims(store.name):
            if self.should_stop():
                break
            self.log(f"resuming upload {cl.upload} ({layout.display(cl.original)})")
            results.append(self.process(store, cl, resumed=True))
        return results

    def catch_up_index(self, store: Store, head_seq: int) -> None:
        """Bring the index to HEAD (*head_seq*), repairing it if need be (lock held)."""
        store.prepare_index(self.log)

    # ------------------------------------------------------------ process

    def process(self, store: Store, cl: Claim, resumed: bool = False) -> EntryResult:
        """Ingest a claimed entry; *resumed* for a claim found after a crash
        (it may already be committed, or still carry its original name)."""
        return self._report(self._process(store, cl, resumed))

    def _report(self, r: EntryResult) -> EntryResult:
        if self.on_result is not None and r.outcome != "waiting":
            try:
                self.on_result(r)
            except Exception as e:  # noqa: BLE001 - the entry is finished; telling about it must not undo it
                self.log(f"  could not report {r.entry} ({r.outcome}): {type(e).__name__}: {e}")
        return r

    def _process(self, store: Store, cl: Claim, resumed: bool) -> EntryResult:
        disp = layout.display(cl.original)
        t0 = time.monotonic()
        where = self.state.locate(cl)
        if where is None:
            reason = "the entry vanished or was replaced after it was claimed; nothing was ingested"
            self.state.finish(cl, "failed", reason)
            return EntryResult(disp, cl.study, "failed", upload=cl.upload, reason=reason)
        state, path = where
        if state == "original":        # killed between record and rename
            rename_entry(cl, path, cl.path_in("claimed"))
            state, path = "claimed", cl.path_in("claimed")
        if state == "failed" or cl.reason is not None:
            self.state.finish(cl, "failed", cl.reason or "failed (reason lost)")
            return EntryResult(disp, cl.study, "failed", upload=cl.upload, reason=cl.reason)

        head_seq, prev = store.head()
        committed = resumed and self._is_committed(store, cl, head_seq)
        stats = Stats()
        seq = head_seq if committed else head_seq + 1
        if not committed:
            # Before the commit point (store_format.md, "Faults"): an entry's own
            # problem fails it; a fault of the store leaves it claimed, nothing
            # of it visible, and stops the study (raised to run_study).
            try:
                if state == "done":
                    raise EntryRejected("entry was marked done but its manifest is missing")
                if self.on_entry is not None:
                    self.on_entry(disp)
                self._store_entry(store, cl, path, seq, prev, stats)
            except Interrupted:
                store.clean_tmp()
                self.log(f"abandoned {disp} (upload {cl.upload}): stopping; the next start redoes it")
                return EntryResult(disp, cl.study, "waiting", upload=cl.upload,
                                   reason="abandoned on shutdown; redone at the next start",
                                   seconds=time.monotonic() - t0, where=os.fsdecode(path))
            except EntryRejected as e:
                return self._fail(store, cl, disp, e.message, t0, stats, resend=e.resend,
                                  commands=e.commands)
            except StoreIOError as e:        # commit_manifest: the manifest has its name
                self._finish_later(store, cl, disp, e, t0, path)
            except OSError as e:
                if not _is_store_fault(e, store):
                    return self._fail(store, cl, disp, self._describe_oserror(e, cl), t0, stats)
                self._not_committed(store, cl, disp, store.io_error(e, "storing the upload"), stats, t0, path)
        # Past the commit point the upload can no longer fail: a problem here
        # leaves the entry claimed, stops the study, and the next run finishes it.
        try:
            if committed:  # resumed: replay the tree in full (idempotent)
                new_versions = self._materialize(store, seq)
            else:          # each new version gets its tree names as the index applies it
                tree = self._tree(store)
                new_versions = store.index.apply_manifest(store.manifest_path(seq), visit=tree.place_new)
                store.sync()
            summary = store.index.upload(seq) or {}
            verified = summary.get("description") is not None   # committed only if it matched
            info = {"seq": seq, "files": summary.get("files", 0), "bytes": summary.get("bytes", 0),
                    "new_versions": new_versions, "skipped": summary.get("skipped", 0), "verified": verified}
            self.state.finish(cl, "done", extra=info)
        except StoreIOError as e:
            e.committed = True
            self._finish_later(store, cl, disp, e, t0, path)
        except OSError as e:
            self._finish_later(store, cl, disp, store.io_error(e, "applying it to the index and the tree",
                                                               committed=True), t0, path)
        except EideticError as e:
            msg = e.message.removeprefix(f"study {store.name}: ")    # StoreIOError names the study again
            self._finish_later(store, cl, disp, StoreIOError(msg, store.name, committed=True), t0, path)
        res = EntryResult(disp, cl.study, "ingested", upload=cl.upload, files=info["files"],
                          bytes=info["bytes"], new_bytes=stats.new_bytes, new_versions=new_versions,
                          skipped=info["skipped"], seconds=time.monotonic() - t0,
                          where=os.fsdecode(cl.path_in("done")), verified=verified)
        self.log(f"ingested {disp} as upload {cl.upload}: {res.files} files, {res.bytes} bytes "
                 f"({res.new_bytes} new), {res.new_versions} new versions, {res.skipped} skipped, "
                 f"{res.seconds:.1f} s" + (", verified against the sender's description" if verified else ""))
        return res

    def _not_committed(self, store: Store, cl: Claim, disp: str, e: StoreIOError, stats: Stats,
                       t0: float, path: bytes) -> NoReturn:
        """A store fault before the commit point: nothing of the upload is
        visible; the entry stays claimed (not the sender's fault: no one need
        send it again) and the next run redoes it from the entry."""
        store.clean_tmp(best_effort=True)
        if e.sync_failed:
            # fsyncgate: the objects this attempt wrote may be lost on disk while
            # their pages still read back fine; remove them so the redo writes them
            # again rather than trusting them (none is referenced yet: not trusted).
            store.objects.remove_unreferenced(stats.new_oids, store.index.is_trusted)
        e.entry_note = (f"upload {cl.upload} (entry {disp}) was not committed: nothing of it is visible; "
                          "the entry stays in the inbox and the next run takes it again")
        self.log(f"not committed {disp} (upload {cl.upload}): {e.message}")
        e.results.append(self._report(EntryResult(disp, cl.study, "waiting", upload=cl.upload, reason=e.message,
                                                  seconds=time.monotonic() - t0, where=os.fsdecode(path),
                                                  fault=e)))
        raise e

    def _finish_later(self, store: Store, cl: Claim, disp: str, e: StoreIOError, t0: float,
                      path: bytes) -> NoReturn:
        """A fault at or after the commit point: the upload IS committed and is
        never reported failed; the entry stays claimed and the next run
        finishes it (HEAD, index, tree names, done)."""
        store.clean_tmp(best_effort=True)
        e.entry_note = (f"upload {cl.upload} (entry {disp}) is committed; finishing it later: "
                          "the next run completes it")
        self.log(f"committed {disp} as upload {cl.upload}, finishing later: {e.message}")
        e.results.append(self._report(EntryResult(disp, cl.study, "committed", upload=cl.upload,
                                                  reason=e.message, seconds=time.monotonic() - t0,
                                                  where=os.fsdecode(path), fault=e)))
        raise e

    def _fail(self, store: Store, cl: Claim, disp: str, reason: str, t0: float, stats: Stats | None = None,
              resend: bool = False, commands: tuple[str, ...] = ()) -> EntryResult:
        store.clean_tmp(best_effort=True)
        if stats is not None:
            # Refused before the commit point: the objects this attempt placed
            # (its description, its files) that no committed upload refers to
            # would be orphans (fsck W024); the ones the index knows stay.
            store.objects.remove_unreferenced(stats.new_oids, store.index.is_trusted)
        self.state.finish(cl, "failed", reason, extra={"resend": True} if resend else None)
        self.log(f"failed {disp} (upload {cl.upload}): {reason}")
        return EntryResult(disp, cl.study, "failed", upload=cl.upload, reason=reason,
                           seconds=time.monotonic() - t0, where=os.fsdecode(cl.path_in("failed")), resend=resend,
                           commands=commands)

    @staticmethod
    def _is_committed(store: Store, cl: Claim, head_seq: int) -> bool:
        """Was this upload committed before a crash or a fault?  It is then
        the newest manifest: a study stops at a fault, and a run finishes its
        claims before it takes a new entry."""
        if head_seq == 0:
            return False
        r = ManifestReader(store.manifest_path(head_seq))
        r.close()
        return r.header.upload == cl.upload

    # ---------------------------------------------------------- store phase

    def _store_entry(self, store: Store, cl: Claim, path: bytes, seq: int, prev: str | None,
                     stats: Stats) -> None:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise _resend("the entry is a symbolic link; links are never followed. "
                                "Send the folder itself")
        if not stat.S_ISDIR(st.st_mode):
            raise _resend("the entry is not a folder; an upload must be a folder of files: send the "
                          "folder with 'eidetic send <folder> --study <study> --to <inbox>'")
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        desc: _Description | None = None
        try:
            dst = os.fstat(dfd)
            if (dst.st_dev, dst.st_ino) != (cl.dev, cl.ino):
                raise EntryRejected("the entry was replaced after it was claimed")
            desc = self._open_description(store, dfd, cl, stats)
            header = Header(seq=seq, upload=cl.upload, prev=prev, study=store.name, entry=cl.original,
                            received=cl.received, uploader_uid=cl.uid, uploader_name=cl.uploader_name,
                            source=cl.location, description=desc.header if desc else None)
            af, writer = store.new_manifest(header)
            try:
                out = _CheckedWriter(writer, _Verifier(desc.reader)) if desc else writer
                self._walk(store, dfd, out, stats)
                if stats.problems:
                    text = f"{stats.problems.count} file(s) could not be read: " + stats.problems.text()
                    if stats.denied:
                        text = _unreadable_hint(text + "; a file or folder that says 'Permission denied'",
                                               cl.path_in("failed"))
                    raise EntryRejected(text)
                if isinstance(out, _CheckedWriter):
                    out.verifier.finish()     # before the commit point: a mismatch commits nothing
                elif writer.files == 0 and writer.skipped == 0:
                    # A bare drop with nothing in it: a folder sent empty by mistake, or
                    # emptied by its sender after it was claimed.  An empty upload would
                    # record nothing but a misleading "0 files" line in the history.
                    raise _resend("the entry holds no files (was it sent empty, or emptied after it "
                                        "was handed in?); nothing was ingested. Send the folder again "
                                        "with its files")
                store.commit_manifest(af, writer)
            except BaseException:
                af.abort()
                raise
        finally:
            os.close(dfd)
            if desc is not None:
                desc.close()

    def _open_description(self, store: Store, dfd: int, cl: Claim, stats: Stats) -> "_Description | None":
        """Store the entry's upload description as an object and open that
        object (our own copy: the uploader cannot change what is checked).
        None for an entry without one."""
        name = layout.display(DESCRIPTION_NAME)
        try:
            st = os.stat(DESCRIPTION_NAME, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            if self.cfg.study(store.name).require_description:
                raise _resend(f"study {store.name} requires an upload description ({name} at the "
                                    "top of the entry, written by 'eidetic send') and this entry has none; "
                                    "send it again with 'eidetic send'") from None
            return None
        if not stat.S_ISREG(st.st_mode):
            raise EntryRejected(f"its upload description {name} is a {kind_word(kind_of(st.st_mode))}, not a "
                                "regular file; it was not followed or opened")
        try:
            fd, before = open_regular_nofollow(DESCRIPTION_NAME, dir_fd=dfd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO):
                raise EntryRejected(f"its upload description {name} is not a regular file; "
                                    "it was not followed or opened") from None
            raise EntryRejected(f"its upload description {name} could not be read ({e.strerror})") from None
        try:
            res, unchanged = _put(store, fd, before)
        except OSError as e:
            if e.errno in _STORE_ERRNOS:
                raise
            raise EntryRejected(f"its upload description {name} could not be read ({e.strerror})") from None
        if res.new:
            stats.new_oids.append(res.oid)   # removed again if the entry is refused
        if not unchanged:
            raise EntryChanged(f"its upload description {name} changed while it was read; "
                               "is the upload still being written?")
        f = os.fdopen(store.objects.open(res.oid), "rb", buffering=1 << 16)
        try:
            ended = _end_time(f, res.size, name)
            try:
                reader = DescriptionReader(f, name)
            except DescriptionError as e:
                raise _resend(f"its upload description is not valid: {e}; send the folder again with "
                              "'eidetic send'") from None
            h = reader.header
            disp = layout.display(cl.original)
            if h.study != store.name:
                raise _resend(*self._wrong_study(cl, h.study, h.source, store.name))
            if h.location != cl.location:
                again = (self._send_command(h.source, store.name, cl.inbox)
                         + " --location " + shlex.quote(cl.location))
                raise _resend(f"its upload description says location {_quoted(h.location)} but the entry name "
                              f"'{disp}' says '{cl.location}', so nothing was ingested (renaming the entry "
                              f"cannot fix this). Send the folder again: {again}", (again,))
        except BaseException:
            f.close()
            raise
        prov = h.provenance()
        header = {"blake3": res.oid, "size": res.size, **prov, "ended": ended}
        return _Description({k: header[k] for k in DESCRIPTION_KEYS}, reader, f)

    def _walk(self, store: Store, top_fd: int, writer, stats: Stats) -> None:
        # Walk order, never through a link; a folder swapped for a link, a
        # file or a FIFO after its parent was listed comes as what it is now.
        with walk(top_fd, skip=_is_description, lister=_listing) as entries:
            for e in entries:
                kind = e.kind
                if kind == FILE:
                    self._store_file(store, e.dir_fd, e.name, e.rel, writer, stats)
                elif kind == DIR:
                    continue
                elif kind == ERROR:        # a folder that could not be opened or listed
                    stats.unreadable(layout.display(e.rel) + "/", e.error)
                elif kind == SYMLINK:
                    try:
                        target = os.readlink(e.name, dir_fd=e.dir_fd)
                    except OSError:
                        target = None
                    writer.add(SkipRecord(e.rel, SYMLINK, target))
                else:
                    writer.add(SkipRecord(e.rel, kind))

    def _store_file(self, store: Store, dfd: int, name: bytes, relpath: bytes, writer, stats: Stats) -> None:
        if self.should_stop():
            raise Interrupted()
        for attempt in range(MAX_FILE_ATTEMPTS):
            try:
                fd, before = open_regular_nofollow(name, dir_fd=dfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.EINVAL, errno.ENXIO):  # not a regular file after all
                    writer.add(SkipRecord(relpath, kind_at(dfd, name)))
                    return
                stats.unreadable(layout.display(relpath), e)
                return
            try:
                res, unchanged = _put(store, fd, before)
            except OSError as e:
                if e.errno in _STORE_ERRNOS:
                    raise
                stats.problems.add(f"{layout.display(relpath)} ({e.strerror})")
                return
            if unchanged:
                break
            self.log(f"  {layout.display(relpath)} changed while being read (attempt {attempt + 1})")
        else:
            raise EntryChanged(f"{layout.display(relpath)} kept changing while it was read "
                               f"({MAX_FILE_ATTEMPTS} attempts); is the upload still being written?")
        writer.add(FileRecord(relpath, res.size, res.oid, stat.S_IMODE(before.st_mode), before.st_mtime_ns))
        stats.files += 1
        stats.bytes += res.size
        if res.new:
            stats.new_bytes += res.size
            stats.new_objects += 1
            stats.new_oids.append(res.oid)
        if self.progress is not None:
            self.progress(stats.files, stats.bytes)

    # ----------------------------------------------------------- tree phase

    @staticmethod
    def _tree(store: Store) -> Tree:
        return Tree(store.tree, store.objects, os.path.join(store.root, "tmp"))

    def _materialize(self, store: Store, seq: int) -> int:
        """Give every path of manifest *seq* its names in the tree."""
        self.catch_up_index(store, seq)
        tree = self._tree(store)
        index = store.index
        new_versions = 0
        r = ManifestReader(store.manifest_path(seq))
        for rec in r.records():
            if not isinstance(rec, FileRecord):
                continue
            latest = index.latest(rec.path)
            if latest is None:  # pragma: no cover - apply_manifest put it there
                raise EntryRejected(f"index has no version of {layout.display(rec.path)}")
            if latest.seq == seq:
                tree.place_version(latest)
                new_versions += 1
            tree.place_plain(latest)
        store.sync()
        return new_versions


_STORE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)   # the store's problem, not the file's


def _put(store: Store, fd: int, before: os.stat_result) -> tuple[PutResult, bool]:
    """Store the open file *fd* (closing it); (result, whether it stayed
    unchanged while read, judged by size, mtime and ctime)."""
    try:
        res = store.objects.put_fd(fd, before.st_size, store.index.is_trusted, store.index.size_seen,
                                   dev=before.st_dev)    # a regular file opened O_NOFOLLOW: may be cloned
        after = os.fstat(fd)
    finally:
        os.close(fd)
    return res, (res.size == before.st_size == after.st_size and before.st_mtime_ns == after.st_mtime_ns
                 and before.st_ctime_ns == after.st_ctime_ns)


# ---------------------------------------------------------- verification

@dataclass
class _Description:
    header: dict                 # the manifest header's "description" value
    reader: DescriptionReader    # streaming over our stored copy
    f: object

    def close(self) -> None:
        self.f.close()  # type: ignore[attr-defined]


def _end_time(f, size: int, name: str) -> str:
    """The description's end time, read from its last line before the walk
    (the manifest header, written first, records it).  The streaming reader
    validates that line again with everything else."""
    tail_len = min(size, 4096)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    f.seek(0)
    problem = None
    if not tail.endswith(b"\n"):
        problem = "it does not end with a complete line"
    else:
        try:
            end = json.loads(tail[:-1].rpartition(b"\n")[2])
            layout.parse_utc_iso(end["end"])
            return end["end"]
        except (ValueError, TypeError, KeyError):
            problem = "its last line is not an end line"
    raise _resend(f"its upload description {name} is incomplete ({problem}): the send did not "
                        "finish; send the folder again")


def _quoted(text: str, limit: int = 80) -> str:
    """The sender's string for a reason: quoted, escaped, never a whole megabyte."""
    r = "'" + layout.display(text.encode("utf-8", "surrogateescape")).replace("'", "\\'") + "'"
    return r if len(r) <= limit else r[: limit - 4] + "...'"


class _Verifier:
    """Merge-joins what the walk finds with what the description lists.
    Both come in walk order, so memory stays flat for any number of files;
    only the first MAX_REPORTED_PROBLEMS names are kept for the reason."""

    def __init__(self, reader: DescriptionReader) -> None:
        self._files = reader.files()
        self.counts = {"missing": 0, "extra": 0, "different": 0}
        self.named = layout.FirstN(MAX_REPORTED_PROBLEMS)
        self._want: DescribedFile | None = None
        self._want_key: list[bytes] = []
        self._advance()

    def _advance(self) -> None:
        try:
            self._want = next(self._files, None)
        except DescriptionError as e:
            raise EntryRejected(f"its upload description is not valid: {e}") from None
        if self._want is not None:
            self._want_key = walk_key(self._want.path)

    def _problem(self, kind: str, path: bytes, detail: str) -> None:
        self.counts[kind] += 1
        self.named.add(f"{layout.display(path)} {detail}")

    def see(self, rec: FileRecord | SkipRecord) -> None:
        key = walk_key(rec.path)
        while self._want is not None and self._want_key < key:
            self._problem("missing", self._want.path, "(missing: described, not in the entry)")
            self._advance()
        want = self._want
        if want is None or self._want_key != key:
            what = "" if isinstance(rec, FileRecord) else f"a {kind_word(rec.skipped)}, "
            self._problem("extra", rec.path, f"(extra: {what}not in the description)")
            return
        self._advance()
        if isinstance(rec, SkipRecord):
            self._problem("different", rec.path, f"(different: described as a file, here a "
                                                 f"{kind_word(rec.skipped)})")
        elif rec.size != want.size:
            self._problem("different", rec.path, f"(different: {rec.size} bytes here, {want.size} described)")
        elif rec.blake3 != want.blake3:
            self._problem("different", rec.path, "(different: same size, other content)")

    def finish(self) -> None:
        """Raise EntryRejected unless every described file was found, equal, and nothing else."""
        while self._want is not None:
            self._problem("missing", self._want.path, "(missing: described, not in the entry)")
            self._advance()
        if not self.named:
            return
        counts = ", ".join(f"{n} {kind}" for kind, n in self.counts.items() if n)
        raise _resend(f"the entry does not match its upload description ({counts}): "
                            + self.named.text()
                            + ". Files changed after the sender described them, or were changed or lost on "
                              "the way; nothing of this upload was ingested. Send the folder again with "
                              "'eidetic send' (renaming the entry cannot fix this)")


class _CheckedWriter:
    """The manifest writer, with every record also checked by a _Verifier."""

    def __init__(self, writer, verifier: _Verifier) -> None:
        self.writer = writer
        self.verifier = verifier

    def add(self, rec: FileRecord | SkipRecord) -> None:
        self.writer.add(rec)
        self.verifier.see(rec)


def _is_description(rel: bytes) -> bool:
    """The sender's description at the entry's top: reserved, not a path of the upload."""
    return rel == DESCRIPTION_NAME


_listing = listing      # how the walk lists a folder (tests swap a folder for a link right after)


def _is_store_fault(e: OSError, store: Store) -> bool:
    """Is *e* the store's problem (its disk full, failing or read-only, a
    failed sync, a store file we may not write) rather than the entry's?"""
    if isinstance(e, SyncFailed) or e.errno in _STORE_ERRNOS:
        return True
    if e.errno in (errno.EACCES, errno.EPERM) and e.filename is not None:
        return os.fsencode(e.filename).startswith(store.broot + b"/")
    return False


def _resend(message: str, commands: tuple[str, ...] = ()) -> EntryRejected:
    """An entry's problem that only sending it again can fix (a rename cannot);
    *commands*: the 'eidetic send' commands *message* names."""
    return EntryRejected(message, resend=True, commands=commands)


def _peek_description(entry: bytes) -> tuple[str | None, str | None]:
    """(study, source folder) an entry's upload description names, or (None,
    None) without a readable one; only its header line is read, nothing stored."""
    try:
        fd, _ = open_regular_nofollow(entry + b"/" + DESCRIPTION_NAME)
    except OSError:
        return None, None
    with os.fdopen(fd, "rb") as f:
        try:
            h = DescriptionReader(f).header
        except (OSError, DescriptionError, ValueError):
            return None, None
    return h.study, h.source


def _unreadable_hint(what: str, failed_path: bytes) -> str:
    """The reason for files the service user may not read, and who can fix it."""
    user = user_name(os.geteuid()) or f"uid {os.geteuid()}"
    entry = shlex.quote(layout.display(failed_path))
    return (f"{what} is not readable by the service user ({user}); nothing was ingested. Ask the sender to "
            "send it again with 'eidetic send' (it sets the modes), or have the entry's owner run: "
            f"chmod -R a+rX {entry}; then rename the entry back to its original name (the failure mail "
            "has the command)")
