"""server.workers / --workers with the real twistd: several processes on one
socket, a crashed worker started again, a clean stop; the rotated, filtered
log; the lag probe."""

from __future__ import annotations

import sys

import base64
import io
import os
import re
import signal
import time
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from estgw import config as config_module, logs
from estgw.testing import make_csr, new_key, until
from tests.test_twistd import TWISTD, Daemon, DaemonizeTestCase, TwistdTestCase, environment

STARTED = re.compile(rb"started worker (\d+) \(pid (\d+)\)")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


_until = until


def _newer_store(directory: str) -> None:
    """A store whose schema a newer estgw wrote: found only once the store
    opens, in each worker (the supervisor's checks before forking pass)."""
    import sqlite3

    os.makedirs(os.path.join(directory, "state"), exist_ok=True)
    db = sqlite3.connect(os.path.join(directory, "state", "estgw.sqlite"))
    db.execute("CREATE TABLE IF NOT EXISTS schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
    db.execute("INSERT OR REPLACE INTO schema_version VALUES (1, 9999)")
    db.commit()
    db.close()


class WorkerTests(TwistdTestCase):
    def append(self, text: str) -> None:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")

    def workers(self, daemon: Daemon) -> dict[int, int]:
        """worker number -> pid of its latest start."""
        return {int(n): int(pid) for n, pid in STARTED.findall(daemon.output)}

    async def enroll(self, port: int, device: str, password: str) -> int:
        csr = make_csr(new_key(), device).public_bytes(Encoding.DER)
        status, body = await self.curl(port, "simpleenroll", base64.b64encode(csr), f"{device}:{password}")
        self.assertEqual(status, 200, body.decode(errors="replace"))
        return status

    async def test_two_workers_restart_and_stop(self) -> None:
        """--workers 2: two children serve one port; one killed with
        SIGKILL is started again and the port keeps serving; SIGTERM to
        the supervisor stops every process."""
        daemon = self.spawn("--port", "0", "--workers", "2")
        port = await daemon.ready()
        await _until(lambda: b"with 2 worker processes" in daemon.output)
        # The supervisor says it serves once both workers do, not before.
        said = daemon.output.index(b"with 2 worker processes")
        for n in (1, 2):
            self.assertRegex(daemon.output[:said], rb"\[w%d [^\]]*\] estgw serving EST" % n)
        first = self.workers(daemon)
        self.assertEqual(sorted(first), [1, 2])
        supervisor = daemon.transport.pid
        for pid in first.values():
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                self.assertEqual(int(f.read().rsplit(")", 1)[1].split()[1]), supervisor)
        self.assertEqual((await self.cli("device", "add", "pump-1", "--password", "pw-1")).code, 0)
        # Keep-alive is off with curl per request: connections spread over both.
        for _ in range(4):
            await self.enroll(port, "pump-1", "pw-1")
        # The supervisor reads its workers' lines every DRAIN_INTERVAL.
        await _until(lambda: re.search(rb"\[w[12] estgw\.audit#info\] issued serial", daemon.output), 5)
        # One line per enrollment: its audit line, no access-log line besides;
        # requests without an audit line keep theirs.
        self.assertNotIn(b'"POST /.well-known/est/simpleenroll', daemon.output)
        self.assertEqual((await self.curl(port, "cacerts"))[0], 200)
        await _until(lambda: b'"GET /.well-known/est/cacerts HTTP/1.1" 200' in daemon.output, 10)

        os.kill(first[1], signal.SIGKILL)
        await _until(lambda: self.workers(daemon)[1] != first[1])
        self.assertIn(b"worker 1 ended", daemon.output)
        await _until(lambda: not _alive(first[1]), 10)
        second = self.workers(daemon)
        self.assertEqual(second[2], first[2])
        for _ in range(4):
            await self.enroll(port, "pump-1", "pw-1")
        listed = await self.cli("cert", "list")
        self.assertEqual(listed.stdout.count(b"device:pump-1"), 8)

        await daemon.stop()
        self.assertIn((daemon.exit_code, daemon.signal), ((0, None), (None, 15)))
        await _until(lambda: not any(_alive(pid) for pid in second.values()), 10)
        self.assertEqual(daemon.output.count(b"Server Shut Down."), 3)  # both workers and the supervisor
        self.assertEqual(sorted(os.listdir(self.directory)), ["body", "est.properties", "request", "state"])

    async def test_caps_are_shared_out(self) -> None:
        """server.maxConnections = 2 over two workers: each takes its share,
        one, so of three TLS connections held open at most two are
        served, whichever worker the kernel gives each to; the refusal
        names the share.  ca.maxQueued is shared out the same way."""
        self.append("server.maxConnections = 2\nserver.maxConnectionsPerClient = 0\nserver.workers = 2")
        daemon = self.spawn("--port", "0")
        port = await daemon.ready()
        await _until(lambda: len(re.findall(rb"\] estgw serving EST", daemon.output)) >= 2)
        from tests.test_limits import RawClient
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        with open(os.path.join(self.directory, "state", "ca", "root-ca.pem"), "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        clients = []
        for _ in range(3):
            client = RawClient()
            client.handshake.addErrback(lambda failure: None)
            endpoint = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=anchor),
                                     TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5))
            await connectProtocol(endpoint, client)
            clients.append(client)
        await _until(lambda: all(c.handshake_done or c.closed.called for c in clients), 10)
        served = [c for c in clients if c.handshake_done and not c.closed.called]
        self.assertIn(len(served), (1, 2))
        self.assertIn(b"too-many-connections", daemon.output)
        self.assertIn(b"at most 1 in this worker process (server.maxConnections over 2 workers)", daemon.output)
        for client in served:
            client.transport.loseConnection()
            await client.closed

    def test_share_of(self) -> None:
        """Each worker's share is the cap divided and rounded up; 0 (no
        cap) stays 0; the per-client cap is not divided."""
        from estgw import workers
        from estgw.testing import TEST_CONFIG

        config = config_module.from_string(
            TEST_CONFIG + "server.workers = 4\nserver.maxConnections = 10\nca.maxQueued = 1\n"
        )
        share = workers.share_of(config)
        self.assertEqual((share.max_connections, share.ca_max_queued, share.max_connections_per_client), (3, 1, 64))
        config = config_module.from_string(TEST_CONFIG + "server.workers = 4\nserver.maxConnections = 0\n")
        self.assertEqual(workers.share_of(config).max_connections, 0)

    async def test_supervisor_killed_workers_stop(self) -> None:
        """A supervisor killed outright (SIGKILL) leaves no worker behind."""
        self.append("server.workers = 2")
        daemon = self.spawn("--port", "0")
        await daemon.ready()
        await _until(lambda: len(self.workers(daemon)) == 2)
        pids = list(self.workers(daemon).values())
        daemon.transport.signalProcess("KILL")
        await daemon.ended
        await _until(lambda: not any(_alive(pid) for pid in pids), 15)

    async def test_metrics_refused_with_workers(self) -> None:
        """metrics.port with --workers 2: one 'estgw:' line naming the
        option, no usage text; --workers 1 serves a file that says
        server.workers = 2 (the option takes the key's place for every check)."""
        self.append("metrics.port = 0")
        daemon = self.spawn("--port", "0", "--workers", "2")
        code = await daemon.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"estgw: " + self.config.encode() + b": metrics.port: not available with --workers above 1",
                      daemon.output)
        self.assertNotIn(b"Usage:", daemon.output)
        self.append("server.workers = 2")
        daemon = self.spawn("--port", "0", "--workers", "1")
        await daemon.ready()
        self.assertNotIn(b"started worker", daemon.output)

    async def test_worker_start_failure_ends_the_supervisor(self) -> None:
        """Workers that cannot start end the supervisor as a single process
        ends: every worker stopped, the reason logged, terminated by SIGTERM
        (non-zero), no worker started again, the port closed, and no
        claim that it serves."""
        _newer_store(self.directory)
        daemon = self.spawn("--port", "0", "--workers", "2")
        started = time.monotonic()
        code = await daemon.ended.addTimeout(30, reactor)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual((code, daemon.signal), (None, 15), daemon.output.decode())
        self.assertRegex(daemon.output, rb"estgw could not start: worker [12] failed to start: "
                                        rb"the database has schema version 9999")
        self.assertNotIn(b"starting it again", daemon.output)
        self.assertNotIn(b"with 2 worker processes", daemon.output)
        await _until(lambda: not any(_alive(pid) for pid in self.workers(daemon).values()), 10)

    async def test_restarted_worker_that_cannot_start_is_tried_again(self) -> None:
        """A worker that served and then died is started again even when its
        successor cannot start (the cause may pass): the supervisor and the
        other worker serve on."""
        daemon = self.spawn("--port", "0", "--workers", "2")
        port = await daemon.ready()
        await _until(lambda: b"with 2 worker processes" in daemon.output)
        first = self.workers(daemon)
        _newer_store(self.directory)
        os.kill(first[1], signal.SIGKILL)
        await _until(lambda: re.search(rb"worker 1 ended \(the database has schema version 9999.*\)"
                                       rb" after [0-9.]+ s; starting it again", daemon.output), 20)
        self.assertIsNone(daemon.exit_code)
        self.assertNotIn(b"estgw could not start: worker", daemon.output)
        self.assertEqual(self.workers(daemon)[2], first[2])
        self.assertTrue(_alive(first[2]))
        self.assertEqual((await self.curl(port, "cacerts"))[0], 200)

    async def test_sigusr1_leaves_every_worker_serving(self) -> None:
        """SIGUSR1 to a worker, then to the whole process group (as
        ``systemctl kill -s USR1`` signals every process of the unit): no
        process ends, the supervisor rotates its log, the workers serve."""
        self.append("log.file = est.log")
        log = os.path.join(self.directory, "est.log")
        daemon = Daemon()
        # In a session of its own, so that its process group is its alone.
        argv = ["setsid"] + TWISTD + ["-n", "--pidfile=", "estgw", "--config", self.config, "--port", "0",
                                      "--workers", "2"]
        reactor.spawnProcess(daemon, "/usr/bin/setsid", argv, env=environment(), path=self.directory)
        self.addCleanup(self._stop, daemon)

        def text() -> str:
            try:
                with open(log, encoding="utf-8") as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        await _until(lambda: "with 2 worker processes" in text())
        port = int(re.findall(r"serving EST at https://[^:/]+:([0-9]+)/", text())[0])
        pids = {int(n): int(pid) for n, pid in STARTED.findall(text().encode())}
        supervisor = daemon.transport.pid
        self.assertEqual(os.getpgid(supervisor), supervisor)
        os.kill(pids[1], signal.SIGUSR1)
        os.killpg(supervisor, signal.SIGUSR1)
        await _until(lambda: os.path.exists(log + ".1") and "SIGUSR1: log rotated" in text(), 10)
        self.assertEqual((await self.curl(port, "cacerts"))[0], 200)
        self.assertEqual((await self.curl(port, "cacerts"))[0], 200)
        self.assertTrue(all(_alive(pid) for pid in pids.values()))
        self.assertIsNone(daemon.exit_code)
        with open(log + ".1", encoding="utf-8") as f:
            whole = f.read() + text()
        self.assertNotIn("ended", whole)
        self.assertEqual({int(n): int(pid) for n, pid in STARTED.findall(whole.encode())}, pids)

    async def test_log_file_workers_and_lag_probe(self) -> None:
        """log.file gets the supervisor's and the workers' lines; the lag
        probe (ESTGW_LAG_PROBE) writes one line a second per process."""
        self.append("server.workers = 2\nlog.file = logs/estgw.log\nlog.maxBytes = 65536\nlog.maxFiles = 2")
        lag = os.path.join(self.directory, "lag.txt")
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", "estgw", "--config", self.config, "--port", "0"]
        reactor.spawnProcess(daemon, argv[0], argv, env=dict(environment(), ESTGW_LAG_PROBE=lag),
                             path=self.directory)
        self.addCleanup(self._stop, daemon)
        path = os.path.join(self.directory, "logs", "estgw.log")

        def text() -> str:
            with open(path, encoding="utf-8") as f:
                return f.read()

        def each_worker_serves() -> bool:
            # The supervisor's line and one of each worker (they start in
            # either order, and a loaded machine may delay one).
            return os.path.exists(path) and all(
                re.search(rf"\[w{n} [^\]]*\] estgw serving EST", text()) for n in (1, 2)
            )

        await _until(each_worker_serves)
        self.assertNotIn(b"serving EST", daemon.output)  # not on standard output
        self.assertRegex(text(), r"\[w1 ")
        self.assertRegex(text(), r"\[w2 ")
        await _until(lambda: os.path.exists(lag) and len(open(lag).read().splitlines()) >= 2, 10)
        with open(lag, encoding="ascii") as f:
            when, pid, ms = f.readline().split()
        self.assertIn(int(pid), self.workers_from(text()))
        self.assertGreaterEqual(float(ms), 0.0)

    def workers_from(self, text: str) -> list[int]:
        return [int(pid) for _, pid in re.findall(r"started worker (\d+) \(pid (\d+)\)", text)]


class DaemonizedWorkerTests(DaemonizeTestCase):
    async def test_worker_start_failure_removes_the_pid_file(self) -> None:
        """twistd without -n, --workers 2, a store the workers cannot open:
        the daemon logs why, ends and removes its pid file, and leaves no
        worker behind."""
        _newer_store(self.directory)
        result = await self.daemonize("--port", "0", "--workers", "2")
        self.assertEqual(result.code, 0, result)  # detached before the workers start
        with open(self.pidfile) as f:
            pid = int(f.read())

        def log() -> bytes:
            with open(self.logfile, "rb") as f:
                return f.read()

        await _until(lambda: not os.path.exists(self.pidfile) and not _alive(pid), 20)
        self.assertRegex(log(), rb"estgw could not start: worker [12] failed to start: "
                                rb"the database has schema version 9999")
        self.assertNotIn(b"with 2 worker processes", log())
        await _until(lambda: not any(_alive(int(p)) for _, p in STARTED.findall(log())), 10)


class ReportTests(SynchronousTestCase):
    """What a worker writes on its ready pipe, and how the supervisor reads it."""

    def read_report(self, tell: Any) -> bytes:
        read_fd, write_fd = os.pipe()
        tell(write_fd)  # closes write_fd
        with os.fdopen(read_fd, "rb") as f:
            return f.read()

    def test_ready_and_failure_lines(self) -> None:
        """'ready' once the gateway serves; 'failed' and the reason on one
        line when it could not start (the failure passed on); a reason
        given before the reactor runs (SystemExit) the same way.  The
        supervisor names that reason, or else how the process ended."""
        from twisted.internet import defer
        from twisted.python.failure import Failure

        from estgw import workers

        def served(fd: int) -> None:
            ready: defer.Deferred[None] = defer.Deferred()
            workers.report_start(ready, fd)
            ready.callback(None)

        self.assertEqual(self.read_report(served), b"ready\n")
        passed_on: list[Failure] = []

        def failed(fd: int) -> None:
            ready: defer.Deferred[None] = defer.Deferred()
            workers.report_start(ready, fd)
            ready.addErrback(passed_on.append)
            ready.errback(RuntimeError("the store\ncannot open"))

        report = self.read_report(failed)
        self.assertEqual(report, b"failed the store cannot open\n")
        self.assertEqual(len(passed_on), 1)
        # One write a pipe takes at once, however long the reason.
        self.assertEqual(len(self.read_report(lambda fd: workers.report_failure(fd, "x" * 5000))), 1024)
        worker = workers._Worker(1)
        ended = Failure(RuntimeError("process ended by signal 15"))
        worker.report = report
        self.assertEqual(workers.Supervisor._why(worker, ended), "the store cannot open")
        worker.report = b""
        self.assertEqual(workers.Supervisor._why(worker, ended), "process ended by signal 15")


class HumanLogTests(SynchronousTestCase):
    def config(self, directory: str, extra: str) -> config_module.Config:
        return config_module.from_string(extra, base_dir=directory)

    def test_rotation_by_size_and_count(self) -> None:
        """log.maxBytes rotates the file; only log.maxFiles rotated files stay."""
        directory = os.path.abspath(self.mktemp())
        loaded = self.config(directory, "log.file = est.log\nlog.maxBytes = 4096\nlog.maxFiles = 2\n")
        self.assertEqual(loaded.log_file, os.path.join(directory, "est.log"))
        observer = logs.human_observer(loaded)
        log = Logger(namespace="estgw.test", observer=observer)
        for i in range(200):
            log.info("line {i} {padding}", i=i, padding="x" * 60)
        self.assertEqual(sorted(os.listdir(directory)), ["est.log", "est.log.1", "est.log.2"])
        for name in os.listdir(directory):
            self.assertLessEqual(os.path.getsize(os.path.join(directory, name)), 4096 + 200)
        with open(os.path.join(directory, "est.log"), encoding="utf-8") as f:
            self.assertIn("line 199 ", f.read())

    def test_level_keeps_the_audit_trail(self) -> None:
        """log.level = warn drops info lines but keeps estgw.audit (no JSON
        audit file keeps the trail instead)."""
        out = io.StringIO()
        observer = logs.human_observer(self.config(".", "log.level = warn\n"), out)
        Logger(namespace="estgw.audit", observer=observer).info("issued serial {s}", s="ab")
        Logger(namespace="estgw.web", observer=observer).info("an access line")
        Logger(namespace="estgw.web", observer=observer).warn("a warning")
        Logger(namespace="estgw.web", observer=observer).debug("a debug line")
        text = out.getvalue()
        self.assertIn("issued serial ab", text)
        self.assertIn("a warning", text)
        self.assertNotIn("an access line", text)
        self.assertNotIn("a debug line", text)

    def test_level_with_audit_file(self) -> None:
        """With log.audit.file keeping the audit trail, log.level = warn
        drops the estgw.audit lines from the human log too."""
        out = io.StringIO()
        observer = logs.human_observer(self.config(".", "log.level = warn\nlog.audit.file = audit.jsonl\n"), out)
        Logger(namespace="estgw.audit", observer=observer).info("issued serial {s}", s="ab")
        Logger(namespace="estgw.web", observer=observer).warn("a warning")
        self.assertNotIn("issued serial ab", out.getvalue())
        self.assertIn("a warning", out.getvalue())

    def test_bad_values(self) -> None:
        for text, key in (("log.maxBytes = 100", "log.maxBytes"), ("log.maxFiles = 0", "log.maxFiles"),
                          ("log.level = loud", "log.level"), ("server.workers = 0", "server.workers"),
                          ("server.workers = 65", "server.workers"),
                          ("server.workers = 2\nmetrics.port = 9100", "metrics.port")):
            with self.assertRaises(config_module.ConfigError) as raised:
                config_module.from_string(text + "\n")
            self.assertIn(key, str(raised.exception))

    def test_worker_line_formatted_as_a_single_process_formats_it(self) -> None:
        """Format specifications survive the trip ({serial:x} stays hex)."""
        import io
        import os

        from twisted.logger import LogLevel, Logger, formatEvent, globalLogPublisher

        pipe_writes: list[str] = []

        class Pipe(io.StringIO):
            def write(self, text: str) -> int:
                pipe_writes.append(text)
                return len(text)

        self.patch(sys, "stdout", Pipe())
        self.patch(os, "environ", dict(os.environ, **{logs.WORKER_LEVEL_VARIABLE: "info"}))
        observer = logs.worker_observer()
        log = Logger(namespace="estgw.audit", observer=observer)
        log.info("issued serial {serial:x} after {age:.0f} s", serial=0xAB12, age=2.6)
        log.info("issued serial {serial:x} after {age:.0f} s", serial=0xCD34, age=0.4)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        logs.publish_worker_lines([(line.encode(), 1) for line in "".join(pipe_writes).splitlines(keepends=True)])
        texts = [formatEvent(e) for e in events if str(e.get("log_system", "")).startswith("w1 ")]
        self.assertEqual(texts, ["issued serial ab12 after 3 s", "issued serial cd34 after 0 s"])
        self.assertEqual(events[0]["log_level"], LogLevel.info)

    def test_worker_lines_published(self) -> None:
        """A worker's event keeps level, namespace and time, a failure its
        traceback; lines of several workers go out in the order of their
        times; other text is an error line."""
        import json

        from twisted.logger import LogLevel, Logger, globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        written: list[str] = []
        log = Logger(namespace="estgw.audit", observer=lambda e: written.append(logs._worker_line(e)))
        log.info("issued {x}", x=1)
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("signing failed")
        later = json.dumps({"t": 1e10, "l": "warn", "n": "estgw.ca", "m": "late"}) + "\n"
        logs.publish_worker_lines([(later.encode(), 1), (written[0].encode(), 2), (written[1].encode(), 2),
                                   (b"Traceback (most recent call last):\n", 2), (b"\n", 2)])
        mine = [e for e in events if str(e.get("log_system", "")).startswith("w")]
        self.assertEqual([e["log_system"] for e in mine],
                         ["w2 estgw.audit#info", "w2 estgw.audit#critical", "w2 estgw.workers#error",
                          "w1 estgw.ca#warn"])
        self.assertEqual(mine[0]["log_text"], "issued 1")
        self.assertEqual(mine[0]["log_level"], LogLevel.info)
        self.assertIn("signing failed", mine[1]["log_text"])
        self.assertIn("ZeroDivisionError", mine[1]["log_text"])
        self.assertEqual(mine[2]["log_level"], LogLevel.error)
        self.assertEqual(mine[2]["line"], "Traceback (most recent call last):")
        self.assertEqual(mine[3]["log_time"], 1e10)

    def test_worker_lines_that_are_not_events(self) -> None:
        """Whatever a worker writes is published, never raised: deep
        nesting, numbers no float holds, JSON that is not an event, bytes
        that are not UTF-8 all become error lines (the supervisor's drain
        must go on, or the workers would block on full pipes)."""
        from twisted.logger import LogLevel, globalLogPublisher

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        odd = [b"[" * 100_000, b'{"t": 1' + b"0" * 400 + b', "l": "info", "n": "x", "m": "big"}',
               b'[1, 2]', b'{"t": 1, "l": "loud", "n": "x", "m": "?"}', b"\xff\xfe not utf-8"]
        logs.publish_worker_lines([(line, 3) for line in odd])
        mine = [e for e in events if str(e.get("log_system", "")).startswith("w3 ")]
        self.assertEqual(len(mine), len(odd))
        self.assertTrue(all(e["log_level"] == LogLevel.error for e in mine))
        self.assertTrue(all(e["log_system"] == "w3 estgw.workers#error" for e in mine))
