"""Listen addresses: Go-style "host:port" parsing and binding the sockets.

Sockets are bound while the service is being built, before twistd starts
logging or daemonizes, so a bad address or a port in use ends the start with
one clear line and exit status 1 instead of a traceback; the services then
hand the bound sockets to the reactor.

Parsing and messages follow Go's net.SplitHostPort / net.ResolveUDPAddr, as
the Go daemon uses them: ``127.0.0.1:2000``, ``[::1]:2000``, ``:2000`` (every
interface, dual-stack when IPv6 is available), ``localhost:2000`` (a host
name prefers its IPv4 address, as Go's resolver does) and service names
(``:domain``).  Deliberate difference: an empty address or an empty port
("127.0.0.1:") is an error here, where Go silently listens on a random port.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Linux doubles SO_RCVBUF and keeps it in an int.
_MAX_RECEIVE_BUFFER = (2**31 - 1) // 2
# Python's socket module does not export SO_RCVBUFFORCE (Linux-only, value
# 33): without it, root could never raise the buffer past net.core.rmem_max.
SO_RCVBUFFORCE: int | None = getattr(
    socket, "SO_RCVBUFFORCE", 33 if sys.platform.startswith("linux") else None
)


class AddressError(ValueError):
    """A listen address that cannot be used; str() says which and why."""


@dataclass(frozen=True)
class Address:
    host: str  # "" = every interface
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _split_host_port(text: str) -> tuple[str, str]:
    """Go's net.SplitHostPort, with its error messages."""

    def error(why: str) -> AddressError:
        return AddressError(f"address {text}: {why}")

    last = text.rfind(":")
    if last < 0:
        raise error("missing port in address")
    j = k = 0
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise error("missing ']' in address")
        if end + 1 == len(text):
            raise error("missing port in address")
        if end + 1 != last:
            # "]" is not followed by the last ":".
            raise error(
                "too many colons in address" if text[end + 1] == ":" else "missing port in address"
            )
        host = text[1:end]
        j, k = 1, end + 1
    else:
        host = text[:last]
        if ":" in host:
            raise error("too many colons in address")
    if "[" in text[j:]:
        raise error("unexpected '[' in address")
    if "]" in text[k:]:
        raise error("unexpected ']' in address")
    return host, text[last + 1 :]


def _parse_port(service: str, network: str, text: str) -> int:
    """Go's LookupPort: a decimal number (optionally signed), else a service name."""
    if service == "":
        # Go reads an empty port as 0 (any free port): almost always an unset
        # variable in "host:$PORT", so it is an error here.
        raise AddressError(f"address {text}: missing port number after ':'")
    digits = service[1:] if service[0] in "+-" else service
    if digits.isascii() and digits.isdigit():
        port = int(digits) * (-1 if service[0] == "-" else 1)
        if not 0 <= port <= 65535:
            raise AddressError(f"address {service}: invalid port")
        return port
    try:
        return socket.getservbyname(service.lower(), network)
    except (OSError, ValueError, UnicodeError):
        raise AddressError(f"lookup {network}/{service}: unknown port") from None


def parse_address(text: str, network: str = "udp") -> Address:
    """Parse "host:port", "[v6]:port" or ":port" with Go's net rules and messages.

    ``network`` ("udp" or "tcp") is only used to look up service names.
    """
    if text == "":
        raise AddressError("address is empty: use host:port, e.g. 127.0.0.1:2000")
    host, service = _split_host_port(text)
    return Address(host, _parse_port(service, network, text))


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


def bind_tcp(address: Address, backlog: int = 128) -> socket.socket:
    """A listening, non-blocking TCP socket bound to ``address``."""
    return _bind(address, socket.SOCK_STREAM, "tcp", backlog, 0)
