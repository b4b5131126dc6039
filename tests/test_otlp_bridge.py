"""The OTLP bridge end to end: the OpenTelemetry SDK -> twistd xray -> a fake X-Ray.

The client is the vanilla OpenTelemetry Python SDK with its OTLP/HTTP
protobuf exporter, configured by environment variables, in a subprocess;
the upstream (``tests.support.fake_otlp``) checks every SigV4 signature
with botocore and decodes what it receives with opentelemetry-proto.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from tests.pipeline.test_otlp_upload import otlp_request
from tests.support import daemon as support
from tests.support.daemon import DaemonProcess, clean_env, run_json_script
from tests.support.fake_otlp import FakeOtlpXRay
from tests.support.otlp_requests import CLIENT, SERVER, T0, XRAY_TRACE, request, span, t1s
from tests.support.tempdirs import temp_dir
from tests.test_command import XRAY_AS_TWISTD
from xraytwisted import tap

KEY, SECRET, REGION = "AKIDOTLPBRIDGE", "otlp/bridge+secret", "us-west-2"

# Run by a separate Python process, configured the way users configure it.
SDK_APP = """
import json, os, sys

endpoint, count, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
os.environ["OTEL_SERVICE_NAME"] = prefix
os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"
os.environ["OTEL_BSP_MAX_EXPORT_BATCH_SIZE"] = "64"

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("xraytwisted-test")
ids = []
for i in range(count):
    with tracer.start_as_current_span(f"{prefix}-{i}") as span:
        ids.append(format(span.get_span_context().span_id, "016x"))
        with tracer.start_as_current_span(f"{prefix}-{i}-child") as child:
            ids.append(format(child.get_span_context().span_id, "016x"))
flushed = provider.force_flush(30000)
provider.shutdown()
print(json.dumps({"ids": ids, "flushed": flushed}))
"""

_OTLP_LISTENING = re.compile(
    r"Receiving OpenTelemetry spans \(OTLP/HTTP\) on http://[0-9.]+:(\d+)/"
)
_TCP_LISTENING = re.compile(r"Starting proxy http server on [0-9.]+:(\d+)")


def segment(seg_id: str) -> bytes:
    return json.dumps(
        {
            "name": "udp-beside-otlp",
            "id": seg_id,
            "trace_id": "1-6b022ab5-256770ff14bc64b228f4492e",
            "start_time": 1795304117.6,
            "end_time": 1795304117.7,
        }
    ).encode()


class OtlpBridgeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        self.fake = FakeOtlpXRay(
            self.workdir / "xray", access_key=KEY, secret_key=SECRET, region=REGION
        ).start()
        self.addCleanup(self.fake.stop)

    def start_daemon(self, *extra: str) -> DaemonProcess:
        env = clean_env({"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET})
        daemon = DaemonProcess(
            ["--region", REGION, "-e", self.fake.url, "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--otlp-address", "127.0.0.1:0", *extra],
            env,
            str(self.workdir / "daemon"),
        )  # fmt: skip
        self.addCleanup(daemon.kill)
        daemon.start()
        self.otlp_port = int(daemon.wait_for_log(_OTLP_LISTENING).group(1))
        self.tcp_port = int(daemon.wait_for_log(_TCP_LISTENING).group(1))
        return daemon

    def run_sdk_app(self, count: int, prefix: str) -> list[str]:
        script = self.workdir / "otel_app.py"
        script.write_text(SDK_APP)
        url = f"http://127.0.0.1:{self.otlp_port}/v1/traces"
        result = run_json_script(script, url, str(count), prefix)
        self.assertTrue(result["flushed"], "the SDK could not export its spans")
        ids: list[str] = result["ids"]
        return ids

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.tcp_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("xray_daemon_otlp_"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def health(self) -> Any:
        url = f"http://127.0.0.1:{self.tcp_port}/health"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def test_sdk_spans_arrive_signed_beside_udp_segments(self) -> None:
        daemon = self.start_daemon()
        segment_ids = [f"{i:016x}" for i in range(1, 21)]
        daemon.send(*[segment(s) for s in segment_ids])
        ids = self.run_sdk_app(150, "bridge")
        stats = self.fake.wait_for_spans(len(ids))
        self.assertEqual(set(self.fake.spans()), set(ids))
        self.assertEqual(stats["signature_errors"], [])
        self.assertEqual(stats["span_copies"], len(ids))  # each span once
        self.assertEqual(list(stats["content_types"]), ["application/x-protobuf"])
        self.assertEqual(list(stats["encodings"]), ["gzip"])
        self.fake.wait_for_segments(len(segment_ids))
        self.assertEqual(self.fake.segments(), set(segment_ids))
        metrics = self.metrics()
        self.assertEqual(metrics["xray_daemon_otlp_spans_received_total"], len(ids))
        self.assertEqual(metrics["xray_daemon_otlp_spans_sent_total"], len(ids))
        self.assertEqual(metrics["xray_daemon_otlp_requests_lost_total"], 0)
        otlp = self.health()["otlp"]
        self.assertEqual(otlp["traces_url"], self.fake.url + "/v1/traces")
        self.assertEqual((otlp["spans"]["received"], otlp["spans"]["sent"]), (len(ids), len(ids)))
        self.assertEqual(
            otlp["requests"]["received"], metrics["xray_daemon_otlp_requests_received_total"]
        )
        self.assertIsNone(otlp["last_upload_error"])
        self.assertIsNotNone(otlp["last_successful_upload"])
        self.assertEqual(daemon.stop(), 0)
        out = daemon.output()
        self.assertIn("Successfully sent batch of", out)
        self.assertNotIn("[Error]", out)

    def test_an_outage_of_xray_loses_nothing(self) -> None:
        spool = self.workdir / "spool"
        daemon = self.start_daemon("--spool-dir", str(spool), "--spool-after", "1")
        self.fake.set_mode("503")
        ids = self.run_sdk_app(100, "outage")
        segment_ids = [f"{i:016x}" for i in range(100, 110)]
        daemon.send(*[segment(s) for s in segment_ids])  # segments keep flowing meanwhile
        self.fake.wait_for_segments(len(segment_ids))
        daemon.wait_for_log(r"Uploads have failed for \d+ seconds: writing batches to the spool")
        self.assertTrue((spool / "otlp").is_dir())
        self.assertGreater(self.fake.stats()["requests"]["503"], 0)
        self.assertEqual(self.fake.stats()["unique_spans"], 0)
        self.fake.set_mode("ok")
        self.fake.wait_for_spans(len(ids), timeout=60)
        self.assertEqual(set(self.fake.spans()), set(ids))
        metrics = self.metrics()
        self.assertGreater(metrics["xray_daemon_otlp_requests_spooled_total"], 0)
        self.assertEqual(metrics["xray_daemon_otlp_requests_lost_total"], 0)
        self.assertEqual(metrics["xray_daemon_otlp_spans_sent_total"], len(ids))
        self.assertGreater(metrics["xray_daemon_otlp_spans_spooled_total"], 0)
        self.assertGreater(metrics["xray_daemon_otlp_spans_replayed_total"], 0)
        self.assertEqual(metrics["xray_daemon_otlp_spans_lost_total"], 0)
        self.assertEqual(self.fake.stats()["signature_errors"], [])
        self.assertEqual(daemon.stop(), 0)
        self.assertIn("OTLP requests", daemon.output())

    def test_otlp_json_posted_by_hand(self) -> None:
        # The OpenTelemetry Python SDK has no OTLP/JSON exporter installed
        # here: the request is built with opentelemetry-proto's JSON mapping.
        self.start_daemon("--otlp-gzip=false")
        body = json_format.MessageToJson(otlp_request("json-1", "json-2")).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.otlp_port}/v1/traces",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            self.assertEqual((response.status, response.read()), (200, b"{}"))
            self.assertEqual(response.headers["Content-Type"], "application/json")
        stats = self.fake.wait_for_spans(2)
        self.assertEqual(sorted(self.fake.spans().values()), ["json-1", "json-2"])
        self.assertEqual(list(stats["content_types"]), ["application/json"])
        self.assertEqual(list(stats["encodings"]), ["identity"])

    def test_transaction_search_off_is_said_plainly(self) -> None:
        daemon = self.start_daemon()
        self.fake.set_mode("search_off")
        ids = self.run_sdk_app(3, "nosearch")
        daemon.wait_for_log(r"\[Error\] .*enable CloudWatch Transaction Search: ")
        self.assertIn("UpdateTraceSegmentDestination", daemon.output())
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.metrics()["xray_daemon_otlp_spans_rejected_total"] == len(ids):
                break
            time.sleep(0.1)
        self.assertEqual(self.metrics()["xray_daemon_otlp_spans_rejected_total"], len(ids))
        self.assertEqual(self.fake.stats()["requests"]["search_off"], 1)  # not split, not retried
        self.assertEqual(daemon.stop(), 0)


class StartupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        cwd = Path(self.mktemp())
        cwd.mkdir()
        old = os.getcwd()
        os.chdir(cwd)
        self.addCleanup(os.chdir, old)

    def fails_with(self, argv: list[str]) -> str:
        options = tap.Options()
        options.parseOptions(argv)
        with self.assertRaises(SystemExit) as caught:
            tap.makeService(options, reactor)
        self.assertEqual(caught.exception.code, 1)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        return lines[0]

    def test_otlp_port_in_use_is_a_startup_error(self) -> None:
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        line = self.fails_with(
            ["-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--otlp-address", f"127.0.0.1:{port}"]
        )  # fmt: skip
        self.assertIn(f"listen tcp 127.0.0.1:{port}: bind: address already in use", line)
        self.assertIn("--otlp-address or Socket.OTLPAddress", line)


# The real SDK with fixed ids and times, so the viewer's output can be
# compared with a text reviewed by hand (tests/data/otlp-sink.view.txt).
# "checkout" is called by a service still on the X-Ray SDK (the remote
# parent is that service's subsegment, as the X-Ray propagator passes it).
DETERMINISTIC_APP = """
import json, sys
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode
from opentelemetry.trace import TraceFlags

endpoint, t0 = sys.argv[1], int(sys.argv[2])

class FixedIds(IdGenerator):
    def __init__(self):
        self.spans = [0x11, 0x12, 0x13, 0x31]
    def generate_span_id(self):
        return self.spans.pop(0)
    def generate_trace_id(self):
        return 0x4BF92F3577B34DA6A3CE929D0E0E4736

def at(ms):
    return t0 * 1_000_000_000 + ms * 1_000_000

provider = TracerProvider(resource=Resource({"service.name": "checkout"}), id_generator=FixedIds())
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
tracer = provider.get_tracer("xraytwisted-test")
caller = SpanContext(0x5F84C7A10123456789ABCDEF01234567, 0xF000000000000002, is_remote=True,
                     trace_flags=TraceFlags(TraceFlags.SAMPLED))
server = tracer.start_span(
    "POST /cart", context=trace.set_span_in_context(NonRecordingSpan(caller)),
    kind=SpanKind.SERVER, start_time=at(10),
    attributes={"http.request.method": "POST", "url.path": "/cart",
                "http.response.status_code": 500})
inside = trace.set_span_in_context(server)
price = tracer.start_span("price cart", context=inside, start_time=at(15))
price.end(at(25))
pay = tracer.start_span(
    "POST payments", context=inside, kind=SpanKind.CLIENT, start_time=at(30),
    attributes={"http.request.method": "POST", "url.full": "http://payments/charge",
                "http.response.status_code": 402})
pay.set_status(Status(StatusCode.ERROR, "card declined"))
pay.end(at(100))
server.add_event("exception", {"exception.type": "PaymentError",
                               "exception.message": "card declined"}, timestamp=at(104))
server.set_status(Status(StatusCode.ERROR, "payment failed"))
server.end(at(105))
health = tracer.start_span("GET /health", kind=SpanKind.SERVER, start_time=at(500))
health.end(at(502))
flushed = provider.force_flush(30000)
provider.shutdown()
print(json.dumps({"flushed": flushed}))
"""

# The X-Ray SDK service that calls checkout, as UDP segment documents.
FRONTEND = {
    "trace_id": XRAY_TRACE,
    "id": "f000000000000001",
    "name": "frontend",
    "start_time": T0,
    "end_time": T0 + 0.12,
    "http": {"request": {"method": "GET", "url": "http://shop/cart"}, "response": {"status": 500}},
    "fault": True,
    "subsegments": [{
        "id": "f000000000000002",
        "name": "checkout",
        "namespace": "remote",
        "start_time": T0 + 0.005,
        "end_time": T0 + 0.11,
        "http": {"request": {"method": "POST", "url": "http://checkout/cart"},
                 "response": {"status": 500}},
        "fault": True,
    }],
}  # fmt: skip

# "payments", called by checkout, runs in Lambda with ADOT: its spans come as
# a T1S datagram (base64 protobuf after the X-Ray header line).
PAYMENTS = request(
    "payments",
    span(0x22, "DynamoDB.GetItem", 40, 60, parent=0x21, kind=CLIENT,
         attributes={"aws.service": "DynamoDB"}),
    span(0x21, "charge", 35, 95, parent=0x13, kind=SERVER, error="card declined",
         attributes={"http.request.method": "POST", "url.path": "/charge",
                     "http.response.status_code": 402},
         exception=("CardDeclined", "insufficient funds")),
)  # fmt: skip
EXPECTED_VIEW = Path(__file__).parent / "data" / "otlp-sink.view.txt"


def spans_in_file(path: Path) -> list[dict[str, Any]]:
    spans = []
    for line in path.read_text().splitlines() if path.exists() else []:
        document = json.loads(line)
        for resource in document.get("resourceSpans", []):
            for scope in resource["scopeSpans"]:
                spans.extend(scope["spans"])
    return spans


class LocalSinkTests(SynchronousTestCase):
    """``xray --local-sink FILE --otlp-address``: the real SDK's spans, the file, the viewer."""

    def setUp(self) -> None:
        self.patch(support, "TWISTD", XRAY_AS_TWISTD)
        self.workdir = Path(temp_dir(self))
        self.sink = self.workdir / "traces.jsonl"

    def test_sdk_spans_segments_and_t1s_in_one_file_and_one_tree(self) -> None:
        daemon = DaemonProcess(
            ["--local-sink", str(self.sink), "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--otlp-address", "127.0.0.1:0"],
            clean_env(),
            str(self.workdir / "daemon"),
            twistd_args=(),
        )  # fmt: skip
        self.addCleanup(daemon.kill)
        daemon.start()
        port = int(daemon.wait_for_log(_OTLP_LISTENING).group(1))
        daemon.send(json.dumps(FRONTEND).encode(), t1s(PAYMENTS))
        script = self.workdir / "otel_app.py"
        script.write_text(DETERMINISTIC_APP)
        result = run_json_script(script, f"http://127.0.0.1:{port}/v1/traces", str(T0))
        self.assertTrue(result["flushed"], "the SDK could not export its spans")
        deadline = time.monotonic() + 30
        while len(spans_in_file(self.sink)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(spans_in_file(self.sink)), 4)  # written while running
        daemon.wait_for_log(r"Wrote \d+ segments to ")
        self.assertEqual(daemon.stop(), 0, daemon.output())

        lines = [json.loads(line) for line in self.sink.read_text().splitlines()]
        # One line per X-Ray document, per OTLP request, per UDP payload.
        self.assertIn(FRONTEND, lines)
        self.assertIn({"raw": t1s(PAYMENTS).decode()}, lines)
        otlp_lines = [line for line in lines if "resourceSpans" in line]
        self.assertEqual(len(lines), 2 + len(otlp_lines))
        spans = spans_in_file(self.sink)
        self.assertEqual(
            sorted((s["spanId"], s.get("parentSpanId", "")) for s in spans),
            [("0000000000000011", "f000000000000002"), ("0000000000000012", "0000000000000011"),
             ("0000000000000013", "0000000000000011"), ("0000000000000031", "")],
        )  # fmt: skip
        out = daemon.output()
        self.assertNotIn("[Error]", out)
        self.assertIn(
            f"[Info] Writing OpenTelemetry spans to {self.sink} as OTLP/JSON (local sink: "
            "nothing is uploaded)",
            out,
        )
        self.assertRegex(out, rf"\[Info\] Wrote \d+ OTLP requests to {re.escape(str(self.sink))} ")

        view = subprocess.run(
            [sys.executable, "-m", "xraytwisted.view", str(self.sink)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual((view.returncode, view.stderr), (0, ""))
        self.assertEqual(view.stdout, EXPECTED_VIEW.read_text())


# Runs the xray command with opentelemetry (and so opentelemetry-proto) impossible to import.
WITHOUT_OTEL = (
    "import sys; sys.modules['opentelemetry'] = None; from xraytwisted.command import run; run()"
)


class WithoutTheExtraTests(SynchronousTestCase):
    """opentelemetry-proto is optional: needed only to write spans to a local sink."""

    def test_local_sink_with_otlp_needs_the_extra(self) -> None:
        workdir = temp_dir(self)
        result = subprocess.run(
            [sys.executable, "-c", WITHOUT_OTEL, "--local-sink", "out.jsonl",
             "-b", "127.0.0.1:0", "-t", "127.0.0.1:0", "--otlp-address", "127.0.0.1:0"],
            env=clean_env(), cwd=workdir, capture_output=True, text=True, timeout=60,
            check=False,
        )  # fmt: skip
        self.assertEqual(result.returncode, 1, result.stdout + result.stderr)
        [line] = result.stderr.splitlines()
        self.assertIn("--otlp-address (Socket.OTLPAddress) with --local-sink writes spans", line)
        self.assertIn("pip install 'xraytwisted[otlp]'", line)
        self.assertFalse(os.path.exists(os.path.join(workdir, "out.jsonl")))

    def test_nothing_imports_it_unless_asked(self) -> None:
        # The daemon (uploading spans too), the twistd plugin and the viewer
        # start without protobuf: only decoding spans loads it.
        script = (
            "import sys, xraytwisted.daemon, xraytwisted.otlp_bridge, xraytwisted.view, "
            "twisted.plugins.xraytwisted_plugin; "
            "print([m for m in sys.modules if m.startswith(('opentelemetry', 'google'))])"
        )
        result = subprocess.run(
            [sys.executable, "-c", script], env=clean_env(), capture_output=True, text=True,
            timeout=60, check=True,
        )  # fmt: skip
        self.assertEqual(result.stdout, "[]\n")
