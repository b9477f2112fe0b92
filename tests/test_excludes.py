"""Default and added excludes: pure matching rules (no files needed)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from eidetic.client.excludes import DEFAULT_EXCLUDES, Excludes, check_pattern

NAMES = st.binary(min_size=1, max_size=40).filter(lambda b: b"/" not in b and b not in (b".", b".."))


def test_os_and_editor_droppings_are_left_out_by_default():
    ex = Excludes()
    for rel in (b"Thumbs.db", b"eprime/Thumbs.db", b"desktop.ini", b"a/.DS_Store", b"._s01.txt",
                b"~$report.docx", b"$RECYCLE.BIN", b"System Volume Information", b".Trash-1000",
                b"deep/er/._x"):
        assert ex.excluded(rel), rel


def test_the_defaults_ignore_letter_case_as_windows_does():
    ex = Excludes()
    assert ex.excluded(b"thumbs.db") and ex.excluded(b"DESKTOP.INI") and ex.excluded(b"$Recycle.Bin")


def test_data_files_are_not_left_out():
    ex = Excludes()
    for rel in (b"eprime/s01.txt", b"Thumbs.db.csv", b"my desktop.ini notes.txt", b"a~$b", b"Trash-1000",
                b"biopac/run_1.acq", b"\xff\xfe.bin"):
        assert not ex.excluded(rel), rel


def test_no_default_excludes_sends_the_droppings_too():
    ex = Excludes(defaults=False)
    assert not ex.excluded(b"Thumbs.db") and not ex.excluded(b".DS_Store")
    assert ex.all_patterns() == ()


def test_an_added_pattern_matches_a_name_at_any_depth():
    ex = Excludes(("*.tmp",))
    assert ex.excluded(b"a.tmp") and ex.excluded(b"eprime/s/a.tmp")
    assert not ex.excluded(b"a.tmpx") and not ex.excluded(b"a.TMP")   # exactly as typed


def test_a_pattern_with_a_slash_matches_the_whole_path():
    ex = Excludes(("eprime/pilot*",), defaults=False)
    assert ex.excluded(b"eprime/pilot") and ex.excluded(b"eprime/pilot2")
    assert not ex.excluded(b"pilot") and not ex.excluded(b"biopac/eprime/pilot")


def test_added_patterns_come_after_the_defaults():
    assert Excludes(("*.tmp",)).all_patterns() == DEFAULT_EXCLUDES + ("*.tmp",)


def test_empty_patterns_are_refused_with_a_reason():
    assert check_pattern("") and check_pattern("/") and check_pattern("a\0b")
    assert check_pattern("*.tmp") is None


@given(NAMES)
def test_star_matches_every_name_even_one_that_is_not_utf8(name):
    assert Excludes(("*",), defaults=False).excluded(name)
    assert Excludes(("*",), defaults=False).excluded(b"dir/" + name)


@given(NAMES)
def test_no_patterns_and_no_defaults_exclude_nothing(name):
    assert not Excludes((), defaults=False).excluded(name)


@given(NAMES, NAMES)
def test_a_literal_name_pattern_matches_only_that_name(a, b):
    text = a.decode("utf-8", "surrogateescape")
    if any(c in text for c in "*?[]"):
        return
    ex = Excludes((text,), defaults=False)
    assert ex.excluded(a) and ex.excluded(b + b"/" + a)
    assert ex.excluded(b) == (a == b)
