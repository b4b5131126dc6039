"""Buffer and batcher: deadlines, concurrency, retries, shutdown (Clock-driven)."""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_dir, temp_path
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline import batcher as batcher_module
from xraytwisted.pipeline.batcher import MAX_DOC_ATTEMPTS, Batcher, match_unprocessed, trace_id_of
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.uploader import Outcome, Unprocessed, UploadError, classify_response


class FakeUploads:
    """Records each upload; the test decides when and how it ends."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], Deferred[Outcome]]] = []
        self.outcomes: dict[int, Outcome] = {}

    def __call__(self, docs: Sequence[bytes]) -> Deferred[Outcome]:
        d: Deferred[Outcome] = Deferred()
        self.calls.append((list(docs), d))
        return d

    def pending(self) -> list[tuple[list[bytes], Deferred[Outcome]]]:
        return [(docs, d) for docs, d in self.calls if not d.called]

    def finish(self, index: int, outcome: Outcome | None = None) -> None:
        outcome = outcome or Outcome(0.01)
        self.outcomes[index] = outcome
        self.calls[index][1].callback(outcome)


def docs(n: int, start: int = 0) -> list[bytes]:
    return [
        b'{"id":"%016x","trace_id":"1-00000000-%024x"}' % (i, i) for i in range(start, start + n)
    ]


REFUSED = UploadError("ConnectionRefusedCount", True, False, "connection refused")
THROTTLED = UploadError("HTTPCode4XXCount", True, True, "HTTP 429 ThrottledException", 429)
INVALID = UploadError(
    "HTTPCode4XXCount", False, False, "HTTP 400 InvalidRequestException", 400,
    "InvalidRequestException",
)  # fmt: skip
# What a web server in front of X-Ray says to a plain-HTTP request on its TLS port.
HTML_400 = classify_response(400, {}, b"<html><h1>400 Bad Request</h1></html>")
FORBIDDEN = classify_response(
    403,
    {"x-amzn-errortype": "AccessDeniedException"},
    b'{"message":"User: arn:aws:sts::123456789012:assumed-role/app is not authorized"}',
)


class Fixture(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.counters = Counters()
        self.uploads = FakeUploads()
        self.make()

    def make(
        self, capacity: int = 10_000_000, concurrency: int = 8, shutdown_timeout: float = 20.0
    ) -> None:
        self.buffer = SegmentBuffer(capacity, self.clock, self.counters)
        self.batcher = Batcher(
            self.buffer,
            self.uploads,
            self.clock,
            self.counters,
            concurrency=concurrency,
            shutdown_timeout=shutdown_timeout,
            random=lambda: 1.0,  # backoff delays at their ceiling: predictable
        )
        self.batcher.startService()

    def offer(self, items: list[bytes]) -> None:
        for item in items:
            self.assertTrue(self.buffer.offer(item))

    def refuse_when(self, bad: set[bytes], rounds: int = 500) -> None:
        """Answer every upload: 400 if it holds a document of ``bad``, else OK."""
        for _ in range(rounds):
            pending = [i for i, (_, d) in enumerate(self.uploads.calls) if not d.called]
            if not pending and not self.batcher.waiting_docs:
                return
            for index in pending:
                refused = bad.intersection(self.uploads.calls[index][0])
                self.uploads.finish(index, Outcome(0.0, error=INVALID) if refused else None)
            self.clock.advance(1)
        self.fail("uploads did not settle")


class BufferTests(Fixture):
    def test_budget_refuses_newest_and_counts_spillover(self) -> None:
        doc = b"x" * 100
        cost = len(doc) + DOC_OVERHEAD
        self.make(capacity=cost * 3)
        for _ in range(3):
            self.assertTrue(self.buffer.offer(doc))
        self.assertFalse(self.buffer.offer(doc))
        self.assertFalse(self.buffer.offer(b"y"))  # too: 1 byte + overhead does not fit
        self.assertEqual(self.counters.spillover, 2)
        self.assertEqual(self.buffer.used, cost * 3)

    def test_bytes_stay_charged_until_the_upload_ends(self) -> None:
        self.offer(docs(50))
        self.assertEqual(len(self.uploads.calls), 1)
        charged = self.buffer.used
        self.assertGreater(charged, 0)
        self.uploads.finish(0)
        self.assertEqual(self.buffer.used, 0)

    def test_in_flight_data_counts_against_the_budget(self) -> None:
        one = docs(1)[0]
        self.make(capacity=(len(one) + DOC_OVERHEAD) * 50)
        self.offer(docs(50))  # full batch leaves, still charged
        self.assertEqual(len(self.uploads.calls), 1)
        self.assertFalse(self.buffer.offer(one))
        self.uploads.finish(0)
        self.assertTrue(self.buffer.offer(one))

    def test_split_keeps_the_charge_and_the_attempts(self) -> None:
        self.offer(docs(5))
        batch = self.buffer.pop()
        batch.attempts = 2
        first, second = self.buffer.split(batch)
        self.assertEqual((first.docs, second.docs), (docs(2), docs(3, 2)))
        self.assertEqual(first.nbytes + second.nbytes, batch.nbytes)
        self.assertEqual(first.nbytes, sum(map(len, docs(2))) + 2 * DOC_OVERHEAD)
        self.assertEqual((first.attempts, second.attempts), (2, 2))
        self.assertEqual(first.started, batch.started)
        self.buffer.release(first)
        self.buffer.release(second)
        self.assertEqual(self.buffer.used, 0)


class DeadlineTests(Fixture):
    def test_full_batch_leaves_at_once(self) -> None:
        self.offer(docs(49))
        self.assertEqual(self.uploads.calls, [])
        self.offer(docs(1, 49))
        self.assertEqual(len(self.uploads.calls), 1)
        self.assertEqual(self.uploads.calls[0][0], docs(50))

    def test_lone_segment_leaves_when_it_has_waited_one_second(self) -> None:
        self.offer(docs(1))
        self.clock.advance(0.999)
        self.assertEqual(self.uploads.calls, [])
        self.clock.advance(0.001)
        self.assertEqual(len(self.uploads.calls), 1)

    def test_deadline_is_counted_from_the_oldest_segment(self) -> None:
        # Unlike the Go daemon's free-running tick, a later arrival does not
        # delay the batch and an early one is never kept for almost 2 s.
        self.offer(docs(1))
        self.clock.advance(0.9)
        self.offer(docs(1, 1))
        self.clock.advance(0.1)
        self.assertEqual(len(self.uploads.calls), 1)
        self.assertEqual(len(self.uploads.calls[0][0]), 2)

    def test_next_batch_gets_its_own_deadline(self) -> None:
        self.offer(docs(1))
        self.clock.advance(1.0)
        self.assertEqual(len(self.uploads.calls), 1)
        self.clock.advance(0.5)
        self.offer(docs(1, 1))
        self.clock.advance(0.99)
        self.assertEqual(len(self.uploads.calls), 1)
        self.clock.advance(0.01)
        self.assertEqual(len(self.uploads.calls), 2)

    def test_a_pending_retry_does_not_stretch_a_new_batch_deadline(self) -> None:
        # A batch whose documents keep coming back throttled: its retry waits
        # the backoff's 5 s cap (uploads work otherwise: no pause).
        self.offer(docs(1))
        self.clock.advance(1)
        throttled = Outcome(0.1, unprocessed=(Unprocessed(f"{0:016x}", "ThrottledException", ""),))
        for attempt in range(6):
            self.uploads.finish(attempt, throttled)
            self.clock.advance(5)
        self.uploads.finish(6, throttled)  # the next retry is 5 s away
        self.assertEqual(len(self.uploads.calls), 7)
        self.offer(docs(1, 1))  # a new, lone segment
        self.clock.advance(0.999)
        self.assertEqual(len(self.uploads.calls), 7)
        self.clock.advance(0.001)
        self.assertEqual(len(self.uploads.calls), 8)
        self.assertEqual(self.uploads.calls[7][0], docs(1, 1))

    def test_no_timer_when_idle(self) -> None:
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.offer(docs(1))
        self.clock.advance(1)
        self.uploads.finish(0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_order_is_preserved(self) -> None:
        self.offer(docs(175))
        self.clock.advance(1)
        sent = [d for call_docs, _ in self.uploads.calls for d in call_docs]
        self.assertEqual(sent, docs(175))
        self.assertEqual([len(c[0]) for c in self.uploads.calls], [50, 50, 50, 25])


class ConcurrencyTests(Fixture):
    def test_at_most_concurrency_uploads_in_flight(self) -> None:
        self.make(concurrency=3)
        self.offer(docs(50 * 5))
        self.assertEqual(len(self.uploads.pending()), 3)
        self.uploads.finish(0)
        self.assertEqual(len(self.uploads.pending()), 3)
        self.assertEqual(len(self.uploads.calls), 4)
        for i in range(1, 4):
            self.uploads.finish(i)
        self.assertEqual(len(self.uploads.calls), 5)
        self.uploads.finish(4)
        self.assertEqual(self.counters.sent, 250)
        self.assertEqual(self.buffer.used, 0)

    def test_partial_batch_past_deadline_waits_for_a_slot_then_leaves(self) -> None:
        self.make(concurrency=1)
        self.offer(docs(50))
        self.offer(docs(3, 50))
        self.clock.advance(5)
        self.assertEqual(len(self.uploads.calls), 1)
        self.uploads.finish(0)
        self.assertEqual(len(self.uploads.calls), 2)
        self.assertEqual(len(self.uploads.calls[1][0]), 3)

    def test_waiting_partial_batch_keeps_filling(self) -> None:
        self.make(concurrency=1)
        self.offer(docs(50))
        self.offer(docs(3, 50))
        self.clock.advance(2)
        self.offer(docs(10, 53))  # joins the waiting partial batch
        self.uploads.finish(0)
        self.assertEqual(len(self.uploads.calls[1][0]), 13)

    def test_throttling_halves_concurrency_and_success_regrows_it(self) -> None:
        self.make(concurrency=8)
        self.offer(docs(50 * 8))
        for i in range(8):
            self.uploads.finish(i, Outcome(0.1, error=THROTTLED))
        self.assertEqual(self.batcher.limit.value, 1)
        self.clock.advance(30)
        self.assertEqual(len(self.uploads.pending()), 1)  # 8 batches wait, one goes
        self.offer(docs(50 * 40, 400))  # enough successes to climb back: 1+2+...+7
        for _ in range(60):
            self.clock.advance(30)
            for i, (_, d) in enumerate(self.uploads.calls):
                if not d.called:
                    self.uploads.finish(i)
        self.assertEqual(self.batcher.limit.value, 8)
        self.assertEqual(self.counters.sent, 50 * 48)


class RetryTests(Fixture):
    def test_failed_batch_is_retried_after_backoff_and_arrives(self) -> None:
        self.offer(docs(50))
        self.uploads.finish(0, Outcome(0.0, error=REFUSED))
        self.assertEqual(self.counters.backend_errors["ConnectionRefusedCount"], 1)
        self.assertEqual(len(self.uploads.calls), 1)
        self.clock.advance(0.2)  # first retry waits at most BASE_DELAY
        self.assertEqual(len(self.uploads.calls), 2)
        self.assertEqual(self.uploads.calls[1][0], docs(50))
        self.uploads.finish(1)
        self.assertEqual(self.counters.sent, 50)
        self.assertEqual(self.counters.retried, 50)
        self.assertEqual(self.counters.lost, 0)
        self.assertEqual(self.buffer.used, 0)

    def test_outage_pauses_everything_and_loses_nothing(self) -> None:
        self.make(concurrency=2)
        total = 0
        for minute in range(3):
            self.offer(docs(50, total))
            total += 50
            for _ in range(60):
                self.clock.advance(1)
                for i, (_, d) in enumerate(self.uploads.calls):
                    if not d.called:
                        self.uploads.finish(i, Outcome(0.0, error=REFUSED))
            del minute
        attempts_during_outage = len(self.uploads.calls)
        # Backoff keeps the attempt rate far below one per batch per second.
        self.assertLess(attempts_during_outage, 60)
        self.offer(docs(10, total))
        total += 10
        for _ in range(60):
            self.clock.advance(1)
            for i, (_, d) in enumerate(self.uploads.calls):
                if not d.called:
                    self.uploads.finish(i)
        self.assertEqual(self.counters.sent, total)
        self.assertEqual(self.counters.lost, 0)
        sent_docs = {d for call_docs, dd in self.uploads.calls for d in call_docs}
        self.assertEqual(sent_docs, set(docs(total)))

    def test_a_refused_batch_is_halved_until_only_the_bad_documents_are_dropped(self) -> None:
        batch = docs(50)
        bad = {batch[7], batch[31]}
        self.offer(batch)
        with capturedLogs() as events:
            self.refuse_when(bad)
        self.assertEqual(self.counters.rejected, 2)
        self.assertEqual(self.counters.sent, 48)
        self.assertEqual(self.counters.retried, 0)  # halves are new requests, not retries
        outcomes = self.uploads.outcomes
        sent = [
            doc for i, (b, _) in enumerate(self.uploads.calls) for doc in b if not outcomes[i].error
        ]
        self.assertEqual(sorted(sent), sorted(set(batch) - bad))
        self.assertEqual(self.buffer.used, 0)
        # Halving costs a few requests per bad document, not one per document.
        self.assertLessEqual(len(self.uploads.calls), 1 + 2 * 2 * 6)
        # Found a few seconds apart: the second line is rate-limited (10 s per kind).
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(lines), 1, lines)
        self.assertRegex(
            lines[0],
            r"^Refused segment 0{14}(07|1f) of trace 1-00000000-0{22}(07|1f): HTTP 400 "
            r"InvalidRequestException; X-Ray will not accept it, so it is dropped$",
        )

    def test_a_batch_refused_in_every_half_costs_2n_minus_1_requests(self) -> None:
        batch = docs(50)
        self.offer(batch)
        self.refuse_when(set(batch))
        self.assertEqual(self.counters.rejected, 50)
        self.assertEqual(self.counters.sent, 0)
        self.assertEqual(len(self.uploads.calls), 99)
        self.assertEqual(self.buffer.used, 0)

    def test_a_400_that_is_not_x_rays_verdict_is_retried_whole_and_said_loudly(self) -> None:
        self.offer(docs(50))
        events = capture_logs(self)
        for attempt in range(3):
            self.uploads.finish(attempt, Outcome(0.0, error=HTML_400))
            self.clock.advance(11)
        self.assertEqual([len(c[0]) for c in self.uploads.calls], [50] * 4)  # not split
        self.assertEqual((self.counters.rejected, self.counters.lost), (0, 0))
        self.uploads.finish(3)
        self.assertEqual(self.counters.sent, 50)
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(lines), 3, lines)  # one per kind per 10 s
        self.assertIn(
            "Sending segment batch failed with: HTTP 400: <html><h1>400 Bad Request</h1></html>; "
            "this is not X-Ray's verdict on the segments (no AWS error code: something in front "
            "of it answered), so they are kept; check -e / --endpoint and the proxy; will retry 50 "
            "segments (attempt 1",
            lines[0],
        )

    def test_an_aborted_request_is_retried(self) -> None:
        aborted = classify_response(400, {}, b'{"__type":"RequestAbortedException"}')
        self.offer(docs(50))
        self.uploads.finish(0, Outcome(0.0, error=aborted))
        self.clock.advance(1)
        self.uploads.finish(1)
        self.assertEqual((self.counters.sent, self.counters.rejected), (50, 0))

    def test_refused_credentials_are_named_as_the_problem(self) -> None:
        self.offer(docs(10))
        self.clock.advance(1)
        events = capture_logs(self)
        self.uploads.finish(0, Outcome(0.0, error=FORBIDDEN))
        self.assertEqual(self.batcher.credentials_refused, FORBIDDEN.message)
        [line] = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertIn(
            "X-Ray refused the credentials (403 AccessDeniedException): check the role's "
            "xray:PutTraceSegments permission",
            line,
        )
        self.assertIn("will retry 10 segments (attempt 1", line)
        self.assertIn("is not authorized", line)
        self.clock.advance(1)
        self.uploads.finish(1)  # the role was fixed
        self.assertIsNone(self.batcher.credentials_refused)
        self.assertEqual(self.counters.sent, 10)

    def test_error_codes_from_the_server_cannot_grow_the_log_table(self) -> None:
        # A hostile or broken server answering each request with a new code.
        self.make(concurrency=1)
        events = capture_logs(self)
        self.offer(docs(1))
        self.clock.advance(1)
        for n in range(1000):
            error = classify_response(500, {"x-amzn-errortype": f"Bogus{n}"}, b"")
            self.uploads.finish(n, Outcome(0.0, error=error))
            self.batcher.resume_at = 0.0  # no pause: one attempt right after the other
            self.clock.advance(5)
        lines = [formatEvent(e) for e in events if "Sending segment batch failed" in formatEvent(e)]
        # 64 kinds of their own, then one shared one (every 10 s: 5 s apart).
        self.assertLessEqual(len(self.batcher._error_throttle), batcher_module.MAX_LOG_KINDS + 1)
        self.assertEqual(len(lines), 64 + (1000 - 64) // 2)
        self.assertRegex(lines[-1], r"\(1 more like this not logged\)$")

    def test_a_wrong_endpoint_answer_is_retried_whole_and_nothing_is_lost(self) -> None:
        # A 404 says the endpoint or the proxy is wrong, not the documents:
        # kept, retried with backoff (not split), said at most every 10 s.
        not_found = classify_response(404, {}, b"<html>Not Found</html>")
        self.offer(docs(50))
        events = capture_logs(self)
        for attempt in range(3):
            self.uploads.finish(attempt, Outcome(0.0, error=not_found))
            self.clock.advance(6)
        self.assertEqual([len(c[0]) for c in self.uploads.calls], [50] * 4)
        self.assertEqual((self.counters.rejected, self.counters.lost), (0, 0))
        lines = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(lines), 2, lines)  # 0 s and 12 s: not at 6 s
        self.assertIn(
            "Sending segment batch failed with: HTTP 404: <html>Not Found</html>; X-Ray does not "
            "answer 404 to PutTraceSegments: the endpoint or a proxy in front of it is "
            "misconfigured, not the segments, so they are kept; check -e / --endpoint and the "
            "proxy; will retry 50 segments (attempt 1",
            lines[0],
        )
        self.uploads.finish(3)  # the configuration was fixed
        self.assertEqual(self.counters.sent, 50)

    def test_unprocessed_retryable_documents_are_sent_again(self) -> None:
        batch = docs(3)
        self.offer(batch)
        self.clock.advance(1)
        unprocessed = (
            Unprocessed(f"{1:016x}", "ThrottledException", "slow down"),
            Unprocessed(f"{2:016x}", "InvalidTraceId", "too old"),
        )
        self.uploads.finish(0, Outcome(0.1, unprocessed=unprocessed))
        self.assertEqual(self.counters.sent, 1)
        self.assertEqual(self.counters.rejected, 1)
        self.assertEqual(self.counters.unprocessed, 2)
        self.clock.advance(1)
        self.assertEqual(self.uploads.calls[1][0], [batch[1]])
        self.uploads.finish(1)
        self.assertEqual(self.counters.sent, 2)
        self.assertEqual(self.buffer.used, 0)

    def test_throttled_unprocessed_documents_are_never_given_up_and_slow_uploads(self) -> None:
        self.offer(docs(1))
        self.clock.advance(1)
        before = self.batcher.limit.value
        for attempt in range(3 * MAX_DOC_ATTEMPTS):
            self.uploads.finish(
                attempt,
                Outcome(0.1, unprocessed=(Unprocessed(f"{0:016x}", "ThrottledException", ""),)),
            )
            self.clock.advance(30)
        self.assertEqual(len(self.uploads.calls), 3 * MAX_DOC_ATTEMPTS + 1)
        self.assertEqual(self.counters.rejected, 0)
        self.assertLess(self.batcher.limit.value, before)
        self.uploads.finish(3 * MAX_DOC_ATTEMPTS)
        self.assertEqual(self.counters.sent, 1)
        self.assertEqual(self.buffer.used, 0)

    def test_unprocessed_retries_are_bounded(self) -> None:
        self.offer(docs(1))
        self.clock.advance(1)
        for attempt in range(MAX_DOC_ATTEMPTS):
            self.uploads.finish(
                attempt,
                Outcome(0.1, unprocessed=(Unprocessed(f"{0:016x}", "InternalFailure", ""),)),
            )
            self.clock.advance(30)
        self.assertEqual(len(self.uploads.calls), MAX_DOC_ATTEMPTS)
        self.assertEqual(self.counters.rejected, 1)
        self.assertEqual(self.buffer.used, 0)

    def test_a_failing_batch_does_not_stall_fresh_ones(self) -> None:
        self.offer(docs(50))
        self.uploads.finish(0, Outcome(0.0, error=REFUSED))
        self.offer(docs(50, 50))  # fresh batch leaves right away
        self.assertEqual(len(self.uploads.calls), 2)
        self.assertEqual(self.uploads.calls[1][0], docs(50, 50))

    def test_failure_of_the_upload_deferred_itself_is_retried(self) -> None:
        self.offer(docs(50))
        self.uploads.calls[0][1].errback(RuntimeError("bug"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.clock.advance(1)
        self.assertEqual(len(self.uploads.calls), 2)


class ShutdownTests(Fixture):
    def test_stop_sends_everything_at_once_then_fires(self) -> None:
        self.offer(docs(70))
        self.assertEqual(len(self.uploads.calls), 1)
        stopped = self.batcher.stopService()
        self.assertEqual(len(self.uploads.calls), 2)  # the partial batch did not wait
        self.assertNoResult(stopped)
        self.uploads.finish(0)
        self.assertNoResult(stopped)
        self.uploads.finish(1)
        self.successResultOf(stopped)
        self.assertEqual(self.counters.sent, 70)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_when_idle_fires_at_once(self) -> None:
        self.successResultOf(self.batcher.stopService())

    def test_deadline_counts_the_rest_as_lost(self) -> None:
        self.make(concurrency=1, shutdown_timeout=5)
        self.offer(docs(120))
        stopped = self.batcher.stopService()
        self.clock.advance(4.9)
        self.assertNoResult(stopped)
        self.clock.advance(0.1)
        self.successResultOf(stopped)
        self.assertEqual(self.counters.lost, 120)
        self.assertEqual(self.counters.sent, 0)
        self.assertEqual(self.buffer.used, 0)
        self.assertTrue(self.uploads.calls[0][1].called)  # in-flight upload cancelled

    def test_the_loss_line_says_why_in_the_words_of_the_last_failure(self) -> None:
        for fail, why in ((False, "uploads did not finish in time"),
                          (True, "the last upload failed with: connection refused")):  # fmt: skip
            self.make(concurrency=1, shutdown_timeout=5)
            self.offer(docs(10))
            self.clock.advance(1)  # the batch is due: its upload starts, and hangs
            if fail:
                self.uploads.pending()[0][1].callback(Outcome(0.0, error=REFUSED))
            with capturedLogs() as events:
                stopped = self.batcher.stopService()
                self.clock.advance(5)  # uploads hang: the deadline
            self.successResultOf(stopped)
            self.assertEqual(
                [formatEvent(e) for e in events if e["log_level"] == LogLevel.error],
                [f"Shutdown deadline of 5 seconds reached ({why}): 10 segments were not sent "
                 "and are lost"],
            )  # fmt: skip
            self.counters.lost = 0

    def test_retries_continue_during_shutdown(self) -> None:
        self.offer(docs(10))
        stopped = self.batcher.stopService()
        self.uploads.finish(0, Outcome(0.0, error=REFUSED))
        self.assertNoResult(stopped)
        self.clock.advance(1)
        self.uploads.finish(1)
        self.successResultOf(stopped)
        self.assertEqual(self.counters.sent, 10)
        self.assertEqual(self.counters.lost, 0)

    def test_stop_now_ends_the_drain_and_names_the_loss(self) -> None:
        self.make(concurrency=1, shutdown_timeout=20)
        self.offer(docs(120))
        stopped = self.batcher.stopService()
        self.assertNoResult(stopped)
        with capturedLogs() as events:
            self.batcher.stop_now("Stopped early by the second shutdown signal")
            self.batcher.stop_now("again")  # changes nothing
        self.successResultOf(stopped)
        self.assertEqual((self.counters.lost, self.buffer.used), (120, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the 20 s deadline is gone
        self.assertEqual(
            [formatEvent(e) for e in events if e["log_level"] == LogLevel.error],
            ["Stopped early by the second shutdown signal: 120 segments were not sent and are "
             "lost"],
        )  # fmt: skip

    def test_stop_now_before_the_drain_starts(self) -> None:
        # The second signal can come while ingest is still stopping.
        self.offer(docs(10))
        self.batcher.stop_now("Stopped early")
        self.assertEqual(self.counters.lost, 0)
        self.successResultOf(self.batcher.stopService())
        self.assertEqual(self.counters.lost, 10)


class DestinationTests(Fixture):
    def test_a_local_sink_is_written_to_not_sent_to(self) -> None:
        self.batcher.destination = "/tmp/traces.jsonl"  # what daemon.build passes
        with capturedLogs() as events:
            self.offer(docs(50))
            self.uploads.finish(0, Outcome(0.002))
        self.assertEqual(
            [formatEvent(e) for e in events],
            ["Wrote 50 segments to /tmp/traces.jsonl (0.002 seconds)"],
        )


class MatchUnprocessedTests(SynchronousTestCase):
    def test_matches_with_and_without_whitespace(self) -> None:
        compact = b'{"id":"aaaaaaaaaaaaaaaa","trace_id":"1-1-a"}'
        spaced = b'{"id": "bbbbbbbbbbbbbbbb", "trace_id": "1-2-b"}'
        nested = b'{"id":"cccccccccccccccc","subsegments":[{"id":"bbbbbbbbbbbbbbbb"}]}'
        items = [
            Unprocessed("bbbbbbbbbbbbbbbb", "X", ""),
            Unprocessed("dddddddddddddddd", "X", ""),
            Unprocessed("", "X", ""),
        ]
        got = match_unprocessed([compact, nested, spaced], items)
        # The nested subsegment id also matches; the first document wins.
        self.assertEqual([doc for _, doc in got], [nested, None, None])
        self.assertEqual(trace_id_of(spaced), "1-2-b")
        self.assertEqual(trace_id_of(b"T1Sxyz"), "(unknown)")


class SpoolFixture(Fixture):
    """The batcher with a real disk spool (Spool.Dir)."""

    def make_spooled(
        self, spool_after: float = 10.0, concurrency: int = 2, directory: str | None = None
    ) -> None:
        from xraytwisted.pipeline.spool import Spool

        self.directory = directory or temp_path(self)
        self.spool = Spool.open(self.directory, 64 * 1024 * 1024, self.clock, self.counters)
        self.addCleanup(self.spool.close)
        self.buffer = SegmentBuffer(10_000_000, self.clock, self.counters)
        self.batcher = Batcher(
            self.buffer,
            self.uploads,
            self.clock,
            self.counters,
            concurrency=concurrency,
            random=lambda: 1.0,
            spool=self.spool,
            spool_after=spool_after,
        )
        self.batcher.startService()

    def fail_pending(self) -> None:
        for i, (_, d) in enumerate(self.uploads.calls):
            if not d.called:
                self.uploads.finish(i, Outcome(0.0, error=REFUSED))

    def succeed_pending(self) -> None:
        for i, (_, d) in enumerate(self.uploads.calls):
            if not d.called:
                self.uploads.finish(i)

    def sent_docs(self) -> list[bytes]:
        return [doc for i in self.successful_calls() for doc in self.uploads.calls[i][0]]

    def successful_calls(self) -> list[int]:
        return sorted(i for i, o in self.uploads.outcomes.items() if o.error is None)


class SpoolTests(SpoolFixture):
    def test_long_outage_moves_batches_to_disk_and_replays_them_in_order(self) -> None:
        self.make_spooled(spool_after=10)
        self.offer(docs(100))
        self.fail_pending()
        for _ in range(9):
            self.clock.advance(1)
            self.fail_pending()
        self.assertGreater(self.buffer.used, 0)  # still in memory before 10 s
        self.clock.advance(1)
        self.fail_pending()
        self.assertEqual(self.buffer.used, 0)  # parked on disk
        self.assertEqual(self.counters.spooled, 100)
        # More data during the outage goes to disk once due.
        self.clock.advance(0.5)
        self.offer(docs(30, 100))
        for _ in range(20):
            self.clock.advance(1)
            self.assertLessEqual(len(self.uploads.pending()), 1)  # one probe at a time
            self.fail_pending()
        self.assertEqual(self.counters.spooled, 130)
        self.assertEqual(self.buffer.used, 0)
        # X-Ray is back: the probe succeeds and the rest follows, oldest first.
        for _ in range(30):
            self.clock.advance(1)
            self.succeed_pending()
        self.assertEqual(self.counters.lost, 0)
        delivered = self.sent_docs()
        self.assertEqual(sorted(set(delivered)), sorted(docs(130)))
        self.assertEqual(self.spool.pending_docs, 0)
        # Counted once delivered: the batch every failed probe read again is not
        # counted for each read.
        self.assertEqual(self.counters.replayed, 130)
        # Oldest first: what arrived before the outage is delivered before
        # what arrived during it.
        order = {doc: n for n, doc in enumerate(delivered)}
        self.assertLess(max(order[d] for d in docs(100)), min(order[d] for d in docs(30, 100)))

    def test_stop_during_outage_spools_at_once_and_a_restart_sends_it(self) -> None:
        self.make_spooled(spool_after=2)
        self.offer(docs(70))
        for _ in range(4):
            self.fail_pending()
            self.clock.advance(1)
        stopped = self.batcher.stopService()
        self.fail_pending()
        self.successResultOf(stopped)  # no waiting for the 20 s deadline
        self.assertEqual(self.counters.lost, 0)
        self.assertEqual(self.spool.pending_docs, 70)
        self.spool.close()
        # The next start, with X-Ray reachable again.
        self.uploads = FakeUploads()
        self.make_spooled(directory=self.directory)
        self.assertEqual(self.spool.pending_docs, 70)
        self.succeed_pending()
        for _ in range(5):
            self.clock.advance(1)
            self.succeed_pending()
        self.assertEqual(sorted(self.sent_docs()), sorted(docs(70)))
        self.assertEqual(self.spool.pending_docs, 0)

    def test_stop_during_outage_reports_everything_on_disk_and_no_loss(self) -> None:
        directory = temp_path(self)
        from xraytwisted.pipeline.spool import Spool

        earlier = Spool.open(directory, 64 * 1024 * 1024, self.clock, Counters())
        for n in range(4):
            earlier.append(docs(50, 50 * n))  # 200 on disk from an earlier run
        earlier.close()
        self.make_spooled(spool_after=2, directory=directory)
        self.offer(docs(30, 1000))
        events = capture_logs(self)
        for _ in range(4):
            self.fail_pending()
            self.clock.advance(1)
        stopped = self.batcher.stopService()
        self.successResultOf(stopped)
        self.assertEqual((self.counters.lost, self.spool.pending_docs), (0, 230))
        lines = [formatEvent(e) for e in events if "next start" in formatEvent(e)]
        self.assertEqual(
            lines,
            ["Shutting down after 4 seconds of failed uploads (the last upload failed with: "
             "connection refused): 230 segments are in the spool " + directory + " (0 of them "
             "written while shutting down) and will be sent by the next start"],
        )  # fmt: skip
        self.assertEqual([formatEvent(e) for e in events if "lost" in formatEvent(e)], [])

    def test_shutdown_deadline_hands_the_rest_to_the_spool(self) -> None:
        self.make_spooled(spool_after=1000)
        self.batcher.shutdown_timeout = 3
        self.offer(docs(120))
        stopped = self.batcher.stopService()
        self.clock.advance(3)  # in-flight uploads hang until the deadline
        self.successResultOf(stopped)
        self.assertEqual(self.counters.lost, 0)
        self.assertEqual(self.spool.pending_docs, 120)

    def test_replayed_batch_that_xray_refuses_is_halved_and_leaves_the_spool(self) -> None:
        self.make_spooled(spool_after=1)
        batch = docs(50)
        self.offer(batch)
        self.fail_pending()
        self.clock.advance(1)
        self.fail_pending()
        self.clock.advance(1)
        self.assertEqual(self.counters.spooled, 50)
        self.clock.advance(5)
        before = self.counters.spooled
        (index,) = [i for i, (_, d) in enumerate(self.uploads.calls) if not d.called]
        self.uploads.finish(index, Outcome(0.0, error=INVALID))
        # The halves are written back before the refused record is let go.
        self.assertEqual(self.counters.spooled, before + 50)
        self.assertEqual(self.spool.pending_docs, 50)
        self.refuse_when({batch[3]})
        self.assertEqual(self.counters.rejected, 1)
        self.assertEqual(self.counters.sent, 49)
        self.assertEqual(self.spool.pending_docs, 0)
        self.assertEqual(self.buffer.used, 0)

    def test_without_spool_after_spooling_never_starts(self) -> None:
        self.make()  # no spool
        self.offer(docs(50))
        for _ in range(60):
            self.fail_pending()
            self.clock.advance(1)
        self.assertGreater(self.buffer.used, 0)
        self.assertEqual(self.counters.spooled, 0)

    def test_full_memory_moves_the_oldest_batches_to_disk_instead_of_dropping(self) -> None:
        from xraytwisted.pipeline.spool import Spool

        doc_cost = len(docs(1)[0]) + DOC_OVERHEAD
        self.directory = temp_path(self)
        self.spool = Spool.open(self.directory, 64 * 1024 * 1024, self.clock, self.counters)
        self.addCleanup(self.spool.close)
        self.buffer = SegmentBuffer(doc_cost * 120, self.clock, self.counters)
        self.batcher = Batcher(
            self.buffer, self.uploads, self.clock, self.counters, concurrency=1,
            random=lambda: 1.0, spool=self.spool, spool_after=1000,
        )  # fmt: skip
        self.batcher.startService()
        self.offer(docs(400))  # X-Ray is slow: one upload hangs, memory fills up
        self.assertEqual(self.counters.spillover, 0)
        self.assertGreater(self.counters.spooled, 0)
        self.assertLessEqual(self.buffer.used, self.buffer.capacity)
        for _ in range(40):
            self.clock.advance(1)
            self.succeed_pending()
        self.assertEqual(sorted(set(self.sent_docs())), sorted(docs(400)))
        self.assertEqual(self.counters.lost, 0)

    def test_full_memory_without_spool_still_drops_the_newest(self) -> None:
        doc_cost = len(docs(1)[0]) + DOC_OVERHEAD
        self.make(capacity=doc_cost * 60, concurrency=1)
        for doc in docs(100):
            self.buffer.offer(doc)
        self.assertEqual(self.counters.spillover, 40)


def enospc(fd: int, parts: Sequence[bytes]) -> int:
    """os.writev on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class UnwritableSpoolTests(SpoolFixture):
    """A spool that cannot write never costs data: batches stay in memory."""

    def setUp(self) -> None:
        super().setUp()
        self.events = capture_logs(self)
        self.writes = 0

    def lines(self, text: str) -> list[str]:
        return [formatEvent(e) for e in self.events if text in formatEvent(e)]

    def disk_full(self) -> None:
        def counting(fd: int, parts: Sequence[bytes]) -> int:
            self.writes += 1
            return enospc(fd, parts)

        self.patch(os, "writev", counting)

    def disk_ok(self) -> None:
        self.patch(os, "writev", REAL_WRITEV)

    def test_outage_with_an_unwritable_spool_keeps_everything_and_says_so(self) -> None:
        self.make_spooled(spool_after=2, directory=os.path.join(temp_dir(self), "spool"))
        self.disk_full()
        self.offer(docs(100))
        for _ in range(3):
            self.fail_pending()
            self.clock.advance(1)
        # Spooling began, but nothing reached the disk: all of it is still here.
        self.assertEqual((self.counters.spooled, self.counters.lost), (0, 0))
        self.assertEqual(self.batcher.waiting_docs, 100)
        self.assertGreater(self.buffer.used, 0)
        [started] = self.lines("Uploads have failed for")
        self.assertIn("(0 segments written now, 100 kept in memory: the spool cannot", started)
        [unwritable] = self.lines("unwritable")
        self.assertIn(
            "unwritable: [Errno 28] No space left on device; keeping batches in memory and "
            "retrying the disk in 1 s",
            unwritable,
        )
        # A minute more of outage and new data: the disk is probed with
        # backoff (1, 2, 4, 8, 16, 30 s), not on every batch.
        self.offer(docs(30, 100))
        writes = self.writes
        for _ in range(61):
            self.clock.advance(1)
            self.assertLessEqual(len(self.uploads.pending()), 1)  # one upload probe at a time
            self.fail_pending()
        self.assertLessEqual(self.writes - writes, 6)
        self.assertGreaterEqual(self.writes - writes, 4)
        self.assertEqual((self.counters.spooled, self.counters.lost), (0, 0))
        self.assertEqual(self.batcher.waiting_docs, 130)
        self.assertEqual(len(self.lines("unwritable")), 1)  # said once
        # The disk has room again: the next probe writes everything.
        self.disk_ok()
        for _ in range(31):
            self.clock.advance(1)
            self.fail_pending()
        self.assertEqual(self.counters.spooled, 130)
        self.assertEqual(self.buffer.used, 0)
        [recovered] = self.lines("writable again")
        self.assertIn("batches go to disk again", recovered)
        # X-Ray is back: every segment arrives.
        for _ in range(30):
            self.clock.advance(1)
            self.succeed_pending()
        self.assertEqual(sorted(set(self.sent_docs())), sorted(docs(130)))
        self.assertEqual((self.counters.lost, self.spool.pending_docs), (0, 0))

    def test_only_when_memory_is_full_too_is_anything_lost(self) -> None:
        from xraytwisted.pipeline.spool import Spool

        doc_cost = len(docs(1)[0]) + DOC_OVERHEAD
        self.directory = os.path.join(temp_dir(self), "spool")
        self.spool = Spool.open(self.directory, 64 * 1024 * 1024, self.clock, self.counters)
        self.addCleanup(self.spool.close)
        self.buffer = SegmentBuffer(doc_cost * 120, self.clock, self.counters)
        self.batcher = Batcher(
            self.buffer, self.uploads, self.clock, self.counters, concurrency=1,
            random=lambda: 1.0, spool=self.spool, spool_after=1000,
        )  # fmt: skip
        self.batcher.startService()
        self.disk_full()
        accepted = [doc for doc in docs(400) if self.buffer.offer(doc)]
        self.assertEqual(len(accepted), 120)  # what memory holds
        self.assertEqual(self.counters.lost, 280)  # the spool should have taken them
        self.assertEqual(self.counters.spillover, 0)
        [lost] = self.lines("Segment lost")
        self.assertIn("(spool unwritable and memory full)", lost)
        self.assertIn("[Errno 28] No space left on device", lost)
        # Nothing accepted is lost.
        for _ in range(40):
            self.clock.advance(1)
            self.succeed_pending()
        self.assertEqual(sorted(set(self.sent_docs())), sorted(accepted))
        self.assertEqual(self.counters.lost, 280)

    def test_shutdown_with_an_unwritable_spool_counts_the_rest_as_lost_with_the_reason(
        self,
    ) -> None:
        self.make_spooled(spool_after=1, directory=os.path.join(temp_dir(self), "spool"))
        self.disk_full()
        self.offer(docs(70))
        for _ in range(3):
            self.fail_pending()
            self.clock.advance(1)
        stopped = self.batcher.stopService()
        # The spool cannot take them: the drain goes on, probing, up to the deadline.
        for _ in range(19):
            self.fail_pending()
            self.clock.advance(1)
            self.assertNoResult(stopped)
            self.assertEqual(self.counters.lost, 0)
        self.fail_pending()
        self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual((self.counters.lost, self.counters.spooled), (70, 0))
        [line] = self.lines("could not be written to the spool")
        self.assertIn(
            "Shutdown deadline of 20 seconds reached (the last upload failed with: connection "
            "refused): 70 segments were not sent",
            line,
        )
        self.assertIn("(spool unwritable at shutdown)", line)
        self.assertEqual(self.lines("will be sent by the next start"), [])  # nothing on disk
        self.assertEqual(self.buffer.used, 0)

    def test_shutdown_with_an_unwritable_spool_sends_once_xray_answers(self) -> None:
        # The spool's disk is full, X-Ray was down for longer than spool_after
        # and is back when SIGTERM comes: the drain sends everything.
        self.make_spooled(spool_after=1, directory=os.path.join(temp_dir(self), "spool"))
        self.disk_full()
        self.offer(docs(170))
        for _ in range(3):
            self.fail_pending()
            self.clock.advance(1)
        stopped = self.batcher.stopService()
        self.assertNoResult(stopped)
        for _ in range(15):
            self.succeed_pending()
            self.clock.advance(1)
        self.successResultOf(stopped)
        self.assertEqual(sorted(set(self.sent_docs())), sorted(docs(170)))
        self.assertEqual((self.counters.lost, self.counters.spooled), (0, 0))
        self.assertEqual(self.lines("are lost"), [])
        self.assertEqual(self.buffer.used, 0)

    def test_replayed_record_refused_for_content_is_not_acked_before_its_halves_are_done(
        self,
    ) -> None:
        directory = os.path.join(temp_dir(self), "spool")
        batch = docs(50)
        self.write_earlier_run(directory, batch)
        self.make_spooled(directory=directory)
        self.disk_full()  # the halves cannot go back to disk: they wait in memory
        self.refuse_when({batch[3]})
        self.assertEqual((self.counters.rejected, self.counters.sent), (1, 49))
        self.assertEqual((self.counters.lost, self.spool.pending_docs), (0, 0))

    def write_earlier_run(self, directory: str, batch: list[bytes]) -> None:
        from xraytwisted.pipeline.spool import Spool

        earlier = Spool.open(directory, 64 * 1024 * 1024, self.clock, Counters())
        earlier.append(batch)
        earlier.close()


REAL_WRITEV = os.writev


class ReplayAckTests(SpoolFixture):
    """A spool record is acknowledged only once all of its documents are safe."""

    def crash_and_reopen(self) -> int:
        """kill -9: the spool's descriptors vanish, nothing is flushed; what is on disk now?"""
        from xraytwisted.pipeline.spool import Spool

        self.spool._close_fds()
        self.spool.closed = True  # its cleanup must not close the descriptors again
        after = Spool.open(self.directory, 64 * 1024 * 1024, Clock(), Counters())
        try:
            return after.pending_docs
        finally:
            after.close()

    def replay_one_record(self, batch: list[bytes]) -> None:
        from xraytwisted.pipeline.spool import Spool

        directory = os.path.join(temp_dir(self), "spool")
        earlier = Spool.open(directory, 64 * 1024 * 1024, self.clock, Counters())
        earlier.append(batch)
        earlier.close()
        self.make_spooled(directory=directory)
        self.assertEqual(len(self.uploads.calls), 1)  # the record is sent at start

    def test_retryable_unprocessed_documents_of_a_replay_survive_kill_9(self) -> None:
        batch = docs(3)
        self.replay_one_record(batch)
        throttled = Unprocessed(f"{1:016x}", "ThrottledException", "slow down")
        self.uploads.finish(0, Outcome(0.1, unprocessed=(throttled,)))
        self.assertEqual(self.counters.sent, 2)
        # The throttled document is only in memory now: its record must
        # still be on disk, or a kill -9 loses it.
        self.assertEqual(self.crash_and_reopen(), 3)

    def test_the_record_is_acked_once_its_remainder_is_delivered(self) -> None:
        batch = docs(3)
        self.replay_one_record(batch)
        throttled = Unprocessed(f"{1:016x}", "ThrottledException", "slow down")
        self.uploads.finish(0, Outcome(0.1, unprocessed=(throttled,)))
        self.assertEqual(self.spool.pending_docs, 3)
        self.clock.advance(1)
        self.assertEqual(self.uploads.calls[1][0], [batch[1]])
        self.uploads.finish(1)
        self.assertEqual(self.counters.sent, 3)
        self.assertEqual(self.spool.pending_docs, 0)
        self.assertEqual(self.buffer.used, 0)

    def test_a_remainder_written_back_to_disk_lets_its_record_go(self) -> None:
        batch = docs(3)
        self.replay_one_record(batch)
        throttled = Unprocessed(f"{1:016x}", "ThrottledException", "slow down")
        self.uploads.finish(0, Outcome(0.1, unprocessed=(throttled,)))
        self.assertEqual(self.spool.pending_docs, 3)  # not acknowledged yet
        stopped = self.batcher.stopService()
        self.clock.advance(self.batcher.shutdown_timeout)  # the retry hangs: the deadline
        self.fail_pending()
        self.successResultOf(stopped)
        # The remainder went back to the spool; only it is left on disk.
        self.assertEqual(self.crash_and_reopen(), 1)
        self.assertEqual(self.counters.lost, 0)


class SpoolWritesPerTurnTests(SpoolFixture):
    """Writing to the spool is spread over turns of the event loop (UDP is not read meanwhile)."""

    def setUp(self) -> None:
        super().setUp()
        # Small numbers, same proportions: a turn writes at most 64 KiB beyond need.
        self.patch(batcher_module, "PARK_BYTES_PER_TURN", 64 * 1024)
        self.doc = b'{"id":"%016x",' + b'"p":"' + b"p" * 1000 + b'"}'

    def test_full_memory_moves_a_bounded_amount_per_turn(self) -> None:
        from xraytwisted.pipeline.spool import Spool

        self.directory = os.path.join(temp_dir(self), "spool")
        self.spool = Spool.open(self.directory, 64 * 1024 * 1024, self.clock, self.counters)
        self.addCleanup(self.spool.close)
        self.buffer = SegmentBuffer(1024 * 1024, self.clock, self.counters)
        self.batcher = Batcher(
            self.buffer, self.uploads, self.clock, self.counters, concurrency=1,
            random=lambda: 1.0, spool=self.spool, spool_after=1000,
        )  # fmt: skip
        self.batcher.startService()
        per_offer = []
        for n in range(5000):  # ~5 MB into 1 MB of memory: the upload hangs
            before = self.counters.spooled
            self.assertTrue(self.buffer.offer(self.doc % n))
            per_offer.append(self.counters.spooled - before)
        self.assertGreater(sum(per_offer), 3000)
        # 64 KiB is ~62 documents of 1 KB: one batch past the limit at most.
        self.assertLessEqual(max(per_offer), 64 * 1024 // len(self.doc) + 50)
        self.assertEqual((self.counters.spillover, self.counters.lost), (0, 0))

    def test_starting_to_spool_writes_the_backlog_over_several_turns(self) -> None:
        self.make_spooled(
            spool_after=2, concurrency=1, directory=os.path.join(temp_dir(self), "spool")
        )
        for n in range(1000):  # ~1 MB waiting in memory
            self.assertTrue(self.buffer.offer(self.doc % n))
        events = capture_logs(self)
        for _ in range(3):
            self.fail_pending()
            self.clock.advance(1)
        # Clock.advance also runs the callLater(0) continuations (the next
        # turns of a real reactor), so the line tells what the first turn did.
        [line] = [formatEvent(e) for e in events if "Uploads have failed" in formatEvent(e)]
        match = re.search(r"\((\d+) segments written now, (\d+) more over the next moments\)", line)
        assert match is not None, line
        first, rest = int(match.group(1)), int(match.group(2))
        self.assertLessEqual(first, 64 * 1024 // len(self.doc) + 50)
        self.assertEqual(first + rest, 1000)
        self.assertEqual(self.counters.spooled, 1000)
        self.assertEqual(self.buffer.used, 0)
