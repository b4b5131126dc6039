"""A client endpoint that tunnels through an HTTP proxy with ``CONNECT``.

``HTTPConnectProxyEndpoint`` connects to the proxy, asks it for a tunnel
(``CONNECT host:port HTTP/1.1``, with ``Proxy-Authorization`` when the proxy
URL has credentials), waits for a 2xx answer and then hands the raw tunnel
to the protocol it was asked to connect.  It knows nothing about TLS: wrap
it with ``twisted.internet.endpoints.wrapClientTLS`` to speak TLS to the
host at the far end (what ``httpclient`` does for https URLs).

Failures of the attempt:

* the proxy cannot be reached: the proxy endpoint's own error
  (``ConnectionRefusedError``, ``DNSLookupError``, ``TimeoutError``);
* the proxy answers non-2xx, garbage, or closes the connection:
  ``ProxyConnectError``, whose message names the target and quotes the
  proxy's status line;
* no answer within ``timeout`` seconds: ``twisted.internet.error.TimeoutError``;
* ``cancel()`` on the Deferred: ``CancelledError`` (the proxy connection is
  aborted, or its connection attempt cancelled).
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

# A CONNECT answer is a status line and a few headers; anything longer
# without the blank line is not an HTTP proxy talking.
MAX_ANSWER_BYTES = 64 * 1024
DEFAULT_TIMEOUT = 30.0

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_FORBIDDEN_IN_HEADER = re.compile(r"[\x00-\x20\x7f]")


class ProxyConnectError(error.ConnectError):
    """The proxy did not open the tunnel; str() says why, quoting the proxy."""

    def __init__(self, message: str) -> None:
        super().__init__(string=message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def connect_target(host: str, port: int) -> str:
    """``host:port`` as written in a CONNECT request (IPv6 in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _quote(data: bytes) -> str:
    text = data.decode("latin-1")
    return text if text.isprintable() else repr(data)[2:-1]


@implementer(IStreamClientEndpoint)
class HTTPConnectProxyEndpoint:
    """Connects to ``host:port`` through the HTTP proxy at ``proxy_endpoint``."""

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        host: str,
        port: int,
        *,
        clock: IReactorTime,
        proxy_authorization: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if not host or _FORBIDDEN_IN_HEADER.search(host) or not 0 < port < 65536:
            raise ValueError(f"cannot CONNECT to {host!r} port {port}")
        if proxy_authorization is not None and re.search(r"[\r\n]", proxy_authorization):
            raise ValueError("the Proxy-Authorization value contains a line break")
        self._proxy = proxy_endpoint
        self.target = connect_target(host, port)
        self._clock = clock
        self._timeout = timeout
        # Non-ASCII names go out in their IDNA (punycode) form, as in DNS.
        authority = connect_target(host if host.isascii() else host.encode("idna").decode(), port)
        authority_bytes = authority.encode("ascii")
        lines = [b"CONNECT " + authority_bytes + b" HTTP/1.1", b"Host: " + authority_bytes]
        if proxy_authorization is not None:
            lines.append(b"Proxy-Authorization: " + proxy_authorization.encode("latin-1"))
        self._request = b"\r\n".join(lines) + b"\r\n\r\n"

    def __repr__(self) -> str:
        return f"<HTTPConnectProxyEndpoint {self.target} via {self._proxy!r}>"

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        tunnel = _TunnelProtocol(
            self._request, self.target, protocolFactory, self._clock, self._timeout
        )
        connecting = self._proxy.connect(_TunnelFactory(tunnel, protocolFactory))
        # Cancelling the returned Deferred while it waits for ``established``
        # cancels ``established`` (Deferred chaining), which aborts the tunnel.
        connecting.addCallback(lambda _: tunnel.established)
        return connecting


class _TunnelFactory(Factory):
    """Gives the proxy endpoint our one tunnel protocol."""

    noisy = False

    def __init__(self, tunnel: _TunnelProtocol, wrapped: IProtocolFactory) -> None:
        self._tunnel = tunnel
        self._wrapped = wrapped

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        return self._tunnel

    # The wrapped factory's protocol lives on this connection, so it is
    # started and stopped with it.
    def doStart(self) -> None:
        self._wrapped.doStart()

    def doStop(self) -> None:
        self._wrapped.doStop()


class _TunnelProtocol(Protocol):
    """Sends CONNECT, reads the answer, then relays the connection to the real protocol."""

    def __init__(
        self,
        request: bytes,
        target: str,
        factory: IProtocolFactory,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._request = request
        self._target = target
        self._factory = factory
        self._clock = clock
        self._timeout = timeout
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._wrapped: IProtocol | None = None
        self.established: Deferred[IProtocol] = Deferred(self._cancel)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request)
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._wrapped is not None:
            self._wrapped.dataReceived(data)
            return
        if self.established.called:
            return  # failed or cancelled; the connection is being aborted
        self._buffer += data
        end = _HEADER_END.search(self._buffer)
        if end is None:
            if len(self._buffer) > MAX_ANSWER_BYTES:
                self._fail(
                    ProxyConnectError(
                        f"proxy sent no complete answer to CONNECT {self._target} "
                        f"in {MAX_ANSWER_BYTES} bytes; is it an HTTP proxy?"
                    )
                )
            return
        head, rest = self._buffer[: end.start()], self._buffer[end.end() :]
        self._buffer = b""
        status_line = head.split(b"\n", 1)[0].rstrip(b"\r")
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            self._fail(
                ProxyConnectError(
                    f"proxy sent an invalid answer to CONNECT {self._target}: "
                    f"{_quote(status_line[:200])!r}; is it an HTTP proxy?"
                )
            )
        elif not match.group(1).startswith(b"2"):
            self._fail(
                ProxyConnectError(
                    f"proxy refused CONNECT to {self._target}: {_quote(status_line[:200])}"
                )
            )
        else:
            self._open(rest)

    def _open(self, rest: bytes) -> None:
        assert self.transport is not None
        self._stop_timer()
        wrapped = self._factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._fail(ProxyConnectError(f"{self._factory!r} built no protocol"))
            return
        self._wrapped = wrapped
        wrapped.makeConnection(self.transport)
        self.established.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self._wrapped is not None:
            self._wrapped.connectionLost(reason)
        elif not self.established.called:
            why = "" if reason.check(error.ConnectionDone) else f": {reason.value}"
            self.established.errback(
                ProxyConnectError(
                    f"proxy closed the connection before answering CONNECT to {self._target}{why}"
                )
            )

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(
            error.TimeoutError(
                string=f"proxy did not answer CONNECT to {self._target} within {self._timeout:g} s"
            )
        )

    def _fail(self, exc: Exception) -> None:
        self._stop_timer()
        self.established.errback(exc)
        self._abort()

    def _cancel(self, _: Deferred[IProtocol]) -> None:
        # Deferred errbacks with CancelledError after this.
        self._stop_timer()
        self._abort()

    def _abort(self) -> None:
        transport: Any = self.transport
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.loseConnection()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
