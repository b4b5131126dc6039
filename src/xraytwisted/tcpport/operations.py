"""The X-Ray API's operations, and which of them the sampling proxy forwards.

Pure data, no Twisted: the settings loader validates ``SamplingProxy.Allow``
with ``parse_allow``.  X-Ray SDKs call only ``GetSamplingRules`` and
``GetSamplingTargets`` through the daemon; everything else the proxy would
sign - ``DeleteSamplingRule``, ``PutEncryptionConfig``,
``UpdateTraceSegmentDestination``, ``PutResourcePolicy``, ... - is forwarded
only when the setting names it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Operation:
    name: str
    method: bytes


# Every operation of the X-Ray API with its HTTP method and request URI, from
# botocore's xray/2016-04-12/service-2.json.  All are POST to a fixed path:
# no URI labels and no query parameters, so an exact path match is complete.
OPERATIONS: Mapping[bytes, Operation] = MappingProxyType(
    {
        path.encode("ascii"): Operation(name, b"POST")
        for name, path in (
            ("BatchGetTraces", "/Traces"),
            ("CancelTraceRetrieval", "/CancelTraceRetrieval"),
            ("CreateGroup", "/CreateGroup"),
            ("CreateSamplingRule", "/CreateSamplingRule"),
            ("DeleteGroup", "/DeleteGroup"),
            ("DeleteResourcePolicy", "/DeleteResourcePolicy"),
            ("DeleteSamplingRule", "/DeleteSamplingRule"),
            ("GetEncryptionConfig", "/EncryptionConfig"),
            ("GetGroup", "/GetGroup"),
            ("GetGroups", "/Groups"),
            ("GetIndexingRules", "/GetIndexingRules"),
            ("GetInsight", "/Insight"),
            ("GetInsightEvents", "/InsightEvents"),
            ("GetInsightImpactGraph", "/InsightImpactGraph"),
            ("GetInsightSummaries", "/InsightSummaries"),
            ("GetRetrievedTracesGraph", "/GetRetrievedTracesGraph"),
            ("GetSamplingRules", "/GetSamplingRules"),
            ("GetSamplingStatisticSummaries", "/SamplingStatisticSummaries"),
            ("GetSamplingTargets", "/SamplingTargets"),
            ("GetServiceGraph", "/ServiceGraph"),
            ("GetTimeSeriesServiceStatistics", "/TimeSeriesServiceStatistics"),
            ("GetTraceGraph", "/TraceGraph"),
            ("GetTraceSegmentDestination", "/GetTraceSegmentDestination"),
            ("GetTraceSummaries", "/TraceSummaries"),
            ("ListResourcePolicies", "/ListResourcePolicies"),
            ("ListRetrievedTraces", "/ListRetrievedTraces"),
            ("ListTagsForResource", "/ListTagsForResource"),
            ("PutEncryptionConfig", "/PutEncryptionConfig"),
            ("PutResourcePolicy", "/PutResourcePolicy"),
            ("PutTelemetryRecords", "/TelemetryRecords"),
            ("PutTraceSegments", "/TraceSegments"),
            ("StartTraceRetrieval", "/StartTraceRetrieval"),
            ("TagResource", "/TagResource"),
            ("UntagResource", "/UntagResource"),
            ("UpdateGroup", "/UpdateGroup"),
            ("UpdateIndexingRule", "/UpdateIndexingRule"),
            ("UpdateSamplingRule", "/UpdateSamplingRule"),
            ("UpdateTraceSegmentDestination", "/UpdateTraceSegmentDestination"),
        )
    }
)

BY_NAME: Mapping[str, bytes] = MappingProxyType({op.name: path for path, op in OPERATIONS.items()})

# What X-Ray SDKs send to the daemon's TCP port: always forwarded.
SDK_PATHS = frozenset({b"/GetSamplingRules", b"/SamplingTargets"})

ALL = "*"  # SamplingProxy.Allow: every operation (the Go daemon forwards everything)


def parse_allow(text: str) -> frozenset[bytes]:
    """The paths ``SamplingProxy.Allow`` adds to ``SDK_PATHS``.

    A comma-separated list of X-Ray API paths (``/TraceSummaries``) or
    operation names (``GetTraceSummaries``), or ``*`` for all of them.
    Raises ValueError naming the entries that are neither.
    """
    allowed: set[bytes] = set()
    unknown: list[str] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        if entry == ALL:
            allowed.update(OPERATIONS)
        elif entry.startswith("/") and entry.encode("utf-8") in OPERATIONS:
            allowed.add(entry.encode("ascii"))
        elif entry in BY_NAME:
            allowed.add(BY_NAME[entry])
        else:
            unknown.append(entry)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not an X-Ray API path or operation name "
            "(write /TraceSummaries or GetTraceSummaries, or * for all)"
        )
    return frozenset(allowed - SDK_PATHS)
