"""A listener's open connections, counted against its limits (in all, per address).

Every listener caps its connections the same way: the TCP port's sniffer
(streams and HTTP alike), the monitoring listener and the OTLP receiver
(both ``BoundedSite``).  ``OpenConnections`` counts and decides; what a
refusal looks like is the listener's: ``ConnectionCap`` is the TCP port's
and the monitoring listener's (``tcp_refused``, a throttled warning), the
OTLP receiver words its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, Literal, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import Throttle
from xraytwisted.settings.addresses import Address

C = TypeVar("C")
Over = Literal["total", "peer"]  # which limit a new connection would break


def format_peer(address: object) -> str:
    """``host:port`` of a peer address (IPv6 in brackets; its repr if it has neither)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return str(Address(str(host), int(port)))


class OpenConnections(Generic[C]):
    """The connections open on one listener, and whether one more may be."""

    def __init__(self, max_total: int | None = None, max_per_peer: int | None = None) -> None:
        self.max_total = max_total  # None: no limit
        self.max_per_peer = max_per_peer
        self._hosts: dict[C, str] = {}  # open connection -> its peer's address
        self.per_peer: dict[str, int] = {}  # host -> open connections (only hosts with some)

    def __len__(self) -> int:
        return len(self._hosts)

    def __iter__(self) -> Iterator[C]:
        return iter(list(self._hosts))  # a copy: closing one changes the dict

    def over(self, host: str) -> tuple[Over, int] | None:
        """The limit (and its value) a new connection from ``host`` would break; None: room."""
        if self.max_total is not None and len(self._hosts) >= self.max_total:
            return "total", self.max_total
        if self.max_per_peer is not None and self.per_peer.get(host, 0) >= self.max_per_peer:
            return "peer", self.max_per_peer
        return None

    def opened(self, connection: C, host: str) -> None:
        self._hosts[connection] = host
        self.per_peer[host] = self.per_peer.get(host, 0) + 1

    def closed(self, connection: C) -> bool:
        """Forget ``connection``; False: it was not open (closed twice, or never counted)."""
        host = self._hosts.pop(connection, None)
        if host is None:
            return False
        left = self.per_peer.get(host, 1) - 1
        if left > 0:
            self.per_peer[host] = left
        else:
            self.per_peer.pop(host, None)
        return True


class ConnectionCap:
    """How the TCP port and the monitoring listener refuse a connection over a limit.

    Counted as ``tcp_refused`` and warned about at most once per kind
    (total, peer) every ``warn_interval`` seconds, with the given message
    (fields ``peer`` and ``limit``).
    """

    log = Logger()

    def __init__(
        self, counters: Counters, clock: IReactorTime, *, total: str, peer: str,
        warn_interval: float = 10.0,
    ) -> None:  # fmt: skip
        self.counters = counters
        self._messages: dict[Over, str] = {"total": total, "peer": peer}
        self._throttle = Throttle(clock, warn_interval)

    def refuse(self, over: Over, limit: int, addr: object) -> None:
        """Count (and maybe warn about) one connection from ``addr`` refused for ``over``."""
        self.counters.tcp_refused += 1
        suppressed = self._throttle.check(over)
        if suppressed is not None:
            message = self._messages[over]
            if suppressed:
                message += " ({suppressed} more refused connections not logged)"
            self.log.warn(message, peer=format_peer(addr), limit=limit, suppressed=suppressed)


class WhenGone:
    """Deferreds waiting for a connection to be gone: ``wait`` gives them, ``gone`` fires them."""

    def __init__(self) -> None:
        self.is_gone = False
        self._waiting: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.is_gone:
            d.callback(None)
        else:
            self._waiting.append(d)
        return d

    def gone(self) -> None:
        self.is_gone = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)
