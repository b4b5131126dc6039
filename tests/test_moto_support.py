"""Tests for tests.support.moto: a real moto server process with SigV4 checking on."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support.moto import (
    MotoServer,
    MotoServerError,
    SharedMotoServer,
    error_status_and_code,
    start_moto_server,
)
from tests.support.tempdirs import temp_path

REGION = "us-east-2"


def new_trace_id() -> str:
    return f"1-{int(time.time()):08x}-{os.urandom(12).hex()}"


def segment(trace_id: str | None = None, **fields: Any) -> dict[str, Any]:
    now = time.time()
    document: dict[str, Any] = {
        "trace_id": trace_id or new_trace_id(),
        "id": os.urandom(8).hex(),
        "name": "xraytwisted-test",
        "start_time": now - 0.5,
        "end_time": now,
    }
    document.update(fields)
    return document


def patch_environ(case: TestCase, **values: str) -> None:
    """Set environment variables for the rest of one test."""
    saved = {name: os.environ.get(name) for name in values}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    case.addCleanup(restore)
    os.environ.update(values)


class SharedServerTests(TestCase):
    """Behaviour of one server, shared by these tests (trial ignores setUpClass)."""

    moto_server = SharedMotoServer(REGION)

    def setUp(self) -> None:
        self.moto = self.moto_server.acquire()

    def assertRejected(self, error: ClientError, status: int, code: str) -> None:
        self.assertEqual(error_status_and_code(error), (status, code))

    def test_server_is_up(self) -> None:
        self.assertTrue(self.moto.running)
        self.assertEqual(self.moto.endpoint, f"http://127.0.0.1:{self.moto.port}")
        self.assertEqual(self.moto.region, REGION)
        self.assertTrue(self.moto.access_key.startswith("AKIA"))
        self.assertEqual(self.moto.account_id, "123456789012")
        status, _headers, _body = self.moto.http_request("GET", "/moto-api/data.json")
        self.assertEqual(status, 200)
        self.assertLess(self.moto.startup_seconds, 5.0)

    def test_put_with_right_keys_is_stored_and_read_back(self) -> None:
        document = segment()
        response = self.moto.client().put_trace_segments(
            TraceSegmentDocuments=[json.dumps(document)]
        )
        self.assertEqual(response["UnprocessedTraceSegments"], [])
        self.assertIn(document["trace_id"], self.moto.trace_ids())
        self.assertIn(document, self.moto.segment_documents())
        traces = self.moto.batch_get_traces([document["trace_id"]])
        self.assertEqual([trace["Id"] for trace in traces], [document["trace_id"]])
        self.assertEqual(
            traces[0]["Segments"], [{"Id": document["id"], "Document": json.dumps(document)}]
        )

    def test_same_put_with_wrong_secret_is_refused(self) -> None:
        documents = [json.dumps(segment())]
        trace_id = json.loads(documents[0])["trace_id"]
        forged = self.moto.client(secret_key="wrong" + self.moto.secret_key[5:])
        error = self.assertRaises(
            ClientError, forged.put_trace_segments, TraceSegmentDocuments=documents
        )
        self.assertRejected(error, 403, "SignatureDoesNotMatch")
        self.assertEqual(self.moto.batch_get_traces([trace_id]), [])
        # The identical call with the right secret goes through.
        self.moto.client().put_trace_segments(TraceSegmentDocuments=documents)
        self.assertEqual(len(self.moto.batch_get_traces([trace_id])), 1)

    def test_unknown_access_key_is_refused(self) -> None:
        stranger = self.moto.client(access_key="AKIAIOSFODNN7EXAMPLE", secret_key="x" * 40)
        document = segment()
        error = self.assertRaises(
            ClientError,
            stranger.put_trace_segments,
            TraceSegmentDocuments=[json.dumps(document)],
        )
        self.assertRejected(error, 403, "InvalidClientTokenId")
        self.assertEqual(self.moto.batch_get_traces([document["trace_id"]]), [])

    def test_unsigned_request_is_refused(self) -> None:
        document = segment()
        body = json.dumps({"TraceSegmentDocuments": [json.dumps(document)]}).encode()
        headers = {"Content-Type": "application/json"}
        status, _headers, _answer = self.moto.http_request("POST", "/TraceSegments", body, headers)
        # moto routes requests by their credential scope; one without Authorization ends
        # up in the S3 backend, which fails with HTTP 500.  Not accepted, not stored.
        self.assertGreaterEqual(status, 400)
        # Naming the key and scope, so that it reaches X-Ray, but with no signature.
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        headers["X-Amz-Date"] = date
        headers["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.moto.access_key}/{date[:8]}/{REGION}/xray/"
            "aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature="
        )
        status, _headers, answer = self.moto.http_request("POST", "/TraceSegments", body, headers)
        self.assertEqual(status, 403)
        self.assertIn(b"<Code>SignatureDoesNotMatch</Code>", answer)
        self.assertEqual(self.moto.batch_get_traces([document["trace_id"]]), [])

    def test_iam_policy_is_evaluated(self) -> None:
        error = self.assertRaises(ClientError, self.moto.client("iam").list_users)
        self.assertRejected(error, 403, "AccessDenied")

    def test_unprocessed_segments(self) -> None:
        good = segment()
        no_end = segment(trace_id=good["trace_id"])
        del no_end["end_time"]
        no_name = segment(trace_id=good["trace_id"])
        del no_name["name"]
        no_id = segment(trace_id=good["trace_id"])
        del no_id["id"]
        unprocessed = self.moto.put_trace_segments(["{not json", no_id, no_name, no_end, good])
        self.assertEqual(
            unprocessed,
            [
                {"ErrorCode": "JSONFormatError", "Message": "Bad JSON data"},
                {"ErrorCode": "MissingParam", "Message": "Missing segment ID"},
                {"Id": no_name["id"], "ErrorCode": "MissingParam", "Message": "Missing segment ID"},
                {
                    "Id": no_end["id"],
                    "ErrorCode": "MissingParam",
                    "Message": "Missing end_time or in_progress",
                },
            ],
        )
        self.assertEqual(self.moto.segment_documents([good["trace_id"]]), [good])

    def test_unfinished_trace_is_listed(self) -> None:
        document = segment(in_progress=True)
        del document["end_time"]
        self.assertEqual(self.moto.put_trace_segments([document]), [])
        self.assertIn(document["trace_id"], self.moto.trace_ids())
        self.assertIn(document, self.moto.segment_documents())

    def test_batch_get_traces_is_chunked(self) -> None:
        documents = [segment() for _ in range(7)]
        self.assertEqual(self.moto.put_trace_segments(documents), [])
        sizes: list[int] = []

        def record(params: dict[str, Any], **_kwargs: Any) -> None:
            sizes.append(len(params["TraceIds"]))

        self.moto.xray.meta.events.register("provide-client-params.xray.BatchGetTraces", record)
        self.addCleanup(
            self.moto.xray.meta.events.unregister,
            "provide-client-params.xray.BatchGetTraces",
            record,
        )
        trace_ids = [document["trace_id"] for document in documents]
        traces = self.moto.batch_get_traces([*trace_ids, "1-00000000-000000000000000000000000"])
        self.assertEqual(sorted(trace["Id"] for trace in traces), sorted(trace_ids))
        self.assertEqual(sizes, [5, 3])
        self.assertEqual(self.moto.segment_documents(trace_ids), documents)

    def test_client_ignores_developer_aws_settings(self) -> None:
        config = temp_path(self)
        with open(config, "w") as stream:
            stream.write("[default]\nregion = eu-west-1\nendpoint_url = http://127.0.0.2:9\n")
        patch_environ(
            self,
            AWS_PROFILE="profile-that-does-not-exist",
            AWS_CONFIG_FILE=config,
            AWS_SHARED_CREDENTIALS_FILE=config,
            AWS_ENDPOINT_URL="http://127.0.0.2:9",
            AWS_DEFAULT_REGION="eu-west-1",
            AWS_MAX_ATTEMPTS="7",
            HTTP_PROXY="http://127.0.0.2:9",
            HTTPS_PROXY="http://127.0.0.2:9",
            NO_PROXY="",
        )
        client = self.moto.client()
        self.assertEqual(client.meta.region_name, REGION)
        self.assertEqual(client.meta.endpoint_url, self.moto.endpoint)
        document = segment()
        client.put_trace_segments(TraceSegmentDocuments=[json.dumps(document)])
        self.assertEqual(self.moto.segment_documents([document["trace_id"]]), [document])

    def test_wait_for_documents(self) -> Deferred[None]:
        document = segment()
        reactor.callLater(0.1, self.moto.put_trace_segments, [document])

        async def run() -> None:
            documents = await self.moto.wait_for_documents(
                lambda documents: document in documents, trace_ids=[document["trace_id"]]
            )
            self.assertEqual(documents, [document])

        return ensureDeferred(run())

    def test_wait_for_documents_times_out(self) -> Deferred[None]:
        async def run() -> None:
            began = time.monotonic()
            with self.assertRaises(MotoServerError) as caught:
                await self.moto.wait_for_documents(lambda documents: False, timeout=0.2)
            self.assertIn("still not as expected after 0.2 s", str(caught.exception))
            self.assertLess(time.monotonic() - began, 5.0)

        return ensureDeferred(run())

    def test_reset(self) -> None:
        document = segment()
        self.moto.put_trace_segments([document])
        old_key, old_secret = self.moto.access_key, self.moto.secret_key
        self.assertIs(self.moto_server.acquire(reset=True), self.moto)
        self.assertNotEqual(self.moto.access_key, old_key)
        self.assertEqual(self.moto.trace_ids(), [])
        old = self.moto.client(access_key=old_key, secret_key=old_secret)
        error = self.assertRaises(ClientError, old.get_trace_summaries, StartTime=0, EndTime=1)
        self.assertRejected(error, 403, "InvalidClientTokenId")
        forged = self.moto.client(secret_key="wrong")
        error = self.assertRaises(ClientError, forged.get_trace_summaries, StartTime=0, EndTime=1)
        self.assertRejected(error, 403, "SignatureDoesNotMatch")


class ProcessTests(TestCase):
    """Starting and stopping private servers."""

    def test_stop_ends_process(self) -> None:
        server = MotoServer(REGION)
        self.addCleanup(server.stop)
        server.start()
        process = server._process
        assert process is not None
        self.assertIsNone(process.poll())
        server.stop()
        self.assertFalse(server.running)
        self.assertIsNotNone(process.returncode)
        self.assertRaises(ProcessLookupError, os.kill, process.pid, 0)
        self.assertRaises(OSError, server.http_request, "GET", "/moto-api/data.json", timeout=1)
        self.assertIn("POST /TraceSummaries", server.output())
        server.stop()  # idempotent

    def test_child_is_isolated_and_dies_with_its_parent(self) -> None:
        patch_environ(
            self,
            AWS_ACCESS_KEY_ID="AKIADEVELOPER0000000",
            AWS_SECRET_ACCESS_KEY="developer-secret",
            AWS_PROFILE="developer",
            MOTO_ACCOUNT_ID="999999999999",
            HTTP_PROXY="http://127.0.0.2:9",
            INITIAL_NO_AUTH_ACTION_COUNT="inf",
        )
        server = start_moto_server(self, REGION)
        self.assertEqual(server.account_id, "123456789012")
        environ_path = f"/proc/{server.pid}/environ"
        if os.path.exists(environ_path):
            with open(environ_path, "rb") as stream:
                entries = [entry.split(b"=", 1) for entry in stream.read().split(b"\0") if entry]
            environ = {name.decode(): value.decode() for name, value in entries}
            leaked = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"}
            leaked |= {"MOTO_ACCOUNT_ID", "HTTP_PROXY"}
            self.assertEqual(leaked & set(environ), set())
            self.assertEqual(environ["AWS_EC2_METADATA_DISABLED"], "true")
            self.assertEqual(environ["INITIAL_NO_AUTH_ACTION_COUNT"], "3")
            self.assertNotEqual(environ["HOME"], os.path.expanduser("~"))
        # The parent going away closes the child's stdin; the child must then exit.
        process = server._process
        assert process is not None and process.stdin is not None
        process.stdin.close()
        self.assertEqual(process.wait(10), 0)

    def test_start_refuses_unenforced_auth(self) -> None:
        class Unchecked(MotoServer):
            def _environment(self, tmpdir: str) -> dict[str, str]:
                env = super()._environment(tmpdir)
                env["INITIAL_NO_AUTH_ACTION_COUNT"] = "inf"
                return env

        server = Unchecked(REGION)
        self.addCleanup(server.stop)
        error = self.assertRaises(MotoServerError, server.start)
        self.assertIn("NOT enforced", str(error))
        self.assertFalse(server.running)

    def test_start_reports_early_exit(self) -> None:
        class Broken(MotoServer):
            def _command(self) -> list[str]:
                return [sys.executable, "-c", "print('boom: no moto today'); raise SystemExit(3)"]

        server = Broken(REGION)
        self.addCleanup(server.stop)
        error = self.assertRaises(MotoServerError, server.start)
        self.assertIn("exited with status 3", str(error))
        self.assertIn("boom: no moto today", str(error))
        self.assertFalse(server.running)
