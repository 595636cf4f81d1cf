"""The gateway's metrics, through prometheus-client.

One :class:`Metrics` per gateway, each with its own registry (several
gateways in one process, as in the tests, do not mix).  ``metrics.port``
serves them as ``GET /metrics`` on a separate plain-HTTP listener
(loopback by default): they describe traffic, not secrets, but are
nothing devices need to reach.  What is exported (README, Metrics):

* ``estgw_responses_total{operation,status}``, ``estgw_refusals_total{code}``,
  ``estgw_certificates_issued_total{operation}``,
  ``estgw_request_seconds{operation}`` (histogram);
* ``estgw_ca_errors_total{kind}`` (busy, timeout, overdue, error),
  ``estgw_store_errors_total``, ``estgw_tls_handshake_failures_total{reason}``;
* read when scraped: ``estgw_pending_approvals``,
  ``estgw_certificates_expiring{days}`` (issued here, not revoked, expiring
  within ``metrics.expiringDays``), ``estgw_threadpool_queued{pool}``,
  ``estgw_ca_in_flight`` and ``estgw_ca_overdue``;
* the process: ``process_cpu_seconds_total``,
  ``process_resident_memory_bytes``, ``process_open_fds`` and the rest of
  prometheus-client's process collector.
"""

from __future__ import annotations

import collections
import functools
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import server

from estgw.plaintext import Branch, Leaf, respond, text

# The *_created series double every counter and say little here.
prometheus_client.disable_created_metrics()

_NOT_FOUND = "no such resource: /metrics, /health/live and /health/ready are served here"

# Upper bounds (seconds) of the latency histogram buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters the request path updates, and gauges read when scraped."""

    def __init__(self, expiring_days: int = 30) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.expiring_days = expiring_days
        self._responses = Counter(
            "estgw_responses", "EST responses by operation and HTTP status.", ["operation", "status"], registry=r
        )
        self._refusals = Counter(
            "estgw_refusals", "Refused requests and connections by reason code (README, Every refusal).",
            ["code"], registry=r,
        )
        self._issued = Counter(
            "estgw_certificates_issued", "Certificates issued by operation.", ["operation"], registry=r
        )
        self._latency = Histogram(
            "estgw_request_seconds", "Time from request to response by operation.", ["operation"],
            buckets=BUCKETS, registry=r,
        )
        self._ca_errors = Counter(
            "estgw_ca_errors", "Token procedure faults: busy (ca.maxQueued), timeout (ca.timeout),"
            " overdue (refused: ca.maxOverdue calls past ca.timeout), error.",
            ["kind"], registry=r,
        )
        self._store_errors = Counter(
            "estgw_store_errors", "Requests answered 503 because the store failed.", registry=r
        )
        self._tls_failures = Counter(
            "estgw_tls_handshake_failures", "TLS handshakes that failed, by OpenSSL's reason.", ["reason"],
            registry=r,
        )
        self._pending = Gauge("estgw_pending_approvals", "Enrollments waiting for an operator's approval.", registry=r)
        self._expiring = Gauge(
            "estgw_certificates_expiring",
            "Certificates issued here, not revoked, that expire within the given number of days.",
            ["days"], registry=r,
        )
        self._queued = Gauge(
            "estgw_threadpool_queued", "Work waiting for a free thread, by thread pool.", ["pool"], registry=r
        )
        self._ca_in_flight = Gauge(
            "estgw_ca_in_flight", "Enrollments waiting for or inside a token procedure.", registry=r
        )
        self._ca_overdue = Gauge(
            "estgw_ca_overdue", "Token procedure calls still running past ca.timeout.", registry=r
        )
        ProcessCollector(registry=r)
        # Refreshed before each scrape (set by estgw.tap).
        self._refreshers: list[Callable[[], Awaitable[None] | None]] = []

    # -- the request path

    def response(self, operation: str, status: int, seconds: float) -> None:
        self._responses.labels(operation, str(status)).inc()
        self._latency.labels(operation).observe(seconds)

    def refusal(self, code: str) -> None:
        self._refusals.labels(code).inc()

    def certificate_issued(self, operation: str) -> None:
        self._issued.labels(operation).inc()

    def ca_error(self, kind: str) -> None:
        self._ca_errors.labels(kind).inc()

    def store_error(self) -> None:
        self._store_errors.inc()

    def tls_handshake_failure(self, reason: str) -> None:
        self._tls_failures.labels(reason).inc()

    # -- counts so far, as plain mappings (tests, the health endpoint)

    @staticmethod
    def _counts(counter: Counter, *labels: str) -> collections.Counter[Any]:
        counts: collections.Counter[Any] = collections.Counter()
        for metric in counter.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    key = tuple(sample.labels[label] for label in labels)
                    counts[key if len(key) > 1 else key[0]] += int(sample.value)
        return counts

    @property
    def responses(self) -> collections.Counter[tuple[str, int]]:
        """(operation, status) -> responses; 0 for any not seen."""
        counts = self._counts(self._responses, "operation", "status")
        return collections.Counter({(op, int(status)): n for (op, status), n in counts.items()})

    @property
    def refusals(self) -> collections.Counter[str]:
        """Refusal code -> count."""
        return self._counts(self._refusals, "code")

    @property
    def issued(self) -> collections.Counter[str]:
        """Operation -> certificates issued."""
        return self._counts(self._issued, "operation")

    # -- read when scraped

    def watch(self, store: Any = None, ca_guard: Any = None, pools: dict[str, Any] | None = None,
              clock: Any = None) -> None:
        """Read these when scraped: the store (pending approvals, expiring
        certificates), the CA guard, thread pools (name -> a callable that
        returns the ThreadPool, or None while there is none)."""
        if ca_guard is not None:
            self._ca_in_flight.set_function(lambda: ca_guard.in_flight)
            self._ca_overdue.set_function(lambda: sum(ca_guard.overdue.values()))
        for name, pool in (pools or {}).items():
            self._queued.labels(name).set_function(functools.partial(_backlog, pool))
        if store is not None:
            async def refresh() -> None:
                now = datetime.fromtimestamp(clock.seconds(), timezone.utc) if clock else datetime.now(timezone.utc)
                self._pending.set(len(await store.list_approvals("pending")))
                until = now + timedelta(days=self.expiring_days)
                self._expiring.labels(str(self.expiring_days)).set(await store.count_expiring(now, until))

            self._refreshers.append(refresh)

    async def refresh(self) -> None:
        for refresher in self._refreshers:
            result = refresher()
            if result is not None:
                await result

    def render(self) -> bytes:
        """The Prometheus text format (0.0.4) of everything counted so far."""
        return generate_latest(self.registry)


def _backlog(pool: Callable[[], Any]) -> float:
    # twisted's ThreadPool keeps its queue in a Team (no public accessor).
    team = getattr(pool(), "_team", None)
    if team is None:
        return 0.0
    return float(team.statistics().backloggedWorkCount)


class MetricsResource(Leaf):
    """``GET /metrics`` (and HEAD); any other method 405."""

    takes = "/metrics takes GET or HEAD"
    not_found = _NOT_FOUND
    _log = Logger()

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> Any:
        async def serve() -> None:
            try:
                await self._metrics.refresh()
            except Exception:
                # The counters still tell; the gauges keep their last values.
                self._log.failure("reading the store for /metrics")
            respond(request, 200, self._metrics.render(), CONTENT_TYPE_PLAIN_0_0_4)

        def failed(failure: Any) -> None:
            self._log.failure("while serving /metrics", failure)
            text(request, 500, "internal error")

        defer.Deferred.fromCoroutine(serve()).addErrback(failed)
        return server.NOT_DONE_YET


#: The largest request body the metrics listener reads (it serves GET only).
METRICS_MAX_BODY = 4096


def metrics_site(metrics: Metrics, config: Any = None) -> Any:
    """The ``GET /metrics`` site, with the ``server.*`` request limits of ``config``."""
    from estgw.web import limited_site

    root = Branch(_NOT_FOUND)
    root.putChild(b"metrics", MetricsResource(metrics))
    return limited_site(root, METRICS_MAX_BODY, config, metrics)
