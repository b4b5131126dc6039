"""OTLP trace requests as OTLP/JSON, for the local sink and the viewer.

The local sink writes each OTLP request it receives as one line in the
OTLP/JSON form of an ``ExportTraceServiceRequest`` (``{"resourceSpans":
[...]}``), and the viewer reads those lines and the base64 protobuf that
ADOT's UDP exporter sends behind ``T1S``/``T1U``.  Decoding protobuf needs
opentelemetry-proto (the ``otlp`` extra).  It is imported when a request is
decoded, never when this module is: the daemon imports the local sink with
or without the extra, and nothing on the upload path comes here.

OTLP/JSON differs from protobuf's canonical JSON mapping in two ways
(OTLP specification, "JSON Protobuf Encoding"): trace and span ids are hex,
not base64, and enums are integers.  ``request_to_json`` follows it.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

EXTRA = "pip install 'xraytwisted[otlp]'"
# Prefixes of ADOT's UDP exporter (aws-opentelemetry-distro, otlp_udp_exporter.py):
# the body of the datagram is PREFIX + base64(ExportTraceServiceRequest).
SAMPLED_PREFIX = "T1S"
UNSAMPLED_PREFIX = "T1U"
# The local sink's key for a protobuf request it could not decode (kept as base64).
UNDECODED_KEY = "otlpProtobufBase64"
# The bytes fields of a Span (and of its links) that OTLP/JSON writes in hex.
_SPAN_IDS = ("traceId", "spanId", "parentSpanId")
_LINK_IDS = ("traceId", "spanId")
_HEX = re.compile(r"[0-9a-fA-F]*\Z")


class OtlpUnavailable(Exception):
    """opentelemetry-proto is not installed; str() says how to install it."""


class OtlpDecodeError(ValueError):
    """The bytes are not a serialized ExportTraceServiceRequest."""


def _modules() -> tuple[Any, Any, type[Exception]]:
    """(ExportTraceServiceRequest, json_format, DecodeError), or OtlpUnavailable."""
    try:
        from google.protobuf import json_format
        from google.protobuf.message import DecodeError
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError as e:
        raise OtlpUnavailable(
            f"decoding OTLP protobuf needs opentelemetry-proto: {EXTRA} ({e})"
        ) from None
    return ExportTraceServiceRequest, json_format, DecodeError


def require() -> None:
    """Raise OtlpUnavailable now if decoding would fail for want of the library."""
    _modules()


def request_to_json(body: bytes) -> dict[str, Any]:
    """A serialized ExportTraceServiceRequest in OTLP/JSON form (hex ids, integer enums).

    Raises OtlpDecodeError for bytes that do not parse, OtlpUnavailable
    without opentelemetry-proto.
    """
    request_type, json_format, decode_error = _modules()
    try:
        request = request_type.FromString(body)
    except (decode_error, RecursionError) as e:
        raise OtlpDecodeError(f"not an OTLP ExportTraceServiceRequest: {e}") from None
    document: dict[str, Any] = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource in document.get("resourceSpans", []):
        for scope in resource.get("scopeSpans", []):
            for span in scope.get("spans", []):
                _ids_to_hex(span, _SPAN_IDS)
                for link in span.get("links", []):
                    _ids_to_hex(link, _LINK_IDS)
    return document


def _ids_to_hex(message: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        value = message.get(key)
        if isinstance(value, str):
            message[key] = base64.b64decode(value).hex()


def payload_to_json(text: str) -> dict[str, Any]:
    """The request in a ``T1S``/``T1U`` UDP payload (prefix included) as OTLP/JSON."""
    try:
        body = base64.b64decode(text[len(SAMPLED_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as e:
        raise OtlpDecodeError(f"not base64: {e}") from None
    return request_to_json(body)


def id_hex(value: Any, size: int) -> str | None:
    """An OTLP/JSON id of ``size`` bytes as lowercase hex; None if empty or not an id.

    Hex is what OTLP/JSON specifies; base64 (protobuf's canonical JSON, what
    ``json_format.MessageToJson`` writes) is accepted too.
    """
    if not isinstance(value, str) or not value:
        return None
    if len(value) == 2 * size and _HEX.match(value):
        return value.lower()
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == size else None
