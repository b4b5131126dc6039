"""Issue 6, "never lose an accepted segment": proofs with real processes.

Every test runs ``twistd -n xray`` (``tests.support.daemon``) against the fake
X-Ray endpoint (``tests.support.fake_sink``), both on 127.0.0.1, sends
segments with unique ids over UDP, and checks at the endpoint that every id
arrived (duplicates are allowed, counted and bounded):

1. an outage of 30 s (connections refused, then 503, then 429 throttling)
   while 1 000 segments/s of ~1 KB arrive for 40 s, with no spool: memory
   holds the backlog, every failure mode is retried, the log stays short and
   SIGTERM exits 0;
2. with a spool, ``kill -9`` during an outage: what reached the spool is
   sent by the next daemon on the same directory;
3. with a spool, SIGTERM during an outage: the daemon exits at once,
   writing what it still holds to the spool, and the next run sends it;
4. with a spool, a 3 MB memory budget and a slow endpoint: a burst larger
   than memory goes to disk instead of being dropped;
5. with a spool on a 256 KiB tmpfs that fills up during an outage: what the
   disk cannot take stays in memory, and every segment arrives.

Every wait is a bounded loop, and every process (daemon, endpoint, sender
thread) is stopped by a cleanup when a test fails.  Each test logs a
summary line (``no-loss ...``) to the trial log.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import HEADER, DaemonProcess, clean_env
from tests.support.disks import small_tmpfs
from tests.support.fake_sink import FakeSink, fake_credentials
from tests.support.tempdirs import temp_path
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.spool import Spool, inspect
from xraytwisted.pipeline.uploader import Outcome, UploadError

log = Logger()

_TCP_PORT = re.compile(r"Starting proxy http server on 127\.0\.0\.1:(\d+)")
FAILED = "Sending segment batch failed with"
KERNEL_DROPS = "The kernel dropped"
DROPPED = "Segment dropped"
LOST = "are lost"

# One segment document of 1 000 bytes; "%s" is its unique 16-hex-digit id.
_BODY = (
    b'{"id":"%s","trace_id":"1-5f84c7a1-6b4cdbb1a6b2b0a0e8a1c0f2","name":"no-loss",'
    b'"start_time":1700000000.5,"end_time":1700000001.25,"metadata":{"default":{"pad":"'
)
SEGMENT = _BODY + b"p" * (1000 - len(_BODY) + 2 - 16 - 4) + b'"}}}'


def segment(seg_id: str) -> bytes:
    """The datagram (header and ~1 KB document) for the segment ``seg_id``."""
    return HEADER + SEGMENT % seg_id.encode()


def make_ids(count: int) -> list[str]:
    """``count`` unique X-Ray style ids (16 hex digits), a random prefix per call."""
    prefix = random.getrandbits(32)
    return [f"{prefix:08x}{i:08x}" for i in range(count)]


class PacedSender(threading.Thread):
    """Sends one datagram per id to ``127.0.0.1:port``, ``rate`` per second, on schedule.

    The schedule is absolute (datagram *i* is due at ``start + i / rate``), so
    a late wake-up sends what is due at once instead of drifting; sleeping at
    least 2 ms keeps it cheap (a few datagrams per wake-up).  ``max_burst`` is
    the most datagrams sent in one wake-up: how late the sender ever was, in
    datagrams.  Call ``run`` directly to send from the calling thread.
    """

    def __init__(self, port: int, ids: Sequence[str], rate: float) -> None:
        super().__init__(name="no-loss-sender", daemon=True)
        self.port = port
        self.ids = ids
        self.rate = rate
        self.sent = 0
        self.elapsed = 0.0
        self.max_burst = 0
        self.error: BaseException | None = None
        self.started_at = 0.0
        self._go = threading.Event()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            self._send_all()
        except BaseException as e:  # reported by the test, not lost in the thread
            self.error = e
        finally:
            self._go.set()

    def _send_all(self) -> None:
        ids, rate, total = self.ids, self.rate, len(self.ids)
        target = ("127.0.0.1", self.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            start = self.started_at = time.monotonic()
            self._go.set()
            sent = 0
            while sent < total and not self._halt.is_set():
                due = min(total, int((time.monotonic() - start) * rate) + 1)
                self.max_burst = max(self.max_burst, due - sent)
                for i in range(sent, due):
                    s.sendto(segment(ids[i]), target)
                sent = self.sent = due
                wait = start + sent / rate - time.monotonic()
                if wait > 0:
                    time.sleep(max(wait, 0.002))
            self.elapsed = time.monotonic() - start

    def wait_started(self, timeout: float = 10) -> float:
        """When the first datagram went out (monotonic clock)."""
        if not self._go.wait(timeout) or self.error is not None:
            raise AssertionError(f"the sender did not start: {self.error!r}")
        return self.started_at

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join(10)


def send_paced(port: int, ids: Sequence[str], rate: float = 10_000) -> PacedSender:
    """Send every id from this thread (fast, but paced: the kernel buffer never fills)."""
    sender = PacedSender(port, ids, rate)
    sender.run()
    if sender.error is not None:
        raise sender.error
    return sender


def wait_until(
    predicate: Callable[[], object], timeout: float, describe: Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:g}s: {describe()}")
        time.sleep(0.05)


def sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def tcp_port(daemon: DaemonProcess) -> int:
    """The daemon's TCP port (sampling proxy, /metrics), from its log."""
    return int(daemon.wait_for_log(_TCP_PORT, 10).group(1))


def metrics(port: int) -> dict[str, float]:
    """The daemon's /metrics page: sample name (with labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def udp_drops(port: int) -> int | None:
    """The kernel's drop count (``sk_drops``) for the UDP socket bound to 127.0.0.1:port."""
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(path).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 12 and int(fields[1].rpartition(":")[2], 16) == port:
                return int(fields[-1])
    return None


def notable(daemon: DaemonProcess, limit: int = 60) -> str:
    """The daemon's log without the per-batch success lines (for failure messages)."""
    lines = [line for line in daemon.output().splitlines() if "Successfully sent" not in line]
    return "\n".join(lines[-limit:])


class NoLossTests(SynchronousTestCase):
    """Accepted segments reach X-Ray through outages, crashes, shutdowns and full memory."""

    def setUp(self) -> None:
        self.workdir = Path(temp_path(self)).resolve()
        self.workdir.mkdir(parents=True)

    # -- helpers ------------------------------------------------------------

    def start_sink(self, mode: str) -> FakeSink:
        sink = FakeSink(self.workdir / "sink", mode)
        self.addCleanup(sink.stop)
        return sink.start()

    def start_daemon(self, sink: FakeSink, name: str, *extra: str) -> DaemonProcess:
        daemon = DaemonProcess(
            ["--region", "us-east-1", "-e", sink.url, "-b", "127.0.0.1:0",
             "-t", "127.0.0.1:0", "--telemetry-interval", "0", *extra],
            clean_env(fake_credentials()),
            str(self.workdir / name),
        )  # fmt: skip
        self.addCleanup(daemon.kill)
        return daemon.start()

    def assert_all_arrived(
        self, sink: FakeSink, ids: Sequence[str], daemon: DaemonProcess, timeout: float
    ) -> dict[str, Any]:
        """Wait (bounded) until every id reached the endpoint; returns the endpoint's stats."""
        deadline = time.monotonic() + timeout
        stats = sink.stats()
        while stats["unique"] < len(ids) and time.monotonic() < deadline:
            time.sleep(0.2)
            stats = sink.stats()
        missing = set(ids) - sink.ids()
        if missing:
            self.fail(
                f"{len(missing)} of {len(ids)} segments never reached the endpoint "
                f"(e.g. {sorted(missing)[:5]}); endpoint: {stats}\n"
                f"kernel drops on the daemon's socket: {udp_drops(daemon.udp_port)}\n"
                f"daemon log:\n{notable(daemon)}"
            )
        return stats

    def assert_no_kernel_drops(self, daemon: DaemonProcess) -> None:
        """The kernel delivered every datagram to the daemon (read while it runs)."""
        drops = udp_drops(daemon.udp_port)
        self.assertIn(drops, (0, None), f"the kernel dropped {drops} datagrams (test setup)")
        self.assertNotIn(KERNEL_DROPS, daemon.output())

    def assert_no_loss_logged(self, daemon: DaemonProcess) -> None:
        out = daemon.output()
        for words in (DROPPED, LOST, "Traceback"):
            self.assertNotIn(words, out, notable(daemon))

    def spool_args(self, spool: Path, *extra: str) -> list[str]:
        return ["--spool-dir", str(spool), *extra]

    # -- 1. an outage, no spool ----------------------------------------------

    def test_outage_without_spool_loses_nothing(self) -> None:
        """40 s at 1 000 seg/s through 30 s of refused connections, 503s and 429s.

        Proves: with memory for the backlog (``-m 64``: 30 s x 1 000 x ~1 KB
        plus overhead is ~32 MB, so ``-m 20`` would spill over), every
        segment is retried until it is sent; the capped backoff (5 s, one
        probe at a time) makes attempts in each 10 s failure phase; failures
        are logged once per kind per 10 s, not per batch; SIGTERM exits 0.
        """
        rate, seconds = 1000, 40
        phases = [(3.0, "refuse"), (13.0, "503"), (23.0, "429"), (33.0, "ok")]
        sink = self.start_sink("ok")
        daemon = self.start_daemon(sink, "daemon", "-m", "64", "--shutdown-timeout", "5")
        port = tcp_port(daemon)
        ids = make_ids(rate * seconds)
        sender = PacedSender(daemon.udp_port, ids, rate)
        self.addCleanup(sender.halt)
        sender.start()
        start = sender.wait_started()
        at_switch: list[tuple[str, float, dict[str, int]]] = []
        for at, mode in phases:
            sleep_until(start + at)
            requests = dict(sink.stats()["requests"])
            sink.set_mode(mode)
            at_switch.append((mode, round(time.monotonic() - start, 2), requests))
        sender.join(seconds + 20)
        self.assertFalse(sender.is_alive(), "the sender is stuck")
        self.assertIsNone(sender.error)
        self.assertEqual(sender.sent, len(ids))
        # Accurate pacing: 40 s for 40 000, never half a second behind.
        self.assertLess(sender.elapsed, seconds + 1, "the sender fell behind its schedule")
        self.assertLess(sender.max_burst, rate // 2, "the sender stalled")

        stats = self.assert_all_arrived(sink, ids, daemon, timeout=60)
        self.assert_no_kernel_drops(daemon)
        # At least once: an upload cut off by "refuse" after the endpoint took
        # it is sent again.  At most the uploads in flight (8 x 50).
        self.assertLessEqual(stats["duplicates"], 400, stats)
        m = metrics(port)
        self.assertEqual(m["xray_daemon_segments_received_total"], len(ids))
        for counter in ("spillover", "lost", "rejected"):
            self.assertEqual(m[f"xray_daemon_segments_{counter}_total"], 0, counter)

        # Every failure mode was met, and retried.
        requests = stats["requests"]
        for mode in ("503", "429"):
            self.assertGreaterEqual(requests.get(mode, 0), 1, f"no upload while {mode}: {stats}")
        refused = m['xray_daemon_backend_errors_total{class="connection_refused"}']
        self.assertGreaterEqual(refused, 1)
        failed = m['xray_daemon_upload_batches_total{outcome="failed"}']

        # Logged per kind of failure per 10 s, not per batch.
        lines = [line for line in daemon.output().splitlines() if FAILED in line]
        for kind in ("connection refused", "HTTP 503", "HTTP 429"):
            self.assertTrue(any(kind in line for line in lines), (kind, lines))
        self.assertLessEqual(len(lines), 10, "\n".join(lines))
        self.assertLess(len(lines), failed, "\n".join(lines))

        stopping = time.monotonic()
        self.assertEqual(daemon.stop(timeout=20), 0, notable(daemon))
        stopped_in = time.monotonic() - stopping
        self.assert_no_loss_logged(daemon)
        log.info(
            "no-loss outage: {n} sent in {elapsed:.2f}s (max burst {burst}); endpoint {stats}; "
            "failed attempts {failed:g}, refused {refused:g}, failure log lines {lines}; "
            "switches {switches}; SIGTERM exit in {stopped:.2f}s",
            n=len(ids),
            elapsed=sender.elapsed,
            burst=sender.max_burst,
            stats=stats,
            failed=failed,
            refused=refused,
            lines=len(lines),
            switches=at_switch,
            stopped=stopped_in,
        )

    # -- 2. kill -9 with a spool ---------------------------------------------

    def test_spool_survives_kill_9(self) -> None:
        """Segments written to the spool survive ``kill -9``; the next daemon sends them.

        Proves: with ``--spool-after 1`` and the endpoint refusing, every
        accepted segment reaches the disk; after SIGKILL a new daemon on the
        same directory announces and sends all of them, with few duplicates.
        """
        count = 3000
        sink = self.start_sink("refuse")
        spool = self.workdir / "spool"
        first = self.start_daemon(sink, "first", *self.spool_args(spool, "--spool-after", "1"))
        ids = make_ids(count)
        send_paced(first.udp_port, ids)
        wait_until(
            lambda: inspect(str(spool)).pending_docs >= count,
            20,
            lambda: f"{inspect(str(spool))}\n{notable(first)}",
        )
        first.wait_for_log("writing batches to the spool", 5)
        self.assert_no_kernel_drops(first)
        assert first.process is not None
        os.kill(first.process.pid, signal.SIGKILL)
        self.assertEqual(first.wait(10), -signal.SIGKILL)
        on_disk = inspect(str(spool))
        self.assertGreaterEqual(on_disk.pending_docs, count, str(on_disk))

        sink.set_mode("ok")
        second = self.start_daemon(sink, "second", *self.spool_args(spool, "--spool-after", "1"))
        stats = self.assert_all_arrived(sink, ids, second, timeout=30)
        announced = second.wait_for_log(r"Sending (\d+) segments spooled by an earlier run", 5)
        self.assertGreaterEqual(int(announced.group(1)), count)
        self.assertIn("from an earlier run are waiting to be sent", second.output())
        self.assertLessEqual(stats["duplicates"], 150, stats)  # at most three batches
        self.assertEqual(second.stop(timeout=20), 0, notable(second))
        self.assert_no_loss_logged(second)
        self.assertEqual(inspect(str(spool)).pending_docs, 0)
        log.info(
            "no-loss kill -9: {n} sent, {disk} on disk at the kill; endpoint {stats}",
            n=count,
            disk=on_disk.pending_docs,
            stats=stats,
        )

    # -- 3. SIGTERM during an outage with a spool ----------------------------

    def test_spool_keeps_segments_over_a_graceful_shutdown_during_an_outage(self) -> None:
        """SIGTERM while X-Ray is unreachable: exit 0 at once, everything spooled, sent later.

        Proves: with a spool and an outage longer than ``--spool-after``, the
        daemon does not spend ``--shutdown-timeout`` (20 s) retrying: it
        writes what it holds in memory (here the last, partial batch) to the
        spool, says so, exits 0 within seconds, and the next run sends all.
        """
        count, timeout = 2025, 20  # 2025: the last batch (25) is still filling
        sink = self.start_sink("refuse")
        spool = self.workdir / "spool"
        args = self.spool_args(spool, "--spool-after", "1", "--shutdown-timeout", str(timeout))
        first = self.start_daemon(sink, "first", *args)
        port = tcp_port(first)
        ids = make_ids(count)
        send_paced(first.udp_port, ids[:1000])
        first.wait_for_log("Uploads have failed for", 15)
        send_paced(first.udp_port, ids[1000:])
        wait_until(
            lambda: metrics(port)["xray_daemon_segments_received_total"] >= count,
            10,
            lambda: notable(first),
        )
        self.assert_no_kernel_drops(first)
        stopping = time.monotonic()
        code = first.stop(timeout=timeout + 10)
        stopped_in = time.monotonic() - stopping
        self.assertEqual(code, 0, notable(first))
        self.assertLess(stopped_in, 5, f"took {stopped_in:.1f}s to stop\n{notable(first)}")
        written = re.search(
            r"Shutting down after \d+ seconds of failed uploads \(.*\): \d+ segments are in "
            r"the spool \S+ \((\d+) of them written while shutting down\)",
            first.output(),
        )
        self.assertIsNotNone(written, notable(first))
        self.assert_no_loss_logged(first)
        on_disk = inspect(str(spool))
        self.assertGreaterEqual(on_disk.pending_docs, count, str(on_disk))
        self.assertEqual(on_disk.problems, ())

        sink.set_mode("ok")
        second = self.start_daemon(sink, "second", *self.spool_args(spool))
        stats = self.assert_all_arrived(sink, ids, second, timeout=30)
        self.assertLessEqual(stats["duplicates"], 150, stats)
        self.assertEqual(second.stop(timeout=20), 0, notable(second))
        self.assert_no_loss_logged(second)
        log.info(
            "no-loss SIGTERM: {n} sent, stopped in {stopped:.2f}s, {written} written at "
            "shutdown, {disk} on disk; endpoint {stats}",
            n=count,
            stopped=stopped_in,
            written=written.group(1) if written else "?",
            disk=on_disk.pending_docs,
            stats=stats,
        )

    def test_sigterm_as_an_outage_begins_exits_once_everything_is_spooled(self) -> None:
        """SIGTERM, then the outage starts: stop as soon as everything is on disk.

        Proves: the shutdown drain meets an outage, retries until the outage
        is ``--spool-after`` (1 s) old, then writes every batch to the spool;
        with nothing left in memory or in flight it exits 0 then, instead of
        idling until ``--shutdown-timeout`` (15 s).  The endpoint stalls
        until the daemon is draining, then refuses, so the outage begins
        after SIGTERM, every time.

        Fails today: a daemon bug (``Batcher``, see
        ``FlushingBatcherStallTests`` below for the exact path).
        """
        count, spool_after, timeout = 2025, 1, 15
        sink = self.start_sink("stall")
        spool = self.workdir / "spool"
        args = self.spool_args(
            spool, "--spool-after", str(spool_after), "--shutdown-timeout", str(timeout)
        )
        daemon = self.start_daemon(sink, "daemon", *args)
        port = tcp_port(daemon)
        ids = make_ids(count)
        send_paced(daemon.udp_port, ids)
        wait_until(
            lambda: metrics(port)["xray_daemon_segments_received_total"] >= count,
            10,
            lambda: notable(daemon),
        )
        self.assert_no_kernel_drops(daemon)
        self.assertNotIn(FAILED, daemon.output())  # no outage yet: uploads hang
        stopping = time.monotonic()
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("Shutting down: sending", 5)
        sink.set_mode("refuse")  # aborts the hanging uploads: the outage starts now
        outage = time.monotonic()
        code = daemon.wait(timeout + 10)
        stopped_in = time.monotonic() - stopping
        self.assertEqual(code, 0, notable(daemon))
        self.assertIn("Uploads have failed for", daemon.output())
        self.assert_no_loss_logged(daemon)
        on_disk = inspect(str(spool))
        self.assertGreaterEqual(on_disk.pending_docs, count, str(on_disk))
        log.info(
            "no-loss SIGTERM early: stopped {stopped:.2f}s after SIGTERM, {after:.2f}s after "
            "the outage began, {disk} on disk",
            stopped=stopped_in,
            after=stopped_in - (outage - stopping),
            disk=on_disk.pending_docs,
        )
        self.assertLess(
            stopped_in,
            spool_after + 5,
            f"everything was on disk ~{spool_after}s into the outage, yet the daemon took "
            f"{stopped_in:.1f}s to stop (--shutdown-timeout {timeout})\n{notable(daemon)}",
        )

    # -- 4. memory full with a spool -----------------------------------------

    def test_full_memory_goes_to_the_spool_not_overboard(self) -> None:
        """A burst of ~6 MB into a 3 MB buffer with a slow endpoint: nothing is dropped.

        Proves: when the memory budget is spent, waiting batches move to the
        spool instead of new segments being refused (spillover stays 0,
        ``spooled`` grows, no "Segment dropped" line), uploads never failed
        (the memory path, not the outage path), and once the endpoint is
        fast again every segment arrives.
        """
        count = 6000
        sink = self.start_sink("ok")
        sink.set_mode("ok", delay=2.0)  # 8 in flight x 50 per 2 s: ~200 segments/s
        spool = self.workdir / "spool"
        daemon = self.start_daemon(sink, "daemon", "-m", "3", *self.spool_args(spool))
        port = tcp_port(daemon)
        ids = make_ids(count)
        send_paced(daemon.udp_port, ids, rate=6000)
        wait_until(
            lambda: metrics(port)["xray_daemon_segments_received_total"] >= count,
            10,
            lambda: notable(daemon),
        )
        self.assert_no_kernel_drops(daemon)
        full = metrics(port)
        self.assertEqual(full["xray_daemon_segments_spillover_total"], 0, notable(daemon))
        self.assertGreater(full["xray_daemon_segments_spooled_total"], 0, notable(daemon))
        self.assertIn("The memory buffer of 3 MB is full", daemon.output())

        sink.set_mode("ok")
        stats = self.assert_all_arrived(sink, ids, daemon, timeout=30)
        done = metrics(port)
        self.assertEqual(done["xray_daemon_segments_spillover_total"], 0)
        self.assertEqual(done["xray_daemon_segments_lost_total"], 0)
        self.assertEqual(done['xray_daemon_upload_batches_total{outcome="failed"}'], 0)
        self.assertEqual(stats["duplicates"], 0, stats)
        self.assertEqual(daemon.stop(timeout=20), 0, notable(daemon))
        self.assert_no_loss_logged(daemon)
        log.info(
            "no-loss memory full: {n} sent, {spooled:g} spooled; endpoint {stats}",
            n=count,
            spooled=full["xray_daemon_segments_spooled_total"],
            stats=stats,
        )

    # -- 5. the spool's disk fills up ------------------------------------------

    def test_a_spool_on_a_disk_that_fills_up_costs_nothing(self) -> None:
        """300 seg/s for 20 s while X-Ray refuses for 22 s; the spool has 256 KiB of disk.

        Proves (it lost 5 750 of 6 000 before): a batch the spool cannot
        write stays in memory; the daemon says once that the spool is
        unwritable (with the error), counts nothing as lost, and sends
        everything once X-Ray answers.
        """
        count, rate, outage = 6000, 300, 22.0
        spool = Path(small_tmpfs(self, "256k")) / "spool"
        sink = self.start_sink("refuse")
        daemon = self.start_daemon(sink, "daemon", *self.spool_args(spool, "--spool-after", "2"))
        port = tcp_port(daemon)
        ids = make_ids(count)
        sender = PacedSender(daemon.udp_port, ids, rate)
        self.addCleanup(sender.halt)
        sender.start()
        start = sender.wait_started()
        sleep_until(start + outage)
        full = metrics(port)
        sink.set_mode("ok")
        sender.join(count / rate + 20)
        self.assertEqual(sender.sent, count)
        stats = self.assert_all_arrived(sink, ids, daemon, timeout=60)
        self.assert_no_kernel_drops(daemon)
        out = daemon.output()
        self.assertEqual(
            out.count("unwritable: [Errno 28] No space left on device"), 1, notable(daemon)
        )
        self.assertIn("Uploads have failed for", out)
        done = metrics(port)
        for counter in ("lost", "spillover", "rejected"):
            self.assertEqual(done[f"xray_daemon_segments_{counter}_total"], 0, counter)
        self.assertEqual(daemon.stop(timeout=20), 0, notable(daemon))
        self.assert_no_loss_logged(daemon)
        log.info(
            "no-loss full spool disk: {n} sent, {spooled:g} spooled when X-Ray came back; "
            "endpoint {stats}",
            n=count,
            spooled=full["xray_daemon_segments_spooled_total"],
            stats=stats,
        )


class FlushingBatcherStallTests(SynchronousTestCase):
    """The shutdown stall behind ``test_sigterm_as_an_outage_begins_...``, on a Clock."""

    def test_stop_fires_once_the_outage_has_put_everything_on_disk(self) -> None:
        """A draining batcher that starts to spool must finish then, not at the deadline.

        Proves the exact path (fails today): SIGTERM (``stopService``) with
        uploads working; they start to fail; ``spool_after`` later the
        batcher's timer (``_wake`` -> ``_dispatch`` -> ``_should_spool``)
        writes every batch to the spool while nothing is in flight and the
        backoff pause has not ended.  ``_next_wake`` then finds nothing to
        wake for (a flushing batcher ignores ``spool.ready_docs``), so the
        timer is cancelled, and ``_check_stopped`` is never called: the
        stop Deferred fires only at the ``shutdown_timeout`` deadline.
        """
        clock = Clock()
        clock.advance(1000)
        counters = Counters()
        uploads: list[Deferred[Outcome]] = []

        def send(docs: Sequence[bytes]) -> Deferred[Outcome]:
            d: Deferred[Outcome] = Deferred()
            uploads.append(d)
            return d

        buffer = SegmentBuffer(10**8, clock, counters)
        spool = Spool.open(temp_path(self), 64 * 1024 * 1024, clock, counters)
        self.addCleanup(spool.close)
        batcher = Batcher(
            buffer, send, clock, counters,
            shutdown_timeout=20, spool=spool, spool_after=1, random=lambda: 1.0,
        )  # fmt: skip
        batcher.startService()
        for i in range(125):
            self.assertTrue(buffer.offer(b'{"id":"%016x"}' % i))
        stopped = batcher.stopService()
        refused = Outcome(0.0, error=UploadError("ConnectionRefusedCount", True, False, "refused"))
        for _ in range(30):  # 3 s in which every attempt is refused as soon as it is made
            for d in [d for d in uploads if not d.called]:
                d.callback(refused)
            clock.advance(0.1)
        self.assertEqual(spool.pending_docs, 125)
        self.assertEqual((batcher.in_flight, len(buffer), batcher.waiting_docs), ({}, 0, 125))
        self.assertTrue(
            stopped.called,
            "all 125 segments are on disk and nothing is in flight, yet the batcher still "
            f"waits for its shutdown deadline ({len(uploads)} attempts made)",
        )
