"""xraytwisted.aws.instance_metadata: IMDSv2 and ECS lookups against fakes on loopback, and bounds.

The client is blocking by design (startup only), so every network call here runs in a
worker thread while the trial reactor serves the fake.
"""

from __future__ import annotations

import http.client
import json
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fake_metadata import (
    FakeECS,
    FakeIMDS,
    aws_environment,
    closed_port,
    isolated_environ,
    silent_listener,
    start_fake_process,
)
from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_path
from xraytwisted.aws.instance_metadata import (
    HOSTNAME_MAX,
    IMDS_IPV4,
    IMDS_IPV6,
    INSTANCE_ID_MAX,
    Identity,
    MetadataClient,
    MetadataError,
    identity,
    region_from_arn,
    region_from_availability_zone,
)
from xraytwisted.settings.table import Settings

T = TypeVar("T")
# Scheduling slack for the timing assertions (thread start, loaded CI machines).
SLACK = 0.5


def in_thread(call: Callable[[], T]) -> Deferred[T]:
    return threads.deferToThread(call)


def timed(call: Callable[[], T]) -> Callable[[], tuple[float, T | MetadataError]]:
    def run() -> tuple[float, T | MetadataError]:
        start = time.monotonic()
        try:
            result: T | MetadataError = call()
        except MetadataError as e:
            result = e
        return time.monotonic() - start, result

    return run


class IMDSTests(TestCase):
    def setUp(self) -> None:
        self.imds = FakeIMDS(region="ap-southeast-2", hostname="ip-10-9-8-7", instance_id="i-0abc")
        self.url = self.imds.start(self)
        self.env = isolated_environ(
            {"AWS_EC2_METADATA_DISABLED": None, "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.url}
        )

    @inlineCallbacks
    def test_imdsv2_token_then_gets(self) -> Any:
        client = MetadataClient(self.env)
        values = yield in_thread(
            lambda: (client.ec2_region(), client.hostname(), client.instance_id())
        )
        self.assertEqual(values, ("ap-southeast-2", "ip-10-9-8-7", "i-0abc"))
        puts = [r for r in self.imds.requests if r[0] == "PUT"]
        self.assertEqual(len(puts), 1, "one token serves every lookup")
        self.assertEqual(puts[0][2]["x-aws-ec2-metadata-token-ttl-seconds"], "21600")
        gets = self.imds.metadata_requests()
        self.assertEqual(
            [path for _, path, _ in gets],
            [
                "/latest/meta-data/placement/region",
                "/latest/meta-data/hostname",
                "/latest/meta-data/instance-id",
            ],
        )
        for _, _, headers in gets:
            self.assertIn(headers["x-aws-ec2-metadata-token"], self.imds.tokens)

    @inlineCallbacks
    def test_v1_get_is_refused_by_the_fake(self) -> Any:
        def v1_get() -> int:
            connection = http.client.HTTPConnection("127.0.0.1", self.imds.port.getHost().port)  # type: ignore[union-attr]
            try:
                connection.request("GET", "/latest/meta-data/placement/region")
                return connection.getresponse().status
            finally:
                connection.close()

        status = yield in_thread(v1_get)
        self.assertEqual(status, 401)

    @inlineCallbacks
    def test_v1_fallback_cannot_pass_a_token_requiring_imds(self) -> Any:
        # The token request "fails" the way an IMDSv1-only service would (404): the
        # client falls back to a v1 GET, which IMDSv2-required answers with 401.
        self.imds.token_status = 404
        client = MetadataClient(self.env)
        _, result = yield in_thread(timed(client.ec2_region))
        self.assertIsInstance(result, MetadataError)
        self.assertIn("HTTP 401", str(result))
        self.assertNotIn("x-aws-ec2-metadata-token", self.imds.metadata_requests()[0][2])

    @inlineCallbacks
    def test_v1_fallback_when_there_is_no_token_service(self) -> Any:
        self.imds.token_status = 404
        self.imds.require_token = False
        client = MetadataClient(self.env)
        region = yield in_thread(client.ec2_region)
        self.assertEqual(region, "ap-southeast-2")

    @inlineCallbacks
    def test_bad_token_answer_stops_imds_lookups(self) -> Any:
        self.imds.token_status = 500
        client = MetadataClient(self.env)
        first = yield in_thread(timed(client.ec2_region))
        second = yield in_thread(timed(client.instance_id))
        self.assertIn("HTTP 500", str(first[1]))
        self.assertIsInstance(second[1], MetadataError)
        self.assertEqual(len(self.imds.requests), 1, "no second attempt")

    @inlineCallbacks
    def test_disabled_makes_no_request(self) -> Any:
        env = dict(self.env, AWS_EC2_METADATA_DISABLED="TRUE")
        client = MetadataClient(env)
        _, result = yield in_thread(timed(client.ec2_region))
        self.assertIsInstance(result, MetadataError)
        self.assertIn("AWS_EC2_METADATA_DISABLED", str(result))
        self.assertEqual(self.imds.requests, [])

    @inlineCallbacks
    def test_bad_region_answer(self) -> Any:
        self.imds.values["placement/region"] = "<html>captive portal</html>"
        client = MetadataClient(self.env)
        _, result = yield in_thread(timed(client.ec2_region))
        self.assertIsInstance(result, MetadataError)
        self.assertIn("as region", str(result))

    @inlineCallbacks
    def test_proxies_are_never_used(self) -> Any:
        # A proxy that refuses every connection: any request sent to it would fail.
        proxy = f"http://127.0.0.1:{closed_port()}"
        ecs = FakeECS(region="sa-east-1")
        ecs.start(self)
        values: dict[str, str | None] = {
            name: proxy
            for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY")
        }
        values.update(
            AWS_EC2_METADATA_DISABLED=None,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=self.url,
            ECS_CONTAINER_METADATA_URI_V4=ecs.metadata_uri,
        )
        env = aws_environment(self, values)  # in os.environ too, where urllib would look
        client = MetadataClient(env)
        found = yield in_thread(lambda: (client.ec2_region(), client.ecs_task_region()))
        self.assertEqual(found, ("ap-southeast-2", "sa-east-1"))


class IMDSEndpointTests(SynchronousTestCase):
    def test_default_ipv4(self) -> None:
        self.assertEqual(MetadataClient({}).imds_url, IMDS_IPV4)
        self.assertEqual(IMDS_IPV4, "http://169.254.169.254")

    def test_ipv6_mode(self) -> None:
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"}
        self.assertEqual(MetadataClient(env).imds_url, IMDS_IPV6)
        self.assertEqual(IMDS_IPV6, "http://[fd00:ec2::254]")

    def test_custom_endpoint_wins(self) -> None:
        env = {
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1234/",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6",
        }
        self.assertEqual(MetadataClient(env).imds_url, "http://127.0.0.1:1234")

    def test_not_a_url(self) -> None:
        client = MetadataClient({"AWS_EC2_METADATA_SERVICE_ENDPOINT": "169.254.169.254"})
        with self.assertRaises(MetadataError) as caught:
            client.ec2_region()
        self.assertIn("not an http:// or https:// URL", str(caught.exception))


class BoundedWaitTests(TestCase):
    """A missing metadata service costs at most a short, bounded wait."""

    @inlineCallbacks
    def test_refused_is_immediate_and_not_retried(self) -> Any:
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
        client = MetadataClient(env)

        def all_three() -> list[str]:
            errors = []
            for lookup in (client.ec2_region, client.hostname, client.instance_id):
                try:
                    lookup()
                except MetadataError as e:
                    errors.append(str(e))
            return errors

        elapsed, errors = yield in_thread(timed(all_three))
        self.assertEqual(len(errors), 3)
        self.assertIn("refused", errors[0].lower())
        self.assertLess(elapsed, SLACK)

    @inlineCallbacks
    def test_silent_imds_costs_one_timeout_in_all(self) -> Any:
        port = silent_listener(self)
        client = MetadataClient({"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{port}"})
        first = yield in_thread(timed(client.ec2_region))
        rest = yield in_thread(timed(lambda: (client.hostname(), client.instance_id())))
        self.assertIsInstance(first[1], MetadataError)
        self.assertIn("no answer within 1 s", str(first[1]))
        self.assertGreaterEqual(first[0], 0.9)  # it did wait for the token
        self.assertLess(first[0], 1.0 + SLACK)
        self.assertIsInstance(rest[1], MetadataError)
        self.assertLess(rest[0], 0.1, "no new attempt after the token request timed out")

    @inlineCallbacks
    def test_budget_bounds_all_lookups_together(self) -> Any:
        env = {
            "ECS_CONTAINER_METADATA_URI_V4": f"http://127.0.0.1:{silent_listener(self)}/v4/x",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{silent_listener(self)}",
        }
        client = MetadataClient(env, timeout=1.0, budget=1.5)

        def both() -> list[str]:
            errors = []
            for lookup in (client.ecs_task_region, client.ec2_region, client.hostname):
                try:
                    lookup()
                except MetadataError as e:
                    errors.append(str(e))
            return errors

        elapsed, errors = yield in_thread(timed(both))
        self.assertEqual(len(errors), 3)
        self.assertIn("within 1 s", errors[0])
        self.assertRegex(errors[1], r"within 0\.[45]\d* s")
        self.assertGreaterEqual(elapsed, 1.4)
        self.assertLess(elapsed, 1.5 + SLACK)

    def test_budget_used_up(self) -> None:
        now = [100.0]
        client = MetadataClient(
            {"ECS_CONTAINER_METADATA_URI_V4": "http://127.0.0.1:9/v4/x"},
            budget=2.0,
            monotonic=lambda: now[0],
        )
        with self.assertRaises(MetadataError):
            client.ecs_task_region()  # starts the budget (and is refused)
        now[0] += 2.0
        with self.assertRaises(MetadataError) as caught:
            client.ecs_task_region()
        self.assertIn("used up", str(caught.exception))


class ECSFileTests(SynchronousTestCase):
    def write(self, document: Any) -> str:
        path: str = temp_path(self)
        with open(path, "w") as f:
            f.write(document if isinstance(document, str) else json.dumps(document))
        return path

    def client(self, path: str | None, enabled: str = "true") -> MetadataClient:
        env = {"ECS_ENABLE_CONTAINER_METADATA": enabled}
        if path is not None:
            env["ECS_CONTAINER_METADATA_FILE"] = path
        return MetadataClient(env)

    def test_region_from_task_arn(self) -> None:
        path = self.write(
            {
                "Cluster": "default",
                "TaskARN": "arn:aws:ecs:eu-central-1:123456789012:task/default/abc",
                "MetadataFileStatus": "READY",
            }
        )
        self.assertEqual(self.client(path).ecs_file_region(), "eu-central-1")
        self.assertEqual(self.client(path, enabled="True").ecs_file_region(), "eu-central-1")

    def test_not_enabled(self) -> None:
        path = self.write({"TaskARN": "arn:aws:ecs:eu-central-1:1:task/x"})
        self.assertIsNone(self.client(path, enabled="false").ecs_file_region())
        self.assertIsNone(MetadataClient({"ECS_CONTAINER_METADATA_FILE": path}).ecs_file_region())

    def assert_error(self, client: MetadataClient, *words: str) -> None:
        with self.assertRaises(MetadataError) as caught:
            client.ecs_file_region()
        for word in words:
            self.assertIn(word, str(caught.exception))

    def test_missing_task_arn_is_an_error_not_a_crash(self) -> None:
        path = self.write({"Cluster": "default", "MetadataFileStatus": "NOT_READY"})
        self.assert_error(self.client(path), "no TaskARN", "NOT_READY", path)

    def test_problems(self) -> None:
        self.assert_error(self.client(None), "ECS_CONTAINER_METADATA_FILE is not set")
        missing = os.path.join(temp_path(self), "nope.json")
        self.assert_error(self.client(missing), "Unable to open ECS metadata file", missing)
        self.assert_error(self.client(self.write("{not json")), "not JSON")
        self.assert_error(self.client(self.write("[1]")), "not a JSON object")
        self.assert_error(self.client(self.write({"TaskARN": "task/x"})), "not an ARN")


class ECSTaskEndpointTests(TestCase):
    @inlineCallbacks
    def check(self, fake: FakeECS) -> Any:
        fake.start(self)
        client = MetadataClient({"ECS_CONTAINER_METADATA_URI_V4": fake.metadata_uri})
        _, result = yield in_thread(timed(client.ecs_task_region))
        return result

    @inlineCallbacks
    def test_region_from_task_arn(self) -> Any:
        fake = FakeECS(region="ca-central-1", availability_zone="us-west-2-lax-1a")
        result = yield self.check(fake)
        self.assertEqual(result, "ca-central-1")
        self.assertEqual(fake.requests[0][1], fake.METADATA_PATH + "/task")

    @inlineCallbacks
    def test_region_from_availability_zone(self) -> Any:
        result = yield self.check(FakeECS(task_arn="", availability_zone="us-west-2-lax-1a"))
        self.assertEqual(result, "us-west-2")

    @inlineCallbacks
    def test_neither(self) -> Any:
        result = yield self.check(FakeECS(task_arn="", availability_zone=""))
        self.assertIsInstance(result, MetadataError)
        self.assertIn("neither TaskARN nor AvailabilityZone", str(result))

    @inlineCallbacks
    def test_http_error(self) -> Any:
        result = yield self.check(FakeECS(task_status=500))
        self.assertIsInstance(result, MetadataError)
        self.assertIn("HTTP 500", str(result))

    def test_not_configured(self) -> None:
        self.assertIsNone(MetadataClient({}).ecs_task_region())


class ParsingTests(SynchronousTestCase):
    def test_availability_zones(self) -> None:
        for zone, region in [
            ("us-east-1a", "us-east-1"),
            ("us-gov-west-1b", "us-gov-west-1"),
            ("cn-north-1a", "cn-north-1"),
            ("us-west-2-lax-1a", "us-west-2"),
            ("us-east-1-wl1-bos-wlz-1", "us-east-1"),
            ("eusc-de-east-1a", "eusc-de-east-1"),
        ]:
            self.assertEqual(region_from_availability_zone(zone), region, zone)
        with self.assertRaises(MetadataError):
            region_from_availability_zone("use1-az1")

    def test_arns(self) -> None:
        self.assertEqual(region_from_arn("arn:aws-cn:ecs:cn-north-1:1:task/a/b"), "cn-north-1")
        for bad in ("", "arn:aws:ecs::1:task/x", "arn:aws:ecs:US EAST:1:task/x", "ecs:a:b:c:d:e"):
            with self.assertRaises(MetadataError):
                region_from_arn(bad)


class IdentityTests(TestCase):
    def setUp(self) -> None:
        self.imds = FakeIMDS(
            hostname="ip-172-31-0-9.ec2.internal", instance_id="i-0fedcba987654321"
        )
        self.env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds.start(self)}

    @inlineCallbacks
    def test_from_imds(self) -> Any:
        found = yield in_thread(lambda: identity(Settings(), self.env))
        self.assertEqual(found, Identity("ip-172-31-0-9.ec2.internal", "i-0fedcba987654321"))

    @inlineCallbacks
    def test_environment_first(self) -> Any:
        env = dict(self.env, AWS_HOSTNAME="my-host", AWS_INSTANCE_ID="i-env")
        found = yield in_thread(lambda: identity(Settings(), env))
        self.assertEqual(found, Identity("my-host", "i-env"))
        self.assertEqual(self.imds.requests, [])
        half = dict(self.env, AWS_HOSTNAME="my-host")
        found = yield in_thread(lambda: identity(Settings(), half))
        self.assertEqual(found, Identity("my-host", "i-0fedcba987654321"))

    @inlineCallbacks
    def test_local_mode_never_asks_imds(self) -> Any:
        found = yield in_thread(lambda: identity(Settings(local_mode=True), self.env))
        self.assertEqual(found, Identity("", ""))
        env = dict(self.env, AWS_HOSTNAME="h")
        found = yield in_thread(lambda: identity(Settings(local_mode=True), env))
        self.assertEqual(found, Identity("h", ""))
        self.assertEqual(self.imds.requests, [])

    @inlineCallbacks
    def test_truncated_to_api_limits(self) -> Any:
        self.imds.values["hostname"] = "h" * 300
        self.imds.values["instance-id"] = "i-" + "0" * 30
        found = yield in_thread(lambda: identity(Settings(), self.env))
        self.assertEqual(len(found.hostname), HOSTNAME_MAX)
        self.assertEqual(found.instance_id, ("i-" + "0" * 30)[:INSTANCE_ID_MAX])

    @inlineCallbacks
    def test_failures_logged_at_debug_only(self) -> Any:
        events = capture_logs(self)
        env = {"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
        found = yield in_thread(lambda: identity(Settings(), env))
        self.assertEqual(found, Identity("", ""))
        mine = [e for e in events if "metadata failed" in e.get("log_format", "")]
        self.assertEqual(
            [e["log_format"].split(":")[0] for e in mine],
            ["Get hostname metadata failed", "Get instance id metadata failed"],
        )
        self.assertEqual({e["log_level"] for e in mine}, {LogLevel.debug})
        self.assertIn("refused", mine[0]["error"].lower())


class FakeProcessTests(SynchronousTestCase):
    """The child-process fake, for code that blocks the reactor thread (e.g. build)."""

    def test_imds_in_a_child_process(self) -> None:
        url = start_fake_process(self, "imds", region="me-south-1", instance_id="i-child")
        client = MetadataClient({"AWS_EC2_METADATA_SERVICE_ENDPOINT": url})
        self.assertEqual((client.ec2_region(), client.instance_id()), ("me-south-1", "i-child"))

    def test_ecs_in_a_child_process(self) -> None:
        url = start_fake_process(self, "ecs", region="af-south-1")
        client = MetadataClient({"ECS_CONTAINER_METADATA_URI_V4": url + FakeECS.METADATA_PATH})
        self.assertEqual(client.ecs_task_region(), "af-south-1")
