"""The TCP segment stream: line-framed ``header`` / ``document`` records.

For senders that cannot use UDP: lines alternate ``header`` / ``document``,
judged by the same rules as UDP datagrams, into the same buffer and counters.
When the buffer is full the stream stops reading (TCP backpressure) instead
of dropping; see docs/stream-format.md.  The TCP port
(``xraytwisted.tcpport.sniffing``) hands a connection to ``SegmentStream``
when its first byte is ``{``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITransport
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from xraytwisted.ingest.core import Ingest, is_header
from xraytwisted.listen.held import HeldBytes
from xraytwisted.pipeline.buffer import DOC_OVERHEAD

# Bytes of whole lines handed to LineReceiver at a time (see _feed).
PIECE = 4096

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


class SegmentStream(LineReceiver, TimeoutMixin):
    """A line-framed segment stream: ``header\\n`` ``document\\n``, repeated.

    A line where a header belongs that is not a valid header is rejected;
    if the line after it is a valid header, that starts the next record,
    otherwise it is taken as the bad record's document.  So a sender that
    gets out of step (say, a document with a raw newline in it) is back in
    step at its next header, and a bad header costs one rejection, as a bad
    datagram would.  A trailing ``\\r`` (CRLF framing) is removed from
    every line.

    A stream that sends nothing for ``idle_timeout`` seconds is closed
    (not while it waits for buffer room: then the daemon is the one not
    reading).  Every byte read and not yet accepted - the unfinished line,
    lines waiting while the buffer is full, the document waiting for room -
    is charged to ``hold``, the TCP port's shared budget; a stream holding
    bytes when that budget is spent stops being read until it frees up.
    """

    delimiter = b"\n"
    log = Logger()

    def __init__(
        self,
        ingest: Ingest,
        max_line: int,
        clock: IReactorTime,
        peer: str = "",
        *,
        idle_timeout: float | None = None,
        hold: HeldBytes | None = None,
    ) -> None:
        self.ingest = ingest
        self.buffer = ingest.buffer
        self.MAX_LENGTH = max_line
        self.peer = peer
        self._clock = clock
        self._idle = idle_timeout or None
        self._hold = hold if hold is not None else HeldBytes(2**62, clock)
        self._buffered = 0  # bytes read and not yet taken off as lines
        self._partial: list[bytes] = []  # the unfinished line (while LineReceiver is not paused)
        self._partial_size = 0
        self._held = 0  # bytes of this stream charged to _hold
        self._hold_paused = False  # not read until _hold has room again
        self._header: bytes | None = None  # a valid header, waiting for its document line
        self._bad: bytes | None = None  # a line where a header belonged that is not one
        self._pending: bytes | None = None  # an accepted document waiting for buffer room
        self._stopping = False  # the port is stopping: close at the next record boundary
        self._final = False  # the connection is gone: nothing may wait any more
        self._closed_by_us = False
        self._give_up: IDelayedCall | None = None
        self._lost: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.setTimeout(self._idle)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        # TimeoutMixin's idle timer runs on our clock, not the global reactor.
        return self._clock.callLater(period, func)

    # -- reading -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closed_by_us:
            return  # what a sender writes after we closed is not read
        if data:
            self.resetTimeout()
            self._buffered += len(data)
        if self.paused or not data:
            # Paused: LineReceiver keeps the data until resumeProducing, which
            # calls this with b"" to work through it.
            super().dataReceived(data)
            if not (self.paused or self._closed_by_us):
                self._keep_partial(self.clearLineBuffer())
        else:
            self._feed(data)
        self._settle_hold()
        if self._stopping:
            self._close_if_between_records()

    def _feed(self, data: bytes) -> None:
        # LineReceiver copies what is left of its buffer for every line it
        # takes off, and re-scans and copies an unfinished line on every read
        # (quadratic): it gets at most about PIECE bytes of whole lines at a
        # time, and the unfinished line stays here as a list of reads.
        end = data.find(b"\n")
        if end < 0:
            self._keep_partial(data)
            return
        start = 0
        partial = self._partial
        if partial:
            self._partial, self._partial_size = [], 0
            partial.append(data[: end + 1])
            super().dataReceived(b"".join(partial))
            start = end + 1
        size = len(data)
        while start < size and not (self.paused or self._closed_by_us):
            end = data.rfind(b"\n", start, start + PIECE)
            if end < 0:
                end = data.find(b"\n", start + PIECE)
                if end < 0:
                    self._keep_partial(data[start:])
                    return
            super().dataReceived(data[start : end + 1] if start or end + 1 < size else data)
            start = end + 1
        if start < size and not self._closed_by_us:
            super().dataReceived(data[start:])  # paused: LineReceiver keeps it

    def _keep_partial(self, data: bytes) -> None:
        if not data:
            return
        self._partial.append(data)
        self._partial_size += len(data)
        if self._partial_size > self.MAX_LENGTH:
            line = b"".join(self._partial)
            self._partial, self._partial_size = [], 0
            self.lineLengthExceeded(line)

    def lineReceived(self, line: bytes) -> None:
        self._buffered -= len(line) + 1
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
        self._buffered = 0  # nothing more of this stream is read
        self._close(abort=False)

    def timeoutConnection(self) -> None:
        self.log.debug(
            "Closing segment stream from {peer}: nothing received for {idle:g} seconds "
            "(Socket.StreamIdleTimeoutSeconds)",
            peer=self.peer,
            idle=self._idle or 0,
        )
        self._close(abort=False)

    # -- the TCP port's hold budget ------------------------------------------

    def _settle_hold(self) -> None:
        """Charge ``hold`` with what this stream holds now; stop reading if it is spent."""
        held = 0 if self._final else self._buffered + len(self._pending or b"")
        change = held - self._held
        if change:
            self._held = held
            if change > 0:
                self._hold.charge(change)
            else:
                self._hold.release(-change)
        if held and not self._hold_paused and self._hold.over():
            # Other connections hold the rest of the budget: stop reading
            # this one (its idle timer keeps running) until they give back.
            self._hold_paused = True
            self._pause_transport()
            self._hold.notify_when_free(self._hold_freed)

    def _pause_transport(self) -> None:
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _hold_freed(self) -> None:
        if not self._hold_paused or self._final:
            return
        if self._hold.over():
            self._hold.notify_when_free(self._hold_freed)
            return
        self._hold_paused = False
        if not self.paused and self.transport is not None:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

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
            # Not idle meanwhile: it is the daemon that is not reading.
            self._pending = body
            self.pauseProducing()
            self.setTimeout(None)
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
        self.setTimeout(self._idle)
        self.resumeProducing()  # reads the lines already here, then the socket
        if self._hold_paused and not self._final:
            self._pause_transport()  # resumeProducing started it again
        self._settle_hold()

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

    def stop_now(self) -> None:
        """Cut the connection at once (a second shutdown signal ends the grace).

        What was read and is complete is still taken in (``connectionLost``).
        """
        self._stopping = True
        self._close(abort=True)

    def when_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self._final:
            d.callback(None)
        else:
            self._lost.append(d)
        return d

    def _close_if_between_records(self) -> bool:
        # Nothing held: no unfinished line, no lines or document waiting.
        if self._pending is None and self._header is None and not self._buffered:
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
        self.setTimeout(None)
        if abort:
            abort_connection(self.transport)
        else:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._final = True
        self.setTimeout(None)
        if self._give_up is not None and self._give_up.active():
            self._give_up.cancel()
        self._give_up = None
        self.buffer.cancel_notify(self._space_freed)
        self._hold.cancel_notify(self._hold_freed)
        self.paused = False
        pending, self._pending = self._pending, None
        if pending is not None:
            self._store(pending)
        # Every complete line read is the sender's data: account for it.
        rest = self.clearLineBuffer() + b"".join(self._partial)
        self._partial, self._partial_size = [], 0
        self._settle_hold()  # (_final: nothing is held any more)
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
        self._buffered = 0
        waiters, self._lost = self._lost, []
        for d in waiters:
            d.callback(None)
