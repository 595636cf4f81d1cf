"""What ``twistd estgw`` needs for manual approval: the PKCS#12 tokens,
loaded and checked at start (a wrong password stops start-up with the
key and the reason), and one :class:`ApprovalGate` per approval handler."""

from __future__ import annotations

from typing import Any, Mapping

import attr
from cryptography import x509

from estgw.approval.client import ApprovalClient
from estgw.approval.gate import ApprovalGate
from estgw.approval.tls import (
    ClientCertificatePolicy,
    ClientCredentials,
    CredentialsError,
    https_client,
    load_certificates,
    load_pkcs12,
)
from estgw.config import IDM_FILTER, Config, ConfigError, HandlerConfig
from estgw.store import IStore

__all__ = ["ApprovalTLS", "load_approval_tls", "build_gates"]


@attr.s(frozen=True, auto_attribs=True)
class ApprovalTLS:
    """One handler's client credentials and the anchors for the service."""

    credentials: ClientCredentials
    trust_anchors: tuple[x509.Certificate, ...] = ()


def _load_one(config: Config, handler: HandlerConfig) -> ApprovalTLS:
    prefix = f"handler.{handler.id}."
    try:
        credentials = load_pkcs12(handler.idm_token, handler.idm_password)
    except CredentialsError as e:
        key = "idm.tls.password" if e.password else "idm.tls.token"
        raise ConfigError(prefix + key, str(e), config.source) from None
    anchors: list[x509.Certificate] = []
    for path in handler.idm_trust_anchors:
        try:
            anchors.extend(load_certificates(path))
        except CredentialsError as e:
            raise ConfigError(prefix + "idm.tls.trustAnchors", str(e), config.source) from None
    return ApprovalTLS(credentials, tuple(anchors))


def load_approval_tls(config: Config) -> dict[str, ApprovalTLS]:
    """handler id -> its loaded token; ConfigError naming the key on failure."""
    return {h.id: _load_one(config, h) for h in config.handlers if h.filter == IDM_FILTER}


def build_gates(
    config: Config,
    loaded: Mapping[str, ApprovalTLS],
    store: IStore,
    reactor: Any,
    http: Any = None,
) -> dict[str, ApprovalGate]:
    """One gate per approval handler; ``http`` replaces the real HTTPS
    client (tests)."""
    gates: dict[str, ApprovalGate] = {}
    for handler in config.handlers:
        if handler.id not in loaded:
            continue
        tls = loaded[handler.id]
        client_http = http
        if client_http is None:
            policy = ClientCertificatePolicy(tls.credentials, tls.trust_anchors)
            client_http = https_client(reactor, policy, handler.idm_timeout)
        client = ApprovalClient(
            handler.idm_request_url,
            client_http,
            reactor,
            timeout=handler.idm_timeout,
            max_backoff=float(handler.idm_retry_after),
        )
        gates[handler.id] = ApprovalGate(handler, store, client, reactor)
    return gates
