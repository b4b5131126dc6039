"""The trace viewer: trees from a local-sink file, rendered exactly."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import HEADER, clean_env
from tests.support.otlp_requests import SERVER, T0, XRAY_TRACE, request, span, t1s
from tests.support.tempdirs import temp_path
from xraytwisted import view
from xraytwisted.pipeline.local_sink import encode_otlp_line
from xraytwisted.pipeline.otlp_batches import KIND_PROTOBUF, frame
from xraytwisted.view import build_trace, collect, node_line, render, summary_line

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
        # The totals are the trace's own, not the file's.
        self.assertTrue(output.endswith("\n\n1 trace; 4 documents\n"), output)

    def test_empty_input(self) -> None:
        self.assertEqual(render(collect([])), "0 traces; 0 documents\n")

    def test_complete_document_wins_whatever_the_order(self) -> None:
        base = {"id": "a1", "trace_id": "1-x", "name": "svc", "start_time": 10.0}
        complete = {**base, "end_time": 10.5}
        in_progress = {**base, "in_progress": True}
        for docs in ([in_progress, complete], [complete, in_progress]):
            trace = build_trace("1-x", docs)
            self.assertEqual(len(trace.roots), 1)
            self.assertEqual(node_line(trace.roots[0]), "svc  500.000 ms")

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

    def test_one_precision(self) -> None:
        docs = [
            {"trace_id": "1-x", "id": "r", "name": "root", "start_time": 1.0, "end_time": 1.25,
             "subsegments": [{"id": "s", "name": "fast", "start_time": 1.00017,
                              "end_time": 1.0002}]},
        ]  # fmt: skip
        output = render(collect(lines(*docs)))
        self.assertIn("\n  +0.000 ms  root  250.000 ms\n", output)
        self.assertIn("  +0.170 ms    fast  0.030 ms\n", output)

    def test_payloads_without_trace_id_are_named_and_counted_by_kind(self) -> None:
        docs = [
            {"raw": "T1SCgoKCAoGEgRzdmMx"},
            {"raw": "T1SAAAA"},
            {"raw": "T1UBBBB"},
            {"raw": "M1CCCC"},
            {"raw": "not json"},
            {"name": "no trace id"},
        ]
        collection = collect(lines(*docs))
        self.assertEqual(collection.other, 6)
        self.assertEqual(
            render(collection),
            "0 traces; 0 documents; 2 OTLP span payloads (T1S: sampled; not an OTLP request); "
            "1 OTLP span payload (T1U: unsampled; not an OTLP request); "
            "1 OTLP metrics payload (M1; not decoded); 1 raw payload (not JSON); "
            "1 JSON object without trace_id\n",
        )

    def test_metadata_only_when_asked(self) -> None:
        doc = {"trace_id": "1-x", "id": "r", "name": "root", "start_time": 1.0, "end_time": 2.0,
               "metadata": {"default": {"user": {"id": 7}}, "debug": "é"},
               "subsegments": [{"id": "s", "name": "db", "start_time": 1.5, "end_time": 1.6,
                                "metadata": {"sql": {"query": "SELECT 1"}}}]}  # fmt: skip
        self.assertNotIn("metadata", render(collect(lines(doc))))
        self.assertEqual(
            render(collect(lines(doc)), metadata=True).splitlines()[1:5],
            [
                "    +0.000 ms  root  1000.000 ms",
                '                 metadata default: {"user": {"id": 7}}',
                '                 metadata debug: "é"',
                "  +500.000 ms    db  100.000 ms",
            ],
        )


def otlp_line(message: ExportTraceServiceRequest) -> str:
    """The local sink's line for a protobuf OTLP request."""
    doc = frame(KIND_PROTOBUF, 1, message.SerializeToString())
    return encode_otlp_line(doc).decode().rstrip("\n")


CHECKOUT = request(
    "checkout",
    span(0x12, "price cart", 15, 25, parent=0x11),
    span(0x11, "POST /cart", 10, 105, parent=0xF000000000000002, kind=SERVER,
         error="payment failed", attributes={"http.request.method": "POST", "url.path": "/cart",
                                             "http.response.status_code": 500}),
)  # fmt: skip
FRONTEND = {"trace_id": XRAY_TRACE, "id": "f000000000000001", "name": "frontend",
            "start_time": T0, "end_time": T0 + 0.12,
            "subsegments": [{"id": "f000000000000002", "name": "checkout",
                             "start_time": T0 + 0.005, "end_time": T0 + 0.11}]}  # fmt: skip


class OtlpRenderTests(SynchronousTestCase):
    """OpenTelemetry spans as trees, beside and inside X-Ray segments."""

    def test_spans_join_the_segments_of_their_trace(self) -> None:
        output = render(collect([json.dumps(FRONTEND), otlp_line(CHECKOUT)]))
        self.assertEqual(
            output,
            f"Trace {XRAY_TRACE}  2020-10-12T21:16:17.000Z  120.000 ms  "
            "1 segment, 1 subsegment, 2 spans, 1 error\n"
            "   +0.000 ms  frontend  120.000 ms\n"
            "   +5.000 ms    checkout  105.000 ms\n"
            "  +10.000 ms      POST /cart  95.000 ms  server span  error  service: checkout  "
            "POST /cart 500  status: payment failed\n"
            "  +15.000 ms        price cart  10.000 ms  internal span\n"
            "\n"
            "1 trace; 1 document; 2 OTLP spans\n",
        )

    def test_either_form_of_the_trace_id_selects_it(self) -> None:
        collection = collect([json.dumps(FRONTEND), otlp_line(CHECKOUT)])
        for trace_id in (XRAY_TRACE, "5f84c7a10123456789abcdef01234567",
                         "5F84C7A10123456789ABCDEF01234567"):  # fmt: skip
            output = render(collection, trace_id)
            self.assertTrue(output.startswith(f"Trace {XRAY_TRACE}  "), output)
            self.assertTrue(output.endswith("\n\n1 trace; 1 document; 2 OTLP spans\n"), output)

    def test_spans_alone_are_shown_by_their_hex_trace_id(self) -> None:
        [trace] = collect([otlp_line(CHECKOUT)]).traces
        self.assertEqual(trace.trace_id, "5f84c7a10123456789abcdef01234567")
        self.assertEqual(
            summary_line(trace),
            "Trace 5f84c7a10123456789abcdef01234567  2020-10-12T21:16:17.010Z  95.000 ms  "
            "2 spans, 1 error",
        )
        self.assertEqual(trace.roots[0].missing_parent, "")  # a server span: a service's entry

    def test_t1s_and_t1u_payloads_are_decoded(self) -> None:
        # What the local sink writes for ADOT's UDP datagrams (local_sink.encode_line).
        charge = span(0x21, "charge", 35, 95, parent=0x13, kind=SERVER,
                      exception=("CardDeclined", "insufficient funds"))  # fmt: skip
        payments = request("payments", charge)
        unsampled = request("batch", span(0x41, "nightly", 0, 1, trace_id=7 << 64))
        docs = [{"raw": t1s(payments).decode()}, {"raw": t1s(unsampled, b"T1U").decode()}]
        output = render(collect(lines(*docs)))
        self.assertIn(
            "\n  +0.000 ms  charge  60.000 ms  server span  service: payments  "
            "cause: CardDeclined: insufficient funds\n",
            output,
        )
        self.assertIn("Trace 00000000000000070000000000000000  ", output)
        self.assertTrue(
            output.endswith(
                "\n\n2 traces; 0 documents; 2 OTLP spans; 1 OTLP span payload (T1S: sampled); "
                "1 OTLP span payload (T1U: unsampled)\n"
            ),
            output,
        )

    def test_canonical_protobuf_json_is_read_too(self) -> None:
        # json_format.MessageToJson writes base64 ids and enum names: not
        # OTLP/JSON, but what a hand-made request may hold.
        line = json_format.MessageToJson(CHECKOUT, indent=None)
        self.assertIn('"kind": "SPAN_KIND_SERVER"', line)
        self.assertEqual(render(collect([line])), render(collect([otlp_line(CHECKOUT)])))

    def test_a_child_whose_parent_is_missing_says_so(self) -> None:
        child = request("svc", span(0x12, "price cart", 15, 25, parent=0x11))
        [trace] = collect([otlp_line(child)]).traces
        self.assertEqual(
            node_line(trace.roots[0]),
            "price cart  10.000 ms  internal span  (parent 0000000000000011 not in file)",
        )
        self.assertFalse(view.is_complete(trace))

    def test_span_attributes_with_metadata(self) -> None:
        job = span(0x11, "job", 0, 5, attributes={"count": 3, "ok": True, "who": "é"})
        job.attributes.add(key="list").value.array_value.values.add(string_value="a")
        message = request("svc", job)
        output = render(collect([otlp_line(message)]), metadata=True)
        self.assertIn(
            "\n               attributes: "
            '{"count": 3, "ok": true, "who": "é", "list": ["a"]}\n'
            '               resource: {"service.name": "svc"}\n',
            output,
        )

    def test_odd_lines_are_counted_not_fatal(self) -> None:
        docs = [
            {"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "no trace id"}, "junk"]}]}]},
            {"resourceSpans": [{"scopeSpans": "x"}, 7]},
            {"otlpProtobufBase64": "AAAA", "error": "not an OTLP ExportTraceServiceRequest"},
            {"resourceSpans": [{"scopeSpans": [{"spans": [{
                "traceId": "5f84c7a10123456789abcdef01234567", "spanId": "0000000000000001",
                "name": 5, "kind": "nonsense", "startTimeUnixNano": "soon",
                "status": {"code": "STATUS_CODE_ERROR"}, "attributes": [{"key": 1}],
                "events": [{"name": "exception"}]}]}]}]},
        ]  # fmt: skip
        output = render(collect(lines(*docs)))
        self.assertIn("  5  no start_time  span  error  cause: (no message)\n", output)
        self.assertTrue(
            output.endswith(
                "1 trace; 0 documents; 1 OTLP span; "
                "1 OTLP request the local sink could not decode; "
                "1 OTLP span without a trace id\n"
            ),
            output,
        )

    def test_trace_keys(self) -> None:
        self.assertEqual(
            [view.trace_key(t) for t in (XRAY_TRACE, "1-5F84C7A1-0123456789ABCDEF01234567",
                                         "5f84c7a10123456789abcdef01234567", "1-x", "abc")],
            ["5f84c7a10123456789abcdef01234567"] * 3 + ["1-x", "abc"],
        )  # fmt: skip


def segment(trace: str, ident: str, start: float, end: float | None = None, **more: Any) -> str:
    doc: dict[str, Any] = {"trace_id": trace, "id": ident, "name": ident, "start_time": start}
    if end is None:
        doc["in_progress"] = True
    else:
        doc["end_time"] = end
    return json.dumps({**doc, **more})


class StreamerTests(SynchronousTestCase):
    """When a trace counts as complete, with a clock the test moves."""

    def setUp(self) -> None:
        self.now = 100.0
        self.streamer = view.Streamer(lambda: self.now, settle=1.0)

    def advance(self, seconds: float) -> list[str]:
        self.now += seconds
        return self.streamer.ready()

    def test_printed_once_the_root_ended_and_the_trace_is_quiet(self) -> None:
        self.streamer.feed(segment("1-a", "root", 1.0, 1.5))
        self.assertEqual(self.streamer.next_due(), 101.0)
        self.assertEqual(self.advance(0.9), [])
        [block] = self.advance(0.1)
        self.assertTrue(block.startswith("Trace 1-a  "), block)
        self.assertIsNone(self.streamer.next_due())
        self.assertEqual(self.streamer.flush(), [])  # printed once
        self.assertEqual(self.streamer.totals(), "1 trace; 1 document")

    def test_each_new_document_restarts_the_wait(self) -> None:
        self.streamer.feed(segment("1-a", "root", 1.0, 1.5))
        self.advance(0.8)
        self.streamer.feed(segment("1-a", "late", 1.1, 1.2, type="subsegment", parent_id="root"))
        self.assertEqual(self.advance(0.8), [])
        [block] = self.advance(0.2)
        self.assertIn("late", block)

    def test_not_printed_before_the_root_ends(self) -> None:
        # A streamed subsegment first, then the in-progress root: both wait.
        self.streamer.feed(segment("1-a", "child", 1.1, 1.2, type="subsegment", parent_id="root"))
        self.assertEqual(self.advance(5), [])
        self.streamer.feed(segment("1-a", "root", 1.0))
        self.assertEqual(self.advance(5), [])
        self.assertIsNone(self.streamer.next_due())  # nothing to look at before more input
        self.streamer.feed(segment("1-a", "root", 1.0, 1.5))
        [block] = self.advance(1)
        self.assertIn("root  500.000 ms", block)
        self.assertIn("child", block)

    def test_end_of_input_prints_the_rest_as_it_is(self) -> None:
        self.streamer.feed(segment("1-b", "second", 2.0))
        self.streamer.feed(segment("1-a", "first", 1.0))
        blocks = self.streamer.flush()
        self.assertEqual([b.split("  ")[0] for b in blocks], ["Trace 1-a", "Trace 1-b"])
        self.assertIn("in progress", blocks[0])

    def test_late_documents_print_the_trace_again(self) -> None:
        self.streamer.feed(segment("1-a", "root", 1.0, 1.5))
        self.advance(1)
        self.streamer.feed(segment("1-a", "backend", 1.1, 1.4, parent_id="root"))
        [block] = self.advance(1)
        self.assertIn("(updated: 1 more document)", block.splitlines()[0])
        self.assertEqual(self.streamer.totals(), "1 trace; 2 documents")

    def test_downstream_segment_without_its_parent_is_complete(self) -> None:
        # A service called by something not traced locally: its parent is elsewhere.
        self.streamer.feed(segment("1-a", "api", 1.0, 1.5, parent_id="upstream"))
        self.assertEqual(len(self.advance(1)), 1)

    def test_only_one_trace(self) -> None:
        streamer = view.Streamer(lambda: self.now, trace_id="1-b")
        for line in (segment("1-a", "a", 1.0, 2.0), segment("1-b", "b", 1.0, 2.0), "junk",
                     '{"raw": "T1Sxx"}'):  # fmt: skip
            streamer.feed(line)
        self.now += 1
        [block] = streamer.ready()
        self.assertTrue(block.startswith("Trace 1-b"))
        self.assertEqual(streamer.seen, {"1-a", "1-b"})
        self.assertEqual(streamer.totals(), "1 trace; 1 document")

    def test_totals_count_what_is_not_a_trace(self) -> None:
        for line in ("junk", "", '{"raw": "T1Uxx"}', "[1]"):
            self.streamer.feed(line)
        self.assertEqual(
            self.streamer.totals(),
            "0 traces; 0 documents; 2 skipped (not JSON objects); "
            "1 OTLP span payload (T1U: unsampled; not an OTLP request)",
        )


class SpanStreamerTests(SynchronousTestCase):
    """Spans come children first (an SDK exports a span when it ends): the tree waits."""

    def setUp(self) -> None:
        self.now = 100.0
        self.streamer = view.Streamer(lambda: self.now, settle=1.0)

    def advance(self, seconds: float) -> list[str]:
        self.now += seconds
        return self.streamer.ready()

    def test_children_wait_for_their_parent(self) -> None:
        root = span(0x11, "POST /cart", 10, 105, kind=SERVER)
        child = span(0x12, "price cart", 15, 25, parent=0x11)
        self.streamer.feed(otlp_line(request("checkout", child)))
        self.assertEqual(self.advance(5), [])
        self.streamer.feed(otlp_line(request("checkout", root)))
        [block] = self.advance(1)
        self.assertEqual(
            block.splitlines()[1:],
            ["  +0.000 ms  POST /cart  95.000 ms  server span  service: checkout",
             "  +5.000 ms    price cart  10.000 ms  internal span"],
        )  # fmt: skip
        self.assertEqual(self.streamer.totals(), "1 trace; 0 documents; 2 OTLP spans")

    def test_late_spans_and_segments_print_the_trace_again(self) -> None:
        self.streamer.feed(json.dumps(FRONTEND))
        self.advance(1)
        self.streamer.feed(otlp_line(CHECKOUT))
        [block] = self.advance(1)
        self.assertIn(f"Trace {XRAY_TRACE}  ", block)
        self.assertIn("(updated: 2 more spans)", block.splitlines()[0])
        self.assertIn("      POST /cart  95.000 ms", block)

    def test_only_one_trace_by_its_otlp_id(self) -> None:
        streamer = view.Streamer(lambda: self.now, trace_id="5f84c7a10123456789abcdef01234567")
        streamer.feed(json.dumps(FRONTEND))
        streamer.feed(segment("1-a", "a", 1.0, 2.0))
        streamer.feed(otlp_line(CHECKOUT))
        self.now += 1
        [block] = streamer.ready()
        self.assertTrue(block.startswith(f"Trace {XRAY_TRACE}  "), block)
        self.assertEqual(streamer.totals(), "1 trace; 1 document; 2 OTLP spans")


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
        self.assertIn("Backend  100.000 ms  fault", result.stdout)

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

    def test_without_the_otlp_extra(self) -> None:
        # The sink's OTLP/JSON lines need no library; T1S payloads do, and are
        # counted as before, with how to decode them.
        traces = Path(temp_path(self, "traces.jsonl"))
        traces.write_text(
            otlp_line(CHECKOUT) + "\n" + json.dumps({"raw": t1s(CHECKOUT).decode()}) + "\n"
        )
        blocked = (
            "import sys; sys.modules['opentelemetry'] = None; "
            "from xraytwisted.view import main; sys.exit(main())"
        )
        result = subprocess.run(
            [sys.executable, "-c", blocked, str(traces)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertIn("POST /cart  95.000 ms  server span", result.stdout)
        self.assertTrue(
            result.stdout.endswith(
                "\n\n1 trace; 0 documents; 2 OTLP spans; "
                "1 OTLP span payload (T1S: sampled; not decoded); "
                "to see their spans: pip install 'xraytwisted[otlp]'\n"
            ),
            result.stdout,
        )

    def test_usage_error(self) -> None:
        result = self.run_view()
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage: python -m xraytwisted.view", result.stderr)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def wait_for(path: Path, pattern: str, *procs: subprocess.Popen[bytes]) -> re.Match[str]:
    """Bounded wait until ``path`` matches; fails early if a process has ended."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = regex.search(_read(path))
        if match:
            return match
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited with {proc.returncode}: {_read(path)}")
        time.sleep(0.02)
    raise AssertionError(f"{pattern!r} not in {path} after 30 s:\n{_read(path)}")


VIEW = [sys.executable, "-m", "xraytwisted.view"]


class StreamingTests(SynchronousTestCase):
    """The viewer on a live pipe and a growing file: real processes, real pipes."""

    def setUp(self) -> None:
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()

    def test_pipe_from_the_daemon_prints_traces_as_they_complete(self) -> None:
        # xray --local-sink - -b ... | python -m xraytwisted.view - --settle 0.2
        xray_err, view_out, view_err = (self.workdir / n for n in ("xray.err", "out", "err"))
        with xray_err.open("wb") as err:
            xray = subprocess.Popen(
                [sys.executable, "-m", "xraytwisted", "--local-sink", "-", "-b", "127.0.0.1:0",
                 "-t", "127.0.0.1:0"],
                env=clean_env(), cwd=self.workdir, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        self.addCleanup(_kill, xray)
        with view_out.open("wb") as out, view_err.open("wb") as err:
            viewer = subprocess.Popen(
                [*VIEW, "-", "--settle", "0.2"], stdin=xray.stdout, stdout=out, stderr=err
            )
        self.addCleanup(_kill, viewer)
        assert xray.stdout is not None
        xray.stdout.close()  # the viewer holds the read end now
        port = int(wait_for(xray_err, r"Listening on UDP [0-9.]+:(\d+)", xray).group(1))
        now = time.time()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(HEADER + segment("1-a", "done", now, now + 0.01).encode(), ("127.0.0.1", port))
            # A complete trace is printed while the daemon runs ...
            wait_for(view_out, r"Trace 1-a  .*\n.*done  10\.000 ms", xray, viewer)
            s.sendto(HEADER + segment("1-b", "open", now).encode(), ("127.0.0.1", port))
            s.sendto(HEADER + b"T1Sabcd", ("127.0.0.1", port))
        # ... and Ctrl-C (SIGINT to both, as a terminal sends it) ends both
        # quietly: the daemon writes what it still holds as it drains, and
        # the viewer prints it before it leaves.
        for proc in (viewer, xray):
            proc.send_signal(signal.SIGINT)
        self.assertEqual(xray.wait(30), 0, _read(xray_err))
        self.assertEqual(viewer.wait(30), 0, _read(view_err))
        self.assertEqual(_read(view_err), "")
        out = _read(view_out)
        self.assertIn("Trace 1-b  ", out)
        self.assertIn("open  in progress", out)
        self.assertTrue(
            out.endswith(
                "\n\n2 traces; 2 documents; "
                "1 OTLP span payload (T1S: sampled; not an OTLP request)\n"
            ),
            out,
        )

    def test_pipe_from_the_daemon_prints_span_trees_as_they_complete(self) -> None:
        # xray --local-sink - --otlp-address ... | python -m xraytwisted.view -
        xray_err, view_out, view_err = (self.workdir / n for n in ("xray.err", "out", "err"))
        with xray_err.open("wb") as err:
            xray = subprocess.Popen(
                [sys.executable, "-m", "xraytwisted", "--local-sink", "-", "-b", "127.0.0.1:0",
                 "-t", "127.0.0.1:0", "--otlp-address", "127.0.0.1:0"],
                env=clean_env(), cwd=self.workdir, stdout=subprocess.PIPE, stderr=err,
            )  # fmt: skip
        self.addCleanup(_kill, xray)
        with view_out.open("wb") as out, view_err.open("wb") as err:
            viewer = subprocess.Popen(
                [*VIEW, "-", "--settle", "0.2"], stdin=xray.stdout, stdout=out, stderr=err
            )
        self.addCleanup(_kill, viewer)
        assert xray.stdout is not None
        xray.stdout.close()
        pattern = r"Receiving OpenTelemetry spans \(OTLP/HTTP\) on http://[0-9.]+:(\d+)/"
        url = f"http://127.0.0.1:{wait_for(xray_err, pattern, xray).group(1)}/v1/traces"
        child = span(0x12, "price cart", 15, 25, parent=0x11)
        root = span(0x11, "POST /cart", 10, 105, kind=SERVER)
        for message in (request("checkout", child), request("checkout", root)):
            post = urllib.request.Request(
                url, message.SerializeToString(), {"Content-Type": "application/x-protobuf"}
            )
            with urllib.request.urlopen(post, timeout=10) as answer:
                self.assertEqual(answer.status, 200)
        # Printed while the daemon runs, once, as one tree: the child that came
        # first waited for its parent.
        wait_for(view_out, r"price cart", xray, viewer)
        for proc in (viewer, xray):
            proc.send_signal(signal.SIGINT)
        self.assertEqual(xray.wait(30), 0, _read(xray_err))
        self.assertEqual(viewer.wait(30), 0, _read(view_err))
        self.assertEqual(
            _read(view_out),
            "Trace 5f84c7a10123456789abcdef01234567  2020-10-12T21:16:17.010Z  95.000 ms  "
            "2 spans\n"
            "  +0.000 ms  POST /cart  95.000 ms  server span  service: checkout\n"
            "  +5.000 ms    price cart  10.000 ms  internal span\n"
            "\n"
            "1 trace; 0 documents; 2 OTLP spans\n",
        )

    def test_follow_a_growing_file(self) -> None:
        traces = self.workdir / "traces.jsonl"
        traces.write_text(segment("1-a", "first", 1.0, 2.0) + "\n")
        out, err = self.workdir / "out", self.workdir / "err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            viewer = subprocess.Popen(
                [*VIEW, "--follow", str(traces), "--settle", "0.1"], stdout=stdout, stderr=stderr
            )
        self.addCleanup(_kill, viewer)
        wait_for(out, r"Trace 1-a  ", viewer)
        with traces.open("a") as f:
            f.write(segment("1-b", "second", 3.0, 3.5) + "\n")
        wait_for(out, r"Trace 1-b  ", viewer)
        # Replaced (the sink starts a new file when the old one is moved away).
        traces.rename(self.workdir / "old.jsonl")
        traces.write_text(segment("1-c", "third", 4.0, 4.5) + "\n")
        wait_for(out, r"Trace 1-c  ", viewer)
        viewer.send_signal(signal.SIGINT)
        self.assertEqual(viewer.wait(30), 130)
        self.assertEqual(_read(err), "")
        self.assertTrue(_read(out).endswith("\n\n3 traces; 3 documents\n"), _read(out))
