"""The daemon: settings in, a running MultiService out.

``build`` wires the data path - ingest (UDP) -> buffer -> batcher ->
uploader -> X-Ray - into one ``XRayDaemon`` service.  Anything that can be
wrong with the settings or the machine (bad address, port in use, no
region) raises ``StartupError`` here, before twistd logs or daemonizes, so
it ends the start with one clear line.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized
from twisted.web.resource import Resource

from xraytwisted import __version__
from xraytwisted.aws import endpoints, instance_metadata
from xraytwisted.aws import region as regions
from xraytwisted.aws.credentials import CredentialsService, StaticCredentials
from xraytwisted.aws.region import NO_REGION
from xraytwisted.ingest.core import Ingest
from xraytwisted.ingest.otlp_http import OtlpHTTPService
from xraytwisted.ingest.udp import UDPIngestService
from xraytwisted.ingest.udp_drops import UdpDropMonitor, socket_inode
from xraytwisted.listen import bind
from xraytwisted.listen.held import HeldBytes, default_hold
from xraytwisted.observe.accept_errors import AcceptErrorFilter
from xraytwisted.observe.counters import Counters
from xraytwisted.observe.telemetry import TelemetryService
from xraytwisted.otlp_bridge import OtlpBridge, build_bridge
from xraytwisted.outbound import resolver
from xraytwisted.outbound.http_client import make_http, outbound_info, outbound_warnings
from xraytwisted.outbound.proxy_rules import ProxyConfigError, mask_password
from xraytwisted.pipeline import otlp_json
from xraytwisted.pipeline.batcher import Batcher
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.local_sink import LocalSink, LocalSinkError
from xraytwisted.pipeline.offload import thread_pool_runner
from xraytwisted.pipeline.spool import Spool, SpoolError
from xraytwisted.pipeline.uploader import CredentialSource, Uploader
from xraytwisted.settings import addresses
from xraytwisted.settings.budget import Budget, buffer_budget
from xraytwisted.settings.table import KEYS, Settings
from xraytwisted.tcpport.health import (
    MONITORING_MAX_CONNECTIONS,
    MONITORING_MAX_PER_PEER,
    HealthResource,
    HealthState,
    OtlpHealth,
    credentials_status,
    monitoring_site,
)
from xraytwisted.tcpport.local_sampling import (
    LocalRules,
    LocalSamplingResource,
    RulesFileError,
    default_rules,
    load_rules_file,
)
from xraytwisted.tcpport.operations import parse_allow
from xraytwisted.tcpport.sampling_proxy import SamplingProxy
from xraytwisted.tcpport.site import LazyResource, SiteService, http_root, make_site
from xraytwisted.tcpport.sniffing import (
    SniffingFactory,
    TCPPortService,
    connection_limits,
)

__all__ = ["NO_REGION", "Parts", "StartupError", "XRayDaemon", "build"]


class StartupError(Exception):
    """The daemon cannot start; str() is the one line to show."""


@dataclass
class Parts:
    """The pieces of a built daemon, for tests and for other services to use."""

    settings: Settings
    counters: Counters
    budget: Budget
    buffer: SegmentBuffer
    batcher: Batcher
    uploader: Uploader
    ingest: Ingest
    udp: UDPIngestService
    tcp: TCPPortService
    endpoint: endpoints.Endpoint
    region: str
    credentials: CredentialSource
    identity: instance_metadata.Identity
    spool: Spool | None = None
    otlp: OtlpBridge | None = None  # the span pipeline, with --otlp-address
    # (level, text) lines for the startup banner, e.g. the outbound proxy in use.
    notes: list[tuple[str, str]] = field(default_factory=list)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class XRayDaemon(MultiService):
    """The root service.  Stops in data-path order: ingest, then the batcher drain."""

    log = Logger()

    def __init__(
        self,
        parts: Parts | None = None,
        observer: ILogObserver | None = None,
        reactor: Any = None,
        handle_signals: bool = False,
    ) -> None:
        super().__init__()
        self.parts = parts
        self._reactor = reactor
        self._handle_signals = handle_signals
        self._stopping_on_signal = False
        self._stopping_now = False
        self._signals_taken = False
        self._banner_parts: Parts | None = None
        self.observer = observer
        self.ingest_services: list[IService] = []
        self.drain_services: list[IService] = []
        self.cleanups: list[Any] = []

    def setServiceParent(self, parent: Any) -> None:
        # twistd hands us its Application before it starts logging and then
        # logs through the Application's ILogObserver if it has one: this is
        # how a plugin gets twistd to log in the Go daemon's format.
        if self.observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)

    def privilegedStartService(self) -> None:
        # twistd calls this first (before dropping privileges); children bind
        # here, so the banner goes first.
        self._banner()
        self._take_signals()
        super().privilegedStartService()

    def startService(self) -> None:
        self._banner()
        self._take_signals()
        super().startService()

    def _take_signals(self) -> None:
        if self._handle_signals and not self._signals_taken:
            # Now, so a signal between here and reactor.run() still drains
            # (Python's default would kill the process, leaving the pidfile),
            # and again once the reactor has installed its own handlers.
            self._signals_taken = True
            self._install_signal_handlers()
            if not self._reactor.running:
                # The reactor installs twistd's SIGTERM handler "during
                # startup" (it ends the process by the signal, status -15,
                # without our stop line): hold the signals from now until
                # ours are back, "during startup" too (this trigger comes
                # after the reactor's own), so none lands in between.  Now,
                # before the children start, so that no thread runs unblocked
                # in that window (a signal the kernel gave one would run
                # whichever handler the main thread had at that moment); the
                # credential lookup therefore starts its thread only once the
                # reactor runs, since a thread keeps the mask it started with
                # (and passes it on to a credential_process child).  A held
                # signal is delivered on unblocking.
                self._hold_signals()
                self._reactor.addSystemEventTrigger(
                    "during", "startup", self._install_signal_handlers, release=True
                )
            self._reactor.callWhenRunning(self._install_signal_handlers)
            # Everything that exists once the reactor runs (modules, services)
            # lives as long as the process: take it out of the cyclic GC's
            # sight so full collections only walk what comes and goes.
            self._reactor.callWhenRunning(gc.freeze)

    def _hold_signals(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    def _install_signal_handlers(self, release: bool = False) -> None:
        # twistd's handlers make the process end *by* the signal (status
        # -15); the Go daemon drains and exits 0, and supervisors expect that.
        for signum in _STOP_SIGNALS:
            signal.signal(signum, self._on_signal)
        if release:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    def _on_signal(self, signum: int, frame: object) -> None:
        name = "interrupt" if signum == signal.SIGINT else "terminated"
        if self._stopping_on_signal:
            # A second Ctrl-C means "now": the drain ends, what is left is
            # spooled or counted as lost.  Later signals change nothing.
            if not self._stopping_now:
                self._stopping_now = True
                self._reactor.callFromThread(self._stop_now, name)
            return
        self._stopping_on_signal = True
        self._reactor.callFromThread(self._stop_on_signal, name)

    def _stop_now(self, name: str) -> None:
        self.log.info("Got a second shutdown signal: {name}; stopping without waiting", name=name)
        for ingest in self.ingest_services:
            if isinstance(ingest, (TCPPortService, OtlpHTTPService)):
                ingest.stop_now()  # no stop grace for the streams or OTLP connections either
        for service in self.drain_services:
            if isinstance(service, Batcher):
                service.stop_now("Stopped early by the second shutdown signal")

    def _stop_on_signal(self, name: str) -> None:
        self.log.info("Got shutdown signal: {name}", name=name)
        self._reactor.stop()

    def _banner(self) -> None:
        parts, self._banner_parts = self._banner_parts, None
        if parts is not None:
            s = parts.settings
            self.log.info("Initializing AWS X-Ray daemon {version}", version=__version__)
            self.log.info(
                "Using buffer memory limit of {mb} MB ({source})",
                mb=parts.budget.megabytes,
                source=parts.budget.source,
            )
            if not s.local_sink:
                self.log.info("Using region: {region}", region=parts.region)
            self.log.debug("Using Endpoint: {url}", url=parts.endpoint.url)
            self.log.debug("Batch size: {size}", size=parts.buffer.batch_size)
            for level, note in parts.notes:
                self.log.emit(LogLevel.levelWithName(level), "{note}", note=note)
            self.log.info("Effective configuration: {summary}", summary=summarize(s, parts))

    def stopService(self) -> Deferred[None]:
        # MultiService would stop every child at once; the order matters here:
        # stop taking data in, then send what was accepted, then clean up.
        Service.stopService(self)
        others = [s for s in self if s not in self.ingest_services and s not in self.drain_services]

        def stop_all(services: list[IService]) -> Deferred[Any]:
            ordered = list(reversed(services))
            return DeferredList(
                [maybeDeferred(s.stopService) for s in ordered], consumeErrors=True
            ).addCallback(self._log_failures, [_service_name(s) for s in ordered])

        def run_cleanups(_: object) -> Deferred[Any]:
            return DeferredList(
                [maybeDeferred(c) for c in self.cleanups], consumeErrors=True
            ).addCallback(self._log_failures, [_cleanup_name(c) for c in self.cleanups])

        d = stop_all(self.ingest_services)
        d.addCallback(lambda _: stop_all(self.drain_services))
        d.addCallback(lambda _: stop_all(others))
        d.addCallback(run_cleanups)
        return d.addCallback(lambda _: None)

    def _log_failures(self, results: list[tuple[bool, Any]], names: list[str]) -> None:
        # One failure must neither stop the others nor go unsaid.
        for (ok, result), name in zip(results, names, strict=True):
            if not ok:
                self.log.failure(
                    "Error while stopping {what}; stopping the rest anyway",
                    result,
                    level=LogLevel.error,
                    what=name,
                )


def _service_name(service: IService) -> str:
    return service.name or type(service).__name__


def _cleanup_name(cleanup: Any) -> str:
    return str(getattr(cleanup, "__qualname__", None) or repr(cleanup))


# cfg.yaml key suffix -> unit shown after the value in the summary line.
_UNITS = (("Seconds", "s"), ("MS", "ms"), ("KB", "KB"), ("MB", "MB"))


def summarize(s: Settings, parts: Parts) -> str:
    """One line with every setting (flag name=value) as the daemon uses it.

    Values the daemon worked out are shown resolved (region, endpoint,
    buffer size); a proxy password is masked.
    """
    factory = parts.tcp.factory
    resolved: dict[str, object] = {
        "tcp_max_connections": factory.max_connections,
        "tcp_max_connections_per_peer": factory.max_per_peer,
        "tcp_hold_kb": factory.hold.capacity // 1024 if factory.hold is not None else 0,
        "region": "none" if s.local_sink else parts.region,  # nothing is uploaded
        "endpoint": "none" if s.local_sink else parts.endpoint.url,
        "buffer_memory_mb": parts.budget.megabytes,
        "proxy_address": mask_password(s.proxy_address) if s.proxy_address else "none",
        "log_path": s.log_path or "stdout",
    }
    fields = []
    for key in KEYS:
        if key.attr == "version":
            continue
        value = resolved.get(key.attr, getattr(s, key.attr))
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value) if value != "" else "none"
        if not text or any(c.isspace() or c in '"\\' for c in text):
            text = json.dumps(text)  # one field per name=value, whatever the value
        name = key.long or key.attr
        unit = next((u for suffix, u in _UNITS if key.name.endswith(suffix)), "")
        if name.endswith("-" + unit.lower()):
            unit = ""  # spool-max-mb=1024, not 1024MB
        fields.append(f"{name}={text}{unit}")
    fields.append(f"config={s.config_path or 'none'}")
    return " ".join(fields)


def _addresses(
    settings: Settings,
) -> tuple[addresses.Address, addresses.Address, addresses.Address | None]:
    try:
        udp = addresses.parse_address(settings.udp_address)
        tcp = addresses.parse_address(settings.tcp_address, "tcp")
        monitoring = (
            addresses.parse_address(settings.monitoring_address, "tcp")
            if settings.monitoring_address
            else None
        )
    except addresses.AddressError as e:
        raise StartupError(str(e)) from None
    return udp, tcp, monitoring


def _where_to(
    settings: Settings, env: Mapping[str, str]
) -> tuple[str, endpoints.Endpoint, instance_metadata.Identity]:
    """Region, X-Ray endpoint and identity (hostname, instance id)."""
    log = XRayDaemon.log
    if settings.local_sink:
        # Nothing is uploaded: no metadata lookups, the region is only a label.
        region = settings.region or env.get("AWS_REGION", "") or "us-east-1"
        identity = instance_metadata.Identity(
            env.get("AWS_HOSTNAME", ""), env.get("AWS_INSTANCE_ID", "")
        )
    else:
        meta = instance_metadata.MetadataClient(env)
        try:
            region, source = regions.resolve_region(settings, env, meta)
        except regions.RegionError as e:
            raise StartupError(str(e)) from None
        log.debug("Fetch region {region} from {source}", region=region, source=source)
        identity = instance_metadata.identity(settings, env, meta)
    try:
        endpoint = endpoints.resolve(region, configured=settings.endpoint, env=dict(env))
    except endpoints.EndpointError as e:
        raise StartupError(str(e)) from None
    return region, endpoint, identity


def _descriptors() -> tuple[int | None, int]:
    """RLIMIT_NOFILE's soft limit (None: unlimited) and the descriptors open now."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd")) - 1  # (listdir's own)
    except OSError:  # no /proc: a typical count at this point
        in_use = 16
    return (None if soft == resource.RLIM_INFINITY else soft), in_use


def _tcp_limits(settings: Settings, notes: list[tuple[str, str]]) -> tuple[int, int]:
    """The TCP port's connection limits (total, per peer): configured, or from ulimit -n."""
    soft, in_use = _descriptors()
    # One descriptor per upload and proxied request in flight, and telemetry.
    outbound = settings.concurrency + settings.proxy_max_concurrent + 1
    total, per_peer, cramped = connection_limits(soft, in_use, outbound)
    if cramped and not settings.tcp_max_connections:
        notes.append((
            "warn",
            f"The file descriptor limit (ulimit -n) is {soft}, {in_use} are in use: the TCP "
            f"port takes at most {total} connections, and uploads may still run short of "
            "descriptors. Raise the limit (e.g. LimitNOFILE= in the systemd unit, "
            "--ulimit nofile= for docker)",
        ))  # fmt: skip
    room = total
    if settings.tcp_max_connections:
        total = settings.tcp_max_connections
        if soft is not None and total > room:
            notes.append((
                "warn",
                f"--tcp-max-connections {total} is more than the file descriptor limit "
                f"(ulimit -n {soft}) leaves room for besides uploads ({room}): clients could "
                "use up the descriptors uploads and the spool need",
            ))  # fmt: skip
        per_peer = min(total, max(total // 4, 64))
    if settings.tcp_max_connections_per_peer:
        per_peer = settings.tcp_max_connections_per_peer
    return total, min(per_peer, total)


def _local_rules(settings: Settings) -> LocalRules:
    """The sampling rules --local-sink answers with (read now: a bad file stops the start)."""
    path = settings.local_sampling_rules
    if not path:
        return default_rules(settings.local_sampling_rate)
    try:
        return load_rules_file(path)
    except RulesFileError as e:
        raise StartupError(
            f"Cannot use the local sampling rules file {path}: {e}; give a JSON file in the "
            "GetSamplingRules format (what `aws xray get-sampling-rules` prints) with "
            "--local-sampling-rules or LocalSampling.RulesFile"
        ) from None


def _bind(address: addresses.Address, kind: str, flags: str, key: str, rcvbuf: int = 0) -> Any:
    try:
        if kind == "udp":
            return bind.bind_udp(address, rcvbuf)
        return bind.bind_tcp(address)
    except addresses.AddressError as e:
        raise StartupError(f"{e} (set it with {flags} or {key})") from None


def build(
    settings: Settings,
    reactor: Any,
    *,
    env: Mapping[str, str] | None = None,
    observer: ILogObserver | None = None,
    http_client: Any = None,
    credentials: CredentialSource | None = None,
    handle_signals: bool = False,
) -> XRayDaemon:
    """Build the whole daemon; raises StartupError when it cannot run.

    Region and identity lookups may ask instance/task metadata services:
    blocking, bounded to about 2 s in all, and done here, before the
    reactor runs.  Sockets are bound last, so nothing after them can fail.
    """
    env = os.environ if env is None else env
    local = bool(settings.local_sink)
    udp_address, tcp_address, monitoring_address = _addresses(settings)
    otlp_address = _otlp_address(settings)
    region, endpoint, identity = _where_to(settings, env)

    counters = Counters()
    budget = buffer_budget(settings.buffer_memory_mb)
    # Twisted's own lines about accept() out of descriptors: throttled, and
    # the listeners pause instead of spinning (see observe/accept_errors).
    listeners: list[Any] = []
    if observer is not None:
        observer = AcceptErrorFilter(
            observer,
            reactor,
            on_accept_error=lambda: [service.pause_accepting() for service in listeners],
        )
    buffer = SegmentBuffer(budget.bytes, reactor, counters)
    daemon = XRayDaemon(observer=observer, reactor=reactor, handle_signals=handle_signals)
    notes: list[tuple[str, str]] = []

    # Credentials and the HTTP client: only needed when talking to X-Ray.
    if credentials is None:
        if local:
            credentials = StaticCredentials(None)
        else:
            service = CredentialsService(
                reactor, region=region, role_arn=settings.role_arn, env=env
            )
            # First child: the first lookup starts before any upload.
            service.setServiceParent(daemon)
            credentials = service
    if http_client is None and not local:
        try:
            http_client, pool = make_http(reactor, settings, env, settings.concurrency)
        except ProxyConfigError as e:
            raise StartupError(str(e)) from None
        daemon.cleanups.append(pool.closeCachedConnections)
        # Lookups that fail for want of descriptors end at once, not as
        # unhandled errors after the upload's timeout.
        resolver.install(reactor)
        notes += [("info", line) for line in outbound_info(settings, env)]
        notes += [("warn", line) for line in outbound_warnings(settings, env)]

    # Where batches go: X-Ray, or a JSON Lines file.
    uploader = Uploader(
        client=http_client,
        endpoint=endpoint,
        region=region,
        credentials=credentials,
        clock=reactor,
        timeout=settings.request_timeout,
    )
    daemon.cleanups.append(uploader.close)  # after the drain and the last telemetry
    send: Any = uploader.put_trace_segments
    if local:
        try:
            sink = LocalSink(settings.local_sink, reactor)
        except LocalSinkError as e:
            raise StartupError(str(e)) from None
        daemon.cleanups.append(sink.close)
        send = sink.put_trace_segments
        notes.append(("info", f"Writing segments to {sink.path} (local sink: nothing is uploaded)"))
    spool = None
    if settings.spool_dir:
        try:
            spool = Spool.open(
                settings.spool_dir,
                settings.spool_max_mb * 1024 * 1024,
                reactor,
                counters,
                run_blocking=thread_pool_runner(reactor),  # fsync off the event loop
            )
        except SpoolError as e:
            raise StartupError(f"{e} (--spool-dir or Spool.Dir)") from None
        daemon.cleanups.append(spool.close)  # after the batcher: the rest is on disk

    batcher = Batcher(
        buffer,
        send,
        reactor,
        counters,
        concurrency=settings.concurrency,
        shutdown_timeout=settings.shutdown_timeout,
        spool=spool,
        spool_after=settings.spool_after,
        destination=("stdout" if sink.path == "-" else sink.path) if local else "",
    )
    ingest = Ingest(buffer, counters, reactor)
    bridge = None
    if otlp_address is not None:
        try:
            bridge = build_bridge(
                settings,
                reactor,
                segment_buffer=buffer,
                http_client=http_client,
                endpoint=endpoint,
                region=region,
                credentials=credentials,
                sink=sink if local else None,
            )
        except SpoolError as e:
            raise StartupError(f"{e} (--spool-dir or Spool.Dir)") from None
        if bridge.uploader is not None:
            daemon.cleanups.append(bridge.uploader.close)  # as for segments: after the drain
        if bridge.spool is not None:
            daemon.cleanups.append(bridge.spool.close)
        if local:
            notes.append((
                "info",
                f"Writing OpenTelemetry spans to {sink.path} as OTLP/JSON "
                "(local sink: nothing is uploaded)",
            ))  # fmt: skip
        else:
            notes.append(("info", f"Sending OpenTelemetry spans to {bridge.traces_url}"))
    drop_monitor = UdpDropMonitor(reactor, counters)

    # The TCP port's HTTP side: sampling (signed and proxied, or answered
    # locally), plus /health and /metrics, which are never proxied.
    health = HealthResource(
        show_identity=settings.monitoring_show_identity,
        state=HealthState(
            clock=reactor,
            counters=counters,
            buffer=buffer,
            waiting_docs=lambda: batcher.waiting_docs,
            oldest_waiting_since=batcher.oldest_waiting_since,
            credentials_refused=lambda: batcher.credentials_refused,
            last_upload_error=lambda: batcher.last_upload_error,
            otlp=(
                OtlpHealth(
                    counters=bridge.counters,
                    traces_url=bridge.traces_url,
                    buffer_used=lambda: bridge.buffer.used,
                    waiting=lambda: bridge.batcher.waiting_docs,
                    last_upload_error=lambda: bridge.batcher.last_upload_error,
                )
                if bridge is not None
                else None
            ),
            credentials_status=(
                (lambda: (True, "not needed (local sink)"))
                if local
                else credentials_status(credentials)
            ),
            endpoint_url=sink.path if local else endpoint.url,
            started_at=reactor.seconds(),
            unhealthy_after=settings.unhealthy_after,
        ),
    )

    def build_metrics() -> Resource:
        # Imported on the first scrape: see LazyResource.
        from xraytwisted.tcpport.metrics import MetricsResource, make_registry

        registry = make_registry(
            counters,
            buffer_used=lambda: buffer.used,
            buffer_capacity=buffer.capacity,
            waiting_docs=lambda: batcher.waiting_docs,
            kernel_drops=(lambda: counters.kernel_drops) if drop_monitor.available() else None,
            extra_info={"region": region, "mode": "local-sink" if local else "xray"},
        )
        if bridge is not None:
            from xraytwisted.tcpport.metrics import OtlpCollector

            registry.register(
                OtlpCollector(
                    bridge.counters,
                    buffer_used=lambda: bridge.buffer.used,
                    waiting_requests=lambda: bridge.batcher.waiting_docs,
                )
            )
        return MetricsResource(registry)

    metrics = LazyResource(build_metrics)
    max_body = settings.proxy_max_body_kb * 1024
    max_line = settings.stream_max_line_kb * 1024
    # Unfinished stream lines and request bodies: bounded in total too.
    hold = HeldBytes(settings.tcp_hold_kb * 1024 or default_hold(max_line, max_body), reactor)
    sampling: Resource
    overloaded = None
    if local:
        rules = _local_rules(settings)
        notes.append(("info", f"Answering sampling requests locally: {rules.source}"))
        sampling = LocalSamplingResource(reactor, counters, max_body=max_body, rules=rules)
    else:
        if settings.local_sampling_rules or settings.local_sampling_rate != 1:
            notes.append(
                (
                    "warn",
                    "--local-sampling-rate and --local-sampling-rules apply only "
                    "with --local-sink; sampling requests go to X-Ray and use its rules",
                )
            )
        sampling = proxy = SamplingProxy(
            client=http_client,
            endpoint=endpoint,
            region=region,
            credentials=credentials,
            clock=reactor,
            counters=counters,
            max_body=max_body,
            timeout=settings.proxy_timeout,
            max_concurrent=settings.proxy_max_concurrent,
            allow=parse_allow(settings.proxy_allow),
            allowed_hosts=settings.proxy_allowed_hosts.split(","),
        )
        overloaded = proxy.overloaded
    local_pages: dict[bytes, Resource] = {b"health": health, b"metrics": metrics}
    site = make_site(
        http_root(sampling, local_pages, counters),
        timeout=settings.proxy_client_timeout,
        max_body=max_body,
        counters=counters,
        reactor=reactor,
        request_deadline=settings.proxy_request_deadline,
        hold=hold,
        overloaded=overloaded,
    )
    max_connections, max_per_peer = _tcp_limits(settings, notes)
    stream = SniffingFactory(
        ingest,
        site,
        max_line,
        reactor,
        stream_idle=settings.stream_idle_timeout or None,
        max_connections=max_connections,
        max_per_peer=max_per_peer,
        hold=hold,
    )
    telemetry = TelemetryService(
        send=uploader.call,
        counters=counters,
        span_uploads=bridge.counters.requests if bridge is not None else None,
        clock=reactor,
        interval=0 if local else settings.telemetry_interval,
        hostname=identity.hostname,
        instance_id=identity.instance_id,
        resource_arn=settings.resource_arn,
    )

    # Bind last: nothing above can fail after a socket is open.
    opened: list[Any] = []
    try:
        opened.append(
            _bind(udp_address, "udp", "-b/--bind", "Socket.UDPAddress",
                  settings.udp_receive_buffer_kb * 1024)
        )  # fmt: skip
        opened.append(_bind(tcp_address, "tcp", "-t/--bind-tcp", "Socket.TCPAddress"))
        if monitoring_address is not None:
            opened.append(
                _bind(monitoring_address, "tcp", "--monitoring-address", "Monitoring.Address")
            )
        if otlp_address is not None:
            opened.append(_bind(otlp_address, "tcp", "--otlp-address", "Socket.OTLPAddress"))
    except StartupError:
        for sock in opened:
            sock.close()
        raise
    udp = UDPIngestService(
        reactor,
        opened[0],
        ingest,
        read_interval=settings.udp_read_interval_ms / 1000,
        asked_receive_buffer=settings.udp_receive_buffer_kb * 1024,
        adaptive=settings.udp_read_adaptive,
    )
    tcp = TCPPortService(reactor, opened[1], stream, endpoint_url="" if local else endpoint.url)
    listeners.append(tcp)
    drop_monitor.watch(lambda: [socket_inode(udp.port.socket.fileno())] if udp.port else [])
    udp.on_readable = drop_monitor.wake  # it sleeps while nothing comes

    # Stop order (XRayDaemon.stopService): ingest, then the batcher drain,
    # then the rest (telemetry sends its final record), then the cleanups.
    for child in (batcher, udp, tcp, drop_monitor, telemetry):
        child.setServiceParent(daemon)
    if monitoring_address is not None:
        # Bounded like the TCP port, with its own small cap: probes and
        # scrapers are few, and the descriptors left for clients are the
        # TCP port's.
        monitor_site = monitoring_site(
            health,
            metrics,
            timeout=settings.proxy_client_timeout,
            reactor=reactor,
            counters=counters,
            max_connections=min(max_connections, MONITORING_MAX_CONNECTIONS),
            max_per_peer=min(max_per_peer, MONITORING_MAX_PER_PEER),
        )
        monitor = SiteService(reactor, opened[2], monitor_site, "/health and /metrics")
        monitor.setServiceParent(daemon)
        listeners.append(monitor)
    daemon.ingest_services += [udp, tcp]
    daemon.drain_services.append(batcher)
    if bridge is not None:
        receiver = OtlpHTTPService(reactor, opened[-1], bridge.site)
        for part in (bridge.batcher, receiver):
            part.setServiceParent(daemon)
        daemon.ingest_services.append(receiver)
        daemon.drain_services.append(bridge.batcher)
    daemon.parts = daemon._banner_parts = Parts(
        settings=settings,
        counters=counters,
        budget=budget,
        buffer=buffer,
        batcher=batcher,
        uploader=uploader,
        ingest=ingest,
        udp=udp,
        tcp=tcp,
        endpoint=endpoint,
        region=region,
        credentials=credentials,
        identity=identity,
        spool=spool,
        otlp=bridge,
        notes=notes,
    )
    return daemon


def _otlp_address(settings: Settings) -> addresses.Address | None:
    """Where the OTLP/HTTP receiver listens (None: off, the default)."""
    if not settings.otlp_address:
        return None
    try:
        address = addresses.parse_address(settings.otlp_address, "tcp")
    except addresses.AddressError as e:
        raise StartupError(str(e)) from None
    if settings.local_sink:
        # The sink writes spans as OTLP/JSON, decoded with opentelemetry-proto
        # (imported only here, and only in this mode).
        try:
            otlp_json.require()
        except otlp_json.OtlpUnavailable as e:
            raise StartupError(
                f"--otlp-address (Socket.OTLPAddress) with --local-sink writes spans as "
                f"OTLP/JSON; {e}"
            ) from None
    return address
