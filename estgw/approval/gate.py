"""The gateway's side of manual approval, for one handler.

A request is recognised across retries by (handler, SHA-256 of the CSR's
public key, CSR subject), never by the connection.  Its life, in the
store (:class:`estgw.store.Approval`):

* first POST: a pending row with a fresh request id, submitted to the
  approval service (the submission is recorded, so it is made again
  only if the service did not acknowledge it); the device gets 202;
* later POSTs while pending: the service is asked for the status; 202;
* approved: the certificate is issued, and the row moves to issued and
  the certificate is recorded in one transaction, so it is issued exactly
  once even when retries race (an in-process lock per request, and the
  conditional state change across processes); a later retry of the same
  request gets the same certificate;
* rejected: 403 with the operator's reason;
* not decided within ``idm.pendingLifetime`` (or a decision not fetched
  within that time after it was learnt): 403 once, and the next POST
  starts a new request;
* the service unreachable, slow or answering garbage: 503 with
  Retry-After; the row stays, and the next retry carries on.
"""

from __future__ import annotations

import hashlib
import uuid
from contextlib import nullcontext
from datetime import datetime, timedelta, timezone
from typing import Any, AsyncContextManager, Awaitable, Callable, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import DeferredLock
from twisted.logger import Logger

from estgw.approval.client import ApprovalClient, ApprovalStatus, ApprovalUnavailable, Submission
from estgw.config import HandlerConfig
from estgw.escape import printable
from estgw.refusal import Pending, Refusal
from estgw.store import Approval, IssuedCertificate, IStore
from estgw.serials import format_serial

__all__ = ["ApprovalGate", "request_key"]

Key = tuple[str, str, str]
_REASON_LIMIT = 300
# The audit log, as for every other outcome of an enrollment.
_audit = Logger(namespace="estgw.audit")


def request_key(handler_id: str, csr: x509.CertificateSigningRequest) -> Key:
    """(handler, SHA-256 of the SubjectPublicKeyInfo, subject): one request."""
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return (handler_id, hashlib.sha256(spki).hexdigest(), csr.subject.rfc4514_string())


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def _one_line(text: str | None) -> str:
    # The operator's words go into a one-line response body and the log.
    cleaned = " ".join((text or "").split())
    return printable(cleaned[:_REASON_LIMIT]) or "no reason given"


def _same_request(row: Approval, csr: x509.CertificateSigningRequest) -> None:
    """The operator approves what was submitted: a retry with the same key
    and subject but other names or extensions is not that request.  The
    signed part is compared, not the signature (ECDSA signs differently
    each time a device regenerates the same CSR)."""
    submitted = x509.load_der_x509_csr(row.csr)
    if submitted.tbs_certrequest_bytes != csr.tbs_certrequest_bytes:
        raise Refusal(
            409,
            "approval-request-differs",
            f"request {row.request_id} for this key and subject was submitted for approval with other"
            f" contents ({row.state}); send the CSR that was submitted, or a new key",
        )


class ApprovalGate:
    """Decides, for each enrollment on one handler, 202 / certificate / refusal."""

    def __init__(
        self,
        handler: HandlerConfig,
        store: IStore,
        client: ApprovalClient,
        clock: Any,
        new_request_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.handler = handler
        self.client = client
        self._store = store
        self._clock = clock
        self._new_request_id = new_request_id
        self._locks: dict[Key, DeferredLock] = {}
        self._lifetime = timedelta(seconds=handler.idm_pending_lifetime)
        self._retry_after = handler.idm_retry_after

    async def enroll(
        self,
        csr: x509.CertificateSigningRequest,
        requester: str,
        sign: Callable[[], Awaitable[x509.Certificate]],
        claim: Callable[[], AsyncContextManager[None]] | None = None,
    ) -> x509.Certificate:
        """The certificate for ``csr`` once approved; else raise Pending or Refusal.

        ``sign`` issues a certificate for the (checked) request; it is
        called only for an approved request, at most once per request in
        this process.  ``claim`` (e.g. a single-use registration) is held
        around signing and recording.
        """
        key = request_key(self.handler.id, csr)
        lock = self._locks.setdefault(key, DeferredLock())
        await lock.acquire()
        try:
            return await self._step(key, csr, requester, sign, claim or nullcontext)
        finally:
            lock.release()
            if not lock.locked and not lock.waiting:
                self._locks.pop(key, None)

    # -- the state machine

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), timezone.utc)

    async def _step(
        self,
        key: Key,
        csr: x509.CertificateSigningRequest,
        requester: str,
        sign: Callable[[], Awaitable[x509.Certificate]],
        claim: Callable[[], AsyncContextManager[Any]],
    ) -> x509.Certificate:
        now = self._now()
        row = await self._store.find_approval(*key)
        if row is not None and row.state in ("pending", "approved") and now >= row.expires_at:
            await self._expire(row, now)
        if row is not None and row.state == "issued" and now < row.expires_at:
            certificate = await self._issued_certificate(row)
            if certificate is not None:
                return certificate
        if row is None or row.state in ("expired", "issued") or now >= row.expires_at:
            row = await self._store.add_approval(self._new_row(key, csr, requester, now))
        if row.state in ("pending", "approved"):
            _same_request(row, csr)
        if row.state == "pending":
            row = await self._ask_service(row, csr, now)
        if row.state == "approved":
            return await self._issue(row, sign, claim)
        if row.state == "issued":  # by another gateway process, just now
            certificate = await self._issued_certificate(row)
            if certificate is not None:
                return certificate
        if row.state == "rejected":
            raise Refusal(403, "approval-rejected", f"an operator rejected the request: {_one_line(row.reason)}")
        raise Pending(
            "approval-pending",
            f"the request awaits an operator's approval (request {row.request_id});"
            f" retry in {self._retry_after} seconds",
            self._retry_after,
        )

    def _new_row(self, key: Key, csr: x509.CertificateSigningRequest, requester: str, now: datetime) -> Approval:
        handler, public_key_sha256, subject = key
        return Approval(
            request_id=self._new_request_id(),
            handler=handler,
            public_key_sha256=public_key_sha256,
            subject=subject,
            requester=requester,
            csr=csr.public_bytes(Encoding.DER),
            created_at=now,
            expires_at=now + self._lifetime,
        )

    async def _expire(self, row: Approval, now: datetime) -> NoReturn:
        """Mark the request expired (once) and refuse: 403 approval-expired."""
        if await self._store.expire_approval(row.request_id, now):
            _audit.info(
                "approval request {request_id} for {subject} expired", request_id=row.request_id,
                subject=printable(row.subject), event="approval-expired",
            )
        raise Refusal(
            403,
            "approval-expired",
            f"the request was not completed within {_duration(self.handler.idm_pending_lifetime)}"
            f" (request {row.request_id}); send it again to ask for a new approval",
        )

    async def _issued_certificate(self, row: Approval) -> x509.Certificate | None:
        """The certificate issued for ``row``, unless it was revoked since."""
        if row.serial is None:
            return None
        issued = await self._store.get_certificate(row.serial)
        if issued is None or issued.revoked:
            return None
        _audit.info(
            "sent again serial {serial} for approval request {request_id}",
            serial=format_serial(row.serial), request_id=row.request_id, event="reissued",
        )
        return issued.certificate

    async def _ask_service(self, row: Approval, csr: x509.CertificateSigningRequest, now: datetime) -> Approval:
        """Submit (once) or poll; record a decision.  503 when the service fails."""
        try:
            status = await self._status_from_service(row, csr, now)
        except ApprovalUnavailable as e:
            # The cause (an exception, a TLS error) is for the operator's
            # log; the device is told what it can act on.
            _audit.warn(
                "approval service unavailable for request {request_id}: {why}",
                request_id=row.request_id, why=e.reason, event="approval-service-unavailable",
            )
            raise Refusal(
                503,
                "approval-service-unavailable",
                "the approval service is unavailable; the request"
                f" {row.request_id} is kept: retry later",
                {"Retry-After": str(self._retry_after)},
            ) from None
        if status.status == "pending":
            return row
        if status.status == "expired":
            await self._expire(row, now)
        decided = await self._store.decide_approval(
            row.request_id, status.status, status.reason, now + self._lifetime, now
        )
        assert decided is not None  # rows are never deleted
        if decided.state == status.status:
            # The operator's decision, in the store's audit table too.
            await self._store.add_audit(
                now, status.decided_by or "the approval service", f"approval-{status.status}",
                f"approval request {row.request_id}",
                row.subject + (f": {_one_line(status.reason)}" if status.status == "rejected" else ""),
            )
            _audit.info(
                "approval request {request_id} for {subject} {state} by {operator}{because}",
                request_id=row.request_id, subject=printable(row.subject), state=status.status,
                operator=printable(status.decided_by or "the approval service"),
                because=f": {_one_line(status.reason)}" if status.status == "rejected" else "",
                event=f"approval-{status.status}",
            )
        return decided

    async def _status_from_service(
        self, row: Approval, csr: x509.CertificateSigningRequest, now: datetime
    ) -> ApprovalStatus:
        if row.submitted_at is not None:
            status = await self.client.status(row.request_id)
            if status is not None:
                return status
            # The service does not know it (lost, or reset): submit again.
            # The request id is the same, so it cannot become two requests.
        status = await self.client.submit(self._submission(row, csr))
        if row.submitted_at is None:
            await self._store.set_approval_submitted(row.request_id, now)
            _audit.info(
                "submitted approval request {request_id} for {subject} from {requester}",
                request_id=row.request_id, subject=printable(row.subject), requester=printable(row.requester),
                event="approval-submitted",
            )
        return status

    def _submission(self, row: Approval, csr: x509.CertificateSigningRequest) -> Submission:
        return Submission(
            request_id=row.request_id,
            handler=row.handler,
            subject=row.subject,
            public_key_sha256=row.public_key_sha256,
            requester=row.requester,
            csr_pem=csr.public_bytes(Encoding.PEM).decode("ascii"),
            expires_at=row.expires_at,
        )

    async def _issue(
        self,
        row: Approval,
        sign: Callable[[], Awaitable[x509.Certificate]],
        claim: Callable[[], AsyncContextManager[Any]],
    ) -> x509.Certificate:
        async with claim():
            certificate = await sign()
            issued = IssuedCertificate.from_certificate(certificate, row.handler, row.requester, self._now())
            recorded = await self._store.issue_approved(row.request_id, issued)
        if recorded:
            _audit.info(
                "issued serial {serial} subject {subject} to {requester} by handler {handler}"
                " after approval {request_id}",
                serial=format_serial(certificate.serial_number), subject=printable(certificate.subject.rfc4514_string()),
                requester=printable(row.requester), handler=row.handler, request_id=row.request_id, event="issued",
            )
            return certificate
        # Another gateway process sharing the store issued first: send its
        # certificate; ours was never recorded nor sent.
        again = await self._store.get_approval(row.request_id)
        if again is not None and again.state == "issued":
            existing = await self._issued_certificate(again)
            if existing is not None:
                return existing
        raise Refusal(
            409, "approval-state-changed",
            f"the approval request {row.request_id} changed while it was being issued; retry",
            {"Retry-After": str(self._retry_after)},
        )
