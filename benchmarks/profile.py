"""Where the daemon's CPU goes: py-spy under load, summarised as text.

For each rate this runs one normal measurement (``benchmarks.measure``) with
``py-spy record`` attached to the daemon for the send window (200 Hz,
``--nonblocking`` so the daemon is never paused), plus one ``py-spy dump``
half-way through.  Samples whose innermost line is a blocking call (epoll,
a lock, a queue) count as waiting; the rest are the CPU profile, summed by
function and by line.  It writes, per rate, into ``--out``:

* ``profile-<rate>.speedscope.json``: open it at https://www.speedscope.app
* ``profile-<rate>.txt``: the top functions by own and by total time, and lines
* ``dump-<rate>.txt``: the daemon's stack at one moment

py-spy itself is a benchmark-only dependency (``pip install py-spy``); it
uses some CPU of its own, so the CPU numbers of a profiled run are a little
worse than those of ``benchmarks.run``.

    python -m benchmarks.profile --rates 4000,20000 --duration 10 --out DIR
"""

from __future__ import annotations

import argparse
import json
import linecache
import re
import shutil
import subprocess
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.measure import RateResult, Settings, measure
from benchmarks.processes import DEFAULT_COMMAND, Daemon, Sink, set_priority

SAMPLE_HZ = 200


# A sample whose innermost Python line is one of these calls is waiting, not
# working (py-spy's own idle detection misses epoll_wait on this machine).
_BLOCKING = re.compile(r"\.(poll|select|wait|acquire|get)\(|^\s*(waiter\.acquire|sleep)\(")


# The reactor's own call chain: on the stack of nearly every sample, so left
# out of the "by total time" table.
_PLUMBING = re.compile(
    r"\((twisted/application/|twisted/scripts/|twisted/python/(log|context)\.py|"
    r"twisted/internet/(base|epollreactor|posixbase)\.py|.*/bin/twistd)"
)


# Where a sample's time goes: the innermost frame on its stack that matches
# one of these (in this order of precedence per frame) names its category.
_HTTP = r"\((treq|twisted/web|hyperlink|idna)/|^HostnameEndpoint|\(twisted/internet/endpoints"
CATEGORIES = [
    ("UDP receive (recvfrom)", re.compile(r"^Port\.doRead \(twisted/internet/udp\.py")),
    ("ingest + buffer", re.compile(r"\(xraytwisted/(ingest/|pipeline/buffer)")),
    ("JSON request body", re.compile(r"^(trace_segments_body|json_string_content)")),
    ("SigV4 signing", re.compile(r"\(xraytwisted/aws/sigv4\.py|^Uploader\.signed_headers")),
    ("TCP send (socket.send)", re.compile(r"^(untilConcludes|Connection\.writeSomeData)")),
    ("logging", re.compile(r"\(xraytwisted/observe/logs\.py|\(twisted/logger/")),
    ("HTTP client (treq, twisted.web, hyperlink, idna)", re.compile(_HTTP)),
    ("batcher", re.compile(r"\(xraytwisted/pipeline/(batcher|backoff|uploader)")),
    ("timers (callLater)", re.compile(r"^(ReactorBase\.(callLater|runUntilCurrent)|DelayedCall)")),
]


@dataclass
class FunctionTime:
    name: str  # function (file:line)
    own: float  # % of CPU samples with this function (or line) running
    total: float  # % of CPU samples with this function anywhere on the stack


@dataclass
class Summary:
    samples: int  # all samples of all threads
    cpu_samples: int  # samples that were not waiting (see _BLOCKING)
    functions: list[FunctionTime]  # by own time
    lines: list[FunctionTime]  # by own time
    categories: list[tuple[str, float]]  # (category, % of CPU samples), largest first


def _is_blocking(frame: dict[str, Any]) -> bool:
    try:
        line = linecache.getline(frame.get("file") or "", frame.get("line") or 0)
    except (OSError, ValueError):  # "<frozen ...>" and other unreadable names
        return False
    return bool(_BLOCKING.search(line))


def summarize(speedscope: Path) -> Summary:
    """Own and total time per function and per line, from a line-level speedscope file."""
    data = json.loads(speedscope.read_text())
    frames = data["shared"]["frames"]
    func_of = [f"{f['name']} ({_short(f.get('file') or '?')})" for f in frames]
    line_of = [f"{f['name']} ({_short(f.get('file') or '?')}:{f.get('line') or 0})" for f in frames]
    blocking = [_is_blocking(f) for f in frames]
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    own_line: Counter[str] = Counter()
    category: Counter[str] = Counter()
    category_of: dict[int, str | None] = {}
    samples = cpu = 0
    for profile in data["profiles"]:
        for stack in profile["samples"]:  # root first, leaf last; one entry per sample
            samples += 1
            if not stack or blocking[stack[-1]]:
                continue
            cpu += 1
            own[func_of[stack[-1]]] += 1
            own_line[line_of[stack[-1]]] += 1
            for name in {func_of[i] for i in stack}:
                total[name] += 1
            category[_category(stack, line_of, category_of)] += 1
    scale = 100 / max(cpu, 1)
    functions = [FunctionTime(n, own[n] * scale, total[n] * scale) for n in total]
    functions.sort(key=lambda f: (-f.own, -f.total))
    lines = [FunctionTime(n, c * scale, c * scale) for n, c in own_line.most_common()]
    categories = [(name, count * scale) for name, count in category.most_common()]
    return Summary(samples, cpu, functions, lines, categories)


def _category(stack: list[int], names: list[str], cache: dict[int, str | None]) -> str:
    """The category of the innermost frame of ``stack`` that has one, else "other"."""
    for index in reversed(stack):
        if index not in cache:
            cache[index] = next((c for c, rx in CATEGORIES if rx.search(names[index])), None)
        found = cache[index]
        if found is not None:
            return found
    return "other (reactor loop, Deferreds, GC)"


def _short(path: str) -> str:
    """A path from its package on: .../site-packages/twisted/x.py -> twisted/x.py."""
    for marker in ("site-packages/", "/src/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            return path.split("/", 1)[1] if marker == "/lib/python3" else path
    return path


def text_report(result: RateResult, summary: Summary, seconds: float, top: int) -> str:
    per_seg = result.cpu_us_per_segment
    busy = 100 * summary.cpu_samples / (SAMPLE_HZ * seconds)
    lines = [
        f"rate {result.rate:,.0f} seg/s for {result.duration:g} s: daemon CPU {per_seg:.1f} "
        f"µs/segment, {result.cpu_percent_sending:.0f} % of a core while sending",
        f"{summary.samples} samples at {SAMPLE_HZ} Hz, {summary.cpu_samples} of them working "
        f"(≈ {busy:.0f} % of a core; the rest waited in epoll or a lock)",
        "",
        "Where the CPU goes (innermost matching frame; µs/seg = % x the measured µs/segment):",
        *(
            f"{pct:6.1f} % {pct * per_seg / 100:6.2f} µs/seg  {name}"
            for name, pct in summary.categories
        ),
        "",
        f"Top {top} functions by own time:",
        f"{'own %':>6} {'total %':>7} {'µs/seg':>6}  function",
    ]
    for f in summary.functions[:top]:
        lines.append(f"{f.own:6.1f} {f.total:7.1f} {f.own * per_seg / 100:6.2f}  {f.name}")
    lines += [
        "",
        f"Top {top} functions by total time (leaving out the reactor's own call chain):",
        f"{'total %':>7} {'own %':>6}  function",
    ]
    by_total = [f for f in summary.functions if not _PLUMBING.search(f.name)]
    for f in sorted(by_total, key=lambda f: -f.total)[:top]:
        lines.append(f"{f.total:7.1f} {f.own:6.1f}  {f.name}")
    lines += ["", f"Top {top} lines by own time:", f"{'own %':>6}  line"]
    for f in summary.lines[:top]:
        lines.append(f"{f.own:6.1f}  {f.name}")
    return "\n".join(lines) + "\n"


class PySpy:
    """py-spy record for the send window and one dump half-way (the on_send_start hook)."""

    def __init__(self, out: Path, rate: int, seconds: float) -> None:
        self.exe = shutil.which("py-spy") or "py-spy"
        self.speedscope = out / f"profile-{rate}.speedscope.json"
        self.dump_path = out / f"dump-{rate}.txt"
        self.seconds = seconds
        self.proc: subprocess.Popen[bytes] | None = None
        self.timer: threading.Timer | None = None

    def __call__(self, daemon: Daemon) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe, "record", "--pid", str(daemon.pid), "--duration", str(int(self.seconds)),
                "--rate", str(SAMPLE_HZ), "--nonblocking",
                "--format", "speedscope", "-o", str(self.speedscope),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.timer = threading.Timer(self.seconds / 2, self._dump, (daemon.pid,))
        self.timer.start()

    def _dump(self, pid: int) -> None:
        with self.dump_path.open("wb") as f:
            subprocess.run([self.exe, "dump", "--pid", str(pid)], stdout=f, stderr=f, check=False)

    def wait(self) -> None:
        if self.timer is not None:
            self.timer.join()
        if self.proc is not None:
            self.proc.wait(60)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="4000,20000")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--daemon-cmd", default=DEFAULT_COMMAND)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="nice value of all benchmark processes (-10: before others)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"))
    args = parser.parse_args(argv)
    set_priority(args.nice)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(command=args.daemon_cmd)
    with Sink() as sink:
        for index, rate in enumerate(int(r) for r in args.rates.split(",")):
            spy = PySpy(args.out, rate, args.duration)
            result = measure(
                sink, settings, rate, args.duration, (index + 1) << 40, args.out, on_send_start=spy
            )
            spy.wait()
            report = text_report(result, summarize(spy.speedscope), args.duration, args.top)
            (args.out / f"profile-{rate}.txt").write_text(report)
            print(report)


if __name__ == "__main__":
    main()
