"""What the first start creates and every start loads: the state directory.

Shared by ``twistd estgw`` and ``estgw init`` so the two can never
disagree: the local CA, the gateway's TLS credentials, the trust anchors
for client certificates, the store and the token procedures.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Mapping

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from estgw.ca import ITokenProcedure, LocalCA
from estgw.ca import CAError, factory
from estgw.ca._files import PassphraseError
from estgw.ca.keys import read_passphrase
from estgw.config import Config, ConfigError
from estgw.store import IStore, open_store as _open_store


@attr.s(frozen=True, auto_attribs=True)
class State:
    ca: LocalCA
    server_key: Any
    server_certificate: x509.Certificate
    trust_anchors: tuple[x509.Certificate, ...]
    # Every configured token procedure by name, built (and so checked) here.
    procedures: Mapping[str, ITokenProcedure] = attr.Factory(dict)

    @property
    def issuers(self) -> tuple[x509.Certificate, ...]:
        """The issuing CA certificates whose certificates are this gateway's
        own: the local CA's and every token procedure's."""
        certs = [ca.issuing for ca in self.ca.issuers()]
        for procedure in self.procedures.values():
            issuers = getattr(procedure, "issuers", None)
            certs += [ca.issuing for ca in issuers()] if issuers else procedure.chain()[:1]
        found: dict[bytes, x509.Certificate] = {}
        for cert in certs:
            found.setdefault(cert.fingerprint(hashes.SHA256()), cert)
        return tuple(found.values())


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


def ca_passphrase(config: Config) -> bytes | None:
    """The local CA keys' passphrase (ca.keyPasswordFile / ca.keyPasswordEnv), or None."""
    try:
        return read_passphrase(config.ca_key_password_file, config.ca_key_password_env)
    except CAError as e:
        key = "ca.keyPasswordFile" if config.ca_key_password_file else "ca.keyPasswordEnv"
        raise ConfigError(key, str(e), config.source) from None


def local_ca(config: Config) -> LocalCA:
    """Load (or, on first use, create) the embedded CA as the config describes it."""
    passphrase = ca_passphrase(config)
    try:
        return LocalCA.load_or_create(
            config.ca_directory,
            config.ca_name,
            key_type=config.ca_key_type,
            passphrase=passphrase,
            rsa_padding=config.ca_rsa_padding,
        )
    except PassphraseError as e:
        key = "ca.keyPasswordEnv" if config.ca_key_password_env else "ca.keyPasswordFile"
        raise ConfigError(key, str(e), config.source) from None


def initialize(config: Config, reactor: Any = None) -> State:
    """Create what is missing under the state directory, load the rest,
    and build the token procedures (ConfigError naming a bad setting)."""
    extra_anchors = configured_trust_anchors(config)
    prepare_state_directory(config)
    ca = local_ca(config)
    key, cert = ca.server_credentials(config.tls_directory, config.hostnames, key_type=config.tls_key_type)
    procedures = token_procedures(config, ca, reactor)
    # The issuing CAs too: devices often send only their leaf certificate.
    anchors: dict[bytes, x509.Certificate] = {}
    for chain in [ca.chain()] + [p.chain() for p in procedures.values()] + [extra_anchors]:
        for anchor in chain:
            anchors.setdefault(anchor.fingerprint(hashes.SHA256()), anchor)
    return State(
        ca=ca, server_key=key, server_certificate=cert, trust_anchors=tuple(anchors.values()),
        procedures=procedures,
    )


def prepare_state_directory(config: Config) -> None:
    """Create the state directory (mode 0700) if missing; ConfigError naming
    ``state.directory`` when it cannot be."""
    try:
        os.makedirs(config.state_directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            "state.directory", f"cannot create {config.state_directory}: {e.strerror}", config.source
        ) from None


def check_store(config: Config) -> None:
    """Open the store once, synchronously, before twistd detaches:
    ConfigError naming ``store.url`` when the SQLite file is not a database
    or cannot be opened, or the PostgreSQL server cannot be reached (the
    store itself opens it later, in its threads)."""
    path = config.store_path
    if path is None:
        _check_postgresql(config)
        return
    if not os.path.exists(path):
        return  # created on start, in a directory initialize() made
    if not os.access(path, os.R_OK | os.W_OK):
        raise ConfigError("store.url", f"cannot open {path}: permission denied", config.source)
    try:
        connection = sqlite3.connect(path, timeout=5)
        try:
            connection.execute("PRAGMA schema_version").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as e:
        raise ConfigError("store.url", f"cannot open {path}: {e}", config.source) from None


def _check_postgresql(config: Config) -> None:
    import psycopg

    from estgw.store import redact_url

    try:
        with psycopg.connect(config.store_url, connect_timeout=5, application_name="estgw") as connection:
            connection.execute("SELECT 1").fetchone()
    except psycopg.Error as e:
        reason = str(e).strip().replace(config.store_url, redact_url(config.store_url))
        raise ConfigError("store.url", f"cannot connect to the PostgreSQL server: {reason}", config.source) from None


def open_store(config: Config, reactor: Any = None) -> IStore:
    """The store of ``store.url`` (not yet started: call ``start()``, which
    creates or migrates its schema)."""
    if config.store_path is not None:
        os.makedirs(os.path.dirname(config.store_path) or ".", mode=0o700, exist_ok=True)
    return _open_store(config.store_location, reactor=reactor)


def token_procedures(config: Config, ca: LocalCA, reactor: Any = None) -> dict[str, ITokenProcedure]:
    """Every configured token procedure by name (see :mod:`estgw.ca.factory`)."""
    return factory.token_procedures(factory.Context(config=config, local_ca=ca, reactor=reactor))
