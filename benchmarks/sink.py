"""A fast counting HTTP sink that stands in for X-Ray's PutTraceSegments and /v1/traces.

One asyncio process, HTTP/1.1 with keep-alive (plus chunked request bodies
and ``Expect: 100-continue``, for daemons that use them), reading into one
buffer per connection without copying.  For every upload it
notes the arrival time and runs one regex over the raw body
(``benchmarks.segments.DOC_RE``) to get each document's id and send time; no
JSON is parsed, and it answers ``{"UnprocessedTraceSegments":[]}`` at once.
It does not check signatures.

OTLP uploads (``POST .../v1/traces``, the daemon's span bridge) are gunzipped
when their Content-Encoding says gzip, and one regex over the protobuf body
(``benchmarks.spans.SPAN_RE``) finds each span's id and send time; no
protobuf is decoded, and the answer is an empty ``ExportTraceServiceResponse``
(200, no bytes).  Their spans are recorded with the segments (the runner
gives them their own id range) and counted apart in the stats.

Control requests (from the runner, never during a measurement):

* ``GET /_bench/stats``  -> ``{"requests": n, "docs": n, "bytes": n, "other": n,
  "otlp_requests": n, "spans": n, "otlp_bytes": n, "otlp_gzipped": n, ...}``
* ``POST /_bench/take``  -> every record so far, one ``arrival id sent`` line
  each, and forgets them (counters are reset too)

It prints ``listening <port>`` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import ssl
import sys
import time
import zlib

from benchmarks.segments import DOC_RE
from benchmarks.spans import SPAN_RE

OK_BODY = b'{"UnprocessedTraceSegments":[]}'
MAX_HEADER = 64 * 1024


def response(
    body: bytes, status: str = "200 OK", close: bool = False, kind: str = "application/json"
) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
    if close:
        head += "Connection: close\r\n"
    return head.encode() + b"\r\n" + body


OK_RESPONSE = response(OK_BODY)
PROTOBUF = "application/x-protobuf"
OTLP_OK_RESPONSE = response(b"", kind=PROTOBUF)  # an empty ExportTraceServiceResponse


class Records:
    """What arrived: per upload, its arrival time and the (id, sent) pairs found."""

    def __init__(self, verify: bool = False) -> None:
        self.verify = verify
        self.reset()

    def reset(self) -> None:
        self.uploads: list[tuple[float, list[tuple[bytes, bytes]]]] = []
        self.requests = 0
        self.docs = 0
        self.bytes = 0
        self.other = 0  # requests to paths other than /TraceSegments
        self.mismatches = 0  # --verify: regex and JSON disagree on a body
        self.otlp_requests = 0
        self.spans = 0
        self.otlp_bytes = 0  # as received (compressed)
        self.otlp_gzipped = 0  # requests with Content-Encoding: gzip
        self.otlp_bad = 0  # bodies that did not gunzip

    def add(self, body: bytes | memoryview) -> None:
        found = DOC_RE.findall(body)
        self.uploads.append((time.time(), found))
        self.requests += 1
        self.docs += len(found)
        self.bytes += len(body)
        if self.verify and len(json.loads(bytes(body))["TraceSegmentDocuments"]) != len(found):
            self.mismatches += 1

    def add_spans(self, body: bytes | memoryview, encoding: bytes) -> bool:
        """Record an OTLP upload's spans; False if its body does not decompress."""
        self.otlp_requests += 1
        self.otlp_bytes += len(body)
        if encoding == b"gzip":
            self.otlp_gzipped += 1
            try:
                body = zlib.decompress(body, 16 + zlib.MAX_WBITS)
            except zlib.error:
                self.otlp_bad += 1
                return False
        found = SPAN_RE.findall(body)
        self.uploads.append((time.time(), found))
        self.spans += len(found)
        return True

    def stats(self) -> bytes:
        return json.dumps(
            {
                "requests": self.requests,
                "docs": self.docs,
                "bytes": self.bytes,
                "other": self.other,
                "mismatches": self.mismatches,
                "otlp_requests": self.otlp_requests,
                "spans": self.spans,
                "otlp_bytes": self.otlp_bytes,
                "otlp_gzipped": self.otlp_gzipped,
                "otlp_bad": self.otlp_bad,
            }
        ).encode()

    def take(self) -> bytes:
        lines = [
            b"%.6f %s %s\n" % (arrival, doc_id, sent)
            for arrival, found in self.uploads
            for doc_id, sent in found
        ]
        self.reset()
        return b"".join(lines)


class SinkProtocol(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection.

    The kernel reads straight into one preallocated buffer and bodies are
    searched in place through a memoryview, so a 60 KB upload is never copied.
    """

    def __init__(self, records: Records, size: int = 1024 * 1024) -> None:
        self.records = records
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = 0  # first unparsed byte
        self.end = 0  # first free byte
        self.transport: asyncio.Transport | None = None
        # The request being read: (method, path, close?, body length or -1 for
        # chunked, Content-Encoding).
        self.request: tuple[bytes, bytes, bool, int, bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        want = max(sizehint, 65536)
        if self.start == self.end:
            self.start = self.end = 0
        elif len(self.buf) - self.end < want:
            self._make_room(want)
        return self.view[self.end :]

    def _make_room(self, want: int) -> None:
        """Move the unparsed bytes to the front, into a bigger buffer if needed."""
        pending = self.end - self.start
        request = self.request
        need = pending + want + (request[3] if request is not None and request[3] > 0 else 0)
        if need > len(self.buf):
            new = bytearray(max(need, 2 * len(self.buf)))
            new[:pending] = self.view[self.start : self.end]
            self.view.release()
            self.buf, self.view = new, memoryview(new)
        else:
            self.buf[:pending] = self.view[self.start : self.end]
        self.start, self.end = 0, pending

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        while self.transport is not None:
            if self.request is None and not self._read_head():
                return
            assert self.request is not None
            method, path, close, length, encoding = self.request
            if length < 0:
                body: bytes | memoryview | None = self._read_chunked()
            elif self.end - self.start >= length:
                body = self.view[self.start : self.start + length]
                self.start += length
            else:
                body = None
            if body is None:
                return
            self.request = None
            self._handle(method, path, body, close, encoding)

    def _read_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n", self.start, self.end)
        if end < 0:
            if self.end - self.start > MAX_HEADER:
                self._reply(response(b"", "431 Request Header Fields Too Large"), True)
            return False
        lines = bytes(self.view[self.start : end]).split(b"\r\n")
        self.start = end + 4
        method, path, version = lines[0].split(b" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        conn = headers.get(b"connection", b"").lower()
        close = conn == b"close" or (version == b"HTTP/1.0" and conn != b"keep-alive")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        length = -1 if chunked else int(headers.get(b"content-length", b"0"))
        if headers.get(b"expect", b"").lower() == b"100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        encoding = headers.get(b"content-encoding", b"").lower()
        self.request = (method, path, close, length, encoding)
        return True

    def _read_chunked(self) -> bytes | None:
        """The whole chunked body once it is all here (it stays buffered till then)."""
        buf, pos = self.buf, self.start
        chunks: list[bytes] = []
        while True:
            eol = buf.find(b"\r\n", pos, self.end)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:  # last chunk, then optional trailers, then an empty line
                if buf[eol + 2 : eol + 4] == b"\r\n":
                    self.start = eol + 4
                else:
                    trailers_end = buf.find(b"\r\n\r\n", eol, self.end)
                    if trailers_end < 0:
                        return None
                    self.start = trailers_end + 4
                return b"".join(chunks)
            if self.end < eol + 2 + size + 2:
                return None
            chunks.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2

    def _handle(
        self, method: bytes, path: bytes, body: bytes | memoryview, close: bool, encoding: bytes
    ) -> None:
        records = self.records
        if path.endswith(b"/TraceSegments"):
            records.add(body)
            self._reply(OK_RESPONSE if not close else response(OK_BODY, close=True), close)
        elif path.endswith(b"/v1/traces") and method == b"POST":
            if records.add_spans(body, encoding):
                ok = OTLP_OK_RESPONSE if not close else response(b"", close=True, kind=PROTOBUF)
                self._reply(ok, close)
            else:
                self._reply(response(b"", "400 Bad Request", close, PROTOBUF), close)
        elif path == b"/_bench/stats":
            self._reply(response(records.stats()), close)
        elif path == b"/_bench/take" and method == b"POST":
            self._reply(response(records.take()), close)
        else:
            records.other += 1
            self._reply(response(b"{}"), close)

    def _reply(self, data: bytes, close: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        transport.write(data)
        if close:
            transport.close()
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(host: str, port: int, verify: bool, tls: tuple[str, str] | None = None) -> None:
    loop = asyncio.get_running_loop()
    records = Records(verify)
    context = None
    if tls is not None:  # production uploads are HTTPS: --tls-cert/--tls-key measure that
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(*tls)
    server = await loop.create_server(
        lambda: SinkProtocol(records), host, port, backlog=128, ssl=context
    )
    bound = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"listening {bound}\n")
    sys.stdout.flush()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            stop.set_result(None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--verify", action="store_true", help="also json-parse every body and count mismatches"
    )
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args(argv)
    tls = (args.tls_cert, args.tls_key) if args.tls_cert else None
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.verify, tls))


if __name__ == "__main__":
    main()
