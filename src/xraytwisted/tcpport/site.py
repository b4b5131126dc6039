"""The HTTP side of the TCP port: routing, error answers, and its bounded Site.

``http_root`` answers the daemon's own pages (``/health``, ``/metrics``) and
hands every other request to the proxy (the SigV4 sampling proxy, or the
local sampling resource in local-sink mode), which answers a JSON 404 for
anything that is not an X-Ray API path.  ``make_site`` builds the Site the
TCP port's sniffer hands HTTP connections to: a ``BoundedSite`` (no access
log, an idle timeout, a deadline for each whole request, request-body
limits enforced while the body arrives, a lingering close after an early
refusal) whose refusals are AWS JSON errors counted in ``proxy_requests``
(``ProxyRefusals``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.bounded_site import (
    BoundedSite,
    Limit,
    Limits,
    format_address,
    raw_response,
)
from xraytwisted.listen.connections import ConnectionCap
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle

DEFAULT_MAX_BODY = 1024 * 1024  # SamplingProxy.MaxBodyKB default
DEFAULT_REQUEST_DEADLINE = 10.0  # SamplingProxy.RequestDeadlineSeconds


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


def raw_answer(status: int, code: str, message: str, *extra: bytes) -> bytes:
    """A complete JSON error answer (as ``json_error``'s) that closes the connection."""
    body = error_body(code, message)
    error_type = b"X-Amzn-ErrorType: " + code.encode("ascii")
    return raw_response(status, b"application/json", body, error_type, *extra)


class ProxyRefusals:
    """How the TCP port's web side refuses: AWS JSON errors, ``proxy_requests`` outcomes.

    413 and 503 are counted (``too_large``, ``overloaded``), 408 too
    (``slow_client``); slow clients and a full hold are also logged, at most
    once per kind every 10 seconds.  Connections over the Site's own caps
    (the monitoring listener's; the TCP port's sniffer caps its own) are
    refused by ``cap``, as the TCP port refuses them.
    """

    log = Logger()

    def __init__(
        self, counters: Counters | None, clock: IReactorTime, cap: ConnectionCap | None = None
    ) -> None:
        self.counters = counters
        self.cap = cap
        self._throttle = Throttle(clock, 10.0)

    def refuse(
        self, site: BoundedSite, limit: Limit, peer: IAddress | None, request: Request | None
    ) -> bytes:
        limits = site.limits
        if limit is Limit.CONNECTIONS or limit is Limit.PEER_CONNECTIONS:
            # make_site gives a capped Site a cap.
            assert self.cap is not None
            if limit is Limit.CONNECTIONS:
                self.cap.refuse("total", limits.max_connections or 0, peer)
            else:
                self.cap.refuse("peer", limits.max_per_peer or 0, peer)
            return b""  # (not sent: the connection is closed at once)
        if limit is Limit.DEADLINE:
            seconds = limits.deadline or 0
            self._count("slow_client")
            self._warn(
                "slow client",
                "Closing HTTP connection from {peer}: its request was not complete within "
                "{seconds:g} seconds (SamplingProxy.RequestDeadlineSeconds); answered 408",
                peer=format_address(peer),
                seconds=seconds,
            )
            return raw_answer(
                408,
                "RequestTimeoutException",
                f"the request was not complete within {seconds:g} seconds "
                "(SamplingProxy.RequestDeadlineSeconds)",
            )
        if limit is Limit.TOO_LARGE:
            self._count("too_large")
            return raw_answer(
                413,
                "InvalidRequestException",
                f"request body larger than {limits.max_body} bytes (SamplingProxy.MaxBodyKB)",
            )
        if limit is Limit.HOLD_FULL:
            self._warn(
                "hold full",
                "TCP port: {held} bytes of unfinished requests and stream lines are "
                "held, the most Socket.TCPHoldKB (--tcp-hold) allows; answered 503",
                held=limits.hold.used if limits.hold is not None else 0,
            )
            message = (
                "the daemon holds as many request bytes as Socket.TCPHoldKB allows; try again later"
            )
        else:  # OVERLOADED
            message = (
                "the daemon already has as many X-Ray requests in flight as "
                "SamplingProxy.MaxConcurrentRequests allows; try again later"
            )
        self._count("overloaded")
        return raw_answer(503, "ServiceUnavailableException", message, b"Retry-After: 1")

    def _count(self, outcome: str) -> None:
        if self.counters is not None:
            self.counters.proxy_requests[outcome] += 1

    def _warn(self, kind: str, message: str, **fields: object) -> None:
        suppressed = self._throttle.check(kind)
        if suppressed is None:
            return
        if suppressed:
            message += " ({suppressed} more like this suppressed)"
        self.log.warn(message, suppressed=suppressed, **fields)


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
    max_connections: int | None = None,
    max_per_peer: int | None = None,
    cap: ConnectionCap | None = None,
) -> BoundedSite:
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
    ``max_connections``, ``max_per_peer``: connections open at once, in all
    and from one address (None: no limit; the TCP port's sniffer counts its
    own); ``cap`` refuses (counts and logs) those over them.
    ``reactor`` runs the timeouts (the global reactor by default).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IReactorTime, global_reactor)
    limits = Limits(
        idle_timeout=timeout,
        deadline=request_deadline,
        max_body=max_body,
        hold=hold,
        overloaded=overloaded,
        max_connections=max_connections,
        max_per_peer=max_per_peer,
    )
    if cap is None and (max_connections is not None or max_per_peer is not None):
        raise ValueError("a Site with connection limits needs a cap to refuse with")
    return BoundedSite(root, limits, ProxyRefusals(counters, reactor, cap), reactor=reactor)


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
