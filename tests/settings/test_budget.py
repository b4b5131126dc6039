"""Tests for xraytwisted.settings.budget: the buffer budget from host RAM and cgroup limits."""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.trial.unittest import SynchronousTestCase

from tests.support.tempdirs import temp_path
from xraytwisted.settings import budget
from xraytwisted.settings.budget import (
    MIB,
    Budget,
    buffer_budget,
    cgroup_memory_limit,
    host_memory_bytes,
    read_text,
)
from xraytwisted.settings.table import MIN_BUFFER_MB

GIB = 1024 * MIB
# cgroup v1's "no limit": PAGE_COUNTER_MAX pages of 4 KiB.
V1_UNLIMITED = "9223372036854771712\n"
MOUNTINFO_V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
MOUNTINFO_V1 = (
    "31 23 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "35 31 0:31 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
    "36 31 0:32 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct\n"
)


def meminfo(total_bytes: int) -> str:
    return (
        f"MemTotal:       {total_bytes // 1024} kB\n"
        "MemFree:         1000000 kB\n"
        "MemAvailable:    2000000 kB\n"
    )


def fake(files: Mapping[str, str]) -> budget.Reader:
    """A reader that only knows ``files`` (everything else is unreadable).

    Like the real file system it resolves "." and "..".
    """
    return lambda path: files.get(os.path.normpath(path))


def no_physical() -> int | None:
    return None


class HostMemoryTests(SynchronousTestCase):
    def test_memtotal(self) -> None:
        read = fake({"/proc/meminfo": meminfo(16 * GIB)})
        self.assertEqual(host_memory_bytes(read, no_physical), 16 * GIB)

    def test_falls_back_to_sysconf(self) -> None:
        self.assertEqual(host_memory_bytes(fake({}), lambda: 123 * MIB), 123 * MIB)
        garbled = fake({"/proc/meminfo": "MemTotal: lots\nMemFree: 5 kB\n"})
        self.assertEqual(host_memory_bytes(garbled, lambda: 7 * MIB), 7 * MIB)
        self.assertIsNone(host_memory_bytes(fake({}), no_physical))

    def test_real_system(self) -> None:
        total = host_memory_bytes()
        assert total is not None
        self.assertGreater(total, 64 * MIB)
        physical = budget.physical_memory()
        assert physical is not None
        # /proc/meminfo's MemTotal and sysconf describe the same RAM.
        self.assertLess(abs(total - physical), total // 10)


class BudgetTests(SynchronousTestCase):
    def budget(self, files: Mapping[str, str], configured: int = 0) -> Budget:
        return buffer_budget(configured, fake(files), no_physical)

    def test_configured_value_is_used_as_is(self) -> None:
        def explode(path: str) -> str | None:
            raise AssertionError(f"read {path}")

        for mb in (3, 10, 100000):
            self.assertEqual(buffer_budget(mb, explode, no_physical), Budget(mb, "configured"))

    def test_host_only_is_one_percent_rounded_down(self) -> None:
        # Go: floor(0.01 * total / MiB).  24684084 kB -> 241 MB (the 23 GiB
        # host in the reference measurements).
        cases = {
            16 * GIB: 163,
            24684084 * 1024: 241,
            1 * GIB: 10,
            int(1.5 * GIB): 15,
            300 * MIB: 3,
        }
        for total, expected in cases.items():
            budget = self.budget({"/proc/meminfo": meminfo(total)})
            self.assertEqual(budget, Budget(expected, "1% of RAM"), total)
            self.assertEqual(budget.bytes, expected * MIB)

    def test_small_host_gets_the_minimum(self) -> None:
        budget = self.budget({"/proc/meminfo": meminfo(200 * MIB)})
        self.assertEqual(budget, Budget(MIN_BUFFER_MB, "minimum (1% of RAM is 2 MB)"))

    def test_unknown_memory_gets_the_minimum(self) -> None:
        self.assertEqual(self.budget({}), Budget(3, "minimum (memory size unknown)"))

    def test_cgroup_v2_limit_smaller_than_host(self) -> None:
        files = {
            "/proc/meminfo": meminfo(64 * GIB),
            "/proc/self/cgroup": "0::/kubepods/burstable/pod1/ctr\n",
            "/proc/self/mountinfo": MOUNTINFO_V2,
            "/sys/fs/cgroup/kubepods/burstable/pod1/ctr/memory.max": f"{512 * MIB}\n",
        }
        # 1% of 512 MiB is 5 MB, where 1% of the host would be 655 MB.
        self.assertEqual(self.budget(files), Budget(5, "1% of cgroup memory limit"))

    def test_cgroup_limit_above_host_memory(self) -> None:
        files = {
            "/proc/meminfo": meminfo(2 * GIB),
            "/proc/self/cgroup": "0::/big\n",
            "/sys/fs/cgroup/big/memory.max": f"{64 * GIB}\n",
        }
        self.assertEqual(self.budget(files), Budget(20, "1% of RAM"))

    def test_tiny_cgroup_limit_gets_the_minimum(self) -> None:
        files = {
            "/proc/meminfo": meminfo(64 * GIB),
            "/proc/self/cgroup": "0::/small\n",
            "/sys/fs/cgroup/small/memory.max": f"{128 * MIB}\n",
        }
        self.assertEqual(
            self.budget(files), Budget(3, "minimum (1% of cgroup memory limit is 1 MB)")
        )

    def test_cgroup_without_host_memory(self) -> None:
        files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": f"{4 * GIB}\n"}
        self.assertEqual(self.budget(files), Budget(40, "1% of cgroup memory limit"))

    def test_cgroup_v1_limit(self) -> None:
        files = {
            "/proc/meminfo": meminfo(64 * GIB),
            "/proc/self/cgroup": "12:pids:/docker/abc\n4:memory:/docker/abc\n1:name=systemd:/\n",
            "/proc/self/mountinfo": MOUNTINFO_V1,
            "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{2 * GIB}\n",
        }
        self.assertEqual(self.budget(files), Budget(20, "1% of cgroup memory limit"))

    def test_cgroup_v1_unlimited(self) -> None:
        files = {
            "/proc/meminfo": meminfo(8 * GIB),
            "/proc/self/cgroup": "4:memory:/user.slice\n",
            "/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes": V1_UNLIMITED,
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        }
        self.assertEqual(self.budget(files), Budget(81, "1% of RAM"))

    def test_cgroup_v2_unlimited(self) -> None:
        files = {
            "/proc/meminfo": meminfo(8 * GIB),
            "/proc/self/cgroup": "0::/user.slice/user-1000.slice/session-1.scope\n",
            "/sys/fs/cgroup/user.slice/user-1000.slice/session-1.scope/memory.max": "max\n",
            "/sys/fs/cgroup/user.slice/user-1000.slice/memory.max": "max\n",
            "/sys/fs/cgroup/user.slice/memory.max": "max\n",
        }
        self.assertEqual(self.budget(files), Budget(81, "1% of RAM"))

    def test_unreadable_cgroup_files(self) -> None:
        files = {"/proc/meminfo": meminfo(8 * GIB), "/proc/self/cgroup": "0::/somewhere\n"}
        self.assertEqual(self.budget(files), Budget(81, "1% of RAM"))


class CgroupLimitTests(SynchronousTestCase):
    def test_nothing_readable(self) -> None:
        self.assertIsNone(cgroup_memory_limit(fake({})))

    def test_parent_limit_caps_an_unlimited_child(self) -> None:
        files = {
            "/proc/self/cgroup": "0::/system.slice/xray.service\n",
            "/sys/fs/cgroup/system.slice/xray.service/memory.max": "max\n",
            "/sys/fs/cgroup/system.slice/memory.max": f"{GIB}\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_smallest_limit_on_the_path_wins(self) -> None:
        files = {
            "/proc/self/cgroup": "0::/a/b/c\n",
            "/sys/fs/cgroup/a/b/c/memory.max": f"{3 * GIB}\n",
            "/sys/fs/cgroup/a/b/memory.max": f"{GIB}\n",
            "/sys/fs/cgroup/a/memory.max": f"{2 * GIB}\n",
            "/sys/fs/cgroup/memory.max": f"{4 * GIB}\n",
            "/sys/fs/cgroup/other/memory.max": "1\n",  # not on our path
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_container_with_its_own_cgroup_namespace(self) -> None:
        # /proc/self/cgroup says "/", the container's limit is at the mount root.
        files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": "268435456\n"}
        self.assertEqual(cgroup_memory_limit(fake(files)), 256 * MIB)

    def test_no_proc_self_cgroup_reads_the_mount_roots(self) -> None:
        files = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{GIB}\n"}
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_v1_container_mounted_at_its_own_cgroup(self) -> None:
        # Docker without a cgroup namespace: /proc/self/cgroup names the host
        # path, but the container sees its own cgroup mounted as the root.
        files = {
            "/proc/self/cgroup": "9:memory:/docker/0123abc\n",
            "/proc/self/mountinfo": (
                "40 31 0:35 /docker/0123abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup "
                "rw,memory\n"
            ),
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{300 * MIB}\n",
            "/sys/fs/cgroup/memory/docker/0123abc/memory.limit_in_bytes": "1\n",  # not mounted
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), 300 * MIB)

    def test_v2_mount_of_a_subtree(self) -> None:
        files = {
            "/proc/self/cgroup": "0::/kubepods/pod7/ctr\n",
            "/proc/self/mountinfo": (
                "50 40 0:26 /kubepods/pod7 /host/cgroup rw - cgroup2 cgroup2 rw\n"
            ),
            "/host/cgroup/ctr/memory.max": "max\n",
            "/host/cgroup/memory.max": f"{700 * MIB}\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), 700 * MIB)

    def test_mount_point_with_escaped_space(self) -> None:
        files = {
            "/proc/self/cgroup": "0::/x\n",
            "/proc/self/mountinfo": "50 40 0:26 / /my\\040cgroups rw - cgroup2 cgroup2 rw\n",
            "/my cgroups/x/memory.max": f"{GIB}\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_v1_memory_controller_shared_with_others(self) -> None:
        files = {
            "/proc/self/cgroup": "3:cpu,memory:/grp\n",
            "/proc/self/mountinfo": (
                "35 31 0:31 / /sys/fs/cgroup/cpu,memory rw - cgroup cgroup rw,cpu,memory\n"
            ),
            "/sys/fs/cgroup/cpu,memory/grp/memory.limit_in_bytes": f"{GIB}\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_hybrid_hierarchy_uses_the_v1_memory_controller(self) -> None:
        files = {
            "/proc/self/cgroup": "0::/user.slice\n5:memory:/user.slice\n",
            "/proc/self/mountinfo": MOUNTINFO_V1
            + "41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n",
            "/sys/fs/cgroup/memory/user.slice/memory.limit_in_bytes": f"{GIB}\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)

    def test_unlimited_and_garbage_values(self) -> None:
        for value in ("max\n", V1_UNLIMITED, "\n", "lots\n", "-1\n", "1.5\n", str(1 << 62)):
            files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": value}
            self.assertIsNone(cgroup_memory_limit(fake(files)), value)
        files = {"/proc/self/cgroup": "0::/\n", "/sys/fs/cgroup/memory.max": f"{(1 << 62) - 1}\n"}
        self.assertEqual(cgroup_memory_limit(fake(files)), (1 << 62) - 1)

    def test_escaping_path_stays_at_the_mount_point(self) -> None:
        # A process outside our cgroup namespace root sees "/../..".
        files = {
            "/proc/self/cgroup": "0::/../../elsewhere\n",
            "/sys/fs/cgroup/memory.max": f"{GIB}\n",
            "/sys/elsewhere/memory.max": "1\n",
            "/sys/fs/memory.max": "1\n",
            "/sys/memory.max": "1\n",
        }
        self.assertEqual(cgroup_memory_limit(fake(files)), GIB)


class ReadTextTests(SynchronousTestCase):
    def test_reads_a_file(self) -> None:
        path = temp_path(self)
        with open(path, "w") as f:
            f.write("max\n")
        self.assertEqual(read_text(path), "max\n")

    def test_unreadable_is_none(self) -> None:
        self.assertIsNone(read_text(temp_path(self)))
        directory = temp_path(self)
        os.mkdir(directory)
        self.assertIsNone(read_text(directory))

    def test_real_budget_is_sane(self) -> None:
        budget = buffer_budget(0)
        self.assertGreaterEqual(budget.megabytes, MIN_BUFFER_MB)
        self.assertEqual(budget.bytes, budget.megabytes * MIB)
        host = host_memory_bytes()
        assert host is not None
        self.assertLessEqual(budget.megabytes, max(MIN_BUFFER_MB, host // 100 // MIB))
