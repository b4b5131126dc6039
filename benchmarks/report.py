"""Results as a markdown table and a PNG plot (matplotlib: a benchmark-only dependency)."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Targets, ours/Go measured side by side (docs/benchmarks.md), and absolute ones.
CPU_RATIO_TARGET = {10: 0.5, 100: 0.5, 1000: 0.7, 4000: 0.7, 20000: 0.8}
LOSS_TARGET_PERCENT = {10000: 0.0, 20000: 0.0}
P99_TARGET_MS = {4000: 50.0}
RSS_IDLE_TARGET_MB = 55.0
OTLP_IDLE_RSS_TARGET_MB = 5.0  # receiver on minus off (issue 13)


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
        "| wakeups/s | context switches/seg | background busy % | machine busy % | steal % "
        "| RcvbufErrors "
        "| latency p90 ms | max ms "
        "| drain s | exit status | log warnings |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['rate']:,.0f} | {r['send_rate']:,.0f} | {_fmt(r['cpu_us_per_delivered'])} "
        f"| {_fmt(r['cpu_system_percent'], 0)} | {_fmt(r.get('wakeups_per_second', math.nan), 0)} "
        f"| {_fmt(r['switches_per_segment'], 2)} "
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


def comparison_table(summary: dict[str, Any]) -> str:
    """One row per rate: each daemon's CPU/segment, wakeups/s, loss and latency; ours/Go."""
    labels, ref = summary["labels"], summary.get("reference")
    results = summary["results"]
    ours = labels[0]
    other = ref if ref is not None else None
    if other is None:
        return ""
    ratio = {r["rate"]: r for r in summary.get("ratios", [])}
    by_rate = {r["rate"]: r for r in results[other]}
    header = (
        f"| rate (seg/s) | CPU µs/seg {ours} | CPU µs/seg {other} | **ours/Go** | min/min "
        f"| target | runs ours/Go | wakeups/s {ours} | wakeups/s {other} "
        f"| lost {ours} | lost {other} "
        f"| p50/p99 ms {ours} | p50/p99 ms {other} | RSS peak MB {ours} | RSS peak MB {other} |\n"
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = []
    for r in results[ours]:
        g = by_rate.get(r["rate"])
        if g is None:
            continue
        q = ratio.get(r["rate"], {})
        target = CPU_RATIO_TARGET.get(int(r["rate"]))
        goal = f"≤ {target:g}" if target else ""
        runs = ", ".join(_fmt(x, 2) for x in q.get("cpu_ratio_runs", []))
        rows.append(
            f"| {r['rate']:,.0f} | {_fmt(r['cpu_us_per_segment'])} "
            f"| {_fmt(g['cpu_us_per_segment'])} "
            f"| **{_fmt(q.get('cpu_ratio', math.nan), 2)}** "
            f"| {_fmt(q.get('cpu_ratio_min', math.nan), 2)} | {goal} "
            f"| {runs} | {_fmt(r['wakeups_per_second'], 0)} | {_fmt(g['wakeups_per_second'], 0)} "
            f"| {_lost(r)} | {_lost(g)} "
            f"| {_fmt(r['latency_ms_p50'], 0)} / {_fmt(r['latency_ms_p99'], 0)} "
            f"| {_fmt(g['latency_ms_p50'], 0)} / {_fmt(g['latency_ms_p99'], 0)} "
            f"| {_fmt(r['rss_peak_mb'])} | {_fmt(g['rss_peak_mb'])} |"
        )
    return header + "\n".join(rows) + "\n"


def _lost(r: dict[str, Any]) -> str:
    return f"{r['lost']:,} ({r['loss_percent']:.2g} %)"


def idle_table(summary: dict[str, Any]) -> str:
    """Each daemon with nothing to do: CPU, wakeups, RSS."""
    idle = summary.get("idle") or {}
    if not idle:
        return ""
    header = (
        "| idle | seconds | CPU ms per minute | CPU % of a core | wakeups/s | RSS MB |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {label} | {r['seconds']:.0f} | {_fmt(r['cpu_ms_per_minute'])} "
        f"| {_fmt(r['cpu_ms_per_minute'] / 600, 3)} | {_fmt(r['wakeups_per_second'], 2)} "
        f"| {_fmt(r['rss_mb'])} |"
        for label, r in idle.items()
    ]
    return header + "\n".join(rows) + "\n"


def span_table(results: Sequence[dict[str, Any]]) -> str:
    """The OTLP bridge, one row per span rate (no reference: the Go daemon takes no OTLP)."""
    header = (
        "| rate (spans/s) | spans sent | achieved/s | requests | refused | CPU µs/span "
        "| daemon CPU % | wakeups/s | lost (%) | p50 / p99 ms | answer p50 / p99 ms "
        "| RSS idle MB | RSS peak MB | uploads (gzip) | upload MB |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['rate']:,.0f} | {r['sent']:,} | {_fmt(r['send_rate'], 0)} | {r['requests']:,} "
        f"| {r['refused']:,} | {_fmt(r['cpu_us_per_span'])} | {_fmt(r['cpu_percent_sending'])} "
        f"| {_fmt(r['wakeups_per_second'], 0)} | {_lost(r)} "
        f"| {_fmt(r['latency_ms_p50'], 0)} / {_fmt(r['latency_ms_p99'], 0)} "
        f"| {_fmt(r['answer_ms_p50'])} / {_fmt(r['answer_ms_p99'])} "
        f"| {_fmt(r['rss_idle_mb'])} | {_fmt(r['rss_peak_mb'])} "
        f"| {r['uploads']:,} ({r['uploads_gzipped']:,}) | {_fmt(r['upload_bytes'] / 2**20, 2)} |"
        for r in results
    ]
    return header + "\n".join(rows) + "\n"


def span_diagnostics_table(results: Sequence[dict[str, Any]]) -> str:
    """How much the machine, the sink and the sender took; drain, exit, log problems."""
    header = (
        "| rate (spans/s) | background % | machine busy % | steal % | sink CPU % "
        "| sender CPU % | latency p90 / max ms | late | duplicates | drain s | exit "
        "| log problems |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['rate']:,.0f} | {_fmt(r['background_busy_percent'])} "
        f"| {_fmt(r['machine_busy_percent'])} | {_fmt(r['steal_percent'])} "
        f"| {_fmt(r['sink_cpu_percent'])} | {_fmt(r['sender_cpu_percent'])} "
        f"| {_fmt(r['latency_ms_p90'], 0)} / {_fmt(r['latency_ms_max'], 0)} | {r['late']:,} "
        f"| {r['duplicates']:,} | {_fmt(r['drain_seconds'])} | {r['exit_status']} "
        f"| {r['log_problems']} |"
        for r in results
    ]
    return header + "\n".join(rows) + "\n"


def otlp_idle_table(summary: dict[str, Any]) -> str:
    """xraytwisted idle with the OTLP receiver off and on: what the receiver costs at rest."""
    idle = summary.get("otlp_idle") or {}
    if not idle:
        return ""
    header = (
        "| xraytwisted idle | seconds | RSS at start MB | RSS after warm-up MB "
        "| CPU ms per minute | wakeups/s |\n"
        "|---|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {label} | {r['seconds']:.0f} | {_fmt(r['rss_start_mb'])} | {_fmt(r['rss_mb'])} "
        f"| {_fmt(r['cpu_ms_per_minute'])} | {_fmt(r['wakeups_per_second'], 2)} |"
        for label, r in idle.items()
    ]
    off, on = idle.get("receiver off"), idle.get("receiver on")
    if off and on:
        rows.append(
            f"| **on minus off** | | **{_fmt(on['rss_start_mb'] - off['rss_start_mb'], 2)}** "
            f"| **{_fmt(on['rss_mb'] - off['rss_mb'], 2)}** "
            f"| {_fmt(on['cpu_ms_per_minute'] - off['cpu_ms_per_minute'])} "
            f"| {_fmt(on['wakeups_per_second'] - off['wakeups_per_second'], 2)} |"
        )
    note = (
        f"\nTarget: the receiver on costs at most +{OTLP_IDLE_RSS_TARGET_MB:g} MB at idle. "
        "Both warm up with 200 segments; the receiver-on daemon also with one request of "
        "200 spans.\n"
    )
    return header + "\n".join(rows) + "\n" + note


_TLS = "HTTPS (a throwaway CA in AWS_CA_BUNDLE and SSL_CERT_FILE)"


def full_report(summary: dict[str, Any]) -> str:
    """results.md: what was run, the side-by-side tables, then each daemon's own."""
    m = summary["machine"]
    parts = [
        f"Measured {m['date']} on commit {m['commit']} (src {m['src_sha256']}), "
        f"{m['cpus']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python {m['python']}; "
        f"{summary['segment_bytes']}-byte segments, {summary['duration']:g} s per rate "
        f"({summary['low_duration']:g} s at 100/s and below), "
        f"median of {summary.get('repeat', 1)} (min/min: each daemon's lowest run); "
        f"uploads over {_TLS if summary.get('tls') else 'HTTP'}.",
        "",
    ]
    if summary.get("reference") is None:
        parts += ["No reference daemon: xraytwisted alone, no ratios.", ""]
    table = comparison_table(summary) if summary["results"] else ""
    if table:
        parts += ["## Side by side", "", table]
    idle = idle_table(summary)
    if idle:
        parts += ["## Idle", "", idle]
    for label, results in summary["results"].items():
        parts += [f"## {label}", "", markdown_table(results), diagnostics_table(results)]
    spans = summary.get("spans") or []
    if spans:
        shape = summary.get("span_shape", {})
        parts += [
            "## Spans (OTLP bridge)",
            "",
            f"xraytwisted alone: the Go daemon has no OTLP receiver, so there is no ratio. "
            f"~{shape.get('size', '?')}-byte spans in OTLP/HTTP protobuf requests of up to "
            f"{shape.get('batch', '?')} spans, at most {shape.get('delay', '?')} s apart "
            "(the SDK's BatchSpanProcessor); latency from the request's POST to the sink.",
            "",
            span_table(spans),
            span_diagnostics_table(spans),
        ]
    otlp_idle = otlp_idle_table(summary)
    if otlp_idle:
        parts += ["## Idle, OTLP receiver off and on", "", otlp_idle]
    for label, soak in (summary.get("soak") or {}).items():
        parts += [f"## Soak: {label}", "", soak_table(soak)]
    for label, lone in (summary.get("lone") or {}).items():
        parts += [f"lone segment, {label}: {lone}", ""]
    return "\n".join(parts) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    """Against the send rate, each daemon: CPU/segment, ours/Go, wakeups/s, loss, RSS, latency."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {path.name}", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, list[dict[str, Any]]] = summary["results"]
    m = summary["machine"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    fig.suptitle(
        f"{' vs '.join(summary['labels'])} ({m['commit']}, {m['date'][:10]}): "
        f"{summary['segment_bytes']}-byte segments, median of {summary.get('repeat', 1)}"
    )
    styles = ["o-", "s--", "^:"]
    panels = [
        (axes[0][0], "cpu_us_per_segment", "daemon CPU µs per segment", False),
        (axes[0][2], "wakeups_per_second", "wakeups/s (context switches, all threads)", True),
        (axes[1][0], "loss_percent", "segments lost %", False),
        (axes[1][1], "rss_peak_mb", "RSS peak MiB", False),
        (axes[1][2], "latency_ms_p99", "latency p99 ms (p50 dotted)", True),
    ]
    for ax, key, ylabel, log in panels:
        for style, (label, rows) in zip(styles, results.items(), strict=False):
            rates = [r["rate"] for r in rows]
            ax.plot(rates, [r[key] for r in rows], style, label=label)
            if key == "latency_ms_p99":
                ax.plot(rates, [r["latency_ms_p50"] for r in rows], style[0] + ":", alpha=0.6)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
    ax = axes[0][1]
    ratio_rows = summary.get("ratios", [])
    if ratio_rows:
        ax.plot([r["rate"] for r in ratio_rows], [r["cpu_ratio"] for r in ratio_rows], "o-",
                label="CPU per segment, ours/Go")  # fmt: skip
        ax.plot(list(CPU_RATIO_TARGET), list(CPU_RATIO_TARGET.values()), "g^", ms=9,
                label="target")  # fmt: skip
        ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("ratio ours / Go")
    ax.set_ylim(bottom=0)
    axes[1][1].axhline(RSS_IDLE_TARGET_MB, color="g", ls=":", label="idle target")
    for ax in (a for row in axes for a in row):
        ax.set_xscale("log")
        rates = sorted({r["rate"] for rows in results.values() for r in rows})
        ax.set_xticks(rates, [f"{r / 1000:g}k" if r >= 1000 else f"{r:g}" for r in rates])
        ax.minorticks_off()
        ax.set_xlabel("segments per second")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_soak(samples: Sequence[tuple[float, float]], path: Path, title: str) -> None:
    """RSS over the soak run."""
    try:
        import matplotlib
    except ImportError:
        return

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
