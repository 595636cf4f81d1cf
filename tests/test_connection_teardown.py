"""A TLS connection the client ends without a close_notify alert (most
EST clients close their socket once they have their response) is freed
as soon as it closes, by reference counting, not left for the cyclic
garbage collector.  Left to the collector, every such connection (its
OpenSSL object, buffers, protocol and request) waited for a collection,
and under load the collections cost CPU and stalled the reactor."""

from __future__ import annotations

import gc
import socket
import ssl

from OpenSSL import SSL
from twisted.internet import reactor, task, threads
from twisted.trial.unittest import TestCase

from estgw import collector
from estgw.testing import RunningGateway

CONNECTIONS = 12


def _live_tls_connections() -> int:
    return sum(1 for o in gc.get_objects() if type(o) is SSL.Connection)


def _one_request_then_drop(port: int, ca_file: str, keep_alive: bool) -> int:
    """GET cacerts over a new TLS connection, read the whole response, and
    close the socket without sending close_notify."""
    context = ssl.create_default_context(cafile=ca_file)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    connection = b"" if keep_alive else b"Connection: close\r\n"
    tls.sendall(b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n" + connection + b"\r\n")
    stream = tls.makefile("rb")
    status = int(stream.readline().split()[1])
    length = 0
    while True:
        line = stream.readline()
        if line in (b"\r\n", b""):
            break
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    assert len(stream.read(length)) == length
    stream.close()
    # SSLSocket.close() sends no alert: the server sees the TCP FIN only.
    tls.close()
    return status


class TeardownTests(TestCase):
    async def setUp(self) -> None:
        self.gateway = await RunningGateway.start(self)
        # Only reference counting frees anything while the test runs.
        gc.collect()
        gc.disable()
        self.addCleanup(gc.enable)

    async def _drop_connections(self, keep_alive: bool) -> None:
        before = _live_tls_connections()
        for _ in range(CONNECTIONS):
            status = await threads.deferToThread(
                _one_request_then_drop, self.gateway.port, self.gateway.ca_file, keep_alive
            )
            self.assertEqual(status, 200)
        # The server sees each close in its own time; wait, bounded.
        for _ in range(100):
            if _live_tls_connections() <= before:
                break
            await task.deferLater(reactor, 0.05)
        self.assertLessEqual(
            _live_tls_connections(), before,
            "connections closed without close_notify are kept alive by a reference cycle",
        )

    async def test_keep_alive_client_drops_the_socket(self) -> None:
        await self._drop_connections(keep_alive=True)

    async def test_connection_close_client_drops_the_socket(self) -> None:
        await self._drop_connections(keep_alive=False)


class SettleTests(TestCase):
    def test_settle_freezes_what_start_up_made(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        collector.settle()
        # What survived is out of every generation the collector walks.
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_count()[2], 0)
        self.assertEqual(gc.get_threshold(), collector.THRESHOLDS)
