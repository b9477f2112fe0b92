"""Who owns what a command writes: root-run ingest and fsck go on as the
configured service user, so nothing they write is root-owned; purge stays
root; ``init --check`` finds whatever inside a store, tree or the state
directory is not the service user's and names the chown that fixes it.

Real uids throughout (root reads and writes everything, so only real
processes prove it): the tests run as root and the service user is the
throwaway DAEMON_UID.  The commands run from ``nonroot_venv``, an install
the service user can read, as it must be in a real deployment.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    DAEMON_UID,
    UPLOADER_UID,
    Layout,
    check_store,
    chown_tree,
    clean_env,
    drop,
    eidetic_argv,
    make_layout,
    one_line_error,
    plain_files,
    run_as,
    run_cli,
)
from daemon_helpers import DaemonProc

import eidetic.server.config
from eidetic.server import deploy

STUDY_GID = 61003           # throwaway gid: no /etc/group entry is needed


@dataclass
class Deployment:
    base: Path
    lay: Layout
    venv: Path

    @property
    def eidetic(self) -> str:
        return str(self.venv / "bin" / "eidetic")

    def as_root(self, *args) -> subprocess.CompletedProcess:
        """Like an admin typing 'sudo eidetic ...'."""
        return run_cli(*args, config=self.lay.config_path, argv0=[self.eidetic], cwd=self.base)

    def as_service(self, *args) -> subprocess.CompletedProcess:
        return run_as(DAEMON_UID, [self.eidetic, "--config", str(self.lay.config_path), *args], cwd=self.base)

    def upload(self, name: str, files: dict[str, bytes]) -> Path:
        """An entry that belongs to an uploader, readable by others (umask 022)."""
        # Given to the uploader before the final rename: a running daemon may take it at once.
        return Path(os.fsdecode(drop(self.lay.inbox, name, files,
                                     prepare=lambda part: chown_tree(os.fsdecode(part), UPLOADER_UID))))

    def check_json(self) -> list[dict]:
        res = self.as_root("init", "--check", "--json")
        assert "Traceback" not in res.stderr, res.stderr
        return json.loads(res.stdout)


@pytest.fixture
def deployment(world_tmp, nonroot_venv) -> Deployment:
    srv = world_tmp / "srv"
    srv.mkdir(mode=0o755)
    lay = make_layout(srv, studies=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc.update(user=DAEMON_UID, group=DAEMON_UID)
    doc["studies"]["s1"]["group"] = STUDY_GID
    lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    os.chmod(lay.config_path, 0o644)
    lay = Layout(lay.root, lay.config_path, eidetic.server.config.load(str(lay.config_path)))
    d = Deployment(world_tmp, lay, nonroot_venv)
    res = d.as_root("init")
    assert res.returncode == 0, res.stderr
    return d


def not_the_services(lay: Layout) -> list[str]:
    """Every path inside the store, tree and state whose owner is not the
    service user, or that is a directory without the service group (the study
    group in the store and the tree)."""
    out = []
    for root, gid in ((lay.store(), STUDY_GID), (lay.tree(), STUDY_GID), (lay.state, DAEMON_UID)):
        for dirpath, dirs, files in os.walk(root):
            for n in dirs + files:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                if st.st_uid != DAEMON_UID or (stat.S_ISDIR(st.st_mode) and st.st_gid != gid):
                    out.append(f"{p} ({st.st_uid}:{st.st_gid})")
    return out


def owner_inside(findings: list[dict]) -> dict[str, dict]:
    return {f["path"]: f for f in findings if f["code"] == "owner-inside"}


def test_root_run_init_leaves_everything_inside_store_tree_and_state_owned_as_designed(deployment):
    d, lay = deployment, deployment.lay
    for p in (lay.store() / "index" / "data.mdb", lay.store() / "lock", lay.state / "done"):
        assert p.exists(), p
    assert not_the_services(lay) == []
    # Run again on a store whose index was lost: init creates it anew, as the service user's.
    for n in os.listdir(lay.store() / "index"):
        os.unlink(lay.store() / "index" / n)
    assert d.as_root("init").returncode == 0
    assert (lay.store() / "index" / "data.mdb").exists()
    assert not_the_services(lay) == []
    assert d.as_root("init", "--check").returncode == 0


def test_root_run_ingest_once_goes_on_as_the_service_user_and_everything_it_writes_is_theirs(deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"eprime/sub/s1.txt": b"hello", "top.txt": b"top"})
    res = d.as_root("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ingested s1-labA-1" in res.stdout
    # The entry was renamed in place in the sticky inbox, as the service user may, and is still the uploader's.
    (done,) = os.listdir(lay.inbox)
    assert done.startswith(".eidetic~done~")
    assert os.lstat(lay.inbox / done).st_uid == UPLOADER_UID
    written = [*lay.object_files(), *lay.manifests(), lay.store() / "HEAD",
               *(lay.store() / "index").iterdir(), *(lay.state / "done").iterdir(),
               lay.tree() / "top.txt", lay.tree() / "eprime" / "sub" / "s1.txt"]
    assert len(lay.object_files()) == 2 and len(lay.manifests()) == 1
    for p in written:
        assert os.lstat(p).st_uid == DAEMON_UID, p
    assert not_the_services(lay) == []
    # The unit's umask: a tree directory made by a hand-run ingest is 2750, like the daemon's.
    st = os.lstat(lay.tree() / "eprime")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2750, STUDY_GID)
    assert d.as_root("init", "--check").returncode == 0
    check_store(lay)


def test_root_run_fsck_repair_goes_on_as_the_service_user_and_what_it_rebuilds_is_theirs(deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"d/f.txt": b"one"})
    assert d.as_service("ingest", "--once", "--settle", "0").returncode == 0
    (version,) = [n for n in os.listdir(lay.tree() / "d") if n != "f.txt"]
    os.unlink(lay.tree() / "d" / version)
    for n in os.listdir(lay.store() / "index"):
        os.unlink(lay.store() / "index" / n)
    res = d.as_root("fsck", "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "repaired" in res.stdout
    assert (lay.tree() / "d" / version).exists() and (lay.store() / "index" / "data.mdb").exists()
    assert not_the_services(lay) == []
    assert d.as_root("init", "--check").returncode == 0
    check_store(lay)


def test_the_daemon_as_the_service_user_ingests_after_a_root_run_ingest_once(deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"d/f.txt": b"one", "d/g.txt": b"same"})
    assert d.as_root("ingest", "--once", "--settle", "0").returncode == 0
    daemon = DaemonProc(lay.config_path, "--settle", "0", argv0=[d.eidetic], cwd=d.base,
                        prefix=["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups"],
                        env=clean_env(HOME="/nonexistent", PATH="/usr/bin:/bin"))
    try:
        daemon.started()
        d.upload("s1-labA-2", {"d/f.txt": b"two", "d/g.txt": b"same", "d/new.txt": b"new"})
        daemon.wait_for(r"ingested s1-labA-2", timeout=30)
    finally:
        assert daemon.stop() == 0, daemon.text
    assert " error: " not in daemon.text, daemon.text
    assert len(lay.manifests()) == 2
    assert plain_files(lay.tree()) == {b"d/f.txt": b"two", b"d/g.txt": b"same", b"d/new.txt": b"new"}
    assert not_the_services(lay) == []
    check_store(lay)


def test_init_check_counts_what_inside_store_tree_and_state_is_not_the_services_and_the_advised_chown_clears_it(
        deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"d/f.txt": b"one", "d/g.txt": b"two"})
    assert d.as_service("ingest", "--once", "--settle", "0").returncode == 0
    assert d.check_json() == []
    # Planted by hand, as root: an object (the same inode as its two tree names), a manifest,
    # a directory in the tree, and a done record.
    obj = lay.object_files()[0]
    os.chown(obj, 0, 0)
    os.chown(lay.manifests()[0], 0, 0)
    (lay.tree() / "d" / "by-root").mkdir()
    (record,) = (lay.state / "done").iterdir()
    os.chown(record, 0, 0)
    links = sum(1 for dp, _, fs in os.walk(lay.tree()) for f in fs
                if os.lstat(os.path.join(dp, f)).st_ino == os.lstat(obj).st_ino)
    assert links == 2

    found = owner_inside(d.check_json())
    assert set(found) == {str(lay.store()), str(lay.tree()), str(lay.state)}
    store, tree, state = found[str(lay.store())], found[str(lay.tree())], found[str(lay.state)]
    assert (store["count"], tree["count"], state["count"]) == (2, links + 1, 1)
    assert {e["path"] for e in store["examples"]} == {str(obj), str(lay.manifests()[0])}
    # Made in the setgid tree, the directory got the study group but not the service user.
    assert {"path": str(lay.tree() / "d" / "by-root"), "owner": f"root:{STUDY_GID}"} in tree["examples"]
    assert store["fix"] == f"chown -R {DAEMON_UID}:{STUDY_GID} {lay.store()}"
    assert tree["fix"] == f"chown -R {DAEMON_UID}:{STUDY_GID} {lay.tree()}"
    assert all(f["severity"] == "error" for f in found.values())
    text = d.as_root("init", "--check")
    assert text.returncode == 1
    line = next(ln for ln in text.stdout.splitlines() if ln.startswith(f"error: {lay.tree()}: "))
    assert f"{links + 1} files and directories inside the tree are not owned by {DAEMON_UID}:{STUDY_GID}" in line
    assert f"d/by-root (root:{STUDY_GID})" in line
    assert line.endswith(f"; run 'chown -R {DAEMON_UID}:{STUDY_GID} {lay.tree()}' as root")
    assert "1 file or directory inside the state is not owned" in text.stdout

    for f in found.values():
        subprocess.run(["sh", "-c", f["fix"]], check=True)
    res = d.as_root("init", "--check")
    assert res.returncode == 0, res.stdout
    assert "all is well" in res.stdout


def test_init_check_counts_every_file_but_names_only_the_first_few(tmp_path):
    lay = make_layout(tmp_path, studies=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc.update(user=DAEMON_UID, group=DAEMON_UID)
    lay.config_path.write_text(json.dumps(doc))
    cfg = eidetic.server.config.load(str(lay.config_path))
    deploy.init(cfg)
    for i in range(40):
        (Path(cfg.study("s1").store) / "tmp" / f"left-by-root-{i}").write_bytes(b"")
    (f,) = [f for f in deploy.check(cfg) if f.code == "owner-inside"]
    assert f.path == cfg.study("s1").store and f.data["count"] == 40
    assert len(f.data["examples"]) == deploy.MAX_OWNER_EXAMPLES
    assert "40 files and directories inside the store" in f.detail


def test_init_check_by_someone_who_cannot_look_inside_says_so_and_exits_3_never_all_is_well(deployment):
    d, lay = deployment, deployment.lay
    os.chown(lay.store() / "manifests", 0, 0)          # a wrong owner only root or the service user can see
    res = run_as(UPLOADER_UID, [d.eidetic, "--config", str(lay.config_path), "init", "--check"], cwd=d.base)
    assert res.returncode == 3, res.stdout + res.stderr
    assert (f"warning: {lay.store()}: cannot see inside the store to check its owners and modes (Permission "
            f"denied): run 'eidetic init --check' as the service user ({DAEMON_UID}) or root") in res.stdout
    assert f"warning: {lay.state}: cannot see inside the state" in res.stdout
    assert "all is well" not in res.stdout
    # Done as it says, by the service user: the wrong owner is found, and what the service user
    # cannot see inside the root-owned folder is said too (still exit 3); by root, all is seen.
    res = d.as_service("init", "--check")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "e.g. manifests (root:root)" in res.stdout
    assert f"cannot see inside {lay.store() / 'manifests'} to check owners there" in res.stdout
    res = d.as_root("init", "--check")
    assert res.returncode == 1 and "e.g. manifests (root:root)" in res.stdout and "cannot see" not in res.stdout


def test_a_config_file_only_root_can_read_stops_root_run_ingest_and_fsck_with_one_line(deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"f.txt": b"x"})
    os.chmod(lay.config_path, 0o600)
    for args in (["ingest", "--once", "--settle", "0"], ["fsck", "--repair"], ["ingest"]):
        res = d.as_root(*args)
        assert res.returncode == 2, (args, res.stdout, res.stderr)
        line = one_line_error(res)
        assert line.startswith(f"eidetic: config {lay.config_path}: this file cannot be read by the service "
                               f"user {DAEMON_UID}"), line
        assert f"chgrp {DAEMON_UID} {lay.config_path}" in line
    assert os.listdir(lay.inbox) == ["s1-labA-1"] and lay.manifests() == []
    os.chmod(lay.config_path, 0o640)
    os.chown(lay.config_path, 0, DAEMON_UID)             # the advice: readable through the service group
    res = d.as_root("ingest", "--once", "--settle", "0")
    assert res.returncode == 0, res.stderr
    assert not_the_services(lay) == []


def test_an_installation_the_service_user_cannot_read_stops_root_run_ingest_with_one_line(deployment):
    d, lay = deployment, deployment.lay
    here = eidetic_argv()       # this test's own installation, which may be root's alone
    if all(run_as(DAEMON_UID, ["test", "-x", p]).returncode == 0
           for p in (sys.executable, os.path.dirname(os.__file__))):
        pytest.skip("this test's own Python installation is usable by every user")
    d.upload("s1-labA-1", {"f.txt": b"x"})
    res = run_cli("ingest", "--once", "--settle", "0", config=lay.config_path, argv0=here, cwd=d.base)
    assert res.returncode == 3
    line = one_line_error(res)
    assert f"the service user {DAEMON_UID}, which this command runs as, cannot use this Python installation" in line
    assert os.listdir(lay.inbox) == ["s1-labA-1"] and lay.manifests() == []


def test_root_run_purge_stays_root_removes_the_uploaders_entry_and_keeps_every_owner(deployment):
    d, lay = deployment, deployment.lay
    d.upload("s1-labA-1", {"d/f.txt": b"x"})
    assert d.as_service("ingest", "--once", "--settle", "0").returncode == 0
    time.sleep(0.05)
    # The service user cannot remove an uploader's entry from the sticky inbox: purge needs root.
    res = d.as_service("purge", "--older-than", "0")
    assert res.returncode == 1 and "kept" in res.stdout
    res = d.as_root("purge", "--older-than", "0")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("removed ")
    assert os.listdir(lay.inbox) == []
    (record,) = (lay.state / "done").iterdir()
    assert json.loads(record.read_text())["purged"] and os.lstat(record).st_uid == DAEMON_UID
    assert not_the_services(lay) == []
    assert d.as_root("init", "--check").returncode == 0


_SWITCH = textwrap.dedent("""
    import json, os, sys
    from eidetic.server import config, deploy
    os.umask(int(sys.argv[2], 8))
    switched = deploy.become_service_user(config.load(sys.argv[1]))
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    print(json.dumps({"switched": switched, "uid": os.getresuid(), "gid": os.getresgid(),
                      "groups": sorted(os.getgroups()), "umask": os.umask(0), "regained": regained,
                      "env": [os.environ.get(k) for k in ("HOME", "USER", "LOGNAME")]}))
""")


@pytest.mark.parametrize("start_umask,want_umask", [(0o022, 0o027), (0o077, 0o077)])
def test_switching_sets_groups_gid_uid_umask_and_home_as_systemd_would(world_tmp, nonroot_venv, start_umask,
                                                                       want_umask):
    import pwd
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' to switch to")
    lay = make_layout(world_tmp / "srv", studies=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc["user"] = "nobody"
    lay.config_path.write_text(json.dumps(doc))
    os.chmod(lay.config_path, 0o644)
    res = subprocess.run([str(nonroot_venv / "bin" / "python"), "-c", _SWITCH, str(lay.config_path),
                          oct(start_umask)], capture_output=True, text=True, cwd=world_tmp,
                         env=clean_env(HOME="/root", USER="root", LOGNAME="root"), timeout=60)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["switched"] and not got["regained"]
    assert got["uid"] == [pw.pw_uid] * 3 and got["gid"] == [pw.pw_gid] * 3
    assert got["groups"] == sorted(set(os.getgrouplist("nobody", pw.pw_gid)))
    assert got["umask"] == want_umask
    assert got["env"] == [pw.pw_dir, "nobody", "nobody"]


def test_without_a_configured_user_or_as_that_user_nothing_is_switched(tmp_path, deployment):
    bare = make_layout(tmp_path, studies=("s1",), init=False)
    assert deploy.become_service_user(bare.cfg) is False and os.geteuid() == 0
    res = run_as(DAEMON_UID, [str(deployment.venv / "bin" / "python"), "-c",
                              "import os, sys; from eidetic.server import config, deploy; "
                              "print(deploy.become_service_user(config.load(sys.argv[1])), os.getgroups())",
                              str(deployment.lay.config_path)], cwd=deployment.base)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "[]"]


def test_a_numeric_user_with_no_group_cannot_be_switched_to_and_says_to_set_group(tmp_path):
    lay = make_layout(tmp_path, studies=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc["user"] = DAEMON_UID
    lay.config_path.write_text(json.dumps(doc))
    res = run_cli("ingest", "--once", config=lay.config_path)
    assert res.returncode == 2
    line = one_line_error(res)
    assert f"key 'user': uid {DAEMON_UID} has no entry in the user database" in line and "set 'group'" in line
