"""Fuzzing the parsers, and blasting malformed input at a running daemon.

* hypothesis over ``header.split`` / ``header_is_valid`` and ``Ingest.datagram``
  (arbitrary bytes: never raises, verdicts follow the Go rules, fast path
  and slow path agree);
* hypothesis over the TCP segment stream (``ingest.tcp.SegmentStream``): how
  the bytes are cut into reads never changes the outcome, every record is
  accounted for, and with backpressure nothing is dropped;
* a real ``twistd xray`` process gets ~20 000 malformed, random and huge
  datagrams (and junk at its TCP port) and must keep serving, with a
  bounded log.  How fast and in how much memory is for the benchmarks
  (``benchmarks/``): on a busy CI host such limits only make this flaky.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import re
import socket
import time
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.support.buffers import CollectingBuffer
from tests.support.daemon import HEADER, DaemonProcess, clean_env
from tests.support.fake_sink import FakeSink, fake_credentials
from tests.support.tempdirs import temp_path
from xraytwisted.ingest.core import Ingest
from xraytwisted.ingest.header import Verdict, header_is_valid, split
from xraytwisted.ingest.stream import SegmentStream
from xraytwisted.observe.counters import Counters

GOOD_HEADERS = [b'{"format":"json","version":1}', b'{"format": "json", "version": 1}']

# Bytes that matter to the parsers, mixed with anything.
interesting = st.sampled_from(
    [b"\n", b"\r\n", b"{", b"}", b'"', b"\\", b"\x00", b"\xff", b"\xc3", b"\xe2\x80\xa8", b" "]
)
fragments = st.one_of(
    st.binary(max_size=40),
    interesting,
    st.sampled_from(
        [
            *GOOD_HEADERS,
            b'{"FORMAT":"JSON","VERSION":1}',
            b'{"format":"json","version":2}',
            b'{"format":"json","version":1.0}',
            b'{"format":"json","version":true}',
            b'{"format":"json","version":1}x',
            b'{"format":null,"version":1}',
            b'{"format":"json","format":"xml","version":1}',
            b'{"id":"0123456789abcdef","trace_id":"1-5f84c7a1-6b4cdbb1a6b2b0a0e8a1c0f2"}',
            b"[" * 3000,
            b'{"format":"json","version":1' + b"0" * 5000 + b"}",
            b"T1S\x00\x01",
        ]
    ),
)
datagrams = st.lists(fragments, max_size=12).map(b"".join)


# ---------------------------------------------------------------------------
# Datagrams


class HeaderFuzzTests(SynchronousTestCase):
    @settings(max_examples=400, deadline=None)
    @given(datagrams)
    @example(b"\n")
    @example(b'{"format":"json","version":1}\n')
    @example(b"[" * 100_000 + b"\nbody")
    def test_split_follows_the_rules_and_never_raises(self, data: bytes) -> None:
        verdict, body = split(data)
        newline = data.find(b"\n")
        if newline < 0:
            self.assertEqual(verdict, Verdict.MISSING_NEWLINE)
        elif newline == len(data) - 1:
            self.assertEqual(verdict, Verdict.EMPTY_BODY)
        elif header_is_valid(data[:newline]):
            self.assertEqual((verdict, body), (Verdict.OK, data[newline + 1 :]))
        else:
            self.assertEqual(verdict, Verdict.INVALID_HEADER)
        if verdict is not Verdict.OK:
            self.assertEqual(body, b"")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["format", "Format", "FORMAT", "version", "VERSION", "other"]),
                st.one_of(
                    st.sampled_from(["json", "JSON", "Json", "xml", ""]),
                    st.integers(-2, 3),
                    st.booleans(),
                    st.none(),
                    st.floats(allow_nan=False, allow_infinity=False),
                    st.lists(st.integers(), max_size=2),
                ),
            ),
            max_size=5,
        ),
        st.booleans(),
        st.sampled_from([(",", ":"), (", ", ": "), (" ,\t", " :\r\n")]),
    )
    def test_header_object_rules(
        self, pairs: list[tuple[str, object]], ascii_only: bool, separators: tuple[str, str]
    ) -> None:
        # The Go rules: keys fold case, the last value of the right type
        # wins, null and wrong types leave the field as it was.
        fmt, version = "", 0
        for key, value in pairs:
            if key.casefold() == "format" and isinstance(value, str):
                fmt = value
            if key.casefold() == "version" and type(value) is int:
                version = value
        expected = fmt.casefold() == "json" and version == 1
        inner = [
            json.dumps(k, ensure_ascii=ascii_only) + separators[1] + json.dumps(v) for k, v in pairs
        ]
        header = ("{" + separators[0].join(inner) + "}").encode()
        self.assertEqual(header_is_valid(header), expected, header)

    @settings(max_examples=400, deadline=None)
    @given(datagrams)
    def test_ingest_fast_path_agrees_with_the_rules(self, data: bytes) -> None:
        clock = Clock()
        counters = Counters()
        buffer = CollectingBuffer(10**9, clock, counters)
        accepted = Ingest(buffer, counters, clock).datagram(data)
        verdict, body = split(data)
        self.assertEqual(accepted, verdict is Verdict.OK)
        self.assertEqual(buffer.accepted, [body] if accepted else [])
        self.assertEqual((counters.received, counters.received_bytes), (1, len(data)))
        self.assertEqual(counters.rejected, 0 if accepted else 1)


# ---------------------------------------------------------------------------
# The TCP segment stream

line_content = st.one_of(
    st.sampled_from(GOOD_HEADERS),
    st.sampled_from([b"", b"\r", b"{", b'{"format":"json","version":2}', b"\xff\xfe"]),
    st.binary(max_size=30).map(lambda b: b.replace(b"\n", b"")),
    st.builds(lambda c, n: c * n, st.sampled_from([b"a", b"{", b"\x00"]), st.integers(0, 400)),
)
stream_lines = st.lists(line_content, max_size=30)


def feed(
    data: bytes,
    cuts: list[int],
    capacity: int = 10**9,
    max_line: int = 1024 * 1024,
    clean_close: bool = True,
) -> tuple[list[bytes], Counters, bool]:
    """Run ``data`` through a SegmentStream, cut into reads at ``cuts``.

    Returns (documents buffered, counters, whether the stream closed itself).
    Reads stop once the stream closes the connection, as the reactor would;
    with a small ``capacity``, batches are uploaded (released) whenever the
    stream waits for room.
    """
    clock = Clock()
    counters = Counters()
    buffer = CollectingBuffer(capacity, clock, counters)
    stream = SegmentStream(Ingest(buffer, counters, clock), max_line, clock, "fuzz")
    transport = StringTransport()
    stream.makeConnection(transport)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        if transport.disconnecting:
            break
        stream.dataReceived(data[start:end])
        for _ in range(10_000):  # "upload" until the stream reads again
            if not stream.paused or transport.disconnecting:
                break
            while len(buffer):
                buffer.release(buffer.pop())
            clock.advance(0)
        else:
            raise AssertionError("the stream never resumed")
    closed_itself = transport.disconnecting
    stream.connectionLost(Failure(ConnectionDone() if clean_close else ConnectionError()))
    return buffer.accepted, counters, closed_itself


class StreamFuzzTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(stream_lines, st.lists(st.integers(0, 20_000), max_size=12), st.booleans())
    def test_how_bytes_are_cut_into_reads_does_not_matter(
        self, lines: list[bytes], cuts: list[int], final_newline: bool
    ) -> None:
        data = b"\n".join(lines) + (b"\n" if final_newline and lines else b"")
        whole_docs, whole, _ = feed(data, [])
        cut_docs, cut, _ = feed(data, cuts)
        self.assertEqual(cut_docs, whole_docs)
        self.assertEqual(
            (cut.received, cut.rejected, cut.spillover),
            (whole.received, whole.rejected, whole.spillover),
        )
        # Every record counted once: buffered, rejected or dropped for room.
        self.assertEqual(whole.received, len(whole_docs) + whole.rejected + whole.spillover)

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(st.sampled_from(GOOD_HEADERS), st.binary(min_size=1, max_size=200)),
            max_size=25,
        ),
        st.lists(st.integers(0, 10_000), max_size=10),
    )
    def test_well_formed_records_all_arrive_even_through_backpressure(
        self, records: list[tuple[bytes, bytes]], cuts: list[int]
    ) -> None:
        records = [(h, body.replace(b"\n", b"_").replace(b"\r", b"_")) for h, body in records]
        data = b"".join(h + b"\n" + body + b"\n" for h, body in records)
        # A buffer with room for about two documents: the stream must pause
        # and resume rather than drop.
        docs, counters, closed = feed(data, cuts, capacity=600)
        self.assertFalse(closed)
        self.assertEqual(docs, [body for _, body in records])
        self.assertEqual((counters.received, counters.rejected), (len(records), 0))
        self.assertEqual(counters.spillover, 0)

    @settings(max_examples=200, deadline=None)
    @given(stream_lines, st.lists(st.integers(0, 20_000), max_size=12), st.booleans())
    def test_short_line_limit_and_abrupt_close_lose_nothing_silently(
        self, lines: list[bytes], cuts: list[int], clean: bool
    ) -> None:
        data = b"\n".join(lines)
        docs, counters, _ = feed(data, cuts, capacity=2000, max_line=64, clean_close=clean)
        self.assertTrue(all(len(d) <= 64 for d in docs))
        self.assertEqual(counters.received, len(docs) + counters.rejected + counters.spillover)


# ---------------------------------------------------------------------------
# A running daemon under a blast of bad input

_TCP_PORT = re.compile(r"Starting proxy http server on 127\.0\.0\.1:(\d+)")


def malformed_datagrams(rng: random.Random, count: int) -> list[bytes]:
    """A reproducible mix of everything a broken or hostile sender might send."""
    huge = rng.randbytes(65_000)
    makers = [
        lambda: rng.randbytes(rng.randrange(0, 2000)),  # no header at all
        lambda: HEADER[: rng.randrange(0, len(HEADER))],  # truncated header
        lambda: HEADER,  # header, empty body
        lambda: HEADER + huge[: rng.randrange(60_000, 65_000)],  # huge binary body
        lambda: HEADER + rng.randbytes(rng.randrange(1, 300)),  # invalid UTF-8 body
        lambda: b"\n" * rng.randrange(1, 5000),  # many newlines
        lambda: HEADER + b"\n" * rng.randrange(1, 5000),
        lambda: b'{"format":"json","version":2}\n{"id":"x"}',  # wrong version
        lambda: b"[" * 30_000 + b"\nbody",  # deep nesting for the JSON decoder
        lambda: b'{"format":"json","version":1' + b"9" * 20_000 + b"}\nbody",  # huge int
        lambda: b"\xff\xfe" + HEADER + b"body",  # invalid UTF-8 header
        lambda: b'{"FoRmAt":"JsOn","vErSiOn":1}\n' + rng.randbytes(50),  # odd but valid
    ]
    return [rng.choice(makers)() for _ in range(count)]


class BlastTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(temp_path(self)).resolve()
        self.sink = FakeSink(self.workdir / "sink").start()
        self.addCleanup(self.sink.stop)
        self.daemon = DaemonProcess(
            ["--region", "us-east-1", "-e", self.sink.url, "-b", "127.0.0.1:0",
             "-t", "127.0.0.1:0", "-m", "3", "--shutdown-timeout", "3"],
            clean_env(fake_credentials()),
            str(self.workdir / "daemon"),
        )  # fmt: skip
        self.addCleanup(self.daemon.kill)
        self.daemon.start()

    def test_keeps_serving_with_a_bounded_log(self) -> None:
        started = time.monotonic()
        daemon = self.daemon
        assert daemon.process is not None
        rng = random.Random(20240606)
        blast = malformed_datagrams(rng, 20_000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i, datagram in enumerate(blast):
                s.sendto(datagram, ("127.0.0.1", daemon.udp_port))
                if i % 200 == 199:
                    time.sleep(0.01)  # let it read most of them rather than the kernel drop them
        # Fails (with the output) rather than skipping the TCP part if the
        # line changes.
        tcp = daemon.wait_for_log(_TCP_PORT, timeout=10)
        self.blast_tcp(int(tcp.group(1)), rng)

        # Still serving: a good segment sent now gets uploaded.
        marker = f"{rng.getrandbits(64):016x}"
        body = json.dumps({"id": marker, "trace_id": "1-5f84c7a1-6b4cdbb1a6b2b0a0e8a1c0f2"})
        deadline = time.monotonic() + 20
        while marker not in self.sink.ids():
            self.assertLess(
                time.monotonic(), deadline, f"good segment never arrived\n{_tail(daemon)}"
            )
            daemon.send(body.encode())  # again: one copy may meet a full buffer
            time.sleep(0.5)
        self.assertIsNone(daemon.process.poll(), "the daemon died")
        # Junk with a valid header went all the way through (the daemon never
        # looks inside documents): the blast reached the upload path.
        self.assertGreater(self.sink.stats()["no_id"], 200)

        out = daemon.output()
        noisy = [line for line in out.splitlines() if "[Warn]" in line or "[Error]" in line]
        # Thousands of each kind of bad input; warnings are rate-limited to one
        # line per reason per 10 s.
        seconds = time.monotonic() - started
        per_reason = 2 + int(seconds // 10)
        for reason in ("Invalid header", "Missing header or segment", "Segment dropped"):
            lines = [line for line in noisy if reason in line]
            self.assertTrue(1 <= len(lines) <= per_reason, (reason, lines))
        self.assertLess(len(noisy), 10 * per_reason, "\n".join(noisy[:80]))
        self.assertNotIn("Traceback", out)
        self.assertLess(len(out), 512 * 1024)
        self.assertEqual(daemon.stop(), 0, _tail(daemon))

    def blast_tcp(self, port: int, rng: random.Random) -> None:
        """Junk and broken streams at the TCP port (when the daemon serves one)."""
        payloads = [
            rng.randbytes(5000),
            b"\x16\x03\x01\x02\x00" + rng.randbytes(500),  # a TLS hello
            HEADER + b"x" * (2 * 1024 * 1024),  # a line over the limit
            (HEADER + b'{"id":"a"}\n') * 200 + HEADER,  # ends inside a record
            b"{" + b"\n" * 10_000,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /GetSamplingRules HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n" + b"x" * 1000,
        ]
        for payload in payloads * 3:
            # (the daemon may close the connection on us: that is allowed)
            with (
                socket.create_connection(("127.0.0.1", port), timeout=2) as c,
                contextlib.suppress(OSError),
            ):
                c.sendall(payload)


def _tail(daemon: DaemonProcess) -> str:
    return daemon.output()[-4000:]
