"""eidetic replicate (issue 12): a study's store copied to a real S3
endpoint (moto's server, tests/s3_peer.py) or a file:// directory, in
commit order, incrementally, resumably, with checksums and Object Lock."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import botocore.exceptions
import pytest

import eidetic.server.config
from conftest import clean_env, drop, eidetic_argv, make_layout, one_line_error
from eidetic.core import layout as L
from eidetic.core.errors import ReplicaCorrupt, ReplicaError
from eidetic.replica.backend import open_backend
from eidetic.replica.replicate import replica_lag, replicate
from s3_peer import s3_creds, s3_peer  # noqa: F401 - fixtures

BIG = 20 << 20        # more than one 8 MiB part: a multipart upload


class Study:
    """One study ``s1`` with one replica ``r`` (S3 or file://), built by
    really ingesting entries."""

    def __init__(self, root: Path, replica: dict) -> None:
        self.lay = make_layout(root, studies=("s1",))
        doc = json.loads(self.lay.config_path.read_text())
        doc["studies"]["s1"]["replicas"] = {"r": replica}
        self.lay.config_path.write_text(json.dumps(doc, indent=1))
        self.lay.cfg = eidetic.server.config.load(str(self.lay.config_path))
        self.n = 0

    @property
    def rcfg(self):
        return self.lay.cfg.study("s1").replica("r")

    def upload(self, files: dict) -> None:
        self.n += 1
        drop(self.lay.inbox, f"s1-up{self.n}", files)
        [res] = self.lay.ingest()
        assert res.outcome == "ingested", res

    def replicate(self, **kw):
        backend = open_backend(self.rcfg)
        try:
            return replicate(self.lay.open_store(), backend, **kw)
        finally:
            backend.close()

    def cli(self, *args, **kw):
        return self.lay.cli("replicate", *args, **kw)

    def local_keys(self) -> dict[str, bytes | int]:
        """What the replica must hold: manifests (their bytes), objects (their size), marker, HEAD."""
        store = self.lay.store()
        out: dict[str, bytes | int] = {"eidetic-store": (store / "eidetic-store").read_bytes(),
                                       "HEAD": (store / "HEAD").read_bytes()}
        for p in self.lay.manifests():
            out[f"manifests/{p.name}"] = p.read_bytes()
        for p in self.lay.object_files():
            out[f"objects/{p.parent.name}/{p.name}"] = p.stat().st_size
        return out


def s3_replica(peer, creds, **extra) -> tuple[dict, str]:
    bucket = peer.new_bucket(object_lock=True)
    return {"url": f"s3://{bucket}/archive/s1", "endpoint": peer.endpoint, "region": peer.region,
            "profile": creds.profile, **extra}, bucket


def s3_keys(peer, bucket: str, prefix: str = "archive/s1/") -> dict[str, list[dict]]:
    """Every key under the prefix with all its versions (oldest last)."""
    out: dict[str, list[dict]] = {}
    for page in peer.client().get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for v in page.get("Versions", ()):
            out.setdefault(v["Key"][len(prefix):], []).append(v)
    return out


def assert_s3_matches(peer, bucket: str, st: Study) -> None:
    s3 = peer.client()
    want = st.local_keys()
    got = s3_keys(peer, bucket)
    assert set(got) == set(want)
    for key, value in want.items():
        body = s3.get_object(Bucket=bucket, Key="archive/s1/" + key)["Body"].read()
        if isinstance(value, bytes):
            assert body == value, key
        else:
            assert len(body) == value and L.valid_object_id(key[8:10] + key[11:])
            from eidetic.core.hashing import hash_bytes
            assert hash_bytes(body) == key[8:10] + key[11:], key


# ------------------------------------------------------------ incremental

def test_s3_replication_after_several_ingests_puts_only_the_new_keys(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    st.upload({"a.txt": b"alpha", "d/b.bin": os.urandom(3000)})
    st.upload({"a.txt": b"alpha, edited", "c.txt": b"gamma"})
    first = st.replicate()
    assert (first.manifests, first.head, first.local_head) == (2, 2, 2)
    assert first.objects == 4 and first.bytes == 5 + 3000 + 13 + 5
    assert_s3_matches(s3_peer, bucket, st)
    before = s3_keys(s3_peer, bucket)

    st.upload({"a.txt": b"alpha, edited twice", "c.txt": b"gamma", "e.txt": b"alpha"})
    second = st.replicate()
    assert (second.manifests, second.objects, second.bytes) == (1, 1, 19)   # "alpha" and "gamma" were there
    after = s3_keys(s3_peer, bucket)
    new = {k for k in after if k not in before}
    assert new == {"manifests/0000000003.jsonl", "objects/" + _rel(b"alpha, edited twice")}
    # Nothing already there was written again: one version per key, except
    # HEAD, rewritten once per run.
    assert {k: len(v) for k, v in after.items() if len(v) != 1} == {"HEAD": 2}
    assert_s3_matches(s3_peer, bucket, st)

    third = st.replicate()
    assert (third.manifests, third.objects, third.head) == (0, 0, 3)
    assert s3_keys(s3_peer, bucket) == after    # an up-to-date replica gets no PUT at all


def _rel(data: bytes) -> str:
    from eidetic.core.hashing import hash_bytes
    oid = hash_bytes(data)
    return f"{oid[:2]}/{oid[2:]}"


def test_file_replication_after_several_ingests_writes_only_the_new_files(tmp_path):
    target = tmp_path / "site2" / "s1"
    target.mkdir(parents=True)
    st = Study(tmp_path / "l", {"url": f"file://{target}"})
    st.upload({"a.txt": b"alpha", "big.bin": os.urandom(BIG // 4)})
    assert st.replicate().manifests == 1
    inodes = {p: p.stat().st_ino for p in target.rglob("*") if p.is_file()}
    st.upload({"a.txt": b"beta", "big.bin": (st.lay.tree() / "big.bin").read_bytes()})
    res = st.replicate()
    assert (res.manifests, res.objects, res.bytes) == (1, 1, 4)
    files = {str(p.relative_to(target)): p for p in target.rglob("*") if p.is_file()}
    want = st.local_keys()
    assert set(files) == set(want)
    for key, value in want.items():
        data = files[key].read_bytes()
        assert data == value if isinstance(value, bytes) else len(data) == value
        assert files[key].stat().st_mode & 0o777 == 0o444
    # what was there was left alone (same inodes); HEAD was replaced
    assert {p: ino for p, ino in inodes.items() if p.stat().st_ino != ino} == {target / "HEAD": inodes[target / "HEAD"]}


# ------------------------------------------------------------- kill -9

def test_kill_9_while_sending_a_big_object_then_resume_completes_the_replica(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    st.upload({"small.txt": b"small"})
    st.upload({"big.bin": os.urandom(BIG), "small2.txt": b"small 2"})
    argv = [*eidetic_argv(), "--config", str(st.lay.config_path), "replicate", "--bwlimit", "4M"]
    proc = subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    s3 = s3_peer.client()
    deadline = time.monotonic() + 30
    try:
        # Killed once the big object's multipart upload has begun (at 4 MiB/s its
        # 20 MiB take ~5 s): manifest 1 is there, manifest 2 and the big object are not.
        while not s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the multipart upload never started"
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    keys = set(s3_keys(s3_peer, bucket))
    assert "manifests/0000000001.jsonl" in keys and "manifests/0000000002.jsonl" not in keys
    assert "objects/" + _rel((st.lay.tree() / "big.bin").read_bytes()) not in keys

    res = st.replicate()
    assert res.manifests == 1 and res.head == 2 and res.objects >= 1
    assert_s3_matches(s3_peer, bucket, st)


# ---------------------------------------------------------- Object Lock

def test_every_key_carries_retention_a_checksum_and_its_blake3(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds, retention_days=30, retention_mode="governance")
    st = Study(tmp_path, rep)
    small = b"some bytes"
    st.upload({"small.txt": small, "big.bin": os.urandom(BIG)})
    before = datetime.now(timezone.utc)
    st.replicate()
    s3 = s3_peer.client()
    for key in st.local_keys():
        h = s3.head_object(Bucket=bucket, Key="archive/s1/" + key, ChecksumMode="ENABLED")
        assert h["ObjectLockMode"] == "GOVERNANCE", key
        until = h["ObjectLockRetainUntilDate"]
        assert before + timedelta(days=30) - timedelta(minutes=5) < until < \
            datetime.now(timezone.utc) + timedelta(days=30, minutes=5), (key, until)
        assert h.get("ChecksumSHA256"), key
        if key.startswith("objects/"):
            assert h["Metadata"]["blake3"] == key[8:10] + key[11:]
    # The checksum the server verified is the SHA-256 of the bytes (one PUT),
    # or the composite of the parts' SHA-256s for a multipart upload.
    h = s3.head_object(Bucket=bucket, Key="archive/s1/objects/" + _rel(small), ChecksumMode="ENABLED")
    assert h["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(small).digest()).decode()
    big = (st.lay.tree() / "big.bin").read_bytes()
    h = s3.head_object(Bucket=bucket, Key="archive/s1/objects/" + _rel(big), ChecksumMode="ENABLED")
    parts = [big[i:i + (8 << 20)] for i in range(0, len(big), 8 << 20)]
    composite = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in parts)).digest()
    assert h["ChecksumSHA256"].split("-")[0] == base64.b64encode(composite).decode()
    m = st.lay.manifests()[0]
    h = s3.head_object(Bucket=bucket, Key="archive/s1/manifests/" + m.name)
    from eidetic.core.hashing import hash_bytes
    assert h["Metadata"]["blake3"] == hash_bytes(m.read_bytes())


def test_a_locked_version_cannot_be_deleted_or_overwritten_through_the_s3_api(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds, retention_days=1, retention_mode="compliance")
    st = Study(tmp_path, rep)
    data = b"precious"
    st.upload({"p.txt": data})
    st.replicate()
    s3 = s3_peer.client()
    key = "archive/s1/objects/" + _rel(data)
    [v] = s3_keys(s3_peer, bucket)["objects/" + _rel(data)]
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])
    assert ei.value.response["Error"]["Code"] == "AccessDenied"
    # Governance bypass does not apply to compliance mode either.
    with pytest.raises(botocore.exceptions.ClientError):
        s3.delete_object(Bucket=bucket, Key=key, VersionId=v["VersionId"], BypassGovernanceRetention=True)
    # "Overwrite" = a new version on top, then delete the old one: refused too.
    s3.put_object(Bucket=bucket, Key=key, Body=b"ransom note", ChecksumAlgorithm="SHA256")
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        s3.delete_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])
    assert ei.value.response["Error"]["Code"] == "AccessDenied"
    assert s3.get_object(Bucket=bucket, Key=key, VersionId=v["VersionId"])["Body"].read() == data


# --------------------------------------------------------------- refusals

def test_retention_on_a_bucket_without_object_lock_is_one_clear_line(tmp_path, s3_peer, s3_creds):
    bucket = s3_peer.new_bucket(object_lock=False)
    st = Study(tmp_path, {"url": f"s3://{bucket}/archive/s1", "endpoint": s3_peer.endpoint,
                          "profile": s3_creds.profile, "retention_days": 10})
    st.upload({"a.txt": b"a"})
    res = st.cli()
    assert res.returncode == 2
    line = one_line_error(res)
    assert bucket in line and "Object Lock" in line and "retention_days" in line
    assert s3_peer.client().list_objects_v2(Bucket=bucket).get("KeyCount") == 0   # nothing written


@pytest.mark.parametrize("what", ["secret", "key", "profile"])
def test_wrong_credentials_are_one_clear_line(tmp_path, s3_peer, s3_creds, what):
    bucket = s3_peer.new_bucket()
    profile = "eidetic"
    if what == "secret":
        s3_peer.write_credentials(tmp_path / "aws", secret_key="wrong-secret")
    elif what == "key":
        s3_peer.write_credentials(tmp_path / "aws", access_key="AKIAWRONGWRONGWRONG")
    else:
        profile = "nosuch"
    st = Study(tmp_path / "l", {"url": f"s3://{bucket}/archive/s1", "endpoint": s3_peer.endpoint,
                                "profile": profile})
    st.upload({"a.txt": b"a"})
    res = st.cli()
    assert res.returncode == 3
    line = one_line_error(res)
    assert "replica r" in line and ("refused" in line if what != "profile" else "'nosuch'" in line), line


def test_an_unreachable_endpoint_and_a_missing_bucket_are_one_line_each(tmp_path, s3_peer, s3_creds):
    from s3_peer import free_port
    st = Study(tmp_path, {"url": "s3://no-such-bucket/x", "endpoint": s3_peer.endpoint,
                          "profile": s3_creds.profile})
    st.upload({"a.txt": b"a"})
    res = st.cli()
    line = one_line_error(res)
    assert res.returncode == 3 and "no-such-bucket" in line and "does not exist" in line
    doc = json.loads(st.lay.config_path.read_text())
    doc["studies"]["s1"]["replicas"]["r"]["endpoint"] = f"http://127.0.0.1:{free_port()}"
    st.lay.config_path.write_text(json.dumps(doc))
    res = st.cli("--json")
    assert res.returncode == 3 and "cannot reach" in one_line_error(res)
    [r] = json.loads(res.stdout)
    assert r["replica"] == "r" and r["exit_code"] == 3 and "cannot reach" in r["error"]


def test_a_present_key_of_another_size_is_never_overwritten(tmp_path):
    target = tmp_path / "site2"
    target.mkdir()
    st = Study(tmp_path / "l", {"url": f"file://{target}"})
    st.upload({"a.txt": b"alpha"})
    st.replicate()
    st.upload({"b.txt": b"beta"})
    m2 = st.lay.manifests()[1]
    (target / "manifests").chmod(0o755)
    (target / "manifests" / m2.name).write_bytes(b"something else\n")
    res = st.cli()
    assert res.returncode == 1
    line = one_line_error(res)
    assert "manifests/0000000002.jsonl" in line and "eidetic fsck --replica r" in line
    assert (target / "manifests" / m2.name).read_bytes() == b"something else\n"


def test_a_damaged_local_object_is_not_sent(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    data = b"x" * 5000
    st.upload({"x.bin": data})
    obj = st.lay.store() / "objects" / _rel(data)
    obj.chmod(0o644)
    obj.write_bytes(b"y" * 5000)        # bit rot, same size
    with pytest.raises(ReplicaCorrupt, match="eidetic fsck"):
        st.replicate()
    keys = s3_keys(s3_peer, bucket)
    assert "objects/" + _rel(data) not in keys and "manifests/0000000001.jsonl" not in keys


def test_another_studys_replica_in_the_same_place_is_refused(tmp_path):
    target = tmp_path / "site2"
    target.mkdir()
    a = Study(tmp_path / "a", {"url": f"file://{target}"})
    a.upload({"a.txt": b"a"})
    a.replicate()
    (target / "eidetic-store").chmod(0o644)
    (target / "eidetic-store").write_bytes(b"eidetic store\nformat: 1\nstudy: other\n")
    with pytest.raises(ReplicaError, match="another store's marker"):
        a.replicate()


# ------------------------------------------------------------ bwlimit, CLI

def test_bwlimit_throttles_the_bytes_sent(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    st.upload({"a.bin": os.urandom(1 << 20), "b.bin": os.urandom(1 << 20)})
    t0 = time.monotonic()
    res = st.replicate(bwlimit=1 << 20)         # 2 MiB at 1 MiB/s: at least ~1.75 s (a quarter second of burst)
    assert res.bytes == 2 << 20 and time.monotonic() - t0 >= 1.7


def test_cli_replicates_every_study_and_reports_json(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    st.upload({"a.txt": b"a"})
    res = st.cli("--json", "--bwlimit", "100M")
    assert res.returncode == 0, res.stderr
    [r] = json.loads(res.stdout)
    assert (r["study"], r["replica"], r["manifests"], r["objects"], r["head"], r["local_head"]) == \
        ("s1", "r", 1, 1, 1, 1)
    res = st.cli("--replica", "r", "--study", "s1")
    assert res.returncode == 0 and "up to date" in res.stdout
    res = st.cli("--replica", "nope")
    assert res.returncode == 2 and "no study has a replica named 'nope'" in one_line_error(res)
    res = st.cli("--bwlimit", "fast")
    assert res.returncode == 2 and "--bwlimit" in res.stderr


def test_the_lag_counts_uploads_not_on_the_replica_and_the_oldest_age(tmp_path):
    target = tmp_path / "site2"
    target.mkdir()
    st = Study(tmp_path / "l", {"url": f"file://{target}"})
    backend = open_backend(st.rcfg)
    st.upload({"a.txt": b"a"})
    lag = replica_lag(st.lay.open_store(), backend)          # no HEAD yet: counted from the listing
    assert (lag.uploads, lag.replica_seq, lag.local_seq) == (1, 0, 1) and lag.seconds() < 60
    st.replicate()
    st.upload({"b.txt": b"b"})
    st.upload({"c.txt": b"c"})
    lag = replica_lag(st.lay.open_store(), backend)
    assert (lag.uploads, lag.replica_seq) == (2, 1)
    from eidetic.store.manifest import ManifestReader
    r = ManifestReader(str(st.lay.manifests()[1]))
    r.close()
    assert lag.oldest_received == L.parse_utc_iso(r.header.received)
    st.replicate()
    lag = replica_lag(st.lay.open_store(), backend)
    assert (lag.uploads, lag.oldest_received, lag.seconds()) == (0, None, 0.0)


@pytest.mark.parametrize("text, n", [("10M", 10 << 20), ("10MiB/s", 10 << 20), ("1.5G", 3 << 29), ("500", 500),
                                     ("2k", 2048), ("512KB", 512 << 10), ("7 B", 7)])
def test_rates_are_iec_sizes(text, n):
    assert L.parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "fast", "10 megs", "-1M", "1e3", "10Mb/h"])
def test_a_rate_that_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        L.parse_bytes(text)


def test_an_unfinished_multipart_upload_left_by_a_killed_run_is_aborted_later(tmp_path, s3_peer, s3_creds):
    rep, bucket = s3_replica(s3_peer, s3_creds)
    st = Study(tmp_path, rep)
    s3 = s3_peer.client()
    left = s3.create_multipart_upload(Bucket=bucket, Key="archive/s1/objects/ab/" + "c" * 62,
                                      ChecksumAlgorithm="SHA256")["UploadId"]
    # (moto reports every upload as initiated in 2010, so that a recent one,
    # maybe another run's, is left alone cannot be shown here.)
    backend = open_backend(st.rcfg)
    assert backend.abort_stale_uploads(older_than=timedelta(0)) == 1
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
    assert left and st.replicate().head == 0          # nothing to send, nothing left over
