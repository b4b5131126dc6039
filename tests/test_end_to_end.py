"""End to end: the real aws-xray-sdk -> twistd xray -> a real moto server.

moto checks every SigV4 signature (see tests.support.moto), so these tests
fail if the daemon signs wrongly; one test proves that by giving the daemon
a wrong secret key.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import DaemonProcess, clean_env, run_json_script
from tests.support.moto import MotoServer, SharedMotoServer
from tests.support.tempdirs import temp_path

# Run by a separate Python process: the SDK's recorder is global state.
SDK_APP = """
import json, sys
from aws_xray_sdk.core import xray_recorder

port, count, prefix = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
xray_recorder.configure(
    service=prefix,
    sampling=False,              # every trace is sent; no sampling calls needed
    context_missing="LOG_ERROR",
    daemon_address=f"127.0.0.1:{port}",
    streaming_threshold=2,       # some subsegments travel as their own documents
)
trace_ids = []
for i in range(count):
    segment = xray_recorder.begin_segment(f"{prefix}-{i}")
    segment.put_annotation("index", i)
    for j in range(3):
        xray_recorder.begin_subsegment(f"child-{j}")
        xray_recorder.begin_subsegment(f"grandchild-{j}")
        xray_recorder.end_subsegment()
        xray_recorder.end_subsegment()
    trace_ids.append(segment.trace_id)
    xray_recorder.end_segment()
print(json.dumps(trace_ids))
"""


def run_sdk_app(workdir: Path, port: int, count: int, prefix: str) -> list[str]:
    script = workdir / "app.py"
    script.write_text(SDK_APP)
    ids: list[str] = run_json_script(script, str(port), str(count), prefix)
    return ids


def subsegment_names(document: dict[str, Any]) -> list[str]:
    names = []
    for sub in document.get("subsegments", []):
        names.append(sub["name"])
        names.extend(subsegment_names(sub))
    return names


class EndToEndTests(SynchronousTestCase):
    moto_server = SharedMotoServer()

    def setUp(self) -> None:
        self.moto: MotoServer = self.moto_server.acquire()
        self.workdir = Path(temp_path(self)).resolve()
        self.workdir.mkdir()

    def start_daemon(self, secret: str | None = None, *extra: str) -> DaemonProcess:
        env = clean_env(
            {
                "AWS_ACCESS_KEY_ID": self.moto.access_key,
                "AWS_SECRET_ACCESS_KEY": secret or self.moto.secret_key,
            }
        )
        daemon = DaemonProcess(
            ["--region", self.moto.region, "-e", self.moto.endpoint, "-b", "127.0.0.1:0",
             "-t", "127.0.0.1:0", *extra],
            env,
            str(self.workdir / "daemon"),
        )  # fmt: skip
        self.addCleanup(daemon.kill)
        return daemon.start()

    def wait_for_traces(self, trace_ids: list[str], timeout: float = 30) -> list[dict[str, Any]]:
        """Every trace's documents, once each has its segment and all subsegments."""
        deadline = time.monotonic() + timeout
        traces: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            traces = self.moto.batch_get_traces(trace_ids)
            if len(traces) == len(trace_ids) and all(_complete(t) for t in traces):
                return traces
            time.sleep(0.2)
        raise AssertionError(
            f"only {sum(_complete(t) for t in traces)} of {len(trace_ids)} traces complete "
            f"after {timeout}s"
        )

    def test_sdk_traces_arrive_in_xray(self) -> None:
        daemon = self.start_daemon()
        trace_ids = run_sdk_app(self.workdir, daemon.udp_port, 60, "e2e")
        traces = self.wait_for_traces(trace_ids)
        self.assertEqual({t["Id"] for t in traces}, set(trace_ids))
        for trace in traces:
            documents = [json.loads(s["Document"]) for s in trace["Segments"]]
            names = [n for d in documents for n in [d["name"], *subsegment_names(d)]]
            self.assertEqual(names.count("child-1"), 1, documents)
            self.assertEqual(names.count("grandchild-2"), 1, documents)
            # Streamed subsegments arrive as separate documents.
            self.assertGreater(len(documents), 1)
        out = daemon.output()
        self.assertIn("[Info] Successfully sent batch of 50 segments", out)
        self.assertNotIn("[Error]", out)
        self.assertEqual(daemon.stop(), 0)

    def test_wrong_secret_key_is_refused_by_xray(self) -> None:
        # The same path with a wrong key must fail: proof that moto checks
        # our signatures and that the test above would catch bad signing.
        daemon = self.start_daemon("wrong/secret/key", "--shutdown-timeout", "1")
        trace_ids = run_sdk_app(self.workdir, daemon.udp_port, 3, "wrongkey")
        daemon.wait_for_log(
            r"\[Error\] Sending segment batch failed with: "
            r"X-Ray refused the credentials \((HTTP )?403"
        )
        self.assertEqual(self.moto.batch_get_traces(trace_ids), [])
        # Accepted segments are not dropped; with no way to send them they are
        # reported as lost when the shutdown deadline passes.
        daemon.signal()
        self.assertEqual(daemon.wait(), 0)
        self.assertRegex(daemon.output(), r"\d+ segments were not sent and are lost")

    def test_segment_sent_just_before_sigterm_arrives(self) -> None:
        daemon = self.start_daemon()
        trace_ids = run_sdk_app(self.workdir, daemon.udp_port, 1, "last")
        daemon.signal()  # immediately: the batch's 1 s deadline has not passed
        self.assertEqual(daemon.wait(), 0, daemon.output())
        self.wait_for_traces(trace_ids, timeout=5)
        self.assertIn("Got shutdown signal: terminated", daemon.output())


def _complete(trace: dict[str, Any]) -> bool:
    documents = [json.loads(s["Document"]) for s in trace["Segments"]]
    names = [n for d in documents for n in [d["name"], *subsegment_names(d)]]
    return any(d.get("type") != "subsegment" for d in documents) and all(
        f"{kind}-{j}" in names for kind in ("child", "grandchild") for j in range(3)
    )
