"""The daemon's counters: one object, passed to whoever counts.

Plain integer attributes, because incrementing one is the cheapest thing
Python can do on the per-segment path.  Totals only ever grow; telemetry
records and metrics take differences between snapshots.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

# Backend error classes, as PutTelemetryRecords names them.
ERROR_CLASSES = (
    "TimeoutCount",
    "ConnectionRefusedCount",
    "HTTPCode4XXCount",
    "HTTPCode5XXCount",
    "UnknownHostCount",
    "OtherCount",
)

# Outcomes of requests to the TCP port's HTTP side (the sampling proxy and
# the local /health and /metrics pages).
PROXY_OUTCOMES = (
    "forwarded",  # sent to X-Ray and its answer relayed, whatever its status
    "not_found",  # not an X-Ray API path: answered 404, never forwarded
    "bad_method",  # 405
    "too_large",  # 413
    "no_credentials",  # 503
    "overloaded",  # 503: too many requests in flight
    "timeout",  # 504
    "unreachable",  # 502
    "local",  # /health, /metrics, or sampling answered by the daemon itself
    "not_allowed",  # 403: an X-Ray API path outside SamplingProxy.Allow
    "cross_origin",  # 403: a request from a web page (it has an Origin header)
    "bad_host",  # 403: a Host header outside SamplingProxy.AllowedHosts
    "slow_client",  # 408: the request was not complete within its deadline
)

UPLOAD_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Cumulative-ready bucket counts of observed values (Prometheus style)."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...] = UPLOAD_SECONDS_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def copy(self) -> Histogram:
        other = Histogram(self.bounds)
        other.counts = list(self.counts)
        other.count = self.count
        other.sum = self.sum
        return other


@dataclass
class Counters:
    received: int = 0  # datagrams / stream records that arrived (valid or not)
    received_bytes: int = 0
    rejected: int = 0  # bad header, missing body, or refused by X-Ray as unprocessable
    spillover: int = 0  # accepted-size documents refused because the buffer was full
    sent: int = 0  # documents X-Ray accepted
    sent_bytes: int = 0
    unprocessed: int = 0  # documents X-Ray returned in UnprocessedTraceSegments
    lost: int = 0  # accepted documents given up on (e.g. shutdown deadline, spool full)
    retried: int = 0  # documents sent again after a failed attempt
    batches_ok: int = 0
    batches_failed: int = 0  # upload attempts that failed (each may be retried)
    kernel_drops: int = 0  # datagrams the kernel dropped: receive buffer full
    spooled: int = 0  # documents written to the disk spool
    replayed: int = 0  # documents read back from the spool and delivered
    stream_connections: int = 0  # TCP segment-stream connections accepted
    tcp_refused: int = 0  # TCP (and monitoring) connections closed at once: limits reached
    first_received_at: float | None = None  # clock time of the first record
    last_success_at: float | None = None  # clock time of the last successful upload
    backend_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_CLASSES, 0))
    proxy_requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROXY_OUTCOMES, 0))
    upload_seconds: Histogram = field(default_factory=Histogram)

    def snapshot(self) -> Counters:
        copy = dataclasses.replace(self)
        copy.backend_errors = dict(self.backend_errors)
        copy.proxy_requests = dict(self.proxy_requests)
        copy.upload_seconds = self.upload_seconds.copy()
        return copy


# Why the OTLP/HTTP receiver refused a request (``OtlpCounters.refused``).
OTLP_REFUSALS = (
    "bad_data",  # 400: not an OTLP trace request (protobuf or JSON), or a bad gzip body
    "too_many_spans",  # 400: more spans than X-Ray takes in one request
    "span_too_large",  # 400: a span larger than X-Ray takes
    "too_large",  # 413: body (or its decompressed form) over the limit
    "unsupported_media",  # 415: Content-Type or Content-Encoding not accepted
    "origin",  # 403: an Origin header (a browser page trying to post)
    "not_found",  # 404: a path other than /v1/traces
    "bad_method",  # 405
    "buffer_full",  # 503 + Retry-After: the shared memory budget is spent
    "hold_full",  # 503 + Retry-After: bodies still arriving hold OTLP.HoldMB already
    "deadline",  # headers and body did not arrive within the request deadline
    "too_many_connections",  # connection closed at once: the connection cap was reached
    "internal_error",  # 500: the receiver failed on the request (a bug; logged, throttled)
)


@dataclass
class OtlpCounters:
    """The OTLP bridge's counters: spans in and out, and requests refused by reason.

    ``requests`` is the ``Counters`` of the span pipeline's own buffer,
    batcher and spool, whose unit is one accepted OTLP request (what an SDK
    exported in one POST): ``requests.sent``, ``requests.lost``, ... count
    requests, the ``spans_*`` fields here count spans.
    """

    requests_received: int = 0  # POSTs to /v1/traces accepted into the buffer
    spans_received: int = 0  # spans in those requests
    spans_sent: int = 0  # spans X-Ray accepted
    spans_rejected: int = 0  # spans X-Ray refused (partial success, or a refused request)
    # Spans of accepted requests given up on (shutdown deadline, spool full, ...).  A
    # request lost inside the spool whose spans the daemon cannot know (in a file from an
    # earlier run, or in a corrupt record) is counted in lost_requests_spans_unknown
    # instead: requests.lost counts both.
    spans_lost: int = 0
    lost_requests_spans_unknown: int = 0
    spans_spooled: int = 0  # spans of the requests written to the disk spool
    spans_replayed: int = 0  # spans of requests read back from the spool and delivered
    refused: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OTLP_REFUSALS, 0))
    requests: Counters = field(default_factory=Counters)
