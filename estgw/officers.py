"""Officer/RA clients: certificates that enroll for others.

An operator grants a role to one certificate (``estgw officer add --cert
FILE --role ROLE``); the store keys the grant by the SHA-256 of the
certificate's DER, so a renewed officer certificate needs the role
granted again.  A handler with ``requiredRoRoles`` serves officer/RA
clients only: the TLS client certificate must hold at least one of the
listed roles, or with ``requiredRoRoles = none`` merely be issued by this
gateway's CA.  Such a client may enroll for other subjects (the subject
match is skipped); every other check still applies to its certificate.
"""

from __future__ import annotations

from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from estgw.refusal import Refusal
from estgw.store import OfficerRole, certificate_fingerprint

__all__ = ["role_grant", "issued_by", "check_roles", "not_an_officer"]


def role_grant(cert: x509.Certificate, role: str) -> OfficerRole:
    """The store record that grants ``role`` to ``cert``."""
    return OfficerRole(
        fingerprint=certificate_fingerprint(cert),
        role=role,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
    )


def issued_by(
    cert: x509.Certificate,
    issuers: Sequence[x509.Certificate],
    verified_chain: Sequence[x509.Certificate] = (),
) -> bool:
    """Whether ``cert`` was signed by one of ``issuers``, the gateway's
    issuing CA certificates (not the roots above them).

    ``verified_chain`` is the chain TLS verified for ``cert`` (leaf first,
    :attr:`estgw.tls.PeerInfo.chain`): when it runs from ``cert`` straight
    to one of ``issuers``, OpenSSL has checked that signature in the
    handshake and it is not checked again.
    """
    if len(verified_chain) >= 2 and verified_chain[0] == cert and verified_chain[1] in issuers:
        return True
    for issuer in issuers:
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def not_an_officer(reason: str) -> Refusal:
    return Refusal(403, "officer-role-required", reason)


def check_roles(required: Sequence[str], held: Sequence[str]) -> tuple[str, ...]:
    """The required roles the certificate holds; Refusal if none."""
    granted = tuple(role for role in held if role in required)
    if not granted:
        raise not_an_officer(
            "this endpoint serves officer/RA clients: the TLS client certificate holds none of "
            f"the officer roles {', '.join(required)}"
        )
    return granted
