"""The batcher: when a batch leaves, how many are in flight, what happens after.

A batch leaves the buffer as soon as it holds 50 documents, or when its
oldest document has waited ``max_wait`` seconds (a true per-batch deadline,
not the Go daemon's free-running 1 s tick), provided fewer than
``concurrency`` uploads are in flight.  Failed uploads that can succeed later
wait in a retry queue, each with its own backoff, ahead of fresh batches;
consecutive failures also pause all sending for a while, and throttling
lowers how many uploads run at once.

With a spool, batches go to disk instead of waiting in memory once uploads
have failed for ``spool_after`` seconds (one probe at a time then finds out
when X-Ray answers again), and spooled batches are sent again, oldest
first, before fresh ones when uploads work.  A batch the spool cannot take
(disk full, no descriptors) stays in memory, within the budget, until the
spool's own probe finds the disk writable again.  A record read back from
the spool is acknowledged only once all of its documents are delivered,
refused for good, or written back to the spool.  On stop, everything is
sent immediately and the returned Deferred fires once all of it is done or
the shutdown deadline has passed (what is left then goes to the spool, or
is counted as lost).
"""

from __future__ import annotations

import heapq
import itertools
import random as _random
import re
from collections.abc import Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle, printable, suppressed_note
from xraytwisted.pipeline.backoff import ConcurrencyLimit, full_jitter
from xraytwisted.pipeline.buffer import Batch, SegmentBuffer
from xraytwisted.pipeline.spool import Spool, SpooledBatch, SpoolWriteError, Tally
from xraytwisted.pipeline.uploader import (
    CONTENT_CODES,
    THROTTLING_CODES,
    Outcome,
    Unprocessed,
    UploadError,
)

MAX_WAIT = 1.0  # seconds the oldest document of a batch may wait
MAX_UNPROCESSED_LINES = 10  # per batch; the rest are summarised
# A document X-Ray keeps returning as unprocessed with an internal-error code
# is given up on after this many attempts: it may be the document that makes
# X-Ray fail.  Throttled documents (and whole-batch failures such as an
# outage) are retried for as long as the daemon runs: memory bounds them.
MAX_DOC_ATTEMPTS = 8
# Refusals of a request for its content: a batch refused with one is split in
# two and each half sent again, so one bad document (too large, not a JSON
# string) costs only itself.  A 400 counts only with an AWS error code that
# is about the request (an HTML 400 from something in front of X-Ray, or a
# 404/405 from a wrong endpoint, would just multiply requests by 2n - 1).
SPLIT_STATUSES = frozenset({413})
SPLIT_CODES = CONTENT_CODES

Send = Callable[[Sequence[bytes]], "Deferred[Outcome]"]
# Kinds of failure logged separately (one line each per interval); error
# codes come from the server, so the table is bounded.
MAX_LOG_KINDS = 64
# Document bytes written to the spool in one turn of the event loop, beyond
# what an arriving document needs: writing costs ~1.5 ms per MB, and the UDP
# socket is not read meanwhile.  More waits for the next turn.
PARK_BYTES_PER_TURN = 1024 * 1024


class _Replay:
    """A spool record being sent: acknowledged once every batch carrying its documents is done.

    Done: delivered, refused for good, or written back to the spool.  The
    halves of a refused record and the retryable remainder of a partly
    processed one carry it on; until they are done the record stays on disk,
    so a crash sends it again (duplicates are harmless) instead of losing them.
    """

    __slots__ = ("original", "parts", "spooled")

    def __init__(self, spooled: SpooledBatch, original: Batch) -> None:
        self.spooled = spooled
        self.original = original  # the batch as read from disk
        self.parts = 1  # batches carrying its documents that are not done

    def untouched(self, batch: Batch) -> bool:
        """``batch`` is the whole record: giving it back to the spool loses nothing."""
        return batch is self.original and self.parts == 1


class Batcher(Service):
    log = Logger()

    def __init__(
        self,
        buffer: SegmentBuffer,
        send: Send,
        clock: IReactorTime,
        counters: Counters,
        *,
        concurrency: int = 8,
        max_wait: float = MAX_WAIT,
        shutdown_timeout: float = 20.0,
        random: Callable[[], float] = _random.random,
        spool: Spool | None = None,
        spool_after: float = 10.0,
        destination: str = "",
        tally: Tally | None = None,
    ) -> None:
        self.buffer = buffer
        # What documents weigh besides being counted (the span batcher: spans), on the
        # rare paths only: lost and replayed batches.
        self.tally = tally
        self._send_docs = send
        self._clock = clock
        self._counters = counters
        self.max_wait = max_wait
        self.shutdown_timeout = shutdown_timeout
        self.limit = ConcurrencyLimit(concurrency)
        self._random = random
        self.in_flight: dict[Deferred[Outcome], Batch] = {}
        # (not before, tie-breaker, batch): failed batches waiting to go again.
        self._retries: list[tuple[float, int, Batch]] = []
        self._retry_order = itertools.count()
        self._timer: IDelayedCall | None = None
        self._timer_at = 0.0
        self._failures = 0  # consecutive failed attempts, for the backoff
        self.resume_at = 0.0  # no new attempts before this time (backoff)
        self._flushing = False  # stopping: every batch is due now
        self._abandoned = False  # past the shutdown deadline
        self._cut_short = ""  # why the drain was ended before its deadline
        self._stopped: Deferred[None] | None = None
        self._deadline: IDelayedCall | None = None
        self._error_throttle = Throttle(clock, 10.0, max_reasons=MAX_LOG_KINDS)
        self.spool = spool
        self.spool_after = spool_after
        # Where batches go when not to X-Ray (a local sink file), for the log.
        self.destination = destination
        self._failing_since: float | None = None  # first failure since the last success
        self._last_error = ""  # what the last failed upload said; "" since a success
        self._drain_skipped = False  # stopping with everything on disk: no drain was needed
        self._spooled_at_stop = 0  # counters.spooled when stopping began
        self._spooling = False  # failing for spool_after: batches are parked on disk
        self._replays: dict[Batch, _Replay] = {}  # batches with documents of a spool record
        self._park_call: IDelayedCall | None = None  # more to write to the spool, next turn
        # With a tally: [documents, their weight] that _lose gave up on, for the log.
        self._lost_weighed = [0, 0]
        # What X-Ray said when it last refused the credentials; None since a success.
        self.credentials_refused: str | None = None
        # (clock time, what it said) of the last failed upload attempt, retried or not;
        # None since a success.  For /health.
        self.last_upload_error: tuple[float, str] | None = None
        buffer.attach(self)

    # -- BufferListener ---------------------------------------------------

    def batch_opened(self, batch: Batch) -> None:
        # Its deadline is its own: a timer set for later (a retry's backoff)
        # must not hold a new batch back.
        deadline = batch.started + self.max_wait
        if self._timer is None or deadline < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._schedule(deadline)

    def batch_filled(self) -> None:
        self._dispatch()

    def make_room(self, size: int) -> bool:
        """The memory budget is spent: with a spool, move the oldest waiting batches there.

        Down to half the budget, so this happens once in a while rather than
        for every document, but no more than ``PARK_BYTES_PER_TURN`` beyond
        what ``size`` needs (a long write would stall the event loop); what
        is in flight stays in memory, and so does what the spool cannot take.
        """
        spool, buffer = self.spool, self.buffer
        if spool is None or self._abandoned:
            return False
        moved = moved_bytes = 0
        retries = self._retries
        kept: list[tuple[float, int, Batch]] = []
        while (
            buffer.used + size > buffer.capacity
            or (buffer.used + size > buffer.capacity // 2 and moved_bytes < PARK_BYTES_PER_TURN)
        ) and spool.accepting():
            if retries:
                entry = heapq.heappop(retries)
            elif buffer.head() is not None:
                entry = (self._clock.seconds(), next(self._retry_order), buffer.pop())
            else:
                break
            if self._park(entry[2]):
                moved += len(entry[2])
                moved_bytes += sum(map(len, entry[2].docs))
            else:
                kept.append(entry)
        for entry in kept:
            heapq.heappush(retries, entry)
        if moved:
            suppressed = self._error_throttle.check("memory full: spooling")
            if suppressed is not None:
                self.log.warn(
                    "The memory buffer of {mb} MB is full: wrote {count} waiting segments to "
                    "the spool {directory}; they are sent when uploads catch up{note}",
                    mb=buffer.capacity // (1024 * 1024),
                    count=moved,
                    directory=spool.directory,
                    note=suppressed_note(suppressed),
                )
        return buffer.used + size <= buffer.capacity

    def refused(self) -> bool:
        """The buffer turned a document away: True if that is a loss (counted here).

        It is when the spool, which would have taken the waiting batches, is
        unwritable; otherwise it is ordinary spillover (the buffer counts it).
        """
        spool = self.spool
        if spool is None or spool.unwritable is None:
            return False
        self._counters.lost += 1
        if self.tally is not None:
            self.tally.lost(1, None)  # the buffer did not say which document
        suppressed = self._error_throttle.check("memory full: spool unwritable")
        if suppressed is not None:
            self.log.error(
                "Segment lost (spool unwritable and memory full): the memory buffer of {mb} MB "
                "is full and the spool {directory} cannot be written ({error}). Free space "
                "for the spool or raise -m/--buffer-memory{note}",
                mb=self.buffer.capacity // (1024 * 1024),
                directory=spool.directory,
                error=spool.unwritable,
                note=suppressed_note(suppressed),
            )
        return True

    # -- sending ----------------------------------------------------------

    def _dispatch(self) -> None:
        if self._abandoned:
            return
        buffer = self.buffer
        now = self._clock.seconds()
        retries = self._retries
        if self._should_spool(now):
            self._park_waiting(now)
            if not self.in_flight and now >= self.resume_at:
                self._probe()
        elif now >= self.resume_at:
            spool = None if self._flushing else self.spool
            # After consecutive failures (an outage), one upload at a time
            # finds out whether X-Ray answers again.
            limit = 1 if self._failures > 1 else self.limit.value
            while len(self.in_flight) < limit:
                if retries and retries[0][0] <= now:
                    self._send(heapq.heappop(retries)[2])
                    continue
                if spool is not None and spool.ready_docs:
                    spooled = spool.take()
                    if spooled is not None:
                        self._send_spooled(spooled)
                        continue
                head = buffer.head()
                if head is None or not self._due(head, now):
                    break
                self._send(buffer.pop())
        self._reschedule(now)
        if self._stopped is not None:
            # Stopping: parking everything on disk may have been the last step.
            self._check_stopped()

    def _due(self, batch: Batch, now: float) -> bool:
        return (
            self._flushing
            or len(batch) >= self.buffer.batch_size
            # A hair of tolerance: callLater may fire a few ns "early" by float rounding.
            or now + 1e-6 >= batch.started + self.max_wait
        )

    def _reschedule(self, now: float) -> None:
        wake = self._next_wake(now)
        if wake is None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None or wake != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._schedule(wake)

    def _next_wake(self, now: float) -> float | None:
        """When something not yet due becomes due (None: nothing, or only a free slot helps)."""
        head = self.buffer.head()
        spooled = self.spool.ready_docs if self.spool is not None and not self._flushing else 0
        if head is None and not self._retries and not spooled:
            return None
        candidates = []
        if now < self.resume_at:
            candidates.append(self.resume_at)
            if not self._spooling:
                # Paused: only the end of the pause (or starting to spool) matters.
                head = None
        if self._retries:
            candidates.append(self._retries[0][0])
        if head is not None and not self._due(head, now):
            candidates.append(head.started + self.max_wait)
        spool = self.spool
        if spool is not None:
            if self._failing_since is not None and not self._spooling:
                candidates.append(self._failing_since + self.spool_after)
            if (
                self._spooling
                and spool.unwritable is not None
                and (self._retries or head is not None)
            ):
                candidates.append(spool.write_retry_at)  # the spool's next try of the disk
            if spooled:
                candidates.append(spool.read_retry_at)
        return min((c for c in candidates if c > now), default=None)

    def _retry(self, batch: Batch, delay: float) -> None:
        heapq.heappush(
            self._retries, (self._clock.seconds() + delay, next(self._retry_order), batch)
        )

    @property
    def waiting_docs(self) -> int:
        """Documents accepted and not yet sent or given up on (spooled ones too)."""
        return (
            self.buffer.queued_docs
            + sum(len(entry[2]) for entry in self._retries)
            + sum(len(b) for b in self.in_flight.values())
            + (self.spool.ready_docs if self.spool is not None else 0)
        )

    def oldest_waiting_since(self) -> float | None:
        """Arrival time of the oldest document not yet sent or given up on (None: none)."""
        starts = [b.started for b in self.in_flight.values()]
        starts.extend(entry[2].started for entry in self._retries)
        head = self.buffer.head()
        if head is not None:
            starts.append(head.started)
        return min(starts, default=None)

    def _schedule(self, when: float) -> None:
        self._timer_at = when
        self._timer = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._dispatch()

    # -- the spool ---------------------------------------------------------

    def _should_spool(self, now: float) -> bool:
        """Whether uploads have failed long enough to park batches on disk."""
        if self._spooling or self.spool is None or self._failing_since is None:
            return self._spooling
        if now < self._failing_since + self.spool_after:
            return False
        self._spooling = True
        written, left = self._park_waiting(now, everything=True)
        if not left:
            rest = ""
        elif self.spool.accepting():
            rest = f", {left} more over the next moments"
        else:
            rest = f", {left} kept in memory: the spool cannot take them"
        self.log.warn(
            "Uploads have failed for {seconds:.0f} seconds: writing batches to the spool "
            "{directory} until X-Ray answers again ({count} segments written now{rest})",
            seconds=now - self._failing_since,
            directory=self.spool.directory,
            count=written,
            rest=rest,
        )
        return True

    def _park(self, batch: Batch) -> bool:
        """Move an in-memory batch to the spool; False if the spool did not take it (kept)."""
        spool = self.spool
        assert spool is not None
        try:
            spool.append(batch.docs)
        except SpoolWriteError as e:
            # A disk that refuses is reported by the spool, once.
            if not e.disk:
                suppressed = self._error_throttle.check("cannot spool")
                if suppressed is not None:
                    self.log.warn(
                        "A batch of {count} segments cannot go to the spool {directory}: {why}; "
                        "it stays in memory until it is sent{note}",
                        count=len(batch),
                        directory=spool.directory,
                        why=str(e),
                        note=suppressed_note(suppressed),
                    )
            return False
        self.buffer.release(batch)
        replay = self._replays.pop(batch, None)
        if replay is not None:
            self._part_done(replay)  # safe on disk again
        return True

    def _park_waiting(self, now: float, everything: bool = False) -> tuple[int, int]:
        """Write waiting batches to the spool, oldest first, while it takes them.

        The batches waiting for a retry, then the buffer's due ones (all of
        them with ``everything``), at most ``PARK_BYTES_PER_TURN`` now: the
        rest follows in the next turns of the event loop.  Returns
        (documents written, documents still in memory; 0 unless ``everything``).
        """
        spool = self.spool
        assert spool is not None
        retries = self._retries
        buffer = self.buffer
        written = 0
        budget = PARK_BYTES_PER_TURN
        if spool.accepting():
            # The spool sends back in the order written: oldest data first.
            waiting = sorted(retries, key=lambda entry: entry[2].started)
            retries.clear()
            for entry in waiting:
                if budget > 0 and spool.accepting() and self._park(entry[2]):
                    written += len(entry[2])
                    budget -= sum(map(len, entry[2].docs))
                else:
                    retries.append(entry)
            heapq.heapify(retries)
            head = buffer.head()
            while (
                head is not None
                and (everything or self._due(head, now))
                and spool.accepting()
                and budget > 0
            ):
                batch = buffer.pop()
                if self._park(batch):
                    written += len(batch)
                    budget -= sum(map(len, batch.docs))
                else:
                    self._retry(batch, 0.0)
                head = buffer.head()
            if budget <= 0 and spool.accepting():
                self._park_soon()
        if not everything:
            return written, 0  # (not counted: this runs on every dispatch while spooling)
        return written, sum(len(entry[2]) for entry in retries) + buffer.queued_docs

    def _park_soon(self) -> None:
        if self._park_call is None:
            self._park_call = self._clock.callLater(0, self._park_more)

    def _park_more(self) -> None:
        self._park_call = None
        self._dispatch()

    def _probe(self) -> None:
        """While spooling: one upload at a time tells when X-Ray answers again."""
        assert self.spool is not None
        spooled = self.spool.take()
        if spooled is not None:
            self._send_spooled(spooled)
        elif self._retries:
            self._send(heapq.heappop(self._retries)[2])  # what the spool could not take
        elif self.buffer.head() is not None:
            self._send(self.buffer.pop())

    def _send_spooled(self, spooled: SpooledBatch) -> None:
        # Not charged to the memory budget: at most `concurrency` are read in.
        batch = Batch(self._clock.seconds())
        batch.docs = spooled.docs
        self._replays[batch] = _Replay(spooled, batch)
        self._send(batch)

    def _part_done(self, replay: _Replay) -> None:
        replay.parts -= 1
        if replay.parts == 0 and self.spool is not None:
            self.spool.ack(replay.spooled)

    def _send(self, batch: Batch) -> None:
        batch.attempts += 1
        if batch.attempts > 1:
            self._counters.retried += len(batch)
        d = self._send_docs(batch.docs)
        self.in_flight[d] = batch
        d.addBoth(self._finished, d, batch)

    def _finished(self, result: Outcome | Failure, d: Deferred[Outcome], batch: Batch) -> None:
        del self.in_flight[d]
        if self._abandoned:
            # Cancelled at the shutdown deadline (or finished just then).
            self._keep_or_lose(batch)
            self._check_stopped()
            return
        if isinstance(result, Failure):
            # The uploader reports problems as Outcomes; this is a bug, but
            # the batch must not be lost over it.
            self.log.failure("Unexpected error while uploading a batch", result)
            result = Outcome(0.0, error=UploadError("OtherCount", True, False, str(result.value)))
        if result.error is None:
            self._succeeded(batch, result)
        else:
            self._failed(batch, result.error)
        self._dispatch()
        self._check_stopped()

    def _succeeded(self, batch: Batch, outcome: Outcome) -> None:
        counters = self._counters
        if self._spooling:
            self._spooling = False
            self.log.info(
                "Uploads work again: sending {count} spooled segments, oldest first",
                count=self.spool.ready_docs if self.spool is not None else 0,
            )
        elif self._failures:
            self.log.info(
                "Uploads work again after {failures} failed attempts ({waiting} segments waiting)",
                failures=self._failures,
                waiting=self.waiting_docs,
            )
        self._failures = 0
        self._failing_since = None
        self._last_error = ""
        self.credentials_refused = None
        self.last_upload_error = None
        replay = self._replays.pop(batch, None)
        self.limit.succeeded()
        counters.batches_ok += 1
        counters.last_success_at = self._clock.seconds()
        counters.upload_seconds.observe(outcome.seconds)
        unprocessed = outcome.unprocessed
        counters.sent += len(batch) - len(unprocessed)
        if replay is not None:
            # Delivered from the spool (a failed probe read it, but did not replay it).
            counters.replayed += len(batch) - len(unprocessed)
            if self.tally is not None:
                # The span uploader never reports unprocessed documents (a partial
                # success is per span, counted there); for others they are taken out.
                returned = [doc for _, doc in match_unprocessed(batch.docs, unprocessed) if doc]
                self.tally.replayed(self.tally.weigh(batch.docs) - self.tally.weigh(returned))
        counters.sent_bytes += sum(map(len, batch.docs))
        if not unprocessed:
            if self.destination:
                self.log.info(
                    "Wrote {count} segments to {destination} ({seconds:1.3f} seconds)",
                    count=len(batch),
                    destination=self.destination,
                    seconds=outcome.seconds,
                )
            else:
                self.log.info(
                    "Successfully sent batch of {count} segments ({seconds:1.3f} seconds)",
                    count=len(batch),
                    seconds=outcome.seconds,
                )
            self.buffer.release(batch)
            if replay is not None:
                self._part_done(replay)
            return
        counters.unprocessed += len(unprocessed)
        self.log.info(
            "Sent batch of {count} segments but had {unprocessed} Unprocessed segments "
            "({seconds:1.3f} seconds)",
            count=len(batch),
            unprocessed=len(unprocessed),
            seconds=outcome.seconds,
        )
        retry: list[bytes] = []
        matched = match_unprocessed(batch.docs, unprocessed)
        may_retry = batch.attempts < MAX_DOC_ATTEMPTS
        throttled = False
        for index, (item, doc) in enumerate(matched):
            if item.retryable and doc is not None:
                if item.error_code in THROTTLING_CODES:
                    throttled = True
                    retry.append(doc)
                    continue
                if may_retry:
                    retry.append(doc)
                    continue
            counters.rejected += 1
            if index < MAX_UNPROCESSED_LINES:
                # Everything here came from X-Ray or from a sender: escaped.
                self.log.error(
                    "Unprocessed segment {id} of trace {trace}: {code}: {detail}",
                    id=printable(item.id.encode(), 64) or "(no id)",
                    trace=printable(trace_id_of(doc).encode(), 64) if doc else "(unknown)",
                    code=printable(item.error_code.encode(), 64) or "(no code)",
                    detail=printable(item.message.encode(), 200) or "(no message)",
                )
        if len(matched) > MAX_UNPROCESSED_LINES:
            self.log.error(
                "... and {more} more unprocessed segments in this batch",
                more=len(matched) - MAX_UNPROCESSED_LINES,
            )
        if throttled:
            self.limit.throttled()  # X-Ray is asking for fewer requests
        remaining = self.buffer.shrink(batch, retry)
        if remaining is None:
            if replay is not None:
                self._part_done(replay)
            return
        if replay is not None:
            # Its record stays on disk, unacknowledged, until these are done too.
            self._replays[remaining] = replay
        self._retry(remaining, full_jitter(remaining.attempts, self._random))

    def _failed(self, batch: Batch, error: UploadError) -> None:
        counters = self._counters
        counters.batches_failed += 1
        self.last_upload_error = (self._clock.seconds(), error.message)
        if error.error_class:
            counters.backend_errors[error.error_class] += 1
        replay = self._replays.pop(batch, None)
        if not error.retryable and len(batch) > 1 and _refused_for_content(error):
            # Find the documents X-Ray refuses by halving: the others go.
            if replay is not None:
                replay.parts += 1  # one batch of the record became two
            for half in self.buffer.split(batch):
                # Not a retry: the halves are new requests (their attempt
                # counts and the `retried` counter stay as they were).
                half.attempts -= 1
                if replay is not None:
                    self._replays[half] = replay
                # While spooling they are probed from the disk one at a time;
                # a replayed batch's halves go back to disk too (then its
                # record is done).  What the spool cannot take stays here.
                if not ((self._spooling or replay is not None) and self._park(half)):
                    self._retry(half, 0.0)
            return
        # One line per kind of failure per interval: an outage or a sender of
        # invalid documents must not flood the log.
        suppressed = self._error_throttle.check(f"{error.error_class} {error.status} {error.code}")
        note = suppressed_note(suppressed or 0)
        if not error.retryable:
            counters.rejected += len(batch)
            self.buffer.release(batch)
            if replay is not None:
                self._part_done(replay)  # done with it: X-Ray will never take it
            if suppressed is None:
                return
            if len(batch) == 1:  # what halving a refused batch ends with
                self.log.error(
                    "Refused segment {id} of trace {trace}: {detail}; X-Ray will not accept "
                    "it, so it is dropped{note}",
                    id=_log_id(segment_id_of(batch.docs[0])),
                    trace=_log_id(trace_id_of(batch.docs[0])),
                    detail=error.message,
                    note=note,
                )
                return
            self.log.error(
                "Sending segment batch failed with: {detail}; X-Ray will not accept it, "
                "so its {count} segments are dropped{note}",
                detail=error.message,
                count=len(batch),
                note=note,
            )
            for doc in batch.docs[:MAX_UNPROCESSED_LINES]:
                self.log.error(
                    "Refused segment {id} of trace {trace}: {code}",
                    id=_log_id(segment_id_of(doc)),
                    trace=_log_id(trace_id_of(doc)),
                    code=printable((error.code or str(error.status)).encode(), 64),
                )
            return
        if error.throttled:
            self.limit.throttled()
        # The batch waits by its own attempt count; consecutive failures with
        # no success in between (an outage) also pause everything.
        self._failures += 1
        self._last_error = error.message
        if self._failing_since is None:
            self._failing_since = self._clock.seconds()
        if replay is not None and replay.untouched(batch) and self.spool is not None:
            self.spool.release(replay.spooled)  # stays first in line on disk
        else:
            if replay is not None:
                self._replays[batch] = replay  # part of a record: it waits here
            if not (self._spooling and self._park(batch)):
                self._retry(batch, full_jitter(batch.attempts, self._random))
        if self._failures > 1:
            pause = full_jitter(self._failures - 1, self._random)
            self.resume_at = max(self.resume_at, self._clock.seconds() + pause)
        if error.credentials_refused:
            self.credentials_refused = error.message
        if suppressed is None:
            return
        if error.credentials_refused:
            why = f"{error.status} {error.code}" if error.code else f"HTTP {error.status}"
            self.log.error(
                "Sending segment batch failed with: X-Ray refused the credentials ({why}): check "
                "the role's xray:PutTraceSegments permission and where the credentials come "
                "from (instance or task role, -r/--role-arn, AWS_* variables); will retry "
                "{count} segments (attempt {attempt}, {waiting} segments waiting){note}. "
                "X-Ray said: {detail}",
                why=why,
                detail=error.message,
                count=len(batch),
                attempt=batch.attempts,
                waiting=self.waiting_docs,
                note=note,
            )
            return
        self.log.error(
            "Sending segment batch failed with: {detail}; {advice}will retry {count} segments "
            "(attempt {attempt}, {waiting} segments waiting){note}",
            detail=error.message,
            advice=f"{error.advice}; " if error.advice else "",
            count=len(batch),
            attempt=batch.attempts,
            waiting=self.waiting_docs,
            note=note,
        )

    def _lose(self, batch: Batch) -> None:
        self._counters.lost += len(batch)
        if self.tally is not None:
            weight = self.tally.weigh(batch.docs)
            self.tally.lost(len(batch), weight)
            self._lost_weighed[0] += len(batch)
            self._lost_weighed[1] += weight
        self.buffer.release(batch)

    def _keep_or_lose(self, batch: Batch) -> None:
        """At the shutdown deadline: to the spool if there is one and it takes it, else lost."""
        spool = self.spool
        replay = self._replays.get(batch)
        if spool is not None and replay is not None and replay.untouched(batch):
            del self._replays[batch]
            spool.release(replay.spooled)  # never left the disk
        elif spool is not None and self._park(batch):
            pass
        elif replay is not None:
            # Its record is never acknowledged: the next run sends all of it again.
            del self._replays[batch]
            self.buffer.release(batch)
        else:
            self._lose(batch)

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if self.spool is not None and self.spool.ready_docs:
            self.log.info(
                "Sending {count} segments spooled by an earlier run, oldest first",
                count=self.spool.ready_docs,
            )
            self._dispatch()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._flushing = True
        self._stopped = Deferred()
        stopped = self._stopped
        self._spooled_at_stop = self._counters.spooled
        if self._should_spool(self._clock.seconds()) and self._park_everything():
            # Uploads have failed for a while and the spool took everything:
            # do not spend the deadline retrying, the next start sends it.
            self._drain_skipped = True
            self._give_up()
            return stopped
        # Otherwise send what is held (while uploads fail, one probe at a
        # time finds out when X-Ray answers again) up to the deadline; what
        # the spool can take meanwhile goes there.
        waiting = self.waiting_docs
        if waiting:
            self.log.info(
                "Shutting down: sending {count} buffered segments (up to {timeout:g} seconds)",
                count=waiting,
                timeout=self.shutdown_timeout,
            )
        self._deadline = self._clock.callLater(self.shutdown_timeout, self._give_up)
        self._dispatch()
        self._check_stopped()
        if self._cut_short and not stopped.called:
            self._give_up()
        return stopped

    def _park_everything(self) -> bool:
        """Stopping while spooling: write every batch in memory to the spool.

        True if nothing is left that giving up now could lose: all of it is
        on disk, and what is in flight is a spool record that stays there.
        What the spool does not take waits for the drain (False).
        """
        spool = self.spool
        assert spool is not None
        spool.try_writes_now()  # one write tells whether the disk takes batches again
        waiting = sorted(self._retries, key=lambda entry: entry[2].started)
        self._retries.clear()
        batches = [entry[2] for entry in waiting] + self.buffer.drain()
        for batch in batches:
            if not self._park(batch):
                self._retry(batch, 0.0)
        if self._retries:
            return False
        return all(
            (replay := self._replays.get(batch)) is not None and replay.untouched(batch)
            for batch in self.in_flight.values()
        )

    def stop_now(self, why: str) -> None:
        """End the drain at once (a second shutdown signal); now, or as soon as it starts.

        What is left goes to the spool, or is counted and logged as lost.
        """
        self._cut_short = why
        stopped = self._stopped
        if stopped is not None and not stopped.called and not self._abandoned:
            self._give_up()

    def _check_stopped(self) -> None:
        stopped = self._stopped
        if stopped is None or stopped.called:
            return
        if self.in_flight or self._retries or len(self.buffer):
            return
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._park_call is not None:
            self._park_call.cancel()
            self._park_call = None
        stopped.callback(None)

    def _give_up(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self._abandoned = True
        counters = self._counters
        lost = counters.lost
        lost_docs, lost_weight = self._lost_weighed
        if self.spool is not None:
            self.spool.try_writes_now()  # a last try, even if the disk was refusing
        batches = self.buffer.drain() + [entry[2] for entry in self._retries]
        self._retries.clear()
        for batch in batches:
            self._keep_or_lose(batch)
        for d in list(self.in_flight):
            d.cancel()  # _finished keeps (spool) or loses them
        why = self._stop_reason()
        spool = self.spool
        if spool is not None:
            spool.flush()
            if spool.pending_docs:
                self.log.warn(
                    "{why}: {count} segments are in the spool {directory} ({written} of them "
                    "written while shutting down) and will be sent by the next start",
                    why=why,
                    count=spool.pending_docs,
                    written=counters.spooled - self._spooled_at_stop,
                    directory=spool.directory,
                )
        count = counters.lost - lost
        weighed = ""
        if self.tally is not None and count:
            # Lost here, weighed by _lose; anything else is what the spool dropped
            # meanwhile, of its own files (and said so).
            weighed_docs = self._lost_weighed[0] - lost_docs
            weight = self._lost_weighed[1] - lost_weight
            weighed = self.tally.describe(count, weight, count - weighed_docs)
        if count and spool is not None:
            self.log.error(
                "{why}: {count} segments{weighed} were not sent and could not be written to "
                "the spool {directory} ({error}); they are lost (spool unwritable at "
                "shutdown). Free space for the spool",
                why=why,
                count=count,
                weighed=weighed,
                directory=spool.directory,
                error=spool.unwritable or "unknown error",
            )
        elif count:
            self.log.error(
                "{why}: {count} segments{weighed} were not sent and are lost",
                why=why,
                count=count,
                weighed=weighed,
            )
        self._check_stopped()

    def _stop_reason(self) -> str:
        """Why stopping ends with segments not sent, in the words of the last failure."""
        if self._cut_short:
            return self._cut_short
        failure = f"the last upload failed with: {self._last_error}" if self._last_error else ""
        if self._drain_skipped:
            since = self._failing_since
            seconds = self._clock.seconds() - since if since is not None else 0.0
            return f"Shutting down after {seconds:.0f} seconds of failed uploads" + (
                f" ({failure})" if failure else ""
            )
        return f"Shutdown deadline of {self.shutdown_timeout:g} seconds reached" + (
            f" ({failure})" if failure else " (uploads did not finish in time)"
        )


# ---------------------------------------------------------------------------
# Finding documents by the id X-Ray reports (rare path: only for unprocessed
# segments, so the hot path never looks inside a document).

_TRACE_ID = re.compile(rb'"trace_id"\s*:\s*"([^"\\]{1,64})"')
_ID = re.compile(rb'"id"\s*:\s*"([^"\\]{1,64})"')


def match_unprocessed(
    docs: Sequence[bytes], unprocessed: Sequence[Unprocessed]
) -> list[tuple[Unprocessed, bytes | None]]:
    """Pair each unprocessed entry with the document whose "id" it names."""
    result: list[tuple[Unprocessed, bytes | None]] = []
    for item in unprocessed:
        found: bytes | None = None
        if item.id:
            pattern = re.compile(rb'"id"\s*:\s*"' + re.escape(item.id.encode()) + rb'"')
            found = next((d for d in docs if pattern.search(d)), None)
        result.append((item, found))
    return result


def _refused_for_content(error: UploadError) -> bool:
    return error.status in SPLIT_STATUSES or (error.status == 400 and error.code in SPLIT_CODES)


def _log_id(text: str) -> str:
    # Ids come from senders: escaped for the log like any other input.
    return printable(text.encode(), 64)


def segment_id_of(doc: bytes) -> str:
    """The first "id" in a document (the segment's own in SDK output), for log lines."""
    match = _ID.search(doc)
    return match.group(1).decode("ascii", "replace") if match else "(unknown)"


def trace_id_of(doc: bytes) -> str:
    match = _TRACE_ID.search(doc)
    return match.group(1).decode("ascii", "replace") if match else "(unknown)"
