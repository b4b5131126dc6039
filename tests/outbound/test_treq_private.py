"""What xraytwisted.outbound.treq_private.FixedURL relies on in treq and hyperlink: still true.

Each failure names what changed.  FixedURL exists to skip treq's per-request
``url.to_uri().to_text()``; if treq stops converting that way, the saving is
gone (requests stay correct), and these tests say so.
"""

from __future__ import annotations

from typing import Any

import treq.client
from hyperlink import EncodedURL
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from xraytwisted.outbound.treq_private import FixedURL

ADAPTER = "xraytwisted.outbound.treq_private.FixedURL"
URLS = [
    "https://xray.us-west-2.amazonaws.com/TraceSegments",
    "https://xray-fips.us-gov-west-1.amazonaws.com/GetSamplingRules",
    "http://127.0.0.1:2000/TelemetryRecords",
    "https://xray.example.com:8443/base/path/SamplingTargets",
    "https://proxy.example.com/x%20y?a=1",
]
IPV6 = "http://[::1]:2000/TraceSegments"


@implementer(IAgent)
class RecordingAgent:
    def __init__(self) -> None:
        self.uris: list[bytes] = []

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        self.uris.append(uri)
        return Deferred()  # never answers: only the request line matters here


def sent_uri(url: Any) -> bytes:
    """The URI treq's HTTPClient hands its agent for ``url``."""
    agent = RecordingAgent()
    client = treq.client.HTTPClient(agent)
    client.request("POST", url, data=b"{}", allow_redirects=False, reactor=Clock())
    [uri] = agent.uris
    return uri


class FixedURLTests(SynchronousTestCase):
    def test_hyperlink_builds_the_subclass_and_it_is_its_own_uri(self) -> None:
        for text in URLS:
            url = FixedURL.of(text)
            self.assertIsInstance(
                url,
                FixedURL,
                f"hyperlink's URL.from_text no longer builds the class it is called on; "
                f"adapt {ADAPTER}",
            )
            self.assertIs(url.to_uri(), url)
            self.assertEqual(url.to_text(), text)
            self.assertEqual(text, EncodedURL.from_text(text).to_uri().to_text())

    def test_treq_sends_exactly_what_it_sends_for_the_text(self) -> None:
        for text in URLS:
            self.assertEqual(sent_uri(FixedURL.of(text)), sent_uri(text), text)

    def test_ipv6_literals_are_sent_as_given(self) -> None:
        # treq's own conversion IDNA-encodes "::1" and raises.
        self.assertEqual(sent_uri(FixedURL.of(IPV6)), IPV6.encode())

    def test_only_ascii(self) -> None:
        with self.assertRaises(UnicodeEncodeError):
            FixedURL.of("https://xray.bücher.example/TraceSegments")

    def test_treq_converts_it_through_to_uri_and_to_text(self) -> None:
        calls: list[str] = []
        url = FixedURL.of(URLS[0])
        real_to_uri, real_to_text = url.to_uri, url.to_text

        def to_uri() -> Any:
            calls.append("to_uri")
            return real_to_uri()

        def to_text(with_password: bool = False) -> str:
            calls.append("to_text")
            return real_to_text(with_password)

        self.patch(url, "to_uri", to_uri)
        self.patch(url, "to_text", to_text)
        self.assertEqual(sent_uri(url), URLS[0].encode())
        self.assertEqual(
            calls,
            ["to_uri", "to_text"],
            "treq.client.HTTPClient.request no longer converts a URL with "
            f"url.to_uri().to_text(); {ADAPTER} no longer saves that work per request: "
            "measure again, then adapt or drop it",
        )

    def test_urls_derived_from_it_convert_the_normal_way(self) -> None:
        base = FixedURL.of("https://xray.us-west-2.amazonaws.com/a")
        self.assertEqual(
            base.child("b c").to_uri().to_text(), "https://xray.us-west-2.amazonaws.com/a/b%20c"
        )
        with_query = base.replace(query=(("x", "1 2"),))
        self.assertEqual(sent_uri(with_query), b"https://xray.us-west-2.amazonaws.com/a?x=1%202")
        self.assertEqual(
            sent_uri(base.replace(host="bücher.example")), b"https://xn--bcher-kva.example/a"
        )
