"""Memory flatness: one daemon, one rate, several minutes, RSS every few seconds.

The daemon is warmed up as in a normal measurement, then the sender runs for
``seconds``; every ``every`` seconds the runner samples the daemon's RSS and
collects what the sink has received (so neither side accumulates).  The
slope of RSS over time is fitted by least squares *after the first minute*
(the allocator and Python's caches settle in that minute); flat means a slope
near 0 MB/min and the last minute's mean close to the first's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks import procstat
from benchmarks.measure import MB, Delivery, Settings, drain, warm_up
from benchmarks.processes import Daemon, Sender, Sink
from benchmarks.stats import percentile, slope


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def soak(
    sink: Sink,
    settings: Settings,
    rate: float,
    seconds: float,
    every: float,
    first_seq: int,
    workdir: Path,
) -> dict[str, Any]:
    """Run the soak; a JSON-able summary with every RSS sample."""
    sink.take()
    total = round(rate * seconds)
    delivery = Delivery(first_seq, total)
    samples: list[tuple[float, float]] = []
    intervals: list[dict[str, float]] = []
    with Daemon(
        settings.command, sink.endpoint, workdir, name="daemon-soak",
        config_template=settings.config_template, env=sink.daemon_env,
    ) as daemon:  # fmt: skip
        daemon.wait_ready()
        pid = daemon.pid
        warm_up(sink, daemon)
        cpu0 = procstat.tree_cpu_seconds(pid)
        udp0 = procstat.udp_counters()
        t0 = time.monotonic()
        port = daemon.udp_port
        last = (t0, cpu0, procstat.machine_cpu(), udp0, procstat.udp_socket_drops(port))

        def tick() -> None:
            nonlocal last
            now = time.monotonic()
            samples.append((now - t0, procstat.rss_kb(pid) / MB))
            current = (now, procstat.tree_cpu_seconds(pid), procstat.machine_cpu(),
                       procstat.udp_counters(), procstat.udp_socket_drops(port))  # fmt: skip
            intervals.append(_interval(t0, last, current))
            last = current
            delivery.add(sink.take())

        with Sender(daemon.udp_port, rate, seconds, first_seq, settings.size) as sender:
            sender.wait_ticking(every, tick)
            sent = sender.result()
        drain(sink, sent.sent - delivery.delivered, settings, lambda: None)
        delivery.add(sink.take())
        cpu = procstat.tree_cpu_seconds(pid) - cpu0
        udp = procstat.udp_counters() - udp0
        drops = procstat.udp_socket_drops(port) - last[4]
        hwm = procstat.hwm_kb(pid) / MB
        exit_status = daemon.terminate()
        problems, problem_samples = daemon.problems()

    settled = [(t, mb) for t, mb in samples if t >= 60] or samples
    latencies = sorted(delivery.latencies)
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": sent.sent,
        "delivered": delivery.delivered,
        "lost": sent.sent - delivery.delivered,
        "cpu_us_per_segment": 1e6 * cpu / max(sent.sent, 1),
        "socket_drops": sum(i["socket_drops"] for i in intervals) + drops,
        "rcvbuf_errors": udp.rcvbuf_errors,
        "rss_first_minute_mb": _mean([mb for t, mb in samples if t < 60]),
        "rss_last_minute_mb": _mean([mb for t, mb in samples if t >= samples[-1][0] - 60]),
        "rss_max_mb": max(mb for _, mb in samples),
        "vmhwm_mb": hwm,
        "slope_mb_per_min": 60 * slope([t for t, _ in settled], [mb for _, mb in settled]),
        "latency_ms_p50": 1000 * percentile(latencies, 50),
        "latency_ms_p99": 1000 * percentile(latencies, 99),
        "exit_status": exit_status,
        "log_problems": problems,
        "log_samples": problem_samples,
        "rss_samples": samples,
        # per sample interval: daemon CPU, machine load, kernel drops, latency, lost ids
        "intervals": [
            {**interval, **{k: v for k, v in row.items() if k != "t"}}
            for interval, row in zip(intervals[1:], delivery.timeline(rate, every), strict=False)
        ],
    }


Snapshot = tuple[float, float, procstat.MachineCpu, procstat.UdpCounters, int]


def _interval(t0: float, before: Snapshot, after: Snapshot) -> dict[str, float]:
    """What happened between two snapshots (time, daemon CPU, machine CPU, UDP counters)."""
    seconds = max(after[0] - before[0], 1e-9)
    machine = after[2] - before[2]
    total = max(machine.total, 1e-9)
    return {
        "t": round(after[0] - t0, 1),
        "daemon_cpu_percent": round(100 * (after[1] - before[1]) / seconds, 1),
        "machine_busy_percent": round(100 * machine.busy / total, 1),
        "steal_percent": round(100 * machine.steal / total, 1),
        "rcvbuf_errors": (after[3] - before[3]).rcvbuf_errors,
        "socket_drops": after[4] - before[4],
    }
