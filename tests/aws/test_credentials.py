"""xraytwisted.aws.credentials: the refresh schedule (Clock) and every credential source the
test environment can really exercise (botocore against fakes and moto)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import botocore.session
import treq.client
from botocore.config import Config
from treq.testing import StubTreq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.support.fake_metadata import (
    FakeECS,
    FakeIMDS,
    FakeSSOPortal,
    aws_environment,
    closed_port,
    isolated_environ,
    start_fake_process,
)
from tests.support.logs import capture_logs
from tests.support.moto import MotoServer, start_moto_server
from tests.support.tempdirs import temp_dir, temp_path
from xraytwisted.aws import endpoints
from xraytwisted.aws.credentials import (
    EXPIRY_MARGIN,
    FIRST_LOAD_TIMEOUT,
    SESSION_NAME,
    CredentialsService,
    Found,
    NoCredentialsError,
    StaticCredentials,
    assume_role,
    duration,
    from_environment,
    missing_message,
    new_session,
    refresh_delay,
    retry_delay,
    thread_runner,
)
from xraytwisted.aws.sigv4 import Credentials
from xraytwisted.pipeline.uploader import Outcome, Uploader

NOW = 1_795_304_085.0
REGION = "us-east-2"


def logged(events: list[LogEvent], level: LogLevel) -> list[LogEvent]:
    return [
        e
        for e in events
        if e.get("log_level") == level and e.get("log_namespace", "").startswith("xraytwisted")
    ]


class Runner:
    """run_in_thread for Clock tests: the lookup runs when the test says so."""

    def __init__(self) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []

    def __call__(self, call: Callable[[], Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((call, d))
        return d

    def finish(self) -> None:
        call, d = self.pending.pop(0)
        try:
            result = call()
        except Exception:
            d.errback(Failure())
        else:
            d.callback(result)


class ShortLived:
    """A botocore-like provider: new temporary credentials on every call."""

    def __init__(self, clock: Clock, lifetime: float) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.failure: Exception | None = None

    def __call__(self) -> Found:
        self.calls += 1
        if self.failure is not None:
            raise self.failure
        n = self.calls
        expiry = self.clock.seconds() + self.lifetime
        return Found(Credentials(f"ASIA{n}", f"secret{n}", f"token{n}", expiry), "test", True)


# ---------------------------------------------------------------------------
# Pure parts


class ScheduleTests(SynchronousTestCase):
    def test_refresh_delay(self) -> None:
        # 6 h IMDS credentials: 15 min before expiry.
        self.assertEqual(refresh_delay(0, 6 * 3600), 6 * 3600 - 900)
        # 15 min AssumeRole credentials: when half is left.
        self.assertEqual(refresh_delay(100, 1000), 450)
        self.assertEqual(refresh_delay(0, 3600), 2700)
        # Nearly or already expired: soon, but never in a busy loop.
        self.assertEqual(refresh_delay(0, 4), 5)
        self.assertEqual(refresh_delay(50, 10), 5)

    def test_retry_delay(self) -> None:
        self.assertEqual(
            [retry_delay(n, 0, None) for n in range(1, 8)], [5, 10, 20, 40, 60, 60, 60]
        )
        # While the old credentials last: at most half of their usable time.
        self.assertEqual(retry_delay(6, 0, 100 + EXPIRY_MARGIN), 50)
        self.assertEqual(retry_delay(6, 0, 8 + EXPIRY_MARGIN), 5)
        self.assertEqual(retry_delay(6, 1000, 100), 60)  # already expired

    def test_duration(self) -> None:
        self.assertEqual(
            [duration(s) for s in (-3, 0, 59, 60, 899, 3600, 21599)],
            ["0s", "0s", "59s", "1m", "14m", "1h00m", "5h59m"],
        )

    def test_missing_message(self) -> None:
        env = {
            "AWS_CONFIG_FILE": "/cfg",
            "AWS_SHARED_CREDENTIALS_FILE": "/creds",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.assertEqual(
            missing_message(env),
            "no credentials found (tried environment, shared files for profile 'default' "
            "(/creds, /cfg), EC2 instance metadata (turned off by AWS_EC2_METADATA_DISABLED)); "
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or attach an IAM role",
        )
        env = {
            "AWS_PROFILE": "prod",
            "AWS_WEB_IDENTITY_TOKEN_FILE": "/t",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "/v2/x",
        }
        message = missing_message(env, role_arn="arn:aws:iam::1:role/r")
        self.assertIn("no credentials found to assume role arn:aws:iam::1:role/r with", message)
        self.assertIn(
            "shared files for profile 'prod' (~/.aws/credentials, ~/.aws/config), "
            "web identity token (AWS_WEB_IDENTITY_TOKEN_FILE), container endpoint, "
            "EC2 instance metadata)",
            message,
        )

    def test_from_environment(self) -> None:
        self.assertIsNone(from_environment({"AWS_ACCESS_KEY_ID": "a"}))
        self.assertEqual(
            from_environment({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"}),
            Credentials("a", "s"),
        )
        self.assertEqual(
            from_environment(
                {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SESSION_TOKEN": "t"}
            ),
            Credentials("a", "s", "t"),
        )

    def test_static_credentials(self) -> None:
        static = StaticCredentials(Credentials("a", "s"))
        self.assertEqual(static.current(), Credentials("a", "s"))
        self.assertIsNone(self.successResultOf(static.when_loaded()))
        self.assertEqual(static.status(), "ok (static)")
        none = StaticCredentials(None)
        self.assertIsNone(none.current())
        self.assertTrue(none.status().startswith("missing:"))


# ---------------------------------------------------------------------------
# The service, driven by a Clock


class RecordingXRay(Resource):
    """Answers PutTraceSegments with 200 and remembers which access key signed it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str] = []

    def render_POST(self, request: Request) -> bytes:
        auth = (request.getHeader("authorization") or "").split("Credential=", 1)[-1]
        self.keys.append(auth.split("/", 1)[0])
        return b"{}"


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.runner = Runner()
        self.events = capture_logs(self)

    def service(self, fetch: Callable[[], Found], **kwargs: Any) -> CredentialsService:
        service = CredentialsService(
            self.clock, region=REGION, fetch=fetch, run_in_thread=self.runner, **kwargs
        )
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    def test_no_upload_waits_and_none_is_never_returned_across_refreshes(self) -> None:
        provider = ShortLived(self.clock, lifetime=900)  # the Go daemon's AssumeRole lifetime
        service = self.service(provider)
        xray = RecordingXRay()
        stub = cast(Any, StubTreq(xray))
        uploader = Uploader(
            client=stub,
            endpoint=endpoints.parse("https://xray.us-east-2.amazonaws.com"),
            region=REGION,
            credentials=service,
            clock=self.clock,
            timeout=5,
        )

        def upload() -> Outcome:
            d = uploader.put_trace_segments([b'{"id":"1"}'])
            stub.flush()
            outcome = self.successResultOf(d)  # finished at once: nothing waited
            return outcome

        loaded = service.when_loaded()
        service.startService()
        self.assertNoResult(loaded)
        self.assertIsNone(service.current())
        self.assertEqual(service.status(), "loading: looking for AWS credentials")
        self.runner.finish()
        self.successResultOf(loaded)
        self.assertEqual(service.current(), Credentials("ASIA1", "secret1", "token1", NOW + 900))

        refreshes_started_with: list[float] = []
        in_flight = 0
        for _ in range(3 * 3600):  # three hours in one-second steps
            self.clock.advance(1)
            now = self.clock.seconds()
            creds = service.current()
            self.assertIsNotNone(creds)
            assert creds is not None and creds.expiry is not None
            self.assertGreater(creds.expiry - EXPIRY_MARGIN, now)
            if self.runner.pending:
                if in_flight == 0:
                    refreshes_started_with.append(creds.expiry - now)
                in_flight += 1
                # While the lookup runs (slowly, 5 s), uploads go ahead with what is held.
                self.assertIsNone(upload().error)
                self.assertEqual(xray.keys[-1], creds.access_key)
                if in_flight == 5:
                    self.runner.finish()
                    in_flight = 0
        # Every refresh started when half the 15-minute lifetime was left.
        self.assertEqual(set(refreshes_started_with), {450.0})
        self.assertGreaterEqual(len(refreshes_started_with), 20)
        self.assertEqual(len(set(xray.keys)), len(refreshes_started_with))
        self.assertEqual(
            logged(self.events, LogLevel.warn) + logged(self.events, LogLevel.error), []
        )
        self.assertRegex(service.status(), r"^ok \(test, expires in \d+m\)$")

    def test_failed_refresh_keeps_the_old_credentials_until_they_expire(self) -> None:
        provider = ShortLived(self.clock, lifetime=3600)
        service = self.service(provider)
        service.startService()
        self.runner.finish()
        first = service.current()
        assert first is not None
        provider.failure = RuntimeError("STS is down")

        self.clock.advance(2700)  # 15 minutes before expiry
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.finish()
        self.assertIs(service.current(), first)
        self.assertIn(
            "; refresh failing: looking up AWS credentials failed: RuntimeError: STS is down",
            service.status(),
        )
        [warning] = logged(self.events, LogLevel.warn)
        self.assertEqual(
            warning["error"], "looking up AWS credentials failed: RuntimeError: STS is down"
        )
        self.assertEqual(warning["left"], "15m")
        self.assertEqual(warning["delay"], 5)

        # Keep failing: retried with backoff, old credentials used to the end.
        retries = 0
        while self.clock.seconds() < first.expiry - EXPIRY_MARGIN - 1:  # type: ignore[operator]
            self.clock.advance(1)
            self.assertIs(service.current(), first)
            while self.runner.pending:
                self.runner.finish()
                retries += 1
        self.assertGreater(retries, 10)
        self.assertEqual(logged(self.events, LogLevel.error), [])
        self.assertEqual(len(logged(self.events, LogLevel.warn)), 1, "repeats go to Debug")

        # Expiry: None, and one Error saying why.
        self.clock.advance(1)
        self.assertIsNone(service.current())
        [error] = logged(self.events, LogLevel.error)
        self.assertIn("have expired and could not be refreshed", error["log_format"])
        self.assertEqual(
            error["error"], "looking up AWS credentials failed: RuntimeError: STS is down"
        )
        self.assertTrue(
            service.status().startswith("expired: credentials from test expired 0s ago")
        )
        for _ in range(120):
            self.clock.advance(1)
            while self.runner.pending:
                self.runner.finish()
        self.assertEqual(len(logged(self.events, LogLevel.error)), 1)

        # It comes back.
        provider.failure = None
        for _ in range(61):
            self.clock.advance(1)
            while self.runner.pending:
                self.runner.finish()
        fresh = service.current()
        assert fresh is not None
        self.assertNotEqual(fresh.access_key, first.access_key)
        self.assertTrue(service.status().startswith("ok (test, expires in "))
        self.assertEqual(logged(self.events, LogLevel.info)[-1]["source"], "test")

    def test_no_credentials_anywhere(self) -> None:
        env = {"AWS_EC2_METADATA_DISABLED": "true"}

        def fetch() -> Found:
            raise NoCredentialsError(missing_message(env))

        service = self.service(fetch)
        loaded = service.when_loaded()
        service.startService()
        self.runner.finish()
        self.successResultOf(loaded)  # a failed first lookup also lets uploads go ahead
        self.assertIsNone(service.current())
        self.assertEqual(service.status(), "missing: " + missing_message(env))
        delays = []
        for _ in range(6):
            [call] = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
            self.runner.finish()
        self.assertEqual(delays, [5, 10, 20, 40, 60, 60])
        [error] = logged(self.events, LogLevel.error)
        self.assertEqual(error["error"], missing_message(env))
        self.assertIn("uploads fail until credentials are found", error["log_format"])

    def test_slow_first_lookup_stops_holding_uploads_back(self) -> None:
        service = self.service(ShortLived(self.clock, 3600))
        service.startService()
        loaded = service.when_loaded()
        self.clock.advance(FIRST_LOAD_TIMEOUT - 1)
        self.assertNoResult(loaded)
        self.clock.advance(1)
        self.successResultOf(loaded)
        [warning] = logged(self.events, LogLevel.warn)
        self.assertIn("Still looking for AWS credentials", warning["log_format"])
        self.runner.finish()
        self.assertIsNotNone(service.current())

    def test_when_loaded(self) -> None:
        service = self.service(ShortLived(self.clock, 3600))
        first, second = service.when_loaded(), service.when_loaded()
        self.assertIsNot(first, second)
        service.startService()
        self.assertNoResult(first)
        self.runner.finish()
        self.successResultOf(first)
        self.successResultOf(second)
        self.successResultOf(service.when_loaded())

    def test_stop_cancels_timers_and_ignores_late_results(self) -> None:
        provider = ShortLived(self.clock, 3600)
        service = self.service(provider)
        service.startService()
        self.runner.finish()
        self.clock.advance(2700)
        self.assertEqual(len(self.runner.pending), 1)
        service.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        before = service.current()
        self.runner.finish()  # the lookup that was running ends after the stop
        self.assertIs(service.current(), before)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_releases_waiters(self) -> None:
        service = self.service(ShortLived(self.clock, 3600))
        service.startService()
        loaded = service.when_loaded()
        service.stopService()
        self.successResultOf(loaded)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_static_credentials_are_not_refreshed(self) -> None:
        found = Found(Credentials("AKIASTATIC", "s"), "shared credentials file")
        service = self.service(lambda: found)
        service.startService()
        self.runner.finish()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10 * 365 * 86400)
        self.assertEqual(service.current(), Credentials("AKIASTATIC", "s"))
        self.assertEqual(service.status(), "ok (shared credentials file)")

    def test_refreshable_without_known_expiry_is_refreshed_periodically(self) -> None:
        calls = []

        def fetch() -> Found:
            calls.append(self.clock.seconds())
            return Found(Credentials("A", "s", "t"), "custom", refreshable=True)

        service = self.service(fetch)
        service.startService()
        for _ in range(3):
            self.runner.finish()
            self.clock.advance(300)
        self.assertEqual([c - NOW for c in calls], [0, 300, 600])

    def test_environment_keys_are_used_without_a_lookup(self) -> None:
        env = {
            "AWS_ACCESS_KEY_ID": "AKIAENV",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_SESSION_TOKEN": "t",
        }
        service = CredentialsService(
            self.clock, region=REGION, env=env, run_in_thread=maybeDeferred
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.current(), Credentials("AKIAENV", "s", "t"))
        self.assertEqual(service.status(), "ok (environment)")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_expired_on_arrival(self) -> None:
        service = self.service(ShortLived(self.clock, lifetime=EXPIRY_MARGIN))
        service.startService()
        self.runner.finish()
        self.assertIsNone(service.current())
        self.clock.advance(0)
        self.assertEqual(len(logged(self.events, LogLevel.error)), 1)


# ---------------------------------------------------------------------------
# Real credential sources through botocore


class RealSourceTests(TestCase):
    """botocore's chain in a thread, the reactor serving the fakes meanwhile."""

    def setUp(self) -> None:
        self.events = capture_logs(self)

    @inlineCallbacks
    def load(self, **kwargs: Any) -> Any:
        kwargs.setdefault("region", REGION)
        service = CredentialsService(reactor, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.when_loaded()
        return service

    def write(self, text: str) -> str:
        path: str = temp_path(self)
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def assert_expiry(self, creds: Credentials | None, expiration: str) -> None:
        assert creds is not None and creds.expiry is not None
        expected = datetime.strptime(expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        self.assertEqual(creds.expiry, expected.timestamp())

    @inlineCallbacks
    def test_environment_with_expiration_via_botocore(self) -> Any:
        expiration = (datetime.now(timezone.utc) + timedelta(hours=1)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        aws_environment(
            self,
            {
                "AWS_ACCESS_KEY_ID": "ASIAENVEXPIRING",
                "AWS_SECRET_ACCESS_KEY": "env-secret",
                "AWS_SESSION_TOKEN": "env-token",
                "AWS_CREDENTIAL_EXPIRATION": expiration,
            },
        )
        service = yield self.load()
        creds = service.current()
        self.assertEqual(
            (creds.access_key, creds.secret_key, creds.token),
            ("ASIAENVEXPIRING", "env-secret", "env-token"),
        )
        self.assert_expiry(creds, expiration)
        self.assertRegex(service.status(), r"^ok \(environment, expires in (59|60)m\)$")

    @inlineCallbacks
    def test_shared_credentials_file_with_aws_profile(self) -> Any:
        path = self.write(
            """\
            [default]
            aws_access_key_id = AKIADEFAULTPROFILE
            aws_secret_access_key = default-secret
            [dev]
            aws_access_key_id = AKIADEVPROFILE
            aws_secret_access_key = dev-secret
            """
        )
        aws_environment(self, {"AWS_SHARED_CREDENTIALS_FILE": path, "AWS_PROFILE": "dev"})
        service = yield self.load()
        self.assertEqual(service.current(), Credentials("AKIADEVPROFILE", "dev-secret"))
        self.assertEqual(service.status(), "ok (shared credentials file)")

    @inlineCallbacks
    def test_credential_process(self) -> Any:
        expiration = (datetime.now(timezone.utc) + timedelta(hours=2)).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        script = self.write(
            f"""\
            import json
            print(json.dumps({{"Version": 1, "AccessKeyId": "ASIAPROCESS",
                              "SecretAccessKey": "process-secret", "SessionToken": "process-token",
                              "Expiration": "{expiration}"}}))
            """
        )
        config = self.write(
            f"""\
            [profile tool]
            credential_process = "{sys.executable}" "{script}"
            """
        )
        aws_environment(self, {"AWS_CONFIG_FILE": config, "AWS_PROFILE": "tool"})
        service = yield self.load()
        creds = service.current()
        self.assertEqual((creds.access_key, creds.token), ("ASIAPROCESS", "process-token"))
        self.assert_expiry(creds, expiration)
        self.assertTrue(service.status().startswith("ok (credential_process, expires in 1h59m"))

    @inlineCallbacks
    def test_failing_credential_process(self) -> Any:
        config = self.write(
            f"""\
            [profile tool]
            credential_process = "{sys.executable}" -c "import sys; sys.exit('sso session expired')"
            """
        )
        aws_environment(self, {"AWS_CONFIG_FILE": config, "AWS_PROFILE": "tool"})
        service = yield self.load()
        self.assertIsNone(service.current())
        self.assertIn("missing: looking up AWS credentials failed:", service.status())
        self.assertIn("sso session expired", service.status())

    @inlineCallbacks
    def test_ecs_container_endpoint(self) -> Any:
        ecs = FakeECS(auth_token="Bearer fake-eks-pod-identity")
        ecs.start(self)
        aws_environment(
            self,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": ecs.credentials_uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": "Bearer fake-eks-pod-identity",
            },
        )
        service = yield self.load()
        [issued] = ecs.issued
        creds = service.current()
        self.assertEqual(
            (creds.access_key, creds.secret_key, creds.token),
            (issued["AccessKeyId"], issued["SecretAccessKey"], issued["Token"]),
        )
        self.assert_expiry(creds, issued["Expiration"])
        self.assertTrue(service.status().startswith("ok (container endpoint, expires in 5h59m"))

    @inlineCallbacks
    def test_eks_pod_identity(self) -> Any:
        # EKS Pod Identity (the Go daemon's open issue 215): the full URI of
        # the node's agent (169.254.170.23 in a cluster; botocore also allows
        # loopback), and the pod's service account token in a file.
        token = "eyJhbGciOiJSUzI1NiJ9.fake-pod-identity-token.sig"
        token_file = os.path.join(temp_dir(self), "eks-pod-identity-token")
        with open(token_file, "w") as f:
            f.write(token)
        agent = FakeECS(auth_token_file=token_file)
        agent.start(self)
        aws_environment(
            self,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent.credentials_uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": token_file,
            },
        )
        service = yield self.load()
        [issued] = agent.issued
        creds = service.current()
        self.assertEqual(
            (creds.access_key, creds.secret_key, creds.token),
            (issued["AccessKeyId"], issued["SecretAccessKey"], issued["Token"]),
        )
        self.assert_expiry(creds, issued["Expiration"])
        [(_, path, headers)] = agent.requests
        self.assertEqual((path, headers["authorization"]), (FakeECS.CREDENTIALS_PATH, token))
        self.assertTrue(service.status().startswith("ok (container endpoint, expires in 5h59m"))

    @inlineCallbacks
    def test_eks_pod_identity_token_refused(self) -> Any:
        token_file = os.path.join(temp_dir(self), "eks-pod-identity-token")
        with open(token_file, "w") as f:
            f.write("a-token-the-agent-refuses")
        agent = FakeECS(auth_token="the-pod-s-real-token")
        agent.start(self)
        aws_environment(
            self,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": agent.credentials_uri,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": token_file,
            },
        )
        service = yield self.load()
        self.assertIsNone(service.current())
        self.assertEqual(agent.issued, [])
        self.assertIn("missing: looking up AWS credentials failed:", service.status())
        self.assertIn("bad authorization token", service.status())

    @inlineCallbacks
    def test_ec2_instance_metadata_v2(self) -> Any:
        imds = FakeIMDS(role="xray-instance-role")
        url = imds.start(self)
        aws_environment(
            self,
            {"AWS_EC2_METADATA_DISABLED": None, "AWS_EC2_METADATA_SERVICE_ENDPOINT": url},
        )
        service = yield self.load()
        [issued] = imds.issued
        creds = service.current()
        self.assertEqual((creds.access_key, creds.token), (issued["AccessKeyId"], issued["Token"]))
        self.assert_expiry(creds, issued["Expiration"])
        self.assertTrue(service.status().startswith("ok (EC2 instance metadata, expires in"))
        gets = imds.metadata_requests()
        self.assertEqual(len(gets), 2)
        for _, _, headers in gets:  # botocore used IMDSv2: every GET carried the token
            self.assertIn(headers["x-aws-ec2-metadata-token"], imds.tokens)

    @inlineCallbacks
    def test_sso_profile(self) -> Any:
        # botocore fixes the SSO token cache directory (~/.aws/sso/cache) at import
        # time, so the lookup runs in a child process whose HOME is a temp dir.
        home = temp_path(self)
        cache = os.path.join(home, ".aws", "sso", "cache")
        os.makedirs(cache)
        start_url = "https://xraytwisted-test.awsapps.com/start"
        expires = datetime.now(timezone.utc) + timedelta(hours=8)
        with open(
            os.path.join(cache, hashlib.sha1(start_url.encode()).hexdigest() + ".json"), "w"
        ) as f:
            json.dump(
                {
                    "startUrl": start_url,
                    "region": "us-east-1",
                    "accessToken": "fake-sso-access-token",
                    "expiresAt": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                f,
            )
        config = self.write(
            f"""\
            [profile laptop]
            sso_start_url = {start_url}
            sso_region = us-east-1
            sso_account_id = 123456789012
            sso_role_name = XRayWriter
            """
        )
        portal = FakeSSOPortal(access_token="fake-sso-access-token")
        portal.start(self)
        env = isolated_environ(
            {
                "HOME": home,
                "AWS_CONFIG_FILE": config,
                "AWS_PROFILE": "laptop",
                "AWS_ENDPOINT_URL_SSO": portal.url,
            }
        )
        script = (
            "import json, botocore.session\n"
            "from xraytwisted.aws.credentials import lookup\n"
            "found = lookup(botocore.session.Session, region='us-east-2', env={})\n"
            "c = found.credentials\n"
            "print(json.dumps([found.source, c.access_key, c.secret_key, c.token, c.expiry]))\n"
        )
        result = yield threads.deferToThread(
            subprocess.run,
            [sys.executable, "-c", script],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        source, key, secret, token, expiry = json.loads(result.stdout)
        [issued] = portal.issued
        self.assertEqual(source, "sso")
        self.assertEqual(
            (key, secret, token),
            (issued["AccessKeyId"], issued["SecretAccessKey"], issued["Token"]),
        )
        self.assert_expiry(Credentials(key, secret, token, expiry), issued["Expiration"])
        [(_, path, headers)] = portal.requests
        self.assertEqual(path, "/federation/credentials")
        self.assertEqual(headers["x-amz-sso_bearer_token"], "fake-sso-access-token")

    @inlineCallbacks
    def test_nothing_anywhere(self) -> Any:
        env = aws_environment(self)
        service = yield self.load()
        self.assertIsNone(service.current())
        self.assertEqual(service.status(), "missing: " + missing_message(env))
        self.assertIn("tried environment, shared files for profile 'default'", service.status())
        [error] = logged(self.events, LogLevel.error)
        self.assertEqual(error["error"], missing_message(env))

    @inlineCallbacks
    def test_unknown_profile(self) -> Any:
        aws_environment(self, {"AWS_PROFILE": "nope"})
        service = yield self.load()
        self.assertEqual(
            service.status(),
            "missing: looking up AWS credentials failed: "
            "The config profile (nope) could not be found",
        )

    @inlineCallbacks
    def test_thread_runner_delivers_in_the_reactor_thread(self) -> Any:
        import threading

        seen: list[str] = []

        def work() -> str:
            seen.append(threading.current_thread().name)
            return "done"

        result = yield thread_runner(reactor)(work)  # type: ignore[arg-type]
        self.assertEqual(result, "done")
        self.assertEqual(seen, ["xraytwisted-credentials"])
        self.assertIs(threading.current_thread(), threading.main_thread())
        try:
            yield thread_runner(reactor)(lambda: 1 / 0)  # type: ignore[arg-type]
        except ZeroDivisionError:
            pass
        else:
            self.fail("the exception was lost")


class RefreshAgainstARealProviderTests(SynchronousTestCase):
    """A refresh really runs botocore's chain again (Clock, fake ECS in a child process)."""

    def test_refresh_gets_new_credentials_from_the_container_endpoint(self) -> None:
        url = start_fake_process(self, "ecs")
        aws_environment(
            self, {"AWS_CONTAINER_CREDENTIALS_FULL_URI": url + FakeECS.CREDENTIALS_PATH}
        )
        clock = Clock()
        clock.advance(time.time())
        service = CredentialsService(clock, region=REGION, run_in_thread=maybeDeferred)
        service.startService()
        self.addCleanup(service.stopService)
        first = service.current()
        assert first is not None and first.expiry is not None
        # The next lookup, and the Error at expiry that it prevents.
        refresh, watch = sorted(call.getTime() for call in clock.getDelayedCalls())
        self.assertLess(abs(refresh - (first.expiry - 900)), 1)
        self.assertLess(abs(watch - (first.expiry - EXPIRY_MARGIN)), 1)
        clock.advance(refresh - clock.seconds())
        second = service.current()
        assert second is not None and second.expiry is not None
        self.assertNotEqual(second.access_key, first.access_key)
        self.assertGreaterEqual(second.expiry, first.expiry)

    def test_refresh_reads_the_rotated_pod_identity_token_again(self) -> None:
        # kubelet rotates the projected token; the agent then refuses the old one.
        token_file = temp_path(self)
        with open(token_file, "w") as f:
            f.write("pod-token-1")
        url = start_fake_process(self, "ecs", auth_token_file=token_file)
        aws_environment(
            self,
            {
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": url + FakeECS.CREDENTIALS_PATH,
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE": token_file,
            },
        )
        clock = Clock()
        clock.advance(time.time())
        service = CredentialsService(clock, region=REGION, run_in_thread=maybeDeferred)
        service.startService()
        self.addCleanup(service.stopService)
        first = service.current()
        assert first is not None and first.expiry is not None, service.status()
        with open(token_file, "w") as f:
            f.write("pod-token-2")
        refresh = min(call.getTime() for call in clock.getDelayedCalls())
        clock.advance(refresh - clock.seconds())
        second = service.current()
        assert second is not None
        self.assertNotEqual(second.access_key, first.access_key, service.status())
        self.assertNotIn("refresh failing", service.status())


# ---------------------------------------------------------------------------
# STS against moto (signature checking on)


def allow_unauthenticated(moto: MotoServer, count: int) -> None:
    """Let the next ``count`` requests through moto unauthenticated (IAM setup, or the
    unsigned AssumeRoleWithWebIdentity); checking resumes after them."""
    status, _headers, body = moto.http_request("POST", "/moto-api/reset-auth", str(count).encode())
    if status != 200:
        raise AssertionError(f"reset-auth failed: {status} {body!r}")


def create_xray_role(moto: MotoServer, name: str) -> str:
    """A role that may use X-Ray, trusted by moto's IAM user and a web identity provider.

    Makes two IAM calls; call allow_unauthenticated first."""
    iam = moto.client("iam", access_key="AKIASETUP", secret_key="setup")
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{moto.account_id}:user/{moto.user_name}"},
                "Action": "sts:AssumeRole",
            },
            {
                "Effect": "Allow",
                "Principal": {"Federated": f"arn:aws:iam::{moto.account_id}:oidc-provider/eks"},
                "Action": "sts:AssumeRoleWithWebIdentity",
            },
        ],
    }
    arn = str(
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    )
    iam.put_role_policy(
        RoleName=name,
        PolicyName="xray",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "xray:*", "Resource": "*"}],
            }
        ),
    )
    return arn


def segment(trace_id: str) -> bytes:
    now = time.time()
    return json.dumps(
        {
            "trace_id": trace_id,
            "id": os.urandom(8).hex(),
            "name": "credentials-test",
            "start_time": now - 1,
            "end_time": now,
        }
    ).encode()


class STSTests(TestCase):
    def setUp(self) -> None:
        self.moto = start_moto_server(self)

    def uploader(self, service: CredentialsService) -> Uploader:
        pool = HTTPConnectionPool(reactor, persistent=False)
        uploader = Uploader(
            client=cast(Any, treq.client.HTTPClient(Agent(reactor, pool=pool))),
            endpoint=endpoints.parse(self.moto.endpoint),
            region=self.moto.region,
            credentials=service,
            clock=cast(Any, reactor),
            timeout=10,
        )
        self.addCleanup(uploader.close)
        return uploader

    @inlineCallbacks
    def upload_and_read_back(self, service: CredentialsService) -> Any:
        trace_id = f"1-{int(time.time()):08x}-{os.urandom(12).hex()}"
        outcome = yield self.uploader(service).put_trace_segments([segment(trace_id)])
        self.assertIsNone(outcome.error)
        self.assertEqual(outcome.unprocessed, ())
        [document] = self.moto.segment_documents([trace_id])
        self.assertEqual(document["name"], "credentials-test")

    @inlineCallbacks
    def test_role_arn_assumed_and_used_for_uploads(self) -> Any:
        allow_unauthenticated(self.moto, 3)
        role_arn = create_xray_role(self.moto, "xray-upload-role")
        iam = self.moto.client("iam", access_key="AKIASETUP", secret_key="setup")
        iam.put_user_policy(
            UserName=self.moto.user_name,
            PolicyName="assume",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}],
                }
            ),
        )
        # The proxy refuses every connection: STS must not go through -p/HTTPS_PROXY.
        proxy = f"http://127.0.0.1:{closed_port()}"
        aws_environment(
            self,
            {
                "AWS_ACCESS_KEY_ID": self.moto.access_key,
                "AWS_SECRET_ACCESS_KEY": self.moto.secret_key,
                "AWS_ENDPOINT_URL_STS": self.moto.endpoint,
                "HTTPS_PROXY": proxy,
                "https_proxy": proxy,
            },
        )
        service = yield self.load(role_arn)
        creds = service.current()
        self.assertIsNotNone(creds)
        self.assertTrue(creds.access_key.startswith("ASIA"), creds)
        self.assertNotEqual(creds.access_key, self.moto.access_key)
        self.assertLess(abs(creds.expiry - (time.time() + 3600)), 60)
        self.assertTrue(
            service.status().startswith(
                f"ok (role {role_arn} assumed with environment credentials, expires in 59m"
            ),
            service.status(),
        )
        # Who are we now?  The role, with the Go daemon's session name.
        sts = botocore.session.Session().create_client(
            "sts",
            region_name=REGION,
            endpoint_url=self.moto.endpoint,
            aws_access_key_id=creds.access_key,
            aws_secret_access_key=creds.secret_key,
            aws_session_token=creds.token,
            config=Config(proxies={}),
        )
        arn = sts.get_caller_identity()["Arn"]
        self.assertEqual(
            arn, f"arn:aws:sts::{self.moto.account_id}:assumed-role/xray-upload-role/{SESSION_NAME}"
        )
        yield self.upload_and_read_back(service)

    @inlineCallbacks
    def test_role_arn_with_bad_source_credentials(self) -> Any:
        aws_environment(
            self,
            {
                "AWS_ACCESS_KEY_ID": self.moto.access_key,
                "AWS_SECRET_ACCESS_KEY": "wrong-" + self.moto.secret_key,
                "AWS_ENDPOINT_URL_STS": self.moto.endpoint,
            },
        )
        role_arn = f"arn:aws:iam::{self.moto.account_id}:role/xray-upload-role"
        service = yield self.load(role_arn)
        self.assertIsNone(service.current())
        status = service.status()
        self.assertTrue(
            status.startswith(
                f"missing: AssumeRole {role_arn} with credentials from environment failed: "
                "SignatureDoesNotMatch: "
            ),
            status,
        )
        self.assertIn("trust policy", status)

    @inlineCallbacks
    def test_web_identity(self) -> Any:
        allow_unauthenticated(self.moto, 3)  # two IAM calls, then the unsigned STS call
        role_arn = create_xray_role(self.moto, "xray-irsa-role")
        token_file = temp_path(self)
        with open(token_file, "w") as f:
            f.write("eyJhbGciOiJSUzI1NiJ9.fake-service-account-token.sig")
        aws_environment(
            self,
            {
                "AWS_WEB_IDENTITY_TOKEN_FILE": token_file,
                "AWS_ROLE_ARN": role_arn,
                "AWS_ROLE_SESSION_NAME": "irsa-test",
                "AWS_ENDPOINT_URL_STS": self.moto.endpoint,
            },
        )
        service = yield self.load("")
        creds = service.current()
        self.assertIsNotNone(creds)
        self.assertTrue(creds.access_key.startswith("ASIA"))
        self.assertTrue(
            service.status().startswith("ok (web identity, expires in"), service.status()
        )
        yield self.upload_and_read_back(service)

    @inlineCallbacks
    def load(self, role_arn: str) -> Any:
        service = CredentialsService(reactor, region=self.moto.region, role_arn=role_arn)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.when_loaded()
        return service


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def stream(self, **kwargs: Any) -> Any:
        yield self.data


class STSEndpointTests(SynchronousTestCase):
    """Which STS host AssumeRole calls (nothing leaves the process).

    botocore 1.40 and later default to the regional endpoint already; these
    pin the behaviour for the older botocore versions pyproject.toml allows.
    """

    def assume_role_url(self, region: str, env: dict[str, str | None]) -> str:
        from botocore.awsrequest import AWSResponse

        aws_environment(self, env)
        session = new_session()
        urls: list[str] = []

        def answer(request: Any, **kwargs: Any) -> AWSResponse:
            urls.append(request.url)
            body = (
                b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code>"
                b"<Message>no</Message></Error></ErrorResponse>"
            )
            return AWSResponse(request.url, 403, {}, _Body(body))

        session.register("before-send.sts.AssumeRole", answer)
        source = Found(Credentials("AKIDEXAMPLE", "secret"), "environment")
        with self.assertRaises(NoCredentialsError):
            assume_role(session, source, region=region, role_arn="arn:aws:iam::1:role/r")
        return urls[0]

    def test_the_daemon_region_s_endpoint_like_the_go_daemon(self) -> None:
        for region in ("us-east-1", "eu-west-1", "us-east-2"):
            self.assertTrue(
                self.assume_role_url(region, {}).startswith(f"https://sts.{region}.amazonaws.com/"),
                region,
            )

    def test_an_explicit_setting_is_respected(self) -> None:
        url = self.assume_role_url("eu-west-1", {"AWS_STS_REGIONAL_ENDPOINTS": "legacy"})
        self.assertTrue(url.startswith("https://sts.amazonaws.com/"), url)

    def test_a_profile_setting_is_respected(self) -> None:
        config = temp_path(self)
        with open(config, "w") as f:
            f.write("[default]\nsts_regional_endpoints = legacy\n")
        url = self.assume_role_url("eu-west-1", {"AWS_CONFIG_FILE": config})
        self.assertTrue(url.startswith("https://sts.amazonaws.com/"), url)


class _NotRunningClock(Clock):
    running = False


class FirstLookupTests(SynchronousTestCase):
    def test_before_the_reactor_runs_the_first_lookup_waits_for_its_first_turn(self) -> None:
        # No lookup thread may start while the daemon holds its stop signals
        # (before "during startup"): threads and their children keep the mask.
        clock = _NotRunningClock()
        runner = Runner()
        service = CredentialsService(
            clock,
            region=REGION,
            fetch=lambda: Found(Credentials("A", "s"), "env"),
            run_in_thread=runner,
        )
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(runner.pending, [])
        clock.advance(0)
        self.assertEqual(len(runner.pending), 1)
