"""Ingest core and the UDP listener (real loopback sockets)."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from xraytwisted.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.ingest import Ingest
from xraytwisted.ingest.udp import MAX_DATAGRAM, UDPIngestService
from xraytwisted.sockets import Address, bind_udp
from xraytwisted.stats import Counters

HEADER = b'{"format":"json","version":1}\n'


class CollectingBuffer(SegmentBuffer):
    """A real buffer that also remembers what it accepted."""

    def __init__(self, capacity: int, clock: Clock | object, counters: Counters) -> None:
        super().__init__(capacity, clock, counters)  # type: ignore[arg-type]
        self.accepted: list[bytes] = []

    def offer(self, doc: bytes) -> bool:
        ok = super().offer(doc)
        if ok:
            self.accepted.append(doc)
        return ok


class IngestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = Counters()
        self.buffer = CollectingBuffer(10_000_000, self.clock, self.counters)
        self.ingest = Ingest(self.buffer, self.counters, self.clock, warn_interval=10)

    def test_counts_and_accepts(self) -> None:
        datagrams = [
            HEADER + b'{"id":"a"}',
            b'{"format": "json", "version": 1}\n{"id":"b"}',
            b'{"FORMAT":"JSON","VERSION":1}\nx',
            b"no newline",
            HEADER,
            b'{"format":"json","version":2}\nx',
        ]
        results = [self.ingest.datagram(d) for d in datagrams]
        self.assertEqual(results, [True, True, True, False, False, False])
        self.assertEqual(self.buffer.accepted, [b'{"id":"a"}', b'{"id":"b"}', b"x"])
        self.assertEqual(self.counters.received, 6)
        self.assertEqual(self.counters.received_bytes, sum(map(len, datagrams)))
        self.assertEqual(self.counters.rejected, 3)

    def test_bad_input_is_logged_escaped_and_throttled(self) -> None:
        with capturedLogs() as events:
            for _ in range(5):
                self.ingest.datagram(
                    b'{"format":"json","version":2}\n\x1b[31mred\nforged line', ("10.1.2.3", 4567)
                )
            self.clock.advance(10)
            self.ingest.datagram(b'{"format":"json","version":2}\nx')
        lines = [formatEvent(e) for e in events]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("Invalid header: ", lines[0])
        self.assertNotIn("\n", lines[0])
        self.assertNotIn("\x1b", lines[0])
        self.assertIn("\\x1b", lines[0])
        self.assertIn("(from 10.1.2.3:4567)", lines[0])
        self.assertIn("(4 more like this suppressed)", lines[1])

    def test_full_buffer_drops_newest_and_warns_once_per_interval(self) -> None:
        body = b"y" * 100
        self.buffer.capacity = (len(body) + DOC_OVERHEAD) * 2
        with capturedLogs() as events:
            for _ in range(5):
                self.ingest.datagram(HEADER + body)
        self.assertEqual(len(self.buffer.accepted), 2)
        self.assertEqual(self.counters.spillover, 3)
        self.assertEqual(self.counters.rejected, 0)
        warnings = [formatEvent(e) for e in events]
        self.assertEqual(len(warnings), 1)
        self.assertIn("Segment dropped", warnings[0])


class UDPTests(TestCase):
    def setUp(self) -> None:
        self.counters = Counters()
        self.buffer = CollectingBuffer(100_000_000, reactor, self.counters)
        self.ingest = Ingest(self.buffer, self.counters, reactor)
        sock = bind_udp(Address("127.0.0.1", 0), receive_buffer=4 * 1024 * 1024)
        self.port = sock.getsockname()[1]
        self.service = UDPIngestService(reactor, sock, self.ingest)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)

    @inlineCallbacks
    def wait_for(self, count: int) -> Deferred[None]:  # type: ignore[misc]
        for _ in range(500):
            if len(self.buffer.accepted) >= count:
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"only {len(self.buffer.accepted)} of {count} datagrams arrived")

    @inlineCallbacks
    def test_largest_datagram_is_not_truncated(self) -> None:  # type: ignore[misc]
        # Twisted's default maxPacketSize (8192) would silently cut this.
        body = b"x" * (65507 - len(HEADER))
        self.sender.sendto(HEADER + body, ("127.0.0.1", self.port))
        yield self.wait_for(1)
        self.assertEqual(self.buffer.accepted, [body])
        self.assertGreaterEqual(MAX_DATAGRAM, 65507)

    @inlineCallbacks
    def test_many_datagrams(self) -> None:  # type: ignore[misc]
        bodies = [b'{"id":"%016x"}' % i for i in range(500)]
        for body in bodies:
            self.sender.sendto(HEADER + body, ("127.0.0.1", self.port))
        yield self.wait_for(500)
        self.assertEqual(sorted(self.buffer.accepted), sorted(bodies))

    def test_receive_buffer_was_raised(self) -> None:
        # root may go past net.core.rmem_max (SO_RCVBUFFORCE); others get at
        # most rmem_max.  Linux reports double what it grants.
        asked = 4 * 1024 * 1024
        if os.geteuid() != 0:
            with open("/proc/sys/net/core/rmem_max") as f:
                asked = min(asked, int(f.read()))
        self.assertGreaterEqual(self.service.receive_buffer, asked)

    @inlineCallbacks
    def test_stop_takes_in_what_is_already_queued(self) -> None:  # type: ignore[misc]
        # Sent before the stop; the reactor has not read them yet.
        for i in range(20):
            self.sender.sendto(HEADER + b"%d" % i, ("127.0.0.1", self.port))
        yield self.service.stopService()
        self.assertEqual(len(self.buffer.accepted), 20)
        # And the port is really closed: new datagrams go nowhere.
        self.sender.sendto(HEADER + b"late", ("127.0.0.1", self.port))
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(self.buffer.accepted), 20)
