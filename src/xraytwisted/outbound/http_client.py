"""The outbound HTTP client for X-Ray: treq over a persistent connection pool.

``make_http(reactor, settings, env, per_host)`` builds it from the settings;
``make_client`` is the same from explicit parts.  Every request is routed by
``proxyconfig`` (``-p``/ProxyAddress, ``HTTPS_PROXY``/``HTTP_PROXY``,
``NO_PROXY``):

* no proxy: straight to the host (TLS for https);
* https through a proxy: a ``CONNECT`` tunnel (``connectproxy``), then TLS
  with the real host name inside it, so the proxy never sees the traffic
  and the certificate is checked against the X-Ray host, not the proxy;
* http through a proxy: absolute-form requests to the proxy
  (``POST http://host/path``) with ``Proxy-Authorization``.

All three share one ``HTTPConnectionPool``, so tunnels are kept and reused
like direct connections.

TLS: certificates and host names are verified against the system trust
store (Twisted's ``platformTrust``: OpenSSL's default paths, which honour
``SSL_CERT_FILE``/``SSL_CERT_DIR``).  ``AWS_CA_BUNDLE`` names a PEM file of
CA certificates *added* to that store (botocore uses it instead of the
store; adding keeps public AWS endpoints working next to e.g. a
TLS-inspecting corporate CA).  ``NoVerifySSL`` turns all checks off.

This client is only for X-Ray (uploads, telemetry, sampling): the user's
proxy must not be applied to instance metadata, ECS or STS calls, which
are made elsewhere.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import treq.client
from cryptography import x509
from cryptography.utils import CryptographyDeprecationWarning
from OpenSSL import SSL
from service_identity import VerificationError
from treq.cookies import IndexableCookieJar
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS, platformTrust
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HostnameCachingHTTPSPolicy,
    HTTPConnectionPool,
    ProxyAgent,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.http_headers import Headers
from twisted.web.iweb import (
    IAgent,
    IAgentEndpointFactory,
    IBodyProducer,
    IPolicyForHTTPS,
    IResponse,
)
from zope.interface import implementer

from xraytwisted.observe.logs import StartupWarning
from xraytwisted.outbound.connect_tunnel import HTTPConnectProxyEndpoint
from xraytwisted.outbound.proxy_rules import ProxyConfigError, ProxyRules, ProxySpec
from xraytwisted.outbound.twisted_private import system_trust_plus
from xraytwisted.settings.table import Settings

# Idle connections are dropped well before load balancers typically close
# them (60 s), so a request never lands on a connection the server is about
# to tear down (cf. the Go daemon's stuck-connection issue, PR #216).
IDLE_CONNECTION_SECONDS = 50
# Seconds to connect (TCP, and the CONNECT answer through a proxy).  The
# uploader's request timeout is usually shorter and cancels earlier.
CONNECT_TIMEOUT = 10.0
# A CA bundle is a few hundred KiB at most; this only stops AWS_CA_BUNDLE=/dev/zero.
MAX_CA_BUNDLE_BYTES = 16 * 1024 * 1024

ProxyChooser = Callable[[str], ProxySpec | None]


def make_pool(reactor: Any, per_host: int) -> HTTPConnectionPool:
    """The connection pool for ``make_client``'s agents (their endpoints keep it quiet)."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = per_host
    pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
    # POST is not idempotent, so Twisted would not retry it anyway; the
    # batcher decides about retries.
    pool.retryAutomatically = False
    return pool


# ---------------------------------------------------------------------------
# TLS


def load_ca_bundle(path: str, source: str = "AWS_CA_BUNDLE") -> tuple[x509.Certificate, ...]:
    """The CA certificates in the PEM file ``path``; ProxyConfigError if there are none."""

    def bad(why: str) -> ProxyConfigError:
        return ProxyConfigError(
            f"Cannot use the CA bundle {source}={path}: {why}; point it at a readable PEM "
            f"file of CA certificates, or unset it"
        )

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CA_BUNDLE_BYTES + 1)
    except OSError as e:
        raise bad(e.strerror or str(e)) from None
    if len(data) > MAX_CA_BUNDLE_BYTES:
        raise bad(f"it is larger than {MAX_CA_BUNDLE_BYTES // (1024 * 1024)} MiB")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise bad("it contains no PEM certificate (-----BEGIN CERTIFICATE-----)")
    with warnings.catch_warnings():
        # Said once below, with what to do, instead of once per certificate.
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        try:
            certificates = tuple(x509.load_pem_x509_certificates(data))
        except ValueError as e:
            raise bad(f"it is not valid PEM ({e})") from None
        odd = [c for c in certificates if c.serial_number <= 0]
        first = odd[0].subject.rfc4514_string() if odd else ""
    if odd:
        # The system bundle has several such roots: a bundle meant for a
        # proxy's CA only would not.
        warnings.warn(
            StartupWarning(
                f"{source}={path} holds {len(odd)} CA certificates with a serial number of "
                f"zero or less, which RFC 5280 forbids (e.g. {first}): they are trusted, but a "
                f"future release of the cryptography library will refuse them. {source} needs "
                "only the CAs the system store lacks (e.g. a TLS-inspecting proxy's): point it "
                "at a file with just those"
            ),
            stacklevel=2,
        )
    return certificates


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedTLS:
    """TLS that checks neither certificate nor host name (NoVerifySSL); still sends SNI."""

    def __init__(self, hostname: str) -> None:
        self._options = CertificateOptions(verify=False)
        is_name = not _is_ip_address(hostname)
        self._server_name = hostname.encode("idna") if is_name else None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IPolicyForHTTPS)
class TLSPolicy:
    """Verified TLS against the system store plus ``extra_cas``, or no checks at all."""

    def __init__(self, *, verify: bool = True, extra_cas: Sequence[x509.Certificate] = ()) -> None:
        self.verify = verify
        # Adding to the system store needs a private Twisted interface
        # (twisted_private says why); without extra CAs, the public one.
        self.trust = system_trust_plus(extra_cas) if extra_cas else platformTrust()

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii").strip("[]")
        if not self.verify:
            return UnverifiedTLS(host)
        return optionsForClientTLS(host, trustRoot=self.trust)


class TLSError(Exception):
    """TLS with the endpoint failed: untrusted or wrong certificate, or a failed handshake."""


def _openssl_reasons(exc: SSL.Error) -> str:
    # SSL.Error carries [(library, function, reason), ...].
    items = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
    reasons = [str(item[-1]) for item in items if isinstance(item, tuple) and item]
    return ", ".join(reasons) or str(exc)


def _explain_tls_failure_of(failure: Failure, url: str) -> Failure:
    # Only parsed when a request failed: urlsplit costs more than it looks.
    return explain_tls_failure(failure, urlsplit(url).netloc)


def explain_tls_failure(failure: Failure, netloc: str) -> Failure:
    """``failure``, or a TLSError saying what went wrong if TLS is why the request failed.

    twisted.web reports a failed handshake as a request that could not be
    sent, wrapping an OpenSSL error list or a service_identity error; this
    says it in words, naming the endpoint and the fix.
    """
    reasons = getattr(failure.value, "reasons", None) or [failure]
    for reason in reasons:
        exc = reason.value if isinstance(reason, Failure) else None
        message = ""
        if isinstance(exc, VerificationError):
            message = (
                f"the TLS certificate of {netloc} is not valid for that host name; "
                "check the endpoint URL"
            )
        elif isinstance(exc, SSL.Error):
            details = _openssl_reasons(exc)
            if "certificate verify failed" in details:
                message = (
                    f"the TLS certificate of {netloc} is not trusted ({details}); if a private "
                    "CA or a TLS-inspecting proxy signs it, add that CA with AWS_CA_BUNDLE"
                )
            else:
                message = f"TLS handshake with {netloc} failed: {details}"
        if message:
            error = TLSError(message)
            error.__cause__ = exc
            return Failure(error)
    return failure


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------
# Routing


def _chooser(proxy: ProxySpec | ProxyRules | None) -> ProxyChooser:
    if isinstance(proxy, ProxyRules):
        return _memoized_by_origin(proxy.proxy_for)
    return lambda _url: proxy


def _memoized_by_origin(choose: ProxyChooser) -> ProxyChooser:
    """``choose``, asked once per scheme://host:port (the NO_PROXY rules only look there).

    Every upload asks twice (agent and endpoint factory); the daemon talks
    to a handful of origins, so the cache stays tiny.
    """
    cache: dict[str, ProxySpec | None] = {}

    def chosen(url: str) -> ProxySpec | None:
        start = url.find("//") + 2
        end = url.find("/", start)
        origin = url if end < 0 else url[:end]
        try:
            return cache[origin]
        except KeyError:
            if len(cache) > _MAX_CACHED_ORIGINS:
                cache.clear()
            result = cache[origin] = choose(url)
            return result

    return chosen


_MAX_CACHED_ORIGINS = 64


@implementer(IStreamClientEndpoint)
class QuietEndpoint:
    """``endpoint``, connecting factories with ``noisy`` turned off.

    The pool builds a new HTTP client factory for every connection, and
    Twisted logs "Starting factory ..." and "Stopping factory ..." for each
    one unless the factory is not ``noisy`` (a public ``Factory`` attribute).
    The endpoint is where the pool hands its factory over, so no hook into
    the pool is needed.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self._endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        if isinstance(protocolFactory, Factory):
            protocolFactory.noisy = False
        connected: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)
        return connected

    def __repr__(self) -> str:
        # The pool names its factory after the endpoint.
        return repr(self._endpoint)


@implementer(IAgentEndpointFactory)
class ProxyEndpointFactory:
    """Endpoints for an Agent: direct, or a CONNECT tunnel; TLS on top for https."""

    def __init__(
        self,
        reactor: Any,
        choose: ProxyChooser,
        tls: IPolicyForHTTPS,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._choose = choose
        self._tls = tls
        self._timeout = connect_timeout
        # Endpoints are reusable; making one per request costs IDNA host
        # encoding (and a TLS creator lookup) for every upload.
        self._endpoints: dict[tuple[bytes, bytes], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        key = (uri.scheme, uri.netloc)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) > _MAX_CACHED_ORIGINS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._make_endpoint(uri)
        return endpoint

    def _make_endpoint(self, uri: URI) -> IStreamClientEndpoint:
        scheme = uri.scheme.decode("ascii").lower()
        if scheme not in ("http", "https"):
            raise SchemeNotSupported(f"unsupported scheme: {scheme!r}")
        host = uri.host.decode("ascii").strip("[]")
        proxy = self._choose(f"{scheme}://{uri.netloc.decode('ascii')}/")
        endpoint: IStreamClientEndpoint
        if proxy is None:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            # (ProxyRoutingAgent sends http through a proxy in absolute form
            # instead; a tunnel is what this factory alone can offer.)
            endpoint = HTTPConnectProxyEndpoint(
                HostnameEndpoint(self._reactor, proxy.host, proxy.port, timeout=self._timeout),
                host,
                uri.port,
                clock=self._reactor,
                proxy_authorization=proxy.authorization_header(),
                timeout=self._timeout,
            )
        if scheme == "https":
            creator = self._tls.creatorForNetloc(host.encode("ascii"), uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return QuietEndpoint(endpoint)


@implementer(IAgent)
class ProxyRoutingAgent:
    """An IAgent that sends each request directly or through its proxy."""

    def __init__(
        self,
        reactor: Any,
        pool: HTTPConnectionPool,
        choose: ProxyChooser,
        tls: IPolicyForHTTPS,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._choose = choose
        self._timeout = connect_timeout
        factory = ProxyEndpointFactory(reactor, choose, tls, connect_timeout)
        self._agent = Agent.usingEndpointFactory(reactor, factory, pool)
        # One ProxyAgent per proxy: the pool keys its connections by the
        # agent's endpoint object, so a new agent per request would never
        # reuse a connection.
        self._forwarding: dict[ProxySpec, ProxyAgent] = {}

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        # Every failure goes into the Deferred (a bad URL, an unusable
        # HTTP_PROXY, ...): callers such as the uploader never see a raise.
        try:
            url = uri.decode("ascii")
            proxy = self._choose(url)
            if proxy is None or url[:5].lower() != "http:":
                result: Deferred[IResponse] = self._agent.request(
                    method, uri, headers, bodyProducer
                )
                return result.addErrback(_explain_tls_failure_of, url)
            return self._forward(proxy, method, uri, headers, bodyProducer)
        except Exception:
            return defer.fail()

    def _forward(
        self,
        proxy: ProxySpec,
        method: bytes,
        uri: bytes,
        headers: Headers | None,
        bodyProducer: IBodyProducer | None,
    ) -> Deferred[IResponse]:
        """Plain http through a proxy: the absolute URL on the request line."""
        agent = self._forwarding.get(proxy)
        if agent is None:
            endpoint = QuietEndpoint(
                HostnameEndpoint(self._reactor, proxy.host, proxy.port, timeout=self._timeout)
            )
            agent = self._forwarding[proxy] = ProxyAgent(endpoint, self._reactor, self._pool)
        authorization = proxy.authorization_header()
        if authorization is not None:
            headers = headers.copy() if headers is not None else Headers()
            headers.setRawHeaders(b"Proxy-Authorization", [authorization.encode("latin-1")])
        forwarded: Deferred[IResponse] = agent.request(method, uri, headers, bodyProducer)
        return forwarded


# ---------------------------------------------------------------------------
# Building it


def make_client(
    reactor: Any,
    pool: HTTPConnectionPool,
    *,
    proxy: ProxySpec | ProxyRules | None = None,
    verify: bool = True,
    ca_bundle: str = "",
    connect_timeout: float = CONNECT_TIMEOUT,
) -> treq.client.HTTPClient:
    """A treq client on ``pool``.

    ``proxy``: one proxy for every request, ``ProxyRules`` to decide per URL
    (NO_PROXY), or None.  ``ca_bundle``: a PEM file of CA certificates
    trusted in addition to the system store (ProxyConfigError if unusable).
    ``verify=False`` checks no certificate or host name.
    """
    extra = load_ca_bundle(ca_bundle) if ca_bundle else ()
    return _client(reactor, pool, _chooser(proxy), verify, extra, connect_timeout)


def _client(
    reactor: Any,
    pool: HTTPConnectionPool,
    choose: ProxyChooser,
    verify: bool,
    extra_cas: Sequence[x509.Certificate],
    connect_timeout: float,
) -> treq.client.HTTPClient:
    # Cached per host name: building a context loads the whole trust store.
    tls = HostnameCachingHTTPSPolicy(TLSPolicy(verify=verify, extra_cas=extra_cas))
    agent = ProxyRoutingAgent(reactor, pool, choose, tls, connect_timeout)
    return treq.client.HTTPClient(
        agent, cookiejar=_NoCookies(), data_to_body_producer=body_producer
    )


@implementer(IBodyProducer)
class BytesProducer:
    """A request body that is already in memory, written in one go.

    treq's default for bytes is a ``FileBodyProducer`` over a ``BytesIO``,
    which writes from a cooperator task: a timer and an extra event-loop
    turn per request, with the headers and the body in separate sends.
    This writes the body from ``startProducing``, in the same turn as the
    headers, so the transport sends both together.
    """

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass  # everything was written at once: nothing left to pause

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def body_producer(data: Any) -> IBodyProducer:
    """treq's ``data_to_body_producer``: bytes as a ``BytesProducer``, the rest as treq does."""
    if isinstance(data, bytes):
        return BytesProducer(data)
    producer: IBodyProducer = IBodyProducer(data)
    return producer


class _NoCookies(IndexableCookieJar):
    """X-Ray sets no cookies; skipping the jar saves work on every request."""

    def add_cookie_header(self, request: Any) -> None:
        pass

    def extract_cookies(self, response: Any, request: Any) -> None:
        pass


def ca_bundle_path(env: Mapping[str, str]) -> str:
    return env.get("AWS_CA_BUNDLE", "").strip()


def make_http(
    reactor: Any, settings: Settings, env: Mapping[str, str], per_host: int
) -> tuple[treq.client.HTTPClient, HTTPConnectionPool]:
    """The X-Ray client and its pool, from the settings and the environment.

    Raises ProxyConfigError (one line to show, then exit 1) for a bad proxy
    URL or an unusable ``AWS_CA_BUNDLE``.  Close the pool's cached
    connections on shutdown.
    """
    rules = ProxyRules.from_settings(settings.proxy_address, env)
    ca_bundle = ca_bundle_path(env)
    extra = load_ca_bundle(ca_bundle) if ca_bundle else ()
    pool = make_pool(reactor, per_host)
    client = _client(
        reactor, pool, rules.proxy_for, not settings.no_verify_ssl, extra, CONNECT_TIMEOUT
    )
    return client, pool


def outbound_warnings(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """Startup warnings about the outbound settings (insecure or half-broken ones)."""
    warnings: list[str] = []
    if settings.no_verify_ssl:
        warnings.append(
            "NoVerifySSL is on: the X-Ray endpoint's TLS certificate and host name are not "
            "checked, so anyone on the network path can read and change what is uploaded; "
            "turn it off unless you are debugging"
        )
    try:
        rules = ProxyRules.from_settings(settings.proxy_address, env)
    except ProxyConfigError:
        return warnings  # make_http refuses to start with it and says why
    if isinstance(rules.http, ProxyConfigError):
        warnings.append(f"{rules.http}; requests to http:// endpoints will fail until it is fixed")
    if rules.no_proxy.ignored and rules.any:
        warnings.append(
            "NO_PROXY entries not understood, ignored: " + ", ".join(rules.no_proxy.ignored)
        )
    return warnings


def outbound_info(settings: Settings, env: Mapping[str, str]) -> list[str]:
    """Startup lines describing the proxy and extra CAs in use (passwords masked)."""
    lines: list[str] = []
    try:
        rules = ProxyRules.from_settings(settings.proxy_address, env)
    except ProxyConfigError:
        rules = ProxyRules()
    if rules.configured is not None:
        lines.append(f"Using proxy {rules.configured.display()} (from -p/ProxyAddress)")
    if rules.https is not None:
        lines.append(f"Using proxy {rules.https.display()} for https (from {rules.https.source})")
    if isinstance(rules.http, ProxySpec):
        lines.append(f"Using proxy {rules.http.display()} for http (from {rules.http.source})")
    if rules.any and (rules.no_proxy.entries or rules.no_proxy.everything):
        lines.append(f"Not using a proxy for NO_PROXY hosts: {rules.no_proxy.text.strip()}")
    ca_bundle = ca_bundle_path(env)
    if ca_bundle:
        lines.append(f"Trusting the CA certificates in AWS_CA_BUNDLE={ca_bundle} too")
    return lines
