"""serverkeygen (RFC 7030 §4.4, RFC 8951): the gateway makes the key pair.

The request is a CSR like simpleenroll's, authenticated and checked by
the same pipeline (:func:`estgw.enroll.enroll`); only its key and
signature are ignored (RFC 7030 §4.4.1).  Once every check has passed the
gateway makes a key of the handler's ``serverkeygen.keyType`` (RSA on a
thread: it takes long enough to stall the reactor), the CA certifies its
public key, and the answer is ``multipart/mixed`` with two base64 parts
(RFC 7030 §4.4.2, RFC 8951):

1. the private key, either as ``application/pkcs8`` (a PKCS#8
   OneAsymmetricKey, no encryption beyond TLS; only where the handler
   sets ``serverkeygen.allowUnencryptedKey = true``) or, when the CSR
   carries the AsymmetricDecryptKeyIdentifier attribute (RFC 7030
   §4.4.1.2) or DecryptKeyIdentifier (§4.4.1.1), as
   ``application/pkcs7-mime; smime-type=server-generated-key``:
   the key in an AsymmetricKeyPackage, signed by the gateway (its TLS key)
   in a CMS SignedData, in an EnvelopedData (AES-256-CBC, RSA key
   transport, or AES key wrap for a shared key) for the key the identifier
   names (:mod:`estgw.cms`);
2. the certificate, ``application/pkcs7-mime; smime-type=certs-only``.

An AsymmetricDecryptKeyIdentifier must be the subjectKeyIdentifier of the
TLS client certificate (its extension, or the SHA-1 of its public key as
RFC 5280 §4.2.1.2 method 1 computes it): that is the key this gateway
knows the client holds.  CMS key transport needs an RSA key.  A
DecryptKeyIdentifier names one of the handler's shared AES keys
(``serverkeygen.sharedKeys``).

The private key lives only in this request's memory: it is never stored,
logged or recorded.
"""

from __future__ import annotations

import secrets
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.internet.threads import deferToThreadPool

from estgw import auth, cms, keytypes, protocol
from estgw.config import HandlerConfig
from estgw.enroll import Gateway, enroll
from estgw.refusal import Refusal
from estgw.tls import PeerInfo

__all__ = [
    "DECRYPT_KEY_IDENTIFIER",
    "ASYMMETRIC_DECRYPT_KEY_IDENTIFIER",
    "PKCS8",
    "SERVER_GENERATED_KEY",
    "serverkeygen",
    "serverkeygen_parts",
    "multipart_body",
]

#: id-aa-decryptKeyID (RFC 7030 §4.4.1.1): a shared symmetric key.
DECRYPT_KEY_IDENTIFIER = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.37")
#: id-aa-asymmDecryptKeyID (RFC 7030 §4.4.1.2): an asymmetric key.
ASYMMETRIC_DECRYPT_KEY_IDENTIFIER = x509.ObjectIdentifier("1.2.840.113549.1.9.16.2.54")

PKCS8 = "application/pkcs8"
SERVER_GENERATED_KEY = "application/pkcs7-mime; smime-type=server-generated-key"


def _attribute(csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        value = csr.attributes.get_attribute_for_oid(oid).value
    except x509.AttributeNotFound:
        return None
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def _key_identifiers(certificate: x509.Certificate) -> set[bytes]:
    """The identifiers a client may use for its certificate's key."""
    found = {x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest}
    try:
        found.add(certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest)
    except x509.ExtensionNotFound:
        pass
    return found


def recipient(
    handler: HandlerConfig, identity: auth.Identity, csr: x509.CertificateSigningRequest, secure: bool
) -> x509.Certificate | tuple[bytes, bytes] | None:
    """Whom to encrypt the private key to: a certificate, a shared key
    ``(id, key)``, or None for the unencrypted form; Refusal when the
    request asks for what cannot be done."""
    shared = _attribute(csr, DECRYPT_KEY_IDENTIFIER)
    wanted = _attribute(csr, ASYMMETRIC_DECRYPT_KEY_IDENTIFIER)
    if shared is not None and wanted is not None:
        raise Refusal(
            400, "decrypt-key-ambiguous",
            "the CSR names two keys to encrypt the private key to (DecryptKeyIdentifier and"
            " AsymmetricDecryptKeyIdentifier): name one",
        )
    if shared is not None:
        secret = dict(handler.serverkeygen_shared_keys).get(shared)
        if secret is None:
            raise Refusal(
                400, "decrypt-key-unknown",
                "the DecryptKeyIdentifier names no shared key of this endpoint",
            )
        return shared, secret
    if wanted is None:
        if not handler.serverkeygen_allow_unencrypted_key:
            raise Refusal(
                400, "serverkeygen-encryption-required",
                "this endpoint returns the private key only encrypted: name the RSA key of your TLS"
                " client certificate (AsymmetricDecryptKeyIdentifier) or a shared key (DecryptKeyIdentifier)",
            )
        if not secure:
            raise Refusal(403, "serverkeygen-needs-tls", "an unencrypted private key is sent only over TLS")
        return None
    certificate = identity.certificate
    if certificate is None or wanted not in _key_identifiers(certificate):
        raise Refusal(
            400, "decrypt-key-unknown",
            "the AsymmetricDecryptKeyIdentifier names no key this gateway knows: it must be the"
            " subjectKeyIdentifier of the TLS client certificate",
        )
    if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
        raise Refusal(
            400, "decrypt-key-unsupported",
            f"the private key can be encrypted to an RSA key only, not {keytypes.describe(certificate.public_key())}",
        )
    return certificate


def _private_key_part(
    gateway: Gateway, private_key: Any, to: x509.Certificate | tuple[bytes, bytes] | None
) -> tuple[str, bytes]:
    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if to is None:
        return PKCS8, pkcs8
    assert gateway.key_signer is not None  # checked before anything was issued
    certificate, key, chain = gateway.key_signer
    return SERVER_GENERATED_KEY, cms.server_generated_key(pkcs8, to, certificate, key, chain)


def multipart_body(parts: list[tuple[str, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    """A ``multipart/mixed`` body of base64 parts (RFC 2046, RFC 8951):
    each ``(content type, DER)``; returns the body and its Content-Type."""
    boundary = boundary or "estgw-" + secrets.token_hex(16)
    lines: list[bytes] = []
    for content_type, der in parts:
        lines += [
            b"--" + boundary.encode("ascii"),
            b"Content-Type: " + content_type.encode("ascii"),
            b"Content-Transfer-Encoding: base64",
            b"",
            protocol.encode_base64(der).rstrip(b"\n").replace(b"\n", b"\r\n"),
        ]
    lines += [b"--" + boundary.encode("ascii") + b"--", b""]
    return b"\r\n".join(lines), f"multipart/mixed; boundary={boundary}"


async def _generate(gateway: Gateway, key_type: str) -> Any:
    if keytypes.rsa_bits(key_type) is None:
        return keytypes.generate(key_type)  # EC and Ed25519 take microseconds
    reactor = gateway.reactor
    if reactor is None:
        from twisted.internet import reactor
    return await deferToThreadPool(reactor, reactor.getThreadPool(), keytypes.generate, key_type)


async def serverkeygen(
    gateway: Gateway,
    handler: HandlerConfig,
    request: Any,
    peer: PeerInfo,
    body: bytes,
    content_type: str | None,
) -> tuple[bytes, str]:
    """Serve one serverkeygen request; return the multipart body and its
    Content-Type, or raise Refusal (nothing issued)."""
    key_part, certificate = await serverkeygen_parts(gateway, handler, request, peer, body, content_type)
    cert_part = (protocol.CERTS_ONLY, pkcs7.serialize_certificates([certificate], serialization.Encoding.DER))
    return multipart_body([key_part, cert_part])


async def serverkeygen_parts(
    gateway: Gateway,
    handler: HandlerConfig,
    request: Any,
    peer: PeerInfo,
    body: bytes,
    content_type: str | None,
) -> tuple[tuple[str, bytes], x509.Certificate]:
    """Serve one serverkeygen request: the private key part (its media type
    and DER) and the certificate, for each transport to package (HTTPS:
    multipart/mixed; CoAPs: multipart-core), or raise Refusal."""
    made: dict[str, Any] = {}

    async def server_key(ctx: Any, identity: auth.Identity) -> Any:
        made["to"] = recipient(handler, identity, ctx.csr, bool(request.isSecure()))
        if made["to"] is not None and gateway.key_signer is None:
            # A Gateway built without tap (a test harness) has no signing key.
            raise Refusal(501, "not-implemented", "this gateway has no key to sign server-generated keys with")
        made["key"] = await _generate(gateway, handler.serverkeygen_key_type)
        return made["key"].public_key()

    certificate = await enroll(gateway, handler, request, peer, body, content_type, server_key=server_key)
    return _private_key_part(gateway, made.pop("key"), made.pop("to")), certificate
