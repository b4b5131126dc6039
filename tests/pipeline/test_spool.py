"""The disk spool: order, acknowledgement, crashes, corruption, limits, locking."""

from __future__ import annotations

import errno
import itertools
import json
import os
import stat
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from tests.support.disks import small_tmpfs
from tests.support.tempdirs import temp_dir, temp_path
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.offload import thread_pool_runner
from xraytwisted.pipeline.spool import (
    HEADER_SIZE,
    MAGIC,
    PROBE_MAX,
    PROBE_MIN,
    Spool,
    SpooledBatch,
    SpoolError,
    SpoolWriteError,
    SyncErrors,
    decode,
    encode,
    inspect,
    parse_header,
)


def batch(n: int, size: int = 5, width: int = 20) -> list[bytes]:
    """``size`` documents that say which batch they belong to."""
    return [(b"b%05d-d%02d-" % (n, i)).ljust(width, b"x") for i in range(size)]


def record_size(docs: Sequence[bytes]) -> int:
    return HEADER_SIZE + 4 * len(docs) + sum(map(len, docs))


def batch_number(b: SpooledBatch) -> int:
    return int(b.docs[0][1:6])


class SpoolTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.join(temp_path(self), "spool")
        self.clock = Clock()
        self.counters = Counters()
        self.spools: list[Spool] = []

    def tearDown(self) -> None:
        for s in self.spools:
            s.close()

    def open(self, max_bytes: int = 10_000_000, file_bytes: int | None = 1000) -> Spool:
        s = Spool.open(self.dir, max_bytes, self.clock, self.counters, file_bytes=file_bytes)
        self.spools.append(s)
        return s

    def reopen(self, s: Spool, **kwargs: Any) -> Spool:
        s.close()
        return self.open(**kwargs)

    def take_all(self, s: Spool, ack: bool = True) -> list[int]:
        numbers: list[int] = []
        for _ in range(10_000):
            b = s.take()
            if b is None:
                return numbers
            numbers.append(batch_number(b))
            if ack:
                s.ack(b)
        raise AssertionError("take() never ran dry")

    def data_files(self) -> list[str]:
        return sorted(n for n in os.listdir(self.dir) if n.endswith(".xsp"))


class FormatTests(SynchronousTestCase):
    def test_record_round_trip(self) -> None:
        docs = [b"", b"a", b"\x00\xff" * 1000, b'{"id":"x"}']
        raw = b"".join(encode(docs))
        self.assertEqual(len(raw), record_size(docs))
        parsed = parse_header(raw)
        assert parsed is not None
        count, length, crc = parsed
        self.assertEqual((count, length), (4, len(raw) - HEADER_SIZE))
        self.assertEqual(decode(raw[HEADER_SIZE:], count, crc), docs)

    def test_corruption_is_detected(self) -> None:
        raw = bytearray(b"".join(encode([b"hello", b"world"])))
        for i in range(len(raw)):
            damaged = bytearray(raw)
            damaged[i] ^= 0x01
            parsed = parse_header(bytes(damaged))
            if parsed is None:
                self.assertLess(i, HEADER_SIZE)
                continue
            count, _, crc = parsed
            self.assertIsNone(decode(bytes(damaged[HEADER_SIZE:]), count, crc), i)

    def test_newer_format_is_refused_not_skipped(self) -> None:
        head = struct.pack("<4sBBHIII", MAGIC, 2, 1, 0, 0, 0, 0)
        raw = head + struct.pack("<I", zlib.crc32(head))
        self.assertRaises(SpoolError, parse_header, raw)


class OrderAndAckTests(SpoolTestCase):
    def test_take_in_append_order_across_files_and_delete_when_acked(self) -> None:
        s = self.open(file_bytes=500)
        for n in range(30):
            self.assertEqual(s.append(batch(n)), 0)
        self.assertGreater(len(self.data_files()), 5)  # it rotated
        self.assertEqual(s.pending_docs, 150)
        self.assertEqual(s.pending_bytes, 30 * record_size(batch(0)))
        self.assertEqual(self.take_all(s), list(range(30)))
        self.assertEqual((s.pending_docs, s.pending_bytes, s.disk_bytes), (0, 0, 0))
        self.assertEqual(self.data_files(), [])
        # Replayed is counted by the batcher, on delivery.
        self.assertEqual((self.counters.spooled, self.counters.replayed), (150, 0))
        self.assertEqual(self.counters.lost, 0)

    def test_documents_come_back_byte_for_byte(self) -> None:
        s = self.open()
        docs = [b"", b"\x00\n\xff", "é".encode() * 3, b"x" * 70_000]
        s.append(docs)
        b = s.take()
        assert b is not None
        self.assertEqual(b.docs, docs)
        self.assertEqual(len(b), 4)

    def test_empty_batch_is_not_stored(self) -> None:
        s = self.open()
        self.assertEqual(s.append([]), 0)
        self.assertEqual(self.data_files(), [])
        self.assertIsNone(s.take())

    def test_taken_batch_is_not_handed_out_twice_until_released(self) -> None:
        s = self.open()
        for n in range(3):
            s.append(batch(n))
        first = s.take()
        second = s.take()
        assert first is not None and second is not None
        self.assertEqual((batch_number(first), batch_number(second)), (0, 1))
        self.assertEqual(s.in_flight_docs, 10)
        self.assertEqual(s.ready_docs, 5)
        self.assertEqual(s.release(first), 0)
        again = s.take()
        assert again is not None
        self.assertEqual(batch_number(again), 0)  # released: oldest first
        self.assertEqual(again.docs, first.docs)
        s.ack(again)
        s.ack(second)
        self.assertEqual(self.take_all(s), [2])

    def test_double_ack_and_late_release_are_harmless(self) -> None:
        s = self.open()
        s.append(batch(0))
        s.append(batch(1))
        b = s.take()
        assert b is not None
        s.ack(b)
        s.ack(b)
        self.assertEqual(s.release(b), 0)
        self.assertEqual(s.pending_docs, 5)
        self.assertEqual(self.take_all(s), [1])

    def test_reopen_keeps_unacked_and_forgets_acked(self) -> None:
        s = self.open(file_bytes=400)
        for n in range(12):
            s.append(batch(n))
        for _ in range(5):
            b = s.take()
            assert b is not None
            s.ack(b)
        s.take()  # 5: sent but never acknowledged (the daemon died)
        s = self.reopen(s, file_bytes=400)
        self.assertEqual(s.pending_docs, 7 * 5)
        self.assertEqual(inspect(self.dir).pending_docs, 7 * 5)
        self.assertEqual(self.take_all(s), list(range(5, 12)))
        s = self.reopen(s)
        self.assertEqual(s.pending_docs, 0)
        self.assertEqual(self.data_files(), [])

    def test_ack_behind_a_batch_in_flight_is_resent_after_a_restart(self) -> None:
        # At least once: progress is durable only up to the oldest batch not
        # acknowledged, so a crash resends what was acknowledged after it.
        s = self.open()
        for n in range(4):
            s.append(batch(n))
        taken = [s.take() for _ in range(3)]
        for b in taken[1:]:
            assert b is not None
            s.ack(b)
        s = self.reopen(s)
        self.assertEqual(self.take_all(s), [0, 1, 2, 3])

    def test_acked_prefix_survives_a_crash_without_close(self) -> None:
        s = self.open()
        for n in range(4):
            s.append(batch(n))
        for _ in range(2):
            b = s.take()
            assert b is not None
            s.ack(b)
        # No close(), no flush(): as after kill -9 (the page cache keeps the writes).
        s._close_fds()
        self.spools.remove(s)
        s2 = self.open()
        self.assertEqual(self.take_all(s2), [2, 3])

    def test_appends_after_reopen_go_to_a_new_file(self) -> None:
        s = self.open()
        s.append(batch(0))
        s = self.reopen(s)
        s.append(batch(1))
        self.assertEqual(len(self.data_files()), 2)
        self.assertEqual(self.take_all(s), [0, 1])

    def test_directory_is_private(self) -> None:
        self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)


class CrashAndCorruptionTests(SpoolTestCase):
    def write_and_close(self, count: int, size: int = 5) -> str:
        s = self.open(file_bytes=None)
        for n in range(count):
            s.append(batch(n, size))
        s.close()
        self.spools.remove(s)
        [name] = self.data_files()
        return os.path.join(self.dir, name)

    def test_torn_tail_is_reported_cut_off_and_later_appends_are_fine(self) -> None:
        path = self.write_and_close(5)
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size - 10)  # the last record's write was interrupted
        with capturedLogs() as events:
            s = self.open()
        [problem] = s.problems
        self.assertEqual((problem.kind, problem.docs), ("torn tail", 5))
        self.assertEqual(problem.offset, 4 * record_size(batch(0)))
        self.assertEqual(self.counters.lost, 5)
        self.assertEqual(s.corrupt_docs, 5)
        self.assertEqual(s.pending_docs, 20)
        self.assertEqual(os.path.getsize(path), 4 * record_size(batch(0)))
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("ends in a record that was being written when the daemon", text)
        self.assertIn("5 segments in them are lost", text)
        s.append(batch(10))
        s = self.reopen(s)
        self.assertEqual(list(s.problems), [])  # reported once
        self.assertEqual(self.counters.lost, 5)
        self.assertEqual(self.take_all(s), [0, 1, 2, 3, 10])

    def test_torn_header_is_reported_with_unknown_count(self) -> None:
        path = self.write_and_close(3)
        with open(path, "ab") as f:
            f.write(MAGIC + b"\x01\x01")  # 6 bytes of the next header
        s = self.open()
        [problem] = s.problems
        self.assertEqual((problem.kind, problem.docs, problem.nbytes), ("torn tail", None, 6))
        self.assertIn("an unknown number of segments", str(problem))
        self.assertEqual(self.take_all(s), [0, 1, 2])

    def test_zeroed_tail_after_power_loss_is_a_torn_tail(self) -> None:
        path = self.write_and_close(3)
        with open(path, "ab") as f:
            f.write(b"\x00" * 4096)
        s = self.open()
        self.assertEqual([p.kind for p in s.problems], ["torn tail"])
        self.assertEqual(self.take_all(s), [0, 1, 2])

    def test_corrupt_payload_byte_skips_that_record_only(self) -> None:
        path = self.write_and_close(5)
        with open(path, "r+b") as f:
            f.seek(2 * record_size(batch(0)) + HEADER_SIZE + 30)
            f.write(b"!")
        s = self.open()
        self.assertEqual(s.pending_docs, 25)  # payloads are checked when read
        with capturedLogs() as events:
            self.assertEqual(self.take_all(s), [0, 1, 3, 4])
        [problem] = s.problems
        self.assertEqual(problem.kind, "corrupt record")
        self.assertEqual((problem.offset, problem.docs), (2 * record_size(batch(0)), 5))
        self.assertEqual(problem.detail, "checksum mismatch")
        self.assertEqual((self.counters.lost, s.corrupt_docs, s.pending_docs), (5, 5, 0))
        self.assertIn("corrupt record", " ".join(formatEvent(e) for e in events))

    def test_corrupt_header_byte_skips_that_record_only(self) -> None:
        path = self.write_and_close(5)
        with open(path, "r+b") as f:
            f.seek(2 * record_size(batch(0)) + 9)  # the count field
            f.write(b"\x7f")
        s = self.open()
        [problem] = s.problems
        self.assertEqual((problem.kind, problem.docs), ("corrupt record", None))
        self.assertEqual(problem.nbytes, record_size(batch(0)))
        self.assertEqual(s.pending_docs, 20)
        self.assertEqual(self.take_all(s), [0, 1, 3, 4])
        self.assertEqual(self.data_files(), [])

    def test_corruption_found_while_reading_is_counted_when_the_file_is_done(self) -> None:
        s = self.open(file_bytes=None)
        for n in range(4):
            s.append(batch(n))
        s.close()
        self.spools.remove(s)
        s = self.open(file_bytes=None)
        [name] = self.data_files()
        with open(os.path.join(self.dir, name), "r+b") as f:
            f.seek(record_size(batch(0)))  # the magic of record 1, after the scan
            f.write(b"JUNK")
        self.assertEqual(self.take_all(s), [0, 2, 3])
        self.assertEqual(self.counters.lost, 5)  # known once the file is finished
        self.assertEqual(s.pending_docs, 0)

    def test_unreadable_ack_file_resends_rather_than_loses(self) -> None:
        s = self.open(file_bytes=None)
        for n in range(3):
            s.append(batch(n))
        b = s.take()
        assert b is not None
        s.ack(b)
        s.close()
        self.spools.remove(s)
        [ack] = [n for n in os.listdir(self.dir) if n.endswith(".ack")]
        Path(self.dir, ack).write_bytes(b"garbage")
        with capturedLogs() as events:
            s = self.open()
        self.assertIn("will be sent again", " ".join(formatEvent(e) for e in events))
        self.assertEqual(self.take_all(s), [0, 1, 2])
        self.assertEqual(self.counters.lost, 0)

    def test_orphaned_ack_file_is_removed(self) -> None:
        os.makedirs(self.dir)
        Path(self.dir, "spool-0000000000000007.ack").write_bytes(b"x" * 16)
        Path(self.dir, "notes.txt").write_text("left alone")
        self.open()
        self.assertEqual(sorted(os.listdir(self.dir)), ["lock", "notes.txt"])

    def test_file_from_a_newer_daemon_refuses_to_open(self) -> None:
        os.makedirs(self.dir)
        head = struct.pack("<4sBBHIII", MAGIC, 9, 1, 0, 0, 0, 0)
        Path(self.dir, "spool-0000000000000001.xsp").write_bytes(
            head + struct.pack("<I", zlib.crc32(head))
        )
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn("newer version", str(e))
        # The failed open released the lock and changed nothing.
        os.remove(os.path.join(self.dir, "spool-0000000000000001.xsp"))
        self.open()

    def test_write_failure_hands_the_batch_back_and_leaves_no_partial_record(self) -> None:
        s = self.open()
        s.append(batch(0))
        real = os.writev

        def half_then_fail(fd: int, parts: Sequence[bytes]) -> int:
            os.write(fd, parts[0][:10])
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "writev", half_then_fail)
        with capturedLogs() as events:
            e = self.assertRaises(SpoolWriteError, s.append, batch(1))
        self.patch(os, "writev", real)
        self.assertTrue(e.disk)
        self.assertEqual(str(e), "[Errno 28] No space left on device")
        # Not lost: the caller still has it.  Nor counted as spooled.
        self.assertEqual((self.counters.lost, self.counters.spooled), (0, 5))
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("unwritable: [Errno 28] No space left on device; keeping batches in", text)
        self.clock.advance(1)  # the probe's first retry
        s.append(batch(2))
        s = self.reopen(s)
        self.assertEqual(list(s.problems), [])  # the partial record was cut off
        self.assertEqual(self.take_all(s), [0, 2])


_CHILD_NO_DESCRIPTORS = r"""
import errno, json, os, resource, sys
from twisted.internet.task import Clock
from twisted.logger import globalLogBeginner, textFileLogObserver
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.spool import Spool, SpoolWriteError

globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
clock, counters = Clock(), Counters()
# file_bytes=1: every batch is sealed at once, so every append opens a file.
spool = Spool.open(sys.argv[1], 10_000_000, clock, counters, file_bytes=1)
spool.append([b"first-%d" % i for i in range(5)])
result = {}
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
fillers = []
while True:  # take every descriptor left under the limit
    try:
        fillers.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as e:
        result["filled"] = e.errno == errno.EMFILE
        break
try:
    result["append"] = spool.append([b"second-%d" % i for i in range(5)])
except SpoolWriteError as e:
    result["append"] = str(e)
result["unwritable"] = spool.unwritable
result["take"] = None if (b := spool.take()) is None else len(b)
result["lost_while_out_of_descriptors"] = counters.lost
for fd in fillers:
    os.close(fd)
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
clock.advance(60)
taken = []
spool.append([b"third-%d" % i for i in range(5)])
while (b := spool.take()) is not None:
    taken.extend(d.decode() for d in b.docs)
    spool.ack(b)
spool.close()
result["taken"] = taken
result["lost"] = counters.lost
print(json.dumps(result))
"""


class UnwritableTests(SpoolTestCase):
    """A spool that cannot write hands batches back, says so once, and probes with backoff."""

    def test_the_disk_is_probed_with_backoff_on_the_clock(self) -> None:
        s = self.open()
        s.append(batch(0))
        attempts: list[float] = []
        real = os.writev

        def full(fd: int, parts: Sequence[bytes]) -> int:
            attempts.append(self.clock.seconds())
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(os, "writev", full)
        with capturedLogs() as events:
            for second in range(120):
                self.assertRaises(SpoolWriteError, s.append, batch(1))
                self.assertRaises(SpoolWriteError, s.append, batch(2))
                self.clock.advance(1)
                del second
            self.patch(os, "writev", real)
            self.assertFalse(s.accepting())
            self.clock.advance(PROBE_MAX)
            self.assertTrue(s.accepting())
            s.append(batch(3))
        # One try of the disk at a time, after 1, 2, 4, 8, 16, then every 30 s.
        gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
        self.assertEqual(gaps, [1, 2, 4, 8, 16, 30, 30])
        self.assertIsNone(s.unwritable)
        self.assertEqual(self.counters.lost, 0)
        text = [formatEvent(e) for e in events]
        self.assertEqual(len([t for t in text if "unwritable" in t]), 1, text)
        [back] = [t for t in text if "writable again" in t]
        self.assertIn("(failed writes meanwhile: 8)", back)
        self.assertEqual(self.take_all(s), [0, 3])

    def test_a_full_tmpfs_hands_batches_back_and_a_probe_finds_room_again(self) -> None:
        self.dir = os.path.join(small_tmpfs(self, "256k"), "spool")
        s = self.open(max_bytes=64 * 1024 * 1024, file_bytes=None)  # far more than the disk
        stored = 0
        with capturedLogs() as events:
            for n in range(100):
                try:
                    s.append(batch(n, 50, 1000))
                except SpoolWriteError as e:
                    failure = e
                    break
                stored += 1
            else:
                self.fail("a 256 KiB tmpfs took 5 MB")
            self.assertGreater(stored, 0)
            self.assertTrue(failure.disk)
            self.assertEqual(str(failure), "[Errno 28] No space left on device")
            self.assertEqual(self.counters.lost, 0)
            self.assertEqual((s.pending_docs, self.counters.spooled), (50 * stored, 50 * stored))
            # Sending what is on disk frees it; the next probe writes again.
            self.assertEqual(self.take_all(s), list(range(stored)))
            self.assertRaises(SpoolWriteError, s.append, batch(500, 50, 1000))  # not yet
            self.clock.advance(PROBE_MIN)
            s.append(batch(501, 50, 1000))
        self.assertIsNone(s.unwritable)
        self.assertEqual(self.take_all(s), [501])
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("Free disk space there", text)
        self.assertIn("is writable again", text)
        self.assertEqual(self.counters.lost, 0)

    def test_no_descriptors_left_costs_nothing(self) -> None:
        # In a child process: RLIMIT_NOFILE is the whole process's.
        directory = os.path.join(temp_dir(self), "spool")
        src = str(Path(__file__).resolve().parents[2] / "src")
        env = dict(os.environ, PYTHONPATH=src)
        done = subprocess.run(
            [sys.executable, "-c", _CHILD_NO_DESCRIPTORS, directory],
            capture_output=True, text=True, env=env, cwd=temp_dir(self), timeout=120,
            check=False,
        )  # fmt: skip
        self.assertEqual(done.returncode, 0, done.stderr)
        result = json.loads(done.stdout.splitlines()[-1])
        self.assertTrue(result["filled"], result)
        self.assertEqual(result["append"], "[Errno 24] Too many open files", result)
        self.assertEqual(result["unwritable"], "[Errno 24] Too many open files")
        self.assertIsNone(result["take"])  # cannot open the file now: later, not lost
        self.assertEqual(result["lost_while_out_of_descriptors"], 0, result)
        self.assertEqual(
            result["taken"], [f"first-{i}" for i in range(5)] + [f"third-{i}" for i in range(5)]
        )
        self.assertEqual(result["lost"], 0)
        self.assertIn("Raise the open-files limit", done.stdout + done.stderr)


class LimitTests(SpoolTestCase):
    def test_full_spool_drops_the_oldest_files_and_counts_them(self) -> None:
        size = record_size(batch(0))
        s = self.open(max_bytes=10 * size, file_bytes=2 * size)
        lost = 0
        with capturedLogs() as events:
            for n in range(25):
                lost += s.append(batch(n))
                self.assertLessEqual(s.disk_bytes, 10 * size)
        # Room for 10 records in files of 2: from the 11th append on, every
        # second append drops the oldest file (8 times, 16 batches).
        self.assertEqual(lost, 16 * 5)
        self.assertEqual((self.counters.lost, s.dropped_docs), (80, 80))
        self.assertEqual([p.kind for p in s.problems], ["spool full"] * 8)
        warnings = [formatEvent(e) for e in events if "is full" in formatEvent(e)]
        self.assertEqual(len(warnings), 8)
        self.assertIn("with 10 segments not yet sent; they are lost", warnings[0])
        self.assertIn("Raise --spool-max-mb", warnings[0])
        self.assertEqual(self.take_all(s), list(range(16, 25)))

    def test_batch_in_flight_in_a_dropped_file(self) -> None:
        size = record_size(batch(0))
        s = self.open(max_bytes=4 * size, file_bytes=2 * size)
        for n in range(4):
            s.append(batch(n))
        flying = [s.take(), s.take(), s.take()]  # 0, 1 (file 1) and 2 (file 2)
        lost = s.append(batch(4))  # drops file 1, whose batches are all out
        self.assertEqual(lost, 0)
        assert flying[0] is not None and flying[1] is not None
        s.ack(flying[0])  # it did get through: not lost
        self.assertEqual(s.release(flying[1]), 5)  # it did not: lost now
        self.assertEqual(self.counters.lost, 5)
        assert flying[2] is not None
        s.release(flying[2])
        self.assertEqual(self.take_all(s), [2, 3, 4])

    def test_open_descriptors_stay_few_however_many_files(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc/self/fd")
        before = len(os.listdir("/proc/self/fd"))
        s = self.open(file_bytes=record_size(batch(0)))
        for n in range(300):
            s.append(batch(n))
        self.assertEqual(len(self.data_files()), 300)
        self.assertLess(len(os.listdir("/proc/self/fd")) - before, 10)
        s = self.reopen(s, file_bytes=record_size(batch(0)))
        flying = [s.take() for _ in range(8)]
        self.assertLess(len(os.listdir("/proc/self/fd")) - before, 20)
        for b in flying:
            assert b is not None
            s.ack(b)
        self.assertEqual(len(self.take_all(s)), 292)

    def test_batch_larger_than_the_spool_is_handed_back(self) -> None:
        s = self.open(max_bytes=200)
        e = self.assertRaises(SpoolWriteError, s.append, [b"x" * 500])
        self.assertFalse(e.disk)  # never fits: not a reason to stop using the spool
        self.assertIn("larger than the whole spool", str(e))
        self.assertEqual((self.counters.lost, s.disk_bytes), (0, 0))
        self.assertIsNone(s.unwritable)
        s.append([b"y" * 10])

    def test_lower_limit_at_open_drops_the_oldest(self) -> None:
        size = record_size(batch(0))
        s = self.open(file_bytes=size)
        for n in range(6):
            s.append(batch(n))
        s = self.reopen(s, max_bytes=3 * size, file_bytes=size)
        self.assertEqual(self.counters.lost, 15)
        self.assertEqual(self.take_all(s), [3, 4, 5])


class LockAndFlushTests(SpoolTestCase):
    def test_second_opener_is_refused(self) -> None:
        s = self.open()
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn("is in use by another xray daemon", str(e))
        self.assertIn(f"(pid {os.getpid()})", str(e))
        self.assertIn("--spool-dir", str(e))
        s.close()
        self.open()  # free again

    def test_unusable_directory_is_one_clear_error(self) -> None:
        blocker = temp_path(self)
        Path(blocker).write_text("a file, not a directory")
        e = self.assertRaises(
            SpoolError, Spool.open, os.path.join(blocker, "spool"), 1000, self.clock
        )
        self.assertIn("cannot use spool directory", str(e))

    def test_no_fsync_per_batch_but_every_flush_interval(self) -> None:
        synced: list[int] = []
        real = os.fsync

        def counting(fd: int) -> None:
            synced.append(fd)
            real(fd)

        self.patch(os, "fsync", counting)
        s = self.open(file_bytes=None)
        self.clock.advance(5)
        synced.clear()
        for n in range(100):
            s.append(batch(n))
        self.assertEqual(synced, [])
        self.clock.advance(1.0)
        self.assertEqual(len(synced), 2)  # the data file and the directory
        synced.clear()
        self.clock.advance(10)
        self.assertEqual(synced, [])  # nothing new: nothing to do
        b = s.take()
        assert b is not None
        s.ack(b)
        self.clock.advance(1.0)
        self.assertEqual(len(synced), 2)  # the new .ack file and the directory
        synced.clear()
        s.append(batch(100))
        s.flush()
        self.assertEqual(len(synced), 1)

    def test_a_finished_file_is_synced_once(self) -> None:
        synced: list[int] = []
        self.patch(os, "fsync", synced.append)
        s = self.open(file_bytes=3 * record_size(batch(0)))
        for n in range(9):
            s.append(batch(n))
        self.assertEqual(len(synced), 3)

    def test_close_syncs_and_cancels_the_timer(self) -> None:
        synced: list[int] = []
        self.patch(os, "fsync", synced.append)
        s = self.open()
        s.append(batch(0))
        s.close()
        self.assertGreaterEqual(len(synced), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertRaises(SpoolError, s.append, batch(1))


class PrivateDirectoryTests(SynchronousTestCase):
    """Nobody else can make the daemon read or write through the spool directory."""

    def setUp(self) -> None:
        self.base = temp_dir(self)
        self.dir = os.path.join(self.base, "spool")
        self.victim = Path(self.base, "victim")
        self.victim.write_text("precious")
        self.clock = Clock()

    def open(self) -> Spool:
        s = Spool.open(self.dir, 1_000_000, self.clock)
        self.addCleanup(s.close)
        return s

    def test_a_directory_writable_by_others_is_refused(self) -> None:
        # The reproduction: a "lock" link to a victim file in a 0777 directory.
        os.mkdir(self.dir)
        os.chmod(self.dir, 0o777)
        os.symlink(self.victim, os.path.join(self.dir, "lock"))
        e = self.assertRaises(SpoolError, self.open)
        self.assertEqual(
            str(e),
            f"spool directory {self.dir} is writable by its group and all users (mode 0777), so "
            f"another user could plant files or links in it; run chmod 700 {self.dir} or use "
            "another directory",
        )
        self.assertEqual(self.victim.read_text(), "precious")

    def test_a_directory_writable_by_its_group_is_refused(self) -> None:
        os.mkdir(self.dir)
        os.chmod(self.dir, 0o770)
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn("is writable by its group (mode 0770)", str(e))

    def test_a_directory_of_another_user_is_refused(self) -> None:
        os.mkdir(self.dir, 0o700)
        try:
            os.chown(self.dir, 65534, -1)
        except PermissionError:
            raise SkipTest("changing a directory's owner needs root") from None
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn(
            f"belongs to uid 65534, not to this daemon's user (uid {os.geteuid()})", str(e)
        )

    def test_a_lock_link_is_never_followed(self) -> None:
        os.mkdir(self.dir, 0o700)
        os.symlink(self.victim, os.path.join(self.dir, "lock"))
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn("it is a symbolic link, which the spool never follows", str(e))
        self.assertEqual(self.victim.read_text(), "precious")

    def test_spool_file_links_are_never_followed(self) -> None:
        s = self.open()
        s.append([b"a", b"b"])
        s.close()
        [name] = [n for n in os.listdir(self.dir) if n.endswith(".xsp")]
        os.replace(os.path.join(self.dir, name), self.victim)
        os.symlink(self.victim, os.path.join(self.dir, name))
        e = self.assertRaises(SpoolError, self.open)
        self.assertIn(
            f"cannot read spool file {os.path.join(self.dir, name)}: it is a symbolic", str(e)
        )
        # Nor an acknowledgement file: it is written in place.
        os.remove(os.path.join(self.dir, name))
        s = self.open()
        s.append([b"c"])
        s.append([b"d"])  # so acknowledging "c" records progress rather than deleting the file
        [name] = [n for n in os.listdir(self.dir) if n.endswith(".xsp")]
        os.symlink(self.victim, os.path.join(self.dir, name[: -len(".xsp")] + ".ack"))
        b = s.take()
        assert b is not None
        with capturedLogs() as events:
            s.ack(b)
        self.assertEqual(self.victim.read_bytes()[:4], MAGIC)  # untouched: still the moved data
        self.assertIn("Could not record progress", " ".join(formatEvent(e) for e in events))

    def test_a_new_directory_is_private_whatever_the_umask(self) -> None:
        old = os.umask(0o277)
        try:
            self.open()
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)


class BackgroundSyncTests(SynchronousTestCase):
    """With a runner, fsync never runs on the event loop, and one job at a time."""

    def setUp(self) -> None:
        if not os.path.isdir("/proc/self/fd"):
            raise SkipTest("needs /proc/self/fd")
        self.dir = os.path.join(temp_dir(self), "spool")
        self.clock = Clock()
        self.jobs: list[tuple[Callable[[], SyncErrors], Deferred[SyncErrors]]] = []
        self.synced: list[int] = []  # inodes, in the order they were synced
        real = os.fsync

        def recording(fd: int) -> None:
            self.synced.append(os.fstat(fd).st_ino)
            real(fd)

        self.patch(os, "fsync", recording)

    def runner(self, call: Callable[[], SyncErrors]) -> Deferred[SyncErrors]:
        d: Deferred[SyncErrors] = Deferred()
        self.jobs.append((call, d))
        return d

    def run_jobs(self) -> None:
        while self.jobs:
            call, d = self.jobs.pop(0)
            d.callback(call())

    def open(self, file_bytes: int | None = None) -> Spool:
        s = Spool.open(
            self.dir, 10_000_000, self.clock, file_bytes=file_bytes, run_blocking=self.runner
        )
        self.addCleanup(s.close)
        return s

    def inode(self, *names: str) -> int:
        return os.stat(os.path.join(self.dir, *names)).st_ino

    def test_the_event_loop_only_hands_duplicated_descriptors_over(self) -> None:
        s = self.open()
        open_fds = len(os.listdir("/proc/self/fd"))
        for n in range(100):
            s.append(batch(n))
        self.clock.advance(1)
        self.assertEqual(self.synced, [])  # not on the event loop
        self.assertEqual(len(self.jobs), 1)
        # The disk is slow: while the job runs, no second one, no descriptors pile up.
        for n in range(100, 200):
            s.append(batch(n))
            self.clock.advance(0.1)
        self.assertEqual(len(self.jobs), 1)
        [data] = [n for n in os.listdir(self.dir) if n.endswith(".xsp")]
        self.run_jobs()
        self.assertEqual(sorted(self.synced), sorted([self.inode(data), self.inode()]))
        self.assertEqual(len(os.listdir("/proc/self/fd")), open_fds + 1)  # the write file only
        # What was written meanwhile is synced next time round.
        self.synced.clear()
        self.clock.advance(1)
        self.run_jobs()
        self.assertEqual(self.synced, [self.inode(data)])
        taken = 0
        while (b := s.take()) is not None:
            taken += 1
            s.ack(b)
        self.assertEqual(taken, 200)

    def test_a_finished_file_is_synced_and_closed_by_the_job(self) -> None:
        s = self.open(file_bytes=3 * record_size(batch(0)))
        open_fds = len(os.listdir("/proc/self/fd"))
        for n in range(3):
            s.append(batch(n))
        [data] = [n for n in os.listdir(self.dir) if n.endswith(".xsp")]
        self.assertEqual((self.synced, len(self.jobs)), ([], 1))
        self.run_jobs()
        self.assertIn(self.inode(data), self.synced)
        # The job closed the finished file (and its duplicate of the directory).
        self.assertEqual(len(os.listdir("/proc/self/fd")), open_fds)

    def test_close_syncs_at_once_whatever_is_running(self) -> None:
        s = self.open()
        s.append(batch(0))
        self.clock.advance(1)
        s.append(batch(1))
        s.close()
        self.assertNotEqual(self.synced, [])  # close does not wait for the job
        self.run_jobs()  # the job still owns (and closes) its duplicates
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(inspect(self.dir).pending_docs, 10)


class ThreadRunnerTests(TestCase):
    def test_runs_in_the_reactor_thread_pool_and_answers_on_the_reactor(self) -> None:
        from twisted.internet import reactor

        caller = threading.get_ident()
        ran_in: list[int] = []

        def call() -> SyncErrors:
            ran_in.append(threading.get_ident())
            return []

        d = thread_pool_runner(reactor)(call)  # type: ignore[arg-type]

        def check(result: SyncErrors) -> None:
            self.assertEqual(result, [])
            self.assertNotEqual(ran_in, [caller])
            self.assertEqual(threading.get_ident(), caller)

        return d.addCallback(check)


# ---------------------------------------------------------------------------
# Properties

# Large documents (up to ~70 KB, bigger than a UDP datagram) built by
# repetition: random bytes that long exhaust hypothesis's entropy budget.
large_doc = st.builds(
    lambda unit, n: unit * n, st.binary(min_size=1, max_size=8), st.integers(1, 9000)
)
docs_strategy = st.lists(st.one_of(st.binary(max_size=300), large_doc), max_size=8)
small_docs = st.lists(st.binary(max_size=200), min_size=1, max_size=6)


class PropertyTests(SynchronousTestCase):
    def fresh(self) -> str:
        return os.path.join(temp_path(self), "spool")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(docs_strategy, max_size=12), st.booleans())
    def test_round_trip(self, batches: list[list[bytes]], reopen: bool) -> None:
        directory = self.fresh()
        clock = Clock()
        s = Spool.open(directory, 50_000_000, clock, file_bytes=4096)
        try:
            for docs in batches:
                s.append(docs)
            if reopen:
                s.close()
                s = Spool.open(directory, 50_000_000, clock, file_bytes=4096)
            expected = [docs for docs in batches if docs]
            self.assertEqual(s.pending_docs, sum(map(len, expected)))
            got = []
            while (b := s.take()) is not None:
                got.append(b.docs)
                s.ack(b)
            self.assertEqual(got, expected)
            self.assertEqual(s.disk_bytes, 0)
        finally:
            s.close()

    @settings(max_examples=80, deadline=None)
    @given(
        st.lists(small_docs, min_size=1, max_size=10),
        st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=3),
        st.one_of(st.none(), st.integers(0, 10**6)),
    )
    def test_damage_never_crashes_and_costs_only_damaged_records(
        self,
        batches: list[list[bytes]],
        flips: list[tuple[int, int]],
        cut: int | None,
    ) -> None:
        # Each batch distinct, so "which ones came back" is well defined.
        batches = [[b"%d:" % i + docs[0], *docs[1:]] for i, docs in enumerate(batches)]
        directory = self.fresh()
        clock = Clock()
        s = Spool.open(directory, 50_000_000, clock, file_bytes=None)
        for docs in batches:
            s.append(docs)
        s.close()
        [name] = [n for n in os.listdir(directory) if n.endswith(".xsp")]
        path = os.path.join(directory, name)
        raw = bytearray(Path(path).read_bytes())
        bounds = []
        offset = 0
        for docs in batches:
            bounds.append((offset, offset + record_size(docs)))
            offset += record_size(docs)
        damaged: set[int] = set()
        for position, xor in flips:
            position %= len(raw)
            raw[position] ^= xor
            damaged.add(position)
        if cut is not None:
            cut %= len(raw) + 1
            del raw[cut:]
            damaged.update(range(cut, offset))
        Path(path).write_bytes(bytes(raw))
        counters = Counters()
        s = Spool.open(directory, 50_000_000, clock, counters)
        try:
            got = []
            while (b := s.take()) is not None:
                got.append(b.docs)
                s.ack(b)
        finally:
            s.close()
        intact = [
            docs
            for docs, (start, end) in zip(batches, bounds, strict=True)
            if not any(start <= p < end for p in damaged)
        ]
        # Nothing made up, nothing reordered, nothing undamaged lost.
        self.assertEqual([d for d in got if d in intact], intact)
        self.assertTrue(all(d in batches for d in got))
        self.assertLessEqual(counters.lost + sum(map(len, got)), sum(map(len, batches)))
        self.assertEqual(os.listdir(directory), ["lock"])


class SpoolMachine(RuleBasedStateMachine):
    """Random appends, takes, acks, releases and restarts against a simple model.

    Model: batches are numbered in append order.  ``take`` must hand out the
    lowest-numbered batch that is neither done nor out.  After a restart, a
    batch is done only if it and every earlier batch in its file were
    acknowledged (progress is a per-file prefix); all others come back.
    """

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.tmp = tempfile.mkdtemp(prefix="spool-machine-")
        self.dir = os.path.join(self.tmp, "spool")
        self.clock = Clock()
        self.spool = Spool.open(self.dir, 50_000_000, self.clock, file_bytes=300)
        self.appended = 0
        self.done: set[int] = set()  # acknowledged
        self.out: dict[int, SpooledBatch] = {}  # handed out, not acknowledged
        self.file_of: dict[int, int] = {}
        self.sizes: dict[int, int] = {}

    @rule(size=st.integers(1, 4))
    def append(self, size: int) -> None:
        self.spool.append(batch(self.appended, size))
        self.sizes[self.appended] = size
        self.appended += 1

    def expected_next(self) -> int | None:
        for n in range(self.appended):
            if n not in self.done and n not in self.out:
                return n
        return None

    @rule()
    def take(self) -> None:
        b = self.spool.take()
        expected = self.expected_next()
        if expected is None:
            assert b is None, b
            return
        assert b is not None and batch_number(b) == expected, (b, expected)
        self.out[expected] = b
        self.file_of[expected] = b.file_seq

    @precondition(lambda self: self.out)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from(sorted(self.out)))
        self.spool.ack(self.out.pop(n))
        self.done.add(n)

    @precondition(lambda self: self.out)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from(sorted(self.out)))
        assert self.spool.release(self.out.pop(n)) == 0

    @rule()
    def restart(self) -> None:
        self.spool.close()
        self.spool = Spool.open(self.dir, 50_000_000, self.clock, file_bytes=300)
        durable = set()
        for n in self.done:
            earlier = [m for m in range(n) if self.file_of.get(m) == self.file_of[n]]
            if all(m in self.done for m in earlier):
                durable.add(n)
        self.done = durable
        self.out = {}

    @invariant()
    def counts(self) -> None:
        not_done = sum(size for n, size in self.sizes.items() if n not in self.done)
        assert self.spool.pending_docs == not_done, (self.spool.pending_docs, not_done)
        assert self.spool.in_flight_docs == sum(len(b) for b in self.out.values())
        assert self.spool.ready_docs == not_done - self.spool.in_flight_docs

    def teardown(self) -> None:
        self.spool.close()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


class SpoolStateMachineTests(SynchronousTestCase):
    def test_random_operations_match_the_model(self) -> None:
        run_state_machine_as_test(
            SpoolMachine, settings=settings(max_examples=60, stateful_step_count=40, deadline=None)
        )
