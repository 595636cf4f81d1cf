"""server.proxyProtocol: behind a TCP load balancer, the PROXY protocol
header before TLS names the client; without the setting nothing changes."""

from __future__ import annotations

import os
import socket
import ssl

from twisted.internet import reactor, task, threads

from tests.test_twistd import TwistdTestCase
from tests.test_workers import _until


def _get_cacerts(port: int, root: str, header: bytes | None, piece: int = 0) -> bytes:
    """One TLS request for cacerts, the PROXY header first when given (in
    TCP segments of ``piece`` bytes, 50 ms apart, when given)."""
    import time

    context = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if header is not None and piece:
            for start in range(0, len(header), piece):
                raw.sendall(header[start:start + piece])
                time.sleep(0.05)
        elif header is not None:
            raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while True:
                data = tls.recv(65536)
                if not data:
                    return answer
                answer += data


class _ProxyCase(TwistdTestCase):
    def root(self) -> str:
        return os.path.join(self.directory, "state", "ca", "root-ca.pem")

    async def third_refused(self, port: int, two: list[bytes], third: bytes, client: str) -> None:
        """With server.maxConnectionsPerClient = 2: connections held behind
        the ``two`` headers and one behind ``third`` are one client's, so
        the third is refused, and the audit names ``client``."""
        held = [socket.create_connection(("127.0.0.1", port)) for _ in two]
        for raw, header in zip(held, two):
            raw.sendall(header)
        await task.deferLater(reactor, 0.5, lambda: None)  # the gateway reads them first
        self.assertTrue(await threads.deferToThread(_closed_within, port, third, 10))
        refusal = f"refused connection from {client}: too-many-connections-per-client".encode()
        await _until(lambda: refusal in self.daemon.output, 10)
        for raw in held:
            raw.close()

    async def start_with(self, *lines: str) -> int:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        self.daemon = self.spawn("--port", "0")
        return await self.daemon.ready()


class ProxyProtocolTests(_ProxyCase):
    async def check_proxied(self, port: int) -> None:
        header = f"PROXY TCP4 203.0.113.7 127.0.0.1 40000 {port}\r\n".encode()
        answer = await threads.deferToThread(_get_cacerts, port, self.root(), header)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        await _until(lambda: b'"203.0.113.7" - - [' in self.daemon.output, 10)
        # A connection without the header is not served.
        with self.assertRaises((ssl.SSLError, OSError)):
            await threads.deferToThread(_get_cacerts, port, self.root(), None)

    async def test_client_address_from_header(self) -> None:
        port = await self.start_with("server.proxyProtocol = true")
        await self.check_proxied(port)

    async def test_with_workers(self) -> None:
        port = await self.start_with("server.proxyProtocol = true", "server.workers = 2")
        await self.check_proxied(port)

    async def test_off_by_default(self) -> None:
        port = await self.start_with()
        answer = await threads.deferToThread(_get_cacerts, port, self.root(), None)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        self.assertIn(b'"127.0.0.1" - - [', self.daemon.output)


def _open_proxied(port: int, root: str, client: str) -> ssl.SSLSocket | None:
    """A TLS connection behind a PROXY header naming ``client``, handshake
    done and kept open; None when the gateway closed it instead."""
    context = ssl.create_default_context(cafile=root)
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    raw.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 {port}\r\n".encode())
    try:
        return context.wrap_socket(raw, server_hostname="localhost")
    except (ssl.SSLError, OSError):
        raw.close()
        return None


class ProxiedConnectionCapTests(_ProxyCase):
    """Behind a balancer every TCP connection comes from its address: the
    per-client cap counts the client the PROXY header names, the total cap
    the connections; a refused connection is closed, never left open."""

    async def test_per_client_cap_counts_the_named_client(self) -> None:
        port = await self.start_with("server.proxyProtocol = true", "server.maxConnectionsPerClient = 2")
        held = []
        for client in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.2"):
            conn = await threads.deferToThread(_open_proxied, port, self.root(), client)
            self.assertIsNotNone(conn, client)  # two each at most: all served
            held.append(conn)
        third = await threads.deferToThread(_open_proxied, port, self.root(), "198.51.100.1")
        self.assertIsNone(third)
        await _until(lambda: b"refused connection from 198.51.100.1: too-many-connections-per-client"
                     in self.daemon.output, 10)
        self.assertNotIn(b"refused connection from 127.0.0.1", self.daemon.output)
        # Its slot comes back when one of its connections ends.
        held[0].close()
        await _until(lambda: self._served(port, "198.51.100.1"), 10)
        for conn in held[1:]:
            conn.close()
        self.assertNotIn(b"Unhandled Error", self.daemon.output)

    def _served(self, port: int, client: str) -> bool:
        conn = _open_proxied(port, self.root(), client)
        if conn is None:
            return False
        conn.close()
        return True

    async def test_total_cap_closes_at_once(self) -> None:
        port = await self.start_with("server.proxyProtocol = true", "server.maxConnections = 2",
                                     "server.maxConnectionsPerClient = 0")
        held = [await threads.deferToThread(_open_proxied, port, self.root(), f"198.51.100.{i}") for i in (1, 2)]
        self.assertTrue(all(held))

        def refused_quickly() -> bool:
            raw = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                raw.sendall(f"PROXY TCP4 198.51.100.3 127.0.0.1 40000 {port}\r\n".encode())
                return raw.recv(1) == b""  # closed, not left hanging (the timeout would raise)
            except ConnectionResetError:
                return True
            finally:
                raw.close()

        self.assertTrue(await threads.deferToThread(refused_quickly))
        await _until(lambda: b"too-many-connections" in self.daemon.output, 10)
        for conn in held:
            conn.close()
        # Served once the gateway has seen the two close (not at once).
        await _until(lambda: self._served(port, "198.51.100.3"), 10)
        self.assertNotIn(b"Unhandled Error", self.daemon.output)


def _v2_header(source: str, port: int) -> bytes:
    """A PROXY v2 header (TCP over IPv6) naming ``source``."""
    import ipaddress
    import struct

    body = (ipaddress.IPv6Address(source).packed + ipaddress.IPv6Address("::1").packed
            + struct.pack("!HH", 40000, port))
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x21]) + struct.pack("!H", len(body)) + body


def _closed_within(port: int, header: bytes, seconds: float) -> bool:
    """Send ``header`` alone and nothing more; True when the gateway closes
    the connection within ``seconds``."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=seconds)
    try:
        raw.sendall(header)
        return raw.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        raw.close()


class ProxiedClientCountTests(_ProxyCase):
    async def test_header_alone_is_counted(self) -> None:
        """A balancer sends the header as the client connects, often alone:
        the named client is counted then, so silent connections cannot
        hold more than its share."""
        port = await self.start_with("server.proxyProtocol = true", "server.maxConnectionsPerClient = 2")
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for raw in held:
            raw.sendall(f"PROXY TCP4 198.51.100.7 127.0.0.1 40000 {port}\r\n".encode())
        await task.deferLater(reactor, 0.5, lambda: None)  # the gateway reads them first
        header = f"PROXY TCP4 198.51.100.7 127.0.0.1 40001 {port}\r\n".encode()
        self.assertTrue(await threads.deferToThread(_closed_within, port, header, 10))
        await _until(lambda: b"refused connection from 198.51.100.7: too-many-connections-per-client"
                     in self.daemon.output, 10)
        # Another client is served meanwhile.
        self.assertIsNotNone(await threads.deferToThread(_open_proxied, port, self.root(), "198.51.100.8"))
        for raw in held:
            raw.close()

    async def test_one_ipv6_client_however_spelled(self) -> None:
        """v1 and v2 headers, compressed or not, upper or lower case: one
        client, one count, one name in the audit."""
        port = await self.start_with("server.proxyProtocol = true", "server.maxConnectionsPerClient = 2")
        await self.third_refused(port, [f"PROXY TCP6 2001:DB8:0::5 ::1 40000 {port}\r\n".encode(),
                                        _v2_header("2001:db8::5", port)],
                                 f"PROXY TCP6 2001:db8::5 ::1 40002 {port}\r\n".encode(), "2001:db8::5")

    async def test_missing_header_is_audited(self) -> None:
        port = await self.start_with("server.proxyProtocol = true")
        self.assertTrue(await threads.deferToThread(
            _closed_within, port, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n", 10))
        await _until(lambda: b"refused connection from 127.0.0.1: bad-proxy-header" in self.daemon.output, 10)


class ProxyHeaderFormsTests(_ProxyCase):
    """Every form of header the PROXY protocol spec allows is read, however
    the TCP segments cut it; a header cut short is audited."""

    async def served(self, header: bytes, piece: int = 0) -> None:
        answer = await threads.deferToThread(_get_cacerts, self.port, self.root(), header, piece)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), (header, piece, answer[:200]))

    async def test_headers_in_pieces_unknown_and_local(self) -> None:
        self.port = port = await self.start_with("server.proxyProtocol = true")
        # In pieces shorter than the bytes that tell v1 from v2.
        await self.served(f"PROXY TCP4 203.0.113.9 127.0.0.1 40000 {port}\r\n".encode(), piece=3)
        await _until(lambda: b'"203.0.113.9" - - [' in self.daemon.output, 10)
        await self.served(_v2_header("2001:db8::9", port), piece=5)
        await _until(lambda: b'"2001:db8::9" - - [' in self.daemon.output, 10)
        # A balancer's own connections (health checks): v1 UNKNOWN with or
        # without addresses, v2 LOCAL; named by the TCP peer.
        served_before = self.daemon.output.count(b'"127.0.0.1" - - [')
        await self.served(b"PROXY UNKNOWN\r\n")
        await self.served(b"PROXY UNKNOWN\r\n", piece=4)
        await self.served(b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n")
        await self.served(b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x20, 0x00, 0x00, 0x00]))
        await _until(lambda: self.daemon.output.count(b'"127.0.0.1" - - [') == served_before + 4, 10)
        self.assertNotIn(b"bad-proxy-header", self.daemon.output)

    async def test_header_cut_short_is_audited(self) -> None:
        port = await self.start_with("server.proxyProtocol = true")
        refusal = b"refused connection from 127.0.0.1: bad-proxy-header"
        for cut in (b"PROXY TCP4 198.51.", b"\r\n\r\n\x00\r\nQU", b"PRO"):
            before = self.daemon.output.count(refusal)
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.sendall(cut)
            await task.deferLater(reactor, 0.3, lambda: None)  # the gateway holds it
            raw.close()
            await _until(lambda: self.daemon.output.count(refusal) == before + 1, 10)
        # A v1 line longer than the spec's 107 bytes, and an UNKNOWN line
        # that never ends, are refused at once.
        for endless in (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", b"PROXY UNKNOWN " + b"x" * 120):
            before = self.daemon.output.count(refusal)
            self.assertTrue(await threads.deferToThread(_closed_within, port, endless, 10))
            await _until(lambda: self.daemon.output.count(refusal) == before + 1, 10)


def _v2(command: int, family: int, body: bytes) -> bytes:
    import struct

    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([command, family]) + struct.pack("!H", len(body)) + body


class ProxyHeaderRefusalTests(_ProxyCase):
    """A header the spec does not allow is refused with one audit line and
    its reason, never a traceback; whatever a header names, the client is
    an IP address in one spelling."""

    def refusals(self) -> int:
        return self.daemon.output.count(b"refused connection from 127.0.0.1: bad-proxy-header")

    async def test_malformed_v1_lines(self) -> None:
        port = await self.start_with("server.proxyProtocol = true")
        bad = [
            b"PROXY TCP4 192.0.2.7 10.0.0.1 abc 8443\r\n",  # a port that is no number
            b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n",  # two spaces
            b"PROXY TCP4 \xff\xfe 10.0.0.1 1 2\r\n",  # not ASCII
            b"PROXY TCP4 evil.example 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.01 10.0.0.1 1 2\r\n",  # a leading zero
            b"PROXY TCP4 3221225985 10.0.0.1 1 2\r\n",  # an integer
            b"PROXY TCP4 2001:db8::9 10.0.0.1 1 2\r\n",  # the other family
            b"PROXY TCP6 192.0.2.10 ::1 1 2\r\n",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",  # a zone
            b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 0080 2\r\n",
            b"PROXY TCP4 a\x1b[31mb 10.0.0.1 1 2\r\n",  # an escape sequence as a client
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",  # a seventh field
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2" + b" " * 100 + b"\r\n",  # past 107 bytes
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2" + b" " * 74,  # 107 bytes, no CRLF yet
        ]
        for header in bad:
            before = self.refusals()
            self.assertTrue(await threads.deferToThread(_closed_within, port, header, 10), header)
            await _until(lambda: self.refusals() == before + 1, 10)
        self.assertNotIn(b"Unhandled Error", self.daemon.output)
        self.assertNotIn(b"Traceback", self.daemon.output)
        self.assertNotIn(b"\x1b", self.daemon.output)
        self.assertIn(b"bad-proxy-header: the PROXY v1 header names no TCP4 address", self.daemon.output)
        self.assertIn(b"bad-proxy-header: the PROXY v1 header names no port (0 to 65535, in decimal)",
                      self.daemon.output)
        # The gateway serves on.
        answer = await threads.deferToThread(
            _get_cacerts, port, self.root(), f"PROXY TCP4 192.0.2.7 127.0.0.1 1 {port}\r\n".encode())
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])

    async def test_leaving_mid_header_once_and_timeouts_not_twice(self) -> None:
        port = await self.start_with("server.proxyProtocol = true", "server.idleTimeout = 1")
        # Parts of v2 headers that Twisted's reader holds, then the client leaves.
        for cut in (_v2(0x21, 0x11, b"")[:-2] + b"\x00\x0c\x01\x02", _v2(0x21, 0x11, b"")[:-2] + b"\xff\xff",
                    _v2(0x20, 0x00, b"\x01\x00\x05ab")[:-1]):
            before = self.refusals()
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            raw.sendall(cut)
            await task.deferLater(reactor, 0.2, lambda: None)
            raw.close()
            await _until(lambda: self.refusals() == before + 1, 10)
        self.assertIn(b"the client left in the middle of its PROXY protocol header", self.daemon.output)
        # A header that stops coming is closed by server.idleTimeout: one
        # line, idle-timeout, and no second one.
        before = self.refusals()
        for cut in (b"PROX", _v2(0x21, 0x11, b"")[:-2] + b"\x00\x0c\x01"):
            idle_before = self.daemon.output.count(b"idle-timeout")
            self.assertTrue(await threads.deferToThread(_closed_within, port, cut, 10))
            await _until(lambda: self.daemon.output.count(b"idle-timeout") == idle_before + 1, 10)
        await task.deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(self.refusals(), before)
        self.assertIn(b"idle-timeout: no request was received within 1 seconds", self.daemon.output)

    async def test_one_client_however_named(self) -> None:
        """A UNIX socket in a v2 header is the balancer's connection (as
        LOCAL); an IPv4-mapped IPv6 address is its IPv4 client."""
        import ipaddress
        import struct

        port = await self.start_with("server.proxyProtocol = true", "server.maxConnectionsPerClient = 2")
        unix = b"/tmp/a".ljust(108, b"\x00") + b"/tmp/b".ljust(108, b"\x00")
        await self.check_named(port, _v2(0x21, 0x31, unix), b'"127.0.0.1" - - [')
        mapped = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
        v2_mapped = _v2(0x21, 0x21, mapped + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 40001, port))
        await self.third_refused(port, [f"PROXY TCP6 ::ffff:192.0.2.1 ::1 40000 {port}\r\n".encode(), v2_mapped],
                                 f"PROXY TCP4 192.0.2.1 127.0.0.1 40002 {port}\r\n".encode(), "192.0.2.1")

    async def check_named(self, port: int, header: bytes, access: bytes) -> None:
        answer = await threads.deferToThread(_get_cacerts, port, self.root(), header)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:200])
        await _until(lambda: access in self.daemon.output, 10)

    async def test_malformed_v2_and_v1_starts_with_their_reasons(self) -> None:
        port = await self.start_with("server.proxyProtocol = true")
        cases = [
            (_v2(0x21, 0x10, b"\x00" * 12), b"address family and protocol the spec does not define (0x10)"),
            (_v2(0x11, 0x11, b"\x00" * 12), b"no version 2 LOCAL or PROXY command"),
            (_v2(0x22, 0x11, b"\x00" * 12), b"no version 2 LOCAL or PROXY command"),
            (_v2(0x21, 0x11, b"\x00" * 4), b"bad-proxy-header: the PROXY protocol header is not valid"),
            (b"PROXYXTCP4 1.2.3.4 5.6.7.8 1 2", b"does not start with PROXY and a space"),
            (b"PROXY\r\n", b"does not start with PROXY and a space"),
            (b"GET / HTTP/1.0\r\n\r\n", b"bad-proxy-header: no PROXY protocol header"),
        ]
        for header, reason in cases:
            before = self.refusals()
            # Refused at once: well before the idle timeout (60 s).
            self.assertTrue(await threads.deferToThread(_closed_within, port, header, 5), header)
            await _until(lambda: self.refusals() == before + 1, 10)
            [*_, last] = (line for line in self.daemon.output.splitlines() if b"bad-proxy-header" in line)
            self.assertIn(reason, last, header)
        self.assertNotIn(b"Traceback", self.daemon.output)

    async def test_long_v2_header_in_small_pieces(self) -> None:
        """A v2 header with 60,000 bytes of TLVs (PP2_TYPE_NOOP), sent in
        7-byte segments, is read whole and names its client."""
        import ipaddress
        import struct

        port = await self.start_with("server.proxyProtocol = true")
        noop = b"\x04" + struct.pack("!H", 60000 - 3) + b"\x00" * (60000 - 3)
        addresses = (ipaddress.IPv4Address("203.0.113.77").packed + ipaddress.IPv4Address("127.0.0.1").packed
                     + struct.pack("!HH", 40000, port))
        header = _v2(0x21, 0x11, addresses + noop)

        def send() -> bytes:
            raw = socket.create_connection(("127.0.0.1", port), timeout=20)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(header), 7):
                raw.sendall(header[start:start + 7])
            context = ssl.create_default_context(cafile=self.root())
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                return tls.recv(100)

        answer = await threads.deferToThread(send)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)
        await _until(lambda: b'"203.0.113.77" - - [' in self.daemon.output, 10)
