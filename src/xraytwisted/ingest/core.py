"""Ingest: bytes from SDKs in, accepted segment documents into the buffer.

``Ingest`` is the one core object behind every transport (UDP datagrams now,
the TCP segment stream too): it applies the header rules, counts, refuses
bad input with a rate-limited warning, and offers good bodies to the buffer.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xraytwisted.ingest.header import KNOWN_GOOD_HEADERS, Verdict, header_is_valid, split
from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle, printable
from xraytwisted.pipeline.buffer import SegmentBuffer

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

        ``addr`` is the sender, named in warnings about bad input; the
        signature lets a DatagramProtocol use this as its datagramReceived.
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
                self._warn(verdict.value, _REJECT_MESSAGES[verdict], data, sender=addr)
                return False
        if self.buffer.offer(body):
            return True
        self._buffer_full()
        return False

    # -- the TCP segment stream: one record is a header line and a body line --

    def pair(self, header: bytes, body: bytes, header_ok: bool | None = None) -> bytes | None:
        """Count and check one stream record; the body to buffer, or None if rejected.

        The record is judged exactly like the datagram ``header\\nbody`` (same
        counters, same rate-limited warnings).  ``header_ok`` is the caller's
        verdict on ``header`` if it already has one.  The caller offers the
        body with ``offer`` (or waits for room first: backpressure).
        """
        counters = self.counters
        if not counters.received:
            counters.first_received_at = self._clock.seconds()
        counters.received += 1
        counters.received_bytes += len(header) + 1 + len(body)
        if header_ok is None:
            header_ok = is_header(header)
        if header_ok and body:
            return body
        verdict = Verdict.EMPTY_BODY if header_ok else Verdict.INVALID_HEADER
        counters.rejected += 1
        self._warn(verdict.value, _REJECT_MESSAGES[verdict], header + b"\n" + body)
        return None

    def invalid_header(self, line: bytes) -> None:
        """Count a lone line where a header belonged as one rejected record."""
        self.reject(Verdict.INVALID_HEADER.value, _REJECT_MESSAGES[Verdict.INVALID_HEADER], line)

    def reject(self, reason: str, message: str, data: bytes, **extra: object) -> None:
        """Count ``data`` as one received and rejected record, with a rate-limited warning.

        For input that is not a record at all (a line that is no header, an
        over-long line, junk on the TCP port).  ``reason`` must come from a
        small fixed set; ``message`` is a format string whose ``{data}`` is
        the escaped input.
        """
        counters = self.counters
        if not counters.received:
            counters.first_received_at = self._clock.seconds()
        counters.received += 1
        counters.received_bytes += len(data)
        counters.rejected += 1
        self._warn(reason, message, data, **extra)

    def offer(self, body: bytes) -> bool:
        """Offer an accepted body to the buffer; False if it was dropped (counted, warned)."""
        if self.buffer.offer(body):
            return True
        self._buffer_full()
        return False

    def _buffer_full(self) -> None:
        if self.buffer.refused_lost:
            return  # counted as lost, and said so, by the batcher: one line per event
        self._warn(
            "buffer full",
            "Segment dropped: the buffer of {mb} MB is full. "
            "Consider increasing memory limit (-m/--buffer-memory)",
            None,
            mb=self.buffer.capacity // (1024 * 1024),
        )

    def _warn(
        self,
        reason: str,
        message: str,
        data: bytes | None,
        sender: object = None,
        **extra: object,
    ) -> None:
        suppressed = self._throttle.check(reason)
        if suppressed is None:
            return
        if isinstance(sender, tuple) and len(sender) >= 2:
            message += " (from {sender})"
            host, port = sender[0], sender[1]
            extra["sender"] = f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
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


def is_header(line: bytes) -> bool:
    """Whether ``line`` is a valid segment header (the Go daemon's rules)."""
    return line in KNOWN_GOOD_HEADERS or header_is_valid(line)
