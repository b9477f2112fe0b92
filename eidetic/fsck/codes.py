"""The finding codes of fsck and the finding itself.

A code is ``E0NN`` (an error: fsck exits 1) or ``W0NN`` (a warning: reported,
exit 0); a finding's severity follows from its code.  :data:`CODES` holds
"title: meaning"; the title is what a report line shows before the path.
store_format.md, section "fsck findings", holds the same table
(tests/test_fsck_codes.py compares the two).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..core import layout

CODES: dict[str, str] = {
    # the store itself
    "E001": "store marker missing: the directory has no eidetic-store file, so it is not an eidetic store (fatal)",
    "E002": "store marker not understood: unreadable, of an unknown format version, or of another study (fatal)",
    "E003": "store directory missing: objects/, manifests/ or tmp/ does not exist",
    # manifests and HEAD
    "E010": "manifest unreadable: not valid JSON lines, truncated, or its trailer does not match its records",
    "E011": "manifest chain broken: prev does not match the digest of the previous manifest (a manifest was edited)",
    "E012": "manifest missing: a gap in the sequence numbers (a manifest was removed)",
    "E013": "manifest misnamed: the seq in its header is not the seq in its file name (inserted or renamed)",
    "E014": "foreign file in manifests/: a name that is not a manifest name (inserted by hand)",
    "E015": "HEAD does not match the last manifest: the last manifest was removed or edited, or HEAD was edited",
    "W016": "HEAD one behind a valid next manifest: ingest was interrupted at its commit point; "
            "re-running ingest finishes it",
    "E017": "HEAD missing: HEAD is missing or unreadable although manifests exist",
    "E018": "manifest of another study: its header names a different study",
    # objects
    "E020": "object corrupt: its bytes no longer hash to its name (bit rot, or an edit through a hardlink)",
    "E021": "object missing: a manifest refers to it but objects/ does not hold it",
    "E022": "object writable: it has write bits, and so has every tree name linked to it",
    "E023": "foreign file under objects/: not an object name, or not a regular file",
    "W024": "orphan object: no manifest refers to it (left by a failed or interrupted upload)",
    # tree
    "E030": "tree name missing: a version name or plain name is not in the tree (removed by hand)",
    "E031": "tree file replaced: the name is not a hardlink to the object of its version",
    "E032": "plain name stale: the plain name shows an older version, not the latest",
    "E033": "unexpected tree entry: a file, directory or symlink that no version accounts for (added by hand)",
    "E034": "tree directory writable: group or others could add, remove or rename names in it",
    "E035": "tree missing: the study's tree directory does not exist or is not a directory",
    "W036": "tree name not yet created: its upload is committed but not yet applied to the index "
            "(interrupted ingest; re-running ingest finishes it)",
    "E037": "tree directory unreadable: its entries could not be listed",
    # index
    "E040": "index out of step: it differs from an index rebuilt from the manifests",
    "E041": "index missing: the index is missing or unreadable although there are manifests",
    "W042": "index behind HEAD while an ingest catches it up: it has applied fewer manifests than HEAD names "
            "and an ingest holding the store lock is applying them (one behind while an upload is applied is no "
            "finding)",
    "E043": "index damaged: data.mdb is empty, cut short, not an LMDB file, or its pages are not as LMDB wrote "
            "them (disk damage, or an edit); readers refuse it; 'fsck --repair' or the next ingest rebuilds it",
    "E044": "index behind HEAD: it has applied fewer manifests than HEAD names and no ingest is applying "
            "them (an interrupted ingest, or an old copy put back); readers refuse it until ingest or "
            "'fsck --repair' catches it up",
    # leftovers
    "W050": "leftover temp file in the store: an entry in tmp/, or a temp name elsewhere, left by an interrupted write",
    "W051": "leftover temp file in the tree: a temp name left by an interrupted tree update",
    "W060": "tree and index not compared: the manifest chain is broken, so there is nothing sound to compare "
            "them with",
    # a replica ('fsck --replica NAME'), compared with the local chain
    "E070": "replica marker wrong: the replica's eidetic-store is missing, or differs from the store's (another "
            "study or store format)",
    "E071": "replica manifest missing: a manifest up to the replica's HEAD is not on the replica",
    "E072": "replica manifest differs: its size, recorded BLAKE3 or bytes are not those of the store's manifest",
    "E073": "replica HEAD wrong: unreadable, or it names a manifest with a digest the local chain does not have "
            "(another history)",
    "W074": "replica behind: uploads of the local chain not replicated yet; 'eidetic replicate' (or the daemon) "
            "sends them",
    "E075": "replica object missing: a replicated manifest refers to it but the replica does not hold it",
    "E076": "replica object size wrong: its size on the replica is not the size its manifest records",
    "E077": "replica object corrupt: its recorded BLAKE3 is not its id or is missing where the replica records "
            "one, or (with --read-data) its bytes do not hash to its id",
    "E078": "replica retention missing or short: retention_days is set but the object or manifest has no Object "
            "Lock retention, another mode, or one ending before its upload's received time plus retention_days",
    "E079": "replica ahead of the store: the replica holds manifests past the local chain (the store lost "
            "uploads, or the replica belongs to another store)",
}

FATAL = frozenset({"E001", "E002"})
# Findings after which the manifests cannot be trusted as a whole: repair
# leaves the index and tree alone (they may hold the only record of what
# the damaged manifests said).
CHAIN_BROKEN = frozenset({"E010", "E011", "E012", "E013", "E015", "E018"})
# Findings an ingest writing beside a lock-free check can cause (looked at again at the end).
CONCURRENT = frozenset({"W016", "W024", "W036", "W050", "W051", "E031", "E032", "E033"})


@dataclass(frozen=True)
class Finding:
    code: str
    path: str               # for display (undecodable bytes as \xNN)
    detail: str = ""
    raw: bytes | None = field(default=None, compare=False, repr=False)   # the real path
    data: Any = field(default=None, compare=False, repr=False)          # what repair needs

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown fsck code {self.code}")

    @property
    def severity(self) -> str:
        return "error" if self.code.startswith("E") else "warning"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    @property
    def title(self) -> str:
        return CODES[self.code].split(":", 1)[0]

    def line(self) -> str:
        return f"{self.code} {self.title}: {self.path}" + (f" ({self.detail})" if self.detail else "")

    def to_json(self) -> dict:
        return {"code": self.code, "severity": self.severity, "path": self.path, "detail": self.detail}


def finding(code: str, path: bytes | str, detail: str = "", data: Any = None) -> Finding:
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return Finding(code, layout.display(raw), detail, raw, data)


class Findings(list):
    """What :func:`eidetic.fsck.check` returns; ``stats`` says what was looked at."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stats: dict[str, int] = {"manifests": 0, "objects": 0, "object_bytes": 0, "hashed_bytes": 0,
                                      "tree_entries": 0}

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self if f.is_error]

    def add(self, code: str, path: bytes | str, detail: str = "", data: Any = None) -> None:
        self.append(finding(code, path, detail, data))


def first_of(items: list[str], total: int, limit: int) -> str:
    """``a, b and 7 more``: the first *limit* of *total* items."""
    return layout.first_and_more(items, total, limit, sep=", ", more=" and {} more")


Progress = Callable[[str, int, "int | None"], None]


def no_progress(phase: str, done: int, total: int | None) -> None:
    pass
