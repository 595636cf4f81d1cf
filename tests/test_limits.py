"""server.* limits and the TLS options, over real sockets on 127.0.0.1.

Each limit is a config key with a default; each test sets it small so it
bites within a second or two, and shows what a client sees (status, reason,
a closed connection) and that nothing was issued.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from estgw.config import ConfigError, from_string
from estgw.testing import TEST_CONFIG, RunningGateway, run_process
from tests.test_auth import AuditLog
from tests.test_refusals import basic_csr, register


@implementer(IHandshakeListener)
class RawClient(protocol.Protocol):
    """A TLS client that sends exactly the bytes it is told, when told."""

    def __init__(self) -> None:
        self.received = b""
        self.handshake = defer.Deferred()
        self.closed = defer.Deferred()
        self.closed_at: float | None = None
        self.handshake_done = False

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.handshake.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any) -> None:
        self.closed_at = time.monotonic()
        if not self.handshake.called:
            self.handshake.errback(reason)
        self.closed.callback(None)


async def connect(gateway: RunningGateway, source: str = "127.0.0.1") -> RawClient:
    with open(gateway.ca_file, "rb") as f:
        anchor = Certificate.loadPEM(f.read())
    endpoint = wrapClientTLS(
        optionsForClientTLS("localhost", trustRoot=anchor),
        TCP4ClientEndpoint(reactor, "127.0.0.1", gateway.port, timeout=5, bindAddress=(source, 0)),
    )
    client = RawClient()
    await connectProtocol(endpoint, client)
    return client


async def closed_within(client: RawClient, seconds: float) -> None:
    """Wait for the server to close, at most ``seconds``."""
    d = client.closed
    timeout = reactor.callLater(seconds, lambda: d.called or d.cancel())
    try:
        await d
    except defer.CancelledError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None
    finally:
        if timeout.active():
            timeout.cancel()


def request_head(path: str = "/.well-known/est/cacerts", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode("ascii")


class SlowClientTests(TestCase):
    """server.headerTimeout, server.bodyTimeout, server.idleTimeout."""

    async def test_trickled_head_is_cut_off(self) -> None:
        """A head sent one byte every 0.2 s (each byte well within the idle
        timeout) is cut off after server.headerTimeout with 408 and a
        reason, and logged as a refusal."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "server.headerTimeout = 1\nserver.idleTimeout = 30\n"
        )
        client = await connect(gateway)
        await client.handshake
        started = time.monotonic()
        sent = iter(request_head())

        def one_byte() -> None:
            byte = next(sent, None)
            if byte is not None and not client.closed.called:
                client.transport.write(bytes([byte]))

        loop = task.LoopingCall(one_byte)
        loop.start(0.2)
        try:
            await closed_within(client, 5)
        finally:
            loop.stop()
        elapsed = client.closed_at - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received)
        self.assertIn(b"not received within 1 seconds", client.received)
        self.assertIn("header-timeout", audit.refused)

    async def test_metrics_listener_has_the_same_deadline(self) -> None:
        """The plain-HTTP metrics listener cuts off a trickled head too."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "metrics.port = 0\nserver.headerTimeout = 1\n"
        )
        client = RawClient()
        client.handshake.addErrback(lambda failure: None)  # plain TCP: there is no handshake
        port = gateway.service.metrics_ports[0].getHost().port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
        await connectProtocol(endpoint, client)
        sent = iter(request_head("/metrics"))
        loop = task.LoopingCall(lambda: client.closed.called or client.transport.write(bytes([next(sent)])))
        loop.start(0.2)
        try:
            await closed_within(client, 5)
        finally:
            loop.stop()
        self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received)

    async def test_complete_head_in_time_is_served(self) -> None:
        """A head that arrives whole within the deadline is answered, and
        the deadline starts again for the next request on the connection."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.headerTimeout = 1\n")
        client = await connect(gateway)
        await client.handshake
        for _ in range(2):
            client.received = b""
            client.transport.write(request_head())
            for _ in range(50):
                if b"\r\n\r\n" in client.received:
                    break
                await task.deferLater(reactor, 0.05, lambda: None)
            self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received)
            await task.deferLater(reactor, 0.7, lambda: None)  # idle between requests is not head time
        client.transport.loseConnection()
        await client.closed

    async def test_trickled_body_is_cut_off(self) -> None:
        """A body announced with Content-Length and sent a byte at a time is
        cut off after server.bodyTimeout with 408; nothing is issued."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.bodyTimeout = 1\n")
        await register(gateway)
        client = await connect(gateway)
        await client.handshake
        body = basic_csr()
        client.transport.write(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Basic cHVtcC0xNzpzM2NyZXQ=\r\nContent-Type: application/pkcs10\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        started = time.monotonic()
        sent = iter(body)
        loop = task.LoopingCall(lambda: client.closed.called or client.transport.write(bytes([next(sent)])))
        loop.start(0.2)
        try:
            await closed_within(client, 5)
        finally:
            loop.stop()
        self.assertLess(client.closed_at - started, 3)
        self.assertTrue(client.received.startswith(b"HTTP/1.1 408 "), client.received)
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_idle_connection_is_closed(self) -> None:
        """A connection that sends nothing after the handshake is closed
        after server.idleTimeout."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.idleTimeout = 1\n")
        client = await connect(gateway)
        await client.handshake
        started = time.monotonic()
        await closed_within(client, 5)
        self.assertGreaterEqual(client.closed_at - started, 0.9)


class HeaderLimitTests(TestCase):
    """server.maxHeaders and server.maxHeaderBytes, with curl."""

    async def test_too_many_headers(self) -> None:
        """More header fields than server.maxHeaders: 431 with a reason, no certificate."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxHeaders = 8\n")
        await register(gateway)
        result = await gateway.curl(
            "simpleenroll", data=basic_csr(), user="pump-17:s3cret",
            headers=[f"X-Filler-{i}: x" for i in range(10)],
        )
        self.assertEqual(result.status, 431, result.text)
        self.assertIn("more than 8 header fields", result.text)
        self.assertIn("too-many-headers", audit.refused)
        self.assertEqual(await gateway.store.count_certificates(), 0)
        ok = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(ok.status, 200, ok.text)

    async def test_head_too_large(self) -> None:
        """A head larger than server.maxHeaderBytes: 431 with a reason; one
        line longer than that: 400 with a reason; no certificate."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxHeaderBytes = 1024\n")
        await register(gateway)
        result = await gateway.curl(
            "simpleenroll", data=basic_csr(), user="pump-17:s3cret",
            headers=[f"X-Big-{i}: " + "a" * 300 for i in range(4)],
        )
        self.assertEqual(result.status, 431, result.text)
        self.assertIn("exceeds 1024 bytes", result.text)
        line = await gateway.curl(
            "simpleenroll", data=basic_csr(), user="pump-17:s3cret", headers=["X-Big: " + "a" * 2000],
        )
        self.assertEqual(line.status, 400, line.text)
        self.assertIn("longer than 1024 bytes", line.text)
        self.assertEqual(await gateway.store.count_certificates(), 0)


class ConnectionLimitTests(TestCase):
    """server.maxConnections and server.maxConnectionsPerClient."""

    async def refused(self, gateway: RunningGateway, source: str = "127.0.0.1") -> None:
        client = await connect(gateway, source)
        with self.assertRaises(Exception):
            await client.handshake
        await closed_within(client, 5)
        self.assertFalse(client.handshake_done)

    async def accepted(self, gateway: RunningGateway, source: str = "127.0.0.1") -> RawClient:
        client = await connect(gateway, source)
        await client.handshake
        return client

    async def close(self, *clients: RawClient) -> None:
        for client in clients:
            client.transport.loseConnection()
            await client.closed

    async def test_total(self) -> None:
        """With server.maxConnections = 2 a third connection is closed
        before its handshake; once one closes, a new one is served."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxConnections = 2\n")
        first, second = await self.accepted(gateway), await self.accepted(gateway, "127.0.0.2")
        await self.refused(gateway, "127.0.0.3")
        await self.close(first)
        await task.deferLater(reactor, 0.1, lambda: None)
        third = await self.accepted(gateway)
        await self.close(second, third)

    async def test_per_client(self) -> None:
        """With server.maxConnectionsPerClient = 1 a second connection from
        127.0.0.1 is refused while one from 127.0.0.2 is served."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxConnectionsPerClient = 1\n")
        first = await self.accepted(gateway)
        await self.refused(gateway)
        other = await self.accepted(gateway, "127.0.0.2")
        await self.close(first, other)
        await task.deferLater(reactor, 0.1, lambda: None)
        again = await self.accepted(gateway)
        await self.close(again)


class TLSOptionTests(TestCase):
    """Renegotiation refused and compression off, seen by openssl s_client."""

    async def test_renegotiation_refused_and_no_compression(self) -> None:
        """A client-initiated TLS 1.2 renegotiation ("R" in s_client) is
        refused, and the session reports no compression."""
        gateway = await RunningGateway.start(self)
        result = await run_process(
            [
                # "R" asks s_client to renegotiate; stdin stays open for the answer.
                "timeout", "20", "sh", "-c",
                f"(printf 'R\\n'; sleep 2) | openssl s_client -connect 127.0.0.1:{gateway.port}"
                f" -tls1_2 -CAfile {gateway.ca_file}",
            ],
        )
        output = (result.stdout + result.stderr).decode("utf-8", "replace")
        self.assertIn("Compression: NONE", output)
        self.assertIn("RENEGOTIATING", output)
        self.assertRegex(output, r"(?i)no.renegotiation|renegotiation.*(fail|disabled)")
        self.assertNotEqual(result.code, 124, "s_client hung: " + output)


class LimitConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Every limit has a safe default (README, Hardening)."""
        config = from_string(TEST_CONFIG)
        self.assertEqual(
            (config.header_timeout, config.body_timeout, config.idle_timeout, config.max_headers,
             config.max_header_bytes, config.max_connections, config.max_connections_per_client,
             config.ca_max_queued, config.ca_timeout),
            (10.0, 30.0, 60.0, 100, 16384, 1024, 64, 32, 30.0),
        )

    def test_bad_values_name_the_key(self) -> None:
        """A bad value stops start-up with the key."""
        for key, value in [
            ("server.headerTimeout", "0"), ("server.bodyTimeout", "soon"), ("server.idleTimeout", "-1"),
            ("server.maxHeaders", "0"), ("server.maxHeaderBytes", "lots"), ("server.maxConnections", "-3"),
            ("server.maxConnectionsPerClient", "x"), ("ca.maxQueued", "0"), ("ca.timeout", "0"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                from_string(TEST_CONFIG + f"{key} = {value}\n")
            self.assertEqual(caught.exception.key, key)

    def test_zero_connections_means_no_cap(self) -> None:
        """server.maxConnections = 0 turns the cap off (documented)."""
        self.assertEqual(from_string(TEST_CONFIG + "server.maxConnections = 0\n").max_connections, 0)
