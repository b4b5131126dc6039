"""The sampling proxy: SDKs' unsigned X-Ray API calls, signed and forwarded.

SDKs poll ``POST /GetSamplingRules`` (every 5 minutes) and ``POST
/SamplingTargets`` (every 10 s) on the daemon's TCP port without
credentials; this resource signs them with the daemon's credentials and
relays X-Ray's answer, status and body unchanged.

Unlike the Go daemon's proxy (which forwards any method and path, and
forwards unsigned when it has no credentials):

* only the calls SDKs make (``SDK_PATHS``: GetSamplingRules and
  SamplingTargets) are forwarded, plus the X-Ray API operations
  ``SamplingProxy.Allow`` names; another X-Ray operation is a JSON 403,
  any other path a 404 and another method a 405, and none of them leaves
  the host;
* a request with an ``Origin`` header comes from a web page (browsers send
  it with every POST; SDKs never do): 403, so no page the host's browser
  opens can make the daemon sign requests.  With ``allowed_hosts``, a
  ``Host`` header not in it is refused too (DNS rebinding);
* the request is re-signed over a minimal header set (host, content-type,
  x-amz-date, x-amz-security-token), so headers a sidecar adds or rewrites
  (Envoy, Istio; the Go daemon's issue #199) cannot break the signature;
  client ``Authorization``, ``Connection`` and hop-by-hop headers are never
  forwarded, nor is anything else outside a short allow-list;
* no credentials means HTTP 503, never an unsigned request;
* bodies are limited, X-Ray gets ``timeout`` seconds to answer (504), a
  failed connection is a 502 with a JSON error, and at most
  ``max_concurrent`` requests are in flight (503 beyond that).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote_from_bytes

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from xraytwisted.aws import sigv4
from xraytwisted.aws.endpoints import Endpoint
from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle, printable
from xraytwisted.outbound.treq_private import FixedURL
from xraytwisted.pipeline.uploader import SERVICE, CredentialSource, HTTPClient, classify_exception
from xraytwisted.tcpport.operations import OPERATIONS, SDK_PATHS, Operation
from xraytwisted.tcpport.site import DEFAULT_MAX_BODY, body_too_large, json_error, read_body

DEFAULT_TIMEOUT = 10.0  # SamplingProxy.TimeoutSeconds
DEFAULT_MAX_CONCURRENT = 64  # SamplingProxy.MaxConcurrentRequests
# Sampling answers are a few KiB; trace queries (BatchGetTraces, ...) can
# be a few MiB.  Anything bigger is not X-Ray: 502.
MAX_RESPONSE = 16 * 1024 * 1024


# Client headers passed on to X-Ray, unsigned (Content-Type is signed).
# Everything else - Authorization, Connection and hop-by-hop headers, Host,
# x-amz-*, cookies, sidecar and tracing headers - stays behind.
FORWARDED_REQUEST_HEADERS = (b"user-agent", b"accept")

# Response headers that describe one connection, not the answer (RFC 9110
# 7.6.1), plus Content-Length, which is set for the bytes actually relayed.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)

# Bytes kept as they are in a forwarded query string; the rest (non-ASCII,
# controls, spaces) is percent-encoded, so what is signed is what is sent.
_QUERY_SAFE = "!$&'()*+,-./:;=?@_~%"
_TOKEN_SPLIT = re.compile(rb"[\s,]+")


class _NoCredentials(Exception):
    pass


class _ResponseTooLarge(Exception):
    pass


class _UpstreamTimeout(Exception):
    pass


def _timed_out(result: object, timeout: float) -> Failure:
    return Failure(_UpstreamTimeout(f"no answer within {timeout:g} seconds"))


class _BoundedBody(Protocol):
    """Collects a response body of at most ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(_ResponseTooLarge(f"X-Ray's answer exceeds {self.limit} bytes"))
            self._stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class SamplingProxy(Resource):
    """Signs and forwards X-Ray API calls; a leaf that sees every path."""

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        *,
        client: HTTPClient,
        endpoint: Endpoint,
        region: str,
        credentials: CredentialSource,
        clock: IReactorTime,
        counters: Counters,
        max_body: int = DEFAULT_MAX_BODY,
        timeout: float = DEFAULT_TIMEOUT,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_response: int = MAX_RESPONSE,
        warn_interval: float = 10.0,
        allow: Iterable[bytes] = (),
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.client = client
        self.endpoint = endpoint
        self.region = region
        self.credentials = credentials
        self.clock = clock
        self.counters = counters
        self.max_body = max_body
        self.timeout = timeout
        self.max_concurrent = max_concurrent
        self.max_response = max_response
        self.in_flight = 0
        self.allow = SDK_PATHS | frozenset(allow)
        self.allowed_hosts = frozenset(h.strip().lower() for h in allowed_hosts if h.strip())
        self._throttle = Throttle(clock, warn_interval)

    def _count(self, outcome: str) -> None:
        self.counters.proxy_requests[outcome] += 1

    def render(self, request: Request) -> bytes | int:
        path = request.path
        origin = request.getHeader(b"origin")
        if origin is not None:
            self._count("cross_origin")
            self._warn(
                "cross origin",
                "Sampling proxy: refused {path} from a web page ({origin}); answered 403 "
                "(SDKs never send an Origin header)",
                path=printable(path),
                origin=printable(origin.encode("latin-1") if isinstance(origin, str) else origin),
            )
            return json_error(
                request,
                403,
                "AccessDeniedException",
                "requests from web pages (with an Origin header) are not forwarded: the daemon "
                "signs only what X-Ray SDKs send",
            )
        if self.allowed_hosts and not self._host_allowed(request.getHeader(b"host")):
            self._count("bad_host")
            host = request.getHeader(b"host") or b""
            self._warn(
                "bad host",
                "Sampling proxy: refused {path} for Host {host}; answered 403 (not in "
                "--proxy-allowed-hosts / SamplingProxy.AllowedHosts)",
                path=printable(path),
                host=printable(host.encode("latin-1") if isinstance(host, str) else host),
            )
            return json_error(
                request,
                403,
                "AccessDeniedException",
                "this Host is not one the daemon answers to (--proxy-allowed-hosts or "
                "SamplingProxy.AllowedHosts)",
            )
        operation = OPERATIONS.get(path)
        if operation is None:
            self._count("not_found")
            self.log.debug("Sampling proxy: not an X-Ray API path: {path}", path=printable(path))
            return json_error(
                request,
                404,
                "NotFoundException",
                f"{printable(path)} is not an X-Ray API operation; the daemon forwards only "
                "X-Ray API calls such as POST /GetSamplingRules",
            )
        if path not in self.allow:
            self._count("not_allowed")
            self.log.debug(
                "Sampling proxy: {operation} is not allowed (SamplingProxy.Allow)",
                operation=operation.name,
            )
            return json_error(
                request,
                403,
                "AccessDeniedException",
                f"the daemon forwards only the calls X-Ray SDKs make (POST /GetSamplingRules, "
                f"POST /SamplingTargets); to forward {operation.name} ({printable(path)}), "
                "add it to --proxy-allow or SamplingProxy.Allow",
            )
        if request.method != operation.method:
            self._count("bad_method")
            request.setHeader(b"allow", operation.method)
            return json_error(
                request,
                405,
                "MethodNotAllowedException",
                f"{operation.name} takes {operation.method.decode()}, not "
                f"{printable(request.method)}",
            )
        body = read_body(request, self.max_body)
        if body is None:
            self._count("too_large")
            return body_too_large(request, self.max_body)
        if self.in_flight >= self.max_concurrent:
            self._count("overloaded")
            self._warn_overloaded()
            request.setHeader(b"retry-after", b"1")
            return json_error(
                request,
                503,
                "ServiceUnavailableException",
                f"the daemon already has {self.max_concurrent} X-Ray requests in flight; "
                "try again later",
            )
        self._forward(request, operation, path, body)
        return NOT_DONE_YET

    def overloaded(self) -> bool:
        """Asked when a request's headers are in: True answers 503 before its body is read."""
        if self.in_flight < self.max_concurrent:
            return False
        self._warn_overloaded()
        return True

    def _warn_overloaded(self) -> None:
        self._warn(
            "overloaded",
            "Sampling proxy: {limit} requests already in flight; answered 503 "
            "(SamplingProxy.MaxConcurrentRequests)",
            limit=self.max_concurrent,
        )

    def _host_allowed(self, host: bytes | str | None) -> bool:
        if host is None:
            return False
        name = (host.decode("latin-1") if isinstance(host, bytes) else host).strip().lower()
        if name in self.allowed_hosts:
            return True
        # An entry without a port allows the name on any port.
        bare = name.rsplit(":", 1)[0] if not name.endswith("]") else name
        return bare in self.allowed_hosts

    # -- forwarding --------------------------------------------------------

    def _forward(self, request: Request, operation: Operation, path: bytes, body: bytes) -> None:
        self.in_flight += 1
        gone = False
        # Asked before anything can answer: a finished request never reports.
        finished = request.notifyFinish()
        query = _query(request.uri)
        content_type = request.getHeader(b"content-type") or b"application/json"
        passed: dict[bytes, list[bytes]] = {
            name: list(values)
            for name in FORWARDED_REQUEST_HEADERS
            if (values := request.requestHeaders.getRawHeaders(name))
        }
        self.log.debug("Sampling proxy: forwarding {operation}", operation=operation.name)

        d = self._credentials()
        d.addCallback(self._send, path.decode("ascii"), query, content_type, passed, body)

        def client_gone(_: Failure) -> None:
            nonlocal gone
            gone = True
            d.cancel()

        def relay(result: tuple[Any, bytes]) -> None:
            if not gone:
                self._relay(request, operation, *result)

        def fail(failure: Failure) -> None:
            if not gone:
                self._fail(request, operation, failure)

        def done(_: object) -> None:
            self.in_flight -= 1

        d.addCallbacks(relay, fail)
        d.addErrback(self._bug, request)
        d.addBoth(done)
        finished.addErrback(client_gone)

    def _credentials(self) -> Deferred[sigv4.Credentials | None]:
        creds = self.credentials.current()
        when_loaded = getattr(self.credentials, "when_loaded", None)
        if creds is not None or when_loaded is None:
            return defer.succeed(creds)
        # Credentials may still be loading (the daemon just started, and
        # SDKs ask for rules at once): wait, within the request's timeout.
        # A fresh Deferred, so cancelling ours cannot cancel the source's.
        loaded: Deferred[None] = Deferred()

        def fire(result: object) -> object:
            if not loaded.called:
                loaded.callback(None)
            return result

        defer.maybeDeferred(when_loaded).addBoth(fire)
        loaded.addTimeout(self.timeout, self.clock)
        # Still nothing after the timeout: answered 503, like no credentials.
        loaded.addErrback(lambda f: f.trap(defer.TimeoutError) and None)
        return loaded.addCallback(lambda _: self.credentials.current())

    def _send(
        self,
        creds: sigv4.Credentials | None,
        path: str,
        query: str,
        content_type: bytes,
        passed: dict[bytes, list[bytes]],
        body: bytes,
    ) -> Deferred[Any]:
        if creds is None:
            raise _NoCredentials()
        endpoint = self.endpoint
        to_sign = [("Host", endpoint.host), ("Content-Type", content_type.decode("latin-1"))]
        added = sigv4.sign(
            method="POST",
            path=endpoint.base_path + path,
            query=query,
            headers=to_sign,
            body=body,
            credentials=creds,
            region=self.region,
            service=SERVICE,
            when=datetime.fromtimestamp(self.clock.seconds(), tz=timezone.utc),
        )
        headers: dict[bytes, list[bytes]] = {
            name.encode("latin-1"): [value.encode("latin-1")] for name, value in to_sign + added
        }
        headers.update(passed)
        # Sent as given (already ASCII, the query percent-encoded by _query):
        # treq's own conversion IDNA-encodes the host, which fails on an
        # IPv6 literal endpoint (-e http://[::1]:2000).
        url = FixedURL.of(endpoint.url_for(path) + (f"?{query}" if query else ""))
        d: Deferred[Any] = self.client.request(
            "POST",
            url,
            data=body,
            headers=headers,
            allow_redirects=False,
            unbuffered=True,
        )
        # X-Ray gets `timeout` seconds for the whole answer, body included.
        # (Cancelling a request in flight fails it with a wrapped
        # CancelledError, which addTimeout alone would not recognise.)
        d.addCallback(self._read)
        return d.addTimeout(self.timeout, self.clock, onTimeoutCancel=_timed_out)

    def _read(self, response: Any) -> Deferred[tuple[Any, bytes]]:
        collector = _BoundedBody(self.max_response)
        response.deliverBody(collector)
        return collector.done.addCallback(lambda body: (response, body))

    # -- answering ---------------------------------------------------------

    def _relay(self, request: Request, operation: Operation, response: Any, body: bytes) -> None:
        request.setResponseCode(response.code)
        headers = response.headers
        # Headers the answer's Connection header names are hop-by-hop too.
        named = {
            token.lower()
            for value in headers.getRawHeaders(b"connection", [])
            for token in _TOKEN_SPLIT.split(value)
            if token
        }
        for name, values in headers.getAllRawHeaders():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in named:
                continue
            if lower == b"content-encoding":
                # treq decodes gzip itself and then leaves an *empty*
                # Content-Encoding behind; any other encoding arrives as is,
                # header and bytes alike.
                values = [v for v in values if v.strip()]
                if not values:
                    continue
            request.responseHeaders.setRawHeaders(name, values)
        # The length is that of the bytes relayed (decoded, if treq decoded).
        request.setHeader(b"content-length", b"%d" % len(body))
        self._count("forwarded")
        if response.code >= 400:
            self.log.debug(
                "Sampling proxy: X-Ray answered {operation} with HTTP {status}",
                operation=operation.name,
                status=response.code,
            )
        request.write(body)
        request.finish()

    def _fail(self, request: Request, operation: Operation, failure: Failure) -> None:
        if failure.check(_NoCredentials):
            self._count("no_credentials")
            self._warn(
                "no credentials",
                "Sampling proxy: no AWS credentials to sign {operation}; answered 503 and "
                "did not forward it",
                operation=operation.name,
            )
            self._answer(
                request,
                503,
                "ServiceUnavailableException",
                "the X-Ray daemon has no AWS credentials to sign this request; it was not "
                "forwarded",
            )
            return
        if failure.check(_UpstreamTimeout):
            self._count("timeout")
            self._warn(
                "timeout",
                "Sampling proxy: X-Ray did not answer {operation} within {timeout:g} seconds; "
                "answered 504 (SamplingProxy.TimeoutSeconds)",
                operation=operation.name,
                timeout=self.timeout,
            )
            self._answer(
                request,
                504,
                "GatewayTimeoutException",
                f"X-Ray did not answer within {self.timeout:g} seconds",
            )
            return
        if failure.check(_ResponseTooLarge):
            reason = str(failure.value)
        else:
            reason = classify_exception(failure).message
        self._count("unreachable")
        self._warn(
            "unreachable",
            "Sampling proxy: cannot get {operation} from X-Ray at {url}: {reason}; answered 502",
            operation=operation.name,
            url=self.endpoint.url,
            reason=reason,
        )
        self._answer(request, 502, "BadGatewayException", f"cannot reach X-Ray: {reason}")

    def _answer(self, request: Request, status: int, code: str, message: str) -> None:
        request.write(json_error(request, status, code, message))
        request.finish()

    def _bug(self, failure: Failure, request: Request) -> None:
        self.log.failure("Sampling proxy: unexpected error while answering", failure)
        if request.finished or request.startedWriting:
            return
        with contextlib.suppress(RuntimeError):  # the client may be gone
            self._answer(request, 500, "InternalFailure", "internal error in the X-Ray daemon")

    def _warn(self, kind: str, message: str, **fields: object) -> None:
        suppressed = self._throttle.check(kind)
        if suppressed is None:
            return
        if suppressed:
            message += " ({suppressed} more like this suppressed)"
        self.log.warn(message, suppressed=suppressed, **fields)


def _query(uri: bytes) -> str:
    """The query string of a request URI, percent-encoded where it must be."""
    _, sep, query = uri.partition(b"?")
    if not sep:
        return ""
    return quote_from_bytes(query.split(b"#", 1)[0], safe=_QUERY_SAFE)
