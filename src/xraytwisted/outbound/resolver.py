"""Name lookups for outbound requests: getaddrinfo in the reactor's thread pool.

Twisted's default resolver handles only ``socket.gaierror``.  When
getaddrinfo fails otherwise - ``OSError(EMFILE)`` when the process is out of
file descriptors, which it needs to read /etc/hosts or to ask a DNS server -
that resolution never completes (the upload waits for its timeout) and the
error surfaces later as "Unhandled error in Deferred", typically at
shutdown.  ``ThreadedResolver`` does the same lookups but ends every failed
one at once with no addresses, which HostnameEndpoint reports as a
DNSLookupError; ``classify_exception`` then tells a lack of descriptors
apart from an unknown host.  Only public Twisted interfaces are used.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Literal

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

GetAddrInfo = Callable[..., "list[tuple[Any, ...]]"]


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        # getaddrinfo cannot be interrupted; its answer simply comes later.
        pass


def _family(address_types: Sequence[type[IAddress]] | None) -> int:
    types = set(address_types or ())
    if types == {IPv4Address}:
        return socket.AF_INET
    if types == {IPv6Address}:
        return socket.AF_INET6
    return socket.AF_UNSPEC


@implementer(IHostnameResolver)
class ThreadedResolver:
    """An IHostnameResolver whose lookups always complete, however getaddrinfo fails."""

    log = Logger()

    def __init__(self, reactor: Any, getaddrinfo: GetAddrInfo = socket.getaddrinfo) -> None:
        self._reactor = reactor
        self._getaddrinfo = getaddrinfo

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        kind = socket.SOCK_DGRAM if transportSemantics == "UDP" else socket.SOCK_STREAM
        d = deferToThreadPool(
            self._reactor,
            self._reactor.getThreadPool(),
            self._getaddrinfo,
            hostName,
            portNumber,
            _family(addressTypes),
            kind,
        )

        def deliver(result: object) -> None:
            if isinstance(result, Failure):
                self.log.debug(
                    "Looking up {name} failed: {error}",
                    name=hostName,
                    error=result.getErrorMessage(),
                )
                result = []
            assert isinstance(result, list)
            for family, socktype, _proto, _canonical, sockaddr in result:
                semantics: Literal["TCP", "UDP"] = "UDP" if socktype == socket.SOCK_DGRAM else "TCP"
                if family == socket.AF_INET:
                    resolutionReceiver.addressResolved(IPv4Address(semantics, *sockaddr[:2]))
                elif family == socket.AF_INET6:
                    resolutionReceiver.addressResolved(IPv6Address(semantics, *sockaddr))
            resolutionReceiver.resolutionComplete()

        d.addBoth(deliver)
        d.addErrback(lambda f: self.log.failure("Error delivering a name lookup", f))
        return resolution


def install(reactor: Any) -> bool:
    """Make ``ThreadedResolver`` the reactor's name resolver (False: it cannot take one)."""
    if not IReactorPluggableNameResolver.providedBy(reactor):
        return False
    reactor.installNameResolver(ThreadedResolver(reactor))
    return True
