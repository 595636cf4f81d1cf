"""server.proxyProtocol: behind a TCP load balancer, the PROXY protocol
header before TLS names the client; without the setting nothing changes."""

from __future__ import annotations

import os
import socket
import ssl

from twisted.internet import threads

from tests.test_twistd import TwistdTestCase
from tests.test_workers import _until


def _get_cacerts(port: int, root: str, header: bytes | None) -> bytes:
    """One TLS request for cacerts, the PROXY header first when given."""
    context = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        if header is not None:
            raw.sendall(header)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while True:
                data = tls.recv(65536)
                if not data:
                    return answer
                answer += data


class ProxyProtocolTests(TwistdTestCase):
    def root(self) -> str:
        return os.path.join(self.directory, "state", "ca", "root-ca.pem")

    async def start_with(self, *lines: str) -> int:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write("\n" + "\n".join(lines) + "\n")
        self.daemon = self.spawn("--port", "0")
        return await self.daemon.ready()

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
