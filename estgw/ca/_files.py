"""Files of a CA on disk: atomic writes, locks, PEM keys and certificates.

Shared by the kinds of token procedure that keep keys or certificates in
files.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Iterator, cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)

from estgw.ca import CAError, PrivateKey
from estgw.ca.keys import key_encryption

try:  # POSIX only; without it concurrent first starts are merely unserialised.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_KEY_MODE = 0o600
_CERT_MODE = 0o644  # certificates are public; the 0700 directory still guards them
_DIR_MODE = 0o700

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


def _write_key(path: str, key: PrivateKey, passphrase: bytes | None = None) -> None:
    # Without a passphrase the key is unencrypted PKCS#8: the gateway must
    # start unattended, and then the 0700 directory and the 0600 file are
    # what protect it. With one (ca.keyPasswordFile) it is encrypted PKCS#8.
    _write_atomically(
        path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            key_encryption(passphrase),
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


def read_secret_file(path: str, key: str, what: str) -> str:
    """The secret in ``path`` (a PIN, a password): its first line without
    the line break.  CASettingError for the setting ``key`` when it cannot
    be read or is empty."""
    from estgw.ca import CASettingError

    try:
        with open(path, encoding="utf-8") as f:
            secret = f.readline().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CASettingError(key, f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise CASettingError(key, f"{path} is empty; it must hold {what}")
    return secret


def _load_cert(path: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError as e:
        raise CAError(f"{path} is not a PEM certificate: {e}") from e


class PassphraseError(CAError):
    """The passphrase of a key is missing, not needed, or wrong."""


def _load_key(path: str, passphrase: bytes | None = None) -> PrivateKey:
    """A PEM (PKCS#1, SEC 1 or PKCS#8) or DER PKCS#8 private key, decrypted
    with ``passphrase`` when it is encrypted; CAError saying what is wrong."""
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=passphrase)
        else:
            key = serialization.load_der_private_key(data, password=passphrase)
    except TypeError as e:
        if passphrase is None:
            raise PassphraseError(f"{path} is encrypted and no passphrase is configured for it") from e
        raise PassphraseError(
            f"{path} is not encrypted, yet a passphrase is configured for it; "
            f"encrypt it (openssl pkcs8 -topk8 -v2 aes-256-cbc) or remove the passphrase setting"
        ) from e
    except ValueError as e:
        if passphrase is not None and b"ENCRYPTED" in data:
            raise PassphraseError(f"{path}: the passphrase does not decrypt it") from e
        raise CAError(f"{path} is not a PEM or DER private key: {e}") from e
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):  # type: ignore[arg-type]
        raise CAError(f"{path} holds a {type(key).__name__}, which cannot sign certificates")
    return cast(CertificateIssuerPrivateKeyTypes, key)  # mypy does not narrow by a Union in isinstance


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _check_pair(cert_path: str, cert: x509.Certificate, key_path: str, key: PrivateKey) -> None:
    if _spki(cert.public_key()) != _spki(key.public_key()):
        raise CAError(f"{key_path} is not the key of {cert_path}")



#: For the operator commands that read certificates and keys the operator names.
load_certificate = _load_cert
load_private_key = _load_key
