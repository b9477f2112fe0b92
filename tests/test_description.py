"""Upload descriptions (eidetic/description.py, store_format.md section 10):
exact round trips of any byte-string paths in walk order, and a reader
that refuses every malformed description with a DescriptionError naming
the line."""

from __future__ import annotations

import io
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eidetic.core import layout
from eidetic.core.description import (DESCRIPTION_NAME, MAX_LINE, DescribedFile, DescriptionError,
                                 DescriptionHeader, DescriptionReader, DescriptionWriter, open_description,
                                 walk_key)
from eidetic.core.hashing import hash_bytes


REPO = Path(__file__).resolve().parent.parent
EMPTY_ID = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"

# ------------------------------------------------------------- strategies

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_TOKENS = [b"a", b"Z", b"0", b".", b"-", b"~", b" ", b"\n", b"\t", b"\\", b'"', b"\x7f",
           b"\x80", b"\xff", b"\xc3\xa9", b"\xed\xa0\x80", "𝄞".encode(), b"...", b".eidetic-description.jsonl"]
_component = st.one_of(
    st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=8).map(b"".join),
    st.binary(min_size=1, max_size=30),
).filter(lambda c: b"/" not in c and b"\0" not in c and c not in (b".", b"..") and len(c) <= 255)
paths = st.lists(_component, min_size=1, max_size=4).map(b"/".join).filter(lambda p: p != DESCRIPTION_NAME)


def _iso(draw) -> str:
    d = draw(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2999, 1, 1)))
    return layout.utc_iso(d.replace(tzinfo=timezone.utc))


@st.composite
def headers(draw) -> DescriptionHeader:
    return DescriptionHeader(client=draw(st.text()), study=draw(st.text()), location=draw(st.text()),
                             user=draw(st.text()), host=draw(st.text()), platform=draw(st.text()),
                             started=_iso(draw), source=draw(st.text()))


@st.composite
def file_lists(draw, min_size: int = 0) -> list[DescribedFile]:
    ps = draw(st.lists(paths, min_size=min_size, max_size=12, unique=True))
    ps.sort(key=walk_key)
    return [DescribedFile(p, draw(st.integers(0, 2**63)), draw(st.integers(-2**63, 2**64)), draw(hex64))
            for p in ps]


def header(**kw) -> DescriptionHeader:
    d = dict(client="eidetic 0.2.0", study="demo", location="labA", user="jdoe", host="LAB-PC-3",
             platform="Windows-10-10.0.19045-SP0", started="2026-11-21T20:50:41.250113Z",
             source="C:\\Data\\demo")
    d.update(kw)
    return DescriptionHeader(**d)


def write(h: DescriptionHeader, files: list[DescribedFile], ended: str = "2026-11-21T20:50:42.017730Z") -> bytes:
    buf = io.BytesIO()
    w = DescriptionWriter(buf, h)
    for f in files:
        w.add(f)
    w.finish(ended)
    return buf.getvalue()


def read(data: bytes) -> tuple[DescriptionReader, list[DescribedFile]]:
    r = DescriptionReader(io.BytesIO(data))
    return r, list(r.files())


def expect_error(data: bytes, line: int | None = None) -> DescriptionError:
    with pytest.raises(DescriptionError) as ei:
        read(data)
    if line is not None:
        assert re.search(rf"\bline {line}\b", str(ei.value)), str(ei.value)
    return ei.value


SAMPLE_FILES = [
    DescribedFile(b"eprime/s1.txt", 15, 1795294252314360189,
                  "87fb713f52c863d15f6d2a7edf5b8f6063ec8c8ce61ea736551181973293fe08"),
    DescribedFile(b"raw/\xffdata", 0, 1795294252309245688, EMPTY_ID),
    DescribedFile(b"zz", 7, 1, "11" * 32),
]


def sample() -> bytes:
    return write(header(), SAMPLE_FILES)


def lines(data: bytes) -> list[bytes]:
    return data.splitlines(keepends=True)


# -------------------------------------------------------------- round trips

@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(headers(), file_lists())
def test_any_description_round_trips_exactly(h, files):
    data = write(h, files)
    r, got = read(data)
    assert r.header == h and got == files
    assert r.trailer is not None and (r.trailer.files, r.trailer.bytes) == (len(files), sum(f.size for f in files))
    assert data.isascii() and data.count(b"\n") == len(files) + 2
    assert write(h, files) == data     # canonical: the same description, the same bytes


@given(paths)
def test_utf8_paths_are_written_as_path_others_as_path_b64(p):
    rec = json.loads(lines(write(header(), [DescribedFile(p, 0, 0, EMPTY_ID)]))[1])
    try:
        p.decode("utf-8")
        assert set(rec) == {"path", "size", "mtime_ns", "blake3"}
    except UnicodeDecodeError:
        assert set(rec) == {"path_b64", "size", "mtime_ns", "blake3"}


def _walk_order(ps: list[bytes]) -> list[bytes]:
    """Depth-first, each directory's names sorted bytewise: how ingest walks an entry."""
    tree: dict = {}
    for p in ps:
        node = tree
        parts = p.split(b"/")
        for c in parts[:-1]:
            node = node.setdefault(c, {})
        node[parts[-1]] = None
    out: list[bytes] = []

    def visit(node: dict, prefix: bytes) -> None:
        for name in sorted(node):
            rel = prefix + b"/" + name if prefix else name
            if node[name] is None:
                out.append(rel)
            else:
                visit(node[name], rel)
    visit(tree, b"")
    return out


def _prefix_free(ps: list[bytes]) -> bool:
    """A file cannot also be a directory."""
    s = set(ps)
    return not any(p.rpartition(b"/")[0] and any(p.startswith(q + b"/") for q in s) for p in s)


@given(st.lists(paths, min_size=1, max_size=15, unique=True).filter(_prefix_free))
def test_walk_key_order_is_the_order_ingest_walks_a_folder_in(ps):
    assert sorted(ps, key=walk_key) == _walk_order(ps)


def test_walk_order_puts_a_folder_before_a_longer_name_with_its_prefix():
    assert sorted([b"a.txt", b"a/x", b"a0", b"a-b/c"], key=walk_key) == [b"a/x", b"a-b/c", b"a.txt", b"a0"]


def test_the_documented_example_is_read_back():
    text = (REPO / "store_format.md").read_text()
    section = text[text.index("### 10.4 Example"):]
    block = section.split("```\n", 2)[1].encode()
    m = re.search(r"\((\d+) bytes, object id\s+`([0-9a-f]{64})`\)", section)
    assert m, "the example names its size and object id"
    assert (len(block), hash_bytes(block)) == (int(m.group(1)), m.group(2))
    r, got = read(block)
    assert r.header == header(study="demo")
    assert got == SAMPLE_FILES[:2] and r.trailer.ended == "2026-11-21T20:50:42.017730Z"
    assert write(header(), SAMPLE_FILES[:2]) == block


# ------------------------------------------------------------- the writer

def test_the_writer_refuses_paths_out_of_walk_order_or_repeated():
    buf = io.BytesIO()
    w = DescriptionWriter(buf, header())
    w.add(DescribedFile(b"a/x", 0, 0, EMPTY_ID))
    for bad in (b"a/x", b"a.txt/../a", b"a"):
        with pytest.raises(ValueError):
            w.add(DescribedFile(bad, 0, 0, EMPTY_ID))
    w.add(DescribedFile(b"a.txt", 0, 0, EMPTY_ID))


def test_the_writer_refuses_to_describe_the_description_itself():
    with pytest.raises(ValueError):
        DescriptionWriter(io.BytesIO(), header()).add(DescribedFile(DESCRIPTION_NAME, 0, 0, EMPTY_ID))


# ------------------------------------------------------------- the reader

@settings(max_examples=100)
@given(file_lists(min_size=2), st.data())
def test_the_reader_rejects_paths_out_of_order(files, data):
    i = data.draw(st.integers(0, len(files) - 2))
    j = data.draw(st.integers(i + 1, len(files) - 1))
    ls = lines(write(header(), files))
    ls[1 + i], ls[1 + j] = ls[1 + j], ls[1 + i]
    err = expect_error(b"".join(ls), 3 + i)     # the line after the one moved up
    assert "out of walk order or repeated" in str(err)


@settings(max_examples=100)
@given(file_lists(min_size=1), st.data())
def test_the_reader_rejects_a_repeated_path(files, data):
    i = data.draw(st.integers(0, len(files) - 1))
    ls = lines(write(header(), files))
    ls.insert(2 + i, ls[1 + i])
    end = json.loads(ls[-1])
    end.update(files=end["files"] + 1, bytes=end["bytes"] + files[i].size)
    ls[-1] = json.dumps(end, separators=(",", ":")).encode() + b"\n"
    err = expect_error(b"".join(ls), 3 + i)
    assert "out of walk order or repeated" in str(err)


def test_every_truncation_is_rejected():
    data = sample()
    for cut in range(len(data)):
        err = expect_error(data[:cut])
        assert re.search(r"empty|truncated|no end line", str(err)), (cut, str(err))


@pytest.mark.parametrize("value", ["0" * 63, "0" * 65, "G" * 64, "AB" * 32, 5, None, ""])
def test_the_reader_rejects_a_bad_hash_naming_its_line(value):
    ls = lines(sample())
    rec = json.loads(ls[2])
    rec["blake3"] = value
    ls[2] = json.dumps(rec).encode() + b"\n"
    assert "blake3" in str(expect_error(b"".join(ls), 3))


@pytest.mark.parametrize("change", [{"files": 4}, {"files": 2}, {"bytes": 23}, {"bytes": "22"}, {"files": True},
                                    {"files": 3.0}, {"end": "yesterday"}, {"end": None}])
def test_the_reader_rejects_an_end_line_that_does_not_match(change):
    ls = lines(sample())
    end = json.loads(ls[-1])
    assert (end["files"], end["bytes"]) == (3, 22)
    end.update(change)
    ls[-1] = json.dumps(end).encode() + b"\n"
    expect_error(b"".join(ls), len(ls))


def test_the_reader_rejects_anything_after_the_end_line():
    err = expect_error(sample() + b"\n", 6)
    assert "after the end line" in str(err)


@pytest.mark.parametrize("change", [
    {"eidetic_upload": 2}, {"eidetic_upload": True}, {"eidetic_upload": None}, {"study": 5}, {"user": None},
    {"started": "2026-11-21 20:50:41"},
])
def test_the_reader_rejects_a_bad_header_naming_line_1(change):
    ls = lines(sample())
    h = json.loads(ls[0])
    h.update(change)
    ls[0] = json.dumps(h).encode() + b"\n"
    expect_error(b"".join(ls), 1)


def test_a_later_clients_header_keys_are_kept():
    ls = lines(sample())
    h = json.loads(ls[0])
    h["timezone"] = "Europe/Berlin"
    ls[0] = json.dumps(h).encode() + b"\n"
    r, got = read(b"".join(ls))
    assert r.header.extra == {"timezone": "Europe/Berlin"} and got == SAMPLE_FILES


@pytest.mark.parametrize("record", [
    {"path": "../etc/passwd", "size": 0, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path": "/abs", "size": 0, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path": ".eidetic-description.jsonl", "size": 0, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path": "x", "size": -1, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path": "x", "size": True, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path": "x", "size": 0, "mtime_ns": "0", "blake3": EMPTY_ID},
    {"size": 0, "mtime_ns": 0, "blake3": EMPTY_ID},
    {"path_b64": "eA==", "size": 0, "mtime_ns": 0, "blake3": EMPTY_ID},     # "x" is UTF-8: not canonical
])
def test_the_reader_rejects_a_bad_file_line_naming_it(record):
    ls = lines(write(header(), []))
    ls.insert(1, json.dumps(record).encode() + b"\n")
    expect_error(b"".join(ls), 2)


@pytest.mark.parametrize("line", [b"[1,2]\n", b"null\n", b"{oops\n"])
def test_a_line_that_is_not_an_object_is_rejected(line):
    ls = lines(sample())
    ls.insert(2, line)
    expect_error(b"".join(ls), 3)


def test_an_overlong_line_is_rejected_without_reading_it_whole():
    ls = lines(sample())
    ls.insert(1, b'{"path":"' + b"a" * MAX_LINE + b'"}\n')
    assert "longer than" in str(expect_error(b"".join(ls), 2))


# ------------------------------------------------------------ open_description

def test_open_description_reads_a_regular_file(tmp_path):
    p = tmp_path / DESCRIPTION_NAME.decode()
    p.write_bytes(sample())
    r = open_description(str(p))
    assert list(r.files()) == SAMPLE_FILES


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_open_description_refuses_a_symlink_or_fifo_without_blocking(tmp_path, kind):
    real = tmp_path / "real.jsonl"
    real.write_bytes(sample())
    p = tmp_path / DESCRIPTION_NAME.decode()
    if kind == "symlink":
        os.symlink(real, p)
    else:
        os.mkfifo(p)
    with pytest.raises(OSError):
        open_description(str(p))
