"""eidetic restore: disaster recovery from a file:// or S3 replica.

Real stores made by ingesting, a real replica (a directory, or a bucket of
moto's S3 server over HTTP with credentials from a profile), the real
command line; a restore killed with SIGKILL at a chosen point and run again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import clean_env, one_line_error, run_cli
from test_ownership import deployment  # noqa: F401 - fixture: root, a service user, an install it can read
from replica_helpers import KINDS, REPLICA, STUDY, close_envs, make_site

from eidetic import fsck
from eidetic.core.errors import ReplicaCorrupt, StoreFormatError
from eidetic.replica.restore import restore
from eidetic.store.store import RESTORE_MARKER, Store


@pytest.fixture
def site(request, tmp_path):
    s = make_site(request, tmp_path, request.param)
    yield s
    close_envs(os.path.realpath(str(tmp_path)))


def restore_cli(site, *extra):
    return run_cli("restore", "--from", REPLICA, "--study", STUDY, *extra, config=site.config_path,
                   env=clean_env())


def assert_clean(site):
    findings = fsck.check(Store.open(*site.cfg.study(STUDY).store_args()))
    assert [f.line() for f in findings] == []


@pytest.mark.parametrize("site", [*KINDS, "s3-locked"], indirect=True)
def test_a_lost_store_and_tree_are_restored_byte_identical_and_fsck_clean(site):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    site.lose_everything()
    res = restore_cli(site, "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert (report["manifests"], report["fsck"], report["resumed"]) == (3, [], False)
    assert site.snapshot() == before        # every tree name and its bytes, manifests, HEAD, marker
    assert_clean(site)
    assert not os.path.exists(os.path.join(site.store_dir, "tmp", RESTORE_MARKER))


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_a_store_that_eidetic_init_made_again_is_empty_enough_to_restore_into(site):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    site.lose_everything()
    assert run_cli("init", config=site.config_path).returncode == 0
    res = restore_cli(site)
    assert res.returncode == 0, res.stderr
    assert "restored study s from replica offsite: 3 uploads" in res.stderr + res.stdout
    assert site.snapshot() == before
    assert_clean(site)


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_restore_refuses_a_store_that_holds_uploads_and_touches_nothing(site):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    res = restore_cli(site)
    assert res.returncode == 2
    line = one_line_error(res)
    assert "refusing to restore study s" in line and "not empty" in line
    assert site.snapshot() == before
    assert os.listdir(os.path.join(site.store_dir, "tmp")) == []


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_restore_refuses_a_tree_that_is_not_empty(site):
    site.three_uploads()
    site.replicate()
    site.lose_everything()
    os.makedirs(site.tree)
    with open(os.path.join(site.tree, "notes.txt"), "w") as f:
        f.write("mine\n")
    res = restore_cli(site)
    assert res.returncode == 2
    assert "is not empty" in one_line_error(res)
    assert os.listdir(site.tree) == ["notes.txt"]


KILLER = r"""
import os, signal, sys
from eidetic.server import config
from eidetic.replica.backend import open_backend
from eidetic.replica.restore import restore
from eidetic.store.store import Store

cfg = config.load(sys.argv[1])
s = cfg.study("s")
phase = sys.argv[2]

def progress(p, done, total):
    # SIGKILL: no clean-up of any kind runs, as after a power cut
    if p == phase and done > 0:
        os.kill(os.getpid(), signal.SIGKILL)

restore(Store(*s.store_args()), open_backend(s.replica("offsite")), progress=progress)
"""


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_a_restore_killed_half_way_is_finished_by_running_it_again(site):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    site.lose_everything()
    killed = subprocess.run([sys.executable, "-c", KILLER, str(site.config_path), "objects"],
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert os.path.exists(os.path.join(site.store_dir, "tmp", RESTORE_MARKER))
    # Half a store: every other command refuses it, and says how to finish.
    with pytest.raises(StoreFormatError, match="restore"):
        Store.open(*site.cfg.study(STUDY).store_args())
    res = restore_cli(site, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["resumed"] is True
    assert site.snapshot() == before
    assert_clean(site)


@pytest.mark.parametrize("site", ["file"], indirect=True)
@pytest.mark.parametrize("phase", ["manifests", "index"])
def test_a_restore_killed_while_checking_manifests_or_before_the_tree_is_finished_too(site, phase):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    site.lose_everything()
    killed = subprocess.run([sys.executable, "-c", KILLER, str(site.config_path), phase],
                            env=clean_env(), capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if phase == "index":    # killed with the index rebuilt, before the tree: HEAD and the marker are there
        assert os.path.exists(os.path.join(site.store_dir, "HEAD"))
    assert restore_cli(site).returncode == 0
    assert site.snapshot() == before
    assert_clean(site)


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_a_restore_with_its_manifests_placed_is_finished_only_from_its_own_replica(site):
    site.send({"a.txt": b"a\n"})
    site.replicate()
    site.lose_everything()
    subprocess.run([sys.executable, "-c", KILLER, str(site.config_path), "index"], env=clean_env(),
                   capture_output=True, timeout=120)
    note = os.path.join(site.store_dir, "tmp", RESTORE_MARKER)
    doc = json.loads(open(note).read())
    assert doc["replica"] == REPLICA
    doc["replica"] = "elsewhere"
    os.chmod(note, 0o600)
    with open(note, "w") as f:
        json.dump(doc, f)
    res = restore_cli(site)
    assert res.returncode == 2
    assert "being restored from replica 'elsewhere'" in one_line_error(res)


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_a_restore_stopped_by_a_bad_object_can_be_finished_from_another_replica(site):
    site.send({"a.txt": b"hello\n", "b.txt": b"b\n"})
    site.replicate()
    site2 = site.root / "site3"
    shutil.copytree(site.replica_dir, site2)            # a second, sound replica
    site.lose_everything()
    from eidetic.core.hashing import hash_bytes
    from eidetic.core.layout import object_relpath
    p = site.replica_dir / object_relpath(hash_bytes(b"hello\n"))
    os.chmod(p, 0o644)
    p.write_bytes(b"jello\n")
    with pytest.raises(ReplicaCorrupt, match="hash to"):
        restore(site.store(), site.backend())
    from eidetic.replica.backend import FileBackend, ReplicaConfig
    rep = restore(site.store(), FileBackend(ReplicaConfig("site3", f"file://{site2}")))
    assert rep.resumed and rep.manifests == 1
    assert_clean(site)


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_a_replica_whose_manifest_was_edited_is_refused_as_corrupt(site):
    site.three_uploads()
    site.replicate()
    site.lose_everything()
    m = site.replica_dir / "manifests" / "0000000002.jsonl"
    data = m.read_bytes().replace(b"labA", b"labB", 1)
    os.chmod(m, 0o644)
    m.write_bytes(data)
    with pytest.raises(ReplicaCorrupt, match="manifest 2 is damaged|manifest 3 does not continue"):
        restore(site.store(), site.backend())
    res = restore_cli(site)
    assert res.returncode == 1
    assert "replica offsite:" in one_line_error(res)


def test_root_run_restore_goes_on_as_the_service_user_and_what_it_writes_is_theirs(deployment):
    """sudo eidetic restore into a lost study: the directories are made as
    'eidetic init' makes them, and every file restored is the service user's."""
    from conftest import Layout, check_store, plain_files
    from test_ownership import not_the_services

    import eidetic.server.config
    from eidetic.replica.backend import open_backend
    from eidetic.replica.replicate import replicate

    d, lay = deployment, deployment.lay
    site2 = d.base / "site2"
    site2.mkdir(mode=0o755)
    doc = json.loads(lay.config_path.read_text())
    doc["studies"]["s1"]["replicas"] = {"offsite": {"url": f"file://{site2}"}}
    lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    lay = d.lay = Layout(lay.root, lay.config_path, eidetic.server.config.load(str(lay.config_path)))
    d.upload("s1-labA-1", {"eprime/s1.txt": b"one", "top.txt": b"top"})
    assert d.as_root("ingest", "--once", "--settle", "0").returncode == 0
    d.upload("s1-labA-2", {"eprime/s1.txt": b"two"})
    assert d.as_root("ingest", "--once", "--settle", "0").returncode == 0
    s = lay.cfg.study("s1")
    replicate(Store.open(*s.store_args()), open_backend(s.replica("offsite")))
    before = plain_files(lay.tree())
    close_envs(str(lay.root))
    shutil.rmtree(lay.store())
    shutil.rmtree(lay.tree())
    res = d.as_root("restore", "--from", "offsite", "--study", "s1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert plain_files(lay.tree()) == before
    assert not_the_services(lay) == []
    check_store(lay)
