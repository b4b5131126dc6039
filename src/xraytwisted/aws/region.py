"""Which region the daemon works in.

The Go daemon's order, first hit wins:

1. ``-n`` / ``Region`` in cfg.yaml;
2. ``AWS_REGION``;
3. not in local mode: the ECS metadata file (when
   ``ECS_ENABLE_CONTAINER_METADATA=true``), then the ECS task metadata
   endpoint v4 (which the Go daemon does not use; it is always there on
   Fargate), then EC2 IMDS ``placement/region``;
4. in local mode: what the SDKs would use, ``AWS_DEFAULT_REGION`` or the
   ``region`` of the profile in the shared config file.

The decisions are pure; the metadata lookups are injected (see
``metadata.MetadataClient``), so this module does no I/O of its own except
reading the shared config file in local mode.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from twisted.logger import Logger

__all__ = [
    "NO_REGION",
    "RegionError",
    "RegionSources",
    "local_config_region",
    "profile_name",
    "resolve_region",
]

# The Go daemon's message, word for word: scripts and docs search for it.
NO_REGION = (
    "Cannot fetch region variable from config file, environment variables, ecs metadata, "
    "or ec2 metadata. Use local-mode to use the local config region."
)

_log = Logger()


class RegionError(Exception):
    """No region anywhere.  str() is NO_REGION; ``reasons`` says why each source failed."""

    def __init__(self, reasons: tuple[str, ...] = ()) -> None:
        super().__init__(NO_REGION)
        self.reasons = reasons


class _Settings(Protocol):
    @property
    def region(self) -> str: ...

    @property
    def local_mode(self) -> bool: ...


class RegionSources(Protocol):
    """The metadata lookups, as ``metadata.MetadataClient`` provides them.

    Each returns a region, returns None when the source is not configured
    (ECS only), or raises an exception whose str() says what went wrong.
    """

    def ecs_file_region(self) -> str | None: ...

    def ecs_task_region(self) -> str | None: ...

    def ec2_region(self) -> str: ...


def resolve_region(
    settings: _Settings, env: Mapping[str, str], metadata: RegionSources
) -> tuple[str, str]:
    """``(region, source)``; source completes "Fetch region <region> from <source>".

    Raises RegionError (the Go daemon's message) when no source has one.
    Failed lookups are logged at Error, as the Go daemon does, since they
    are either a misconfiguration or about to end the start.
    """
    if settings.region:
        return settings.region, "commandline/config file"
    if env.get("AWS_REGION"):
        return env["AWS_REGION"], "environment variables"
    reasons: list[str] = []
    if settings.local_mode:
        found = local_config_region(env)
        if found is not None:
            return found
        reasons.append(
            "local mode: neither AWS_DEFAULT_REGION nor the profile's region in the "
            "shared config file is set"
        )
        raise RegionError(tuple(reasons))
    lookups: tuple[tuple[str, str, Callable[[], str | None]], ...] = (
        ("ECS metadata file", "ECS metadata file", metadata.ecs_file_region),
        ("ECS task metadata endpoint", "ECS task metadata endpoint", metadata.ecs_task_region),
        # The Go daemon's spelling in "Fetch region X from ec2 metadata".
        ("ec2 metadata", "EC2 metadata", metadata.ec2_region),
    )
    for source, name, lookup in lookups:
        try:
            region = lookup()
        except Exception as e:  # any failure of one source falls through to the next
            reason = str(e) or type(e).__name__
            _log.error("Unable to fetch region from {source}: {reason}", source=name, reason=reason)
            reasons.append(f"{name}: {reason}")
            continue
        if region:
            return region, source
    raise RegionError(tuple(reasons))


def profile_name(env: Mapping[str, str]) -> str:
    return env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"


def local_config_region(env: Mapping[str, str]) -> tuple[str, str] | None:
    """``AWS_DEFAULT_REGION``, else the profile's ``region`` in the shared config file."""
    if env.get("AWS_DEFAULT_REGION"):
        return env["AWS_DEFAULT_REGION"], "config (AWS_DEFAULT_REGION)"
    path = env.get("AWS_CONFIG_FILE") or os.path.join("~", ".aws", "config")
    path = os.path.expanduser(path)
    profile = profile_name(env)
    parser = configparser.RawConfigParser(strict=False, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        _log.debug("Cannot read the shared config file {path}: {error}", path=path, error=str(e))
        return None
    # The config file calls profiles "[profile name]", and the default one
    # "[default]" (botocore also accepts "[profile default]").
    sections = [f"profile {profile}"]
    if profile == "default":
        sections.insert(0, "default")
    for section in sections:
        if parser.has_option(section, "region"):
            region = parser.get(section, "region").strip()
            if region:
                return region, f"config (profile {profile!r} in {path})"
    return None
