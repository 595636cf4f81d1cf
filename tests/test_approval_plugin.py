"""`twistd estgw-approval`: the plugin, and the daemon itself."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from typing import Any

from twisted.application.service import IServiceMaker
from twisted.internet import defer, protocol
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw.approval import pki, tap
from estgw.approval.config import load
from estgw.testing import run_process, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SERVING = re.compile(rb"estgw-approval serving (https://127\.0\.0\.1:[0-9]+/approval/requests)")


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self) -> None:
        """getPlugins finds tapname estgw-approval backed by estgw.approval.tap."""
        (maker,) = [m for m in getPlugins(IServiceMaker) if m.tapname == "estgw-approval"]
        self.assertEqual(maker.module, "estgw.approval.tap")
        self.assertIs(maker.options, tap.Options)

    def test_plugin_file_imports_nothing_of_estgw(self) -> None:
        """The plugin file names its module as a string only."""
        with open(os.path.join(ROOT, "twisted", "plugins", "estgw_approval_plugin.py")) as f:
            source = f.read()
        self.assertNotIn("import estgw", source)
        self.assertIn('"estgw.approval.tap"', source)


class OptionsTests(SynchronousTestCase):
    def test_port_option(self) -> None:
        """--port takes service.port's place, read by its parser: 0 is a
        free port; a bad value stops in one line naming the option, not
        with twistd's usage text."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = write(os.path.join(directory, "approval.properties"), b"service.port = 8444\n")
        options = tap.Options()
        options.parseOptions(["--config", config, "--port", "0"])
        self.assertEqual(options.loaded.port, 0)
        for value, reason in (("70000", "not a TCP port: 70000"),
                              ("https", "expected a whole number (digits 0-9), not 'https'")):
            e = self.assertRaises(SystemExit, tap.Options().parseOptions, ["--config", config, "--port", value])
            self.assertEqual(str(e), f"estgw-approval: --port: {reason}")


class _Watch(protocol.ProcessProtocol):
    """Collects a daemon's output; fires ``serving`` with its URL."""

    def __init__(self) -> None:
        self.output = b""
        self.serving: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.process: Any = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        match = SERVING.search(self.output)
        if match and not self.serving.called:
            self.serving.callback(match.group(1).decode())

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        if not self.serving.called:
            self.serving.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class DaemonTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.env = dict(os.environ, PYTHONPATH=ROOT)

    def spawn(self, *arguments: str) -> _Watch:
        """``twistd -n --pidfile= ARGUMENTS`` in the test's directory,
        stopped (SIGTERM, then waited for) in the test's cleanup."""
        from twisted.internet import reactor

        watch = _Watch()
        watch.process = daemon = reactor.spawnProcess(
            watch, TWISTD, [TWISTD, "-n", "--pidfile=", *arguments], env=self.env, path=self.directory,
        )

        async def stop() -> None:
            if daemon.pid is not None:
                daemon.signalProcess(signal.SIGTERM)
            await watch.ended

        self.addCleanup(lambda: defer.ensureDeferred(stop()))
        return watch

    async def test_serves_operators(self) -> None:
        """`twistd -n estgw-approval --config FILE` makes its CAs on first
        start, serves HTTPS, and answers its default operator (curl with
        the operator certificate); without a certificate, no answer."""
        config = write(
            os.path.join(self.directory, "approval.properties"),
            b"service.port = 0\nservice.interface = 127.0.0.1\nservice.hostnames = 127.0.0.1\n",
        )
        from twisted.internet import reactor

        watch = self.spawn("estgw-approval", "--config", config)
        url = await watch.serving.addTimeout(30, reactor)
        certificate, key = pki.default_operator_paths(load(config))
        ca = os.path.join(self.directory, "approval-state", "ca", "root-ca.pem")
        listed = await run_process(
            ["/usr/bin/env", "curl", "-sS", "--cacert", ca, "--cert", certificate, "--key", key, url]
        )
        self.assertEqual(listed.code, 0, listed.stderr)
        self.assertEqual(json.loads(listed.stdout), {"requests": []})
        refused = await run_process(["/usr/bin/env", "curl", "-sS", "--cacert", ca, url])
        self.assertNotEqual(refused.code, 0)
        self.assertEqual(refused.stdout, b"")

    async def test_sighup_reopens_its_log(self) -> None:
        """`twistd -n --logfile FILE estgw-approval`: the service writes FILE
        itself; after a rename, SIGHUP opens FILE again and the service
        answers on (SIGHUP's default would have ended it)."""
        from twisted.internet import reactor, task

        config = write(
            os.path.join(self.directory, "approval.properties"),
            b"service.port = 0\nservice.interface = 127.0.0.1\nservice.hostnames = 127.0.0.1\n",
        )
        log = os.path.join(self.directory, "approval.log")
        watch = self.spawn("--logfile", log, "estgw-approval", "--config", config)
        daemon = watch.process
        watch.serving.addErrback(lambda failure: None)  # the log goes to the file, not to stdout

        def text(path: str) -> bytes:
            try:
                with open(path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return b""

        async def until(predicate: Any) -> None:
            for _ in range(300):  # at most 30 s
                if predicate():
                    return
                await task.deferLater(reactor, 0.1, lambda: None)
            self.fail(text(log).decode(errors="replace"))

        await until(lambda: SERVING.search(text(log)))
        url = SERVING.search(text(log)).group(1).decode()
        os.rename(log, log + ".1")
        daemon.signalProcess(signal.SIGHUP)
        await until(lambda: b"SIGHUP: reopened " + log.encode() in text(log))
        certificate, key = pki.default_operator_paths(load(config))
        ca = os.path.join(self.directory, "approval-state", "ca", "root-ca.pem")
        listed = await run_process(
            ["/usr/bin/env", "curl", "-sS", "--cacert", ca, "--cert", certificate, "--key", key, url]
        )
        self.assertEqual(listed.code, 0, listed.stderr)
        self.assertEqual(json.loads(listed.stdout), {"requests": []})
        self.assertIsNotNone(daemon.pid)  # still running

    async def test_bad_config_stops_start(self) -> None:
        """A typo in approval.properties stops twistd with the key and reason."""
        config = write(os.path.join(self.directory, "approval.properties"), b"service.prot = 8444\n")
        result = await run_process(
            [TWISTD, "-n", "--pidfile=", "estgw-approval", "--config", config], env=self.env, path=self.directory
        )
        self.assertNotEqual(result.code, 0)
        self.assertIn(b"service.prot: unknown key", result.stdout + result.stderr)
        self.assertNotIn(b"Usage:", result.stdout + result.stderr)  # an error, not a usage mistake
