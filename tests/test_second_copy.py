"""docs/admin.md, "Keeping a second copy", done as written: copy a store and
its tree with rsync -aH under the store's lock, check the copy with a config
pointing at it, rebuild a lost tree (and index) with fsck --repair; a backup
of the store alone (without its index and tmp/) is enough."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import drop, make_layout, run_cli, tree_files

pytestmark = pytest.mark.skipif(shutil.which("rsync") is None or shutil.which("flock") is None,
                                reason="rsync or flock (util-linux) is not installed")


@pytest.fixture
def original(tmp_path):
    lay = make_layout(tmp_path / "orig", studies=("s1",))
    drop(lay.inbox, "s1-labA-1", {"eprime/s01.txt": b"trial,rt\n", "biopac/s01.acq": b"\x00\x01" * 5000,
                                  "notes.txt": b"first"})
    drop(lay.inbox, "s1-labA-2", {"eprime/s01.txt": b"trial,rt\n1,512\n", "notes.txt": b"first"})
    drop(lay.inbox, "s1-labB-3", {"eprime/s02.txt": b"trial,rt\n1,430\n", "copy-of-s01.txt": b"trial,rt\n"})
    assert [r.outcome for r in lay.ingest()] == ["ingested"] * 3
    return lay


def copy_config(root, original):
    """A config for the copy: the same study, its tree and store where the copy is."""
    return make_layout(root, studies=("s1",), init=False)


def rsync(*args) -> None:
    res = subprocess.run(["rsync", *map(str, args)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def fsck(cfg, *args) -> subprocess.CompletedProcess:
    res = run_cli("fsck", "--json", *args, config=cfg.config_path)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def codes(res) -> list[str]:
    return sorted(f["code"] for f in json.loads(res.stdout))


def test_rsync_copy_is_clean_and_fsck_repair_rebuilds_its_tree(original, tmp_path):
    store, tree = original.store("s1"), original.tree("s1")
    copy = copy_config(tmp_path / "copy", original)
    # As admin.md says: under the store's lock (an ingest waits), store and tree in ONE rsync -aH run
    # (rsync keeps hard links only among the files of one run).
    res = subprocess.run(["flock", str(store / "lock"), "rsync", "-aH", str(original.root / "stores"),
                          str(original.root / "trees"), str(tmp_path / "copy")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr

    res = fsck(copy)
    assert res.returncode == 0 and codes(res) == [], res.stdout + res.stderr
    assert tree_files(copy.tree("s1")) == tree_files(tree)
    # -H kept the tree's names and the store's objects one file each, as in the original.
    obj = next(p for p in (copy.store("s1") / "objects").rglob("*") if p.is_file())
    assert obj.stat().st_nlink > 1

    # The tree lost (a disk of its own, a wrong rm -r): fsck says so, --repair brings it back.
    shutil.rmtree(copy.tree("s1"))
    res = fsck(copy)
    assert res.returncode == 1 and codes(res) == ["E035"], res.stdout
    res = run_cli("fsck", "--repair", config=copy.config_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "re-created" in res.stdout
    assert tree_files(copy.tree("s1")) == tree_files(tree)       # every version name and plain name back
    res = fsck(copy)
    assert res.returncode == 0 and codes(res) == [], res.stdout
    res = run_cli("log", "--json", "s1:eprime/s01.txt", config=copy.config_path)
    assert res.returncode == 0 and len(json.loads(res.stdout)) == 2, res.stdout + res.stderr


def test_without_H_the_copy_takes_more_room_and_fsck_says_the_tree_was_replaced(original, tmp_path):
    copy = copy_config(tmp_path / "copy", original)
    rsync("-a", original.root / "stores", original.root / "trees", tmp_path / "copy")
    size = subprocess.run(["du", "-s", "--block-size=1", str(tmp_path / "copy")], capture_output=True,
                          text=True).stdout.split()[0]
    with_h = tmp_path / "with-H"
    rsync("-aH", original.root / "stores", original.root / "trees", with_h)
    size_h = subprocess.run(["du", "-s", "--block-size=1", str(with_h)], capture_output=True,
                            text=True).stdout.split()[0]
    assert int(size) > int(size_h)
    res = fsck(copy)
    assert res.returncode == 1 and set(codes(res)) == {"E031"}, res.stdout


def test_a_backup_of_the_store_alone_restores_index_and_tree(original, tmp_path):
    """What admin.md gives restic or borg: the store without index/ and tmp/; restored, then
    init, fsck --repair, fsck as the section says."""
    copy = copy_config(tmp_path / "copy", original)
    dest = copy.store("s1")
    dest.parent.mkdir(parents=True)
    rsync("-a", "--exclude=/index/", "--exclude=/tmp/", f"{original.store('s1')}/", f"{dest}/")
    assert sorted(p.name for p in dest.iterdir()) == ["HEAD", "eidetic-store", "lock", "manifests", "objects"]
    res = fsck(copy)
    assert res.returncode == 1 and codes(res) == ["E003", "E035", "E041"], res.stdout
    res = run_cli("init", config=copy.config_path)
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("fsck", "--repair", "--study", "s1", config=copy.config_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "rebuilt the index" in res.stdout and "re-created" in res.stdout
    assert tree_files(copy.tree("s1")) == tree_files(original.tree("s1"))
    res = fsck(copy, "--study", "s1")
    assert res.returncode == 0 and codes(res) == [], res.stdout
    res = run_cli("init", "--check", config=copy.config_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_store_lock_held_by_flock_keeps_writers_out(original):
    """flock STORE/lock CMD takes the very lock ingest and fsck --repair take."""
    store = original.store("s1")
    probe = ("import sys\nfrom eidetic.store.store import Store\nfrom eidetic.server.config import load\n"
             "from eidetic.core.errors import LockBusy\n"
             f"s = Store(*load({str(original.config_path)!r}).study('s1').store_args())\n"
             "try:\n    s.lock(wait=False).__enter__()\nexcept LockBusy as e:\n    print('busy:', e)\n")
    res = subprocess.run(["flock", str(store / "lock"), sys.executable, "-c", probe], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("busy: study s1: another eidetic process is writing to"), res.stdout
