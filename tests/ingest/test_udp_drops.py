"""Kernel UDP drop accounting: /proc parsers, deltas, rate-limited warnings."""

from __future__ import annotations

import os
import socket
from collections.abc import Collection

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from xraytwisted.ingest.udp_drops import (
    SNMP,
    SNMP6,
    UdpDropMonitor,
    parse_snmp,
    parse_snmp6,
    parse_socket_drops,
    socket_inode,
)
from xraytwisted.observe.counters import Counters

# Linux 4.x+ (InCsumErrors 3.10, IgnoredMulti 3.19, MemErrors 5.x), as read on a 6.x kernel.
SNMP_NEW = """\
Ip: Forwarding DefaultTTL InReceives InHdrErrors InAddrErrors ForwDatagrams
Ip: 1 64 5551212 0 0 0
Icmp: InMsgs InErrors InCsumErrors
Icmp: 20 0 0
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
Udp: 2988009 9 403854 3392881 {rcvbuf} 0 0 0 0
UdpLite: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors
UdpLite: 0 0 0 0 999 0 0 0 0
"""  # noqa: E501

# Linux 2.6.18 - 3.9: RcvbufErrors and SndbufErrors are the last columns.
SNMP_OLD = """\
Ip: Forwarding DefaultTTL InReceives
Ip: 2 64 100
Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors
Udp: 1000 2 17 900 17 0
"""

# Before 2.6.18 there was no RcvbufErrors column.
SNMP_ANCIENT = """\
Udp: InDatagrams NoPorts InErrors OutDatagrams
Udp: 1000 2 17 900
"""

SNMP6_SAMPLE = """\
Ip6InReceives                   \t12
Udp6InDatagrams                 \t0
Udp6NoPorts                     \t0
Udp6InErrors                    \t{rcvbuf}
Udp6OutDatagrams                \t0
Udp6RcvbufErrors                \t{rcvbuf}
Udp6SndbufErrors                \t0
UdpLite6RcvbufErrors            \t55
"""

UDP_HEADER = (
    "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode ref pointer drops            \n"
)


def udp_line(inode: int, drops: int) -> str:
    return (
        f" 1540: 0100007F:D52D 00000000:0000 07 00000000:00000000 00:00000000 00000000     0"
        f"        0 {inode} 2 000000002215fecd {drops}         \n"
    )


class ParserTests(SynchronousTestCase):
    def test_snmp_new_kernel(self) -> None:
        self.assertEqual(parse_snmp(SNMP_NEW.format(rcvbuf=403854)), 403854)

    def test_snmp_old_kernel(self) -> None:
        self.assertEqual(parse_snmp(SNMP_OLD), 17)

    def test_snmp_without_the_counter(self) -> None:
        self.assertIsNone(parse_snmp(SNMP_ANCIENT))
        self.assertIsNone(parse_snmp(""))
        self.assertIsNone(parse_snmp("Udp: InDatagrams RcvbufErrors\nUdp: 1\n"))  # short line
        self.assertIsNone(parse_snmp("Udp: InDatagrams RcvbufErrors\nUdp: 1 x\n"))

    def test_snmp6(self) -> None:
        self.assertEqual(parse_snmp6(SNMP6_SAMPLE.format(rcvbuf=4)), 4)
        self.assertIsNone(parse_snmp6("Ip6InReceives 12\n"))

    def test_socket_drops_by_inode(self) -> None:
        text = UDP_HEADER + udp_line(111, 5) + udp_line(222, 7) + udp_line(333, 100)
        self.assertEqual(parse_socket_drops(text, {111, 222}), (12, 2))
        self.assertEqual(parse_socket_drops(text, {444}), (0, 0))
        self.assertEqual(parse_socket_drops(UDP_HEADER + "garbage line\n", {111}), (0, 0))


class FakeProc:
    """Counter files whose values a test can change."""

    def __init__(self) -> None:
        self.host = 0
        self.host6 = 0
        self.socket_drops = 0
        self.missing: set[str] = set()

    def read(self, path: str) -> str:
        if path in self.missing:
            raise FileNotFoundError(2, "No such file or directory")
        if path == SNMP:
            return SNMP_NEW.format(rcvbuf=self.host)
        if path == SNMP6:
            return SNMP6_SAMPLE.format(rcvbuf=self.host6)
        if path == "/proc/net/udp":
            return UDP_HEADER + udp_line(4242, self.socket_drops) + udp_line(1, 999)
        if path == "/proc/net/udp6":
            return UDP_HEADER
        raise AssertionError(path)


class MonitorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = Counters()
        self.proc = FakeProc()
        self.inodes: Collection[int] = ()

    def monitor(self) -> UdpDropMonitor:
        m = UdpDropMonitor(
            self.clock, self.counters, 10.0, read=self.proc.read, inodes=lambda: self.inodes
        )
        m.startService()

        def stop() -> None:
            if m.running:
                m.stopService()

        self.addCleanup(stop)
        return m

    def test_host_wide_delta_is_counted_and_warned_once_per_interval(self) -> None:
        self.proc.host = 1000  # drops before the daemon started are not ours
        self.monitor()
        with capturedLogs() as events:
            self.clock.advance(10)
            self.assertEqual(self.counters.kernel_drops, 0)
            self.proc.host += 5
            self.clock.advance(3)
            self.proc.host6 += 2
            self.clock.advance(7)
        self.assertEqual(self.counters.kernel_drops, 7)
        [line] = [formatEvent(e) for e in events]
        self.assertIn("The kernel dropped 7 UDP datagrams (receive buffer full)", line)
        self.assertIn("in the last 10 s", line)
        self.assertIn("raise Socket.UDPReceiveBufferKB (--udp-receive-buffer)", line)
        self.assertIn("net.core.rmem_max", line)
        self.assertIn("not only the daemon's", line)
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertEqual(list(events), [])  # no growth, no line

    def test_per_socket_counter_is_preferred(self) -> None:
        self.inodes = {4242}
        self.proc.socket_drops = 3
        self.monitor()
        self.proc.socket_drops = 10
        self.proc.host += 500  # someone else's socket
        with capturedLogs() as events:
            self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 7)
        [line] = [formatEvent(e) for e in events]
        self.assertIn("dropped 7 UDP datagrams sent to the daemon", line)
        self.assertNotIn("not only the daemon's", line)

    def test_source_change_starts_over_instead_of_counting_nonsense(self) -> None:
        self.proc.host = 1000
        self.monitor()  # no inodes yet: host-wide
        self.inodes = {4242}
        self.proc.socket_drops = 3
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 0)
        self.proc.socket_drops = 4
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 1)

    def test_counter_going_back_counts_nothing(self) -> None:
        self.proc.host = 2**32 - 2
        self.monitor()
        self.proc.host = 5  # wrapped
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 0)
        self.proc.host = 8
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 3)

    def test_with_the_socket_counter_it_sleeps_while_nothing_is_received(self) -> None:
        self.inodes = {4242}
        m = self.monitor()
        self.clock.advance(10)  # first check: nothing to compare with yet
        self.clock.advance(10)  # nothing received, nothing dropped: no more timer
        self.assertEqual(self.clock.getDelayedCalls(), [])
        m.wake()  # datagrams again
        self.counters.received += 5
        self.proc.socket_drops = 2
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 2)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # still busy
        self.clock.advance(10)  # quiet again
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.proc.socket_drops = 3
        m.stopService()  # the last partial interval is counted all the same
        self.assertEqual(self.counters.kernel_drops, 3)
        # The host-wide counter shows other programs' drops too, traffic or not.
        self.inodes = ()
        self.monitor()
        self.clock.advance(30)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop_counts_the_last_partial_interval(self) -> None:
        m = self.monitor()
        self.proc.host = 4
        self.clock.advance(2)
        m.stopService()
        self.assertEqual(self.counters.kernel_drops, 4)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_missing_files_mean_unavailable_not_a_crash(self) -> None:
        self.proc.missing = {SNMP, SNMP6, "/proc/net/udp", "/proc/net/udp6"}
        self.inodes = {4242}
        with capturedLogs() as events:
            m = self.monitor()
        self.assertFalse(m.available())
        [line] = [formatEvent(e) for e in events]
        self.assertIn("Cannot read the kernel's UDP drop counters (/proc/net/snmp", line)
        self.assertIn("will not be reported", line)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(m.check(), 0)
        m.stopService()

    def test_ipv4_only_host(self) -> None:
        self.proc.missing = {SNMP6, "/proc/net/udp6"}
        m = self.monitor()
        self.assertTrue(m.available())
        self.proc.host = 2
        self.clock.advance(10)
        self.assertEqual(self.counters.kernel_drops, 2)


class RealKernelTests(SynchronousTestCase):
    def test_overflowing_a_real_socket_is_seen(self) -> None:
        if not os.path.exists("/proc/net/udp"):
            raise SkipTest("needs Linux /proc/net/udp")
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(receiver.close)
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        receiver.bind(("127.0.0.1", 0))
        clock = Clock()
        counters = Counters()
        inode = socket_inode(receiver.fileno())
        monitor = UdpDropMonitor(clock, counters, inodes=lambda: {inode})
        monitor.startService()
        self.addCleanup(monitor.stopService)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(200):  # never read: most are dropped
                sender.sendto(b"x" * 500, receiver.getsockname())
        clock.advance(10)
        self.assertGreater(counters.kernel_drops, 150)
        self.assertLessEqual(counters.kernel_drops, 200)
