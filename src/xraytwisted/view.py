"""Print the traces in a local-sink file as indented trees.

``python -m xraytwisted.view traces.jsonl [--trace ID]`` (``-`` reads
stdin).  Documents are grouped by ``trace_id``; subsegments an SDK streamed
as their own documents (``"type": "subsegment"`` with ``parent_id``) and
downstream services' segments are put back under their parents; siblings
are sorted by start time.  Each trace gets one summary line, then one line
per (sub)segment: offset from the trace start, name, duration, flags, HTTP
call, annotations and the first exception.

Everything but ``main`` is pure, so the output can be tested exactly.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from collections.abc import Iterable, Sequence
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
    other: int  # JSON objects without a trace_id, e.g. {"raw": ...} payloads


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
    other = 0
    for doc in documents:
        trace_id = doc.get("trace_id")
        if isinstance(trace_id, str) and trace_id:
            grouped.setdefault(trace_id, []).append(doc)
        else:
            other += 1
    traces = [build_trace(trace_id, docs) for trace_id, docs in grouped.items()]
    traces.sort(key=lambda t: (math.inf, t.trace_id) if t.start is None else (t.start, ""))
    return Collection(traces, len(documents) - other, skipped, other)


# ---------------------------------------------------------------------------
# Rendering


def _ms(seconds: float) -> str:
    ms = seconds * 1000
    # Local subsegments often take microseconds: keep them distinguishable from 0.
    return f"{ms:.1f} ms" if abs(ms) >= 1 or ms == 0 else f"{ms:.3f} ms"


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


def summary_line(trace: Trace) -> str:
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
    return "  ".join(parts)


def render_trace(trace: Trace) -> list[str]:
    """The summary line, then one line per node with a right-aligned offset column."""
    start = trace.start
    rows: list[tuple[str, str]] = []

    def visit(node: Node, depth: int) -> None:
        offset = "" if start is None or node.start is None else f"+{_ms(node.start - start)}"
        rows.append((offset, INDENT * depth + node_line(node)))
        for child in node.children:
            visit(child, depth + 1)

    for root in trace.roots:
        visit(root, 0)
    width = max(len(offset) for offset, _ in rows)
    return [summary_line(trace)] + [f"{INDENT}{o:>{width}}  {text}" for o, text in rows]


def render(collection: Collection, trace_id: str | None = None) -> str:
    """The whole report: every trace (or only ``trace_id``), then a totals line."""
    traces = [t for t in collection.traces if trace_id is None or t.trace_id == trace_id]
    blocks = ["\n".join(render_trace(t)) for t in traces]
    totals = [
        _plural(len(collection.traces), "trace"),
        _plural(collection.documents, "document"),
    ]
    if collection.skipped:
        totals.append(f"{collection.skipped} skipped (not JSON objects)")
    if collection.other:
        totals.append(f"{collection.other} without trace_id (e.g. raw payloads)")
    blocks.append("; ".join(totals))
    return "\n\n".join(blocks) + "\n"


# ---------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xraytwisted.view",
        description="Print the traces in an xraytwisted --local-sink file as indented trees.",
    )
    parser.add_argument("path", metavar="PATH", help="JSON Lines file (- for stdin)")
    parser.add_argument("--trace", metavar="ID", help="show only this trace id")
    return parser


def main(
    argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None
) -> int:
    args = _parser().parse_args(argv)
    out = sys.stdout if stdout is None else stdout
    try:
        if args.path == "-":
            collection = collect(sys.stdin if stdin is None else stdin)
        else:
            with open(args.path, encoding="utf-8", errors="replace") as f:
                collection = collect(f)
    except OSError as e:
        sys.stderr.write(
            f"cannot read {args.path}: {e.strerror or e}; give the file written by "
            "xray --local-sink PATH\n"
        )
        return 1
    if args.trace is not None and all(t.trace_id != args.trace for t in collection.traces):
        sys.stderr.write(
            f"trace {args.trace} is not in {args.path} "
            f"({_plural(len(collection.traces), 'trace')} there)\n"
        )
        return 1
    out.write(render(collection, args.trace))
    return 0


if __name__ == "__main__":
    sys.exit(main())
