"""GET /health/live and /health/ready for load balancers and orchestrators,
on the EST listener (TLS, no client certificate) and the metrics listener."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted.logger import capturedLogs, formatEvent

from estgw.health import RETRY_AFTER, WRITE_CHECK_CACHE, cached, certificate_in_validity
from estgw.store import FAULT_UNREACHABLE, StoreUnavailable
from estgw.testing import TEST_CONFIG, RunningGateway, _which, run_process


class HealthTests(TestCase):
    async def get(self, url: str, *extra: str) -> tuple[int, str, bytes]:
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-i", *extra, url])
        self.assertEqual(result.code, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, head.decode("latin-1").lower() + "\r\n", body

    async def test_live_and_ready_on_both_listeners(self) -> None:
        """Both answer 200 in plain text with a Content-Length, over TLS on
        the EST port without a client certificate and over HTTP on the
        metrics port."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "metrics.port = 0\n")
        metrics = gateway.service.metrics_ports[0].getHost().port
        for base, extra in ((gateway.url("/health/"), ("--cacert", gateway.ca_file)),
                            (f"http://127.0.0.1:{metrics}/health/", ())):
            for check, text in (("live", b"live\n"), ("ready", b"ready\n")):
                status, head, body = await self.get(base + check, *extra)
                self.assertEqual((status, body), (200, text), base + check)
                self.assertIn("content-type: text/plain; charset=utf-8", head)
                self.assertIn(f"content-length: {len(text)}", head)
                self.assertIn("cache-control: no-store", head)

    async def test_head(self) -> None:
        """HEAD answers the status with no body (curl -I, some balancers)."""
        gateway = await RunningGateway.start(self)
        status, head, body = await self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file, "-I")
        self.assertEqual((status, body), (200, b""))

    async def test_not_ready_when_the_store_does_not_answer(self) -> None:
        """A store that does not answer: /health/ready is 503 naming it, with
        Retry-After; /health/live stays 200 (restarting would not help)."""
        gateway = await RunningGateway.start(self)
        await gateway.store.close()
        status, head, body = await self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file)
        self.assertEqual((status, body), (503, b"not ready\nstore: not started, or closed\n"))
        self.assertIn(f"retry-after: {RETRY_AFTER}\r\n", head)
        self.assertIn(f"content-length: {len(body)}\r\n", head)
        status, _, _ = await self.get(gateway.url("/health/live"), "--cacert", gateway.ca_file)
        self.assertEqual(status, 200)
        await gateway.store.start()  # for the cleanup

    async def test_not_ready_while_another_process_holds_the_write_lock(self) -> None:
        """Another connection holds SQLite's write lock (reads still work, as
        WAL allows): /health/ready is 503 naming the store, within about the
        1 s the write check waits, not the 5 s a probe may take; once the
        lock is gone (and the 2 s cached outcome expired) it is ready."""
        gateway = await RunningGateway.start(self)
        status, _, body = await self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file)
        self.assertEqual((status, body), (200, b"ready\n"))
        other = sqlite3.connect(gateway.config.store_path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN EXCLUSIVE")
        try:
            # A read passes (the old check alone said ready).
            self.assertIsNone(await gateway.store.get_certificate(0))
            await defer.Deferred.fromCoroutine(_sleep(WRITE_CHECK_CACHE))  # the last outcome expires
            started = time.monotonic()
            status, head, body = await self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file)
            self.assertLess(time.monotonic() - started, 4.5)
        finally:
            other.execute("ROLLBACK")
        self.assertEqual((status, body), (503, b"not ready\nstore: the database is locked by another connection\n"))
        self.assertIn(f"retry-after: {RETRY_AFTER}\r\n", head)
        await defer.Deferred.fromCoroutine(_sleep(WRITE_CHECK_CACHE))
        status, _, body = await self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file)
        self.assertEqual((status, body), (200, b"ready\n"))

    async def test_not_ready_names_no_file_host_or_exception(self) -> None:
        """The 503 says what failed, never where: not the store's file name
        (or a PostgreSQL host, user, database), not an exception; the log
        has the store's own message.  A check that fails in a way it does
        not word for everyone says only that it failed."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "metrics.port = 0\n")
        metrics = f"http://127.0.0.1:{gateway.service.metrics_ports[0].getHost().port}/health/ready"
        secret = "postgresql://estgw@db.internal.example:5432/pki"
        faults: list[Exception] = [
            StoreUnavailable(f"PostgreSQLStore({secret!r}): connection to server at 10.1.2.3 failed",
                             FAULT_UNREACHABLE),
            RuntimeError(f"unexpected: {gateway.config.store_path}"),
        ]

        async def failing(serial: int) -> None:
            raise faults[0]

        gateway.store.get_certificate = failing
        for shown in (FAULT_UNREACHABLE, "failed (the log says why)"):
            with capturedLogs() as events:
                for url, extra in ((gateway.url("/health/ready"), ("--cacert", gateway.ca_file)), (metrics, ())):
                    status, head, body = await self.get(url, *extra)
                    self.assertEqual((status, body), (503, f"not ready\nstore: {shown}\n".encode()), url)
                    for hidden in ("10.1.2.3", "db.internal", "estgw@", gateway.directory, "Error", "Store("):
                        self.assertNotIn(hidden.encode(), body)
                        self.assertNotIn(hidden, head)
            logged = " ".join(formatEvent(e) for e in events if e.get("log_format", "").startswith("not ready"))
            self.assertIn(str(faults[0]), logged)
            faults.pop(0)

    async def test_write_check_cached(self) -> None:
        """Ten probes at once run the store's write check once per 2 s, not
        once each."""
        gateway = await RunningGateway.start(self)
        calls = []
        real = gateway.store.check_writable

        def counting(seconds: float = 1.0) -> Any:
            calls.append(seconds)
            return real(seconds)

        gateway.store.check_writable = counting
        started = time.monotonic()
        probes = [defer.Deferred.fromCoroutine(
            self.get(gateway.url("/health/ready"), "--cacert", gateway.ca_file)) for _ in range(10)]
        for status, _, _ in await defer.gatherResults(probes):
            self.assertEqual(status, 200)
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(len(calls), 1)
        # Once when all ten came within 2 s (as they do on an idle machine).
        self.assertLessEqual(len(calls), 1 + int(elapsed / WRITE_CHECK_CACHE), elapsed)
        self.assertEqual(set(calls), {1.0})

    async def test_not_ready_while_stopping(self) -> None:
        """Once the service stops, readiness checks report not ready."""
        gateway = await RunningGateway.start(self)
        self.assertNotEqual(dict(gateway.service.readiness_checks()), {})
        gateway.service._serving = False
        self.assertEqual(dict(gateway.service.readiness_checks()), {})
        gateway.service._serving = True

    async def test_other_methods(self) -> None:
        """POST (or any method but GET and HEAD) is a plain-text 405 with
        Allow, like every other refusal, never twisted.web's HTML page."""
        gateway = await RunningGateway.start(self)
        for path in ("/health/ready", "/health/live"):
            status, head, body = await self.get(gateway.url(path), "--cacert", gateway.ca_file, "-X", "POST")
            self.assertEqual(status, 405, path)
            self.assertIn("content-type: text/plain", head)
            self.assertIn("allow: get, head", head)
            self.assertNotIn(b"<", body)

    async def test_unknown_health_path(self) -> None:
        """Other paths under /health are 404."""
        gateway = await RunningGateway.start(self)
        for path in ("/health/nope", "/health", "/health/ready/x", "/health/live/x"):
            status, head, _ = await self.get(gateway.url(path), "--cacert", gateway.ca_file)
            self.assertEqual(status, 404, path)
            self.assertIn("content-type: text/plain", head)


async def _sleep(seconds: float) -> None:
    from twisted.internet import reactor, task

    await task.deferLater(reactor, seconds, lambda: None)


class CachedCheckTests(SynchronousTestCase):
    """health.cached on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.runs: list[defer.Deferred] = []

        async def check() -> None:
            d: defer.Deferred = defer.Deferred()
            self.runs.append(d)
            await d

        self.check = cached(check, 2.0, self.clock)

    def probe(self) -> defer.Deferred:
        return defer.ensureDeferred(self.check())

    def test_shared_then_cached_then_run_again(self) -> None:
        """Probes during a run wait for it; within 2 s after, they get its
        outcome without running the check; after that, it runs again."""
        first, second = self.probe(), self.probe()
        self.assertEqual(len(self.runs), 1)
        self.clock.advance(0.5)
        self.runs[0].errback(StoreUnavailable("database is locked"))
        for probe in (first, second):
            self.assertEqual(str(self.failureResultOf(probe, StoreUnavailable).value), "database is locked")
        self.clock.advance(1.9)
        self.failureResultOf(self.probe(), StoreUnavailable)
        self.assertEqual(len(self.runs), 1)
        self.clock.advance(0.1)
        third = self.probe()
        self.assertEqual(len(self.runs), 2)
        self.runs[1].callback(None)
        self.assertIsNone(self.successResultOf(third))
        self.assertIsNone(self.successResultOf(self.probe()))
        self.assertEqual(len(self.runs), 2)

    def test_a_probe_that_gives_up_does_not_cancel_the_run(self) -> None:
        """A probe cancelled (its READY_TIMEOUT) leaves the shared run going."""
        first = self.probe()
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        second = self.probe()
        self.assertEqual(len(self.runs), 1)
        self.runs[0].callback(None)
        self.assertIsNone(self.successResultOf(second))


class CAValidityTests(SynchronousTestCase):
    def test_expired_or_not_yet_valid(self) -> None:
        """The CA check fails outside the CA certificate's validity."""
        from estgw.ca import LocalCA

        ca = LocalCA.load_or_create(self.mktemp())
        certificate = ca.issuing
        certificate_in_validity(certificate)
        late = certificate.not_valid_after_utc + timedelta(seconds=1)
        e = self.assertRaises(ValueError, certificate_in_validity, certificate, late)
        self.assertIn("has expired", str(e))
        early = certificate.not_valid_before_utc - timedelta(days=1)
        e = self.assertRaises(ValueError, certificate_in_validity, certificate, early)
        self.assertIn("not valid yet", str(e))
        self.assertLess(datetime.now(timezone.utc), late)
