"""A thread pool's stand-in: each call waits until the test runs it.

What the code under test hands to ``run_in_thread`` is pure work (zlib, a
check); running it in the test's thread at a moment the test chooses shows
what happens while it is still "in the thread" and once its result is back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class HeldCalls:
    def __init__(self) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], T], /) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.calls.append((call, d))
        return d

    def run(self, index: int = 0) -> None:
        """Run the call ``index`` (oldest first) and deliver its result."""
        call, d = self.calls.pop(index)
        try:
            result = call()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)

    def run_all(self) -> None:
        while self.calls:
            self.run()
