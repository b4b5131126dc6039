"""The segment header rules (Go daemon compatibility, reference §4)."""

from __future__ import annotations

import json
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.ingest.header import Verdict, header_is_valid, split

OK, NO_NEWLINE, EMPTY, INVALID = (
    Verdict.OK,
    Verdict.MISSING_NEWLINE,
    Verdict.EMPTY_BODY,
    Verdict.INVALID_HEADER,
)

# (datagram, verdict, body) - the cases the reference lists, plus edges.
CASES: list[tuple[bytes, Verdict, bytes]] = [
    (b'{"format":"json","version":1}\n{"id":"1"}', OK, b'{"id":"1"}'),
    (b'{"format": "json", "version": 1}\n{"id":"1"}', OK, b'{"id":"1"}'),
    (b'{"FORMAT":"JSON","VERSION":1}\nx', OK, b"x"),
    (b'{"Format":"Json","Version":1}\nx', OK, b"x"),
    (b'  {"format":"json","version":1} \r\nx', OK, b"x"),
    (b'\t{"format":"json","version":1}\r\nx', OK, b"x"),
    (b'{"format":"json","version":1,"extra":[1,{"a":null}]}\nx', OK, b"x"),
    (b'{"version":1,"format":"json"}\nx', OK, b"x"),
    # The body is opaque: OTLP payloads, more newlines, anything.
    (b'{"format":"json","version":1}\nT1S' + b"QUJD" * 10, OK, b"T1S" + b"QUJD" * 10),
    (b'{"format":"json","version":1}\na\nb\n', OK, b"a\nb\n"),
    (b'{"format":"json","version":1}\n ', OK, b" "),
    (b'{"format":"json","version":1}\n\xff\xfe', OK, b"\xff\xfe"),
    # Go's case-insensitive matching uses Unicode folding: LATIN SMALL LETTER
    # LONG S (U+017F) matches "s".
    ('{"format":"j\u017fon","ver\u017fion":1}\nx'.encode(), OK, b"x"),
    # Missing pieces.
    (b"no newline at all", NO_NEWLINE, b""),
    (b"", NO_NEWLINE, b""),
    (b'{"format":"json","version":1}', NO_NEWLINE, b""),
    (b'{"format":"json","version":1}\n', EMPTY, b""),
    (b"\n", EMPTY, b""),
    # Invalid headers.
    (b'{"format":"json","version":2}\nx', INVALID, b""),
    (b'{"format":"json","version":"1"}\nx', INVALID, b""),
    (b'{"format":"json","version":1.0}\nx', INVALID, b""),
    (b'{"format":"json","version":1e0}\nx', INVALID, b""),
    (b'{"format":"json","version":true}\nx', INVALID, b""),
    (b'{"format":"json","version":null}\nx', INVALID, b""),
    (b'{"format":"json"}\nx', INVALID, b""),
    (b'{"version":1}\nx', INVALID, b""),
    (b'{"format":"xml","version":1}\nx', INVALID, b""),
    (b'{"format":1,"version":1}\nx', INVALID, b""),
    (b'{"format":"json","version":1} trailing\nx', INVALID, b""),
    (b'{"format":"json","version":1}{}\nx', INVALID, b""),
    (b'[{"format":"json","version":1}]\nx', INVALID, b""),
    (b'"json"\nx', INVALID, b""),
    (b"\nx", INVALID, b""),
    (b'{"format":"json","version":1\nx', INVALID, b""),
    (b'{"format":"json","version":01}\nx', INVALID, b""),
    # Later duplicates win; a wrongly typed duplicate keeps the earlier value.
    (b'{"format":"json","version":1,"version":2}\nx', INVALID, b""),
    (b'{"format":"json","version":2,"VERSION":1}\nx', OK, b"x"),
    (b'{"format":"json","version":1,"version":"x"}\nx', OK, b"x"),
    (b'{"format":"json","version":1,"version":null}\nx', OK, b"x"),
    (b'{"format":"json","Format":"xml","version":1}\nx', INVALID, b""),
    # Go's decoder takes UTF-8 only and knows no NaN/Infinity; it replaces
    # invalid UTF-8 inside strings instead of failing.
    (b'{"format":"json","version":1,"x":NaN}\nx', INVALID, b""),
    (b'{"format":"json","version":1,"x":-Infinity}\nx', INVALID, b""),
    (b'\xef\xbb\xbf{"format":"json","version":1}\nx', INVALID, b""),
    ('{"format":"json","version":1}'.encode("utf-16-le") + b"\nx", INVALID, b""),
    (b'{"format":"json","version":1,"x":"\xff\xfe"}\nx', OK, b"x"),
    (b'{"format":"json","version":1,\xff:1}\nx', INVALID, b""),
]


class SplitTests(SynchronousTestCase):
    def test_table(self) -> None:
        failures = []
        for datagram, verdict, body in CASES:
            got = split(datagram)
            if got != (verdict, body):
                failures.append(f"{datagram!r}: expected {(verdict, body)!r}, got {got!r}")
        self.assertEqual(failures, [])

    def test_body_is_not_copied_beyond_first_newline(self) -> None:
        body = b'{"name":"a\\nb"}\n{"second":"line"}'
        self.assertEqual(split(b'{"format":"json","version":1}\n' + body), (OK, body))

    def test_deeply_nested_header_is_rejected_not_crashing(self) -> None:
        header = b'{"format":"json","version":1,"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        self.assertEqual(split(header + b"\nx"), (INVALID, b""))


def _header(pairs: list[tuple[str, object]], spaces: bool) -> bytes:
    sep = (", ", ": ") if spaces else (",", ":")
    items = sep[0].join(json.dumps(k) + sep[1] + json.dumps(v) for k, v in pairs)
    return ("{" + items + "}").encode()


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_never_raises_and_body_is_after_first_newline(self, data: bytes) -> None:
        verdict, body = split(data)
        if verdict is OK:
            self.assertEqual(body, data[data.index(b"\n") + 1 :])
            self.assertNotEqual(body, b"")
        else:
            self.assertEqual(body, b"")

    @settings(max_examples=300, deadline=None)
    @given(
        fmt=st.sampled_from(["json", "JSON", "Json", "xml", "", "jsonx"]),
        version=st.one_of(st.sampled_from([1, 2, 0, -1, "1", 1.5, True, None]), st.integers(-5, 5)),
        key_case=st.sampled_from([str.lower, str.upper, str.title]),
        extra=st.dictionaries(st.sampled_from(["a", "b", "id"]), st.integers(), max_size=2),
        spaces=st.booleans(),
        body=st.binary(min_size=1, max_size=50),
    )
    def test_generated_headers(
        self,
        fmt: str,
        version: object,
        key_case: Callable[[str], str],
        extra: dict[str, int],
        spaces: bool,
        body: bytes,
    ) -> None:
        pairs: list[tuple[str, object]] = [
            (key_case("format"), fmt),
            (key_case("version"), version),
        ]
        pairs += list(extra.items())
        header = _header(pairs, spaces)
        expected = (
            fmt.lower() == "json"
            and isinstance(version, int)
            and not isinstance(version, bool)
            and version == 1
        )
        self.assertEqual(header_is_valid(header), expected, header)
        verdict, got_body = split(header + b"\n" + body)
        self.assertEqual(verdict is OK, expected)
        if expected:
            self.assertEqual(got_body, body)
