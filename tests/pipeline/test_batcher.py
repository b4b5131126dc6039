"""Buffer and batcher: deadlines, concurrency, retries, shutdown (Clock-driven)."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.batcher import MAX_DOC_ATTEMPTS, Batcher, match_unprocessed, trace_id_of
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, SegmentBuffer
from xraytwisted.pipeline.uploader import Outcome, Unprocessed, UploadError


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
NOT_FOUND = UploadError("HTTPCode4XXCount", False, False, "HTTP 404 UnknownOperation", 404)
# What a web server in front of X-Ray says to a plain-HTTP request on its TLS port.
HTML_400 = UploadError("HTTPCode4XXCount", False, False, "HTTP 400: <html>...", 400)


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

    def test_a_400_that_is_not_from_x_ray_is_not_split(self) -> None:
        self.offer(docs(50))
        self.uploads.finish(0, Outcome(0.0, error=HTML_400))
        self.clock.advance(60)
        self.assertEqual(len(self.uploads.calls), 1)
        self.assertEqual(self.counters.rejected, 50)

    def test_a_wrong_endpoint_refusal_is_not_split(self) -> None:
        self.offer(docs(50))
        with capturedLogs() as events:
            self.uploads.finish(0, Outcome(0.0, error=NOT_FOUND))
        self.clock.advance(60)
        self.assertEqual(len(self.uploads.calls), 1)
        self.assertEqual(self.counters.rejected, 50)
        self.assertEqual(self.buffer.used, 0)
        refused = [formatEvent(e) for e in events if "Refused segment" in formatEvent(e)]
        self.assertEqual(len(refused), 10)  # ids of the first ten, then the batch line says 50
        self.assertIn(f"Refused segment {0:016x} of trace 1-00000000-{0:024x}: 404", refused[0])

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


class SpoolTests(Fixture):
    """The batcher with a real disk spool (Spool.Dir)."""

    def make_spooled(
        self, spool_after: float = 10.0, concurrency: int = 2, directory: str | None = None
    ) -> None:
        from xraytwisted.pipeline.spool import Spool

        self.directory = directory or self.mktemp()
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
        # Each read counts, so the batch re-read by every failed probe too.
        self.assertGreaterEqual(self.counters.replayed, 130)
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
        self.directory = self.mktemp()
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
