"""The shipped systemd unit: systemd-analyze accepts it and it has the directives the daemon relies on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "contrib" / "systemd" / "eidetic.service"
SHIPPED_EXEC = "/usr/local/bin/eidetic"


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed")
    return exe


def _eidetic_script() -> str:
    script = Path(sys.executable).parent / "eidetic"
    if not script.exists():
        pytest.skip("the eidetic console script is not installed next to this python")
    return str(script)


def _man_pages(tmp_path: Path) -> Path:
    """The man pages installed as docs/admin.md says (python -m eidetic_cli.manpages DIR/man1):
    verify runs man for each man: in Documentation= and complains about a missing page."""
    mandir = tmp_path / "man"
    if not (mandir / "man1").is_dir():
        subprocess.run([sys.executable, "-m", "eidetic_cli.manpages", str(mandir / "man1")], check=True,
                       capture_output=True, timeout=60)
    return mandir


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    unit = tmp_path / "eidetic.service"
    unit.write_text(text)
    env = {**os.environ, "MANPATH": str(_man_pages(tmp_path))}
    # Without man (a minimal container) verify could only say that man failed.
    man = [] if shutil.which("man") else ["--man=no"]
    return subprocess.run([_analyze(), "verify", *man, str(unit)], capture_output=True, text=True, timeout=60,
                          env=env)


def _installed_text() -> str:
    # verify checks that ExecStart's executable exists: point it at this venv's script.
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} ingest" in text
    return text.replace(f"ExecStart={SHIPPED_EXEC}", f"ExecStart={_eidetic_script()}")


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            out.setdefault(m.group(1), []).append(m.group(2))
    return out


@pytest.mark.parametrize("user", ["eidetic", "root"], ids=["service-user-as-shipped", "user-that-exists"])
def test_systemd_analyze_verify_reports_nothing_for_the_unit(tmp_path, user):
    # Here systemd-analyze says nothing about a User= that does not exist
    # (the usual case before 'adduser --system eidetic'), and nothing for one
    # that does; both must verify without a single complaint.
    text = _installed_text().replace("User=eidetic", f"User={user}").replace("Group=eidetic", f"Group={user}")
    res = _verify(tmp_path, text)
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == "" and res.stdout.strip() == "", res.stderr + res.stdout


def test_verify_would_catch_a_directive_systemd_252_does_not_know(tmp_path):
    """Guards the test above: verify's complaints reach us (Type=notify-reload is systemd 253+)."""
    res = _verify(tmp_path, _installed_text().replace("Type=notify\n", "Type=notify-reload\n"))
    assert "notify-reload" in res.stderr


def test_documentation_names_man_pages_the_generator_writes(tmp_path):
    """Documentation= points at pages that exist once installed; verify would name a missing one."""
    docs = _directives(UNIT.read_text())["Documentation"][0].split()
    assert docs == ["man:eidetic(1)", "man:eidetic-ingest(1)"]
    pages = set(os.listdir(_man_pages(tmp_path) / "man1"))
    assert {"eidetic.1", "eidetic-ingest.1"} <= pages
    if shutil.which("man"):
        res = _verify(tmp_path, _installed_text().replace("man:eidetic-ingest(1)", "man:eidetic-nosuch(1)"))
        assert "eidetic-nosuch" in res.stderr


def test_verify_would_catch_a_missing_executable(tmp_path):
    res = _verify(tmp_path, _installed_text().replace(_eidetic_script(), str(tmp_path / "no-such-eidetic")))
    assert res.returncode != 0 and "no-such-eidetic" in res.stderr


def test_unit_has_the_directives_the_daemon_relies_on():
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == [f"{SHIPPED_EXEC} ingest"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["WatchdogSec"] == ["60"]
    assert d["Restart"] == ["on-failure"]
    assert d["User"] == ["eidetic"] and d["Group"] == ["eidetic"]
    assert d["ProtectSystem"] == ["strict"]
    assert d["NoNewPrivileges"] == ["yes"]
    assert d["CapabilityBoundingSet"] == [""]
    assert d["UMask"] == ["0027"]
    assert "PYTHONUNBUFFERED=1" in d["Environment"]
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    for flag in ("PrivateTmp", "ProtectHome", "ProtectKernelTunables", "ProtectKernelModules",
                 "LockPersonality", "MemoryDenyWriteExecute"):
        assert d[flag] == ["yes"], flag
    assert d["ReadWritePaths"], "ProtectSystem=strict needs ReadWritePaths for the data"
