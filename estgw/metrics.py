"""Counters and latencies of the EST endpoints, in the Prometheus text format.

One :class:`Metrics` per gateway records every response (operation,
status, time taken), every refusal by reason code and every certificate
issued.  ``metrics.port`` serves them as ``GET /metrics`` on a separate
plain-HTTP listener (loopback by default): they describe traffic, not
secrets, but are nothing devices need to reach.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Any, Mapping

from twisted.web import resource

# Upper bounds (seconds) of the latency histogram buckets.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(values: Mapping[str, str]) -> str:
    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in sorted(values.items())) + "}"


class Metrics:
    def __init__(self) -> None:
        self.responses: Counter[tuple[str, int]] = Counter()
        self.refusals: Counter[str] = Counter()
        self.issued: Counter[str] = Counter()
        # operation -> per-bucket counts (cumulated when rendered), sum, count
        self._latency: dict[str, list[int]] = {}
        self._latency_sum: dict[str, float] = {}

    def response(self, operation: str, status: int, seconds: float) -> None:
        self.responses[(operation, status)] += 1
        buckets = self._latency.setdefault(operation, [0] * (len(BUCKETS) + 1))
        buckets[bisect.bisect_left(BUCKETS, seconds)] += 1
        self._latency_sum[operation] = self._latency_sum.get(operation, 0.0) + seconds

    def refusal(self, code: str) -> None:
        self.refusals[code] += 1

    def certificate_issued(self, operation: str) -> None:
        self.issued[operation] += 1

    def render(self) -> bytes:
        lines = [
            "# HELP estgw_responses_total EST responses by operation and HTTP status.",
            "# TYPE estgw_responses_total counter",
        ]
        for (operation, status), n in sorted(self.responses.items()):
            lines.append(f"estgw_responses_total{_labels({'operation': operation, 'status': str(status)})} {n}")
        lines += [
            "# HELP estgw_refusals_total Refused requests by reason code (see README, Every refusal).",
            "# TYPE estgw_refusals_total counter",
        ]
        for code, n in sorted(self.refusals.items()):
            lines.append(f"estgw_refusals_total{_labels({'code': code})} {n}")
        lines += [
            "# HELP estgw_certificates_issued_total Certificates issued by operation.",
            "# TYPE estgw_certificates_issued_total counter",
        ]
        for operation, n in sorted(self.issued.items()):
            lines.append(f"estgw_certificates_issued_total{_labels({'operation': operation})} {n}")
        lines += [
            "# HELP estgw_request_seconds Time from request to response by operation.",
            "# TYPE estgw_request_seconds histogram",
        ]
        for operation, counts in sorted(self._latency.items()):
            running = 0
            for bound, n in zip(BUCKETS + (float("inf"),), counts):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"estgw_request_seconds_bucket{_labels({'operation': operation, 'le': le})} {running}")
            lines.append(f"estgw_request_seconds_sum{_labels({'operation': operation})} {self._latency_sum[operation]:.6f}")
            lines.append(f"estgw_request_seconds_count{_labels({'operation': operation})} {running}")
        return ("\n".join(lines) + "\n").encode("utf-8")


class MetricsResource(resource.Resource):
    """``GET /metrics``."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        body = self._metrics.render()
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        return body


def metrics_site(metrics: Metrics) -> Any:
    from twisted.web import server

    root = resource.Resource()
    root.putChild(b"metrics", MetricsResource(metrics))
    # No form parsing (see estgw.web.build_site).
    return server.Site(root, parsePOSTFormSubmission=False)
