"""The lab PC's settings: ``eidetic-client.yaml``, per user and machine-wide.

Two files, both optional:

* the machine-wide one a study runner deploys to every lab PC
  (:func:`machine_settings_path`: ``C:\\ProgramData\\eidetic\\`` on Windows,
  ``/Library/Application Support/eidetic/`` on macOS, ``/etc/eidetic/``
  elsewhere; ``$EIDETIC_CLIENT_MACHINE_SETTINGS`` names another);
* the collector's own, in the per-user client folder.

The per-user file wins key by key: its ``location`` over the machine's, and
each of its destinations over the machine's destination of the same name.
The keys are a fixed contract (collectors' docs and study runners' files
name them)::

    location: labA
    destinations:
      foo:
        study: foo
        to: sftp://jdoe@dropbox.example.org/data-dropbox/inbox   # or a folder
        source: C:\\Data\\foo          # optional
        parts: [eprime, biopac]      # optional: subfolders of source sent by default
        exclude: ["*.tmp"]           # optional: added to the default excludes
        host_key: SHA256:...         # optional: the server's fingerprint
        identity: ~/.ssh/id_ed25519  # optional

A bad file is one ConfigError naming the file, the line and the key.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from ..core import layout
from ..core.errors import ConfigError, UsageError
from ..core.fsutil import makedirs, write_atomic
from ..core.yamlfile import dump_yaml, key_lines, read_yaml
from .excludes import check_pattern

SETTINGS_NAME = "eidetic-client.yaml"
MACHINE_ENV = "EIDETIC_CLIENT_MACHINE_SETTINGS"
_TOP_KEYS = ("location", "destinations")
_DEST_KEYS = ("study", "to", "source", "parts", "exclude", "host_key", "identity")


def machine_settings_path() -> str:
    env = os.environ.get(MACHINE_ENV)
    if env:
        return os.path.abspath(env)
    if sys.platform == "win32":
        base = os.environ.get("ProgramData") or r"C:\ProgramData"
        return os.path.join(base, "eidetic", SETTINGS_NAME)
    if sys.platform == "darwin":
        return os.path.join("/Library", "Application Support", "eidetic", SETTINGS_NAME)
    return os.path.join("/etc", "eidetic", SETTINGS_NAME)


@dataclass(frozen=True)
class SavedDestination:
    name: str
    study: str
    to: str
    source: str | None = None
    parts: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    host_key: str | None = None
    identity: str | None = None
    origin: str = ""            # the settings file it came from

    def to_yaml(self) -> dict:
        d: dict = {"study": self.study, "to": self.to}
        for key in ("source", "host_key", "identity"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        for key in ("parts", "exclude"):
            if getattr(self, key):
                d[key] = list(getattr(self, key))
        return d


@dataclass(frozen=True)
class ClientSettings:
    location: str | None = None
    location_origin: str | None = None
    destinations: dict[str, SavedDestination] = field(default_factory=dict)
    files: tuple[str, ...] = ()           # the files read, machine-wide first

    def pick(self, name: str | None) -> SavedDestination | None:
        """The destination called *name*; with no name, the only one (None when
        none is defined).  UsageError naming the choices otherwise."""
        if name is not None:
            if name in self.destinations:
                return self.destinations[name]
            if not self.destinations:
                raise UsageError(f"--dest {name}: no destinations are saved on this computer (they are "
                                 f"set in {SETTINGS_NAME}; see 'eidetic send --help')")
            raise UsageError(f"--dest {name}: no such saved destination; saved: {self.names()}")
        if not self.destinations:
            return None
        if len(self.destinations) == 1:
            return next(iter(self.destinations.values()))
        raise UsageError(f"several destinations are saved ({self.names()}): say which with --dest NAME; "
                         "nothing was sent")

    def names(self) -> str:
        return ", ".join(sorted(self.destinations))


def load_settings(home: str, machine: str | None = None) -> ClientSettings:
    """The machine-wide settings, overlaid by the per-user ones in *home*."""
    machine = machine_settings_path() if machine is None else machine
    user = os.path.join(home, SETTINGS_NAME)
    location = origin = None
    dests: dict[str, SavedDestination] = {}
    files = []
    for path in (machine, user):
        doc = _read(path)
        if doc is None:
            continue
        files.append(path)
        if doc.get("location"):
            location, origin = doc["location"], path
        dests.update(doc["destinations"])
    return ClientSettings(location, origin, dests, tuple(files))


def load_client_settings(path: str) -> dict:
    """One settings file as ``{"location": ...}`` ({} when absent or unset)."""
    doc = _read(path)
    return {"location": doc["location"]} if doc and doc.get("location") else {}


def save_destination(home: str, dest: SavedDestination) -> str:
    """Add or replace *dest* in the per-user settings file (the desktop app's
    "add a destination"); other keys stay as they were.  Returns the path."""
    path = os.path.join(home, SETTINGS_NAME)
    raw = read_yaml(path) if os.path.exists(path) else None
    doc = raw if isinstance(raw, dict) else {}
    _read(path) if raw is not None else None       # refuse to rewrite a file that is wrong now
    dests = doc.get("destinations") or {}
    dests[dest.name] = dest.to_yaml()
    doc["destinations"] = dests
    makedirs(os.fsencode(home), 0o700)
    write_atomic(path, dump_yaml(doc), mode=0o600)
    return path


# ------------------------------------------------------------------ reading

class _Checker:
    """Validates one file, naming the line of each bad key."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lines: dict[tuple, int] | None = None

    def _line(self, keys: tuple) -> str:
        if self._lines is None:
            self._lines = key_lines(self.path)
        line = self._lines.get(keys)
        if line is None and keys and isinstance(keys[-1], int):
            line = self._lines.get(keys[:-1])
        return f"line {line}, " if line else ""

    def fail(self, keys: tuple, what: str) -> ConfigError:
        shown = ".".join(str(k) for k in keys if not isinstance(k, int))
        return ConfigError(f"{self._line(keys)}key '{shown}': {what}", self.path)

    def unknown(self, keys: tuple, known: tuple[str, ...]) -> ConfigError:
        shown = ".".join(str(k) for k in keys)
        return ConfigError(f"{self._line(keys)}unknown key '{shown}' (known: {', '.join(known)})", self.path)

    def text(self, body: dict, keys: tuple, example: str, required: bool = False) -> str | None:
        v = body.get(keys[-1])
        if v is None:
            if required:
                raise self.fail(keys[:-1], f"'{keys[-1]}' is missing, e.g. {keys[-1]}: {example}")
            return None
        if not isinstance(v, str) or not v.strip() or "\0" in v:
            raise self.fail(keys, f"must be a text, e.g. {keys[-1]}: {example}")
        return v

    def texts(self, body: dict, keys: tuple, example: str) -> tuple[str, ...]:
        v = body.get(keys[-1])
        if v is None:
            return ()
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list):
            raise self.fail(keys, f"must be a list, e.g. {keys[-1]}: {example}")
        for i, item in enumerate(v):
            if not isinstance(item, str) or not item.strip():
                raise self.fail(keys + (i,), f"item {i + 1} must be a text, e.g. {keys[-1]}: {example}")
        return tuple(v)


def _read(path: str) -> dict | None:
    """One file, checked: {"location": str|None, "destinations": {...}}; None when absent."""
    if not os.path.exists(path):
        return None
    doc = read_yaml(path)
    if doc is None:
        return {"location": None, "destinations": {}}
    c = _Checker(path)
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping of keys, e.g. location: labA", path)
    for k in doc:
        if k not in _TOP_KEYS:
            raise c.unknown((k,), _TOP_KEYS)
    location = c.text(doc, ("location",), "labA")
    raw = doc.get("destinations")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise c.fail(("destinations",), "must be a mapping of names to destinations, e.g. "
                                        "destinations: {foo: {study: foo, to: ...}}")
    dests = {}
    for name, body in raw.items():
        keys = ("destinations", name)
        if not isinstance(name, str) or not name.strip() or any(ch in name for ch in "\0\n\r"):
            raise c.fail(keys, "a destination's name must be a text")
        if not isinstance(body, dict):
            raise c.fail(keys, "must be a mapping, e.g. {study: foo, to: sftp://user@host/inbox}")
        for k in body:
            if k not in _DEST_KEYS:
                raise c.unknown(keys + (k,), _DEST_KEYS)
        study = c.text(body, keys + ("study",), "foo", required=True)
        assert study is not None
        if not layout.STUDY_NAME_RE.match(study):
            raise c.fail(keys + ("study",), "a study name is letters, digits and '_', as the study runner gave it")
        to = c.text(body, keys + ("to",), "sftp://user@server/inbox", required=True)
        host_key = c.text(body, keys + ("host_key",), "SHA256:...")
        if host_key is not None and not host_key.startswith("SHA256:"):
            raise c.fail(keys + ("host_key",), "must be a fingerprint that starts with SHA256:, as the "
                                                 "study runner gave it")
        parts = c.texts(body, keys + ("parts",), "[eprime, biopac]")
        for i, part in enumerate(parts):
            bits = part.replace("\\", "/").split("/")
            if part.startswith(("/", "\\")) or ".." in bits or (len(part) > 1 and part[1] == ":"):
                raise c.fail(keys + ("parts", i), f"{part!r} must be a folder inside the study folder")
        exclude = c.texts(body, keys + ("exclude",), '["*.tmp"]')
        for i, pat in enumerate(exclude):
            why = check_pattern(pat)
            if why:
                raise c.fail(keys + ("exclude", i), why)
        dests[name] = SavedDestination(
            name=name, study=study, to=to or "", source=c.text(body, keys + ("source",), r"C:\Data\foo"),
            parts=tuple(p.replace("\\", "/").strip("/") for p in parts), exclude=exclude, host_key=host_key,
            identity=c.text(body, keys + ("identity",), "~/.ssh/id_ed25519"), origin=path)
    return {"location": location, "destinations": dests}
