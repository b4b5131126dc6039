"""The TCP port: one listener, two protocols.

Each connection's first bytes decide what it is (``classify``):

* an HTTP request line (``POST /GetSamplingRules HTTP/1.1``): the
  connection becomes the Site's HTTP channel (the sampling proxy, /health,
  /metrics);
* ``{``: a segment stream (``xraytwisted.ingest.stream.SegmentStream``), for senders that cannot
  use UDP: lines alternate ``header`` / ``document``, judged by the same
  rules as UDP datagrams, into the same buffer and counters.  When the
  buffer is full the stream stops reading (TCP backpressure) instead of
  dropping; see docs/stream-format.md;
* anything else: closed, and counted as one rejected record.

The port is bounded: at most ``max_connections`` connections at once, and
``max_per_peer`` from one address; more are closed as soon as they are
accepted (counted as ``tcp_refused``, warned about at most every 10 s: the
shared ``OpenConnections`` and ``ConnectionCap``, which the monitoring
listener uses too).
``connection_limits`` derives safe defaults from the descriptor limit
(``ulimit -n``), leaving room for uploads and the spool.  Stream lines and
request bodies not yet accepted share one byte budget (``HeldBytes``).

``TCPPortService`` adopts the listening socket bound at startup.  On stop it
closes the listener, lets each stream finish the record it is in the middle
of (bounded by a short grace period) and closes the HTTP connections, so
ingest is over before the batcher drains.
"""

from __future__ import annotations

import enum
import socket
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Site

from xraytwisted.ingest.core import Ingest
from xraytwisted.ingest.stream import STOP_GRACE, SegmentStream, abort_connection
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.connections import ConnectionCap, OpenConnections, WhenGone, format_peer
from xraytwisted.listen.held import HeldBytes

# Longest HTTP method token we wait for before deciding (RFC 9110's
# methods have at most 7 letters, WebDAV's at most 11).
MAX_METHOD = 16

DEFAULT_STREAM_IDLE = 300.0  # Socket.StreamIdleTimeoutSeconds
# Socket.TCPMaxConnections: 0 picks at most this many (each connection
# costs a descriptor and some memory; SDKs keep one each).
AUTO_MAX_CONNECTIONS = 1024
# Descriptors kept free for everything but TCP clients, on top of one per
# upload and proxied request in flight: log file, spool files, the DNS
# resolver's threads, credential and metadata lookups, /proc reads.
SPARE_DESCRIPTORS = 32


def connection_limits(soft_limit: int | None, in_use: int, outbound: int) -> tuple[int, int, bool]:
    """Default (total, per peer) TCP connection limits; the bool: the limit is cramped.

    ``soft_limit`` is RLIMIT_NOFILE (None: unlimited), ``in_use`` the
    descriptors open at startup, ``outbound`` how many connections uploads
    and the sampling proxy may open at once.  TCP clients get what is left
    after those and ``SPARE_DESCRIPTORS``; when that leaves almost nothing,
    a quarter of what is free (and the caller warns).
    """
    if soft_limit is None:
        total, cramped = AUTO_MAX_CONNECTIONS, False
    else:
        free = soft_limit - in_use
        total = free - outbound - SPARE_DESCRIPTORS
        cramped = total < 16
        if cramped:
            total = free // 4
        total = max(1, min(total, AUTO_MAX_CONNECTIONS))
    # One address may take a quarter, but never fewer than 64: with the
    # default 127.0.0.1 binding every client is the same address.
    per_peer = min(total, max(total // 4, 64))
    return total, per_peer, cramped


class Kind(enum.Enum):
    HTTP = "http"
    STREAM = "stream"
    JUNK = "junk"


def classify(head: bytes) -> Kind | None:
    """What a connection starting with ``head`` speaks; None: not known yet."""
    if not head:
        return None
    if head[:1] == b"{":
        return Kind.STREAM
    space = head.find(b" ", 0, MAX_METHOD + 1)
    token = head[:space] if space >= 0 else head[: MAX_METHOD + 1]
    if not (token.isalpha() and token.isupper()):
        return Kind.JUNK
    if space > 0:
        return Kind.HTTP
    return None if len(token) <= MAX_METHOD else Kind.JUNK


class SniffingProtocol(Protocol):
    """Buffers a connection's first bytes, then hands it to HTTP or the segment stream."""

    def __init__(self, factory: SniffingFactory, peer: str, host: str = "") -> None:
        self.factory = factory
        self.peer = peer
        self.host = host  # the peer's address without the port: per-peer limit
        self.kind: Kind | None = None
        self.inner: Protocol | None = None
        self._head = b""
        self._timer: IDelayedCall | None = None
        self._lost = WhenGone()
        self._gone = False
        self._cut = False

    def connectionMade(self) -> None:
        self.factory.opened(self)
        timeout = self.factory.sniff_timeout
        if timeout:
            self._timer = self.factory.clock.callLater(timeout, self._silent)

    def dataReceived(self, data: bytes) -> None:
        if self.kind is Kind.JUNK:
            return  # closing; counted once
        head = self._head + data
        kind = classify(head)
        if kind is None:
            self._head = head
            return
        self._head = b""
        self._cancel_timer()
        self.kind = kind
        factory = self.factory
        assert self.transport is not None
        if kind is Kind.HTTP:
            channel: Protocol = factory.site.buildProtocol(self.transport.getPeer())
            self._become(channel, head)
        elif kind is Kind.STREAM:
            factory.ingest.counters.stream_connections += 1
            stream = SegmentStream(
                factory.ingest,
                factory.max_line,
                factory.clock,
                self.peer,
                idle_timeout=factory.stream_idle,
                hold=factory.hold,
            )
            self._become(stream, head)
        else:
            factory.ingest.reject(
                "junk",
                "Closing TCP connection from {peer}: it is neither HTTP nor a segment stream "
                "(a stream starts with a header line such as "
                '{{"format":"json","version":1}}): {data}',
                head,
                peer=self.peer,
            )
            self.transport.loseConnection()

    def _become(self, inner: Protocol, head: bytes) -> None:
        self.inner = inner
        assert self.transport is not None
        inner.makeConnection(self.transport)
        # From now on the transport calls the inner protocol directly.
        self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        inner.dataReceived(head)

    def _silent(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def stop(self, grace: float) -> Deferred[None]:
        """Close this connection (a stream first finishes its current record)."""
        lost = self.when_lost()
        inner = self.inner
        if self._gone:
            return lost
        if isinstance(inner, SegmentStream):
            inner.stop(grace)
        elif self.transport is not None:
            # HTTP and undecided connections: as with the Go daemon's Close,
            # in-flight proxied requests are cut; SDKs poll again later.
            self.transport.loseConnection()
            self._cancel_timer()
            if not self._gone:  # (a half-closed connection is lost at once)
                self._timer = self.factory.clock.callLater(grace, self._abort)
        return lost

    def stop_now(self) -> bool:
        """Cut this connection without the stop grace; False if it is gone or cut already."""
        if self._gone or self._cut:
            return False
        self._cut = True
        if isinstance(self.inner, SegmentStream):
            self.inner.stop_now()
        else:
            self._cancel_timer()
            self._abort()
        return True

    def _abort(self) -> None:
        self._timer = None
        if not self._gone and self.transport is not None:
            abort_connection(self.transport)

    def when_lost(self) -> Deferred[None]:
        return self._lost.wait()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._cancel_timer()
        self.factory.closed(self)
        if self.inner is not None:
            self.inner.connectionLost(reason)
        self._lost.gone()


class SniffingFactory(Factory):
    """Builds a ``SniffingProtocol`` per connection of the TCP port, within the limits."""

    noisy = False  # no "Starting factory" lines
    log = Logger()

    def __init__(
        self,
        ingest: Ingest,
        site: Site,
        max_line: int,
        clock: IReactorTime,
        *,
        sniff_timeout: float | None = None,
        stream_idle: float | None = DEFAULT_STREAM_IDLE,
        max_connections: int | None = None,
        max_per_peer: int | None = None,
        hold: HeldBytes | None = None,
        warn_interval: float = 10.0,
    ) -> None:
        self.ingest = ingest
        self.site = site
        self.max_line = max_line
        self.clock = clock
        # A connection that sends nothing is dropped after the HTTP idle timeout.
        self.sniff_timeout = site.timeOut if sniff_timeout is None else sniff_timeout
        self.stream_idle = stream_idle
        self.hold = hold
        # None: no limit.
        self.connections = OpenConnections[SniffingProtocol](max_connections, max_per_peer)
        self._cap = ConnectionCap(
            ingest.counters,
            clock,
            total="Refusing TCP connection from {peer}: {limit} connections are open, the "
            "most allowed (--tcp-max-connections or Socket.TCPMaxConnections; the default "
            "follows ulimit -n). Raise the limit, or find the client that holds them",
            peer="Refusing TCP connection from {peer}: that address already has {limit} "
            "connections open, the most one address may hold "
            "(--tcp-max-connections-per-peer or Socket.TCPMaxConnectionsPerPeer)",
            warn_interval=warn_interval,
        )
        self._stopping_now = False

    @property
    def max_connections(self) -> int | None:
        return self.connections.max_total

    @property
    def max_per_peer(self) -> int | None:
        return self.connections.max_per_peer

    @property
    def per_peer(self) -> dict[str, int]:
        return self.connections.per_peer

    def buildProtocol(self, addr: IAddress | None) -> SniffingProtocol | None:
        host = str(getattr(addr, "host", addr))
        over = self.connections.over(host)
        if over is not None:
            self._cap.refuse(*over, addr)
            return None  # the port closes the socket at once
        return SniffingProtocol(self, format_peer(addr), host)

    def opened(self, connection: SniffingProtocol) -> None:
        self.connections.opened(connection, connection.host)

    def closed(self, connection: SniffingProtocol) -> None:
        self.connections.closed(connection)

    def stop(self, grace: float = STOP_GRACE) -> Deferred[None]:
        """Close every open connection; fires once all are gone (within ~``grace`` s)."""
        waits = [connection.stop(grace) for connection in self.connections]
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        if self._stopping_now:
            self.stop_now()
        return d.addCallback(lambda _: None)

    def stop_now(self) -> None:
        """Cut every connection at once, now or as soon as ``stop`` is called.

        A second shutdown signal: the streams' grace would only delay the
        batcher's (also cut) drain.
        """
        self._stopping_now = True
        cut = sum(connection.stop_now() for connection in list(self.connections))
        if cut:
            # (Once per shutdown.)  Says the second signal found senders still
            # open: a record they were in the middle of is lost.
            self.log.info(
                "Cut {count} open TCP connection(s) without the stop grace; a record a stream "
                "was still sending is rejected as incomplete",
                count=cut,
            )


class TCPPortService(AdoptedPortService):
    """Serves an already-bound, listening TCP socket with a ``SniffingFactory``."""

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        factory: SniffingFactory,
        *,
        stop_grace: float = STOP_GRACE,
        endpoint_url: str = "",
    ) -> None:
        super().__init__(reactor, sock)
        self.factory = factory
        self.stop_grace = stop_grace
        self.endpoint_url = endpoint_url

    def adopt(self, sock: socket.socket) -> Any:
        return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.factory)

    def listening(self) -> None:
        if self.endpoint_url:
            self.log.info("HTTP Proxy server using X-Ray Endpoint : {url}", url=self.endpoint_url)
        self.log.info("Starting proxy http server on {address}", address=str(self.address))

    def closed(self) -> Deferred[Any] | None:
        # Open streams may finish the record they are sending.
        return self.factory.stop(self.stop_grace)

    def stop_now(self) -> None:
        """End the stop grace: cut the open connections (now, or when the stop starts)."""
        self.factory.stop_now()
