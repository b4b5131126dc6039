"""The TCP port's HTTP side (xraytwisted.tcpport.site): helpers and the bounded Site.

The Site tests drive a channel over ``StringTransport`` with a ``Clock``;
the real-socket cases (a 2 MiB body refused with 413) are in
test_sampling_proxy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from twisted.web.test.requesthelper import DummyRequest

from tests.support.daemon import clean_env
from tests.support.tempdirs import temp_path
from xraytwisted.listen.bounded_site import LINGER_SECONDS
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import Counters
from xraytwisted.settings.loader import SEARCH_PATHS
from xraytwisted.tcpport.site import LazyResource, http_root, make_site


class _Page(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        return self.body


class LazyResourceTests(SynchronousTestCase):
    def mktemp_dir(self) -> str:
        path = temp_path(self)
        os.makedirs(path)
        return path

    def test_built_once_on_first_request(self) -> None:
        built: list[_Page] = []

        def factory() -> _Page:
            built.append(_Page(b"page %d" % len(built)))
            return built[-1]

        lazy = LazyResource(factory)
        self.assertEqual(built, [])
        self.assertEqual(lazy.render(DummyRequest([b""])), b"page 0")
        self.assertEqual(lazy.render(DummyRequest([b""])), b"page 0")
        self.assertEqual(len(built), 1)

    def test_daemon_imports_prometheus_only_when_scraped(self) -> None:
        # A fresh interpreter: in this one other tests import it anyway.
        # Without a cfg.yaml, PyYAML is not imported either (see cfgfile).
        script = textwrap.dedent(
            """
            import sys
            from twisted.internet import reactor
            from twisted.web.test.requesthelper import DummyRequest
            from xraytwisted import tap
            options = tap.Options()
            options.parseOptions(["-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
                                  "-e", "http://127.0.0.1:9"])
            daemon = tap.makeService(options, reactor)
            print("yaml" in sys.modules, "prometheus_client" in sys.modules)
            request = DummyRequest([b"metrics"])
            request.path = b"/metrics"
            body = daemon.parts.tcp.factory.site.resource.render(request)
            print("prometheus_client" in sys.modules)
            print(b"xray_daemon_segments_received_total 0.0" in body)
            """
        )
        env = clean_env()
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            cwd=self.mktemp_dir(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        yaml_expected = str(os.path.exists(SEARCH_PATHS[0]))
        self.assertEqual(done.stdout.split(), [yaml_expected, "False", "True", "True"], done.stderr)


# ---------------------------------------------------------------------------
# The bounded Site: deadlines, early refusals, held bodies (on a Clock)


class _Slow(Resource):
    """Answers once the test says so (like the proxy waiting for X-Ray)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Request] = []

    def render(self, request: Request) -> int:
        self.waiting.append(request)
        return NOT_DONE_YET


class SiteEnv:
    def __init__(self, **site: Any) -> None:
        self.clock = Clock()
        self.counters = Counters()
        self.slow = _Slow()
        root = http_root(self.slow, {b"health": _Page(b"ok")}, self.counters)
        site.setdefault("request_deadline", 10.0)
        self.site = make_site(root, timeout=30, counters=self.counters, reactor=self.clock, **site)

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        return channel, transport


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw else 0


class DeadlineTests(SynchronousTestCase):
    def test_a_client_trickling_header_lines_is_cut_at_the_deadline(self) -> None:
        env = SiteEnv()
        channel, transport = env.connect()
        channel.dataReceived(b"POST /GetSamplingRules HTTP/1.1\r\n")
        for i in range(9):
            env.clock.advance(1)  # well within the 30 s idle timeout each time
            channel.dataReceived(b"X-Header-%d: x\r\n" % i)
        self.assertFalse(transport.disconnecting)
        with capturedLogs() as events:
            env.clock.advance(1)
        (line,) = [formatEvent(e) for e in events]
        self.assertIn("Closing HTTP connection from 127.0.0.1:40000: its request was not", line)
        self.assertEqual(status_of(transport.value()), 408)
        self.assertIn(b"SamplingProxy.RequestDeadlineSeconds", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.counters.proxy_requests["slow_client"], 1)
        self.assertEqual(env.slow.waiting, [])

    def test_a_trickled_body_is_cut_too(self) -> None:
        env = SiteEnv()
        channel, transport = env.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n")
        for _ in range(10):
            env.clock.advance(1)
            channel.dataReceived(b"x")
        self.assertEqual(status_of(transport.value()), 408)
        self.assertTrue(transport.disconnecting)

    def test_the_deadline_covers_neither_answering_nor_idle_keep_alive(self) -> None:
        env = SiteEnv()
        channel, transport = env.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
        env.clock.advance(25)  # the answer takes long (X-Ray is slow)
        (request,) = env.slow.waiting
        request.write(b"late")
        request.finish()
        self.assertEqual(status_of(transport.value()), 200)
        env.clock.advance(25)  # an idle keep-alive connection, as SDKs keep them
        self.assertFalse(transport.disconnecting)
        # The next request gets a deadline of its own.
        channel.dataReceived(b"POST /x HTTP/1.1\r\n")
        env.clock.advance(10)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"408 Request Timeout", transport.value())

    def test_idle_timeouts_are_logged_at_debug_and_unread_clients_aborted(self) -> None:
        env = SiteEnv()
        channel, transport = env.connect()
        with capturedLogs() as events:
            env.clock.advance(30)
        self.assertTrue(transport.disconnecting)
        (event,) = events
        self.assertEqual(event["log_level"], LogLevel.debug)
        self.assertIn("Timing out client: IPv4Address(", formatEvent(event))
        env.clock.advance(15)  # the connection did not go away: aborted
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(env.clock.getDelayedCalls(), [])


class EarlyRefusalTests(SynchronousTestCase):
    def test_an_overloaded_proxy_answers_503_before_the_body_is_sent(self) -> None:
        env = SiteEnv(overloaded=lambda: True)
        channel, transport = env.connect()
        channel.dataReceived(
            b"POST /SamplingTargets HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(status_of(transport.value()), 503)
        self.assertIn(b"Retry-After: 1\r\n", transport.value())
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertEqual(env.counters.proxy_requests["overloaded"], 1)
        # The client may still send its body: it is read and dropped, then
        # the connection closes, so the client sees the answer, not a reset.
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x" * 60)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x" * 40)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(env.slow.waiting, [])

    def test_requests_without_a_body_are_not_asked_about(self) -> None:
        asked: list[int] = []
        env = SiteEnv(overloaded=lambda: bool(asked.append(1)))
        channel, transport = env.connect()
        channel.dataReceived(b"GET /health HTTP/1.1\r\n\r\n")
        self.assertEqual(status_of(transport.value()), 200)
        self.assertEqual(asked, [])

    def test_too_large_lingers_for_the_declared_body_then_closes(self) -> None:
        env = SiteEnv(max_body=1000)
        channel, transport = env.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 3000\r\n\r\n" + b"x" * 500)
        self.assertEqual(status_of(transport.value()), 413)
        for _ in range(4):
            self.assertFalse(transport.disconnecting)
            channel.dataReceived(b"x" * 625)
        self.assertTrue(transport.disconnecting)

    def test_a_client_that_never_finishes_its_refused_body_is_closed_later(self) -> None:
        env = SiteEnv(max_body=1000)
        channel, transport = env.connect()
        channel.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 3000\r\n\r\n")
        env.clock.advance(LINGER_SECONDS)
        self.assertTrue(transport.disconnecting)

    def test_bodies_are_charged_to_the_hold_until_answered(self) -> None:
        hold = HeldBytes(1000, Clock())
        env = SiteEnv(hold=hold)
        first, t1 = env.connect()
        first.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 800\r\n\r\n" + b"a" * 700)
        self.assertEqual(hold.used, 700)
        second, t2 = env.connect()
        second.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 800\r\n\r\n" + b"b" * 400)
        self.assertEqual(status_of(t2.value()), 503)
        self.assertIn(b"Socket.TCPHoldKB", t2.value())
        self.assertEqual(hold.used, 700)
        first.dataReceived(b"a" * 100)
        self.assertEqual(hold.used, 800)  # in flight: still held
        (request,) = env.slow.waiting
        request.finish()
        self.assertEqual(hold.used, 0)
        self.assertEqual(status_of(t1.value()), 200)
        # A client that goes away mid-body gives its bytes back as well.
        third, _ = env.connect()
        third.dataReceived(b"POST /x HTTP/1.1\r\nContent-Length: 800\r\n\r\n" + b"c" * 300)
        third.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(hold.used, 0)
