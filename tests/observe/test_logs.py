"""Tests for xraytwisted.observe.logs: Go-daemon log format, levels, destinations, throttling."""

from __future__ import annotations

import datetime
import io
import logging
import os
import re
import stat
import sys
import threading
import time
import warnings
from typing import Any

from twisted.application import app, service
from twisted.internet.task import Clock
from twisted.logger import (
    ILogObserver,
    LegacyLogObserverWrapper,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
)
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.python.filepath import FilePath
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_path
from xraytwisted.observe import logs
from xraytwisted.observe.logs import (
    LEVELS,
    ROTATE_BYTES,
    TRACE_KEY,
    WIRE_LOGGERS,
    GoFormatObserver,
    LogSetupError,
    StartupWarning,
    StdlibHandler,
    Throttle,
    format_line,
    go_timestamp,
    open_destination,
    printable,
    render_message,
    route_library_logs,
    stdlib_level,
    suppressed_note,
    warnings_as_lines,
)

UTC = datetime.timezone.utc
# 2026-11-21T23:34:45Z
T0 = 1795304085.0
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)")


def collect(level: str = "dev") -> tuple[list[str], Logger, GoFormatObserver]:
    """An observer writing into a list, and a Logger publishing only to it."""
    lines: list[str] = []
    observer = GoFormatObserver(lines.append, level, tz=UTC)
    return lines, Logger(namespace="xray.test", observer=LogPublisher(observer)), observer


def emit_all(log: Logger) -> None:
    """One event at every level the daemon can print."""
    log.debug("trace line", **{TRACE_KEY: True})
    log.debug("debug line")
    log.info("info line")
    log.warn("warn line")
    log.error("error line")
    log.critical("critical line")


def messages(lines: list[str]) -> list[str]:
    """The "[Level] message" part of each line."""
    return [line.split(" ", 1)[1].rstrip("\n") for line in lines]


def raise_failure() -> Failure:
    try:
        1 / 0  # noqa: B018 - we want the exception
    except ZeroDivisionError:
        return Failure()
    raise AssertionError("unreachable")


class TimestampTests(SynchronousTestCase):
    def test_utc_uses_z(self) -> None:
        self.assertEqual(go_timestamp(T0, UTC), "2026-11-21T23:34:45Z")

    def test_zero_offset_zone_is_z_not_plus_zero(self) -> None:
        zone = datetime.timezone(datetime.timedelta(0), "GMT")
        self.assertEqual(go_timestamp(T0, zone), "2026-11-21T23:34:45Z")

    def test_positive_offset(self) -> None:
        zone = datetime.timezone(datetime.timedelta(hours=5, minutes=30))
        # Also crosses midnight into the next day.
        self.assertEqual(go_timestamp(T0, zone), "2026-11-22T05:04:45+05:30")

    def test_negative_offset(self) -> None:
        zone = datetime.timezone(-datetime.timedelta(hours=3, minutes=30))
        self.assertEqual(go_timestamp(T0, zone), "2026-11-21T20:04:45-03:30")

    def test_fraction_is_truncated_like_go(self) -> None:
        # fromtimestamp() alone would round .9999999 up to the next second.
        self.assertEqual(go_timestamp(59.9999999, UTC), "1970-01-01T00:00:59Z")
        self.assertEqual(go_timestamp(T0 + 0.9999996, UTC), "2026-11-21T23:34:45Z")
        self.assertEqual(go_timestamp(T0 + 0.5, UTC), "2026-11-21T23:34:45Z")

    def set_local_zone(self, spec: str) -> None:
        """Switch this process's local time zone for one test (POSIX TZ strings need no tzdata)."""
        old = os.environ.get("TZ")

        def restore() -> None:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)
        os.environ["TZ"] = spec
        time.tzset()

    def test_none_means_local_time(self) -> None:
        # POSIX sign convention: "XYZ+03:30" is 3h30 *behind* UTC.
        self.set_local_zone("XYZ+03:30")
        self.assertEqual(go_timestamp(T0), "2026-11-21T20:04:45-03:30")

    def test_none_local_utc_uses_z(self) -> None:
        self.set_local_zone("UTC0")
        self.assertEqual(go_timestamp(T0), "2026-11-21T23:34:45Z")


class FormatLineTests(SynchronousTestCase):
    def event(self, level: LogLevel, fmt: str | None, **kw: Any) -> LogEvent:
        event: LogEvent = {"log_level": level, "log_time": T0, "log_logger": None, **kw}
        if fmt is not None:
            event["log_format"] = fmt
        return event

    def test_exact_go_line(self) -> None:
        event = self.event(
            LogLevel.info,
            "Successfully sent batch of {count} segments ({seconds:.3f} seconds)",
            count=5,
            seconds=0.0021,
        )
        self.assertEqual(
            format_line(event, UTC),
            "2026-11-21T23:34:45Z [Info] Successfully sent batch of 5 segments (0.002 seconds)\n",
        )

    def test_exact_line_with_offset(self) -> None:
        zone = datetime.timezone(datetime.timedelta(hours=-8))
        self.assertEqual(
            format_line(self.event(LogLevel.warn, "slow"), zone),
            "2026-11-21T15:34:45-08:00 [Warn] slow\n",
        )

    def test_level_names(self) -> None:
        cases = [
            (LogLevel.debug, {TRACE_KEY: True}, "Trace"),
            (LogLevel.debug, {}, "Debug"),
            (LogLevel.info, {}, "Info"),
            (LogLevel.warn, {}, "Warn"),
            (LogLevel.error, {}, "Error"),
            (LogLevel.critical, {}, "Critical"),
        ]
        for level, extra, name in cases:
            line = format_line(self.event(level, "m", **extra), UTC)
            self.assertEqual(line, f"2026-11-21T23:34:45Z [{name}] m\n")

    def test_trace_key_only_marks_debug_events(self) -> None:
        line = format_line(self.event(LogLevel.info, "m", **{TRACE_KEY: True}), UTC)
        self.assertEqual(line, "2026-11-21T23:34:45Z [Info] m\n")

    def test_no_text_is_none(self) -> None:
        self.assertIsNone(format_line(self.event(LogLevel.info, None), UTC))
        self.assertIsNone(format_line(self.event(LogLevel.info, ""), UTC))

    def test_multi_line_message_kept(self) -> None:
        line = format_line(self.event(LogLevel.info, "first\n  second"), UTC)
        self.assertEqual(line, "2026-11-21T23:34:45Z [Info] first\n  second\n")

    def test_failure_traceback_follows_message(self) -> None:
        failure = raise_failure()
        line = format_line(self.event(LogLevel.critical, "boom", log_failure=failure), UTC)
        assert line is not None
        rows = line.split("\n")
        self.assertEqual(rows[0], "2026-11-21T23:34:45Z [Critical] boom")
        self.assertEqual(rows[1], "Traceback (most recent call last):")
        self.assertIn("ZeroDivisionError", rows[-2])
        # Exactly one terminating newline: no blank line after the traceback.
        self.assertEqual(rows[-1], "")
        self.assertNotEqual(rows[-2], "")
        self.assertEqual("\n".join(rows[1:-1]), failure.getTraceback().rstrip("\n"))

    def test_failure_without_message(self) -> None:
        line = format_line(self.event(LogLevel.error, None, log_failure=raise_failure()), UTC)
        assert line is not None
        self.assertTrue(line.startswith("2026-11-21T23:34:45Z [Error] Unhandled Error\nTraceback"))

    def test_missing_time_uses_now(self) -> None:
        event: LogEvent = {"log_level": LogLevel.info, "log_format": "x"}
        self.assertEqual(
            format_line(event, UTC, now=lambda: T0 + 1), "2026-11-21T23:34:46Z [Info] x\n"
        )

    def test_unformattable_event_still_logged(self) -> None:
        line = format_line(self.event(LogLevel.info, "{missing}"), UTC)
        assert line is not None
        self.assertTrue(line.startswith("2026-11-21T23:34:45Z [Info] Unable to format event"))


class LegacyEventTests(SynchronousTestCase):
    """Events from twisted.python.log (msg/err), as converted by Twisted itself."""

    def setUp(self) -> None:
        self.lines: list[str] = []
        publisher = LogPublisher(GoFormatObserver(self.lines.append, "dev", tz=UTC))
        # A private legacy publisher: same conversion as log.msg, without
        # sending errors to trial's global observer.
        self.legacy = legacy_log.LogPublisher(
            observerPublisher=publisher, publishPublisher=publisher
        )
        self.patch(time, "time", lambda: T0)  # log.msg stamps events with time.time()

    def test_msg_joins_arguments(self) -> None:
        self.legacy.msg("hello", "world", 3)
        self.assertEqual(self.lines, ["2026-11-21T23:34:45Z [Info] hello world 3\n"])

    def test_format_only(self) -> None:
        self.legacy.msg(format="%(count)d segments from %(who)s", count=4, who="udp")
        self.assertEqual(self.lines, ["2026-11-21T23:34:45Z [Info] 4 segments from udp\n"])

    def test_is_error_is_error_level(self) -> None:
        # Twisted maps isError to LogLevel.critical; the daemon calls it Error.
        self.legacy.msg("bad thing", isError=True)
        self.assertEqual(self.lines, ["2026-11-21T23:34:45Z [Error] bad thing\n"])

    def test_err_with_failure(self) -> None:
        failure = raise_failure()
        self.legacy.msg(failure=failure, why="while dividing", isError=1)
        [line] = self.lines
        rows = line.split("\n")
        self.assertEqual(rows[0], "2026-11-21T23:34:45Z [Error] while dividing")
        self.assertEqual(rows[1], "Traceback (most recent call last):")
        # The legacy text already holds the traceback; it must not appear twice.
        self.assertEqual(line.count("Traceback (most recent call last):"), 1)
        self.assertTrue(line.endswith("ZeroDivisionError: division by zero\n"))

    def test_std_log_level(self) -> None:
        self.legacy.msg("careful", logLevel=30)  # logging.WARNING
        self.assertEqual(self.lines, ["2026-11-21T23:34:45Z [Warn] careful\n"])

    def test_twisted_port_lines_are_debug(self) -> None:
        # What twisted.internet.udp/tcp log for each adopted port; the daemon
        # says the same in its own "Listening on ..." lines.
        for text in ("UDPIngest starting on 2000", "SniffingFactory starting on 2000",
                     "(UDP Port 2000 Closed)", "(TCP Port 2000 Closed)"):  # fmt: skip
            self.legacy.msg(text)
        self.legacy.msg("Site starting on 2000 now")  # not the port line: kept as it is
        self.assertEqual(
            self.lines,
            [
                "2026-11-21T23:34:45Z [Debug] UDPIngest starting on 2000\n",
                "2026-11-21T23:34:45Z [Debug] SniffingFactory starting on 2000\n",
                "2026-11-21T23:34:45Z [Debug] (UDP Port 2000 Closed)\n",
                "2026-11-21T23:34:45Z [Debug] (TCP Port 2000 Closed)\n",
                "2026-11-21T23:34:45Z [Info] Site starting on 2000 now\n",
            ],
        )

    def test_empty_message_not_written(self) -> None:
        self.legacy.msg()
        self.assertEqual(self.lines, [])

    def test_new_style_critical_stays_critical_after_legacy_wrapper(self) -> None:
        # A LegacyLogObserverWrapper earlier in the chain adds isError to the shared
        # event dict; that must not turn a genuine critical into an Error line.
        lines: list[str] = []
        legacy_seen: list[object] = []
        publisher = LogPublisher(
            LegacyLogObserverWrapper(legacy_seen.append),  # type: ignore[arg-type]
            GoFormatObserver(lines.append, "dev", tz=UTC),
        )
        Logger(observer=publisher).critical("really bad")
        self.assertEqual(len(legacy_seen), 1)
        self.assertEqual(messages(lines), ["[Critical] really bad"])


class _Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<thing>"


# (log_format, fields): render_message must give exactly what formatEvent gives.
RENDER_CASES: list[tuple[Any, dict[str, Any]]] = [
    ("Successfully sent batch of {n} segments ({s:.3f} seconds)", {"n": 50, "s": 0.0123}),
    ("plain text, no fields", {}),
    ("{thing.name} and {thing!r} and {d[key]} and {items[1]}",
     {"thing": _Thing(), "d": {"key": "v"}, "items": ["a", "b"]}),
    ("{{literal braces}} around {x}", {"x": 1}),
    ("{count:,} items, {ratio:.1%}, {word!s:>6}", {"count": 12345, "ratio": 0.25, "word": "ab"}),
    ("a call: {f()}", {"f": lambda: "called"}),
    ("missing {nothere}", {}),
    ("bad spec {x:q}", {"x": 1}),
    ("unbalanced {", {}),
    (None, {"log_text": "legacy text"}),
    (b"bytes format {x}", {"x": 1}),
]  # fmt: skip


class RenderMessageTests(SynchronousTestCase):
    def test_same_text_as_formatevent(self) -> None:
        for fmt, fields in RENDER_CASES:
            event: dict[str, Any] = {"log_format": fmt, **fields}
            if fmt is None:
                del event["log_format"]
            self.assertEqual(render_message(event), formatEvent(event), repr(fmt))

    def test_plain_formats_skip_the_python_formatter(self) -> None:
        # The fast path is the point: a plain format must not reach formatEvent.
        def fail(event: LogEvent) -> str:
            raise AssertionError("formatEvent called")

        self.patch(logs, "formatEvent", fail)
        event = {"log_format": "sent {n} ({s:.3f} seconds)", "n": 5, "s": 0.5}
        self.assertEqual(render_message(event), "sent 5 (0.500 seconds)")


class ObserverTests(SynchronousTestCase):
    def test_timestamps_follow_the_second(self) -> None:
        lines: list[str] = []
        observer = GoFormatObserver(lines.append, tz=UTC)
        for when in (T0, T0 + 0.999, T0 + 1.0, T0 + 61.5, T0 + 0.5):
            observer({"log_format": "x", "log_level": LogLevel.info, "log_time": when})
        self.assertEqual(
            [line.split(" ", 1)[0] for line in lines],
            [go_timestamp(w, UTC) for w in (T0, T0, T0 + 1, T0 + 61, T0)],
        )

    def test_provides_ilogobserver(self) -> None:
        observer = GoFormatObserver(lambda s: None)
        self.assertTrue(verifyObject(ILogObserver, observer))

    def test_level_filtering(self) -> None:
        everything = [
            "[Trace] trace line",
            "[Debug] debug line",
            "[Info] info line",
            "[Warn] warn line",
            "[Error] error line",
            "[Critical] critical line",
        ]
        expected = {
            "dev": everything,
            "debug": everything[1:],
            "info": everything[2:],
            "prod": everything[2:],
            "warn": everything[3:],
            "error": everything[4:],
        }
        self.assertEqual(set(expected), set(LEVELS))
        for name, shown in expected.items():
            lines, log, _ = collect(name)
            emit_all(log)
            self.assertEqual(messages(lines), shown, name)

    def test_default_is_prod(self) -> None:
        lines: list[str] = []
        log = Logger(observer=LogPublisher(GoFormatObserver(lines.append, tz=UTC)))
        emit_all(log)
        self.assertEqual(messages(lines)[0], "[Info] info line")
        self.assertEqual(len(lines), 4)

    def test_unknown_level(self) -> None:
        error = self.assertRaises(ValueError, GoFormatObserver, print, "verbose")
        self.assertIn("verbose", str(error))
        self.assertIn("prod", str(error))

    def test_flush_after_each_written_line(self) -> None:
        calls: list[str] = []
        observer = GoFormatObserver(
            lambda s: calls.append("write"), "info", flush=lambda: calls.append("flush"), tz=UTC
        )
        log = Logger(observer=LogPublisher(observer))
        log.info("a")
        log.debug("filtered")
        log.info("")  # no text: nothing written, nothing flushed
        log.warn("b")
        self.assertEqual(calls, ["write", "flush", "write", "flush"])

    def test_uses_given_zone(self) -> None:
        lines: list[str] = []
        zone = datetime.timezone(datetime.timedelta(hours=9))
        GoFormatObserver(lines.append, tz=zone)(
            {"log_level": LogLevel.info, "log_time": T0, "log_format": "hi"}
        )
        self.assertEqual(lines, ["2026-11-22T08:34:45+09:00 [Info] hi\n"])


class _ServiceSettingObserver(service.Service):
    """The wiring this module expects: the plugin's top service hands the observer
    to the Application twistd creates, before twistd starts logging."""

    def __init__(self, observer: GoFormatObserver) -> None:
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)


class _RecordingBeginner:
    """Stands in for globalLogBeginner: records observers and hooks them to the
    global publisher (where twistd's own messages go) without redirecting stdio."""

    def __init__(self, test: SynchronousTestCase) -> None:
        self.test = test
        self.observers: list[ILogObserver] = []

    def beginLoggingTo(self, observers: list[ILogObserver], **kw: object) -> None:
        from twisted.logger import globalLogPublisher

        for observer in observers:
            self.observers.append(observer)
            globalLogPublisher.addObserver(observer)
            self.test.addCleanup(globalLogPublisher.removeObserver, observer)


class TwistdWiringTests(SynchronousTestCase):
    def test_applogger_uses_observer_component(self) -> None:
        import twisted.logger

        lines: list[str] = []
        observer = GoFormatObserver(lines.append, "info")
        beginner = _RecordingBeginner(self)
        self.patch(twisted.logger, "globalLogBeginner", beginner)

        # What twistd's createOrGetApplication does with a plugin's service.
        application = service.Application("xray")
        _ServiceSettingObserver(observer).setServiceParent(application)
        applogger = app.AppLogger({})
        applogger.start(application)
        legacy_log.msg("legacy hello")
        applogger.stop()
        legacy_log.msg("after stop")  # the observer was removed by stop()

        # Used directly, not wrapped as a legacy observer.
        self.assertEqual(beginner.observers, [observer])
        ours = [line for line in lines if "/trial" not in line]
        self.assertEqual(len(ours), 4, ours)
        for line in ours:
            self.assertRegex(line, "^" + STAMP.pattern + r" \[Info\] [^\n]+\n$")
        self.assertRegex(ours[0], r"\[Info\] twistd \S+ \(.+ \d+\.\d+\.\d+\) starting up\.\n$")
        self.assertRegex(ours[1], r"\[Info\] reactor class: [\w.]+\.\n$")
        self.assertTrue(ours[2].endswith(" [Info] legacy hello\n"))
        self.assertTrue(ours[3].endswith(" [Info] Server Shut Down.\n"))


class DestinationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = FilePath(temp_path(self))
        self.dir.makedirs()

    def open(self, *segments: str, rotation: bool = True, rotate_bytes: int = 100) -> Any:
        path = self.dir.descendant(segments).path
        dest = open_destination(path, rotation, sys.stdout, rotate_bytes=rotate_bytes)
        self.addCleanup(dest.close)
        return dest

    def test_stdout_when_no_path(self) -> None:
        for path in (None, ""):
            stream = io.StringIO()
            dest = open_destination(path, True, stream)
            dest.write("one\n")
            dest.flush()
            dest.close()
            self.assertFalse(stream.closed)
            self.assertEqual(stream.getvalue(), "one\n")

    def test_stdout_is_the_stream_given(self) -> None:
        # twistd later replaces sys.stdout with a stream that logs; writing to
        # that from the observer would loop, so the original must be kept.
        stream = io.StringIO()
        dest = open_destination(None, False, stream)
        self.patch(sys, "stdout", io.StringIO())
        dest.write("kept\n")
        self.assertEqual(stream.getvalue(), "kept\n")

    def test_stdout_unencodable_escaped(self) -> None:
        raw = io.BytesIO()
        stream = io.TextIOWrapper(raw, encoding="ascii")
        dest = open_destination(None, False, stream)
        dest.write("caf\u00e9\n")
        dest.flush()
        self.assertEqual(raw.getvalue(), b"caf\\xe9\n")

    def test_rotation(self) -> None:
        dest = self.open("xray.log")
        log = self.dir.child("xray.log")
        line = "x" * 39 + "\n"  # 40 bytes: rotation comes before the 4th write
        for _ in range(3):
            dest.write(line)
        self.assertEqual(log.getContent(), line.encode() * 3)
        self.assertFalse(self.dir.child("xray.log.1").exists())
        dest.write("fourth\n")
        self.assertEqual(self.dir.child("xray.log.1").getContent(), line.encode() * 3)
        self.assertEqual(log.getContent(), b"fourth\n")
        # Many more rotations: still just one old file, holding the newest chunk.
        for i in range(20):
            dest.write(f"{i:038d}\n")
        self.assertEqual(sorted(self.dir.listdir()), ["xray.log", "xray.log.1"])
        self.assertEqual(log.getContent(), f"{18:038d}\n{19:038d}\n".encode())
        self.assertEqual(
            self.dir.child("xray.log.1").getContent(),
            "".join(f"{i:038d}\n" for i in (15, 16, 17)).encode(),
        )

    def test_rotation_counts_bytes_not_characters(self) -> None:
        dest = self.open("xray.log", rotate_bytes=10)
        dest.write("\u00e9" * 5 + "\n")  # 6 characters, 11 bytes
        dest.write("next\n")
        self.assertTrue(self.dir.child("xray.log.1").exists())

    def test_rotation_defaults(self) -> None:
        path = self.dir.child("xray.log").path
        dest = open_destination(path, True, sys.stdout)
        self.addCleanup(dest.close)
        sink = dest._sink  # type: ignore[attr-defined]
        self.assertIsInstance(sink, LogFile)
        self.assertEqual(ROTATE_BYTES, 50 * 1024 * 1024)
        self.assertEqual(sink.rotateLength, ROTATE_BYTES)
        self.assertEqual(sink.maxRotatedFiles, 1)

    def test_rotation_off_never_rotates(self) -> None:
        dest = self.open("xray.log", rotation=False, rotate_bytes=10)
        for i in range(50):
            dest.write(f"line {i}\n")
        self.assertEqual(self.dir.listdir(), ["xray.log"])
        self.assertEqual(
            self.dir.child("xray.log").getContent(),
            "".join(f"line {i}\n" for i in range(50)).encode(),
        )

    def test_appends_to_existing_file(self) -> None:
        for rotation in (True, False):
            name = f"xray-{rotation}.log"
            self.dir.child(name).setContent(b"old\n")
            dest = self.open(name, rotation=rotation, rotate_bytes=1000)
            dest.write("new\n")
            self.assertEqual(self.dir.child(name).getContent(), b"old\nnew\n")

    def test_each_write_reaches_the_os(self) -> None:
        for rotation in (True, False):
            name = f"xray-{rotation}.log"
            dest = self.open(name, rotation=rotation, rotate_bytes=1000)
            dest.write("visible\n")
            # Read through a separate handle, without flush() or close().
            self.assertEqual(self.dir.child(name).getContent(), b"visible\n")

    def test_observer_on_file(self) -> None:
        dest = self.open("xray.log", rotation=False)
        observer = GoFormatObserver(dest.write, "info", dest.flush, tz=UTC)
        observer({"log_level": LogLevel.info, "log_time": T0, "log_format": "caf\u00e9"})
        self.assertEqual(
            self.dir.child("xray.log").getContent(),
            "2026-11-21T23:34:45Z [Info] caf\u00e9\n".encode(),
        )

    def test_creates_parent_directories(self) -> None:
        # umask 0 so the test sees the mode we ask for, not the mask's.
        old = os.umask(0)
        self.addCleanup(os.umask, old)
        dest = self.open("a", "b", "xray.log")
        dest.write("hi\n")
        for leaf in (self.dir.child("a"), self.dir.descendant(["a", "b"])):
            self.assertTrue(leaf.isdir())
            self.assertEqual(stat.S_IMODE(os.stat(leaf.path).st_mode), 0o755, leaf.path)
        self.assertEqual(self.dir.descendant(["a", "b", "xray.log"]).getContent(), b"hi\n")

    def test_existing_directory_mode_untouched(self) -> None:
        self.dir.child("d").makedirs()
        os.chmod(self.dir.child("d").path, 0o700)
        self.open("d", "xray.log").write("x\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.dir.child("d").path).st_mode), 0o700)

    def test_relative_path(self) -> None:
        self.patch(os, "getcwd", lambda: self.dir.path)  # abspath() resolves against getcwd
        dest = open_destination("rel/xray.log", False, sys.stdout)
        self.addCleanup(dest.close)
        dest.write("r\n")
        self.assertEqual(self.dir.descendant(["rel", "xray.log"]).getContent(), b"r\n")

    def test_close_idempotent(self) -> None:
        for rotation in (True, False):
            dest = self.open(f"xray-{rotation}.log", rotation=rotation)
            dest.close()
            dest.close()
            self.assertRaises(ValueError, dest.write, "late\n")

    def assertSetupError(self, path: str, rotation: bool, *fragments: str) -> None:
        error = self.assertRaises(LogSetupError, open_destination, path, rotation, sys.stdout)
        message = str(error)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertIn("-f", message)

    def test_parent_is_a_file(self) -> None:
        # Deterministic even as root, unlike permission bits.
        blocker = self.dir.child("blocker")
        blocker.setContent(b"")
        for rotation in (True, False):
            self.assertSetupError(
                blocker.child("xray.log").path,
                rotation,
                f"cannot create log directory {blocker.path}: {blocker.path} exists and is not a"
                " directory; choose another path with -f",
            )
        self.assertEqual(blocker.getContent(), b"")

    def test_ancestor_is_a_file(self) -> None:
        blocker = self.dir.child("blocker")
        blocker.setContent(b"")
        sub = blocker.descendant(["sub", "deeper"])
        self.assertSetupError(
            sub.child("xray.log").path,
            True,
            f"cannot create log directory {sub.path}: {blocker.path} exists and is not a directory",
        )

    def test_mkdir_failure_message(self) -> None:
        def refuse(path: str, mode: int = 0o777) -> None:
            raise PermissionError(13, "Permission denied")

        self.patch(os, "mkdir", refuse)
        target = self.dir.descendant(["new", "xray.log"])
        self.assertSetupError(
            target.path,
            False,
            f"cannot create log directory {target.parent().path}: Permission denied; choose"
            " another path with -f or fix the directory permissions",
        )

    def test_path_is_a_directory(self) -> None:
        target = self.dir.child("xray.log")
        target.makedirs()
        for rotation in (True, False):
            self.assertSetupError(
                target.path, rotation, f"cannot open log file {target.path}: Is a directory"
            )

    def test_open_failure_message(self) -> None:
        def refuse(*args: object, **kw: object) -> None:
            raise PermissionError(13, "Permission denied")

        self.patch(logs, "LogFile", refuse)
        path = self.dir.child("xray.log").path
        self.assertSetupError(
            path,
            True,
            f"cannot open log file {path}: Permission denied; choose another path with -f "
            "or fix the directory permissions",
        )


class ThrottleTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = Throttle(self.clock, interval=10.0)

    def test_first_occurrence_logged(self) -> None:
        self.assertEqual(self.throttle.check("bad header"), 0)

    def test_suppression_counted(self) -> None:
        self.assertEqual(self.throttle.check("r"), 0)
        for _ in range(5):
            self.clock.advance(1)
            self.assertIsNone(self.throttle.check("r"))
        self.clock.advance(5)  # t=10: a full interval after the logged line
        self.assertEqual(self.throttle.check("r"), 5)
        # The count restarts with the new window.
        self.assertIsNone(self.throttle.check("r"))
        self.clock.advance(10)
        self.assertEqual(self.throttle.check("r"), 1)

    def test_interval_boundary(self) -> None:
        self.throttle.check("r")
        self.clock.advance(9.999)
        self.assertIsNone(self.throttle.check("r"))
        self.clock.advance(0.001)
        self.assertEqual(self.throttle.check("r"), 1)

    def test_window_starts_at_logged_line_not_last_suppressed(self) -> None:
        self.throttle.check("r")
        self.clock.advance(6)
        self.assertIsNone(self.throttle.check("r"))
        self.clock.advance(4)  # 10s after the logged line, 4s after the suppressed one
        self.assertEqual(self.throttle.check("r"), 1)

    def test_reasons_independent(self) -> None:
        self.assertEqual(self.throttle.check("a"), 0)
        self.assertIsNone(self.throttle.check("a"))
        self.assertEqual(self.throttle.check("b"), 0)
        self.assertIsNone(self.throttle.check("b"))
        self.assertIsNone(self.throttle.check("b"))
        self.clock.advance(10)
        self.assertEqual(self.throttle.check("a"), 1)
        self.assertEqual(self.throttle.check("b"), 2)

    def test_quiet_reason_logs_with_zero(self) -> None:
        self.throttle.check("r")
        self.clock.advance(3600)
        self.assertEqual(self.throttle.check("r"), 0)

    def test_custom_interval(self) -> None:
        throttle = Throttle(self.clock, interval=1.0)
        throttle.check("r")
        self.clock.advance(0.5)
        self.assertIsNone(throttle.check("r"))
        self.clock.advance(0.5)
        self.assertEqual(throttle.check("r"), 1)

    def test_clock_stepping_back_does_not_silence(self) -> None:
        self.clock.advance(1000)
        self.throttle.check("r")
        self.assertIsNone(self.throttle.check("r"))
        self.clock.rightNow = 500.0  # wall clock set back
        self.assertEqual(self.throttle.check("r"), 1)
        self.assertIsNone(self.throttle.check("r"))

    def test_reasons_from_outside_cannot_grow_the_table(self) -> None:
        # A hostile server sending a new error code every time.
        throttle = Throttle(self.clock, interval=10.0, max_reasons=4)
        for n in range(4):
            self.assertEqual(throttle.check(f"code {n}"), 0)
        self.assertEqual(throttle.check("code 4"), 0)  # the first of the shared key
        for n in range(5, 1000):
            self.assertIsNone(throttle.check(f"code {n}"))
        self.assertEqual(len(throttle), 5)
        self.assertIsNone(throttle.check("code 1"))  # known reasons keep their own key
        self.clock.advance(10)
        self.assertEqual(throttle.check("code 99999"), 995)  # the count survived

    def test_suppressed_note(self) -> None:
        self.assertEqual(suppressed_note(0), "")
        self.assertEqual(suppressed_note(7), " (7 more like this not logged)")


class PrintableTests(SynchronousTestCase):
    def test_plain_text_unchanged(self) -> None:
        self.assertEqual(printable(b'{"trace_id": "1-abc"}'), '{"trace_id": "1-abc"}')

    def test_empty(self) -> None:
        self.assertEqual(printable(b""), "")

    def test_escapes(self) -> None:
        self.assertEqual(printable(b"a\nb\r\t\x00"), "a\\nb\\r\\t\\x00")
        self.assertEqual(printable(b"\x1b\x7f\xff\\"), "\\x1b\\x7f\\xff\\\\")

    def test_quotes_not_doubled(self) -> None:
        self.assertEqual(printable(b'it\'s "x"'), 'it\'s "x"')
        self.assertEqual(printable(b"'"), "'")

    def test_result_is_one_line(self) -> None:
        text = printable(bytes(range(256)), limit=10_000)
        self.assertTrue(text.isprintable())
        self.assertNotIn("\n", text)

    def test_exact_limit_no_marker(self) -> None:
        self.assertEqual(printable(b"x" * 128), "x" * 128)

    def test_truncation_marker(self) -> None:
        self.assertEqual(printable(b"x" * 200), "x" * 128 + "...(+72 bytes)")
        self.assertEqual(printable(b"abcdef", limit=4), "abcd...(+2 bytes)")

    def test_limit_counts_escaped_characters_and_keeps_escapes_whole(self) -> None:
        # Each \xff is 4 characters: 2 fit in 10, a third would not.
        self.assertEqual(printable(b"\xff" * 5, limit=10), "\\xff\\xff...(+3 bytes)")

    def test_large_input_bounded(self) -> None:
        text = printable(b"\x00" * 10_000_000, limit=16)
        self.assertEqual(text, "\\x00" * 4 + "...(+9999996 bytes)")


class WarningsAsLinesTests(SynchronousTestCase):
    def test_each_warning_once_as_a_line(self) -> None:
        with warnings_as_lines() as lines:
            for _ in range(3):
                warnings.warn_explicit("odd input", UserWarning, "/lib/some/module.py", 12)
            warnings.warn(StartupWarning("the bundle holds odd certificates: fix it"), stacklevel=1)
            self.assertEqual(lines, [])  # filled when the block ends
        self.assertEqual(
            lines,
            [
                "Python warning while starting: UserWarning: odd input (module.py:12)",
                "the bundle holds odd certificates: fix it",
            ],
        )


class LibraryLogTests(SynchronousTestCase):
    """botocore's standard-library logging, routed into our log."""

    def setUp(self) -> None:
        for name in ("botocore", "", *WIRE_LOGGERS):
            logger = logging.getLogger(name)
            saved = (list(logger.handlers), logger.level, logger.propagate)
            self.addCleanup(self._restore, logger, saved)
        # Whatever reaches the root logger (its last resort prints raw on stderr).
        self.at_root: list[logging.LogRecord] = []
        root_handler = logging.Handler()
        root_handler.emit = self.at_root.append  # type: ignore[method-assign]
        logging.getLogger().addHandler(root_handler)
        self.handed_over: list[tuple[Any, ...]] = []
        self.events = capture_logs(self)

    @staticmethod
    def _restore(logger: logging.Logger, saved: tuple[list[logging.Handler], int, bool]) -> None:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]

    def call_from_thread(self, f: Any, *args: Any) -> None:
        self.handed_over.append((f, *args))

    def lines(self) -> list[str]:
        out = []
        for e in self.events:
            line = format_line(e)
            assert line is not None
            out.append(line.split(" ", 1)[1])  # without the timestamp
        return out

    def test_levels(self) -> None:
        table = [
            (logging.DEBUG, LogLevel.debug),
            (5, LogLevel.debug),
            (logging.INFO, LogLevel.info),
            (logging.WARNING, LogLevel.warn),
            (35, LogLevel.warn),
            (logging.ERROR, LogLevel.error),
            (logging.CRITICAL, LogLevel.critical),
            (99, LogLevel.critical),
        ]
        for levelno, expected in table:
            self.assertIs(stdlib_level(levelno), expected, levelno)

    def test_warnings_and_up_come_out_in_our_format_and_not_raw(self) -> None:
        route_library_logs("prod", self.call_from_thread)
        chain = logging.getLogger("botocore.credentials")
        chain.debug("Looking for credentials via: %s", "env")
        chain.warning("Refreshing temporary credentials failed during %s", "advisory refresh")
        logging.getLogger("botocore.utils").error("Caught retryable error")
        self.assertEqual(
            self.lines(),
            [
                "[Warn] botocore.credentials: Refreshing temporary credentials failed during "
                "advisory refresh\n",
                "[Error] botocore.utils: Caught retryable error\n",
            ],
        )
        self.assertEqual(self.events[0]["log_namespace"], "botocore.credentials")
        self.assertEqual((self.at_root, self.handed_over), ([], []))

    def test_debug_lines_with_log_level_debug_and_routing_twice_adds_nothing(self) -> None:
        route_library_logs("prod", self.call_from_thread)
        route_library_logs("debug", self.call_from_thread)
        ours = [h for h in logging.getLogger("botocore").handlers if isinstance(h, StdlibHandler)]
        self.assertEqual(len(ours), 1)  # (botocore adds a NullHandler of its own on import)
        logging.getLogger("botocore.credentials").debug("Looking for credentials via: %s", "env")
        self.assertEqual(
            self.lines(), ["[Debug] botocore.credentials: Looking for credentials via: env\n"]
        )

    def test_wire_loggers_stay_quiet_at_debug(self) -> None:
        # botocore logs each STS response body (keys, session token) and each
        # signed request at Debug: -l debug must not write them.
        route_library_logs("debug", self.call_from_thread)
        logging.getLogger("botocore.parsers").debug("Response body: %s", b"<SecretAccessKey>")
        logging.getLogger("botocore.endpoint").debug("Sending http request: %s", "token")
        logging.getLogger("botocore.auth").debug("CanonicalRequest: %s", "x-amz-security-token")
        logging.getLogger("botocore.parsers").warning("Response could not be parsed")
        logging.getLogger("botocore.credentials").debug("Found credentials via %s", "assume-role")
        self.assertEqual(
            self.lines(),
            [
                "[Warn] botocore.parsers: Response could not be parsed\n",
                "[Debug] botocore.credentials: Found credentials via assume-role\n",
            ],
        )

    def test_records_from_other_threads_are_handed_to_the_reactor_thread(self) -> None:
        route_library_logs("prod", self.call_from_thread)
        worker = threading.Thread(
            target=logging.getLogger("botocore.credentials").warning, args=("from a thread",)
        )
        worker.start()
        worker.join()
        self.assertEqual(self.events, [])  # not written from the lookup's thread
        (call,) = self.handed_over
        call[0](*call[1:])
        self.assertEqual(self.lines(), ["[Warn] botocore.credentials: from a thread\n"])
