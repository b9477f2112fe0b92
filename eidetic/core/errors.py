"""The library's exception hierarchy.

Each class's docstring is its message template (filled with the keyword
arguments given when raised) and each carries the exit status the command
line maps it to.  Exit statuses live in documented bands (docs/admin.md):

    0  success
    1  the operation ran but something is wrong (failed entries, fsck findings,
       a checkout that could not be verified, a path with no history)
    2  the request cannot be carried out as given (bad config or arguments,
       an existing destination, an unknown store format)
    3  the environment stops us (a lock held by another process, no space)
"""

from __future__ import annotations


class EideticError(Exception):
    """{detail}"""

    exit_code = 1

    def __init__(self, detail: str = "", **kwargs: object) -> None:
        self.kwargs = dict(kwargs, detail=detail)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        try:
            return (self.__doc__ or "{detail}").strip().format(**self.kwargs)
        except (KeyError, IndexError):  # a template/argument mismatch must not hide the error
            return f"{type(self).__name__}: {self.kwargs}"


class ConfigError(EideticError):
    """config {source}: {detail}"""

    exit_code = 2

    def __init__(self, detail: str, source: str = "") -> None:
        super().__init__(detail, source=source or "(built-in default layout)")


class UsageError(EideticError):
    """{detail}"""

    exit_code = 2


class StoreFormatError(EideticError):
    """store {path}: {detail}"""

    exit_code = 2

    def __init__(self, detail: str, path: str) -> None:
        super().__init__(detail, path=path)


class StoreIOError(EideticError):
    """An I/O error, a full disk or quota, or a read-only file system met
    while writing or reading a study's store or index (never the uploader's
    fault).  *committed* says whether the upload being ingested had passed
    its commit point: then it is finished by the next run, never failed.
    *sync_failed* marks an fsync/syncfs/fdatasync error: what reached the
    disk is unknown, so the study is left alone until a person looks
    (never retried as if it succeeded).

    study {study}: {detail}"""

    exit_code = 3

    def __init__(self, detail: str, study: str, errno: int | None = None, committed: bool = False,
                 sync_failed: bool = False) -> None:
        super().__init__(detail, study=study)
        self.errno = errno
        self.committed = committed
        self.sync_failed = sync_failed
        self.entry_note: str | None = None   # what became of the entry in hand, if any
        self.results: list = []              # entries finished before the fault (ingest.run_study)

    @property
    def message(self) -> str:
        return f"study {self.kwargs['study']}: {self.kwargs['detail']}"


class IndexUnusable(EideticError):
    """The study's index (a cache of the manifests) is missing, damaged,
    out of step with HEAD, or of another history, and this command may not
    or need not rebuild it.

    study {study}: {detail}; run 'eidetic fsck --repair --study {study}' (as the service user) to rebuild it from the manifests"""

    exit_code = 3

    def __init__(self, detail: str, study: str) -> None:
        super().__init__(detail, study=study)

    @property
    def message(self) -> str:
        s = self.kwargs["study"]
        return (f"study {s}: {self.kwargs['detail']}; run 'eidetic fsck --repair --study {s}' "
                "(as the service user) to rebuild it from the manifests")


class NotFound(EideticError):
    """{detail}"""

    exit_code = 1


class DestinationExists(EideticError):
    """{path} already exists (use --force to overwrite it)"""

    exit_code = 2

    def __init__(self, path: str) -> None:
        super().__init__("", path=path)


class IntegrityError(EideticError):
    """integrity check failed: {detail}"""

    exit_code = 1


class LockBusy(EideticError):
    """{detail}"""

    exit_code = 3


class EntryRejected(EideticError):
    """Raised inside ingest for an entry that cannot be ingested; the entry is
    marked failed with this reason and the run goes on with the next one.

    {detail}

    *resend*: only sending the data again can fix it (renaming the entry
    cannot); *commands*: the 'eidetic send' commands the reason names, for
    the failure mail."""

    def __init__(self, detail: str = "", resend: bool = False, commands: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.resend = resend
        self.commands = commands

    @property
    def message(self) -> str:
        return str(self.kwargs["detail"])


class EntryChanged(EntryRejected):
    """A file kept changing while it was read; the entry may be retried."""


class Interrupted(EideticError):
    """interrupted: stopping before the work was committed{detail}"""

    exit_code = 3


class SendError(EideticError):
    """{detail}"""

    exit_code = 1


class SendCancelled(SendError):
    """{detail}"""

    exit_code = 130     # as an interrupted command: nothing failed, the upload waits to be resumed


class TransportError(EideticError):
    """The destination cannot be reached or refuses us (network, authentication,
    an unknown or changed host key, permission denied on the inbox).

    {detail}"""

    exit_code = 3

    @property
    def message(self) -> str:
        return str(self.kwargs["detail"])


class HostKeyError(TransportError):
    """An SSH host key that is unknown (and not accepted) or has changed."""


class ServerNotInstalled(EideticError):
    """A server command run where only the client (the lab PC's uploader)
    is installed: the server's own libraries are missing.  The one remedy is
    an install, so the message is that install's command line (exit status
    3: the environment stops us; systemd does not restart the daemon for it).

    '{command}' needs the server libraries ({missing} not installed): {install}"""

    exit_code = 3

    def __init__(self, command: str, missing: list[str], install: str) -> None:
        names = ", ".join(missing[:-1]) + " and " + missing[-1] if len(missing) > 1 else missing[0]
        super().__init__("", command=command, missing=f"{names} {'are' if len(missing) > 1 else 'is'}",
                         install=install)

    @property
    def message(self) -> str:
        k = self.kwargs
        return f"'{k['command']}' needs the server libraries ({k['missing']} not installed): {k['install']}"


class AccessDenied(EideticError):
    """This user may not read or change what the command needs (a study's
    store, tree or state): never reported as damage.  The message names the
    user or group that may.

    {detail}"""

    exit_code = 3

    @property
    def message(self) -> str:
        return str(self.kwargs["detail"])


class ReplicaError(EideticError):
    """A replica (a second copy of a study's store, store_format.md
    "Replicas") cannot be used as asked.  Exit status 3: the environment
    stops us (an endpoint, a bucket, a mounted file system).

    replica {replica}: {detail}"""

    exit_code = 3

    def __init__(self, detail: str, replica: str = "?") -> None:
        super().__init__(detail, replica=replica)

    @property
    def message(self) -> str:
        return f"replica {self.kwargs['replica']}: {self.kwargs['detail']}"


class ReplicaUnreachable(ReplicaError):
    """The endpoint or file system cannot be reached, the credentials are
    refused, or the bucket or directory does not exist (exit status 3)."""


class ReplicaNotLocked(ReplicaError):
    """retention_days is configured but the replica cannot hold retention
    (a bucket without Object Lock, or a file:// replica): nothing is written
    rather than write copies that could be deleted.  Exit status 2: the
    configuration asks for what this replica cannot do."""

    exit_code = 2


class ReplicaMissing(ReplicaError):
    """A key the caller needs is not on the replica (exit status 1: the
    operation ran and found something wrong)."""

    exit_code = 1


class ReplicaCorrupt(ReplicaError):
    """Bytes read from the replica do not hash to their name, or its
    manifests do not form the chain (exit status 1)."""

    exit_code = 1


class RestoreRefused(ReplicaError):
    """restore writes only into an empty (or absent) store and tree, or into
    one it started itself; anything else is refused untouched (exit status 2)."""

    exit_code = 2
