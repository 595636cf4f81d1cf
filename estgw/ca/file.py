"""An operator's existing CA from files (``tokenprocedure.<n>.ca = file``).

The issuing CA certificate (``.file.certificate``), the certificates above
it up to the root (``.file.chain``) and its private key (``.file.key``:
PEM or DER, PKCS#1, SEC 1 or PKCS#8, encrypted with the passphrase of
``.file.keyPasswordFile`` or ``.file.keyPasswordEnv`` when it is). The
gateway signs with the key in this process, off the reactor thread;
cacerts serves the chain. Loading checks what would otherwise only show
as certificates no relying party accepts: the key fits the certificate,
the certificate may sign certificates (RFC 5280 4.2.1.9 cA, 4.2.1.3
keyCertSign), it is valid now, and each chain certificate signed the one
below it.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from twisted.logger import Logger

from estgw.ca import CAError, CASettingError, PrivateKey
from estgw.ca._files import PassphraseError, _ensure_directory, _load_key, _read, _spki, _utc
from estgw.ca.keys import read_passphrase
from estgw.ca.signing import SigningCA, SigningTokenProcedure


FileCAError = CASettingError


def _certificates(path: str, key: str) -> list[x509.Certificate]:
    try:
        data = _read(path)
    except CAError as e:
        raise FileCAError(key, str(e)) from None
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise FileCAError(key, f"no PEM or DER certificate in {path}") from None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # InvalidSignature, ValueError (names), TypeError (key types)
        return False
    return True


def check_issuing_certificate(cert: x509.Certificate, now: datetime | None = None) -> None:
    """Raise ValueError unless ``cert`` may sign certificates now: basic
    constraints cA (RFC 5280 4.2.1.9), keyCertSign where a key usage is
    present (4.2.1.3), and within its validity."""
    subject = cert.subject.rfc4514_string()
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError(f"{subject} is not a CA certificate (basicConstraints cA is not TRUE)")
    if constraints.path_length is not None and constraints.path_length < 0:  # pragma: no cover
        raise ValueError(f"{subject} has a negative path length")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise ValueError(f"{subject} may not sign certificates (keyUsage lacks keyCertSign)")
    now = _utc(now)
    if cert.not_valid_after_utc <= now:
        raise ValueError(f"{subject} expired on {cert.not_valid_after_utc.isoformat()}")
    if cert.not_valid_before_utc > now:
        raise ValueError(f"{subject} is not valid before {cert.not_valid_before_utc.isoformat()}")


@attr.s(frozen=True, auto_attribs=True, eq=False)
class FileCA(SigningCA):
    """An issuing CA whose certificate, chain and key the operator provides.

    ``directory`` is the gateway's own directory for this CA (its CRL and
    CRL number); ``upper`` the certificates above ``issuing``, root last.
    """

    _log = Logger()

    directory: str
    issuing: x509.Certificate
    _issuing_key: PrivateKey = attr.ib(repr=False)
    upper: tuple[x509.Certificate, ...] = ()
    rsa_padding: str = "pkcs1v15"
    #: Earlier issuing CAs (``.file.previous.<m>.*``): their certificates
    #: still renew and their CRLs are still published until they expire.
    previous: tuple["FileCA", ...] = ()

    def chain(self) -> list[x509.Certificate]:
        """The issuing CA first, then up to the root; then the chains of
        earlier issuing CAs: what cacerts returns (RFC 7030 4.1.3)."""
        found: dict[bytes, x509.Certificate] = {}
        for cert in [self.issuing, *self.upper] + [c for p in self.previous for c in p.chain()]:
            found.setdefault(cert.fingerprint(hashes.SHA256()), cert)
        return list(found.values())

    def issuers(self) -> list[SigningCA]:
        return [self, *self.previous]

    @classmethod
    def load(
        cls,
        directory: str,
        certificate: str,
        key: str,
        chain: str = "",
        passphrase: bytes | None = None,
        rsa_padding: str = "pkcs1v15",
        now: datetime | None = None,
        passphrase_key: str = "file.keyPasswordFile",
        prefix: str = "file.",
    ) -> "FileCA":
        """Load and check the files; FileCAError naming the setting at fault.

        ``certificate`` may hold the chain after the issuing certificate;
        ``chain`` adds to it. Chain certificates are put in order from the
        issuing CA up, so the file's order does not matter.
        """
        found = _certificates(certificate, prefix + "certificate")
        issuing, extra = found[0], found[1:]
        if chain:
            extra += _certificates(chain, prefix + "chain")
        try:
            check_issuing_certificate(issuing, now)
        except ValueError as e:
            raise FileCAError(prefix + "certificate", f"{certificate}: {e}") from None
        try:
            private_key = _load_key(key, passphrase)
        except PassphraseError as e:
            raise FileCAError(passphrase_key, str(e)) from None
        except CAError as e:
            raise FileCAError(prefix + "key", str(e)) from None
        if _spki(private_key.public_key()) != _spki(issuing.public_key()):
            raise FileCAError(prefix + "key", f"{key} is not the key of {certificate}")
        upper = _order_chain(issuing, extra, chain or certificate, prefix + ("chain" if chain else "certificate"))
        _ensure_directory(directory)
        return cls(directory, issuing, private_key, tuple(upper), rsa_padding)


def _order_chain(
    issuing: x509.Certificate, pool: list[x509.Certificate], source: str, key: str
) -> list[x509.Certificate]:
    ordered: list[x509.Certificate] = []
    current = issuing
    remaining = [c for c in pool if c != issuing]
    while current.issuer != current.subject and remaining:
        parent = next((c for c in remaining if c.subject == current.issuer and _issued_by(current, c)), None)
        if parent is None:
            break
        ordered.append(parent)
        remaining.remove(parent)
        current = parent
    if remaining:
        names = "; ".join(c.subject.rfc4514_string() for c in remaining)
        raise FileCAError(
            key,
            f"{source}: {names} is not on the path from {issuing.subject.rfc4514_string()} "
            f"to its root (each certificate must have signed the one below it)",
        )
    if current.issuer != current.subject:
        raise FileCAError(
            key.rsplit(".", 1)[0] + ".chain",
            f"the chain ends at {current.subject.rfc4514_string()}, whose issuer "
            f"{current.issuer.rfc4514_string()} is not in it: give every CA certificate up to the root",
        )
    if not _issued_by(current, current):
        raise FileCAError(key, f"{source}: the root {current.subject.rfc4514_string()} does not verify itself")
    return ordered


class FileTokenProcedure(SigningTokenProcedure):
    """Issue with a :class:`FileCA`, off the reactor thread."""


def state_directory(config: Any, name: str) -> str:
    """Where the gateway keeps what it makes for token procedure ``name``
    (its CRL): ``<state.directory>/tokenprocedures/<name, URL-encoded>``."""
    return os.path.join(config.state_directory, "tokenprocedures", quote(name, safe=""))


def _load_settings(settings: Any, directory: str, rsa_padding: str, now: datetime | None = None) -> FileCA:
    prefix = settings.prefix
    passphrase_key = prefix + ("keyPasswordEnv" if settings.key_password_env else "keyPasswordFile")
    try:
        passphrase = read_passphrase(settings.key_password_file, settings.key_password_env)
    except CAError as e:
        raise FileCAError(passphrase_key, str(e)) from None
    return FileCA.load(
        directory, settings.certificate, settings.key, settings.chain, passphrase, rsa_padding,
        now=now, passphrase_key=passphrase_key, prefix=prefix,
    )


def token_procedure(procedure: Any, context: Any) -> FileTokenProcedure:
    """``tokenprocedure.<n>.ca = file`` (see :mod:`estgw.ca.factory`)."""
    from estgw.ca.factory import ca_threads, profile_of

    directory = state_directory(context.config, procedure.name)
    padding = context.config.ca_rsa_padding
    current = _load_settings(procedure.file_settings, directory, padding)
    previous = []
    now = _utc(None)
    for settings in procedure.file_previous:
        if not settings.chain:  # most often the same root: file.chain serves
            settings = attr.evolve(settings, chain=procedure.file_chain)
        earlier = _load_settings(settings, os.path.join(directory, "previous", settings.number), padding,
                                 now=min(now, _not_after(settings)))
        if earlier.issuing.not_valid_after_utc <= now:
            FileCA._log.info("{key}: {subject} has expired; nothing of it is served any more",
                             key=settings.prefix, subject=earlier.issuing.subject.rfc4514_string())
            continue
        if earlier.issuing == current.issuing:
            raise FileCAError(settings.prefix + "certificate", "is the current issuing CA (file.certificate)")
        previous.append(earlier)
    ca = attr.evolve(current, previous=tuple(previous))
    return FileTokenProcedure(
        procedure.name, ca, profile_of(procedure), reactor=context.reactor, threads=ca_threads(procedure, context)
    )


def _not_after(settings: Any) -> datetime:
    # An expired earlier CA is skipped, not refused: check it as of its own end.
    try:
        return _certificates(settings.certificate, settings.prefix + "certificate")[0].not_valid_after_utc - _SECOND
    except FileCAError:
        return _utc(None)  # the error is reported by the load itself


_SECOND = timedelta(seconds=1)
