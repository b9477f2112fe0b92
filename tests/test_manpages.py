"""Man pages generated from the click commands (cli/manpages.py), and shell
completion as docs/admin.md ("Shell completion") documents it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, clean_env, run_cli

# The requests a page may use: groff's man macros and the few roff requests they allow.
MAN_REQUESTS = {"TH", "SH", "SS", "TP", "PP", "LP", "P", "IP", "B", "I", "BR", "IR", "RB", "RI", "nf", "fi",
                "br", "sp", "RS", "RE", "UR", "UE"}


def commands() -> list[str]:
    """The commands as `eidetic --help` lists them (not as the generator finds them)."""
    out = run_cli("--help").stdout
    block = out.split("Commands:", 1)[1]
    return [m.group(1) for m in re.finditer(r"^  (\S+)", block, re.M)]


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    outdir = tmp_path_factory.mktemp("man1")
    res = subprocess.run([sys.executable, "-m", "eidetic_cli.manpages", str(outdir)], capture_output=True, text=True,
                         env=clean_env(SOURCE_DATE_EPOCH="1796472000"), timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    written = sorted(res.stdout.split())
    assert written == sorted(str(p) for p in outdir.iterdir())
    return {p.name: p.read_text(encoding="ascii") for p in outdir.iterdir()}     # ASCII only: any locale reads it


def _sane_roff(name: str, text: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith('.TH "' + name.upper().removesuffix(".1") + '" "1" "2026-12-05" "eidetic '), lines[0]
    for ln in lines:
        if ln.startswith((".", "'")):
            req = ln[1:].split()[0] if ln[1:].split() else ""
            assert req in MAN_REQUESTS, f"{name}: unknown request {ln!r}"
        assert "\\" not in re.sub(r"\\(?:f[BIR]|e|-|&|\[u[0-9A-F]{4}\])", "", ln), f"{name}: stray escape in {ln!r}"
    sections = [ln.split(None, 1)[1] for ln in lines if ln.startswith(".SH ")]
    assert sections[:3] == ["NAME", "SYNOPSIS", "DESCRIPTION"] and sections[-1] == "SEE ALSO", sections


def _render(path) -> str:
    """The page as man shows it (man -l), else as groff formats it; warnings are failures."""
    env = clean_env(MANWIDTH="100", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="")
    if shutil.which("groff"):
        res = subprocess.run(["groff", "-man", "-ww", "-z", str(path)], capture_output=True, text=True, env=env)
        assert res.returncode == 0 and res.stderr == "", res.stderr
    if shutil.which("man"):
        res = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        return re.sub(r".\x08", "", res.stdout)
    pytest.skip("neither man nor groff is installed: only the roff sanity check ran")


def test_every_command_gets_a_page_and_the_main_page_lists_them(pages):
    names = commands()
    assert {"status", "fsck", "log", "send", "help", "ingest"} <= set(names)
    assert set(pages) == {"eidetic.1"} | {f"eidetic-{n}.1" for n in names}
    main = pages["eidetic.1"]
    for n in names:
        assert f"\\fBeidetic\\-{n}\\fR(1)" in main
    for section in ("GLOBAL OPTIONS", "COMMANDS", "ENVIRONMENT", "FILES", "EXIT STATUS"):
        assert f".SH {section}\n" in main


def test_every_page_is_sane_roff(pages):
    for name, text in pages.items():
        _sane_roff(name, text)


def test_man_accepts_every_page_and_shows_each_option_of_the_help(pages, tmp_path):
    for name, text in pages.items():
        path = tmp_path / name
        path.write_text(text)
        shown = _render(path)
        command = name.removesuffix(".1").removeprefix("eidetic").lstrip("-")
        assert shown.splitlines()[0].split()[0] == name.removesuffix(".1").upper() + "(1)"
        help_text = run_cli(*([command] if command else []), "--help").stdout
        # Every long option --help names is described on the page.
        options = set(re.findall(r"^  (?:-\w, )?(--[\w-]+)", help_text, re.M))
        assert options, help_text
        for opt in options:
            assert re.search(rf"^ +(?:-\w, )?{re.escape(opt)}\b", shown, re.M), f"{name}: {opt} missing:\n{shown}"
        if command:
            assert f"eidetic [GLOBAL OPTIONS] {command}" in " ".join(shown.split())


def test_the_pages_say_what_the_help_says(pages, tmp_path):
    (tmp_path / "eidetic-status.1").write_text(pages["eidetic-status.1"])
    shown = " ".join(_render(tmp_path / "eidetic-status.1").split())
    assert "eidetic-status - Per study: entries waiting" in shown
    assert "Takes no lock: safe while the daemon runs." in shown
    assert "--prometheus node_exporter's textfile-collector format" in shown
    (tmp_path / "eidetic-log.1").write_text(pages["eidetic-log.1"])
    shown = _render(tmp_path / "eidetic-log.1")
    # A \b block of the help keeps its lines (the column list of log's table).
    assert re.search(r"^ +VER +the version number \(1 = oldest\)$", shown, re.M), shown
    assert "'\u2026'" in shown or "'...'" in shown


def test_an_unknown_command_has_no_page():
    from eidetic_cli.manpages import page
    import click
    with pytest.raises(click.UsageError):
        page("nosuch")


def test_the_generator_without_an_outdir_says_how_to_use_it():
    res = subprocess.run([sys.executable, "-m", "eidetic_cli.manpages"], capture_output=True, text=True,
                         env=clean_env(), timeout=60)
    assert res.returncode == 2 and "usage: python -m eidetic_cli.manpages OUTDIR" in res.stderr


# ------------------------------------------------------- shell completion

@pytest.mark.parametrize("shell, marker", [("bash", "complete -o nosort -F _eidetic_completion eidetic"),
                                           ("zsh", "compdef _eidetic_completion eidetic"),
                                           ("fish", "complete --no-files --command eidetic")])
def test_completion_source_prints_a_script(shell, marker):
    res = run_cli(env=clean_env(_EIDETIC_COMPLETE=f"{shell}_source"))
    assert res.returncode == 0, res.stderr
    assert marker in res.stdout, res.stdout


def test_the_bash_script_completes_commands_and_options(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    script = run_cli(env=clean_env(_EIDETIC_COMPLETE="bash_source")).stdout
    (tmp_path / "complete.bash").write_text(script)
    bin_dir = os.path.dirname(sys.executable)
    probe = (f'source {tmp_path / "complete.bash"}\n'
             'COMP_WORDS=(eidetic st); COMP_CWORD=1; _eidetic_completion eidetic; echo "${COMPREPLY[@]}"\n'
             'COMPREPLY=(); COMP_WORDS=(eidetic status --pro); COMP_CWORD=2; _eidetic_completion eidetic; echo "${COMPREPLY[@]}"\n')
    env = clean_env(PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    res = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, env=env, timeout=60,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["status", "--prometheus"], res.stdout + res.stderr


def test_help_man_prints_the_page_that_man_reads(tmp_path):
    import shutil
    import subprocess as sp

    from conftest import run_cli
    res = run_cli("help", "--man", "status")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(".") and "prometheus" in res.stdout
    if shutil.which("man"):
        page = tmp_path / "eidetic-status.1"
        page.write_text(res.stdout)
        out = sp.run(["man", "-l", str(page)], capture_output=True, text=True, env={"MANPAGER": "cat",
                     "PAGER": "cat", "PATH": "/usr/bin:/bin", "MANWIDTH": "80"})
        assert out.returncode == 0 and "status" in out.stdout, out.stderr
    bad = run_cli("help", "--man", "nosuch")
    assert bad.returncode == 2
