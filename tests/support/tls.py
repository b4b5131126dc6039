"""Test CAs and a fake X-Ray endpoint over HTTPS (or plain HTTP) on 127.0.0.1.

* :func:`new_ca` / :func:`write_ca` - a throw-away ``trustme`` CA and its PEM file;
* :func:`start_fake_xray` - a twisted.web server on ``127.0.0.1:0`` with a
  certificate from that CA for :data:`FAKE_HOST`, ``127.0.0.1`` and
  ``localhost``; it answers ``POST /TraceSegments`` with ``{}`` and records
  every request.  It is stopped by ``addCleanup``, and its open connections
  are aborted then, so trial's reactor stays clean.

:data:`FAKE_HOST` is a name under ``.invalid`` (RFC 2606): it never resolves,
so a request that reaches it must have gone through a proxy that maps it to
127.0.0.1 (see ``tests.support.http_proxy``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trustme
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import CertificateOptions, PrivateCertificate
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

FAKE_HOST = "xray.example.invalid"
LOCALHOST = "127.0.0.1"


def new_ca() -> trustme.CA:
    return trustme.CA()


def write_ca(ca: trustme.CA, directory: str, name: str = "ca.pem") -> str:
    """Write the CA certificate as PEM into ``directory``; returns the path."""
    path = os.path.join(directory, name)
    ca.cert_pem.write_to_path(path)
    return path


def zero_serial_ca_pem() -> bytes:
    """A CA certificate whose serial number is 0, as some public roots have.

    cryptography's builder refuses such a serial, so a serial of 1 is
    changed in the DER (same length; the signature no longer matches, which
    loading a PEM bundle does not check).
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Serial Zero Test CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    version_and_serial = b"\xa0\x03\x02\x01\x02\x02\x01\x01"  # v3, INTEGER 1
    assert der.count(version_and_serial) == 1
    der = der.replace(version_and_serial, version_and_serial[:-1] + b"\x00")
    with warnings.catch_warnings():  # cryptography warns about exactly this serial
        warnings.simplefilter("ignore")
        return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def server_options(ca: trustme.CA, hostnames: Sequence[str]) -> CertificateOptions:
    """Server TLS options with a certificate from ``ca`` for ``hostnames``."""
    leaf = ca.issue_cert(*hostnames)
    certificate = PrivateCertificate.loadPEM(leaf.private_key_and_cert_chain_pem.bytes())
    options: CertificateOptions = certificate.options()
    return options


@dataclass
class SeenRequest:
    method: str
    uri: str  # as on the request line: origin form unless someone sent absolute form
    path: str
    host: str  # the Host header
    headers: dict[str, str]
    body: bytes


class FakeXRayResource(Resource):
    """``POST /TraceSegments`` -> 200 ``{}``; anything else 404.  Records everything."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[SeenRequest] = []

    def render(self, request: Request) -> bytes:
        headers = {
            k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        self.requests.append(
            SeenRequest(
                method=request.method.decode("ascii"),
                uri=request.uri.decode("latin-1"),
                path=request.path.decode("latin-1"),
                host=headers.get("host", ""),
                headers=headers,
                body=request.content.read() if request.content is not None else b"",
            )
        )
        request.setHeader(b"content-type", b"application/json")
        if request.method == b"POST" and request.path == b"/TraceSegments":
            return b"{}"
        request.setResponseCode(404)
        return b'{"message":"not found"}'


class ConnectionTracker:
    """Server-side connections still open, so cleanup can abort them and wait."""

    def __init__(self) -> None:
        self.open: set[Protocol] = set()
        self._waiting: list[Deferred[None]] = []

    def opened(self, protocol: Protocol) -> None:
        self.open.add(protocol)

    def closed(self, protocol: Protocol) -> None:
        self.open.discard(protocol)
        if not self.open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def abort_all(self) -> Deferred[None]:
        """Abort every open connection; fires once all of them are gone."""
        if not self.open:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        for protocol in list(self.open):
            transport: Any = protocol.transport
            transport.abortConnection()
        return d


class _Tracked(Protocol):
    """Wraps a server protocol (HTTPChannel) to tell the tracker about its connection."""

    def __init__(self, tracker: ConnectionTracker, wrapped: Any) -> None:
        self.tracker = tracker
        self.wrapped = wrapped

    def makeConnection(self, transport: Any) -> None:
        self.tracker.opened(self)
        super().makeConnection(transport)
        self.wrapped.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.wrapped.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self.wrapped.connectionLost(reason)
        finally:
            self.tracker.closed(self)


class TrackingSite(Site):
    def __init__(self, resource: Resource, tracker: ConnectionTracker) -> None:
        super().__init__(resource)
        self.tracker = tracker
        self.noisy = False

    def buildProtocol(self, addr: IAddress | None) -> Any:
        return _Tracked(self.tracker, super().buildProtocol(addr))


@dataclass
class FakeXRay:
    port: int
    tls: bool
    resource: FakeXRayResource
    listening: IListeningPort
    tracker: ConnectionTracker = field(default_factory=ConnectionTracker)

    @property
    def requests(self) -> list[SeenRequest]:
        return self.resource.requests

    def url(self, host: str = FAKE_HOST) -> str:
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def stop(self) -> Deferred[None]:
        d: Deferred[Any] = defer.maybeDeferred(self.listening.stopListening)
        d.addCallback(lambda _: self.tracker.abort_all())
        return d


def start_fake_xray(
    case: SynchronousTestCase,
    ca: trustme.CA | None,
    hostnames: Sequence[str] = (FAKE_HOST, LOCALHOST, "localhost"),
) -> FakeXRay:
    """A fake X-Ray on 127.0.0.1:0: HTTPS with a cert from ``ca``, plain HTTP if ``ca`` is None."""
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    resource = FakeXRayResource()
    tracker = ConnectionTracker()
    site = TrackingSite(resource, tracker)
    listening: IListeningPort
    if ca is None:
        listening = reactor.listenTCP(0, site, interface=LOCALHOST)
    else:
        listening = reactor.listenSSL(0, site, server_options(ca, hostnames), interface=LOCALHOST)
    server = FakeXRay(
        port=listening.getHost().port,  # type: ignore[attr-defined]
        tls=ca is not None,
        resource=resource,
        listening=listening,
        tracker=tracker,
    )
    case.addCleanup(server.stop)
    return server
