"""What relying parties need to check revocation: CRLs and OCSP responses.

For the CAs whose keys the gateway holds (``local`` and ``file`` token
procedures), signed from the store's revocations, on a plain-HTTP
listener of its own (``publish.port``, ``publish.interface``):

* ``GET /crl/<token procedure name, URL-encoded>.crl``: the DER CRL
  (RFC 5280 5, ``application/pkix-crl`` as RFC 2585 names it), with reason
  codes and invalidity dates; re-signed when the store's revocations of
  that CA changed and when half of its validity is gone.
* ``GET /ca/<same>.crt``: the issuing CA certificate (DER,
  ``application/pkix-cert``), what an AIA caIssuers URL points to
  (RFC 5280 4.2.2.1).
* ``POST /ocsp/<same>`` (body ``application/ocsp-request``) and
  ``GET /ocsp/<same>/<base64 of the DER request, URL-encoded>``: an OCSP
  response (RFC 6960 2.1, appendix A.1) saying good, revoked (with the
  reason) or unknown, signed by the CA or by a delegated responder
  certificate it issued (4.2.2.2), echoing the request's nonce (RFC 8954).

Signing runs on the reactor's thread pool: an RSA signature takes
milliseconds the reactor should not wait.
"""

from __future__ import annotations

import base64
import binascii
import os
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote

import attr
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import univ
from pyasn1_modules import rfc2560
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import defer, task
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import resource, server

from estgw.ca import CAError, IssueRequest, ISigningCA, PrivateKey, Profile
from estgw.ca._der import resigned_with_responses, single_response
from estgw.ca._files import _load_cert, _load_key, _locked, _spki, _write_cert, _write_key
from estgw.ca.keys import key_type_of, new_key, sign_arguments
from estgw.ca.signing import RevokedEntry
from estgw.ca.threads import threads_of
from estgw.guard import answer_within
from estgw.plaintext import Branch, Leaf, NotFound, respond, text
from estgw.store import IssuedCertificate, IStore, iterate_certificates

CRL_MEDIA_TYPE = b"application/pkix-crl"
OCSP_REQUEST_TYPE = "application/ocsp-request"
OCSP_RESPONSE_TYPE = b"application/ocsp-response"
#: How long an OCSP answer may be relied on (its nextUpdate): short, as it
#: is made from the live store.
OCSP_VALIDITY = timedelta(hours=1)
RESPONDER_VALIDITY = timedelta(days=30)
#: A delegated responder certificate closer than this to its end is renewed.
RESPONDER_RENEW_BEFORE = timedelta(days=7)
RESPONDER_CERT = "ocsp-responder.pem"
RESPONDER_KEY = "ocsp-responder.key"
#: The largest OCSP request accepted, in bytes (one request is ~100).
MAX_OCSP_REQUEST = 16384


async def revoked_records(store: IStore) -> list[IssuedCertificate]:
    """The store's revoked certificates, and only those: read a page at a
    time through the index of revoked rows, so the cost follows the
    revocations, not the number of certificates issued."""
    return [issued async for issued in iterate_certificates(store, revoked_only=True)]


async def revoked_entries(store: IStore, ca: ISigningCA) -> list[RevokedEntry]:
    """The store's revoked certificates that ``ca`` issued, as CRL entries."""
    return entries_of(await revoked_records(store), ca)


def entries_of(records: Any, ca: ISigningCA) -> list[RevokedEntry]:
    """The revoked ones of the store ``records`` that ``ca`` signed (a
    signature check each: run it off the reactor when there are many)."""
    entries = []
    for issued in records:
        if issued.revoked_at is None or not ca.issued(issued.certificate):
            continue
        entries.append(
            RevokedEntry(issued.serial, issued.revoked_at, issued.revocation_reason, issued.invalidity_date)
        )
    return sorted(entries, key=lambda e: e.serial)


def delegated_responder(ca: ISigningCA, now: datetime | None = None) -> tuple[PrivateKey, x509.Certificate]:
    """The delegated OCSP responder of ``ca`` (RFC 6960 4.2.2.2), kept in its directory.

    Its certificate is issued by ``ca`` with extended key usage OCSPSigning
    and id-pkix-ocsp-nocheck (4.2.2.2.1: relying parties need not check its
    revocation), so it is short-lived and renewed a week before its end.
    The key is of the CA key's type, unencrypted (mode 0600): it is used
    for every response. Synchronous: call it off the reactor.
    """
    now = now or datetime.now(timezone.utc)
    home = ca.home()
    key_path = os.path.join(home, RESPONDER_KEY)
    cert_path = os.path.join(home, RESPONDER_CERT)
    with _locked(home):
        key: PrivateKey
        if os.path.exists(key_path):
            key = _load_key(key_path)
        else:
            key = new_key(key_type_of(ca.issuing.public_key()) or "ec-p256")
            _write_key(key_path, key)
        if os.path.exists(cert_path):
            cert = _load_cert(cert_path)
            if (
                _spki(cert.public_key()) == _spki(key.public_key())
                and cert.not_valid_after_utc - now > RESPONDER_RENEW_BEFORE
                and ca.issued(cert)
            ):
                return key, cert
        names = ca.issuing.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        common_name = (f"{names[0].value} " if names else "") + "OCSP Responder"
        subject = x509.Name(
            [a for a in ca.issuing.subject if a.oid != NameOID.COMMON_NAME]
            + [x509.NameAttribute(NameOID.COMMON_NAME, common_name[-64:])]
        )
        profile = Profile(
            validity=RESPONDER_VALIDITY,
            key_usage=frozenset({"digital_signature"}),
            extended_key_usage=(ExtendedKeyUsageOID.OCSP_SIGNING,),
        )
        cert = ca.sign(IssueRequest(subject, key.public_key()), profile, now, extra=[x509.OCSPNoCheck()])
        _write_cert(cert_path, cert)
        return key, cert


@attr.s(auto_attribs=True, eq=False)
class PublishedCA:
    """One CA's CRL (cached until its revocations change or half its
    validity is gone) and OCSP responses."""

    _log = Logger()

    ca: ISigningCA
    store: Any
    reactor: Any
    crl_validity: timedelta = timedelta(hours=24)
    responder: str = "ca"  # or "delegated"
    threads: Any = None  # estgw.ca.threads.CAThreads of a token procedure signing with ``ca``
    # ca.timeout: how long an answer waits for a signature; and how many
    # signatures may run on threads at once, counted until they return.
    timeout: float = 30.0
    max_signing: int = 2
    _signing_now: int = attr.ib(default=0, init=False)
    _crl: x509.CertificateRevocationList | None = attr.ib(default=None, init=False)
    _crl_entries: list[RevokedEntry] = attr.ib(factory=list, init=False)
    _lock: defer.DeferredLock = attr.ib(factory=defer.DeferredLock, init=False)
    _responder_credentials: tuple[PrivateKey, x509.Certificate] | None = attr.ib(default=None, init=False)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.reactor.seconds(), timezone.utc)

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    def _signing(self, f: Callable[..., Any], *args: Any, quick: bool = False) -> defer.Deferred[Any]:
        """``f(*args)`` with the CA's key, bounded like an enrollment's
        signature (estgw.guard.CAGuard): anyone may ask the publishing
        listener, so a CA that hangs must not collect work without end.

        ``quick`` work (an OCSP response) of a CA that signs quickly in
        software is done at once, as SigningTokenProcedure.issue does.
        Otherwise it runs on the token procedure's threads (a hung HSM
        holds none of the reactor's, estgw.ca.threads); at most
        :attr:`max_signing` at a time, each counted until its thread
        returns, and the answer waits at most :attr:`timeout` seconds.
        Beyond either: CAError, which the listener answers with OCSP
        tryLater, or 503 for a CRL with none still valid.
        """
        if quick and getattr(self.ca, "signs_quickly", False):
            return defer.maybeDeferred(f, *args)
        if self._signing_now >= self.max_signing:
            return defer.fail(CAError(
                f"{self._signing_now} signatures with this CA's key are still running; try again later"
            ))
        self._signing_now += 1
        running = self.threads.run(f, *args) if self.threads is not None else self._in_thread(f, *args)

        def returned(outcome: Any) -> Any:
            self._signing_now -= 1  # counted until its thread returns, late or not
            return outcome

        def too_late(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            raise CAError(f"the CA did not sign within {self.timeout:g} s (ca.timeout)")

        answer = answer_within(self.reactor, self.timeout, running.addBoth(returned))
        return answer.addErrback(too_late)

    async def crl(self) -> x509.CertificateRevocationList:
        """The current CRL, signed anew when the revocations changed or
        half of the previous one's validity is gone."""
        await self._lock.acquire()
        try:
            records = await revoked_records(self.store)
            entries = await self._in_thread(entries_of, records, self.ca)
            now = self._now()
            crl = self._crl
            if (
                crl is not None
                and entries == self._crl_entries
                and crl.next_update_utc is not None
                and now < crl.last_update_utc + (crl.next_update_utc - crl.last_update_utc) / 2
            ):
                return crl
            try:
                crl = await self._signing(self.ca.write_crl, entries, self.crl_validity, now)
            except Exception as e:
                _log_signing_failure("the CRL", self, e)
                if crl is not None and crl.next_update_utc is not None and now < crl.next_update_utc:
                    return crl  # the last one signed is still valid: relying parties use it meanwhile
                raise CRLUnavailable(str(e)) from None
            self._crl, self._crl_entries = crl, entries
        finally:
            self._lock.release()
        self._log.info("Signed the CRL of {issuer}: {count} revoked, next update {next}",
                       issuer=self.ca.issuing.subject.rfc4514_string(), count=len(entries),
                       next=crl.next_update_utc)
        return crl

    async def answer(self, asked: "Sequence[CertID]", nonce: x509.OCSPNonce | None) -> ocsp.OCSPResponse:
        """The OCSP response (RFC 6960 4.2) about every certificate ``asked``
        (all about this CA): one SingleResponse each, in the request's order.
        CAError (or whatever the signer raises): it cannot be signed now."""
        now = self._now()
        singles = []
        for one in asked:
            issued = await self.store.get_certificate(one.serial)
            status, revoked_at, reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
            if issued is not None and self.ca.issued(issued.certificate):
                if issued.revoked_at is None:
                    status = ocsp.OCSPCertStatus.GOOD
                else:
                    status, revoked_at = ocsp.OCSPCertStatus.REVOKED, issued.revoked_at
                    reason = RevokedEntry(one.serial, issued.revoked_at, issued.revocation_reason).reason_flag
            singles.append(ocsp.OCSPResponseBuilder().add_response_by_hash(
                issuer_name_hash=one.issuer_name_hash,
                issuer_key_hash=one.issuer_key_hash,
                serial_number=one.serial,
                algorithm=one.hash_algorithm,
                cert_status=status,
                this_update=now,
                next_update=now + OCSP_VALIDITY,
                revocation_time=revoked_at,
                revocation_reason=reason,
            ))
        builder = singles[0]
        if nonce is not None:
            builder = builder.add_extension(nonce, critical=False)
        return await self._signing(self._sign, builder, singles[1:], quick=True)

    def _sign(self, builder: ocsp.OCSPResponseBuilder, others: list[ocsp.OCSPResponseBuilder]) -> ocsp.OCSPResponse:
        more = [_single_response_der(other) for other in others]
        if self.responder == "delegated":
            now = datetime.now(timezone.utc)
            if self._responder_credentials is None or self._responder_credentials[1].not_valid_after_utc - now <= RESPONDER_RENEW_BEFORE:
                self._responder_credentials = delegated_responder(self.ca, now)
            key, cert = self._responder_credentials
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, cert).certificates([cert])
            draft = builder.sign(key, sign_arguments(key)["algorithm"])
            return resigned_with_responses(draft, more, key) if more else draft
        return self.ca.sign_ocsp(builder, more)

    def about_this_ca(self, request: "CertID") -> bool:
        """Whether the CertID's issuer name and key hashes (RFC 6960 4.1.1) are this CA's."""
        algorithm = request.hash_algorithm
        name_hash = hashes.Hash(algorithm)
        name_hash.update(self.ca.issuing.subject.public_bytes())
        key_hash = hashes.Hash(algorithm)
        # 4.1.1: the hash of the issuer's public key BIT STRING value.
        key_hash.update(_public_key_bits(self.ca.issuing))
        return (
            name_hash.finalize() == request.issuer_name_hash
            and key_hash.finalize() == request.issuer_key_hash
        )


_DRAFT_KEY: list[PrivateKey] = []


def _single_response_der(builder: ocsp.OCSPResponseBuilder) -> bytes:
    """The DER SingleResponse ``builder`` holds (signed with a throw-away
    key only to get at it: the signature is dropped)."""
    if not _DRAFT_KEY:
        _DRAFT_KEY.append(new_key("ec-p256"))
    key = _DRAFT_KEY[0]
    draft = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, _draft_certificate(key)).sign(key, hashes.SHA256())
    return single_response(draft)


_DRAFT_CERT: list[x509.Certificate] = []


def _draft_certificate(key: PrivateKey) -> x509.Certificate:
    if not _DRAFT_CERT:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "draft")])
        now = datetime.now(timezone.utc)
        _DRAFT_CERT.append(
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
    return _DRAFT_CERT[0]


#: The CertID hash algorithms (RFC 6960 4.1.1) cryptography answers with.
_CERT_ID_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "1.3.14.3.2.26": hashes.SHA1,
    "2.16.840.1.101.3.4.2.4": hashes.SHA224,
    "2.16.840.1.101.3.4.2.1": hashes.SHA256,
    "2.16.840.1.101.3.4.2.2": hashes.SHA384,
    "2.16.840.1.101.3.4.2.3": hashes.SHA512,
}


@attr.s(frozen=True, auto_attribs=True)
class CertID:
    """What an OCSP request asks about one certificate (RFC 6960 4.1.1)."""

    hash_algorithm: hashes.HashAlgorithm
    issuer_name_hash: bytes
    issuer_key_hash: bytes
    serial: int


def parse_request(body: bytes) -> tuple[list[CertID], x509.OCSPNonce | None]:
    """The CertIDs (in order) and nonce (RFC 8954) of the DER OCSP request
    ``body`` (RFC 6960 4.1.1).  ValueError: it does not parse, asks about
    nothing, or names a hash algorithm not answered with."""
    try:
        outer, rest = der_decoder.decode(body, asn1Spec=rfc2560.OCSPRequest())
    except PyAsn1Error as e:
        raise ValueError(f"not an OCSP request: {e}") from None
    if rest:
        raise ValueError("bytes after the OCSP request")
    asked = []
    for one in outer["tbsRequest"]["requestList"]:
        cert_id = one["reqCert"]
        algorithm = _CERT_ID_HASHES.get(str(cert_id["hashAlgorithm"]["algorithm"]))
        if algorithm is None:
            raise ValueError(f"CertID hash algorithm {cert_id['hashAlgorithm']['algorithm']} is not supported")
        asked.append(CertID(algorithm(), bytes(cert_id["issuerNameHash"]), bytes(cert_id["issuerKeyHash"]),
                            int(cert_id["serialNumber"])))
    if not asked:
        raise ValueError("the OCSP request asks about no certificate")
    nonce = None
    extensions = outer["tbsRequest"]["requestExtensions"]
    if extensions.isValue:
        for extension in extensions:
            if str(extension["extnID"]) == x509.OCSPNonce.oid.dotted_string:
                try:
                    value, _ = der_decoder.decode(bytes(extension["extnValue"]), asn1Spec=univ.OctetString())
                    nonce = x509.OCSPNonce(bytes(value))
                except (PyAsn1Error, ValueError, TypeError) as e:
                    raise ValueError(f"unreadable nonce: {e}") from None
    return asked, nonce


def _public_key_bits(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, ed448, rsa

    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, rsa.RSAPublicKey):
        return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.PKCS1)
    raise ValueError(f"unsupported key type {type(key).__name__}")  # pragma: no cover


# --- HTTP --------------------------------------------------------------------


class CRLUnavailable(Exception):
    """No valid CRL can be given now: the CA cannot sign and none is cached."""


#: Seconds a client is asked to wait (Retry-After) when the CA cannot sign.
RETRY_AFTER = 60
_NOT_FOUND = "no such resource: CRLs are served under /crl/, OCSP under /ocsp/, CA certificates under /ca/"


class _Async(Leaf):
    """Runs an async handler; a failure is answered 503 with Retry-After
    (the CA cannot sign now), logged once: never a 500."""

    _log = Logger()

    def _run(self, request: server.Request, work: Any) -> Any:
        def done(result: tuple[bytes, bytes]) -> None:
            content_type, body = result
            respond(request, 200, body, content_type.decode("ascii"))

        def failed(failure: Any) -> None:
            if not failure.check(CRLUnavailable):  # already logged where it was raised
                self._log.failure("publishing failed", failure, LogLevel.error)
            text(request, 503, "the CA cannot sign now; try again later", {"Retry-After": str(RETRY_AFTER)})

        defer.Deferred.fromCoroutine(work).addCallbacks(done, failed)
        return server.NOT_DONE_YET


@attr.s(auto_attribs=True, eq=False)
class PublishedProcedure:
    """What one token procedure publishes: its current CA first, then the
    earlier generations (rollover) whose certificates are still valid."""

    generations: list[PublishedCA]

    def find(self, key_id: str | None) -> PublishedCA | None:
        """The current CA (``key_id`` None), or the generation with that key id."""
        if key_id is None:
            return self.generations[0]
        return next((g for g in self.generations if g.ca.key_id == key_id.lower()), None)

    async def ocsp(self, body: bytes) -> ocsp.OCSPResponse:
        """The OCSP response to the DER request ``body``, answering every
        certificate it asks about (RFC 6960 4.2.1).  malformedRequest when
        it does not parse or asks about none; unauthorized when it is about
        a CA not published here, or about several CAs (2.3); tryLater
        (unsigned, 2.3) when the CA cannot sign now."""
        try:
            asked, nonce = parse_request(body)
        except ValueError:
            return ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        generation = next((g for g in self.generations if g.about_this_ca(asked[0])), None)
        if generation is None or not all(generation.about_this_ca(one) for one in asked[1:]):
            return ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
        try:
            return await generation.answer(asked, nonce)
        except Exception as e:
            _log_signing_failure("an OCSP response", generation, e)
            return ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)


def _log_signing_failure(what: str, generation: PublishedCA, error: Exception) -> None:
    """Once per failure: a line for CAError (the CA cannot sign now), the
    traceback (at error level) for anything else."""
    issuer = generation.ca.issuing.subject.rfc4514_string()
    if isinstance(error, CAError):
        _publish_log.error("could not sign {what} of {issuer}: {error}", what=what, issuer=issuer, error=str(error))
    else:
        _publish_log.failure("could not sign {what} of {issuer}", Failure(error), LogLevel.error,
                             what=what, issuer=issuer)


_publish_log = Logger()


class CRLResource(_Async):
    takes = "a CRL is fetched with GET or HEAD"

    def __init__(self, published: PublishedCA) -> None:
        super().__init__()
        self.published = published

    def render_GET(self, request: server.Request) -> Any:
        async def work() -> tuple[bytes, bytes]:
            crl = await self.published.crl()
            return CRL_MEDIA_TYPE, crl.public_bytes(serialization.Encoding.DER)

        return self._run(request, work())


class IssuerResource(Leaf):
    takes = "a CA certificate is fetched with GET or HEAD"

    def __init__(self, published: PublishedCA) -> None:
        super().__init__()
        self.published = published

    def render_GET(self, request: server.Request) -> Any:
        body = self.published.ca.issuing.public_bytes(serialization.Encoding.DER)
        respond(request, 200, body, "application/pkix-cert")
        return server.NOT_DONE_YET


class _OCSP(_Async):
    def __init__(self, published: PublishedProcedure) -> None:
        super().__init__()
        self.published = published

    def _answer(self, request: server.Request, body: bytes) -> Any:
        async def work() -> tuple[bytes, bytes]:
            response = await self.published.ocsp(body)
            return OCSP_RESPONSE_TYPE, response.public_bytes(serialization.Encoding.DER)

        return self._run(request, work())


_OCSP_USAGE = "an OCSP request is POSTed to /ocsp/<name>, or sent with GET as /ocsp/<name>/<base64 of it>"


class OCSPResource(_OCSP):
    """``/ocsp/<name>``: POST of a DER OCSP request (RFC 6960 A.1); a GET
    here lacks its request (400)."""

    takes = _OCSP_USAGE

    def render_GET(self, request: server.Request) -> Any:
        text(request, 400, _OCSP_USAGE)
        return server.NOT_DONE_YET

    def render_POST(self, request: server.Request) -> Any:
        content_type = (request.getHeader(b"content-type") or b"").decode("latin-1").split(";")[0].strip()
        if content_type.lower() != OCSP_REQUEST_TYPE:
            text(request, 415, f"an OCSP request is {OCSP_REQUEST_TYPE}")
            return server.NOT_DONE_YET
        if getattr(request, "body_too_large", False):
            return server.NOT_DONE_YET  # 413 was answered and the connection closed
        assert request.content is not None
        body = request.content.read(MAX_OCSP_REQUEST + 1)
        if len(body) > MAX_OCSP_REQUEST:
            text(request, 413, f"an OCSP request has at most {MAX_OCSP_REQUEST} bytes")
            return server.NOT_DONE_YET
        return self._answer(request, body)


class OCSPPathResource(_OCSP):
    """``/ocsp/<name>/<base64 of the DER request, URL-encoded>``: GET
    (RFC 6960 A.1); base64 that does not decode is answered
    malformedRequest, as RFC 6960 asks."""

    takes = _OCSP_USAGE

    def __init__(self, published: PublishedProcedure, encoded: str) -> None:
        super().__init__(published)
        self.encoded = encoded

    def render_GET(self, request: server.Request) -> Any:
        try:
            body = base64.b64decode(unquote(self.encoded), validate=True)
        except (binascii.Error, ValueError):
            body = b""
        return self._answer(request, body)


class _Directory(Branch):
    """``/crl/<name>.crl``, ``/ca/<name>.crt`` (the current CA),
    ``/crl/<name>/<key id>.crl``, ``/ca/<name>/<key id>.crt`` (any
    generation) or ``/ocsp/<name>[/<request>]``."""

    def __init__(self, kind: str, published: Mapping[str, PublishedProcedure]) -> None:
        super().__init__(_NOT_FOUND)
        self.kind = kind
        self.published = published

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        assert request.postpath is not None  # set while resources are looked up
        segment = unquote(path.decode("utf-8", "replace"))
        rest = [unquote(p.decode("utf-8", "replace")) for p in request.postpath]
        if self.kind == "ocsp":
            if segment in self.published:
                # RFC 6960 A.1 GET: the base64 may hold '/', so take the rest of the path.
                encoded = "/".join(p.decode("latin-1") for p in request.postpath)
                del request.postpath[:]
                if encoded:
                    return OCSPPathResource(self.published[segment], encoded)
                return OCSPResource(self.published[segment])
            return NotFound(f"no OCSP responder for {segment!r} here")
        suffix = ".crl" if self.kind == "crl" else ".crt"
        name, key_id = segment, None
        if len(rest) == 1 and rest[0].endswith(suffix):
            key_id = rest[0][: -len(suffix)]
        elif not rest and segment.endswith(suffix):
            name = segment[: -len(suffix)]
        else:
            name = ""
        procedure = self.published.get(name)
        generation = procedure.find(key_id) if procedure is not None else None
        if generation is None:
            return NotFound(f"no {self.kind} at {'/'.join([segment, *rest])!r} here")
        del request.postpath[:]
        return CRLResource(generation) if self.kind == "crl" else IssuerResource(generation)


def publish_site(
    published: Mapping[str, PublishedProcedure], config: Any = None, metrics: Any = None
) -> server.Site:
    """The publishing listener's site for ``published`` (token procedure name → what it publishes),
    with the request limits of ``config`` (the defaults when None), counted in ``metrics``."""
    from estgw.web import limited_site

    root = Branch(_NOT_FOUND)
    root.putChild(b"crl", _Directory("crl", published))
    root.putChild(b"ocsp", _Directory("ocsp", published))
    root.putChild(b"ca", _Directory("ca", published))
    # The EST listener's limits; no body here is larger than an OCSP request.
    return limited_site(root, MAX_OCSP_REQUEST, config, metrics)


def published_cas(
    procedures: Mapping[str, Any],
    configs: Mapping[str, Any],
    store: Any,
    reactor: Any,
    crl_validity: timedelta,
    timeout: float = 30.0,
    max_signing: int = 2,
) -> dict[str, PublishedProcedure]:
    """What each token procedure that signs with keys held here publishes;
    procedures sharing a CA (and responder setting) share its CRL.
    ``timeout`` and ``max_signing``: see :meth:`PublishedCA._signing`."""
    shared: dict[tuple[int, str], PublishedCA] = {}
    result = {}
    for name, procedure in procedures.items():
        issuers = getattr(procedure, "issuers", None)
        if issuers is None:
            continue
        responder = configs[name].ocsp_responder
        generations = []
        for ca in issuers():
            key = (id(ca), responder)
            if key not in shared:
                shared[key] = PublishedCA(
                    ca, store, reactor, crl_validity, responder, threads_of(procedure), timeout, max_signing
                )
            generations.append(shared[key])
        result[name] = PublishedProcedure(generations)
    return result


def keep_fresh(published: Mapping[str, PublishedProcedure], reactor: Any) -> task.LoopingCall:
    """A LoopingCall (start it with the interval in seconds) that looks at
    the store and re-signs each CRL whose revocations changed or whose
    validity is half gone, so the CRL file in the CA's directory is current
    too, not only what is fetched."""
    log = Logger()

    async def refresh() -> None:
        every = {id(g): g for p in published.values() for g in p.generations}
        for one in every.values():
            try:
                await one.crl()
            except CRLUnavailable:
                pass  # logged where it was raised; retried on the next round
            except Exception:
                log.failure("could not re-sign the CRL of {issuer}", level=LogLevel.error,
                            issuer=one.ca.issuing.subject.rfc4514_string())

    loop = task.LoopingCall(lambda: defer.Deferred.fromCoroutine(refresh()))
    loop.clock = reactor
    return loop
