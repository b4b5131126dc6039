"""A fake X-Ray with its OTLP endpoint, for real-process tests of the OTLP bridge.

A twisted.web server in a subprocess (its own reactor, so tests may block),
on 127.0.0.1 only.  Every request's SigV4 signature is verified with
botocore (``tests.support.sigcheck``); a bad one is answered 403 and
recorded.  ``POST /v1/traces`` bodies are gunzipped when they say so and
decoded with opentelemetry-proto (``application/x-protobuf``) or
``google.protobuf.json_format`` (``application/json``); each span is
recorded by its span id and name.  ``POST /TraceSegments`` documents are
recorded by id; ``/TelemetryRecords`` is answered ``{}``.

    fake = FakeOtlpXRay(workdir, access_key=..., secret_key=..., region=...).start()
    fake.set_mode("503")        # 503 ServiceUnavailableException for /v1/traces
    fake.set_mode("429")        # 429 ThrottlingException
    fake.set_mode("search_off") # 400: Transaction Search not enabled (X-Ray's words)
    fake.set_mode("partial")    # 200, partial_success rejecting one span per request
    fake.set_mode("ok")
    fake.wait_for_spans(n)      # distinct span ids received in accepted requests
    fake.stats()                # requests by mode, spans, segments, signature errors
    fake.stop()

Segments are always accepted, whatever the mode (the outage is of the OTLP
endpoint only), so a test can show that segments keep flowing beside it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.support.fake_endpoint import Control, FakeEndpoint, serve_control

MODES = ("ok", "503", "429", "search_off", "partial")
# What X-Ray answers when the account's trace destination is not CloudWatch
# Logs (Transaction Search off).
SEARCH_OFF_MESSAGE = (
    "The OTLP API is supported with CloudWatch Logs as a Trace Segment Destination. "
    "Please enable the CloudWatch Logs destination for your traces using the "
    "UpdateTraceSegmentDestination API"
)


class FakeOtlpXRay(FakeEndpoint):
    """Starts, drives and stops the fake in a subprocess."""

    module = __file__
    modes = MODES
    title = "fake OTLP X-Ray"
    log_name = "fake_otlp.log"

    def __init__(
        self,
        workdir: str | Path,
        *,
        access_key: str,
        secret_key: str,
        region: str,
        mode: str = "ok",
    ) -> None:
        super().__init__(workdir, [access_key, secret_key, region, mode])

    def start(self, timeout: float = 20) -> FakeOtlpXRay:
        self._start(timeout)
        return self

    def set_mode(self, mode: str) -> None:
        self._set_mode(mode)

    def spans(self) -> dict[str, str]:
        """span id (hex) -> span name, of spans in accepted requests."""
        result: dict[str, str] = self._get("/spans")
        return result

    def segments(self) -> set[str]:
        return set(self._get("/segments"))

    def wait_for_spans(self, count: int, timeout: float = 30) -> dict[str, Any]:
        return self._wait_for("unique_spans", count, timeout, "spans")

    def wait_for_segments(self, count: int, timeout: float = 30) -> dict[str, Any]:
        return self._wait_for("unique_segments", count, timeout, "segments")


# ---------------------------------------------------------------------------
# The server process


def serve(access_key: str, secret_key: str, region: str, mode: str) -> None:  # pragma: no cover
    import gzip

    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTracePartialSuccess,
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )
    from twisted.internet import reactor as _reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    from tests.support.sigcheck import SignatureMismatch, verify

    reactor: Any = _reactor

    class State:
        def __init__(self) -> None:
            self.mode = mode
            self.reset()

        def reset(self) -> None:
            self.spans: dict[str, str] = {}
            self.span_copies = 0
            self.segments: dict[str, int] = {}
            self.requests: dict[str, int] = {}
            self.signature_errors: list[str] = []
            self.content_types: dict[str, int] = {}
            self.encodings: dict[str, int] = {}
            self.bad_bodies: list[str] = []
            self.rejected_spans = 0

        def stats(self) -> dict[str, Any]:
            return {
                "mode": self.mode,
                "requests": self.requests,
                "unique_spans": len(self.spans),
                "span_copies": self.span_copies,
                "unique_segments": len(self.segments),
                "signature_errors": self.signature_errors,
                "content_types": self.content_types,
                "encodings": self.encodings,
                "bad_bodies": self.bad_bodies,
                "rejected_spans": self.rejected_spans,
            }

    state = State()

    def answer(request: Request, status: int, body: bytes, ctype: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", ctype)
        return body

    def aws_error(request: Request, status: int, code: str, message: str) -> bytes:
        request.setHeader(b"x-amzn-errortype", code.encode())
        body = json.dumps({"__type": code, "message": message}).encode()
        return answer(request, status, body, b"application/json")

    class XRay(Resource):
        isLeaf = True

        def render_POST(self, request: Request) -> bytes:
            body = request.content.read() if request.content is not None else b""
            headers = {
                k.decode("latin-1").lower(): v[-1].decode("latin-1")
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
            try:
                verify(
                    method="POST",
                    url=f"http://{headers.get('host', '')}{request.uri.decode('latin-1')}",
                    headers=headers,
                    body=body,
                    access_key=access_key,
                    secret_key=secret_key,
                    region=region,
                )
            except (SignatureMismatch, KeyError, ValueError) as e:
                state.signature_errors.append(str(e) or type(e).__name__)
                return aws_error(request, 403, "InvalidSignatureException", str(e))
            if request.path == b"/TraceSegments":
                for doc in json.loads(body)["TraceSegmentDocuments"]:
                    seg_id = json.loads(doc)["id"]
                    state.segments[seg_id] = state.segments.get(seg_id, 0) + 1
                return answer(request, 200, b'{"UnprocessedTraceSegments":[]}', b"application/json")
            if request.path != b"/v1/traces":
                return answer(request, 200, b"{}", b"application/json")
            current = state.mode
            state.requests[current] = state.requests.get(current, 0) + 1
            if current == "503":
                return aws_error(request, 503, "ServiceUnavailableException", "fake outage")
            if current == "429":
                return aws_error(request, 429, "ThrottlingException", "Rate exceeded")
            if current == "search_off":
                return aws_error(request, 400, "ValidationException", SEARCH_OFF_MESSAGE)
            ctype = headers.get("content-type", "")
            encoding = headers.get("content-encoding", "identity")
            state.content_types[ctype] = state.content_types.get(ctype, 0) + 1
            state.encodings[encoding] = state.encodings.get(encoding, 0) + 1
            try:
                raw = gzip.decompress(body) if encoding == "gzip" else body
                message = ExportTraceServiceRequest()
                if ctype == "application/x-protobuf":
                    message.ParseFromString(raw)
                elif ctype == "application/json":
                    json_format.Parse(raw, message)
                else:
                    raise ValueError(f"content type {ctype!r}")
            except Exception as e:
                state.bad_bodies.append(repr(e))
                return aws_error(request, 400, "ValidationException", f"bad body: {e!r}")
            rejected = 0
            for resource in message.resource_spans:
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        if current == "partial" and rejected == 0:
                            rejected = 1  # the first span of each request is refused
                            continue
                        state.span_copies += 1
                        state.spans[span.span_id.hex()] = span.name
            state.rejected_spans += rejected
            response = ExportTraceServiceResponse()
            if rejected:
                response.partial_success.CopyFrom(
                    ExportTracePartialSuccess(
                        rejected_spans=rejected, error_message="span timestamp too old"
                    )
                )
            if ctype == "application/json":
                return answer(
                    request, 200, json_format.MessageToJson(response).encode(), b"application/json"
                )
            return answer(request, 200, response.SerializeToString(), b"application/x-protobuf")

    def set_mode(args: dict[str, str]) -> dict[str, Any]:
        state.mode = args.get("set", state.mode)
        return {"mode": state.mode}

    def reset(args: dict[str, str]) -> dict[str, Any]:
        state.reset()
        return {}

    site = Site(XRay())
    site.noisy = False
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    control: dict[bytes, Control] = {
        b"/mode": set_mode,
        b"/stats": lambda args: state.stats(),
        b"/spans": lambda args: state.spans,
        b"/segments": lambda args: list(state.segments),
        b"/reset": reset,
    }
    serve_control(reactor, control, port.getHost().port)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 6 or sys.argv[1] != "serve" or sys.argv[5] not in MODES:
        sys.exit(f"usage: {sys.argv[0]} serve ACCESS_KEY SECRET_KEY REGION {{{'|'.join(MODES)}}}")
    serve(*sys.argv[2:])
