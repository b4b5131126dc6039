"""GET /health: can this daemon get segments to X-Ray?  200 if so, 503 if not.

The verdict is a pure function of a few numbers (``assess``); the resource
only gathers them through callables, so it knows nothing about the batcher
or the credential machinery.  The daemon is unhealthy when

* no AWS credentials are available (nothing can be uploaded), or X-Ray
  refused them at the last upload (and none has succeeded since), or
* segments are waiting, the oldest has waited ``unhealthy_after`` seconds,
  and no upload has succeeded in that time either.

An idle daemon is healthy: no segments means nothing is known to be wrong.
With the OTLP bridge on (``--otlp-address``) the body has an ``otlp``
section (``otlp_section``: requests and spans in and out, buffer use,
refusals, the span uploads' last error), ``null`` when it is off; it does
not change the verdict, which is about segments: spans refused because the
account has Transaction Search off, say, are not cured by a restart.
A full buffer with uploads succeeding is overload, not ill health (a
restart would not help), so it shows in the body but not in the status.

``monitoring_site`` serves /health and /metrics (only) on their own address.

Anyone who can reach the port can read /health, so ARNs, account ids and
access key ids in it (a role being assumed, an STS or X-Ray error) are
hidden unless ``show_identity`` (Monitoring.ShowIdentity) is set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request

from xraytwisted import __version__
from xraytwisted.listen.bounded_site import BoundedSite
from xraytwisted.listen.connections import ConnectionCap
from xraytwisted.observe.counters import Counters, OtlpCounters
from xraytwisted.pipeline.uploader import CredentialSource
from xraytwisted.tcpport.site import make_site

CredentialsStatus = Callable[[], "tuple[bool, str]"]

MAX_BODY = 4096  # bytes of request body the monitoring listener accepts

# IAM unique id prefixes: access keys (AKIA, ASIA), users (AIDA), roles
# (AROA), groups (AGPA), managed policies (ANPA) and their versions (ANVA),
# instance profiles (AIPA), certificates (ASCA), public keys (APKA),
# bearer tokens (ABIA), context credentials (ACCA).  A role's id may be
# followed by ":session-name", which names the caller: hidden too.
_IDENTITY = re.compile(
    r"arn:aws[a-z-]*:[^\s\"',;()\[\]]*(?<!\.)"  # an ARN (not a full stop after it)
    r"|\bA(?:KIA|SIA|IDA|ROA|GPA|NPA|NVA|IPA|SCA|PKA|BIA|CCA)[A-Z0-9]{12,}\b"
    r"(?::[\w+=,.@-]+(?<!\.))?"
    # An account id: 12 digits, not part of a longer number (a decimal
    # point between digits continues a number; a full stop ending a
    # sentence does not).
    r"|(?<!\d)(?<!\d\.)\d{12}(?!\d)(?!\.\d)"
)


def hide_identity(value: Any) -> Any:
    """``value`` (a JSON document) with ARNs, account ids, access key and principal ids replaced."""
    if isinstance(value, str):
        return _IDENTITY.sub("(hidden: Monitoring.ShowIdentity)", value)
    if isinstance(value, dict):
        return {key: hide_identity(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_identity(item) for item in value]
    return value


class BufferUse(Protocol):
    """What /health shows of the segment buffer (``SegmentBuffer`` has both)."""

    @property
    def used(self) -> int: ...

    @property
    def capacity(self) -> int: ...


@dataclass(frozen=True)
class Report:
    healthy: bool
    body: dict[str, Any]

    @property
    def code(self) -> int:
        return 200 if self.healthy else 503


def assess(
    *,
    now: float,
    started_at: float,
    last_success_at: float | None,
    waiting: int,
    oldest_waiting_since: float | None,
    unhealthy_after: float,
    credentials: tuple[bool, str],
    buffer_used: int,
    buffer_capacity: int,
    endpoint: str,
    credentials_refused: str | None = None,
    last_upload_error: tuple[float, str] | None = None,
    otlp: dict[str, Any] | None = None,
) -> Report:
    """The health verdict and the JSON body, from plain values.

    ``oldest_waiting_since`` is when the oldest waiting segment arrived; when
    it is unknown (None while segments wait) the daemon's start time stands
    in for it, so a burst after a long idle time can read as stuck for up
    to one batch deadline.
    """
    reasons: list[str] = []
    have_credentials, credentials_source = credentials
    if not have_credentials:
        reasons.append(f"no AWS credentials available ({credentials_source})")
    if credentials_refused is not None:
        reasons.append(
            f"X-Ray refused the credentials ({credentials_refused}): check the role's "
            "xray:PutTraceSegments permission"
        )
    oldest_wait: float | None = None
    if waiting > 0:
        since = oldest_waiting_since if oldest_waiting_since is not None else started_at
        oldest_wait = max(0.0, now - since)
        # Progress is either the oldest waiting segment being young, or a
        # recent success (a backlog that drains slowly is not stuck).
        progress = max(since, last_success_at) if last_success_at is not None else since
        stalled = now - progress
        if stalled >= unhealthy_after:
            if last_success_at is None:
                what = "no upload has succeeded since the daemon started"
            else:
                what = f"the last successful upload was {now - last_success_at:.0f} seconds ago"
            reasons.append(
                f"{waiting} segments waiting, the oldest for {oldest_wait:.0f} seconds, and "
                f"{what} (limit {unhealthy_after:g} seconds)"
            )
    body: dict[str, Any] = {
        "status": "unhealthy" if reasons else "ok",
        "reasons": reasons,
        "version": __version__,
        "uptime_seconds": round(max(0.0, now - started_at), 3),
        "last_successful_upload": _when(now, last_success_at),
        "last_upload_error": _error(now, last_upload_error),
        "segments_waiting": waiting,
        "oldest_waiting_seconds": round(oldest_wait, 3) if oldest_wait is not None else None,
        "buffer": {"used_bytes": buffer_used, "capacity_bytes": buffer_capacity},
        "endpoint": endpoint,
        "credentials": {"available": have_credentials, "source": credentials_source},
        "unhealthy_after_seconds": unhealthy_after,
        "otlp": otlp,
    }
    if credentials_refused is not None:
        body["credentials"]["refused_by_xray"] = credentials_refused
    return Report(healthy=not reasons, body=body)


def _when(now: float, at: float | None) -> dict[str, float] | None:
    if at is None:
        return None
    return {"epoch": round(at, 3), "seconds_ago": round(max(0.0, now - at), 3)}


def _error(now: float, error: tuple[float, str] | None) -> dict[str, Any] | None:
    """The last failed upload (None since a success): what it said, and when."""
    if error is None:
        return None
    at, message = error
    return {"message": message, **(_when(now, at) or {})}


def otlp_section(
    counters: OtlpCounters,
    *,
    now: float,
    traces_url: str,
    buffer_used: int,
    waiting: int,
    last_upload_error: tuple[float, str] | None,
) -> dict[str, Any]:
    """The ``otlp`` part of the body: the OTLP bridge's traffic, from plain values.

    ``requests`` count OTLP requests as SDKs posted them, ``spans`` the spans
    in them; ``lost_requests_spans_unknown`` are lost requests (in
    ``requests.lost``) whose spans could not be known, so are not in
    ``spans.lost`` (see docs/otlp.md).
    """
    r = counters.requests
    return {
        "traces_url": traces_url,
        "requests": {
            "received": counters.requests_received,
            "sent": r.sent,
            "rejected": r.rejected,
            "lost": r.lost,
            "spooled": r.spooled,
            "replayed": r.replayed,
            "waiting": waiting,
        },
        "spans": {
            "received": counters.spans_received,
            "sent": counters.spans_sent,
            "rejected": counters.spans_rejected,
            "lost": counters.spans_lost,
            "spooled": counters.spans_spooled,
            "replayed": counters.spans_replayed,
        },
        "lost_requests_spans_unknown": counters.lost_requests_spans_unknown,
        "refused": dict(counters.refused),
        "buffer": {"used_bytes": buffer_used},
        "last_successful_upload": _when(now, r.last_success_at),
        "last_upload_error": _error(now, last_upload_error),
    }


@dataclass(frozen=True)
class OtlpHealth:
    """Where /health reads the OTLP bridge's numbers (``otlp_bridge.OtlpBridge`` has them)."""

    counters: OtlpCounters
    traces_url: str
    buffer_used: Callable[[], int]
    waiting: Callable[[], int]
    last_upload_error: Callable[[], tuple[float, str] | None]

    def section(self, now: float) -> dict[str, Any]:
        return otlp_section(
            self.counters,
            now=now,
            traces_url=self.traces_url,
            buffer_used=self.buffer_used(),
            waiting=self.waiting(),
            last_upload_error=self.last_upload_error(),
        )


def credentials_status(source: CredentialSource) -> CredentialsStatus:
    """A ``credentials_status`` callable: usable right now?, and the source's status line."""

    def status() -> tuple[bool, str]:
        return source.current() is not None, source.status()

    return status


@dataclass(frozen=True)
class HealthState:
    """Where /health reads its numbers; callables keep it decoupled from the services."""

    clock: IReactorTime
    counters: Counters
    buffer: BufferUse
    waiting_docs: Callable[[], int]
    credentials_status: CredentialsStatus
    endpoint_url: str
    started_at: float
    unhealthy_after: float
    oldest_waiting_since: Callable[[], float | None] | None = field(default=None)
    credentials_refused: Callable[[], str | None] | None = field(default=None)
    last_upload_error: Callable[[], tuple[float, str] | None] | None = field(default=None)
    otlp: OtlpHealth | None = field(default=None)  # None: the OTLP bridge is off

    def report(self) -> Report:
        now = self.clock.seconds()
        return assess(
            now=now,
            started_at=self.started_at,
            last_success_at=self.counters.last_success_at,
            waiting=self.waiting_docs(),
            oldest_waiting_since=(
                self.oldest_waiting_since() if self.oldest_waiting_since is not None else None
            ),
            unhealthy_after=self.unhealthy_after,
            credentials=self.credentials_status(),
            buffer_used=self.buffer.used,
            buffer_capacity=self.buffer.capacity,
            endpoint=self.endpoint_url,
            credentials_refused=(
                self.credentials_refused() if self.credentials_refused is not None else None
            ),
            last_upload_error=(
                self.last_upload_error() if self.last_upload_error is not None else None
            ),
            otlp=self.otlp.section(now) if self.otlp is not None else None,
        )


# ---------------------------------------------------------------------------
# HTTP


def _json(request: Request, code: int, document: Mapping[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    # Probes must see the current state, never a cached one.
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(document, separators=(",", ":")).encode("utf-8") + b"\n"


def method_not_allowed(request: Request) -> bytes:
    request.setHeader(b"allow", b"GET, HEAD")
    return _json(request, 405, {"error": "method not allowed", "allow": ["GET", "HEAD"]})


class HealthResource(Resource):
    """GET/HEAD /health: 200 and the report when healthy, 503 when not."""

    isLeaf = True
    log = Logger()

    def __init__(self, state: HealthState, show_identity: bool = False) -> None:
        super().__init__()
        self.state = state
        self.show_identity = show_identity

    def render(self, request: Request) -> bytes:
        # HEAD gets the same status and headers; twisted.web drops the body.
        if request.method not in (b"GET", b"HEAD"):
            return method_not_allowed(request)
        try:
            report = self.state.report()
        except Exception:
            # A probe must get an answer; a broken check counts as unhealthy.
            self.log.failure("Health check failed; answering 503")
            return _json(request, 503, {"status": "unhealthy", "reasons": ["health check failed"]})
        body = report.body if self.show_identity else hide_identity(report.body)
        return _json(request, report.code, body)


class _MonitoringRoot(Resource):
    """Exactly /health and /metrics; a JSON 404 for every other path."""

    isLeaf = True

    def __init__(self, routes: Mapping[bytes, IResource]) -> None:
        super().__init__()
        self._routes = dict(routes)

    def render(self, request: Request) -> Any:
        target = self._routes.get(request.path)
        if target is None:
            return _json(
                request,
                404,
                {"error": "not found", "paths": sorted(p.decode() for p in self._routes)},
            )
        return target.render(request)


# Connections the monitoring listener (Monitoring.Address) takes at once, in
# all and from one address; more are closed as soon as they are accepted
# (counted as tcp_refused).  Probes and scrapers are a handful of clients.
MONITORING_MAX_CONNECTIONS = 64
MONITORING_MAX_PER_PEER = 16


def monitoring_site(
    health: IResource,
    metrics: IResource,
    timeout: float,
    reactor: IReactorTime | None = None,
    *,
    counters: Counters,
    max_connections: int = MONITORING_MAX_CONNECTIONS,
    max_per_peer: int = MONITORING_MAX_PER_PEER,
) -> BoundedSite:
    """The Site for Monitoring.Address: /health and /metrics only.

    ``timeout`` is the idle-connection timeout in seconds.  The Site is the
    TCP port's quiet one: no access-log line per probe or scrape, idle
    timeouts (Prometheus keeps its connection open between scrapes) at
    debug, and request bodies refused beyond a few KiB (GET needs none).
    At most ``max_connections`` connections are open at once, and
    ``max_per_peer`` from one address; more are refused as the TCP port
    refuses them (``tcp_refused`` in ``counters``, a throttled warning).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = cast(IReactorTime, global_reactor)
    cap = ConnectionCap(
        counters,
        reactor,
        total="Refusing monitoring connection from {peer}: {limit} connections are "
        "open on --monitoring-address (Monitoring.Address), the most allowed. Find the "
        "client that holds them open",
        peer="Refusing monitoring connection from {peer}: that address already has "
        "{limit} connections open on --monitoring-address (Monitoring.Address), the "
        "most one address may hold. Find the client that holds them open",
    )
    root = _MonitoringRoot({b"/health": health, b"/metrics": metrics})
    return make_site(
        root,
        timeout=timeout,
        max_body=MAX_BODY,
        reactor=reactor,
        max_connections=max_connections,
        max_per_peer=max_per_peer,
        cap=cap,
    )
