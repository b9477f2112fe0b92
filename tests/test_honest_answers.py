"""Honest answers for every user: what a command could not see is said,
with who may see it (exit status 3); it is never taken for "no daemon
running", "last ingest none", "all is well" or damage.

Real uids, real groups and a real daemon running as the service user
(the deployment of test_members.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess

import pytest
from conftest import DAEMON_UID, clean_env, drop, make_layout, run_cli
from daemon_helpers import DaemonProc
from test_members import OUTSIDER_UID, _run_as, site  # noqa: F401 - the fixture


def _daemon(site) -> DaemonProc:
    d = DaemonProc(site.lay.config_path, "--settle", "0", argv0=[site.eidetic], cwd=site.base,
                   prefix=["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups"],
                   env=clean_env(HOME="/nonexistent", PATH="/usr/bin:/bin"))
    d.started()
    return d


def test_status_by_an_outsider_while_the_daemon_runs_says_what_it_cannot_see_never_no_daemon(site):
    daemon = _daemon(site)
    try:
        res = site.as_outsider("status")
        assert res.returncode == 3, res.stdout + res.stderr
        assert "no daemon running" not in res.stdout and "last ingest  none" not in res.stdout
        assert "study s1: daemon unknown" in res.stdout
        assert (f"unseen       cannot see {site.lay.state} (whether a daemon runs and uploads being ingested, "
                f"failed and done): run as the service user ({DAEMON_UID}) or root") in res.stdout
        g1 = site.groups["s1"][0]
        assert f"cannot see study s1's store: you are not in group {g1}, which may read study s1" in res.stdout
        doc = json.loads(site.as_outsider("status", "--json").stdout)
        s1 = doc["studies"]["s1"]
        assert s1["daemon"]["running"] is None and doc["daemon_running"] is None
        assert s1["failed"] is None and s1["processing"] is None and s1["uploads"] is None
        prom = site.as_outsider("status", "--prometheus")
        assert prom.returncode == 3
        assert 'eidetic_daemon_up{study="s1"}' not in prom.stdout       # unknown: no sample, never a 0
        assert 'eidetic_status_unseen{study="s1"} 2' in prom.stdout
        # As it says: root sees everything, the daemon running, nothing unseen.
        res = site.as_root("status")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "study s1: daemon running" in res.stdout and "unseen" not in res.stdout
    finally:
        assert daemon.stop() == 0, daemon.text


def test_status_by_a_member_shows_the_store_and_the_failed_entry_count_as_unknown(site):
    drop(site.lay.inbox, "nostudy-labA-1", {"f.txt": b"x"})          # refused: no such study
    assert site.as_service("ingest", "--once", "--settle", "0").returncode == 1
    res = site.as_member("status", "--study", "s1")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "failed       unknown" in res.stdout and "store        2 uploads" in res.stdout
    assert "last ingest  " in res.stdout and "last ingest  none" not in res.stdout


def test_init_check_by_a_member_says_what_it_could_not_check(site):
    res = site.as_member("init", "--check")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "all is well" not in res.stdout
    assert f"cannot see inside {site.lay.store('s1') / 'tmp'} to check owners there" in res.stdout
    res = site.as_root("init", "--check")
    assert res.returncode == 0, res.stdout


def test_log_and_checkout_by_an_outsider_never_report_damage_or_missing_history(site):
    for args in (("log", "s1:d/a.txt"), ("checkout", "s1:d/a.txt", "-o", "/tmp/x"), ("log", "s1:nothing/here")):
        res = _run_as(OUTSIDER_UID, [], site.argv(*args), cwd=site.base)
        assert res.returncode == 3, (args, res.stderr)
        assert "no history" not in res.stderr and "damaged" not in res.stderr and "fsck" not in res.stderr


def test_replicas_are_checked_with_the_service_users_credentials_and_a_member_is_told_so(site):
    replica = site.base / "second-disk" / "s1"
    replica.mkdir(parents=True)
    os.chown(replica, DAEMON_UID, DAEMON_UID)
    doc = json.loads(site.lay.config_path.read_text())
    doc["studies"]["s1"]["replicas"] = {"offsite": {"url": f"file://{replica}"}}
    site.lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
    res = site.as_service("replicate", "--study", "s1")
    assert res.returncode == 0, res.stdout + res.stderr
    res = site.as_member("status", "--study", "s1")        # a member's lookup is not the service user's
    assert res.returncode == 3, res.stdout + res.stderr
    assert ("cannot check the replicas (offsite): their credentials are the service user's; run as the "
            f"service user ({DAEMON_UID})") in res.stdout
    assert "UNREACHABLE" not in res.stdout and "up to date" not in res.stdout
    for run in (site.as_service, site.as_root):            # as it says; root uses the service user's files
        res = run("status", "--study", "s1")
        assert res.returncode == 0, res.stdout + res.stderr
        assert "replica      offsite: up to date (upload 2)" in res.stdout, res.stdout
        assert "cannot check the replicas" not in res.stdout


def test_root_checks_an_s3_replica_with_the_service_users_credential_files(tmp_path, s3_peer):
    """`sudo eidetic status`: root's own ~/.aws is not the service's; root
    reads the service user's ~/.aws/ (a real user with a home here)."""
    if shutil.which("useradd") is None:
        pytest.skip("useradd is not installed")
    user = f"eidsvc{secrets.token_hex(3)}"
    home = tmp_path / "home"
    subprocess.run(["useradd", "--home-dir", str(home), "--create-home", "--user-group", user], check=True,
                   capture_output=True)
    try:
        creds = s3_peer.write_credentials(home / ".aws", profile="eidetic")
        bucket = s3_peer.new_bucket(object_lock=False, versioning=True)
        lay = make_layout(tmp_path / "srv", studies=("s1",), init=False)
        doc = json.loads(lay.config_path.read_text())
        doc["user"] = user
        doc["studies"]["s1"]["replicas"] = {"offsite": {"url": f"s3://{bucket}/s1", "endpoint": s3_peer.endpoint,
                                                        "region": s3_peer.region, "profile": creds.profile}}
        lay.config_path.write_text(json.dumps(doc, indent=1) + "\n")
        env = {k: v for k, v in clean_env(HOME="/root").items() if not k.startswith("AWS_")}
        assert run_cli("init", config=lay.config_path, env=env).returncode == 0
        res = run_cli("status", "--study", "s1", "--json", config=lay.config_path, env=env)
        assert res.stdout, res.stderr
        doc = json.loads(res.stdout)["studies"]["s1"]
        assert [r["name"] for r in doc["replicas"]] == ["offsite"], doc
        assert doc["replicas"][0].get("error") is None, doc["replicas"][0]
        assert not any("replica" in u for u in doc["unseen"]), doc["unseen"]
    finally:
        subprocess.run(["userdel", "--remove", user], capture_output=True)
