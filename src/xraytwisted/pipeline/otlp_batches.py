"""OTLP requests in the shared pipeline: framing, the span buffer, reworded logs.

The span pipeline is a second buffer -> batcher -> uploader -> spool chain
made of the same classes as the segment one; its unit ("document") is one
OTLP trace request as an SDK exported it, framed with what the upload needs
to know without parsing it again::

    kind   u8    1 = protobuf (application/x-protobuf), 2 = JSON (application/json)
    spans  u32   spans in the request (little-endian)
    the request body, exactly as received (decompressed)

The frame travels through the spool unchanged, so a replayed batch still
knows its API, its content type and its span count.  Every span spool
record ever written holds frames, so no record lacks the count.

``SpanTally`` counts spans where the batcher and the spool count requests
(spooled, replayed, lost), reading the count from the frames of the batch
in hand: nothing on the receiving path changes.  A request lost inside the
spool without being read (its oldest file dropped because the spool is
full, a corrupt record) is weighed from what the spool tracked for the
files this run wrote; for a file from an earlier run (opening a spool reads
only record headers) or a record that could not be read, its spans are not
known and it is counted in ``OtlpCounters.lost_requests_spans_unknown``.

``SpanBuffer`` closes a batch before it would exceed what X-Ray's OTLP
endpoint takes in one request (5 MB, 10 000 spans); a JSON request, which
cannot be concatenated with another, is a batch of its own.  Its memory is
lent by the segment buffer (``SegmentBuffer.lend``): both together never
hold more than the one ``-m`` budget, and the segment path does not change.

``SpanBatcher`` and ``SpanSpool`` are the ordinary batcher and spool; only
their log lines say "OTLP requests" where the segment ones say "segments".
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, globalLogPublisher
from zope.interface import implementer

from xraytwisted.ingest.otlp_wire import MAX_REQUEST_BYTES, MAX_SPANS_PER_REQUEST
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import DOC_OVERHEAD, Batch, BufferListener, SegmentBuffer
from xraytwisted.pipeline.spool import Spool

KIND_PROTOBUF = 1
KIND_JSON = 2
CONTENT_TYPES = {KIND_PROTOBUF: "application/x-protobuf", KIND_JSON: "application/json"}
FRAME = struct.Struct("<BI")


def frame(kind: int, spans: int, body: bytes) -> bytes:
    """One pipeline document for an OTLP request of ``spans`` spans."""
    return FRAME.pack(kind, spans) + body


def unframe(doc: bytes) -> tuple[int, int, memoryview]:
    """(kind, spans, body) of a framed document (the body is not copied)."""
    kind, spans = FRAME.unpack_from(doc)
    return kind, spans, memoryview(doc)[FRAME.size :]


def spans_in(docs: Sequence[bytes]) -> int:
    return sum(FRAME.unpack_from(doc)[1] for doc in docs)


class SpanTally:
    """The span pipeline's ``Tally``: spans spooled, replayed and lost, in ``OtlpCounters``."""

    def __init__(self, counters: OtlpCounters) -> None:
        self.counters = counters

    def weigh(self, docs: Sequence[bytes]) -> int:
        return spans_in(docs)

    def spooled(self, weight: int) -> None:
        self.counters.spans_spooled += weight

    def replayed(self, weight: int) -> None:
        self.counters.spans_replayed += weight

    def lost(self, docs: int, weight: int | None) -> None:
        if weight is None:
            self.counters.lost_requests_spans_unknown += docs
        else:
            self.counters.spans_lost += weight

    def describe(self, docs: int, weight: int, unknown: int) -> str:
        if docs <= 0:
            return ""
        if unknown <= 0:
            return f" ({weight} spans)"
        if unknown >= docs:
            return " (an unknown number of spans)"
        return f" ({weight} spans, and those of {unknown} more whose spans are not known)"


class SpanBuffer(SegmentBuffer):
    """Accepted OTLP requests, in batches X-Ray's OTLP endpoint takes in one request.

    Offer framed documents (``frame``).  The budget is borrowed from
    ``lender`` (the segment buffer) document by document and given back when
    their upload is over; when none is left the listener (the span batcher)
    may move waiting batches to its spool, as for segments, and otherwise
    the request is refused (counted as spillover in ``counters``).
    """

    def __init__(
        self,
        lender: SegmentBuffer,
        clock: IReactorTime,
        counters: Counters,
        *,
        max_batch_bytes: int = MAX_REQUEST_BYTES,
        max_batch_spans: int = MAX_SPANS_PER_REQUEST,
    ) -> None:
        # Every request holds at least one span, so a batch reaches the span
        # limit before batch_size documents.
        super().__init__(lender.capacity, clock, counters, batch_size=max_batch_spans)
        self._lender = lender
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_spans = max_batch_spans
        self._span_listener: BufferListener | None = None
        self._tracked: Batch | None = None  # the open batch the two sums below are for
        self._open_bytes = 0  # request bytes (unframed) in the open batch
        self._open_spans = 0

    def attach(self, listener: BufferListener) -> None:
        self._span_listener = listener
        super().attach(listener)

    def offer(self, doc: bytes) -> bool:
        kind, spans = FRAME.unpack_from(doc)
        size = len(doc) - FRAME.size
        cost = len(doc) + DOC_OVERHEAD
        if not self._lender.lend(cost):
            listener = self._span_listener
            # Full: the batcher may park waiting span batches on disk (each
            # one parked gives its budget back), then ask again.
            if listener is None or not listener.make_room(cost) or not self._lender.lend(cost):
                self._counters.spillover += 1
                return False
        current = self.open_batch
        if current is not self._tracked:
            self._tracked, self._open_bytes, self._open_spans = current, 0, 0
        if current is not None and (
            kind == KIND_JSON
            or self._open_bytes + size > self.max_batch_bytes
            or self._open_spans + spans > self.max_batch_spans
        ):
            self.close_batch()
        if not super().offer(doc):  # pragma: no cover - the lend above made room
            self._lender.repay(cost)
            return False
        batch = self.open_batch
        if batch is not self._tracked:
            self._tracked, self._open_bytes, self._open_spans = batch, 0, 0
        self._open_bytes += size
        self._open_spans += spans
        if kind == KIND_JSON:
            self.close_batch()  # JSON requests cannot be concatenated: each goes alone
        return True

    def release(self, batch: Batch) -> None:
        before = self.used
        super().release(batch)
        self._lender.repay(before - self.used)

    def shrink(self, batch: Batch, keep: list[bytes]) -> Batch | None:
        if not keep:
            self.release(batch)
            return None
        before = self.used
        kept = super().shrink(batch, keep)
        self._lender.repay(before - self.used)
        return kept


# ---------------------------------------------------------------------------
# The batcher's and the spool's log lines, for spans

_WORDING = (
    ("segment {id} of trace {trace}", "OTLP request"),
    ("segment batch", "OTLP batch"),
    ("segments", "OTLP requests"),
    ("segment", "OTLP request"),
)


def reword(text: str) -> str:
    """A segment pipeline log format, said of OTLP requests."""
    for old, new in _WORDING:
        text = text.replace(old, new)
    return text


@implementer(ILogObserver)
class _Reworded:
    """Forwards events to the global publisher with their wording changed."""

    def __call__(self, event: LogEvent) -> None:
        text = event.get("log_format")
        if isinstance(text, str):
            event = {**event, "log_format": reword(text)}
        globalLogPublisher(event)


_REWORDED = _Reworded()


class SpanBatcher(Batcher):
    """The batcher of the span pipeline: the same logic, its own log wording."""

    log = Logger(observer=_REWORDED)


class SpanSpool(Spool):
    """The spool of the span pipeline (its own directory): the same, reworded."""

    log = Logger(observer=_REWORDED)
