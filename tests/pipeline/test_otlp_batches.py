"""The span buffer: X-Ray's per-request limits, JSON alone, the shared budget; reworded logs."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.pipeline.test_batcher import FakeUploads
from tests.support.logs import capture_logs
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.otlp_batches import (
    FRAME,
    KIND_JSON,
    KIND_PROTOBUF,
    SpanBatcher,
    SpanBuffer,
    frame,
    reword,
    spans_in,
    unframe,
)
from xraytwisted.pipeline.uploader import Outcome, UploadError

OUTAGE = UploadError("HTTPCode5XXCount", True, False, "HTTP 503 ServiceUnavailableException", 503)


def request(spans: int, size: int = 100, kind: int = KIND_PROTOBUF) -> bytes:
    return frame(kind, spans, b"\x0a" * size)


def cost(doc: bytes) -> int:
    return len(doc) + DOC_OVERHEAD


class SpanBufferTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.counters = Counters()
        self.segments = SegmentBuffer(100_000, self.clock, Counters())
        self.spans = SpanBuffer(
            self.segments, self.clock, self.counters, max_batch_bytes=1000, max_batch_spans=10
        )

    def batches(self) -> list[list[bytes]]:
        return [batch.docs for batch in self.spans.drain()]

    def test_frame_round_trip(self) -> None:
        doc = frame(KIND_JSON, 7, b'{"resourceSpans":[]}')
        kind, spans, body = unframe(doc)
        self.assertEqual((kind, spans, bytes(body)), (KIND_JSON, 7, b'{"resourceSpans":[]}'))
        self.assertEqual(len(doc), FRAME.size + 20)
        self.assertEqual(spans_in([doc, request(3)]), 10)

    def test_a_batch_closes_before_it_would_pass_the_span_limit(self) -> None:
        a, b, c = request(4), request(5), request(2)
        for doc in (a, b, c):
            self.assertTrue(self.spans.offer(doc))
        self.assertEqual(self.batches(), [[a, b], [c]])

    def test_a_batch_closes_before_it_would_pass_the_byte_limit(self) -> None:
        a, b, c = request(1, 600), request(1, 400), request(1, 1)
        for doc in (a, b, c):
            self.spans.offer(doc)
        # 600 + 400 bytes of requests fit 1000 exactly; the third does not.
        self.assertEqual(self.batches(), [[a, b], [c]])

    def test_json_requests_travel_alone(self) -> None:
        a, j, b = request(1), request(1, kind=KIND_JSON), request(1)
        for doc in (a, j, b):
            self.spans.offer(doc)
        self.assertEqual(self.batches(), [[a], [j], [b]])

    def test_a_new_batch_after_the_open_one_left(self) -> None:
        a, b, c = request(9), request(5), request(5)
        self.spans.offer(a)
        self.spans.pop()  # the deadline passed: the open batch went
        self.spans.offer(b)
        self.spans.offer(c)  # 5 + 5 spans: the new batch counts from zero
        self.assertEqual(self.batches(), [[b, c]])

    def test_memory_is_lent_by_the_segment_buffer_and_given_back(self) -> None:
        doc = request(1, 1000)
        self.spans.offer(doc)
        self.assertEqual(self.segments.capacity, 100_000 - cost(doc))
        self.assertEqual(self.spans.used, cost(doc))
        batch = self.spans.pop()
        self.spans.release(batch)
        self.assertEqual((self.segments.capacity, self.spans.used), (100_000, 0))

    def test_segments_and_spans_share_one_budget(self) -> None:
        big = b"x" * (60_000 - DOC_OVERHEAD)
        self.assertTrue(self.segments.offer(big))
        self.assertFalse(self.spans.offer(request(1, 50_000)))  # 60 000 + 50 000 > 100 000
        self.assertEqual(self.counters.spillover, 1)
        self.assertTrue(self.spans.offer(request(1, 30_000)))
        # And the other way round: what spans hold is not there for segments.
        self.assertFalse(self.segments.offer(b"y" * 20_000))

    def test_giving_back_wakes_a_paused_segment_stream(self) -> None:
        woken: list[int] = []
        self.spans.offer(request(1, 99_000))
        self.assertFalse(self.segments.has_room(5000))
        self.segments.notify_when_space(lambda: woken.append(1))
        self.spans.release(self.spans.pop())
        self.clock.advance(0)
        self.assertEqual(woken, [1])
        self.assertTrue(self.segments.has_room(5000))

    def test_shrink_gives_back_what_it_releases(self) -> None:
        a, b = request(1), request(1)
        self.spans.offer(a)
        self.spans.offer(b)
        kept = self.spans.shrink(self.spans.pop(), [b])
        assert kept is not None
        self.assertEqual(self.segments.capacity, 100_000 - cost(b))
        self.assertIsNone(self.spans.shrink(kept, []))
        self.assertEqual(self.segments.capacity, 100_000)


class SpanBatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.counters = Counters()
        self.segments = SegmentBuffer(100_000, self.clock, Counters())
        self.buffer = SpanBuffer(self.segments, self.clock, self.counters)
        self.uploads = FakeUploads()
        self.batcher = SpanBatcher(self.buffer, self.uploads, self.clock, self.counters)
        self.batcher.startService()

    def test_requests_are_concatenated_into_one_upload_and_retried(self) -> None:
        events = capture_logs(self)
        a, b = request(3), request(4)
        self.buffer.offer(a)
        self.buffer.offer(b)
        self.clock.advance(1.0)
        ((sent, _),) = self.uploads.calls
        self.assertEqual(sent, [a, b])
        self.uploads.finish(0, Outcome(0.1, error=OUTAGE))
        self.clock.advance(5.0)
        self.assertEqual(len(self.uploads.calls), 2)
        self.uploads.finish(1, Outcome(0.1))
        self.assertEqual((self.counters.sent, self.counters.retried), (2, 2))
        self.assertEqual(self.segments.capacity, 100_000)  # all given back
        text = [formatEvent(e) for e in events]
        self.assertIn(
            "Sending OTLP batch failed with: HTTP 503 ServiceUnavailableException; will retry "
            "2 OTLP requests (attempt 1, 2 OTLP requests waiting)",
            text,
        )
        self.assertTrue(
            any(t.startswith("Successfully sent batch of 2 OTLP requests") for t in text)
        )
        self.assertFalse(any("segment" in t for t in text), text)

    def test_reword(self) -> None:
        self.assertEqual(
            reword("Refused segment {id} of trace {trace}: {detail}"),
            "Refused OTLP request: {detail}",
        )
        self.assertEqual(
            reword("wrote {count} waiting segments; Sending segment batch failed"),
            "wrote {count} waiting OTLP requests; Sending OTLP batch failed",
        )
