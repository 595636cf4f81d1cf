"""HTTP Basic (RFC 7617) and Digest (RFC 7616) credentials, read strictly.

The ``Authorization`` header is the one value a device sends before it is
authenticated, so everything here treats it as hostile: the header is
parsed by one small linear scanner (RFC 9110 §11: ``auth-scheme [ 1*SP (
token68 / #auth-param ) ]``), and every way it can be wrong is a
:class:`MalformedCredentials` carrying a one-line reason, never another
exception.  The credential factories implement twisted.web's
``ICredentialFactory`` and hand twisted.cred the usual credentials
(``IUsernamePassword``, ``IUsernameDigestHash``).

Digest (MD5, ``qop=auth``):

- a nonce is made by the gateway and checks itself:
  ``<time>-<random>-<HMAC-SHA256(key, time, random, realm, client address)>``,
  keyed with the secret shared by every process of a state directory, so
  any of them accepts it; it is valid for :data:`NONCE_LIFETIME` seconds,
  after which the device is told ``stale=true`` (RFC 7616 §3.3);
- each (nonce, nonce count) answers one request only: :class:`NonceCounts`
  remembers, per nonce, the highest ``nc`` a correct response used, and a
  response whose ``nc`` is not higher is a replay (:class:`ReplayedResponse`).
  :class:`StoreNonceCounts` keeps that record in the gateway's store, so
  it holds across every process and machine sharing the store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

import attr
from twisted.cred import credentials, error
from twisted.internet import defer
from twisted.web.iweb import ICredentialFactory
from zope.interface import implementer

from estgw.escape import printable
from estgw.store import IStore

__all__ = [
    "MAX_AUTHORIZATION",
    "NONCE_LIFETIME",
    "MalformedCredentials",
    "InvalidNonce",
    "StaleNonce",
    "ReplayedResponse",
    "Authorization",
    "parse_authorization",
    "authorization_header",
    "BasicCredentialFactory",
    "DigestCredentialFactory",
    "DigestResponse",
    "NonceCounts",
    "StoreNonceCounts",
]

#: Longest Authorization header read, in bytes.  A Digest response with a
#: 64-character device id is about 400 bytes; twisted.web itself refuses
#: request heads over 16 KiB with 400.
MAX_AUTHORIZATION = 4096

#: Seconds a Digest nonce is accepted after the challenge that made it.
NONCE_LIFETIME = 15 * 60

# Seconds a nonce's time may lie ahead of ours (processes sharing a state
# directory on one machine share a clock, so little).
_CLOCK_SKEW = 5


class MalformedCredentials(error.LoginFailed):
    """The Authorization header cannot be read; ``reason`` says why, in
    one line with every client-supplied character escaped."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class InvalidNonce(error.LoginFailed):
    """A Digest nonce this gateway did not make for this client and realm
    (another key, another address, or forged)."""


class StaleNonce(error.LoginFailed):
    """A Digest nonce this gateway made, but longer ago than NONCE_LIFETIME."""


class ReplayedResponse(error.UnauthorizedLogin):
    """A correct Digest response whose nonce count was used before."""

    def __init__(self, nc: int) -> None:
        super().__init__(f"nonce count {nc:08x} was used before")
        self.nc = nc


# -- the header -----------------------------------------------------------------

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TOKEN68 = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_WHITESPACE = b" \t"


@attr.s(frozen=True, auto_attribs=True)
class Authorization:
    """One parsed Authorization header (RFC 9110 §11.6.2)."""

    scheme: str  # lower case
    token68: str | None = None
    params: Mapping[str, str] = attr.Factory(dict)  # names lower case, values unquoted

    @property
    def empty(self) -> bool:
        return self.token68 is None and not self.params


def _shown(value: bytes) -> str:
    return printable(value.decode("utf-8", "backslashreplace"))


def _token(data: bytes, at: int) -> int:
    end = at
    while end < len(data) and data[end] in _TCHAR:
        end += 1
    return end


def _skip(data: bytes, at: int, chars: bytes = _WHITESPACE) -> int:
    while at < len(data) and data[at] in chars:
        at += 1
    return at


def _quoted_string(data: bytes, at: int) -> tuple[bytes, int]:
    """``data[at]`` is the opening quote; the unescaped value and the index after the closing quote."""
    value = bytearray()
    at += 1
    while at < len(data):
        byte = data[at]
        if byte == 0x22:  # "
            return bytes(value), at + 1
        if byte == 0x5C:  # \ quoted-pair
            at += 1
            if at == len(data):
                break
            byte = data[at]
        value.append(byte)
        at += 1
    raise MalformedCredentials("a quoted value is not closed")


def _text(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCredentials(f"the value of {name} is not UTF-8: {_shown(value)!r}") from None


def _check_header(value: bytes) -> None:
    if len(value) > MAX_AUTHORIZATION:
        raise MalformedCredentials(f"the Authorization header is longer than {MAX_AUTHORIZATION} bytes")
    if any(b < 0x20 and b != 0x09 or b == 0x7F for b in value):
        raise MalformedCredentials("the Authorization header contains a control character")


def parse_authorization(value: bytes) -> Authorization:
    """Parse one Authorization header value.

    :raises MalformedCredentials: longer than :data:`MAX_AUTHORIZATION`,
        a control character, no scheme, a parameter without ``=`` or
        value, an unclosed quote, a parameter given twice, a value that is
        not UTF-8.  A scheme alone is returned with no credentials
        (:attr:`Authorization.empty`); the factory says what it lacks.
    """
    _check_header(value)
    data = value.strip(_WHITESPACE)
    end = _token(data, 0)
    if end == 0:
        raise MalformedCredentials("the Authorization header does not start with an authentication scheme")
    scheme = data[:end].decode("ascii").lower()
    if end == len(data):
        return Authorization(scheme)
    if data[end] != 0x20:
        raise MalformedCredentials(f"the authentication scheme is followed by {_shown(data[end:end + 1])!r}, not a space")
    rest = data[_skip(data, end):]
    if _TOKEN68.fullmatch(rest):
        return Authorization(scheme, token68=rest.decode("ascii"))
    params: dict[str, str] = {}
    at = 0
    while True:
        at = _skip(rest, at, _WHITESPACE + b",")  # empty list elements are allowed (RFC 9110 §5.6.1)
        if at == len(rest):
            break
        name_end = _token(rest, at)
        if name_end == at:
            raise MalformedCredentials(f"expected a parameter name at {_shown(rest[at:at + 16])!r}")
        name = rest[at:name_end].decode("ascii").lower()
        at = _skip(rest, name_end)
        if at == len(rest) or rest[at] != 0x3D:  # =
            raise MalformedCredentials(f"the parameter {name!r} has no '=' and value")
        at = _skip(rest, at + 1)
        if at < len(rest) and rest[at] == 0x22:
            raw, at = _quoted_string(rest, at)
        else:
            value_end = _token(rest, at)
            if value_end == at:
                raise MalformedCredentials(f"the parameter {name!r} has no value")
            raw, at = rest[at:value_end], value_end
        if name in params:
            raise MalformedCredentials(f"the parameter {name!r} is given twice")
        params[name] = _text(name, raw)
        at = _skip(rest, at)
        if at < len(rest) and rest[at] != 0x2C:  # ,
            raise MalformedCredentials(f"expected ',' after the parameter {name!r}")
    return Authorization(scheme, params=params)


def authorization_header(request: Any) -> tuple[bytes, bytes]:
    """The request's one Authorization header as (scheme, the rest); the
    rest is the credential factory's to read.

    :raises MalformedCredentials: more than one Authorization header, one
        that is too long, has a control character, or starts with no scheme.
    """
    values = request.requestHeaders.getRawHeaders(b"authorization") or []
    if len(values) != 1:
        raise MalformedCredentials(f"{len(values)} Authorization headers: send exactly one")
    header = values[0]
    _check_header(header)
    data = header.strip(_WHITESPACE)
    end = _token(data, 0)
    if end == 0 or (end < len(data) and data[end] != 0x20):
        raise MalformedCredentials("the Authorization header does not start with an authentication scheme and a space")
    return data[:end], data[end + 1:]


def _params(factory: Any, response: bytes) -> Authorization:
    parsed = parse_authorization(factory.scheme + b" " + response)
    if parsed.empty:
        raise MalformedCredentials(f"no credentials after the scheme {factory.scheme.decode().capitalize()}")
    return parsed


def _check_characters(what: str, value: str) -> None:
    # RFC 7617 §2: neither user-id nor password contains control
    # characters; line separators and format characters are refused alike.
    if not value.isprintable():
        raise MalformedCredentials(f"the {what} contains a control character")


# -- Basic ----------------------------------------------------------------------


@implementer(ICredentialFactory)
class BasicCredentialFactory:
    """RFC 7617 Basic: ``base64(device-id ":" password)``, UTF-8."""

    scheme = b"basic"

    def __init__(self, realm: bytes) -> None:
        self.authenticationRealm = realm

    def getChallenge(self, request: Any) -> dict[str, bytes]:
        return {"realm": self.authenticationRealm}

    def decode(self, response: bytes, request: Any) -> credentials.UsernamePassword:
        """:raises MalformedCredentials: not one base64 value, no colon, not UTF-8, control characters."""
        _check_header(response)
        token = response.strip(_WHITESPACE)
        if not token:
            raise MalformedCredentials("no credentials after the scheme Basic")
        if not _TOKEN68.fullmatch(token):
            raise MalformedCredentials("the Basic credentials are not one base64 value")
        # Padding may be left off (some clients do); anything else must be base64.
        data = token.decode("ascii").rstrip("=")
        try:
            decoded = base64.b64decode(data + "=" * (-len(data) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise MalformedCredentials("the Basic credentials are not base64") from None
        user, colon, password = decoded.partition(b":")
        if not colon:
            raise MalformedCredentials("the Basic credentials have no ':' between the device id and the password")
        device_id, secret = _text("the device id", user), _text("the password", password)
        if not device_id:
            raise MalformedCredentials("the Basic credentials have an empty device id")
        _check_characters("device id", device_id)
        _check_characters("password", secret)
        return credentials.UsernamePassword(user, password)


# -- Digest ---------------------------------------------------------------------

_HEX8 = re.compile(r"[0-9a-fA-F]{8}")
_HEX32 = re.compile(r"[0-9a-fA-F]{32}")
_NONCE = re.compile(r"([0-9a-f]{1,16})-([0-9a-f]{32})-([0-9a-f]{64})")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


@implementer(credentials.IUsernameDigestHash)
class DigestResponse:
    """A Digest response whose nonce this gateway made (RFC 7616 §3.4).

    ``fields`` are the parameters as sent (text); ``nc`` is the nonce
    count as a number; the hash is checked by :meth:`checkHash`.
    """

    def __init__(self, username: str, method: bytes, realm: str, fields: Mapping[str, str], expires_at: float) -> None:
        self.username = username.encode("utf-8")
        self.method = method
        self.realm = realm
        self.fields = dict(fields)
        self.nonce = fields["nonce"]
        self.nc = int(fields["nc"], 16) if "nc" in fields else 0
        self.expires_at = expires_at

    def checkHash(self, digestHash: bytes) -> bool:
        """RFC 7616 §3.4.1 with H(A1) given: response = KD(H(A1), nonce:nc:cnonce:qop:H(A2))."""
        f = self.fields
        ha2 = _md5(self.method + b":" + f["uri"].encode("utf-8"))
        if "qop" in f:
            data = ":".join((f["nonce"], f["nc"], f["cnonce"], f["qop"], ha2))
        else:  # RFC 2069: refused later (qop is required), still computed right
            data = ":".join((f["nonce"], ha2))
        expected = _md5(digestHash + b":" + data.encode("utf-8"))
        return hmac.compare_digest(expected, f["response"].lower())


@implementer(ICredentialFactory)
class DigestCredentialFactory:
    """RFC 7616 Digest with MD5 and qop=auth.

    ``secret`` keys the nonces (shared by the processes of one state
    directory); ``clock`` returns seconds since the epoch.
    """

    scheme = b"digest"
    algorithm = b"MD5"

    def __init__(self, realm: bytes, secret: bytes | None = None, clock: Callable[[], float] = time.time) -> None:
        self.authenticationRealm = realm
        self._secret = secret if secret is not None else os.urandom(32)
        self._clock = clock
        # RFC 7616 asks the client to return it unchanged; the nonce carries
        # everything that is checked, so this only has to be ours.
        self._opaque = hmac.new(self._secret, b"opaque:" + realm, hashlib.sha256).hexdigest()[:32]

    def _mac(self, when: str, random: str, request: Any) -> str:
        host = getattr(request.getClientAddress(), "host", "") or ""
        message = "\0".join((when, random, self.authenticationRealm.decode("utf-8", "replace"), host))
        return hmac.new(self._secret, message.encode("utf-8"), hashlib.sha256).hexdigest()

    def getChallenge(self, request: Any) -> dict[str, bytes]:
        when, random = f"{int(self._clock()):x}", os.urandom(16).hex()
        nonce = f"{when}-{random}-{self._mac(when, random, request)}"
        return {
            "realm": self.authenticationRealm,
            "nonce": nonce.encode("ascii"),
            "opaque": self._opaque.encode("ascii"),
            "qop": b"auth",
            "algorithm": self.algorithm,
        }

    def decode(self, response: bytes, request: Any) -> DigestResponse:
        """The response's fields, its nonce checked.

        :raises MalformedCredentials: syntax, a missing or ill-formed field.
        :raises InvalidNonce: a nonce or opaque this gateway did not make
            for this client and realm.
        :raises StaleNonce: a nonce older than :data:`NONCE_LIFETIME`.
        """
        parsed = _params(self, response)
        if parsed.token68 is not None:
            raise MalformedCredentials("Digest credentials are parameters, not one token")
        fields = dict(parsed.params)
        if "username*" in fields or fields.get("userhash", "false").lower() != "false":
            raise MalformedCredentials("username* and userhash are not supported: send username")
        for name in ("username", "realm", "nonce", "uri", "response"):
            if not fields.get(name):
                raise MalformedCredentials(f"the Digest response has no {name}")
        if not _HEX32.fullmatch(fields["response"]):
            raise MalformedCredentials("the Digest response value is not 32 hexadecimal digits (MD5)")
        if "qop" in fields:
            if not _HEX8.fullmatch(fields.get("nc", "")) or int(fields["nc"], 16) == 0:
                raise MalformedCredentials("the nonce count nc is not 8 hexadecimal digits from 00000001")
            if not fields.get("cnonce"):
                raise MalformedCredentials("the Digest response has qop but no cnonce")
        _check_characters("device id", fields["username"])
        expires_at = self._check_nonce(fields["nonce"], request)
        if "opaque" in fields and not hmac.compare_digest(fields["opaque"].encode("utf-8"), self._opaque.encode("ascii")):
            raise InvalidNonce("the opaque value is not the one this gateway sent")
        realm = self.authenticationRealm.decode("utf-8")
        return DigestResponse(fields["username"], request.method, realm, fields, expires_at)

    def _check_nonce(self, nonce: str, request: Any) -> float:
        """When the nonce expires; raises InvalidNonce or StaleNonce."""
        match = _NONCE.fullmatch(nonce)
        if match is None:
            raise InvalidNonce("the nonce was not made by this gateway")
        when, random, mac = match.groups()
        if not hmac.compare_digest(mac, self._mac(when, random, request)):
            raise InvalidNonce("the nonce was not made by this gateway for this client")
        made, now = int(when, 16), self._clock()
        if made > now + _CLOCK_SKEW:
            raise InvalidNonce("the nonce was made in the future")
        if now - made > NONCE_LIFETIME:
            raise StaleNonce("the nonce has expired")
        return float(made + NONCE_LIFETIME)


# -- nonce counts ----------------------------------------------------------------


class NonceCounts:
    """Which Digest (nonce, nonce count) pairs answered a request already."""

    def use(self, nonce: str, nc: int, expires_at: float) -> defer.Deferred[bool]:
        """Record that a correct response used ``nc`` with ``nonce``.

        Fires True if ``nc`` is higher than any count used with the nonce
        before (the first use included), False for a replay.  The record
        is kept until ``expires_at`` (seconds since the epoch), after
        which the nonce itself is refused as stale.
        """
        raise NotImplementedError

    def start(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def close(self) -> defer.Deferred[None]:
        return defer.succeed(None)


class StoreNonceCounts(NonceCounts):
    """Nonce counts in the gateway's store (:meth:`IStore.use_digest_nonce`):
    every process and machine on one store refuses a response that any of
    them accepted, decided by one statement in the database.

    ``use`` fails with :class:`~estgw.store.StoreUnavailable` when the
    database does, which a request is answered as any other store fault
    (503 ``store-unavailable``); the store is started and closed by its
    owner, not here.
    """

    def __init__(self, store: IStore) -> None:
        self._store = store

    def use(self, nonce: str, nc: int, expires_at: float) -> defer.Deferred[bool]:
        return self._store.use_digest_nonce(nonce, nc, datetime.fromtimestamp(expires_at, timezone.utc))
