"""Finding a path's history: from what a user typed to index versions.

A user names a path as a tree path (absolute or relative, the plain name or
any version name) or as ``STUDY:relative/path``.  :func:`resolve` turns
either into a study and an uploaded path; :func:`history` lists versions
from the index (never by reading manifests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from ..core import layout
from ..core.jsonl import encode_bytes
from .access import reading
from .config import Config
from ..core.errors import NotFound
from ..store.index import Version
from ..store.store import Store


@dataclass
class Target:
    store: Store
    path: bytes               # uploaded path (b"" = the whole study)
    is_dir: bool
    version: int | None       # when a version name was given
    tree_abs: bytes           # what the user pointed at, in the tree


@dataclass
class Entry:
    """One version for display."""
    version: Version
    upload: str
    tree_path: str
    provenance: dict   # see provenance()

    def to_json(self, study: str) -> dict:
        v = self.version
        d = {"version": v.n, "blake3": v.blake3, "size": v.size, "received": v.received,
             "upload": self.upload, "tree_path": self.tree_path, "study": study,
             "mtime_ns": v.mtime_ns, "mode": v.mode, "source": self.provenance["location"],
             "provenance": self.provenance}
        encode_bytes(d, "path", v.path)
        return d


def resolve(cfg: Config, arg: str) -> Target:
    """The study and path *arg* names, its store open and its index checked
    (a permission problem says who may read the study: access.py)."""
    study_name, sep, rest = arg.partition(":")
    if sep and study_name in cfg.studies and not os.path.lexists(arg):
        s = cfg.study(study_name)
        with reading(cfg, s):
            store = Store.open(*s.store_args())
            rel = os.fsencode(rest.strip("/"))
            return _resolve_rel(store, rel, os.fsencode(store.tree) + (b"/" + rel if rel else b""))
    absp = os.fsencode(os.path.abspath(arg))
    for s in cfg.studies.values():
        for root in {os.fsencode(os.path.abspath(s.tree)), os.fsencode(os.path.realpath(s.tree))}:
            if absp == root or absp.startswith(root + b"/"):
                with reading(cfg, s):
                    store = Store.open(*s.store_args())
                    return _resolve_rel(store, absp[len(root) + 1:], absp)
    studies = ", ".join(sorted(cfg.studies))
    if sep and layout.STUDY_NAME_RE.match(study_name) and not os.path.lexists(arg):
        # STUDY:path with a study that is not configured: say that, not "not in a tree"
        raise NotFound(f"no study {study_name} (studies: {studies})")
    trees = ", ".join(s.tree for s in cfg.studies.values())
    raise NotFound(f"{arg} is not inside a study's tree ({trees}); "
                   f"or name it as STUDY:path (studies: {studies})")


def _resolve_rel(store: Store, rel: bytes, tree_abs: bytes) -> Target:
    index = store.index     # opened (and checked) here, where resolve() turns permission errors into a line
    if not rel:
        return Target(store, b"", True, None, tree_abs)
    parts = rel.split(b"/")
    try:
        for p in parts:
            layout.check_component(p)
    except ValueError:
        raise NotFound(f"{layout.display(rel)} is not a valid path in a tree") from None
    src: list[bytes] = []
    def decoded(dec: bytes | None, tree_rel: bytes) -> bytes:
        if dec is not None:
            return dec
        hit = index.resolve_cut(tree_rel)   # a name cut to fit 255 bytes: only the index knows
        if hit is None:
            raise NotFound(f"no history for {layout.display(rel)} in study {store.name}")
        return hit[0].rpartition(b"/")[2]

    for i, comp in enumerate(parts[:-1]):
        src.append(decoded(layout.unplain_name(comp), b"/".join(parts[: i + 1])))
    version = None
    parsed = layout.parse_version_name(parts[-1])
    if parsed is not None:
        orig, version, _stamp = parsed
        src.append(decoded(orig, rel))
    else:
        src.append(decoded(layout.unplain_name(parts[-1]), rel))
    path = b"/".join(src)
    is_file = index.has_path(path)
    is_dir = version is None and index.has_dir(path)
    if is_file and is_dir:
        is_file = not os.path.isdir(tree_abs)
        is_dir = not is_file
    if not (is_file or is_dir):
        raise NotFound(f"no history for {layout.display(rel)} in study {store.name}")
    if version is not None and index.version(path, version) is None:
        raise NotFound(f"{layout.display(rel)}: there is no version {version}")
    return Target(store, path, is_dir and not is_file, version, tree_abs)


def history(t: Target) -> list[Entry]:
    """Versions newest first (by upload, then path)."""
    index = t.store.index
    if t.is_dir:
        versions = list(index.iter_versions(t.path))
    else:
        versions = index.versions_of(t.path)
    versions.sort(key=lambda v: (-v.seq, v.path, -v.n))
    uploads: dict[int, tuple[dict, dict]] = {}
    out = []
    troot = os.path.abspath(t.store.tree)
    for v in versions:
        hit = uploads.get(v.seq)
        if hit is None:
            up = index.upload(v.seq) or {}
            hit = uploads[v.seq] = up, provenance(up)
        up, prov = hit
        out.append(Entry(v, up.get("upload", "?"),
                         os.path.join(troot, os.fsdecode(layout.version_relpath(v.path, v.n, v.stamp))), prov))
    return out


def provenance(summary: dict) -> dict:
    """Where an upload came from, from the index's summary of its manifest
    (no manifest is read).  ``verified`` is true when every file was checked
    against the sender's upload description; the sender's own account
    (user, host, client, ...) is there only then."""
    up = summary.get("uploader") or {}
    prov: dict = {"location": summary.get("source", "?"), "received": summary.get("received"),
                  "uploader": {"uid": up.get("uid"), "name": up.get("name")},
                  "verified": summary.get("description") is not None}
    desc = summary.get("description")
    if desc is not None:
        prov.update({"user": desc.get("user"), "host": desc.get("host"), "client": desc.get("client"),
                     "platform": desc.get("platform"), "folder": desc.get("source"),
                     "started": desc.get("started"), "ended": desc.get("ended"),
                     "description": desc.get("blake3")})
    return prov


def _show(x) -> str:
    """The sender chose these strings: no control characters reach a terminal."""
    text = str(x)
    try:   # a location cut from an undecodable entry name shows its original bytes
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return layout.display(raw)


def provenance_text(prov: dict) -> str:
    """One readable line: "from labA by jdoe@LAB-PC-3 (eidetic 0.2.0), verified"."""
    loc = _show(prov.get("location", "?"))
    if prov.get("verified"):
        return (f"from {loc} by {_show(prov.get('user'))}@{_show(prov.get('host'))} "
                f"({_show(prov.get('client'))}), verified")
    return f"from {loc} by {_uploader(prov)}, no description"


def provenance_short(prov: dict) -> str:
    """For a table column: "labA by jdoe@LAB-PC-3, verified", "labA by root"."""
    loc = _show(prov.get("location", "?"))
    if prov.get("verified"):
        return f"{loc} by {_show(prov.get('user'))}@{_show(prov.get('host'))}, verified"
    return f"{loc} by {_uploader(prov)}"


def _uploader(prov: dict) -> str:
    up = prov.get("uploader") or {}
    return _show(up.get("name") or (f"uid {up['uid']}" if up.get("uid") is not None else "?"))


def select(versions: list[Version], n: int | None = None, at: datetime | None = None,
           upload_seq: int | None = None) -> Version | None:
    """The version wanted among one path's versions (oldest first); latest by default."""
    chosen = None
    for v in versions:
        if n is not None:
            if v.n == n:
                return v
            continue
        if at is not None and layout.parse_utc_iso(v.received) > at:
            break
        if upload_seq is not None and v.seq > upload_seq:
            break
        chosen = v
    return chosen
