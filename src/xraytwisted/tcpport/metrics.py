"""GET /metrics: the daemon's counters in Prometheus text format.

Nothing is counted here: a custom collector reads ``stats.Counters`` (and a
few gauges through callables) when Prometheus scrapes, so the per-segment
path pays nothing.  Each daemon gets its own ``CollectorRegistry``; nothing
is registered in prometheus_client's global default registry.

The page is rendered by our own small resource on the reactor thread rather
than by ``prometheus_client.twisted.MetricsResource``: that one is a
WSGIResource that imports the global reactor when its module is imported
(which would install the default reactor before twistd can pick one) and
renders in the reactor's thread pool, where it would read the counters
while the reactor thread changes them (a histogram's buckets, count and sum
could disagree).  Rendering takes well under a millisecond.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString
from twisted.copyright import version as twisted_version
from twisted.web.resource import Resource
from twisted.web.server import Request

from xraytwisted import __version__
from xraytwisted.observe import counters as counter_types
from xraytwisted.observe.counters import ERROR_CLASSES, PROXY_OUTCOMES, Counters, Histogram

PREFIX = "xray_daemon_"

# PutTelemetryRecords class names -> label values (Prometheus style).
ERROR_CLASS_LABELS: Mapping[str, str] = MappingProxyType(
    dict(
        zip(
            ERROR_CLASSES,
            ("timeout", "connection_refused", "http_4xx", "http_5xx", "unknown_host", "other"),
            strict=True,
        )
    )
)

# (metric name without _total, Counters attribute, help text)
_SIMPLE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("segments_received", "received",
     "Segment records received from SDKs (UDP datagrams and stream records), valid or not."),
    ("segments_rejected", "rejected",
     "Segments refused: bad header or no body, or refused by X-Ray as invalid."),
    ("segments_spillover", "spillover",
     "Segments dropped on arrival because the buffer was full."),
    ("segments_sent", "sent", "Segments X-Ray accepted."),
    ("segments_retried", "retried", "Segments sent again after a failed upload attempt."),
    ("segments_unprocessed", "unprocessed",
     "Segments X-Ray returned as UnprocessedTraceSegments (some are retried)."),
    ("segments_lost", "lost",
     "Accepted segments given up on (shutdown deadline reached, spool full)."),
    ("segments_spooled", "spooled", "Segments written to the disk spool."),
    ("segments_replayed", "replayed", "Segments read back from the disk spool and delivered."),
    ("received_bytes", "received_bytes", "Bytes of segment records received."),
    ("sent_bytes", "sent_bytes", "Bytes of segment documents in successful uploads."),
    ("stream_connections", "stream_connections", "TCP segment-stream connections accepted."),
    ("tcp_connections_refused", "tcp_refused",
     "TCP connections (the TCP port and the monitoring listener) closed at once because "
     "the connection limits were reached."),
)  # fmt: skip


def _histogram_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs, ending with +Inf, from per-bucket counts."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(histogram.bounds, histogram.counts, strict=False):
        total += count
        buckets.append((floatToGoString(bound), float(total)))
    buckets.append(("+Inf", float(histogram.count)))
    return buckets


def _counter_table(table: tuple[tuple[str, str, str], ...], source: Any) -> Iterator[Metric]:
    """One counter per (name, attribute of ``source``, help) row."""
    for name, attr, doc in table:
        yield CounterMetricFamily(PREFIX + name, doc, value=getattr(source, attr))


@dataclass(frozen=True)
class _UploadHelp:
    """Names and help texts of a pipeline's upload metrics (segments, or the OTLP bridge)."""

    prefix: str  # "" or "otlp_"
    batches: str
    errors: str
    duration: str


_SEGMENT_UPLOADS = _UploadHelp(
    "",
    "PutTraceSegments attempts by outcome (a failed batch may be retried).",
    "Failed PutTraceSegments attempts by cause, as reported in telemetry records.",
    "Duration of successful PutTraceSegments calls.",
)
_OTLP_UPLOADS = _UploadHelp(
    "otlp_",
    "Uploads to X-Ray's OTLP endpoint by outcome (a failed batch may be retried).",
    "Failed uploads to X-Ray's OTLP endpoint by cause.",
    "Duration of successful uploads to X-Ray's OTLP endpoint.",
)


def _upload_families(c: Counters, names: _UploadHelp) -> tuple[Metric, Metric, Metric]:
    """Upload attempts by outcome, failures by cause, and the duration histogram."""
    batches = CounterMetricFamily(
        PREFIX + names.prefix + "upload_batches", names.batches, labels=["outcome"]
    )
    batches.add_metric(["ok"], c.batches_ok)
    batches.add_metric(["failed"], c.batches_failed)
    errors = CounterMetricFamily(
        PREFIX + names.prefix + "backend_errors", names.errors, labels=["class"]
    )
    for cls, label in ERROR_CLASS_LABELS.items():
        errors.add_metric([label], c.backend_errors.get(cls, 0))
    hist = c.upload_seconds
    duration = HistogramMetricFamily(
        PREFIX + names.prefix + "upload_duration_seconds",
        names.duration,
        buckets=_histogram_buckets(hist),
        sum_value=hist.sum,
    )
    return batches, errors, duration


class CountersCollector(Collector):
    """A prometheus_client collector over ``Counters`` and a few gauge callables."""

    def __init__(
        self,
        counters: Counters,
        *,
        buffer_used: Callable[[], int],
        buffer_capacity: int,
        waiting_docs: Callable[[], int],
        kernel_drops: Callable[[], int | None] | None = None,
        extra_info: Mapping[str, str] = MappingProxyType({}),
    ) -> None:
        self.counters = counters
        self.buffer_used = buffer_used
        self.buffer_capacity = buffer_capacity
        self.waiting_docs = waiting_docs
        self.kernel_drops = kernel_drops
        self.info = {
            "version": __version__,
            "python": platform.python_version(),
            "twisted": twisted_version,
            **extra_info,
        }

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        yield from _counter_table(_SIMPLE_COUNTERS, c)
        batches, errors, duration = _upload_families(c, _SEGMENT_UPLOADS)
        yield batches
        yield errors

        proxy = CounterMetricFamily(
            PREFIX + "proxy_requests",
            "HTTP requests on the TCP port by outcome (sampling proxy and local pages).",
            labels=["outcome"],
        )
        for outcome in PROXY_OUTCOMES:
            proxy.add_metric([outcome], c.proxy_requests.get(outcome, 0))
        yield proxy
        yield duration

        yield GaugeMetricFamily(
            PREFIX + "buffer_bytes",
            "Bytes of the segment buffer in use (queued and in-flight segments).",
            value=self.buffer_used(),
        )
        yield GaugeMetricFamily(
            PREFIX + "buffer_capacity_bytes",
            "Size of the segment buffer (the memory budget).",
            value=self.buffer_capacity,
        )
        yield GaugeMetricFamily(
            PREFIX + "segments_waiting",
            "Accepted segments not yet sent or given up on (queued, retrying or in flight).",
            value=self.waiting_docs(),
        )
        if c.last_success_at is not None:
            yield GaugeMetricFamily(
                PREFIX + "last_successful_upload_timestamp_seconds",
                "When the last PutTraceSegments call succeeded (Unix time).",
                value=c.last_success_at,
            )
        drops = self.kernel_drops() if self.kernel_drops is not None else None
        if drops is not None:
            yield CounterMetricFamily(
                PREFIX + "kernel_udp_drops",
                "Datagrams the kernel dropped because the UDP receive buffer was full.",
                value=drops,
            )
        yield InfoMetricFamily(PREFIX + "build", "xraytwisted build information.", value=self.info)


def make_registry(
    counters: Counters,
    *,
    buffer_used: Callable[[], int],
    buffer_capacity: int,
    waiting_docs: Callable[[], int],
    kernel_drops: Callable[[], int | None] | None = None,
    extra_info: Mapping[str, str] = MappingProxyType({}),
    process_metrics: bool = True,
) -> CollectorRegistry:
    """A private registry with the daemon's collector (and process_* metrics on Linux)."""
    registry = CollectorRegistry()
    registry.register(
        CountersCollector(
            counters,
            buffer_used=buffer_used,
            buffer_capacity=buffer_capacity,
            waiting_docs=waiting_docs,
            kernel_drops=kernel_drops,
            extra_info=extra_info,
        )
    )
    if process_metrics:
        # CPU, resident memory, open fds, start time: read from /proc at
        # scrape time (nothing on systems without it).
        ProcessCollector(registry=registry)
    return registry


class MetricsResource(Resource):
    """GET/HEAD: the registry in the text format the scraper asks for (Accept header)."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"method not allowed: use GET or HEAD\n"
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        request.setHeader(b"content-type", content_type.encode("latin-1"))
        request.setHeader(b"cache-control", b"no-store")
        return body


# -- the OTLP bridge (registered next to CountersCollector with --otlp-address)

# (metric name without _total, OtlpCounters attribute, help text)
_OTLP_SPAN_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("otlp_requests_received", "requests_received",
     "OTLP/HTTP trace requests accepted into the buffer."),
    ("otlp_spans_received", "spans_received", "Spans in accepted OTLP requests."),
    ("otlp_spans_sent", "spans_sent", "Spans X-Ray's OTLP endpoint accepted."),
    ("otlp_spans_rejected", "spans_rejected",
     "Spans X-Ray refused (partial success, or a request refused for good)."),
    ("otlp_spans_lost", "spans_lost",
     "Spans of accepted OTLP requests given up on (shutdown deadline reached, spool full); "
     "see otlp_lost_requests_spans_unknown."),
    ("otlp_lost_requests_spans_unknown", "lost_requests_spans_unknown",
     "Lost OTLP requests whose spans are not known (in a spool file of an earlier run, or "
     "in a corrupt spool record): not in otlp_spans_lost."),
    ("otlp_spans_spooled", "spans_spooled", "Spans of OTLP requests written to the disk spool."),
    ("otlp_spans_replayed", "spans_replayed",
     "Spans of OTLP requests read back from the disk spool and delivered."),
)  # fmt: skip

# (metric name without _total, Counters attribute of OtlpCounters.requests, help text)
_OTLP_REQUEST_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("otlp_requests_sent", "sent", "Accepted OTLP requests X-Ray took (in a batch)."),
    ("otlp_requests_rejected", "rejected", "Accepted OTLP requests X-Ray refused for good."),
    ("otlp_requests_lost", "lost",
     "Accepted OTLP requests given up on (shutdown deadline reached, spool full)."),
    ("otlp_requests_retried", "retried", "OTLP requests sent again after a failed upload."),
    ("otlp_requests_spooled", "spooled", "OTLP requests written to the disk spool."),
    ("otlp_requests_replayed", "replayed",
     "OTLP requests read back from the disk spool and delivered."),
)  # fmt: skip


class OtlpCollector(Collector):
    """Metrics of the OTLP bridge: spans in and out, requests by fate and refusal reason."""

    def __init__(
        self,
        counters: counter_types.OtlpCounters,
        *,
        buffer_used: Callable[[], int],
        waiting_requests: Callable[[], int],
    ) -> None:
        self.counters = counters
        self.buffer_used = buffer_used
        self.waiting_requests = waiting_requests

    def collect(self) -> Iterator[Metric]:
        c = self.counters
        yield from _counter_table(_OTLP_SPAN_COUNTERS, c)
        yield from _counter_table(_OTLP_REQUEST_COUNTERS, c.requests)

        refused = CounterMetricFamily(
            PREFIX + "otlp_requests_refused",
            "OTLP/HTTP requests the receiver refused, by reason (see docs/otlp.md).",
            labels=["reason"],
        )
        for reason in counter_types.OTLP_REFUSALS:
            refused.add_metric([reason], c.refused.get(reason, 0))
        yield refused
        yield from _upload_families(c.requests, _OTLP_UPLOADS)
        yield GaugeMetricFamily(
            PREFIX + "otlp_buffer_bytes",
            "Bytes of the shared memory budget held by OTLP requests (queued and in flight).",
            value=self.buffer_used(),
        )
        yield GaugeMetricFamily(
            PREFIX + "otlp_requests_waiting",
            "Accepted OTLP requests not yet sent or given up on (spooled ones included).",
            value=self.waiting_requests(),
        )
