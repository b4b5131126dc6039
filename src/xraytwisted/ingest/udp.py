"""UDP ingest: the DatagramProtocol SDKs send segments to, and its service."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from xraytwisted.ingest import Ingest
from xraytwisted.sockets import receive_buffer_size

# Twisted reads datagrams into buffers of 8192 bytes by default and silently
# truncates longer ones; segments can be up to 64 KiB.
MAX_DATAGRAM = 65536


class UDPIngest(DatagramProtocol):
    noisy = False  # no "Starting protocol" lines

    def __init__(self, ingest: Ingest) -> None:
        # The port calls datagramReceived(data, addr) for every segment; going
        # straight to the ingest core saves a Python call on the hot path.
        self.datagramReceived = ingest.datagram  # type: ignore[method-assign,assignment]


class UDPIngestService(Service):
    """Serves an already-bound UDP socket; drains it before closing on stop."""

    log = Logger()

    def __init__(self, reactor: Any, sock: socket.socket, ingest: Ingest) -> None:
        self._reactor = reactor
        self._socket: socket.socket | None = sock
        self.protocol = UDPIngest(ingest)
        self.port: Any = None
        self.address = sock.getsockname()
        self.receive_buffer = 0

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        sock = self._socket
        if sock is None or self.port is not None:
            return
        self.port = self._reactor.adoptDatagramPort(
            sock.fileno(), sock.family, self.protocol, maxPacketSize=MAX_DATAGRAM
        )
        self.receive_buffer = receive_buffer_size(sock)
        # The reactor has its own duplicate of the descriptor now.
        sock.close()
        self._socket = None
        self.log.info(
            "Listening on UDP {address} (kernel receive buffer {kb} KiB)",
            address=_format(self.address),
            kb=self.receive_buffer // 1024,
        )

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            return None
        # Datagrams already in the kernel buffer were sent before we were
        # told to stop: take them in too, so they are uploaded with the rest.
        drain(port)
        return maybeDeferred(port.stopListening)


def drain(port: Any, limit: int = 100_000) -> int:
    """Read whatever is waiting on the port's socket; returns how many datagrams."""
    sock = port.socket
    protocol = port.protocol
    count = 0
    while count < limit:
        try:
            data, addr = sock.recvfrom(MAX_DATAGRAM)
        except OSError:
            break
        protocol.datagramReceived(data, addr)
        count += 1
    return count


def _format(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
