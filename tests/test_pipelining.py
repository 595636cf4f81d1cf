"""Pipelined requests (RFC 9112 §9.3.2) on every listener, over real
sockets on 127.0.0.1: a client that never reads its answers costs the
server a bounded number of bytes and is cut off after server.idleTimeout;
one that reads gets every answer, in order.

The flooding client is ``bench/pipeline_flood.py`` in its own process
(the stdlib ssl module); the server side is measured in-process, on the
channel of each connection: what it holds = input read and not yet parsed
+ answers written and not yet sent, in every layer below it.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
import threading
import time
from typing import Any

from twisted.internet import task, threads
from twisted.internet.abstract import FileDescriptor
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase

from estgw import limits
from estgw.testing import TEST_CONFIG, RunningGateway, run_process
from tests.test_auth import AuditLog

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOD = os.path.join(REPO, "bench", "pipeline_flood.py")

#: The most one connection may hold, whatever its client does.  What it
#: holds: the transport's buffer (64 KiB) twice over TLS, one answer, one
#: read of input (64 KiB) and the request being parsed.
BOUND = 320 * 1024


def layers(channel: limits.LimitedChannel) -> list[Any]:
    """The transports below ``channel``, outermost first: ProtocolWrappers
    (TLS, the connection caps) down to the TCP connection."""
    found = [channel.transport]
    while isinstance(found[-1], ProtocolWrapper):
        found.append(found[-1].transport)
    assert isinstance(found[-1], FileDescriptor), found
    return found


def held_bytes(channel: limits.LimitedChannel) -> int:
    """Bytes the server holds for ``channel``'s connection: read and not
    yet parsed (the channel's buffers) plus written and not yet sent (TLS:
    small writes being gathered and writes held for a handshake; TCP: the
    send buffer), in every layer below the channel."""
    total = len(channel._buffer) + sum(map(len, channel._dataBuffer))
    *wrappers, tcp = layers(channel)
    # A ProtocolWrapper answers for its transport's attributes: ask each by its type.
    for layer in wrappers:
        if isinstance(layer, TLSMemoryBIOProtocol):
            total += sum(map(len, getattr(layer._aggregator, "_buffer", ())))
            total += sum(map(len, layer._appSendBuffer or ()))
    return total + len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen


class Watch:
    """Every LimitedChannel made while a test runs: the most any of them
    held (sampled every 10 ms and at each pause), how often the transport
    paused one and when last, how many requests they answered, and when
    each connection was lost."""

    def __init__(self, testcase: TestCase, send_buffer: int | None = None) -> None:
        self.channels: list[limits.LimitedChannel] = []
        self.peak = 0
        self.pauses = 0
        self.last_pause = 0.0
        self.answered = 0
        self.lost: list[float] = []
        made = limits.LimitedChannel.connectionMade
        paused = limits.LimitedChannel.pauseProducing
        done = limits.LimitedChannel.requestDone
        lost = limits.LimitedChannel.connectionLost

        def connection_made(channel: limits.LimitedChannel) -> None:
            self.channels.append(channel)
            if send_buffer is not None:
                # As on a real network, where the kernel holds little of
                # what is unsent (on loopback it grows to megabytes).
                layers(channel)[-1].socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
            made(channel)

        def pause(channel: limits.LimitedChannel) -> None:
            self.pauses += 1
            self.last_pause = time.monotonic()
            paused(channel)
            self.sample()

        def connection_lost(channel: limits.LimitedChannel, reason: Any) -> None:
            self.lost.append(time.monotonic())
            lost(channel, reason)

        def request_done(channel: limits.LimitedChannel, request: Any) -> None:
            self.answered += 1
            done(channel, request)

        testcase.patch(limits.LimitedChannel, "connectionMade", connection_made)
        testcase.patch(limits.LimitedChannel, "pauseProducing", pause)
        testcase.patch(limits.LimitedChannel, "requestDone", request_done)
        testcase.patch(limits.LimitedChannel, "connectionLost", connection_lost)
        self._loop = task.LoopingCall(self.sample)
        self._loop.start(0.01)
        testcase.addCleanup(lambda: self._loop.running and self._loop.stop())

    def sample(self) -> None:
        for channel in self.channels:
            self.peak = max(self.peak, held_bytes(channel))


async def flood(port: int, path: str, cafile: str | None = None, count: int = 20000, seconds: float = 20) -> dict:
    """bench/pipeline_flood.py in its own process: ``count`` pipelined GETs
    of ``path``, nothing read; what it saw."""
    argv = [sys.executable, FLOOD, "client", "--port", str(port), "--path", path,
            "--count", str(count), "--seconds", str(seconds)]
    if cafile is not None:
        argv += ["--cafile", cafile]
    result = await run_process(argv)
    if result.code != 0:
        raise AssertionError(result.stderr.decode(errors="replace"))
    return json.loads(result.stdout)


def read_response(stream: Any) -> tuple[int, bytes]:
    """One HTTP/1.1 response (with Content-Length) from ``stream``."""
    status_line = stream.readline()
    if not status_line:
        raise AssertionError("the server closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = stream.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, stream.read(length)


def pipelined(port: int, paths: list[str], cafile: str | None = None, wait: float = 1.0) -> list[tuple[int, bytes]]:
    """Send GETs of ``paths`` back to back on one connection (in a thread
    of their own), read nothing for ``wait`` seconds, then read every
    answer.  Blocking: run it in a thread."""
    raw = socket.socket()
    # A small receive window, so the server's side fills soon on any
    # machine (loopback buffers grow to megabytes) and it has to wait.
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    raw.settimeout(30)
    raw.connect(("127.0.0.1", port))
    sock: Any = raw
    if cafile is not None:
        sock = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname="localhost")
    requests = b"".join(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode() for path in paths)
    writer = threading.Thread(target=sock.sendall, args=(requests,), daemon=True)
    try:
        writer.start()
        time.sleep(wait)
        stream = sock.makefile("rb")
        answers = [read_response(stream) for _ in paths]
        writer.join(30)
        return answers
    finally:
        sock.close()


class NeverReadingClientTests(TestCase):
    """One connection, 20000 pipelined GETs, no byte read: the server holds
    at most BOUND bytes for it, answers only what the client could take,
    and aborts it server.idleTimeout seconds after it stopped taking any."""

    idle = 2

    async def check_flood(self, gateway: RunningGateway, port: int, path: str, tls: bool) -> None:
        audit = AuditLog(self)
        watch = Watch(self)
        seen = await flood(port, path, gateway.ca_file if tls else None)
        watch.sample()
        self.assertEqual(seen["how"], "reset", seen)  # aborted: its answers could not be sent
        # server.idleTimeout after the client last took an answer (the last pause).
        [lost] = watch.lost
        self.assertGreaterEqual(lost - watch.last_pause, self.idle - 0.1)
        self.assertLess(lost - watch.last_pause, self.idle + 3)
        self.assertGreater(watch.pauses, 0)  # the client's reading, not the server's, set the pace
        self.assertLess(watch.peak, BOUND, f"one connection held {watch.peak} bytes")
        self.assertGreater(watch.answered, 0)
        self.assertLess(watch.answered, 20000)
        self.assertEqual(audit.refused, ["idle-timeout"])
        self.assertIn(f"the client read none of its responses for {self.idle} seconds", audit.reasons)
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_est_listener(self) -> None:
        """The EST listener over TLS (GET cacerts, answered at once)."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + f"server.idleTimeout = {self.idle}\n")
        await self.check_flood(gateway, gateway.port, "/.well-known/est/cacerts", tls=True)

    async def test_metrics_listener(self) -> None:
        """The plain-HTTP metrics listener (GET /metrics, answered after a
        store read, so later pipelined requests wait in the channel)."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + f"server.idleTimeout = {self.idle}\nmetrics.port = 0\n"
        )
        port = gateway.service.metrics_ports[0].getHost().port
        await self.check_flood(gateway, port, "/metrics", tls=False)

    async def test_publish_listener(self) -> None:
        """The plain-HTTP CRL and OCSP publishing listener (GET a CRL)."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + f"server.idleTimeout = {self.idle}\npublish.port = 0\npublish.interface = 127.0.0.1\n"
        )
        port = gateway.service.publish_ports[0].getHost().port
        await self.check_flood(gateway, port, "/crl/Test%20Procedure.crl", tls=False)

    async def test_client_that_keeps_sending(self) -> None:
        """A client that keeps writing requests (more than any socket buffer
        takes) and never reads is cut off the same way: it cannot keep its
        connection by sending, since the server reads nothing from it."""
        audit = AuditLog(self)
        watch = Watch(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + f"server.idleTimeout = {self.idle}\n")
        seen = await flood(gateway.port, "/.well-known/est/cacerts", gateway.ca_file, count=400000)
        self.assertFalse(seen["all_sent"], seen)
        self.assertIn(seen["how"], ("reset", "fin"), seen)
        self.assertLess(watch.peak, BOUND, f"one connection held {watch.peak} bytes")
        self.assertEqual(audit.refused, ["idle-timeout"])


class ReadingClientTests(TestCase):
    """A client that pipelines and then reads gets every answer in order
    (RFC 9112 §9.3.2), also when the server had to wait for it to read."""

    def paths(self, count: int) -> list[str]:
        kinds = ["/.well-known/est/cacerts", "/.well-known/est/csrattrs"]
        return [kinds[i % 3] if i % 3 < 2 else f"/.well-known/est/nope{i}" for i in range(count)]

    def check_in_order(self, paths: list[str], answers: list[tuple[int, bytes]]) -> None:
        self.assertEqual(len(answers), len(paths))
        for i, (path, (status, body)) in enumerate(zip(paths, answers)):
            if path.endswith("cacerts"):
                self.assertEqual(status, 200, (i, body[:80]))
                self.assertTrue(body.startswith(b"MII"), (i, body[:80]))
            elif path.endswith("csrattrs"):
                self.assertEqual(status, 200, (i, body[:80]))
                self.assertFalse(body.startswith(b"MII"), (i, body[:80]))
            else:
                self.assertEqual((status, body), (404, f"no EST operation {path.rsplit('/', 1)[1]!r}\n".encode()))

    async def test_tls_in_order(self) -> None:
        """1500 pipelined GETs (cacerts, csrattrs, 404s naming their path)
        over TLS, read after a second: all 1500 answers, in order, though
        the server paused for the client on the way."""
        watch = Watch(self, send_buffer=32768)
        gateway = await RunningGateway.start(self)
        paths = self.paths(1500)
        answers = await threads.deferToThread(pipelined, gateway.port, paths, gateway.ca_file)
        self.check_in_order(paths, answers)
        self.assertGreater(watch.pauses, 0)
        self.assertLess(watch.peak, BOUND)

    async def test_plain_http_in_order(self) -> None:
        """The metrics listener: /metrics (answered after a store read) and
        /health/live interleaved, 600 pipelined, all answered in order,
        though the server paused for the client on the way."""
        watch = Watch(self, send_buffer=32768)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "metrics.port = 0\n")
        port = gateway.service.metrics_ports[0].getHost().port
        paths = ["/metrics" if i % 2 == 0 else "/health/live" for i in range(600)]
        answers = await threads.deferToThread(pipelined, port, paths)
        self.assertEqual(len(answers), 600)
        for i, (status, body) in enumerate(answers):
            self.assertEqual(status, 200, i)
            if i % 2 == 0:
                self.assertIn(b"estgw_responses_total", body, i)
            else:
                self.assertNotIn(b"estgw_responses_total", body, i)
        self.assertGreater(watch.pauses, 0)
        self.assertLess(watch.peak, BOUND)

