"""/health: the verdict table, the JSON, 200 -> 503 -> 200 over real HTTP, the monitoring site."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.tcpport.health import (
    HealthResource,
    HealthState,
    OtlpHealth,
    Report,
    assess,
    credentials_status,
    hide_identity,
    monitoring_site,
    otlp_section,
)
from xraytwisted.tcpport.metrics import MetricsResource, make_registry

START = 1_795_304_000.0
LIMIT = 120.0
ENDPOINT = "https://xray.us-east-1.amazonaws.com"


def verdict(
    *,
    now: float = START + 1000,
    last_success_at: float | None = None,
    waiting: int = 0,
    oldest: float | None = None,
    credentials: tuple[bool, str] = (True, "environment"),
    credentials_refused: str | None = None,
) -> Report:
    return assess(
        now=now,
        started_at=START,
        last_success_at=last_success_at,
        waiting=waiting,
        oldest_waiting_since=oldest,
        unhealthy_after=LIMIT,
        credentials=credentials,
        buffer_used=640,
        buffer_capacity=1 << 20,
        endpoint=ENDPOINT,
        credentials_refused=credentials_refused,
    )


class AssessTests(SynchronousTestCase):
    now = START + 1000

    def test_verdicts(self) -> None:
        now = self.now
        table = [
            # (what, kwargs, healthy)
            ("idle since start, never uploaded", {}, True),
            ("idle, last upload long ago", {"last_success_at": START + 1}, True),
            ("young backlog after a long idle time", {"waiting": 5, "oldest": now - 2}, True),
            ("backlog of exactly the limit", {"waiting": 5, "oldest": now - LIMIT}, False),
            (
                "old backlog but uploads succeed",
                {"waiting": 5, "oldest": now - 500, "last_success_at": now - 3},
                True,
            ),
            (
                "old backlog, last success before the limit",
                {"waiting": 5, "oldest": now - 500, "last_success_at": now - 121},
                False,
            ),
            ("old backlog, never a success", {"waiting": 5, "oldest": now - 121}, False),
            # Unknown age of the backlog: the start time stands in for it.
            ("backlog of unknown age, no success", {"waiting": 1}, False),
            (
                "backlog of unknown age, recent success",
                {"waiting": 1, "last_success_at": now - 10},
                True,
            ),
            ("no credentials", {"credentials": (False, "none found")}, False),
            (
                "X-Ray refuses the credentials",
                {"credentials_refused": "HTTP 403 AccessDeniedException: not authorized"},
                False,
            ),
        ]
        for what, kwargs, healthy in table:
            report = verdict(now=now, **kwargs)
            self.assertEqual(report.healthy, healthy, what)
            self.assertEqual(report.code, 200 if healthy else 503, what)
            self.assertEqual(report.body["status"], "ok" if healthy else "unhealthy", what)
            self.assertEqual(bool(report.body["reasons"]), not healthy, what)

    def test_body_fields(self) -> None:
        report = verdict(waiting=3, oldest=self.now - 4.5, last_success_at=self.now - 2.25)
        body = report.body
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["reasons"], [])
        self.assertEqual(body["uptime_seconds"], 1000.0)
        self.assertEqual(
            body["last_successful_upload"], {"epoch": self.now - 2.25, "seconds_ago": 2.25}
        )
        self.assertEqual(body["segments_waiting"], 3)
        self.assertEqual(body["oldest_waiting_seconds"], 4.5)
        self.assertEqual(body["buffer"], {"used_bytes": 640, "capacity_bytes": 1 << 20})
        self.assertEqual(body["endpoint"], ENDPOINT)
        self.assertEqual(body["credentials"], {"available": True, "source": "environment"})
        self.assertEqual(body["unhealthy_after_seconds"], LIMIT)
        self.assertIn("version", body)
        idle = verdict().body
        self.assertIsNone(idle["last_successful_upload"])
        self.assertIsNone(idle["oldest_waiting_seconds"])
        self.assertIsNone(idle["last_upload_error"])
        self.assertIsNone(idle["otlp"])  # the OTLP bridge is off

    def test_last_upload_error_says_what_and_when(self) -> None:
        body = assess(
            now=self.now,
            started_at=START,
            last_success_at=None,
            waiting=0,
            oldest_waiting_since=None,
            unhealthy_after=LIMIT,
            credentials=(True, "environment"),
            buffer_used=0,
            buffer_capacity=1,
            endpoint=ENDPOINT,
            last_upload_error=(self.now - 3, "HTTP 503 ServiceUnavailableException"),
        ).body
        self.assertEqual(
            body["last_upload_error"],
            {
                "message": "HTTP 503 ServiceUnavailableException",
                "epoch": self.now - 3,
                "seconds_ago": 3,
            },
        )

    def test_otlp_section(self) -> None:
        c = OtlpCounters(
            requests_received=10,
            spans_received=500,
            spans_sent=300,
            spans_rejected=20,
            spans_lost=80,
            lost_requests_spans_unknown=1,
            spans_spooled=150,
            spans_replayed=100,
        )
        r = c.requests
        r.sent, r.rejected, r.lost, r.spooled, r.replayed = 6, 1, 3, 4, 2
        r.last_success_at = self.now - 1
        c.refused["buffer_full"] = 7
        section = otlp_section(
            c,
            now=self.now,
            traces_url="https://xray.us-east-1.amazonaws.com/v1/traces",
            buffer_used=4096,
            waiting=2,
            last_upload_error=(self.now - 0.5, "enable CloudWatch Transaction Search"),
        )
        self.assertEqual(
            section["requests"],
            {
                "received": 10,
                "sent": 6,
                "rejected": 1,
                "lost": 3,
                "spooled": 4,
                "replayed": 2,
                "waiting": 2,
            },
        )
        self.assertEqual(
            section["spans"],
            {
                "received": 500,
                "sent": 300,
                "rejected": 20,
                "lost": 80,
                "spooled": 150,
                "replayed": 100,
            },
        )
        self.assertEqual(section["lost_requests_spans_unknown"], 1)
        self.assertEqual(section["refused"]["buffer_full"], 7)
        self.assertEqual(section["refused"]["origin"], 0)  # every reason, zero or not
        self.assertEqual(section["buffer"], {"used_bytes": 4096})
        self.assertEqual(section["last_successful_upload"]["seconds_ago"], 1)
        self.assertEqual(
            section["last_upload_error"]["message"], "enable CloudWatch Transaction Search"
        )
        self.assertEqual(section["traces_url"], "https://xray.us-east-1.amazonaws.com/v1/traces")

    def test_reasons_say_what_is_wrong(self) -> None:
        report = verdict(
            waiting=7,
            oldest=self.now - 300,
            last_success_at=self.now - 200,
            credentials=(False, "none found"),
        )
        first, second = report.body["reasons"]
        self.assertIn("no AWS credentials", first)
        self.assertIn("7 segments waiting, the oldest for 300 seconds", second)
        self.assertIn("last successful upload was 200 seconds ago", second)
        never = verdict(waiting=1, oldest=self.now - 300).body["reasons"][0]
        self.assertIn("no upload has succeeded since the daemon started", never)
        refused = verdict(credentials_refused="HTTP 403 AccessDeniedException: no").body
        self.assertEqual(
            refused["reasons"],
            [
                "X-Ray refused the credentials (HTTP 403 AccessDeniedException: no): check the "
                "role's xray:PutTraceSegments permission"
            ],
        )
        self.assertEqual(
            refused["credentials"]["refused_by_xray"], "HTTP 403 AccessDeniedException: no"
        )

    def test_credentials_status_helper(self) -> None:
        present = credentials_status(StaticCredentials(Credentials("AKID", "s", None)))
        self.assertEqual(present(), (True, "ok (static)"))
        missing = credentials_status(StaticCredentials(None))
        self.assertEqual(missing(), (False, "missing: no credentials configured"))


class Buffer:
    used = 640
    capacity = 1 << 20


class Live:
    """The moving parts /health reads, changed by the tests."""

    def __init__(self) -> None:
        self.waiting = 0
        self.oldest: float | None = None
        self.credentials = (True, "environment")
        self.refused: str | None = None  # what X-Ray said when it refused them
        self.broken = False

    def waiting_docs(self) -> int:
        if self.broken:
            raise RuntimeError("batcher exploded")
        return self.waiting


class HealthHTTPTests(TestCase):
    timeout = 10

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.counters = Counters()
        self.live = Live()
        self.state = HealthState(
            clock=self.clock,
            counters=self.counters,
            buffer=Buffer(),
            waiting_docs=self.live.waiting_docs,
            oldest_waiting_since=lambda: self.live.oldest,
            credentials_status=lambda: self.live.credentials,
            credentials_refused=lambda: self.live.refused,
            endpoint_url=ENDPOINT,
            started_at=START,
            unhealthy_after=LIMIT,
        )
        self.health = HealthResource(self.state)

    def serve(self, site: Site) -> str:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"http://127.0.0.1:{port.getHost().port}"

    @defer.inlineCallbacks
    def fetch(self, url: str, method: str = "GET") -> Any:
        response = yield treq.request(method, url, persistent=False)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def status(self, url: str) -> Any:
        response, body = yield self.fetch(url)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        return response.code, json.loads(body)

    @defer.inlineCallbacks
    def test_flips_to_503_while_stuck_and_back(self) -> None:
        url = self.serve(Site(self.health)) + "/health"
        code, body = yield self.status(url)
        self.assertEqual((code, body["status"]), (200, "ok"))

        # Segments arrive and uploads fail: healthy until the limit passes.
        self.live.waiting, self.live.oldest = 12, self.clock.seconds()
        self.clock.advance(LIMIT - 1)
        code, _ = yield self.status(url)
        self.assertEqual(code, 200)
        self.clock.advance(1)
        code, body = yield self.status(url)
        self.assertEqual((code, body["status"]), (503, "unhealthy"))
        self.assertIn("12 segments waiting", body["reasons"][0])
        self.assertEqual(body["segments_waiting"], 12)

        # An upload succeeds: healthy again, and the body says when.
        self.counters.last_success_at = self.clock.seconds()
        self.live.waiting, self.live.oldest = 0, None
        self.clock.advance(5)
        code, body = yield self.status(url)
        self.assertEqual(code, 200)
        self.assertEqual(body["last_successful_upload"]["seconds_ago"], 5)

    @defer.inlineCallbacks
    def test_missing_credentials_is_503_until_they_appear(self) -> None:
        url = self.serve(Site(self.health)) + "/health"
        self.live.credentials = (False, "none found")
        code, body = yield self.status(url)
        self.assertEqual(code, 503)
        self.assertEqual(body["credentials"], {"available": False, "source": "none found"})
        self.live.credentials = (True, "environment")
        code, _ = yield self.status(url)
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_credentials_x_ray_refuses_are_503_until_an_upload_succeeds(self) -> None:
        url = self.serve(Site(self.health)) + "/health"
        self.live.refused = "HTTP 403 AccessDeniedException: not authorized"
        code, body = yield self.status(url)
        self.assertEqual(code, 503)
        self.assertIn("X-Ray refused the credentials (HTTP 403 Acc", body["reasons"][0])
        self.live.refused = None
        code, _ = yield self.status(url)
        self.assertEqual(code, 200)

    @defer.inlineCallbacks
    def test_head_get_only(self) -> None:
        url = self.serve(Site(self.health)) + "/health"
        response, body = yield self.fetch(url, "HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.live.credentials = (False, "none found")
        response, body = yield self.fetch(url, "HEAD")
        self.assertEqual((response.code, body), (503, b""))
        response, body = yield self.fetch(url, "POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual(json.loads(body)["error"], "method not allowed")

    @defer.inlineCallbacks
    def test_a_broken_check_answers_503_and_logs(self) -> None:
        url = self.serve(Site(self.health)) + "/health"
        self.live.broken = True
        with capturedLogs() as events:
            code, body = yield self.status(url)
        self.assertEqual((code, body["status"]), (503, "unhealthy"))
        self.assertEqual(
            self.flushLoggedErrors(RuntimeError)[0].getErrorMessage(), "batcher exploded"
        )
        (logged,) = [e for e in events if "log_failure" in e]
        self.assertEqual(formatEvent(logged), "Health check failed; answering 503")

    @defer.inlineCallbacks
    def test_monitoring_site_serves_two_paths_quietly(self) -> None:
        metrics = MetricsResource(
            make_registry(
                self.counters, buffer_used=lambda: 0, buffer_capacity=1, waiting_docs=lambda: 0
            )
        )
        self.counters.received = 77
        site = monitoring_site(
            self.health, metrics, timeout=5, reactor=reactor, counters=self.counters
        )
        base = self.serve(site)
        with capturedLogs() as events:
            code, body = yield self.status(base + "/health?probe=1")
            self.assertEqual((code, body["status"]), (200, "ok"))
            response, text = yield self.fetch(base + "/metrics")
            self.assertEqual(response.code, 200)
            self.assertIn(b"xray_daemon_segments_received_total 77.0", text)
            for path in ("/", "/health/x", "/GetSamplingRules", "/metricsx"):
                response, text = yield self.fetch(base + path)
                self.assertEqual(response.code, 404, path)
                self.assertEqual(
                    json.loads(text), {"error": "not found", "paths": ["/health", "/metrics"]}
                )
        # No access-log or factory lines for probes and scrapes (the client
        # side of this test, treq's connection pool, does log its own).
        server_side = [
            formatEvent(e) for e in events if "_HTTP11ClientFactory" not in formatEvent(e)
        ]
        self.assertEqual(server_side, [])

    @defer.inlineCallbacks
    def test_account_ids_and_arns_are_hidden_unless_asked_for(self) -> None:
        # What an assumed role and a failing STS call put in the status line.
        self.live.credentials = (
            False,
            "missing: AssumeRole arn:aws:iam::123456789012:role/xray-writer with credentials "
            "from env (AKIAIOSFODNN7EXAMPLE) failed: User: "
            "arn:aws:sts::210987654321:assumed-role/node/i-0abc is not authorized",
        )
        url = self.serve(Site(self.health)) + "/health"
        code, body = yield self.status(url)
        self.assertEqual(code, 503)
        text = json.dumps(body)
        for secret in ("123456789012", "210987654321", "arn:aws", "AKIAIOSFODNN7EXAMPLE"):
            self.assertNotIn(secret, text)
        self.assertIn("AssumeRole (hidden: Monitoring.ShowIdentity) with credentials", text)
        self.assertEqual(body["uptime_seconds"], 0)  # numbers are left alone
        shown = self.serve(Site(HealthResource(self.state, show_identity=True))) + "/health"
        code, body = yield self.status(shown)
        self.assertIn("arn:aws:iam::123456789012:role/xray-writer", body["credentials"]["source"])

    @defer.inlineCallbacks
    def test_the_otlp_bridge_is_shown_but_does_not_decide(self) -> None:
        otlp = OtlpCounters(requests_received=3, spans_received=42)
        errors: list[tuple[float, str] | None] = [None]
        state = HealthState(
            clock=self.clock,
            counters=self.counters,
            buffer=Buffer(),
            waiting_docs=self.live.waiting_docs,
            credentials_status=lambda: self.live.credentials,
            endpoint_url=ENDPOINT,
            started_at=START,
            unhealthy_after=LIMIT,
            otlp=OtlpHealth(
                counters=otlp,
                traces_url=ENDPOINT + "/v1/traces",
                buffer_used=lambda: 512,
                waiting=lambda: 3,
                last_upload_error=lambda: errors[0],
            ),
        )
        url = self.serve(Site(HealthResource(state))) + "/health"
        code, body = yield self.status(url)
        self.assertEqual(code, 200)
        self.assertEqual(body["otlp"]["spans"]["received"], 42)
        self.assertEqual(body["otlp"]["requests"]["waiting"], 3)
        self.assertEqual(body["otlp"]["buffer"], {"used_bytes": 512})
        self.assertIsNone(body["otlp"]["last_upload_error"])
        # Spans refused for good, stuck for longer than the limit: still 200.
        errors[0] = (self.clock.seconds(), "X-Ray said: account 123456789012 has it off")
        otlp.spans_rejected = 42
        self.clock.advance(LIMIT * 2)
        code, body = yield self.status(url)
        self.assertEqual(code, 200)
        self.assertEqual(body["otlp"]["spans"]["rejected"], 42)
        error = body["otlp"]["last_upload_error"]
        self.assertEqual(error["seconds_ago"], LIMIT * 2)
        self.assertEqual(
            error["message"], "X-Ray said: account (hidden: Monitoring.ShowIdentity) has it off"
        )


class MonitoringCapTests(SynchronousTestCase):
    """The monitoring listener refuses connections past its caps as the TCP port does."""

    def setUp(self) -> None:
        self.clock, self.counters = Clock(), Counters()
        self.site = monitoring_site(
            Resource(), Resource(), timeout=30, reactor=self.clock, counters=self.counters,
            max_connections=3, max_per_peer=2,
        )  # fmt: skip

    def connect(self, address: IPv4Address | IPv6Address) -> Any:
        channel = self.site.buildProtocol(address)
        if channel is not None:
            channel.makeConnection(StringTransport(peerAddress=address))
        return channel

    def test_refusals_past_each_cap_are_counted_and_warned_about_throttled(self) -> None:
        mine = [self.connect(IPv4Address("TCP", "10.0.0.1", port)) for port in (1, 2)]
        with capturedLogs() as events:
            self.assertIsNone(self.connect(IPv4Address("TCP", "10.0.0.1", 3)))
            self.assertIsNone(self.connect(IPv4Address("TCP", "10.0.0.1", 4)))
            other = self.connect(IPv6Address("TCP", "::1", 1))
            self.assertIsNotNone(other)
            self.assertIsNone(self.connect(IPv6Address("TCP", "::1", 2)))
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "Refusing monitoring connection from 10.0.0.1:3: that address already has 2 "
                "connections open on --monitoring-address (Monitoring.Address), the most one "
                "address may hold. Find the client that holds them open",
                "Refusing monitoring connection from [::1]:2: 3 connections are open on "
                "--monitoring-address (Monitoring.Address), the most allowed. Find the client "
                "that holds them open",
            ],
        )
        self.assertEqual(self.counters.tcp_refused, 3)
        self.assertEqual(self.site.per_peer, {"10.0.0.1": 2, "::1": 1})
        mine[0].connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.site.per_peer, {"10.0.0.1": 1, "::1": 1})
        self.assertIsNotNone(self.connect(IPv4Address("TCP", "10.0.0.1", 5)))  # room again
        other.connectionLost(Failure(ConnectionDone()))
        self.clock.advance(10)
        with capturedLogs() as events:
            self.assertIsNone(self.connect(IPv4Address("TCP", "10.0.0.1", 6)))  # per peer again
        self.assertIn("(1 more refused connections not logged)", formatEvent(events[0]))
        self.assertEqual(self.counters.tcp_refused, 4)


class HideIdentityTests(SynchronousTestCase):
    HIDDEN = "(hidden: Monitoring.ShowIdentity)"

    def test_identities_are_hidden_wherever_they_are(self) -> None:
        h = self.HIDDEN
        table = [
            ("not authorized for account 123456789012.", f"not authorized for account {h}."),
            ("account 123456789012, region", f"account {h}, region"),
            ("(123456789012)", f"({h})"),
            ("account:123456789012", f"account:{h}"),
            ("arn:aws:iam::123456789012:role/x is", f"{h} is"),
            ("arn:aws-cn:sts::123456789012:assumed-role/r/s.", f"{h}."),
            ("key AKIAIOSFODNN7EXAMPLE.", f"key {h}."),
            ("key ASIAIOSFODNN7EXAMPLE", f"key {h}"),
            ("role AROAEXAMPLEID123456", f"role {h}"),
            ("role AROAEXAMPLEID123456:alice@example.com is", f"role {h} is"),
            ("user AIDAJQABLZS4A3QDU576Q.", f"user {h}."),
            ("group AGPAJQABLZS4A3QDU576Q", f"group {h}"),
            ("policy ANPAJQABLZS4A3QDU576Q", f"policy {h}"),
            ("profile AIPAJQABLZS4A3QDU576Q", f"profile {h}"),
        ]
        for text, expected in table:
            self.assertEqual(hide_identity(text), expected, text)

    def test_other_numbers_and_words_are_left_alone(self) -> None:
        for text in (
            "1234567890123 bytes",  # 13 digits
            "12345678901 bytes",  # 11 digits
            "uptime 123456789012.5 s",  # a decimal number
            "version 1.123456789012",
            "AROA is a prefix",  # too short to be an id
            "AKIAshort",
            "ACCESS DENIED",
        ):
            self.assertEqual(hide_identity(text), text, text)
        document = {"n": 123456789012, "list": ["account 123456789012"]}
        self.assertEqual(
            hide_identity(document), {"n": 123456789012, "list": [f"account {self.HIDDEN}"]}
        )
