"""UDP ingest: the DatagramProtocol SDKs send segments to, and its service.

Reading is coalesced: when the socket becomes readable, everything waiting
is read, then the socket is left alone for ``READ_INTERVAL`` and read again
from a timer, for as long as datagrams keep coming; only an empty read
hands the socket back to the reactor's epoll.  At 1 000 segments/s this
turns about a thousand reactor wakeups a second (each costing more than
the segment itself: measured at 150-300 us of CPU per wakeup on a small VM)
into fifty timer ticks of twenty datagrams, for at most 20 ms of added
latency while segments already wait up to 1 s to fill a batch; the kernel
receive buffer (16 MiB asked by default) holds a 20 ms pause even at 40 000/s.
The first datagram after a quiet spell is read at once, so a lone segment
is not delayed.  ``Socket.UDPReadIntervalMS`` sets the interval; 0 reads on
every reactor iteration while busy (lowest latency, most CPU).
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from xraytwisted.ingest.core import Ingest
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.bind import receive_buffer_size

# Twisted reads datagrams into buffers of 8192 bytes by default and silently
# truncates longer ones; segments can be up to 64 KiB.
MAX_DATAGRAM = 65536
# Seconds between reads while datagrams keep coming (Socket.UDPReadIntervalMS).
READ_INTERVAL = 0.02
READ_LIMIT = 2000  # datagrams per read, so timers and uploads are not starved


class UDPIngest(DatagramProtocol):
    noisy = False  # no "Starting protocol" lines

    def __init__(self, ingest: Ingest) -> None:
        # The port calls datagramReceived(data, addr) for every segment; going
        # straight to the ingest core saves a Python call on the hot path.
        self.datagramReceived = ingest.datagram  # type: ignore[method-assign,assignment]


class CoalescingReader:
    """Reads a UDP port in bursts: on the first datagram, then on a timer while busy."""

    log = Logger()

    def __init__(self, clock: Any, port: Any, interval: float = READ_INTERVAL) -> None:
        self._clock = clock
        self._port = port
        self._recvfrom = port.socket.recvfrom
        self._accept = port.protocol.datagramReceived
        self.interval = interval
        self._timer: Any = None
        # The reactor calls the port's doRead when the socket turns readable.
        port.doRead = self.readable

    def readable(self) -> None:
        # More datagrams are usually on the way: read what is here, then stop
        # watching the socket and come back on a timer.
        count = self.read(READ_LIMIT)
        self._port.stopReading()
        # Go on at once only if the read stopped at its limit: otherwise the
        # socket is empty now, and reading it again at once costs a wakeup
        # for nothing (and leaves coalescing to chance).
        self._schedule(0 if count >= READ_LIMIT else self.interval)

    def _tick(self) -> None:
        self._timer = None
        count = self.read(READ_LIMIT)
        if count:
            self._schedule(0 if count >= READ_LIMIT else self.interval)
        else:
            self._port.startReading()  # quiet: let the kernel wake us again

    def _schedule(self, delay: float) -> None:
        self._timer = self._clock.callLater(delay, self._tick)

    def read(self, limit: int) -> int:
        """Read up to ``limit`` datagrams that are waiting; how many were read."""
        recvfrom, accept = self._recvfrom, self._accept
        for count in range(limit):
            try:
                data, addr = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return count
            except OSError as e:
                # E.g. an ICMP error queued on the socket: nothing was read.
                self.log.debug("UDP receive error: {error}", error=e)
                return count
            try:
                accept(data, addr)
            except Exception:
                self.log.failure("Error while handling a datagram")
        return limit

    def stop(self) -> int:
        """Stop the timer and read whatever is still waiting; how many datagrams."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        return self.read(100_000)


class UDPIngestService(AdoptedPortService):
    """Serves an already-bound UDP socket; drains it before closing on stop."""

    def __init__(
        self,
        reactor: Any,
        sock: socket.socket,
        ingest: Ingest,
        read_interval: float = READ_INTERVAL,
    ) -> None:
        super().__init__(reactor, sock)
        self.protocol = UDPIngest(ingest)
        self.read_interval = read_interval
        self.reader: CoalescingReader | None = None
        self.receive_buffer = 0

    def adopt(self, sock: socket.socket) -> Any:
        port = self._reactor.adoptDatagramPort(
            sock.fileno(), sock.family, self.protocol, maxPacketSize=MAX_DATAGRAM
        )
        self.reader = CoalescingReader(self._reactor, port, self.read_interval)
        self.receive_buffer = receive_buffer_size(sock)
        return port

    def listening(self) -> None:
        self.log.info(
            "Listening on UDP {address} (kernel receive buffer {kb} KiB)",
            address=str(self.address),
            kb=self.receive_buffer // 1024,
        )

    def closing(self, port: Any) -> None:
        # Datagrams already in the kernel buffer were sent before we were
        # told to stop: take them in too, so they are uploaded with the rest.
        if self.reader is not None:
            self.reader.stop()
            self.reader = None
