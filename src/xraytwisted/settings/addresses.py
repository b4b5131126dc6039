"""Listen addresses: Go-style "host:port" parsing, with Go's messages.

Parsing and messages follow Go's net.SplitHostPort / net.ResolveUDPAddr, as
the Go daemon uses them: ``127.0.0.1:2000``, ``[::1]:2000``, ``:2000`` (every
interface, dual-stack when IPv6 is available), ``localhost:2000`` (a host
name prefers its IPv4 address, as Go's resolver does) and service names
(``:domain``).  Deliberate difference: an empty address or an empty port
("127.0.0.1:") is an error here, where Go silently listens on a random port.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


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
