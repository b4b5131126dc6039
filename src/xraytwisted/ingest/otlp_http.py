"""The OTLP/HTTP receiver: ``POST /v1/traces`` from OpenTelemetry SDKs.

Off unless ``--otlp-address`` (``Socket.OTLPAddress``) is set, because 4318
is often taken by a collector.  A request is checked without decoding its
spans (``otlp_wire`` walks the three outer message levels) and, if good,
framed and offered to the span buffer, where it waits for an upload like a
segment does (bodies of ``THREAD_BYTES`` or more are decompressed and
checked in the reactor's thread pool, see ``pipeline/offload``; the answer
waits for that); the answer is the OTLP one:

* 200 and an empty ``ExportTraceServiceResponse`` (zero bytes for protobuf,
  ``{}`` for JSON), in the request's Content-Type, once it is in the buffer;
* 400 for bodies that are not OTLP trace requests, bad gzip data, more
  spans than X-Ray takes in one request or a span larger than X-Ray takes;
  413 for a body over 5 MB (X-Ray's limit), compressed or decompressed (a
  gzip bomb is stopped at the limit); 415 for other content types and
  encodings; 403 for any request with an ``Origin`` header (a web page
  must not be able to post spans through a local daemon); 404 for other
  paths, 405 for other methods; 503 with ``Retry-After`` when the memory
  budget is spent (never a silent drop: the SDK retries);
* error bodies are a ``google.rpc.Status`` for protobuf requests and
  ``{"code": ..., "message": ...}`` otherwise.

The Site is the TCP port's kind (``listen.bounded_site``), with the
receiver's limits (``otlp_site``): the body limit is enforced as the body
arrives (Content-Length, then bytes received) and bodies still arriving are
bounded by ``OTLP.HoldMB``; after an early 413 or 503 the rest of the body
is read and dropped so the SDK sees the answer; headers and body must
arrive within ``deadline`` seconds of a request's first byte (408,
connection closed); an idle connection is closed after ``idle_timeout``; at
most ``max_connections`` connections are open at once (more are closed as
soon as they are accepted).  Every refusal is counted by reason
(``OtlpCounters.refused``) and logged at most once per reason every 10 s.
"""

from __future__ import annotations

import json
import socket
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from xraytwisted.ingest import otlp_wire
from xraytwisted.ingest.stream import STOP_GRACE
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.bounded_site import (
    BoundedRequest,
    BoundedSite,
    Limit,
    Limits,
    format_address,
    raw_response,
)
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import OtlpCounters
from xraytwisted.observe.logs import Throttle, printable
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.offload import THREAD_BYTES, Runner
from xraytwisted.pipeline.otlp_batches import KIND_JSON, KIND_PROTOBUF, frame

PATH = b"/v1/traces"
PROTOBUF = b"application/x-protobuf"
JSON = b"application/json"
MAX_BODY = otlp_wire.MAX_REQUEST_BYTES  # X-Ray's limit, uncompressed
# A compressed body may be a little larger than its content when that does
# not compress (gzip adds ~0.03%): the wire limit allows for it.
MAX_WIRE_BODY = MAX_BODY + 64 * 1024
RETRY_AFTER = 2  # seconds, for 503 buffer full
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_DEADLINE = 30.0
DEFAULT_HOLD = 16 * 1024 * 1024  # OTLP.HoldMB: bodies still arriving, all connections

# HTTP status -> google.rpc.Code for the Status bodies.
_RPC_CODES = {400: 3, 403: 7, 404: 5, 405: 12, 408: 4, 413: 3, 415: 3, 500: 13, 503: 14}
_INFLATE_WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}
_ENCODINGS = (b"", b"identity", *_INFLATE_WBITS)


# Concatenated gzip members accepted in one body (SDKs send one); more is a
# 400.  Each member costs a decompressor, so this bounds the work per byte.
MAX_GZIP_MEMBERS = 64
INFLATE_STEP = 64 * 1024  # input bytes handed to zlib at a time


class BadBody(ValueError):
    """A compressed body that does not decompress."""


def inflate(data: bytes, encoding: bytes, limit: int) -> bytes | None:
    """``data`` decompressed, or None when that would be more than ``limit`` bytes.

    At most ``limit + 1`` bytes are ever produced, whatever the input claims
    (a gzip bomb costs no more than a large honest body).  Concatenated gzip
    members are one body, as RFC 1952 says, up to ``MAX_GZIP_MEMBERS`` of
    them (an SDK sends one).  The input is fed to zlib in pieces of at most
    ``INFLATE_STEP`` bytes, so the work is linear in its size: zlib copies
    what follows the end of a member (``unused_data``), and a body of many
    tiny members would otherwise copy the rest of the body once per member.
    Raises BadBody for corrupt or truncated data, or too many members.
    """
    wbits = _INFLATE_WBITS[encoding]
    view = memoryview(data)
    end = len(view)
    pos = 0
    out: list[bytes] = []
    total = 0
    members = 0
    while True:
        members += 1
        if members > MAX_GZIP_MEMBERS:
            raise BadBody(
                f"too many gzip members (more than {MAX_GZIP_MEMBERS} concatenated streams)"
            )
        unpacker = zlib.decompressobj(wbits)
        while not unpacker.eof:
            if pos >= end:
                raise BadBody(f"truncated {encoding.decode()} data")
            piece = view[pos : pos + INFLATE_STEP]
            pos += len(piece)
            try:
                chunk = unpacker.decompress(piece, limit + 1 - total)
            except zlib.error as e:
                raise BadBody(f"bad {encoding.decode()} data: {e}") from None
            total += len(chunk)
            out.append(chunk)
            if total > limit:
                return None  # (with input left over: unconsumed_tail)
        pos -= len(unpacker.unused_data)  # the next member starts there
        if pos >= end:
            return b"".join(out)
        if encoding != b"gzip":
            raise BadBody(f"data after the end of the {encoding.decode()} stream")


@dataclass(frozen=True)
class Refusal:
    """A request body refused: its status, counter reason and message."""

    status: int
    reason: str
    message: str


class Accepted(NamedTuple):
    """A request body that is an OTLP trace request X-Ray takes."""

    body: bytes  # decompressed
    shape: otlp_wire.RequestShape
    protobuf: bool  # (else JSON)


Checked = Accepted | Refusal


def check_body(body: bytes, encoding: bytes, protobuf: bool, max_body: int) -> Checked:
    """Decompress (``encoding``) and check a request body, without a reactor.

    Pure: safe to run in a thread.  At most ``max_body`` bytes decompressed.
    """
    if encoding in _INFLATE_WBITS:
        try:
            inflated = inflate(body, encoding, max_body)
        except BadBody as e:
            return Refusal(400, "bad_data", str(e))
        if inflated is None:
            return _too_large(max_body)
        body = inflated
    if len(body) > max_body:
        return _too_large(max_body)
    try:
        shape = otlp_wire.request_shape(body) if protobuf else otlp_wire.json_request_shape(body)
    except otlp_wire.WireError as e:
        return Refusal(400, "bad_data", f"not an OTLP ExportTraceServiceRequest: {e}")
    if shape.spans > otlp_wire.MAX_SPANS_PER_REQUEST:
        return Refusal(
            400,
            "too_many_spans",
            f"{shape.spans} spans in one request; X-Ray takes at most "
            f"{otlp_wire.MAX_SPANS_PER_REQUEST} (lower the SDK's batch size, "
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
        )
    if shape.largest_span > otlp_wire.MAX_SPAN_BYTES:
        return Refusal(
            400,
            "span_too_large",
            f"a span of {shape.largest_span} bytes; X-Ray takes spans of at most "
            f"{otlp_wire.MAX_SPAN_BYTES} bytes",
        )
    return Accepted(body, shape, protobuf)


def _too_large(max_body: int) -> Refusal:
    message = f"request body larger than {max_body} bytes (X-Ray's limit), decompressed"
    return Refusal(413, "too_large", message)


def rpc_status(code: int, message: str) -> bytes:
    """A serialized ``google.rpc.Status`` with ``code`` and ``message``."""
    text = message.encode("utf-8")
    varint = otlp_wire.encode_varint
    return b"\x08" + varint(code) + b"\x12" + varint(len(text)) + text


def error_answer(protobuf: bool, status: int, message: str) -> tuple[bytes, bytes]:
    """(content type, body) of an error answer in the request's format."""
    code = _RPC_CODES.get(status, 2)
    if protobuf:
        return PROTOBUF, rpc_status(code, message)
    return JSON, json.dumps({"code": code, "message": message}).encode("utf-8")


def _wants_protobuf(request: Request) -> bool:
    ctype = request.getHeader(b"content-type") or b""
    return ctype.split(b";", 1)[0].strip().lower() == PROTOBUF


class _Refusals:
    """Counting and (throttled) logging of refused requests, shared by the parts below."""

    log = Logger()

    def __init__(self, counters: OtlpCounters, clock: IReactorTime) -> None:
        self.counters = counters
        self._throttle = Throttle(clock, 10.0)

    def failed(self, peer: str, failure: Failure) -> None:
        """The receiver raised while handling a request (a bug): count, log throttled."""
        self.counters.refused["internal_error"] += 1
        suppressed = self._throttle.check("internal_error")
        if suppressed is None:
            return
        note = f" ({suppressed} more not logged)" if suppressed else ""
        # An [Error] with the traceback (log.failure would make it [Critical]).
        self.log.error(
            "Error while handling an OTLP request from {peer}; answered 500{note}",
            log_failure=failure,
            peer=peer,
            note=note,
        )

    def refuse(
        self, site: BoundedSite, limit: Limit, client: IAddress | None, request: Request | None
    ) -> bytes:
        """A refusal by the receiver's Site (see ``Refusals``)."""
        limits, peer = site.limits, format_address(client)
        extra: tuple[bytes, ...] = ()
        if limit is Limit.DEADLINE:
            self.refused(
                "deadline",
                peer,
                f"headers and body did not arrive within {limits.deadline or 0:g} seconds",
            )
            status, message = 408, "request deadline passed"
        elif limit is Limit.TOO_LARGE:
            status = 413
            message = f"request body larger than {limits.max_body} bytes (X-Ray takes 5 MB)"
            self.refused("too_large", peer, message)
        elif limit is Limit.HOLD_FULL or limit is Limit.OVERLOADED:
            hold = limits.hold
            used, capacity = (hold.used, hold.capacity) if hold is not None else (0, 0)
            status, extra = 503, (b"Retry-After: %d" % RETRY_AFTER,)
            message = (
                f"the daemon already holds {used} bytes of OTLP request bodies still "
                f"arriving, the most OTLP.HoldMB ({capacity // (1024 * 1024)} MB) allows; "
                "retry later"
            )
            self.refused("hold_full", peer, message)
        else:  # the connection cap (the receiver has no per-address one): closed unanswered
            message = f"{limits.max_connections} connections are open already"
            self.refused("too_many_connections", peer, message + " (OTLP.MaxConnections)")
            return b""
        if request is None:
            return b""  # a deadline before the request line was in: just close
        ctype, body = error_answer(_wants_protobuf(request), status, message)
        return raw_response(status, ctype, body, *extra)

    def refused(self, reason: str, peer: str, message: str) -> None:
        self.counters.refused[reason] += 1
        suppressed = self._throttle.check(reason)
        if suppressed is None:
            return
        note = f" ({suppressed} more not logged)" if suppressed else ""
        self.log.warn(
            "Refused an OTLP request from {peer}: {detail}{note}",
            peer=peer,
            detail=message,
            note=note,
        )


def _peer(request: Any) -> str:
    try:
        address = request.getClientAddress()
        return f"{address.host}:{address.port}"
    except AttributeError:
        return "unknown"


class OtlpTracesResource(Resource):
    """``POST /v1/traces``: check, frame, offer to the span buffer, answer."""

    isLeaf = True

    def __init__(
        self,
        buffer: SegmentBuffer,
        counters: OtlpCounters,
        clock: IReactorTime,
        *,
        max_body: int = MAX_BODY,
        refusals: _Refusals | None = None,
        run_in_thread: Runner | None = None,
        thread_bytes: int = THREAD_BYTES,
    ) -> None:
        # run_in_thread: where bodies of thread_bytes or more (as received)
        # are decompressed and checked; None: all of them here, inline.
        super().__init__()
        self.buffer = buffer
        self.counters = counters
        self.max_body = max_body
        self.refusals = refusals or _Refusals(counters, clock)
        self.thread_bytes = thread_bytes
        self._run = run_in_thread
        self._working: set[Deferred[Any]] = set()

    def render(self, request: Request) -> Any:
        try:
            return self._render(request)
        except Exception:
            return self._internal_error(request, Failure())

    def _internal_error(self, request: Request, failure: Failure) -> bytes:
        # A last resort: a request must never cost a Critical traceback
        # per request (twisted.web's) or more than a counted 500.
        self.refusals.failed(_peer(request), failure)
        message = "internal error in the daemon's OTLP receiver; see the daemon's log"
        ctype, body = error_answer(_wants_protobuf(request), 500, message)
        request.setResponseCode(500)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.responseHeaders.removeHeader(b"retry-after")
        return b"" if request.method == b"HEAD" else body

    def _render(self, request: Request) -> Any:
        if request.path != PATH:
            return self._refuse(
                request, 404, "not_found", "not found: OTLP traces go to /v1/traces"
            )
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            return self._refuse(request, 405, "bad_method", "method not allowed: use POST")
        if request.getHeader(b"origin") is not None:
            return self._refuse(
                request,
                403,
                "origin",
                "requests from web pages (with an Origin header) are refused",
            )
        ctype = (request.getHeader(b"content-type") or b"").split(b";", 1)[0].strip().lower()
        if ctype not in (PROTOBUF, JSON):
            return self._refuse(
                request,
                415,
                "unsupported_media",
                f"unsupported Content-Type {printable(ctype, 64)!r}: use {PROTOBUF.decode()} "
                f"or {JSON.decode()}",
            )
        encoding = (request.getHeader(b"content-encoding") or b"").strip().lower()
        if encoding not in _ENCODINGS:
            return self._refuse(
                request,
                415,
                "unsupported_media",
                f"unsupported Content-Encoding {printable(encoding, 64)!r}: use gzip or none",
            )
        content = request.content
        body = content.read() if content is not None else b""
        protobuf = ctype == PROTOBUF
        if self._run is None or len(body) < self.thread_bytes:
            return self._answer(check_body(body, encoding, protobuf, self.max_body), request)
        return self._check_in_thread(request, body, encoding, protobuf)

    def _check_in_thread(
        self, request: Request, body: bytes, encoding: bytes, protobuf: bool
    ) -> Any:
        """Inflate and check a large body in a thread; answer once that is done.

        The request's body stays charged to the Site's hold until the work
        is done, even if the client goes first (it is still in memory).  The
        request deadline does not run meanwhile: it bounds the client's
        sending, which is over.  A client gone by then gets nothing: its
        spans are not queued (it saw no 200, and retries).
        """
        assert self._run is not None
        max_body = self.max_body
        work = self._run(lambda: check_body(body, encoding, protobuf, max_body))
        if isinstance(request, BoundedRequest):
            request.keep_held_until(work)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        self._working.add(work)

        def done(result: Checked | Failure) -> None:
            self._working.discard(work)
            if gone:
                return
            if isinstance(result, Failure):
                answer = self._internal_error(request, result)
            else:
                try:
                    answer = self._answer(result, request)
                except Exception:
                    answer = self._internal_error(request, Failure())
            request.write(answer)
            request.finish()

        work.addBoth(done)
        work.addErrback(lambda failure: self.refusals.failed(_peer(request), failure))
        return NOT_DONE_YET

    def when_idle(self) -> Deferred[None]:
        """Fires once no body is being checked in a thread (at once if none is)."""
        waits = list(self._working)
        return DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)

    def _answer(self, checked: Checked, request: Request) -> bytes:
        """Queue a checked body's spans and answer, or answer its refusal."""
        if isinstance(checked, Refusal):
            return self._refuse(request, checked.status, checked.reason, checked.message)
        body, shape, protobuf = checked
        if shape.spans:
            kind = KIND_PROTOBUF if protobuf else KIND_JSON
            if not self.buffer.offer(frame(kind, shape.spans, body)):
                request.setHeader(b"retry-after", b"%d" % RETRY_AFTER)
                return self._refuse(
                    request,
                    503,
                    "buffer_full",
                    "the daemon's memory buffer is full; retry later (-m/TotalBufferSizeMB)",
                )
        counters = self.counters
        counters.requests_received += 1
        counters.spans_received += shape.spans
        ctype = PROTOBUF if protobuf else JSON
        request.setResponseCode(200)
        request.setHeader(b"content-type", ctype)
        answer = b"" if protobuf else b"{}"
        request.setHeader(b"content-length", b"%d" % len(answer))
        return answer

    def _refuse(self, request: Request, status: int, reason: str, message: str) -> bytes:
        self.refusals.refused(reason, _peer(request), message)
        ctype, body = error_answer(_wants_protobuf(request), status, message)
        request.setResponseCode(status)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def otlp_site(
    resource: OtlpTracesResource,
    *,
    clock: IReactorTime,
    idle_timeout: float,
    deadline: float = DEFAULT_DEADLINE,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    max_wire_body: int = MAX_WIRE_BODY,
    hold: HeldBytes | None = None,
) -> BoundedSite:
    """The receiver's Site: bounded connections, request deadlines, bodies as they arrive.

    Over ``max_wire_body``: 413 at once.  The bytes of a body still
    arriving are charged to ``hold`` (``OTLP.HoldMB``, all connections
    together) until the request is answered or its connection is gone; a
    body that does not fit, by its Content-Length or as it arrives, is
    answered 503 with Retry-After (the SDK retries), so senders that go
    quiet halfway cannot make the daemon hold more than that.
    """
    limits = Limits(
        idle_timeout=idle_timeout,
        deadline=deadline,
        max_body=max_wire_body,
        max_connections=max_connections,
        hold=hold if hold is not None else HeldBytes(DEFAULT_HOLD, clock),
    )
    return BoundedSite(resource, limits, resource.refusals, reactor=clock)


class OtlpHTTPService(AdoptedPortService):
    """Serves the receiver on a socket bound while the daemon was built."""

    def __init__(self, reactor: Any, sock: socket.socket, site: BoundedSite) -> None:
        super().__init__(reactor, sock)
        self.site = site
        self._checks_done: Deferred[None] | None = None  # closed() waiting for checks

    def adopt(self, sock: socket.socket) -> Any:
        return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.site)

    def listening(self) -> None:
        self.log.info(
            "Receiving OpenTelemetry spans (OTLP/HTTP) on http://{address}/v1/traces",
            address=str(self.address),
        )

    def closed(self) -> Deferred[Any] | None:
        # Requests are answered as soon as their body is in (once checked,
        # for large ones in a thread: that is waited for), so what is left
        # are idle keep-alive connections and requests not yet complete
        # (their senders retry elsewhere): nothing accepted is cut off.  A
        # client that does not read is aborted after the streams' stop grace,
        # so it cannot hold up the span batcher's drain.
        resource = self.site.resource
        if not isinstance(resource, OtlpTracesResource):
            return self.site.close_connections(STOP_GRACE)
        done: Deferred[None] = Deferred()
        self._checks_done = done

        def checked(_: object) -> None:
            if not done.called:
                done.callback(None)

        resource.when_idle().addCallback(checked)
        return done.addCallback(lambda _: self.site.close_connections(STOP_GRACE))

    def stop_now(self) -> None:
        """End the stop grace: abort the open connections (now, or when the stop starts).

        Checks still running in a thread are not waited for any more (a
        thread stuck behind a DNS lookup would hold the stop): their clients
        are cut before an answer, so they send again.
        """
        self.site.stop_now()
        done = self._checks_done
        if done is not None and not done.called:
            done.callback(None)
