"""eidetic init: the deployment design's directories, modes and owners; init --check."""

from __future__ import annotations

import json
import os
import stat
import textwrap
from pathlib import Path

import pytest
from conftest import (
    DAEMON_UID,
    UPLOADER_UID,
    Layout,
    check_store,
    drop,
    make_layout,
    one_line_error,
    run_as,
)

import eidetic.server.config
from eidetic.server import deploy

STUDY_GID = 61003           # throwaway ids: no /etc/group entry is needed
OTHER_UPLOADER_UID = 61004
SYSTEM_PYTHON = "/usr/bin/python3"


def configured(root: Path, top: dict | None = None, study: dict | None = None, init: bool = False) -> Layout:
    """A one-study layout whose config carries extra top-level and study keys."""
    lay = make_layout(root, studies=("s1",), init=False)
    doc = json.loads(lay.config_path.read_text())
    doc.update(top or {})
    doc["studies"]["s1"].update(study or {})
    lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    cfg = eidetic.server.config.load(str(lay.config_path))
    if init:
        deploy.init(cfg)
    return Layout(lay.root, lay.config_path, cfg)


def mode(p) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def owner(p) -> tuple[int, int]:
    st = os.lstat(p)
    return st.st_uid, st.st_gid


def test_init_creates_each_directory_with_the_design_mode_and_says_so(tmp_path):
    lay = configured(tmp_path)
    res = lay.cli("init")
    assert res.returncode == 0, res.stderr
    assert mode(lay.inbox) == 0o3777
    assert mode(lay.state) == 0o700
    assert mode(lay.store()) == 0o2750      # the study group reads history (log, checkout)
    assert mode(lay.tree()) == 0o2750
    for inner, want in (("objects", 0o2750), ("manifests", 0o2750), ("index", 0o2750), ("tmp", 0o2700),
                        ("index/data.mdb", 0o640)):
        assert mode(lay.store() / inner) == want, inner
    lines = res.stdout.splitlines()
    assert f"created {lay.tree()} (mode 2750, root:root)" in lines
    assert f"created {lay.inbox} (mode 3777, root:root)" in lines
    again = lay.cli("init")
    assert again.returncode == 0
    assert sorted(again.stdout.splitlines()) == sorted(f"ok {p}" for p in
                                                       (lay.inbox, lay.state, lay.store(), lay.tree()))


def test_init_puts_back_a_changed_mode_and_reports_the_change(tmp_path):
    lay = configured(tmp_path, init=True)
    os.chmod(lay.tree(), 0o755)
    os.chmod(lay.inbox, 0o777)
    res = lay.cli("init")
    assert res.returncode == 0, res.stderr
    assert f"changed mode of {lay.tree()} 0755 -> 2750" in res.stdout.splitlines()
    assert f"changed mode of {lay.inbox} 0777 -> 3777" in res.stdout.splitlines()
    assert (mode(lay.tree()), mode(lay.inbox)) == (0o2750, 0o3777)


def test_init_gives_configured_numeric_owners_to_the_directories_and_the_daemons_files(world_tmp):
    lay = configured(world_tmp, top={"user": DAEMON_UID, "group": DAEMON_UID}, study={"group": STUDY_GID})
    res = lay.cli("init")
    assert res.returncode == 0, res.stderr
    service = (DAEMON_UID, DAEMON_UID)
    readers = (DAEMON_UID, STUDY_GID)
    assert owner(lay.inbox) == service and owner(lay.state) == service
    assert owner(lay.tree()) == readers and owner(lay.store()) == readers
    # Everything inside the store and state the daemon must write, including the lock and index
    # files that a root-run command would otherwise create as root; the store's with the study group.
    for p in [lay.state / "claims", lay.state / "done"]:
        assert owner(p) == service, p
    for p in [lay.store() / "objects", lay.store() / "tmp", lay.store() / "lock", lay.store() / "index" / "data.mdb",
              lay.store() / "index" / "lock.mdb"]:
        assert owner(p) == readers, p
    assert f"created {lay.tree()} (mode 2750, {DAEMON_UID}:{STUDY_GID})" in res.stdout.splitlines()
    # A store directory left root-owned (say by an ingest run as root) is found and handed back.
    os.chown(lay.store() / "manifests", 0, 0)
    check = lay.cli("init", "--check")
    assert check.returncode == 1
    assert (f"error: {lay.store()}: 1 file or directory inside the store is not owned by {DAEMON_UID}:{STUDY_GID} "
            "as designed") in check.stdout and "e.g. manifests (root:root)" in check.stdout
    res = lay.cli("init")
    assert f"changed owner of {lay.store() / 'manifests'} root:root -> {DAEMON_UID}:{STUDY_GID}" in res.stdout
    assert lay.cli("init", "--check").returncode == 0


def test_init_resolves_user_and_group_names(tmp_path):
    lay = configured(tmp_path, top={"user": "root"}, study={"group": "root"}, init=True)
    assert owner(lay.tree()) == (0, 0) and owner(lay.inbox) == (0, 0)


@pytest.mark.parametrize("top,study,key", [
    ({"user": "no-such-user-eidetic"}, {}, "'user'"),
    ({"group": "no-such-group-eidetic"}, {}, "'group'"),
    ({}, {"group": "no-such-group-eidetic"}, "'studies.s1.group'"),
])
def test_an_unknown_user_or_group_name_is_a_one_line_config_error(tmp_path, top, study, key):
    lay = configured(tmp_path, top=top, study=study)
    for args in (["init"], ["init", "--check"]):
        res = lay.cli(*args)
        assert res.returncode == 2
        line = one_line_error(res)
        assert key in line and "no such" in line
    assert not lay.inbox.exists()


def test_check_changes_nothing_and_exits_1_for_each_difference(tmp_path):
    lay = configured(tmp_path, init=True)
    assert lay.cli("init", "--check").returncode == 0
    os.chmod(lay.state, 0o755)
    lay.tree().rmdir()
    res = lay.cli("init", "--check", "--json")
    assert res.returncode == 1
    found = {(f["code"], f["path"]) for f in json.loads(res.stdout)}
    assert found == {("mode", str(lay.state)), ("missing", str(lay.tree()))}
    assert mode(lay.state) == 0o755 and not lay.tree().exists()
    text = lay.cli("init", "--check")
    assert f"error: {lay.state}: state has mode 0755, the design says 0700" in text.stdout.splitlines()


def test_check_warns_when_the_disk_is_fuller_than_the_configured_threshold(tmp_path):
    lay = configured(tmp_path, top={"notify": {"sender": "eidetic@example.org", "disk_warn_percent": [1, 100]}},
                     init=True)
    (f,) = [f for f in deploy.check(lay.cfg) if f.code == "disk"]
    assert f.severity == "warning" and f.data["threshold"] == 1 and f.data["percent_used"] >= 1
    assert lay.cli("init", "--check").returncode == 1


def test_check_warns_about_a_low_inotify_watch_limit_unless_polling(tmp_path):
    lay = configured(tmp_path, init=True)
    low = tmp_path / "max_user_watches"
    low.write_text("1024\n")
    (f,) = deploy.check(lay.cfg, max_user_watches_file=str(low))
    assert f.code == "inotify" and "1024" in f.detail
    polling = configured(tmp_path, top={"polling": True})
    assert deploy.check(polling.cfg, max_user_watches_file=str(low)) == []


def test_check_refuses_an_inbox_on_nfs_without_polling_and_a_store_on_nfs_always(tmp_path):
    lay = configured(tmp_path, init=True)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(textwrap.dedent(f"""\
        22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
        40 22 0:50 / {lay.inbox} rw,relatime shared:20 - nfs4 srv:/dropbox rw,vers=4.2
        41 22 0:51 / {lay.store()} rw,relatime shared:21 - cifs //srv/store rw
        """))
    found = {(f.code, f.path) for f in deploy.check(lay.cfg, mountinfo_file=str(mountinfo))}
    assert found == {("network-fs", str(lay.inbox)), ("network-fs", str(lay.store()))}
    polling = configured(tmp_path, top={"polling": True})
    found = {(f.code, f.path) for f in deploy.check(polling.cfg, mountinfo_file=str(mountinfo))}
    assert found == {("network-fs", str(lay.store()))}
    # The real mount table: this test's directories are on a local file system.
    assert [f for f in deploy.check(lay.cfg) if f.code == "network-fs"] == []


def test_mountinfo_mount_points_with_spaces_are_unescaped_and_the_longest_prefix_wins():
    mounts = deploy.parse_mountinfo("22 1 254:0 / / rw - ext4 /dev/vda rw\n"
                                    "40 22 0:50 / /mnt/lab\\040data rw shared:2 - nfs srv:/x rw\n"
                                    "41 40 0:51 / /mnt/lab\\040data/local rw - tmpfs tmpfs rw\n")
    assert mounts[1] == ("/mnt/lab data", "nfs")
    assert deploy.fs_type("/mnt/lab data/inbox", mounts) == "nfs"
    assert deploy.fs_type("/mnt/lab data/local/x", mounts) == "tmpfs"
    assert deploy.fs_type("/mnt/lab datax", mounts) == "ext4"


def test_check_finds_a_parent_the_service_user_or_the_study_group_cannot_pass(world_tmp):
    closed = world_tmp / "closed"
    closed.mkdir(mode=0o700)
    lay = configured(closed, top={"user": DAEMON_UID, "group": DAEMON_UID}, study={"group": STUDY_GID},
                     init=True)
    found = [f for f in deploy.check(lay.cfg) if f.code == "access"]
    assert {f.path for f in found} == {str(closed)}
    assert any("study group" in f.detail for f in found) and any("service user" in f.detail for f in found)
    os.chmod(closed, 0o755)
    assert deploy.check(lay.cfg) == []


def test_tree_directories_made_by_ingest_inherit_the_study_group_and_pass_fsck(tmp_path):
    lay = configured(tmp_path, study={"group": STUDY_GID}, init=True)
    drop(lay.inbox, "s1-labA-1", {"eprime/sub/s1.txt": b"x", "top.txt": b"t"})
    (r,) = lay.ingest()
    assert r.outcome == "ingested", r.reason
    for d in (lay.tree() / "eprime", lay.tree() / "eprime" / "sub"):
        st = os.lstat(d)
        assert st.st_gid == STUDY_GID and st.st_mode & stat.S_ISGID, d
    check_store(lay)


def test_systemd_dropin_opens_exactly_the_configured_directories(tmp_path):
    lay = configured(tmp_path)
    res = lay.cli("init", "--systemd-dropin")
    assert res.returncode == 0, res.stderr
    rw = [ln.split("=", 1)[1] for ln in res.stdout.splitlines() if ln.startswith("ReadWritePaths=")]
    assert rw == ["", str(lay.inbox), str(lay.state), str(lay.store()), str(lay.tree())]
    assert f"Environment=EIDETIC_CONFIG={lay.config_path}" in res.stdout.splitlines()
    assert not lay.inbox.exists()


def test_default_layout_as_a_normal_user_gets_the_modes_without_chown(world_tmp, nonroot_venv):
    home = world_tmp / "home"
    home.mkdir()
    os.chown(home, UPLOADER_UID, UPLOADER_UID)
    env = {"EIDETIC_HOME": str(home / "eidetic"), "HOME": str(home), "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    res = run_as(UPLOADER_UID, [str(nonroot_venv / "bin" / "eidetic"), "init"], env=env)
    assert res.returncode == 0, res.stderr
    base = home / "eidetic"
    assert mode(base / "inbox") == 0o3777 and mode(base / "studies/demo/tree") == 0o2750
    assert owner(base / "studies/demo/tree") == (UPLOADER_UID, UPLOADER_UID)
    res = run_as(UPLOADER_UID, [str(nonroot_venv / "bin" / "eidetic"), "init", "--check"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr


_PRIVATE_UPLOAD = textwrap.dedent("""
    import os, sys
    os.umask(0o027)                 # group may read, others may not
    inbox, name = sys.argv[1], sys.argv[2]
    part = os.path.join(inbox, "." + name)
    os.makedirs(os.path.join(part, "d"))
    with open(os.path.join(part, "d", "f.txt"), "w") as f:
        f.write("private")
    os.rename(part, os.path.join(inbox, name))
""")


def test_setgid_inbox_lets_the_daemon_read_an_upload_other_uploaders_cannot(world_tmp, nonroot_venv):
    """Why the inbox is 3777: an uploader with umask 027 keeps its data from the
    other uploaders, and the entry's group (the inbox's, by setgid) lets eidetic read it."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to act as the uploader")
    srv = world_tmp / "srv"
    srv.mkdir(mode=0o755)
    lay = configured(srv, top={"user": DAEMON_UID, "group": DAEMON_UID}, study={"group": STUDY_GID})
    os.chmod(lay.config_path, 0o644)
    assert lay.cli("init").returncode == 0            # as root, like an admin
    assert lay.cli("status").returncode == 0          # root-run commands leave nothing root-owned behind
    res = run_as(UPLOADER_UID, [SYSTEM_PYTHON, "-c", _PRIVATE_UPLOAD, str(lay.inbox), "s1-labA-1"])
    assert res.returncode == 0, res.stderr
    entry = lay.inbox / "s1-labA-1"
    assert owner(entry / "d" / "f.txt") == (UPLOADER_UID, DAEMON_UID) and mode(entry / "d" / "f.txt") == 0o640
    peek = run_as(OTHER_UPLOADER_UID, ["cat", str(entry / "d" / "f.txt")])
    assert peek.returncode != 0 and "ermission denied" in peek.stderr
    eidetic = str(nonroot_venv / "bin" / "eidetic")
    res = run_as(DAEMON_UID, [eidetic, "--config", str(lay.config_path), "ingest", "--once", "--settle", "0"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert (lay.tree() / "d" / "f.txt").read_text() == "private"
    res = run_as(DAEMON_UID, [eidetic, "--config", str(lay.config_path), "init", "--check"])
    assert res.returncode == 0, res.stdout + res.stderr
    check_store(lay)


def test_the_annotated_example_config_is_a_valid_config():
    cfg = eidetic.server.config.load(str(Path(__file__).resolve().parent.parent / "contrib" / "eidetic.yaml.example"))
    assert (cfg.user, cfg.group) == ("eidetic", "eidetic")
    assert cfg.studies["foo"].group == "foo-grp" and cfg.studies["bar"].inbox == "/data-dropbox/bar/inbox"
    assert cfg.notify.enabled


def test_check_refuses_unprotected_hardlinks_and_the_advised_setting_clears_it(tmp_path):
    lay = configured(tmp_path, init=True)
    sysctl = tmp_path / "protected_hardlinks"
    sysctl.write_text("0\n")
    (f,) = deploy.check(lay.cfg, protected_hardlinks_file=str(sysctl))
    assert f.code == "hardlinks" and f.severity == "error" and "fs.protected_hardlinks=1" in f.detail
    sysctl.write_text("1\n")            # what the hint says to set
    assert deploy.check(lay.cfg, protected_hardlinks_file=str(sysctl)) == []
    assert deploy.check(lay.cfg, protected_hardlinks_file=str(tmp_path / "absent")) == []
