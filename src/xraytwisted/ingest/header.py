"""The segment header rules of the Go X-Ray daemon, as pure functions.

A datagram (or a pair of lines on the TCP stream) is ``<header>\\n<body>``.  The
header is accepted when it decodes (as Go's ``encoding/json`` would into
``struct{Format string; Version int}``) to ``format`` equal to "json" ignoring
case and ``version`` equal to the integer 1.  The body is never looked at: it
may be a JSON segment document or an OTLP ``T1S``/``T1U`` payload.
"""

from __future__ import annotations

import enum
import json
from typing import Any

# What the SDKs actually send (Python/Node, then Java/Go).  Checking these
# first keeps the JSON decoder off the hot path for every real datagram.
KNOWN_GOOD_HEADERS = frozenset(
    {
        b'{"format":"json","version":1}',
        b'{"format": "json", "version": 1}',
    }
)


class Verdict(enum.Enum):
    """Why a datagram was rejected; the value is the counter/log reason."""

    OK = "ok"
    MISSING_NEWLINE = "missing header"
    EMPTY_BODY = "missing header or segment"
    INVALID_HEADER = "invalid header"


def split(datagram: bytes) -> tuple[Verdict, bytes]:
    """Split one datagram into (verdict, body) by the Go daemon's rules.

    The body is returned only when the verdict is OK; it is an exact copy of
    the bytes after the first newline.
    """
    newline = datagram.find(b"\n")
    if newline < 0:
        return Verdict.MISSING_NEWLINE, b""
    if newline == len(datagram) - 1:
        return Verdict.EMPTY_BODY, b""
    header = datagram[:newline]
    if header in KNOWN_GOOD_HEADERS or header_is_valid(header):
        return Verdict.OK, datagram[newline + 1 :]
    return Verdict.INVALID_HEADER, b""


def header_is_valid(header: bytes) -> bool:
    """Decode ``header`` the way Go's encoding/json fills ``{Format string; Version int}``.

    Go matches object keys to fields case-insensitively (Unicode simple
    folding), lets a later duplicate key win, skips a value of the wrong type
    (keeping what an earlier key set) and treats ``null`` as "leave as is".
    Leading/trailing JSON whitespace (including ``\\r``) is fine; anything
    after the object is a syntax error, which rejects the whole header.  Like
    Go, the bytes are UTF-8 only (no BOM, no UTF-16/32 detection), invalid
    UTF-8 inside a string is replaced rather than an error, and ``NaN`` or
    ``Infinity`` are not JSON.
    """
    try:
        pairs = json.loads(
            header.decode("utf-8", "replace"),
            object_pairs_hook=_pairs,
            parse_constant=_not_json,
        )
    except (ValueError, RecursionError):
        return False
    if not isinstance(pairs, _Pairs):
        # A JSON array/string/number does not decode into a struct.
        return False
    fmt = ""
    version = 0
    for key, value in pairs:
        folded = key.casefold()
        if folded == "format":
            if isinstance(value, str):
                fmt = value
        elif folded == "version" and _is_go_int(value):
            version = value
    return fmt.casefold() == "json" and version == 1


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Pairs(list[tuple[str, Any]]):
    """Marks a decoded JSON object, keeping every key in order."""


def _pairs(items: list[tuple[str, Any]]) -> _Pairs:
    return _Pairs(items)


def _is_go_int(value: object) -> bool:
    # json gives int only for literals without fraction or exponent, which is
    # exactly what Go accepts for an int field; bool is an int subclass here
    # but a type error in Go.
    return isinstance(value, int) and not isinstance(value, bool)
