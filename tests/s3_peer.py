"""A real S3 HTTP endpoint on 127.0.0.1 for tests (moto's standalone server).

No S3 server that runs without a whole cluster ships in Debian or on the
package index (/work/shared/FACTS.md), so the tests talk HTTP to moto's
server, which implements buckets, versioning, additional checksums and
Object Lock.  The server runs in this process (``ThreadedMotoServer``); moto
keeps its state in module globals, so there is ONE server per test process
(``s3_peer`` fixture, ``shared_peer()``) and every test makes its own bucket (``new_bucket``).

Authentication is really enforced: at start-up the peer creates an IAM user
with an access key and an allow-all policy, then turns moto's request
authentication on, so a wrong secret is refused (SignatureDoesNotMatch) and
an unknown key too (InvalidAccessKeyId).  Clients find the key the way the
service does, through a shared-credentials file and a profile::

    def test_x(s3_peer, s3_creds):           # s3_creds sets AWS_SHARED_CREDENTIALS_FILE etc.
        bucket = s3_peer.new_bucket(object_lock=True)
        cfg = ReplicaConfig("offsite", f"s3://{bucket}/archive", endpoint=s3_peer.endpoint,
                            region=s3_peer.region, profile=s3_creds.profile, retention_days=1)
        s3 = s3_peer.client()                # a boto3 client with the good key, for checks

``s3_creds`` is function-scoped: ``write_credentials(dir, profile, secret=...)``
makes other files (e.g. a wrong secret) for a test that needs them.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import socket
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REGION = "us-east-1"
_ALLOW_ALL = json.dumps({"Version": "2012-10-17",
                         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Credentials:
    profile: str
    credentials_file: Path
    config_file: Path

    @property
    def env(self) -> dict[str, str]:
        """The variables that point boto3 (and the aws CLI) at these files."""
        return {"AWS_SHARED_CREDENTIALS_FILE": str(self.credentials_file),
                "AWS_CONFIG_FILE": str(self.config_file)}


class S3Peer:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.region = REGION
        self.access_key = ""
        self.secret_key = ""
        self._server = None
        self._names = itertools.count(1)
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------ life

    def start(self) -> "S3Peer":
        from moto.server import ThreadedMotoServer

        # werkzeug logs every request on stderr: noise in a failing test's output
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        # Three unauthenticated requests make the IAM user, its policy and its
        # key; from the fourth on, every request must be signed with that key.
        self._post("/moto-api/reset-auth", b"3")
        iam = self._client("iam", "bootstrap", "bootstrap")
        user = f"eidetic-{self.port}"     # moto's IAM state is process-wide: a name of our own
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=_ALLOW_ALL)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    def stop(self) -> None:
        if self._server is not None:
            # Leave moto's process-wide settings as found for anything else in the session.
            self._post("/moto-api/reset-auth", str(float("inf")).encode())
            self._server.stop()
            self._server = None

    def __enter__(self) -> "S3Peer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _post(self, path: str, data: bytes) -> None:
        # text/plain: a form content type would hide the body from moto (Flask parses it as a form)
        req = urllib.request.Request(self.endpoint + path, data=data, method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    # ------------------------------------------------------------ clients

    def _client(self, service: str, access_key: str, secret_key: str):
        import boto3
        from botocore.config import Config

        return boto3.session.Session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                                     region_name=self.region).client(
            service, endpoint_url=self.endpoint,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def client(self):
        """A boto3 S3 client with the good key (for the tests' own checks)."""
        return self._client("s3", self.access_key, self.secret_key)

    def new_bucket(self, object_lock: bool = True, versioning: bool = False) -> str:
        """A fresh bucket (Object Lock implies versioning, as on AWS)."""
        with self._lock:
            name = f"eidetic-test-{next(self._names)}"
        s3 = self.client()
        s3.create_bucket(Bucket=name, ObjectLockEnabledForBucket=object_lock)
        if versioning and not object_lock:
            s3.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
        return name

    def write_credentials(self, directory: Path, profile: str = "eidetic", *, access_key: str | None = None,
                          secret_key: str | None = None) -> Credentials:
        """A shared-credentials file and a config file with one profile."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        creds, conf = directory / "credentials", directory / "config"
        creds.write_text(f"[{profile}]\naws_access_key_id = {access_key or self.access_key}\n"
                         f"aws_secret_access_key = {secret_key or self.secret_key}\n")
        conf.write_text(f"[profile {profile}]\nregion = {self.region}\n")
        os.chmod(creds, 0o600)
        return Credentials(profile, creds, conf)


_AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION")


_shared: S3Peer | None = None


def shared_peer() -> S3Peer:
    """The one server of this process.  A test module that imports the
    fixtures gets its own copy of the session fixture, so the fixture must
    not start a server per copy: moto's state is process-wide (a second
    server would see the first one's buckets and IAM users)."""
    global _shared
    if _shared is None:
        _shared = S3Peer().start()
        atexit.register(_shared.stop)
    return _shared


@pytest.fixture(scope="session")
def s3_peer() -> S3Peer:
    return shared_peer()


@pytest.fixture
def s3_creds(s3_peer, tmp_path, monkeypatch) -> Credentials:
    """A good profile ``eidetic`` in files under tmp_path, found through the
    standard variables (set here, so subprocesses inherit them); any AWS
    variables of the surrounding environment are removed so they cannot win."""
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    c = s3_peer.write_credentials(tmp_path / "aws")
    for k, v in c.env.items():
        monkeypatch.setenv(k, v)
    return c
