"""``xray --health-check``: ask a running daemon's ``GET /health``; exit 0 if healthy, 1 if not.

For container health checks and supervisors with no curl: the address is
found the way the daemon finds it (``-t`` / ``Socket.TCPAddress``, from the
command line or cfg.yaml), or ``Monitoring.Address`` when one is set, since
the daemon serves /health there too.  Standard library only (http.client),
so a check every 30 s costs little and never starts a daemon.  Healthy
prints nothing; anything else is one line on stderr saying why.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import sys
from typing import Any, TextIO

from xraytwisted.settings import go_flags, loader
from xraytwisted.settings.addresses import Address, AddressError, parse_address
from xraytwisted.settings.table import ConfigError, Settings

TIMEOUT = 3.0  # seconds; below Docker's usual 5 s health check timeout
MAX_BODY = 64 * 1024


def probe_address(settings: Settings) -> tuple[Address, str]:
    """Where to ask, and which setting said so (for the error line)."""
    if settings.monitoring_address:
        text, where = settings.monitoring_address, "Monitoring.Address"
    else:
        text, where = settings.tcp_address, "-t/--bind-tcp or Socket.TCPAddress"
    address = parse_address(text, "tcp")
    # A daemon listening on every interface is reached on loopback.
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    return Address(host, address.port), where


def check(address: Address, where: str, timeout: float = TIMEOUT) -> str | None:
    """None when /health says healthy, else the reason."""
    url = f"http://{address}/health"
    connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout)
    try:
        connection.request("GET", "/health", headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read(MAX_BODY)
    except TimeoutError:
        return f"{url} did not answer within {timeout:g} seconds"
    except (OSError, http.client.HTTPException) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        return (
            f"cannot get {url}: {reason}; is the daemon running and listening there "
            f"(set with {where})?"
        )
    finally:
        connection.close()
    if response.status == 200:
        return None
    report: Any = None
    with contextlib.suppress(ValueError):
        report = json.loads(body)
    reasons = report.get("reasons") if isinstance(report, dict) else None
    if response.status == 503 and isinstance(reasons, list):
        why = "; ".join(str(r) for r in reasons) or "no reason given"
        return f"{url} answered 503 (unhealthy): {why}"
    return (
        f"{url} answered {response.status} {response.reason}, not a health report; is an "
        f"xraytwisted daemon listening there (set with {where})?"
    )


def run(parsed: go_flags.Parsed, stderr: TextIO | None = None) -> int:
    """The whole ``--health-check``: settings as the daemon reads them, then one request."""
    err = sys.stderr if stderr is None else stderr
    try:
        settings = loader.resolve(loader.load(parsed.config), parsed.overrides)
        address, where = probe_address(settings)
        reason = check(address, where)
    except (ConfigError, AddressError) as e:
        reason = f"cannot tell where the daemon listens: {e}"
    except socket.gaierror as e:
        reason = f"cannot resolve the daemon's address: {e}"
    if reason is None:
        return 0
    err.write(f"unhealthy: {reason}\n")
    err.flush()
    return 1
