"""Local sampling answers, checked against the real aws-xray-sdk and botocore."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from xraytwisted.observe.counters import Counters
from xraytwisted.tcpport.local_sampling import (
    BadRequest,
    LocalSamplingResource,
    RulesFileError,
    default_rules,
    load_rules_file,
    parse_rules,
    rule_records,
    sampling_targets,
)

NOW = 1_795_304_112.25
STATS = {
    "SamplingStatisticsDocuments": [
        {
            "RuleName": "Default",
            "ClientID": "0123456789abcdef01234567",
            "RequestCount": 10,
            "BorrowCount": 1,
            "SampledCount": 2,
            "Timestamp": 1795304112,
        }
    ]
}


class PureTests(SynchronousTestCase):
    def test_default_rule(self) -> None:
        self.assertEqual(
            rule_records(1700000000.0),
            {
                "SamplingRuleRecords": [
                    {
                        "SamplingRule": {
                            "RuleName": "Default",
                            "RuleARN": "arn:aws:xray:local::sampling-rule/Default",
                            "ResourceARN": "*",
                            "Priority": 10000,
                            "FixedRate": 1.0,
                            "ReservoirSize": 1,
                            "ServiceName": "*",
                            "ServiceType": "*",
                            "Host": "*",
                            "HTTPMethod": "*",
                            "URLPath": "*",
                            "Version": 1,
                            "Attributes": {},
                        },
                        "CreatedAt": 1700000000.0,
                        "ModifiedAt": 1700000000.0,
                    }
                ]
            },
        )

    def test_targets_one_per_rule_name(self) -> None:
        docs = [
            {"RuleName": "Default", "ClientID": "a" * 24},
            {"RuleName": "custom", "ClientID": "a" * 24},
            {"RuleName": "Default", "ClientID": "b" * 24},
        ]
        answer = sampling_targets({"SamplingStatisticsDocuments": docs}, NOW, 1700000000.0)
        self.assertEqual(
            answer,
            {
                "SamplingTargetDocuments": [
                    {
                        "RuleName": "Default",
                        "FixedRate": 1.0,
                        "ReservoirQuota": 1,
                        "ReservoirQuotaTTL": NOW + 10,
                        "Interval": 10,
                    }
                ],
                "LastRuleModification": 1700000000.0,
                # X-Ray lists statistics of rules it does not have as unprocessed.
                "UnprocessedStatistics": [
                    {
                        "RuleName": "custom",
                        "ErrorCode": "400",
                        "Message": "not a local sampling rule",
                    }
                ],
            },
        )

    def test_production_like_rate(self) -> None:
        rules = default_rules(0.05)
        [record] = rule_records(1.0, rules)["SamplingRuleRecords"]
        self.assertEqual(
            (record["SamplingRule"]["FixedRate"], record["SamplingRule"]["ReservoirSize"]),
            (0.05, 1),
        )
        [target] = sampling_targets(
            {"SamplingStatisticsDocuments": [{"RuleName": "Default"}]}, NOW, 1.0, rules
        )["SamplingTargetDocuments"]
        self.assertEqual((target["FixedRate"], target["ReservoirQuota"]), (0.05, 1))
        self.assertEqual(
            rules.source, "the first request each second and 0.05 of the rest are sampled"
        )
        self.assertEqual(default_rules().source, "every request is sampled")

    def test_rules_file(self) -> None:
        # What `aws xray get-sampling-rules` prints, plus a hand-written short rule.
        document = {
            "SamplingRuleRecords": [
                {
                    "SamplingRule": {
                        "RuleName": "checkout",
                        "RuleARN": "arn:aws:xray:us-east-2:1:sampling-rule/checkout",
                        "ResourceARN": "*", "Priority": 100, "FixedRate": 0.5, "ReservoirSize": 3,
                        "ServiceName": "shop", "ServiceType": "*", "Host": "*",
                        "HTTPMethod": "POST", "URLPath": "/checkout*", "Version": 1,
                        "Attributes": {},
                    },
                    "CreatedAt": 1.0, "ModifiedAt": 2.0,
                },
                {"SamplingRule": {"RuleName": "Default", "Priority": 10000, "FixedRate": 0.0,
                                  "ReservoirSize": 0}},
            ]
        }  # fmt: skip
        path = Path(self.mktemp())
        path.write_text(json.dumps(document))
        rules = load_rules_file(str(path))
        self.assertEqual(rules.source, f"2 rules from {path} (checkout, Default)")
        records = rule_records(7.0, rules)["SamplingRuleRecords"]
        self.assertEqual(
            records[0]["SamplingRule"], document["SamplingRuleRecords"][0]["SamplingRule"]
        )
        self.assertEqual((records[0]["CreatedAt"], records[0]["ModifiedAt"]), (7.0, 7.0))
        self.assertEqual(
            records[1]["SamplingRule"],
            {"RuleName": "Default", "RuleARN": "arn:aws:xray:local::sampling-rule/Default",
             "ResourceARN": "*", "Priority": 10000, "FixedRate": 0.0, "ReservoirSize": 0,
             "ServiceName": "*", "ServiceType": "*", "Host": "*", "HTTPMethod": "*",
             "URLPath": "*", "Version": 1, "Attributes": {}},
        )  # fmt: skip
        stats = {"SamplingStatisticsDocuments": [{"RuleName": "checkout"}]}
        [target] = sampling_targets(stats, NOW, 7.0, rules)["SamplingTargetDocuments"]
        self.assertEqual((target["FixedRate"], target["ReservoirQuota"]), (0.5, 3))

    def test_bad_rules_files(self) -> None:
        def rule(**fields: Any) -> dict[str, Any]:
            base = {"RuleName": "r", "Priority": 1, "FixedRate": 0.1, "ReservoirSize": 1}
            return {"SamplingRuleRecords": [{"SamplingRule": {**base, **fields}}]}

        cases: list[tuple[Any, str]] = [
            ([], 'it needs a non-empty "SamplingRuleRecords" list'),
            ({"SamplingRuleRecords": []}, 'it needs a non-empty "SamplingRuleRecords" list'),
            ({"SamplingRuleRecords": [{}]}, 'SamplingRuleRecords[0] has no "SamplingRule" object'),
            (
                rule(RuleName=""),
                "SamplingRuleRecords[0]: RuleName must be a string of 1 to 32 characters",
            ),
            (rule(FixedRate=2), "rule r: FixedRate must be a number from 0 to 1"),
            (rule(FixedRate=True), "rule r: FixedRate must be a number from 0 to 1"),
            (rule(ReservoirSize=-1), "rule r: ReservoirSize must be a whole number, 0 or more"),
            (rule(Priority="1"), "rule r: Priority must be a whole number"),
            (
                {"SamplingRuleRecords": rule()["SamplingRuleRecords"] * 2},
                "SamplingRuleRecords[1]: rule r appears twice",
            ),
        ]
        for document, message in cases:
            with self.assertRaises(RulesFileError, msg=repr(document)) as caught:
                parse_rules(document)
            self.assertEqual(str(caught.exception), message)
        path = Path(self.mktemp())
        path.write_text("{not json")
        with self.assertRaises(RulesFileError) as caught:
            load_rules_file(str(path))
        self.assertIn("it is not JSON", str(caught.exception))
        with self.assertRaises(RulesFileError) as caught:
            load_rules_file(str(path) + ".missing")
        self.assertEqual(str(caught.exception), "No such file or directory")

    def test_no_statistics_is_an_empty_answer(self) -> None:
        answer = sampling_targets({"SamplingStatisticsDocuments": []}, NOW, 1.0)
        self.assertEqual(answer["SamplingTargetDocuments"], [])

    def test_bad_requests(self) -> None:
        cases: list[tuple[Any, str]] = [
            (None, "the request body must be a JSON object"),
            ([], "the request body must be a JSON object"),
            ({}, "SamplingStatisticsDocuments must be a list"),
            ({"SamplingStatisticsDocuments": {}}, "SamplingStatisticsDocuments must be a list"),
            ({"SamplingStatisticsDocuments": [1]}, "every statistics document needs a RuleName"),
            ({"SamplingStatisticsDocuments": [{"RuleName": ""}]}, "needs a RuleName"),
            ({"SamplingStatisticsDocuments": [{"RuleName": 7}]}, "needs a RuleName"),
        ]
        for body, message in cases:
            with self.assertRaises(BadRequest, msg=repr(body)) as caught:
                sampling_targets(body, NOW, 1.0)
            self.assertIn(message, str(caught.exception))


class ResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.counters = Counters()
        self.resource = LocalSamplingResource(self.clock, self.counters, max_body=1000)
        self.treq = StubTreq(self.resource)

    def request(
        self, method: str, path: str, body: bytes = b"{}"
    ) -> tuple[int, dict[str, str], Any]:
        results: list[Any] = []
        d = self.treq.request(method, f"http://127.0.0.1:2000{path}", data=body)
        d.addCallback(lambda r: r.content().addCallback(lambda b: results.append((r, b))))
        self.treq.flush()
        self.assertEqual(len(results), 1)
        response, content = results[0]
        headers = {
            k.decode().lower(): v[-1].decode() for k, v in response.headers.getAllRawHeaders()
        }
        return response.code, headers, json.loads(content)

    def test_rules(self) -> None:
        status, headers, body = self.request("POST", "/GetSamplingRules")
        self.assertEqual(status, 200)
        self.assertEqual(headers["content-type"], "application/json")
        # Rules "changed" when the daemon started (whole seconds).
        self.assertEqual(body, rule_records(float(int(NOW))))
        self.assertEqual(self.counters.proxy_requests["local"], 1)

    def test_targets_use_the_clock(self) -> None:
        self.clock.advance(5)
        status, _, body = self.request("POST", "/SamplingTargets", json.dumps(STATS).encode())
        self.assertEqual(status, 200)
        self.assertEqual(body, sampling_targets(STATS, NOW + 5, float(int(NOW))))

    def test_other_xray_paths_explain_local_mode(self) -> None:
        for path in ("/TraceSegments", "/TelemetryRecords", "/GetSamplingStatisticSummaries"):
            status, headers, body = self.request("POST", path)
            self.assertEqual(status, 404)
            self.assertEqual(headers["x-amzn-errortype"], "NotFoundException")
            self.assertEqual(body["__type"], "NotFoundException")
            self.assertIn(f"{path} is not available", body["message"])
            self.assertIn("--local-sink", body["message"])
        self.assertEqual(self.counters.proxy_requests["not_found"], 3)

    def test_get_is_refused(self) -> None:
        status, headers, body = self.request("GET", "/GetSamplingRules", b"")
        self.assertEqual((status, headers["allow"]), (405, "POST"))
        self.assertEqual(body["message"], "use POST for /GetSamplingRules, not GET")
        self.assertEqual(self.counters.proxy_requests["bad_method"], 1)

    def test_bad_targets_body_is_400(self) -> None:
        for body, message in [
            (b"not json", "the request body is not JSON"),
            (b"", "the request body must be a JSON object"),
            (b'{"SamplingStatisticsDocuments": 3}', "must be a list"),
        ]:
            status, _, answer = self.request("POST", "/SamplingTargets", body)
            self.assertEqual(status, 400)
            self.assertEqual(answer["__type"], "InvalidRequestException")
            self.assertIn(message, answer["message"])

    def test_body_limit(self) -> None:
        status, _, answer = self.request("POST", "/SamplingTargets", b" " * 1001)
        self.assertEqual(status, 413)
        self.assertIn("larger than 1000 bytes", answer["message"])
        self.assertEqual(self.counters.proxy_requests["too_large"], 1)
        status, _, _ = self.request("POST", "/SamplingTargets", json.dumps(STATS).encode())
        self.assertEqual(status, 200)

    def test_works_without_counters(self) -> None:
        resource = LocalSamplingResource(self.clock)
        self.treq = StubTreq(resource)
        self.assertEqual(self.request("POST", "/GetSamplingRules")[0], 200)


def sdk_round_trip(port: int) -> tuple[list[dict[str, Any]], dict[str, Any], int]:
    """What the real SDK makes of our answers (blocking: runs in a thread)."""
    from aws_xray_sdk.core.sampling.connector import ServiceConnector

    connector = ServiceConnector()
    connector.setup_xray_client("127.0.0.1", port, None)
    try:
        rules = connector.fetch_sampling_rules()
        for rule in rules:  # as if the SDK had seen traffic
            rule.increment_request_count()
        targets, last_modified = connector.fetch_sampling_target(rules)
    finally:
        connector._xray_client.close()
    described = [
        {
            "name": r.name,
            "priority": r._priority,
            "rate": r.rate,
            "can_borrow": r.can_borrow,
            "matches": r.match(
                {"host": "example.com", "method": "GET", "path": "/", "service": "x"}
            ),
        }
        for r in rules
    ]
    return described, targets, last_modified


class SDKTests(TestCase):
    """The SDK's own ServiceConnector (botocore, rest-json) over real HTTP on 127.0.0.1."""

    def setUp(self) -> None:
        self.factory = WrappingFactory(Site(LocalSamplingResource(reactor)))
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self._close)

    @inlineCallbacks
    def _close(self) -> Any:
        yield self.port.stopListening()
        for protocol in list(self.factory.protocols):
            protocol.transport.loseConnection()
        for _ in range(500):  # bounded: at most 5 s
            if not self.factory.protocols:
                break
            yield deferLater(reactor, 0.01, lambda: None)

    @inlineCallbacks
    def test_sdk_accepts_rules_and_targets(self) -> Any:
        before = int(time.time())
        rules, targets, last_modified = yield deferToThread(
            sdk_round_trip, self.port.getHost().port
        )
        self.assertEqual(
            rules,
            [{"name": "Default", "priority": 10000, "rate": 1.0, "can_borrow": True,
              "matches": True}],
        )  # fmt: skip
        self.assertEqual(list(targets), ["Default"])
        target = targets["Default"]
        self.assertEqual((target["rate"], target["quota"], target["interval"]), (1.0, 1, 10))
        self.assertTrue(before + 9 <= target["TTL"] <= int(time.time()) + 10, target)
        # The rules were "modified" when the resource was made, before the
        # SDK fetched them, so the SDK's TargetPoller will not re-fetch them.
        self.assertLessEqual(last_modified, before)
