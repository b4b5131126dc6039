"""The daemon's counters: one object, passed to whoever counts.

Plain integer attributes, because incrementing one is the cheapest thing
Python can do on the per-segment path.  Totals only ever grow; telemetry
records and metrics take differences between snapshots.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Backend error classes, as PutTelemetryRecords names them.
ERROR_CLASSES = (
    "TimeoutCount",
    "ConnectionRefusedCount",
    "HTTPCode4XXCount",
    "HTTPCode5XXCount",
    "UnknownHostCount",
    "OtherCount",
)


@dataclass
class Counters:
    received: int = 0  # datagrams / stream records that arrived (valid or not)
    received_bytes: int = 0
    rejected: int = 0  # bad header, missing body, or refused by X-Ray as unprocessable
    spillover: int = 0  # accepted-size documents refused because the buffer was full
    sent: int = 0  # documents X-Ray accepted
    unprocessed: int = 0  # documents X-Ray returned in UnprocessedTraceSegments
    lost: int = 0  # accepted documents given up on (e.g. shutdown deadline)
    retried: int = 0  # documents sent again after a failed attempt
    batches_ok: int = 0
    batches_failed: int = 0  # upload attempts that failed (each may be retried)
    backend_errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_CLASSES, 0))

    def snapshot(self) -> Counters:
        copy = dataclasses.replace(self)
        copy.backend_errors = dict(self.backend_errors)
        return copy
