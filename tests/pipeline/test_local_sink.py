"""The local sink: JSON Lines encoding, appends, and errors as Outcomes."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.tempdirs import temp_path
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline import local_sink
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.local_sink import (
    UNDECODED_KEY,
    LocalSink,
    LocalSinkError,
    LocalSpanSink,
    encode_line,
    is_json_object,
)
from xraytwisted.pipeline.otlp_batches import (
    KIND_JSON,
    KIND_PROTOBUF,
    SpanBatcher,
    SpanBuffer,
    frame,
)
from xraytwisted.pipeline.uploader import Outcome

SEGMENT = (
    b'{"id": "70de5b6f19ff9a0a", "name": "svc", "trace_id": '
    b'"1-581cf771-a006649127e371903a2de979", "start_time": 1478293361.271, '
    b'"end_time": 1478293361.449}'
)
OTLP = b"T1SCgoKCAoGEgRzdmMxEgA="


class EncodeTests(SynchronousTestCase):
    def test_object_is_written_exactly_as_received(self) -> None:
        self.assertEqual(encode_line(SEGMENT), SEGMENT + b"\n")

    def test_line_breaks_between_tokens_become_spaces(self) -> None:
        pretty = json.dumps(json.loads(SEGMENT), indent=2).encode().replace(b"\n", b"\r\n")
        line = encode_line(pretty)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        self.assertNotIn(b"\r", line)
        self.assertEqual(json.loads(line), json.loads(SEGMENT))

    def test_otlp_payload_is_wrapped(self) -> None:
        self.assertEqual(encode_line(OTLP), b'{"raw": "T1SCgoKCAoGEgRzdmMxEgA="}\n')

    def test_non_objects_are_wrapped(self) -> None:
        cases = {
            b"x": "x",
            b"42": "42",
            b"[1, 2]": "[1, 2]",
            b'"text"': '"text"',
            b'{"a": 1': '{"a": 1',  # truncated JSON
            b'{"a": 1}\n{"b": 2}': '{"a": 1}\n{"b": 2}',  # two documents in one body
            b'{"start_time": NaN}': '{"start_time": NaN}',  # not JSON outside Python
            b'{"a": Infinity}': '{"a": Infinity}',
            b"\xff\xfe{}": "\ufffd\ufffd{}",  # invalid UTF-8, as uploads replace it
        }
        for doc, raw in cases.items():
            line = encode_line(doc)
            self.assertEqual(line.count(b"\n"), 1, doc)
            self.assertEqual(json.loads(line), {"raw": raw}, doc)

    def test_deeply_nested_body_is_wrapped_not_an_exception(self) -> None:
        doc = b"[" * 100_000 + b"]" * 100_000
        self.assertFalse(is_json_object(doc))
        self.assertEqual(json.loads(encode_line(doc))["raw"], doc.decode())

    def test_unicode_is_kept(self) -> None:
        doc = '{"name": "caf\u00e9 \u2028 \U0001f600"}'.encode()
        self.assertEqual(encode_line(doc), doc + b"\n")
        self.assertEqual(
            encode_line("\u00e9t\u00e9".encode()), '{"raw": "\u00e9t\u00e9"}\n'.encode()
        )


class LocalSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = Path(temp_path(self)).resolve()
        self.dir.mkdir()
        self.path = self.dir / "traces.jsonl"

    def make(self, path: Path | str | None = None) -> LocalSink:
        sink = LocalSink(str(self.path if path is None else path), self.clock)
        self.addCleanup(sink.close)
        return sink

    def put(self, sink: LocalSink, *docs: bytes) -> Outcome:
        outcomes = []
        sink.put_trace_segments(list(docs)).addCallback(outcomes.append)
        self.assertEqual(len(outcomes), 1)  # fires at once, never fails
        return outcomes[0]

    def test_appends_one_line_per_document_visible_at_once(self) -> None:
        self.path.write_bytes(b'{"earlier": true}\n')
        sink = self.make()
        outcome = self.put(sink, SEGMENT, OTLP)
        self.assertEqual(outcome, Outcome(seconds=0.0))
        self.assertEqual(
            self.path.read_bytes(),
            b'{"earlier": true}\n' + SEGMENT + b"\n" + b'{"raw": "T1SCgoKCAoGEgRzdmMxEgA="}\n',
        )
        self.put(sink, b'{"n": 3}')
        self.assertEqual(self.path.read_bytes().splitlines()[-1], b'{"n": 3}')

    def test_relative_path_is_made_absolute(self) -> None:
        old = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, old)
        sink = self.make("rel.jsonl")
        self.assertEqual(sink.path, str(self.dir / "rel.jsonl"))

    def test_file_moved_away_is_recreated(self) -> None:
        sink = self.make()
        self.put(sink, b'{"n": 1}')
        moved = self.dir / "traces.jsonl.1"
        self.path.rename(moved)
        self.put(sink, b'{"n": 2}')
        self.assertEqual(moved.read_bytes(), b'{"n": 1}\n')
        self.assertEqual(self.path.read_bytes(), b'{"n": 2}\n')
        self.path.unlink()
        self.put(sink, b'{"n": 3}')
        self.assertEqual(self.path.read_bytes(), b'{"n": 3}\n')

    def test_cannot_open_is_a_clear_startup_error(self) -> None:
        missing = self.dir / "no-such-dir" / "traces.jsonl"
        with self.assertRaises(LocalSinkError) as caught:
            LocalSink(str(missing), self.clock)
        self.assertEqual(
            str(caught.exception),
            f"cannot open local sink file {missing}: No such file or directory; choose another "
            "path with --local-sink (or - for stdout) or fix the directory permissions",
        )

    def test_disk_full_is_a_retryable_outcome(self) -> None:
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full on this system")
        sink = self.make("/dev/full")
        outcome = self.put(sink, SEGMENT)
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertFalse(outcome.error.throttled)
        self.assertEqual(outcome.error.error_class, "")  # not an X-Ray connection error
        self.assertEqual(
            outcome.error.message,
            "cannot write to local sink /dev/full: No space left on device (free disk space "
            "or fix permissions; the segments are kept and retried)",
        )

    def test_partial_write_is_undone_so_the_retry_leaves_whole_lines(self) -> None:
        sink = self.make()
        self.put(sink, b'{"n": 1}')
        real_write = os.write
        calls = []

        def short_then_full(fd: int, data: bytes | memoryview) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")

        self.patch(local_sink.os, "write", short_then_full)
        outcome = self.put(sink, b'{"n": 2}', b'{"n": 3}')
        self.assertIsNotNone(outcome.error)
        self.assertEqual(calls, [18, 13])
        self.assertEqual(self.path.read_bytes(), b'{"n": 1}\n')
        self.patch(local_sink.os, "write", real_write)
        self.assertIsNone(self.put(sink, b'{"n": 2}', b'{"n": 3}').error)
        self.assertEqual(self.path.read_bytes(), b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')

    def test_stdout_partial_line_is_ended_before_the_next_batch(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        sink = LocalSink("-", self.clock, stdout_fd=write_end)
        self.addCleanup(sink.close)
        real_write = os.write

        def short_then_fail(fd: int, data: bytes | memoryview) -> int:
            if len(data) > 5:
                return real_write(fd, bytes(data[:5]))
            raise OSError(32, "Broken pipe")

        self.patch(local_sink.os, "write", short_then_fail)
        self.assertIsNotNone(self.put(sink, b'{"n": 1}').error)
        self.patch(local_sink.os, "write", real_write)
        self.assertIsNone(self.put(sink, b'{"n": 1}').error)
        self.assertEqual(os.read(read_end, 100), b'{"n":\n{"n": 1}\n')

    def test_stdout_is_written_and_not_closed(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        sink = LocalSink("-", self.clock, stdout_fd=write_end)
        self.assertEqual(sink.path, "-")
        self.put(sink, SEGMENT)
        sink.close()
        os.write(write_end, b"still open")  # would raise if the sink had closed it
        self.assertEqual(os.read(read_end, 1000), SEGMENT + b"\nstill open")

    def test_closed_sink_reports_an_error(self) -> None:
        sink = self.make()
        sink.close()
        sink.close()  # twice is fine
        outcome = self.put(sink, SEGMENT)
        assert outcome.error is not None
        self.assertIn("the local sink is closed", outcome.error.message)
        self.assertFalse(self.path.read_bytes())

    def test_batcher_uses_it_like_the_uploader(self) -> None:
        sink = self.make()
        counters = Counters()
        buffer = SegmentBuffer(1024 * 1024, self.clock, counters)
        batcher = Batcher(buffer, sink.put_trace_segments, self.clock, counters)
        batcher.startService()
        docs = [b'{"n": %d}' % i for i in range(60)]
        for doc in docs:
            self.assertTrue(buffer.offer(doc))
        self.clock.advance(1.0)  # 50 went at once, the last 10 at their deadline
        self.assertEqual(self.path.read_bytes(), b"".join(d + b"\n" for d in docs))
        self.assertEqual((counters.sent, counters.batches_ok), (60, 2))
        stopped: list[None] = []
        batcher.stopService().addCallback(stopped.append)
        self.assertEqual(stopped, [None])


def span_request(*spans: tuple[int, int, int, str], service: str = "svc") -> bytes:
    """A serialized ExportTraceServiceRequest of (trace id, span id, parent id, name) spans."""
    message = ExportTraceServiceRequest()
    resource = message.resource_spans.add()
    attribute = resource.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", service
    scope = resource.scope_spans.add()
    scope.scope.name = "tests"
    for trace_id, span_id, parent_id, name in spans:
        span = scope.spans.add()
        span.trace_id = trace_id.to_bytes(16, "big")
        span.span_id = span_id.to_bytes(8, "big")
        if parent_id:
            span.parent_span_id = parent_id.to_bytes(8, "big")
        span.name = name
        span.kind = Span.SPAN_KIND_SERVER
        span.start_time_unix_nano = 1_602_537_377_000_000_000
        span.end_time_unix_nano = 1_602_537_377_250_000_000
        span.status.code = Status.STATUS_CODE_ERROR
    return message.SerializeToString()


TRACE_ID = 0x5F84C7A10123456789ABCDEF01234567


class LocalSpanSinkTests(SynchronousTestCase):
    """OTLP requests in the sink file: one OTLP/JSON line per request."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = Path(temp_path(self, "traces.jsonl"))
        self.sink = LocalSink(str(self.path), self.clock)
        self.addCleanup(self.sink.close)
        self.counters = OtlpCounters()
        self.spans = LocalSpanSink(self.sink, self.clock, self.counters)

    def send(self, *docs: bytes) -> Outcome:
        outcomes: list[Outcome] = []
        self.spans.send(list(docs)).addCallback(outcomes.append)
        self.assertEqual(len(outcomes), 1)  # fires at once, never fails
        return outcomes[0]

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def test_protobuf_requests_become_otlp_json_lines(self) -> None:
        first = span_request((TRACE_ID, 0x11, 0xF000000000000002, "POST /cart"))
        second = span_request((TRACE_ID, 0x12, 0x11, "price"), (TRACE_ID, 0x13, 0x11, "pay"))
        outcome = self.send(frame(KIND_PROTOBUF, 1, first), frame(KIND_PROTOBUF, 2, second))
        self.assertIsNone(outcome.error)
        self.assertEqual(self.counters.spans_sent, 3)
        one, two = self.lines()
        # The OTLP/JSON encoding: hex ids, integer enums, int64 as strings, and
        # the resource once per request.
        self.assertEqual(
            one,
            {"resourceSpans": [{
                "resource": {"attributes": [
                    {"key": "service.name", "value": {"stringValue": "svc"}}]},
                "scopeSpans": [{"scope": {"name": "tests"}, "spans": [{
                    "traceId": "5f84c7a10123456789abcdef01234567",
                    "spanId": "0000000000000011",
                    "parentSpanId": "f000000000000002",
                    "name": "POST /cart",
                    "kind": 2,
                    "startTimeUnixNano": "1602537377000000000",
                    "endTimeUnixNano": "1602537377250000000",
                    "status": {"code": 2},
                }]}],
            }]},
        )  # fmt: skip
        spans = two["resourceSpans"][0]["scopeSpans"][0]["spans"]
        self.assertEqual([s["spanId"] for s in spans], ["0000000000000012", "0000000000000013"])
        # The line is what protobuf's own JSON parser reads back as the request.
        parsed = json_format.ParseDict(two, ExportTraceServiceRequest())
        self.assertEqual(len(parsed.resource_spans[0].scope_spans[0].spans), 2)

    def test_json_requests_are_written_as_received(self) -> None:
        body = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "j"}]}]}],\n "x": 1}'
        self.assertIsNone(self.send(frame(KIND_JSON, 1, body)).error)
        self.assertEqual(self.path.read_bytes(), body.replace(b"\n", b" ") + b"\n")

    def test_a_request_that_does_not_decode_is_kept(self) -> None:
        # Outer levels good (the receiver checks those), a span's inside broken.
        body = b"\x0a\x06\x12\x04\x12\x02\x0a\xff"
        self.assertIsNone(self.send(frame(KIND_PROTOBUF, 1, body)).error)
        [line] = self.lines()
        self.assertEqual(set(line), {UNDECODED_KEY, "error"})
        self.assertEqual(base64.b64decode(line[UNDECODED_KEY]), body)
        self.assertIn("not an OTLP ExportTraceServiceRequest", line["error"])

    def test_write_failure_is_retryable_and_counts_no_spans(self) -> None:
        self.sink.close()
        outcome = self.send(frame(KIND_PROTOBUF, 1, span_request((TRACE_ID, 1, 0, "a"))))
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertIn("the spans are kept and retried", outcome.error.message)
        self.assertEqual(self.counters.spans_sent, 0)

    def test_span_batcher_writes_beside_segments(self) -> None:
        segments = Counters()
        segment_buffer = SegmentBuffer(1024 * 1024, self.clock, segments)
        buffer = SpanBuffer(segment_buffer, self.clock, self.counters.requests)
        batcher = SpanBatcher(buffer, self.spans.send, self.clock, self.counters.requests)
        batcher.startService()
        self.sink.put_trace_segments([SEGMENT])
        body = span_request((TRACE_ID, 1, 0, "a"))
        self.assertTrue(buffer.offer(frame(KIND_PROTOBUF, 1, body)))
        self.clock.advance(1.0)
        segment_line, span_line = self.path.read_text().splitlines()
        self.assertEqual(segment_line.encode(), SEGMENT)
        self.assertTrue(span_line.startswith('{"resourceSpans":'), span_line)
        self.assertEqual((self.counters.requests.sent, self.counters.spans_sent), (1, 1))
        self.assertEqual(segment_buffer.used, 0)  # the budget lent for it is back
        stopped: list[None] = []
        batcher.stopService().addCallback(stopped.append)
        self.assertEqual(stopped, [None])
