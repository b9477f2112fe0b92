"""docs/admin.md, "SFTP accounts for collectors", run as written against the
real OpenSSH server: the commands and the sshd_config block are read from the
document itself (with the test's own names and paths put in for the example
ones), so the recipe and these tests cannot drift apart.

As root only (CI runs as root): it creates a throwaway group and collector
account (unique names, removed afterwards), a chroot under /srv with the
layout's inbox bind-mounted into it, and a private sshd on a free port of
127.0.0.1.  The collector sends with the ``eidetic send`` CLI into
``sftp://user@127.0.0.1:PORT/inbox`` and the server ingests the entry.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from conftest import clean_env, eidetic_argv, make_layout, one_line_error, plain_files
from eidetic.client.transport import SFTPOptions, open_transport, parse_destination
from eidetic.core.errors import TransportError
from sshd_peer import SSHD, free_port, keygen, need_sshd
from test_send import run_on_terminal

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin.md"
SECTION = "## SFTP accounts for collectors"
FILES = {"eprime/s01.txt": b"trial,rt\n1,512\n", "biopac/run 1.csv": b"t,v\n0,1\n" * 100}


# ------------------------------------------------------------ the document

def section() -> str:
    text = DOC.read_text()
    assert SECTION in text, f"{DOC} has no section {SECTION!r}"
    rest = text.split(SECTION, 1)[1]
    return rest.split("\n## ", 1)[0]


def code_blocks() -> list[str]:
    """The fenced blocks of the section, in order (indented ones too)."""
    blocks, cur, indent = [], None, 0
    for line in section().splitlines():
        s = line.strip()
        if s.startswith("```"):
            if cur is None:
                cur, indent = [], len(line) - len(line.lstrip())
            else:
                blocks.append("\n".join(cur) + "\n")
                cur = None
        elif cur is not None:
            cur.append(line[indent:])
    assert cur is None, "an unclosed code block"
    return blocks


def commands(block: str) -> list[str]:
    """The shell commands of a block, comments and output lines left out."""
    out = []
    for line in block.splitlines():
        cmd = re.sub(r"\s+#.*$", "", line).strip()
        if cmd and not cmd.startswith("#") and not re.match(r"^\d+ SHA256:", cmd):
            out.append(cmd)
    return out


def doc_block(first_word: str) -> str:
    found = [b for b in code_blocks() if b.lstrip().startswith(first_word)]
    assert len(found) == 1, f"expected one block starting with {first_word!r} in {SECTION}"
    return found[0]


class Names:
    """The document's example names and the test's throwaway ones."""

    def __init__(self, inbox: Path, workdir: Path) -> None:
        tok = secrets.token_hex(3)
        self.group = f"eidup{tok}"
        self.user = f"eidrc{tok}"
        self.chroot = Path(f"/srv/eidetic-sftp-test-{tok}")
        self.inbox = inbox
        self.key = workdir / "collector_ed25519"
        self.host_key = workdir / "host_ed25519"

    def put_in(self, text: str) -> str:
        for doc, ours in (("/etc/ssh/ssh_host_ed25519_key.pub", f"{self.host_key}.pub"),
                          ("/srv/eidetic-sftp", str(self.chroot)),
                          ("/data-dropbox/inbox", str(self.inbox)),
                          ("eidetic-up", self.group),
                          ("jdoe.pub", f"{self.key}.pub")):
            text = text.replace(doc, ours)
        return re.sub(r"\bjdoe\b", self.user, text)


def run(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if check:
        assert r.returncode == 0, f"{cmd}: exit {r.returncode}: {r.stderr}"
    return r


# ------------------------------------------------------------------ sshd

class RecipeSSHD:
    """sshd -D with Debian's defaults for what the recipe does not set, and the
    document's Match block (PasswordAuthentication switched as the document
    says a site that hands out passwords does)."""

    def __init__(self, workdir: Path, names: Names, match_block: str, passwords: bool = False) -> None:
        self.dir = workdir
        self.port = free_port()
        self.log = workdir / f"sshd-{self.port}.log"
        if passwords:
            assert "PasswordAuthentication no" in match_block
            match_block = match_block.replace("PasswordAuthentication no", "PasswordAuthentication yes")
        self.config = workdir / f"sshd_config-{self.port}"
        self.config.write_text("\n".join([
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {names.host_key}",
            f"PidFile none",
            "KbdInteractiveAuthentication no",      # Debian's sshd_config
            "UsePAM yes",                           # as Debian runs it (locks and expiry through PAM)
            "Subsystem sftp /usr/lib/openssh/sftp-server",
            "LogLevel VERBOSE",
            "",
        ]) + names.put_in(match_block))
        r = subprocess.run([SSHD, "-t", "-f", str(self.config)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"sshd -t: {r.stderr}"
        os.makedirs("/run/sshd", exist_ok=True)
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log,
                                     stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def url(self, user: str) -> str:
        return f"sftp://{user}@127.0.0.1:{self.port}/inbox"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# -------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    need_sshd()
    for tool in ("groupadd", "groupdel", "useradd", "userdel", "usermod", "chpasswd", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    work = tmp_path_factory.mktemp("sftp-recipe")
    lay = make_layout(work / "srv", studies=("s1",))
    names = Names(lay.inbox, work)
    keygen(names.host_key)
    keygen(names.key)
    setup, account = doc_block("groupadd"), doc_block("useradd")
    undo: list[str] = []
    try:
        for cmd in commands(setup):
            if ">> /etc/fstab" in cmd:
                continue        # the test's mount is for the test only
            run(names.put_in(cmd))
            if cmd.startswith("groupadd"):
                undo.append(f"groupdel {names.group}")
            elif cmd.startswith("mkdir"):
                undo.append(f"rmdir {names.chroot}/inbox {names.chroot}")
            elif cmd.startswith("mount --bind"):
                undo.append(f"umount {names.chroot}/inbox")
        for cmd in commands(account):
            run(names.put_in(cmd))
            if cmd.startswith("useradd"):
                undo.append(f"userdel --remove {names.user}")
        server = RecipeSSHD(work, names, doc_block("Match Group"))
        try:
            yield lay, names, server
        finally:
            server.stop()
    finally:
        for cmd in reversed(undo):
            run(cmd, check=False)


@pytest.fixture
def collector(tmp_path, recipe) -> dict:
    """The lab PC: its own client folder, an empty home (no keys, no agent)."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), HOME=str(home))
    env.pop("SSH_AUTH_SOCK", None)
    return env


def handed_out_fingerprint(names: Names) -> str:
    """The document's fingerprint command, run; its SHA256 part is what the admin hands out."""
    [cmd] = [c for c in commands(doc_block("ssh-keygen -lf")) if c.startswith("ssh-keygen")]
    out = run(names.put_in(cmd)).stdout.strip()
    assert re.fullmatch(r"256 SHA256:\S+ .* \(ED25519\)", out), out
    return out.split()[1]


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for rel, data in FILES.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    return src


def send(env: dict, src: Path, url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(eidetic_argv() + ["send", str(src), "--study", "s1", "--to", url, "--location", "labA",
                                            *extra],
                          capture_output=True, text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)


def collector_sftp(server: RecipeSSHD, names: Names) -> paramiko.SSHClient:
    c = paramiko.SSHClient()
    c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    c.connect("127.0.0.1", server.port, names.user, key_filename=str(names.key), allow_agent=False,
              look_for_keys=False, timeout=30)
    return c


# ----------------------------------------------------------------- tests

def test_the_section_has_the_commands_and_the_block_these_tests_run():
    text = section()
    assert "sftp://jdoe@dropbox.example.org/inbox" in text
    assert "ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub" in text
    match = doc_block("Match Group")
    for line in ("Match Group eidetic-up", "ChrootDirectory /srv/eidetic-sftp", "ForceCommand internal-sftp",
                 "AllowTcpForwarding no", "X11Forwarding no", "PasswordAuthentication no"):
        assert line in match
    setup = commands(doc_block("groupadd"))
    assert any(c.startswith("mount --bind /data-dropbox/inbox /srv/eidetic-sftp/inbox") for c in setup)
    assert any(">> /etc/fstab" in c for c in setup)
    assert [c.split()[0] for c in commands(doc_block("usermod"))] == ["usermod", "usermod"]


def test_a_collector_sends_into_the_chroot_and_the_server_ingests_it(tmp_path, recipe, collector):
    lay, names, server = recipe
    fp = handed_out_fingerprint(names)
    t0 = time.monotonic()
    r = send(collector, source(tmp_path), server.url(names.user), "--identity", str(names.key),
             "--accept-host-key", fp)
    assert r.returncode == 0, r.stderr + server.log.read_text()[-2000:]
    assert server.url(names.user) in r.stdout
    [entry] = [n for n in os.listdir(lay.inbox) if not n.startswith(".")]
    # The entry in the real inbox: the collector's, with the inbox's group
    # (setgid) and the modes of ForceCommand's -u 0027, whatever the client asked.
    top = lay.inbox / entry
    st = os.lstat(top)
    assert st.st_uid == int(run(f"id -u {names.user}").stdout) and st.st_gid == os.lstat(lay.inbox).st_gid
    for dirpath, dirs, files in os.walk(top):
        for d in dirs:
            assert stat.S_IMODE(os.lstat(os.path.join(dirpath, d)).st_mode) == 0o2750
        for f in files:
            assert stat.S_IMODE(os.lstat(os.path.join(dirpath, f)).st_mode) == 0o640
    [res] = lay.ingest()
    assert res.outcome == "ingested", res.reason
    assert plain_files(lay.tree("s1")) == {k.encode(): v for k, v in FILES.items()}
    print(f"send + ingest through the recipe's chroot: {time.monotonic() - t0:.2f} s")


def test_the_collector_cannot_list_or_read_back_leave_the_inbox_or_run_commands(tmp_path, recipe, collector):
    lay, names, server = recipe
    before = set(os.listdir(lay.inbox))
    r = send(collector, source(tmp_path), server.url(names.user), "--identity", str(names.key),
             "--accept-host-key", handed_out_fingerprint(names))
    assert r.returncode == 0, r.stderr
    [entry] = set(os.listdir(lay.inbox)) - before
    assert (lay.inbox / entry / "eprime" / "s01.txt").exists()
    c = collector_sftp(server, names)
    try:
        sftp = c.open_sftp()
        assert stat.S_ISDIR(sftp.stat(f"/inbox/{entry}/eprime").st_mode)    # names can be looked at ...
        with pytest.raises(PermissionError):
            sftp.listdir("/inbox")                                          # ... but nothing listed
        with pytest.raises(PermissionError):
            sftp.listdir(f"/inbox/{entry}")
        with pytest.raises(PermissionError):
            with sftp.open(f"/inbox/{entry}/eprime/s01.txt", "rb") as f:    # nor read back, even one's own
                f.read()
        with pytest.raises(FileNotFoundError):
            sftp.stat("/etc/passwd")                                        # the chroot: nothing else there
        with pytest.raises(FileNotFoundError):
            sftp.stat(str(lay.inbox))
        with pytest.raises(PermissionError):
            sftp.mkdir("/elsewhere")                                        # the chroot itself is root's
        sftp.close()
        _stdin, stdout, _stderr = c.exec_command("id; cat /etc/passwd", timeout=10)
        out = stdout.read()
        assert b"uid=" not in out and b"root:" not in out                  # ForceCommand: SFTP only
    finally:
        c.close()


def test_a_locked_account_is_refused_with_one_line(tmp_path, recipe, collector):
    lay, names, server = recipe
    lock, unlock = (names.put_in(c) for c in commands(doc_block("usermod")))
    fp = handed_out_fingerprint(names)
    src = source(tmp_path)
    before = sorted(os.listdir(lay.inbox))
    # What the document says of `usermod -L`/`passwd -l` alone: the account's
    # password is locked already ("!", as useradd leaves it), and its key logs in.
    assert run(f"getent shadow {names.user}").stdout.split(":")[1].startswith("!")
    r = send(collector, src, server.url(names.user), "--identity", str(names.key), "--accept-host-key", fp)
    assert r.returncode == 0, r.stderr
    before = sorted(os.listdir(lay.inbox))
    run(lock)
    try:
        r = send(collector, src, server.url(names.user), "--identity", str(names.key), "--accept-host-key", fp)
        assert r.returncode != 0
        line = one_line_error(r)
        assert line == (f"eidetic: authentication failed for {names.user}@127.0.0.1 (tried: key {names.key}); "
                        "check the user name, or give your key with --identity FILE"), line
        assert sorted(os.listdir(lay.inbox)) == before          # nothing arrived
        assert f"Access denied for user {names.user} by PAM account configuration" in server.log.read_text()
    finally:
        run(unlock)
    r = send(collector, src, server.url(names.user), "--identity", str(names.key), "--accept-host-key", fp)
    assert r.returncode == 0, r.stderr                          # unlocked as the document says


def test_a_refused_key_is_named_before_the_password_is_asked(tmp_path, recipe, monkeypatch):
    lay, names, _server = recipe
    password = secrets.token_urlsafe(12)
    run(f"echo '{names.user}:{password}' | chpasswd")
    server = RecipeSSHD(tmp_path, names, doc_block("Match Group"), passwords=True)
    try:
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        keygen(home / ".ssh" / "id_ed25519")                    # a key the server does not know
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        prompts: list[str] = []

        def answer(prompt: str) -> str:
            prompts.append(prompt)
            return password

        fp = handed_out_fingerprint(names)
        t = open_transport(parse_destination(server.url(names.user)),
                           SFTPOptions(accept_host_key=fp, password=answer))
        try:
            t.check_inbox()
        finally:
            t.close()
        assert prompts == [f"the server refused the key ~/.ssh/id_ed25519; password for {names.user}@127.0.0.1: "]

        # Without a key, the plain prompt; without a way to ask, one line naming the refused key.
        (home / ".ssh" / "id_ed25519").unlink()
        prompts.clear()
        t = open_transport(parse_destination(server.url(names.user)),
                           SFTPOptions(accept_host_key=fp, password=answer))
        t.close()
        assert prompts == [f"{names.user}@127.0.0.1's password: "]
        keygen(home / ".ssh" / "id_ed25519")
        with pytest.raises(TransportError) as e:
            open_transport(parse_destination(server.url(names.user)), SFTPOptions(accept_host_key=fp))
        assert f"(tried: key {home}/.ssh/id_ed25519)" in str(e.value)

        # The CLI on a terminal: the same words, then the send goes through.
        env = clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), HOME=str(home))
        env.pop("SSH_AUTH_SOCK", None)
        before = set(os.listdir(lay.inbox))
        code, out = run_on_terminal(eidetic_argv() + ["send", str(source(tmp_path)), "--study", "s1", "--to",
                                                      server.url(names.user), "--accept-host-key", fp,
                                                      "--location", "labA"],
                                    env, {f"password for {names.user}@127.0.0.1: ".encode(): f"{password}\n".encode()})
        text = out.decode("utf-8", "replace")
        assert code == 0, text
        assert f"the server refused the key ~/.ssh/id_ed25519; password for {names.user}@127.0.0.1: " in text
        assert password not in text
        assert len(set(os.listdir(lay.inbox)) - before) == 1
    finally:
        server.stop()
        run(f"usermod -p '*' {names.user}")


def test_a_chroot_writable_by_others_is_refused_as_openssh_rules(tmp_path, recipe, collector):
    lay, names, server = recipe
    os.chmod(names.chroot, 0o775)
    try:
        r = send(collector, source(tmp_path), server.url(names.user), "--identity", str(names.key),
                 "--accept-host-key", handed_out_fingerprint(names))
        assert r.returncode != 0
        assert "127.0.0.1 offers no SFTP service" in one_line_error(r)     # what the collector sees
        assert "bad ownership or modes for chroot directory" in server.log.read_text()
    finally:
        os.chmod(names.chroot, 0o755)


def test_the_fingerprint_as_host_key_in_the_machine_wide_settings_needs_no_question(tmp_path, recipe, collector):
    lay, names, server = recipe
    machine = tmp_path / "machine" / "eidetic-client.yaml"
    machine.parent.mkdir()
    machine.write_text("location: labA\n"
                       "destinations:\n"
                       "  foo:\n"
                       "    study: s1\n"
                       f"    to: {server.url(names.user)}\n"
                       f"    host_key: {handed_out_fingerprint(names)}\n"
                       f"    identity: {names.key}\n")
    env = dict(collector, EIDETIC_CLIENT_MACHINE_SETTINGS=str(machine))
    before = set(os.listdir(lay.inbox))
    r = subprocess.run(eidetic_argv() + ["send", str(source(tmp_path)), "--dest", "foo"], capture_output=True,
                       text=True, env=env, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert len(set(os.listdir(lay.inbox)) - before) == 1
