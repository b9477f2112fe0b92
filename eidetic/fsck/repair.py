"""fsck --repair: fix what the findings of a check show, as far as it can be
derived again (index, tree names, modes, temp files, HEAD after a crash);
never delete anything that is not ours (hand-made or replaced files go to
``<store>/lost+found/<timestamp>/``); say plainly what cannot be fixed."""

from __future__ import annotations

import os
import shutil
import stat
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Sequence

from ..core import layout
from ..core.errors import ReplicaError
from ..core.fsutil import fsync_dir, is_temp_name, link, makedirs, open_regular_nofollow, rename, temp_name
from ..core.hashing import hash_fd
from ..store.manifest import digest_of
from ..replica.restore import fetch_object
from ..store.tree import place_all
from .codes import CHAIN_BROKEN, FATAL, Finding
from .objects import name_versions

if TYPE_CHECKING:
    from ..replica.backend import Backend
    from ..store.store import Store


@dataclass
class RepairReport:
    done: list[str] = field(default_factory=list)       # what was repaired, one line each
    cannot: list[str] = field(default_factory=list)     # what could not be, and why
    notes: list[str] = field(default_factory=list)      # what was deliberately left as it is
    lost_and_found: str | None = None                   # where moved-aside tree files went


def repair(store: Store, findings: list[Finding], lock: bool = True, replicas: Sequence[Backend] = ()
           ) -> RepairReport:
    """Repair what *findings* (from :func:`check`) show.  Holds the store
    lock unless the caller already does (``lock=False``).  A corrupt or
    missing object no tree name holds is fetched from the first of
    *replicas* whose copy hashes to its id."""
    rep = RepairReport()
    fatal = [f for f in findings if f.code in FATAL]
    for f in fatal:
        rep.cannot.append(f"{f.line()}: fsck does not touch a directory it cannot recognise as a store")
    if not fatal:
        with store.lock() if lock else nullcontext():
            _Repairer(store, findings, rep, replicas).run()
    return rep


class _Repairer:
    def __init__(self, store: Store, findings: list[Finding], rep: RepairReport,
                 replicas: Sequence[Backend] = ()) -> None:
        self.store, self.rep = store, rep
        self.replicas = list(replicas)
        self.replaced: dict[str, tuple[int, int]] = {}   # object fetched over a corrupt one -> the old inode
        self.by_code: dict[str, list[Finding]] = {}
        for f in findings:
            self.by_code.setdefault(f.code, []).append(f)
        self.tree_root = os.fsencode(store.tree)
        self._lost: dict[str, bytes] = {}
        self.bad_objects: set[str] = set()

    def get(self, *codes: str) -> list[Finding]:
        return [f for c in codes for f in self.by_code.get(c, [])]

    def has(self, *codes: str) -> bool:
        return any(c in self.by_code for c in codes)

    def run(self) -> None:
        rep = self.rep
        for f in self.get("E003"):
            makedirs(f.raw, 0o700)
            rep.done.append(f"re-created {f.path}")
        self._temps()
        broken = self.has(*CHAIN_BROKEN)
        head_changed = self._manifests(broken)
        self._objects()
        rebuilt = False
        if broken:
            rep.cannot.append("the index and the tree were left as they are: with the manifest chain broken "
                              "they may hold the only record of what the damaged manifests said")
        elif head_changed or self.has("E040", "E041", "E043"):
            rep.done.append(f"rebuilt the index from {self.store.rebuild_index()} manifest(s)")
            rebuilt = True
        else:       # merely behind (E044, W042) is caught up; a sound one is left as it is
            notes: list[str] = []
            self.store.prepare_index(notes.append)
            rep.done.extend(line.split(": ", 1)[1] for line in notes)
            rebuilt = bool(notes)
        if self.replaced and not broken:
            self._relink_replaced()
        for f in self.get("E034"):
            self._drop_bits(f, stat.S_IWGRP | stat.S_IWOTH, "group/other write bits", directory=True)
        if not broken:
            for f in self.get("E031", "E033"):
                what = "replaced tree entry" if f.code == "E031" else "hand-added tree entry"
                self._move_aside(f.raw, f.data["rel"], what)
            if rebuilt or self.has("E030", "E031", "E032", "E035", "W036"):
                self._materialize()
        orphans = self.get("W024")
        if orphans:
            rep.notes.append(f"{len(orphans)} orphan object(s) left in place: harmless, and a later upload "
                             "of the same content uses them")
        for f in self.get("E037"):
            rep.cannot.append(f"{f.line()}: fix the directory's permissions, then run fsck again")
        if "tree" in self._lost:
            rep.lost_and_found = layout.display(self._lost["tree"])

    # --------------------------------------------------------- lost+found

    def _lost_dir(self, kind: str) -> bytes:
        """``lost+found/<timestamp>`` for tree entries, ``lost+found/<timestamp>-store`` for store files."""
        if kind not in self._lost:
            base = self.store.broot + b"/lost+found"
            makedirs(base, 0o700)
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ").encode()
            n = 0
            while True:
                cand = base + b"/" + stamp + (b".%d" % n if n else b"") + (b"-store" if kind == "store" else b"")
                try:
                    os.mkdir(cand, 0o700)
                    break
                except FileExistsError:
                    n += 1
            self._lost[kind] = cand
        return self._lost[kind]

    def _move_aside(self, src: bytes, rel: bytes, what: str, kind: str = "tree") -> None:
        dest = self._lost_dir(kind) + b"/" + rel
        try:
            makedirs(os.path.dirname(dest), 0o700, 0o700)
            rename(src, dest)
        except FileNotFoundError:
            return
        except OSError as e:
            return self.rep.cannot.append(f"could not move {layout.display(src)} aside: {e.strerror}")
        fsync_dir(os.path.dirname(src))
        self.rep.done.append(f"moved {what} {layout.display(src)} to {layout.display(dest)}")

    def _drop_bits(self, f: Finding, bits: int, what: str, directory: bool = False) -> None:
        try:
            st = os.lstat(f.raw)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode) or not directory:
            os.chmod(f.raw, stat.S_IMODE(st.st_mode) & ~bits)
            self.rep.done.append(f"removed {what} from {f.path}")

    def _temps(self) -> None:
        for f in self.get("W050", "W051"):
            try:
                st = os.lstat(f.raw)
            except FileNotFoundError:
                continue
            if f.code == "W051" and not is_temp_name(os.path.basename(f.raw)):
                continue   # only ever remove our own temp names from a tree
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(f.raw, ignore_errors=True)
            else:
                os.unlink(f.raw)
            self.rep.done.append(f"removed temp file {f.path}")

    # ------------------------------------------------- manifests and objects

    def _manifests(self, broken: bool) -> bool:
        """Foreign files moved aside, HEAD rewritten or advanced (when the chain holds): did HEAD change?"""
        rep, store = self.rep, self.store
        for f in self.get("E014"):
            self._move_aside(f.raw, f.data["store_rel"], "foreign file", "store")
        for f in self.get(*sorted(CHAIN_BROKEN)):
            rep.cannot.append(f"{f.line()}: a damaged manifest chain cannot be rebuilt from anything in the "
                              "store; restore the manifest (or HEAD) from a backup")
        changed = False
        seqs = store.manifest_seqs() if self.has("E017") and not broken else []
        if seqs:
            store.set_head(seqs[-1], digest_of(store.manifest_path(seqs[-1])))
            rep.done.append(f"rewrote HEAD: manifest {seqs[-1]}")
            changed = True
        if self.has("W016") and not broken:
            before = store.head()[0]
            seq, _ = store.recover_head()
            if seq != before:
                rep.done.append(f"advanced HEAD to manifest {seq} (an ingest was interrupted at its commit "
                                "point; 'eidetic ingest' still finishes its inbox entry)")
                changed = True
        return changed

    def _objects(self) -> None:
        rep = self.rep
        for f in self.get("E022"):
            self._drop_bits(f, 0o222, "write bits")
        for f in self.get("E023"):
            self._move_aside(f.raw, f.data["store_rel"], "foreign file", "store")
        for f in self.get("E021"):
            oid = f.data["oid"]
            if self._restore_from_tree(oid, f.data["versions"]):
                rep.done.append(f"restored missing object {oid} from its tree name")
                continue
            if self._from_replica(oid, None):
                continue
            self.bad_objects.add(oid)
            if f.data.get("description"):
                rep.cannot.append(f"object {oid} is missing: {f.data['description']}; restore it from a "
                                  "backup (no tree name holds its bytes)")
            else:
                rep.cannot.append(f"object {oid} is missing and no tree name holds its bytes; "
                                  f"{_affected_text(f.data)}: send one of those files again or restore the "
                                  "object from a backup, then run 'fsck --repair' again for their tree names")
        for f in self.get("E020"):
            oid = f.data["oid"] if f.data else os.path.basename(f.raw).decode()
            if layout.valid_object_id(oid) and f.raw == self.store.objects.path(oid) and self._from_replica(oid, f):
                continue
            self.bad_objects.add(oid)
            rep.cannot.append(f"object {oid} is corrupt ({f.path}); {_affected_text(f.data)}: restore the "
                              "object from a backup (every tree name shares its bytes; missing names of "
                              "these versions are not re-created from corrupt bytes)")

    def _from_replica(self, oid: str, corrupt: Finding | None) -> bool:
        """Fetch object *oid* from the first replica whose copy hashes to it
        (fetch_object verifies before anything is renamed).  A *corrupt*
        object file is moved to lost+found first (never deleted); its tree
        names are relinked to the new copy once the index is ready."""
        dest = self.store.objects.path(oid)
        why: list[str] = []
        for backend in self.replicas:
            def aside() -> None:
                if corrupt is None:
                    return
                st = os.lstat(dest)
                self.replaced[oid] = (st.st_dev, st.st_ino)
                self._move_aside(dest, dest[len(self.store.broot) + 1:], "corrupt object", "store")
            try:
                fetch_object(backend, oid, self.store.objects, durable=True, before_place=aside)
            except ReplicaError as e:
                why.append(e.message)
                continue
            except OSError as e:
                why.append(f"replica {backend.name}: {e.strerror or e}")
                continue
            what = "corrupt" if corrupt is not None else "missing"
            self.rep.done.append(f"restored {what} object {oid} from replica {backend.name} (its bytes verified)")
            return True
        if why:
            self.rep.notes.append(f"object {oid} could not be fetched from a replica: " + "; ".join(why))
        return False

    def _relink_replaced(self) -> None:
        """Tree names still linked to the corrupt bytes of a replaced object
        now link the restored copy: a link made in tmp/ renamed over each
        (atomic: the name never disappears).  The corrupt inode is kept in
        lost+found."""
        store = self.store
        idx = store.index
        tmp_dir = store.broot + b"/tmp"
        n = 0
        used_by = idx.users_of(self.replaced, 1 << 62)     # one pass over the index for them all
        for oid, old in self.replaced.items():
            for v in used_by.get(oid, ([], 0))[0]:
                for rel in (layout.version_relpath(v.path, v.n, v.stamp), layout.tree_relpath(v.path)):
                    name = self.tree_root + b"/" + rel
                    try:
                        st = os.lstat(name)
                    except OSError:
                        continue        # missing: _materialize makes it
                    if (st.st_dev, st.st_ino) != old:
                        continue
                    tmp = tmp_dir + b"/" + temp_name().encode()
                    store.objects.link(oid, tmp)
                    rename(tmp, name)
                    n += 1
        if n:
            store.sync()
            self.rep.done.append(f"relinked {n} tree name(s) of the restored object(s)")

    def _restore_from_tree(self, oid: str, versions: list[tuple[bytes, int, str]]) -> bool:
        """Link a tree name that still holds the bytes of missing object *oid* back in place."""
        for path, n, stamp in versions:
            for rel in (layout.version_relpath(path, n, stamp), layout.tree_relpath(path)) if stamp else ():
                try:
                    fd, _ = open_regular_nofollow(self.tree_root + b"/" + rel)
                except OSError:
                    continue
                try:
                    if hash_fd(fd)[0] == oid:
                        dest = self.store.objects.path(oid)
                        makedirs(os.path.dirname(dest), 0o700, 0o700)
                        link(self.tree_root + b"/" + rel, dest)
                        os.chmod(dest, 0o444)
                        fsync_dir(os.path.dirname(dest))
                        return True
                except OSError:
                    continue
                finally:
                    os.close(fd)
        return False

    def _materialize(self) -> None:
        """Give every version its names again (idempotent: existing right
        names are left alone, stale plain names replaced)."""
        made, problems = place_all(self.store, self.bad_objects)
        self.rep.cannot.extend(problems)
        self.rep.done.append(f"re-created {made} missing version name(s); every plain name shows its "
                             "latest version")


def _affected_text(data: dict | None) -> str:
    if data and data.get("description"):
        return data["description"]
    if not data or not data.get("versions"):
        return "no version uses it"
    return "affected: " + name_versions(data["versions"], data.get("total", len(data["versions"])), 20)
