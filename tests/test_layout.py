"""The pure naming rules of eidetic/layout.py (store_format.md sections 4, 7, 9).

Property tests: the tree mapping is injective, round-trips, keeps plain and
version names apart and never produces a name that escapes its directory.
"""

from __future__ import annotations

import re
import string
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from eidetic.core import fsutil, layout


EMPTY_ID = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
NAME_MAX = 255

# ------------------------------------------------------------- strategies

# Bytes and fragments that matter to the rule: the escape characters, digits
# (a version marker), dots and extensions, newlines (regex anchors), stray
# UTF-8 continuation/lead bytes and multi-byte characters (cutting).
_TOKENS = [b"~", b"v", b"-", b"#", b".", b"0", b"1", b"9", b"a", b"Z", b"T", b"_", b" ",
           b"\n", b"\r", b"\x80", b"\xbf", b"\xc3", b"\xe2\x82", b"\xff", "é".encode(),
           "€".encode(), "𝄞".encode(), b"~v", b"~-", b"~#", b"~v0001~", b".txt", b".tar",
           b"20260101T000000Z", b"..", b".~#tmp-", b"\n", b".md", b"x.y\n"]


def _valid(u: bytes) -> bool:
    return 1 <= len(u) <= NAME_MAX and b"/" not in u and b"\0" not in u and u not in (b".", b"..")


_short = st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=24).map(b"".join)
_long = st.builds(
    lambda head, fill, n, tail: (head + fill * n + tail)[:NAME_MAX],
    _short, st.sampled_from([b"a", b"~", b"~v", b"~-", b"\x80", "é".encode(), "€".encode(), b"x.y"]),
    st.integers(60, 255), _short)
_arbitrary = st.binary(min_size=1, max_size=NAME_MAX)

components = st.one_of(_short, _long, _arbitrary).filter(_valid)
versions = st.integers(1, 20000)


@st.composite
def stamps(draw) -> str:
    dt = draw(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2999, 12, 31),
                           timezones=st.just(timezone.utc)))
    return layout.compact_stamp(layout.utc_iso(dt))


relpaths = st.lists(components, min_size=1, max_size=6).map(b"/".join)
HEX = re.compile(rb"~#[0-9a-f]{32}")


def _is_cut(name: bytes) -> bool:
    return b"~#" in name


def _check_safe_name(name: bytes) -> None:
    assert 1 <= len(name) <= NAME_MAX, (name, len(name))
    assert b"/" not in name and b"\0" not in name
    assert name not in (b".", b"..")
    assert not name.startswith(fsutil.TEMP_PREFIX.encode())
    # "~#" appears only before the 32 hex digits of a name hash (temp names use "~#t")
    assert len(re.findall(rb"~#", name)) == len(HEX.findall(name)), name


# ------------------------------------------------------------ plain names

@given(components)
def test_plain_name_round_trips_unless_cut(u):
    p = layout.plain_name(u)
    back = layout.unplain_name(p)
    if back is None:
        assert _is_cut(p)
        assert len(u.replace(b"~", b"~-")) > NAME_MAX  # only an over-long escaped form is cut
    else:
        assert back == u


@given(st.lists(components, min_size=2, max_size=25, unique=True))
def test_plain_name_is_injective(us):
    names = [layout.plain_name(u) for u in us]
    assert len(set(names)) == len(names)


@given(components, components)
def test_plain_name_is_injective_pairwise(u1, u2):
    assume(u1 != u2)
    assert layout.plain_name(u1) != layout.plain_name(u2)


@pytest.mark.parametrize("u1, u2", [
    (b"a~v", b"a~-v"), (b"a~", b"a~-"), (b"~-", b"~--"), (b"a~#b", b"a~-#b"),
    (b"x~", b"x~-"), (b"s1.txt", b"s1~-.txt"),
    (b"~v" + b"a" * 253, b"~v" + b"a" * 252 + b"b"),     # both cut: differ only past the cut
    (b"~v" + b"\x80" * 253, b"~v" + b"\x80" * 252 + b"\x81"),
])
def test_plain_name_keeps_near_identical_names_apart(u1, u2):
    assert layout.plain_name(u1) != layout.plain_name(u2)


@given(components)
def test_plain_names_never_contain_a_version_marker(u):
    p = layout.plain_name(u)
    assert re.search(rb"~v[0-9]", p) is None
    assert layout.parse_version_name(p) is None
    assert not layout.is_version_name(p)


@given(components)
def test_plain_names_are_safe_directory_entries(u):
    _check_safe_name(layout.plain_name(u))


def test_plain_name_leaves_ordinary_names_alone():
    for u in (b"s1.txt", b"a~b", b"x~", "résumé.pdf".encode(), b"\xff\xfe", b"...", b".hidden"):
        assert layout.plain_name(u) == u


def test_plain_name_escapes_a_name_that_looks_like_a_version():
    assert layout.plain_name(b"s1~v0001~20261121T204455Z.txt") == b"s1~-v0001~-20261121T204455Z.txt"


@pytest.mark.parametrize("bad", [b"", b".", b"..", b"a/b", b"a\0b", b"x" * 256])
def test_plain_name_rejects_invalid_components(bad):
    with pytest.raises(ValueError):
        layout.plain_name(bad)


# ---------------------------------------------------------- version names

@given(components, versions, stamps())
def test_version_name_parses_back(u, n, stamp):
    v = layout.version_name(u, n, stamp)
    parsed = layout.parse_version_name(v)
    assert parsed is not None
    orig, pn, pstamp = parsed
    assert (pn, pstamp) == (n, stamp)
    if orig is None:
        assert _is_cut(v)
    else:
        assert orig == u
    # cut exactly when the plain name is cut or the versioned name would not fit
    p = layout.plain_name(u)
    marker_len = len(b"~v%04d~" % n) + len(stamp)
    assert (orig is None) == (layout.unplain_name(p) is None or len(p) + marker_len > NAME_MAX)


@given(components, components, versions, stamps())
def test_plain_names_never_collide_with_version_names(u1, u2, n, stamp):
    assert layout.plain_name(u1) != layout.version_name(u2, n, stamp)


@given(st.lists(components, min_size=1, max_size=25, unique=True), stamps())
def test_version_names_are_injective_over_name_and_number(us, stamp):
    names = [layout.version_name(u, n, stamp) for u in us for n in (1, 2, 10, 9999, 10000)]
    assert len(set(names)) == len(names)
    plains = {layout.plain_name(u) for u in us}
    assert plains.isdisjoint(names)


@given(components, components, versions, versions, stamps())
def test_version_names_are_injective_pairwise(u1, u2, n1, n2, stamp):
    assume((u1, n1) != (u2, n2))
    assert layout.version_name(u1, n1, stamp) != layout.version_name(u2, n2, stamp)


@given(components, versions, stamps())
def test_version_names_are_safe_directory_entries(u, n, stamp):
    _check_safe_name(layout.version_name(u, n, stamp))


@given(components, versions, stamps())
def test_version_names_keep_the_extension_last(u, n, stamp):
    _, ext = layout.split_ext(layout.plain_name(u))
    v = layout.version_name(u, n, stamp)
    assert v.endswith(ext)
    assert layout.split_ext(v)[1] == ext


def test_version_name_of_a_text_file_keeps_txt():
    v = layout.version_name(b"s1.txt", 1, "20261121T204455Z")
    assert v == b"s1~v0001~20261121T204455Z.txt"
    assert v.endswith(b".txt")
    assert layout.version_name(b"archive.tar.gz", 2, "20261121T204455Z") == \
        b"archive.tar~v0002~20261121T204455Z.gz"
    assert layout.version_name(b".bashrc", 1, "20261121T204455Z") == b".bashrc~v0001~20261121T204455Z"


def test_version_name_of_an_escaped_name_matches_the_documented_example():
    u = b"s1~v0001~20261121T204455Z.txt"
    v = layout.version_name(u, 1, "20261122T090000Z")
    assert v == b"s1~-v0001~-20261121T204455Z~v0001~20261122T090000Z.txt"
    assert layout.parse_version_name(v) == (u, 1, "20261122T090000Z")


@pytest.mark.parametrize("u", [b"a.txt\n", b"a.txt\r", b"x\n", b"\n", b"b.dat\n\n"])
def test_a_trailing_newline_is_part_of_the_name_not_after_the_extension(u):
    stamp = "20261121T204455Z"
    stripped = u.rstrip(b"\r\n") or b"z"
    assert layout.version_name(u, 1, stamp) != layout.version_name(stripped, 1, stamp)
    assert layout.parse_version_name(layout.version_name(u, 1, stamp)) == (u, 1, stamp)


@given(components, st.lists(st.integers(1, 10**6), min_size=12, max_size=12))
def test_version_names_sort_chronologically(u, gaps):
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    names = []
    for n, gap in enumerate(gaps, start=1):
        t += timedelta(seconds=gap)
        names.append(layout.version_name(u, n, layout.compact_stamp(layout.utc_iso(t))))
    assert sorted(names) == names


@given(components, st.integers(1, 9999), st.integers(1, 9999), stamps())
def test_version_names_sort_by_number_below_10000(u, n1, n2, stamp):
    assume(n1 != n2)
    a, b = layout.version_name(u, n1, stamp), layout.version_name(u, n2, stamp)
    assert (a < b) == (n1 < n2)


def test_version_numbers_start_at_one():
    with pytest.raises(ValueError):
        layout.version_name(b"a", 0, "20261121T204455Z")


# ----------------------------------------------------------- paths

@given(relpaths)
def test_tree_relpath_never_escapes(path):
    t = layout.tree_relpath(path)
    parts = t.split(b"/")
    assert len(parts) == len(path.split(b"/"))
    for part in parts:
        _check_safe_name(part)
    layout.check_relpath(t)


@given(relpaths, versions, stamps())
def test_version_relpath_never_escapes(path, n, stamp):
    v = layout.version_relpath(path, n, stamp)
    parts = v.split(b"/")
    assert len(parts) == len(path.split(b"/"))
    for part in parts:
        _check_safe_name(part)
    head, _, name = path.rpartition(b"/")
    assert parts[:-1] == (layout.tree_relpath(head).split(b"/") if head else [])
    assert parts[-1] == layout.version_name(name, n, stamp)


@given(relpaths, versions, stamps())
def test_may_be_cut_is_true_whenever_a_name_of_the_path_is_cut(path, n, stamp):
    if layout.may_be_cut(path):
        return
    for c in path.split(b"/"):
        assert layout.unplain_name(layout.plain_name(c)) == c
    assert layout.parse_version_name(layout.version_relpath(path, n, stamp).rpartition(b"/")[2])[0] == \
        path.rpartition(b"/")[2]


@settings(max_examples=100)
@given(st.lists(relpaths, min_size=2, max_size=12, unique=True))
def test_tree_relpath_is_injective(paths):
    mapped = [layout.tree_relpath(p) for p in paths]
    assert len(set(mapped)) == len(mapped)


@pytest.mark.parametrize("bad", [b"", b"/a", b"a/", b"a//b", b"a/../b", b"../a", b"./a", b"a/\0"])
def test_tree_relpath_rejects_unsafe_paths(bad):
    with pytest.raises(ValueError):
        layout.check_relpath(bad)
    with pytest.raises(ValueError):
        layout.tree_relpath(bad)


# ------------------------------------------------------------ entry names

STUDIES = frozenset({"foo", "bar_2"})


@pytest.mark.parametrize("name, expected", [
    (b"foo-labA-1", ("foo", "labA")),
    (b"foo-labA", ("foo", "labA")),
    (b"foo-labA-1-2-3", ("foo", "labA")),
    (b"bar_2-scanner-x", ("bar_2", "scanner")),
    (b"foo-", ("foo", "unknown")),
    (b"foo--x", ("foo", "unknown")),
    (b"baz-labA-1", None),
    (b"foo", None),
    (b"fo-labA-1", None),
    (b"foox-labA-1", None),
    (b"\xff-labA", None),
])
def test_shared_inbox_maps_entry_names_to_studies(name, expected):
    assert layout.parse_entry_name(name, STUDIES) == expected


@pytest.mark.parametrize("name, expected", [
    (b"foo-labA-1", ("foo", "labA")),       # leading "<study>-" is dropped
    (b"labA-1", ("foo", "labA")),
    (b"anything", ("foo", "anything")),
    (b"baz-labA-1", ("foo", "baz")),        # another study's prefix is just a location here
])
def test_study_inbox_maps_every_entry_to_its_study(name, expected):
    assert layout.parse_entry_name(name, STUDIES, inbox_study="foo") == expected


@given(st.binary(min_size=1, max_size=NAME_MAX))
def test_study_inbox_never_refuses_an_entry(name):
    study, loc = layout.parse_entry_name(name, STUDIES, inbox_study="foo")
    assert study == "foo" and loc


@pytest.mark.parametrize("state", layout.INBOX_STATES)
@given(original=st.binary(min_size=1, max_size=NAME_MAX).filter(_valid))
def test_inbox_state_names_fit_for_the_longest_originals(state, original):
    upload = "20261121T204455Z-0b0956ef"
    name = layout.inbox_state_name(state, upload, original)
    assert len(name) <= NAME_MAX
    assert layout.is_reserved_inbox_name(name)
    assert name.startswith(b".eidetic~" + state.encode() + b"~" + upload.encode() + b"~")
    assert b"/" not in name and b"\0" not in name


def test_inbox_state_name_keeps_a_short_original_whole():
    assert layout.inbox_state_name("done", "20261121T204455Z-0b0956ef", b"foo-labA-1") == \
        b".eidetic~done~20261121T204455Z-0b0956ef~foo-labA-1"
    with pytest.raises(ValueError):
        layout.inbox_state_name("eaten", "20261121T204455Z-0b0956ef", b"x")


# ------------------------------------------------------------------ objects

def test_empty_file_object_path_matches_the_worked_example():
    assert layout.object_relpath(EMPTY_ID) == \
        "objects/af/1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert layout.object_relpath(EMPTY_ID, 2) == \
        "objects/af/1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262.2"


@pytest.mark.parametrize("bad", [
    "", "af", EMPTY_ID[:-1], EMPTY_ID + "0", EMPTY_ID.upper(), "g" * 64, EMPTY_ID + "\n",
    "\n" + EMPTY_ID[1:], "../" + EMPTY_ID[3:], EMPTY_ID[:62] + "/x", " " + EMPTY_ID[1:],
])
def test_object_relpath_rejects_invalid_ids(bad):
    assert not layout.valid_object_id(bad)
    with pytest.raises(ValueError):
        layout.object_relpath(bad)


oids = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)


@given(oids, st.integers(0, 10**6))
def test_parse_object_relpath_inverts_object_relpath(oid, twin):
    rel = layout.object_relpath(oid, twin)
    _, shard, name = rel.split("/")
    assert layout.parse_object_relpath(shard, name) == (oid, twin)


@pytest.mark.parametrize("shard, name", [
    ("af", "1349"), ("AF", EMPTY_ID[2:].upper()), ("a", EMPTY_ID[1:]), ("af", EMPTY_ID[2:] + ".0"),
    ("af", EMPTY_ID[2:] + ".01"), ("af", EMPTY_ID[2:] + ".x"), ("af", EMPTY_ID[2:] + ".-1"),
    ("af", EMPTY_ID[2:] + "\n"), ("af", ".~#tmp-0123456789abcdef"), ("af", EMPTY_ID[2:] + ".1.2"),
])
def test_parse_object_relpath_refuses_foreign_names(shard, name):
    assert layout.parse_object_relpath(shard, name) is None


# ------------------------------------------------------------- other names

@given(st.integers(1, 10**10 - 1))
def test_manifest_names_round_trip(seq):
    rel = layout.manifest_relpath(seq)
    assert layout.parse_manifest_name(rel.split("/")[1]) == seq


@pytest.mark.parametrize("name", ["0000000000.jsonl", "1.jsonl", "0000000001.jsonl\n",
                                  "0000000001.json", ".~#tmp-0000000001.jsonl"])
def test_parse_manifest_name_refuses_foreign_names(name):
    assert layout.parse_manifest_name(name) is None


@pytest.mark.parametrize("name, ok", [("foo", True), ("bar_2", True), ("A1", True), ("a-b", False),
                                      ("_x", False), ("", False), ("foo\n", False), ("fé", False)])
def test_study_names_cannot_hold_a_dash(name, ok):
    assert bool(layout.STUDY_NAME_RE.match(name)) is ok


@given(st.datetimes(timezones=st.just(timezone.utc), min_value=datetime(1970, 1, 1)))
def test_received_times_round_trip(dt):
    text = layout.utc_iso(dt)
    assert layout.parse_utc_iso(text) == dt
    stamp = layout.compact_stamp(text)
    assert re.fullmatch(r"[0-9]{8}T[0-9]{6}Z", stamp)
    assert stamp == dt.strftime("%Y%m%dT%H%M%SZ")


def test_display_shows_undecodable_bytes_escaped():
    assert layout.display(b"a\xffb") == "a\\xffb"
    assert set(string.printable) >= set(layout.display(bytes(range(0x80, 0x100))))
