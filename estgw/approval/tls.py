"""Client TLS for talking to an approval service.

The gateway presents the key and certificate of a PKCS#12 token
(``idm.tls.token``); an operator's CLI presents PEM files.  Either way the
service's certificate is verified against configured CA files (or the
system's trust store) and its name is checked against the URL's host.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from typing import Any, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from treq.client import HTTPClient

__all__ = [
    "ClientCredentials",
    "CredentialsError",
    "load_pkcs12",
    "load_pem_credentials",
    "load_certificates",
    "ClientCertificatePolicy",
    "https_client",
]


class CredentialsError(ValueError):
    """A token, key, certificate or CA file cannot be used; says why.

    ``password`` is true when the file was read but would not open with
    the password given (so a message can name the password setting).
    """

    def __init__(self, reason: str, password: bool = False) -> None:
        super().__init__(reason)
        self.password = password


@attr.s(frozen=True, auto_attribs=True)
class ClientCredentials:
    """A private key, its certificate and the chain to send with it."""

    key: Any = attr.ib(repr=False)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def subject(self) -> str:
        return self.certificate.subject.rfc4514_string()


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CredentialsError(f"cannot read {path}: {e.strerror}") from None


def _public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _check(credentials: ClientCredentials, where: str, now: datetime | None = None) -> ClientCredentials:
    if _public_der(credentials.key.public_key()) != _public_der(credentials.certificate.public_key()):
        raise CredentialsError(f"the private key in {where} does not belong to its certificate")
    now = now or datetime.now(timezone.utc)
    not_after = credentials.certificate.not_valid_after_utc
    if not_after < now:
        raise CredentialsError(f"the certificate in {where} expired on {not_after:%Y-%m-%d %H:%M}Z")
    return credentials


def load_pkcs12(path: str, password: str) -> ClientCredentials:
    """The key, certificate and CA chain of a PKCS#12 token.

    CredentialsError says what is wrong without repeating the password:
    unreadable file, wrong password (or not PKCS#12), no key, a key that
    does not fit the certificate, an expired certificate.
    """
    data = _read(path)
    try:
        key, certificate, chain = pkcs12.load_key_and_certificates(
            data, password.encode("utf-8") if password else None
        )
    except ValueError:
        raise CredentialsError(
            f"cannot open {path}: wrong password, or not a PKCS#12 file", password=True
        ) from None
    if key is None or certificate is None:
        raise CredentialsError(f"{path} holds no private key with its certificate")
    return _check(ClientCredentials(key, certificate, tuple(chain)), path)


def load_certificates(path: str) -> list[x509.Certificate]:
    """Every certificate in a PEM (or single DER) file."""
    data = _read(path)
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise CredentialsError(f"no PEM or DER certificate in {path}") from None


def load_pem_credentials(certificate_path: str, key_path: str) -> ClientCredentials:
    """A PEM certificate file (leaf first, then its chain) and a PEM key file."""
    certificates = load_certificates(certificate_path)
    try:
        key = serialization.load_pem_private_key(_read(key_path), password=None)
    except (ValueError, TypeError):
        raise CredentialsError(f"no unencrypted PEM private key in {key_path}") from None
    where = f"{certificate_path} and {os.path.basename(key_path)}"
    return _check(ClientCredentials(key, certificates[0], tuple(certificates[1:])), where)


@implementer(IPolicyForHTTPS)
class ClientCertificatePolicy:
    """Verify the server against ``trust_anchors`` (empty: the system's
    trust store) and present ``credentials`` as the client certificate."""

    def __init__(self, credentials: ClientCredentials, trust_anchors: Sequence[x509.Certificate] = ()) -> None:
        self._credentials = credentials
        if trust_anchors:
            self._trust_root: Any = ssl.trustRootFromCertificates(
                [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in trust_anchors]
            )
        else:
            self._trust_root = ssl.platformTrust()

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self._trust_root,
            extraCertificateOptions={
                # cryptography objects: pyOpenSSL deprecates its own here.
                "privateKey": self._credentials.key,
                "certificate": self._credentials.certificate,
                "extraCertChain": list(self._credentials.chain),
                "raiseMinimumTo": TLSVersion.TLSv1_2,
            },
        )


def https_client(reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float) -> HTTPClient:
    """A treq client over ``policy``.  No persistent connections: calls
    are rare (a device's retry), and nothing is left open at shutdown."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    agent = Agent(reactor, contextFactory=policy, connectTimeout=connect_timeout, pool=pool)
    return HTTPClient(agent)
