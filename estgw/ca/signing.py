"""What every CA whose key the gateway holds does: sign certificates and CRLs.

:class:`SigningCA` is shared by the embedded CA (:mod:`estgw.ca.local`)
and an operator's CA from files (:mod:`estgw.ca.file`); a class using it
provides ``issuing`` (the issuing CA certificate), ``_issuing_key``,
``directory`` (where its CRL is kept) and ``rsa_padding``.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from typing import Any, Iterable, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from estgw.ca import (
    CAError, IssueRequest, ISigningCA, ITokenProcedure, PrivateKey, Profile, key_usage_extension, usages_for_key,
)
from estgw.ca._der import resigned_with_responses
from estgw.ca._files import _CERT_MODE, _locked, _read, _utc, _write_atomically
from estgw.ca.keys import sign_arguments
from estgw.ca.threads import CAThreads

#: Devices' clocks drift; a certificate that is "not yet valid" for a
#: device a minute behind would fail its first TLS handshake.
CLOCK_SKEW = timedelta(minutes=5)
CRL_FILE = "crl.pem"


def _optional_utc(when: datetime | None) -> datetime | None:
    return None if when is None else _utc(when)


@attr.s(frozen=True, auto_attribs=True)
class RevokedEntry:
    """One revoked certificate as a CRL or an OCSP response states it."""

    serial: int
    revoked_at: datetime = attr.ib(converter=_utc)
    #: An RFC 5280 CRLReason name as ``x509.ReasonFlags`` spells it
    #: (``keyCompromise``); None or ``unspecified``: no reason code, as
    #: RFC 5280 5.3.1 asks for unspecified.
    reason: str | None = None
    #: RFC 5280 5.3.2: when the key is known or suspected to have been
    #: compromised, if earlier than ``revoked_at``.
    invalidity_date: datetime | None = attr.ib(default=None, converter=_optional_utc)

    @property
    def reason_flag(self) -> x509.ReasonFlags | None:
        if self.reason is None or self.reason == "unspecified":
            return None
        return x509.ReasonFlags(self.reason)


def _entries(revoked: Iterable[Any]) -> list[RevokedEntry]:
    # One entry per serial (the earliest revocation wins): duplicates would
    # make a malformed CRL.
    found: dict[int, RevokedEntry] = {}
    for item in revoked:
        entry = item if isinstance(item, RevokedEntry) else RevokedEntry(*item)
        if entry.serial not in found or entry.revoked_at < found[entry.serial].revoked_at:
            found[entry.serial] = entry
    return [found[serial] for serial in sorted(found)]


def profile_extensions(profile: Profile, key_id: str = "") -> list[x509.ExtensionType]:
    """The CRL distribution point (RFC 5280 4.2.1.13) and authority
    information access (4.2.2.1: OCSP, caIssuers) that ``profile`` names,
    ``{ca}`` in a URL replaced by ``key_id`` (the issuing CA's)."""

    def uri(url: str) -> x509.UniformResourceIdentifier:
        return x509.UniformResourceIdentifier(url.replace("{ca}", key_id))

    extensions: list[x509.ExtensionType] = []
    if profile.crl_url:
        extensions.append(x509.CRLDistributionPoints([x509.DistributionPoint([uri(profile.crl_url)], None, None, None)]))
    access = []
    if profile.ocsp_url:
        access.append(x509.AccessDescription(AuthorityInformationAccessOID.OCSP, uri(profile.ocsp_url)))
    if profile.ca_issuers_url:
        access.append(x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS, uri(profile.ca_issuers_url)))
    if access:
        extensions.append(x509.AuthorityInformationAccess(access))
    return extensions


@implementer(ISigningCA)
class SigningCA:
    """Signing with an issuing CA key held in this process."""

    directory: str
    issuing: x509.Certificate
    _issuing_key: PrivateKey
    rsa_padding: str

    def chain(self) -> list[x509.Certificate]:
        raise NotImplementedError

    def issuers(self) -> list["SigningCA"]:
        """This CA and the earlier generations it still answers for."""
        return [self]

    def home(self) -> str:
        """The directory this CA's CRL and delegated OCSP responder are kept
        in now: ``directory``, unless a CA rolled over while this process
        runs moved it (:meth:`estgw.ca.local.LocalCA.home`)."""
        return self.directory

    @property
    def signs_quickly(self) -> bool:
        """Whether a certificate signed by the issuing key costs at most
        about half a millisecond of CPU (EC, EdDSA, RSA up to 2048 bits)
        rather than several (larger RSA keys)."""
        key = self._issuing_key
        return not isinstance(key, rsa.RSAPrivateKey) or key.key_size <= 2048

    @property
    def key_id(self) -> str:
        """Hex of the issuing CA's key identifier: what ``{ca}`` in a
        profile URL becomes, so each generation has its own CRL URL."""
        return self.authority_key_identifier().key_identifier.hex()  # type: ignore[union-attr]

    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        """The AKI of everything this CA signs (RFC 5280 4.2.1.1)."""
        try:
            ski = self.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:  # a hand-made issuing cert; derive it the same way
            ski = x509.SubjectKeyIdentifier.from_public_key(self._issuing_key.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    _authority_key_identifier = authority_key_identifier

    def issued(self, cert: x509.Certificate) -> bool:
        """Whether this CA signed ``cert`` (issuer name and signature)."""
        if cert.issuer != self.issuing.subject:
            return False
        try:
            cert.verify_directly_issued_by(self.issuing)
        except Exception:  # InvalidSignature, ValueError, TypeError: not ours
            return False
        return True

    def sign(
        self,
        request: IssueRequest,
        profile: Profile,
        now: datetime | None = None,
        extra: Sequence[x509.ExtensionType] = (),
    ) -> x509.Certificate:
        """Sign an end-entity certificate for ``request`` under ``profile``
        (and the non-critical ``extra`` extensions).

        Synchronous and CPU-bound: call it off the reactor thread. The
        checks on what may be requested happened before; this only refuses
        what would make an invalid certificate (CAError: the CA expired;
        ValueError: neither subject nor subjectAltName).
        """
        now = _utc(now)
        not_after = min(now + profile.validity, self.issuing.not_valid_after_utc)
        if not_after <= now:
            raise CAError(
                f"the issuing CA expired on {self.issuing.not_valid_after_utc.isoformat()}; "
                f"nothing more can be issued"
            )
        empty_subject = len(request.subject) == 0
        if empty_subject and not request.sans:
            # RFC 5280 4.1.2.6: with no subject, the identity is in the SAN.
            raise ValueError("a certificate needs a subject or a subjectAltName")
        builder = (
            x509.CertificateBuilder()
            .subject_name(request.subject)
            .issuer_name(self.issuing.subject)
            .public_key(request.public_key)
            # 159 random bits: unique across gateway processes without
            # coordination, positive, and within RFC 5280's 20 octets.
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        usages = usages_for_key(profile.key_usage, request.public_key)
        if usages:
            builder = builder.add_extension(key_usage_extension(usages), critical=True)
        if profile.extended_key_usage:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage(list(profile.extended_key_usage)), critical=False
            )
        if request.sans:
            # RFC 5280 4.2.1.6: critical exactly when the subject is empty.
            builder = builder.add_extension(
                x509.SubjectAlternativeName(list(request.sans)), critical=empty_subject
            )
        builder = builder.add_extension(
            x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False
        ).add_extension(self.authority_key_identifier(), critical=False)
        for extension in [*profile_extensions(profile, self.key_id), *extra]:
            builder = builder.add_extension(extension, critical=False)
        return self._signed(builder)

    def _signed(self, builder: Any, ocsp_response: bool = False, more: Sequence[bytes] = ()) -> Any:
        """``builder`` (a certificate, CRL or OCSP response builder) signed
        with the issuing key.  The one place a signature is made: a CA
        whose key is elsewhere (:mod:`estgw.ca.pkcs11`) overrides it.

        cryptography signs OCSP responses of RSA keys with PKCS#1 v1.5
        whatever ``rsa_padding`` says; ``more``: further DER SingleResponses
        of an OCSP response (RFC 6960 4.2.1)."""
        arguments = sign_arguments(self._issuing_key, self.rsa_padding)
        if ocsp_response:
            draft = builder.sign(self._issuing_key, arguments["algorithm"])
            return resigned_with_responses(draft, more, self._issuing_key) if more else draft
        return builder.sign(self._issuing_key, **arguments)

    def write_crl(
        self,
        revoked: Sequence[Any],
        next_update: timedelta = timedelta(days=7),
        now: datetime | None = None,
    ) -> x509.CertificateRevocationList:
        """Sign a CRL of ``revoked`` with the issuing CA (RFC 5280 5).

        ``revoked`` holds :class:`RevokedEntry` values or tuples of their
        fields (serial, revocation time[, reason[, invalidity date]]). Each
        entry carries its reason code (5.3.1) and invalidity date (5.3.2)
        where known. The CRL is also written to ``crl.pem`` in the CA's
        directory. Its CRL number (5.2.3: must increase) is the later of the
        previous number plus one and the current Unix time, so it keeps
        increasing even if ``crl.pem`` is deleted.
        """
        if next_update <= timedelta(0):
            raise ValueError(f"next_update must be positive, not {next_update}")
        now = _utc(now)
        home = self.home()
        path = os.path.join(home, CRL_FILE)
        entries = _entries(revoked)
        with _locked(home):
            number = int(now.timestamp())
            if os.path.exists(path):
                try:
                    previous = x509.load_pem_x509_crl(_read(path))
                    last = previous.extensions.get_extension_for_class(x509.CRLNumber).value
                    number = max(number, last.crl_number + 1)
                except (ValueError, x509.ExtensionNotFound):
                    pass  # unreadable old CRL: the time-based number still increases
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(self.issuing.subject)
                .last_update(now)
                .next_update(now + next_update)
                .add_extension(self.authority_key_identifier(), critical=False)
                .add_extension(x509.CRLNumber(number), critical=False)
            )
            for entry in entries:
                revoked_builder = (
                    x509.RevokedCertificateBuilder()
                    .serial_number(entry.serial)
                    .revocation_date(entry.revoked_at)
                )
                flag = entry.reason_flag
                if flag is not None:
                    revoked_builder = revoked_builder.add_extension(x509.CRLReason(flag), critical=False)
                if entry.invalidity_date is not None:
                    revoked_builder = revoked_builder.add_extension(
                        x509.InvalidityDate(entry.invalidity_date.replace(tzinfo=None)), critical=False
                    )
                builder = builder.add_revoked_certificate(revoked_builder.build())
            crl = self._signed(builder)
            _write_atomically(path, crl.public_bytes(serialization.Encoding.PEM), _CERT_MODE)
        return crl

    def sign_ocsp(self, builder: ocsp.OCSPResponseBuilder, more: Sequence[bytes] = ()) -> ocsp.OCSPResponse:
        """Sign an OCSP response as the CA itself (RFC 6960 4.2.2.2), with
        the DER SingleResponses ``more`` after the builder's one.

        cryptography signs OCSP responses of RSA keys with PKCS#1 v1.5
        whatever ``rsa_padding`` says."""
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.issuing)
        return self._signed(builder, ocsp_response=True, more=more)


@implementer(ITokenProcedure)
class SigningTokenProcedure:
    """Issue with a :class:`SigningCA` under one :class:`Profile`, off the reactor thread."""

    def __init__(
        self,
        name: str,
        ca: SigningCA,
        profile: Profile,
        reactor: IReactorThreads | None = None,
        threads: CAThreads | None = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        self.name = name
        self.ca = ca
        self.profile = profile
        self._reactor = reactor
        # Blocking signatures run here, not on the reactor's pool (estgw.ca.threads).
        self.threads = threads

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    def issue(self, request: IssueRequest) -> "Deferred[x509.Certificate]":
        """Sign; the Deferred fires in the reactor thread.

        A quick signature (:attr:`SigningCA.signs_quickly`: 0.1 ms for a
        P-256 certificate, 0.5 ms for RSA-2048) is made at once: it holds
        the GIL either way, so a pool thread would only add the hop there
        and back.  Larger RSA keys (several ms) go to a pool thread, so the
        reactor keeps answering meanwhile.
        """
        if self.ca.signs_quickly:
            return maybeDeferred(self.ca.sign, request, self.profile)
        if self.threads is not None:
            return self.threads.run(self.ca.sign, request, self.profile)
        assert self._reactor is not None
        # The reactor's pool is looked up here, not in __init__: asking for
        # it starts it, which should not happen merely by loading a config.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.ca.sign, request, self.profile)

    def chain(self) -> list[x509.Certificate]:
        return self.ca.chain()

    def issuers(self) -> list[SigningCA]:
        """Every CA whose certificates this procedure still answers for:
        the current issuing CA first, then earlier ones (after a rollover)."""
        return self.ca.issuers()
