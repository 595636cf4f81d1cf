"""The embedded CA (``tokenprocedure.<n>.ca = local``).

:class:`LocalCA` is a two-level CA (self-signed root plus an issuing CA)
whose keys and certificates live in one directory and are created on
first start; :class:`LocalTokenProcedure` signs with it on a thread pool
so that the reactor never waits for a signature.
"""

from __future__ import annotations

import ipaddress
import os
from datetime import datetime, timedelta
from typing import Any, Sequence

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.logger import Logger

from estgw.ca import (
    CAError,
    IssueRequest,
    PrivateKey,
    Profile,
)
from estgw.ca._files import (
    _CERT_MODE,
    _check_pair,
    _ensure_directory,
    _load_cert,
    _load_key,
    _locked,
    _read,
    _spki,
    _utc,
    _write_atomically,
    _write_cert,
    _write_key,
)
from estgw.ca.keys import DEFAULT_KEY_TYPE, key_encryption, key_type_of, new_key, sign_arguments
from estgw.ca.signing import CLOCK_SKEW, CRL_FILE, SigningCA, SigningTokenProcedure

ORGANIZATION = "estgw"

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
#: Written when the root key was exported (``estgw init --offline-root``):
#: from then on a missing root key is expected, not damage.
ROOT_OFFLINE = "root-ca.offline"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

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
    key: PrivateKey,
    issuer: x509.Name,
    issuer_key: PrivateKey,
    path_length: int | None,
    now: datetime,
    validity: timedelta,
    rsa_padding: str = "pkcs1v15",
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
        .sign(issuer_key, **sign_arguments(issuer_key, rsa_padding))
    )


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


PREVIOUS = "previous"
LINKS = "links"


@attr.s(frozen=True, auto_attribs=True, eq=False)
class IssuingGeneration(SigningCA):
    """An earlier issuing CA of a :class:`LocalCA`, kept after a rollover in
    ``previous/<n>/`` with its root, its key and its CRL."""

    directory: str
    root: x509.Certificate
    issuing: x509.Certificate
    _issuing_key: PrivateKey = attr.ib(repr=False)
    rsa_padding: str = "pkcs1v15"

    def chain(self) -> list[x509.Certificate]:
        return [self.issuing, self.root]


def _previous_names(directory: str) -> list[str]:
    path = os.path.join(directory, PREVIOUS)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def _load_previous(
    directory: str, current: x509.Certificate, passphrase: bytes | None, rsa_padding: str
) -> tuple[IssuingGeneration, ...]:
    now = _utc(None)
    found = []
    for entry in reversed(_previous_names(directory)):
        path = os.path.join(directory, PREVIOUS, entry)
        issuing = _load_cert(os.path.join(path, ISSUING_CERT))
        if issuing == current or issuing.not_valid_after_utc <= now:
            continue  # an interrupted rollover's copy, or nothing left to renew or publish
        root = _load_cert(os.path.join(path, ROOT_CERT))
        key = _load_key(os.path.join(path, ISSUING_KEY), passphrase)
        _check_pair(os.path.join(path, ISSUING_CERT), issuing, os.path.join(path, ISSUING_KEY), key)
        found.append(IssuingGeneration(path, root, issuing, key, rsa_padding))
    return tuple(found)


def _link(
    subject: x509.Certificate, subject_key: PrivateKey, issuer: x509.Certificate, issuer_key: PrivateKey,
    now: datetime, rsa_padding: str,
) -> x509.Certificate:
    """A root rollover link certificate: ``subject``'s name and key,
    certified by ``issuer`` (RFC 4210 4.4: NewWithOld / OldWithNew), valid
    no longer than either root."""
    not_after = min(subject.not_valid_after_utc, issuer.not_valid_after_utc)
    return _ca_cert(
        subject.subject, subject_key, issuer.subject, issuer_key, None, now, not_after - now, rsa_padding
    )


# --- the local CA -----------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True, eq=False)
class LocalCA(SigningCA):
    """A two-level CA (self-signed root + issuing CA) whose keys and certs live in one directory.

    Only the issuing key is held in memory: nothing the gateway does at run
    time needs the root key, which stays on disk, or offline once exported
    (:meth:`export_root_key`). Keys are encrypted PKCS#8 when a passphrase
    is given (``ca.keyPasswordFile``).
    """

    _log = Logger()

    directory: str
    root: x509.Certificate
    issuing: x509.Certificate
    _issuing_key: PrivateKey = attr.ib(repr=False)
    rsa_padding: str = "pkcs1v15"
    #: Earlier issuing CAs (RFC 7030 4.1.3 rollover) still within their
    #: validity: their certificates still renew, their CRLs are still
    #: published. Newest first.
    previous: tuple["IssuingGeneration", ...] = ()
    #: Root rollover link certificates (NewWithOld, OldWithNew), oldest first.
    links: tuple[x509.Certificate, ...] = ()

    def home(self) -> str:
        """Where this issuing CA's files are now: ``directory``, or, when
        ``estgw ca rollover`` ran while this process holds the CA, the
        ``previous/<n>/`` directory its files moved to, so a running
        gateway keeps writing each CA's CRL to that CA's own place."""
        try:
            if _load_cert(os.path.join(self.directory, ISSUING_CERT)) == self.issuing:
                return self.directory
        except CAError:
            return self.directory  # mid-rollover or damaged: the load at start checked it
        for entry in reversed(_previous_names(self.directory)):
            path = os.path.join(self.directory, PREVIOUS, entry)
            try:
                if _load_cert(os.path.join(path, ISSUING_CERT)) == self.issuing:
                    return path
            except CAError:
                continue
        return self.directory

    @classmethod
    def load_or_create(
        cls,
        directory: str,
        name: str = "estgw",
        key_type: str = DEFAULT_KEY_TYPE,
        passphrase: bytes | None = None,
        rsa_padding: str = "pkcs1v15",
    ) -> "LocalCA":
        """Load the CA in ``directory``, creating directory and CA on first use.

        ``name`` and ``key_type`` (one of :data:`estgw.ca.keys.KEY_TYPES`)
        only matter on creation. ``passphrase`` encrypts new keys and
        decrypts existing ones. Raises CAError when only some of the files
        exist, when they do not fit together, or when a key cannot be
        decrypted.
        """
        _ensure_directory(directory)
        with _locked(directory):
            present = [f for f in CA_FILES if os.path.exists(os.path.join(directory, f))]
            if not present:
                return cls._create(directory, name, key_type, passphrase, rsa_padding)
            required = list(CA_FILES)
            if os.path.exists(os.path.join(directory, ROOT_OFFLINE)):
                required.remove(ROOT_KEY)
            missing = [f for f in required if f not in present]
            if missing:
                raise CAError(
                    f"CA directory {directory} is incomplete: "
                    f"{', '.join(os.path.join(directory, f) for f in missing)} missing "
                    f"while {', '.join(present)} exist; restore the missing file(s), or move "
                    f"the directory away to create a new CA"
                )
            return cls._load(directory, passphrase, rsa_padding)

    @classmethod
    def _create(
        cls,
        directory: str,
        name: str,
        key_type: str = DEFAULT_KEY_TYPE,
        passphrase: bytes | None = None,
        rsa_padding: str = "pkcs1v15",
        now: datetime | None = None,
    ) -> "LocalCA":
        now = _utc(now)
        root_key, issuing_key = new_key(key_type), new_key(key_type)
        root_name = _ca_name(name, "Root CA")
        issuing_name = _ca_name(name, "Issuing CA")
        root = _ca_cert(root_name, root_key, root_name, root_key, None, now, ROOT_VALIDITY, rsa_padding)
        issuing = _ca_cert(
            issuing_name, issuing_key, root_name, root_key, 0, now, ISSUING_VALIDITY, rsa_padding
        )
        path = os.path.join
        # Keys before certificates: an interrupted first start leaves keys
        # without certificates, which the next start reports by file name.
        _write_key(path(directory, ROOT_KEY), root_key, passphrase)
        _write_key(path(directory, ISSUING_KEY), issuing_key, passphrase)
        _write_cert(path(directory, ROOT_CERT), root)
        _write_cert(path(directory, ISSUING_CERT), issuing)
        cls._log.info("Created a new local CA {subject} ({key_type}) in {directory}",
                      subject=issuing.subject.rfc4514_string(), key_type=key_type, directory=directory)
        return cls(directory, root, issuing, issuing_key, rsa_padding)

    @classmethod
    def _load(cls, directory: str, passphrase: bytes | None = None, rsa_padding: str = "pkcs1v15") -> "LocalCA":
        paths = {f: os.path.join(directory, f) for f in CA_FILES}
        root = _load_cert(paths[ROOT_CERT])
        issuing = _load_cert(paths[ISSUING_CERT])
        if os.path.exists(paths[ROOT_KEY]):
            _check_pair(paths[ROOT_CERT], root, paths[ROOT_KEY], _load_key(paths[ROOT_KEY], passphrase))
        issuing_key = _load_key(paths[ISSUING_KEY], passphrase)
        _check_pair(paths[ISSUING_CERT], issuing, paths[ISSUING_KEY], issuing_key)
        try:
            issuing.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAError(f"{paths[ISSUING_CERT]} is not issued by {paths[ROOT_CERT]}") from e
        previous = _load_previous(directory, issuing, passphrase, rsa_padding)
        links = tuple(
            _load_cert(os.path.join(directory, LINKS, f))
            for f in sorted(os.listdir(os.path.join(directory, LINKS)))
            if f.endswith(".pem")
        ) if os.path.isdir(os.path.join(directory, LINKS)) else ()
        return cls(directory, root, issuing, issuing_key, rsa_padding, previous, links)

    @property
    def root_key_online(self) -> bool:
        """Whether the root key is in the CA directory (not exported)."""
        return os.path.exists(os.path.join(self.directory, ROOT_KEY))

    def export_root_key(self, out: str, passphrase: bytes | None = None, stream: Any = None) -> None:
        """Move the root key out of the CA directory to the new file ``out``
        (or, for ``-``, write it to the text ``stream``: printed once).

        The key is PKCS#8 PEM, encrypted when ``passphrase`` is given; a
        file gets mode 0600 and must not exist. Only once it is written is
        the key removed from the directory, so a failed export loses
        nothing. Raises CAError when the key is no longer here or ``out``
        cannot be written.
        """
        source = os.path.join(self.directory, ROOT_KEY)
        with _locked(self.directory):
            if not os.path.exists(source):
                raise CAError(f"{source} is not here: the root key was already exported")
            key = _load_key(source, passphrase)
            pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, key_encryption(passphrase)
            )
            if out == "-":
                stream.write(pem.decode("ascii"))
                stream.flush()
                where = "standard output"
            else:
                try:
                    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except OSError as e:
                    raise CAError(f"cannot create {out}: {e.strerror}") from None
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                    f.flush()
                    os.fsync(f.fileno())
                where = os.path.abspath(out)
            _write_atomically(
                os.path.join(self.directory, ROOT_OFFLINE),
                f"The root key of {self.root.subject.rfc4514_string()} is kept offline; "
                f"it was exported to {where}.\n".encode("utf-8"),
                _CERT_MODE,
            )
            os.unlink(source)

    def chain(self) -> list[x509.Certificate]:
        """[issuing, root], then the earlier issuing CAs and roots and the
        link certificates after a rollover: what cacerts returns (RFC 7030
        4.1.3) and what client certificates may chain to."""
        found: dict[bytes, x509.Certificate] = {}
        for cert in [self.issuing, self.root, *self.links] + [
            c for generation in self.previous for c in (generation.issuing, generation.root)
        ]:
            found.setdefault(cert.fingerprint(hashes.SHA256()), cert)
        return list(found.values())

    def issuers(self) -> list[SigningCA]:
        """The issuing CAs whose certificates are still this CA's own: the
        current one first, then those of earlier generations."""
        return [self, *self.previous]

    @property
    def new_with_old(self) -> list[x509.Certificate]:
        """Link certificates that certify the current root's key with an
        earlier root's: sent in TLS so clients trusting only the old root
        still verify the gateway."""
        return [c for c in self.links if c.subject == self.root.subject and c.issuer != c.subject]

    def rollover(
        self,
        name: str = "estgw",
        key_type: str | None = None,
        passphrase: bytes | None = None,
        new_root: bool = False,
        root_key: PrivateKey | None = None,
        issuing: tuple[x509.Certificate, PrivateKey] | None = None,
        now: datetime | None = None,
    ) -> "LocalCA":
        """Make the next issuing CA (RFC 7030 4.1.3) and return the CA as it is now.

        The current issuing CA (certificate, key, CRL) moves to
        ``previous/<generation>/`` with its root, so its certificates still
        renew and its CRL is still published until it expires. The new
        issuing CA is ``issuing`` (certificate and key from the operator;
        it must be issued by the root) or a new key of ``key_type`` (default:
        the current key's type) certified by the root. With ``new_root`` the
        root rolls too: a new self-signed root and the NewWithOld and
        OldWithNew link certificates (each root's key certified by the
        other) in ``links/``. The root key comes from the directory or, when
        it is offline, from ``root_key``. Raises CAError.
        """
        now = _utc(now)
        directory = self.directory
        with _locked(directory):
            generation = 2 + len(_previous_names(directory))
            old_root_key = root_key
            root_path = os.path.join(directory, ROOT_KEY)
            if old_root_key is None:
                if not os.path.exists(root_path):
                    raise CAError(
                        f"the root key is offline ({os.path.join(directory, ROOT_OFFLINE)}); "
                        f"give it with --root-key"
                    )
                old_root_key = _load_key(root_path, passphrase)
            if _spki(old_root_key.public_key()) != _spki(self.root.public_key()):
                raise CAError(f"the root key given is not the key of {os.path.join(directory, ROOT_CERT)}")
            kind = key_type or key_type_of(self._issuing_key) or DEFAULT_KEY_TYPE
            root, signer, links = self.root, old_root_key, []
            if new_root:
                signer = new_key(kind)
                root_name = _ca_name(name, f"Root CA {generation}")
                root = _ca_cert(root_name, signer, root_name, signer, None, now, ROOT_VALIDITY, self.rsa_padding)
                links = [
                    _link(root, signer, self.root, old_root_key, now, self.rsa_padding),  # NewWithOld
                    _link(self.root, old_root_key, root, signer, now, self.rsa_padding),  # OldWithNew
                ]
            if issuing is not None:
                certificate, issuing_key = issuing
                if _spki(certificate.public_key()) != _spki(issuing_key.public_key()):
                    raise CAError("the new issuing CA's key is not the key of its certificate")
                try:
                    certificate.verify_directly_issued_by(root)
                except (ValueError, TypeError, InvalidSignature) as e:
                    raise CAError(
                        f"the new issuing CA {certificate.subject.rfc4514_string()} is not issued by "
                        f"the root {root.subject.rfc4514_string()}"
                    ) from e
            else:
                issuing_key = new_key(kind)
                certificate = _ca_cert(
                    _ca_name(name, f"Issuing CA {generation}"), issuing_key, root.subject, signer, 0, now,
                    ISSUING_VALIDITY, self.rsa_padding,
                )
            # The old generation is copied before anything is replaced: an
            # interruption leaves it twice (harmless), never lost.
            archive = os.path.join(directory, PREVIOUS, f"{generation - 1:03d}")
            _ensure_directory(os.path.join(directory, PREVIOUS))
            _ensure_directory(archive)
            for f in (ISSUING_CERT, ISSUING_KEY, ROOT_CERT, CRL_FILE, "ocsp-responder.pem", "ocsp-responder.key"):
                source = os.path.join(directory, f)
                if os.path.exists(source):
                    mode = 0o600 if f.endswith(".key") else _CERT_MODE
                    _write_atomically(os.path.join(archive, f), _read(source), mode)
            if links:
                _ensure_directory(os.path.join(directory, LINKS))
                _write_cert(os.path.join(directory, LINKS, f"{generation:03d}-new-with-old.pem"), links[0])
                _write_cert(os.path.join(directory, LINKS, f"{generation:03d}-old-with-new.pem"), links[1])
                _write_key(root_path, signer, passphrase)
                _write_cert(os.path.join(directory, ROOT_CERT), root)
                offline = os.path.join(directory, ROOT_OFFLINE)
                if os.path.exists(offline):
                    os.unlink(offline)  # the new root's key is here until exported again
            _write_key(os.path.join(directory, ISSUING_KEY), issuing_key, passphrase)
            _write_cert(os.path.join(directory, ISSUING_CERT), certificate)
            for f in (CRL_FILE, "ocsp-responder.pem", "ocsp-responder.key"):
                if os.path.exists(os.path.join(directory, f)):
                    os.unlink(os.path.join(directory, f))
            self._log.info("Rolled over to issuing CA {subject}; {old} stays for its certificates",
                           subject=certificate.subject.rfc4514_string(),
                           old=self.issuing.subject.rfc4514_string())
            return self._load(directory, passphrase, self.rsa_padding)

    def server_credentials(
        self,
        directory: str,
        hostnames: Sequence[str],
        now: datetime | None = None,
        key_type: str | None = None,
    ) -> tuple[PrivateKey, x509.Certificate]:
        """The gateway's own TLS key and certificate, kept in ``directory``.

        ``server.key`` and ``server.pem`` there are managed by estgw: the key
        is made once (of ``key_type``, default ec-p256) and kept, also when
        an operator put it there, unless ``key_type`` (``tls.keyType``) is
        given and the key is of another type; the certificate is reissued when a requested
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
            if not os.path.exists(key_path) or (key_type is not None and key_type_of(key) != key_type):
                if os.path.exists(key_path):
                    self._log.warn("tls.keyType is {key_type}: replacing the key in {path}",
                                   key_type=key_type, path=key_path)
                key = new_key(key_type or DEFAULT_KEY_TYPE)
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


# --- the local token procedure ---------------------------------------------


class LocalTokenProcedure(SigningTokenProcedure):
    """Issue with a :class:`LocalCA` under one :class:`Profile`, off the reactor thread."""


def token_procedure(procedure: Any, context: Any) -> LocalTokenProcedure:
    """``tokenprocedure.<n>.ca = local``: sign with the embedded CA (see :mod:`estgw.ca.factory`)."""
    from estgw.ca.factory import ca_threads, profile_of

    return LocalTokenProcedure(
        procedure.name, context.local_ca, profile_of(procedure), reactor=context.reactor,
        threads=ca_threads(procedure, context),
    )
