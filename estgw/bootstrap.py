"""What the first start creates and every start loads: the state directory.

Shared by ``twistd estgw`` and ``estgw init`` so the two can never
disagree: the local CA, the gateway's TLS credentials, the trust anchors
for client certificates, the store and the token procedures.
"""

from __future__ import annotations

import os
from typing import Any

import attr
from cryptography import x509

from estgw.ca import ITokenProcedure, LocalCA
from estgw.ca import factory
from estgw.config import Config, ConfigError
from estgw.store import SQLiteStore


@attr.s(frozen=True, auto_attribs=True)
class State:
    ca: LocalCA
    server_key: Any
    server_certificate: x509.Certificate
    trust_anchors: tuple[x509.Certificate, ...]


def _load_anchor_file(path: str, source: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except OSError as e:
        reason = f"cannot read {path}: {e.strerror}"
    except ValueError:
        reason = f"no PEM or DER certificate in {path}"
    raise ConfigError("tls.trustAnchors", reason, source)


def configured_trust_anchors(config: Config) -> list[x509.Certificate]:
    """The certificates of ``tls.trustAnchors``; ConfigError naming the
    key when a file holds none (checked before anything is created)."""
    anchors: list[x509.Certificate] = []
    for path in config.trust_anchor_files:
        anchors.extend(_load_anchor_file(path, config.source))
    return anchors


def initialize(config: Config) -> State:
    """Create what is missing under the state directory, load the rest."""
    extra_anchors = configured_trust_anchors(config)
    try:
        os.makedirs(config.state_directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            "state.directory", f"cannot create {config.state_directory}: {e.strerror}", config.source
        ) from None
    ca = LocalCA.load_or_create(config.ca_directory, config.ca_name)
    key, cert = ca.server_credentials(config.tls_directory, config.hostnames)
    # The issuing CA too: devices often send only their leaf certificate.
    anchors = list(ca.chain()) + extra_anchors
    return State(ca=ca, server_key=key, server_certificate=cert, trust_anchors=tuple(anchors))


def open_store(config: Config, reactor: Any = None) -> SQLiteStore:
    """The store (not yet started: call ``start()``)."""
    os.makedirs(os.path.dirname(config.store_path) or ".", mode=0o700, exist_ok=True)
    return SQLiteStore(config.store_path, reactor=reactor)


def token_procedures(config: Config, ca: LocalCA, reactor: Any = None) -> dict[str, ITokenProcedure]:
    """Every configured token procedure by name (see :mod:`estgw.ca.factory`)."""
    return factory.token_procedures(factory.Context(config=config, local_ca=ca, reactor=reactor))
