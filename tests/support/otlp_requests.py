"""OTLP trace requests built by hand with opentelemetry-proto: fixed ids and times.

Times are milliseconds after ``T0``, the epoch second in the X-Ray trace id
``1-5f84c7a1-...`` (X-Ray ids begin with their trace's start time).
"""

from __future__ import annotations

import base64
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

T0 = 0x5F84C7A1  # 2020-10-12T21:16:17Z
XRAY_TRACE = "1-5f84c7a1-0123456789abcdef01234567"
OTLP_TRACE = 0x5F84C7A10123456789ABCDEF01234567  # the same trace, as OTLP writes it
UDP_HEADER = b'{"format":"json","version":1}\n'

INTERNAL, SERVER, CLIENT = Span.SPAN_KIND_INTERNAL, Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT


def nanos(ms: float) -> int:
    return T0 * 1_000_000_000 + round(ms * 1_000_000)


def _attributes(target: Any, values: dict[str, Any]) -> None:
    for key, value in values.items():
        kv: KeyValue = target.add()
        kv.key = key
        if isinstance(value, bool):
            kv.value.bool_value = value
        elif isinstance(value, int):
            kv.value.int_value = value
        else:
            kv.value.string_value = value


def span(
    span_id: int,
    name: str,
    start_ms: float,
    end_ms: float,
    *,
    trace_id: int = OTLP_TRACE,
    parent: int = 0,
    kind: Any = INTERNAL,
    error: str | None = None,
    attributes: dict[str, Any] | None = None,
    exception: tuple[str, str] | None = None,
) -> Span:
    result = Span(name=name, kind=kind)
    result.trace_id = trace_id.to_bytes(16, "big")
    result.span_id = span_id.to_bytes(8, "big")
    if parent:
        result.parent_span_id = parent.to_bytes(8, "big")
    result.start_time_unix_nano = nanos(start_ms)
    result.end_time_unix_nano = nanos(end_ms)
    if error is not None:
        result.status.code = Status.STATUS_CODE_ERROR
        result.status.message = error
    _attributes(result.attributes, attributes or {})
    if exception is not None:
        event = result.events.add()
        event.name, event.time_unix_nano = "exception", result.end_time_unix_nano
        _attributes(
            event.attributes, {"exception.type": exception[0], "exception.message": exception[1]}
        )
    return result


def request(service: str, *spans: Span) -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    resource = message.resource_spans.add()
    _attributes(resource.resource.attributes, {"service.name": service})
    scope = resource.scope_spans.add()
    scope.scope.name = "xraytwisted-tests"
    scope.spans.extend(spans)
    return message


def t1s(message: ExportTraceServiceRequest, prefix: bytes = b"T1S") -> bytes:
    """The body ADOT's UDP exporter sends for ``message`` (after the header line)."""
    return prefix + base64.b64encode(message.SerializeToString())
