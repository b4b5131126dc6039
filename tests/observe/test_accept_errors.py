"""Twisted's accept()-out-of-descriptors lines, throttled (xraytwisted.observe.accept_errors).

The first test is the adapter's tripwire: a real twisted.internet.tcp.Port
in a child process with a lowered RLIMIT_NOFILE, used up, and clients
connecting from this process.  If Twisted changes what it logs there, the
filter no longer recognises it and the test fails.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.support.daemon import clean_env
from xraytwisted.listen.adopted_port import AdoptedPortService
from xraytwisted.observe.accept_errors import GAVE_UP, NAMESPACE, AcceptErrorFilter

SRC = Path(__file__).resolve().parents[2] / "src"

CHILD = textwrap.dedent(
    """
    import json, os, resource, sys
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogBeginner, formatEvent
    from xraytwisted.observe.accept_errors import AcceptErrorFilter, NAMESPACE

    raw, shown = [], []
    def collect(event):
        shown.append({"level": event["log_level"].name, "text": formatEvent(event)})
    accept_filter = AcceptErrorFilter(collect, reactor)
    def observer(event):
        if str(event.get("log_namespace", "")).startswith(NAMESPACE):
            raw.append(event.get("log_format"))
            if raw.count("EMFILE recovery: Closed socket from {address}") == 5:
                reactor.callLater(0.2, done)
        accept_filter(event)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    factory = Factory.forProtocol(Protocol)
    factory.noisy = False
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    held = []
    def fill():
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                break
        print(port.getHost().port, flush=True)
    finished = []
    def done():
        if finished:
            return
        finished.append(1)
        for fd in held:
            os.close(fd)
        print(json.dumps({"raw": raw, "shown": shown}), flush=True)
        reactor.stop()
    reactor.callWhenRunning(fill)
    reactor.callLater(20, done)  # bounded, whatever happens
    reactor.run()
    """
)


class RealPortTests(SynchronousTestCase):
    def test_a_port_out_of_descriptors_is_recognised_and_quiet(self) -> None:
        with tempfile.TemporaryDirectory() as work:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD],
                env=clean_env({"PYTHONPATH": str(SRC)}),
                cwd=work,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            self.addCleanup(child.wait, 10)
            self.addCleanup(child.kill)
            assert child.stdout is not None
            ready, _, _ = select.select([child.stdout], [], [], 30)
            self.assertTrue(ready, "child did not start")
            port = int(child.stdout.readline())
            clients = []
            for _ in range(5):
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                clients.append(sock)
                # Accepted and closed at once by the port's EMFILE recovery.
                sock.settimeout(5)
                self.assertEqual(sock.recv(1), b"")
            for sock in clients:
                sock.close()
            out, err = child.communicate(timeout=30)
        self.assertEqual(child.returncode, 0, err)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        raw, shown = result["raw"], result["shown"]
        self.assertIn("EMFILE recovery: Closed socket from {address}", raw)
        loud = [
            s["text"] for s in shown if s["level"] != "debug" and "starting on" not in s["text"]
        ]
        # Five connections closed: one warning, the rest at debug.
        self.assertEqual(len(loud), 1, loud)
        self.assertIn("Out of file descriptors: TCP connections are being closed", loud[0])
        self.assertIn("ulimit -n", loud[0])


class FilterTests(SynchronousTestCase):
    def event(self, fmt: str, **fields: object) -> dict[str, Any]:
        return {
            "log_format": fmt,
            "log_level": LogLevel.info,
            "log_namespace": NAMESPACE + ".Port",
            "log_time": 0.0,
            **fields,
        }

    def test_throttled_and_the_listener_paused_when_accept_gives_up(self) -> None:
        clock = Clock()
        seen: list[dict[str, Any]] = []
        paused: list[int] = []
        accept_filter = AcceptErrorFilter(
            seen.append, clock, on_accept_error=lambda: paused.append(1)
        )
        other = {"log_format": "hello", "log_level": LogLevel.info, "log_namespace": "x"}
        accept_filter(other)
        for _ in range(3):
            accept_filter(self.event(GAVE_UP, acceptError="EMFILE"))
        clock.advance(10)
        accept_filter(self.event(GAVE_UP, acceptError="EMFILE"))
        warnings = [formatEvent(e) for e in seen if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 2)
        self.assertIn("(1 times since the last such line)", warnings[0])
        self.assertIn("(3 times since the last such line)", warnings[1])
        self.assertIs(seen[0], other)
        self.assertEqual(
            [e["log_level"] for e in seen if e.get("log_format") == GAVE_UP], [LogLevel.debug] * 4
        )
        self.assertEqual(len(paused), 4)


class _Port:
    def __init__(self) -> None:
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class PauseTests(SynchronousTestCase):
    def test_pause_accepting_stops_reading_for_a_while(self) -> None:
        clock = Clock()
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            service = AdoptedPortService(clock, sock)
            port = service.port = _Port()
            service.pause_accepting(1.0)
            service.pause_accepting(1.0)  # already paused: one resume only
            self.assertFalse(port.reading)
            clock.advance(1.0)
            self.assertTrue(port.reading)
            self.assertEqual(clock.getDelayedCalls(), [])
            service.pause_accepting(1.0)
            service.port = None
            service._socket = None
            service.stopService()
            self.assertEqual(clock.getDelayedCalls(), [])
