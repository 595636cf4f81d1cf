"""Filters: who is calling a handler, and may they?

Security rests on TLS client certificates (see :mod:`estgw.tls`).  HTTP
Basic/Digest is accepted only over TLS, through a twisted.cred portal
whose checker reads the device store.  What a handler demands:

- filter ``device`` (and the approval filter): a client certificate, or
  HTTP auth of a pre-registered device;
- filter ``clientcert``: a client certificate; with ``authtype`` set,
  HTTP auth is an extra layer on top (the certificate is still needed);
- a token procedure with ``estenroll.use-authentication-cert = true``
  (simpleenroll): a registered factory certificate, plus the device's
  password when ``enroll.mandatorypassword = true``;
- ``requiredRoRoles``: an officer/RA certificate (:mod:`estgw.officers`).

Every failure is a :class:`Refusal` with its own code.  A single-use
pre-registration is claimed just before issuing (:func:`single_use`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import unicodedata
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Callable, Sequence

import attr
from cryptography import x509
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.iweb import ICredentialFactory
from zope.interface import Interface, implementer

from estgw import audit, officers
from estgw.config import HandlerConfig
from estgw.escape import printable
from estgw.httpauth import (
    BasicCredentialFactory,
    DigestCredentialFactory,
    DigestResponse,
    InvalidNonce,
    MalformedCredentials,
    NonceCounts,
    ReplayedResponse,
    StaleNonce,
    StoreNonceCounts,
    authorization_header,
)
from estgw.passwords import VerificationCache, check_password_in_thread
from estgw.refusal import Refusal
from estgw.store import Device, IStore, certificate_fingerprint
from estgw.tls import PeerInfo

__all__ = [
    "Identity",
    "certificate_identity",
    "digest_ha1",
    "DeviceChecker",
    "DevicePortal",
    "device_portal",
    "digest_secret",
    "credential_factory",
    "authenticate",
    "single_use",
]


@attr.s(frozen=True, auto_attribs=True)
class Identity:
    """Who a request was authenticated as."""

    kind: str  # "anonymous" | "certificate" | "device" | "factory"
    certificate: x509.Certificate | None = None
    # "device": the HTTP login; "factory": the device the factory
    # certificate is registered to; "certificate": the HTTP login of the
    # extra layer, if any.
    device_id: str | None = None
    # Officer/RA roles the client certificate holds: such a
    # client may enroll for other subjects.
    officer_roles: tuple[str, ...] = ()
    # Set when an officer/RA certificate acts on behalf of others.
    acting_as_officer: bool = False
    # The pre-registration that authenticated (single use, factory CN and
    # subject values); None for a certificate alone.
    registration: Device | None = attr.ib(default=None, eq=False, repr=False)

    @property
    def requester(self) -> str:
        """The identity recorded with every certificate issued for it."""
        if self.acting_as_officer and self.certificate is not None:
            roles = f";roles={','.join(self.officer_roles)}" if self.officer_roles else ""
            return (
                f"officer:{self.certificate.subject.rfc4514_string()}"
                f"#serial={self.certificate.serial_number:x}{roles}"
            )
        if self.kind == "device":
            return f"device:{self.device_id}"
        if self.kind == "factory":
            return f"factory:{self.device_id}"
        if self.certificate is not None:
            return (
                f"cert:{self.certificate.subject.rfc4514_string()}"
                f"#serial={self.certificate.serial_number:x}"
            )
        return "anonymous"


def certificate_identity(certificate: x509.Certificate) -> Identity:
    return Identity(kind="certificate", certificate=certificate)


def digest_ha1(device_id: str, realm: str, password: str) -> str:
    """RFC 2617 H(A1) = MD5(id:realm:password), hex: what a device's Digest
    response is checked against.

    Digest cannot work from the salted scrypt hash Basic is checked
    against: the client proves knowledge of this unsalted, realm-bound
    value, so the server must hold it.  It is computed at registration for
    every Digest realm in the configuration and stored per realm.  It is a
    password equivalent for that realm, which is one more reason Digest is
    accepted only over TLS and the value is never shown.
    """
    secret = unicodedata.normalize("NFC", password).encode("utf-8")
    return hashlib.md5(f"{device_id}:{realm}:".encode("utf-8") + secret).hexdigest()


def _consumed(device_id: str) -> Refusal:
    return Refusal(
        403, "single-use-consumed",
        f"the single-use registration of device {device_id!r} has already been used",
    )


@implementer(ICredentialsChecker)
class DeviceChecker:
    """Checks HTTP Basic and Digest credentials against pre-registered devices."""

    credentialInterfaces = (credentials.IUsernamePassword, credentials.IUsernameDigestHash)
    _log = Logger()

    def __init__(
        self,
        store: IStore,
        reactor: Any = None,
        nonce_counts: NonceCounts | None = None,
        password_cache: VerificationCache | None = None,
    ) -> None:
        self._store = store
        self._reactor = reactor
        self._nonce_counts = nonce_counts if nonce_counts is not None else StoreNonceCounts(store)
        # auth.passwordCacheSeconds; None: every login pays for scrypt.
        self._password_cache = password_cache

    def requestAvatarId(self, creds: Any) -> defer.Deferred[bytes | tuple[()]]:
        if credentials.IUsernameDigestHash.providedBy(creds):
            return defer.Deferred.fromCoroutine(self._check_digest(creds))
        return defer.Deferred.fromCoroutine(self._check_password(creds))

    async def _check_password(self, creds: credentials.IUsernamePassword) -> bytes:
        device = await self._store.get_device(creds.username.decode("utf-8", "replace"))
        # An unknown device costs as much time as a known one (see passwords).
        encoded = device.password_hash if device is not None else None
        cache = self._password_cache
        if device is not None and cache is not None and cache.known(device.device_id, creds.password, encoded):
            return self._usable(device)
        if not await check_password_in_thread(creds.password, encoded, self._reactor):
            raise error.UnauthorizedLogin("unknown device or wrong password")
        assert device is not None and encoded is not None
        if cache is not None:
            cache.remember(device.device_id, creds.password, encoded)
        return self._usable(device)

    async def _check_digest(self, creds: Any) -> bytes:
        device = await self._store.get_device(creds.username.decode("utf-8", "replace"))
        realm = creds.realm.decode("utf-8") if isinstance(creds.realm, bytes) else creds.realm
        ha1 = dict(device.digest_ha1).get(realm) if device is not None else None
        if ha1 is None:
            if device is not None and device.password_hash is not None:
                self._log.warn(
                    "device {device} has no Digest hash for realm {realm!r}: register it"
                    " again (estgw device remove, device add) to log in with Digest",
                    device=printable(device.device_id), realm=realm,
                )
            raise error.UnauthorizedLogin("unknown device or wrong password")
        if not creds.checkHash(ha1.encode("ascii")):
            raise error.UnauthorizedLogin("unknown device or wrong password")
        assert device is not None
        # Only a correct response counts: a wrong guess cannot use up a
        # nonce count of the device's own.
        if not await self._nonce_counts.use(creds.nonce, creds.nc, creds.expires_at):
            raise ReplayedResponse(creds.nc)
        return self._usable(device)

    @staticmethod
    def _usable(device: Device) -> bytes:
        # A consumed single-use registration still logs in: the pipeline
        # may send its certificate again (estgw.enroll), and refuses
        # anything else when it claims the registration (single_use).
        return device.device_id.encode("utf-8")


@implementer(IRealm)
class DeviceRealm:
    """The avatar of a device login is its id; handlers need nothing more."""

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> tuple[type[Interface], object, Callable[[], None]]:
        if not isinstance(avatarId, bytes):  # ANONYMOUS: our checkers never answer it
            raise error.UnauthorizedLogin("anonymous login")
        return interfaces[0], avatarId.decode("utf-8"), lambda: None


class IDeviceId(Interface):
    """What Portal.login asks the realm for: the device id (a str)."""


def credential_factory(
    handler: HandlerConfig, digest_secret: bytes | None = None, clock: Any = None
) -> ICredentialFactory | None:
    """A new credential factory for the handler's authtype (None without).

    ``digest_secret`` keys Digest nonces (random when None); ``clock()``
    gives seconds since the epoch (default: the system clock).
    """
    realm = (handler.realm or "").encode("utf-8")
    if handler.authtype == "Basic":
        return BasicCredentialFactory(realm)
    if handler.authtype == "Digest":
        if clock is None:
            return DigestCredentialFactory(realm, digest_secret)
        return DigestCredentialFactory(realm, digest_secret, clock)
    return None


DIGEST_SECRET_FILE = "digest-secret"


def digest_secret(directory: str) -> bytes:
    """The key of Digest challenges, shared by every gateway process using
    ``directory`` (the state directory): created once, then read.

    A Digest response is accepted only if its opaque value was made with
    this key, so processes that share a listening socket or sit behind one
    load balancer must all hold the same one.  Blocking file I/O: call it
    at start-up.
    """
    path = os.path.join(directory, DIGEST_SECRET_FILE)
    if not os.path.exists(path):
        # Written in full under another name, then linked into place: of
        # processes starting together one link wins, and no one ever
        # reads a half-written file.
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".digest-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32).hex().encode("ascii"))
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(temporary, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(temporary)
    with open(path, "rb") as f:
        return f.read().strip()


class DevicePortal(Portal):
    """The device-login portal, and what the filters need besides it: the
    store (factory certificates, officer roles), the gateway's CA, the
    key of Digest challenges (random per portal unless given) and the
    used Digest nonce counts (the store's, so a response replayed to any
    gateway on the store is refused, unless given)."""

    def __init__(
        self,
        store: IStore,
        reactor: Any = None,
        ca_chain: Sequence[x509.Certificate] = (),
        digest_secret: bytes | None = None,
        nonce_counts: NonceCounts | None = None,
        issuers: Sequence[x509.Certificate] = (),
        password_cache_seconds: float = 0,
    ) -> None:
        self.nonce_counts = nonce_counts if nonce_counts is not None else StoreNonceCounts(store)
        clock = reactor.seconds if reactor is not None else None
        self.password_cache = VerificationCache(password_cache_seconds, clock) if password_cache_seconds > 0 else None
        super().__init__(DeviceRealm(), [DeviceChecker(store, reactor, self.nonce_counts, self.password_cache)])
        self.store = store
        self.ca_chain = tuple(ca_chain)
        self._reactor = reactor
        # One key for every Digest handler: a nonce is bound to its realm
        # and client address by the key's MAC, the response to its URI.
        self._digest_secret = digest_secret if digest_secret is not None else os.urandom(32)
        # The issuing CAs whose certificates count as this gateway's own
        # (the local CA and every token procedure's; default: ca_chain[0]).
        self.issuers = tuple(issuers) or tuple(ca_chain[:1])
        self._factories: dict[tuple[str, str, str | None], ICredentialFactory | None] = {}

    def start(self) -> defer.Deferred[None]:
        return self.nonce_counts.start()

    def close(self) -> defer.Deferred[None]:
        return self.nonce_counts.close()

    def credential_factory(self, handler: HandlerConfig) -> ICredentialFactory | None:
        # One per handler for the process's life.
        key = (handler.id, handler.authtype, handler.realm)
        if key not in self._factories:
            clock = self._reactor.seconds if self._reactor is not None else None
            self._factories[key] = credential_factory(handler, self._digest_secret, clock)
        return self._factories[key]


def device_portal(
    store: IStore,
    reactor: Any = None,
    ca_chain: Sequence[x509.Certificate] = (),
    digest_secret: bytes | None = None,
    nonce_counts: NonceCounts | None = None,
    issuers: Sequence[x509.Certificate] = (),
    password_cache_seconds: float = 0,
) -> DevicePortal:
    return DevicePortal(store, reactor, ca_chain, digest_secret, nonce_counts, issuers, password_cache_seconds)


# -- responses ------------------------------------------------------------------


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _challenge(factory: ICredentialFactory, request: Any, stale: bool = False) -> dict[str, str]:
    fields = {_text(k): _text(v) for k, v in factory.getChallenge(request).items()}
    parts = [f'realm="{_quoted(fields.pop("realm", ""))}"']
    for key, value in fields.items():
        if key == "algorithm":
            parts.append(f"algorithm={value.upper()}")  # a token, not a quoted string (RFC 7616)
        else:
            parts.append(f'{key}="{_quoted(value)}"')
    if stale:  # RFC 7616 §3.3: the credentials were right, the nonce was not
        parts.append("stale=true")
    scheme = factory.scheme.decode().capitalize()
    return {"WWW-Authenticate": f"{scheme} " + ", ".join(parts)}


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def unauthorized(
    factory: ICredentialFactory, request: Any, code: str, reason: str, stale: bool = False
) -> Refusal:
    return Refusal(401, code, reason, _challenge(factory, request, stale))


def _scheme(factory: ICredentialFactory) -> str:
    return factory.scheme.decode().capitalize()


def _certificate_required() -> Refusal:
    return Refusal(
        403, "client-certificate-required", "a TLS client certificate issued by a trusted CA is required"
    )


def _require_tls(peer: PeerInfo) -> None:
    if not peer.is_tls:
        raise Refusal(403, "http-auth-without-tls", "HTTP authentication is accepted only over TLS")


# -- the filters ------------------------------------------------------------------


async def authenticate(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal
) -> Identity:
    """Apply the handler's filter; return the identity or raise Refusal."""
    if peer.untrusted_reason is not None and handler.filter != "public":
        raise Refusal(
            403,
            "client-certificate-untrusted",
            f"the TLS client certificate is not trusted: {peer.untrusted_reason}",
        )
    if handler.filter == "public":
        if peer.certificate is not None:
            return certificate_identity(peer.certificate)
        return Identity(kind="anonymous")
    peer = _issuer_accepted(request, handler, peer, portal)
    if handler.factory is not None:
        identity = await _factory_device(request, handler, peer, portal)
    elif handler.filter == "clientcert":
        identity = await _client_certificate(request, handler, peer, portal)
    elif handler.filter == "registersimpleenroll-basic-idm-auth":
        identity = await _registered_device(request, handler, peer, portal)
    else:
        identity = await _device_or_certificate(request, handler, peer, portal)
    if handler.required_ro_roles is not None:
        identity = await _officer(identity, handler, portal)
    return identity


def _issuer_accepted(request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal) -> PeerInfo:
    """clientCertificateIssuers = local: only this gateway's certificates
    count.  A foreign one beside a password login is ignored; alone, refused."""
    cert = peer.certificate
    if cert is not None and handler.filter == "registersimpleenroll-basic-idm-auth" and handler.factory is None:
        # Only the device's login counts here: a certificate beside it
        # neither helps nor hinders.
        return attr.evolve(peer, certificate=None, chain=())
    if cert is None or handler.client_certificate_issuers != "local":
        return peer
    if officers.issued_by(cert, portal.issuers, peer.chain):
        return peer
    if handler.filter == "device" and request.getHeader(b"authorization"):
        return attr.evolve(peer, certificate=None, chain=())
    raise Refusal(
        403,
        "client-certificate-issuer-not-accepted",
        "this endpoint accepts client certificates issued by this gateway's CA only",
    )


async def _device_or_certificate(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal
) -> Identity:
    """A pre-registered device's HTTP login, or a client certificate."""
    factory = portal.credential_factory(handler)
    if factory is not None and request.getHeader(b"authorization"):
        device = await _http_login(request, handler, factory, peer, portal)
        return Identity(kind="device", device_id=device.device_id, registration=device)
    if peer.certificate is not None:
        return certificate_identity(peer.certificate)
    if factory is not None:
        _require_tls(peer)
        raise unauthorized(
            factory, request, "authentication-required",
            "authenticate with a TLS client certificate or as a pre-registered device",
        )
    raise _certificate_required()


async def _registered_device(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal
) -> Identity:
    """The approval filter: the HTTP login of a pre-registered device, and
    nothing else.  A client certificate alone (even one this gateway
    issued) is not a registration, so it never reaches an operator."""
    factory = portal.credential_factory(handler)
    assert factory is not None  # the configuration demands authtype here
    if not request.getHeader(b"authorization"):
        _require_tls(peer)
        raise unauthorized(
            factory, request, "authentication-required",
            f"this endpoint serves pre-registered devices: log in with HTTP {_scheme(factory)}",
        )
    device = await _http_login(request, handler, factory, peer, portal)
    return Identity(kind="device", device_id=device.device_id, registration=device)


async def _client_certificate(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal
) -> Identity:
    """A client certificate; with authtype, HTTP auth too (an extra layer
    for devices that are not pre-registered: it never replaces the
    certificate)."""
    if peer.certificate is None:
        raise _certificate_required()
    identity = certificate_identity(peer.certificate)
    factory = portal.credential_factory(handler)
    if factory is None:
        return identity
    if not request.getHeader(b"authorization"):
        raise unauthorized(
            factory, request, "authentication-required",
            f"this endpoint also needs HTTP {_scheme(factory)} authentication besides the client certificate",
        )
    device = await _http_login(request, handler, factory, peer, portal)
    return attr.evolve(identity, device_id=device.device_id, registration=device)


async def _factory_device(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal
) -> Identity:
    """The client certificate is a registered factory certificate
    (and, with enroll.mandatorypassword, the same device logs in over HTTP)."""
    assert handler.factory is not None
    if peer.certificate is None:
        raise Refusal(
            403, "factory-certificate-required",
            "present the device's registered factory certificate as the TLS client certificate",
        )
    device = await portal.store.get_device_by_factory_cert(certificate_fingerprint(peer.certificate))
    if device is None:
        raise Refusal(
            403, "factory-certificate-not-registered",
            "the TLS client certificate is not a registered factory certificate",
        )
    if handler.factory.mandatory_password:
        await _factory_password(request, handler, peer, portal, device)
    return Identity(
        kind="factory", certificate=peer.certificate, device_id=device.device_id, registration=device
    )


async def _factory_password(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: DevicePortal, device: Device
) -> None:
    factory = portal.credential_factory(handler)
    assert factory is not None  # the configuration demands authtype here
    if not request.getHeader(b"authorization"):
        raise unauthorized(
            factory, request, "password-required",
            f"this endpoint also needs the device password (HTTP {_scheme(factory)}) besides the factory certificate",
        )
    logged_in = await _http_login(request, handler, factory, peer, portal)
    if logged_in.device_id != device.device_id:
        raise Refusal(
            403, "factory-certificate-other-device",
            f"the factory certificate is registered to another device than {logged_in.device_id!r}",
        )


async def _officer(identity: Identity, handler: HandlerConfig, portal: DevicePortal) -> Identity:
    """requiredRoRoles: the client certificate must be an officer's."""
    cert = identity.certificate
    if identity.kind != "certificate" or cert is None:
        raise officers.not_an_officer(
            "this endpoint serves officer/RA clients: authenticate with the officer's TLS client certificate"
        )
    required = handler.required_ro_roles or ()
    if not required:  # requiredRoRoles = none
        if not officers.issued_by(cert, portal.issuers):
            raise officers.not_an_officer(
                "this endpoint serves RA clients: the TLS client certificate must be issued by this gateway's CA"
            )
        return attr.evolve(identity, acting_as_officer=True)
    held = await portal.store.officer_roles(certificate_fingerprint(cert))
    officers.check_roles(required, held)
    return attr.evolve(identity, officer_roles=tuple(held), acting_as_officer=True)


# -- HTTP Basic / Digest ------------------------------------------------------------


async def _http_login(
    request: Any, handler: HandlerConfig, factory: ICredentialFactory, peer: PeerInfo, portal: DevicePortal
) -> Device:
    """Check the Authorization header; the device that logged in.

    Every way the header can be wrong is a 401 with a fresh challenge and
    a reason: ``malformed-credentials`` (cannot be read),
    ``wrong-auth-scheme``, ``digest-nonce-invalid`` / ``digest-nonce-stale``
    / ``digest-bad-response`` / ``digest-replayed`` (Digest, RFC 7616),
    ``bad-credentials`` (unknown device or wrong password).
    """
    _require_tls(peer)
    name = _scheme(factory)
    try:
        scheme, response = authorization_header(request)
        if scheme.lower() != factory.scheme:
            raise unauthorized(factory, request, "wrong-auth-scheme", f"this endpoint takes HTTP {name} authentication")
        creds = factory.decode(response, request)
    except MalformedCredentials as e:
        raise unauthorized(factory, request, "malformed-credentials", f"malformed HTTP {name} credentials: {e.reason}") from None
    except StaleNonce:
        raise unauthorized(
            factory, request, "digest-nonce-stale", "the Digest nonce has expired: answer the new challenge", stale=True
        ) from None
    except InvalidNonce as e:
        raise unauthorized(
            factory, request, "digest-nonce-invalid",
            f"{e.args[0] if e.args else 'the nonce is not valid'}: answer the new challenge",
        ) from None
    # A refused login is audited with the device id tried (never the password).
    audit.note(request, requester="device:" + creds.username.decode("utf-8", "replace"))
    if isinstance(creds, DigestResponse):
        _check_digest_response(creds, request, handler, factory)
    try:
        _interface, device_id, _logout = await portal.login(creds, None, IDeviceId)
    except ReplayedResponse as e:
        raise unauthorized(
            factory, request, "digest-replayed",
            f"this Digest response was used before (nonce count {e.nc:08x}): answer the new challenge",
            stale=True,
        ) from None
    except error.LoginFailed:
        raise unauthorized(factory, request, "bad-credentials", "unknown device or wrong password") from None
    device = await portal.store.get_device(str(device_id))
    if device is None:  # removed a moment ago
        raise unauthorized(factory, request, "bad-credentials", "unknown device or wrong password")
    return device


def _check_digest_response(
    creds: DigestResponse, request: Any, handler: HandlerConfig, factory: ICredentialFactory
) -> None:
    """What the hash does not cover: the response uses the qop and
    algorithm we announced, answers this realm, and is for this request's
    URI (no replay of a response made for another resource)."""
    fields = creds.fields
    if fields.get("qop") != handler.qop:
        raise unauthorized(
            factory, request, "digest-bad-response", f"the Digest response must use qop={handler.qop}"
        )
    if fields.get("algorithm", "MD5").upper() != "MD5":
        raise unauthorized(factory, request, "digest-bad-response", "the Digest response must use algorithm MD5")
    if fields.get("realm") != creds.realm:
        raise unauthorized(factory, request, "digest-bad-response", "the Digest response is for another realm")
    if fields["uri"].encode("utf-8") != request.uri:
        raise unauthorized(factory, request, "digest-bad-response", "the Digest response is for another URI")


# -- single-use registrations ---------------------------------------------------------


@asynccontextmanager
async def single_use(store: IStore, identity: Identity) -> AsyncIterator[None]:
    """Claim the identity's single-use registration around issuing.

    Claimed before issuing with one conditional UPDATE, so of two
    concurrent enrollments with the same registration one goes on and the
    other is refused: at most one certificate.  If issuing or recording
    fails, the claim is released so the device can try again.
    """
    device = identity.registration
    if device is None or not device.single_use:
        yield
        return
    claimed_at = datetime.now(timezone.utc)
    if not await store.consume_device(device.device_id, claimed_at):
        raise _consumed(device.device_id)
    try:
        yield
    except BaseException:
        await store.release_device(device.device_id, claimed_at)
        raise
