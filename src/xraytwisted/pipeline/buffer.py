"""The segment buffer: a FIFO of accepted documents, bounded by a memory budget.

Documents are kept in arrival order, already cut into batches of at most
``batch_size`` so the batcher never has to re-slice.  Every document is
charged against the budget from the moment it is accepted until its upload
is over (sent, or given up on), so the budget bounds queued *and* in-flight
data.  When the budget is exhausted the *newest* document is refused and
counted as spillover (as lost when the listener says so: a spool that
should have made room cannot be written); nothing already accepted is
pushed out.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from xraytwisted.observe.counters import Counters

# Bytes charged per document on top of its length: the bytes object header
# and the list slot that hold it.  An estimate, so the budget tracks memory
# rather than just payload.
DOC_OVERHEAD = 64
BATCH_SIZE = 50  # PutTraceSegments accepts at most 50 documents per call


class Batch:
    """Up to ``BATCH_SIZE`` documents that will travel in one upload."""

    __slots__ = ("attempts", "docs", "nbytes", "started")

    def __init__(self, started: float) -> None:
        self.docs: list[bytes] = []
        self.nbytes = 0  # what these documents are charged against the budget
        self.started = started  # when the oldest document arrived
        self.attempts = 0  # upload attempts made so far

    def __len__(self) -> int:
        return len(self.docs)

    def __repr__(self) -> str:
        return f"<Batch {len(self.docs)} docs, {self.nbytes} bytes, attempts={self.attempts}>"


class BufferListener(Protocol):
    def batch_opened(self, batch: Batch) -> None:
        """A new batch got its first document (its deadline starts now)."""

    def batch_filled(self) -> None:
        """A batch reached ``batch_size`` documents."""

    def make_room(self, size: int) -> bool:
        """The budget cannot take ``size`` more bytes: free some if possible (True if so)."""

    def refused(self) -> bool:
        """``offer`` turned a document away: True if the listener counted it (as lost)."""


class SegmentBuffer:
    """Accepted documents waiting for (or in) an upload, within a byte budget."""

    log = Logger()

    def __init__(
        self,
        capacity: int,
        clock: IReactorTime,
        counters: Counters,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.capacity = capacity
        self.used = 0  # bytes charged: queued plus in flight
        self.batch_size = batch_size
        self._clock = clock
        self._counters = counters
        self._batches: deque[Batch] = deque()
        self._open: Batch | None = None  # the batch new documents go to
        # Set by a reader that let documents wait in the kernel (the UDP
        # socket read on a timer): the earliest time the documents it offers
        # now can have arrived.  A batch they open counts its deadline from
        # then, so waiting in the kernel counts against the 1 s deadline too.
        self.arrived_since: float | None = None
        self._listener: BufferListener | None = None
        self.queued_docs = 0
        self.refused_lost = False  # the last refused document was counted as lost
        # Producers paused for lack of budget (the TCP segment stream), told
        # once when some budget is given back.
        self._space_waiters: list[Callable[[], object]] = []
        self._space_call: IDelayedCall | None = None

    def attach(self, listener: BufferListener) -> None:
        self._listener = listener

    def has_room(self, size: int) -> bool:
        """Whether ``offer`` would accept a document of ``size`` bytes now (nothing counted).

        Like ``offer``, a full buffer first asks its listener to make room (a
        spool moves waiting batches to disk), so a paused stream only waits
        when there is really nowhere to put its documents.
        """
        cost = size + DOC_OVERHEAD
        if self.used + cost <= self.capacity:
            return True
        return self._listener is not None and self._listener.make_room(cost)

    def notify_when_space(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once, soon after budget is next given back.

        For producers that pause instead of dropping (backpressure).  Waiters
        are called in the order they asked, from the reactor (never from
        inside ``release``), so a waiter may offer documents straight away.
        A waiter that still finds no room asks again.
        """
        self._space_waiters.append(callback)

    def cancel_notify(self, callback: Callable[[], object]) -> None:
        """Forget a waiter registered with ``notify_when_space`` (if still waiting)."""
        waiters = self._space_waiters
        while callback in waiters:
            waiters.remove(callback)

    def _space_freed(self) -> None:
        # Deferred to the reactor: release() runs inside the batcher's
        # bookkeeping, which must not see new documents arrive half-way.
        if self._space_waiters and self._space_call is None:
            self._space_call = self._clock.callLater(0, self._wake_waiters)

    def _wake_waiters(self) -> None:
        self._space_call = None
        waiters, self._space_waiters = self._space_waiters, []
        for callback in waiters:
            try:
                callback()
            except Exception:
                # One broken waiter must not leave the others paused forever.
                self.log.failure("Error while resuming a producer paused by a full buffer")

    def offer(self, doc: bytes) -> bool:
        """Accept ``doc`` if the budget allows; False means it was dropped (counted)."""
        cost = len(doc) + DOC_OVERHEAD
        if self.used + cost > self.capacity and (
            # Full: the listener may move waiting batches elsewhere (a disk spool).
            self._listener is None or not self._listener.make_room(cost)
        ):
            # Lost (the listener counted and logged it) or spillover (counted here).
            self.refused_lost = self._listener is not None and self._listener.refused()
            if not self.refused_lost:
                self._counters.spillover += 1
            return False
        self.used += cost
        self.queued_docs += 1
        batch = self._open
        if batch is None:
            since = self.arrived_since
            batch = self._open = Batch(self._clock.seconds() if since is None else since)
            self._batches.append(batch)
            if self._listener is not None:
                self._listener.batch_opened(batch)
        batch.docs.append(doc)
        batch.nbytes += cost
        if len(batch.docs) >= self.batch_size:
            self._open = None
            if self._listener is not None:
                self._listener.batch_filled()
        return True

    @property
    def open_batch(self) -> Batch | None:
        """The batch new documents go to (None: the next document opens one)."""
        return self._open

    def head(self) -> Batch | None:
        """The oldest waiting batch, without removing it."""
        return self._batches[0] if self._batches else None

    def pop(self) -> Batch:
        """Remove the oldest batch for upload; its bytes stay charged."""
        batch = self._batches.popleft()
        if batch is self._open:
            self._open = None
        self.queued_docs -= len(batch.docs)
        return batch

    def release(self, batch: Batch) -> None:
        """The batch's upload is over: give its bytes back to the budget."""
        self.used -= batch.nbytes
        if self._space_waiters:
            self._space_freed()

    def shrink(self, batch: Batch, keep: list[bytes]) -> Batch | None:
        """Release every document of ``batch`` except ``keep``.

        Returns a batch of the kept documents (still charged, same attempt
        count), or None when nothing is kept.
        """
        if not keep:
            self.release(batch)
            return None
        kept = Batch(batch.started)
        kept.docs = keep
        kept.nbytes = sum(len(doc) for doc in keep) + DOC_OVERHEAD * len(keep)
        kept.attempts = batch.attempts
        self.used -= batch.nbytes - kept.nbytes
        if self._space_waiters:
            self._space_freed()
        return kept

    def split(self, batch: Batch) -> tuple[Batch, Batch]:
        """Two halves of ``batch`` (at least 2 documents), charged together as it was."""
        half = len(batch.docs) // 2
        first, second = Batch(batch.started), Batch(batch.started)
        first.docs, second.docs = batch.docs[:half], batch.docs[half:]
        # A batch replayed from the spool is not charged (nbytes 0): nor are its halves.
        if batch.nbytes:
            first.nbytes = sum(len(doc) for doc in first.docs) + DOC_OVERHEAD * half
            second.nbytes = batch.nbytes - first.nbytes
        first.attempts = second.attempts = batch.attempts
        return first, second

    def drain(self) -> list[Batch]:
        """Remove every waiting batch (shutdown); their bytes stay charged."""
        batches = list(self._batches)
        self._batches.clear()
        self._open = None
        self.queued_docs = 0
        return batches

    def __len__(self) -> int:
        """Number of waiting batches."""
        return len(self._batches)

    # -- sharing the budget, batches closed early (the OTLP span buffer) ----

    def lend(self, nbytes: int) -> bool:
        """Let another buffer use ``nbytes`` of this budget, if that much is free.

        The budget shrinks by ``nbytes`` until ``repay`` gives it back, so
        documents offered here and the other buffer's never hold more than
        the one budget together, and ``offer`` stays as cheap as it was.
        """
        if self.used + nbytes > self.capacity:
            return False
        self.capacity -= nbytes
        return True

    def repay(self, nbytes: int) -> None:
        """Give back budget lent with ``lend`` (wakes producers waiting for room)."""
        self.capacity += nbytes
        if self._space_waiters:
            self._space_freed()

    def close_batch(self) -> None:
        """The next document starts a new batch (the open one is full by another measure)."""
        self._open = None
