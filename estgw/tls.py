"""The gateway's TLS: server context and what a request learns of its peer.

TLS 1.2 and 1.3 only.  A client certificate is requested but optional at
the TLS layer, so that cacerts and password-authenticated enrollment work
without one.  OpenSSL builds and checks the client's chain against the
trust anchors, but a failure does not end the handshake: it is recorded
and :func:`peer_info` reports the certificate as untrusted, so the device
gets an HTTP refusal that says why instead of a bare TLS alert.  An
EKU "unsupported purpose" error is not a trust failure here: the
clientAuth rule is a policy check with its own named reason.
"""

from __future__ import annotations

import weakref
from typing import Any, Sequence

import attr
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

def _verify_error_text(errno: int) -> str:
    """OpenSSL's own words for an X509_V_ERR_* code: the numbers differ
    between OpenSSL releases, so no table of ours can be right for all."""
    try:
        from OpenSSL._util import ffi, lib  # pyOpenSSL's binding of libssl

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:  # a pyOpenSSL without it: the number still tells
        return f"verification error {errno}"


_UNSUPPORTED_PURPOSE = 26

# Connection -> first verification error; weak so closed connections vanish.
_verify_errors: "weakref.WeakKeyDictionary[SSL.Connection, str]" = weakref.WeakKeyDictionary()


def _record_verify_result(
    connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    if not ok and errno != _UNSUPPORTED_PURPOSE and connection not in _verify_errors:
        reason = _verify_error_text(errno)
        _verify_errors[connection] = f"{reason} (depth {depth})"
    return True


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    # HTTP/1.1 when offered, else no ALPN at all: HTTP/1.0 clients (curl
    # --http1.0) offer only "http/1.0", and twisted.web's own callback
    # ends such handshakes with an alert.  h2 is never chosen.
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


class GatewayContextFactory(ssl.CertificateOptions):
    """CertificateOptions that record client-chain errors instead of failing."""

    def getContext(self) -> SSL.Context:
        if getattr(self, "_context", None) is None:
            context = super().getContext()
            context.set_verify(SSL.VERIFY_PEER, _record_verify_result)
            context.set_alpn_select_callback(_select_alpn)
            return context
        return super().getContext()


def server_context_factory(
    private_key: Any,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
) -> GatewayContextFactory:
    """The TLS server context: our key and chain, client certs optional."""
    return GatewayContextFactory(
        # cryptography objects: pyOpenSSL deprecates its own PKey/X509 here.
        privateKey=private_key,
        certificate=certificate,
        extraCertChain=list(chain),
        verify=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in trust_anchors],
        requireCertificate=False,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        enableSessions=False,
    )


@attr.s(frozen=True, auto_attribs=True)
class PeerInfo:
    """What the TLS layer knows of the client of one request."""

    is_tls: bool
    certificate: x509.Certificate | None = None  # only when it verified
    chain: tuple[x509.Certificate, ...] = ()  # leaf first, up to the anchor
    untrusted_reason: str | None = None  # a certificate was sent but failed
    tls_version: str | None = None
    connection: Any = attr.ib(default=None, eq=False, repr=False)

    @property
    def anchor(self) -> x509.Certificate | None:
        return self.chain[-1] if self.chain else None


def _tls_connection(request: Any) -> SSL.Connection | None:
    transport = getattr(request.channel, "transport", None)
    if transport is None or not hasattr(transport, "getHandle"):
        return None
    handle = transport.getHandle()
    return handle if isinstance(handle, SSL.Connection) else None


def peer_info(request: Any) -> PeerInfo:
    """Read the TLS state of ``request``'s connection (the one place that does)."""
    connection = _tls_connection(request)
    if connection is None:
        return PeerInfo(is_tls=False)
    version = connection.get_protocol_version_name()
    peer = connection.get_peer_certificate()
    if peer is None:
        return PeerInfo(is_tls=True, tls_version=version, connection=connection)
    leaf = peer.to_cryptography()
    error = _verify_errors.get(connection)
    chain = connection.get_verified_chain() if error is None else None
    if error is not None or not chain:
        return PeerInfo(
            is_tls=True,
            untrusted_reason=error or "no verified chain",
            tls_version=version,
            connection=connection,
        )
    return PeerInfo(
        is_tls=True,
        certificate=leaf,
        chain=tuple(c.to_cryptography() for c in chain),
        tls_version=version,
        connection=connection,
    )


def channel_binding(peer: PeerInfo) -> tuple[str, bytes] | None:
    """RFC 5929 tls-unique for TLS 1.2, RFC 9266 tls-exporter for TLS 1.3.

    tls-unique is the first Finished message of the handshake: the
    client's, since sessions are never resumed here (enableSessions=False).
    """
    connection = peer.connection
    if connection is None:
        return None
    if peer.tls_version == "TLSv1.3":
        return "tls-exporter", connection.export_keying_material(b"EXPORTER-Channel-Binding", 32, b"")
    finished = connection.get_peer_finished()
    return ("tls-unique", finished) if finished else None
