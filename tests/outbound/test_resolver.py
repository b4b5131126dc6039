"""Name lookups that always complete (outbound.resolver), and uploads out of descriptors.

The last test runs a real upload in a child process whose RLIMIT_NOFILE is
lowered and then used up: the upload must fail at once as "out of file
descriptors", not as an unknown host after its timeout, and nothing may be
logged as an unhandled error.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostResolution
from twisted.trial.unittest import TestCase

from tests.support.daemon import clean_env
from xraytwisted.outbound.resolver import ThreadedResolver

SRC = Path(__file__).resolve().parents[2] / "src"


class Receiver:
    def __init__(self) -> None:
        self.addresses: list[Any] = []
        self.done: Deferred[list[Any]] = Deferred()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        self.resolution = resolution

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.done.callback(self.addresses)


class ResolverTests(TestCase):
    timeout = 20

    async def test_resolves_like_getaddrinfo(self) -> None:
        receiver = Receiver()
        ThreadedResolver(reactor).resolveHostName(receiver, "127.0.0.1", 2000, [IPv4Address])
        self.assertEqual(await receiver.done, [IPv4Address("TCP", "127.0.0.1", 2000)])
        self.assertEqual(receiver.resolution.name, "127.0.0.1")

    async def test_a_lookup_failing_with_emfile_completes_with_no_addresses(self) -> None:
        def out_of_descriptors(*args: object) -> list[Any]:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

        receiver = Receiver()
        ThreadedResolver(reactor, out_of_descriptors).resolveHostName(receiver, "localhost")
        # (Twisted's own resolver never completes this one, and logs an
        # unhandled error when it is collected; trial would fail the test.)
        self.assertEqual(await receiver.done, [])

    async def test_an_upload_out_of_descriptors_says_so(self) -> None:
        script = textwrap.dedent(
            """
            import gc, json, os, resource, socket, sys
            from twisted.internet import reactor
            from twisted.logger import globalLogBeginner, formatEvent
            from xraytwisted.aws import endpoints
            from xraytwisted.aws.credentials import StaticCredentials
            from xraytwisted.aws.sigv4 import Credentials
            from xraytwisted.outbound import resolver
            from xraytwisted.outbound.http_client import make_client, make_pool
            from xraytwisted.pipeline.uploader import Uploader

            logged = []
            globalLogBeginner.beginLoggingTo([lambda e: logged.append(formatEvent(e))],
                                             redirectStandardIO=False)
            resolver.install(reactor)
            server = socket.socket()
            server.bind(("127.0.0.1", 0))
            server.listen(8)
            uploader = Uploader(
                client=make_client(reactor, make_pool(reactor, 1)),
                endpoint=endpoints.parse(f"http://{sys.argv[1]}:{server.getsockname()[1]}"),
                region="us-east-1",
                credentials=StaticCredentials(Credentials("AKID", "SECRET")),
                clock=reactor,
                timeout=30,
            )
            socket.getaddrinfo("localhost", 80)  # load what a lookup imports
            "x".encode("idna")
            reactor.getThreadPool().start()
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
            held = []
            def fill():
                for _ in range(100):
                    try:
                        held.append(os.open(os.devnull, os.O_RDONLY))
                    except OSError:
                        return
            result = {}
            def run():
                fill()
                d = uploader.put_trace_segments([b'{"id":"1"}'])
                def done(outcome):
                    result["class"] = outcome.error.error_class
                    result["message"] = outcome.error.message
                    for fd in held:
                        os.close(fd)
                    reactor.stop()
                d.addCallback(done)
            reactor.callWhenRunning(run)
            reactor.run()
            gc.collect()
            result["unhandled"] = [line for line in logged if "Unhandled" in line]
            print(json.dumps(result))
            """
        )
        with tempfile.TemporaryDirectory() as work:
            for host in ("localhost", "127.0.0.1"):
                done = subprocess.run(
                    [sys.executable, "-c", script, host],
                    env=clean_env({"PYTHONPATH": str(SRC)}),
                    cwd=work,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                self.assertEqual(done.returncode, 0, done.stderr)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                self.assertIn("out of file descriptors", result["message"], (host, result))
                self.assertEqual(result["class"], "OtherCount")
                self.assertEqual(result["unhandled"], [], host)
