"""Which HTTP proxy, if any, a request to X-Ray goes through.

Pure functions, no reactor.  ``choose_proxy(url, configured=..., env=...)``
answers for one URL; ``ProxyRules`` is the same decision parsed once, for a
client that makes many requests.

Where the proxy comes from
==========================

1. ``-p`` / ``--proxy-address`` / ``ProxyAddress`` (``configured``): used for
   every request, https and http alike (as the Go daemon does).
2. Otherwise the environment, the way Go's ``ProxyFromEnvironment`` reads it:
   ``HTTPS_PROXY`` (else ``https_proxy``) for https URLs and ``HTTP_PROXY``
   (else ``http_proxy``) for http URLs; the upper-case name wins when both
   are set, and an empty value counts as unset.  The Go daemon sends http
   endpoints through ``HTTPS_PROXY`` too; we follow curl, Go's standard
   library and botocore (http endpoints only exist for local testing).
   ``ALL_PROXY`` is not read.

A proxy URL is ``http://[user[:password]@]host[:port]``: port 80 when left
out (as Go), ``host:port`` without a scheme means ``http://host:port`` (as
Go's environment parsing), and user name and password are percent-decoded
and sent as ``Proxy-Authorization: Basic``.  Only plain-http proxies are
supported: https is tunnelled through them with ``CONNECT``.  ``https://``
(TLS to the proxy itself) and SOCKS proxies are refused with a clear
``Bad proxy URL: ...`` message, the Go daemon's wording; a bad ``-p`` or
``HTTPS_PROXY`` stops the start.  A bad ``HTTP_PROXY`` only fails requests
to http URLs, since https-only users (the normal case) never use it.

NO_PROXY
========

``NO_PROXY`` (else ``no_proxy``) is honoured - the Go daemon ignores it
(aws-xray-daemon issue #12) - and it applies to ``-p`` as well: whoever set
NO_PROXY wants those hosts reached directly, and curl's ``-x`` obeys it too.
Entries are separated by commas or white space and compared without regard
to case; no name is ever looked up in DNS:

* ``*`` alone: no proxy for any host;
* ``example.com``, ``.example.com`` and ``*.example.com`` all match
  example.com and every name under it (curl and botocore; Go's leading dot
  would exclude example.com itself);
* an IP address (``10.1.2.3``, ``::1``, ``[::1]``) matches that address
  written literally in the URL, a CIDR range (``10.0.0.0/8``, ``fd00::/8``)
  every address in it;
* any of these with ``:port`` (``[::1]:443`` for IPv6) matches only that
  port, the URL's explicit port or else 443/80 by scheme.

Unlike Go, ``localhost`` and loopback addresses are not bypassed implicitly
(curl and botocore do not either): list them, e.g.
``NO_PROXY=localhost,127.0.0.1,::1``.  Entries that mean nothing (``[::1``,
``host:notaport``) are ignored and kept in ``NoProxy.ignored`` so that the
startup log can point them out.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DEFAULT_PROXY_PORT = 80
_DEFAULT_PORTS = {"http": 80, "https": 443}
_EXAMPLE = "write it as http://host:port or http://user:password@host:port"
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_.])?")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ProxyConfigError(ValueError):
    """An outbound-network setting (proxy URL, CA bundle) that cannot be used.

    str() is the one line to show; it never contains a proxy password.
    """


def mask_password(url: str) -> str:
    """``url`` with the password of its user info, if any, replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The last "@": an unencoded "@" or "/" in a password must not leak either.
    userinfo, at, hostport = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{hostport}"


@dataclass(frozen=True)
class ProxySpec:
    """One HTTP proxy: where it is and how to authenticate to it."""

    scheme: str  # always "http"
    host: str  # host name or IP address, IPv6 without brackets
    port: int
    username: str | None = None  # percent-decoded
    password: str | None = field(default=None, repr=False)
    # Where the setting came from, for messages: "ProxyAddress", "HTTPS_PROXY", ...
    source: str = field(default="", compare=False)

    def authorization_header(self) -> str | None:
        """The ``Proxy-Authorization`` value, or None when the URL has no user."""
        if self.username is None:
            return None
        # A user without a password authenticates with an empty one (as Go).
        userpass = f"{self.username}:{self.password or ''}".encode()
        return "Basic " + base64.b64encode(userpass).decode("ascii")

    @property
    def netloc(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def display(self) -> str:
        """The proxy URL for logs, password masked."""
        user = ""
        if self.username is not None:
            user = self.username + (":***" if self.password else "") + "@"
        return f"{self.scheme}://{user}{self.netloc}"


def parse_proxy_url(value: str, source: str = "ProxyAddress") -> ProxySpec:
    """Parse one proxy URL; ``ProxyConfigError`` says what is wrong with it."""
    text = value.strip()

    def bad(why: str) -> ProxyConfigError:
        shown = mask_password(value)
        if not shown.isprintable():
            shown = repr(shown)  # keep the message on one line
        return ProxyConfigError(f"Bad proxy URL: {shown} (from {source}): {why}")

    if not text:
        raise bad(f"it is empty; {_EXAMPLE}")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise bad("it contains white space or control characters")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise bad(f"{e}; {_EXAMPLE}") from None
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise bad(
            "https:// proxies are not supported, only http:// ones (https to X-Ray is "
            "tunnelled through them with CONNECT); " + _EXAMPLE
        )
    if scheme.startswith("socks"):
        raise bad(f"SOCKS proxies are not supported, only http:// ones; {_EXAMPLE}")
    if scheme != "http":
        raise bad(f"unsupported scheme {parts.scheme!r}; {_EXAMPLE}")
    hostname = parts.hostname
    if not hostname:
        raise bad(f"there is no host name; {_EXAMPLE}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or text.endswith(("?", "#")):
        raise bad(f"a proxy URL has no path, query or fragment; {_EXAMPLE}")
    if port == 0:
        raise bad("port 0 is not a port to connect to")
    if ":" in hostname:
        try:
            ipaddress.IPv6Address(hostname)
        except ValueError:
            raise bad(f"{hostname!r} is not an IPv6 address") from None
    elif not _HOSTNAME.fullmatch(hostname):
        raise bad(f"{hostname!r} is not a valid host name")
    return ProxySpec(
        scheme="http",
        host=hostname,
        port=DEFAULT_PROXY_PORT if port is None else port,
        username=None if parts.username is None else unquote(parts.username),
        password=None if parts.password is None else unquote(parts.password),
        source=source,
    )


# ---------------------------------------------------------------------------
# NO_PROXY


@dataclass(frozen=True)
class _Entry:
    domain: str = ""  # "example.com" (no leading dot); "" for address entries
    network: IPNetwork | None = None  # a single address is a /32 or /128
    port: int | None = None


def _parse_port(text: str) -> int | None:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(text)
    return int(text)


def _parse_entry(raw: str) -> _Entry:
    """One NO_PROXY entry (lower-cased); ValueError when it means nothing."""
    port: int | None = None
    host = raw
    if raw.startswith("["):
        # [v6] or [v6]:port
        inside, sep, after = raw[1:].partition("]")
        if not sep or (after and not after.startswith(":")):
            raise ValueError(raw)
        host = inside
        if after:
            port = _parse_port(after[1:])
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        port = _parse_port(port_text)
    # Zero or several colons without brackets: a bare IPv6 address or range.
    try:
        return _Entry(network=ipaddress.ip_network(host, strict=False), port=port)
    except ValueError:
        pass
    if ":" in host or "/" in host:
        raise ValueError(raw)
    domain = host.removeprefix("*").lstrip(".").rstrip(".")
    if not domain or not _HOSTNAME.fullmatch(domain):
        raise ValueError(raw)
    return _Entry(domain=domain, port=port)


@dataclass(frozen=True)
class NoProxy:
    """A parsed NO_PROXY list."""

    entries: tuple[_Entry, ...] = ()
    everything: bool = False
    ignored: tuple[str, ...] = ()  # entries that could not be understood
    text: str = field(default="", compare=False)

    @classmethod
    def parse(cls, text: str) -> NoProxy:
        entries: list[_Entry] = []
        ignored: list[str] = []
        everything = False
        for raw in re.split(r"[,\s]+", text.strip().lower()):
            if not raw:
                continue
            if raw == "*":
                everything = True
                continue
            try:
                entries.append(_parse_entry(raw))
            except ValueError:
                ignored.append(raw)
        return cls(tuple(entries), everything, tuple(ignored), text)

    def bypasses(self, host: str, port: int) -> bool:
        """Whether ``host`` (a name, or an IP address without brackets) skips the proxy."""
        if self.everything:
            return True
        name = host.lower().rstrip(".")
        address: IPAddress | None
        try:
            address = ipaddress.ip_address(name.split("%", 1)[0])
        except ValueError:
            address = None
        for entry in self.entries:
            if entry.port is not None and entry.port != port:
                continue
            if address is not None:
                if entry.network is not None and address in entry.network:
                    return True
            elif entry.domain and (name == entry.domain or name.endswith("." + entry.domain)):
                return True
        return False


# ---------------------------------------------------------------------------
# The decision


def _env_any(env: Mapping[str, str], *names: str) -> tuple[str, str]:
    """(value, name) of the first of ``names`` set to something non-empty."""
    for name in names:
        value = env.get(name, "")
        if value.strip():
            return value, name
    return "", ""


@dataclass(frozen=True)
class ProxyRules:
    """The proxy settings, parsed once: ``proxy_for(url)`` decides per request."""

    configured: ProxySpec | None = None
    https: ProxySpec | None = None
    # A bad HTTP_PROXY is kept as its error: it only matters for http URLs.
    http: ProxySpec | ProxyConfigError | None = field(default=None, compare=False)
    no_proxy: NoProxy = NoProxy()

    @classmethod
    def from_settings(cls, configured: str, env: Mapping[str, str]) -> ProxyRules:
        """Parse ``-p``/ProxyAddress and the environment; ProxyConfigError if unusable."""
        no_proxy_text, _ = _env_any(env, "NO_PROXY", "no_proxy")
        no_proxy = NoProxy.parse(no_proxy_text)
        if configured.strip():
            return cls(configured=parse_proxy_url(configured, "ProxyAddress"), no_proxy=no_proxy)
        https_text, https_name = _env_any(env, "HTTPS_PROXY", "https_proxy")
        http_text, http_name = _env_any(env, "HTTP_PROXY", "http_proxy")
        https = parse_proxy_url(https_text, https_name) if https_text else None
        http: ProxySpec | ProxyConfigError | None = None
        if http_text:
            try:
                http = parse_proxy_url(http_text, http_name)
            except ProxyConfigError as e:
                http = e
        return cls(https=https, http=http, no_proxy=no_proxy)

    @property
    def any(self) -> bool:
        return any(p is not None for p in (self.configured, self.https, self.http))

    def proxy_for(self, url: str) -> ProxySpec | None:
        """The proxy for a request to ``url``, or None to connect directly."""
        try:
            parts = urlsplit(url)
            explicit_port = parts.port
        except ValueError as e:
            raise ProxyConfigError(f"Cannot choose a proxy for {url!r}: {e}") from None
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ProxyConfigError(f"Cannot choose a proxy for {url!r}: not an http(s) URL")
        chosen = self.configured or (self.https if scheme == "https" else self.http)
        if chosen is None:
            return None
        port = _DEFAULT_PORTS[scheme] if explicit_port is None else explicit_port
        if self.no_proxy.bypasses(parts.hostname, port):
            return None
        if isinstance(chosen, ProxyConfigError):
            raise chosen
        return chosen


def choose_proxy(target_url: str, *, configured: str, env: Mapping[str, str]) -> ProxySpec | None:
    """The proxy for one request to ``target_url`` (see the module docstring)."""
    return ProxyRules.from_settings(configured, env).proxy_for(target_url)
