"""The mail outbox on its own: real files in a temporary state directory and
a real SMTP server on 127.0.0.1 (tests/smtp_peer.py); no Notifier, no config
file.  What the outbox promises (docs/notifications.md, "Where mails wait"
and "Delivery, retries and giving up"): a mail is on disk before anything
else happens to it, survives a restart, is retried with a doubling back-off
while the server cannot take it, and is moved to failed/ with a loud log
line when the server refuses it for good or after GIVE_UP_SECONDS."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from eidetic.core.fsutil import TEMP_PREFIX
from eidetic.server.config import NotifyConfig
from eidetic.server.outbox import GIVE_UP_SECONDS, Outbox
from smtp_peer import SMTPServer

SENDER = "eidetic@dropbox.example.org"
PI = "pi@example.org"
ADMIN = "datamanager@example.org"


class Clock:
    """An injectable time.time()."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def mail(subject: str, to: str = PI) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Auto-Submitted: auto-generated\r\n\r\n{subject}, the body.\r\n").encode()


def make_outbox(tmp_path: Path, port: int, logs: list[str] | None = None, clock=time.time,
                retry_seconds: float = 60) -> Outbox:
    smtp = NotifyConfig(smtp_host="127.0.0.1", smtp_port=port, sender=SENDER, retry_seconds=retry_seconds,
                        timeout_seconds=10)
    return Outbox(str(tmp_path / "state" / "notify"), smtp, (logs if logs is not None else []).append,
                  clock=clock)


def listing(tmp_path: Path, sub: str = "outbox") -> list[str]:
    d = tmp_path / "state" / "notify" / sub
    return sorted(os.listdir(d)) if d.exists() else []


@pytest.fixture
def server(tmp_path):
    with SMTPServer(tmp_path / "smtp") as s:
        yield s


# ------------------------------------------------------------ durability

def test_a_queued_mail_is_on_disk_at_once_and_survives_a_restart(tmp_path):
    down = SMTPServer(tmp_path / "smtp")          # its port is chosen, nothing listens yet
    first = make_outbox(tmp_path, down.port)
    first.put(mail("one"))
    first.put(mail("two"), "fixed-id")
    queued = listing(tmp_path)
    assert len(queued) == 2 and "fixed-id.eml" in queued and all(n.endswith(".eml") for n in queued)
    del first                                     # the daemon stops without a delivery attempt
    with down as server:
        again = make_outbox(tmp_path, server.port)    # the next start finds them
        again.start()
        try:
            got = server.wait_for(2)
        finally:
            again.stop()
    assert sorted(m.data for m in got) == sorted([mail("one"), mail("two")])   # byte for byte
    assert [m.rcpt_tos for m in got] == [[PI], [PI]]
    assert all(m.mail_from == SENDER for m in got)
    assert listing(tmp_path) == []


def test_a_mail_queued_by_earlier_code_with_its_retry_record_is_delivered_when_due(tmp_path, server):
    """The on-disk format of docs/notifications.md: <id>.eml and the sidecar <id>.json."""
    box = tmp_path / "state" / "notify" / "outbox"
    box.mkdir(parents=True)
    clock = Clock()
    (box / "01796456201204937586-1cd62979.eml").write_bytes(mail("from before"))
    (box / "01796456201204937586-1cd62979.json").write_text(json.dumps(
        {"attempts": 3, "first_failure": clock.t - 3600, "last_error": "Connection refused",
         "next_try": clock.t + 100}))
    outbox = make_outbox(tmp_path, server.port, clock=clock)
    assert outbox.deliver() == 0                   # not yet
    clock.t += 100
    assert outbox.deliver() == 1
    [m] = server.wait_for(1)
    assert m.data == mail("from before")
    assert listing(tmp_path) == []


def test_the_same_fixed_id_queued_twice_is_one_mail(tmp_path, server):
    outbox = make_outbox(tmp_path, server.port)
    outbox.put(mail("digest"), "digest-s1-2026-01-02")
    outbox.put(mail("digest"), "digest-s1-2026-01-02")
    assert outbox.deliver() == 1
    time.sleep(0.1)
    assert len(server.received) == 1


def test_a_half_written_mail_of_a_crash_is_never_sent_and_a_stray_retry_record_goes(tmp_path, server):
    box = tmp_path / "state" / "notify" / "outbox"
    box.mkdir(parents=True)
    (box / (TEMP_PREFIX + "dead-1")).write_bytes(mail("half written")[:30])
    (box / "sent-before-the-crash.json").write_text('{"attempts": 1}')
    outbox = make_outbox(tmp_path, server.port)
    outbox.put(mail("complete"))
    assert outbox.deliver() == 1
    [m] = server.wait_for(1)
    assert m.data == mail("complete")
    assert listing(tmp_path) == [TEMP_PREFIX + "dead-1"]    # fsutil's clean-up owns temp names


# ----------------------------------------------------- retries, giving up

def test_a_refused_connection_is_retried_with_a_doubling_back_off_until_the_server_is_back(tmp_path):
    server = SMTPServer(tmp_path / "smtp")        # down
    clock = Clock()
    logs: list[str] = []
    outbox = make_outbox(tmp_path, server.port, logs, clock, retry_seconds=100)
    outbox.put(mail("patience"))
    [eml] = listing(tmp_path)
    side = tmp_path / "state" / "notify" / "outbox" / (eml[:-4] + ".json")
    box = tmp_path / "state" / "notify" / "outbox"
    start = clock.t
    waits = []
    for attempt in range(1, 4):
        assert outbox.deliver() == 0
        record = json.loads(side.read_text())
        assert record["attempts"] == attempt and record["first_failure"] == start
        assert record["last_error"] == "Connection refused"
        waits.append(record["next_try"] - clock.t)
        assert logs[-1] == (f"mail: could not deliver 1 mail(s) via 127.0.0.1:{server.port}: Connection refused; "
                            f"next try in {waits[-1]:.0f} s (kept in {box})")
        assert outbox.deliver() == 0 and len(logs) == attempt     # before its time: not even tried
        clock.t = record["next_try"]
    assert waits == [100, 200, 400]
    with server:
        assert outbox.deliver() == 1
        [m] = server.wait_for(1)
    assert m.data == mail("patience")
    assert listing(tmp_path) == [] and listing(tmp_path, "failed") == []


def test_a_mail_undeliverable_for_give_up_seconds_is_moved_to_failed_with_a_loud_line(tmp_path):
    port = SMTPServer(tmp_path / "smtp").port      # never started
    clock = Clock()
    logs: list[str] = []
    outbox = make_outbox(tmp_path, port, logs, clock)
    outbox.put(mail("[eidetic] s1: upload s1-x FAILED"), "m1")
    outbox.deliver()
    clock.t += GIVE_UP_SECONDS - 10
    outbox.deliver()
    assert listing(tmp_path) == ["m1.eml", "m1.json"]           # six days and more: still trying
    clock.t += 200                                  # past the second retry, and past seven days
    outbox.deliver()
    assert listing(tmp_path) == []
    assert listing(tmp_path, "failed") == ["m1.eml", "m1.json"]
    failed = tmp_path / "state" / "notify" / "failed"
    assert (failed / "m1.eml").read_bytes() == mail("[eidetic] s1: upload s1-x FAILED")
    assert json.loads((failed / "m1.json").read_text())["attempts"] == 3
    assert logs[-2] == ("MAIL NOT DELIVERED, GIVING UP: [eidetic] s1: upload s1-x FAILED (to pi@example.org): "
                        f"undeliverable for 7 days: Connection refused; kept in {failed / 'm1.eml'}")
    assert logs[-1].startswith("mail: could not deliver 1 mail(s)") and "next try" not in logs[-1]


def test_a_permanent_refusal_gives_up_at_once_and_the_other_mails_still_go(tmp_path):
    logs: list[str] = []
    with SMTPServer(tmp_path / "smtp", refuse={PI}) as server:
        outbox = make_outbox(tmp_path, server.port, logs)
        outbox.put(mail("to the refused one"), "a")
        outbox.put(mail("to the admin", to=ADMIN), "b")
        outbox.put(mail("to both", to=f"{PI}, {ADMIN}"), "c")
        assert outbox.deliver() == 2
        got = server.wait_for(2)
    assert sorted((m.data, tuple(m.rcpt_tos)) for m in got) == sorted(
        [(mail("to the admin", to=ADMIN), (ADMIN,)), (mail("to both", to=f"{PI}, {ADMIN}"), (ADMIN,))])
    assert listing(tmp_path) == [] and listing(tmp_path, "failed") == ["a.eml", "a.json"]
    assert any(line.startswith("MAIL NOT DELIVERED, GIVING UP: to the refused one (to pi@example.org): "
                               "refused by the server: every recipient was refused: pi@example.org (550)")
               for line in logs), logs
    assert f"mail: to both: server refused {PI} (550)" in logs


# ------------------------------------------------------- damaged outboxes

def test_an_unreadable_retry_record_does_not_hold_its_mail_back(tmp_path, server):
    box = tmp_path / "state" / "notify" / "outbox"
    outbox = make_outbox(tmp_path, server.port)
    for name, record in [("a", "not json {"), ("b", '{"attempts": "many", "next_try": "soon"}'),
                         ("c", '{"first_failure": "yesterday"}'), ("d", "[1, 2]")]:
        outbox.put(mail(name), name)
        (box / (name + ".json")).write_text(record)
    assert outbox.deliver() == 4
    assert sorted(m.data for m in server.wait_for(4)) == [mail(n) for n in "abcd"]
    assert listing(tmp_path) == []


def test_a_mail_file_without_recipients_is_kept_and_retried_and_does_not_stop_the_others(tmp_path, server):
    clock = Clock()
    logs: list[str] = []
    outbox = make_outbox(tmp_path, server.port, logs, clock)
    box = tmp_path / "state" / "notify" / "outbox"
    box.mkdir(parents=True)
    (box / "garbage.eml").write_bytes(b"\x00\xff\xfe not a mail at all")
    outbox.put(mail("good"), "good")
    assert outbox.deliver() == 1
    [m] = server.wait_for(1)
    assert m.data == mail("good")
    assert listing(tmp_path) == ["garbage.eml", "garbage.json"]
    assert len(logs) == 1 and "could not deliver 1 mail(s)" in logs[0] and "every recipient was refused" in logs[0]
    clock.t += GIVE_UP_SECONDS
    assert outbox.deliver() == 0                   # and in the end it is given up like any other
    assert listing(tmp_path) == [] and listing(tmp_path, "failed") == ["garbage.eml", "garbage.json"]
    assert any(line.startswith("MAIL NOT DELIVERED, GIVING UP:") for line in logs)


def test_a_broken_outbox_directory_is_one_log_line_per_pass_never_an_exception(tmp_path, server):
    (tmp_path / "state" / "notify").mkdir(parents=True)
    (tmp_path / "state" / "notify" / "outbox").write_bytes(b"not a directory")
    logs: list[str] = []
    outbox = make_outbox(tmp_path, server.port, logs)
    assert outbox.deliver() == 0
    assert len(logs) == 1 and logs[0].startswith("mail: deliver failed: NotADirectoryError"), logs
    with pytest.raises(NotADirectoryError):      # queuing says so: the caller (Notifier) logs it
        outbox.put(mail("x"))


# ---------------------------------------------------------------- thread

def test_the_thread_delivers_a_mail_as_soon_as_it_is_queued_and_stops_cleanly(tmp_path, server):
    outbox = make_outbox(tmp_path, server.port, retry_seconds=3600)   # no periodic wake-up helps
    outbox.start()
    try:
        time.sleep(0.2)                            # the thread is waiting
        outbox.put(mail("now"))
        [m] = server.wait_for(1, timeout=10)
    finally:
        t0 = time.monotonic()
        outbox.stop()
        assert time.monotonic() - t0 < 5
    assert m.data == mail("now")
    assert listing(tmp_path) == []
