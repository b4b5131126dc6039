"""Services that serve sockets bound while the daemon was built.

Binding happens in ``daemon.build`` (so "address already in use" is a one-
line startup error); these services hand the bound socket to the reactor
when started and close it when stopped.  Subclasses say how the reactor
adopts their socket, what to log then, and what stopping involves besides
closing the listener.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from xraytwisted.settings.addresses import Address


class AdoptedPortService(Service):
    log = Logger()

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        self._reactor = reactor
        self._socket: socket.socket | None = sock
        self.port: Any = None
        self._resume: Any = None  # IDelayedCall: see pause_accepting
        host, port = sock.getsockname()[:2]
        self.address = Address(str(host), int(port))

    def adopt(self, sock: socket.socket) -> Any:
        """Give ``sock`` to the reactor; returns the reactor's port."""
        raise NotImplementedError

    def listening(self) -> None:
        """Called once the reactor serves the socket (say so in the log)."""

    def closing(self, port: Any) -> None:
        """Called before the listener is closed."""

    def closed(self) -> Deferred[Any] | None:
        """Called after the listener is closed; may return a Deferred to wait for."""
        return None

    def privilegedStartService(self) -> None:
        # twistd calls this before dropping privileges; the socket is bound
        # already, so this only registers it with the reactor.
        super().privilegedStartService()
        sock = self._socket
        if sock is None or self.port is not None:
            return
        self.port = self.adopt(sock)
        sock.close()  # the reactor has its own duplicate of the descriptor now
        self._socket = None
        self.listening()

    def startService(self) -> None:
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def pause_accepting(self, seconds: float = 1.0) -> None:
        """Stop reading a stream listener for ``seconds``.

        For when accept() keeps failing (no descriptors left): the listener
        stays readable, and the event loop would spin on it.
        """
        port = self.port
        if port is None or self._resume is not None:
            return
        port.stopReading()
        self._resume = self._reactor.callLater(seconds, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self.port is not None:
            self.port.startReading()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        resume, self._resume = self._resume, None
        if resume is not None and resume.active():
            resume.cancel()
        port, self.port = self.port, None
        if self._socket is not None:  # never started
            self._socket.close()
            self._socket = None
        if port is None:
            return None
        self.closing(port)
        d: Deferred[Any] = maybeDeferred(port.stopListening)
        d.addCallback(lambda _: self.closed())
        return d.addCallback(lambda _: None)
