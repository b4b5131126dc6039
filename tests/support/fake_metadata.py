"""Fake EC2 instance metadata (IMDSv2) and ECS endpoints, as twisted.web servers on loopback.

These services have no runnable implementation outside AWS, so they are faked;
everything else (STS, X-Ray) comes from a real moto server.

* :class:`FakeIMDS` behaves like IMDSv2 with ``HttpTokens=required``: ``PUT
  /latest/api/token`` (with ``X-aws-ec2-metadata-token-ttl-seconds``) issues a token,
  and every ``GET /latest/meta-data/...`` without a valid
  ``X-aws-ec2-metadata-token`` gets HTTP 401.  It serves ``placement/region``,
  ``hostname``, ``instance-id`` and the role credentials under
  ``iam/security-credentials/`` that botocore's IMDS provider reads.
* :class:`FakeECS` serves the container credentials endpoint (what
  ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` points at; botocore allows loopback) and the
  task metadata endpoint v4 (``ECS_CONTAINER_METADATA_URI_V4`` and ``.../task``).
  With ``auth_token_file`` it is also the EKS Pod Identity agent: it wants that file's
  current content as the ``Authorization`` header, as the agent wants the pod's
  (rotated) service account token.

In-process: ``url = fake.start(case)`` listens on 127.0.0.1 (free port) in the running
reactor and stops listening at cleanup.  Blocking clients (``xraytwisted.aws.instance_metadata``,
botocore) must then run in a thread while the reactor runs, e.g. with
``threads.deferToThread``.  When the code under test blocks the reactor thread itself
(for example ``daemon.build`` in-process), use :func:`start_fake_process`, which runs
the same fake in a child process::

    url = start_fake_process(self, "imds", region="eu-west-1")

Also here: :func:`aws_environment` (an isolated ``os.environ`` for botocore, restored at
cleanup), :func:`closed_port` (connections are refused) and :func:`silent_listener` (a
socket that accepts connections but never answers).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, cast

from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.support.environ import isolated_environ

__all__ = [
    "FakeECS",
    "FakeIMDS",
    "FakeSSOPortal",
    "aws_environment",
    "closed_port",
    "isolated_environ",
    "silent_listener",
    "start_fake_process",
]

LOCALHOST = "127.0.0.1"
ACCOUNT = "123456789012"


def _iso(when: datetime) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def temporary_credentials(prefix: str, lifetime: float) -> dict[str, str]:
    """AWS-style temporary credentials that expire ``lifetime`` s from now (wall clock)."""
    now = datetime.now(timezone.utc)
    serial = os.urandom(6).hex().upper()
    return {
        "AccessKeyId": f"ASIA{prefix}{serial}"[:20],
        "SecretAccessKey": f"secret-{prefix}-{serial}",
        "Token": f"token-{prefix}-{serial}",
        "Expiration": _iso(now + timedelta(seconds=lifetime)),
        "LastUpdated": _iso(now),
    }


class _FakeServer(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        #: (method, path, lower-cased headers) of every request, in order.
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.port: IListeningPort | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("the fake server is not listening; call start() first")
        return f"http://{LOCALHOST}:{cast(Any, self.port.getHost()).port}"

    def start(self, case: Any) -> str:
        """Listen on 127.0.0.1 (free port) until the test's cleanup; returns the URL."""
        from twisted.internet import reactor

        site = Site(self)
        site.noisy = False
        self.port = cast(Any, reactor).listenTCP(0, site, interface=LOCALHOST)
        case.addCleanup(self.port.stopListening)
        return self.url

    def _record(self, request: Request) -> tuple[str, str, dict[str, str]]:
        headers = {
            k.decode("latin-1").lower(): v[-1].decode("latin-1")
            for k, v in request.requestHeaders.getAllRawHeaders()
        }
        entry = (request.method.decode(), request.path.decode(), headers)
        self.requests.append(entry)
        return entry

    @staticmethod
    def _answer(request: Request, status: int, body: str | bytes, kind: str) -> bytes:
        # One request per connection: clients (urllib3 in botocore) would keep it
        # open, leaving the test's reactor dirty.
        request.setHeader(b"connection", b"close")
        cast(Any, request.channel).persistent = False
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind.encode())
        return body.encode() if isinstance(body, str) else body


class FakeIMDS(_FakeServer):
    """EC2 instance metadata with IMDSv2 tokens required."""

    def __init__(
        self,
        *,
        region: str = "us-east-2",
        hostname: str = "ip-10-1-2-3.us-east-2.compute.internal",
        instance_id: str = "i-0123456789abcdef0",
        role: str | None = "xray-daemon-role",
        credential_lifetime: float = 6 * 3600,
        token_status: int = 200,
        require_token: bool = True,
    ) -> None:
        super().__init__()
        self.values: dict[str, str] = {
            "placement/region": region,
            "placement/availability-zone": region + "a",
            "hostname": hostname,
            "instance-id": instance_id,
        }
        self.role = role
        self.credential_lifetime = credential_lifetime
        #: HTTP status of the token request; 404/403/405 mean "no IMDSv2" to the SDKs.
        self.token_status = token_status
        self.require_token = require_token
        self.tokens: set[str] = set()
        #: Every set of role credentials handed out, in order.
        self.issued: list[dict[str, str]] = []

    def render(self, request: Request) -> bytes:
        method, path, headers = self._record(request)
        if path == "/latest/api/token":
            if method != "PUT":
                return self._answer(request, 405, "", "text/plain")
            if self.token_status != 200:
                return self._answer(request, self.token_status, "", "text/plain")
            ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
            if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
                return self._answer(request, 400, "", "text/plain")
            token = f"fake-imds-token-{len(self.tokens)}-{os.urandom(8).hex()}"
            self.tokens.add(token)
            return self._answer(request, 200, token, "text/plain")
        if method != "GET":
            return self._answer(request, 405, "", "text/plain")
        if self.require_token and headers.get("x-aws-ec2-metadata-token") not in self.tokens:
            return self._answer(request, 401, "", "text/plain")
        prefix = "/latest/meta-data/"
        if not path.startswith(prefix):
            return self._answer(request, 404, "", "text/plain")
        item = path[len(prefix) :]
        roles = "iam/security-credentials/"
        if self.role is not None and item == roles:
            return self._answer(request, 200, self.role, "text/plain")
        if self.role is not None and item == roles + self.role:
            credentials = temporary_credentials("IMDS", self.credential_lifetime)
            self.issued.append(credentials)
            document = {"Code": "Success", "Type": "AWS-HMAC", **credentials}
            return self._answer(request, 200, json.dumps(document), "text/plain")
        if item in self.values:
            return self._answer(request, 200, self.values[item], "text/plain")
        return self._answer(request, 404, "", "text/plain")

    def metadata_requests(self) -> list[tuple[str, str, dict[str, str]]]:
        return [r for r in self.requests if r[1].startswith("/latest/meta-data/")]


class FakeECS(_FakeServer):
    """ECS container credentials endpoint and task metadata endpoint v4."""

    CREDENTIALS_PATH = "/v2/credentials/fake-task-role"
    METADATA_PATH = "/v4/fake-container-id"

    def __init__(
        self,
        *,
        region: str = "eu-west-1",
        task_arn: str | None = None,
        availability_zone: str | None = None,
        credential_lifetime: float = 6 * 3600,
        auth_token: str | None = None,
        auth_token_file: str | None = None,
        task_status: int = 200,
    ) -> None:
        super().__init__()
        self.task: dict[str, Any] = {
            "Cluster": "default",
            "TaskARN": task_arn
            if task_arn is not None
            else f"arn:aws:ecs:{region}:{ACCOUNT}:task/default/0123456789abcdef",
            "AvailabilityZone": availability_zone
            if availability_zone is not None
            else region + "b",
            "LaunchType": "FARGATE",
        }
        self.credential_lifetime = credential_lifetime
        #: When set, the credentials endpoint wants it as the Authorization header.
        self.auth_token = auth_token
        #: When set, it wants this file's content at the time of the request.
        self.auth_token_file = auth_token_file
        self.task_status = task_status
        self.issued: list[dict[str, str]] = []

    @property
    def credentials_uri(self) -> str:
        return self.url + self.CREDENTIALS_PATH

    @property
    def metadata_uri(self) -> str:
        return self.url + self.METADATA_PATH

    def render(self, request: Request) -> bytes:
        method, path, headers = self._record(request)
        if method != "GET":
            return self._answer(request, 405, "", "text/plain")
        if path == self.CREDENTIALS_PATH:
            wanted = self.auth_token
            if self.auth_token_file is not None:
                with open(self.auth_token_file) as f:
                    wanted = f.read()
            if wanted is not None and headers.get("authorization") != wanted:
                body = {"code": "AccessDeniedException", "message": "bad authorization token"}
                return self._answer(request, 403, json.dumps(body), "application/json")
            credentials = temporary_credentials("ECS", self.credential_lifetime)
            self.issued.append(credentials)
            document = {
                "RoleArn": f"arn:aws:iam::{ACCOUNT}:role/fake-task-role",
                "AccessKeyId": credentials["AccessKeyId"],
                "SecretAccessKey": credentials["SecretAccessKey"],
                "Token": credentials["Token"],
                "Expiration": credentials["Expiration"],
            }
            return self._answer(request, 200, json.dumps(document), "application/json")
        if path == self.METADATA_PATH + "/task":
            if self.task_status != 200:
                return self._answer(request, self.task_status, "{}", "application/json")
            task = {k: v for k, v in self.task.items() if v}
            return self._answer(request, 200, json.dumps(task), "application/json")
        if path == self.METADATA_PATH:
            container = {"DockerId": "fake-container-id", "Name": "xray-daemon"}
            return self._answer(request, 200, json.dumps(container), "application/json")
        return self._answer(request, 404, "", "text/plain")


class FakeSSOPortal(_FakeServer):
    """The IAM Identity Center (SSO) portal's ``GetRoleCredentials``, which moto lacks.

    ``GET /federation/credentials?role_name=..&account_id=..`` with the cached access
    token in ``x-amz-sso_bearer_token``; point ``AWS_ENDPOINT_URL_SSO`` at :attr:`url`.
    """

    def __init__(self, *, access_token: str, credential_lifetime: float = 3600) -> None:
        super().__init__()
        self.access_token = access_token
        self.credential_lifetime = credential_lifetime
        self.issued: list[dict[str, str]] = []

    def render(self, request: Request) -> bytes:
        method, path, headers = self._record(request)
        if method != "GET" or path != "/federation/credentials":
            return self._answer(request, 404, "{}", "application/json")
        if headers.get("x-amz-sso_bearer_token") != self.access_token:
            body = {"message": "Session token not found or invalid"}
            return self._answer(request, 401, json.dumps(body), "application/json")
        credentials = temporary_credentials("SSO", self.credential_lifetime)
        self.issued.append(credentials)
        expiration = datetime.strptime(credentials["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
        millis = int(expiration.replace(tzinfo=timezone.utc).timestamp() * 1000)
        document = {
            "roleCredentials": {
                "accessKeyId": credentials["AccessKeyId"],
                "secretAccessKey": credentials["SecretAccessKey"],
                "sessionToken": credentials["Token"],
                "expiration": millis,
            }
        }
        return self._answer(request, 200, json.dumps(document), "application/json")


# ---------------------------------------------------------------------------
# Environment and sockets


def aws_environment(case: Any, values: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """Make ``os.environ`` :func:`isolated_environ` (``values``) until the test's cleanup.

    botocore reads ``os.environ`` itself, so code under test that runs it must see the
    test's settings there.  Returns a copy to pass as ``env``.
    """
    saved = dict(os.environ)
    wanted = isolated_environ(values)

    def restore() -> None:
        os.environ.clear()
        os.environ.update(saved)

    case.addCleanup(restore)
    os.environ.clear()
    os.environ.update(wanted)
    return dict(wanted)


def closed_port() -> int:
    """A loopback TCP port nothing listens on (connections are refused at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOCALHOST, 0))
        port: int = s.getsockname()[1]
    return port


def silent_listener(case: Any) -> int:
    """A loopback port that accepts connections (kernel backlog) but never answers."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    case.addCleanup(s.close)
    s.bind((LOCALHOST, 0))
    s.listen(16)
    port: int = s.getsockname()[1]
    return port


# ---------------------------------------------------------------------------
# Running a fake in a child process

_LISTENING = re.compile(rb"LISTENING (\d+)")
_STARTUP_TIMEOUT = 20.0


def start_fake_process(case: Any, kind: str, **options: str) -> str:
    """Run :class:`FakeIMDS` (``kind="imds"``) or :class:`FakeECS` (``"ecs"``) in a child
    process until the test's cleanup; returns its base URL.

    ``options`` are the constructor's string options (``region``, ``hostname``,
    ``instance_id``, ``task_arn``, ``availability_zone``, ``auth_token_file``).  The child
    exits when its stdin closes, so it never outlives the test process.
    """
    args = [sys.executable, "-m", "tests.support.fake_metadata", kind]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", value]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=root,
        env=isolated_environ(),
    )

    def stop() -> None:
        assert process.stdin is not None and process.stdout is not None
        process.stdin.close()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stdout.close()

    case.addCleanup(stop)
    assert process.stdout is not None
    deadline = time.monotonic() + _STARTUP_TIMEOUT
    seen = b""
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        seen += line
        match = _LISTENING.search(line)
        if match:
            return f"http://{LOCALHOST}:{int(match.group(1))}"
        if not line and process.poll() is not None:
            break
    raise RuntimeError(f"fake {kind} server did not start: {seen.decode(errors='replace')}")


def _exit_when_stdin_closes() -> None:
    import threading

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("kind", choices=("imds", "ecs"))
    for option in (
        "region",
        "hostname",
        "instance-id",
        "task-arn",
        "availability-zone",
        "auth-token-file",
    ):
        parser.add_argument(f"--{option}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    kind = given.pop("kind")
    fake: _FakeServer = FakeIMDS(**given) if kind == "imds" else FakeECS(**given)

    from twisted.internet import reactor

    site = Site(fake)
    site.noisy = False
    port = cast(Any, reactor).listenTCP(0, site, interface=LOCALHOST)
    sys.stdout.write(f"LISTENING {port.getHost().port}\n")
    sys.stdout.flush()
    _exit_when_stdin_closes()
    cast(Any, reactor).run()


if __name__ == "__main__":
    main()
