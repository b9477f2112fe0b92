"""The desktop app's logic without a display (eidetic/client/app.py): what
a folder holds and what changed since the last send, which parts are
ticked, the options a Send runs with, the background send (questions,
Cancel, resume), the sentences shown and the remembered choices."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from eidetic.client import app
from eidetic.client.app import (Choices, Event, FormError, Part, RateMeter, SendJob, Selection, address_with_user,
                                cannot_send_yet, destination_from_form, explain_failure, format_duration,
                                format_size, interrupted_send, load_choices, normalize_address,
                                normalize_fingerprint, plain_notice, progress_line, save_choices, scan_folder,
                                send_options, sent_before, success_message, user_of, what_will_be_sent)
from eidetic.client.excludes import Excludes
from eidetic.client.send import SendHooks, SendOptions, SendProgress, SendResult, send
from eidetic.client.settings import SavedDestination
from eidetic.client.transport import HostKeyInfo
from eidetic.core.errors import HostKeyError, LockBusy, SendError, TransportError, UsageError

FP = "SHA256:3v0urZzqFeqwWrDASR26AB1O5GxvPvORm8LeTmM75sA"


# ------------------------------------------------------------- numbers

@pytest.mark.parametrize("n, shown", [
    (0, "0 bytes"), (1, "1 byte"), (1023, "1023 bytes"), (1024, "1.0 KB"), (1536, "1.5 KB"),
    (300 * 1024 ** 2, "300 MB"), (int(1.2 * 1024 ** 3), "1.2 GB"), (15 * 1024 ** 3, "15 GB"),
    (3 * 1024 ** 4, "3.0 TB"),
])
def test_sizes_read_as_windows_explorer_shows_them(n, shown):
    assert format_size(n) == shown


@pytest.mark.parametrize("seconds, shown", [
    (3, "a few seconds"), (31, "about 30 seconds"), (59, "about 55 seconds"), (61, "about 1 minute"),
    (170, "about 3 minutes"), (3600, "about 1 hour"), (3600 + 20 * 60, "about 1 hour 20 minutes"),
    (2 * 3600 + 60, "about 2 hours 1 minute"),
])
def test_time_left_is_said_roughly(seconds, shown):
    assert format_duration(seconds) == shown


def test_the_rate_is_measured_over_the_last_seconds_and_gives_the_time_left():
    m = RateMeter()
    m.add(0.0, 0)
    assert m.rate() is None and m.seconds_left(100) is None      # nothing to measure yet
    for t in range(1, 11):
        m.add(float(t), t * 10_000_000)                            # 10 MB/s
    assert m.rate() == pytest.approx(10_000_000)
    assert m.seconds_left(200_000_000) == pytest.approx(10.0)
    m.add(11.0, 5)                                                # a new send starts counting again
    assert m.rate() is None


def test_the_progress_line_has_bytes_files_rate_and_time_left():
    p = SendProgress("sending", 48, 123, int(1.2 * 1024 ** 3), int(4.5 * 1024 ** 3))
    assert progress_line(p, 86 * 1024 ** 2, 31) == \
        "1.2 GB of 4.5 GB · 48 of 123 files · 86 MB/s · about 30 seconds left"
    assert progress_line(p) == "1.2 GB of 4.5 GB · 48 of 123 files"
    assert "Looking at the files" in progress_line(SendProgress("scanning", 0, 1000, 0, 0))
    assert "finishing" in progress_line(SendProgress("finishing", 123, 123, 5, 5))


# ------------------------------------------------------ destinations form

def test_addresses_as_people_type_them():
    assert normalize_address(" sftp://dropbox.example.org/inbox ") == "sftp://dropbox.example.org/inbox"
    assert normalize_address("SFTP://h/inbox") == "sftp://h/inbox"
    assert normalize_address("jdoe@dropbox.example.org:/data/inbox") == "sftp://jdoe@dropbox.example.org/data/inbox"
    assert normalize_address("dropbox:/inbox") == "sftp://dropbox/inbox"
    assert normalize_address(r"C:\Data\inbox") == r"C:\Data\inbox"         # a drive, not a host
    assert normalize_address(r"\\server\dropbox\inbox") == r"\\server\dropbox\inbox"


def test_the_user_name_goes_into_the_address():
    to = "sftp://jdoe@dropbox.example.org:2222/data/inbox"
    assert user_of(to) == "jdoe"
    assert address_with_user(to, "asmith") == "sftp://asmith@dropbox.example.org:2222/data/inbox"
    assert address_with_user("sftp://h/inbox", "a b") == "sftp://a%20b@h/inbox"
    assert user_of("sftp://a%20b@h/inbox") == "a b"
    assert address_with_user(to, "  ") == to
    assert address_with_user("/mnt/inbox", "asmith") == "/mnt/inbox"
    assert user_of("/mnt/inbox") == ""


def test_fingerprints_as_handed_out():
    assert normalize_fingerprint("") is None
    assert normalize_fingerprint(f"ED25519 {FP}") == FP
    assert normalize_fingerprint(f"  {FP}. ") == FP
    assert normalize_fingerprint(FP.split(":", 1)[1]) == FP
    with pytest.raises(FormError) as e:
        normalize_fingerprint("SHA256:short")
    assert e.value.field == "fingerprint"


def test_the_add_form_makes_a_saved_destination():
    d = destination_from_form("", "foo", "dropbox.example.org:/data/inbox", "jdoe", f"ED25519 {FP}")
    assert d == SavedDestination(name="foo", study="foo", to="sftp://jdoe@dropbox.example.org/data/inbox",
                                 host_key=FP)
    local = destination_from_form("foo (share)", "foo", "/mnt/dropbox/inbox", "", "")
    assert (local.name, local.to, local.host_key) == ("foo (share)", "/mnt/dropbox/inbox", None)


@pytest.mark.parametrize("form, field", [
    (("", "", "sftp://h/inbox", "jdoe", ""), "study"),
    (("", "foo-bar", "sftp://h/inbox", "jdoe", ""), "study"),
    (("", "foo", "", "jdoe", ""), "address"),
    (("", "foo", "sftp://h/inbox", "", ""), "user"),
    (("", "foo", "relative/inbox", "", ""), "address"),
    (("", "foo", "sftp://h/", "jdoe", ""), "address"),
    (("", "foo", "sftp://h/inbox", "jdoe", "SHA256:nope"), "fingerprint"),
    (("a\nb", "foo", "sftp://h/inbox", "jdoe", ""), "name"),
])
def test_the_add_form_names_the_field_to_fix(form, field):
    with pytest.raises(FormError) as e:
        destination_from_form(*form)
    assert e.value.field == field and e.value.message.endswith(".")
    assert "--to" not in e.value.message


# ------------------------------------------------------------- the folder

def write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


STUDY = {"eprime/s01.txt": b"a" * 100, "eprime/s02.txt": b"b" * 50, "eprime/deep/x.txt": b"c",
         "biopac/b.acq": b"d" * 1000, "notes.txt": b"top", "eprime/Thumbs.db": b"junk",
         "biopac/run.tmp": b"tmp", "empty/.keep": b""}


@pytest.fixture
def study(tmp_path) -> Path:
    root = tmp_path / "foo"
    write(root, STUDY)
    (root / "eprime" / "link").symlink_to("s01.txt")
    return root


def test_the_folder_scan_lists_subfolders_with_sizes_and_leaves_out_what_is_never_sent(study):
    scan = scan_folder(str(study), Excludes(patterns=("*.tmp",)))
    assert scan.error is None and scan.complete
    assert scan.names() == ["biopac", "empty", "eprime"]
    assert (scan.part("eprime").files, scan.part("eprime").bytes) == (3, 151)
    assert (scan.part("biopac").files, scan.part("biopac").bytes) == (1, 1000)
    assert (scan.part("empty").files, scan.top.files) == (1, 1)
    assert (scan.total.files, scan.total.bytes) == (6, 1154)
    assert scan.excluded == 2       # Thumbs.db and run.tmp; the symbolic link is not counted either
    assert scan.total.changed == 6 and not scan.sent_before     # never sent: everything is new


@pytest.mark.parametrize("what, why", [("missing", "does not exist"), ("file", "is a file"), ("", "Choose")])
def test_a_folder_that_cannot_be_scanned_says_why(tmp_path, what, why):
    (tmp_path / "file").write_text("x")
    scan = scan_folder(str(tmp_path / what) if what else "")
    assert why in scan.error


def test_a_scan_can_be_stopped(study):
    scan = scan_folder(str(study), stop=lambda: True)
    assert not scan.complete


def local_dest(inbox: Path, **kw) -> SavedDestination:
    return SavedDestination(name="foo", study="foo", to=str(inbox), **kw)


@pytest.fixture
def inbox(tmp_path) -> Path:
    p = tmp_path / "inbox"
    p.mkdir()
    return p


@pytest.fixture
def home(tmp_path) -> str:
    h = tmp_path / "client"
    h.mkdir()
    (h / "eidetic-client.yaml").write_text("location: labA\n")
    return str(h)


def visible(inbox: Path) -> list[str]:
    return sorted(n for n in os.listdir(inbox) if not n.startswith("."))


def hidden(inbox: Path) -> list[str]:
    return sorted(n for n in os.listdir(inbox) if n.startswith("."))


def test_changed_since_the_last_send_comes_from_the_send_state_read_only(study, inbox, home):
    state = Path(home) / "send-state.sqlite3"
    assert sent_before(home, str(inbox), "foo") == {}           # no state yet: nothing sent, nothing created
    assert not state.exists()
    send(SendOptions(str(study), "foo", str(inbox), client_home=home))
    ledger = sent_before(home, str(inbox), "foo")
    assert b"eprime/s01.txt" in ledger and b"notes.txt" in ledger
    assert sent_before(home, str(inbox), "other") == {}
    assert sent_before(home, str(inbox / "elsewhere"), "foo") == {}
    (study / "eprime" / "s02.txt").write_bytes(b"changed!")
    write(study, {"biopac/new.acq": b"n"})
    scan = scan_folder(str(study), ledger=ledger)
    assert scan.sent_before
    assert (scan.part("eprime").changed, scan.part("biopac").changed, scan.top.changed) == (1, 1, 0)
    assert scan.part("eprime").describe() == "109 bytes, 3 files, 1 new or changed since the last send"
    assert scan.part("empty").describe() == "0 bytes, 1 file, nothing changed since the last send"
    sel = Selection(False, ["eprime", "biopac"])
    assert what_will_be_sent(scan, sel, changed_only=True) == \
        "Will send biopac, eprime: 2 new or changed files of 6."
    assert what_will_be_sent(scan, Selection(False, ["empty"]), changed_only=True) == \
        "Nothing in empty changed since the last send."


def test_an_unreadable_state_is_unknown_not_nothing_sent(study, inbox, home):
    (Path(home) / "send-state.sqlite3").write_bytes(b"not a database" * 100)
    assert sent_before(home, str(inbox), "foo") is None
    scan = scan_folder(str(study), ledger=None)
    assert not scan.ledger_known


# ----------------------------------------------------------- what to send

def test_ticking_parts():
    names = ["biopac", "eprime", "eyetracker"]
    sel = Selection()
    assert sel.everything and sel.chosen(names) == () and all(sel.ticked(n) for n in names)
    sel.toggle("eprime", names)             # unticking one keeps the others ticked
    assert not sel.everything and sel.chosen(names) == ("biopac", "eyetracker")
    sel.toggle("biopac", names)
    sel.toggle("eyetracker", names)
    assert sel.chosen(names) == ()
    sel.toggle("eprime", names)
    assert sel.chosen(names) == ("eprime",)
    sel.toggle_everything()
    assert sel.everything and sel.parts == set()
    assert Selection(False, ["gone", "eprime"]).missing(names) == ["gone"]


def test_the_first_ticks_come_from_memory_then_the_destination_then_everything():
    d = SavedDestination(name="foo", study="foo", to="/x", parts=("eprime", "biopac"))
    assert Selection.initial(None, None).everything
    sel = Selection.initial(None, d)
    assert not sel.everything and sel.parts == {"eprime", "biopac"}
    sel = Selection.initial({"everything": False, "parts": ["biopac"]}, d)
    assert sel.parts == {"biopac"}
    assert Selection.initial({"everything": True, "parts": []}, d).everything


def test_send_waits_for_what_it_needs(study, inbox):
    d = local_dest(inbox)
    server = SavedDestination(name="s", study="foo", to="sftp://h/inbox")
    scan = scan_folder(str(study), Excludes(patterns=("*.tmp",)))
    assert cannot_send_yet(None, str(study), scan, Selection(), "") == "Choose where to send (or add a destination)."
    assert cannot_send_yet(d, " ", scan, Selection(), "") == "Choose the study folder."
    assert cannot_send_yet(d, str(study), None, Selection(), "") == "Looking at the folder…"
    assert cannot_send_yet(d, str(study), scan, Selection(False, []), "") == "Tick what to send."
    assert cannot_send_yet(server, str(study), scan, Selection(), "") == "Give your user name on the server."
    assert cannot_send_yet(server, str(study), scan, Selection(), "jdoe") is None
    assert cannot_send_yet(d, str(study), scan, Selection(), "") is None
    assert what_will_be_sent(scan, Selection()) == "Will send the whole folder: 6 files, 1.1 KB."
    assert what_will_be_sent(scan, Selection(False, ["biopac"])) == "Will send biopac: 1 file, 1000 bytes."


def test_the_send_options_follow_the_choices(study, home):
    d = SavedDestination(name="foo", study="foo", to="sftp://jdoe@h:2222/inbox", host_key=FP,
                         identity="~/.ssh/id_ed25519", exclude=("*.tmp",))
    opts = send_options(d, str(study), Selection(), "asmith", home, changed_only=True)
    assert (opts.source, opts.study, opts.to, opts.changed_only, opts.accept_host_key, opts.client_home) == \
        (str(study), "foo", "sftp://asmith@h:2222/inbox", True, FP, home)
    assert opts.identity == os.path.expanduser("~/.ssh/id_ed25519")
    assert opts.parts == () and opts.excludes == Excludes(patterns=("*.tmp",))
    opts = send_options(d, str(study), Selection(False, ["eprime", "biopac"]), "", home,
                        names=["biopac", "eprime", "x"])
    assert opts.parts == ("biopac", "eprime") and opts.to == d.to


def test_ticked_parts_are_sent_as_one_upload_keeping_their_paths(study, inbox, home):
    d = local_dest(inbox, exclude=("*.tmp",))
    res = send(send_options(d, str(study), Selection(False, ["eprime", "biopac"]), "", home,
                            names=["biopac", "empty", "eprime"]))
    assert (res.files, res.excluded) == (4, 2)         # Thumbs.db and run.tmp left out
    entry = inbox / res.entry
    got = sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file())
    assert got == [".eidetic-description.jsonl", "biopac/b.acq", "eprime/deep/x.txt", "eprime/s01.txt",
                   "eprime/s02.txt"]
    assert "2 files or folders left out (ones that are never sent, such as Thumbs.db)." in app.result_notes(res)


# ------------------------------------------------------------- sentences

def result(**kw) -> SendResult:
    base = dict(dest="sftp://jdoe@h/inbox", study="foo", location="labA", entry="foo-labA-20261121T230000Z-3f9a1c")
    base.update(kw)
    return SendResult(**base)


def test_the_end_of_a_send_is_one_clear_sentence():
    res = result(files=312, bytes=int(1.2 * 1024 ** 3))
    assert success_message(res) == \
        "Sent 312 files (1.2 GB) to study foo. They will appear in the archive within a minute."
    assert success_message(result(files=1, bytes=5)) == \
        "Sent 1 file (5 bytes) to study foo. It will appear in the archive within a minute."
    assert "finishing the send that was stopped earlier" in success_message(res, resumed=True)
    assert "finishing the send that was stopped earlier" in success_message(result(files=3, resumed_files=2))
    assert success_message(result(entry=None, unchanged=7)) == \
        "Nothing was sent: none of the 7 files changed since the last send to study foo."
    notes = app.result_notes(result(files=3, unchanged=2, symlinks=1))
    assert any("foo-labA-20261121T230000Z-3f9a1c" in n for n in notes)
    assert any("2 files left out" in n for n in notes) and any("1 shortcut" in n for n in notes)
    assert "1 file or folder left out (ones that are never sent, such as Thumbs.db)." in \
        app.result_notes(result(files=3, excluded=1))


CHANGED = HostKeyError("WARNING: the host key of [127.0.0.1]:2222 has CHANGED (it now offers ED25519 "
                       f"{FP}, which does not match the known hosts file). Someone could be intercepting ...")


@pytest.mark.parametrize("exc, headline, advice", [
    (CHANGED, "identity has CHANGED", "Do not send again"),
    (HostKeyError(f"unknown host key for h: ED25519 {FP}; nothing was sent. If your study runner confirms this "
                  "fingerprint, run the command again with --accept-host-key ..."),
     "fingerprint was not accepted", "Compare the fingerprint"),
    (HostKeyError(f"the host key of h is ED25519 {FP}, not the SHA256:x given with --accept-host-key: refusing"),
     "not the one saved", "tell your study runner"),
    (TransportError("authentication failed for jdoe@h (tried: password); check the user name, or give your key "
                    "with --identity FILE"), "did not accept your login", "Check your user name"),
    (TransportError("the SSH connection to h port 22 failed: [Errno 111] Connection refused"),
     "could not be reached", "on the network"),
    (TransportError("the connection to h was lost while writing; run the same command again to resume"),
     "connection to the server was lost", "continues where it stopped"),
    (TransportError("the inbox folder /mnt/inbox does not exist (is the share mounted?)"), "could not be found",
     "connected"),
    (TransportError("permission denied on the inbox while creating a folder (/x)"), "not allowed", "study runner"),
    (TransportError("the inbox is full: no space left while writing (/x)"), "inbox is full", "study runner"),
    (SendError("not sent (the unfinished upload stays hidden as .foo-x; fix these and run the same command again "
               "to finish it): eprime/s01.txt (Permission denied)"), "could not be sent", "Close the programs"),
    (LockBusy("another 'eidetic send' of x is running; wait for it to finish"), "already being sent", "Wait"),
    (UsageError("/x: no such file or folder"), "cannot be sent as it is", "/x: no such file"),
    (RuntimeError("boom"), "Something unexpected", "Copy details"),
])
def test_a_failure_is_said_in_plain_words_with_what_to_do_next(exc, headline, advice):
    f = explain_failure(exc)
    assert headline in f.headline and advice in f.advice
    assert f.detail == (exc.message if hasattr(exc, "message") else f"RuntimeError: {exc}")
    assert "--accept-host-key" not in f.headline + f.advice and "--identity" not in f.headline + f.advice


def test_notices_and_questions_in_plain_words():
    assert plain_notice("resuming interrupted upload .foo-labA-x (120 of 300 files already sent)") == \
        "Continuing the send that was stopped earlier: 120 of 300 files were already sent."
    assert "sent again" in plain_notice("the earlier interrupted upload .foo-x is gone from /i; starting afresh")
    before, fp, after = app.host_key_text(HostKeyInfo("[127.0.0.1]:2222", "ssh-ed25519", FP))
    assert "127.0.0.1 (port 2222)" in before and fp == f"ED25519 {FP}" and "study runner gave you" in after
    assert app.password_text("jdoe@dropbox.example.org's password: ") == \
        ("The server dropbox.example.org asks for the password of jdoe.", "Password:")
    assert app.password_text("Enter passphrase for key '/k/id_ed25519': ") == \
        ("Your key /k/id_ed25519 is protected by a passphrase.", "Passphrase:")
    assert app.password_text("the server refused the key ~/.ssh/id_ed25519; password for jdoe@h.example: ") == \
        ("The server refused the key ~/.ssh/id_ed25519. The server h.example asks for the password of jdoe "
         "instead.", "Password:")


def test_the_details_for_the_study_runner_hold_the_technical_truth():
    try:
        raise TransportError("the inbox is full: no space left")
    except TransportError as e:
        import traceback
        text = app.details_text({"destination": "foo", "to": "/i", "parts": ""}, "failed", e,
                                traceback.format_exc(), ["a notice"])
    assert "outcome: failed" in text and "destination: foo" in text and "parts:" not in text
    assert "error: TransportError: the inbox is full: no space left" in text
    assert "notice: a notice" in text and "Traceback" in text and "eidetic 0." in text


# ------------------------------------------------------ remembered choices

def test_choices_are_remembered_atomically_and_a_bad_file_is_ignored(tmp_path):
    home = str(tmp_path / "client")
    assert load_choices(home) == Choices()
    c = Choices()
    c.remember("foo", "/data/foo", "jdoe", Selection(False, ["eprime"]), True)
    assert save_choices(home, c)
    assert os.listdir(home) == ["gui-choices.json"]     # no temp file left behind
    back = load_choices(home)
    assert back.destination == "foo"
    assert back.per_destination["foo"] == {"source": "/data/foo", "user": "jdoe", "changed_only": True,
                                           "everything": False, "parts": ["eprime"]}
    assert "password" not in Path(home, "gui-choices.json").read_text()
    Path(home, "gui-choices.json").write_text("{not json")
    assert load_choices(home) == Choices()
    Path(home, "gui-choices.json").write_text('{"destination": 3, "destinations": []}')
    assert load_choices(home) == Choices()


def test_choices_that_cannot_be_written_do_not_stop_the_app(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert save_choices(str(blocker / "client"), Choices("foo")) is False


# ---------------------------------------------------------------- workers

def wait_event(job: SendJob, timeout: float = 20) -> Event:
    return job.events.get(timeout=timeout)


def final_event(job: SendJob, timeout: float = 30) -> Event:
    deadline = time.monotonic() + timeout
    while True:
        ev = job.events.get(timeout=max(0.1, deadline - time.monotonic()))
        if ev.kind in ("done", "cancelled", "failed"):
            return ev


def test_a_question_waits_for_the_window_and_the_answer_reaches_the_core():
    seen = []

    def fake(opts, hooks):
        seen.append(hooks.password("jdoe@h's password: "))
        seen.append(hooks.confirm_host_key(HostKeyInfo("h", "ssh-ed25519", FP)))
        hooks.notice("resuming interrupted upload .foo-x (1 of 2 files already sent)")
        return result(files=2)

    job = SendJob(SendOptions("/x", "foo", "/i"), fake).start()
    ev = wait_event(job)
    assert (ev.kind, ev.value) == ("ask_password", "jdoe@h's password: ")
    job.answer("secret")
    ev = wait_event(job)
    assert ev.kind == "ask_host_key" and ev.value.fingerprint == FP
    job.answer(True)
    assert wait_event(job).kind == "notice"
    assert wait_event(job).kind == "done"
    assert seen == ["secret", True] and job.resumed


def test_cancel_during_a_question_answers_no_and_ends_as_cancelled():
    def fake(opts, hooks):
        if hooks.password("p: ") is None:
            raise TransportError("authentication failed for jdoe@h (tried: no key found and no password given)")
        return result()

    job = SendJob(SendOptions("/x", "foo", "/i"), fake).start()
    assert wait_event(job).kind == "ask_password"
    job.cancel()
    assert final_event(job).kind == "cancelled"


def test_a_failure_reaches_the_window_with_its_traceback_and_a_changed_key_is_never_a_cancel():
    def fake(opts, hooks):
        raise CHANGED

    job = SendJob(SendOptions("/x", "foo", "/i"), fake)
    job.cancel()
    job.start()
    ev = final_event(job)
    assert ev.kind == "failed" and ev.value is CHANGED and "Traceback" in ev.traceback


def paused_at(files: int):
    """A send that stops after *files* files until the test lets it go on."""
    reached, go = threading.Event(), threading.Event()

    def run(opts, hooks):
        inner = hooks.progress

        def progress(p):
            if p.phase == "sending" and p.files_done >= files and not reached.is_set():
                reached.set()
                assert go.wait(20)
            inner(p)
        hooks.progress = progress
        return send(opts, hooks)
    return run, reached, go


def test_cancel_leaves_only_a_dot_entry_and_the_next_send_resumes_it_and_says_so(study, inbox, home):
    d = local_dest(inbox)
    run, reached, go = paused_at(3)
    job = SendJob(send_options(d, str(study), Selection(), "", home), run).start()
    assert reached.wait(20)
    job.cancel()
    go.set()
    ev = final_event(job)
    assert ev.kind == "cancelled", ev
    assert visible(inbox) == [] and len(hidden(inbox)) == 1
    pending = interrupted_send(home, str(inbox), "foo", str(study))
    assert pending is not None and hidden(inbox) == ["." + pending.entry] and pending.files_done >= 2
    job = SendJob(send_options(d, str(study), Selection(), "", home)).start()
    ev = final_event(job)
    assert ev.kind == "done", ev
    assert job.resumed and any("resuming interrupted upload" in n for n in job.notices)
    assert "finishing the send that was stopped earlier" in success_message(ev.value, job.resumed)
    assert visible(inbox) == [pending.entry] and hidden(inbox) == []
    assert interrupted_send(home, str(inbox), "foo", str(study)) is None


def test_the_worker_keeps_only_the_latest_progress_for_the_window(study, inbox, home):
    job = SendJob(send_options(local_dest(inbox), str(study), Selection(), "", home)).start()
    ev = final_event(job)
    assert ev.kind == "done" and ev.value.files >= 6
    p = job.take_progress()
    assert p is not None and p.files_done == p.files_total
    assert job.take_progress() is None


def test_the_scan_worker_reads_the_folder_and_the_interrupted_send(study, inbox, home):
    d = local_dest(inbox)
    run, reached, go = paused_at(2)
    job = SendJob(send_options(d, str(study), Selection(), "", home), run).start()
    assert reached.wait(20)
    job.cancel()
    go.set()
    assert final_event(job).kind == "cancelled"
    scan = app.ScanJob(home, d, str(inbox), str(study)).start()
    scan.thread.join(20)
    assert scan.done() and scan.result.names() == ["biopac", "empty", "eprime"]
    assert scan.interrupted is not None and scan.interrupted.files_done >= 1


def test_part_descriptions():
    assert Part("x", 3, 2048, 3).describe() == "2.0 KB, 3 files, all new"
    assert Part("x", 1, 5, 1).describe() == "5 bytes, 1 file, new"
    assert Part("x", 2, 5, 0).describe(ledger_known=False) == "5 bytes, 2 files"
