"""Bytes a listener holds for its clients, bounded in total.

A segment stream's unfinished line (and, while the segment buffer is full,
the lines and the document waiting for room) and an HTTP request's body are
in memory before anything is accepted, outside the segment buffer's budget.
``HeldBytes`` is their own budget (the TCP port's ``Socket.TCPHoldKB``, the
OTLP receiver's ``OTLP.HoldMB``), shared by every connection of its
listener: a stream that holds bytes when it is spent stops
being read until others give bytes back, and a body that does not fit is
answered 503.  See docs/stream-format.md.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

DEFAULT_HOLD = 4 * 1024 * 1024  # Socket.TCPHoldKB = 0: at least this much


def default_hold(max_line: int, max_body: int) -> int:
    """``Socket.TCPHoldKB: 0``: room for a few of the largest lines or bodies at once."""
    return max(DEFAULT_HOLD, 2 * max(max_line, max_body))


class HeldBytes:
    """A byte budget with waiters, like the segment buffer's, for bytes not yet accepted.

    ``charge`` never refuses: bytes already read are in memory either way.
    Callers check ``over`` / ``fits`` and stop reading (or refuse) instead.
    """

    log = Logger()

    def __init__(self, capacity: int, clock: IReactorTime) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._clock = clock
        self._waiters: list[Callable[[], object]] = []
        self._wake: IDelayedCall | None = None

    def fits(self, size: int) -> bool:
        return self.used + size <= self.capacity

    def over(self) -> bool:
        return self.used > self.capacity

    def charge(self, size: int) -> None:
        self.used += size
        if self.used > self.peak:
            self.peak = self.used

    def release(self, size: int) -> None:
        self.used -= size
        if self._waiters and self._wake is None and self.used < self.capacity:
            # From the reactor, not from inside whoever released.
            self._wake = self._clock.callLater(0, self._wake_waiters)

    def notify_when_free(self, callback: Callable[[], object]) -> None:
        """Call ``callback`` once, soon after bytes are next given back."""
        self._waiters.append(callback)

    def cancel_notify(self, callback: Callable[[], object]) -> None:
        waiters = self._waiters
        while callback in waiters:
            waiters.remove(callback)

    def _wake_waiters(self) -> None:
        self._wake = None
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            try:
                callback()
            except Exception:
                self.log.failure("Error while resuming a TCP connection paused for held bytes")
