"""Study members read history: a member of a study's ``group`` runs ``log``,
``checkout`` and ``status`` on that study, read-only, and changes nothing;
anyone else gets one line naming the group (exit 3).

Real uids and groups throughout (root reads everything, so only real
processes prove it): the service user is the throwaway DAEMON_UID, the
study groups are real groups made for the test (their names are in the
messages), the member and the outsider are throwaway uids run with setpriv.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import stat
import subprocess
import textwrap
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import DAEMON_UID, Layout, chown_tree, clean_env, drop, make_layout, run_cli

import eidetic.server.config

MEMBER_UID = 61005
OUTSIDER_UID = 61006


def _run_as(uid: int, groups: list[int], argv: list[str], **kw) -> subprocess.CompletedProcess:
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    kw.setdefault("env", clean_env(HOME="/nonexistent", PATH="/usr/bin:/bin"))
    grouping = [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", *grouping, *argv], **kw)


@dataclass
class Site:
    base: Path
    lay: Layout
    venv: Path
    groups: dict[str, tuple[str, int]]      # study -> (group name, gid)

    @property
    def eidetic(self) -> str:
        return str(self.venv / "bin" / "eidetic")

    def argv(self, *args) -> list[str]:
        return [self.eidetic, "--config", str(self.lay.config_path), *args]

    def as_root(self, *args) -> subprocess.CompletedProcess:
        return run_cli(*args, config=self.lay.config_path, argv0=[self.eidetic], cwd=self.base)

    def as_service(self, *args) -> subprocess.CompletedProcess:
        return _run_as(DAEMON_UID, [], self.argv(*args), cwd=self.base)

    def as_member(self, *args, **kw) -> subprocess.CompletedProcess:
        """A member of s1's group only."""
        return _run_as(MEMBER_UID, [self.groups["s1"][1]], self.argv(*args), cwd=self.base, **kw)

    def as_outsider(self, *args) -> subprocess.CompletedProcess:
        return _run_as(OUTSIDER_UID, [], self.argv(*args), cwd=self.base)

    def send(self, study: str, name: str, files: dict[str, bytes]) -> None:
        drop(self.lay.inbox, name, files)
        res = self.as_service("ingest", "--once", "--settle", "0")
        assert res.returncode == 0, res.stderr


def _groupadd() -> tuple[str, int]:
    if shutil.which("groupadd") is None:
        pytest.skip("groupadd is not installed")
    name = f"eidm{secrets.token_hex(3)}"
    subprocess.run(["groupadd", name], check=True, capture_output=True)
    return name, grp.getgrnam(name).gr_gid


@pytest.fixture
def site(world_tmp, nonroot_venv):
    groups = {"s1": _groupadd(), "s2": _groupadd()}
    try:
        srv = world_tmp / "srv"
        srv.mkdir(mode=0o755)
        lay = make_layout(srv, studies=("s1", "s2"), init=False)
        doc = json.loads(lay.config_path.read_text())
        doc.update(user=DAEMON_UID, group=DAEMON_UID)
        for study, (gname, _gid) in groups.items():
            doc["studies"][study]["group"] = gname
        lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
        os.chmod(lay.config_path, 0o644)
        lay = Layout(lay.root, lay.config_path, eidetic.server.config.load(str(lay.config_path)))
        s = Site(world_tmp, lay, nonroot_venv, groups)
        res = s.as_root("init")
        assert res.returncode == 0, res.stderr
        s.send("s1", "s1-labA-1", {"d/a.txt": b"first\n", "d/b.txt": b"bee\n"})
        s.send("s1", "s1-labA-2", {"d/a.txt": b"second\n"})
        s.send("s2", "s2-labB-1", {"x.txt": b"other study\n"})
        yield s
    finally:
        for gname, _gid in groups.values():
            subprocess.run(["groupdel", gname], capture_output=True)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every path below *root* with what a write would change."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[p] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid, st.st_gid)
    return out


def test_a_member_reads_the_history_of_a_file_and_a_folder_of_their_study(site):
    res = site.as_member("log", "s1:d/a.txt", "--json")
    assert res.returncode == 0, res.stderr
    assert [e["version"] for e in json.loads(res.stdout)] == [2, 1]
    res = site.as_member("log", "s1:d")
    assert res.returncode == 0, res.stderr
    assert "d/a.txt" in res.stdout and "d/b.txt" in res.stdout and "Traceback" not in res.stderr
    # By its path in the tree, as a member browsing it would type it.
    res = site.as_member("log", str(site.lay.tree("s1") / "d" / "b.txt"))
    assert res.returncode == 0, res.stderr


def test_a_member_checks_out_an_old_version_to_a_place_they_may_write(site):
    home = site.base / "member-home"
    home.mkdir()
    os.chown(home, MEMBER_UID, MEMBER_UID)
    res = site.as_member("checkout", "s1:d/a.txt", "--version", "1", "-o", str(home / "a-v1.txt"))
    assert res.returncode == 0, res.stderr
    assert (home / "a-v1.txt").read_bytes() == b"first\n"
    assert os.lstat(home / "a-v1.txt").st_uid == MEMBER_UID
    res = site.as_member("checkout", "s1:d", "-o", str(home / "d"))
    assert res.returncode == 0, res.stderr
    assert (home / "d" / "a.txt").read_bytes() == b"second\n"


def test_what_a_member_runs_changes_nothing_in_the_store_or_the_tree(site):
    before = _snapshot(site.lay.store("s1")) | _snapshot(site.lay.tree("s1"))
    for args in (("log", "s1:d/a.txt"), ("log", "s1:d", "--json"), ("status", "--study", "s1"),
                 ("checkout", "s1:d/a.txt", "-o", "/dev/null/x")):
        assert "Traceback" not in site.as_member(*args).stderr
    assert _snapshot(site.lay.store("s1")) | _snapshot(site.lay.tree("s1")) == before


_TRY_WRITES = textwrap.dedent("""
    import fcntl, json, os, sys
    store = sys.argv[1]
    obj_dir = os.path.join(store, "objects", sorted(os.listdir(os.path.join(store, "objects")))[0])
    attempts = {
        "create in store": lambda: open(os.path.join(store, "planted"), "x").close(),
        "create in objects": lambda: open(os.path.join(obj_dir, "planted"), "x").close(),
        "create a manifest": lambda: open(os.path.join(store, "manifests", "0000000099.jsonl"), "x").close(),
        "write the index": lambda: open(os.path.join(store, "index", "data.mdb"), "r+b").close(),
        "write the index lock": lambda: open(os.path.join(store, "index", "lock.mdb"), "r+b").close(),
        "open the store lock": lambda: os.open(os.path.join(store, "lock"), os.O_RDONLY),
        "list tmp": lambda: os.listdir(os.path.join(store, "tmp")),
        "rewrite HEAD": lambda: open(os.path.join(store, "HEAD"), "r+b").close(),
        "remove an object": lambda: os.unlink(os.path.join(obj_dir, os.listdir(obj_dir)[0])),
    }
    succeeded = []
    for what, act in attempts.items():
        try:
            act()
            succeeded.append(what)
        except OSError:
            pass
    print(json.dumps(succeeded))
""")


def test_a_member_can_write_nothing_in_the_store_nor_hold_its_lock(site):
    res = _run_as(MEMBER_UID, [site.groups["s1"][1]], ["/usr/bin/python3", "-c", _TRY_WRITES,
                                                       str(site.lay.store("s1"))])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []


@pytest.mark.parametrize("who", ["member of another study", "outsider"])
def test_someone_outside_the_group_is_told_which_group_may_read_the_study(site, who):
    if who == "outsider":
        res, study, path = site.as_outsider("log", "s1:d/a.txt"), "s1", "s1:d/a.txt"
    else:
        res, study, path = site.as_member("log", "s2:x.txt"), "s2", "s2:x.txt"
    gname = site.groups[study][0]
    assert res.returncode == 3
    assert res.stderr == f"eidetic: you are not in group {gname}, which may read study {study}\n"
    # The same line for a checkout, and for the path in the tree.
    run = site.as_outsider if who == "outsider" else site.as_member
    res = run("checkout", path, "-o", "/tmp/never")
    assert (res.returncode, res.stderr) == (3, f"eidetic: you are not in group {gname}, which may read study "
                                               f"{study}\n")
    res = run("log", str(site.lay.tree(study)))
    assert (res.returncode, res.stderr) == (3, f"eidetic: you are not in group {gname}, which may read study "
                                               f"{study}\n")


def test_the_hint_to_add_the_user_to_the_group_works(site):
    """Adding the outsider to the group (as the line implies) is all it takes."""
    res = site.as_outsider("log", "s1:d/a.txt")
    assert "you are not in group" in res.stderr
    res = _run_as(OUTSIDER_UID, [site.groups["s1"][1]], site.argv("log", "s1:d/a.txt"), cwd=site.base)
    assert res.returncode == 0, res.stderr


def test_a_store_made_before_members_could_read_is_fixed_by_the_init_the_member_is_told_of(site):
    store = site.lay.store("s1")
    for p in (store, store / "objects", store / "manifests", store / "index"):
        os.chmod(p, 0o700)                 # as eidetic made stores before
    os.chmod(store / "index" / "data.mdb", 0o600)
    res = site.as_member("log", "s1:d/a.txt")
    assert res.returncode == 3
    assert "although you may read study s1" in res.stderr and "'eidetic init --check'" in res.stderr
    check = site.as_root("init", "--check")
    assert check.returncode == 1 and "mode-inside" not in check.stdout      # said in words, not a code
    assert "another mode than the design's" in check.stdout, check.stdout
    assert site.as_root("init").returncode == 0
    assert site.as_root("init", "--check").returncode == 0
    res = site.as_member("log", "s1:d/a.txt")
    assert res.returncode == 0, res.stderr


def test_what_the_daemon_writes_later_stays_readable_by_the_members(site):
    """Directories ingest and fsck --repair make inherit the study group (setgid)."""
    site.send("s1", "s1-labA-3", {f"new/f{i}.txt": f"{i}\n".encode() for i in range(40)})
    res = site.as_service("fsck", "--repair", "--study", "s1")     # rebuilds nothing, but may
    assert res.returncode == 0, res.stdout + res.stderr
    shutil.rmtree(site.lay.store("s1") / "index")                  # now it must rebuild the index
    res = site.as_service("fsck", "--repair", "--study", "s1")
    assert res.returncode == 0, res.stdout + res.stderr
    res = site.as_member("log", "s1:new/f7.txt", "--json")
    assert res.returncode == 0, res.stderr
    assert site.as_root("init", "--check").returncode == 0


def test_a_member_reads_whole_uploads_while_the_daemon_commits_beside_it(site):
    """Lockless reads (the member may not write LMDB's lock file) are checked
    against the writer's commits and retried: every answer is a whole state."""
    stop = threading.Event()
    answers: list[list[int]] = []
    errors: list[str] = []

    def read():
        while not stop.is_set():
            res = site.as_member("log", "s1:hot.txt", "--json")
            if res.returncode == 0:
                answers.append([e["version"] for e in json.loads(res.stdout)])
            elif "no history" not in res.stderr:
                errors.append(res.stderr)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(8):
            site.send("s1", f"s1-labA-hot{i}", {"hot.txt": f"{i}\n".encode()})
    finally:
        stop.set()
        reader.join()
    assert errors == []
    for versions in answers:
        assert versions == list(range(len(versions), 0, -1))     # whole: n, n-1, ..., 1
    res = site.as_member("log", "s1:hot.txt", "--json")
    assert [e["version"] for e in json.loads(res.stdout)] == list(range(8, 0, -1))


def test_a_member_cannot_run_fsck_and_is_told_who_can(site):
    res = site.as_member("fsck", "--study", "s1")
    assert res.returncode == 3 and res.stdout == ""
    assert f"run it as {DAEMON_UID} or root" in res.stderr and "E0" not in res.stderr
    hint = res.stderr.split("e.g. '", 1)[1].rsplit("'", 1)[0]
    assert hint.startswith(f"sudo -u {DAEMON_UID} eidetic --config ")
    # Following it (as root through sudo's equivalent here): the check runs and is clean.
    argv = hint.split()[3:]          # drop "sudo -u USER"
    res = _run_as(DAEMON_UID, [], [site.eidetic, *argv[1:]], cwd=site.base)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_member_sees_their_studys_status_and_what_they_could_not_see(site):
    res = site.as_member("status", "--study", "s1", "--json")
    assert res.returncode == 3, res.stderr
    doc = json.loads(res.stdout)["studies"]["s1"]
    assert doc["uploads"] == 2 and doc["versions"] == 3
    assert doc["daemon"]["running"] is None            # unknown, not "no daemon"
    assert any("run as the service user" in u for u in doc["unseen"]), doc
    text = site.as_member("status", "--study", "s1")
    assert text.returncode == 3
    assert "no daemon running" not in text.stdout and "daemon unknown" in text.stdout
    assert f"cannot see {site.lay.state}" in text.stdout
