"""Tests for xraytwisted.ingest.otlp_wire: checked against real opentelemetry-proto messages."""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.ingest.otlp_wire import (
    RequestShape,
    WireError,
    encode_varint,
    json_request_shape,
    partial_success,
    request_shape,
)

try:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2
except ImportError:  # pragma: no cover - the test extra installs it
    trace_service_pb2 = None


def request(spans_per_scope: list[list[int]]) -> bytes:
    """A real ExportTraceServiceRequest: one ResourceSpans per list, spans named by size."""
    assert trace_service_pb2 is not None
    message = trace_service_pb2.ExportTraceServiceRequest()
    for scope_sizes in spans_per_scope:
        resource = message.resource_spans.add()
        resource.resource.attributes.add(key="service.name").value.string_value = "svc"
        scope = resource.scope_spans.add()
        scope.scope.name = "lib"
        for i, size in enumerate(scope_sizes):
            span = scope.spans.add()
            span.trace_id = bytes(range(16))
            span.span_id = bytes([i + 1] * 8)
            span.name = "x" * size
            span.kind = trace_pb2.Span.SPAN_KIND_SERVER
            span.start_time_unix_nano = 1_700_000_000_000_000_000
            span.end_time_unix_nano = 1_700_000_000_100_000_000
        resource.schema_url = "https://opentelemetry.io/schemas/1.21.0"
    return bytes(message.SerializeToString())


class RequestShapeTests(SynchronousTestCase):
    def setUp(self) -> None:
        if trace_service_pb2 is None:
            raise self.skipTest("opentelemetry-proto is not installed")

    def test_counts_spans_across_resources_and_scopes(self) -> None:
        data = request([[10, 20, 30], [], [5]])
        shape = request_shape(data)
        self.assertEqual(shape.spans, 4)
        self.assertGreater(shape.largest_span, 30)

    def test_concatenated_requests_are_one_request(self) -> None:
        a, b = request([[1, 2]]), request([[3], [4, 5, 6]])
        self.assertEqual(request_shape(a + b).spans, 6)
        parsed = trace_service_pb2.ExportTraceServiceRequest.FromString(a + b)
        self.assertEqual(len(parsed.resource_spans), 3)

    def test_empty_request_has_no_spans(self) -> None:
        self.assertEqual(request_shape(b""), RequestShape(0, 0))

    def test_largest_span_is_the_serialized_span_length(self) -> None:
        data = request([[100, 250_000]])
        parsed = trace_service_pb2.ExportTraceServiceRequest.FromString(data)
        big = parsed.resource_spans[0].scope_spans[0].spans[1].ByteSize()
        self.assertEqual(request_shape(data).largest_span, big)

    def test_junk_is_refused(self) -> None:
        for junk in (
            b"\xff",  # truncated varint
            b"\x0a\x05abc",  # length past the end
            b"\x00\x01",  # field number 0
            b"\x0b",  # start group
            b'{"resourceSpans": []}',  # JSON sent as protobuf
            b"\x08" + b"\xff" * 11,  # varint longer than 10 bytes
        ):
            with self.assertRaises(WireError, msg=repr(junk)):
                request_shape(junk)

    def test_resource_spans_must_be_length_delimited(self) -> None:
        with self.assertRaises(WireError):
            request_shape(b"\x08\x01")  # field 1 as a varint

    def test_unknown_fields_are_skipped(self) -> None:
        # Field 9 (varint), field 10 (fixed64), field 11 (fixed32) around a real request.
        data = b"\x48\x01" + b"\x51" + b"\x00" * 8 + request([[1]]) + b"\x5d" + b"\x00" * 4
        self.assertEqual(request_shape(data).spans, 1)


class EncodeVarintTests(SynchronousTestCase):
    def test_known_encodings(self) -> None:
        # (value, bytes): protobuf's base-128, low group first.
        table = [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"),
                 (300, b"\xac\x02"), (2**63, b"\x80" * 9 + b"\x01")]  # fmt: skip
        for value, encoded in table:
            self.assertEqual(encode_varint(value), encoded, value)
            # and read back by the walker: field 9 (a varint) is unknown, skipped
            self.assertEqual(request_shape(b"\x48" + encoded).spans, 0, value)


class PartialSuccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        if trace_service_pb2 is None:
            raise self.skipTest("opentelemetry-proto is not installed")

    def test_reads_rejected_spans_and_message(self) -> None:
        response = trace_service_pb2.ExportTraceServiceResponse()
        response.partial_success.rejected_spans = 3
        response.partial_success.error_message = "span too old"
        self.assertEqual(partial_success(response.SerializeToString()), (3, "span too old"))

    def test_full_success_is_empty(self) -> None:
        empty = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.assertEqual(partial_success(empty), (0, ""))
        self.assertEqual(partial_success(b""), (0, ""))


class JSONShapeTests(SynchronousTestCase):
    def test_counts_spans(self) -> None:
        body = {
            "resourceSpans": [
                {"scopeSpans": [{"spans": [{"name": "a"}, {"name": "b"}]}, {"spans": []}]},
                {"scopeSpans": [{"spans": [{"name": "c"}]}]},
                {},
            ]
        }
        self.assertEqual(json_request_shape(json.dumps(body).encode()).spans, 3)

    def test_bad_json_is_refused(self) -> None:
        for junk in (
            b"not json",
            b"[]",
            b'{"resourceSpans": {}}',
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [1]}]}]}',
            b'{"resourceSpans": [1]}',
            b"\xff\xfe",
        ):
            with self.assertRaises(WireError, msg=repr(junk)):
                json_request_shape(junk)

    def test_absurd_nesting_is_refused_not_a_recursion_error(self) -> None:
        for deep in (b"[" * 200_000, b'{"a":' * 100_000, b'{"resourceSpans": ' + b"[" * 50_000):
            with self.assertRaises(WireError) as raised:
                json_request_shape(deep)
            self.assertIn("nested too deeply", str(raised.exception))
