"""A real OpenSSH server for the SFTP tests (docs/design.md, "Test peers").

``SSHServer(workdir)`` writes a throwaway ed25519 host key, a throwaway user
key authorised for the current user (root), and an sshd config that listens on
127.0.0.1 at a free port with key authentication only and the internal SFTP
server; ``start()`` runs ``sshd -D -e -f cfg`` as a child and waits until it
accepts connections; ``stop()`` ends it by its pid.  ``SSHServer(workdir,
passwords=True)`` also accepts passwords (for a throwaway system user the test
creates; root stays key-only).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"


def need_sshd() -> None:
    if os.geteuid() != 0:
        pytest.skip("the SFTP tests log in to a throwaway sshd as root: not running as root")
    if not os.access(SSHD, os.X_OK):
        pytest.skip(f"{SSHD} is not installed (apt-get install openssh-server)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "eidetic-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)


def fingerprint(pub_line: str) -> str:
    """OpenSSH's SHA256 fingerprint of a public key line ("type base64 [comment]")."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class SSHServer:
    def __init__(self, workdir: Path, passwords: bool = False) -> None:
        # passwords=True also lets users other than root log in with a password
        # (root stays key-only), for the tests of a password login.
        self.passwords = passwords
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = self.dir / "host_ed25519"
        self.user_key = self.dir / "user_ed25519"
        self.authorized_keys = self.dir / "authorized_keys"
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen | None = None
        keygen(self.host_key)
        keygen(self.user_key)
        self.authorized_keys.write_text(Path(f"{self.user_key}.pub").read_text())

    @property
    def host_pub(self) -> str:
        return Path(f"{self.host_key}.pub").read_text().strip()

    @property
    def host_fingerprint(self) -> str:
        return fingerprint(self.host_pub)

    @property
    def known_hosts_name(self) -> str:
        return f"[127.0.0.1]:{self.port}"

    def known_hosts_line(self, pub: str | None = None) -> str:
        kind, b64 = (pub or self.host_pub).split()[:2]
        return f"{self.known_hosts_name} {kind} {b64}\n"

    def url(self, path: str | Path, user: str = "root") -> str:
        return f"sftp://{user}@127.0.0.1:{self.port}{path}"

    def start(self) -> "SSHServer":
        os.makedirs("/run/sshd", exist_ok=True)     # sshd's privilege separation directory
        self.port = free_port()
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"PasswordAuthentication {'yes' if self.passwords else 'no'}",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            "StrictModes no",
            "UsePAM no",
            "PidFile none",
            "Subsystem sftp internal-sftp",
            "",
        ]))
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"sshd did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
