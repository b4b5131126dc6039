"""Counting a listener's open connections against its limits (xraytwisted.listen.connections).

The refusals built on it are tested with their listeners: the TCP port's
in tests/tcpport/test_sniffing.py, the monitoring listener's in
tests/tcpport/test_health.py, the Site's in tests/listen/test_bounded_site.py.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.listen.connections import OpenConnections, Over, WhenGone, format_peer

# (what, max total, max per peer, hosts open, new host) -> which limit, with its value
OVER: list[tuple[str, int | None, int | None, list[str], str, tuple[Over, int] | None]] = [
    ("no limits", None, None, ["a"] * 100, "a", None),
    ("room in all", 3, None, ["a", "b"], "c", None),
    ("total reached", 2, None, ["a", "b"], "c", ("total", 2)),
    ("peer reached", None, 2, ["a", "a", "b"], "a", ("peer", 2)),
    ("another peer has room", None, 2, ["a", "a"], "b", None),
    ("total before peer", 2, 1, ["a", "b"], "a", ("total", 2)),
]  # fmt: skip


class OpenConnectionsTests(SynchronousTestCase):
    def test_over(self) -> None:
        for what, total, per_peer, hosts, new, expected in OVER:
            open_ = OpenConnections[int](total, per_peer)
            for n, host in enumerate(hosts):
                open_.opened(n, host)
            self.assertEqual(open_.over(new), expected, what)

    def test_closing_makes_room_and_forgets_empty_peers(self) -> None:
        open_ = OpenConnections[str](max_per_peer=1)
        open_.opened("first", "a")
        open_.opened("second", "b")
        self.assertEqual(open_.over("a"), ("peer", 1))
        self.assertTrue(open_.closed("first"))
        self.assertFalse(open_.closed("first"))  # a second close changes nothing
        self.assertEqual((open_.per_peer, list(open_), len(open_)), ({"b": 1}, ["second"], 1))
        self.assertIsNone(open_.over("a"))

    def test_iterating_while_closing(self) -> None:
        open_ = OpenConnections[int]()
        for n in range(3):
            open_.opened(n, "a")
        for n in open_:
            open_.closed(n)
        self.assertEqual((len(open_), open_.per_peer), (0, {}))

    def test_peers_are_shown_as_addresses(self) -> None:
        self.assertEqual(format_peer(IPv4Address("TCP", "10.0.0.1", 5)), "10.0.0.1:5")
        self.assertEqual(format_peer(IPv6Address("TCP", "::1", 5)), "[::1]:5")


class WhenGoneTests(SynchronousTestCase):
    def test_waiters_fire_once_gone_and_later_ones_at_once(self) -> None:
        watch = WhenGone()
        early = watch.wait()
        self.assertNoResult(early)
        watch.gone()
        self.successResultOf(early)
        self.successResultOf(watch.wait())
        self.assertTrue(watch.is_gone)
