"""Names that go into a certificate: their syntax and their encoding.

Every subject attribute and subjectAltName the gateway certifies passes
through here (:func:`check_subject`, :func:`check_general_name`), whoever
asks for it: a password device, a factory device, a client certificate or
an officer/RA.  A value that is not a name in the sense of RFC 5280 raises
:class:`BadName`, which the policy answers with ``400 csr-bad-subject`` or
``400 csr-bad-san``.

Subject attributes (RFC 5280 §4.1.2.4, §4.1.2.6 and Appendix A):

- the value must be a character string (UTF8String, PrintableString,
  TeletexString, UniversalString, BMPString, IA5String, VisibleString or
  NumericString): an OCTET STRING, BIT STRING, time or any other ASN.1
  type is refused;
- no control characters (C0, DEL, C1, including NUL) and no surrogates;
  not empty and not only spaces;
- at most the attribute's upper bound in characters (``ub-common-name``
  64, ``ub-locality-name`` 128, ...; :data:`ATTRIBUTES`); an attribute
  type not listed there is accepted as a character string of at most
  128 characters (``ub-match``);
- the attribute's own syntax: countryName (and jurisdictionCountryName)
  two letters; serialNumber and dnQualifier PrintableString characters;
  emailAddress an e-mail address (rfc822Name rules below);
  domainComponent one DNS label.

They are emitted in the encoding RFC 5280 asks for
(:func:`check_subject` returns the rewritten name): a DirectoryString as
PrintableString when the request used PrintableString, else UTF8String;
countryName, serialNumber and dnQualifier as PrintableString;
emailAddress and domainComponent as IA5String.  Attribute types not
listed keep the request's string type.

subjectAltNames (RFC 5280 §4.2.1.6):

- dNSName: ASCII host name in the preferred name syntax of RFC 1034 §3.5
  as relaxed by RFC 1123 §2.1 (labels of letters, digits and hyphens, 1 to
  63 characters, not starting or ending with a hyphen; at most 253
  characters; no trailing dot; the last label not all digits).  Wildcard
  rule: a ``*`` may only be the whole leftmost label, followed by at least
  two labels (``*.plant.example``; not ``*.example``, ``f*.example`` or
  ``a.*.example``).  Who may be given a wildcard is the policy's matter;
- iPAddress: exactly 4 or 16 octets (8 or 32 are address ranges, the
  name-constraints form);
- rfc822Name: ``local@domain`` with an RFC 5321 dot-atom local part of
  at most 64 characters and a dNSName domain (no wildcard), at most 254
  characters; quoted local parts and internationalised addresses are not
  issued;
- uniformResourceIdentifier: an absolute RFC 3986 URI (a scheme and a
  non-empty rest, only characters RFC 3986 allows, ``%`` followed by two
  hex digits); when it has an authority, its host is a dNSName or an IP
  literal (RFC 5280: never a relative URI); at most 2048 characters;
- directoryName: a non-empty name under the subject rules above;
- otherName: its value is exactly one well-formed DER value; a UPN
  (1.3.6.1.4.1.311.20.2.3) or SmtpUTF8Mailbox (RFC 9598) value is a
  UTF8String without control characters;
- registeredID: any object identifier;
- x400Address and ediPartyName are never issued (they cannot even be
  parsed: :func:`unparsable_name_refusal`).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
import warnings
from typing import Any, Iterable

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

from estgw.escape import printable
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_modules import rfc2986, rfc5280

from estgw.refusal import Refusal

__all__ = [
    "BadName",
    "ATTRIBUTES",
    "shown",
    "attribute_name",
    "check_text",
    "check_dns_name",
    "is_host_name",
    "check_ip_address",
    "check_email",
    "check_uri",
    "check_attribute",
    "check_value",
    "check_name",
    "check_general_name",
    "check_subject",
    "check_sans",
    "describe_general_name",
    "unparsable_name_refusal",
]


class BadName(ValueError):
    """A value that is not a name of its kind; the message names the
    value escaped (:func:`shown`) and says what is wrong."""


def shown(value: str | bytes, limit: int = 64) -> str:
    """A client-supplied value for a one-line reason or log line: quoted,
    escaped by :func:`estgw.escape.printable` (no raw control characters,
    no line breaks), at most ``limit`` characters of it, then ``...``."""
    return "'" + printable(value[:limit]) + "'" + ("..." if len(value) > limit else "")


# -- character strings ------------------------------------------------------------

#: The ASN.1 character-string types a subject value may arrive in.
STRING_TYPES = frozenset({
    _ASN1Type.UTF8String, _ASN1Type.PrintableString, _ASN1Type.T61String,
    _ASN1Type.UniversalString, _ASN1Type.BMPString, _ASN1Type.IA5String,
    _ASN1Type.VisibleString, _ASN1Type.NumericString,
})
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


# Characters that make a name display as something else: bidirectional
# embeddings, overrides and isolates (a "CN=x\u202egnp.exe" reads
# "x.exe..."), and the byte-order mark.
_SPOOFING = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")


def check_text(what: str, value: str) -> str:
    """No control character (Unicode category Cc: C0, DEL, C1, so NUL
    too), surrogate, line or paragraph separator, bidirectional control
    or byte-order mark; not empty or only white space."""
    if not value.strip():
        raise BadName(f"{what} is empty")
    for character in value:
        category = unicodedata.category(character)
        if category in ("Cc", "Cs", "Zl", "Zp"):
            raise BadName(f"{what} {shown(value)} contains the control character U+{ord(character):04X}")
        if character in _SPOOFING:
            raise BadName(
                f"{what} {shown(value)} contains U+{ord(character):04X}, which changes how the name is displayed"
            )
    return value


def _fits_type(kind: _ASN1Type, value: str) -> bool:
    """Whether ``value`` holds only characters its ASN.1 string type can
    (X.680): a NumericString digits and space, a PrintableString its
    small set, IA5String and VisibleString ASCII."""
    if kind is _ASN1Type.NumericString:
        return all(c in "0123456789 " for c in value)
    if kind is _ASN1Type.PrintableString:
        return _printable(value)
    if kind is _ASN1Type.IA5String:
        return _ascii(value)
    if kind is _ASN1Type.VisibleString:
        return all(0x20 <= ord(c) < 0x7F for c in value)
    return True


def _printable(value: str) -> bool:
    return all(c in _PRINTABLE for c in value)


def _ascii(value: str) -> bool:
    return all(ord(c) < 128 for c in value)


# -- host names, addresses, e-mail, URIs -----------------------------------------------

_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


def _valid_a_label(label: str) -> bool:
    """Whether an ``xn--`` label decodes as Punycode to a name that is
    not plain ASCII (an A-label, RFC 5890 §2.3.2.1)."""
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError, IndexError, OverflowError):
        return False
    # Printable (no C1 controls a garbled label decodes to), not ASCII,
    # and spelt as Punycode spells it.
    return (
        bool(decoded) and not decoded.isascii() and decoded.isprintable()
        and decoded.encode("punycode").decode("ascii").lower() == label[4:].lower()
    )


def _check_host(what: str, text: str, wildcard: bool) -> str:
    if not text:
        raise BadName(f"{what} is empty")
    for character in text:
        if unicodedata.category(character) == "Cc":
            raise BadName(f"{what} {shown(text)} is not a host name: it holds the control character U+{ord(character):04X}")
    if not _ascii(text) or not text.isprintable():
        raise BadName(f"{what} {shown(text)} is not an ASCII host name (an IDN goes in as its xn-- A-label)")
    if len(text) > 253:
        raise BadName(f"{what} {shown(text)} is longer than 253 characters")
    labels = text.split(".")
    if wildcard and labels[0] == "*":
        if len(labels) < 3:
            raise BadName(f"{what} {shown(text)}: a wildcard needs at least two labels after the '*'")
        labels = labels[1:]
    for label in labels:
        if label[:4].lower() == "xn--" and _LABEL.match(label) and not _valid_a_label(label):
            raise BadName(f"{what} {shown(text)} has the label {shown(label)}, which is not valid Punycode (RFC 3492)")
        if not _LABEL.match(label):
            if "*" in label:
                raise BadName(
                    f"{what} {shown(text)}: a wildcard '*' may only be the whole leftmost label"
                    if wildcard else f"{what} {shown(text)} may not be a wildcard"
                )
            raise BadName(
                f"{what} {shown(text)} is not a host name in preferred name syntax"
                " (labels of letters, digits and '-', 1 to 63 characters, RFC 1034 §3.5)"
            )
    if labels[-1].isdigit():
        raise BadName(f"{what} {shown(text)} is not a host name: its last label is all digits")
    return text


def check_dns_name(text: str, wildcard: bool = True) -> str:
    """A dNSName (RFC 5280 §4.2.1.6); ``wildcard``: whether the
    documented wildcard form is acceptable.  Returns it unchanged."""
    return _check_host("the dNSName subjectAltName", text, wildcard)


def is_host_name(text: str) -> bool:
    """Whether ``text`` is a dNSName without wildcard (for the copy rules)."""
    try:
        check_dns_name(text, wildcard=False)
    except BadName:
        return False
    return True


def check_ip_address(value: object) -> None:
    """An iPAddress in a certificate is one address: 4 or 16 octets."""
    if not isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise BadName(f"the iPAddress subjectAltName {value} is an address range, not an address")


_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*\Z")


def check_email(text: str, what: str = "the rfc822Name") -> str:
    """``local@domain``: a dot-atom local part (RFC 5321 §4.1.2) of at
    most 64 characters, a host-name domain, at most 254 characters."""
    if not text or not _ascii(text) or not text.isprintable():
        raise BadName(f"{what} {shown(text)} is not an ASCII e-mail address")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise BadName(f"{what} {shown(text)} is not an e-mail address (local@domain)")
    if len(text) > 254 or len(local) > 64 or not _DOT_ATOM.match(local):
        raise BadName(f"{what} {shown(text)} has a local part that is not a plain dot-atom of at most 64 characters")
    try:
        _check_host(f"{what} domain", domain, wildcard=False)
    except BadName:
        raise BadName(f"{what} {shown(text)} has no host name after the '@'") from None
    return text


_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.+)\Z", re.S)
_URI_CHARACTERS = re.compile(r"^(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2})*\Z")
_AUTHORITY = re.compile(r"^//([^/?#]*)")


def check_uri(text: str) -> str:
    """An absolute URI (RFC 3986 §4.3, RFC 5280 §4.2.1.6)."""
    if len(text) > 2048:
        raise BadName(f"the URI {shown(text)} is longer than 2048 characters")
    match = _URI.match(text)
    if match is None:
        raise BadName(f"the URI {shown(text)} has no scheme (RFC 5280: never a relative URI)")
    if not _URI_CHARACTERS.match(text):
        raise BadName(f"the URI {shown(text)} has characters RFC 3986 does not allow (percent-encode them)")
    authority = _AUTHORITY.match(match.group(2))
    if authority is not None:
        userinfo, at, host = authority.group(1).rpartition("@")
        if at and ":" in userinfo:
            # RFC 3986 §3.2.1: "user:password" in a URI is deprecated; in a
            # certificate it would publish a secret.
            raise BadName(f"the URI {shown(text)} carries a password in its user information")
        if host.startswith("["):
            literal = host[1:].partition("]")[0]
            try:
                ipaddress.IPv6Address(literal)
            except ValueError:
                raise BadName(f"the URI {shown(text)} has a malformed IP literal") from None
        else:
            host = host.rpartition(":")[0] if ":" in host else host
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                try:
                    _check_host("host", host, wildcard=False)
                except BadName:
                    raise BadName(f"the URI {shown(text)} has no host name or address in its authority") from None
    return text


# -- subject attributes ----------------------------------------------------------------

_DIRECTORY = "DirectoryString"
_NOT_DIRECTORY_STRING = frozenset({_ASN1Type.IA5String, _ASN1Type.VisibleString, _ASN1Type.NumericString})
_PRINTABLE_SYNTAX = "PrintableString"
_COUNTRY = "country"
_EMAIL = "emailAddress"
_DC = "domainComponent"
_PKCS9 = "PKCS9String"  # IA5String or DirectoryString (RFC 2985)

UNSTRUCTURED_NAME = ObjectIdentifier("1.2.840.113549.1.9.2")
UNSTRUCTURED_ADDRESS = ObjectIdentifier("1.2.840.113549.1.9.8")
UB_MATCH = 128

#: OID -> (name, syntax, upper bound in characters): RFC 5280 Appendix A,
#: X.520 and PKCS#9 (RFC 2985) bounds.
ATTRIBUTES: dict[ObjectIdentifier, tuple[str, str, int | None]] = {
    NameOID.COMMON_NAME: ("commonName", _DIRECTORY, 64),
    NameOID.SURNAME: ("surname", _DIRECTORY, 32768),
    NameOID.SERIAL_NUMBER: ("serialNumber", _PRINTABLE_SYNTAX, 64),
    NameOID.COUNTRY_NAME: ("countryName", _COUNTRY, 2),
    NameOID.LOCALITY_NAME: ("localityName", _DIRECTORY, 128),
    NameOID.STATE_OR_PROVINCE_NAME: ("stateOrProvinceName", _DIRECTORY, 128),
    NameOID.STREET_ADDRESS: ("streetAddress", _DIRECTORY, 128),
    NameOID.ORGANIZATION_NAME: ("organizationName", _DIRECTORY, 64),
    NameOID.ORGANIZATIONAL_UNIT_NAME: ("organizationalUnitName", _DIRECTORY, 64),
    NameOID.TITLE: ("title", _DIRECTORY, 64),
    NameOID.BUSINESS_CATEGORY: ("businessCategory", _DIRECTORY, 128),
    NameOID.POSTAL_CODE: ("postalCode", _DIRECTORY, 40),
    NameOID.GIVEN_NAME: ("givenName", _DIRECTORY, 32768),
    NameOID.INITIALS: ("initials", _DIRECTORY, 32768),
    NameOID.GENERATION_QUALIFIER: ("generationQualifier", _DIRECTORY, 32768),
    NameOID.DN_QUALIFIER: ("dnQualifier", _PRINTABLE_SYNTAX, None),
    NameOID.PSEUDONYM: ("pseudonym", _DIRECTORY, 128),
    NameOID.ORGANIZATION_IDENTIFIER: ("organizationIdentifier", _DIRECTORY, 64),
    NameOID.USER_ID: ("userId", _DIRECTORY, 256),
    NameOID.DOMAIN_COMPONENT: ("domainComponent", _DC, 63),
    NameOID.EMAIL_ADDRESS: ("emailAddress", _EMAIL, 255),
    NameOID.JURISDICTION_COUNTRY_NAME: ("jurisdictionCountryName", _COUNTRY, 2),
    NameOID.JURISDICTION_LOCALITY_NAME: ("jurisdictionLocalityName", _DIRECTORY, 128),
    NameOID.JURISDICTION_STATE_OR_PROVINCE_NAME: ("jurisdictionStateOrProvinceName", _DIRECTORY, 128),
    UNSTRUCTURED_NAME: ("unstructuredName", _PKCS9, 255),
    UNSTRUCTURED_ADDRESS: ("unstructuredAddress", _DIRECTORY, 255),
}


def attribute_name(oid: ObjectIdentifier) -> str:
    """The attribute's RFC name, or its dotted OID when it has none here."""
    known = ATTRIBUTES.get(oid)
    return known[0] if known is not None else oid.dotted_string


def check_attribute(attribute: x509.NameAttribute[Any]) -> x509.NameAttribute[Any]:
    """One subject attribute: checked, and returned in the encoding
    RFC 5280 asks for.  :raises BadName: saying what is wrong."""
    name, syntax, bound = ATTRIBUTES.get(attribute.oid, (attribute.oid.dotted_string, "", UB_MATCH))
    what = f"the subject attribute {name}"
    kind = attribute._type
    value = attribute.value
    if kind not in STRING_TYPES or not isinstance(value, str):
        type_name = kind.name if isinstance(kind, _ASN1Type) else type(value).__name__
        raise BadName(f"{what} is encoded as {type_name}, not as a character string")
    check_text(what, value)
    if not _fits_type(kind, value):
        raise BadName(f"{what} {shown(value)} has characters its {kind.name} cannot hold")
    if syntax == _DIRECTORY and kind in _NOT_DIRECTORY_STRING:
        # RFC 5280 §4.1.2.4: DirectoryString is one of TeletexString,
        # PrintableString, UniversalString, UTF8String, BMPString.
        raise BadName(f"{what} is encoded as {kind.name}, which is not a DirectoryString")
    if bound is not None and len(value) > bound and syntax != _COUNTRY:
        raise BadName(f"{what} {shown(value)} is longer than {bound} characters")
    if syntax == _COUNTRY:
        if not (len(value) == 2 and _ascii(value) and value.isalpha()):
            raise BadName(f"{name} must be two letters (ISO 3166), not {shown(value, 10)}")
        encoding = _ASN1Type.PrintableString
    elif syntax == _PRINTABLE_SYNTAX:
        if not _printable(value):
            raise BadName(f"{what} {shown(value)} has characters a PrintableString cannot hold")
        encoding = _ASN1Type.PrintableString
    elif syntax == _EMAIL:
        check_email(value, what)
        encoding = _ASN1Type.IA5String
    elif syntax == _DC:
        if not _LABEL.match(value):
            raise BadName(f"{what} {shown(value)} is not one DNS label (letters, digits and '-')")
        encoding = _ASN1Type.IA5String
    elif syntax in (_DIRECTORY, _PKCS9):
        # RFC 5280 §4.1.2.4: PrintableString or UTF8String; PrintableString
        # kept where the request used it (renewals compare names).
        if kind is _ASN1Type.PrintableString and _printable(value):
            encoding = _ASN1Type.PrintableString
        elif syntax == _PKCS9 and kind is _ASN1Type.IA5String and _ascii(value):
            encoding = _ASN1Type.IA5String
        else:
            encoding = _ASN1Type.UTF8String
    else:
        encoding = kind  # a type we know no syntax of: as the request had it
    if encoding is attribute._type:
        return attribute
    with warnings.catch_warnings():
        # cryptography counts a commonName's bound in UTF-8 bytes, RFC 5280
        # in characters: the bound was checked above.
        warnings.simplefilter("ignore")
        return x509.NameAttribute(attribute.oid, value, _type=encoding, _validate=False)


def check_value(oid: ObjectIdentifier, value: str) -> None:
    """A subject value an operator registers (as a UTF8String, the type
    it would be given): :func:`check_attribute`.  :raises BadName:"""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's own bounds: checked here
        attribute = x509.NameAttribute(oid, value, _validate=False)
    check_attribute(attribute)


def check_name(name: x509.Name) -> x509.Name:
    """Every attribute of ``name`` checked and re-encoded (the RDN
    structure is kept).  :raises BadName:"""
    rdns = []
    for rdn in name.rdns:
        rdns.append(x509.RelativeDistinguishedName([check_attribute(a) for a in rdn]))
    return x509.Name(rdns)


_UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
_SMTP_UTF8_MAILBOX = ObjectIdentifier("1.3.6.1.5.5.7.8.9")


def _check_other_name(name: x509.OtherName) -> None:
    what = f"the otherName subjectAltName {name.type_id.dotted_string}"
    try:
        decoded, rest = der_decoder.decode(name.value)
    except (PyAsn1Error, ValueError, TypeError):
        raise BadName(f"{what} is not a well-formed DER value") from None
    if rest:
        raise BadName(f"{what} holds more than one DER value")
    if name.type_id in (_UPN, _SMTP_UTF8_MAILBOX):
        if name.value[:1] != b"\x0c":
            raise BadName(f"{what} must be a UTF8String")
        try:
            text = bytes(decoded).decode("utf-8")
        except (UnicodeDecodeError, TypeError):
            raise BadName(f"{what} is not valid UTF-8") from None
        check_text(what, text)


def check_general_name(name: x509.GeneralName) -> x509.GeneralName:
    """One subjectAltName: checked (and a directoryName re-encoded).
    :raises BadName:"""
    if isinstance(name, x509.DNSName):
        check_dns_name(name.value)
    elif isinstance(name, x509.IPAddress):
        check_ip_address(name.value)
    elif isinstance(name, x509.RFC822Name):
        check_email(name.value)
    elif isinstance(name, x509.UniformResourceIdentifier):
        check_uri(name.value)
    elif isinstance(name, x509.DirectoryName):
        if len(name.value) == 0:
            raise BadName("the directoryName subjectAltName is empty")
        try:
            return x509.DirectoryName(check_name(name.value))
        except BadName as e:
            raise BadName(f"the directoryName subjectAltName: {e}") from None
    elif isinstance(name, x509.OtherName):
        _check_other_name(name)
    elif not isinstance(name, x509.RegisteredID):
        raise BadName(f"a {type(name).__name__} subjectAltName is not issued")
    return name


def check_subject(subject: x509.Name) -> x509.Name:
    """:func:`check_name` as a refusal: ``400 csr-bad-subject``."""
    try:
        return check_name(subject)
    except BadName as e:
        raise Refusal(400, "csr-bad-subject", str(e)) from None


def check_sans(sans: Iterable[x509.GeneralName]) -> tuple[x509.GeneralName, ...]:
    """:func:`check_general_name` of each as a refusal: ``400 csr-bad-san``."""
    try:
        checked = tuple(check_general_name(san) for san in sans)
    except BadName as e:
        raise Refusal(400, "csr-bad-san", str(e)) from None
    seen: set[object] = set()
    for san in checked:
        # A name twice adds nothing and could count twice where names
        # are counted (registered values); host names in any case.
        key = (type(san), san.value.lower()) if isinstance(san, x509.DNSName) else (type(san), san.value)
        if key in seen:
            raise Refusal(400, "csr-bad-san", f"the subjectAltName {describe_general_name(san)} appears twice")
        seen.add(key)
    return checked


def describe_general_name(name: x509.GeneralName) -> str:
    """``DNS:'x'``, ``IP:10.0.0.1``, ...: a subjectAltName for a reason."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{shown(name.value)}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{shown(name.value)}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{shown(name.value)}"
    if isinstance(name, x509.DirectoryName):
        return f"dirName:{shown(name.value.rfc4514_string())}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    return type(name).__name__


# -- names cryptography cannot even represent ---------------------------------------------

# Universal tags of the character-string types (X.680).
_STRING_TAGS = {12: "UTF8String", 18: "NumericString", 19: "PrintableString", 20: "TeletexString",
                22: "IA5String", 26: "VisibleString", 28: "UniversalString", 30: "BMPString"}
_TAG_NAMES = {1: "BOOLEAN", 2: "INTEGER", 3: "BIT STRING", 4: "OCTET STRING", 5: "NULL", 6: "OBJECT IDENTIFIER",
              16: "SEQUENCE", 17: "SET", 23: "UTCTime", 24: "GeneralizedTime"}
_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"
_SUBJECT_ALT_NAME = "2.5.29.17"


def _value_problem(what: str, der: bytes) -> str:
    tag = der[0] if der else -1
    if tag in _STRING_TAGS:
        return f"{what} is not a valid {_STRING_TAGS[tag]}"
    kind = _TAG_NAMES.get(tag & 0x1F) if tag >= 0 and not tag & 0xC0 else None
    kind = kind or f"a value of tag {tag:#04x}" if tag >= 0 else "nothing"
    return f"{what} is encoded as {kind}, not as a character string"


def _subject_problem(name: object) -> str | None:
    for rdn in name[0]:  # type: ignore[index]  # Name is a CHOICE of one: rdnSequence
        for atv in rdn:
            value = bytes(atv["value"])
            if not _decodes(value):
                oid = ObjectIdentifier(str(atv["type"]))
                return _value_problem(f"the subject attribute {attribute_name(oid)}", value)
    return None


def _decodes(der: bytes) -> bool:
    """Whether cryptography can represent this one attribute value: a
    character string whose content decodes."""
    if len(der) < 2 or der[0] not in _STRING_TAGS:
        return False
    length, offset = der[1], 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or len(der) < 2 + count:
            return False
        length, offset = int.from_bytes(der[2:2 + count], "big"), 2 + count
    if len(der) != offset + length:
        return False
    content = der[offset:]
    codec = {12: "utf-8", 30: "utf-16-be", 28: "utf-32-be"}.get(der[0], "ascii")
    try:
        content.decode(codec)
    except UnicodeDecodeError:
        return False
    return True


def _san_problem(der: bytes) -> str | None:
    try:
        sans, rest = der_decoder.decode(der, asn1Spec=rfc5280.SubjectAltName())
    except (PyAsn1Error, ValueError, TypeError):
        return "the subjectAltName extension is not well-formed DER"
    for general_name in sans:
        kind = general_name.getName()
        value = general_name.getComponent()
        if kind == "iPAddress":
            octets = bytes(value)
            if len(octets) not in (4, 8, 16, 32):
                return (
                    f"the iPAddress subjectAltName {octets.hex() or '(empty)'} has {len(octets)} octets;"
                    " an address has 4 or 16"
                )
        elif kind in ("x400Address", "ediPartyName"):
            return f"an {kind} subjectAltName is not issued"
        elif kind in ("dNSName", "rfc822Name", "uniformResourceIdentifier"):
            octets = bytes(value)
            if any(b >= 0x80 for b in octets):
                return f"the {kind} subjectAltName {shown(octets)} is not an IA5String"
        elif kind == "otherName":
            oid = str(value["type-id"])
            inner = bytes(value["value"])
            try:
                _, rest = der_decoder.decode(inner)
            except (PyAsn1Error, ValueError, TypeError):
                return f"the otherName subjectAltName {oid} is not a well-formed DER value"
        elif kind == "directoryName":
            problem = _subject_problem(value)
            if problem is not None:
                return f"the directoryName subjectAltName: {problem}"
    return None


def unparsable_name_refusal(der: bytes) -> Refusal | None:
    """For a CSR cryptography can load but whose subject or
    subjectAltName it cannot represent (an INTEGER commonName, a
    5-octet iPAddress, an x400Address): ``400 csr-bad-subject`` /
    ``csr-bad-san`` naming the culprit.  None when neither is the cause."""
    try:
        request, _ = der_decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())
        info = request["certificationRequestInfo"]
    except (PyAsn1Error, ValueError, TypeError):
        return None
    try:
        problem = _subject_problem(info["subject"])
    except (PyAsn1Error, ValueError, TypeError):
        problem = "the subject is not a well-formed name"
    if problem is not None:
        return Refusal(400, "csr-bad-subject", problem)
    try:
        for attribute in info["attributes"]:
            if str(attribute["type"]) != _EXTENSION_REQUEST:
                continue
            for values in attribute["values"]:
                extensions, _ = der_decoder.decode(bytes(values), asn1Spec=rfc5280.Extensions())
                for extension in extensions:
                    if str(extension["extnID"]) == _SUBJECT_ALT_NAME:
                        problem = _san_problem(bytes(extension["extnValue"]))
                        if problem is not None:
                            return Refusal(400, "csr-bad-san", problem)
    except (PyAsn1Error, ValueError, TypeError):
        return None
    return None
