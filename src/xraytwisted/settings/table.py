"""The settings table: every setting's cfg.yaml key, type, default, flags and help.

Pure logic, no reactor.  One table (``KEYS``) describes every setting; the
``Settings`` object holds the resolved values; ``parse_go_int`` reads integers
the way Go's strconv does.  Finding, reading and merging the sources is
``xraytwisted.settings.loader``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

LOG_LEVELS = ("dev", "debug", "info", "warn", "error", "prod")
MIN_BUFFER_MB = 3
# Linux takes SO_RCVBUF as a C int (and doubles it).
MAX_UDP_RECEIVE_BUFFER_KB = (2**31 - 1) // 2 // 1024


class ConfigError(Exception):
    """A configuration problem; str() is the one line shown to the user.

    ``go_text`` is the Go daemon's wording where it has one (scripts grep
    it, so it comes first); ``hint`` says where and what to do, after it.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.go_text = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.go_text} ({self.hint})" if self.hint else self.go_text


Kind = Literal["int", "float", "str", "bool"]


@dataclass(frozen=True)
class Key:
    """One setting: where it lives in cfg.yaml and on the command line."""

    name: str  # cfg.yaml key, "Parent.Child" for nested ones
    attr: str  # Settings attribute
    kind: Kind
    default: Any
    help: str
    short: str | None = None  # one-letter flag, as in the Go daemon
    long: str | None = None  # long flag; None = file only
    go: bool = True  # the Go daemon has this key
    metavar: str = ""


KEYS: tuple[Key, ...] = (
    Key("ResourceARN", "resource_arn", "str", "",
        "Amazon Resource Name (ARN) of the AWS resource running the daemon.",
        "a", "resource-arn", metavar="ARN"),
    Key("LocalMode", "local_mode", "bool", False,
        "Don't check for EC2 instance metadata.", "o", "local-mode"),
    Key("TotalBufferSizeMB", "buffer_memory_mb", "int", 0,
        "Change the amount of memory in MB that buffers can use (minimum 3; "
        "0 = 1% of the memory available to the daemon).", "m", "buffer-memory", metavar="MB"),
    Key("Region", "region", "str", "",
        "Send segments to X-Ray service in a specific region.", "n", "region", metavar="REGION"),
    Key("Socket.UDPAddress", "udp_address", "str", "127.0.0.1:2000",
        "Overrides default UDP address (127.0.0.1:2000).", "b", "bind", metavar="ADDR"),
    Key("Socket.TCPAddress", "tcp_address", "str", "127.0.0.1:2000",
        "Overrides default TCP address (127.0.0.1:2000).", "t", "bind-tcp", metavar="ADDR"),
    Key("RoleARN", "role_arn", "str", "",
        "Assume the specified IAM role to upload segments to a different account.",
        "r", "role-arn", metavar="ARN"),
    Key("Logging.LogPath", "log_path", "str", "",
        "Output logs to the specified file path.", "f", "log-file", metavar="PATH"),
    Key("Logging.LogLevel", "log_level", "str", "prod",
        "Log level, from most verbose to least: dev, debug, info, warn, error, prod (default).",
        "l", "log-level", metavar="LEVEL"),
    Key("ProxyAddress", "proxy_address", "str", "",
        "Proxy address through which to upload segments (http://host:port).",
        "p", "proxy-address", metavar="URL"),
    Key("Endpoint", "endpoint", "str", "",
        "X-Ray service endpoint URL to upload segments to and proxy sampling calls to.",
        "e", "endpoint", metavar="URL"),
    Key("Concurrency", "concurrency", "int", 8,
        "Maximum number of concurrent uploads to X-Ray.", None, "concurrency", metavar="N"),
    Key("NoVerifySSL", "no_verify_ssl", "bool", False,
        "Disable TLS certificate verification (insecure).", None, "no-verify-ssl"),
    Key("Logging.LogRotation", "log_rotation", "bool", True,
        "Rotate the log file at 50 MiB, keeping one old file (false: never rotate).",
        None, "log-rotation"),
    Key("Version", "version", "int", 1, "Config file format version (1 or 2)."),
    Key("RequestTimeoutSeconds", "request_timeout", "float", 5.0,
        "Seconds an upload request to X-Ray may take before it is abandoned.",
        None, "request-timeout", go=False, metavar="SECONDS"),
    Key("ShutdownTimeoutSeconds", "shutdown_timeout", "float", 20.0,
        "Seconds to keep uploading buffered segments after SIGTERM/SIGINT before exiting.",
        None, "shutdown-timeout", go=False, metavar="SECONDS"),
    Key("Socket.UDPReceiveBufferKB", "udp_receive_buffer_kb", "int", 16384,
        "Kernel receive buffer (SO_RCVBUF) asked for the UDP socket, in KiB.",
        None, "udp-receive-buffer", go=False, metavar="KB"),
    Key("Socket.UDPReadIntervalMS", "udp_read_interval_ms", "float", 20.0,
        "While datagrams keep coming, read the UDP socket at most every this many "
        "milliseconds rather than on each datagram (the shortest pause; with "
        "Socket.UDPReadAdaptive false, the pause); 0: on every event-loop turn.",
        None, "udp-read-interval", go=False, metavar="MS"),
    Key("Socket.UDPReadAdaptive", "udp_read_adaptive", "bool", True,
        "Pause longer between UDP reads when segments come slowly: until a batch is "
        "expected to be full, within the batch deadline and the receive buffer.",
        None, "udp-read-adaptive", go=False),
    Key("Socket.StreamMaxLineKB", "stream_max_line_kb", "int", 1024,
        "Longest line accepted on the TCP segment stream, in KiB; a longer line closes "
        "that connection.", None, "stream-max-line", go=False, metavar="KB"),
    Key("Socket.StreamIdleTimeoutSeconds", "stream_idle_timeout", "float", 300.0,
        "Seconds a TCP segment stream may send nothing before it is closed (0: never).",
        None, "stream-idle-timeout", go=False, metavar="SECONDS"),
    Key("Socket.TCPMaxConnections", "tcp_max_connections", "int", 0,
        "Most connections open on the TCP port at once; more are closed at once "
        "(0: what the descriptor limit leaves room for, at most 1024).",
        None, "tcp-max-connections", go=False, metavar="N"),
    Key("Socket.TCPMaxConnectionsPerPeer", "tcp_max_connections_per_peer", "int", 0,
        "Most connections one client address may hold open on the TCP port "
        "(0: a quarter of the total, at least 64).",
        None, "tcp-max-connections-per-peer", go=False, metavar="N"),
    Key("Socket.TCPHoldKB", "tcp_hold_kb", "int", 0,
        "KiB the TCP port may hold in unfinished stream lines and request bodies, all "
        "connections together (0: 4096, or twice the longest line or body if more).",
        None, "tcp-hold", go=False, metavar="KB"),
    Key("SamplingProxy.MaxBodyKB", "proxy_max_body_kb", "int", 1024,
        "Largest request body the sampling proxy accepts, in KiB (larger: HTTP 413).",
        None, "proxy-max-body", go=False, metavar="KB"),
    Key("SamplingProxy.TimeoutSeconds", "proxy_timeout", "float", 10.0,
        "Seconds the sampling proxy waits for X-Ray before answering 504.",
        None, "proxy-timeout", go=False, metavar="SECONDS"),
    Key("SamplingProxy.ClientTimeoutSeconds", "proxy_client_timeout", "float", 30.0,
        "Seconds a client on the TCP port may stay idle before it is disconnected.",
        None, "proxy-client-timeout", go=False, metavar="SECONDS"),
    Key("SamplingProxy.MaxConcurrentRequests", "proxy_max_concurrent", "int", 64,
        "Proxied requests allowed in flight at once (more: HTTP 503).",
        None, "proxy-max-concurrent", go=False, metavar="N"),
    Key("SamplingProxy.RequestDeadlineSeconds", "proxy_request_deadline", "float", 10.0,
        "Seconds a client on the TCP port has to send a whole HTTP request, headers and "
        "body, from its first byte (later: HTTP 408).",
        None, "proxy-request-deadline", go=False, metavar="SECONDS"),
    Key("SamplingProxy.Allow", "proxy_allow", "str", "",
        "More X-Ray API calls to sign and forward besides GetSamplingRules and "
        "SamplingTargets: paths or operation names, comma-separated (* for all).",
        None, "proxy-allow", go=False, metavar="PATH,..."),
    Key("SamplingProxy.AllowedHosts", "proxy_allowed_hosts", "str", "",
        "Host header values the sampling proxy answers, comma-separated, host or host:port "
        "(empty: any); guards against DNS rebinding.",
        None, "proxy-allowed-hosts", go=False, metavar="HOST,..."),
    Key("Telemetry.IntervalSeconds", "telemetry_interval", "float", 60.0,
        "Seconds between PutTelemetryRecords calls (0 turns telemetry off).",
        None, "telemetry-interval", go=False, metavar="SECONDS"),
    Key("Socket.OTLPAddress", "otlp_address", "str", "",
        "Receive OpenTelemetry spans (OTLP/HTTP, POST /v1/traces) on this address, e.g. "
        "127.0.0.1:4318, and send them to X-Ray's OTLP endpoint (off if empty).",
        None, "otlp-address", go=False, metavar="ADDR"),
    Key("OTLP.Gzip", "otlp_gzip", "bool", True,
        "Gzip span uploads to X-Ray (about 4x smaller, ~8 ms of CPU per MB).",
        None, "otlp-gzip", go=False),
    Key("OTLP.MaxConnections", "otlp_max_connections", "int", 64,
        "OTLP/HTTP connections allowed open at once (more are closed on arrival).",
        None, "otlp-max-connections", go=False, metavar="N"),
    Key("OTLP.RequestDeadlineSeconds", "otlp_request_deadline", "float", 30.0,
        "Seconds an OTLP/HTTP request's headers and body may take to arrive (then 408).",
        None, "otlp-request-deadline", go=False, metavar="SECONDS"),
    Key("OTLP.HoldMB", "otlp_hold_mb", "int", 16,
        "MiB of OTLP/HTTP request bodies still arriving that the daemon holds, all "
        "connections together (more: HTTP 503); at least 5, one largest body.",
        None, "otlp-hold", go=False, metavar="MB"),
    Key("Monitoring.Address", "monitoring_address", "str", "",
        "Also serve /health and /metrics on this address (always served on the TCP port).",
        None, "monitoring-address", go=False, metavar="ADDR"),
    Key("Monitoring.UnhealthyAfterSeconds", "unhealthy_after", "float", 120.0,
        "/health answers 503 once segments have waited this long with no successful upload.",
        None, "unhealthy-after", go=False, metavar="SECONDS"),
    Key("Monitoring.ShowIdentity", "monitoring_show_identity", "bool", False,
        "Show AWS account ids and ARNs in /health (hidden by default: the TCP port has "
        "no authentication).", None, "monitoring-show-identity", go=False),
    Key("Spool.Dir", "spool_dir", "str", "",
        "Directory for an on-disk spool of batches that cannot be uploaded yet (off if empty).",
        None, "spool-dir", go=False, metavar="DIR"),
    Key("Spool.MaxMB", "spool_max_mb", "int", 1024,
        "Disk space the spool may use, in MB; beyond it the oldest spooled data is dropped.",
        None, "spool-max-mb", go=False, metavar="MB"),
    Key("Spool.AfterSeconds", "spool_after", "float", 10.0,
        "Seconds uploads must keep failing before batches are moved to the spool.",
        None, "spool-after", go=False, metavar="SECONDS"),
    Key("LocalSink", "local_sink", "str", "",
        "Write segments as JSON Lines to PATH (- for stdout) instead of uploading them; "
        "no region or credentials needed, sampling is answered locally.",
        None, "local-sink", go=False, metavar="PATH"),
    Key("LocalSampling.FixedRate", "local_sampling_rate", "float", 1.0,
        "With --local-sink: share of requests sampled beyond the first each second "
        "(1 = every request; 0.05 = X-Ray's default rule).",
        None, "local-sampling-rate", go=False, metavar="RATE"),
    Key("LocalSampling.RulesFile", "local_sampling_rules", "str", "",
        "With --local-sink: answer sampling with the rules in this JSON file "
        "(GetSamplingRules format, as `aws xray get-sampling-rules` prints it).",
        None, "local-sampling-rules", go=False, metavar="PATH"),
)  # fmt: skip

KEYS_BY_NAME: Mapping[str, Key] = {k.name: k for k in KEYS}
KEYS_BY_ATTR: Mapping[str, Key] = {k.attr: k for k in KEYS}


@dataclass(frozen=True)
class Settings:
    """The effective configuration (defaults < cfg.yaml < command line)."""

    resource_arn: str = ""
    local_mode: bool = False
    buffer_memory_mb: int = 0
    region: str = ""
    udp_address: str = "127.0.0.1:2000"
    tcp_address: str = "127.0.0.1:2000"
    role_arn: str = ""
    log_path: str = ""
    log_level: str = "prod"
    proxy_address: str = ""
    endpoint: str = ""
    concurrency: int = 8
    no_verify_ssl: bool = False
    log_rotation: bool = True
    version: int = 1
    request_timeout: float = 5.0
    shutdown_timeout: float = 20.0
    udp_receive_buffer_kb: int = 16384
    udp_read_interval_ms: float = 20.0
    udp_read_adaptive: bool = True
    stream_max_line_kb: int = 1024
    stream_idle_timeout: float = 300.0
    tcp_max_connections: int = 0
    tcp_max_connections_per_peer: int = 0
    tcp_hold_kb: int = 0
    proxy_max_body_kb: int = 1024
    proxy_timeout: float = 10.0
    proxy_client_timeout: float = 30.0
    proxy_max_concurrent: int = 64
    proxy_request_deadline: float = 10.0
    proxy_allow: str = ""
    proxy_allowed_hosts: str = ""
    telemetry_interval: float = 60.0
    otlp_address: str = ""
    otlp_gzip: bool = True
    otlp_max_connections: int = 64
    otlp_request_deadline: float = 30.0
    otlp_hold_mb: int = 16
    monitoring_address: str = ""
    unhealthy_after: float = 120.0
    monitoring_show_identity: bool = False
    spool_dir: str = ""
    spool_max_mb: int = 1024
    spool_after: float = 10.0
    local_sink: str = ""
    local_sampling_rate: float = 1.0
    local_sampling_rules: str = ""
    # Where the file values came from ("" = built-in defaults only).
    config_path: str = field(default="", compare=False)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def _check_table() -> None:
    # The dataclass defaults and the KEYS table must agree; checked once at
    # import so a mismatch can never ship silently.
    defaults = Settings()
    for key in KEYS:
        if getattr(defaults, key.attr) != key.default:  # pragma: no cover - programming error
            raise AssertionError(f"default of {key.name} differs from Settings.{key.attr}")


_check_table()


# ---------------------------------------------------------------------------
# Go's integer syntax (strconv.ParseInt with base 0), shared with the CLI


def _underscore_ok(s: str) -> bool:
    """Go's rule: '_' only between digits, or between a base prefix and a digit."""
    if s[:1] in ("+", "-"):
        s = s[1:]
    saw = "^"
    i = 0
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i, saw, hexa = 2, "0", s[1].lower() == "x"
    for ch in s[i:]:
        if ch.isascii() and (ch.isdigit() or (hexa and ch.lower() in "abcdef")):
            saw = "0"
        elif ch == "_":
            if saw != "0":
                return False
            saw = "_"
        elif saw == "_":
            return False
        else:
            saw = "!"
    return saw != "_"


def parse_go_int(text: str, bits: int = 64) -> int:
    """``strconv.ParseInt(text, 0, bits)``: sign, 0x/0o/0b/0 prefixes, '_' separators.

    Raises ValueError("parse error") or ValueError("value out of range"),
    the words Go's flag package prints.
    """
    if not text:
        raise ValueError("parse error")
    body = text
    negative = body[0] == "-"
    if body[0] in "+-":
        body = body[1:]
    if not body:
        raise ValueError("parse error")
    base = 10
    if body[0] == "0":
        if len(body) >= 3 and body[1].lower() in "box":
            base = {"b": 2, "o": 8, "x": 16}[body[1].lower()]
            body = body[2:]
        else:
            base, body = 8, body[1:]
    limit = 1 << (bits - 1)
    value = 0
    for ch in body:
        if ch == "_":
            continue
        digit = int(ch, 16) if ch.isascii() and ch in "0123456789abcdefABCDEF" else 99
        if digit >= base:
            raise ValueError("parse error")
        if value <= limit:  # past the limit only the syntax still matters
            value = value * base + digit
    if "_" in text and not _underscore_ok(text):
        raise ValueError("parse error")
    if (negative and value > limit) or (not negative and value >= limit):
        raise ValueError("value out of range")
    return -value if negative else value
