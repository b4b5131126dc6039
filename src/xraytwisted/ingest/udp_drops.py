"""Kernel UDP drops: datagrams the kernel threw away before the daemon could read them.

When the UDP socket's receive buffer is full the kernel drops new
datagrams silently; the Go daemon never notices.  ``UdpDropMonitor`` reads
the kernel's counters every ``interval`` seconds, adds what grew to
``Counters.kernel_drops`` and logs one warning per interval that had drops.

Two sources, the better one first:

* per socket: the ``drops`` column of ``/proc/net/udp`` and ``/proc/net/udp6``
  for the daemon's own sockets (found by inode).  This is the socket's
  ``sk_drops``, the same number ``SO_RXQ_OVFL`` reports, without ``recvmsg``
  and ancillary data on every datagram;
* host-wide: ``RcvbufErrors`` in ``/proc/net/snmp`` plus ``Udp6RcvbufErrors``
  in ``/proc/net/snmp6``.  These count every UDP socket in the network
  namespace (the whole host unless the daemon runs in its own, as in most
  containers), so other programs' drops show up too; the warning says so.

Both are per network namespace, and are Linux-only: elsewhere the monitor
reports itself unavailable and does nothing.

With the per-socket counter the monitor sleeps while the daemon receives
nothing (its socket cannot drop what nobody sends): after a check with no
new drops and no datagram since the one before, the timer stops, and
``wake`` (called when the UDP socket turns readable after a quiet spell)
starts it again.  An idle daemon has one timer fewer waking it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from xraytwisted.observe.counters import Counters

SNMP = "/proc/net/snmp"
SNMP6 = "/proc/net/snmp6"
UDP_SOCKETS = ("/proc/net/udp", "/proc/net/udp6")
INTERVAL = 10.0

Read = Callable[[str], str]
Inodes = Callable[[], Collection[int]]


def read_text(path: str) -> str:
    with open(path, encoding="ascii", errors="replace") as f:
        return f.read()


def parse_snmp(text: str) -> int | None:
    """``RcvbufErrors`` of the ``Udp:`` lines of /proc/net/snmp (None: not there).

    The file pairs a line of names with a line of values per protocol;
    kernels before 2.6.18 have no RcvbufErrors, newer ones add columns at the
    end (InCsumErrors, IgnoredMulti, MemErrors), so columns go by name.
    """
    names: list[str] | None = None
    for line in text.splitlines():
        proto, _, rest = line.partition(":")
        if proto != "Udp":
            continue
        fields = rest.split()
        if names is None:
            names = fields
            continue
        if "RcvbufErrors" not in names or len(fields) != len(names):
            return None
        try:
            return int(fields[names.index("RcvbufErrors")])
        except ValueError:
            return None
    return None


def parse_snmp6(text: str) -> int | None:
    """``Udp6RcvbufErrors`` of /proc/net/snmp6 (one ``name value`` pair per line)."""
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "Udp6RcvbufErrors":
            try:
                return int(fields[1])
            except ValueError:
                return None
    return None


def parse_socket_drops(text: str, inodes: Collection[int]) -> tuple[int, int]:
    """(drops summed, sockets found) over the lines of /proc/net/udp{,6} for ``inodes``.

    Columns: sl local_address rem_address st tx_queue:rx_queue tr:tm->when
    retrnsmt uid timeout inode ref pointer drops.
    """
    total = found = 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 13:
            continue
        try:
            inode = int(fields[9])
            drops = int(fields[12])
        except ValueError:
            continue
        if inode in inodes:
            total += drops
            found += 1
    return total, found


def socket_inode(fd: int) -> int:
    """The inode /proc/net/udp shows for the socket on ``fd``."""
    return os.fstat(fd).st_ino


@dataclass(frozen=True)
class Sample:
    source: str  # "socket" or "host"
    drops: int


class UdpDropMonitor(Service):
    """Counts and reports the kernel's UDP receive-buffer drops every ``interval`` seconds."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        counters: Counters,
        interval: float = INTERVAL,
        read: Read = read_text,
        inodes: Inodes | None = None,
    ) -> None:
        self._clock = clock
        self._counters = counters
        self.interval = interval
        self._read = read
        # The daemon's UDP sockets, asked for at every check (they are bound
        # when the ingest service starts, after this object is made).
        self._inodes = inodes
        self._last: Sample | None = None
        self._last_at = 0.0
        self._loop: LoopingCall | None = None
        self._received: int | None = None  # Counters.received at the last check
        self.error = ""  # why no counters could be read, if so

    def watch(self, inodes: Inodes) -> None:
        """Count the drops of these sockets (asked at every check), not host-wide ones."""
        self._inodes = inodes

    def sample(self) -> Sample | None:
        """The current counter from the best source available (None: none is)."""
        inodes = self._inodes() if self._inodes is not None else ()
        if inodes:
            total = found = 0
            for path in UDP_SOCKETS:
                try:
                    drops, n = parse_socket_drops(self._read(path), inodes)
                except OSError:
                    continue  # no IPv6, say
                total += drops
                found += n
            if found:
                return Sample("socket", total)
        total = 0
        known = False
        for path, parse in ((SNMP, parse_snmp), (SNMP6, parse_snmp6)):
            try:
                value = parse(self._read(path))
            except OSError as e:
                self.error = f"{path}: {e.strerror or e}"
                continue
            if value is None:
                self.error = f"{path}: no UDP receive buffer error counter"
            else:
                total += value
                known = True
        return Sample("host", total) if known else None

    def available(self) -> bool:
        """Whether any drop counter can be read here."""
        return self.sample() is not None

    def check(self) -> int:
        """Take a sample; count and log what grew since the last one.  Returns that."""
        now = self._clock.seconds()
        current = self.sample()
        last, self._last = self._last, current
        elapsed, self._last_at = now - self._last_at, now
        if current is None or last is None or current.source != last.source:
            # Nothing to compare with (first sample, or the source changed).
            return 0
        grew = current.drops - last.drops
        if grew <= 0:
            # < 0: the counter went back (a wrap on 32-bit kernels): the next
            # interval counts from here.
            return 0
        self._counters.kernel_drops += grew
        if current.source == "socket":
            self.log.warn(
                "The kernel dropped {count} UDP datagrams sent to the daemon (its receive "
                "buffer was full) in the last {seconds:.0f} s; raise Socket.UDPReceiveBufferKB "
                "(--udp-receive-buffer) or net.core.rmem_max",
                count=grew,
                seconds=elapsed,
            )
        else:
            self.log.warn(
                "The kernel dropped {count} UDP datagrams (receive buffer full) in the last "
                "{seconds:.0f} s; raise Socket.UDPReceiveBufferKB (--udp-receive-buffer) or "
                "net.core.rmem_max. This count is for all UDP sockets on this host (network "
                "namespace), not only the daemon's",
                count=grew,
                seconds=elapsed,
            )
        return grew

    def startService(self) -> None:
        super().startService()
        self._last = self.sample()
        self._last_at = self._clock.seconds()
        if self._last is None:
            self.log.info(
                "Cannot read the kernel's UDP drop counters ({error}); datagrams the kernel "
                "drops when the receive buffer is full will not be reported",
                error=self.error or "unknown reason",
            )
            return
        self._start()

    def _start(self) -> None:
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self._clock
        loop.start(self.interval, now=False)

    def _tick(self) -> None:
        grew = self.check()
        received, before = self._counters.received, self._received
        self._received = received
        if grew or before is None or received != before:
            return
        last = self._last
        if last is not None and last.source == "socket" and self._loop is not None:
            self._loop.stop()  # nothing sent to us, nothing dropped: sleep until wake()
            self._loop = None

    def wake(self) -> None:
        """Datagrams are coming in again: check every ``interval`` while they do."""
        if self.running and self._loop is None and self._last is not None:
            self._start()

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop()
        if self._last is not None:
            # Drops since the last tick count too (ingest stops before this).
            self.check()
