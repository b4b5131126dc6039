"""How long the spool keeps the event loop from reading the UDP socket.

    PYTHONPATH=src python -m benchmarks.spool_stall [DIR] [--inline]

Times, on the calling thread (the event loop in the daemon), the parts of
the spool that block: ``append`` of 50 documents of 1 KB (1 000 segments/s
for 15 s), the once-a-second flush, the largest possible batch (50 x 64 KB),
and ``make_room`` moving a full memory budget's waiting batches to disk.
``--inline`` runs fsync on the calling thread, as before it moved to a
thread.  DIR (default: the system's temporary directory) should be on the
disk to judge; start a writer next to it (``dd if=/dev/zero of=DIR/big
bs=1M count=1024 conv=fsync``) to see a busy disk.  Results:
docs/durability.md, "Stalls".
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.spool import Spool, SyncErrors

DOC = b'{"id":"%016x","trace_id":"1-5f84c7a1-6b4cdbb1a6b2b0a0e8a1c0f2","p":"' + b"p" * 900 + b'"}'


def summary(name: str, seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
    return (
        f"{name}: n={len(ordered)} median={statistics.median(ordered) * 1e3:.2f} ms "
        f"p99={p99 * 1e3:.2f} ms max={ordered[-1] * 1e3:.2f} ms"
    )


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main(argv: list[str]) -> None:
    inline = "--inline" in argv
    args = [a for a in argv if a != "--inline"]
    base = tempfile.mkdtemp(prefix="spool-stall-", dir=args[0] if args else None)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    pending: list[tuple[concurrent.futures.Future[SyncErrors], Deferred[SyncErrors]]] = []

    def runner(call: Callable[[], SyncErrors]) -> Deferred[SyncErrors]:
        d: Deferred[SyncErrors] = Deferred()
        pending.append((pool.submit(call), d))
        return d

    def deliver() -> None:  # what callFromThread does in the daemon
        for item in [p for p in pending if p[0].done()]:
            pending.remove(item)
            item[1].callback(item[0].result())

    try:
        clock = Clock()
        spool = Spool.open(
            os.path.join(base, "spool"), 1024**3, clock, Counters(),
            run_blocking=None if inline else runner,
        )  # fmt: skip
        appends, ticks = [], []
        for second in range(15):
            for b in range(20):
                docs = [DOC % (second * 1000 + b * 50 + i) for i in range(50)]
                appends.append(timed(lambda docs=docs: spool.append(docs)))
                time.sleep(0.05)
                deliver()
            ticks.append(timed(lambda: clock.advance(1)))
        big = [b"x" * 65000] * 50
        large = [timed(lambda: spool.append(big)) for _ in range(20)]
        spool.close()
        print(summary("append, 50 x 1 KB", appends))
        print(summary("flush timer (fsync inline)" if inline else "flush timer", ticks))
        print(summary("append, 50 x 64 KB", large))

        counters = Counters()
        spool = Spool.open(
            os.path.join(base, "room"), 1024**3, clock, counters, run_blocking=runner
        )
        buffer = SegmentBuffer(128 * 1024 * 1024, clock, counters)
        batcher = Batcher(
            buffer, lambda docs: Deferred(), clock, counters,
            concurrency=1, spool=spool, spool_after=1000,
        )  # fmt: skip
        batcher.startService()
        moves = []
        for n in range(3 * 128 * 1000):
            before = counters.spooled
            took = timed(lambda n=n: buffer.offer(DOC % n))
            if counters.spooled > before:
                moves.append(took)
        spool.close()
        print(summary("make_room, -m 128 full", moves))
    finally:
        pool.shutdown()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
