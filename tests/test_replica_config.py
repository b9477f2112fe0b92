"""studies.<s>.replicas and replica_lag_hours (issue 12): parsed into
ReplicaConfig tuples; every bad value is a ConfigError naming the key."""

from __future__ import annotations

import pytest

from eidetic.replica.backend import ReplicaConfig
from eidetic.server.config import ConfigError, parse


def doc(tmp, replicas=None, **study) -> dict:
    body = {"tree": f"{tmp}/foo/tree", "store": f"{tmp}/foo/store", **study}
    if replicas is not None:
        body["replicas"] = replicas
    return {"inbox": f"{tmp}/inbox", "state": f"{tmp}/state",
            "studies": {"foo": body, "bar": {"tree": f"{tmp}/bar/tree", "store": f"{tmp}/bar/store"}}}


def bad(d, *needles: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse(d, "/etc/test.yaml")
    msg = str(ei.value)
    assert "/etc/test.yaml" in msg and ei.value.exit_code == 2
    for n in needles:
        assert n in msg, (n, msg)


def test_the_issue_example_is_parsed_into_replica_configs(tmp_path):
    cfg = parse(doc(tmp_path, {
        "offsite": {"url": "s3://eidetic-foo/archive", "endpoint": "https://s3.example.org",
                    "region": "us-east-1", "profile": "eidetic", "retention_days": 3650,
                    "retention_mode": "compliance"},
        "site2": {"url": "file:///mnt/site2/foo/"}}, replica_lag_hours=24), "t")
    foo = cfg.study("foo")
    assert foo.replicas == (
        ReplicaConfig("offsite", "s3://eidetic-foo/archive", endpoint="https://s3.example.org",
                      region="us-east-1", profile="eidetic", retention_days=3650, retention_mode="compliance"),
        ReplicaConfig("site2", "file:///mnt/site2/foo"))
    assert foo.replica_lag_hours == 24.0
    assert foo.replica("site2").url == "file:///mnt/site2/foo"
    with pytest.raises(ConfigError, match="no replica 'nope'.*offsite, site2"):
        foo.replica("nope")


def test_no_replicas_and_a_lag_of_24_hours_by_default(tmp_path):
    bar = parse(doc(tmp_path), "t").study("bar")
    assert bar.replicas == () and bar.replica_lag_hours == 24.0


def test_governance_mode_and_a_bucket_without_prefix(tmp_path):
    [r] = parse(doc(tmp_path, {"x": {"url": "s3://my.bucket-1", "retention_days": 1,
                                     "retention_mode": "governance"}}), "t").study("foo").replicas
    assert (r.url, r.retention_days, r.retention_mode) == ("s3://my.bucket-1", 1, "governance")


@pytest.mark.parametrize("replicas, needles", [
    ("s3://b/p", ["'studies.foo.replicas' must map replica names"]),
    ({"x": "s3://b/p"}, ["'studies.foo.replicas.x' must be a mapping"]),
    ({"x": {}}, ["'studies.foo.replicas.x.url' is required"]),
    ({"x y": {"url": "s3://bucket/p"}}, ["replica name 'x y'"]),
    ({"x": {"url": "s3://bucket/p", "colour": "red"}}, ["unknown key 'studies.foo.replicas.x.colour'"]),
    ({"x": {"url": "ftp://host/p"}}, ["'studies.foo.replicas.x.url' must be s3://BUCKET/PREFIX"]),
    ({"x": {"url": "s3://Bad_Bucket/p"}}, ["studies.foo.replicas.x.url", "not a valid S3 bucket name"]),
    ({"x": {"url": "s3://bucket/a/../b"}}, ["studies.foo.replicas.x.url", "prefix"]),
    ({"x": {"url": "file://relative/path"}}, ["studies.foo.replicas.x.url", "file:///absolute/path"]),
    ({"x": {"url": "file:///mnt/a/../b"}}, ["studies.foo.replicas.x.url"]),
    ({"x": {"url": "file:///mnt/a", "profile": "p"}}, ["'studies.foo.replicas.x.profile' applies to s3://"]),
    ({"x": {"url": "s3://bucket/p", "endpoint": "s3.example.org"}}, ["'studies.foo.replicas.x.endpoint'"]),
    ({"x": {"url": "s3://bucket/p", "retention_days": 0}}, ["'studies.foo.replicas.x.retention_days'"]),
    ({"x": {"url": "s3://bucket/p", "retention_days": "10y"}}, ["'studies.foo.replicas.x.retention_days'"]),
    ({"x": {"url": "s3://bucket/p", "retention_days": True}}, ["'studies.foo.replicas.x.retention_days'"]),
    ({"x": {"url": "s3://bucket/p", "retention_mode": "strict"}},
     ["'studies.foo.replicas.x.retention_mode' must be one of compliance, governance"]),
    ({"x": {"url": "s3://bucket/p", "profile": "a b"}}, ["'studies.foo.replicas.x.profile'"]),
])
def test_a_bad_replica_is_refused_naming_the_key(tmp_path, replicas, needles):
    bad(doc(tmp_path, replicas), *needles)


@pytest.mark.parametrize("lag", [0, -1, "1d", True])
def test_a_bad_replica_lag_is_refused_naming_the_key(tmp_path, lag):
    bad(doc(tmp_path, replica_lag_hours=lag), "'studies.foo.replica_lag_hours'")


def test_two_replicas_in_one_place_are_refused(tmp_path):
    d = doc(tmp_path, {"a": {"url": "s3://bucket/archive"}})
    d["studies"]["bar"]["replicas"] = {"b": {"url": "s3://bucket/archive/bar"}}
    bad(d, "studies.foo.replicas.a.url", "studies.bar.replicas.b.url", "overlap")
    # the same prefix in another bucket, or a sibling prefix, is fine
    d["studies"]["bar"]["replicas"] = {"b": {"url": "s3://bucket/archive-bar"}}
    parse(d, "t")


def test_a_file_replica_inside_a_store_or_tree_is_refused(tmp_path):
    bad(doc(tmp_path, {"a": {"url": f"file://{tmp_path}/bar/store/copy"}}),
        "studies.foo.replicas.a.url", "studies.bar.store", "overlap")
