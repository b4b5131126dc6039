"""The test suite's own environment: whatever runs it, no AWS or proxy settings leak in,
and temporary files stay out of the checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import TestResult

from twisted.trial.unittest import SynchronousTestCase

from tests.support.tempdirs import temp_path

ROOT = Path(__file__).resolve().parent.parent


class IsolatedEnvironmentTests(SynchronousTestCase):
    def test_importing_the_suite_isolates_the_process(self) -> None:
        shell = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": "src",  # relative, as in the README's trial command
            "KEEP_ME": "1",
            "AWS_PROFILE": "production",
            "AWS_EC2_METADATA_DISABLED": "false",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": "http://169.254.170.23/v1/credentials",
            "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/secrets/token",
            "AWS_REGION": "eu-west-1",
            "ECS_CONTAINER_METADATA_URI_V4": "http://169.254.170.2/v4/x",
            "HTTPS_PROXY": "http://proxy.invalid:3128",
        }
        result = subprocess.run(
            [sys.executable, "-c", "import json, os, tests; print(json.dumps(dict(os.environ)))"],
            cwd=ROOT,
            env=shell,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        env = json.loads(result.stdout)
        self.assertEqual(
            {k: v for k, v in env.items() if k.startswith(("AWS_", "ECS_")) or "PROXY" in k},
            {
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": "/nonexistent/xraytwisted-test/aws-config",
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/xraytwisted-test/aws-credentials",
            },
        )
        self.assertEqual(env["KEEP_ME"], "1")
        self.assertEqual(env["PYTHONPATH"], str(ROOT / "src"))
        hypothesis = Path(env["HYPOTHESIS_STORAGE_DIRECTORY"])
        self.assertTrue(hypothesis.is_absolute())
        self.assertFalse(hypothesis.resolve().is_relative_to(ROOT), hypothesis)

    def test_this_process_is_isolated(self) -> None:
        self.assertEqual(os.environ.get("AWS_EC2_METADATA_DISABLED"), "true")
        self.assertEqual(
            sorted(k for k in os.environ if k.startswith("AWS_")),
            ["AWS_CONFIG_FILE", "AWS_EC2_METADATA_DISABLED", "AWS_SHARED_CREDENTIALS_FILE"],
        )


class TempDirTests(SynchronousTestCase):
    def test_temp_paths_are_outside_the_checkout_and_removed(self) -> None:
        made: list[str] = []

        class Case(SynchronousTestCase):
            def test_it(self) -> None:
                path = temp_path(self)
                made.append(path)
                os.makedirs(os.path.join(path, "locked"))
                os.chmod(os.path.join(path, "locked"), 0o500)  # rmtree needs a retry

        result = TestResult()
        Case("test_it").run(result)
        self.assertEqual((result.errors, result.failures), ([], []))
        [path] = made
        self.assertTrue(os.path.isabs(path))
        self.assertFalse(Path(path).resolve().is_relative_to(ROOT), path)
        self.assertFalse(os.path.exists(os.path.dirname(path)), path)
