"""Ingest core and the UDP listener (real loopback sockets)."""

from __future__ import annotations

import errno
import os
import select
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.buffers import CollectingBuffer
from tests.support.tempdirs import temp_dir
from xraytwisted.ingest.core import Ingest
from xraytwisted.ingest.udp import MAX_DATAGRAM, UDPIngestService
from xraytwisted.listen.bind import bind_udp
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.spool import Spool
from xraytwisted.settings.addresses import Address

HEADER = b'{"format":"json","version":1}\n'


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

    def test_a_segment_lost_to_an_unwritable_spool_is_one_line_not_two(self) -> None:
        # Memory full, the spool's disk full: the batcher counts the segment
        # as lost and says so; the spillover warning would say it again.
        def enospc(fd: int, parts: object) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        body = b'{"id":"0123456789abcdef"}'
        buffer = SegmentBuffer((len(body) + DOC_OVERHEAD) * 60, self.clock, self.counters)
        spool = Spool.open(
            os.path.join(temp_dir(self), "spool"), 1 << 20, self.clock, self.counters
        )
        self.addCleanup(spool.close)
        uploads_hang = lambda docs: Deferred()  # noqa: E731
        Batcher(buffer, uploads_hang, self.clock, self.counters, concurrency=1, spool=spool)
        self.patch(os, "writev", enospc)
        ingest = Ingest(buffer, self.counters, self.clock, warn_interval=10)
        with capturedLogs() as events:
            for _ in range(100):
                ingest.datagram(HEADER + body)
        self.assertEqual((self.counters.lost, self.counters.spillover), (40, 0))
        lines = [formatEvent(e) for e in events]
        self.assertEqual([line for line in lines if "Segment dropped" in line], [])
        self.assertEqual(len([line for line in lines if "Segment lost" in line]), 1)


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


class _FakePort:
    """The parts of a twisted UDP port the CoalescingReader uses, on a real socket."""

    def __init__(self, protocol: object) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.setblocking(False)
        self.protocol = protocol
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class _Recorder:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def datagramReceived(self, data: bytes, addr: object) -> None:
        if data == b"boom":
            raise RuntimeError("bug in the handler")
        self.seen.append(data)


class CoalescingReaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        from xraytwisted.ingest.udp import READ_INTERVAL, CoalescingReader

        self.clock = Clock()
        self.protocol = _Recorder()
        self.port = _FakePort(self.protocol)
        self.addCleanup(self.port.socket.close)
        self.reader = CoalescingReader(self.clock, self.port)
        self.interval = READ_INTERVAL
        self.sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(self.sender.close)

    def send(self, *payloads: bytes) -> None:
        for payload in payloads:
            self.sender.sendto(payload, self.port.socket.getsockname())
        # Loopback delivery is immediate, but be sure the kernel queued them.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if select.select([self.port.socket], [], [], 0.01)[0]:
                break

    def test_readable_reads_everything_then_polls_until_quiet(self) -> None:
        self.assertEqual(self.port.doRead, self.reader.readable)  # hooked into the port
        self.send(b"1", b"2", b"3")
        self.port.doRead()  # what the reactor calls
        self.assertEqual(self.protocol.seen, [b"1", b"2", b"3"])
        self.assertFalse(self.port.reading)  # no wakeup per datagram now
        self.send(b"4", b"5")
        self.assertEqual(len(self.protocol.seen), 3)
        self.clock.advance(self.interval)
        self.assertEqual(self.protocol.seen[3:], [b"4", b"5"])
        self.assertFalse(self.port.reading)
        self.clock.advance(self.interval)  # nothing came: back to epoll
        self.assertTrue(self.port.reading)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_busy_socket_is_read_again_at_once(self) -> None:
        from xraytwisted.ingest import udp

        self.patch(udp, "READ_LIMIT", 2)
        self.send(b"1", b"2", b"3")
        self.port.doRead()
        self.assertEqual(len(self.protocol.seen), 2)
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.clock.seconds())  # no pause: more waiting
        self.clock.advance(0)
        self.assertEqual(len(self.protocol.seen), 3)

    def test_interval_zero_reads_again_on_the_next_turn(self) -> None:
        from xraytwisted.ingest.udp import CoalescingReader

        port = _FakePort(self.protocol)
        self.addCleanup(port.socket.close)
        reader = CoalescingReader(self.clock, port, 0)
        self.assertEqual(port.doRead, reader.readable)
        self.sender.sendto(b"1", port.socket.getsockname())
        select.select([port.socket], [], [], 2)
        port.doRead()
        (call,) = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), self.clock.seconds())
        self.clock.advance(0)  # nothing more came: back to epoll
        self.assertTrue(port.reading)
        self.assertEqual(self.protocol.seen, [b"1"])

    def test_handler_errors_are_logged_and_reading_goes_on(self) -> None:
        self.send(b"1", b"boom", b"2")
        self.port.doRead()
        self.assertEqual(self.protocol.seen, [b"1", b"2"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_reads_what_is_waiting_and_cancels_the_timer(self) -> None:
        self.send(b"1")
        self.port.doRead()
        self.send(b"2", b"3")
        self.assertEqual(self.reader.stop(), 2)
        self.assertEqual(self.protocol.seen, [b"1", b"2", b"3"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
