"""Print the traces in a local-sink file as indented trees.

``python -m xraytwisted.view traces.jsonl [--trace ID] [--metadata]``.
Documents are grouped by ``trace_id``; subsegments an SDK streamed as their
own documents (``"type": "subsegment"`` with ``parent_id``) and downstream
services' segments are put back under their parents; siblings are sorted by
start time.  Each trace gets one summary line, then one line per
(sub)segment: offset from the trace start, name, duration, flags, HTTP
call, annotations and the first exception (and, with ``--metadata``, its
metadata).  A totals line ends the output.

OpenTelemetry spans are shown in the same trees: the local sink's OTLP/JSON
lines (``{"resourceSpans": ...}``) and the ``T1S``/``T1U`` payloads of ADOT's
UDP exporter (base64 protobuf, decoded with opentelemetry-proto when it is
installed).  Each span becomes a node (``SpanDoc``) with the X-Ray fields
the trees need: its hex trace id, span id and parent span id, start and end
time; an X-Ray trace id ``1-5f84c7a1-<24 hex>`` is the OTLP trace id
``5f84c7a1<24 hex>``, so segments and spans of one trace share a tree and a
span whose parent is an X-Ray (sub)segment sits under it.  A span line adds
its kind, ``error`` for an error status, its service (on spans that enter
one), HTTP attributes, the status message and the first exception event.

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
import re
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from xraytwisted.pipeline import otlp_json

INDENT = "  "


@dataclass(frozen=True)
class SpanInfo:
    """What an OTLP span has that an X-Ray document does not."""

    kind: str  # "server", "client", ... ("" when unspecified)
    service: str  # the resource's service.name
    status_message: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    exception: str  # "type: message" of the first exception event ("" if none)


class SpanDoc(dict[str, Any]):
    """An OTLP span as an X-Ray-shaped document, with its ``SpanInfo``."""

    def __init__(self, fields: dict[str, Any], info: SpanInfo) -> None:
        super().__init__(fields)
        self.info = info


@dataclass
class Node:
    doc: dict[str, Any]
    segment: bool  # a segment (a service's own document), not a subsegment
    children: list[Node] = field(default_factory=list)
    missing_parent: str = ""  # a streamed subsegment whose parent is not in the file

    @property
    def span(self) -> SpanInfo | None:
        """The OTLP span's own parts; None for an X-Ray (sub)segment."""
        return self.doc.info if isinstance(self.doc, SpanDoc) else None

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
    trace_id: str  # as shown: the X-Ray form if a segment has it, else OTLP's hex
    roots: list[Node]
    documents: int  # X-Ray documents
    spans: int = 0  # OTLP spans
    key: str = ""  # trace_key(trace_id): the same for both forms

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
    spans: int = 0  # OTLP spans read (from OTLP/JSON lines and T1S/T1U payloads)

    @property
    def other(self) -> int:
        return sum(self.payloads.values())


# What a line is when it is not a segment, in the order the totals name
# them.  The local sink writes bodies that are not JSON objects as {"raw":
# ...}; ADOT's UDP exporter sends OTLP protobuf as base64 behind the T1S,
# T1U and M1 prefixes.  A T1S/T1U payload's spans are counted as spans too.
PAYLOAD_KINDS: tuple[tuple[str, str], ...] = (
    ("T1S", "OTLP span payload|s| (T1S: sampled)"),
    ("T1U", "OTLP span payload|s| (T1U: unsampled)"),
    ("T1S-undecoded", "OTLP span payload|s| (T1S: sampled; not decoded)"),
    ("T1U-undecoded", "OTLP span payload|s| (T1U: unsampled; not decoded)"),
    ("T1S-bad", "OTLP span payload|s| (T1S: sampled; not an OTLP request)"),
    ("T1U-bad", "OTLP span payload|s| (T1U: unsampled; not an OTLP request)"),
    ("otlp-undecoded", "OTLP request|s| the local sink could not decode"),
    ("span-no-trace", "OTLP span|s| without a trace id"),
    ("M1", "OTLP metrics payload|s| (M1; not decoded)"),
    ("raw", "raw payload|s| (not JSON)"),
    ("object", "JSON object|s| without trace_id"),
)
_PREFIXES = (otlp_json.SAMPLED_PREFIX, otlp_json.UNSAMPLED_PREFIX, "M1")
UNDECODED_NOTE = f"to see their spans: {otlp_json.EXTRA}"


def payload_kind(doc: dict[str, Any]) -> str:
    """Which PAYLOAD_KINDS entry a document without a trace_id is (T1S/T1U: undecoded)."""
    raw = doc.get("raw")
    if len(doc) != 1 or not isinstance(raw, str):
        return "object"
    return next((prefix for prefix in _PREFIXES if raw.startswith(prefix)), "raw")


def entries(doc: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """The trace documents (segments, spans) in one line's object, and what it counts as.

    The second list names PAYLOAD_KINDS entries to count once each.
    """
    trace_id = doc.get("trace_id")
    if isinstance(trace_id, str) and trace_id:
        return [doc], []
    if isinstance(doc.get("resourceSpans"), list):
        spans, without_trace = spans_of_request(doc)
        return list(spans), ["span-no-trace"] * without_trace
    if isinstance(doc.get(otlp_json.UNDECODED_KEY), str):
        return [], ["otlp-undecoded"]
    kind = payload_kind(doc)
    if kind not in (otlp_json.SAMPLED_PREFIX, otlp_json.UNSAMPLED_PREFIX):
        return [], [kind]
    try:
        request = otlp_json.payload_to_json(doc["raw"])
    except otlp_json.OtlpUnavailable:
        return [], [f"{kind}-undecoded"]
    except otlp_json.OtlpDecodeError:
        return [], [f"{kind}-bad"]
    spans, without_trace = spans_of_request(request)
    return list(spans), [kind] + ["span-no-trace"] * without_trace


# ---------------------------------------------------------------------------
# OTLP spans as tree nodes

_XRAY_TRACE_ID = re.compile(r"1-([0-9a-fA-F]{8})-([0-9a-fA-F]{24})\Z")
_HEX_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}\Z")
_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_KIND_NAMES = {f"SPAN_KIND_{name.upper()}": number for number, name in _KINDS.items()}
STATUS_ERROR = 2
# The spans that enter a service, as X-Ray's segments do (the rest are like subsegments).
_ENTRY_KINDS = ("server", "consumer")


def trace_key(trace_id: str) -> str:
    """One spelling for both forms of a trace id.

    ``1-5f84c7a1-<24 hex>`` (X-Ray) is ``5f84c7a1<24 hex>`` (OTLP); other ids are kept.
    """
    match = _XRAY_TRACE_ID.match(trace_id)
    if match:
        return (match[1] + match[2]).lower()
    return trace_id.lower() if _HEX_TRACE_ID.match(trace_id) else trace_id


def any_value(value: Any) -> Any:
    """An OTLP/JSON ``AnyValue`` as a plain JSON value."""
    if not isinstance(value, dict) or len(value) != 1:
        return None if not isinstance(value, dict) or not value else value
    [(key, inner)] = value.items()
    if key == "intValue":
        try:
            return int(inner)  # int64: a string in OTLP/JSON
        except (TypeError, ValueError):
            return inner
    if key == "arrayValue":
        values = inner.get("values") if isinstance(inner, dict) else None
        return [any_value(v) for v in values] if isinstance(values, list) else []
    if key == "kvlistValue":
        return attributes(inner.get("values") if isinstance(inner, dict) else None)
    return inner  # stringValue, boolValue, doubleValue, bytesValue (base64)


def attributes(values: Any) -> dict[str, Any]:
    """An OTLP/JSON list of ``KeyValue`` as a dict."""
    if not isinstance(values, list):
        return {}
    return {
        kv["key"]: any_value(kv.get("value"))
        for kv in values
        if isinstance(kv, dict) and isinstance(kv.get("key"), str)
    }


def _seconds(nanos: Any) -> float | None:
    # fixed64 nanoseconds: a decimal string in OTLP/JSON (numbers are accepted).
    if isinstance(nanos, bool):
        return None
    try:
        value = int(nanos)
    except (TypeError, ValueError):
        return None
    return value / 1e9 if value > 0 else None


def _enum(value: Any, names: dict[str, int]) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return names.get(value, 0) if isinstance(value, str) else 0


def _list(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _exception(events: Any) -> str:
    for event in _list(events):
        if event.get("name") == "exception":
            found = attributes(event.get("attributes"))
            parts = [
                _scalar(found[k])
                for k in ("exception.type", "exception.message")
                if found.get(k) is not None and found.get(k) != ""
            ]
            return ": ".join(parts) or "(no message)"
    return ""


def span_doc(span: dict[str, Any], resource: dict[str, Any]) -> SpanDoc | None:
    """One OTLP/JSON span as a tree document (None without a trace id)."""
    trace_id = otlp_json.id_hex(span.get("traceId"), 16)
    if trace_id is None:
        return None
    kind = _KINDS.get(_enum(span.get("kind"), _KIND_NAMES), "")
    found = span.get("status")
    status: dict[str, Any] = found if isinstance(found, dict) else {}
    parent = otlp_json.id_hex(span.get("parentSpanId"), 8)
    fields: dict[str, Any] = {"trace_id": trace_id, "name": span.get("name", "(no name)")}
    ident = otlp_json.id_hex(span.get("spanId"), 8)
    if ident is not None:
        fields["id"] = ident
    if parent is not None:
        fields["parent_id"] = parent
    if parent is not None and kind not in _ENTRY_KINDS:
        fields["type"] = "subsegment"  # a step inside a service, not its entry
    for name, key in (("start_time", "startTimeUnixNano"), ("end_time", "endTimeUnixNano")):
        seconds = _seconds(span.get(key))
        if seconds is not None:
            fields[name] = seconds
    if _enum(status.get("code"), {"STATUS_CODE_ERROR": STATUS_ERROR}) == STATUS_ERROR:
        fields["error"] = True
    service = resource.get("service.name")
    info = SpanInfo(
        kind=kind,
        service=service if isinstance(service, str) else "",
        status_message=str(status.get("message") or ""),
        attributes=attributes(span.get("attributes")),
        resource=resource,
        exception=_exception(span.get("events")),
    )
    return SpanDoc(fields, info)


def spans_of_request(request: dict[str, Any]) -> tuple[list[SpanDoc], int]:
    """The spans of an OTLP/JSON ExportTraceServiceRequest, and how many had no trace id."""
    spans: list[SpanDoc] = []
    without_trace = 0
    for resource_spans in _list(request.get("resourceSpans")):
        resource = resource_spans.get("resource")
        resource_attributes = attributes(
            resource.get("attributes") if isinstance(resource, dict) else None
        )
        for scope in _list(resource_spans.get("scopeSpans")):
            for span in _list(scope.get("spans")):
                doc = span_doc(span, resource_attributes)
                if doc is None:
                    without_trace += 1
                else:
                    spans.append(doc)
    return spans, without_trace


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
    """One trace's documents (segments and spans) as trees (docs in file order).

    The trace is shown by its X-Ray id if a segment has one, else by ``trace_id``.
    """
    shown = next(
        (
            d["trace_id"]
            for d in docs
            if not isinstance(d, SpanDoc) and isinstance(d.get("trace_id"), str)
        ),
        trace_id,
    )
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
    spans = sum(1 for d in docs if isinstance(d, SpanDoc))
    return Trace(shown, roots, len(docs) - spans, spans, trace_key(shown))


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
    for line_doc in documents:
        docs, kinds = entries(line_doc)
        for doc in docs:
            grouped.setdefault(trace_key(doc["trace_id"]), []).append(doc)
        for kind in kinds:
            payloads[kind] = payloads.get(kind, 0) + 1
    traces = sort_traces([build_trace(key, docs) for key, docs in grouped.items()])
    spans = sum(t.spans for t in traces)
    return Collection(traces, sum(t.documents for t in traces), skipped, payloads, spans)


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
# Span attributes for the HTTP part of a span's line: current and older
# OpenTelemetry semantic conventions, first found wins.
_HTTP_ATTRIBUTES = (
    ("http.request.method", "http.method"),
    ("url.full", "http.url", "url.path", "http.target"),
    ("http.response.status_code", "http.status_code"),
)


def _span_http(info: SpanInfo) -> str:
    found = (
        next((info.attributes[k] for k in keys if info.attributes.get(k) is not None), None)
        for keys in _HTTP_ATTRIBUTES
    )
    return " ".join(_scalar(v) for v in found if v is not None)


def node_line(node: Node) -> str:
    doc = node.doc
    parts = [str(doc.get("name", "(no name)")), _duration(node)]
    info = node.span
    if info is not None:
        parts.append(f"{info.kind} span" if info.kind else "span")
    parts.extend(flag for flag in FLAGS if doc.get(flag) is True)
    if node.missing_parent:
        parts.append(f"(parent {node.missing_parent} not in file)")
    if info is None:
        parts.extend(p for p in (_http(doc), _annotations(doc), _cause(doc)) if p)
    else:
        if node.segment and info.service:
            parts.append(f"service: {info.service}")
        parts.extend(
            p
            for p in (
                _span_http(info),
                f"status: {info.status_message}" if info.status_message else "",
                f"cause: {info.exception}" if info.exception else "",
            )
            if p
        )
    return "  ".join(parts)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _timestamp(seconds: float) -> str:
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def summary_line(trace: Trace, note: str = "") -> str:
    nodes = list(trace.nodes())
    parts = [f"Trace {trace.trace_id}"]
    start = trace.start
    ends = [e for e in (n.end for n in nodes) if e is not None]
    if start is not None:
        parts.append(_timestamp(start))
        if ends and not any(n.doc.get("in_progress") for n in nodes):
            parts.append(_ms(max(ends) - start))
        else:
            parts.append("in progress")
    spans = sum(1 for n in nodes if n.span is not None)
    segments = sum(1 for n in nodes if n.segment and n.span is None)
    counts = []
    if len(nodes) > spans or not spans:
        counts += [
            _plural(segments, "segment"),
            _plural(len(nodes) - spans - segments, "subsegment"),
        ]
    if spans:
        counts.append(_plural(spans, "span"))
    for flag in FLAGS:
        flagged = sum(1 for n in nodes if n.doc.get(flag) is True)
        if flagged:
            counts.append(_plural(flagged, flag))
    parts.append(", ".join(counts))
    if note:
        parts.append(note)
    return "  ".join(parts)


def metadata_lines(doc: dict[str, Any]) -> list[str]:
    """One ``metadata <namespace>: <JSON>`` line per metadata namespace.

    For a span: its attributes, and its resource's on a span that enters a
    service (the spans under it share them).
    """
    if isinstance(doc, SpanDoc):
        info = doc.info
        resource = info.resource if doc.get("type") != "subsegment" else {}
        return [
            f"{what}: {json.dumps(values, ensure_ascii=False)}"
            for what, values in (("attributes", info.attributes), ("resource", resource))
            if values
        ]
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


def totals_line(
    traces: int, documents: int, skipped: int, payloads: dict[str, int], spans: int = 0
) -> str:
    totals = [_plural(traces, "trace"), _plural(documents, "document")]
    if spans:
        totals.append(_plural(spans, "OTLP span"))
    if skipped:
        totals.append(f"{skipped} skipped (not JSON objects)")
    for kind, text in PAYLOAD_KINDS:
        count = payloads.get(kind, 0)
        if count:
            singular, plural, rest = text.split("|")
            totals.append(f"{count} {singular}{'' if count == 1 else plural}{rest}")
    if any(payloads.get(kind) for kind in ("T1S-undecoded", "T1U-undecoded")):
        totals.append(UNDECODED_NOTE)
    return "; ".join(totals)


def render(collection: Collection, trace_id: str | None = None, *, metadata: bool = False) -> str:
    """The whole report: every trace (or only ``trace_id``), then a totals line.

    With ``trace_id`` (X-Ray or OTLP form) the totals are that trace's alone.
    """
    key = None if trace_id is None else trace_key(trace_id)
    traces = [t for t in collection.traces if key is None or t.key == key]
    blocks = ["\n".join(render_trace(t, metadata=metadata)) for t in traces]
    if trace_id is None:
        totals = totals_line(
            len(traces),
            collection.documents,
            collection.skipped,
            collection.payloads,
            collection.spans,
        )
    else:
        totals = totals_line(
            len(traces), sum(t.documents for t in traces), 0, {}, sum(t.spans for t in traces)
        )
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

    OTLP spans count like documents: a trace whose spans came before their
    parent (an SDK exports a span when it ends, children first) waits for
    the parent, as one with a streamed subsegment waits for its segment.
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
        self._only = None if trace_id is None else trace_key(trace_id)
        self.metadata = metadata
        # All by trace_key: an X-Ray id and its OTLP hex form are one trace.
        self._docs: dict[str, list[dict[str, Any]]] = {}
        self._pending: dict[str, float] = {}  # trace -> arrival of its last document
        self._incomplete: dict[str, float] = {}  # pending, found incomplete at that arrival
        self._printed: dict[str, tuple[int, int]] = {}  # trace -> (documents, spans) printed
        self.seen: set[str] = set()  # every trace in the input (trace_key)
        self.skipped = 0
        self.payloads: dict[str, int] = {}

    def feed(self, line: str) -> None:
        if not line.strip():
            return
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, dict):
            self.skipped += 1
            return
        docs, kinds = entries(value)
        for kind in kinds:
            self.payloads[kind] = self.payloads.get(kind, 0) + 1
        for doc in docs:
            key = trace_key(doc["trace_id"])
            self.seen.add(key)
            if self._only is not None and key != self._only:
                continue
            self._docs.setdefault(key, []).append(doc)
            self._pending[key] = self.clock()

    def next_due(self) -> float | None:
        """When ``ready`` may next have something (None: not before more input)."""
        times = [t for i, t in self._pending.items() if self._incomplete.get(i) != t]
        return min(times) + self.settle if times else None

    def ready(self) -> list[str]:
        """The blocks of the traces that are complete and quiet now."""
        now = self.clock()
        due: list[Trace] = []
        for key, last in list(self._pending.items()):
            if now < last + self.settle or self._incomplete.get(key) == last:
                continue
            trace = build_trace(key, self._docs[key])
            if is_complete(trace):
                due.append(trace)
            else:
                self._incomplete[key] = last
        return self._emit(due)

    def flush(self) -> list[str]:
        """The blocks of every trace not printed in its latest state, complete or not."""
        return self._emit([build_trace(i, self._docs[i]) for i in self._pending])

    def _emit(self, traces: list[Trace]) -> list[str]:
        blocks: list[str] = []
        for trace in sort_traces(traces):
            key = trace.key
            del self._pending[key]
            self._incomplete.pop(key, None)
            before = self._printed.get(key)
            note = "" if before is None else _updated(trace, *before)
            self._printed[key] = (trace.documents, trace.spans)
            blocks.append("\n".join(render_trace(trace, metadata=self.metadata, note=note)))
        return blocks

    def totals(self) -> str:
        docs = [d for trace_docs in self._docs.values() for d in trace_docs]
        spans = sum(1 for d in docs if isinstance(d, SpanDoc))
        if self.trace_id is not None:
            return totals_line(len(self._docs), len(docs) - spans, 0, {}, spans)
        return totals_line(len(self._docs), len(docs) - spans, self.skipped, self.payloads, spans)


def _updated(trace: Trace, documents: int, spans: int) -> str:
    more = []
    if trace.documents != documents or trace.spans == spans:
        more.append(_plural(trace.documents - documents, "more document"))
    if trace.spans != spans:
        more.append(_plural(trace.spans - spans, "more span"))
    return f"(updated: {', '.join(more)})"


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
        description="Print the traces in an xraytwisted --local-sink file (X-Ray segments "
        "and OpenTelemetry spans) as indented trees. "
        "From a pipe (PATH -) or with --follow, each trace is printed as soon as it is "
        "complete: its root segment has ended and nothing more came for it for --settle "
        "seconds.",
    )
    parser.add_argument("path", metavar="PATH", help="JSON Lines file (- for stdin)")
    parser.add_argument(
        "--trace",
        metavar="ID",
        help="show only this trace (and its totals): its X-Ray id or its OTLP hex id",
    )
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
    parser.add_argument(
        "--metadata",
        action="store_true",
        help="also show segment metadata, and span and resource attributes",
    )
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
        if status == 0 and args.trace is not None and trace_key(args.trace) not in streamer.seen:
            return _unknown_trace(args.trace, where, len(streamer.seen))
        return status
    if args.trace is not None and all(t.key != trace_key(args.trace) for t in collection.traces):
        return _unknown_trace(args.trace, where, len(collection.traces))
    write(render(collection, args.trace, metadata=args.metadata))
    return 0


def _unknown_trace(trace_id: str, where: str, count: int) -> int:
    sys.stderr.write(f"trace {trace_id} is not in {where} ({_plural(count, 'trace')} there)\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
