"""Run the benchmark sweep: xraytwisted and the Go daemon side by side.

    python -m benchmarks.run --out benchmarks/results/NAME

For every rate (default 10, 100, 1 000, 4 000, 10 000, 20 000 and 40 000
segments/s) it runs a fresh xraytwisted and, when its binary is found, a
fresh Go daemon 3.6.6, one after the other (who goes first alternates),
with the same sender and sink; then each daemon idles for ``--idle``
seconds.  It writes ``results.json`` (every number of every run),
``results.md`` (the side-by-side table with ours/Go ratios, then each
daemon's own tables) and ``results.png`` into ``--out``.  ``--soak 300``
adds a memory-flatness run and ``--lone`` the lone-segment check, for
both daemons.  ``--spans 100,1000,5000`` measures xraytwisted's OTLP
bridge at those spans/s (the Go daemon has no OTLP receiver: no ratios),
and ``--otlp-idle 60`` compares xraytwisted idle with the receiver off and
on.

The Go binary is ``--go-bin``, else ``$XRAY_GO_BIN``, else
``shared/reference-bin/xray-go-3.6.6`` beside the checkout (or beside the
folder of its worktree); ``--go-bin none`` measures xraytwisted alone.  The
run says which it did.  The binary is only measured, never part of the
project.

Another daemon can stand in for xraytwisted: ``--daemon-cmd`` is a command
line with placeholders ({endpoint}, {udp_address}, {udp_port},
{tcp_address}, {tcp_port}, {config}, {python}, {twistd}, {workdir});
``--config-template`` is a file rendered with the same placeholders into
{config}.
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
from typing import Any, TypeVar

from benchmarks import lone, report
from benchmarks.measure import Settings, measure, measure_idle
from benchmarks.processes import DEFAULT_COMMAND, PLACEHOLDERS, REPO, Sink, set_priority
from benchmarks.soak import soak
from benchmarks.span_measure import SpanShape, measure_spans

T = TypeVar("T")
GO_BINARY = "xray-go-3.6.6"
GO_LABEL = "Go 3.6.6"
# The Go daemon has no endpoint flag: the sink's URL goes in its cfg.yaml.
GO_COMMAND = "{binary} -o -n us-east-2 -c {config} -b {udp_address} -t {tcp_address}"
GO_TEMPLATE = REPO / "benchmarks" / "go-cfg.yaml.template"
DEFAULT_RATES = "10,100,1000,4000,10000,20000,40000"
# xraytwisted with its OTLP receiver on a free port (--spans, --otlp-idle).
SPAN_COMMAND = DEFAULT_COMMAND + " --otlp-address {otlp_address}"


def find_go(explicit: str | None, env: dict[str, str] | None = None) -> Path | None:
    """The Go daemon's binary: the flag, $XRAY_GO_BIN, or shared/reference-bin near REPO."""
    env = dict(os.environ) if env is None else env
    if explicit == "none":
        return None
    given = explicit or env.get("XRAY_GO_BIN")
    if given:
        path = Path(given)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SystemExit(f"--go-bin: {path} is not an executable file")
        return path
    # ../shared from a checkout; ../../shared from a worktree in a folder beside it.
    for base in (REPO.parent, REPO.parent.parent):
        path = base / "shared" / "reference-bin" / GO_BINARY
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


@dataclasses.dataclass(frozen=True)
class Contender:
    """One daemon of the comparison."""

    label: str
    settings: Settings
    reference: bool = False  # the one ratios are taken against


def duration_for(rate: float, duration: float, low_duration: float) -> float:
    """Low rates run longer, so that each run holds enough batches."""
    return max(duration, low_duration) if rate <= 100 else duration


def order(contenders: list[T], turn: int) -> list[T]:
    """Alternate who goes first, so that neither always runs right after the other."""
    return contenders if turn % 2 == 0 else contenders[::-1]


def ratios(ours: list[dict[str, Any]], ref: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours/reference per rate: CPU per segment and wakeups per second (medians, and per run)."""
    rows = []
    by_rate = {r["rate"]: r for r in ref}
    for r in ours:
        g = by_rate.get(r["rate"])
        if g is None:
            continue
        pairs = zip(r.get("runs", [r]), g.get("runs", [g]), strict=False)
        rows.append(
            {
                "rate": r["rate"],
                "cpu_ratio": _ratio(r["cpu_us_per_segment"], g["cpu_us_per_segment"]),
                # Issue 15's measure: the lowest of each daemon's runs (noise only adds CPU).
                "cpu_ratio_min": _ratio(
                    min(a["cpu_us_per_segment"] for a in r.get("runs", [r])),
                    min(b["cpu_us_per_segment"] for b in g.get("runs", [g])),
                ),
                "wakeups_ratio": _ratio(r["wakeups_per_second"], g["wakeups_per_second"]),
                # Runs n of both daemons ran back to back: their ratios show the spread.
                "cpu_ratio_runs": [
                    _ratio(a["cpu_us_per_segment"], b["cpu_us_per_segment"]) for a, b in pairs
                ],
            }
        )
    return rows


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


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
    parser.add_argument("--rates", default=DEFAULT_RATES, help="segments/s")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per rate")
    parser.add_argument(
        "--low-duration", type=float, default=30.0, help="seconds per rate at 100/s and below"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per rate (median reported)")
    parser.add_argument("--idle", type=float, default=60.0, help="idle seconds per run (0: none)")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="the sink serves HTTPS with a throwaway CA, given to both daemons as AWS_CA_BUNDLE",
    )
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/<date-time>")
    parser.add_argument("--daemon-cmd", default=DEFAULT_COMMAND, help="the daemon under test")
    parser.add_argument("--config-template", type=Path, help="rendered into {config}")
    parser.add_argument("--label", default="xraytwisted", help="names the run in the outputs")
    parser.add_argument(
        "--go-bin",
        help=f"the Go daemon to compare with ('none': no comparison; default: $XRAY_GO_BIN "
        f"or shared/reference-bin/{GO_BINARY} beside the checkout)",
    )
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
    parser.add_argument(
        "--skip-sweep", action="store_true",
        help="no segment rates: only --spans / --idle / --otlp-idle / --soak / --lone",
    )  # fmt: skip
    parser.add_argument("--spans", default="", help="spans/s to measure the OTLP bridge at")
    parser.add_argument(
        "--otlp-idle", type=float, default=0.0,
        help="idle s per run of xraytwisted with the OTLP receiver off, then on (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--span-daemon-cmd", default=SPAN_COMMAND,
        help="the daemon under test for --spans / --otlp-idle (must name {otlp_address})",
    )  # fmt: skip
    parser.add_argument("--span-size", type=int, default=1024, help="bytes per span")
    parser.add_argument(
        "--span-batch", type=int, default=512, help="spans per request, at most (SDK: 512)"
    )
    parser.add_argument(
        "--span-delay", type=float, default=5.0, help="s between exports, at most (SDK: 5)"
    )
    return parser.parse_args(argv)


def contenders(args: argparse.Namespace) -> list[Contender]:
    """xraytwisted (or --daemon-cmd) first, then the Go daemon if its binary is found."""
    common: dict[str, Any] = {
        "size": args.size,
        "drain_idle": args.drain_idle,
        "drain_max": args.drain_max,
        "quiet_wait": args.quiet_wait,
    }
    ours = Contender(
        args.label,
        Settings(command=args.daemon_cmd, config_template=args.config_template, **common),
    )
    go = find_go(args.go_bin)
    if go is None:
        print(
            f"Go daemon not found (--go-bin, $XRAY_GO_BIN, shared/reference-bin/{GO_BINARY}): "
            f"measuring {args.label} alone, no ratios",
            file=sys.stderr,
        )
        return [ours]
    print(f"comparing with {GO_LABEL}: {go}", file=sys.stderr)
    command = GO_COMMAND.replace("{binary}", str(go))
    settings = Settings(command=command, config_template=GO_TEMPLATE, **common)
    return [ours, Contender(GO_LABEL, settings, reference=True)]


def _slug(label: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")


def span_shape(args: argparse.Namespace) -> SpanShape:
    return SpanShape(size=args.span_size, batch=args.span_batch, delay=args.span_delay)


def span_sweep(
    sink: Sink, args: argparse.Namespace, ours: Contender, seqs: Any, out: Path
) -> list[dict[str, Any]]:
    """Every --spans rate, --repeat times, each against a fresh daemon: medians per rate."""
    settings = dataclasses.replace(ours.settings, command=args.span_daemon_cmd)
    rates = [float(r) for r in args.spans.split(",")]
    runs: list[list[dict[str, Any]]] = [[] for _ in rates]
    for n in range(args.repeat):
        for index, rate in enumerate(rates):
            seconds = duration_for(rate, args.duration, args.low_duration)
            print(f"{ours.label} spans: {rate:,.0f}/s for {seconds:g} s ...", file=sys.stderr)
            name = f"{_slug(ours.label)}-spans-{rate:.0f}-{n + 1}"
            result = measure_spans(
                sink, settings, rate, seconds, next(seqs) << 40, out, span_shape(args), name
            )
            runs[index].append(dataclasses.asdict(result))
            print(report.span_table(runs[index][-1:]).splitlines()[-1], file=sys.stderr)
    return [combine(r) for r in runs]


def otlp_idle(sink: Sink, args: argparse.Namespace, ours: Contender, out: Path) -> dict[str, Any]:
    """xraytwisted idle with the OTLP receiver off and on, back to back, alternating."""
    variants = {
        "receiver off": (ours.settings, False),
        "receiver on": (dataclasses.replace(ours.settings, command=args.span_daemon_cmd), True),
    }
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in variants}
    for n in range(args.repeat):
        for label in order(list(variants), n):
            settings, spans = variants[label]
            print(f"{ours.label}, {label}: idle for {args.otlp_idle:g} s ...", file=sys.stderr)
            name = f"{_slug(ours.label)}-otlp-idle-{_slug(label)}-{n + 1}"
            idle = measure_idle(sink, settings, args.otlp_idle, out, name=name, warm_spans=spans)
            runs[label].append(dataclasses.asdict(idle))
    return {label: combine(r) for label, r in runs.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_priority(args.nice)
    out: Path = args.out or REPO / "benchmarks" / "results" / time.strftime("%Y%m%d-%H%M%S")
    # Daemons run in out (their cwd) and are given paths under it: a relative
    # --out would point them at out/out/...
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    daemons = contenders(args)
    summary: dict[str, Any] = {
        "labels": [c.label for c in daemons],
        "reference": next((c.label for c in daemons if c.reference), None),
        "nice": args.nice,
        "commands": {c.label: c.settings.command for c in daemons},
        "duration": args.duration,
        "low_duration": args.low_duration,
        "repeat": args.repeat,
        "segment_bytes": args.size,
        "tls": args.tls,
        "machine": machine(),
        "results": {},
        "idle": {},
        "spans": [],
        "otlp_idle": {},
    }
    seqs = iter(range(1, 1 << 20))
    with Sink(tls_dir=out / "tls" if args.tls else None) as sink:
        if not args.skip_sweep:
            rates = [float(r) for r in args.rates.split(",")]
            runs: dict[str, list[list[dict[str, Any]]]] = {
                c.label: [[] for _ in rates] for c in daemons
            }
            for n in range(args.repeat):
                for index, rate in enumerate(rates):
                    seconds = duration_for(rate, args.duration, args.low_duration)
                    for c in order(daemons, n + index):
                        print(f"{c.label}: {rate:,.0f}/s for {seconds:g} s ...", file=sys.stderr)
                        name = f"{_slug(c.label)}-{rate:.0f}-{n + 1}"
                        result = measure(
                            sink, c.settings, rate, seconds, next(seqs) << 40, out, name=name
                        )
                        runs[c.label][index].append(dataclasses.asdict(result))
                        row = report.markdown_table(runs[c.label][index][-1:]).splitlines()[-1]
                        print(row, file=sys.stderr)
            for c in daemons:
                summary["results"][c.label] = [combine(r) for r in runs[c.label]]
        if args.idle:
            idle_runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in daemons}
            for n in range(args.repeat):
                for c in order(daemons, n):
                    print(f"{c.label}: idle for {args.idle:g} s ...", file=sys.stderr)
                    name = f"{_slug(c.label)}-idle-{n + 1}"
                    idle = measure_idle(sink, c.settings, args.idle, out, name=name)
                    idle_runs[c.label].append(dataclasses.asdict(idle))
            summary["idle"] = {label: combine(r) for label, r in idle_runs.items()}
        if args.spans:
            summary["span_command"] = args.span_daemon_cmd
            summary["span_shape"] = dataclasses.asdict(span_shape(args))
            summary["spans"] = span_sweep(sink, args, daemons[0], seqs, out)
        if args.otlp_idle:
            summary["otlp_idle"] = otlp_idle(sink, args, daemons[0], out)
        if args.soak:
            summary["soak"] = {}
            for c in daemons:
                print(f"{c.label}: soak at {args.soak_rate:,.0f}/s for {args.soak:g} s ...",
                      file=sys.stderr)  # fmt: skip
                summary["soak"][c.label] = soak(
                    sink, c.settings, args.soak_rate, args.soak, args.soak_every,
                    next(seqs) << 40, out,
                )  # fmt: skip
    if args.lone:
        summary["lone"] = {}
        for c in daemons:
            print(f"{c.label}: lone segment ...", file=sys.stderr)
            summary["lone"][c.label] = lone.check(
                c.settings.command, 5, 2.0, out / f"lone-{_slug(c.label)}",
                c.settings.config_template,
            )  # fmt: skip
    ref, ours = summary["reference"], daemons[0].label
    if ref is not None and summary["results"]:
        summary["ratios"] = ratios(summary["results"][ours], summary["results"][ref])
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = report.full_report(summary)
    (out / "results.md").write_text(text)
    print(text)
    if summary["results"]:
        report.plot(summary, out / "results.png")
    print(f"written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
