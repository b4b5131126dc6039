"""The processes a benchmark runs: the sink, the daemon under test, the sender."""

from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from benchmarks import procstat
from benchmarks.sender import SendResult
from benchmarks.span_sender import SpanSendResult

# The daemon under test; placeholders are filled in by Daemon (see PLACEHOLDERS).
# twistd: -n stays in the foreground; --pidfile= writes no twistd.pid (so runs
# in parallel do not fight over one; twistd writes it even with -n otherwise).
DEFAULT_COMMAND = (
    "{twistd} -n --pidfile= xray --region us-east-2 -e {endpoint} -b {udp_address} -t {tcp_address}"
)
PLACEHOLDERS = {
    "python": "this Python interpreter",
    "twistd": "the twistd script next to this Python interpreter",
    "endpoint": "the sink's URL, http://127.0.0.1:<port>",
    "udp_port": "a free UDP port the daemon must listen on",
    "udp_address": "127.0.0.1:{udp_port}",
    "tcp_port": "a free TCP port (for daemons that also listen on TCP)",
    "tcp_address": "127.0.0.1:{tcp_port}",
    "otlp_port": "a free TCP port for the OTLP/HTTP receiver (--spans, --otlp-idle)",
    "otlp_address": "127.0.0.1:{otlp_port}",
    "config": "the --config-template file, rendered with these placeholders",
    "workdir": "the run's output directory",
}
# Dummy credentials: the sink does not check signatures.
DAEMON_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHMARK",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def daemon_environment(environ: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """This environment without its ``AWS_*`` settings, plus the dummy credentials.

    A machine's own ``AWS_CA_BUNDLE``, ``AWS_PROFILE``, ``AWS_REGION``, ... would
    change what either daemon loads or where it looks (a CA bundle costs
    xraytwisted ~0.7 MB and a warning): both daemons run as on a plain host.
    """
    kept = {key: value for key, value in environ.items() if not key.startswith("AWS_")}
    return {**kept, **DAEMON_ENV}


# Where ``python -m benchmarks.<module>`` works from, wherever the runner was started.
REPO = Path(__file__).resolve().parent.parent
_BANNER = re.compile(r"Effective configuration|Listening on|buffer memory|Using buffer")
_LOG_PROBLEM = re.compile(r"\[(Warn|Warning|Error|Critical)\]|Traceback|Unhandled", re.IGNORECASE)


def set_priority(nice: int) -> None:
    """Run this process, and every process it starts from now on, at ``nice``.

    On a machine shared with other work a negative value (root only) keeps
    the benchmark's processes from waiting behind it; CPU time per segment
    is not changed by it, only how soon the daemon gets a core.  With the
    kernel's autogroup scheduling on, ``nice`` only ranks processes within
    one session, so a session leader (start the runner with ``setsid``) also
    sets its session's autogroup nice, which covers the benchmark alone.
    """
    if not nice:
        return
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            autogroup = f.read().strip() == "1"
    except OSError:
        autogroup = False
    if not autogroup:
        return
    if os.getsid(0) == os.getpid():
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    else:
        print(
            "warning: autogroup scheduling is on; start this with setsid for --nice to "
            "rank the benchmark ahead of other sessions' work",
            file=sys.stderr,
        )


def free_port(kind: int) -> int:
    """A port that is free right now (``kind`` is SOCK_DGRAM or SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Managed:
    """A child process stopped with SIGTERM when the context exits."""

    proc: subprocess.Popen[Any]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ticking(self, every: float, tick: Callable[[], object]) -> None:
        """Until the process exits: ``tick()``, then wait up to ``every`` seconds, again."""
        while True:
            tick()
            try:
                self.proc.wait(every)
                return
            except subprocess.TimeoutExpired:
                pass

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, then wait up to ``timeout`` s (SIGKILL after); the exit status."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.terminate()


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a certificate for 127.0.0.1: (ca.pem, cert.pem, key.pem)."""
    import trustme  # benchmark-only (the test extra has it); only --tls needs it

    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(str(paths[0]))
    issued.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
    issued.private_key_pem.write_to_path(str(paths[2]))
    return paths


class Sink(_Managed):
    """``benchmarks.sink`` in its own process."""

    def __init__(self, verify: bool = False, tls_dir: Path | None = None) -> None:
        args = [sys.executable, "-m", "benchmarks.sink", "--port", "0"]
        if verify:
            args.append("--verify")
        # What the daemons need in their environment to reach this sink.
        self.daemon_env: dict[str, str] = {}
        context = None
        if tls_dir is not None:
            ca, cert, key = make_tls_files(tls_dir)
            args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            # xraytwisted takes its CA bundle from AWS_CA_BUNDLE; the Go daemon
            # builds its own HTTP client and ignores it, but Go's crypto/x509
            # reads SSL_CERT_FILE: both verify the sink's certificate.
            self.daemon_env["AWS_CA_BUNDLE"] = str(ca)
            self.daemon_env["SSL_CERT_FILE"] = str(ca)
            context = ssl.create_default_context(cafile=str(ca))
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"sink did not start: {line!r}")
        self.port = int(line.split()[1])
        if context is None:
            self.endpoint = f"http://127.0.0.1:{self.port}"
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        else:
            self.endpoint = f"https://127.0.0.1:{self.port}"
            self._conn = http.client.HTTPSConnection(
                "127.0.0.1", self.port, timeout=60, context=context
            )

    def __enter__(self) -> Sink:
        return self

    def _call(self, method: str, path: str) -> bytes:
        self._conn.request(method, path)
        return self._conn.getresponse().read()

    def stats(self) -> dict[str, int]:
        """Counters since the last ``take``: requests, docs, bytes, other, mismatches."""
        result: dict[str, int] = json.loads(self._call("GET", "/_bench/stats"))
        return result

    def take(self) -> list[tuple[float, int, float]]:
        """Every (arrival, id, sent) recorded since the last take; resets the sink."""
        records = []
        for line in self._call("POST", "/_bench/take").splitlines():
            arrival, doc_id, sent = line.split()
            records.append((float(arrival), int(doc_id, 16), float(sent)))
        return records

    def terminate(self, timeout: float = 30.0) -> int | None:
        self._conn.close()
        return super().terminate(timeout)


class Daemon(_Managed):
    """The daemon under test: any command, with placeholders filled in."""

    def __init__(
        self,
        command: str,
        endpoint: str,
        workdir: Path,
        *,
        name: str = "daemon",
        config_template: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.udp_port = free_port(socket.SOCK_DGRAM)
        tcp_port = free_port(socket.SOCK_STREAM)
        self.otlp_port = free_port(socket.SOCK_STREAM)
        # Only a command that names {otlp_address} or {otlp_port} receives spans.
        self.receives_spans = "{otlp_" in command
        values = {
            "python": sys.executable,
            "twistd": str(Path(sys.executable).parent / "twistd"),
            "endpoint": endpoint,
            "udp_port": str(self.udp_port),
            "udp_address": f"127.0.0.1:{self.udp_port}",
            "tcp_port": str(tcp_port),
            "tcp_address": f"127.0.0.1:{tcp_port}",
            "otlp_port": str(self.otlp_port),
            "otlp_address": f"127.0.0.1:{self.otlp_port}",
            "workdir": str(workdir),
            "config": "",
        }
        if config_template is not None:
            config = workdir / f"{name}.cfg.yaml"
            config.write_text(config_template.read_text().format_map(values))
            values["config"] = str(config)
        self.argv = [arg.format_map(values) for arg in shlex.split(command)]
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env={**daemon_environment(os.environ), **(env or {})},
        )

    def __enter__(self) -> Daemon:
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the daemon listens on UDP (and its OTLP port); raises if it exits or times out."""
        deadline = time.monotonic() + timeout
        while not procstat.udp_port_bound(self.udp_port) or (
            self.receives_spans and not procstat.tcp_port_listening(self.otlp_port)
        ):
            if not self.alive():
                raise RuntimeError(f"daemon exited ({self.proc.returncode}); see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not listening after {timeout} s; see {self.log_path}")
            time.sleep(0.05)

    def terminate(self, timeout: float = 30.0) -> int | None:
        status = super().terminate(timeout)
        self._log.close()
        return status

    def banner(self) -> list[str]:
        """The log lines that say how the daemon is configured (xraytwisted and Go)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if _BANNER.search(line)]

    def problems(self, limit: int = 20) -> tuple[int, list[str]]:
        """Warning/error lines in the log: (how many, the first ``limit``)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        bad = [line for line in lines if _LOG_PROBLEM.search(line)]
        return len(bad), bad[:limit]


class Sender(_Managed):
    """``benchmarks.sender`` in its own process (so pacing never waits on us)."""

    def __init__(
        self, port: int, rate: float, duration: float, first_seq: int, size: int = 1024
    ) -> None:
        args = [
            sys.executable, "-m", "benchmarks.sender", "--port", str(port),
            "--rate", str(rate), "--duration", str(duration),
            "--first-seq", str(first_seq), "--size", str(size),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def __enter__(self) -> Sender:
        return self

    def result(self) -> SendResult:
        """Wait for the sender to finish and return what it reports."""
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"sender failed with status {self.proc.returncode}")
        data = json.loads(out)
        data.pop("rate", None)
        return SendResult(**data)


class SpanSender(_Managed):
    """``benchmarks.span_sender`` in its own process."""

    def __init__(
        self,
        port: int,
        rate: float,
        duration: float,
        first_seq: int,
        size: int = 1024,
        batch: int = 512,
        delay: float = 5.0,
    ) -> None:
        args = [
            sys.executable, "-m", "benchmarks.span_sender", "--port", str(port),
            "--rate", str(rate), "--duration", str(duration), "--first-seq", str(first_seq),
            "--size", str(size), "--batch", str(batch), "--delay", str(delay),
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, cwd=REPO)

    def __enter__(self) -> SpanSender:
        return self

    def result(self) -> SpanSendResult:
        """Wait for the sender to finish and return what it reports."""
        out, _ = self.proc.communicate()
        if self.proc.returncode != 0:
            raise RuntimeError(f"span sender failed with status {self.proc.returncode}")
        data = json.loads(out)
        data.pop("rate", None)
        return SpanSendResult(**data)
