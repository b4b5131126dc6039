"""Sampling answered locally, for ``--local-sink`` mode (no AWS account needed).

SDKs poll the daemon's TCP port for ``POST /GetSamplingRules`` (every 5 min)
and ``POST /SamplingTargets`` (every 10 s).  With a local sink there is no
X-Ray to forward them to, so these are answered here, by default with one
rule that samples every request (a developer wants to see each trace they
make), and SDKs run unchanged.  ``--local-sampling-rate`` lowers that
rule's rate (0.05 is X-Ray's own default rule: the first request each
second plus 5 % of the rest), and ``--local-sampling-rules`` answers with
the rules of a file in the GetSamplingRules format instead, e.g. what
``aws xray get-sampling-rules`` prints for the production account.  The
answers have the API's shapes, which the SDKs check strictly (``Version``
1, ``ResourceARN`` "*", empty ``Attributes``, a non-empty ``ServiceType``;
Node needs a numeric ``LastRuleModification``).

The pure functions build the answers; ``LocalSamplingResource`` is the
twisted.web side, meant for the slot the signing proxy fills when uploading
to X-Ray.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
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
# Every request: locally, each trace a developer makes should reach the file.
DEFAULT_FIXED_RATE = 1.0
XRAY_DEFAULT_FIXED_RATE = 0.05  # X-Ray's own default rule, for production-like sampling
DEFAULT_RESERVOIR = 1  # requests per second sampled before the fixed rate applies
TARGET_INTERVAL = 10  # seconds between SamplingTargets calls the SDKs are asked for
QUOTA_TTL = 10.0  # seconds a reservoir quota stays valid
MAX_RULES_FILE_BYTES = 1024 * 1024

_MODE = (
    "xraytwisted is running with --local-sink: segments are written locally and only "
    "GetSamplingRules and SamplingTargets are answered (locally)"
)
# Fields SDKs insist on (see the module docstring); a hand-written rules
# file may leave them out.
_RULE_DEFAULTS: Mapping[str, Any] = {
    "ResourceARN": "*",
    "ServiceName": "*",
    "ServiceType": "*",
    "Host": "*",
    "HTTPMethod": "*",
    "URLPath": "*",
    "Version": 1,
    "Attributes": {},
}


class BadRequest(Exception):
    """A request body the API would refuse; str() says what is wrong."""


class RulesFileError(Exception):
    """A local sampling rules file that cannot be used; str() says why."""


@dataclass(frozen=True)
class LocalRules:
    """The sampling rules answered locally, and where they came from (for the log)."""

    rules: tuple[Mapping[str, Any], ...]
    source: str

    def target(self, name: str) -> Mapping[str, Any] | None:
        return next((r for r in self.rules if r["RuleName"] == name), None)


def _complete(rule: Mapping[str, Any]) -> dict[str, Any]:
    name = rule["RuleName"]
    return {"RuleARN": f"arn:aws:xray:local::sampling-rule/{name}", **_RULE_DEFAULTS, **rule}


def default_rules(rate: float = DEFAULT_FIXED_RATE) -> LocalRules:
    """One catch-all rule: ``rate`` of the requests, at least one a second."""
    rule = _complete({
        "RuleName": DEFAULT_RULE_NAME,
        "Priority": 10000,
        "FixedRate": rate,
        "ReservoirSize": DEFAULT_RESERVOIR,
    })  # fmt: skip
    if rate >= 1:
        source = "every request is sampled"
    else:
        source = f"the first request each second and {rate:.4g} of the rest are sampled"
    return LocalRules((rule,), source)


DEFAULT_RULES = default_rules()


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_rules(document: Any) -> tuple[dict[str, Any], ...]:
    """The rules of a GetSamplingRules answer; RulesFileError says what is wrong.

    Only what the answers are made of is checked; SDKs judge the rest (a
    rule with Attributes, say, is ignored by every SDK, as with X-Ray).
    """
    records = document.get("SamplingRuleRecords") if isinstance(document, Mapping) else None
    if not isinstance(records, list) or not records:
        raise RulesFileError('it needs a non-empty "SamplingRuleRecords" list')
    rules: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        rule = record.get("SamplingRule") if isinstance(record, Mapping) else None
        where = f"SamplingRuleRecords[{index}]"
        if not isinstance(rule, Mapping):
            raise RulesFileError(f'{where} has no "SamplingRule" object')
        name = rule.get("RuleName")
        if not isinstance(name, str) or not 1 <= len(name) <= 32:
            raise RulesFileError(f"{where}: RuleName must be a string of 1 to 32 characters")
        if any(r["RuleName"] == name for r in rules):
            raise RulesFileError(f"{where}: rule {name} appears twice")
        rate: Any = rule.get("FixedRate")
        reservoir: Any = rule.get("ReservoirSize")
        priority: Any = rule.get("Priority")
        if not (_number(rate) and 0 <= rate <= 1):
            raise RulesFileError(f"rule {name}: FixedRate must be a number from 0 to 1")
        if not (_whole(reservoir) and reservoir >= 0):
            raise RulesFileError(f"rule {name}: ReservoirSize must be a whole number, 0 or more")
        if not _whole(priority):
            raise RulesFileError(f"rule {name}: Priority must be a whole number")
        rules.append(_complete(rule))
    return tuple(rules)


def load_rules_file(path: str) -> LocalRules:
    """The rules in ``path`` (JSON as ``aws xray get-sampling-rules`` prints it)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RULES_FILE_BYTES + 1)
    except OSError as e:
        raise RulesFileError(e.strerror or str(e)) from None
    if len(data) > MAX_RULES_FILE_BYTES:
        raise RulesFileError(f"it is larger than {MAX_RULES_FILE_BYTES // 1024} KiB")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise RulesFileError(f"it is not JSON ({e})") from None
    rules = parse_rules(document)
    names = ", ".join(r["RuleName"] for r in rules)
    return LocalRules(rules, f"{len(rules)} rules from {path} ({names})")


def rule_records(modified_at: float, rules: LocalRules = DEFAULT_RULES) -> dict[str, Any]:
    """The GetSamplingRules answer: the local rules (by default, one that samples everything)."""
    return {
        "SamplingRuleRecords": [
            {"SamplingRule": dict(rule), "CreatedAt": modified_at, "ModifiedAt": modified_at}
            for rule in rules.rules
        ]
    }


def sampling_targets(
    request: Any, now: float, modified_at: float, rules: LocalRules = DEFAULT_RULES
) -> dict[str, Any]:
    """The SamplingTargets answer for a decoded request body.

    Every rule an SDK reports gets its own rate and its reservoir as the
    quota (one SDK is all a developer usually runs); names that are not
    local rules are listed as unprocessed, as X-Ray does for unknown rules.
    ``LastRuleModification`` stays at ``modified_at`` (when the daemon
    started), so SDKs never re-fetch rules for nothing.
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
    targets: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []
    for name in names:
        rule = rules.target(name)
        if rule is None:
            unknown.append(
                {"RuleName": name, "ErrorCode": "400", "Message": "not a local sampling rule"}
            )
            continue
        targets.append(
            {
                "RuleName": name,
                "FixedRate": rule["FixedRate"],
                "ReservoirQuota": rule["ReservoirSize"],
                "ReservoirQuotaTTL": now + QUOTA_TTL,
                "Interval": TARGET_INTERVAL,
            }
        )
    return {
        "SamplingTargetDocuments": targets,
        "LastRuleModification": modified_at,
        "UnprocessedStatistics": unknown,
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
        rules: LocalRules = DEFAULT_RULES,
    ) -> None:
        super().__init__()
        self._clock = clock
        self.rules = rules
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
            answer = rule_records(self.modified_at, self.rules)
        else:
            try:
                decoded = json.loads(body) if body.strip() else None
                answer = sampling_targets(
                    decoded, self._clock.seconds(), self.modified_at, self.rules
                )
            except (ValueError, RecursionError, BadRequest) as e:
                reason = str(e) if isinstance(e, BadRequest) else "the request body is not JSON"
                return json_error(request, 400, "InvalidRequestException", reason)
        self.log.debug("Answered {path} locally", path=path.decode("ascii"))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(answer).encode("utf-8")
