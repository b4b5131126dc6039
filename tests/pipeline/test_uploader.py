"""The uploader: request shape, signing, and outcome classification."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.support.sigcheck import SignatureMismatch, verify
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.pipeline.uploader import (
    Outcome,
    Uploader,
    classify_exception,
    classify_response,
    error_code,
    json_string_content,
    parse_unprocessed,
    trace_segments_body,
)

KEY, SECRET = "AKIDUPLOADERTEST", "uploader/secret+key"


class FakeXRay(Resource):
    """Answers /TraceSegments like X-Ray after checking the signature."""

    isLeaf = True

    def __init__(
        self, status: int = 200, body: bytes = b"{}", headers: dict[str, str] | None = None
    ):
        super().__init__()
        self.status = status
        self.body = body
        self.headers = headers or {}
        self.requests: list[dict[str, Any]] = []
        self.hang = False
        self.secret = SECRET

    def render_POST(self, request: Request) -> bytes | int:
        body = request.content.read()
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        record = {"path": request.path.decode(), "headers": headers, "body": body}
        try:
            record["auth"] = verify(
                method="POST",
                url=f"https://xray.us-east-2.amazonaws.com{request.path.decode()}",
                headers=headers,
                body=body,
                access_key=KEY,
                secret_key=self.secret,
                region="us-east-2",
            )
        except SignatureMismatch as e:
            record["signature_error"] = str(e)
        self.requests.append(record)
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        return self.body


class UploaderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_304_085.25)
        self.resource = FakeXRay()
        self.stub = StubTreq(self.resource)
        self.creds = Credentials(KEY, SECRET, "SESSION/TOKEN")
        self.uploader = self.make(self.creds)

    def make(self, creds: Credentials | None) -> Uploader:
        return Uploader(
            client=self.stub,
            endpoint=endpoints.parse("https://xray.us-east-2.amazonaws.com"),
            region="us-east-2",
            credentials=StaticCredentials(creds),
            clock=self.clock,
            timeout=2.0,
        )

    def upload(self, docs: list[bytes]) -> Outcome:
        d = self.uploader.put_trace_segments(docs)
        self.stub.flush()
        return self.successResultOf(d)

    def test_signed_request_with_documents_as_json_strings(self) -> None:
        docs = [b'{"id":"1","name":"a\\"b"}', b"T1SQUJD", b'{"x":"\xc3\xa9"}']
        outcome = self.upload(docs)
        self.assertIsNone(outcome.error)
        (request,) = self.resource.requests
        self.assertNotIn("signature_error", request)
        self.assertEqual(request["path"], "/TraceSegments")
        self.assertEqual(
            json.loads(request["body"]),
            {"TraceSegmentDocuments": [d.decode() for d in docs]},
        )
        headers = request["headers"]
        self.assertEqual(headers["content-type"], "application/json")
        self.assertEqual(headers["x-amz-security-token"], "SESSION/TOKEN")
        self.assertEqual(headers["x-amzn-xray-timestamp"], "1795304085.250000000")
        self.assertEqual(headers["x-amz-date"], "20261121T233445Z")
        self.assertIn("xray-agent/xraytwisted/", headers["user-agent"])
        self.assertEqual(
            request["auth"]["SignedHeaders"],
            "content-type;host;x-amz-date;x-amz-security-token;x-amzn-xray-timestamp",
        )

    def test_wrong_secret_is_detected(self) -> None:
        # The fake's check must be able to fail, or the test above proves nothing.
        self.resource.secret = "not-the-secret"
        self.upload([b"{}"])
        self.assertIn("signature mismatch", self.resource.requests[0]["signature_error"])

    def test_without_session_token(self) -> None:
        self.uploader = self.make(Credentials(KEY, SECRET))
        self.upload([b"{}"])
        (request,) = self.resource.requests
        self.assertNotIn("signature_error", request)
        self.assertNotIn("x-amz-security-token", request["headers"])

    def test_unprocessed_segments(self) -> None:
        self.resource.body = json.dumps(
            {
                "UnprocessedTraceSegments": [
                    {"Id": "abc", "ErrorCode": "InvalidTraceId", "Message": "too old"},
                    {"Id": "def", "ErrorCode": "ThrottledException"},
                ]
            }
        ).encode()
        outcome = self.upload([b"{}", b"{}"])
        self.assertIsNone(outcome.error)
        self.assertEqual([u.id for u in outcome.unprocessed], ["abc", "def"])
        self.assertEqual([u.retryable for u in outcome.unprocessed], [False, True])
        self.assertEqual(outcome.unprocessed[0].message, "too old")

    def test_server_error_is_retryable_5xx(self) -> None:
        self.resource.status = 500
        self.resource.body = b'{"__type":"InternalFailure","message":"boom"}'
        err = self.upload([b"{}"]).error
        assert err is not None
        self.assertEqual(
            (err.error_class, err.retryable, err.throttled, err.status, err.code),
            ("HTTPCode5XXCount", True, False, 500, "InternalFailure"),
        )
        self.assertIn("boom", err.message)

    def test_throttling(self) -> None:
        self.resource.status = 429
        self.resource.headers = {"x-amzn-ErrorType": "ThrottledException:http://internal/"}
        self.resource.body = b'{"message":"Rate exceeded"}'
        err = self.upload([b"{}"]).error
        assert err is not None
        self.assertEqual(
            (err.retryable, err.throttled, err.code), (True, True, "ThrottledException")
        )

    def test_validation_error_is_not_retryable(self) -> None:
        self.resource.status = 400
        self.resource.body = b'{"__type":"InvalidRequestException","message":"bad"}'
        err = self.upload([b"{}"]).error
        assert err is not None
        self.assertEqual((err.error_class, err.retryable), ("HTTPCode4XXCount", False))

    def test_auth_error_is_retryable(self) -> None:
        # Credentials get rotated; a later attempt with fresh ones succeeds.
        self.resource.status = 403
        self.resource.body = b'{"__type":"ExpiredTokenException","message":"expired"}'
        err = self.upload([b"{}"]).error
        assert err is not None
        self.assertEqual((err.error_class, err.retryable), ("HTTPCode4XXCount", True))

    def test_timeout(self) -> None:
        self.resource.hang = True
        d = self.uploader.put_trace_segments([b"{}"])
        self.stub.flush()
        self.assertNoResult(d)
        self.clock.advance(2.0)
        outcome = self.successResultOf(d)
        assert outcome.error is not None
        self.assertEqual(outcome.error.error_class, "TimeoutCount")
        self.assertTrue(outcome.error.retryable)

    def test_one_timer_watches_every_request_for_its_timeout(self) -> None:
        # A timer per request would leave a wakeup behind each answered one.
        scheduled: list[float] = []
        call_later = self.clock.callLater

        def counting(delay: float, f: Any, *args: Any, **kw: Any) -> Any:
            scheduled.append(delay)
            return call_later(delay, f, *args, **kw)

        self.patch(self.clock, "callLater", counting)
        held: list[tuple[Deferred[Any], Deferred[Any]]] = []
        stub = self.stub

        class Answered:  # the stub answers at once; a real server a little later
            def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
                answer: Deferred[Any] = Deferred()
                held.append((stub.request(method, url, **kwargs), answer))
                return answer

        self.uploader.requests.client = Answered()
        for _ in range(5):
            d = self.uploader.put_trace_segments([b"{}"])
            self.clock.advance(0.1)
            for response, answer in held:
                response.chainDeferred(answer)
            held.clear()
            self.stub.flush()
            self.assertIsNone(self.successResultOf(d).error)
        self.assertEqual(scheduled, [2.0])
        self.uploader.requests.client = stub
        # It still times out what hangs, each request 2 s after it started.
        self.resource.hang = True
        self.clock.advance(2.0)  # the first timer runs out: nothing waiting
        first = self.uploader.put_trace_segments([b"{}"])
        self.clock.advance(1.0)
        second = self.uploader.put_trace_segments([b"{}"])
        self.stub.flush()
        self.clock.advance(1.0)
        outcome = self.successResultOf(first)
        assert outcome.error is not None
        self.assertEqual(outcome.error.error_class, "TimeoutCount")
        self.assertNoResult(second)
        self.clock.advance(1.0)
        outcome = self.successResultOf(second)
        assert outcome.error is not None
        self.assertEqual(outcome.error.error_class, "TimeoutCount")
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing waiting: no timer

    def test_close_forgets_the_timer(self) -> None:
        self.upload([b"{}"])
        self.uploader.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_credentials_sends_nothing(self) -> None:
        self.uploader = self.make(None)
        outcome = self.upload([b"{}"])
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertEqual(outcome.error.error_class, "")
        self.assertIn("credentials", outcome.error.message)
        self.assertEqual(self.resource.requests, [])

    def test_waits_for_the_first_credential_lookup(self) -> None:
        source = _LoadingCredentials()
        self.uploader.requests.credentials = source
        d = self.uploader.put_trace_segments([b"{}"])
        self.stub.flush()
        self.assertNoResult(d)
        self.assertEqual(self.resource.requests, [])
        source.load(self.creds)
        self.stub.flush()
        self.assertIsNone(self.successResultOf(d).error)
        self.assertNotIn("signature_error", self.resource.requests[0])

    def test_lookup_that_finds_nothing_fails_the_upload(self) -> None:
        source = _LoadingCredentials()
        self.uploader.requests.credentials = source
        d = self.uploader.put_trace_segments([b"{}"])
        source.load(None)
        outcome = self.successResultOf(d)
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertEqual(self.resource.requests, [])

    def test_endpoint_with_port_and_base_path(self) -> None:
        seen: list[str] = []
        uploader = Uploader(
            client=_RecordingClient(seen),
            endpoint=endpoints.parse("http://127.0.0.1:4566/prefix/"),
            region="us-east-2",
            credentials=StaticCredentials(self.creds),
            clock=self.clock,
            timeout=1.0,
        )
        uploader.put_trace_segments([b"{}"])
        self.assertEqual(seen, ["http://127.0.0.1:4566/prefix/TraceSegments 127.0.0.1:4566"])


class _LoadingCredentials:
    """A credential source whose first lookup the test finishes."""

    def __init__(self) -> None:
        self._creds: Credentials | None = None
        self._waiting: list[Deferred[None]] = []

    def current(self) -> Credentials | None:
        return self._creds

    def when_loaded(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def load(self, creds: Credentials | None) -> None:
        self._creds = creds
        for d in self._waiting:
            d.callback(None)


class _RecordingClient:
    def __init__(self, seen: list[str]) -> None:
        self.seen = seen

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.seen.append(f"{url} {kwargs['headers']['Host'][0]}")
        return Deferred()


class PureTests(SynchronousTestCase):
    def test_body_replaces_invalid_utf8(self) -> None:
        body = trace_segments_body([b"a\xffb", b'q"\\\n'])
        self.assertEqual(json.loads(body), {"TraceSegmentDocuments": ["a\ufffdb", 'q"\\\n']})

    def test_body_of_many_documents_is_valid_json(self) -> None:
        docs = [(b'{"n":%d}' % i) for i in range(50)]
        parsed = json.loads(trace_segments_body(docs))["TraceSegmentDocuments"]
        self.assertEqual(parsed, [d.decode() for d in docs])

    def test_a_clean_batch_is_escaped_once_not_per_document(self) -> None:
        from xraytwisted.pipeline import uploader

        def per_document(doc: bytes) -> bytes:
            raise AssertionError("escaped document by document")

        self.patch(uploader, "json_string_content", per_document)
        docs = [b'{"id":"%d","q":"a\\"b"}' % i for i in range(50)]
        parsed = json.loads(trace_segments_body(docs))["TraceSegmentDocuments"]
        self.assertEqual(parsed, [d.decode() for d in docs])

    def test_body_bytes_are_those_of_the_per_document_encoding(self) -> None:
        # The body as it was built before batches were escaped as a whole.
        def old(docs: list[bytes]) -> bytes:
            if not docs:
                return b'{"TraceSegmentDocuments":[]}'
            inner = b'","'.join([json_string_content(doc) for doc in docs])
            return b'{"TraceSegmentDocuments":["' + inner + b'"]}'

        tricky = [
            b'{"plain":"json"}',
            b'quote " and backslash \\ and both \\"',
            b"nul \x00 inside",
            b"\x00",
            b"tab\tnewline\ncr\r\x1f\x7f",
            b"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80",
            b"invalid \xff\xfe utf-8 \xc3",
            b"\\u0000 looks escaped already",
            b'","',
            b"",
        ]
        batches = [[], *([doc] for doc in tricky), tricky, tricky[:1] * 50]
        batches += [[clean, dirty] for clean in tricky[:2] for dirty in tricky[2:]]
        for docs in batches:
            self.assertEqual(trace_segments_body(docs), old(docs), docs)
            if docs:
                self.assertEqual(
                    json.loads(trace_segments_body(docs))["TraceSegmentDocuments"],
                    [d.decode("utf-8", "replace") for d in docs],
                )

    def test_parse_unprocessed_tolerates_junk(self) -> None:
        self.assertEqual(parse_unprocessed(b""), ())
        self.assertEqual(parse_unprocessed(b"not json"), ())
        self.assertEqual(parse_unprocessed(b"[]"), ())
        self.assertEqual(parse_unprocessed(b'{"UnprocessedTraceSegments":[1,"x"]}'), ())

    def test_error_text_is_escaped_for_logs(self) -> None:
        code, message = error_code(
            {}, b'{"__type":"X\\u001b[31m","message":"a\\nforged [Info] line"}'
        )
        self.assertNotIn("\x1b", code)
        self.assertNotIn("\n", message)

    def test_error_code_sources(self) -> None:
        self.assertEqual(
            error_code({"x-amzn-errortype": "ThrottledException:http://x"}, b""),
            ("ThrottledException", ""),
        )
        self.assertEqual(
            error_code({}, b'{"__type":"com.amazon#InvalidRequestException","Message":"m"}'),
            ("InvalidRequestException", "m"),
        )
        self.assertEqual(
            error_code({}, b"<html>Bad Gateway</html>"), ("", "<html>Bad Gateway</html>")
        )

    def test_classify_statuses(self) -> None:
        table = {
            500: ("HTTPCode5XXCount", True, False),
            503: ("HTTPCode5XXCount", True, False),
            429: ("HTTPCode4XXCount", True, True),
            408: ("HTTPCode4XXCount", True, False),
            403: ("HTTPCode4XXCount", True, False),
            # No AWS error code: not X-Ray's verdict (a proxy's HTML page, say).
            400: ("HTTPCode4XXCount", True, False),
            # X-Ray never answers these: a wrong endpoint or a proxy's doing.
            404: ("HTTPCode4XXCount", True, False),
            405: ("HTTPCode4XXCount", True, False),
            411: ("HTTPCode4XXCount", True, False),
            414: ("HTTPCode4XXCount", True, False),
            415: ("HTTPCode4XXCount", True, False),
            422: ("HTTPCode4XXCount", True, False),
            # X-Ray's verdict on the batch's size or content: final.
            413: ("HTTPCode4XXCount", False, False),
            302: ("OtherCount", True, False),
        }
        for status, expected in table.items():
            err = classify_response(status, {}, b"")
            self.assertEqual((err.error_class, err.retryable, err.throttled), expected, status)
        throttled_400 = classify_response(400, {}, b'{"__type":"ThrottlingException"}')
        self.assertEqual((throttled_400.retryable, throttled_400.throttled), (True, True))

    def test_only_x_rays_content_codes_make_a_400_final(self) -> None:
        for code in ("InvalidRequestException", "SerializationException", "ValidationException"):
            err = classify_response(400, {"x-amzn-errortype": code}, b'{"message":"bad"}')
            self.assertEqual((err.retryable, err.advice), (False, ""), code)
        html = classify_response(400, {}, b"<html><body>Bad Request</body></html>")
        self.assertTrue(html.retryable)
        self.assertEqual(html.message, "HTTP 400: <html><body>Bad Request</body></html>")
        self.assertIn("not X-Ray's verdict on the segments (no AWS error code", html.advice)
        aborted = classify_response(400, {}, b'{"__type":"RequestAbortedException"}')
        self.assertTrue(aborted.retryable)
        self.assertIn("(the code RequestAbortedException)", aborted.advice)

    def test_answers_of_a_misconfigured_endpoint_are_kept_with_advice(self) -> None:
        # (status, headers, body) -> (retryable, advice names the status)
        table = [
            (404, {}, b"<html>Not Found</html>", (True, True)),
            (405, {}, b"", (True, True)),
            (411, {}, b"", (True, True)),
            (414, {}, b"", (True, True)),
            (415, {"x-amzn-errortype": "UnsupportedMediaType"}, b"", (True, True)),
            (422, {}, b'{"message":"unprocessable"}', (True, True)),
            (413, {}, b"", (False, False)),  # the batch is too large: halved, then dropped
            (400, {"x-amzn-errortype": "InvalidRequestException"}, b"", (False, False)),
        ]
        for status, headers, body, (retryable, advised) in table:
            err = classify_response(status, headers, body)
            self.assertEqual(
                (err.retryable, f"does not answer {status}" in err.advice), (retryable, advised),
                status,
            )  # fmt: skip
            if advised:
                self.assertTrue(
                    err.advice.endswith("so they are kept; check -e / --endpoint and the proxy"),
                    err.advice,
                )
        # A proxy that answers 404 with a credential or throttling code says so.
        self.assertTrue(classify_response(404, {}, b'{"__type":"ThrottlingException"}').throttled)

    def test_refused_credentials_are_marked(self) -> None:
        cases = [
            (403, {"x-amzn-errortype": "AccessDeniedException"}, b""),
            (401, {}, b""),
            (400, {}, b'{"__type":"UnrecognizedClientException","message":"bad token"}'),
            (403, {}, b'{"__type":"ExpiredTokenException"}'),
        ]
        for status, headers, body in cases:
            err = classify_response(status, headers, body)
            self.assertEqual((err.retryable, err.credentials_refused), (True, True), (status, body))
        self.assertFalse(classify_response(500, {}, b"").credentials_refused)
        self.assertFalse(
            classify_response(403, {}, b'{"__type":"ThrottlingException"}').credentials_refused
        )

    def test_classify_exceptions(self) -> None:
        from twisted.web.client import ResponseNeverReceived

        table = [
            (error.ConnectionRefusedError(), "ConnectionRefusedCount"),
            (error.DNSLookupError("nope.invalid"), "UnknownHostCount"),
            (error.TimeoutError(), "TimeoutCount"),
            (error.TCPTimedOutError(), "TimeoutCount"),
            (error.ConnectingCancelledError(None), "TimeoutCount"),
            (ResponseNeverReceived([Failure(error.ConnectionLost())]), "OtherCount"),
            (
                ResponseNeverReceived([Failure(error.ConnectionRefusedError())]),
                "ConnectionRefusedCount",
            ),
            (ValueError("x"), "OtherCount"),
        ]
        for exc, expected in table:
            err = classify_exception(Failure(exc))
            self.assertEqual(err.error_class, expected, repr(exc))
            self.assertTrue(err.retryable)
        # socket() failing in a connect: what tcp.Client reports for EMFILE.
        emfile = classify_exception(Failure(error.ConnectBindError(24, "Too many open files")))
        self.assertIn("out of file descriptors", emfile.message)
        self.assertIn("ulimit -n", emfile.message)
