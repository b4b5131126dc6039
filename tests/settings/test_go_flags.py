"""Tests for xraytwisted.settings.go_flags: Go flag syntax, values, errors and the usage screen."""

from __future__ import annotations

import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.settings.go_flags import FLAGS, Parsed, UsageError, parse, usage_text
from xraytwisted.settings.table import KEYS

# The Go daemon's flags in registration order (cmd/tracing/daemon.go initCli):
# (short, long, Settings attribute or None).
GO_FLAGS = (
    ("a", "resource-arn", "resource_arn"),
    ("o", "local-mode", "local_mode"),
    ("m", "buffer-memory", "buffer_memory_mb"),
    ("n", "region", "region"),
    ("b", "bind", "udp_address"),
    ("t", "bind-tcp", "tcp_address"),
    ("r", "role-arn", "role_arn"),
    ("c", "config", None),
    ("f", "log-file", "log_path"),
    ("l", "log-level", "log_level"),
    ("p", "proxy-address", "proxy_address"),
    ("v", "version", None),
)


class ParseTestCase(SynchronousTestCase):
    def overrides(self, *argv: str) -> dict[str, Any]:
        return parse(list(argv)).overrides

    def usage_error(self, argv: list[str], message: str) -> None:
        with self.assertRaises(UsageError) as caught:
            parse(argv)
        self.assertEqual(str(caught.exception), message, argv)


class SyntaxTests(ParseTestCase):
    def test_every_go_spelling_of_a_string_flag(self) -> None:
        spellings = (
            ["-n", "eu-west-1"],
            ["-n=eu-west-1"],
            ["--n", "eu-west-1"],
            ["--n=eu-west-1"],
            ["-region", "eu-west-1"],
            ["-region=eu-west-1"],
            ["--region", "eu-west-1"],
            ["--region=eu-west-1"],
        )
        for argv in spellings:
            self.assertEqual(parse(argv).overrides, {"region": "eu-west-1"}, argv)

    def test_every_go_flag_by_both_names(self) -> None:
        for short, long, attr in GO_FLAGS:
            if attr is None:
                continue
            kind = next(k.kind for k in KEYS if k.attr == attr)
            if kind == "bool":
                argv_short, argv_long, expected = [f"-{short}"], [f"--{long}"], True
            elif kind == "int":
                argv_short, argv_long, expected = [f"-{short}", "12"], [f"--{long}", "12"], 12
            else:
                argv_short, argv_long = [f"-{short}", "value"], [f"--{long}", "value"]
                expected = "value"
            self.assertEqual(parse(argv_short).overrides, {attr: expected}, argv_short)
            self.assertEqual(parse(argv_long).overrides, {attr: expected}, argv_long)

    def test_config_and_version(self) -> None:
        for argv in (["-c", "/x.yaml"], ["--config=/x.yaml"], ["-config", "/x.yaml"]):
            parsed = parse(argv)
            self.assertEqual((parsed.config, parsed.overrides), ("/x.yaml", {}))
        self.assertEqual(parse(["-c="]).config, "")
        self.assertTrue(parse(["-v"]).version)
        self.assertTrue(parse(["--version"]).version)
        self.assertFalse(parse(["-v=false"]).version)

    def test_nothing(self) -> None:
        self.assertEqual(parse([]), Parsed())
        self.assertEqual(Parsed(), Parsed({}, None, False, False))

    def test_extension_flags(self) -> None:
        # Go has no -e/--endpoint (it exits 2 with "flag provided but not
        # defined: -endpoint"); we do, like every other cfg.yaml key.
        self.assertEqual(
            self.overrides("-e", "http://localhost:4566", "--concurrency", "3"),
            {"endpoint": "http://localhost:4566", "concurrency": 3},
        )
        self.assertEqual(
            self.overrides("--no-verify-ssl", "--log-rotation=false"),
            {"no_verify_ssl": True, "log_rotation": False},
        )
        self.assertEqual(
            self.overrides(
                "--request-timeout", "2.5", "--shutdown-timeout=10", "--udp-receive-buffer", "0"
            ),
            {"request_timeout": 2.5, "shutdown_timeout": 10.0, "udp_receive_buffer_kb": 0},
        )

    def test_value_may_start_with_a_dash(self) -> None:
        # Go takes the next argument as the value, whatever it looks like.
        self.assertEqual(self.overrides("-n", "-o"), {"region": "-o"})
        self.assertEqual(self.overrides("-m", "-5"), {"buffer_memory_mb": -5})

    def test_value_may_contain_equals(self) -> None:
        self.assertEqual(self.overrides("-a=arn:x=y"), {"resource_arn": "arn:x=y"})
        self.assertEqual(self.overrides("-a", "a=b"), {"resource_arn": "a=b"})

    def test_flag_given_twice_keeps_the_last(self) -> None:
        self.assertEqual(self.overrides("-n", "a", "--region", "b"), {"region": "b"})
        self.assertEqual(self.overrides("-o", "-o=false"), {"local_mode": False})
        self.assertEqual(parse(["-c", "a", "-config=b"]).config, "b")

    def test_double_dash_alone_ends_the_flags(self) -> None:
        self.assertEqual(self.overrides("-o", "--"), {"local_mode": True})

    def test_help(self) -> None:
        for argv in (["-h"], ["--help"], ["-help"], ["-h=false"], ["-help=nonsense"]):
            self.assertTrue(parse(argv).help, argv)
        # Go stops at -h: later mistakes do not matter, earlier ones do.
        self.assertTrue(parse(["-n", "x", "-h", "--bogus", "positional"]).help)
        self.usage_error(["--bogus", "-h"], "flag provided but not defined: -bogus")


class BoolTests(ParseTestCase):
    def test_values(self) -> None:
        for text in ("1", "t", "T", "TRUE", "true", "True"):
            self.assertEqual(self.overrides(f"-o={text}"), {"local_mode": True}, text)
        for text in ("0", "f", "F", "FALSE", "false", "False"):
            self.assertEqual(self.overrides(f"--local-mode={text}"), {"local_mode": False}, text)

    def test_bad_values(self) -> None:
        for text in ("yes", "no", "", "tRUE", "2"):
            self.usage_error([f"-o={text}"], f'invalid boolean value "{text}" for -o: parse error')
        self.usage_error(
            ["--local-mode=on"], 'invalid boolean value "on" for -local-mode: parse error'
        )

    def test_separate_value_is_a_positional_argument(self) -> None:
        # Go: "-o false" sets -o and silently stops at "false".
        self.usage_error(
            ["-o", "false"],
            "unexpected argument 'false': a bool flag takes its value after '=', "
            "e.g. --local-mode=false",
        )
        self.usage_error(
            ["--no-verify-ssl", "TRUE"],
            "unexpected argument 'TRUE': a bool flag takes its value after '=', "
            "e.g. --no-verify-ssl=true",
        )


class NumberTests(ParseTestCase):
    def test_go_integer_syntax(self) -> None:
        cases = {
            "10": 10,
            "0x10": 16,
            "0X10": 16,
            "0o17": 15,
            "010": 8,
            "0b11": 3,
            "1_000": 1000,
            "+7": 7,
            "-5": -5,
            "0": 0,
        }
        for text, expected in cases.items():
            self.assertEqual(self.overrides("-m", text), {"buffer_memory_mb": expected}, text)
            self.assertEqual(
                self.overrides(f"--buffer-memory={text}"), {"buffer_memory_mb": expected}, text
            )

    def test_bad_integers(self) -> None:
        cases = {
            "abc": "parse error",
            "": "parse error",
            "1.5": "parse error",
            " 5": "parse error",
            "1__0": "parse error",
            "09": "parse error",
            "99999999999999999999": "value out of range",
        }
        for text, error in cases.items():
            self.usage_error(["-m", text], f'invalid value "{text}" for flag -m: {error}')
        self.usage_error(
            ["--concurrency=x"], 'invalid value "x" for flag -concurrency: parse error'
        )

    def test_floats(self) -> None:
        cases = {"2.5": 2.5, "1e1": 10.0, ".5": 0.5, "3": 3.0, "+1.": 1.0}
        for text, expected in cases.items():
            self.assertEqual(
                self.overrides("--request-timeout", text), {"request_timeout": expected}, text
            )

    def test_bad_floats(self) -> None:
        cases = {
            "nan": "parse error",
            "inf": "parse error",
            "1,5": "parse error",
            "": "parse error",
            " 1": "parse error",
            "1e999": "value out of range",
        }
        for text, error in cases.items():
            self.usage_error(
                ["--shutdown-timeout", text],
                f'invalid value "{text}" for flag -shutdown-timeout: {error}',
            )


class ErrorTests(ParseTestCase):
    def test_unknown_flag(self) -> None:
        self.usage_error(["--endpoints", "x"], "flag provided but not defined: -endpoints")
        self.usage_error(["-x"], "flag provided but not defined: -x")
        self.usage_error(["--Region=x"], "flag provided but not defined: -Region")
        self.usage_error(["-no-such=1"], "flag provided but not defined: -no-such")

    def test_bad_syntax(self) -> None:
        for arg in ("---x", "-=x", "--=x", "---"):
            self.usage_error([arg], f"bad flag syntax: {arg}")

    def test_missing_argument(self) -> None:
        self.usage_error(["-n"], "flag needs an argument: -n")
        self.usage_error(["-o", "--region"], "flag needs an argument: -region")

    def test_positional_arguments(self) -> None:
        # Go silently ignores them (and everything after them); we refuse.
        cases = {
            ("us-east-1",): "us-east-1",
            ("-o", "us-east-1", "-n", "x"): "us-east-1",
            ("-",): "-",
            ("--", "-n", "x"): "-n",
            ("-n", "x", "--", "y"): "y",
        }
        for argv, arg in cases.items():
            self.usage_error(
                list(argv), f"unexpected argument {arg!r}: options start with - (see --help)"
            )

    def test_values_are_quoted_like_go(self) -> None:
        # Go prints values with %q, which also keeps every message on one line.
        self.usage_error(["-m", 'a"b\\c'], 'invalid value "a\\"b\\\\c" for flag -m: parse error')
        self.usage_error(
            ["-m", "x\ny\t\x01\u2028"],
            'invalid value "x\\ny\\t\\x01\\u2028" for flag -m: parse error',
        )
        self.usage_error(["-o=\r"], 'invalid boolean value "\\r" for -o: parse error')
        self.usage_error(["-m", "\u00e9"], 'invalid value "\u00e9" for flag -m: parse error')

    def test_errors_are_one_line(self) -> None:
        for argv in (["-m", "x\ny"], ["-x\ny"], ["a\nb"], ["---\n"], ["-o=\n"]):
            with self.assertRaises(UsageError) as caught:
                parse(argv)
            self.assertNotIn("\n", str(caught.exception), argv)
            self.assertIn("\\n", str(caught.exception), argv)


class FlagTableTests(SynchronousTestCase):
    def test_go_flags_in_go_order(self) -> None:
        with_short = [(f.short, f.long, f.attr) for f in FLAGS if f.short and f.long != "help"]
        go_part = [entry for entry in with_short if entry[0] != "e"]
        self.assertEqual(go_part, list(GO_FLAGS))
        self.assertEqual(FLAGS[-1].short, "h")
        self.assertEqual(FLAGS[-1].long, "help")

    def test_every_key_with_a_long_name_has_a_flag(self) -> None:
        by_attr = {f.attr: f for f in FLAGS if f.attr}
        for key in KEYS:
            if key.long:
                flag = by_attr[key.attr]
                self.assertEqual(
                    (flag.short, flag.long, flag.kind), (key.short, key.long, key.kind)
                )
            else:
                self.assertNotIn(key.attr, by_attr)

    def test_names_are_unique(self) -> None:
        names = [f.long for f in FLAGS] + [f.short for f in FLAGS if f.short]
        self.assertEqual(len(names), len(set(names)))


class UsageTextTests(SynchronousTestCase):
    def test_layout(self) -> None:
        text = usage_text()
        self.assertTrue(text.endswith("\n"))
        lines = text.splitlines()
        self.assertEqual(lines[0], "Usage: X-Ray [options]")
        self.assertEqual(lines[-1], "\t-h\t--help\t\tShow this screen")
        self.assertEqual(len(lines), 1 + len(FLAGS))
        line_re = re.compile(r"\t(-[a-z])?\t--([a-z-]+)(\t\t?)([^\t]+)")
        for line, flag in zip(lines[1:], FLAGS, strict=True):
            match = line_re.fullmatch(line)
            assert match is not None, line
            self.assertEqual(match.group(1), f"-{flag.short}" if flag.short else None, line)
            self.assertEqual(match.group(2), flag.long)
            self.assertEqual(match.group(4), flag.help)

    def test_go_lines(self) -> None:
        lines = usage_text().splitlines()
        for expected in (
            "\t-a\t--resource-arn\t"
            "Amazon Resource Name (ARN) of the AWS resource running the daemon.",
            "\t-o\t--local-mode\tDon't check for EC2 instance metadata.",
            "\t-n\t--region\tSend segments to X-Ray service in a specific region.",
            "\t-b\t--bind\t\tOverrides default UDP address (127.0.0.1:2000).",
            "\t-t\t--bind-tcp\tOverrides default TCP address (127.0.0.1:2000).",
            "\t-c\t--config\tLoad a configuration file from the specified path.",
            "\t-f\t--log-file\tOutput logs to the specified file path.",
            "\t-v\t--version\tShow AWS X-Ray daemon version.",
        ):
            self.assertIn(expected, lines)

    def test_extra_tab_only_for_short_string_names(self) -> None:
        for line in usage_text().splitlines()[1:]:
            long_name = line.split("\t")[2][2:]
            doubled = line.startswith(f"\t{line.split(chr(9))[1]}\t--{long_name}\t\t")
            self.assertEqual(doubled, len(long_name) <= 4, line)

    def test_program_name(self) -> None:
        self.assertEqual(usage_text("twistd xray").splitlines()[0], "Usage: twistd xray [options]")
