"""/metrics: the collector reads Counters at scrape time; real HTTP scrapes parse cleanly."""

from __future__ import annotations

import os
from typing import Any
from unittest import SkipTest

import prometheus_client
import treq
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from xraytwisted import __version__
from xraytwisted.observe.counters import (
    ERROR_CLASSES,
    OTLP_REFUSALS,
    PROXY_OUTCOMES,
    Counters,
    OtlpCounters,
)
from xraytwisted.tcpport.metrics import (
    ERROR_CLASS_LABELS,
    MetricsResource,
    OtlpCollector,
    make_registry,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a text exposition, keyed by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def busy_counters() -> Counters:
    c = Counters(
        received=120,
        received_bytes=64_000,
        rejected=3,
        spillover=4,
        sent=100,
        sent_bytes=50_000,
        unprocessed=2,
        lost=5,
        retried=7,
        batches_ok=9,
        batches_failed=6,
        spooled=11,
        replayed=10,
        stream_connections=2,
        last_success_at=1795304139.5,
    )
    for n, cls in enumerate(ERROR_CLASSES, start=1):
        c.backend_errors[cls] = n
    for n, outcome in enumerate(PROXY_OUTCOMES, start=20):
        c.proxy_requests[outcome] = n
    for value in (0.004, 0.03, 0.03, 0.7, 12.0):
        c.upload_seconds.observe(value)
    return c


class State:
    def __init__(self) -> None:
        self.used = 4096
        self.waiting = 17
        self.drops: int | None = 42


def registry_for(c: Counters, state: State, **kwargs: Any) -> prometheus_client.CollectorRegistry:
    return make_registry(
        c,
        buffer_used=lambda: state.used,
        buffer_capacity=1 << 20,
        waiting_docs=lambda: state.waiting,
        **kwargs,
    )


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.counters = busy_counters()
        self.state = State()

    def scrape(self, **kwargs: Any) -> Samples:
        registry = registry_for(self.counters, self.state, **kwargs)
        return samples(generate_latest(registry).decode())

    def test_every_counter_under_its_name(self) -> None:
        s = self.scrape(kernel_drops=lambda: self.state.drops)
        c = self.counters
        expected = {
            "xray_daemon_segments_received_total": c.received,
            "xray_daemon_segments_rejected_total": c.rejected,
            "xray_daemon_segments_spillover_total": c.spillover,
            "xray_daemon_segments_sent_total": c.sent,
            "xray_daemon_segments_retried_total": c.retried,
            "xray_daemon_segments_unprocessed_total": c.unprocessed,
            "xray_daemon_segments_lost_total": c.lost,
            "xray_daemon_segments_spooled_total": c.spooled,
            "xray_daemon_segments_replayed_total": c.replayed,
            "xray_daemon_received_bytes_total": c.received_bytes,
            "xray_daemon_sent_bytes_total": c.sent_bytes,
            "xray_daemon_stream_connections_total": c.stream_connections,
            "xray_daemon_buffer_bytes": 4096,
            "xray_daemon_buffer_capacity_bytes": 1 << 20,
            "xray_daemon_segments_waiting": 17,
            "xray_daemon_kernel_udp_drops_total": 42,
            "xray_daemon_last_successful_upload_timestamp_seconds": 1795304139.5,
        }
        for name, value in expected.items():
            self.assertEqual(s[(name, ())], value, name)
        self.assertEqual(s[("xray_daemon_upload_batches_total", (("outcome", "ok"),))], 9)
        self.assertEqual(s[("xray_daemon_upload_batches_total", (("outcome", "failed"),))], 6)
        for n, cls in enumerate(ERROR_CLASSES, start=1):
            key = ("xray_daemon_backend_errors_total", (("class", ERROR_CLASS_LABELS[cls]),))
            self.assertEqual(s[key], n, cls)
        self.assertEqual(
            sorted(ERROR_CLASS_LABELS.values()),
            sorted(
                ["timeout", "connection_refused", "http_4xx", "http_5xx", "unknown_host", "other"]
            ),
        )
        for n, outcome in enumerate(PROXY_OUTCOMES, start=20):
            key = ("xray_daemon_proxy_requests_total", (("outcome", outcome),))
            self.assertEqual(s[key], n, outcome)

    def test_upload_histogram_is_cumulative_and_consistent(self) -> None:
        s = self.scrape()

        def bucket(le: str) -> float:
            return s[("xray_daemon_upload_duration_seconds_bucket", (("le", le),))]

        self.assertEqual(bucket("0.005"), 1)
        self.assertEqual(bucket("0.025"), 1)
        self.assertEqual(bucket("0.05"), 3)
        self.assertEqual(bucket("1.0"), 4)
        self.assertEqual(bucket("10.0"), 4)
        self.assertEqual(bucket("+Inf"), 5)
        self.assertEqual(s[("xray_daemon_upload_duration_seconds_count", ())], 5)
        self.assertAlmostEqual(s[("xray_daemon_upload_duration_seconds_sum", ())], 12.764)

    def test_values_are_read_at_scrape_time(self) -> None:
        registry = registry_for(self.counters, self.state)
        before = samples(generate_latest(registry).decode())
        self.counters.received += 5
        self.counters.backend_errors["TimeoutCount"] += 2
        self.state.used = 0
        after = samples(generate_latest(registry).decode())
        key = ("xray_daemon_segments_received_total", ())
        self.assertEqual(after[key] - before[key], 5)
        timeouts = ("xray_daemon_backend_errors_total", (("class", "timeout"),))
        self.assertEqual(after[timeouts] - before[timeouts], 2)
        self.assertEqual(after[("xray_daemon_buffer_bytes", ())], 0)

    def test_optional_series_are_left_out_when_unknown(self) -> None:
        self.counters.last_success_at = None
        self.state.drops = None
        for kwargs in ({}, {"kernel_drops": lambda: self.state.drops}):
            registry = registry_for(self.counters, self.state, **kwargs)
            text = generate_latest(registry).decode()
            # Not even HELP/TYPE lines: an unknown value is not a zero.
            self.assertNotIn("xray_daemon_kernel_udp_drops", text)
            self.assertNotIn("xray_daemon_last_successful_upload", text)
            self.assertIn("xray_daemon_segments_received_total", text)

    def test_build_info(self) -> None:
        s = self.scrape(extra_info={"region": "eu-west-1"})
        (labels,) = [dict(lbl) for name, lbl in s if name == "xray_daemon_build_info"]
        self.assertEqual(labels["version"], __version__)
        self.assertEqual(labels["region"], "eu-west-1")
        self.assertIn("twisted", labels)

    def test_process_metrics_can_be_left_out(self) -> None:
        if not os.path.exists("/proc/self/stat"):
            raise SkipTest("process metrics come from /proc")
        with_process = {name for name, _ in self.scrape()}
        without = {name for name, _ in self.scrape(process_metrics=False)}
        self.assertIn("process_resident_memory_bytes", with_process)
        self.assertEqual({n for n in without if n.startswith("process_")}, set())

    def test_nothing_in_the_global_registry(self) -> None:
        # Two daemons in one process must not collide, and the default
        # registry must not grow: each gets its own CollectorRegistry.
        registry_for(self.counters, self.state)
        registry_for(Counters(), State())
        MetricsResource(
            make_registry(
                Counters(), buffer_used=lambda: 0, buffer_capacity=1, waiting_docs=lambda: 0
            )
        )
        names = {m.name for m in prometheus_client.REGISTRY.collect()}
        self.assertFalse([n for n in names if n.startswith("xray_daemon")])


class OtlpCollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.counters = OtlpCounters(
            requests_received=40,
            spans_received=900,
            spans_sent=700,
            spans_rejected=30,
            spans_lost=120,
            lost_requests_spans_unknown=2,
            spans_spooled=300,
            spans_replayed=250,
            requests=busy_counters(),
        )
        for n, reason in enumerate(OTLP_REFUSALS, start=50):
            self.counters.refused[reason] = n

    def scrape(self) -> Samples:
        registry = prometheus_client.CollectorRegistry()
        registry.register(
            OtlpCollector(self.counters, buffer_used=lambda: 2048, waiting_requests=lambda: 6)
        )
        return samples(generate_latest(registry).decode())

    def test_every_counter_under_its_name(self) -> None:
        s = self.scrape()
        c, r = self.counters, self.counters.requests
        expected = {
            "xray_daemon_otlp_requests_received_total": c.requests_received,
            "xray_daemon_otlp_spans_received_total": c.spans_received,
            "xray_daemon_otlp_spans_sent_total": c.spans_sent,
            "xray_daemon_otlp_spans_rejected_total": c.spans_rejected,
            "xray_daemon_otlp_spans_lost_total": c.spans_lost,
            "xray_daemon_otlp_lost_requests_spans_unknown_total": c.lost_requests_spans_unknown,
            "xray_daemon_otlp_spans_spooled_total": c.spans_spooled,
            "xray_daemon_otlp_spans_replayed_total": c.spans_replayed,
            "xray_daemon_otlp_requests_sent_total": r.sent,
            "xray_daemon_otlp_requests_rejected_total": r.rejected,
            "xray_daemon_otlp_requests_lost_total": r.lost,
            "xray_daemon_otlp_requests_retried_total": r.retried,
            "xray_daemon_otlp_requests_spooled_total": r.spooled,
            "xray_daemon_otlp_requests_replayed_total": r.replayed,
            "xray_daemon_otlp_buffer_bytes": 2048,
            "xray_daemon_otlp_requests_waiting": 6,
            "xray_daemon_otlp_upload_duration_seconds_count": 5,
        }
        for name, value in expected.items():
            self.assertEqual(s[(name, ())], value, name)
        for n, reason in enumerate(OTLP_REFUSALS, start=50):
            key = ("xray_daemon_otlp_requests_refused_total", (("reason", reason),))
            self.assertEqual(s[key], n, reason)
        self.assertEqual(s[("xray_daemon_otlp_upload_batches_total", (("outcome", "ok"),))], 9)
        for n, cls in enumerate(ERROR_CLASSES, start=1):
            key = ("xray_daemon_otlp_backend_errors_total", (("class", ERROR_CLASS_LABELS[cls]),))
            self.assertEqual(s[key], n, cls)

    def test_upload_families_are_the_segment_ones_under_otlp_names(self) -> None:
        # One helper builds both: the same buckets, labels and values for the same Counters.
        otlp = self.scrape()
        segments = samples(generate_latest(registry_for(busy_counters(), State())).decode())
        for family in ("upload_batches_total", "backend_errors_total", "upload_duration_seconds"):
            mine = {
                (name.replace("xray_daemon_otlp_", ""), labels): value
                for (name, labels), value in otlp.items()
                if name.startswith("xray_daemon_otlp_" + family)
            }
            theirs = {
                (name.replace("xray_daemon_", ""), labels): value
                for (name, labels), value in segments.items()
                if name.startswith("xray_daemon_" + family)
            }
            self.assertTrue(mine, family)
            self.assertEqual(mine, theirs, family)


class HTTPScrapeTests(TestCase):
    """A real scrape over 127.0.0.1, parsed with prometheus_client's own parsers."""

    timeout = 10

    def setUp(self) -> None:
        self.counters = busy_counters()
        self.state = State()
        resource = MetricsResource(
            make_registry(
                self.counters,
                buffer_used=lambda: self.state.used,
                buffer_capacity=1 << 20,
                waiting_docs=lambda: self.state.waiting,
                kernel_drops=lambda: self.state.drops,
            )
        )
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/metrics"

    @defer.inlineCallbacks
    def get(self, method: str = "GET", **kwargs: Any) -> Any:
        response = yield treq.request(method, self.url, persistent=False, **kwargs)
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def test_scrape_matches_counters_and_follows_them(self) -> None:
        response, body = yield self.get()
        self.assertEqual(response.code, 200)
        (content_type,) = response.headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("text/plain; version=0.0.4"), content_type)
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])
        s = samples(body.decode())
        self.assertEqual(s[("xray_daemon_segments_received_total", ())], 120)
        self.assertEqual(s[("xray_daemon_segments_waiting", ())], 17)
        self.assertEqual(s[("xray_daemon_kernel_udp_drops_total", ())], 42)
        self.assertEqual(
            s[("xray_daemon_backend_errors_total", (("class", "http_5xx"),))],
            self.counters.backend_errors["HTTPCode5XXCount"],
        )

        self.counters.sent += 50
        self.counters.batches_ok += 1
        self.state.waiting = 0
        _, body = yield self.get()
        s = samples(body.decode())
        self.assertEqual(s[("xray_daemon_segments_sent_total", ())], 150)
        self.assertEqual(s[("xray_daemon_upload_batches_total", (("outcome", "ok"),))], 10)
        self.assertEqual(s[("xray_daemon_segments_waiting", ())], 0)

    @defer.inlineCallbacks
    def test_openmetrics_when_asked_for(self) -> None:
        response, body = yield self.get(
            headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        (content_type,) = response.headers.getRawHeaders("content-type")
        self.assertTrue(content_type.startswith("application/openmetrics-text"), content_type)
        families = {f.name: f for f in openmetrics_families(body.decode())}
        received = families["xray_daemon_segments_received"]
        self.assertEqual(received.type, "counter")
        self.assertEqual(received.samples[0].value, 120)

    @defer.inlineCallbacks
    def test_head_and_bad_methods(self) -> None:
        response, body = yield self.get("HEAD")
        self.assertEqual((response.code, body), (200, b""))
        response, body = yield self.get("POST", data=b"x")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
