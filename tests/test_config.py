"""Configuration (eidetic/config.py): every bad config is a ConfigError
naming the key; the lookup order; the default layout."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from eidetic.server import config
from eidetic.server.config import Config, ConfigError, parse
from eidetic.client.settings import load_client_settings


def good(tmp, **top) -> dict:
    doc = {
        "inbox": f"{tmp}/inbox",
        "state": f"{tmp}/state",
        "studies": {"foo": {"tree": f"{tmp}/foo/tree", "store": f"{tmp}/foo/store"},
                    "bar_2": {"tree": f"{tmp}/bar/tree", "store": f"{tmp}/bar/store"}},
    }
    doc.update(top)
    return doc


def bad(doc, *needles: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse(doc, "/etc/test.yaml")
    msg = str(ei.value)
    assert "/etc/test.yaml" in msg
    for n in needles:
        assert n in msg, (n, msg)
    assert ei.value.exit_code == 2
    return ei.value


# -------------------------------------------------------------- good config

def test_a_good_config_is_parsed(tmp_path):
    cfg = parse(good(tmp_path, settle_seconds=5), "/etc/test.yaml")
    assert cfg.inbox == f"{tmp_path}/inbox" and cfg.state == f"{tmp_path}/state"
    assert cfg.settle_seconds == 5.0
    assert sorted(cfg.studies) == ["bar_2", "foo"]
    assert cfg.study("foo").tree == f"{tmp_path}/foo/tree"
    assert not cfg.is_default_layout
    assert cfg.inboxes() == [(f"{tmp_path}/inbox", None)]


def test_paths_are_normalised(tmp_path):
    doc = good(tmp_path)
    doc["state"] = f"{tmp_path}//x/../state/"
    assert parse(doc, "t").state == f"{tmp_path}/state"


def test_settle_seconds_defaults_to_30(tmp_path):
    assert parse(good(tmp_path), "t").settle_seconds == config.DEFAULT_SETTLE_SECONDS == 5.0


def test_study_inboxes_can_replace_the_shared_inbox(tmp_path):
    doc = good(tmp_path)
    del doc["inbox"]
    doc["studies"]["foo"]["inbox"] = f"{tmp_path}/foo/inbox"
    doc["studies"]["bar_2"]["inbox"] = f"{tmp_path}/bar/inbox"
    cfg = parse(doc, "t")
    assert cfg.inbox is None
    assert sorted(cfg.inboxes()) == [(f"{tmp_path}/bar/inbox", "bar_2"), (f"{tmp_path}/foo/inbox", "foo")]


def test_unknown_study_lookup_names_the_configured_ones(tmp_path):
    cfg = parse(good(tmp_path), "t")
    with pytest.raises(ConfigError, match="bar_2, foo"):
        cfg.study("nope")


# ------------------------------------------------------------ bad configs

@pytest.mark.parametrize("doc", [None, [], "inbox: /x", 5])
def test_the_top_level_must_be_a_mapping(doc):
    bad(doc, "mapping")


def test_an_unknown_top_level_key_is_named(tmp_path):
    bad(good(tmp_path, settle=3), "'settle'")


def test_an_unknown_study_key_is_named(tmp_path):
    doc = good(tmp_path)
    doc["studies"]["foo"]["trees"] = "/x"
    bad(doc, "'studies.foo.trees'")


@pytest.mark.parametrize("key", ["inbox", "state"])
def test_a_relative_top_level_path_is_named(tmp_path, key):
    bad(good(tmp_path, **{key: "relative/dir"}), f"'{key}'", "absolute")


@pytest.mark.parametrize("key", ["tree", "store", "inbox"])
def test_a_relative_study_path_is_named(tmp_path, key):
    doc = good(tmp_path)
    doc["studies"]["foo"][key] = "./here"
    bad(doc, f"'studies.foo.{key}'", "absolute")


@pytest.mark.parametrize("value", ["", 5, ["/x"], {"a": "/x"}, True])
def test_a_path_that_is_not_a_string_is_named(tmp_path, value):
    bad(good(tmp_path, state=value), "'state'")


def test_state_is_required(tmp_path):
    doc = good(tmp_path)
    del doc["state"]
    bad(doc, "'state'")


@pytest.mark.parametrize("studies", ["missing", None, {}, [], "foo"])
def test_studies_are_required(tmp_path, studies):
    doc = good(tmp_path)
    if studies == "missing":
        del doc["studies"]
    else:
        doc["studies"] = studies
    bad(doc, "'studies'")


def test_an_inbox_is_required_somewhere(tmp_path):
    doc = good(tmp_path)
    del doc["inbox"]
    doc["studies"]["foo"]["inbox"] = f"{tmp_path}/foo/inbox"   # bar_2 has none
    bad(doc, "'inbox'")


@pytest.mark.parametrize("missing", ["tree", "store"])
def test_a_study_needs_tree_and_store(tmp_path, missing):
    doc = good(tmp_path)
    del doc["studies"]["foo"][missing]
    bad(doc, f"'studies.foo.{missing}'")


@pytest.mark.parametrize("body", [None, "/x", ["/x"]])
def test_a_study_body_must_be_a_mapping(tmp_path, body):
    doc = good(tmp_path)
    doc["studies"]["foo"] = body
    bad(doc, "'studies.foo'")


@pytest.mark.parametrize("name", ["lab-a", "-x", "a b", "", "_x", "é", "x\n", 5, "a.b", "a~b"])
def test_study_names_with_a_dash_or_other_punctuation_are_refused(tmp_path, name):
    doc = good(tmp_path)
    doc["studies"][name] = doc["studies"].pop("foo")
    bad(doc, repr(name), "study name")


@pytest.mark.parametrize("a, b", [
    ("inbox", "state"),
    ("studies.foo.tree", "studies.foo.store"),
    ("studies.foo.store", "studies.bar_2.store"),
    ("inbox", "studies.foo.tree"),
])
def test_overlapping_directories_are_named(tmp_path, a, b):
    doc = good(tmp_path)

    def put(key, value):
        if key.startswith("studies."):
            _, study, k = key.split(".")
            doc["studies"][study][k] = value
        else:
            doc[key] = value

    base = f"{tmp_path}/shared"
    put(a, base)
    for target in (base, base + "/sub", base + "/./sub/../sub/deeper"):
        put(b, target)
        bad(doc, f"'{a}'", f"'{b}'", "overlap")
    # a sibling that merely shares a prefix is not an overlap
    put(b, base + "2")
    parse(doc, "t")


def test_the_root_directory_overlaps_everything(tmp_path):
    bad(good(tmp_path, state="/"), "'state'", "overlap")


@pytest.mark.parametrize("value", [-1, -0.5, "30", "30s", None, True, False, [], float("nan"), float("inf")])
def test_bad_settle_seconds_are_named(tmp_path, value):
    bad(good(tmp_path, settle_seconds=value), "'settle_seconds'")


@pytest.mark.parametrize("value", [0, 0.5, 2, 86400])
def test_good_settle_seconds_are_accepted(tmp_path, value):
    assert parse(good(tmp_path, settle_seconds=value), "t").settle_seconds == value


@pytest.fixture
def other_filesystem(tmp_path):
    """A directory on a different file system from tmp_path."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                                            capture_output=True).returncode == 0:
        try:
            yield str(mnt)
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        return
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(tmp_path).st_dev:
        yield shm
        return
    pytest.skip("no second file system available (needs root to mount a tmpfs)")


def test_tree_and_store_on_different_file_systems_are_refused(tmp_path, other_filesystem):
    doc = good(tmp_path)
    doc["studies"]["foo"]["store"] = f"{other_filesystem}/eidetic-test-store/foo"   # need not exist yet
    bad(doc, "'studies.foo.tree'", "'studies.foo.store'", "file system")


def test_tree_and_store_on_one_file_system_are_accepted_before_they_exist(tmp_path):
    cfg = parse(good(tmp_path), "t")
    assert not os.path.exists(cfg.study("foo").store)


# -------------------------------------------------------------- loading

def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def yaml_for(tmp, inbox="inbox") -> str:
    return (f"inbox: {tmp}/{inbox}\nstate: {tmp}/state\nstudies:\n"
            f"  foo:\n    tree: {tmp}/foo/tree\n    store: {tmp}/foo/store\n")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EIDETIC_CONFIG", raising=False)
    monkeypatch.delenv("EIDETIC_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setattr(config, "SYSTEM_CONFIG", str(tmp_path / "etc" / "eidetic.yaml"))
    return monkeypatch


def test_load_reads_a_yaml_file(tmp_path, clean_env):
    p = write(tmp_path / "c.yaml", yaml_for(tmp_path))
    cfg = config.load(p)
    assert cfg.source == p
    assert cfg.inbox == f"{tmp_path}/inbox"


@pytest.mark.parametrize("text, line, col, key", [
    ("state: /a\nstate: /b\n", 2, 1, "state"),
    ("inbox: /i\nstate: /s\nstudies:\n  foo:\n    tree: /t\n    tree: /u\n    store: /s2\n", 6, 5, "tree"),
    ("inbox: /i\nstate: /s\nstudies:\n  foo: {tree: /t, store: /s}\n  foo: {tree: /u, store: /v}\n", 5, 3,
     "foo"),
])
def test_load_rejects_duplicate_keys_with_line_and_column(tmp_path, clean_env, text, line, col, key):
    p = write(tmp_path / "dup.yaml", text)
    with pytest.raises(ConfigError) as ei:
        config.load(p)
    msg = str(ei.value)
    assert f"line {line}, column {col}" in msg and "duplicate" in msg and repr(key) in msg, msg
    assert p in msg


def test_load_rejects_a_list_as_a_key_with_line_and_column(tmp_path, clean_env):
    p = write(tmp_path / "listkey.yaml", "state: /s\n? [a, b]\n: 1\n")
    with pytest.raises(ConfigError, match=r"line 2, column 3: a key must be a plain value"):
        config.load(p)


def test_a_bad_client_settings_file_is_one_line_with_line_and_column(tmp_path):
    p = write(tmp_path / "eidetic-client.yaml", "location: [labA\n")
    with pytest.raises(ConfigError) as ei:
        load_client_settings(p)
    assert "\n" not in str(ei.value) and re.search(r"line \d+, column \d+", str(ei.value)), str(ei.value)
    assert load_client_settings(str(tmp_path / "absent.yaml")) == {}


def test_load_reports_yaml_syntax_errors_with_line(tmp_path, clean_env):
    p = write(tmp_path / "bad.yaml", "inbox: /i\nstate: [/s\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        config.load(p)


def test_load_rejects_an_empty_file(tmp_path, clean_env):
    with pytest.raises(ConfigError, match="mapping"):
        config.load(write(tmp_path / "empty.yaml", ""))


def test_load_of_a_missing_explicit_file_is_an_error(tmp_path, clean_env):
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path / "nope.yaml"))


def test_explicit_config_beats_the_environment(tmp_path, clean_env):
    explicit = write(tmp_path / "explicit.yaml", yaml_for(tmp_path, "inbox_explicit"))
    env = write(tmp_path / "env.yaml", yaml_for(tmp_path, "inbox_env"))
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "eidetic.yaml", yaml_for(tmp_path, "inbox_system"))
    clean_env.setenv("EIDETIC_CONFIG", env)
    assert config.load(explicit).inbox == f"{tmp_path}/inbox_explicit"


def test_environment_beats_the_system_config(tmp_path, clean_env):
    env = write(tmp_path / "env.yaml", yaml_for(tmp_path, "inbox_env"))
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "eidetic.yaml", yaml_for(tmp_path, "inbox_system"))
    clean_env.setenv("EIDETIC_CONFIG", env)
    assert config.load(None).inbox == f"{tmp_path}/inbox_env"
    assert config.load(None).source == env


def test_a_missing_environment_config_is_an_error_not_a_fallback(tmp_path, clean_env):
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc" / "eidetic.yaml", yaml_for(tmp_path, "inbox_system"))
    clean_env.setenv("EIDETIC_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="EIDETIC_CONFIG"):
        config.load(None)


def test_system_config_beats_the_default_layout(tmp_path, clean_env):
    (tmp_path / "etc").mkdir()
    sysconf = write(tmp_path / "etc" / "eidetic.yaml", yaml_for(tmp_path, "inbox_system"))
    clean_env.setenv("EIDETIC_HOME", str(tmp_path / "home"))
    cfg = config.load(None)
    assert cfg.inbox == f"{tmp_path}/inbox_system" and cfg.source == sysconf


def test_the_default_layout_needs_no_file_and_lives_under_eidetic_home(tmp_path, clean_env):
    home = tmp_path / "eidetic-home"
    clean_env.setenv("EIDETIC_HOME", str(home))
    cfg = config.load(None)
    assert isinstance(cfg, Config) and cfg.is_default_layout and cfg.source == ""
    assert not home.exists()
    dirs = [cfg.inbox, cfg.state] + [d for s in cfg.studies.values() for d in (s.tree, s.store)]
    for d in dirs:
        assert d.startswith(str(home) + "/"), d
    assert list(cfg.studies) == [config.DEFAULT_STUDY]
    assert cfg.settle_seconds == config.DEFAULT_LAYOUT_SETTLE_SECONDS
    # the default layout satisfies the rules a file would have to
    parse({"inbox": cfg.inbox, "state": cfg.state,
           "studies": {n: {"tree": s.tree, "store": s.store} for n, s in cfg.studies.items()}}, "t")


def test_a_relative_eidetic_home_is_made_absolute(tmp_path, clean_env):
    clean_env.chdir(tmp_path)
    clean_env.setenv("EIDETIC_HOME", "rel")
    assert config.load(None).state == f"{tmp_path}/rel/state"


def test_the_default_layout_falls_back_to_xdg_data_home(tmp_path, clean_env):
    clean_env.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert config.load(None).state == f"{tmp_path}/xdg/eidetic/state"


def test_config_errors_name_the_default_layout_when_there_is_no_file():
    assert "built-in default layout" in str(ConfigError("x"))
