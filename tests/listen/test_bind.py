"""Tests for xraytwisted.listen.bind: Go-style address parsing and binding real sockets."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from typing import Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from xraytwisted.listen.bind import bind_tcp, bind_udp, receive_buffer_size, set_receive_buffer
from xraytwisted.settings.addresses import Address, AddressError, parse_address


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class ParseAddressTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases = {
            "127.0.0.1:2000": Address("127.0.0.1", 2000),
            "0.0.0.0:2000": Address("0.0.0.0", 2000),
            ":2000": Address("", 2000),
            "[::1]:2000": Address("::1", 2000),
            "[::]:2000": Address("::", 2000),
            "[fe80::1%eth0]:2000": Address("fe80::1%eth0", 2000),
            "localhost:2000": Address("localhost", 2000),
            "xray-daemon.default.svc:2000": Address("xray-daemon.default.svc", 2000),
            "127.0.0.1:0": Address("127.0.0.1", 0),
            "127.0.0.1:65535": Address("127.0.0.1", 65535),
            "127.0.0.1:+2000": Address("127.0.0.1", 2000),  # Go accepts a sign
            "127.0.0.1:02000": Address("127.0.0.1", 2000),  # decimal, not octal
        }
        for text, expected in cases.items():
            self.assertEqual(parse_address(text), expected, text)

    def test_go_errors(self) -> None:
        cases = {
            "nonsense": "address nonsense: missing port in address",
            "99999": "address 99999: missing port in address",
            "127.0.0.1:99999": "address 99999: invalid port",
            "127.0.0.1:65536": "address 65536: invalid port",
            "127.0.0.1:-1": "address -1: invalid port",
            "127.0.0.1:99999999999999999999": "address 99999999999999999999: invalid port",
            "::1:2000": "address ::1:2000: too many colons in address",
            "::1": "address ::1: too many colons in address",
            "[::1]": "address [::1]: missing port in address",
            "[::1": "address [::1: missing ']' in address",
            "[abc": "address [abc: missing port in address",
            "[::1]2000": "address [::1]2000: missing port in address",
            "[::1]x:2000": "address [::1]x:2000: missing port in address",
            "[::1]:2000:3": "address [::1]:2000:3: too many colons in address",
            "a[b:1": "address a[b:1: unexpected '[' in address",
            "a]b:1": "address a]b:1: unexpected ']' in address",
            "[a]]:1": "address [a]]:1: missing port in address",
            "[a]:1]": "address [a]:1]: unexpected ']' in address",
            "[a]:[1": "address [a]:[1: unexpected '[' in address",
            "127.0.0.1:no-such-service": "lookup udp/no-such-service: unknown port",
            "127.0.0.1:\u0662\u0660": "lookup udp/\u0662\u0660: unknown port",  # not ASCII digits
        }
        for text, message in cases.items():
            with self.assertRaises(AddressError) as caught:
                parse_address(text)
            self.assertEqual(str(caught.exception), message, text)

    def test_empty_address_or_port_is_an_error(self) -> None:
        # Go would listen on a random port; "host:$PORT" with PORT unset is
        # far more likely than wanting that.
        cases = {
            "": "address is empty: use host:port, e.g. 127.0.0.1:2000",
            "127.0.0.1:": "address 127.0.0.1:: missing port number after ':'",
            ":": "address :: missing port number after ':'",
            "[::1]:": "address [::1]:: missing port number after ':'",
        }
        for text, message in cases.items():
            with self.assertRaises(AddressError) as caught:
                parse_address(text)
            self.assertEqual(str(caught.exception), message, text)

    def test_service_names(self) -> None:
        try:
            expected = socket.getservbyname("domain", "udp")
            https = socket.getservbyname("https", "tcp")
        except OSError:
            raise self.skipTest("no services database") from None
        self.assertEqual(parse_address("127.0.0.1:domain"), Address("127.0.0.1", expected))
        self.assertEqual(parse_address("127.0.0.1:DOMAIN"), Address("127.0.0.1", expected))
        self.assertEqual(parse_address(":https", "tcp"), Address("", https))
        with self.assertRaises(AddressError) as caught:
            parse_address(":nope", "tcp")
        self.assertEqual(str(caught.exception), "lookup tcp/nope: unknown port")

    def test_address_text(self) -> None:
        self.assertEqual(str(Address("127.0.0.1", 2000)), "127.0.0.1:2000")
        self.assertEqual(str(Address("::1", 2000)), "[::1]:2000")
        self.assertEqual(str(Address("", 2000)), ":2000")
        self.assertEqual(str(Address("localhost", 1)), "localhost:1")
        for text in ("127.0.0.1:2000", "[::1]:2000", ":2000", "localhost:1"):
            self.assertEqual(str(parse_address(text)), text)

    def test_error_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(AddressError, ValueError))


class BindTestCase(SynchronousTestCase):
    def keep(self, sock: socket.socket) -> socket.socket:
        self.addCleanup(sock.close)
        return sock

    def taken(self, family: int, kind: int, host: str) -> int:
        """A port on ``host`` held by another socket for the rest of the test."""
        holder = self.keep(socket.socket(family, kind))
        holder.bind((host, 0))
        if kind == socket.SOCK_STREAM:
            holder.listen(1)
        return int(holder.getsockname()[1])

    def assertBindError(self, address: Address, message: str, tcp: bool = False) -> None:
        before = open_fds()
        with self.assertRaises(AddressError) as caught:
            self.keep(bind_tcp(address) if tcp else bind_udp(address))
        self.assertEqual(str(caught.exception), message)
        self.assertEqual(open_fds(), before, "the failed socket was not closed")

    def require_ipv6(self) -> None:
        if not ipv6_loopback_available():
            raise self.skipTest("IPv6 is not available")

    def wildcards_on_loopback(self) -> list[tuple[Any, Any]]:
        """From now on, sockets asked to bind every interface bind loopback instead.

        Tests listen on loopback only.  The code under test still asks for
        the wildcard, and what it asked for is recorded as (family, sockaddr),
        after the IPV6_V6ONLY values it set, as ("IPV6_V6ONLY", value):
        "::" binds "::1" (so dual-stack itself cannot be shown, and Linux
        turns IPV6_V6ONLY on for it; the tests check what was asked),
        "0.0.0.0" binds "127.0.0.1".
        """
        asked: list[tuple[Any, Any]] = []
        real = socket.socket

        class LoopbackSocket(real):  # type: ignore[valid-type,misc]
            def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:
                if (level, option) == (socket.IPPROTO_IPV6, socket.IPV6_V6ONLY):
                    asked.append(("IPV6_V6ONLY", value))
                super().setsockopt(level, option, value, *rest)

            def bind(self, address: Any) -> None:
                asked.append((self.family, address))
                if self.family == socket.AF_INET6 and address[0] == "::":
                    address = ("::1", *address[1:])
                elif self.family == socket.AF_INET and address[0] in ("", "0.0.0.0"):
                    address = ("127.0.0.1", *address[1:])
                super().bind(address)

        self.patch(socket, "socket", LoopbackSocket)
        return asked

    def loopback_of(self, sock: socket.socket) -> str:
        return "::1" if sock.family == socket.AF_INET6 else "127.0.0.1"


class BindUDPTests(BindTestCase):
    def test_ipv4_loopback(self) -> None:
        sock = self.keep(bind_udp(Address("127.0.0.1", 0)))
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(sock.type, socket.SOCK_DGRAM)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")
        self.assertNotEqual(sock.getsockname()[1], 0)
        self.assertFalse(sock.getblocking())
        sender = self.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sender.sendto(b"hello", sock.getsockname())
        sock.setblocking(True)
        sock.settimeout(5)
        self.assertEqual(sock.recv(100), b"hello")

    def test_ipv6_loopback(self) -> None:
        self.require_ipv6()
        sock = self.keep(bind_udp(parse_address("[::1]:0")))
        self.assertEqual(sock.family, socket.AF_INET6)
        self.assertEqual(sock.getsockname()[0], "::1")

    def test_every_interface_is_dual_stack(self) -> None:
        asked = self.wildcards_on_loopback()
        sock = self.keep(bind_udp(parse_address(":0")))
        if sock.family == socket.AF_INET6:
            self.assertEqual(asked, [("IPV6_V6ONLY", 0), (socket.AF_INET6, ("::", 0, 0, 0))])
        else:  # no IPv6 here: the IPv4 wildcard
            self.assertEqual(asked[-1], (socket.AF_INET, ("0.0.0.0", 0)))
        sender = self.keep(socket.socket(sock.family, socket.SOCK_DGRAM))
        sender.sendto(b"hello", (self.loopback_of(sock), sock.getsockname()[1]))
        sock.settimeout(5)
        self.assertEqual(sock.recv(100), b"hello")

    def refuse_sockets(self, family: int, error: int) -> None:
        """Make creating sockets of ``family`` fail with ``error``."""
        real = socket.socket

        def socket_factory(family_: int = socket.AF_INET, *args: Any) -> socket.socket:
            if family_ == family:
                raise OSError(error, os.strerror(error))
            return real(family_, *args)

        self.patch(socket, "socket", socket_factory)

    def test_every_interface_without_ipv6(self) -> None:
        asked = self.wildcards_on_loopback()
        self.refuse_sockets(socket.AF_INET6, errno.EAFNOSUPPORT)
        sock = self.keep(bind_udp(parse_address(":0")))
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(asked, [(socket.AF_INET, ("0.0.0.0", 0))])

    def test_socket_creation_failure(self) -> None:
        self.refuse_sockets(socket.AF_INET, errno.EMFILE)
        with self.assertRaises(AddressError) as caught:
            bind_udp(Address("127.0.0.1", 2000))
        self.assertEqual(
            str(caught.exception), "listen udp 127.0.0.1:2000: socket: too many open files"
        )
        with self.assertRaises(AddressError) as caught:
            bind_tcp(Address("127.0.0.1", 2000))
        self.assertEqual(
            str(caught.exception), "listen tcp 127.0.0.1:2000: socket: too many open files"
        )

    def test_resolver_with_no_answer(self) -> None:
        self.fake_resolver()
        with self.assertRaises(AddressError) as caught:
            bind_udp(Address("empty.example", 2000))
        self.assertEqual(str(caught.exception), "lookup empty.example: no such host")

    def test_host_name_prefers_ipv4(self) -> None:
        try:
            socket.getaddrinfo("localhost", 0, socket.AF_INET)
        except OSError:
            raise self.skipTest("localhost does not resolve to IPv4 here") from None
        sock = self.keep(bind_udp(parse_address("localhost:0")))
        self.assertEqual(sock.family, socket.AF_INET)
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")

    def fake_resolver(self, *addresses: str) -> list[str]:
        """Make getaddrinfo answer ``addresses`` (in that order) for any name."""
        asked: list[str] = []

        def getaddrinfo(host: str, port: int, *args: object) -> list[tuple[Any, ...]]:
            asked.append(host)
            return [
                (socket.AF_INET6, socket.SOCK_DGRAM, 17, "", (a, port, 0, 0))
                if ":" in a
                else (socket.AF_INET, socket.SOCK_DGRAM, 17, "", (a, port))
                for a in addresses
            ]

        self.patch(socket, "getaddrinfo", getaddrinfo)
        return asked

    def test_host_name_takes_the_first_ipv4_address(self) -> None:
        asked = self.fake_resolver("::1", "127.0.0.1", "127.0.0.2")
        sock = self.keep(bind_udp(Address("dual.example", 0)))
        self.assertEqual(asked, ["dual.example"])
        self.assertEqual(sock.getsockname()[0], "127.0.0.1")

    def test_host_name_with_only_ipv6(self) -> None:
        self.require_ipv6()
        self.fake_resolver("::1")
        sock = self.keep(bind_udp(Address("v6only.example", 0)))
        self.assertEqual(sock.family, socket.AF_INET6)

    def test_ipv4_literal_is_not_resolved(self) -> None:
        asked = self.fake_resolver("127.0.0.2")
        sock = self.keep(bind_udp(Address("127.0.0.1", 0)))
        self.assertEqual((asked, sock.getsockname()[0]), ([], "127.0.0.1"))

    def test_address_in_use(self) -> None:
        port = self.taken(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
        self.assertBindError(
            Address("127.0.0.1", port), f"listen udp 127.0.0.1:{port}: bind: address already in use"
        )

    def test_address_in_use_through_a_host_name(self) -> None:
        port = self.taken(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
        # Go names the resolved IP in the message.
        self.assertBindError(
            Address("localhost", port), f"listen udp 127.0.0.1:{port}: bind: address already in use"
        )

    def test_ipv6_address_in_use(self) -> None:
        self.require_ipv6()
        port = self.taken(socket.AF_INET6, socket.SOCK_DGRAM, "::1")
        self.assertBindError(
            Address("::1", port), f"listen udp [::1]:{port}: bind: address already in use"
        )

    def test_every_interface_in_use(self) -> None:
        self.wildcards_on_loopback()
        port = self.taken(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1")
        # Where "::" binds: the same port on ::1 (if IPv6 is there and the
        # port is free there; otherwise it is in use already).
        with contextlib.suppress(OSError):
            self.keep(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)).bind(("::1", port))
        self.assertBindError(Address("", port), f"listen udp :{port}: bind: address already in use")

    def test_address_not_on_this_host(self) -> None:
        # 192.0.2.0/24 is TEST-NET-1: never a local address.
        self.assertBindError(
            Address("192.0.2.1", 2000),
            "listen udp 192.0.2.1:2000: bind: cannot assign requested address",
        )

    def test_unknown_host(self) -> None:
        with self.assertRaises(AddressError) as caught:
            bind_udp(Address("no-such-host.invalid", 2000))
        self.assertTrue(
            str(caught.exception).startswith("lookup no-such-host.invalid: "), caught.exception
        )
        for host in ("a..b", "x" * 300):
            with self.assertRaises(AddressError) as caught:
                bind_udp(Address(host, 2000))
            self.assertEqual(str(caught.exception), f"lookup {host}: no such host")

    def test_receive_buffer(self) -> None:
        small = self.keep(bind_udp(Address("127.0.0.1", 0), receive_buffer=4096))
        large = self.keep(bind_udp(Address("127.0.0.1", 0), receive_buffer=1024 * 1024))
        self.assertLess(receive_buffer_size(small), receive_buffer_size(large))
        self.assertLess(receive_buffer_size(small), 64 * 1024)

    def test_root_may_exceed_rmem_max(self) -> None:
        if os.geteuid() != 0 or not os.path.exists("/proc/sys/net/core/rmem_max"):
            raise SkipTest("needs root on Linux (SO_RCVBUFFORCE)")
        with open("/proc/sys/net/core/rmem_max") as f:
            rmem_max = int(f.read())
        sock = self.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        # Linux reports twice what it grants.
        self.assertGreaterEqual(set_receive_buffer(sock, rmem_max * 2), rmem_max * 4)

    def test_set_receive_buffer_returns_what_was_granted(self) -> None:
        sock = self.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        granted = set_receive_buffer(sock, 8192)
        self.assertEqual(granted, receive_buffer_size(sock))
        self.assertEqual(granted, sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def test_set_receive_buffer_survives_absurd_sizes(self) -> None:
        sock = self.keep(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        # setsockopt itself raises (not OSError) past a C int.
        self.assertRaises(
            (OverflowError, TypeError), sock.setsockopt, socket.SOL_SOCKET, socket.SO_RCVBUF, 2**40
        )
        self.assertGreater(set_receive_buffer(sock, 2**40), 0)
        self.assertGreater(set_receive_buffer(sock, -5), 0)


class BindTCPTests(BindTestCase):
    def test_listens(self) -> None:
        listener = self.keep(bind_tcp(Address("127.0.0.1", 0)))
        self.assertEqual(listener.family, socket.AF_INET)
        self.assertEqual(listener.type, socket.SOCK_STREAM)
        self.assertFalse(listener.getblocking())
        client = self.keep(socket.create_connection(listener.getsockname(), timeout=5))
        listener.settimeout(5)
        accepted, _ = listener.accept()
        self.addCleanup(accepted.close)
        client.sendall(b"GET")
        accepted.settimeout(5)
        self.assertEqual(accepted.recv(3), b"GET")

    def test_ipv6_loopback(self) -> None:
        self.require_ipv6()
        listener = self.keep(bind_tcp(parse_address("[::1]:0", "tcp")))
        self.assertEqual(listener.family, socket.AF_INET6)
        self.keep(socket.create_connection(listener.getsockname()[:2], timeout=5))

    def test_every_interface(self) -> None:
        asked = self.wildcards_on_loopback()
        listener = self.keep(bind_tcp(parse_address(":0", "tcp")))
        wildcard = "::" if listener.family == socket.AF_INET6 else "0.0.0.0"
        self.assertEqual(asked[-1][1][0], wildcard)
        port = listener.getsockname()[1]
        self.keep(socket.create_connection((self.loopback_of(listener), port), timeout=5))

    def test_address_in_use(self) -> None:
        port = self.taken(socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1")
        self.assertBindError(
            Address("127.0.0.1", port),
            f"listen tcp 127.0.0.1:{port}: bind: address already in use",
            tcp=True,
        )

    def test_ipv6_address_in_use(self) -> None:
        self.require_ipv6()
        port = self.taken(socket.AF_INET6, socket.SOCK_STREAM, "::1")
        self.assertBindError(
            Address("::1", port), f"listen tcp [::1]:{port}: bind: address already in use", tcp=True
        )

    def test_udp_and_tcp_share_a_port(self) -> None:
        # The Go daemon's default: UDP and TCP both on 127.0.0.1:2000.
        udp = self.keep(bind_udp(Address("127.0.0.1", 0)))
        port = udp.getsockname()[1]
        try:
            tcp = self.keep(bind_tcp(Address("127.0.0.1", port)))
        except AddressError as e:
            if "address already in use" in str(e):
                raise self.skipTest("the TCP port happens to be taken") from None
            raise
        self.assertEqual(tcp.getsockname()[1], port)

    def test_rebinding_a_closed_listener(self) -> None:
        # SO_REUSEADDR: a restart does not wait for TIME_WAIT to pass.
        listener = bind_tcp(Address("127.0.0.1", 0))
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        listener.settimeout(5)
        accepted, _ = listener.accept()
        accepted.close()  # server side closes first: TIME_WAIT on the server
        client.close()
        listener.close()
        self.keep(bind_tcp(Address("127.0.0.1", port)))

    def test_errno_sanity(self) -> None:
        self.assertEqual(os.strerror(errno.EADDRINUSE).lower(), "address already in use")


class DescribeReceiveBufferTests(SynchronousTestCase):
    """The "Listening on UDP" line says what the kernel granted, and why it reads double."""

    def test_lines(self) -> None:
        from xraytwisted.listen.bind import describe_receive_buffer

        kib, mib = 1024, 1024 * 1024
        self.assertEqual(
            describe_receive_buffer(16 * mib, 32 * mib, linux=True),
            "receive buffer 16384 KiB as asked; the kernel reports 32768 KiB: Linux doubles it "
            "for its bookkeeping",
        )
        self.assertEqual(
            describe_receive_buffer(16 * mib, 416 * kib, linux=True),
            "receive buffer 208 KiB, less than the 16384 KiB asked: the kernel caps it "
            "(net.core.rmem_max on Linux); raise that limit or run as root to get more, or "
            "lower --udp-receive-buffer; the kernel reports 416 KiB: Linux doubles it for its "
            "bookkeeping",
        )
        self.assertEqual(
            describe_receive_buffer(0, 208 * kib, linux=True),
            "receive buffer 208 KiB, the OS default",
        )
        self.assertEqual(
            describe_receive_buffer(4 * mib, 4 * mib, linux=False),
            "receive buffer 4096 KiB as asked",
        )

    def test_a_real_socket_reads_as_asked(self) -> None:
        from xraytwisted.listen.bind import describe_receive_buffer

        sock = bind_udp(Address("127.0.0.1", 0), receive_buffer=64 * 1024)
        self.addCleanup(sock.close)
        line = describe_receive_buffer(64 * 1024, receive_buffer_size(sock))
        self.assertTrue(line.startswith("receive buffer 64 KiB as asked"), line)
