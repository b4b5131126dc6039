"""The TCP port: one listener, two protocols.

Each connection's first bytes decide what it is (``classify``):

* an HTTP request line (``POST /GetSamplingRules HTTP/1.1``): the
  connection becomes the Site's HTTP channel (the sampling proxy, /health,
  /metrics);
* ``{``: a segment stream (``SegmentStream``), for senders that cannot
  use UDP: lines alternate ``header`` / ``document``, judged by the same
  rules as UDP datagrams, into the same buffer and counters.  When the
  buffer is full the stream stops reading (TCP backpressure) instead of
  dropping; see docs/stream-format.md;
* anything else: closed, and counted as one rejected record.

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
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web.server import Site

from xraytwisted.buffer import DOC_OVERHEAD
from xraytwisted.ingest import Ingest, is_header
from xraytwisted.listening import AdoptedPortService
from xraytwisted.sockets import Address

# Longest HTTP method token we wait for before deciding (RFC 9110's
# methods have at most 7 letters, WebDAV's at most 11).
MAX_METHOD = 16
# Seconds a stream may take to finish its current record once the port
# stops, before it is cut off (ingest stops before the batcher drains, so
# this delays the drain by at most this much).
STOP_GRACE = 1.0


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


def format_peer(address: IAddress | None) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return str(Address(str(host), int(port)))


def abort_connection(transport: ITransport) -> None:
    """Drop a connection now, without waiting for buffered writes."""
    abort = getattr(transport, "abortConnection", None)
    if abort is not None:
        abort()
    else:  # pragma: no cover - every stream transport can abort
        transport.loseConnection()


class SegmentStream(LineReceiver):
    """A line-framed segment stream: ``header\\n`` ``document\\n``, repeated.

    A line where a header belongs that is not a valid header is rejected;
    if the line after it is a valid header, that starts the next record,
    otherwise it is taken as the bad record's document.  So a sender that
    gets out of step (say, a document with a raw newline in it) is back in
    step at its next header, and a bad header costs one rejection, as a bad
    datagram would.  A trailing ``\\r`` (CRLF framing) is removed from
    every line.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(self, ingest: Ingest, max_line: int, clock: IReactorTime, peer: str = "") -> None:
        self.ingest = ingest
        self.buffer = ingest.buffer
        self.MAX_LENGTH = max_line
        self.peer = peer
        self._clock = clock
        self._header: bytes | None = None  # a valid header, waiting for its document line
        self._bad: bytes | None = None  # a line where a header belonged that is not one
        self._pending: bytes | None = None  # an accepted document waiting for buffer room
        self._scanned = 0  # bytes at the start of _buffer known to hold no newline
        self._stopping = False  # the port is stopping: close at the next record boundary
        self._final = False  # the connection is gone: nothing may wait any more
        self._closed_by_us = False
        self._give_up: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []

    # -- reading -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # LineReceiver's own loop copies the rest of the buffer for every
        # line it takes off (quadratic in lines per read); this one slices.
        if self._busyReceiving:
            self._buffer += data
            return
        if self._closed_by_us:
            return  # what a sender writes after we closed is not read
        buf = self._buffer + data if self._buffer else data
        self._buffer = b""
        start = self._scanned
        pos = 0
        max_length = self.MAX_LENGTH
        self._busyReceiving = True
        try:
            while not self.paused:
                end = buf.find(b"\n", start)
                if end < 0:
                    break
                if end - pos > max_length:
                    self.lineLengthExceeded(buf[pos:end])
                    return
                line = buf[pos:end]
                pos = start = end + 1
                self.lineReceived(line)
            rest = buf[pos:] if pos else buf
            if not self.paused and len(rest) > max_length:
                self.lineLengthExceeded(rest)
                return
            self._scanned = 0 if self.paused else len(rest)
            # (data that arrived re-entrantly goes after what is left here)
            self._buffer = rest + self._buffer
        finally:
            self._busyReceiving = False
        if self._stopping:
            self._close_if_between_records()

    def lineReceived(self, line: bytes) -> None:
        if line[-1:] == b"\r":
            line = line[:-1]
        header = self._header
        if header is not None:
            self._header = None
            body = self.ingest.pair(header, line, True)
            if body is not None:
                self._store(body)
            return
        ok = is_header(line)
        bad = self._bad
        if bad is not None:
            self._bad = None
            if ok:
                self.ingest.invalid_header(bad)
                self._header = line
            else:
                self.ingest.pair(bad, line, False)
        elif ok:
            self._header = line
        else:
            self._bad = line

    def lineLengthExceeded(self, line: bytes) -> None:
        # The over-long line is the document of a waiting header, if any:
        # one record, one rejection.
        header, self._header = self._header, None
        self.ingest.reject(
            "line too long",
            "Closing segment stream from {peer}: a line is longer than {limit} bytes "
            "(raise Socket.StreamMaxLineKB if such segments are expected): {data}",
            line if header is None else header + b"\n" + line,
            peer=self.peer,
            limit=self.MAX_LENGTH,
        )
        self._scanned = 0
        self._close(abort=False)

    # -- buffering and backpressure -------------------------------------------

    def _store(self, body: bytes) -> None:
        buffer = self.buffer
        if buffer.has_room(len(body)):
            buffer.offer(body)
        elif self._final or len(body) + DOC_OVERHEAD > buffer.capacity:
            # Nothing to wait for (the connection is gone, or the document
            # could never fit): dropped and counted, like a datagram.
            self.ingest.offer(body)
        else:
            # Stop reading until uploads give budget back; the sender's
            # socket buffer fills and its writes block: nothing is dropped.
            self._pending = body
            self.pauseProducing()
            buffer.notify_when_space(self._space_freed)

    def _space_freed(self) -> None:
        body = self._pending
        if body is None or self._final:
            return
        if not self.buffer.has_room(len(body)):
            self.buffer.notify_when_space(self._space_freed)
            return
        self._pending = None
        self.buffer.offer(body)
        self.resumeProducing()  # reads the lines already here, then the socket

    # -- closing ---------------------------------------------------------------

    def stop(self, grace: float) -> Deferred[None]:
        """Close once the record in progress is complete (at most ``grace`` seconds)."""
        lost = self.when_lost()
        if self._final:
            return lost
        self._stopping = True
        if not self._close_if_between_records() and self._give_up is None:
            self._give_up = self._clock.callLater(grace, self._close, True)
        return lost

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._final:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def _close_if_between_records(self) -> bool:
        if self._pending is None and self._header is None and not self._buffer:
            self._close(abort=False)
            return True
        return False

    def _close(self, abort: bool) -> None:
        give_up, self._give_up = self._give_up, None
        if give_up is not None and give_up.active():
            give_up.cancel()
        if self._final or self.transport is None:
            return
        self._closed_by_us = True
        if abort:
            abort_connection(self.transport)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._final = True
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        self._give_up = None
        self.buffer.cancel_notify(self._space_freed)
        self.paused = False
        pending, self._pending = self._pending, None
        if pending is not None:
            self._store(pending)
        # Every complete line read is the sender's data: account for it.
        rest = self.clearLineBuffer()
        self._scanned = 0
        if rest:
            *lines, partial = rest.split(b"\n")
            for line in lines:
                if len(line) > self.MAX_LENGTH:
                    self.ingest.reject(
                        "line too long",
                        "Segment stream from {peer}: a line is longer than {limit} bytes: {data}",
                        line,
                        peer=self.peer,
                        limit=self.MAX_LENGTH,
                    )
                else:
                    self.lineReceived(line)
            if partial:
                # A sender that closes cleanly may leave the last newline out.
                if reason.check(ConnectionDone) and not self._closed_by_us:
                    self.lineReceived(partial)
                else:
                    # The cut line belongs to the record in progress: one rejection.
                    before = self._header if self._header is not None else self._bad
                    self._header = self._bad = None
                    self.ingest.reject(
                        "incomplete record",
                        "Segment stream from {peer} closed in the middle of a line: {data}",
                        partial if before is None else before + b"\n" + partial,
                        peer=self.peer,
                    )
        header, self._header = self._header, None
        if header is not None:
            self.ingest.pair(header, b"", True)  # a header without its document
        bad, self._bad = self._bad, None
        if bad is not None:
            self.ingest.invalid_header(bad)
        waiters, self._lost = self._lost, []
        for d in waiters:
            d.callback(None)


class SniffingProtocol(Protocol):
    """Buffers a connection's first bytes, then hands it to HTTP or the segment stream."""

    def __init__(self, factory: SniffingFactory, peer: str) -> None:
        self.factory = factory
        self.peer = peer
        self.kind: Kind | None = None
        self.inner: Protocol | None = None
        self._head = b""
        self._timer: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []
        self._gone = False

    def connectionMade(self) -> None:
        self.factory.connections.add(self)
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
            stream = SegmentStream(factory.ingest, factory.max_line, factory.clock, self.peer)
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
            self._timer = self.factory.clock.callLater(grace, self._abort)
        return lost

    def _abort(self) -> None:
        self._timer = None
        if not self._gone and self.transport is not None:
            abort_connection(self.transport)

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._gone:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        self._cancel_timer()
        self.factory.connections.discard(self)
        if self.inner is not None:
            self.inner.connectionLost(reason)
        waiters, self._lost = self._lost, []
        for d in waiters:
            d.callback(None)


class SniffingFactory(Factory):
    """Builds a ``SniffingProtocol`` per connection of the TCP port."""

    noisy = False  # no "Starting factory" lines

    def __init__(
        self,
        ingest: Ingest,
        site: Site,
        max_line: int,
        clock: IReactorTime,
        *,
        sniff_timeout: float | None = None,
    ) -> None:
        self.ingest = ingest
        self.site = site
        self.max_line = max_line
        self.clock = clock
        # A connection that sends nothing is dropped after the HTTP idle timeout.
        self.sniff_timeout = site.timeOut if sniff_timeout is None else sniff_timeout
        self.connections: set[SniffingProtocol] = set()

    def buildProtocol(self, addr: IAddress | None) -> SniffingProtocol:
        return SniffingProtocol(self, format_peer(addr))

    def stop(self, grace: float = STOP_GRACE) -> Deferred[None]:
        """Close every open connection; fires once all are gone (within ~``grace`` s)."""
        waits = [connection.stop(grace) for connection in list(self.connections)]
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)


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
