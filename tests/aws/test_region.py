"""xraytwisted.aws.region: the region chain, with plain fakes and with the metadata fakes."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import threads
from twisted.internet.defer import inlineCallbacks
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support.fake_metadata import FakeECS, FakeIMDS, isolated_environ
from tests.support.logs import capture_logs
from tests.support.tempdirs import temp_path
from xraytwisted.aws.instance_metadata import MetadataClient, MetadataError
from xraytwisted.aws.region import (
    NO_REGION,
    RegionError,
    local_config_region,
    profile_name,
    resolve_region,
)
from xraytwisted.settings.table import Settings

GO_MESSAGE = (
    "Cannot fetch region variable from config file, environment variables, ecs metadata, "
    "or ec2 metadata. Use local-mode to use the local config region."
)


class Sources:
    """RegionSources whose answers are given; records which lookups were made."""

    def __init__(
        self,
        ecs_file: str | Exception | None = None,
        ecs_task: str | Exception | None = None,
        ec2: str | Exception | None = None,
    ) -> None:
        self.answers = {
            "ecs_file": ecs_file,
            "ecs_task": ecs_task,
            "ec2": MetadataError("no IMDS here") if ec2 is None else ec2,
        }
        self.calls: list[str] = []

    def _answer(self, name: str) -> Any:
        self.calls.append(name)
        answer = self.answers[name]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def ecs_file_region(self) -> str | None:
        return self._answer("ecs_file")  # type: ignore[no-any-return]

    def ecs_task_region(self) -> str | None:
        return self._answer("ecs_task")  # type: ignore[no-any-return]

    def ec2_region(self) -> str:
        return self._answer("ec2")  # type: ignore[no-any-return]


class OrderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.env = isolated_environ()

    def test_message_is_the_go_daemons(self) -> None:
        self.assertEqual(NO_REGION, GO_MESSAGE)
        self.assertEqual(str(RegionError()), GO_MESSAGE)

    def test_command_line_or_config_first(self) -> None:
        sources = Sources(ecs_file="eu-west-1", ec2="us-west-1")
        env = dict(self.env, AWS_REGION="ap-south-1")
        found = resolve_region(Settings(region="us-east-1"), env, sources)
        self.assertEqual(found, ("us-east-1", "commandline/config file"))
        self.assertEqual(sources.calls, [])

    def test_aws_region_second(self) -> None:
        sources = Sources(ecs_file="eu-west-1", ec2="us-west-1")
        env = dict(self.env, AWS_REGION="ap-south-1", AWS_DEFAULT_REGION="eu-north-1")
        self.assertEqual(
            resolve_region(Settings(), env, sources), ("ap-south-1", "environment variables")
        )
        self.assertEqual(sources.calls, [])

    def test_ecs_file_then_task_endpoint_then_imds(self) -> None:
        sources = Sources(ecs_file="eu-west-1", ecs_task="eu-west-2", ec2="eu-west-3")
        self.assertEqual(
            resolve_region(Settings(), self.env, sources), ("eu-west-1", "ECS metadata file")
        )
        self.assertEqual(sources.calls, ["ecs_file"])

        sources = Sources(ecs_file=None, ecs_task="eu-west-2", ec2="eu-west-3")
        self.assertEqual(
            resolve_region(Settings(), self.env, sources),
            ("eu-west-2", "ECS task metadata endpoint"),
        )
        self.assertEqual(sources.calls, ["ecs_file", "ecs_task"])

        sources = Sources(ecs_file=None, ecs_task=None, ec2="eu-west-3")
        self.assertEqual(
            resolve_region(Settings(), self.env, sources), ("eu-west-3", "ec2 metadata")
        )
        self.assertEqual(sources.calls, ["ecs_file", "ecs_task", "ec2"])

    def test_failures_fall_through_and_are_logged(self) -> None:
        events = capture_logs(self)
        sources = Sources(
            ecs_file=MetadataError("ECS metadata file /x has no TaskARN"),
            ecs_task=MetadataError("GET http://169.254.170.2/v4/x/task answered HTTP 500"),
            ec2="us-gov-west-1",
        )
        self.assertEqual(
            resolve_region(Settings(), self.env, sources), ("us-gov-west-1", "ec2 metadata")
        )
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(
            [(e["source"], e["reason"]) for e in errors],
            [
                ("ECS metadata file", "ECS metadata file /x has no TaskARN"),
                (
                    "ECS task metadata endpoint",
                    "GET http://169.254.170.2/v4/x/task answered HTTP 500",
                ),
            ],
        )
        self.assertEqual(errors[0]["log_format"], "Unable to fetch region from {source}: {reason}")

    def test_nothing_found(self) -> None:
        sources = Sources(ec2=MetadataError("PUT .../latest/api/token: no answer within 1 s"))
        with self.assertRaises(RegionError) as caught:
            resolve_region(Settings(), self.env, sources)
        self.assertEqual(str(caught.exception), GO_MESSAGE)
        self.assertEqual(
            caught.exception.reasons,
            ("EC2 metadata: PUT .../latest/api/token: no answer within 1 s",),
        )

    def test_unexpected_exception_in_a_source_falls_through(self) -> None:
        sources = Sources(ecs_file=RuntimeError(), ec2="us-east-2")
        self.assertEqual(
            resolve_region(Settings(), self.env, sources), ("us-east-2", "ec2 metadata")
        )


class LocalModeTests(SynchronousTestCase):
    def config_file(self, text: str) -> str:
        path: str = temp_path(self)
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_no_metadata_in_local_mode(self) -> None:
        sources = Sources(ecs_file="eu-west-1", ecs_task="eu-west-2", ec2="eu-west-3")
        with self.assertRaises(RegionError) as caught:
            resolve_region(Settings(local_mode=True), isolated_environ(), sources)
        self.assertEqual(str(caught.exception), GO_MESSAGE)
        self.assertIn("local mode", caught.exception.reasons[0])
        self.assertEqual(sources.calls, [])

    def test_aws_default_region(self) -> None:
        env = isolated_environ({"AWS_DEFAULT_REGION": "eu-south-1"})
        self.assertEqual(
            resolve_region(Settings(local_mode=True), env, Sources()),
            ("eu-south-1", "config (AWS_DEFAULT_REGION)"),
        )
        # Outside local mode AWS_DEFAULT_REGION is not a source (as in the Go daemon).
        with self.assertRaises(RegionError):
            resolve_region(Settings(), env, Sources())

    def test_profile_region(self) -> None:
        path = self.config_file(
            "[default]\nregion = us-west-1\n\n[profile dev]\nregion = ap-northeast-3\n"
        )
        env = isolated_environ({"AWS_CONFIG_FILE": path, "AWS_PROFILE": "dev"})
        self.assertEqual(
            resolve_region(Settings(local_mode=True), env, Sources()),
            ("ap-northeast-3", f"config (profile 'dev' in {path})"),
        )
        env = isolated_environ({"AWS_CONFIG_FILE": path})
        self.assertEqual(
            local_config_region(env), ("us-west-1", f"config (profile 'default' in {path})")
        )
        env = isolated_environ({"AWS_CONFIG_FILE": path, "AWS_DEFAULT_REGION": "eu-west-1"})
        self.assertEqual(local_config_region(env), ("eu-west-1", "config (AWS_DEFAULT_REGION)"))

    def test_profile_default_spelled_as_profile(self) -> None:
        path = self.config_file("[profile default]\nregion = il-central-1\n")
        env = isolated_environ({"AWS_CONFIG_FILE": path})
        self.assertEqual(
            local_config_region(env), ("il-central-1", f"config (profile 'default' in {path})")
        )

    def test_no_region_in_profile_or_no_file(self) -> None:
        path = self.config_file("[profile dev]\noutput = json\n[default]\nregion = us-west-1\n")
        env = isolated_environ({"AWS_CONFIG_FILE": path, "AWS_PROFILE": "dev"})
        self.assertIsNone(local_config_region(env))
        self.assertIsNone(local_config_region(isolated_environ()))
        broken = self.config_file("region = nowhere\n")
        self.assertIsNone(local_config_region(isolated_environ({"AWS_CONFIG_FILE": broken})))

    def test_profile_name(self) -> None:
        self.assertEqual(profile_name({}), "default")
        self.assertEqual(profile_name({"AWS_DEFAULT_PROFILE": "b"}), "b")
        self.assertEqual(profile_name({"AWS_PROFILE": "a", "AWS_DEFAULT_PROFILE": "b"}), "a")


class WithMetadataServicesTests(TestCase):
    """The chain with the real MetadataClient against the fakes (run in a thread)."""

    def setUp(self) -> None:
        self.imds = FakeIMDS(region="us-west-2")
        self.ecs = FakeECS(region="eu-west-2")
        self.imds.start(self)
        self.ecs.start(self)
        path: str = temp_path(self)
        with open(path, "w") as f:
            json.dump({"TaskARN": "arn:aws:ecs:ap-east-1:123456789012:task/c/1"}, f)
        self.ecs_file = path

    def resolve(self, settings: Settings, **env: str | None) -> Any:
        environment = isolated_environ(env)
        return threads.deferToThread(
            lambda: resolve_region(settings, environment, MetadataClient(environment))
        )

    @inlineCallbacks
    def test_each_source(self) -> Any:
        imds = {
            "AWS_EC2_METADATA_DISABLED": None,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": self.imds.url,
        }
        ecs_v4 = {"ECS_CONTAINER_METADATA_URI_V4": self.ecs.metadata_uri}
        ecs_file = {
            "ECS_ENABLE_CONTAINER_METADATA": "true",
            "ECS_CONTAINER_METADATA_FILE": self.ecs_file,
        }
        found = yield self.resolve(Settings(), **imds)
        self.assertEqual(found, ("us-west-2", "ec2 metadata"))
        found = yield self.resolve(Settings(), **imds, **ecs_v4)
        self.assertEqual(found, ("eu-west-2", "ECS task metadata endpoint"))
        found = yield self.resolve(Settings(), **imds, **ecs_v4, **ecs_file)
        self.assertEqual(found, ("ap-east-1", "ECS metadata file"))
        found = yield self.resolve(Settings(), **imds, **ecs_v4, **ecs_file, AWS_REGION="eu-west-3")
        self.assertEqual(found, ("eu-west-3", "environment variables"))
        found = yield self.resolve(Settings(region="me-central-1"), **imds, AWS_REGION="eu-west-3")
        self.assertEqual(found, ("me-central-1", "commandline/config file"))

    @inlineCallbacks
    def test_broken_ecs_file_falls_through_to_the_task_endpoint(self) -> Any:
        with open(self.ecs_file, "w") as f:
            json.dump({"MetadataFileStatus": "NOT_READY"}, f)
        found = yield self.resolve(
            Settings(),
            ECS_ENABLE_CONTAINER_METADATA="true",
            ECS_CONTAINER_METADATA_FILE=self.ecs_file,
            ECS_CONTAINER_METADATA_URI_V4=self.ecs.metadata_uri,
        )
        self.assertEqual(found, ("eu-west-2", "ECS task metadata endpoint"))

    @inlineCallbacks
    def test_local_mode_ignores_metadata(self) -> Any:
        found = yield self.resolve(
            Settings(local_mode=True),
            AWS_EC2_METADATA_DISABLED=None,
            AWS_EC2_METADATA_SERVICE_ENDPOINT=self.imds.url,
            ECS_CONTAINER_METADATA_URI_V4=self.ecs.metadata_uri,
            AWS_DEFAULT_REGION="eu-north-1",
        )
        self.assertEqual(found, ("eu-north-1", "config (AWS_DEFAULT_REGION)"))
        self.assertEqual(self.imds.requests + self.ecs.requests, [])

    @inlineCallbacks
    def test_nothing_anywhere(self) -> Any:
        # IMDS disabled (the test default), no ECS settings.
        try:
            yield self.resolve(Settings())
        except RegionError as e:
            self.assertEqual(str(e), GO_MESSAGE)
            self.assertIn("AWS_EC2_METADATA_DISABLED", e.reasons[0])
        else:
            self.fail("a region was found")
