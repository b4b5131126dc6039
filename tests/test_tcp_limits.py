"""The whole daemon with its TCP port under siege: a real twistd with a lowered RLIMIT_NOFILE.

Clients open many more connections than the descriptor limit allows and
hold them (a stream header and an unfinished line each).  The daemon must
refuse the excess itself (few, throttled log lines; no EMFILE floods), keep
the descriptors uploads and the spool need, upload every UDP segment it
accepted - also over a new connection to X-Ray opened while the siege goes
on - and shut down cleanly, with no unhandled errors.
"""

from __future__ import annotations

import contextlib
import re
import resource
import select
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import HEADER, TWISTD, clean_env
from tests.support.fake_sink import FakeSink

SRC = Path(__file__).resolve().parents[1] / "src"
NOFILE = 48


def _low_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


def segment(i: int) -> bytes:
    return HEADER + (
        b'{"id":"%016x","trace_id":"1-5f84c7a1-6b4cdbb1a6b2b0a0e8a1c0f2","name":"s",'
        b'"start_time":1,"end_time":2}' % i
    )


class SiegeTests(SynchronousTestCase):
    def wait_for(self, what: str, predicate: object, output: object, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():  # type: ignore[operator]
                return
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout}s:\n{output()}")  # type: ignore[operator]

    def test_more_connections_than_descriptors(self) -> None:
        work = Path(tempfile.mkdtemp(prefix="xray-siege-"))
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", str(work)], check=False))
        sink = FakeSink(work / "sink").start()
        self.addCleanup(sink.stop)
        out_path = work / "daemon.out"
        with open(out_path, "wb") as out:
            daemon = subprocess.Popen(
                [*TWISTD, "-n", "--pidfile=", "xray", "-m", "3", "-o", "-n", "us-east-1",
                 # A name, so that uploads need a lookup (which needs descriptors).
                 "-e", sink.url.replace("127.0.0.1", "localhost"),
                 "-b", "127.0.0.1:0", "-t", "127.0.0.1:0", "--spool-dir", str(work / "spool")],
                env=clean_env({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET",
                               "PYTHONPATH": str(SRC)}),
                cwd=work, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_low_nofile,
            )  # fmt: skip
        self.addCleanup(lambda: daemon.poll() is None and daemon.kill())

        def output() -> str:
            return out_path.read_text(errors="replace")

        ports: dict[str, int] = {}

        def listening() -> bool:
            udp = re.search(r"Listening on UDP \S+:(\d+)", output())
            tcp = re.search(r"Starting proxy http server on \S+:(\d+)", output())
            if udp and tcp:
                ports.update(udp=int(udp.group(1)), tcp=int(tcp.group(1)))
            return bool(ports)

        self.wait_for("listening", listening, output)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for i in range(50):
                udp.sendto(segment(i), ("127.0.0.1", ports["udp"]))
        self.wait_for("first uploads", lambda: sink.stats()["unique"] >= 50, output)

        limit = re.search(r" tcp-max-connections=(\d+) ", output())
        assert limit is not None, output()
        allowed = int(limit.group(1))
        self.assertLess(allowed, NOFILE // 2)  # derived from the lowered limit
        held: list[socket.socket] = []
        self.addCleanup(lambda: [s.close() for s in held])
        for _ in range(3 * NOFILE):
            sock = socket.create_connection(("127.0.0.1", ports["tcp"]), timeout=5)
            held.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(HEADER + b'{"id":"unfinished')
        # All but `allowed` of them are closed by the daemon, at once.
        closed: set[socket.socket] = set()

        def refused_the_rest() -> bool:
            readable, _, _ = select.select([s for s in held if s not in closed], [], [], 0.1)
            for sock in readable:
                with contextlib.suppress(OSError):
                    if sock.recv(1):
                        continue
                closed.add(sock)
            return len(closed) >= len(held) - allowed

        self.wait_for("connections over the limit closed", refused_the_rest, output)

        # X-Ray drops its connections: the next upload needs a new one.
        sink.set_mode("refuse")
        time.sleep(0.3)
        sink.set_mode("ok")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            for i in range(50, 150):
                udp.sendto(segment(i), ("127.0.0.1", ports["udp"]))
        self.wait_for("uploads during the siege", lambda: sink.stats()["unique"] >= 150, output)

        daemon.send_signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(60), 0, output())
        text = output()
        for bad in ("Unhandled", "Too many open files", "EMFILE", "unknown host", "Traceback"):
            self.assertNotIn(bad, text)
        self.assertIn("Refusing TCP connection from 127.0.0.1:", text)
        self.assertLess(text.count("Refusing TCP connection"), 5)  # throttled
        self.assertIn("The file descriptor limit (ulimit -n) is 48", text)
