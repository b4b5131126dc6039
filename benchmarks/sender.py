"""A UDP segment sender at a fixed rate.

Time is cut into slices (1 ms by default).  At the start of each slice the
sender works out from the elapsed time how many segments are due and sends
them back to back, then sleeps to the next slice boundary; so the rate stays
exact however late ``sleep`` returns, and no segment leaves more than about a
slice early or late.  Each segment's ``end_time`` is the wall-clock time of
its slice (see ``benchmarks.segments``).

Run on its own (``python -m benchmarks.sender --port P --rate R``) it prints
one JSON line: how many segments it sent, over how long, and its own CPU use.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass

from benchmarks.segments import DEFAULT_SIZE, SegmentFactory


@dataclass
class SendResult:
    first_seq: int
    sent: int  # datagrams handed to the kernel
    errors: int  # send() calls that failed (ENOBUFS, ECONNREFUSED, ...)
    started: float  # wall clock, first send
    seconds: float  # from first to last send
    cpu_seconds: float  # this process, during the send loop

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0


def send(
    host: str,
    port: int,
    rate: float,
    duration: float,
    *,
    first_seq: int = 0,
    size: int = DEFAULT_SIZE,
    slice_seconds: float = 0.001,
) -> SendResult:
    """Send ``rate * duration`` segments to ``host:port``, paced in slices."""
    factory = SegmentFactory(size)
    total = round(rate * duration)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
    sock.connect((host, port))
    sock_send, make, stamp = sock.send, factory.make, factory.stamp
    perf, wall, sleep = time.perf_counter, time.time, time.sleep
    seq, last_seq, errors = first_seq, first_seq + total, 0
    cpu0 = time.process_time()
    start = perf()
    started = wall()
    while seq < last_seq:
        elapsed = perf() - start
        due = min(last_seq, first_seq + int(elapsed * rate) + 1)
        if due > seq:
            stamp(wall())
            while seq < due:
                try:
                    sock_send(make(seq))
                except OSError:
                    errors += 1
                seq += 1
        if seq < last_seq:
            sleep(slice_seconds - (perf() - start) % slice_seconds)
    seconds = perf() - start
    cpu = time.process_time() - cpu0
    sock.close()
    return SendResult(first_seq, total - errors, errors, started, seconds, cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="segments per second")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds")
    parser.add_argument("--first-seq", type=int, default=0, help="id of the first segment")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="datagram bytes")
    parser.add_argument("--slice-ms", type=float, default=1.0, help="pacing slice")
    args = parser.parse_args(argv)
    result = send(
        args.host,
        args.port,
        args.rate,
        args.duration,
        first_seq=args.first_seq,
        size=args.size,
        slice_seconds=args.slice_ms / 1000,
    )
    json.dump({**asdict(result), "rate": result.rate}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
