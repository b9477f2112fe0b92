"""eidetic send: a lab PC's upload into a local/mounted inbox or over SFTP
(a real OpenSSH server, see sshd_peer.py), then ingested for real."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import clean_env, eidetic_argv, one_line_error, plain_files
from eidetic.core.description import DESCRIPTION_NAME, open_description
from eidetic.core.errors import SendError
from eidetic.core.hashing import hash_bytes
from eidetic.client.send import SendHooks, SendOptions, send
from sshd_peer import SSHServer, keygen, need_sshd

ENTRY_RE = re.compile(r"^s1-(\w+)-[0-9]{8}T[0-9]{6}Z-[0-9a-f]{6}$")
SMALL_FILES = {
    "eprime/s01.txt": b"trial,rt\n1,512\n",
    "eprime/s02 final.txt": b"trial,rt\n1,498\n",       # a space
    "Müller/Überblick.csv": "ä,ö,ü\n".encode(),         # non-ASCII folder and file
    "deep/a/b/c/d.bin": bytes(range(256)) * 64,         # a nested tree
    "empty.dat": b"",
    "z.txt": b"last",
}


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    need_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


@pytest.fixture
def client(tmp_path) -> dict:
    """The lab PC's environment: its own client dir and an empty home (no
    ~/.ssh/known_hosts, no default keys, no agent)."""
    home = tmp_path / "home"
    home.mkdir()
    return clean_env(EIDETIC_CLIENT_HOME=str(tmp_path / "client"), HOME=str(home))


def make_source(root: Path, files: dict | None = None) -> dict[bytes, bytes]:
    """Write *files* under *root* plus a symbolic link; returns what must arrive."""
    files = SMALL_FILES if files is None else files
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "link-to-z").symlink_to("z.txt")
    return {os.fsencode(k): v for k, v in files.items()}


def entries(inbox: Path) -> list[str]:
    return sorted(os.listdir(inbox))


def entry_files(entry: Path) -> dict[bytes, bytes]:
    out = {}
    root = os.fsencode(entry)
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = dirpath + b"/" + f
            out[p[len(root) + 1:]] = Path(os.fsdecode(p)).read_bytes()
    return out


def run_argv(argv: list[str], client: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command as the lab PC's user would, without a terminal."""
    return subprocess.run(argv, capture_output=True, text=True, env=client, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def send_cli(client: dict, source, to: str, *extra, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_argv(eidetic_argv() + ["send", str(source), "--study", "s1", "--to", to, *extra], client, timeout)


class Dest:
    """One way of reaching the layout's inbox: as a folder or over SFTP."""

    def __init__(self, kind: str, inbox: Path, sshd: SSHServer | None) -> None:
        self.kind = kind
        self.inbox = inbox
        self.sshd = sshd
        self.url = sshd.url(inbox) if sshd else str(inbox)

    def args(self) -> list[str]:
        if self.sshd is None:
            return []
        return ["--identity", str(self.sshd.user_key), "--accept-host-key", self.sshd.host_fingerprint]


@pytest.fixture(params=["folder", "sftp"])
def dest(request, layout) -> Dest:
    if request.param == "sftp":
        return Dest("sftp", layout.inbox, request.getfixturevalue("sshd"))
    return Dest("folder", layout.inbox, None)


def check_description(entry: Path, expected: dict[bytes, bytes], location: str = "labA") -> None:
    r = open_description(os.path.join(os.fsencode(entry), DESCRIPTION_NAME))
    assert (r.header.study, r.header.location, r.header.client.split()[0]) == ("s1", location, "eidetic")
    assert r.header.user and r.header.host and r.header.platform and os.path.isabs(r.header.source)
    listed = {f.path: (f.size, f.blake3) for f in r.files()}
    assert listed == {k: (len(v), hash_bytes(v)) for k, v in expected.items()}
    assert r.trailer is not None and r.trailer.files == len(expected)


def only_entry(inbox: Path) -> Path:
    names = entries(inbox)
    assert len(names) == 1, names
    assert ENTRY_RE.match(names[0]), names
    return inbox / names[0]


# ------------------------------------------------------------------ arrive

def test_send_arrives_as_one_complete_entry_that_ingest_takes(tmp_path, layout, client, dest):
    expected = make_source(tmp_path / "src")
    res = send_cli(client, tmp_path / "src", dest.url, "--location", "labA", *dest.args())
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""                 # not a terminal: no progress bar, nothing else
    entry = only_entry(layout.inbox)
    assert f"sent {len(expected)} files" in res.stdout and entry.name in res.stdout
    assert "skipped 1 symbolic link" in res.stdout
    got = entry_files(entry)
    assert got.pop(DESCRIPTION_NAME)
    assert got == expected                  # the symlink was not followed nor sent
    check_description(entry, expected)
    [r] = layout.ingest()
    assert r.outcome == "ingested", r.reason
    assert plain_files(layout.tree("s1")) == expected


def test_a_single_file_can_be_sent(tmp_path, layout, client):
    src = tmp_path / "one file.txt"
    src.write_bytes(b"solo")
    res = send_cli(client, src, str(layout.inbox), "--location", "labA")
    assert res.returncode == 0, res.stderr
    entry = only_entry(layout.inbox)
    assert entry_files(entry) == {b"one file.txt": b"solo", DESCRIPTION_NAME: entry_files(entry)[DESCRIPTION_NAME]}
    check_description(entry, {b"one file.txt": b"solo"})


# --------------------------------------------------------------- host keys

def test_unknown_host_key_is_refused_without_a_terminal_then_accepted_by_flag_and_saved(
        tmp_path, layout, client, sshd):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    url, key = sshd.url(layout.inbox), ["--identity", str(sshd.user_key)]
    res = send_cli(client, tmp_path / "src", url, *key)
    assert res.returncode == 3
    line = one_line_error(res)
    assert "unknown host key" in line and sshd.host_fingerprint in line and "--accept-host-key" in line
    assert entries(layout.inbox) == []
    wrong = send_cli(client, tmp_path / "src", url, *key, "--accept-host-key", "SHA256:" + "A" * 43)
    assert wrong.returncode == 3 and sshd.host_fingerprint in one_line_error(wrong)
    ok = send_cli(client, tmp_path / "src", url, *key, "--accept-host-key", sshd.host_fingerprint)
    assert ok.returncode == 0, ok.stderr
    saved = (Path(client["EIDETIC_CLIENT_HOME"]) / "known_hosts").read_text()
    assert saved == sshd.known_hosts_line()
    again = send_cli(client, tmp_path / "src", url, *key)      # no flag needed any more
    assert again.returncode == 0, again.stderr
    assert len(entries(layout.inbox)) == 2


def test_a_changed_host_key_is_refused_loudly_even_with_the_accept_flag(tmp_path, layout, client, sshd):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    other = tmp_path / "other_host_key"
    keygen(other)
    cdir = Path(client["EIDETIC_CLIENT_HOME"])
    cdir.mkdir()
    (cdir / "known_hosts").write_text(sshd.known_hosts_line(Path(f"{other}.pub").read_text()))
    res = send_cli(client, tmp_path / "src", sshd.url(layout.inbox), "--identity", str(sshd.user_key),
                   "--accept-host-key", sshd.host_fingerprint)
    assert res.returncode == 3
    line = one_line_error(res)
    assert "CHANGED" in line and sshd.host_fingerprint in line
    assert entries(layout.inbox) == []


def test_a_wrong_key_fails_authentication_with_a_clear_message(tmp_path, layout, client, sshd):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    stranger = tmp_path / "stranger"
    keygen(stranger)
    res = send_cli(client, tmp_path / "src", sshd.url(layout.inbox), "--identity", str(stranger),
                   "--accept-host-key", sshd.host_fingerprint)
    assert res.returncode == 3
    assert "authentication failed for root@127.0.0.1" in one_line_error(res)


def test_a_missing_inbox_is_reported_as_such(tmp_path, layout, client, dest):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    url = dest.url + "/no-such-inbox"
    res = send_cli(client, tmp_path / "src", url, *dest.args())
    assert res.returncode == 3
    assert "does not exist" in one_line_error(res)


# ---------------------------------------------------------- kill and resume

def test_upload_killed_midway_leaves_only_a_dot_entry_and_the_same_command_resumes(
        tmp_path, layout, client, dest):
    files = {f"a/f{i:03d}.txt": f"file {i}\n".encode() * 50 for i in range(40)}
    files["big.bin"] = os.urandom(1 << 20) * 48         # 48 MiB: sent last, killed while sending it
    expected = make_source(tmp_path / "src", files)
    argv = eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to", dest.url,
                             "--location", "labA", *dest.args()]
    proc = start_and_wait_for(argv, client, layout.inbox, "big.bin")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = entries(layout.inbox)
    assert len(names) == 1 and names[0].startswith("."), names
    assert (layout.inbox / names[0] / "big.bin").stat().st_size < len(files["big.bin"])
    assert layout.ingest() == []            # the daemon leaves a dot-entry alone
    first = (layout.inbox / names[0] / "a" / "f000.txt").stat()

    res = run_argv(argv, client)
    assert res.returncode == 0, res.stderr
    assert f"resuming interrupted upload {names[0]} (40 of 41 files already sent)" in res.stdout
    entry = only_entry(layout.inbox)
    assert entry.name == names[0][1:]       # the same entry, renamed
    again = (entry / "a" / "f000.txt").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)     # not sent twice
    check_description(entry, expected)
    [r] = layout.ingest()
    assert r.outcome == "ingested", r.reason
    assert plain_files(layout.tree("s1")) == expected
    assert len(layout.manifests("s1")) == 1


def start_and_wait_for(argv: list[str], client: dict, inbox: Path, name: str) -> subprocess.Popen:
    """Start a send and return once *name* is partly written into its dot-entry."""
    proc = subprocess.Popen(argv, env=client, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, "the send finished before it could be interrupted"
            assert time.monotonic() < deadline
            dots = [n for n in os.listdir(inbox) if n.startswith(".")]
            p = inbox / dots[0] / name if dots else None
            if p is not None and p.exists() and p.stat().st_size > (1 << 20):
                return proc
            time.sleep(0.002)
    except BaseException:
        proc.kill()
        proc.wait()
        raise


def big_source(root: Path) -> dict[bytes, bytes]:
    files = {f"a/f{i:03d}.txt": f"file {i}\n".encode() * 50 for i in range(10)}
    files["big.bin"] = os.urandom(1 << 20) * 48
    return make_source(root, files)


def test_ctrl_c_stops_the_send_with_status_130_and_the_next_run_resumes(tmp_path, layout, client):
    expected = big_source(tmp_path / "src")
    argv = eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to", str(layout.inbox),
                             "--location", "labA"]
    proc = start_and_wait_for(argv, client, layout.inbox, "big.bin")
    # Frozen first, so that a loaded machine cannot let the send finish
    # between the size seen above and the Ctrl-C (it then rightly exits 0).
    proc.send_signal(signal.SIGSTOP)
    dots = [n for n in os.listdir(layout.inbox) if n.startswith(".")]
    assert dots and (layout.inbox / dots[0] / "big.bin").stat().st_size < len(expected[b"big.bin"])
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "run the same command again to resume" in err
    assert all(n.startswith(".") for n in entries(layout.inbox))
    res = run_argv(argv, client)
    assert res.returncode == 0 and "resuming interrupted upload" in res.stdout, res.stderr
    check_description(only_entry(layout.inbox), expected)


def _children(pid: int) -> list[int]:
    """The processes whose parent is *pid* (this kernel has no /proc/PID/task/*/children)."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat_line = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            if int(stat_line.rpartition(")")[2].split()[1]) == pid:
                out.append(int(d))
    return out


def test_a_dropped_connection_fails_clearly_and_the_next_run_resumes(tmp_path, layout, client):
    need_sshd()
    server = SSHServer(tmp_path / "sshd").start()
    try:
        expected = big_source(tmp_path / "src")
        argv = eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to", server.url(layout.inbox),
                                 "--location", "labA", "--identity", str(server.user_key),
                                 "--accept-host-key", server.host_fingerprint]
        proc = start_and_wait_for(argv, client, layout.inbox, "big.bin")
        assert server.proc is not None
        for pid in _children(server.proc.pid):      # the session's sshd: the line goes dead
            os.kill(pid, signal.SIGKILL)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, err
        assert "connection" in one_line_error(subprocess.CompletedProcess(argv, 3, "", err))
        assert all(n.startswith(".") for n in entries(layout.inbox))
        res = run_argv(argv, client)
        assert res.returncode == 0 and "resuming interrupted upload" in res.stdout, res.stderr
        check_description(only_entry(layout.inbox), expected)
    finally:
        server.stop()


def test_an_interrupted_upload_whose_dot_entry_is_gone_starts_afresh(tmp_path, layout, client):
    """The state of an interrupted upload is the client's own: here an upload
    whose remote dot-entry an admin removed (made by failing on a file that
    keeps changing, which leaves the entry hidden)."""
    src = tmp_path / "src"
    make_source(src, {"a.txt": b"a"})
    cdir = client["EIDETIC_CLIENT_HOME"]
    stop = _keep_appending(src / "growing.log")
    try:
        with pytest.raises(SendError, match="growing.log.*kept changing"):
            send(SendOptions(str(src), "s1", str(layout.inbox), location="labA", client_home=cdir))
    finally:
        stop()
    [dot] = entries(layout.inbox)
    assert dot.startswith(".s1-labA-")
    os.rename(layout.inbox / dot, tmp_path / "removed-by-admin")
    notices: list[str] = []
    res = send(SendOptions(str(src), "s1", str(layout.inbox), location="labA", client_home=cdir),
               SendHooks(notice=notices.append))
    assert any(f"the earlier interrupted upload {dot} is gone" in n and "starting afresh" in n
               for n in notices), notices
    assert res.entry is not None and res.entry != dot[1:]
    assert entries(layout.inbox) == [res.entry]


def _keep_appending(path: Path):
    """A file another program keeps writing to; returns a function to stop it."""
    path.write_bytes(os.urandom(1 << 20) * 24)
    done = threading.Event()

    def run():
        with open(path, "ab") as f:
            while not done.is_set():
                f.write(b"x" * 4096)
                f.flush()
                time.sleep(0.0005)

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def stop():
        done.set()
        t.join()
    return stop


# ------------------------------------------------------------ changed-only

def test_changed_only_sends_only_what_changed_since_the_last_send(tmp_path, layout, client, dest):
    src = tmp_path / "src"
    make_source(src)
    first = send_cli(client, src, dest.url, "--location", "labA", *dest.args())
    assert first.returncode == 0, first.stderr
    [r1] = layout.ingest()
    assert r1.outcome == "ingested"

    same = send_cli(client, src, dest.url, "--location", "labA", "--changed-only", *dest.args())
    assert same.returncode == 0, same.stderr
    assert "nothing changed" in same.stdout
    assert visible(layout.inbox) == [] and layout.ingest() == []

    (src / "eprime" / "s01.txt").write_bytes(b"trial,rt\n1,512\n2,600\n")
    second = send_cli(client, src, dest.url, "--location", "labA", "--changed-only", *dest.args())
    assert second.returncode == 0, second.stderr
    assert "sent 1 file " in second.stdout and f"{len(SMALL_FILES) - 1} unchanged files left out" in second.stdout
    entry = only_entry_not_taken(layout.inbox)
    got = entry_files(entry)
    got.pop(DESCRIPTION_NAME)
    assert got == {b"eprime/s01.txt": b"trial,rt\n1,512\n2,600\n"}
    check_description(entry, got)           # lists only the files of this upload


def visible(inbox: Path) -> list[str]:
    return [n for n in entries(inbox) if not n.startswith(".")]


def only_entry_not_taken(inbox: Path) -> Path:
    names = visible(inbox)
    assert len(names) == 1 and ENTRY_RE.match(names[0]), names
    return inbox / names[0]


# ------------------------------------------------------------------ dry run

def test_dry_run_sends_nothing_and_says_what_it_would_send(tmp_path, layout, client, dest):
    expected = make_source(tmp_path / "src")
    # Over SFTP a dry run does not even connect: no host key is needed.
    res = send_cli(client, tmp_path / "src", dest.url, "--location", "labA", "--dry-run")
    assert res.returncode == 0, res.stderr
    total = sum(len(v) for v in expected.values())
    assert f"would send {len(expected)} files" in res.stdout
    assert entries(layout.inbox) == []
    verbose = subprocess.run(eidetic_argv() + ["-v", "send", str(tmp_path / "src"), "--study", "s1", "--to",
                                               dest.url, "--dry-run"], capture_output=True, text=True,
                             env=client, stdin=subprocess.DEVNULL, timeout=60)
    assert verbose.returncode == 0, verbose.stderr
    assert "would send: Müller/Überblick.csv" in verbose.stdout
    assert "skipped symbolic link: link-to-z" in verbose.stdout
    assert entries(layout.inbox) == [] and total > 0


# ------------------------------------------------------- library behaviours

def test_progress_reports_increasing_bytes_up_to_the_total(tmp_path, layout, client):
    expected = make_source(tmp_path / "src", {"a.bin": os.urandom(3 << 20), "b/c.bin": os.urandom(5000)})
    seen = []
    res = send(SendOptions(str(tmp_path / "src"), "s1", str(layout.inbox), location="labA",
                           client_home=client["EIDETIC_CLIENT_HOME"]), SendHooks(progress=seen.append))
    sending = [p for p in seen if p.phase == "sending"]
    assert len(sending) >= 4
    done = [p.bytes_done for p in sending]
    assert done == sorted(done) and done[-1] == sum(len(v) for v in expected.values())
    assert sending[-1].files_done == sending[-1].files_total == 2
    assert res.files == 2 and res.symlinks == 1


def test_a_file_that_keeps_changing_fails_the_send_and_leaves_the_entry_hidden(tmp_path, layout, client):
    src = tmp_path / "src"
    make_source(src, {"a.txt": b"a"})
    stop = _keep_appending(src / "growing.log")
    try:
        with pytest.raises(SendError) as e:
            send(SendOptions(str(src), "s1", str(layout.inbox), location="labA",
                             client_home=client["EIDETIC_CLIENT_HOME"]))
    finally:
        stop()
    assert "growing.log" in e.value.message and "run the same command again" in e.value.message
    assert all(n.startswith(".") for n in entries(layout.inbox))


def test_an_unreadable_file_fails_the_send_naming_it_and_a_fixed_rerun_resumes(tmp_path, layout, client):
    import shutil
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (to drop the capability that lets root read anything)")
    src = tmp_path / "src"
    expected = make_source(src, {"a.txt": b"a", "secret.txt": b"s", "z/ok.txt": b"ok"})
    (src / "secret.txt").chmod(0)
    argv = eidetic_argv() + ["send", str(src), "--study", "s1", "--to", str(layout.inbox), "--location", "labA"]
    res = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", *argv], env=client,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 1
    line = one_line_error(res)
    assert "secret.txt (Permission denied)" in line and "run the same command again" in line
    [dot] = entries(layout.inbox)
    assert dot.startswith(".")
    (src / "secret.txt").chmod(0o644)
    again = run_argv(argv, client, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "(2 of 3 files already sent)" in again.stdout
    check_description(only_entry(layout.inbox), expected)


def test_a_source_holding_the_reserved_description_name_is_refused(tmp_path, layout, client):
    make_source(tmp_path / "src", {"a.txt": b"a", DESCRIPTION_NAME.decode(): b"{}"})
    res = send_cli(client, tmp_path / "src", str(layout.inbox))
    assert res.returncode == 2
    assert DESCRIPTION_NAME.decode() in one_line_error(res)
    assert entries(layout.inbox) == []


def test_location_comes_from_the_client_settings_and_is_sanitized(tmp_path, layout, client):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    cdir = Path(client["EIDETIC_CLIENT_HOME"])
    cdir.mkdir()
    (cdir / "eidetic-client.yaml").write_text("location: lab-B 2\n")
    res = send_cli(client, tmp_path / "src", str(layout.inbox))
    assert res.returncode == 0, res.stderr
    assert "using 'lab_B_2'" in res.stdout
    entry = only_entry(layout.inbox)
    assert entry.name.startswith("s1-lab_B_2-")
    check_description(entry, {b"a.txt": b"a"}, location="lab_B_2")


# ------------------------------------------------- verified at ingest (with provenance)

def test_an_sftp_upload_is_verified_at_ingest_and_log_shows_where_it_came_from(tmp_path, layout, client, sshd):
    import json
    import socket

    make_source(tmp_path / "src")
    res = send_cli(client, tmp_path / "src", sshd.url(layout.inbox), "--location", "labA",
                   "--identity", str(sshd.user_key), "--accept-host-key", sshd.host_fingerprint)
    assert res.returncode == 0, res.stderr
    [r] = layout.ingest()
    assert r.outcome == "ingested" and r.verified, r.reason
    assert DESCRIPTION_NAME not in plain_files(layout.tree("s1"))      # stored, but not a path of the upload
    log = layout.cli("log", "--json", "s1:eprime/s01.txt")
    assert log.returncode == 0, log.stderr
    [entry] = json.loads(log.stdout)
    prov = entry["provenance"]
    assert prov["verified"] is True
    assert (prov["location"], prov["user"], prov["host"]) == ("labA", "root", socket.gethostname())
    assert prov["client"].startswith("eidetic ") and prov["folder"] == str(tmp_path / "src")
    text = layout.cli("log", "-w", "s1:eprime/s01.txt")     # -w: the whole provenance
    assert f"from labA by root@{socket.gethostname()} (eidetic " in text.stdout


def test_a_file_changed_in_the_inbox_after_the_send_fails_verification(tmp_path, layout, client, sshd):
    make_source(tmp_path / "src")
    res = send_cli(client, tmp_path / "src", sshd.url(layout.inbox), "--location", "labA",
                   "--identity", str(sshd.user_key), "--accept-host-key", sshd.host_fingerprint)
    assert res.returncode == 0, res.stderr
    entry = only_entry(layout.inbox)
    (entry / "eprime" / "s01.txt").write_bytes(b"trial,rt\n1,999\n")      # same size, other bytes
    [r] = layout.ingest()
    assert r.outcome == "failed"
    assert "does not match its upload description" in r.reason and "eprime/s01.txt" in r.reason
    assert layout.manifests("s1") == []


# ------------------------------------------------------------- on a terminal

def run_on_terminal(argv: list[str], env: dict, answers: dict[bytes, bytes] | None = None,
                    timeout: float = 60) -> tuple[int, bytes]:
    """Run *argv* on a real pseudo-terminal (100 columns); when the output
    shows a key of *answers*, type its value.  Returns (exit status, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:            # the child: exec at once
        try:
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    out = b""
    pending = dict(answers or {})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    break
                if not data:
                    break
                out += data
                for k in [k for k in pending if k in out]:
                    os.write(fd, pending.pop(k))
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_a_terminal_gets_a_progress_bar_and_the_summary(tmp_path, layout, client):
    make_source(tmp_path / "src", {"big.bin": os.urandom(1 << 20) * 64, "small.txt": b"s"})
    code, out = run_on_terminal(eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to",
                                                  str(layout.inbox), "--location", "labA"], client)
    assert code == 0, out
    text = out.decode("utf-8", "replace")
    assert re.search(r"\d+%\|.*\| [\d.]+M?/64\.0M \[", text), text      # bytes done / total
    assert "/2 files" in text and "B/s" in text
    assert "sent 2 files (64.0 MiB)" in text
    only_entry(layout.inbox)


def test_on_a_terminal_the_first_contact_asks_and_a_yes_saves_the_key(tmp_path, layout, client, sshd):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    argv = eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to", sshd.url(layout.inbox),
                             "--identity", str(sshd.user_key)]
    code, out = run_on_terminal(argv, client, {b"continue connecting? [y/N]": b"n\n"})
    text = out.decode("utf-8", "replace")
    assert code == 3 and f"ED25519 key fingerprint is {sshd.host_fingerprint}." in text, text
    assert entries(layout.inbox) == []
    code, out = run_on_terminal(argv, client, {b"continue connecting? [y/N]": b"y\n"})
    assert code == 0, out
    assert (Path(client["EIDETIC_CLIENT_HOME"]) / "known_hosts").read_text() == sshd.known_hosts_line()
    only_entry(layout.inbox)


@pytest.mark.parametrize("case", ["study name", "no source", "bad address", "bad settings"])
def test_usage_errors_exit_2_with_one_line(tmp_path, layout, client, case):
    make_source(tmp_path / "src", {"a.txt": b"a"})
    source, study, to = tmp_path / "src", "s1", str(layout.inbox)
    if case == "study name":
        study, expect = "s-1", "--study 's-1'"
    elif case == "no source":
        source, expect = tmp_path / "nope", "no such file or folder"
    elif case == "bad address":
        to, expect = "ftp://example.org/inbox", "only sftp://"
    else:
        cdir = Path(client["EIDETIC_CLIENT_HOME"])
        cdir.mkdir()
        (cdir / "eidetic-client.yaml").write_text("locaton: labA\n")
        expect = "unknown key 'locaton'"
    argv = eidetic_argv() + ["send", str(source), "--study", study, "--to", to]
    res = run_argv(argv, client, timeout=60)
    assert res.returncode == 2
    assert expect in one_line_error(res)
    assert entries(layout.inbox) == []


# ------------------------------------------------- the server refuses a file

@pytest.fixture
def tiny_inbox(tmp_path):
    """An inbox on a 1 MiB tmpfs: the server's writes fail with 'no space'."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    inbox = tmp_path / "tiny-inbox"
    inbox.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(inbox)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield inbox
    finally:
        subprocess.run(["umount", "-l", str(inbox)], check=False)


def test_a_file_the_server_cannot_store_fails_the_send_naming_it_before_the_rename_and_a_rerun_resumes(
        tmp_path, layout, client, sshd, tiny_inbox):
    """Pipelined replies (the send does not wait for each file's write, fsync
    and close) are still all checked before the rename."""
    files = {f"d/f{i:02d}.bin": os.urandom(256 << 10) for i in range(8)}     # 2 MiB into 1 MiB
    expected = make_source(tmp_path / "src", files)
    argv = [tmp_path / "src", sshd.url(tiny_inbox), "--location", "labA", "--identity", str(sshd.user_key),
            "--accept-host-key", sshd.host_fingerprint]
    res = send_cli(client, *argv)
    assert res.returncode != 0
    err = one_line_error(res)
    assert re.search(r"server refused (writing|finishing a file) .*/d/f0[0-7]\.bin\).*disk full", err), err
    [dot] = entries(tiny_inbox)
    assert dot.startswith(".s1-labA-")                  # not renamed: the daemon never sees it

    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_inbox)], check=True)
    res = send_cli(client, *argv)
    assert res.returncode == 0, res.stderr
    done = int(re.search(r"resuming interrupted upload \S+ \((\d+) of 8 files already sent\)", res.stdout)[1])
    assert 1 <= done < 8
    entry = only_entry(tiny_inbox)
    assert entry.name == dot[1:]
    assert entry_files(entry) == {**expected, DESCRIPTION_NAME: (entry / os.fsdecode(DESCRIPTION_NAME)).read_bytes()}
    check_description(entry, expected)


def test_a_client_folder_that_is_a_file_is_one_line_and_pointing_it_at_a_folder_works(tmp_path, layout, client):
    make_source(tmp_path / "src")
    (tmp_path / "not-a-folder").write_text("x")
    argv = eidetic_argv() + ["send", str(tmp_path / "src"), "--study", "s1", "--to", str(layout.inbox),
                             "--location", "labA"]
    res = run_argv(argv, dict(client, EIDETIC_CLIENT_HOME=str(tmp_path / "not-a-folder")))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr == (f"eidetic: the uploader's own folder {tmp_path / 'not-a-folder'} is a file, not a "
                          "folder: set EIDETIC_CLIENT_HOME to a folder\n")
    res = run_argv(argv, dict(client, EIDETIC_CLIENT_HOME=str(tmp_path / "a-folder")))      # as it says
    assert res.returncode == 0, res.stderr
