"""The command line as a user meets it: exit statuses (0 ok, 1 something is
wrong, 2 the request cannot be carried out as given) and one-line messages,
never a traceback."""

from __future__ import annotations

import os
import re

import pytest
from conftest import clean_env, drop, make_layout, one_line_error, run_cli

import eidetic


def _config(tmp_path, text: str):
    p = tmp_path / "bad.yaml"
    p.write_text(text.replace("@", str(tmp_path)))
    return p


GOOD_STUDY = "  s1: {tree: @/t1, store: @/st1}\n"


@pytest.mark.parametrize("text,names", [
    pytest.param("inbox: @/in\nstate: @/state\nbogus: 1\nstudies:\n" + GOOD_STUDY, ["bogus"], id="unknown-key"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies:\n  s1: {tree: @/t1, store: @/st1, colour: red}\n",
                 ["studies.s1.colour"], id="unknown-study-key"),
    pytest.param("inbox: @/in\nstate: relative/state\nstudies:\n" + GOOD_STUDY, ["state", "absolute"],
                 id="relative-path"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies:\n  s1: {tree: t1, store: @/st1}\n",
                 ["studies.s1.tree", "absolute"], id="relative-study-path"),
    pytest.param("inbox: @/in\nstate: @/state\nstate: @/state2\nstudies:\n" + GOOD_STUDY, ["state", "duplicate"],
                 id="duplicate-key"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies:\n  lab-a: {tree: @/t1, store: @/st1}\n", ["lab-a", "-"],
                 id="study-name-with-dash"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies:\n  s1: {tree: @/st1/tree, store: @/st1}\n",
                 ["studies.s1.tree", "studies.s1.store", "overlap"], id="tree-inside-store"),
    pytest.param("inbox: @/state/in\nstate: @/state\nstudies:\n" + GOOD_STUDY, ["inbox", "state", "overlap"],
                 id="inbox-inside-state"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies:\n  s1: {tree: @/t1, store: @/st1}\n"
                 "  s2: {tree: @/t1, store: @/st2}\n", ["studies.s1.tree", "studies.s2.tree", "overlap"],
                 id="two-studies-one-tree"),
    pytest.param("inbox: @/in\nstate: @/state\nsettle_seconds: soon\nstudies:\n" + GOOD_STUDY,
                 ["settle_seconds"], id="settle-not-a-number"),
    pytest.param("inbox: @/in\nstate: @/state\nstudies: [s1]\n", ["studies"], id="studies-not-a-mapping"),
    pytest.param("inbox: @/in\nstate: [unclosed\n", ["line"], id="invalid-yaml"),
])
def test_bad_config_exits_2_with_one_line_naming_the_key(tmp_path, text, names):
    cfg = _config(tmp_path, text)
    commands = (["init"], ["ingest", "--once"], ["log", "s1:x"]) if names == ["bogus"] else (["init"],)
    for args in commands:
        res = run_cli(*args, config=cfg)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        line = one_line_error(res)
        assert str(cfg) in line
        for n in names:
            assert n in line, line
    assert not (tmp_path / "state").exists() and not (tmp_path / "in").exists()


def test_missing_config_file_exits_2(tmp_path):
    res = run_cli("init", config=tmp_path / "nope.yaml")
    assert res.returncode == 2
    assert "nope.yaml" in one_line_error(res)


def test_version_prints_the_package_version():
    res = run_cli("--version")
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.strip() == f"eidetic, version {eidetic.__version__}"


def _commands() -> list[str]:
    from eidetic_cli.main import cli
    return sorted(cli.list_commands(None))  # the group loads subcommands lazily


def test_help_lists_every_command():
    res = run_cli("--help")
    assert res.returncode == 0 and res.stderr == ""
    for c in _commands():
        assert re.search(rf"^\s+{c}\b", res.stdout, re.MULTILINE), c


@pytest.mark.parametrize("command", _commands())
def test_help_works_on_every_command_without_a_config(tmp_path, command):
    # --help must not need a config file, a store or an inbox.
    res = run_cli(command, "--help", config=None, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    assert f"Usage: eidetic {command}" in res.stdout
    res = run_cli(command, "-h", cwd=tmp_path)
    assert res.returncode == 0


def test_unknown_command_or_option_exits_2():
    for args in (["frobnicate"], ["log", "--no-such-option", "x"], ["checkout"]):
        res = run_cli(*args)
        assert res.returncode == 2, args
        assert "Traceback" not in res.stderr


def test_ingest_once_exits_0_when_all_entries_ingested(layout):
    drop(layout.inbox, "s1-labA-1", {"f.txt": b"x"})
    res = layout.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ingested s1-labA-1: upload ")
    res = layout.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 0 and res.stdout.strip() == "nothing to ingest"


def test_ingest_once_exits_1_when_an_entry_failed(layout):
    drop(layout.inbox, "s1-labA-1", {"f.txt": b"x"})
    drop(layout.inbox, "nostudy-labA-1", {"g.txt": b"y"})
    res = layout.cli("ingest", "--once", "--settle", "0")
    assert res.returncode == 1
    assert "ingested s1-labA-1" in res.stdout
    assert "FAILED nostudy-labA-1" in res.stderr
    assert "Traceback" not in res.stderr


def test_the_daemon_for_an_unknown_study_exits_2_in_one_line(layout):
    res = layout.cli("ingest", "--study", "nope")
    assert res.returncode == 2
    assert "nope" in one_line_error(res)


def test_ingest_of_an_unknown_study_exits_2(layout):
    res = layout.cli("ingest", "--once", "--study", "nope")
    assert res.returncode == 2
    assert "nope" in one_line_error(res)


def test_commands_before_init_say_so_in_one_line(tmp_path):
    lay = make_layout(tmp_path, init=False)
    for args in (["ingest", "--once"], ["log", "s1:x"]):
        res = lay.cli(*args)
        assert res.returncode in (1, 2), res.stderr
        assert "init" in one_line_error(res)


def test_log_of_an_unknown_path_exits_1_with_one_line(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"x"})
    assert layout.cli("ingest", "--once", "--settle", "0").returncode == 0
    for arg in ("s1:d/nope.txt", "s1:nope/", str(layout.tree() / "missing.txt"), str(tmp_path / "elsewhere"),
                "s1:d/f~v0009~20260101T000000Z.txt"):
        res = layout.cli("log", arg)
        assert res.returncode == 1, (arg, res.stdout, res.stderr)
        one_line_error(res)
        assert res.stdout == ""


def test_checkout_onto_an_existing_file_exits_2(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"x"})
    assert layout.cli("ingest", "--once", "--settle", "0").returncode == 0
    dest = tmp_path / "existing"
    dest.write_text("mine")
    res = layout.cli("checkout", "s1:d/f.txt", "-o", dest)
    assert res.returncode == 2
    assert str(dest) in one_line_error(res)
    assert dest.read_text() == "mine"
    # Conflicting selectors are a usage error too.
    res = layout.cli("checkout", "s1:d/f.txt", "--version", "1", "--at", "2026-01-01", "-o", tmp_path / "o")
    assert res.returncode == 2
    one_line_error(res)


def test_checkout_into_a_missing_folder_exits_2_naming_the_destination(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"x"})
    assert layout.cli("ingest", "--once", "--settle", "0").returncode == 0
    dest = tmp_path / "no" / "such" / "f.txt"
    res = layout.cli("checkout", "s1:d/f.txt", "-o", dest)
    assert res.returncode == 2, res.stderr
    line = one_line_error(res)
    assert str(dest) in line and "~#tmp" not in line, line
    assert not (tmp_path / "no").exists()


def test_checkout_without_output_writes_into_the_current_directory(layout, tmp_path):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"x"})
    assert layout.cli("ingest", "--once", "--settle", "0").returncode == 0
    work = tmp_path / "work"
    work.mkdir()
    res = layout.cli("checkout", "s1:d/f.txt", cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / "f.txt").read_bytes() == b"x"
    assert str(work / "f.txt") in res.stdout
    res = layout.cli("checkout", "s1:d", cwd=work)
    assert res.returncode == 0, res.stderr
    assert (work / "d" / "f.txt").read_bytes() == b"x"


def test_fsck_exits_0_on_a_clean_store(layout):
    drop(layout.inbox, "s1-labA-1", {"d/f.txt": b"x"})
    assert layout.cli("ingest", "--once", "--settle", "0").returncode == 0
    res = layout.cli("fsck")
    assert res.returncode == 0, (res.stdout, res.stderr)


def test_demo_runs_on_the_default_layout_and_again(tmp_path):
    # The README's first quick-start command: no config, everything under $EIDETIC_HOME.
    env = clean_env(EIDETIC_HOME=str(tmp_path / "home"))
    for run in (1, 2):
        res = run_cli("demo", env=env, cwd=tmp_path)
        assert res.returncode == 0, (run, res.stdout, res.stderr)
        assert res.stdout.count("   ingested demo-labA-") == 2, res.stdout
        assert "   clean" in res.stdout and "Traceback" not in res.stderr, res.stdout + res.stderr
    assert (tmp_path / "home" / "studies" / "demo" / "tree" / "eprime" / "sub-01_run-1.txt").is_file()


def test_ingest_once_says_it_waits_for_a_store_another_process_holds_then_finishes(layout):
    import fcntl
    import subprocess

    from conftest import eidetic_argv

    drop(layout.inbox, "s1-labA-1", {"a.txt": b"a"})
    fd = os.open(layout.store("s1") / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)            # as `fsck --repair` or a daemon would
    try:
        p = subprocess.Popen(eidetic_argv() + ["--config", str(layout.config_path), "ingest", "--once",
                                               "--study", "s1", "--settle", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
        line = p.stderr.readline()            # no -v: still one line, or it looks hung
        assert "study s1: another eidetic process is writing to the store; waiting for it" in line
        assert p.poll() is None
    finally:
        os.close(fd)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "ingested s1-labA-1" in out


def test_oserror_naming_a_file_descriptor_is_one_line(monkeypatch, capsys):
    """An OSError whose filename is a descriptor (os.stat(fd) sets the number)
    is still one line, not a TypeError's traceback from the handler."""
    from eidetic_cli import main as cli_main
    from eidetic_cli.commands import status

    def boom(*args, **kwargs):
        raise OSError(5, "Input/output error", 7)

    monkeypatch.setattr(status.command, "callback", boom)
    monkeypatch.setattr(cli_main, "require_server", lambda command: None)
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["status"])
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert err == "eidetic: Input/output error: 7\n"
