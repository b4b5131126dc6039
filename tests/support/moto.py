"""A real ``moto`` server process on 127.0.0.1 with SigV4 signature checking switched on.

End-to-end tests upload to this server (not to an in-process mock) so that a wrong SigV4
signature from the daemon makes them fail.  :meth:`MotoServer.start` refuses to return
until it has *proved* that a request signed with a wrong secret is refused.

Using it from trial
===================

trial (Twisted 26.10, checked by experiment) does **not** call ``setUpClass`` /
``tearDownClass`` on ``twisted.trial.unittest.TestCase``: its suites never run
unittest's class fixtures.  So use one of:

* a server per test (about 1 s each)::

      def setUp(self) -> None:
          self.moto = start_moto_server(self)   # stopped again by addCleanup

* one server shared by every test of a class, started by the first test that asks for
  it and stopped at interpreter exit (or as soon as the process running trial dies)::

      class UploadTests(TestCase):
          moto_server = SharedMotoServer()

          def setUp(self) -> None:
              self.moto = self.moto_server.acquire()  # acquire(reset=True): clean state

  Tests sharing a server should tell their data apart by trace id
  (``segment_documents(trace_ids=[...])``).  ``acquire(reset=True)`` wipes moto's state
  instead; that creates a NEW IAM user, so ``access_key``/``secret_key`` change.

The process runs moto's own ``moto.server.main`` with ``-H 127.0.0.1 -p 0``; the port
Werkzeug picked is read from its log, so there is no race for a free port.  Its
stdout/stderr go to a file in a private temp dir (:meth:`MotoServer.output`, and the
test log via :func:`start_moto_server`); its environment is a short whitelist plus
``HOME`` = that temp dir, ``AWS_EC2_METADATA_DISABLED=true`` and AWS config/credential
files that do not exist.  It exits when its stdin (a pipe from the parent) closes, so it
never outlives the test process.  Start-up takes about 1 s, :meth:`MotoServer.stop` ~10 ms.

All the read-back helpers are blocking (they talk to another process, so they are
quick); from a test whose daemon runs in the trial reactor, wait for uploads with the
non-blocking :meth:`MotoServer.wait_for_documents`.

What moto (5.2.5) actually does -- the uploader may rely on this
================================================================

Facts marked (T) are pinned by ``tests/test_moto_support.py``.

Authentication
--------------
* ``INITIAL_NO_AUTH_ACTION_COUNT=N``: the first N requests that reach a service handler
  are neither authenticated nor authorised; every later one is.  ``/moto-api/*``
  requests are never counted or checked.  The harness uses N=3 (CreateUser,
  PutUserPolicy, CreateAccessKey), then proves enforcement.
* Routing uses the SigV4 credential scope in ``Authorization``
  (``Credential=AKID/DATE/REGION/SERVICE/aws4_request``), not the Host header: SERVICE
  must be ``xray``, and REGION picks which region's X-Ray store receives the data.  A
  daemon signing for another region than :attr:`MotoServer.region` uploads fine, but the
  harness will not find the data (read back with ``client(region=...)``).
  Signing for another service name never reaches X-Ray (``execute-api``: 403,
  ``xrays``: 500).
* The signature is recomputed from the key's secret, method, raw path + query, the
  headers named in SignedHeaders and the body, so a changed body is caught -- unless a
  *signed* ``X-Amz-Content-SHA256`` header is sent, whose value is trusted rather than
  compared with the body.  ``X-Amz-Date`` must be a signed header (else HTTP 500).
  Not checked: clock skew / request age (a year-2001 date passes), whether ``host`` is
  among the signed headers.
* Failures are HTTP **403** with an XML body ``<ErrorResponse><Errors><Error><Code>CODE
  </Code>...`` (Content-Type ``text/html``), even for X-Ray, a JSON protocol; botocore's
  xray client therefore reports ``Error.Code == "403"`` and puts the XML in
  ``Error.Message``.  :func:`error_status_and_code` digs the real code out.  Codes:

  - wrong secret / anything that changes the signature: ``SignatureDoesNotMatch`` (T)
  - access key id unknown to moto's IAM: ``InvalidClientTokenId`` (T)
  - valid signature, but no policy allows the action: ``AccessDenied`` (T)

* Unsigned request (no ``Authorization`` header): it cannot be routed to X-Ray, so moto
  hands it to its S3 backend, which crashes on the missing header: HTTP **500**,
  Werkzeug's HTML "Internal Server Error" page.  Nothing is stored (T).  With an
  ``Authorization`` header naming key and scope but an empty ``Signature=``: 403
  ``SignatureDoesNotMatch`` (T).
* IAM policies are evaluated, but the action moto checks is ``xray:<URL path>``:
  ``xray:TraceSegments`` (PutTraceSegments), ``xray:TelemetryRecords``,
  ``xray:TraceSummaries``, ``xray:Traces`` (BatchGetTraces) -- not the real action names.
  A policy allowing only ``xray:PutTraceSegments`` gets 403 ``AccessDenied``; the harness
  grants ``xray:*``.

PutTraceSegments (``POST /TraceSegments``, ``{"TraceSegmentDocuments": [str, ...]}``)
-------------------------------------------------------------------------------------
* No ``TraceSegmentDocuments`` (or a body that is not JSON): HTTP 400
  ``{"__type": "MissingParameter"}``.
* Each document is checked on its own; bad ones are listed in
  ``UnprocessedTraceSegments`` and the request is still HTTP 200 (T):

  - not JSON: ``{"ErrorCode": "JSONFormatError", "Message": "Bad JSON data"}``, no Id
  - no ``id``: ``{"ErrorCode": "MissingParam", "Message": "Missing segment ID"}``, no Id
  - no ``name``, ``trace_id`` or ``start_time``: ``{"Id": <id>, "ErrorCode":
    "MissingParam", "Message": "Missing segment ID"}`` (sic: same message)
  - neither ``end_time`` nor ``in_progress``: ``{"Id": <id>, "ErrorCode": "MissingParam",
    "Message": "Missing end_time or in_progress"}``
  - stored, but moto's bookkeeping then failed (e.g. a string ``start_time``):
    ``{"Id": <id>, "ErrorCode": "InternalFailure", ...}`` -- the document IS stored.

* Formats are not validated: ``trace_id`` (``1-<8 hex>-<24 hex>``), 16-hex ``id``,
  numeric times; ``"in_progress": false`` without ``end_time`` is accepted.  There are
  no size or count limits.
* The whole request fails with HTTP 500 ``{"__type": "InternalFailure"}`` if a document
  is JSON but not an object (e.g. ``"5"``) or has a top-level ``"raw"`` key.
* Documents are stored verbatim and synchronously: once the 200 is sent they are
  readable; there is no eventual consistency inside moto.

Reading back
------------
* ``GetTraceSummaries(StartTime, EndTime)`` lists only *finished* traces (the segment
  with the latest ``start_time`` has an ``end_time``) whose earliest segment
  ``start_time`` is > StartTime and whose latest-starting segment's ``end_time`` is
  < EndTime -- strict comparisons on the *segment* times, not the time in the trace id.
  No pagination; ``FilterExpression`` gives HTTP 500 (not implemented).
* ``BatchGetTraces(TraceIds)`` returns every stored segment of each trace, in-progress
  ones and duplicates included, as ``{"Id": <segment id>, "Document": <original
  string>}`` sorted by ``start_time``; unknown ids come back in ``UnprocessedTraceIds``.
  A trace that never finished has ``"Id": null`` (botocore drops the key).  The real
  API takes 1 to 5 ids per call; moto does not enforce that, the harness chunks by 5.
* ``GET /moto-api/data.json`` (moto's dashboard) lists every stored ``TraceSegment``
  of all accounts and regions, in-progress ones included; :meth:`MotoServer.trace_ids`
  uses it to find unfinished traces.  It answers 500 if a stored ``trace_id`` has no
  ``-`` in it; the harness then raises (pass trace ids explicitly).
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

import botocore.session
from botocore.config import Config
from botocore.configprovider import BOTOCORE_DEFAUT_SESSION_VARIABLES
from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorTime
    from twisted.trial.unittest import SynchronousTestCase

__all__ = [
    "DEFAULT_REGION",
    "MotoServer",
    "MotoServerError",
    "SharedMotoServer",
    "error_status_and_code",
    "start_moto_server",
]

DEFAULT_REGION = "us-east-2"
LOCALHOST = "127.0.0.1"

#: Seconds to wait for the server to answer (it usually takes under one).
STARTUP_TIMEOUT = 30.0
#: Seconds to wait for the process to end after SIGTERM, and again after SIGKILL.
STOP_TIMEOUT = 5.0
#: The real BatchGetTraces accepts at most this many trace ids per call.
BATCH_GET_TRACES_MAX_IDS = 5

#: CreateUser, PutUserPolicy, CreateAccessKey: the only requests moto lets through
#: unauthenticated.  Every later request must carry a valid signature.
_UNAUTHENTICATED_SETUP_ACTIONS = 3

XRAY_POLICY: dict[str, Any] = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "xray:*", "Resource": "*"}],
}

# Environment variables the server process may inherit; everything else (AWS_*, MOTO_*,
# proxies, HOME, ...) is dropped so the developer's settings cannot leak in.
_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "SYSTEMROOT")

# Runs moto's own server entry point (``python -m moto.server``), plus a watchdog thread:
# the parent holds the write end of the child's stdin and never writes to it, so EOF
# means the parent is gone (or stop() closed it) and the server must not outlive it.
_BOOTSTRAP = """\
import os, sys, threading

def _exit_when_parent_is_gone():
    try:
        while os.read(0, 4096):
            pass
    finally:
        os._exit(0)

threading.Thread(target=_exit_when_parent_is_gone, daemon=True).start()
from moto.server import main
main(sys.argv[1:])
"""

# What Werkzeug logs once the socket is listening (with ``-p 0`` it shows the real port).
_LISTENING = re.compile(rb"Running on http://127\.0\.0\.1:(\d+)")
_XML_ERROR_CODE = re.compile(r"<Code>([^<]+)</Code>")

# Wide enough for any real segment; moto compares segment times strictly within it.
_SUMMARY_START = 0
_SUMMARY_END = 32503680000  # 3000-01-01T00:00:00Z


class MotoServerError(RuntimeError):
    """The moto server could not be started, set up, or queried as expected."""


def error_status_and_code(error: ClientError) -> tuple[int, str]:
    """The HTTP status and AWS error code of a botocore ``ClientError`` from moto.

    moto sends its authentication errors as XML even to JSON-protocol services such as
    X-Ray, where botocore then reports the HTTP status as the code and the XML as the
    message; the real code (e.g. ``SignatureDoesNotMatch``) is taken from the XML.
    """
    response: dict[str, Any] = error.response
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    details: dict[str, Any] = response.get("Error", {})
    code = str(details.get("Code", ""))
    match = _XML_ERROR_CODE.search(str(details.get("Message", "")))
    if match and (not code or code == str(status)):
        code = match.group(1)
    return status, code


def _isolated_botocore_session(missing_path: str) -> botocore.session.Session:
    """A botocore session that reads neither environment variables nor ~/.aws."""
    session_vars = {
        name: (config_name, None, default, convert)
        for name, (config_name, _env, default, convert) in (
            BOTOCORE_DEFAUT_SESSION_VARIABLES.items()
        )
    }
    session = botocore.session.Session(session_vars=session_vars)
    session.set_config_variable("config_file", missing_path)
    session.set_config_variable("credentials_file", missing_path)
    session.set_config_variable("ignore_configured_endpoint_urls", True)
    return session


class MotoServer:
    """A real ``moto`` server process on 127.0.0.1 (free port), with SigV4 checking on.

    After :meth:`start`, :attr:`access_key` / :attr:`secret_key` belong to an IAM user
    allowed ``xray:*``, and requests with any other credentials are refused.
    """

    def __init__(self, region: str = DEFAULT_REGION) -> None:
        self.region = region
        self.endpoint = ""
        self.port = 0
        self.access_key = ""
        self.secret_key = ""
        self.user_name = ""
        self.account_id = ""
        #: Wall-clock seconds the last successful :meth:`start` took.
        self.startup_seconds = 0.0
        self._process: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None
        self._log_path: str | None = None
        self._final_output = ""
        self._session: botocore.session.Session | None = None
        self._xray: Any = None

    # -- process lifecycle -------------------------------------------------------------

    def _command(self) -> list[str]:
        return [sys.executable, "-c", _BOOTSTRAP, "-H", LOCALHOST, "-p", "0"]

    def _environment(self, tmpdir: str) -> dict[str, str]:
        missing = os.path.join(tmpdir, "absent", "aws-config")
        env = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
        env.update(
            HOME=tmpdir,
            AWS_EC2_METADATA_DISABLED="true",
            AWS_CONFIG_FILE=missing,
            AWS_SHARED_CREDENTIALS_FILE=missing,
            INITIAL_NO_AUTH_ACTION_COUNT=str(_UNAUTHENTICATED_SETUP_ACTIONS),
            NO_PROXY="*",
            no_proxy="*",
            PYTHONUNBUFFERED="1",
        )
        return env

    @property
    def running(self) -> bool:
        """Whether the server process has been started and has not exited."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Spawn the server, create the IAM user, and prove that signatures are checked."""
        if self._process is not None:
            raise MotoServerError("this MotoServer has already been started")
        began = time.monotonic()
        deadline = began + STARTUP_TIMEOUT
        self._final_output = ""
        self._tmpdir = tempfile.mkdtemp(prefix="xraytwisted-moto-")
        self._log_path = os.path.join(self._tmpdir, "moto-server.log")
        try:
            with open(self._log_path, "wb") as log:
                self._process = subprocess.Popen(
                    self._command(),
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._environment(self._tmpdir),
                    cwd=self._tmpdir,
                    close_fds=True,
                )
            self._session = self._warm_session(self._tmpdir)  # while the server boots
            self.port = self._wait_for_port(deadline)
            self.endpoint = f"http://{LOCALHOST}:{self.port}"
            self._wait_until_answering(deadline)
            self._create_iam_user()
            self._verify_auth_enforced()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began

    @staticmethod
    def _warm_session(tmpdir: str) -> botocore.session.Session:
        session = _isolated_botocore_session(os.path.join(tmpdir, "absent", "aws-config"))
        for service in ("iam", "xray"):  # load models and endpoint rules now: no I/O
            session.create_client(
                service,
                region_name=DEFAULT_REGION,
                endpoint_url=f"http://{LOCALHOST}:9",
                aws_access_key_id="warm-up",
                aws_secret_access_key="warm-up",
            )
        return session

    def stop(self) -> None:
        """Terminate the server (SIGKILL if it lingers) and remove its files.  Idempotent."""
        process, self._process = self._process, None
        try:
            if process is not None:
                try:
                    if process.poll() is None:
                        # Closing stdin makes the bootstrap's watchdog os._exit() at once;
                        # SIGTERM alone works too, but interpreter shutdown takes ~0.4 s.
                        if process.stdin is not None:
                            process.stdin.close()
                        process.terminate()
                        try:
                            process.wait(STOP_TIMEOUT)
                        except subprocess.TimeoutExpired:
                            process.kill()
                            process.wait(STOP_TIMEOUT)
                finally:
                    if process.stdin is not None:
                        process.stdin.close()
        finally:
            if self._log_path is not None:
                self._final_output = self._read_output()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = self._log_path = None
            self._xray = None

    def __enter__(self) -> MotoServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def output(self) -> str:
        """Everything the server process has written to stdout/stderr so far."""
        return self._read_output() if self._log_path is not None else self._final_output

    def _read_output(self) -> str:
        assert self._log_path is not None
        try:
            with open(self._log_path, "rb") as log:
                return log.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _failure(self, message: str) -> MotoServerError:
        output = self.output().strip()
        if len(output) > 8000:
            output = "[...]\n" + output[-8000:]
        return MotoServerError(f"{message}\n--- moto server output ---\n{output or '(none)'}")

    def _check_alive(self, doing: str) -> None:
        assert self._process is not None
        status = self._process.poll()
        if status is not None:
            raise self._failure(f"moto server exited with status {status} while {doing}")

    def _wait_for_port(self, deadline: float) -> int:
        assert self._log_path is not None
        while True:
            with open(self._log_path, "rb") as log:
                match = _LISTENING.search(log.read())
            if match:
                return int(match.group(1))
            self._check_alive("starting")
            if time.monotonic() > deadline:
                raise self._failure(
                    f"moto server did not report a listening port within {STARTUP_TIMEOUT} s"
                )
            time.sleep(0.02)

    def _wait_until_answering(self, deadline: float) -> None:
        while True:
            try:
                status, _headers, _body = self.http_request("GET", "/moto-api/data.json")
            except OSError as error:
                problem = repr(error)
            else:
                if status == 200:
                    return
                problem = f"HTTP {status}"
            self._check_alive("waiting for it to answer")
            if time.monotonic() > deadline:
                raise self._failure(f"moto server never answered ({problem})")
            time.sleep(0.02)

    # -- IAM setup and the auth check -------------------------------------------------

    def _create_iam_user(self) -> None:
        iam = self.client("iam", access_key="AKIAHARNESSBOOTSTRAP", secret_key="bootstrap")
        name = f"xraytwisted-test-{uuid.uuid4().hex[:12]}"
        try:
            user = iam.create_user(UserName=name)["User"]
            iam.put_user_policy(
                UserName=name, PolicyName="allow-xray", PolicyDocument=json.dumps(XRAY_POLICY)
            )
            key = iam.create_access_key(UserName=name)["AccessKey"]
        except ClientError as error:
            raise self._failure(
                f"could not create the IAM user ({error}); did another client use up the "
                f"{_UNAUTHENTICATED_SETUP_ACTIONS} unauthenticated requests?"
            ) from error
        self.user_name = name
        self.account_id = str(user["Arn"]).split(":")[4]
        self.access_key = str(key["AccessKeyId"])
        self.secret_key = str(key["SecretAccessKey"])
        self._xray = None

    def _verify_auth_enforced(self) -> None:
        """Raise unless a wrong secret is refused and the right one is accepted."""
        window = {"StartTime": _SUMMARY_START, "EndTime": _SUMMARY_START + 1}
        forged = self.client(secret_key="not-" + self.secret_key)
        try:
            forged.get_trace_summaries(**window)
        except ClientError as error:
            status, code = error_status_and_code(error)
            if (status, code) != (403, "SignatureDoesNotMatch"):
                raise self._failure(
                    "a request signed with a wrong secret was refused, but not as expected: "
                    f"HTTP {status} {code!r} instead of HTTP 403 'SignatureDoesNotMatch'"
                ) from error
        else:
            raise self._failure(
                "SigV4 checking is NOT enforced: moto accepted a request signed with a "
                "wrong secret key"
            )
        try:
            self.client().get_trace_summaries(**window)
        except ClientError as error:
            raise self._failure(f"the IAM user's own keys were refused: {error}") from error

    def reset(self) -> None:
        """Wipe all of moto's state, then create a new IAM user (new keys) and re-verify."""
        for path, body in (
            ("/moto-api/reset-auth", str(_UNAUTHENTICATED_SETUP_ACTIONS).encode()),
            ("/moto-api/reset", b""),
        ):
            status, _headers, answer = self.http_request("POST", path, body)
            if status != 200:
                raise self._failure(f"POST {path} answered HTTP {status}: {answer!r}")
        self._create_iam_user()
        self._verify_auth_enforced()

    # -- talking to the server --------------------------------------------------------

    def http_request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One plain HTTP request to the server (no signing, no proxies, no retries)."""
        if not self.port:
            raise MotoServerError("the moto server has not been started")
        connection = http.client.HTTPConnection(LOCALHOST, self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def client(
        self,
        service: str = "xray",
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        region: str | None = None,
    ) -> Any:
        """A botocore client for *service* on this server, signing with the IAM user's
        keys unless others are given.  It reads no AWS environment variables or files,
        uses no proxy, and does not retry."""
        if self._session is None or not self.endpoint:
            raise MotoServerError("the moto server has not been started")
        return self._session.create_client(
            service,
            region_name=region or self.region,
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            config=Config(
                retries={"total_max_attempts": 1},
                proxies={},
                connect_timeout=5,
                read_timeout=30,
            ),
        )

    @property
    def xray(self) -> Any:
        """A cached X-Ray client using the IAM user's keys."""
        if self._xray is None:
            self._xray = self.client()
        return self._xray

    def put_trace_segments(self, documents: Sequence[str | dict[str, Any]]) -> list[dict[str, Any]]:
        """Upload documents with the IAM user's keys; returns ``UnprocessedTraceSegments``."""
        encoded = [doc if isinstance(doc, str) else json.dumps(doc) for doc in documents]
        response = self.xray.put_trace_segments(TraceSegmentDocuments=encoded)
        return list(response.get("UnprocessedTraceSegments", []))

    def trace_ids(self) -> list[str]:
        """Every trace id stored in this server's region (sorted), unfinished ones included.

        Finished traces come from GetTraceSummaries over a window from 1970 to 3000;
        unfinished ones (which GetTraceSummaries never lists) from moto's dashboard,
        kept only if BatchGetTraces in :attr:`region` knows them.
        """
        found: set[str] = set()
        for page in self.xray.get_paginator("get_trace_summaries").paginate(
            StartTime=_SUMMARY_START, EndTime=_SUMMARY_END
        ):
            found.update(str(summary["Id"]) for summary in page.get("TraceSummaries", []))
        others = [trace_id for trace_id in self._dashboard_trace_ids() if trace_id not in found]
        if others:
            _traces, unprocessed = self._batch_get_traces(others)
            found.update(set(others) - set(unprocessed))
        return sorted(found)

    def _dashboard_trace_ids(self) -> list[str]:
        status, _headers, body = self.http_request("GET", "/moto-api/data.json")
        if status != 200:
            raise self._failure(
                f"GET /moto-api/data.json answered HTTP {status} (moto's dashboard fails if "
                "a stored trace_id contains no '-'); pass trace ids explicitly instead"
            )
        models: dict[str, Any] = json.loads(body).get("xray", {})
        ids = {segment.get("trace_id") for segment in models.get("TraceSegment", [])}
        return sorted(trace_id for trace_id in ids if isinstance(trace_id, str) and trace_id)

    def batch_get_traces(self, trace_ids: Iterable[str]) -> list[dict[str, Any]]:
        """BatchGetTraces for any number of ids (5 per call, following NextToken).

        Unknown ids are left out.  moto omits ``Id`` from traces that never finished.
        """
        traces, _unprocessed = self._batch_get_traces(trace_ids)
        return traces

    def _batch_get_traces(self, trace_ids: Iterable[str]) -> tuple[list[dict[str, Any]], list[str]]:
        ids = list(dict.fromkeys(trace_ids))
        traces: list[dict[str, Any]] = []
        unprocessed: list[str] = []
        for offset in range(0, len(ids), BATCH_GET_TRACES_MAX_IDS):
            chunk = ids[offset : offset + BATCH_GET_TRACES_MAX_IDS]
            for page in self.xray.get_paginator("batch_get_traces").paginate(TraceIds=chunk):
                traces.extend(page.get("Traces", []))
                unprocessed.extend(page.get("UnprocessedTraceIds", []))
        return traces, unprocessed

    def segment_documents(self, trace_ids: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The stored segment documents (parsed JSON) of *trace_ids*, default all traces.

        Ordered by trace, then by ``start_time``; duplicates are kept.
        """
        ids = self.trace_ids() if trace_ids is None else list(trace_ids)
        return [
            json.loads(segment["Document"])
            for trace in self.batch_get_traces(ids)
            for segment in trace.get("Segments", [])
        ]

    def wait_for_documents(
        self,
        predicate: Callable[[list[dict[str, Any]]], bool],
        *,
        trace_ids: Iterable[str] | None = None,
        timeout: float = 10.0,
        interval: float = 0.05,
        clock: IReactorTime | None = None,
    ) -> Deferred[list[dict[str, Any]]]:
        """Fire with :meth:`segment_documents` once *predicate* accepts them.

        Polls without blocking the reactor in between (so a daemon running in the same
        reactor can upload); fails with :class:`MotoServerError` after *timeout* seconds.
        """
        from twisted.internet import defer, task

        if clock is None:
            from twisted.internet import reactor

            clock = cast("IReactorTime", reactor)
        wanted = None if trace_ids is None else list(trace_ids)

        async def poll(clock: IReactorTime) -> list[dict[str, Any]]:
            deadline = clock.seconds() + timeout
            while True:
                documents = self.segment_documents(wanted)
                if predicate(documents):
                    return documents
                if clock.seconds() >= deadline:
                    raise self._failure(
                        f"documents still not as expected after {timeout} s: {documents!r}"
                    )
                await task.deferLater(clock, interval, lambda: None)

        return defer.ensureDeferred(poll(clock))


def start_moto_server(case: SynchronousTestCase, region: str = DEFAULT_REGION) -> MotoServer:
    """Start a :class:`MotoServer` for one test; it is stopped by ``case.addCleanup``.

    The server's output is written to the test log (``_trial_temp/test.log``).
    """
    from twisted.logger import Logger

    server = MotoServer(region)
    server.start()

    def stop() -> None:
        server.stop()
        Logger().info("moto server output:\n{output}", output=server.output())

    case.addCleanup(stop)
    return server


class SharedMotoServer:
    """One lazily started :class:`MotoServer`, shared e.g. by every test of a class.

    trial ignores ``setUpClass``, so declare it as a class attribute and call
    :meth:`acquire` in ``setUp``.  The server is stopped at interpreter exit (and dies
    with the process running the tests in any case); :meth:`stop` stops it earlier.
    """

    def __init__(self, region: str = DEFAULT_REGION) -> None:
        self.region = region
        self._server: MotoServer | None = None
        self._registered = False

    def acquire(self, *, reset: bool = False) -> MotoServer:
        """The running shared server, started (or restarted, if it died) as needed.

        With ``reset=True`` an already running server is wiped with
        :meth:`MotoServer.reset` (new IAM user and keys).
        """
        server = self._server
        if server is not None and server.running:
            if reset:
                server.reset()
            return server
        if server is not None:
            server.stop()
        self._server = None
        server = MotoServer(self.region)
        server.start()
        self._server = server
        if not self._registered:
            atexit.register(self.stop)
            self._registered = True
        return server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
