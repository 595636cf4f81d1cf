"""The gateway's approval state machine: a real SQLite store, a fake
approval client, a Clock for time."""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from twisted.internet import defer, task
from twisted.trial.unittest import TestCase

from tests.test_auth import AuditLog
from estgw.approval.client import ApprovalStatus, ApprovalUnavailable, Submission
from estgw.approval.gate import ApprovalGate, request_key
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.config import HandlerConfig
from estgw.refusal import Pending, Refusal
from estgw.store import SQLiteStore
from estgw.testing import make_csr, new_key

HANDLER = HandlerConfig(
    id="3",
    operation="simpleenroll",
    filter="registersimpleenroll-basic-idm-auth",
    format="est-simpleenroll-idm",
    token_procedure="P",
    authtype="Basic",
    realm="r",
    idm_request_url="https://approval.test/approval/requests",
    idm_token="/dev/null",
    idm_password="x",
    idm_retry_after=7,
    idm_pending_lifetime=3600,
)
START = 1_750_000_000.0


class FakeClient:
    """An approval service in memory, with the ApprovalClient interface."""

    def __init__(self) -> None:
        self.statuses: dict[str, ApprovalStatus] = {}
        self.submit_calls: list[Submission] = []
        self.status_calls: list[str] = []
        self.fail: str | None = None
        self.fail_after_receiving = False  # the service got it, the answer was lost

    @property
    def known(self) -> int:
        return len(self.statuses)

    def decide(self, request_id: str, status: str, reason: str | None = None) -> None:
        self.statuses[request_id] = ApprovalStatus(request_id, status, reason, "CN=operator")

    def submit(self, submission: Submission) -> defer.Deferred:
        self.submit_calls.append(submission)
        if self.fail and not self.fail_after_receiving:
            return defer.fail(ApprovalUnavailable(self.fail))
        status = self.statuses.setdefault(submission.request_id, ApprovalStatus(submission.request_id, "pending"))
        if self.fail:
            return defer.fail(ApprovalUnavailable(self.fail))
        return defer.succeed(status)

    def status(self, request_id: str) -> defer.Deferred:
        self.status_calls.append(request_id)
        if self.fail:
            return defer.fail(ApprovalUnavailable(self.fail))
        return defer.succeed(self.statuses.get(request_id))


class Signer:
    """Counts signatures; ``hold`` makes them wait until released."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        self.calls = 0
        self.hold = False
        self.waiting: list[defer.Deferred] = []

    def __call__(self, csr: x509.CertificateSigningRequest) -> Any:
        def sign() -> defer.Deferred:
            self.calls += 1
            certificate = self.ca.sign(IssueRequest(csr.subject, csr.public_key()), Profile())
            if not self.hold:
                return defer.succeed(certificate)
            d: defer.Deferred = defer.Deferred()
            self.waiting.append(d)
            d.addCallback(lambda _: certificate)
            return d

        return sign

    def release(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)


class GateTests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "estgw.sqlite")
        self.clock = task.Clock()
        self.clock.advance(START)
        self.client = FakeClient()
        self.ca = LocalCA.load_or_create(os.path.join(self.directory, "ca"), "test")
        self.signer = Signer(self.ca)
        self.csr = make_csr(new_key(), "pump-17")

    async def open_store(self) -> SQLiteStore:
        store = SQLiteStore(self.path)
        await store.start()
        self.addCleanup(store.close)
        return store

    async def gate(self, store: SQLiteStore | None = None, client: Any = None) -> ApprovalGate:
        store = store or await self.open_store()
        self.store = store
        return ApprovalGate(HANDLER, store, client or self.client, self.clock)

    async def enroll(self, gate: ApprovalGate, csr: Any = None) -> x509.Certificate:
        csr = csr or self.csr
        return await gate.enroll(csr, "device:pump-17", self.signer(csr))

    async def refused(self, gate: ApprovalGate, status: int, code: str) -> Refusal:
        try:
            await self.enroll(gate)
        except Refusal as refusal:
            self.assertEqual((refusal.status, refusal.code), (status, code), refusal.reason)
            return refusal
        self.fail(f"expected {status} {code}, got a certificate")

    async def pending(self, gate: ApprovalGate) -> Pending:
        refusal = await self.refused(gate, 202, "approval-pending")
        self.assertIsInstance(refusal, Pending)
        return refusal  # type: ignore[return-value]

    async def wait_for(self, condition: Any, seconds: float = 5.0) -> None:
        """Let the store's threads run until ``condition()`` or ``seconds`` pass."""
        from twisted.internet import reactor

        for _ in range(int(seconds / 0.01)):
            if condition():
                return
            await task.deferLater(reactor, 0.01, lambda: None)

    async def only_row(self) -> Any:
        rows = await self.store.list_approvals()
        self.assertEqual(len(rows), 1)
        return rows[0]

    async def test_first_request_is_submitted_and_pending(self) -> None:
        """A first request is stored, submitted once, and answered 202 with
        Retry-After and the request id; nothing is issued."""
        gate = await self.gate()
        pending = await self.pending(gate)
        row = await self.only_row()
        self.assertEqual(pending.headers, {"Retry-After": "7"})
        self.assertIn(row.request_id, pending.reason)
        self.assertEqual((row.state, row.handler, row.subject), ("pending", "3", "CN=pump-17"))
        self.assertIsNotNone(row.submitted_at)
        self.assertEqual([s.request_id for s in self.client.submit_calls], [row.request_id])
        self.assertEqual(self.client.submit_calls[0].subject, "CN=pump-17")
        self.assertIn("BEGIN CERTIFICATE REQUEST", self.client.submit_calls[0].csr_pem)
        self.assertEqual(await self.store.count_certificates(), 0)
        self.assertEqual(self.signer.calls, 0)

    async def test_retry_while_pending_polls(self) -> None:
        """A retry of the same CSR (any connection) polls the status and
        does not submit again."""
        gate = await self.gate()
        await self.pending(gate)
        await self.pending(gate)
        row = await self.only_row()
        self.assertEqual(len(self.client.submit_calls), 1)
        self.assertEqual(self.client.status_calls, [row.request_id])

    async def test_approved_issues_once_and_sends_it_again(self) -> None:
        """Once approved, the retry gets a certificate; later retries get the
        same certificate without another signature."""
        gate = await self.gate()
        await self.pending(gate)
        row = await self.only_row()
        self.client.decide(row.request_id, "approved")
        first = await self.enroll(gate)
        second = await self.enroll(gate)
        self.assertEqual(first.serial_number, second.serial_number)
        self.assertEqual(self.signer.calls, 1)
        self.assertEqual(await self.store.count_certificates(), 1)
        row = await self.only_row()
        self.assertEqual((row.state, row.serial), ("issued", first.serial_number))
        recorded = await self.store.get_certificate(first.serial_number)
        self.assertEqual((recorded.handler, recorded.requester), ("3", "device:pump-17"))

    async def test_regenerated_csr_is_the_same_request(self) -> None:
        """A device that signs the same request again (a new ECDSA signature)
        gets the approved certificate."""
        key = new_key()
        gate = await self.gate()
        first = make_csr(key, "pump-17")
        with self.assertRaises(Pending):
            await self.enroll(gate, first)
        row = await self.only_row()
        self.client.decide(row.request_id, "approved")
        again = make_csr(key, "pump-17")
        self.assertNotEqual(again.signature, first.signature)
        certificate = await self.enroll(gate, again)
        self.assertEqual(certificate.subject.rfc4514_string(), "CN=pump-17")

    async def test_approved_request_cannot_be_swapped(self) -> None:
        """Once approved, a CSR with the same key and subject but other
        names is refused (409): the operator approved what was submitted,
        and nothing is issued for the swapped request."""
        key = new_key()
        gate = await self.gate()
        with self.assertRaises(Pending):
            await self.enroll(gate, make_csr(key, "pump-17"))
        row = await self.only_row()
        self.client.decide(row.request_id, "approved")
        swapped = make_csr(key, "pump-17", sans=[x509.DNSName("bank.example")])
        try:
            await self.enroll(gate, swapped)
        except Refusal as refusal:
            self.assertEqual((refusal.status, refusal.code), (409, "approval-request-differs"))
            self.assertIn(row.request_id, refusal.reason)
        else:
            self.fail("a swapped request was issued")
        self.assertEqual(self.signer.calls, 0)
        self.assertEqual(await self.store.count_certificates(), 0)

    async def test_rejected_refused_with_reason(self) -> None:
        """A rejection is a 403 carrying the operator's reason, then and on
        every later retry, without asking the service again; nothing is issued."""
        gate = await self.gate()
        await self.pending(gate)
        row = await self.only_row()
        self.client.decide(row.request_id, "rejected", "unknown\nserial number")
        refusal = await self.refused(gate, 403, "approval-rejected")
        self.assertEqual(refusal.reason, "an operator rejected the request: unknown serial number")
        polls = len(self.client.status_calls)
        again = await self.refused(gate, 403, "approval-rejected")
        self.assertEqual(again.reason, refusal.reason)
        self.assertEqual(len(self.client.status_calls), polls)
        self.assertEqual(await self.store.count_certificates(), 0)
        self.assertEqual(self.signer.calls, 0)

    async def test_service_down_then_back(self) -> None:
        """With the service down the device gets 503 + Retry-After and a
        reason, the request is kept unsubmitted; when the service is back,
        it is submitted (once) and the device gets 202."""
        gate = await self.gate()
        self.client.fail = "HTTP 503: maintenance"
        audit = AuditLog(self)
        refusal = await self.refused(gate, 503, "approval-service-unavailable")
        self.assertEqual(refusal.headers, {"Retry-After": "7"})
        # The cause goes to the operator's log, not to the device.
        self.assertNotIn("HTTP 503: maintenance", refusal.reason)
        self.assertIn("the approval service is unavailable", refusal.reason)
        self.assertEqual(audit.causes("approval-service-unavailable"), ["HTTP 503: maintenance"])
        row = await self.only_row()
        self.assertIsNone(row.submitted_at)
        self.assertEqual(self.client.known, 0)
        self.client.fail = None
        await self.pending(gate)
        await self.pending(gate)
        self.assertEqual(self.client.known, 1)
        self.assertEqual({s.request_id for s in self.client.submit_calls}, {row.request_id})
        self.assertIsNotNone((await self.only_row()).submitted_at)
        self.assertEqual(await self.store.count_certificates(), 0)

    async def test_lost_acknowledgement_is_one_request(self) -> None:
        """A submission the service received but whose answer was lost is
        sent again with the same request id: still one request there."""
        gate = await self.gate()
        self.client.fail = "no answer within 5 s"
        self.client.fail_after_receiving = True
        await self.refused(gate, 503, "approval-service-unavailable")
        self.client.fail = None
        await self.pending(gate)
        self.assertEqual(len(self.client.submit_calls), 2)
        self.assertEqual(len({s.request_id for s in self.client.submit_calls}), 1)
        self.assertEqual(self.client.known, 1)

    async def test_service_forgot_request(self) -> None:
        """A service that no longer knows a submitted request (404) gets it
        again under the same id."""
        gate = await self.gate()
        await self.pending(gate)
        row = await self.only_row()
        del self.client.statuses[row.request_id]
        await self.pending(gate)
        self.assertEqual([s.request_id for s in self.client.submit_calls], [row.request_id] * 2)
        self.assertEqual(len(await self.store.list_approvals()), 1)

    async def test_pending_expires(self) -> None:
        """A request undecided after idm.pendingLifetime is refused once as
        expired; the next POST starts a new request."""
        gate = await self.gate()
        await self.pending(gate)
        old = await self.only_row()
        self.clock.advance(3600)
        refusal = await self.refused(gate, 403, "approval-expired")
        self.assertIn("1 hour", refusal.reason)
        self.assertEqual((await self.store.get_approval(old.request_id)).state, "expired")
        await self.pending(gate)
        rows = await self.store.list_approvals()
        self.assertEqual([r.state for r in rows], ["pending", "expired"])
        self.assertNotEqual(rows[0].request_id, old.request_id)
        self.assertEqual(len(self.client.submit_calls), 2)
        self.assertEqual(await self.store.count_certificates(), 0)

    async def test_service_says_expired(self) -> None:
        """A service that reports the request expired ends it here too."""
        gate = await self.gate()
        await self.pending(gate)
        row = await self.only_row()
        self.client.decide(row.request_id, "expired")
        await self.refused(gate, 403, "approval-expired")
        self.assertEqual((await self.only_row()).state, "expired")
        self.assertEqual(await self.store.count_certificates(), 0)

    async def test_approval_not_collected_expires(self) -> None:
        """An approval learnt but not collected within the lifetime expires:
        nothing is issued for it later."""
        gate = await self.gate()
        await self.pending(gate)
        row = await self.only_row()
        self.client.decide(row.request_id, "approved")
        self.signer.hold = True
        d = defer.ensureDeferred(self.enroll(gate))
        await self.wait_for(lambda: bool(self.signer.waiting))
        self.assertEqual((await self.only_row()).state, "approved")
        self.signer.hold = False
        self.signer.waiting.pop().errback(RuntimeError("CA unavailable"))
        with self.assertRaises(RuntimeError):
            await d
        self.clock.advance(3600)
        await self.refused(gate, 403, "approval-expired")
        self.assertEqual(await self.store.count_certificates(), 0)

    async def test_signing_failure_keeps_approval(self) -> None:
        """If signing fails after approval, the approval stays and the next
        retry issues."""
        gate = await self.gate()
        await self.pending(gate)
        self.client.decide((await self.only_row()).request_id, "approved")
        self.signer.hold = True
        d = defer.ensureDeferred(self.enroll(gate))
        await self.wait_for(lambda: bool(self.signer.waiting))
        self.signer.waiting.pop().errback(RuntimeError("CA unavailable"))
        with self.assertRaises(RuntimeError):
            await d
        self.signer.hold = False
        certificate = await self.enroll(gate)
        self.assertEqual((await self.only_row()).serial, certificate.serial_number)
        self.assertEqual(await self.store.count_certificates(), 1)

    async def test_concurrent_retries_issue_once(self) -> None:
        """Two retries at once after approval: one signature, one recorded
        certificate, both devices get it."""
        gate = await self.gate()
        await self.pending(gate)
        self.client.decide((await self.only_row()).request_id, "approved")
        self.signer.hold = True
        first = defer.ensureDeferred(self.enroll(gate))
        second = defer.ensureDeferred(self.enroll(gate))
        await self.wait_for(lambda: len(self.signer.waiting) == 1)
        await self.wait_for(lambda: False, seconds=0.2)  # the second retry waits its turn
        self.assertEqual(len(self.signer.waiting), 1)
        self.signer.release()
        a, b = await first, await second
        self.assertEqual(a.serial_number, b.serial_number)
        self.assertEqual(self.signer.calls, 1)
        self.assertEqual(await self.store.count_certificates(), 1)

    async def test_two_processes_issue_once(self) -> None:
        """Two gateways sharing one store (two connections, two gates, no
        shared lock) racing on one approval record one certificate, and
        both send that one."""
        gate_a = await self.gate()
        await self.pending(gate_a)
        self.client.decide((await self.only_row()).request_id, "approved")
        store_b = await self.open_store()
        gate_b = ApprovalGate(HANDLER, store_b, self.client, self.clock)
        self.signer.hold = True
        first = defer.ensureDeferred(self.enroll(gate_a))
        second = defer.ensureDeferred(self.enroll(gate_b))
        await self.wait_for(lambda: len(self.signer.waiting) == 2)
        self.signer.release()
        a, b = await first, await second
        self.assertEqual(a.serial_number, b.serial_number)
        self.assertEqual(await self.store.count_certificates(), 1)

    async def test_restart_between_approval_and_retry(self) -> None:
        """A gateway restarted (new store connection, new gate) after the
        operator approved issues on the next retry, once."""
        store = await self.open_store()
        await self.pending(await self.gate(store))
        request_id = (await self.only_row()).request_id
        await store.close()
        self.client.decide(request_id, "approved")
        gate = await self.gate(await self.open_store(), FakeClient())
        gate.client.statuses = self.client.statuses
        certificate = await self.enroll(gate)
        again = await self.enroll(await self.gate(await self.open_store(), FakeClient()))
        self.assertEqual(certificate.serial_number, again.serial_number)
        self.assertEqual(await self.store.count_certificates(), 1)
        self.assertEqual(gate.client.submit_calls, [])  # polled, never submitted twice

    async def test_other_subject_is_other_request(self) -> None:
        """The same key with another subject is another request; the
        connection plays no part in recognising a request."""
        gate = await self.gate()
        key = new_key()
        for subject in ("pump-17", "pump-18", "pump-17"):
            with self.assertRaises(Pending):
                csr = make_csr(key, subject)
                await gate.enroll(csr, "device:x", self.signer(csr))
        rows = await self.store.list_approvals()
        self.assertEqual(sorted(r.subject for r in rows), ["CN=pump-17", "CN=pump-18"])
        self.assertEqual(request_key("3", make_csr(key, "a"))[1], request_key("3", make_csr(key, "b"))[1])

    async def test_revoked_certificate_not_sent_again(self) -> None:
        """After the certificate issued for a request is revoked, the same
        request asks for a new approval instead of getting it back."""
        gate = await self.gate()
        await self.pending(gate)
        self.client.decide((await self.only_row()).request_id, "approved")
        certificate = await self.enroll(gate)
        await self.store.revoke_certificate(certificate.serial_number, "keyCompromise")
        await self.pending(gate)
        rows = await self.store.list_approvals()
        self.assertEqual([r.state for r in rows], ["pending", "issued"])
        self.assertEqual(await self.store.count_certificates(), 1)
