"""Temporary directories for tests: real ones, never in the checkout.

trial's ``TestCase.mktemp()`` is relative to the working directory: under
trial that is ``_trial_temp``, but any other runner (or a test started from
an IDE) writes ``tests.<module>/<Class>/<method>/`` into the checkout.  These
helpers use the system's temporary directory instead and remove what they
made when the test is over, read-only leftovers included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from typing import Any

__all__ = ["temp_dir", "temp_path"]


def _remove(path: str) -> None:
    def make_writable_and_retry(function: Any, failed: str, _exc_info: Any) -> None:
        # A test may leave a read-only directory (or file) behind.
        parent = os.path.dirname(failed)
        for target in (parent, failed):
            with contextlib.suppress(OSError):
                os.chmod(target, os.stat(target).st_mode | stat.S_IRWXU)
        with contextlib.suppress(OSError):
            function(failed)

    shutil.rmtree(path, onerror=make_writable_and_retry)


def temp_dir(case: Any, prefix: str = "xraytwisted-test-") -> str:
    """A new, empty directory (absolute path), removed at the test's cleanup."""
    path = tempfile.mkdtemp(prefix=prefix)
    case.addCleanup(_remove, path)
    return path


def temp_path(case: Any, name: str = "temp") -> str:
    """Like ``mktemp()``: an absolute path that does not exist yet, in a new
    directory of its own that is removed at the test's cleanup."""
    return os.path.join(temp_dir(case), name)
