"""The content-addressed object store of one study.

An object is a read-only file named by the BLAKE3 of its bytes, under
``objects/<2 hex>/<62 hex>``.  Bytes are hashed as they are written, so an
object's name is always the hash of what was stored, not of what a source
claimed to hold.  Objects are placed by rename; durability is batched per
upload by the caller (one ``syncfs`` before the manifest commits).

An object file whose name exists is trusted only when a committed manifest
refers to it (the index knows) or it was placed by this process; any other
(for instance one left by a run killed before its syncfs) never counts: a
put writes its fresh copy and renames it over whatever is there.

Where the source and the store are on one file system that can clone (XFS
with reflink=1, Btrfs), a large new object is made as a clone of the
source (``FICLONE``) instead of a copy: a new inode in tmp/ sharing the
source's extents copy-on-write, so no later write to the source changes it.
The clone's own bytes are then hashed (still: the name is the hash of what
is stored) and it is placed by the same rename as a copied object.  Whether
cloning works is learnt from the first attempt per source file system and
kept for the life of the ObjectStore (one run); a refused clone is never
an error: the object is streamed as before.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Callable, Iterator

from ..core import layout
from ..core.errors import IntegrityError
from ..core.fsutil import clone_into, fsync, link, makedirs, open_temp, rename, umask_keeps
from ..core.hashing import (CHUNK, EMPTY_ID, SMALL_FILE, hash_bytes, hash_fd, hash_path_parallel, new_hasher, pump,
                            write_all as _write_all)

OBJECT_MODE = 0o444
# A clone refused with one of these is the store's fault (as a write would be), not "cannot clone".
_STORE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


@dataclass
class PutResult:
    oid: str
    size: int
    new: bool           # False when the content was already stored


class ObjectStore:
    def __init__(self, root: str | bytes, tmp_dir: str | bytes) -> None:
        self.root = os.fsencode(root)
        self.tmp_dir = os.fsencode(tmp_dir)
        self._placed: set[str] = set()      # written (or verified) by this process
        self._can_clone: dict[int, bool] = {}   # source st_dev -> did its first clone work
        self.cloned = 0                     # objects made as clones (for reports and tests)
        # Object temp files are created 0444 at open (the fd stays writable):
        # one fchmod(2) less per new object (10,954 calls for 12,506 files).
        # Only when the umask keeps 0444 as it is (read once: it does not
        # change in a running eidetic); otherwise fchmod as before.
        self._mode_at_open = umask_keeps(OBJECT_MODE)

    # ---------------------------------------------------------------- paths

    def path(self, oid: str, twin: int = 0) -> bytes:
        return self.root + b"/" + layout.object_relpath(oid, twin).encode()

    def exists(self, oid: str) -> bool:
        return os.path.lexists(self.path(oid))

    # ---------------------------------------------------------------- write

    def put_fd(self, src: int, size_hint: int, trusted: Callable[[str], bool],
               maybe_known: Callable[[int], bool] = lambda size: False, dev: int | None = None) -> PutResult:
        """Store everything readable from the open file *src*.

        Small files are read whole, hashed, and written only when new.  A large
        file whose size matches an existing object is hashed first and copied
        only when new (a re-send then costs one read); other large files are
        copied and hashed in one pass.  *dev*: the st_dev of *src*, a regular
        file the caller opened without following links; given, a large new
        file is cloned rather than copied where that file system can.
        """
        if size_hint <= SMALL_FILE:
            data = _read_all(src, size_hint)
            if len(data) <= SMALL_FILE:
                oid = hash_bytes(data)
                if self._known(oid, trusted):
                    return PutResult(oid, len(data), False)
                self._place_bytes(oid, data)
                return PutResult(oid, len(data), True)
            # It grew past the small limit while we read: stream the rest.
            return self._copy_stream(src, prefix=data, trusted=trusted)
        if maybe_known(size_hint):
            oid, n = hash_fd(src)
            if self._known(oid, trusted):
                return PutResult(oid, n, False)
            # New after all: copy.  If the source changed between the two reads
            # the stored bytes are still self-consistent and the caller's stat
            # check reports the change.
            os.lseek(src, 0, os.SEEK_SET)
        return self._copy_stream(src, b"", trusted, dev)

    def _known(self, oid: str, trusted: Callable[[str], bool]) -> bool:
        """May the put skip writing *oid*?  Only for an object this process
        placed, or one the index trusts that is present (a missing trusted
        object is written again).  Any other file of that name is never
        looked at: the caller's fresh copy is renamed over it, atomically,
        whether it was a torn leftover or a sound one (same name, same bytes
        by hash).  That saves an lstat(2) per new object (11,227 failed
        newfstatat calls for 12,506 new files) and a re-read per leftover."""
        if oid in self._placed:
            return True
        if trusted(oid) and os.path.lexists(self.path(oid)):
            self._placed.add(oid)
            return True
        return False

    def _new_tmp(self) -> tuple[bytes, int]:
        """A new temp file in the store's tmp/ (2700: private whatever its
        own mode), open for writing; call _final_mode before placing it."""
        return open_temp(self.tmp_dir, OBJECT_MODE if self._mode_at_open else 0o600)

    def _final_mode(self, fd: int) -> None:
        if not self._mode_at_open:
            os.fchmod(fd, OBJECT_MODE)

    def _place_bytes(self, oid: str, data: bytes | memoryview) -> None:
        tmp, fd = self._new_tmp()
        try:
            _write_all(fd, data)
            self._final_mode(fd)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        self._rename_in(tmp, oid)

    def _copy_stream(self, src: int, prefix: bytes, trusted: Callable[[str], bool],
                     dev: int | None = None) -> PutResult:
        tmp, fd = self._new_tmp()
        try:
            if dev is not None and self._clone(fd, src, dev):
                oid, total = _hash_own(tmp)       # the clone's bytes: what is stored is what is named
                self.cloned += 1
            else:
                h = new_hasher()
                total = 0
                if prefix:
                    h.update(prefix)
                    _write_all(fd, prefix)
                    total = len(prefix)
                total += pump(src, h, fd)
                oid = h.hexdigest()
            if self._known(oid, trusted):
                os.close(fd)
                fd = -1
                _unlink_quiet(tmp)
                return PutResult(oid, total, False)
            self._final_mode(fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        self._rename_in(tmp, oid)
        return PutResult(oid, total, True)

    def _clone(self, fd: int, src: int, dev: int) -> bool:
        """Try to make the new, empty temp file *fd* a clone of *src*.  The
        first attempt per source file system decides for the rest of the run:
        after a refusal this costs nothing and the caller streams into *fd*."""
        if not self._can_clone.get(dev, True):
            return False
        try:
            clone_into(fd, src)
        except OSError as e:
            if e.errno in _STORE_ERRNOS:
                raise
            self._can_clone[dev] = False
            if os.fstat(fd).st_size:      # never expected; the stream must start from empty
                os.ftruncate(fd, 0)
            return False
        self._can_clone[dev] = True
        return True

    def _rename_in(self, tmp: bytes, oid: str) -> None:
        # Placed by rename alone: no fsync of the object or its shard here; the
        # upload's one syncfs makes them durable before the manifest commits.
        final = self.path(oid)
        try:
            rename(tmp, final)
        except FileNotFoundError:
            makedirs(os.path.dirname(final), layout.READABLE_DIR_MODE)
            rename(tmp, final)
        self._placed.add(oid)

    def remove_unreferenced(self, oids, trusted: Callable[[str], bool]) -> int:
        """Remove objects an attempt placed (*oids*: the ones its puts reported
        new) that no committed manifest refers to (*trusted* is the index's
        answer): a refused upload, or one whose sync failed, leaves no orphan.
        An object the index knows is shared with a committed upload and stays.
        Best effort; returns how many were removed."""
        n = 0
        for oid in dict.fromkeys(oids):
            try:
                if trusted(oid):
                    continue
            except Exception:  # noqa: BLE001 - cannot tell: keep it (an orphan is only a warning)
                continue
            self._placed.discard(oid)       # a later put writes (or re-verifies) it again
            try:
                os.unlink(self.path(oid))
                n += 1
            except OSError:
                pass
        return n

    # ----------------------------------------------------------------- read

    def open(self, oid: str) -> int:
        return os.open(self.path(oid), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    def hash_of(self, oid: str, twin: int = 0) -> tuple[str, int]:
        """Re-hash an object file; returns (actual id, size)."""
        p = self.path(oid, twin)
        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_size > 16 * CHUNK:   # our own file: mmap and threads are safe
                return hash_path_parallel(p), st.st_size
            return hash_fd(fd)
        finally:
            os.close(fd)

    def verify(self, oid: str, twin: int = 0) -> bool:
        try:
            return self.hash_of(oid, twin)[0] == oid
        except OSError:
            return False

    def copy_out(self, oid: str, dst_fd: int) -> int:
        """Copy an object to *dst_fd*, verifying every byte against its id."""
        fd = self.open(oid)
        h = new_hasher()
        try:
            total = pump(fd, h, dst_fd)
        finally:
            os.close(fd)
        if h.hexdigest() != oid:
            raise IntegrityError(f"object {oid} is corrupt (its bytes hash to {h.hexdigest()})")
        return total

    def iter_files(self) -> Iterator[tuple[str, int, bytes]]:
        """Every (id, twin, path) found under objects/; foreign names yield id ''."""
        try:
            shards = sorted(os.listdir(self.root + b"/objects"))
        except FileNotFoundError:
            return
        for shard in shards:
            sdir = self.root + b"/objects/" + shard
            if not os.path.isdir(sdir) or os.path.islink(sdir):
                yield "", 0, sdir
                continue
            for name in sorted(os.listdir(sdir)):
                parsed = layout.parse_object_relpath(shard.decode("ascii", "replace"),
                                                     name.decode("ascii", "replace"))
                if parsed is None:
                    yield "", 0, sdir + b"/" + name
                else:
                    yield parsed[0], parsed[1], sdir + b"/" + name

    # --------------------------------------------------------------- linking

    def link(self, oid: str, dest: bytes) -> None:
        """Hardlink an object to *dest* (which must not exist).

        ext4 allows 65,000 links per inode; past that the link goes to a twin
        (``<id>.1``, ``.2``…), a verified copy of the object.
        """
        twin = 0
        while True:
            src = self.path(oid, twin)
            try:
                link(src, dest)
                return
            except OSError as e:
                if e.errno == errno.EMLINK:
                    twin += 1
                    continue
                if e.errno == errno.ENOENT and twin > 0 and not os.path.lexists(src):
                    self._make_twin(oid, twin)
                    continue
                raise

    def _make_twin(self, oid: str, twin: int) -> None:
        tmp, fd = self._new_tmp()
        try:
            self.copy_out(oid, fd)
            self._final_mode(fd)
            fsync(fd, tmp)
        except BaseException:
            os.close(fd)
            _unlink_quiet(tmp)
            raise
        os.close(fd)
        rename(tmp, self.path(oid, twin))

    def inode_ids(self, oid: str) -> Iterator[tuple[int, int]]:
        """(st_dev, st_ino) of the object and each of its twins."""
        twin = 0
        while True:
            try:
                st = os.lstat(self.path(oid, twin))
            except FileNotFoundError:
                return
            yield st.st_dev, st.st_ino
            twin += 1


def _hash_own(tmp: bytes) -> tuple[str, int]:
    """(id, size) of a temp file of our own (a clone), read back through one
    reused buffer: memory stays flat for any size (an mmap would count the
    whole file in the process's resident set), and one thread hashes faster
    than the clone's blocks come off the disk."""
    fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hash_fd(fd)
    finally:
        os.close(fd)


def _read_all(fd: int, size_hint: int) -> bytes:
    """Read to EOF, or stop once past SMALL_FILE (the file grew: caller streams the rest).
    Asking for one byte more than expected detects growth without a second call."""
    parts = []
    total = 0
    want = max(size_hint, 0) + 1
    while total <= SMALL_FILE:
        ask = min(want, SMALL_FILE + 1 - total)
        chunk = os.read(fd, ask)
        parts.append(chunk)
        total += len(chunk)
        if len(chunk) < ask:  # a short read of a regular file is EOF
            break
        want = CHUNK
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _unlink_quiet(p: bytes) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass



