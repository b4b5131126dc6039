"""Tests for xraytwisted.aws.endpoints: regional URLs, partitions, FIPS/dual-stack,
overrides from config and environment, and custom endpoint parsing."""

from __future__ import annotations

from typing import Any

from botocore.endpoint_provider import EndpointProvider
from botocore.exceptions import EndpointResolutionError
from botocore.loaders import create_loader
from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.aws.endpoints import (
    PARTITIONS,
    Endpoint,
    EndpointError,
    default_url,
    parse,
    partition,
    resolve,
)

REGIONS = (
    "us-east-1",
    "eu-west-3",
    "ap-southeast-7",
    "il-central-1",
    "mx-central-1",
    "cn-north-1",
    "cn-northwest-1",
    "us-gov-west-1",
    "us-gov-east-1",
    "us-iso-east-1",
    "us-isob-east-1",
    "us-isof-south-1",
    "eu-isoe-west-1",
    "eusc-de-east-1",
    "xx-future-1",  # unknown: partition "aws"
)


def botocore_provider() -> EndpointProvider:
    loader = create_loader()
    return EndpointProvider(
        loader.load_service_model("xray", "endpoint-rule-set-1"), loader.load_data("partitions")
    )


class DefaultUrlTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases = {
            ("us-east-2", False, False): "https://xray.us-east-2.amazonaws.com",
            ("us-east-2", True, False): "https://xray-fips.us-east-2.amazonaws.com",
            ("us-east-2", False, True): "https://xray.us-east-2.api.aws",
            ("us-east-2", True, True): "https://xray-fips.us-east-2.api.aws",
            ("cn-north-1", False, False): "https://xray.cn-north-1.amazonaws.com.cn",
            ("cn-north-1", False, True): "https://xray.cn-north-1.api.amazonwebservices.com.cn",
            ("us-gov-west-1", False, False): "https://xray.us-gov-west-1.amazonaws.com",
            ("us-gov-west-1", True, False): "https://xray-fips.us-gov-west-1.amazonaws.com",
            ("us-gov-east-1", False, True): "https://xray.us-gov-east-1.api.aws",
            ("us-iso-east-1", False, False): "https://xray.us-iso-east-1.c2s.ic.gov",
            ("us-isob-east-1", False, False): "https://xray.us-isob-east-1.sc2s.sgov.gov",
            ("us-isof-south-1", False, False): "https://xray.us-isof-south-1.csp.hci.ic.gov",
            ("eu-isoe-west-1", False, False): "https://xray.eu-isoe-west-1.cloud.adc-e.uk",
            ("eusc-de-east-1", False, False): "https://xray.eusc-de-east-1.amazonaws.eu",
            ("xx-future-1", False, False): "https://xray.xx-future-1.amazonaws.com",
        }
        for (region, fips, dualstack), url in cases.items():
            self.assertEqual(default_url(region, fips=fips, dualstack=dualstack), url)

    def test_partitions(self) -> None:
        cases = {
            "us-east-1": "aws",
            "cn-north-1": "aws-cn",
            "us-gov-west-1": "aws-us-gov",
            "us-iso-east-1": "aws-iso",
            "us-isob-east-1": "aws-iso-b",
            "us-isof-south-1": "aws-iso-f",
            "eu-isoe-west-1": "aws-iso-e",
            "eusc-de-east-1": "aws-eusc",
            "nowhere": "aws",
        }
        for region, name in cases.items():
            self.assertEqual(partition(region).name, name, region)

    def test_agrees_with_botocore_rules(self) -> None:
        provider = botocore_provider()
        loader = create_loader()
        known = [r for p in loader.load_data("partitions")["partitions"] for r in p["regions"]]
        regions = [r for r in (*REGIONS, *known) if not r.endswith("-global")]
        self.assertGreater(len(regions), 40)
        for region in regions:
            for fips in (False, True):
                for dualstack in (False, True):
                    expected = provider.resolve_endpoint(
                        Region=region, UseFIPS=fips, UseDualStack=dualstack
                    ).url
                    self.assertEqual(
                        default_url(region, fips=fips, dualstack=dualstack),
                        expected,
                        (region, fips, dualstack),
                    )

    def test_partition_table_matches_botocore(self) -> None:
        data = create_loader().load_data("partitions")["partitions"]
        theirs = {
            p["id"]: (
                p["regionRegex"],
                p["outputs"]["dnsSuffix"],
                p["outputs"]["dualStackDnsSuffix"],
            )
            for p in data
        }
        ours = {p.name: (p.region_regex, p.dns_suffix, p.dualstack_dns_suffix) for p in PARTITIONS}
        self.assertEqual(ours, theirs)

    def test_bad_regions(self) -> None:
        with self.assertRaises(EndpointError) as caught:
            default_url("")
        self.assertEqual(str(caught.exception), "No region: cannot choose an X-Ray endpoint")
        for region in ("us east 1", "us-east-1/evil", "-us-east-1", "us-east-1.", "x" * 64, "ü"):
            with self.assertRaises(EndpointError) as caught:
                default_url(region)
            self.assertIn(f"Invalid region {region!r}", str(caught.exception))


class ResolveTests(SynchronousTestCase):
    def url(self, region: str = "us-west-2", configured: str = "", **env: str) -> str:
        return resolve(region, configured=configured, env=env).url

    def test_default(self) -> None:
        self.assertEqual(self.url(), "https://xray.us-west-2.amazonaws.com")
        self.assertEqual(resolve("us-west-2").url, "https://xray.us-west-2.amazonaws.com")
        self.assertEqual(resolve("us-west-2", env=None).host, "xray.us-west-2.amazonaws.com")

    def test_precedence(self) -> None:
        env = {"AWS_ENDPOINT_URL_XRAY": "http://xray-only:1", "AWS_ENDPOINT_URL": "http://all:2"}
        self.assertEqual(self.url(configured="http://configured:3", **env), "http://configured:3")
        self.assertEqual(self.url(**env), "http://xray-only:1")
        self.assertEqual(self.url(AWS_ENDPOINT_URL="http://all:2"), "http://all:2")
        # An empty variable is not set.
        self.assertEqual(
            self.url(AWS_ENDPOINT_URL_XRAY="", AWS_ENDPOINT_URL="http://all:2"), "http://all:2"
        )

    def test_ignore_configured_endpoint_urls(self) -> None:
        env = {
            "AWS_ENDPOINT_URL_XRAY": "http://xray-only:1",
            "AWS_ENDPOINT_URL": "http://all:2",
        }
        for true in ("true", "TRUE", " True "):
            self.assertEqual(
                self.url(AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true, **env),
                "https://xray.us-west-2.amazonaws.com",
            )
            # The daemon's own setting still counts.
            self.assertEqual(
                self.url(
                    configured="http://configured:3", AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true
                ),
                "http://configured:3",
            )
        self.assertEqual(
            self.url(AWS_IGNORE_CONFIGURED_ENDPOINT_URLS="false", **env), "http://xray-only:1"
        )

    def test_fips_and_dualstack_from_environment(self) -> None:
        self.assertEqual(
            self.url(AWS_USE_FIPS_ENDPOINT="true"), "https://xray-fips.us-west-2.amazonaws.com"
        )
        self.assertEqual(
            self.url(AWS_USE_FIPS_ENDPOINT="TRUE", AWS_USE_DUALSTACK_ENDPOINT="True"),
            "https://xray-fips.us-west-2.api.aws",
        )
        self.assertEqual(
            self.url("cn-north-1", AWS_USE_DUALSTACK_ENDPOINT="true"),
            "https://xray.cn-north-1.api.amazonwebservices.com.cn",
        )
        for false in ("false", "", "1", "yes"):
            self.assertEqual(
                self.url(AWS_USE_FIPS_ENDPOINT=false, AWS_USE_DUALSTACK_ENDPOINT=false),
                "https://xray.us-west-2.amazonaws.com",
            )

    def test_custom_endpoint_cannot_be_combined_with_fips_or_dualstack(self) -> None:
        # The X-Ray endpoint rules make this an error; so do we, at startup.
        provider = botocore_provider()
        self.assertRaises(
            EndpointResolutionError,
            provider.resolve_endpoint,
            Region="us-west-2",
            UseFIPS=True,
            UseDualStack=False,
            Endpoint="http://x",
        )
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {"configured": "http://localhost:4566", "AWS_USE_FIPS_ENDPOINT": "true"},
                "AWS_USE_FIPS_ENDPOINT=true cannot be combined with a custom endpoint "
                "(Endpoint = http://localhost:4566); unset one of them",
            ),
            (
                {"AWS_ENDPOINT_URL": "http://x:1", "AWS_USE_DUALSTACK_ENDPOINT": "true"},
                "AWS_USE_DUALSTACK_ENDPOINT=true cannot be combined with a custom endpoint "
                "(AWS_ENDPOINT_URL = http://x:1); unset one of them",
            ),
        ]
        for kwargs, message in cases:
            with self.assertRaises(EndpointError) as caught:
                self.url(**kwargs)
            self.assertEqual(str(caught.exception), message)

    def test_errors(self) -> None:
        self.assertRaises(EndpointError, self.url, "")
        self.assertRaises(EndpointError, self.url, configured="localhost:4566")
        self.assertRaises(EndpointError, self.url, AWS_ENDPOINT_URL_XRAY="not a url")

    def test_no_region_needed_with_a_custom_endpoint(self) -> None:
        self.assertEqual(self.url("", configured="http://localhost:4566"), "http://localhost:4566")


class ParseTests(SynchronousTestCase):
    def test_table(self) -> None:
        # url -> (normalised url, Host header, hostname, port, base path, secure)
        cases = {
            "https://xray.us-east-1.amazonaws.com": (
                "https://xray.us-east-1.amazonaws.com",
                "xray.us-east-1.amazonaws.com",
                "xray.us-east-1.amazonaws.com",
                443,
                "",
                True,
            ),
            "https://xray.us-east-1.amazonaws.com:443/": (
                "https://xray.us-east-1.amazonaws.com",
                "xray.us-east-1.amazonaws.com",
                "xray.us-east-1.amazonaws.com",
                443,
                "",
                True,
            ),
            "http://localhost:4566": (
                "http://localhost:4566",
                "localhost:4566",
                "localhost",
                4566,
                "",
                False,
            ),
            "http://localhost:80/": ("http://localhost", "localhost", "localhost", 80, "", False),
            "https://proxy.example:80": (
                "https://proxy.example:80",
                "proxy.example:80",
                "proxy.example",
                80,
                "",
                True,
            ),
            "http://example.com:443": (
                "http://example.com:443",
                "example.com:443",
                "example.com",
                443,
                "",
                False,
            ),
            "http://127.0.0.1:4566/prefix/": (
                "http://127.0.0.1:4566/prefix",
                "127.0.0.1:4566",
                "127.0.0.1",
                4566,
                "/prefix",
                False,
            ),
            "https://gw.example/a/b/": (
                "https://gw.example/a/b",
                "gw.example",
                "gw.example",
                443,
                "/a/b",
                True,
            ),
            "http://[::1]:4566/x": ("http://[::1]:4566/x", "[::1]:4566", "::1", 4566, "/x", False),
            "https://[2001:db8::1]": (
                "https://[2001:db8::1]",
                "[2001:db8::1]",
                "2001:db8::1",
                443,
                "",
                True,
            ),
            "HTTPS://XRay.Example.COM:8443": (
                "https://xray.example.com:8443",
                "xray.example.com:8443",
                "xray.example.com",
                8443,
                "",
                True,
            ),
            "http://xray_sink:2000": (
                "http://xray_sink:2000",
                "xray_sink:2000",
                "xray_sink",
                2000,
                "",
                False,
            ),
        }
        for url, (normal, host, hostname, port, base_path, secure) in cases.items():
            endpoint = parse(url)
            self.assertEqual(
                endpoint,
                Endpoint(
                    url=normal,
                    scheme="https" if secure else "http",
                    host=host,
                    hostname=hostname,
                    port=port,
                    base_path=base_path,
                    secure=secure,
                ),
                url,
            )

    def test_url_for(self) -> None:
        self.assertEqual(
            parse("http://[::1]:4566/prefix/").url_for("/TraceSegments"),
            "http://[::1]:4566/prefix/TraceSegments",
        )
        self.assertEqual(
            parse("https://xray.us-east-1.amazonaws.com").url_for("/GetSamplingRules"),
            "https://xray.us-east-1.amazonaws.com/GetSamplingRules",
        )

    def test_errors(self) -> None:
        cases = {
            "": "write it as an http:// or https:// URL",
            "xray.us-east-1.amazonaws.com": "write it as an http:// or https:// URL",
            "localhost:4566": "write it as an http:// or https:// URL",
            "ftp://example.com": "write it as an http:// or https:// URL",
            "https://": "write it as an http:// or https:// URL",
            "https://:443": "write it as an http:// or https:// URL",
            "https://example.com:99999": "Port out of range 0-65535",
            "https://example.com:abc": "Port could not be cast to integer value",
            "https://example.com:0": "port 0 is not a port to connect to",
            "https://[::1": "Invalid IPv6 URL",
            "https://[z:z]:80": "IPv6",  # wording varies with the Python version
            "https://exa mple.com": "it contains white space or control characters",
            " https://example.com": "it contains white space or control characters",
            "https://example.com\n": "it contains white space or control characters",
            "https://user:pw@example.com": "user names and passwords are not supported",
            "https://example.com/?a=1": "a query string or fragment is not allowed",
            "https://example.com/#top": "a query string or fragment is not allowed",
            "https://example.com?": "a query string or fragment is not allowed",
            "https://exa%mple.com": "'exa%mple.com' is not a valid host name",
            "https://-bad.example": "'-bad.example' is not a valid host name",
        }
        for url, why in cases.items():
            with self.assertRaises(EndpointError) as caught:
                parse(url)
            message = str(caught.exception)
            self.assertTrue(message.startswith(f"Invalid endpoint {url!r}: "), message)
            self.assertIn(why, message)
            self.assertEqual(message.count("\n"), 0, message)

    def test_error_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(EndpointError, ValueError))
