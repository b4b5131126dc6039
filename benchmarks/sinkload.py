"""Sink-only load test: proves the sink is never the bottleneck.

Starts ``benchmarks.sink`` as its own process and POSTs realistic upload
bodies to it (50 documents of ~1 KB each, JSON-string encoded as the daemons
do: ~60 KB) over keep-alive connections, either at a fixed request rate or
as fast as it can (``--rate 0``).  Reports the requests per second achieved,
the sink's CPU use, response times, and whether the sink counted every
document.  40 000 segments/s is 800 requests/s.

    python -m benchmarks.sinkload --rate 800 --duration 10
    python -m benchmarks.sinkload --rate 0 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass

from benchmarks import procstat
from benchmarks.processes import Sink, set_priority
from benchmarks.segments import SegmentFactory
from benchmarks.stats import percentile

DOCS_PER_BODY = 50


def upload_request(first_seq: int, size: int = 1024) -> tuple[bytes, int]:
    """A PutTraceSegments request like the daemons send; (bytes, body length)."""
    factory = SegmentFactory(size)
    factory.stamp(time.time())
    docs = [
        factory.make(seq).split(b"\n", 1)[1].decode()
        for seq in range(first_seq, first_seq + DOCS_PER_BODY)
    ]
    body = json.dumps({"TraceSegmentDocuments": docs}, separators=(",", ":")).encode()
    head = (
        "POST /TraceSegments HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: application/json\r\nAuthorization: AWS4-HMAC-SHA256 x\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return head + body, len(body)


@dataclass
class LoadResult:
    requests: int
    seconds: float
    requests_per_second: float
    segments_per_second: float
    body_bytes: int
    sink_cpu_percent: float  # of one core, during the load
    sink_cpu_us_per_request: float
    client_cpu_percent: float
    response_ms_p50: float
    response_ms_p99: float
    sink_docs: int  # documents the sink found with its regex
    docs_sent: int
    mismatches: int  # --verify: bodies where regex and JSON disagreed


async def _connection(
    port: int, requests: list[bytes], count: int, interval: float, start: float, out: list[float]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    for i in range(count):
        if interval:
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        t0 = loop.time()
        writer.write(requests[i % len(requests)])
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        out.append(loop.time() - t0)
    writer.close()


async def load(
    port: int, rate: float, duration: float, connections: int
) -> tuple[list[float], float]:
    """Run the load; (response time of every request, seconds taken)."""
    requests = [upload_request(n * DOCS_PER_BODY)[0] for n in range(16)]
    count = round(rate * duration) if rate else 10**9
    per_conn = count // connections
    interval = connections / rate if rate else 0.0
    loop = asyncio.get_running_loop()
    times: list[float] = []
    start = loop.time()
    tasks = [
        asyncio.ensure_future(
            _connection(
                port, requests, per_conn, interval, start + i * interval / connections, times
            )
        )
        for i in range(connections)
    ]
    if rate:
        await asyncio.gather(*tasks)
    else:
        await asyncio.sleep(duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return times, loop.time() - start


def run(rate: float, duration: float, connections: int, verify: bool) -> LoadResult:
    body_len = upload_request(0)[1]
    with Sink(verify=verify) as sink:
        sink_cpu0 = procstat.cpu_seconds(sink.pid)
        client_cpu0 = time.process_time()
        times, seconds = asyncio.run(load(sink.port, rate, duration, connections))
        sink_cpu = procstat.cpu_seconds(sink.pid) - sink_cpu0
        client_cpu = time.process_time() - client_cpu0
        stats = sink.stats()
    times.sort()
    done = len(times)
    return LoadResult(
        requests=done,
        seconds=seconds,
        requests_per_second=done / seconds,
        segments_per_second=done * DOCS_PER_BODY / seconds,
        body_bytes=body_len,
        sink_cpu_percent=100 * sink_cpu / seconds,
        sink_cpu_us_per_request=1e6 * sink_cpu / max(done, 1),
        client_cpu_percent=100 * client_cpu / seconds,
        response_ms_p50=1000 * percentile(times, 50),
        response_ms_p99=1000 * percentile(times, 99),
        sink_docs=stats["docs"],
        docs_sent=stats["requests"] * DOCS_PER_BODY,
        mismatches=stats["mismatches"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=800, help="requests/s; 0 = flat out")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of all benchmark processes (-10: before others)",
    )
    parser.add_argument("--verify", action="store_true", help="sink json-checks every body")
    args = parser.parse_args(argv)
    set_priority(args.nice)
    result = run(args.rate, args.duration, args.connections, args.verify)
    print(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
