"""Email notifications: who is told what, and in which words.  Failed
uploads, store faults, full disks, abandoned uploads, and (optionally)
successful uploads, one by one or as a daily digest.

Nothing here may slow down or fail an ingest.  Every mail goes into the
durable outbox of :mod:`.outbox`, whose thread delivers it over SMTP.  The
rest of ``<state>/notify/`` remembers what was already said, so that a
restart does not say it again::

    disk/<study>.json        highest warning threshold crossed (0 = none)
    stale/<study>.json       unfinished uploads already reported (``-.json``: of no study)
    digest/<study>/<upload>.json   successful uploads not yet in a digest
    digest/<study>.day       the local date of the last digest
    replica/<study>/<replica>.json   whether that replica's lag was already reported

No public method raises: problems are logged, one line each.
"""

from __future__ import annotations

import email.utils
import errno
import functools
import os
import pwd
import secrets
import shlex
import shutil
import threading
import time
from datetime import datetime, timezone
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import TYPE_CHECKING, Callable, Collection

from ..core import layout
from ..core.fsutil import disk_percent_used, is_temp_name
from .config import Config, StudyConfig
from .inbox import PartialEntry, partial_entries
from .outbox import GIVE_UP_SECONDS, Outbox, discard, read_json, write_json

__all__ = ["GIVE_UP_SECONDS", "Notifier"]   # GIVE_UP_SECONDS: the outbox's, named here too

if TYPE_CHECKING:   # ingest pulls in the whole store stack; only its record type is needed
    from ..core.errors import StoreIOError
    from .ingest import EntryResult

Log = Callable[[str], None]

MAX_SUBJECT_NAME = 80                    # entry names are cut to this in subject lines
STALE_CHECK_SECONDS = 300                # tick() walks unfinished uploads at most this often


def _quiet(_: str) -> None:
    pass


def _side_channel(method=None, *, default=None):
    """Mail is a side channel: with mail off (no notify.sender) a public method
    does nothing, and a bug or an I/O error in it is logged, never raised into
    the ingest loop that called us; either way it returns *default*."""
    def decorate(method):
        @functools.wraps(method)
        def wrapper(self: "Notifier", *args, **kwargs):
            if not self.enabled:
                return default
            try:
                return method(self, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - see docstring
                self.log(f"mail: {method.__name__} failed: {type(e).__name__}: {e}")
                return default
        return wrapper
    return decorate(method) if method is not None else decorate


class Notifier:
    """Decides which mails an event calls for, writes them, and queues them
    in the outbox, which delivers them in the background.

    *clock* (seconds since the epoch) is injectable so tests can reach a
    retry time or an idle threshold without waiting; *debug* receives the
    messages that are only worth seeing with ``-v`` (a mail queued, nobody
    to tell, a disk that cannot be checked).  With mail off every public
    method does nothing, so a caller need not check ``enabled``."""

    def __init__(self, cfg: Config, log: Log, *, clock: Callable[[], float] = time.time,
                 debug: Log | None = None, studies: Collection[str] | None = None) -> None:
        """*studies*: the studies whose periodic mail (disk, unfinished
        uploads, digests) this notifier looks after; None = all of them and the
        entries of no study (a daemon started with --study passes its one)."""
        self.cfg = cfg
        self.studies = None if studies is None else frozenset(studies)
        self.n = cfg.notify
        self.log = log
        self._debug = debug or _quiet
        self._clock = clock
        self.root = os.path.join(cfg.state, "notify")
        self.outbox = Outbox(self.root, self.n, log, clock=clock)
        self._lock = threading.RLock()          # state read-modify-write
        self._last_stale_check: float | None = None

    @property
    def enabled(self) -> bool:
        return self.n.enabled

    # ------------------------------------------------------------ events

    def report(self, r: EntryResult) -> None:
        """Everything a finished or failed entry calls for, as an Ingester's
        on_result would hear it (the daemon and ``ingest --once``): its mail,
        and after an ingest a look at the study's disk, which it may have filled."""
        self.entry_result(r)
        if r.outcome == "ingested" and r.study:
            self.check_disk(r.study)

    @_side_channel
    def entry_result(self, r: EntryResult) -> None:
        """Queue the mails an ingest outcome calls for: a failure always (to the
        study's people and the admin), a success per the study's notify_uploads."""
        study = self.cfg.studies.get(r.study) if r.study else None
        if r.outcome == "failed":
            people = (study.notify if study else ()) + self.n.admin
            self._queue(self._failure_subject(r), self._failure_body(r, study), people)
        elif r.outcome == "ingested" and study is not None and study.notify:
            if study.notify_uploads == "each":
                self._queue(f"[eidetic] {study.name}: upload {_short(r.entry)} ingested "
                            f"({r.files} files, {layout.human_bytes(r.bytes)})",
                            self._success_body(r, study), study.notify)
            elif study.notify_uploads == "digest":
                self._remember_for_digest(r, study)

    @_side_channel
    def store_fault(self, study: str, e: "StoreIOError", then: str) -> None:
        """Ingest of *study* stopped: its store could not be written (a full
        disk, an I/O error, a read-only file system, a failed sync).  To the
        admin and the study's people: no upload is lost or failed, but
        nothing more is ingested until the cause is fixed."""
        s = self.cfg.studies.get(study)
        people = (s.notify if s else ()) + self.n.admin
        lines = [f"eidetic stopped ingesting study {study}: its store could not be written.", "",
                 f"Why:    {_clean(e.message)}"]
        if e.entry_note:
            lines.append(f"Upload: {_clean(e.entry_note)}")
        lines += ["", "No upload was reported failed for this, and none is lost: an upload not yet",
                  "committed waits in the inbox; a committed one is finished by the next run.",
                  f"Now:    {then}.", "",
                  "What to do next:",
                  "  1. Fix the cause (free space on the study's disk; for an I/O error or a",
                  "     read-only file system look at the kernel log: dmesg, smartctl).",
                  "  2. Check the store: eidetic fsck --study " + study,
                  "  3. Ingest resumes by itself after a full disk; after a failed sync, reload",
                  "     the daemon: systemctl reload eidetic", ""]
        kind = ("sync failed" if e.sync_failed else "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT)
                else "store error")
        self._queue(f"[eidetic] {study}: ingest stopped ({kind})", "\n".join(lines), people)

    @_side_channel
    def check_disk(self, study: str) -> None:
        """One warning mail each time the store's file system climbs past a
        threshold; falling back below re-arms it."""
        s = self.cfg.studies.get(study)
        if s is None:
            return
        try:
            percent = disk_percent_used(s.store)
        except OSError as e:
            self._debug(f"mail: cannot check the disk of study {study} ({s.store}): {e.strerror}")
            return
        level = max((t for t in self.n.disk_warn_percent if percent >= t), default=0)
        with self._lock:
            path = os.path.join(self.root, "disk", study + ".json")
            before = int(read_json(path).get("level", 0))
            if level == before:
                return
            if level > before:   # mail first: a crash in between repeats a mail rather than losing it
                usage = shutil.disk_usage(s.store)     # only for the mail's text
                self._queue(f"[eidetic] {study}: disk {percent}% full (warning at {level}%)",
                            self._disk_body(s, percent, level, usage.free, usage.total), s.notify + self.n.admin)
                self.log(f"mail: study {study}: disk {percent}% full, crossed {level}%")
            write_json(path, {"level": level, "percent": percent, "at": _utc(self._clock())})

    @_side_channel
    def check_replica_lag(self, study: str, replica: str, uploads: int, oldest_received: datetime | None,
                          lag_seconds: float, error: str | None = None) -> None:
        """One mail each time a replica falls more than the study's
        replica_lag_hours behind (*uploads* not on it, the oldest received at
        *oldest_received*); catching up re-arms it.  *error*: why the last
        replication failed, if it did."""
        s = self.cfg.studies.get(study)
        if s is None or not any(r.name == replica for r in s.replicas):
            return
        behind = uploads > 0 and lag_seconds > s.replica_lag_hours * 3600
        with self._lock:
            path = os.path.join(self.root, "replica", study, replica + ".json")
            before = bool(read_json(path).get("behind", False))
            if behind == before:
                return
            if behind:   # mail first: a crash in between repeats a mail rather than losing it
                hours = lag_seconds / 3600
                self._queue(f"[eidetic] {study}: replica {replica} is {hours:.0f} h behind "
                            f"({uploads} upload{'s' if uploads != 1 else ''} not replicated)",
                            self._replica_lag_body(s, replica, uploads, oldest_received, hours, error),
                            s.notify + self.n.admin)
                self.log(f"mail: study {study}: replica {replica} {hours:.1f} h behind, reported")
            write_json(path, {"behind": behind, "uploads": uploads, "at": _utc(self._clock())})

    def _replica_lag_body(self, s: StudyConfig, replica: str, uploads: int, oldest: datetime | None,
                          hours: float, error: str | None) -> str:
        r = next(r for r in s.replicas if r.name == replica)
        since = oldest.astimezone().strftime("%Y-%m-%d %H:%M %Z") if oldest else "?"
        return "\n".join([
            f"The replica {replica} of study {s.name} ({r.url}) is {hours:.1f} hours behind the",
            f"store: {uploads} upload{'s are' if uploads != 1 else ' is'} not on it yet, the oldest received {since}.",
            f"The study's threshold is {s.replica_lag_hours:g} h (replica_lag_hours).", "",
            f"Last error: {_clean(error)}" if error else "Replication has not failed; it is just slow or was not run.",
            "",
            "Nothing is lost: the uploads are safe in the study's store. Until the replica",
            "catches up they exist in one place only.", "",
            f"What to do next: run 'eidetic replicate --study {s.name} --replica {replica}' to see",
            "the error (endpoint, credentials, bucket), fix it, and check 'eidetic status'.",
            "The daemon retries by itself (every 1 min, doubling to every hour).", "",
            "This mail is sent once each time the replica falls behind the threshold.", ""])

    @_side_channel
    def check_stale(self, now: float | None = None) -> None:
        """Report each dot-entry idle for more than stale_hours once (by inbox,
        name and inode); forget the ones that are gone."""
        if self.cfg.stale_hours <= 0:
            return
        now = self._clock() if now is None else now
        with self._lock:
            # One record per study: daemons serving different studies (--study)
            # never rewrite each other's.
            old: dict[str | None, list] = {}
            reported: dict[str | None, list] = {}
            known: set[tuple] = set()
            for key_study in self._served_keys():
                old[key_study] = read_json(self._stale_path(key_study)).get("reported", [])
                reported[key_study] = [k for k in old[key_study] if _same_inode(k)]
                known |= {(k["inbox"], k["name_hex"], k["ino"]) for k in reported[key_study]}
            for p in partial_entries(self.cfg, idle_at_least=self.cfg.stale_hours * 3600, now=now):
                if p.study not in reported:
                    continue   # another daemon's study
                try:
                    st = os.lstat(p.path)
                except FileNotFoundError:
                    continue
                key = (p.inbox, p.name.hex(), st.st_ino)
                if key in known:
                    continue
                study = self.cfg.studies.get(p.study) if p.study else None
                hours = round(p.idle_seconds / 3600)
                subject = (f"[eidetic] {study.name + ': ' if study else ''}unfinished upload "
                           f"{_short(layout.display(p.name))} idle for {hours} h")
                self._queue(subject, self._stale_body(p, study, now), (study.notify if study else ())
                            + self.n.admin)
                self.log(f"mail: unfinished upload {layout.display(p.path)} idle for {hours} h reported")
                known.add(key)
                reported[p.study].append({"inbox": p.inbox, "name_hex": p.name.hex(), "ino": st.st_ino,
                                          "reported": _utc(now)})
            for key_study, now_reported in reported.items():
                if now_reported != old[key_study]:
                    write_json(self._stale_path(key_study), {"reported": now_reported})

    def _served_keys(self) -> list[str | None]:
        """Studies whose periodic mail is ours; None stands for entries of no study."""
        if self.studies is None:
            return [None, *sorted(self.cfg.studies)]
        return sorted(s for s in self.studies if s in self.cfg.studies)

    def _stale_path(self, study: str | None) -> str:
        return os.path.join(self.root, "stale", (study or "-") + ".json")

    @_side_channel
    def digests(self, now: datetime | None = None) -> None:
        """Queue each digest study's daily summary once a day, after
        notify.digest_hour local time, when it had uploads."""
        now = datetime.fromtimestamp(self._clock()).astimezone() if now is None else now
        if now.tzinfo is not None:
            now = now.astimezone()      # the digest hour is local time
        if now.hour < self.n.digest_hour:
            return
        day = now.date().isoformat()
        served = self._served_keys()
        with self._lock:
            for s in self.cfg.studies.values():
                if s.notify_uploads != "digest" or s.name not in served:
                    continue
                marker = os.path.join(self.root, "digest", s.name + ".day")
                if read_json(marker).get("day") == day:
                    continue
                pending_dir = os.path.join(self.root, "digest", s.name)
                items = _pending(pending_dir)
                if items and s.notify:
                    n_bytes = sum(int(i.get("bytes", 0)) for i in items)
                    # A fixed id: a crash before the pending records are gone
                    # re-queues the same file instead of a second mail.
                    self._queue(f"[eidetic] {s.name}: {len(items)} upload{'s' if len(items) != 1 else ''} "
                                f"since the last digest ({layout.human_bytes(n_bytes)})",
                                self._digest_body(s, items, n_bytes), s.notify, mail_id=f"digest-{s.name}-{day}")
                for i in items:
                    discard(os.path.join(pending_dir, i["_file"]))
                write_json(marker, {"day": day})

    @_side_channel
    def tick(self) -> None:
        """Periodic checks (call every rescan interval) and a delivery wake-up."""
        for study in self._served_keys():
            if study is not None:
                self.check_disk(study)
        now = self._clock()
        # partial_entries walks every file of every unfinished upload: not every few seconds
        if self._last_stale_check is None or now - self._last_stale_check >= STALE_CHECK_SECONDS:
            self._last_stale_check = now
            self.check_stale(now)
        self.digests()
        self.outbox.wake()

    @_side_channel(default=0)
    def deliver(self, now: float | None = None) -> int:
        """One synchronous pass over the outbox; returns how many mails the
        server accepted.  Never raises."""
        return self.outbox.deliver(now)

    def start(self) -> None:
        """Deliver in a background thread (see :meth:`Outbox.start`)."""
        if self.enabled:
            self.outbox.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread; unsent mails stay in the outbox for the next start."""
        self.outbox.stop(timeout)

    # ---------------------------------------------------------- queueing

    def _queue(self, subject: str, body: str, recipients, mail_id: str | None = None) -> None:
        to = _dedupe(recipients)
        if not to:
            self._debug(f"mail: nobody to tell about: {subject}")
            return
        msg = EmailMessage()
        msg["From"] = self.n.sender
        msg["To"] = ", ".join(to)
        msg["Date"] = email.utils.formatdate(self._clock(), localtime=True)
        # an explicit domain: make_msgid would otherwise look up our FQDN (DNS, may block)
        msg["Message-ID"] = email.utils.make_msgid("eidetic", domain=self.n.sender.rpartition("@")[2])
        msg["Subject"] = subject
        msg["Auto-Submitted"] = "auto-generated"     # RFC 3834: no vacation replies
        msg.set_content(body)
        self.outbox.put(msg.as_bytes(policy=SMTP_POLICY), mail_id)
        self._debug(f"mail queued: {subject} (to {', '.join(to)})")

    def _remember_for_digest(self, r: EntryResult, s: StudyConfig) -> None:
        d = os.path.join(self.root, "digest", s.name)
        with self._lock:
            rec = {"entry": r.entry, "upload": r.upload, "files": r.files, "bytes": r.bytes,
                   "new_bytes": r.new_bytes, "new_versions": r.new_versions, "skipped": r.skipped,
                   "seconds": r.seconds, "finished": _utc(self._clock())}
            write_json(os.path.join(d, (r.upload or secrets.token_hex(8)) + ".json"), rec)

    # ---------------------------------------------------------- texts

    def _failure_subject(self, r: EntryResult) -> str:
        if r.study:
            return f"[eidetic] {r.study}: upload {_short(r.entry)} FAILED"
        return f"[eidetic] upload {_short(r.entry)} FAILED (no such study)"

    def _failure_body(self, r: EntryResult, study: StudyConfig | None) -> str:
        where = _clean(r.where) if r.where else None
        lines = [f"The upload {r.entry!s} was NOT ingested.", "",
                 f"What:   entry {r.entry}" + (f", study {r.study}" if r.study else ", no configured study")
                 + (f", upload id {r.upload}" if r.upload else ""),
                 f"Why:    {_clean(r.reason or 'no reason recorded')}"]
        failed_name = where and os.path.basename(where).startswith(
            os.fsdecode(layout.INBOX_RESERVED_PREFIX) + "failed~")
        if where:
            lines += ["Where:  the data lies untouched at", f"          {where}"]
        else:
            lines += ["Where:  the entry is no longer in the inbox."]
        if r.upload and failed_name:
            lines.append(f"        The record is {os.path.join(self.cfg.state, 'failed', r.upload + '.json')}")
        lines += ["", "Nothing of this upload is in the study's tree.", "", "What to do next:"]
        if where and failed_name and r.resend:
            lines += ["  1. Send the data again, as \"Why\" says (the sender runs 'eidetic send' on",
                      "     the machine the data came from). Renaming this entry cannot help: it",
                      "     would fail again for the same reason.",
                      *(f"       {_clean(c)}" for c in r.commands),
                      "  2. Once the new send is ingested, this failed copy may be removed",
                      f"     (as the service user or root): rm -r {shlex.quote(where)}"]
        elif where and failed_name:
            inbox, base = os.path.split(where)
            if r.study:
                target = r.entry
                lines += ["  1. Fix the cause named under \"Why\" (for example make the files readable",
                          "     by the service user, free disk space, or let the client finish).",
                          "  2. Have it ingested again by renaming the entry back to its original name",
                          "     (as the service user or root):",
                          f"       {_mv_command(inbox, base, target)}",
                          "     or send the data again under a new name."]
            else:
                known = ", ".join(sorted(self.cfg.studies))
                example = f"{min(self.cfg.studies)}-{r.entry}" if self.cfg.studies else "<study>-…"
                lines += ["  Rename the entry to a name that starts with the study it belongs to and '-'",
                          f"  (configured: {known}), for example (as the service user or root):",
                          f"       {_mv_command(inbox, base, example)}",
                          "  or send the data again with 'eidetic send --study <study>'."]
        elif where:
            lines += ["  The entry was not marked failed; eidetic tries it again at its next run.",
                      "  If this mail repeats, look at the daemon's log (journalctl -u eidetic)."]
        else:
            lines += ["  Ask the uploader whether the data was moved away, and send it again."]
        return "\n".join(lines) + "\n"

    def _success_body(self, r: EntryResult, s: StudyConfig) -> str:
        return "\n".join([
            f"The upload {r.entry} was ingested into study {s.name}.", "",
            f"Upload id:     {r.upload}",
            f"Files:         {r.files}" + (f" ({r.skipped} skipped: links or special files)" if r.skipped else ""),
            f"Size:          {layout.human_bytes(r.bytes)} ({layout.human_bytes(r.new_bytes)} of it new content)",
            f"New versions:  {r.new_versions}",
            f"Took:          {r.seconds:.1f} s",
            f"Tree:          {s.tree}", "",
            "Nothing needs doing; this is a confirmation. Change studies."
            f"{s.name}.notify_uploads to 'digest' or 'none' for fewer mails.", ""])

    def _digest_body(self, s: StudyConfig, items: list[dict], total: int) -> str:
        lines = [f"Uploads ingested into study {s.name} since the last digest: {len(items)}, "
                 f"{layout.human_bytes(total)} in all.", ""]
        for i in items:
            when = _local(i.get("finished", ""))
            lines.append(f"- {when}  {i.get('entry')}  (upload {i.get('upload')}): {i.get('files')} files, "
                         f"{layout.human_bytes(int(i.get('bytes', 0)))}, {i.get('new_versions')} new versions, "
                         f"{float(i.get('seconds', 0)):.1f} s")
        lines += ["", f"Tree: {s.tree}", "Failures are mailed at once and are not part of this digest.", ""]
        return "\n".join(lines)

    def _disk_body(self, s: StudyConfig, percent: int, level: int, free: int, total: int) -> str:
        higher = [t for t in self.n.disk_warn_percent if t > level]
        return "\n".join([
            f"The file system holding study {s.name}'s store is {percent}% full "
            f"(warning threshold {level}%).", "",
            f"Free:   {layout.human_bytes(free)} of {layout.human_bytes(total)}",
            f"Store:  {s.store}",
            f"Tree:   {s.tree} (same file system)", "",
            "When it is full, new uploads fail with \"no space\" and stay untouched in the",
            "inbox; nothing already stored is at risk. eidetic never deletes old versions,",
            "so space only comes back if the file system grows or other data moves away.", "",
            "What to do next: enlarge the file system or move other data off it; uploads",
            "that found the disk full wait in the inbox and are taken again by themselves.", "",
            "This mail is sent once per threshold crossing"
            + (f"; the next warning comes at {higher[0]}%." if higher else "."), ""])

    def _stale_body(self, p: PartialEntry, study: StudyConfig | None, now: float) -> str:
        try:
            who = pwd.getpwuid(p.uid).pw_name
        except KeyError:
            who = f"uid {p.uid}"
        path = layout.display(p.path)
        since = datetime.fromtimestamp(now - p.idle_seconds).astimezone().strftime("%Y-%m-%d %H:%M %Z")
        final = layout.display(p.name[1:])
        inbox = _clean(p.inbox)
        return "\n".join([
            f"An upload was started but never finished: {layout.display(p.name)}"
            + (f" (study {study.name})" if study else " (its name maps to no configured study)"), "",
            f"Where:     {path}",
            f"Uploader:  {who}",
            f"Idle:      nothing in it changed since {since} ({p.idle_seconds / 3600:.0f} h)", "",
            "A client writes an upload under a name starting with '.' and renames it",
            "when it is complete. This one has not changed for a long time, so the",
            "client probably stopped (crash, lost network, a laptop closed). eidetic",
            "never ingests or removes such an entry.", "",
            "What to do next:",
            f"  - ask {who} to send the data again; once a complete copy has arrived,",
            f"    remove the partial one (as root):  rm -r {shlex.quote(path)}",
            "  - or, if you know it is complete, rename it without the dot:",
            f"       {_mv_command(inbox, layout.display(p.name), final)}", "",
            "This is reported once.", ""])


# -------------------------------------------------------------- helpers

def _dedupe(addresses) -> list[str]:
    seen: set[str] = set()
    out = []
    for a in addresses:
        if a and a.lower() not in seen:
            seen.add(a.lower())
            out.append(a)
    return out


def _mv_command(inbox: str, src: str, dst: str) -> str:
    return f"cd {shlex.quote(inbox)} && mv {shlex.quote(src)} {shlex.quote(dst)}"


def _short(name: str) -> str:
    return name if len(name) <= MAX_SUBJECT_NAME else name[:MAX_SUBJECT_NAME - 1] + "…"


def _clean(text: str) -> str:
    """A str that may carry surrogate escapes (os.fsdecode of any bytes) as
    readable, mail-safe text."""
    return layout.display(os.fsencode(text))


def _utc(t: float) -> str:
    return layout.utc_iso(datetime.fromtimestamp(t, timezone.utc))


def _local(iso: str) -> str:
    try:
        return layout.parse_utc_iso(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _same_inode(key: dict) -> bool:
    try:
        st = os.lstat(os.fsencode(key["inbox"]) + b"/" + bytes.fromhex(key["name_hex"]))
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return st.st_ino == key.get("ino")


def _pending(d: str) -> list[dict]:
    """Digest records of one study, oldest first; each carries its file name as "_file"."""
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.endswith(".json") and not is_temp_name(n):
            rec = read_json(os.path.join(d, n))
            if rec:
                rec["_file"] = n
                out.append(rec)
    out.sort(key=lambda r: (str(r.get("finished", "")), r["_file"]))
    return out
