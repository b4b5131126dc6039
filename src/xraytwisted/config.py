"""Configuration: defaults, cfg.yaml loading and validation, CLI > file > defaults.

Pure logic, no reactor.  One table (``KEYS``) describes every setting: its
cfg.yaml key, type, default, command-line flags and help text.  The file
rules and error messages follow the Go daemon 3.6 (which reads cfg.yaml with
gopkg.in/yaml.v2) so existing cfg.yaml files and scripts keep working.

Deliberate differences from the Go daemon:

* with ``-c`` the auto-discovered files are not read at all (Go merges them
  first, so a broken /etc/amazon/xray/cfg.yaml kills it even with ``-c``);
* negative Concurrency / TotalBufferSizeMB and unknown log levels are errors;
* our extension keys (``go=False``) pass strict validation and their values
  are used as given (no "zero means default");
* a number with a fraction for an integer key is an error (yaml.v2 truncates
  it), and the file may be at most ``MAX_FILE_BYTES`` long;
* every message is a single line (yaml.v2 puts each type error on its own).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from xraytwisted import endpoints

# Where the Go daemon looks when no -c is given (its third, repository-
# relative path is a build artefact and is not searched here).
SEARCH_PATHS = ("/etc/amazon/xray/cfg.yaml", "cfg.yaml")

LOG_LEVELS = ("dev", "debug", "info", "warn", "error", "prod")
MIN_BUFFER_MB = 3
# A cfg.yaml is a few hundred bytes; this only stops -c /dev/zero.
MAX_FILE_BYTES = 1024 * 1024
# Linux takes SO_RCVBUF as a C int (and doubles it).
MAX_UDP_RECEIVE_BUFFER_KB = (2**31 - 1) // 2 // 1024

_DOCS = "Please refer to AWS X-Ray Documentation for more information."
_MIGRATE = "Use X-Ray Daemon Config Migration Script to update the config file. " + _DOCS
_PREFIX = "Error occur when using config flag: "


class ConfigError(Exception):
    """A configuration problem; str() is the one line shown to the user."""


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
    Key("Socket.StreamMaxLineKB", "stream_max_line_kb", "int", 1024,
        "Longest line accepted on the TCP segment stream, in KiB; a longer line closes "
        "that connection.", None, "stream-max-line", go=False, metavar="KB"),
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
    Key("Telemetry.IntervalSeconds", "telemetry_interval", "float", 60.0,
        "Seconds between PutTelemetryRecords calls (0 turns telemetry off).",
        None, "telemetry-interval", go=False, metavar="SECONDS"),
    Key("Monitoring.Address", "monitoring_address", "str", "",
        "Also serve /health and /metrics on this address (always served on the TCP port).",
        None, "monitoring-address", go=False, metavar="ADDR"),
    Key("Monitoring.UnhealthyAfterSeconds", "unhealthy_after", "float", 120.0,
        "/health answers 503 once segments have waited this long with no successful upload.",
        None, "unhealthy-after", go=False, metavar="SECONDS"),
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
)  # fmt: skip

KEYS_BY_NAME: Mapping[str, Key] = {k.name: k for k in KEYS}
KEYS_BY_ATTR: Mapping[str, Key] = {k.attr: k for k in KEYS}
# Mappings in cfg.yaml ("Socket", "Logging") and the keys directly under them.
_PARENTS: frozenset[str] = frozenset(k.name.split(".")[0] for k in KEYS if "." in k.name)

# The Go daemon's ProxyServer struct has no yaml tags, so yaml.v2 knows it by
# its lower-cased field names: a strict (-c) file may contain these keys, they
# must be ints, and the Go daemon then replaces their values with built-in
# defaults.  We accept and ignore them the same way.
_PROXY_SERVER = "proxyserver"
_IGNORED_KEYS = frozenset(
    {"proxyserver.idleconntimeout", "proxyserver.maxidleconnsperhost", "proxyserver.maxidleconns"}
)
_NO_LONGER_SUPPORTED = frozenset(
    {
        "Profile.CPU",
        "Profile.Memory",
        "Socket.BufferSizeKB",
        "Logging.LogFormat",
        "Processor.BatchProcessorQueueSize",
    }
)
_NOT_SUPPORTED = frozenset(
    {"LogRotation", "Processor.Region", "Processor.Endpoint", "Processor.Routine", "MemoryLimit"}
)


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
    stream_max_line_kb: int = 1024
    proxy_max_body_kb: int = 1024
    proxy_timeout: float = 10.0
    proxy_client_timeout: float = 30.0
    proxy_max_concurrent: int = 64
    telemetry_interval: float = 60.0
    monitoring_address: str = ""
    unhealthy_after: float = 120.0
    spool_dir: str = ""
    spool_max_mb: int = 1024
    spool_after: float = 10.0
    local_sink: str = ""
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


# ---------------------------------------------------------------------------
# Reading cfg.yaml the way gopkg.in/yaml.v2 does

_PLAIN = "!xraytwisted/plain"  # an untagged, unquoted scalar: resolved below
_STR_TAG = "tag:yaml.org,2002:str"
_YAML_TAGS = {
    "tag:yaml.org,2002:null": "!!null",
    "tag:yaml.org,2002:bool": "!!bool",
    "tag:yaml.org,2002:int": "!!int",
    "tag:yaml.org,2002:float": "!!float",
    "tag:yaml.org,2002:timestamp": "!!timestamp",
    _STR_TAG: "!!str",
}


class _Loader(yaml.SafeLoader):
    """Composes node trees, leaving plain scalars for yaml.v2-style resolution."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0]:
            return _PLAIN
        return super().resolve(kind, value, implicit)


_NULLS = frozenset({"", "~", "null", "Null", "NULL"})
_TRUE_WORDS = ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")
_FALSE_WORDS = ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")
_BOOLS = {**dict.fromkeys(_TRUE_WORDS, True), **dict.fromkeys(_FALSE_WORDS, False)}
_SPECIAL_FLOATS = {
    **dict.fromkeys((".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF"), math.inf),
    **dict.fromkeys(("-.inf", "-.Inf", "-.INF"), -math.inf),
    **dict.fromkeys((".nan", ".NaN", ".NAN"), math.nan),
}
_YAML_FLOAT = re.compile(r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?")
# The layouts yaml.v2 tries: date, "date time", and "dateTtime" with a zone.
_TIMESTAMP = re.compile(
    r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}"
    r"([Tt][0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\.[0-9]+)?(Z|[-+][0-9]{2}:[0-9]{2})"
    r"| [0-9]{1,2}:[0-9]{1,2}:[0-9]{1,2}(\.[0-9]+)?)?"
)


def _resolve_plain(text: str) -> tuple[str, Any]:
    """yaml.v2's resolve() for an untagged plain scalar: (short tag, value)."""
    if text in _NULLS:
        return "!!null", None
    if text in _BOOLS:
        return "!!bool", _BOOLS[text]
    if text in _SPECIAL_FLOATS:
        return "!!float", _SPECIAL_FLOATS[text]
    if text[0].isascii() and (text[0].isdigit() or text[0] in "+-."):
        if _TIMESTAMP.fullmatch(text):
            return "!!timestamp", text
        plain = text.replace("_", "")
        try:
            return "!!int", parse_go_int(plain)
        except ValueError:
            pass
        try:  # ParseUint: values between 2**63 and 2**64 - 1
            value = parse_go_int(plain, 65)
            if value >= 0:
                return "!!int", value
        except ValueError:
            pass
        if _YAML_FLOAT.fullmatch(plain):
            return "!!float", float(plain)
    return "!!str", text


def _resolve_scalar(node: yaml.ScalarNode) -> tuple[str, Any]:
    if node.tag == _PLAIN:
        return _resolve_plain(node.value)
    if node.tag == _STR_TAG:
        return "!!str", node.value
    short = _YAML_TAGS.get(node.tag)
    if short is None:  # some other explicit tag: a string as far as we care
        return node.tag, node.value
    tag, value = _resolve_plain(node.value) if node.value else ("!!null", None)
    if tag != short and not (short == "!!float" and tag == "!!int"):
        raise ConfigError(f"{_PREFIX}yaml: cannot decode {tag} `{node.value}` as a {short}")
    if short == "!!float" and value is not None:
        value = float(value)
    return short, value


def read_document(path: str) -> yaml.Node | None:
    """The first YAML document of ``path`` as a node tree (None when empty)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(_PREFIX + _go_os_error(path, e)) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{_PREFIX}read {path}: file is larger than {MAX_FILE_BYTES} bytes")
    try:
        # yaml.v2 reads only the first document, as does this.
        return next(iter(yaml.compose_all(raw, Loader=_Loader)), None)
    except yaml.YAMLError as e:
        raise ConfigError(_PREFIX + _yaml_error(e)) from None
    except RecursionError:
        raise ConfigError(f"{_PREFIX}yaml: the document is nested too deeply") from None


def _go_os_error(path: str, e: OSError) -> str:
    # Go's ReadFile opens a directory fine and fails on read().
    op = "read" if e.errno == errno.EISDIR else "open"
    reason = os.strerror(e.errno) if e.errno else str(e)
    return f"{op} {path}: {reason[:1].lower()}{reason[1:]}"


def _yaml_error(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None and e.problem:
        return f"yaml: line {e.problem_mark.line + 1}: {e.problem}"
    if isinstance(e, yaml.reader.ReaderError):
        char = e.character if isinstance(e.character, int) else ord(e.character[:1] or "\0")
        if e.encoding == "unicode":
            return f"yaml: control characters are not allowed (#x{char:04x} at offset {e.position})"
        return f"yaml: invalid {e.encoding} byte #x{char:02x} at offset {e.position}: {e.reason}"
    return "yaml: " + " ".join(str(e).split())


def _pairs(mapping: yaml.MappingNode) -> Iterator[tuple[yaml.Node, yaml.Node]]:
    """A mapping's (key, value) nodes in file order, with ``<<`` merges expanded."""
    for key, value in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == _PLAIN and key.value == "<<":
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for source in sources:
                if isinstance(source, yaml.MappingNode):
                    yield from _pairs(source)
            continue
        yield key, value


def _key_text(node: yaml.Node) -> str:
    """A key as Go prints it (fmt.Sprint of the decoded key)."""
    if isinstance(node, yaml.ScalarNode):
        tag, value = _resolve_plain(node.value) if node.tag == _PLAIN else ("!!str", node.value)
        if tag == "!!null":
            return "<nil>"
        if tag == "!!bool":
            return "true" if value else "false"
        if tag == "!!int":
            return str(value)
        return str(node.value)
    return "?"


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _type_error(node: yaml.Node, into: str, tag: str | None = None) -> str:
    """One yaml.v2 "cannot unmarshal" error (d.terror), long values shortened like Go."""
    if isinstance(node, yaml.MappingNode):
        what = "!!map"
    elif not isinstance(node, yaml.ScalarNode):
        what = "!!seq"
    else:
        text = str(node.value)
        text = text[:7] + "..." if len(text) > 10 else text
        what = f"{tag or _resolve_scalar(node)[0]} `{text}`"
    return f"line {_line(node)}: cannot unmarshal {what} into {into}"


def _unmarshal_errors(errors: list[str]) -> ConfigError:
    return ConfigError(f"{_PREFIX}yaml: unmarshal errors: {'; '.join(errors)}")


def flatten(document: yaml.Node | None) -> list[str]:
    """The file's keys, one level deep, in file order (Go's configFlagArray).

    A key whose value is null, a scalar or a list stays as is (``Socket:``
    with nothing under it gives "Socket"); a mapping gives "Parent.Child" for
    each child, so ``Socket: {}`` gives nothing at all.
    """
    if document is None:
        return []
    if not isinstance(document, yaml.MappingNode):
        if isinstance(document, yaml.ScalarNode) and _resolve_scalar(document)[0] == "!!null":
            return []
        raise _unmarshal_errors([_type_error(document, "yaml.MapSlice")])
    names: list[str] = []
    for key, value in _pairs(document):
        name = _key_text(key)
        if isinstance(value, yaml.MappingNode):
            names.extend(f"{name}.{_key_text(child)}" for child, _ in _pairs(value))
        else:
            names.append(name)
    return names


def validate_strict(names: Iterable[str]) -> None:
    """The Go daemon's key check for a file named with -c (ConfigValidation)."""
    names = list(names)
    if names and "Version" not in names:
        raise ConfigError(f"Config Version is missing. {_MIGRATE}")
    for name in names:
        if name in KEYS_BY_NAME or name in _IGNORED_KEYS:
            continue
        if name in _NO_LONGER_SUPPORTED:
            raise ConfigError(f"{name} flag is not supported any more. {_DOCS}")
        if name in _NOT_SUPPORTED:
            raise ConfigError(f"{name} flag is not supported. {_MIGRATE}")
        raise ConfigError(f"{name} flag is invalid. {_DOCS}")


_GO_TYPES = {"int": "int", "float": "float64", "bool": "bool", "str": "string"}


def _decode_value(kind: Kind, node: yaml.Node, errors: list[str]) -> Any:
    """One value the way yaml.v2 decodes it into a Go field; None means null."""
    if isinstance(node, yaml.ScalarNode):
        tag, value = _resolve_scalar(node)
        if tag == "!!null":
            return None
        if kind == "str":
            return node.value  # yaml.v2 keeps the text of any scalar for a string
        if kind == "bool" and tag == "!!bool":
            return value
        if kind == "int":
            if tag == "!!int" and -(2**63) <= value < 2**63:
                return value
            if (
                tag == "!!float"
                and math.isfinite(value)
                and value.is_integer()
                and -(2**63) <= value < 2**63
            ):
                return int(value)
        if kind == "float" and tag in ("!!int", "!!float"):
            return float(value)
        errors.append(_type_error(node, _GO_TYPES[kind], tag))
        return None
    errors.append(_type_error(node, _GO_TYPES[kind]))
    return None


def decode(document: yaml.Node | None) -> dict[str, Any]:
    """The typed values of the known keys (yaml.v2 into the Go Config struct).

    Unknown keys are ignored (strict checking is validate_strict's job);
    nulls are left out.  Type errors are collected and reported together.
    """
    if document is None:
        return {}
    if not isinstance(document, yaml.MappingNode):
        if isinstance(document, yaml.ScalarNode) and _resolve_scalar(document)[0] == "!!null":
            return {}
        raise _unmarshal_errors([_type_error(document, "cfg.Config")])
    values: dict[str, Any] = {}
    errors: list[str] = []
    for key_node, value_node in _pairs(document):
        name = _key_text(key_node)
        if name in _PARENTS or name == _PROXY_SERVER:
            if isinstance(value_node, yaml.ScalarNode):
                if _resolve_scalar(value_node)[0] != "!!null":
                    errors.append(_type_error(value_node, f"the {name} struct"))
                continue
            if not isinstance(value_node, yaml.MappingNode):
                errors.append(_type_error(value_node, f"the {name} struct"))
                continue
            for child_node, child_value in _pairs(value_node):
                full = f"{name}.{_key_text(child_node)}"
                if full in _IGNORED_KEYS:
                    _decode_value("int", child_value, errors)
                    continue
                key = KEYS_BY_NAME.get(full)
                if key is not None:
                    value = _decode_value(key.kind, child_value, errors)
                    if value is not None:
                        values[key.attr] = value
            continue
        key = KEYS_BY_NAME.get(name)
        if key is None or "." in name:
            continue
        value = _decode_value(key.kind, value_node, errors)
        if value is not None:
            values[key.attr] = value
    if errors:
        raise _unmarshal_errors(errors)
    return values


def file_values(document: yaml.Node | None) -> dict[str, Any]:
    """Typed values for the known keys of a file, after the Go merge rules.

    A missing key or a null means "use the default", and for the Go daemon's
    own keys so do an empty string and a zero number (so ``Concurrency: 0``
    means 8).  Our extension keys keep the value as given.  The Version check
    applies to every file.
    """
    decoded = decode(document)
    version = decoded.pop("version", 0)
    if version not in (1, 2):
        raise ConfigError(f"Config Version Setting is not correct. {_MIGRATE}")
    values: dict[str, Any] = {}
    for attr, value in decoded.items():
        key = KEYS_BY_ATTR[attr]
        if key.go and key.kind != "bool" and not value:
            continue
        values[attr] = value
    values["version"] = version
    return values


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
    document = read_document(path)
    if strict:
        validate_strict(flatten(document))
    values = file_values(document)
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
        "unhealthy_after",
    ):
        value = getattr(s, attr)
        if not (math.isfinite(value) and value > 0):
            raise _invalid(attr, value, "must be a positive number of seconds")
    for attr in ("telemetry_interval", "spool_after"):
        value = getattr(s, attr)
        if not (math.isfinite(value) and value >= 0):
            raise _invalid(attr, value, "must be 0 or more seconds")
    for attr in ("stream_max_line_kb", "proxy_max_body_kb", "proxy_max_concurrent", "spool_max_mb"):
        if getattr(s, attr) < 1:
            raise _invalid(attr, getattr(s, attr), "must be at least 1")
    if not 0 <= s.udp_receive_buffer_kb <= MAX_UDP_RECEIVE_BUFFER_KB:
        raise ConfigError(
            f"Invalid Socket.UDPReceiveBufferKB {s.udp_receive_buffer_kb}: use 0 to keep "
            f"the OS default, or at most {MAX_UDP_RECEIVE_BUFFER_KB}"
        )
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
