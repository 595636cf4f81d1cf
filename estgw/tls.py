"""The gateway's TLS: server context and what a request learns of its peer.

TLS 1.2 and 1.3 only.  A client certificate is requested but optional at
the TLS layer, so that cacerts and password-authenticated enrollment work
without one.  OpenSSL builds and checks the client's chain against the
trust anchors, but a failure does not end the handshake: it is recorded
and :func:`peer_info` reports the certificate as untrusted, so the device
gets an HTTP refusal that says why instead of a bare TLS alert.

OpenSSL checks every certificate of the chain for the TLS client purpose
(RFC 5280 §4.2.1.3 keyUsage, §4.2.1.12 extendedKeyUsage).  One such
failure is left to the gateway: a leaf whose extendedKeyUsage lacks
clientAuth, which the enrollment policy refuses with its own reason
(a registered factory certificate without any EKU is unrestricted).
Everything else is a trust failure: a CA certificate in the chain not
valid for client authentication (e.g. an EKU of serverAuth only), and a
leaf whose keyUsage does not allow digitalSignature.  A TLS client proves
its key by signing (CertificateVerify, RFC 8446 §4.4.3, RFC 5246
§7.4.8) whatever the key type; the fixed (EC)DH client authentication
that keyAgreement alone would serve is not offered here.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Sequence

import attr
from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.ssl import TLSVersion

if TYPE_CHECKING:
    from estgw.config import Config

def _verify_error_text(errno: int) -> str:
    """OpenSSL's own words for an X509_V_ERR_* code: the numbers differ
    between OpenSSL releases, so no table of ours can be right for all."""
    try:
        from OpenSSL._util import ffi, lib  # pyOpenSSL's binding of libssl

        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")
    except Exception:  # a pyOpenSSL without it: the number still tells
        return f"verification error {errno}"


_INVALID_PURPOSE = 26  # X509_V_ERR_INVALID_PURPOSE (26 since OpenSSL 0.9.6)

_NETSCAPE_CERT_TYPE = x509.ObjectIdentifier("2.16.840.1.113730.1.1")

# Connection -> first verification error; weak so closed connections vanish.
_verify_errors: "weakref.WeakKeyDictionary[SSL.Connection, str]" = weakref.WeakKeyDictionary()


def leaf_purpose_problem(certificate: x509.Certificate, openssl_refused: bool = False) -> str | None:
    """Why ``certificate`` cannot be a TLS client certificate, apart from
    its extendedKeyUsage (which the gateway checks itself); None if it can.

    A keyUsage extension must allow digitalSignature.  ``openssl_refused``:
    OpenSSL found the leaf unfit for the TLS client purpose; with a
    Netscape certificate type extension, which OpenSSL also reads, that
    cannot be told from an EKU failure, so it stands.
    """
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        return "the keyUsage of the client certificate does not allow digitalSignature (depth 0)"
    if openssl_refused:
        try:
            certificate.extensions.get_extension_for_oid(_NETSCAPE_CERT_TYPE)
        except x509.ExtensionNotFound:
            return None
        return f"{_verify_error_text(_INVALID_PURPOSE)} (depth 0: Netscape certificate type)"
    return None


def _record_verify_result(
    connection: SSL.Connection, certificate: crypto.X509, errno: int, depth: int, ok: int
) -> bool:
    if connection in _verify_errors:
        return True  # the first reason is the one reported
    problem = None
    if depth == 0 and (ok or errno == _INVALID_PURPOSE):
        # OpenSSL's purpose error says not which rule failed: decide here
        # whether anything but the EKU is wrong.
        problem = leaf_purpose_problem(certificate.to_cryptography(), openssl_refused=not ok)
    elif errno == _INVALID_PURPOSE:
        problem = (
            f"{_verify_error_text(errno)} (depth {depth}: a CA certificate of the chain"
            " is not valid for TLS client authentication)"
        )
    elif not ok:
        problem = f"{_verify_error_text(errno)} (depth {depth})"
    if problem is not None:
        _verify_errors[connection] = problem
    return True


def _select_alpn(connection: SSL.Connection, offered: list[bytes]) -> Any:
    # HTTP/1.1 when offered, else no ALPN at all: HTTP/1.0 clients (curl
    # --http1.0) offer only "http/1.0", and twisted.web's own callback
    # ends such handshakes with an alert.  h2 is never chosen.
    return b"http/1.1" if b"http/1.1" in offered else SSL.NO_OVERLAPPING_PROTOCOLS


# -- cipher suites, groups, security level (tls.* settings) -----------------------

# TLS 1.2: forward-secret AEAD suites first, then AES-CBC with SHA-2 for
# older stacks.  CCM_8 (the RFC 7925 suite) is left out: OpenSSL 3.2 and
# later allow its 64-bit tag only at security level 0, which also admits
# 1024-bit RSA and SHA-1 signatures in every handshake; an operator opts
# in with tls.ciphers and tls.securityLevel = 0 (see the README).
# ("-AESCCM8", not "!": a cipher named after it adds it back.)
DEFAULT_CIPHERS = (
    "ECDHE+AESGCM:ECDHE+CHACHA20:ECDHE+AESCCM:-AESCCM8:ECDHE+AES+SHA256:ECDHE+AES+SHA384:"
    "!aNULL:!eNULL"
)
# OpenSSL's own TLS 1.3 default.
DEFAULT_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
_CLASSIC_GROUPS = "X25519:P-256:P-384:P-521"
# 112-bit security: RSA and DH of at least 2048 bits, no SHA-1 signatures.
DEFAULT_SECURITY_LEVEL = 2


def _set_groups(context: SSL.Context, groups: str) -> bool:
    """SSL_CTX_set1_groups_list through pyOpenSSL's binding (pyOpenSSL has
    no public call for it); False when OpenSSL refuses the list."""
    from OpenSSL._util import lib

    return bool(lib.SSL_CTX_set1_curves_list(context._context, groups.encode("ascii")))


def default_groups() -> str:
    """The hybrid post-quantum X25519MLKEM768 first where this OpenSSL has
    it (3.5 and later), then X25519 and the NIST curves."""
    hybrid = "X25519MLKEM768:" + _CLASSIC_GROUPS
    return hybrid if _set_groups(SSL.Context(SSL.TLS_METHOD), hybrid) else _CLASSIC_GROUPS


@attr.s(frozen=True, auto_attribs=True)
class TLSSettings:
    """The ``tls.ciphers``, ``tls.ciphersuites``, ``tls.groups`` and
    ``tls.securityLevel`` settings: OpenSSL syntax, colon-separated."""

    ciphers: str = DEFAULT_CIPHERS  # TLS 1.2 cipher list
    ciphersuites: str = DEFAULT_CIPHERSUITES  # TLS 1.3 suites
    groups: str = attr.ib(factory=default_groups)  # key exchange groups
    security_level: int = DEFAULT_SECURITY_LEVEL  # OpenSSL security level 0-5


class TLSSettingError(ValueError):
    """A tls.* setting OpenSSL cannot use; ``key`` names the setting."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def _offers(level: int, cipher: str | None = None, suite: str | None = None) -> bool:
    """Whether a client at security ``level`` can offer this TLS 1.2
    cipher or TLS 1.3 suite at all (a ClientHello is built, nothing sent)."""
    context = SSL.Context(SSL.TLS_METHOD)
    if cipher is not None:
        context.set_max_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(f"{cipher}:@SECLEVEL={level}".encode("ascii"))
    else:
        context.set_min_proto_version(SSL.TLS1_3_VERSION)
        context.set_cipher_list(f"DEFAULT:@SECLEVEL={level}".encode("ascii"))
        context.set_tls13_ciphersuites((suite or "").encode("ascii"))
    connection = SSL.Connection(context, None)
    connection.set_connect_state()
    try:
        connection.do_handshake()
    except SSL.WantReadError:
        return True
    except SSL.Error:
        return False
    return True


def _level_check(key: str, name: str, level: int, **what: str) -> None:
    if _offers(level, **what):
        return
    usable = [lower for lower in range(level) if _offers(lower, **what)]
    hint = f" (it is usable up to tls.securityLevel {max(usable)})" if usable else ""
    raise TLSSettingError(key, f"{name} cannot be used at tls.securityLevel {level}{hint}")


def _tls12_ciphers(cipher_list: str) -> list[str]:
    """The TLS 1.2 ciphers an OpenSSL cipher list selects, in order
    (SSL.Error when none)."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_cipher_list(cipher_list.encode("ascii"))
    return [c for c in SSL.Connection(context, None).get_cipher_list() if not c.startswith("TLS_")]


def _names(value: str) -> list[str]:
    return [item.strip() for item in value.replace(",", ":").split(":") if item.strip()]


def check_tls_settings(settings: TLSSettings) -> None:
    """Raise :class:`TLSSettingError` naming the first setting OpenSSL
    cannot use: an unknown cipher, suite or group name, an empty list, or
    a name the security level disallows (as OpenSSL 3.2+ does CCM_8 above
    level 0).  Unknown names are errors here although OpenSSL itself
    skips them: a typo must not silently change what is offered."""
    level = settings.security_level
    if not 0 <= level <= 5:
        raise TLSSettingError("tls.securityLevel", f"must be 0 to 5, not {level}")
    ciphers = settings.ciphers.strip()
    if not ciphers:
        raise TLSSettingError("tls.ciphers", "must name at least one cipher")
    if "@seclevel" in ciphers.lower():
        raise TLSSettingError("tls.ciphers", "set the security level with tls.securityLevel, not @SECLEVEL")
    named = []  # ciphers named on their own (not a group like ECDHE+AESGCM)
    for token in _names(ciphers):
        if token[0] in "!-+@":
            continue  # exclusions, reordering and @STRENGTH select nothing by themselves
        try:
            if _tls12_ciphers(token) == [token]:
                named.append(token)
        except (SSL.Error, UnicodeEncodeError):
            raise TLSSettingError("tls.ciphers", f"OpenSSL knows no cipher or cipher group {token!r}") from None
    try:
        selected = _tls12_ciphers(ciphers)
    except SSL.Error:
        raise TLSSettingError("tls.ciphers", f"selects no cipher: {ciphers!r}") from None
    for token in named:  # a cipher named on its own must be offered
        if token not in selected:
            raise TLSSettingError("tls.ciphers", f"{token} is named but an exclusion (!) in the list removes it")
        _level_check("tls.ciphers", token, level, cipher=token)
    if not any(_offers(level, cipher=c) for c in selected):
        raise TLSSettingError("tls.ciphers", f"no cipher it selects can be used at tls.securityLevel {level}")

    suites = _names(settings.ciphersuites)
    if not suites:
        raise TLSSettingError("tls.ciphersuites", "must name at least one TLS 1.3 cipher suite")
    for suite in suites:
        try:
            SSL.Context(SSL.TLS_METHOD).set_tls13_ciphersuites(suite.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise TLSSettingError("tls.ciphersuites", f"OpenSSL knows no TLS 1.3 cipher suite {suite!r}") from None
        _level_check("tls.ciphersuites", suite, level, suite=suite)

    groups = _names(settings.groups)
    if not groups:
        raise TLSSettingError("tls.groups", "must name at least one group")
    for group in groups:
        try:
            known = _set_groups(SSL.Context(SSL.TLS_METHOD), group)
        except UnicodeEncodeError:
            known = False
        if not known:
            raise TLSSettingError("tls.groups", f"OpenSSL knows no group {group!r}")


def apply_tls_settings(context: SSL.Context, settings: TLSSettings) -> None:
    """Set the cipher list (with the security level), TLS 1.3 suites and
    groups on a context not yet used for a connection."""
    context.set_cipher_list(f"{settings.ciphers}:@SECLEVEL={settings.security_level}".encode("ascii"))
    context.set_tls13_ciphersuites(":".join(_names(settings.ciphersuites)).encode("ascii"))
    if not _set_groups(context, ":".join(_names(settings.groups))):
        raise TLSSettingError("tls.groups", f"OpenSSL refused {settings.groups!r}")


class GatewayContextFactory(ssl.CertificateOptions):
    """CertificateOptions that record client-chain errors instead of
    failing, with the tls.* cipher, group and security-level settings."""

    settings = TLSSettings()

    def getContext(self) -> SSL.Context:
        if getattr(self, "_context", None) is None:
            context = super().getContext()
            context.set_verify(SSL.VERIFY_PEER, _record_verify_result)
            context.set_alpn_select_callback(_select_alpn)
            # After CertificateOptions: these replace its cipher list and
            # its single ECDH curve (P-256).
            apply_tls_settings(context, self.settings)
            # No renegotiation (a client could restart handshakes at our
            # cost, or change identity mid-connection) and no TLS
            # compression (CRIME).
            #
            # A client that closes its socket without a close_notify alert
            # (most EST clients, once they have their response) ends the
            # connection like one that sent it.  Truncation cannot pass
            # unseen: every HTTP message is framed (Content-Length or
            # chunked), so a cut request is never processed.  Without it,
            # pyOpenSSL's error became a Twisted Failure whose traceback
            # held the connection in a reference cycle: each connection
            # waited for the cyclic garbage collector.
            context.set_options(
                SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_COMPRESSION | SSL.OP_IGNORE_UNEXPECTED_EOF
            )
            return context
        return super().getContext()


def server_context_factory(
    private_key: Any,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    settings: TLSSettings | None = None,
) -> GatewayContextFactory:
    """The TLS server context: our key and chain, client certs optional,
    ciphers, groups and security level from ``settings`` (the defaults
    when None)."""
    factory = GatewayContextFactory(
        # cryptography objects: pyOpenSSL deprecates its own PKey/X509 here.
        privateKey=private_key,
        certificate=certificate,  # type: ignore[arg-type]  # Twisted's hints name only pyOpenSSL's types
        extraCertChain=list(chain),  # type: ignore[arg-type]
        verify=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in trust_anchors],
        requireCertificate=False,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        enableSessions=False,
    )
    if settings is not None:
        factory.settings = settings
    return factory


def settings_of(config: "Config") -> TLSSettings:
    """The TLS settings of a :class:`estgw.config.Config`; unset ones
    take the defaults."""
    return TLSSettings(
        ciphers=config.tls_ciphers or DEFAULT_CIPHERS,
        ciphersuites=config.tls_ciphersuites or DEFAULT_CIPHERSUITES,
        groups=config.tls_groups or default_groups(),
        security_level=config.tls_security_level,
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
    return connection_peer_info(connection)


def connection_peer_info(connection: SSL.Connection) -> PeerInfo:
    """What a TLS or DTLS connection whose handshake is done knows of its peer."""
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
