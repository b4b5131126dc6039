"""Twisted's own log lines about accept() running out of descriptors, throttled.

``twisted.internet.tcp.Port`` handles ``accept()`` failing for want of
descriptors by itself: with EMFILE it closes a descriptor it keeps in
reserve, accepts and closes every waiting connection, and reserves again;
otherwise (ENFILE, ENOBUFS, ENOMEM, or EMFILE with no reserve) it gives up
until the next event-loop turn, when the listener is still readable.  It
logs every step at info, one line per connection closed, through loggers in
the ``twisted.internet.tcp`` namespace.  A client hammering a daemon out of
descriptors would flood the log; with no reserve, the loop spins.

Twisted offers no hook for these events, so this module recognises them by
namespace and format string (``ACCEPT_FORMATS``).  ``AcceptErrorFilter``
turns them into one warning per 10 s that says what to do, passes the
originals on at debug, and tells ``on_accept_error`` (which stops accepting
for a moment, so the loop does not spin).  tests/observe/test_accept_errors.py
runs a real port out of descriptors and fails if Twisted changes them.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogEvent, LogLevel
from zope.interface import implementer

from xraytwisted.observe.logs import Throttle

NAMESPACE = "twisted.internet.tcp"
# log_format of the events twisted.internet.tcp.Port (and its descriptor
# reservation) logs about accept() failures, as of Twisted 26.
ACCEPT_FORMATS = frozenset(
    {
        "EMFILE encountered; releasing reserved file descriptor.",
        "EMFILE recovery: Closed socket from {address}",
        "Re-reserving EMFILE recovery file descriptor.",
        "Could not accept new connection ({acceptError})",
        "Could not reserve EMFILE recovery file descriptor.",
        "Could not re-reserve EMFILE recovery file descriptor.",
    }
)
# The one that means the port is left readable with nothing accepted.
GAVE_UP = "Could not accept new connection ({acceptError})"

WARNING = (
    "Out of file descriptors: TCP connections are being closed as soon as they are "
    "accepted ({count} times since the last such line). Raise the limit (ulimit -n) or "
    "lower --tcp-max-connections"
)


def is_accept_error(event: LogEvent) -> bool:
    namespace = event.get("log_namespace")
    return (
        isinstance(namespace, str)
        and namespace.startswith(NAMESPACE)
        and event.get("log_format") in ACCEPT_FORMATS
    )


@implementer(ILogObserver)
class AcceptErrorFilter:
    """Wraps ``observer``: Twisted's accept-error lines become a throttled warning."""

    def __init__(
        self,
        observer: ILogObserver,
        clock: IReactorTime,
        interval: float = 10.0,
        on_accept_error: Callable[[], object] | None = None,
    ) -> None:
        self.observer = observer
        self.on_accept_error = on_accept_error
        self._clock = clock
        self._throttle = Throttle(clock, interval)
        self._count = 0

    def __call__(self, event: LogEvent) -> None:
        if not is_accept_error(event):
            self.observer(event)
            return
        self._count += 1
        quiet = dict(event)
        quiet["log_level"] = LogLevel.debug
        quiet.pop("log_failure", None)  # a traceback adds nothing here
        self.observer(quiet)
        if self._throttle.check("accept") is not None:
            count, self._count = self._count, 0
            self.observer(
                {
                    "log_format": WARNING,
                    "log_level": LogLevel.warn,
                    "log_namespace": __name__,
                    "log_time": event.get("log_time", self._clock.seconds()),
                    "count": count,
                }
            )
        if event.get("log_format") == GAVE_UP and self.on_accept_error is not None:
            self.on_accept_error()
