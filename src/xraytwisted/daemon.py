"""The daemon: settings in, a running MultiService out.

``build`` wires the data path - ingest (UDP) -> buffer -> batcher ->
uploader -> X-Ray - into one ``XRayDaemon`` service.  Anything that can be
wrong with the settings or the machine (bad address, port in use, no
region) raises ``StartupError`` here, before twistd logs or daemonizes, so
it ends the start with one clear line.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.logger import ILogObserver, Logger, LogLevel
from twisted.python.components import Componentized

from xraytwisted import __version__, endpoints, metadata, sockets
from xraytwisted import region as regions
from xraytwisted.batcher import Batcher
from xraytwisted.buffer import SegmentBuffer
from xraytwisted.config import Settings
from xraytwisted.credentials import CredentialsService
from xraytwisted.httpclient import make_http, outbound_info, outbound_warnings
from xraytwisted.ingest import Ingest
from xraytwisted.ingest.udp import UDPIngestService
from xraytwisted.kernel import UdpDropMonitor, socket_inode
from xraytwisted.memory import Budget, buffer_budget
from xraytwisted.proxyconfig import ProxyConfigError
from xraytwisted.region import NO_REGION
from xraytwisted.spool import Spool, SpoolError
from xraytwisted.stats import Counters
from xraytwisted.uploader import CredentialSource, Uploader

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
    endpoint: endpoints.Endpoint
    region: str
    credentials: CredentialSource
    identity: metadata.Identity
    spool: Spool | None = None
    # (level, text) lines for the startup banner, e.g. the outbound proxy in use.
    notes: list[tuple[str, str]] = field(default_factory=list)


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
        super().privilegedStartService()

    def startService(self) -> None:
        self._banner()
        super().startService()
        if self._handle_signals:
            # Now, so a signal between here and reactor.run() still drains
            # (Python's default would kill the process, leaving the pidfile),
            # and again once the reactor has installed its own handlers.
            self._install_signal_handlers()
            self._reactor.callWhenRunning(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        # twistd's handlers make the process end *by* the signal (status
        # -15); the Go daemon drains and exits 0, and supervisors expect that.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._stopping_on_signal:
            return  # as the Go daemon: later signals do not cut the drain short
        self._stopping_on_signal = True
        name = "interrupt" if signum == signal.SIGINT else "terminated"
        self._reactor.callFromThread(self._stop_on_signal, name)

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
            self.log.info("Using region: {region}", region=parts.region)
            self.log.debug("Using Endpoint: {url}", url=parts.endpoint.url)
            self.log.debug("Batch size: {size}", size=parts.buffer.batch_size)
            for level, note in parts.notes:
                self.log.emit(LogLevel.levelWithName(level), "{note}", note=note)
            self.log.info(
                "Effective configuration: {summary}", summary=summarize(s, parts.endpoint.url)
            )

    def stopService(self) -> Deferred[None]:
        # MultiService would stop every child at once; the order matters here:
        # stop taking data in, then send what was accepted, then clean up.
        Service.stopService(self)
        others = [s for s in self if s not in self.ingest_services and s not in self.drain_services]

        def stop_all(services: list[IService]) -> Deferred[Any]:
            return DeferredList(
                [maybeDeferred(s.stopService) for s in reversed(services)], consumeErrors=True
            )

        def run_cleanups(_: object) -> Deferred[Any]:
            return DeferredList([maybeDeferred(c) for c in self.cleanups], consumeErrors=True)

        d = stop_all(self.ingest_services)
        d.addCallback(lambda _: stop_all(self.drain_services))
        d.addCallback(lambda _: stop_all(others))
        d.addCallback(run_cleanups)
        return d.addCallback(lambda _: None)


def summarize(s: Settings, endpoint: str) -> str:
    """One line of the settings that matter, secrets masked."""
    proxy = _mask_url_password(s.proxy_address) if s.proxy_address else "none"
    fields = [
        f"udp={s.udp_address}",
        f"endpoint={endpoint}",
        f"region={s.region or '(auto)'}",
        f"concurrency={s.concurrency}",
        f"buffer-memory={s.buffer_memory_mb or 'auto'}",
        f"local-mode={str(s.local_mode).lower()}",
        f"role-arn={s.role_arn or 'none'}",
        f"proxy={proxy}",
        f"no-verify-ssl={str(s.no_verify_ssl).lower()}",
        f"log-level={s.log_level}",
        f"request-timeout={s.request_timeout:g}s",
        f"shutdown-timeout={s.shutdown_timeout:g}s",
        f"config={s.config_path or 'none'}",
    ]
    return " ".join(fields)


def _mask_url_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"


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
    reactor runs.
    """
    env = os.environ if env is None else env
    log = XRayDaemon.log
    meta = metadata.MetadataClient(env)
    try:
        region, source = regions.resolve_region(settings, env, meta)
        endpoint = endpoints.resolve(region, configured=settings.endpoint, env=dict(env))
        udp_address = sockets.parse_address(settings.udp_address)
    except regions.RegionError as e:
        raise StartupError(str(e)) from None
    except (sockets.AddressError, endpoints.EndpointError) as e:
        raise StartupError(str(e)) from None
    log.debug("Fetch region {region} from {source}", region=region, source=source)
    identity = metadata.identity(settings, env, meta)

    counters = Counters()
    budget = buffer_budget(settings.buffer_memory_mb)
    buffer = SegmentBuffer(budget.bytes, reactor, counters)
    notes: list[tuple[str, str]] = []

    daemon = XRayDaemon(observer=observer, reactor=reactor, handle_signals=handle_signals)
    if credentials is None:
        service = CredentialsService(reactor, region=region, role_arn=settings.role_arn, env=env)
        # A child before the batcher: the first lookup starts before any upload.
        service.setServiceParent(daemon)
        credentials = service
    if http_client is None:
        try:
            http_client, pool = make_http(reactor, settings, env, settings.concurrency)
        except ProxyConfigError as e:
            raise StartupError(str(e)) from None
        daemon.cleanups.append(pool.closeCachedConnections)
        notes += [("info", line) for line in outbound_info(settings, env)]
        notes += [("warn", line) for line in outbound_warnings(settings, env)]
    spool = None
    if settings.spool_dir:
        try:
            spool = Spool.open(
                settings.spool_dir, settings.spool_max_mb * 1024 * 1024, reactor, counters
            )
        except SpoolError as e:
            raise StartupError(f"{e} (--spool-dir or Spool.Dir)") from None
        # After the batcher has stopped: what it could not send is on disk.
        daemon.cleanups.append(spool.close)
    uploader = Uploader(
        client=http_client,
        endpoint=endpoint,
        region=region,
        credentials=credentials,
        clock=reactor,
        timeout=settings.request_timeout,
    )
    batcher = Batcher(
        buffer,
        uploader.put_trace_segments,
        reactor,
        counters,
        concurrency=settings.concurrency,
        shutdown_timeout=settings.shutdown_timeout,
        spool=spool,
        spool_after=settings.spool_after,
    )
    ingest = Ingest(buffer, counters, reactor)

    # Bind last: nothing above can fail after a socket is open.
    try:
        udp_socket = sockets.bind_udp(udp_address, settings.udp_receive_buffer_kb * 1024)
    except sockets.AddressError as e:
        raise StartupError(
            f"{e} (set the UDP address with -b/--bind or Socket.UDPAddress)"
        ) from None
    udp = UDPIngestService(reactor, udp_socket, ingest)

    def udp_inodes() -> list[int]:
        return [socket_inode(udp.port.socket.fileno())] if udp.port is not None else []

    batcher.setServiceParent(daemon)
    udp.setServiceParent(daemon)
    UdpDropMonitor(reactor, counters, inodes=udp_inodes).setServiceParent(daemon)
    daemon.drain_services.append(batcher)
    daemon.ingest_services.append(udp)
    daemon.parts = daemon._banner_parts = Parts(
        settings=settings,
        counters=counters,
        budget=budget,
        buffer=buffer,
        batcher=batcher,
        uploader=uploader,
        ingest=ingest,
        udp=udp,
        endpoint=endpoint,
        region=region,
        credentials=credentials,
        identity=identity,
        spool=spool,
        notes=notes,
    )
    return daemon
