"""Uploading span batches to X-Ray's OTLP endpoint (``<endpoint>/v1/traces``).

``OtlpUploader.send`` is the span batcher's send function, the counterpart
of ``Uploader.put_trace_segments``: it joins a batch of framed OTLP requests
(``otlp_batches``) into one request (protobuf requests concatenate into a
valid request; a JSON request always travels alone), optionally gzips it
(in the reactor's thread pool from ``THREAD_BYTES`` on; uploads still
start in the order asked for), signs it for service ``xray`` on the same
host, partition, FIPS and dual-stack rules as PutTraceSegments, and returns an ``Outcome`` the
batcher acts on exactly as for segments: 429/503/5xx, throttling and
connection errors are retried, spooled and drained; a 400/413 refusal of a
batch's content is halved down to the request X-Ray refuses, then dropped
with a log line quoting X-Ray; a 415 or 422 (which an OTLP endpoint may
give for content it cannot take) is final at once.  404, 405, 411 and 414
are a misconfiguration, retried as for segments.  It never fails its
Deferred.

Spans are counted here (the batcher counts requests): a 200 answer's
``partial_success`` rejections are counted as rejected and logged once in a
while with X-Ray's message, and not retried (X-Ray has decided); so are the
spans of a request X-Ray refuses for good.  When X-Ray refuses because
CloudWatch Transaction Search is not enabled (the OTLP endpoint only takes
spans into CloudWatch Logs), the error says so in plain words and the
batch is not split: no request of it would be taken.
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from xraytwisted.ingest import otlp_wire
from xraytwisted.observe.counters import OtlpCounters
from xraytwisted.observe.logs import Throttle, printable
from xraytwisted.pipeline.batcher import SPLIT_CODES, SPLIT_STATUSES
from xraytwisted.pipeline.offload import THREAD_BYTES, Runner
from xraytwisted.pipeline.otlp_batches import (
    CONTENT_TYPES,
    FRAME,
    KIND_JSON,
    KIND_PROTOBUF,
    spans_in,
)
from xraytwisted.pipeline.uploader import (
    Outcome,
    SignedUploader,
    UploadError,
    classify_response,
)

TRACES_PATH = "/v1/traces"
GZIP_LEVEL = 1  # ~4x smaller for spans at ~8 ms per MB; higher levels gain little more
TRANSACTION_SEARCH = "TransactionSearchNotEnabled"  # our code for that refusal
# Words X-Ray's answer uses when the account does not send spans to
# CloudWatch Logs (Transaction Search off), compared without spaces or case.
_TRANSACTION_SEARCH_WORDS = (
    "transactionsearch",
    "tracesegmentdestination",
    "cloudwatchlogsdestination",
)
_RPC_STATUS_MESSAGE = 2  # google.rpc.Status.message
# Unlike PutTraceSegments (whose content verdicts are 400 with a code, or
# 413), an OTLP endpoint may answer an unsupported or unprocessable request
# with these: about the content, so sending it again cannot help.  (404,
# 405, 411, 414 stay a misconfiguration: retried.)
OTLP_CONTENT_STATUSES = frozenset({415, 422})


@dataclass(frozen=True)
class TracesOutcome(Outcome):
    """An Outcome with what a 200 answer's ``partial_success`` said."""

    rejected_spans: int = 0
    rejected_message: str = ""


def rpc_status_message(data: bytes) -> str:
    """The ``message`` of a serialized google.rpc.Status ("" if there is none)."""
    try:
        for number, wire, start, end in otlp_wire.fields(data):
            if number == _RPC_STATUS_MESSAGE and wire == otlp_wire.LEN:
                return data[start:end].decode("utf-8", "replace")
    except otlp_wire.WireError:
        pass
    return ""


def json_partial_success(data: bytes) -> tuple[int, str]:
    """(rejected spans, error message) of an OTLP/JSON ExportTraceServiceResponse."""
    try:
        document = json.loads(data) if data.strip() else {}
    except ValueError:
        return 0, ""
    partial = document.get("partialSuccess") if isinstance(document, dict) else None
    if not isinstance(partial, dict):
        return 0, ""
    try:
        # int64 fields are strings in proto3 JSON; numbers are accepted too.
        rejected = max(0, int(partial.get("rejectedSpans") or 0))
    except (TypeError, ValueError):
        rejected = 0
    return rejected, str(partial.get("errorMessage") or "")


def transaction_search_refusal(message: str) -> bool:
    squeezed = "".join(message.split()).lower()
    return any(word in squeezed for word in _TRANSACTION_SEARCH_WORDS)


def classify_traces_response(status: int, headers: Mapping[str, str], body: bytes) -> UploadError:
    """An error answer of the OTLP endpoint, classified as PutTraceSegments errors are."""
    if "protobuf" in headers.get("content-type", ""):
        # OTLP servers answer errors with a google.rpc.Status: a 400 with one
        # is the endpoint refusing this content, which halving can isolate.
        text = rpc_status_message(body)
        document = {"message": text} if text else {}
        if text and status == 400 and not headers.get("x-amzn-errortype"):
            document["__type"] = "ValidationException"
        body = json.dumps(document).encode() if document else b""
    error = classify_response(
        status,
        headers,
        body,
        api="span uploads (/v1/traces)",
        items="spans",
        content_statuses=OTLP_CONTENT_STATUSES,
    )
    if 400 <= status < 500 and transaction_search_refusal(error.message):
        return replace(
            error,
            retryable=False,
            throttled=False,
            code=TRANSACTION_SEARCH,
            message=(
                "enable CloudWatch Transaction Search: X-Ray's OTLP endpoint takes spans only "
                "once Transaction Search is on for this account and region (CloudWatch console, "
                "or aws xray update-trace-segment-destination --destination CloudWatchLogs); "
                f"X-Ray said: {error.message}"
            ),
        )
    return error


Headers = tuple[tuple[str, str], ...]


@dataclass(eq=False)
class _Start:
    """An upload waiting for its gzipped body, or for the uploads queued before it."""

    headers: Headers
    content_type: str
    packed: bytes | Failure | None = None  # None: still being gzipped
    post: Deferred[Outcome] | None = None  # once started

    def __post_init__(self) -> None:
        self.result: Deferred[Outcome] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[Outcome]) -> None:
        # Before its POST it stays queued until its gzip ends, and is then
        # skipped (the thread cannot be stopped, and holding up the uploads
        # after it for less would start them out of order).
        if self.post is not None:
            self.post.cancel()


def _will_be_split(error: UploadError, docs: int) -> bool:
    """Whether the batcher halves a batch refused with ``error`` (see batcher.SPLIT_*)."""
    return (
        not error.retryable
        and docs > 1
        and (error.status in SPLIT_STATUSES or (error.status == 400 and error.code in SPLIT_CODES))
    )


class OtlpUploader(SignedUploader):
    """Signs and sends span batches to ``<endpoint>/v1/traces``."""

    log = Logger()

    def __init__(
        self,
        *,
        counters: OtlpCounters,
        gzip: bool = True,
        run_in_thread: Runner | None = None,
        thread_bytes: int = THREAD_BYTES,
        **signing: Any,
    ) -> None:
        # run_in_thread: where bodies of thread_bytes or more are gzipped;
        # None: all of them here, inline.  signing: SignedRequests' arguments.
        super().__init__(**signing)
        self.counters = counters
        self.gzip = gzip
        self.thread_bytes = thread_bytes
        self._run = run_in_thread
        # Uploads not started yet, in the order they were asked for: a POST
        # starts once its body is gzipped and every upload before it started.
        self._starting: deque[_Start] = deque()
        self._throttle = Throttle(self.clock, 10.0)

    # -- the span batcher's send function ------------------------------------

    def send(self, docs: Sequence[bytes]) -> Deferred[Outcome]:
        kinds = {FRAME.unpack_from(doc)[0] for doc in docs}
        if len(kinds) > 1 or (KIND_JSON in kinds and len(docs) > 1):
            # SpanBuffer never builds such a batch; should one appear, the
            # batcher halves it until each JSON request is alone.
            return defer.succeed(
                Outcome(
                    0.0,
                    error=UploadError(
                        "",
                        retryable=False,
                        throttled=False,
                        message="JSON requests travel alone",
                        status=400,
                        code="SerializationException",
                    ),
                )
            )
        kind = kinds.pop() if kinds else KIND_PROTOBUF
        body = b"".join([memoryview(doc)[FRAME.size :] for doc in docs])
        d = self.put_otlp_traces(body, CONTENT_TYPES[kind])
        return d.addCallback(self._count, docs)

    def _count(self, outcome: Outcome, docs: Sequence[bytes]) -> Outcome:
        counters = self.counters
        spans = spans_in(list(docs))
        error = outcome.error
        if error is None:
            rejected = 0
            if isinstance(outcome, TracesOutcome):
                rejected = min(outcome.rejected_spans, spans)
                if rejected or outcome.rejected_message:
                    self._partial(spans, rejected, outcome.rejected_message)
            counters.spans_sent += spans - rejected
            counters.spans_rejected += rejected
        elif not error.retryable and not _will_be_split(error, len(docs)):
            counters.spans_rejected += spans
        return outcome

    def _partial(self, spans: int, rejected: int, message: str) -> None:
        suppressed = self._throttle.check("partial success")
        if suppressed is None:
            return
        note = f" ({suppressed} similar answers not logged)" if suppressed else ""
        self.log.warn(
            "X-Ray accepted {accepted} of {spans} spans and rejected {rejected}; they are not "
            "sent again: {detail}{note}",
            accepted=spans - rejected,
            spans=spans,
            rejected=rejected,
            detail=printable(message.encode(), 300) or "(no message)",
            note=note,
        )

    # -- one signed request ----------------------------------------------------

    def put_otlp_traces(self, body: bytes, content_type: str) -> Deferred[Outcome]:
        """POST one ExportTraceServiceRequest; never fails (every result is an Outcome).

        Cancelling it before its POST started (its body still being gzipped
        in a thread) fails it with CancelledError: nothing was sent.
        """
        if not self.gzip:
            return self._post(body, (("Content-Type", content_type),), content_type)
        headers = (("Content-Type", content_type), ("Content-Encoding", "gzip"))
        threaded = self._run is not None and len(body) >= self.thread_bytes
        if not threaded and not self._starting:
            return self._post(gzip_body(body), headers, content_type)
        start = _Start(headers, content_type)
        self._starting.append(start)
        if self._run is not None and threaded:
            self._run(lambda: gzip_body(body)).addBoth(self._packed, start)
        else:
            self._packed(gzip_body(body), start)  # small, but after one still in a thread
        return start.result

    def _packed(self, packed: bytes | Failure, start: _Start) -> None:
        start.packed = packed
        starting = self._starting
        while starting and starting[0].packed is not None:
            first = starting.popleft()
            if first.result.called:
                continue  # cancelled
            result = first.packed
            if isinstance(result, Failure):
                # (Out of memory, say.) Retried, as a failed upload is.
                error = UploadError(
                    "", True, False, f"gzipping the request failed: {result.getErrorMessage()}"
                )
                first.result.callback(Outcome(0.0, error=error))
                continue
            assert result is not None
            first.post = self._post(result, first.headers, first.content_type)
            first.post.chainDeferred(first.result)

    def _post(self, body: bytes, headers: Headers, content_type: str) -> Deferred[Outcome]:
        d = self.requests.post(TRACES_PATH, body, headers, classify=classify_traces_response)
        return d.addCallback(self._traces_outcome, content_type)

    def _traces_outcome(self, result: Outcome | tuple[float, bytes], content_type: str) -> Outcome:
        if isinstance(result, Outcome):
            return result
        seconds, body = result
        if content_type == CONTENT_TYPES[KIND_JSON]:
            rejected, message = json_partial_success(body)
        else:
            try:
                rejected, message = otlp_wire.partial_success(body)
            except otlp_wire.WireError:
                rejected, message = 0, ""
        return TracesOutcome(seconds, rejected_spans=rejected, rejected_message=message)


def gzip_body(body: bytes) -> bytes:
    """``body`` in gzip format (fast level: spans compress well at any level)."""
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return packer.compress(body) + packer.flush()
