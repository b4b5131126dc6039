"""The TCP port: sniffing, the line-framed segment stream, backpressure, stop.

Unit tests drive the protocols over ``StringTransport`` with a ``Clock``;
loopback tests use real sockets on 127.0.0.1, and the last one uploads a
stream's segments to a real moto server (which checks SigV4 signatures).
"""

from __future__ import annotations

import json
import re
import socket
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.static import Data

from tests.support import buffers as support_buffers
from tests.support.fake_xray import parse_response, raw_http
from tests.support.moto import SharedMotoServer
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.ingest.core import Ingest
from xraytwisted.ingest.udp import UDPIngestService
from xraytwisted.listen.bind import bind_tcp, bind_udp
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import Counters
from xraytwisted.outbound.http_client import make_client, make_pool
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.uploader import Uploader
from xraytwisted.settings.addresses import Address
from xraytwisted.tcpport.site import http_root, make_site
from xraytwisted.tcpport.sniffing import (
    AUTO_MAX_CONNECTIONS,
    Kind,
    SniffingFactory,
    SniffingProtocol,
    TCPPortService,
    classify,
    connection_limits,
)

HEADER = b'{"format":"json","version":1}'
JAVA_HEADER = b'{"format": "json", "version": 1}'
PEER = IPv4Address("TCP", "127.0.0.1", 50000)
DOCS_MD = Path(__file__).resolve().parents[2] / "docs" / "stream-format.md"


def record(body: bytes, header: bytes = HEADER) -> bytes:
    return header + b"\n" + body + b"\n"


def doc(i: int, size: int = 0) -> bytes:
    body = b'{"id":"%016x","name":"s"' % i
    if size:
        body += b',"pad":"' + b"x" * max(0, size - len(body) - 10) + b'"'
    return body + b"}"


class CollectingBuffer(support_buffers.CollectingBuffer):
    """Also counts backpressure waits, and can pretend every batch was uploaded."""

    def __init__(self, capacity: int, clock: Any, counters: Counters) -> None:
        super().__init__(capacity, clock, counters)
        self.waits = 0

    def notify_when_space(self, callback: Any) -> None:
        self.waits += 1
        super().notify_when_space(callback)

    def release_all(self) -> int:
        """Pretend every waiting batch was uploaded; returns how many documents."""
        count = 0
        while len(self):
            batch = self.pop()
            count += len(batch)
            self.release(batch)
        return count


class Proxied(Resource):
    """Stands in for the sampling proxy: answers with the path it got."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"proxied " + request.path


class Env:
    """Ingest, buffer and a sniffing factory on a Clock."""

    def __init__(
        self,
        capacity: int = 10_000_000,
        max_line: int = 4096,
        *,
        hold: int = 2**40,
        **factory: Any,
    ) -> None:
        self.clock = Clock()
        self.counters = Counters()
        self.buffer = CollectingBuffer(capacity, self.clock, self.counters)
        self.ingest = Ingest(self.buffer, self.counters, self.clock)
        self.hold = HeldBytes(hold, self.clock)
        root = http_root(Proxied(), {b"health": Data(b"ok", "text/plain")}, self.counters)
        self.site = make_site(
            root, timeout=30, counters=self.counters, reactor=self.clock, hold=self.hold
        )
        self.factory = SniffingFactory(
            self.ingest, self.site, max_line, self.clock, hold=self.hold, **factory
        )

    def connect(self, peer: IPv4Address = PEER) -> tuple[SniffingProtocol, StringTransport]:
        protocol = self.factory.buildProtocol(peer)
        assert protocol is not None, "refused"
        transport = StringTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport

    def stream(self, *chunks: bytes) -> tuple[SniffingProtocol, StringTransport]:
        protocol, transport = self.connect()
        for chunk in chunks:
            protocol.dataReceived(chunk)
        return protocol, transport


def lines_of(events: list[Any]) -> list[str]:
    return [formatEvent(e) for e in events]


class ClassifyTests(SynchronousTestCase):
    def test_first_bytes_table(self) -> None:
        cases: list[tuple[bytes, Kind | None]] = [
            (b"", None),
            (b"{", Kind.STREAM),
            (b'{"format":"json"', Kind.STREAM),
            (b"P", None),
            (b"POS", None),
            (b"POST", None),
            (b"POST ", Kind.HTTP),
            (b"GET /health HTTP/1.1\r\n", Kind.HTTP),
            (b"OPTIONS * HTTP/1.1", Kind.HTTP),
            (b"PROPFIND / HTTP/1.1", Kind.HTTP),
            (b"ABCDEFGHIJKLMNOP", None),  # 16 letters: could still be a method
            (b"ABCDEFGHIJKLMNOPQ", Kind.JUNK),  # 17: no method is that long
            (b"ABCDEFGHIJKLMNOPQ /", Kind.JUNK),
            (b"get / HTTP/1.1", Kind.JUNK),
            (b"Post / HTTP/1.1", Kind.JUNK),
            (b" POST /", Kind.JUNK),
            (b"\r\nPOST /", Kind.JUNK),
            (b"\x16\x03\x01\x02\x00\x01", Kind.JUNK),  # a TLS ClientHello
            (b"PRI * HTTP/2.0", Kind.HTTP),  # HTTP/2 preface: twisted.web answers 400
            (b"[1,2]", Kind.JUNK),
        ]
        for head, expected in cases:
            self.assertIs(classify(head), expected, head)


class SniffingTests(SynchronousTestCase):
    def test_http_request_arriving_one_byte_at_a_time(self) -> None:
        env = Env()
        protocol, transport = env.connect()
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        for i in range(len(request) - 1):
            protocol.dataReceived(request[i : i + 1])
        self.assertEqual(transport.value(), b"")
        protocol.dataReceived(request[-1:])
        response = parse_response(transport.value())
        self.assertEqual((response.status, response.body), (200, b"ok"))
        self.assertIs(protocol.kind, Kind.HTTP)
        self.assertEqual(env.counters.proxy_requests["local"], 1)
        self.assertEqual(env.counters.stream_connections, 0)
        self.assertEqual(env.counters.received, 0)

    def test_everything_else_goes_to_the_proxy_on_a_kept_alive_connection(self) -> None:
        env = Env()
        protocol, transport = env.connect()
        two = (
            b"POST /GetSamplingRules HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            b"POST /SamplingTargets?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        protocol.dataReceived(two)
        answers = transport.value()
        self.assertIn(b"proxied /GetSamplingRules", answers)
        self.assertIn(b"proxied /SamplingTargets", answers)
        self.assertFalse(transport.disconnecting)

    def test_stream_header_split_across_packets(self) -> None:
        env = Env()
        protocol, transport = env.stream(
            b'{"for', b'mat":"json","ver', b'sion":1}', b"\n", b'{"id":"a"', b"}\n", b"{", b'"form'
        )
        self.assertIs(protocol.kind, Kind.STREAM)
        self.assertEqual(env.buffer.accepted, [b'{"id":"a"}'])
        protocol.dataReceived(b'at": "json", "version": 1}\n{"id":"b"}\n')
        self.assertEqual(env.buffer.accepted, [b'{"id":"a"}', b'{"id":"b"}'])
        self.assertEqual(env.counters.stream_connections, 1)
        self.assertEqual(env.counters.received, 2)
        self.assertEqual(transport.value(), b"")  # a stream is never answered
        self.assertFalse(transport.disconnecting)

    def test_junk_first_bytes_close_the_connection_and_count(self) -> None:
        env = Env()
        junk = [
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            b"get / HTTP/1.1\r\n",
            b"\r\n",
            b"SOMETHINGVERYLONGWITHOUTSPACE",
            b"\x1b[31mforged\nline",
        ]
        with capturedLogs() as events:
            for data in junk:
                protocol, transport = env.stream(data)
                self.assertTrue(transport.disconnecting, data)
                protocol.dataReceived(b"more of the same")  # already closing: not counted
        self.assertEqual(env.counters.received, len(junk))
        self.assertEqual(env.counters.rejected, len(junk))
        self.assertEqual(env.counters.received_bytes, sum(map(len, junk)))
        self.assertEqual(env.buffer.accepted, [])
        lines = lines_of(events)
        self.assertEqual(len(lines), 1, lines)  # rate-limited
        self.assertIn("Closing TCP connection from 127.0.0.1:50000", lines[0])
        self.assertIn('{"format":"json","version":1}', lines[0])
        self.assertIn("\\x16\\x03", lines[0])

    def test_silent_and_slow_connections_are_closed_after_the_timeout(self) -> None:
        env = Env()
        _, silent = env.connect()
        _, slow = env.stream(b"PO")
        env.clock.advance(29.9)
        self.assertFalse(silent.disconnecting or slow.disconnecting)
        env.clock.advance(0.2)
        self.assertTrue(silent.disconnecting)
        self.assertTrue(slow.disconnecting)
        self.assertEqual(env.counters.received, 0)

    def test_decided_connections_do_not_get_the_sniff_timeout(self) -> None:
        env = Env()
        _, stream = env.stream(record(b"{}"))
        env.clock.advance(299)  # past the sniff timeout, within the stream's idle timeout
        self.assertFalse(stream.disconnecting)


class StreamTests(SynchronousTestCase):
    def test_valid_pairs_are_accepted_in_order(self) -> None:
        env = Env()
        bodies = [doc(i) for i in range(120)]
        data = b"".join(record(b, JAVA_HEADER if i % 3 else HEADER) for i, b in enumerate(bodies))
        # In uneven pieces, as TCP may deliver them.
        _, transport = env.stream(*(data[i : i + 97] for i in range(0, len(data), 97)))
        self.assertEqual(env.buffer.accepted, bodies)
        self.assertEqual(env.counters.received, 120)
        self.assertEqual(env.counters.received_bytes, len(data) - 120)  # without the last "\n"s
        self.assertEqual(env.counters.rejected, 0)
        self.assertEqual(env.counters.spillover, 0)
        self.assertFalse(transport.disconnecting)

    def test_crlf_framing_is_accepted(self) -> None:
        env = Env()
        env.stream(HEADER + b"\r\n" + b'{"id":"a"}\r\n' + HEADER + b"\r\nT1SQUJD\r\n")
        self.assertEqual(env.buffer.accepted, [b'{"id":"a"}', b"T1SQUJD"])

    def test_same_verdicts_as_udp_datagrams(self) -> None:
        headers = [
            HEADER,
            JAVA_HEADER,
            b'{"FORMAT":"JSON","VERSION":1}',
            b'{"version":1,"format":"json","extra":[1,2]}',
            b' {"format":"json","version":1} ',
            b'{"format":"json","version":2}',
            b'{"format":"json","version":"1"}',
            b'{"format":"xml","version":1}',
            b'{"format":"json","version":1}x',
            b"[]",
            b"",
        ]
        bodies = [b'{"id":"a"}', b" ", b""]
        for header in headers:
            for body in bodies:
                case = (header, body)
                udp, tcp = Env(), Env()
                udp_ok = udp.ingest.datagram(header + b"\n" + body)
                # Between two good records, so the stream can start with "{".
                tcp.stream(record(b"first") + header + b"\n" + body + b"\n" + record(b"last"))
                middle = [body] if udp_ok else []
                self.assertEqual(tcp.buffer.accepted, [b"first", *middle, b"last"], case)
                self.assertEqual(tcp.counters.received, 3, case)
                self.assertEqual(tcp.counters.rejected, udp.counters.rejected, case)

    def test_invalid_headers_are_rejected_counted_and_the_stream_resyncs(self) -> None:
        env = Env()
        with capturedLogs() as events:
            env.stream(
                record(b'{"id":"1"}'),
                record(b'{"id":"bad-version"}', b'{"format":"json","version":2}'),  # 1 rejected
                b'{"id":"no-header"}\n',  # a document where a header belongs: 1 rejected
                record(b'{"id":"2"}'),  # ... and this header starts the next record
                record(b""),  # empty document: 1 rejected
                b'{"x":1}\n{"y":2}\n',  # two lines out of step: 1 rejected pair
                record(b'{"id":"3"}'),
            )
        self.assertEqual(env.buffer.accepted, [b'{"id":"1"}', b'{"id":"2"}', b'{"id":"3"}'])
        self.assertEqual(env.counters.rejected, 4)
        self.assertEqual(env.counters.received, 7)
        lines = lines_of(events)
        self.assertEqual(len(lines), 2, lines)  # one per reason, rate-limited
        self.assertIn(
            'Invalid header: {"format":"json","version":2}\\n{"id":"bad-version"}', lines[0]
        )
        self.assertIn("Missing header or segment", lines[1])

    def test_bad_input_is_escaped_in_the_log(self) -> None:
        env = Env()
        with capturedLogs() as events:
            env.stream(b'{"format":"json","version":2}\x1b[31m\n{"id":"x"}\n')
        (line,) = lines_of(events)
        self.assertNotIn("\x1b", line)
        self.assertIn("\\x1b[31m", line)

    def test_an_over_long_line_closes_the_connection(self) -> None:
        env = Env(max_line=100)
        exactly = b'{"id":"' + b"a" * 91 + b'"}'
        self.assertEqual(len(exactly), 100)
        with capturedLogs() as events:
            protocol, transport = env.stream(record(exactly), HEADER + b"\n", b"{" + b"b" * 60)
            self.assertFalse(transport.disconnecting)
            protocol.dataReceived(b"b" * 60)  # 121 bytes and no newline yet
            self.assertTrue(transport.disconnecting)
            protocol.dataReceived(record(b'{"id":"after"}'))  # ignored: the stream is over
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.buffer.accepted, [exactly])
        self.assertEqual(env.counters.received, 2)
        self.assertEqual(env.counters.rejected, 1)
        lines = lines_of(events)
        self.assertEqual(len(lines), 1, lines)
        self.assertIn("Closing segment stream from 127.0.0.1:50000", lines[0])
        self.assertIn("longer than 100 bytes", lines[0])
        self.assertIn("Socket.StreamMaxLineKB", lines[0])

    def test_an_over_long_complete_line_in_one_read(self) -> None:
        env = Env(max_line=100)
        _, transport = env.stream(record(b"c" * 101) + record(b'{"id":"never"}'))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.buffer.accepted, [])
        self.assertEqual((env.counters.received, env.counters.rejected), (1, 1))

    def test_backpressure_pauses_reading_and_resumes_when_budget_frees(self) -> None:
        bodies = [doc(i, 200) for i in range(40)]
        env = Env(capacity=3 * (200 + DOC_OVERHEAD))
        protocol, transport = env.stream(b"".join(record(b) for b in bodies))
        self.assertEqual(env.buffer.accepted, bodies[:3])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(env.counters.received, 4)  # the 4th waits, not dropped
        rounds = 0
        while len(env.buffer.accepted) < len(bodies) and rounds < 50:
            rounds += 1
            env.clock.advance(0)  # nothing freed: still waiting
            self.assertEqual(transport.producerState, "paused")
            env.buffer.release_all()
            env.clock.advance(0)  # the buffer tells the stream, from the reactor
        self.assertEqual(env.buffer.accepted, bodies)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(env.counters.spillover, 0)
        self.assertEqual(env.counters.rejected, 0)
        self.assertEqual(env.counters.received, len(bodies))
        self.assertGreater(env.buffer.waits, 10)
        # Reading continues normally afterwards.
        protocol.dataReceived(record(b"last"))
        self.assertEqual(env.buffer.accepted[-1], b"last")

    def test_waiting_streams_resume_in_the_order_they_stopped(self) -> None:
        env = Env(capacity=2 * (100 + DOC_OVERHEAD))
        env.stream(record(doc(0, 100)), record(doc(1, 100)))  # fills the buffer
        _, t1 = env.stream(record(b"A" * 100))
        _, t2 = env.stream(record(b"B" * 100))
        self.assertEqual((t1.producerState, t2.producerState), ("paused", "paused"))
        env.buffer.release_all()
        env.clock.advance(0)
        self.assertEqual(env.buffer.accepted[2:], [b"A" * 100, b"B" * 100])
        self.assertEqual(env.counters.spillover, 0)

    def test_a_document_bigger_than_the_whole_buffer_is_dropped_not_waited_for(self) -> None:
        env = Env(capacity=1000)
        with capturedLogs() as events:
            _, transport = env.stream(record(b"x" * 1000), record(b"small"))
        self.assertEqual(env.buffer.accepted, [b"small"])
        self.assertEqual(env.counters.spillover, 1)
        self.assertEqual(transport.producerState, "producing")
        self.assertIn("Segment dropped: the buffer", lines_of(events)[0])

    def test_clean_close_without_a_final_newline(self) -> None:
        env = Env()
        protocol, _ = env.stream(record(b"one"), HEADER + b"\n" + b"two")
        self.assertEqual(env.buffer.accepted, [b"one"])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.buffer.accepted, [b"one", b"two"])
        self.assertEqual(env.counters.rejected, 0)

    def test_reset_in_the_middle_of_a_record_counts_it_once(self) -> None:
        env = Env()
        protocol, _ = env.stream(record(b"one"), HEADER + b"\n" + b'{"id":"cut')
        with capturedLogs() as events:
            protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(env.buffer.accepted, [b"one"])
        self.assertEqual((env.counters.received, env.counters.rejected), (2, 1))
        self.assertIn("closed in the middle of a line", lines_of(events)[0])

    def test_header_without_document_at_close_is_rejected(self) -> None:
        env = Env()
        protocol, _ = env.stream(record(b"one"), HEADER + b"\n")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((env.counters.received, env.counters.rejected), (2, 1))

    def test_lost_while_paused_accounts_for_every_complete_line(self) -> None:
        bodies = [doc(i, 100) for i in range(10)]
        env = Env(capacity=2 * (100 + DOC_OVERHEAD))
        protocol, transport = env.stream(b"".join(record(b) for b in bodies))
        self.assertEqual(transport.producerState, "paused")
        protocol.connectionLost(Failure(ConnectionLost()))
        # Nothing can wait any more: what does not fit is spillover, counted.
        self.assertEqual(env.counters.received, 10)
        self.assertEqual(len(env.buffer.accepted) + env.counters.spillover, 10)
        self.assertEqual(env.counters.spillover, 8)
        env.buffer.release_all()
        env.clock.advance(0)  # no stale waiter wakes a closed stream
        self.assertEqual(len(env.buffer.accepted), 2)


class StopTests(SynchronousTestCase):
    def test_stream_between_records_closes_at_once(self) -> None:
        env = Env()
        protocol, transport = env.stream(record(b"one"))
        d = env.factory.stop(grace=1.0)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)

    def test_stream_in_the_middle_of_a_record_finishes_it_first(self) -> None:
        env = Env()
        protocol, transport = env.stream(record(b"one"), HEADER + b"\n", b'{"id":')
        d = env.factory.stop(grace=1.0)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(b'"two"}\n')
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.buffer.accepted, [b"one", b'{"id":"two"}'])
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(env.counters.rejected, 0)

    def test_a_record_that_never_completes_is_cut_at_the_grace_deadline(self) -> None:
        env = Env()
        protocol, transport = env.stream(record(b"one"), HEADER + b"\n" + b"{")
        d = env.factory.stop(grace=1.0)
        env.clock.advance(0.9)
        self.assertFalse(transport.disconnecting)
        env.clock.advance(0.1)
        self.assertTrue(transport.disconnected)  # aborted
        protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertEqual(env.buffer.accepted, [b"one"])
        self.assertEqual((env.counters.received, env.counters.rejected), (2, 1))

    def test_paused_stream_gets_its_document_in_if_budget_frees_in_time(self) -> None:
        env = Env(capacity=100 + DOC_OVERHEAD)
        protocol, transport = env.stream(record(doc(0, 100)), record(doc(1, 100)))
        d = env.factory.stop(grace=1.0)
        self.assertFalse(transport.disconnecting)
        env.buffer.release_all()
        env.clock.advance(0)
        self.assertEqual(env.buffer.accepted, [doc(0, 100), doc(1, 100)])
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(d)
        self.assertEqual(env.counters.spillover, 0)

    def test_http_and_undecided_connections_are_closed(self) -> None:
        env = Env()
        http, t1 = env.stream(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        undecided, t2 = env.stream(b"GE")
        d = env.factory.stop(grace=1.0)
        self.assertTrue(t1.disconnecting and t2.disconnecting)
        http.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(d)
        env.clock.advance(1.0)
        self.assertTrue(t2.disconnected)  # did not go away in time: aborted
        undecided.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_nothing_open(self) -> None:
        self.successResultOf(Env().factory.stop())

    def test_stop_now_cuts_a_record_in_progress_without_the_grace(self) -> None:
        env = Env()
        protocol, transport = env.stream(record(b"one"), HEADER + b"\n" + b"{")
        d = env.factory.stop(grace=1.0)
        self.assertFalse(transport.disconnecting)
        with capturedLogs() as events:
            env.factory.stop_now()  # a second shutdown signal
            env.factory.stop_now()  # (a later one: nothing more is cut, nothing said)
        self.assertTrue(transport.disconnected)  # aborted, no time passed
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Cut 1 open TCP connection(s) without the stop grace; a record a stream was "
             "still sending is rejected as incomplete"],
        )  # fmt: skip
        protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertEqual(env.buffer.accepted, [b"one"])
        self.assertEqual((env.counters.received, env.counters.rejected), (2, 1))
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_stop_now_before_the_stop_cuts_at_once_when_it_comes(self) -> None:
        env = Env()
        env.factory.stop_now()  # the signal came before ingest began to stop
        protocol, transport = env.stream(record(b"one"), HEADER + b"\n" + b"{")
        self.assertFalse(transport.disconnecting)
        d = env.factory.stop(grace=1.0)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertEqual(env.clock.getDelayedCalls(), [])

    def test_stop_now_aborts_http_connections_still_closing(self) -> None:
        env = Env()
        http, transport = env.stream(b"GE")
        d = env.factory.stop(grace=1.0)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected)
        env.factory.stop_now()
        self.assertTrue(transport.disconnected)
        http.connectionLost(Failure(ConnectionLost()))
        self.successResultOf(d)
        self.assertEqual(env.clock.getDelayedCalls(), [])


class IdleTimeoutTests(SynchronousTestCase):
    def test_a_silent_stream_is_closed_after_the_idle_timeout(self) -> None:
        env = Env(stream_idle=60.0)
        protocol, transport = env.stream(record(b"one"))
        env.clock.advance(59)
        protocol.dataReceived(record(b"two"))  # any bytes: not idle
        env.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        with capturedLogs() as events:
            env.clock.advance(1)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.buffer.accepted, [b"one", b"two"])
        self.assertEqual(env.counters.rejected, 0)
        # Routine (a sender that went quiet): not a warning.
        self.assertEqual([e for e in events if e["log_level"] >= LogLevel.info], [])
        self.assertIn("Socket.StreamIdleTimeoutSeconds", lines_of(events)[0])

    def test_a_stream_that_stops_mid_line_is_closed_and_the_record_counted(self) -> None:
        env = Env(stream_idle=60.0)
        protocol, transport = env.stream(record(b"one"), HEADER + b"\n" + b'{"id":')
        env.clock.advance(60)
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.buffer.accepted, [b"one"])
        self.assertEqual((env.counters.received, env.counters.rejected), (2, 1))
        self.assertEqual(env.hold.used, 0)

    def test_no_idle_timeout_while_the_daemon_is_not_reading(self) -> None:
        env = Env(capacity=100 + DOC_OVERHEAD, stream_idle=60.0)
        _protocol, transport = env.stream(record(doc(0, 100)), record(doc(1, 100)))
        self.assertEqual(transport.producerState, "paused")
        env.clock.advance(600)  # an X-Ray outage: the buffer stays full
        self.assertFalse(transport.disconnecting)
        env.buffer.release_all()
        env.clock.advance(0)
        self.assertEqual(transport.producerState, "producing")
        env.clock.advance(59)
        self.assertFalse(transport.disconnecting)
        env.clock.advance(1)  # idle again since it was resumed
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.buffer.accepted, [doc(0, 100), doc(1, 100)])

    def test_zero_means_no_idle_timeout(self) -> None:
        env = Env(stream_idle=None)
        _, transport = env.stream(record(b"one"))
        env.clock.advance(10 * 86400)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(env.clock.getDelayedCalls(), [])


class HoldTests(SynchronousTestCase):
    """Bytes held for unfinished lines are charged to the port's shared budget."""

    def test_unfinished_lines_are_charged_and_given_back(self) -> None:
        env = Env()
        protocol, _ = env.stream(record(b"one"), HEADER + b"\n" + b'{"id":"tw')
        self.assertEqual(env.hold.used, len(b'{"id":"tw'))
        protocol.dataReceived(b'o"}\n' + HEADER)
        self.assertEqual(env.hold.used, len(HEADER))
        protocol.dataReceived(b"\n")
        self.assertEqual(env.hold.used, 0)
        protocol.dataReceived(b"x" * 100)
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(env.hold.used, 0)
        self.assertEqual(env.buffer.accepted, [b"one", b'{"id":"two"}'])

    def test_streams_holding_bytes_stop_being_read_when_the_budget_is_spent(self) -> None:
        env = Env(hold=1000, max_line=4096)
        # Three senders each leave an unfinished line: the third one tips
        # the budget, and every one holding bytes from then on is paused.
        a, ta = env.stream(record(b"a") + HEADER + b"\n" + b"{" + b"a" * 399)
        b, tb = env.stream(HEADER + b"\n" + b"{" + b"b" * 399)
        self.assertEqual((ta.producerState, tb.producerState), ("producing", "producing"))
        c, tc = env.stream(HEADER + b"\n" + b"{" + b"c" * 399)
        self.assertEqual(env.hold.used, 1200)
        self.assertEqual(tc.producerState, "paused")
        # A stream whose reads end with whole lines holds nothing: still read.
        d, td = env.stream(record(b"d"))
        self.assertEqual(td.producerState, "producing")
        self.assertEqual(env.hold.used, 1200)
        a.dataReceived(b"}\n")  # a finishes its line and gives its 400 bytes back
        self.assertEqual(env.hold.used, 800)
        env.clock.advance(0)
        self.assertEqual(tc.producerState, "producing")
        c.dataReceived(b"}\n")
        self.assertEqual(
            env.buffer.accepted, [b"a", b"d", b"{" + b"a" * 399 + b"}", b"{" + b"c" * 399 + b"}"]
        )
        for protocol in (a, b, c, d):
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.hold.used, 0)

    def test_lines_and_the_document_waiting_for_buffer_room_are_held(self) -> None:
        bodies = [doc(i, 100) for i in range(5)]
        env = Env(capacity=100 + DOC_OVERHEAD)
        _protocol, transport = env.stream(b"".join(record(b) for b in bodies))
        self.assertEqual(transport.producerState, "paused")
        waiting = sum(len(record(b)) for b in bodies[2:]) + len(bodies[1])
        self.assertEqual(env.hold.used, waiting)
        rounds = 0
        while len(env.buffer.accepted) < len(bodies) and rounds < 10:
            rounds += 1
            env.buffer.release_all()
            env.clock.advance(0)
        self.assertEqual(env.buffer.accepted, bodies)
        self.assertEqual(env.hold.used, 0)

    def test_an_over_long_line_gives_its_bytes_back(self) -> None:
        env = Env(max_line=100)
        protocol, transport = env.stream(HEADER + b"\n" + b"{" + b"x" * 60, b"x" * 60)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.hold.used, 0)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.hold.used, 0)

    def test_lines_split_in_every_way_across_reads(self) -> None:
        # Lines shorter and longer than the pieces handed to LineReceiver,
        # cut at every offset of a 7-byte and a 4099-byte read.
        bodies = [doc(i, size) for i, size in enumerate((0, 5000, 40, 9000, 4090, 4100, 1))]
        data = b"".join(record(b) for b in bodies)
        for step in (1, 7, 4099, len(data)):
            env = Env(max_line=10_000)
            _protocol, _ = env.stream(*(data[i : i + step] for i in range(0, len(data), step)))
            self.assertEqual(env.buffer.accepted, bodies, step)
            self.assertEqual(env.hold.used, 0, step)


class ConnectionLimitTests(SynchronousTestCase):
    def test_connections_over_the_total_are_refused_counted_and_warned_once(self) -> None:
        env = Env(max_connections=2, warn_interval=10)
        first, _ = env.connect(IPv4Address("TCP", "10.0.0.1", 1))
        env.connect(IPv4Address("TCP", "10.0.0.2", 1))
        with capturedLogs() as events:
            for port in range(5):
                self.assertIsNone(env.factory.buildProtocol(IPv4Address("TCP", "10.0.0.3", port)))
        self.assertEqual(env.counters.tcp_refused, 5)
        (line,) = [formatEvent(e) for e in events]
        self.assertIn("Refusing TCP connection from 10.0.0.3:0: 2 connections are open", line)
        self.assertIn("--tcp-max-connections", line)
        first.connectionLost(Failure(ConnectionDone()))
        env.connect(IPv4Address("TCP", "10.0.0.3", 9))  # room again
        env.clock.advance(10)
        with capturedLogs() as events:
            self.assertIsNone(env.factory.buildProtocol(PEER))
        self.assertIn("(4 more refused connections not logged)", formatEvent(events[0]))

    def test_one_address_may_not_take_every_connection(self) -> None:
        env = Env(max_connections=10, max_per_peer=2)
        mine = [env.connect(IPv4Address("TCP", "10.0.0.1", port))[0] for port in (1, 2)]
        with capturedLogs() as events:
            self.assertIsNone(env.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 3)))
        self.assertIn("that address already has 2 connections open", formatEvent(events[0]))
        env.connect(IPv4Address("TCP", "10.0.0.2", 1))  # another address still gets in
        mine[0].connectionLost(Failure(ConnectionDone()))
        env.connect(IPv4Address("TCP", "10.0.0.1", 4))
        self.assertEqual(env.counters.tcp_refused, 1)
        self.assertEqual(env.factory.per_peer, {"10.0.0.1": 2, "10.0.0.2": 1})

    def test_defaults_follow_the_descriptor_limit(self) -> None:
        cases = [
            # (soft limit, in use, outbound) -> (total, per peer, cramped)
            ((1024, 20, 73), (899, 224, False)),
            ((65536, 20, 73), (AUTO_MAX_CONNECTIONS, 256, False)),
            ((None, 20, 73), (AUTO_MAX_CONNECTIONS, 256, False)),
            ((256, 20, 73), (131, 64, False)),
            ((40, 15, 73), (6, 6, True)),  # ulimit -n 40: a quarter of what is free
            ((16, 16, 73), (1, 1, True)),
        ]
        for args, expected in cases:
            self.assertEqual(connection_limits(*args), expected, args)


# ---------------------------------------------------------------------------
# Real sockets


def docs_emitter() -> Any:
    """The example emitter of docs/stream-format.md, executed: the doc must work."""
    text = DOCS_MD.read_text()
    match = re.search(r"## Example emitter \(Python\)\s+```python\n(.*?)```", text, re.S)
    assert match, "docs/stream-format.md has no Python example emitter"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), str(DOCS_MD), "exec"), namespace)
    return namespace["send_segments"]


class Client(Protocol):
    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = ConnectionDone) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


async def until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """Let the reactor run until ``predicate()`` holds (bounded)."""
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"{what} not reached within {timeout}s")


class LoopbackTests(TestCase):
    def start(
        self, capacity: int = 10_000_000, max_line: int = 64 * 1024
    ) -> tuple[TCPPortService, CollectingBuffer, Counters]:
        counters = Counters()
        buffer = CollectingBuffer(capacity, reactor, counters)
        ingest = Ingest(buffer, counters, reactor)
        root = http_root(Proxied(), {b"health": Data(b"ok", "text/plain")}, counters)
        site = make_site(root, timeout=5, counters=counters, reactor=reactor)
        factory = SniffingFactory(ingest, site, max_line, reactor)
        service = TCPPortService(reactor, bind_tcp(Address("127.0.0.1", 0)), factory)
        with capturedLogs() as events:
            service.startService()
        self.addCleanup(service.stopService)
        self.assertIn(
            f"Starting proxy http server on 127.0.0.1:{service.address.port}", lines_of(events)
        )
        return service, buffer, counters

    async def test_http_arriving_byte_by_byte_and_a_stream_on_the_same_port(self) -> None:
        service, buffer, counters = self.start()
        port = service.address.port
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        raw = await threads.deferToThread(raw_http, port, request, byte_by_byte=True)
        response = parse_response(raw)
        self.assertEqual((response.status, response.body), (200, b"ok"))
        stream = b"".join(record(doc(i)) for i in range(5))
        raw = await threads.deferToThread(raw_http, port, stream, shutdown_write=True)
        self.assertEqual(raw, b"")  # closed by the daemon after the sender's FIN, no answer
        self.assertEqual(buffer.accepted, [doc(i) for i in range(5)])
        self.assertEqual(counters.stream_connections, 1)

    async def test_stop_lets_a_stream_finish_its_record_then_closes_the_port(self) -> None:
        service, buffer, _ = self.start()
        client = Client()
        await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", service.address.port), client
        )
        assert client.transport is not None
        client.transport.write(record(b"one") + HEADER + b"\n" + b'{"id":')
        await until(lambda: buffer.accepted == [b"one"], what="first record")
        stopped = service.stopService()
        assert stopped is not None
        await deferLater(reactor, 0.05, lambda: None)
        self.assertNoResult(stopped)
        client.transport.write(b'"two"}\n')
        await stopped
        await client.lost
        self.assertEqual(buffer.accepted, [b"one", b'{"id":"two"}'])
        with self.assertRaises(ConnectionRefusedError):
            await connectProtocol(
                TCP4ClientEndpoint(reactor, "127.0.0.1", service.address.port), Client()
            )

    async def test_backpressure_end_to_end_nothing_dropped(self) -> None:
        size, count = 2000, 400
        service, buffer, counters = self.start(capacity=10 * (size + DOC_OVERHEAD))
        bodies = [doc(i, size) for i in range(count)]
        uploaded: list[bytes] = []

        def upload_one_batch() -> None:
            # A slow "uploader": one batch of at least 5 documents every 5 ms.
            head = buffer.head()
            if head is not None and (len(head) >= 5 or len(uploaded) + len(head) == count):
                batch = buffer.pop()
                uploaded.extend(batch.docs)
                buffer.release(batch)

        loop = LoopingCall(upload_one_batch)
        loop.clock = reactor
        loop.start(0.005)
        self.addCleanup(loop.stop)
        send = docs_emitter()
        address = ("127.0.0.1", service.address.port)
        await threads.deferToThread(send, [b.decode() for b in bodies], address)
        await until(lambda: len(uploaded) == count, timeout=30, what="every document uploaded")
        self.assertEqual(uploaded, bodies)
        self.assertEqual(counters.spillover, 0)
        self.assertEqual(counters.rejected, 0)
        self.assertEqual(counters.received, count)
        self.assertGreater(buffer.waits, 0)  # the stream did have to wait


class MotoTests(TestCase):
    moto_server = SharedMotoServer()

    async def test_line_framed_segments_arrive_at_moto_like_udp_ones(self) -> None:
        moto = self.moto_server.acquire()
        counters = Counters()
        buffer = SegmentBuffer(10_000_000, reactor, counters)
        ingest = Ingest(buffer, counters, reactor)
        pool = make_pool(reactor, 2)
        self.addCleanup(pool.closeCachedConnections)
        uploader = Uploader(
            client=make_client(reactor, pool),
            endpoint=endpoints.parse(moto.endpoint),
            region=moto.region,
            credentials=StaticCredentials(Credentials(moto.access_key, moto.secret_key)),
            clock=reactor,
            timeout=5,
        )
        self.addCleanup(uploader.close)
        batcher = Batcher(buffer, uploader.put_trace_segments, reactor, counters, concurrency=2)
        batcher.startService()
        self.addCleanup(batcher.stopService)
        site = make_site(http_root(Proxied(), {}), timeout=5, reactor=reactor)
        tcp = TCPPortService(
            reactor,
            bind_tcp(Address("127.0.0.1", 0)),
            SniffingFactory(ingest, site, 64 * 1024, reactor),
        )
        udp = UDPIngestService(reactor, bind_udp(Address("127.0.0.1", 0)), ingest)
        for service in (tcp, udp):
            service.startService()
            self.addCleanup(service.stopService)

        trace_id = f"1-5f84c7a1-{uuid.uuid4().hex[:24]}"
        documents = [
            json.dumps(
                {
                    "trace_id": trace_id,
                    "id": f"{i:016x}",
                    "name": f"tcp-{i}",
                    "start_time": 1602537377.0 + i,
                    "end_time": 1602537378.0 + i,
                    "annotations": {"line": "has \\n escaped"},
                },
                separators=(",", ":"),
            )
            for i in range(7)
        ]
        via_udp = json.dumps(
            {
                "trace_id": trace_id,
                "id": "00000000000000ff",
                "name": "udp",
                "start_time": 1602537300.0,
                "end_time": 1602537301.0,
            }
        )
        await threads.deferToThread(docs_emitter(), documents, ("127.0.0.1", tcp.address.port))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(HEADER + b"\n" + via_udp.encode(), ("127.0.0.1", udp.address.port))

        def complete(stored: list[dict[str, Any]]) -> bool:
            return len(stored) == 8

        stored = await moto.wait_for_documents(complete, trace_ids=[trace_id], timeout=20)
        names = sorted(d["name"] for d in stored)
        self.assertEqual(names, sorted([f"tcp-{i}" for i in range(7)] + ["udp"]))
        raw = {
            segment["Document"]
            for trace in moto.batch_get_traces([trace_id])
            for segment in trace["Segments"]
        }
        self.assertEqual(raw, {*documents, via_udp})  # stored byte for byte as sent
        self.assertEqual(counters.stream_connections, 1)
        self.assertEqual((counters.received, counters.rejected, counters.spillover), (8, 0, 0))
