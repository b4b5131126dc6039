"""The TCP port's real web stack in front of a ``SamplingProxy``, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import IResource

from xraytwisted.ingest.core import Ingest
from xraytwisted.listen.bind import bind_tcp
from xraytwisted.observe.counters import Counters
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.settings.addresses import Address
from xraytwisted.tcpport.sampling_proxy import SamplingProxy
from xraytwisted.tcpport.site import http_root, make_site
from xraytwisted.tcpport.sniffing import SniffingFactory, TCPPortService


def serve_sampling_proxy(
    case: TestCase,
    proxy: SamplingProxy,
    counters: Counters,
    *,
    resources: Mapping[bytes, IResource] | None = None,
    timeout: float = 5.0,
    max_body: int = 1024 * 1024,
) -> int:
    """Sniffer, bounded Site and root as the daemon wires them; the port (stopped on cleanup)."""
    site = make_site(
        http_root(proxy, resources or {}, counters),
        timeout=timeout,
        max_body=max_body,
        counters=counters,
        reactor=reactor,
        overloaded=proxy.overloaded,
    )
    ingest = Ingest(SegmentBuffer(1_000_000, reactor, counters), counters, reactor)
    service = TCPPortService(
        reactor,
        bind_tcp(Address("127.0.0.1", 0)),
        SniffingFactory(ingest, site, 64 * 1024, reactor),
        stop_grace=0.2,
    )
    service.startService()
    case.addCleanup(service.stopService)
    port: int = service.address.port
    return port
