"""How much memory the segment buffer may use.

The Go daemon's default is 1% of *host* RAM, so a container on a big host
gets a buffer bigger than its own memory limit (Go daemon issue #11: 800 MB
to 2 GB RSS).  We take 1% of whichever is smaller, host RAM or the memory
limit of our cgroup (v1 or v2, including the limits of its ancestors), and
never less than the 3 MB minimum (the Go daemon exits there instead).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from xraytwisted.settings.table import MIN_BUFFER_MB

MIB = 1024 * 1024
# cgroup v1 says "no limit" with a huge page-rounded number (2**63 - 4096 on
# 4 KiB pages); anything this big is no limit.
UNLIMITED = 1 << 62

Reader = Callable[[str], "str | None"]
Physical = Callable[[], "int | None"]


def read_text(path: str) -> str | None:
    """The contents of a small /proc or /sys file, or None if unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(1024 * 1024)
    except (OSError, ValueError):
        return None


def physical_memory() -> int | None:
    """Total RAM from sysconf, for systems without /proc/meminfo."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def host_memory_bytes(read: Reader = read_text, physical: Physical = physical_memory) -> int | None:
    """Total host RAM (MemTotal, what the Go daemon's gopsutil reports)."""
    meminfo = read("/proc/meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            if line.startswith("MemTotal:"):
                parts = line.split()
                if len(parts) >= 2 and parts[1].isascii() and parts[1].isdigit():
                    return int(parts[1]) * 1024
    return physical()


@dataclass(frozen=True)
class _Mount:
    root: str  # the cgroup path that appears at mount_point
    mount_point: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _cgroup_mounts(read: Reader) -> tuple[_Mount | None, _Mount | None]:
    """The cgroup2 mount and the cgroup v1 memory-controller mount."""
    v2: _Mount | None = None
    v1: _Mount | None = None
    for line in (read("/proc/self/mountinfo") or "").splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        mount = _Mount(_unescape(fields[3]), _unescape(fields[4]))
        if tail[0] == "cgroup2" and v2 is None:
            v2 = mount
        elif (
            tail[0] == "cgroup" and len(tail) >= 3 and "memory" in tail[2].split(",") and v1 is None
        ):
            v1 = mount
    return v2, v1


def _directories(path: str, mount: _Mount) -> Iterator[str]:
    """Our cgroup's directory under the mount, then each ancestor up to the mount."""
    root = mount.root.rstrip("/")
    # A path outside the mounted subtree (e.g. a container's own cgroup
    # mounted as the root) leaves the mount point as the closest we can see.
    inside = path == root or path.startswith(root + "/")
    relative = path[len(root) :] if inside else ""
    parts = [p for p in relative.split("/") if p]
    if ".." in parts:
        parts = []
    base = mount.mount_point.rstrip("/")
    for depth in range(len(parts), -1, -1):
        yield "/".join([base, *parts[:depth]])


def _limit(text: str | None) -> int | None:
    if text is None:
        return None
    value = text.strip()
    if not (value.isascii() and value.isdigit()):
        return None  # "max" (v2 for no limit), or unreadable garbage
    limit = int(value)
    return None if limit >= UNLIMITED else limit


def cgroup_memory_limit(read: Reader = read_text) -> int | None:
    """The memory limit of this process's cgroup (v2 or v1), None if unlimited.

    The effective limit is the smallest one on the way from our cgroup (named
    in /proc/self/cgroup) up to the root of the mounted hierarchy, since a
    parent's limit caps its children.  Mount points come from
    /proc/self/mountinfo, defaulting to /sys/fs/cgroup (v2) and
    /sys/fs/cgroup/memory (v1).
    """
    v2_mount, v1_mount = _cgroup_mounts(read)
    v2_mount = v2_mount or _Mount("/", "/sys/fs/cgroup")
    v1_mount = v1_mount or _Mount("/", "/sys/fs/cgroup/memory")
    v2_paths: list[str] = []
    v1_paths: list[str] = []
    for line in (read("/proc/self/cgroup") or "").splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2_paths.append(path)
        elif "memory" in controllers.split(","):
            v1_paths.append(path)
    if not v2_paths and not v1_paths:
        # No /proc/self/cgroup: the mounted hierarchy roots are all we have.
        v2_paths, v1_paths = ["/"], ["/"]
    limits: list[int] = []
    for paths, mount, filename in (
        (v2_paths, v2_mount, "memory.max"),
        (v1_paths, v1_mount, "memory.limit_in_bytes"),
    ):
        for path in paths:
            for directory in _directories(path, mount):
                limit = _limit(read(f"{directory}/{filename}"))
                if limit is not None:
                    limits.append(limit)
    return min(limits) if limits else None


@dataclass(frozen=True)
class Budget:
    megabytes: int
    source: str  # for the startup log line

    @property
    def bytes(self) -> int:
        return self.megabytes * MIB


def buffer_budget(
    configured_mb: int, read: Reader = read_text, physical: Physical = physical_memory
) -> Budget:
    """The buffer budget: the configured MB, or 1% of the memory we may use."""
    if configured_mb > 0:
        return Budget(configured_mb, "configured")
    host = host_memory_bytes(read, physical)
    limit = cgroup_memory_limit(read)
    if host is None and limit is None:
        return Budget(MIN_BUFFER_MB, "minimum (memory size unknown)")
    if limit is not None and (host is None or limit < host):
        usable, what = limit, "cgroup memory limit"
    else:
        assert host is not None
        usable, what = host, "RAM"
    megabytes = usable // 100 // MIB
    if megabytes < MIN_BUFFER_MB:
        return Budget(MIN_BUFFER_MB, f"minimum (1% of {what} is {megabytes} MB)")
    return Budget(megabytes, f"1% of {what}")
