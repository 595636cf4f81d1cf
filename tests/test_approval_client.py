"""The approval client against an in-memory service: StubTreq and a Clock."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error, task
from twisted.trial.unittest import SynchronousTestCase

from estgw.approval.client import ApprovalClient, ApprovalStatus, ApprovalUnavailable, Submission
from estgw.approval.testing import FakeApprovalService

URL = "https://approval.test/approval/requests"


def submission(request_id: str = "req-00000001") -> Submission:
    return Submission(
        request_id=request_id,
        handler="3",
        subject="CN=pump-17",
        public_key_sha256="ab" * 32,
        requester="device:pump-17",
        csr_pem="-----BEGIN CERTIFICATE REQUEST-----\n...\n-----END CERTIFICATE REQUEST-----\n",
        expires_at=datetime(2030, 1, 1, tzinfo=timezone.utc),
    )


class _Refusing:
    """An HTTP client whose every connection is refused."""

    def __init__(self) -> None:
        self.attempts = 0

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred:
        self.attempts += 1
        return defer.fail(error.ConnectionRefusedError("nobody listens"))


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = FakeApprovalService()
        self.stub = StubTreq(self.service)
        self.clock = task.Clock()
        self.client = ApprovalClient(URL, self.stub, self.clock, timeout=5, max_backoff=60)

    def result(self, d: defer.Deferred) -> Any:
        self.stub.flush()
        return self.successResultOf(d)

    def failure(self, d: defer.Deferred) -> ApprovalUnavailable:
        self.stub.flush()
        return self.failureResultOf(d, ApprovalUnavailable).value

    def test_submit_posts_documented_json(self) -> None:
        """submit POSTs the documented JSON fields to idm.requestUrl and
        returns the service's status."""
        status = self.result(self.client.submit(submission()))
        self.assertEqual(status, ApprovalStatus("req-00000001", "pending"))
        self.assertEqual(self.service.calls, [("POST", "/approval/requests")])
        stored = self.service.requests["req-00000001"]
        for key in ("requestId", "handler", "subject", "publicKeySha256", "requester", "csr", "expiresAt"):
            self.assertIn(key, stored)
        self.assertEqual(stored["expiresAt"], "2030-01-01T00:00:00+00:00")

    def test_submit_twice_is_one_request(self) -> None:
        """Submitting the same request id again creates nothing new."""
        self.result(self.client.submit(submission()))
        self.result(self.client.submit(submission()))
        self.assertEqual(self.service.submissions, 1)

    def test_status_reads_decision(self) -> None:
        """status GETs <requestUrl>/<id> and carries the operator's reason."""
        self.result(self.client.submit(submission()))
        self.service.decide("req-00000001", "rejected", "unknown device", by="CN=alice")
        status = self.result(self.client.status("req-00000001"))
        self.assertEqual(status, ApprovalStatus("req-00000001", "rejected", "unknown device", "CN=alice"))
        self.assertEqual(self.service.calls[-1], ("GET", "/approval/requests/req-00000001"))

    def test_status_unknown_is_none(self) -> None:
        """A 404 for the status means the service does not know the request."""
        self.assertIsNone(self.result(self.client.status("req-00000009")))

    def test_5xx_is_unavailable(self) -> None:
        """A 5xx answer is ApprovalUnavailable with the status and the service's error."""
        self.service.mode = "error"
        reason = self.failure(self.client.submit(submission())).reason
        self.assertEqual(reason, "HTTP 503: maintenance")

    def test_garbage_is_unavailable(self) -> None:
        """A 200 whose body is not JSON is ApprovalUnavailable, not a crash."""
        self.service.mode = "garbage"
        self.assertEqual(self.failure(self.client.submit(submission())).reason, "the answer is not JSON")

    def test_unknown_status_is_unavailable(self) -> None:
        """JSON with a status outside the contract is refused as garbage."""
        self.result(self.client.submit(submission()))
        self.service.requests["req-00000001"]["status"] = "maybe"
        reason = self.failure(self.client.status("req-00000001")).reason
        self.assertIn("no known status", reason)

    def test_answer_about_another_request(self) -> None:
        """An answer naming another request id is not taken as this one's status."""
        self.result(self.client.submit(submission()))
        self.service.requests["req-00000001"]["requestId"] = "req-00000002"
        reason = self.failure(self.client.status("req-00000001")).reason
        self.assertEqual(reason, "the answer is about another request")

    def test_json_that_is_not_an_object(self) -> None:
        """A JSON list instead of an object is garbage too."""
        self.assertRaises(ApprovalUnavailable, ApprovalStatus.from_json, ["pending"], "x")
        self.assertRaises(ApprovalUnavailable, ApprovalStatus.from_json, json.loads("null"), "x")

    def test_timeout(self) -> None:
        """A service that never answers fails the call after `timeout`
        seconds of the injected clock, not before."""
        self.service.mode = "hang"
        d = self.client.submit(submission())
        self.stub.flush()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.assertEqual(self.failureResultOf(d, ApprovalUnavailable).value.reason, "no answer within 5 s")

    def test_connection_refused(self) -> None:
        """No listener: ApprovalUnavailable naming the connection failure."""
        client = ApprovalClient(URL, _Refusing(), self.clock, timeout=5)
        reason = self.failureResultOf(client.submit(submission()), ApprovalUnavailable).value.reason
        self.assertIn("ConnectionRefusedError", reason)

    def test_backoff_skips_network_then_retries(self) -> None:
        """After a failure, calls within the backoff window fail at once
        without a request; after it, the service is asked again."""
        http = _Refusing()
        client = ApprovalClient(URL, http, self.clock, timeout=5, max_backoff=60, min_backoff=1)
        self.failureResultOf(client.submit(submission()), ApprovalUnavailable)
        self.assertEqual(http.attempts, 1)
        skipped = self.failureResultOf(client.submit(submission()), ApprovalUnavailable).value
        self.assertEqual(http.attempts, 1)
        self.assertIn("not asking again for 1 s", skipped.reason)
        self.assertIn("ConnectionRefusedError", skipped.reason)
        self.clock.advance(1)
        self.failureResultOf(client.submit(submission()), ApprovalUnavailable)
        self.assertEqual(http.attempts, 2)
        self.assertEqual(client.seconds_until_retry(), 2)  # doubled

    def test_backoff_is_capped(self) -> None:
        """The backoff window doubles up to max_backoff and no further."""
        http = _Refusing()
        client = ApprovalClient(URL, http, self.clock, timeout=5, max_backoff=10, min_backoff=1)
        windows = []
        for _ in range(6):
            self.failureResultOf(client.submit(submission()), ApprovalUnavailable)
            windows.append(client.seconds_until_retry())
            self.clock.advance(windows[-1])
        self.assertEqual(windows, [1, 2, 4, 8, 10, 10])
        self.assertEqual(http.attempts, 6)

    def test_success_resets_backoff(self) -> None:
        """Once the service answers again, the next failure starts small."""
        self.service.mode = "error"
        for _ in range(3):
            self.failure(self.client.submit(submission()))
            self.clock.advance(self.client.seconds_until_retry())
        self.service.mode = "ok"
        self.result(self.client.submit(submission()))
        self.assertEqual(self.client.seconds_until_retry(), 0)
        self.service.mode = "error"
        self.failure(self.client.submit(submission()))
        self.assertEqual(self.client.seconds_until_retry(), 1)
