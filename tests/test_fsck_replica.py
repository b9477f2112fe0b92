"""fsck --replica (one damaged replica per finding code, named after it) and
fsck --repair fetching lost local objects from a replica.

Replicas are real: a directory (file://), or a bucket of moto's S3 server
over HTTP with credentials from a profile.  A replica is damaged through
its own interface: files edited in the directory, objects deleted or put
again through the S3 API (on a bucket without Object Lock, which would
refuse exactly that).
"""

from __future__ import annotations

import os

import pytest
import yaml
from conftest import clean_env, run_cli
from replica_helpers import KINDS, REPLICA, STUDY, close_envs, make_site

from eidetic import fsck
from eidetic.core import layout
from eidetic.core.hashing import hash_bytes
from eidetic.store.store import Store

A1, B, TOP = b"alpha 1\n", b"\x00\x01" * 300, b"top\n"


@pytest.fixture
def site(request, tmp_path):
    s = make_site(request, tmp_path, request.param)
    yield s
    close_envs(os.path.realpath(str(tmp_path)))


def check(site, read_data=False, **kw):
    r = site.rcfg
    return fsck.check_replica(site.store(), site.backend(), kw.get("days", r.retention_days),
                              kw.get("mode", r.retention_mode), read_data=read_data)


def codes(findings) -> list[str]:
    return sorted({f.code for f in findings})


def fsck_cli(site, *args):
    return run_cli("fsck", "--study", STUDY, *args, config=site.config_path, env=clean_env())


# --------------------------------------------------- damaging a replica

def key_of(data: bytes) -> str:
    return layout.object_relpath(hash_bytes(data))


def remote_remove(site, key: str) -> None:
    if site.kind == "file":
        os.unlink(site.replica_dir / key)
    else:
        site.s3.client().delete_object(Bucket=site.bucket, Key=f"archive/s/{key}")


def remote_replace(site, key: str, data: bytes, blake3: str | None = None) -> None:
    """New bytes under *key* (S3: a new version, metadata as given)."""
    if site.kind == "file":
        p = site.replica_dir / key
        os.chmod(p, 0o644)
        p.write_bytes(data)
    else:
        site.s3.client().put_object(Bucket=site.bucket, Key=f"archive/s/{key}", Body=data,
                                    Metadata={"blake3": blake3} if blake3 else {})


@pytest.fixture
def replicated(site):
    site.three_uploads()
    site.replicate()
    return site


# ------------------------------------------------------------ clean

@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_a_fresh_replica_is_clean_with_and_without_read_data(replicated):
    assert [f.line() for f in check(replicated)] == []
    findings = check(replicated, read_data=True)
    assert [f.line() for f in findings] == []
    assert findings.stats["downloaded_bytes"] > 3 << 20
    res = fsck_cli(replicated, "--replica", REPLICA)
    assert res.returncode == 0, res.stderr
    assert "fsck --replica: clean" in res.stderr + res.stdout


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_without_read_data_no_object_is_downloaded(replicated):
    findings = check(replicated)
    assert findings.stats["replica_objects"] == 8
    assert findings.stats["downloaded_bytes"] < 5000          # the three manifests only (file://: no metadata)


# ----------------------------------------------------- one per code

@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_E070_replica_of_another_study_has_a_wrong_marker(replicated):
    remote_replace(replicated, "eidetic-store", b"eidetic store\nformat: 1\nstudy: other\n")
    assert codes(check(replicated)) == ["E070"]


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_E071_manifest_removed_from_the_replica(replicated):
    remote_remove(replicated, layout.manifest_relpath(2))
    found = check(replicated)
    assert codes(found) == ["E071"]
    assert found[0].path.endswith("manifests/0000000002.jsonl")


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_E072_manifest_altered_on_the_replica(replicated):
    key = layout.manifest_relpath(1)
    data = (replicated.root / "store" / key).read_bytes().replace(b"labA", b"labX")
    remote_replace(replicated, key, data)
    assert codes(check(replicated)) == ["E072"]


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_E073_replica_head_of_another_history(replicated):
    remote_replace(replicated, "HEAD", b"2 " + b"0" * 64 + b"\n")
    assert codes(check(replicated)) == ["E073"]


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_W074_replica_behind_after_a_new_upload_is_a_warning(replicated):
    replicated.send({"later.txt": b"later\n"})
    found = check(replicated)
    assert codes(found) == ["W074"]
    assert "1 upload(s) not replicated yet (manifests 4 to 4)" in found[0].detail
    res = fsck_cli(replicated, "--replica", REPLICA)
    assert res.returncode == 0 and "W074" in res.stdout


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_E075_object_missing_on_the_replica(replicated):
    remote_remove(replicated, key_of(TOP))
    found = check(replicated)
    assert codes(found) == ["E075"]
    assert found[0].path.endswith(key_of(TOP)) and "manifest 1" in found[0].detail
    res = fsck_cli(replicated, "--replica", REPLICA)
    assert res.returncode == 1
    assert "E075 replica object missing" in res.stdout


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_E076_object_of_another_size_on_the_replica(replicated):
    remote_replace(replicated, key_of(TOP), b"top, longer\n", hash_bytes(TOP))
    assert codes(check(replicated)) == ["E076"]


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_E077_read_data_finds_altered_bytes_of_the_right_size(replicated):
    # Same size, the metadata still claims the right BLAKE3: only the bytes tell.
    remote_replace(replicated, key_of(TOP), b"TOP\n", hash_bytes(TOP))
    assert codes(check(replicated)) == []
    found = check(replicated, read_data=True)
    assert codes(found) == ["E077"]
    assert f"hash to {hash_bytes(b'TOP' + bytes([10]))}" in found[0].detail
    res = fsck_cli(replicated, "--replica", REPLICA, "--read-data")
    assert res.returncode == 1 and "E077" in res.stdout


@pytest.mark.parametrize("site", ["s3"], indirect=True)
def test_E077_an_object_put_again_without_its_blake3_is_found_without_read_data(replicated):
    remote_replace(replicated, key_of(TOP), b"TOP\n")      # same size, a new version put by hand
    found = check(replicated)
    assert codes(found) == ["E077"] and "no BLAKE3 metadata" in found[0].detail


def test_E077_recorded_blake3_that_is_not_the_id(request, tmp_path):
    site = make_site(request, tmp_path, "s3", object_lock=True, retention_days=1)
    site.three_uploads()
    site.replicate()
    # A locked bucket refuses to overwrite a version: a new version with other metadata is what can change.
    site.s3.client().put_object(Bucket=site.bucket, Key=f"archive/s/{key_of(TOP)}", Body=TOP,
                                Metadata={"blake3": "0" * 64})
    assert "E077" in codes(check(site))


def test_E078_retention_shorter_than_configured_or_of_another_mode(request, tmp_path):
    site = make_site(request, tmp_path, "s3", object_lock=True, retention_days=1)
    site.three_uploads()
    site.replicate()
    assert codes(check(site)) == []
    found = check(site, days=30)
    assert codes(found) == ["E078"] and "earlier than" in found[0].detail
    assert len(found) == 3 + 8                       # every manifest and every object
    assert codes(check(site, mode="compliance")) == ["E078"]


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_E079_replica_ahead_of_a_store_that_lost_uploads(replicated):
    from eidetic.store.manifest import digest_of

    store = replicated.store()
    os.unlink(store.manifest_path(3))
    store.set_head(2, digest_of(store.manifest_path(2)))
    assert codes(check(replicated)) == ["E079"]


def test_read_data_needs_a_replica(tmp_path):
    res = run_cli("fsck", "--read-data", config=write_minimal_config(tmp_path), env=clean_env())
    assert res.returncode == 2 and "--replica" in res.stderr


def write_minimal_config(root) -> str:
    p = root / "e.yaml"
    p.write_text(yaml.safe_dump({"state": str(root / "state"),
                                 "studies": {"s": {"tree": str(root / "t"), "store": str(root / "st")}}}))
    return str(p)


# ------------------------------------------------- repair from a replica

def obj_path(site, data: bytes) -> str:
    return os.path.join(site.store_dir, key_of(data))


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_a_corrupt_local_object_is_repaired_from_the_replica(replicated):
    p = obj_path(replicated, B)
    os.chmod(p, 0o644)
    with open(p, "r+b") as f:
        f.write(b"\xff\xff")            # bit rot, seen through every hardlink of the tree too
    os.chmod(p, 0o444)
    assert [f.code for f in fsck.check(replicated.store())] == ["E020"]
    res = fsck_cli(replicated, "--repair")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"restored corrupt object {hash_bytes(B)} from replica offsite" in res.stdout + res.stderr
    assert [f.line() for f in fsck.check(Store.open(*replicated.cfg.study(STUDY).store_args()))] == []
    with open(os.path.join(replicated.tree, "d", "b.bin"), "rb") as f:
        assert f.read() == B
    kept = [os.path.join(d, n) for d, _, ns in os.walk(os.path.join(replicated.store_dir, "lost+found"))
            for n in ns]
    assert len(kept) == 1 and open(kept[0], "rb").read().startswith(b"\xff\xff")   # nothing deleted


@pytest.mark.parametrize("site", KINDS, indirect=True)
def test_a_missing_object_no_tree_name_holds_is_fetched_from_the_replica(replicated):
    os.unlink(obj_path(replicated, TOP))
    os.unlink(os.path.join(replicated.tree, "top.txt"))
    for n in os.listdir(replicated.tree):
        if n.startswith("top~v"):
            os.unlink(os.path.join(replicated.tree, n))
    assert {"E021", "E030"} <= set(codes(fsck.check(replicated.store())))
    res = fsck_cli(replicated, "--repair", "--replica", REPLICA)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"restored missing object {hash_bytes(TOP)} from replica offsite" in res.stdout + res.stderr
    assert open(os.path.join(replicated.tree, "top.txt"), "rb").read() == TOP
    assert [f.line() for f in fsck.check(Store.open(*replicated.cfg.study(STUDY).store_args()))] == []


@pytest.mark.parametrize("site", ["file"], indirect=True)
def test_a_replica_copy_that_does_not_verify_is_not_used_for_repair(replicated):
    os.unlink(obj_path(replicated, TOP))
    for n in os.listdir(replicated.tree):
        if n.startswith("top"):
            os.unlink(os.path.join(replicated.tree, n))
    remote_replace(replicated, key_of(TOP), b"TOP\n")
    res = fsck_cli(replicated, "--repair")
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "could not be fetched from a replica" in out and "hash to" in out
    assert not os.path.exists(obj_path(replicated, TOP))
    assert os.listdir(os.path.join(replicated.store_dir, "tmp")) == []
