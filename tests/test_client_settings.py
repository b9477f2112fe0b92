"""Saved destinations in eidetic-client.yaml: per user and machine-wide."""

from __future__ import annotations

import re

import pytest

from eidetic.client.settings import SavedDestination, load_settings, save_destination
from eidetic.core.errors import ConfigError, UsageError

FOO = """\
location: labA
destinations:
  foo:
    study: foo
    to: sftp://jdoe@dropbox.example.org/data-dropbox/inbox
    source: C:\\Data\\foo
    parts: [eprime, biopac]
    exclude: ["*.tmp"]
    host_key: SHA256:abcdef
    identity: ~/.ssh/id_ed25519
"""


@pytest.fixture
def homes(tmp_path):
    home, machine = tmp_path / "home", tmp_path / "machine.yaml"
    home.mkdir()
    return home, machine


def test_a_saved_destination_has_every_key_of_the_contract(homes):
    home, machine = homes
    (home / "eidetic-client.yaml").write_text(FOO)
    s = load_settings(str(home), str(machine))
    d = s.pick("foo")
    assert (d.study, d.to, d.source, d.parts, d.exclude, d.host_key, d.identity) == (
        "foo", "sftp://jdoe@dropbox.example.org/data-dropbox/inbox", "C:\\Data\\foo", ("eprime", "biopac"),
        ("*.tmp",), "SHA256:abcdef", "~/.ssh/id_ed25519")
    assert s.location == "labA"


def test_the_per_user_file_wins_key_by_key_over_the_machine_wide_one(homes):
    home, machine = homes
    machine.write_text("location: labM\ndestinations:\n  foo: {study: foo, to: /srv/m}\n"
                       "  bar: {study: bar, to: /srv/bar}\n")
    (home / "eidetic-client.yaml").write_text("destinations:\n  foo: {study: foo, to: /srv/mine}\n")
    s = load_settings(str(home), str(machine))
    assert s.location == "labM" and s.location_origin == str(machine)
    assert s.pick("foo").to == "/srv/mine" and s.pick("bar").to == "/srv/bar"
    (home / "eidetic-client.yaml").write_text("location: labU\n")
    s = load_settings(str(home), str(machine))
    assert s.location == "labU" and s.pick("foo").to == "/srv/m"


def test_the_machine_wide_file_is_found_through_the_environment(homes, monkeypatch):
    home, machine = homes
    machine.write_text("destinations:\n  only: {study: s1, to: /srv/in}\n")
    monkeypatch.setenv("EIDETIC_CLIENT_MACHINE_SETTINGS", str(machine))
    assert load_settings(str(home)).pick(None).name == "only"


def test_with_one_destination_dest_may_be_left_out_and_with_several_none_is_chosen(homes):
    home, machine = homes
    (home / "eidetic-client.yaml").write_text("destinations:\n  a: {study: s1, to: /x}\n")
    assert load_settings(str(home), str(machine)).pick(None).name == "a"
    (home / "eidetic-client.yaml").write_text("destinations:\n  a: {study: s1, to: /x}\n"
                                              "  b: {study: s2, to: /y}\n")
    with pytest.raises(UsageError, match=r"several destinations are saved \(a, b\).*--dest"):
        load_settings(str(home), str(machine)).pick(None)
    with pytest.raises(UsageError, match=r"no such saved destination; saved: a, b"):
        load_settings(str(home), str(machine)).pick("c")
    assert load_settings(str(home / "nowhere"), str(machine)).pick(None) is None


@pytest.mark.parametrize("text, line, key", [
    ("destinations:\n  foo:\n    study: foo\n    too: /x\n", 4, "unknown key 'destinations.foo.too'"),
    ("destinations:\n  foo:\n    study: f-o\n    to: /x\n", 3, "key 'destinations.foo.study'"),
    ("destinations:\n  foo:\n    study: foo\n", 2, "'to' is missing"),
    ("destinations:\n  foo:\n    study: foo\n    to: /x\n    parts: [eprime, ../etc]\n", 5,
     "key 'destinations.foo.parts'"),
    ("destinations:\n  foo:\n    study: foo\n    to: /x\n    host_key: MD5:aa\n", 5,
     "key 'destinations.foo.host_key'"),
    ("location: labA\ndestinations: [foo]\n", 2, "key 'destinations'"),
    ("location: labA\nlocaton: labB\n", 2, "unknown key 'locaton'"),
    ("destinations:\n  foo:\n    study: foo\n    to: /x\n    exclude: ['', a]\n", 5,
     "key 'destinations.foo.exclude'"),
])
def test_a_bad_settings_file_is_one_line_with_file_line_and_key(homes, text, line, key):
    home, machine = homes
    p = home / "eidetic-client.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_settings(str(home), str(machine))
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg and f"line {line}," in msg and key in msg, msg


def test_a_destination_saved_by_the_app_is_read_back_and_other_keys_stay(homes):
    home, machine = homes
    (home / "eidetic-client.yaml").write_text("location: labA\n")
    d = SavedDestination("foo", "foo", "sftp://jdoe@h/inbox", source="/data/foo", parts=("eprime",),
                         host_key="SHA256:xyz")
    path = save_destination(str(home), d)
    s = load_settings(str(home), str(machine))
    assert s.location == "labA"
    got = s.pick("foo")
    assert (got.study, got.to, got.source, got.parts, got.host_key) == ("foo", "sftp://jdoe@h/inbox",
                                                                         "/data/foo", ("eprime",), "SHA256:xyz")
    assert re.search(r"^destinations:", open(path).read(), re.M)


def test_save_destination_creates_the_client_folder(tmp_path):
    home = tmp_path / "new" / "eidetic"
    save_destination(str(home), SavedDestination("x", "s1", "/srv/in"))
    assert load_settings(str(home), str(tmp_path / "none.yaml")).pick(None).to == "/srv/in"
