"""A quiet twisted.web Site whose connections and requests are bounded.

Both HTTP listeners use it: the TCP port's web side (the sampling proxy,
/health, /metrics; also the monitoring site) and the OTLP/HTTP receiver.
``Limits`` says what is bounded:

* connections: at most ``max_connections`` open at once and
  ``max_per_peer`` from one address (counted by ``OpenConnections``, as
  the TCP port's sniffer counts its own); more are closed as soon as they
  are accepted;
* time: an idle connection is closed after ``idle_timeout`` (at debug:
  SDKs keep connections open between requests, twisted.web would log each
  at info); from a request's first byte the client has ``deadline``
  seconds to send all of it, headers and body (the idle timeout restarts
  on every byte, so a client trickling a header line at a time would never
  be cut), then 408.  The deadline does not run while a request is being
  answered, nor between requests (the idle timeout covers that);
* bodies, as soon as the headers are in: a Content-Length over
  ``max_body`` is 413; a body while ``overloaded()`` is true, or one whose
  Content-Length does not fit in ``hold``, is 503 before it is read.  As
  the body arrives (chunked bodies have no length to judge by) it is
  counted against ``max_body`` and charged to ``hold`` (``HeldBytes``,
  shared with the listener's other connections) until the request is
  answered or its connection is gone; a chunk that does not fit is 503.
  Bodies stay in memory (no temporary files: a read-only container file
  system has nowhere to put them).

After such an early answer the rest of the request is read and dropped, up
to ``linger_bytes(limits)`` more bytes (``LINGER_BYTES``, or twice
``max_body`` if that is more: a client refused for a body a little over
the limit is sending all of it) and ``LINGER_SECONDS``, before the
connection is closed: closing on unread data makes the kernel reset the
connection, and the client would see a broken pipe instead of the answer
(and retry, sending the whole body again).  A body announced as larger
than that is not waited for.  A 408 closes at once (that client had its
deadline).  A closed connection whose client reads nothing is aborted
after the channel's ``abortTimeout``; ``close_connections`` (a listener
stopping) gives them ``grace`` seconds, and ``stop_now`` none.

What a refusal looks like (status line, body format, Retry-After, which
counter, which log line) is the listener's: its ``Refusals``.  Only public
twisted.web hooks are used.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from xraytwisted.listen.connections import OpenConnections, WhenGone
from xraytwisted.listen.held import HeldBytes

# After an early refusal, bytes of the refused request read and dropped (and
# seconds waited for them) so the client can finish sending and read the answer.
LINGER_BYTES = 4 * 1024 * 1024
LINGER_SECONDS = 5.0
# Reason phrases of the early answers (twisted.web's 408 is "Request Time-out").
REASONS = {408: b"Request Timeout", 413: b"Request Entity Too Large", 503: b"Service Unavailable"}


class Limit(enum.Enum):
    """The limit a connection or request ran into."""

    CONNECTIONS = "connections"  # max_connections are open: closed at once
    PEER_CONNECTIONS = "peer_connections"  # max_per_peer from that address: closed at once
    DEADLINE = "deadline"  # 408: the request was not all in within the deadline
    TOO_LARGE = "too_large"  # 413: the body is over max_body
    OVERLOADED = "overloaded"  # 503: overloaded() when a body was announced
    HOLD_FULL = "hold_full"  # 503: the body does not fit in hold


@dataclass(frozen=True)
class Limits:
    """What a ``BoundedSite`` bounds; None: no limit."""

    idle_timeout: float  # seconds a connection may stay idle
    deadline: float | None = None  # seconds to send a whole request, from its first byte
    max_body: int | None = None  # bytes of request body
    max_connections: int | None = None  # open at once
    max_per_peer: int | None = None  # open at once from one address
    hold: HeldBytes | None = None  # bodies still arriving, all connections together
    overloaded: Callable[[], bool] | None = None  # asked when a body is announced


class Refusals(Protocol):
    """How a listener refuses: counts, logs (throttled) and words its answers."""

    def refuse(
        self, site: BoundedSite, limit: Limit, peer: IAddress | None, request: Request | None
    ) -> bytes:
        """Count and log one refusal; returns the whole answer to write (b"": none).

        ``peer`` is the client's address (None: not known; ``format_address``
        words it as most listeners do).  ``request`` is the one refused: None for
        the connection limits (whose answer is not sent: the connection is
        closed at once) and for a deadline that passed before a request
        line was in.  Called before the request's held bytes are released.
        """
        ...


def linger_bytes(limits: Limits) -> int:
    """Bytes read and dropped after an early refusal, counted from the refusal.

    At least twice the body limit: a client refused for going over it is
    sending a body about that large, and must get to read the answer.
    """
    if limits.max_body is None:
        return LINGER_BYTES
    return max(LINGER_BYTES, 2 * limits.max_body)


def format_address(address: object) -> str:
    """``host:port`` of a peer address ("?" for None, its repr if it has neither)."""
    if address is None:
        return "?"
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    return f"{host}:{port}" if host is not None and port is not None else str(address)


def raw_response(status: int, content_type: bytes, body: bytes, *headers: bytes) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection.

    For answers given before twisted.web has set a request up (it does so
    only once the body is in), when ``Request.write`` cannot be used yet.
    ``headers`` are whole header lines without their CRLF.
    """
    reason = REASONS.get(status) or http.RESPONSES.get(status, b"Error")
    head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n" % (status, reason, content_type)
    head += b"".join(line + b"\r\n" for line in headers)
    head += b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    return head + body


class BoundedChannel(http.HTTPChannel):
    """An HTTPChannel with a deadline per request and a lingering close."""

    log = Logger()
    site: BoundedSite  # set by Site.buildProtocol
    _deadline: IDelayedCall | None = None
    _abort: IDelayedCall | None = None
    _answering = False  # between a request's last byte and its answer's end
    _lingering = False
    _gone = False

    def __init__(self) -> None:
        super().__init__()
        self._lost = WhenGone()  # when_lost's, fired by connectionLost

    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer() if self.transport is not None else None
        self.site.channels.opened(self, str(getattr(peer, "host", peer)))

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is None and not (self._answering or self._lingering) and data:
            seconds = self.site.limits.deadline
            if seconds:
                self._deadline = self.callLater(seconds, self._deadline_passed)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        if not self._lingering:
            self._cancel(self._deadline)
            self._deadline = None
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: http.Request) -> None:
        # Pipelined bytes read meanwhile are handed back to dataReceived from
        # here, which starts the next request's deadline.
        self._answering = False
        super().requestDone(request)

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self._lingering or self.transport is None:
            return
        request = self.requests[-1] if self.requests else None
        assert request is None or isinstance(request, Request)
        site = self.site
        answer = site.refusals.refuse(site, Limit.DEADLINE, self.transport.getPeer(), request)
        if isinstance(request, BoundedRequest):
            request.drop()  # its bytes go back to the hold now, not at connectionLost
        if answer:
            self.transport.write(answer)
        # No linger: that client had its deadline to send the request.
        self.linger(0)

    def linger(self, limit: int) -> None:
        """An answer ending the request was written: drop up to ``limit`` more bytes, then close."""
        if self._lingering:
            return
        self._lingering = True
        self._cancel(self._deadline)
        self._deadline = None
        self.setTimeout(None)
        if limit <= 0 or self.transport is None:
            self.end_linger()
            return
        # The answer is complete: let the client see its end now.
        half_close = getattr(self.transport, "loseWriteConnection", None)
        if half_close is not None:
            half_close()
        self._deadline = self.callLater(LINGER_SECONDS, self.end_linger)

    def end_linger(self) -> None:
        self._cancel(self._deadline)
        self._deadline = None
        self._close_soon()

    def _close_soon(self) -> None:
        self._lose()
        # (A half-closed connection may be gone already.)
        if self._abort is None and not self._gone:
            # A client that reads nothing cannot keep the descriptor.
            self._abort = self.callLater(self.abortTimeout or 15, self._abort_now)

    def close(self, grace: float) -> None:
        """Close (the listener stops): aborted if not gone within ``grace`` seconds."""
        if self._gone or self.transport is None:
            return
        self.setTimeout(None)
        self._lose()
        if self._gone:  # (a half-closed connection is lost at once)
            return
        self._cancel(self._abort)  # (a stop_now during a graceful close)
        if grace <= 0:
            self._abort_now()
            return
        self._abort = self.callLater(grace, self._abort_now)

    def _lose(self) -> None:
        # Once: HTTPChannel.loseConnection unregisters the channel from its
        # transport, which a second time refuses.
        transport = self.transport
        if transport is not None and not getattr(transport, "disconnecting", False):
            self.loseConnection()

    def _abort_now(self) -> None:
        self._abort = None
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def timeoutConnection(self) -> None:
        # What HTTPChannel.timeoutConnection does, logged at debug.
        peer = str(self.transport.getPeer()) if self.transport is not None else "?"
        self.log.debug("Timing out client: {peer}", peer=peer)
        self._close_soon()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._gone = True
        for call in (self._deadline, self._abort):
            self._cancel(call)
        self._deadline = self._abort = None
        super().connectionLost(reason)
        self.site.channels.closed(self)
        self._lost.gone()

    def when_lost(self) -> Deferred[None]:
        """Fires once this (open) connection is gone."""
        return self._lost.wait()

    @staticmethod
    def _cancel(call: IDelayedCall | None) -> None:
        if call is not None and call.active():
            call.cancel()


class BoundedRequest(Request):
    """A Request whose body is bounded by its site's limits as it arrives."""

    _refused = False
    _body_bytes = 0
    _refused_at = 0  # _body_bytes when refused: the linger counts from there
    _held = 0
    _declared: int | None = None

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # Kept: finishing a request forgets its channel, and with it the site.
        site = getattr(channel, "site", None)
        assert isinstance(site, BoundedSite), "BoundedRequest is BoundedSite's request factory"
        self.bounded_site = site

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()
        self._declared = length
        limits = self.bounded_site.limits
        if length is not None and limits.max_body is not None and length > limits.max_body:
            self._refuse(Limit.TOO_LARGE)
        elif length != 0 and limits.overloaded is not None and limits.overloaded():
            self._refuse(Limit.OVERLOADED)
        elif length and limits.hold is not None and not limits.hold.fits(length):
            self._refuse(Limit.HOLD_FULL)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        if self._refused:
            if self._body_bytes - self._refused_at > linger_bytes(self.bounded_site.limits):
                self._end_linger()
            return
        limits = self.bounded_site.limits
        if limits.max_body is not None and self._body_bytes > limits.max_body:
            self._refuse(Limit.TOO_LARGE)
            return
        hold = limits.hold
        if hold is not None:
            if not hold.fits(len(data)):
                self._refuse(Limit.HOLD_FULL)
                return
            hold.charge(len(data))
            self._held += len(data)
        content = self.content
        assert content is not None  # set by gotLength
        content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            self._end_linger()  # the whole body has been read: close now
            return
        super().requestReceived(command, path, version)

    def finish(self) -> None:
        self._release()  # answered: the body is the resource's business now
        super().finish()

    def connectionLost(self, reason: Failure) -> None:
        self._release()
        super().connectionLost(reason)

    def drop(self) -> None:
        """Refused (by the channel's deadline): give the held bytes back, ignore the rest."""
        self._refused = True
        self._refused_at = self._body_bytes
        self._release()
        self.content = BytesIO()

    def keep_held_until(self, done: Deferred[Any]) -> None:
        """Keep the body charged to the hold until ``done`` fires, not just until answered.

        For a body still being worked on (decompressed in a thread) when its
        connection may be gone: it is in memory until the work ends.
        """
        held, self._held = self._held, 0
        hold = self.bounded_site.limits.hold
        if held and hold is not None:

            def release(result: object) -> object:
                hold.release(held)
                return result

            done.addBoth(release)

    def _release(self) -> None:
        held, self._held = self._held, 0
        hold = self.bounded_site.limits.hold
        if held and hold is not None:
            hold.release(held)

    def _refuse(self, limit: Limit) -> None:
        site = self.bounded_site
        channel = self.channel
        assert isinstance(channel, BoundedChannel)
        transport = channel.transport
        peer = transport.getPeer() if transport is not None else None
        answer = site.refusals.refuse(site, limit, peer, self)
        self.drop()  # what arrived is dropped
        # The channel would otherwise invite the body with "100 Continue"
        # right after this answer.
        self.requestHeaders.removeHeader(b"expect")
        if transport is not None and answer:
            transport.write(answer)
        # Read what the client is still sending (if it is not too much), so
        # that it gets to see the answer.
        left = allowance = linger_bytes(site.limits)
        if self._declared is not None:
            left = self._declared - self._body_bytes
            if left > allowance:
                left = 0  # not worth waiting for: closed at once
        channel.linger(left)

    def _end_linger(self) -> None:
        channel = self.channel
        if isinstance(channel, BoundedChannel):
            channel.end_linger()


class BoundedSite(Site):
    """A Site within ``limits``, refusing as ``refusals`` says; no access log."""

    noisy = False  # no "Starting factory" lines
    displayTracebacks = False
    protocol = BoundedChannel  # type: ignore[assignment]
    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: IResource,
        limits: Limits,
        refusals: Refusals,
        *,
        reactor: IReactorTime | None = None,
    ) -> None:
        super().__init__(resource, timeout=limits.idle_timeout, reactor=reactor)
        self.limits = limits
        self.refusals = refusals
        self.channels = OpenConnections[BoundedChannel](limits.max_connections, limits.max_per_peer)
        self._stopping_now = False

    @property
    def per_peer(self) -> dict[str, int]:
        return self.channels.per_peer

    def buildProtocol(self, addr: Any) -> Any:
        over = self.channels.over(str(getattr(addr, "host", addr)))
        if over is not None:
            limit = Limit.CONNECTIONS if over[0] == "total" else Limit.PEER_CONNECTIONS
            self.refusals.refuse(self, limit, addr, None)
            return None  # the reactor closes the new connection
        return super().buildProtocol(addr)

    def close_connections(self, grace: float) -> Deferred[Any]:
        """Close every connection; fires once all are gone (within ~``grace`` s).

        A client that does not read its answer would otherwise hold the
        listener's stop (and what waits for it) for the idle timeout and
        the abort timeout.
        """
        channels = list(self.channels)
        waits = [channel.when_lost() for channel in channels]
        for channel in channels:
            channel.close(0.0 if self._stopping_now else grace)
        return DeferredList(waits, consumeErrors=True)

    def stop_now(self) -> None:
        """Abort every connection, now or as soon as ``close_connections`` is called.

        A second shutdown signal: the grace would only delay the (also cut) drain.
        """
        self._stopping_now = True
        for channel in list(self.channels):
            channel.close(0.0)

    def startFactory(self) -> None:
        # HTTPFactory.startFactory starts a 1 s timer that keeps the access
        # log's date fresh and opens the log file; this Site writes no access
        # log (see log), so the timer would only wake an idle daemon every
        # second.
        pass

    def log(self, request: http.Request) -> None:
        pass  # no access log: one line per request would flood it
