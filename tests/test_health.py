"""GET /health/live and /health/ready for load balancers and orchestrators,
on the EST listener (TLS, no client certificate) and the metrics listener."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw.health import certificate_in_validity
from estgw.testing import TEST_CONFIG, RunningGateway, _which, run_process


class HealthTests(TestCase):
    async def get(self, url: str, *extra: str) -> tuple[int, str, bytes]:
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-i", *extra, url])
        self.assertEqual(result.code, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, head.decode("latin-1").lower(), body

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
        self.assertEqual(status, 503)
        self.assertIn("retry-after: 5", head)
        self.assertTrue(body.startswith(b"not ready\nstore: "), body)
        status, _, _ = await self.get(gateway.url("/health/live"), "--cacert", gateway.ca_file)
        self.assertEqual(status, 200)
        await gateway.store.start()  # for the cleanup

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
