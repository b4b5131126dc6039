"""ADOT's AwsXRayRemoteSampler takes its X-Ray rules through the daemon's TCP port.

OpenTelemetry SDKs sample with X-Ray rules through aws-opentelemetry-distro's
``AwsXRayRemoteSampler``, which polls ``/GetSamplingRules`` and
``/SamplingTargets`` on the daemon's TCP port.  This runs the real sampler
(tests/support/otel_sampler_app.py, in a child process: its pollers are
threads with no stop method) against our TCP port, in front of the fake
X-Ray that checks every SigV4 signature, and checks both what reached
"X-Ray" and what the sampler decided.

aws-opentelemetry-distro is in the ``test`` extra, so this runs with the
suite's own interpreter.  Where it is not installed there, set
XRAYTWISTED_ADOT_PYTHON to another virtualenv's python that has it (this is
also how to try another ADOT version); without either, the test skips.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.daemon import clean_env
from tests.support.fake_xray import FakeXRay, start_fake_xray
from tests.support.sampling_port import serve_sampling_proxy
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import StaticCredentials
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.observe.counters import Counters
from xraytwisted.outbound.http_client import make_client, make_pool
from xraytwisted.tcpport.sampling_proxy import SamplingProxy

KEY, SECRET, REGION = "AKIDOTELSAMPLER", "otel/sampler+secret", "eu-west-1"
ADOT_PYTHON_ENV = "XRAYTWISTED_ADOT_PYTHON"
APP = Path(__file__).parent / "support" / "otel_sampler_app.py"
SPANS = 200  # otel_sampler_app.SPANS (not imported: that module needs ADOT)
PROBE = 20  # otel_sampler_app.PROBE


def _rule(name: str, priority: int, service: str, rate: float) -> dict[str, Any]:
    return {
        "SamplingRule": {
            "RuleName": name,
            "RuleARN": f"arn:aws:xray:{REGION}:123456789012:sampling-rule/{name}",
            "ResourceARN": "*",
            "Priority": priority,
            "FixedRate": rate,
            "ReservoirSize": 0,
            "ServiceName": service,
            "ServiceType": "*",
            "Host": "*",
            "HTTPMethod": "*",
            "URLPath": "*",
            "Version": 1,
            "Attributes": {},
        },
        "CreatedAt": 1700000000.0,
        "ModifiedAt": 1700000000.0,
    }


# Everything from "checkout", nothing from anyone else: no reservoir, so
# no per-second borrowing blurs either decision.
RULES = {
    "SamplingRuleRecords": [
        _rule("checkout-all", 100, "checkout", 1.0),
        _rule("Default", 10000, "*", 0.0),
    ]
}


def adot_python() -> str:
    """The interpreter to run the sampler with, or SkipTest saying how to get one."""
    given = os.environ.get(ADOT_PYTHON_ENV, "")
    if given:
        return given
    try:
        found = importlib.util.find_spec("amazon.opentelemetry.distro.sampler") is not None
    except ModuleNotFoundError:  # no "amazon" namespace package at all
        found = False
    if found:
        return sys.executable
    raise SkipTest(
        "aws-opentelemetry-distro is not installed (pip install -e '.[test]'), and "
        f"{ADOT_PYTHON_ENV} does not name another python that has it"
    )


class SamplerApp(ProcessProtocol):
    """The child's first stdout line (its JSON result) and its exit."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.first_line: Deferred[bytes] = Deferred()
        self.ended: Deferred[int | None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if b"\n" in self.out and not self.first_line.called:
            self.first_line.callback(self.out.split(b"\n", 1)[0])

    def errReceived(self, data: bytes) -> None:
        self.err += data[-65536:]

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if not self.first_line.called:
            self.first_line.errback(
                AssertionError(f"sampler app exited {code} before answering:\n{self.stderr}")
            )
        self.ended.callback(code)

    @property
    def stderr(self) -> str:
        return self.err.decode(errors="replace")


def reported(fake: FakeXRay) -> dict[str, dict[str, Any]]:
    """The statistics the fake has received, summed by rule name.

    ADOT names the sampled count "SampleCount" (the X-Ray API's field is
    SampledCount); the daemon forwards the body as it is either way.
    """
    totals: dict[str, dict[str, Any]] = {}
    for seen in fake.requests:
        if seen.path != "/SamplingTargets" or seen.signature_error:
            continue
        for doc in json.loads(seen.body).get("SamplingStatisticsDocuments") or []:
            total = totals.setdefault(
                doc["RuleName"], {"requests": 0, "sampled": 0, "borrowed": 0, "clients": set()}
            )
            total["requests"] += doc["RequestCount"]
            total["sampled"] += doc.get("SampledCount", doc.get("SampleCount"))
            total["borrowed"] += doc["BorrowCount"]
            total["clients"].add(doc["ClientID"])
    return totals


def all_reported(fake: FakeXRay) -> bool:
    """Both rules' statistics cover at least the spans the app counted."""
    totals = reported(fake)
    return all(
        totals.get(rule, {}).get("requests", 0) >= SPANS + PROBE
        for rule in ("checkout-all", "Default")
    )


class RemoteSamplerTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.python = adot_python()
        upstream = start_fake_xray(reactor, access_key=KEY, secret_key=SECRET, region=REGION)
        self.addCleanup(upstream.close)
        self.fake = upstream.fake
        self.upstream_host = upstream.url.removeprefix("http://")
        self.fake.canned["/GetSamplingRules"] = (
            200,
            {"content-type": "application/json"},
            json.dumps(RULES).encode(),
        )
        pool = make_pool(reactor, 4)
        self.addCleanup(pool.closeCachedConnections)
        self.counters = Counters()
        proxy = SamplingProxy(
            client=make_client(reactor, pool),
            endpoint=endpoints.parse(upstream.url),
            region=REGION,
            credentials=StaticCredentials(Credentials(KEY, SECRET, None)),
            clock=reactor,
            counters=self.counters,
            max_body=1024 * 1024,
            timeout=5.0,
            max_concurrent=64,
            allow=(),
            allowed_hosts=(),
        )
        self.port = serve_sampling_proxy(self, proxy, self.counters)

    def start_app(self) -> SamplerApp:
        app = SamplerApp()
        # No OTEL_* settings from the outer environment (OTEL_SDK_DISABLED
        # would make every span a no-op), no AWS ones (clean_env).
        env = {k: v for k, v in clean_env().items() if not k.startswith("OTEL_")}
        transport = reactor.spawnProcess(
            app, self.python, [self.python, str(APP), f"http://127.0.0.1:{self.port}"], env=env
        )

        async def stop() -> None:
            if not app.ended.called:
                transport.closeStdin()
                await app.ended

        self.addCleanup(stop)
        return app

    async def test_rules_decide_and_statistics_come_back_through_the_tcp_port(self) -> None:
        app = self.start_app()
        result = json.loads(await app.first_line)
        self.assertTrue(result["applied"], f"rules never took effect: {result}\n{app.stderr}")
        self.assertEqual(result["spans"], SPANS)
        self.assertEqual(result["checkout"], SPANS, "checkout-all samples every span")
        self.assertEqual(result["inventory"], 0, "Default samples nothing")

        # Each sampler reports its statistics about 10 s after it started.
        deadline = time.monotonic() + 45
        while not all_reported(self.fake):
            if time.monotonic() > deadline or app.ended.called:
                self.fail(f"statistics missing: {reported(self.fake)}\n{app.stderr}")
            await deferLater(reactor, 0.1, lambda: None)
        app.transport.closeStdin()
        self.assertEqual(await app.ended, 0, app.stderr)

        self.assertEqual(self.fake.signature_errors, [])
        paths = [seen.path for seen in self.fake.requests]
        self.assertEqual(paths.count("/GetSamplingRules"), 2, paths)  # one per sampler
        self.assertGreaterEqual(paths.count("/SamplingTargets"), 2, paths)
        self.assertEqual(set(paths), {"/GetSamplingRules", "/SamplingTargets"})
        for seen in self.fake.requests:
            self.assertEqual(seen.auth["Credential"].split("/")[0], KEY)
            self.assertEqual(seen.headers["host"], self.upstream_host)
        totals = reported(self.fake)
        self.assertEqual(set(totals), {"checkout-all", "Default"})
        checkout, default = totals["checkout-all"], totals["Default"]
        self.assertEqual(len(checkout["clients"]), 1)
        self.assertEqual(len(default["clients"]), 1)
        self.assertNotEqual(checkout["clients"], default["clients"])  # two samplers
        for client in checkout["clients"] | default["clients"]:
            self.assertRegex(client, re.compile(r"^[0-9a-f]{24}$"))
        self.assertEqual(checkout["sampled"], checkout["requests"])
        self.assertEqual(default["sampled"], 0)
        self.assertEqual(checkout["borrowed"] + default["borrowed"], 0)  # no reservoirs
        self.assertEqual(self.counters.proxy_requests["forwarded"], len(paths))
