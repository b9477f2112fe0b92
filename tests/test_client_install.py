"""The two install profiles (pyproject.toml): the base install is the lab
PC's uploader (``eidetic send``) and must import and run without the server's
libraries (lmdb, watchdog, sdnotify) and without the POSIX-only modules a
Windows PC lacks (fcntl, pwd, grp); every other command, run there, says in
one line what to install and exits 3.

Missing modules are simulated by a meta-path finder installed before anything
imports (as they would be missing on a lab PC), and checked for real in a
fresh venv holding only the base install."""

from __future__ import annotations

import os
import pkgutil
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import clean_env, one_line_error

import eidetic.client
import eidetic.core
from eidetic_cli.main import CLIENT_COMMANDS, COMMANDS

REPO = Path(__file__).resolve().parent.parent
SERVER_LIBRARIES = ("lmdb", "watchdog", "sdnotify")
POSIX_ONLY = ("fcntl", "pwd", "grp")

# Every command but send, with arguments that would get it going.
SERVER_COMMANDS = {
    "ingest": ["ingest", "--once"],
    "init": ["init"],
    "status": ["status"],
    "fsck": ["fsck"],
    "log": ["log", "demo:eprime"],
    "checkout": ["checkout", "demo:eprime/s1.txt", "-o", "out.txt"],
    "purge": ["purge", "--older-than", "1"],
    "replicate": ["replicate"],
    "restore": ["restore", "--from", "offsite", "--study", "demo"],
    "demo": ["demo"],
}

# Installed first thing in the child: the named modules cannot be imported,
# as on a machine without them ("missing"), or are found but fail on import
# ("broken", a damaged install).
_FINDER = textwrap.dedent("""
    import importlib.abc, importlib.util, sys

    class _Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def __init__(self, names, broken):
            self.names, self.broken = set(names), broken

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in self.names:
                return None
            if self.broken:
                return importlib.util.spec_from_loader(name, self)
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise ImportError(f"{module.__name__}: broken (by the test)", name=module.__name__)

    _names, _broken = __NAMES__, __BROKEN__
    _early = sorted(m for m in sys.modules if m.split(".")[0] in _names)
    assert not _early, f"imported before the finder: {_early}"
    sys.meta_path.insert(0, _Blocked(_names, _broken))
""")


def _python(code: str, blocked, broken: bool = False, args=(), env=None, cwd=None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    src = _FINDER.replace("__NAMES__", repr(tuple(blocked))).replace("__BROKEN__", repr(broken))
    src += textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", src, *args], capture_output=True, text=True,
                          env=env if env is not None else clean_env(), cwd=cwd, timeout=timeout)


def _cli(args, blocked, tmp_path, broken: bool = False, timeout: float = 120, **extra_env):
    """`eidetic ARGS` in a child where *blocked* cannot be imported."""
    env = clean_env(EIDETIC_HOME=str(tmp_path / "home"), EIDETIC_CLIENT_HOME=str(tmp_path / "client"),
                    **extra_env)
    code = "from eidetic_cli.main import main\nmain(sys.argv[1:])\n"
    return _python(code, blocked, broken, args=[str(a) for a in args], env=env, cwd=tmp_path, timeout=timeout)


def _modules(pkg) -> list[str]:
    return [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]


def _install_hint(line: str) -> list[str]:
    """The pip command line a ServerNotInstalled message ends with."""
    assert "): " in line, line
    return shlex.split(line.split("): ", 1)[1])


# ------------------------------------------------------- (a) the library

def test_client_and_core_import_without_server_libraries_or_posix_modules(tmp_path):
    mods = _modules(eidetic.client) + _modules(eidetic.core)
    assert {"eidetic.client.send", "eidetic.client.transport", "eidetic.core.fsutil"} <= set(mods)
    # The lab PC's command line too: the group and its client commands.
    mods += ["eidetic_cli.main"] + [f"eidetic_cli.commands.{c}" for c in CLIENT_COMMANDS]
    res = _python(f"""
        import importlib
        for name in {mods!r}:
            importlib.import_module(name)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in _names)
        assert not leaked, leaked
        server = sorted(m for m in sys.modules if m.startswith(("eidetic.server", "eidetic.store", "eidetic.fsck")))
        assert not server, f"the client path loaded server code: {{server}}"
        print("ok", len({mods!r}))
    """, SERVER_LIBRARIES + POSIX_ONLY, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", str(len(mods))]


def test_the_finder_does_block(tmp_path):
    """The check above could pass with a finder that blocks nothing: the
    server's index (lmdb) and inbox (fcntl, pwd) must fail under it."""
    for module, lib in (("eidetic.store.index", "lmdb"), ("eidetic.server.inbox", "fcntl"),
                        ("eidetic.server.deploy", "grp")):
        res = _python(f"""
            try:
                import {module}
            except ImportError as e:
                print("blocked", e.name)
        """, SERVER_LIBRARIES + POSIX_ONLY, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["blocked", lib], (module, res.stdout, res.stderr)


# ---------------------------------------------- (b) the command line

def test_every_command_but_the_uploaders_is_checked():
    """A new command needs the server unless it is added to CLIENT_COMMANDS (and here)."""
    assert {"send"} <= set(CLIENT_COMMANDS) <= {"send", "gui"}
    assert set(COMMANDS) - set(CLIENT_COMMANDS) == set(SERVER_COMMANDS)


@pytest.mark.parametrize("name", sorted(SERVER_COMMANDS))
def test_a_server_command_without_the_server_libraries_says_what_to_install(tmp_path, name):
    res = _cli(SERVER_COMMANDS[name], ["lmdb"], tmp_path)
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert res.stdout == ""
    line = one_line_error(res)
    assert line.startswith(f"eidetic: 'eidetic {name}' needs the server libraries (lmdb is not installed): "), line
    hint = _install_hint(line)
    assert hint[:4] == [sys.executable, "-m", "pip", "install"], hint
    assert hint[-1].endswith("[server]"), hint
    assert not (tmp_path / "home").exists(), "the check comes before any write"


def test_the_message_names_every_missing_library(tmp_path):
    res = _cli(["ingest", "--once"], SERVER_LIBRARIES, tmp_path)
    assert res.returncode == 3
    assert "(lmdb, watchdog and sdnotify are not installed)" in one_line_error(res)


def test_a_broken_server_library_is_the_same_one_line(tmp_path):
    """Found by the check but failing on import (a damaged install): the same
    message, not an internal error.  The daemon imports sdnotify first."""
    res = _cli(["ingest"], SERVER_LIBRARIES, tmp_path, broken=True, timeout=60)
    assert res.returncode == 3, (res.stdout, res.stderr)
    line = one_line_error(res)
    assert "'eidetic ingest' needs the server libraries (sdnotify is not installed)" in line, line


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["ingest", "--help"], ["fsck", "--help"]]
                         + [[c, "--help"] for c in CLIENT_COMMANDS], ids=" ".join)
def test_help_and_version_work_in_the_client_only_install(tmp_path, args):
    res = _cli(args, SERVER_LIBRARIES + POSIX_ONLY, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "" and res.stdout.strip()


def test_send_works_without_the_server_libraries(tmp_path):
    src = tmp_path / "session1"
    (src / "eprime").mkdir(parents=True)
    (src / "eprime" / "s1.txt").write_bytes(b"trial,rt\n1,512\n")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    res = _cli(["send", src, "--study", "demo", "--to", inbox, "--location", "labA"], SERVER_LIBRARIES, tmp_path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    entries = [p for p in inbox.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1 and entries[0].name.startswith("demo-")
    assert (entries[0] / "eprime" / "s1.txt").read_bytes() == b"trial,rt\n1,512\n"


# ------------------------------------------ (c) a real client-only install

def _copy_source(dest: Path) -> Path:
    """The working tree's committed-looking files (no build leftovers in the repository)."""
    dest.mkdir()
    for item in ("pyproject.toml", "README.md", "LICENSE", "eidetic", "cli"):
        p = REPO / item
        if p.is_dir():
            shutil.copytree(p, dest / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif p.exists():
            shutil.copy2(p, dest / item)
    return dest


def _run(argv, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, **kw)


def test_a_fresh_client_only_install_sends_and_names_the_extra_that_makes_it_a_server(tmp_path):
    t0 = time.monotonic()
    src = _copy_source(tmp_path / "src")
    venv = tmp_path / "venv"
    res = _run([sys.executable, "-m", "venv", venv], timeout=120)
    assert res.returncode == 0, res.stderr
    py = venv / "bin" / "python"
    eidetic = venv / "bin" / "eidetic"
    env = clean_env(EIDETIC_HOME=str(tmp_path / "home"), EIDETIC_CLIENT_HOME=str(tmp_path / "client"),
                    PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    # What a lab PC does: the base install, from a folder (a clone).
    res = _run([py, "-m", "pip", "install", "-q", src], env=env, cwd=tmp_path)
    if res.returncode != 0:
        pytest.fail(f"pip install of the client profile failed (no index reachable?): {res.stderr[-2000:]}")
    res = _run([py, "-c", "import importlib.util as u; print([n for n in ('lmdb', 'watchdog', 'sdnotify') "
                          "if u.find_spec(n)])"], env=env)
    assert res.stdout.strip() == "[]", "the client profile pulled in a server library: " + res.stdout

    res = _run([eidetic, "send", "--help"], env=env, cwd=tmp_path)
    assert res.returncode == 0 and "--study" in res.stdout, res.stderr

    # The uploader sends to a folder inbox: the server's own, made by hand here.
    inbox = tmp_path / "home" / "inbox"
    inbox.mkdir(parents=True)
    data = tmp_path / "session1"
    (data / "eprime").mkdir(parents=True)
    (data / "eprime" / "s1.txt").write_bytes(b"trial,rt\n1,512\n")
    res = _run([eidetic, "send", data, "--study", "demo", "--to", inbox, "--location", "labA"], env=env, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout, res.stderr)

    # The server's commands say, in one line, how to get them.
    res = _run([eidetic, "ingest", "--once"], env=env, cwd=tmp_path)
    assert res.returncode == 3, (res.stdout, res.stderr)
    line = one_line_error(res)
    assert line.startswith("eidetic: 'eidetic ingest' needs the server libraries "
                           "(lmdb, watchdog and sdnotify are not installed): "), line
    hint = _install_hint(line)
    # This venv's interpreter, and the folder it was installed from, with the extra.
    assert Path(hint[0]).parent == venv / "bin" and hint[1:4] == ["-m", "pip", "install"], hint
    assert hint[4:] == [f"{src}[server]"], hint

    # Do what it says; then the message is gone and the entry the uploader sent is ingested.
    res = _run(hint, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    res = _run([eidetic, "init"], env=env, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    res = _run([eidetic, "ingest", "--once", "--settle", "0"], env=env, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "needs the server libraries" not in res.stderr
    assert res.stdout.startswith("ingested demo-"), res.stdout
    tree = tmp_path / "home" / "studies" / "demo" / "tree"
    assert (tree / "eprime" / "s1.txt").read_bytes() == b"trial,rt\n1,512\n"
    print(f"fresh client install, send, hint, server extra, ingest: {time.monotonic() - t0:.1f} s")


def test_the_client_wheel_built_by_python_m_build_installs_and_sends_without_the_server_extra(tmp_path):
    """What CI ships to a lab PC: a wheel, built with the standard build
    front end, installed into a clean venv without [server]."""
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    env = clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), PIP_DISABLE_PIP_VERSION_CHECK="1",
                    EIDETIC_CLIENT_MACHINE_SETTINGS=str(tmp_path / "none.yaml"))
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    res = _run([sys.executable, "-m", "build", "--wheel", "--outdir", dist, src], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    [wheel] = dist.glob("eidetic_archive-*.whl")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", venv], timeout=120).returncode == 0
    res = _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    eidetic = venv / "bin" / "eidetic"
    assert (venv / "bin" / "eidetic-gui").exists()
    res = _run([venv / "bin" / "python", "-c", "import importlib.util as u; print([n for n in "
                "('lmdb', 'watchdog', 'sdnotify') if u.find_spec(n)])"], env=env)
    assert res.stdout.strip() == "[]", res.stdout
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = tmp_path / "study"
    (data / "eprime").mkdir(parents=True)
    (data / "eprime" / "s1.txt").write_bytes(b"trial,rt\n")
    (data / "eprime" / "Thumbs.db").write_bytes(b"cache")
    res = _run([eidetic, "send", data, "--study", "demo", "--to", inbox, "--location", "labA", "--json"],
               env=env, cwd=tmp_path)
    assert res.returncode == 0, (res.stdout, res.stderr)
    import json
    result = json.loads(res.stdout.splitlines()[-1])
    assert (result["event"], result["files"], result["excluded"]) == ("result", 1, 1)
    assert (inbox / result["entry"] / "eprime" / "s1.txt").read_bytes() == b"trial,rt\n"
    res = _run([eidetic, "gui", "--help"], env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
