"""Tests for xraytwisted.outbound.http_client: the X-Ray client through a real proxy, and its TLS.

The proxy is a real ``proxy.py`` process (``tests.support.http_proxy``); the
X-Ray endpoint is a twisted.web server with ``trustme`` certificates
(``tests.support.tls``) for ``xray.example.invalid``, a name only the proxy
can "resolve" (to 127.0.0.1) - so a request that reaches it by that name went
through the proxy.  Direct requests use https://127.0.0.1 (also in the
certificate).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import warnings
from typing import Any

import trustme
from twisted.internet import error
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from tests.support.http_proxy import start_proxy
from tests.support.sigcheck import verify
from tests.support.tempdirs import temp_path
from tests.support.tls import (
    FAKE_HOST,
    LOCALHOST,
    ConnectionTracker,
    FakeXRay,
    new_ca,
    start_fake_xray,
    write_ca,
    zero_serial_ca_pem,
)
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.observe.logs import StartupWarning
from xraytwisted.outbound.connect_tunnel import ProxyConnectError
from xraytwisted.outbound.http_client import (
    IDLE_CONNECTION_SECONDS,
    TLSError,
    explain_tls_failure,
    load_ca_bundle,
    make_client,
    make_http,
    make_pool,
    outbound_info,
    outbound_warnings,
)
from xraytwisted.outbound.proxy_rules import (
    ProxyConfigError,
    ProxyRules,
    ProxySpec,
    parse_proxy_url,
)
from xraytwisted.pipeline.uploader import Uploader, UploadError, classify_exception
from xraytwisted.settings.table import Settings

BODY = b'{"TraceSegmentDocuments":["{\\"id\\":\\"1\\"}"]}'
PROXY_USER, PROXY_PASSWORD = "xray", "p@ss:word"
# As proxy.py wants it for --basic-auth, and percent-encoded for a URL.
PROXY_BASIC_AUTH = f"{PROXY_USER}:{PROXY_PASSWORD}"
PROXY_USERINFO = "xray:p%40ss%3Aword"


def reactor() -> Any:
    from twisted.internet import reactor as r

    return r


class ClientTestCase(TestCase):
    """Helpers: a temp dir for PEM files, clients with their own pools, requests."""

    timeout = 30

    def setUp(self) -> None:
        self.dir = temp_path(self)
        os.makedirs(self.dir)

    def ca_file(self, *cas: trustme.CA, name: str = "bundle.pem") -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            for ca in cas:
                f.write(ca.cert_pem.bytes())
        return path

    def pool(self, per_host: int = 2) -> HTTPConnectionPool:
        pool = make_pool(reactor(), per_host)
        # Closed before the servers and the proxy stop (cleanups run last-in first-out).
        self.addCleanup(pool.closeCachedConnections)
        return pool

    def client(self, **kwargs: Any) -> Any:
        # One pool per client: a pool keys connections by scheme, host and
        # port only, so two clients with other TLS settings must not share one.
        return make_client(reactor(), self.pool(), **kwargs)

    async def post(self, client: Any, url: str, body: bytes = BODY) -> tuple[int, bytes]:
        response = await client.post(url, data=body, headers={"Content-Type": "application/json"})
        content: bytes = await response.content()
        return response.code, content

    async def post_fails(self, client: Any, url: str) -> Failure:
        try:
            response = await client.post(url, data=BODY)
            await response.content()
        except Exception:
            return Failure()
        self.fail(f"POST {url} succeeded; it should have failed")

    def assert_tls_failure(self, failure: Failure, netloc: str, why: str) -> UploadError:
        """The failure is a TLSError that says what is wrong, and the uploader classifies it."""
        failure.trap(TLSError)
        classified = classify_exception(failure)
        self.assertEqual(classified.error_class, "OtherCount")
        self.assertTrue(classified.retryable)
        self.assertEqual(classified.message, f"TLSError: {why.format(netloc=netloc)}")
        return classified


UNTRUSTED = (
    "the TLS certificate of {netloc} is not trusted (certificate verify failed); if a private "
    "CA or a TLS-inspecting proxy signs it, add that CA with AWS_CA_BUNDLE"
)
WRONG_HOST = (
    "the TLS certificate of {netloc} is not valid for that host name; check the endpoint URL"
)


class ThroughProxyTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ca = new_ca()
        self.bundle = write_ca(self.ca, self.dir)
        self.server = start_fake_xray(self, self.ca)
        self.proxy = start_proxy(self)
        self.spec = parse_proxy_url(self.proxy.url)

    async def test_https_goes_through_a_connect_tunnel(self) -> None:
        client = self.client(proxy=self.spec, ca_bundle=self.bundle)
        code, body = await self.post(client, self.server.url() + "/TraceSegments")
        self.assertEqual((code, body), (200, b"{}"))
        self.assertEqual(self.proxy.connects(), [f"{FAKE_HOST}:{self.server.port}"])
        self.assertEqual([s.method for s in self.proxy.seen()], ["CONNECT"])
        [seen] = self.server.requests
        self.assertEqual((seen.method, seen.uri, seen.body), ("POST", "/TraceSegments", BODY))
        self.assertEqual(seen.host, f"{FAKE_HOST}:{self.server.port}")
        self.assertNotIn("proxy-authorization", seen.headers)

    async def test_the_tunnel_is_pooled(self) -> None:
        client = self.client(proxy=self.spec, ca_bundle=self.bundle)
        for _ in range(3):
            code, _ = await self.post(client, self.server.url() + "/TraceSegments")
            self.assertEqual(code, 200)
        self.assertEqual(len(self.server.requests), 3)
        self.assertEqual(len(self.proxy.connects()), 1)

    async def test_untrusted_certificate_fails_cleanly(self) -> None:
        client = self.client(proxy=self.spec)  # the test CA is not in the system store
        failure = await self.post_fails(client, self.server.url() + "/TraceSegments")
        self.assert_tls_failure(failure, f"{FAKE_HOST}:{self.server.port}", UNTRUSTED)
        self.assertEqual(self.proxy.connects(), [f"{FAKE_HOST}:{self.server.port}"])
        self.assertEqual(self.server.requests, [])

    async def test_certificate_for_another_host_fails(self) -> None:
        other = start_fake_xray(self, self.ca, hostnames=("other.example.invalid",))
        client = self.client(proxy=self.spec, ca_bundle=self.bundle)
        failure = await self.post_fails(client, other.url() + "/TraceSegments")
        self.assert_tls_failure(failure, f"{FAKE_HOST}:{other.port}", WRONG_HOST)
        self.assertEqual(other.requests, [])

    async def test_no_verify_accepts_any_certificate(self) -> None:
        other = start_fake_xray(self, new_ca(), hostnames=("other.example.invalid",))
        client = self.client(proxy=self.spec, verify=False)
        for server in (self.server, other):
            code, _ = await self.post(client, server.url() + "/TraceSegments")
            self.assertEqual(code, 200)
            self.assertEqual(len(server.requests), 1)
        self.assertEqual(len(self.proxy.connects()), 2)

    async def test_no_proxy_goes_direct(self) -> None:
        env = {"HTTPS_PROXY": self.proxy.url, "NO_PROXY": f"example.org,{LOCALHOST}"}
        client = self.client(proxy=ProxyRules.from_settings("", env), ca_bundle=self.bundle)
        code, _ = await self.post(client, self.server.url(LOCALHOST) + "/TraceSegments")
        self.assertEqual(code, 200)
        self.assertEqual(len(self.server.requests), 1)
        self.assertEqual(self.proxy.seen(), [])
        # The same rules without the NO_PROXY entry do use the proxy.
        env["NO_PROXY"] = "example.org"
        client = self.client(proxy=ProxyRules.from_settings("", env), ca_bundle=self.bundle)
        code, _ = await self.post(client, self.server.url(LOCALHOST) + "/TraceSegments")
        self.assertEqual(code, 200)
        self.assertEqual(self.proxy.connects(), [f"{LOCALHOST}:{self.server.port}"])

    async def test_plain_http_is_forwarded(self) -> None:
        server = start_fake_xray(self, None)
        client = self.client(proxy=self.spec)
        code, body = await self.post(client, server.url() + "/TraceSegments")
        self.assertEqual((code, body), (200, b"{}"))
        [seen] = self.proxy.seen()
        self.assertEqual((seen.method, seen.host, seen.port), ("POST", FAKE_HOST, server.port))
        [request] = server.requests
        self.assertEqual(
            (request.method, request.path, request.body), ("POST", "/TraceSegments", BODY)
        )
        self.assertEqual(request.host, f"{FAKE_HOST}:{server.port}")

    async def test_connections_are_not_logged(self) -> None:
        # Twisted logs "Starting factory ..." / "Stopping factory ..." for
        # every pooled connection unless its factory is quiet.
        plain = start_fake_xray(self, None)
        env = {"HTTPS_PROXY": self.proxy.url, "HTTP_PROXY": self.proxy.url, "NO_PROXY": LOCALHOST}
        pool = make_pool(reactor(), 2)
        client = make_client(
            reactor(), pool, proxy=ProxyRules.from_settings("", env), ca_bundle=self.bundle
        )
        tunnel, forwarded, direct = self.server.url(), plain.url(), plain.url(LOCALHOST)
        with capturedLogs() as events:
            for url in (tunnel, forwarded, direct):
                code, _ = await self.post(client, url + "/TraceSegments")
                self.assertEqual(code, 200, url)
            await pool.closeCachedConnections()
        self.assertEqual((len(self.proxy.connects()), len(self.proxy.seen())), (1, 2))
        self.assertEqual(len(plain.requests), 2)
        lines = [formatEvent(e) for e in events]
        self.assertEqual([line for line in lines if "factory" in line.lower()], [])


class ProxyFailureTests(ClientTestCase):
    """Proxies that are not there, not usable, or never answer."""

    def setUp(self) -> None:
        super().setUp()
        self.ca = new_ca()
        self.bundle = write_ca(self.ca, self.dir)
        self.server = start_fake_xray(self, self.ca)

    async def test_proxy_not_listening(self) -> None:
        with socket.socket() as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        client = self.client(proxy=ProxySpec("http", LOCALHOST, port), ca_bundle=self.bundle)
        failure = await self.post_fails(client, self.server.url() + "/TraceSegments")
        failure.trap(error.ConnectionRefusedError)
        self.assertEqual(classify_exception(failure).error_class, "ConnectionRefusedCount")

    async def test_bad_http_proxy_fails_the_request_not_the_caller(self) -> None:
        server = start_fake_xray(self, None)
        rules = ProxyRules.from_settings("", {"HTTP_PROXY": "socks5://127.0.0.1:1"})
        client = self.client(proxy=rules)
        failure = await self.post_fails(client, server.url(LOCALHOST) + "/TraceSegments")
        failure.trap(ProxyConfigError)
        self.assertIn("Bad proxy URL: socks5://127.0.0.1:1 (from HTTP_PROXY)", str(failure.value))

    async def test_uploader_timeout_cancels_a_hanging_connect(self) -> None:
        factory = SilentProxyFactory()
        port = await TCP4ServerEndpoint(reactor(), 0, interface=LOCALHOST).listen(factory)
        self.addCleanup(factory.tracker.abort_all)
        self.addCleanup(port.stopListening)
        settings = Settings(proxy_address=f"{LOCALHOST}:{port.getHost().port}")
        client: Any  # treq's client; uploader.HTTPClient is a narrower Protocol
        client, pool = make_http(reactor(), settings, {"AWS_CA_BUNDLE": self.bundle}, 2)
        self.addCleanup(pool.closeCachedConnections)
        uploader = Uploader(
            client=client,
            endpoint=endpoints.parse(self.server.url()),
            region="us-east-2",
            credentials=StaticCredentials(Credentials("AKID", "secret")),
            clock=reactor(),
            timeout=0.3,
        )
        self.addCleanup(uploader.close)
        outcome = await uploader.put_trace_segments([b'{"id":"1"}'])
        assert outcome.error is not None
        self.assertEqual(outcome.error.error_class, "TimeoutCount")
        self.assertEqual(factory.received[:8], b"CONNECT ")
        # The cancelled attempt closed its connection to the proxy.
        for _ in range(200):
            if not factory.tracker.open:
                break
            await deferLater(reactor(), 0.01, lambda: None)
        self.assertEqual(factory.tracker.open, set())


class SilentProxy(Protocol):
    """Accepts a connection, reads, and never answers."""

    factory: SilentProxyFactory

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.tracker.closed(self)


class SilentProxyFactory(Factory):
    protocol = SilentProxy  # type: ignore[assignment]
    noisy = False

    def __init__(self) -> None:
        self.received = b""
        self.tracker = ConnectionTracker()


class ProxyAuthTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ca = new_ca()
        self.bundle = write_ca(self.ca, self.dir)
        self.server = start_fake_xray(self, self.ca)
        self.proxy = start_proxy(self, basic_auth=PROXY_BASIC_AUTH)

    def proxy_url(self, userinfo: str) -> str:
        return f"http://{userinfo}@{LOCALHOST}:{self.proxy.port}"

    async def test_credentials_in_the_url_authenticate(self) -> None:
        spec = parse_proxy_url(self.proxy_url(PROXY_USERINFO))
        client = self.client(proxy=spec, ca_bundle=self.bundle)
        code, _ = await self.post(client, self.server.url() + "/TraceSegments")
        self.assertEqual(code, 200)
        [seen] = self.proxy.seen()
        self.assertEqual((seen.method, seen.proxy_authorization), ("CONNECT", True))

    async def test_wrong_or_missing_credentials_get_407(self) -> None:
        for url in (self.proxy_url("xray:wrong"), self.proxy.url):
            client = self.client(proxy=parse_proxy_url(url), ca_bundle=self.bundle)
            failure = await self.post_fails(client, self.server.url() + "/TraceSegments")
            failure.trap(ProxyConnectError)
            self.assertEqual(
                str(failure.value),
                f"proxy refused CONNECT to {FAKE_HOST}:{self.server.port}: "
                "HTTP/1.1 407 Proxy Authentication Required",
            )
            classified = classify_exception(failure)
            self.assertEqual(classified.error_class, "OtherCount")
            self.assertIn("407 Proxy Authentication Required", classified.message)
        self.assertEqual(self.proxy.seen(), [])
        self.assertEqual(self.server.requests, [])

    async def test_plain_http_sends_proxy_authorization(self) -> None:
        server = start_fake_xray(self, None)
        client = self.client(proxy=parse_proxy_url(self.proxy_url(PROXY_USERINFO)))
        code, _ = await self.post(client, server.url() + "/TraceSegments")
        self.assertEqual(code, 200)
        [seen] = self.proxy.seen()
        self.assertEqual((seen.method, seen.proxy_authorization), ("POST", True))
        # The proxy keeps its credentials to itself.
        self.assertNotIn("proxy-authorization", server.requests[0].headers)


class NotTLS(Protocol):
    """Answers anything with a plain-text HTTP error, as a non-TLS port would."""

    factory: NotTLSFactory

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.tracker.closed(self)


class NotTLSFactory(Factory):
    protocol = NotTLS  # type: ignore[assignment]
    noisy = False

    def __init__(self) -> None:
        self.tracker = ConnectionTracker()


class RawProxy(Protocol):
    """Captures the request head a client sends to its proxy and answers 200 ``{}``."""

    factory: RawProxyFactory

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        if sep and len(rest) >= length:
            self.factory.heads.append(head)
            self.buffer = rest[length:]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.tracker.closed(self)


class RawProxyFactory(Factory):
    protocol = RawProxy  # type: ignore[assignment]
    noisy = False

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.tracker = ConnectionTracker()


class AbsoluteFormTests(ClientTestCase):
    async def test_http_request_line_is_absolute_with_proxy_authorization(self) -> None:
        factory = RawProxyFactory()
        port = await TCP4ServerEndpoint(reactor(), 0, interface=LOCALHOST).listen(factory)
        self.addCleanup(factory.tracker.abort_all)
        self.addCleanup(port.stopListening)
        spec = parse_proxy_url(f"http://{PROXY_USERINFO}@{LOCALHOST}:{port.getHost().port}")
        client = self.client(proxy=spec)
        for _ in range(2):
            code, _ = await self.post(client, "http://xray.example.invalid:4566/TraceSegments")
            self.assertEqual(code, 200)
        self.assertEqual(len(factory.heads), 2)
        lines = factory.heads[0].split(b"\r\n")
        self.assertEqual(lines[0], b"POST http://xray.example.invalid:4566/TraceSegments HTTP/1.1")
        expected = base64.b64encode(PROXY_BASIC_AUTH.encode()).decode()
        self.assertIn(f"Proxy-Authorization: Basic {expected}".encode(), lines)
        self.assertIn(b"Host: xray.example.invalid:4566", lines)
        # Both requests went over one pooled connection to the proxy.
        self.assertEqual(len(factory.tracker.open), 1)


class TrustStoreTests(ClientTestCase):
    """The system store and AWS_CA_BUNDLE are both trusted.

    The "system store" here is OpenSSL's default verify paths pointed at a
    test CA with ``SSL_CERT_FILE``/``SSL_CERT_DIR`` - the same mechanism that
    finds /etc/ssl/certs in production (platformTrust), so a request that
    verifies against it proves the system store is loaded.
    """

    def setUp(self) -> None:
        super().setUp()
        self.system_ca, self.bundle_ca, self.stranger_ca = new_ca(), new_ca(), new_ca()
        empty_dir = os.path.join(self.dir, "no-certs")
        os.makedirs(empty_dir)
        self.set_env("SSL_CERT_FILE", self.ca_file(self.system_ca, name="system.pem"))
        self.set_env("SSL_CERT_DIR", empty_dir)
        self.servers = {
            name: start_fake_xray(self, ca, hostnames=(LOCALHOST,))
            for name, ca in (
                ("system", self.system_ca),
                ("bundle", self.bundle_ca),
                ("stranger", self.stranger_ca),
            )
        }

    def set_env(self, name: str, value: str) -> None:
        # os.environ, not a patched dict: OpenSSL reads the C environment.
        old = os.environ.get(name)
        os.environ[name] = value

        def restore() -> None:
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old

        self.addCleanup(restore)

    async def outcomes(self, client: Any) -> dict[str, str]:
        results = {}
        for name, server in self.servers.items():
            try:
                code, _ = await self.post(client, server.url(LOCALHOST) + "/TraceSegments")
                results[name] = str(code)
            except Exception:
                results[name] = classify_exception(Failure()).message
        return results

    async def test_system_store_by_default(self) -> None:
        results = await self.outcomes(self.client())
        self.assertEqual(results["system"], "200")
        self.assertIn("certificate verify failed", results["bundle"])
        self.assertIn("certificate verify failed", results["stranger"])

    async def test_bundle_adds_to_the_system_store(self) -> None:
        results = await self.outcomes(self.client(ca_bundle=self.ca_file(self.bundle_ca)))
        self.assertEqual((results["system"], results["bundle"]), ("200", "200"))
        self.assertIn("certificate verify failed", results["stranger"])

    async def test_bundle_with_several_certificates(self) -> None:
        bundle = self.ca_file(self.bundle_ca, self.stranger_ca)
        results = await self.outcomes(self.client(ca_bundle=bundle))
        self.assertEqual(results, {"system": "200", "bundle": "200", "stranger": "200"})

    async def test_no_verify(self) -> None:
        results = await self.outcomes(self.client(verify=False))
        self.assertEqual(results, {"system": "200", "bundle": "200", "stranger": "200"})


class LoadCABundleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = temp_path(self)
        os.makedirs(self.dir)

    def write(self, data: bytes) -> str:
        path = os.path.join(self.dir, "bundle.pem")
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_several_certificates_and_comments(self) -> None:
        a, b = new_ca(), new_ca()
        path = self.write(b"# corporate CAs\n" + a.cert_pem.bytes() + b"\n" + b.cert_pem.bytes())
        certs = load_ca_bundle(path)
        self.assertEqual(len(certs), 2)

    def test_zero_serial_numbers_are_one_warning_with_advice(self) -> None:
        path = self.write(new_ca().cert_pem.bytes() + zero_serial_ca_pem() * 2)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            certs = load_ca_bundle(path)
        self.assertEqual(len(certs), 3)
        self.assertEqual([w.category for w in caught], [StartupWarning])
        self.assertEqual(
            str(caught[0].message),
            f"AWS_CA_BUNDLE={path} holds 2 CA certificates with a serial number of zero or "
            "less, which RFC 5280 forbids (e.g. CN=Serial Zero Test CA): they are trusted, but "
            "a future release of the cryptography library will refuse them. AWS_CA_BUNDLE "
            "needs only the CAs the system store lacks (e.g. a TLS-inspecting proxy's): point "
            "it at a file with just those",
        )

    def test_unusable_files(self) -> None:
        cases = {
            os.path.join(self.dir, "missing.pem"): "No such file or directory",
            self.dir: "Is a directory",
            self.write(b""): "contains no PEM certificate",
            self.write(b"not a certificate"): "contains no PEM certificate",
        }
        # Broken base64 inside the markers.
        broken = b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
        path = os.path.join(self.dir, "broken.pem")
        with open(path, "wb") as f:
            f.write(broken)
        cases[path] = "it is not valid PEM"
        for path, why in cases.items():
            with self.assertRaises(ProxyConfigError, msg=path) as raised:
                load_ca_bundle(path)
            message = str(raised.exception)
            self.assertTrue(message.startswith(f"Cannot use the CA bundle AWS_CA_BUNDLE={path}: "))
            self.assertIn(why, message)
            self.assertIn("point it at a readable PEM file", message)


class MakeHttpTests(ClientTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.ca = new_ca()
        self.bundle = write_ca(self.ca, self.dir)
        self.server = start_fake_xray(self, self.ca)

    def make(self, settings: Settings, env: dict[str, str], per_host: int = 3) -> Any:
        client, pool = make_http(reactor(), settings, env, per_host)
        self.addCleanup(pool.closeCachedConnections)
        self.assertEqual(pool.maxPersistentPerHost, per_host)
        self.assertEqual(pool.cachedConnectionTimeout, IDLE_CONNECTION_SECONDS)
        self.assertFalse(pool.retryAutomatically)
        return client

    async def test_proxy_address_and_ca_bundle(self) -> None:
        proxy = start_proxy(self)
        settings = Settings(proxy_address=proxy.url)
        client = self.make(settings, {"AWS_CA_BUNDLE": self.bundle, "HTTPS_PROXY": "http://x:1"})
        code, _ = await self.post(client, self.server.url() + "/TraceSegments")
        self.assertEqual(code, 200)
        self.assertEqual(proxy.connects(), [f"{FAKE_HOST}:{self.server.port}"])

    async def test_https_proxy_from_environment_and_no_proxy(self) -> None:
        proxy = start_proxy(self)
        env = {"https_proxy": proxy.url, "AWS_CA_BUNDLE": self.bundle, "no_proxy": LOCALHOST}
        client = self.make(Settings(), env)
        for host in (FAKE_HOST, LOCALHOST):
            code, _ = await self.post(client, self.server.url(host) + "/TraceSegments")
            self.assertEqual(code, 200)
        self.assertEqual(proxy.connects(), [f"{FAKE_HOST}:{self.server.port}"])
        self.assertEqual(len(self.server.requests), 2)

    async def test_no_verify_ssl(self) -> None:
        client = self.make(Settings(no_verify_ssl=True), {})
        code, _ = await self.post(client, self.server.url(LOCALHOST) + "/TraceSegments")
        self.assertEqual(code, 200)
        client = self.make(Settings(), {})
        failure = await self.post_fails(client, self.server.url(LOCALHOST) + "/TraceSegments")
        self.assert_tls_failure(failure, f"{LOCALHOST}:{self.server.port}", UNTRUSTED)

    async def test_https_to_a_server_that_does_not_speak_tls(self) -> None:
        factory = NotTLSFactory()
        port = await TCP4ServerEndpoint(reactor(), 0, interface=LOCALHOST).listen(factory)
        self.addCleanup(factory.tracker.abort_all)
        self.addCleanup(port.stopListening)
        netloc = f"{LOCALHOST}:{port.getHost().port}"
        client = self.make(Settings(), {})
        failure = await self.post_fails(client, f"https://{netloc}/TraceSegments")
        failure.trap(TLSError)
        message = str(failure.value)
        self.assertTrue(message.startswith(f"TLS handshake with {netloc} failed: "), message)
        self.assertNotIn("[(", message)  # OpenSSL's error list is put in words

    def test_other_failures_are_left_alone(self) -> None:
        failure = Failure(error.ConnectionRefusedError())
        self.assertIs(explain_tls_failure(failure, "h:1"), failure)

    def test_startup_errors(self) -> None:
        cases = [
            (Settings(proxy_address="https://proxy:3128"), {}, "Bad proxy URL: https://proxy:3128"),
            (Settings(), {"HTTPS_PROXY": "http://u:pw@proxy:x"}, "Bad proxy URL: http://u:***@"),
            (Settings(), {"AWS_CA_BUNDLE": "/nonexistent/ca.pem"}, "Cannot use the CA bundle"),
        ]
        for settings, env, message in cases:
            with self.assertRaises(ProxyConfigError) as raised:
                make_http(reactor(), settings, env, 2)
            self.assertIn(message, str(raised.exception))
        # A bad HTTP_PROXY does not stop the start (https endpoints never use it).
        client, _ = make_http(reactor(), Settings(), {"HTTP_PROXY": "socks5://p:1"}, 2)
        self.assertIsNotNone(client)

    def test_outbound_warnings(self) -> None:
        self.assertEqual(outbound_warnings(Settings(), {}), [])
        [warning] = outbound_warnings(Settings(no_verify_ssl=True), {})
        self.assertIn("NoVerifySSL is on", warning)
        warnings = outbound_warnings(
            Settings(), {"HTTP_PROXY": "https://u:pw@p:1", "HTTPS_PROXY": "p:2", "NO_PROXY": "[::1"}
        )
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("Bad proxy URL: https://u:***@p:1 (from HTTP_PROXY)", warnings[0])
        self.assertIn("http:// endpoints will fail", warnings[0])
        self.assertIn("NO_PROXY entries not understood, ignored: [::1", warnings[1])
        self.assertNotIn("pw", " ".join(warnings))

    def test_outbound_info(self) -> None:
        self.assertEqual(outbound_info(Settings(), {}), [])
        lines = outbound_info(
            Settings(proxy_address="http://u:secret@proxy:3128"),
            {"NO_PROXY": "localhost, .internal", "AWS_CA_BUNDLE": "/etc/corp.pem"},
        )
        self.assertEqual(
            lines,
            [
                "Using proxy http://u:***@proxy:3128 (from -p/ProxyAddress)",
                "Not using a proxy for NO_PROXY hosts: localhost, .internal",
                "Trusting the CA certificates in AWS_CA_BUNDLE=/etc/corp.pem too",
            ],
        )
        self.assertEqual(
            outbound_info(Settings(), {"HTTPS_PROXY": "proxy:3128"}),
            ["Using proxy http://proxy:3128 for https (from HTTPS_PROXY)"],
        )


class UploaderThroughProxyTests(ClientTestCase):
    """The real uploader, signing and posting through proxy.py to the HTTPS fake."""

    KEY, SECRET = "AKIDPROXYTEST", "proxy/test+secret"

    def setUp(self) -> None:
        super().setUp()
        self.ca = new_ca()
        self.server = start_fake_xray(self, self.ca)
        self.proxy = start_proxy(self, basic_auth=PROXY_BASIC_AUTH)

    def uploader(self, server: FakeXRay, env: dict[str, str]) -> Uploader:
        settings = Settings(proxy_address=f"http://{PROXY_USERINFO}@{LOCALHOST}:{self.proxy.port}")
        client: Any  # treq's client; uploader.HTTPClient is a narrower Protocol
        client, pool = make_http(reactor(), settings, env, 2)
        self.addCleanup(pool.closeCachedConnections)
        uploader = Uploader(
            client=client,
            endpoint=endpoints.parse(server.url()),
            region="us-east-2",
            credentials=StaticCredentials(Credentials(self.KEY, self.SECRET)),
            clock=reactor(),
            timeout=10.0,
        )
        self.addCleanup(uploader.close)
        return uploader

    async def test_upload_succeeds_through_the_proxy(self) -> None:
        env = {"AWS_CA_BUNDLE": write_ca(self.ca, self.dir)}
        doc = json.dumps({"id": "70de5b6f19ff9a0a", "name": "proxied"}).encode()
        outcome = await self.uploader(self.server, env).put_trace_segments([doc])
        self.assertIsNone(outcome.error)
        self.assertEqual(outcome.unprocessed, ())
        self.assertEqual(self.proxy.connects(), [f"{FAKE_HOST}:{self.server.port}"])
        [seen] = self.server.requests
        self.assertEqual(json.loads(seen.body), {"TraceSegmentDocuments": [doc.decode()]})
        # The signature (which covers the Host header) survived the tunnel.
        verify(
            method="POST",
            url=f"https://{FAKE_HOST}:{self.server.port}/TraceSegments",
            headers=seen.headers,
            body=seen.body,
            access_key=self.KEY,
            secret_key=self.SECRET,
            region="us-east-2",
        )

    async def test_untrusted_endpoint_is_a_retryable_outcome(self) -> None:
        outcome = await self.uploader(self.server, {}).put_trace_segments([b'{"id":"1"}'])
        assert outcome.error is not None
        self.assertEqual(outcome.error.error_class, "OtherCount")
        self.assertTrue(outcome.error.retryable)
        netloc = f"{FAKE_HOST}:{self.server.port}"
        self.assertEqual(outcome.error.message, "TLSError: " + UNTRUSTED.format(netloc=netloc))
        self.assertEqual(self.server.requests, [])


class BodyProducerTests(SynchronousTestCase):
    def test_bytes_are_written_at_once(self) -> None:
        # treq's default (FileBodyProducer) writes from a cooperator timer, a
        # turn of the event loop after the headers.
        from twisted.internet.task import Clock

        from xraytwisted.outbound.http_client import BytesProducer, make_client

        client = make_client(Clock(), HTTPConnectionPool(Clock(), persistent=False))
        producer = client._data_to_body_producer(b"body")  # what treq does with data=
        self.assertIsInstance(producer, BytesProducer)
        self.assertEqual(producer.length, 4)
        written: list[bytes] = []

        class Consumer:
            def write(self, data: bytes) -> None:
                written.append(data)

        d = producer.startProducing(Consumer())
        self.assertEqual(written, [b"body"])
        self.assertIsNone(self.successResultOf(d))
