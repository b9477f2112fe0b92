"""eidetic status: what is waiting, processing, failed, stale, stored, and whether a daemon runs."""

from __future__ import annotations

import base64
import json
import os
import time

from conftest import drop

from eidetic.server import inbox
from eidetic.server.inbox import StateDir
from eidetic.server.status import status


def status_json(layout, *args) -> tuple[int, dict]:
    res = layout.cli("status", "--json", *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, json.loads(res.stdout)


def make_failed(layout, name: str) -> None:
    """An entry that is a file, not a folder: refused with a reason, kept in the inbox."""
    (layout.inbox / name).write_bytes(b"not a folder")
    (r,) = [r for r in layout.ingest() if r.outcome == "failed"]
    assert "not a folder" in r.reason


def test_status_json_tells_each_kind_of_entry_apart(layout):
    drop(layout.inbox, "s1-labA-1", {"eprime/a.txt": b"aaa", "b.txt": b"bb"})
    (r,) = layout.ingest()
    assert r.outcome == "ingested"
    make_failed(layout, "s1-labA-2")
    drop(layout.inbox, "s1-labA-3", {"c.txt": b"c"})                 # waiting
    drop(layout.inbox, b"s1-lab\xff-4", {"d.txt": b"d"})             # waiting, not UTF-8
    drop(layout.inbox, "nostudy-1", {"e.txt": b"e"})                 # maps to no study
    (layout.inbox / ".s1-labB-5" / "sub").mkdir(parents=True)        # partial uploads
    (layout.inbox / ".s1-labB-5" / "sub" / "f.txt").write_text("half")
    (layout.inbox / ".s1-labC-6").mkdir()

    code, st = status_json(layout)
    assert code == 1                                                 # a failed entry waits for someone
    assert set(st) == {"studies", "unknown", "daemon_running"} and st["daemon_running"] is False
    s1 = st["studies"]["s1"]
    assert set(s1) >= {"waiting", "processing", "failed", "stale", "partial", "last_ingest", "paths", "versions",
                       "objects", "store_bytes", "filesystem", "daemon"}
    waiting = [w.get("entry") or base64.b64decode(w["entry_b64"]) for w in s1["waiting"]]
    assert waiting == ["s1-labA-3", b"s1-lab\xff-4"]
    assert s1["processing"] == []
    (f,) = s1["failed"]
    assert f["entry"] == "s1-labA-2" and "not a folder" in f["reason"]
    assert f["where"].startswith(str(layout.inbox) + "/.eidetic~failed~") and os.path.exists(f["where"])
    assert (layout.records("failed")[0]["upload"], layout.records("failed")[0]["finished"]) == (f["upload"],
                                                                                                 f["finished"])
    assert s1["stale"] == [] and s1["partial"] == 2
    last = s1["last_ingest"]
    assert (last["entry"], last["upload"], last["files"], last["bytes"], last["seq"]) == (
        "s1-labA-1", r.upload, 2, 5, 1)
    assert (s1["paths"], s1["versions"], s1["objects"]) == (2, 2, 2)
    assert s1["store_bytes"] >= 5
    fs = s1["filesystem"]
    assert 0 < fs["percent_used"] <= 100 and 0 < fs["free_bytes"] < fs["total_bytes"]
    assert s1["daemon"] == {"running": False, "pid": None}
    s2 = st["studies"]["s2"]
    assert (s2["waiting"], s2["failed"], s2["last_ingest"], s2["paths"]) == ([], [], None, 0)
    (u,) = st["unknown"]
    assert (u["entry"], u["state"]) == ("nostudy-1", "waiting")


def test_a_partial_upload_untouched_for_stale_hours_is_stale(layout):
    (layout.inbox / ".s1-labB-1" / "sub").mkdir(parents=True)
    (layout.inbox / ".s1-labB-1" / "sub" / "f.txt").write_text("half")
    (layout.inbox / ".eidetic~done~20261121T103000Z-3f2a1b0c~s1-x").mkdir()   # ours, never an upload
    # ctime cannot be set back, so look from a day and a bit later (stale_hours is 24).
    later = time.time() + 25 * 3600
    s1 = status(layout.cfg, now=later).to_json()["studies"]["s1"]
    (stale,) = s1["stale"]
    assert (stale["entry"], stale["inbox"], stale["uid"], stale["user"]) == (".s1-labB-1", str(layout.inbox), 0,
                                                                             "root")
    assert 25 * 3600 - 60 <= stale["idle_seconds"] <= 25 * 3600 + 60
    assert s1["partial"] == 1
    assert status(layout.cfg).studies["s1"].stale == []


def test_status_text_is_a_compact_block_per_study(layout):
    make_failed(layout, "s1-labA-1")
    drop(layout.inbox, b"s1-lab\xff-2", {"d.txt": b"d"})
    res = layout.cli("status")
    assert res.returncode == 1, res.stderr
    out = res.stdout
    assert "study s1: no daemon running" in out and "study s2: no daemon running" in out
    assert "  waiting      1: s1-lab\\xff-2" in out
    assert "  failed       1" in out and "not a folder" in out and ".eidetic~failed~" in out
    assert "filesystem" in out and "% used" in out


def test_a_failed_entry_renamed_back_by_an_admin_is_waiting_again(layout):
    make_failed(layout, "s1-labA-1")
    (rec,) = layout.records("failed")
    os.rename(rec["where"], layout.inbox / "s1-labA-1")
    code, st = status_json(layout, "--study", "s1")
    assert code == 0
    assert st["studies"]["s1"]["failed"] == []
    assert [w["entry"] for w in st["studies"]["s1"]["waiting"]] == ["s1-labA-1"]
    assert list(st["studies"]) == ["s1"]


def test_a_claimed_entry_shows_as_processing(layout):
    drop(layout.inbox, "s1-labA-1", {"a.txt": b"a"})
    (cand,) = inbox.scan(layout.cfg, "s1")
    cl = StateDir(str(layout.state)).claim(cand)
    code, st = status_json(layout)
    assert code == 0
    (p,) = st["studies"]["s1"]["processing"]
    assert (p["entry"], p["upload"], p["received"]) == ("s1-labA-1", cl.upload, cl.received)
    assert st["studies"]["s1"]["waiting"] == []


def test_status_works_while_a_daemon_holds_its_locks_and_names_its_pid(layout):
    drop(layout.inbox, "s1-labA-1", {"a.txt": b"a"})
    layout.ingest()
    fd = StateDir(str(layout.state)).daemon_lock("s1")
    store = layout.open_store("s1")
    try:
        with store.lock(wait=False):          # as during an ingest: status must not wait for it
            res = layout.cli("status", "--json", timeout=30)
    finally:
        os.close(fd)
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert st["studies"]["s1"]["daemon"] == {"running": True, "pid": os.getpid()}
    assert st["studies"]["s2"]["daemon"] == {"running": False, "pid": None}
    assert st["daemon_running"] is True
    assert st["studies"]["s1"]["paths"] == 1


def test_status_creates_nothing_in_a_store_never_ingested_into(layout):
    index = layout.store("s1") / "index"
    before = sorted(os.listdir(layout.store("s1"))), sorted(os.listdir(index))
    code, st = status_json(layout)
    assert code == 0
    assert (sorted(os.listdir(layout.store("s1"))), sorted(os.listdir(index))) == before
    assert st["studies"]["s1"]["objects"] == 0 and st["studies"]["s1"]["last_ingest"] is None
