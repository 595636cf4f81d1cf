"""The reference approval service's certificates, made on first use.

Three local CAs under the state directory, each an :class:`estgw.ca.LocalCA`:

* ``ca/``: issues the service's TLS server certificate (``tls/``);
  gateways name its ``root-ca.pem`` in ``idm.tls.trustAnchors``;
* ``gateway-ca/``: issues gateways' client certificates (PKCS#12 tokens,
  ``estgw approval issue-gateway``); holders may submit requests;
* ``operator-ca/``: issues operators' client certificates
  (``estgw approval issue-operator``); holders may list and decide.

Which CA a client certificate chains to is what it may do, so the two
client roles never mix.  ``gateway.trustAnchors`` / ``operator.trustAnchors``
replace the own CAs with other ones.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from estgw.approval.config import ServiceConfig
from estgw.approval.tls import CredentialsError, load_certificates
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.config import ConfigError

__all__ = ["ServicePKI", "initialize", "issue_client", "write_pkcs12", "write_pem", "ensure_default_operator"]

_SHA256 = hashes.SHA256()
CLIENT_VALIDITY = timedelta(days=2 * 365)
DEFAULT_OPERATOR = "operator"
_CLIENT_PROFILE = Profile(
    validity=CLIENT_VALIDITY,
    key_usage=frozenset({"digital_signature"}),
    extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
)


@attr.s(frozen=True, auto_attribs=True)
class ServicePKI:
    server_ca: LocalCA
    gateway_ca: LocalCA
    operator_ca: LocalCA
    server_key: Any = attr.ib(repr=False)
    server_certificate: x509.Certificate
    # Trust anchors for client certificates, by role.
    gateway_anchors: tuple[x509.Certificate, ...]
    operator_anchors: tuple[x509.Certificate, ...]

    @property
    def client_trust(self) -> list[x509.Certificate]:
        """What TLS verifies client chains against (issuing CAs too:
        clients may send only their leaf)."""
        own = list(self.gateway_ca.chain()) + list(self.operator_ca.chain())
        every = own + list(self.gateway_anchors) + list(self.operator_anchors)
        return list({c.fingerprint(_SHA256): c for c in every}.values())


def _anchors(key: str, paths: Sequence[str], own: LocalCA, source: str) -> tuple[x509.Certificate, ...]:
    if not paths:
        return (own.root,)
    anchors: list[x509.Certificate] = []
    for path in paths:
        try:
            anchors.extend(load_certificates(path))
        except CredentialsError as e:
            raise ConfigError(key, str(e), source) from None
    return tuple(anchors)


def initialize(config: ServiceConfig) -> ServicePKI:
    """Create what is missing under the state directory, load the rest."""
    try:
        os.makedirs(config.state_directory, mode=0o700, exist_ok=True)
    except OSError as e:
        reason = f"cannot create {config.state_directory}: {e.strerror}"
        raise ConfigError("state.directory", reason, config.source) from None
    server_ca = LocalCA.load_or_create(config.ca_directory, config.ca_name)
    gateway_ca = LocalCA.load_or_create(config.gateway_ca_directory, f"{config.ca_name} gateways")
    operator_ca = LocalCA.load_or_create(config.operator_ca_directory, f"{config.ca_name} operators")
    key, certificate = server_ca.server_credentials(config.tls_directory, config.hostnames)
    gateway_anchors = _anchors("gateway.trustAnchors", config.gateway_trust_anchor_files, gateway_ca, config.source)
    operator_anchors = _anchors("operator.trustAnchors", config.operator_trust_anchor_files, operator_ca, config.source)
    shared = {c.fingerprint(_SHA256) for c in gateway_anchors} & {c.fingerprint(_SHA256) for c in operator_anchors}
    if shared:
        raise ConfigError(
            "operator.trustAnchors",
            "a CA is both a gateway and an operator trust anchor: its certificates' role would be ambiguous",
            config.source,
        )
    return ServicePKI(server_ca, gateway_ca, operator_ca, key, certificate, gateway_anchors, operator_anchors)


def issue_client(ca: LocalCA, common_name: str, role: str) -> tuple[Any, x509.Certificate]:
    """A new key and a clientAuth certificate for ``common_name``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "estgw"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    return key, ca.sign(IssueRequest(subject, key.public_key()), _CLIENT_PROFILE)


def _write_private(path: str, data: bytes) -> None:
    # Created 0600 from the start: never readable by others, not even briefly.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise


def write_pkcs12(path: str, key: Any, certificate: x509.Certificate, ca: LocalCA, password: str) -> None:
    """A PKCS#12 token (key, certificate, CA chain) for ``idm.tls.token``."""
    data = pkcs12.serialize_key_and_certificates(
        certificate.subject.rfc4514_string().encode("utf-8"),
        key,
        certificate,
        ca.chain(),
        serialization.BestAvailableEncryption(password.encode("utf-8")),
    )
    _write_private(path, data)


def write_pem(certificate_path: str, key_path: str, key: Any, certificate: x509.Certificate, ca: LocalCA) -> None:
    """Certificate (with its issuing CA) and unencrypted key as PEM files."""
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    chain = [certificate, ca.issuing]
    _write_private(certificate_path, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))


def default_operator_paths(config: ServiceConfig) -> tuple[str, str]:
    base = os.path.join(config.operators_directory, DEFAULT_OPERATOR)
    return base + ".pem", base + ".key"


def ensure_default_operator(config: ServiceConfig, pki: ServicePKI) -> tuple[str, str]:
    """The default operator's certificate and key, made once: what
    ``estgw approval`` uses on the service's machine when cli.* is unset."""
    certificate_path, key_path = default_operator_paths(config)
    if not (os.path.exists(certificate_path) and os.path.exists(key_path)):
        key, certificate = issue_client(pki.operator_ca, DEFAULT_OPERATOR, "operators")
        write_pem(certificate_path, key_path, key, certificate, pki.operator_ca)
    return certificate_path, key_path
