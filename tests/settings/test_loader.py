"""Tests for xraytwisted.settings.loader: cfg.yaml loading, Go's strict validation and messages,
yaml.v2 value semantics, the search path, and CLI > file > defaults."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.support.tempdirs import temp_path
from xraytwisted.settings import cfg_yaml, go_flags, loader, table
from xraytwisted.settings.loader import SEARCH_PATHS, load, resolve
from xraytwisted.settings.table import (
    KEYS,
    KEYS_BY_ATTR,
    KEYS_BY_NAME,
    LOG_LEVELS,
    MIN_BUFFER_MB,
    ConfigError,
    Settings,
    parse_go_int,
)

# The sample configuration shipped with the Go daemon, verbatim:
# aws/aws-xray-daemon pkg/cfg.yaml (v3.6.6).  It must load unchanged.
GO_SAMPLE_CFG_YAML = """\
# Maximum buffer size in MB (minimum 3). Choose 0 to use 1% of host memory.
TotalBufferSizeMB: 0
# Maximum number of concurrent calls to AWS X-Ray to upload segment documents.
Concurrency: 8
# Send segments to AWS X-Ray service in a specific region
Region: ""
# Change the X-Ray service endpoint to which the daemon sends segment documents.
Endpoint: ""
Socket:
  # Change the address and port on which the daemon listens for UDP packets containing segment documents.
  UDPAddress: "127.0.0.1:2000"
  # Change the address and port on which the daemon listens for HTTP requests to proxy to AWS X-Ray.
  TCPAddress: "127.0.0.1:2000"
Logging:
  LogRotation: true
  # Change the log level, from most verbose to least: dev, debug, info, warn, error, prod (default).
  LogLevel: "prod"
  # Output logs to the specified file path.
  LogPath: ""
# Turn on local mode to skip EC2 instance metadata check.
LocalMode: false
# Amazon Resource Name (ARN) of the AWS resource running the daemon.
ResourceARN: ""
# Assume an IAM role to upload segments to a different account.
RoleARN: ""
# Disable TLS certificate verification.
NoVerifySSL: false
# Upload segments to AWS X-Ray through a proxy.
ProxyAddress: ""
# Daemon configuration file format version.
Version: 2
"""  # noqa: E501

# The keys of the Go daemon's Config struct as its strict check knows them
# (flattened yaml.Marshal(DefaultConfig()), ProxyServer lower-cased).
GO_VALID_KEYS = (
    "TotalBufferSizeMB",
    "Concurrency",
    "Endpoint",
    "Region",
    "Socket.UDPAddress",
    "Socket.TCPAddress",
    "proxyserver.idleconntimeout",
    "proxyserver.maxidleconnsperhost",
    "proxyserver.maxidleconns",
    "Logging.LogRotation",
    "Logging.LogLevel",
    "Logging.LogPath",
    "LocalMode",
    "ResourceARN",
    "RoleARN",
    "NoVerifySSL",
    "ProxyAddress",
    "Version",
)

DOCS = "Please refer to AWS X-Ray Documentation for more information."
MIGRATE = "Use X-Ray Daemon Config Migration Script to update the config file. " + DOCS
VERSION_MISSING = "Config Version is missing. " + MIGRATE
VERSION_WRONG = "Config Version Setting is not correct. " + MIGRATE
PREFIX = "Error occur when using config flag: "
UNMARSHAL = PREFIX + "yaml: unmarshal errors: "


def nested(dotted: str, value: str = "1") -> str:
    """A cfg.yaml line (or two) setting a possibly dotted key."""
    if "." in dotted:
        parent, child = dotted.split(".", 1)
        return f"{parent}:\n  {child}: {value}\n"
    return f"{dotted}: {value}\n"


class ConfigTestCase(SynchronousTestCase):
    def write(self, text: str | bytes) -> str:
        path = temp_path(self)
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    def strict(self, text: str | bytes) -> dict[str, Any]:
        """Load ``text`` as the file named with -c (no search path at all)."""
        return load(self.write(text), search=())

    def auto(self, text: str | bytes) -> dict[str, Any]:
        """Load ``text`` as an auto-discovered file."""
        return load(None, search=[self.write(text)])

    def assertConfigError(self, call: Callable[[], object], message: str) -> ConfigError:
        """The Go daemon's text is ``message`` (what comes after it: HintTests)."""
        with self.assertRaises(ConfigError) as caught:
            call()
        self.assertEqual(caught.exception.go_text, message)
        self.assertTrue(str(caught.exception).startswith(message))  # scripts grep Go's text
        self.assertNotIn("\n", str(caught.exception))
        return caught.exception

    def without_path(self, values: dict[str, Any]) -> dict[str, Any]:
        values = dict(values)
        values.pop("config_path", None)
        return values


class GoSampleFileTests(ConfigTestCase):
    def test_sample_loads_strictly(self) -> None:
        path = self.write(GO_SAMPLE_CFG_YAML)
        values = load(path, search=())
        self.assertEqual(values["config_path"], path)
        # Empty strings and zero numbers mean "default" (Go's merge), so
        # only the meaningful values remain.
        self.assertEqual(
            self.without_path(values),
            {
                "concurrency": 8,
                "udp_address": "127.0.0.1:2000",
                "tcp_address": "127.0.0.1:2000",
                "log_rotation": True,
                "log_level": "prod",
                "local_mode": False,
                "no_verify_ssl": False,
                "version": 2,
            },
        )

    def test_sample_gives_the_defaults(self) -> None:
        for values in (self.strict(GO_SAMPLE_CFG_YAML), self.auto(GO_SAMPLE_CFG_YAML)):
            settings = resolve(values, {})
            self.assertEqual(settings, Settings(version=2))
            self.assertEqual(settings.config_path, values["config_path"])

    def test_sample_flattens_to_the_go_keys(self) -> None:
        document = cfg_yaml.read_document(self.write(GO_SAMPLE_CFG_YAML))
        self.assertEqual(
            cfg_yaml.flatten(document),
            [
                "TotalBufferSizeMB",
                "Concurrency",
                "Region",
                "Endpoint",
                "Socket.UDPAddress",
                "Socket.TCPAddress",
                "Logging.LogRotation",
                "Logging.LogLevel",
                "Logging.LogPath",
                "LocalMode",
                "ResourceARN",
                "RoleARN",
                "NoVerifySSL",
                "ProxyAddress",
                "Version",
            ],
        )

    def test_table_has_exactly_the_go_keys_marked_go(self) -> None:
        go_keys = {k.name for k in KEYS if k.go}
        self.assertEqual(go_keys, {k for k in GO_VALID_KEYS if not k.startswith("proxyserver")})
        self.assertEqual(
            {k.name for k in KEYS if not k.go},
            {
                "RequestTimeoutSeconds",
                "ShutdownTimeoutSeconds",
                "Socket.UDPReceiveBufferKB",
                "Socket.UDPReadIntervalMS",
                "Socket.UDPReadAdaptive",
                "Socket.StreamMaxLineKB",
                "Socket.StreamIdleTimeoutSeconds",
                "Socket.TCPMaxConnections",
                "Socket.TCPMaxConnectionsPerPeer",
                "Socket.TCPHoldKB",
                "SamplingProxy.MaxBodyKB",
                "SamplingProxy.TimeoutSeconds",
                "SamplingProxy.ClientTimeoutSeconds",
                "SamplingProxy.MaxConcurrentRequests",
                "SamplingProxy.RequestDeadlineSeconds",
                "SamplingProxy.Allow",
                "SamplingProxy.AllowedHosts",
                "Telemetry.IntervalSeconds",
                "Socket.OTLPAddress",
                "OTLP.Gzip",
                "OTLP.MaxConnections",
                "OTLP.RequestDeadlineSeconds",
                "OTLP.HoldMB",
                "Monitoring.Address",
                "Monitoring.UnhealthyAfterSeconds",
                "Monitoring.ShowIdentity",
                "Spool.Dir",
                "Spool.MaxMB",
                "Spool.AfterSeconds",
                "LocalSink",
                "LocalSampling.FixedRate",
                "LocalSampling.RulesFile",
            },
        )


class StrictValidationTests(ConfigTestCase):
    """Go's ConfigValidation, which only runs for the file named with -c."""

    def test_version_missing(self) -> None:
        for text in ("Concurrency: 8\n", "Socket:\n  UDPAddress: 127.0.0.1:2000\n"):
            self.assertConfigError(lambda t=text: self.strict(t), VERSION_MISSING)

    def test_version_missing_is_reported_before_invalid_keys(self) -> None:
        self.assertConfigError(lambda: self.strict("Bogus: 1\nMemoryLimit: 5\n"), VERSION_MISSING)

    def test_version_under_a_mapping_is_missing(self) -> None:
        self.assertConfigError(lambda: self.strict("Version:\n  Number: 2\n"), VERSION_MISSING)

    def test_keys_not_supported_any_more(self) -> None:
        names = (
            "Profile.CPU",
            "Profile.Memory",
            "Socket.BufferSizeKB",
            "Logging.LogFormat",
            "Processor.BatchProcessorQueueSize",
        )
        for name in names:
            self.assertConfigError(
                lambda n=name: self.strict("Version: 2\n" + nested(n)),
                f"{name} flag is not supported any more. {DOCS}",
            )

    def test_keys_needing_the_migration_script(self) -> None:
        names = ("LogRotation", "Processor.Region", "Processor.Endpoint", "Processor.Routine")
        for name in (*names, "MemoryLimit"):
            self.assertConfigError(
                lambda n=name: self.strict("Version: 2\n" + nested(n)),
                f"{name} flag is not supported. {MIGRATE}",
            )

    def test_invalid_keys(self) -> None:
        cases = {
            "Bogus: 1\n": "Bogus",
            "region: us-east-1\n": "region",  # keys are case-sensitive
            "Socket:\n": "Socket",  # a null value flattens to the parent name
            "Logging: ~\n": "Logging",
            "Socket: 5\n": "Socket",
            "Socket: [a]\n": "Socket",
            "Socket:\n  Bogus: 1\n": "Socket.Bogus",
            "Socket:\n  udpaddress: x\n": "Socket.udpaddress",
            "ProxyServer:\n  IdleConnTimeout: 5\n": "ProxyServer.IdleConnTimeout",
            "proxyserver:\n": "proxyserver",
            "Profile: x\n": "Profile",
            "Processor:\n  BatchSize: 5\n": "Processor.BatchSize",
            "7: x\n": "7",
            "~: x\n": "<nil>",
        }
        for text, name in cases.items():
            self.assertConfigError(
                lambda t=text: self.strict("Version: 2\n" + t), f"{name} flag is invalid. {DOCS}"
            )

    def test_first_offending_key_in_file_order(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: 2\nZeta: 1\nMemoryLimit: 2\n"),
            f"Zeta flag is invalid. {DOCS}",
        )
        self.assertConfigError(
            lambda: self.strict("MemoryLimit: 2\nZeta: 1\nVersion: 2\n"),
            f"MemoryLimit flag is not supported. {MIGRATE}",
        )

    def test_lower_case_proxyserver_keys_are_accepted_and_ignored(self) -> None:
        values = self.strict(
            "Version: 2\nproxyserver:\n  idleconntimeout: 5\n  maxidleconnsperhost: 9\n"
            "  maxidleconns: 1\n"
        )
        self.assertEqual(self.without_path(values), {"version": 2})
        self.assertEqual(resolve(values, {}), Settings(version=2))

    def test_proxyserver_values_must_still_be_ints(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: 2\nproxyserver:\n  idleconntimeout: abc\n"),
            UNMARSHAL + "line 3: cannot unmarshal !!str `abc` into int",
        )

    def test_an_empty_mapping_has_no_keys(self) -> None:
        # Go flattens "Socket: {}" to nothing at all, so it is valid.
        values = self.strict("Version: 2\nSocket: {}\nLogging: {}\n")
        self.assertEqual(self.without_path(values), {"version": 2})

    def test_extension_keys_pass_strict_validation(self) -> None:
        values = self.strict(
            "Version: 2\nRequestTimeoutSeconds: 2.5\nShutdownTimeoutSeconds: 3\n"
            "Socket:\n  UDPReceiveBufferKB: 0\n"
        )
        self.assertEqual(
            self.without_path(values),
            {
                "version": 2,
                "request_timeout": 2.5,
                "shutdown_timeout": 3.0,
                "udp_receive_buffer_kb": 0,  # as given: no "zero means default"
            },
        )

    def test_every_go_key_passes(self) -> None:
        text = "".join(nested(name, "1" if "proxy" in name else "null") for name in GO_VALID_KEYS)
        # Version: null is present (so not "missing") but 0, so not correct.
        self.assertConfigError(lambda: self.strict(text), VERSION_WRONG)

    def test_unknown_keys_are_ignored_without_c(self) -> None:
        values = self.auto("Version: 2\nBogus: 1\nProfile:\n  CPU: x\nMemoryLimit: 5\nSocket:\n")
        self.assertEqual(self.without_path(values), {"version": 2})

    def test_missing_version_without_c_is_the_version_setting_error(self) -> None:
        self.assertConfigError(lambda: self.auto("Concurrency: 8\n"), VERSION_WRONG)


class VersionTests(ConfigTestCase):
    def test_versions(self) -> None:
        cases: dict[str, int | None] = {
            "Version: 1\n": 1,
            "Version: 2\n": 2,
            "Version: 2.0\n": 2,  # yaml.v2 decodes an integral float into an int
            "Version: 0x2\n": 2,
            "Version: 0\n": None,
            "Version: 3\n": None,
            "Version: -1\n": None,
            "Version:\n": None,
            "Version: ~\n": None,
            "": None,
            "# only a comment\n": None,
            "{}\n": None,
            "~\n": None,
            "---\n...\n": None,
        }
        for text, expected in cases.items():
            for read in (self.strict, self.auto):
                if expected is None:
                    self.assertConfigError(lambda t=text, f=read: f(t), VERSION_WRONG)
                else:
                    self.assertEqual(read(text)["version"], expected, text)

    def test_quoted_version_is_a_type_error(self) -> None:
        self.assertConfigError(
            lambda: self.strict('Version: "2"\n'),
            UNMARSHAL + "line 1: cannot unmarshal !!str `2` into int",
        )
        self.assertConfigError(
            lambda: self.strict("Version: ''\n"),
            UNMARSHAL + "line 1: cannot unmarshal !!str `` into int",
        )

    def test_version_1_file_reads_tcp_address(self) -> None:
        values = self.strict("Version: 1\nSocket:\n  TCPAddress: 0.0.0.0:2001\n")
        self.assertEqual(resolve(values, {}).tcp_address, "0.0.0.0:2001")
        self.assertEqual(resolve(values, {}).version, 1)


class TypeErrorTests(ConfigTestCase):
    """yaml.v2's "cannot unmarshal" errors, on one line."""

    def test_type_errors(self) -> None:
        cases = {
            "Concurrency: abc\n": "line 2: cannot unmarshal !!str `abc` into int",
            "Concurrency: 'abc'\n": "line 2: cannot unmarshal !!str `abc` into int",
            "Concurrency: true\n": "line 2: cannot unmarshal !!bool `true` into int",
            "TotalBufferSizeMB: 2.5\n": "line 2: cannot unmarshal !!float `2.5` into int",
            "TotalBufferSizeMB: .inf\n": "line 2: cannot unmarshal !!float `.inf` into int",
            "TotalBufferSizeMB: 9223372036854775808\n": (
                "line 2: cannot unmarshal !!int `9223372...` into int"
            ),
            "TotalBufferSizeMB: 99999999999999999999\n": (
                "line 2: cannot unmarshal !!float `9999999...` into int"
            ),
            "Concurrency: 2001-02-03\n": (
                "line 2: cannot unmarshal !!timestamp `2001-02-03` into int"
            ),
            "Concurrency: [1]\n": "line 2: cannot unmarshal !!seq into int",
            "LocalMode: 1\n": "line 2: cannot unmarshal !!int `1` into bool",
            "LocalMode: 'true'\n": "line 2: cannot unmarshal !!str `true` into bool",
            "LocalMode: maybe\n": "line 2: cannot unmarshal !!str `maybe` into bool",
            "Region: [us-east-1]\n": "line 2: cannot unmarshal !!seq into string",
            "Logging:\n  LogPath:\n    - a\n": "line 4: cannot unmarshal !!seq into string",
            "Socket:\n  UDPAddress:\n    Host: x\n": "line 4: cannot unmarshal !!map into string",
            "Concurrency: abcdefghijkl\n": "line 2: cannot unmarshal !!str `abcdefg...` into int",
            "Concurrency: abcdefghij\n": "line 2: cannot unmarshal !!str `abcdefghij` into int",
            "RequestTimeoutSeconds: soon\n": "line 2: cannot unmarshal !!str `soon` into float64",
        }
        for text, error in cases.items():
            for read in (self.strict, self.auto):
                self.assertConfigError(
                    lambda t=text, f=read: f("Version: 2\n" + t), UNMARSHAL + error
                )

    def test_all_type_errors_are_reported_together(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: 2\nConcurrency: x\nLocalMode: 1\nRegion: [a]\n"),
            UNMARSHAL + "line 2: cannot unmarshal !!str `x` into int; "
            "line 3: cannot unmarshal !!int `1` into bool; "
            "line 4: cannot unmarshal !!seq into string",
        )

    def test_type_error_is_reported_before_the_version_check(self) -> None:
        self.assertConfigError(
            lambda: self.auto("Version: 7\nConcurrency: x\n"),
            UNMARSHAL + "line 2: cannot unmarshal !!str `x` into int",
        )

    def test_strict_key_errors_come_before_type_errors(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: 2\nConcurrency: x\nBogus: 1\n"),
            f"Bogus flag is invalid. {DOCS}",
        )

    def test_parent_that_is_not_a_mapping_without_c(self) -> None:
        # With -c this is "Socket flag is invalid"; without, Go's struct
        # decoding rejects it.
        self.assertConfigError(
            lambda: self.auto("Version: 2\nSocket: 5\n"),
            UNMARSHAL + "line 2: cannot unmarshal !!int `5` into the Socket struct",
        )
        self.assertConfigError(
            lambda: self.auto("Version: 2\nLogging: [a]\n"),
            UNMARSHAL + "line 2: cannot unmarshal !!seq into the Logging struct",
        )

    def test_scalar_with_a_mapping_without_c(self) -> None:
        self.assertConfigError(
            lambda: self.auto("Version: 2\nRegion:\n  Name: x\n"),
            UNMARSHAL + "line 3: cannot unmarshal !!map into string",
        )

    def test_document_that_is_not_a_mapping(self) -> None:
        cases = {
            "- a\n- b\n": "!!seq",
            "hello\n": "!!str `hello`",
            "42\n": "!!int `42`",
        }
        for text, what in cases.items():
            self.assertConfigError(
                lambda t=text: self.strict(t),
                UNMARSHAL + f"line 1: cannot unmarshal {what} into yaml.MapSlice",
            )
            self.assertConfigError(
                lambda t=text: self.auto(t),
                UNMARSHAL + f"line 1: cannot unmarshal {what} into cfg.Config",
            )

    def test_explicit_tag_that_does_not_fit(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: 2\nConcurrency: !!int abc\n"),
            PREFIX + "yaml: cannot decode !!str `abc` as a !!int",
        )


class HintTests(ConfigTestCase):
    """After Go's text: the file, the key, and the key probably meant."""

    def message(self, call: Callable[[], object]) -> str:
        with self.assertRaises(ConfigError) as caught:
            call()
        return str(caught.exception)

    def test_type_error_names_the_file_and_the_key(self) -> None:
        path = self.write("Version: 2\nConcurrency: abc\nSocket:\n  UDPAddress: [a]\n")
        for explicit, search in ((path, ()), (None, [path])):
            self.assertEqual(
                self.message(lambda e=explicit, s=search: load(e, search=s)),
                UNMARSHAL + "line 2: cannot unmarshal !!str `abc` into int; line 4: cannot "
                f"unmarshal !!seq into string (in {path}: Concurrency must be a whole number, "
                "not `abc`; Socket.UDPAddress must be a single value, not a list or a mapping)",
            )

    def test_unknown_key_suggests_the_known_one(self) -> None:
        cases = {
            "Regoin: us-east-2\n": "line 2: did you mean Region?",
            "region: us-east-2\n": "line 2: did you mean Region?",  # case-insensitive
            "Logging:\n  loglevel: info\n": "line 3: did you mean Logging.LogLevel?",
            "Socket:\n  LogLevel: info\n": "line 3: did you mean Logging.LogLevel?",
            "ShutdownTimeout: 3\n": "line 2: did you mean ShutdownTimeoutSeconds?",
            "Bogus: 1\n": "line 2: docs/configuration.md lists every key",
            "Socket: 5\n": "line 2: Socket must hold keys indented below it, e.g. UDPAddress",
        }
        for text, hint in cases.items():
            path = self.write("Version: 2\n" + text)
            message = self.message(lambda p=path: load(p, search=()))
            self.assertTrue(message.endswith(f". {DOCS} (in {path} {hint})"), message)

    def test_other_file_errors_name_the_file(self) -> None:
        cases = {
            "Concurrency: 1\n": f"{VERSION_MISSING} (in {{}}: add Version: 2 to it)",
            "Version: 2\nProfile:\n  CPU: x\n": (
                f"Profile.CPU flag is not supported any more. {DOCS} (in {{}} line 3: remove "
                "Profile.CPU)"
            ),
            "Version: 2\nRegion: [a\n": PREFIX + "yaml: line 3: expected ',' or ']', but got "
            "'<stream end>' (in {})",
            "Version: 7\n": f"{VERSION_WRONG} (in {{}}: Version must be 1 or 2)",
        }
        for text, expected in cases.items():
            path = self.write(text)
            self.assertEqual(self.message(lambda p=path: load(p, search=())), expected.format(path))

    def test_a_missing_file_is_named_once(self) -> None:
        self.assertEqual(
            self.message(lambda: load("/nonexistent/cfg.yaml", search=())),
            PREFIX + "open /nonexistent/cfg.yaml: no such file or directory",
        )


class YamlV2SemanticsTests(ConfigTestCase):
    """Values mean what gopkg.in/yaml.v2 makes of them, not what PyYAML would."""

    def values(self, text: str) -> dict[str, Any]:
        return self.without_path(self.strict("Version: 2\n" + text))

    def test_yaml_1_1_booleans_including_y_and_n(self) -> None:
        for word in ("y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON"):
            self.assertEqual(self.values(f"LocalMode: {word}\n")["local_mode"], True, word)
        for word in ("n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF"):
            self.assertEqual(self.values(f"NoVerifySSL: {word}\n")["no_verify_ssl"], False, word)

    def test_string_keys_keep_the_text_of_any_scalar(self) -> None:
        cases = {
            "Region: 123\n": ("region", "123"),
            "ResourceARN: 1.50\n": ("resource_arn", "1.50"),
            "RoleARN: yes\n": ("role_arn", "yes"),
            "Logging:\n  LogPath: 2024-01-02\n": ("log_path", "2024-01-02"),
            "Logging:\n  LogLevel: info\n": ("log_level", "info"),
            "Socket:\n  UDPAddress: 0x10\n": ("udp_address", "0x10"),
            "Socket:\n  UDPAddress: 1:30\n": ("udp_address", "1:30"),  # not sexagesimal 90
            "Endpoint: 'http://localhost:4566'\n": ("endpoint", "http://localhost:4566"),
        }
        for text, (attr, expected) in cases.items():
            self.assertEqual(self.values(text)[attr], expected, text)

    def test_go_integer_syntax(self) -> None:
        cases = {"0x10": 16, "0o17": 15, "010": 8, "0b101": 5, "1_000": 1000, "+5": 5, "8.0": 8}
        for text, expected in cases.items():
            self.assertEqual(self.values(f"Concurrency: {text}\n")["concurrency"], expected, text)

    def test_zero_and_empty_mean_default_for_go_keys(self) -> None:
        values = self.values(
            "Concurrency: 0\nTotalBufferSizeMB: 0\nRegion: ''\nEndpoint:\n"
            "Logging:\n  LogLevel: ''\n"
        )
        self.assertEqual(values, {"version": 2})
        settings = resolve(self.strict("Version: 2\nConcurrency: 0\n"), {})
        self.assertEqual(settings.concurrency, 8)

    def test_false_is_a_value_not_a_default(self) -> None:
        self.assertEqual(self.values("Logging:\n  LogRotation: false\n")["log_rotation"], False)
        settings = resolve(self.strict("Version: 2\nLogging:\n  LogRotation: false\n"), {})
        self.assertFalse(settings.log_rotation)

    def test_extension_keys_use_the_value_as_given(self) -> None:
        values = self.values("Socket:\n  UDPReceiveBufferKB: 0\nRequestTimeoutSeconds: 0\n")
        self.assertEqual(values["udp_receive_buffer_kb"], 0)
        self.assertEqual(values["request_timeout"], 0.0)
        self.assertIsInstance(values["request_timeout"], float)

    def test_only_the_first_document_is_read(self) -> None:
        values = self.values("Region: first\n---\nRegion: second\nBogus: 1\n")
        self.assertEqual(values["region"], "first")

    def test_merge_keys(self) -> None:
        text = "Version: 2\nx-common: &common\n  UDPAddress: 0.0.0.0:2000\nSocket:\n  <<: *common\n"
        # x-common itself is an unknown key, so only the auto-discovered path
        # accepts the file; the merged value is used.
        self.assertEqual(self.auto(text)["udp_address"], "0.0.0.0:2000")

    def test_last_duplicate_wins(self) -> None:
        self.assertEqual(self.values("Region: a\nRegion: b\n")["region"], "b")

    def test_dotted_top_level_key_passes_the_check_but_is_not_used(self) -> None:
        # Go compares flattened names, so a literal "Socket.UDPAddress" key
        # passes strict validation, but the struct decoding never reads it.
        text = 'Version: 2\n"Socket.UDPAddress": 0.0.0.0:9\n'
        for read in (self.strict, self.auto):
            self.assertEqual(self.without_path(read(text)), {"version": 2})

    def test_quoted_keys(self) -> None:
        values = self.without_path(self.strict('"Version": 2\n"Region": x\n'))
        self.assertEqual(values, {"version": 2, "region": "x"})


class FileAndSyntaxErrorTests(ConfigTestCase):
    def test_missing_file(self) -> None:
        path = temp_path(self)
        self.assertConfigError(
            lambda: load(path, search=()), f"{PREFIX}open {path}: no such file or directory"
        )

    def test_missing_directory(self) -> None:
        path = os.path.join(temp_path(self), "cfg.yaml")
        self.assertConfigError(
            lambda: load(path, search=()), f"{PREFIX}open {path}: no such file or directory"
        )

    def test_directory(self) -> None:
        path = temp_path(self)
        os.mkdir(path)
        self.assertConfigError(
            lambda: load(path, search=()), f"{PREFIX}read {path}: is a directory"
        )

    def test_unreadable_file(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root can read any file")
        path = self.write("Version: 2\n")
        os.chmod(path, 0)
        self.assertConfigError(
            lambda: load(path, search=()), f"{PREFIX}open {path}: permission denied"
        )

    def test_syntax_errors_are_one_line(self) -> None:
        cases = {
            "Version: 2\nRegion: a: b\n": "yaml: line 2: mapping values are not allowed here",
            "Version: 2\nSocket: [\n": (
                "yaml: line 3: expected the node content, but found '<stream end>'"
            ),
            "Version: 2\nRegion: 'open\n": "yaml: line 3: found unexpected end of stream",
            "Version: 2\n\tRegion: x\n": (
                "yaml: line 2: found character '\\t' that cannot start any token"
            ),
        }
        for text, error in cases.items():
            for read in (self.strict, self.auto):
                self.assertConfigError(lambda t=text, f=read: f(t), PREFIX + error)

    def test_bad_bytes_are_one_line(self) -> None:
        cases = {
            b"Version: 2\n\x00": "yaml: control characters are not allowed (#x0000 at offset 11)",
            b"Version: 2\nRegion: \xff\n": (
                "yaml: invalid utf-8 byte #xff at offset 19: invalid start byte"
            ),
        }
        for raw, error in cases.items():
            self.assertConfigError(lambda r=raw: self.strict(r), PREFIX + error)

    def test_deep_nesting_is_an_error_not_a_crash(self) -> None:
        self.assertConfigError(
            lambda: self.strict("Version: " + "[" * 3000 + "]" * 3000 + "\n"),
            PREFIX + "yaml: the document is nested too deeply",
        )

    def test_huge_file(self) -> None:
        self.patch(cfg_yaml, "MAX_FILE_BYTES", 100)
        path = self.write("#" * 101)
        self.assertConfigError(
            lambda: load(path, search=()), f"{PREFIX}read {path}: file is larger than 100 bytes"
        )
        # Exactly the limit is fine.
        at_limit = self.write("#" * 89 + "\nVersion: 2")
        self.assertEqual(load(at_limit, search=())["version"], 2)

    def test_default_size_limit(self) -> None:
        self.assertEqual(cfg_yaml.MAX_FILE_BYTES, 1024 * 1024)


class SearchPathTests(ConfigTestCase):
    def test_default_search_path(self) -> None:
        self.assertEqual(SEARCH_PATHS, ("/etc/amazon/xray/cfg.yaml", "cfg.yaml"))

    def test_first_existing_file_wins(self) -> None:
        first = self.write("Version: 2\nRegion: first\n")
        second = self.write("Version: 2\nRegion: second\n")
        missing = temp_path(self)
        self.assertEqual(load(None, search=[first, second])["region"], "first")
        self.assertEqual(load(None, search=[missing, second])["region"], "second")
        self.assertEqual(load(None, search=[missing, second])["config_path"], second)
        self.assertEqual(load(None, search=[missing]), {})
        self.assertEqual(load(None, search=[]), {})

    def test_missing_parent_directory_is_skipped(self) -> None:
        second = self.write("Version: 2\nRegion: second\n")
        under_missing = os.path.join(temp_path(self), "cfg.yaml")
        under_file = os.path.join(second, "cfg.yaml")  # ENOTDIR
        self.assertEqual(load(None, search=[under_missing, under_file, second])["region"], "second")

    def test_existing_but_unusable_path_is_an_error(self) -> None:
        # Like Go: a path that exists is loaded, so a directory (or an
        # unreadable file) fails loudly instead of being skipped.
        directory = temp_path(self)
        os.mkdir(directory)
        good = self.write("Version: 2\n")
        self.assertConfigError(
            lambda: load(None, search=[directory, good]),
            f"{PREFIX}read {directory}: is a directory",
        )

    def test_path_that_cannot_be_checked_is_an_error(self) -> None:
        # os.stat fails with something other than "does not exist" (here a
        # symlink loop): Go goes on to read it and fails; so do we.
        loop = temp_path(self)
        os.symlink(loop, loop)
        good = self.write("Version: 2\n")
        self.assertConfigError(
            lambda: load(None, search=[loop, good]),
            f"{PREFIX}open {loop}: too many levels of symbolic links",
        )

    def test_relative_name_is_looked_up_in_the_working_directory(self) -> None:
        directory = temp_path(self)
        os.mkdir(directory)
        with open(os.path.join(directory, "cfg.yaml"), "w") as f:
            f.write("Version: 2\nRegion: from-cwd\n")
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(directory)
        self.assertEqual(load(None, search=("cfg.yaml",))["region"], "from-cwd")

    def test_explicit_file_skips_the_search_path_entirely(self) -> None:
        broken = self.write("Version: 2\nConcurrency: [\n")
        good = self.write("Version: 2\nRegion: good\n")
        # The broken file would fail if it were read at all.
        self.assertRaises(ConfigError, load, None, search=[broken])
        self.assertEqual(load(good, search=[broken])["region"], "good")

    def test_explicit_file_is_not_replaced_by_search_path_when_missing(self) -> None:
        missing = temp_path(self)
        fallback = self.write("Version: 2\n")
        self.assertRaises(ConfigError, load, missing, search=[fallback])

    def test_empty_c_counts_as_no_c(self) -> None:
        found = self.write("Version: 2\nRegion: found\nBogus: 1\n")
        self.assertEqual(load("", search=[found])["region"], "found")

    def test_find_config_file(self) -> None:
        path = self.write("Version: 2\n")
        self.assertEqual(loader.find_config_file("/x.yaml", [path]), ("/x.yaml", True))
        self.assertEqual(loader.find_config_file(None, [path]), (path, False))
        self.assertEqual(loader.find_config_file(None, [temp_path(self)]), (None, False))


class PrecedenceTests(ConfigTestCase):
    """CLI > file > defaults."""

    def settings(self, file_text: str | None, argv: Iterable[str]) -> Settings:
        parsed = go_flags.parse(list(argv))
        search = [self.write(file_text)] if file_text is not None else []
        return resolve(load(parsed.config, search=search), parsed.overrides)

    def test_defaults(self) -> None:
        self.assertEqual(resolve({}, {}), Settings())
        self.assertEqual(self.settings(None, []), Settings())
        for key in KEYS:
            self.assertEqual(getattr(Settings(), key.attr), key.default, key.name)

    def test_file_beats_defaults_and_cli_beats_file(self) -> None:
        text = (
            "Version: 2\nRegion: file-region\nConcurrency: 4\nSocket:\n  UDPAddress: 0.0.0.0:3000\n"
        )
        from_file = self.settings(text, [])
        self.assertEqual(
            (from_file.region, from_file.concurrency, from_file.udp_address),
            ("file-region", 4, "0.0.0.0:3000"),
        )
        both = self.settings(text, ["-n", "cli-region", "--concurrency=2"])
        self.assertEqual(
            (both.region, both.concurrency, both.udp_address), ("cli-region", 2, "0.0.0.0:3000")
        )

    def test_bool_true_in_file_and_false_on_command_line(self) -> None:
        text = "Version: 2\nLocalMode: true\nNoVerifySSL: true\n"
        self.assertTrue(self.settings(text, []).local_mode)
        self.assertFalse(self.settings(text, ["-o=false"]).local_mode)
        self.assertFalse(self.settings(text, ["--local-mode=false"]).local_mode)
        self.assertTrue(self.settings(text, ["--local-mode=false"]).no_verify_ssl)
        self.assertFalse(self.settings(text, ["--no-verify-ssl=0"]).no_verify_ssl)

    def test_bool_false_in_file_and_true_on_command_line(self) -> None:
        text = "Version: 2\nLogging:\n  LogRotation: false\n"
        self.assertFalse(self.settings(text, []).log_rotation)
        self.assertTrue(self.settings(text, ["--log-rotation"]).log_rotation)

    def test_explicit_empty_or_zero_on_command_line_beats_file(self) -> None:
        text = "Version: 2\nRegion: file-region\nTotalBufferSizeMB: 10\n"
        settings = self.settings(text, ["-n", "", "-m", "0"])
        self.assertEqual((settings.region, settings.buffer_memory_mb), ("", 0))

    def test_with_c(self) -> None:
        path = self.write("Version: 1\nRegion: c-region\nLogging:\n  LogLevel: debug\n")
        settings = self.settings("Version: 2\nRegion: searched\n", ["-c", path, "-l", "warn"])
        self.assertEqual((settings.region, settings.log_level), ("c-region", "warn"))
        self.assertEqual(settings.config_path, path)
        self.assertEqual(settings.version, 1)

    def test_config_path_is_not_part_of_equality(self) -> None:
        self.assertEqual(Settings(config_path="/a"), Settings())
        self.assertEqual(Settings().replace(region="x").region, "x")


class ValidateTests(SynchronousTestCase):
    def invalid(self, message_part: str, **changes: Any) -> None:
        with self.assertRaises(ConfigError) as caught:
            resolve({}, changes)
        self.assertIn(message_part, str(caught.exception))
        self.assertNotIn("\n", str(caught.exception))

    def test_log_levels(self) -> None:
        self.assertEqual(LOG_LEVELS, ("dev", "debug", "info", "warn", "error", "prod"))
        for level in LOG_LEVELS:
            self.assertEqual(resolve({}, {"log_level": level}).log_level, level)
        for bad in ("bogus", "INFO", "", "trace"):
            self.invalid(f"Invalid log level {bad!r}: use one of dev, debug", log_level=bad)

    def test_buffer_memory(self) -> None:
        self.assertEqual(MIN_BUFFER_MB, 3)
        for ok in (0, 3, 4096):
            self.assertEqual(resolve({}, {"buffer_memory_mb": ok}).buffer_memory_mb, ok)
        for small in (1, 2):
            with self.assertRaises(ConfigError) as caught:
                resolve({}, {"buffer_memory_mb": small})
            self.assertEqual(
                str(caught.exception),
                "Not enough Buffers Memory Allocated. Min Buffers Memory required: 3 MB.",
            )
        self.invalid("Invalid buffer memory -1 MB: use 0 for automatic", buffer_memory_mb=-1)

    def test_negative_values_from_the_file_are_errors(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            resolve({"concurrency": -1}, {})
        self.assertIn("Invalid Concurrency -1", str(caught.exception))
        with self.assertRaises(ConfigError):
            resolve({"buffer_memory_mb": -5}, {})

    def test_concurrency(self) -> None:
        self.assertEqual(resolve({}, {"concurrency": 1}).concurrency, 1)
        for bad in (0, -3):
            self.invalid(f"Invalid Concurrency {bad}: at least 1", concurrency=bad)

    def test_timeouts(self) -> None:
        self.assertEqual(resolve({}, {"request_timeout": 0.5}).request_timeout, 0.5)
        for bad in (0.0, -1.0, math.nan, math.inf):
            self.invalid("Invalid RequestTimeoutSeconds", request_timeout=bad)
            self.invalid("Invalid ShutdownTimeoutSeconds", shutdown_timeout=bad)

    def test_udp_receive_buffer(self) -> None:
        for ok in (0, 1, table.MAX_UDP_RECEIVE_BUFFER_KB):
            self.assertEqual(resolve({}, {"udp_receive_buffer_kb": ok}).udp_receive_buffer_kb, ok)
        for bad in (-1, table.MAX_UDP_RECEIVE_BUFFER_KB + 1):
            self.invalid("Invalid Socket.UDPReceiveBufferKB", udp_receive_buffer_kb=bad)

    def test_udp_read_interval(self) -> None:
        self.assertEqual(resolve({}, {}).udp_read_interval_ms, 20.0)
        for ok in (0.0, 2.5, 1000.0):
            self.assertEqual(resolve({}, {"udp_read_interval_ms": ok}).udp_read_interval_ms, ok)
        for bad in (-1.0, 1000.5, math.nan, math.inf):
            self.invalid("Invalid Socket.UDPReadIntervalMS", udp_read_interval_ms=bad)

    def test_tcp_port_limits(self) -> None:
        settings = resolve({}, {})
        self.assertEqual(
            (settings.tcp_max_connections, settings.tcp_max_connections_per_peer), (0, 0)
        )
        self.assertEqual((settings.tcp_hold_kb, settings.stream_idle_timeout), (0, 300.0))
        self.assertEqual(settings.proxy_request_deadline, 10.0)
        self.assertEqual(resolve({}, {"stream_idle_timeout": 0.0}).stream_idle_timeout, 0.0)
        for attr, key in (
            ("tcp_max_connections", "Socket.TCPMaxConnections"),
            ("tcp_max_connections_per_peer", "Socket.TCPMaxConnectionsPerPeer"),
            ("tcp_hold_kb", "Socket.TCPHoldKB"),
        ):
            self.invalid(f"Invalid {key} -1: must be 0 (automatic) or more", **{attr: -1})
        for bad in (-1.0, math.nan, math.inf):
            self.invalid("Invalid Socket.StreamIdleTimeoutSeconds", stream_idle_timeout=bad)
        for bad in (0.0, -1.0, math.nan):
            self.invalid("Invalid SamplingProxy.RequestDeadlineSeconds", proxy_request_deadline=bad)
        # The hold budget must fit one of the longest lines or bodies allowed.
        self.assertEqual(resolve({}, {"tcp_hold_kb": 1024}).tcp_hold_kb, 1024)
        self.invalid(
            "Invalid Socket.TCPHoldKB 1000: must hold at least one of the longest lines or "
            "bodies allowed (2048 KB",
            tcp_hold_kb=1000,
            stream_max_line_kb=2048,
        )

    def test_proxy_allow(self) -> None:
        ok = "/TraceSummaries, GetServiceGraph,*"
        self.assertEqual(resolve({}, {"proxy_allow": ok}).proxy_allow, ok)
        self.invalid(
            "Invalid SamplingProxy.Allow '/Nope,Deletesamplingrule': /Nope, Deletesamplingrule: "
            "not an X-Ray API path or operation name",
            proxy_allow="/Nope,Deletesamplingrule",
        )

    def test_local_sampling_rate(self) -> None:
        for ok in (0.0, 0.05, 1.0):
            self.assertEqual(resolve({}, {"local_sampling_rate": ok}).local_sampling_rate, ok)
        for bad in (-0.1, 1.5, math.nan):
            self.invalid("Invalid LocalSampling.FixedRate", local_sampling_rate=bad)

    def test_udp_read_adaptive(self) -> None:
        self.assertTrue(resolve({}, {}).udp_read_adaptive)
        self.assertFalse(resolve({}, {"udp_read_adaptive": False}).udp_read_adaptive)

    def test_proxy_address_needs_a_scheme(self) -> None:
        self.assertEqual(
            resolve({}, {"proxy_address": "http://proxy:3128"}).proxy_address, "http://proxy:3128"
        )
        self.invalid("Bad proxy URL: 'proxy:3128' has no scheme", proxy_address="proxy:3128")

    def test_endpoint_is_checked_like_the_endpoints_module(self) -> None:
        for ok in ("https://xray.us-east-1.amazonaws.com", "HTTP://[::1]:4566/prefix"):
            self.assertEqual(resolve({}, {"endpoint": ok}).endpoint, ok)
        for bad in ("xray.us-east-1.amazonaws.com", "ftp://x", "http://[::1", "https://h:99999"):
            self.invalid(f"Invalid endpoint {bad!r}", endpoint=bad)


class ParseGoIntTests(SynchronousTestCase):
    """strconv.ParseInt(s, 0, 64), used by -m and by the YAML resolver."""

    def test_values(self) -> None:
        cases = {
            "0": 0,
            "7": 7,
            "-7": -7,
            "+7": 7,
            "010": 8,
            "0o17": 15,
            "0O17": 15,
            "0x1F": 31,
            "0X1f": 31,
            "0b101": 5,
            "-0x10": -16,
            "1_000": 1000,
            "0x_1F": 31,
            "0_7": 7,
            "9223372036854775807": 2**63 - 1,
            "-9223372036854775808": -(2**63),
        }
        for text, expected in cases.items():
            self.assertEqual(parse_go_int(text), expected, text)

    def test_errors(self) -> None:
        cases = {
            "": "parse error",
            "-": "parse error",
            "abc": "parse error",
            " 5": "parse error",
            "5 ": "parse error",
            "08": "parse error",
            "0x": "parse error",
            "0b2": "parse error",
            "1.5": "parse error",
            "_1": "parse error",
            "1_": "parse error",
            "1__0": "parse error",
            "+-1": "parse error",
            "\u0661\u0662": "parse error",  # Arabic-Indic digits: not Go digits
            "9223372036854775808": "value out of range",
            "-9223372036854775809": "value out of range",
        }
        for text, error in cases.items():
            with self.assertRaises(ValueError) as caught:
                parse_go_int(text)
            self.assertEqual(str(caught.exception), error, text)

    def test_very_long_numbers_are_quick(self) -> None:
        with self.assertRaises(ValueError) as caught:
            parse_go_int("9" * 200_000)
        self.assertEqual(str(caught.exception), "value out of range")
        self.assertRaises(ValueError, parse_go_int, "9" * 200_000 + "x")

    def test_bit_size(self) -> None:
        self.assertEqual(parse_go_int("127", 8), 127)
        self.assertRaises(ValueError, parse_go_int, "128", 8)


class TableTests(SynchronousTestCase):
    def test_lookups(self) -> None:
        self.assertEqual(len(KEYS_BY_NAME), len(KEYS))
        self.assertEqual(len(KEYS_BY_ATTR), len(KEYS))
        for key in KEYS:
            self.assertIs(KEYS_BY_NAME[key.name], key)
            self.assertIs(KEYS_BY_ATTR[key.attr], key)
            self.assertIn(key.kind, ("int", "float", "str", "bool"))

    def test_flags_are_unique(self) -> None:
        shorts = [k.short for k in KEYS if k.short]
        longs = [k.long for k in KEYS if k.long]
        self.assertEqual(len(shorts), len(set(shorts)))
        self.assertEqual(len(longs), len(set(longs)))
        # Every setting but the file format version is on the command line.
        self.assertEqual([k.name for k in KEYS if not k.long], ["Version"])
