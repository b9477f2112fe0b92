"""Progress on a terminal: `ingest --once` (per entry: files, bytes, rate) and
`checkout` of a folder draw a tqdm bar on stderr when it is a terminal, like
`send` and `fsck`; off a terminal, with -q and with --json they draw nothing."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import termios
import threading

import pytest
from conftest import clean_env, drop, eidetic_argv, make_layout, run_cli


def run_on_terminal(*args, config) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``eidetic --config CONFIG ARGS`` with stderr on a pseudo-terminal
    (100 columns) and stdout on a pipe; (result, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    shown = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:         # EIO: every writer closed the terminal
                return
            if not data:
                return
            shown.extend(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        argv = eidetic_argv() + ["--config", str(config), *args]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave,
                                env=clean_env(), text=True)
        os.close(slave)
        slave = -1
        out, _ = proc.communicate(timeout=120)
        reader.join(timeout=10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return subprocess.CompletedProcess(argv, proc.returncode, out, ""), shown.decode("utf-8", "replace")


@pytest.fixture
def lay(tmp_path):
    lay = make_layout(tmp_path, studies=("s1",))
    drop(lay.inbox, "s1-many", {f"d/f{i:03}": os.urandom(50_000) for i in range(200)})
    return lay


def test_ingest_once_on_a_terminal_shows_each_entry_with_files_bytes_and_rate(lay):
    res, shown = run_on_terminal("ingest", "--once", config=lay.config_path)
    assert res.returncode == 0, shown
    assert "ingested s1-many:" in res.stdout and "\r" not in res.stdout     # the bar is never on stdout
    bars = [ln for ln in shown.split("\r") if ln.startswith("s1-many: ")]
    assert bars, shown
    assert all(" B [" in ln or "iB [" in ln for ln in bars) and "files]" in bars[0], bars
    assert "Traceback" not in shown


def test_checkout_of_a_folder_on_a_terminal_shows_files_bytes_and_rate(lay):
    assert lay.cli("ingest", "--once").returncode == 0
    res, shown = run_on_terminal("checkout", "s1:d", "-o", str(lay.root / "out"), config=lay.config_path)
    assert res.returncode == 0, shown
    assert "restored 200 files" in res.stdout
    bars = [ln for ln in shown.split("\r") if ln.startswith("checkout s1:d: ")]
    assert bars and any("files]" in ln or "file]" in ln for ln in bars), shown
    assert len(os.listdir(lay.root / "out")) == 200


@pytest.mark.parametrize("extra", [["-q"], ["--json"]])
def test_no_progress_on_a_terminal_with_q_or_json(lay, extra):
    res, shown = run_on_terminal("ingest", "--once", *extra, config=lay.config_path)
    assert res.returncode == 0, shown
    assert "s1-many:" not in shown and shown.strip() == "", shown
    if extra == ["--json"]:
        assert json.loads(res.stdout)["summary"]["ingested"] == 1
    res, shown = run_on_terminal("checkout", "s1:d", "-o", str(lay.root / "out"), *extra, config=lay.config_path)
    assert res.returncode == 0, shown
    assert shown.strip() == "", shown


def test_off_a_terminal_ingest_and_checkout_print_no_progress(lay):
    res = run_cli("ingest", "--once", config=lay.config_path)
    assert res.returncode == 0
    assert res.stderr == ""
    assert res.stdout.splitlines()[0].startswith("ingested s1-many: upload ")
    res = run_cli("checkout", "s1:d", "-o", str(lay.root / "out"), config=lay.config_path)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.startswith("restored 200 files") and len(res.stdout.splitlines()) == 1
