"""Wiring of the OTLP bridge: OTLP/HTTP in, X-Ray's OTLP endpoint out.

``build_bridge`` makes the span side of the daemon from the same parts as
the segment side: the receiver (``ingest/otlp_http``) offers framed OTLP
requests to a ``SpanBuffer`` that borrows its memory from the segment
buffer, a ``SpanBatcher`` (the ordinary batcher) sends them through
``OtlpUploader`` to ``<endpoint>/v1/traces`` with the same retries,
backoff, throttling, spool and shutdown drain, and spans waiting for X-Ray
go to their own spool, ``<Spool.Dir>/otlp``, whose records replay to the
OTLP endpoint only.  With ``--local-sink`` the same chain ends in
``LocalSpanSink`` instead of the uploader: the requests are written to the
segments' sink file as OTLP/JSON lines.  ``daemon.build`` binds the socket
and adds the services.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorThreads

from xraytwisted.aws.endpoints import Endpoint
from xraytwisted.ingest.otlp_http import OtlpTracesResource, otlp_site
from xraytwisted.listen.bounded_site import BoundedSite
from xraytwisted.listen.held import HeldBytes
from xraytwisted.observe.counters import OtlpCounters
from xraytwisted.pipeline.buffer import SegmentBuffer
from xraytwisted.pipeline.local_sink import LocalSink, LocalSpanSink
from xraytwisted.pipeline.offload import thread_pool_runner
from xraytwisted.pipeline.otlp_batches import SpanBatcher, SpanBuffer, SpanSpool, SpanTally
from xraytwisted.pipeline.otlp_upload import TRACES_PATH, OtlpUploader
from xraytwisted.pipeline.spool import Spool
from xraytwisted.pipeline.uploader import CredentialSource
from xraytwisted.settings.table import Settings

SPOOL_SUBDIR = "otlp"


@dataclass
class OtlpBridge:
    counters: OtlpCounters
    buffer: SpanBuffer
    batcher: SpanBatcher
    uploader: OtlpUploader | None  # None with a local sink
    site: BoundedSite
    spool: Spool | None
    traces_url: str  # where spans go: X-Ray's OTLP URL, or the local sink's path


def build_bridge(
    settings: Settings,
    reactor: Any,
    *,
    segment_buffer: SegmentBuffer,
    http_client: Any,
    endpoint: Endpoint,
    region: str,
    credentials: CredentialSource,
    sink: LocalSink | None = None,
) -> OtlpBridge:
    """The span pipeline and the receiver's Site; raises SpoolError for a bad spool.

    With ``sink`` (``--local-sink``) spans are written there instead of uploaded.
    """
    counters = OtlpCounters()
    # Large bodies are gzipped and inflated in the reactor's thread pool (a
    # task.Clock standing in for the reactor has none: all inline then).
    run_in_thread = thread_pool_runner(reactor) if IReactorThreads.providedBy(reactor) else None
    # Spans spooled, replayed and lost, where the batcher and spool count requests.
    tally = SpanTally(counters)
    buffer = SpanBuffer(segment_buffer, reactor, counters.requests)
    uploader = None
    if sink is None:
        uploader = OtlpUploader(
            client=http_client,
            endpoint=endpoint,
            region=region,
            credentials=credentials,
            clock=reactor,
            timeout=settings.request_timeout,
            counters=counters,
            gzip=settings.otlp_gzip,
            run_in_thread=run_in_thread,
        )
        send = uploader.send
        destination = ""
        traces_url = endpoint.url_for(TRACES_PATH)
    else:
        send = LocalSpanSink(sink, reactor, counters).send
        destination = traces_url = "stdout" if sink.path == "-" else sink.path
    spool = None
    if settings.spool_dir:
        spool = SpanSpool.open(
            os.path.join(settings.spool_dir, SPOOL_SUBDIR),
            settings.spool_max_mb * 1024 * 1024,
            reactor,
            counters.requests,
            tally=tally,
        )
    batcher = SpanBatcher(
        buffer,
        send,
        reactor,
        counters.requests,
        concurrency=settings.concurrency,
        shutdown_timeout=settings.shutdown_timeout,
        spool=spool,
        spool_after=settings.spool_after,
        destination=destination,
        tally=tally,
    )
    site = otlp_site(
        OtlpTracesResource(buffer, counters, reactor, run_in_thread=run_in_thread),
        clock=reactor,
        idle_timeout=settings.proxy_client_timeout,
        deadline=settings.otlp_request_deadline,
        max_connections=settings.otlp_max_connections,
        hold=HeldBytes(settings.otlp_hold_mb * 1024 * 1024, reactor),
    )
    return OtlpBridge(
        counters=counters,
        buffer=buffer,
        batcher=batcher,
        uploader=uploader,
        site=site,
        spool=spool,
        traces_url=traces_url,
    )
