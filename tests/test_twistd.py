"""The daemon itself: ``twistd -n estgw`` as a subprocess on a copy of the
shipped etc/est.properties, driven by the operator CLI and curl."""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import shutil
import socket
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, protocol, reactor
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.trial.unittest import TestCase

from estgw.cli import format_serial
from estgw.protocol import decode_certs_only
from estgw.testing import ProcessResult, _which, make_csr, new_key, run_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "etc", "est.properties")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
READY = re.compile(rb"serving EST at https://[^:/]+:([0-9]+)/\.well-known/est/")
START_TIMEOUT = 30.0  # seconds; a start takes about one on a slow machine


def environment() -> dict[str, str]:
    env = dict(os.environ)
    # The repo root first, so twisted.plugins finds twisted/plugins/estgw_plugin.py.
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Daemon(protocol.ProcessProtocol):
    """A twistd process: its output so far, and when it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended: defer.Deferred = defer.Deferred()
        self.exit_code: int | None = None
        self._ready: defer.Deferred = defer.Deferred()
        self.port: int | None = None
        self._waiting = False

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = READY.search(self.output)
        if match and self.port is None:
            self.port = int(match.group(1))
            self._ready.callback(self.port)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = 0 if reason.check(ProcessDone) else reason.value.exitCode
        self.signal = getattr(reason.value, "signal", None)
        if self._waiting and not self._ready.called:
            self._ready.errback(RuntimeError(f"twistd exited ({self.exit_code}):\n{self.output.decode()}"))
        self.ended.callback(self.exit_code)

    def ready(self) -> defer.Deferred:
        self._waiting = True
        return self._ready.addTimeout(START_TIMEOUT, reactor)

    def stop(self) -> defer.Deferred:
        if self.exit_code is None:
            try:
                self.transport.signalProcess("TERM")
            except ProcessExitedAlready:
                pass
        return self.ended


class TwistdTestCase(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config = os.path.join(self.directory, "est.properties")
        shutil.copy(SHIPPED, self.config)

    def spawn(self, *extra: str) -> Daemon:
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", "estgw", "--config", self.config, *extra]
        reactor.spawnProcess(daemon, argv[0], argv, env=environment(), path=self.directory)
        self.addCleanup(self._stop, daemon)
        return daemon

    async def _stop(self, daemon: Daemon) -> None:
        daemon.stop()
        try:
            await defer.Deferred.fromCoroutine(_wait(daemon.ended, 15))
        except defer.TimeoutError:
            daemon.transport.signalProcess("KILL")
            await daemon.ended

    async def start(self) -> Daemon:
        daemon = self.spawn("--port", "0")
        await daemon.ready()
        return daemon

    async def cli(self, *args: str) -> ProcessResult:
        return await run_process(
            [sys.executable, "-m", "estgw.cli", "--config", self.config, *args],
            env=environment(), path=self.directory,
        )

    async def curl(self, port: int, operation: str, data: bytes | None = None,
                   user: str | None = None) -> tuple[int, bytes]:
        body = os.path.join(self.directory, "body")
        argv = [_which("curl"), "-sS", "--max-time", "20", "-o", body, "-w", "%{http_code}",
                "--cacert", os.path.join(self.directory, "state", "ca", "root-ca.pem")]
        if user:
            argv += ["--basic", "-u", user]
        if data is not None:
            request = os.path.join(self.directory, "request")
            with open(request, "wb") as f:
                f.write(data)
            argv += ["-H", "Content-Type: application/pkcs10", "--data-binary", "@" + request]
        # By name: the generated server certificate must carry "localhost".
        argv.append(f"https://localhost:{port}/.well-known/est/{operation}")
        result = await run_process(argv)
        with open(body, "rb") as f:
            return int(result.stdout or b"0"), f.read()


async def _wait(d: defer.Deferred, seconds: float) -> Any:
    return await d.addTimeout(seconds, reactor)


class DaemonTests(TwistdTestCase):
    async def test_serve_register_enroll_restart(self) -> None:
        """The shipped config serves at once on a fresh state directory with
        a server certificate for localhost, 127.0.0.1, ::1 and this host; a
        device registered through the CLI enrolls through curl; a second
        start reuses the CA and still knows the certificate."""
        daemon = await self.start()
        output = daemon.output.decode()
        root_path = os.path.join(self.directory, "state", "ca", "root-ca.pem")
        self.assertIn(f"CA certificate (trust anchor for clients): {root_path}", output)
        for created in ("ca/root-ca.pem", "ca/issuing-ca.pem", "tls/server.pem", "estgw.sqlite"):
            self.assertTrue(os.path.exists(os.path.join(self.directory, "state", created)), created)

        with open(os.path.join(self.directory, "state", "tls", "server.pem"), "rb") as f:
            server = x509.load_pem_x509_certificate(f.read())
        names = set(server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        self.assertLessEqual(
            {x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName(socket.gethostname())},
            names,
        )

        added = await self.cli("device", "add", "pump-7", "--password", "pw-7")
        self.assertEqual((added.code, added.stdout), (0, b"registered device pump-7\n"), added.stderr.decode())

        csr = make_csr(new_key(), "pump-7").public_bytes(Encoding.DER)
        status, body = await self.curl(daemon.port, "simpleenroll", base64.b64encode(csr), "pump-7:pw-7")
        self.assertEqual(status, 200, body.decode(errors="replace"))
        (cert,) = decode_certs_only(body)
        status, body = await self.curl(daemon.port, "devices/cacerts")
        self.assertEqual(status, 200)
        with open(root_path, "rb") as f:
            root = f.read()
        first_chain = decode_certs_only(body)

        await daemon.stop()
        # twistd ends on SIGTERM by re-raising it once the services stopped.
        self.assertIn((daemon.exit_code, daemon.signal), ((0, None), (None, 15)))
        self.assertIn(b"Server Shut Down.", daemon.output)
        again = await self.start()
        with open(root_path, "rb") as f:
            self.assertEqual(f.read(), root)
        self.assertNotIn("Created a new local CA", again.output.decode())
        status, body = await self.curl(again.port, "cacerts")
        self.assertEqual(decode_certs_only(body), first_chain)
        listed = await self.cli("cert", "list")
        self.assertEqual(listed.code, 0, listed.stderr.decode())
        self.assertIn(format_serial(cert.serial_number).encode(), listed.stdout)
        self.assertIn(b"device:pump-7", listed.stdout)


class BadConfigTests(TwistdTestCase):
    async def assert_refuses_to_start(self, key: str, reason: str) -> None:
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIsNone(daemon.port, "it must not listen")
        self.assertIn(f"{self.config}: {key}: {reason}", output)
        self.assert_only_the_error(output)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "state")), "nothing created")

    def assert_only_the_error(self, output: str) -> None:
        """A configuration error is not a usage error: no usage text, no traceback."""
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        self.assertNotIn("--config=", output)  # twistd's options list
        self.assertIn("estgw: ", output)

    async def test_missing_config_file(self) -> None:
        """A config file that is not there: the error alone, exit non-zero."""
        os.unlink(self.config)
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIn(self.config, output)
        self.assert_only_the_error(output)

    def append(self, text: str) -> None:
        with open(self.config, "a") as f:
            f.write(text)

    async def test_unknown_key(self) -> None:
        """A misspelt key stops twistd with the key and 'unknown key'."""
        self.append("server.prot = 8443\n")
        await self.assert_refuses_to_start("server.prot", "unknown key")

    async def test_bad_value(self) -> None:
        """A bad value stops twistd naming the key and the value."""
        self.append("handler.90.operation = simpleenrol\n")
        await self.assert_refuses_to_start("handler.90.operation", "must be one of")

    async def test_missing_trust_anchor_file(self) -> None:
        """A trust anchor file that is not there stops twistd."""
        self.append("tls.trustAnchors = factory-ca.pem\n")
        await self.assert_refuses_to_start("tls.trustAnchors", "no such file")

    async def test_unreadable_trust_anchor_file(self) -> None:
        """A trust anchor file holding no certificate stops twistd cleanly."""
        with open(os.path.join(self.directory, "factory-ca.pem"), "w") as f:
            f.write("not a certificate\n")
        self.append("tls.trustAnchors = factory-ca.pem\n")
        await self.assert_refuses_to_start("tls.trustAnchors", "no PEM or DER certificate")


class PortInUseTests(TwistdTestCase):
    async def test_port_in_use_exits_non_zero(self) -> None:
        """A port another process holds stops twistd with the port and the
        reason, a non-zero status and no traceback (a process manager sees
        the failure)."""
        holder = reactor.listenTCP(0, protocol.Factory(), interface="")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        daemon = self.spawn("--port", str(busy))
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIn(f"estgw: cannot listen for EST on 127.0.0.1 port {busy}: Address already in use", output)
        self.assertNotIn("Traceback", output)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class DaemonizeTestCase(TwistdTestCase):
    """Runs twistd without ``-n``: the real fork, pid file and log file."""

    def setUp(self) -> None:
        super().setUp()
        self.pidfile = os.path.join(self.directory, "twistd.pid")
        self.logfile = os.path.join(self.directory, "twistd.log")

    async def daemonize(self, *extra: str, plugin: str = "estgw", config: str | None = None) -> ProcessResult:
        argv = TWISTD + [f"--pidfile={self.pidfile}", f"--logfile={self.logfile}",
                         plugin, "--config", config or self.config, *extra]
        started = reactor.seconds()
        result = await _wait(run_process(argv, env=environment(), path=self.directory), START_TIMEOUT)
        self.took = reactor.seconds() - started
        if os.path.exists(self.pidfile):
            with open(self.pidfile) as f:
                pid = int(f.read())
            self.addCleanup(self._kill, pid)
        return result

    async def _kill(self, pid: int) -> None:
        if _alive(pid):
            os.kill(pid, 15)
        for _ in range(150):  # at most 15 s
            if not _alive(pid):
                return
            await _sleep(0.1)
        os.kill(pid, 9)

    def assert_failed_fast(self, result: ProcessResult, message: str) -> None:
        self.assertNotEqual(result.code, 0, result)
        self.assertLess(self.took, 20)
        self.assertIn(message, result.stderr.decode() + result.stdout.decode())
        self.assertNotIn("Traceback", result.stderr.decode())
        self.assertFalse(os.path.exists(self.pidfile), "no pid file of a dead process")

    def append_config(self, text: str) -> None:
        with open(self.config, "a") as f:
            f.write(text)


class DaemonizedTests(DaemonizeTestCase):
    """``twistd estgw`` without ``-n``: every start failure makes the
    command itself exit non-zero within seconds with the reason on its
    terminal, and leaves no pid file."""

    async def test_port_in_use(self) -> None:
        """The port is held: twistd exits 1 with the address, the port and
        the reason instead of waiting forever for its child."""
        holder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        result = await self.daemonize("--port", str(busy))
        self.assert_failed_fast(result, f"estgw: cannot listen for EST on 127.0.0.1 port {busy}: Address already in use")

    async def test_metrics_port_in_use(self) -> None:
        """So does a metrics port in use; the EST port is released again."""
        holder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        self.append_config(f"metrics.port = {busy}\n")
        result = await self.daemonize("--port", "0")
        self.assert_failed_fast(result, f"cannot listen for metrics on 127.0.0.1 port {busy}")

    async def test_coaps_port_in_use(self) -> None:
        """So does the CoAPs UDP port in use (coaps.port)."""
        holder = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        self.append_config(f"coaps.port = {busy}\ncoaps.interface = 127.0.0.1\n")
        result = await self.daemonize("--port", "0")
        self.assert_failed_fast(result, f"estgw: cannot listen on UDP port {busy} (coaps.port): Address already in use")

    async def test_bad_config(self) -> None:
        """A misspelt key: exit status non-zero, the key and the reason."""
        self.append_config("server.prot = 8443\n")
        result = await self.daemonize("--port", "0")
        self.assert_failed_fast(result, "server.prot: unknown key")

    async def test_unreadable_ca_key(self) -> None:
        """A CA key that cannot be loaded stops the start with its path."""
        first = await self.daemonize("--port", "0")  # creates the state, then serves
        self.assertEqual(first.code, 0, first)
        with open(self.pidfile) as f:
            await self._kill(int(f.read()))
        key = os.path.join(self.directory, "state", "ca", "issuing-ca.key")
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        result = await self.daemonize("--port", "0")
        self.assert_failed_fast(result, "issuing-ca.key")

    async def test_store_not_a_database(self) -> None:
        """A store file that is not SQLite stops the start naming store.url."""
        os.makedirs(os.path.join(self.directory, "state"))
        with open(os.path.join(self.directory, "state", "estgw.sqlite"), "wb") as f:
            f.write(b"this is not a database" * 100)
        result = await self.daemonize("--port", "0")
        self.assert_failed_fast(result, "store.url: cannot open")

    async def test_serves_then_stops(self) -> None:
        """A good start: twistd returns 0 at once, the pid file names the
        serving daemon, which answers /health/ready and ends on SIGTERM,
        removing its pid file."""
        holder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        port = holder.getHost().port
        await holder.stopListening()
        result = await self.daemonize("--port", str(port))
        self.assertEqual(result.code, 0, result)
        with open(self.pidfile) as f:
            pid = int(f.read())
        self.assertTrue(_alive(pid))
        ca = os.path.join(self.directory, "state", "ca", "root-ca.pem")
        ready = None
        for _ in range(100):  # the store opens after twistd returned; at most 10 s
            ready = await run_process([_which("curl"), "-sS", "--max-time", "5", "--cacert", ca,
                                       f"https://localhost:{port}/health/ready"])
            if ready.code == 0:
                break
            await _sleep(0.1)
        self.assertEqual(ready.stdout, b"ready\n", ready)
        await self._kill(pid)
        self.assertFalse(_alive(pid))
        self.assertFalse(os.path.exists(self.pidfile))

    async def test_store_failure_after_detaching(self) -> None:
        """The store written by a newer estgw fails only once the reactor
        runs: the daemon logs why and ends with a non-zero status (-n:
        terminated by SIGTERM) instead of lingering without serving."""
        import sqlite3

        os.makedirs(os.path.join(self.directory, "state"))
        db = sqlite3.connect(os.path.join(self.directory, "state", "estgw.sqlite"))
        db.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        db.execute("INSERT INTO schema_version VALUES (1, 9999)")
        db.commit()
        db.close()
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        self.assertEqual((code, daemon.signal), (None, 15), daemon.output.decode())
        self.assertIn(b"schema version 9999", daemon.output)
        self.assertIn(b"estgw could not start", daemon.output)


class ApprovalDaemonTests(DaemonizeTestCase):
    """The reference approval service starts the same way."""

    async def test_approval_port_in_use(self) -> None:
        """``twistd estgw-approval`` on a port in use exits 1 at once, daemonized or not."""
        holder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        config = os.path.join(self.directory, "approval.properties")
        with open(config, "w") as f:
            f.write(f"service.port = {busy}\nservice.interface = 127.0.0.1\nservice.hostnames = 127.0.0.1\n")
        result = await self.daemonize(plugin="estgw-approval", config=config)
        self.assert_failed_fast(
            result, f"estgw-approval: cannot listen for the approval service on 127.0.0.1 port {busy}"
        )
        foreground = await _wait(run_process(
            TWISTD + ["-n", "--pidfile=", "estgw-approval", "--config", config],
            env=environment(), path=self.directory), START_TIMEOUT)
        self.assertNotEqual(foreground.code, 0)
        self.assertNotIn(b"Traceback", foreground.stdout + foreground.stderr)


class ListenTests(TwistdTestCase):
    async def test_localhost_on_both_stacks(self) -> None:
        """The shipped server.interface = localhost listens on 127.0.0.1 and
        ::1 (the names the certificate carries), on one port, and nowhere
        else; curl reaches it as localhost, 127.0.0.1 and [::1]."""
        daemon = await self.start()
        port = daemon.port
        self.assertIn(f"listening on 127.0.0.1:{port}, [::1]:{port}".encode(), daemon.output)
        ca = os.path.join(self.directory, "state", "ca", "root-ca.pem")
        for host in ("localhost", "127.0.0.1", "[::1]"):
            result = await run_process([_which("curl"), "-sS", "--max-time", "10", "--cacert", ca,
                                        "-o", "/dev/null", "-w", "%{http_code}",
                                        f"https://{host}:{port}/.well-known/est/cacerts"])
            self.assertEqual(result.stdout, b"200", (host, result))


def _sleep(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)
