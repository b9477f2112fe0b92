"""The Index queries fsck asks (so that fsck never reads LMDB itself):
which versions use an object, which manifest first referred to it, the
applied counter of a private rebuild, and a pinned snapshot compared with
another index."""

from __future__ import annotations

from test_index import Manifests, fast_tmp, frec, oid, open_index  # noqa: F401 (fixtures)


def _index_of(fast_tmp, open_index, name: str = "index"):
    m = Manifests(fast_tmp / name)
    m.add([frec(b"a.txt", "one"), frec(b"d/b.txt", "one"), frec(b"c.txt", "two")])
    m.add([frec(b"a.txt", "three"), frec(b"c.txt", "two")])
    idx = open_index(name)
    for p in m.paths:
        idx.apply_manifest(p)
    return idx, m


def test_users_of_names_every_version_using_an_object_up_to_a_limit(fast_tmp, open_index):
    idx, _ = _index_of(fast_tmp, open_index)
    users, total = idx.users_of([oid("one")], 10)[oid("one")]
    assert total == 2 and sorted((v.path, v.n) for v in users) == [(b"a.txt", 1), (b"d/b.txt", 1)]
    users, total = idx.users_of([oid("one")], 1)[oid("one")]
    assert total == 2 and len(users) == 1
    assert idx.users_of([oid("nobody has this")], 10) == {}
    assert set(idx.users_of([oid("one"), oid("two"), oid("nobody has this")], 10)) == {oid("one"), oid("two")}


def test_first_seq_is_the_manifest_that_first_referred_to_an_object(fast_tmp, open_index):
    idx, _ = _index_of(fast_tmp, open_index)
    assert idx.first_seq(oid("two")) == 1           # sent again in manifest 2: still 1
    assert idx.first_seq(oid("three")) == 2
    assert idx.first_seq(oid("nobody has this")) is None


def test_force_applied_lets_a_rebuild_go_on_past_a_missing_manifest(fast_tmp, open_index):
    m = Manifests(fast_tmp / "m")
    m.add([frec(b"a.txt", "one")])
    m.add([frec(b"a.txt", "two")])
    m.add([frec(b"a.txt", "three")])
    idx = open_index()
    idx.apply_manifest(m.paths[0])
    idx.force_applied(2)                              # manifest 2 is lost
    idx.apply_manifest(m.paths[2])
    assert idx.applied()[0] == 3
    assert [v.n for v in idx.versions_of(b"a.txt")] == [1, 2]


def test_a_snapshot_keeps_what_it_saw_and_compares_with_another_index(fast_tmp, open_index):
    idx, m = _index_of(fast_tmp, open_index, "one")
    twin = open_index("two")
    twin.apply_manifest(m.paths[0])
    snap, early = idx.snapshot(), twin.snapshot()
    try:
        twin.apply_manifest(m.paths[1])               # after the snapshot was taken
        assert early.state().applied == 1 and twin.applied()[0] == 2
        assert not snap.same_as(early)
        later = twin.snapshot()
        assert snap.same_as(later) and list(snap.dump()) == list(later.dump())
        later.close()
    finally:
        early.close()
        snap.close()
        snap.close()                                  # closing twice is harmless
