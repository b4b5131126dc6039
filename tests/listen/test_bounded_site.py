"""The bounded Site both HTTP listeners use (xraytwisted.listen.bounded_site).

Channels are driven over ``StringTransport`` with a ``Clock``.  The
listeners' own wording of refusals (AWS JSON errors, OTLP Status bodies,
counters, log lines) is tested with them: tests/tcpport/test_site.py and
tests/ingest/test_otlp_http.py.  Here a ``Recorder`` stands for the
listener: it notes each refusal and answers with the limit's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IAddress
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from xraytwisted.listen.bounded_site import (
    LINGER_BYTES,
    LINGER_SECONDS,
    BoundedSite,
    Limit,
    Limits,
    format_address,
    linger_bytes,
    raw_response,
)
from xraytwisted.listen.held import HeldBytes

STATUS = {Limit.DEADLINE: 408, Limit.TOO_LARGE: 413, Limit.OVERLOADED: 503, Limit.HOLD_FULL: 503}


class Recorder:
    """Refusals that note (limit, peer, whether there was a request) and name the limit."""

    def __init__(self) -> None:
        self.seen: list[tuple[Limit, str, bool]] = []
        self.held_when_refused: list[int] = []

    def refuse(
        self, site: BoundedSite, limit: Limit, peer: IAddress | None, request: Request | None
    ) -> bytes:
        self.seen.append((limit, format_address(peer), request is not None))
        hold = site.limits.hold
        self.held_when_refused.append(hold.used if hold is not None else 0)
        if limit not in STATUS:
            return b""
        return raw_response(STATUS[limit], b"text/plain", limit.value.encode(), b"X-Limit: yes")


class Echo(Resource):
    """Answers with the body's length, at once."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        content = request.content
        return b"%d" % len(content.read() if content is not None else b"")


@dataclass
class Env:
    limits: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.clock = Clock()
        self.refusals = Recorder()
        if self.limits.get("hold") == "small":
            self.limits["hold"] = HeldBytes(10, self.clock)
        self.site = BoundedSite(
            Echo(),
            Limits(idle_timeout=30, **self.limits),
            self.refusals,
            reactor=self.clock,
        )

    def connect(self, host: str = "127.0.0.1", port: int = 40000) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", host, port)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        if channel is not None:
            channel.makeConnection(transport)
        return channel, transport


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw else 0


HEAD = b"POST /x HTTP/1.1\r\n"
CHUNKED = HEAD + b"Transfer-Encoding: chunked\r\n\r\n10\r\n" + b"x" * 16 + b"\r\n0\r\n\r\n"


def declared(length: int, body: bytes = b"") -> bytes:
    return HEAD + b"Content-Length: %d\r\n\r\n" % length + body


# (what, limits, bytes sent, seconds then passed, status answered, limit refused)
REQUEST_LIMITS: list[tuple[str, dict[str, Any], bytes, float, int, Limit | None]] = [
    ("within every limit", {"max_body": 16, "deadline": 5, "hold": "small"},
     declared(5, b"hello"), 0, 200, None),
    ("Content-Length over max_body", {"max_body": 10}, declared(11), 0, 413, Limit.TOO_LARGE),
    ("chunked body over max_body", {"max_body": 10}, CHUNKED, 0, 413, Limit.TOO_LARGE),
    ("a body while overloaded", {"overloaded": lambda: True}, declared(5), 0, 503,
     Limit.OVERLOADED),
    ("a chunked body while overloaded", {"overloaded": lambda: True}, CHUNKED, 0, 503,
     Limit.OVERLOADED),
    ("no body while overloaded", {"overloaded": lambda: True}, b"GET /x HTTP/1.1\r\n\r\n", 0,
     200, None),
    ("Content-Length over the hold", {"hold": "small"}, declared(11), 0, 503, Limit.HOLD_FULL),
    ("chunked body over the hold", {"hold": "small"}, CHUNKED, 0, 503, Limit.HOLD_FULL),
    ("headers not in by the deadline", {"deadline": 5}, HEAD + b"X-A: 1\r\n", 5, 408,
     Limit.DEADLINE),
    ("body not in by the deadline", {"deadline": 5}, declared(5, b"hel"), 5, 408,
     Limit.DEADLINE),
    ("just within the deadline", {"deadline": 5}, HEAD + b"X-A: 1\r\n", 4.9, 0, None),
    ("no deadline", {}, HEAD + b"X-A: 1\r\n", 3600, 0, None),
    ("no body limit", {}, declared(100_000, b"x" * 100_000), 0, 200, None),
]  # fmt: skip


class RequestLimitTests(SynchronousTestCase):
    def test_each_limit(self) -> None:
        for what, limits, data, seconds, status, limit in REQUEST_LIMITS:
            env = Env(dict(limits))
            channel, transport = env.connect()
            for i in range(0, len(data), 7):  # a few bytes at a time
                channel.dataReceived(data[i : i + 7])
            env.clock.advance(seconds)
            answer = transport.value()
            self.assertEqual(status_of(answer), status, what)
            expected = [] if limit is None else [(limit, "127.0.0.1:40000", True)]
            self.assertEqual(env.refusals.seen, expected, what)
            if limit is not None:
                self.assertIn(b"\r\nX-Limit: yes\r\n", answer, what)
                self.assertIn(b"\r\nConnection: close\r\n", answer, what)
                self.assertTrue(answer.endswith(limit.value.encode()), what)
            hold = env.site.limits.hold
            if hold is not None:
                self.assertEqual(hold.used, 0, what)  # answered or refused: all given back

    def test_a_deadline_before_the_request_line_has_no_request(self) -> None:
        env = Env({"deadline": 5})
        channel, transport = env.connect()
        channel.dataReceived(b"POS")
        env.clock.advance(5)
        self.assertEqual(env.refusals.seen, [(Limit.DEADLINE, "127.0.0.1:40000", False)])
        self.assertEqual(status_of(transport.value()), 408)
        self.assertTrue(transport.disconnecting)

    def test_refusals_are_told_what_the_request_holds_before_it_is_given_back(self) -> None:
        env = Env({"hold": "small"})
        channel, transport = env.connect()
        channel.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
        self.assertEqual(env.site.limits.hold.used, 6)  # type: ignore[union-attr]
        channel.dataReceived(b"6\r\nghijkl\r\n")
        self.assertEqual(status_of(transport.value()), 503)
        self.assertEqual(env.refusals.held_when_refused, [6])
        self.assertEqual(env.site.limits.hold.used, 0)  # type: ignore[union-attr]

    def test_a_refused_request_lingers_then_closes(self) -> None:
        # Declared: the rest of the body is read, then the connection closes.
        env = Env({"max_body": 10})
        channel, transport = env.connect()
        channel.dataReceived(declared(30, b"x" * 5))
        self.assertEqual(status_of(transport.value()), 413)
        channel.dataReceived(b"x" * 24)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.refusals.seen, [(Limit.TOO_LARGE, "127.0.0.1:40000", True)])
        # Declared as more than is worth reading: closed at once.
        env = Env({"max_body": 10})
        channel, transport = env.connect()
        channel.dataReceived(declared(LINGER_BYTES + 1))
        self.assertTrue(transport.disconnecting)
        # Chunked: read up to LINGER_BYTES, for at most LINGER_SECONDS.
        env = Env({"max_body": 10})
        channel, transport = env.connect()
        channel.dataReceived(CHUNKED[:-5])
        self.assertFalse(transport.disconnecting)
        env.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)
        # (More than LINGER_BYTES after the refusal is not waited for.)
        other, other_transport = Env({"max_body": 10}).connect()
        other.dataReceived(CHUNKED[:-5] + b"%x\r\n" % LINGER_BYTES + b"x" * LINGER_BYTES)
        self.assertFalse(other_transport.disconnecting)
        other.dataReceived(b"\r\n1\r\nx")
        self.assertTrue(other_transport.disconnecting)
        # A client that reads nothing is aborted later; no call is left behind.
        env.clock.advance(channel.abortTimeout)
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_the_linger_is_scaled_to_the_body_limit_and_counted_from_the_refusal(self) -> None:
        # The OTLP receiver's limit is over LINGER_BYTES: a client refused for
        # a body a little over it must still be read to the end (else it sees
        # a reset, retries, and sends it all again).
        big = LINGER_BYTES + 1024  # max_body
        self.assertEqual(linger_bytes(Limits(idle_timeout=1, max_body=big)), 2 * big)
        self.assertEqual(linger_bytes(Limits(idle_timeout=1, max_body=10)), LINGER_BYTES)
        self.assertEqual(linger_bytes(Limits(idle_timeout=1)), LINGER_BYTES)
        chunked = HEAD + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % (big + 1) + b"x" * (big + 1)
        # (what, bytes up to the refusal, bytes then sent: not closed yet, the
        # next bytes, which close it; b"": closed at once)
        cases = [
            ("declared a little over the limit: read to its end",
             declared(big + 1_000_000), b"x" * (big + 999_999), b"x"),
            ("declared far over it: closed at once", declared(2 * big + 1), b"", b""),
            ("declared 10 GB: closed at once", declared(10 * 1024**3), b"", b""),
            ("chunked: 2 x max_body after the refusal, not more",
             chunked, b"\r\n%x\r\n" % (2 * big) + b"x" * (2 * big), b"\r\n1\r\nx"),
        ]  # fmt: skip
        for what, refused, more, last in cases:
            env = Env({"max_body": big})
            channel, transport = env.connect()
            channel.dataReceived(refused)
            self.assertEqual(status_of(transport.value()), 413, what)
            self.assertEqual(env.refusals.seen, [(Limit.TOO_LARGE, "127.0.0.1:40000", True)], what)
            if not last:
                self.assertTrue(transport.disconnecting, what)
                continue
            channel.dataReceived(more)
            self.assertFalse(transport.disconnecting, what)
            channel.dataReceived(last)
            self.assertTrue(transport.disconnecting, what)

    def test_a_deadline_gives_the_held_bytes_back_at_once(self) -> None:
        env = Env({"deadline": 5, "hold": "small"})
        channel, transport = env.connect()
        channel.dataReceived(HEAD + b"Transfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n")
        hold = env.site.limits.hold
        assert hold is not None
        self.assertEqual(hold.used, 6)
        env.clock.advance(5)
        self.assertEqual(status_of(transport.value()), 408)
        self.assertEqual(env.refusals.held_when_refused, [6])
        self.assertEqual(hold.used, 0)  # not only once the connection is gone
        self.assertTrue(transport.disconnecting)
        # What still arrives is neither held nor answered.
        before = transport.value()
        channel.dataReceived(b"4\r\nghij\r\n0\r\n\r\n")
        self.assertEqual((hold.used, transport.value()), (0, before))
        # A client that reads nothing is aborted.
        env.clock.advance(channel.abortTimeout)
        self.assertTrue(transport.disconnected)

    def test_idle_connections_are_closed_quietly(self) -> None:
        env = Env({"deadline": 5})
        _, transport = env.connect()
        with capturedLogs() as events:
            env.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])
        self.assertEqual(env.refusals.seen, [])


# (what, limits, connections opened as (host, port), how many are accepted, limits refused)
CONNECTION_LIMITS: list[tuple[str, dict[str, Any], list[str], int, list[Limit]]] = [
    ("no caps", {}, ["10.0.0.1"] * 5, 5, []),
    ("global cap", {"max_connections": 3}, ["10.0.0.1", "10.0.0.2"] * 2, 3,
     [Limit.CONNECTIONS]),
    ("per-peer cap", {"max_per_peer": 2}, ["10.0.0.1"] * 3 + ["10.0.0.2"], 3,
     [Limit.PEER_CONNECTIONS]),
    ("global before per-peer", {"max_connections": 1, "max_per_peer": 1},
     ["10.0.0.1", "10.0.0.1"], 1, [Limit.CONNECTIONS]),
]  # fmt: skip


class ConnectionLimitTests(SynchronousTestCase):
    def test_each_cap(self) -> None:
        for what, limits, hosts, accepted, refused in CONNECTION_LIMITS:
            env = Env(dict(limits))
            channels = [env.connect(host, 40000 + i)[0] for i, host in enumerate(hosts)]
            self.assertEqual(sum(c is not None for c in channels), accepted, what)
            self.assertEqual([seen[0] for seen in env.refusals.seen], refused, what)
            self.assertEqual(len(env.site.channels), accepted, what)

    def test_closed_connections_make_room_again(self) -> None:
        env = Env({"max_connections": 3, "max_per_peer": 1})
        first, _ = env.connect("10.0.0.1", 1)
        self.assertIsNone(env.connect("10.0.0.1", 2)[0])
        self.assertEqual(env.refusals.seen, [(Limit.PEER_CONNECTIONS, "10.0.0.1:2", False)])
        self.assertEqual(env.site.per_peer, {"10.0.0.1": 1})
        first.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((env.site.per_peer, list(env.site.channels)), ({}, []))
        self.assertIsNotNone(env.connect("10.0.0.1", 3)[0])

    def test_close_connections_fires_once_all_are_gone(self) -> None:
        env = Env()
        opened = [env.connect("10.0.0.1", port) for port in (1, 2)]
        done = env.site.close_connections(1.0)
        self.assertTrue(all(transport.disconnecting for _, transport in opened))
        self.assertNoResult(done)
        for channel, _ in opened:
            channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_close_connections_aborts_clients_that_do_not_read_after_the_grace(self) -> None:
        env = Env()
        channel, transport = env.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")  # answered; the client reads nothing
        done = env.site.close_connections(1.0)
        env.clock.advance(0.9)
        self.assertFalse(transport.disconnected)
        env.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted: not the idle or abort timeout
        channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_stop_now_aborts_at_once_and_cuts_a_later_close_too(self) -> None:
        # A second shutdown signal while the listener is closing...
        env = Env()
        channel, transport = env.connect()
        done = env.site.close_connections(1.0)
        env.site.stop_now()
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(env.clock.getDelayedCalls(), [])
        # ... or before it began to.
        env = Env()
        env.site.stop_now()
        channel, transport = env.connect()
        done = env.site.close_connections(1.0)
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(done)
        self.assertEqual(env.clock.getDelayedCalls(), [])


class IdleTests(SynchronousTestCase):
    def test_a_started_site_schedules_nothing(self) -> None:
        # twisted.web's HTTPFactory refreshes its access-log date every second
        # once started; an idle daemon must not wake for a log it never writes.
        env = Env()
        env.site.doStart()
        self.assertEqual(env.clock.getDelayedCalls(), [])
        channel, transport = env.connect()
        channel.dataReceived(declared(2, b"ab"))
        self.assertEqual(status_of(transport.value()), 200)
        env.site.doStop()
