"""Log rotation with the real daemon: ``twistd -n estgw`` takes SIGHUP as
"reopen the log files" (never as the end), follows a rename without it,
and hands SIGHUP on to its workers; SIGUSR1 rotates the human log.

What logrotate does is done here by hand: rename the file, then
``kill -HUP`` (its ``postrotate``)."""

from __future__ import annotations

import base64
import json
import os
import re
import signal

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor, task

from estgw import logfiles
from estgw.testing import make_csr, new_key
from tests.test_twistd import TWISTD, Daemon, DaemonizeTestCase, TwistdTestCase, _alive, environment
from tests.test_workers import STARTED, _until

SERVING = re.compile(r"serving EST at https://[^:/]+:([0-9]+)/\.well-known/est/")


def read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def issued_serials(path: str) -> list[str]:
    """The serials of the ``issued`` lines of a JSON audit file."""
    records = [json.loads(line) for line in read(path).splitlines()]
    return [r["serial"] for r in records if r.get("event") == "issued"]


class HangupTests(TwistdTestCase):
    def append(self, text: str) -> None:
        with open(self.config, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def spawn_quiet(self, *extra: str) -> Daemon:
        """twistd -n whose log goes to a file (log.file or --logfile)."""
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", *extra, "estgw", "--config", self.config, "--port", "0"]
        reactor.spawnProcess(daemon, argv[0], argv, env=environment(), path=self.directory)
        self.addCleanup(self._stop, daemon)
        return daemon

    async def serving_port(self, log: str, count: int = 1) -> int:
        await _until(lambda: len(SERVING.findall(read(log))) >= count, 30)
        return int(SERVING.findall(read(log))[0])

    async def enroll(self, port: int) -> None:
        csr = make_csr(new_key(), "pump-1").public_bytes(Encoding.DER)
        status, body = await self.curl(port, "simpleenroll", base64.b64encode(csr), "pump-1:pw-1")
        self.assertEqual(status, 200, body.decode(errors="replace"))

    async def test_sighup_reopens_and_serves_on(self) -> None:
        """Foreground twistd with log.file and log.audit.file: after both are
        renamed, SIGHUP opens both names again at once (the new files exist
        before anything else is written), the process stays up and serves,
        the next audit line goes to the new file and the earlier one stays
        in the renamed file.  A later rename without a signal is followed
        within CHECK_SECONDS."""
        self.append("log.file = est.log\nlog.maxBytes = 0\nlog.audit.file = audit.jsonl")
        log, audit = self.path("est.log"), self.path("audit.jsonl")
        daemon = self.spawn_quiet()
        port = await self.serving_port(log)
        self.assertEqual((await self.cli("device", "add", "pump-1", "--password", "pw-1")).code, 0)
        await self.enroll(port)
        (first,) = issued_serials(audit)

        os.rename(log, log + ".1")
        os.rename(audit, audit + ".1")
        daemon.transport.signalProcess("HUP")
        await _until(lambda: "SIGHUP: reopened" in read(log), 10)
        self.assertTrue(os.path.exists(audit))
        self.assertIn(audit, read(log))
        self.assertIsNone(daemon.exit_code)
        await self.enroll(port)
        (second,) = issued_serials(audit)
        self.assertEqual(issued_serials(audit + ".1"), [first])
        self.assertNotEqual(first, second)
        self.assertIn("issued serial " + second, read(log))
        self.assertNotIn("issued serial " + second, read(log + ".1"))

        os.rename(audit, audit + ".2")  # no signal this time
        await self._pause(logfiles.CHECK_SECONDS + 0.2)
        await self.enroll(port)
        (third,) = issued_serials(audit)
        self.assertEqual(issued_serials(audit + ".2"), [second])
        self.assertNotIn(third, (first, second))
        self.assertIsNone(daemon.exit_code)

    async def _pause(self, seconds: float) -> None:
        await task.deferLater(reactor, seconds, lambda: None)

    async def test_twistd_logfile_reopens_and_usr1_rotates(self) -> None:
        """twistd's own --logfile (estgw writes it): SIGHUP after a rename
        writes on in a new file by the name; SIGUSR1 rotates it to FILE.1,
        as twistd does; the process serves throughout."""
        log = self.path("twistd.log")
        daemon = self.spawn_quiet("--logfile", log)
        port = await self.serving_port(log)
        os.rename(log, log + ".old")
        daemon.transport.signalProcess("HUP")
        await _until(lambda: "SIGHUP: reopened " + log in read(log), 10)
        self.assertNotIn("SIGHUP", read(log + ".old"))
        daemon.transport.signalProcess(signal.SIGUSR1)
        await _until(lambda: "SIGUSR1: log rotated" in read(log), 10)
        self.assertIn("SIGHUP: reopened", read(log + ".1"))
        self.assertEqual((await self.curl(port, "cacerts"))[0], 200)
        self.assertIsNone(daemon.exit_code)

    async def test_usr1_without_a_log_file(self) -> None:
        """twistd -n logging to standard output has no file to rotate:
        SIGUSR1 is ignored (its default action would end the process)."""
        daemon = await self.start()
        daemon.transport.signalProcess(signal.SIGUSR1)
        await self._pause(0.5)
        self.assertEqual((await self.curl(daemon.port, "cacerts"))[0], 200)
        self.assertIsNone(daemon.exit_code)

    async def test_sighup_goes_on_to_every_worker(self) -> None:
        """server.workers = 2: SIGHUP to the supervisor reopens its log and
        each worker's audit file (each worker says so in the log); no worker
        is restarted; every later issuance is in the new audit file."""
        self.append("server.workers = 2\nlog.file = est.log\nlog.audit.file = audit.jsonl")
        log, audit = self.path("est.log"), self.path("audit.jsonl")
        daemon = self.spawn_quiet()
        port = await self.serving_port(log)
        await _until(lambda: all(re.search(rf"\[w{n} [^\]]*\] estgw serving EST", read(log)) for n in (1, 2)))
        pids = {int(n): int(pid) for n, pid in STARTED.findall(read(log).encode())}
        self.assertEqual(sorted(pids), [1, 2])
        self.assertEqual((await self.cli("device", "add", "pump-1", "--password", "pw-1")).code, 0)
        for _ in range(2):
            await self.enroll(port)
        before = issued_serials(audit)
        self.assertEqual(len(before), 2)

        os.rename(audit, audit + ".1")
        os.rename(log, log + ".1")
        daemon.transport.signalProcess("HUP")

        def each_reopened() -> bool:
            text = read(log)
            return all(re.search(rf"\[w{n} [^\]]*\] SIGHUP: reopened {re.escape(audit)}", text)
                       for n in (1, 2)) and f"SIGHUP: reopened {log}" in text

        await _until(each_reopened, 20)
        for _ in range(4):
            await self.enroll(port)
        self.assertEqual(issued_serials(audit + ".1"), before)
        self.assertEqual(len(issued_serials(audit)), 4)
        self.assertEqual({int(n): int(pid) for n, pid in STARTED.findall((read(log + ".1") + read(log)).encode())},
                         pids)
        self.assertNotIn("ended", read(log))
        self.assertIsNone(daemon.exit_code)
        listed = await self.cli("cert", "list")
        self.assertEqual(listed.stdout.count(b"device:pump-1"), 6)


class DaemonizedHangupTests(DaemonizeTestCase):
    async def test_logrotate_procedure(self) -> None:
        """The README's procedure on a real daemon (twistd without -n):
        rename the --logfile, ``kill -HUP $(cat PIDFILE)``: the daemon lives
        on and writes to a new file by the name, made with the renamed
        file's mode (not the daemon's umask 077) and, as root, its owner."""
        result = await self.daemonize("--port", "0")
        self.assertEqual(result.code, 0, result)
        with open(self.pidfile) as f:
            pid = int(f.read())
        await _until(lambda: SERVING.search(read(self.logfile)) is not None, 30)
        owner = (4321, 4322) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        os.chmod(self.logfile, 0o644)
        os.chown(self.logfile, *owner)
        os.rename(self.logfile, self.logfile + ".1")
        os.kill(pid, signal.SIGHUP)
        await _until(lambda: f"SIGHUP: reopened {self.logfile}" in read(self.logfile), 10)
        self.assertTrue(_alive(pid))
        self.assertIn("serving EST", read(self.logfile + ".1"))
        made = os.stat(self.logfile)
        self.assertEqual((made.st_mode & 0o777, made.st_uid, made.st_gid), (0o644, *owner))
