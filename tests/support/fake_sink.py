"""A fake X-Ray ``PutTraceSegments`` endpoint for real-process tests.

The endpoint runs in a subprocess (its own reactor, so the test process is
free to block), on 127.0.0.1 only.  The test drives it through
``FakeSink``::

    sink = FakeSink(workdir).start()          # mode "ok"
    daemon = DaemonProcess(["-e", sink.url, ...], fake_credentials_env(), ...)
    sink.set_mode("refuse")                   # the listening socket is closed
    sink.set_mode("503")                      # 503 ServiceUnavailable
    sink.set_mode("429")                      # 429 + x-amzn-ErrorType: ThrottledException
    sink.set_mode("stall")                    # accept the request, never answer
    sink.set_mode("ok", delay=0.05)           # 200, each answer 50 ms late
    sink.wait_for_unique(1000, timeout=30)    # ids seen in accepted uploads
    sink.stop()

Modes:

* ``ok``: 200 ``{"UnprocessedTraceSegments":[]}``; every document is counted.
* ``refuse``: the listening socket is closed and open connections are
  aborted, so connects fail with ECONNREFUSED (the port number is kept:
  switching back listens on it again).
* ``503`` / ``429``: the error answers X-Ray gives; nothing is counted as
  received.
* ``stall``: the request is read and never answered (timeouts).

Signatures are not checked (``tests.support.moto`` does that).  Documents
are counted by their ``"id"``; a document that is not JSON (fuzzing) counts
under ``no_id``.  Only documents of 200 answers count.

Control API (HTTP GET on ``control_port``): ``/mode?set=M[&delay=S]``,
``/stats``, ``/ids``, ``/reset``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from tests.support.fake_endpoint import Control, FakeEndpoint, serve_control

MODES = ("ok", "refuse", "503", "429", "stall")
_ID = re.compile(r'"id"\s*:\s*"([^"\\]{1,64})"')


# ---------------------------------------------------------------------------
# The test side


class FakeSink(FakeEndpoint):
    """Starts, drives and stops the endpoint subprocess."""

    module = __file__
    modes = MODES
    title = "fake sink"
    log_name = "fake_sink.log"

    def __init__(self, workdir: str | Path, mode: str = "ok") -> None:
        super().__init__(workdir, [mode])
        self.initial_mode = mode

    def start(self, timeout: float = 20) -> FakeSink:
        self._start(timeout)
        return self

    def set_mode(self, mode: str, delay: float = 0.0) -> None:
        self._set_mode(mode, delay=delay)

    def stats(self) -> dict[str, Any]:
        """mode, requests (by answer), documents, unique, duplicates, no_id."""
        return super().stats()

    def ids(self) -> set[str]:
        return set(self._get("/ids")["ids"])

    def wait_for_unique(self, count: int, timeout: float = 30) -> dict[str, Any]:
        """Poll until at least ``count`` unique ids arrived; returns the stats."""
        return self._wait_for("unique", count, timeout, "ids")


def fake_credentials(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Credentials for the daemon's signer (the sink does not check them)."""
    env = {"AWS_ACCESS_KEY_ID": "AKIDFAKESINK", "AWS_SECRET_ACCESS_KEY": "fake/secret"}
    env.update(extra or {})
    return env


# ---------------------------------------------------------------------------
# The endpoint process


def serve(mode: str) -> None:  # pragma: no cover - runs in the subprocess
    from twisted.internet import reactor as _reactor
    from twisted.internet.protocol import connectionDone
    from twisted.python.failure import Failure
    from twisted.web.http import HTTPChannel
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site

    reactor: Any = _reactor

    class State:
        def __init__(self) -> None:
            self.mode = mode
            self.delay = 0.0
            self.port: Any = None
            self.port_number = 0
            self.channels: set[HTTPChannel] = set()
            self.reset()

        def reset(self) -> None:
            self.ids: dict[str, int] = {}
            self.documents = 0
            self.no_id = 0
            self.requests: dict[str, int] = {}
            self.bad_requests = 0

        def listen(self) -> None:
            if self.port is None:
                self.port = reactor.listenTCP(self.port_number, site, interface="127.0.0.1")
                self.port_number = self.port.getHost().port

        def refuse(self) -> None:
            port, self.port = self.port, None
            if port is not None:
                port.stopListening()
            for channel in list(self.channels):
                abort = getattr(channel.transport, "abortConnection", None)
                if abort is not None:
                    abort()

        def stats(self) -> dict[str, Any]:
            return {
                "mode": self.mode,
                "requests": self.requests,
                "documents": self.documents,
                "unique": len(self.ids),
                "duplicates": self.documents - self.no_id - len(self.ids),
                "no_id": self.no_id,
                "bad_requests": self.bad_requests,
            }

    state = State()

    class Channel(HTTPChannel):
        def connectionMade(self) -> None:
            super().connectionMade()
            state.channels.add(self)

        def connectionLost(self, reason: Failure = connectionDone) -> None:
            state.channels.discard(self)
            super().connectionLost(reason)

    def answer(request: Request, status: int, body: dict[str, Any], **headers: str) -> None:
        if request.finished or request._disconnected:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/x-amz-json-1.1")
        for name, value in headers.items():
            request.setHeader(name.replace("_", "-").encode(), value.encode())
        request.write(json.dumps(body).encode())
        request.finish()

    def count(body: bytes) -> bool:
        try:
            docs = json.loads(body)["TraceSegmentDocuments"]
        except (ValueError, KeyError, TypeError):
            return False
        for doc in docs:
            found = None
            try:
                parsed = json.loads(doc)
                if isinstance(parsed, dict) and isinstance(parsed.get("id"), str):
                    found = parsed["id"]
            except (ValueError, TypeError):
                match = _ID.search(doc) if isinstance(doc, str) else None
                found = match.group(1) if match else None
            state.documents += 1
            if found is None:
                state.no_id += 1
            else:
                state.ids[found] = state.ids.get(found, 0) + 1
        return True

    class TraceSegments(Resource):
        isLeaf = True

        def render_POST(self, request: Request) -> Any:
            current = state.mode
            state.requests[current] = state.requests.get(current, 0) + 1
            if current == "stall":
                return NOT_DONE_YET
            reply: dict[str, Any]
            headers: dict[str, str] = {}
            body = request.content.read() if request.content is not None else b""
            if request.path != b"/TraceSegments":
                status, reply = 200, {}
            elif current == "503":
                status = 503
                reply = {"__type": "ServiceUnavailableException", "message": "fake outage"}
            elif current == "429":
                status, headers = 429, {"x_amzn_ErrorType": "ThrottledException"}
                reply = {"__type": "ThrottledException", "message": "Rate exceeded"}
            elif count(body):
                status, reply = 200, {"UnprocessedTraceSegments": []}
            else:
                state.bad_requests += 1
                status = 400
                reply = {"__type": "InvalidRequestException", "message": "bad body"}
            if state.delay > 0:
                reactor.callLater(state.delay, answer, request, status, reply, **headers)
            else:
                answer(request, status, reply, **headers)
            return NOT_DONE_YET

    def set_mode(args: dict[str, str]) -> dict[str, Any]:
        state.mode = args.get("set", state.mode)
        state.delay = float(args.get("delay", 0) or 0)
        if state.mode == "refuse":
            state.refuse()
        else:
            state.listen()
        return {"mode": state.mode}

    def reset(args: dict[str, str]) -> dict[str, Any]:
        state.reset()
        return {}

    site = Site(TraceSegments())
    site.protocol = Channel  # type: ignore[assignment,method-assign]
    site.noisy = False
    state.listen()
    if mode == "refuse":
        state.refuse()
    control: dict[bytes, Control] = {
        b"/mode": set_mode,
        b"/stats": lambda args: state.stats(),
        b"/ids": lambda args: {"ids": list(state.ids)},
        b"/reset": reset,
    }
    serve_control(reactor, control, state.port_number)


if __name__ == "__main__":  # pragma: no cover
    if len(sys.argv) != 3 or sys.argv[1] != "serve" or sys.argv[2] not in MODES:
        sys.exit(f"usage: {sys.argv[0]} serve {{{'|'.join(MODES)}}}")
    serve(sys.argv[2])
