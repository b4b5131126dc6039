"""Hostile storage for tests: a tiny real tmpfs.

``small_tmpfs`` mounts a real tmpfs (so "disk full" is the kernel's ENOSPC,
not a patched call) inside a fresh temporary directory and unmounts it in
the test's cleanup.  Where mounting is not permitted (not root, a
container without CAP_SYS_ADMIN) the test is skipped, with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.support.tempdirs import temp_dir


def small_tmpfs(case: SynchronousTestCase, size: str = "256k") -> str:
    """A tmpfs of ``size`` mounted on a new temporary directory; SkipTest if not permitted.

    Unmounted by a cleanup that runs after any registered later (so close
    what is open on it with ``addCleanup`` after calling this).
    """
    base = temp_dir(case, "xray-tmpfs-")
    mount = shutil.which("mount")
    if mount is None:
        raise SkipTest("no mount command: cannot create a small tmpfs")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", base],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SkipTest(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    case.addCleanup(_unmount, base)
    if not os.path.ismount(base):
        raise SkipTest(f"mount reported success but {base} is not a mount point")
    return base


def _unmount(path: str) -> None:
    umount = shutil.which("umount") or "umount"
    if subprocess.run([umount, path], capture_output=True, check=False).returncode != 0:
        # Something still holds it open (a failed test): detach it lazily.
        subprocess.run([umount, "-l", path], capture_output=True, check=False)
