"""fsck: one generated corruption per finding code, repair, and the CLI.

Every store here is made by real ingests into real temp directories; each
test then damages it the way a person or a disk would and checks the code
fsck reports (OCFL-style: the fixture is named after what it breaks).
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import pytest
import yaml
from conftest import DAEMON_UID, clean_env, run_as

from eidetic.server import config, deploy
from eidetic import fsck
from eidetic.core import layout
from eidetic.store.index import Index
from eidetic.server.ingest import Ingester
from eidetic.core.hashing import hash_bytes
from eidetic.store.store import Store

STUDY = "s"


# ----------------------------------------------------------------- fixtures

class Env:
    def __init__(self, root) -> None:
        self.root = str(root)
        self.inbox = os.path.join(self.root, "inbox")
        self.tree = os.path.join(self.root, "tree")
        self.store_dir = os.path.join(self.root, "store")
        self.cfg_doc = {"inbox": self.inbox, "state": os.path.join(self.root, "state"), "settle_seconds": 0,
                        "studies": {STUDY: {"tree": self.tree, "store": self.store_dir}}}
        self.cfg = config.parse(self.cfg_doc, "test")
        deploy.init(self.cfg)
        self.sent = 0

    # -- uploads
    def send(self, files: dict[str, bytes], lab: str = "labA") -> list:
        self.sent += 1
        name = f"{STUDY}-{lab}-{self.sent}"
        part = os.path.join(self.inbox, "." + name)
        for rel, data in files.items():
            p = os.path.join(part, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            with open(p, "wb") as f:
                f.write(data)
        os.rename(part, os.path.join(self.inbox, name))
        results = Ingester(self.cfg).run_once(settle_seconds=0)
        assert [r.outcome for r in results] == ["ingested"], [(r.outcome, r.reason) for r in results]
        return results

    # -- the store
    def store(self) -> Store:
        return Store(*self.cfg.study(STUDY).store_args())

    def check(self, **kw) -> fsck.Findings:
        return fsck.check(self.store(), **kw)

    def codes(self, **kw) -> set[str]:
        return {f.code for f in self.check(**kw)}

    def repair(self) -> fsck.RepairReport:
        st = self.store()
        return fsck.repair(st, fsck.check(st))

    # -- paths
    def t(self, rel: str) -> str:
        return os.path.join(self.tree, rel)

    def s(self, rel: str) -> str:
        return os.path.join(self.store_dir, rel)

    def obj(self, data: bytes) -> str:
        oid = hash_bytes(data)
        return self.s(layout.object_relpath(oid))

    def version_name(self, rel: str, n: int) -> str:
        idx = self.store().index
        v = idx.version(rel.encode(), n)
        assert v is not None
        return self.t(os.fsdecode(layout.version_relpath(v.path, v.n, v.stamp)))

    def manifest(self, seq: int) -> str:
        return self.s(layout.manifest_relpath(seq))

    def config_file(self) -> str:
        """The config as a file (for the CLI), readable by any uid."""
        cfg = os.path.join(self.root, "eidetic.yaml")
        if not os.path.exists(cfg):
            with open(cfg, "w") as f:
                yaml.safe_dump(self.cfg_doc, f)
            os.chmod(cfg, 0o644)
        return cfg

    def dump(self) -> list:
        idx = Index(self.s("index"))
        try:
            return list(idx.dump())
        finally:
            idx.close()


def _close_envs(prefix: str) -> None:
    from eidetic.store import index as index_mod

    with index_mod._envs_lock:
        paths = [p for p in index_mod._envs if p.startswith(prefix)]
        envs = [index_mod._envs.pop(p) for p in paths]
    for e in envs:
        e.close()


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    _close_envs(os.path.realpath(str(tmp_path)))


@pytest.fixture
def two(env):
    """A store after two uploads: d/a.txt changes, d/b.bin and top.txt do not."""
    env.send({"d/a.txt": b"alpha 1\n", "d/b.bin": b"\x00\x01" * 300, "top.txt": b"top\n"})
    env.send({"d/a.txt": b"alpha 2\n", "d/c.txt": b"gamma\n"})
    return env


def writable(path: str):
    os.chmod(path, 0o644)


def overwrite(path: str, data: bytes, offset: int = 0) -> None:
    """Edit a read-only file in place (through a hardlink, as a person or a disk
    would), then make it read-only again."""
    writable(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.chmod(path, 0o444)


def edit_manifest(path: str, old: bytes, new: bytes) -> None:
    os.chmod(path, 0o644)
    with open(path, "rb") as f:
        text = f.read()
    with open(path, "wb") as f:
        f.write(text.replace(old, new, 1))


def plant_orphan(env: Env, data: bytes) -> str:
    """An object no manifest refers to (what a failed upload leaves)."""
    p = env.obj(data)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    os.chmod(p, 0o444)
    return p


def crash_second_upload(env: Env, monkeypatch, cls: type, method: str) -> None:
    """Upload 1 lands; upload 2 is killed when ingest calls cls.method."""
    env.send({"a.txt": b"one\n"})

    class Killed(BaseException):
        pass

    def killed(*a, **kw):
        raise Killed()

    monkeypatch.setattr(cls, method, killed)
    part = os.path.join(env.inbox, ".s-labA-9")
    os.makedirs(part)
    with open(os.path.join(part, "b.txt"), "wb") as f:
        f.write(b"two\n")
    os.rename(part, os.path.join(env.inbox, "s-labA-9"))
    with pytest.raises(Killed):
        Ingester(env.cfg).run_once(settle_seconds=0)
    monkeypatch.undo()


def codes_of(findings) -> list[str]:
    return sorted(f.code for f in findings)


# ------------------------------------------------------------------- clean

def test_clean_store_after_two_uploads_is_clean(two):
    findings = two.check()
    assert list(findings) == []
    assert findings.stats["objects"] == 5
    assert findings.stats["hashed_bytes"] == findings.stats["object_bytes"] > 0


def test_quick_check_of_a_clean_store_is_clean_and_hashes_nothing(two):
    findings = two.check(quick=True)
    assert list(findings) == []
    assert findings.stats["hashed_bytes"] == 0


def test_empty_store_is_clean(env):
    assert list(env.check()) == []


def test_path_later_sent_as_a_folder_is_clean(env):
    env.send({"x": b"a file first\n"})
    env.send({"x/inner.txt": b"then a folder\n"})
    assert list(env.check()) == []


def test_names_cut_to_fit_255_bytes_are_accounted_for(env):
    long = "~v" * 120 + ".txt"          # escapes to 364 bytes: plain and version names are cut
    env.send({f"d/{long}": b"one\n", "d/short.txt": b"s\n"})
    env.send({f"d/{long}": b"two\n"})
    assert list(env.check()) == []


def test_large_object_is_rehashed_with_the_large_file_path(env):
    env.send({"big.bin": os.urandom(3 << 20)})
    findings = env.check()
    assert list(findings) == []
    assert findings.stats["hashed_bytes"] == 3 << 20


def test_progress_is_reported_per_phase(two):
    phases = []
    two.check(progress=lambda phase, done, total: phases.append(phase))
    assert {"manifests", "tree", "objects"} <= set(phases)


# ------------------------------------------------------------ store marker

def test_E001_missing_store_marker_is_fatal_and_stops(two):
    os.unlink(two.s(layout.STORE_MARKER))
    findings = two.check()
    assert codes_of(findings) == ["E001"]
    assert "E001" in fsck.FATAL


def test_E002_unknown_store_format_is_fatal(two):
    p = two.s(layout.STORE_MARKER)
    os.chmod(p, 0o644)
    with open(p, "w") as f:
        f.write("eidetic store\nformat: 99\nstudy: s\n")
    findings = two.check()
    assert codes_of(findings) == ["E002"]
    assert "99" in findings[0].detail


def test_E001_repair_refuses_a_directory_that_is_not_a_store(two):
    os.unlink(two.s(layout.STORE_MARKER))
    rep = two.repair()
    assert rep.cannot and not rep.done


def test_E003_missing_store_directory_is_reported_and_recreated(two):
    os.rmdir(two.s("tmp"))
    assert "E003" in two.codes()
    two.repair()
    assert os.path.isdir(two.s("tmp"))
    assert list(two.check()) == []


# --------------------------------------------------------------- manifests

def test_E010_truncated_manifest_is_unreadable(two):
    p = two.manifest(1)
    os.chmod(p, 0o644)
    with open(p, "rb+") as f:
        f.truncate(os.path.getsize(p) - 10)
    assert "E010" in two.codes()


def test_E011_edited_manifest_breaks_the_chain(two):
    edit_manifest(two.manifest(1), b'"mode":420', b'"mode":384')
    codes = two.codes()
    assert "E011" in codes
    assert "W060" in codes          # the tree is not compared against an untrustworthy chain


def test_W060_tree_is_not_compared_with_a_broken_chain(two):
    name = two.version_name("d/a.txt", 1)
    edit_manifest(two.manifest(2), b'"study":"s"', b'"study":"t"')     # the chain breaks (E018)
    os.unlink(name)                                                     # what the tree check would find
    findings = two.check()
    codes = codes_of(findings)
    assert "E018" in codes and "W060" in codes and "E030" not in codes
    assert next(f for f in findings if f.code == "W060").path == two.tree



def test_E012_removed_manifest_leaves_a_gap_in_the_chain(env):
    for i in range(3):
        env.send({f"f{i}.txt": b"%d\n" % i})
    os.unlink(env.manifest(2))
    findings = env.check()
    assert "E012" in codes_of(findings)
    gap = next(f for f in findings if f.code == "E012")
    assert gap.path.endswith("0000000002.jsonl")


def test_E013_inserted_manifest_with_another_seq_is_misnamed(two):
    shutil.copy(two.manifest(1), two.manifest(3))
    assert "E013" in two.codes()


def test_E014_foreign_file_in_manifests_is_reported_and_moved_aside(two):
    p = two.s("manifests/notes.txt")
    with open(p, "w") as f:
        f.write("mine\n")
    assert two.codes() == {"E014"}
    rep = two.repair()
    assert not os.path.exists(p)
    moved = [line for line in rep.done if "notes.txt" in line]
    assert moved and "-store/manifests/notes.txt" in moved[0]
    assert list(two.check()) == []


def test_E015_removed_last_manifest_leaves_head_pointing_past_the_end(two):
    os.unlink(two.manifest(2))
    findings = two.check()
    assert "E015" in codes_of(findings)
    rep = two.repair()
    assert any("E015" in line for line in rep.cannot)


def test_E015_edited_last_manifest_does_not_match_head(two):
    edit_manifest(two.manifest(2), b'"mode":420', b'"mode":384')
    assert "E015" in two.codes()


def _crash_at_the_commit_point(env, monkeypatch):
    """Upload 2 is killed right after its manifest is linked, before HEAD moves."""
    crash_second_upload(env, monkeypatch, Store, "set_head")


def test_W016_crash_at_the_commit_point_is_a_warning_that_ingest_finishes(env, monkeypatch):
    _crash_at_the_commit_point(env, monkeypatch)
    assert os.path.exists(env.manifest(2)) and env.store().head()[0] == 1

    findings = env.check()
    assert codes_of(findings) == ["W016"]
    assert "re-running" in findings[0].detail
    # the warning's advice works
    Ingester(env.cfg).run_once(settle_seconds=0)
    assert list(env.check()) == []


def test_E017_missing_head_is_rewritten_by_repair(two):
    os.unlink(two.s("HEAD"))
    assert two.codes() == {"E017"}
    two.repair()
    assert two.store().head()[0] == 2
    assert list(two.check()) == []


def test_E018_manifest_of_another_study_is_reported(two):
    edit_manifest(two.manifest(2), b'"study":"s"', b'"study":"t"')
    assert "E018" in two.codes()


# ----------------------------------------------------------------- objects

def test_E020_object_edited_through_a_hardlink_is_corrupt(two):
    overwrite(two.t("d/b.bin"), b"\xff")
    findings = two.check()
    assert codes_of(findings) == ["E020"]
    assert "d/b.bin v1" in findings[0].detail


def test_E020_quick_check_catches_a_size_change(two):
    name = two.t("d/b.bin")
    overwrite(name, b"more", offset=os.path.getsize(name))
    assert two.codes(quick=True) == {"E020"}


def test_E020_repair_says_it_cannot_fix_a_corrupt_object(two):
    overwrite(two.t("top.txt"), b"T")
    rep = two.repair()
    assert any("corrupt" in line and "top.txt v1" in line for line in rep.cannot)
    assert codes_of(two.check()) == ["E020"]      # still there, and nothing else


def test_E021_missing_object_is_reported(two):
    os.unlink(two.obj(b"gamma\n"))
    findings = two.check()
    assert "E021" in codes_of(findings)
    assert "d/c.txt v1" in next(f for f in findings if f.code == "E021").detail


def test_E021_repair_restores_a_missing_object_from_its_tree_name(two):
    os.unlink(two.obj(b"gamma\n"))
    rep = two.repair()
    assert any("restored missing object" in line for line in rep.done)
    assert list(two.check()) == []


def test_E021_repair_says_it_cannot_restore_an_object_no_name_holds(two):
    oid_path = two.obj(b"gamma\n")
    os.unlink(oid_path)
    os.unlink(two.t("d/c.txt"))
    os.unlink(two.version_name("d/c.txt", 1))
    rep = two.repair()
    assert any("missing" in line and "d/c.txt v1" in line for line in rep.cannot)
    left = set(codes_of(two.check()))
    assert left == {"E021", "E030"}


def test_E022_writable_object_is_reported_and_repaired(two):
    p = two.obj(b"top\n")
    os.chmod(p, 0o644)
    findings = two.check()
    assert codes_of(findings) == ["E022"]
    assert "top.txt v1" in findings[0].detail
    two.repair()
    assert stat.S_IMODE(os.stat(two.t("top.txt")).st_mode) == 0o444
    assert list(two.check()) == []


def test_E022_writable_object_is_reported_in_quick_mode_too(two):
    os.chmod(two.obj(b"top\n"), 0o664)
    assert two.codes(quick=True) == {"E022"}


def test_E023_foreign_file_under_objects_is_reported_and_moved_aside(two):
    os.makedirs(two.s("objects/zz"))
    with open(two.s("objects/zz/notes"), "w") as f:
        f.write("x")
    assert two.codes() == {"E023"}
    two.repair()
    assert not os.path.exists(two.s("objects/zz/notes"))
    assert list(two.check()) == []


def test_E023_symlink_with_an_object_name_is_foreign(two):
    data = b"not stored\n"
    p = two.obj(data)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    os.symlink("/etc/hostname", p)
    assert "E023" in two.codes()


def test_W024_orphan_object_left_by_a_failed_upload_is_a_warning(two):
    plant_orphan(two, b"half an upload\n")
    findings = two.check()
    assert codes_of(findings) == ["W024"]
    assert not findings[0].is_error


# -------------------------------------------------------------------- tree

def test_E030_removed_version_name_is_reported(two):
    os.unlink(two.version_name("d/a.txt", 1))
    findings = two.check()
    assert codes_of(findings) == ["E030"]
    assert "version 1 of d/a.txt" in findings[0].detail


def test_E030_repair_recreates_a_removed_version_name(two):
    p = two.version_name("d/a.txt", 1)
    os.unlink(p)
    two.repair()
    assert os.path.exists(p)
    assert list(two.check()) == []


def test_E030_removed_plain_name_is_reported_and_recreated(two):
    os.unlink(two.t("d/a.txt"))
    assert two.codes() == {"E030"}
    two.repair()
    with open(two.t("d/a.txt"), "rb") as f:
        assert f.read() == b"alpha 2\n"
    assert list(two.check()) == []


def test_E030_removed_directory_is_reported_name_by_name(two):
    shutil.rmtree(two.t("d"))
    findings = two.check()
    assert set(codes_of(findings)) == {"E030"}
    assert len(findings) == 7       # a.txt v1, v2, plain; b.bin v1, plain; c.txt v1, plain
    two.repair()
    assert list(two.check()) == []


def test_E031_tree_file_replaced_by_a_copy_is_reported(two):
    p = two.t("d/b.bin")
    os.unlink(p)
    with open(p, "wb") as f:
        f.write(b"\x00\x01" * 300)      # same bytes, but not the object
    findings = two.check()
    assert codes_of(findings) == ["E031"]
    assert findings[0].line().startswith("E031 tree file replaced: ")


def test_E031_repair_moves_a_replaced_tree_file_aside_and_relinks(two):
    p = two.t("top.txt")
    os.unlink(p)
    with open(p, "wb") as f:
        f.write(b"my own version\n")
    rep = two.repair()
    with open(p, "rb") as f:
        assert f.read() == b"top\n"
    with open(os.path.join(rep.lost_and_found, "top.txt"), "rb") as f:
        assert f.read() == b"my own version\n"
    assert list(two.check()) == []


def test_E032_plain_name_pointing_at_an_older_version_is_stale(two):
    p = two.t("d/a.txt")
    os.unlink(p)
    os.link(two.version_name("d/a.txt", 1), p)
    findings = two.check()
    assert codes_of(findings) == ["E032"]
    two.repair()
    with open(p, "rb") as f:
        assert f.read() == b"alpha 2\n"
    assert list(two.check()) == []


def test_E033_hand_added_file_is_reported(two):
    with open(two.t("d/extra.txt"), "w") as f:
        f.write("added by hand\n")
    findings = two.check()
    assert codes_of(findings) == ["E033"]


def test_E033_repair_moves_a_hand_added_file_to_lost_and_found(two):
    with open(two.t("d/extra.txt"), "w") as f:
        f.write("added by hand\n")
    os.makedirs(two.t("new/deeper"))
    os.symlink("/etc", two.t("link"))
    assert codes_of(two.check()) == ["E033", "E033", "E033"]
    rep = two.repair()
    lost = rep.lost_and_found
    assert lost.startswith(two.s("lost+found/"))
    with open(os.path.join(lost, "d/extra.txt")) as f:
        assert f.read() == "added by hand\n"
    assert os.path.isdir(os.path.join(lost, "new/deeper"))
    assert os.path.islink(os.path.join(lost, "link"))
    assert not os.path.exists(two.t("d/extra.txt"))
    assert list(two.check()) == []


def test_E033_file_with_a_version_name_no_version_has_is_hand_added(two):
    real = os.path.basename(two.version_name("d/a.txt", 1))
    fake = real.replace("~v0001~", "~v0007~")
    with open(two.t(f"d/{fake}"), "w") as f:
        f.write("x")
    assert two.codes() == {"E033"}


def test_E034_group_writable_tree_directory_is_reported_and_repaired(two):
    os.chmod(two.t("d"), 0o777)
    assert two.codes() == {"E034"}
    two.repair()
    assert stat.S_IMODE(os.stat(two.t("d")).st_mode) == 0o755
    assert list(two.check()) == []


def test_E035_missing_tree_is_reported_and_recreated(two):
    shutil.rmtree(two.tree)
    assert two.codes() == {"E035"}
    two.repair()
    assert list(two.check()) == []


def test_E044_interrupted_ingest_before_the_index_is_an_error_because_readers_refuse_it(env, monkeypatch):
    # No ingest holds the lock, so nothing will catch the index up by itself, and log/checkout
    # refuse an index behind HEAD: an error (E044), no longer the warning W042 it was.
    crash_second_upload(env, monkeypatch, Index, "apply_manifest")
    findings = env.check()
    assert set(codes_of(findings)) == {"E044", "W036"}
    rep = env.repair()
    assert any("caught it up" in line for line in rep.done), rep.done
    assert list(env.check()) == []


def test_W036_names_of_an_upload_the_index_has_not_applied_are_not_yet_created(env, monkeypatch):
    crash_second_upload(env, monkeypatch, Index, "apply_manifest")
    pending = [f for f in env.check() if f.code == "W036"]
    assert len(pending) == 2          # b.txt's version name and plain name
    assert all(not f.is_error and "which the index has not applied yet" in f.detail for f in pending)
    Ingester(env.cfg).run_once(settle_seconds=0)      # re-running ingest finishes it
    assert list(env.check()) == []



def test_E037_unreadable_tree_directory_is_reported(two, monkeypatch):
    real_scandir = os.scandir
    target = os.fsencode(two.t("d"))

    def scandir(path):
        if path == target:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert "E037" in two.codes()


# ------------------------------------------------------------------- index

def test_E040_index_out_of_step_with_the_manifests_is_reported(two):
    st = two.store()
    idx = st.index
    with idx.env.begin(write=True) as txn:
        txn.delete(b"\x00" * 8, db=idx.uploads)     # harmless if absent
        cur = txn.cursor(db=idx.uploads)
        cur.first()
        cur.delete()
    findings = two.check()
    assert codes_of(findings) == ["E040"]
    two.repair()
    assert list(two.check()) == []


def test_E041_missing_index_is_reported(two):
    shutil.rmtree(two.s("index"))
    findings = two.check()
    assert "E041" in codes_of(findings)
    assert not os.path.exists(two.s("index"))     # fsck did not create one


def test_E041_repair_after_deleting_the_index_rebuilds_an_identical_index(two):
    before = two.dump()
    _close_envs(os.path.realpath(two.s("index")))
    shutil.rmtree(two.s("index"))
    rep = two.repair()
    assert any("rebuilt the index" in line for line in rep.done)
    assert two.dump() == before
    assert list(two.check()) == []


def test_W042_index_behind_while_an_ingest_holds_the_lock_is_a_warning(env):
    env.send({"a.txt": b"one\n"})
    data = pathlib.Path(env.s("index/data.mdb"))
    _close_envs(os.path.realpath(env.s("index")))
    old = data.read_bytes()
    env.send({"b.txt": b"two\n"})
    env.send({"c.txt": b"three\n"})
    _close_envs(os.path.realpath(env.s("index")))
    data.write_bytes(old)                       # two manifests behind HEAD
    fd = os.open(env.s("lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)          # as an ingest catching it up would
        findings = env.check()
    finally:
        os.close(fd)
    assert codes_of(findings) == ["W042"]
    assert "applied 1 of 3 manifest(s)" in findings[0].detail
    assert codes_of(env.check()) == ["E044"]    # with no ingest to catch it up, readers refuse it


def test_E043_index_cut_short_is_damaged_and_rebuilt_by_repair(two):
    _close_envs(os.path.realpath(two.s("index")))
    os.truncate(two.s("index/data.mdb"), 100)
    findings = two.check()
    assert codes_of(findings) == ["E043"]
    assert "cut short" in findings[0].detail and "'fsck --repair' rebuilds it" in findings[0].detail
    rep = two.repair()
    assert any("rebuilt the index" in line for line in rep.done)
    assert list(two.check()) == []



# ------------------------------------------------------------------- temps

def test_W050_leftover_temp_file_in_the_store_is_a_warning_and_cleaned(two):
    with open(two.s("tmp/.~#tmp-0123456789abcdef"), "w") as f:
        f.write("half")
    with open(two.s(".~#tmp-feedfeedfeedfeed"), "w") as f:
        f.write("half a HEAD")
    findings = two.check()
    assert codes_of(findings) == ["W050", "W050"]
    two.repair()
    assert os.listdir(two.s("tmp")) == []
    assert list(two.check()) == []


def test_W051_leftover_temp_file_in_the_tree_is_a_warning_and_cleaned(two):
    p = two.t("d/.~#tmp-0123456789abcdef")
    os.link(two.t("d/a.txt"), p)
    assert two.codes() == {"W051"}
    two.repair()
    assert not os.path.exists(p)
    assert list(two.check()) == []


# ----------------------------------------------------------- the package

def test_library_does_not_import_the_cli():
    for path in pathlib.Path(fsck.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "click" not in text and "eidetic_cli" not in text and "print(" not in text, path.name


def test_every_code_has_a_test_named_after_it():
    """test_E010_..., one (or more) per code, in this module (a replica's
    codes, E070-E079, in test_fsck_replica.py)."""
    import test_fsck_replica

    tested = {name.split("_")[1] for name in [*globals(), *vars(test_fsck_replica)] if name.startswith("test_")}
    assert set(fsck.CODES) <= tested, sorted(set(fsck.CODES) - tested)


# --------------------------------------------------------------------- CLI

def run_cli(env: Env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eidetic_cli.main", "--config", env.config_file(), "fsck", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_exits_0_on_a_clean_store(two):
    r = run_cli(two)
    assert r.returncode == 0, r.stderr
    assert "fsck: clean" in r.stdout
    assert r.stderr == ""          # no progress bar when stderr is not a terminal


def test_cli_exits_1_with_one_line_per_error(two):
    os.unlink(two.version_name("d/a.txt", 1))
    r = run_cli(two, "--study", STUDY)
    assert r.returncode == 1
    lines = r.stdout.splitlines()
    assert lines[0].startswith("E030 tree name missing: " + two.tree)
    assert lines[-1].startswith("fsck: 1 error, 0 warnings")


def test_cli_exits_0_when_only_warnings(two):
    with open(two.s("tmp/.~#tmp-0123456789abcdef"), "w") as f:
        f.write("x")
    r = run_cli(two, "--quick")
    assert r.returncode == 0
    assert r.stdout.startswith("W050 ")


def test_cli_json_lists_findings(two):
    os.chmod(two.t("d"), 0o775)
    r = run_cli(two, "--json")
    assert r.returncode == 1
    data = json.loads(r.stdout)
    assert data == [{"code": "E034", "severity": "error", "path": two.t("d"), "study": STUDY,
                     "detail": data[0]["detail"]}]


def test_cli_repair_fixes_what_it_can_and_exits_0(two):
    os.unlink(two.version_name("d/a.txt", 1))
    with open(two.t("stray.txt"), "w") as f:
        f.write("x")
    r = run_cli(two, "--repair")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "moved hand-added tree entry" in r.stdout
    assert r.stdout.splitlines()[-1].startswith("fsck: clean")


def test_cli_repair_exits_1_when_something_cannot_be_repaired(two):
    overwrite(two.t("top.txt"), b"T")
    r = run_cli(two, "--repair")
    assert r.returncode == 1
    assert "NOT REPAIRED" in r.stdout and "E020 object corrupt" in r.stdout


def test_cli_unknown_study_is_a_usage_error(two):
    r = run_cli(two, "--study", "nope")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


# ------------------------------------------- re-hashing in a worker pool
#
# Big stores are re-hashed in a worker process pool while this process
# checks the chain and the tree; small ones in this process, after them.
# The same damage must give the same findings either way.

@pytest.fixture(params=["in_process", "pool"])
def rehash_in(request, monkeypatch):
    monkeypatch.setattr(fsck.objects, "POOL_MIN_SHARDS", 0 if request.param == "pool" else 10**9)
    return request.param


def test_rehash_finds_the_same_damage_in_process_or_in_the_pool(two, rehash_in):
    assert list(two.check()) == []
    name = two.t("d/b.bin")
    overwrite(name, b"\xff")                  # corrupt,
    writable(name)                            # and left writable
    os.unlink(two.obj(b"gamma\n"))             # missing
    plant_orphan(two, b"orphan\n")
    os.makedirs(two.s("objects/ee"), exist_ok=True)
    os.mkfifo(two.s("objects/ee/" + "0" * 62))   # an object name that is not a regular file
    findings = two.check()
    assert codes_of(findings) == ["E020", "E021", "E022", "E023", "W024", "W024"]   # the FIFO is no object either
    assert findings.stats["objects"] == 6


def test_E040_index_difference_is_found_with_or_without_the_pool(two, rehash_in):
    idx = two.store().index
    with idx.env.begin(write=True) as txn:
        txn.put(b"extra", b"", db=idx.upload_ids)
    findings = two.check()
    assert codes_of(findings) == ["E040"]
    assert "extra" in findings[0].detail


def test_E020_large_object_corruption_is_found_in_process_or_in_the_pool(env, rehash_in):
    data = os.urandom(2 << 20)
    env.send({"big.bin": data})
    overwrite(env.t("big.bin"), bytes([data[1 << 20] ^ 0xFF]), offset=1 << 20)   # b"\0" was a no-op 1 in 256 runs
    assert codes_of(env.check()) == ["E020"]


# ------------------------------------------------------------ repair, whole

def test_repair_of_many_kinds_of_damage_leaves_a_clean_store(two):
    os.unlink(two.version_name("d/a.txt", 1))                       # E030
    os.unlink(two.t("top.txt"))                                      # E031
    with open(two.t("top.txt"), "w") as f:
        f.write("mine")
    with open(two.t("d/added.txt"), "w") as f:                       # E033
        f.write("added")
    os.chmod(two.t("d"), 0o775)                                      # E034
    os.chmod(two.obj(b"gamma\n"), 0o644)                             # E022
    os.makedirs(two.s("objects/zz"))
    with open(two.s("objects/zz/junk"), "w") as f:                   # E023
        f.write("junk")
    with open(two.s("tmp/.~#tmp-0000000000000000"), "w") as f:      # W050
        f.write("")
    _close_envs(os.path.realpath(two.s("index")))
    shutil.rmtree(two.s("index"))                                    # E041
    before = set(codes_of(two.check()))
    assert before == {"E030", "E031", "E033", "E034", "E022", "E023", "W050", "E041"}
    rep = two.repair()
    assert rep.cannot == []
    assert list(two.check()) == []
    lost = rep.lost_and_found
    with open(os.path.join(lost, "top.txt")) as f:
        assert f.read() == "mine"
    assert os.path.exists(os.path.join(lost, "d/added.txt"))
    moved = [line for line in rep.done if "objects/zz/junk" in line]
    assert moved and os.path.exists(moved[0].rsplit(" to ", 1)[1])


def test_repair_leaves_index_and_tree_alone_when_the_chain_is_broken(env):
    for i in range(3):
        env.send({f"f{i}.txt": b"%d\n" % i})
    os.unlink(env.manifest(2))
    before = env.dump()
    rep = env.repair()
    assert any("left as they are" in line for line in rep.cannot)
    assert env.dump() == before
    assert os.path.exists(env.t("f1.txt"))


def test_W016_repair_after_a_crash_at_the_commit_point_advances_head(env, monkeypatch):
    _crash_at_the_commit_point(env, monkeypatch)
    rep = env.repair()
    assert any("advanced HEAD to manifest 2" in line for line in rep.done)
    assert list(env.check()) == []
    with open(env.t("b.txt"), "rb") as f:
        assert f.read() == b"two\n"
    results = Ingester(env.cfg).run_once(settle_seconds=0)     # the inbox entry is still finished
    assert [r.outcome for r in results] == ["ingested"]
    assert list(env.check()) == []


def test_W024_repair_notes_orphans_it_leaves_in_place(two):
    p = plant_orphan(two, b"half an upload\n")
    rep = two.repair()
    assert rep.cannot == [] and any("orphan" in n for n in rep.notes)
    assert os.path.exists(p)


def test_E015_head_naming_no_manifest_is_reported(two):
    p = two.s("HEAD")
    with open(p, "w") as f:
        f.write("0 " + "0" * 64 + "\n")
    assert "E015" in two.codes()


@pytest.mark.parametrize("damage", ["removed", "added", "replaced", "stale", "temp", "dir_mode"])
def test_tree_damage_is_found_the_same_with_or_without_the_pool(two, rehash_in, damage):
    if damage == "removed":
        os.unlink(two.version_name("d/a.txt", 1))
        want = ["E030"]
    elif damage == "added":
        os.makedirs(two.t("d/new"))
        want = ["E033"]
    elif damage == "replaced":
        os.unlink(two.t("top.txt"))
        os.symlink("/etc/hostname", two.t("top.txt"))
        want = ["E031"]
    elif damage == "stale":
        os.unlink(two.t("d/a.txt"))
        os.link(two.version_name("d/a.txt", 1), two.t("d/a.txt"))
        want = ["E032"]
    elif damage == "temp":
        with open(two.t(".~#tmp-0011223344556677"), "w") as f:
            f.write("")
        want = ["W051"]
    else:
        os.chmod(two.t("d"), 0o757)
        want = ["E034"]
    for quick in (False, True):
        findings = two.check(quick=quick)
        assert codes_of(findings) == want, (quick, findings)
        assert findings.stats["tree_entries"] > 0
    two.repair()
    assert list(two.check()) == []


def test_a_pass_that_fails_stops_the_pool_and_its_error_is_raised(two, monkeypatch):
    monkeypatch.setattr(fsck.objects, "POOL_MIN_SHARDS", 0)

    def fails(self):
        raise RuntimeError("the tree pass failed")

    monkeypatch.setattr(fsck.tree.TreeScan, "run", fails)
    with pytest.raises(RuntimeError, match="the tree pass failed"):
        two.check()
    assert multiprocessing.active_children() == []      # the workers were stopped and reaped


def test_tree_is_checked_against_the_rebuild_when_the_live_index_differs(two, rehash_in):
    os.unlink(two.version_name("d/a.txt", 1))
    idx = two.store().index
    with idx.env.begin(write=True) as txn:       # the live index forgets d/c.txt: it must not be trusted
        cur = txn.cursor(db=idx.versions)
        assert cur.set_range(b"d/c.txt")
        cur.delete()
    for quick in (False, True):
        assert codes_of(two.check(quick=quick)) == ["E030", "E040"]


# ------------------------------------------------------ as another user

def test_fsck_by_a_user_who_cannot_read_the_store_is_refused_naming_who_can_never_a_finding(world_tmp,
                                                                                           nonroot_venv):
    env = Env(world_tmp)
    env.send({"a.txt": b"one\n"})
    assert stat.S_IMODE(os.stat(env.store_dir).st_mode) == 0o2750    # the store's group reads, no one else
    r = run_as(DAEMON_UID + 7, [str(nonroot_venv / "bin" / "eidetic"), "--config", env.config_file(), "fsck"])
    assert (r.returncode, r.stdout) == (3, "")            # the environment stops us: not E002, not E001
    assert r.stderr.startswith(f"eidetic: 'eidetic fsck' needs the service user's access to study {STUDY} ")
    assert "run it as root, e.g. 'sudo eidetic --config " in r.stderr and r.stderr.count("\n") == 1


def test_fsck_by_an_auditor_who_may_only_read_the_store_is_refused_naming_who_can(world_tmp, nonroot_venv):
    """Read access alone is not enough: without the index's lock file the
    check could not pin the index while an ingest goes on beside it."""
    env = Env(world_tmp)
    env.send({"a.txt": b"one\n"})
    subprocess.run(["chmod", "-R", "a+rX", env.store_dir, env.tree], check=True)      # an auditor's view
    r = run_as(DAEMON_UID + 7, [str(nonroot_venv / "bin" / "eidetic"), "--config", env.config_file(), "fsck"])
    assert (r.returncode, r.stdout) == (3, "")
    assert "lock.mdb" in r.stderr and "run it as root" in r.stderr and "Traceback" not in r.stderr
    # What it says to do, done (as root, who may): the check runs, and the store is clean.
    r = subprocess.run([str(nonroot_venv / "bin" / "eidetic"), "--config", env.config_file(), "fsck"],
                       capture_output=True, text=True, env=clean_env())
    assert r.returncode == 0 and r.stdout.startswith("fsck: clean"), r.stdout + r.stderr
