"""Restore a file, or a directory as it stood at a time or upload, to a
destination outside every tree and store.  Every byte is verified against
its BLAKE3 while it is copied; recorded modes and mtimes are restored.

Where it writes (docs/admin.md, "Looking at history and restoring"):

* Only at DEST.  DEST's parent is opened once (the user's own path, so
  symlinks in it are theirs to choose); everything below it is reached
  through directory fds, one component at a time with O_NOFOLLOW, so a
  symlink at DEST or at any folder inside it, placed before or swapped in
  during the checkout, is never followed.
* Never into a study's tree or store: every folder from DEST's parent up to
  / and every existing folder the checkout would write into is compared by
  identity (device, inode) with every configured tree and store, so a
  symlinked path, ``..`` or a bind mount does not get around it.
* ``--force`` replaces a file (or a symlink: the link itself) with a file,
  and writes a folder into an existing folder.  It never replaces a folder
  with a file or a file with a folder, and a symlink where a folder goes is
  refused, never replaced or followed.
* Every refusal is decided before the first byte is written.  A file is
  written to a temp name beside DEST and renamed (AtomicFile); a folder is
  written into a temp folder (beside DEST, or inside it with --force) that
  becomes DEST, or whose files are moved into DEST, only once every file in
  it was verified: a corrupt object leaves nothing at DEST.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterator

from ..core import layout
from .config import Config
from ..core.errors import DestinationExists, IntegrityError, NotFound, UsageError
from ..core.fsutil import AtomicFile, fsync, mkdir_open, open_dir_nofollow, rename_at, temp_name
from .history import Target, resolve, select
from ..store.index import Version

# Walking up from DEST's parent needs no read permission on its ancestors.
_UP = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass
class CheckoutResult:
    dest: str
    files: int
    bytes: int
    version: int | None = None     # a file's version number (a folder's files have their own)


def parse_time(text: str) -> datetime:
    """ISO 8601; a time without a zone is taken as UTC (as eidetic log prints)."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"--at {text!r}: not an ISO 8601 time (e.g. 2026-11-21T14:30:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t


def checkout(cfg: Config, arg: str, version: int | None = None, at: str | None = None,
             upload: str | None = None, dest: str | None = None, force: bool = False,
             progress: Callable[[int, int], None] | None = None) -> CheckoutResult:
    if sum(x is not None for x in (version, at, upload)) > 1:
        raise UsageError("choose at most one of --version, --at and --upload")
    t = resolve(cfg, arg)
    at_time = parse_time(at) if at is not None else None
    upload_seq = None
    if upload is not None:
        upload_seq = t.store.index.upload_seq(upload)
        if upload_seq is None:
            raise NotFound(f"study {t.store.name} has no upload {upload!r}")
    if version is None and t.version is not None and at is None and upload is None:
        version = t.version
    if t.is_dir and version is not None:
        raise UsageError("--version applies to a file; for a folder use --at or --upload")

    base = t.path.rpartition(b"/")[2] or os.fsencode(t.store.name)
    out = os.fsencode(os.path.abspath(dest)) if dest else os.fsencode(os.path.abspath(os.fsdecode(base)))
    parent, name = os.path.split(out)
    if name in (b"", b".", b".."):
        raise UsageError(f"cannot check out to {layout.display(out)}: name a file or folder to create")
    guard = _Guard(cfg)
    pfd = _open_parent(parent, out)
    try:
        guard.check_ancestors(pfd, out)
        try:
            st = _lstat(name, pfd)
        except OSError as e:     # e.g. a name longer than the file system allows
            raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None
        if st is not None:
            guard.check(st, out)
        if not t.is_dir:
            _refuse_file_dest(st, out, base, force)
            v = select(t.store.index.versions_of(t.path), version, at_time, upload_seq)
            if v is None:
                raise NotFound(_none_msg(t, version, at, upload))
            n = _write(t.store.objects, v, pfd, name, out)
            if progress:
                progress(1, n)
            return CheckoutResult(os.fsdecode(out), 1, n, v.n)

        dfd = _open_folder_dest(st, pfd, name, out, force, guard)
        try:
            files, nbytes = _checkout_folder(t, lambda: _targets(t, at_time, upload_seq),
                                             pfd, name, dfd, out, guard, progress)
        finally:
            if dfd is not None:
                os.close(dfd)
        if files == 0:
            raise NotFound(_none_msg(t, version, at, upload))
        return CheckoutResult(os.fsdecode(out), files, nbytes)
    finally:
        os.close(pfd)


class _Guard:
    """The (device, inode) of every configured study's tree and store: a
    folder with one of these identities is never written into, however it
    was reached."""

    def __init__(self, cfg: Config) -> None:
        self.roots: dict[tuple[int, int], str] = {}
        for s in cfg.studies.values():
            for kind, path in (("tree", s.tree), ("store", s.store)):
                try:
                    st = os.stat(path)
                except OSError:      # not created yet: nothing there to protect
                    continue
                self.roots[(st.st_dev, st.st_ino)] = f"study {s.name}'s {kind} ({path})"

    def check(self, st: os.stat_result, where: bytes, inside: bool = False) -> None:
        what = self.roots.get((st.st_dev, st.st_ino))
        if what is not None:
            raise UsageError(f"{layout.display(where)} is {'inside ' if inside else ''}{what}: "
                             "a checkout never writes into a tree or a store")

    def check_ancestors(self, fd: int, out: bytes) -> None:
        """DEST's parent and every folder above it, up to /."""
        prev = None
        cur = os.open(".", _UP, dir_fd=fd)
        try:
            while True:
                st = os.fstat(cur)
                if prev == (st.st_dev, st.st_ino):
                    return
                self.check(st, out, inside=True)
                prev = (st.st_dev, st.st_ino)
                up = os.open("..", _UP, dir_fd=cur)
                os.close(cur)
                cur = up
        finally:
            os.close(cur)


def _lstat(name: bytes, dir_fd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None


def _open_parent(parent: bytes, out: bytes) -> int:
    # Followed: the folder DEST goes into is the user's own path to name.
    try:
        return os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"cannot write {layout.display(out)}: its folder does not exist") from None
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None


def _refuse_file_dest(st: os.stat_result | None, out: bytes, base: bytes, force: bool) -> None:
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{layout.display(out)} is a folder; a file checkout never replaces a folder "
                         f"(name the file to create, e.g. -o {layout.display(out + b'/' + base)})")
    if not force:
        raise DestinationExists(layout.display(out))


def _open_folder_dest(st: os.stat_result | None, pfd: int, name: bytes, out: bytes, force: bool,
                      guard: _Guard) -> int | None:
    """The fd of an existing DEST folder that --force writes into; None when DEST does not exist."""
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(_link_msg(out))
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{layout.display(out)} exists and is not a folder; a folder checkout "
                         "never replaces a file (choose another -o)")
    if not force:
        raise DestinationExists(layout.display(out))
    try:
        dfd = open_dir_nofollow(name, pfd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):     # swapped since the lstat above
            raise UsageError(_link_msg(out)) from None
        raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None
    guard.check(os.fstat(dfd), out)
    return dfd


def _link_msg(where: bytes) -> str:
    return (f"{layout.display(where)} is a symbolic link where the checkout has a folder; "
            "a checkout never writes through a link nor replaces one with a folder "
            "(remove it, or choose another -o)")


def _targets(t: Target, at_time: datetime | None, upload_seq: int | None) -> Iterator[tuple[bytes, Version]]:
    """(path relative to DEST, version) of every file a folder checkout writes, streamed."""
    prefix_len = len(t.path) + 1 if t.path else 0
    index = t.store.index
    for path, versions in _grouped_under(index, t.path):
        v = select(versions, None, at_time, upload_seq)
        if v is None:
            continue
        rel = path[prefix_len:]
        if index.has_dir(path) and any(select(vs, None, at_time, upload_seq)
                                       for _, vs in _grouped_under(index, path)):
            # The path was also sent as a folder by then: as in the tree, the
            # folder takes the name and the file keeps its version name.
            head, _, name = rel.rpartition(b"/")
            rel = (head + b"/" if head else b"") + layout.version_name(name, v.n, v.stamp)
        # Components are walked fd by fd: a "..", "." or empty one (never
        # produced by ingest) would leave DEST, so it is never trusted.
        if any(c in (b"", b".", b"..") for c in rel.split(b"/")):
            raise IntegrityError(f"study {t.store.name}: the index holds an impossible path "
                                 f"{layout.display(path)}; run eidetic fsck")
        yield rel, v


def _checkout_folder(t: Target, targets: Callable[[], Iterator[tuple[bytes, Version]]], pfd: int,
                     name: bytes, dfd: int | None, out: bytes, guard: _Guard,
                     progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    if dfd is not None and not _plan(targets(), dfd, out, guard):
        return 0, 0
    # The temp folder is beside a new DEST (renamed into place at the end),
    # or inside an existing one (its files are moved in: same file system).
    where_fd = pfd if dfd is None else dfd
    stage = os.fsencode(temp_name())
    try:
        os.mkdir(stage, 0o755, dir_fd=where_fd)
    except OSError as e:     # name the destination, never the temp
        raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None
    placed = False
    try:
        sfd = open_dir_nofollow(stage, where_fd)
        try:
            files, nbytes = _write_tree(t.store.objects, targets(), sfd, out, progress)
            if files == 0:
                return 0, 0
            if dfd is None:
                try:
                    rename_at(pfd, stage, pfd, name, replace=False)
                except FileExistsError:
                    raise UsageError(f"{layout.display(out)} appeared while the checkout ran; "
                                     "nothing was written there (run it again)") from None
                except OSError as e:     # name the destination, never the temp
                    raise OSError(e.errno, e.strerror, os.fsdecode(out)) from None
                placed = True
                fsync(pfd, os.fsdecode(out))
            else:
                _merge(sfd, dfd, out, guard)
                os.rmdir(stage, dir_fd=dfd)
                placed = True
                fsync(dfd, os.fsdecode(out))
        finally:
            os.close(sfd)
    finally:
        if not placed:
            # Only our temp folder goes, fd-relative (rmtree with dir_fd never follows a symlink).
            shutil.rmtree(stage, ignore_errors=True, dir_fd=where_fd)
    return files, nbytes


def _plan(targets: Iterator[tuple[bytes, Version]], dfd: int, out: bytes, guard: _Guard) -> bool:
    """Before --force writes into the existing folder DEST: every refusal
    its contents call for.  Returns False when there is nothing to write."""
    dev = os.fstat(dfd).st_dev
    folders: dict[bytes, bool] = {b"": True}    # rel -> an existing real folder (False: absent)
    anything = False
    for rel, _v in targets:
        anything = True
        head = rel.rpartition(b"/")[0]
        present = folders.get(head)
        if present is None:
            parts = head.split(b"/")
            for i in range(1, len(parts) + 1):
                d = b"/".join(parts[:i])
                present = folders.get(d)
                if present is None:
                    present = folders[d] = _plan_folder(dfd, d, out, guard, dev)
                if not present:
                    break
            folders[head] = present
        if present:
            st = _lstat(rel, dfd)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise UsageError(f"{layout.display(out + b'/' + rel)} is a folder where the checkout has "
                                 "a file; a checkout never replaces a folder (move it aside, or choose another -o)")
    return anything


def _plan_folder(dfd: int, rel: bytes, out: bytes, guard: _Guard, dev: int) -> bool:
    # *rel*'s parents were checked first and are real folders: the lstat
    # follows no symlink but this last component, which it does not follow.
    st = _lstat(rel, dfd)
    if st is None:
        return False
    where = out + b"/" + rel
    if stat.S_ISLNK(st.st_mode):
        raise UsageError(_link_msg(where))
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{layout.display(where)} is a file where the checkout has a folder; a checkout "
                         "never replaces a file with a folder (move it aside, or choose another -o)")
    guard.check(st, where)
    if st.st_dev != dev:
        # The checkout's files are moved in by rename, which cannot cross file systems.
        raise UsageError(f"{layout.display(where)} is another file system (a mount point); "
                         "check that folder out with its own -o")
    return True


def _write_tree(objects, targets: Iterator[tuple[bytes, Version]], sfd: int, out: bytes,
                progress: Callable[[int, int], None] | None) -> tuple[int, int]:
    """Every target into the (new, ours) temp folder *sfd*, one open fd per
    folder level; targets come in path order, and a folder met again (long
    paths sort by a hash) is simply reopened."""
    stack: list[tuple[bytes, int]] = []
    files = nbytes = 0

    def pop() -> None:
        fd = stack.pop()[1]
        try:
            fsync(fd, os.fsdecode(out))      # the entries of the folders made in it
        finally:
            os.close(fd)

    try:
        for rel, v in targets:
            head, _, fname = rel.rpartition(b"/")
            parts = head.split(b"/") if head else []
            k = 0
            while k < len(stack) and k < len(parts) and stack[k][0] == parts[k]:
                k += 1
            while len(stack) > k:
                pop()
            for p in parts[k:]:
                fd, _created = mkdir_open(p, stack[-1][1] if stack else sfd, 0o755)
                stack.append((p, fd))
            nbytes += _write(objects, v, stack[-1][1] if stack else sfd, fname, out + b"/" + rel)
            files += 1
            if progress:
                progress(files, nbytes)
        while stack:
            pop()
        fsync(sfd, os.fsdecode(out))
    finally:
        for _, fd in stack:
            os.close(fd)
    return files, nbytes


def _merge(sfd: int, dfd: int, out: bytes, guard: _Guard) -> None:
    """Move the verified temp folder's contents into DEST: a file replaces
    whatever non-folder has its name (a link itself, never its target); a
    folder DEST lacks is moved in whole; one it has is opened with
    O_NOFOLLOW and merged.  Iterative: folders may nest thousands deep."""
    # [source fd, destination fd, destination path, names left, source's parent fd, its name]
    frames: list[list] = [[sfd, dfd, out, os.listdir(sfd), None, None]]
    try:
        while frames:
            src, dst, where, names, src_parent, src_name = frames[-1]
            if not names:
                frames.pop()
                try:
                    fsync(dst, os.fsdecode(where))
                finally:
                    if src_parent is not None:
                        os.close(src)
                        os.close(dst)
                if src_parent is not None:
                    os.rmdir(src_name, dir_fd=src_parent)    # the emptied temp folder
                continue
            n = names.pop()
            w = where + b"/" + os.fsencode(n)
            try:
                sub = _merge_one(src, dst, n, w, guard)
            except OSError as e:     # a race with another process: name the destination, not the temp
                raise OSError(e.errno, e.strerror, os.fsdecode(w)) from None
            if sub is not None:
                frame = [sub[0], sub[1], w, [], src, n]
                frames.append(frame)       # owns the fds from here on
                frame[3] = os.listdir(sub[0])
    finally:
        for src, dst, _w, _n, src_parent, _sn in frames:
            if src_parent is not None:
                os.close(src)
                os.close(dst)


def _merge_one(src: int, dst: int, n: str, w: bytes, guard: _Guard) -> tuple[int, int] | None:
    """Move entry *n*; for a folder DEST already has, the (source, destination) fds to merge."""
    if not stat.S_ISDIR(os.lstat(n, dir_fd=src).st_mode):
        try:
            rename_at(src, n, dst, n)
        except IsADirectoryError:
            raise UsageError(f"{layout.display(w)} became a folder while the checkout ran; "
                             "it was left as it is (run it again)") from None
        return None
    try:
        rename_at(src, n, dst, n, replace=False)
        return None
    except FileExistsError:
        pass
    try:
        sub_dst = open_dir_nofollow(n, dst)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UsageError(f"{layout.display(w)} is no longer a folder (a link or a file appeared "
                             "while the checkout ran); nothing was written through it") from None
        raise
    try:
        guard.check(os.fstat(sub_dst), w)
        return open_dir_nofollow(n, src), sub_dst
    except BaseException:
        os.close(sub_dst)
        raise


def _grouped_under(index, prefix: bytes):
    """(path, versions oldest first) for every path under directory *prefix*, streamed."""
    cur_path, cur = None, []
    for v in index.iter_versions(prefix):
        if v.path != cur_path:
            if cur:
                yield cur_path, cur
            cur_path, cur = v.path, []
        cur.append(v)
    if cur:
        yield cur_path, cur


def _write(objects, v: Version, dir_fd: int, name: bytes, where: bytes) -> int:
    """One verified file, as *name* in the open folder *dir_fd* (AtomicFile:
    temp name, verify, rename; a corrupt object leaves nothing)."""
    # Permission bits only: the recorded mode is what an uploader sent, and a
    # setuid, setgid or sticky bit from an uploader must never reach a file
    # that root restores (docs/design.md, threat model).
    af = AtomicFile(name, mode=v.mode & 0o777, dir_fd=dir_fd)
    try:
        f = af.open()
    except OSError as e:   # the temp file sits beside *name*: name the destination, never the temp
        raise OSError(e.errno, e.strerror, os.fsdecode(where)) from None
    try:
        f.flush()
        n = objects.copy_out(v.blake3, f.fileno())
        os.utime(f.fileno(), ns=(v.mtime_ns, v.mtime_ns))
    except OSError as e:
        af.abort()
        raise OSError(e.errno, e.strerror, os.fsdecode(where)) from None
    except BaseException:
        af.abort()
        raise
    try:
        af.commit()
    except OSError as e:
        raise OSError(e.errno, e.strerror, os.fsdecode(where)) from None
    return n


def _none_msg(t: Target, version, at, upload) -> str:
    what = layout.display(t.path) or f"study {t.store.name}"
    if version is not None:
        return f"{what}: there is no version {version}"
    if at is not None:
        return f"{what}: nothing had been received by {at}"
    if upload is not None:
        return f"{what}: nothing had been received by upload {upload}"
    return f"{what}: no versions"
