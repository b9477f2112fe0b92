"""Issue 11, item 5, "Conventions": `eidetic help`, -v/-q before and after
the command, --json on `ingest --once` and `checkout`, `log` as a table,
plurals and IEC units, the fixed messages and `--config default`; each
through the real command line."""

from __future__ import annotations

import json
import os
import re

import pytest
from conftest import clean_env, drop, make_layout, one_line_error, run_cli

from eidetic.core import layout as L


def _ingest(lay, name="s1-labA-1", files=None):
    drop(lay.inbox, name, files or {"f.txt": b"x"})
    res = lay.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stderr
    return res


# ------------------------------------------------------------------ help

def test_help_without_a_command_prints_the_groups_help():
    res = run_cli("help")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("Usage: eidetic [OPTIONS] COMMAND")
    for c in ("log", "checkout", "fsck", "help"):
        assert re.search(rf"^\s+{c}\b", res.stdout, re.MULTILINE), c


@pytest.mark.parametrize("command", ["log", "fsck", "send", "help"])
def test_help_of_a_command_prints_its_help(command, tmp_path):
    res = run_cli("help", command, cwd=tmp_path)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith(f"Usage: eidetic {command}")
    assert res.stdout == run_cli(command, "--help", cwd=tmp_path).stdout


def test_help_of_an_unknown_command_is_one_line_and_exit_2():
    res = run_cli("help", "frobnicate")
    assert res.returncode == 2 and res.stdout == ""
    line = one_line_error(res)
    assert "frobnicate" in line and "log" in line


# ----------------------------------------------------------- -v and -q

def test_verbose_after_the_command_works_like_before_it(layout):
    for args in (["-v", "fsck"], ["fsck", "-v"], ["fsck", "--verbose"], ["fsck", "-q"]):
        res = layout.cli(*args)
        assert res.returncode == 0, (args, res.stderr)


def test_verbosity_counts_add_up_before_and_after_the_command(layout):
    # ingest --once prints time-stamped log lines on stderr with -v only
    stamped = re.compile(r"^\d\d:\d\d:\d\d ", re.MULTILINE)
    drop(layout.inbox, "s1-labA-1", {"f.txt": b"x"})
    res = layout.cli("ingest", "--once", "--settle", "0", "-v")
    assert res.returncode == 0 and stamped.search(res.stderr), res.stderr
    drop(layout.inbox, "s1-labA-2", {"f.txt": b"y"})
    res = layout.cli("-v", "ingest", "--once", "--settle", "0", "-q")   # +1 -1: as without either
    assert res.returncode == 0 and not stamped.search(res.stderr), res.stderr
    assert res.stdout.startswith("ingested s1-labA-2")
    drop(layout.inbox, "s1-labA-3", {"f.txt": b"z"})
    res = layout.cli("-v", "ingest", "--once", "--settle", "0", "-v", "-q")   # +2 -1
    assert res.returncode == 0 and stamped.search(res.stderr), res.stderr


def test_quiet_ingest_says_only_failures(layout):
    drop(layout.inbox, "s1-labA-1", {"f.txt": b"x"})
    drop(layout.inbox, "nostudy-labA-1", {"g.txt": b"y"})
    res = layout.cli("-q", "ingest", "--once", "--settle", "0")
    assert res.returncode == 1
    assert res.stdout == ""
    assert "FAILED nostudy-labA-1" in res.stderr
    res = layout.cli("ingest", "--once", "--settle", "0", "--quiet")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""


def test_quiet_keeps_the_results_a_command_is_run_for(layout, tmp_path):
    _ingest(layout)
    res = layout.cli("-q", "log", "s1:f.txt")
    assert res.returncode == 0 and "f.txt" in res.stdout
    res = layout.cli("log", "s1:f.txt", "--json", "-q")
    assert res.returncode == 0 and json.loads(res.stdout)[0]["version"] == 1
    res = layout.cli("-q", "checkout", "s1:f.txt", "-o", tmp_path / "out.txt")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    assert (tmp_path / "out.txt").read_bytes() == b"x"
    res = layout.cli("-q", "fsck")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == ""
    res = layout.cli("init", "-q")
    assert res.returncode == 0 and res.stdout == ""


def test_quiet_fsck_still_prints_its_findings(layout):
    _ingest(layout)
    (layout.tree("s1") / "stray.txt").write_bytes(b"hand-made")
    loud = layout.cli("fsck")
    quiet = layout.cli("fsck", "-q")
    assert loud.returncode == quiet.returncode
    findings = [ln for ln in loud.stdout.splitlines() if not ln.startswith("fsck: ")]
    assert findings and quiet.stdout.splitlines() == findings


# ------------------------------------------------------- --config default

def test_config_default_uses_the_default_layout(tmp_path):
    home = tmp_path / "home"
    for env in (clean_env(EIDETIC_HOME=str(home), EIDETIC_CONFIG="default"), clean_env(EIDETIC_HOME=str(home))):
        args = ["init"] if "EIDETIC_CONFIG" in env else ["--config", "default", "init"]
        res = run_cli(*args, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert (home / "studies" / "demo" / "tree").is_dir()


def test_config_default_wins_over_the_system_config(tmp_path, monkeypatch):
    from eidetic.server import config
    system = tmp_path / "eidetic.yaml"
    system.write_text("inbox: /nonexistent/in\nstate: /nonexistent/state\nstudies: {x: {tree: /n/t, store: /n/s}}\n")
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(system))
    monkeypatch.setenv("EIDETIC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("EIDETIC_CONFIG", raising=False)
    assert not config.load(None).is_default_layout
    assert config.load("default").is_default_layout
    monkeypatch.setenv("EIDETIC_CONFIG", "default")
    assert config.load(None).is_default_layout


# ------------------------------------------------------------------ --json

def test_ingest_once_json_is_one_document_with_results_and_a_summary(layout):
    drop(layout.inbox, "s1-labA-1", {"a.txt": b"a", "b.txt": b"bb"})
    drop(layout.inbox, "nostudy-labA-1", {"g.txt": b"y"})
    res = layout.cli("ingest", "--once", "--settle", "0", "--json")
    assert res.returncode == 1
    doc = json.loads(res.stdout)
    by_entry = {r["entry"]: r for r in doc["results"]}
    ok = by_entry["s1-labA-1"]
    assert (ok["outcome"], ok["study"], ok["files"], ok["bytes"], ok["new_versions"]) == ("ingested", "s1", 2, 3, 2)
    assert ok["upload"]
    bad = by_entry["nostudy-labA-1"]
    assert bad["outcome"] == "failed" and bad["reason"]
    assert doc["summary"] == {"ingested": 1, "failed": 1, "committed": 0, "waiting": 0, "faults": [],
                              "exit_status": 1}
    assert "FAILED nostudy-labA-1" in res.stderr
    res = layout.cli("ingest", "--once", "--settle", "0", "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["results"] == []


def test_ingest_json_without_once_is_a_usage_error(layout):
    res = layout.cli("ingest", "--json")
    assert res.returncode == 2 and "--once" in res.stderr


def test_checkout_json_names_dest_files_bytes_and_version(layout, tmp_path):
    _ingest(layout, files={"d/a.txt": b"one", "d/b.txt": b"two!"})
    _ingest(layout, "s1-labA-2", files={"d/a.txt": b"one again"})
    res = layout.cli("checkout", "s1:d/a.txt", "--version", "1", "-o", tmp_path / "a1", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"dest": str(tmp_path / "a1"), "files": 1, "bytes": 3, "version": 1,
                                      "path": "s1:d/a.txt"}
    res = layout.cli("checkout", "s1:d", "-o", tmp_path / "d", "--json")
    doc = json.loads(res.stdout)
    assert (doc["dest"], doc["files"], doc["bytes"], doc["version"]) == (str(tmp_path / "d"), 2, 13, None)


# ------------------------------------------------------------ plurals, units

def test_counts_have_the_right_number(layout, tmp_path):
    res = _ingest(layout)
    assert ", 1 file (1 B), 1 new version" in res.stdout
    res = _ingest(layout, "s1-labA-2", files={"a": b"a", "b": b"b"})
    assert ", 2 files (2 B), 2 new versions" in res.stdout
    res = layout.cli("checkout", "s1:f.txt", "-o", tmp_path / "f")
    assert res.stdout.startswith("restored version 1, 1 file, 1 B, verified, to ")
    res = layout.cli("fsck", "--study", "s1")
    assert res.stdout.splitlines()[-1].startswith("fsck: clean (1 study, 3 objects, ")


@pytest.mark.parametrize("n,text", [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
                                    (5 << 20, "5.0 MiB"), (3 << 30, "3.0 GiB"), (2 << 40, "2.0 TiB")])
def test_sizes_are_iec(n, text):
    assert L.human_bytes(n) == text


def test_plural():
    assert [L.plural(n, "file") for n in (0, 1, 2)] == ["0 files", "1 file", "2 files"]
    assert L.plural(1, "new version") == "1 new version" and L.plural(3, "study") == "3 studies"
    assert L.plural(2, "day") == "2 days" and L.plural(2, "entry") == "2 entries"


# ---------------------------------------------------------------- messages

def test_checkout_of_a_file_onto_a_folder_says_what_is_wrong(layout, tmp_path):
    _ingest(layout)
    (tmp_path / "here").mkdir()
    for args in (["-o", "."], ["-o", ".", "--force"], ["--force", "-o", str(tmp_path / "here")]):
        res = layout.cli("checkout", "s1:f.txt", *args, cwd=tmp_path / "here")
        assert res.returncode == 2, res.stderr
        line = one_line_error(res)
        assert "--force" not in line and "is a folder" in line and "never replaces a folder" in line
    assert os.listdir(tmp_path / "here") == []


def test_log_of_an_unknown_study_names_the_studies(layout):
    res = layout.cli("log", "bar:x")
    assert res.returncode == 1
    assert one_line_error(res) == "eidetic: no study bar (studies: s1, s2)"
    res = layout.cli("log", "bar:")
    assert one_line_error(res) == "eidetic: no study bar (studies: s1, s2)"


@pytest.mark.parametrize("to,suggested", [("user@host:/inbox", "sftp://user@host/inbox"),
                                          ("collector@dropbox.example.org:/data/inbox/",
                                           "sftp://collector@dropbox.example.org/data/inbox"),
                                          ("host:inbox", "sftp://host/~/inbox")])
def test_send_refuses_an_scp_style_address_suggesting_sftp(tmp_path, to, suggested):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    res = run_cli("send", tmp_path / "src", "--study", "s1", "--to", to, cwd=tmp_path)
    assert res.returncode == 2
    line = one_line_error(res)
    assert line.endswith(f"use --to {suggested}") and "scp" in line
    assert sorted(os.listdir(tmp_path)) == ["src"]      # nothing made as a local folder


def test_send_takes_an_existing_local_folder_with_a_colon(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    (tmp_path / "in:box").mkdir()
    res = run_cli("send", tmp_path / "src", "--study", "s1", "--to", "in:box", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(os.listdir(tmp_path / "in:box")) == 1


# --------------------------------------------------------------------- log

def test_log_of_a_file_is_a_table_with_a_header(layout):
    _ingest(layout, files={"d/a.txt": b"one"})
    _ingest(layout, "s1-labA-2", files={"d/a.txt": b"one again"})
    res = layout.cli("log", "s1:d/a.txt")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "study s1, file d/a.txt: 2 versions"
    assert lines[1].split() == ["VER", "RECEIVED", "(UTC)", "SIZE", "UPLOAD", "FROM"]
    assert [ln.split()[0] for ln in lines[2:]] == ["v2", "v1"]
    assert "9 B" in lines[2] and "3 B" in lines[3] and lines[2].endswith("labA by root")
    assert all(len(ln) <= 100 for ln in lines)


def test_log_of_a_folder_groups_the_versions_under_each_path(layout):
    _ingest(layout, files={"d/a.txt": b"a1", "d/sub/b.txt": b"b1"})
    _ingest(layout, "s1-labA-2", files={"d/a.txt": b"a2"})
    _ingest(layout, "s1-labA-3", files={"d/sub/b.txt": b"b2", "d/a.txt": b"a3"})
    res = layout.cli("log", "s1:d")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "study s1, folder d: 5 versions of 2 files"
    assert lines[1].split()[0] == "VER"
    assert [ln.split()[0] for ln in lines[2:]] == ["d/a.txt", "v3", "v2", "v1", "d/sub/b.txt", "v2", "v1"]
    assert all(len(ln) <= 100 for ln in lines)


def test_log_cuts_long_names_in_the_middle_and_wide_shows_them_whole(layout):
    long_name = "a-rather-long-folder-name-for-one-session/" * 3 + "the-file-with-a-long-name-as-well.csv"
    _ingest(layout, files={long_name: b"x"}, name="s1-" + "l" * 60 + "-1")
    for arg in ("s1:", f"s1:{long_name}"):
        res = layout.cli("log", arg)
        assert res.returncode == 0, res.stderr
        assert all(len(ln) <= 100 for ln in res.stdout.splitlines()), res.stdout
        assert "…" in res.stdout and long_name not in res.stdout
        assert res.stdout.count("…") >= 2          # the name and the location
        wide = layout.cli("log", arg, "-w")
        assert long_name in wide.stdout and "l" * 60 in wide.stdout and "…" not in wide.stdout
        assert max(len(ln) for ln in wide.stdout.splitlines()) > 100
        assert layout.cli("log", "--wide", arg).stdout == wide.stdout


def test_fsck_progress_counts_bytes_in_iec_units():
    import io
    from eidetic_cli.common import iec_bar
    for total in (5 << 20, None):
        out = io.StringIO()
        bar = iec_bar(total=total, desc="s1: objects", file=out, disable=False, mininterval=0)
        bar.update(3 << 19)
        bar.close()
        text = out.getvalue()
        assert "1.5 MiB" in text and re.search(r"\d (B|KiB|MiB|GiB|TiB)/s", text), text
        assert ("of 5.0 MiB" in text) == (total is not None)
        assert not re.search(r"\d(k|M|G)B?\b", text), text       # no SI prefixes


def test_status_counts_have_the_right_number(layout):
    _ingest(layout)
    res = layout.cli("status", "--study", "s1")
    assert "1 upload, 1 path, 1 version, 1 object, " in res.stdout, res.stdout
    assert re.search(r"last ingest .*: 1 file, 1 B$", res.stdout, re.MULTILINE), res.stdout


def test_quiet_send_says_nothing_when_all_went_well(layout, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    res = run_cli("send", tmp_path / "src", "--study", "s1", "--to", layout.inbox, "-q")
    assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res.stdout + res.stderr
    assert len(os.listdir(layout.inbox)) == 1
    res = run_cli("-q", "send", tmp_path / "src", "--study", "s1", "--to", layout.inbox, "--dry-run")
    assert res.returncode == 0 and res.stdout.startswith("would send 1 file")   # what --dry-run is for


def test_quiet_purge_says_only_what_it_kept_and_dry_run_still_lists(layout):
    _ingest(layout)
    res = layout.cli("-q", "purge", "--older-than", "0", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert re.match(r"would remove \S+ \(study s1, upload \S+\): 1 file, 1 B$", res.stdout), res.stdout
    res = layout.cli("purge", "--older-than", "0", "-q")
    assert res.returncode == 0 and res.stdout == "", res.stdout
    res = layout.cli("purge", "--older-than", "0", "-q")
    assert res.returncode == 0 and res.stdout == "", res.stdout


def test_quiet_daemon_logs_only_warnings_and_errors(capsys, monkeypatch):
    from eidetic_cli.commands.ingest import _line_logger
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    for verbose, quiet, shown in ((0, False, [3, 4, 6]), (1, False, [3, 4, 6, 7]), (0, True, [3, 4])):
        log = _line_logger(verbose, quiet)
        for priority in (3, 4, 6, 7):
            log(priority, f"line {priority}")
        err = capsys.readouterr().err
        assert [int(ln.rsplit(" ", 1)[1]) for ln in err.splitlines()] == shown, err


def test_send_takes_verbose_after_the_command(layout, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_bytes(b"a")
    res = run_cli("send", tmp_path / "src", "--study", "s1", "--to", layout.inbox, "--dry-run", "-v")
    assert res.returncode == 0 and "would send: a.txt" in res.stdout, res.stdout


def test_every_command_takes_verbose_and_quiet_after_its_name():
    from eidetic_cli.main import cli
    for name in cli.list_commands(None):
        if name == "help":
            continue
        res = run_cli(name, "--help")
        assert "-v, --verbose" in res.stdout and "-q, --quiet" in res.stdout, name
