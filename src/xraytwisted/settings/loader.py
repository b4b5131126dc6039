"""Loading settings: finding cfg.yaml, CLI > file > defaults, validation.

Pure logic, no reactor.  The table of settings is
``xraytwisted.settings.table``; reading the
file is ``xraytwisted.settings.cfg_yaml``.  The file rules and error messages follow
the Go daemon 3.6 (which reads cfg.yaml with gopkg.in/yaml.v2) so existing
cfg.yaml files and scripts keep working.

Deliberate differences from the Go daemon:

* with ``-c`` the auto-discovered files are not read at all (Go merges them
  first, so a broken /etc/amazon/xray/cfg.yaml kills it even with ``-c``);
* negative Concurrency / TotalBufferSizeMB and unknown log levels are errors;
* our extension keys (``go=False``) pass strict validation and their values
  are used as given (no "zero means default");
* a number with a fraction for an integer key is an error (yaml.v2 truncates
  it), and the file may be at most ``cfg_yaml.MAX_FILE_BYTES`` long;
* every message is a single line (yaml.v2 puts each type error on its own).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

from xraytwisted.aws import endpoints
from xraytwisted.settings.table import (
    KEYS_BY_ATTR,
    LOG_LEVELS,
    MAX_UDP_RECEIVE_BUFFER_KB,
    MIN_BUFFER_MB,
    ConfigError,
    Settings,
)
from xraytwisted.tcpport import operations

# Where the Go daemon looks when no -c is given (its third, repository-
# relative path is a build artefact and is not searched here).
SEARCH_PATHS = ("/etc/amazon/xray/cfg.yaml", "cfg.yaml")
# OTLP.HoldMB must fit the largest body on the wire (5 MB plus gzip's overhead).
MIN_OTLP_HOLD_MB = 5


# ---------------------------------------------------------------------------
# Finding and loading the file


def find_config_file(
    explicit: str | None, search: Iterable[str] = SEARCH_PATHS
) -> tuple[str | None, bool]:
    """Which file to load and whether it gets strict validation.

    With -c only that file is read (the Go daemon also merges an auto-
    discovered file first, so a broken /etc/amazon/xray/cfg.yaml kills it
    even with -c given; we do not copy that).  ``-c ""`` counts as no -c, as
    in Go.  Like Go, a search path that exists but cannot be read (or is a
    directory) is an error rather than silently skipped.
    """
    if explicit:
        return explicit, True
    for candidate in search:
        try:
            os.stat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError:
            pass
        return candidate, False
    return None, False


def load(explicit: str | None, search: Iterable[str] = SEARCH_PATHS) -> dict[str, Any]:
    """The typed values of the file that applies (empty when there is none)."""
    path, strict = find_config_file(explicit, search)
    if path is None:
        return {}
    # The YAML reader (and PyYAML) is imported only when there is a file.
    from xraytwisted.settings import cfg_yaml

    try:
        document = cfg_yaml.read_document(path)
        if strict:
            keys = cfg_yaml.flatten_with_lines(document)
            cfg_yaml.validate_strict([name for name, _ in keys], dict(keys))
        values = cfg_yaml.file_values(document)
    except ConfigError as e:
        if path in e.go_text:  # "open cfg.yaml: no such file or directory"
            raise
        # Go's text names neither the file nor the key: say which file.
        where = f"in {path}"
        hint = f"{where}{' ' if e.hint.startswith('line ') else ': '}{e.hint}" if e.hint else where
        raise ConfigError(e.go_text, hint) from None
    values["config_path"] = path
    return values


# ---------------------------------------------------------------------------
# Merging and validating the result


def resolve(file: Mapping[str, Any], cli: Mapping[str, Any]) -> Settings:
    """defaults < file < command line, then semantic validation."""
    merged: dict[str, Any] = {}
    merged.update(file)
    merged.update(cli)
    try:
        settings = Settings(**merged)
    except TypeError as e:  # pragma: no cover - callers only pass known attrs
        raise ConfigError(str(e)) from None
    validate(settings)
    return settings


def validate(s: Settings) -> None:
    """Reject values the daemon cannot run with, saying what to change."""
    if s.log_level not in LOG_LEVELS:
        raise ConfigError(
            f"Invalid log level {s.log_level!r}: use one of {', '.join(LOG_LEVELS)} "
            "(-l/--log-level or Logging.LogLevel)"
        )
    if s.buffer_memory_mb < 0:
        raise ConfigError(
            f"Invalid buffer memory {s.buffer_memory_mb} MB: use 0 for automatic, "
            f"or at least {MIN_BUFFER_MB} (-m/--buffer-memory or TotalBufferSizeMB)"
        )
    if 0 < s.buffer_memory_mb < MIN_BUFFER_MB:
        raise ConfigError(
            f"Not enough Buffers Memory Allocated. Min Buffers Memory required: {MIN_BUFFER_MB} MB."
        )
    if s.concurrency < 1:
        raise ConfigError(
            f"Invalid Concurrency {s.concurrency}: at least 1 upload must be allowed "
            "(--concurrency or Concurrency)"
        )
    for attr in (
        "request_timeout",
        "shutdown_timeout",
        "proxy_timeout",
        "proxy_client_timeout",
        "proxy_request_deadline",
        "unhealthy_after",
        "otlp_request_deadline",
    ):
        value = getattr(s, attr)
        if not (math.isfinite(value) and value > 0):
            raise _invalid(attr, value, "must be a positive number of seconds")
    for attr in ("telemetry_interval", "spool_after", "stream_idle_timeout"):
        value = getattr(s, attr)
        if not (math.isfinite(value) and value >= 0):
            raise _invalid(attr, value, "must be 0 or more seconds")
    for attr in ("stream_max_line_kb", "proxy_max_body_kb", "proxy_max_concurrent", "spool_max_mb"):
        if getattr(s, attr) < 1:
            raise _invalid(attr, getattr(s, attr), "must be at least 1")
    if s.otlp_max_connections < 1:
        raise _invalid("otlp_max_connections", s.otlp_max_connections, "must be at least 1")
    if s.otlp_hold_mb < MIN_OTLP_HOLD_MB:
        raise _invalid(
            "otlp_hold_mb",
            s.otlp_hold_mb,
            f"must be at least {MIN_OTLP_HOLD_MB}: room for one of the largest bodies "
            "X-Ray takes (5 MB)",
        )
    for attr in ("tcp_max_connections", "tcp_max_connections_per_peer", "tcp_hold_kb"):
        if getattr(s, attr) < 0:
            raise _invalid(attr, getattr(s, attr), "must be 0 (automatic) or more")
    largest = max(s.stream_max_line_kb, s.proxy_max_body_kb)
    if 0 < s.tcp_hold_kb < largest:
        raise _invalid(
            "tcp_hold_kb",
            s.tcp_hold_kb,
            f"must hold at least one of the longest lines or bodies allowed ({largest} KB: "
            "Socket.StreamMaxLineKB, SamplingProxy.MaxBodyKB), or be 0 (automatic)",
        )
    try:
        operations.parse_allow(s.proxy_allow)
    except ValueError as e:
        raise _invalid("proxy_allow", repr(s.proxy_allow), str(e)) from None
    if not 0 <= s.udp_receive_buffer_kb <= MAX_UDP_RECEIVE_BUFFER_KB:
        raise ConfigError(
            f"Invalid Socket.UDPReceiveBufferKB {s.udp_receive_buffer_kb}: use 0 to keep "
            f"the OS default, or at most {MAX_UDP_RECEIVE_BUFFER_KB}"
        )
    if not (math.isfinite(s.udp_read_interval_ms) and 0 <= s.udp_read_interval_ms <= 1000):
        raise _invalid(
            "udp_read_interval_ms", s.udp_read_interval_ms, "must be 0 to 1000 milliseconds"
        )
    if not (math.isfinite(s.local_sampling_rate) and 0 <= s.local_sampling_rate <= 1):
        raise _invalid("local_sampling_rate", s.local_sampling_rate, "must be from 0 to 1")
    if s.proxy_address and "://" not in s.proxy_address:
        raise ConfigError(
            f"Bad proxy URL: {s.proxy_address!r} has no scheme; write it as http://host:port"
        )
    if s.endpoint:
        try:
            endpoints.parse(s.endpoint)
        except endpoints.EndpointError as e:
            raise ConfigError(str(e)) from None


def _invalid(attr: str, value: object, rule: str) -> ConfigError:
    """'Invalid <Key> <value>: <rule> (set with --flag or <Key> in cfg.yaml)'."""
    key = KEYS_BY_ATTR[attr]
    where = f"--{key.long} or {key.name}" if key.long else key.name
    return ConfigError(f"Invalid {key.name} {value}: {rule} (set with {where})")
