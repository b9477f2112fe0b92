"""The inbox lifecycle with the daemon and the uploader as two different,
unprivileged uids (root reads and renames everything, so only real uids
prove it).  docs/design.md, "The kernel": in a sticky inbox the service user cannot move an
uploader's 0755 directory to another parent, so entries are renamed in
place; the uploader keeps owning its entry and can never write the tree.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import (
    DAEMON_UID,
    UPLOADER_UID,
    check_store,
    chown_tree,
    make_layout,
    one_line_error,
    plain_files,
    run_as,
    tree_files,
)

from eidetic.store.manifest import read_all

SYSTEM_PYTHON = "/usr/bin/python3"

_UPLOAD_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.umask(0o022)
    inbox, name, files, modes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    partial = os.path.join(inbox, "." + name)
    os.mkdir(partial, 0o777)                          # 0755 after the umask
    for rel, data in files.items():
        p = os.path.join(partial, rel)
        os.makedirs(os.path.dirname(p), 0o777, exist_ok=True)
        with open(p, "w") as f:
            f.write(data)                             # 0644 after the umask
    for rel in sorted(modes, key=len, reverse=True):  # deepest first
        os.chmod(os.path.normpath(os.path.join(partial, rel)), modes[rel])
    os.rename(partial, os.path.join(inbox, name))
""")

_TRY_WRITES = textwrap.dedent("""
    import json, os, sys
    tree = sys.argv[1]
    f = os.path.join(tree, "d", "f.txt")
    attempts = {
        "create in tree root": lambda: open(os.path.join(tree, "planted.txt"), "x").close(),
        "create in tree dir": lambda: open(os.path.join(tree, "d", "planted.txt"), "x").close(),
        "mkdir in tree": lambda: os.mkdir(os.path.join(tree, "d", "newdir")),
        "append to tree file": lambda: open(f, "a").write("evil"),
        "truncate tree file": lambda: os.truncate(f, 0),
        "chmod tree file": lambda: os.chmod(f, 0o666),
        "unlink tree file": lambda: os.unlink(f),
        "rename tree file": lambda: os.rename(f, f + ".moved"),
        "hardlink tree file": lambda: os.link(f, os.path.join(tree, "d", "link")),
        "chmod tree dir": lambda: os.chmod(os.path.join(tree, "d"), 0o777),
        "list the store": lambda: os.listdir(sys.argv[2]),
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


@dataclass
class TwoUids:
    base: Path
    lay: object
    venv: Path

    def upload(self, name: str, files: dict[str, str], modes: dict[str, int] | None = None):
        """As the uploader, umask 022; *modes* maps paths ("." = the entry) to a chmod."""
        res = run_as(UPLOADER_UID, [SYSTEM_PYTHON, "-c", _UPLOAD_SCRIPT, str(self.lay.inbox), name,
                                    json.dumps(files), json.dumps(modes or {})], cwd=self.base)
        assert res.returncode == 0, res.stderr
        return self.lay.inbox / name

    def daemon(self, *args):
        return run_as(DAEMON_UID, [str(self.venv / "bin" / "eidetic"), "--config", str(self.lay.config_path),
                                   *args], cwd=self.base)

    def ingest(self):
        return self.daemon("ingest", "--once", "--settle", "0")


@pytest.fixture
def two_uids(world_tmp, nonroot_venv) -> TwoUids:
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to act as the uploader")
    srv = world_tmp / "srv"
    srv.mkdir()
    chown_tree(srv, DAEMON_UID)
    lay = make_layout(srv, studies=("s1",), init=False)
    os.chmod(lay.config_path, 0o644)
    t = TwoUids(world_tmp, lay, nonroot_venv)
    res = t.daemon("init")
    assert res.returncode == 0, res.stderr
    st = os.lstat(lay.inbox)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (DAEMON_UID, 0o3777)
    return t


def _owners(root) -> set[int]:
    out = {os.lstat(root).st_uid}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            out.add(os.lstat(os.path.join(dirpath, n)).st_uid)
    return out


def test_daemon_uid_ingests_an_uploader_uids_entry_renamed_in_place(two_uids):
    t, lay = two_uids, two_uids.lay
    entry = t.upload("s1-labA-1", {"d/f.txt": "hello", "d/sub/g.txt": "world", "top.txt": "top"})
    st = os.lstat(entry)
    # The setgid inbox gives the entry the service group (and its directories the setgid bit).
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (UPLOADER_UID, DAEMON_UID, 0o2755)
    # The premise (docs/design.md, "The kernel"): the daemon cannot move the entry out of the inbox.
    res = run_as(DAEMON_UID, ["mv", str(entry), str(lay.root / "taken")])
    assert res.returncode != 0 and entry.exists()

    res = t.ingest()
    assert res.returncode == 0, (res.stdout, res.stderr)
    assert "ingested s1-labA-1" in res.stdout
    (done,) = os.listdir(lay.inbox)
    assert done.startswith(".eidetic~done~") and done.endswith("~s1-labA-1")
    kept = lay.inbox / done
    assert _owners(kept) == {UPLOADER_UID}
    assert stat.S_IMODE(os.lstat(kept).st_mode) == 0o2755
    assert (kept / "d/f.txt").read_text() == "hello"
    assert plain_files(lay.tree()) == {b"d/f.txt": b"hello", b"d/sub/g.txt": b"world", b"top.txt": b"top"}
    assert _owners(lay.tree()) == {DAEMON_UID}
    assert _owners(lay.store()) == {DAEMON_UID}
    assert _owners(lay.state) == {DAEMON_UID}
    header = read_all(lay.manifests()[0])[0]
    assert header.uploader_uid == UPLOADER_UID
    check_store(lay)


def test_uploaders_unreadable_file_fails_the_entry_with_the_reason(two_uids):
    t, lay = two_uids, two_uids.lay
    t.upload("s1-labA-1", {"ok.txt": "fine", "d/private.dat": "secret"}, modes={"d/private.dat": 0o000})
    res = t.ingest()
    assert res.returncode == 1
    assert "d/private.dat" in res.stderr and "Traceback" not in res.stderr
    (failed,) = os.listdir(lay.inbox)
    assert failed.startswith(".eidetic~failed~")
    kept = lay.inbox / failed
    assert _owners(kept) == {UPLOADER_UID}
    assert (kept / "ok.txt").read_text() == "fine"
    assert stat.S_IMODE(os.lstat(kept / "d/private.dat").st_mode) == 0
    (rec,) = [json.loads(p.read_text()) for p in (lay.state / "failed").iterdir()]
    assert "d/private.dat" in rec["reason"] and "ermission" in rec["reason"]
    assert tree_files(lay.tree()) == {} and lay.manifests() == []
    # Fixed by the uploader and sent again: ingested.
    t.upload("s1-labA-2", {"ok.txt": "fine", "d/private.dat": "secret"})
    res = t.ingest()
    assert res.returncode == 0, res.stderr
    assert plain_files(lay.tree()) == {b"ok.txt": b"fine", b"d/private.dat": b"secret"}


@pytest.mark.parametrize("modes,named", [
    ({"d/f.dat": 0o600}, "d/f.dat"),
    ({"d/sub": 0o700}, "d/sub"),
    ({"d/sub": 0o311}, "d/sub"),
    ({".": 0o700}, ""),
], ids=["file-0600", "dir-0700", "dir-0311", "entry-0700"])
def test_parts_of_an_entry_the_daemon_cannot_read_fail_it_with_the_reason(two_uids, modes, named):
    t, lay = two_uids, two_uids.lay
    t.upload("s1-labA-1", {"top.txt": "t", "d/f.dat": "f", "d/sub/g.txt": "g"}, modes=modes)
    res = t.ingest()
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr
    (failed,) = os.listdir(lay.inbox)
    assert failed.startswith(".eidetic~failed~")
    assert _owners(lay.inbox / failed) == {UPLOADER_UID}
    (rec,) = [json.loads(p.read_text()) for p in (lay.state / "failed").iterdir()]
    assert named in rec["reason"] and "ermission" in rec["reason"]
    assert tree_files(lay.tree()) == {} and lay.manifests() == []
    assert lay.records("claims") == []


def test_uploader_cannot_write_into_the_tree_or_the_store(two_uids):
    t, lay = two_uids, two_uids.lay
    t.upload("s1-labA-1", {"d/f.txt": "original"})
    assert t.ingest().returncode == 0
    before = tree_files(lay.tree())
    res = run_as(UPLOADER_UID, [SYSTEM_PYTHON, "-c", _TRY_WRITES, str(lay.tree()), str(lay.store())])
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == []
    assert tree_files(lay.tree()) == before


def test_uploader_changing_its_entry_after_ingest_does_not_change_the_archive(two_uids):
    """The tree holds copies, not the uploader's inodes."""
    t, lay = two_uids, two_uids.lay
    t.upload("s1-labA-1", {"d/f.txt": "original"})
    assert t.ingest().returncode == 0
    (done,) = os.listdir(lay.inbox)
    target = lay.inbox / done / "d" / "f.txt"
    res = run_as(UPLOADER_UID, [SYSTEM_PYTHON, "-c",
                                f"open({str(target)!r}, 'a').write(' tampered')"])
    assert res.returncode == 0, res.stderr
    assert target.read_text() == "original tampered"
    assert plain_files(lay.tree()) == {b"d/f.txt": b"original"}
    check_store(lay)


def test_a_user_without_access_to_the_daemons_directories_gets_one_line_naming_the_path(two_uids):
    """The uploader runs the admin's commands: each stops with one line and exit
    status 3, naming what it may not read (not "not initialised", not bytes)."""
    t = two_uids
    eidetic = [str(t.venv / "bin" / "eidetic"), "--config", str(t.lay.config_path)]
    claims = str(t.lay.state / "claims")
    for args in (["purge", "--older-than", "0", "--dry-run"], ["ingest", "--once", "--settle", "0"], ["init"]):
        res = run_as(UPLOADER_UID, eidetic + args, cwd=t.base)
        assert res.returncode == 3, (args, res.stdout, res.stderr)
        line = one_line_error(res)
        assert line.startswith("eidetic: Permission denied") and line.endswith(": " + claims), (args, line)
        if args == ["init"]:
            assert "as root" in line
    assert t.daemon("init", "--check").returncode == 0     # nothing was changed
