"""The lab PC's side of eidetic: its directory, settings, lock and send state.

Everything here must run on Windows and macOS as well as Linux, and knows
nothing of any server-side config.  The client keeps, in one directory
(:func:`client_dir`):

* ``eidetic-client.yaml``  per-machine settings (``location: labA``)
* ``known_hosts``          SSH host keys this client accepted (OpenSSH format)
* ``send-state.sqlite3``   interrupted uploads (to resume them) and the
                           per-destination ledger of files sent (``--changed-only``)
* ``locks/``               one lock file per (destination, study, source)

fsutil is POSIX-only (O_NOFOLLOW, O_DIRECTORY, fchmod), so the client writes
its few small files itself; sqlite3 makes the state atomic on every platform.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
import sqlite3
import sys
from dataclasses import dataclass
from typing import Iterator

from ..core.errors import LockBusy, UsageError

SETTINGS_NAME = "eidetic-client.yaml"
KNOWN_HOSTS_NAME = "known_hosts"
STATE_NAME = "send-state.sqlite3"
LOCATION_MAX = 64
_LOCATION_BAD = re.compile(r"[^A-Za-z0-9_.]")


def client_dir() -> str:
    """$EIDETIC_CLIENT_HOME, else the platform's per-user state directory."""
    env = os.environ.get("EIDETIC_CLIENT_HOME")
    if env:
        return os.path.abspath(env)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return os.path.join(base, "eidetic")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~"), "Library", "Application Support", "eidetic")
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "eidetic")


def local_user(fallback: str) -> str:
    """The login name on this computer, or *fallback* when the OS knows none
    (a container, an odd Windows setup)."""
    try:
        return getpass.getuser()
    except Exception:       # KeyError (no passwd entry) up to 3.12, OSError since 3.13
        return fallback


def sanitize_location(text: str) -> str:
    """A location for an entry name: "-" separates the name's fields, so only
    letters, digits, "_" and "." are kept (anything else becomes "_")."""
    loc = _LOCATION_BAD.sub("_", text.strip())[:LOCATION_MAX]
    return loc or "unknown"


@dataclass
class Pending:
    """An upload that was started and not yet renamed into place."""
    id: int
    dest: str
    study: str
    source: str
    entry: str          # the final name; the dot-entry is "." + entry
    location: str
    started: str        # layout.utc_iso
    phase: str          # "sending" | "renaming" (the rename may have happened)


@dataclass
class DoneFile:
    relpath: bytes
    size: int
    mtime_ns: int
    blake3: str | None  # None: writing began but did not finish


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pending (
    id INTEGER PRIMARY KEY, dest TEXT NOT NULL, study TEXT NOT NULL, source TEXT NOT NULL,
    entry TEXT NOT NULL, location TEXT NOT NULL, started TEXT NOT NULL, phase TEXT NOT NULL,
    UNIQUE (dest, study, source));
CREATE TABLE IF NOT EXISTS pending_files (
    upload INTEGER NOT NULL, relpath BLOB NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    blake3 TEXT, PRIMARY KEY (upload, relpath));
CREATE TABLE IF NOT EXISTS ledger (
    dest TEXT NOT NULL, study TEXT NOT NULL, relpath BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, blake3 TEXT NOT NULL, entry TEXT NOT NULL,
    PRIMARY KEY (dest, study, relpath));
"""


class SendState:
    """The client's sqlite state.  Every change commits at once: a send killed
    at any point leaves a state that the next run resumes from.  WAL with
    synchronous=NORMAL survives a killed process without an fsync per file
    (a power cut may lose the last few records: those files are sent again)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)
        # The plan of this run: files in walk order (memory stays flat for any count).
        self.db.execute("CREATE TEMP TABLE plan (ord INTEGER PRIMARY KEY, relpath BLOB NOT NULL UNIQUE, "
                        "local TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL)")

    def close(self) -> None:
        self.db.close()

    # -- interrupted uploads

    def pending(self, dest: str, study: str, source: str) -> Pending | None:
        row = self.db.execute("SELECT id, dest, study, source, entry, location, started, phase FROM pending "
                              "WHERE dest=? AND study=? AND source=?", (dest, study, source)).fetchone()
        return Pending(*row) if row else None

    def begin(self, dest: str, study: str, source: str, entry: str, location: str, started: str) -> Pending:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            cur = self.db.execute("INSERT INTO pending (dest, study, source, entry, location, started, phase) "
                                  "VALUES (?, ?, ?, ?, ?, ?, 'sending')",
                                  (dest, study, source, entry, location, started))
        return Pending(cur.lastrowid, dest, study, source, entry, location, started, "sending")

    def set_phase(self, p: Pending, phase: str) -> None:
        self.db.execute("UPDATE pending SET phase=? WHERE id=?", (phase, p.id))
        p.phase = phase

    def forget(self, p: Pending) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM pending_files WHERE upload=?", (p.id,))
            self.db.execute("DELETE FROM pending WHERE id=?", (p.id,))

    def file_started(self, p: Pending, relpath: bytes, size: int, mtime_ns: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO pending_files VALUES (?, ?, ?, ?, NULL)",
                        (p.id, relpath, size, mtime_ns))

    def file_done(self, p: Pending, relpath: bytes, size: int, mtime_ns: int, blake3: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO pending_files VALUES (?, ?, ?, ?, ?)",
                        (p.id, relpath, size, mtime_ns, blake3))

    def file_forget(self, p: Pending, relpath: bytes) -> None:
        self.db.execute("DELETE FROM pending_files WHERE upload=? AND relpath=?", (p.id, relpath))

    def done_file(self, p: Pending, relpath: bytes) -> DoneFile | None:
        row = self.db.execute("SELECT relpath, size, mtime_ns, blake3 FROM pending_files "
                              "WHERE upload=? AND relpath=?", (p.id, relpath)).fetchone()
        return DoneFile(*row) if row else None

    def count_done(self, p: Pending) -> int:
        return self.db.execute("SELECT count(*) FROM pending_files WHERE upload=? AND blake3 IS NOT NULL",
                               (p.id,)).fetchone()[0]

    def files_not_planned(self, p: Pending) -> list[bytes]:
        """Files an earlier run wrote (or began) that this run will not send:
        they must go, or the entry would hold files its description lacks."""
        return [r[0] for r in self.db.execute(
            "SELECT relpath FROM pending_files WHERE upload=? AND relpath NOT IN (SELECT relpath FROM plan)",
            (p.id,))]

    def described(self, p: Pending) -> Iterator[DoneFile]:
        """This upload's files in walk order, as they were sent."""
        cur = self.db.execute(
            "SELECT f.relpath, f.size, f.mtime_ns, f.blake3 FROM plan JOIN pending_files f "
            "ON f.upload=? AND f.relpath=plan.relpath ORDER BY plan.ord", (p.id,))
        for row in cur:
            yield DoneFile(*row)

    def complete(self, p: Pending) -> int:
        """The entry was renamed: record its files in the ledger, forget the upload."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            n = self.db.execute(
                "INSERT OR REPLACE INTO ledger (dest, study, relpath, size, mtime_ns, blake3, entry) "
                "SELECT ?, ?, relpath, size, mtime_ns, blake3, ? FROM pending_files "
                "WHERE upload=? AND blake3 IS NOT NULL", (p.dest, p.study, p.entry, p.id)).rowcount
            self.db.execute("DELETE FROM pending_files WHERE upload=?", (p.id,))
            self.db.execute("DELETE FROM pending WHERE id=?", (p.id,))
        return n

    # -- the plan of this run

    def plan_reset(self) -> None:
        self.db.execute("DELETE FROM plan")

    def plan_add(self, relpath: bytes, local: str, size: int, mtime_ns: int) -> None:
        self.db.execute("INSERT INTO plan (relpath, local, size, mtime_ns) VALUES (?, ?, ?, ?)",
                        (relpath, local, size, mtime_ns))

    def plan(self) -> Iterator[tuple[bytes, str, int, int]]:
        # A second cursor: the caller writes to other tables while iterating.
        yield from self.db.cursor().execute("SELECT relpath, local, size, mtime_ns FROM plan ORDER BY ord")

    def begin_batch(self) -> None:
        self.db.execute("BEGIN")

    def end_batch(self) -> None:
        self.db.execute("COMMIT")

    # -- the ledger of what was sent

    def ledger(self, dest: str, study: str, relpath: bytes) -> DoneFile | None:
        row = self.db.execute("SELECT relpath, size, mtime_ns, blake3 FROM ledger "
                              "WHERE dest=? AND study=? AND relpath=?", (dest, study, relpath)).fetchone()
        return DoneFile(*row) if row else None


class ClientLock:
    """An exclusive lock per (destination, study, source): two sends of the
    same folder would otherwise resume the same entry at once.  The OS drops
    it when the process dies, so a killed send never leaves it behind."""

    def __init__(self, directory: str, key: str, what: str) -> None:
        make_client_dir(directory)
        self.path = os.path.join(directory, hashlib.sha256(key.encode("utf-8", "surrogatepass"))
                                 .hexdigest()[:24] + ".lock")
        self.what = what
        self.fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if sys.platform == "win32":
                import msvcrt
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LockBusy(f"another 'eidetic send' of {self.what} is running; "
                           "wait for it to finish (or stop it) and try again") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "ClientLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_client_dir(directory: str) -> None:
    """The client's folder, made if missing; a file in its place is one line
    naming what to change (not "File exists")."""
    try:
        os.makedirs(directory, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        how = ("set EIDETIC_CLIENT_HOME to a folder" if os.environ.get("EIDETIC_CLIENT_HOME")
               else "move that file away")
        raise UsageError(f"the uploader's own folder {directory} is a file, not a folder: {how}") from None


def open_state(directory: str) -> SendState:
    make_client_dir(directory)
    return SendState(os.path.join(directory, STATE_NAME))
