"""Every hint in a failure is tested by doing it (issue 11, item 3).

Each test makes an entry fail for real (real files, a real ``eidetic send``
and ``eidetic ingest --once``, the mail through the SMTP peer), reads the
hint from the failure mail, the ingest log line and ``eidetic status``,
follows it literally (runs the command it names) and checks the result:
ingested, and ``eidetic fsck`` clean (no orphan object, W024, left by the
refused attempt).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import DAEMON_UID, UPLOADER_UID, Layout, check_store, clean_env, eidetic_argv, plain_files, run_as
from test_permissions import TwoUids, two_uids  # noqa: F401 - the fixture, for the unreadable-file test

import eidetic.server.config
import eidetic.server.deploy
from smtp_peer import SMTPServer

ADMIN = "datamanager@example.org"
PI = "pi-s1@example.org"
RUNNER_GAVE = "<the study your study runner gave you>"
FILES = {"eprime/s01.txt": b"trial,rt\n1,512\n", "notes.txt": b"shared with an earlier upload\n"}


@pytest.fixture
def smtp(tmp_path):
    with SMTPServer(tmp_path / "smtp") as server:
        yield server


def hint_layout(root: Path, port: int, own_inbox: bool = False) -> Layout:
    """Studies s1 and s2 with mail on; s1 has its own inbox when *own_inbox*."""
    root.mkdir(parents=True, exist_ok=True)
    doc: dict = {"state": str(root / "state"), "inbox": str(root / "inbox"), "settle_seconds": 0,
                 "notify": {"smtp_host": "127.0.0.1", "smtp_port": port, "sender": "eidetic@dropbox.example.org",
                            "admin": [ADMIN]},
                 "studies": {}}
    for s in ("s1", "s2"):
        body: dict = {"tree": str(root / "trees" / s), "store": str(root / "stores" / s)}
        if s == "s1":
            body["notify"] = [PI]
            if own_inbox:
                body["inbox"] = str(root / "inbox-s1")
        doc["studies"][s] = body
    path = root / "eidetic.yaml"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    cfg = eidetic.server.config.load(str(path))
    eidetic.server.deploy.init(cfg)
    return Layout(root, path, cfg)


def client_env(tmp_path: Path) -> dict:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), HOME=str(home))


def make_source(root: Path, files: dict) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def run(argv: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def ingest(lay: Layout) -> subprocess.CompletedProcess:
    return lay.cli("ingest", "--once", "--settle", "0")


def fsck_clean(lay: Layout, study: str = "s1") -> None:
    res = lay.cli("fsck", "--study", study, "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    assert json.loads(res.stdout) == [], res.stdout          # no W024 (orphan object), nothing else


def send_command(text: str) -> str:
    """The 'eidetic send …' command a hint names (up to its --to argument)."""
    m = re.search(r"eidetic send (?:'[^']*'|\S+) --study (?:<[^>]*>|\S+) --to (?:'[^']*'|\S+)", text)
    assert m, text
    return m.group(0)


def follow_send(command: str, env: dict, study: str | None = None) -> subprocess.CompletedProcess:
    """Run the command as written; a placeholder for the study is filled in
    with what the study runner gave (*study*), and only then."""
    if RUNNER_GAVE in command:
        assert study is not None, command
        command = command.replace(RUNNER_GAVE, study)
    argv = shlex.split(command)
    assert argv[:2] == ["eidetic", "send"]
    res = run(eidetic_argv() + argv[1:] + ["--location", "labA"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def failure_mail(smtp: SMTPServer, n: int = 1):
    mails = smtp.wait_for(n)
    failed = [m for m in mails if "FAILED" in m.subject]
    assert failed, [m.subject for m in mails]
    return failed[-1]


def no_python_repr(text: str) -> None:
    assert not re.search(r"(?<![0-9A-Za-z_~-])b['\"]", text), text       # b'/…' is a Python bytes repr


# ------------------------------------------------------------- wrong study

def test_a_study_that_does_not_exist_is_fixed_by_sending_again_with_the_study_the_runner_gave(tmp_path, smtp):
    lay = hint_layout(tmp_path / "srv", smtp.port)
    env = client_env(tmp_path)
    src = make_source(tmp_path / "src", FILES)
    res = run(eidetic_argv() + ["send", str(src), "--study", "s1x", "--to", str(lay.inbox), "--location", "labA"],
              env)
    assert res.returncode == 0, res.stderr

    res = ingest(lay)
    assert res.returncode == 1, res.stdout + res.stderr
    log = res.stdout + res.stderr
    (rec,) = lay.records("failed")
    reason = rec["reason"]
    assert "sent for study 's1x', which is not a study here (configured: s1, s2)" in reason
    assert "renaming the entry cannot fix it" in reason
    # the command names the folder that was sent (from the description) and the inbox
    assert send_command(reason) == f"eidetic send {src} --study {RUNNER_GAVE} --to {lay.inbox}"
    assert send_command(log) == send_command(reason)                       # the ingest's log line
    status = lay.cli("status")
    assert send_command(status.stdout) == send_command(reason), status.stdout   # status's failed entry
    mail = failure_mail(smtp)
    assert send_command(mail.body) == send_command(reason)
    assert "mv " not in mail.body and "Renaming this entry cannot help" in mail.body
    for text in (reason, log, status.stdout, mail.body):
        no_python_repr(text)

    follow_send(send_command(mail.body), env, study="s1")     # the study runner said s1
    res = ingest(lay)
    assert res.returncode == 0, res.stdout + res.stderr
    (done,) = lay.records("done")
    assert done["study"] == "s1" and done["verified"] is True
    assert plain_files(lay.tree("s1")) == {os.fsencode(k): v for k, v in FILES.items()}
    check_store(lay, "s1")
    fsck_clean(lay, "s1")


def test_a_send_with_another_studys_name_into_a_studys_own_inbox_is_fixed_by_the_command_as_written(
        tmp_path, smtp):
    lay = hint_layout(tmp_path / "srv", smtp.port, own_inbox=True)
    inbox = lay.study_inbox("s1")
    env = client_env(tmp_path)
    # An earlier upload shares one file (one object) with the refused one: it must stay.
    first = make_source(tmp_path / "first", {"notes.txt": FILES["notes.txt"]})
    res = run(eidetic_argv() + ["send", str(first), "--study", "s1", "--to", str(inbox), "--location", "labA"], env)
    assert res.returncode == 0, res.stderr
    assert ingest(lay).returncode == 0
    objects_before = set(lay.object_files("s1"))

    src = make_source(tmp_path / "src", FILES)
    res = run(eidetic_argv() + ["send", str(src), "--study", "s2", "--to", str(inbox), "--location", "labA"], env)
    assert res.returncode == 0, res.stderr
    res = ingest(lay)
    assert res.returncode == 1, res.stdout + res.stderr
    (rec,) = lay.records("failed")
    reason = rec["reason"]
    assert "sent for study 's2' but arrived in study s1's inbox" in reason
    assert send_command(reason) == f"eidetic send {src} --study s1 --to {inbox}"      # the guess: s1
    assert f"--study s2 --to {lay.inbox}" in reason          # or, if it is s2's data, s2's inbox
    no_python_repr(reason)
    # The refused upload's description was stored, then removed: no orphan; the shared object stays.
    assert set(lay.object_files("s1")) == objects_before
    fsck_clean(lay, "s1")
    mail = failure_mail(smtp)
    assert "mv " not in mail.body and send_command(mail.body) == send_command(reason)

    follow_send(send_command(mail.body), env)
    res = ingest(lay)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(lay.records("done")) == 2
    assert plain_files(lay.tree("s1")) == {os.fsencode(k): v for k, v in FILES.items()}
    check_store(lay, "s1")
    fsck_clean(lay, "s1")


def test_an_entry_renamed_into_a_study_by_hand_is_fixed_by_sending_again_not_by_the_rename(tmp_path, smtp):
    """The case seen on main: '--study s1x', then the entry renamed to 's1-…'
    as an old hint said; it fails again, and now says what does work."""
    lay = hint_layout(tmp_path / "srv", smtp.port)
    env = client_env(tmp_path)
    src = make_source(tmp_path / "src", FILES)
    res = run(eidetic_argv() + ["send", str(src), "--study", "s1x", "--to", str(lay.inbox), "--location", "labA"],
              env)
    assert res.returncode == 0, res.stderr
    (name,) = os.listdir(lay.inbox)
    os.rename(lay.inbox / name, lay.inbox / ("s1-" + name))      # location 's1x' no longer matters here
    res = ingest(lay)
    assert res.returncode == 1, res.stdout + res.stderr
    (rec,) = lay.records("failed")
    assert f"sent for study 's1x' but its entry name 's1-{name}' puts it in study s1" in rec["reason"]
    assert lay.object_files("s1") == []                   # its description was stored, and removed again
    fsck_clean(lay, "s1")
    mail = failure_mail(smtp)
    assert "mv " not in mail.body
    follow_send(send_command(mail.body), env)
    assert ingest(lay).returncode == 0
    check_store(lay, "s1")
    fsck_clean(lay, "s1")


def test_a_hand_copied_entry_of_no_study_is_fixed_by_the_rename_the_mail_names(tmp_path, smtp):
    """Without an upload description the name alone decides: the rename works."""
    lay = hint_layout(tmp_path / "srv", smtp.port)
    entry = lay.inbox / "nosuchstudy-labA-1"
    make_source(entry, FILES)
    res = ingest(lay)
    assert res.returncode == 1, res.stdout + res.stderr
    mail = failure_mail(smtp)
    (mv,) = [ln.strip() for ln in mail.body.splitlines() if " && mv " in ln]
    subprocess.run(["sh", "-c", mv], check=True)      # as the service user or root: root here
    res = ingest(lay)
    assert res.returncode == 0, res.stdout + res.stderr
    (done,) = lay.records("done")
    assert done["study"] == "s1"
    check_store(lay, "s1")
    fsck_clean(lay, "s1")


def test_an_entry_refused_after_its_files_were_stored_leaves_no_orphan(tmp_path, smtp):
    """Refused at the end (an empty-looking mismatch: a file changed after it
    was described): every object the attempt placed goes again."""
    lay = hint_layout(tmp_path / "srv", smtp.port)
    env = client_env(tmp_path)
    src = make_source(tmp_path / "src", FILES)
    res = run(eidetic_argv() + ["send", str(src), "--study", "s1", "--to", str(lay.inbox), "--location", "labA"],
              env)
    assert res.returncode == 0, res.stderr
    (name,) = os.listdir(lay.inbox)
    (lay.inbox / name / "eprime" / "s01.txt").write_bytes(b"changed on the way\n")
    res = ingest(lay)
    assert res.returncode == 1, res.stdout + res.stderr
    (rec,) = lay.records("failed")
    assert "does not match its upload description" in rec["reason"]
    assert lay.object_files("s1") == []
    fsck_clean(lay, "s1")
    mail = failure_mail(smtp)
    assert "mv " not in mail.body and "Send the data again" in mail.body

    res = run(eidetic_argv() + ["send", str(src), "--study", "s1", "--to", str(lay.inbox), "--location", "labA"],
              env)
    assert res.returncode == 0, res.stderr
    assert ingest(lay).returncode == 0
    check_store(lay, "s1")
    fsck_clean(lay, "s1")


# ---------------------------------------------------------- unreadable file

@pytest.mark.parametrize("modes, named", [
    ({"secret/b.txt": 0o600}, "secret/b.txt (Permission denied)"),      # one file
    ({".": 0o700}, "the entry 's1-labA-1' (Permission denied) is not readable"),             # the whole entry (seen on main as
])                                                                      # "Permission denied (b'/…')")
def test_an_unreadable_file_says_so_in_plain_words_and_chmod_then_the_rename_fixes_it(
        two_uids, tmp_path, modes, named):  # noqa: F811
    t: TwoUids = two_uids
    lay = t.lay
    with SMTPServer(tmp_path / "smtp") as smtp:
        doc = json.loads(lay.config_path.read_text())
        doc["notify"] = {"smtp_host": "127.0.0.1", "smtp_port": smtp.port,
                         "sender": "eidetic@dropbox.example.org", "admin": [ADMIN]}
        lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
        entry = t.upload("s1-labA-1", {"a.txt": "readable", "secret/b.txt": "not for the daemon"},
                         modes=modes)
        res = t.ingest()
        assert res.returncode == 1, res.stdout + res.stderr
        (name,) = os.listdir(lay.inbox)
        failed = lay.inbox / name
        assert name.startswith(".eidetic~failed~")
        reason = json.loads((lay.state / "failed" / (name.split("~")[2] + ".json")).read_text())["reason"]
        assert named in reason
        assert "is not readable by the service user" in reason
        assert f"chmod -R a+rX {shlex.quote(str(failed))};" in reason
        for text in (reason, res.stdout + res.stderr):
            no_python_repr(text)
        mail = failure_mail(smtp)
        assert "is not readable by the service user" in mail.body
        (mv,) = [ln.strip() for ln in mail.body.splitlines() if " && mv " in ln]

        # The hint, literally: the entry's owner runs chmod, the service user the rename.
        chmod = re.search(r"chmod -R a\+rX (?:'[^']*'|[^\s;]+)", reason).group(0)
        res = run_as(UPLOADER_UID, ["sh", "-c", chmod])
        assert res.returncode == 0, res.stderr
        res = run_as(DAEMON_UID, ["sh", "-c", mv])
        assert res.returncode == 0, res.stderr
        assert entry.exists()
        res = t.ingest()
        assert res.returncode == 0, res.stdout + res.stderr
        assert "ingested s1-labA-1" in res.stdout
        res = t.daemon("fsck", "--study", "s1", "--json")
        assert res.returncode == 0, res.stdout + res.stderr
        assert json.loads(res.stdout) == []


# ------------------------------------------------------- unfinished upload

def test_an_unfinished_upload_known_complete_is_taken_after_the_rename_the_mail_names(tmp_path, smtp):
    import time

    from eidetic.server.notify import Notifier
    lay = hint_layout(tmp_path / "srv", smtp.port)
    partial = lay.inbox / ".s1-labA-1"
    make_source(partial, FILES)              # complete, but its client never renamed it
    n = Notifier(lay.cfg, lambda _: None)
    n.check_stale(now=time.time() + (lay.cfg.stale_hours + 1) * 3600)
    assert n.deliver() == 1
    (m,) = smtp.wait_for(1)
    (mv,) = [ln.strip() for ln in m.body.splitlines() if " && mv " in ln]
    subprocess.run(["sh", "-c", mv], check=True)          # as root
    res = ingest(lay)
    assert res.returncode == 0, res.stdout + res.stderr
    (done,) = lay.records("done")
    assert done["study"] == "s1"
    check_store(lay, "s1")
    fsck_clean(lay, "s1")
