"""The trace viewer: trees from a local-sink file, rendered exactly."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from xraytwisted import view
from xraytwisted.view import build_trace, collect, node_line, render

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "local-sink.jsonl"
# Reviewed by hand: offsets, durations, nesting and counts follow from the
# fixture's times (see the comments in test_fixture_structure).
EXPECTED = DATA / "local-sink.view.txt"
TRACE = "1-581cf771-a006649127e371903a2de979"


def lines(*docs: dict[str, Any]) -> list[str]:
    return [json.dumps(d) for d in docs]


def names(nodes: list[view.Node]) -> list[Any]:
    return [[n.doc["name"], names(n.children)] for n in nodes]


class RenderTests(SynchronousTestCase):
    def test_known_file(self) -> None:
        with FIXTURE.open() as f:
            output = render(collect(f))
        self.assertEqual(output, EXPECTED.read_text())

    def test_fixture_structure(self) -> None:
        with FIXTURE.open() as f:
            collection = collect(f)
        self.assertEqual(
            [t.trace_id for t in collection.traces],  # by start time, not file order
            [
                "1-58406520-a006649127e371903a2de979",
                TRACE,
                "1-6b022ab5-256770ff14bc64b228f4492e",
            ],
        )
        trace = collection.traces[1]
        # S3 was streamed (its own document, before its parent); Backend is a
        # downstream service's segment whose parent is the backend-call
        # subsegment; the in-progress Scorekeep document was replaced by the
        # complete one; siblings are in start order.
        self.assertEqual(
            names(trace.roots),
            [
                [
                    "Scorekeep",
                    [
                        ["GameModel.saveGame", [["DynamoDB", []]]],
                        ["S3", []],
                        ["backend-call", [["Backend", []]]],
                    ],
                ]
            ],
        )
        self.assertEqual((collection.documents, collection.skipped, collection.other), (6, 2, 1))

    def test_only_one_trace(self) -> None:
        with FIXTURE.open() as f:
            output = render(collect(f), TRACE)
        self.assertTrue(output.startswith(f"Trace {TRACE}  "), output)
        self.assertNotIn("worker", output)
        self.assertTrue(output.endswith("\n\n3 traces; 6 documents; 2 skipped (not JSON objects); "
                                        "1 without trace_id (e.g. raw payloads)\n"))  # fmt: skip

    def test_empty_input(self) -> None:
        self.assertEqual(render(collect([])), "0 traces; 0 documents\n")

    def test_complete_document_wins_whatever_the_order(self) -> None:
        base = {"id": "a1", "trace_id": "1-x", "name": "svc", "start_time": 10.0}
        complete = {**base, "end_time": 10.5}
        in_progress = {**base, "in_progress": True}
        for docs in ([in_progress, complete], [complete, in_progress]):
            trace = build_trace("1-x", docs)
            self.assertEqual(len(trace.roots), 1)
            self.assertEqual(node_line(trace.roots[0]), "svc  500.0 ms")

    def test_parent_cycle_does_not_lose_documents(self) -> None:
        a = {"id": "a", "trace_id": "1-x", "parent_id": "b", "name": "A", "start_time": 1.0}
        b = {"id": "b", "trace_id": "1-x", "parent_id": "a", "name": "B", "start_time": 2.0}
        trace = build_trace("1-x", [a, b])
        self.assertEqual(names(trace.roots), [["B", [["A", []]]]])

    def test_odd_documents_do_not_break_rendering(self) -> None:
        docs = [
            {"trace_id": "1-x", "name": "no id", "start_time": "soon", "end_time": 2},
            {"trace_id": "1-x", "id": "n", "start_time": 1.0, "end_time": float("nan")},
            {"trace_id": "1-x", "id": "m", "name": "odd", "start_time": 1.0, "http": [],
             "annotations": [], "cause": "some-exception-id", "fault": "yes"},
        ]  # fmt: skip
        output = render(collect(lines(*docs)))
        self.assertIn("(no name)  no end_time", output)
        self.assertIn("no id  no start_time", output)
        self.assertIn("  odd  no end_time\n", output)

    def test_node_line_parts(self) -> None:
        node = view.Node(
            {
                "name": "call",
                "start_time": 1.0,
                "end_time": 1.0004,
                "throttle": True,
                "http": {"request": {"method": "PUT"}, "response": {"status": 429}},
                "annotations": {"k": "v", "n": None},
                "cause": {"exceptions": [{"message": "slow down"}]},
            },
            segment=False,
        )
        self.assertEqual(
            node_line(node),
            "call  0.400 ms  throttle  PUT 429  annotations: k=v, n=null  cause: slow down",
        )


class CommandLineTests(SynchronousTestCase):
    def run_view(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "xraytwisted.view", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def test_module_prints_the_file(self) -> None:
        result = self.run_view(str(FIXTURE))
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, EXPECTED.read_text())

    def test_stdin(self) -> None:
        result = self.run_view("-", "--trace", TRACE, stdin=FIXTURE.read_text())
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("Backend  100.0 ms  fault", result.stdout)

    def test_unknown_trace(self) -> None:
        out = io.StringIO()
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        status = view.main([str(FIXTURE), "--trace", "1-nope"], stdout=out)
        self.assertEqual(status, 1)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(err.getvalue(), f"trace 1-nope is not in {FIXTURE} (3 traces there)\n")

    def test_missing_file(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        self.assertEqual(view.main(["/nonexistent/traces.jsonl"]), 1)
        self.assertEqual(
            err.getvalue(),
            "cannot read /nonexistent/traces.jsonl: No such file or directory; "
            "give the file written by xray --local-sink PATH\n",
        )

    def test_usage_error(self) -> None:
        result = self.run_view()
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage: python -m xraytwisted.view", result.stderr)
