"""The span buffer: X-Ray's per-request limits, JSON alone, the shared budget; reworded logs."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.pipeline.test_batcher import FakeUploads
from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_path
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.otlp_batches import (
    FRAME,
    KIND_JSON,
    KIND_PROTOBUF,
    SpanBatcher,
    SpanBuffer,
    SpanSpool,
    SpanTally,
    frame,
    reword,
    spans_in,
    unframe,
)
from xraytwisted.pipeline.spool import HEADER_SIZE
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


def requests(*spans: int) -> list[bytes]:
    """A batch of OTLP requests of these span counts, 100 body bytes each."""
    return [request(n) for n in spans]


RECORD = HEADER_SIZE + 2 * (4 + FRAME.size + 100)  # one spooled batch of two requests


class SpanTallyTests(SynchronousTestCase):
    def test_describe(self) -> None:
        tally = SpanTally(OtlpCounters())
        self.assertEqual(tally.describe(0, 0, 0), "")
        self.assertEqual(tally.describe(3, 120, 0), " (120 spans)")
        self.assertEqual(tally.describe(3, 0, 3), " (an unknown number of spans)")
        self.assertEqual(
            tally.describe(3, 40, 1), " (40 spans, and those of 1 more whose spans are not known)"
        )


class SpanSpoolTallyTests(SynchronousTestCase):
    """Spans spooled and lost inside the span spool: known for this run's files."""

    def setUp(self) -> None:
        self.dir = os.path.join(temp_path(self), "otlp")
        self.clock = Clock()
        self.counters = OtlpCounters()
        self.spools: list[SpanSpool] = []

    def tearDown(self) -> None:
        for spool in self.spools:
            spool.close()

    def open(self, max_bytes: int = 10_000_000, file_bytes: int = 2 * RECORD) -> SpanSpool:
        spool = SpanSpool.open(
            self.dir,
            max_bytes,
            self.clock,
            self.counters.requests,
            file_bytes=file_bytes,
            tally=SpanTally(self.counters),
        )
        assert isinstance(spool, SpanSpool)
        self.spools.append(spool)
        return spool

    def test_a_full_spool_drops_a_file_of_this_run_counting_its_spans(self) -> None:
        spool = self.open(max_bytes=4 * RECORD)
        spool.append(requests(1, 2))  # file 1
        spool.append(requests(3, 4))
        spool.append(requests(5, 6))  # file 2
        spool.append(requests(7, 8))
        self.assertEqual((self.counters.spans_spooled, self.counters.requests.spooled), (36, 8))
        flying = spool.take()  # the first record of file 1: out, not on disk to lose
        assert flying is not None
        events = capture_logs(self)
        spool.append(requests(9, 10))  # drops file 1
        self.assertEqual(self.counters.requests.lost, 2)
        self.assertEqual(
            (self.counters.spans_lost, self.counters.lost_requests_spans_unknown), (7, 0)
        )
        text = [formatEvent(e) for e in events]
        self.assertTrue(any("with 2 OTLP requests (7 spans) not yet sent" in t for t in text), text)
        # The one that was out comes back unsent: its file is gone, so it is lost too.
        self.assertEqual(spool.release(flying), 2)
        self.assertEqual((self.counters.requests.lost, self.counters.spans_lost), (4, 10))

    def test_a_released_batch_counts_again_when_its_file_is_dropped(self) -> None:
        spool = self.open(max_bytes=4 * RECORD)
        for pair in ((1, 1), (2, 2), (3, 3), (4, 4)):
            spool.append(requests(*pair))
        out = spool.take()
        assert out is not None
        spool.release(out)  # back on disk: a drop loses it
        spool.append(requests(5, 5))
        self.assertEqual(self.counters.spans_lost, 6)

    def test_spans_of_a_file_from_an_earlier_run_are_unknown(self) -> None:
        spool = self.open(file_bytes=RECORD)
        for pair in ((1, 1), (2, 2), (3, 3)):
            spool.append(requests(*pair))
        spool.close()
        events = capture_logs(self)
        self.open(max_bytes=2 * RECORD, file_bytes=RECORD)  # room for two: drops the oldest
        self.assertEqual(self.counters.requests.lost, 2)
        self.assertEqual(
            (self.counters.spans_lost, self.counters.lost_requests_spans_unknown), (0, 2)
        )
        text = [formatEvent(e) for e in events]
        self.assertTrue(
            any("with 2 OTLP requests (an unknown number of spans) not yet" in t for t in text),
            text,
        )

    def test_a_corrupt_record_has_unknown_spans_and_so_has_its_file_after(self) -> None:
        spool = self.open(max_bytes=5 * RECORD, file_bytes=3 * RECORD)
        for pair in ((1, 2), (3, 4), (5, 6)):  # file 1
            spool.append(requests(*pair))
        (name,) = [n for n in os.listdir(self.dir) if n.endswith(".xsp")]
        with open(os.path.join(self.dir, name), "r+b") as f:
            f.seek(HEADER_SIZE + 20)  # inside the first record's payload
            f.write(b"\xff")
        capture_logs(self)
        second = spool.take()  # the first record is skipped as corrupt
        assert second is not None
        self.assertEqual(second.docs, requests(3, 4))
        spool.ack(second)
        self.assertEqual(self.counters.lost_requests_spans_unknown, 2)
        spool.append(requests(7, 8))  # file 2
        spool.append(requests(9, 9))
        spool.append(requests(1, 1))  # drops file 1: its weight was lost with the record
        self.assertEqual(self.counters.requests.lost, 4)
        self.assertEqual(
            (self.counters.spans_lost, self.counters.lost_requests_spans_unknown), (0, 4)
        )


class SpanBatcherTallyTests(SynchronousTestCase):
    """The span batcher counts the spans of what it spools, replays and loses."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.counters = OtlpCounters()
        self.tally = SpanTally(self.counters)
        self.segments = SegmentBuffer(100_000, self.clock, Counters())
        self.buffer = SpanBuffer(self.segments, self.clock, self.counters.requests)
        self.uploads = FakeUploads()

    def batcher(self, spool: SpanSpool | None = None) -> SpanBatcher:
        batcher = SpanBatcher(
            self.buffer,
            self.uploads,
            self.clock,
            self.counters.requests,
            shutdown_timeout=5.0,
            spool=spool,
            spool_after=10.0,
            tally=self.tally,
        )
        batcher.startService()
        return batcher

    def test_the_shutdown_deadline_loses_spans_and_says_how_many(self) -> None:
        batcher = self.batcher()
        for doc in requests(3, 4):
            self.buffer.offer(doc)
        self.clock.advance(1.0)  # in flight, never answered
        self.buffer.offer(request(5))  # waiting in the buffer
        events = capture_logs(self)
        stopped = batcher.stopService()
        self.clock.advance(5.0)
        self.successResultOf(stopped)
        self.assertEqual((self.counters.requests.lost, self.counters.spans_lost), (3, 12))
        text = [formatEvent(e) for e in events]
        self.assertTrue(
            any(t.endswith("3 OTLP requests (12 spans) were not sent and are lost") for t in text),
            text,
        )

    def test_spooled_and_replayed_spans(self) -> None:
        spool = SpanSpool.open(
            os.path.join(temp_path(self), "otlp"),
            10_000_000,
            self.clock,
            self.counters.requests,
            tally=self.tally,
        )
        self.addCleanup(spool.close)
        batcher = self.batcher(spool)
        capture_logs(self)
        for doc in requests(3, 4):
            self.buffer.offer(doc)
        self.clock.advance(1.0)
        self.uploads.finish(0, Outcome(0.1, error=OUTAGE))
        self.assertEqual(batcher.last_upload_error, (1001.0, OUTAGE.message))
        self.clock.advance(11.0)  # failing for spool_after: the batch goes to disk
        self.assertEqual((self.counters.requests.spooled, self.counters.spans_spooled), (2, 7))
        # The probe reads it back; X-Ray answers again.
        ((probe, _),) = self.uploads.pending()
        self.assertEqual(probe, requests(3, 4))
        self.uploads.finish(len(self.uploads.calls) - 1, Outcome(0.1))
        self.assertEqual((self.counters.requests.replayed, self.counters.spans_replayed), (2, 7))
        self.assertIsNone(batcher.last_upload_error)  # cleared by the success
        self.assertEqual((self.counters.spans_lost, spool.pending_docs), (0, 0))
