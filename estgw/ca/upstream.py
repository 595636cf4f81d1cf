"""Another EST server as the CA (``tokenprocedure.<n>.ca = est``): RA mode.

The gateway runs its own checks (filter, format, store), then forwards
the device's PKCS#10 request, exactly as the device signed it, to the
upstream's ``simpleenroll`` (RFC 7030 4.2.1) over TLS with the RA's
client certificate from a PKCS#12 token (RFC 7030 3.3.2: the upstream
trusts the RA's certificate, not the device).  What the upstream issues
is returned to the device and recorded like any certificate.

What the upstream says is passed on:

* 200: the certificate (its public key must be the request's);
* 202 (RFC 7030 4.2.3): 202 with the upstream's Retry-After.  The device
  resends the same request, which is forwarded again unchanged, so the
  upstream recognises it and issues once.  "The same request" is the
  request's DER bytes: identical requests in flight at the same time
  share one upstream call;
* 4xx: the same status and the upstream's reason text (401 is this
  gateway's RA credentials failing, not the device's: 502);
* 5xx, no connection, TLS failure, no answer in time: 503 with
  Retry-After (502 for an answer that is not an end-entity certificate
  of the request's key, valid now, and for an answer larger than
  :data:`MAX_ANSWER`).

cacerts of the labels served by this token procedure is the upstream's
``/cacerts`` (RFC 7030 4.1), fetched when the gateway starts and again
when older than :data:`CACERTS_REFRESH` (on use; a failed fetch is
retried after :data:`CACERTS_RETRY`).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from estgw.ca import CAError, CASettingError, IssueRequest, ITokenProcedure
from estgw.ca._files import read_secret_file
from estgw.ca.signing import CLOCK_SKEW

__all__ = ["UpstreamEST", "token_procedure", "CACERTS_REFRESH", "CACERTS_RETRY", "TIMEOUT", "RETRY_AFTER"]

#: Seconds a fetched cacerts answer is served before it is fetched again.
CACERTS_REFRESH = 3600.0
#: Seconds after a failed cacerts fetch before the next try.
CACERTS_RETRY = 30.0
#: Seconds for one upstream exchange (connect, TLS, answer).
TIMEOUT = 30.0
#: Seconds told to devices in Retry-After when the upstream cannot be
#: reached, or answered 202/503 without a usable Retry-After.
RETRY_AFTER = 60

#: The largest upstream answer body read, in bytes (a certificate chain
#: is a few KiB); a larger one is dropped unread and answered 502.
MAX_ANSWER = 1024 * 1024

_MAX_REASON = 200  # characters of an upstream's reason text passed on


def _spki(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _retry_after(value: bytes | None) -> int:
    # RFC 9110 10.2.3 also allows an HTTP date; EST servers send seconds
    # (delay-seconds = 1*DIGIT: not int()'s "1_0" or "+5").
    text = (value or b"").strip()
    if not text.isdigit():  # bytes: ASCII digits only
        return RETRY_AFTER
    seconds = int(text)
    return seconds if 0 < seconds <= 7 * 86400 else RETRY_AFTER


def _reason(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().splitlines()
    line = " ".join(t.strip() for t in text if t.strip())
    cleaned = "".join(c if c.isprintable() else "?" for c in line)
    return cleaned[:_MAX_REASON] or "no reason given"


def _ordered(certificates: list[x509.Certificate]) -> list[x509.Certificate]:
    """Issuing CA first, root last, as :meth:`ITokenProcedure.chain` promises
    (a PKCS#7 SET OF certificates has no order)."""
    remaining = list(certificates)
    ordered: list[x509.Certificate] = []
    while remaining:
        # The one that issued none of the others comes first.
        leaf = next(
            (c for c in remaining if not any(o is not c and o.issuer == c.subject for o in remaining)),
            remaining[0],
        )
        ordered.append(leaf)
        remaining.remove(leaf)
    return ordered


@implementer(ITokenProcedure)
class UpstreamEST:
    """Forward checked requests to one upstream EST server."""

    _log = Logger()

    def __init__(self, name: str, url: str, http: Any, reactor: Any, timeout: float = TIMEOUT) -> None:
        """``url`` is the upstream's ``https://host[:port]/.well-known/est[/label]``;
        ``http`` a treq client that presents the RA's certificate."""
        self.name = name
        self.url = url.rstrip("/")
        self._http = http
        self._reactor = reactor
        self._timeout = timeout
        self._chain: list[x509.Certificate] = []
        #: Why the last /cacerts fetch failed ("" after a success).
        self.last_error = ""
        self._next_refresh = 0.0
        self._refreshing: Deferred[list[x509.Certificate]] | None = None
        # DER request -> the waiters of its one upstream call in flight.
        self._in_flight: dict[bytes, list[Deferred[x509.Certificate]]] = {}

    def __repr__(self) -> str:
        return f"<UpstreamEST {self.name!r} {self.url}>"

    # -- issuing --------------------------------------------------------

    def issue(self, request: IssueRequest) -> "Deferred[x509.Certificate]":
        """Forward ``request.csr``; fires with the upstream's certificate or
        fails with a :class:`~estgw.refusal.Refusal` (202 is
        :class:`~estgw.refusal.Pending`)."""
        if not request.csr:
            raise CAError("a token procedure with ca = est needs the client's PKCS#10 request")
        key = hashlib.sha256(request.csr).digest()
        waiter: Deferred[x509.Certificate] = Deferred()
        waiters = self._in_flight.get(key)
        if waiters is not None:
            waiters.append(waiter)  # the same request is already on its way
            return waiter
        self._in_flight[key] = [waiter]

        def settle(outcome: Any) -> None:
            for each in self._in_flight.pop(key):
                if isinstance(outcome, Failure):
                    each.errback(outcome)
                else:
                    each.callback(outcome)

        Deferred.fromCoroutine(self._enroll(request)).addBoth(settle)
        return waiter

    async def _enroll(self, request: IssueRequest) -> x509.Certificate:
        from estgw.refusal import Pending, Refusal

        url = f"{self.url}/simpleenroll"
        body = base64.encodebytes(request.csr)  # 76-column lines, as RFC 7030 4.2.1 allows
        try:
            code, headers, answer = await self._exchange(
                "POST", url, body,
                {b"Content-Type": [b"application/pkcs10"], b"Content-Transfer-Encoding": [b"base64"]},
            )
        except _TooLarge:
            self._log.warn("upstream EST {url} answered more than {limit} bytes", url=url, limit=MAX_ANSWER)
            raise Refusal(
                502, "upstream-bad-answer", f"the upstream CA's answer is larger than {MAX_ANSWER} bytes"
            ) from None
        except _Unreachable as e:
            self._log.warn("upstream EST {url} unreachable: {reason}", url=url, reason=e.reason)
            raise Refusal(
                503, "upstream-unavailable",
                f"the upstream CA cannot be reached ({e.reason}); try again later",
                {"Retry-After": str(RETRY_AFTER)},
            ) from None
        if code == 200:
            return self._issued(answer, request)
        if code == 202:
            retry = _retry_after(headers.getRawHeaders(b"retry-after", [b""])[-1])
            raise Pending(
                "upstream-pending",
                f"the upstream CA has not decided yet ({_reason(answer)}); retry in {retry} seconds",
                retry,
            )
        if code == 401:
            raise Refusal(
                502, "upstream-rejected-ra",
                "the upstream CA did not accept this gateway's RA certificate",
            )
        if 400 <= code < 500:
            raise Refusal(code, "upstream-refused", f"the upstream CA refused the request: {_reason(answer)}")
        retry = _retry_after(headers.getRawHeaders(b"retry-after", [b""])[-1])
        raise Refusal(
            503, "upstream-unavailable",
            f"the upstream CA answered {code} ({_reason(answer)}); try again later",
            {"Retry-After": str(retry)},
        )

    def _issued(self, answer: bytes, request: IssueRequest) -> x509.Certificate:
        from estgw.protocol import decode_certs_only
        from estgw.refusal import Refusal

        bad = Refusal(502, "upstream-bad-answer", "the upstream CA's answer holds no certificate for the request's key")
        try:
            certificates = decode_certs_only(answer)
        except Refusal:
            raise bad from None
        wanted = _spki(request.public_key)
        for certificate in certificates:
            if _spki(certificate.public_key()) == wanted:
                problem = _not_end_entity(certificate, self._reactor.seconds())
                if problem:
                    self._log.warn("upstream EST {url} answered an unusable certificate: {problem}",
                                   url=self.url, problem=problem)
                    raise Refusal(502, "upstream-bad-answer", f"the upstream CA's certificate is unusable: {problem}")
                return certificate
        raise bad

    # -- cacerts -----------------------------------------------------------

    def chain(self) -> list[x509.Certificate]:
        """The upstream's CA certificates as last fetched (issuing CA first);
        empty until the first fetch succeeds.  Starts a fetch when stale."""
        if self._reactor.seconds() >= self._next_refresh and self._refreshing is None:
            self.refresh()
        return list(self._chain)

    def refresh(self) -> Deferred[list[x509.Certificate]]:
        """Fetch ``/cacerts`` now (once at a time); fires with the chain,
        or with the previous one (possibly empty) when the fetch failed."""
        if self._refreshing is None:
            self._refreshing = Deferred.fromCoroutine(self._fetch_cacerts())

            def done(result: Any) -> Any:
                self._refreshing = None
                return result

            self._refreshing.addBoth(done)
        return self._refreshing

    async def _fetch_cacerts(self) -> list[x509.Certificate]:
        from estgw.protocol import decode_certs_only
        from estgw.refusal import Refusal

        url = f"{self.url}/cacerts"
        try:
            try:
                code, _headers, answer = await self._exchange("GET", url)
            except _TooLarge:
                raise _Unreachable(f"the answer is larger than {MAX_ANSWER} bytes") from None
            if code != 200:
                raise _Unreachable(f"answered {code}: {_reason(answer)}")
            try:
                chain = decode_certs_only(answer)
            except Refusal:
                raise _Unreachable("the answer is not a PKCS#7 certs-only structure") from None
            if not chain:
                raise _Unreachable("the answer holds no certificate")
        except _Unreachable as e:
            self.last_error = e.reason
            self._next_refresh = self._reactor.seconds() + CACERTS_RETRY
            self._log.warn("cannot fetch the CA certificates of {url}: {reason}", url=url, reason=e.reason)
            return list(self._chain)
        self._chain = _ordered(chain)
        self.last_error = ""
        self._next_refresh = self._reactor.seconds() + CACERTS_REFRESH
        return list(self._chain)

    # -- HTTP -----------------------------------------------------------------

    async def _exchange(
        self, method: str, url: str, body: bytes | None = None, headers: dict[bytes, list[bytes]] | None = None
    ) -> tuple[int, Any, bytes]:
        """(status, response headers, body) of one exchange; _Unreachable
        when there is no answer (connection, TLS, timeout), _TooLarge when
        the body is larger than :data:`MAX_ANSWER`."""
        from estgw.approval.client import describe_failure

        try:
            response = await self._http.request(
                method, url, data=body, headers=headers, timeout=self._timeout
            )
            answer = await _capped_body(response)
        except _TooLarge:
            raise
        except defer.CancelledError:
            raise _Unreachable(f"no answer within {self._timeout:g} s") from None
        except Exception as e:  # every transport failure means the same here
            raise _Unreachable(describe_failure(e)) from None
        return response.code, response.headers, answer


def _not_end_entity(certificate: x509.Certificate, now: float) -> str:
    """Why ``certificate`` is not an end-entity certificate valid at ``now``
    (Unix seconds), or "" (RFC 5280 4.2.1.9, 4.2.1.3, 4.1.2.5)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            return "it is a CA certificate (basicConstraints cA TRUE)"
    except x509.ExtensionNotFound:
        pass
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        if usage.key_cert_sign or usage.crl_sign:
            return "its key usage allows signing certificates or CRLs"
    except x509.ExtensionNotFound:
        pass
    if not certificate.not_valid_before_utc.timestamp() - CLOCK_SKEW.total_seconds() <= now:
        return f"it is not valid before {certificate.not_valid_before_utc.isoformat()}"
    if now >= certificate.not_valid_after_utc.timestamp():
        return f"it expired on {certificate.not_valid_after_utc.isoformat()}"
    return ""


class _TooLarge(Exception):
    pass


async def _capped_body(response: Any) -> bytes:
    """The body of ``response``, at most :data:`MAX_ANSWER` bytes; a larger
    one (by Content-Length, or as it arrives) drops the connection and
    raises :class:`_TooLarge`."""
    import treq

    from twisted.web.iweb import UNKNOWN_LENGTH

    if response.length is not UNKNOWN_LENGTH and response.length > MAX_ANSWER:
        response.deliverBody(_Discard())
        raise _TooLarge()
    parts: list[bytes] = []
    size = [0]

    def collect(data: bytes) -> None:
        size[0] += len(data)
        if size[0] > MAX_ANSWER:
            raise _TooLarge()
        parts.append(data)

    try:
        await treq.collect(response, collect)
    except _TooLarge:
        raise
    return b"".join(parts)


class _Discard(Protocol):
    def makeConnection(self, transport: Any) -> None:
        super().makeConnection(transport)
        transport.stopProducing()


class _Unreachable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def token_procedure(procedure: Any, context: Any) -> UpstreamEST:
    """``tokenprocedure.<n>.ca = est`` (see :mod:`estgw.ca.factory`): opens
    the RA's PKCS#12 token now, so a wrong password stops start-up;
    CASettingError names the setting."""
    from estgw.approval.tls import ClientCertificatePolicy, CredentialsError, https_client, load_certificates, load_pkcs12

    password = ""
    if procedure.est_token_password_file:
        password = read_secret_file(
            procedure.est_token_password_file, "est.tokenPasswordFile", "the PKCS#12 token's password"
        )
    try:
        credentials = load_pkcs12(procedure.est_token, password)
    except CredentialsError as e:
        raise CASettingError("est.tokenPasswordFile" if e.password else "est.token", str(e)) from None
    anchors: list[x509.Certificate] = []
    for path in procedure.est_trust_anchors:
        try:
            anchors.extend(load_certificates(path))
        except CredentialsError as e:
            raise CASettingError("est.trustAnchors", str(e)) from None
    reactor = context.reactor
    if reactor is None:
        from twisted.internet import reactor as _reactor

        reactor = _reactor
    http = https_client(reactor, ClientCertificatePolicy(credentials, anchors), TIMEOUT)
    upstream = UpstreamEST(procedure.name, procedure.est_url, http, reactor)
    # The first cacerts fetch, once the reactor runs.
    reactor.callWhenRunning(upstream.chain)
    return upstream
