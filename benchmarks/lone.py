"""Lone-segment latency: one segment on its own, how long until it reaches the sink.

A lone segment never fills a batch, so it waits for the batch deadline (1 s
after it arrived, for xraytwisted); this checks that deadline end to end.
The first segment goes to a daemon that has just started (no HTTP
connection yet: "cold"); then ``--repeat`` more, each after a pause long
enough that no batch is open ("warm": the connection is pooled).  Latency
is arrival at the sink minus the segment's send time.

    python -m benchmarks.lone [--repeat 5] [--daemon-cmd CMD]
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path
from typing import Any

from benchmarks.processes import DEFAULT_COMMAND, Daemon, Sink, set_priority
from benchmarks.segments import SegmentFactory

TARGET_SECONDS = 1.0
FIRST_SEQ = 0xE0_0000_0000_0000


def send_one(port: int, seq: int) -> None:
    factory = SegmentFactory()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        factory.stamp(time.time())
        sock.sendto(factory.make(seq), ("127.0.0.1", port))


def wait_for_one(sink: Sink, timeout: float) -> float | None:
    """The latency (s) of the next document to arrive, or None after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sink.stats()["docs"]:
            arrival, _, sent = sink.take()[0]
            return arrival - sent
        time.sleep(0.005)
    return None


def check(
    command: str, repeat: int, pause: float, workdir: Path, config_template: Path | None = None
) -> dict[str, Any]:
    """Cold and warm lone-segment latencies, in seconds (None: never arrived)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with (
        Sink() as sink,
        Daemon(
            command, sink.endpoint, workdir, name="daemon-lone", config_template=config_template
        ) as daemon,
    ):
        daemon.wait_ready()
        send_one(daemon.udp_port, FIRST_SEQ)
        cold = wait_for_one(sink, 10.0)
        warm = []
        for n in range(repeat):
            time.sleep(pause)
            send_one(daemon.udp_port, FIRST_SEQ + 1 + n)
            warm.append(wait_for_one(sink, 10.0))
    arrived = [s for s in [cold, *warm] if s is not None]
    return {
        "cold_seconds": cold,
        "warm_seconds": warm,
        "max_seconds": max(arrived) if arrived else None,
        "target_seconds": TARGET_SECONDS,
        "met": len(arrived) == repeat + 1 and max(arrived) <= TARGET_SECONDS,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="warm segments after the cold one")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between segments")
    parser.add_argument("--daemon-cmd", default=DEFAULT_COMMAND)
    parser.add_argument("--config-template", type=Path, help="rendered into {config}")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of all benchmark processes (-10: before others)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lone"))
    args = parser.parse_args(argv)
    set_priority(args.nice)
    result = check(args.daemon_cmd, args.repeat, args.pause, args.out, args.config_template)
    (args.out / "lone.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
