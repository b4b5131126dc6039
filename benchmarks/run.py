"""Run the benchmark sweep (and optionally the soak and lone-segment checks).

    python -m benchmarks.run --rates 1000,4000,10000,20000,40000 --duration 10 \\
        --out benchmarks/results/NAME

writes ``results.json``, ``results.md`` and ``results.png`` into ``--out``.
``--soak 300`` adds a 5-minute memory-flatness run (``soak.json``,
``soak.png``); ``--lone`` adds the lone-segment latency check.

Any daemon can be measured: ``--daemon-cmd`` is a command line with
placeholders ({endpoint}, {udp_address}, {udp_port}, {tcp_address},
{tcp_port}, {config}, {python}, {twistd}, {workdir}); ``--config-template``
is a file rendered with the same placeholders into {config}.  For the Go
daemon, for example:

    python -m benchmarks.run --daemon-cmd "/usr/bin/xray -o -n us-east-2 \\
        -c {config} -b {udp_address} -t {tcp_address}" \\
        --config-template benchmarks/go-cfg.yaml.template --label "Go 3.6.6"
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import lone, report
from benchmarks.measure import Settings, measure
from benchmarks.processes import DEFAULT_COMMAND, PLACEHOLDERS, REPO, Sink, set_priority
from benchmarks.soak import soak


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), "")
    except OSError:
        pass
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(path.read_bytes())
    try:
        with open("/proc/self/autogroup") as f:
            autogroup = f.read().strip()  # e.g. "/autogroup-109 nice -10"
    except OSError:
        autogroup = ""
    return {
        "src_sha256": digest.hexdigest()[:12],  # the tree may differ from the commit
        "autogroup": autogroup,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "commit": commit,
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs of one rate: the median of every number, every run kept under "runs"."""
    if len(runs) == 1:
        return runs[0]
    combined: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            combined[key] = statistics.median(run[key] for run in runs)
        else:
            combined[key] = value
    combined["log_problems"] = sum(run["log_problems"] for run in runs)
    combined["runs"] = runs
    return combined


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    placeholders = ", ".join(f"{{{k}}}: {v}" for k, v in PLACEHOLDERS.items())
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Placeholders in --daemon-cmd and --config-template: {placeholders}",
    )
    parser.add_argument("--rates", default="1000,4000,10000,20000,40000", help="segments/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate (median reported)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/<date-time>")
    parser.add_argument("--daemon-cmd", default=DEFAULT_COMMAND, help="the daemon under test")
    parser.add_argument("--config-template", type=Path, help="rendered into {config}")
    parser.add_argument("--label", default="xraytwisted", help="names the run in the outputs")
    parser.add_argument("--size", type=int, default=1024, help="bytes per segment datagram")
    parser.add_argument("--drain-idle", type=float, default=3.0)
    parser.add_argument("--drain-max", type=float, default=30.0)
    parser.add_argument(
        "--quiet-wait", type=float, default=0.0,
        help="before each rate, wait up to this many s for a second with the machine <10%% busy",
    )  # fmt: skip
    parser.add_argument("--soak", type=float, default=0.0, help="also soak for this many s")
    parser.add_argument("--soak-rate", type=float, default=4000.0)
    parser.add_argument("--soak-every", type=float, default=5.0, help="RSS sample interval")
    parser.add_argument("--lone", action="store_true", help="also run the lone-segment check")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of all benchmark processes (-10: before others)",
    )
    parser.add_argument("--skip-sweep", action="store_true", help="only --soak / --lone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_priority(args.nice)
    out: Path = args.out or REPO / "benchmarks" / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        command=args.daemon_cmd,
        config_template=args.config_template,
        size=args.size,
        drain_idle=args.drain_idle,
        drain_max=args.drain_max,
        quiet_wait=args.quiet_wait,
    )
    summary: dict[str, Any] = {
        "label": args.label,
        "nice": args.nice,
        "daemon_cmd": args.daemon_cmd,
        "duration": args.duration,
        "segment_bytes": args.size,
        "machine": machine(),
    }
    with Sink() as sink:
        if not args.skip_sweep:
            results = []
            rates = [float(r) for r in args.rates.split(",")]
            for index, rate in enumerate(rates):
                runs = []
                for n in range(args.repeat):
                    print(f"rate {rate:,.0f}/s for {args.duration:g} s ...", file=sys.stderr)
                    first_seq = (index * args.repeat + n + 1) << 40
                    name = f"daemon-{rate:.0f}" + (f"-{n + 1}" if args.repeat > 1 else "")
                    result = measure(sink, settings, rate, args.duration, first_seq, out, name=name)
                    runs.append(dataclasses.asdict(result))
                    print(report.markdown_table(runs[-1:]).splitlines()[-1], file=sys.stderr)
                results.append(combine(runs))
            summary["results"] = results
            commit = summary["machine"]["commit"]
            title = (
                f"{args.label} ({commit}): {args.size}-byte segments, {args.duration:g} s per rate"
                + (f", median of {args.repeat}" if args.repeat > 1 else "")
            )
            (out / "results.md").write_text(
                report.markdown_table(results) + "\n" + report.diagnostics_table(results)
            )
            report.plot(results, out / "results.png", title)
        if args.soak:
            print(f"soak at {args.soak_rate:,.0f}/s for {args.soak:g} s ...", file=sys.stderr)
            summary["soak"] = soak(
                sink, settings, args.soak_rate, args.soak, args.soak_every, 0xA << 40, out
            )
            (out / "soak.md").write_text(report.soak_table(summary["soak"]))
            report.plot_soak(
                summary["soak"]["rss_samples"],
                out / "soak.png",
                f"{args.label}: RSS at {args.soak_rate:,.0f} seg/s",
            )
    if args.lone:
        print("lone segment ...", file=sys.stderr)
        summary["lone"] = lone.check(args.daemon_cmd, 5, 2.0, out / "lone", args.config_template)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name in ("results.md", "soak.md"):
        if (out / name).exists():
            print((out / name).read_text())
    if "lone" in summary:
        print("lone segment:", json.dumps(summary["lone"]))
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
