"""CMS for server-generated keys (RFC 7030 §4.4.2, RFC 5958 §4, RFC 5652).

An encrypted server-generated key is an AsymmetricKeyPackage (the PKCS#8
OneAsymmetricKey, RFC 5958) placed in a SignedData signed by the party
that made the key (this gateway, with its TLS key), which is then placed
in an EnvelopedData for the key the client named.

cryptography's PKCS#7 builders fix the content type to id-data, and these
layers need id-ct-KP-aKeyPackage inside the SignedData and id-signedData
inside the EnvelopedData, so the structures are built with
pyasn1-modules' RFC 5652 and RFC 5958 modules; every cryptographic
operation is cryptography's.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asymmetric_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc5280, rfc5652, rfc5958

__all__ = ["signed_key_package", "enveloped", "server_generated_key"]

SHA256 = univ.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
ECDSA_WITH_SHA256 = univ.ObjectIdentifier("1.2.840.10045.4.3.2")
SHA256_WITH_RSA = univ.ObjectIdentifier("1.2.840.113549.1.1.11")
RSA_ENCRYPTION = univ.ObjectIdentifier("1.2.840.113549.1.1.1")
AES256_CBC = univ.ObjectIdentifier("2.16.840.1.101.3.4.1.42")
ID_CONTENT_TYPE = univ.ObjectIdentifier("1.2.840.113549.1.9.3")
ID_MESSAGE_DIGEST = univ.ObjectIdentifier("1.2.840.113549.1.9.4")
_NULL = der_encoder.encode(univ.Null(""))
# RFC 3394 AES key wrap, by key-encryption key length (RFC 3565).
AES_WRAP = {
    16: univ.ObjectIdentifier("2.16.840.1.101.3.4.1.5"),
    24: univ.ObjectIdentifier("2.16.840.1.101.3.4.1.25"),
    32: univ.ObjectIdentifier("2.16.840.1.101.3.4.1.45"),
}


def _certificate(cert: x509.Certificate) -> rfc5280.Certificate:
    decoded, _ = der_decoder.decode(cert.public_bytes(serialization.Encoding.DER), asn1Spec=rfc5280.Certificate())
    return decoded


def _issuer_and_serial(cert: x509.Certificate) -> rfc5652.IssuerAndSerialNumber:
    tbs = _certificate(cert)["tbsCertificate"]
    result = rfc5652.IssuerAndSerialNumber()
    result["issuer"] = tbs["issuer"]
    result["serialNumber"] = tbs["serialNumber"]
    return result


def _attribute(oid: univ.ObjectIdentifier, value: Any) -> rfc5652.Attribute:
    attribute = rfc5652.Attribute()
    attribute["attrType"] = oid
    attribute["attrValues"].append(der_encoder.encode(value))
    return attribute


def signed_key_package(
    pkcs8_der: bytes, signer_certificate: x509.Certificate, signer_key: Any, chain: Sequence[x509.Certificate] = ()
) -> bytes:
    """The DER SignedData (RFC 5652 §5) whose eContent is the
    AsymmetricKeyPackage of one key (RFC 5958, id-ct-KP-aKeyPackage),
    signed with SHA-256 by ``signer_key`` (EC or RSA) and carrying
    ``signer_certificate`` and ``chain``.

    :raises TypeError: for a signer key that is neither EC nor RSA.
    """
    key, _ = der_decoder.decode(pkcs8_der, asn1Spec=rfc5958.OneAsymmetricKey())
    package = rfc5958.AsymmetricKeyPackage()
    package.append(key)
    content = der_encoder.encode(package)

    digest_algorithm = rfc5280.AlgorithmIdentifier()
    digest_algorithm["algorithm"] = SHA256
    signer = rfc5652.SignerInfo()
    signer["version"] = 1  # issuerAndSerialNumber
    signer["sid"]["issuerAndSerialNumber"] = _issuer_and_serial(signer_certificate)
    signer["digestAlgorithm"] = digest_algorithm
    signer["signedAttrs"].append(_attribute(ID_CONTENT_TYPE, rfc5958.id_ct_KP_aKeyPackage))
    signer["signedAttrs"].append(_attribute(ID_MESSAGE_DIGEST, univ.OctetString(hashlib.sha256(content).digest())))
    # The signature covers the attributes as a SET OF (RFC 5652 §5.4), not [0].
    to_sign = b"\x31" + der_encoder.encode(signer["signedAttrs"])[1:]
    signature_algorithm = rfc5280.AlgorithmIdentifier()
    if isinstance(signer_key, ec.EllipticCurvePrivateKey):
        signature_algorithm["algorithm"] = ECDSA_WITH_SHA256
        signature = signer_key.sign(to_sign, ec.ECDSA(hashes.SHA256()))
    elif isinstance(signer_key, rsa.RSAPrivateKey):
        signature_algorithm["algorithm"] = SHA256_WITH_RSA
        signature_algorithm["parameters"] = _NULL
        signature = signer_key.sign(to_sign, asymmetric_padding.PKCS1v15(), hashes.SHA256())
    else:
        raise TypeError(f"cannot sign with a {type(signer_key).__name__}")
    signer["signatureAlgorithm"] = signature_algorithm
    signer["signature"] = signature

    signed = rfc5652.SignedData()
    signed["version"] = 3  # eContentType is not id-data
    signed["digestAlgorithms"].append(digest_algorithm)
    signed["encapContentInfo"]["eContentType"] = rfc5958.id_ct_KP_aKeyPackage
    signed["encapContentInfo"]["eContent"] = content
    for cert in (signer_certificate, *chain):
        choice = rfc5652.CertificateChoices()
        choice["certificate"] = _certificate(cert)
        signed["certificates"].append(choice)
    signed["signerInfos"].append(signer)
    return der_encoder.encode(signed)


def enveloped(
    content_type: univ.ObjectIdentifier, content: bytes, recipient: x509.Certificate | tuple[bytes, bytes]
) -> bytes:
    """A DER ContentInfo holding an EnvelopedData (RFC 5652 §6) of
    ``content``, AES-256-CBC with a fresh content key, for one recipient:

    - a certificate with an RSA key: the content key is transported with
      RSAES-PKCS1-v1_5 to the recipient named by issuer and serial number
      (KeyTransRecipientInfo, the form ``openssl cms -decrypt -recip`` reads);
    - ``(key identifier, key-encryption key)``: a shared AES key of 16, 24
      or 32 bytes wraps the content key (KEKRecipientInfo, RFC 3394 key
      wrap; ``openssl cms -decrypt -secretkey -secretkeyid``).

    :raises TypeError: when a certificate's key is not RSA.
    :raises ValueError: for a key-encryption key of another length.
    """
    content_key = os.urandom(32)
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(content) + padder.finalize()
    encryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()

    recipient_info = rfc5652.RecipientInfo()
    if isinstance(recipient, x509.Certificate):
        public_key = recipient.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise TypeError("key transport needs an RSA key")
        key_transport = rfc5652.KeyTransRecipientInfo()
        key_transport["version"] = 0  # issuerAndSerialNumber
        key_transport["rid"]["issuerAndSerialNumber"] = _issuer_and_serial(recipient)
        key_transport["keyEncryptionAlgorithm"]["algorithm"] = RSA_ENCRYPTION
        key_transport["keyEncryptionAlgorithm"]["parameters"] = _NULL
        key_transport["encryptedKey"] = public_key.encrypt(content_key, asymmetric_padding.PKCS1v15())
        recipient_info["ktri"] = key_transport
        version = 0
    else:
        identifier, kek = recipient
        if len(kek) not in AES_WRAP:
            raise ValueError("a key-encryption key is an AES key of 16, 24 or 32 bytes")
        kek_info = recipient_info["kekri"]
        kek_info["version"] = 4
        kek_info["kekid"]["keyIdentifier"] = identifier
        kek_info["keyEncryptionAlgorithm"]["algorithm"] = AES_WRAP[len(kek)]
        kek_info["encryptedKey"] = aes_key_wrap(kek, content_key)
        version = 2  # RFC 5652 §6.1: a RecipientInfo of a version other than 0

    envelope = rfc5652.EnvelopedData()
    envelope["version"] = version
    envelope["recipientInfos"].append(recipient_info)
    encrypted = envelope["encryptedContentInfo"]
    encrypted["contentType"] = content_type
    encrypted["contentEncryptionAlgorithm"]["algorithm"] = AES256_CBC
    encrypted["contentEncryptionAlgorithm"]["parameters"] = der_encoder.encode(univ.OctetString(iv))
    encrypted["encryptedContent"] = ciphertext

    info = rfc5652.ContentInfo()
    info["contentType"] = rfc5652.id_envelopedData
    info["content"] = der_encoder.encode(envelope)
    return der_encoder.encode(info)


def server_generated_key(
    pkcs8_der: bytes,
    recipient: x509.Certificate | tuple[bytes, bytes],
    signer_certificate: x509.Certificate,
    signer_key: Any,
    chain: Sequence[x509.Certificate] = (),
) -> bytes:
    """The key part of an encrypted serverkeygen answer (RFC 7030 §4.4.2):
    EnvelopedData for ``recipient`` of the SignedData of the key package."""
    signed = signed_key_package(pkcs8_der, signer_certificate, signer_key, chain)
    return enveloped(rfc5652.id_signedData, signed, recipient)
