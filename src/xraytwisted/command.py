"""The ``xray`` command: the Go daemon's command line, in the foreground.

Same flags, defaults, usage layout and exit statuses as the Go daemon's
``xray`` binary: ``-h`` prints the usage and exits 0, ``-v`` prints the
version and exits 0, a bad command line prints Go's message on stderr and
the usage on stdout and exits 2, a configuration or startup error is one
``[Error]`` line and exit 1, and SIGTERM/SIGINT drain and exit 0.
``--health-check`` asks a running daemon's /health instead of starting one.

The daemon is built by ``tap.makeService``, exactly as ``twistd xray``
builds it; this module only replaces twistd's runner (logging, start, the
reactor).  ``twistd xray`` remains the way to daemonize with a pidfile.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from xraytwisted.settings import go_flags

PROGRAM = "X-Ray"  # what the Go daemon's usage line calls itself
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _usage_error(message: str) -> int:
    # Go's flag package: the complaint on stderr, then the usage on stdout.
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    sys.stdout.write(go_flags.usage_text(PROGRAM))
    sys.stdout.flush()
    return 2


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM/SIGINT until the daemon's own handlers are in place.

    They are installed by ``startService``; a signal that came earlier would
    kill the process (SIGTERM) or raise KeyboardInterrupt in the middle of
    starting (SIGINT) instead of draining.  A held signal is delivered again
    once the daemon can handle it.
    """
    held: list[int] = []

    def hold(signum: int, frame: object) -> None:
        held.append(signum)

    previous = {signum: signal.signal(signum, hold) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if signal.getsignal(signum) is hold:  # the daemon did not take it over
                signal.signal(signum, handler)
    if held:  # only after a successful start: a failed one exits 1 regardless
        signal.raise_signal(held[0])


def main(argv: Sequence[str] | None = None, reactor: Any = None) -> int:
    """Run the daemon until it is told to stop; returns the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = go_flags.parse(args)
    except go_flags.UsageError as e:
        return _usage_error(str(e))
    if parsed.help:
        sys.stdout.write(go_flags.usage_text(PROGRAM))
        return 0
    if parsed.health_check:
        # Before Twisted is imported: a probe every few seconds must be cheap.
        from xraytwisted import health_check

        return health_check.run(parsed)
    # Imported only now: building the daemon pulls in treq and botocore, which
    # -h and usage errors should not wait for.
    from twisted.logger import Logger, globalLogBeginner

    from xraytwisted import tap

    if parsed.version:
        print(tap.VERSION_LINE)
        return 0
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    options = tap.Options()
    options.parsed = parsed
    try:
        daemon = tap.makeService(options, reactor)
    except SystemExit as e:  # makeService has printed the one-line reason
        return e.code if isinstance(e.code, int) else 1

    if daemon.observer is not None:
        # Standard I/O stays as it is: a local sink may be writing to stdout.
        globalLogBeginner.beginLoggingTo([daemon.observer], redirectStandardIO=False)
    try:
        with _signals_held():
            daemon.privilegedStartService()
            daemon.startService()
    except Exception:
        Logger(namespace="xray").failure("The daemon failed to start")
        return 1
    # The daemon's own SIGTERM/SIGINT handlers (installed when it starts and
    # again once the reactor runs) stop the reactor; this drains before exit.
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stopService)
    reactor.run()
    return 0


def run() -> None:
    """The ``xray`` console script."""
    sys.exit(main())
