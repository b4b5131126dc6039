"""Instance and task metadata: EC2 IMDSv2 and the ECS metadata file and endpoint.

Used once at startup, before the reactor runs, to find the region (when it
is not configured) and the hostname / instance id reported in telemetry.
Nothing else is going on then, so this client is plain BLOCKING code on the
standard library; it must never be called from a running reactor.  What
keeps startup fast when there is no metadata service is a hard bound:

* every request has a short timeout (``REQUEST_TIMEOUT``, 1 s);
* all requests of one client share a budget (``BUDGET``, 2 s), after which
  they fail at once;
* when IMDS does not answer the token request at all (timeout, refused,
  unreachable), the client remembers that and does not try again for the
  other fields.

Requests never go through a proxy (``-p``, ``HTTP(S)_PROXY``): metadata
services are link-local and a proxy could only answer wrongly (the Go
daemon's issue #12).  ``http.client`` is used directly for that reason.

Environment variables honoured, as in the AWS SDKs:
``AWS_EC2_METADATA_DISABLED``, ``AWS_EC2_METADATA_SERVICE_ENDPOINT``,
``AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE`` (``IPv6``), and for ECS
``ECS_ENABLE_CONTAINER_METADATA`` + ``ECS_CONTAINER_METADATA_FILE`` and
``ECS_CONTAINER_METADATA_URI_V4``.  (The SDKs also read the two EC2 settings
from the shared config file; this client does not.)
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from twisted.logger import Logger

__all__ = [
    "BUDGET",
    "HOSTNAME_MAX",
    "IMDS_IPV4",
    "IMDS_IPV6",
    "INSTANCE_ID_MAX",
    "REQUEST_TIMEOUT",
    "Identity",
    "MetadataClient",
    "MetadataError",
    "identity",
    "region_from_arn",
    "region_from_availability_zone",
]

IMDS_IPV4 = "http://169.254.169.254"
IMDS_IPV6 = "http://[fd00:ec2::254]"
TOKEN_TTL_SECONDS = 21600
REQUEST_TIMEOUT = 1.0
BUDGET = 2.0
# Metadata answers are a few hundred bytes; this only stops a runaway server.
MAX_BODY = 64 * 1024
MAX_FILE = 1024 * 1024
# PutTelemetryRecords limits.
HOSTNAME_MAX = 255
INSTANCE_ID_MAX = 20

_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# "us-east-1a", "us-west-2-lax-1a" (Local Zone), "us-east-1-wl1-bos-wlz-1"
# (Wavelength): the region is the leading "<letters>(-<letters>)*-<digits>".
_AZ_REGION = re.compile(r"([a-z]+(?:-[a-z]+)+-\d+)")

_log = Logger()


class MetadataError(Exception):
    """A metadata lookup failed; str() says what happened."""


class _Settings(Protocol):
    @property
    def local_mode(self) -> bool: ...


def _is_true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def region_from_arn(arn: str) -> str:
    """The region field of an ARN (``arn:partition:service:region:...``)."""
    parts = arn.split(":")
    if len(parts) < 6 or parts[0] != "arn" or not _REGION.fullmatch(parts[3]):
        raise MetadataError(f"{arn!r} is not an ARN with a region")
    return parts[3]


def region_from_availability_zone(zone: str) -> str:
    match = _AZ_REGION.match(zone)
    if match is None:
        raise MetadataError(f"cannot tell the region of availability zone {zone!r}")
    return match.group(1)


class MetadataClient:
    """Blocking client for EC2 IMDSv2 and the ECS task metadata (startup only).

    ``env`` is read for the settings listed in the module docstring.  One
    client caches the IMDS token and remembers an unreachable IMDS, so use
    one client for the region and the identity lookups.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT,
        budget: float = BUDGET,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._env: Mapping[str, str] = os.environ if env is None else env
        self._timeout = timeout
        self._budget = budget
        self._monotonic = monotonic
        self._deadline: float | None = None
        self._token: str | None = None
        self._token_fetched = False
        # Why IMDS cannot be used; once set, no more IMDS requests are made.
        self._imds_down: str | None = None

    # -- EC2 instance metadata --------------------------------------------

    @property
    def imds_url(self) -> str:
        custom = self._env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT", "").strip()
        if custom:
            return custom.rstrip("/")
        mode = self._env.get("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "").strip().lower()
        return IMDS_IPV6 if mode == "ipv6" else IMDS_IPV4

    def ec2_region(self) -> str:
        """``placement/region``."""
        region = self.ec2_metadata("placement/region")
        if not _REGION.fullmatch(region):
            raise MetadataError(f"EC2 metadata returned {region[:100]!r} as region")
        return region

    def hostname(self) -> str:
        return self.ec2_metadata("hostname")

    def instance_id(self) -> str:
        return self.ec2_metadata("instance-id")

    def ec2_metadata(self, path: str) -> str:
        """GET ``/latest/meta-data/<path>`` with an IMDSv2 token."""
        if _is_true(self._env.get("AWS_EC2_METADATA_DISABLED")):
            raise MetadataError("EC2 instance metadata is turned off by AWS_EC2_METADATA_DISABLED")
        if self._imds_down is not None:
            raise MetadataError(self._imds_down)
        token = self._imds_token()
        headers = {} if token is None else {"X-aws-ec2-metadata-token": token}
        url = f"{self.imds_url}/latest/meta-data/{path}"
        try:
            status, body = self._request("GET", url, headers)
        except MetadataError as e:
            self._imds_down = str(e)
            raise
        if status != 200:
            hint = "" if token is not None else " (no IMDSv2 token could be had)"
            raise MetadataError(f"GET {url} answered HTTP {status}{hint}")
        return body.decode("utf-8", "replace").strip()

    def _imds_token(self) -> str | None:
        if self._token_fetched:
            return self._token
        url = f"{self.imds_url}/latest/api/token"
        try:
            status, body = self._request(
                "PUT", url, {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)}
            )
        except MetadataError as e:
            self._imds_down = str(e)
            raise
        self._token_fetched = True
        if status == 200 and body.strip():
            self._token = body.decode("ascii", "replace").strip()
        elif status in (403, 404, 405):
            # What the SDKs do: IMDS without token support; try IMDSv1.
            self._token = None
        else:
            self._imds_down = f"PUT {url} answered HTTP {status}"
            raise MetadataError(self._imds_down)
        return self._token

    # -- ECS ----------------------------------------------------------------

    def ecs_file_region(self) -> str | None:
        """The region of the task in the ECS metadata file; None when it is not enabled."""
        if not _is_true(self._env.get("ECS_ENABLE_CONTAINER_METADATA")):
            return None
        path = self._env.get("ECS_CONTAINER_METADATA_FILE", "")
        if not path:
            raise MetadataError(
                "ECS_ENABLE_CONTAINER_METADATA is true but ECS_CONTAINER_METADATA_FILE is not set"
            )
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_FILE)
        except OSError as e:
            raise MetadataError(f"Unable to open ECS metadata file {path}: {e.strerror}") from None
        document = _json_object(raw, f"ECS metadata file {path}")
        arn = document.get("TaskARN")
        if not isinstance(arn, str) or not arn:
            status = document.get("MetadataFileStatus")
            raise MetadataError(
                f"ECS metadata file {path} has no TaskARN (MetadataFileStatus={status!r}); "
                "the ECS agent may not have finished writing it"
            )
        return region_from_arn(arn)

    def ecs_task_region(self) -> str | None:
        """The task's region from the task metadata endpoint v4; None when there is none."""
        base = self._env.get("ECS_CONTAINER_METADATA_URI_V4", "").strip().rstrip("/")
        if not base:
            return None
        url = f"{base}/task"
        status, body = self._request("GET", url, {})
        if status != 200:
            raise MetadataError(f"GET {url} answered HTTP {status}")
        document = _json_object(body, f"the answer of {url}")
        arn = document.get("TaskARN")
        if isinstance(arn, str) and arn:
            return region_from_arn(arn)
        zone = document.get("AvailabilityZone")
        if isinstance(zone, str) and zone:
            return region_from_availability_zone(zone)
        raise MetadataError(f"the answer of {url} has neither TaskARN nor AvailabilityZone")

    # -- HTTP ---------------------------------------------------------------

    def _request(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, bytes]:
        now = self._monotonic()
        if self._deadline is None:
            self._deadline = now + self._budget
        timeout = min(self._timeout, self._deadline - now)
        if timeout <= 0:
            raise MetadataError(
                f"{method} {url} not tried: the {self._budget:g} s allowed for metadata "
                "lookups at startup are used up"
            )
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MetadataError(f"{url!r} is not an http:// or https:// URL")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        connection_class = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        try:
            connection = connection_class(parts.hostname, parts.port, timeout=timeout)
        except ValueError as e:  # a bad port number
            raise MetadataError(f"{url!r}: {e}") from None
        try:
            connection.request(method, target, headers=headers)
            response = connection.getresponse()
            body = response.read(MAX_BODY)
            return response.status, body
        except TimeoutError:
            raise MetadataError(f"{method} {url}: no answer within {timeout:.3g} s") from None
        except (OSError, http.client.HTTPException) as e:
            raise MetadataError(f"{method} {url}: {_describe(e)}") from None
        finally:
            connection.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError:
        raise MetadataError(f"Unable to read {what}: it is not JSON") from None
    if not isinstance(document, dict):
        raise MetadataError(f"Unable to read {what}: it is not a JSON object")
    return document


# ---------------------------------------------------------------------------
# Telemetry identity


@dataclass(frozen=True)
class Identity:
    """``Hostname`` and ``EC2InstanceId`` for PutTelemetryRecords ("" when unknown)."""

    hostname: str = ""
    instance_id: str = ""


def identity(
    settings: _Settings, env: Mapping[str, str], metadata: MetadataClient | None = None
) -> Identity:
    """``AWS_HOSTNAME`` / ``AWS_INSTANCE_ID``, else IMDS (never in local mode).

    Blocking (see the module docstring).  Lookup failures are logged at
    Debug: off EC2 (Fargate, EKS, on-premises) they are expected, and the
    Go daemon's Error line for them is a common complaint.
    """
    hostname = env.get("AWS_HOSTNAME", "")
    instance_id = env.get("AWS_INSTANCE_ID", "")
    if not settings.local_mode and (not hostname or not instance_id):
        client = MetadataClient(env) if metadata is None else metadata
        if not hostname:
            try:
                hostname = client.hostname()
            except MetadataError as e:
                _log.debug("Get hostname metadata failed: {error}", error=str(e))
        if not instance_id:
            try:
                instance_id = client.instance_id()
            except MetadataError as e:
                _log.debug("Get instance id metadata failed: {error}", error=str(e))
    return Identity(hostname=hostname[:HOSTNAME_MAX], instance_id=instance_id[:INSTANCE_ID_MAX])
