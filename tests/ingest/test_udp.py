"""When the coalescing UDP reader reads: counted reads and wakeups, on a fake socket.

Outcomes alone (which datagrams arrived) cannot show a wasted wakeup:
``Clock.advance`` runs a zero-delay call along with everything else.  These
tests count ``recvfrom`` calls, reads and the calls the reader schedules.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.ingest.udp import READ_INTERVAL, CoalescingReader
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.buffer import SegmentBuffer


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
