"""Where ``eidetic send`` writes: a local or mounted inbox folder, or SFTP.

Both transports take paths relative to the inbox as bytes with "/" between
components (the entry's own names, whatever the client's OS) and offer the
few operations an upload needs.  This is the only module importing paramiko.

SFTP (paramiko): the host key is checked against ``~/.ssh/known_hosts`` and
the client's own ``known_hosts``; an unknown key is shown (type and SHA256
fingerprint, like OpenSSH) to a ``confirm_host_key`` callback and saved to the
client's file when accepted; a changed key is always refused.  Authentication
tries ``--identity``, then the SSH agent, then ``~/.ssh/id_*``, then a
password from the ``password`` callback (never stored); when keys were tried,
its prompt says so ("the server refused the key ~/.ssh/id_ed25519; password
for jdoe@host: "), so a collector knows their key did not work.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import logging
import os
import re
import socket
import stat
import sys
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Protocol

import paramiko
from paramiko.sftp import (CMD_CLOSE, CMD_EXTENDED, CMD_HANDLE, CMD_OPEN, CMD_STATUS, CMD_WRITE,
                          SFTP_FLAG_CREATE, SFTP_FLAG_TRUNC, SFTP_FLAG_WRITE, SFTP_NO_SUCH_FILE, SFTP_OK,
                          SFTP_OP_UNSUPPORTED, SFTP_PERMISSION_DENIED, int64)
from paramiko.sftp_attr import SFTPAttributes

from .state import local_user
from ..core.errors import HostKeyError, TransportError, UsageError
from ..core.fsutil import fsync_dir, syncfs
from ..core.hashing import hash_fd

# paramiko logs the errors we report ourselves ("Socket exception: ...");
# without a handler, logging's last resort would print them to stderr.
logging.getLogger("paramiko").addHandler(logging.NullHandler())

CONNECT_TIMEOUT = 30.0
IO_TIMEOUT = 120.0          # a silent network for this long fails the send (re-run resumes)
DEFAULT_KEYS = ("id_ed25519", "id_ecdsa", "id_rsa")
_KEY_TYPE_NAMES = {"ssh-ed25519": "ED25519", "ssh-rsa": "RSA", "ssh-dss": "DSA"}


class Writer(Protocol):
    def write(self, data: bytes | memoryview) -> None: ...
    # Close; *done* is called once the file is as durable as the transport makes
    # it before sync_tree (SFTP: its fsync answered, maybe only during a later
    # call, at the latest in drain).  Raises on any failure known by then.
    def finish(self, done: Callable[[], None] | None = None) -> None: ...
    def abort(self) -> None: ...        # close, ignoring errors


class Transport(Protocol):
    display: str                        # the destination as shown to the user

    def check_inbox(self) -> None: ...
    def exists(self, rel: bytes) -> bool: ...
    def size(self, rel: bytes) -> int | None: ...       # None: not a regular file
    def mkdir(self, rel: bytes) -> None: ...            # an existing directory is fine
    def open_write(self, rel: bytes) -> Writer: ...     # create or truncate
    def remove(self, rel: bytes) -> None: ...           # a missing file is fine
    def drain(self) -> None: ...                        # every finished file answered (done called)
    def sync_tree(self, rel: bytes) -> None: ...        # make the whole entry durable
    def digest(self, rel: bytes) -> str | None: ...     # BLAKE3 of a written file, if cheap to get
    def rename(self, old: bytes, new: bytes) -> None: ...   # never onto an existing name
    def close(self) -> None: ...


@dataclass
class Destination:
    kind: str                   # "local" | "sftp"
    path: str                   # the inbox (local path, or the path on the server)
    user: str = ""
    host: str = ""
    port: int = 22

    @property
    def _url_parts(self) -> tuple[str, str]:
        host = f"[{self.host}]" if ":" in self.host else self.host
        path = self.path if self.path.startswith("/") else "/~/" + self.path
        return host, path

    @property
    def key(self) -> str:
        """Identifies the destination in the client's state and ledger."""
        if self.kind == "local":
            return os.path.normcase(os.path.abspath(self.path))
        host, path = self._url_parts
        return f"sftp://{self.user}@{host}:{self.port}{path}"

    @property
    def display(self) -> str:
        if self.kind == "local":
            return self.path
        host, path = self._url_parts
        port = f":{self.port}" if self.port != 22 else ""
        return f"sftp://{self.user}@{host}{port}{path}"


# user@host:path or host:path as scp and rsync write it (a colon before any
# slash); a one-letter "host" is a Windows drive (C:\\inbox, C:/inbox).
_SCP_STYLE = re.compile(r"^(?P<user>[^@/\\:]+@)?(?P<host>[^@/\\:]{2,}):(?P<path>.*)\Z", re.DOTALL)


def parse_destination(text: str) -> Destination:
    """``sftp://user@host[:port]/path`` (the path is absolute on the server;
    ``/~/path`` is relative to the login's home) or a local folder."""
    if not text.lower().startswith("sftp://"):
        if "://" in text:
            raise UsageError(f"--to {text}: only sftp:// addresses or folders are supported")
        scp = _SCP_STYLE.match(text)
        if scp and not os.path.lexists(text):
            user, host, path = scp.group("user") or "", scp.group("host"), scp.group("path")
            url = f"sftp://{user}{host}/{path.lstrip('/') if path.startswith('/') else '~/' + path}"
            raise UsageError(f"--to {text} is an scp-style address, which eidetic does not take: "
                             f"use --to {url.rstrip('/')}")
        return Destination("local", os.path.abspath(text))
    u = urllib.parse.urlsplit(text)
    if u.query or u.fragment:
        raise UsageError(f"--to {text}: an sftp:// address takes no '?' or '#' part")
    userinfo = u.netloc.rpartition("@")[0]
    if ":" in userinfo:
        raise UsageError(f"--to {text}: do not put a password in the address; you will be asked for it")
    user = urllib.parse.unquote(userinfo) or local_user("user")     # unknown: let the server refuse
    try:
        host, port = u.hostname or "", u.port or 22
    except ValueError:
        raise UsageError(f"--to {text}: bad port") from None
    path = urllib.parse.unquote(u.path)
    if not host:
        raise UsageError(f"--to {text}: no host name (sftp://user@host/path/to/inbox)")
    if not path or path == "/":
        raise UsageError(f"--to {text}: no inbox path (sftp://user@host/path/to/inbox)")
    if path.startswith("/~/"):
        path = path[3:]
    return Destination("sftp", path.rstrip("/") or "/", user, host, port)


# -------------------------------------------------------------------- local

def _local_error(e: OSError, what: str, where: str) -> TransportError:
    if e.errno in (errno.EACCES, errno.EPERM):
        return TransportError(f"permission denied on the inbox while {what} ({where})")
    if e.errno == errno.ENOSPC:
        return TransportError(f"the inbox is full: no space left while {what} ({where})")
    if e.errno == getattr(errno, "EDQUOT", -1):
        return TransportError(f"your disk quota on the inbox is used up while {what} ({where})")
    return TransportError(f"the inbox failed while {what} ({where}): {e.strerror or e}")


def _guard_local(what: str):
    """Turn OSError of a destination operation into TransportError, so the
    caller can tell the inbox's failures from the source's."""
    def wrap(fn):
        def inner(self, *args):
            try:
                return fn(self, *args)
            except OSError as e:
                rel = next((a for a in args if isinstance(a, bytes)), b"")
                raise _local_error(e, what, self._p(rel) if rel else self.root) from None
        return inner
    return wrap


class _LocalWriter:
    """A file in a local inbox; its OSErrors become TransportError (see _guard_local)."""

    def __init__(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
        self.path = path
        self.fd = os.open(path, flags, 0o644)

    def write(self, data: bytes | memoryview) -> None:
        mv = memoryview(data)
        try:
            while mv:
                n = os.write(self.fd, mv)
                mv = mv[n:]
        except OSError as e:
            raise _local_error(e, "writing", self.path) from None

    def finish(self, done: Callable[[], None] | None = None) -> None:
        # No fsync per file: LocalTransport.sync_tree makes the whole entry
        # durable at once before the rename (an fsync per file made sending
        # 20,000 small files twice as slow).
        try:
            os.close(self.fd)
        except OSError as e:
            raise _local_error(e, "finishing a file", self.path) from None
        if done is not None:
            done()      # a resumed send re-checks these with digest (not durable until sync_tree)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class LocalTransport:
    """An inbox folder on this machine or a mounted share (SMB/NFS)."""

    def __init__(self, dest: Destination) -> None:
        self.root = dest.path
        self.display = dest.display

    def _p(self, rel: bytes) -> str:
        parts = [os.fsdecode(c) if os.name == "posix" else c.decode("utf-8") for c in rel.split(b"/")]
        return os.path.join(self.root, *parts)

    def check_inbox(self) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            raise TransportError(f"the inbox folder {self.root} does not exist (is the share mounted?)") from None
        except OSError as e:
            raise TransportError(f"cannot reach the inbox folder {self.root}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise TransportError(f"{self.root} is not a folder")
        if not os.access(self.root, os.W_OK):
            raise TransportError(f"permission denied: you cannot write into the inbox folder {self.root}")

    @_guard_local('looking at a file')
    def exists(self, rel: bytes) -> bool:
        try:
            os.lstat(self._p(rel))
            return True
        except FileNotFoundError:
            return False

    @_guard_local('looking at a file')
    def size(self, rel: bytes) -> int | None:
        try:
            st = os.lstat(self._p(rel))
        except FileNotFoundError:
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    @_guard_local('creating a folder')
    def mkdir(self, rel: bytes) -> None:
        p = self._p(rel)
        try:
            os.mkdir(p, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(p).st_mode):
                raise

    @_guard_local("creating a file")
    def open_write(self, rel: bytes) -> Writer:
        return _LocalWriter(self._p(rel))

    @_guard_local('removing an unfinished file')
    def remove(self, rel: bytes) -> None:
        try:
            os.unlink(self._p(rel))
        except FileNotFoundError:
            pass

    def drain(self) -> None:
        pass

    @_guard_local('flushing the upload')
    def sync_tree(self, rel: bytes) -> None:
        """Every file and directory of the entry durable (before its rename)."""
        top = self._p(rel)
        if sys.platform.startswith("linux"):
            syncfs(top)     # one call for the whole file system (local, NFS or CIFS mount)
            return
        for dirpath, _dirs, files in os.walk(top):
            for f in files:
                fd = os.open(os.path.join(dirpath, f), os.O_RDWR | getattr(os, "O_BINARY", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            if os.name == "posix":      # Windows cannot fsync a directory (NTFS journals it)
                _fsync_dir(dirpath)

    @_guard_local('checking a file sent before')
    def digest(self, rel: bytes) -> str | None:
        """The BLAKE3 of a file in the inbox: a resumed send re-checks what an
        earlier run wrote, since that was not yet durable when it was recorded."""
        fd = os.open(self._p(rel), os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            return hash_fd(fd)[0]
        finally:
            os.close(fd)

    @_guard_local('renaming the finished upload')
    def rename(self, old: bytes, new: bytes) -> None:
        src, dst = self._p(old), self._p(new)
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "already exists", dst)
        os.rename(src, dst)
        if os.name == "posix":
            _fsync_dir(self.root)

    def close(self) -> None:
        pass


def _fsync_dir(path: str) -> None:
    try:
        fsync_dir(path)
    except OSError as e:
        # Some network file systems (CIFS) refuse fsync on a directory; the
        # server commits the metadata on its own there.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise


# --------------------------------------------------------------------- SFTP

@dataclass
class HostKeyInfo:
    """What a first contact shows the user (like OpenSSH)."""
    host: str               # as in known_hosts: "host" or "[host]:port"
    key_type: str           # e.g. "ssh-ed25519"
    fingerprint: str        # "SHA256:..."

    @property
    def type_name(self) -> str:
        if self.key_type.startswith("ecdsa-"):
            return "ECDSA"
        return _KEY_TYPE_NAMES.get(self.key_type, self.key_type)

    def question(self) -> str:
        return (f"The authenticity of host '{self.host}' can't be established.\n"
                f"{self.type_name} key fingerprint is {self.fingerprint}.\n"
                "Compare it with the fingerprint your study runner gave you.")


@dataclass
class SFTPOptions:
    identity: str | None = None                             # a private key file
    known_hosts: str | None = None                          # the client's own known_hosts
    accept_host_key: str | None = None                      # "SHA256:..." accepted without asking
    confirm_host_key: Callable[[HostKeyInfo], bool] | None = None   # None: not interactive
    password: Callable[[str], str | None] | None = None     # prompt -> password (None: none)
    user_known_hosts: str | None = None                     # default ~/.ssh/known_hosts
    ssh_dir: str | None = None                              # default ~/.ssh


def fingerprint(key: paramiko.PKey) -> str:
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


# Pipelining (OpenSSH's sftp-server answers in order; a reply costs a round
# trip): files are opened, written, fsynced and closed without waiting for the
# replies, up to this many files and bytes awaiting one.  A file counts as
# sent only once its fsync and close were answered OK.
MAX_FILES_IN_FLIGHT = 64
MAX_BYTES_IN_FLIGHT = 8 << 20
# A file larger than this first waits for the replies about the files before
# it (one round trip per large file): an upload interrupted during a long
# file then never sends those small files again on resume.
SETTLE_BEFORE = 1 << 20
WRITE_CHUNK = 32768         # paramiko's SFTPFile.MAX_REQUEST_SIZE: some servers refuse larger writes
# SSH_FXP_WRITE: length, type, id, handle (OpenSSH's is 4 bytes; up to 256 by
# the protocol), offset, data length.
_WRITE_HEADER = 4 + 1 + 4 + 4 + 256 + 8 + 4


class _Pipeline:
    """The one user of paramiko's private request API (paramiko 2.x-5.x):
    ``sftp._async_request(obj, cmd, *args)`` sends a request and returns its
    number; whichever ``sftp._read_response()`` later reads the reply calls
    ``obj._async_response(cmd, msg, num)`` (paramiko's own synchronous calls,
    e.g. mkdir, do that too while waiting for theirs).  paramiko keeps *obj*
    only in a WeakValueDictionary, so ``files`` holds each file until its
    last reply.  The callbacks only record; ``service`` acts on them."""

    def __init__(self, sftp: paramiko.SFTPClient) -> None:
        self.sftp = sftp
        # paramiko sends at most out_max_packet_size - 64 bytes of a channel in
        # one SSH packet: a write request that fits takes one packet, not two
        # (30 % fewer packets, each encrypted and MACed in Python).
        room = getattr(sftp.sock, "out_max_packet_size", 0) - 64 - _WRITE_HEADER
        self.chunk = min(WRITE_CHUNK, room) if room >= 4096 else WRITE_CHUNK
        self.files: set[_PipelinedFile] = set()     # each with a reply to come (or still being written)
        self.bytes = 0                              # written or buffered, not yet acknowledged
        self.fsync = True                           # until the server says fsync@openssh.com is unknown
        self.failed: _PipelinedFile | None = None   # the first file the server refused
        self.events: list[_PipelinedFile] = []      # files with replies not yet acted on

    def request(self, f: "_PipelinedFile", kind: str, cmd: int, *args, nbytes: int = 0) -> None:
        num = self.sftp._async_request(f, cmd, *args)
        f.outstanding[num] = (kind, nbytes)

    def service(self) -> None:
        while self.events:
            self.events.pop().advance()

    def poll(self) -> None:
        """Act on the replies already here, without waiting."""
        chan = self.sftp.sock
        while chan.recv_ready():
            self.sftp._read_response()
        self.service()

    def wait(self, busy: Callable[[], bool]) -> None:
        while True:
            self.service()
            self.check()
            if not busy():
                return
            self.sftp._read_response()      # one reply; IO_TIMEOUT bounds the wait

    def room(self) -> None:
        self.wait(lambda: self.bytes > MAX_BYTES_IN_FLIGHT or len(self.files) >= MAX_FILES_IN_FLIGHT)

    def drain(self) -> None:
        """Every finished or aborted file answered (a failure raises, naming its file)."""
        self.wait(lambda: any(f.closing for f in self.files))

    def check(self) -> None:
        f = self.failed
        if f is not None and f.error is not None:
            kind, e = f.error
            what = {"open": "creating a file", "write": "writing"}.get(kind, "finishing a file")
            raise f.owner._err(e, what, f.rel)


class _PipelinedFile:
    """One remote file being written: open, writes, fsync and close go out
    as soon as they can; data written before the open's reply (the handle)
    waits in ``buf``."""

    def __init__(self, owner: "SFTPTransport", pl: _Pipeline, rel: bytes) -> None:
        self.owner, self.pl, self.rel = owner, pl, rel
        self.handle: bytes | None = None
        self.outstanding: dict[int, tuple[str, int]] = {}   # request number -> (kind, bytes)
        self.buf: list[bytes] = []
        self.offset = 0                         # sent so far
        self.given = 0                          # passed to write so far
        self.finishing = False
        self.aborted = False
        self.tail_sent = False                  # the close went out
        self.error: tuple[str, OSError] | None = None
        self.done: Callable[[], None] | None = None

    @property
    def closing(self) -> bool:
        return self.finishing or self.aborted

    def open(self, path: str) -> None:
        self.pl.files.add(self)
        self.pl.request(self, "open", CMD_OPEN, path.encode("utf-8"),
                        SFTP_FLAG_WRITE | SFTP_FLAG_CREATE | SFTP_FLAG_TRUNC, SFTPAttributes())

    # paramiko calls this while reading a reply (see _Pipeline): record only, never raise.
    def _async_response(self, cmd: int, msg: paramiko.Message, num: int) -> None:
        kind, nbytes = self.outstanding.pop(num, ("?", 0))
        self.pl.bytes -= nbytes
        if cmd == CMD_HANDLE and kind == "open":
            self.handle = msg.get_binary()
        elif cmd == CMD_STATUS:
            code, text = msg.get_int(), msg.get_string().decode("utf-8", "replace")
            if code == SFTP_OP_UNSUPPORTED and kind == "fsync":
                # No fsync@openssh.com (paramiko does not show the server's
                # extensions): stop asking; files are as durable as the
                # server makes a closed file.
                self.pl.fsync = False
            elif code != SFTP_OK:
                self._fail(kind, OSError(errno.ENOENT, text) if code == SFTP_NO_SUCH_FILE else
                           OSError(errno.EACCES, text) if code == SFTP_PERMISSION_DENIED else OSError(text))
        else:
            self._fail(kind, OSError(f"unexpected reply {cmd} to {kind}"))
        self.pl.events.append(self)

    def _fail(self, kind: str, e: OSError) -> None:
        if self.error is None:
            self.error = (kind, e)
        if self.pl.failed is None and not self.aborted:
            self.pl.failed = self

    def _send(self, data: bytes | memoryview) -> None:
        step = self.pl.chunk
        for i in range(0, len(data), step):
            chunk = bytes(data[i:i + step])
            self.pl.bytes += len(chunk)
            self.pl.request(self, "write", CMD_WRITE, self.handle, int64(self.offset), chunk,
                            nbytes=len(chunk))
            self.offset += len(chunk)

    def advance(self) -> None:
        """Send what can go now; once every reply is in, the file is done."""
        if self.handle is not None and not self.tail_sent:
            if self.buf:
                buf, self.buf = self.buf, []
                for b in buf:
                    self.pl.bytes -= len(b)
                    if self.error is None and not self.aborted:
                        self._send(b)
            if self.closing or self.error is not None:
                if self.finishing and self.error is None and self.pl.fsync:
                    self.pl.request(self, "fsync", CMD_EXTENDED, "fsync@openssh.com", self.handle)
                self.pl.request(self, "close", CMD_CLOSE, self.handle)
                self.tail_sent = True
        if self.outstanding or not (self.tail_sent or self.handle is None):
            return
        if self.closing or self.error is not None:      # all answered (or the open failed)
            for b in self.buf:
                self.pl.bytes -= len(b)
            self.buf = []
            self.pl.files.discard(self)
            if self.finishing and self.error is None and self.done is not None:
                done, self.done = self.done, None
                done()

    def write(self, data: bytes | memoryview) -> None:
        self.pl.check()
        if self.given <= SETTLE_BEFORE < self.given + len(data):
            self.pl.drain()
        self.given += len(data)
        if self.handle is None:
            b = bytes(data)
            self.buf.append(b)
            self.pl.bytes += len(b)
        else:
            self._send(data)
        self.pl.poll()
        self.pl.room()

    def finish(self, done: Callable[[], None] | None = None) -> None:
        self.pl.check()
        self.done = done
        self.finishing = True
        self.advance()
        self.pl.poll()
        self.pl.check()

    def abort(self) -> None:
        # The close goes out without waiting (a retry of the same file waits
        # for it in open_write); errors of an aborted file do not matter.
        self.aborted = True
        try:
            self.advance()
        except Exception:
            pass


class SFTPTransport:
    def __init__(self, dest: Destination, opts: SFTPOptions) -> None:
        self.dest = dest
        self.display = dest.display
        self.opts = opts
        self.root = dest.path
        self.transport: paramiko.Transport | None = None
        self.sftp: paramiko.SFTPClient | None = None
        self._pl: _Pipeline | None = None
        try:
            self._connect()
        except BaseException:
            self.close()
            raise

    # -- connecting

    @property
    def _hostname(self) -> str:
        return self.dest.host if self.dest.port == 22 else f"[{self.dest.host}]:{self.dest.port}"

    def _known_hosts(self) -> tuple[paramiko.HostKeys, list[str]]:
        keys = paramiko.HostKeys()
        files = [self.opts.user_known_hosts or os.path.join(os.path.expanduser("~"), ".ssh", "known_hosts")]
        if self.opts.known_hosts:
            files.append(self.opts.known_hosts)
        used = []
        for f in files:
            if os.path.isfile(f):
                try:
                    keys.load(f)
                    used.append(f)
                except (OSError, paramiko.SSHException) as e:
                    raise TransportError(f"cannot read the known hosts file {f}: {e}") from None
        return keys, used

    def _connect(self) -> None:
        d = self.dest
        try:
            sock = socket.create_connection((d.host, d.port), timeout=CONNECT_TIMEOUT)
        except socket.gaierror as e:
            raise TransportError(f"cannot find the server {d.host}: {e.strerror}") from None
        except OSError as e:
            raise TransportError(f"cannot connect to {d.host} port {d.port}: "
                                 f"{e.strerror or 'timed out'}") from None
        known, _files = self._known_hosts()
        known_for_host = known.lookup(self._hostname) or {}
        t = paramiko.Transport(sock)
        self.transport = t
        if known_for_host:
            # Like OpenSSH: ask for a key type we already know for this host.
            opts = t.get_security_options()
            types = list(opts.key_types)
            preferred = [k for k in types if k in known_for_host or
                         (k.startswith("rsa-sha2-") and "ssh-rsa" in known_for_host)]
            opts.key_types = preferred + [k for k in types if k not in preferred]
        try:
            t.start_client(timeout=CONNECT_TIMEOUT)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"the SSH connection to {d.host} port {d.port} failed: {e}") from None
        t.set_keepalive(30)
        self._check_host_key(t.get_remote_server_key(), known_for_host)
        self._authenticate(t)
        try:
            self.sftp = paramiko.SFTPClient.from_transport(t)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError(f"{d.host} offers no SFTP service: {e}") from None
        if self.sftp is None:
            raise TransportError(f"{d.host} offers no SFTP service")
        self.sftp.get_channel().settimeout(IO_TIMEOUT)
        self._pl = _Pipeline(self.sftp)

    def _check_host_key(self, key: paramiko.PKey, known_for_host) -> None:
        info = HostKeyInfo(self._hostname, key.get_name(), fingerprint(key))
        if known_for_host:
            known = known_for_host.get(key.get_name())
            if known is not None and known.asbytes() == key.asbytes():
                return
            # Never accept a different key for a known host, whatever the flags say:
            # it is a reinstalled server at best and an attacker at worst.
            raise HostKeyError(
                f"WARNING: the host key of {info.host} has CHANGED (it now offers {info.type_name} "
                f"{info.fingerprint}, which does not match the known hosts file). Someone could be "
                "intercepting the connection, or the server was reinstalled. Nothing was sent. Ask your "
                "study runner for the server's fingerprint; only if it matches, remove the old entry "
                f"(ssh-keygen -R '{info.host}', and from {self.opts.known_hosts or 'the client known_hosts'}) "
                "and try again.")
        if self.opts.accept_host_key:
            if self.opts.accept_host_key.strip() != info.fingerprint:
                raise HostKeyError(f"the host key of {info.host} is {info.type_name} {info.fingerprint}, "
                                   f"not the {self.opts.accept_host_key} given with --accept-host-key: "
                                   "refusing to connect")
        elif self.opts.confirm_host_key is None or not self.opts.confirm_host_key(info):
            how = (f"if your study runner confirms this fingerprint, run the command again with "
                   f"--accept-host-key {info.fingerprint}")
            raise HostKeyError(f"unknown host key for {info.host}: {info.type_name} {info.fingerprint}; "
                               f"nothing was sent. {how[0].upper()}{how[1:]} (or add the host to "
                               "~/.ssh/known_hosts, e.g. with ssh-keyscan)")
        self._save_host_key(key)

    def _save_host_key(self, key: paramiko.PKey) -> None:
        path = self.opts.known_hosts
        if not path:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="ascii", newline="\n") as f:
            f.write(f"{self._hostname} {key.get_name()} {key.get_base64()}\n")
            f.flush()
            os.fsync(f.fileno())

    def _authenticate(self, t: paramiko.Transport) -> None:
        user = self.dest.user
        tried: list[str] = []
        allowed: list[str] | None = None

        def try_key(label: str, key: paramiko.PKey) -> bool:
            nonlocal allowed
            if allowed is not None and "publickey" not in allowed:
                return False
            tried.append(label)
            try:
                t.auth_publickey(user, key)
                return t.is_authenticated()
            except paramiko.BadAuthenticationType as e:
                allowed = list(e.allowed_types)
            except paramiko.AuthenticationException:
                pass
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise TransportError(f"the SSH connection to {self.dest.host} failed: {e}") from None
            return False

        if self.opts.identity:
            key = self._load_key(self.opts.identity, explicit=True)
            if key is not None and try_key(f"key {self.opts.identity}", key):
                return
        else:
            try:
                agent_keys = paramiko.Agent().get_keys()
            except (paramiko.SSHException, OSError):
                agent_keys = ()
            for k in agent_keys:
                if try_key("a key from the SSH agent", k):
                    return
            ssh_dir = self.opts.ssh_dir or os.path.join(os.path.expanduser("~"), ".ssh")
            for name in DEFAULT_KEYS:
                p = os.path.join(ssh_dir, name)
                if os.path.isfile(p):
                    key = self._load_key(p, explicit=False)
                    if key is not None and try_key(f"key {p}", key):
                        return
        passwords_allowed = allowed is None or bool({"password", "keyboard-interactive"} & set(allowed))
        if self.opts.password is not None and passwords_allowed:
            refused = _refused_keys(tried, allowed)
            if refused:     # say why a password is asked when the collector expected their key to work
                pw = self.opts.password(f"{refused}; password for {user}@{self.dest.host}: ")
            else:
                pw = self.opts.password(f"{user}@{self.dest.host}'s password: ")
            if pw:
                tried.append("password")
                try:
                    if allowed is not None and "password" not in allowed:
                        t.auth_interactive(user, lambda title, instr, prompts: [pw for _ in prompts])
                    else:
                        t.auth_password(user, pw)
                    if t.is_authenticated():
                        return
                except paramiko.BadAuthenticationType as e:
                    try:
                        if "keyboard-interactive" in e.allowed_types:
                            t.auth_interactive(user, lambda title, instr, prompts: [pw for _ in prompts])
                            if t.is_authenticated():
                                return
                    except paramiko.AuthenticationException:
                        pass
                except paramiko.AuthenticationException:
                    pass
                except (paramiko.SSHException, OSError, EOFError) as e:
                    raise TransportError(f"the SSH connection to {self.dest.host} failed: {e}") from None
        what = ", ".join(tried) if tried else "no key found and no password given"
        raise TransportError(f"authentication failed for {user}@{self.dest.host} (tried: {what}); "
                             "check the user name, or give your key with --identity FILE")

    def _load_key(self, path: str, explicit: bool) -> paramiko.PKey | None:
        try:
            return paramiko.PKey.from_path(path)
        except paramiko.PasswordRequiredException:
            if self.opts.password is None:
                if explicit:
                    raise TransportError(f"the key {path} is protected by a passphrase and there is no "
                                         "terminal to ask for it (load it into ssh-agent)") from None
                return None
            phrase = self.opts.password(f"Enter passphrase for key '{path}': ")
            if not phrase:
                return None
            try:
                return paramiko.PKey.from_path(path, passphrase=phrase)
            except paramiko.SSHException:
                raise TransportError(f"wrong passphrase for the key {path}") from None
        except (paramiko.SSHException, OSError, ValueError) as e:
            if explicit:
                raise TransportError(f"cannot use the key {path}: {e}") from None
            return None

    # -- file operations

    def _r(self, rel: bytes) -> str:
        # paramiko sends str paths as UTF-8; names that are not UTF-8 go as
        # surrogate escapes and would be mangled, so refuse them clearly.
        try:
            text = rel.decode("utf-8")
        except UnicodeDecodeError:
            raise TransportError(f"the name {rel!r} is not valid UTF-8 and cannot be sent over SFTP; "
                                 "send through a mounted inbox folder instead") from None
        return f"{self.root}/{text}" if self.root != "/" else f"/{text}"

    def _err(self, e: Exception, what: str, rel: bytes | None = None) -> TransportError:
        where = f"{self.display}" + (f" ({rel.decode('utf-8', 'replace')})" if rel else "")
        if isinstance(e, (socket.timeout, EOFError, paramiko.SSHException)) or \
                (isinstance(e, OSError) and e.errno in (errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT)):
            detail = f" ({e})" if str(e) else ""
            return TransportError(f"the connection to {self.dest.host} was lost while {what}{detail}; "
                                  "run the same command again to resume")
        if isinstance(e, OSError) and e.errno == errno.EACCES:
            return TransportError(f"permission denied on the server while {what} in {where}")
        if isinstance(e, OSError) and e.errno == errno.ENOENT:
            return TransportError(f"not found on the server while {what} in {where}")
        return TransportError(f"the server refused {what} in {where}: {e} (is its disk full?)")

    def check_inbox(self) -> None:
        assert self.sftp is not None
        try:
            st = self.sftp.stat(self.root)
        except (OSError, paramiko.SSHException, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                raise TransportError(f"the inbox {self.root} does not exist on {self.dest.host}") from None
            raise self._err(e, "looking at the inbox") from None
        if not stat.S_ISDIR(st.st_mode or 0):
            raise TransportError(f"{self.root} on {self.dest.host} is not a folder")

    def _lstat(self, rel: bytes):
        assert self.sftp is not None
        try:
            return self.sftp.lstat(self._r(rel))
        except FileNotFoundError:
            return None
        except (OSError, paramiko.SSHException, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                return None
            raise self._err(e, "looking at a file", rel) from None

    def exists(self, rel: bytes) -> bool:
        return self._lstat(rel) is not None

    def size(self, rel: bytes) -> int | None:
        st = self._lstat(rel)
        if st is None or not stat.S_ISREG(st.st_mode or 0):
            return None
        return st.st_size

    def mkdir(self, rel: bytes) -> None:
        assert self.sftp is not None
        try:
            self.sftp.mkdir(self._r(rel), 0o755)
        except (OSError, paramiko.SSHException, EOFError) as e:
            st = self._lstat(rel) if isinstance(e, OSError) and not isinstance(e, socket.timeout) else None
            if st is not None and stat.S_ISDIR(st.st_mode or 0):
                return
            raise self._err(e, "creating a folder", rel) from None

    def open_write(self, rel: bytes) -> Writer:
        assert self.sftp is not None and self._pl is not None
        path = self._r(rel)
        pl = self._pl
        f = _PipelinedFile(self, pl, rel)
        try:
            # A file aborted for a retry must be closed before it is truncated again.
            pl.wait(lambda: any(g.rel == rel for g in pl.files))
            pl.room()
            f.open(path)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self._err(e, "creating a file", rel) from None
        return _GuardedWriter(self, f, rel)

    def drain(self) -> None:
        """Wait for every reply about the files written; a file the server
        refused fails the send here at the latest, named."""
        if self._pl is None:
            return
        try:
            self._pl.drain()
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self._err(e, "finishing the upload") from None

    def remove(self, rel: bytes) -> None:
        assert self.sftp is not None
        try:
            self.sftp.remove(self._r(rel))
        except (OSError, paramiko.SSHException, EOFError) as e:
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                return
            raise self._err(e, "removing an unfinished file", rel) from None

    def sync_tree(self, rel: bytes) -> None:
        self.drain()    # SFTP has no directory fsync; the files themselves are fsynced

    def digest(self, rel: bytes) -> str | None:
        return None     # a file is recorded as sent only once its fsync was answered

    def rename(self, old: bytes, new: bytes) -> None:
        assert self.sftp is not None
        self.drain()        # never rename while a reply about a file is outstanding
        if self.exists(new):
            raise TransportError(f"{new.decode('utf-8', 'replace')} already exists in {self.display}")
        try:
            # docs/design.md, "paramiko": sftp.rename onto an existing name fails; posix_rename works
            # (the target was just checked to be absent, and its name is random).
            self.sftp.posix_rename(self._r(old), self._r(new))
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self._err(e, "renaming the finished upload", new) from None

    def close(self) -> None:
        for x in (self.sftp, self.transport):
            if x is not None:
                try:
                    x.close()
                except Exception:
                    pass
        self.sftp = None
        self.transport = None
        self._pl = None


class _GuardedWriter:
    """Turns paramiko's exceptions on a file into TransportError."""

    def __init__(self, owner: SFTPTransport, w: _PipelinedFile, rel: bytes) -> None:
        self.owner, self.w, self.rel = owner, w, rel

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.w.write(data)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self.owner._err(e, "writing", self.rel) from None

    def finish(self, done: Callable[[], None] | None = None) -> None:
        try:
            self.w.finish(done)
        except (OSError, paramiko.SSHException, EOFError) as e:
            raise self.owner._err(e, "finishing a file", self.rel) from None

    def abort(self) -> None:
        self.w.abort()


def _refused_keys(tried: list[str], allowed: list[str] | None) -> str:
    """What to say before asking for a password after keys were tried: "" if none was."""
    if not tried:
        return ""
    if allowed is not None and "publickey" not in allowed:
        return "the server does not take SSH keys for this account"
    home = os.path.expanduser("~")
    names: list[str] = []
    for label in tried:
        if label.startswith("key "):
            p = label[4:]
            if home not in ("", "~", "/") and p.startswith(home + os.sep):
                p = "~" + p[len(home):]
            names.append(f"the key {p}")
        elif "your SSH agent's keys" not in names:
            names.append("your SSH agent's keys")
    return "the server refused " + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])


def open_transport(dest: Destination, opts: SFTPOptions | None = None) -> Transport:
    if dest.kind == "local":
        return LocalTransport(dest)
    return SFTPTransport(dest, opts or SFTPOptions())

