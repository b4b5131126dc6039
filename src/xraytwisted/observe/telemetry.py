"""PutTelemetryRecords: the daemon's own counters, reported to X-Ray every interval.

Same schedule and limits as the Go daemon 3.6: once the first segment has
arrived, every ``interval`` seconds one record (the counter *differences*
since the previous one) is queued; at most 30 records are kept (the oldest
are dropped) and they are sent 10 per call; records of a failed call are
queued again.  A final, partial record goes out when the service stops.

Unlike the Go daemon 3.6, whose ``BackendConnectionErrors`` are always zero
(it looks for the wrong SDK error type), the error classes here are the ones
the uploader assigns to every failed PutTraceSegments attempt.

Spans of the OTLP bridge are not segments and are not in the Segments*
counts (the record has no field for them; /metrics and /health have
them).  Only the span uploads' failures to reach X-Ray at all
(``LINK_ERRORS``: timeouts, refused connections, unknown host) are added to
``BackendConnectionErrors``: both pipelines talk to the same X-Ray host, so
an operator reading that field sees the link trouble whichever API met it.
HTTP error answers of the OTLP endpoint (Transaction Search off, spans
refused) are about spans, not the connection, and stay out.

The record and request body are built by pure functions; the service only
does the scheduling and sending.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from xraytwisted.observe.counters import ERROR_CLASSES, Counters
from xraytwisted.observe.logs import Throttle, suppressed_note
from xraytwisted.pipeline.uploader import Outcome

PATH = "/TelemetryRecords"
MAX_QUEUED = 30  # records kept while they cannot be sent (Go: a 30-slot channel)
PER_CALL = 10  # records per PutTelemetryRecords call (Go sends at most 10)
FINAL_SEND_TIMEOUT = 5.0  # seconds stopService waits for the final record

# PutTelemetryRecords field limits (characters).
MAX_INSTANCE_ID = 20
MAX_HOSTNAME = 255
MAX_RESOURCE_ARN = 500

Record = dict[str, Any]
SendResult = Outcome | tuple[float, bytes]
Send = Callable[[str, bytes], "Deferred[SendResult]"]
# Error classes of failures to reach X-Ray at all (no HTTP answer): the span
# uploads' ones join BackendConnectionErrors.
LINK_ERRORS = ("TimeoutCount", "ConnectionRefusedCount", "UnknownHostCount")


# ---------------------------------------------------------------------------
# Pure parts


def telemetry_record(
    before: Counters,
    after: Counters,
    timestamp: float,
    *,
    spans_before: Mapping[str, int] | None = None,
    spans_after: Mapping[str, int] | None = None,
) -> Record:
    """One TelemetryRecord: what happened between two counter snapshots.

    ``SegmentsSpilloverCount`` includes documents given up on (``lost``:
    shutdown deadline, full spool) as well as those refused by a full
    buffer, as the Go daemon counts the batches it drops when its queue is
    full: either way accepted-size data was dropped for lack of room or
    time.  With that, received = sent + rejected + spillover + still waiting.

    ``spans_before``/``spans_after`` are the OTLP span uploads'
    ``backend_errors`` at the same two moments: their ``LINK_ERRORS`` are
    added to ``BackendConnectionErrors``.
    """
    errors = {
        name: after.backend_errors.get(name, 0) - before.backend_errors.get(name, 0)
        for name in ERROR_CLASSES
    }
    if spans_before is not None and spans_after is not None:
        for name in LINK_ERRORS:
            errors[name] += spans_after.get(name, 0) - spans_before.get(name, 0)
    spilled = (after.spillover - before.spillover) + (after.lost - before.lost)
    return {
        "BackendConnectionErrors": errors,
        "SegmentsReceivedCount": after.received - before.received,
        "SegmentsRejectedCount": after.rejected - before.rejected,
        "SegmentsSentCount": after.sent - before.sent,
        "SegmentsSpilloverCount": spilled,
        # Epoch seconds with millisecond decimals, as the Go daemon sends it.
        "Timestamp": round(timestamp, 3),
    }


def request_body(
    records: Sequence[Mapping[str, Any]],
    *,
    instance_id: str = "",
    hostname: str = "",
    resource_arn: str = "",
) -> bytes:
    """The PutTelemetryRecords JSON body; empty strings are sent as they are."""
    document = {
        "EC2InstanceId": instance_id[:MAX_INSTANCE_ID],
        "Hostname": hostname[:MAX_HOSTNAME],
        "ResourceARN": resource_arn[:MAX_RESOURCE_ARN],
        "TelemetryRecords": list(records),
    }
    # Sorted keys: byte for byte what the Go daemon sends (its JSON encoder
    # sorts map keys, and its struct fields happen to be in that order).
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------
# The service


class TelemetryService(Service):
    """Queues a record every ``interval`` seconds and sends the queue with ``send``."""

    log = Logger()

    def __init__(
        self,
        *,
        send: Send,
        counters: Counters,
        clock: IReactorTime,
        interval: float,
        hostname: str = "",
        instance_id: str = "",
        resource_arn: str = "",
        final_timeout: float = FINAL_SEND_TIMEOUT,
        span_uploads: Counters | None = None,
    ) -> None:
        self._send = send
        self._counters = counters
        # The OTLP bridge's pipeline counters (None: it is off): its link errors count too.
        self._span_uploads = span_uploads
        self._last_span_errors: dict[str, int] = {}
        self._clock = clock
        self.interval = interval
        self.hostname = hostname
        self.instance_id = instance_id
        self.resource_arn = resource_arn
        self.final_timeout = final_timeout
        self.queue: list[Record] = []  # oldest first
        self._last: Counters | None = None  # snapshot the next record starts from
        self._timer: IDelayedCall | None = None
        self._in_flight: Deferred[SendResult] | None = None
        self._flushing: Deferred[None] | None = None  # the running _flush loop
        self._gave_up = False  # past the final-send bound: make no more calls
        # A 4xx here is usually a missing xray:PutTelemetryRecords permission:
        # worth one warning now and then, not one per minute.
        self._warn_throttle = Throttle(clock, 3600.0)

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    # -- lifecycle --------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        if not self.enabled:
            self.log.debug("Telemetry disabled (Telemetry.IntervalSeconds is 0)")
            return
        for name, value, limit in (
            ("EC2InstanceId", self.instance_id, MAX_INSTANCE_ID),
            ("Hostname", self.hostname, MAX_HOSTNAME),
            ("ResourceARN", self.resource_arn, MAX_RESOURCE_ARN),
        ):
            if len(value) > limit:
                self.log.warn(
                    "Telemetry {name} is longer than the {limit} characters X-Ray accepts; "
                    "sending its first {limit} characters",
                    name=name,
                    limit=limit,
                )
        self._gave_up = False
        self._last = self._counters.snapshot()
        self._last_span_errors = self._span_errors()
        self.log.debug("Telemetry initiated (every {interval:g} seconds)", interval=self.interval)
        self._schedule()

    def stopService(self) -> Deferred[None]:
        """Send a final, partial record; fires when done or after ``final_timeout``."""
        super().stopService()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.enabled or self._last is None:
            return succeed(None)
        self._cut()
        if not self.queue and self._flushing is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def give_up() -> None:
            # Never hold up shutdown for telemetry: abandon the call (the
            # uploader reports the cancel as an ordinary failed Outcome).
            self.log.debug(
                "Telemetry: final records not sent within {timeout:g} seconds; giving up",
                timeout=self.final_timeout,
            )
            self._gave_up = True
            if self._in_flight is not None:
                self._in_flight.cancel()
            if not done.called:
                done.callback(None)

        deadline = self._clock.callLater(self.final_timeout, give_up)

        def finished(_: object) -> None:
            if deadline.active():
                deadline.cancel()
            if not done.called:
                done.callback(None)

        # A flush may still be running from the last cycle: let it finish,
        # then send whatever it left (including the final record).
        running = self._flushing
        if running is None:
            self._flush().addBoth(finished)
        else:
            running.addBoth(lambda _: self._flush().addBoth(finished))
        return done

    # -- the cycle --------------------------------------------------------

    def _schedule(self) -> None:
        self._timer = self._clock.callLater(self.interval, self._cycle)

    def _cycle(self) -> None:
        self._timer = None
        if self._counters.received == 0:
            self.log.debug("Skipped telemetry data as no segments found")
            self._cut()  # (only forgets this interval's span upload errors)
        else:
            self._cut()
            if self._flushing is None:
                self._flush()
        self._schedule()

    def _cut(self) -> None:
        """Queue a record for the time since the last one (once segments have arrived)."""
        last = self._last
        if last is None:
            return
        span_errors = self._span_errors()
        if self._counters.received == 0:
            # No record (as the Go daemon, none before the first segment):
            # span upload errors of this time are not reported, rather than
            # all landing in the first record, as if they had just happened.
            self._last_span_errors = span_errors
            return
        now = self._counters.snapshot()
        self.queue.append(
            telemetry_record(
                last,
                now,
                self._clock.seconds(),
                spans_before=self._last_span_errors,
                spans_after=span_errors,
            )
        )
        self._last = now
        self._last_span_errors = span_errors
        self._truncate()

    def _span_errors(self) -> dict[str, int]:
        spans = self._span_uploads
        return dict(spans.backend_errors) if spans is not None else {}

    def _truncate(self) -> None:
        excess = len(self.queue) - MAX_QUEUED
        if excess > 0:
            del self.queue[:excess]
            self.log.debug("Telemetry Buffers truncated")

    # -- sending ----------------------------------------------------------

    def _flush(self) -> Deferred[None]:
        """Send the queue, ``PER_CALL`` records at a time, until empty or a call fails."""
        done: Deferred[None] = Deferred()
        self._flushing = done

        def finish() -> None:
            self._flushing = None
            done.callback(None)

        def next_call() -> None:
            if not self.queue or self._gave_up:
                finish()
                return
            chunk = self.queue[:PER_CALL]
            del self.queue[:PER_CALL]
            body = request_body(
                chunk,
                instance_id=self.instance_id,
                hostname=self.hostname,
                resource_arn=self.resource_arn,
            )
            d = self._in_flight = self._send(PATH, body)
            d.addBoth(answered, chunk)

        def answered(result: SendResult | Failure, chunk: list[Record]) -> None:
            self._in_flight = None
            problem = _problem(result)
            if problem is None:
                self.log.debug("Send {count} telemetry record(s)", count=len(chunk))
                next_call()
                return
            self.queue[:0] = chunk
            self._truncate()
            self.log.debug(
                "Failed to send telemetry {count} record(s). Re-queue records. {error}",
                count=len(chunk),
                error=problem,
            )
            self._warn_about(result, problem)
            # Stop here: the rest waits for the next cycle rather than
            # hammering an endpoint that just failed.
            finish()

        next_call()
        return done

    def _warn_about(self, result: SendResult | Failure, problem: str) -> None:
        error = result.error if isinstance(result, Outcome) else None
        if error is None or error.error_class != "HTTPCode4XXCount" or error.throttled:
            return  # outages and throttling: the segment uploads already say so
        suppressed = self._warn_throttle.check(error.code or str(error.status))
        if suppressed is None:
            return
        self.log.warn(
            "Telemetry records were refused: {problem}. Allow xray:PutTelemetryRecords for the "
            "daemon's role, or set Telemetry.IntervalSeconds to 0 to turn telemetry off{note}",
            problem=problem,
            note=suppressed_note(suppressed),
        )


def _problem(result: SendResult | Failure) -> str | None:
    """None when the call succeeded, else what went wrong."""
    if isinstance(result, Failure):
        return f"{type(result.value).__name__}: {result.value}"
    if isinstance(result, Outcome):
        return result.error.message if result.error is not None else "no response"
    return None
