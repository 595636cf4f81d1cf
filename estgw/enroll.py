"""The handler pipeline for simpleenroll / simplereenroll.

filter (who) → parse → format (checks, rewrites) → store checks →
token procedure (issue) → store (record, committed) → certificates.
This is the only place that knows the order; each step is a function
elsewhere that raises :class:`Refusal` to stop it.
"""

from __future__ import annotations

from typing import Any, Mapping

import attr
from cryptography import x509
from twisted.cred.portal import Portal
from twisted.logger import Logger

from estgw import auth, policy
from estgw.ca import ITokenProcedure
from estgw.config import Config, HandlerConfig
from estgw.protocol import parse_csr
from estgw.refusal import Refusal
from estgw.store import IssuedCertificate, IStore
from estgw.tls import PeerInfo, channel_binding

_log = Logger(namespace="estgw.audit")


@attr.s(auto_attribs=True)
class Gateway:
    """Everything a handler needs, built once by :mod:`estgw.tap`."""

    config: Config
    store: IStore
    procedures: Mapping[str, ITokenProcedure]
    ca_chain: list[x509.Certificate]
    portal: Portal
    reactor: Any = None


async def _client_certificate_not_revoked(gateway: Gateway, identity: auth.Identity) -> None:
    cert = identity.certificate
    if cert is None:
        return
    if await gateway.store.is_revoked(cert.serial_number):
        raise Refusal(403, "client-certificate-revoked", "the TLS client certificate has been revoked")


async def _renewing_last_issued(gateway: Gateway, identity: auth.Identity, ctx: policy.PolicyContext) -> None:
    """SPEC §4.4: with allowRenewalWithOldCertificates = true (the product's
    name reads backwards: true turns the check ON), only the certificate
    issued last for the subject may renew it."""
    cert = identity.certificate
    if cert is None or identity.acting_as_officer:
        return
    last = await gateway.store.last_issued_for_subject(ctx.subject.rfc4514_string())
    if last is None or last.serial != cert.serial_number:
        raise Refusal(
            403,
            "not-last-issued-certificate",
            "renewal requires the certificate issued last for this subject; a newer one exists"
            if last is not None else
            "renewal requires the certificate issued last for this subject; this gateway has no record of one",
        )


async def enroll(
    gateway: Gateway,
    handler: HandlerConfig,
    request: Any,
    peer: PeerInfo,
    body: bytes,
    content_type: str | None,
) -> x509.Certificate:
    """Run one enrollment; return the issued certificate or raise Refusal."""
    identity = await auth.authenticate(request, handler, peer, gateway.portal)
    # Who the client is comes before what it asks for.
    await _client_certificate_not_revoked(gateway, identity)
    csr = parse_csr(body, content_type)
    binding = channel_binding(peer)
    ctx = policy.build_context(
        handler.operation, handler, identity, csr,
        policy.ChannelBinding(*binding) if binding else None,
    )
    policy.run_format(ctx)
    if handler.operation == "simplereenroll" and handler.allow_renewal_with_old_certificates:
        await _renewing_last_issued(gateway, identity, ctx)

    procedure = gateway.procedures[handler.token_procedure]
    certificate = await procedure.issue(policy.issue_request(ctx))
    # Committed before the response is written: nothing sent is unrecorded.
    await gateway.store.record_certificate(
        IssuedCertificate.from_certificate(certificate, handler.id, identity.requester)
    )
    _log.info(
        "issued serial {serial:x} subject {subject} to {requester} by handler {handler}",
        serial=certificate.serial_number,
        subject=certificate.subject.rfc4514_string(),
        requester=identity.requester,
        handler=handler.id,
        event="issued",
    )
    return certificate
