"""Token procedures: the certificate authorities that issue device certificates.

A token procedure (the model product's word for "a CA profile that
issues") is anything providing :class:`ITokenProcedure`: ``issue`` returns
a Deferred so that a remote CA can be plugged in later without touching
the handlers.

The embedded default is :class:`LocalCA`, a two-level CA (self-signed root
plus an issuing CA) whose keys and certificates live in one directory and
are created on first start, and :class:`LocalTokenProcedure`, which signs
with it on a thread pool so that the reactor never waits for a signature.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Iterator, Sequence

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

try:  # POSIX only; without it concurrent first starts are merely unserialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CAError",
    "ITokenProcedure",
    "IssueRequest",
    "LocalCA",
    "LocalTokenProcedure",
    "PrivateKey",
    "Profile",
]

#: Private key types we can sign with (and so load as a server key).
PrivateKey = CertificateIssuerPrivateKeyTypes

ORGANIZATION = "estgw"

#: Devices' clocks drift; a certificate that is "not yet valid" for a
#: device a minute behind would fail its first TLS handshake.
CLOCK_SKEW = timedelta(minutes=5)
ROOT_VALIDITY = timedelta(days=round(20 * 365.25))
ISSUING_VALIDITY = timedelta(days=round(10 * 365.25))
SERVER_VALIDITY = timedelta(days=365)
#: A server certificate closer than this to its end is replaced on start,
#: so a long-running deployment does not discover the expiry from clients.
SERVER_RENEW_BEFORE = timedelta(days=30)

ROOT_CERT = "root-ca.pem"
ROOT_KEY = "root-ca.key"
ISSUING_CERT = "issuing-ca.pem"
ISSUING_KEY = "issuing-ca.key"
CA_FILES = (ROOT_CERT, ROOT_KEY, ISSUING_CERT, ISSUING_KEY)
CRL_FILE = "crl.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

_KEY_MODE = 0o600
_CERT_MODE = 0o644  # certificates are public; the 0700 directory still guards them
_DIR_MODE = 0o700


class CAError(Exception):
    """The CA cannot be loaded, created or used; the message says why."""


# --- requests and profiles -------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class IssueRequest:
    """What the checked and rewritten PKCS#10 request asks to be certified."""

    subject: x509.Name
    public_key: CertificatePublicKeyTypes
    sans: tuple[x509.GeneralName, ...] = attr.ib(default=(), converter=tuple)


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

_DOTTED_OID = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


def _check_validity(instance: object, attribute: attr.Attribute, value: timedelta) -> None:
    if value <= timedelta(0):
        raise ValueError(f"validity must be positive, not {value}")


def _check_key_usage(instance: object, attribute: attr.Attribute, value: frozenset[str]) -> None:
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
        converter=frozenset,
        validator=_check_key_usage,
    )
    #: Empty means no ExtendedKeyUsage extension.
    extended_key_usage: tuple[x509.ObjectIdentifier, ...] = attr.ib(
        default=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        converter=lambda v: tuple(dict.fromkeys(v)),  # drop duplicates, keep order
    )

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


# --- files ------------------------------------------------------------------


def _utc(when: datetime | None) -> datetime:
    if when is None:
        return datetime.now(timezone.utc)
    if when.tzinfo is None:  # cryptography's own convention: naive means UTC
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _ensure_directory(directory: str) -> None:
    try:
        os.makedirs(directory, mode=_DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(directory):
            raise CAError(f"{directory} exists and is not a directory")
        return  # the operator's directory; its mode is theirs to choose
    except OSError as e:
        raise CAError(f"cannot create {directory}: {e.strerror}") from e
    os.chmod(directory, _DIR_MODE)  # makedirs' mode is subject to the umask


@contextmanager
def _locked(directory: str) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``.

    Several gateway processes may start at once on one CA directory; the
    lock makes exactly one of them create the CA (or the server
    certificate) and the others load it.
    """
    fd = os.open(directory, os.O_RDONLY)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write ``path`` so that it is either absent, old, or complete."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".")
    try:
        try:
            os.fchmod(fd, mode)  # mkstemp makes 0600; certificates are 0644
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def _write_key(path: str, key: PrivateKey) -> None:
    # Unencrypted PKCS#8: the gateway must start unattended, so there is no
    # one to type a passphrase. The 0700 directory and the 0600 file are
    # what protect the key.
    _write_atomically(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        _KEY_MODE,
    )


def _write_cert(path: str, cert: x509.Certificate) -> None:
    _write_atomically(path, cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CAError(f"cannot read {path}: {e.strerror}") from e


def _load_cert(path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as e:
        raise CAError(f"{path} is not a PEM certificate: {e}") from e


def _load_key(path: str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise CAError(f"{path} is not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):  # type: ignore[misc, arg-type]
        raise CAError(f"{path} holds a {type(key).__name__}, which cannot sign certificates")
    return key


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_pair(cert_path: str, cert: x509.Certificate, key_path: str, key: PrivateKey) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise CAError(f"{key_path} is not the key of {cert_path}")


def _new_key() -> ec.EllipticCurvePrivateKey:
    # EC P-256: an ECDSA signature costs tens of microseconds against about
    # a millisecond for RSA-2048 (what matters for signing on every
    # enrollment), certificates are smaller, and every TLS 1.2+ stack and
    # EST client we target verifies it.
    return ec.generate_private_key(ec.SECP256R1())


def _ca_name(name: str, role: str) -> x509.Name:
    try:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} {role}"),
            ]
        )
    except ValueError as e:
        raise CAError(f"CA name {name!r} does not fit a common name: {e}") from e


_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def _ca_cert(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int | None,
    now: datetime,
    validity: timedelta,
) -> x509.Certificate:
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    issuer_ski = x509.SubjectKeyIdentifier.from_public_key(issuer_key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _key_usage(fields: frozenset[str]) -> x509.KeyUsage:
    return x509.KeyUsage(**{field: field in fields for field in sorted(_KEY_USAGE_FIELDS)})


def _host_san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    # DNSName takes A-labels only; turn an internationalised name into one.
    return x509.DNSName(host.encode("idna").decode("ascii").lower().rstrip("."))


def _san_set(cert: x509.Certificate) -> set[x509.GeneralName]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {
        x509.DNSName(n.value.lower()) if isinstance(n, x509.DNSName) else n for n in san
    }


# --- the local CA -----------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True, eq=False)
class LocalCA:
    """A two-level CA (self-signed root + issuing CA) whose keys and certs live in one directory.

    Only the issuing key is held in memory: nothing the gateway does at run
    time needs the root key, which stays on disk.
    """

    _log = Logger()

    directory: str
    root: x509.Certificate
    issuing: x509.Certificate
    _issuing_key: PrivateKey = attr.ib(repr=False)

    @classmethod
    def load_or_create(cls, directory: str, name: str = "estgw") -> "LocalCA":
        """Load the CA in ``directory``, creating directory and CA on first use.

        ``name`` only matters on creation (it names the subjects). Raises
        CAError when only some of the files exist, or when they do not fit
        together.
        """
        _ensure_directory(directory)
        with _locked(directory):
            present = [f for f in CA_FILES if os.path.exists(os.path.join(directory, f))]
            if not present:
                return cls._create(directory, name)
            if len(present) < len(CA_FILES):
                missing = [f for f in CA_FILES if f not in present]
                raise CAError(
                    f"CA directory {directory} is incomplete: "
                    f"{', '.join(os.path.join(directory, f) for f in missing)} missing "
                    f"while {', '.join(present)} exist; restore the missing file(s), or move "
                    f"the directory away to create a new CA"
                )
            return cls._load(directory)

    @classmethod
    def _create(cls, directory: str, name: str, now: datetime | None = None) -> "LocalCA":
        now = _utc(now)
        root_key, issuing_key = _new_key(), _new_key()
        root_name = _ca_name(name, "Root CA")
        issuing_name = _ca_name(name, "Issuing CA")
        root = _ca_cert(root_name, root_key, root_name, root_key, None, now, ROOT_VALIDITY)
        issuing = _ca_cert(issuing_name, issuing_key, root_name, root_key, 0, now, ISSUING_VALIDITY)
        path = os.path.join
        # Keys before certificates: an interrupted first start leaves keys
        # without certificates, which the next start reports by file name.
        _write_key(path(directory, ROOT_KEY), root_key)
        _write_key(path(directory, ISSUING_KEY), issuing_key)
        _write_cert(path(directory, ROOT_CERT), root)
        _write_cert(path(directory, ISSUING_CERT), issuing)
        cls._log.info("Created a new local CA {subject} in {directory}",
                      subject=issuing.subject.rfc4514_string(), directory=directory)
        return cls(directory, root, issuing, issuing_key)

    @classmethod
    def _load(cls, directory: str) -> "LocalCA":
        paths = {f: os.path.join(directory, f) for f in CA_FILES}
        root = _load_cert(paths[ROOT_CERT])
        issuing = _load_cert(paths[ISSUING_CERT])
        _check_pair(paths[ROOT_CERT], root, paths[ROOT_KEY], _load_key(paths[ROOT_KEY]))
        issuing_key = _load_key(paths[ISSUING_KEY])
        _check_pair(paths[ISSUING_CERT], issuing, paths[ISSUING_KEY], issuing_key)
        try:
            issuing.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAError(f"{paths[ISSUING_CERT]} is not issued by {paths[ROOT_CERT]}") from e
        return cls(directory, root, issuing, issuing_key)

    @property
    def signs_quickly(self) -> bool:
        """Whether a signature by the issuing key costs microseconds (EC,
        EdDSA) rather than milliseconds (RSA)."""
        return not isinstance(self._issuing_key, rsa.RSAPrivateKey)

    def chain(self) -> list[x509.Certificate]:
        """[issuing, root]: what cacerts returns and what TLS peers need."""
        return [self.issuing, self.root]

    def _authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:  # a hand-made issuing cert; derive it the same way
            ski = x509.SubjectKeyIdentifier.from_public_key(self._issuing_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    def sign(self, request: IssueRequest, profile: Profile, now: datetime | None = None) -> x509.Certificate:
        """Sign an end-entity certificate for ``request`` under ``profile``.

        Synchronous and CPU-bound: call it off the reactor thread (see
        :class:`LocalTokenProcedure`). The checks on what may be requested
        happened before; this only refuses what would make an invalid
        certificate.
        """
        now = _utc(now)
        not_after = min(now + profile.validity, self.issuing.not_valid_after_utc)
        if not_after <= now:
            raise CAError(
                f"the issuing CA expired on {self.issuing.not_valid_after_utc.isoformat()}; "
                f"nothing more can be issued"
            )
        empty_subject = len(request.subject) == 0
        if empty_subject and not request.sans:
            # RFC 5280 4.1.2.6: with no subject, the identity is in the SAN.
            raise ValueError("a certificate needs a subject or a subjectAltName")
        builder = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(self.issuing.subject)
            .public_key(request.public_key)
            # 159 random bits: unique across gateway processes without
            # coordination, positive, and within RFC 5280's 20 octets.
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if profile.key_usage:
            builder = builder.add_extension(_key_usage(profile.key_usage), critical=True)
        if profile.extended_key_usage:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False
            )
        if request.sans:
            # RFC 5280 4.2.1.6: critical exactly when the subject is empty.
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(request.sans)), critical=empty_subject
            )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False
        ).add_extension(self._authority_key_identifier(), critical=False)
        return builder.sign(self._issuing_key, hashes.SHA256())

    def server_credentials(
        self, directory: str, hostnames: Sequence[str], now: datetime | None = None
    ) -> tuple[PrivateKey, x509.Certificate]:
        """The gateway's own TLS key and certificate, kept in ``directory``.

        ``server.key`` and ``server.pem`` there are managed by estgw: the key
        is made once and kept; the certificate is reissued when a requested
        hostname is not in it, when it is near its end, or when it was not
        issued by this CA (the CA directory was recreated). A hostname that
        parses as an IP address becomes an iPAddress SAN.
        """
        if not hostnames:
            raise ValueError("server_credentials needs at least one hostname")
        sans = list(dict.fromkeys(_host_san(h) for h in hostnames))
        now = _utc(now)
        _ensure_directory(directory)
        key_path = os.path.join(directory, SERVER_KEY)
        cert_path = os.path.join(directory, SERVER_CERT)
        with _locked(directory):
            key: PrivateKey
            if os.path.exists(key_path):
                key = _load_key(key_path)
            else:
                key = _new_key()
                _write_key(key_path, key)
            if os.path.exists(cert_path):
                cert = _load_cert(cert_path)
                if self._serves(cert, key, sans, now):
                    return key, cert
            cert = self._issue_server_cert(key, hostnames[0], sans, now)
            _write_cert(cert_path, cert)
            self._log.info("Issued a TLS server certificate for {names} in {path}",
                           names=", ".join(hostnames), path=cert_path)
            return key, cert

    def _serves(self, cert: x509.Certificate, key: PrivateKey,
                sans: list[x509.GeneralName], now: datetime) -> bool:
        if _spki(cert.public_key()) != _spki(key.public_key()):
            return False
        if cert.not_valid_after_utc - now < SERVER_RENEW_BEFORE:
            return False
        try:
            cert.verify_directly_issued_by(self.issuing)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return set(sans) <= _san_set(cert)

    def _issue_server_cert(self, key: PrivateKey, first: str,
                           sans: list[x509.GeneralName], now: datetime) -> x509.Certificate:
        # CN is for old clients only (SANs are what is matched); a name too
        # long for a CN leaves the subject empty and the SAN critical.
        attrs = []
        if 1 <= len(first) <= 64:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, first))
        # RSA keys may also do key transport (TLS 1.2 RSA key exchange);
        # EC and EdDSA keys only sign.
        usages = {"digital_signature"}
        if isinstance(key, rsa.RSAPrivateKey):
            usages.add("key_encipherment")
        profile = Profile(
            validity=SERVER_VALIDITY,
            key_usage=frozenset(usages),
            extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
        )
        return self.sign(IssueRequest(x509.Name(attrs), key.public_key(), tuple(sans)), profile, now)

    def write_crl(
        self,
        revoked: Sequence[tuple[int, datetime]],
        next_update: timedelta = timedelta(days=7),
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Sign a CRL of ``revoked`` (serial, revocation time) with the issuing CA.

        The CRL is also written to ``crl.pem`` in the CA directory. Its CRL
        number (RFC 5280 5.2.3: must increase) is the later of the previous
        number plus one and the current Unix time, so it keeps increasing
        even if ``crl.pem`` is deleted.
        """
        if next_update <= timedelta(0):
            raise ValueError(f"next_update must be positive, not {next_update}")
        now = _utc(now)
        path = os.path.join(self.directory, CRL_FILE)
        # One entry per serial (the earliest time wins): duplicates would
        # make a malformed CRL.
        entries: dict[int, datetime] = {}
        for serial, when in revoked:
            when = _utc(when)
            if serial not in entries or when < entries[serial]:
                entries[serial] = when
        with _locked(self.directory):
            number = int(now.timestamp())
            if os.path.exists(path):
                try:
                    previous = x509.load_pem_x509_crl(_read(path))
                    last = previous.extensions.get_extension_for_class(x509.CRLNumber).value
                    number = max(number, last.crl_number + 1)
                except (ValueError, x509.ExtensionNotFound):
                    pass  # unreadable old CRL: the time-based number still increases
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(self.issuing.subject)
                .last_update(now)
                .next_update(now + next_update)
                .add_extension(self._authority_key_identifier(), critical=False)
                .add_extension(x509.CRLNumber(number), critical=False)
            )
            for serial, when in sorted(entries.items()):
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
                )
            crl = builder.sign(self._issuing_key, hashes.SHA256())
            _write_atomically(path, crl.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
        return crl


# --- the local token procedure ---------------------------------------------


@implementer(ITokenProcedure)
class LocalTokenProcedure:
    """Issue with a :class:`LocalCA` under one :class:`Profile`, off the reactor thread."""

    def __init__(
        self,
        name: str,
        ca: LocalCA,
        profile: Profile,
        reactor: IReactorThreads | None = None,
        threadpool: ThreadPool | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        self.name = name
        self.ca = ca
        self.profile = profile
        self._reactor = reactor
        self._threadpool = threadpool

    def __repr__(self) -> str:
        return f"<LocalTokenProcedure {self.name!r}>"

    def issue(self, request: IssueRequest) -> "Deferred[x509.Certificate]":
        """Sign; the Deferred fires in the reactor thread.

        An EC or EdDSA signature (tens of microseconds) is made at once:
        handing it to a pool thread and back costs more than it does.  RSA
        (a millisecond or more at 2048 bits) goes to a pool thread.
        """
        if self.ca.signs_quickly:
            return maybeDeferred(self.ca.sign, request, self.profile)
        assert self._reactor is not None
        # The reactor's pool is looked up here, not in __init__: asking for
        # it starts it, which should not happen merely by loading a config.
        pool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(self._reactor, pool, self.ca.sign, request, self.profile)

    def chain(self) -> list[x509.Certificate]:
        return self.ca.chain()
