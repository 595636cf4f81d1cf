"""RFC 9908 CSR attribute templates: announced by csrattrs, enforced on enroll.

``handler.<n>.csrattrs.template`` (on a csrattrs handler) describes the
request a client should send, in up to three ``;``-separated sections::

    subject: CN, O=ACME, OU ; key: ec-p256 ;
    extensions: subjectAltName=DNS:pump-17.example|IP:10.0.0.17, keyUsage!

- ``subject:`` comma-separated subject attributes, each ``NAME`` (required,
  the client chooses the value) or ``NAME=value`` (the value the server
  fixes; no commas in it).  Names: CN, C, ST, L, O, OU, serialNumber,
  emailAddress, DC, UID, title, their long forms, or a dotted OID.
- ``key:`` one key type of :mod:`estgw.keytypes` (``ec-p256`` ...).
- ``extensions:`` comma-separated ``NAME`` (required, the client chooses
  the value) or ``NAME=value``; a ``!`` after the name marks it critical.
  Names and values: ``subjectAltName=DNS:x|IP:a|URI:u|email:e``,
  ``keyUsage=digitalSignature|keyAgreement``, ``extKeyUsage=clientAuth|OID``,
  or a dotted OID with ``=der:HEX`` (the extnValue's DER).

The csrattrs response carries the CertificationRequestInfoTemplate
attribute (RFC 9908 §3.4) and, alongside it for clients that predate the
template, the same requirements in the §3.2 form: bare OIDs for subject
attributes and for extensions without a value, ``ecPublicKey`` (with the
curve) / ``rsaEncryption`` (with the size as an INTEGER) / the Ed25519
OID, and one extensionRequest attribute holding one Extensions value for
the extensions the server fixes.

:func:`csr_matches_template` is the policy check every enrollment handler
under the same CA label runs against what was announced.
"""

from __future__ import annotations

import binascii
import ipaddress
from typing import TYPE_CHECKING, Any, Sequence

import attr
from cryptography import x509
from cryptography.x509.oid import ExtensionOID, NameOID, ObjectIdentifier
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ
from pyasn1_modules import rfc5280, rfc7030

from estgw import keytypes, names, rfc9908
from estgw.protocol import CsrAttr, csrattrs_sequence, encode_base64
from estgw.refusal import Refusal

if TYPE_CHECKING:  # policy imports this module
    from estgw.policy import PolicyContext

__all__ = [
    "CsrTemplate",
    "ExtensionRequirement",
    "SubjectRequirement",
    "parse_template_setting",
    "template_der",
    "legacy_attributes",
    "encode_response",
    "csr_matches_template",
]

SUBJECT_NAMES: dict[str, ObjectIdentifier] = {
    "cn": NameOID.COMMON_NAME, "commonname": NameOID.COMMON_NAME,
    "c": NameOID.COUNTRY_NAME, "countryname": NameOID.COUNTRY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME, "stateorprovincename": NameOID.STATE_OR_PROVINCE_NAME,
    "l": NameOID.LOCALITY_NAME, "localityname": NameOID.LOCALITY_NAME,
    "o": NameOID.ORGANIZATION_NAME, "organizationname": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME, "organizationalunitname": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "serialnumber": NameOID.SERIAL_NUMBER,
    "emailaddress": NameOID.EMAIL_ADDRESS,
    "dc": NameOID.DOMAIN_COMPONENT, "domaincomponent": NameOID.DOMAIN_COMPONENT,
    "uid": NameOID.USER_ID, "userid": NameOID.USER_ID,
    "title": NameOID.TITLE,
}
# RFC 5280: countryName and serialNumber are PrintableString, the PKCS#9
# emailAddress and domainComponent IA5String, the rest UTF8String.
_PRINTABLE = (NameOID.COUNTRY_NAME, NameOID.SERIAL_NUMBER)
_IA5 = (NameOID.EMAIL_ADDRESS, NameOID.DOMAIN_COMPONENT)

EXTENSION_NAMES: dict[str, ObjectIdentifier] = {
    "subjectaltname": ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
    "keyusage": ExtensionOID.KEY_USAGE,
    "extkeyusage": ExtensionOID.EXTENDED_KEY_USAGE,
}


@attr.s(frozen=True, auto_attribs=True)
class SubjectRequirement:
    """One subject attribute the request must carry; ``value`` is the one
    the server fixes, or None when the client chooses it."""

    oid: ObjectIdentifier
    value: str | None = None

    @property
    def name(self) -> str:
        return self.oid._name if self.oid._name != "Unknown OID" else self.oid.dotted_string


@attr.s(frozen=True, auto_attribs=True)
class ExtensionRequirement:
    """One extension the request must carry; ``value`` (a cryptography
    extension, or raw extnValue DER for other OIDs) when the server fixes it."""

    oid: ObjectIdentifier
    critical: bool = False
    value: Any = attr.ib(default=None, eq=False)
    der: bytes | None = None  # the extnValue of ``value``

    @property
    def name(self) -> str:
        return self.oid._name if self.oid._name != "Unknown OID" else self.oid.dotted_string


@attr.s(frozen=True, auto_attribs=True)
class CsrTemplate:
    """What a csrattrs handler announces with ``csrattrs.template``."""

    subject: tuple[SubjectRequirement, ...] = ()
    key_type: str | None = None
    extensions: tuple[ExtensionRequirement, ...] = ()


# -- the setting ---------------------------------------------------------------


def parse_template_setting(text: str) -> CsrTemplate | None:
    """Parse ``csrattrs.template`` (syntax in the module docstring); None
    when blank.

    :raises ValueError: naming the section and item at fault.
    """
    if not text.strip():
        return None
    sections: dict[str, str] = {}
    for raw in text.split(";"):
        part = raw.strip()
        if not part:
            continue
        name, colon, rest = part.partition(":")
        name = name.strip().lower()
        if not colon or name not in ("subject", "key", "extensions"):
            raise ValueError(f"{part!r}: expected a section 'subject: ...', 'key: ...' or 'extensions: ...'")
        if name in sections:
            raise ValueError(f"section {name!r} is given twice")
        if not rest.strip():
            raise ValueError(f"section {name!r} is empty")
        sections[name] = rest.strip()
    subject = _parse_subject(sections["subject"]) if "subject" in sections else ()
    key_type = None
    if "key" in sections:
        try:
            key_type = keytypes.parse_key_type(sections["key"])
        except ValueError as e:
            raise ValueError(f"key: {e}") from None
    extensions = _parse_extensions(sections["extensions"]) if "extensions" in sections else ()
    return CsrTemplate(subject, key_type, extensions)


def _items(text: str, section: str) -> list[str]:
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise ValueError(f"{section}: empty item in {text!r}")
    return items


def _oid_or_name(token: str, names: dict[str, ObjectIdentifier], section: str, item: str) -> ObjectIdentifier:
    if token[:1].isdigit():
        try:
            return ObjectIdentifier(token)
        except ValueError:
            raise ValueError(f"{section}: {item!r}: malformed OID {token!r}") from None
    oid = names.get(token.lower())
    if oid is None:
        raise ValueError(f"{section}: {item!r}: unknown name {token!r}")
    return oid


def _parse_subject(text: str) -> tuple[SubjectRequirement, ...]:
    result: list[SubjectRequirement] = []
    for item in _items(text, "subject"):
        name, has_value, value = item.partition("=")
        oid = _oid_or_name(name.strip(), SUBJECT_NAMES, "subject", item)
        fixed = value.strip() if has_value else None
        if has_value and not fixed:
            raise ValueError(f"subject: {item!r}: empty value")
        if fixed is not None and oid == NameOID.COUNTRY_NAME and not (len(fixed) == 2 and fixed.isascii() and fixed.isalpha()):
            raise ValueError(f"subject: {item!r}: countryName must be two letters")
        if fixed is not None:
            try:
                names.check_value(oid, fixed)
            except names.BadName as e:
                raise ValueError(f"subject: {item!r}: {e}") from None
        result.append(SubjectRequirement(oid, fixed))
    return tuple(result)


def _parse_extensions(text: str) -> tuple[ExtensionRequirement, ...]:
    result: list[ExtensionRequirement] = []
    seen: set[ObjectIdentifier] = set()
    for item in _items(text, "extensions"):
        name, has_value, value = item.partition("=")
        name = name.strip()
        critical = name.endswith("!")
        oid = _oid_or_name(name.rstrip("!").strip(), EXTENSION_NAMES, "extensions", item)
        if oid in seen:
            raise ValueError(f"extensions: {item!r}: listed twice")
        seen.add(oid)
        if not has_value:
            result.append(ExtensionRequirement(oid, critical))
            continue
        if not value.strip():
            raise ValueError(f"extensions: {item!r}: empty value")
        extension, der = _extension_value(oid, value.strip(), item)
        result.append(ExtensionRequirement(oid, critical, extension, der))
    return tuple(result)


def _extension_value(oid: ObjectIdentifier, text: str, item: str) -> tuple[Any, bytes]:
    from estgw.ca import EXTENDED_KEY_USAGE_NAMES, KEY_USAGE_NAMES

    parts = [part.strip() for part in text.split("|")]
    if not all(parts):
        raise ValueError(f"extensions: {item!r}: empty value")
    value: Any
    if oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        general_names = [_general_name(part, item) for part in parts]
        try:
            # The same checks a CSR's names pass: never announce a name
            # the gateway would refuse.
            names.check_sans(general_names)
        except Refusal as e:
            raise ValueError(f"extensions: {item!r}: {e.reason}") from None
        value = x509.SubjectAlternativeName(general_names)
    elif oid == ExtensionOID.KEY_USAGE:
        fields = dict.fromkeys(set(KEY_USAGE_NAMES.values()), False)
        for part in parts:
            if part not in KEY_USAGE_NAMES:
                raise ValueError(f"extensions: {item!r}: unknown key usage {part!r}")
            fields[KEY_USAGE_NAMES[part]] = True
        try:
            value = x509.KeyUsage(**fields)
        except ValueError as e:  # encipherOnly without keyAgreement
            raise ValueError(f"extensions: {item!r}: {e}") from None
    elif oid == ExtensionOID.EXTENDED_KEY_USAGE:
        usages = []
        for part in parts:
            if part in EXTENDED_KEY_USAGE_NAMES:
                usages.append(EXTENDED_KEY_USAGE_NAMES[part])
            else:
                usages.append(_oid_or_name(part, {}, "extensions", item))
        value = x509.ExtendedKeyUsage(usages)
    else:
        if len(parts) != 1 or not parts[0].lower().startswith("der:"):
            raise ValueError(f"extensions: {item!r}: the value of {oid.dotted_string} is der:HEX")
        try:
            der = binascii.unhexlify(parts[0][4:].replace(":", ""))
        except (binascii.Error, ValueError):
            raise ValueError(f"extensions: {item!r}: der: takes hexadecimal digits") from None
        if not der:
            raise ValueError(f"extensions: {item!r}: empty value")
        # extnValue holds exactly one DER value (RFC 5280 §4.1): what csrattrs
        # announces must decode, and re-encode to the same bytes.
        try:
            decoded, rest = der_decoder.decode(der)
            canonical = der_encoder.encode(decoded)
        except (PyAsn1Error, ValueError, TypeError):
            raise ValueError(f"extensions: {item!r}: der: is not a well-formed DER value") from None
        if rest:
            raise ValueError(f"extensions: {item!r}: der: holds more than one DER value")
        if canonical != der:
            raise ValueError(f"extensions: {item!r}: der: is BER, not DER")
        return x509.UnrecognizedExtension(oid, der), der
    return value, value.public_bytes()


def _general_name(text: str, item: str) -> x509.GeneralName:
    kind, colon, value = text.partition(":")
    kind = kind.strip().upper()
    value = value.strip()
    if not colon or not value:
        raise ValueError(f"extensions: {item!r}: a subjectAltName is DNS:, IP:, URI: or email:, not {text!r}")
    if kind == "DNS":
        return x509.DNSName(value)
    if kind == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise ValueError(f"extensions: {item!r}: {value!r} is not an IP address") from None
    if kind == "URI":
        return x509.UniformResourceIdentifier(value)
    if kind == "EMAIL":
        return x509.RFC822Name(value)
    raise ValueError(f"extensions: {item!r}: a subjectAltName is DNS:, IP:, URI: or email:, not {text!r}")


# -- encoding (RFC 9908 §3.2 and §3.4) -----------------------------------------


def _oid(value: ObjectIdentifier | str) -> univ.ObjectIdentifier:
    return univ.ObjectIdentifier(value.dotted_string if isinstance(value, ObjectIdentifier) else value)


def _directory_string(oid: ObjectIdentifier, value: str) -> bytes:
    if oid in _PRINTABLE:
        return der_encoder.encode(char.PrintableString(value))
    if oid in _IA5:
        return der_encoder.encode(char.IA5String(value))
    return der_encoder.encode(char.UTF8String(value))


def _algorithm(key_type: str) -> tuple[rfc5280.AlgorithmIdentifier, bytes | None]:
    """The AlgorithmIdentifier of a key type, and for RSA a placeholder
    RSAPublicKey whose modulus has the announced size (RFC 9908 §3.4)."""
    algorithm = rfc5280.AlgorithmIdentifier()
    bits = keytypes.rsa_bits(key_type)
    if bits is not None:
        algorithm["algorithm"] = _oid(keytypes.RSA_ENCRYPTION)
        algorithm["parameters"] = der_encoder.encode(univ.Null(""))
        placeholder = univ.Sequence()
        placeholder.setComponentByPosition(0, univ.Integer(1 << (bits - 1)))
        placeholder.setComponentByPosition(1, univ.Integer(65537))
        return algorithm, der_encoder.encode(placeholder)
    if key_type == "ed25519":
        algorithm["algorithm"] = _oid(keytypes.ED25519)
        return algorithm, None
    algorithm["algorithm"] = _oid(keytypes.EC_PUBLIC_KEY)
    algorithm["parameters"] = der_encoder.encode(_oid(keytypes.CURVE_OIDS[key_type]))
    return algorithm, None


def _extensions_der(requirements: Sequence[ExtensionRequirement]) -> bytes:
    """Extensions ::= SEQUENCE OF Extension, all with values."""
    extensions = rfc5280.Extensions()
    for requirement in requirements:
        extension = rfc5280.Extension()
        extension["extnID"] = _oid(requirement.oid)
        if requirement.critical:
            extension["critical"] = True
        extension["extnValue"] = requirement.der
        extensions.append(extension)
    return der_encoder.encode(extensions)


def _attribute(oid: ObjectIdentifier | str | univ.ObjectIdentifier, *values_der: bytes) -> rfc5280.Attribute:
    attribute = rfc5280.Attribute()
    attribute["type"] = oid if isinstance(oid, univ.ObjectIdentifier) else _oid(oid)
    for value in values_der:
        attribute["values"].append(value)
    return attribute


def template_der(template: CsrTemplate) -> bytes:
    """The DER CertificationRequestInfoTemplate (RFC 9908 §3.4)."""
    info = rfc9908.CertificationRequestInfoTemplate()
    info["version"] = 0
    if template.subject:
        rdns = info["subject"]["rdnSequence"]
        for requirement in template.subject:
            single = rfc9908.SingleAttributeTemplate()
            single["type"] = _oid(requirement.oid)
            if requirement.value is not None:
                single["value"] = _directory_string(requirement.oid, requirement.value)
            rdn = rfc9908.RelativeDistinguishedNameTemplate()
            rdn.append(single)
            rdns.append(rdn)
    if template.key_type is not None:
        algorithm, placeholder = _algorithm(template.key_type)
        spki = info["subjectPKInfo"]
        spki["algorithm"] = algorithm
        if placeholder is not None:
            spki["subjectPublicKey"] = univ.BitString.fromOctetString(placeholder)
    attributes = info["attributes"]
    if template.extensions:
        # Never both extension attributes (RFC 9908 §3.4): extensionRequest
        # when the server fixes every value, else the template form.
        if all(r.der is not None for r in template.extensions):
            attributes.append(_attribute(rfc9908.id_ExtensionReq, _extensions_der(template.extensions)))
        else:
            templates = rfc9908.ExtensionReqTemplate()
            for extension in template.extensions:
                entry = rfc9908.ExtensionTemplate()
                entry["extnID"] = _oid(extension.oid)
                if extension.critical:
                    entry["critical"] = True
                if extension.der is not None:
                    entry["extnValue"] = extension.der
                templates.append(entry)
            attributes.append(_attribute(rfc9908.id_aa_extensionReqTemplate, der_encoder.encode(templates)))
    return der_encoder.encode(info)


def legacy_attributes(template: CsrTemplate) -> tuple[CsrAttr, ...]:
    """The template's requirements that RFC 9908 §3.2 can say with OIDs:
    subject attribute types, the key type, extensions without a value."""
    result: list[CsrAttr] = [CsrAttr(r.oid.dotted_string) for r in template.subject]
    if template.key_type is not None and keytypes.rsa_bits(template.key_type) is None:
        if template.key_type == "ed25519":
            result.append(CsrAttr(keytypes.ED25519))
        else:
            result.append(CsrAttr(keytypes.EC_PUBLIC_KEY, (keytypes.CURVE_OIDS[template.key_type],)))
    result.extend(CsrAttr(r.oid.dotted_string) for r in template.extensions if r.der is None)
    # One entry per OID: the same subject attribute may be required twice (OU, OU).
    return tuple(dict.fromkeys(result))


def encode_response(attributes: Sequence[CsrAttr], template: CsrTemplate | None) -> bytes:
    """The csrattrs body: the handler's §3.2 ``attributes``, the template's
    requirements in the §3.2 form, and the template itself (base64 DER).

    :raises ValueError: from :func:`estgw.protocol.csrattrs_sequence`.
    """
    if template is None:
        return encode_base64(der_encoder.encode(csrattrs_sequence(attributes)))
    given = {a.oid for a in attributes}
    legacy = [a for a in legacy_attributes(template) if a.oid not in given]
    seq = csrattrs_sequence(tuple(attributes) + tuple(legacy))
    bits = keytypes.rsa_bits(template.key_type or "")
    if bits is not None and keytypes.RSA_ENCRYPTION not in given:
        # The RSA size is an INTEGER value, which CsrAttr (OID values) cannot hold.
        seq.append(_attr_or_oid(_attribute(keytypes.RSA_ENCRYPTION, der_encoder.encode(univ.Integer(bits)))))
    fixed = [r for r in template.extensions if r.der is not None]
    if fixed:
        # Exactly one Extensions value (RFC 9908 §3.2).
        seq.append(_attr_or_oid(_attribute(rfc9908.id_ExtensionReq, _extensions_der(fixed))))
    seq.append(_attr_or_oid(_attribute(rfc9908.id_aa_certificationRequestInfoTemplate, template_der(template))))
    return encode_base64(der_encoder.encode(seq))


def _attr_or_oid(attribute: rfc5280.Attribute) -> rfc7030.AttrOrOID:
    choice = rfc7030.AttrOrOID()
    target = choice["attribute"]
    target["attrType"] = attribute["type"]
    for value in attribute["values"]:
        target["attrValues"].append(value)
    return choice


# -- the check on incoming CSRs -------------------------------------------------


def _refuse(code: str, reason: str) -> Refusal:
    return Refusal(403, code, reason)


def csr_matches_template(ctx: "PolicyContext") -> None:
    """A request carries what the csrattrs template of its CA label
    announced: every subject attribute (with the fixed value where there
    is one), the key type, every extension (with the fixed value).  The
    key is not checked on serverkeygen: the server makes that key."""
    template: CsrTemplate | None = getattr(ctx.handler, "csr_template", None)
    if template is None:
        return
    for requirement in template.subject:
        values = [a.value for a in ctx.subject.get_attributes_for_oid(requirement.oid)]
        if not values:
            raise _refuse(
                "csr-template-subject",
                f"the CSR subject lacks {requirement.name}, which csrattrs announces as required",
            )
        if requirement.value is not None and requirement.value not in values:
            raise _refuse(
                "csr-template-subject",
                f"the CSR subject {requirement.name} must be {requirement.value!r}, as csrattrs announces",
            )
    if template.key_type is not None and ctx.operation != "serverkeygen":
        public_key = ctx.csr.public_key()
        if keytypes.key_type_of(public_key) != template.key_type:
            raise _refuse(
                "csr-template-key",
                f"the CSR key is {keytypes.describe(public_key)}; csrattrs announces {template.key_type}",
            )
    for extension in template.extensions:
        _check_extension(ctx, extension)


def _check_critical(ctx: "PolicyContext", requirement: ExtensionRequirement, present: Any = None) -> None:
    """An extension announced with ``!`` must be marked critical in the CSR
    (the template's ``critical`` field, RFC 9908 §3.4).  ``present``: the
    CSR's extension when the caller already looked it up."""
    if not requirement.critical:
        return
    if present is None:
        try:
            present = ctx.csr.extensions.get_extension_for_oid(requirement.oid)
        except x509.ExtensionNotFound:
            raise _refuse(
                "csr-template-extension",
                f"the CSR lacks a critical {requirement.name}, which csrattrs announces as required",
            ) from None
    if not present.critical:
        raise _refuse(
            "csr-template-extension",
            f"the CSR {requirement.name} is not marked critical, as csrattrs announces it",
        )


def _check_extension(ctx: "PolicyContext", requirement: ExtensionRequirement) -> None:
    if requirement.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        # After the SAN copy rules: the names that would be issued.
        if not ctx.sans:
            raise _refuse(
                "csr-template-extension",
                "the CSR lacks subjectAltName, which csrattrs announces as required",
            )
        if requirement.value is not None and (
            {names.comparison_key(n) for n in ctx.sans} != {names.comparison_key(n) for n in requirement.value}
        ):
            raise _refuse(
                "csr-template-extension",
                "the CSR subjectAltName differs from the one csrattrs announces",
            )
        _check_critical(ctx, requirement)
        return
    try:
        present = ctx.csr.extensions.get_extension_for_oid(requirement.oid)
    except x509.ExtensionNotFound:
        raise _refuse(
            "csr-template-extension",
            f"the CSR lacks {requirement.name}, which csrattrs announces as required",
        ) from None
    if requirement.der is not None and present.value.public_bytes() != requirement.der:
        raise _refuse(
            "csr-template-extension",
            f"the CSR {requirement.name} differs from the value csrattrs announces",
        )
    _check_critical(ctx, requirement, present)
