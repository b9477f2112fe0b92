"""The lab PC's own settings file, ``eidetic-client.yaml``."""

from __future__ import annotations

import os

from ..core.errors import ConfigError
from ..core.yamlfile import no_unknown_keys, read_yaml


def load_client_settings(path: str) -> dict:
    """The lab PC's ``eidetic-client.yaml`` (only key: ``location``); {} when absent."""
    if not os.path.exists(path):
        return {}
    doc = read_yaml(path)
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping of keys", path)
    no_unknown_keys(doc, {"location"}, "", path)
    loc = doc.get("location")
    if loc is not None and not isinstance(loc, str):
        raise ConfigError("'location' must be a text, e.g. location: labA", path)
    return {"location": loc} if loc else {}
