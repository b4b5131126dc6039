"""One measurement: a fresh daemon, one send rate, every number we report.

The steps, for each rate:

1. start the daemon under test (a fresh process, so idle and peak RSS belong
   to this rate alone) and wait until it listens on its UDP port;
2. warm up: 200 segments at 1 000/s (outside the measured id range), wait
   until the sink has them and one more second, note the idle RSS; measure
   how busy the machine is for one second (other people's work skews CPU
   numbers), optionally waiting for a quiet second;
3. note the daemon's CPU time, the sink's CPU time and the kernel's UDP
   counters, then start the sender (its own process) for ``duration`` s,
   sampling the daemon's RSS every 0.2 s;
4. drain: wait until the sink has every segment, or nothing new has arrived
   for ``drain_idle`` s; note CPU time, UDP counters and VmHWM again;
5. take the sink's records (id, send time, arrival time) and work out loss,
   duplicates and latency; then SIGTERM the daemon and note its exit status,
   anything that arrived during its shutdown, and warnings in its log.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat
from benchmarks.processes import DEFAULT_COMMAND, Daemon, Sender, Sink, SpanSender
from benchmarks.stats import percentile

WARMUP_FIRST_SEQ = 0xF0_0000_0000_0000  # ids the measurement never uses
WARMUP_COUNT = 200
MB = 1024  # KiB per MiB


@dataclass
class Settings:
    """How to run the daemon and each measurement."""

    command: str = DEFAULT_COMMAND
    config_template: Path | None = None
    size: int = 1024  # bytes per datagram
    drain_idle: float = 3.0  # stop draining after this long without a new document
    drain_max: float = 30.0
    rss_every: float = 0.2  # seconds between RSS samples
    # Other work on the machine skews the numbers: before sending, wait (up to
    # quiet_wait s) for a second in which the machine is below quiet_percent busy.
    quiet_percent: float = 10.0
    quiet_wait: float = 0.0


class Delivery:
    """What the sink delivered of the ids [first, first + count); fed in increments."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self._seen = bytearray(count)
        self.delivered = 0  # unique ids
        self.duplicates = 0
        self.stray = 0  # ids outside the range (warm-up, an earlier rate)
        self.latencies: list[float] = []  # seconds, first arrival of each id
        self._by_index = array("d", [math.nan]) * count  # the same, by id

    def add(self, records: list[tuple[float, int, float]]) -> Delivery:
        seen, first, count = self._seen, self.first, len(self._seen)
        for arrival, doc_id, sent in records:
            index = doc_id - first
            if not 0 <= index < count:
                self.stray += 1
            elif seen[index]:
                self.duplicates += 1
            else:
                seen[index] = 1
                self.delivered += 1
                self.latencies.append(arrival - sent)
                self._by_index[index] = arrival - sent
        return self

    def timeline(self, rate: float, bucket: float = 1.0) -> list[dict[str, float]]:
        """Per ``bucket`` s of send time: latency p50/p99/max (ms) and ids lost."""
        per_bucket = max(1, round(rate * bucket))
        rows = []
        for n, start in enumerate(range(0, len(self._seen), per_bucket)):
            chunk = self._by_index[start : start + per_bucket]
            got = sorted(x for x in chunk if not math.isnan(x))
            rows.append(
                {
                    "t": n * bucket,
                    "p50_ms": round(1000 * percentile(got, 50), 1),
                    "p99_ms": round(1000 * percentile(got, 99), 1),
                    "max_ms": round(1000 * got[-1], 1) if got else math.nan,
                    "lost": len(chunk) - len(got),
                }
            )
        return rows


@dataclass
class RateResult:
    rate: float  # asked for, segments/s
    duration: float  # asked for, s
    sent: int
    send_errors: int
    send_rate: float  # achieved
    delivered: int
    lost: int
    loss_percent: float
    duplicates: int
    late: int  # delivered only during the daemon's shutdown (not counted as delivered)
    cpu_seconds: (
        float  # daemon (schedstat, all threads), from the first send to the end of the drain
    )
    cpu_us_per_segment: float  # per segment sent
    cpu_ticks_us_per_segment: float  # the same from utime + stime (10 ms ticks), a cross-check
    cpu_us_per_delivered: float  # per segment delivered (differs when segments are lost)
    cpu_system_percent: float  # share of the daemon's CPU time spent in the kernel
    cpu_percent_sending: float  # daemon, % of one core during the send window
    switches_per_segment: float  # main-thread context switches (≈ event-loop wake-ups)
    wakeups_per_second: float  # context switches of all threads, over the send window
    rss_start_mb: float  # as soon as it listens
    rss_idle_mb: float  # after the warm-up, before sending
    rss_peak_mb: float  # max of the samples and VmHWM
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_max: float
    socket_drops: int  # datagrams the kernel dropped for the daemon's UDP socket
    rcvbuf_errors: int  # kernel UDP receive-buffer drops during the run (all sockets)
    udp_in_datagrams: int
    background_busy_percent: float  # machine, % of all cores, the second before sending
    machine_busy_percent: float  # all processes, % of all cores during the send window
    steal_percent: float  # hypervisor steal, % of all cores during the send window
    sink_cpu_percent: float  # sink, % of one core during the send window
    sender_cpu_percent: float  # sender, % of one core during its send loop
    drain_seconds: float
    exit_status: int | None
    log_problems: int  # warning/error lines in the daemon's log
    log_samples: list[str]
    daemon_banner: list[str]  # its configuration, as it logged it
    timeline: list[dict[str, float]]  # per second of sending: latency and loss
    rss_samples: list[tuple[float, float]]  # (seconds since the send started, MiB)


def warm_up(sink: Sink, daemon: Daemon, timeout: float = 10.0) -> None:
    """Send a few segments and wait until they arrive (connections, imports, caches)."""
    with Sender(daemon.udp_port, 1000, WARMUP_COUNT / 1000, WARMUP_FIRST_SEQ) as sender:
        sender.result()
    deadline = time.monotonic() + timeout
    while sink.stats()["docs"] < WARMUP_COUNT and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    sink.take()


def background_busy(settings: Settings) -> float:
    """% of all cores busy during a quiet second (waiting up to settings.quiet_wait)."""
    deadline = time.monotonic() + settings.quiet_wait
    while True:
        before = procstat.machine_cpu()
        time.sleep(1.0)
        used = procstat.machine_cpu() - before
        busy = 100 * used.busy / used.total if used.total else 0.0
        if busy <= settings.quiet_percent or time.monotonic() >= deadline:
            return busy


def warm_up_spans(sink: Sink, daemon: Daemon, timeout: float = 10.0) -> None:
    """Send a few spans over OTLP/HTTP and wait until they arrive (one request of 200)."""
    with SpanSender(daemon.otlp_port, 1000, WARMUP_COUNT / 1000, WARMUP_FIRST_SEQ) as sender:
        sender.result()
    deadline = time.monotonic() + timeout
    while sink.stats()["spans"] < WARMUP_COUNT and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    sink.take()


def drain(
    sink: Sink, expected: int, settings: Settings, sample: Callable[[], None], key: str = "docs"
) -> float:
    """Seconds waited until ``expected`` documents (``key``) arrived or arrivals stopped."""
    start = last_change = time.monotonic()
    last = -1
    while True:
        docs = sink.stats()[key]
        now = time.monotonic()
        if docs >= expected or now - start > settings.drain_max:
            return now - start
        if docs != last:
            last, last_change = docs, now
        elif now - last_change > settings.drain_idle:
            return last_change - start
        sample()
        time.sleep(0.1)


def measure(
    sink: Sink,
    settings: Settings,
    rate: float,
    duration: float,
    first_seq: int,
    workdir: Path,
    on_send_start: Callable[[Daemon], None] | None = None,
    name: str = "",
) -> RateResult:
    """Run one rate against a fresh daemon (see the module docstring).

    ``name`` names the daemon's log file in ``workdir`` (default daemon-<rate>).
    """
    sink.take()
    name = name or f"daemon-{int(rate)}"
    with Daemon(
        settings.command,
        sink.endpoint,
        workdir,
        name=name,
        config_template=settings.config_template,
        env=sink.daemon_env,
    ) as daemon:
        daemon.wait_ready()
        pid = daemon.pid
        rss_start = procstat.rss_kb(pid)
        warm_up(sink, daemon)
        rss_idle = procstat.rss_kb(pid)
        background = background_busy(settings)

        samples: list[tuple[float, float]] = []
        t0 = time.monotonic()

        def sample() -> None:
            samples.append((time.monotonic() - t0, procstat.rss_kb(pid) / MB))

        udp0, machine0 = procstat.udp_counters(), procstat.machine_cpu()
        drops0 = procstat.udp_socket_drops(daemon.udp_port)
        (user0, sys0), sink_cpu0 = procstat.tree_cpu_split(pid), procstat.cpu_seconds(sink.pid)
        cpu0, switches0 = user0 + sys0, procstat.context_switches(pid)
        run0, wakeups0 = procstat.run_seconds(pid), procstat.wakeups(pid)
        with Sender(daemon.udp_port, rate, duration, first_seq, settings.size) as sender:
            if on_send_start is not None:
                on_send_start(daemon)
            sender.wait_ticking(settings.rss_every, sample)
            sent = sender.result()
        cpu_send = procstat.run_seconds(pid) - run0
        wakeups_send = procstat.wakeups(pid) - wakeups0
        sink_cpu = procstat.cpu_seconds(sink.pid) - sink_cpu0
        machine = procstat.machine_cpu() - machine0
        drain_seconds = drain(sink, sent.sent, settings, sample)
        user, system = procstat.tree_cpu_split(pid)
        ticks, system = user + system - cpu0, system - sys0
        cpu = procstat.run_seconds(pid) - run0
        switches = procstat.context_switches(pid) - switches0
        udp = procstat.udp_counters() - udp0
        drops = procstat.udp_socket_drops(daemon.udp_port) - drops0
        hwm = procstat.hwm_kb(pid) / MB
        delivery = Delivery(first_seq, sent.sent).add(sink.take())
        delivered = delivery.delivered
        latencies = sorted(delivery.latencies)
        timeline = delivery.timeline(rate)
        exit_status = daemon.terminate()
        late = delivery.add(sink.take()).delivered - delivered
        problems, problem_samples = daemon.problems()
        banner = daemon.banner()

    lost = sent.sent - delivered
    return RateResult(
        rate=rate,
        duration=duration,
        sent=sent.sent,
        send_errors=sent.errors,
        send_rate=sent.rate,
        delivered=delivered,
        lost=lost,
        loss_percent=100 * lost / sent.sent if sent.sent else 0.0,
        duplicates=delivery.duplicates,
        late=late,
        cpu_seconds=cpu,
        cpu_us_per_segment=1e6 * cpu / sent.sent if sent.sent else 0.0,
        cpu_ticks_us_per_segment=1e6 * ticks / sent.sent if sent.sent else 0.0,
        cpu_us_per_delivered=1e6 * cpu / delivered if delivered else 0.0,
        cpu_system_percent=100 * system / ticks if ticks else 0.0,
        cpu_percent_sending=100 * cpu_send / sent.seconds,
        switches_per_segment=switches / sent.sent if sent.sent else 0.0,
        wakeups_per_second=wakeups_send / sent.seconds if sent.seconds else 0.0,
        rss_start_mb=rss_start / MB,
        rss_idle_mb=rss_idle / MB,
        rss_peak_mb=max([hwm, *(mb for _, mb in samples)]),
        latency_ms_p50=1000 * percentile(latencies, 50),
        latency_ms_p90=1000 * percentile(latencies, 90),
        latency_ms_p99=1000 * percentile(latencies, 99),
        latency_ms_max=1000 * latencies[-1] if latencies else float("nan"),
        socket_drops=drops,
        rcvbuf_errors=udp.rcvbuf_errors,
        udp_in_datagrams=udp.in_datagrams,
        background_busy_percent=background,
        machine_busy_percent=100 * machine.busy / machine.total,
        steal_percent=100 * machine.steal / machine.total,
        sink_cpu_percent=100 * sink_cpu / sent.seconds,
        sender_cpu_percent=100 * sent.cpu_seconds / sent.seconds,
        drain_seconds=drain_seconds,
        exit_status=exit_status,
        log_problems=problems,
        log_samples=problem_samples,
        daemon_banner=banner,
        timeline=timeline,
        rss_samples=samples,
    )


@dataclass
class IdleResult:
    """A daemon with nothing to do: after the warm-up, ``seconds`` without a segment."""

    seconds: float
    cpu_seconds: float  # schedstat, all threads
    cpu_ms_per_minute: float
    wakeups: int  # context switches of all threads
    wakeups_per_second: float
    rss_start_mb: float  # as soon as it listens, before the warm-up
    rss_mb: float  # at the end
    exit_status: int | None
    log_problems: int


def measure_idle(
    sink: Sink,
    settings: Settings,
    seconds: float,
    workdir: Path,
    name: str = "daemon-idle",
    warm_spans: bool = False,
) -> IdleResult:
    """CPU and wakeups of a fresh, warmed-up daemon that receives nothing for ``seconds``.

    ``warm_spans``: the warm-up also sends spans to its OTLP receiver.
    """
    sink.take()
    with Daemon(
        settings.command, sink.endpoint, workdir, name=name,
        config_template=settings.config_template, env=sink.daemon_env,
    ) as daemon:  # fmt: skip
        daemon.wait_ready()
        pid = daemon.pid
        rss_start = procstat.rss_kb(pid)
        warm_up(sink, daemon)
        if warm_spans:
            warm_up_spans(sink, daemon)
        run0, wakeups0, t0 = procstat.run_seconds(pid), procstat.wakeups(pid), time.monotonic()
        time.sleep(seconds)
        cpu, woke = procstat.run_seconds(pid) - run0, procstat.wakeups(pid) - wakeups0
        elapsed = time.monotonic() - t0
        rss = procstat.rss_kb(pid) / MB
        exit_status = daemon.terminate()
        problems, _ = daemon.problems()
    return IdleResult(
        seconds=elapsed,
        cpu_seconds=cpu,
        cpu_ms_per_minute=60_000 * cpu / elapsed,
        wakeups=woke,
        wakeups_per_second=woke / elapsed,
        rss_start_mb=rss_start / MB,
        rss_mb=rss,
        exit_status=exit_status,
        log_problems=problems,
    )
