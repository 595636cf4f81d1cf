"""The connection caps against the process's descriptor limit, with the
real daemon (``twistd -n estgw``) started under a low ``ulimit -n``.

A cap only protects the gateway if it acts before the system's limit
(EMFILE) does: at EMFILE every listener fails at once, EST, ``/health``
and publishing alike.  So every listener is capped, the daemon raises its
soft RLIMIT_NOFILE to what its caps need, and refuses to start when the
hard limit is lower.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet import reactor, task, threads
from twisted.trial.unittest import TestCase

from estgw import limits
from estgw.testing import _which, run_process
from tests.test_twistd import TWISTD, Daemon, TwistdTestCase, _wait, environment, START_TIMEOUT

FLOOD = 300  # connections, more than the 256 descriptors the daemon may open


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` idle TCP connections to 127.0.0.1:``port`` (run in a
    thread: the daemon's log lines must keep flowing to the test meanwhile)."""
    opened = []
    for _ in range(count):
        opened.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    return opened


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()


def open_sockets(pid: int) -> int:
    """The TCP sockets process ``pid`` holds (listening ones included)."""
    directory = f"/proc/{pid}/fd"
    count = 0
    for name in os.listdir(directory):
        try:
            count += os.readlink(os.path.join(directory, name)).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def soft_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open files line")


async def until(condition: Any, seconds: float = 20.0) -> None:
    for _ in range(int(seconds / 0.1)):
        if condition():
            return
        await task.deferLater(reactor, 0.1, lambda: None)
    raise AssertionError(f"not within {seconds} s")


class DescriptorLimitTests(TwistdTestCase):
    def spawn_under(self, ulimit: str, *extra: str) -> Daemon:
        """The daemon started by ``sh -c 'ulimit <ulimit>; exec twistd ...'``."""
        daemon = Daemon()
        argv = ["/bin/sh", "-c", f'ulimit {ulimit} && exec "$@"', "sh",
                *TWISTD, "-n", "--pidfile=", "estgw", "--config", self.config, *extra]
        reactor.spawnProcess(daemon, argv[0], argv, env=environment(), path=self.directory)
        self.addCleanup(self._stop, daemon)
        return daemon

    def append(self, text: str) -> None:
        with open(self.config, "a") as f:
            f.write("\n" + text)

    async def curl(self, url: str, *extra: str) -> tuple[int, str]:  # type: ignore[override]
        result = await run_process(
            [_which("curl"), "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
             "--cacert", os.path.join(self.directory, "state", "ca", "root-ca.pem"), *extra, url],
        )
        return int(result.stdout or b"0"), result.stderr.decode()

    async def test_refuses_to_start_when_the_limit_would_beat_the_cap(self) -> None:
        """Under ``ulimit -n 256`` the default server.maxConnections (1024)
        could never act: start stops at once with the numbers and what to
        do, exit status 1, no traceback, nothing created."""
        self.append(f"publish.port = {free_port()}\nmetrics.port = {free_port()}\n")
        daemon = self.spawn_under("-n 256", "--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertEqual(code, 1, output)
        self.assertIsNone(daemon.port)
        needed = limits.descriptors_needed(1024, publish=True, metrics=True)
        self.assertIn(
            f"estgw: {self.config}: server.maxConnections = 1024 needs {needed} file descriptors per process"
            " (1024 connections on each of publish.port and server.port, 16 on metrics.port, 128 for the store,"
            " logs and listening sockets), but the process may open at most 256 (RLIMIT_NOFILE, ulimit -n):"
            " lower server.maxConnections to at most 56, or raise the limit (systemd: LimitNOFILE=)",
            output,
        )
        self.assertNotIn("Traceback", output)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "state")))

    async def test_workers_are_checked_with_their_share(self) -> None:
        """With server.workers = 2 each worker needs descriptors for its
        share of server.maxConnections; the supervisor checks before it
        starts any."""
        daemon = self.spawn_under("-n 256", "--port", "0", "--workers", "2")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertEqual(code, 1, output)
        self.assertIn(
            "server.maxConnections = 1024 (512 in each of 2 workers) needs 640 file descriptors per process", output
        )
        self.assertIn("lower server.maxConnections to at most 256,", output)

    async def test_raises_the_soft_limit(self) -> None:
        """A soft limit of 256 under a higher hard one is raised to what the
        caps need, and said so in the log."""
        hard = int((await run_process(["/bin/sh", "-c", "ulimit -Hn"])).stdout)
        needed = limits.descriptors_needed(1024, publish=False, metrics=False)
        if hard < needed:
            self.skipTest(f"the hard descriptor limit here is {hard}")
        daemon = self.spawn_under("-Sn 256", "--port", "0")
        await daemon.ready()
        self.assertEqual(soft_limit(daemon.transport.pid), needed)
        self.assertIn(f"raised the open files limit (RLIMIT_NOFILE) from 256 to {needed}", daemon.output.decode())

    async def test_flood_of_any_listener_under_a_low_limit(self) -> None:
        """``ulimit -n 256``, server.maxConnections = 50 and no per-client
        cap (the flood comes from one address): 300 idle connections to the
        publishing port, then 300 to the EST port.  The caps close what is
        over them (audited), the process never holds more than its caps'
        sockets, and EST, /health and publishing go on answering new
        clients wherever the flood is not."""
        publish, metrics = free_port(), free_port()
        self.append(
            f"server.maxConnections = 50\nserver.maxConnectionsPerClient = 0\n"
            f"publish.port = {publish}\nmetrics.port = {metrics}\n"
        )
        daemon = self.spawn_under("-n 256", "--port", "0")
        await daemon.ready()
        pid = daemon.transport.pid
        # What RESERVED_DESCRIPTORS stands for: an idle gateway holds a fraction of it.
        self.assertLess(len(os.listdir(f"/proc/{pid}/fd")), limits.RESERVED_DESCRIPTORS // 3)
        crl = f"http://127.0.0.1:{publish}/"  # answered 404: any answer shows it serves
        health = f"http://127.0.0.1:{metrics}/health/live"
        cacerts = f"https://localhost:{daemon.port}/.well-known/est/cacerts"
        self.assertEqual((await self.curl(cacerts))[0], 200)

        flood = await threads.deferToThread(open_connections, publish, FLOOD)
        self.addCleanup(close_all, flood)
        await until(lambda: daemon.output.count(b"too-many-connections") >= FLOOD - 50)
        # Listening: 2 EST (127.0.0.1, ::1), publishing, metrics.
        self.assertLessEqual(open_sockets(pid), 50 + 4 + 2)
        self.assertIn(b"at most 50 in all on the publishing listener (server.maxConnections)", daemon.output)
        self.assertEqual((await self.curl(cacerts))[0], 200)
        self.assertEqual((await self.curl(health))[0], 200)
        status, error = await self.curl(crl)
        self.assertEqual(status, 0, "the publishing listener is full")
        close_all(flood)

        await until(lambda: open_sockets(pid) <= 4 + 2)
        self.assertEqual((await self.curl(crl))[0], 404)
        flood = await threads.deferToThread(open_connections, daemon.port, FLOOD)
        self.addCleanup(close_all, flood)
        await until(lambda: daemon.output.count(b"too-many-connections") >= 2 * (FLOOD - 50))
        self.assertLessEqual(open_sockets(pid), 50 + 4 + 2)
        self.assertEqual((await self.curl(health))[0], 200)
        self.assertEqual((await self.curl(crl))[0], 404)
        self.assertNotIn(b"EMFILE", daemon.output)
        close_all(flood)
        await until(lambda: open_sockets(pid) <= 4 + 2)
        self.assertEqual((await self.curl(cacerts))[0], 200)
        self.assertIsNone(daemon.exit_code)

    async def test_emfile_without_a_cap_is_survived(self) -> None:
        """server.maxConnections = 0 (no cap) under ``ulimit -n 256``: 300
        idle connections exhaust the descriptors.  Twisted's listening port
        handles EMFILE (it closes a reserved descriptor, accepts and closes
        the connection, and reserves again): the process stays up and
        serves again once the flood is gone."""
        self.append("server.maxConnections = 0\nserver.maxConnectionsPerClient = 0\n")
        daemon = self.spawn_under("-n 256", "--port", "0")
        await daemon.ready()
        cacerts = f"https://localhost:{daemon.port}/.well-known/est/cacerts"
        flood = await threads.deferToThread(open_connections, daemon.port, FLOOD)
        self.addCleanup(close_all, flood)
        await until(lambda: b"EMFILE encountered" in daemon.output)
        close_all(flood)
        await until(lambda: open_sockets(daemon.transport.pid) <= 2)
        self.assertEqual((await self.curl(cacerts))[0], 200)
        self.assertIsNone(daemon.exit_code)


class FixedCapMessageTests(TestCase):
    def test_a_cap_without_a_key_is_not_offered_to_lower(self) -> None:
        """The approval service's cap is not a setting: when the hard limit
        is too low, the only advice is to raise it."""
        import resource

        from estgw import limits

        self.patch(resource, "getrlimit", lambda which: (256, 256))
        with self.assertRaises(ValueError) as raised:
            limits.ensure_descriptors(1024, key="the approval service's connection cap", settable=False)
        message = str(raised.exception)
        self.assertIn("raise the limit", message)
        self.assertNotIn("lower", message)
        with self.assertRaises(ValueError) as raised:
            limits.ensure_descriptors(1024)
        self.assertIn("lower server.maxConnections to at most", str(raised.exception))
