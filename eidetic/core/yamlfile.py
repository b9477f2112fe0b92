"""YAML files (the server's config, the lab PC's client settings): the only
module that imports PyYAML.  Safe loading only, duplicate keys refused, and
every problem one ConfigError naming the file, line and column.
"""

from __future__ import annotations

import yaml

from .errors import ConfigError


def read_yaml(path: str) -> object:
    """The YAML document at *path*; any problem is one ConfigError (with line and column)."""
    try:
        with open(path, "rb") as f:
            return yaml.load(f, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", path) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{where}{e.problem or e}", path) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"not valid YAML: {e}", path) from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of silently keeping the last."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:   # "? [a, b]": a list or mapping as a key
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping", key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen[key] = True
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def key_lines(path: str) -> dict[tuple, int]:
    """The line (1-based) of every mapping key in the YAML file at *path*, by
    its key path (``("destinations", "foo", "to")``), so that a message about
    a bad value can name the line.  {} when the file cannot be composed (the
    caller has already read it with :func:`read_yaml`, which said why)."""
    try:
        with open(path, "rb") as f:
            root = yaml.compose(f, Loader=_StrictLoader)  # noqa: S506 - SafeLoader subclass
    except (OSError, yaml.YAMLError):
        return {}
    lines: dict[tuple, int] = {}

    def visit(node, prefix: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = prefix + (k.value if isinstance(k, yaml.ScalarNode) else None,)
                lines.setdefault(key, k.start_mark.line + 1)
                visit(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                lines.setdefault(prefix + (i,), v.start_mark.line + 1)
                visit(v, prefix + (i,))

    if root is not None:
        visit(root, ())
    return lines


def dump_yaml(doc: object) -> bytes:
    """*doc* as block-style YAML in its own key order, for settings files a
    program writes and a person may read and edit afterwards."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=False).encode("utf-8")


def no_unknown_keys(body: dict, allowed: set[str], prefix: str, source: str) -> None:
    for k in body:
        if k not in allowed:
            raise ConfigError(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(allowed))})", source)
