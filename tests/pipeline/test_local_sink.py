"""The local sink: JSON Lines encoding, appends, and errors as Outcomes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.support.tempdirs import temp_path
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline import local_sink
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.local_sink import LocalSink, LocalSinkError, encode_line, is_json_object
from xraytwisted.pipeline.uploader import Outcome

SEGMENT = (
    b'{"id": "70de5b6f19ff9a0a", "name": "svc", "trace_id": '
    b'"1-581cf771-a006649127e371903a2de979", "start_time": 1478293361.271, '
    b'"end_time": 1478293361.449}'
)
OTLP = b"T1SCgoKCAoGEgRzdmMxEgA="


class EncodeTests(SynchronousTestCase):
    def test_object_is_written_exactly_as_received(self) -> None:
        self.assertEqual(encode_line(SEGMENT), SEGMENT + b"\n")

    def test_line_breaks_between_tokens_become_spaces(self) -> None:
        pretty = json.dumps(json.loads(SEGMENT), indent=2).encode().replace(b"\n", b"\r\n")
        line = encode_line(pretty)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))
        self.assertNotIn(b"\r", line)
        self.assertEqual(json.loads(line), json.loads(SEGMENT))

    def test_otlp_payload_is_wrapped(self) -> None:
        self.assertEqual(encode_line(OTLP), b'{"raw": "T1SCgoKCAoGEgRzdmMxEgA="}\n')

    def test_non_objects_are_wrapped(self) -> None:
        cases = {
            b"x": "x",
            b"42": "42",
            b"[1, 2]": "[1, 2]",
            b'"text"': '"text"',
            b'{"a": 1': '{"a": 1',  # truncated JSON
            b'{"a": 1}\n{"b": 2}': '{"a": 1}\n{"b": 2}',  # two documents in one body
            b'{"start_time": NaN}': '{"start_time": NaN}',  # not JSON outside Python
            b'{"a": Infinity}': '{"a": Infinity}',
            b"\xff\xfe{}": "\ufffd\ufffd{}",  # invalid UTF-8, as uploads replace it
        }
        for doc, raw in cases.items():
            line = encode_line(doc)
            self.assertEqual(line.count(b"\n"), 1, doc)
            self.assertEqual(json.loads(line), {"raw": raw}, doc)

    def test_deeply_nested_body_is_wrapped_not_an_exception(self) -> None:
        doc = b"[" * 100_000 + b"]" * 100_000
        self.assertFalse(is_json_object(doc))
        self.assertEqual(json.loads(encode_line(doc))["raw"], doc.decode())

    def test_unicode_is_kept(self) -> None:
        doc = '{"name": "caf\u00e9 \u2028 \U0001f600"}'.encode()
        self.assertEqual(encode_line(doc), doc + b"\n")
        self.assertEqual(
            encode_line("\u00e9t\u00e9".encode()), '{"raw": "\u00e9t\u00e9"}\n'.encode()
        )


class LocalSinkTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.dir = Path(temp_path(self)).resolve()
        self.dir.mkdir()
        self.path = self.dir / "traces.jsonl"

    def make(self, path: Path | str | None = None) -> LocalSink:
        sink = LocalSink(str(self.path if path is None else path), self.clock)
        self.addCleanup(sink.close)
        return sink

    def put(self, sink: LocalSink, *docs: bytes) -> Outcome:
        outcomes = []
        sink.put_trace_segments(list(docs)).addCallback(outcomes.append)
        self.assertEqual(len(outcomes), 1)  # fires at once, never fails
        return outcomes[0]

    def test_appends_one_line_per_document_visible_at_once(self) -> None:
        self.path.write_bytes(b'{"earlier": true}\n')
        sink = self.make()
        outcome = self.put(sink, SEGMENT, OTLP)
        self.assertEqual(outcome, Outcome(seconds=0.0))
        self.assertEqual(
            self.path.read_bytes(),
            b'{"earlier": true}\n' + SEGMENT + b"\n" + b'{"raw": "T1SCgoKCAoGEgRzdmMxEgA="}\n',
        )
        self.put(sink, b'{"n": 3}')
        self.assertEqual(self.path.read_bytes().splitlines()[-1], b'{"n": 3}')

    def test_relative_path_is_made_absolute(self) -> None:
        old = os.getcwd()
        os.chdir(self.dir)
        self.addCleanup(os.chdir, old)
        sink = self.make("rel.jsonl")
        self.assertEqual(sink.path, str(self.dir / "rel.jsonl"))

    def test_file_moved_away_is_recreated(self) -> None:
        sink = self.make()
        self.put(sink, b'{"n": 1}')
        moved = self.dir / "traces.jsonl.1"
        self.path.rename(moved)
        self.put(sink, b'{"n": 2}')
        self.assertEqual(moved.read_bytes(), b'{"n": 1}\n')
        self.assertEqual(self.path.read_bytes(), b'{"n": 2}\n')
        self.path.unlink()
        self.put(sink, b'{"n": 3}')
        self.assertEqual(self.path.read_bytes(), b'{"n": 3}\n')

    def test_cannot_open_is_a_clear_startup_error(self) -> None:
        missing = self.dir / "no-such-dir" / "traces.jsonl"
        with self.assertRaises(LocalSinkError) as caught:
            LocalSink(str(missing), self.clock)
        self.assertEqual(
            str(caught.exception),
            f"cannot open local sink file {missing}: No such file or directory; choose another "
            "path with --local-sink (or - for stdout) or fix the directory permissions",
        )

    def test_disk_full_is_a_retryable_outcome(self) -> None:
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full on this system")
        sink = self.make("/dev/full")
        outcome = self.put(sink, SEGMENT)
        assert outcome.error is not None
        self.assertTrue(outcome.error.retryable)
        self.assertFalse(outcome.error.throttled)
        self.assertEqual(outcome.error.error_class, "")  # not an X-Ray connection error
        self.assertEqual(
            outcome.error.message,
            "cannot write to local sink /dev/full: No space left on device (free disk space "
            "or fix permissions; the segments are kept and retried)",
        )

    def test_partial_write_is_undone_so_the_retry_leaves_whole_lines(self) -> None:
        sink = self.make()
        self.put(sink, b'{"n": 1}')
        real_write = os.write
        calls = []

        def short_then_full(fd: int, data: bytes | memoryview) -> int:
            calls.append(len(data))
            if len(calls) == 1:
                return real_write(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")

        self.patch(local_sink.os, "write", short_then_full)
        outcome = self.put(sink, b'{"n": 2}', b'{"n": 3}')
        self.assertIsNotNone(outcome.error)
        self.assertEqual(calls, [18, 13])
        self.assertEqual(self.path.read_bytes(), b'{"n": 1}\n')
        self.patch(local_sink.os, "write", real_write)
        self.assertIsNone(self.put(sink, b'{"n": 2}', b'{"n": 3}').error)
        self.assertEqual(self.path.read_bytes(), b'{"n": 1}\n{"n": 2}\n{"n": 3}\n')

    def test_stdout_partial_line_is_ended_before_the_next_batch(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        sink = LocalSink("-", self.clock, stdout_fd=write_end)
        self.addCleanup(sink.close)
        real_write = os.write

        def short_then_fail(fd: int, data: bytes | memoryview) -> int:
            if len(data) > 5:
                return real_write(fd, bytes(data[:5]))
            raise OSError(32, "Broken pipe")

        self.patch(local_sink.os, "write", short_then_fail)
        self.assertIsNotNone(self.put(sink, b'{"n": 1}').error)
        self.patch(local_sink.os, "write", real_write)
        self.assertIsNone(self.put(sink, b'{"n": 1}').error)
        self.assertEqual(os.read(read_end, 100), b'{"n":\n{"n": 1}\n')

    def test_stdout_is_written_and_not_closed(self) -> None:
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        sink = LocalSink("-", self.clock, stdout_fd=write_end)
        self.assertEqual(sink.path, "-")
        self.put(sink, SEGMENT)
        sink.close()
        os.write(write_end, b"still open")  # would raise if the sink had closed it
        self.assertEqual(os.read(read_end, 1000), SEGMENT + b"\nstill open")

    def test_closed_sink_reports_an_error(self) -> None:
        sink = self.make()
        sink.close()
        sink.close()  # twice is fine
        outcome = self.put(sink, SEGMENT)
        assert outcome.error is not None
        self.assertIn("the local sink is closed", outcome.error.message)
        self.assertFalse(self.path.read_bytes())

    def test_batcher_uses_it_like_the_uploader(self) -> None:
        sink = self.make()
        counters = Counters()
        buffer = SegmentBuffer(1024 * 1024, self.clock, counters)
        batcher = Batcher(buffer, sink.put_trace_segments, self.clock, counters)
        batcher.startService()
        docs = [b'{"n": %d}' % i for i in range(60)]
        for doc in docs:
            self.assertTrue(buffer.offer(doc))
        self.clock.advance(1.0)  # 50 went at once, the last 10 at their deadline
        self.assertEqual(self.path.read_bytes(), b"".join(d + b"\n" for d in docs))
        self.assertEqual((counters.sent, counters.batches_ok), (60, 2))
        stopped: list[None] = []
        batcher.stopService().addCallback(stopped.append)
        self.assertEqual(stopped, [None])
