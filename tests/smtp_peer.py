"""A real SMTP server on 127.0.0.1 for tests (docs/design.md, "Test peers").

``SMTPServer(workdir, starttls=False, auth=None)`` picks a free port at
construction (aiosmtpd's ``Controller(port=0)`` fails) and keeps it across
``stop()``/``start()``, so a test can take the server down and bring it back
where a client expects it.  Every accepted mail is kept in ``received`` as a
:class:`Received` (envelope sender and recipients, raw bytes, whether TLS and
AUTH were in effect)::

    with SMTPServer(tmp_path) as smtp:
        ...                      # send to 127.0.0.1:smtp.port
        [m] = smtp.wait_for(1)
        assert m.rcpt_tos == ["pi@example.org"] and "FAILED" in m.subject

``starttls=True`` offers STARTTLS with a throwaway self-signed certificate for
``localhost`` and ``127.0.0.1`` (made with ``cryptography`` when installed,
else ``openssl req``); ``cert_file`` names it, so a client can trust it
(``SSL_CERT_FILE=<cert_file>`` makes ``ssl.create_default_context()`` do so).
``auth=("user", "password")`` requires AUTH (PLAIN/LOGIN), over TLS unless
``auth_require_tls=False``.  ``refuse={"x@example.org"}`` answers 550 to
those recipients (a permanent refusal).
"""

from __future__ import annotations

import email
import email.policy
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    login: str | None          # the AUTH user, None without AUTH

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.data, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def subject(self) -> str:
        return str(self.message["Subject"])

    @property
    def body(self) -> str:
        return self.message.get_content()


class _Handler:
    def __init__(self, server: "SMTPServer") -> None:
        self.server = server

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.lower() in self.server.refuse:
            return "550 5.1.1 no such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        login = None
        if session.authenticated and isinstance(session.auth_data, LoginPassword):
            login = session.auth_data.login.decode()
        rec = Received(envelope.mail_from, list(envelope.rcpt_tos), bytes(envelope.original_content
                       or envelope.content), tls=session.ssl is not None, login=login)
        with self.server._cond:
            self.server.received.append(rec)
            self.server._cond.notify_all()
        return "250 2.0.0 queued"


class SMTPServer:
    def __init__(self, workdir: Path | str | None = None, *, starttls: bool = False,
                 auth: tuple[str, str] | None = None, auth_require_tls: bool = True,
                 refuse: set[str] | frozenset[str] = frozenset()) -> None:
        self.dir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="smtp-peer-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.starttls = starttls
        self.auth = auth
        self.auth_require_tls = auth_require_tls
        self.refuse = {a.lower() for a in refuse}
        self.received: list[Received] = []
        self.auth_attempts: list[tuple[str, bool]] = []    # (login, accepted)
        self._cond = threading.Condition()
        self._controller: Controller | None = None
        self.cert_file: Path | None = None
        self.key_file: Path | None = None
        if starttls:
            self.cert_file, self.key_file = self.dir / "cert.pem", self.dir / "key.pem"
            make_self_signed(self.cert_file, self.key_file)

    # ------------------------------------------------------------ life

    def start(self) -> "SMTPServer":
        if self._controller is not None:
            return self
        kwargs: dict = {}
        if self.starttls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
            kwargs["tls_context"] = ctx
        if self.auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=self.auth_require_tls)
        # A fresh controller (and event loop) per start: a stopped one is not reusable.
        c = Controller(_Handler(self), hostname=self.host, port=self.port, **kwargs)
        deadline = time.monotonic() + 5
        while True:   # the port may linger for a moment after a stop
            try:
                c.start()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._controller = c
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def running(self) -> bool:
        return self._controller is not None

    def __enter__(self) -> "SMTPServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ mail

    def wait_for(self, n: int, timeout: float = 10.0) -> list[Received]:
        """Block until at least *n* mails arrived; returns all of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.received) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {n} mail(s) within {timeout} s, got {len(self.received)}")
                self._cond.wait(left)
            return list(self.received)

    def clear(self) -> None:
        with self._cond:
            self.received.clear()

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode(errors="replace")
        ok = self.auth is not None and (login, auth_data.password.decode(errors="replace")) == self.auth
        self.auth_attempts.append((login, ok))
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


def make_self_signed(cert_file: Path, key_file: Path) -> None:
    """A throwaway certificate for localhost and 127.0.0.1."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        _openssl_self_signed(cert_file, key_file)
        return
    import datetime
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _openssl_self_signed(cert_file: Path, key_file: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("neither the cryptography package nor the openssl command is available")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "30", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key_file), "-out", str(cert_file)],
                   check=True, capture_output=True, timeout=60)
