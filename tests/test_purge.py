"""eidetic purge: done entries go only when every file in them is proven to be in the store."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest
from conftest import DAEMON_UID, check_store, drop

from eidetic.server import inbox
from eidetic.core import layout as L
from eidetic.core.description import DESCRIPTION_NAME, DescribedFile, DescriptionHeader, DescriptionWriter, walk_key
from eidetic.server.inbox import StateDir
from eidetic.core.hashing import hash_bytes
from eidetic.server.purge import purge


def now_iso() -> str:
    return L.utc_iso(datetime.now(timezone.utc))


def describe(partial: bytes, files: dict[str, bytes]) -> None:
    """An upload description at the entry root, as ``eidetic send`` writes it."""
    header = DescriptionHeader(client="test", study="s1", location="labA", user="jdoe", host="pc",
                               platform="Linux", started=now_iso(), source="/home/jdoe")
    with open(partial + b"/" + DESCRIPTION_NAME, "wb") as f:
        w = DescriptionWriter(f, header)
        for rel in sorted(files, key=lambda r: walk_key(r.encode())):
            data = files[rel]
            p = partial + b"/" + rel.encode()
            w.add(DescribedFile(rel.encode(), len(data), os.lstat(p).st_mtime_ns, hash_bytes(data)))
        w.finish(now_iso())


def ingested(layout, name: str, files: dict[str, bytes], prepare=None) -> Path:
    drop(layout.inbox, name, files, prepare=prepare)
    (r,) = layout.ingest()
    assert r.outcome == "ingested", r.reason
    (rec,) = [d for d in layout.records("done") if d["upload"] == r.upload]
    return Path(rec["where"])


def purge_cli(layout, *args):
    res = layout.cli("purge", *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_an_entry_whose_every_file_is_in_the_store_is_removed_and_its_record_marked(layout):
    def extras(p: bytes) -> None:
        os.symlink("/etc/passwd", p + b"/link")
        os.mkfifo(p + b"/fifo")
    kept = ingested(layout, "s1-labA-1", {"eprime/a.txt": b"aaa", "b.txt": b"bb", "empty": b""}, prepare=extras)
    res = purge_cli(layout, "--older-than", "0")
    assert res.returncode == 0, res.stdout
    (line,) = res.stdout.splitlines()
    assert line.startswith(f"removed {kept} (study s1, upload ") and line.endswith(": 3 files, 5 B")
    assert not os.path.lexists(kept) and os.path.exists("/etc/passwd")
    (rec,) = layout.records("done")
    assert L.parse_utc_iso(rec["purged"])
    # Nothing of the archive changed; a second run has nothing to do.
    check_store(layout)
    again = purge_cli(layout, "--older-than", "0")
    assert again.returncode == 0 and "nothing to purge" in again.stdout


def test_entries_younger_than_the_limit_and_dry_runs_are_left_alone(layout):
    kept = ingested(layout, "s1-labA-1", {"a.txt": b"a"})
    res = purge_cli(layout, "--older-than", "1")
    assert res.returncode == 0 and "nothing to purge" in res.stdout
    res = purge_cli(layout, "--older-than", "0", "--dry-run")
    assert res.returncode == 0
    assert res.stdout.startswith(f"would remove {kept} ")
    assert kept.is_dir() and "purged" not in layout.records("done")[0]
    # A day and a bit later the entry is old enough.
    (r,) = purge(layout.cfg, 1, dry_run=True, now=datetime.now(timezone.utc).timestamp() + 25 * 3600)
    assert r.outcome == "would remove"


@pytest.mark.parametrize("change,named", [
    (lambda e: (e / "d" / "a.txt").write_bytes(b"changed"), "d/a.txt differs"),
    (lambda e: (e / "d" / "new.txt").write_bytes(b"added later"), "d/new.txt is not in the upload's manifest"),
    (lambda e: (e / "x").mkdir() or (e / "x" / "a.txt").write_bytes(b"a"), "x/a.txt is not in the upload's manifest"),
], ids=["changed", "added", "same-content-new-path"])
def test_one_file_not_proven_keeps_the_whole_entry_and_says_why(layout, change, named):
    kept = ingested(layout, "s1-labA-1", {"d/a.txt": b"a", "d/b.txt": b"b"})
    change(kept)
    res = purge_cli(layout, "--older-than", "0")
    assert res.returncode == 1
    assert res.stdout.startswith(f"kept {kept} ") and named in res.stdout
    assert (kept / "d" / "b.txt").read_bytes() == b"b"
    assert "purged" not in layout.records("done")[0]


def test_a_file_whose_object_is_missing_from_the_store_keeps_the_entry(layout):
    kept = ingested(layout, "s1-labA-1", {"a.txt": b"only copy?"})
    (obj,) = layout.object_files()
    obj.unlink()
    res = purge_cli(layout, "--older-than", "0")
    assert res.returncode == 1 and "a.txt: its object" in res.stdout and "not in the store" in res.stdout
    assert (kept / "a.txt").read_bytes() == b"only copy?"


def test_failed_and_claimed_entries_are_never_purged(layout):
    (layout.inbox / "s1-labA-1").write_bytes(b"a file, not a folder: fails")
    drop(layout.inbox, "s1-labA-2", {"a.txt": b"a"})
    results = layout.ingest()
    assert sorted(r.outcome for r in results) == ["failed", "ingested"]
    drop(layout.inbox, "s1-labA-3", {"c.txt": b"c"})
    (cand,) = inbox.scan(layout.cfg, "s1")
    StateDir(str(layout.state)).claim(cand)
    before = sorted(os.listdir(layout.inbox))
    results = purge(layout.cfg, 0)
    assert [r.outcome for r in results] == ["removed"]
    after = sorted(os.listdir(layout.inbox))
    assert [n for n in before if n not in after] == [n for n in before if n.startswith(".eidetic~done~")]
    assert any(n.startswith(".eidetic~failed~") for n in after)
    assert any(n.startswith(".eidetic~claimed~") for n in after)


def test_a_directory_swapped_for_a_symlink_after_ingest_is_not_followed(layout, tmp_path):
    kept = ingested(layout, "s1-labA-1", {"d/a.txt": b"a", "top.txt": b"t"})
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.txt").write_bytes(b"a")          # the very content that was ingested as d/a.txt
    (kept / "d" / "a.txt").unlink()
    (kept / "d").rmdir()
    (kept / "d").symlink_to(outside)
    res = purge_cli(layout, "--older-than", "0")
    assert res.returncode == 0, res.stdout
    assert not os.path.lexists(kept)
    assert (outside / "a.txt").read_bytes() == b"a"


def test_the_upload_description_is_proven_by_the_manifest_header(layout):
    files = {"d/a.txt": b"a", "b.txt": b"b"}
    kept = ingested(layout, "s1-labA-1", files, prepare=lambda p: describe(p, files))
    (done,) = layout.records("done")
    assert (kept / DESCRIPTION_NAME.decode()).exists()
    changed = ingested(layout, "s1-labA-2", files, prepare=lambda p: describe(p, files))
    with open(changed / DESCRIPTION_NAME.decode(), "ab") as f:
        f.write(b"\n")
    results = {r.upload: r for r in purge(layout.cfg, 0)}
    assert results[done["upload"]].outcome == "removed" and results[done["upload"]].files == 3
    (other,) = [r for u, r in results.items() if u != done["upload"]]
    assert other.outcome == "kept" and DESCRIPTION_NAME.decode() in other.reason
    assert not os.path.lexists(kept) and changed.is_dir()


def test_the_marked_record_keeps_its_owner_and_mode(layout):
    ingested(layout, "s1-labA-1", {"a.txt": b"a"})
    (name,) = os.listdir(layout.state / "done")
    rec = layout.state / "done" / name
    os.chown(rec, DAEMON_UID, DAEMON_UID)       # written by the daemon; purge runs as root
    (r,) = purge(layout.cfg, 0)
    assert r.outcome == "removed"
    st = os.lstat(rec)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (DAEMON_UID, DAEMON_UID, 0o600)
    assert "purged" in json.loads(rec.read_text())


def test_study_option_limits_the_purge_and_json_lists_the_results(layout):
    ingested(layout, "s1-labA-1", {"a.txt": b"a"})
    drop(layout.inbox, "s2-labA-1", {"b.txt": b"b"})
    layout.ingest()
    res = purge_cli(layout, "--older-than", "0", "--study", "s2", "--json")
    assert res.returncode == 0, res.stderr
    (r,) = json.loads(res.stdout)
    assert (r["study"], r["outcome"], r["entry"], r["files"], r["bytes"], r["reason"]) == (
        "s2", "removed", "s2-labA-1", 1, 1, None)
    assert [d.get("purged") is not None for d in sorted(layout.records("done"), key=lambda d: d["study"])] == [
        False, True]
    assert purge_cli(layout, "--older-than", "0", "--study", "nope").returncode == 2
