"""The desktop app's logic, without a display (the window is gui.py).

Everything the collectors' app decides or says lives here, so it is tested
without a display: what a folder holds and how much of it changed since the
last send to a destination (read-only queries of the send state), which
parts are ticked, the options a Send runs with, the background send with
its questions and its Cancel, the sentences shown at the end, the numbers
on the progress line, and the choices remembered between runs.

Threads: :class:`SendJob` and :class:`ScanJob` run in a worker thread and
never touch the window; they post events to a queue that the window polls
(Tk is not thread-safe).  A question the send core asks (a password, a new
host key) is posted as an event and the worker waits for :meth:`SendJob.answer`.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import re
import sqlite3
import threading
import time
import traceback
import urllib.parse
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from .. import __version__
from ..core import errors, layout
from ..core.errors import HostKeyError, LockBusy, SendCancelled, SendError, TransportError, UsageError
from ..core.fsutil import write_atomic
from ..core.walk import DIR, FILE
from ..core.walk import walk as walk_entries
from .excludes import Excludes
from .send import SendHooks, SendOptions, SendProgress, SendResult
from .settings import SavedDestination
from .state import STATE_NAME
from .transport import HostKeyInfo, parse_destination

CHOICES_NAME = "gui-choices.json"
EVERYTHING = "Everything"


# ------------------------------------------------------------- numbers

def format_size(n: int) -> str:
    """Sizes as Windows Explorer shows them (units of 1024 named KB, MB, GB),
    so a collector can compare with what the folder's Properties say."""
    if n < 1024:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    size = float(n)
    for unit in ("KB", "MB", "GB", "TB"):
        size /= 1024
        if size < 1000 or unit == "TB":
            return f"{size:.1f} {unit}" if size < 10 else f"{size:.0f} {unit}"
    return f"{n} bytes"     # pragma: no cover


def plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {words or word + 's'}"


def format_rate(bytes_per_second: float) -> str:
    return format_size(int(bytes_per_second)) + "/s"


def format_duration(seconds: float) -> str:
    """'about 40 seconds', 'about 3 minutes', 'about 1 hour 20 minutes'."""
    s = max(0, int(round(seconds)))
    if s < 10:
        return "a few seconds"
    if s < 60:
        return f"about {s // 5 * 5} seconds"
    minutes = (s + 30) // 60
    if minutes < 60:
        return f"about {plural(minutes, 'minute')}"
    hours, minutes = divmod(minutes, 60)
    return f"about {plural(hours, 'hour')}" + (f" {plural(minutes, 'minute')}" if minutes else "")


class RateMeter:
    """The sending rate over the last few seconds, and the time left."""

    WINDOW = 5.0

    def __init__(self) -> None:
        self.samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, bytes_done: int) -> None:
        if self.samples and bytes_done < self.samples[-1][1]:
            self.samples.clear()        # a new send, or counting started again
        self.samples.append((now, bytes_done))
        while len(self.samples) > 2 and now - self.samples[1][0] >= self.WINDOW:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second, once there is half a second to measure."""
        if len(self.samples) < 2:
            return None
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        if t1 - t0 < 0.5:
            return None
        return (b1 - b0) / (t1 - t0)

    def seconds_left(self, bytes_total: int) -> float | None:
        r = self.rate()
        if not r or not self.samples:
            return None
        return max(0, bytes_total - self.samples[-1][1]) / r


def progress_fraction(p: SendProgress) -> float:
    if p.bytes_total > 0:
        return min(1.0, p.bytes_done / p.bytes_total)
    if p.files_total > 0:
        return min(1.0, p.files_done / p.files_total)
    return 0.0


def progress_line(p: SendProgress, rate: float | None = None, seconds_left: float | None = None) -> str:
    """'1.2 GB of 4.5 GB · 48 of 123 files · 86 MB/s · about 31 seconds left'."""
    if p.phase in ("scanning", "checking"):
        seen = plural(p.files_total, "file")
        return f"Looking at the files to send ({seen} so far)…" if p.phase == "scanning" else \
            "Checking which files changed since the last send…"
    if p.phase == "finishing":
        return f"{format_size(p.bytes_total)} · {plural(p.files_total, 'file')} · finishing…"
    parts = [f"{format_size(p.bytes_done)} of {format_size(p.bytes_total)}",
             f"{p.files_done:,} of {plural(p.files_total, 'file')}"]
    if rate is not None:
        parts.append(format_rate(rate))
    if seconds_left is not None:
        parts.append(f"{format_duration(seconds_left)} left")
    return " · ".join(parts)


# ------------------------------------------------------ destinations form

class FormError(ValueError):
    """A field of the 'add a destination' form that cannot be used."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


_FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}=?$")
_SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/\\\s]+)@)?(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<path>/.*)$")


def is_server(to: str) -> bool:
    return to.strip().lower().startswith("sftp://")


def user_of(to: str) -> str:
    """The user name in an sftp:// address ('' when none, or for a folder)."""
    if not is_server(to):
        return ""
    netloc = to.strip()[len("sftp://"):].split("/", 1)[0]
    return urllib.parse.unquote(netloc.rpartition("@")[0]) if "@" in netloc else ""


def address_with_user(to: str, user: str) -> str:
    """*to* with its user name replaced by *user* (a folder, or no user, stays as it is)."""
    user = user.strip()
    if not is_server(to) or not user:
        return to
    text = to.strip()
    rest = text[len("sftp://"):]
    netloc, slash, path = rest.partition("/")
    hostport = netloc.rpartition("@")[2]
    return f"sftp://{urllib.parse.quote(user, safe='')}@{hostport}{slash}{path}"


def normalize_address(text: str) -> str:
    """What a person may type for a server: ``sftp://host/path``, or
    ``host:/path`` and ``user@host:/path`` as scp writes them; anything else
    is a folder.  A Windows drive (``C:\\Data``) is never taken for a host."""
    text = text.strip()
    if is_server(text):
        return "sftp://" + text[len("sftp://"):]
    m = _SCP_LIKE.match(text)
    if m and len(m.group("host")) > 1:
        user = f"{m.group('user')}@" if m.group("user") else ""
        return f"sftp://{user}{m.group('host')}{m.group('path')}"
    return text


def normalize_fingerprint(text: str) -> str | None:
    """'ED25519 SHA256:abc...' or 'SHA256:abc...' as handed out -> 'SHA256:abc...' (None: empty)."""
    words = text.split()
    if not words:
        return None
    fp = next((w for w in words if w.upper().startswith("SHA256:")), words[-1])
    if not fp.upper().startswith("SHA256:"):
        fp = "SHA256:" + fp
    fp = "SHA256:" + fp.split(":", 1)[1].rstrip(".")
    if not _FINGERPRINT_RE.match(fp):
        raise FormError("fingerprint", "The fingerprint should look like SHA256: followed by 43 letters, "
                                       "digits, + and /, exactly as your study runner gave it (or leave it empty).")
    return fp.rstrip("=")


def destination_from_form(name: str, study: str, address: str, user: str, fingerprint: str,
                          source: str | None = None) -> SavedDestination:
    """The 'add a destination' form as a saved destination, or FormError
    naming the field to fix, in plain words."""
    study = study.strip()
    if not study:
        raise FormError("study", "Give the study name your study runner gave you.")
    if not layout.STUDY_NAME_RE.match(study):
        raise FormError("study", "A study name is letters, digits and _ only, exactly as your study "
                                 "runner gave it.")
    name = name.strip() or study
    if any(c in name for c in "\0\r\n"):
        raise FormError("name", "The name must be on one line.")
    to = normalize_address(address)
    if not to:
        raise FormError("address", "Give the server address (sftp://server/path/to/inbox) or the inbox "
                                   "folder.")
    if is_server(to):
        if not (user.strip() or user_of(to)):
            raise FormError("user", "Give your user name on the server.")
        to = address_with_user(to, user)
    elif not os.path.isabs(to):
        raise FormError("address", "Give the whole path of the inbox folder, for example "
                                   r"\\server\dropbox\inbox or /Volumes/dropbox/inbox, or a server "
                                   "address starting with sftp://.")
    try:
        parse_destination(to)
    except UsageError as e:
        why = e.message.removeprefix(f"--to {to}: ").rstrip(".")
        raise FormError("address", f"That address cannot be used: {why}.") from None
    fp = normalize_fingerprint(fingerprint) if is_server(to) else None
    return SavedDestination(name=name, study=study, to=to, source=source or None, host_key=fp)


# ------------------------------------------------------------ what is there

@dataclass
class Part:
    """A subfolder of the study folder (or the whole folder), as it is now."""
    name: str               # '' for the files at the top of the folder itself
    files: int = 0
    bytes: int = 0
    changed: int = 0        # not sent to this destination before, or changed since (size or time)

    def add(self, size: int, changed: bool) -> None:
        self.files += 1
        self.bytes += size
        self.changed += changed

    def describe(self, ledger_known: bool = True) -> str:
        """'300 MB, 100 files, 3 changed since the last send'."""
        text = f"{format_size(self.bytes)}, {plural(self.files, 'file')}"
        if ledger_known and self.files:
            if self.changed == 0:
                text += ", nothing changed since the last send"
            elif self.changed == self.files:
                text += ", all new" if self.files > 1 else ", new"
            else:
                text += f", {self.changed:,} new or changed since the last send"
        return text


@dataclass
class FolderScan:
    source: str
    parts: list[Part] = field(default_factory=list)     # the subfolders, by name
    top: Part = field(default_factory=lambda: Part(""))    # files directly in the folder
    total: Part = field(default_factory=lambda: Part(EVERYTHING))
    excluded: int = 0       # files and folders left out (the default excludes and the destination's)
    sent_before: bool = False   # this destination's ledger has files of this study
    ledger_known: bool = True   # False: the send state could not be read ("changed" unknown)
    error: str | None = None    # the folder cannot be read: why, in plain words
    complete: bool = True       # False: stopped early (a newer scan replaced it)

    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def part(self, name: str) -> Part | None:
        return next((p for p in self.parts if p.name == name), None)


Ledger = dict[bytes, tuple[int, int]]       # relpath -> (size, mtime_ns) as last sent


def _open_state_readonly(home: str) -> sqlite3.Connection | None:
    path = os.path.join(home, STATE_NAME)
    if not os.path.exists(path):
        return None
    try:
        return sqlite3.connect(Path(os.path.abspath(path)).as_uri() + "?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None


def sent_before(home: str, to: str, study: str) -> Ledger | None:
    """What this computer sent to *to* for *study* (the ledger ``--changed-only``
    uses), read without changing the state; {} when nothing, None when the
    state cannot be read."""
    try:
        key = parse_destination(to).key
    except UsageError:
        return None
    db = _open_state_readonly(home)
    if db is None:
        return {} if not os.path.exists(os.path.join(home, STATE_NAME)) else None
    try:
        rows = db.execute("SELECT relpath, size, mtime_ns FROM ledger WHERE dest=? AND study=?", (key, study))
        return {bytes(r[0]): (r[1], r[2]) for r in rows}
    except sqlite3.Error:
        return None
    finally:
        db.close()


@dataclass
class Interrupted:
    """A send of this folder that was stopped before it finished."""
    entry: str
    files_done: int


def interrupted_send(home: str, to: str, study: str, source: str) -> Interrupted | None:
    """The unfinished upload the next Send of *source* will resume, if any (read-only)."""
    try:
        key = parse_destination(to).key
    except UsageError:
        return None
    db = _open_state_readonly(home)
    if db is None:
        return None
    try:
        row = db.execute("SELECT id, entry FROM pending WHERE dest=? AND study=? AND source=?",
                         (key, study, os.path.abspath(source))).fetchone()
        if row is None:
            return None
        done = db.execute("SELECT count(*) FROM pending_files WHERE upload=? AND blake3 IS NOT NULL",
                          (row[0],)).fetchone()[0]
        return Interrupted(row[1], done)
    except sqlite3.Error:
        return None
    finally:
        db.close()


def scan_folder(source: str, excludes: Excludes | None = None, ledger: Ledger | None = None,
                stop: Callable[[], bool] | None = None) -> FolderScan:
    """The study folder's subfolders with their sizes, file counts and how
    many files are new or changed (size or modification time) since the
    ledger's send; what a send leaves out (symbolic links, junctions,
    excluded names, what is not a regular file) is not counted.  Walked with
    the send's own walker (core/walk.py), so it counts what a send sends."""
    excludes = excludes if excludes is not None else Excludes()
    scan = FolderScan(os.path.abspath(source) if source else "", sent_before=bool(ledger),
                      ledger_known=ledger is not None)
    if not source:
        scan.error = "Choose the study folder."
        return scan

    def skip(rel: bytes) -> bool:
        if excludes.excluded(rel):
            scan.excluded += 1
            return True
        return False

    try:
        entries = walk_entries(source, skip=skip)
    except FileNotFoundError:
        scan.error = f"The folder {source} does not exist."
        return scan
    except NotADirectoryError:
        scan.error = f"{source} is a file, not a folder."
        return scan
    except OSError as e:
        scan.error = f"The folder {source} cannot be read ({e.strerror or e})."
        return scan
    part = scan.top
    with entries:
        for n, e in enumerate(entries):
            if e.kind == DIR or n % 512 == 511:
                if stop is not None and stop():
                    scan.complete = False
                    break
            if e.kind == DIR:
                if e.depth == 0:
                    part = Part(os.fsdecode(e.name))
                    scan.parts.append(part)
                continue
            if e.kind != FILE:
                continue        # links, FIFOs, unreadable folders: the send itself says so
            try:
                st = e.lstat()
            except OSError:
                continue        # vanished or unreadable: the send itself will say so
            last = ledger.get(e.rel) if ledger else None
            changed = last is None or last != (st.st_size, st.st_mtime_ns)
            (part if e.depth else scan.top).add(st.st_size, changed)
            scan.total.add(st.st_size, changed)
    scan.parts.sort(key=lambda p: p.name.lower())
    return scan


def destination_excludes(dest: SavedDestination | None) -> Excludes:
    return Excludes(patterns=tuple(dest.exclude) if dest else ())


# ----------------------------------------------------------- what to send

class Selection:
    """Which parts are ticked: *everything* (the whole folder, including the
    files directly in it), or some subfolders."""

    def __init__(self, everything: bool = True, parts: tuple[str, ...] | list[str] = ()) -> None:
        self.everything = everything
        self.parts: set[str] = set(parts)

    @classmethod
    def initial(cls, remembered: dict | None, dest: SavedDestination | None) -> "Selection":
        """The remembered ticks, else the destination's saved parts, else everything."""
        if remembered and isinstance(remembered.get("parts"), list):
            return cls(bool(remembered.get("everything", not remembered["parts"])),
                       [p for p in remembered["parts"] if isinstance(p, str)])
        if dest is not None and dest.parts:
            return cls(False, dest.parts)
        return cls(True)

    def ticked(self, name: str) -> bool:
        return self.everything or name in self.parts

    def toggle(self, name: str, names: list[str]) -> None:
        """Tick or untick one part.  Unticking a part while everything is
        ticked keeps every other part: the collector sees exactly what stays."""
        if self.everything:
            self.everything = False
            self.parts = set(names) - {name}
        elif name in self.parts:
            self.parts.discard(name)
        else:
            # Every subfolder ticked is still not Everything: the files directly
            # in the study folder are sent only with Everything.
            self.parts.add(name)

    def toggle_everything(self) -> None:
        self.everything = not self.everything
        if self.everything:
            self.parts = set()

    def chosen(self, names: list[str]) -> tuple[str, ...]:
        """The parts to send, in folder order (() with everything)."""
        if self.everything:
            return ()
        return tuple(n for n in names if n in self.parts)

    def missing(self, names: list[str]) -> list[str]:
        """Ticked parts the folder does not hold (any more)."""
        return sorted(self.parts - set(names)) if not self.everything else []

    def amount(self, scan: FolderScan) -> Part:
        if self.everything:
            return scan.total
        out = Part("chosen")
        for p in scan.parts:
            if p.name in self.parts:
                out.files += p.files
                out.bytes += p.bytes
                out.changed += p.changed
        return out

    def to_json(self) -> dict:
        return {"everything": self.everything, "parts": sorted(self.parts)}


def what_will_be_sent(scan: FolderScan, sel: Selection, changed_only: bool = False) -> str:
    """The line above the Send button: what a Send would send."""
    if scan.error:
        return scan.error
    amount = sel.amount(scan)
    if sel.everything:
        what = "the whole folder"
    else:
        chosen = sel.chosen(scan.names())
        if not chosen:
            return "Tick what to send."
        what = ", ".join(chosen) if len(chosen) <= 4 else f"{len(chosen)} folders"
    if changed_only and scan.sent_before:
        if amount.changed == 0:
            return f"Nothing in {what} changed since the last send."
        return f"Will send {what}: {plural(amount.changed, 'new or changed file')} of {amount.files:,}."
    if amount.files == 0:
        return f"There are no files to send in {what}."
    return f"Will send {what}: {plural(amount.files, 'file')}, {format_size(amount.bytes)}."


def cannot_send_yet(dest: SavedDestination | None, source: str, scan: FolderScan | None, sel: Selection,
                    user: str) -> str | None:
    """Why Send is not possible now (None: it is)."""
    if dest is None:
        return "Choose where to send (or add a destination)."
    if not source.strip():
        return "Choose the study folder."
    if scan is None:
        return "Looking at the folder…"
    if scan.error:
        return scan.error
    if not sel.everything and not sel.chosen(scan.names()):
        return "Tick what to send."
    if is_server(dest.to) and not (user.strip() or user_of(dest.to)):
        return "Give your user name on the server."
    return None


def send_options(dest: SavedDestination, source: str, sel: Selection, user: str, home: str,
                 changed_only: bool = False, names: list[str] | None = None) -> SendOptions:
    """The send core's options for this Send."""
    parts = sel.chosen(names if names is not None else sorted(sel.parts))
    return SendOptions(source=source, study=dest.study, to=address_with_user(dest.to, user),
                       changed_only=changed_only,
                       identity=os.path.expanduser(dest.identity) if dest.identity else None,
                       accept_host_key=dest.host_key, client_home=home, parts=parts,
                       excludes=destination_excludes(dest))


# ------------------------------------------------------------- sentences

def success_message(res: SendResult, resumed: bool = False) -> str:
    """The sentence at the end of a send that worked."""
    resumed = resumed or res.resumed or res.resumed_files > 0
    if res.entry is None:
        if res.unchanged:
            return (f"Nothing was sent: none of the {plural(res.unchanged, 'file')} changed since the last "
                    f"send to study {res.study}.")
        return "Nothing was sent: there are no files in what you ticked."
    what = f"{plural(res.files, 'file')} ({format_size(res.bytes)})"
    how = ", finishing the send that was stopped earlier" if resumed else ""
    return (f"Sent {what} to study {res.study}{how}. "
            f"{'They' if res.files != 1 else 'It'} will appear in the archive within a minute.")


def result_notes(res: SendResult) -> list[str]:
    """Smaller lines under the sentence: what was left out, the upload's name."""
    notes = []
    if res.unchanged:
        notes.append(f"{plural(res.unchanged, 'file')} left out: sent before and not changed since.")
    if res.excluded:
        notes.append(f"{plural(res.excluded, 'file or folder', 'files or folders')} left out (ones that are "
                     "never sent, such as Thumbs.db).")
    if res.symlinks:
        notes.append(f"{plural(res.symlinks, 'shortcut')} (symbolic links) not sent.")
    if res.special:
        notes.append(f"{plural(res.special, 'special file')} not sent.")
    if res.entry:
        notes.append(f"The upload is called {res.entry}: quote this name if you ask about it.")
    return notes


CANCELLED = ("Sending was stopped. Nothing reaches the archive until a send is complete; "
             "press Send to continue where it stopped.")


@dataclass
class Failure:
    headline: str       # what happened, in plain words
    advice: str         # what to do next
    detail: str         # the technical message (also in Copy details)


def explain_failure(exc: BaseException) -> Failure:
    """A failed send in plain words, with what to do next."""
    msg = exc.message if isinstance(exc, errors.EideticError) else f"{type(exc).__name__}: {exc}"
    low = msg.lower()
    runner = "Press Copy details and send them to your study runner."
    if isinstance(exc, HostKeyError):
        if "changed" in low:
            return Failure(
                "The server's identity has CHANGED since this computer last sent to it, so nothing was sent.",
                "Do not send again yet. Either the server was reinstalled, or someone is between you and "
                "the server. Tell your study runner now; " + runner[0].lower() + runner[1:], msg)
        if "--accept-host-key" in low and "not the" in low:
            return Failure(
                "The server's fingerprint is not the one saved for this destination, so nothing was sent.",
                "Do not send again yet: tell your study runner. " + runner, msg)
        return Failure("The server's fingerprint was not accepted, so nothing was sent.",
                       "Compare the fingerprint with the one your study runner gave you, then press Send "
                       "again and accept it only if it is exactly the same.", msg)
    if isinstance(exc, TransportError):
        if "authentication failed" in low or "wrong passphrase" in low or "passphrase" in low:
            return Failure("The server did not accept your login.",
                           "Check your user name and type your password again (or the passphrase of your "
                           "key), then press Send. If it still fails, ask your study runner.", msg)
        if "connection" in low and ("lost" in low or "failed" in low) or "cannot connect" in low:
            what = "The connection to the server was lost." if "lost" in low else \
                "The server could not be reached."
            return Failure(what, "Check that this computer is on the network, then press Send again: it "
                                 "continues where it stopped. If it keeps failing, tell your study runner.", msg)
        if "does not exist" in low:
            return Failure("The inbox could not be found.",
                           "If it is a shared folder, check that it is connected (mounted), then press Send "
                           "again. Otherwise tell your study runner. " + runner, msg)
        if "permission denied" in low:
            return Failure("You are not allowed to write into the inbox.", "Tell your study runner. " + runner,
                           msg)
        if "full" in low or "quota" in low:
            return Failure("The inbox is full.", "Tell your study runner; press Send again once there is room: "
                                                 "it continues where it stopped.", msg)
        return Failure("The inbox could not be reached or used.",
                       "Press Send again in a moment: it continues where it stopped. If it keeps failing, "
                       "tell your study runner. " + runner, msg)
    if isinstance(exc, LockBusy):
        return Failure("This folder is already being sent to this destination (in another window or by a "
                       "scheduled task).", "Wait until that send has finished, then press Send again.", msg)
    if isinstance(exc, SendError):
        if "cannot be read" in low or "kept changing" in low or "disappeared" in low or "not sent" in low:
            return Failure("Some files could not be sent, so the upload was not finished.",
                           "Close the programs that use those files (see below), then press Send again: "
                           "what was sent already is kept and not sent twice.", msg)
        return Failure("The send failed.", "Press Send again. If it fails again, " + runner[0].lower()
                       + runner[1:], msg)
    if isinstance(exc, UsageError):
        return Failure("This cannot be sent as it is.", msg[:1].upper() + msg[1:], msg)
    if isinstance(exc, errors.ConfigError):
        return Failure("The settings of this computer cannot be read.", "Tell your study runner. " + runner,
                       msg)
    if isinstance(exc, errors.EideticError):
        return Failure("The send failed.", runner, msg)
    return Failure("Something unexpected went wrong.", "Press Send again. If it happens again, "
                   + runner[0].lower() + runner[1:], msg)


_RESUMING = re.compile(r"^resuming interrupted upload \.(\S+) \((\d+) of (\d+) files already sent\)")


def plain_notice(msg: str) -> str:
    """A notice of the send core, as the app shows it."""
    m = _RESUMING.match(msg)
    if m:
        return (f"Continuing the send that was stopped earlier: {int(m.group(2)):,} of "
                f"{plural(int(m.group(3)), 'file')} were already sent.")
    if msg.startswith("the earlier interrupted upload") and "starting afresh" in msg:
        return "The send that was stopped earlier is no longer in the inbox, so everything is sent again."
    if msg.startswith("the earlier upload") and "was completed" in msg:
        return "The send that was stopped earlier had in fact finished."
    return msg[:1].upper() + msg[1:]


def is_resume_notice(msg: str) -> bool:
    return bool(_RESUMING.match(msg))


def host_key_text(info: HostKeyInfo) -> tuple[str, str, str]:
    """(the sentence before the fingerprint, the fingerprint line, the sentence after)."""
    host = info.host
    if host.startswith("[") and "]:" in host:
        name, port = host[1:].split("]:", 1)
        host = f"{name} (port {port})"
    before = (f"This computer has not sent to the server {host} before. "
              "The server identifies itself with this fingerprint:")
    after = ("Compare it with the fingerprint your study runner gave you. Press Accept only if the two are "
             "exactly the same; if they differ, press Do not connect and tell your study runner.")
    return before, f"{info.type_name} {info.fingerprint}", after


_PASSWORD_PROMPT = re.compile(r"^(?P<user>.+)@(?P<host>[^@]+)'s password:\s*$")
_PASSPHRASE_PROMPT = re.compile(r"^Enter passphrase for key '(?P<key>.+)':\s*$")
# The send core names refused keys before asking (client/transport.py).
_REFUSED_PROMPT = re.compile(r"^(?P<why>.+); password for (?P<user>.+)@(?P<host>[^@]+):\s*$")


def password_text(prompt: str) -> tuple[str, str]:
    """(the dialog's question, the field's label) for a prompt of the send core."""
    m = _PASSWORD_PROMPT.match(prompt)
    if m:
        return (f"The server {m.group('host')} asks for the password of {m.group('user')}.", "Password:")
    m = _PASSPHRASE_PROMPT.match(prompt)
    if m:
        return (f"Your key {m.group('key')} is protected by a passphrase.", "Passphrase:")
    m = _REFUSED_PROMPT.match(prompt)
    if m:
        why = m.group("why")
        return (f"{why[:1].upper()}{why[1:]}. The server {m.group('host')} asks for the password of "
                f"{m.group('user')} instead.", "Password:")
    return (prompt.strip().rstrip(":"), "Password:")


def details_text(what: dict, outcome: str, exc: BaseException | None = None, tb: str | None = None,
                 notices: list[str] | None = None, res: SendResult | None = None) -> str:
    """The full technical detail of a send, for the study runner (Copy details)."""
    lines = [f"eidetic {__version__} desktop app on {platform.platform()} (Python {platform.python_version()})",
             f"time: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}",
             f"outcome: {outcome}"]
    lines += [f"{k}: {v}" for k, v in what.items() if v not in (None, "", ())]
    if res is not None:
        lines.append("result: " + ", ".join(f"{k}={v}" for k, v in vars(res).items()))
    for n in notices or []:
        lines.append(f"notice: {n}")
    if exc is not None:
        msg = exc.message if isinstance(exc, errors.EideticError) else str(exc)
        lines.append(f"error: {type(exc).__name__}: {msg}")
    if tb:
        lines.append(tb.rstrip())
    return "\n".join(lines) + "\n"


# ------------------------------------------------------ remembered choices

@dataclass
class Choices:
    """What the app remembers between runs (never a password)."""
    destination: str | None = None
    per_destination: dict[str, dict] = field(default_factory=dict)   # name -> source, user, ticks

    def for_dest(self, name: str) -> dict:
        return self.per_destination.setdefault(name, {})

    def remember(self, name: str, source: str, user: str, sel: Selection, changed_only: bool) -> None:
        self.destination = name
        d = self.for_dest(name)
        d.update({"source": source, "user": user, "changed_only": changed_only, **sel.to_json()})

    def to_json(self) -> dict:
        return {"version": 1, "destination": self.destination, "destinations": self.per_destination}


def choices_path(home: str) -> str:
    return os.path.join(home, CHOICES_NAME)


def load_choices(home: str) -> Choices:
    """The remembered choices; a missing or unreadable file is no choices
    (it is only a convenience, never a reason not to start)."""
    try:
        with open(choices_path(home), "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError):
        return Choices()
    if not isinstance(doc, dict):
        return Choices()
    dest = doc.get("destination")
    per = doc.get("destinations")
    per = {k: v for k, v in per.items() if isinstance(k, str) and isinstance(v, dict)} \
        if isinstance(per, dict) else {}
    return Choices(dest if isinstance(dest, str) else None, per)


def save_choices(home: str, choices: Choices) -> bool:
    """Write the choices atomically (False when it could not: not worth
    interrupting a collector for)."""
    data = (json.dumps(choices.to_json(), indent=1, sort_keys=True) + "\n").encode()
    try:
        os.makedirs(home, exist_ok=True)
        write_atomic(choices_path(home), data, mode=0o600)
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- workers

@dataclass
class Event:
    kind: str           # "notice" | "ask_host_key" | "ask_password" | "done" | "cancelled" | "failed"
    value: object = None
    traceback: str | None = None


class SendJob:
    """One send in a worker thread.  The window polls :attr:`events` and
    :meth:`take_progress`; questions (``ask_*`` events) wait for :meth:`answer`."""

    def __init__(self, opts: SendOptions, send_fn: Callable[[SendOptions, SendHooks], SendResult] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.opts = opts
        self.send_fn = send_fn
        self.clock = clock
        self.events: queue.Queue[Event] = queue.Queue()
        self.notices: list[str] = []
        self.resumed = False
        self.meter = RateMeter()
        self._progress: SendProgress | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._answers: queue.Queue[object] = queue.Queue()
        self._asking = False
        self.thread: threading.Thread | None = None
        self.started = clock()

    # -- the window's side

    def start(self) -> "SendJob":
        self.thread = threading.Thread(target=self._run, name="eidetic-send", daemon=True)
        self.thread.start()
        return self

    def cancel(self) -> None:
        self._stop.set()
        if self._asking:
            self._answers.put(None)

    @property
    def cancelling(self) -> bool:
        return self._stop.is_set()

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def answer(self, value: object) -> None:
        self._answers.put(value)

    def take_progress(self) -> SendProgress | None:
        """The latest progress since the last call (None: nothing new)."""
        with self._lock:
            p, self._progress = self._progress, None
        return p

    # -- the worker's side

    def _on_progress(self, p: SendProgress) -> None:
        with self._lock:
            self._progress = p
        if p.phase == "sending":
            self.meter.add(self.clock(), p.bytes_done)

    def _on_notice(self, msg: str) -> None:
        if is_resume_notice(msg):
            self.resumed = True
        self.notices.append(msg)
        self.events.put(Event("notice", msg))

    def _ask(self, kind: str, value: object) -> object:
        if self._stop.is_set():
            return None
        self._asking = True
        try:
            self.events.put(Event(kind, value))
            return self._answers.get()
        finally:
            self._asking = False

    def hooks(self) -> SendHooks:
        return SendHooks(progress=self._on_progress, notice=self._on_notice,
                         confirm_host_key=lambda info: bool(self._ask("ask_host_key", info)),
                         password=lambda prompt: self._ask("ask_password", prompt) or None,
                         should_stop=self._stop.is_set)

    def _run(self) -> None:
        try:
            hooks = self.hooks()
            if self.send_fn is not None:
                res = self.send_fn(self.opts, hooks)
            else:
                from .send import send
                res = send(self.opts, hooks)
        except SendCancelled as e:
            self.events.put(Event("cancelled", e))
        except BaseException as e:     # everything reaches the window, in plain words
            # Cancel pressed while a question was open answers it "no": the
            # failure that follows is the Cancel (a changed host key never is).
            changed_key = isinstance(e, HostKeyError) and "CHANGED" in e.message
            if self._stop.is_set() and isinstance(e, errors.EideticError) and not changed_key:
                self.events.put(Event("cancelled", e))
            else:
                self.events.put(Event("failed", e, traceback.format_exc()))
        else:
            self.resumed = self.resumed or res.resumed
            self.events.put(Event("done", res))


class ScanJob:
    """A folder scan (:func:`scan_folder` plus the ledger) in a worker thread;
    a newer scan makes an older one stop and be ignored."""

    def __init__(self, home: str, dest: SavedDestination, to: str, source: str) -> None:
        self.home, self.dest, self.to, self.source = home, dest, to, source
        self.result: FolderScan | None = None
        self.interrupted: Interrupted | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eidetic-scan", daemon=True)

    def start(self) -> "ScanJob":
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def done(self) -> bool:
        return not self.thread.is_alive()

    def _run(self) -> None:
        try:
            ledger = sent_before(self.home, self.to, self.dest.study)
            scan = scan_folder(self.source, destination_excludes(self.dest), ledger, self._stop.is_set)
            if scan.error is None:
                self.interrupted = interrupted_send(self.home, self.to, self.dest.study, self.source)
            self.result = scan
        except Exception as e:      # never leave the window waiting
            self.result = FolderScan(self.source, error=f"The folder could not be looked at ({e}).")
