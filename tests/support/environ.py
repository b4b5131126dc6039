"""The process environment for tests: nothing from the developer's AWS or proxy settings.

:func:`isolated_environ` is what tests run in (``tests/__init__.py`` makes
``os.environ`` that at import, for any runner) and what they start child
processes with; ``tests.support.fake_metadata.aws_environment`` sets it, plus a
test's own values, for the length of one test.  Kept free of Twisted imports:
every test module imports it first.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping

__all__ = ["isolate_this_process", "isolated_environ"]

# What the variables in os.environ that could reach AWS code look like.
_AWS_PREFIXES = ("AWS_", "ECS_", "BOTO_")
_PROXY_NAMES = frozenset(
    {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"}
)


def isolated_environ(values: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """``os.environ`` without AWS, ECS and proxy settings, plus safe defaults and ``values``.

    Defaults: shared config/credentials files that do not exist (never the developer's
    ~/.aws) and ``AWS_EC2_METADATA_DISABLED=true``.  A value of None removes the name.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_AWS_PREFIXES) and k not in _PROXY_NAMES
    }
    env.update(
        {
            "AWS_CONFIG_FILE": "/nonexistent/xraytwisted-test/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/xraytwisted-test/aws-credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    for name, value in (values or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def isolate_this_process() -> None:
    """Make ``os.environ`` :func:`isolated_environ`, whoever runs the tests.

    tox sets ``AWS_EC2_METADATA_DISABLED`` and passes no AWS settings; other
    runners (plain trial, pytest, an IDE) pass the shell's, and then botocore's
    chain or the region lookup in ``makeService`` would try the real instance
    metadata address, a container endpoint or the developer's profiles.  Also
    makes ``PYTHONPATH`` entries absolute: the daemon processes the tests start
    run in temporary directories, where ``PYTHONPATH=src`` would find nothing.
    And hypothesis keeps its example database and caches under the system's
    temporary directory (``HYPOTHESIS_STORAGE_DIRECTORY``, unless set), not in
    ``.hypothesis/`` in the checkout.
    """
    wanted = isolated_environ()
    hypothesis = os.path.join(tempfile.gettempdir(), "xraytwisted-hypothesis")
    wanted.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", hypothesis)
    path = wanted.get("PYTHONPATH")
    if path:
        wanted["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(entry) if entry else entry for entry in path.split(os.pathsep)
        )
    for name in set(os.environ) - set(wanted):
        del os.environ[name]
    os.environ.update(wanted)
