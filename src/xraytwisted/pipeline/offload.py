"""CPU-heavy work on large bodies, out of the reactor thread.

zlib releases the GIL while it works, so gzipping or inflating a body of
megabytes in the reactor's thread pool leaves the reactor free to read
datagrams and answer requests meanwhile (inline, a 5 MB body held it for
tens of milliseconds).  The hop to a thread and back costs about
50-100 microseconds, so bodies under ``THREAD_BYTES`` are still done inline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

T = TypeVar("T")

# Bodies of at least this many bytes (as they are before the work: compressed
# for inflating) are worked on in a thread.
THREAD_BYTES = 256 * 1024


class Runner(Protocol):
    """Runs a call elsewhere; its result (or failure) arrives in the reactor thread."""

    def __call__(self, call: Callable[[], T], /) -> Deferred[T]: ...


def thread_pool_runner(reactor: IReactorThreads) -> Runner:
    """Run calls in ``reactor``'s thread pool; results come back on the reactor.

    The spool's fsyncs, and the OTLP bridge's zlib work on large bodies.
    """

    def run(call: Callable[[], T]) -> Deferred[T]:
        return deferToThreadPool(reactor, reactor.getThreadPool(), call)

    return run
