"""The benchmark's spans, and how the sink reads them back.

Every span is a realistic ~1 KB OTLP server span (HTTP semantic-convention
attributes, a status, a small event) under one resource with the attributes
an OpenTelemetry SDK on EC2 reports.  One string attribute, ``bench.id``,
holds ``xbench:<16 hex>:<seconds>``: the sender's sequence number and the
wall-clock time the request carrying the span was built, just before its
POST.  Protobuf stores strings as they are, and the daemon forwards the
bytes untouched (gzipped), so after gunzipping an upload one regex over the
raw body yields every (id, send time) pair without decoding any protobuf.

``SpanFactory`` serializes a template span with opentelemetry-proto once
(benchmark-only), finds its fixed-width placeholders (ids, times, the
marker) and afterwards builds each span by joining the template's pieces
around the new values: the same length, so every length prefix stays valid,
at about a microsecond a span.  The request around the spans (resource,
scope, the three length-delimited levels) is written by hand here and
checked once against opentelemetry-proto's parser.
"""

from __future__ import annotations

import random
import re
import struct

from xraytwisted.ingest.otlp_wire import encode_varint as varint

SPAN_RE = re.compile(rb"xbench:([0-9a-f]{16}):([0-9]{10}\.[0-9]{6})")
DEFAULT_SIZE = 1024  # bytes per serialized span, about
SPANS_PER_TRACE = 8

# Fixed-width placeholders in the template span (each must occur once).
_TRACE = b"\xa1" * 16
_SPAN = b"\xa2" * 8
_PARENT = b"\xa3" * 8
_START = b"\xa4" * 8
_END = b"\xa5" * 8
_MARK = b"xbench:" + b"h" * 16 + b":" + b"9" * 10 + b"." + b"9" * 6
_NOISE = b"#" * 320  # in app.padding: varies per span, so that gzip finds a realistic ~4x
NOISE_VARIANTS = 1024


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def _resource_and_scope() -> tuple[bytes, bytes]:
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2

    def kv(key: str, value: str) -> common_pb2.KeyValue:
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))

    resource = resource_pb2.Resource(
        attributes=[
            kv("service.name", "bench-checkout"),
            kv("service.version", "1.4.2"),
            kv("deployment.environment.name", "production"),
            kv("telemetry.sdk.language", "python"),
            kv("telemetry.sdk.name", "opentelemetry"),
            kv("telemetry.sdk.version", "1.45.2"),
            kv("cloud.provider", "aws"),
            kv("cloud.platform", "aws_ec2"),
            kv("cloud.region", "us-east-2"),
            kv("cloud.availability_zone", "us-east-2a"),
            kv("host.id", "i-0123456789abcdef0"),
            kv("host.type", "m6i.large"),
        ]
    )
    scope = common_pb2.InstrumentationScope(
        name="opentelemetry.instrumentation.flask", version="0.66b2"
    )
    return resource.SerializeToString(), scope.SerializeToString()


def _template(padding: int) -> bytes:
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    def kv(key: str, value: str | int) -> common_pb2.KeyValue:
        if isinstance(value, int):
            return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))

    span = trace_pb2.Span(
        trace_id=_TRACE,
        span_id=_SPAN,
        parent_span_id=_PARENT,
        name="POST /cart/checkout",
        kind=trace_pb2.Span.SPAN_KIND_SERVER,
        start_time_unix_nano=int.from_bytes(_START, "little"),
        end_time_unix_nano=int.from_bytes(_END, "little"),
        attributes=[
            kv("bench.id", _MARK.decode()),
            kv("http.request.method", "POST"),
            kv("url.scheme", "https"),
            kv("url.path", "/cart/checkout"),
            kv("http.route", "/cart/checkout"),
            kv("server.address", "api.example.com"),
            kv("server.port", 443),
            kv("client.address", "192.0.2.10"),
            kv("network.protocol.version", "1.1"),
            kv("user_agent.original", "bench-client/1.0 (Linux x86_64)"),
            kv("http.response.status_code", 200),
            kv("http.response.body.size", 1834),
            kv("app.customer_tier", "gold"),
            kv("app.cart_items", 3),
            kv("app.padding", _NOISE.decode() + "x" * padding),
        ],
        events=[
            trace_pb2.Span.Event(
                time_unix_nano=int.from_bytes(_END, "little"),
                name="cart.priced",
                attributes=[kv("app.currency", "USD")],
            )
        ],
        status=trace_pb2.Status(code=trace_pb2.Status.STATUS_CODE_OK),
        flags=0x100,  # the parent is known to be remote or not: W3C flags as SDKs set them
    )
    return bytes(span.SerializeToString())


class SpanFactory:
    """Builds OTLP/protobuf export requests of ~``size``-byte spans cheaply."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        bare = len(_template(0))
        rng = random.Random(size)
        self._noise = [
            bytes(rng.choice(b"0123456789abcdef") for _ in _NOISE) for _ in range(NOISE_VARIANTS)
        ]
        padding = max(0, size - bare)
        # A longer string may need longer length prefixes: correct once.
        padding = max(0, padding - (len(_template(padding)) - size))
        self.template = _template(padding)
        names = {_TRACE: "trace", _SPAN: "span", _PARENT: "parent", _START: "start",
                 _END: "end", _MARK: "mark", _NOISE: "noise"}  # fmt: skip
        found = []
        for marker, name in names.items():
            spots = [m.start() for m in re.finditer(re.escape(marker), self.template)]
            # The end time is also the event's time; every other placeholder occurs once.
            if len(spots) != (2 if marker is _END else 1):
                raise AssertionError(f"placeholder {name} found {len(spots)} times in the template")
            found += [(at, marker, name) for at in spots]
        self._pieces: list[tuple[bytes, str]] = []
        pos = 0
        for at, marker, name in sorted(found):
            self._pieces.append((self.template[pos:at], name))
            pos = at + len(marker)
        self._tail = self.template[pos:]
        resource, scope = _resource_and_scope()
        self._resource = field(1, resource)
        self._scope = field(1, scope)
        self._check()

    def span(self, seq: int, end_ns: int, mark_time: bytes) -> bytes:
        """Span number ``seq``, ended at ``end_ns``, stamped ``mark_time`` (b"%.6f" seconds)."""
        trace = seq // SPANS_PER_TRACE
        values = {
            "trace": b"\x5b\xe0\x5b\xe0" + struct.pack(">IQ", trace >> 64, trace & (1 << 64) - 1),
            "span": struct.pack(">Q", seq | 1 << 63),
            "parent": struct.pack(">Q", trace * SPANS_PER_TRACE | 1 << 63),
            "start": struct.pack("<Q", end_ns - 5_000_000),
            "end": struct.pack("<Q", end_ns),
            "mark": b"xbench:%016x:%s" % (seq, mark_time),
            "noise": self._noise[seq % NOISE_VARIANTS],
        }
        parts = []
        for piece, name in self._pieces:
            parts.append(piece)
            parts.append(values[name])
        parts.append(self._tail)
        return b"".join(parts)

    def request(self, spans: list[tuple[int, int]], now: float) -> bytes:
        """One ExportTraceServiceRequest holding the spans ``(seq, end_ns)``, stamped ``now``."""
        mark = b"%.6f" % now
        scope_spans = self._scope + b"".join(field(2, self.span(s, e, mark)) for s, e in spans)
        resource_spans = self._resource + field(2, scope_spans)
        return field(1, resource_spans)

    def _check(self) -> None:
        """The hand-written request parses as opentelemetry-proto's, with the values put in."""
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        body = self.request([(5, 1_700_000_000_000_000_000), (6, 1_700_000_000_100_000_000)], 1.7e9)
        parsed = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        spans = parsed.resource_spans[0].scope_spans[0].spans
        assert len(spans) == 2 and spans[1].end_time_unix_nano == 1_700_000_000_100_000_000
        assert spans[0].attributes[0].value.string_value == f"xbench:{5:016x}:1700000000.000000"
        assert spans[1].events[0].time_unix_nano == spans[1].end_time_unix_nano
        assert SPAN_RE.findall(body) == [
            (b"%016x" % n, b"1700000000.000000") for n in (5, 6)
        ]  # fmt: skip
