"""A real ``proxy.py`` (PyPI ``proxy.py``) process on 127.0.0.1, for outbound-client tests.

:func:`start_proxy` starts ``python -m proxy`` on a free port (``--port 0``; the
port is read from ``--port-file``, so there is no race for it) with a small
plugin, written into the proxy's private temp dir and loaded with
``--plugins``, that

* records every request the proxy accepted - CONNECTs and forwarded plain
  HTTP requests, after ``--basic-auth`` checked them - one JSON line per
  request (:meth:`ProxyPy.seen`, :meth:`ProxyPy.connects`);
* "resolves" the names in ``hosts`` (default :data:`tests.support.tls.FAKE_HOST`)
  to 127.0.0.1 without DNS, so tests can CONNECT to a real-looking host name
  whose certificate is checked, while the only route to it is the proxy.

The process gets a short whitelisted environment, runs in its own session
(proxy.py forks worker processes; :meth:`ProxyPy.stop` ends that whole group,
which we created), and has a watchdog on its stdin: when the test process
goes away the pipe closes and the proxy ends its own group.  Start-up takes
well under a second; it is bounded by :data:`STARTUP_TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

from tests.support.tls import FAKE_HOST, LOCALHOST

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0

_PLUGIN_MODULE = "xraytwisted_test_proxy_plugin"
_PLUGIN = '''\
import json
import os

from proxy.http.proxy import HttpProxyBasePlugin

_RECORD = os.environ["XRT_PROXY_RECORD"]
_HOSTS = json.loads(os.environ.get("XRT_PROXY_HOSTS", "{}"))


class RecordingPlugin(HttpProxyBasePlugin):
    """Records each request the proxy goes ahead with; maps test host names to IPs."""

    def before_upstream_connection(self, request):
        headers = request.headers or {}
        record = {
            "method": (request.method or b"").decode("latin-1"),
            "host": (request.host or b"").decode("latin-1"),
            "port": request.port,
            "path": (request.path or b"").decode("latin-1"),
            "proxy_authorization": b"proxy-authorization" in headers,
        }
        with open(_RECORD, "a") as f:
            f.write(json.dumps(record) + "\\n")
        return request

    def resolve_dns(self, host, port):
        return _HOSTS.get(host), None
'''

# Runs proxy.py's own entry point plus a watchdog: the parent holds the write end
# of our stdin and never writes, so EOF means it is gone (or stop() closed it).
_BOOTSTRAP = """\
import os, signal, sys, threading

def _end_when_parent_is_gone():
    try:
        while os.read(0, 4096):
            pass
    finally:
        os.killpg(os.getpgid(0), signal.SIGKILL)

threading.Thread(target=_end_when_parent_is_gone, daemon=True).start()
from proxy import entry_point
entry_point()
"""

_INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "SYSTEMROOT")


class ProxyPyError(RuntimeError):
    """proxy.py could not be started."""


@dataclass(frozen=True)
class Seen:
    method: str
    host: str
    port: int
    path: str
    proxy_authorization: bool


class ProxyPy:
    """One proxy.py process; :meth:`start` it, :meth:`stop` it."""

    def __init__(
        self,
        *,
        basic_auth: str | None = None,
        hosts: Mapping[str, str] | None = None,
    ) -> None:
        self.basic_auth = basic_auth
        self.hosts = dict({FAKE_HOST: LOCALHOST} if hosts is None else hosts)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._tmpdir = ""
        self._final_output = ""

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"

    def url_with_credentials(self, user: str, password: str) -> str:
        return f"http://{user}:{password}@{LOCALHOST}:{self.port}"

    @property
    def _record_path(self) -> str:
        return os.path.join(self._tmpdir, "seen.jsonl")

    @property
    def _log_path(self) -> str:
        return os.path.join(self._tmpdir, "proxy.log")

    def start(self) -> None:
        if self._process is not None:
            raise ProxyPyError("this proxy has already been started")
        self._tmpdir = tempfile.mkdtemp(prefix="xraytwisted-proxypy-")
        with open(os.path.join(self._tmpdir, _PLUGIN_MODULE + ".py"), "w") as f:
            f.write(_PLUGIN)
        port_file = os.path.join(self._tmpdir, "port")
        command = [
            sys.executable, "-c", _BOOTSTRAP,
            "--hostname", LOCALHOST,
            "--port", "0",
            "--port-file", port_file,
            "--num-acceptors", "1",
            "--num-workers", "1",
            "--plugins", f"{_PLUGIN_MODULE}.RecordingPlugin",
        ]  # fmt: skip
        if self.basic_auth is not None:
            command += ["--basic-auth", self.basic_auth]
        env = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
        env.update(
            PYTHONPATH=self._tmpdir,
            PYTHONUNBUFFERED="1",
            HOME=self._tmpdir,
            XRT_PROXY_RECORD=self._record_path,
            XRT_PROXY_HOSTS=json.dumps(self.hosts),
            NO_PROXY="*",
        )
        try:
            with open(self._log_path, "wb") as log:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self._tmpdir,
                    close_fds=True,
                    start_new_session=True,
                )
            self.port = self._wait_for_port(port_file, time.monotonic() + STARTUP_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    def _wait_for_port(self, port_file: str, deadline: float) -> int:
        assert self._process is not None
        while True:
            try:
                with open(port_file) as f:
                    text = f.read()
                if text.endswith("\n"):
                    return int(text.split()[0])
            except OSError:
                pass
            status = self._process.poll()
            if status is not None:
                raise self._failure(f"proxy.py exited with status {status} while starting")
            if time.monotonic() > deadline:
                raise self._failure(f"proxy.py did not listen within {STARTUP_TIMEOUT} s")
            time.sleep(0.02)

    def stop(self) -> None:
        """End the proxy's process group and remove its files.  Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            try:
                if process.poll() is None:
                    # The group is the session start_new_session created for it.
                    os.killpg(process.pid, signal.SIGTERM)
                    try:
                        process.wait(STOP_TIMEOUT)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
                        process.wait(STOP_TIMEOUT)
            except ProcessLookupError:
                pass
            finally:
                if process.stdin is not None:
                    process.stdin.close()
        if self._tmpdir:
            self._final_output = self._read(self._log_path)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = ""

    def seen(self) -> list[Seen]:
        """Every request the proxy accepted so far, oldest first."""
        if not self._tmpdir:
            return []
        lines = self._read(self._record_path).splitlines()
        return [Seen(**json.loads(line)) for line in lines if line.strip()]

    def connects(self) -> list[str]:
        """``host:port`` of every CONNECT the proxy accepted."""
        return [f"{s.host}:{s.port}" for s in self.seen() if s.method == "CONNECT"]

    def output(self) -> str:
        return self._read(self._log_path) if self._tmpdir else self._final_output

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _failure(self, message: str) -> ProxyPyError:
        output = self.output().strip()[-8000:]
        return ProxyPyError(f"{message}\n--- proxy.py output ---\n{output or '(none)'}")


def start_proxy(
    case: SynchronousTestCase,
    *,
    basic_auth: str | None = None,
    hosts: Mapping[str, str] | None = None,
) -> ProxyPy:
    """Start proxy.py for one test; stopped (and its output logged) by ``addCleanup``."""
    from twisted.logger import Logger

    proxy = ProxyPy(basic_auth=basic_auth, hosts=hosts)
    proxy.start()

    def stop() -> None:
        proxy.stop()
        Logger().info("proxy.py output:\n{output}", output=proxy.output())

    case.addCleanup(stop)
    return proxy
