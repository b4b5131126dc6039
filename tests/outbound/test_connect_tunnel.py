"""Tests for xraytwisted.outbound.connect_tunnel: the HTTP CONNECT tunnel endpoint.

``ConnectProtocolTests`` drive the endpoint over an in-memory transport (every
byte boundary, the timeout on a Clock, cancellation at each stage);
``LoopbackFakeProxyTests`` run it against a tiny CONNECT proxy on 127.0.0.1.
"""

from __future__ import annotations

import base64
import socket
from typing import Any

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IAddress, IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from tests.support.tls import LOCALHOST, ConnectionTracker
from xraytwisted.outbound.connect_tunnel import (
    MAX_ANSWER_BYTES,
    HTTPConnectProxyEndpoint,
    ProxyConnectError,
    connect_target,
)

XRAY_HOST = "xray.us-east-2.amazonaws.com"
AUTH = "Basic " + base64.b64encode(b"user:secret").decode()
REQUEST = (
    b"CONNECT xray.us-east-2.amazonaws.com:443 HTTP/1.1\r\n"
    b"Host: xray.us-east-2.amazonaws.com:443\r\n\r\n"
)


class Recorder(Protocol):
    """The protocol that should end up talking through the tunnel."""

    def __init__(self) -> None:
        self.made = False
        self.received = b""
        self.lost: Failure | None = None
        self.lost_d: Deferred[None] = Deferred()
        self._expecting: list[tuple[bytes, Deferred[None]]] = []

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for item in list(self._expecting):
            if item[0] in self.received:
                self._expecting.remove(item)
                item[1].callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
        self.lost_d.callback(None)

    def expect(self, data: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if data in self.received:
            d.callback(None)
        else:
            self._expecting.append((data, d))
        return d


class RecorderFactory(Factory):
    noisy = False

    def __init__(self, build: bool = True) -> None:
        self.built: list[Recorder] = []
        self.build = build
        self.starts = 0
        self.stops = 0

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:
        if not self.build:
            return None
        protocol = Recorder()
        self.built.append(protocol)
        return protocol

    def doStart(self) -> None:
        self.starts += 1

    def doStop(self) -> None:
        self.stops += 1


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """A proxy endpoint whose connections are StringTransports the test completes."""

    def __init__(self) -> None:
        self.factory: IProtocolFactory | None = None
        self.pending: Deferred[IProtocol] | None = None
        self.cancelled = False

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        def cancel(d: Deferred[IProtocol]) -> None:
            self.cancelled = True
            d.errback(error.ConnectingCancelledError(None))

        self.factory = protocolFactory
        self.pending = Deferred(cancel)
        return self.pending

    def complete(self) -> tuple[IProtocol, StringTransport]:
        assert self.factory is not None and self.pending is not None
        self.factory.doStart()
        protocol = self.factory.buildProtocol(IPv4Address("TCP", LOCALHOST, 3128))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.pending.callback(protocol)
        return protocol, transport


class ConnectProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.proxy = MemoryEndpoint()
        self.factory = RecorderFactory()

    def connect(
        self, host: str = XRAY_HOST, port: int = 443, **kwargs: Any
    ) -> tuple[Deferred[IProtocol], IProtocol, StringTransport]:
        endpoint = HTTPConnectProxyEndpoint(self.proxy, host, port, clock=self.clock, **kwargs)
        d = endpoint.connect(self.factory)
        tunnel, transport = self.proxy.complete()
        return d, tunnel, transport

    def failure_of(self, d: Deferred[Any]) -> Failure:
        failure: Failure = self.failureResultOf(d)
        return failure

    def test_request_bytes(self) -> None:
        d, _, transport = self.connect()
        self.assertEqual(transport.value(), REQUEST)
        self.assertNoResult(d)

    def test_request_with_proxy_authorization(self) -> None:
        _, _, transport = self.connect(proxy_authorization=AUTH)
        self.assertEqual(
            transport.value(),
            b"CONNECT xray.us-east-2.amazonaws.com:443 HTTP/1.1\r\n"
            b"Host: xray.us-east-2.amazonaws.com:443\r\n"
            b"Proxy-Authorization: Basic dXNlcjpzZWNyZXQ=\r\n\r\n",
        )

    def test_ipv6_and_idna_targets(self) -> None:
        _, _, transport = self.connect("::1", 8443)
        self.assertTrue(transport.value().startswith(b"CONNECT [::1]:8443 HTTP/1.1\r\n"))
        self.assertEqual(connect_target("fd00::1", 443), "[fd00::1]:443")
        self.proxy = MemoryEndpoint()
        _, _, transport = self.connect("b\u00fccher.example", 443)
        self.assertTrue(transport.value().startswith(b"CONNECT xn--bcher-kva.example:443 "))

    def test_established_byte_by_byte(self) -> None:
        d, tunnel, transport = self.connect()
        answer = b"HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\n"
        for i in range(len(answer) - 1):
            tunnel.dataReceived(answer[i : i + 1])
            self.assertNoResult(d)
        tunnel.dataReceived(answer[-1:])
        wrapped = self.successResultOf(d)
        self.assertIs(wrapped, self.factory.built[0])
        recorder = self.factory.built[0]
        self.assertTrue(recorder.made)
        self.assertIs(recorder.transport, transport)
        # Both directions now go straight through.
        transport.clear()
        recorder.transport.write(b"client hello")  # type: ignore[union-attr]
        self.assertEqual(transport.value(), b"client hello")
        tunnel.dataReceived(b"server hello")
        self.assertEqual(recorder.received, b"server hello")
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the timeout is gone

    def test_bytes_after_the_answer_reach_the_protocol(self) -> None:
        d, tunnel, _ = self.connect()
        tunnel.dataReceived(b"HTTP/1.0 200 OK\n\nearly bytes")
        self.successResultOf(d)
        self.assertEqual(self.factory.built[0].received, b"early bytes")

    def test_any_2xx_opens_the_tunnel(self) -> None:
        for status in (b"200", b"201", b"204", b"299"):
            self.proxy = MemoryEndpoint()
            d, tunnel, _ = self.connect()
            tunnel.dataReceived(b"HTTP/1.1 " + status + b"\r\n\r\n")
            self.successResultOf(d)

    def test_refused(self) -> None:
        answers = {
            b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n": (
                "HTTP/1.1 407 Proxy Authentication Required"
            ),
            b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nnope!": "HTTP/1.1 403 Forbidden",
            b"HTTP/1.0 502 Bad Gateway\r\n\r\n": "HTTP/1.0 502 Bad Gateway",
            b"HTTP/1.1 301 Moved\r\n\r\n": "HTTP/1.1 301 Moved",
            b"HTTP/1.1 100 Continue\r\n\r\n": "HTTP/1.1 100 Continue",
        }
        for answer, status_line in answers.items():
            self.proxy = MemoryEndpoint()
            d, tunnel, transport = self.connect()
            tunnel.dataReceived(answer)
            failure = self.failure_of(d)
            failure.trap(ProxyConnectError)
            self.assertEqual(
                str(failure.value), f"proxy refused CONNECT to {XRAY_HOST}:443: {status_line}"
            )
            self.assertTrue(transport.disconnected, "the proxy connection is aborted")
        self.assertEqual(self.factory.built, [])  # never handed to the real protocol
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_refusal_is_a_connect_error(self) -> None:
        d, tunnel, _ = self.connect()
        tunnel.dataReceived(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
        self.assertIsInstance(self.failure_of(d).value, error.ConnectError)

    def test_garbage(self) -> None:
        for answer in (
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"\x16\x03\x01\x02\x00\r\n\r\n",
            b"\r\n\r\n",
        ):
            self.proxy = MemoryEndpoint()
            d, tunnel, transport = self.connect()
            tunnel.dataReceived(answer)
            failure = self.failure_of(d)
            failure.trap(ProxyConnectError)
            message = str(failure.value)
            self.assertIn(f"proxy sent an invalid answer to CONNECT {XRAY_HOST}:443: ", message)
            self.assertTrue(message.isprintable(), message)
            self.assertTrue(transport.disconnected)

    def test_endless_answer(self) -> None:
        d, tunnel, transport = self.connect()
        chunk = b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 4000 + b"\r\n"
        for _ in range(MAX_ANSWER_BYTES // len(chunk)):
            tunnel.dataReceived(chunk)
        self.assertNoResult(d)
        tunnel.dataReceived(chunk)
        self.assertIn("no complete answer", str(self.failure_of(d).value))
        self.assertTrue(transport.disconnected)

    def test_closed_before_answer(self) -> None:
        d, tunnel, _ = self.connect()
        tunnel.dataReceived(b"HTTP/1.1 200 Conn")
        tunnel.connectionLost(Failure(error.ConnectionDone()))
        failure = self.failure_of(d)
        failure.trap(ProxyConnectError)
        self.assertEqual(
            str(failure.value),
            f"proxy closed the connection before answering CONNECT to {XRAY_HOST}:443",
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_connection_lost_before_answer_says_why(self) -> None:
        d, tunnel, _ = self.connect()
        tunnel.connectionLost(Failure(error.ConnectionLost("reset by peer")))
        self.assertIn("reset by peer", str(self.failure_of(d).value))

    def test_connection_lost_after_the_tunnel_is_open(self) -> None:
        d, tunnel, _ = self.connect()
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)
        reason = Failure(error.ConnectionLost("gone"))
        tunnel.connectionLost(reason)
        self.assertIs(self.factory.built[0].lost, reason)

    def test_timeout(self) -> None:
        d, _, transport = self.connect(timeout=7.0)
        self.clock.advance(6.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        failure = self.failure_of(d)
        failure.trap(error.TimeoutError)
        self.assertIn(f"proxy did not answer CONNECT to {XRAY_HOST}:443 within 7 s", str(failure))
        self.assertTrue(transport.disconnected)

    def test_late_answer_after_timeout_is_ignored(self) -> None:
        d, tunnel, _ = self.connect(timeout=1.0)
        self.clock.advance(1.0)
        self.failure_of(d)
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        tunnel.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.factory.built, [])

    def test_cancel_while_connecting_to_the_proxy(self) -> None:
        endpoint = HTTPConnectProxyEndpoint(self.proxy, XRAY_HOST, 443, clock=self.clock)
        d = endpoint.connect(self.factory)
        d.cancel()
        self.failure_of(d).trap(error.ConnectingCancelledError)
        self.assertTrue(self.proxy.cancelled)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_while_waiting_for_the_answer(self) -> None:
        d, tunnel, transport = self.connect()
        d.cancel()
        self.failure_of(d).trap(CancelledError)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        # The abort's connectionLost arrives later and changes nothing.
        tunnel.connectionLost(Failure(error.ConnectionAborted()))
        self.assertEqual(self.factory.built, [])

    def test_factory_that_builds_nothing(self) -> None:
        self.factory = RecorderFactory(build=False)
        d, tunnel, transport = self.connect()
        tunnel.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        self.failure_of(d).trap(ProxyConnectError)
        self.assertTrue(transport.disconnected)

    def test_wrapped_factory_is_started(self) -> None:
        self.connect()
        self.assertEqual(self.factory.starts, 1)

    def test_rejects_unsafe_arguments(self) -> None:
        for host, port in ((XRAY_HOST + "\r\nX: y", 443), ("a b", 443), ("", 443), ("h", 0)):
            self.assertRaises(
                ValueError, HTTPConnectProxyEndpoint, self.proxy, host, port, clock=self.clock
            )
        self.assertRaises(
            ValueError,
            HTTPConnectProxyEndpoint,
            self.proxy,
            XRAY_HOST,
            443,
            clock=self.clock,
            proxy_authorization="Basic x\r\nX-Evil: 1",
        )


# ---------------------------------------------------------------------------
# Against a fake proxy on 127.0.0.1


class FakeProxy(Protocol):
    """Reads one request head, records it, then answers as ``factory.mode`` says."""

    factory: FakeProxyFactory

    def connectionMade(self) -> None:
        self.factory.tracker.opened(self)
        self.buffer = b""
        self.tunnel = False

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        if self.tunnel:
            self.transport.write(data)  # echo: stands in for the far end
            return
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            return
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        self.factory.heads.append(head)
        mode = self.factory.mode
        if mode == "200":
            self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            self.tunnel = True
            if rest:
                self.transport.write(rest)
        elif mode == "407":
            self.transport.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
            )
        elif mode == "garbage":
            self.transport.write(b"220 smtp.example ESMTP ready\r\n\r\n")
        elif mode == "close":
            self.transport.loseConnection()
        # "silent": never answers

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.lost += 1
        self.factory.tracker.closed(self)
        waiting, self.factory.lost_waiting = self.factory.lost_waiting, []
        for d in waiting:
            d.callback(None)


class FakeProxyFactory(Factory):
    protocol = FakeProxy  # type: ignore[assignment]
    noisy = False

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.heads: list[bytes] = []
        self.lost = 0
        self.lost_waiting: list[Deferred[None]] = []
        self.tracker = ConnectionTracker()

    def wait_lost(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.lost_waiting.append(d)
        return d


class LoopbackFakeProxyTests(TestCase):
    timeout = 20

    async def start_proxy(self, mode: str) -> tuple[FakeProxyFactory, TCP4ClientEndpoint]:
        from twisted.internet import reactor

        factory = FakeProxyFactory(mode)
        port = await TCP4ServerEndpoint(reactor, 0, interface=LOCALHOST).listen(factory)
        self.addCleanup(factory.tracker.abort_all)
        self.addCleanup(port.stopListening)
        return factory, TCP4ClientEndpoint(reactor, LOCALHOST, port.getHost().port)

    def endpoint(self, proxy: TCP4ClientEndpoint, **kwargs: Any) -> HTTPConnectProxyEndpoint:
        from twisted.internet import reactor

        return HTTPConnectProxyEndpoint(proxy, XRAY_HOST, 443, clock=reactor, **kwargs)

    async def open_tunnel(self, proxy: TCP4ClientEndpoint, **kwargs: Any) -> Recorder:
        factory = RecorderFactory()
        protocol = await self.endpoint(proxy, **kwargs).connect(factory)
        assert isinstance(protocol, Recorder)

        async def close() -> None:
            if protocol.lost is None:
                assert protocol.transport is not None
                protocol.transport.loseConnection()
                await protocol.lost_d

        self.addCleanup(lambda: defer.ensureDeferred(close()))
        return protocol

    async def test_tunnel_carries_data_both_ways(self) -> None:
        fake, proxy = await self.start_proxy("200")
        recorder = await self.open_tunnel(proxy)
        self.assertEqual(fake.heads, [REQUEST[:-4]])
        assert recorder.transport is not None
        recorder.transport.write(b"hello through the tunnel")
        await recorder.expect(b"hello through the tunnel")

    async def test_proxy_authorization_is_sent(self) -> None:
        fake, proxy = await self.start_proxy("200")
        await self.open_tunnel(proxy, proxy_authorization=AUTH)
        self.assertIn(b"\r\nProxy-Authorization: " + AUTH.encode(), fake.heads[0])

    async def test_407(self) -> None:
        _, proxy = await self.start_proxy("407")
        factory = RecorderFactory()
        with self.assertRaises(ProxyConnectError) as raised:
            await self.endpoint(proxy).connect(factory)
        self.assertEqual(
            str(raised.exception),
            f"proxy refused CONNECT to {XRAY_HOST}:443: HTTP/1.1 407 Proxy Authentication Required",
        )
        self.assertEqual(factory.built, [])

    async def test_garbage(self) -> None:
        _, proxy = await self.start_proxy("garbage")
        with self.assertRaises(ProxyConnectError) as raised:
            await self.endpoint(proxy).connect(RecorderFactory())
        self.assertIn("invalid answer", str(raised.exception))
        self.assertIn("220 smtp.example ESMTP ready", str(raised.exception))

    async def test_closed_without_answer(self) -> None:
        _, proxy = await self.start_proxy("close")
        with self.assertRaises(ProxyConnectError) as raised:
            await self.endpoint(proxy).connect(RecorderFactory())
        self.assertIn("closed the connection before answering", str(raised.exception))

    async def test_cancel_closes_the_proxy_connection(self) -> None:
        fake, proxy = await self.start_proxy("silent")
        d = self.endpoint(proxy).connect(RecorderFactory())
        while not fake.heads:  # bounded by the test timeout
            await deferLater(0.01)
        lost = fake.wait_lost()
        d.cancel()
        with self.assertRaises(CancelledError):
            await d
        await lost
        self.assertEqual(fake.lost, 1)

    async def test_timeout_closes_the_proxy_connection(self) -> None:
        fake, proxy = await self.start_proxy("silent")
        lost = fake.wait_lost()
        with self.assertRaises(error.TimeoutError):
            await self.endpoint(proxy, timeout=0.2).connect(RecorderFactory())
        await lost

    async def test_proxy_not_listening(self) -> None:
        from twisted.internet import reactor

        with socket.socket() as s:
            s.bind((LOCALHOST, 0))
            port = s.getsockname()[1]
        proxy = TCP4ClientEndpoint(reactor, LOCALHOST, port)
        with self.assertRaises(error.ConnectionRefusedError):
            await self.endpoint(proxy).connect(RecorderFactory())


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet import reactor, task

    return task.deferLater(reactor, seconds, lambda: None)
