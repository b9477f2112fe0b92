"""Manifests (eidetic/manifest.py, store_format.md section 5): exact round
trips, a canonical encoding, and every kind of damage rejected as
IntegrityError naming the line."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import tempfile
from datetime import datetime, timezone

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eidetic.core import layout
from eidetic.core.errors import IntegrityError
from eidetic.store.manifest import (DESCRIPTION_KEYS, SKIP_KINDS, FileRecord, Header, ManifestReader, ManifestWriter,
                              SkipRecord, digest_of, read_all)


EMPTY_ID = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
_DIR = tempfile.mkdtemp(prefix="eidetic-test-manifest-")
_counter = itertools.count()

# ------------------------------------------------------------- strategies

hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_TOKENS = [b"a", b"Z", b"0", b".", b"-", b"~", b" ", b"\n", b"\t", b"\\", b'"', b"\x7f",
           b"\x80", b"\xff", b"\xc3\xa9", b"\xed\xa0\x80", "𝄞".encode(), b"..."]
_component = st.one_of(
    st.lists(st.sampled_from(_TOKENS), min_size=1, max_size=12).map(b"".join),
    st.binary(min_size=1, max_size=40),
    st.text(min_size=1, max_size=20).map(str.encode),
).filter(lambda c: b"/" not in c and b"\0" not in c and c not in (b".", b"..") and len(c) <= 255)
paths = st.lists(_component, min_size=1, max_size=5).map(b"/".join)
_dt = st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2999, 1, 1), timezones=st.just(timezone.utc))
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.text())
_KNOWN_HEADER_KEYS = {"eidetic_manifest", "seq", "upload", "prev", "study", "entry", "entry_b64", "received",
                      "uploader", "source", "description"}
descriptions = st.none() | st.fixed_dictionaries(
    {"blake3": hex64, "size": st.integers(0, 2**63), **{k: st.text() for k in DESCRIPTION_KEYS[2:]}})


@st.composite
def headers(draw) -> Header:
    t = draw(_dt)
    return Header(
        seq=draw(st.integers(1, 10**12)),
        upload=t.strftime("%Y%m%dT%H%M%SZ") + "-" + draw(st.text("0123456789abcdef", min_size=8, max_size=8)),
        prev=draw(st.none() | hex64),
        study=draw(st.text(min_size=1)),
        entry=draw(st.binary(min_size=1, max_size=255)),
        received=layout.utc_iso(t),
        uploader_uid=draw(st.integers(0, 2**32)),
        uploader_name=draw(st.none() | st.text()),
        source=draw(st.text()),
        description=draw(descriptions),
        extra=draw(st.dictionaries(st.text(min_size=1).filter(lambda k: k not in _KNOWN_HEADER_KEYS),
                                   st.one_of(_json_scalar, st.lists(_json_scalar, max_size=3)), max_size=3)),
    )


file_records = st.builds(FileRecord, path=paths, size=st.integers(0, 2**63), blake3=hex64,
                         mode=st.integers(0, 0o7777), mtime_ns=st.integers(-2**63, 2**64))
skip_records = st.builds(SkipRecord, path=paths, skipped=st.sampled_from(SKIP_KINDS),
                         target=st.none() | st.binary(max_size=100))
records = st.lists(st.one_of(file_records, skip_records), max_size=12)


def _new_path() -> str:
    return os.path.join(_DIR, f"{next(_counter):08d}.jsonl")


def write(header: Header, recs) -> tuple[str, str, bytes]:
    """Write a manifest to a fresh file; (path, digest from finish(), bytes)."""
    path = _new_path()
    with open(path, "wb") as f:
        w = ManifestWriter(f, header)
        for r in recs:
            w.add(r)
        digest = w.finish()
    with open(path, "rb") as f:
        data = f.read()
    return path, digest, data


def write_bytes(data: bytes) -> str:
    path = _new_path()
    with open(path, "wb") as f:
        f.write(data)
    return path


def example_header(seq: int = 1, **kw) -> Header:
    d = dict(seq=seq, upload="20261121T204814Z-0b0956ef", prev=None, study="demo", entry=b"demo-labA-1",
             received="2026-11-21T20:48:14.754701Z", uploader_uid=1000, uploader_name="alice", source="labA")
    d.update(kw)
    return Header(**d)


def example_records() -> list:
    return [
        FileRecord(b"eprime/s1.txt", 6, "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99",
                   0o644, 1795294094641239462),
        FileRecord(b"raw/\xffdata", 0, EMPTY_ID, 0o600, 1795294094641239462),
        SkipRecord(b"link", "symlink", b"/etc/passwd"),
    ]


# ------------------------------------------------------------- round trips

@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(headers(), records)
def test_any_manifest_round_trips_exactly(header, recs):
    path, digest, data = write(header, recs)
    h, back, info = read_all(path)
    assert h == header
    assert back == recs
    assert info.header == header
    files = [r for r in recs if isinstance(r, FileRecord)]
    assert (info.trailer.files, info.trailer.bytes, info.trailer.skipped) == \
        (len(files), sum(r.size for r in files), len(recs) - len(files))
    assert info.digest == digest == blake3.blake3(data).hexdigest()
    assert digest_of(path) == digest
    os.unlink(path)


@settings(max_examples=100)
@given(headers(), records)
def test_manifest_bytes_are_ascii_one_object_per_line(header, recs):
    path, _, data = write(header, recs)
    os.unlink(path)
    data.decode("ascii")
    lines = data.split(b"\n")
    assert lines[-1] == b""
    assert len(lines) - 1 == len(recs) + 2
    for line in lines[:-1]:
        assert isinstance(json.loads(line), dict)
    assert json.loads(lines[-2]) == {"end": True, "files": sum(isinstance(r, FileRecord) for r in recs),
                                     "bytes": sum(r.size for r in recs if isinstance(r, FileRecord)),
                                     "skipped": sum(isinstance(r, SkipRecord) for r in recs)}


@settings(max_examples=50)
@given(headers(), records)
def test_writing_the_same_manifest_twice_gives_the_same_bytes(header, recs):
    p1, d1, b1 = write(header, recs)
    p2, d2, b2 = write(header, recs)
    os.unlink(p1)
    os.unlink(p2)
    assert (d1, b1) == (d2, b2)


def test_the_documented_example_is_read_back():
    path, digest, data = write(example_header(), example_records())
    lines = data.decode("ascii").splitlines()
    assert lines[0] == ('{"eidetic_manifest":2,"seq":1,"upload":"20261121T204814Z-0b0956ef","prev":null,'
                        '"study":"demo","entry":"demo-labA-1","received":"2026-11-21T20:48:14.754701Z",'
                        '"uploader":{"uid":1000,"name":"alice"},"source":"labA"}')
    assert lines[2] == ('{"path_b64":"cmF3L/9kYXRh","size":0,"blake3":"%s","mode":384,'
                        '"mtime_ns":1795294094641239462}' % EMPTY_ID)
    assert lines[3] == '{"path":"link","skipped":"symlink","target":"/etc/passwd"}'
    assert lines[4] == '{"end":true,"files":2,"bytes":6,"skipped":1}'
    assert read_all(path)[1] == example_records()


# ---------------------------------------------------------------- canonical

@given(paths)
def test_utf8_paths_are_written_as_path_others_as_path_b64(p):
    path, _, data = write(example_header(), [FileRecord(p, 0, EMPTY_ID, 0o644, 0)])
    os.unlink(path)
    rec = json.loads(data.split(b"\n")[1])
    try:
        text = p.decode("utf-8")
    except UnicodeDecodeError:
        assert set(rec) == {"path_b64", "size", "blake3", "mode", "mtime_ns"}
        assert base64.b64decode(rec["path_b64"], validate=True) == p
    else:
        assert set(rec) == {"path", "size", "blake3", "mode", "mtime_ns"}
        assert rec["path"] == text


def _manifest_with_line(record_line: bytes, files: int = 1, nbytes: int = 0, skipped: int = 0) -> str:
    _, _, data = write(example_header(), [])
    head = data.split(b"\n")[0] + b"\n"
    trailer = json.dumps({"end": True, "files": files, "bytes": nbytes, "skipped": skipped},
                         separators=(",", ":")).encode() + b"\n"
    return write_bytes(head + record_line + b"\n" + trailer)


def _expect_integrity(path: str, line: int | None) -> IntegrityError:
    with pytest.raises(IntegrityError) as ei:
        read_all(path)
    if line is not None:
        assert re.search(rf"\bline {line}\b", str(ei.value)), str(ei.value)
    return ei.value


@pytest.mark.parametrize("p", [b"eprime/s1.txt", "résumé.pdf".encode(), b"a"])
def test_a_path_b64_holding_valid_utf8_is_rejected(p):
    line = json.dumps({"path_b64": base64.b64encode(p).decode(), "size": 0, "blake3": EMPTY_ID,
                       "mode": 420, "mtime_ns": 0}, separators=(",", ":")).encode()
    err = _expect_integrity(_manifest_with_line(line), 2)
    assert "path_b64" in str(err)


def test_an_entry_b64_holding_valid_utf8_is_rejected():
    _, _, data = write(example_header(), [])
    head, rest = data.split(b"\n", 1)
    d = json.loads(head)
    del d["entry"]
    d["entry_b64"] = base64.b64encode(b"demo-labA-1").decode()
    _expect_integrity(write_bytes(json.dumps(d, separators=(",", ":")).encode() + b"\n" + rest), 1)


def test_a_path_b64_holding_other_bytes_is_accepted():
    line = json.dumps({"path_b64": base64.b64encode(b"raw/\xff").decode(), "size": 0, "blake3": EMPTY_ID,
                       "mode": 420, "mtime_ns": 0}, separators=(",", ":")).encode()
    assert read_all(_manifest_with_line(line))[1][0].path == b"raw/\xff"


@pytest.mark.parametrize("record", [
    {"path": "../etc/passwd", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "/etc/passwd", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "a//b", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "a/\u0000", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "a", "size": -1, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "a", "size": 0, "blake3": EMPTY_ID.upper(), "mode": 420, "mtime_ns": 0},
    {"path": "a", "size": 0, "blake3": EMPTY_ID + "\n", "mode": 420, "mtime_ns": 0},
    {"path": "a", "size": 0, "blake3": EMPTY_ID, "mode": 0o10000, "mtime_ns": 0},
    {"path": "a", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 1.5},
    {"path": "a", "size": True, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": 5, "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
    {"path": "a", "skipped": "door"},
    {"path_b64": "not base64!", "size": 0, "blake3": EMPTY_ID, "mode": 420, "mtime_ns": 0},
])
def test_an_invalid_record_is_rejected_naming_its_line(record):
    line = json.dumps(record, separators=(",", ":")).encode()
    _expect_integrity(_manifest_with_line(line), 2)


# ------------------------------------------------------------------ damage

@pytest.fixture(scope="module")
def sample() -> tuple[bytes, str]:
    recs = example_records() + [FileRecord(b"d/%d" % i, i, EMPTY_ID, 0o644, i) for i in range(1, 6)]
    _, digest, data = write(example_header(seq=7, prev="ab" * 32), recs)
    return data, digest


def test_truncation_anywhere_is_rejected_naming_the_line(sample):
    data, _ = sample
    for cut in range(len(data)):
        path = write_bytes(data[:cut])
        if cut == 0:
            with pytest.raises(IntegrityError, match="empty"):
                read_all(path)
        else:
            # the last (partial or missing) line is the one named
            _expect_integrity(path, data[:cut].count(b"\n") + (0 if data[:cut].endswith(b"\n") else 1))
        os.unlink(path)


@settings(max_examples=200)
@given(st.data())
def test_a_flipped_byte_is_rejected_or_changes_the_digest(sample, data):
    """A reader alone cannot tell every edit (a changed hex digit is still a
    valid record): it either rejects the line or yields a different digest,
    which the next manifest's prev / HEAD then fails to match."""
    raw, digest = sample
    pos = data.draw(st.integers(0, len(raw) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(raw)
    bad[pos] ^= flip
    path = write_bytes(bytes(bad))
    try:
        try:
            _, _, info = read_all(path)
        except IntegrityError as e:
            assert "line" in str(e) or "empty" in str(e)
        else:
            assert info.digest != digest
    finally:
        os.unlink(path)


def test_a_flipped_size_digit_is_rejected_by_the_trailer_counts(sample):
    raw, _ = sample
    i = raw.index(b'"size":6,')
    bad = raw[:i] + b'"size":7,' + raw[i + len(b'"size":6,'):]
    n_lines = raw.count(b"\n")
    err = _expect_integrity(write_bytes(bad), n_lines)
    assert "trailer" in str(err)


def test_a_record_made_invalid_json_is_rejected_naming_its_line(sample):
    raw, _ = sample
    lines = raw.split(b"\n")
    lines[3] = lines[3].replace(b'{"path"', b'{"path', 1)
    _expect_integrity(write_bytes(b"\n".join(lines)), 4)


def test_a_record_nested_deeper_than_the_parser_allows_is_rejected_naming_its_line():
    # json.loads raises RecursionError, not ValueError, for deep nesting: it must
    # still be one IntegrityError (fsck reports it), never an internal error.
    err = _expect_integrity(_manifest_with_line(b"[" * 100_000), 2)
    assert "not JSON" in str(err)


def test_data_after_the_trailer_is_rejected(sample):
    raw, _ = sample
    n = raw.count(b"\n")
    for extra in (b"\n", b"x", b'{"end":true,"files":0,"bytes":0,"skipped":0}\n'):
        _expect_integrity(write_bytes(raw + extra), n + 1)


def test_a_missing_trailer_is_rejected(sample):
    raw, _ = sample
    without = raw[: raw.rstrip(b"\n").rindex(b"\n") + 1]
    err = _expect_integrity(write_bytes(without), without.count(b"\n"))
    assert "trailer" in str(err)


@pytest.mark.parametrize("trailer", [
    {"end": True, "files": 6, "bytes": 21, "skipped": 1},
    {"end": True, "files": 7, "bytes": 21, "skipped": 0},
    {"end": True, "files": 7, "bytes": 20, "skipped": 1},
    {"end": True, "files": 7, "bytes": 21, "skipped": 2},
    {"end": True, "files": 7, "bytes": 21},
    {"end": True, "files": "7", "bytes": 21, "skipped": 1},
    {"end": True, "files": 7, "bytes": 21, "skipped": 1.0},
    {"end": True, "files": 7, "bytes": 21, "skipped": None},
])
def test_a_trailer_that_does_not_match_is_rejected(sample, trailer):
    raw, _ = sample
    head = raw[: raw.rstrip(b"\n").rindex(b"\n") + 1]
    n = raw.count(b"\n")
    assert json.loads(raw.split(b"\n")[-2]) == {"end": True, "files": 7, "bytes": 21, "skipped": 1}
    line = json.dumps(trailer, separators=(",", ":")).encode() + b"\n"
    err = _expect_integrity(write_bytes(head + line), n)
    assert "trailer" in str(err)


@pytest.mark.parametrize("version", [0, 3, "1", "2", None, True, 1.0, 2.0])
def test_a_wrong_version_is_rejected(version):
    _, _, data = write(example_header(), example_records())
    head, rest = data.split(b"\n", 1)
    d = json.loads(head)
    if version is None:
        del d["eidetic_manifest"]
    else:
        d["eidetic_manifest"] = version
    err = _expect_integrity(write_bytes(json.dumps(d, separators=(",", ":")).encode() + b"\n" + rest), 1)
    assert "version" in str(err)


@pytest.mark.parametrize("field, value", [
    ("upload", "20261121T204814Z-0b0956e"), ("upload", "20261121T204814Z-0b0956ef\n"),
    ("prev", "00"), ("prev", 5), ("received", "2026-11-21 20:48:14"), ("seq", "1"), ("study", None),
    ("uploader", {"name": "alice"}), ("uploader", None), ("uploader", [1000]), ("uploader", "alice"),
])
def test_a_bad_header_is_rejected_naming_line_1(field, value):
    _, _, data = write(example_header(), example_records())
    head, rest = data.split(b"\n", 1)
    d = json.loads(head)
    d[field] = value
    _expect_integrity(write_bytes(json.dumps(d, separators=(",", ":")).encode() + b"\n" + rest), 1)


@pytest.mark.parametrize("first", [b"[1,2]\n", b"null\n", b"not json\n", b'{"eidetic_manifest":1'])
def test_a_first_line_that_is_not_a_header_is_rejected(first):
    _expect_integrity(write_bytes(first), 1)


def test_finish_returns_the_digest_and_flushes():
    buf = io.BytesIO()
    w = ManifestWriter(buf, example_header())
    for r in example_records():
        w.add(r)
    digest = w.finish()
    assert digest == blake3.blake3(buf.getvalue()).hexdigest()
    assert (w.files, w.bytes, w.skipped) == (2, 6, 1)


def test_records_can_be_streamed_one_at_a_time():
    path, digest, _ = write(example_header(), example_records())
    r = ManifestReader(path)
    assert r.header == example_header()
    it = r.records()
    assert next(it) == example_records()[0]
    assert r.info is None
    rest = list(it)
    assert rest == example_records()[1:]
    assert r.info is not None and r.info.digest == digest


# ------------------------------------------------- versions and descriptions

EXAMPLE_DESCRIPTION = {
    "blake3": "5b1e2ca8ec0bb4c2cd8e0e48c8e6c5fa4b3c47d7a9d6e7b8b5d56f4e1f1c8a10", "size": 412,
    "client": "eidetic 0.2.0", "location": "labA", "user": "jdoe", "host": "LAB-PC-3",
    "platform": "Windows-10-10.0.19045-SP0", "started": "2026-11-21T20:48:02.118250Z",
    "ended": "2026-11-21T20:48:03.904117Z", "source": "C:\\Data\\demo"}


def test_a_header_with_a_description_round_trips_with_its_keys_in_order():
    path, _, data = write(example_header(description=dict(EXAMPLE_DESCRIPTION)), example_records())
    head = data.split(b"\n", 1)[0].decode()
    assert head.endswith(',"source":"labA","description":{"blake3":"%s","size":412,"client":"eidetic 0.2.0",'
                         '"location":"labA","user":"jdoe","host":"LAB-PC-3",'
                         '"platform":"Windows-10-10.0.19045-SP0","started":"2026-11-21T20:48:02.118250Z",'
                         '"ended":"2026-11-21T20:48:03.904117Z","source":"C:\\\\Data\\\\demo"}}'
                         % EXAMPLE_DESCRIPTION["blake3"])
    h = read_all(path)[0]
    assert h.description == EXAMPLE_DESCRIPTION and h.version == 2 and h.extra == {}


def test_a_version_1_manifest_is_still_read():
    path, digest, data = write(example_header(version=1), example_records())
    assert data.startswith(b'{"eidetic_manifest":1,')
    h, recs, info = read_all(path)
    assert (h.version, h.description, recs, info.digest) == (1, None, example_records(), digest)


def test_a_new_manifest_is_written_as_version_2():
    _, _, data = write(example_header(), example_records())
    assert json.loads(data.split(b"\n", 1)[0])["eidetic_manifest"] == 2


@pytest.mark.parametrize("change", [
    {"blake3": "AB" * 32}, {"blake3": "00"}, {"size": -1}, {"size": "412"}, {"user": None}, {"host": 5},
    {"extra_key": "x"}, {"ended": None},
])
def test_a_bad_description_in_a_header_is_rejected_naming_line_1(change):
    _, _, data = write(example_header(description=dict(EXAMPLE_DESCRIPTION)), example_records())
    head, rest = data.split(b"\n", 1)
    d = json.loads(head)
    d["description"].update(change)
    err = _expect_integrity(write_bytes(json.dumps(d, separators=(",", ":")).encode() + b"\n" + rest), 1)
    assert "description" in str(err)


def test_a_description_in_a_version_1_header_is_rejected():
    _, _, data = write(example_header(description=dict(EXAMPLE_DESCRIPTION)), example_records())
    head, rest = data.split(b"\n", 1)
    d = json.loads(head)
    d["eidetic_manifest"] = 1
    err = _expect_integrity(write_bytes(json.dumps(d, separators=(",", ":")).encode() + b"\n" + rest), 1)
    assert "version 2" in str(err)
