"""The TCP segment stream: line-framed ``header`` / ``document`` records.

For senders that cannot use UDP: lines alternate ``header`` / ``document``,
judged by the same rules as UDP datagrams, into the same buffer and counters.
When the buffer is full the stream stops reading (TCP backpressure) instead
of dropping; see docs/stream-format.md.  The TCP port
(``xraytwisted.tcpport.sniffing``) hands a connection to ``SegmentStream``
when its first byte is ``{``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from xraytwisted.ingest.core import Ingest, is_header
from xraytwisted.pipeline.buffer import DOC_OVERHEAD

# Seconds a stream may take to finish its current record once the port
# stops, before it is cut off (ingest stops before the batcher drains, so
# this delays the drain by at most this much).
STOP_GRACE = 1.0


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
