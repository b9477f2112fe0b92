"""``eidetic send``: upload a folder from a lab PC into an inbox.

The upload is written into a dot-entry ``.<study>-<location>-<UTC>-<random>``
(the daemon ignores dot names) and renamed to its name without the dot only
after every file and the upload description are written and flushed, so the
daemon never sees half an upload.  Files go in walk order (path components
compared bytewise: the order ingest walks an entry in and the order the
description lists them).  Each file is hashed (BLAKE3) from the very bytes
that are sent; the description is composed last, from the local send state,
so a resumed upload still gets a complete one.

The local send state (client.SendState, sqlite) records the upload in
progress and every file finished in it: a send interrupted in any way
(network drop, Ctrl-C, kill) leaves only the dot-entry, and the same command
run again resumes it, or starts afresh if the dot-entry is gone.

This module knows nothing of terminals: progress and notices go to
callbacks (the CLI draws a tqdm bar; a GUI can draw its own), and it never
reads any server-side config.
"""

from __future__ import annotations

import functools
import io
import os
import platform
import secrets
import socket
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from .. import __version__
from ..core import layout
from .state import ClientLock, Pending, SendState, client_dir, local_user, open_state, sanitize_location
from .excludes import Excludes
from .settings import ClientSettings, load_settings
from ..core.description import DESCRIPTION_NAME, DescribedFile, DescriptionHeader, DescriptionWriter, walk_key
from ..core.errors import SendCancelled, SendError, UsageError
from ..core.fsutil import open_regular_nofollow
from ..core.hashing import hash_fd, new_hasher
from ..core.walk import DIR, ERROR, FILE, SYMLINK, Entry
from ..core.walk import walk as walk_entries
from .transport import (Destination, HostKeyInfo, LocalTransport, SFTPOptions, Transport, open_transport,
                        parse_destination)

CHUNK = 1 << 20             # read/write buffer; also the progress granularity
READ_ATTEMPTS = 3           # a file that changes while read is read again this often
MAX_NAMED_PROBLEMS = 20     # the error message names this many files, then counts


@dataclass
class SendOptions:
    source: str
    study: str
    to: str
    location: str | None = None         # default: client settings, else the host name
    changed_only: bool = False
    dry_run: bool = False
    identity: str | None = None
    accept_host_key: str | None = None  # "SHA256:..."
    client_home: str | None = None      # default: client.client_dir()
    parts: tuple[str, ...] = ()         # subfolders of source sent together (paths kept); () = everything
    excludes: Excludes | None = None    # None: the default excludes only
    settings: ClientSettings | None = None  # the client settings the caller read already (None: read here)


@dataclass
class SendProgress:
    phase: str              # "scanning" | "checking" | "sending" | "finishing"
    files_done: int
    files_total: int
    bytes_done: int
    bytes_total: int
    path: str = ""          # the file being worked on (for display)


@dataclass
class SendHooks:
    progress: Callable[[SendProgress], None] | None = None
    notice: Callable[[str], None] | None = None             # resume/afresh, location changed
    listed: Callable[[str, str], None] | None = None        # (what, path): "send"/"symlink"/"special"/"excluded"
    confirm_host_key: Callable[[HostKeyInfo], bool] | None = None   # None: not interactive
    password: Callable[[str], str | None] | None = None
    should_stop: Callable[[], bool] | None = None   # polled between files and chunks: True cancels (resumable)


@dataclass
class SendResult:
    dest: str               # as shown to the user
    study: str
    location: str
    entry: str | None       # the entry's final name (None: nothing was sent)
    files: int = 0          # files in this upload
    bytes: int = 0
    resumed_files: int = 0  # of those, already sent by an interrupted earlier run
    unchanged: int = 0      # --changed-only: left out, sent before unchanged
    symlinks: int = 0
    special: int = 0        # FIFOs, sockets, devices: not regular files
    dry_run: bool = False
    completed_earlier: str | None = None   # an earlier run's upload found already renamed
    excluded: int = 0       # files and folders left out by the excludes (a folder counts once)
    resumed: bool = False   # this send finished an interrupted one
    description_blake3: str | None = None  # BLAKE3 of the upload description as sent
    parts: tuple[str, ...] = ()


class _Problems(layout.FirstN):
    def __init__(self) -> None:
        super().__init__(MAX_NAMED_PROBLEMS)

    def message(self, intro: str) -> str:
        return f"{intro}: " + self.text(more=" and {} more")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def entry_name(study: str, location: str, when: datetime) -> str:
    """``<study>-<location>-<UTC time>-<random>``; the dot-entry adds a leading '.'."""
    return f"{study}-{location}-{when.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def default_location(home: str, settings: ClientSettings | None = None) -> tuple[str, str]:
    """(location as given, where it came from) per the client settings (the
    user's, else the machine-wide ones; *settings* when the caller read them
    already), else the host name."""
    s = settings if settings is not None else load_settings(home)
    if s.location:
        return s.location, s.location_origin or "the client settings"
    return socket.gethostname().split(".")[0] or "unknown", "the host name"


# --------------------------------------------------------------------- walk

@dataclass
class _Item:
    kind: str               # "file" | "symlink" | "special" | "error"
    rel: bytes
    local: str
    size: int = 0
    mtime_ns: int = 0
    error: str = ""


def walk(source: str, prefix: bytes = b"", skip: Callable[[bytes], bool] | None = None) -> Iterator[_Item]:
    """Everything under *source* in walk order (core/walk.py: flat memory
    for any number of files; symlinks, and folders swapped for one, are
    reported, never followed; by path where the platform has no dir_fd).
    Paths are *prefix* (a part: ``eprime/``) plus the path below *source*;
    ``skip(path)`` leaves a file out, or a folder and all in it."""
    try:
        entries = walk_entries(source, skip=(lambda rel: skip(prefix + rel)) if skip else None)
    except OSError as e:
        raise SendError(f"cannot read the folder {source}: {e.strerror}") from None
    with entries:
        for e in entries:
            if e.kind == DIR:
                continue
            yield _item(e, prefix)


def _item(e: Entry, prefix: bytes = b"") -> _Item:
    rel = prefix + e.rel
    if e.kind == FILE:
        try:
            st = e.lstat()
        except OSError as err:
            return _Item("error", rel, e.path, error=err.strerror or str(err))
        return _Item("file", rel, e.path, st.st_size, st.st_mtime_ns)
    if e.kind == SYMLINK:
        return _Item("symlink", rel, e.path)
    if e.kind == ERROR:
        return _Item("error", rel, e.path, error=e.error.strerror or str(e.error))
    return _Item("special", rel, e.path)


def check_parts(source: str, parts: tuple[str, ...]) -> tuple[str, ...]:
    """The parts to send, in walk order, each a real folder inside *source*
    (never through a link); a part inside another part adds nothing and is
    dropped.  UsageError naming a part that is not such a folder."""
    clean = []
    for part in parts:
        bits = [b for b in part.replace("\\", "/").split("/") if b and b != "."]
        if not bits or ".." in bits or os.path.isabs(part):
            raise UsageError(f"part {part!r}: a part is a folder inside {source}, e.g. eprime")
        here = source
        for b in bits:
            here = os.path.join(here, b)
            try:
                st = os.lstat(here)
            except FileNotFoundError:
                raise UsageError(f"part {part!r}: there is no folder {here}") from None
            except OSError as e:
                raise SendError(f"part {part!r}: {here}: {e.strerror}") from None
            if not stat.S_ISDIR(st.st_mode):
                what = "a link" if stat.S_ISLNK(st.st_mode) else "not a folder"
                raise UsageError(f"part {part!r}: {here} is {what}; a part is a folder inside {source}")
        clean.append("/".join(bits))
    clean.sort(key=lambda p: walk_key(os.fsencode(p)))
    out: list[str] = []
    for p in clean:
        if out and (p == out[-1] or p.startswith(out[-1] + "/")):
            continue        # inside the part before it (walk order puts it right after)
        out.append(p)
    return tuple(out)


def _check_name(rel: bytes) -> str | None:
    for c in rel.split(b"/"):
        if len(c) > layout.NAME_MAX:
            return "its name is longer than 255 bytes in UTF-8, more than the server can store"
    return None


# --------------------------------------------------------------------- send

class _Sender:
    def __init__(self, opts: SendOptions, hooks: SendHooks) -> None:
        self.opts = opts
        self.hooks = hooks
        self.home = opts.client_home or client_dir()
        self.p = SendProgress("scanning", 0, 0, 0, 0)
        self._buf = bytearray(CHUNK)   # one buffer for every file sent

    def notice(self, msg: str) -> None:
        if self.hooks.notice:
            self.hooks.notice(msg)

    def progress(self, phase: str | None = None, path: str | None = None) -> None:
        if phase is not None:
            self.p.phase = phase
        if path is not None:
            self.p.path = path
        if self.hooks.progress:
            self.hooks.progress(SendProgress(**vars(self.p)))

    def listed(self, what: str, rel: bytes) -> None:
        if self.hooks.listed:
            self.hooks.listed(what, layout.display(rel))

    # -- the steps

    def prepare(self) -> None:
        o = self.opts
        if not layout.STUDY_NAME_RE.match(o.study):
            raise UsageError(f"--study {o.study!r}: a study name is letters, digits and '_' "
                             "(as the study runner gave it to you)")
        self.source = os.path.abspath(o.source)
        try:
            st = os.stat(self.source)
        except FileNotFoundError:
            raise UsageError(f"{o.source}: no such file or folder") from None
        except OSError as e:
            raise SendError(f"{o.source}: {e.strerror}") from None
        self.parts: tuple[str, ...] = ()
        if stat.S_ISDIR(st.st_mode):
            self.single = False
            if os.path.lexists(os.path.join(self.source, os.fsdecode(DESCRIPTION_NAME))):
                raise UsageError(f"{self.source} contains a file named {DESCRIPTION_NAME.decode()}: that "
                                 "name is reserved for eidetic's upload description; rename or move it")
            self.parts = check_parts(self.source, o.parts)
        elif o.parts:
            raise UsageError(f"{o.source} is a file: parts are folders inside a study folder")
        elif stat.S_ISREG(st.st_mode):
            self.single = True
            if os.fsencode(os.path.basename(self.source)) == DESCRIPTION_NAME:
                raise UsageError(f"{DESCRIPTION_NAME.decode()} is reserved for eidetic's upload description")
        else:
            raise UsageError(f"{o.source} is neither a folder nor a regular file")
        self.excludes = o.excludes if o.excludes is not None else Excludes()
        self.dest: Destination = parse_destination(o.to)
        given, origin = (o.location, "--location") if o.location else default_location(self.home, o.settings)
        self.location = sanitize_location(given)
        if self.location != given:
            self.notice(f"location {given!r} (from {origin}) may only hold letters, digits, '_' and '.' "
                        f"('-' separates the parts of an upload's name): using {self.location!r}")

    def stop_if_asked(self) -> None:
        if self.hooks.should_stop is not None and self.hooks.should_stop():
            raise SendCancelled("cancelled")

    def _skip(self, rel: bytes) -> bool:
        if self.excludes.excluded(rel):
            self.excluded += 1
            self.listed("excluded", rel)
            return True
        return False

    def _items(self) -> Iterator[_Item]:
        if self.single:
            st = os.stat(self.source)
            rel = os.fsencode(os.path.basename(self.source))
            if not self._skip(rel):
                yield _Item("file", rel, self.source, st.st_size, st.st_mtime_ns)
            return
        if not self.parts:
            yield from walk(self.source, skip=self._skip)
            return
        for part in self.parts:
            yield from walk(os.path.join(self.source, part), os.fsencode(part) + b"/", skip=self._skip)

    def plan(self, state: SendState) -> tuple[int, int, int, _Problems]:
        """Walk the source into the plan table; returns (unchanged, symlinks, special, problems)."""
        unchanged = symlinks = special = 0
        self.excluded = 0
        problems = _Problems()
        state.plan_reset()
        state.begin_batch()
        try:
            for it in self._items():
                if it.kind == "file" and self.p.files_total % 64 == 0:
                    self.stop_if_asked()
                if it.kind == "symlink":
                    symlinks += 1
                    self.listed("symlink", it.rel)
                    continue
                if it.kind == "special":
                    special += 1
                    self.listed("special", it.rel)
                    continue
                if it.kind == "error":
                    problems.add(f"{layout.display(it.rel)} ({it.error})")
                    continue
                bad = _check_name(it.rel)
                if bad:
                    problems.add(f"{layout.display(it.rel)} ({bad})")
                    continue
                if self.opts.changed_only and self._unchanged(state, it):
                    unchanged += 1
                    continue
                state.plan_add(it.rel, it.local, it.size, it.mtime_ns)
                self.p.files_total += 1
                self.p.bytes_total += it.size
                if self.p.files_total % 1000 == 0:
                    self.progress("scanning", layout.display(it.rel))
        finally:
            state.end_batch()
        return unchanged, symlinks, special, problems

    def _unchanged(self, state: SendState, it: _Item) -> bool:
        """Same path, size, mtime and BLAKE3 as last sent to this destination
        and study.  Only files whose size and mtime match are hashed."""
        last = state.ledger(self.dest.key, self.opts.study, it.rel)
        if last is None or last.size != it.size or last.mtime_ns != it.mtime_ns:
            return False
        self.progress("checking", layout.display(it.rel))
        try:
            oid, size, mtime = _hash_file(it.local)
        except OSError:
            return False        # unreadable now: the send itself will name it
        return (oid, size, mtime) == (last.blake3, last.size, last.mtime_ns)

    def run(self) -> SendResult:
        self.prepare()
        o = self.opts
        res = SendResult(self.dest.display, o.study, self.location, None, dry_run=o.dry_run)
        state = open_state(self.home)
        try:
            if o.dry_run:
                return self._dry_run(state, res)
            what = f"{self.source} to {self.dest.display} (study {o.study})"
            with ClientLock(os.path.join(self.home, "locks"), f"{self.dest.key}\0{o.study}\0{self.source}",
                            what):
                transport = open_transport(self.dest, SFTPOptions(
                    identity=o.identity, known_hosts=os.path.join(self.home, "known_hosts"),
                    accept_host_key=o.accept_host_key, confirm_host_key=self.hooks.confirm_host_key,
                    password=self.hooks.password))
                try:
                    transport.check_inbox()
                    return self._send(state, transport, res)
                finally:
                    transport.close()
        finally:
            state.close()

    def _dry_run(self, state: SendState, res: SendResult) -> SendResult:
        if self.dest.kind == "local":
            LocalTransport(self.dest).check_inbox()
        pending = state.pending(self.dest.key, self.opts.study, self.source)
        res.unchanged, res.symlinks, res.special, problems = self.plan(state)
        res.excluded, res.parts = self.excluded, self.parts
        for rel, _local, _size, _mtime in state.plan():
            self.listed("send", rel)
        res.files, res.bytes = self.p.files_total, self.p.bytes_total
        if pending is not None:
            self.notice(f"an interrupted upload .{pending.entry} would be resumed")
        if problems.count:
            raise SendError(problems.message("these cannot be read, so the send would fail"))
        return res

    def _resolve_pending(self, state: SendState, t: Transport) -> Pending | None:
        pending = state.pending(self.dest.key, self.opts.study, self.source)
        if pending is None:
            return None
        dot = b"." + pending.entry.encode()
        if t.exists(dot):
            return pending
        if pending.phase == "renaming":
            # Killed between the rename and recording it: the upload arrived.
            state.complete(pending)
            self.notice(f"the earlier upload {pending.entry} was completed before it was interrupted")
            return None
        self.notice(f"the earlier interrupted upload .{pending.entry} is gone from {self.dest.display}; "
                    "starting afresh")
        state.forget(pending)
        return None

    def _send(self, state: SendState, t: Transport, res: SendResult) -> SendResult:
        o = self.opts
        pending = self._resolve_pending(state, t)
        res.unchanged, res.symlinks, res.special, problems = self.plan(state)
        res.excluded, res.parts = self.excluded, self.parts
        total = self.p.files_total
        if total == 0:
            if problems.count:
                raise SendError(problems.message("nothing was sent: these cannot be read"))
            return res
        sent_before = 0         # files an interrupted run finished (none: no lookup per file)
        if pending is None:
            started = _utc_now()
            pending = state.begin(self.dest.key, o.study, self.source,
                                  entry_name(o.study, self.location, started), self.location,
                                  layout.utc_iso(started))
            dot = b"." + pending.entry.encode()
            t.mkdir(dot)
        else:
            dot = b"." + pending.entry.encode()
            state.set_phase(pending, "sending")     # a rename that failed is retried at the end
            for rel in state.files_not_planned(pending):
                t.remove(dot + b"/" + rel)      # sent earlier, no longer part of this upload
                state.file_forget(pending, rel)
            sent_before = state.count_done(pending)
            res.resumed = True
            self.notice(f"resuming interrupted upload .{pending.entry} "
                        f"({sent_before} of {total} files already sent)")
        res.location = pending.location
        made: list[bytes] = []          # the directories of the current path, created
        self.progress("sending")
        for rel, local, size, mtime_ns in state.plan():
            self.stop_if_asked()
            self._make_parents(t, dot, rel, made)
            disp = layout.display(rel)
            try:
                if sent_before and self._already_sent(state, t, pending, dot, rel, size, mtime_ns):
                    res.resumed_files += 1
                else:
                    self._send_file(state, t, pending, dot, rel, local, disp, problems)
            except FileNotFoundError:
                problems.add(f"{disp} (it disappeared while sending)")
            except OSError as e:
                # Only the source raises OSError here: the transports raise TransportError.
                problems.add(f"{disp} ({e.strerror or e})")
            self.p.files_done += 1
            self.progress(path=disp)
        t.drain()       # every file's reply: recorded as sent, or a refused file fails the send here
        if problems.count:
            raise SendError(problems.message(
                f"not sent (the unfinished upload stays hidden as .{pending.entry}; fix these and run the "
                "same command again to finish it)"))
        self.stop_if_asked()
        self.progress("finishing", "")
        res.files, res.bytes, res.description_blake3 = self._write_description(state, t, pending, dot)
        t.sync_tree(dot)
        state.set_phase(pending, "renaming")
        t.rename(dot, pending.entry.encode())
        state.complete(pending)
        res.entry = pending.entry
        return res

    def _make_parents(self, t: Transport, dot: bytes, rel: bytes, made: list[bytes]) -> None:
        # Walk order keeps a directory's files together, so remembering only the
        # current chain of directories is enough (flat memory).
        parts = rel.split(b"/")[:-1]
        keep = 0
        while keep < len(made) and keep < len(parts) and made[keep] == parts[keep]:
            keep += 1
        del made[keep:]
        for i in range(keep, len(parts)):
            made.append(parts[i])
            t.mkdir(dot + b"/" + b"/".join(made))

    def _already_sent(self, state: SendState, t: Transport, p: Pending, dot: bytes, rel: bytes,
                      size: int, mtime_ns: int) -> bool:
        """Sent by an interrupted run and unchanged since, by the walk's lstat
        (this run's plan): no second stat of the source."""
        done = state.done_file(p, rel)
        if done is None or done.blake3 is None or (size, mtime_ns) != (done.size, done.mtime_ns):
            return False
        if t.size(dot + b"/" + rel) != done.size:
            return False
        digest = t.digest(dot + b"/" + rel)
        if digest is not None and digest != done.blake3:
            return False
        self.p.bytes_done += done.size
        return True

    def _send_file(self, state: SendState, t: Transport, p: Pending, dot: bytes, rel: bytes,
                   local: str, disp: str, problems: _Problems) -> None:
        self.listed("send", rel)
        remote = dot + b"/" + rel
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                time.sleep(0.2 * attempt)
            f, st = _open_source(local)
            with f:
                state.file_started(p, rel, st.st_size, st.st_mtime_ns)
                w = t.open_write(remote)
                try:
                    h = new_hasher()
                    counted = 0
                    buf = self._buf
                    mv = memoryview(buf)
                    while True:
                        n = f.readinto(buf)
                        if not n:
                            break
                        h.update(mv[:n])
                        w.write(mv[:n])
                        counted += n
                        self.p.bytes_done += n
                        if self.hooks.progress:
                            self.progress(path=disp)
                        if self.hooks.should_stop is not None:
                            self.stop_if_asked()
                    after = os.fstat(f.fileno())
                except BaseException:
                    w.abort()
                    raise
                if after.st_size == st.st_size == counted and after.st_mtime_ns == st.st_mtime_ns:
                    # Recorded as sent only once the transport has it (SFTP: its
                    # fsync answered, which may come while later files are sent).
                    w.finish(functools.partial(state.file_done, p, rel, st.st_size, st.st_mtime_ns,
                                               h.hexdigest()))
                    return
                w.abort()
                self.p.bytes_total += st.st_size     # a re-read is more work: progress never goes back
        problems.add(f"{disp} (it kept changing while it was read; close the program writing it)")

    def _write_description(self, state: SendState, t: Transport, p: Pending,
                           dot: bytes) -> tuple[int, int, str]:
        """Write the upload description; (files, bytes, its BLAKE3 as sent,
        checked against the written file where the transport can read it back)."""
        header = DescriptionHeader(
            client=f"eidetic {__version__}", study=p.study, location=p.location, user=local_user("unknown"),
            host=socket.gethostname(), platform=platform.platform(), started=p.started, source=self.source)
        w = t.open_write(dot + b"/" + DESCRIPTION_NAME)
        raw = _RawWriter(w)
        try:
            out = io.BufferedWriter(raw, buffer_size=CHUNK)
            dw = DescriptionWriter(out, header)
            for f in state.described(p):
                assert f.blake3 is not None
                dw.add(DescribedFile(f.relpath, f.size, f.mtime_ns, f.blake3))
            dw.finish(layout.utc_iso(_utc_now()))
            out.flush()
        except BaseException:
            w.abort()
            raise
        w.finish()
        sent = raw.h.hexdigest()
        t.drain()
        there = t.digest(dot + b"/" + DESCRIPTION_NAME)
        if there is not None and there != sent:
            raise SendError(f"the upload description written to {self.dest.display} does not read back as "
                            f"sent (BLAKE3 {there[:16]}..., sent {sent[:16]}...); the unfinished upload "
                            f"stays hidden as .{p.entry}: run the same command again")
        return dw.files, dw.bytes, sent


class _RawWriter(io.RawIOBase):
    """A transport writer as a raw stream, so DescriptionWriter's many small
    lines go out in large writes."""

    def __init__(self, w) -> None:
        self.w = w
        self.h = new_hasher()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        data = bytes(b)
        self.h.update(data)
        self.w.write(data)
        return len(b)


def _open_source(path: str) -> tuple[io.FileIO, os.stat_result]:
    """Open a file to send without following a symlink swapped in since the
    walk and without blocking on a FIFO; only regular files."""
    fd, st = open_regular_nofollow(path)
    return io.FileIO(fd, "rb", closefd=True), st


def _hash_file(path: str) -> tuple[str, int, int]:
    f, st = _open_source(path)
    with f:
        oid, _ = hash_fd(f.fileno())
    return oid, st.st_size, st.st_mtime_ns


def send(opts: SendOptions, hooks: SendHooks | None = None) -> SendResult:
    """Send ``opts.source`` to ``opts.to`` as one upload (see the module doc).
    Raises UsageError, SendError, TransportError, HostKeyError or LockBusy;
    KeyboardInterrupt, or SendCancelled when ``hooks.should_stop`` says so,
    leaves the dot-entry and the state to resume from."""
    return _Sender(opts, hooks or SendHooks()).run()
