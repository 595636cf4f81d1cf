"""A client that closes its connection while its enrollment is being
handled: a real TLS socket closed while the CA holds the request
(estgw.testing.HeldTokenProcedure).  The gateway logs one audit line,
counts the request in the metrics as 499, writes nothing to the dead
request, logs no error, and still records the certificate it issued."""

from __future__ import annotations

import base64
import gc

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import HeldTokenProcedure, RunningGateway, csr_pem, make_csr, new_key
from estgw.web import CLIENT_CLOSED

PROCEDURE = "Test Procedure"


class _Client(protocol.Protocol):
    """Sends one request and keeps what comes back."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.lost: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


async def _until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):  # ten seconds at most
        if await condition():
            return
        await task.deferLater(reactor, 0.05)
    raise AssertionError(f"timed out waiting for {what}")


class ClientGoneTests(TestCase):
    async def setUp(self) -> None:
        self.gateway = await RunningGateway.start(self)
        await self.gateway.store.add_device(Device("pump-17", hash_password("s3cret")))
        gateway = self.gateway.service.gateway
        self.held = HeldTokenProcedure(gateway.procedures[PROCEDURE])
        gateway.procedures = {**gateway.procedures, PROCEDURE: self.held}
        self.metrics = gateway.metrics
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def connect(self) -> _Client:
        """A TLS client that POSTs a Basic-authenticated enrollment."""
        with open(self.gateway.ca_file, "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        body = csr_pem(make_csr(new_key(), "pump-17"))
        request = (
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Basic " + base64.b64encode(b"pump-17:s3cret") + b"\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n" % len(body)
        ) + body
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=anchor),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.gateway.port),
        )
        client = _Client(request)
        await connectProtocol(endpoint, client)
        return client

    def audit(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("log_namespace") == "estgw.audit" and e.get("event") == event]

    async def closed_while_issuing(self, close: str) -> None:
        client = await self.connect()
        await self.held.called.addTimeout(10, reactor)  # the CA is asked: auth and checks passed
        getattr(client.transport, close)()
        await client.lost

        async def noticed() -> bool:
            return bool(self.audit("client-closed"))

        await _until(noticed, "the gateway to notice the closed connection")
        self.held.release()

        async def recorded() -> bool:
            return await self.gateway.store.count_certificates() == 1

        await _until(recorded, "the certificate to be recorded")
        gc.collect()  # an unhandled failure in a Deferred is logged when it is collected
        await task.deferLater(reactor, 0)
        self.assertEqual(client.received, b"")
        failures = [e for e in self.events if e.get("log_failure") is not None or e.get("log_level") == LogLevel.critical]
        self.assertEqual(failures, [])
        (closed,) = self.audit("client-closed")
        self.assertEqual(
            closed["log_format"].format(**closed).split(" from ")[0], "client-closed POST /.well-known/est/simpleenroll"
        )
        self.assertEqual(len(self.audit("issued")), 1)
        self.assertEqual(self.metrics.responses[("simpleenroll", CLIENT_CLOSED)], 1)
        self.assertEqual(sum(n for (op, _), n in self.metrics.responses.items() if op == "simpleenroll"), 1)
        self.assertIn('status="499"', self.metrics.render().decode())

    async def test_socket_closed(self) -> None:
        """The client sends TLS close_notify and closes while the CA works."""
        await self.closed_while_issuing("loseConnection")

    async def test_socket_aborted(self) -> None:
        """The client drops the TCP connection at once (no close_notify)."""
        await self.closed_while_issuing("abortConnection")

    async def test_connection_kept(self) -> None:
        """The same request with the client waiting: 200, counted as 200."""
        client = await self.connect()
        await self.held.called.addTimeout(10, reactor)
        self.held.release()

        async def answered() -> bool:
            return b"\r\n\r\n" in client.received and self.metrics.responses[("simpleenroll", 200)] == 1

        await _until(answered, "the response")
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received[:100])
        self.assertEqual(self.audit("client-closed"), [])
        client.transport.loseConnection()
        await client.lost
