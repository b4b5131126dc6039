"""Reading cfg.yaml the way the Go daemon's gopkg.in/yaml.v2 does.

Pure logic, no reactor.  ``read_document`` composes the file's first YAML
document into a node tree; ``flatten`` + ``validate_strict`` are the Go
daemon's key check for a file named with ``-c``; ``file_values`` decodes the
known keys into typed values with the Go merge rules.  Plain scalars are
resolved like yaml.v2 (``on``/``yes`` are booleans, ``0x10`` is an int, ...)
and every error message is the one the Go daemon prints, on one line.

Imported by ``config.load`` only when there is a file to read, so a daemon
without a cfg.yaml does not carry PyYAML (~1 MB of resident memory).
"""

from __future__ import annotations

import difflib
import errno
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import yaml

from xraytwisted.settings.table import (
    KEYS,
    KEYS_BY_ATTR,
    KEYS_BY_NAME,
    ConfigError,
    Kind,
    parse_go_int,
)

# A cfg.yaml is a few hundred bytes; this only stops -c /dev/zero.
MAX_FILE_BYTES = 1024 * 1024
_DOCS = "Please refer to AWS X-Ray Documentation for more information."
_MIGRATE = "Use X-Ray Daemon Config Migration Script to update the config file. " + _DOCS
_PREFIX = "Error occur when using config flag: "


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


# One type error: Go's text, and what the value must be instead.
TypeError_ = tuple[str, str]


def _unmarshal_errors(errors: list[TypeError_]) -> ConfigError:
    return ConfigError(
        f"{_PREFIX}yaml: unmarshal errors: {'; '.join(go for go, _ in errors)}",
        "; ".join(hint for _, hint in errors if hint),
    )


_MUST_BE = {
    "int": "must be a whole number",
    "float": "must be a number",
    "bool": "must be true or false",
    "str": "must be a single value, not a list or a mapping",
}


def _shown_value(node: yaml.Node) -> str:
    return f", not `{node.value}`" if isinstance(node, yaml.ScalarNode) and node.value else ""


def _wrong_type(node: yaml.Node, kind: Kind, name: str, tag: str | None = None) -> TypeError_:
    return (
        _type_error(node, _GO_TYPES[kind], tag),
        f"{name} {_MUST_BE[kind]}{_shown_value(node)}",
    )


def flatten(document: yaml.Node | None) -> list[str]:
    """The file's keys, one level deep, in file order (Go's configFlagArray).

    A key whose value is null, a scalar or a list stays as is (``Socket:``
    with nothing under it gives "Socket"); a mapping gives "Parent.Child" for
    each child, so ``Socket: {}`` gives nothing at all.
    """
    return [name for name, _ in flatten_with_lines(document)]


def flatten_with_lines(document: yaml.Node | None) -> list[tuple[str, int]]:
    """``flatten``, with the line each key is on."""
    if document is None:
        return []
    if not isinstance(document, yaml.MappingNode):
        if isinstance(document, yaml.ScalarNode) and _resolve_scalar(document)[0] == "!!null":
            return []
        raise _unmarshal_errors([(_type_error(document, "yaml.MapSlice"), _NOT_A_MAPPING)])
    names: list[tuple[str, int]] = []
    for key, value in _pairs(document):
        name = _key_text(key)
        if isinstance(value, yaml.MappingNode):
            names.extend((f"{name}.{_key_text(child)}", _line(child)) for child, _ in _pairs(value))
        else:
            names.append((name, _line(key)))
    return names


def _holds_keys(parent: str) -> str:
    names = [k.name for k in KEYS] + sorted(_IGNORED_KEYS)
    child = next(n for n in names if n.startswith(parent + "."))
    return f"{parent} must hold keys indented below it, e.g. {child.split('.', 1)[1]}"


def suggest(name: str) -> str | None:
    """The known key ``name`` was probably meant to be (case-insensitive), if any."""
    known = {k.name.lower(): k.name for k in KEYS}
    wanted = name.lower()
    if wanted in known:
        return known[wanted]
    close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.75)
    if close:
        return known[close[0]]
    # The right key under the wrong parent (Socket.LogLevel), or without one.
    leaves = {n.rsplit(".", 1)[-1]: n for n in known}
    close = difflib.get_close_matches(wanted.rsplit(".", 1)[-1], leaves, n=1, cutoff=0.75)
    return known[leaves[close[0]]] if close else None


def validate_strict(names: Iterable[str], lines: Mapping[str, int] | None = None) -> None:
    """The Go daemon's key check for a file named with -c (ConfigValidation).

    The Go daemon's message comes first; the hint adds the line and the key
    that was probably meant.
    """
    names = list(names)
    lines = lines or {}
    if names and "Version" not in names:
        raise ConfigError(f"Config Version is missing. {_MIGRATE}", "add Version: 2 to it")
    for name in names:
        if name in KEYS_BY_NAME or name in _IGNORED_KEYS:
            continue
        where = f"line {lines[name]}: " if name in lines else ""
        if name in _NO_LONGER_SUPPORTED:
            raise ConfigError(
                f"{name} flag is not supported any more. {_DOCS}", f"{where}remove {name}"
            )
        if name in _NOT_SUPPORTED:
            raise ConfigError(f"{name} flag is not supported. {_MIGRATE}", f"{where}remove it")
        meant = suggest(name)
        if name in _PARENTS:  # "Socket: 5", "Socket:" with nothing below
            advice = _holds_keys(name)
        elif meant:
            advice = f"did you mean {meant}?"
        else:
            advice = "docs/configuration.md lists every key"
        raise ConfigError(f"{name} flag is invalid. {_DOCS}", where + advice)


_GO_TYPES = {"int": "int", "float": "float64", "bool": "bool", "str": "string"}


_NOT_A_MAPPING = "the file must be a mapping of keys to values, e.g. Region: us-east-2"


def _decode_value(kind: Kind, node: yaml.Node, errors: list[TypeError_], name: str) -> Any:
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
        errors.append(_wrong_type(node, kind, name, tag))
        return None
    errors.append(_wrong_type(node, kind, name))
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
        raise _unmarshal_errors([(_type_error(document, "cfg.Config"), _NOT_A_MAPPING)])
    values: dict[str, Any] = {}
    errors: list[TypeError_] = []
    for key_node, value_node in _pairs(document):
        name = _key_text(key_node)
        if name in _PARENTS or name == _PROXY_SERVER:
            struct = not isinstance(value_node, yaml.MappingNode) and not (
                isinstance(value_node, yaml.ScalarNode)
                and _resolve_scalar(value_node)[0] == "!!null"
            )
            if struct:
                errors.append((_type_error(value_node, f"the {name} struct"), _holds_keys(name)))
            if not isinstance(value_node, yaml.MappingNode):
                continue
            for child_node, child_value in _pairs(value_node):
                full = f"{name}.{_key_text(child_node)}"
                if full in _IGNORED_KEYS:
                    _decode_value("int", child_value, errors, full)
                    continue
                key = KEYS_BY_NAME.get(full)
                if key is not None:
                    value = _decode_value(key.kind, child_value, errors, full)
                    if value is not None:
                        values[key.attr] = value
            continue
        key = KEYS_BY_NAME.get(name)
        if key is None or "." in name:
            continue
        value = _decode_value(key.kind, value_node, errors, name)
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
        raise ConfigError(
            f"Config Version Setting is not correct. {_MIGRATE}", "Version must be 1 or 2"
        )
    values: dict[str, Any] = {}
    for attr, value in decoded.items():
        key = KEYS_BY_ATTR[attr]
        if key.go and key.kind != "bool" and not value:
            continue
        values[attr] = value
    values["version"] = version
    return values
