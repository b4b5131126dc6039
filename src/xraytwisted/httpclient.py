"""The outbound HTTP client: treq over a persistent connection pool."""

from __future__ import annotations

from typing import Any

import treq.client
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)

# Idle connections are dropped well before load balancers typically close
# them (60 s), so a request never lands on a connection the server is about
# to tear down (cf. the Go daemon's stuck-connection issue, PR #216).
IDLE_CONNECTION_SECONDS = 50


class _QuietFactory(_HTTP11ClientFactory):
    # Twisted logs "Starting factory ..." for every new connection otherwise.
    noisy = False


def make_pool(reactor: Any, per_host: int) -> HTTPConnectionPool:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietFactory
    pool.maxPersistentPerHost = per_host
    pool.cachedConnectionTimeout = IDLE_CONNECTION_SECONDS
    # POST is not idempotent, so Twisted would not retry it anyway; the
    # batcher decides about retries.
    pool.retryAutomatically = False
    return pool


def make_client(reactor: Any, pool: HTTPConnectionPool) -> treq.client.HTTPClient:
    agent = Agent(reactor, contextFactory=BrowserLikePolicyForHTTPS(), pool=pool)
    return treq.client.HTTPClient(agent)
