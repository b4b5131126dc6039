"""What the fake X-Ray endpoints of real-process tests share.

Each fake (``tests.support.fake_sink``, ``tests.support.fake_otlp``) is a
twisted.web server in a subprocess (its own reactor, so the test process is
free to block), on 127.0.0.1 only, driven over a control port with HTTP GET
requests that answer JSON.  This module holds both halves of that
scaffolding: ``FakeEndpoint``, the test side (start the subprocess, learn its
ports, send control requests, poll, stop), and ``serve_control``, the server
side (the control port, the line that tells the test the ports, stopping
when the test process is gone).  What an endpoint answers and records is
each fake's own.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

# The repository root: the subprocess imports the fakes as ``tests.support.*``.
_ROOT = str(Path(__file__).resolve().parents[2])


class FakeEndpoint:
    """The test side of one fake endpoint subprocess.

    A subclass names its server module (run as ``python MODULE serve
    ARGS...``), its modes and what it is called in messages.
    """

    module: ClassVar[str]  # the file the subprocess runs
    modes: ClassVar[tuple[str, ...]]
    title: ClassVar[str]  # "fake sink": for messages
    log_name: ClassVar[str]  # the subprocess's stderr, in ``workdir``

    def __init__(self, workdir: str | Path, args: Sequence[str]) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.control_port = 0
        self.log_path = self.workdir / self.log_name

    @property
    def url(self) -> str:
        """The endpoint to give the daemon (``-e``)."""
        return f"http://127.0.0.1:{self.port}"

    def _start(self, timeout: float) -> None:
        env = dict(os.environ, PYTHONPATH=_ROOT)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, os.path.abspath(self.module), "serve", *self.args],
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=self.workdir,
                env=env,
            )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else b""
        if not line:
            self.stop()
            raise AssertionError(f"{self.title} did not start:\n{self.log_text()}")
        ports = json.loads(line)
        self.port, self.control_port = ports["port"], ports["control"]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _get(self, path: str, **query: object) -> Any:
        url = f"http://127.0.0.1:{self.control_port}{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def _set_mode(self, mode: str, **query: object) -> None:
        if mode not in self.modes:
            raise ValueError(f"unknown mode {mode!r}; use one of {self.modes}")
        self._get("/mode", set=mode, **query)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._get("/stats")
        return result

    def reset(self) -> None:
        self._get("/reset")

    def _wait_for(self, key: str, count: int, timeout: float, what: str) -> dict[str, Any]:
        """Poll the stats until ``stats[key] >= count``; returns the stats."""
        deadline = time.monotonic() + timeout
        stats = self.stats()
        while stats[key] < count and time.monotonic() < deadline:
            time.sleep(0.1)
            stats = self.stats()
        if stats[key] < count:
            raise AssertionError(f"only {stats[key]} of {count} {what} arrived: {stats}")
        return stats

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


# ---------------------------------------------------------------------------
# The server side


Control = Callable[[dict[str, str]], Any]


def serve_control(reactor: Any, control: Mapping[bytes, Control], port: int) -> None:
    """Serve the control API, tell the test the ports, and run the reactor.

    ``control`` maps a path to what answers it: called with the query, it
    returns what to answer as JSON (any other path is a 404).
    ``port`` is the endpoint's own port, already listening.  The reactor
    stops when the test process that started this one is gone.
    """
    from twisted.internet.task import LoopingCall
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class ControlResource(Resource):
        isLeaf = True

        def render_GET(self, request: Request) -> bytes:
            args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
            answer = control.get(request.path)
            result: Any = {}
            if answer is None:
                request.setResponseCode(404)
            else:
                result = answer(args)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(result).encode()

    site = Site(ControlResource())
    site.noisy = False
    control_port = reactor.listenTCP(0, site, interface="127.0.0.1")
    parent = os.getppid()

    def orphaned() -> None:
        if os.getppid() != parent:  # the test process died: do not linger
            reactor.stop()

    LoopingCall(orphaned).start(1.0, now=False)
    sys.stdout.write(json.dumps({"port": port, "control": control_port.getHost().port}) + "\n")
    sys.stdout.flush()
    reactor.run()
