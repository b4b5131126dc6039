"""The local sink: segments appended to a JSON Lines file instead of uploaded.

``--local-sink PATH`` (or ``-`` for stdout) lets a developer with no AWS
account see what their SDK sends.  ``LocalSink.put_trace_segments`` has the
uploader's contract - a Deferred that always fires with an ``Outcome`` - so
the batcher, its retries and its shutdown drain work unchanged.

Each document becomes one line: a JSON object is written exactly as received
(any raw line breaks in it can only be insignificant whitespace, and become
spaces); anything else, such as an OTLP ``T1S...`` payload or a body that is
not valid JSON, is wrapped as ``{"raw": "<text>"}`` so every line of the
file parses.  Writes are plain appends with no fsync: this is a developer
tool, and a line per document must be visible at once (``tail -f``), not
survive a power cut.

With ``--otlp-address``, ``LocalSpanSink`` is the OTLP uploader's stand-in
and writes to the same file: one line per OTLP request as the SDK exported
it, in the OTLP/JSON form of an ``ExportTraceServiceRequest`` (protobuf
requests are decoded with opentelemetry-proto, ``otlp_json``; JSON requests
are written as received), so each line starts with ``{"resourceSpans"`` and
keeps its resource and scope once for all of its spans.  A protobuf request
that does not decode is not lost: it becomes ``{"otlpProtobufBase64": ...,
"error": ...}``.
"""

from __future__ import annotations

import base64
import errno
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from xraytwisted.observe.counters import OtlpCounters
from xraytwisted.pipeline import otlp_json
from xraytwisted.pipeline.otlp_batches import KIND_JSON, spans_in, unframe
from xraytwisted.pipeline.uploader import Outcome, UploadError

STDOUT = "-"
RAW_KEY = "raw"
UNDECODED_KEY = otlp_json.UNDECODED_KEY  # a protobuf OTLP request that did not decode

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


class LocalSinkError(Exception):
    """The sink file cannot be opened; str() is the one line to show."""


def _no_constants(name: str) -> Any:
    # Python's json accepts NaN and Infinity; other JSON readers (jq, the
    # X-Ray backend) do not, so such a document is not passed through as is.
    raise ValueError(f"{name} is not JSON")


def is_json_object(doc: bytes) -> bool:
    """Whether ``doc`` is one valid (strict) JSON object."""
    try:
        value = json.loads(doc, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(value, dict)


def encode_line(doc: bytes) -> bytes:
    """One JSON Lines line (with its newline) for one segment document."""
    if is_json_object(doc):
        # Strict JSON allows no raw control characters inside strings, so a
        # line break here is whitespace between tokens and a space is
        # equivalent; every other byte stays as the SDK sent it.
        if b"\n" in doc or b"\r" in doc:
            doc = doc.replace(b"\r", b" ").replace(b"\n", b" ")
        return doc + b"\n"
    # Invalid UTF-8 becomes U+FFFD, as in uploads (uploader.trace_segments_body).
    text = doc.decode("utf-8", "replace")
    return json.dumps({RAW_KEY: text}, ensure_ascii=False).encode("utf-8") + b"\n"


def encode_batch(docs: Sequence[bytes]) -> bytes:
    return b"".join(map(encode_line, docs))


def encode_otlp_line(doc: bytes) -> bytes:
    """One JSON Lines line (with its newline) for one framed OTLP request (otlp_batches)."""
    kind, _, body = unframe(doc)
    if kind == KIND_JSON:
        return encode_line(bytes(body))  # OTLP/JSON already: as received, on one line
    try:
        document = otlp_json.request_to_json(bytes(body))
    except (otlp_json.OtlpDecodeError, otlp_json.OtlpUnavailable) as e:
        document = {
            UNDECODED_KEY: base64.b64encode(body).decode("ascii"),
            "error": str(e),
        }
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


class LocalSink:
    """Appends accepted documents to a file (or stdout) as JSON Lines.

    The file is opened when the sink is made, so a bad path is a startup
    error.  If the file is moved or deleted while the daemon runs (a
    developer clearing it, logrotate), the next batch opens a new one at the
    same path instead of writing into the unlinked file.
    """

    def __init__(self, path: str, clock: IReactorTime, stdout_fd: int | None = None) -> None:
        self._clock = clock
        self._to_stdout = path == STDOUT
        self.path = STDOUT if self._to_stdout else os.path.abspath(path)
        self._fd: int | None = None
        self._closed = False
        # A failed write that could not be undone left a partial line behind;
        # the next write starts a new line so the damage stays in one line.
        self._partial = False
        if self._to_stdout:
            self._fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
        else:
            try:
                self._fd = self._open()
            except OSError as e:
                raise LocalSinkError(
                    f"cannot open local sink file {self.path}: {_reason(e)}; choose another "
                    "path with --local-sink (or - for stdout) or fix the directory permissions"
                ) from None

    def _open(self) -> int:
        return os.open(self.path, _OPEN_FLAGS, 0o644)

    def _current_fd(self) -> int:
        """The descriptor to write to, reopening the path if the file was moved."""
        fd = self._fd
        if self._to_stdout:
            assert fd is not None
            return fd
        if fd is not None:
            try:
                on_disk = os.stat(self.path)
                ours = os.fstat(fd)
                if (on_disk.st_dev, on_disk.st_ino) == (ours.st_dev, ours.st_ino):
                    return fd
            except FileNotFoundError:
                pass
            os.close(fd)
            self._fd = None
        self._fd = fd = self._open()
        self._partial = False
        return fd

    def put_trace_segments(self, docs: Sequence[bytes]) -> Deferred[Outcome]:
        """Append one line per document; never fails, like Uploader.put_trace_segments."""
        start = self._clock.seconds()
        return defer.succeed(self.write(encode_batch(docs), start, "segments"))

    def write(self, data: bytes, start: float, what: str) -> Outcome:
        """Append whole lines; the Outcome of an upload that began at ``start``."""
        try:
            self._append(data)
        except OSError as e:
            where = "stdout" if self._to_stdout else self.path
            return Outcome(
                seconds=self._clock.seconds() - start,
                error=UploadError(
                    error_class="",  # no request to X-Ray was made
                    retryable=True,
                    throttled=False,
                    message=f"cannot write to local sink {where}: {_reason(e)} "
                    f"(free disk space or fix permissions; the {what} are kept and retried)",
                ),
            )
        return Outcome(seconds=self._clock.seconds() - start)

    def _append(self, data: bytes) -> None:
        if self._closed:
            raise OSError(errno.EBADF, "the local sink is closed")
        fd = self._current_fd()
        if self._partial:
            data = b"\n" + data
        written = 0
        try:
            view = memoryview(data)
            while written < len(data):
                written += os.write(fd, view[written:])
        except OSError:
            if written:
                self._undo(fd, written)
            raise
        self._partial = False

    def _undo(self, fd: int, written: int) -> None:
        """Remove the first ``written`` bytes of a failed batch so it can be written again."""
        if not self._to_stdout:
            try:
                # O_APPEND and a single writer: the batch is the file's tail.
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                return
            except OSError:
                pass
        self._partial = True  # could not undo it: end the broken line next time

    def close(self) -> None:
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None and not self._to_stdout:
            os.close(fd)


class LocalSpanSink:
    """The OTLP uploader's stand-in for ``--local-sink``: OTLP requests as OTLP/JSON lines.

    ``send`` has ``OtlpUploader.send``'s contract (the span batcher's send
    function) and writes through the segments' ``LocalSink``, so both kinds
    of line share one file, its reopening and its error handling.  Spans
    written are counted as sent.
    """

    def __init__(self, sink: LocalSink, clock: IReactorTime, counters: OtlpCounters) -> None:
        self.sink = sink
        self._clock = clock
        self._counters = counters

    def send(self, docs: Sequence[bytes]) -> Deferred[Outcome]:
        start = self._clock.seconds()
        outcome = self.sink.write(b"".join(map(encode_otlp_line, docs)), start, "spans")
        if outcome.error is None:
            self._counters.spans_sent += spans_in(list(docs))
        return defer.succeed(outcome)
