"""The daemon replicates after ingests; status shows each replica's lag;
a mail goes out once when a replica falls replica_lag_hours behind
(issue 12).  Real components: the daemon as a subprocess, a file://
replica, the moto S3 server (tests/s3_peer.py), a real SMTP server."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import drop, make_layout
from daemon_helpers import DaemonProc, set_study
from eidetic.server.notify import Notifier
from eidetic.server.replication import StudyReplicator
from s3_peer import s3_creds, s3_peer  # noqa: F401 - fixtures
from smtp_peer import SMTPServer

PI = "pi@example.org"
ADMIN = "admin@example.org"


@pytest.fixture
def daemons():
    started: list[DaemonProc] = []

    def start(config, *args, **kw) -> DaemonProc:
        d = DaemonProc(config, *args, **kw)
        started.append(d)
        return d
    yield start
    for d in started:
        d.kill()


def file_replica_layout(root: Path):
    lay = make_layout(root / "l", studies=("s1",))
    target = root / "site2" / "s1"
    target.mkdir(parents=True)
    set_study(lay, "s1", replicas={"site2": {"url": f"file://{target}"}})
    return lay, target


def status_json(lay) -> dict:
    res = lay.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["studies"]["s1"]


def test_the_daemon_replicates_after_an_ingest_and_status_shows_the_lag_drop_to_zero(tmp_path, daemons):
    lay, target = file_replica_layout(tmp_path)
    drop(lay.inbox, "s1-first", {"a.txt": b"alpha"})
    [res] = lay.ingest()
    assert res.outcome == "ingested"
    [r] = status_json(lay)["replicas"]
    assert (r["name"], r["reachable"], r["uploads"], r["replica_seq"]) == ("site2", True, 1, 0)
    assert 0 <= r["lag_seconds"] < 600 and r["oldest_received"]
    text = lay.cli("status").stdout
    assert "replica      site2: 1 upload not replicated, the oldest received" in text

    d = daemons(lay.config_path).started()
    # the start-up catch-up
    d.wait_for(r"study s1: replica site2: replicated 1 upload \(1 object, 5 B\)")
    assert (target / "HEAD").read_bytes() == (lay.store() / "HEAD").read_bytes()
    drop(lay.inbox, "s1-second", {"a.txt": b"alpha 2", "b.txt": b"beta"})
    d.wait_for(r"ingested s1-second")
    d.wait_for(r"study s1: replica site2: replicated 1 upload \(2 objects, 11 B\).*at upload 2 of 2")
    assert (target / "HEAD").read_bytes() == (lay.store() / "HEAD").read_bytes()
    assert sorted(p.name for p in (target / "manifests").iterdir()) == \
        sorted(p.name for p in lay.manifests())
    [r] = status_json(lay)["replicas"]
    assert (r["uploads"], r["lag_seconds"], r["replica_seq"], r["oldest_received"]) == (0, 0, 2, None)
    assert "replica      site2: up to date (upload 2)" in lay.cli("status").stdout
    prom = lay.cli("status", "--prometheus").stdout
    assert 'eidetic_replica_lag_uploads{study="s1",replica="site2"} 0' in prom
    assert 'eidetic_replica_lag_seconds{study="s1",replica="site2"} 0' in prom
    assert 'eidetic_replica_up{study="s1",replica="site2"} 1' in prom
    assert d.stop() == 0
    assert "Traceback" not in d.text


def test_an_unreachable_replica_is_shown_as_such_never_as_up_to_date(tmp_path, s3_peer, s3_creds):
    from s3_peer import free_port
    lay = make_layout(tmp_path / "l", studies=("s1",))
    set_study(lay, "s1", replicas={"offsite": {"url": "s3://bucket/s1", "profile": s3_creds.profile,
                                               "endpoint": f"http://127.0.0.1:{free_port()}"}})
    t0 = time.monotonic()
    [r] = status_json(lay)["replicas"]
    assert time.monotonic() - t0 < 20
    assert r["reachable"] is False and r["uploads"] is None and r["lag_seconds"] is None
    assert "cannot reach" in r["error"]
    assert "replica      offsite: UNREACHABLE (replica offsite: cannot reach" in lay.cli("status").stdout
    prom = lay.cli("status", "--prometheus").stdout
    assert 'eidetic_replica_up{study="s1",replica="offsite"} 0' in prom
    assert "eidetic_replica_lag_uploads{" not in prom and "eidetic_replica_lag_seconds{" not in prom


def test_the_daemon_backs_off_on_a_failing_replica_and_never_delays_ingest(tmp_path, daemons):
    lay = make_layout(tmp_path / "l", studies=("s1",))
    set_study(lay, "s1", replicas={"gone": {"url": f"file://{tmp_path}/not-mounted"}})
    d = daemons(lay.config_path).started()
    line = d.wait_for(r"replica gone: replication failed")
    assert "does not exist" in line and "retrying in 1 min" in line
    for i in range(3):
        drop(lay.inbox, f"s1-e{i}", {"f.txt": f"{i}".encode()})
    for i in range(3):
        d.wait_for(rf"ingested s1-e{i}")
    time.sleep(0.5)
    # kicks during the back-off do not retry a dead replica at every upload
    assert len([ln for ln in d.lines if "replica gone: replication failed" in ln]) == 1
    assert d.stop() == 0


def test_a_replica_lag_past_the_threshold_is_mailed_once_per_crossing(tmp_path):
    target = tmp_path / "site2"
    with SMTPServer(tmp_path / "smtp") as smtp:
        lay = make_layout(tmp_path / "l", studies=("s1",))
        doc = json.loads(lay.config_path.read_text())
        doc["notify"] = {"smtp_host": "127.0.0.1", "smtp_port": smtp.port, "sender": "eidetic@example.org",
                         "admin": [ADMIN]}
        lay.config_path.write_text(json.dumps(doc))
        set_study(lay, "s1", notify=[PI], replica_lag_hours=2,
                  replicas={"site2": {"url": f"file://{target}"}})
        drop(lay.inbox, "s1-a", {"a.txt": b"a"})
        lay.ingest()
        clock = [datetime.now(timezone.utc) + timedelta(hours=3)]
        lines: list[str] = []
        notifier = Notifier(lay.cfg, lines.append)
        rep = StudyReplicator(lay.cfg.study("s1"), lambda _p, m: lines.append(m), lambda: notifier,
                              now=lambda: clock[0], state_dir=str(lay.state))
        [r] = rep.replicas
        rep.pass_once(r)               # the replica's folder is not there: fails, 3 h behind > 2 h
        assert "replication failed" in lines[0] and r.error is not None
        notifier.deliver()
        [m] = smtp.wait_for(1)
        assert sorted(m.rcpt_tos) == [ADMIN, PI]
        assert "s1: replica site2 is 3 h behind (1 upload not replicated)" in m.subject
        assert "does not exist" in m.body and "eidetic replicate --study s1 --replica site2" in m.body
        rep.pass_once(r)               # still failing, still behind: no second mail
        notifier.deliver()
        time.sleep(0.3)
        assert len(smtp.received) == 1

        target.mkdir()
        rep.pass_once(r)               # caught up: re-armed
        assert r.error is None and r.known_seq == 1
        assert json.loads((lay.state / "replica" / "s1" / "site2.json").read_text())["seq"] == 1
        drop(lay.inbox, "s1-b", {"b.txt": b"b"})
        lay.ingest()
        clock[0] = datetime.now(timezone.utc) + timedelta(hours=1)  # b is 1 h behind: under the threshold
        rep.check_lag(r)
        notifier.deliver()
        time.sleep(0.3)
        assert len(smtp.received) == 1
        clock[0] += timedelta(hours=5)  # crossed again: a second mail
        rep.check_lag(r)
        notifier.deliver()
        smtp.wait_for(2)
        assert "replica site2 is" in smtp.received[1].subject
