"""The mail outbox: a durable queue of complete messages and the thread that
hands them to an SMTP server.

A mail is written to ``<state>/notify/outbox/<id>.eml`` (a complete RFC 5322
message, atomically through fsutil) before anything else happens to it; its
envelope is taken from its From and To headers.  It is deleted once the
server accepted it, so a crash can send a mail twice but never lose one.  A
failed attempt leaves a sidecar ``<id>.json`` (attempts, next try, first
failure, last error) and is retried with a doubling back-off; a mail refused
for good (5xx), or undeliverable for GIVE_UP_SECONDS, is moved to
``failed/`` with a loud log line.  Delivery never raises: problems are
logged, one line each; only queuing a mail says so when it cannot be done.
"""

from __future__ import annotations

import email.utils
import json
import os
import secrets
import smtplib
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from email.parser import BytesHeaderParser
from email.policy import SMTP as SMTP_POLICY
from typing import Callable

from ..core import layout
from ..core.fsutil import is_temp_name, makedirs, write_atomic
from .config import NotifyConfig

Log = Callable[[str], None]

GIVE_UP_SECONDS = 7 * 24 * 3600          # an undeliverable mail is kept trying this long
MAX_BACKOFF_SECONDS = 4 * 3600           # retry interval doubles up to this


@dataclass
class _Queued:
    name: str              # file name stem in the outbox
    attempts: int = 0
    next_try: float = 0.0
    first_failure: float | None = None
    last_error: str = ""


class _DeliveryProblem(Exception):
    """Delivery cannot even start (credentials unreadable, ...): retry later."""


class Outbox:
    """The queue in *root* (``<state>/notify``: ``outbox/`` and ``failed/``),
    delivered to the server *smtp* names.  *clock* (seconds since the epoch)
    is injectable so tests can reach a retry time without waiting."""

    def __init__(self, root: str, smtp: NotifyConfig, log: Log, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.dir = os.path.join(root, "outbox")
        self.failed_dir = os.path.join(root, "failed")
        self.n = smtp
        self.log = log
        self._clock = clock
        self._deliver_lock = threading.Lock()   # one delivery pass at a time
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_due: float | None = None
        self._warned_mode = False

    def put(self, message: bytes, name: str | None = None) -> None:
        """Queue *message* durably and wake the delivery thread.  A fixed
        *name* makes queuing the same mail again replace it, not repeat it."""
        makedirs(os.fsencode(self.dir), 0o700, 0o700)
        name = name or f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        write_atomic(os.path.join(self.dir, name + ".eml"), message, mode=0o600)
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    # ---------------------------------------------------------- delivery

    def deliver(self, now: float | None = None) -> int:
        """One synchronous pass: send every mail whose time has come; returns
        how many the server accepted.  Never raises."""
        try:
            with self._deliver_lock:
                return self._deliver(self._clock() if now is None else now)
        except Exception as e:  # noqa: BLE001 - mail is a side channel
            self.log(f"mail: deliver failed: {type(e).__name__}: {e}")
            return 0

    def _deliver(self, now: float) -> int:
        queued = self._list()
        due = [q for q in queued if q.next_try <= now]
        later = [q.next_try for q in queued if q.next_try > now]
        self._next_due = min(later) if later else None
        if not due:
            return 0
        sent = 0
        failed: list[_Queued] = []
        error = ""
        smtp: smtplib.SMTP | None = None
        try:
            smtp = self._connect()
            for i, q in enumerate(due):
                outcome = self._send_one(smtp, q)
                if outcome == "sent":
                    sent += 1
                elif outcome.startswith("retry:"):
                    failed.append(q)
                    error = outcome[6:]
                elif outcome.startswith("broken:"):
                    failed.extend(due[i:])
                    error = outcome[7:]
                    break
        except _DeliveryProblem as e:
            failed, error = due, str(e)
        except (OSError, smtplib.SMTPException) as e:
            failed, error = due, _describe(e)
        finally:
            if smtp is not None:
                try:
                    smtp.quit()
                except (OSError, smtplib.SMTPException):
                    smtp.close()
        if failed:
            waits = [self._reschedule(q, now, error) for q in failed]
            waits = [w for w in waits if w is not None]
            nxt = f"; next try in {min(waits):.0f} s" if waits else ""
            self.log(f"mail: could not deliver {len(failed)} mail(s) via {self.n.smtp_host}:"
                     f"{self.n.smtp_port}: {error}{nxt} (kept in {self.dir})")
            if waits:
                due_at = now + min(waits)
                self._next_due = due_at if self._next_due is None else min(self._next_due, due_at)
        return sent

    def _connect(self) -> smtplib.SMTP:
        creds = self._credentials() if self.n.credentials_file else None
        smtp = smtplib.SMTP(self.n.smtp_host, self.n.smtp_port, timeout=self.n.timeout_seconds)
        try:
            smtp.ehlo()
            if self.n.starttls:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if creds is not None:
                smtp.login(*creds)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def _send_one(self, smtp: smtplib.SMTP, q: _Queued) -> str:
        """'sent', 'gone' (moved to failed/), 'retry:<why>' or 'broken:<why>' (connection lost)."""
        eml = os.path.join(self.dir, q.name + ".eml")
        try:
            with open(eml, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            discard(eml[:-4] + ".json")
            return "gone"
        headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(data)
        sender = email.utils.parseaddr(str(headers.get("From", "")))[1]
        rcpts = [a for _, a in email.utils.getaddresses([str(v) for v in headers.get_all("To", [])]) if a]
        try:
            refused = smtp.sendmail(sender, rcpts, data)
        except smtplib.SMTPRecipientsRefused as e:
            return self._permanent_or_retry(q, e, f"every recipient was refused: {_refusals(e.recipients)}")
        except smtplib.SMTPServerDisconnected as e:
            return f"broken:{_describe(e)}"
        except smtplib.SMTPResponseException as e:
            return self._permanent_or_retry(q, e, _describe(e))
        except (OSError, smtplib.SMTPException) as e:
            return f"broken:{_describe(e)}"
        discard(eml)          # accepted: the mail is the server's now
        discard(eml[:-4] + ".json")
        if refused:
            self.log(f"mail: {headers.get('Subject', '')!s}: server refused {_refusals(refused)}")
        return "sent"

    def _permanent_or_retry(self, q: _Queued, e: Exception, why: str) -> str:
        code = getattr(e, "smtp_code", None)
        if code is None and isinstance(e, smtplib.SMTPRecipientsRefused):
            codes = [c for c, _ in e.recipients.values()]
            code = min(codes) if codes else None
        if code is not None and code >= 500:   # the server will never take it
            self._give_up(q, f"refused by the server: {why}")
            return "gone"
        return f"retry:{why}"

    def _reschedule(self, q: _Queued, now: float, error: str) -> float | None:
        """Record a failed attempt; returns seconds to the next try, None when given up."""
        q.attempts += 1
        q.first_failure = now if q.first_failure is None else q.first_failure
        q.last_error = error
        if now - q.first_failure >= GIVE_UP_SECONDS:
            self._give_up(q, f"undeliverable for {(now - q.first_failure) / 86400:.0f} days: {error}")
            return None
        wait = min(self.n.retry_seconds * 2 ** min(q.attempts - 1, 30),
                   max(MAX_BACKOFF_SECONDS, self.n.retry_seconds))
        q.next_try = now + wait
        write_json(os.path.join(self.dir, q.name + ".json"),
                   {"attempts": q.attempts, "next_try": q.next_try,
                    "first_failure": q.first_failure, "last_error": q.last_error})
        return wait

    def _give_up(self, q: _Queued, why: str) -> None:
        makedirs(os.fsencode(self.failed_dir), 0o700, 0o700)
        src = os.path.join(self.dir, q.name + ".eml")
        dst = os.path.join(self.failed_dir, q.name + ".eml")
        try:
            with open(src, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return
        # A copy, then the original goes: a crash in between gives up on the
        # mail twice, never loses it.
        write_atomic(dst, data, mode=0o600)
        write_json(dst[:-4] + ".json", {"attempts": q.attempts, "reason": why,
                                        "gave_up": layout.utc_iso(datetime.fromtimestamp(self._clock(),
                                                                                         timezone.utc))})
        discard(src)
        discard(src[:-4] + ".json")
        headers = BytesHeaderParser(policy=SMTP_POLICY).parsebytes(data)
        self.log(f"MAIL NOT DELIVERED, GIVING UP: {headers.get('Subject', '')!s} "
                 f"(to {headers.get('To', '')!s}): {why}; kept in {dst}")

    def _list(self) -> list[_Queued]:
        try:
            names = sorted(os.listdir(self.dir))
        except FileNotFoundError:
            return []
        mails = {n[:-4] for n in names if n.endswith(".eml") and not is_temp_name(n)}
        out = []
        for n in names:
            if n.endswith(".json") and not is_temp_name(n) and n[:-5] not in mails:
                discard(os.path.join(self.dir, n))    # its mail was sent; the crash left this
        for stem in sorted(mails):
            side = read_json(os.path.join(self.dir, stem + ".json"))
            try:
                first = side.get("first_failure")
                out.append(_Queued(stem, int(side.get("attempts", 0)), float(side.get("next_try", 0.0)),
                                   None if first is None else float(first), str(side.get("last_error", ""))))
            except (TypeError, ValueError):   # a damaged retry record counts as none, like an unreadable one
                out.append(_Queued(stem))
        return out

    def _credentials(self) -> tuple[str, str]:
        path = self.n.credentials_file
        assert path is not None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise _DeliveryProblem(f"credentials file {path}: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(64 * 1024)
        if not self._warned_mode and (st.st_mode & stat.S_IROTH or
                                      (st.st_mode & stat.S_IRGRP and st.st_gid != os.getegid())):
            self._warned_mode = True
            self.log(f"mail: WARNING: credentials file {path} is readable by other users "
                     f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it (or 640 with the service's group)")
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise _DeliveryProblem(f"credentials file {path} is not UTF-8 text") from None
        if len(lines) < 2 or not lines[0].strip() or not lines[1]:
            raise _DeliveryProblem(f"credentials file {path} must hold the user name on line 1 "
                                   "and the password on line 2")
        return lines[0].strip(), lines[1]

    # ---------------------------------------------------------- thread

    def start(self) -> None:
        """Deliver in a background thread: when woken (a mail was queued) and
        at least every retry_seconds."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._wake.set()      # deliver what a previous run left in the outbox
        self._thread = threading.Thread(target=self._run, name="eidetic-mail", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; unsent mails stay in the outbox for the next start."""
        t = self._thread
        if t is None:
            return
        self._stopping.set()
        self._wake.set()
        t.join(timeout)
        if t.is_alive():
            self.log(f"mail: delivery thread still busy after {timeout:.0f} s (left to finish on its own)")
        else:
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._wait_seconds())
            if self._stopping.is_set():
                break
            self._wake.clear()   # before the pass: a mail queued during it wakes us again
            self.deliver()

    def _wait_seconds(self) -> float:
        wait = self.n.retry_seconds
        if self._next_due is not None:
            wait = min(wait, max(1.0, self._next_due - self._clock()))
        return wait


# ------------------------------------------------ records of <state>/notify

def read_json(path: str) -> dict:
    """A JSON object written by :func:`write_json`; {} when missing or unreadable."""
    try:
        with open(path, "rb") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def write_json(path: str, obj: dict) -> None:
    """*obj* as an indented JSON file readable by the service only; missing folders are made (0700)."""
    makedirs(os.fsencode(os.path.dirname(path)), 0o700, 0o700)
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n", mode=0o600)


def discard(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _describe(e: BaseException) -> str:
    if isinstance(e, smtplib.SMTPResponseException):
        msg = e.smtp_error.decode("utf-8", "replace") if isinstance(e.smtp_error, bytes) else str(e.smtp_error)
        return f"{e.smtp_code} {msg}".replace("\n", " ")
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return (str(e) or type(e).__name__).replace("\n", " ")


def _refusals(recipients: dict) -> str:
    return ", ".join(f"{a} ({c})" for a, (c, _) in recipients.items())
