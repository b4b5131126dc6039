"""The batcher: when a batch leaves, how many are in flight, what happens after.

A batch leaves the buffer as soon as it holds 50 documents, or when its
oldest document has waited ``max_wait`` seconds (a true per-batch deadline,
not the Go daemon's free-running 1 s tick), provided fewer than
``concurrency`` uploads are in flight.  Failed uploads that can succeed later
wait in a retry queue, each with its own backoff, ahead of fresh batches;
consecutive failures also pause all sending for a while, and throttling
lowers how many uploads run at once.  On stop, everything is sent
immediately and the returned Deferred fires once all of it is done or the
shutdown deadline has passed (what is left then is counted as lost).
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

from xraytwisted.backoff import ConcurrencyLimit, full_jitter
from xraytwisted.buffer import Batch, SegmentBuffer
from xraytwisted.logs import Throttle, printable
from xraytwisted.stats import Counters
from xraytwisted.uploader import Outcome, Unprocessed, UploadError

MAX_WAIT = 1.0  # seconds the oldest document of a batch may wait
MAX_UNPROCESSED_LINES = 10  # per batch; the rest are summarised
# A document X-Ray keeps returning as unprocessed with a "try again" code is
# given up on after this many attempts (whole-batch failures such as an
# outage are retried for as long as the daemon runs: memory bounds them).
MAX_DOC_ATTEMPTS = 8

Send = Callable[[Sequence[bytes]], "Deferred[Outcome]"]


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
    ) -> None:
        self.buffer = buffer
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
        self._stopped: Deferred[None] | None = None
        self._deadline: IDelayedCall | None = None
        self._error_throttle = Throttle(clock, 10.0)
        buffer.attach(self)

    # -- BufferListener ---------------------------------------------------

    def batch_opened(self, batch: Batch) -> None:
        if self._timer is None:
            self._schedule(batch.started + self.max_wait)

    def batch_filled(self) -> None:
        self._dispatch()

    # -- sending ----------------------------------------------------------

    def _dispatch(self) -> None:
        if self._abandoned:
            return
        buffer = self.buffer
        now = self._clock.seconds()
        retries = self._retries
        if now >= self.resume_at:
            while len(self.in_flight) < self.limit.value:
                if retries and retries[0][0] <= now:
                    self._send(heapq.heappop(retries)[2])
                    continue
                head = buffer.head()
                if head is None or not self._due(head, now):
                    break
                self._send(buffer.pop())
        self._reschedule(now)

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
        if head is None and not self._retries:
            return None
        if now < self.resume_at:
            return self.resume_at
        candidates = []
        if self._retries and self._retries[0][0] > now:
            candidates.append(self._retries[0][0])
        if head is not None and not self._due(head, now):
            candidates.append(head.started + self.max_wait)
        return min(candidates, default=None)

    def _retry(self, batch: Batch, delay: float) -> None:
        heapq.heappush(
            self._retries, (self._clock.seconds() + delay, next(self._retry_order), batch)
        )

    @property
    def waiting_docs(self) -> int:
        """Documents accepted and not yet sent or given up on."""
        return (
            self.buffer.queued_docs
            + sum(len(entry[2]) for entry in self._retries)
            + sum(len(b) for b in self.in_flight.values())
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
            self._lose(batch)
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
        self._failures = 0
        self.limit.succeeded()
        counters.batches_ok += 1
        counters.last_success_at = self._clock.seconds()
        counters.upload_seconds.observe(outcome.seconds)
        unprocessed = outcome.unprocessed
        counters.sent += len(batch) - len(unprocessed)
        counters.sent_bytes += sum(map(len, batch.docs))
        if not unprocessed:
            self.log.info(
                "Successfully sent batch of {count} segments ({seconds:1.3f} seconds)",
                count=len(batch),
                seconds=outcome.seconds,
            )
            self.buffer.release(batch)
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
        for index, (item, doc) in enumerate(matched):
            if item.retryable and doc is not None and may_retry:
                retry.append(doc)
                continue
            counters.rejected += 1
            if index < MAX_UNPROCESSED_LINES:
                # Everything here came from X-Ray or from a sender: escaped.
                self.log.error(
                    "Unprocessed segment {id} of trace {trace}: {code}: {message}",
                    id=printable(item.id.encode(), 64) or "(no id)",
                    trace=printable(trace_id_of(doc).encode(), 64) if doc else "(unknown)",
                    code=printable(item.error_code.encode(), 64) or "(no code)",
                    message=printable(item.message.encode(), 200) or "(no message)",
                )
        if len(matched) > MAX_UNPROCESSED_LINES:
            self.log.error(
                "... and {more} more unprocessed segments in this batch",
                more=len(matched) - MAX_UNPROCESSED_LINES,
            )
        remaining = self.buffer.shrink(batch, retry)
        if remaining is not None:
            self._retry(remaining, full_jitter(remaining.attempts, self._random))

    def _failed(self, batch: Batch, error: UploadError) -> None:
        counters = self._counters
        counters.batches_failed += 1
        if error.error_class:
            counters.backend_errors[error.error_class] += 1
        # One line per kind of failure per interval: an outage or a sender of
        # invalid documents must not flood the log.
        suppressed = self._error_throttle.check(f"{error.error_class} {error.status} {error.code}")
        note = f" ({suppressed} similar failures not logged)" if suppressed else ""
        if not error.retryable:
            counters.rejected += len(batch)
            self.buffer.release(batch)
            if suppressed is not None:
                self.log.error(
                    "Sending segment batch failed with: {message}; X-Ray will not accept it, "
                    "so its {count} segments are dropped{note}",
                    message=error.message,
                    count=len(batch),
                    note=note,
                )
            return
        if error.throttled:
            self.limit.throttled()
        # The batch waits by its own attempt count; consecutive failures with
        # no success in between (an outage) also pause everything.
        self._failures += 1
        self._retry(batch, full_jitter(batch.attempts, self._random))
        if self._failures > 1:
            pause = full_jitter(self._failures - 1, self._random)
            self.resume_at = max(self.resume_at, self._clock.seconds() + pause)
        if suppressed is not None:
            self.log.error(
                "Sending segment batch failed with: {message}; will retry {count} segments "
                "(attempt {attempt}, {waiting} segments waiting){note}",
                message=error.message,
                count=len(batch),
                attempt=batch.attempts,
                waiting=self.waiting_docs,
                note=note,
            )

    def _lose(self, batch: Batch) -> None:
        self._counters.lost += len(batch)
        self.buffer.release(batch)

    # -- lifecycle --------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._flushing = True
        self._stopped = Deferred()
        waiting = self.waiting_docs
        if waiting:
            self.log.info(
                "Shutting down: sending {count} buffered segments (up to {timeout:g} seconds)",
                count=waiting,
                timeout=self.shutdown_timeout,
            )
        self._deadline = self._clock.callLater(self.shutdown_timeout, self._give_up)
        self._dispatch()
        stopped = self._stopped
        self._check_stopped()
        return stopped

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
        stopped.callback(None)

    def _give_up(self) -> None:
        self._deadline = None
        self._abandoned = True
        before = self._counters.lost
        for batch in self.buffer.drain():
            self._lose(batch)
        for _, _, batch in self._retries:
            self._lose(batch)
        self._retries.clear()
        for d in list(self.in_flight):
            d.cancel()  # _finished counts them as lost
        self.log.error(
            "Shutdown deadline of {timeout:g} seconds reached: {count} segments were not "
            "sent and are lost",
            timeout=self.shutdown_timeout,
            count=self._counters.lost - before,
        )
        self._check_stopped()


# ---------------------------------------------------------------------------
# Finding documents by the id X-Ray reports (rare path: only for unprocessed
# segments, so the hot path never looks inside a document).

_TRACE_ID = re.compile(rb'"trace_id"\s*:\s*"([^"\\]{1,64})"')


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


def trace_id_of(doc: bytes) -> str:
    match = _TRACE_ID.search(doc)
    return match.group(1).decode("ascii", "replace") if match else "(unknown)"
