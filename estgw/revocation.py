"""Revocation of client certificates: CRL files and OCSP.

The store answers for certificates this gateway issued (``estgw cert
revoke`` takes effect on the next request, see :mod:`estgw.enroll`).
This module adds what CAs publish:

* CRL files named by ``tls.crls``, each verified at start against the
  trust anchor (or the gateway's own CA) whose subject is its issuer, and
  reloaded when the file changes (one ``stat`` per use; the read and the
  signature check run on a thread).  A reload that fails keeps the CRL
  loaded before.  A certificate on a CRL of its issuer is refused; a CRL
  past its nextUpdate is refused (``tls.crl.stale = hard``) or accepted
  with a warning (``soft``).
* OCSP (``tls.ocsp``): the client certificate's status is asked of the
  responder in its AuthorityInformationAccess (``aia``) or of one
  configured URL, with a timeout and a cache.  The answer must be signed
  by the issuer or by a responder the issuer delegated to (EKU
  id-kp-OCSPSigning).  Certificates of the gateway's own CA are left to
  the store.

A revoked certificate is refused with 403 ``client-certificate-revoked``.
When its status cannot be learned (a stale CRL, an OCSP failure, each
under ``hard``) the refusal is 503 with Retry-After (``crl-stale``,
``ocsp-unavailable``): the device is not at fault and may retry.

Everything is built once at start (:func:`build_checker`); the HTTP
client, the clock and the way blocking work leaves the reactor are
parameters so tests can replace them.
"""

from __future__ import annotations

import collections
import os
import weakref
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Sequence, cast

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, SignatureAlgorithmOID
from twisted.internet import defer, protocol, threads
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from estgw.config import Config, ConfigError
from estgw.escape import printable
from estgw.refusal import Refusal
from estgw.serials import format_serial

__all__ = [
    "CRLError",
    "CRLFile",
    "LoadedCRL",
    "OCSPChecker",
    "OCSPFailure",
    "RevocationChecker",
    "build_checker",
    "load_crl",
]

#: Clocks of CAs, responders and this host drift.
CLOCK_SKEW = timedelta(minutes=5)
#: Told to a device whose certificate's status cannot be learned now:
#: a stale CRL or an unreachable responder is usually fixed within minutes.
RETRY_AFTER_SECONDS = 300
#: An OCSP answer is a few KiB; a responder sending more is broken.
MAX_OCSP_RESPONSE_BYTES = 64 * 1024
#: Bounds the OCSP cache (one entry per client certificate).
MAX_OCSP_CACHE_ENTRIES = 10_000

OCSP_REQUEST_TYPE = b"application/ocsp-request"
OCSP_RESPONSE_TYPE = b"application/ocsp-response"

RunBlocking = Callable[..., "defer.Deferred[Any]"]


def _revoked(reason: str) -> Refusal:
    return Refusal(403, "client-certificate-revoked", reason)


def _status_unknown(code: str, reason: str) -> Refusal:
    # 503 + Retry-After: the device is not at fault and may succeed later.
    return Refusal(503, code, reason, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _links(
    certificate: x509.Certificate, chain: Sequence[x509.Certificate]
) -> list[tuple[x509.Certificate, x509.Certificate | None]]:
    """(certificate, its issuer) for every certificate below the trust anchor.

    Without a verified chain that starts with ``certificate`` only the
    certificate itself is known, and its issuer only by name.
    """
    if chain and chain[0] == certificate:
        return [(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]
    return [(certificate, None)]


def _utc_from_seconds(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


# --- CRL files -----------------------------------------------------------------


class CRLError(ValueError):
    """A CRL file cannot be used; the message says why."""


@attr.s(frozen=True, auto_attribs=True, eq=False)
class LoadedCRL:
    """A CRL read from ``path`` whose signature verified with ``signer``."""

    path: str
    crl: x509.CertificateRevocationList
    signer: x509.Certificate
    stat: tuple[int, int, int]

    @property
    def number(self) -> int | None:
        try:
            return self.crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except x509.ExtensionNotFound:
            return None

    def applies_to(self, certificate: x509.Certificate, issuer: x509.Certificate | None) -> bool:
        """Is this the CRL of ``certificate``'s issuer?"""
        if self.crl.issuer != certificate.issuer:
            return False
        # Same name is not enough when the issuer is known: it must be the same key.
        return issuer is None or _spki(issuer) == _spki(self.signer)

    def is_stale(self, now: datetime) -> bool:
        next_update = self.crl.next_update_utc
        return next_update is not None and next_update < now


def _file_stat(path: str) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def parse_crl(data: bytes) -> x509.CertificateRevocationList:
    """A CRL in PEM or DER."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except ValueError:
        raise CRLError("not a CRL (PEM or DER expected)") from None


def _may_sign_crls(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no KeyUsage: every use allowed (RFC 5280 4.2.1.3)
    return usage.crl_sign


def crl_signer(
    crl: x509.CertificateRevocationList, anchors: Iterable[x509.Certificate]
) -> x509.Certificate:
    """The anchor whose subject is the CRL's issuer and whose key signed it."""
    issuer = crl.issuer.rfc4514_string()
    candidates = [a for a in anchors if a.subject == crl.issuer]
    if not candidates:
        raise CRLError(f"no trust anchor is its issuer {issuer!r}")
    for candidate in candidates:
        try:
            valid = crl.is_signature_valid(candidate.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError, UnsupportedAlgorithm):
            continue
        if valid:
            if not _may_sign_crls(candidate):
                raise CRLError(f"the key usage of {issuer!r} does not allow cRLSign")
            return candidate
    raise CRLError(f"its signature does not verify with the key of {issuer!r}")


def load_crl(path: str, anchors: Sequence[x509.Certificate]) -> LoadedCRL:
    """Read, parse and verify one CRL file (blocking: call at start or on a thread)."""
    try:
        # stat before reading: a change while reading is seen at the next use.
        stat = _file_stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CRLError(f"cannot read it: {e.strerror}") from None
    crl = parse_crl(data)
    return LoadedCRL(path, crl, crl_signer(crl, anchors), stat)


def _thread_runner(reactor: Any) -> RunBlocking:
    def run(f: Callable[..., Any], *args: Any) -> "defer.Deferred[Any]":
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    return run


class CRLFile:
    """One configured CRL file, reloaded when it changes on disk."""

    _log = Logger()

    def __init__(
        self, loaded: LoadedCRL, anchors: Sequence[x509.Certificate], run_blocking: RunBlocking
    ) -> None:
        self.path = loaded.path
        self._current = loaded
        self._anchors = tuple(anchors)
        self._run_blocking = run_blocking
        # The file state last looked at, loaded or not: a broken file is
        # read once per change, not on every request.
        self._seen: tuple[int, int, int] | None = loaded.stat
        self._lock = defer.DeferredLock()

    @property
    def current(self) -> LoadedCRL:
        return self._current

    async def refreshed(self) -> LoadedCRL:
        """The CRL as the file holds it now (or the last good one)."""
        async with self._lock:
            try:
                stat = _file_stat(self.path)
            except OSError as e:
                if self._seen is not None:
                    self._seen = None
                    self._log.error(
                        "CRL {path} cannot be read ({why}); keeping the CRL loaded before",
                        path=self.path, why=e.strerror,
                    )
                return self._current
            if stat != self._seen:
                self._seen = stat
                await self._reload()
        return self._current

    async def _reload(self) -> None:
        try:
            loaded = await self._run_blocking(load_crl, self.path, self._anchors)
        except CRLError as e:
            self._log.error(
                "CRL {path} changed but cannot be used ({why}); keeping the CRL loaded before",
                path=self.path, why=str(e),
            )
            return
        old, new = self._current.number, loaded.number
        if old is not None and new is not None and new < old:
            # An older CRL put back (by mistake or by an attacker) would un-revoke.
            self._log.error(
                "CRL {path} changed to CRL number {new}, older than the loaded {old}; "
                "keeping the CRL loaded before",
                path=self.path, new=new, old=old,
            )
            return
        self._current = loaded
        self._log.info(
            "CRL {path} reloaded: issuer {issuer}, {count} revoked, next update {next_update}",
            path=self.path,
            issuer=loaded.crl.issuer.rfc4514_string(),
            count=len(loaded.crl),
            next_update=loaded.crl.next_update_utc,
        )


# --- OCSP ----------------------------------------------------------------------


class OCSPFailure(Exception):
    """The responder could not be reached or gave no usable answer."""


@attr.s(frozen=True, auto_attribs=True)
class OCSPResult:
    status: ocsp.OCSPCertStatus
    expires: float  # clock seconds after which it is asked again


def _cert_id(
    certificate: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    """(issuerNameHash, issuerKeyHash) of RFC 6960 CertID, as cryptography computes them."""
    request = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, algorithm).build()
    return request.issuer_name_hash, request.issuer_key_hash


def _single_response(
    response: ocsp.OCSPResponse, certificate: x509.Certificate, issuer: x509.Certificate
) -> ocsp.OCSPSingleResponse:
    for single in response.responses:
        if single.serial_number != certificate.serial_number:
            continue
        try:
            expected = _cert_id(certificate, issuer, single.hash_algorithm)
        except (UnsupportedAlgorithm, ValueError):
            continue
        if (single.issuer_name_hash, single.issuer_key_hash) == expected:
            return single
    raise OCSPFailure("the answer is not about this certificate")


def _is_responder(response: ocsp.OCSPResponse, certificate: x509.Certificate) -> bool:
    if response.responder_name is not None:
        return response.responder_name == certificate.subject
    key_hash = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest
    return response.responder_key_hash == key_hash


def _verify_signature(key: Any, signature: bytes, data: bytes, response: ocsp.OCSPResponse) -> None:
    algorithm = response.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        if response.signature_algorithm_oid == SignatureAlgorithmOID.RSASSA_PSS:
            assert algorithm is not None
            pad: Any = padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO)
        else:
            pad = padding.PKCS1v15()
        assert algorithm is not None
        key.verify(signature, data, pad, algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        assert algorithm is not None
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(signature, data)
    elif isinstance(key, dsa.DSAPublicKey):
        assert algorithm is not None
        key.verify(signature, data, algorithm)
    else:
        raise InvalidSignature("unsupported key type")


def _has_ocsp_signing(certificate: x509.Certificate) -> bool:
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def _delegated_responder(
    candidate: x509.Certificate, issuer: x509.Certificate, now: datetime
) -> x509.Certificate:
    """RFC 6960 4.2.2.2: issued by the CA itself, with id-kp-OCSPSigning."""
    try:
        candidate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        raise OCSPFailure("the responder certificate is not issued by the client certificate's CA") from None
    if not _has_ocsp_signing(candidate):
        raise OCSPFailure("the responder certificate lacks the id-kp-OCSPSigning extended key usage")
    if not candidate.not_valid_before_utc - CLOCK_SKEW <= now <= candidate.not_valid_after_utc + CLOCK_SKEW:
        raise OCSPFailure("the responder certificate is not valid now")
    return candidate


def verify_response(
    response: ocsp.OCSPResponse,
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    now: datetime,
) -> ocsp.OCSPSingleResponse:
    """Check an OCSP answer about ``certificate``; return its single response."""
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise OCSPFailure(f"the responder answered {response.response_status.name}")
    single = _single_response(response, certificate, issuer)
    if _is_responder(response, issuer):
        signer = issuer
    else:
        candidates = [c for c in response.certificates if _is_responder(response, c)]
        if not candidates:
            raise OCSPFailure("the answer is signed by neither the CA nor a responder it delegated to")
        signer = _delegated_responder(candidates[0], issuer, now)
    try:
        _verify_signature(signer.public_key(), response.signature, response.tbs_response_bytes, response)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        raise OCSPFailure("the answer's signature does not verify") from None
    if single.this_update_utc > now + CLOCK_SKEW:
        raise OCSPFailure("the answer is dated in the future")
    next_update = single.next_update_utc
    if next_update is not None and next_update + CLOCK_SKEW < now:
        raise OCSPFailure(f"the answer is out of date (nextUpdate {next_update.isoformat()})")
    return single


def ocsp_url_from_aia(certificate: x509.Certificate) -> str | None:
    """The first http(s) OCSP responder named in AuthorityInformationAccess."""
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return None
    for description in aia:
        location = description.access_location
        if description.access_method != AuthorityInformationAccessOID.OCSP:
            continue
        if isinstance(location, x509.UniformResourceIdentifier) and location.value.lower().startswith(
            ("http://", "https://")
        ):
            return location.value
    return None


class OCSPChecker:
    """Asks an OCSP responder about client certificates, with a cache."""

    _log = Logger()

    def __init__(
        self,
        mode: str,
        http: Any,
        clock: IReactorTime,
        timeout: float = 5.0,
        cache_seconds: int = 300,
        failure: str = "hard",
        own_issuers: Sequence[x509.Certificate] = (),
    ) -> None:
        """``mode`` is ``aia`` or a responder URL; ``http`` has treq's ``post``."""
        self._mode = mode
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._cache_seconds = cache_seconds
        self._failure = failure
        self._own = {_spki(c) for c in own_issuers}
        self._cache: collections.OrderedDict[tuple[bytes, int], OCSPResult] = collections.OrderedDict()

    def _now(self) -> datetime:
        return _utc_from_seconds(self._clock.seconds())

    def responder_url(self, certificate: x509.Certificate) -> str | None:
        if self._mode == "aia":
            return ocsp_url_from_aia(certificate)
        return self._mode

    async def check(self, certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> None:
        """Raise Refusal when the responder says revoked (or, when hard, cannot say)."""
        links = _links(certificate, chain)
        if not links:
            return  # the certificate is itself a trust anchor
        cert, issuer = links[0]
        if issuer is None or _spki(issuer) in self._own:
            return  # no CertID without the issuer; our own CA answers from the store
        url = self.responder_url(cert)
        if url is None:
            return  # nothing to ask: the CA publishes no responder for it
        key = (_spki(issuer), cert.serial_number)
        result = self._cached(key)
        if result is None:
            try:
                result = await self._ask(url, cert, issuer)
            except OCSPFailure as e:
                return self._failed(cert, url, str(e))
            self._remember(key, result)
        self._enforce(result, cert, url)

    def _cached(self, key: tuple[bytes, int]) -> OCSPResult | None:
        result = self._cache.get(key)
        if result is None:
            return None
        if result.expires <= self._clock.seconds():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)  # least recently used goes first when full
        return result

    def _remember(self, key: tuple[bytes, int], result: OCSPResult) -> None:
        if result.status == ocsp.OCSPCertStatus.UNKNOWN or result.expires <= self._clock.seconds():
            return
        self._cache[key] = result
        self._cache.move_to_end(key)
        while len(self._cache) > MAX_OCSP_CACHE_ENTRIES:
            self._cache.popitem(last=False)

    def _enforce(self, result: OCSPResult, cert: x509.Certificate, url: str) -> None:
        if result.status == ocsp.OCSPCertStatus.REVOKED:
            raise _revoked("the TLS client certificate has been revoked (OCSP)")
        if result.status == ocsp.OCSPCertStatus.UNKNOWN:
            self._failed(cert, url, "the responder does not know the certificate")

    def _failed(self, cert: x509.Certificate, url: str, why: str) -> None:
        self._log.warn(
            "OCSP check of serial {serial} ({subject}) at {url} failed: {why}; {outcome}",
            serial=format_serial(cert.serial_number),
            subject=printable(cert.subject.rfc4514_string()),
            url=printable(url),
            why=printable(why),
            outcome="refused (tls.ocsp.failure = hard)" if self._failure == "hard"
            else "accepted (tls.ocsp.failure = soft)",
        )
        if self._failure == "hard":
            raise _status_unknown(
                "ocsp-unavailable",
                "the revocation status of the TLS client certificate cannot be checked now (OCSP)",
            )

    async def _ask(self, url: str, cert: x509.Certificate, issuer: x509.Certificate) -> OCSPResult:
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        body = await self._post(url, request.public_bytes(serialization.Encoding.DER))
        try:
            response = ocsp.load_der_ocsp_response(body)
        except ValueError:
            raise OCSPFailure("the answer is not an OCSP response") from None
        now = self._now()
        single = verify_response(response, cert, issuer, now)
        lifetime = float(self._cache_seconds)
        if single.next_update_utc is not None:
            lifetime = min(lifetime, (single.next_update_utc - now).total_seconds())
        return OCSPResult(single.certificate_status, self._clock.seconds() + lifetime)

    async def _post(self, url: str, der: bytes) -> bytes:
        d = self._http.post(
            url,
            data=der,
            headers={b"Content-Type": [OCSP_REQUEST_TYPE], b"Accept": [OCSP_RESPONSE_TYPE]},
        )
        d.addCallback(_read_ocsp_body)
        d.addTimeout(self._timeout, self._clock)
        try:
            return await d
        except OCSPFailure:
            raise
        except defer.TimeoutError:
            raise OCSPFailure(f"no answer within {self._timeout:g} seconds") from None
        except defer.CancelledError:
            raise
        except Exception as e:  # refused, reset, DNS, TLS: all "cannot reach"
            raise OCSPFailure(f"cannot reach the responder: {e.__class__.__name__}: {e}") from None


class _LimitedBody(protocol.Protocol):
    """Collects a response body of at most ``MAX_OCSP_RESPONSE_BYTES``.

    Cancelling ``done`` (the timeout) or going over the limit drops the
    connection, so a responder that trickles bytes holds nothing open.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self.done: defer.Deferred[bytes] = defer.Deferred(lambda _: self._abort())

    def _abort(self) -> None:
        if self.transport is not None:
            # The response body's transport is a producer (IPushProducer).
            cast(Any, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > MAX_OCSP_RESPONSE_BYTES:
            self.done.errback(OCSPFailure(f"the answer is larger than {MAX_OCSP_RESPONSE_BYTES} bytes"))
            self._abort()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _read_ocsp_body(response: Any) -> "defer.Deferred[bytes]":
    body = _LimitedBody()
    # Read the body even on an error status, so the connection is released.
    response.deliverBody(body)

    def status(data: bytes) -> bytes:
        if response.code != 200:
            raise OCSPFailure(f"the responder answered HTTP {response.code}")
        return data

    return body.done.addCallback(status)


# --- the checker enroll calls -----------------------------------------------------


class RevocationChecker:
    """Every configured revocation source for one client certificate."""

    _log = Logger()

    def __init__(
        self,
        crls: Sequence[CRLFile] = (),
        ocsp_checker: OCSPChecker | None = None,
        crl_stale: str = "hard",
        clock: IReactorTime | None = None,
    ) -> None:
        self.crls = tuple(crls)
        self.ocsp = ocsp_checker
        self._crl_stale = crl_stale
        if clock is None:
            from twisted.internet import reactor as clock
        assert clock is not None
        self._clock: IReactorTime = clock
        self._warned_stale: weakref.WeakSet[LoadedCRL] = weakref.WeakSet()

    async def check(self, certificate: x509.Certificate, chain: Sequence[x509.Certificate] = ()) -> None:
        """Raise Refusal if ``certificate`` (or a CA above it) is revoked.

        ``chain`` is the verified chain, leaf first, ending at the anchor.
        """
        if self.crls:
            await self._check_crls(certificate, chain)
        if self.ocsp is not None:
            await self.ocsp.check(certificate, chain)

    async def _check_crls(self, certificate: x509.Certificate, chain: Sequence[x509.Certificate]) -> None:
        loaded = [await crl.refreshed() for crl in self.crls]
        now = _utc_from_seconds(self._clock.seconds())
        for index, (cert, issuer) in enumerate(_links(certificate, chain)):
            for crl in loaded:
                if crl.applies_to(cert, issuer):
                    self._check_one(crl, cert, index, now)

    def _check_one(self, crl: LoadedCRL, cert: x509.Certificate, index: int, now: datetime) -> None:
        # A listing is definite even in a stale CRL: checked first.
        if crl.crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            if index == 0:
                raise _revoked("the TLS client certificate is on its CA's certificate revocation list")
            raise _revoked(
                f"the CA certificate {cert.subject.rfc4514_string()!r} of the TLS client "
                f"certificate is on a certificate revocation list"
            )
        if not crl.is_stale(now):
            return
        next_update = crl.crl.next_update_utc
        assert next_update is not None
        if self._crl_stale == "hard":
            self._log.warn(
                "CRL {path} of {issuer} is stale (next update was {next_update}); refusing "
                "(tls.crl.stale = hard)",
                path=crl.path, issuer=crl.crl.issuer.rfc4514_string(), next_update=next_update,
            )
            raise _status_unknown(
                "crl-stale",
                f"the certificate revocation list of {crl.crl.issuer.rfc4514_string()!r} is out "
                f"of date; the TLS client certificate cannot be checked now",
            )
        if crl not in self._warned_stale:  # once per loaded CRL, not per request
            self._warned_stale.add(crl)
            self._log.warn(
                "CRL {path} of {issuer} is stale (next update was {next_update}); accepting "
                "certificates it does not list (tls.crl.stale = soft)",
                path=crl.path, issuer=crl.crl.issuer.rfc4514_string(), next_update=next_update,
            )


def default_http_client(reactor: Any) -> Any:
    """treq's client without persistent connections: OCSP calls are rare (cached)."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    return HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))


def build_checker(
    config: Config,
    anchors: Sequence[x509.Certificate],
    own_issuers: Sequence[x509.Certificate] = (),
    reactor: Any = None,
    http: Any = None,
    run_blocking: RunBlocking | None = None,
) -> RevocationChecker:
    """The checker ``config`` asks for; a CRL that cannot be used is a ConfigError.

    ``anchors`` are every certificate a CRL may be signed by (the trust
    anchors and the gateway's own CA); ``own_issuers`` the gateway's
    issuing CA, whose certificates OCSP leaves to the store.
    """
    if reactor is None:
        from twisted.internet import reactor
    runner = run_blocking or _thread_runner(reactor)
    crls = []
    now = _utc_from_seconds(reactor.seconds())
    for path in config.crl_files:
        try:
            loaded = load_crl(path, anchors)
        except CRLError as e:
            raise ConfigError("tls.crls", f"{path}: {e}", config.source) from None
        if loaded.is_stale(now):
            RevocationChecker._log.warn(
                "CRL {path} is already stale (next update was {next_update}); tls.crl.stale = {policy}",
                path=path, next_update=loaded.crl.next_update_utc, policy=config.crl_stale,
            )
        crls.append(CRLFile(loaded, anchors, runner))
    checker = None
    if config.ocsp != "off":
        checker = OCSPChecker(
            config.ocsp,
            http if http is not None else default_http_client(reactor),
            reactor,
            timeout=config.ocsp_timeout,
            cache_seconds=config.ocsp_cache_seconds,
            failure=config.ocsp_failure,
            own_issuers=own_issuers,
        )
    return RevocationChecker(crls, checker, config.crl_stale, reactor)
