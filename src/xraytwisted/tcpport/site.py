"""The HTTP side of the TCP port: routing, request limits, and a quiet Site.

``http_root`` answers the daemon's own pages (``/health``, ``/metrics``) and
hands every other request to the proxy (the SigV4 sampling proxy, or the
local sampling resource in local-sink mode), which answers a JSON 404 for
anything that is not an X-Ray API path.  ``make_site`` builds the Site the
TCP port's sniffer hands HTTP connections to: no access log, an idle
timeout for slow clients, and a request-body limit that is enforced while
the body arrives (a 10 GB upload is refused after its headers, not
buffered).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Mapping
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.observe.counters import Counters

DEFAULT_MAX_BODY = 1024 * 1024  # SamplingProxy.MaxBodyKB default


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


class _QuietLogger(Logger):
    # twisted.web logs each idle-connection timeout at info level; SDK pollers
    # keep connections idle between polls, so that is routine: debug.
    def info(self, format: str | None = None, **kwargs: object) -> None:
        self.debug(format, **kwargs)


class _Channel(http.HTTPChannel):
    # HTTPChannel logs only its timeouts through this (private) attribute; if
    # it ever goes away, those lines are merely back at info level.
    _log = _QuietLogger()


class BoundedRequest(Request):
    """A Request whose body may not exceed its site's ``max_body``.

    The limit is checked against Content-Length as soon as the headers are
    in, and against the bytes received for chunked bodies; an oversized
    request is answered 413 at once and its connection closed, so its body
    is never stored.  Bodies within the limit stay in memory (no temporary
    files: a read-only container file system has nowhere to put them).
    """

    _too_large = False
    _body_bytes = 0

    def _site_limit(self) -> int | None:
        limit = getattr(getattr(self.channel, "site", None), "max_body", None)
        return limit if isinstance(limit, int) else None

    def gotLength(self, length: int | None) -> None:
        limit = self._site_limit()
        if limit is None:
            super().gotLength(length)
            return
        self.content = BytesIO()
        if length is not None and length > limit:
            self._refuse(limit)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_bytes += len(data)
        limit = self._site_limit()
        if limit is not None and self._body_bytes > limit:
            self._refuse(limit)
            return
        content = self.content
        assert content is not None  # set by gotLength
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._too_large:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def _refuse(self, limit: int) -> None:
        self._too_large = True
        site = getattr(self.channel, "site", None)
        counters = getattr(site, "counters", None)
        if isinstance(counters, Counters):
            counters.proxy_requests["too_large"] += 1
        # The channel would otherwise invite the body with "100 Continue"
        # right after this answer.
        self.requestHeaders.removeHeader(b"expect")
        body = error_body(
            "InvalidRequestException",
            f"request body larger than {limit} bytes (SamplingProxy.MaxBodyKB)",
        )
        # twisted.web sets a request up (method, version) only once its body
        # is in, so Request.write cannot answer yet: write a complete
        # HTTP/1.1 answer ourselves and close the connection.
        head = (
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"X-Amzn-ErrorType: InvalidRequestException\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(body)
        )
        channel = self.channel
        if channel.transport is not None:
            channel.transport.write(head + body)
        channel.loseConnection()


class QuietSite(Site):
    """A Site without access log lines or "Starting factory" noise."""

    noisy = False
    displayTracebacks = False
    protocol = _Channel  # type: ignore[assignment]
    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: IResource,
        *,
        timeout: float,
        max_body: int | None,
        counters: Counters | None,
        reactor: IReactorTime | None,
    ) -> None:
        super().__init__(resource, timeout=timeout, reactor=reactor)
        self.max_body = max_body
        self.counters = counters

    def log(self, request: http.Request) -> None:
        pass


def make_site(
    root: IResource,
    *,
    timeout: float,
    max_body: int | None = DEFAULT_MAX_BODY,
    counters: Counters | None = None,
    reactor: IReactorTime | None = None,
) -> Site:
    """The Site for the TCP port's HTTP side.

    ``timeout``: seconds a client connection may stay idle (slow or silent
    clients are disconnected; SamplingProxy.ClientTimeoutSeconds).
    ``max_body``: request body limit in bytes, enforced as the body arrives
    (HTTP 413, counted as ``too_large`` in ``counters``); None: no limit.
    ``reactor`` runs the timeouts (the global reactor by default).
    """
    return QuietSite(root, timeout=timeout, max_body=max_body, counters=counters, reactor=reactor)


class SiteService(AdoptedPortService):
    """Serves an already-bound, listening TCP socket with a Site (e.g. Monitoring.Address)."""

    def __init__(self, reactor: Any, sock: socket.socket, site: Site, what: str) -> None:
        super().__init__(reactor, sock)
        self.site = site
        self.what = what  # for the log line, e.g. "/health and /metrics"

    def adopt(self, sock: socket.socket) -> Any:
        return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.site)

    def listening(self) -> None:
        self.log.info("Serving {what} on {address}", what=self.what, address=str(self.address))
