"""Reading CPU, memory and UDP counters from /proc (Linux only)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def tree(pid: int) -> list[int]:
    """``pid`` and all its living descendants."""
    pids = [pid]
    i = 0
    while i < len(pids):
        for child in _children(pids[i]):
            if child not in pids:
                pids.append(child)
        i += 1
    return pids


def _children(pid: int) -> Iterator[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return
    for tid in tasks:
        try:
            text = _read(f"/proc/{pid}/task/{tid}/children")
        except OSError:
            continue
        yield from (int(c) for c in text.split())


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid`` (all its threads) and its waited-for children."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return 0.0, 0.0
    # Field 2 (comm) may contain spaces; everything after the last ')' is fixed.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + cutime) / CLK_TCK, (stime + cstime) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) plus its waited-for children."""
    return sum(cpu_split(pid))


def tree_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by ``pid`` and every descendant."""
    splits = [cpu_split(p) for p in tree(pid)]
    return sum(u for u, _ in splits), sum(s for _, s in splits)


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and every descendant."""
    return sum(tree_cpu_split(pid))


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of ``pid``'s main thread so far."""
    return _status_kb(pid, "voluntary_ctxt_switches:") + _status_kb(
        pid, "nonvoluntary_ctxt_switches:"
    )


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def wakeups(pid: int) -> int:
    """Context switches of every thread of ``pid`` and its descendants so far.

    Voluntary ones are a thread going to sleep (epoll, a futex, a timer)
    and so, one for one, a wakeup; involuntary ones a thread preempted.  The
    Go daemon runs several threads, so every thread counts (threads that
    ended in between are missing: the Go runtime rarely ends one).
    """
    total = 0
    for p in tree(pid):
        for tid in _tasks(p):
            try:
                text = _read(f"/proc/{p}/task/{tid}/status")
            except OSError:
                continue
            total += sum(parse_switches(text))
    return total


def parse_switches(status: str) -> tuple[int, int]:
    """(voluntary, nonvoluntary) context switches from a /proc/.../status text."""
    found = {"voluntary_ctxt_switches:": 0, "nonvoluntary_ctxt_switches:": 0}
    for line in status.splitlines():
        key, _, value = line.partition("\t")
        if key in found:
            found[key] = int(value.split()[0])
    return found["voluntary_ctxt_switches:"], found["nonvoluntary_ctxt_switches:"]


def run_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` and its descendants, from /proc/.../schedstat.

    Nanosecond resolution (the first field of schedstat is the time on a
    CPU), where utime + stime count 10 ms ticks: at 10 segments/s a 10-s
    run uses a few ticks of CPU in all.
    """
    total = 0
    for p in tree(pid):
        for tid in _tasks(p):
            try:
                total += int(_read(f"/proc/{p}/task/{tid}/schedstat").split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total / 1e9


def _status_kb(pid: int, key: str) -> int:
    """The number after ``key`` in /proc/<pid>/status (0 if the process is gone)."""
    try:
        text = _read(f"/proc/{pid}/status")
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    """Resident set size (VmRSS) of ``pid`` and its descendants, in KiB."""
    return sum(_status_kb(p, "VmRSS:") for p in tree(pid))


def hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) of ``pid`` and its descendants, in KiB."""
    return sum(_status_kb(p, "VmHWM:") for p in tree(pid))


@dataclass(frozen=True)
class UdpCounters:
    """The kernel's UDP counters for this network namespace (/proc/net/snmp)."""

    in_datagrams: int
    rcvbuf_errors: int
    in_errors: int

    def __sub__(self, other: UdpCounters) -> UdpCounters:
        return UdpCounters(
            self.in_datagrams - other.in_datagrams,
            self.rcvbuf_errors - other.rcvbuf_errors,
            self.in_errors - other.in_errors,
        )


def udp_counters() -> UdpCounters:
    lines = [line.split() for line in _read("/proc/net/snmp").splitlines()]
    names, values = (line for line in lines if line and line[0] == "Udp:")
    row = dict(zip(names[1:], (int(v) for v in values[1:]), strict=True))
    return UdpCounters(row["InDatagrams"], row["RcvbufErrors"], row["InErrors"])


def udp_socket_drops(port: int) -> int:
    """Datagrams the kernel dropped for the sockets bound to UDP ``port`` (the "drops" column).

    Unlike RcvbufErrors this counts only the daemon's own socket, not every
    UDP socket of the machine.  0 once the socket is closed.
    """
    suffix = f":{port:04X}"
    drops = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix):
                drops += int(fields[-1])
    return drops


def udp_port_bound(port: int) -> bool:
    """Whether some socket is bound to UDP ``port`` (IPv4 or IPv6)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        if any(line.split()[1].endswith(suffix) for line in lines):
            return True
    return False


def tcp_port_listening(port: int) -> bool:
    """Whether some socket listens on TCP ``port`` (IPv4 or IPv6; state 0A is LISTEN)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = _read(table).splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[1].endswith(suffix) and fields[3] == "0A":
                return True
    return False


@dataclass(frozen=True)
class MachineCpu:
    """Whole-machine CPU time (all cores) from /proc/stat, in seconds."""

    busy: float  # user + nice + system + irq + softirq
    steal: float  # taken by the hypervisor for other guests
    total: float

    def __sub__(self, other: MachineCpu) -> MachineCpu:
        return MachineCpu(
            self.busy - other.busy, self.steal - other.steal, self.total - other.total
        )


def machine_cpu() -> MachineCpu:
    fields = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return MachineCpu(busy / CLK_TCK, steal / CLK_TCK, sum(fields) / CLK_TCK)
