"""Token procedures: the certificate authorities that issue device certificates.

A token procedure (the model product's word for "a CA profile that
issues") is anything providing :class:`ITokenProcedure`: ``issue`` returns
a Deferred so that a remote CA can be plugged in without touching the
handlers.

This package holds what every kind shares (the interface, the request,
the :class:`Profile` of what goes into a certificate); each kind of token
procedure is one module (:mod:`estgw.ca.local`, the embedded CA, ...),
and :mod:`estgw.ca.factory` builds the one ``tokenprocedure.<n>.ca``
names.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

import attr
from cryptography import x509
from cryptography.x509 import ocsp
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "CAError",
    "CASettingError",
    "ISigningCA",
    "ITokenProcedure",
    "IssueRequest",
    "LocalCA",
    "LocalTokenProcedure",
    "PrivateKey",
    "Profile",
]

#: Private key types we can sign with (and so load as a server key).
PrivateKey = CertificateIssuerPrivateKeyTypes


class CAError(Exception):
    """The CA cannot be loaded, created or used; the message says why."""


class CASettingError(CAError):
    """A token procedure setting is wrong: ``key`` is its name after
    ``tokenprocedure.<n>.`` (``file.key``), the message says why."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# --- requests and profiles -------------------------------------------------


def _general_names(names: Iterable[x509.GeneralName]) -> tuple[x509.GeneralName, ...]:
    return tuple(names)


@attr.s(frozen=True, auto_attribs=True)
class IssueRequest:
    """What the checked and rewritten PKCS#10 request asks to be certified."""

    subject: x509.Name
    public_key: CertificatePublicKeyTypes
    sans: tuple[x509.GeneralName, ...] = attr.ib(default=(), converter=_general_names)
    #: The DER PKCS#10 request exactly as the client signed it: what a
    #: token procedure that forwards to another CA sends on (it cannot
    #: re-sign a request with the client's key); b"" when there is none.
    csr: bytes = attr.ib(default=b"", repr=False)


#: RFC 5280 camelCase key usage names -> x509.KeyUsage field names.
KEY_USAGE_NAMES: dict[str, str] = {
    "digitalSignature": "digital_signature",
    "nonRepudiation": "content_commitment",
    "contentCommitment": "content_commitment",  # X.509 (2008) name of the same bit
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
    "encipherOnly": "encipher_only",
    "decipherOnly": "decipher_only",
}
_KEY_USAGE_FIELDS = frozenset(KEY_USAGE_NAMES.values())

EXTENDED_KEY_USAGE_NAMES: dict[str, x509.ObjectIdentifier] = {
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
}

_DOTTED_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+\Z")


def _check_validity(instance: object, attribute: attr.Attribute[timedelta], value: timedelta) -> None:
    if value <= timedelta(0):
        raise ValueError(f"validity must be positive, not {value}")


def _check_key_usage(instance: object, attribute: attr.Attribute[frozenset[str]], value: frozenset[str]) -> None:
    unknown = sorted(value - _KEY_USAGE_FIELDS)
    if unknown:
        raise ValueError(f"unknown key usage {', '.join(unknown)}")
    # Every certificate this CA signs has cA=FALSE, and RFC 5280 4.2.1.3
    # forbids keyCertSign without cA=TRUE: verifiers reject such leaves.
    if "key_cert_sign" in value:
        raise ValueError(
            "key usage keyCertSign is for CA certificates; this CA issues end-entity certificates only"
        )
    # RFC 5280 4.2.1.3: the two *Only bits are meaningful only with keyAgreement.
    for only in ("encipher_only", "decipher_only"):
        if only in value and "key_agreement" not in value:
            raise ValueError(f"key usage {_camel(only)} requires keyAgreement")


# Typed attrs converters (frozenset/tuple themselves leave mypy unsure of the type).
def _names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(values)


def _unique_oids(oids: Iterable[x509.ObjectIdentifier]) -> tuple[x509.ObjectIdentifier, ...]:
    """Duplicates dropped, order kept."""
    return tuple(dict.fromkeys(oids))


def _camel(field: str) -> str:
    for name, f in KEY_USAGE_NAMES.items():
        if f == field:
            return name
    return field  # pragma: no cover - only called with known fields


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _lookup(name: str, table: dict[str, object]) -> object | None:
    # Config files are typed by hand: accept any letter case.
    for key, found in table.items():
        if key.lower() == name.lower():
            return found
    return None


@attr.s(frozen=True, auto_attribs=True)
class Profile:
    """What a token procedure puts into the certificates it issues."""

    validity: timedelta = attr.ib(default=timedelta(days=365), validator=_check_validity)
    #: x509.KeyUsage field names; empty means no KeyUsage extension.
    key_usage: frozenset[str] = attr.ib(
        default=frozenset({"digital_signature", "key_encipherment"}),
        converter=_names,
        validator=_check_key_usage,
    )
    #: Empty means no ExtendedKeyUsage extension.
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = attr.ib(
        default=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        converter=_unique_oids,
    )
    #: Where relying parties find the CRL (RFC 5280 4.2.1.13 CRL
    #: distribution point), the OCSP responder and the issuer's certificate
    #: (4.2.2.1 authority information access); "" leaves it out.
    crl_url: str = ""
    ocsp_url: str = ""
    ca_issuers_url: str = ""

    @classmethod
    def from_settings(cls, validity_days: int, key_usage: str, extended_key_usage: str) -> "Profile":
        """Build a profile from configuration strings.

        ``key_usage`` is a comma list of RFC 5280 names (``digitalSignature,
        keyEncipherment``), ``extended_key_usage`` a comma list of names
        (``clientAuth``, ``serverAuth``, ...) or dotted OIDs. Names are
        matched without regard to case. Raises ValueError naming the first
        bad value.
        """
        if validity_days < 1:
            raise ValueError(f"validity must be at least 1 day, not {validity_days}")
        usages = set()
        for name in _split(key_usage):
            found = _lookup(name, KEY_USAGE_NAMES)  # type: ignore[arg-type]
            if found is None:
                raise ValueError(
                    f"unknown key usage {name!r} (known: {', '.join(KEY_USAGE_NAMES)})"
                )
            usages.add(str(found))
        ekus: list[x509.ObjectIdentifier] = []
        for name in _split(extended_key_usage):
            oid = _lookup(name, EXTENDED_KEY_USAGE_NAMES)  # type: ignore[arg-type]
            if oid is None and _DOTTED_OID.match(name):
                oid = x509.ObjectIdentifier(name)
            if oid is None:
                raise ValueError(
                    f"unknown extended key usage {name!r} (known: "
                    f"{', '.join(EXTENDED_KEY_USAGE_NAMES)} or a dotted OID)"
                )
            assert isinstance(oid, x509.ObjectIdentifier)
            ekus.append(oid)
        return cls(
            validity=timedelta(days=validity_days),
            key_usage=frozenset(usages),
            extended_key_usage=tuple(ekus),
        )


# --- the interface ----------------------------------------------------------


class ITokenProcedure(Interface):
    """A CA profile that issues certificates, possibly far away."""

    name = Attribute("The token procedure's name as the configuration spells it.")

    def issue(request: IssueRequest) -> "Deferred[x509.Certificate]":
        """Issue a certificate for ``request``; the Deferred fires with it."""

    def chain() -> list[x509.Certificate]:
        """The issuing CA certificate first, then up to and including the root."""


class ISigningCA(Interface):
    """An issuing CA whose signatures this process makes (in memory, or in
    an HSM): what the publishing listener (:mod:`estgw.ca.publish`) and
    ``estgw crl write`` need. A token procedure whose ``issuers()`` returns
    providers of this (current CA first, then earlier generations) has its
    CRLs and OCSP published; :class:`estgw.ca.signing.SigningCA` is the
    implementation for keys held in memory."""

    issuing = Attribute("The issuing CA certificate (x509.Certificate).")
    directory = Attribute("A directory of the gateway's own for this CA: its crl.pem, CRL number, responder.")

    def home() -> str:
        """Where this CA's crl.pem and delegated responder are kept now:
        ``directory``, or where a rollover while the gateway runs moved them."""
    key_id = Attribute("Hex of the issuing CA's key identifier ({ca} in profile URLs).")

    def issued(cert: x509.Certificate) -> bool:
        """Whether this CA signed ``cert``."""

    def sign(
        request: IssueRequest,
        profile: "Profile",
        now: datetime | None = None,
        extra: Sequence[x509.ExtensionType] = (),
    ) -> x509.Certificate:
        """Sign an end-entity certificate (synchronously; callers use a thread)."""

    def write_crl(
        revoked: Sequence[Any], next_update: timedelta = timedelta(days=7), now: datetime | None = None
    ) -> x509.CertificateRevocationList:
        """Sign (and keep in ``directory``) the CRL of ``revoked`` entries, synchronously."""

    def sign_ocsp(builder: ocsp.OCSPResponseBuilder, more: Sequence[bytes] = ()) -> ocsp.OCSPResponse:
        """Sign an OCSP response builder as this CA, synchronously, with the
        DER SingleResponses ``more`` (RFC 6960 4.2.1) after the builder's
        one. CAError: the CA cannot sign now."""


def key_usage_extension(fields: frozenset[str]) -> x509.KeyUsage:
    """The KeyUsage extension with exactly ``fields`` (x509.KeyUsage names) set."""
    return x509.KeyUsage(**{field: field in fields for field in sorted(_KEY_USAGE_FIELDS)})


# What a key can do, whatever the profile asks: an EC or EdDSA key cannot
# encipher keys or data (RFC 8813 §3, RFC 8410 §5), so those bits are left
# out for it; RSA keys take every usage.
_ENCIPHERMENT = frozenset({"key_encipherment", "data_encipherment"})


def usages_for_key(fields: frozenset[str], public_key: object) -> frozenset[str]:
    """``fields`` (x509.KeyUsage names) without those ``public_key`` cannot have."""
    if isinstance(public_key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return fields - _ENCIPHERMENT
    return fields


# Re-exported: callers import the embedded CA from here.
from estgw.ca.signing import CRL_FILE as CRL_FILE  # noqa: E402
from estgw.ca.local import (  # noqa: E402
    CA_FILES,
    ISSUING_CERT,
    ISSUING_KEY,
    ROOT_CERT,
    ROOT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    LocalCA,
    LocalTokenProcedure,
)
