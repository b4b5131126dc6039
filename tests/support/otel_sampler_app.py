"""An OpenTelemetry app that samples with ADOT's AwsXRayRemoteSampler.

Run by tests/test_otel_sampling.py as ``python otel_sampler_app.py ENDPOINT``
with the interpreter that has aws-opentelemetry-distro (it imports nothing
from this repository, so that interpreter may be another virtualenv's).

Two services, each with its own tracer provider and remote sampler, as two
processes would have: "checkout" and "inventory".  Once the rules from
ENDPOINT are in force (bounded wait), it counts sampled root spans out of
``SPANS`` per service and prints them as one JSON line.  It then stays up,
so the samplers' target pollers report their statistics, until its stdin
is closed (or a watchdog ends it).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

from amazon.opentelemetry.distro.sampler.aws_xray_remote_sampler import AwsXRayRemoteSampler
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

SPANS = 200
# Consecutive decisions that the fallback sampler (1/s, then 5 %) could not
# produce: 20 checkout spans all sampled and 20 inventory spans all dropped.
PROBE = 20
RULES_DEADLINE = 20.0
WATCHDOG = 90.0


def tracer_for(service: str, endpoint: str) -> Any:
    # Resource(...) rather than Resource.create(): no resource detector runs,
    # so nothing asks EC2/ECS metadata addresses who we are.
    resource = Resource({"service.name": service})
    # A long rule polling interval: the first poll happens at once anyway,
    # and a second one must not muddle the request count the test checks.
    sampler = AwsXRayRemoteSampler(resource=resource, endpoint=endpoint, polling_interval=300)
    return TracerProvider(sampler=sampler, resource=resource).get_tracer("xraytwisted.tests")


def sampled(tracer: Any, count: int) -> int:
    hits = 0
    for _ in range(count):
        span = tracer.start_span(
            "POST /cart", attributes={"http.request.method": "POST", "url.path": "/cart/42"}
        )
        hits += int(span.get_span_context().trace_flags.sampled)
        span.end()
    return hits


def main(endpoint: str) -> None:
    watchdog = threading.Timer(WATCHDOG, os._exit, (3,))
    watchdog.daemon = True
    watchdog.start()
    checkout = tracer_for("checkout", endpoint)
    inventory = tracer_for("inventory", endpoint)
    started = time.monotonic()
    applied = False
    while time.monotonic() - started < RULES_DEADLINE:
        if sampled(checkout, PROBE) == PROBE and sampled(inventory, PROBE) == 0:
            applied = True
            break
        time.sleep(0.05)
    result = {
        "applied": applied,
        "waited": round(time.monotonic() - started, 2),
        "spans": SPANS,
        "checkout": sampled(checkout, SPANS),
        "inventory": sampled(inventory, SPANS),
    }
    print(json.dumps(result), flush=True)
    sys.stdin.read()  # the test closes it once it has seen the target polls


if __name__ == "__main__":
    main(sys.argv[1])
