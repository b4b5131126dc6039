"""Results as a markdown table and a PNG plot (matplotlib: a benchmark-only dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Targets for xraytwisted on the 2-core benchmark machine, by rate (see docs/benchmarks.md).
CPU_TARGET_US = {1000: 23.0, 4000: 16.0}
LOSS_TARGET_PERCENT = {10000: 0.0, 20000: 0.0, 40000: 0.1}
P99_TARGET_MS = {4000: 50.0}
RSS_IDLE_TARGET_MB = 55.0
RSS_PEAK_TARGET_MB = {20000: 70.0}
# Go daemon 3.6.6 on a comparable 2-core machine (default settings, loss uncounted by it).
GO_CPU_US = {1000: 46.0, 4000: 33.0}
GO_LOSS_PERCENT = {10000: 6.5, 20000: 6.5, 40000: 11.0}


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def markdown_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per rate; the columns docs/benchmarks.md explains."""
    header = (
        "| rate (seg/s) | sent | CPU µs/seg | daemon CPU % | lost (%) | kernel drops "
        "| RSS idle MB | RSS peak MB | latency p50 ms | p99 ms | sink CPU % | sender CPU % |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results:
        rows.append(
            f"| {r['rate']:,.0f} | {r['sent']:,} | {_fmt(r['cpu_us_per_segment'])} "
            f"| {_fmt(r['cpu_percent_sending'], 0)} "
            f"| {r['lost']:,} ({r['loss_percent']:.3g} %) | {r.get('socket_drops', 0):,} "
            f"| {_fmt(r['rss_idle_mb'])} | {_fmt(r['rss_peak_mb'])} "
            f"| {_fmt(r['latency_ms_p50'])} | {_fmt(r['latency_ms_p99'])} "
            f"| {_fmt(r['sink_cpu_percent'], 0)} | {_fmt(r['sender_cpu_percent'], 0)} |"
        )
    return header + "\n".join(rows) + "\n"


def diagnostics_table(results: Sequence[dict[str, Any]]) -> str:
    """The numbers that explain the main table."""
    header = (
        "| rate (seg/s) | achieved rate | CPU µs/delivered seg | kernel share of CPU % "
        "| context switches/seg | background busy % | machine busy % | steal % | RcvbufErrors "
        "| latency p90 ms | max ms "
        "| drain s | exit status | log warnings |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['rate']:,.0f} | {r['send_rate']:,.0f} | {_fmt(r['cpu_us_per_delivered'])} "
        f"| {_fmt(r['cpu_system_percent'], 0)} | {_fmt(r['switches_per_segment'], 2)} "
        f"| {_fmt(r['background_busy_percent'], 0)} "
        f"| {_fmt(r['machine_busy_percent'], 0)} | {_fmt(r['steal_percent'], 1)} "
        f"| {r['rcvbuf_errors']:,} "
        f"| {_fmt(r['latency_ms_p90'])} | {_fmt(r['latency_ms_max'])} "
        f"| {_fmt(r['drain_seconds'], 1)} | {r['exit_status']} | {r['log_problems']} |"
        for r in results
    ]
    return header + "\n".join(rows) + "\n"


def soak_table(soak: dict[str, Any]) -> str:
    return (
        "| rate (seg/s) | seconds | sent | lost | RSS first min MB | RSS last min MB "
        "| slope MB/min (after 1st min) | CPU µs/seg |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        f"| {soak['rate']:,.0f} | {soak['seconds']:.0f} | {soak['sent']:,} | {soak['lost']:,} "
        f"| {_fmt(soak['rss_first_minute_mb'])} | {_fmt(soak['rss_last_minute_mb'])} "
        f"| {_fmt(soak['slope_mb_per_min'], 3)} | {_fmt(soak['cpu_us_per_segment'])} |\n"
    )


def plot(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Four panels against the send rate: CPU/segment, loss, RSS, latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["rate"] for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    fig.suptitle(title)

    ax = axes[0][0]
    ax.plot(rates, [r["cpu_us_per_segment"] for r in results], "o-", label="measured")
    ax.plot(list(CPU_TARGET_US), list(CPU_TARGET_US.values()), "g^", ms=9, label="target")
    ax.plot(list(GO_CPU_US), list(GO_CPU_US.values()), "rs", ms=7, label="Go daemon 3.6.6")
    ax.set_ylabel("daemon CPU µs per segment")
    ax.set_ylim(bottom=0)

    ax = axes[0][1]
    ax.plot(rates, [r["loss_percent"] for r in results], "o-", label="measured")
    ax.plot(
        list(LOSS_TARGET_PERCENT), list(LOSS_TARGET_PERCENT.values()), "g^", ms=9, label="target"
    )
    ax.plot(list(GO_LOSS_PERCENT), list(GO_LOSS_PERCENT.values()), "rs", ms=7, label="Go daemon")
    ax.set_ylabel("segments lost %")
    ax.set_ylim(bottom=-0.5)

    ax = axes[1][0]
    ax.plot(rates, [r["rss_idle_mb"] for r in results], "o--", label="idle")
    ax.plot(rates, [r["rss_peak_mb"] for r in results], "o-", label="peak")
    ax.axhline(RSS_IDLE_TARGET_MB, color="g", ls=":", label="idle target")
    ax.plot(list(RSS_PEAK_TARGET_MB), list(RSS_PEAK_TARGET_MB.values()), "g^", ms=9,
            label="peak target")  # fmt: skip
    ax.set_ylabel("daemon RSS MiB")
    ax.set_ylim(bottom=0)

    ax = axes[1][1]
    ax.plot(rates, [r["latency_ms_p50"] for r in results], "o--", label="p50")
    ax.plot(rates, [r["latency_ms_p99"] for r in results], "o-", label="p99")
    ax.plot(list(P99_TARGET_MS), list(P99_TARGET_MS.values()), "g^", ms=9, label="p99 target")
    ax.set_ylabel("send → upload latency ms")
    ax.set_yscale("log")

    for ax in (a for row in axes for a in row):
        ax.set_xscale("log")
        ax.set_xticks(rates, [f"{r / 1000:g}k" for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("segments per second (1 KB each)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_soak(samples: Sequence[tuple[float, float]], path: Path, title: str) -> None:
    """RSS over the soak run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([t / 60 for t, _ in samples], [mb for _, mb in samples], "o-", ms=3)
    ax.set_xlabel("minutes")
    ax.set_ylabel("daemon RSS MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
