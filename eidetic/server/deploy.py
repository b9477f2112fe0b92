"""The deployment design on disk: ``eidetic init`` creates it, ``init --check`` audits it.

Directories, owners and modes (docs/admin.md, "Permissions"):

    inbox   service:service        3777  anyone may drop an entry; the sticky bit keeps users
                                         off each other's entries; setgid gives every entry the
                                         service group, so an uploader with umask 027 (0750/0640)
                                         is readable by eidetic without being readable by the
                                         other uploaders
    state   service:service        0700  private bookkeeping
    store   service:<study group>  2750  objects, manifests and the index, readable by the study
                                         group (members' log and checkout); tmp/, lost+found/ and
                                         the lock inside stay the service user's alone (0700/0600)
    tree    service:<study group>  2750  readable by the study group only; setgid so the
                                         directories ingest creates later get the study group

Owners are applied only when the config names them (``user``, ``group``,
``studies.<s>.group``); the default layout run by a normal user gets the modes
alone.  Nothing here prints: :func:`init` returns what it did, :func:`check`
what differs from the design.

Everything inside a store, a tree and the state directory belongs to the
service user as well: the daemon must be able to replace, rename and add to
it.  Commands that write there (ingest, fsck) call
:func:`become_service_user` first, so that running them as root by hand
(``sudo eidetic ingest --once``) leaves nothing the daemon cannot handle.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import shlex
import stat
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..core import layout
from ..core.walk import walk
from .config import Config, StudyConfig
from ..core.errors import ConfigError
from ..core.fsutil import clone_into, disk_percent_used, makedirs, open_temp
from .inbox import StateDir
from ..store.store import STORE_DIRS, Store

INBOX_MODE = 0o3777
STATE_MODE = 0o700
STORE_MODE = 0o2750
# Inside a store (core/layout.py, "Modes"): what init sets and init --check checks.
# The setgid bit makes whatever the daemon creates later inherit the study group.
STORE_INNER_MODES = {
    "objects": 0o2750, "manifests": 0o2750, "index": 0o2750,
    "tmp": 0o2700, "lost+found": 0o2700, "lock": 0o600,
    "index/data.mdb": 0o640, "index/lock.mdb": 0o640,
}
SHARD_MODE = 0o2750      # objects/<2 hex>/
TREE_MODE = 0o2750
# What a command switched to the service user keeps of its umask at least: the
# unit's UMask=0027, so a tree directory made by hand-run ingest is 2750 like the daemon's.
SERVICE_UMASK = 0o027
MAX_OWNER_EXAMPLES = 5     # paths named in an init --check ownership finding

MIN_INOTIFY_WATCHES = 8192
MAX_USER_WATCHES = "/proc/sys/fs/inotify/max_user_watches"
# With fs.protected_hardlinks=0 any local user may hardlink a file it cannot
# read (another study's data, /etc/shadow) into the world-writable inbox, and
# the service user, who can read it, would archive it for them.
PROTECTED_HARDLINKS = "/proc/sys/fs/protected_hardlinks"
MOUNTINFO = "/proc/self/mountinfo"
# inotify sees nothing that another machine writes, and LMDB's locking is unsafe on these.
NETWORK_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
                        "fuse.glusterfs", "fuse.sshfs", "fuse.s3fs", "fuse.rclone", "lustre", "gpfs",
                        "beegfs", "ocfs2", "gfs2", "davfs", "fuse.davfs2"})


@dataclass(frozen=True)
class Ids:
    uid: int | None       # None: leave as it is
    gid: int | None

    def text(self) -> str:
        return f"{user_name_of(self.uid)}:{group_name_of(self.gid)}"

    def differ_from(self, st: os.stat_result) -> bool:
        return (self.uid is not None and st.st_uid != self.uid) or (self.gid is not None and st.st_gid != self.gid)


@dataclass(frozen=True)
class Want:
    """One directory of the design."""
    path: str
    role: str             # "inbox" | "state" | "store" | "tree"
    mode: int
    ids: Ids


@dataclass
class Action:
    path: str
    what: str             # "created" | "changed" | "ok"
    detail: str = ""

    def __str__(self) -> str:
        if self.what == "created":
            return f"created {self.path} ({self.detail})"
        if self.what == "changed":
            return f"changed {self.detail}"
        return f"ok {self.path}"


@dataclass
class Finding:
    """A difference from the design (``init --check``)."""
    code: str             # missing | not-dir | mode | owner | owner-inside | mode-inside | unreadable | setgid
    #                       | filesystem | disk | inotify | network-fs | access | hardlinks
    path: str
    detail: str
    severity: str = "error"     # "error" | "warning"
    data: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.severity}: {self.path}: {self.detail}"


# ----------------------------------------------------------------- the design

def _resolve_user(name: str | None, key: str, source: str) -> tuple[int | None, int | None]:
    """(uid, primary gid or None) of a configured user name or number."""
    if name is None:
        return None, None
    if name.isdigit():
        try:
            return int(name), pwd.getpwuid(int(name)).pw_gid
        except KeyError:
            return int(name), None
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"key '{key}': no such user {name!r} (create it first, e.g. "
                          f"'adduser --system --group {name}')", source) from None
    return pw.pw_uid, pw.pw_gid


def _resolve_group(name: str | None, key: str, source: str) -> int | None:
    if name is None:
        return None
    if name.isdigit():
        return int(name)
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ConfigError(f"key '{key}': no such group {name!r}", source) from None


def service_ids(cfg: Config) -> Ids:
    """The service user and group (``user``, else nobody; ``group``, else the
    user's primary group); unknown names are a ConfigError."""
    uid, primary = _resolve_user(cfg.user, "user", cfg.source)
    gid = _resolve_group(cfg.group, "group", cfg.source)
    if gid is None:
        gid = primary if cfg.user is not None else None
    return Ids(uid, gid)


def readers_of(cfg: Config, s: StudyConfig) -> Ids:
    """Owner and group of a study's store and tree: the service user, and the
    study's ``group`` (else the service group), which may read both."""
    service = service_ids(cfg)
    gid = _resolve_group(s.group, f"studies.{s.name}.group", cfg.source)
    return Ids(service.uid, gid if gid is not None else service.gid)


def design(cfg: Config) -> list[Want]:
    """Every directory ``init`` makes, with its mode and owner; unknown user or
    group names are a ConfigError."""
    service = service_ids(cfg)
    wants = [Want(inbox, "inbox", INBOX_MODE, service) for inbox, _ in cfg.inboxes()]
    wants.append(Want(cfg.state, "state", STATE_MODE, service))
    for s in cfg.studies.values():
        readers = readers_of(cfg, s)
        wants.append(Want(s.store, "store", STORE_MODE, readers))
        wants.append(Want(s.tree, "tree", TREE_MODE, readers))
    return wants


def _inner_paths(want: Want) -> Iterator[str]:
    """What inside a store or the state directory ``init`` hands to the service
    user: the daemon writes there (a root-owned shard or record left by a
    command run as root would stop it).  Objects and manifests themselves are
    not walked here (a store can hold millions): ``init --check`` finds them."""
    if want.role == "store":
        root = want.path
        names = [os.path.join(root, n) for n in (*STORE_DIRS, "lost+found", layout.STORE_MARKER, "HEAD", "lock")]
        for sub in ("objects", "index"):
            try:
                names.extend(os.path.join(root, sub, n) for n in sorted(os.listdir(os.path.join(root, sub))))
            except OSError:
                pass
        yield from (p for p in names if os.path.lexists(p))
    elif want.role == "state":
        for path, _st in walk_below(os.fsencode(want.path)):
            yield os.fsdecode(path)


def walk_below(root: bytes, on_root_error: bool = False) -> Iterator[tuple[bytes, os.stat_result]]:
    """(path, lstat) of everything below *root*, streamed: one listing open per
    level, in the file system's order (never a list of every path, nor of a
    whole folder: a tree's folder can hold millions).  Symlinks are not
    followed and other file systems are not entered.  A directory that
    cannot be listed is skipped (it is itself yielded); *on_root_error*
    raises the OSError of listing *root* itself instead."""
    os.lstat(root)      # a root that is not there is an error either way
    try:
        entries = walk(root, stat=True, one_fs=True, sort=False)
    except OSError:
        if on_root_error:
            raise
        return
    with entries:
        for e in entries:
            st = e.st
            if st is None:          # a folder that could not be opened: still there, still ours to judge
                try:
                    st = os.lstat(e.path)
                except OSError:
                    continue        # gone since the listing
            yield e.path, st


# ----------------------------------------------------------------------- init

def init(cfg: Config) -> list[Action]:
    """Create every configured directory with the design's mode (and owner
    when configured); fix what differs.  Idempotent."""
    wants = design(cfg)
    try:
        return _init(cfg, wants)
    except PermissionError as e:
        # EACCES (a parent we may not write) or EPERM (chown/chmod of what is not ours): one line
        # naming the path, with what to do about it.
        raise PermissionError(e.errno, f"{e.strerror} (run 'eidetic init' as root, or as the owner of the "
                              "directories)", os.fsdecode(e.filename) if e.filename else None) from None


def _init(cfg: Config, wants: list[Want]) -> list[Action]:
    existed = {w.path: os.path.isdir(w.path) for w in wants}
    for w in wants:
        if w.role == "inbox":
            makedirs(os.fsencode(w.path), 0o700)       # the real mode comes with chmod below
    StateDir(cfg.state).init()
    chowning = _service_ids(wants).uid is not None
    for s in cfg.studies.values():
        Store.init(*s.store_args())
        if chowning:
            _precreate(s)
    actions: list[Action] = []
    for w in wants:
        before = os.lstat(w.path)
        changes = _apply(w.path, w.mode, w.ids, before)
        if not existed[w.path]:
            actions.append(Action(w.path, "created", f"mode {w.mode:04o}, {_owner_text(w.path)}"))
        else:
            actions.extend(Action(w.path, "changed", c) for c in changes)
            if not changes:
                actions.append(Action(w.path, "ok"))
        for inner in _inner_paths(w):
            st = os.lstat(inner)
            if not stat.S_ISLNK(st.st_mode):
                for c in _apply(inner, _inner_mode(w, inner, st), w.ids, st):
                    if existed[w.path]:
                        actions.append(Action(inner, "changed", c))
    return actions


def _inner_mode(w: Want, path: str, st: os.stat_result) -> int | None:
    """The design's mode of *path* inside a store (None: any, e.g. an object, 0444 by itself)."""
    if w.role != "store":
        return None
    rel = os.path.relpath(path, w.path)
    if rel in STORE_INNER_MODES:
        return STORE_INNER_MODES[rel]
    if os.path.dirname(rel) == "objects" and stat.S_ISDIR(st.st_mode):
        return SHARD_MODE
    return None


def _service_ids(wants: list[Want]) -> Ids:
    return next(w.ids for w in wants if w.role == "state")


def _precreate(s: StudyConfig) -> None:
    """A store's lock file and index files are created by whoever first needs
    them; if that is root (``sudo eidetic fsck``) the daemon could not open
    them afterwards.  Create them now so init hands them to the service user."""
    fd = os.open(os.path.join(s.store, "lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)
    if not os.path.exists(os.path.join(s.store, "index", "data.mdb")):
        store = Store(*s.store_args())
        store.index   # noqa: B018 - opening creates data.mdb and lock.mdb
        store.close()


def _apply(path: str, mode: int | None, ids: Ids, st: os.stat_result) -> list[str]:
    changes: list[str] = []
    uid = -1 if ids.uid is None or ids.uid == st.st_uid else ids.uid
    gid = -1 if ids.gid is None or ids.gid == st.st_gid else ids.gid
    if uid != -1 or gid != -1:
        os.chown(path, uid, gid, follow_symlinks=False)
        changes.append(f"owner of {path} {_owner_of(st)} -> "
                       f"{_owner_text(path)}")
    if mode is not None:
        # chown may clear set-id bits, and mkdir's mode is filtered by the umask: always chmod.
        now = stat.S_IMODE(os.lstat(path).st_mode)
        if now != mode:
            os.chmod(path, mode)
            now = stat.S_IMODE(os.lstat(path).st_mode)
        if now != mode:
            # The kernel silently drops setgid for a caller outside the directory's group.
            changes.append(f"mode of {path} is {now:04o}, not {mode:04o}: setting the setgid bit needs "
                           "membership of the directory's group (run 'eidetic init' as root)")
        elif stat.S_IMODE(st.st_mode) != mode:
            changes.append(f"mode of {path} {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
    return changes


def _owner_text(path: str) -> str:
    return _owner_of(os.lstat(path))


def _owner_of(st: os.stat_result) -> str:
    """The owner of a stat as "user:group", by name where the system has one."""
    return Ids(st.st_uid, st.st_gid).text()


def user_name_of(uid: int | None) -> str:
    return _id_name(uid, lambda i: pwd.getpwuid(i).pw_name)


def group_name_of(gid: int | None) -> str:
    return _id_name(gid, lambda i: grp.getgrgid(i).gr_name)


def _id_name(i: int | None, lookup) -> str:
    """A user's or group's name, its number when it has none, "(unchanged)" for None."""
    if i is None:
        return "(unchanged)"
    try:
        return lookup(i)
    except KeyError:
        return str(i)


# ------------------------------------------------ running as the service user

def become_service_user(cfg: Config) -> bool:
    """Go on as the configured service user when run as root; True if we switched.

    For the commands that write into stores, trees or the state directory
    (ingest, fsck): run by root they would leave root-owned objects,
    manifests, index files and records that the daemon, running as the
    service user, may then be unable to replace or add to.  Switching is
    friendlier than refusing for an admin's ``sudo eidetic ingest --once``,
    and the service user can do everything those commands need (it owns the
    inbox, so it may rename uploaders' entries in it).  Call it before
    anything is opened for writing.

    Supplementary groups, gid and uid are set as systemd's ``User=``/``Group=``
    would set them, the umask is made at least the unit's 0027, and HOME,
    USER and LOGNAME name the service user.  What the process must still read
    as that user is checked at once, so a config file or an installation
    only root can read is one clear error here rather than a failure later
    (the daemon reads the config again on SIGHUP; fsck starts helper
    processes of this Python).  Without ``user`` in the config, as that user
    already, or as another user, nothing changes."""
    if cfg.user is None or os.geteuid() != 0:
        return False
    ids = service_ids(cfg)
    uid = ids.uid
    if uid is None or uid == 0:
        return False
    try:
        pw: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        pw = None
    if ids.gid is None:
        raise ConfigError(f"key 'user': uid {uid} has no entry in the user database, so its group is "
                          "unknown: set 'group' too", cfg.source)
    gid = ids.gid
    groups = sorted(set(os.getgrouplist(pw.pw_name, gid))) if pw is not None else [gid]
    needed = _runtime_paths()          # looked up as root: the checks below are the service user's
    try:
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except PermissionError as e:   # root without CAP_SETUID/CAP_SETGID (a sandbox)
        raise PermissionError(e.errno, f"cannot switch to the service user {user_name_of(uid)} "
                              f"({e.strerror}): run this command as that user") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError(errno.EPERM, f"could not switch to the service user {user_name_of(uid)}")
    os.umask(os.umask(SERVICE_UMASK) | SERVICE_UMASK)
    name = pw.pw_name if pw is not None else str(uid)
    os.environ.update(HOME=pw.pw_dir if pw is not None and pw.pw_dir else "/", USER=name, LOGNAME=name)
    _check_readable_as_service(cfg, name, group_name_of(gid), needed)
    return True


def _runtime_paths() -> list[tuple[str, int]]:
    """(path, access mode) of what this process still needs from its
    installation: the interpreter (fsck runs helper processes of it) and the
    directories its modules come from (most are imported only when used)."""
    out: list[tuple[str, int]] = [(sys.executable, os.X_OK)]
    dirs = {os.path.dirname(f) for m in list(sys.modules.values())
            if isinstance(f := getattr(m, "__file__", None), str)}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_path(key)
        if p:
            dirs.update((p, os.path.join(p, "lib-dynload")))
    out.extend((d, os.R_OK | os.X_OK) for d in sorted(dirs) if os.path.isdir(d))
    return out


def _check_readable_as_service(cfg: Config, user: str, group: str, needed: list[tuple[str, int]]) -> None:
    for path, key in ((cfg.source, None), (cfg.notify.credentials_file, "notify.credentials_file")):
        if path and not os.access(path, os.R_OK):
            what = f"key '{key}': {path}" if key else "this file"
            raise ConfigError(f"{what} cannot be read by the service user {user}, which this command runs as "
                              f"(as the daemon does): make it readable to it, e.g. 'chgrp {group} "
                              f"{shlex.quote(path)} && chmod g+r {shlex.quote(path)}'", cfg.source)
    for path, mode in needed:
        if not os.access(path, mode):
            raise PermissionError(errno.EACCES, f"the service user {user}, which this command runs as, cannot "
                                  "use this Python installation of eidetic: install it where every user can "
                                  "read it (e.g. a venv in /opt/eidetic)", path)


# ---------------------------------------------------------------------- check

def check(cfg: Config, max_user_watches_file: str = MAX_USER_WATCHES,
          mountinfo_file: str = MOUNTINFO, protected_hardlinks_file: str = PROTECTED_HARDLINKS) -> list[Finding]:
    """What differs from the design; changes nothing.  An empty list: all is well."""
    wants = design(cfg)
    out: list[Finding] = []
    for w in wants:
        out.extend(_check_dir(w))
    for s in cfg.studies.values():
        try:
            if os.stat(s.tree).st_dev != os.stat(s.store).st_dev:
                out.append(Finding("filesystem", s.tree, f"tree and store {s.store} are on different file "
                                   "systems; tree files are hardlinks to store objects"))
        except OSError:
            pass   # already reported as missing
    out.extend(_check_disk(cfg, wants))
    if not cfg.polling:
        out.extend(_check_inotify(len(cfg.inboxes()), max_user_watches_file))
    out.extend(_check_network(cfg, wants, mountinfo_file))
    out.extend(_check_access(wants))
    out.extend(_check_hardlinks(protected_hardlinks_file))
    return out


@dataclass
class Clones:
    """Information from ``init --check``, not a finding: whether files can be
    cloned (reflink) from one of a study's inboxes into its store, so that
    ingest stores large files without copying their bytes (zero-copy)."""
    study: str
    inbox: str
    store: str
    ok: bool
    reason: str = ""          # why not (empty when ok)

    def __str__(self) -> str:
        return f"study {self.study}: clones: {'yes' if self.ok else 'no'}" + (
            f" ({self.reason})" if self.reason else f" (inbox {self.inbox} and store {self.store}: zero-copy ingest)")

    def to_json(self) -> dict:
        return {"code": "clones", "severity": "info", "path": self.store,
                "detail": str(self), "study": self.study, "inbox": self.inbox, "clones": self.ok,
                "reason": self.reason or None}


def clones(cfg: Config) -> list[Clones]:
    """For each study and each inbox its entries arrive in: can a file there
    be cloned into the store?  Tried for real (FICLONE between a one-block
    temp file in the inbox and one in the store's tmp/, both removed at
    once), as ingest would; a dot name, so no daemon takes it for an entry."""
    out = []
    for s in cfg.studies.values():
        inboxes = [s.inbox] if s.inbox else [cfg.inbox] if cfg.inbox else []
        for inbox in inboxes:
            ok, reason = probe_clone(inbox, s.store)
            out.append(Clones(s.name, inbox, s.store, ok, reason))
    return out


def probe_clone(inbox: str, store: str) -> tuple[bool, str]:
    """(whether a file in *inbox* can be cloned into *store*, why not)."""
    try:
        if os.stat(inbox).st_dev != os.stat(store).st_dev:
            return False, "the inbox is on another file system than the store"
    except OSError as e:
        return False, f"not tested: {e.strerror} ({e.filename})"
    made: list[bytes] = []
    fds: list[int] = []
    try:
        try:
            src, wfd = open_temp(os.fsencode(inbox))
            made.append(src)
            fds.append(wfd)
            os.write(wfd, b"\0" * 4096)
            fds.append(os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC))
            dst, dfd = open_temp(os.fsencode(os.path.join(store, "tmp")))
            made.append(dst)
            fds.append(dfd)
        except OSError as e:
            return False, f"not tested: {e.strerror} ({e.filename or inbox})"
        try:
            clone_into(dfd, fds[1])
        except OSError as e:
            if e.errno == errno.EXDEV:
                return False, "the inbox and the store are on different mounts"
            typ = _fs_type_of(store)
            return False, f"{typ + ' ' if typ else 'this '}file system cannot clone: {e.strerror}"
        return True, ""
    finally:
        for fd in fds:
            os.close(fd)
        for p in made:
            try:
                os.unlink(p)
            except OSError:
                pass


def _fs_type_of(path: str) -> str | None:
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            return fs_type(path, parse_mountinfo(f.read()))
    except OSError:
        return None


def _check_hardlinks(path: str) -> list[Finding]:
    try:
        with open(path, "rb") as f:
            value = f.read(16).strip()
    except OSError:
        return []       # not Linux, or no /proc: nothing to say
    if value == b"1":
        return []
    return [Finding("hardlinks", path, "fs.protected_hardlinks is not 1: any local user can hardlink a file "
                    "they cannot read into the inbox and have it archived; set it (sysctl "
                    "fs.protected_hardlinks=1, and in /etc/sysctl.d/ to keep it)", "error",
                    {"protected_hardlinks": value.decode("ascii", "replace")})]


def _check_dir(w: Want) -> list[Finding]:
    try:
        st = os.stat(w.path)
    except FileNotFoundError:
        if not os.access(os.path.dirname(w.path) or ".", os.X_OK):
            return [_unseen(w, f"cannot see whether the {w.role} exists (a parent directory is closed to you)")]
        return [Finding("missing", w.path, f"{w.role} directory does not exist (run 'eidetic init')")]
    except PermissionError as e:
        return [_unseen(w, f"cannot see the {w.role} ({e.strerror})")]
    except OSError as e:
        return [Finding("missing", w.path, f"cannot stat: {e.strerror}")]
    if not stat.S_ISDIR(st.st_mode):
        return [Finding("not-dir", w.path, f"{w.role} is not a directory")]
    out: list[Finding] = []
    mode = stat.S_IMODE(st.st_mode)
    if mode != w.mode:
        out.append(Finding("mode", w.path, f"{w.role} has mode {mode:04o}, the design says {w.mode:04o}",
                           data={"mode": mode, "want": w.mode}))
    if w.ids.differ_from(st):
        out.append(Finding("owner", w.path, f"owned by {_owner_of(st)}, the "
                           f"design says {w.ids.text()}"))
    if w.role != "inbox":       # inbox entries belong to their uploaders
        out.extend(_check_owner_inside(w))
    if w.role == "store":
        out.extend(_check_modes_inside(w))
    return out


def _check_modes_inside(w: Want) -> list[Finding]:
    """The store's inner directories and index files with another mode than
    the design's: members could not read history (too narrow), or could
    reach what is the service user's alone (too wide: tmp/, the lock)."""
    wrong: list[tuple[str, int, int]] = []
    for inner in _inner_paths(w):
        try:
            st = os.lstat(inner)
        except OSError:
            continue
        want = _inner_mode(w, inner, st)
        if want is not None and not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != want:
            wrong.append((inner, stat.S_IMODE(st.st_mode), want))
    if not wrong:
        return []
    shown = ", ".join(f"{os.path.relpath(p, w.path)} ({now:04o}, not {want:04o})"
                      for p, now, want in wrong[:MAX_OWNER_EXAMPLES])
    more = f" and {len(wrong) - MAX_OWNER_EXAMPLES} more" if len(wrong) > MAX_OWNER_EXAMPLES else ""
    return [Finding("mode-inside", w.path, f"{layout.plural(len(wrong), 'path')} inside the store "
                    f"{'has' if len(wrong) == 1 else 'have'} another mode than the design's (study members "
                    f"may be unable to read history): {shown}{more}; run 'eidetic init' as root to set them",
                    data={"count": len(wrong), "examples": [{"path": os.path.relpath(p, w.path), "mode": now,
                                                             "want": want} for p, now, want in wrong[:MAX_OWNER_EXAMPLES]]})]


def _unseen(w: Want, what: str) -> Finding:
    """Something this user may not look at: said, never taken for "all is well" (exit status 3)."""
    who = f"the service user ({user_name_of(w.ids.uid)}) or root" if w.ids.uid is not None else "its owner or root"
    return Finding("unreadable", w.path, f"{what}: run 'eidetic init --check' as {who}", "warning")


def _wrong_owner(ids: Ids, st: os.stat_result) -> bool:
    """Only a directory's group matters: it is the study group's gate in a
    tree and a store.  A file's group grants nothing here (state is 0700,
    objects and tree files 0444 behind the directories; the index files
    inherit the study group from their setgid directory), and tree files are
    the objects' inodes, so they could not carry the study group and the
    service group at once."""
    if ids.uid is not None and st.st_uid != ids.uid:
        return True
    return stat.S_ISDIR(st.st_mode) and ids.gid is not None and st.st_gid != ids.gid


def _check_owner_inside(w: Want) -> list[Finding]:
    """Files and directories inside a store, tree or the state directory that
    the daemon may be unable to replace, rename or add to: what a command run
    as root by hand leaves behind.  One finding per directory, with a count,
    the first few paths and the chown that fixes them."""
    if w.ids.uid is None and w.ids.gid is None:
        return []
    root = os.fsencode(w.path)
    count = 0
    examples: list[tuple[bytes, str]] = []
    closed: list[bytes] = []        # directories walk_below could not list (a member and tmp/)
    try:
        for path, st in walk_below(root, on_root_error=True):
            if stat.S_ISDIR(st.st_mode) and not os.access(path, os.R_OK | os.X_OK):
                closed.append(path)
            if _wrong_owner(w.ids, st):
                count += 1
                if len(examples) < MAX_OWNER_EXAMPLES:
                    examples.append((path, _owner_of(st)))
    except OSError as e:
        return [_unseen(w, f"cannot see inside the {w.role} to check its owners and modes ({e.strerror})")]
    shut = layout.first_and_more([layout.display(p) for p in closed], limit=3, sep=", ")
    out = [_unseen(w, f"cannot see inside {shut} to check owners there")] if closed else []
    if not count:
        return out
    fix = f"chown -R {_chown_spec(w.ids)} {shlex.quote(w.path)}"
    shown = ", ".join(f"{layout.display(p[len(root) + 1:])} ({who})" for p, who in examples)
    what = ("1 file or directory inside the {} is" if count == 1 else
            f"{count} files and directories inside the {{}} are").format(w.role)
    return out + [Finding("owner-inside", w.path, f"{what} not owned by {w.ids.text()} as designed "
                    f"(the daemon may fail on {'it' if count == 1 else 'them'}), e.g. {shown}; run '{fix}' as root",
                    data={"count": count, "fix": fix,
                          "examples": [{"path": layout.display(p), "owner": who} for p, who in examples]})]


def _chown_spec(ids: Ids) -> str:
    if ids.gid is None:
        return user_name_of(ids.uid)
    if ids.uid is None:
        return ":" + group_name_of(ids.gid)
    return f"{user_name_of(ids.uid)}:{group_name_of(ids.gid)}"


def _check_disk(cfg: Config, wants: list[Want]) -> list[Finding]:
    thresholds = sorted(cfg.notify.disk_warn_percent)
    if not thresholds:
        return []
    out: list[Finding] = []
    seen: set[int] = set()
    for w in wants:
        if w.role == "tree":
            continue   # shares the store's file system
        try:
            dev = os.stat(w.path).st_dev
            pct = disk_percent_used(w.path)
        except OSError:
            continue
        if dev in seen:
            continue
        seen.add(dev)
        crossed = [t for t in thresholds if pct >= t]
        if crossed:
            out.append(Finding("disk", w.path, f"file system is {pct}% full (warning at {crossed[-1]}%)",
                               "warning", {"percent_used": pct, "threshold": crossed[-1]}))
    return out


def _check_inotify(n_inboxes: int, path: str) -> list[Finding]:
    try:
        with open(path, "rb") as f:
            watches = int(f.read(64).strip())
    except (OSError, ValueError):
        return []
    need = max(MIN_INOTIFY_WATCHES, n_inboxes)
    if watches < need:
        return [Finding("inotify", path, f"fs.inotify.max_user_watches is {watches}; at least {need} is "
                        "advised (sysctl fs.inotify.max_user_watches=524288)", "warning",
                        {"max_user_watches": watches})]
    return []


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """(mount point, file system type) of every line of /proc/self/mountinfo."""
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-")
        except ValueError:
            continue
        if len(fields) < 5 or sep + 1 >= len(fields):
            continue
        out.append((_unescape_mount(fields[4]), fields[sep + 1]))
    return out


def _unescape_mount(s: str) -> str:
    # The kernel writes space, tab, newline and backslash in mount points as \ooo.
    if "\\" not in s:
        return s
    raw = s.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 4 <= len(raw) and raw[i + 1:i + 4].isdigit():
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return bytes(out).decode("utf-8", "surrogateescape")


def fs_type(path: str, mounts: list[tuple[str, str]]) -> str | None:
    """The type of the file system holding *path*: the longest mount point
    that is a prefix of its real path (a later mount over the same point wins)."""
    real = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for point, typ in mounts:
        if real == point or point == "/" or real.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= best[0]:
                best = (len(point), typ)
    return best[1] if best else None


def _check_network(cfg: Config, wants: list[Want], mountinfo_file: str) -> list[Finding]:
    try:
        with open(mountinfo_file, encoding="utf-8", errors="surrogateescape") as f:
            mounts = parse_mountinfo(f.read())
    except OSError:
        return []
    out: list[Finding] = []
    for w in wants:
        typ = fs_type(w.path, mounts)
        if typ not in NETWORK_FS:
            continue
        if w.role == "inbox" and not cfg.polling:
            out.append(Finding("network-fs", w.path, f"inbox is on a network file system ({typ}): inotify "
                               "does not see files written by other machines; set 'polling: true'",
                               data={"fstype": typ}))
        elif w.role == "store":
            out.append(Finding("network-fs", w.path, f"store is on a network file system ({typ}): its LMDB "
                               "index and lock are unsafe there; use a local file system",
                               data={"fstype": typ}))
        elif w.role == "state":
            out.append(Finding("network-fs", w.path, f"state is on a network file system ({typ}): its locks "
                               "are unreliable there; use a local file system", "warning",
                               data={"fstype": typ}))
    return out


def _groups_of(uid: int, gid: int | None) -> set[int]:
    try:
        pw = pwd.getpwuid(uid)
        return set(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except KeyError:
        return {gid} if gid is not None else set()


def _searchable(st: os.stat_result, uid: int | None, gids: set[int]) -> bool:
    if uid == 0:
        return True
    if uid is not None and st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def _check_access(wants: list[Want]) -> list[Finding]:
    """Can the service user reach every directory, and the study group its tree and store?"""
    out: list[Finding] = []
    for w in wants:
        who: list[tuple[str, int | None, set[int]]] = []
        if w.ids.uid is not None:
            who.append(("the service user", w.ids.uid, _groups_of(w.ids.uid, w.ids.gid)))
        if w.role in ("tree", "store") and w.ids.gid is not None:
            who.append(("the study group", None, {w.ids.gid}))
        for label, uid, gids in who:
            parent = os.path.dirname(w.path)
            while True:
                try:
                    st = os.stat(parent)
                except OSError:
                    break
                if not _searchable(st, uid, gids):
                    out.append(Finding("access", parent, f"{label} cannot pass through this directory to "
                                       f"reach {w.path} (mode {stat.S_IMODE(st.st_mode):04o})"))
                    break
                if parent == os.path.dirname(parent):
                    break
                parent = os.path.dirname(parent)
    return out


# ------------------------------------------------------------ systemd drop-in

def systemd_dropin(cfg: Config) -> str:
    """A drop-in for eidetic.service opening exactly the configured directories
    to the daemon (the unit has ProtectSystem=strict)."""
    paths = [w.path for w in design(cfg) if w.role != "tree"] + [s.tree for s in cfg.studies.values()]
    lines = ["# /etc/systemd/system/eidetic.service.d/paths.conf (made by 'eidetic init --systemd-dropin')",
             "# then: systemctl daemon-reload && systemctl restart eidetic",
             "[Service]", "ReadWritePaths="]
    lines += [f"ReadWritePaths={_systemd_quote(p)}" for p in paths]
    if cfg.source:
        lines.append(f"Environment=EIDETIC_CONFIG={_systemd_quote(cfg.source)}")
    return "\n".join(lines) + "\n"


def _systemd_quote(path: str) -> str:
    if any(c in path for c in ' "\\\t'):
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return path
