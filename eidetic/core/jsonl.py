"""JSON Lines, the archive's text format (manifests, upload descriptions,
state records): byte strings that may not be UTF-8, one strict line parser,
and the canonical dump whose bytes are hashed.
"""

from __future__ import annotations

import base64
import json


def encode_bytes(obj: dict, key: str, value: bytes) -> None:
    """Store *value* under *key* when it is valid UTF-8, else under *key*_b64."""
    try:
        obj[key] = value.decode("utf-8")
    except UnicodeDecodeError:
        obj[key + "_b64"] = base64.b64encode(value).decode("ascii")


def int_field(obj: dict, key: str) -> int:
    """*obj*[*key*], which must be an integer (not a bool); ValueError else."""
    v = obj.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{key} must be an integer")
    return v


def str_field(obj: dict, key: str) -> str:
    """*obj*[*key*], which must be a string; ValueError else."""
    v = obj.get(key)
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string")
    return v


def decode_bytes(obj: dict, key: str) -> bytes:
    if key in obj:
        return str_field(obj, key).encode("utf-8")
    v = obj.get(key + "_b64")
    if not isinstance(v, str):
        raise ValueError(f"missing {key}")
    raw = base64.b64decode(v.encode("ascii"), validate=True)
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw
    raise ValueError(f"{key}_b64 holds valid UTF-8; it must be written as {key}")


def parse_json_line(line: bytes) -> dict:
    """One line of a JSON Lines file (manifests, upload descriptions) as a
    dict; ValueError saying what is wrong with it."""
    if not line.endswith(b"\n"):
        raise ValueError("truncated")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):   # RecursionError: nesting deeper than the parser's stack
        raise ValueError("not JSON") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return obj


def dumps(obj: dict) -> bytes:
    # ensure_ascii keeps every manifest pure ASCII, so its bytes (and hash)
    # do not depend on an encoder's choices.
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
