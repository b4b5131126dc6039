"""Sampling answered locally, for ``--local-sink`` mode (no AWS account needed).

SDKs poll the daemon's TCP port for ``POST /GetSamplingRules`` (every 5 min)
and ``POST /SamplingTargets`` (every 10 s).  With a local sink there is no
X-Ray to forward them to, so these are answered here with X-Ray's own
default rule - the first request each second plus 5 % of the rest - and
SDKs run unchanged.  The answers have the API's shapes, which the SDKs check
strictly (``Version`` 1, ``ResourceARN`` "*", empty ``Attributes``, a
non-empty ``ServiceType``; Node needs a numeric ``LastRuleModification``).

The pure functions build the answers; ``LocalSamplingResource`` is the
twisted.web side, meant for the slot the signing proxy fills when uploading
to X-Ray.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from xraytwisted.observe.counters import Counters
from xraytwisted.observe.logs import printable
from xraytwisted.tcpport.site import DEFAULT_MAX_BODY, body_too_large, json_error, read_body

RULES_PATH = b"/GetSamplingRules"
TARGETS_PATH = b"/SamplingTargets"

DEFAULT_RULE_NAME = "Default"
DEFAULT_FIXED_RATE = 0.05
DEFAULT_RESERVOIR = 1  # requests per second sampled before the fixed rate applies
TARGET_INTERVAL = 10  # seconds between SamplingTargets calls the SDKs are asked for
QUOTA_TTL = 10.0  # seconds a reservoir quota stays valid

_MODE = (
    "xraytwisted is running with --local-sink: segments are written locally and only "
    "GetSamplingRules and SamplingTargets are answered (locally, with the default rule)"
)


class BadRequest(Exception):
    """A request body the API would refuse; str() says what is wrong."""


def rule_records(modified_at: float) -> dict[str, Any]:
    """The GetSamplingRules answer: X-Ray's default rule, and only it."""
    rule = {
        "RuleName": DEFAULT_RULE_NAME,
        "RuleARN": f"arn:aws:xray:local::sampling-rule/{DEFAULT_RULE_NAME}",
        "ResourceARN": "*",
        "Priority": 10000,
        "FixedRate": DEFAULT_FIXED_RATE,
        "ReservoirSize": DEFAULT_RESERVOIR,
        "ServiceName": "*",
        "ServiceType": "*",
        "Host": "*",
        "HTTPMethod": "*",
        "URLPath": "*",
        "Version": 1,
        "Attributes": {},
    }
    return {
        "SamplingRuleRecords": [
            {"SamplingRule": rule, "CreatedAt": modified_at, "ModifiedAt": modified_at}
        ]
    }


def sampling_targets(request: Any, now: float, modified_at: float) -> dict[str, Any]:
    """The SamplingTargets answer for a decoded request body.

    Every rule an SDK reports gets the default rule's rate and a reservoir
    quota of one request per second.  ``LastRuleModification`` stays at
    ``modified_at`` (when the daemon started), so SDKs never re-fetch rules
    for nothing.
    """
    if not isinstance(request, Mapping):
        raise BadRequest("the request body must be a JSON object")
    documents = request.get("SamplingStatisticsDocuments")
    if not isinstance(documents, list):
        raise BadRequest("SamplingStatisticsDocuments must be a list of statistics documents")
    names: list[str] = []
    for document in documents:
        name = document.get("RuleName") if isinstance(document, Mapping) else None
        if not isinstance(name, str) or not name:
            raise BadRequest("every statistics document needs a RuleName")
        if name not in names:
            names.append(name)
    return {
        "SamplingTargetDocuments": [
            {
                "RuleName": name,
                "FixedRate": DEFAULT_FIXED_RATE,
                "ReservoirQuota": DEFAULT_RESERVOIR,
                "ReservoirQuotaTTL": now + QUOTA_TTL,
                "Interval": TARGET_INTERVAL,
            }
            for name in names
        ],
        "LastRuleModification": modified_at,
        "UnprocessedStatistics": [],
    }


class LocalSamplingResource(Resource):
    """Answers the X-Ray sampling API on the TCP port, with no upstream.

    A leaf: it sees every path below where it is mounted and answers the two
    sampling paths itself; any other X-Ray path gets a JSON 404 that says
    why (e.g. a tool posting ``/TraceSegments`` to the TCP port).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        counters: Counters | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        super().__init__()
        self._clock = clock
        self._counters = counters
        self._max_body = max_body
        # Rules "changed" when the daemon started: SDKs fetch them once then.
        self.modified_at = float(int(clock.seconds()))

    def _count(self, outcome: str) -> None:
        if self._counters is not None:
            self._counters.proxy_requests[outcome] += 1

    def render(self, request: Request) -> bytes:
        path = request.path
        if path not in (RULES_PATH, TARGETS_PATH):
            self._count("not_found")
            return json_error(
                request,
                404,
                "NotFoundException",
                f"{printable(path)} is not available: {_MODE}. "
                "Run without --local-sink to use X-Ray.",
            )
        if request.method != b"POST":
            self._count("bad_method")
            request.setHeader(b"allow", b"POST")
            return json_error(
                request,
                405,
                "MethodNotAllowedException",
                f"use POST for {path.decode('ascii')}, not {printable(request.method)}",
            )
        body = read_body(request, self._max_body)
        if body is None:
            self._count("too_large")
            return body_too_large(request, self._max_body)
        self._count("local")
        if path == RULES_PATH:
            answer = rule_records(self.modified_at)
        else:
            try:
                decoded = json.loads(body) if body.strip() else None
                answer = sampling_targets(decoded, self._clock.seconds(), self.modified_at)
            except (ValueError, RecursionError, BadRequest) as e:
                reason = str(e) if isinstance(e, BadRequest) else "the request body is not JSON"
                return json_error(request, 400, "InvalidRequestException", reason)
        self.log.debug("Answered {path} locally", path=path.decode("ascii"))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode("utf-8")
