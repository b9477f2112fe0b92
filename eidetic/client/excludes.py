"""What a send leaves out: OS and editor droppings, and the patterns a
collector or a saved destination adds.

Pure functions (no I/O): the walker asks :meth:`Excludes.excluded` for each
name it meets, and an excluded folder is not descended into.

Patterns are shell-style (``*``, ``?``, ``[...]``) and match one name, at any
depth (``*.tmp`` leaves out every ``.tmp`` file), unless they contain a
``/``: then they match the whole path from the top of what is sent
(``eprime/pilot/*``).  The defaults match regardless of letter case, because
Windows and macOS write them in either case (``thumbs.db``) and treat the
names as one; a collector's own patterns match exactly as typed.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

# Never research data: thumbnail caches, folder settings, Finder metadata and
# AppleDouble files, Office lock files, recycle bins and volume metadata.
DEFAULT_EXCLUDES = ("Thumbs.db", "desktop.ini", ".DS_Store", "._*", "~$*", "$RECYCLE.BIN",
                    "System Volume Information", ".Trash-*")


def _compile(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE if ignore_case else 0)


def _text(name: bytes) -> str:
    # A pattern is text a person typed; a name is any byte string.  Names are
    # compared as UTF-8 text, and a name that is not UTF-8 keeps its odd bytes
    # as lone surrogates, which no pattern character equals (only * and ?).
    return name.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Excludes:
    """The patterns in force for one send."""

    patterns: tuple[str, ...] = ()          # the collector's and the destination's own
    defaults: bool = True                   # False: --no-default-excludes
    _names: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _paths: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names, paths = [], []
        for p in self.patterns:
            p = p.strip("/")
            if not p:
                continue
            (paths if "/" in p else names).append(_compile(p, ignore_case=False))
        if self.defaults:
            names.extend(_compile(p, ignore_case=True) for p in DEFAULT_EXCLUDES)
        object.__setattr__(self, "_names", tuple(names))
        object.__setattr__(self, "_paths", tuple(paths))

    def all_patterns(self) -> tuple[str, ...]:
        return (DEFAULT_EXCLUDES if self.defaults else ()) + tuple(self.patterns)

    def excluded(self, rel: bytes) -> bool:
        """Whether the file or folder at *rel* (``/``-separated, relative to the
        top of the send) is left out."""
        text = _text(rel)
        name = text.rpartition("/")[2]
        if any(rx.match(name) for rx in self._names):
            return True
        return any(rx.match(text) for rx in self._paths)


def check_pattern(pattern: str) -> str | None:
    """Why *pattern* cannot be used, or None."""
    if not pattern.strip("/"):
        return "an exclude pattern cannot be empty"
    if "\0" in pattern:
        return "an exclude pattern cannot contain a NUL character"
    return None
