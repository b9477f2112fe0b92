"""A network that breaks mid-download: a real TCP relay between eidetic and
the moto S3 server that cuts a connection once it has carried a given
number of response bytes.  The download ends in one ReplicaUnreachable
(one line for the user, exit 3), never a botocore or urllib3 traceback.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
import yaml
from conftest import clean_env, run_cli
from replica_helpers import REPLICA, STUDY, close_envs, make_site

from eidetic.core.errors import ReplicaUnreachable
from eidetic.replica.backend import open_backend
from eidetic.server import config


class CuttingRelay:
    """127.0.0.1:port -> the S3 endpoint; a connection is closed (RST) once
    the server has sent it more than *cut_after* bytes.  cut_after None: a
    plain relay."""

    def __init__(self, target_port: int, cut_after: int | None) -> None:
        self.target_port, self.cut_after = target_port, cut_after
        self.cuts = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self.cut_after), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) > limit:
                    dst.sendall(data[: max(0, limit - sent)])
                    self.cuts += 1
                    for s in (src, dst):
                        # shutdown wakes the other direction's thread blocked in recv (a bare
                        # close would not, and the client would wait for its read timeout)
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def site(request, tmp_path):
    s = make_site(request, tmp_path, "s3")
    yield s
    close_envs(os.path.realpath(str(tmp_path)))


def _through(site, relay: CuttingRelay) -> None:
    """Point the config's replica at the relay."""
    doc = yaml.safe_load(site.config_path.read_text())
    doc["studies"][STUDY]["replicas"][REPLICA]["endpoint"] = relay.endpoint
    site.config_path.write_text(yaml.safe_dump(doc))


def test_a_download_cut_midway_is_one_replica_error_not_a_traceback(site):
    site.three_uploads()                               # big.dat: 3 MiB
    site.replicate()
    port = int(site.s3.endpoint.rsplit(":", 1)[1])
    relay = CuttingRelay(port, cut_after=512 << 10)
    try:
        _through(site, relay)
        backend = open_backend(config.load(str(site.config_path)).study(STUDY).replica(REPLICA))
        big = next(r.key for r in backend.list("objects/") if r.size == 3 << 20)
        with pytest.raises(ReplicaUnreachable) as e:
            with backend.open_read(big) as f:
                while f.read(1 << 16):
                    pass
        assert "broke off" in str(e.value) or "connection" in str(e.value)
        backend.close()
    finally:
        relay.close()
    assert relay.cuts >= 1


def test_a_restore_over_a_network_that_breaks_stops_in_one_line_and_the_same_command_finishes(site):
    site.three_uploads()
    site.replicate()
    before = site.snapshot()
    site.lose_everything()
    port = int(site.s3.endpoint.rsplit(":", 1)[1])
    relay = CuttingRelay(port, cut_after=512 << 10)
    try:
        _through(site, relay)
        res = run_cli("restore", "--from", REPLICA, "--study", STUDY, config=site.config_path, env=clean_env(),
                      timeout=60)
        assert res.returncode == 3, res.stdout + res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith(f"eidetic: replica {REPLICA}: the download of objects/"), res.stderr
        assert "run the command again when the network is back" in res.stderr
    finally:
        relay.close()
    fixed = CuttingRelay(port, cut_after=None)          # the network is back: as it says
    try:
        _through(site, fixed)
        res = run_cli("restore", "--from", REPLICA, "--study", STUDY, config=site.config_path, env=clean_env(),
                      timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    finally:
        fixed.close()
    assert site.snapshot() == before
