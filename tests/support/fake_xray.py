"""A fake X-Ray sampling API on a real loopback port, checking every SigV4 signature.

``FakeXRay`` is a twisted.web resource: it verifies each request's
signature with ``tests.support.sigcheck.verify`` and the keys it was given
(a mismatch is answered 403 ``InvalidSignatureException``, as AWS does),
records what it saw, and answers

* ``POST /GetSamplingRules``: ``RULES`` (the Default rule and a custom one,
  shaped as in sdk-and-api.md section 1.6);
* ``POST /SamplingTargets``: one target per statistics document it received;
* any other path: ``{}`` (or ``canned`` responses set by a test).

``mode`` switches it to ``"hang"`` (never answer), ``"error"`` (answer
``error_status`` with a JSON error body) or ``"close"`` (drop the connection
without answering).  ``start_fake_xray`` listens on 127.0.0.1:0 in the
running reactor; ``FakeXRayServer.close`` stops it and waits until every
connection to it is gone, so trial's reactor stays clean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from tests.support.sigcheck import SignatureMismatch, verify

RULE_MODIFIED_AT = 1530558121.0

RULES: dict[str, Any] = {
    "SamplingRuleRecords": [
        {
            "SamplingRule": {
                "RuleName": "Default",
                "RuleARN": "arn:aws:xray:us-east-2::sampling-rule/Default",
                "ResourceARN": "*",
                "Priority": 10000,
                "FixedRate": 0.01,
                "ReservoirSize": 0,
                "ServiceName": "*",
                "ServiceType": "*",
                "Host": "*",
                "HTTPMethod": "*",
                "URLPath": "*",
                "Version": 1,
                "Attributes": {},
            },
            "CreatedAt": 0.0,
            "ModifiedAt": RULE_MODIFIED_AT,
        },
        {
            "SamplingRule": {
                "RuleName": "fake-checkout",
                "RuleARN": "arn:aws:xray:us-east-2:123456789012:sampling-rule/fake-checkout",
                "ResourceARN": "*",
                "Priority": 100,
                "FixedRate": 0.05,
                "ReservoirSize": 2,
                "ServiceName": "checkout",
                "ServiceType": "*",
                "Host": "*",
                "HTTPMethod": "POST",
                "URLPath": "/cart/*",
                "Version": 1,
                "Attributes": {},
            },
            "CreatedAt": 1530000000.0,
            "ModifiedAt": RULE_MODIFIED_AT,
        },
    ]
}

# What /SamplingTargets gives each rule it hears about.
TARGET_RATES = {"Default": 0.02, "fake-checkout": 0.5}


@dataclass
class Seen:
    """One request as the fake received it."""

    method: str
    uri: str
    path: str
    headers: dict[str, str]  # lower-case names, last value
    raw_headers: list[tuple[str, list[str]]]
    body: bytes
    auth: dict[str, str] = field(default_factory=dict)  # parsed Authorization, if valid
    signature_error: str = ""


class FakeXRay(Resource):
    isLeaf = True

    def __init__(self, *, access_key: str, secret_key: str, region: str) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.mode = "normal"
        self.error_status = 500
        self.canned: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[Seen] = []
        self.hanging: list[Request] = []
        self.now = 1795304100.0  # ReservoirQuotaTTL base; a fixed, plausible time

    @property
    def signature_errors(self) -> list[str]:
        return [seen.signature_error for seen in self.requests if seen.signature_error]

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        body = request.content.read()
        raw = [
            (name.decode("latin-1"), [v.decode("latin-1") for v in values])
            for name, values in request.requestHeaders.getAllRawHeaders()
        ]
        headers = {name.lower(): values[-1] for name, values in raw}
        seen = Seen(
            method=request.method.decode("ascii"),
            uri=request.uri.decode("latin-1"),
            path=request.path.decode("latin-1"),
            headers=headers,
            raw_headers=raw,
            body=body,
        )
        self.requests.append(seen)
        try:
            seen.auth = verify(
                method=seen.method,
                url=f"http://{headers.get('host', '')}{seen.uri}",
                headers=headers,
                body=body,
                access_key=self.access_key,
                secret_key=self.secret_key,
                region=self.region,
            )
        except (SignatureMismatch, KeyError, ValueError) as e:
            seen.signature_error = str(e) or type(e).__name__
            return self._json(request, 403, _error("InvalidSignatureException", str(e)))

        if self.mode == "hang":
            self.hanging.append(request)
            return NOT_DONE_YET
        if self.mode == "close":
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.abortConnection()
            return NOT_DONE_YET
        if self.mode == "error":
            return self._json(
                request,
                self.error_status,
                _error("InternalFailure", f"fake X-Ray failing with {self.error_status}"),
            )
        canned = self.canned.get(seen.path)
        if canned is not None:
            status, extra, answer = canned
            request.setResponseCode(status)
            for name, value in extra.items():
                request.setHeader(name, value)
            return answer
        if seen.path == "/GetSamplingRules":
            return self._json(request, 200, RULES)
        if seen.path == "/SamplingTargets":
            try:
                targets = self._targets(body)
            except (ValueError, AttributeError, KeyError, TypeError) as e:
                return self._json(request, 400, _error("InvalidRequestException", repr(e)))
            return self._json(request, 200, targets)
        return self._json(request, 200, {})

    def _targets(self, body: bytes) -> dict[str, Any]:
        stats = json.loads(body).get("SamplingStatisticsDocuments", [])
        return {
            "SamplingTargetDocuments": [
                {
                    "RuleName": doc["RuleName"],
                    "FixedRate": TARGET_RATES.get(doc["RuleName"], 0.1),
                    "ReservoirQuota": 7,
                    "ReservoirQuotaTTL": self.now + 60,
                    "Interval": 10,
                }
                for doc in stats
            ],
            "LastRuleModification": RULE_MODIFIED_AT,
            "UnprocessedStatistics": [],
        }

    @staticmethod
    def _json(request: Request, status: int, document: dict[str, Any]) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"x-amzn-requestid", b"fake-request-id")
        return json.dumps(document).encode("utf-8")


def _error(code: str, message: str) -> dict[str, Any]:
    return {"__type": code, "message": message}


class _TrackingSite(Site):
    """A Site that knows its open connections, so tests can wait for them to close."""

    noisy = False
    protocol = HTTPChannel  # plain HTTP/1.1: its .transport is reachable

    def __init__(self, resource: Resource, reactor: Any) -> None:
        super().__init__(resource, reactor=reactor)
        self.open: dict[Any, Deferred[None]] = {}

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        lost: Deferred[None] = Deferred()
        self.open[channel] = lost
        original = channel.connectionLost

        def connection_lost(reason: Any) -> None:
            self.open.pop(channel, None)
            original(reason)
            lost.callback(None)

        channel.connectionLost = connection_lost
        return channel

    def log(self, request: Any) -> None:
        pass


class FakeXRayServer:
    def __init__(self, fake: FakeXRay, site: _TrackingSite, port: Any) -> None:
        self.fake = fake
        self.site = site
        self.port = port

    @property
    def url(self) -> str:
        host = self.port.getHost()
        literal = f"[{host.host}]" if ":" in host.host else host.host
        return f"http://{literal}:{host.port}"

    def close(self) -> Deferred[None]:
        """Stop listening, drop every connection, fire once all are gone."""
        waits: list[Deferred[Any]] = [maybeDeferred(self.port.stopListening)]
        for channel, lost in list(self.site.open.items()):
            waits.append(lost)
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
        d: Deferred[Any] = DeferredList(waits, consumeErrors=True)
        return d.addCallback(lambda _: None)


def start_fake_xray(
    reactor: Any, *, access_key: str, secret_key: str, region: str, interface: str = "127.0.0.1"
) -> FakeXRayServer:
    """A fake X-Ray on loopback (``interface="::1"``: the IPv6 one)."""
    fake = FakeXRay(access_key=access_key, secret_key=secret_key, region=region)
    site = _TrackingSite(fake, reactor)
    port = reactor.listenTCP(0, site, interface=interface)
    return FakeXRayServer(fake, site, port)


# ---------------------------------------------------------------------------
# Talking to the daemon's TCP port from a test (blocking: run in a thread,
# e.g. with twisted.internet.threads.deferToThread, so the reactor runs).


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-case names, last value
    body: bytes
    raw: bytes


def raw_http(
    port: int,
    request: bytes,
    *,
    byte_by_byte: bool = False,
    pause: float = 0.002,
    shutdown_write: bool = False,
    timeout: float = 10.0,
) -> bytes:
    """Send ``request`` to 127.0.0.1:``port`` and read until the server closes.

    With ``byte_by_byte`` every byte is its own write (TCP_NODELAY, a short
    pause in between), so the server sees the request arrive in pieces.
    With ``shutdown_write`` the client half-closes after sending (a segment
    stream's clean end).  A server that neither answers nor closes within
    ``timeout`` raises TimeoutError.
    """
    import socket
    import time

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if byte_by_byte:
            for i in range(len(request)):
                sock.sendall(request[i : i + 1])
                time.sleep(pause)
        else:
            sock.sendall(request)
        if shutdown_write:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def parse_response(raw: bytes) -> RawResponse:
    """The first HTTP/1.1 response in ``raw`` (Content-Length or chunked body)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise AssertionError(f"no complete HTTP response in {raw!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = rest[: int(headers["content-length"])]
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += rest[:size]
            rest = rest[size + 2 :]
    else:
        body = rest
    return RawResponse(status, headers, body, raw)


def post(path: str, body: bytes = b"{}", headers: dict[str, str] | None = None) -> bytes:
    """A POST request's bytes, with ``Connection: close`` unless headers say otherwise."""
    fields = {"Host": "127.0.0.1", "Content-Type": "application/json", "Connection": "close"}
    fields.update(headers or {})
    fields.setdefault("Content-Length", str(len(body)))
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode("latin-1") + b"\r\n" + body
