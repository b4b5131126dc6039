"""The uploader: signed X-Ray API calls over treq, with classified outcomes.

``put_trace_segments`` never fails its Deferred: every result, good or bad,
comes back as an ``Outcome`` that says what happened, whether trying again
can help, and which telemetry error class it belongs to.  Deciding what to do
about it (count, log, retry) is the batcher's job.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

from hyperlink import EncodedURL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from xraytwisted import __version__
from xraytwisted.aws import sigv4
from xraytwisted.aws.endpoints import Endpoint
from xraytwisted.observe.logs import printable
from xraytwisted.outbound.treq_private import FixedURL

SERVICE = "xray"

# Error codes / statuses X-Ray uses for "try again later".
THROTTLING_CODES = frozenset(
    {
        "ThrottledException",
        "ThrottlingException",
        "Throttling",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "ProvisionedThroughputExceededException",
        "RequestThrottled",
        "SlowDown",
    }
)
# 400s that are X-Ray's verdict on the documents themselves (sending them
# again cannot succeed).  Any other 400 - no AWS error code (an HTML page from
# a proxy), RequestAbortedException, an auth code - is not about the
# documents and is retried like an outage.
CONTENT_CODES = frozenset(
    {"InvalidRequestException", "SerializationException", "ValidationException"}
)
# Codes that say the request's credentials or signature were refused (with
# 401/403, or the 400 that some AWS front ends use for them).
CREDENTIAL_CODES = frozenset(
    {
        "AccessDeniedException",
        "AccessDenied",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "IncompleteSignature",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
        "ExpiredToken",
        "ExpiredTokenException",
        "NotAuthorized",
    }
)
# Answers X-Ray never gives to a well-formed PutTraceSegments: the request
# went to the wrong place, or a proxy in front of X-Ray mangled or refused
# it (a wrong -e/--endpoint, a proxy's rules).  They say nothing about the
# segments, and the fix is in the configuration: retried like an outage
# (kept, spooled), with a line saying what to check.  (422 too: X-Ray's
# verdicts on content are 400 with an error code, or 413.  The OTLP path
# takes 415 and 422 as verdicts on content: otlp_upload.)
MISCONFIGURED_STATUSES = frozenset({404, 405, 411, 414, 415, 422})

# UnprocessedTraceSegments codes worth sending again (the rest describe the
# document itself, and X-Ray will refuse it again).
RETRYABLE_UNPROCESSED = THROTTLING_CODES | {
    "InternalFailure",
    "InternalError",
    "ServiceUnavailable",
}


class CredentialSource(Protocol):
    def current(self) -> sigv4.Credentials | None:
        """Credentials usable right now, or None when there are none."""

    def when_loaded(self) -> Deferred[None]:
        """Fires once the first lookup has finished (at once if it has)."""

    def status(self) -> str:
        """One line for people: where the credentials come from, or what is wrong."""


@dataclass(frozen=True)
class Unprocessed:
    id: str
    error_code: str
    message: str

    @property
    def retryable(self) -> bool:
        return self.error_code in RETRYABLE_UNPROCESSED


@dataclass(frozen=True)
class UploadError:
    """Why an upload attempt failed."""

    error_class: str  # a stats.ERROR_CLASSES name, or "" when no request was made
    retryable: bool
    throttled: bool
    message: str
    status: int | None = None
    code: str = ""
    credentials_refused: bool = False  # X-Ray (or its front end) refused the credentials
    advice: str = ""  # what to check, for the log line ("" when the message says it)


@dataclass(frozen=True)
class Outcome:
    seconds: float
    unprocessed: tuple[Unprocessed, ...] = ()
    error: UploadError | None = None


# ---------------------------------------------------------------------------
# Pure parts: request body and outcome classification


_CONTROL_BYTES = bytes(range(0x20))


def json_string_content(doc: bytes) -> bytes:
    """``doc`` escaped for the inside of a JSON string (no surrounding quotes).

    Invalid UTF-8 is replaced with U+FFFD, as the Go daemon's JSON encoder
    does, so a stray byte cannot fail the whole batch.
    """
    # Nearly every document is ASCII without control characters (SDKs send
    # compact JSON): then escaping quotes and backslashes is all there is to
    # do, and bytes.replace does it several times faster than json.dumps.
    if doc.isascii() and len(doc.translate(None, _CONTROL_BYTES)) == len(doc):
        return doc.replace(b"\\", b"\\\\").replace(b'"', b'\\"')
    text = json.dumps(doc.decode("utf-8", "replace"), ensure_ascii=False)
    return text[1:-1].encode("utf-8")


def trace_segments_body(docs: Sequence[bytes]) -> bytes:
    """The PutTraceSegments JSON body, each document as one JSON string.

    Byte for byte what escaping each document with ``json_string_content``
    gives, but a batch of clean documents (ASCII, no control characters:
    nearly every batch) is checked and escaped once as a whole.  They are
    joined with NUL, a control character no clean document contains, which
    then becomes the '","' between two JSON strings.
    """
    if not docs:
        return b'{"TraceSegmentDocuments":[]}'
    joined = b"\x00".join(docs)
    controls = len(joined) - len(joined.translate(None, _CONTROL_BYTES))
    if controls == len(docs) - 1 and joined.isascii():
        inner = joined.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\x00", b'","')
    else:
        inner = b'","'.join([json_string_content(doc) for doc in docs])
    return b"".join((b'{"TraceSegmentDocuments":["', inner, b'"]}'))


def parse_unprocessed(body: bytes) -> tuple[Unprocessed, ...]:
    try:
        document = json.loads(body) if body.strip() else {}
    except ValueError:
        return ()
    items = document.get("UnprocessedTraceSegments") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return ()
    return tuple(
        Unprocessed(
            id=str(item.get("Id") or ""),
            error_code=str(item.get("ErrorCode") or ""),
            message=str(item.get("Message") or ""),
        )
        for item in items
        if isinstance(item, dict)
    )


def error_code(headers: Mapping[str, str], body: bytes) -> tuple[str, str]:
    """The AWS error code and message of a failed rest-json response."""
    code = headers.get("x-amzn-errortype", "")
    message = ""
    try:
        document: Any = json.loads(body) if body.strip() else {}
    except ValueError:
        document = {}
    if isinstance(document, dict):
        code = code or str(document.get("__type") or document.get("code") or "")
        message = str(document.get("message") or document.get("Message") or "")
    # "ThrottledException:http://internal.amazon.com/..." and "aws.protocol#Code"
    code = code.split(":", 1)[0].rsplit("#", 1)[-1]
    if not message and body:
        message = body[:200].decode("utf-8", "replace")
    # Both end up in log lines: no control characters, bounded length.
    return printable(code.encode(), 64), printable(" ".join(message.split()).encode(), 200)


def classify_response(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    *,
    api: str = "PutTraceSegments",
    items: str = "segments",
    content_statuses: frozenset[int] = frozenset(),
) -> UploadError:
    """An error answer, classified.

    ``api`` and ``items`` word the advice (what was called, what is kept);
    ``content_statuses`` are further statuses that are the API's verdict on
    the content (final, like 413), not a sign of a misconfiguration.
    """
    code, message = error_code(headers, body)
    throttled = status == 429 or code in THROTTLING_CODES
    credentials = not throttled and (status in (401, 403) or code in CREDENTIAL_CODES)
    # Only X-Ray's verdict on the documents (413, or a 400 with one of its
    # content codes) is final.  Everything else - throttling, 5xx, auth
    # errors that fixed credentials cure, a wrong endpoint or a proxy's
    # answer (the configuration gets fixed) - is worth retrying.
    content = (
        status == 413 or status in content_statuses or (status == 400 and code in CONTENT_CODES)
    )
    permanent = not throttled and not credentials and content
    advice = ""
    if status == 400 and not (permanent or throttled or credentials):
        what = (
            f"the code {code}" if code else "no AWS error code: something in front of it answered"
        )
        advice = (
            f"this is not X-Ray's verdict on the {items} ({what}), so they are kept; check "
            "-e / --endpoint and the proxy"
        )
    elif status in MISCONFIGURED_STATUSES and not (permanent or throttled or credentials):
        advice = (
            f"X-Ray does not answer {status} to {api}: the endpoint or a proxy in front of it "
            f"is misconfigured, not the {items}, so they are kept; check -e / --endpoint and "
            "the proxy"
        )
    if status >= 500:
        error_class = "HTTPCode5XXCount"
    elif status >= 400:
        error_class = "HTTPCode4XXCount"
    else:  # e.g. a redirect: not an answer X-Ray gives
        error_class = "OtherCount"
    return UploadError(
        error_class=error_class,
        retryable=not permanent,
        throttled=throttled,
        message=f"HTTP {status}"
        + (f" {code}" if code else "")
        + (f": {message}" if message else ""),
        status=status,
        code=code,
        credentials_refused=credentials,
        advice=advice,
    )


_TIMEOUTS = (
    defer.TimeoutError,
    defer.CancelledError,
    error.TimeoutError,
    error.TCPTimedOutError,  # the kernel's connect timeout (a ConnectError, not a TimeoutError)
    error.ConnectingCancelledError,
)


_NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


def _out_of_descriptors(exc: BaseException | None) -> bool:
    """The connect failed for want of a file descriptor (EMFILE/ENFILE).

    A name lookup needs descriptors too, and Twisted reports one that fails
    for want of them as "hostname not found": a lookup failure is checked
    against the process's state now.
    """
    if getattr(exc, "osError", None) in _NO_DESCRIPTORS:  # ConnectError(errno, text)
        return True
    if isinstance(exc, OSError) and exc.errno in _NO_DESCRIPTORS:
        return True
    if isinstance(exc, error.DNSLookupError):
        try:
            os.close(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            return e.errno in _NO_DESCRIPTORS
    return False


def classify_exception(failure: Failure) -> UploadError:
    exc = failure.value
    # twisted.web wraps the real cause (ResponseNeverReceived, RequestTransmissionFailed, ...).
    reasons = getattr(exc, "reasons", None)
    if reasons and isinstance(reasons[0], Failure):
        exc = reasons[0].value
    # We only ever cancel a request when its timeout expires, so a cancelled
    # connect or request is a timeout.
    if isinstance(exc, _TIMEOUTS):
        cls, message = "TimeoutCount", "request timed out"
    elif _out_of_descriptors(exc):
        cls, message = (
            "OtherCount",
            "the daemon is out of file descriptors (too many open files); raise its limit "
            "(ulimit -n) or lower --tcp-max-connections",
        )
    elif isinstance(exc, error.ConnectionRefusedError):
        cls, message = "ConnectionRefusedCount", "connection refused"
    elif isinstance(exc, error.DNSLookupError):
        cls, message = "UnknownHostCount", f"unknown host: {exc}"
    else:
        cls, message = "OtherCount", f"{type(exc).__name__}: {exc}"
    return UploadError(error_class=cls, retryable=True, throttled=False, message=message)


def user_agent() -> str:
    import os

    env = os.environ.get("AWS_EXECUTION_ENV") or "UNKNOWN"
    py = ".".join(map(str, sys.version_info[:3]))
    return (
        f"xraytwisted/{__version__} xray-agent/xraytwisted/{__version__} exec-env/{env} "
        f"OS/{sys.platform}-{platform.machine()} lang/python/{py}"
    )


# ---------------------------------------------------------------------------
# The uploader


class HTTPClient(Protocol):
    """The part of treq.client.HTTPClient we use."""

    def request(self, method: str, url: str | EncodedURL, **kwargs: Any) -> Deferred[Any]: ...


class Deadlines:
    """Cancels requests still waiting after ``timeout`` seconds, with one timer for all.

    ``Deferred.addTimeout`` schedules a timer per request, which the answer
    cancels; but the reactor removes cancelled timers lazily and still wakes
    for one at the head of its queue, so every upload left a wakeup behind,
    ``timeout`` seconds later.  Here one timer waits for the oldest request;
    when it fires it cancels what is overdue and waits for the next oldest,
    or stops when nothing is waiting: while uploads run at most one wakeup
    per ``timeout``, none when idle.  A cancelled request fails with
    ``CancelledError``, which the uploader reports as a timeout.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self.timeout = timeout
        # Insertion order is deadline order: one timeout for all.
        self._waiting: dict[Deferred[Any], float] = {}
        self._timer: Any = None

    def watch(self, d: Deferred[Any]) -> None:
        """Cancel ``d`` unless it has a result within ``timeout`` seconds."""
        self._waiting[d] = self._clock.seconds() + self.timeout
        d.addBoth(self._answered, d)
        if self._timer is None and d in self._waiting:
            self._timer = self._clock.callLater(self.timeout, self._expire)

    def stop(self) -> None:
        """Forget the timer (shutdown): the requests left are no longer watched."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._waiting.clear()

    def _answered(self, result: object, d: Deferred[Any]) -> object:
        self._waiting.pop(d, None)
        return result

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        for d, deadline in list(self._waiting.items()):
            if deadline > now + 1e-9:
                break
            self._waiting.pop(d, None)
            d.cancel()
        if self._waiting:
            first = next(iter(self._waiting.values()))
            self._timer = self._clock.callLater(max(0.0, first - now), self._expire)


NO_CREDENTIALS = UploadError(
    error_class="",
    retryable=True,
    throttled=False,
    message="no AWS credentials available; not sending unsigned requests",
)

Classifier = Callable[[int, Mapping[str, str], bytes], UploadError]


class SignedRequests:
    """Signed POSTs to one X-Ray endpoint over treq: what both uploaders share.

    ``post`` builds the headers, signs them for service ``xray``, posts with
    treq (no redirects followed), watches the request for its timeout with
    one timer for all (``Deadlines``) and reads the answer.  What the body
    is and what a 200 answer means is the caller's business (the segment
    and the OTLP uploaders, telemetry).
    """

    def __init__(
        self,
        *,
        client: HTTPClient,
        endpoint: Endpoint,
        region: str,
        credentials: CredentialSource,
        clock: IReactorTime,
        timeout: float,
        agent_name: str | None = None,
    ) -> None:
        self.client = client
        self.endpoint = endpoint
        self.region = region
        self.credentials = credentials
        self.clock = clock
        self.timeout = timeout
        self.user_agent = agent_name or user_agent()
        self._urls: dict[str, FixedURL] = {}  # one per API path
        self._deadlines = Deadlines(clock, timeout)

    def close(self) -> None:
        """Stop watching requests for their timeout (the timer may outlive them)."""
        self._deadlines.stop()

    def post(
        self,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        *,
        timestamp: bool = False,
        classify: Classifier = classify_response,
    ) -> Deferred[Outcome | tuple[float, bytes]]:
        """POST ``body`` to ``path``, signed; never fails.

        ``headers`` (Content-Type, ...) are sent and signed with Host, and
        with ``X-Amzn-Xray-Timestamp`` when ``timestamp`` is set (X-Ray's
        JSON APIs).  The result is (seconds, response body) for an HTTP 200;
        otherwise an ``Outcome`` whose error is ``classify(status, headers,
        body)`` of the answer (header names in lower case), or
        ``classify_exception`` of a request that got none.
        """
        creds = self.credentials.current()
        if creds is None:
            # At startup the first credential lookup may still be running:
            # wait for it rather than fail (and back off) the first batches.
            waiting: Deferred[Any] = self.credentials.when_loaded()
            return waiting.addCallback(self._loaded, path, body, headers, timestamp, classify)
        return self._send(creds, path, body, headers, timestamp, classify)

    def _loaded(
        self,
        _: object,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        timestamp: bool,
        classify: Classifier,
    ) -> Deferred[Outcome | tuple[float, bytes]]:
        creds = self.credentials.current()
        if creds is None:
            return defer.succeed(Outcome(0.0, error=NO_CREDENTIALS))
        return self._send(creds, path, body, headers, timestamp, classify)

    def _send(
        self,
        creds: sigv4.Credentials,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        timestamp: bool,
        classify: Classifier,
    ) -> Deferred[Outcome | tuple[float, bytes]]:
        start = self.clock.seconds()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = FixedURL.of(self.endpoint.url_for(path))
        d: Deferred[Any] = self.client.request(
            "POST",
            url,
            data=body,
            headers=self.signed_headers(path, body, headers, creds, start, timestamp),
            allow_redirects=False,
        )
        d.addCallback(self._read, start, classify)
        self._deadlines.watch(d)
        d.addErrback(self._failed, start)
        return d

    def signed_headers(
        self,
        path: str,
        body: bytes,
        headers: Sequence[tuple[str, str]],
        creds: sigv4.Credentials,
        now: float,
        timestamp: bool = False,
    ) -> dict[str, list[str]]:
        """The headers of a POST of ``body`` to ``path`` at ``now``, signed with ``creds``."""
        host = ("Host", self.endpoint.host)
        if timestamp:
            to_sign = [*headers, host, ("X-Amzn-Xray-Timestamp", f"{now:.9f}")]
        else:
            to_sign = [*headers, host]
        added = sigv4.sign(
            method="POST",
            path=self.endpoint.base_path + path,
            query="",
            headers=to_sign,
            body=body,
            credentials=creds,
            region=self.region,
            service=SERVICE,
            when=datetime.fromtimestamp(now, tz=timezone.utc),
        )
        signed = {name: [value] for name, value in to_sign + added}
        signed["User-Agent"] = [self.user_agent]
        return signed

    def _failed(self, failure: Failure, start: float) -> Outcome:
        return Outcome(self.clock.seconds() - start, error=classify_exception(failure))

    def _read(
        self, response: Any, start: float, classify: Classifier
    ) -> Deferred[Outcome | tuple[float, bytes]]:
        d: Deferred[bytes] = response.content()
        return d.addCallback(self._got_body, response, start, classify)

    def _got_body(
        self, body: bytes, response: Any, start: float, classify: Classifier
    ) -> Outcome | tuple[float, bytes]:
        seconds = self.clock.seconds() - start
        if response.code == 200:
            return seconds, body
        raw = response.headers.getAllRawHeaders()
        headers = {k.decode("latin-1").lower(): v[-1].decode("latin-1") for k, v in raw}
        return Outcome(seconds, error=classify(response.code, headers, body))


JSON_HEADERS = (("Content-Type", "application/json"),)


class SignedUploader:
    """An uploader's signed side: its ``SignedRequests``, endpoint, clock and close.

    Takes ``SignedRequests``' keyword arguments (client, endpoint, region,
    credentials, clock, timeout, agent_name).
    """

    def __init__(self, **signing: Any) -> None:
        self.requests = SignedRequests(**signing)

    @property
    def endpoint(self) -> Endpoint:
        return self.requests.endpoint

    @property
    def clock(self) -> IReactorTime:
        return self.requests.clock

    def close(self) -> None:
        """Stop watching requests for their timeout (the timer may outlive them)."""
        self.requests.close()


class Uploader(SignedUploader):
    """Signs and sends X-Ray API requests to one endpoint."""

    def put_trace_segments(self, docs: Sequence[bytes]) -> Deferred[Outcome]:
        return self.requests.post(
            "/TraceSegments", trace_segments_body(docs), JSON_HEADERS, timestamp=True
        ).addCallback(self._trace_segments_outcome)

    def _trace_segments_outcome(self, result: Outcome | tuple[float, bytes]) -> Outcome:
        if isinstance(result, Outcome):
            return result
        seconds, body = result
        return Outcome(seconds=seconds, unprocessed=parse_unprocessed(body))

    def call(self, path: str, body: bytes) -> Deferred[Outcome | tuple[float, bytes]]:
        """POST a signed JSON request; (seconds, response body) on HTTP 200, else an Outcome."""
        return self.requests.post(path, body, JSON_HEADERS, timestamp=True)
