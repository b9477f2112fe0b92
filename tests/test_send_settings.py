"""eidetic send with saved destinations, parts, excludes, --json and a
cancel: through the real CLI (and the library for the cancel), into a real
inbox, then ingested."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import clean_env, eidetic_argv, one_line_error, plain_files
from eidetic.client.send import SendHooks, SendOptions, send
from eidetic.core.description import DESCRIPTION_NAME, open_description
from eidetic.core.errors import SendCancelled
from eidetic.core.hashing import hash_bytes
from test_send import entries, entry_files, only_entry, run_argv

STUDY = {
    "eprime/s01.txt": b"trial,rt\n1,512\n",
    "eprime/Thumbs.db": b"thumbnail cache",
    "eprime/~$notes.docx": b"office lock",
    "biopac/run1.acq": b"\x00\x01" * 100,
    "biopac/run1.tmp": b"scratch",
    "eyetracker/e.edf": b"gaze",
    ".DS_Store": b"finder",
    "$RECYCLE.BIN/old.txt": b"deleted",
}


@pytest.fixture
def client(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), HOME=str(home),
                     EIDETIC_CLIENT_MACHINE_SETTINGS=str(tmp_path / "machine" / "eidetic-client.yaml"))


def make_study(root: Path) -> None:
    for rel, data in STUDY.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def settings(client: dict, text: str, machine: bool = False) -> Path:
    p = Path(client["EIDETIC_CLIENT_MACHINE_SETTINGS"]) if machine else \
        Path(client["EIDETIC_CLIENT_HOME"]) / "eidetic-client.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def eidetic(client: dict, *args: str):
    return run_argv(eidetic_argv() + list(args), client)


def test_a_saved_destination_sends_its_parts_keeping_their_paths(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    settings(client, f"location: labA\ndestinations:\n  foo:\n    study: s1\n    to: {layout.inbox}\n"
                     f"    source: {tmp_path / 'foo'}\n    parts: [eprime, biopac]\n    exclude: ['*.tmp']\n")
    res = eidetic(client, "send", "--dest", "foo")
    assert res.returncode == 0, res.stderr
    entry = only_entry(layout.inbox)
    got = entry_files(entry)
    got.pop(DESCRIPTION_NAME)
    assert got == {b"eprime/s01.txt": STUDY["eprime/s01.txt"], b"biopac/run1.acq": STUDY["biopac/run1.acq"]}
    assert "excluded 3 files or folders" in res.stdout, res.stdout      # Thumbs.db, ~$notes, run1.tmp
    [r] = layout.ingest()
    assert r.outcome == "ingested", r.reason
    assert set(plain_files(layout.tree("s1"))) == {b"eprime/s01.txt", b"biopac/run1.acq"}


def test_with_one_saved_destination_dest_may_be_left_out_and_options_override_it(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    settings(client, f"destinations:\n  foo:\n    study: s2\n    to: {layout.inbox}\n"
                     f"    source: {tmp_path / 'foo'}\n    parts: [eprime]\n")
    res = eidetic(client, "send", "--study", "s1", "--part", "eyetracker", "--location", "labB")
    assert res.returncode == 0, res.stderr
    entry = only_entry(layout.inbox)
    assert entry.name.startswith("s1-labB-")
    assert set(entry_files(entry)) == {b"eyetracker/e.edf", DESCRIPTION_NAME}


def test_with_several_saved_destinations_and_no_dest_nothing_is_sent_and_the_names_are_listed(
        tmp_path, layout, client):
    make_study(tmp_path / "foo")
    settings(client, f"destinations:\n  foo: {{study: s1, to: {layout.inbox}}}\n"
                     f"  bar: {{study: s2, to: {layout.inbox}}}\n")
    res = eidetic(client, "send", str(tmp_path / "foo"))
    assert res.returncode == 2
    line = one_line_error(res)
    assert "bar, foo" in line and "--dest" in line and "nothing was sent" in line
    assert entries(layout.inbox) == []
    ok = eidetic(client, "send", str(tmp_path / "foo"), "--dest", "bar")      # the hint, done
    assert ok.returncode == 0, ok.stderr
    assert only_entry_any(layout.inbox).name.startswith("s2-")


def only_entry_any(inbox: Path) -> Path:
    [name] = entries(inbox)
    return inbox / name


def test_the_machine_wide_settings_give_the_destination_and_the_users_file_wins(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    settings(client, f"location: labM\ndestinations:\n  foo: {{study: s2, to: {layout.inbox}}}\n", machine=True)
    res = eidetic(client, "send", str(tmp_path / "foo" / "eyetracker"))
    assert res.returncode == 0, res.stderr
    assert only_entry_any(layout.inbox).name.startswith("s2-labM-")
    settings(client, "location: labU\n")
    res = eidetic(client, "send", str(tmp_path / "foo" / "eyetracker"))
    assert res.returncode == 0, res.stderr
    assert sorted(n.split("-")[1] for n in entries(layout.inbox)) == ["labM", "labU"]


def test_a_bad_settings_file_is_one_line_with_file_line_and_key(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    p = settings(client, f"destinations:\n  foo:\n    study: s1\n    to: {layout.inbox}\n    prts: [a]\n")
    res = eidetic(client, "send", str(tmp_path / "foo"), "--dest", "foo")
    assert res.returncode == 2
    line = one_line_error(res)
    assert str(p) in line and "line 5" in line and "destinations.foo.prts" in line
    assert entries(layout.inbox) == []


def test_a_missing_part_is_refused_before_anything_is_sent(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    os.symlink(tmp_path / "foo" / "eprime", tmp_path / "foo" / "linked")
    for part, why in (("nope", "there is no folder"), ("linked", "is a link"), ("../x", "a part is a folder")):
        res = eidetic(client, "send", str(tmp_path / "foo"), "--study", "s1", "--to", str(layout.inbox),
                      "--part", part)
        assert res.returncode == 2 and why in one_line_error(res), (part, res.stderr)
    assert entries(layout.inbox) == []


def test_default_excludes_can_be_turned_off_and_v_lists_what_was_excluded(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    base = ["send", str(tmp_path / "foo"), "--study", "s1", "--to", str(layout.inbox)]
    res = eidetic(client, "-v", *base, "--exclude", "eyetracker", "--dry-run")
    assert res.returncode == 0, res.stderr
    for shown in ("excluded: eprime/Thumbs.db", "excluded: .DS_Store", "excluded: $RECYCLE.BIN",
                  "excluded: eyetracker", "excluded: eprime/~$notes.docx"):
        assert shown in res.stdout, res.stdout
    res = eidetic(client, *base, "--no-default-excludes")
    assert res.returncode == 0, res.stderr
    assert set(entry_files(only_entry(layout.inbox))) == {os.fsencode(k) for k in STUDY} | {DESCRIPTION_NAME}
    assert "excluded" not in res.stdout


def test_json_gives_progress_events_and_a_result_line_by_line(tmp_path, layout, client):
    make_study(tmp_path / "foo")
    res = eidetic(client, "send", str(tmp_path / "foo"), "--study", "s1", "--to", str(layout.inbox),
                  "--location", "labA", "--json")
    assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in res.stdout.splitlines()]
    assert {e["event"] for e in events[:-1]} <= {"progress", "notice", "excluded"}
    assert any(e["event"] == "progress" for e in events)
    result = events[-1]
    entry = only_entry(layout.inbox)
    desc = os.path.join(os.fsencode(entry), DESCRIPTION_NAME)
    assert result["event"] == "result" and result["ok"] is True
    assert (result["files"], result["excluded"], result["entry"], result["resumed"]) == (4, 4, entry.name, False)
    assert result["bytes"] == sum(len(v) for k, v in STUDY.items()
                                  if k in ("eprime/s01.txt", "biopac/run1.acq", "biopac/run1.tmp",
                                           "eyetracker/e.edf"))
    assert result["destination"] == str(layout.inbox)
    assert result["description_blake3"] == hash_bytes(Path(os.fsdecode(desc)).read_bytes())


def test_json_reports_an_error_as_a_final_object_with_the_exit_status(tmp_path, layout, client):
    res = eidetic(client, "send", str(tmp_path / "absent"), "--study", "s1", "--to", str(layout.inbox), "--json")
    assert res.returncode == 2
    last = json.loads(res.stdout.splitlines()[-1])
    assert last["event"] == "error" and last["ok"] is False and last["exit_status"] == 2
    assert "no such file or folder" in last["message"]


def test_a_cancelled_send_leaves_only_a_dot_entry_and_the_next_send_resumes_it(tmp_path, layout):
    src = tmp_path / "big"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02}.bin").write_bytes(os.urandom(64 << 10))
    home = str(tmp_path / "client")
    seen = []

    def progress(p):
        seen.append(p.files_done)

    opts = SendOptions(source=str(src), study="s1", to=str(layout.inbox), location="labA", client_home=home)
    with pytest.raises(SendCancelled):
        send(opts, SendHooks(progress=progress, should_stop=lambda: bool(seen) and seen[-1] >= 10))
    [dot] = entries(layout.inbox)
    assert dot.startswith(".s1-labA-")
    notices = []
    res = send(opts, SendHooks(notice=notices.append))
    assert res.resumed and 10 <= res.resumed_files < 40 and res.files == 40
    assert any("resuming interrupted upload" in n for n in notices)
    assert entries(layout.inbox) == [dot[1:]]
    r = open_description(os.path.join(os.fsencode(layout.inbox / dot[1:]), DESCRIPTION_NAME))
    assert len(list(r.files())) == 40
