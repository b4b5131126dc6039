"""The sampling proxy on the TCP port, against a fake X-Ray that checks every signature.

Every test runs the real stack on loopback: a client socket -> the TCP
port's sniffer -> twisted.web -> SamplingProxy -> treq -> the fake X-Ray
(tests.support.fake_xray), which verifies each request's SigV4 signature
with botocore and answers 403 when it is wrong.  The last test drives the
real aws-xray-sdk's centralized sampling through it.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import sys
import time
from typing import Any

import botocore
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.static import Data

from tests.listen.test_bind import ipv6_loopback_available
from tests.support.daemon import clean_env
from tests.support.fake_xray import (
    RULES,
    FakeXRayServer,
    RawResponse,
    parse_response,
    post,
    raw_http,
    start_fake_xray,
)
from tests.support.sampling_port import serve_sampling_proxy
from tests.support.tempdirs import temp_path
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.observe.counters import Counters
from xraytwisted.outbound.http_client import make_client, make_pool
from xraytwisted.tcpport.operations import parse_allow
from xraytwisted.tcpport.sampling_proxy import OPERATIONS, SamplingProxy

KEY, SECRET, TOKEN, REGION = "AKIDPROXYTEST", "proxy/secret+key", "SESSION/TOKEN", "us-east-2"
MINIMAL = "content-type;host;x-amz-date;x-amz-security-token"
CREDS = Credentials(KEY, SECRET, TOKEN)


def warnings(events: list[Any]) -> list[str]:
    """The formatted warnings and errors among captured log events."""
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.warn]


class LoadingCredentials:
    """Credentials that arrive later, like the daemon's at startup."""

    def __init__(self) -> None:
        self.credentials: Credentials | None = None
        self._waiting: list[Deferred[None]] = []

    def current(self) -> Credentials | None:
        return self.credentials

    def when_loaded(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def load(self, credentials: Credentials | None) -> None:
        self.credentials = credentials
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class EnvoyLikeClient:
    """Adds and rewrites headers after the daemon signed, as a sidecar would."""

    def __init__(self, client: Any, extra: dict[bytes, list[bytes]]) -> None:
        self.client = client
        self.extra = extra

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        kwargs["headers"] = {**kwargs["headers"], **self.extra}
        d: Deferred[Any] = self.client.request(method, url, **kwargs)
        return d


SDK_SAMPLING_APP = r"""
import json, sys, time
from aws_xray_sdk.core import xray_recorder

tcp, udp = sys.argv[1], sys.argv[2]
xray_recorder.configure(
    service="checkout",
    sampling=True,
    context_missing="LOG_ERROR",
    daemon_address=f"tcp:127.0.0.1:{tcp} udp:127.0.0.1:{udp}",
)
sampler = xray_recorder.sampler
sampler.start()  # its rule poller thread asks for the rules at once
deadline = time.monotonic() + 20
while not sampler._cache.rules and time.monotonic() < deadline:
    time.sleep(0.02)
rules = sorted(rule.name for rule in sampler._cache.rules)
request = {"service": "checkout", "host": "shop.example", "method": "POST", "path": "/cart/42"}
decisions = [sampler.should_trace(dict(request)) for _ in range(5)]
# The target poller reports every 10 s; run its round now instead of waiting.
sampler._target_poller._do_work()
rates = {rule.name: rule.rate for rule in sampler._cache.rules}
print(json.dumps({"rules": rules, "decisions": decisions, "rates": rates}))
"""


class ProxyTests(TestCase):
    def setUp(self) -> None:
        self.upstream: FakeXRayServer = start_fake_xray(
            reactor, access_key=KEY, secret_key=SECRET, region=REGION
        )
        self.addCleanup(self.upstream.close)
        self.fake = self.upstream.fake
        self.pool = make_pool(reactor, 4)
        self.addCleanup(self.pool.closeCachedConnections)
        self.counters = Counters()
        self.port = 0

    def serve(
        self,
        *,
        credentials: Any = None,
        endpoint_url: str = "",
        max_body: int = 1024 * 1024,
        timeout: float = 5.0,
        max_concurrent: int = 64,
        client: Any = None,
        client_timeout: float = 5.0,
        allow: tuple[bytes, ...] = (),
        allowed_hosts: tuple[str, ...] = (),
    ) -> SamplingProxy:
        proxy = SamplingProxy(
            client=client or make_client(reactor, self.pool),
            endpoint=endpoints.parse(endpoint_url or self.upstream.url),
            region=REGION,
            credentials=credentials or StaticCredentials(CREDS),
            clock=reactor,
            counters=self.counters,
            max_body=max_body,
            timeout=timeout,
            max_concurrent=max_concurrent,
            allow=allow,
            allowed_hosts=allowed_hosts,
        )
        self.port = serve_sampling_proxy(
            self,
            proxy,
            self.counters,
            resources={b"health": Data(b"ok", "text/plain")},
            timeout=client_timeout,
            max_body=max_body,
        )
        return proxy

    async def call(self, request: bytes, **kwargs: Any) -> RawResponse:
        raw = await threads.deferToThread(raw_http, self.port, request, **kwargs)
        return parse_response(raw)

    def outcomes(self) -> dict[str, int]:
        return {k: v for k, v in self.counters.proxy_requests.items() if v}

    def assert_json_error(self, response: RawResponse, status: int, code: str) -> dict[str, Any]:
        self.assertEqual(response.status, status, response.raw)
        self.assertEqual(response.headers["content-type"], "application/json")
        self.assertEqual(response.headers["x-amzn-errortype"], code)
        self.assertEqual(int(response.headers["content-length"]), len(response.body))
        document: dict[str, Any] = json.loads(response.body)
        self.assertEqual(document["__type"], code)
        self.assertTrue(document["message"])
        return document

    # -- forwarding ---------------------------------------------------------

    async def test_sampling_calls_are_signed_and_answers_relayed(self) -> None:
        self.serve()
        stats = {
            "SamplingStatisticsDocuments": [
                {
                    "RuleName": "Default",
                    "ClientID": "0123456789abcdef01234567",
                    "RequestCount": 10,
                    "SampledCount": 2,
                    "BorrowCount": 1,
                    "Timestamp": 1795304112,
                }
            ]
        }
        stats_body = json.dumps(stats).encode()
        with capturedLogs() as events:
            rules = await self.call(post("/GetSamplingRules", b"{}"))
            targets = await self.call(post("/SamplingTargets", stats_body))
        # No access-log or per-connection lines: SDKs poll every 10 s.
        noisy = [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]
        self.assertEqual(noisy, [])
        self.assertEqual(rules.status, 200)
        self.assertEqual(rules.body, json.dumps(RULES).encode())
        self.assertEqual(
            json.loads(targets.body)["SamplingTargetDocuments"][0]["RuleName"], "Default"
        )
        for response in (rules, targets):
            self.assertEqual(response.headers["content-type"], "application/json")
            self.assertEqual(response.headers["x-amzn-requestid"], "fake-request-id")
            self.assertEqual(int(response.headers["content-length"]), len(response.body))
            self.assertNotIn("content-encoding", response.headers)
        self.assertEqual(self.fake.signature_errors, [])
        seen = self.fake.requests
        self.assertEqual([s.path for s in seen], ["/GetSamplingRules", "/SamplingTargets"])
        self.assertEqual([s.body for s in seen], [b"{}", stats_body])
        for s in seen:
            self.assertEqual(s.auth["SignedHeaders"], MINIMAL)
            self.assertEqual(s.headers["x-amz-security-token"], TOKEN)
            self.assertEqual(s.headers["host"], self.upstream.url.removeprefix("http://"))
        self.assertEqual(self.outcomes(), {"forwarded": 2})

    async def test_only_the_calls_sdks_make_are_forwarded_by_default(self) -> None:
        self.serve()
        signed_by_the_go_daemon = [
            "/DeleteSamplingRule",
            "/PutEncryptionConfig",
            "/UpdateTraceSegmentDestination",
            "/PutResourcePolicy",
            "/Traces",  # BatchGetTraces
            "/TraceSegments",
        ]
        for path in signed_by_the_go_daemon:
            response = await self.call(post(path))
            document = self.assert_json_error(response, 403, "AccessDeniedException")
            self.assertIn("--proxy-allow or SamplingProxy.Allow", document["message"])
        self.assertEqual(self.fake.requests, [])
        for path in ("/GetSamplingRules", "/SamplingTargets"):
            self.assertEqual((await self.call(post(path))).status, 200)
        self.assertEqual(
            self.outcomes(), {"not_allowed": len(signed_by_the_go_daemon), "forwarded": 2}
        )

    async def test_the_allow_list_widens_what_is_forwarded(self) -> None:
        self.serve(allow=parse_allow("GetTraceSummaries,/ServiceGraph"))
        for path in ("/TraceSummaries", "/ServiceGraph", "/GetSamplingRules"):
            self.assertEqual((await self.call(post(path))).status, 200, path)
        refused = await self.call(post("/DeleteSamplingRule"))
        self.assert_json_error(refused, 403, "AccessDeniedException")
        self.assertEqual(
            [s.path for s in self.fake.requests],
            ["/TraceSummaries", "/ServiceGraph", "/GetSamplingRules"],
        )

    async def test_a_browser_request_is_refused_and_never_signed(self) -> None:
        # What a web page's fetch() (or form) sends to the daemon: browsers
        # add Origin to every POST, SDKs never do.
        self.serve(allow=parse_allow("*"))
        browser = {
            "Origin": "https://evil.example",
            "Referer": "https://evil.example/page",
            "Content-Type": "text/plain;charset=UTF-8",
            "Sec-Fetch-Site": "cross-site",
            "Sec-Fetch-Mode": "no-cors",
            "Sec-Fetch-Dest": "empty",
            "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
            "Accept": "*/*",
        }
        with capturedLogs() as events:
            for path in ("/DeleteSamplingRule", "/GetSamplingRules", "/SamplingTargets"):
                response = await self.call(post(path, b'{"RuleName":"Default"}', browser))
                self.assert_json_error(response, 403, "AccessDeniedException")
            # The same origin (DNS rebinding) is a web page too.
            rebinding = {**browser, "Origin": "http://127.0.0.1:2000"}
            response = await self.call(post("/GetSamplingRules", headers=rebinding))
            self.assert_json_error(response, 403, "AccessDeniedException")
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"cross_origin": 4})
        lines = warnings(events)
        self.assertEqual(len(lines), 1, lines)  # rate-limited
        self.assertIn("from a web page (https://evil.example)", lines[0])

    async def test_an_allowed_hosts_list_refuses_other_host_headers(self) -> None:
        self.serve(allowed_hosts=("xray-daemon", "127.0.0.1:2000"))
        ok = [
            {"Host": "xray-daemon:2000"},
            {"Host": "XRAY-DAEMON"},
            {"Host": "127.0.0.1:2000"},
        ]
        for headers in ok:
            response = await self.call(post("/GetSamplingRules", headers=headers))
            self.assertEqual(response.status, 200, headers)
        for host in ("127.0.0.1:2001", "attacker.example:2000", "localhost"):
            response = await self.call(post("/GetSamplingRules", headers={"Host": host}))
            self.assert_json_error(response, 403, "AccessDeniedException")
        self.assertEqual(len(self.fake.requests), len(ok))
        self.assertEqual(self.outcomes(), {"forwarded": 3, "bad_host": 3})

    async def test_every_x_ray_operation_is_forwarded_when_allowed(self) -> None:
        self.serve(allow=parse_allow("*"))
        for path in OPERATIONS:
            response = await self.call(post(path.decode()))
            self.assertEqual(response.status, 200, path)
        self.assertEqual([s.path.encode() for s in self.fake.requests], list(OPERATIONS))
        self.assertEqual(self.fake.signature_errors, [])
        self.assertEqual(self.outcomes(), {"forwarded": len(OPERATIONS)})

    async def test_query_string_is_preserved_and_signed(self) -> None:
        self.serve()
        response = await self.call(post("/GetSamplingRules?b=2&a=x%20y&c=&d=%7B%7D"))
        self.assertEqual(response.status, 200)
        (seen,) = self.fake.requests
        self.assertEqual(seen.uri, "/GetSamplingRules?b=2&a=x%20y&c=&d=%7B%7D")
        self.assertEqual(seen.signature_error, "")

    async def test_an_ipv6_literal_endpoint_is_reached(self) -> None:
        # -e http://[::1]:port: treq's own URL conversion IDNA-encodes the
        # host and fails on a literal; the uploader already sends it as given.
        if not ipv6_loopback_available():
            raise SkipTest("no IPv6 loopback (::1) here")
        upstream = start_fake_xray(
            reactor, access_key=KEY, secret_key=SECRET, region=REGION, interface="::1"
        )
        self.addCleanup(upstream.close)
        self.assertTrue(upstream.url.startswith("http://[::1]:"), upstream.url)
        self.serve(endpoint_url=upstream.url)
        response = await self.call(post("/GetSamplingRules?a=1", b"{}"))
        self.assertEqual(response.status, 200, response.raw)
        (seen,) = upstream.fake.requests
        self.assertEqual((seen.uri, seen.signature_error), ("/GetSamplingRules?a=1", ""))
        self.assertEqual(seen.headers["host"], upstream.url.removeprefix("http://"))
        self.assertEqual(self.outcomes(), {"forwarded": 1})

    async def test_status_and_body_pass_through_unchanged(self) -> None:
        self.serve()
        error_body = b'{"__type":"InvalidRequestException",  "message":"bad \\u00e9 \xff\x00"}\n'
        self.fake.canned["/GetSamplingRules"] = (
            400,
            {"x-amzn-ErrorType": "InvalidRequestException:http://internal.amazon.com/"},
            error_body,
        )
        self.fake.canned["/SamplingTargets"] = (429, {}, b'{"__type":"ThrottledException"}')
        bad = await self.call(post("/GetSamplingRules"))
        throttled = await self.call(post("/SamplingTargets"))
        self.assertEqual(bad.status, 400)
        self.assertEqual(bad.body, error_body)
        self.assertEqual(
            bad.headers["x-amzn-errortype"], "InvalidRequestException:http://internal.amazon.com/"
        )
        self.assertEqual(
            (throttled.status, throttled.body), (429, b'{"__type":"ThrottledException"}')
        )
        self.fake.mode, self.fake.error_status = "error", 503
        unavailable = await self.call(post("/GetSamplingRules"))
        self.assertEqual(unavailable.status, 503)
        self.assertEqual(json.loads(unavailable.body)["__type"], "InternalFailure")
        self.assertEqual(self.outcomes(), {"forwarded": 3})

    async def test_compressed_answers_reach_the_client_consistently(self) -> None:
        self.serve()
        document = json.dumps(RULES).encode()
        self.fake.canned["/GetSamplingRules"] = (
            200,
            {"content-encoding": "gzip", "content-type": "application/json"},
            gzip.compress(document),
        )
        self.fake.canned["/SamplingTargets"] = (
            200,
            {"content-encoding": "br"},
            b"\x0b\x02\x80{}\x03",
        )
        decoded = await self.call(post("/GetSamplingRules"))
        self.assertEqual(decoded.body, document)
        self.assertNotIn("content-encoding", decoded.headers)
        self.assertEqual(int(decoded.headers["content-length"]), len(document))
        other = await self.call(post("/SamplingTargets"))
        self.assertEqual(other.body, b"\x0b\x02\x80{}\x03")
        self.assertEqual(other.headers["content-encoding"], "br")
        self.assertEqual(int(other.headers["content-length"]), 6)

    # -- header hygiene -----------------------------------------------------

    async def test_client_and_hop_by_hop_headers_are_neither_signed_nor_forwarded(self) -> None:
        self.serve()
        hostile = {
            "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDCLIENT/20200101/us-east-1/xray/"
            "aws4_request, SignedHeaders=host, Signature=00",
            "Connection": "X-Hop, close",  # twisted.web splits on spaces: "close," is missed
            "X-Hop": "must-not-pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic dXNlcjpwYXNz",
            "X-Envoy-Expected-Rq-Timeout-Ms": "15000",
            "X-Envoy-Attempt-Count": "1",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "X-Forwarded-For": "10.0.0.1",
            "X-Amz-Date": "20000101T000000Z",
            "X-Amz-Security-Token": "client-token",
            "X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793",
            "Cookie": "session=1",
            "amz-sdk-invocation-id": "d1e1b5c2-0000-0000-0000-000000000000",
            "User-Agent": "Botocore/1.43.11 ua/2.1",
            "Accept": "application/json",
        }
        response = await self.call(post("/GetSamplingRules", headers=hostile))
        self.assertEqual(response.status, 200)
        (seen,) = self.fake.requests
        self.assertEqual(seen.signature_error, "")
        self.assertEqual(seen.auth["SignedHeaders"], MINIMAL)
        self.assertTrue(
            seen.headers["authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/")
        )
        self.assertEqual(
            [values for name, values in seen.raw_headers if name.lower() == "authorization"],
            [[seen.headers["authorization"]]],
        )
        self.assertEqual(seen.headers["x-amz-security-token"], TOKEN)
        self.assertNotEqual(seen.headers["x-amz-date"], "20000101T000000Z")
        forwarded = {name.lower() for name, _ in seen.raw_headers}
        for name in hostile:
            if name.lower() not in ("authorization", "x-amz-date", "x-amz-security-token"):
                if name.lower() in ("user-agent", "accept"):
                    self.assertIn(name.lower(), forwarded)
                else:
                    self.assertNotIn(name.lower(), forwarded)
        self.assertEqual(seen.headers["user-agent"], "Botocore/1.43.11 ua/2.1")

    async def test_headers_a_sidecar_adds_after_signing_do_not_break_the_signature(self) -> None:
        # aws-xray-daemon#199: with Envoy/Istio the request reaching the
        # daemon already carries sidecar headers, and the outbound sidecar
        # rewrites them on the way to X-Ray.  The Go daemon signs every
        # client header, so X-Ray refuses the request; here they are not
        # signed (nor forwarded), so whatever the sidecar does is harmless.
        inbound = {
            "User-Agent": "Botocore/1.43.11",
            "Accept": "*/*",
            "X-Envoy-Attempt-Count": "1",
            "X-Request-Id": "inbound-5f1c",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
        outbound = {
            b"x-envoy-attempt-count": [b"2"],
            b"x-request-id": [b"outbound-9a7b"],
            b"traceparent": [b"00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01"],
            b"accept": [b"application/json"],
            b"user-agent": [b"envoy-rewrote-this"],
        }
        self.serve(client=EnvoyLikeClient(make_client(reactor, self.pool), outbound))
        response = await self.call(post("/GetSamplingRules", headers=inbound))
        self.assertEqual(response.status, 200)
        (seen,) = self.fake.requests
        self.assertEqual(seen.signature_error, "")
        self.assertEqual(seen.auth["SignedHeaders"], MINIMAL)
        self.assertEqual(seen.headers["x-envoy-attempt-count"], "2")
        self.assertEqual(seen.headers["accept"], "application/json")

    async def test_a_sidecar_changing_a_signed_header_is_caught(self) -> None:
        # The control for the test above: the fake really checks signatures,
        # and X-Ray's 403 comes back to the SDK as it is.
        self.serve(
            client=EnvoyLikeClient(make_client(reactor, self.pool), {b"content-type": [b"text/x"]})
        )
        response = await self.call(post("/GetSamplingRules"))
        self.assertEqual(response.status, 403)
        self.assertEqual(json.loads(response.body)["__type"], "InvalidSignatureException")
        self.assertEqual(len(self.fake.signature_errors), 1)

    # -- what is never forwarded ----------------------------------------------

    async def test_non_x_ray_paths_get_a_json_404_and_never_leave(self) -> None:
        self.serve()
        paths = [
            "/",
            "/anything/else?q=1",
            "/GetSamplingRules/",
            "/getsamplingrules",
            "/GetSampling%52ules",
            "/../GetSamplingRules",
            "http://evil.example/GetSamplingRules",
            "/latest/meta-data/iam/security-credentials/",
            "/health/x",
        ]
        for path in paths:
            response = await self.call(post(path))
            self.assert_json_error(response, 404, "NotFoundException")
        health = await self.call(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        self.assertEqual((health.status, health.body), (200, b"ok"))
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"not_found": len(paths), "local": 1})

    async def test_other_methods_get_405(self) -> None:
        self.serve()
        for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS"):
            request = f"{method} /GetSamplingRules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            response = await self.call(request.encode())
            self.assert_json_error(response, 405, "MethodNotAllowedException")
            self.assertEqual(response.headers["allow"], "POST")
        head = await self.call(
            b"HEAD /GetSamplingRules HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        self.assertEqual(head.status, 405)
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"bad_method": 6})

    async def test_request_bodies_over_the_limit_get_413(self) -> None:
        self.serve(max_body=1000)
        too_big = await self.call(post("/SamplingTargets", b"x" * 1001))
        self.assert_json_error(too_big, 413, "InvalidRequestException")
        # A huge announced body is refused on its headers: nothing is sent.
        started = time.monotonic()
        announced = await self.call(
            post("/SamplingTargets", b"", headers={"Content-Length": str(10**10)})
        )
        self.assert_json_error(announced, 413, "InvalidRequestException")
        self.assertLess(time.monotonic() - started, 3)
        # "Expect: 100-continue" gets the 413, not an invitation to send.
        expecting = await self.call(
            post(
                "/SamplingTargets",
                b"",
                headers={"Content-Length": "5000", "Expect": "100-continue"},
            )
        )
        self.assertNotIn(b"100 Continue", expecting.raw)
        self.assert_json_error(expecting, 413, "InvalidRequestException")
        # A chunked body is counted as it arrives.
        chunk = b"x" * 600
        chunked = (
            b"POST /SamplingTargets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2 + b"0\r\n\r\n"
        )
        self.assert_json_error(await self.call(chunked), 413, "InvalidRequestException")
        exactly = await self.call(post("/SamplingTargets", b'{"x":"' + b"y" * 992 + b'"}'))
        self.assertEqual(exactly.status, 200)
        self.assertEqual([len(s.body) for s in self.fake.requests], [1000])
        self.assertEqual(self.outcomes(), {"too_large": 4, "forwarded": 1})

    async def test_a_client_sending_a_2_mib_body_reads_its_413(self) -> None:
        # A plain client: send the whole request, then read the answer.  If
        # the daemon closed on unread data the kernel would reset the
        # connection, and the client would get a broken pipe instead.
        self.serve(max_body=1024 * 1024)
        body = b"x" * (2 * 1024 * 1024)

        def send_then_read() -> bytes:
            with socket.socket() as sock:
                # A small send buffer, as over a real network: the client is
                # still sending when the daemon has answered.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", self.port))
                request = post("/SamplingTargets", body)
                for i in range(0, len(request), 16384):
                    sock.sendall(request[i : i + 16384])
                chunks = []
                while data := sock.recv(65536):
                    chunks.append(data)
                return b"".join(chunks)

        response = parse_response(await threads.deferToThread(send_then_read))
        document = self.assert_json_error(response, 413, "InvalidRequestException")
        self.assertIn("SamplingProxy.MaxBodyKB", document["message"])
        chunked = (
            b"POST /SamplingTargets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s\r\n" % (len(body), body)
            + b"0\r\n\r\n"
        )

        def send_chunked() -> bytes:
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                sock.settimeout(10)
                sock.connect(("127.0.0.1", self.port))
                for i in range(0, len(chunked), 16384):
                    sock.sendall(chunked[i : i + 16384])
                return sock.recv(65536)

        raw = await threads.deferToThread(send_chunked)
        self.assert_json_error(parse_response(raw), 413, "InvalidRequestException")
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"too_large": 2})

    async def test_max_concurrent_is_checked_before_the_body_arrives(self) -> None:
        self.serve(max_concurrent=1)
        self.fake.mode = "hang"
        first = threads.deferToThread(raw_http, self.port, post("/GetSamplingRules"))
        for _ in range(500):
            if self.fake.hanging:
                break
            await deferLater(reactor, 0.01, lambda: None)

        def headers_only() -> bytes:
            # Announces a body it never sends: answered anyway, at once.
            head = post("/SamplingTargets", b"", headers={"Content-Length": "5000"})
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(head)
                return sock.recv(65536)

        raw = await threads.deferToThread(headers_only)
        response = parse_response(raw)
        self.assert_json_error(response, 503, "ServiceUnavailableException")
        self.assertEqual(response.headers["retry-after"], "1")
        (hanging,) = self.fake.hanging
        hanging.finish()
        await first
        self.assertEqual(self.outcomes(), {"forwarded": 1, "overloaded": 1})

    # -- upstream trouble -----------------------------------------------------

    async def test_a_hanging_x_ray_gets_504(self) -> None:
        self.serve(timeout=0.3)
        self.fake.mode = "hang"
        started = time.monotonic()
        with capturedLogs() as events:
            response = await self.call(post("/GetSamplingRules"))
        elapsed = time.monotonic() - started
        self.assert_json_error(response, 504, "GatewayTimeoutException")
        self.assertTrue(0.3 <= elapsed < 3, elapsed)
        self.assertEqual(len(self.fake.requests), 1)
        self.assertEqual(self.outcomes(), {"timeout": 1})
        lines = warnings(events)
        self.assertTrue(
            any("did not answer GetSamplingRules within 0.3 seconds" in line for line in lines),
            lines,
        )

    async def test_an_unreachable_x_ray_gets_502(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed_port = s.getsockname()[1]
        self.serve(endpoint_url=f"http://127.0.0.1:{closed_port}")
        with capturedLogs() as events:
            response = await self.call(post("/GetSamplingRules"))
        document = self.assert_json_error(response, 502, "BadGatewayException")
        self.assertIn("connection refused", document["message"])
        self.assertEqual(self.outcomes(), {"unreachable": 1})
        self.assertTrue(any("answered 502" in line for line in warnings(events)))

    async def test_x_ray_dropping_the_connection_gets_502(self) -> None:
        self.serve()
        self.fake.mode = "close"
        response = await self.call(post("/GetSamplingRules"))
        self.assert_json_error(response, 502, "BadGatewayException")
        self.assertEqual(self.outcomes(), {"unreachable": 1})

    # -- credentials and load ------------------------------------------------

    async def test_no_credentials_gets_503_and_nothing_is_sent(self) -> None:
        self.serve(credentials=StaticCredentials(None))
        with capturedLogs() as events:
            response = await self.call(post("/GetSamplingRules"))
            await self.call(post("/SamplingTargets"))
        document = self.assert_json_error(response, 503, "ServiceUnavailableException")
        self.assertIn("no AWS credentials", document["message"])
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"no_credentials": 2})
        lines = warnings(events)
        self.assertEqual(len(lines), 1, lines)  # rate-limited
        self.assertIn("no AWS credentials to sign GetSamplingRules", lines[0])

    async def test_credentials_still_loading_are_waited_for(self) -> None:
        credentials = LoadingCredentials()
        self.serve(credentials=credentials)
        pending = threads.deferToThread(raw_http, self.port, post("/GetSamplingRules"))
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(self.fake.requests, [])
        credentials.load(CREDS)
        response = parse_response(await pending)
        self.assertEqual(response.status, 200)
        self.assertEqual(self.fake.signature_errors, [])

    async def test_credentials_that_do_not_arrive_in_time_get_503(self) -> None:
        self.serve(credentials=LoadingCredentials(), timeout=0.2)
        response = await self.call(post("/GetSamplingRules"))
        self.assert_json_error(response, 503, "ServiceUnavailableException")
        self.assertEqual(self.fake.requests, [])
        self.assertEqual(self.outcomes(), {"no_credentials": 1})

    async def test_too_many_requests_in_flight_get_503(self) -> None:
        proxy = self.serve(max_concurrent=1)
        self.fake.mode = "hang"
        first = threads.deferToThread(raw_http, self.port, post("/GetSamplingRules"))
        for _ in range(500):
            if self.fake.hanging:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(proxy.in_flight, 1)
        second = await self.call(post("/SamplingTargets"))
        self.assert_json_error(second, 503, "ServiceUnavailableException")
        self.assertEqual(second.headers["retry-after"], "1")
        # The first one is answered after all, and its slot is free again.
        (hanging,) = self.fake.hanging
        hanging.setHeader(b"content-type", b"application/json")
        hanging.write(b'{"late":true}')
        hanging.finish()
        self.assertEqual(parse_response(await first).body, b'{"late":true}')
        self.fake.mode = "normal"
        third = await self.call(post("/SamplingTargets"))
        self.assertEqual(third.status, 200)
        self.assertEqual(proxy.in_flight, 0)
        self.assertEqual(self.outcomes(), {"forwarded": 2, "overloaded": 1})

    async def test_slow_and_silent_clients_are_disconnected(self) -> None:
        self.serve(client_timeout=0.3)

        def slow_client(first: bytes) -> tuple[bytes, float]:
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                if first:
                    sock.sendall(first)
                data = sock.recv(65536)
            return data, time.monotonic() - started

        cases = [
            b"",  # never says anything
            b"POST /GetSamplingRules HTTP/1.1\r\nHost: x\r\n",  # stops mid-headers
            b"POST /SamplingTargets HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        ]
        with capturedLogs() as events:
            for first in cases:
                data, elapsed = await threads.deferToThread(slow_client, first)
                self.assertEqual(data, b"", first)
                self.assertLess(elapsed, 3, first)
        self.assertEqual(self.fake.requests, [])
        # Idle SDK connections time out routinely: only at debug level.
        timeouts = [e for e in events if "Timing out client" in formatEvent(e)]
        self.assertEqual(len(timeouts), 2)
        self.assertEqual({e["log_level"] for e in timeouts}, {LogLevel.debug})

    # -- the real SDK ------------------------------------------------------------

    async def test_aws_xray_sdk_gets_rules_and_targets_through_the_proxy(self) -> None:
        self.serve()
        script = temp_path(self) + ".py"
        with open(script, "w") as f:
            f.write(SDK_SAMPLING_APP)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, [script, str(self.port), str(self.port)], env=clean_env()
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        result = json.loads(out.decode().strip().splitlines()[-1])
        self.assertEqual(result["rules"], ["Default", "fake-checkout"])
        self.assertIn("fake-checkout", result["decisions"])
        self.assertEqual(result["rates"]["fake-checkout"], 0.5)  # the target the fake set
        self.assertEqual(result["rates"]["Default"], 0.01)  # never matched, never reported

        self.assertEqual(self.fake.signature_errors, [])
        paths = [s.path for s in self.fake.requests]
        self.assertEqual(paths, ["/GetSamplingRules", "/SamplingTargets"])
        targets_request = self.fake.requests[1]
        for seen in self.fake.requests:
            self.assertEqual(seen.auth["SignedHeaders"], MINIMAL)
            self.assertIn("Botocore", seen.headers["user-agent"])
            self.assertNotIn("amz-sdk-invocation-id", seen.headers)
        (stats,) = json.loads(targets_request.body)["SamplingStatisticsDocuments"]
        self.assertEqual(stats["RuleName"], "fake-checkout")
        self.assertEqual(stats["RequestCount"], 5)
        self.assertRegex(stats["ClientID"], re.compile(r"^[0-9a-f]{24}$"))
        self.assertEqual(self.counters.proxy_requests["forwarded"], 2)


class OperationTableTests(SynchronousTestCase):
    def test_table_matches_botocore_model(self) -> None:
        model_path = os.path.join(
            os.path.dirname(botocore.__file__), "data", "xray", "2016-04-12", "service-2.json.gz"
        )
        if not os.path.exists(model_path):
            model_path = model_path.removesuffix(".gz")
            with open(model_path, "rb") as f:
                model = json.load(f)
        else:
            with gzip.open(model_path) as f:
                model = json.load(f)
        expected = {
            op["http"]["requestUri"].encode(): (name, op["http"]["method"].encode())
            for name, op in model["operations"].items()
        }
        actual = {path: (op.name, op.method) for path, op in OPERATIONS.items()}
        self.assertEqual(actual, expected)
        # No URI labels or query parts: exact path matching is complete.
        self.assertFalse([p for p in expected if b"{" in p or b"?" in p])
