"""eidetic status --prometheus: node_exporter's textfile-collector format,
through the real CLI on a real layout, read back by a strict parser."""

from __future__ import annotations

import json
import os
import re
import time

import pytest
from conftest import drop, make_layout

from eidetic.server.inbox import StateDir
from eidetic.server.status import Status, StudyStatus, to_prometheus

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
SAMPLE_RE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? (\S+)$")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')
VALUE_RE = re.compile(r"^(?:[+-]?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)|NaN|[+-]Inf)$")


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """The text exposition format, strictly: every line a HELP, a TYPE or a
    sample ``name{labels} value``; every metric has one HELP and one TYPE
    before its samples, all its samples together, no sample twice.  Returns
    {name: {sorted label items: value}}."""
    assert text.endswith("\n") and "\n\n" not in text, text
    helps, types, out = {}, {}, {}
    current = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(NAME, name) and help_text and name not in helps, line
            helps[name] = help_text
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("gauge", "counter", "untyped") and name not in types, line
            types[name] = kind
        else:
            m = SAMPLE_RE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name == current and name in types, f"sample without its HELP/TYPE: {line!r}"
            assert VALUE_RE.match(value), line
            key = tuple(sorted((k, _unescape(v)) for k, v in LABEL_RE.findall(labels or "")))
            assert key not in out.setdefault(name, {}), f"sample twice: {line!r}"
            out[name][key] = float(value)
    assert set(helps) == set(types)
    for name in helps:
        assert name.startswith("eidetic_"), name
        out.setdefault(name, {})
    return out


def prom(layout, *args) -> tuple[int, dict, str]:
    res = layout.cli("status", "--prometheus", *args)
    assert "Traceback" not in res.stderr, res.stderr
    return res.returncode, parse(res.stdout), res.stdout


def by_study(metrics: dict, name: str) -> dict[str, float]:
    return {dict(k)["study"]: v for k, v in metrics["eidetic_" + name].items()}


REQUIRED = ["entries_waiting", "entries_failed", "entries_processing", "seconds_since_last_ingest", "store_bytes",
            "store_objects", "store_paths", "store_versions", "filesystem_percent_used", "daemon_up"]


def test_prometheus_values_match_what_was_ingested(tmp_path):
    layout = make_layout(tmp_path)
    drop(layout.inbox, "s1-labA-1", {"eprime/a.txt": b"aaa", "b.txt": b"bb"})
    drop(layout.inbox, "s1-labA-2", {"eprime/a.txt": b"aaaa", "c.txt": b"bb"})    # a new version, a known content
    before = time.time()
    results = layout.ingest()
    assert [r.outcome for r in results] == ["ingested", "ingested"]
    (layout.inbox / "s1-labA-3").write_bytes(b"not a folder")                       # fails
    assert [r.outcome for r in layout.ingest()] == ["failed"]
    drop(layout.inbox, "s1-labB-4", {"d.txt": b"d"})                                 # waiting
    drop(layout.inbox, "s2-labB-5", {"d.txt": b"d"})                                 # waiting
    drop(layout.inbox, "s2-labB-6", {"e.txt": b"e"})                                 # waiting

    code, m, text = prom(layout)
    assert code == 1                                       # as plain status: a failed entry waits for someone
    for name in REQUIRED:
        assert "eidetic_" + name in m, name
    assert by_study(m, "entries_waiting") == {"s1": 1, "s2": 2}
    assert by_study(m, "entries_failed") == {"s1": 1, "s2": 0}
    assert by_study(m, "entries_processing") == {"s1": 0, "s2": 0}
    assert by_study(m, "store_objects") == {"s1": 3, "s2": 0}                      # aaa, bb, aaaa
    assert by_study(m, "store_paths") == {"s1": 3, "s2": 0}                        # eprime/a.txt, b.txt, c.txt
    assert by_study(m, "store_versions") == {"s1": 4, "s2": 0}
    assert by_study(m, "store_uploads") == {"s1": 2, "s2": 0}
    assert by_study(m, "daemon_up") == {"s1": 0, "s2": 0}
    assert by_study(m, "index_usable") == {"s1": 1, "s2": 1}
    age = by_study(m, "seconds_since_last_ingest")
    assert set(age) == {"s1"}                               # s2 never ingested: no sample, not a made-up 0
    assert 0 <= age["s1"] <= time.time() - before + 1
    assert abs(by_study(m, "last_ingest_timestamp_seconds")["s1"] - (time.time() - age["s1"])) < 30

    # The same numbers as --json says.
    js = json.loads(layout.cli("status", "--json").stdout)["studies"]
    for study in ("s1", "s2"):
        assert by_study(m, "store_bytes")[study] == js[study]["store_bytes"] > 0
        assert by_study(m, "filesystem_percent_used")[study] == js[study]["filesystem"]["percent_used"]
        assert 0 <= by_study(m, "filesystem_percent_used")[study] <= 100
    assert "\x1b" not in text                               # nothing but the format on stdout


def test_prometheus_daemon_up_and_one_study(tmp_path):
    layout = make_layout(tmp_path)
    code, m, _ = prom(layout, "--study", "s2")
    assert code == 0
    assert all(set(by_study(m, n)) <= {"s2"} for n in REQUIRED)
    assert by_study(m, "daemon_up") == {"s2": 0}
    fd = StateDir(str(layout.state)).daemon_lock("s1")      # as a running daemon holds it
    try:
        code, m, _ = prom(layout)
    finally:
        os.close(fd)
    assert code == 0
    assert by_study(m, "daemon_up") == {"s1": 1, "s2": 0}


def test_prometheus_label_values_are_escaped():
    st = Status({'a"b\\c\nd': StudyStatus('a"b\\c\nd', partial=2, daemon_pid=-1)}, [])
    m = parse(to_prometheus(st, now=0))
    assert by_study(m, "uploads_in_progress") == {'a"b\\c\nd': 2}
    assert by_study(m, "daemon_up") == {'a"b\\c\nd': 1}
    assert m["eidetic_store_bytes"] == {}                    # unknown: left out


def test_prometheus_and_json_are_one_or_the_other(tmp_path):
    layout = make_layout(tmp_path)
    res = layout.cli("status", "--prometheus", "--json")
    assert res.returncode == 2 and res.stdout == ""


@pytest.mark.parametrize("bad", ["eidetic_x 1 2 3", 'eidetic_x{study="a} 1', "eidetic_x{study=a} 1"])
def test_the_parser_is_strict(bad):
    with pytest.raises(AssertionError):
        parse("# HELP eidetic_x x\n# TYPE eidetic_x gauge\n" + bad + "\n")


def test_the_cron_line_of_monitoring_md_writes_the_file_even_while_an_entry_failed(tmp_path):
    """docs/monitoring.md's cron line, run by sh as cron would: the .prom file appears whole, no
    temporary file stays behind, and exit status 1 (a failed entry) still updates it."""
    import subprocess
    from pathlib import Path

    from conftest import REPO, clean_env, eidetic_argv
    doc = (REPO / "docs" / "monitoring.md").read_text()
    (line,) = [ln for ln in doc.splitlines() if ln.startswith("* * * * * ")]
    fields = line.split(None, 6)
    assert fields[5] == "eidetic"                                   # /etc/cron.d's user field
    command = fields[6]
    layout = make_layout(tmp_path / "lay")
    textfile_dir = tmp_path / "node-exporter"
    textfile_dir.mkdir()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "eidetic").write_text("#!/bin/sh\nexec " + " ".join(eidetic_argv()) + f" --config {layout.config_path}"
                                    ' "$@"\n')
    (bindir / "eidetic").chmod(0o755)
    command = command.replace("/var/lib/prometheus/node-exporter", str(textfile_dir))
    env = clean_env(PATH=f"{bindir}:/usr/bin:/bin")

    def run() -> dict:
        res = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert sorted(p.name for p in textfile_dir.iterdir()) == ["eidetic.prom"]
        return parse((textfile_dir / "eidetic.prom").read_text())

    assert by_study(run(), "entries_failed") == {"s1": 0, "s2": 0}
    (layout.inbox / "s1-labA-1").write_bytes(b"not a folder")
    assert [r.outcome for r in layout.ingest()] == ["failed"]
    assert layout.cli("status", "--prometheus").returncode == 1
    assert by_study(run(), "entries_failed") == {"s1": 1, "s2": 0}
    # An eidetic that prints nothing (a broken config) keeps the last file rather than an empty one.
    (bindir / "eidetic").write_text("#!/bin/sh\nexit 2\n")
    before = (textfile_dir / "eidetic.prom").read_text()
    res = subprocess.run(["sh", "-c", command], env=env, capture_output=True, text=True, timeout=60)
    assert sorted(p.name for p in textfile_dir.iterdir()) == ["eidetic.prom"]
    assert (textfile_dir / "eidetic.prom").read_text() == before
