"""server.* limits and the TLS options, over real sockets on 127.0.0.1.

Each limit is a config key with a default; each test sets it small so it
bites within a second or two, and shows what a client sees (status, reason,
a closed connection) and that nothing was issued.
"""

from __future__ import annotations

import os
import re
import time
from http import HTTPStatus
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.error import ConnectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from estgw import limits
from estgw.audit import record
from estgw.config import ConfigError, from_string
from estgw.testing import TEST_CONFIG, RunningGateway, run_process
from tests.test_auth import AuditLog, run_cli
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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Where RFC 9110 renamed a phrase of RFC 7231 (Python 3.11's http.HTTPStatus).
RFC9110_RENAMED = {413: b"Content Too Large", 414: b"URI Too Long", 416: b"Range Not Satisfiable",
                   422: b"Unprocessable Content"}


def audit_record(audit: AuditLog, code: str) -> dict[str, Any]:
    """The audit file's JSON object for the one refusal with ``code``."""
    [event] = [e for e in audit.events if e.get("code") == code]
    line = record(event)
    assert line is not None
    return line


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
        self.assertTrue(client.received.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.received)
        self.assertIn(b"not received within 1 seconds", client.received)
        self.assertEqual(audit.refused, ["header-timeout"])  # one line, not also idle-timeout
        line = audit_record(audit, "header-timeout")
        self.assertEqual(
            (line["status"], line["reason"], line["client"]),
            (408, "the request head was not received within 1 seconds", "127.0.0.1"),
        )
        # The human line says it in the same words as the reason and the body.
        self.assertEqual(line["message"], "refused connection from 127.0.0.1: 408 header-timeout: " + line["reason"])

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
        after server.idleTimeout, with one audit line (idle-timeout, the
        reason, no HTTP status: nothing was answered) and counted."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.idleTimeout = 1\n")
        client = await connect(gateway)
        await client.handshake
        started = time.monotonic()
        await closed_within(client, 5)
        self.assertGreaterEqual(client.closed_at - started, 0.9)
        self.assertEqual(client.received, b"")
        self.assertEqual(audit.refused, ["idle-timeout"])
        line = audit_record(audit, "idle-timeout")
        self.assertEqual((line["reason"], line["client"]), ("no request was received within 1 seconds", "127.0.0.1"))
        self.assertNotIn("status", line)
        self.assertIn('estgw_refusals_total{code="idle-timeout"} 1.0', gateway.service.gateway.metrics.render().decode())

    async def test_idle_after_answered_requests_is_no_refusal(self) -> None:
        """On every listener (EST over TLS, metrics, publishing): a
        kept-alive client that had two requests answered and then just
        leaves its connection at rest is closed after server.idleTimeout
        without a refusal (no audit line, no estgw_refusals_total), with
        one debug line."""
        audit = AuditLog(self)
        debug: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace", "").startswith("estgw.limits") and "count" in event:
                debug.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "metrics.port = 0\npublish.port = 0\nserver.idleTimeout = 1\n"
        )
        listeners = [
            ("est", gateway.port, "/.well-known/est/cacerts", b"HTTP/1.1 200 OK\r\n"),
            ("metrics", gateway.service.metrics_ports[0].getHost().port, "/health/live", b"HTTP/1.1 200 OK\r\n"),
            ("publish", gateway.service.publish_ports[0].getHost().port, "/", b"HTTP/1.1 404 Not Found\r\n"),
        ]
        for name, port, path, status in listeners:
            client = await (connect(gateway) if name == "est" else plain_connect(port))
            if name == "est":
                await client.handshake
            for _ in range(2):
                client.received = b""
                client.transport.write(request_head(path))
                await until_received(client, b"\r\n\r\n")
                self.assertTrue(client.received.startswith(status), (name, client.received))
            started = time.monotonic()
            await closed_within(client, 5)
            self.assertGreaterEqual(client.closed_at - started, 0.9, name)
        self.assertEqual(audit.refused, [])
        self.assertNotIn("idle-timeout", gateway.service.gateway.metrics.render().decode())
        self.assertEqual([(e["count"], e["client"]) for e in debug], [(2, "127.0.0.1")] * 3)
        self.assertTrue(all(e["log_level"].name == "debug" for e in debug))

    async def test_idle_with_a_request_half_sent_is_a_refusal(self) -> None:
        """After an answered request, a next request left half-sent past
        server.idleTimeout (below server.headerTimeout here) is a refusal:
        audited idle-timeout with the reason, counted."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "server.idleTimeout = 1\nserver.headerTimeout = 10\n"
        )
        client = await connect(gateway)
        await client.handshake
        client.transport.write(request_head())
        await until_received(client, b"\r\n\r\n")
        client.transport.write(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: loc")
        await closed_within(client, 5)
        self.assertEqual(audit.refused, ["idle-timeout"])
        self.assertEqual(audit_record(audit, "idle-timeout")["reason"],
                         "the connection was idle for 1 seconds with a request half-sent")
        self.assertIn('estgw_refusals_total{code="idle-timeout"} 1.0', gateway.service.gateway.metrics.render().decode())


async def plain_connect(port: int) -> RawClient:
    """A plain TCP client of a 127.0.0.1 listener (metrics, publishing)."""
    client = RawClient()
    client.handshake.addErrback(lambda failure: None)  # plain TCP: there is no handshake
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
    return client


async def until_received(client: RawClient, marker: bytes, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if marker in client.received or client.closed.called:
            return
        await task.deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{marker!r} not received within {seconds} s: {client.received!r}")


class HeaderLimitTests(TestCase):
    """server.maxHeaders and server.maxHeaderBytes, with curl."""

    async def test_too_many_headers(self) -> None:
        """More header fields than server.maxHeaders: 431 with a reason, no certificate."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxHeaders = 16\n")
        await register(gateway)
        result = await gateway.curl(
            "simpleenroll", data=basic_csr(), user="pump-17:s3cret",
            headers=[f"X-Filler-{i}: x" for i in range(20)],
        )
        self.assertEqual(result.status, 431, result.text)
        self.assertIn("more than 16 header fields", result.text)
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


class LowestLimitTests(TestCase):
    async def test_a_normal_enrollment_fits_the_lowest_limits(self) -> None:
        """With server.maxHeaderBytes, server.maxHeaders and
        server.maxRequestBytes at their lower bounds, curl's enrollments
        with HTTP Basic and with HTTP Digest (its own header fields, the
        Authorization, Content-Type) of a P-256 CSR are served."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "server.maxHeaderBytes = 1024\nserver.maxHeaders = 16\n"
            "server.maxRequestBytes = 1024\nhandler.20.operation = simpleenroll\nhandler.20.label = digest\n"
            "handler.20.authtype = Digest\nhandler.20.realm = digest realm\n",
        )
        await run_cli(gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(result.status, 200, result.text)
        result = await gateway.curl("digest/simpleenroll", data=basic_csr(), user="pump-17:s3cret", digest=True)
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual((await gateway.curl("cacerts")).status, 200)


class ConnectionLimitTests(TestCase):
    """server.maxConnections and server.maxConnectionsPerClient."""

    async def refused(self, gateway: RunningGateway, source: str = "127.0.0.1") -> None:
        client = await connect(gateway, source)
        with self.assertRaises(Exception):
            await client.handshake
        await closed_within(client, 5)
        self.assertFalse(client.handshake_done)

    def assert_audited(self, audit: AuditLog, code: str, reason: str, client: str) -> None:
        """One audit line with the code and reason, and no HTTP status:
        the connection was closed before any request."""
        self.assertEqual(audit.refused, [code])
        line = audit_record(audit, code)
        self.assertEqual((line["reason"], line["client"]), (reason, client))
        self.assertNotIn("status", line)

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
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxConnections = 2\n")
        first, second = await self.accepted(gateway), await self.accepted(gateway, "127.0.0.2")
        await self.refused(gateway, "127.0.0.3")
        self.assert_audited(
            audit, "too-many-connections", "open connections: at most 2 in all (server.maxConnections)", "127.0.0.3"
        )
        await self.close(first)
        await task.deferLater(reactor, 0.1, lambda: None)
        third = await self.accepted(gateway)
        await self.close(second, third)

    async def test_per_client(self) -> None:
        """With server.maxConnectionsPerClient = 1 a second connection from
        127.0.0.1 is refused while one from 127.0.0.2 is served."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.maxConnectionsPerClient = 1\n")
        first = await self.accepted(gateway)
        await self.refused(gateway)
        self.assert_audited(
            audit, "too-many-connections-per-client",
            "open connections: at most 1 per client address (server.maxConnectionsPerClient)", "127.0.0.1",
        )
        other = await self.accepted(gateway, "127.0.0.2")
        await self.close(first, other)
        await task.deferLater(reactor, 0.1, lambda: None)
        again = await self.accepted(gateway)
        await self.close(again)


class EveryListenerCappedTests(TestCase):
    """The publishing and metrics listeners are capped too, each on its own
    count: a full listener refuses new connections without starving the
    others."""

    async def plain(self, port: int, source: str = "127.0.0.1") -> RawClient:
        client = RawClient()
        client.handshake.addErrback(lambda failure: None)  # plain TCP: no handshake
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5, bindAddress=(source, 0))
        await connectProtocol(endpoint, client)
        return client

    async def answers(self, port: int, path: str) -> bytes:
        client = await self.plain(port)
        client.transport.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        await closed_within(client, 5)
        return client.received.split(b"\r\n", 1)[0]

    async def refused(self, port: int, source: str = "127.0.0.1") -> None:
        client = await self.plain(port, source)
        await closed_within(client, 5)
        self.assertEqual(client.received, b"")

    async def test_each_listener_its_own_count(self) -> None:
        """server.maxConnections = 2: two idle connections fill the
        publishing listener, whose third is refused (audited, naming the
        listener), while EST and /health serve; two fill EST while
        publishing serves; the metrics listener takes
        limits.METRICS_CONNECTIONS and refuses the next."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "server.maxConnections = 2\nserver.maxConnectionsPerClient = 0\n"
            "publish.port = 0\nmetrics.port = 0\n",
        )
        publish = gateway.service.publish_ports[0].getHost().port
        metrics = gateway.service.metrics_ports[0].getHost().port
        held = [await self.plain(publish), await self.plain(publish)]
        await self.refused(publish)
        [line] = [record(e) for e in audit.events if e.get("code") == "too-many-connections"]
        self.assertEqual(line["reason"], "open connections: at most 2 in all on the publishing listener (server.maxConnections)")
        self.assertEqual((await gateway.curl("cacerts")).status, 200)
        self.assertEqual(await self.answers(metrics, "/health/live"), b"HTTP/1.1 200 OK")
        for client in held:
            client.transport.loseConnection()
            await client.closed
        tls = [await connect(gateway), await connect(gateway)]
        for client in tls:
            await client.handshake
        self.assertEqual((await gateway.curl("cacerts")).status, 0)  # EST is full
        self.assertEqual(await self.answers(publish, "/"), b"HTTP/1.1 404 Not Found")
        for client in tls:
            client.transport.loseConnection()
            await client.closed
        # From two addresses: one may hold half of the metrics listener.
        scrapers = [await self.plain(metrics, f"127.0.0.{2 + i % 2}") for i in range(limits.METRICS_CONNECTIONS)]
        await self.refused(metrics)
        self.assertIn("open connections: at most 16 on the metrics listener",
                      [record(e)["reason"] for e in audit.events if e.get("code") == "too-many-connections"])
        for client in scrapers:
            client.transport.loseConnection()
            await client.closed
        await task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(await self.answers(metrics, "/health/live"), b"HTTP/1.1 200 OK")
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_one_client_takes_half_of_the_metrics_listener(self) -> None:
        """However high server.maxConnectionsPerClient, one address holds at
        most half of the metrics listener's connections: /health stays
        reachable for the others."""
        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "metrics.port = 0\n")
        metrics = gateway.service.metrics_ports[0].getHost().port
        held = [await self.plain(metrics, "127.0.0.2") for _ in range(limits.METRICS_CONNECTIONS // 2)]
        await self.refused(metrics, "127.0.0.2")
        self.assertIn("too-many-connections-per-client", audit.refused)
        self.assertEqual(await self.answers(metrics, "/health/live"), b"HTTP/1.1 200 OK")  # from 127.0.0.1
        for client in held:
            client.transport.loseConnection()
            await client.closed

    async def test_per_client_on_every_listener(self) -> None:
        """server.maxConnectionsPerClient = 1 holds on the publishing and
        metrics listeners as on EST, per listener."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "server.maxConnectionsPerClient = 1\npublish.port = 0\nmetrics.port = 0\n",
        )
        for port in (gateway.service.publish_ports[0].getHost().port, gateway.service.metrics_ports[0].getHost().port):
            first = await self.plain(port)
            await self.refused(port)
            first.transport.loseConnection()
            await first.closed


class FramingTests(TestCase):
    """RFC 9112 framing faults twisted.web lets through, refused at once on
    every listener, over real sockets: two Host field lines or none
    (§3.2), obs-fold (§5.2), a chunk size past the body limit (413) or
    not a number (400); an enrollment so framed issues nothing."""

    CASES = [
        ("two Host field lines", "Host: localhost\r\nHost: other\r\n", b"", 400, "bad-request-head",
         "the request has more than one Host header field (RFC 9112 §3.2)"),
        ("no Host", "", b"", 400, "bad-request-head",
         "an HTTP/1.1 request must have a Host header field (RFC 9112 §3.2)"),
        ("a Host that is no host", "Host: a b@c\r\n", b"", 400, "bad-request-head",
         "the Host header field is not a host name or address with an optional port (RFC 9112 §3.2)"),
        ("obs-fold", "Host: localhost\r\nX-Note: one\r\n two\r\n", b"", 400, "bad-request-head",
         "a header field line starts with whitespace (obsolete line folding, RFC 9112 §5.2)"),
        ("two Content-Type field lines", "Host: localhost\r\nContent-Type: application/pkcs10\r\n"
         "Content-Type: text/plain\r\nContent-Length: 0\r\n", b"", 400, "bad-request-head",
         "the request has more than one Content-Type header field (RFC 9112 §3.2)"),
        ("a chunk size past the limit", "Host: localhost\r\nTransfer-Encoding: chunked\r\n",
         b"fffffffffffffffffffffffffff\r\n", 413, "body-too-large", "the request body exceeds {limit} bytes"),
        ("a chunk size that is no number", "Host: localhost\r\nTransfer-Encoding: chunked\r\n",
         b"0x10\r\n", 400, "bad-chunked-body",
         "the chunked request body is malformed: Chunk-size must be an integer."),
    ]

    async def send(self, client: RawClient, method: str, path: str, fields: str, body: bytes) -> None:
        client.transport.write(f"{method} {path} HTTP/1.1\r\n{fields}\r\n".encode("ascii") + body)

    async def test_every_listener(self) -> None:
        """Each case on the EST (TLS), metrics and publishing listeners:
        the status and reason at once (well before server.bodyTimeout,
        30 s), the connection closed, one audit line with the code."""
        from estgw.ca.publish import MAX_OCSP_REQUEST
        from estgw.metrics import METRICS_MAX_BODY

        audit = AuditLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "metrics.port = 0\npublish.port = 0\n")
        await register(gateway)
        listeners = [
            ("est", None, "/.well-known/est/simpleenroll", gateway.config.max_request_bytes),
            ("metrics", gateway.service.metrics_ports[0].getHost().port, "/metrics", METRICS_MAX_BODY),
            ("publish", gateway.service.publish_ports[0].getHost().port, "/ocsp", MAX_OCSP_REQUEST),
        ]
        for listener, port, path, limit in listeners:
            for what, fields, body, status, code, reason in self.CASES:
                if listener == "est":
                    fields = "Authorization: Basic cHVtcC0xNzpzM2NyZXQ=\r\n" + fields
                client = await (connect(gateway) if port is None else plain_connect(port))
                if port is None:
                    await client.handshake
                count = len(audit.events)
                started = time.monotonic()
                await self.send(client, "POST", path, fields, body)
                await closed_within(client, 5)
                self.assertLess(client.closed_at - started, 2, (listener, what))
                expected = reason.format(limit=limit)
                self.assertTrue(client.received.startswith(b"HTTP/1.1 %d " % status), (listener, what, client.received))
                self.assertIn(expected.encode("utf-8"), client.received, (listener, what))
                [line] = [record(e) for e in audit.events[count:]]
                self.assertEqual((line["code"], line["status"], line["reason"]), (code, status, expected), (listener, what))
        self.assertEqual(await gateway.store.count_certificates(), 0)
        # A well-framed enrollment is served.
        ok = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(ok.status, 200, ok.text)


class StatusLineTests(TestCase):
    """Every status the listeners send carries its RFC 9110 (RFC 6585)
    reason phrase in the status line, on the wire."""

    async def status_line(self, gateway: RunningGateway, data: bytes, port: int | None = None) -> bytes:
        if port is None:
            client = await connect(gateway)
            await client.handshake
        else:
            client = RawClient()
            client.handshake.addErrback(lambda failure: None)  # plain TCP: there is no handshake
            await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5), client)
        client.transport.write(data)
        for _ in range(200):
            if b"\r\n" in client.received or client.closed.called:
                break
            await task.deferLater(reactor, 0.025, lambda: None)
        client.transport.loseConnection()
        await client.closed
        return client.received.partition(b"\r\n")[0]

    async def test_reason_phrases(self) -> None:
        """200, 204, 400, 401, 404, 405, 408, 413, 415, 431 and 501 from the
        EST listener, 404 and 405 from the plain-HTTP metrics listener, each
        with its phrase (431 is not "Error", 413 and 408 are RFC 9110's)."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "metrics.port = 0\nserver.headerTimeout = 1\nserver.maxRequestBytes = 2048\n"
        )
        await register(gateway)
        login = "Authorization: Basic cHVtcC0xNzpzM2NyZXQ=\r\n"
        post = "POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
        cases = [
            (request_head(), b"HTTP/1.1 200 OK"),
            (request_head("/.well-known/est/lab/csrattrs"), b"HTTP/1.1 204 No Content"),
            (b"NOT A REQUEST LINE\r\n\r\n", b"HTTP/1.1 400 Bad Request"),
            ((post + "Content-Length: 0\r\n\r\n").encode(), b"HTTP/1.1 401 Unauthorized"),
            (request_head("/nothing"), b"HTTP/1.1 404 Not Found"),
            (request_head().replace(b"GET", b"PUT", 1), b"HTTP/1.1 405 Method Not Allowed"),
            (b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: loc", b"HTTP/1.1 408 Request Timeout"),
            ((post + login + "Content-Length: 100000\r\n\r\n").encode(), b"HTTP/1.1 413 Content Too Large"),
            ((post + login + "Content-Type: text/plain\r\nContent-Length: 1\r\n\r\nx").encode(),
             b"HTTP/1.1 415 Unsupported Media Type"),
            (request_head(extra="".join(f"X-{i}: x\r\n" for i in range(120))),
             b"HTTP/1.1 431 Request Header Fields Too Large"),
            (b"POST /.well-known/est/fullcmc HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
             b"HTTP/1.1 501 Not Implemented"),
        ]
        for data, expected in cases:
            self.assertEqual(await self.status_line(gateway, data), expected, data[:60])
        port = gateway.service.metrics_ports[0].getHost().port
        self.assertEqual(await self.status_line(gateway, request_head("/nothing"), port), b"HTTP/1.1 404 Not Found")
        self.assertEqual(
            await self.status_line(gateway, b"POST /health/live HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", port),
            b"HTTP/1.1 405 Method Not Allowed",
        )
        self.assertEqual(await gateway.store.count_certificates(), 0)


class ReasonPhraseTests(SynchronousTestCase):
    def test_every_documented_status_has_its_phrase(self) -> None:
        """Each status of README's "Every refusal" table, and the others the
        listeners send (200, 204, 500), has RFC 9110's reason phrase; a code
        no RFC names gets an empty one (RFC 9112 §4), never "Error"."""
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
            readme = f.read()
        table = readme.split("Every refusal\n-------------", 1)[1].split("\n\n", 3)[2]
        statuses = {int(m) for m in re.findall(r"(?m)^([1-5][0-9][0-9]) ", table)}
        self.assertTrue({400, 408, 413, 431, 503} <= statuses, statuses)
        for status in statuses | {200, 204, 500}:
            self.assertEqual(limits.reason_phrase(status), HTTPStatus(status).phrase.encode()
                             if status not in RFC9110_RENAMED else RFC9110_RENAMED[status], status)
        self.assertEqual(limits.reason_phrase(499), b"")

    def test_status_line_of_any_response(self) -> None:
        """The channel writes the table's phrase whatever twisted.web's
        Request passes (twisted.web has none for 431 and RFC 2616's for 413)."""
        channel = limits.LimitedChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        for code in (413, 431, 408, 499):
            transport.clear()
            channel.writeHeaders(b"HTTP/1.1", str(code).encode(), b"Whatever", Headers())
            self.assertEqual(
                transport.value(), b"HTTP/1.1 %d %s\r\n\r\n" % (code, limits.reason_phrase(code))
            )
        channel.connectionLost(Failure(ConnectionDone()))


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

    def test_bounds(self) -> None:
        """Values below what a normal EST request needs, a timeout under a
        second, or a head limit past 64 KiB are refused with the key and
        the bound; the bounds themselves are accepted."""
        for key, value, reason in [
            ("server.maxHeaderBytes", "100", "must be at least 1024 bytes, not 100"),
            ("server.maxHeaderBytes", "65537", "must be at most 65536 bytes, not 65537"),
            ("server.maxHeaders", "15", "must be at least 16, not 15"),
            ("server.maxRequestBytes", "1023", "must be at least 1024 bytes, not 1023"),
            ("server.headerTimeout", "0.5", "must be from 1 to 86400 seconds, not 0.5"),
            ("server.bodyTimeout", "0", "must be from 1 to 86400 seconds, not 0"),
            ("server.idleTimeout", "-1", "must be from 1 to 86400 seconds, not -1"),
            ("server.idleTimeout", "86401", "must be from 1 to 86400 seconds, not 86401"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                from_string(TEST_CONFIG + f"{key} = {value}\n")
            self.assertEqual((caught.exception.key, caught.exception.reason), (key, reason))
        config = from_string(
            TEST_CONFIG + "server.maxHeaderBytes = 1024\nserver.maxHeaders = 16\nserver.maxRequestBytes = 1024\n"
            "server.headerTimeout = 1\nserver.bodyTimeout = 1\nserver.idleTimeout = 1\n"
        )
        self.assertEqual((config.max_header_bytes, config.max_headers, config.max_request_bytes), (1024, 16, 1024))
        self.assertEqual(from_string(TEST_CONFIG + "server.maxHeaderBytes = 65536\n").max_header_bytes, 65536)

    def test_zero_connections_means_no_cap(self) -> None:
        """server.maxConnections = 0 turns the cap off (documented)."""
        self.assertEqual(from_string(TEST_CONFIG + "server.maxConnections = 0\n").max_connections, 0)


def _answered_then_silent(port: int, ca_file: str, wait: float) -> tuple[bytes, float | None]:
    """GET cacerts with Connection: close over TLS, read the answer and the
    gateway's close_notify, then keep the TCP connection open without
    answering it.  The answer, and how long after it the gateway closed the
    TCP connection (None: not within ``wait`` seconds)."""
    import socket
    import ssl

    context = ssl.create_default_context(cafile=ca_file)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    answer = b""
    while True:
        data = tls.recv(65536)  # b"" once the gateway's close_notify came
        if not data:
            break
        answer += data
    beneath = socket.socket(fileno=os.dup(tls.fileno()))  # TCP, without sending close_notify back
    beneath.settimeout(wait)
    started = time.monotonic()
    try:
        closed = beneath.recv(1) == b""
    except ConnectionResetError:
        closed = True
    except socket.timeout:
        closed = False
    finally:
        beneath.close()
        raw.detach()
        tls.detach()
    return answer, (time.monotonic() - started) if closed else None


class CloseWithoutCloseNotifyTests(TestCase):
    async def test_client_that_never_sends_close_notify_is_cut_off(self) -> None:
        """After an answer with Connection: close the gateway sends
        close_notify and waits for the client's; a client that never sends
        it is cut off after server.idleTimeout, not held for ever."""
        from twisted.internet import threads

        gateway = await RunningGateway.start(self, TEST_CONFIG + "server.idleTimeout = 2\n")
        answer, closed_after = await threads.deferToThread(
            _answered_then_silent, gateway.port, gateway.ca_file, 15)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer[:100])
        self.assertIsNotNone(closed_after)
        assert closed_after is not None
        self.assertLess(closed_after, 10)
        self.assertEqual(gateway.service.connection_counts.total, 0)
