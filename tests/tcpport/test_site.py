"""Helpers of the TCP port's HTTP side (xraytwisted.tcpport.site)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyRequest

from tests.support.daemon import clean_env
from tests.support.tempdirs import temp_path
from xraytwisted.settings.loader import SEARCH_PATHS
from xraytwisted.tcpport.site import LazyResource


class _Page(Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Request) -> bytes:
        return self.body


class LazyResourceTests(SynchronousTestCase):
    def mktemp_dir(self) -> str:
        path = temp_path(self)
        os.makedirs(path)
        return path

    def test_built_once_on_first_request(self) -> None:
        built: list[_Page] = []

        def factory() -> _Page:
            built.append(_Page(b"page %d" % len(built)))
            return built[-1]

        lazy = LazyResource(factory)
        self.assertEqual(built, [])
        self.assertEqual(lazy.render(DummyRequest([b""])), b"page 0")
        self.assertEqual(lazy.render(DummyRequest([b""])), b"page 0")
        self.assertEqual(len(built), 1)

    def test_daemon_imports_prometheus_only_when_scraped(self) -> None:
        # A fresh interpreter: in this one other tests import it anyway.
        # Without a cfg.yaml, PyYAML is not imported either (see cfgfile).
        script = textwrap.dedent(
            """
            import sys
            from twisted.internet import reactor
            from twisted.web.test.requesthelper import DummyRequest
            from xraytwisted import tap
            options = tap.Options()
            options.parseOptions(["-n", "us-east-2", "-b", "127.0.0.1:0", "-t", "127.0.0.1:0",
                                  "-e", "http://127.0.0.1:9"])
            daemon = tap.makeService(options, reactor)
            print("yaml" in sys.modules, "prometheus_client" in sys.modules)
            request = DummyRequest([b"metrics"])
            request.path = b"/metrics"
            body = daemon.parts.tcp.factory.site.resource.render(request)
            print("prometheus_client" in sys.modules)
            print(b"xray_daemon_segments_received_total 0.0" in body)
            """
        )
        env = clean_env()
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=env,
            cwd=self.mktemp_dir(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        yaml_expected = str(os.path.exists(SEARCH_PATHS[0]))
        self.assertEqual(done.stdout.split(), [yaml_expected, "False", "True", "True"], done.stderr)
