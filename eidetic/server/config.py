"""Configuration: where it is found, what it may say, and the default layout.

Lookup order: an explicit path (``--config``), else ``$EIDETIC_CONFIG``, else
``/etc/eidetic/eidetic.yaml``; when none exists, the self-contained default
layout under the data directory (``$EIDETIC_HOME``, else
``$XDG_DATA_HOME/eidetic``, else ``~/.local/share/eidetic``).  The word
``default`` as the path (``--config default``, ``EIDETIC_CONFIG=default``)
asks for that default layout even when ``/etc/eidetic/eidetic.yaml`` exists.

Every problem is a :class:`ConfigError` naming the key; nothing here prints.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

from ..core.errors import ConfigError
from ..core.yamlfile import no_unknown_keys, read_yaml
from ..core.layout import STUDY_NAME_RE
from ..replica.backend import RETENTION_MODES, ReplicaConfig

SYSTEM_CONFIG = "/etc/eidetic/eidetic.yaml"
DEFAULT_SETTLE_SECONDS = 5.0   # the rename out of the dot name is the real signal; this catches hand copies
DEFAULT_LAYOUT_SETTLE_SECONDS = 2.0
DEFAULT_STUDY = "demo"

DEFAULT_RESCAN_SECONDS = 60.0
DEFAULT_STALE_HOURS = 24.0
DEFAULT_DISK_WARN = (90, 95)
DEFAULT_REPLICA_LAG_HOURS = 24.0
NOTIFY_UPLOADS = ("none", "each", "digest")

_TOP_KEYS = {"inbox", "state", "settle_seconds", "studies", "notify", "polling", "rescan_seconds",
             "stale_hours", "user", "group"}
_STUDY_KEYS = {"tree", "store", "inbox", "notify", "notify_uploads", "require_description", "group",
               "replicas", "replica_lag_hours"}
_REPLICA_KEYS = {"url", "endpoint", "region", "profile", "retention_days", "retention_mode"}
# retention_days on a file:// replica is refused by its check_ready (ReplicaNotLocked)
# when replication starts, with the reason; the rest mean nothing there.
_S3_ONLY_KEYS = ("endpoint", "region", "profile")
_NOTIFY_KEYS = {"smtp_host", "smtp_port", "sender", "admin", "disk_warn_percent", "starttls",
                "credentials_file", "retry_seconds", "digest_hour", "timeout_seconds"}


@dataclass(frozen=True)
class NotifyConfig:
    """SMTP settings.  Credentials never live in the YAML: *credentials_file*
    names a file whose first line is the user name and second the password."""
    smtp_host: str = "localhost"
    smtp_port: int = 25
    sender: str = ""
    admin: tuple[str, ...] = ()
    disk_warn_percent: tuple[int, ...] = DEFAULT_DISK_WARN
    starttls: bool = False
    credentials_file: str | None = None
    retry_seconds: float = 300.0        # how soon an unsent mail is tried again
    digest_hour: int = 7                # local hour after which the daily digest goes out
    timeout_seconds: float = 30.0

    @property
    def enabled(self) -> bool:
        return bool(self.sender)


@dataclass(frozen=True)
class StudyConfig:
    name: str
    tree: str
    store: str
    inbox: str | None = None
    notify: tuple[str, ...] = ()        # the study's people
    notify_uploads: str = "none"        # "none" | "each" (a mail per upload) | "digest" (daily)
    require_description: bool = False   # refuse entries without an upload description
    group: str | None = None            # group that may read the tree
    replicas: tuple[ReplicaConfig, ...] = ()    # second copies, in config order (docs/admin.md)
    replica_lag_hours: float = DEFAULT_REPLICA_LAG_HOURS   # mail the people when a replica is this far behind

    def replica(self, name: str) -> ReplicaConfig:
        for r in self.replicas:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.replicas) or "none"
        raise ConfigError(f"study {self.name} has no replica {name!r} (configured: {known})")

    def store_args(self) -> tuple[str, str, str]:
        """What ``Store(...)`` is handed: the store knows no config."""
        return self.name, self.store, self.tree


@dataclass(frozen=True)
class Config:
    inbox: str | None
    state: str
    settle_seconds: float
    studies: dict[str, StudyConfig] = field(default_factory=dict)
    source: str = ""          # file it came from, or "" for the default layout
    notify: NotifyConfig = field(default_factory=NotifyConfig)   # sender "" = no mail at all
    polling: bool = False     # poll instead of inotify (NFS/SMB-mounted inboxes)
    rescan_seconds: float = DEFAULT_RESCAN_SECONDS   # full rescan even when events arrive
    stale_hours: float = DEFAULT_STALE_HOURS         # a dot-entry untouched this long is reported
    user: str | None = None   # service user owning inbox, state, store and tree (init)
    group: str | None = None  # service group (init)

    @property
    def is_default_layout(self) -> bool:
        return not self.source

    def study(self, name: str) -> StudyConfig:
        try:
            return self.studies[name]
        except KeyError:
            known = ", ".join(sorted(self.studies)) or "none"
            raise ConfigError(f"unknown study {name!r} (configured: {known})", self.source) from None

    def inboxes(self) -> list[tuple[str, str | None]]:
        """(inbox directory, study it is dedicated to or None for the shared inbox)."""
        out: list[tuple[str, str | None]] = []
        if self.inbox:
            out.append((self.inbox, None))
        out.extend((s.inbox, s.name) for s in self.studies.values() if s.inbox)
        return out


def data_dir() -> str:
    if os.environ.get("EIDETIC_HOME"):
        return os.path.abspath(os.environ["EIDETIC_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "eidetic")


def default_layout() -> Config:
    d = data_dir()
    study = StudyConfig(DEFAULT_STUDY, tree=os.path.join(d, "studies", DEFAULT_STUDY, "tree"),
                        store=os.path.join(d, "studies", DEFAULT_STUDY, "store"))
    return Config(inbox=os.path.join(d, "inbox"), state=os.path.join(d, "state"),
                  settle_seconds=DEFAULT_LAYOUT_SETTLE_SECONDS, studies={DEFAULT_STUDY: study})


# --config default / EIDETIC_CONFIG=default: the built-in default layout even
# when SYSTEM_CONFIG exists (a file named "default" is ./default).
DEFAULT_WORD = "default"


def find_config_path(explicit: str | None) -> str | None:
    """The config file to use, or None for the default layout."""
    for named, missing in ((explicit, "file not found"),
                           (os.environ.get("EIDETIC_CONFIG"), "file not found (named by $EIDETIC_CONFIG)")):
        if named == DEFAULT_WORD:
            return None
        if named:
            if not os.path.isfile(named):
                raise ConfigError(missing, named)
            return named
    return SYSTEM_CONFIG if os.path.isfile(SYSTEM_CONFIG) else None


def load(explicit: str | None = None) -> Config:
    path = find_config_path(explicit)
    if path is None:
        return default_layout()
    return parse(read_yaml(path), path)


def parse(doc: object, source: str) -> Config:
    if not isinstance(doc, dict):
        raise ConfigError("the top level must be a mapping of keys", source)
    _no_unknown(doc, _TOP_KEYS, "", source)
    if "state" not in doc:
        raise ConfigError("key 'state' is required", source)
    if "studies" not in doc or not isinstance(doc["studies"], dict) or not doc["studies"]:
        raise ConfigError("key 'studies' must map at least one study name to its settings", source)
    inbox = _abs_path(doc, "inbox", "inbox", source) if doc.get("inbox") is not None else None
    state = _abs_path(doc, "state", "state", source)
    settle = _number(doc, "settle_seconds", DEFAULT_SETTLE_SECONDS, source)
    rescan = _number(doc, "rescan_seconds", DEFAULT_RESCAN_SECONDS, source, minimum=1)
    stale = _number(doc, "stale_hours", DEFAULT_STALE_HOURS, source)
    polling = _bool(doc, "polling", False, "polling", source)
    notify = _notify(doc.get("notify"), source)

    studies: dict[str, StudyConfig] = {}
    for name, body in doc["studies"].items():
        key = f"studies.{name}"
        if not isinstance(name, str) or not STUDY_NAME_RE.match(name):
            raise ConfigError(
                f"study name {name!r} cannot be parsed from entry names: use letters, digits and "
                "'_' only (no '-', which separates the study from the rest of an entry name)", source)
        if not isinstance(body, dict):
            raise ConfigError(f"key '{key}' must be a mapping with 'tree' and 'store'", source)
        _no_unknown(body, _STUDY_KEYS, key + ".", source)
        for required in ("tree", "store"):
            if required not in body:
                raise ConfigError(f"key '{key}.{required}' is required", source)
        studies[name] = StudyConfig(
            name=name,
            tree=_abs_path(body, "tree", f"{key}.tree", source),
            store=_abs_path(body, "store", f"{key}.store", source),
            inbox=_abs_path(body, "inbox", f"{key}.inbox", source) if body.get("inbox") is not None else None,
            notify=_addresses(body, "notify", f"{key}.notify", source),
            notify_uploads=_choice(body, "notify_uploads", NOTIFY_UPLOADS, f"{key}.notify_uploads", source),
            require_description=_bool(body, "require_description", False, f"{key}.require_description",
                                      source),
            group=_name(body, "group", f"{key}.group", source),
            replicas=_replicas(body.get("replicas"), f"{key}.replicas", source),
            replica_lag_hours=_number(body, "replica_lag_hours", DEFAULT_REPLICA_LAG_HOURS, source,
                                      minimum=0.01, full_key=f"{key}.replica_lag_hours"),
        )
    if inbox is None and not all(s.inbox for s in studies.values()):
        raise ConfigError("key 'inbox' is required unless every study has its own 'inbox'", source)

    cfg = Config(inbox=inbox, state=state, settle_seconds=settle, studies=studies, source=source,
                 notify=notify, polling=polling, rescan_seconds=rescan, stale_hours=stale,
                 user=_name(doc, "user", "user", source), group=_name(doc, "group", "group", source))
    _check_overlaps(cfg)
    for s in studies.values():
        _check_same_filesystem(s, source)
    return cfg


_no_unknown = no_unknown_keys


def _number(body: dict, key: str, default: float, source: str, minimum: float = 0,
            full_key: str | None = None) -> float:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not minimum <= v < math.inf:
        raise ConfigError(f"key '{full_key or key}' must be a number >= {minimum:g}, not {v!r}", source)
    return float(v)


def _bool(body: dict, key: str, default: bool, full_key: str, source: str) -> bool:
    v = body.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"key '{full_key}' must be true or false, not {v!r}", source)
    return v


def _choice(body: dict, key: str, choices: tuple[str, ...], full_key: str, source: str) -> str:
    v = body.get(key, choices[0])
    if v is False:      # YAML reads a bare `no`/`off` as false
        v = "none"
    if v not in choices:
        raise ConfigError(f"key '{full_key}' must be one of {', '.join(choices)}, not {v!r}", source)
    return v


def _name(body: dict, key: str, full_key: str, source: str) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)) or str(v) == "":
        raise ConfigError(f"key '{full_key}' must be a user or group name (or number), not {v!r}", source)
    return str(v)


def _addresses(body: dict, key: str, full_key: str, source: str) -> tuple[str, ...]:
    v = body.get(key)
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(a, str) and _ADDRESS_RE.match(a) for a in v):
        raise ConfigError(f"key '{full_key}' must be a list of email addresses, not {v!r}", source)
    return tuple(v)


_ADDRESS_RE = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+$")


def _notify(body: object, source: str) -> NotifyConfig:
    if body is None:
        return NotifyConfig()
    if not isinstance(body, dict):
        raise ConfigError("key 'notify' must be a mapping (smtp_host, smtp_port, sender, admin, ...)", source)
    _no_unknown(body, _NOTIFY_KEYS, "notify.", source)
    host = body.get("smtp_host", "localhost")
    if not isinstance(host, str) or not host:
        raise ConfigError(f"key 'notify.smtp_host' must be a host name, not {host!r}", source)
    port = body.get("smtp_port", 25)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ConfigError(f"key 'notify.smtp_port' must be a port number, not {port!r}", source)
    if "sender" not in body:
        raise ConfigError("key 'notify.sender' is required: the address mails come from", source)
    sender = _addresses(body, "sender", "notify.sender", source)
    if len(sender) != 1:
        raise ConfigError("key 'notify.sender' must be one email address", source)
    warn = body.get("disk_warn_percent", list(DEFAULT_DISK_WARN))
    if isinstance(warn, int) and not isinstance(warn, bool):
        warn = [warn]
    if (not isinstance(warn, list) or not all(isinstance(w, int) and not isinstance(w, bool)
                                              and 0 < w <= 100 for w in warn)):
        raise ConfigError(f"key 'notify.disk_warn_percent' must be a list of percentages (1-100), "
                          f"not {warn!r}", source)
    creds = (_abs_path(body, "credentials_file", "notify.credentials_file", source)
             if body.get("credentials_file") is not None else None)
    hour = body.get("digest_hour", 7)
    if isinstance(hour, bool) or not isinstance(hour, int) or not 0 <= hour <= 23:
        raise ConfigError(f"key 'notify.digest_hour' must be an hour 0-23, not {hour!r}", source)
    return NotifyConfig(
        smtp_host=host, smtp_port=port, sender=sender[0],
        admin=_addresses(body, "admin", "notify.admin", source),
        disk_warn_percent=tuple(sorted(set(warn))),
        starttls=_bool(body, "starttls", False, "notify.starttls", source),
        credentials_file=creds,
        retry_seconds=_number(body, "retry_seconds", 300.0, source, minimum=1, full_key="notify.retry_seconds"),
        digest_hour=hour,
        timeout_seconds=_number(body, "timeout_seconds", 30.0, source, minimum=1,
                                full_key="notify.timeout_seconds"),
    )


REPLICA_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
# S3's bucket naming rules (3-63 characters of lowercase letters, digits, '.'
# and '-', starting and ending with a letter or digit).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


def _replicas(body: object, key: str, source: str) -> tuple[ReplicaConfig, ...]:
    if body is None:
        return ()
    if not isinstance(body, dict):
        raise ConfigError(f"key '{key}' must map replica names to their settings (url, ...)", source)
    out = []
    for name, r in body.items():
        rkey = f"{key}.{name}"
        if not isinstance(name, str) or not REPLICA_NAME_RE.match(name):
            raise ConfigError(f"replica name {name!r} in '{key}' must be letters, digits, '_', '.' or '-' "
                              "(at most 63)", source)
        if not isinstance(r, dict):
            raise ConfigError(f"key '{rkey}' must be a mapping with at least 'url'", source)
        _no_unknown(r, _REPLICA_KEYS, rkey + ".", source)
        if "url" not in r:
            raise ConfigError(f"key '{rkey}.url' is required (s3://BUCKET/PREFIX or file:///PATH)", source)
        url = _replica_url(r["url"], f"{rkey}.url", source)
        if url.startswith("file:"):
            for k in _S3_ONLY_KEYS:
                if r.get(k) is not None:
                    raise ConfigError(f"key '{rkey}.{k}' applies to s3:// replicas only, not to {url}",
                                      source)
        endpoint = r.get("endpoint")
        if endpoint is not None and (not isinstance(endpoint, str)
                                     or not re.match(r"^https?://[^/\s]+/?\Z", endpoint)):
            raise ConfigError(f"key '{rkey}.endpoint' must be an http(s)://host[:port] URL, not {endpoint!r}",
                              source)
        days = r.get("retention_days")
        if days is not None and (isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500):
            raise ConfigError(f"key '{rkey}.retention_days' must be a whole number of days (1-36500), "
                              f"not {days!r}", source)
        mode = r.get("retention_mode", "compliance")
        if mode not in RETENTION_MODES:
            raise ConfigError(f"key '{rkey}.retention_mode' must be one of {', '.join(RETENTION_MODES)}, "
                              f"not {mode!r}", source)
        out.append(ReplicaConfig(
            name=name, url=url, endpoint=endpoint.rstrip("/") if endpoint else None,
            region=_plain(r, "region", f"{rkey}.region", source),
            profile=_plain(r, "profile", f"{rkey}.profile", source),
            retention_days=days, retention_mode=mode))
    return tuple(out)


def _plain(body: dict, key: str, full_key: str, source: str) -> str | None:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z", v):
        raise ConfigError(f"key '{full_key}' must be a name (letters, digits, '_', '.', '-'), not {v!r}", source)
    return v


def _replica_url(v: object, full_key: str, source: str) -> str:
    """s3://BUCKET[/PREFIX] or file:///ABS/PATH, normalised (no trailing '/')."""
    if not isinstance(v, str):
        raise ConfigError(f"key '{full_key}' must be s3://BUCKET/PREFIX or file:///PATH, not {v!r}", source)
    if v.startswith("s3://"):
        bucket, _, prefix = v[5:].partition("/")
        prefix = prefix.strip("/")
        parts = prefix.split("/") if prefix else []
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ConfigError(f"key '{full_key}': {bucket!r} is not a valid S3 bucket name (3-63 lowercase "
                              "letters, digits, '.' and '-')", source)
        if any(p in ("", ".", "..") for p in parts) or any(c in prefix for c in "\0\\?#"):
            raise ConfigError(f"key '{full_key}': the prefix {prefix!r} must be '/'-separated names "
                              "(no '.', '..' or empty parts)", source)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if v.startswith("file://"):
        path = v[7:]
        if path.startswith("localhost/"):
            path = path[9:]
        if not path.startswith("/") or "\0" in path or ".." in path.split("/"):
            raise ConfigError(f"key '{full_key}': a file replica is file:///absolute/path (no '..'), "
                              f"not {v!r}", source)
        return "file://" + (os.path.normpath(path) if path != "/" else "/")
    raise ConfigError(f"key '{full_key}' must be s3://BUCKET/PREFIX or file:///PATH, not {v!r}", source)


def _replica_place(url: str) -> tuple[str, str]:
    """(where, path) for overlap checks: ("s3:BUCKET", "/PREFIX") or ("file", "/PATH")."""
    if url.startswith("s3://"):
        bucket, _, prefix = url[5:].partition("/")
        return f"s3:{bucket}", "/" + prefix
    return "file", url[7:]


def _abs_path(body: dict, key: str, full_key: str, source: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"key '{full_key}' must be a path, not {value!r}", source)
    if not os.path.isabs(value):
        raise ConfigError(f"key '{full_key}' must be an absolute path, not {value!r}", source)
    return os.path.normpath(value)


def _named_dirs(cfg: Config) -> list[tuple[str, str]]:
    dirs = [("state", cfg.state)]
    if cfg.inbox:
        dirs.append(("inbox", cfg.inbox))
    for s in cfg.studies.values():
        dirs.append((f"studies.{s.name}.tree", s.tree))
        dirs.append((f"studies.{s.name}.store", s.store))
        if s.inbox:
            dirs.append((f"studies.{s.name}.inbox", s.inbox))
    return dirs


def _check_overlaps(cfg: Config) -> None:
    dirs = _named_dirs(cfg)
    for i, (ka, a) in enumerate(dirs):
        for kb, b in dirs[i + 1:]:
            if _nested(a, b):
                raise ConfigError(f"keys '{ka}' ({a}) and '{kb}' ({b}) overlap: "
                                  "each directory must stand apart from the others", cfg.source)
    # Two replicas in one place would mix two stores' keys (or one study's
    # twice); a file:// replica inside a store, tree or inbox would be
    # neither a second copy nor left alone.
    places = [(f"studies.{s.name}.replicas.{r.name}.url", r.url, *_replica_place(r.url))
              for s in cfg.studies.values() for r in s.replicas]
    for i, (ka, ua, wa, pa) in enumerate(places):
        for kb, ub, wb, pb in places[i + 1:]:
            if wa == wb and _nested(pa, pb):
                raise ConfigError(f"keys '{ka}' ({ua}) and '{kb}' ({ub}) overlap: each replica needs a "
                                  "place of its own", cfg.source)
        if wa == "file":
            for kd, d in dirs:
                if _nested(pa, d):
                    raise ConfigError(f"keys '{ka}' ({ua}) and '{kd}' ({d}) overlap: a replica must be "
                                      "outside every store, tree, inbox and the state directory", cfg.source)


def _nested(a: str, b: str) -> bool:
    """Is one of two '/'-paths the other or inside it?"""
    a, b = a.rstrip("/") + "/", b.rstrip("/") + "/"
    return a.startswith(b) or b.startswith(a)


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_same_filesystem(s: StudyConfig, source: str) -> None:
    # Tree files are hardlinks to objects, so both must live on one file system.
    try:
        dev_tree = os.stat(_existing_ancestor(s.tree)).st_dev
        dev_store = os.stat(_existing_ancestor(s.store)).st_dev
    except OSError:
        return
    if dev_tree != dev_store:
        raise ConfigError(f"keys 'studies.{s.name}.tree' ({s.tree}) and 'studies.{s.name}.store' "
                          f"({s.store}) are on different file systems; tree files are hardlinks to "
                          "store objects, so they must share one", source)
