"""DER pieces of OCSP responses that cryptography's builders do not make:
a response signed outside cryptography (a token) and a response with
several SingleResponses (RFC 6960 4.2.1: ``responses`` is a SEQUENCE OF;
cryptography's OCSPResponseBuilder holds one)."""

from __future__ import annotations

from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2560, rfc5280


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_sequence(content: bytes) -> bytes:
    return b"\x30" + _der_length(len(content)) + content


def _signature_algorithm_der(draft: Any) -> bytes:
    """The DER AlgorithmIdentifier of a signed draft: a certificate (RFC
    5280 4.1.1.2), a CRL (5.1.1.2) or an OCSP response (RFC 6960 4.2.1)."""
    if isinstance(draft, x509.Certificate):
        decoded, _ = der_decoder.decode(draft.public_bytes(serialization.Encoding.DER), asn1Spec=rfc5280.Certificate())
    elif isinstance(draft, x509.CertificateRevocationList):
        decoded, _ = der_decoder.decode(
            draft.public_bytes(serialization.Encoding.DER), asn1Spec=rfc5280.CertificateList()
        )
    else:
        decoded = _basic_response(draft)
    return bytes(der_encoder.encode(decoded["signatureAlgorithm"]))


def _basic_response(response: Any) -> Any:
    outer, _ = der_decoder.decode(response.public_bytes(serialization.Encoding.DER), asn1Spec=rfc2560.OCSPResponse())
    basic, _ = der_decoder.decode(
        bytes(outer["responseBytes"]["response"]), asn1Spec=rfc2560.BasicOCSPResponse()
    )
    return basic


def assemble_ocsp_response(draft: Any, tbs: bytes, algorithm: bytes, signature: bytes) -> Any:
    """``draft`` (an OCSPResponse) with ``tbs`` as its tbsResponseData and
    ``signature`` as its BasicOCSPResponse signature (RFC 6960 4.2.1)."""
    from cryptography.x509 import ocsp

    basic = _basic_response(draft)
    parts = tbs + algorithm + bytes(
        der_encoder.encode(univ.BitString.fromOctetString(signature))
    )
    if basic["certs"].isValue:
        parts += bytes(der_encoder.encode(basic["certs"]))
    outer, _ = der_decoder.decode(draft.public_bytes(serialization.Encoding.DER), asn1Spec=rfc2560.OCSPResponse())
    outer["responseBytes"]["response"] = univ.OctetString(_der_sequence(parts))
    return ocsp.load_der_ocsp_response(bytes(der_encoder.encode(outer)))




def single_response(response: Any) -> bytes:
    """The DER of the one SingleResponse in the OCSPResponse ``response``."""
    (single,) = _basic_response(response)["tbsResponseData"]["responses"]
    return bytes(der_encoder.encode(single))


def with_responses(tbs: bytes, more: Sequence[bytes]) -> bytes:
    """ResponseData ``tbs`` (RFC 6960 4.2.1) with the DER SingleResponses
    ``more`` added after its own."""
    data, _ = der_decoder.decode(tbs, asn1Spec=rfc2560.ResponseData())
    responses = data["responses"]
    for der in more:
        single, _ = der_decoder.decode(der, asn1Spec=rfc2560.SingleResponse())
        responses.append(single)
    return bytes(der_encoder.encode(data))


def sign_data(key: Any, data: bytes, hash: hashes.HashAlgorithm | None) -> bytes:
    """``data`` signed with ``key`` as an OCSP response of cryptography's is
    (RSA PKCS#1 v1.5, ECDSA, or EdDSA with no hash)."""
    if isinstance(key, rsa.RSAPrivateKey):
        assert hash is not None
        return key.sign(data, padding.PKCS1v15(), hash)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert hash is not None
        return key.sign(data, ec.ECDSA(hash))
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return key.sign(data)
    raise ValueError(f"unsupported key type {type(key).__name__}")


def resigned_with_responses(draft: Any, more: Sequence[bytes], key: Any) -> Any:
    """The OCSPResponse ``draft`` (signed by ``key``) with the SingleResponses
    ``more`` added, signed again by ``key``."""
    tbs = with_responses(draft.tbs_response_bytes, more)
    signature = sign_data(key, tbs, draft.signature_hash_algorithm)
    return assemble_ocsp_response(draft, tbs, _signature_algorithm_der(draft), signature)
