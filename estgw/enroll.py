"""The handler pipeline for simpleenroll / simplereenroll.

filter (who) → parse → format (checks, rewrites) → store checks →
token procedure (issue) → store (record, committed) → certificates.
This is the only place that knows the order; each step is a function
elsewhere that raises :class:`Refusal` to stop it.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable, Mapping

import attr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.logger import Logger

from estgw import audit, auth, policy
from estgw.approval.gate import ApprovalGate
from estgw.guard import CAGuard
from estgw.ca import ITokenProcedure
from estgw.config import ENROLL_OPERATIONS, Config, HandlerConfig
from estgw.escape import printable
from estgw.metrics import Metrics
from estgw.protocol import parse_csr
from estgw.refusal import Refusal
from estgw.revocation import RevocationChecker
from estgw.store import DuplicateCertificate, IssuedCertificate, IStore, NotLastIssued
from estgw.tls import PeerInfo, channel_binding
from estgw.serials import format_serial

_log = Logger(namespace="estgw.audit")


@attr.s(auto_attribs=True)
class Gateway:
    """Everything a handler needs, built once by :mod:`estgw.tap`."""

    config: Config
    store: IStore
    procedures: Mapping[str, ITokenProcedure]
    ca_chain: list[x509.Certificate]
    portal: auth.DevicePortal
    reactor: Any = None
    # CRL files and OCSP (tls.crls, tls.ocsp); None: the store only.
    revocation: RevocationChecker | None = None
    # Manual approval: handler id -> its gate, for handlers with
    # filter registersimpleenroll-basic-idm-auth.
    approvals: Mapping[str, ApprovalGate] = attr.Factory(dict)
    metrics: Metrics = attr.Factory(Metrics)
    # serverkeygen: the certificate, key and chain that sign the keys the
    # gateway makes and sends encrypted (RFC 7030 §4.4.2): its TLS ones.
    key_signer: tuple[x509.Certificate, Any, tuple[x509.Certificate, ...]] | None = None
    # ca.maxQueued, ca.timeout and ca.maxOverdue around every token procedure call.
    ca_guard: CAGuard = attr.ib(default=None)

    def cacerts(self, label: str) -> list[x509.Certificate]:
        """What ``/cacerts`` under ``label`` returns (RFC 7030 4.1.3): the
        chain of the token procedure that issues under that label
        (simpleenroll's, else simplereenroll's), else the embedded CA's.

        Raises a 503 Refusal while the token procedure does not know its
        chain yet (an upstream EST server not reached so far).
        """
        for operation in ENROLL_OPERATIONS:
            handler = self.config.handler(label, operation)
            if handler is not None and handler.token_procedure in self.procedures:
                chain = self.procedures[handler.token_procedure].chain()
                if not chain:
                    raise Refusal(
                        503, "ca-certificates-unavailable",
                        "the CA certificates of this label are not known yet; try again later",
                        {"Retry-After": "30"},
                    )
                return chain
        return self.ca_chain

    def __attrs_post_init__(self) -> None:
        if self.ca_guard is None:
            clock = self.reactor
            if clock is None:
                from twisted.internet import reactor as clock
            self.ca_guard = CAGuard(
                self.config.ca_max_queued, self.config.ca_timeout, clock, self.metrics.ca_error,
                max_overdue=self.config.ca_max_overdue,
            )


async def _client_certificate_not_revoked(
    gateway: Gateway, identity: auth.Identity, peer: PeerInfo | None = None
) -> None:
    cert = identity.certificate
    if cert is None:
        return
    # The store is read on every request: `estgw cert revoke` needs no restart.
    # It records what every token procedure issued (the embedded CA, an
    # HSM key, an upstream CA), so the record is matched by the whole
    # certificate: a foreign certificate with an equal serial is not ours
    # to refuse.
    recorded = await gateway.store.get_certificate(cert.serial_number)
    if recorded is not None and recorded.revoked and recorded.der == cert.public_bytes(Encoding.DER):
        raise Refusal(403, "client-certificate-revoked", "the TLS client certificate has been revoked")
    if gateway.revocation is not None:
        await gateway.revocation.check(cert, peer.chain if peer is not None else ())


_NEWER_EXISTS = "renewal requires the certificate issued last for this subject; a newer one exists"


async def _renewing_last_issued(
    gateway: Gateway, identity: auth.Identity, ctx: policy.PolicyContext
) -> int | None:
    """With allowRenewalWithOldCertificates = true (the product's
    name reads backwards: true turns the check ON), only the certificate
    issued last for the subject may renew it, by any operation.

    A simpleenroll of a subject this gateway never issued is a first
    enrollment, not a renewal; a simplereenroll needs the record.  Returns
    the serial the new certificate renews (None: a first enrollment), for
    the store to check again when it records, so that of concurrent
    renewals with one certificate (in any gateway process) only one wins.
    """
    cert = identity.certificate
    assert cert is not None  # policy.renews_own_subject
    # The subject the certificate holds: a request may spell it in
    # another case, or add to it, and still renew it.
    last = await gateway.store.last_issued_for_subject(cert.subject.rfc4514_string())
    if last is None and ctx.operation != "simplereenroll":
        return None
    if last is None or last.serial != cert.serial_number:
        raise Refusal(
            403,
            "not-last-issued-certificate",
            _NEWER_EXISTS if last is not None else
            "renewal requires the certificate issued last for this subject; this gateway has no record of one",
        )
    return last.serial


async def _record(
    gateway: Gateway,
    certificate: x509.Certificate,
    handler: HandlerConfig,
    identity: auth.Identity,
    renewing: int | None = None,
) -> bool:
    """Record ``certificate``; False when this very certificate is recorded already.

    ``renewing``: the serial the certificate renews under the last-issued
    rule, checked again by the store as it records, so that of concurrent
    renewals with one certificate (in any gateway process) only one is
    recorded; the others are refused and their certificate never sent.

    A CA may answer a repeated request with the certificate it issued
    before (an upstream EST server asked again for a request it answered,
    or two identical requests that shared one upstream call): that is
    the same certificate sent again, not a second one.  Another
    certificate with a recorded serial is still an error.
    """
    try:
        await gateway.store.record_certificate(
            IssuedCertificate.from_certificate(certificate, handler.id, identity.requester),
            renewing=renewing,
        )
    except NotLastIssued:
        raise Refusal(403, "not-last-issued-certificate", _NEWER_EXISTS) from None
    except DuplicateCertificate:
        recorded = await gateway.store.get_certificate(certificate.serial_number)
        if recorded is None or recorded.der != certificate.public_bytes(Encoding.DER):
            raise
        _log.info(
            "sent again serial {serial} to {requester}: the CA answered with a certificate already recorded",
            serial=format_serial(certificate.serial_number), requester=printable(identity.requester), event="reissued",
        )
        return False
    return True


async def _sent_again(
    gateway: Gateway, identity: auth.Identity, csr: x509.CertificateSigningRequest
) -> x509.Certificate | None:
    """The certificate a consumed single-use registration already got for
    this CSR's key, if it got it within ``singleUse.refetchSeconds``.

    The device proved its password (or factory certificate) and, by the
    CSR's signature, the key: sending it the certificate it was issued,
    whose response its dropped connection lost, issues nothing new.
    """
    device = identity.registration
    window = gateway.config.single_use_refetch_seconds
    if device is None or not device.single_use or device.consumed_at is None or window <= 0:
        return None
    now = datetime.now(timezone.utc)
    if now - device.consumed_at > timedelta(seconds=window):
        return None
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    for issued in await gateway.store.certificates_for_public_key(hashlib.sha256(spki).hexdigest()):
        if issued.requester == identity.requester and not issued.revoked and issued.issued_at >= device.consumed_at:
            _log.info(
                "reissued serial {serial} to {requester}: its single-use registration was"
                " consumed by this certificate {age:.0f} s ago (same key)",
                serial=format_serial(issued.serial), requester=printable(identity.requester),
                age=(now - device.consumed_at).total_seconds(), event="reissued",
            )
            return issued.certificate
    return None


async def enroll(
    gateway: Gateway,
    handler: HandlerConfig,
    request: Any,
    peer: PeerInfo,
    body: bytes,
    content_type: str | None,
    *,
    server_key: "Callable[[policy.PolicyContext, auth.Identity], Awaitable[Any]] | None" = None,
) -> x509.Certificate:
    """Run one enrollment; return the issued certificate or raise Refusal.

    ``server_key`` (serverkeygen, RFC 7030 §4.4) is called once every check
    has passed, and returns the public key to certify in place of the
    CSR's; it may raise Refusal too.
    """
    identity = await auth.authenticate(request, handler, peer, gateway.portal)
    audit.note(request, requester=identity.requester)
    # Who the client is comes before what it asks for.
    await _client_certificate_not_revoked(gateway, identity, peer)
    csr = parse_csr(body, content_type)
    audit.note(request, subject=csr.subject.rfc4514_string())
    # Only a handler with channelBinding on reads it (policy.challenge_password);
    # deriving a TLS exporter value costs a key derivation per request.
    binding = channel_binding(peer) if handler.channel_binding else None
    ctx = policy.build_context(
        handler.operation, handler, identity, csr,
        policy.ChannelBinding(*binding) if binding else None,
    )
    policy.run_format(ctx)
    # Who is renewing is decided once, for every operation, label and
    # filter: an older certificate must not renew through simpleenroll.
    renewing: int | None = None
    if gateway.config.last_issued_rule and policy.renews_own_subject(ctx):
        renewing = await _renewing_last_issued(gateway, identity, ctx)

    procedure = gateway.procedures[handler.token_procedure]
    approval = gateway.approvals.get(handler.id)
    if approval is not None:
        # 202 until an operator approves, then issued exactly once.
        return await approval.enroll(
            csr,
            identity.requester,
            sign=lambda: gateway.ca_guard.issue(
                lambda: procedure.issue(policy.issue_request(ctx)), handler.token_procedure
            ),
            claim=lambda: auth.single_use(gateway.store, identity),
        )
    if server_key is None:
        again = await _sent_again(gateway, identity, csr)
        if again is not None:
            return again
    issue = policy.issue_request(ctx)
    if server_key is not None:
        # serverkeygen: a key made now.  Never a certificate sent before:
        # its private key was not kept, so it cannot go with it.
        issue = attr.evolve(issue, public_key=await server_key(ctx, identity))
    # A single-use registration is claimed first (one winner among
    # concurrent requests) and released if issuing or recording fails.
    async with auth.single_use(gateway.store, identity):
        certificate = await gateway.ca_guard.issue(lambda: procedure.issue(issue), handler.token_procedure)
        # Committed before the response is written: nothing sent is unrecorded.
        if not await _record(gateway, certificate, handler, identity, renewing):
            return certificate
    _log.info(
        "issued serial {serial} subject {subject} to {requester} by handler {handler}",
        serial=format_serial(certificate.serial_number),
        subject=printable(certificate.subject.rfc4514_string()),
        requester=printable(identity.requester),
        handler=handler.id,
        client=request.getClientAddress().host,
        event="issued",
    )
    return certificate
