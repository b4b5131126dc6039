"""Where the X-Ray API lives: endpoint URLs by region and partition.

Pure functions.  Used for segment uploads, telemetry and the sampling proxy
alike, so FIPS and dual-stack settings apply to all of them (the Go daemon's
proxy ignores FIPS).  The rules are those of the X-Ray endpoint rule set
(botocore ``xray/2016-04-12/endpoint-rule-set-1.json``) with the partitions
of botocore's ``partitions.json``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Partition:
    name: str
    region_regex: str
    dns_suffix: str
    dualstack_dns_suffix: str


# botocore partitions.json; a region matching none of them is in "aws".
PARTITIONS: tuple[Partition, ...] = (
    Partition("aws", r"^(us|eu|ap|sa|ca|me|af|il|mx)\-\w+\-\d+$", "amazonaws.com", "api.aws"),
    Partition("aws-cn", r"^cn\-\w+\-\d+$", "amazonaws.com.cn", "api.amazonwebservices.com.cn"),
    Partition("aws-eusc", r"^eusc\-(de)\-\w+\-\d+$", "amazonaws.eu", "api.amazonwebservices.eu"),
    Partition("aws-iso", r"^us\-iso\-\w+\-\d+$", "c2s.ic.gov", "api.aws.ic.gov"),
    Partition("aws-iso-b", r"^us\-isob\-\w+\-\d+$", "sc2s.sgov.gov", "api.aws.scloud"),
    Partition("aws-iso-e", r"^eu\-isoe\-\w+\-\d+$", "cloud.adc-e.uk", "api.cloud-aws.adc-e.uk"),
    Partition("aws-iso-f", r"^us\-isof\-\w+\-\d+$", "csp.hci.ic.gov", "api.aws.hci.ic.gov"),
    Partition("aws-us-gov", r"^us\-gov\-\w+\-\d+$", "amazonaws.com", "api.aws"),
)
_REGION = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9\-]{0,61}[a-zA-Z0-9])?")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]*[A-Za-z0-9_.])?")
_EXAMPLE = "e.g. https://xray.us-east-2.amazonaws.com"


class EndpointError(ValueError):
    """An endpoint setting that cannot be used; str() says what to change."""


@dataclass(frozen=True)
class Endpoint:
    """A parsed endpoint URL: what requests are sent to and signed for."""

    url: str  # scheme://netloc[/base path], no trailing slash
    scheme: str
    host: str  # the Host header value: hostname, plus :port when not the default
    hostname: str
    port: int
    base_path: str  # "" or "/prefix"
    secure: bool

    def url_for(self, path: str) -> str:
        return f"{self.scheme}://{self.host}{self.base_path}{path}"


def parse(url: str) -> Endpoint:
    """Parse an endpoint URL (http or https, optional port and path prefix)."""

    def bad(why: str) -> EndpointError:
        return EndpointError(f"Invalid endpoint {url!r}: {why}")

    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise bad("it contains white space or control characters")
    try:
        parts = urlsplit(url)
        explicit_port = parts.port
    except ValueError as e:
        # A bad IPv6 literal, or a port that is not a number in 0-65535.
        raise bad(f"{e}; write it as a URL, {_EXAMPLE}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise bad(f"write it as an http:// or https:// URL, {_EXAMPLE}")
    if parts.username is not None or parts.password is not None:
        raise bad("user names and passwords are not supported in the endpoint")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise bad("a query string or fragment is not allowed")
    if explicit_port == 0:
        raise bad("port 0 is not a port to connect to")
    hostname = parts.hostname
    if ":" in hostname:
        try:
            ipaddress.IPv6Address(hostname.split("%", 1)[0])
        except ValueError:
            raise bad(f"{hostname!r} is not an IPv6 address") from None
        host_text = f"[{hostname}]"
    else:
        if not _HOSTNAME.fullmatch(hostname):
            raise bad(f"{hostname!r} is not a valid host name")
        host_text = hostname
    default_port = 443 if scheme == "https" else 80
    port = default_port if explicit_port is None else explicit_port
    host = host_text if port == default_port else f"{host_text}:{port}"
    base_path = parts.path.rstrip("/")
    return Endpoint(
        url=f"{scheme}://{host}{base_path}",
        scheme=scheme,
        host=host,
        hostname=hostname,
        port=port,
        base_path=base_path,
        secure=scheme == "https",
    )


def partition(region: str) -> Partition:
    """The partition of ``region`` (botocore's rule: regex match, else "aws")."""
    for candidate in PARTITIONS:
        if re.match(candidate.region_regex, region):
            return candidate
    return PARTITIONS[0]


def dns_suffix(region: str, dualstack: bool = False) -> str:
    found = partition(region)
    return found.dualstack_dns_suffix if dualstack else found.dns_suffix


def default_url(region: str, *, fips: bool = False, dualstack: bool = False) -> str:
    """The X-Ray endpoint URL for ``region`` (FIPS and dual-stack as asked)."""
    if not region:
        raise EndpointError("No region: cannot choose an X-Ray endpoint")
    if not _REGION.fullmatch(region):
        raise EndpointError(
            f"Invalid region {region!r}: a region is letters, digits and dashes, e.g. us-east-2"
        )
    service = "xray-fips" if fips else "xray"
    return f"https://{service}.{region}.{dns_suffix(region, dualstack)}"


def _env_true(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() == "true"


def resolve(
    region: str,
    *,
    configured: str = "",
    env: Mapping[str, str] | None = None,
) -> Endpoint:
    """The endpoint to use.

    Order: the configured URL (Endpoint / -e), then ``AWS_ENDPOINT_URL_XRAY``,
    then ``AWS_ENDPOINT_URL`` (both ignored when
    ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` is true), then the regional
    default, FIPS and/or dual-stack when ``AWS_USE_FIPS_ENDPOINT`` /
    ``AWS_USE_DUALSTACK_ENDPOINT`` are true.  As in the SDKs, a custom
    endpoint cannot be combined with FIPS or dual-stack.
    """
    env = {} if env is None else env
    fips = _env_true(env, "AWS_USE_FIPS_ENDPOINT")
    dualstack = _env_true(env, "AWS_USE_DUALSTACK_ENDPOINT")
    override = configured
    source = "Endpoint"
    if not override and not _env_true(env, "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        for name in ("AWS_ENDPOINT_URL_XRAY", "AWS_ENDPOINT_URL"):
            if env.get(name):
                override, source = env[name], name
                break
    if override:
        endpoint = parse(override)
        for flag, name in (
            (fips, "AWS_USE_FIPS_ENDPOINT"),
            (dualstack, "AWS_USE_DUALSTACK_ENDPOINT"),
        ):
            if flag:
                raise EndpointError(
                    f"{name}=true cannot be combined with a custom endpoint ({source} = "
                    f"{override}); unset one of them"
                )
        return endpoint
    return parse(default_url(region, fips=fips, dualstack=dualstack))
