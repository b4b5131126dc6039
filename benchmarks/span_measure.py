"""One span measurement: a fresh daemon with its OTLP receiver, one span rate.

The steps mirror ``benchmarks.measure`` for segments:

1. start the daemon under test with ``--otlp-address`` on a free port and
   wait until it listens there (and on UDP);
2. warm up: 200 spans in one request (outside the measured id range), wait
   until the sink has them and one more second, note the idle RSS and how
   busy the machine is;
3. note the daemon's CPU time and the sink's, then start the span sender
   (``benchmarks.span_sender``, its own process) for ``duration`` s,
   sampling the daemon's RSS every 0.2 s;
4. drain: wait until the sink has every span the daemon took, or nothing
   new arrived for ``drain_idle`` s;
5. take the sink's records and work out loss, duplicates and latency, then
   SIGTERM the daemon (what arrives during its shutdown is ``late``).

Latency is arrival at the sink minus the time the span's request was built
(just before its POST): the daemon's share only, not the SDK's up to 5 s of
batching before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat
from benchmarks.measure import (
    MB,
    Delivery,
    Settings,
    background_busy,
    drain,
    warm_up_spans,
)
from benchmarks.processes import Daemon, Sink, SpanSender
from benchmarks.span_sender import BATCH, DELAY
from benchmarks.stats import percentile


@dataclass(frozen=True)
class SpanShape:
    """What the sender sends: span size and the SDK's batching."""

    size: int = 1024
    batch: int = BATCH
    delay: float = DELAY


@dataclass
class SpanRateResult:
    rate: float  # asked for, spans/s
    duration: float  # asked for, s
    sent: int  # spans the daemon answered 200 for
    refused: int  # spans in requests it refused (or whose POST failed)
    requests: int
    statuses: dict[str, int]
    send_rate: float  # achieved, spans/s taken by the daemon
    request_bytes: int  # OTLP request bodies, as sent
    answer_ms_p50: float  # the daemon's answer to a POST
    answer_ms_p99: float
    delivered: int
    lost: int  # taken (200) but never uploaded
    loss_percent: float
    duplicates: int
    late: int  # delivered only during the daemon's shutdown
    uploads: int  # requests the daemon made to the sink's /v1/traces
    upload_bytes: int  # their bodies, as received (gzipped by default)
    uploads_gzipped: int
    cpu_seconds: float  # daemon (schedstat, all threads), first span to end of drain
    cpu_us_per_span: float  # per span sent
    cpu_percent_sending: float  # % of one core during the send window
    wakeups_per_second: float  # context switches of all threads, send window
    rss_start_mb: float
    rss_idle_mb: float  # after the warm-up
    rss_peak_mb: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_max: float
    background_busy_percent: float
    machine_busy_percent: float
    steal_percent: float
    sink_cpu_percent: float
    sender_cpu_percent: float
    drain_seconds: float
    exit_status: int | None
    log_problems: int
    log_samples: list[str]
    daemon_banner: list[str]
    timeline: list[dict[str, float]]
    rss_samples: list[tuple[float, float]]


def measure_spans(
    sink: Sink,
    settings: Settings,
    rate: float,
    duration: float,
    first_seq: int,
    workdir: Path,
    shape: SpanShape = SpanShape(),
    name: str = "",
) -> SpanRateResult:
    """Run one span rate against a fresh daemon (see the module docstring)."""
    sink.take()
    name = name or f"spans-{int(rate)}"
    with Daemon(
        settings.command, sink.endpoint, workdir, name=name,
        config_template=settings.config_template, env=sink.daemon_env,
    ) as daemon:  # fmt: skip
        if not daemon.receives_spans:
            raise SystemExit("--span-daemon-cmd must name {otlp_address} or {otlp_port}")
        daemon.wait_ready()
        pid = daemon.pid
        rss_start = procstat.rss_kb(pid)
        warm_up_spans(sink, daemon)
        rss_idle = procstat.rss_kb(pid)
        background = background_busy(settings)
        stats0 = sink.stats()

        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()

        def sample() -> None:
            samples.append((time.monotonic() - t0, procstat.rss_kb(pid) / MB))

        machine0, sink_cpu0 = procstat.machine_cpu(), procstat.cpu_seconds(sink.pid)
        run0, wakeups0 = procstat.run_seconds(pid), procstat.wakeups(pid)
        with SpanSender(
            daemon.otlp_port, rate, duration, first_seq, shape.size, shape.batch, shape.delay
        ) as sender:
            sender.wait_ticking(settings.rss_every, sample)
            sent = sender.result()
        cpu_send = procstat.run_seconds(pid) - run0
        wakeups_send = procstat.wakeups(pid) - wakeups0
        sink_cpu = procstat.cpu_seconds(sink.pid) - sink_cpu0
        machine = procstat.machine_cpu() - machine0
        drain_seconds = drain(sink, sent.sent, settings, sample, key="spans")
        cpu = procstat.run_seconds(pid) - run0
        hwm = procstat.hwm_kb(pid) / MB
        stats = sink.stats()
        delivery = Delivery(first_seq, sent.sent + sent.refused).add(sink.take())
        delivered = delivery.delivered
        latencies = sorted(delivery.latencies)
        timeline = delivery.timeline(rate)
        exit_status = daemon.terminate()
        late = delivery.add(sink.take()).delivered - delivered
        problems, problem_samples = daemon.problems()
        banner = daemon.banner()

    # A POST whose answer was lost (counted as refused) may still deliver its spans.
    lost = max(0, sent.sent - delivered)
    return SpanRateResult(
        rate=rate,
        duration=duration,
        sent=sent.sent,
        refused=sent.refused,
        requests=sent.requests,
        statuses=sent.statuses,
        send_rate=sent.rate,
        request_bytes=sent.bytes,
        answer_ms_p50=sent.answer_ms_p50,
        answer_ms_p99=sent.answer_ms_p99,
        delivered=delivered,
        lost=lost,
        loss_percent=100 * lost / sent.sent if sent.sent else 0.0,
        duplicates=delivery.duplicates,
        late=late,
        uploads=stats["otlp_requests"] - stats0["otlp_requests"],
        upload_bytes=stats["otlp_bytes"] - stats0["otlp_bytes"],
        uploads_gzipped=stats["otlp_gzipped"] - stats0["otlp_gzipped"],
        cpu_seconds=cpu,
        cpu_us_per_span=1e6 * cpu / sent.sent if sent.sent else 0.0,
        cpu_percent_sending=100 * cpu_send / sent.seconds if sent.seconds else 0.0,
        wakeups_per_second=wakeups_send / sent.seconds if sent.seconds else 0.0,
        rss_start_mb=rss_start / MB,
        rss_idle_mb=rss_idle / MB,
        rss_peak_mb=max([hwm, *(mb for _, mb in samples)]),
        latency_ms_p50=1000 * percentile(latencies, 50),
        latency_ms_p90=1000 * percentile(latencies, 90),
        latency_ms_p99=1000 * percentile(latencies, 99),
        latency_ms_max=1000 * latencies[-1] if latencies else float("nan"),
        background_busy_percent=background,
        machine_busy_percent=100 * machine.busy / machine.total if machine.total else 0.0,
        steal_percent=100 * machine.steal / machine.total if machine.total else 0.0,
        sink_cpu_percent=100 * sink_cpu / sent.seconds if sent.seconds else 0.0,
        sender_cpu_percent=100 * sent.cpu_seconds / sent.seconds if sent.seconds else 0.0,
        drain_seconds=drain_seconds,
        exit_status=exit_status,
        log_problems=problems,
        log_samples=problem_samples,
        daemon_banner=banner,
        timeline=timeline,
        rss_samples=samples,
    )
