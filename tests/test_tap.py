"""The twistd plugin: options, makeService, and real twistd processes."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import resource
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.logger import LogLevel
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tests.support import daemon as support
from tests.support.daemon import DaemonProcess, clean_env, run_twistd
from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_dir, temp_path
from xraytwisted import __version__, tap
from xraytwisted.daemon import NO_REGION, XRayDaemon
from xraytwisted.listen.bounded_site import BoundedSite

GO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) \[(\w+)\] (.*)$")


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(argv))
        return options

    def test_go_style_flags(self) -> None:
        options = self.parse("-region", "us-east-2", "--bind=127.0.0.1:3000", "-o", "-m=12")
        self.assertEqual(
            options.parsed.overrides,
            {
                "region": "us-east-2",
                "udp_address": "127.0.0.1:3000",
                "local_mode": True,
                "buffer_memory_mb": 12,
            },
        )

    def test_unknown_flag_is_a_usage_error(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            self.parse("--bogus")
        self.assertEqual(str(caught.exception), "flag provided but not defined: -bogus")

    def test_help_prints_go_layout_and_exits_0(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as caught:
            self.parse("-h")
        self.assertEqual(caught.exception.code, 0)
        self.assertTrue(out.getvalue().startswith("Usage: twistd xray [options]\n"))
        self.assertIn("\t-n\t--region\t", out.getvalue())

    def test_version(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        with self.assertRaises(SystemExit) as caught:
            self.parse("-v")
        self.assertEqual(caught.exception.code, 0)
        self.assertEqual(out.getvalue(), f"AWS X-Ray daemon version: {__version__}\n")

    def test_health_check_asks_and_exits(self) -> None:
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with socket.socket() as s:  # bound, not listening: connections are refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            with self.assertRaises(SystemExit) as caught:
                self.parse("--health-check", "-t", f"127.0.0.1:{port}")
        self.assertEqual(caught.exception.code, 1)
        self.assertTrue(
            err.getvalue().startswith(f"unhealthy: cannot get http://127.0.0.1:{port}/health: "),
            err.getvalue(),
        )


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.stderr = io.StringIO()
        self.patch(sys, "stderr", self.stderr)
        self.cwd = Path(temp_path(self))
        self.cwd.mkdir()
        old = os.getcwd()
        os.chdir(self.cwd)  # no stray ./cfg.yaml is picked up
        self.addCleanup(os.chdir, old)
        for name in ("AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_XRAY"):
            if name in os.environ:
                self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != name})
        botocore_log = logging.getLogger("botocore")  # makeService routes it
        saved = (list(botocore_log.handlers), botocore_log.level, botocore_log.propagate)
        self.addCleanup(self._restore_botocore_log, botocore_log, saved)

    @staticmethod
    def _restore_botocore_log(logger: logging.Logger, saved: tuple[Any, int, bool]) -> None:
        logger.handlers[:] = saved[0]
        logger.setLevel(saved[1])
        logger.propagate = saved[2]

    def make(self, *argv: str) -> XRayDaemon:
        options = tap.Options()
        options.parseOptions(list(argv))
        return tap.makeService(options, reactor)

    def assert_fails_with(self, argv: list[str], message: str) -> None:
        with self.assertRaises(SystemExit) as caught:
            self.make(*argv)
        self.assertEqual(caught.exception.code, 1)
        lines = self.stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        match = GO_LINE.match(lines[0])
        assert match is not None, lines[0]
        self.assertEqual(match.group(2), "Error")
        self.assertIn(message, match.group(3))

    def test_builds_the_daemon(self) -> None:
        daemon = self.make(
            "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0", "-e", "http://127.0.0.1:9",
            "--udp-read-interval", "2.5", "--udp-read-adaptive=false",
        )  # fmt: skip
        assert daemon.parts is not None
        self.assertEqual(daemon.parts.region, "us-east-2")
        self.assertEqual(daemon.parts.udp.read_interval, 0.0025)
        self.assertFalse(daemon.parts.udp.adaptive)
        self.assertEqual(daemon.parts.endpoint.url, "http://127.0.0.1:9")
        # The sockets are bound already; close them.
        daemon.parts.udp.stopService()
        daemon.parts.tcp.stopService()

    def test_botocore_logging_is_routed_into_the_log_at_startup(self) -> None:
        daemon = self.make("-o", "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
                           "--local-sink", str(self.cwd / "sink.jsonl"), "-l", "debug")  # fmt: skip
        self.addCleanup(daemon.parts.tcp.stopService)  # type: ignore[union-attr]
        self.addCleanup(daemon.parts.udp.stopService)  # type: ignore[union-attr]
        events = capture_logs(self)
        logging.getLogger("botocore.credentials").debug("Looking for credentials via: env")
        self.assertEqual(
            [(e["log_level"], e["text"]) for e in events],
            [(LogLevel.debug, "botocore.credentials: Looking for credentials via: env")],
        )
        self.assertEqual(self.stderr.getvalue(), "")

    def test_startup_line_shows_every_setting_and_masks_the_proxy_password(self) -> None:
        from xraytwisted.daemon import summarize
        from xraytwisted.settings.table import KEYS

        daemon = self.make(
            "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
            "-p", "http://user:s3cret@127.0.0.1:3128", "--spool-max-mb", "7",
            "-f", "/tmp/my logs/xray.log",
        )  # fmt: skip
        assert daemon.parts is not None
        self.addCleanup(daemon.parts.udp.stopService)
        self.addCleanup(daemon.parts.tcp.stopService)
        line = summarize(daemon.parts.settings, daemon.parts)
        self.assertNotIn("s3cret", line)
        self.assertIn("proxy-address=http://user:***@127.0.0.1:3128", line)
        self.assertIn("spool-max-mb=7 ", line)
        self.assertIn("request-timeout=5s ", line)
        self.assertIn('log-file="/tmp/my logs/xray.log" ', line)
        self.assertIn("endpoint=https://xray.us-east-2.amazonaws.com ", line)
        names = [field.split("=", 1)[0] for field in shlex.split(line)]
        self.assertEqual(
            names, [k.long or k.attr for k in KEYS if k.attr != "version"] + ["config"]
        )

    def test_tcp_port_limits_are_wired_and_shown_resolved(self) -> None:
        from xraytwisted.daemon import summarize

        daemon = self.make(
            "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
            "--proxy-allow", "GetTraceSummaries", "--proxy-request-deadline", "3",
            "--stream-idle-timeout", "0", "--tcp-max-connections-per-peer", "5",
        )  # fmt: skip
        assert daemon.parts is not None
        self.addCleanup(daemon.parts.udp.stopService)
        self.addCleanup(daemon.parts.tcp.stopService)
        factory = daemon.parts.tcp.factory
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.assertGreaterEqual(factory.max_connections or 0, 1)
        if soft != resource.RLIM_INFINITY:
            self.assertLess(factory.max_connections or 0, soft)
        self.assertEqual(factory.max_per_peer, 5)
        self.assertIsNone(factory.stream_idle)
        assert factory.hold is not None
        self.assertEqual(factory.hold.capacity, 4096 * 1024)
        site = factory.site
        assert isinstance(site, BoundedSite)
        self.assertIs(site.limits.hold, factory.hold)
        self.assertEqual(site.limits.deadline, 3.0)
        proxy = site.limits.overloaded.__self__  # type: ignore[union-attr]
        self.assertEqual(
            proxy.allow, {b"/GetSamplingRules", b"/SamplingTargets", b"/TraceSummaries"}
        )
        line = summarize(daemon.parts.settings, daemon.parts)
        self.assertIn(f"tcp-max-connections={factory.max_connections} ", line)
        self.assertIn("tcp-max-connections-per-peer=5 ", line)
        self.assertIn("tcp-hold=4096KB ", line)
        self.assertIn("proxy-allow=GetTraceSummaries ", line)

    def test_region_from_environment(self) -> None:
        self.patch(os, "environ", {**os.environ, "AWS_REGION": "eu-west-1"})
        daemon = self.make("-b", "127.0.0.1:0", "-t", "127.0.0.1:0")
        assert daemon.parts is not None
        self.assertEqual(daemon.parts.endpoint.url, "https://xray.eu-west-1.amazonaws.com")
        self.assertEqual(daemon.parts.region, "eu-west-1")
        daemon.parts.udp.stopService()
        daemon.parts.tcp.stopService()

    def test_no_region(self) -> None:
        self.assert_fails_with(["-b", "127.0.0.1:0", "-t", "127.0.0.1:0"], NO_REGION)

    def test_missing_config_file(self) -> None:
        self.assert_fails_with(
            ["-c", "/nonexistent/cfg.yaml"],
            "Error occur when using config flag: open /nonexistent/cfg.yaml: no such file",
        )

    def test_invalid_key_in_config_file(self) -> None:
        Path("my.yaml").write_text("Version: 2\nBogus: 1\n")
        self.assert_fails_with(["-c", "my.yaml"], "Bogus flag is invalid.")

    def test_port_in_use(self) -> None:
        taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        self.assert_fails_with(
            ["-n", "us-east-2", "-b", f"127.0.0.1:{port}"],
            f"listen udp 127.0.0.1:{port}: bind: address already in use",
        )

    def test_tcp_port_in_use_is_fatal_too(self) -> None:
        # The Go daemon only logs this and runs on without its sampling proxy;
        # we refuse to start (docs/stream-format.md), and the UDP socket
        # bound just before is released.
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        free_udp = udp.getsockname()[1]
        udp.close()
        self.assert_fails_with(
            ["-n", "us-east-2", "-b", f"127.0.0.1:{free_udp}", "-t", f"127.0.0.1:{port}"],
            f"listen tcp 127.0.0.1:{port}: bind: address already in use",
        )
        again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(again.close)
        again.bind(("127.0.0.1", free_udp))  # not left bound by the failed start

    def test_bad_address(self) -> None:
        self.assert_fails_with(["-n", "us-east-2", "-b", "nonsense"], "missing port in address")

    def test_bad_log_level(self) -> None:
        self.assert_fails_with(["-n", "us-east-2", "-l", "loud"], "Invalid log level 'loud'")

    def test_a_spool_directory_others_can_write_is_refused(self) -> None:
        spool = os.path.join(temp_dir(self), "spool")
        os.mkdir(spool)
        os.chmod(spool, 0o777)
        self.patch(os, "environ", {**os.environ, "AWS_EC2_METADATA_DISABLED": "true"})
        self.assert_fails_with(
            ["-o", "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--spool-dir", spool],
            f"spool directory {spool} is writable by its group and all users (mode 0777)",
        )  # fmt: skip
        self.assertEqual(os.listdir(spool), [])  # not even a lock file


class TwistdProcessTests(SynchronousTestCase):
    """The plugin as users run it: real twistd processes."""

    def setUp(self) -> None:
        self.workdir = Path(temp_path(self)).resolve()
        self.workdir.mkdir()
        self.env = clean_env({"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "SECRET"})

    def test_twistd_help_lists_the_plugin(self) -> None:
        result = run_twistd(["--help"], self.env, str(self.workdir))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout, r"\n\s+xray\s+Receive X-Ray segments")

    def test_plugin_is_discoverable(self) -> None:
        from twisted.plugins import xraytwisted_plugin  # noqa: F401 - must import

        names = [p.tapname for p in getPlugins(IServiceMaker)]
        self.assertIn("xray", names)

    def test_config_error_is_one_line_and_status_1(self) -> None:
        result = run_twistd(["-n", "xray", "-c", "missing.yaml"], self.env, str(self.workdir))
        self.assertEqual(result.returncode, 1)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertRegex(lines[0], r"\[Error\] Error occur when using config flag: open missing")

    def test_foreground_drains_on_sigterm_and_exits_0(self) -> None:
        # Nothing listens on the endpoint: the daemon must still exit 0 once
        # the (short) shutdown deadline passes, and say what it lost.
        sink = socket.socket()
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1]
        sink.close()
        daemon = DaemonProcess(
            ["-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0", "-e", f"http://127.0.0.1:{port}",
             "--shutdown-timeout", "1"],
            self.env,
            str(self.workdir),
        ).start()  # fmt: skip
        self.addCleanup(daemon.kill)
        daemon.send(b'{"id":"1"}')
        daemon.signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(), 0, daemon.output())
        out = daemon.output()
        self.assertIn("[Info] Got shutdown signal: terminated", out)
        self.assertIn("1 segments were not sent and are lost", out)
        for line in out.splitlines():
            self.assertRegex(line, GO_LINE)

    def test_sigterm_as_the_reactor_starts_drains_and_exits_0(self) -> None:
        # The reactor puts twistd's SIGTERM handler in place as it starts
        # ("during startup"), before our "after startup" triggers run; a
        # SIGTERM right then was twistd's: no drain message, exit by the
        # signal.  This twistd sends itself SIGTERM at exactly that point (a
        # trigger registered before the plugin's own, after the reactor's).
        twistd = [
            sys.executable,
            "-c",
            "import os, signal; from twisted.internet import reactor; "
            "reactor.addSystemEventTrigger('during', 'startup', os.kill, os.getpid(), "
            "signal.SIGTERM); from twisted.scripts.twistd import run; run()",
        ]
        self.patch(support, "TWISTD", twistd)
        daemon = DaemonProcess(
            ["-o", "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--local-sink", "-", "--shutdown-timeout", "1"],
            self.env,
            str(self.workdir),
        ).start()  # fmt: skip
        self.addCleanup(daemon.kill)
        self.assertEqual(daemon.wait(), 0, daemon.output())
        out = daemon.output()
        self.assertIn("[Info] Got shutdown signal: terminated", out)
        self.assertNotIn("Received SIGTERM", out)  # twistd's handler

    def test_monitoring_listener_refuses_connections_past_its_cap(self) -> None:
        # Real sockets against a real twistd: the monitoring listener takes
        # the TCP port's per-address limit (lowered to 2 here; its own cap is
        # at most 16), and closes the next connection as soon as it is
        # accepted instead of letting idle clients hold it.
        daemon = DaemonProcess(
            ["-o", "-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
             "--local-sink", str(self.workdir / "sink.jsonl"),
             "--monitoring-address", "127.0.0.1:0", "--tcp-max-connections-per-peer", "2"],
            self.env,
            str(self.workdir),
        ).start()  # fmt: skip
        self.addCleanup(daemon.kill)
        port = int(daemon.wait_for_log(r"Serving /health and /metrics on 127\.0\.0\.1:(\d+)")[1])
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        for s in held:
            self.addCleanup(s.close)
        refused = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.addCleanup(refused.close)
        # Accepted in order (the listen queue is FIFO): the third is closed.
        with contextlib.suppress(ConnectionResetError):  # (closed with a reset)
            self.assertEqual(refused.recv(1), b"")
        held[0].sendall(b"GET /health HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := held[0].recv(65536):
            answer += chunk
        self.assertTrue(answer.startswith(b"HTTP/1.0 200 "), answer[:200])
        daemon.wait_for_log(
            r"\[Warn\] Refusing monitoring connection from 127\.0\.0\.1:\d+: that address "
            r"already has 2 connections open on --monitoring-address"
        )
        daemon.signal(signal.SIGTERM)
        self.assertEqual(daemon.wait(), 0, daemon.output())

    def test_daemonized_with_pidfile(self) -> None:
        pidfile = self.workdir / "xray.pid"
        logfile = self.workdir / "xray.log"
        result = run_twistd(
            [f"--pidfile={pidfile}", "xray", "-n", "us-east-2", "-b", "127.0.0.1:0",
             "-t", "127.0.0.1:0", "-f", str(logfile)],
            self.env,
            str(self.workdir),
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stderr + result.stdout)
        pid = int(pidfile.read_text())
        try:
            deadline = time.monotonic() + 20
            # The credentials line comes from the running reactor, so our
            # signal handlers (installed once it runs) are in place by then.
            while "Using AWS credentials" not in _read(logfile) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertIn("Listening on UDP", _read(logfile))
            os.kill(pid, 0)  # running
        finally:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(pidfile.exists(), "pidfile not removed on exit")
        self.assertIn("Got shutdown signal: terminated", _read(logfile))

    def test_daemonized_start_failure_is_reported_by_the_parent(self) -> None:
        pidfile = self.workdir / "xray.pid"
        result = run_twistd(
            [f"--pidfile={pidfile}", "xray", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0"],
            self.env,
            str(self.workdir),
        )
        self.assertEqual(result.returncode, 1)
        self.assertIn("Cannot fetch region variable", result.stderr)
        self.assertFalse(pidfile.exists())


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
