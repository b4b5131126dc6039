"""Collecting the log events a test causes."""

from __future__ import annotations

from typing import cast

from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase


def capture_logs(case: SynchronousTestCase) -> list[LogEvent]:
    """Every event logged from now until the test's cleanup, in order."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    case.addCleanup(globalLogPublisher.removeObserver, observer)
    return events
