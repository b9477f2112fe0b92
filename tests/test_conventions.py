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
