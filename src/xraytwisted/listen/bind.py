"""Binding the listen sockets while the service is being built.

Sockets are bound before twistd starts logging or daemonizes, so a bad
address or a port in use ends the start with one clear line and exit status 1
instead of a traceback; the services then hand the bound sockets to the
reactor.  Which address a host name means follows Go's resolver (see
``xraytwisted.settings.addresses``).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import sys
from collections.abc import Sequence
from typing import Any

from xraytwisted.settings.addresses import Address, AddressError

_MAX_RECEIVE_BUFFER = (2**31 - 1) // 2
# Python's socket module does not export SO_RCVBUFFORCE (Linux-only, value
# 33): without it, root could never raise the buffer past net.core.rmem_max.
SO_RCVBUFFORCE: int | None = getattr(
    socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None
)


def _reason(e: OSError) -> str:
    text = e.strerror or str(e)
    return text[:1].lower() + text[1:]


def _candidates(address: Address, kind: int) -> Sequence[tuple[int, Any]]:
    """(family, sockaddr) to try in order, as Go's resolver would pick them."""
    host = address.host
    if host == "":
        # Every interface: dual-stack "::" if the system has IPv6, else 0.0.0.0.
        return [
            (socket.AF_INET6, ("::", address.port, 0, 0)),
            (socket.AF_INET, ("0.0.0.0", address.port)),
        ]
    with contextlib.suppress(ValueError):
        literal = ipaddress.ip_address(host)
        if literal.version == 4:
            return [(socket.AF_INET, (host, address.port))]
    try:
        infos = socket.getaddrinfo(host, address.port, socket.AF_UNSPEC, kind, 0, socket.AI_PASSIVE)
    except socket.gaierror as e:
        if e.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            raise AddressError(f"lookup {host}: no such host") from None
        raise AddressError(f"lookup {host}: {_reason(e)}") from None
    except (UnicodeError, ValueError):
        raise AddressError(f"lookup {host}: no such host") from None
    found = [(family, sockaddr) for family, _, _, _, sockaddr in infos]
    if not found:
        raise AddressError(f"lookup {host}: no such host")
    # Go takes the first IPv4 address of a host name, the first IPv6 one of
    # an IPv6 literal; failing that, whatever came first.
    want = socket.AF_INET6 if ":" in host else socket.AF_INET
    preferred = [c for c in found if c[0] == want]
    return (preferred or found)[:1]


def _shown(sockaddr: Any, address: Address) -> str:
    """The address as Go prints it in "listen udp <addr>: ..." (the resolved IP)."""
    if address.host == "":
        return f":{address.port}"
    return str(Address(str(sockaddr[0]), address.port))


def _bind(
    address: Address, kind: int, network: str, backlog: int | None, rcvbuf: int
) -> socket.socket:
    last_error: AddressError | None = None
    for family, sockaddr in _candidates(address, kind):
        shown = _shown(sockaddr, address)
        try:
            sock = socket.socket(family, kind)
        except OSError as e:
            last_error = AddressError(f"listen {network} {shown}: socket: {_reason(e)}")
            if e.errno in (errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT, errno.EINVAL):
                continue  # no IPv6 here: try the next family
            break
        step = "bind"
        try:
            if backlog is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and sockaddr[0] == "::":
                # Go listens dual-stack on the IPv6 wildcard.
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if rcvbuf > 0:
                set_receive_buffer(sock, rcvbuf)
            sock.bind(sockaddr)
            if backlog is not None:
                step = "listen"
                sock.listen(backlog)
            sock.setblocking(False)
        except OSError as e:
            sock.close()
            if (
                address.host == ""
                and family == socket.AF_INET6
                and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)
            ):
                continue  # IPv6 sockets exist but "::" cannot be bound: use 0.0.0.0
            raise AddressError(f"listen {network} {shown}: {step}: {_reason(e)}") from None
        return sock
    raise last_error or AddressError(f"listen {network} {address}: no usable address")


def bind_udp(address: Address, receive_buffer: int = 0) -> socket.socket:
    """A non-blocking UDP socket bound to ``address``.

    ``receive_buffer`` bytes of kernel buffer are asked for (SO_RCVBUFFORCE
    first, which root may use past net.core.rmem_max); 0 keeps the OS default.
    """
    return _bind(address, socket.SOCK_DGRAM, "udp", None, receive_buffer)


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for ``size`` bytes of receive buffer; returns what the kernel granted."""
    size = max(0, min(size, _MAX_RECEIVE_BUFFER))
    forced = False
    if SO_RCVBUFFORCE is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            forced = True
        except OSError:
            pass
    if not forced:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return receive_buffer_size(sock)


def receive_buffer_size(sock: socket.socket) -> int:
    # Linux reports double the requested size (it counts bookkeeping too).
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def describe_receive_buffer(
    asked: int, reported: int, linux: bool = sys.platform.startswith("linux")
) -> str:
    """The UDP receive buffer for the "Listening on UDP" line: what was granted, and why.

    ``reported`` is what SO_RCVBUF reads back.  Linux doubles what it is set
    to (the extra half is for its own bookkeeping) and reads that back, so
    16 MiB asked and granted reads as 32 MiB; it caps what an unprivileged
    process asks at net.core.rmem_max.
    """
    kb = 1024
    if asked <= 0:
        return f"receive buffer {reported // kb} KiB, the OS default"
    granted = reported // 2 if linux else reported
    shown = f"the kernel reports {reported // kb} KiB: Linux doubles it for its bookkeeping"
    if granted >= asked:
        return f"receive buffer {asked // kb} KiB as asked" + (f"; {shown}" if linux else "")
    return (
        f"receive buffer {granted // kb} KiB, less than the {asked // kb} KiB asked: the kernel "
        "caps it (net.core.rmem_max on Linux); raise that limit or run as root to get more, "
        "or lower --udp-receive-buffer" + (f"; {shown}" if linux else "")
    )


def bind_tcp(address: Address, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking TCP socket bound to ``address``."""
    return _bind(address, socket.SOCK_STREAM, "tcp", backlog, 0)
