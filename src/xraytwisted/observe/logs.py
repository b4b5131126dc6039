"""Go-daemon-compatible logging on top of Twisted's logging system.

The Go X-Ray daemon logs through seelog as
``%Date(2006-01-02T15:04:05Z07:00) [%Level] %Msg%n``; users grep for these
lines, so :func:`format_line` reproduces that format exactly.  Everything in
the process (twistd, Twisted, our code, legacy ``twisted.python.log`` calls,
redirected stdout/stderr) goes through one :class:`GoFormatObserver`.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Protocol, TextIO

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

__all__ = [
    "CRITICAL",
    "DEBUG",
    "ERROR",
    "INFO",
    "LEVELS",
    "LEVEL_NAMES",
    "ROTATE_BYTES",
    "TRACE",
    "TRACE_KEY",
    "WARN",
    "GoFormatObserver",
    "LogDestination",
    "LogSetupError",
    "StartupWarning",
    "StdlibHandler",
    "Throttle",
    "event_level",
    "format_line",
    "go_timestamp",
    "open_destination",
    "printable",
    "route_library_logs",
    "stdlib_level",
    "suppressed_note",
    "threshold",
    "warnings_as_lines",
]

# seelog's numeric levels; a line is shown when its level >= the threshold.
TRACE, DEBUG, INFO, WARN, ERROR, CRITICAL = range(6)

# Index = numeric level; the spelling seelog's %Level prints.
LEVEL_NAMES: tuple[str, ...] = ("Trace", "Debug", "Info", "Warn", "Error", "Critical")

# The Go daemon's user-facing names (-l / Logging.LogLevel).  Read-only so the
# module keeps no mutable state.
LEVELS: Mapping[str, int] = MappingProxyType(
    {"dev": TRACE, "debug": DEBUG, "info": INFO, "warn": WARN, "error": ERROR, "prod": INFO}
)

TRACE_KEY = "xray_trace"

ROTATE_BYTES = 50 * 1024 * 1024

_TWISTED_LEVELS: Mapping[LogLevel, int] = MappingProxyType(
    {
        LogLevel.debug: DEBUG,
        LogLevel.info: INFO,
        LogLevel.warn: WARN,
        LogLevel.error: ERROR,
        LogLevel.critical: CRITICAL,
    }
)


# Twisted's own lines for the ports the daemon adopts ("UDPIngest starting on
# 2000", "(UDP Port 2000 Closed)"): they repeat our "Listening on ..." lines
# in words no Go daemon user knows, so they are shown at debug only.
_PORT_CHATTER = re.compile(r"\S+ starting on \d+|\((UDP|TCP|Unix) Port \S+ Closed\)")


def threshold(level: str) -> int:
    """The numeric threshold for a user level name; ValueError if unknown."""
    try:
        return LEVELS[level]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None


def go_timestamp(when: float, tz: datetime.tzinfo | None = None) -> str:
    """Format ``when`` like Go's ``2006-01-02T15:04:05Z07:00`` (tz None = local time)."""
    # Go truncates to the second; datetime.fromtimestamp would round
    # microseconds and could show x.9999999 as the next second.
    seconds = math.floor(when)
    utc = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    moment = utc.astimezone(tz) if tz is not None else utc.astimezone()
    offset = moment.utcoffset() or datetime.timedelta(0)
    total = int(offset.total_seconds())
    if total == 0:
        suffix = "Z"
    else:
        sign = "-" if total < 0 else "+"
        # Go's Z07:00 prints hours and minutes only; seconds are dropped.
        hours, rest = divmod(abs(total), 3600)
        suffix = f"{sign}{hours:02d}:{rest // 60:02d}"
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + suffix


def event_level(event: LogEvent) -> int:
    """The seelog level of a Twisted event."""
    # Legacy log.err()/log.msg(isError=1) events are turned into
    # LogLevel.critical by publishToNewObserver; they are ordinary errors.  New-
    # style events always carry log_logger, which tells the two apart even after
    # a LegacyLogObserverWrapper has added isError to a shared event dict.
    if event.get("isError") and "log_logger" not in event and "logLevel" not in event:
        return ERROR
    level = _TWISTED_LEVELS.get(event.get("log_level", LogLevel.info), INFO)
    if level == DEBUG and event.get(TRACE_KEY):
        return TRACE
    if (
        level == INFO
        and event.get("log_namespace") == "log_legacy"
        and _PORT_CHATTER.fullmatch(str(event.get("log_text", "")))
    ):
        return DEBUG
    return level


def _traceback(failure: object) -> str:
    if not isinstance(failure, Failure):
        return f"(not a Failure: {failure!r})"
    try:
        return failure.getTraceback()
    except Exception as e:  # never lose the log line over a broken traceback
        return f"(unable to obtain traceback: {e!r})"


def render_message(event: LogEvent) -> str:
    """The event's text, as twisted.logger's ``formatEvent`` renders it.

    ``formatEvent`` walks the format string with ``string.Formatter`` in
    Python, to support its ``{name()}`` call syntax; ``str.format_map`` does
    the same lookups (``{name}``, ``{name.attr}``, ``{name[key]}``, specs and
    conversions) in C, several times faster.  Formats that call, or that
    ``format_map`` cannot render (a missing key, say), go to ``formatEvent``,
    which also says in the text what went wrong.
    """
    fmt = event.get("log_format")
    # A flattened event (one that crossed a thread as text) renders from its
    # flattened values: formatEvent knows how.
    if isinstance(fmt, str) and "()" not in fmt and "log_flattened" not in event:
        try:
            return fmt.format_map(event)
        except BaseException:  # as broad as formatEvent's own catch
            pass
    return formatEvent(event)


def format_line(
    event: LogEvent,
    tz: datetime.tzinfo | None = None,
    *,
    now: Callable[[], float] = time.time,
    stamp: Callable[[float], str] | None = None,
) -> str | None:
    """``"<ts> [<Level>] <message>\\n"``, or None if the event has no text.

    ``now`` only supplies the time for (rare) events without ``log_time``;
    ``stamp`` formats the time (default: :func:`go_timestamp` in ``tz``).
    """
    message = render_message(event).rstrip("\n")
    failure = event.get("log_failure")
    if failure is not None:
        # Same header legacy log.err() uses when no reason was given.
        message = (message or "Unhandled Error") + "\n" + _traceback(failure).rstrip("\n")
    if not message:
        return None
    when = event.get("log_time")
    if not isinstance(when, (int, float)):
        when = now()
    name = LEVEL_NAMES[event_level(event)]
    when_text = stamp(when) if stamp is not None else go_timestamp(when, tz)
    return f"{when_text} [{name}] {message}\n"


@implementer(ILogObserver)
class GoFormatObserver:
    """An ILogObserver writing Go-daemon-format lines for events at or above ``level``."""

    def __init__(
        self,
        write: Callable[[str], object],
        level: str = "prod",
        flush: Callable[[], object] | None = None,
        tz: datetime.tzinfo | None = None,
    ) -> None:
        self._write = write
        self._threshold = threshold(level)
        self._flush = flush
        self._tz = tz
        # Lines come in bursts within a second: format each second once.
        self._stamped: tuple[int | None, str] = (None, "")

    def __call__(self, event: LogEvent) -> None:
        # Filter before formatting: suppressed debug events cost almost nothing.
        if event_level(event) < self._threshold:
            return
        line = format_line(event, self._tz, stamp=self._timestamp)
        if line is None:
            return
        self._write(line)
        if self._flush is not None:
            self._flush()

    def _timestamp(self, when: float) -> str:
        second = math.floor(when)
        cached_second, text = self._stamped
        if second != cached_second:
            text = go_timestamp(second, self._tz)
            self._stamped = (second, text)
        return text


class LogDestination(Protocol):
    """Where formatted lines go."""

    def write(self, line: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class LogSetupError(Exception):
    """The log destination could not be set up; the message is for the user."""


class _StreamDestination:
    """Lines to an already-open text stream (stdout), which we do not own."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, line: str) -> None:
        try:
            self._stream.write(line)
        except UnicodeEncodeError:
            # e.g. an ASCII-only stdout: escape rather than drop the line.
            encoding = self._stream.encoding or "ascii"
            self._stream.write(line.encode(encoding, "backslashreplace").decode(encoding))

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        # Only flush: stdout belongs to the process, not to the logger.
        self._stream.flush()


class _BinarySink(Protocol):
    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> object: ...

    def close(self) -> object: ...


class _FileDestination:
    """Lines to an unbuffered binary file (plain append file or LogFile)."""

    def __init__(self, sink: _BinarySink) -> None:
        self._sink = sink
        self._closed = False

    def write(self, line: str) -> None:
        if self._closed:
            # One error type for both sinks (a closed LogFile gives AttributeError).
            raise ValueError("write to a closed log destination")
        # Encode here so LogFile counts bytes, not characters, toward rotation;
        # backslashreplace keeps lone surrogates (odd filenames) from raising.
        self._sink.write(line.encode("utf-8", "backslashreplace"))

    def flush(self) -> None:
        self._sink.flush()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sink.close()


_ADVICE = "choose another path with -f or fix the directory permissions"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def _make_directories(directory: str) -> None:
    """Create ``directory`` and missing ancestors, each with mode 0o755 (before umask)."""
    # os.makedirs applies `mode` to the last directory only; intermediate ones
    # would get 0o777 & ~umask, so create each level ourselves.
    missing: list[str] = []
    current = directory
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o755)
        except FileExistsError:
            # A regular file in the way (or a race we lost to another creator).
            if not os.path.isdir(each):
                raise LogSetupError(
                    f"cannot create log directory {directory}: {each} exists and is not a "
                    f"directory; {_ADVICE}"
                ) from None
        except OSError as e:
            raise LogSetupError(
                f"cannot create log directory {each}: {_reason(e)}; {_ADVICE}"
            ) from e


def open_destination(
    path: str | None,
    rotation: bool,
    stdout: TextIO,
    *,
    rotate_bytes: int = ROTATE_BYTES,
) -> LogDestination:
    """Open where log lines go: ``stdout`` if ``path`` is None or empty, else a file.

    With ``rotation`` the file is moved to ``<path>.1`` once it holds
    ``rotate_bytes`` (checked before each write), replacing any older
    ``<path>.1``; without it the file is only appended to.
    """
    if not path:
        # The Go daemon's LogPath default "" also means the console.
        return _StreamDestination(stdout)
    full = os.path.abspath(path)
    directory, name = os.path.split(full)
    _make_directories(directory)
    try:
        if rotation:
            # LogFile opens unbuffered ("rb+", 0): every write reaches the OS.
            sink: _BinarySink = LogFile(
                name, directory, rotateLength=rotate_bytes, maxRotatedFiles=1
            )
        else:
            sink = open(full, "ab", buffering=0)  # noqa: SIM115 - owned by the destination
    except OSError as e:
        raise LogSetupError(f"cannot open log file {full}: {_reason(e)}; {_ADVICE}") from e
    return _FileDestination(sink)


class Throttle:
    """At most one log line per reason per ``interval`` seconds, counting what was suppressed.

    Used for bad-input warnings (a local sender can flood the log otherwise).
    ``check`` returns how many occurrences were suppressed since the last
    line: the caller must put that number in the line it logs, or it is gone.
    The table holds at most ``max_reasons`` reasons; further ones share
    ``OTHER``, so reasons that come from outside (error codes a server
    sends) cannot grow it without bound.
    """

    OTHER = "(other)"

    def __init__(self, clock: IReactorTime, interval: float = 10.0, max_reasons: int = 64) -> None:
        self._clock = clock
        self._interval = interval
        self._max_reasons = max_reasons
        # reason -> (time of the last logged line, occurrences suppressed since)
        self._state: dict[str, tuple[float, int]] = {}

    def check(self, reason: str) -> int | None:
        """None: suppress (and count) this occurrence; n: log now, n were suppressed."""
        now = self._clock.seconds()
        state = self._state
        previous = state.get(reason)
        if previous is None and len(state) >= self._max_reasons:
            reason = self.OTHER
            previous = state.get(reason)
        if previous is not None:
            last, suppressed = previous
            # now < last: the wall clock stepped back; don't go quiet until it catches up.
            if last <= now < last + self._interval:
                state[reason] = (last, suppressed + 1)
                return None
            state[reason] = (now, 0)
            return suppressed
        state[reason] = (now, 0)
        return 0

    def __len__(self) -> int:
        """How many reasons are tracked (at most ``max_reasons`` + 1)."""
        return len(self._state)


def suppressed_note(suppressed: int) -> str:
    """What to append to a throttled line: how many like it were not logged ("" if none)."""
    return f" ({suppressed} more like this not logged)" if suppressed else ""


def _escape(byte: int) -> str:
    return repr(bytes([byte]))[2:-1]


# Immutable lookup table: byte -> its escaped form as repr(bytes) shows it.
_ESCAPES: tuple[str, ...] = tuple(_escape(b) for b in range(256))


def printable(data: bytes, limit: int = 128) -> str:
    """``data`` escaped like ``repr(bytes)`` without ``b''``, at most ``limit`` characters.

    If it does not fit, the shown prefix is followed by ``...(+N bytes)``, N
    being the number of input bytes left out.
    """
    pieces: list[str] = []
    used = 0
    shown = 0
    # Every byte escapes to at least one character, so only the first `limit`
    # bytes can matter: cost stays bounded however large the input is.
    for byte in bytes(data[:limit]):
        piece = _ESCAPES[byte]
        if used + len(piece) > limit:
            break
        pieces.append(piece)
        used += len(piece)
        shown += 1
    text = "".join(pieces)
    if shown < len(data):
        text += f"...(+{len(data) - shown} bytes)"
    return text


class StartupWarning(UserWarning):
    """A warning for the operator, raised while the daemon is built; its text is the log line."""


def _warning_line(warning: warnings.WarningMessage) -> str:
    if issubclass(warning.category, StartupWarning):
        return str(warning.message)
    where = f"{os.path.basename(warning.filename)}:{warning.lineno}"
    return (
        f"Python warning while starting: {warning.category.__name__}: {warning.message} ({where})"
    )


@contextmanager
def warnings_as_lines() -> Iterator[list[str]]:
    """Collect the Python warnings raised in the block as log lines, each once.

    The daemon is built before any log observer exists, so without this a
    warning (say, from a library the settings make us load) goes to stderr
    raw, and to the terminal even when twistd daemonizes.  The list is
    filled when the block ends; the caller logs it at Warn.  (Once logging
    has begun, Twisted's own warnings hook logs later ones.)
    """
    lines: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        yield lines
    for warning in caught:
        line = _warning_line(warning)
        if line not in lines:
            lines.append(line)


# Libraries that log through the standard library's ``logging``: botocore
# (the credential chain, STS) is the one the daemon runs.
LIBRARY_LOGGERS = ("botocore",)
# botocore loggers that write requests and responses, headers and bodies, at
# Debug: with -r (AssumeRole) those hold secret keys and session tokens, so
# they stay at Info even with -l debug.
WIRE_LOGGERS = (
    "botocore.auth",
    "botocore.awsrequest",
    "botocore.endpoint",
    "botocore.hooks",
    "botocore.httpsession",
    "botocore.parsers",
)


# (lowest logging level number, Twisted level), highest first.
_STDLIB_LEVELS: tuple[tuple[int, LogLevel], ...] = (
    (logging.CRITICAL, LogLevel.critical),
    (logging.ERROR, LogLevel.error),
    (logging.WARNING, LogLevel.warn),
    (logging.INFO, LogLevel.info),
)


def stdlib_level(levelno: int) -> LogLevel:
    """The Twisted level for a ``logging`` record's level number."""
    for lowest, level in _STDLIB_LEVELS:
        if levelno >= lowest:
            return level
    debug: LogLevel = LogLevel.debug
    return debug


class StdlibHandler(logging.Handler):
    """Hands ``logging`` records to Twisted's log, so they come out as Go-format lines.

    Records from threads other than the main (reactor) one are handed over
    with ``call_from_thread``: botocore's lookups run in threads, and the
    log destination is written from the reactor thread only.
    """

    def __init__(self, call_from_thread: Callable[..., object]) -> None:
        super().__init__()
        self._call_from_thread = call_from_thread

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
        except Exception:
            self.handleError(record)
            return
        level = stdlib_level(record.levelno)
        if threading.current_thread() is threading.main_thread():
            _publish(record.name, level, text, record.created)
        else:
            self._call_from_thread(_publish, record.name, level, text, record.created)


def _publish(namespace: str, level: LogLevel, text: str, when: float) -> None:
    Logger(namespace=namespace).emit(level, "{text}", text=text, log_time=when)


def route_library_logs(
    level: str,
    call_from_thread: Callable[..., object],
    names: tuple[str, ...] = LIBRARY_LOGGERS,
) -> None:
    """Send these libraries' ``logging`` records into our log, from now on.

    Warn and up (Debug too when ``level`` shows debug lines, except from
    ``WIRE_LOGGERS``, which would write credentials); not also to
    the root logger, whose last-resort handler would print them raw on
    stderr.  Calling it again replaces the earlier routing.
    """
    shown = logging.DEBUG if threshold(level) <= DEBUG else logging.WARNING
    for name in names:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, StdlibHandler)]:
            logger.removeHandler(old)
        logger.addHandler(StdlibHandler(call_from_thread))
        logger.setLevel(shown)
        logger.propagate = False
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(max(shown, logging.INFO))
