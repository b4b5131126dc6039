"""Ingest: bytes from SDKs in, accepted segment documents into the buffer.

``Ingest`` is the one core object behind every transport (UDP datagrams now,
the TCP segment stream too): it applies the header rules, counts, refuses
bad input with a rate-limited warning, and offers good bodies to the buffer.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xraytwisted.buffer import SegmentBuffer
from xraytwisted.header import KNOWN_GOOD_HEADERS, Verdict, split
from xraytwisted.logs import Throttle, printable
from xraytwisted.stats import Counters

_REJECT_MESSAGES = {
    Verdict.MISSING_NEWLINE: "Missing header or segment: {data}",
    Verdict.EMPTY_BODY: "Missing header or segment: {data}",
    Verdict.INVALID_HEADER: "Invalid header: {data}",
}


class Ingest:
    """Header check, counting and buffering for one received record."""

    log = Logger()

    def __init__(
        self,
        buffer: SegmentBuffer,
        counters: Counters,
        clock: IReactorTime,
        warn_interval: float = 10.0,
    ) -> None:
        self.buffer = buffer
        self.counters = counters
        self._clock = clock
        self._throttle = Throttle(clock, warn_interval)

    def datagram(self, data: bytes, addr: object = None) -> bool:
        """One ``header\\nbody`` record; True if its body was accepted.

        ``addr`` (the sender) is unused; it is there so a DatagramProtocol
        can call this directly as its datagramReceived.
        """
        counters = self.counters
        if not counters.received:
            counters.first_received_at = self._clock.seconds()
        counters.received += 1
        counters.received_bytes += len(data)
        newline = data.find(b"\n")
        # Fast path: the exact headers SDKs send, and a non-empty body.
        if 0 < newline < len(data) - 1 and data[:newline] in KNOWN_GOOD_HEADERS:
            body = data[newline + 1 :]
        else:
            verdict, body = split(data)
            if verdict is not Verdict.OK:
                counters.rejected += 1
                self._warn(verdict.value, _REJECT_MESSAGES[verdict], data)
                return False
        if self.buffer.offer(body):
            return True
        self._warn(
            "buffer full",
            "Segment dropped: the buffer of {mb} MB is full. "
            "Consider increasing memory limit (-m/--buffer-memory)",
            None,
            mb=self.buffer.capacity // (1024 * 1024),
        )
        return False

    def _warn(self, reason: str, message: str, data: bytes | None, **extra: object) -> None:
        suppressed = self._throttle.check(reason)
        if suppressed is None:
            return
        if suppressed:
            message += " ({suppressed} more like this suppressed)"
        # Raw input goes in as a format *argument*, escaped and truncated, so
        # a sender can neither inject log lines nor flood the log.
        self.log.warn(
            message,
            data=printable(data) if data is not None else "",
            suppressed=suppressed,
            **extra,
        )
