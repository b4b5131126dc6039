"""Print the traces in a local-sink file as indented trees.

``python -m xraytwisted.view traces.jsonl [--trace ID] [--metadata]``.
Documents are grouped by ``trace_id``; subsegments an SDK streamed as their
own documents (``"type": "subsegment"`` with ``parent_id``) and downstream
services' segments are put back under their parents; siblings are sorted by
start time.  Each trace gets one summary line, then one line per
(sub)segment: offset from the trace start, name, duration, flags, HTTP
call, annotations and the first exception (and, with ``--metadata``, its
metadata).  A totals line ends the output.

A file is read to its end and printed sorted by start time.  From a pipe
(``xray --local-sink - | python -m xraytwisted.view -``) or with
``--follow``, each trace is printed as soon as it is complete (``Streamer``),
and Ctrl-C or a closed stdout end the viewer quietly.

Rendering and ``Streamer`` are pure (``Streamer`` takes its clock), so the
output and the completion rules can be tested exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

INDENT = "  "


@dataclass
class Node:
    doc: dict[str, Any]
    segment: bool  # a segment (a service's own document), not a subsegment
    children: list[Node] = field(default_factory=list)
    missing_parent: str = ""  # a streamed subsegment whose parent is not in the file

    @property
    def start(self) -> float | None:
        return _number(self.doc.get("start_time"))

    @property
    def end(self) -> float | None:
        return _number(self.doc.get("end_time"))

    def walk(self) -> Iterable[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass
class Trace:
    trace_id: str
    roots: list[Node]
    documents: int

    def nodes(self) -> Iterable[Node]:
        for root in self.roots:
            yield from root.walk()

    @property
    def start(self) -> float | None:
        starts = [s for s in (n.start for n in self.nodes()) if s is not None]
        return min(starts) if starts else None


@dataclass
class Collection:
    traces: list[Trace]
    documents: int  # segment documents read (lines with a trace_id)
    skipped: int  # lines that are not JSON objects
    # Lines without a trace_id, by kind (see PAYLOAD_KINDS): OTLP payloads,
    # other raw bodies, JSON objects.
    payloads: dict[str, int] = field(default_factory=dict)

    @property
    def other(self) -> int:
        return sum(self.payloads.values())


# What a line without a trace_id is, in the order the totals name them.  The
# local sink writes bodies that are not JSON objects as {"raw": ...}; ADOT's
# UDP exporter sends OTLP protobuf as base64 behind these prefixes.
PAYLOAD_KINDS: tuple[tuple[str, str], ...] = (
    ("T1S", "OTLP span payload|s| (T1S: sampled; not decoded)"),
    ("T1U", "OTLP span payload|s| (T1U: unsampled; not decoded)"),
    ("M1", "OTLP metrics payload|s| (M1; not decoded)"),
    ("raw", "raw payload|s| (not JSON)"),
    ("object", "JSON object|s| without trace_id"),
)


def payload_kind(doc: dict[str, Any]) -> str:
    """Which PAYLOAD_KINDS entry a document without a trace_id is."""
    raw = doc.get("raw")
    if len(doc) != 1 or not isinstance(raw, str):
        return "object"
    return next((prefix for prefix, _ in PAYLOAD_KINDS[:3] if raw.startswith(prefix)), "raw")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_documents(lines: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a JSON Lines text, and how many lines were not one."""
    documents: list[dict[str, Any]] = []
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            skipped += 1
            continue
        if isinstance(value, dict):
            documents.append(value)
        else:
            skipped += 1
    return documents, skipped


def _better(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """Whether ``new`` replaces ``old`` for the same id: complete beats in progress."""
    return not new.get("in_progress") or bool(old.get("in_progress"))


def _tree(doc: dict[str, Any], segment: bool, index: dict[str, Node]) -> Node:
    node = Node(doc, segment)
    ident = doc.get("id")
    if isinstance(ident, str):
        index.setdefault(ident, node)
    subsegments = doc.get("subsegments")
    if isinstance(subsegments, list):
        node.children = [_tree(s, False, index) for s in subsegments if isinstance(s, dict)]
    return node


def _sort_key(node: Node) -> tuple[float, int]:
    start = node.start
    return (start, 0) if start is not None else (math.inf, 1)


def build_trace(trace_id: str, docs: Sequence[dict[str, Any]]) -> Trace:
    """One trace's documents as trees (docs in file order)."""
    # An SDK may send an in-progress document, then the complete one.
    by_id: dict[str, dict[str, Any]] = {}
    unnamed: list[dict[str, Any]] = []
    for doc in docs:
        ident = doc.get("id")
        if not isinstance(ident, str):
            unnamed.append(doc)
        elif ident not in by_id or _better(doc, by_id[ident]):
            by_id[ident] = doc
    index: dict[str, Node] = {}
    tops = [
        _tree(doc, doc.get("type") != "subsegment", index) for doc in [*by_id.values(), *unnamed]
    ]
    parent_of: dict[int, Node] = {}
    for top in tops:
        for node in top.walk():
            for child in node.children:
                parent_of[id(child)] = node
    roots: list[Node] = []
    for top in tops:
        parent_id = top.doc.get("parent_id")
        parent = index.get(parent_id) if isinstance(parent_id, str) else None
        if parent is not None and not _is_ancestor(top, parent, parent_of):
            parent.children.append(top)
            parent_of[id(top)] = parent
            continue
        if not top.segment and isinstance(parent_id, str):
            top.missing_parent = parent_id
        roots.append(top)
    for root in roots:
        for node in root.walk():
            node.children.sort(key=_sort_key)
    roots.sort(key=_sort_key)
    return Trace(trace_id, roots, len(docs))


def _is_ancestor(candidate: Node, node: Node, parent_of: dict[int, Node]) -> bool:
    """Whether ``candidate`` is ``node`` or above it (attaching would make a cycle)."""
    current: Node | None = node
    while current is not None:
        if current is candidate:
            return True
        current = parent_of.get(id(current))
    return False


def collect(lines: Iterable[str]) -> Collection:
    documents, skipped = read_documents(lines)
    grouped: dict[str, list[dict[str, Any]]] = {}
    payloads: dict[str, int] = {}
    for doc in documents:
        trace_id = doc.get("trace_id")
        if isinstance(trace_id, str) and trace_id:
            grouped.setdefault(trace_id, []).append(doc)
        else:
            kind = payload_kind(doc)
            payloads[kind] = payloads.get(kind, 0) + 1
    traces = sort_traces([build_trace(trace_id, docs) for trace_id, docs in grouped.items()])
    return Collection(traces, sum(map(len, grouped.values())), skipped, payloads)


def sort_traces(traces: list[Trace]) -> list[Trace]:
    return sorted(
        traces, key=lambda t: (math.inf, t.trace_id) if t.start is None else (t.start, "")
    )


def is_complete(trace: Trace) -> bool:
    """Whether the trace's root segments have all ended (streamed parts may still come)."""
    return bool(trace.roots) and all(
        root.segment and root.end is not None and not root.doc.get("in_progress")
        for root in trace.roots
    )


# ---------------------------------------------------------------------------
# Rendering


def _ms(seconds: float) -> str:
    # One precision everywhere, down to the microsecond: local subsegments
    # often take less than a millisecond.
    return f"{seconds * 1000:.3f} ms"


def _duration(node: Node) -> str:
    if node.doc.get("in_progress"):
        return "in progress"
    start, end = node.start, node.end
    if start is None or end is None:
        return "no end_time" if start is not None else "no start_time"
    return _ms(end - start)


def _scalar(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _http(doc: dict[str, Any]) -> str:
    http = doc.get("http")
    if not isinstance(http, dict):
        return ""
    request, response = http.get("request"), http.get("response")
    parts: list[str] = []
    if isinstance(request, dict):
        parts.extend(_scalar(request[k]) for k in ("method", "url") if k in request)
    if isinstance(response, dict) and "status" in response:
        parts.append(_scalar(response["status"]))
    return " ".join(parts)


def _annotations(doc: dict[str, Any]) -> str:
    annotations = doc.get("annotations")
    if not isinstance(annotations, dict) or not annotations:
        return ""
    return "annotations: " + ", ".join(f"{k}={_scalar(v)}" for k, v in annotations.items())


def _cause(doc: dict[str, Any]) -> str:
    cause = doc.get("cause")
    exceptions = cause.get("exceptions") if isinstance(cause, dict) else None
    if not isinstance(exceptions, list) or not exceptions or not isinstance(exceptions[0], dict):
        return ""
    first = exceptions[0]
    text = ": ".join(_scalar(first[k]) for k in ("type", "message") if first.get(k))
    more = f" (+{len(exceptions) - 1} more)" if len(exceptions) > 1 else ""
    return f"cause: {text or '(no message)'}{more}"


FLAGS = ("error", "fault", "throttle")


def node_line(node: Node) -> str:
    doc = node.doc
    parts = [str(doc.get("name", "(no name)")), _duration(node)]
    parts.extend(flag for flag in FLAGS if doc.get(flag) is True)
    if node.missing_parent:
        parts.append(f"(parent {node.missing_parent} not in file)")
    parts.extend(p for p in (_http(doc), _annotations(doc), _cause(doc)) if p)
    return "  ".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _timestamp(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def summary_line(trace: Trace, note: str = "") -> str:
    nodes = list(trace.nodes())
    segments = sum(1 for n in nodes if n.segment)
    parts = [f"Trace {trace.trace_id}"]
    start = trace.start
    ends = [e for e in (n.end for n in nodes) if e is not None]
    if start is not None:
        parts.append(_timestamp(start))
        if ends and not any(n.doc.get("in_progress") for n in nodes):
            parts.append(_ms(max(ends) - start))
        else:
            parts.append("in progress")
    counts = [_plural(segments, "segment"), _plural(len(nodes) - segments, "subsegment")]
    for flag in FLAGS:
        flagged = sum(1 for n in nodes if n.doc.get(flag) is True)
        if flagged:
            counts.append(_plural(flagged, flag))
    parts.append(", ".join(counts))
    if note:
        parts.append(note)
    return "  ".join(parts)


def metadata_lines(doc: dict[str, Any]) -> list[str]:
    """One ``metadata <namespace>: <JSON>`` line per metadata namespace."""
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        return []
    return [
        f"metadata {namespace}: {json.dumps(value, ensure_ascii=False)}"
        for namespace, value in metadata.items()
    ]


def render_trace(trace: Trace, *, metadata: bool = False, note: str = "") -> list[str]:
    """The summary line, then one line per node with a right-aligned offset column."""
    start = trace.start
    rows: list[tuple[str, str]] = []

    def visit(node: Node, depth: int) -> None:
        offset = "" if start is None or node.start is None else f"+{_ms(node.start - start)}"
        rows.append((offset, INDENT * depth + node_line(node)))
        if metadata:
            rows.extend(("", INDENT * (depth + 1) + line) for line in metadata_lines(node.doc))
        for child in node.children:
            visit(child, depth + 1)

    for root in trace.roots:
        visit(root, 0)
    width = max(len(offset) for offset, _ in rows)
    return [summary_line(trace, note)] + [f"{INDENT}{o:>{width}}  {text}" for o, text in rows]


def totals_line(traces: int, documents: int, skipped: int, payloads: dict[str, int]) -> str:
    totals = [_plural(traces, "trace"), _plural(documents, "document")]
    if skipped:
        totals.append(f"{skipped} skipped (not JSON objects)")
    for kind, text in PAYLOAD_KINDS:
        count = payloads.get(kind, 0)
        if count:
            singular, plural, rest = text.split("|")
            totals.append(f"{count} {singular}{'' if count == 1 else plural}{rest}")
    return "; ".join(totals)


def render(collection: Collection, trace_id: str | None = None, *, metadata: bool = False) -> str:
    """The whole report: every trace (or only ``trace_id``), then a totals line.

    With ``trace_id`` the totals are that trace's alone.
    """
    traces = [t for t in collection.traces if trace_id is None or t.trace_id == trace_id]
    blocks = ["\n".join(render_trace(t, metadata=metadata)) for t in traces]
    if trace_id is None:
        totals = totals_line(
            len(traces), collection.documents, collection.skipped, collection.payloads
        )
    else:
        totals = totals_line(len(traces), sum(t.documents for t in traces), 0, {})
    blocks.append(totals)
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------
# Streaming: print each trace once it is complete


DEFAULT_SETTLE = 1.0  # seconds a complete trace must be quiet before it is printed


class Streamer:
    """Collects documents as they come; renders each trace once it is complete.

    A trace is printed when its root segments have ended and no document for
    it has come for ``settle`` seconds (streamed subsegments and downstream
    services' segments may lag behind the root); documents that come later
    print it again, marked as updated.  ``flush`` prints what is left, as
    it is, at the end of the input.  ``now`` is the clock: arrival times are
    its readings, so tests can drive it.
    """

    def __init__(
        self,
        now: Callable[[], float],
        *,
        settle: float = DEFAULT_SETTLE,
        trace_id: str | None = None,
        metadata: bool = False,
    ) -> None:
        self.clock = now
        self.settle = settle
        self.trace_id = trace_id
        self.metadata = metadata
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._pending: dict[str, float] = {}  # trace id -> arrival of its last document
        self._incomplete: dict[str, float] = {}  # pending, found incomplete at that arrival
        self._printed: dict[str, int] = {}  # trace id -> its documents when last printed
        self.seen: set[str] = set()  # every trace id in the input
        self.skipped = 0
        self.payloads: dict[str, int] = {}

    def feed(self, line: str) -> None:
        if not line.strip():
            return
        try:
            doc = json.loads(line)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            self.skipped += 1
            return
        trace_id = doc.get("trace_id")
        if not isinstance(trace_id, str) or not trace_id:
            kind = payload_kind(doc)
            self.payloads[kind] = self.payloads.get(kind, 0) + 1
            return
        self.seen.add(trace_id)
        if self.trace_id is not None and trace_id != self.trace_id:
            return
        self._docs.setdefault(trace_id, []).append(doc)
        self._pending[trace_id] = self.clock()

    def next_due(self) -> float | None:
        """When ``ready`` may next have something (None: not before more input)."""
        times = [t for i, t in self._pending.items() if self._incomplete.get(i) != t]
        return min(times) + self.settle if times else None

    def ready(self) -> list[str]:
        """The blocks of the traces that are complete and quiet now."""
        now = self.clock()
        due: list[Trace] = []
        for trace_id, last in list(self._pending.items()):
            if now < last + self.settle or self._incomplete.get(trace_id) == last:
                continue
            trace = build_trace(trace_id, self._docs[trace_id])
            if is_complete(trace):
                due.append(trace)
            else:
                self._incomplete[trace_id] = last
        return self._emit(due)

    def flush(self) -> list[str]:
        """The blocks of every trace not printed in its latest state, complete or not."""
        return self._emit([build_trace(i, self._docs[i]) for i in self._pending])

    def _emit(self, traces: list[Trace]) -> list[str]:
        blocks: list[str] = []
        for trace in sort_traces(traces):
            trace_id = trace.trace_id
            del self._pending[trace_id]
            self._incomplete.pop(trace_id, None)
            before = self._printed.get(trace_id)
            note = (
                ""
                if before is None
                else f"(updated: {_plural(trace.documents - before, 'more document')})"
            )
            self._printed[trace_id] = trace.documents
            blocks.append("\n".join(render_trace(trace, metadata=self.metadata, note=note)))
        return blocks

    def totals(self) -> str:
        documents = sum(map(len, self._docs.values()))
        if self.trace_id is not None:
            return totals_line(len(self._docs), documents, 0, {})
        return totals_line(len(self._docs), documents, self.skipped, self.payloads)


# ---------------------------------------------------------------------------
# Reading: a growing pipe or file, a line at a time, with a timeout

POLL = 0.2  # seconds between checks for Ctrl-C and new data
READ_SIZE = 65536


class _Lines:
    """Splits bytes into text lines, keeping a partial last line for later."""

    def __init__(self) -> None:
        self._partial = b""

    def split(self, data: bytes) -> list[str]:
        *complete, self._partial = (self._partial + data).split(b"\n")
        return [line.decode("utf-8", "replace") for line in complete]

    def rest(self) -> list[str]:
        rest, self._partial = self._partial, b""
        return [rest.decode("utf-8", "replace")] if rest else []


class PipeSource:
    """A pipe (or terminal): lines as they come, until end of input."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lines = _Lines()
        self.eof = False

    def read(self, timeout: float) -> list[str]:
        readable, _, _ = select.select([self._fd], [], [], timeout)
        if not readable:
            return []
        data = os.read(self._fd, READ_SIZE)
        if not data:
            self.eof = True
            return self._lines.rest()
        return self._lines.split(data)


class FollowSource:
    """A file that grows, like ``tail -F``: a new file at the path is read from its start.

    The local sink starts a new file when the old one is moved or deleted;
    a file that shrank was truncated and is read again from the start.
    """

    eof = False  # never: following ends with Ctrl-C

    def __init__(self, path: str, sleep: Callable[[float], None] = time.sleep) -> None:
        self._path = path
        self._sleep = sleep
        self._file = open(path, "rb")  # noqa: SIM115 - owned by the source
        self._lines = _Lines()

    def read(self, timeout: float) -> list[str]:
        data = self._file.read(READ_SIZE)
        if data:
            return self._lines.split(data)
        try:
            on_disk = os.stat(self._path)
        except OSError:
            on_disk = None  # gone for now: the sink makes it again with its next batch
        ours = os.fstat(self._file.fileno())
        if on_disk is not None and (on_disk.st_ino, on_disk.st_dev) != (ours.st_ino, ours.st_dev):
            lines = self._lines.rest()
            self._file.close()
            self._file = open(self._path, "rb")  # noqa: SIM115
            return lines
        if on_disk is not None and on_disk.st_size < self._file.tell():
            self._file.seek(0)
            return self._lines.rest()
        self._sleep(timeout)
        return []

    def close(self) -> None:
        self._file.close()


class _Interrupts:
    """Counts SIGINTs instead of raising KeyboardInterrupt in the middle of a write."""

    def __init__(self) -> None:
        self.count = 0
        self._previous: Any = None

    def __enter__(self) -> _Interrupts:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stream(
    source: PipeSource | FollowSource,
    streamer: Streamer,
    write: Callable[[str], None],
    interrupts: _Interrupts,
) -> int:
    """Print traces as they complete until the input ends; the exit status.

    Reading a pipe, the first Ctrl-C prints what is pending at once and goes
    on to the end of the input, since the daemon writing it is draining on
    the same Ctrl-C; a second one stops.  Following a file, Ctrl-C stops.
    """
    flushed_at = 0
    while not source.eof:
        if interrupts.count > flushed_at:
            flushed_at = interrupts.count
            for block in streamer.flush():
                write(block + "\n\n")
            if isinstance(source, FollowSource) or interrupts.count > 1:
                write(streamer.totals() + "\n")
                return 130
        due = streamer.next_due()
        timeout = POLL if due is None else min(POLL, max(0.0, due - streamer.clock()))
        for line in source.read(timeout):
            streamer.feed(line)
        for block in streamer.ready():
            write(block + "\n\n")
    for block in streamer.flush():
        write(block + "\n\n")
    write(streamer.totals() + "\n")
    return 0


# ---------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xraytwisted.view",
        description="Print the traces in an xraytwisted --local-sink file as indented trees. "
        "From a pipe (PATH -) or with --follow, each trace is printed as soon as it is "
        "complete: its root segment has ended and nothing more came for it for --settle "
        "seconds.",
    )
    parser.add_argument("path", metavar="PATH", help="JSON Lines file (- for stdin)")
    parser.add_argument("--trace", metavar="ID", help="show only this trace id (and its totals)")
    parser.add_argument(
        "-f",
        "--follow",
        action="store_true",
        help="keep reading PATH as it grows, like tail -f, until Ctrl-C",
    )
    parser.add_argument(
        "--settle",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_SETTLE,
        help=f"how long a complete trace must be quiet before it is printed "
        f"(default {DEFAULT_SETTLE:g})",
    )
    parser.add_argument("--metadata", action="store_true", help="also show segment metadata")
    return parser


def _quiet_stdout() -> None:
    # The reader went away (| head): nothing more can be shown, and Python
    # must not complain about it when it flushes stdout on exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _is_stream(fd: int) -> bool:
    try:
        return not stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def main(
    argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout if stdout is None else stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    try:
        return _run(args, stdin, write)
    except BrokenPipeError:
        if stdout is None:
            _quiet_stdout()
        return 0
    except KeyboardInterrupt:  # Ctrl-C outside the streaming loop (e.g. a large file)
        return 130


def _run(args: argparse.Namespace, stdin: TextIO | None, write: Callable[[str], None]) -> int:
    if not (math.isfinite(args.settle) and args.settle >= 0):
        sys.stderr.write(f"--settle {args.settle:g}: give 0 or more seconds\n")
        return 2
    where = "stdin" if args.path == "-" else args.path
    streamer = Streamer(
        time.monotonic, settle=args.settle, trace_id=args.trace, metadata=args.metadata
    )
    source: PipeSource | FollowSource | None = None
    try:
        if args.path == "-":
            real = stdin is None
            reader = sys.stdin if stdin is None else stdin
            if real and (args.follow or _is_stream(reader.fileno())):
                source = PipeSource(reader.fileno())
            else:
                collection = collect(reader)
        elif args.follow:
            source = FollowSource(args.path)
        else:
            with open(args.path, encoding="utf-8", errors="replace") as f:
                collection = collect(f)
    except OSError as e:
        sys.stderr.write(
            f"cannot read {args.path}: {e.strerror or e}; give the file written by "
            "xray --local-sink PATH\n"
        )
        return 1
    if source is not None:
        try:
            with _Interrupts() as interrupts:
                status = stream(source, streamer, write, interrupts)
        finally:
            if isinstance(source, FollowSource):
                source.close()
        if status == 0 and args.trace is not None and args.trace not in streamer.seen:
            return _unknown_trace(args.trace, where, len(streamer.seen))
        return status
    if args.trace is not None and all(t.trace_id != args.trace for t in collection.traces):
        return _unknown_trace(args.trace, where, len(collection.traces))
    write(render(collection, args.trace, metadata=args.metadata))
    return 0


def _unknown_trace(trace_id: str, where: str, count: int) -> int:
    sys.stderr.write(f"trace {trace_id} is not in {where} ({_plural(count, 'trace')} there)\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
