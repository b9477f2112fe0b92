"""A replica in an S3 bucket (AWS, Ceph RGW, MinIO, StorageGRID, ...), on boto3.

The only module that imports boto3/botocore (tests/test_architecture.py):
``eidetic.replica.backend.open_backend`` imports it on first use of an
s3:// URL, so everything else works without the ``[s3]`` extra.

Every PUT carries ``x-amz-checksum-sha256``, computed here while the bytes
are read from the store (one pass: BLAKE3 and SHA-256 together), which the
server verifies before it keeps anything, and the object's BLAKE3 as
metadata ``blake3``.  An object larger than one part goes up as a multipart
upload with a SHA-256 per part (memory: one part); its BLAKE3 is checked
against its name before the upload is completed, so bytes damaged on the
local disk are never made into a (possibly locked, undeletable) replica
object: the upload is aborted and the error names ``eidetic fsck``.  With
``retention_days`` every PUT also sets Object Lock mode and retain-until.

Credentials come from boto3's standard lookup for the configured
``profile`` (~/.aws/credentials and ~/.aws/config of the service user, or
AWS_SHARED_CREDENTIALS_FILE / AWS_CONFIG_FILE); never from eidetic's
config.  Each botocore failure becomes a ReplicaError subclass with one
line saying what to do.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import threading
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import BinaryIO, Callable, Iterator

import boto3
import botocore.config
import botocore.exceptions

from ..core.errors import (ReplicaCorrupt, ReplicaError, ReplicaMissing, ReplicaNotLocked, ReplicaUnreachable)
from ..core.fsutil import open_regular_nofollow
from ..core.hashing import new_hasher
from .backend import Backend, RemoteInfo, ReplicaConfig, check_key

PART_SIZE = 8 << 20          # like the aws CLI's multipart_chunksize; memory per upload in flight
MAX_PARTS = 10_000           # S3's limit
READ_BLOCK = 256 << 10       # how the throttle and progress see a body being sent

_NOT_FOUND = ("404", "NoSuchKey", "NotFound")
_CREDENTIALS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidClientTokenId", "ExpiredToken",
                "InvalidToken", "AuthorizationHeaderMalformed", "TokenRefreshRequired")
_DENIED = ("AccessDenied", "403", "AllAccessDisabled", "AccountProblem")


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ("bucket", "a/b")."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


class _Body:
    """A request body over bytes in memory that reports the bytes read from
    it (to the throttle and the progress meter) as botocore sends it.  Each
    byte is reported once: over http botocore reads the whole body once to
    sign it (X-Amz-Content-SHA256) and seeks back before sending, and a
    retry seeks back too."""

    def __init__(self, data: memoryview, on_read: Callable[[int], None] | None) -> None:
        self._data = data
        self._pos = 0
        self._reported = 0
        self._on_read = on_read

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._data) - self._pos
        n = min(n, READ_BLOCK, len(self._data) - self._pos)
        chunk = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        if self._on_read is not None and self._pos > self._reported:
            self._on_read(self._pos - self._reported)
            self._reported = self._pos
        return chunk

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._data)}[whence]
        self._pos = max(0, min(len(self._data), base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def __len__(self) -> int:
        return len(self._data)


# What a dropped connection raises while a GET's body is read.
_BROKEN_OFF = tuple(c for c in (getattr(botocore.exceptions, name, None) for name in (
    "IncompleteReadError", "ResponseStreamingError", "ReadTimeoutError", "ConnectionClosedError",
    "EndpointConnectionError")) if c is not None) + (OSError,)


class _Download:
    """A GET's body whose read errors (a connection dropped mid-download,
    botocore's or urllib3's) become the backend's one-line ReplicaErrors,
    like every other call: never a traceback for a network that failed."""

    def __init__(self, body, backend: "S3Backend", key: str) -> None:
        self._body, self._backend, self._key = body, backend, key

    def read(self, n: int = -1) -> bytes:
        try:
            return self._body.read(n if n is not None and n >= 0 else None)
        except _BROKEN_OFF as e:
            raise self._broken(e) from None
        except Exception as e:  # noqa: BLE001 - urllib3's ProtocolError and kin: no botocore class
            if type(e).__module__.startswith(("urllib3", "http.client")):
                raise self._broken(e) from None
            raise

    def _broken(self, e: Exception) -> ReplicaUnreachable:
        return ReplicaUnreachable(f"the download of {self._key} broke off ({_short(e)}); run the command "
                                  "again when the network is back", self._backend.name)

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> "_Download":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class S3Backend(Backend):
    """Keys live under ``s3://BUCKET/PREFIX/``; see eidetic.replica.backend."""

    # Set by replicate(): called with each block of bytes as it is sent, so
    # --bwlimit and the progress bar follow the wire, not whole objects.
    on_send: Callable[[int], None] | None = None

    def __init__(self, cfg: ReplicaConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.url = cfg.url
        self.bucket, self.prefix = split_s3_url(cfg.url)
        self._local = threading.local()
        try:
            self._session = boto3.session.Session(profile_name=cfg.profile, region_name=cfg.region)
        except botocore.exceptions.ProfileNotFound:
            raise ReplicaUnreachable(
                f"no AWS profile {cfg.profile!r} in the service user's shared credentials "
                f"({_creds_files()}): add it (docs/admin.md, 'Replicating to S3')", self.name) from None
        # Path-style addressing for other endpoints (MinIO, Ceph RGW, moto): they
        # rarely have a DNS name per bucket; AWS itself picks what it needs.
        self._config = botocore.config.Config(
            s3={"addressing_style": "path"} if cfg.endpoint else {},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=15, read_timeout=120, max_pool_connections=32,
            # We always send our own SHA-256; no CRC added on top.
            request_checksum_calculation="when_required", response_checksum_validation="when_required")

    def fail_fast(self) -> None:
        """Short timeouts and no retries, for a quick look (``status``); call
        before the first request."""
        self._config = self._config.merge(botocore.config.Config(
            connect_timeout=3, read_timeout=10, retries={"max_attempts": 1, "mode": "standard"}))

    # ------------------------------------------------------------- plumbing

    @property
    def _s3(self):
        # One client per thread: botocore clients are thread-safe, but their
        # creation is not, and replicate() sends from a few threads.
        c = getattr(self._local, "client", None)
        if c is None:
            with _CLIENT_LOCK:
                c = self._session.client("s3", endpoint_url=self.cfg.endpoint, config=self._config)
            self._local.client = c
        return c

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _where(self) -> str:
        return f"bucket {self.bucket}" + (f" at {self.cfg.endpoint}" if self.cfg.endpoint else "")

    @contextmanager
    def _call(self, doing: str) -> Iterator[None]:
        try:
            yield
        except ReplicaError:
            raise
        except botocore.exceptions.NoCredentialsError:
            raise ReplicaUnreachable(f"no credentials for {self._who()} ({_creds_files()}): add an access "
                                     "key for the service user (docs/admin.md)", self.name) from None
        except botocore.exceptions.PartialCredentialsError as e:
            raise ReplicaUnreachable(f"incomplete credentials for {self._who()}: {e}", self.name) from None
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as e:
            raise ReplicaUnreachable(f"cannot reach {self.cfg.endpoint or 'the S3 endpoint'} while {doing} "
                                     f"({_short(e)}): check the network and the replica's endpoint",
                                     self.name) from None
        except (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectionClosedError) as e:
            raise ReplicaUnreachable(f"the connection to {self.cfg.endpoint or 'S3'} failed while {doing} "
                                     f"({_short(e)}); it is tried again next time", self.name) from None
        except botocore.exceptions.ClientError as e:
            raise self._client_error(e, doing) from None
        except botocore.exceptions.BotoCoreError as e:
            raise ReplicaError(f"{doing}: {_short(e)}", self.name) from None

    def _who(self) -> str:
        return f"profile {self.cfg.profile!r}" if self.cfg.profile else "the default profile"

    def _client_error(self, e: "botocore.exceptions.ClientError", doing: str) -> ReplicaError:
        err = e.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = err.get("Message") or code
        if code == "NoSuchBucket":
            return ReplicaUnreachable(f"{self._where()} does not exist: create it (with Object Lock, "
                                      "docs/admin.md) or correct the replica's url", self.name)
        if code in _CREDENTIALS:
            return ReplicaUnreachable(f"the credentials of {self._who()} are refused by {self._where()} "
                                      f"({code}): check the access key in {_creds_files()}", self.name)
        if code in _DENIED:
            return ReplicaUnreachable(f"access denied to {self._where()} while {doing}: the key of "
                                      f"{self._who()} needs s3:GetObject, PutObject, ListBucket and "
                                      "GetBucketObjectLockConfiguration on it", self.name)
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest") or "checksum" in code.lower():
            return ReplicaCorrupt(f"the server refused the bytes sent while {doing}: they did not match "
                                  f"their checksum ({code}); it is tried again next time", self.name)
        return ReplicaError(f"{doing}: {code}: {msg}", self.name)

    def _lock_args(self) -> dict:
        if not self.cfg.retention_days:
            return {}
        until = datetime.now(timezone.utc) + timedelta(days=self.cfg.retention_days)
        return {"ObjectLockMode": self.cfg.retention_mode.upper(), "ObjectLockRetainUntilDate": until}

    # ------------------------------------------------------------- reading

    def list(self, under: str) -> Iterator[RemoteInfo]:
        base = self._key(under.rstrip("/") + "/x")[:-1]   # "<prefix>/objects/"
        cut = len(self.prefix) + 1 if self.prefix else 0
        pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base)
        it = iter(pages)
        while True:
            with self._call(f"listing {under}"):
                page = next(it, None)
            if page is None:
                return
            for o in page.get("Contents", ()):
                yield RemoteInfo(o["Key"][cut:], o["Size"], None, None, None, None)

    def head(self, key: str) -> RemoteInfo | None:
        with self._call(f"reading {key}"):
            try:
                r = self._s3.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
            except botocore.exceptions.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                    return None
                raise
        until = r.get("ObjectLockRetainUntilDate")
        return RemoteInfo(key, r["ContentLength"], (r.get("Metadata") or {}).get("blake3"),
                          r.get("ChecksumSHA256"), until.astimezone(timezone.utc) if until else None,
                          r.get("ObjectLockMode"))

    def open_read(self, key: str) -> BinaryIO:
        with self._call(f"reading {key}"):
            try:
                r = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
            except botocore.exceptions.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND:
                    raise ReplicaMissing(f"{key} is not on the replica", self.name) from None
                raise
        return _Download(r["Body"], self, key)

    # ------------------------------------------------------------- writing

    def put_bytes(self, key: str, data: bytes, blake3: str | None) -> None:
        self._put_whole(key, memoryview(data), blake3, hashlib.sha256(data).digest())

    def _put_whole(self, key: str, data: memoryview, blake3: str | None, sha256: bytes) -> None:
        args = dict(Bucket=self.bucket, Key=self._key(key), Body=_Body(data, self.on_send),
                    ContentLength=len(data), ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=base64.b64encode(sha256).decode(), **self._lock_args())
        if blake3:
            args["Metadata"] = {"blake3": blake3}
        with self._call(f"writing {key}"):
            self._s3.put_object(**args)

    def put_file(self, key: str, fd_or_path: int | str | bytes, size: int, blake3: str) -> None:
        own = not isinstance(fd_or_path, int)
        fd = open_regular_nofollow(fd_or_path)[0] if own else fd_or_path   # type: ignore[arg-type]
        try:
            part = part_size(size)
            if size <= part:
                data = _read_exactly(fd, size, key, self.name)
                h = new_hasher()
                h.update(data)
                self._check_blake3(key, h.hexdigest(), blake3)
                self._put_whole(key, memoryview(data), blake3, hashlib.sha256(data).digest())
            else:
                self._put_multipart(key, fd, size, blake3, part)
        finally:
            if own:
                os.close(fd)

    def _check_blake3(self, key: str, got: str, want: str) -> None:
        if got != want:
            raise ReplicaCorrupt(f"the local bytes for {key} do not hash to its name (BLAKE3 {got}); "
                                 "nothing was sent: run 'eidetic fsck' on the study", self.name)

    def _put_multipart(self, key: str, fd: int, size: int, blake3: str, part: int) -> None:
        full = self._key(key)
        with self._call(f"starting the upload of {key}"):
            upload_id = self._s3.create_multipart_upload(
                Bucket=self.bucket, Key=full, ChecksumAlgorithm="SHA256", Metadata={"blake3": blake3},
                **self._lock_args())["UploadId"]
        done = False
        try:
            h = new_hasher()
            parts = []
            sent = 0
            number = 1
            while sent < size:
                data = _read_exactly(fd, min(part, size - sent), key, self.name)
                h.update(data)
                sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
                with self._call(f"writing part {number} of {key}"):
                    r = self._s3.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                                             Body=_Body(memoryview(data), self.on_send), ContentLength=len(data),
                                             ChecksumAlgorithm="SHA256", ChecksumSHA256=sha)
                parts.append({"PartNumber": number, "ETag": r["ETag"], "ChecksumSHA256": sha})
                sent += len(data)
                number += 1
                del data
            if os.read(fd, 1):
                raise ReplicaError(f"{key}: the local object is longer than {size} bytes (it changed?)", self.name)
            # Before completing: a completed object may be locked for years.
            self._check_blake3(key, h.hexdigest(), blake3)
            with self._call(f"completing the upload of {key}"):
                r = self._s3.complete_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                       MultipartUpload={"Parts": parts})
            done = True
        finally:
            if not done:
                self._abort(full, upload_id)
        if self.cfg.retention_days:
            self._ensure_retention(key, full, r.get("VersionId"))

    def _ensure_retention(self, key: str, full: str, version: str | None) -> None:
        """Some S3 implementations (moto, older MinIO) drop the lock given when
        a multipart upload starts: then it is set on the completed version."""
        args = {"VersionId": version} if version else {}
        with self._call(f"checking the retention of {key}"):
            if self._s3.head_object(Bucket=self.bucket, Key=full, **args).get("ObjectLockMode"):
                return
            lock = self._lock_args()
            self._s3.put_object_retention(Bucket=self.bucket, Key=full, **args, Retention={
                "Mode": lock["ObjectLockMode"], "RetainUntilDate": lock["ObjectLockRetainUntilDate"]})

    def _abort(self, full_key: str, upload_id: str) -> None:
        try:
            self._s3.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            pass    # best effort: abort_stale_uploads() (and a bucket lifecycle rule) cleans up later

    def abort_stale_uploads(self, older_than: timedelta = timedelta(hours=1)) -> int:
        """Abort multipart uploads under the prefix started more than
        *older_than* ago: what a killed replicate left (their parts cost
        storage but are no object).  Recent ones may be another run's."""
        cutoff = datetime.now(timezone.utc) - older_than
        n = 0
        with self._call("listing unfinished uploads"):
            pages = self._s3.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
            for page in pages:
                for u in page.get("Uploads", ()):
                    if u["Initiated"] < cutoff:
                        self._abort(u["Key"], u["UploadId"])
                        n += 1
        return n

    # --------------------------------------------------------------- ready

    def check_ready(self) -> None:
        with self._call(f"opening {self._where()}"):
            self._s3.list_objects_v2(Bucket=self.bucket, Prefix=self._key("eidetic-store"), MaxKeys=1)
        if not self.cfg.retention_days:
            return
        lock = None
        with self._call(f"reading the Object Lock configuration of {self._where()}"):
            try:
                lock = self._s3.get_object_lock_configuration(Bucket=self.bucket)
            except botocore.exceptions.ClientError as e:
                if str(e.response.get("Error", {}).get("Code")) not in (
                        "ObjectLockConfigurationNotFoundError", "ObjectLockConfigurationNotFound",
                        "InvalidRequest", "404"):
                    raise
        if (lock or {}).get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") != "Enabled":
            raise ReplicaNotLocked(
                f"{self._where()} does not have Object Lock enabled, but retention_days is set: "
                "nothing was written. Use a bucket created with Object Lock (aws s3api create-bucket "
                "--object-lock-enabled-for-bucket, docs/admin.md) or remove retention_days", self.name)

    def close(self) -> None:
        c = getattr(self._local, "client", None)
        if c is not None:
            c.close()
            self._local.client = None


_CLIENT_LOCK = threading.Lock()


def part_size(size: int) -> int:
    """PART_SIZE, or larger (whole MiB) so that *size* fits in S3's 10,000 parts."""
    need = math.ceil(size / MAX_PARTS)
    return max(PART_SIZE, math.ceil(need / (1 << 20)) << 20)


def _read_exactly(fd: int, n: int, key: str, replica: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            raise ReplicaError(f"{key}: the local object is shorter than expected (it changed?)", replica)
        got += k
    return buf   # type: ignore[return-value]


def _short(e: Exception) -> str:
    return str(e).splitlines()[0][:200]


def _creds_files() -> str:
    return (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials") + ", " + \
        (os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
