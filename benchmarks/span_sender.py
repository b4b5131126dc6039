"""An OTLP/HTTP span sender at a fixed rate, shaped like the OpenTelemetry SDK.

Spans end at ``rate`` per second, paced in slices as ``benchmarks.sender``
paces segments (each slice ends every span that is due by the elapsed time,
so the rate is exact however late ``sleep`` returns).  Ended spans queue as
in the SDK's ``BatchSpanProcessor`` with its defaults: a request is sent as
soon as ``batch`` (512) spans are queued, or ``delay`` (5 s) after the last
export when fewer are, and what is left at the end is flushed as
``shutdown()`` does.  Each request is one protobuf ``ExportTraceServiceRequest``
(``benchmarks.spans``) POSTed to ``/v1/traces`` over one keep-alive HTTP/1.1
connection, waiting for the answer as the SDK's exporter does; spans keep
ending meanwhile.  Every span carries the time its request was built (just
before its POST) for the sink to measure latency from.

Run on its own (``python -m benchmarks.span_sender --port P --rate R``) it
prints one JSON line: spans the daemon took (200) and refused, requests,
over how long, its own CPU, and how long the daemon took to answer.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.spans import DEFAULT_SIZE, SpanFactory
from benchmarks.stats import percentile

BATCH = 512  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE
DELAY = 5.0  # OTEL_BSP_SCHEDULE_DELAY, seconds
TIMEOUT = 10.0  # OTEL_EXPORTER_OTLP_TIMEOUT, seconds


@dataclass
class SpanSendResult:
    first_seq: int
    sent: int  # spans in requests the daemon answered 200
    refused: int  # spans in requests answered otherwise, or whose POST failed
    requests: int
    statuses: dict[str, int]  # answers by status ("error" for a failed connection)
    bytes: int  # request bodies, as sent
    started: float  # wall clock, first span ended
    seconds: float  # from the first span's end to the last answer
    cpu_seconds: float  # this process, during the send loop
    answer_ms_p50: float  # POST to answer
    answer_ms_p99: float
    answer_ms_max: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


class Exporter:
    """POSTs requests over one keep-alive connection; reconnects after a failure."""

    def __init__(self, host: str, port: int, compress: bool) -> None:
        self.host, self.port, self.compress = host, port, compress
        self.conn: http.client.HTTPConnection | None = None
        self.headers = {"Content-Type": "application/x-protobuf", "User-Agent": "bench-otlp/1.0"}
        if compress:
            self.headers["Content-Encoding"] = "gzip"

    def post(self, body: bytes) -> str:
        """The answer's status ("200", ...) or "error"."""
        if self.compress:
            body = gzip.compress(body, 6)
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=TIMEOUT)
            self.conn.request("POST", "/v1/traces", body, self.headers)
            response = self.conn.getresponse()
            response.read()
            if response.getheader("connection", "").lower() == "close":
                self.close()
            return str(response.status)
        except (OSError, http.client.HTTPException):
            self.close()
            return "error"

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send(
    host: str,
    port: int,
    rate: float,
    duration: float,
    *,
    first_seq: int = 0,
    size: int = DEFAULT_SIZE,
    batch: int = BATCH,
    delay: float = DELAY,
    compress: bool = False,
    slice_seconds: float = 0.001,
) -> SpanSendResult:
    """End ``rate * duration`` spans, exporting them as the SDK's BatchSpanProcessor would."""
    factory = SpanFactory(size)
    exporter = Exporter(host, port, compress)
    total = round(rate * duration)
    perf, wall, sleep = time.perf_counter, time.time, time.sleep
    seq, last_seq = first_seq, first_seq + total
    queue: list[tuple[int, int]] = []
    sent = refused = requests = nbytes = 0
    statuses: dict[str, int] = {}
    answers: list[float] = []

    def export(spans: list[tuple[int, int]]) -> None:
        nonlocal sent, refused, requests, nbytes
        body = factory.request(spans, wall())
        t = perf()
        status = exporter.post(body)
        answers.append(perf() - t)
        requests += 1
        nbytes += len(body)
        statuses[status] = statuses.get(status, 0) + 1
        if status == "200":
            sent += len(spans)
        else:
            refused += len(spans)

    cpu0 = time.process_time()
    start = perf()
    started = wall()
    last_export = start
    while seq < last_seq or queue:
        elapsed = perf() - start
        if seq < last_seq:
            due = min(last_seq, first_seq + int(elapsed * rate) + 1)
            if due > seq:
                end_ns = time.time_ns()
                queue.extend((s, end_ns) for s in range(seq, due))
                seq = due
        done = seq >= last_seq  # then shutdown(): everything left goes now
        if queue and (len(queue) >= batch or done or perf() - last_export >= delay):
            chunk, queue = queue[:batch], queue[batch:]
            export(chunk)
            last_export = perf()
            continue  # spans ended during the export: queue them before sleeping
        sleep(slice_seconds - (perf() - start) % slice_seconds)
    seconds = perf() - start
    cpu = time.process_time() - cpu0
    exporter.close()
    ordered = sorted(answers)
    return SpanSendResult(
        first_seq=first_seq,
        sent=sent,
        refused=refused,
        requests=requests,
        statuses=statuses,
        bytes=nbytes,
        started=started,
        seconds=seconds,
        cpu_seconds=cpu,
        answer_ms_p50=1000 * percentile(ordered, 50),
        answer_ms_p99=1000 * percentile(ordered, 99),
        answer_ms_max=1000 * ordered[-1] if ordered else float("nan"),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="the daemon's --otlp-address port")
    parser.add_argument("--rate", type=float, required=True, help="spans per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--first-seq", type=int, default=0, help="id of the first span")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="bytes per span")
    parser.add_argument("--batch", type=int, default=BATCH, help="spans per request, at most")
    parser.add_argument("--delay", type=float, default=DELAY, help="s between exports, at most")
    parser.add_argument("--gzip", action="store_true", help="gzip requests (SDK default: off)")
    parser.add_argument("--slice-ms", type=float, default=1.0, help="pacing slice")
    args = parser.parse_args(argv)
    result = send(
        args.host,
        args.port,
        args.rate,
        args.duration,
        first_seq=args.first_seq,
        size=args.size,
        batch=args.batch,
        delay=args.delay,
        compress=args.gzip,
        slice_seconds=args.slice_ms / 1000,
    )
    json.dump({**asdict(result), "rate": result.rate}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
