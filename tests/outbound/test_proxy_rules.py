"""Tests for xraytwisted.outbound.proxy_rules: proxy URLs, NO_PROXY rules and the proxy choice."""

from __future__ import annotations

import base64
import urllib.request

from twisted.trial.unittest import SynchronousTestCase

from xraytwisted.outbound.proxy_rules import (
    NoProxy,
    ProxyConfigError,
    ProxyRules,
    ProxySpec,
    choose_proxy,
    mask_password,
    parse_proxy_url,
)

XRAY = "https://xray.us-east-2.amazonaws.com"


class ParseProxyURLTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases = {
            "http://proxy.corp:3128": ("proxy.corp", 3128, None, None),
            "http://proxy.corp:3128/": ("proxy.corp", 3128, None, None),
            "HTTP://Proxy.Corp:3128": ("proxy.corp", 3128, None, None),
            "http://proxy.corp": ("proxy.corp", 80, None, None),
            "proxy.corp:3128": ("proxy.corp", 3128, None, None),
            "proxy.corp": ("proxy.corp", 80, None, None),
            "10.0.0.1:8080": ("10.0.0.1", 8080, None, None),
            "http://[::1]:8080": ("::1", 8080, None, None),
            "[fd00::5]:3128": ("fd00::5", 3128, None, None),
            "  http://proxy:1  ": ("proxy", 1, None, None),
            "http://user:secret@proxy:3128": ("proxy", 3128, "user", "secret"),
            "http://us%40er:p%40ss%3Aw%2Fd@proxy:3128": ("proxy", 3128, "us@er", "p@ss:w/d"),
            "http://user@proxy:3128": ("proxy", 3128, "user", None),
            "http://user:@proxy:3128": ("proxy", 3128, "user", ""),
        }
        for url, (host, port, user, password) in cases.items():
            spec = parse_proxy_url(url)
            self.assertEqual(
                (spec.scheme, spec.host, spec.port, spec.username, spec.password),
                ("http", host, port, user, password),
                url,
            )

    def test_invalid(self) -> None:
        cases = {
            "": "it is empty",
            "   ": "it is empty",
            "https://proxy:3128": "https:// proxies are not supported, only http:// ones",
            "socks5://proxy:1080": "SOCKS proxies are not supported",
            "socks5h://proxy:1080": "SOCKS proxies are not supported",
            "ftp://proxy:21": "unsupported scheme 'ftp'",
            "http://": "there is no host name",
            "http://:3128": "there is no host name",
            "http://proxy:port": "Port could not be cast to integer",
            "http://proxy:70000": "Port out of range",
            "http://proxy:0": "port 0 is not a port",
            "http://proxy:3128/path": "a proxy URL has no path, query or fragment",
            "http://proxy:3128?x=1": "a proxy URL has no path, query or fragment",
            "http://proxy:3128#frag": "a proxy URL has no path, query or fragment",
            "http://pro xy:3128": "white space",
            "http://proxy\n:3128": "white space or control characters",
            "http://[::g]:3128": "",  # urllib's own message
            "http://pro$xy:3128": "is not a valid host name",
        }
        for url, why in cases.items():
            with self.assertRaises(ProxyConfigError, msg=url) as raised:
                parse_proxy_url(url, "HTTPS_PROXY")
            message = str(raised.exception)
            self.assertTrue(message.startswith("Bad proxy URL: "), message)
            self.assertIn("(from HTTPS_PROXY)", message)
            self.assertIn(why, message)
            self.assertNotIn("\n", message)

    def test_error_never_shows_the_password(self) -> None:
        for url in (
            "https://user:hunter2@proxy:3128",
            "http://user:hunter2@proxy:port",
            "http://user:hun/ter2@proxy:3128/x",
            "user:hunter2@proxy:port",
        ):
            with self.assertRaises(ProxyConfigError) as raised:
                parse_proxy_url(url)
            self.assertNotIn("hunter2", str(raised.exception))
            self.assertIn("user:***@", str(raised.exception))

    def test_authorization_header(self) -> None:
        def decoded(url: str) -> str | None:
            header = parse_proxy_url(url).authorization_header()
            if header is None:
                return None
            scheme, _, value = header.partition(" ")
            self.assertEqual(scheme, "Basic")
            return base64.b64decode(value).decode("utf-8")

        self.assertIsNone(decoded("http://proxy:3128"))
        self.assertEqual(decoded("http://user:secret@proxy:3128"), "user:secret")
        self.assertEqual(decoded("http://us%40er:p%40ss%3A@proxy:3128"), "us@er:p@ss:")
        self.assertEqual(decoded("http://user@proxy:3128"), "user:")
        self.assertEqual(decoded("http://%C3%BCser:p%C3%A4ss@proxy"), "\u00fcser:p\u00e4ss")
        # The exact bytes for a known pair (RFC 7617's example).
        self.assertEqual(
            parse_proxy_url("http://Aladdin:open%20sesame@proxy").authorization_header(),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
        )

    def test_display_masks_password(self) -> None:
        self.assertEqual(
            parse_proxy_url("http://user:secret@[::1]:3128").display(), "http://user:***@[::1]:3128"
        )
        self.assertEqual(parse_proxy_url("proxy").display(), "http://proxy:80")
        self.assertNotIn("secret", repr(parse_proxy_url("http://user:secret@proxy")))

    def test_mask_password(self) -> None:
        cases = {
            "http://proxy:3128": "http://proxy:3128",
            "http://user@proxy:3128": "http://user@proxy:3128",
            "http://user:pw@proxy:3128": "http://user:***@proxy:3128",
            "http://user:p@w@proxy:3128": "http://user:***@proxy:3128",
            "user:pw@proxy:3128": "user:***@proxy:3128",
        }
        for url, masked in cases.items():
            self.assertEqual(mask_password(url), masked)


class NoProxyTests(SynchronousTestCase):
    def test_table(self) -> None:
        # (NO_PROXY, host, port) -> bypass?
        cases: dict[tuple[str, str, int], bool] = {
            # empty and "*"
            ("", "xray.us-east-2.amazonaws.com", 443): False,
            ("*", "xray.us-east-2.amazonaws.com", 443): True,
            ("*", "10.1.2.3", 443): True,
            ("foo.com, *", "bar.org", 443): True,
            # domains: the name itself and everything below it, with or without dot
            ("amazonaws.com", "xray.us-east-2.amazonaws.com", 443): True,
            ("amazonaws.com", "amazonaws.com", 443): True,
            (".amazonaws.com", "amazonaws.com", 443): True,
            (".amazonaws.com", "xray.us-east-2.amazonaws.com", 443): True,
            ("*.amazonaws.com", "xray.us-east-2.amazonaws.com", 443): True,
            ("*.amazonaws.com", "amazonaws.com", 443): True,
            ("amazonaws.com", "notamazonaws.com", 443): False,
            ("amazonaws.com", "amazonaws.com.evil.net", 443): False,
            ("xray.us-east-2.amazonaws.com", "us-east-2.amazonaws.com", 443): False,
            ("xray.us-east-2.amazonaws.com", "xray.us-east-2.amazonaws.com", 443): True,
            # case, trailing dots, separators
            ("AmazonAWS.COM", "XRAY.us-east-2.amazonaws.com", 443): True,
            ("amazonaws.com.", "xray.us-east-2.amazonaws.com.", 443): True,
            ("a.org  amazonaws.com", "xray.amazonaws.com", 443): True,
            ("a.org,,\tamazonaws.com,", "xray.amazonaws.com", 443): True,
            # ports
            ("amazonaws.com:443", "xray.amazonaws.com", 443): True,
            ("amazonaws.com:443", "xray.amazonaws.com", 8443): False,
            ("10.1.2.3:8080", "10.1.2.3", 8080): True,
            ("10.1.2.3:8080", "10.1.2.3", 80): False,
            ("[::1]:443", "::1", 443): True,
            ("[::1]:443", "::1", 80): False,
            # addresses, never resolved
            ("10.1.2.3", "10.1.2.3", 443): True,
            ("10.1.2.3", "10.1.2.4", 443): False,
            ("10.0.0.0/8", "10.200.3.4", 443): True,
            ("10.0.0.0/8", "11.0.0.1", 443): False,
            ("10.1.2.3/8", "10.9.9.9", 443): True,  # host bits ignored, as Go and curl
            ("::1", "::1", 443): True,
            ("[::1]", "::1", 443): True,
            ("fd00::/8", "fd12:3456::1", 443): True,
            ("fd00::/8", "fe80::1", 443): False,
            ("fe80::1", "fe80::1%eth0", 443): True,
            ("10.1.2.3", "host-10.1.2.3.example", 443): False,
            ("example.com", "10.1.2.3", 443): False,
            ("10.0.0.0/8", "ten.example.com", 443): False,
            # loopback is not bypassed unless listed (Go would bypass; see docstring)
            ("", "localhost", 443): False,
            ("", "127.0.0.1", 443): False,
            ("example.com", "127.0.0.1", 443): False,
            ("localhost", "localhost", 443): True,
            ("localhost", "127.0.0.1", 443): False,
            ("127.0.0.1", "127.0.0.1", 443): True,
            ("127.0.0.0/8", "127.0.0.2", 443): True,
            # nonsense entries are ignored, the rest still count
            ("[::1, example.com", "example.com", 443): True,
            ("host:port", "host", 443): False,
        }
        for (text, host, port), expected in cases.items():
            self.assertEqual(
                NoProxy.parse(text).bypasses(host, port),
                expected,
                f"NO_PROXY={text!r} host={host!r} port={port}",
            )

    def test_ignored_entries_are_reported(self) -> None:
        parsed = NoProxy.parse("[::1, host:port, ok.example, x:1:2:3:zz, 10.0.0.0/33, a/b")
        self.assertEqual(parsed.ignored, ("[::1", "host:port", "x:1:2:3:zz", "10.0.0.0/33", "a/b"))
        self.assertEqual(len(parsed.entries), 1)

    def test_agrees_with_urllib_for_plain_domains(self) -> None:
        # Python's urllib (what botocore uses) as an independent oracle for
        # the domain rules both implement.
        entries = ["example.com", ".example.com", "Example.COM", "xray.example.com", "other.org"]
        hosts = ["example.com", "a.example.com", "xample.com", "a.other.org", "org", "EXAMPLE.com"]
        for entry in entries:
            for host in hosts:
                expected = bool(
                    urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
                        host, {"no": entry}
                    )
                )
                self.assertEqual(NoProxy.parse(entry).bypasses(host, 443), expected, (entry, host))


class ChooseProxyTests(SynchronousTestCase):
    def choose(self, url: str, configured: str = "", **env: str) -> str | None:
        spec = choose_proxy(url, configured=configured, env=env)
        return None if spec is None else f"{spec.host}:{spec.port}"

    def test_no_proxy_anywhere(self) -> None:
        self.assertIsNone(self.choose(XRAY))
        self.assertIsNone(self.choose(XRAY, HTTPS_PROXY=""))
        self.assertIsNone(self.choose(XRAY, HTTPS_PROXY="   "))
        self.assertIsNone(self.choose("http://localhost:4566"))

    def test_configured_is_used_for_everything(self) -> None:
        self.assertEqual(self.choose(XRAY, "http://p:1"), "p:1")
        self.assertEqual(self.choose("http://localhost:4566", "http://p:1"), "p:1")

    def test_configured_wins_over_environment(self) -> None:
        self.assertEqual(self.choose(XRAY, "http://p:1", HTTPS_PROXY="http://e:2"), "p:1")
        self.assertEqual(
            self.choose("http://h", "http://p:1", HTTP_PROXY="http://e:2"),
            "p:1",
        )

    def test_configured_obeys_no_proxy(self) -> None:
        self.assertIsNone(self.choose(XRAY, "http://p:1", NO_PROXY=".amazonaws.com"))
        self.assertIsNone(self.choose(XRAY, "http://p:1", no_proxy="*"))
        self.assertEqual(self.choose(XRAY, "http://p:1", NO_PROXY="example.com"), "p:1")

    def test_https_targets_use_https_proxy(self) -> None:
        self.assertEqual(self.choose(XRAY, HTTPS_PROXY="http://e:2"), "e:2")
        self.assertEqual(self.choose(XRAY, https_proxy="http://l:3"), "l:3")
        # upper case wins, as in Go's ProxyFromEnvironment
        self.assertEqual(
            self.choose(XRAY, HTTPS_PROXY="http://e:2", https_proxy="http://l:3"), "e:2"
        )
        self.assertEqual(self.choose(XRAY, HTTPS_PROXY="", https_proxy="http://l:3"), "l:3")
        # HTTP_PROXY is for http targets only
        self.assertIsNone(self.choose(XRAY, HTTP_PROXY="http://h:4"))

    def test_http_targets_use_http_proxy(self) -> None:
        url = "http://localhost:4566/TraceSegments"
        self.assertEqual(self.choose(url, HTTP_PROXY="http://h:4"), "h:4")
        self.assertEqual(self.choose(url, http_proxy="http://h:5"), "h:5")
        self.assertIsNone(self.choose(url, HTTPS_PROXY="http://e:2"))

    def test_no_proxy_from_either_name(self) -> None:
        env = {"HTTPS_PROXY": "http://e:2"}
        self.assertIsNone(self.choose(XRAY, **env, NO_PROXY="amazonaws.com"))
        self.assertIsNone(self.choose(XRAY, **env, no_proxy="amazonaws.com"))
        # upper case wins when both are set
        self.assertEqual(
            self.choose(XRAY, **env, NO_PROXY="x.org", no_proxy="amazonaws.com"), "e:2"
        )

    def test_no_proxy_uses_the_scheme_default_port(self) -> None:
        env = {"HTTPS_PROXY": "http://e:2", "HTTP_PROXY": "http://e:2"}
        self.assertIsNone(self.choose(XRAY, **env, NO_PROXY="amazonaws.com:443"))
        self.assertEqual(self.choose(XRAY + ":8443", **env, NO_PROXY="amazonaws.com:443"), "e:2")
        self.assertIsNone(self.choose("http://h.example", **env, NO_PROXY="h.example:80"))

    def test_loopback_goes_through_the_proxy_unless_listed(self) -> None:
        url = "https://127.0.0.1:2443"
        self.assertEqual(self.choose(url, HTTPS_PROXY="http://e:2"), "e:2")
        self.assertIsNone(self.choose(url, HTTPS_PROXY="http://e:2", NO_PROXY="127.0.0.1"))
        self.assertIsNone(self.choose("https://[::1]:2443", HTTPS_PROXY="e:2", NO_PROXY="::1"))

    def test_bad_proxy_urls(self) -> None:
        with self.assertRaises(ProxyConfigError) as raised:
            self.choose(XRAY, "https://p:1")
        self.assertIn("(from ProxyAddress)", str(raised.exception))
        with self.assertRaises(ProxyConfigError) as raised:
            self.choose(XRAY, HTTPS_PROXY="socks5://p:1")
        self.assertIn("(from HTTPS_PROXY)", str(raised.exception))
        # a bad -p is an error even for a host NO_PROXY lists
        self.assertRaises(ProxyConfigError, self.choose, XRAY, "https://p:1", NO_PROXY="*")

    def test_bad_http_proxy_only_matters_for_http_targets(self) -> None:
        rules = ProxyRules.from_settings("", {"HTTP_PROXY": "socks5://p:1"})
        self.assertIsNone(rules.proxy_for(XRAY))
        with self.assertRaises(ProxyConfigError) as raised:
            rules.proxy_for("http://localhost:4566")
        self.assertIn("(from HTTP_PROXY)", str(raised.exception))
        # ... unless NO_PROXY says that host is reached directly anyway
        rules = ProxyRules.from_settings("", {"HTTP_PROXY": "socks5://p:1", "NO_PROXY": "*"})
        self.assertIsNone(rules.proxy_for("http://localhost:4566"))

    def test_proxy_spec_carries_its_source(self) -> None:
        spec = choose_proxy(XRAY, configured="", env={"https_proxy": "http://u:p@e:2"})
        self.assertEqual(spec, ProxySpec("http", "e", 2, "u", "p"))
        assert spec is not None
        self.assertEqual(spec.source, "https_proxy")

    def test_target_urls_that_are_not_http(self) -> None:
        rules = ProxyRules.from_settings("http://p:1", {})
        for url in ("ftp://example.com/", "example.com", "https://[::g]/", "https://h:x/"):
            self.assertRaises(ProxyConfigError, rules.proxy_for, url)
