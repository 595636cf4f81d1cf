"""The EST wire format (RFC 7030 with the RFC 8951 clarifications).

Media types, tolerant base64 in and 64-column base64 out, PKCS#10 decoding,
PKCS#7 certs-only and CsrAttrs.  Pure Python: the web layer passes bytes
and headers in and gets objects or a :class:`~estgw.refusal.Refusal` out.
Every bad client input becomes a ``Refusal``; no parser exception escapes.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterable, Sequence

import attr
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc7030

from estgw import names
from estgw.refusal import Refusal

__all__ = [
    "CERTS_ONLY",
    "PKCS7_MIME",
    "CSRATTRS",
    "PKCS10",
    "CSR_ATTRIBUTE_NAMES",
    "CsrAttr",
    "content_type_matches",
    "decode_base64_body",
    "parse_csr",
    "encode_certs_only",
    "decode_certs_only",
    "parse_csrattrs_setting",
    "csrattrs_sequence",
    "encode_base64",
    "encode_csrattrs",
    "decode_csrattrs",
]

# Exactly these strings on responses: some clients compare them literally.
CERTS_ONLY: str = "application/pkcs7-mime; smime-type=certs-only"
PKCS7_MIME: str = "application/pkcs7-mime"
CSRATTRS: str = "application/csrattrs"
PKCS10: str = "application/pkcs10"

_NOT_A_CSR = "request body is not a PKCS#10 certification request"

# RFC 8951 §3.2: line breaks and other whitespace may appear anywhere.
_WHITESPACE = b" \t\r\n\v\f"
_BASE64 = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_LINE = 64

# openssl writes "CERTIFICATE REQUEST", older tools (Netscape, MS) "NEW ...".
# Text before the block (e.g. `openssl req -text` output) is ignored.
_PEM_CSR = re.compile(
    rb"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----"
    rb"(.*?)"
    rb"-----END (?:NEW )?CERTIFICATE REQUEST-----",
    re.DOTALL,
)


def content_type_matches(header: str | None, expected: str) -> bool:
    """Compare the media types of ``header`` and ``expected``, ignoring
    case and parameters (``application/PKCS10; charset=x`` matches
    ``application/pkcs10``).  A missing header matches nothing."""
    if header is None:
        return False
    return _media_type(header) == _media_type(expected)


def _media_type(value: str) -> str:
    return value.split(";", 1)[0].strip().lower()


def decode_base64_body(body: bytes) -> bytes:
    """Decode a base64 request body the way real clients send it: with or
    without line breaks (LF or CRLF), spaces or tabs anywhere, and with or
    without the trailing ``=`` padding."""
    compact = body.translate(None, _WHITESPACE)
    if not compact:
        raise Refusal(400, "empty-body", "request body is empty")
    if not _BASE64.fullmatch(compact):
        raise _bad_base64()
    # Re-pad ourselves so that missing (or surplus) padding is accepted;
    # a length of 1 mod 4 cannot be base64 at all.
    data = compact.rstrip(b"=")
    if not data or len(data) % 4 == 1:
        raise _bad_base64()
    try:
        return base64.b64decode(data + b"=" * (-len(data) % 4), validate=True)
    except binascii.Error:  # pragma: no cover - the checks above rule it out
        raise _bad_base64() from None


def _bad_base64() -> Refusal:
    return Refusal(400, "bad-base64", "request body is not valid base64")


def encode_base64(der: bytes) -> bytes:
    """Base64 in 64-column lines, each ending in LF: what ``openssl base64``
    writes and what every EST client we know reads (RFC 7030 §4.1.3)."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + _LINE] + b"\n" for i in range(0, len(text), _LINE))


def parse_csr(body: bytes, content_type: str | None) -> x509.CertificateSigningRequest:
    """Decode a simpleenroll/simplereenroll request body.

    ``content_type`` may be missing or empty (sloppy clients), otherwise it
    must be ``application/pkcs10`` (any case, any parameters; the older
    ``application/x-pkcs10`` too).  The body may
    be base64 DER (the standard), a PEM-armoured CSR, or raw DER.  The CSR's
    signature is *not* verified here; a policy check does that.
    """
    if content_type is not None and content_type.strip():
        # application/x-pkcs10: the pre-RFC 5967 name some clients still send.
        if not any(content_type_matches(content_type, t) for t in (PKCS10, "application/x-pkcs10")):
            got = _printable(_media_type(content_type))
            raise Refusal(
                415,
                "unsupported-media-type",
                f"expected {PKCS10}, got {got}",
            )
    if not body.strip(_WHITESPACE):
        raise Refusal(400, "empty-body", "request body is empty")

    if b"-----BEGIN" in body:
        match = _PEM_CSR.search(body)
        if match is None:
            raise Refusal(400, "bad-csr", _NOT_A_CSR)
        csr = _load_csr(decode_base64_body(match.group(1)))
    elif body[:1] == b"\x30":
        # Raw DER (a courtesy).  Base64 of a CSR always starts with "MI",
        # never "0", so a body starting with 0x30 has no base64 reading.
        csr = _load_csr(body)
    else:
        csr = _load_csr(decode_base64_body(body))

    if csr is None:
        raise Refusal(400, "bad-csr", _NOT_A_CSR)
    return csr


def _load_csr(der: bytes) -> x509.CertificateSigningRequest | None:
    """The CSR in ``der``, or None if it is not one."""
    try:
        csr = x509.load_der_x509_csr(der)
        # cryptography parses fields lazily: read now everything the policy
        # checks will read, so a malformed field is a 400 here and not an
        # exception (a 500) deep inside a check.
        csr.subject
        csr.extensions
        list(csr.attributes)
        csr.public_key()
        csr.signature_algorithm_oid
        # The signature algorithm (weak, unknown) is judged by the policy
        # check csr_signature_valid, which names it.
    except UnsupportedAlgorithm:
        # A CSR, but with a key we cannot check or certify.
        raise Refusal(
            400,
            "unsupported-algorithm",
            "the request's public key algorithm is not supported",
        ) from None
    except Exception:
        # A subject or subjectAltName cryptography cannot represent (an
        # INTEGER commonName, a 5-octet iPAddress) is named as such.
        refusal = names.unparsable_name_refusal(der) or attribute_refusal(der)
        if refusal is not None:
            raise refusal from None
        # Arbitrary bytes from the network: ValueError, InvalidVersion,
        # DuplicateExtension... all mean the same thing to the client.
        return None
    return csr


#: CSR attributes whose misuse has a refusal code of its own: OID ->
#: (name, the code of a malformed one).  RFC 7030 §4.4.1.1, §4.4.1.2.
KEY_ATTRIBUTES = {
    "1.2.840.113549.1.9.16.2.37": ("DecryptKeyIdentifier", "decrypt-key-malformed"),
    "1.2.840.113549.1.9.16.2.54": ("AsymmetricDecryptKeyIdentifier", "decrypt-key-malformed"),
}


def attribute_refusal(der: bytes) -> Refusal | None:
    """``400`` naming the first CSR attribute that does not hold exactly
    one value (the attributes we read are single-valued, RFC 2985 §5.4,
    RFC 7030 §4.4.1), or None.  Its code is the attribute's own
    (:data:`KEY_ATTRIBUTES`), else ``csr-bad-attribute``."""
    from pyasn1_modules import rfc2986

    try:
        request, _rest = der_decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())
    except (PyAsn1Error, ValueError, TypeError):
        return None
    for attribute in request["certificationRequestInfo"]["attributes"]:
        oid = str(attribute["type"])
        count = len(attribute["values"])
        if count != 1:
            name, code = KEY_ATTRIBUTES.get(oid, (oid, "csr-bad-attribute"))
            return Refusal(400, code, f"the CSR attribute {name} holds {count} values; it must hold exactly one")
    return None


def _printable(text: str, limit: int = 80) -> str:
    """A client-supplied string made safe to echo in a one-line reason."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def encode_certs_only(certs: Sequence[x509.Certificate]) -> bytes:
    """The body of a cacerts or enroll response: base64 of a DER PKCS#7
    SignedData holding only ``certs`` (RFC 7030 §4.1.3, §4.2.3)."""
    return encode_base64(pkcs7.serialize_certificates(list(certs), Encoding.DER))


def decode_certs_only(data: bytes) -> list[x509.Certificate]:
    """The certificates in a base64 certs-only PKCS#7 (a response body)."""
    der = decode_base64_body(data)
    try:
        return pkcs7.load_der_pkcs7_certificates(der)
    except Exception:  # as in _load_csr: any parser error means "not PKCS#7"
        raise Refusal(
            400, "bad-pkcs7", "body is not a PKCS#7 certs-only structure"
        ) from None


# Names accepted in handler.<n>.csrattrs; the dotted OID always works too.
CSR_ATTRIBUTE_NAMES: dict[str, str] = {
    "challengePassword": "1.2.840.113549.1.9.7",
    "extensionRequest": "1.2.840.113549.1.9.14",
    "unstructuredName": "1.2.840.113549.1.9.2",
    "unstructuredAddress": "1.2.840.113549.1.9.8",
    "ecPublicKey": "1.2.840.10045.2.1",
    "rsaEncryption": "1.2.840.113549.1.1.1",
    "secp256r1": "1.2.840.10045.3.1.7",
    "secp384r1": "1.3.132.0.34",
    "secp521r1": "1.3.132.0.35",
    "ecdsa-with-SHA256": "1.2.840.10045.4.3.2",
    "ecdsa-with-SHA384": "1.2.840.10045.4.3.3",
    "ecdsa-with-SHA512": "1.2.840.10045.4.3.4",
    "sha256WithRSAEncryption": "1.2.840.113549.1.1.11",
    "sha384WithRSAEncryption": "1.2.840.113549.1.1.12",
    "sha512WithRSAEncryption": "1.2.840.113549.1.1.13",
    "subjectAltName": "2.5.29.17",
    "keyUsage": "2.5.29.15",
    "extKeyUsage": "2.5.29.37",
    "commonName": "2.5.4.3",
    "serialNumber": "2.5.4.5",
    "macAddress": "1.3.6.1.1.1.1.22",
}
# Config files are typed by hand: names match in any case.
_NAMES_FOLDED = {name.lower(): oid for name, oid in CSR_ATTRIBUTE_NAMES.items()}

# X.660: first arc 0..2, no leading zeros, at least two arcs.
_DOTTED_OID = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+")


def _is_dotted_oid(text: str) -> bool:
    if not _DOTTED_OID.fullmatch(text):
        return False
    first, second = (int(arc) for arc in text.split(".")[:2])
    return first == 2 or second < 40


# Validators: a bad CsrAttr fails when it is built, not inside the encoder.
def _check_oid(_instance: object, _attribute: object, value: str) -> None:
    if not _is_dotted_oid(value):
        raise ValueError(f"not a dotted OID: {value!r}")


def _check_oids(_instance: object, _attribute: object, values: tuple[str, ...]) -> None:
    for value in values:
        _check_oid(_instance, _attribute, value)


def _as_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


@attr.s(frozen=True, auto_attribs=True)
class CsrAttr:
    """One AttrOrOID of a CsrAttrs (RFC 7030 §4.5.2): a bare OID when
    ``values`` is empty, else an Attribute whose values are OIDs."""

    oid: str = attr.ib(validator=_check_oid)
    values: tuple[str, ...] = attr.ib(
        default=(), converter=_as_tuple, validator=_check_oids
    )


def parse_csrattrs_setting(text: str) -> tuple[CsrAttr, ...]:
    """Parse ``handler.<n>.csrattrs``: comma-separated items, each an OID or
    a name from :data:`CSR_ATTRIBUTE_NAMES`, optionally ``=`` and a
    ``|``-separated list of value OIDs or names, e.g.
    ``challengePassword, ecPublicKey=secp384r1, ecdsa-with-SHA384``.

    ``extensionRequest=subjectAltName|keyUsage`` asks for those extensions
    with values the client chooses.  RFC 9908 §3.2 lets an extensionRequest
    attribute hold only one Extensions value (extensions *with* values), so
    these become bare extension OIDs in the CsrAttrs; extensions with
    values the server fixes are configured in ``csrattrs.template``.

    :raises ValueError: naming the bad item.
    """
    if not text.strip():
        return ()
    result: list[CsrAttr] = []
    seen: set[str] = set()
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty item in csrattrs {text.strip()!r}")
        name, has_values, rest = item.partition("=")
        oid = _resolve_oid(name.strip(), item)
        values: tuple[str, ...] = ()
        if has_values:
            parts = [part.strip() for part in rest.split("|")]
            if not all(parts):
                raise ValueError(f"csrattrs item {item!r}: empty value")
            values = tuple(_resolve_oid(part, item) for part in parts)
        if oid == CSR_ATTRIBUTE_NAMES["extensionRequest"]:
            if not values:
                raise ValueError(
                    f"csrattrs item {item!r}: name the extensions, e.g. extensionRequest=subjectAltName"
                )
            entries = [CsrAttr(value) for value in values]
        else:
            entries = [CsrAttr(oid, values)]
        for entry in entries:
            # One entry per OID: a repeated one is almost surely a typo.
            if entry.oid in seen:
                raise ValueError(f"csrattrs item {item!r}: {entry.oid} is listed twice")
            seen.add(entry.oid)
            result.append(entry)
    return tuple(result)


def _resolve_oid(token: str, item: str) -> str:
    if not token:
        raise ValueError(f"csrattrs item {item!r}: missing attribute OID or name")
    if token[0].isdigit():
        if not _is_dotted_oid(token):
            raise ValueError(f"csrattrs item {item!r}: malformed OID {token!r}")
        return token
    oid = _NAMES_FOLDED.get(token.lower())
    if oid is None:
        raise ValueError(f"csrattrs item {item!r}: unknown name {token!r}")
    return oid


def csrattrs_sequence(attrs: Sequence[CsrAttr]) -> rfc7030.CsrAttrs:
    """The CsrAttrs (RFC 7030 §4.5.2, RFC 9908 §3.2) of ``attrs``, to be
    DER-encoded, possibly after more items are appended.

    :raises ValueError: for an extensionRequest attribute with OID values:
        RFC 9908 §3.2 lets it hold exactly one Extensions value, never OIDs.
    """
    seq = rfc7030.CsrAttrs()
    seq.clear()  # an empty CsrAttrs is a value (30 00), not "no value yet"
    for item in attrs:
        choice = rfc7030.AttrOrOID()
        if item.values and item.oid == CSR_ATTRIBUTE_NAMES["extensionRequest"]:
            raise ValueError("an extensionRequest attribute holds one Extensions value, not OIDs (RFC 9908 §3.2)")
        if item.values:
            attribute = choice["attribute"]
            attribute["attrType"] = univ.ObjectIdentifier(item.oid)
            for value in item.values:
                # Values are ANY: each one carries a whole DER OID.
                attribute["attrValues"].append(
                    der_encoder.encode(univ.ObjectIdentifier(value))
                )
        else:
            choice["oid"] = univ.ObjectIdentifier(item.oid)
        seq.append(choice)
    return seq


def encode_csrattrs(attrs: Sequence[CsrAttr]) -> bytes:
    """The body of a csrattrs response: base64 of the DER CsrAttrs."""
    return encode_base64(der_encoder.encode(csrattrs_sequence(attrs)))


def decode_csrattrs(data: bytes) -> tuple[CsrAttr, ...]:
    """The entries of a base64 CsrAttrs (a csrattrs response body).  Only
    OID-valued attributes are representable; anything else is refused."""
    der = decode_base64_body(data)
    try:
        seq, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
        if rest:
            raise PyAsn1Error("trailing data")
        result: list[CsrAttr] = []
        for choice in seq:
            if choice.getName() == "oid":
                result.append(CsrAttr(str(choice["oid"])))
                continue
            attribute = choice["attribute"]
            if not attribute["attrValues"]:
                # X.501 says SIZE (1..MAX); with none it is not a bare OID either
                raise PyAsn1Error("attribute without values")
            values: list[str] = []
            for value in attribute["attrValues"]:
                oid, tail = der_decoder.decode(
                    bytes(value), asn1Spec=univ.ObjectIdentifier()
                )
                if tail:
                    raise PyAsn1Error("trailing data in value")
                values.append(str(oid))
            result.append(CsrAttr(str(attribute["attrType"]), tuple(values)))
        return tuple(result)
    except (PyAsn1Error, ValueError):
        raise Refusal(400, "bad-csrattrs", "body is not a CsrAttrs of OIDs") from None
