"""Just enough of the protobuf wire format to batch OTLP trace requests.

An ``ExportTraceServiceRequest`` is one repeated field (``resource_spans``,
field 1), so two serialized requests concatenated are one valid request
holding both: batching needs no protobuf library and no decoding of spans.
What the daemon does need, without the library, is to refuse a request that
is not protobuf at all (so junk is a 400 to its sender, not a refused batch
later), to count its spans (X-Ray takes at most 10 000 per request and
refuses spans over 200 KB) and to read the ``partial_success`` part of
X-Ray's ``ExportTraceServiceResponse``.  This module walks the three outer
message levels (request > ResourceSpans > ScopeSpans) and measures each
span's length; it never looks inside a span.

Pure logic, no reactor.  Field numbers are those of opentelemetry-proto's
``collector/trace/v1/trace_service.proto`` and ``trace/v1/trace.proto``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

# Wire types (protobuf encoding spec).
VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5

# ExportTraceServiceRequest.resource_spans, ResourceSpans.scope_spans,
# ScopeSpans.spans: each is field 1 / 2 / 2, length-delimited.
REQUEST_RESOURCE_SPANS = 1
RESOURCE_SCOPE_SPANS = 2
SCOPE_SPANS = 2
# ExportTraceServiceResponse.partial_success and its two fields.
RESPONSE_PARTIAL_SUCCESS = 1
PARTIAL_REJECTED_SPANS = 1
PARTIAL_ERROR_MESSAGE = 2

# X-Ray's OTLP endpoint limits (CloudWatch documentation).
MAX_REQUEST_BYTES = 5 * 1000 * 1000
MAX_SPANS_PER_REQUEST = 10_000
MAX_SPAN_BYTES = 200 * 1000


class WireError(ValueError):
    """The bytes are not a well-formed OTLP trace request (str() says where)."""


@dataclass(frozen=True)
class RequestShape:
    """What the daemon needs to know about one OTLP trace request."""

    spans: int
    largest_span: int  # bytes of the largest serialized span (0 without spans)


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


Field = tuple[int, int, int, int]


def fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """(field number, wire type, value start, value end) for each field in data[start:end].

    For VARINT fields the value is re-read by the caller from ``value start``;
    for LEN fields ``value start:value end`` is the payload.  Groups (wire
    types 3 and 4, deprecated and never used by OTLP) are refused.
    """
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value_start = pos
            _, pos = _varint(data, pos, end)
        elif wire == I64:
            value_start, pos = pos, pos + 8
        elif wire == I32:
            value_start, pos = pos, pos + 4
        elif wire == LEN:
            length, value_start = _varint(data, pos, end)
            pos = value_start + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if pos > end:
            raise WireError("field runs past the end of its message")
        yield number, wire, value_start, pos


def request_shape(data: bytes) -> RequestShape:
    """Check an ExportTraceServiceRequest's outer levels and count its spans."""
    spans = 0
    largest = 0
    for number, wire, start, end in fields(data):
        if number != REQUEST_RESOURCE_SPANS:
            continue  # unknown fields are allowed by protobuf
        if wire != LEN:
            raise WireError("resource_spans is not length-delimited")
        for n2, w2, s2, e2 in fields(data, start, end):
            if n2 != RESOURCE_SCOPE_SPANS:
                continue
            if w2 != LEN:
                raise WireError("scope_spans is not length-delimited")
            for n3, w3, s3, e3 in fields(data, s2, e2):
                if n3 != SCOPE_SPANS:
                    continue
                if w3 != LEN:
                    raise WireError("span is not length-delimited")
                spans += 1
                if e3 - s3 > largest:
                    largest = e3 - s3
    return RequestShape(spans, largest)


def partial_success(data: bytes) -> tuple[int, str]:
    """(rejected spans, error message) from an ExportTraceServiceResponse; (0, "") if none."""
    rejected = 0
    message = ""
    for number, wire, start, end in fields(data):
        if number != RESPONSE_PARTIAL_SUCCESS or wire != LEN:
            continue
        for n2, w2, s2, e2 in fields(data, start, end):
            if n2 == PARTIAL_REJECTED_SPANS and w2 == VARINT:
                value, _ = _varint(data, s2, e2)
                # int64: a negative count would be a broken server; read as unsigned.
                rejected = value
            elif n2 == PARTIAL_ERROR_MESSAGE and w2 == LEN:
                message = data[s2:e2].decode("utf-8", "replace")
    return rejected, message


def json_request_shape(data: bytes) -> RequestShape:
    """The same for an OTLP/JSON request body (``resourceSpans`` > ``scopeSpans`` > ``spans``)."""
    try:
        # Python's parser gives up on nesting deeper than the recursion limit
        # (about a thousand levels) as soon as it gets there: cheap to refuse.
        document = json.loads(data)
    except RecursionError:
        raise WireError("not an OTLP request: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise WireError(f"not JSON: {e}") from None
    if not isinstance(document, dict):
        raise WireError("not a JSON object")
    spans = 0
    for resource in _list(document, "resourceSpans"):
        for scope in _list(resource, "scopeSpans"):
            for span in _list(scope, "spans"):
                if not isinstance(span, dict):
                    raise WireError("a span is not a JSON object")
                spans += 1
    # A JSON span's size in X-Ray's terms is that of its protobuf form, which
    # is not known without converting it: not measured (0).
    return RequestShape(spans, 0)


def _list(parent: object, key: str) -> list[object]:
    if not isinstance(parent, dict):
        raise WireError(f"{key}: parent is not a JSON object")
    value = parent.get(key, [])
    if not isinstance(value, list):
        raise WireError(f"{key} is not a JSON array")
    return value
