"""Factory (authentication) certificates and expected subject values.

A device can be pre-registered with the certificate it was given at the
factory (e.g. an IEEE 802.1AR IDevID).  On a simpleenroll handler whose
token procedure sets ``estenroll.use-authentication-cert = true`` the
device must present that certificate as its TLS client certificate
(:mod:`estgw.auth` finds the registration by the SHA-256 of the DER), and
the request must carry the registered commonName and, with
``enroll.check-subject-values = true``, the registered subject values
(checked by :func:`estgw.policy.factory_certificate_matches_request`).

Registered names are ``NAME=VALUE`` pairs (``device add --subject-value``,
and ``--san KIND:VALUE`` for the subjectAltName kinds).  NAME is a subject
attribute (``serialNumber``, ``O``, ``OU``, ``C``, ``L``, ``ST``,
``emailAddress``, ``unstructuredName``, ``unstructuredAddress``, ``UID``,
``DC`` or a dotted OID) or a subjectAltName kind (``DNS``, ``IP``, ``email``,
``URI``).  A VALUE must be a well-formed name of its kind
(:mod:`estgw.names`); an empty one matches any value, and a request
without that name.  What a device may be called with them is decided by
:func:`estgw.policy.device_names`.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Iterable, Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID

from estgw import names

__all__ = [
    "read_certificate",
    "parse_subject_value",
    "parse_san",
    "registration_name",
    "san_entry",
    "same_value",
    "subject_value_mismatch",
    "common_name",
]

UNSTRUCTURED_NAME = x509.ObjectIdentifier("1.2.840.113549.1.9.2")
UNSTRUCTURED_ADDRESS = x509.ObjectIdentifier("1.2.840.113549.1.9.8")

#: Subject attribute names accepted in subject values (any letter case).
SUBJECT_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "UID": NameOID.USER_ID,
    "DC": NameOID.DOMAIN_COMPONENT,
    "unstructuredName": UNSTRUCTURED_NAME,
    "unstructuredAddress": UNSTRUCTURED_ADDRESS,
}
#: subjectAltName kinds accepted in subject values.
SAN_KINDS: dict[str, type[x509.GeneralName]] = {
    "DNS": x509.DNSName,
    "IP": x509.IPAddress,
    "email": x509.RFC822Name,
    "URI": x509.UniformResourceIdentifier,
}
_DOTTED_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\Z")


def read_certificate(path: str) -> x509.Certificate:
    """One certificate from a PEM or DER file; ValueError says what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise ValueError(f"no PEM or DER certificate in {path}") from None
    if len(certs) != 1:
        raise ValueError(f"{path} holds {len(certs)} certificates; give the device's own certificate only")
    return certs[0]


def _canonical_name(name: str) -> str:
    for known in (*SUBJECT_ATTRIBUTES, *SAN_KINDS):
        if known.lower() == name.lower():
            return known
    if _DOTTED_OID.match(name):
        return name
    known_names = ", ".join((*SUBJECT_ATTRIBUTES, *SAN_KINDS))
    raise ValueError(f"unknown subject value name {name!r} (known: {known_names} or a dotted OID)")


def parse_subject_value(text: str) -> tuple[str, str]:
    """``NAME=VALUE`` → (canonical NAME, VALUE); ValueError if malformed
    or if VALUE is not a well-formed name of its kind."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"expected NAME=VALUE, not {text!r}")
    return _registered_name(_canonical_name(name.strip()), value.strip())


def parse_san(text: str) -> tuple[str, str]:
    """``KIND:VALUE`` (``DNS:pump-17.example``, ``IP:10.0.0.17``,
    ``email:...``, ``URI:...``) → (KIND, VALUE), stored like a subject value.
    :raises ValueError: naming what is wrong."""
    kind, sep, value = text.partition(":")
    canonical = next((known for known in SAN_KINDS if known.lower() == kind.strip().lower()), None)
    if not sep or canonical is None:
        raise ValueError(f"expected KIND:VALUE with KIND one of {', '.join(SAN_KINDS)}, not {names.shown(text)}")
    if not value.strip():
        raise ValueError(f"the {canonical} name is empty")
    return _registered_name(canonical, value.strip())


def _registered_name(name: str, value: str) -> tuple[str, str]:
    if name == "CN":
        raise ValueError("the commonName is the device id (or --cn), not a registered value")
    if not value:
        return name, value
    try:
        if name == "IP":
            try:
                value = str(ipaddress.ip_address(value))
            except ValueError:
                raise ValueError(f"IP={value!r} is not an IP address") from None
        elif name == "DNS":
            names.check_dns_name(value)
        elif name == "email":
            names.check_email(value)
        elif name == "URI":
            names.check_uri(value)
        else:
            oid = SUBJECT_ATTRIBUTES.get(name) or x509.ObjectIdentifier(name)
            names.check_value(oid, value)
    except names.BadName as e:
        raise ValueError(str(e)) from None
    return name, value


def registration_name(oid: x509.ObjectIdentifier) -> str:
    """The NAME a subject attribute is registered under."""
    for name, known in SUBJECT_ATTRIBUTES.items():
        if known == oid:
            return name
    return oid.dotted_string


def san_entry(san: x509.GeneralName) -> tuple[str, str] | None:
    """A subjectAltName as a registered (KIND, VALUE); None for kinds that
    cannot be registered (directoryName, otherName, registeredID)."""
    for kind, cls in SAN_KINDS.items():
        if isinstance(san, cls):
            return kind, str(san.value)
    return None


def same_value(name: str, registered: str, value: str) -> bool:
    """Whether a requested value is the registered one: addresses as
    addresses, host names without regard to letter case, the rest exactly."""
    if name == "IP":
        return _same_address(registered, value)
    if name == "DNS":
        return registered.lower() == value.lower()
    return registered == value


def common_name(subject: x509.Name) -> str | None:
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        return None
    value = names[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _attribute_values(subject: x509.Name, oid: x509.ObjectIdentifier) -> list[str]:
    values = []
    for attribute in subject.get_attributes_for_oid(oid):
        value = attribute.value
        values.append(value if isinstance(value, str) else value.decode("utf-8", "replace"))
    return values


def _san_values(sans: Iterable[x509.GeneralName], kind: type[x509.GeneralName]) -> list[str]:
    return [str(san.value) for san in sans if isinstance(san, kind)]


def _present(name: str, subject: x509.Name, sans: Sequence[x509.GeneralName]) -> list[str]:
    if name in SAN_KINDS:
        return _san_values(sans, SAN_KINDS[name])
    oid = SUBJECT_ATTRIBUTES.get(name) or x509.ObjectIdentifier(name)
    return _attribute_values(subject, oid)


def subject_value_mismatch(
    registered: Iterable[tuple[str, str]],
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
) -> str | None:
    """The first registered value the request does not carry, described
    for the device; None when all match.  An empty value matches anything."""
    for name, expected in registered:
        if not expected:
            continue
        present = _present(name, subject, sans)
        matches = any(same_value(name, expected, value) for value in present)
        if not matches:
            found = ", ".join(repr(v) for v in present) or "none"
            return f"the request's {name} ({found}) is not the registered {expected!r}"
    return None


def _same_address(expected: str, value: str) -> bool:
    try:
        return ipaddress.ip_address(expected) == ipaddress.ip_address(value)
    except ValueError:
        return False
