"""The HTTP side of the TCP port: routing, request limits, and a quiet Site.

``http_root`` answers the daemon's own pages (``/health``, ``/metrics``) and
hands every other request to the proxy (the SigV4 sampling proxy, or the
local sampling resource in local-sink mode), which answers a JSON 404 for
anything that is not an X-Ray API path.  ``make_site`` builds the Site the
TCP port's sniffer hands HTTP connections to: no access log, an idle
timeout, a deadline for each whole request (so trickling bytes does not
keep a connection), and request-body limits that are enforced while the
body arrives (a 10 GB upload is refused after its headers, not buffered;
a refused client can finish sending and read its answer).  Only public
twisted.web hooks are used.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle
from xraytwisted.tcpport.held import HeldBytes

DEFAULT_MAX_BODY = 1024 * 1024  # SamplingProxy.MaxBodyKB default
DEFAULT_REQUEST_DEADLINE = 10.0  # SamplingProxy.RequestDeadlineSeconds
# After an early refusal, bytes of the refused request read and dropped (and
# seconds waited for them) so the client can finish sending and read the answer.
LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 5.0


def error_body(code: str, message: str) -> bytes:
    """A rest-json error as AWS SDKs parse it (``__type`` and ``message``)."""
    return json.dumps({"__type": code, "message": message}).encode("utf-8")


def json_error(request: Request, status: int, code: str, message: str) -> bytes:
    """Set up ``request`` for a JSON error answer; returns the body to send."""
    body = error_body(code, message)
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"x-amzn-errortype", code.encode("ascii"))
    request.setHeader(b"content-length", b"%d" % len(body))
    # twisted.web would drop a HEAD answer's body itself, with a log line.
    return b"" if request.method == b"HEAD" else body


def read_body(request: Request, limit: int) -> bytes | None:
    """The request body, or None when it is longer than ``limit`` bytes."""
    content = request.content
    body = content.read(limit + 1) if content is not None else b""
    return None if len(body) > limit else body


def body_too_large(request: Request, limit: int) -> bytes:
    """The 413 answer for a body ``read_body`` refused."""
    return json_error(
        request,
        413,
        "InvalidRequestException",
        f"request body larger than {limit} bytes (SamplingProxy.MaxBodyKB)",
    )


class _Root(Resource):
    """Exact local paths first; everything else is the proxy's."""

    isLeaf = True

    def __init__(
        self, proxy: IResource, local: Mapping[bytes, IResource], counters: Counters | None
    ) -> None:
        super().__init__()
        self._proxy = proxy
        self._routes = {b"/" + name.strip(b"/"): resource for name, resource in local.items()}
        self._counters = counters

    def render(self, request: Request) -> Any:
        target = self._routes.get(request.path)
        if target is None:
            return self._proxy.render(request)
        if self._counters is not None:
            self._counters.proxy_requests["local"] += 1
        return target.render(request)


class LazyResource(Resource):
    """A leaf resource built by ``factory`` on its first request.

    For pages whose module is costly to import and rarely asked for: /metrics
    pulls in prometheus_client (~1 MB of resident memory), which a daemon
    nobody scrapes should not carry.
    """

    isLeaf = True

    def __init__(self, factory: Callable[[], IResource]) -> None:
        super().__init__()
        self._factory: Callable[[], IResource] | None = factory
        self._resource: IResource | None = None

    def render(self, request: Request) -> Any:
        if self._resource is None:
            assert self._factory is not None
            self._resource, self._factory = self._factory(), None
        return self._resource.render(request)


def http_root(
    proxy: IResource,
    local: Mapping[bytes, IResource],
    counters: Counters | None = None,
) -> Resource:
    """The root resource of the TCP port's HTTP side.

    ``local`` maps a path name (``b"health"`` for ``/health``) to a leaf
    resource the daemon answers itself; those paths are never proxied.  Every
    other request goes to ``proxy``, which must be a leaf resource (it sees
    the whole path) and answers unknown paths itself with a JSON 404.  With
    ``counters``, requests to local paths are counted as ``local``.
    """
    return _Root(proxy, local, counters)


def format_address(address: object) -> str:
    """``host:port`` of a peer address (its repr if it has neither)."""
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def raw_answer(status: int, reason: bytes, code: str, message: str, *extra: bytes) -> bytes:
    """A complete HTTP/1.1 JSON error answer that closes the connection.

    For answers given before twisted.web has set a request up (it does so
    only once the body is in), when ``Request.write`` cannot be used yet.
    """
    body = error_body(code, message)
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    head += b"Content-Type: application/json\r\nX-Amzn-ErrorType: %s\r\n" % code.encode("ascii")
    head += b"".join(line + b"\r\n" for line in extra)
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    return head + body


class BoundedChannel(http.HTTPChannel):
    """An HTTPChannel with a deadline per request and a lingering close.

    * From the first byte of a request, the client has the site's
      ``request_deadline`` seconds to send all of it, headers and body
      (the idle timeout alone restarts on every byte, so a client
      trickling a header line at a time would never be cut); then it gets
      408 and the connection is closed.  The clock does not run while a
      request is being answered, nor between requests (the idle timeout
      covers that).
    * After an early refusal (413, 503) the rest of the request is read
      and dropped, up to ``LINGER_BYTES`` and ``LINGER_SECONDS``, before
      the connection is closed: closing on unread data makes the kernel
      reset the connection, and the client would see a broken pipe instead
      of the answer.
    * Idle timeouts are routine (SDKs keep connections open between
      polls): logged at debug, not at info as twisted.web does.
    """

    log = Logger()
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _answering = False  # between a request's last byte and its answer's end
    _lingering = False
    _gone = False

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not (self._answering or self._lingering) and data:
            seconds = getattr(getattr(self, "site", None), "request_deadline", None)
            if seconds:
                self._deadline = self.callLater(seconds, self._deadline_passed)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        if not self._lingering:
            self._cancel(self._deadline)
            self._deadline = None
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Pipelined bytes read meanwhile are handed back to dataReceived from
        # here, which starts the next request's deadline.
        self._answering = False
        super().requestDone(request)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._lingering or self.transport is None:
            return
        site = getattr(self, "site", None)
        counters = getattr(site, "counters", None)
        if isinstance(counters, Counters):
            counters.proxy_requests["slow_client"] += 1
        seconds = getattr(site, "request_deadline", 0)
        if isinstance(site, QuietSite):
            site.warn(
                "slow client",
                "Closing HTTP connection from {peer}: its request was not complete within "
                "{seconds:g} seconds (SamplingProxy.RequestDeadlineSeconds); answered 408",
                peer=format_address(self.transport.getPeer()),
                seconds=seconds,
            )
        self.transport.write(
            raw_answer(
                408,
                b"Request Timeout",
                "RequestTimeoutException",
                f"the request was not complete within {seconds:g} seconds "
                "(SamplingProxy.RequestDeadlineSeconds)",
            )
        )
        self._close_soon()

    def linger(self, limit: int) -> None:
        """An answer ending the request was written: drop up to ``limit`` more bytes, then close."""
        if self._lingering:
            return
        self._lingering = True
        self._cancel(self._deadline)
        self._deadline = None
        self.setTimeout(None)
        if limit <= 0 or self.transport is None:
            self.end_linger()
            return
        # The answer is complete: let the client see its end now.
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._deadline = self.callLater(LINGER_SECONDS, self.end_linger)

    def end_linger(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        self._close_soon()

    def _close_soon(self) -> None:
        self.loseConnection()
        # (A half-closed connection may be gone already.)
        if self._abort is None and not self._gone:
            # A client that reads nothing cannot keep the descriptor.
            self._abort = self.callLater(self.abortTimeout or 15, self._abort_now)

    def _abort_now(self) -> None:
        self._abort = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def timeoutConnection(self) -> None:
        # What HTTPChannel.timeoutConnection does, logged at debug.
        peer = str(self.transport.getPeer()) if self.transport is not None else "?"
        self.log.debug("Timing out client: {peer}", peer=peer)
        self._close_soon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        for call in (self._deadline, self._abort):
            self._cancel(call)
        self._deadline = self._abort = None
        super().connectionLost(reason)

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class BoundedRequest(Request):
    """A Request whose body may not exceed its site's ``max_body``, nor its ``hold``.

    As soon as the headers are in: a Content-Length over the limit is
    answered 413, and a request with a body while the sampling proxy has
    no room for another (the site's ``overloaded``) 503, before the body
    is read.  Chunked bodies are counted as they arrive.  The body's bytes
    are charged to the site's ``hold`` (shared with the segment streams)
    until the request is answered; one that does not fit is answered 503.
    After any such answer the rest of the body is read and dropped (see
    ``BoundedChannel.linger``).  Bodies stay in memory (no temporary files:
    a read-only container file system has nowhere to put them).
    """

    _refused = False
    _body_bytes = 0
    _held = 0
    _declared: int | None = None

    def _site(self) -> Any:
        return getattr(getattr(self, "channel", None), "site", None)

    def gotLength(self, length: int | None) -> None:
        site = self._site()
        limit = getattr(site, "max_body", None)
        if not isinstance(limit, int):
            super().gotLength(length)
            return
        self.content = BytesIO()
        self._declared = length
        if length is not None and length > limit:
            self._refuse_too_large(limit)
            return
        if length == 0:
            return
        overloaded = getattr(site, "overloaded", None)
        if overloaded is not None and overloaded():
            self._refuse_busy(
                "the daemon already has as many X-Ray requests in flight as "
                "SamplingProxy.MaxConcurrentRequests allows; try again later"
            )

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._refused:
            if self._body_bytes > LINGER_BYTES:
                self._end_linger()
            return
        site = self._site()
        limit = getattr(site, "max_body", None)
        if isinstance(limit, int) and self._body_bytes > limit:
            self._refuse_too_large(limit)
            return
        hold = getattr(site, "hold", None)
        if isinstance(hold, HeldBytes):
            if not hold.fits(len(data)):
                if isinstance(site, QuietSite):
                    site.warn(
                        "hold full",
                        "TCP port: {held} bytes of unfinished requests and stream lines are "
                        "held, the most Socket.TCPHoldKB (--tcp-hold) allows; answered 503",
                        held=hold.used,
                    )
                self._refuse_busy(
                    "the daemon holds as many request bytes as Socket.TCPHoldKB allows; "
                    "try again later"
                )
                return
            hold.charge(len(data))
            self._held += len(data)
        content = self.content
        assert content is not None  # set by gotLength
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._end_linger()  # the whole body has been read: close now
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        self._release()  # (finishing forgets the channel, and with it the site)
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._release()
        super().connectionLost(reason)

    def _release(self) -> None:
        held, self._held = self._held, 0
        hold = getattr(self._site(), "hold", None)
        if held and isinstance(hold, HeldBytes):
            hold.release(held)

    def _count(self, outcome: str) -> None:
        counters = getattr(self._site(), "counters", None)
        if isinstance(counters, Counters):
            counters.proxy_requests[outcome] += 1

    def _refuse_too_large(self, limit: int) -> None:
        self._count("too_large")
        self._refuse(
            raw_answer(
                413,
                b"Request Entity Too Large",
                "InvalidRequestException",
                f"request body larger than {limit} bytes (SamplingProxy.MaxBodyKB)",
            )
        )

    def _refuse_busy(self, message: str) -> None:
        self._count("overloaded")
        self._refuse(
            raw_answer(503, b"Service Unavailable", "ServiceUnavailableException", message,
                       b"Retry-After: 1")
        )  # fmt: skip

    def _refuse(self, answer: bytes) -> None:
        self._refused = True
        self._release()
        # The channel would otherwise invite the body with "100 Continue"
        # right after this answer.
        self.requestHeaders.removeHeader(b"expect")
        channel = self.channel
        if channel.transport is not None:
            channel.transport.write(answer)
        # Read what the client is still sending (if it is not too much), so
        # that it gets to see the answer.
        left = LINGER_BYTES - self._body_bytes
        if self._declared is not None:
            left = self._declared - self._body_bytes
            if left > LINGER_BYTES:
                left = 0
        if isinstance(channel, BoundedChannel):
            channel.linger(left)
        else:
            channel.loseConnection()

    def _end_linger(self) -> None:
        channel = self.channel
        if isinstance(channel, BoundedChannel):
            channel.end_linger()
        elif channel is not None:
            channel.loseConnection()


class QuietSite(Site):
    """A Site without access log lines or "Starting factory" noise."""

    logger = Logger()
    noisy = False
    displayTracebacks = False
    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: IResource,
        *,
        timeout: float,
        max_body: int | None,
        counters: Counters | None,
        reactor: IReactorTime | None,
        request_deadline: float | None = None,
        hold: HeldBytes | None = None,
        overloaded: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body = max_body
        self.counters = counters
        self.request_deadline = request_deadline
        self.hold = hold
        self.overloaded = overloaded
        self._throttle = Throttle(self.reactor, 10.0)

    def warn(self, kind: str, message: str, **fields: object) -> None:
        """A warning about a client, at most one per ``kind`` every 10 seconds."""
        suppressed = self._throttle.check(kind)
        if suppressed is None:
            return
        if suppressed:
            message += " ({suppressed} more like this suppressed)"
        self.logger.warn(message, suppressed=suppressed, **fields)

    def log(self, request: http.Request) -> None:
        pass


def make_site(
    root: IResource,
    *,
    timeout: float,
    max_body: int | None = DEFAULT_MAX_BODY,
    counters: Counters | None = None,
    reactor: IReactorTime | None = None,
    request_deadline: float | None = DEFAULT_REQUEST_DEADLINE,
    hold: HeldBytes | None = None,
    overloaded: Callable[[], bool] | None = None,
) -> Site:
    """The Site for the TCP port's HTTP side.

    ``timeout``: seconds a client connection may stay idle (slow or silent
    clients are disconnected; SamplingProxy.ClientTimeoutSeconds).
    ``request_deadline``: seconds a client has to send a whole request,
    from its first byte (408 after that; None: no deadline).
    ``max_body``: request body limit in bytes, enforced as the body arrives
    (HTTP 413, counted as ``too_large`` in ``counters``); None: no limit.
    ``hold``: the TCP port's budget for bytes not yet accepted, charged with
    request bodies until they are answered (503 when full).
    ``overloaded``: asked when a request's headers are in and a body
    follows; True answers 503 before the body is read.
    ``reactor`` runs the timeouts (the global reactor by default).
    """
    return QuietSite(
        root,
        timeout=timeout,
        max_body=max_body,
        counters=counters,
        reactor=reactor,
        request_deadline=request_deadline,
        hold=hold,
        overloaded=overloaded,
    )


class SiteService(AdoptedPortService):
    """Serves an already-bound, listening TCP socket with a Site (e.g. Monitoring.Address)."""

    def __init__(self, reactor: Any, sock: socket.socket, site: Factory[Any], what: str) -> None:
        super().__init__(reactor, sock)
        self.site = site
        self.what = what  # for the log line, e.g. "/health and /metrics"

    def adopt(self, sock: socket.socket) -> Any:
        return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.site)

    def listening(self) -> None:
        self.log.info("Serving {what} on {address}", what=self.what, address=str(self.address))
