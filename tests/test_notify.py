"""Email notifications against a real SMTP server on 127.0.0.1 (tests/smtp_peer.py)."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

import eidetic.server.config
import eidetic.server.deploy
from conftest import Layout, drop
from daemon_helpers import set_study, small_tmpfs
from eidetic.core import layout as L
from eidetic.core.fsutil import disk_percent_used
from eidetic.server.ingest import EntryResult, Ingester
from eidetic.server.notify import GIVE_UP_SECONDS, Notifier
from smtp_peer import SMTPServer

ADMIN = "datamanager@example.org"
PI = "pi-s1@example.org"


class Clock:
    """An injectable time.time()."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def notify_layout(root: Path, port: int, studies: tuple[str, ...] = ("s1", "s2"), notify: dict | None = None,
                  study: dict | None = None, **top) -> Layout:
    """A config with a notify section; study s1's people are PI (plus *study* keys)."""
    root.mkdir(parents=True, exist_ok=True)
    doc: dict = {"state": str(root / "state"), "inbox": str(root / "inbox"), "settle_seconds": 0,
                 "notify": {"smtp_host": "127.0.0.1", "smtp_port": port, "sender": "eidetic@dropbox.example.org",
                            "admin": [ADMIN], **(notify or {})},
                 "studies": {}, **top}
    for s in studies:
        body: dict = {"tree": str(root / "trees" / s), "store": str(root / "stores" / s)}
        if s == "s1":
            body.update({"notify": [PI], **(study or {})})
        doc["studies"][s] = body
    path = root / "eidetic.yaml"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    cfg = eidetic.server.config.load(str(path))
    eidetic.server.deploy.init(cfg)
    return Layout(root, path, cfg)


@pytest.fixture
def smtp(tmp_path):
    with SMTPServer(tmp_path / "smtp") as server:
        yield server


def outbox(lay: Layout) -> list[str]:
    d = lay.state / "notify" / "outbox"
    return sorted(n for n in os.listdir(d) if n.endswith(".eml")) if d.exists() else []


def ingest(lay: Layout, n: Notifier) -> list[EntryResult]:
    ing = Ingester(lay.cfg)
    try:
        results = ing.run_once(settle_seconds=0)
    finally:
        ing.close()
    for r in results:
        n.entry_result(r)
    return results


# ----------------------------------------------------------------- failures

def test_failed_entry_mails_the_studys_people_and_the_admin_with_what_why_where(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port)
    (lay.inbox / "s1-labA-1").write_bytes(b"a plain file, not a folder\n")
    logs: list[str] = []
    n = Notifier(lay.cfg, logs.append)
    [r] = ingest(lay, n)
    assert r.outcome == "failed"
    assert n.deliver() == 1
    [m] = smtp.wait_for(1)
    assert sorted(m.rcpt_tos) == sorted([PI, ADMIN])
    assert m.mail_from == "eidetic@dropbox.example.org"
    assert m.subject == "[eidetic] s1: upload s1-labA-1 FAILED"
    msg = m.message
    for header in ("From", "To", "Date", "Message-ID"):
        assert msg[header], header
    body = m.body
    assert "s1-labA-1" in body and r.upload in body
    assert "not a folder" in body                       # why
    assert r.where in body and os.path.exists(r.where)  # where the data lies now
    assert "What to do next" in body and "Send the data again" in body   # what to do: a file cannot
    assert "mv " not in body                            # become a folder by a rename
    assert outbox(lay) == []


def test_an_entry_naming_no_study_is_mailed_to_the_admin_only(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port)
    drop(lay.inbox, "nosuchstudy-labA-1", {"a.txt": b"x"})
    n = Notifier(lay.cfg, lambda _: None)
    [r] = ingest(lay, n)
    assert r.outcome == "failed" and r.study is None
    assert n.deliver() == 1
    [m] = smtp.wait_for(1)
    assert m.rcpt_tos == [ADMIN]
    assert "nosuchstudy-labA-1" in m.subject and "FAILED" in m.subject
    assert "configured: s1, s2" in m.body


def test_non_ascii_names_survive_and_recipients_are_deduplicated(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, study={"notify": [PI, ADMIN.upper(), PI]})
    raw = "s1-Müller-Ωmega-".encode() + b"\xff"
    where = os.fsdecode(os.fsencode(lay.cfg.inbox) + b"/" + L.inbox_state_name("failed", "20261121T103000Z-"
                                                                                "3f2a1b0c", raw))
    r = EntryResult(L.display(raw), "s1", "failed", upload="20261121T103000Z-3f2a1b0c",
                    reason="the entry is not a folder; an upload must be a folder of files", where=where)
    n = Notifier(lay.cfg, lambda _: None)
    n.entry_result(r)
    assert n.deliver() == 1
    [m] = smtp.wait_for(1)
    assert [a.lower() for a in m.rcpt_tos] == [PI, ADMIN]
    assert "s1-Müller-Ωmega-\\xff" in m.subject
    assert "s1-Müller-Ωmega-\\xff" in m.body
    m.data.decode("ascii")    # on the wire the message is 7-bit clean


# -------------------------------------------------------------- disk warnings

def _fill_to(store: Path, percent: int) -> None:
    """Make the tmpfs holding *store* *percent* full (as df rounds it)."""
    filler = store.parent / "filler"
    if filler.exists():
        filler.unlink()
    u = shutil.disk_usage(store)
    total = u.used + u.free
    want = int(total * (percent - 0.5) / 100) - u.used
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, want))
    assert disk_percent_used(store) == percent


def test_exactly_one_disk_warning_per_threshold_crossing_also_across_restarts(tmp_path, smtp):
    with small_tmpfs(tmp_path / "fs") as fsdir:
        lay = notify_layout(tmp_path / "l", smtp.port, studies=("s1",))
        # the study on the small file system (config checked tree and store share it)
        cfg = set_study(lay, "s1", init=True, tree=str(fsdir / "tree"), store=str(fsdir / "store")).cfg
        store = Path(cfg.study("s1").store)
        n = Notifier(cfg, lambda _: None)

        def mails_after(percent: int, notifier: Notifier = n) -> list:
            before = len(smtp.received)
            _fill_to(store, percent)
            notifier.tick()
            notifier.deliver()
            time.sleep(0.05)
            return smtp.received[before:]

        [m] = mails_after(91)
        assert m.subject == "[eidetic] s1: disk 91% full (warning at 90%)"
        assert sorted(m.rcpt_tos) == sorted([PI, ADMIN])
        assert str(store) in m.body and "91%" in m.body and "Free:" in m.body
        assert mails_after(91) == []                    # a second tick says nothing
        [m] = mails_after(96)
        assert m.subject == "[eidetic] s1: disk 96% full (warning at 95%)"
        assert mails_after(92) == []                    # back below 95: re-armed, silent
        [m] = mails_after(96)
        assert "(warning at 95%)" in m.subject
        assert mails_after(50) == []
        [m] = mails_after(91)
        assert "(warning at 90%)" in m.subject
        assert mails_after(91, Notifier(cfg, lambda _: None)) == []   # a restart does not repeat it
        assert len(smtp.received) == 4


# --------------------------------------------------------- unfinished uploads

def test_an_idle_dot_entry_is_reported_once_and_not_before_stale_hours(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, stale_hours=1)
    partial = lay.inbox / ".s1-labA-7"
    partial.mkdir()
    (partial / "half.txt").write_bytes(b"half")
    (lay.inbox / ".unknown-1").mkdir()
    logs: list[str] = []
    n = Notifier(lay.cfg, logs.append)
    now = time.time()
    n.check_stale(now=now + 1800)          # idle for half an hour: not yet
    assert outbox(lay) == []
    n.check_stale(now=now + 26 * 3600)
    assert n.deliver() == 2
    mails = {m.subject: m for m in smtp.wait_for(2)}
    m = mails["[eidetic] s1: unfinished upload .s1-labA-7 idle for 26 h"]
    assert sorted(m.rcpt_tos) == sorted([PI, ADMIN])
    assert str(partial) in m.body and "root" in m.body
    m = mails["[eidetic] unfinished upload .unknown-1 idle for 26 h"]
    assert m.rcpt_tos == [ADMIN]
    n.check_stale(now=now + 27 * 3600)
    Notifier(lay.cfg, logs.append).check_stale(now=now + 28 * 3600)   # nor after a restart
    assert outbox(lay) == []
    # the same name as a new entry (another inode) is a new upload: reported again
    shutil.rmtree(partial)
    n.check_stale(now=now + 28 * 3600)                 # forgets the gone entry
    partial.mkdir()
    n.check_stale(now=now + 30 * 3600)
    assert n.deliver() == 1
    assert smtp.wait_for(3)[-1].subject.startswith("[eidetic] s1: unfinished upload .s1-labA-7")


def test_daemons_serving_one_study_each_report_only_their_own_unfinished_uploads(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, stale_hours=1)
    for name in (".s1-labA-1", ".s2-labB-1", ".nostudy-1"):
        (lay.inbox / name).mkdir()
    later = time.time() + 26 * 3600
    only_s1 = Notifier(lay.cfg, lambda _: None, studies=["s1"])
    only_s2 = Notifier(lay.cfg, lambda _: None, studies=["s2"])
    for _ in range(2):                      # a second look by either says nothing new
        only_s1.check_stale(now=later)
        only_s2.check_stale(now=later)
    assert only_s1.deliver() + only_s2.deliver() == 2
    subjects = sorted(m.subject for m in smtp.wait_for(2))
    assert subjects == ["[eidetic] s1: unfinished upload .s1-labA-1 idle for 26 h",
                        "[eidetic] s2: unfinished upload .s2-labB-1 idle for 26 h"]
    # The daemon serving every study adds only what is nobody else's.
    everything = Notifier(lay.cfg, lambda _: None)
    everything.check_stale(now=later)
    assert everything.deliver() == 1
    assert smtp.wait_for(3)[-1].subject == "[eidetic] unfinished upload .nostudy-1 idle for 26 h"


# ---------------------------------------------------- delivery and retries

def test_smtp_down_does_not_block_ingest_and_the_mail_goes_out_when_it_is_back(tmp_path):
    server = SMTPServer(tmp_path / "smtp")     # its port is chosen but nothing listens yet
    lay = notify_layout(tmp_path / "l", server.port, study={"notify_uploads": "each"},
                        notify={"retry_seconds": 60})
    drop(lay.inbox, "s1-labA-1", {"data/a.csv": b"1,2\n"})
    clock = Clock()
    logs: list[str] = []
    n = Notifier(lay.cfg, logs.append, clock=clock)
    n.start()
    try:
        t0 = time.monotonic()
        [r] = ingest(lay, n)
        assert r.outcome == "ingested"
        assert time.monotonic() - t0 < 5
    finally:
        n.stop()
    assert len(outbox(lay)) == 1
    assert n.deliver() == 0                           # the server is still down
    assert any("could not deliver 1 mail(s)" in line for line in logs)
    with server:
        assert n.deliver() == 0                       # the retry time has not come
        clock.t += 61
        assert n.deliver() == 1
        [m] = server.wait_for(1)
    assert m.subject.startswith("[eidetic] s1: upload s1-labA-1 ingested")
    assert outbox(lay) == []


def test_an_undeliverable_mail_backs_off_doubling_then_is_given_up_after_seven_days(tmp_path):
    port = SMTPServer(tmp_path / "smtp").port          # never started
    lay = notify_layout(tmp_path / "l", port, notify={"retry_seconds": 100})
    clock = Clock()
    logs: list[str] = []
    n = Notifier(lay.cfg, logs.append, clock=clock)
    n.entry_result(EntryResult("s1-x", "s1", "failed", upload="u", reason="r", where=None))
    [eml] = outbox(lay)
    side = lay.state / "notify" / "outbox" / (eml[:-4] + ".json")
    start = clock.t
    waits = []
    for _ in range(4):
        n.deliver()
        info = json.loads(side.read_text())
        waits.append(info["next_try"] - clock.t)
        clock.t = info["next_try"]
    assert waits == [100, 200, 400, 800]
    clock.t = start + GIVE_UP_SECONDS + 1
    n.deliver()
    assert outbox(lay) == []
    assert sorted(os.listdir(lay.state / "notify" / "failed")) == sorted([eml, eml[:-4] + ".json"])
    assert any("GIVING UP" in line and "s1-x" in line for line in logs)


def test_a_recipient_the_server_refuses_does_not_hold_back_the_others(tmp_path):
    with SMTPServer(tmp_path / "smtp", refuse={PI}) as server:
        lay = notify_layout(tmp_path / "l", server.port)
        logs: list[str] = []
        n = Notifier(lay.cfg, logs.append)
        n.entry_result(EntryResult("s1-x", "s1", "failed", upload="u", reason="r", where=None))
        assert n.deliver() == 1
        [m] = server.wait_for(1)
    assert m.rcpt_tos == [ADMIN]
    assert outbox(lay) == []
    assert any(PI in line and "refused" in line for line in logs)


def test_starttls_with_credentials_from_a_file_and_the_password_never_logged(tmp_path, monkeypatch):
    password = "s3cr3t-Pa55word"
    with SMTPServer(tmp_path / "smtp", starttls=True, auth=("eidetic", password)) as server:
        monkeypatch.setenv("SSL_CERT_FILE", str(server.cert_file))   # trust the throwaway certificate
        creds = tmp_path / "smtp-credentials"
        lay = notify_layout(tmp_path / "l", server.port,
                            notify={"smtp_host": "localhost", "starttls": True, "credentials_file": str(creds)})
        logs: list[str] = []
        n = Notifier(lay.cfg, logs.append)
        n.entry_result(EntryResult("s1-x", "s1", "failed", upload="u", reason="r", where=None))

        assert n.deliver() == 0                                    # file missing: kept for later
        assert any(str(creds) in line for line in logs)
        creds.write_text(f"eidetic\nwrong-{password}\n")
        os.chmod(creds, 0o600)
        n.deliver(now=time.time() + 10_000)
        assert server.received == [] and len(outbox(lay)) == 1    # refused login: kept
        creds.write_text(f"eidetic\n{password}\n")
        os.chmod(creds, 0o604)
        assert n.deliver(now=time.time() + 100_000) == 1
        [m] = server.wait_for(1)
    assert m.tls and m.login == "eidetic"
    assert ("eidetic", False) in server.auth_attempts and ("eidetic", True) in server.auth_attempts
    assert any("readable by other users" in line for line in logs)
    assert not any(password in line for line in logs), logs


def test_the_delivery_thread_sends_a_queued_mail_without_being_asked(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port)
    n = Notifier(lay.cfg, lambda _: None)
    n.start()
    try:
        n.entry_result(EntryResult("s1-x", "s1", "failed", upload="u", reason="r", where=None))
        [m] = smtp.wait_for(1, timeout=10)
    finally:
        n.stop()
    assert "FAILED" in m.subject
    assert outbox(lay) == []


# ------------------------------------------------------ successful uploads

def test_each_successful_upload_is_mailed_to_the_studys_people(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, study={"notify_uploads": "each"})
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"hello", "b/c.txt": b"world!"})
    drop(lay.inbox, "s2-labA-1", {"a.txt": b"s2 has no people"})
    n = Notifier(lay.cfg, lambda _: None)
    results = ingest(lay, n)
    assert [r.outcome for r in results] == ["ingested", "ingested"]
    assert n.deliver() == 1
    [m] = smtp.wait_for(1)
    assert m.rcpt_tos == [PI]                      # successes are not the admin's business
    assert m.subject == "[eidetic] s1: upload s1-labA-1 ingested (2 files, 11 B)"
    assert "New versions:  2" in m.body and "Files:         2" in m.body


def test_a_daily_digest_lists_the_days_uploads_in_one_mail_sent_once(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, study={"notify_uploads": "digest"},
                        notify={"digest_hour": 7})
    drop(lay.inbox, "s1-labA-1", {"a.txt": b"one"})
    drop(lay.inbox, "s1-labB-2", {"a.txt": b"two"})
    n = Notifier(lay.cfg, lambda _: None)
    assert [r.outcome for r in ingest(lay, n)] == ["ingested", "ingested"]
    assert n.deliver() == 0                        # nothing per upload
    today = datetime.now().replace(hour=6, minute=30, second=0, microsecond=0)
    n.digests(now=today)                           # before digest_hour
    assert outbox(lay) == []
    n.digests(now=today.replace(hour=8))
    n.digests(now=today.replace(hour=9))
    Notifier(lay.cfg, lambda _: None).digests(now=today.replace(hour=10))   # a restart: still once
    assert n.deliver() == 1
    [m] = smtp.wait_for(1)
    assert m.rcpt_tos == [PI]
    assert m.subject.startswith("[eidetic] s1: 2 uploads since the last digest")
    assert "s1-labA-1" in m.body and "s1-labB-2" in m.body
    n.digests(now=today.replace(hour=8) + timedelta(days=1))    # a day without uploads: silence
    assert outbox(lay) == []


# ------------------------------------------------------------------ disabled

def test_without_a_notify_section_nothing_is_queued(layout, smtp):
    assert not layout.cfg.notify.enabled
    (layout.inbox / "s1-labA-1").write_bytes(b"plain file")
    (layout.inbox / ".s1-partial").mkdir()
    n = Notifier(layout.cfg, lambda line: pytest.fail(f"logged while disabled: {line}"))
    n.start()
    [r] = ingest(layout, n)
    assert r.outcome == "failed"
    n.tick()
    n.check_stale(now=time.time() + 1e6)
    n.digests()
    assert n.deliver() == 0
    n.stop()
    assert not (layout.state / "notify").exists()
    assert smtp.received == []


def test_a_broken_state_directory_is_logged_never_raised(tmp_path, smtp):
    lay = notify_layout(tmp_path / "l", smtp.port, study={"notify_uploads": "digest"})
    (lay.state / "notify").write_bytes(b"not a directory")
    logs: list[str] = []
    n = Notifier(lay.cfg, logs.append)
    n.entry_result(EntryResult("s1-x", "s1", "failed", upload="u", reason="r", where=None))
    n.entry_result(EntryResult("s1-y", "s1", "ingested", upload="v"))
    n.tick()
    assert n.deliver() == 0
    assert any(line.startswith("mail: entry_result failed: NotADirectoryError") for line in logs), logs
    assert smtp.received == []
