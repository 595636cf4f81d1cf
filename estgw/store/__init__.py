"""Durable state: issued certificates, revocations, pre-registered devices,
officer roles, pending approvals and used HTTP Digest nonce counts.

Callers see only :class:`IStore`, whose methods return Deferreds; the SQL
runs in threads, never on the reactor, and every write is committed before
its Deferred fires (so a certificate can be sent to a device only once it
is on disk).  :func:`open_store` picks the backend from ``store.url``:

- ``sqlite:PATH``: :class:`estgw.store.sqlite.SQLiteStore`, one file, no
  server (the default);
- ``postgresql://...``: :class:`estgw.store.postgresql.PostgreSQLStore`,
  one database shared by several gateway processes or machines.

Both run the same SQL (:mod:`estgw.store.sql`) and the same schema
migrations (:mod:`estgw.store.migrations`).  Every rule that reads the
store (last issued, revoked, single use, approvals, Digest replays) is
decided in the database, by constraints, conditional UPDATEs, upserts and
locks, never from a copy kept in a process, so it holds across processes.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Iterable

import attr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

__all__ = [
    "IssuedCertificate",
    "CertificatePage",
    "CertificateFilter",
    "Device",
    "DuplicateDevice",
    "DuplicateFactoryCertificate",
    "OfficerRole",
    "certificate_fingerprint",
    "general_name_text",
    "DuplicateCertificate",
    "NotLastIssued",
    "UnknownCertificate",
    "StoreNotEmpty",
    "Approval",
    "APPROVAL_STATES",
    "UnsupportedSchemaVersion",
    "StoreNotRunning",
    "StoreUnavailable",
    "MAX_DIGEST_NONCE",
    "DIGEST_NONCE_PURGE",
    "DIGEST_NONCE_GRACE",
    "AuditEntry",
    "REVOCATION_REASONS",
    "MIGRATIONS",
    "IStore",
    "SQLiteStore",
    "open_store",
    "iterate_certificates",
    "redact_url",
]


# -- values -----------------------------------------------------------------


def _require_utc(instance: Any, attribute: Any, value: Any) -> None:
    # A naive datetime would be stored as if it were UTC and silently shift
    # validity and revocation dates by the local offset: refuse it.
    if value is not None and value.utcoffset() is None:
        raise ValueError(f"{attribute.name} must be timezone-aware, got {value!r}")


def _to_tuple(values: Iterable[str]) -> tuple[str, ...]:
    # Lists (e.g. from JSON) compare unequal to tuples: normalise.
    return tuple(values)


def _pairs(values: Any) -> tuple[tuple[str, str], ...]:
    # Accept a mapping or pairs (e.g. lists from JSON); keep the order.
    items = values.items() if hasattr(values, "items") else values
    return tuple((str(k), str(v)) for k, v in items)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def general_name_text(name: x509.GeneralName) -> str:
    """One SAN in the ``TYPE:value`` spelling OpenSSL prints."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"DirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        return f"othername:{name.type_id.dotted_string}:{name.value.hex()}"
    return f"unknown:{name!r}"  # pragma: no cover - cryptography has no others


@attr.s(frozen=True, auto_attribs=True)
class IssuedCertificate:
    """A certificate this gateway issued, and whether it was revoked."""

    serial: int  # up to 160 bits: stored as hex TEXT, not INTEGER
    subject: str  # cert.subject.rfc4514_string()
    # "DNS:x", "IP:1.2.3.4", "email:..", "URI:.." in certificate order
    sans: tuple[str, ...] = attr.ib(converter=_to_tuple)
    not_before: datetime = attr.ib(validator=_require_utc)
    not_after: datetime = attr.ib(validator=_require_utc)
    public_key_sha256: str  # hex SHA-256 of the SubjectPublicKeyInfo DER
    handler: str  # handler id, e.g. "1"
    requester: str  # e.g. "device:pump-17" or "cert:CN=x,O=y#serial=ab12.."
    der: bytes = attr.ib(repr=False)
    issued_at: datetime = attr.ib(validator=_require_utc)
    revoked_at: datetime | None = attr.ib(default=None, validator=_require_utc)
    revocation_reason: str | None = None
    # RFC 5280 5.3.2: when the key is known or suspected to have been
    # compromised (set by `estgw cert revoke --invalidity-date`).
    invalidity_date: datetime | None = attr.ib(default=None, validator=_require_utc)

    @classmethod
    def from_certificate(
        cls,
        cert: x509.Certificate,
        handler: str,
        requester: str,
        issued_at: datetime | None = None,
    ) -> IssuedCertificate:
        """Describe ``cert``; ``issued_at`` defaults to now."""
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            sans = tuple(general_name_text(name) for name in san.value)
        except x509.ExtensionNotFound:
            sans = ()
        spki = cert.public_key().public_bytes(
            Encoding.DER, PublicFormat.SubjectPublicKeyInfo
        )
        return cls(
            serial=cert.serial_number,
            subject=cert.subject.rfc4514_string(),
            sans=sans,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            public_key_sha256=hashlib.sha256(spki).hexdigest(),
            handler=handler,
            requester=requester,
            der=cert.public_bytes(Encoding.DER),
            issued_at=_utcnow() if issued_at is None else issued_at,
        )

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_der_x509_certificate(self.der)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


def _certificate_tuple(values: Iterable[IssuedCertificate]) -> tuple[IssuedCertificate, ...]:
    return tuple(values)


@attr.s(frozen=True, auto_attribs=True)
class CertificateFilter:
    """Which certificates :meth:`IStore.certificate_page` returns, decided by
    the database while it walks the rows in order (a scan in the database,
    not a row at a time in Python).  Every given condition must hold:

    - ``subject_contains``: the subject text (as ``rfc4514_string()``
      wrote it) contains at least one of these strings; the match may be
      wider than exact (SQLite compares ASCII letters in any case), so a
      caller that needs exactness checks each row again;
    - ``revoked``: True, only revoked; False, only not revoked;
    - ``not_after_from`` / ``not_after_before``: notAfter at or after /
      before this instant (timezone-aware).
    """

    subject_contains: tuple[str, ...] = ()
    revoked: bool | None = None
    not_after_from: datetime | None = attr.ib(default=None, validator=_require_utc)
    not_after_before: datetime | None = attr.ib(default=None, validator=_require_utc)


@attr.s(frozen=True, auto_attribs=True)
class CertificatePage:
    """One page of :meth:`IStore.certificate_page`."""

    certificates: tuple[IssuedCertificate, ...] = attr.ib(converter=_certificate_tuple)
    # Where the next page starts (pass it as ``after``); None: this was the last.
    after: tuple[str, int] | None


@attr.s(frozen=True, auto_attribs=True)
class Device:
    """A device an administrator pre-registered for HTTP Basic/Digest."""

    device_id: str
    password_hash: str | None = attr.ib(repr=False)  # never the password
    single_use: bool = False
    created_at: datetime | None = attr.ib(default=None, validator=_require_utc)
    consumed_at: datetime | None = attr.ib(default=None, validator=_require_utc)
    # Factory (authentication) certificate, e.g. an IDevID: the SHA-256 of
    # its DER (certificate_fingerprint); the commonName a CSR must carry
    # (None: the device id); registered names, subject values and
    # subjectAltNames, ("serialNumber", "SN1"), ("DNS", "pump-1.example"),
    # ("IP", "10.0.0.5"): an empty value matches anything (stored as a JSON
    # list of pairs; an object from older versions reads the same).
    factory_cert_sha256: str | None = None
    factory_cn: str | None = None
    subject_values: tuple[tuple[str, str], ...] = attr.ib(default=(), converter=_pairs)
    # HTTP Digest H(A1) = MD5(id:realm:password) per realm: a password
    # equivalent for that realm, so never shown.
    digest_ha1: tuple[tuple[str, str], ...] = attr.ib(default=(), converter=_pairs, repr=False)

    @property
    def expected_common_name(self) -> str:
        return self.device_id if self.factory_cn is None else self.factory_cn


@attr.s(frozen=True, auto_attribs=True)
class OfficerRole:
    """An officer/RA role granted to one certificate (by its fingerprint)."""

    fingerprint: str  # certificate_fingerprint() of the officer certificate
    role: str
    subject: str  # for people reading `estgw officer list`
    issuer: str
    serial: int
    granted_at: datetime | None = attr.ib(default=None, validator=_require_utc)


def certificate_fingerprint(cert: x509.Certificate) -> str:
    """Lower-case hex SHA-256 of the DER: how the store keys factory
    certificates and officer roles."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


#: Reasons :meth:`IStore.revoke_certificate` accepts: the RFC 5280 CRLReason
#: names as cryptography spells them, so a CRL writer can use
#: ``x509.ReasonFlags(reason)``.  removeFromCRL is for delta CRLs only.
REVOCATION_REASONS: frozenset[str] = frozenset(
    flag.value for flag in x509.ReasonFlags if flag is not x509.ReasonFlags.remove_from_crl
)


class DuplicateDevice(Exception):
    """add_device for a device id that is already registered."""


class DuplicateFactoryCertificate(DuplicateDevice):
    """add_device with a factory certificate registered to another device."""


class DuplicateCertificate(Exception):
    """record_certificate for a serial number that is already recorded."""


class NotLastIssued(Exception):
    """record_certificate(renewing=serial) when another certificate was
    issued for the subject after ``serial``: nothing was recorded."""


class StoreNotEmpty(Exception):
    """copy_from_sqlite into a store that already holds rows: nothing copied."""


class UnknownCertificate(Exception):
    """No certificate with this serial number was issued here."""


class UnsupportedSchemaVersion(Exception):
    """The database was written by a newer estgw than this one."""


@attr.s(frozen=True, auto_attribs=True)
class AuditEntry:
    """One operator action: when, who (``os:<user>`` or an operator
    certificate), what (``device-add``, ``cert-revoke``, ...), on what."""

    at: datetime = attr.ib(validator=_require_utc)
    operator: str
    action: str
    target: str
    details: str = ""


class StoreUnavailable(Exception):
    """The database failed (locked, disk full, read-only, connection
    lost, ...): nothing was written by the failed call.

    The message is for the log: it names the store (a file name; a host,
    user and database).  :attr:`fault` says what failed in words that name
    nothing (``/health/ready`` shows it to anyone who asks); devices are
    told only that the store is unavailable."""

    def __init__(self, message: str, fault: str = "") -> None:
        super().__init__(message)
        self.fault = fault or FAULT_OTHER


class StoreNotRunning(StoreUnavailable):
    """An operation on a store that was not started, or was closed."""

    def __init__(self, message: str = "the store is not started, or closed") -> None:
        super().__init__(message, "not started, or closed")


#: :attr:`StoreUnavailable.fault` of the kinds each backend tells apart.
FAULT_LOCKED = "the database is locked by another connection"
FAULT_READ_ONLY = "the database takes no writes (read-only)"
FAULT_FULL = "the disk is full"
FAULT_UNREACHABLE = "the database cannot be reached, or the connection was lost"
FAULT_OTHER = "the database failed"


#: Longest Digest nonce :meth:`IStore.use_digest_nonce` records, in
#: characters (the gateway's own are about 115).
MAX_DIGEST_NONCE = 256

#: Expired Digest nonce records :meth:`IStore.use_digest_nonce` removes at
#: most per call: more than the one record a call adds, so the expired
#: ones never pile up, and few enough that each call stays short.
DIGEST_NONCE_PURGE = 16

#: Seconds a Digest nonce record is kept after it expired: the clocks of
#: the machines sharing a store may differ this much without one of them
#: removing a record that another still needs (one whose clock is behind
#: still accepts the nonce).
DIGEST_NONCE_GRACE = 60


#: States of a request that waits for an operator:
#: pending -> approved -> issued, pending -> rejected, pending|approved -> expired.
APPROVAL_STATES = ("pending", "approved", "rejected", "issued", "expired")


@attr.s(frozen=True, auto_attribs=True)
class Approval:
    """An enrollment request that waits for, or had, an operator's decision."""

    request_id: str  # generated here; the approval service dedups on it
    handler: str
    public_key_sha256: str  # hex SHA-256 of the CSR's SubjectPublicKeyInfo
    subject: str  # the CSR subject, RFC 4514
    requester: str
    csr: bytes = attr.ib(repr=False)  # DER
    created_at: datetime = attr.ib(validator=_require_utc)
    expires_at: datetime = attr.ib(validator=_require_utc)
    state: str = attr.ib(default="pending", validator=attr.validators.in_(APPROVAL_STATES))
    # When the approval service acknowledged the submission; None: not yet.
    submitted_at: datetime | None = attr.ib(default=None, validator=_require_utc)
    decided_at: datetime | None = attr.ib(default=None, validator=_require_utc)
    reason: str | None = None  # the operator's reason (rejections)
    serial: int | None = None  # the certificate issued for it

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.handler, self.public_key_sha256, self.subject)


# -- interface --------------------------------------------------------------


class IStore(Interface):
    """
    Durable gateway state.  Every method returns a Deferred; a write's
    Deferred fires only after the write is committed.  Datetimes are
    timezone-aware UTC; ``when`` arguments default to now.
    """

    SCHEMA_VERSION = Attribute("The schema version this code reads and writes (int).")

    def start() -> Deferred[None]:
        """Open the database; create or migrate the schema to SCHEMA_VERSION."""

    def close() -> Deferred[None]:
        """Finish the operations in flight, then release the database."""

    def check_writable(seconds: float = 1.0) -> Deferred[None]:
        """Fire when a write transaction could start now, having waited at
        most ``seconds`` for another connection's write lock; fail with
        StoreUnavailable saying why not (locked by another process,
        read-only).  Writes nothing (for ``/health/ready``)."""

    def record_certificate(issued: IssuedCertificate, renewing: int | None = None) -> Deferred[None]:
        """
        Record an issued certificate (DuplicateCertificate on a reused
        serial).  With ``renewing`` (the serial of the client certificate
        that renews the subject under the last-issued rule), the record is
        made only if that certificate is still the last one issued for the
        subject, decided under a lock on the subject so that of concurrent
        renewals with one certificate (from any process) exactly one is
        recorded; the others raise NotLastIssued and record nothing.
        """

    def get_certificate(serial: int) -> Deferred[IssuedCertificate | None]:
        """The certificate with this serial, or None."""

    def list_certificates(subject: str | None = None) -> Deferred[list[IssuedCertificate]]:
        """All certificates, or those of one subject; newest first."""

    def certificate_page(
        after: tuple[str, int] | None = None,
        limit: int = 1000,
        subject: str | None = None,
        revoked_only: bool = False,
        where: CertificateFilter | None = None,
    ) -> Deferred[CertificatePage]:
        """
        Up to ``limit`` certificates (1 to 10000, else ValueError), newest
        first as list_certificates orders them, starting after the position
        ``after`` (the ``after`` of the previous page; None: from the
        newest); only those of ``subject``, or only revoked ones, when
        asked, and only those ``where`` keeps.  Each page is one indexed
        range query, so reading every page costs the same per row at any
        table size and holds one page in memory (see
        :func:`iterate_certificates`); the conditions of ``where`` are
        checked by the database as it walks that range.
        """

    def copy_from_sqlite(path: str, batch: int = 1000) -> Deferred[dict[str, int]]:
        """
        Copy every table of the SQLite store file ``path`` (at this schema
        version) into this started, empty store in one transaction (all or
        nothing), ids kept; rows copied per table.  StoreNotEmpty, with
        nothing copied, if this store holds any row.  ``estgw store
        migrate`` uses it.
        """

    def revoke_certificate(
        serial: int,
        reason: str = "unspecified",
        when: datetime | None = None,
        invalidity_date: datetime | None = None,
    ) -> Deferred[IssuedCertificate]:
        """
        Mark a certificate revoked and return it.  UnknownCertificate if
        absent; a second revocation keeps the first date, reason and
        invalidity date.  ``reason`` is one of REVOCATION_REASONS (else
        ValueError); ``invalidity_date`` (RFC 5280 5.3.2, timezone-aware)
        must not be later than the revocation (else ValueError).
        """

    def is_revoked(serial: int) -> Deferred[bool]:
        """Whether this serial was issued here and revoked (unknown: False)."""

    def last_issued_for_subject(subject: str) -> Deferred[IssuedCertificate | None]:
        """The newest certificate for ``subject`` (by issued_at, then insertion)."""

    def certificates_for_public_key(public_key_sha256: str) -> Deferred[list[IssuedCertificate]]:
        """Certificates issued for a public key (hex SHA-256 of its
        SubjectPublicKeyInfo DER), newest first."""

    def add_audit(at: datetime, operator: str, action: str, target: str, details: str) -> Deferred[None]:
        """Append one operator action to the audit table."""

    def list_audit(limit: int = 100) -> Deferred[list[AuditEntry]]:
        """The latest ``limit`` operator actions, oldest first."""

    def count_expiring(after: datetime, before: datetime) -> Deferred[int]:
        """How many certificates not revoked expire after ``after`` and at
        or before ``before`` (both timezone-aware)."""

    def count_certificates() -> Deferred[int]:
        """How many certificates are recorded."""

    def add_device(device: Device) -> Deferred[None]:
        """Pre-register a device (DuplicateDevice if the id exists)."""

    def get_device(device_id: str) -> Deferred[Device | None]:
        """The device, or None."""

    def list_devices() -> Deferred[list[Device]]:
        """All devices, by id."""

    def set_device_password(
        device_id: str, password_hash: str, digest_ha1: tuple[tuple[str, str], ...] = ()
    ) -> Deferred[bool]:
        """Replace a device's password hashes (scrypt, Digest H(A1) per
        realm); False when no such device.  Its other settings stay."""

    def remove_device(device_id: str) -> Deferred[bool]:
        """Forget a device; True if there was one."""

    def consume_device(device_id: str, when: datetime | None = None) -> Deferred[bool]:
        """
        Use up a single-use device, atomically: True only for the one call
        that consumed it; False if already consumed, not single-use, or
        unknown.
        """

    def release_device(device_id: str, consumed_at: datetime) -> Deferred[bool]:
        """
        Undo the consume_device(device_id, when=consumed_at) whose issue
        failed, so the device can try again; True if it was undone.
        """

    def get_device_by_factory_cert(fingerprint: str) -> Deferred[Device | None]:
        """The device registered with this factory certificate, or None."""

    def add_officer_role(role: OfficerRole) -> Deferred[bool]:
        """Grant a role to a certificate; False if it already held it."""

    def officer_roles(fingerprint: str) -> Deferred[tuple[str, ...]]:
        """The roles the certificate with this fingerprint holds, sorted."""

    def list_officer_roles() -> Deferred[list[OfficerRole]]:
        """Every grant, by subject, fingerprint and role."""

    def remove_officer_roles(fingerprint: str, role: str | None = None) -> Deferred[int]:
        """Withdraw one role (or all) from a certificate; how many went."""

    def add_approval(approval: Approval) -> Deferred[Approval]:
        """
        Record a new pending request and return it; when a live (pending or
        approved) request with the same (handler, public key, subject)
        exists already, record nothing and return that one.
        """

    def find_approval(handler: str, public_key_sha256: str, subject: str) -> Deferred[Approval | None]:
        """The newest request with this (handler, public key, subject), or None."""

    def get_approval(request_id: str) -> Deferred[Approval | None]:
        """The request with this id, or None."""

    def list_approvals(state: str | None = None) -> Deferred[list[Approval]]:
        """All requests, or those in one state; newest first."""

    def set_approval_submitted(request_id: str, when: datetime | None) -> Deferred[None]:
        """Record that the approval service has the request (None: it has not)."""

    def decide_approval(
        request_id: str, state: str, reason: str | None, expires_at: datetime, when: datetime | None = None
    ) -> Deferred[Approval | None]:
        """
        pending -> ``state`` ("approved" or "rejected"), atomically; the
        decision is kept until ``expires_at``.  Returns the request as it
        now is (also when it was no longer pending), None if unknown.
        """

    def expire_approval(request_id: str, when: datetime | None = None) -> Deferred[bool]:
        """pending or approved -> expired; True only for the call that did it."""

    def issue_approved(request_id: str, issued: IssuedCertificate) -> Deferred[bool]:
        """
        approved -> issued and record ``issued``, in one transaction.  True
        for the one call that did it; False (and nothing recorded) when the
        request was not approved, e.g. another call issued first.
        """

    def use_digest_nonce(nonce: str, nc: int, expires_at: datetime, when: datetime | None = None) -> Deferred[bool]:
        """
        Record that a correct HTTP Digest response used nonce count ``nc``
        (1 to 2**32 - 1, the eight hex digits of RFC 7616 §3.4) with
        ``nonce`` (the gateway's nonce text, at most
        :data:`MAX_DIGEST_NONCE` characters), and say whether it may
        answer a request: True if ``nc`` is higher than every count
        recorded for the nonce (the first use included), False for a
        replay (nothing changes).  Decided by one statement in the
        database, so of concurrent uses of one (nonce, nc) through any
        processes or machines on this store exactly one is True.

        The record is kept until ``expires_at`` (timezone-aware; when the
        nonce itself is refused as stale) and :data:`DIGEST_NONCE_GRACE`
        seconds more; each call removes at most :data:`DIGEST_NONCE_PURGE`
        records older than that at ``when`` (default: now), so the work
        per call is bounded and the table holds about the nonces still
        alive.  ValueError for ``nc`` out of
        range, an over-long nonce or a naive datetime; StoreUnavailable
        when the database fails (nothing recorded: the response may be
        tried again).
        """




async def iterate_certificates(
    store: IStore, subject: str | None = None, revoked_only: bool = False, page_size: int = 1000,
    where: CertificateFilter | None = None,
) -> AsyncIterator[IssuedCertificate]:
    """Every certificate (or those of ``subject``, or the revoked ones, or
    those ``where`` keeps), newest first, read ``page_size`` at a time:
    memory stays bounded by two pages however many certificates the store
    holds."""
    following: Deferred[CertificatePage] = store.certificate_page(None, page_size, subject, revoked_only, where)
    try:
        while True:
            page = await following
            if page.after is not None:
                # Read the next page while the caller works through this
                # one: two pages in memory at most.
                following = store.certificate_page(page.after, page_size, subject, revoked_only, where)
            for certificate in page.certificates:
                yield certificate
            if page.after is None:
                return
    finally:
        # A caller that stops early leaves a read in flight: its outcome
        # (even a failure) is of no interest.
        following.addErrback(lambda _: None)


#: URL schemes of :func:`open_store`.
SQLITE_SCHEME = "sqlite:"
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")


def redact_url(url: str) -> str:
    """``url`` with any password (``user:password@`` or ``password=`` in the
    query) replaced by ``***``: for logs and output (a PostgreSQL URL may
    carry the database password)."""
    url = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@:]*):[^/?#@]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def open_store(url: str, reactor: Any = None) -> IStore:
    """
    The store named by ``url`` (not yet started: call ``start()``, which
    creates or migrates the schema):

    - ``sqlite:PATH``: a SQLite file (PATH as given; relative to the
      current directory);
    - ``postgresql://[user[:password]@][host][:port]/dbname[?param=...]``
      (or ``postgres://``): a PostgreSQL database, libpq's URI syntax
      (``?host=/run/postgresql`` for a unix socket directory); needs the
      ``postgresql`` extra (psycopg 3 and psycopg-pool).

    ValueError for any other URL, or a PostgreSQL URL without psycopg.
    """
    if url.startswith(SQLITE_SCHEME):
        path = url[len(SQLITE_SCHEME):].strip()
        if not path:
            raise ValueError("expected sqlite:PATH, with a path")
        return SQLiteStore(path, reactor=reactor)
    if url.startswith(POSTGRESQL_SCHEMES):
        try:
            from estgw.store.postgresql import PostgreSQLStore
        except ImportError as e:
            raise ValueError(
                f"a postgresql:// store needs psycopg 3 and psycopg-pool"
                f" (pip install 'estgw[postgresql]'): {e}"
            ) from None
        return PostgreSQLStore(url, reactor=reactor)
    raise ValueError(f"expected sqlite:PATH or postgresql://..., not {redact_url(url)!r}")


# The backends import the values above: import them last.
from estgw.store.migrations import MIGRATIONS  # noqa: E402
from estgw.store.sql import _SQLStore  # noqa: E402,F401
from estgw.store.sqlite import SQLiteStore  # noqa: E402
