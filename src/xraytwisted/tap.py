"""``twistd xray``: command-line options and makeService.

Flags follow the Go daemon (see xraytwisted.settings.go_flags); settings merge as
defaults < cfg.yaml < command line (xraytwisted.settings.loader); daemon.build wires
the services.  Every startup problem is one line on stderr and exit status 1.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.python import usage

from xraytwisted import __version__
from xraytwisted.daemon import StartupError, XRayDaemon, build
from xraytwisted.observe.logs import (
    GoFormatObserver,
    LogSetupError,
    go_timestamp,
    open_destination,
    route_library_logs,
    warnings_as_lines,
)
from xraytwisted.settings import go_flags, loader, table

VERSION_LINE = f"AWS X-Ray daemon version: {__version__}"


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Receives X-Ray segment documents on UDP (and TCP), batches them and uploads them "
        "to AWS X-Ray with PutTraceSegments. Options and cfg.yaml keys are those of the "
        "AWS X-Ray daemon; -c loads a cfg.yaml, otherwise /etc/amazon/xray/cfg.yaml or "
        "./cfg.yaml is used if present."
    )

    def __init__(self) -> None:
        super().__init__()
        self.parsed = go_flags.Parsed()

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = sys.argv[1:] if options is None else list(options)
        try:
            self.parsed = go_flags.parse(argv)
        except go_flags.UsageError as e:
            raise usage.UsageError(str(e)) from None
        if self.parsed.help:
            sys.stdout.write(self.getUsage())
            sys.exit(0)
        if self.parsed.version:
            print(VERSION_LINE)
            sys.exit(0)
        if self.parsed.health_check:
            from xraytwisted import health_check

            sys.exit(health_check.run(self.parsed))

    def getUsage(self, width: int | None = None) -> str:
        return go_flags.usage_text("twistd xray")


def load_settings(parsed: go_flags.Parsed) -> table.Settings:
    """defaults < cfg.yaml (-c, else the search path) < command line."""
    file_values = loader.load(parsed.config)
    return loader.resolve(file_values, parsed.overrides)


def _twistd_log_path(options: usage.Options) -> str | None:
    """Where to log without -f: twistd's --logfile, or twistd.log when daemonized."""
    parent: Mapping[str, Any] | None = getattr(options, "parent", None)
    if parent is None:
        return None
    logfile = parent.get("logfile")
    if logfile == "-":
        return None
    if logfile:
        return str(logfile)
    return None if parent.get("nodaemon") else "twistd.log"


def fail(message: str, log_path: str | None = None) -> SystemExit:
    """Report a startup error like the Go daemon (stderr, and the log file) -> exit 1."""
    line = f"{go_timestamp(time.time())} [Error] {message}\n"
    sys.stderr.write(line)
    sys.stderr.flush()
    if log_path:
        try:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(line)
        except OSError:
            pass
    return SystemExit(1)


def makeService(options: Options, reactor: Any = None) -> XRayDaemon:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    try:
        settings = load_settings(options.parsed)
    except table.ConfigError as e:
        raise fail(str(e), options.parsed.overrides.get("log_path")) from None
    log_path = settings.log_path or _twistd_log_path(options)
    # With --local-sink - the segments own stdout; the log moves to stderr.
    console = sys.stderr if settings.local_sink == "-" else sys.stdout
    try:
        destination = open_destination(log_path, settings.log_rotation, console)
    except LogSetupError as e:
        raise fail(str(e)) from None
    observer = GoFormatObserver(destination.write, settings.log_level, destination.flush)
    # botocore logs through the standard library: into this log, not raw on stderr.
    route_library_logs(settings.log_level, reactor.callFromThread)
    try:
        with warnings_as_lines() as warned:
            daemon = build(
                settings, reactor, env=os.environ, observer=observer, handle_signals=True
            )
    except StartupError as e:
        destination.close()
        raise fail(str(e), log_path) from None
    if daemon.parts is not None:  # in the startup banner, in the daemon's log format
        daemon.parts.notes.extend(("warn", line) for line in warned)
    return daemon
