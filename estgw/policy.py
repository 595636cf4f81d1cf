"""Formats: the checks and rewrites applied to a PKCS#10 request.

Each check is a small pure function of a :class:`PolicyContext` that
raises :class:`Refusal` with a named code, or returns.  A format is an
ordered tuple of checks (:data:`FORMATS`); the enrollment pipeline runs
the handler's format, then :func:`issue_request` builds what the CA signs.
Checks that need the store (revocation, last issued) live in
:mod:`estgw.enroll`.
"""

from __future__ import annotations

from typing import Callable

import attr
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from estgw.auth import Identity
from estgw.ca import IssueRequest
from estgw.config import HandlerConfig
from estgw.refusal import Refusal

MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


@attr.s(frozen=True, auto_attribs=True)
class PolicyContext:
    operation: str
    handler: HandlerConfig
    identity: Identity
    csr: x509.CertificateSigningRequest


Check = Callable[[PolicyContext], None]


def _policy(code: str, reason: str) -> Refusal:
    return Refusal(403, code, reason)


def csr_signature_valid(ctx: PolicyContext) -> None:
    """Proof of possession: the CSR is signed by the key it carries."""
    try:
        valid = ctx.csr.is_signature_valid
    except Exception:  # unsupported algorithm: cannot prove possession
        valid = False
    if not valid:
        raise Refusal(400, "csr-bad-signature", "the CSR signature does not verify")


def key_acceptable(ctx: PolicyContext) -> None:
    """RSA of at least 2048 bits, NIST P-256/384/521, Ed25519 or Ed448."""
    try:
        key = ctx.csr.public_key()
    except Exception:
        raise Refusal(400, "csr-unsupported-key", "the CSR public key type is not supported") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise Refusal(
                400, "csr-weak-key",
                f"RSA keys must be at least {MIN_RSA_BITS} bits, this one has {key.key_size}",
            )
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise Refusal(400, "csr-unsupported-curve", f"the curve {key.curve.name} is not accepted")
        return
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return
    raise Refusal(400, "csr-unsupported-key", "the CSR public key type is not supported")


def _sans(csr_or_cert: x509.CertificateSigningRequest | x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(csr_or_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def has_subject(ctx: PolicyContext) -> None:
    """A certificate must name something: a subject or a SAN."""
    if len(ctx.csr.subject) == 0 and not _sans(ctx.csr):
        raise Refusal(400, "csr-no-subject", "the CSR has neither a subject nor a subjectAltName")


def subject_matches_client_certificate(ctx: PolicyContext) -> None:
    """RFC 7030 §3.3.2/§4.2.2: renewal keeps the subject and SANs of the
    certificate being renewed.  Officer/RA identities are excepted."""
    cert = ctx.identity.certificate
    if ctx.identity.kind != "certificate" or cert is None:
        raise Refusal(
            403, "client-certificate-required",
            "this operation is authenticated by the current certificate: present it as the TLS client certificate",
        )
    if ctx.csr.subject != cert.subject:
        raise _policy(
            "subject-mismatch",
            f"the CSR subject {ctx.csr.subject.rfc4514_string()!r} differs from the client "
            f"certificate subject {cert.subject.rfc4514_string()!r}",
        )
    if set(_sans(ctx.csr)) != set(_sans(cert)):
        raise _policy("san-mismatch", "the CSR subjectAltNames differ from those of the client certificate")


def device_owns_subject(ctx: PolicyContext) -> None:
    """A device that logged in with a password gets certificates for its
    own registered id only: the CSR commonName must be that id."""
    if ctx.identity.kind != "device":
        return
    names = ctx.csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != ctx.identity.device_id:
        raise _policy(
            "subject-not-registered",
            f"the CSR commonName must be the registered device id {ctx.identity.device_id!r}",
        )


_COMMON: tuple[Check, ...] = (csr_signature_valid, key_acceptable, has_subject)

FORMATS: dict[str, tuple[Check, ...]] = {
    "est-simpleenroll": _COMMON + (device_owns_subject,),
    "est-simpleenroll-subjectmatch": _COMMON + (device_owns_subject, subject_matches_client_certificate),
    "est-simplereenroll": _COMMON + (subject_matches_client_certificate,),
    "est-simpleenroll-idm": _COMMON + (device_owns_subject,),
}


def run_format(ctx: PolicyContext) -> None:
    for check in FORMATS[ctx.handler.format]:
        check(ctx)


def issue_request(ctx: PolicyContext) -> IssueRequest:
    """What the CA signs: the CSR's subject, key and SANs."""
    return IssueRequest(
        subject=ctx.csr.subject,
        public_key=ctx.csr.public_key(),
        sans=tuple(_sans(ctx.csr)),
    )
