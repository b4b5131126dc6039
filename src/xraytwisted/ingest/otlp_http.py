"""The OTLP/HTTP receiver: ``POST /v1/traces`` from OpenTelemetry SDKs.

Off unless ``--otlp-address`` (``Socket.OTLPAddress``) is set, because 4318
is often taken by a collector.  A request is checked without decoding its
spans (``otlp_wire`` walks the three outer message levels) and, if good,
framed and offered to the span buffer, where it waits for an upload like a
segment does; the answer is the OTLP one:

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

Limits like the TCP port's: the body limit is enforced as the body arrives
(Content-Length, then bytes received); headers and body must arrive within
``deadline`` seconds of a request's first byte (408, connection closed); an
idle connection is closed after ``idle_timeout``; at most
``max_connections`` connections are open at once (more are closed as soon
as they are accepted).  Every refusal is counted by reason
(``OtlpCounters.refused``) and logged at most once per reason every 10 s.
"""

from __future__ import annotations

import json
import socket
import zlib
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from xraytwisted.ingest import otlp_wire
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import OtlpCounters
from xraytwisted.observe.logs import Throttle, printable
from xraytwisted.pipeline.buffer import SegmentBuffer
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


def rpc_status(code: int, message: str) -> bytes:
    """A serialized ``google.rpc.Status`` with ``code`` and ``message``."""
    text = message.encode("utf-8")
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


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
    ) -> None:
        super().__init__()
        self.buffer = buffer
        self.counters = counters
        self.max_body = max_body
        self.refusals = refusals or _Refusals(counters, clock)

    def render(self, request: Request) -> bytes:
        try:
            return self._render(request)
        except Exception:
            # A last resort: a request must never cost a Critical traceback
            # per request (twisted.web's) or more than a counted 500.
            self.refusals.failed(_peer(request), Failure())
            message = "internal error in the daemon's OTLP receiver; see the daemon's log"
            ctype, body = error_answer(_wants_protobuf(request), 500, message)
            request.setResponseCode(500)
            request.setHeader(b"content-type", ctype)
            request.setHeader(b"content-length", b"%d" % len(body))
            request.responseHeaders.removeHeader(b"retry-after")
            return b"" if request.method == b"HEAD" else body

    def _render(self, request: Request) -> bytes:
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
        if encoding in _INFLATE_WBITS:
            try:
                inflated = inflate(body, encoding, self.max_body)
            except BadBody as e:
                return self._refuse(request, 400, "bad_data", str(e))
            if inflated is None:
                return self._too_large(request)
            body = inflated
        if len(body) > self.max_body:
            return self._too_large(request)
        try:
            shape = (
                otlp_wire.request_shape(body)
                if ctype == PROTOBUF
                else otlp_wire.json_request_shape(body)
            )
        except otlp_wire.WireError as e:
            return self._refuse(
                request, 400, "bad_data", f"not an OTLP ExportTraceServiceRequest: {e}"
            )
        if shape.spans > otlp_wire.MAX_SPANS_PER_REQUEST:
            return self._refuse(
                request,
                400,
                "too_many_spans",
                f"{shape.spans} spans in one request; X-Ray takes at most "
                f"{otlp_wire.MAX_SPANS_PER_REQUEST} (lower the SDK's batch size, "
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE)",
            )
        if shape.largest_span > otlp_wire.MAX_SPAN_BYTES:
            return self._refuse(
                request,
                400,
                "span_too_large",
                f"a span of {shape.largest_span} bytes; X-Ray takes spans of at most "
                f"{otlp_wire.MAX_SPAN_BYTES} bytes",
            )
        if shape.spans:
            kind = KIND_PROTOBUF if ctype == PROTOBUF else KIND_JSON
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
        request.setResponseCode(200)
        request.setHeader(b"content-type", ctype)
        answer = b"" if ctype == PROTOBUF else b"{}"
        request.setHeader(b"content-length", b"%d" % len(answer))
        return answer

    def _too_large(self, request: Request) -> bytes:
        return self._refuse(
            request,
            413,
            "too_large",
            f"request body larger than {self.max_body} bytes (X-Ray's limit), decompressed",
        )

    def _refuse(self, request: Request, status: int, reason: str, message: str) -> bytes:
        self.refusals.refused(reason, _peer(request), message)
        ctype, body = error_answer(_wants_protobuf(request), status, message)
        request.setResponseCode(status)
        request.setHeader(b"content-type", ctype)
        request.setHeader(b"content-length", b"%d" % len(body))
        return b"" if request.method == b"HEAD" else body


def _raw_answer(request: Any, status: int, reason: bytes, message: str, extra: bytes = b"") -> None:
    """Answer on the wire and close: for refusals before twisted.web made a Request of it."""
    ctype, body = error_answer(_wants_protobuf(request), status, message)
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%sConnection: close"
        b"\r\n\r\n" % (status, reason, ctype, len(body), extra)
    )
    channel = request.channel
    if channel is not None and channel.transport is not None:
        channel.transport.write(head + body)
        channel.loseConnection()


class _OtlpRequest(Request):
    """A Request whose body is bounded as it arrives.

    Over the site's ``max_wire_body``: 413 at once.  The bytes of a body
    still arriving are charged to the site's ``hold`` (``OTLP.HoldMB``, all
    connections together) until the request is answered or its connection
    is gone; a body that does not fit, by its Content-Length or as it
    arrives, is answered 503 with Retry-After (the SDK retries), so senders
    that go quiet halfway cannot make the daemon hold more than that.
    """

    _refused = False
    _body_bytes = 0
    _held = 0

    def _site(self) -> Any:
        return getattr(self.channel, "site", None)

    def _limit(self) -> int:
        return int(getattr(self._site(), "max_wire_body", MAX_WIRE_BODY))

    def _hold(self) -> HeldBytes | None:
        hold = getattr(self._site(), "hold", None)
        return hold if isinstance(hold, HeldBytes) else None

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()  # in memory: a read-only file system has no temp dir
        if length is not None and length > self._limit():
            self._refuse_too_large()
            return
        hold = self._hold()
        if length and hold is not None and not hold.fits(length):
            self._refuse_busy(hold)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._body_bytes += len(data)
        if self._body_bytes > self._limit():
            self._refuse_too_large()
            return
        hold = self._hold()
        if hold is not None:
            if not hold.fits(len(data)):
                self._refuse_busy(hold)
                return
            hold.charge(len(data))
            self._held += len(data)
        content = self.content
        assert content is not None  # set by gotLength
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            return  # answered already; the connection is closing
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        self._release()  # answered: the body is in the span buffer's budget, or refused
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._release()
        super().connectionLost(reason)

    def _release(self) -> None:
        held, self._held = self._held, 0
        hold = self._hold()
        if held and hold is not None:
            hold.release(held)

    def _refuse_too_large(self) -> None:
        message = f"request body larger than {self._limit()} bytes (X-Ray takes 5 MB)"
        self._refuse("too_large", message, 413, b"Request Entity Too Large")

    def _refuse_busy(self, hold: HeldBytes) -> None:
        message = (
            f"the daemon already holds {hold.used} bytes of OTLP request bodies still "
            f"arriving, the most OTLP.HoldMB ({hold.capacity // (1024 * 1024)} MB) allows; "
            "retry later"
        )
        self._refuse(
            "hold_full", message, 503, b"Service Unavailable", b"Retry-After: %d\r\n" % RETRY_AFTER
        )

    def _refuse(
        self, reason: str, message: str, status: int, phrase: bytes, extra: bytes = b""
    ) -> None:
        self._refused = True
        self._release()
        self.content = BytesIO()  # what arrived is dropped
        refusals = getattr(self._site(), "refusals", None)
        if isinstance(refusals, _Refusals):
            refusals.refused(reason, _peer(self), message)
        self.requestHeaders.removeHeader(b"expect")  # no "100 Continue" after this
        _raw_answer(self, status, phrase, message, extra)


class _OtlpChannel(http.HTTPChannel):
    """An HTTPChannel with a deadline for each request's headers and body."""

    _deadline_call: IDelayedCall | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        site = _site_of(self)
        if isinstance(site, OtlpSite):
            site.channel_opened(self)

    def dataReceived(self, data: bytes) -> None:
        site = _site_of(self)
        if self._deadline_call is None and isinstance(site, OtlpSite) and site.deadline > 0:
            # The first byte of a request: all of it must be in by the deadline.
            self._deadline_call = site.clock.callLater(site.deadline, self._past_deadline)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def _cancel_deadline(self) -> None:
        call, self._deadline_call = self._deadline_call, None
        if call is not None and call.active():
            call.cancel()

    def _past_deadline(self) -> None:
        self._deadline_call = None
        site = _site_of(self)
        if isinstance(site, OtlpSite):
            peer: Any = self.transport.getPeer() if self.transport is not None else None
            where = f"{peer.host}:{peer.port}" if hasattr(peer, "host") else "?"
            site.refusals.refused(
                "deadline",
                where,
                f"headers and body did not arrive within {site.deadline:g} seconds",
            )
        requests = self.requests
        if requests:
            _raw_answer(requests[-1], 408, b"Request Timeout", "request deadline passed")
        elif self.transport is not None:
            self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        super().connectionLost(reason)
        site = _site_of(self)
        if isinstance(site, OtlpSite):
            site.channel_closed(self)


def _site_of(channel: http.HTTPChannel) -> Any:
    return getattr(channel, "site", None)  # set by Site.buildProtocol


class OtlpSite(Site):
    """The receiver's Site: quiet, bounded connections, request deadlines."""

    noisy = False
    displayTracebacks = False
    protocol = _OtlpChannel  # type: ignore[assignment]
    requestFactory = _OtlpRequest

    def __init__(
        self,
        resource: OtlpTracesResource,
        *,
        clock: IReactorTime,
        idle_timeout: float,
        deadline: float = DEFAULT_DEADLINE,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_wire_body: int = MAX_WIRE_BODY,
        hold: HeldBytes | None = None,
    ) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=clock)
        # Bytes of bodies still arriving, all connections together (OTLP.HoldMB).
        self.hold = hold if hold is not None else HeldBytes(DEFAULT_HOLD, clock)
        self.clock = clock
        self.deadline = deadline
        self.max_connections = max_connections
        self.max_wire_body = max_wire_body
        self.refusals = resource.refusals
        self.channels: dict[_OtlpChannel, Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.channels) >= self.max_connections:
            where = f"{addr.host}:{addr.port}" if hasattr(addr, "host") else "?"
            self.refusals.refused(
                "too_many_connections",
                where,
                f"{self.max_connections} connections are open already (OTLP.MaxConnections)",
            )
            return None  # the reactor closes the new connection
        return super().buildProtocol(addr)

    def channel_opened(self, channel: _OtlpChannel) -> None:
        self.channels[channel] = Deferred()

    def channel_closed(self, channel: _OtlpChannel) -> None:
        closed = self.channels.pop(channel, None)
        if closed is not None:
            closed.callback(None)

    def close_connections(self) -> Deferred[Any]:
        """Close every connection; fires once all are gone."""
        waits = list(self.channels.values())
        for channel in list(self.channels):
            if channel.transport is not None:
                channel.transport.loseConnection()
        return DeferredList(waits, consumeErrors=True)

    def log(self, request: http.Request) -> None:
        pass  # no access log: one line per request would flood it


class OtlpHTTPService(AdoptedPortService):
    """Serves the receiver on a socket bound while the daemon was built."""

    def __init__(self, reactor: Any, sock: socket.socket, site: OtlpSite) -> None:
        super().__init__(reactor, sock)
        self.site = site

    def adopt(self, sock: socket.socket) -> Any:
        return self._reactor.adoptStreamPort(sock.fileno(), sock.family, self.site)

    def listening(self) -> None:
        self.log.info(
            "Receiving OpenTelemetry spans (OTLP/HTTP) on http://{address}/v1/traces",
            address=str(self.address),
        )

    def closed(self) -> Deferred[Any] | None:
        # Requests are answered as soon as their body is in, so what is left
        # are idle keep-alive connections and requests not yet complete
        # (their senders retry elsewhere): nothing accepted is cut off.
        return self.site.close_connections()
