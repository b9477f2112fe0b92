"""fsck: a collecting checker (and careful repairer) for one study.

:func:`check` never stops at the first problem: it runs its passes in turn
and returns every :class:`Finding`, each with a code from :data:`CODES`.
Only a missing or unknown store marker is fatal.  The passes: the manifest
chain, replayed into a fresh index that the live one is compared with
(chain.py); the tree against that fresh index (tree.py); objects/ against
what the manifests need, and the re-hash, which a worker pool starts on
first and runs beside the other passes (objects.py); leftover temp files.

Findings an ingest running beside a lock-free check can cause are looked at
again at the end (:meth:`Chain.settle`) and dropped when the ingest explains
them.  :func:`repair` (repair.py) fixes what can be derived again, and
fetches lost objects from replicas.  :func:`check_replica` (replica.py)
checks a replica against the local chain.  This package prints nothing and
imports no CLI code.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import ExitStack, closing
from typing import TYPE_CHECKING

from ..core import layout
from ..core.errors import StoreFormatError
from ..core.fsutil import is_temp_name
from .chain import Chain
from .codes import CHAIN_BROKEN, CODES, FATAL, Finding, Findings, Progress, finding, no_progress
from .objects import Rehash, check_objects
from .repair import RepairReport, repair
from .replica import check_replica
from .tree import TreeScan

if TYPE_CHECKING:
    from ..store.store import Store


def check(store: Store, quick: bool = False, progress: Progress | None = None, lock: bool = False) -> Findings:
    """Every problem found in *store* and its tree.

    *quick* skips re-hashing objects (sizes are still compared).
    *progress(phase, done, total)* is called from this thread, phases
    ``"manifests"`` (count), ``"tree"`` (entries), ``"objects"`` (bytes).
    Without *lock* (plain ``eidetic fsck``) no lock is taken: an ingest goes
    on beside the check, which looks at one snapshot of the index and HEAD
    as read just after it.  *lock* holds the store lock while checking
    (``fsck --repair``: nothing moves between the check and the repair)."""
    out = Findings()
    fatal = _check_marker(store)
    if fatal is not None:
        out.append(fatal)
        return out
    with ExitStack() as stack:
        held = lock and _lock_if_possible(store, stack)
        start_ns = time.time_ns()           # what changed at or after this is a concurrent writer's
        for d in ("objects", "manifests", "tmp"):
            if not os.path.isdir(os.path.join(store.root, d)):
                out.add("E003", os.path.join(store.root, d), "'fsck --repair' re-creates it" if d == "tmp" else
                        "'fsck --repair' re-creates it empty; what it held must come from a backup")
        rehash = None
        if not quick and os.path.isdir(os.path.join(store.root, "objects")):
            rehash = stack.enter_context(closing(Rehash(store.objects)))
        chain = stack.enter_context(closing(Chain(store, out, progress or no_progress, bool(held), start_ns)))
        chain.open_live()
        chain.run()
        scan = None
        if chain.broken:
            out.add("W060", store.tree, "fix the manifest chain first (restore the damaged manifests from a backup)")
        else:
            scan = TreeScan(out, chain.progress, chain.fresh, store.objects, os.fsencode(store.tree),
                            lambda seq: chain.live is not None and seq > chain.live_applied)
            scan.run()
        chain.past_head()
        check_objects(out, store.objects, chain.fresh, rehash, chain.progress)
        for tmp in (store.broot + b"/tmp", store.broot):      # all of tmp/, temp names beside it
            for name in sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []:
                if tmp != store.broot or is_temp_name(name):
                    out.add("W050", tmp + b"/" + name, "left by an interrupted write")
        if held:
            if chain.behind:
                chain.report_behind(False, chain.live_applied)
        else:
            chain.settle(scan)
        out.sort(key=lambda f: (f.code, f.path))
    return out


def _lock_if_possible(store: Store, stack: ExitStack) -> bool:
    """Hold the store lock (True); a user who may only read the store (an auditor) checks without it."""
    try:
        stack.enter_context(store.lock())
        return True
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return False


def _check_marker(store: Store) -> Finding | None:
    marker = os.path.join(store.root, layout.STORE_MARKER)
    try:
        os.lstat(marker)
    except FileNotFoundError:
        what = "no such directory" if not os.path.isdir(store.root) else "no eidetic-store marker"
        return finding("E001", marker, f"{what}: run 'eidetic init' if this is a new store")
    except OSError as e:     # not "missing": init would not help; the store is the service user's
        return finding("E002", marker, f"{e.strerror}: run fsck as the service user (or root)")
    try:
        store.check_format()
    except StoreFormatError as e:
        return finding("E002", marker, str(e.kwargs.get("detail", e)))
    except OSError as e:
        return finding("E002", marker, e.strerror or str(e))
    return None


__all__ = ["CODES", "FATAL", "CHAIN_BROKEN", "Finding", "Findings", "RepairReport", "check", "check_replica", "repair",
           "finding"]
