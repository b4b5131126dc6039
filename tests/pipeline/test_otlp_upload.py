"""OtlpUploader: the /v1/traces request (signed, gzipped, decodable), outcomes, span counts."""

from __future__ import annotations

import gzip
import json
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.support.held_calls import HeldCalls
from tests.support.logs import capture_logs
from tests.support.sigcheck import verify
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.ingest.otlp_http import rpc_status
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline import otlp_upload
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.otlp_batches import (
    FRAME,
    KIND_JSON,
    KIND_PROTOBUF,
    SpanBatcher,
    SpanBuffer,
    SpanTally,
    frame,
)
from xraytwisted.pipeline.otlp_upload import (
    TRANSACTION_SEARCH,
    OtlpUploader,
    classify_traces_response,
    json_partial_success,
    rpc_status_message,
)
from xraytwisted.pipeline.uploader import Outcome

KEY, SECRET, REGION = "AKIDOTLPUPLOAD", "otlp/upload+secret", "eu-west-1"
SEARCH_OFF = (
    "The OTLP API is supported with CloudWatch Logs as a Trace Segment Destination. Please "
    "enable the CloudWatch Logs destination for your traces using the "
    "UpdateTraceSegmentDestination API"
)


def otlp_request(*names: str, service: str = "svc") -> ExportTraceServiceRequest:
    message = ExportTraceServiceRequest()
    resource = message.resource_spans.add()
    attribute = resource.resource.attributes.add()
    attribute.key, attribute.value.string_value = "service.name", service
    scope = resource.scope_spans.add()
    for i, name in enumerate(names):
        span = scope.spans.add()
        span.name = name
        span.trace_id = (i + 1).to_bytes(16, "big")
        span.span_id = (i + 1).to_bytes(8, "big")
    return message


def protobuf_doc(*names: str, service: str = "svc") -> bytes:
    body = otlp_request(*names, service=service).SerializeToString()
    return frame(KIND_PROTOBUF, len(names), body)


class FakeOtlpEndpoint(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.status = 200
        self.answer = b""
        self.answer_type = b"application/x-protobuf"
        self.hang = False  # read the request, never answer
        self.requests: list[dict[str, Any]] = []

    def render_POST(self, request: Request) -> Any:
        assert request.content is not None
        body = request.content.read()
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in request.requestHeaders.getAllRawHeaders()
        }
        auth = verify(
            method="POST",
            url=f"https://xray.eu-west-1.amazonaws.com{request.path.decode()}",
            headers=headers,
            body=body,
            access_key=KEY,
            secret_key=SECRET,
            region=REGION,
        )
        self.requests.append({"path": request.path, "headers": headers, "body": body, "auth": auth})
        if self.hang:
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", self.answer_type)
        return self.answer


class UploaderCase(SynchronousTestCase):
    """An uploader posting to ``FakeOtlpEndpoint`` through StubTreq."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_795_304_085.0)
        self.endpoint = FakeOtlpEndpoint()
        self.stub = StubTreq(self.endpoint)
        self.counters = OtlpCounters()
        self.uploader = self.make(gzip=True)

    def make(self, gzip: bool, creds: Credentials | None = None, **kwargs: Any) -> OtlpUploader:
        return OtlpUploader(
            client=self.stub,
            endpoint=endpoints.resolve(REGION, configured="", env={}),
            region=REGION,
            credentials=StaticCredentials(creds or Credentials(KEY, SECRET, "TOKEN")),
            clock=self.clock,
            timeout=2.0,
            counters=self.counters,
            gzip=gzip,
            **kwargs,
        )

    def send(self, docs: list[bytes]) -> Outcome:
        d = self.uploader.send(docs)
        self.stub.flush()
        return self.successResultOf(d)

    def received(self, index: int = -1) -> ExportTraceServiceRequest:
        seen = self.endpoint.requests[index]
        body = seen["body"]
        if seen["headers"].get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        return message


class OtlpUploaderTests(UploaderCase):
    def test_requests_are_concatenated_gzipped_and_signed(self) -> None:
        outcome = self.send([protobuf_doc("a", "b", service="one"), protobuf_doc("c")])
        self.assertIsNone(outcome.error)
        (seen,) = self.endpoint.requests
        self.assertEqual(seen["path"], b"/v1/traces")
        self.assertEqual(seen["headers"]["content-type"], "application/x-protobuf")
        self.assertEqual(seen["headers"]["content-encoding"], "gzip")
        self.assertEqual(
            seen["auth"]["SignedHeaders"],
            "content-encoding;content-type;host;x-amz-date;x-amz-security-token",
        )
        self.assertEqual(seen["headers"]["host"], "xray.eu-west-1.amazonaws.com")
        message = self.received()
        self.assertEqual(
            [[s.name for ss in r.scope_spans for s in ss.spans] for r in message.resource_spans],
            [["a", "b"], ["c"]],
        )
        self.assertEqual(message.resource_spans[0].resource.attributes[0].value.string_value, "one")
        self.assertEqual((self.counters.spans_sent, self.counters.spans_rejected), (3, 0))

    def test_without_gzip(self) -> None:
        self.uploader = self.make(gzip=False)
        self.send([protobuf_doc("a")])
        self.assertNotIn("content-encoding", self.endpoint.requests[0]["headers"])
        self.assertEqual(self.received().resource_spans[0].scope_spans[0].spans[0].name, "a")

    def test_a_json_request_goes_alone_as_json(self) -> None:
        body = json_format.MessageToJson(otlp_request("j1", "j2")).encode()
        self.endpoint.answer, self.endpoint.answer_type = b"{}", b"application/json"
        outcome = self.send([frame(KIND_JSON, 2, body)])
        self.assertIsNone(outcome.error)
        seen = self.endpoint.requests[0]
        self.assertEqual(seen["headers"]["content-type"], "application/json")
        self.assertEqual(gzip.decompress(seen["body"]), body)
        self.assertEqual(self.counters.spans_sent, 2)

    def test_a_mixed_batch_is_refused_so_the_batcher_halves_it(self) -> None:
        outcome = self.send([protobuf_doc("a"), frame(KIND_JSON, 1, b"{}")])
        assert outcome.error is not None
        self.assertEqual(
            (outcome.error.status, outcome.error.code), (400, "SerializationException")
        )
        self.assertEqual(self.endpoint.requests, [])
        self.assertEqual(self.counters.spans_rejected, 0)  # the halves are sent later

    def test_partial_success_is_counted_and_logged(self) -> None:
        events = capture_logs(self)
        response = ExportTraceServiceResponse(
            partial_success=ExportTracePartialSuccess(rejected_spans=2, error_message="too old")
        )
        self.endpoint.answer = response.SerializeToString()
        outcome = self.send([protobuf_doc("a", "b", "c")])
        self.assertIsNone(outcome.error)
        self.assertEqual((self.counters.spans_sent, self.counters.spans_rejected), (1, 2))
        self.assertIn(
            "X-Ray accepted 1 of 3 spans and rejected 2; they are not sent again: too old",
            [formatEvent(e) for e in events],
        )

    def test_outage_is_retryable_and_counts_no_span(self) -> None:
        self.endpoint.status = 503
        self.endpoint.answer_type = b"application/json"
        self.endpoint.answer = b'{"message": "down"}'
        outcome = self.send([protobuf_doc("a")])
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertEqual((self.counters.spans_sent, self.counters.spans_rejected), (0, 0))

    def test_a_request_left_unanswered_times_out_and_close_forgets_the_timer(self) -> None:
        self.endpoint.hang = True
        d = self.uploader.send([protobuf_doc("a")])
        self.stub.flush()
        self.assertEqual(len(self.endpoint.requests), 1)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        error = self.successResultOf(d).error
        assert error is not None
        self.assertEqual((error.error_class, error.retryable), ("TimeoutCount", True))
        self.assertEqual((self.counters.spans_sent, self.counters.spans_rejected), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # nothing waiting: no timer
        # At shutdown close() forgets the timer of what is still waiting.
        self.uploader.send([protobuf_doc("b")])
        self.stub.flush()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.uploader.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_credentials_sends_nothing(self) -> None:
        self.uploader.requests.credentials = StaticCredentials(None)
        error = self.send([protobuf_doc("a")]).error
        assert error is not None
        self.assertTrue(error.retryable)
        self.assertIn("no AWS credentials", error.message)
        self.assertEqual(self.endpoint.requests, [])

    def test_transaction_search_off_is_said_plainly_and_not_split(self) -> None:
        self.endpoint.status = 400
        self.endpoint.answer_type = b"application/json"
        self.endpoint.answer = json.dumps({"message": SEARCH_OFF}).encode()
        outcome = self.send([protobuf_doc("a"), protobuf_doc("b", "c")])
        error = outcome.error
        assert error is not None
        self.assertFalse(error.retryable)
        self.assertEqual(error.code, TRANSACTION_SEARCH)
        self.assertTrue(error.message.startswith("enable CloudWatch Transaction Search: "))
        self.assertIn("UpdateTraceSegmentDestination", error.message)
        self.assertEqual(self.counters.spans_rejected, 3)

    def test_content_refusal_of_many_requests_is_left_to_halving(self) -> None:
        self.endpoint.status = 400
        self.endpoint.answer = rpc_status(3, "span 1 has no trace id")
        outcome = self.send([protobuf_doc("a"), protobuf_doc("b")])
        assert outcome.error is not None
        self.assertEqual(
            outcome.error.message, "HTTP 400 ValidationException: span 1 has no trace id"
        )
        self.assertEqual(self.counters.spans_rejected, 0)
        self.send([protobuf_doc("a")])  # alone, it is dropped: its spans are rejected
        self.assertEqual(self.counters.spans_rejected, 1)

    def test_statuses_of_the_otlp_endpoint(self) -> None:
        # 415/422 from an OTLP endpoint can be about the content: final (the
        # spans are rejected, X-Ray's message kept), where for PutTraceSegments
        # they are a misconfiguration.  404/405/411/414 stay retried on both.
        # (status, retryable, spans rejected)
        table = [
            (415, False, 2),
            (422, False, 2),
            (404, True, 0),
            (405, True, 0),
            (411, True, 0),
            (414, True, 0),
        ]
        for status, retryable, rejected in table:
            self.counters.spans_rejected = 0
            self.endpoint.status = status
            self.endpoint.answer = rpc_status(3, f"said with {status}")
            error = self.send([protobuf_doc("a", "b")]).error
            assert error is not None
            self.assertEqual(
                (error.retryable, self.counters.spans_rejected), (retryable, rejected), status
            )
            self.assertEqual(error.message, f"HTTP {status}: said with {status}", status)
            self.assertNotIn("PutTraceSegments", error.advice, status)
            if retryable:
                self.assertTrue(
                    error.advice.startswith(f"X-Ray does not answer {status} to span uploads"),
                    error.advice,
                )
                self.assertIn("not the spans, so they are kept", error.advice)
            else:
                self.assertEqual(error.advice, "", status)
        # A 400 without a code is not a verdict either, said of spans.
        advice = classify_traces_response(400, {}, b"<html>Bad Request</html>").advice
        self.assertIn("not X-Ray's verdict on the spans", advice)

    def test_helpers(self) -> None:
        self.assertEqual(rpc_status_message(rpc_status(14, "unavailable")), "unavailable")
        self.assertEqual(rpc_status_message(b"\xff\xff"), "")
        self.assertEqual(
            json_partial_success(b'{"partialSuccess":{"rejectedSpans":"4","errorMessage":"x"}}'),
            (4, "x"),
        )
        self.assertEqual(json_partial_success(b"{}"), (0, ""))
        self.assertEqual(json_partial_success(b"junk"), (0, ""))
        throttled = classify_traces_response(429, {}, b"")
        self.assertTrue(throttled.retryable and throttled.throttled)
        forbidden = classify_traces_response(
            403, {"content-type": "application/json"}, json.dumps({"message": SEARCH_OFF}).encode()
        )
        self.assertEqual(forbidden.code, TRANSACTION_SEARCH)


THRESHOLD = 500  # thread_bytes in the tests below


def big_doc(tag: str) -> bytes:
    doc = protobuf_doc(*[f"{tag}-{i:03d}-" + "x" * 40 for i in range(12)])
    assert len(doc) - FRAME.size >= THRESHOLD
    return doc


class ThreadedGzipTests(UploaderCase):
    """Upload bodies of ``thread_bytes`` or more are gzipped off the reactor.

    ``HeldCalls`` stands in for the thread pool: a gzip ends when the test
    says, so what waits for it can be seen.
    """

    def threaded(self) -> HeldCalls:
        runner = HeldCalls()
        self.uploader = self.make(gzip=True, run_in_thread=runner, thread_bytes=THRESHOLD)
        return runner

    def names(self) -> list[str]:
        """The first span name of each request X-Ray got, in order."""
        return [
            self.received(i).resource_spans[0].scope_spans[0].spans[0].name
            for i in range(len(self.endpoint.requests))
        ]

    def test_small_bodies_are_gzipped_inline(self) -> None:
        runner = self.threaded()
        d = self.uploader.send([protobuf_doc("small")])
        self.stub.flush()
        self.assertEqual(runner.calls, [])
        self.assertIsNone(self.successResultOf(d).error)
        self.assertEqual(self.names(), ["small"])
        self.assertEqual(self.endpoint.requests[0]["headers"]["content-encoding"], "gzip")

    def test_large_bodies_are_gzipped_in_a_thread_then_sent(self) -> None:
        runner = self.threaded()
        doc = big_doc("big")
        d = self.uploader.send([doc])
        self.stub.flush()
        self.assertEqual((len(runner.calls), self.endpoint.requests), (1, []))
        runner.run()
        self.stub.flush()
        self.assertIsNone(self.successResultOf(d).error)
        (seen,) = self.endpoint.requests
        self.assertEqual(gzip.decompress(seen["body"]), doc[FRAME.size :])
        self.assertEqual(seen["headers"]["content-encoding"], "gzip")
        self.assertEqual(self.counters.spans_sent, 12)

    def test_uploads_start_in_the_order_they_were_asked_for(self) -> None:
        runner = self.threaded()
        first = self.uploader.send([big_doc("first")])
        second = self.uploader.send([big_doc("second")])
        third = self.uploader.send([protobuf_doc("third")])  # small, waits its turn
        self.stub.flush()
        self.assertEqual(self.endpoint.requests, [])
        runner.run(1)  # the second's gzip ends first
        self.stub.flush()
        self.assertEqual(self.endpoint.requests, [])
        runner.run()
        self.stub.flush()
        self.assertEqual(self.names(), ["first-000-" + "x" * 40, "second-000-" + "x" * 40, "third"])
        for d in (first, second, third):
            self.assertIsNone(self.successResultOf(d).error)
        # Nothing waiting: the next small one goes at once again.
        self.uploader.send([protobuf_doc("fourth")])
        self.stub.flush()
        self.assertEqual(self.names()[-1], "fourth")

    def test_cancelled_while_gzipping_nothing_is_sent_and_the_rest_go(self) -> None:
        runner = self.threaded()
        first = self.uploader.send([big_doc("first")])
        second = self.uploader.send([protobuf_doc("second")])
        first.cancel()
        self.failureResultOf(first, CancelledError)
        self.assertNoResult(second)
        runner.run()
        self.stub.flush()
        self.assertEqual(self.names(), ["second"])
        self.assertIsNone(self.successResultOf(second).error)
        self.assertEqual(self.counters.spans_sent, 1)

    def test_a_failed_gzip_is_a_retryable_outcome(self) -> None:
        def broken(body: bytes) -> bytes:
            raise MemoryError("no room")

        runner = self.threaded()
        self.patch(otlp_upload, "gzip_body", broken)
        d = self.uploader.send([big_doc("big")])
        runner.run()
        error = self.successResultOf(d).error
        assert error is not None
        self.assertTrue(error.retryable)
        self.assertIn("gzipping the request failed: no room", error.message)
        self.assertEqual(self.endpoint.requests, [])

    def batcher(self) -> tuple[SpanBatcher, OtlpCounters]:
        counters = self.counters
        segments = SegmentBuffer(1_000_000, self.clock, Counters())
        buffer = SpanBuffer(segments, self.clock, counters.requests)
        batcher = SpanBatcher(
            buffer,
            self.uploader.send,
            self.clock,
            counters.requests,
            shutdown_timeout=5.0,
            tally=SpanTally(counters),
        )
        batcher.startService()
        buffer.offer(big_doc("big"))
        self.clock.advance(1.0)  # the batch leaves: its gzip is in the thread
        return batcher, counters

    def test_the_shutdown_drain_waits_for_a_gzip_in_the_thread(self) -> None:
        runner = self.threaded()
        batcher, counters = self.batcher()
        self.assertEqual(len(runner.calls), 1)
        stopped = batcher.stopService()
        self.assertNoResult(stopped)
        runner.run()
        self.stub.flush()
        self.successResultOf(stopped)
        self.assertEqual(len(self.endpoint.requests), 1)
        self.assertEqual((counters.requests.sent, counters.spans_sent), (1, 12))

    def test_a_gzip_still_running_at_the_shutdown_deadline_is_not_sent(self) -> None:
        runner = self.threaded()
        batcher, counters = self.batcher()
        stopped = batcher.stopService()
        self.clock.advance(5.0)
        self.successResultOf(stopped)
        self.assertEqual((counters.requests.lost, counters.spans_lost), (1, 12))
        runner.run()  # the thread ends after all
        self.stub.flush()
        self.assertEqual(self.endpoint.requests, [])
        self.assertEqual((counters.requests.sent, counters.spans_sent), (0, 0))
