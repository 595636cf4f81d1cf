"""GET /metrics: responses, refusals by code, issued certificates and
latency, in the Prometheus text format, on their own loopback listener."""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw.config import ConfigError, from_string
from estgw.metrics import Metrics
from estgw.testing import TEST_CONFIG, RunningGateway, run_process
from tests.test_refusals import basic_csr, register

CONFIG = TEST_CONFIG + "metrics.port = 0\n"


def value(text: str, series: str) -> float:
    match = re.search("^" + re.escape(series) + r" ([0-9.e+-]+)$", text, re.M)
    if match is None:
        raise AssertionError(f"{series} not in:\n{text}")
    return float(match.group(1))


class MetricsEndpointTests(TestCase):
    async def test_counts_what_happened(self) -> None:
        """After a cacerts, a refused and an issued enrollment, /metrics
        counts each response by status, the refusal by its code, the
        certificate, and their latencies."""
        gateway = await RunningGateway.start(self, CONFIG)
        await register(gateway)
        self.assertEqual((await gateway.curl("cacerts")).status, 200)
        refused = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:wrong")
        self.assertEqual(refused.status, 401)
        issued = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(issued.status, 200)

        port = gateway.service.metrics_ports[0].getHost().port
        result = await run_process(["curl", "-sS", "-i", f"http://127.0.0.1:{port}/metrics"])
        self.assertEqual(result.code, 0, result.stderr)
        head, _, text = result.stdout.decode().partition("\r\n\r\n")
        self.assertIn("text/plain; version=0.0.4", head)
        self.assertEqual(value(text, 'estgw_responses_total{operation="cacerts",status="200"}'), 1)
        self.assertEqual(value(text, 'estgw_responses_total{operation="simpleenroll",status="401"}'), 1)
        self.assertEqual(value(text, 'estgw_responses_total{operation="simpleenroll",status="200"}'), 1)
        self.assertEqual(value(text, 'estgw_refusals_total{code="bad-credentials"}'), 1)
        self.assertEqual(value(text, 'estgw_certificates_issued_total{operation="simpleenroll"}'), 1)
        self.assertEqual(value(text, 'estgw_request_seconds_count{operation="simpleenroll"}'), 2)
        self.assertEqual(value(text, 'estgw_request_seconds_bucket{le="+Inf",operation="simpleenroll"}'), 2)

    async def test_request_limits(self) -> None:
        """The metrics listener has the EST listener's request limits: a
        long request line is 400, an oversized Content-Length 413 at once."""
        from tests.test_e2e import Client
        from tests.test_publish import check_request_limits

        gateway = await RunningGateway.start(self, CONFIG)
        port = gateway.service.metrics_ports[0].getHost().port
        await check_request_limits(self, Client(self, gateway, "limits"), port, "/metrics")

    async def test_off_by_default(self) -> None:
        """Without metrics.port nothing else listens."""
        gateway = await RunningGateway.start(self)
        self.assertEqual(gateway.service.metrics_ports, [])


class MetricsTests(SynchronousTestCase):
    def test_histogram_is_cumulative(self) -> None:
        """Bucket counts include every faster response; sum and count agree."""
        metrics = Metrics()
        for seconds in (0.001, 0.03, 0.03, 7.0, 60.0):
            metrics.response("cacerts", 200, seconds)
        text = metrics.render().decode()
        self.assertEqual(value(text, 'estgw_request_seconds_bucket{le="0.005",operation="cacerts"}'), 1)
        self.assertEqual(value(text, 'estgw_request_seconds_bucket{le="0.05",operation="cacerts"}'), 3)
        self.assertEqual(value(text, 'estgw_request_seconds_bucket{le="10.0",operation="cacerts"}'), 4)
        self.assertEqual(value(text, 'estgw_request_seconds_bucket{le="+Inf",operation="cacerts"}'), 5)
        self.assertAlmostEqual(value(text, 'estgw_request_seconds_sum{operation="cacerts"}'), 67.061, places=3)

    def test_bad_port(self) -> None:
        """metrics.port is checked like any port."""
        with self.assertRaises(ConfigError) as caught:
            from_string(TEST_CONFIG + "metrics.port = 70000\n")
        self.assertEqual(caught.exception.key, "metrics.port")


class LibraryMetricsTests(TestCase):
    """What prometheus-client adds: faults, TLS failures, store-derived
    gauges, thread pools and the process."""

    async def scrape(self, gateway: RunningGateway) -> str:
        port = gateway.service.metrics_ports[0].getHost().port
        result = await run_process(["curl", "-sS", f"http://127.0.0.1:{port}/metrics"])
        self.assertEqual(result.code, 0, result.stderr)
        return result.stdout.decode()

    async def test_faults_tls_gauges_and_process(self) -> None:
        """A CA fault, a store fault and a plain-HTTP request to the TLS
        port are counted by kind; a certificate expiring within
        metrics.expiringDays and a pending approval count; thread pools and
        the process (CPU, RSS, open fds) are reported."""
        from twisted.internet import defer

        from estgw.store import Approval, StoreUnavailable

        gateway = await RunningGateway.start(self, CONFIG + "metrics.expiringDays = 31\n")
        await register(gateway)
        gw = gateway.service.gateway
        real = gw.procedures["Test Procedure"]

        class Broken:
            def issue(self, request: object) -> object:
                return defer.fail(RuntimeError("CA down"))

        gw.procedures["Test Procedure"] = Broken()
        self.assertEqual((await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")).status, 503)
        gw.procedures["Test Procedure"] = real

        class NoRecord:
            def __getattr__(self, name: str) -> object:
                return getattr(gateway.store, name)

            def record_certificate(self, issued: object, renewing: object = None) -> object:
                return defer.fail(StoreUnavailable("disk full"))

        gw.store = NoRecord()
        self.assertEqual((await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")).status, 503)
        gw.store = gateway.store
        # TEST_CONFIG's certificates are valid 30 days: within 31.
        self.assertEqual((await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")).status, 200)
        plain = await run_process(["curl", "-sS", "--max-time", "5", f"http://127.0.0.1:{gateway.port}/"])
        self.assertNotEqual(plain.code, 0)

        text = await self.scrape(gateway)
        self.assertEqual(value(text, 'estgw_ca_errors_total{kind="error"}'), 1)
        self.assertEqual(value(text, "estgw_store_errors_total"), 1)
        self.assertEqual(value(text, 'estgw_refusals_total{code="ca-unavailable"}'), 1)
        self.assertEqual(value(text, 'estgw_refusals_total{code="store-unavailable"}'), 1)
        self.assertEqual(value(text, 'estgw_tls_handshake_failures_total{reason="http request"}'), 1)
        self.assertEqual(value(text, 'estgw_certificates_expiring{days="31"}'), 1)
        self.assertEqual(value(text, "estgw_pending_approvals"), 0)
        self.assertEqual(value(text, "estgw_ca_in_flight"), 0)
        self.assertEqual(value(text, 'estgw_threadpool_queued{pool="reactor"}'), 0)
        self.assertEqual(value(text, 'estgw_threadpool_queued{pool="store"}'), 0)
        self.assertGreater(value(text, "process_resident_memory_bytes"), 1e6)
        self.assertGreater(value(text, "process_open_fds"), 3)
        self.assertGreater(value(text, "process_cpu_seconds_total"), 0)
        # An approval waiting for an operator is counted when scraped.
        import datetime

        now = datetime.datetime.now(datetime.timezone.utc)
        await gateway.store.add_approval(Approval(
            request_id="r-1", handler="2", public_key_sha256="00", subject="CN=x", requester="device:x",
            csr=b"x", state="pending", created_at=now, expires_at=now + datetime.timedelta(hours=1),
        ))
        self.assertEqual(value(await self.scrape(gateway), "estgw_pending_approvals"), 1)
