"""Run the daemon as a real ``twistd`` process in tests.

The daemon is started with ``-b 127.0.0.1:0`` by default, so the kernel picks
a free port; the port is read back from the "Listening on UDP" log line.
Every wait is a bounded loop: a daemon that never gets ready fails the test
with its output instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
HEADER = b'{"format":"json","version":1}\n'
_LISTENING = re.compile(r"Listening on UDP (\[?[0-9a-fA-F.:]+\]?):(\d+)")


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a daemon under test: no real AWS settings leak in."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
        and k not in ("NO_PROXY", "no_proxy")
    }
    env.update(
        {
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": "/nonexistent/aws-config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if extra:
        env.update(extra)
    return env


def run_json_script(script: Path, *args: str) -> Any:
    """Run a Python script (an SDK app) in a clean environment; its last stdout line, as JSON."""
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"SDK app failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_twistd(
    args: Sequence[str], env: Mapping[str, str], cwd: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run twistd to completion (for commands that are expected to exit)."""
    return subprocess.run(
        [*TWISTD, *args],
        env=dict(env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class DaemonProcess:
    """``twistd -n xray ARGS`` in the foreground, output to a file."""

    def __init__(
        self,
        args: Sequence[str],
        env: Mapping[str, str],
        workdir: str,
        twistd_args: Sequence[str] = ("-n",),
    ) -> None:
        self.args = list(args)
        self.env = dict(env)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.output_path = self.workdir / "daemon.out"
        self.twistd_args = list(twistd_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.udp_port = 0

    def start(self, timeout: float = 30) -> DaemonProcess:
        out = open(self.output_path, "wb")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                [*TWISTD, *self.twistd_args, "xray", *self.args],
                env=self.env,
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            out.close()
        match = self.wait_for_log(_LISTENING, timeout)
        self.udp_port = int(match.group(2))
        return self

    def output(self) -> str:
        try:
            return self.output_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str | re.Pattern[str], timeout: float = 30) -> re.Match[str]:
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(self.output())
            if match:
                return match
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} before logging "
                    f"{regex.pattern!r}:\n{self.output()}"
                )
            time.sleep(0.02)
        raise AssertionError(
            f"daemon did not log {regex.pattern!r} in {timeout}s:\n{self.output()}"
        )

    def send(self, *bodies: bytes, header: bytes = HEADER) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for body in bodies:
                s.sendto(header + body, ("127.0.0.1", self.udp_port))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = 30) -> int:
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
            raise AssertionError(
                f"daemon did not exit within {timeout}s:\n{self.output()}"
            ) from None

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
