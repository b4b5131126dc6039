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

from google.protobuf import json_format
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from tests.pipeline.test_otlp_upload import otlp_request
from tests.support.daemon import DaemonProcess, clean_env, run_json_script
from tests.support.fake_otlp import FakeOtlpXRay
from tests.support.tempdirs import temp_dir
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
