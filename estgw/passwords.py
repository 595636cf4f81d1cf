"""Password hashes for pre-registered devices (HTTP Basic/Digest over TLS).

Only hashes are stored, never passwords.  The format carries its own
parameters so the cost can be raised later without breaking the hashes
already in the store::

    scrypt$16384$8$1$<salt, base64>$<hash, base64>

New hashes use N = ``auth.scrypt.n`` (default 16384, r = 8, p = 1: 16 MiB
and tens of milliseconds of CPU per check); a stored hash is always
checked with the parameters it carries.  Code running on the reactor
thread must use :func:`check_password_in_thread`, never
:func:`verify_password` directly.

:class:`VerificationCache` remembers successful checks for
``auth.passwordCacheSeconds`` so that a device retrying within that time
does not pay for scrypt again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import time
import unicodedata
from typing import Any

from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool

__all__ = ["hash_password", "verify_password", "check_password_in_thread", "VerificationCache", "DEFAULT_N"]

_SCHEME = "scrypt"
DEFAULT_N = 2**14
_N = DEFAULT_N
_R = 8
_P = 1
_SALT_BYTES = 16
_HASH_BYTES = 32

# Bounds on the parameters read back from a stored hash: the store is
# trusted, but a corrupted or hand-edited row must not make one login
# allocate gigabytes or spin for minutes.
_MAX_MEMORY = 256 * 1024 * 1024
_MAX_P = 16


def _password_bytes(password: str | bytes) -> bytes:
    # twisted.cred hands passwords over as bytes, callers of the CLI as
    # str; both mean UTF-8.  NFC so that the same password typed on two
    # systems that compose accents differently still matches (RFC 8265's
    # OpaqueString profile does the same).
    if isinstance(password, bytes):
        password = password.decode("utf-8")
    return unicodedata.normalize("NFC", password).encode("utf-8")


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # OpenSSL's default maxmem (32 MiB) is just above what n=2**14, r=8
    # needs; give explicit headroom so that bounded larger costs work too.
    maxmem = 128 * r * (n + p + 2) + 1024 * 1024
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=maxmem)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str | bytes, n: int = DEFAULT_N) -> str:
    """
    Hash ``password`` with scrypt (cost ``n``, a power of two; r = 8,
    p = 1) and a fresh random 16-byte salt.

    :raises ValueError: for an empty password (a device registered with
        one could be enrolled by anyone), or an ``n`` that is not a power
        of two from 1024 to 2**20.
    """
    if n & (n - 1) or not 2**10 <= n <= 2**20:
        raise ValueError(f"scrypt cost must be a power of two from 1024 to 1048576, not {n}")
    raw = _password_bytes(password)
    if not raw:
        raise ValueError("refusing to hash an empty password")
    salt = os.urandom(_SALT_BYTES)
    digest = _scrypt(raw, salt, n, _R, _P, _HASH_BYTES)
    return f"{_SCHEME}${n}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def _parse(encoded: str) -> tuple[int, int, int, bytes, bytes] | None:
    """Split an encoded hash into its parts, or None when malformed."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        return None
    try:
        # int() would accept "+16", " 16" and "1_6": insist on plain digits
        # so that exactly one spelling of a hash is valid.
        if not all(part.isascii() and part.isdigit() for part in parts[1:4]):
            return None
        n, r, p = (int(part) for part in parts[1:4])
        salt = base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error):
        return None
    if n < 2 or n & (n - 1) or r < 1 or not 1 <= p <= _MAX_P:
        return None  # scrypt needs n a power of two > 1
    if 128 * r * n > _MAX_MEMORY:
        return None
    # scrypt output is a prefix-stable stream: a truncated digest would
    # still match a shorter derived key, so insist on the full length.
    if len(salt) < _SALT_BYTES or len(digest) != _HASH_BYTES:
        return None
    return n, r, p, salt, digest


def verify_password(password: str | bytes, encoded: str | None) -> bool:
    """
    Whether ``password`` matches ``encoded`` (from :func:`hash_password`).

    False, never an exception, for a malformed or missing hash and for a
    password that is not valid UTF-8: every failure to match is the same
    failure to the caller.  Blocks for tens of milliseconds.
    """
    if not isinstance(encoded, str):
        return False
    parsed = _parse(encoded)
    if parsed is None:
        return False
    n, r, p, salt, expected = parsed
    try:
        raw = _password_bytes(password)
    except (UnicodeDecodeError, AttributeError, TypeError):
        return False
    try:
        actual = _scrypt(raw, salt, n, r, p, len(expected))
    except (ValueError, MemoryError):
        return False
    # Constant time, so the response time does not tell how many leading
    # bytes of a guess were right.
    return hmac.compare_digest(actual, expected)


_dummy_hash: str | None = None


def _verify_or_burn(password: str | bytes, encoded: str | None) -> bool:
    # For an unknown device (no hash) spend the same time as for a known
    # one, so that response times do not reveal which device ids exist.
    global _dummy_hash
    if encoded is None:
        if _dummy_hash is None:
            _dummy_hash = hash_password("estgw-dummy-password")
        verify_password(password, _dummy_hash)
        return False
    return verify_password(password, encoded)


def check_password_in_thread(
    password: str | bytes, encoded: str | None, reactor: Any = None
) -> Deferred[bool]:
    """
    :func:`verify_password` in the reactor's thread pool.

    ``encoded`` may be None (unknown device, or one registered without a
    password): the result is then False, after as much work as a real
    check, so timing does not tell known device ids from unknown ones.
    """
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    # Each scrypt check holds 16 MiB: at most one per core at a time keeps
    # a burst of logins from growing the process (bench/enroll_bench.py).
    return _SCRYPT_SLOTS.run(
        deferToThreadPool, reactor, reactor.getThreadPool(), _verify_or_burn, password, encoded
    )


_SCRYPT_SLOTS = DeferredSemaphore(max(1, os.cpu_count() or 1))


class VerificationCache:
    """Successful password checks, remembered for ``seconds``.

    An entry is keyed by an HMAC (with a random per-process key) of the
    device id, the password and the stored hash: the password itself is
    never kept, and a new password or a new registration (a new salt)
    changes the stored hash, so an entry of the old one never matches.  A
    removed device has no stored hash to match.  Failed checks are not
    remembered: every wrong guess still costs a full scrypt.  At most
    ``size`` entries; the oldest go first.  ``clock()`` gives seconds.
    """

    def __init__(self, seconds: float, clock: Any = None, size: int = 100_000) -> None:
        self.seconds = seconds
        self._clock = clock if clock is not None else time.monotonic
        self._size = size
        self._key = os.urandom(32)
        self._expiry: dict[bytes, float] = {}  # insertion order is expiry order

    def _entry(self, device_id: str, password: str | bytes, encoded: str) -> bytes | None:
        try:
            raw = _password_bytes(password)
        except (UnicodeDecodeError, AttributeError, TypeError):
            return None
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for part in (device_id.encode("utf-8"), raw, encoded.encode("utf-8")):
            mac.update(len(part).to_bytes(4, "big") + part)
        return mac.digest()

    def _expire(self, now: float) -> None:
        for entry, until in list(self._expiry.items()):
            if until > now and len(self._expiry) <= self._size:
                break
            del self._expiry[entry]

    def known(self, device_id: str, password: str | bytes, encoded: str | None) -> bool:
        """Whether this password was verified against ``encoded`` for this
        device within the last ``seconds``."""
        if self.seconds <= 0 or encoded is None:
            return False
        entry = self._entry(device_id, password, encoded)
        until = self._expiry.get(entry) if entry is not None else None
        return until is not None and until > self._clock()

    def remember(self, device_id: str, password: str | bytes, encoded: str) -> None:
        if self.seconds <= 0:
            return
        entry = self._entry(device_id, password, encoded)
        if entry is None:
            return
        now = self._clock()
        self._expiry.pop(entry, None)
        self._expiry[entry] = now + self.seconds
        self._expire(now)
