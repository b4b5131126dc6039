"""The OTLP/HTTP receiver on a real loopback port: answers, limits, refusals by reason.

The site's clock is a ``task.Clock`` (deadlines and idle timeouts move only
when the test says so); the sockets are real.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import socket
import threading
import zlib
from typing import Any

import treq
from google.protobuf import json_format
from google.rpc import status_pb2
from twisted.internet import reactor as _reactor
from twisted.internet import threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.pipeline.test_otlp_upload import otlp_request
from tests.support.held_calls import HeldCalls
from tests.support.logs import capture_logs
from xraytwisted.ingest import otlp_http
from xraytwisted.ingest.otlp_http import OtlpHTTPService, OtlpTracesResource, inflate, otlp_site
from xraytwisted.listen.bind import bind_tcp
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.offload import thread_pool_runner
from xraytwisted.pipeline.otlp_batches import KIND_JSON, KIND_PROTOBUF, SpanBuffer, unframe
from xraytwisted.settings.addresses import Address

reactor: Any = _reactor
PROTOBUF = {"Content-Type": "application/x-protobuf"}
JSON = {"Content-Type": "application/json"}


class RawClient(Protocol):
    """A TCP client that records what it gets and when the server closes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.closed.callback(None)


def send_then_read(port: int, data: bytes) -> tuple[bytes, str]:
    """(what came back, the socket error if there was one) for a blocking client."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        try:
            sock.sendall(data)
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError as e:
            return answer, repr(e)
    return answer, ""


class ReceiverTests(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = OtlpCounters()
        self.segments = SegmentBuffer(1_000_000, self.clock, Counters())
        self.buffer = SpanBuffer(self.segments, self.clock, self.counters.requests)
        self.start(max_body=1_000_000)

    def start(
        self, max_body: int, max_connections: int = 4, hold: int | None = None, **kwargs: Any
    ) -> None:
        resource = OtlpTracesResource(
            self.buffer, self.counters, self.clock, max_body=max_body, **kwargs
        )
        extra = {} if hold is None else {"hold": HeldBytes(hold, self.clock)}
        self.site = otlp_site(
            resource,
            clock=self.clock,
            idle_timeout=30,
            deadline=5,
            max_connections=max_connections,
            max_wire_body=max_body + 100,
            **extra,
        )
        self.service = OtlpHTTPService(reactor, bind_tcp(Address("127.0.0.1", 0)), self.site)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.url = f"http://127.0.0.1:{self.service.address.port}/v1/traces"

    @inlineCallbacks
    def post(
        self, body: bytes, headers: dict[str, str], path: str = "/v1/traces", method: str = "POST"
    ) -> Any:
        url = f"http://127.0.0.1:{self.service.address.port}{path}"
        from twisted.web.client import HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        response = yield treq.request(method, url, data=body, headers=headers, pool=pool)
        content = yield response.content()
        return response, content

    def queued(self) -> list[tuple[int, int, bytes]]:
        out = []
        for batch in self.buffer.drain():
            for doc in batch.docs:
                kind, spans, body = unframe(doc)
                out.append((kind, spans, bytes(body)))
        return out

    def status_message(self, content: bytes) -> str:
        status = status_pb2.Status()
        status.ParseFromString(content)
        return str(status.message)

    @inlineCallbacks
    def test_protobuf_request_is_queued_and_answered_with_an_empty_response(self) -> Any:
        body = otlp_request("a", "b").SerializeToString()
        response, content = yield self.post(body, PROTOBUF)
        self.assertEqual(response.code, 200)
        self.assertEqual(content, b"")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-protobuf"])
        self.assertEqual(self.queued(), [(KIND_PROTOBUF, 2, body)])
        self.assertEqual((self.counters.requests_received, self.counters.spans_received), (1, 2))

    @inlineCallbacks
    def test_gzip_and_deflate_bodies(self) -> Any:
        body = otlp_request("z").SerializeToString()
        for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
            response, _ = yield self.post(packed, {**PROTOBUF, "Content-Encoding": encoding})
            self.assertEqual(response.code, 200, encoding)
        self.assertEqual([q[2] for q in self.queued()], [body, body])

    @inlineCallbacks
    def test_large_bodies_are_checked_in_the_reactors_thread_pool(self) -> Any:
        yield self.service.stopService()
        self.start(max_body=1_000_000, run_in_thread=thread_pool_runner(reactor), thread_bytes=0)
        threads = []

        def check_body(*args: Any) -> Any:
            threads.append(threading.current_thread())
            return checked(*args)

        checked = otlp_http.check_body
        self.patch(otlp_http, "check_body", check_body)
        body = otlp_request("t1", "t2").SerializeToString()
        response, _ = yield self.post(gzip.compress(body), {**PROTOBUF, "Content-Encoding": "gzip"})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.queued(), [(KIND_PROTOBUF, 2, body)])
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())

    @inlineCallbacks
    def test_json_request(self) -> Any:
        body = json_format.MessageToJson(otlp_request("j")).encode()
        response, content = yield self.post(
            body, {"Content-Type": "application/json; charset=utf-8"}
        )
        self.assertEqual((response.code, content), (200, b"{}"))
        self.assertEqual(self.queued(), [(KIND_JSON, 1, body)])

    @inlineCallbacks
    def test_a_request_without_spans_is_answered_and_not_queued(self) -> Any:
        response, _ = yield self.post(b"", PROTOBUF)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.queued(), [])

    @inlineCallbacks
    def test_junk_is_400_with_a_status_message(self) -> Any:
        response, content = yield self.post(b"\x0a\x05abc", PROTOBUF)
        self.assertEqual(response.code, 400)
        self.assertIn("not an OTLP ExportTraceServiceRequest", self.status_message(content))
        response, content = yield self.post(b"{nope", JSON)
        self.assertEqual(response.code, 400)
        self.assertIn("not JSON", json.loads(content)["message"])
        response, content = yield self.post(
            b"\x1f\x8b junk", {**PROTOBUF, "Content-Encoding": "gzip"}
        )
        self.assertEqual(response.code, 400)
        self.assertEqual(self.counters.refused["bad_data"], 3)
        self.assertEqual(self.queued(), [])

    @inlineCallbacks
    def test_gzip_bomb_is_413(self) -> Any:
        bomb = gzip.compress(bytes(5_000_000), 9)  # ~5 KB that inflate to 5 MB
        self.assertLess(len(bomb), 10_000)
        response, content = yield self.post(bomb, {**PROTOBUF, "Content-Encoding": "gzip"})
        self.assertEqual(response.code, 413)
        self.assertIn("larger than 1000000 bytes", self.status_message(content))
        self.assertEqual(self.counters.refused["too_large"], 1)

    def test_inflate_stops_at_the_limit(self) -> None:
        self.assertIsNone(inflate(gzip.compress(bytes(1001)), b"gzip", 1000))
        self.assertEqual(inflate(gzip.compress(bytes(1000)), b"gzip", 1000), bytes(1000))
        two = gzip.compress(b"ab") + gzip.compress(b"cd")
        self.assertEqual(inflate(two, b"gzip", 1000), b"abcd")
        self.assertRaises(otlp_http.BadBody, inflate, gzip.compress(b"abc")[:-3], b"gzip", 10)
        self.assertRaises(otlp_http.BadBody, inflate, zlib.compress(b"a") + b"x", b"deflate", 10)

    def test_inflate_takes_at_most_64_gzip_members(self) -> None:
        self.assertEqual(inflate(gzip.compress(b"a") * 64, b"gzip", 1000), b"a" * 64)
        with self.assertRaises(otlp_http.BadBody) as raised:
            inflate(gzip.compress(b"a") * 65, b"gzip", 1000)
        self.assertIn("too many gzip members", str(raised.exception))

    def test_inflate_work_is_linear_in_the_body(self) -> None:
        # zlib copies what follows a member's end (unused_data): fed the
        # rest of the body for every member, the work grows with the square
        # of the body.  Count the bytes given to zlib.
        fed = [0]
        real = zlib.decompressobj

        class Counting:
            def __init__(self, wbits: int) -> None:
                self._real = real(wbits)

            def decompress(self, data: Any, max_length: int = 0) -> bytes:
                fed[0] += len(data)
                return self._real.decompress(data, max_length)

            def __getattr__(self, name: str) -> Any:
                return getattr(self._real, name)

        self.patch(zlib, "decompressobj", Counting)
        members = [gzip.compress(os.urandom(50_000), 1) for _ in range(64)]
        data = b"".join(members)
        self.assertEqual(len(inflate(data, b"gzip", 10**7) or b""), 64 * 50_000)
        self.assertLessEqual(fed[0], 3 * len(data))  # fed the rest each time: ~32x

    @inlineCallbacks
    def test_a_body_of_many_gzip_members_is_400(self) -> Any:
        empty = gzip.compress(b"")
        response, content = yield self.post(empty * 1000, {**PROTOBUF, "Content-Encoding": "gzip"})
        self.assertEqual(response.code, 400)
        self.assertIn("too many gzip members", self.status_message(content))
        self.assertEqual(self.counters.refused["bad_data"], 1)
        response, _ = yield self.post(empty * 64, {**PROTOBUF, "Content-Encoding": "gzip"})
        self.assertEqual(response.code, 200)  # an empty request, in 64 members

    @inlineCallbacks
    def test_deeply_nested_json_is_400_bad_data(self) -> Any:
        events = capture_logs(self)
        response, content = yield self.post(b"[" * 200_000, JSON)
        self.assertEqual(response.code, 400)
        self.assertIn("nested too deeply", json.loads(content)["message"])
        self.assertEqual(self.counters.refused["bad_data"], 1)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])

    @inlineCallbacks
    def test_an_error_in_the_receiver_is_a_counted_500_logged_once_per_interval(self) -> Any:
        def broken(data: bytes) -> Any:
            raise KeyError("a bug")

        self.patch(otlp_http.otlp_wire, "request_shape", broken)
        events = capture_logs(self)
        body = otlp_request("a").SerializeToString()
        for _ in range(3):
            response, content = yield self.post(body, PROTOBUF)
            self.assertEqual(response.code, 500)
            self.assertIn("internal error", self.status_message(content))
        self.assertEqual(self.counters.refused["internal_error"], 3)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])
        logged = [formatEvent(e) for e in events if "answered 500" in formatEvent(e)]
        self.assertEqual(len(logged), 1)  # throttled: one line per 10 s
        self.flushLoggedErrors(KeyError)

    @inlineCallbacks
    def test_body_over_the_wire_limit_is_refused_as_it_arrives(self) -> Any:
        yield self.service.stopService()
        self.start(max_body=1000)
        response, content = yield self.post(b"\x0a" * 5000, PROTOBUF)
        self.assertEqual(response.code, 413)
        self.assertIn("larger than 1100 bytes", self.status_message(content))
        self.assertEqual(self.counters.refused["too_large"], 1)

    @inlineCallbacks
    def test_a_body_a_little_over_the_wire_limit_gets_its_413_not_a_reset(self) -> Any:
        # What an SDK does: send the whole body, then read.  With the real
        # limit (over the 4 MiB the bounded Site lingers for at least), the
        # receiver used to close at once: the SDK saw a reset and sent the
        # 6 MB again and again.
        yield self.service.stopService()
        self.start(max_body=otlp_http.MAX_BODY)
        body = b"\x0a" * 6_000_000
        head = (
            b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        port = self.service.address.port
        answer, failure = yield threads.deferToThread(send_then_read, port, head + body)
        self.assertEqual(failure, "")
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n"), answer)
        self.assertEqual(self.counters.refused["too_large"], 1)

    @inlineCallbacks
    def test_refusals_by_reason(self) -> Any:
        body = otlp_request("a").SerializeToString()
        cases = [
            (body, {**PROTOBUF, "Origin": "https://evil.example"}, "/v1/traces", "POST", 403),
            (body, PROTOBUF, "/v1/metrics", "POST", 404),
            (b"", PROTOBUF, "/v1/traces", "GET", 405),
            (body, {"Content-Type": "text/plain"}, "/v1/traces", "POST", 415),
            (body, {**PROTOBUF, "Content-Encoding": "br"}, "/v1/traces", "POST", 415),
        ]
        for data, headers, path, method, status in cases:
            response, _ = yield self.post(data, headers, path, method)
            self.assertEqual(response.code, status, (headers, path, method))
            if status == 405:
                self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
        refused = {k: v for k, v in self.counters.refused.items() if v}
        self.assertEqual(
            refused, {"origin": 1, "not_found": 1, "bad_method": 1, "unsupported_media": 2}
        )
        self.assertEqual(self.queued(), [])

    @inlineCallbacks
    def test_more_spans_than_xray_takes_is_400(self) -> Any:
        body = otlp_request(*["s"] * 10_001).SerializeToString()
        response, content = yield self.post(body, PROTOBUF)
        self.assertEqual(response.code, 400)
        self.assertIn("X-Ray takes at most 10000", self.status_message(content))
        self.assertEqual(self.counters.refused["too_many_spans"], 1)

    @inlineCallbacks
    def test_full_buffer_is_503_with_retry_after(self) -> Any:
        self.segments.offer(b"x" * 999_000)  # segments hold nearly all of the budget
        body = otlp_request("a").SerializeToString() + b"\x12\x00" * 1000
        response, content = yield self.post(body, PROTOBUF)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["2"])
        self.assertIn("memory buffer is full", self.status_message(content))
        self.assertEqual(self.counters.refused["buffer_full"], 1)
        self.assertEqual(self.counters.spans_received, 0)

    @inlineCallbacks
    def raw(self, data: bytes) -> Any:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.address.port)
        yield connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.write(data)
        return client

    @inlineCallbacks
    def test_bodies_still_arriving_are_bounded_by_the_hold(self) -> Any:
        yield self.service.stopService()
        self.start(max_body=1_000_000, hold=2500)
        hold = self.site.limits.hold
        assert hold is not None
        head = b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
        # A sender announces a body that fits, sends most of it and goes quiet.
        first = yield self.raw(head + b"Content-Length: 1800\r\n\r\n" + b"\x0a" * 1500)
        yield self.until(lambda: hold.used == 1500)
        # Chunked: no length to judge by, refused as its body arrives.
        second = yield self.raw(
            head + b"Transfer-Encoding: chunked\r\n\r\n4b0\r\n" + b"\x0a" * 1200 + b"\r\n"
        )
        yield second.closed
        self.assertTrue(second.data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertIn(b"\r\nRetry-After: 2\r\n", second.data)
        self.assertIn(b"OTLP.HoldMB", second.data)
        self.assertEqual(hold.used, 1500)
        # A third announces more than is left: refused before its body.
        third = yield self.raw(head + b"Content-Length: 1200\r\n\r\n")
        yield third.closed
        self.assertTrue(third.data.startswith(b"HTTP/1.1 503 Service Unavailable\r\n"))
        self.assertEqual(self.counters.refused["hold_full"], 2)
        self.assertLessEqual(hold.peak, hold.capacity)
        # The quiet sender leaves: its bytes are given back, and a request fits again.
        assert first.transport is not None
        first.transport.loseConnection()
        yield first.closed
        yield self.until(lambda: hold.used == 0)
        body = otlp_request("a").SerializeToString()
        response, _ = yield self.post(body, PROTOBUF)
        self.assertEqual(response.code, 200)
        self.assertEqual(hold.used, 0)  # answered: released

    @inlineCallbacks
    def test_request_deadline(self) -> Any:
        client = RawClient()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.address.port)
        yield connectProtocol(endpoint, client)
        assert client.transport is not None
        client.transport.write(
            b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
        )
        yield self.until(lambda: any(c._deadline for c in self.site.channels))
        self.clock.advance(5)
        yield client.closed
        self.assertTrue(client.data.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.data)
        self.assertEqual(self.counters.refused["deadline"], 1)

    @inlineCallbacks
    def test_connection_cap(self) -> Any:
        yield self.service.stopService()
        self.start(max_body=1000, max_connections=1)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.address.port)
        first, second = RawClient(), RawClient()
        yield connectProtocol(endpoint, first)
        yield self.until(lambda: len(self.site.channels) == 1)
        yield connectProtocol(endpoint, second)
        yield second.closed  # closed by the server at once
        self.assertEqual(self.counters.refused["too_many_connections"], 1)
        self.assertFalse(first.closed.called)
        yield self.service.stopService()  # closes the open connection too
        yield first.closed

    def until(self, condition: Any, tries: int = 200) -> Deferred[None]:
        """Fires once ``condition()`` is true (polled every 10 ms, bounded)."""
        from twisted.internet.task import deferLater

        @inlineCallbacks
        def poll() -> Any:
            for _ in range(tries):
                if condition():
                    return
                yield deferLater(reactor, 0.01, lambda: None)
            raise AssertionError("condition never became true")

        return poll()


class ReceiverSiteTests(SynchronousTestCase):
    """The receiver's Site over ``StringTransport``: what the shared bounded Site brought."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = OtlpCounters()
        segments = SegmentBuffer(1_000_000, self.clock, Counters())
        buffer = SpanBuffer(segments, self.clock, self.counters.requests)
        resource = OtlpTracesResource(buffer, self.counters, self.clock, max_body=1000)
        self.site = otlp_site(resource, clock=self.clock, idle_timeout=30, max_wire_body=1100)

    def connect(self) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return channel, transport

    def test_a_refused_body_is_read_to_its_end_so_the_sdk_sees_the_answer(self) -> None:
        # Closing with the body still arriving resets the connection: the SDK
        # saw a broken pipe (and retried) instead of the 413.
        channel, transport = self.connect()
        channel.dataReceived(
            b"POST /v1/traces HTTP/1.1\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: 5000\r\n\r\n" + b"\x0a" * 1000
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 Request Entity Too Large"))
        self.assertEqual(self.counters.refused["too_large"], 1)
        channel.dataReceived(b"\x0a" * 3999)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"\x0a")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.site.limits.hold.used, 0)  # type: ignore[union-attr]

    def test_idle_connections_are_closed_at_debug(self) -> None:
        # (twisted.web logs each at info: a line per SDK connection.)
        _, transport = self.connect()
        with capturedLogs() as events:
            self.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        self.assertEqual([e["log_level"] for e in events], [LogLevel.debug])


THRESHOLD = 400  # thread_bytes in the tests below


def incompressible(spans: int) -> bytes:
    """An OTLP request of ``spans`` spans whose names do not compress."""
    names = [hashlib.sha256(b"%d" % i).hexdigest() for i in range(spans)]
    return otlp_request(*names).SerializeToString()


class ThreadedCheckTests(SynchronousTestCase):
    """Bodies of ``thread_bytes`` or more are inflated and checked off the reactor.

    ``HeldCalls`` stands in for the thread pool: the check runs when the
    test says, so what happens meanwhile can be seen.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = OtlpCounters()
        segments = SegmentBuffer(1_000_000, self.clock, Counters())
        self.buffer = SpanBuffer(segments, self.clock, self.counters.requests)
        self.runner = HeldCalls()
        self.resource = OtlpTracesResource(
            self.buffer,
            self.counters,
            self.clock,
            max_body=100_000,
            run_in_thread=self.runner,
            thread_bytes=THRESHOLD,
        )
        self.hold = HeldBytes(1_000_000, self.clock)
        self.site = otlp_site(
            self.resource,
            clock=self.clock,
            idle_timeout=30,
            deadline=5,
            max_wire_body=100_100,
            hold=self.hold,
        )
        self.big = incompressible(12)
        self.packed = gzip.compress(self.big, mtime=0)
        self.assertGreaterEqual(len(self.packed), THRESHOLD)

    def post(
        self, body: bytes, encoding: bytes = b"gzip", ctype: bytes = b"application/x-protobuf"
    ) -> tuple[Any, StringTransport]:
        address = IPv4Address("TCP", "127.0.0.1", 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST /v1/traces HTTP/1.1\r\nHost: localhost\r\nContent-Type: %s\r\n"
            b"Content-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (ctype, encoding, len(body), body)
        )
        return channel, transport

    def answer(self, transport: StringTransport) -> tuple[bytes, bytes | None, bytes]:
        """(status line, content type, body) of what was written."""
        head, _, body = transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        ctype = [
            line.split(b": ", 1)[1] for line in lines if line.lower().startswith(b"content-type")
        ]
        return lines[0], ctype[0] if ctype else None, body

    def queued(self) -> list[bytes]:
        return [bytes(unframe(doc)[2]) for batch in self.buffer.drain() for doc in batch.docs]

    def test_bodies_received_smaller_than_the_threshold_are_checked_inline(self) -> None:
        # The threshold is on the body as received: this one inflates to more.
        raw = otlp_request(*["a"] * 60).SerializeToString()
        packed = gzip.compress(raw)
        self.assertLess(len(packed), THRESHOLD)
        self.assertGreater(len(raw), THRESHOLD)
        _, transport = self.post(packed)
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(self.answer(transport)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(self.queued(), [raw])

    def test_large_bodies_are_checked_in_a_thread_and_answered_after(self) -> None:
        _, transport = self.post(self.packed)
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(transport.value(), b"")
        self.assertEqual((self.counters.requests_received, self.queued()), (0, []))
        self.runner.run()
        self.assertEqual(
            self.answer(transport), (b"HTTP/1.1 200 OK", b"application/x-protobuf", b"")
        )
        self.assertEqual(self.queued(), [self.big])
        self.assertEqual((self.counters.requests_received, self.counters.spans_received), (1, 12))
        self.assertEqual(self.hold.used, 0)

    def test_answers_and_counters_are_those_of_the_inline_check(self) -> None:
        # A field longer than the body, then bytes that do not compress.
        junk = gzip.compress(b"\x0a\xff\xff\x03" + incompressible(12), mtime=0)
        corrupt = self.packed[:200] + bytes(b ^ 0x55 for b in self.packed[200:])
        bomb = gzip.compress(b"\0" * 2_000_000, mtime=0)
        json_body = json_format.MessageToJson(otlp_request(*["j"] * 20)).encode()
        cases = [
            (self.packed, b"gzip", b"application/x-protobuf"),
            (zlib.compress(self.big), b"deflate", b"application/x-protobuf"),
            (junk, b"gzip", b"application/x-protobuf"),
            (corrupt, b"gzip", b"application/x-protobuf"),
            (bomb, b"gzip", b"application/json"),
            (json_body, b"identity", b"application/json"),
            (self.big, b"identity", b"application/x-protobuf"),
        ]
        for body, _, _ in cases:
            self.assertGreaterEqual(len(body), THRESHOLD)
        seen = {}
        counters = self.counters
        for thread_bytes in (10**9, THRESHOLD):
            self.resource.thread_bytes = thread_bytes
            before = dict(counters.refused)
            received = (counters.requests_received, counters.spans_received)
            answers = []
            for body, encoding, ctype in cases:
                _, transport = self.post(body, encoding, ctype)
                self.assertEqual(len(self.runner.calls), int(thread_bytes == THRESHOLD))
                self.runner.run_all()
                answers.append(self.answer(transport))
            refused = {k: v - before.get(k, 0) for k, v in counters.refused.items()}
            counts = (
                counters.requests_received - received[0],
                counters.spans_received - received[1],
            )
            queued = self.queued()
            seen[thread_bytes] = answers, {k: v for k, v in refused.items() if v}, counts, queued
        self.assertEqual(seen[THRESHOLD], seen[10**9])
        answers, refused, counts, queued = seen[THRESHOLD]
        self.assertEqual(
            [a[0] for a in answers],
            [b"HTTP/1.1 200 OK"] * 2
            + [b"HTTP/1.1 400 Bad Request"] * 2
            + [b"HTTP/1.1 413 Request Entity Too Large", b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK"],
        )
        self.assertEqual(refused, {"bad_data": 2, "too_large": 1})
        self.assertEqual(counts, (4, 56))
        self.assertEqual(sorted(queued), sorted([self.big, self.big, json_body, self.big]))

    def test_the_request_deadline_does_not_run_while_the_body_is_checked(self) -> None:
        # The deadline bounds the client's sending, which is over; the check
        # itself is bounded work (5 MB of zlib at most).
        _, transport = self.post(self.packed)
        self.clock.advance(10)  # twice the deadline
        self.assertEqual(transport.value(), b"")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.counters.refused["deadline"], 0)
        self.runner.run()
        self.assertEqual(self.answer(transport)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(self.queued(), [self.big])

    def test_the_body_stays_held_until_its_check_ends_even_if_the_client_goes(self) -> None:
        channel, transport = self.post(self.packed)
        self.assertEqual(self.hold.used, len(self.packed))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.hold.used, len(self.packed))  # still in memory, in the thread
        self.runner.run()
        self.assertEqual(self.hold.used, 0)
        # It saw no 200 and will send again: not queued, not counted.
        self.assertEqual((transport.value(), self.queued()), (b"", []))
        self.assertEqual(self.counters.requests_received, 0)

    def test_an_error_in_the_thread_is_a_counted_500(self) -> None:
        def broken(data: bytes) -> Any:
            raise KeyError("a bug")

        self.patch(otlp_http.otlp_wire, "request_shape", broken)
        events = capture_logs(self)
        _, transport = self.post(self.packed)
        self.runner.run()
        self.assertEqual(self.answer(transport)[0], b"HTTP/1.1 500 Internal Server Error")
        self.assertEqual(self.counters.refused["internal_error"], 1)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)
        self.assertEqual(self.hold.used, 0)

    def test_a_second_signal_stops_waiting_for_bodies_being_checked(self) -> None:
        # A check stuck in the thread pool (behind a DNS lookup, say) must not
        # hold the stop once the operator asked for it now.
        sock = bind_tcp(Address("127.0.0.1", 0))
        self.addCleanup(sock.close)
        service = OtlpHTTPService(self.clock, sock, self.site)
        channel, transport = self.post(self.packed)
        closed = service.closed()
        assert closed is not None
        self.assertNoResult(closed)
        service.stop_now()
        self.assertTrue(transport.disconnecting or transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.runner.run()  # the check ends later: its client is gone
        self.assertEqual(self.queued(), [])
        self.assertEqual(self.hold.used, 0)

    def test_stopping_waits_for_bodies_being_checked_then_closes(self) -> None:
        sock = bind_tcp(Address("127.0.0.1", 0))
        self.addCleanup(sock.close)
        service = OtlpHTTPService(self.clock, sock, self.site)
        channel, transport = self.post(self.packed)
        closed = service.closed()
        assert closed is not None
        self.assertNoResult(closed)
        self.assertFalse(transport.disconnecting)
        self.runner.run()
        self.assertEqual(self.answer(transport)[0], b"HTTP/1.1 200 OK")
        self.assertEqual(self.queued(), [self.big])
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        channel.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
