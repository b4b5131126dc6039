"""When the coalescing UDP reader reads: counted reads and wakeups, on a fake socket.

Outcomes alone (which datagrams arrived) cannot show a wasted wakeup:
``Clock.advance`` runs a zero-delay call along with everything else.  These
tests count ``recvfrom`` calls, reads and the calls the reader schedules.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.ingest.udp import READ_INTERVAL, CoalescingReader
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.uploader import Outcome


class FakeSocket:
    """A non-blocking UDP socket whose queue the test fills; counts recvfrom calls."""

    def __init__(self) -> None:
        self.queue: deque[bytes] = deque()
        self.recvfrom_calls = 0

    def recvfrom(self, size: int) -> tuple[bytes, Any]:
        self.recvfrom_calls += 1
        if not self.queue:
            raise BlockingIOError
        return self.queue.popleft(), ("127.0.0.1", 9)


class FakePort:
    """What CoalescingReader uses of a Twisted UDP port; counts epoll (un)registrations."""

    def __init__(self, accept: Any) -> None:
        self.socket = FakeSocket()
        self.protocol = self
        self.datagramReceived = accept
        self.reading = True
        self.started = 0

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True
        self.started += 1


class CountingClock(Clock):
    """task.Clock that counts the calls scheduled on it, and the wakeups they cost."""

    def __init__(self) -> None:
        super().__init__()
        self.scheduled: list[float] = []  # delays asked for
        self.wakeups = 0  # distinct times at which scheduled calls ran

    def callLater(self, delay: float, f: Any, *args: Any, **kw: Any) -> Any:
        self.scheduled.append(delay)
        return super().callLater(delay, f, *args, **kw)

    def advance(self, amount: float) -> None:
        # A wakeup per distinct due time, as a reactor would have.
        target = self.seconds() + amount
        while True:
            due = sorted(c.getTime() for c in self.getDelayedCalls())
            if not due or due[0] > target:
                break
            super().advance(due[0] - self.seconds())
            self.wakeups += 1
        super().advance(target - self.seconds())


class Harness:
    def __init__(self, test: SynchronousTestCase, **kwargs: Any) -> None:
        self.clock = CountingClock()
        self.clock.advance(1000)  # a realistic monotonic clock is far from 0
        self.clock.wakeups = 0
        self.seen: list[bytes] = []
        self.buffer = SegmentBuffer(10**9, self.clock, Counters())
        self.port = FakePort(lambda data, addr: self.accept(data))
        kwargs.setdefault("buffer", self.buffer)
        self.reader = CoalescingReader(self.clock, self.port, **kwargs)
        self.started: list[float] = []  # the start times of the batches opened

    def accept(self, data: bytes) -> None:
        self.seen.append(data)
        before = self.buffer.open_batch
        self.buffer.offer(data)
        batch = self.buffer.open_batch
        if batch is not None and batch is not before:
            self.started.append(batch.started)

    def arrive(self, *payloads: bytes) -> None:
        was_empty = not self.port.socket.queue
        self.port.socket.queue.extend(payloads)
        if was_empty and self.port.reading:
            self.port.doRead()  # what the reactor's epoll does


class BugFixTests(SynchronousTestCase):
    """The defect: every readable event was followed by an immediate empty read."""

    def test_a_wakeup_is_not_followed_by_an_immediate_empty_read(self) -> None:
        h = Harness(self, interval=READ_INTERVAL)
        h.arrive(b"1")
        # One datagram read, one empty recvfrom ending that read.
        self.assertEqual(h.port.socket.recvfrom_calls, 2)
        self.assertEqual(h.clock.scheduled, [READ_INTERVAL])  # not 0
        h.clock.advance(READ_INTERVAL)
        self.assertEqual(h.clock.wakeups, 1)
        self.assertEqual(h.port.socket.recvfrom_calls, 3)
        self.assertTrue(h.port.reading)

    def test_datagrams_keep_coming_one_read_per_interval(self) -> None:
        h = Harness(self, interval=READ_INTERVAL)
        h.arrive(b"0")
        for i in range(1, 50):
            h.clock.advance(0.002)  # 500 datagrams/s
            h.arrive(b"%d" % i)
        h.clock.advance(1)
        self.assertEqual(len(h.seen), 50)
        # 100 ms of traffic: one read every 20 ms, plus the empty one at the end.
        self.assertEqual(h.clock.wakeups, 6)
        self.assertEqual(h.port.started, 1)


class ReadableHookTests(SynchronousTestCase):
    def test_told_when_datagrams_come_after_a_quiet_spell_only(self) -> None:
        woken: list[float] = []
        h = Harness(self, adaptive=True, on_readable=lambda: woken.append(1))
        for i in range(20):
            h.arrive(b"%d" % i)
            h.clock.advance(0.05)
        self.assertEqual(len(woken), 1)
        h.clock.advance(5)  # quiet: back to epoll
        h.arrive(b"again")
        self.assertEqual(len(woken), 2)


class AdaptiveTests(SynchronousTestCase):
    def paced(self, h: Harness, rate: float, seconds: float) -> None:
        """Datagrams at ``rate`` for ``seconds``, then quiet until the reader is back on epoll."""
        step = 1 / rate
        for i in range(round(rate * seconds)):
            h.arrive(b"%d" % i)
            h.clock.advance(step)
        h.clock.advance(5)

    def test_reads_once_per_batch_at_100_per_second(self) -> None:
        h = Harness(self, adaptive=True)
        self.paced(h, 100, 10)
        self.assertEqual(len(h.seen), 1000)
        # 20 batches of 50: about one read per batch once the rate is known
        # (a few more while it is learnt, and the empty ones at the end).
        self.assertLessEqual(h.clock.wakeups, 35)
        self.assertGreaterEqual(h.clock.wakeups, 20)
        self.assertEqual(h.port.started, 1)  # never went back to epoll while busy

    def test_reads_once_per_deadline_at_10_per_second(self) -> None:
        h = Harness(self, adaptive=True)
        self.paced(h, 10, 20)
        self.assertEqual(len(h.seen), 200)
        self.assertLessEqual(h.clock.wakeups, 20 + 10)
        self.assertEqual(h.port.started, 1)

    def test_every_read_comes_before_the_open_batch_deadline(self) -> None:
        h = Harness(self, adaptive=True)
        h.arrive(b"a")
        opened = h.clock.seconds()
        h.clock.advance(0.5)
        h.arrive(b"b")  # waits in the kernel: the reader is on a timer
        # The read that picks it up is due before the batch's deadline.
        self.assertTrue(all(c.getTime() < opened + 1.0 for c in h.clock.getDelayedCalls()))
        h.clock.advance(0.5)
        self.assertEqual(h.seen, [b"a", b"b"])
        self.assertEqual(h.started, [opened])  # both in the batch that leaves at 1 s

    def test_a_slow_read_does_not_push_the_next_one_past_the_deadline(self) -> None:
        # With the real batcher: a read timed just before a deadline must stay
        # before it even when reading takes time, or the batcher sends the
        # batch first and the read's documents leave in a second upload.
        h = Harness(self, adaptive=True)
        uploads: list[int] = []

        def send(docs: Sequence[bytes]) -> Deferred[Outcome]:
            uploads.append(len(docs))
            return succeed(Outcome(0.0))

        Batcher(h.buffer, send, h.clock, Counters()).startService()
        accept = h.accept

        def slow(data: bytes) -> None:
            accept(data)
            h.clock.rightNow += 0.002  # handling a datagram takes time

        h.accept = slow  # type: ignore[method-assign]
        self.paced(h, 10, 10)
        self.assertEqual(sum(uploads), 100)
        self.assertLessEqual(len(uploads), 11)  # one a second

    def test_a_batch_opened_from_the_kernel_counts_the_wait_there(self) -> None:
        h = Harness(self, interval=0.2)
        h.arrive(b"a")
        first_read = h.clock.seconds()
        h.buffer.pop()  # the batcher took that batch
        h.clock.advance(0.1)
        h.arrive(b"b")  # read at the next tick, 0.2 s after the first read
        h.clock.advance(0.1)
        self.assertEqual(h.seen, [b"a", b"b"])
        # It may have arrived just after the first read: its deadline counts from there.
        self.assertEqual(h.started, [first_read, first_read])
        self.assertIsNone(h.buffer.arrived_since)

    def test_rate_bounds_the_pause_by_the_receive_buffer(self) -> None:
        # 1 KiB datagrams at 20 000/s fill 20 000 * 2 816 bytes a second; half of a
        # 4 MiB buffer holds 37 ms of that, less than a batch's deadline.
        h = Harness(self, adaptive=True, interval=0, receive_buffer=4 * 1024 * 1024)
        data = b"x" * 1024
        h.arrive(data)
        for _ in range(40):
            h.clock.advance(0.005)
            h.port.socket.queue.extend([data] * 100)
        pauses = h.clock.scheduled[-10:]
        self.assertTrue(all(0 < p <= 0.5 * 4 * 1024 * 1024 / (20_000 * 2816) for p in pauses))

    def test_after_a_quiet_spell_the_pause_grows_from_the_ramp(self) -> None:
        h = Harness(self, adaptive=True)
        h.arrive(b"lone")
        h.clock.advance(5)
        # 20, 20, 40 ms ... never the full deadline while the rate is unknown,
        # then back to epoll once reads have found nothing for QUIET.
        for got, expected in zip(h.clock.scheduled, [0.02, 0.02, 0.04], strict=False):
            self.assertAlmostEqual(got, expected)
        self.assertTrue(h.port.reading)
        self.assertLessEqual(h.clock.wakeups, 5)

    def test_the_interval_is_the_floor(self) -> None:
        h = Harness(self, adaptive=True, interval=0.05)
        self.paced(h, 4000, 1)
        self.assertEqual(len(h.seen), 4000)
        self.assertTrue(all(p >= 0.05 for p in h.clock.scheduled))


class DatagramSocketTests(SynchronousTestCase):
    """The bound socket is watched through IReactorFDSet, not a patched Twisted port."""

    def test_reading_registers_with_the_reactor(self) -> None:
        import socket as socket_module

        from twisted.internet.interfaces import IReadDescriptor
        from twisted.internet.protocol import DatagramProtocol
        from twisted.internet.testing import MemoryReactor
        from zope.interface.verify import verifyObject

        from xraytwisted.ingest.udp import DatagramSocket

        reactor = MemoryReactor()
        sock = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        port = DatagramSocket(reactor, sock, DatagramProtocol())
        self.assertTrue(verifyObject(IReadDescriptor, port))
        self.assertEqual(port.fileno(), sock.fileno())
        port.startReading()
        port.startReading()
        self.assertEqual(reactor.getReaders(), [port])
        port.stopReading()
        self.assertEqual(reactor.getReaders(), [])
        port.startReading()
        port.stopListening()
        self.assertEqual(reactor.getReaders(), [])
        self.assertEqual(sock.fileno(), -1)
        port.startReading()  # a closed socket is never watched again
        self.assertEqual(reactor.getReaders(), [])
