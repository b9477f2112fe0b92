"""fsck's code table (eidetic/fsck/codes.py) and the one in store_format.md,
section "fsck findings": the document is the contract other programs read,
so the two must say the same."""

from __future__ import annotations

import pathlib
import re

import pytest

from eidetic import fsck
from eidetic.fsck.codes import CODES

STORE_FORMAT = pathlib.Path(__file__).resolve().parent.parent / "store_format.md"


def doc_table() -> dict[str, tuple[str, str]]:
    """code -> (finding, meaning) from the Markdown table of section 12, with
    inline code (`x`) written as the code's strings write it ('x')."""
    text = STORE_FORMAT.read_text()
    section = text[text.index("## 12. fsck findings"):]
    section = section[:section.index("\n## ", 1)]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        m = re.fullmatch(r"\| `([EW]\d{3})` \| (.+?) \| (.+) \|", line.strip())
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} twice in store_format.md"
            rows[m.group(1)] = (m.group(2), re.sub(r"`([^`]*)`", r"'\1'", m.group(3)))
    return rows


def code_table() -> dict[str, tuple[str, str]]:
    return {code: tuple(text.split(": ", 1)) for code, text in CODES.items()}


def test_the_parser_reads_the_whole_table():
    rows = doc_table()
    assert len(rows) >= 30 and "E001" in rows and "W060" in rows
    assert rows["E044"][1].endswith("readers refuse it until ingest or 'fsck --repair' catches it up")


def test_every_code_is_documented_with_a_title_and_a_meaning():
    for code, meaning in fsck.CODES.items():
        assert code[0] in "EW" and code[1:].isdigit() and len(code) == 4
        title, _, rest = meaning.partition(": ")
        assert title and rest, code
    assert fsck.CHAIN_BROKEN <= set(fsck.CODES)


def test_every_code_is_in_the_table_of_store_format_md():
    text = STORE_FORMAT.read_text()
    for code, meaning in fsck.CODES.items():
        assert f"| `{code}` | {meaning.split(': ', 1)[0]} |" in text, code


def test_store_format_md_has_the_same_codes_with_the_same_titles():
    doc, code = doc_table(), code_table()
    assert sorted(doc) == sorted(code)
    assert {c: t for c, (t, _) in doc.items()} == {c: t for c, (t, _) in code.items()}


def test_store_format_md_has_the_same_meanings():
    doc, code = doc_table(), code_table()
    differ = {c: (doc[c][1], code[c][1]) for c in code if c in doc and doc[c][1] != code[c][1]}
    assert differ == {}
