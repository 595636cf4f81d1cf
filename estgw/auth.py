"""Filters: who is calling a handler, and may they?

Security rests on TLS client certificates (see :mod:`estgw.tls`).  HTTP
Basic/Digest is accepted only for a device an operator pre-registered,
and only over TLS; credentials go through a twisted.cred portal whose
checker reads the device store.  Every failure is a :class:`Refusal`
with its own code.
"""

from __future__ import annotations

from typing import Any

import attr
from cryptography import x509
from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.web.guard import BasicCredentialFactory, DigestCredentialFactory
from twisted.web.iweb import ICredentialFactory
from zope.interface import implementer

from estgw.config import HandlerConfig
from estgw.passwords import check_password_in_thread
from estgw.refusal import Refusal
from estgw.store import IStore
from estgw.tls import PeerInfo


@attr.s(frozen=True, auto_attribs=True)
class Identity:
    """Who a request was authenticated as."""

    kind: str  # "anonymous" | "certificate" | "device"
    certificate: x509.Certificate | None = None
    device_id: str | None = None
    # Officer/RA roles the client certificate holds (SPEC §3): such a
    # client may enroll for other subjects.
    officer_roles: tuple[str, ...] = ()
    # Set when an officer/RA certificate acts on behalf of others.
    acting_as_officer: bool = False

    @property
    def requester(self) -> str:
        """The identity recorded with every certificate issued for it."""
        if self.kind == "device":
            return f"device:{self.device_id}"
        if self.certificate is not None:
            return (
                f"cert:{self.certificate.subject.rfc4514_string()}"
                f"#serial={self.certificate.serial_number:x}"
            )
        return "anonymous"


def certificate_identity(certificate: x509.Certificate) -> Identity:
    return Identity(kind="certificate", certificate=certificate)


@implementer(ICredentialsChecker)
class DeviceChecker:
    """Checks HTTP Basic credentials against the pre-registered devices."""

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, store: IStore, reactor: Any = None) -> None:
        self._store = store
        self._reactor = reactor

    async def _check(self, creds: credentials.IUsernamePassword) -> bytes:
        device_id = creds.username.decode("utf-8", "replace")
        device = await self._store.get_device(device_id)
        if device is None or device.password_hash is None or device.consumed_at:
            raise error.UnauthorizedLogin("unknown device")
        password = creds.password.decode("utf-8", "replace")
        if not await check_password_in_thread(password, device.password_hash, self._reactor):
            raise error.UnauthorizedLogin("wrong password")
        return creds.username

    def requestAvatarId(self, creds: Any) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._check(creds))


@implementer(IRealm)
class DeviceRealm:
    """The avatar of a device login is its id; handlers need nothing more."""

    def requestAvatar(self, avatarId: bytes, mind: Any, *interfaces: Any) -> tuple:
        return interfaces[0], avatarId.decode("utf-8"), lambda: None


def device_portal(store: IStore, reactor: Any = None) -> Portal:
    return Portal(DeviceRealm(), [DeviceChecker(store, reactor)])


class _Avatar:
    """Marker interface for Portal.login: the realm hands back a str."""


def credential_factory(handler: HandlerConfig) -> ICredentialFactory | None:
    realm = (handler.realm or "").encode("utf-8")
    if handler.authtype == "Basic":
        return BasicCredentialFactory(realm)
    if handler.authtype == "Digest":
        return DigestCredentialFactory(b"md5", realm)
    return None


def _challenge(factory: ICredentialFactory, request: Any) -> dict[str, str]:
    fields = factory.getChallenge(request)
    parts = []
    for key, value in fields.items():
        key = key.decode() if isinstance(key, bytes) else key
        value = value.decode() if isinstance(value, bytes) else value
        parts.append(f'{key}="{value}"')
    scheme = factory.scheme.decode().capitalize()
    return {"WWW-Authenticate": f"{scheme} " + ", ".join(parts)}


def unauthorized(factory: ICredentialFactory, request: Any, code: str, reason: str) -> Refusal:
    return Refusal(401, code, reason, _challenge(factory, request))


async def authenticate(
    request: Any, handler: HandlerConfig, peer: PeerInfo, portal: Portal
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

    factory = credential_factory(handler)
    header = request.getHeader(b"authorization")
    if header and factory is not None and handler.filter != "clientcert":
        return await _http_login(request, factory, header, peer, portal)
    if peer.certificate is not None:
        return certificate_identity(peer.certificate)
    if factory is not None and handler.filter != "clientcert":
        raise unauthorized(
            factory, request, "authentication-required",
            "authenticate with a TLS client certificate or as a pre-registered device",
        )
    raise Refusal(
        403,
        "client-certificate-required",
        "a TLS client certificate issued by a trusted CA is required",
    )


async def _http_login(
    request: Any, factory: ICredentialFactory, header: bytes, peer: PeerInfo, portal: Portal
) -> Identity:
    if not peer.is_tls:
        raise Refusal(403, "http-auth-without-tls", "HTTP authentication is accepted only over TLS")
    scheme, _, response = header.partition(b" ")
    if scheme.lower() != factory.scheme:
        raise unauthorized(
            factory, request, "wrong-auth-scheme",
            f"this endpoint takes HTTP {factory.scheme.decode().capitalize()} authentication",
        )
    try:
        creds = factory.decode(response.strip(), request)
        _interface, device_id, _logout = await portal.login(creds, None, _Avatar)
    except error.LoginFailed:
        raise unauthorized(
            factory, request, "bad-credentials", "unknown device or wrong password"
        ) from None
    return Identity(kind="device", device_id=device_id)
