"""Go-compatible command-line flags, as a pure parser.

The Go daemon uses Go's ``flag`` package with every option registered under a
short and a long name, so all of these mean the same thing and scripts use
them all: ``-n us-east-2``, ``-n=us-east-2``, ``--n us-east-2``,
``-region us-east-2``, ``--region=us-east-2``.  Bool flags take no separate
value (``-o``) but accept ``-o=false``.  getopt (what twisted.python.usage
uses) would read ``-region`` as ``-r egion``, so both the twistd plugin and the
``xray`` command parse with this module instead.

Deliberate differences from Go: positional arguments (including anything
after ``--``) are an error instead of silently ending the parse, and the
flags for cfg.yaml keys Go has no flag for (``-e/--endpoint``,
``--concurrency``, ...) exist.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xraytwisted.settings.table import KEYS, Key, parse_go_int


class UsageError(Exception):
    """A bad command line; str() is Go's wording for the same mistake."""


@dataclass(frozen=True)
class Flag:
    short: str | None
    long: str
    kind: str  # "int" | "float" | "str" | "bool"
    help: str
    attr: str | None = None  # Settings attribute; None for -c/-v/-h
    metavar: str = ""


def _flags(keys: Sequence[Key]) -> tuple[Flag, ...]:
    table = [Flag(k.short, k.long, k.kind, k.help, k.attr, k.metavar) for k in keys if k.long]
    table.insert(
        table.index(next(f for f in table if f.long == "log-file")),
        Flag("c", "config", "str", "Load a configuration file from the specified path.",
             metavar="PATH"),
    )  # fmt: skip
    table.append(Flag("v", "version", "bool", "Show AWS X-Ray daemon version."))
    table.append(
        Flag(None, "health-check", "bool",
             "Ask the running daemon's /health (at -t, or Monitoring.Address if set) and "
             "exit 0 if healthy, 1 if not; starts no daemon.")
    )  # fmt: skip
    table.append(Flag("h", "help", "bool", "Show this screen"))
    return tuple(table)


FLAGS: tuple[Flag, ...] = _flags(KEYS)
_BY_NAME: Mapping[str, Flag] = {
    **{f.long: f for f in FLAGS},
    **{f.short: f for f in FLAGS if f.short},
}


@dataclass
class Parsed:
    """What the command line asked for."""

    overrides: dict[str, Any] = field(default_factory=dict)  # Settings attr -> value
    config: str | None = None
    version: bool = False
    help: bool = False
    health_check: bool = False


def parse(argv: Sequence[str]) -> Parsed:
    """Parse flags with Go's rules; positional arguments are an error.

    (Go silently ignores everything from the first non-flag argument on, so
    ``xray -o us-east-2`` runs with no region and no hint; we say so instead.)
    A flag given twice keeps the last value, as in Go; ``-h``/``--help``
    stops parsing, as in Go.
    """
    result = Parsed()
    args = list(argv)
    previous: Flag | None = None
    while args:
        arg = args.pop(0)
        if arg == "--":
            if args:
                raise UsageError(_unexpected(args[0], None))
            break
        if len(arg) < 2 or not arg.startswith("-"):
            raise UsageError(_unexpected(arg, previous))
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {_shown(arg)}")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        flag = _BY_NAME.get(name)
        if flag is None:
            raise UsageError(f"flag provided but not defined: -{_shown(name)}")
        if flag.long == "help":
            # Go's flag package answers -h/-help (with any value) by printing
            # the usage and stopping there.
            result.help = True
            return result
        if flag.kind == "bool":
            converted: Any = True if value is None else _parse_bool(value, name)
        else:
            if value is None:
                if not args:
                    raise UsageError(f"flag needs an argument: -{name}")
                value = args.pop(0)
            converted = _convert(flag, value, name)
        _store(result, flag, converted)
        previous = flag
    return result


_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
}


def _quote(text: str) -> str:
    """Go's %q (strconv.Quote): double quotes, non-printable characters escaped."""
    out = []
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return '"' + "".join(out) + '"'


def _shown(text: str) -> str:
    """A flag name as typed, escaped only if it would break the line."""
    return text if text.isprintable() else _quote(text)[1:-1]


def _unexpected(arg: str, previous: Flag | None) -> str:
    if previous is not None and previous.kind == "bool" and arg.lower() in ("true", "false"):
        return (
            f"unexpected argument {arg!r}: a bool flag takes its value after '=', "
            f"e.g. --{previous.long}={arg.lower()}"
        )
    return f"unexpected argument {arg!r}: options start with - (see --help)"


def _store(result: Parsed, flag: Flag, value: Any) -> None:
    if flag.attr is not None:
        result.overrides[flag.attr] = value
    elif flag.long == "config":
        result.config = value
    elif flag.long == "health-check":
        result.health_check = value
    else:  # version
        result.version = value


# strconv.ParseBool
_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}
# strconv.ParseFloat's decimal form (hex floats, inf and nan are left out).
_FLOAT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def _parse_bool(value: str, name: str) -> bool:
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"invalid boolean value {_quote(value)} for -{name}: parse error")


def _convert(flag: Flag, value: str, name: str) -> Any:
    try:
        if flag.kind == "int":
            # Go's ParseInt with base 0: 0x/0o/0b/0 prefixes and _ separators.
            return parse_go_int(value)
        if flag.kind == "float":
            if not _FLOAT.fullmatch(value):
                raise ValueError("parse error")
            number = float(value)
            if not math.isfinite(number):
                raise ValueError("value out of range")
            return number
    except ValueError as e:
        raise UsageError(f"invalid value {_quote(value)} for flag -{name}: {e}") from None
    return value


def usage_text(program: str = "X-Ray") -> str:
    """The usage screen in the Go daemon's layout (``-h`` prints it)."""
    lines = [f"Usage: {program} [options]"]
    for f in FLAGS:
        if f.long == "help":
            continue
        short = f"-{f.short}" if f.short else ""
        # Go pads the long names of string flags of four characters or fewer
        # with an extra tab (StringVarF).
        sep = "\t\t" if f.kind == "str" and len(f.long) <= 4 else "\t"
        lines.append(f"\t{short}\t--{f.long}{sep}{f.help}")
    lines.append("\t-h\t--help\t\tShow this screen")
    return "\n".join(lines) + "\n"
