"""UDP ingest: the DatagramProtocol SDKs send segments to, and its service.

Reading is coalesced.  When the socket turns readable after a quiet spell,
everything waiting is read at once (so a lone segment is not delayed); then
the socket is left alone and read again from a timer for as long as
datagrams keep coming, and only a read that finds nothing for a while hands
the socket back to the reactor's epoll.  Each event-loop wakeup costs more
CPU than a segment (measured at 85-300 us on a small VM), and the kernel
receive buffer (16 MiB asked by default) holds what arrives meanwhile.

How long to leave the socket alone (``Socket.UDPReadIntervalMS`` is the
shortest pause, 20 ms by default):

* **adaptive** (the default): from the measured arrival rate, the next read
  comes when the open batch is expected to be full - there is nothing to
  gain from reading more often, since a batch leaves when it is full or at
  its deadline - but never after the open batch's deadline (1 s after its
  oldest segment arrived: the read comes just before the batcher sends
  it), never later than it takes the current rate to fill half the
  kernel receive buffer, and, right after a quiet spell, no longer than
  the traffic has been watched (20 ms, 20, 40, 80 ...), so a burst cannot
  overflow the buffer while the rate is still unknown.  At 100
  segments/s that is one read per batch of 50 (every 0.5 s) instead of 25;
  at 10/s one per second; from 2 500/s up every 20 ms.
* **fixed** (``Socket.UDPReadAdaptive: false``): every interval while
  datagrams keep coming; 0 reads on every event-loop turn while busy.

Either way a segment that waited in the kernel has its batch deadline
counted from the read before (``SegmentBuffer.arrived_since``), so a
segment still leaves at most 1 s after it arrived.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from xraytwisted.ingest.core import Ingest
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.bind import describe_receive_buffer, receive_buffer_size
from xraytwisted.pipeline.buffer import SegmentBuffer

# Twisted reads datagrams into buffers of 8192 bytes by default and silently
# truncates longer ones; segments can be up to 64 KiB.
MAX_DATAGRAM = 65536
# Seconds between reads while datagrams keep coming (Socket.UDPReadIntervalMS):
# the fixed interval, or the shortest pause of the adaptive one.
READ_INTERVAL = 0.02
READ_LIMIT = 2000  # datagrams per read, so timers and uploads are not starved
MAX_WAIT = 1.0  # the batcher's deadline (pipeline.batcher.MAX_WAIT)
# Adaptive reads.
RAMP_START = 0.02  # the first pause after a quiet spell (at least the floor)
QUIET = 0.1  # an empty read this long after the last datagrams: back to epoll
RATE_TAU = 1.0  # seconds over which the arrival rate is averaged
FILL_MARGIN = 2  # datagrams more than the open batch needs, per read
BUFFER_SHARE = 0.5  # of the kernel receive buffer the current rate may fill between reads
# A read due at a batch deadline is timed this much before it, so the
# reactor runs it first and the batcher's timer (same wakeup) sends the
# batch with what it read.
EARLY = 1e-5


def kernel_charge(nbytes: int) -> int:
    """About what one datagram of ``nbytes`` costs of a socket's receive buffer.

    Linux charges the buffer the skb's truesize: measured on loopback, 832
    bytes for a 100-byte datagram, 2 304 for 1 KiB, 8 456 for 4 000.
    """
    return 2 * nbytes + 768


class UDPIngest(DatagramProtocol):
    noisy = False  # no "Starting protocol" lines

    def __init__(self, ingest: Ingest) -> None:
        # The port calls datagramReceived(data, addr) for every segment; going
        # straight to the ingest core saves a Python call on the hot path.
        self.datagramReceived = ingest.datagram  # type: ignore[method-assign,assignment]


@implementer(IReadDescriptor)
class DatagramSocket:
    """The UDP socket bound at startup, watched through the reactor's public FD set.

    Twisted's own datagram port reads one datagram per readable event; the
    coalescing reader needs to decide itself when to read and when to ask
    the reactor to watch the socket again.  Instead of replacing the doRead
    of an adopted Twisted port, the daemon owns the socket and registers this
    descriptor with ``IReactorFDSet.addReader``/``removeReader``.
    """

    def __init__(self, reactor: Any, sock: socket.socket, protocol: DatagramProtocol) -> None:
        sock.setblocking(False)
        self._reactor = reactor
        self.socket = sock
        self.protocol = protocol
        self.reading = False

    def fileno(self) -> int:
        return self.socket.fileno()

    def logPrefix(self) -> str:
        return "UDPIngest"

    def doRead(self) -> None:
        """Replaced by the CoalescingReader that reads this socket."""

    def connectionLost(self, reason: Failure) -> None:
        # The reactor gives up on a descriptor it cannot watch any more.
        self.reading = False
        self.socket.close()

    def startReading(self) -> None:
        if not self.reading and self.socket.fileno() >= 0:
            self._reactor.addReader(self)
            self.reading = True

    def stopReading(self) -> None:
        if self.reading:
            self._reactor.removeReader(self)
            self.reading = False

    def stopListening(self) -> None:
        self.stopReading()
        self.socket.close()


class CoalescingReader:
    """Reads a UDP port in bursts: on the first datagram, then on a timer while busy."""

    log = Logger()

    def __init__(
        self,
        clock: Any,
        port: Any,
        interval: float = READ_INTERVAL,
        *,
        adaptive: bool = False,
        buffer: SegmentBuffer | None = None,
        max_wait: float = MAX_WAIT,
        receive_buffer: int = 0,
        on_readable: Callable[[], object] | None = None,
    ) -> None:
        self._clock = clock
        self._on_readable = on_readable  # told when datagrams come after a quiet spell
        self._port = port
        self._recvfrom = port.socket.recvfrom
        self._accept = port.protocol.datagramReceived
        self.interval = interval
        self.adaptive = adaptive
        self._buffer = buffer
        self.max_wait = max_wait
        self.receive_buffer = receive_buffer  # bytes, as the kernel reports it (0: unknown)
        self._timer: Any = None
        self._last_read = 0.0  # when the socket was last read empty
        self._last_data = 0.0  # when a read last found datagrams
        self._busy_since = 0.0  # when it last turned readable after a quiet spell
        self.rate = 0.0  # datagrams per second, averaged over about RATE_TAU
        self._bytes = 0  # read by the current read()
        self._charge = kernel_charge(1024)  # receive-buffer bytes per datagram, last read
        # The reactor calls the port's doRead when the socket turns readable.
        port.doRead = self.readable

    def readable(self) -> None:
        # More datagrams are usually on the way: read what is here, then stop
        # watching the socket and come back on a timer.
        now = self._clock.seconds()
        quiet = now - self._last_read
        count = self.read(READ_LIMIT)
        self._port.stopReading()
        self._busy_since = self._last_read = self._last_data = now
        self.rate *= math.exp(-quiet / RATE_TAU)
        self._schedule(now, self._pause(now, count, 0.0))
        if self._on_readable is not None:
            self._on_readable()

    def _tick(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        since, self._last_read = self._last_read, now
        count = self.read(READ_LIMIT, since)
        if count:
            self._last_data = now
        elif not self.adaptive or now - self._last_data >= QUIET:
            self._port.startReading()  # quiet: let the kernel wake us again
            return
        self._schedule(now, self._pause(now, count, now - since))

    def _schedule(self, now: float, pause: float) -> None:
        # ``pause`` counts from ``now``, before the read: reading took time,
        # and a read timed just before a batch deadline must stay before it.
        late = self._clock.seconds() - now
        delay = max(0.0, pause - late) if late > 0 else pause
        self._timer = self._clock.callLater(delay, self._tick)

    def _pause(self, now: float, count: int, elapsed: float) -> float:
        """Seconds until the next read, after reading ``count`` datagrams."""
        if count >= READ_LIMIT:
            return 0.0  # more waiting
        if not self.adaptive:
            return self.interval
        rate = self.rate
        if elapsed > 0:
            seen = count / elapsed
            self.rate = rate = rate + (1 - math.exp(-elapsed / RATE_TAU)) * (seen - rate)
            rate = max(rate, seen)  # a rise counts at once, a fall slowly
        # Until the traffic has been watched for a while, its rate is a guess.
        pause = min(self.max_wait, max(RAMP_START, now - self._busy_since))
        buffer = self._buffer
        if buffer is not None:
            batch, size = buffer.open_batch, buffer.batch_size
            if batch is not None and batch.started + self.max_wait > now + EARLY:
                deadline, room = batch.started + self.max_wait, size - len(batch)
            else:  # none open, or it leaves now: what comes next opens one
                deadline, room = now + self.max_wait, size
            pause = min(pause, deadline - EARLY - now)
            if rate > 0:
                # A couple more than the batch needs, so that jitter does not
                # leave it one short; and a read for the last few documents
                # of a batch would cost a wakeup for little: then wait for
                # one more batch.
                wanted = room + FILL_MARGIN if 2 * room >= size else room + size
                pause = min(pause, wanted / rate)
        if rate > 0 and self.receive_buffer:
            pause = min(pause, BUFFER_SHARE * self.receive_buffer / (rate * self._charge))
        return max(self.interval, pause)

    def read(self, limit: int, since: float | None = None) -> int:
        """Read up to ``limit`` datagrams that are waiting; how many were read.

        ``since``: the datagrams arrived after this time (the last read);
        None: just now.
        """
        buffer = self._buffer
        if buffer is not None:
            buffer.arrived_since = since
        try:
            count = self._read(limit)
        finally:
            if buffer is not None:
                buffer.arrived_since = None
        if count:
            self._charge = kernel_charge(self._bytes // count)
        return count

    def _read(self, limit: int) -> int:
        recvfrom, accept = self._recvfrom, self._accept
        nbytes = 0
        try:
            for count in range(limit):
                try:
                    data, addr = recvfrom(MAX_DATAGRAM)
                except BlockingIOError:
                    return count
                except OSError as e:
                    # E.g. an ICMP error queued on the socket: nothing was read.
                    self.log.debug("UDP receive error: {error}", error=e)
                    return count
                nbytes += len(data)
                try:
                    accept(data, addr)
                except Exception:
                    self.log.failure("Error while handling a datagram")
            return limit
        finally:
            self._bytes = nbytes

    def stop(self) -> int:
        """Stop the timer and read whatever is still waiting; how many datagrams."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.read(100_000, self._last_read)


class UDPIngestService(AdoptedPortService):
    """Serves an already-bound UDP socket; drains it before closing on stop."""

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        ingest: Ingest,
        read_interval: float = READ_INTERVAL,
        asked_receive_buffer: int = 0,
        adaptive: bool = True,
    ) -> None:
        super().__init__(reactor, sock)
        self.protocol = UDPIngest(ingest)
        self.buffer = ingest.buffer
        self.read_interval = read_interval
        self.asked_receive_buffer = asked_receive_buffer  # bytes; 0 = the OS default
        self.adaptive = adaptive
        self.reader: CoalescingReader | None = None
        self.receive_buffer = 0
        # Called when datagrams come after a quiet spell (set before starting).
        self.on_readable: Callable[[], object] | None = None

    def adopt(self, sock: socket.socket) -> Any:
        # A duplicate: the service closes the socket it was given once adopted.
        port = DatagramSocket(self._reactor, sock.dup(), self.protocol)
        self.receive_buffer = receive_buffer_size(sock)
        self.reader = CoalescingReader(
            self._reactor,
            port,
            self.read_interval,
            adaptive=self.adaptive,
            buffer=self.buffer,
            receive_buffer=self.receive_buffer,
            on_readable=self.on_readable,
        )
        port.startReading()
        return port

    def listening(self) -> None:
        self.log.info(
            "Listening on UDP {address} ({buffer})",
            address=str(self.address),
            buffer=describe_receive_buffer(self.asked_receive_buffer, self.receive_buffer),
        )

    def closing(self, port: Any) -> None:
        # Datagrams already in the kernel buffer were sent before we were
        # told to stop: take them in too, so they are uploaded with the rest.
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
