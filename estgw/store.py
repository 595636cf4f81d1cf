"""Durable state: issued certificates, revocations, pre-registered devices.

Callers see only :class:`IStore`, whose methods return Deferreds; the SQL
runs in a one-connection :class:`twisted.enterprise.adbapi.ConnectionPool`
thread, and every write is committed before its Deferred fires (so a
certificate can be sent to a device only once it is on disk).

The SQL is a portable subset (SQLite and PostgreSQL both run it): values
as TEXT (timestamps as fixed-width ISO 8601 UTC, serials as hex, SANs as
a JSON list), booleans as 0/1 INTEGER, ``LIMIT``, ``CREATE ... IF NOT
EXISTS``.  What differs between the two is kept in :class:`_SQLStore`'s
class attributes: the DB-API paramstyle and a few DDL words.

The schema is versioned: :data:`MIGRATIONS` lists ``(version, [sql...])``
steps, each applied in its own transaction together with the bump of the
single-row ``schema_version`` table.  Later steps add pending approvals,
officer roles and factory certificates.  To change the schema, append a
step; never edit one that has shipped.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Iterable, Sequence, TypeVar

import attr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

__all__ = [
    "IssuedCertificate",
    "Device",
    "DuplicateDevice",
    "DuplicateFactoryCertificate",
    "OfficerRole",
    "certificate_fingerprint",
    "DuplicateCertificate",
    "UnknownCertificate",
    "Approval",
    "APPROVAL_STATES",
    "UnsupportedSchemaVersion",
    "StoreNotRunning",
    "StoreUnavailable",
    "AuditEntry",
    "REVOCATION_REASONS",
    "MIGRATIONS",
    "IStore",
    "SQLiteStore",
]

_T = TypeVar("_T")


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
    lost, ...): nothing was written by the failed call.  The message is for
    the log; devices are told only that the store is unavailable."""


class StoreNotRunning(StoreUnavailable):
    """An operation on a store that was not started, or was closed."""


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

    def record_certificate(issued: IssuedCertificate) -> Deferred[None]:
        """Record an issued certificate (DuplicateCertificate on a reused serial)."""

    def get_certificate(serial: int) -> Deferred[IssuedCertificate | None]:
        """The certificate with this serial, or None."""

    def list_certificates(subject: str | None = None) -> Deferred[list[IssuedCertificate]]:
        """All certificates, or those of one subject; newest first."""

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


# -- schema -----------------------------------------------------------------

# DDL words that differ between databases are {placeholders}, filled from
# _SQLStore.ddl_words; everything else must run unchanged on both.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """
            CREATE TABLE certificates (
                id {autoincrement_primary_key},
                serial TEXT NOT NULL UNIQUE,
                subject TEXT NOT NULL,
                sans TEXT NOT NULL,
                not_before TEXT NOT NULL,
                not_after TEXT NOT NULL,
                public_key_sha256 TEXT NOT NULL,
                handler TEXT NOT NULL,
                requester TEXT NOT NULL,
                der {blob} NOT NULL,
                issued_at TEXT NOT NULL,
                revoked_at TEXT,
                revocation_reason TEXT
            )
            """,
            # Leading subject: serves lookups by subject, and the ordering
            # of last_issued_for_subject without a sort.
            "CREATE INDEX certificates_subject ON certificates (subject, issued_at, id)",
            # For "is this key already certified?" checks (rekey policy).
            "CREATE INDEX certificates_public_key ON certificates (public_key_sha256)",
            """
            CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                password_hash TEXT,
                single_use INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                consumed_at TEXT
            )
            """,
        ],
    ),
    (
        2,
        [
            # Factory (authentication) certificates: the SHA-256 of the DER,
            # the commonName a CSR must carry, expected subject values
            # (JSON object) and per-realm HTTP Digest H(A1) (JSON object).
            "ALTER TABLE devices ADD COLUMN factory_cert_sha256 TEXT",
            "ALTER TABLE devices ADD COLUMN factory_cn TEXT",
            "ALTER TABLE devices ADD COLUMN subject_values TEXT",
            "ALTER TABLE devices ADD COLUMN digest_ha1 TEXT",
            # NULLs do not collide in a unique index (SQLite, PostgreSQL).
            "CREATE UNIQUE INDEX devices_factory_cert ON devices (factory_cert_sha256)",
            # Officer/RA roles, keyed by the SHA-256 of the certificate's DER.
            """
            CREATE TABLE officer_roles (
                fingerprint TEXT NOT NULL,
                role TEXT NOT NULL,
                subject TEXT NOT NULL,
                issuer TEXT NOT NULL,
                serial TEXT NOT NULL,
                granted_at TEXT NOT NULL,
                PRIMARY KEY (fingerprint, role)
            )
            """,
        ],
    ),
    (
        3,
        [
            # Requests waiting for an operator's approval.
            """
            CREATE TABLE approvals (
                id {autoincrement_primary_key},
                request_id TEXT NOT NULL UNIQUE,
                handler TEXT NOT NULL,
                public_key_sha256 TEXT NOT NULL,
                subject TEXT NOT NULL,
                requester TEXT NOT NULL,
                csr {blob} NOT NULL,
                state TEXT NOT NULL,
                created_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                submitted_at TEXT,
                decided_at TEXT,
                reason TEXT,
                serial TEXT
            )
            """,
            # Retries find their request by key, newest first.
            "CREATE INDEX approvals_key ON approvals (handler, public_key_sha256, subject, id)",
            # One live request per key, even with several gateway processes.
            "CREATE UNIQUE INDEX approvals_live ON approvals (handler, public_key_sha256, subject)"
            " WHERE state IN ('pending', 'approved')",
        ],
    ),
    (
        4,
        [
            # RFC 5280 5.3.2 invalidity date of a revocation, for CRLs and OCSP.
            "ALTER TABLE certificates ADD COLUMN invalidity_date TEXT",
        ],
    ),
    (
        5,
        [
            # Operator actions (estgw.audit.operator_action): who, what, when.
            """
            CREATE TABLE audit (
                id {autoincrement_primary_key},
                at TEXT NOT NULL,
                operator TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                details TEXT NOT NULL
            )
            """,
        ],
    ),
]


def _serial_text(serial: int) -> str:
    # Lower-case hex without padding: the one spelling, so equality in SQL
    # is equality of serials.  A negative serial (RFC 5280 forbids them,
    # but a foreign client certificate may carry one) still gets a spelling
    # that can never match a certificate issued here.
    return format(serial, "x") if serial >= 0 else "-" + format(-serial, "x")


def _time_text(when: datetime) -> str:
    # Fixed width (microseconds always present, UTC offset always +00:00)
    # so that text order is time order in ORDER BY on every database.
    if when.utcoffset() is None:
        raise ValueError(f"timezone-aware datetime required, got {when!r}")
    return when.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _parse_optional_time(text: str | None) -> datetime | None:
    return None if text is None else _parse_time(text)


_CERT_COLUMNS = (
    "serial, subject, sans, not_before, not_after, public_key_sha256,"
    " handler, requester, der, issued_at, revoked_at, revocation_reason, invalidity_date"
)
_DEVICE_COLUMNS = (
    "device_id, password_hash, single_use, created_at, consumed_at,"
    " factory_cert_sha256, factory_cn, subject_values, digest_ha1"
)
_OFFICER_COLUMNS = "fingerprint, role, subject, issuer, serial, granted_at"


def _certificate_from_row(row: Sequence[Any]) -> IssuedCertificate:
    return IssuedCertificate(
        serial=int(row[0], 16),
        subject=row[1],
        sans=tuple(json.loads(row[2])),
        not_before=_parse_time(row[3]),
        not_after=_parse_time(row[4]),
        public_key_sha256=row[5],
        handler=row[6],
        requester=row[7],
        der=bytes(row[8]),  # psycopg2 returns memoryview for BYTEA
        issued_at=_parse_time(row[9]),
        revoked_at=_parse_optional_time(row[10]),
        revocation_reason=row[11],
        invalidity_date=_parse_optional_time(row[12]),
    )


def _device_from_row(row: Sequence[Any]) -> Device:
    return Device(
        device_id=row[0],
        password_hash=row[1],
        single_use=bool(row[2]),
        created_at=_parse_time(row[3]),
        consumed_at=_parse_optional_time(row[4]),
        factory_cert_sha256=row[5],
        factory_cn=row[6],
        subject_values=json.loads(row[7]) if row[7] else (),
        digest_ha1=json.loads(row[8]) if row[8] else (),
    )


def _officer_from_row(row: Sequence[Any]) -> OfficerRole:
    return OfficerRole(
        fingerprint=row[0],
        role=row[1],
        subject=row[2],
        issuer=row[3],
        serial=int(row[4], 16),
        granted_at=_parse_time(row[5]),
    )


_APPROVAL_COLUMNS = (
    "request_id, handler, public_key_sha256, subject, requester, csr, state,"
    " created_at, expires_at, submitted_at, decided_at, reason, serial"
)


def _optional_time_text(when: datetime | None) -> str | None:
    return None if when is None else _time_text(when)


def _approval_from_row(row: Sequence[Any]) -> Approval:
    return Approval(
        request_id=row[0],
        handler=row[1],
        public_key_sha256=row[2],
        subject=row[3],
        requester=row[4],
        csr=bytes(row[5]),  # memoryview from psycopg2
        state=row[6],
        created_at=_parse_time(row[7]),
        expires_at=_parse_time(row[8]),
        submitted_at=_parse_optional_time(row[9]),
        decided_at=_parse_optional_time(row[10]),
        reason=row[11],
        serial=None if row[12] is None else int(row[12], 16),
    )


def _approval_params(approval: Approval) -> tuple[Any, ...]:
    return (
        approval.request_id,
        approval.handler,
        approval.public_key_sha256,
        approval.subject,
        approval.requester,
        approval.csr,
        approval.state,
        _time_text(approval.created_at),
        _time_text(approval.expires_at),
        _optional_time_text(approval.submitted_at),
        _optional_time_text(approval.decided_at),
        approval.reason,
        None if approval.serial is None else _serial_text(approval.serial),
    )


# -- implementation ---------------------------------------------------------


@implementer(IStore)
class _SQLStore:
    """
    IStore over any DB-API module through adbapi.

    A subclass supplies :meth:`_make_pool`, and sets :attr:`paramstyle`
    and :attr:`ddl_words` where its database differs from SQLite.  A
    ``PostgresStore(connection_string, reactor=None)`` needs only:

    - ``_make_pool``: ``adbapi.ConnectionPool("psycopg2", connection_string,
      cp_min=1, cp_max=N, cp_reactor=self._reactor)`` (several connections
      are fine there: row locks, not a file lock; the ``consume_device``
      UPDATE stays atomic under READ COMMITTED);
    - ``paramstyle = "format"`` (psycopg2 writes ``%s``; no SQL here
      contains a literal ``%``, which ``format`` would need doubled);
    - ``ddl_words = {"blob": "BYTEA", "autoincrement_primary_key":
      "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"}``.

    Integrity errors are recognised through the pool's ``dbapi`` module, and
    BYTEA values come back as memoryview and are turned into bytes, so
    nothing else changes.  Migrations take the ``schema_version`` row lock
    first, so several gateway processes starting at once apply each step
    once.
    """

    _log: ClassVar[Logger] = Logger()

    SCHEMA_VERSION: ClassVar[int] = max(version for version, _ in MIGRATIONS)
    migrations: ClassVar[list[tuple[int, list[str]]]] = MIGRATIONS

    #: DB-API paramstyle of the driver: "qmark" (?) or "format" (%s).
    paramstyle: ClassVar[str] = "qmark"
    ddl_words: ClassVar[dict[str, str]] = {
        "blob": "BLOB",
        # AUTOINCREMENT: ids never reused, so id order is insertion order.
        "autoincrement_primary_key": "INTEGER PRIMARY KEY AUTOINCREMENT",
    }

    def __init__(self, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None
        self._closing = False
        # Deferreds that fire when each operation in flight ends: close()
        # waits for them in the reactor, because stopping the pool while
        # work is queued would block the reactor thread on a join until
        # the queue drained.
        self._in_flight: set[Deferred[None]] = set()
        # Group commit of record_certificate: waiting records, whether a
        # transaction of them is in flight, and who waits for both to end.
        self._records: list[tuple[IssuedCertificate, Deferred[None]]] = []
        self._recording = False
        self._records_drained: list[Deferred[None]] = []

    # -- plumbing

    def _make_pool(self) -> adbapi.ConnectionPool:
        raise NotImplementedError

    def _sql(self, query: str) -> str:
        """Queries are written with ``?``; this is the one place that
        rewrites them for the driver's paramstyle."""
        if self.paramstyle == "qmark":
            return query
        if self.paramstyle == "format":
            return query.replace("?", "%s")
        raise ValueError(f"unsupported paramstyle {self.paramstyle!r}")

    def _execute(self, txn: Any, query: str, params: Sequence[Any] = ()) -> Any:
        txn.execute(self._sql(query), tuple(params))
        return txn

    def _now(self) -> datetime:
        # The reactor's clock, so that tests can control it where they
        # control the reactor.
        return datetime.fromtimestamp(self._reactor.seconds(), timezone.utc)

    def _is_integrity_error(self, error: BaseException) -> bool:
        assert self._pool is not None
        return isinstance(error, self._pool.dbapi.IntegrityError)

    def _run(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """Run ``interaction(txn, *args)`` in one transaction; committed
        before the returned Deferred fires."""
        if self._pool is None or self._closing:
            return defer.fail(StoreNotRunning("the store is not started, or closed"))
        return self._run_now(interaction, *args)

    def _run_now(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """:meth:`_run` while closing too: for work accepted before close()."""
        assert self._pool is not None
        finished: Deferred[None] = Deferred()
        self._in_flight.add(finished)

        def done(result: Any) -> Any:
            self._in_flight.discard(finished)
            finished.callback(None)
            return result

        d: Deferred[_T] = self._pool.runInteraction(interaction, *args)
        d.addBoth(done)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure: Any) -> Any:
        """A database error other than a constraint (which the methods turn
        into their own exceptions) means the store cannot serve: one
        exception for callers to map to 503."""
        dbapi = self._pool.dbapi if self._pool is not None else None
        error = failure.value
        if dbapi is not None and isinstance(error, dbapi.Error) and not isinstance(error, dbapi.IntegrityError):
            raise StoreUnavailable(f"{self!r}: {error}") from error
        return failure

    # -- lifecycle

    def start(self) -> Deferred[None]:
        if self._pool is not None:
            return defer.fail(RuntimeError("store already started"))
        self._closing = False
        self._pool = self._make_pool()
        # Start the threads now rather than when the reactor runs, so that
        # start() also completes when called from startService (before the
        # reactor is running).
        self._pool.start()
        d = Deferred.fromCoroutine(self._migrate())

        def failed(failure: Any) -> Any:
            # Do not leave pool threads behind a store that did not start.
            assert self._pool is not None
            self._pool.close()
            self._pool = None
            return failure

        d.addErrback(failed)
        return d

    async def _migrate(self) -> None:
        current = await self._run(self._bootstrap)
        if current > self.SCHEMA_VERSION:
            raise UnsupportedSchemaVersion(
                f"the database has schema version {current}, but this estgw"
                f" knows versions up to {self.SCHEMA_VERSION}: it was written"
                f" by a newer estgw; upgrade estgw (or restore a backup)"
            )
        for version, statements in self.migrations:
            if version > current:
                await self._run(self._apply_migration, version, statements)
                current = version

    def _bootstrap(self, txn: Any) -> int:
        """Create the version table if needed; return the version on disk."""
        self._execute(
            txn,
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " id INTEGER PRIMARY KEY CHECK (id = 1),"
            " version INTEGER NOT NULL)",
        )
        self._execute(txn, "SELECT version FROM schema_version WHERE id = 1")
        row = txn.fetchone()
        if row is not None:
            return int(row[0])
        try:
            self._execute(txn, "INSERT INTO schema_version (id, version) VALUES (1, 0)")
        except Exception as e:
            if not self._is_integrity_error(e):
                raise
            # Another process created the row between our SELECT and
            # INSERT; the migrations below re-read it under the lock.
        return 0

    def _apply_migration(self, txn: Any, version: int, statements: list[str]) -> None:
        # Write the version row first: it takes the write lock (SQLite) or
        # the row lock (PostgreSQL), and in Python's sqlite3 the DML opens
        # the transaction that the DDL below then joins, so the step and
        # the version bump commit or roll back together.
        self._execute(txn, "UPDATE schema_version SET version = version WHERE id = 1")
        self._execute(txn, "SELECT version FROM schema_version WHERE id = 1")
        (current,) = txn.fetchone()
        if int(current) >= version:
            return  # another process applied it meanwhile
        for statement in statements:
            self._execute(txn, statement.format(**self.ddl_words))
        self._execute(txn, "UPDATE schema_version SET version = ? WHERE id = 1", (version,))
        self._log.info("applied store schema migration {version}", version=version)

    def close(self) -> Deferred[None]:
        if self._pool is None or self._closing:
            return defer.succeed(None)
        self._closing = True  # refuse new work; let work in flight finish
        waits = list(self._in_flight)
        if self._recording:  # and the records queued behind it
            drained: Deferred[None] = Deferred()
            self._records_drained.append(drained)
            waits.append(drained)

        def close_pool(_: object) -> None:
            assert self._pool is not None
            self._pool.close()
            self._pool = None
            self._closing = False

        d: Deferred[None] = defer.DeferredList(waits).addCallback(close_pool)
        return d

    # -- certificates

    def record_certificate(self, issued: IssuedCertificate) -> Deferred[None]:
        """Record ``issued``; fires once it is committed.

        Group commit: records arriving while a commit is in flight are
        written together in the next transaction, so concurrent
        enrollments share one transaction and one fsync, and each
        Deferred still fires only after its own row is on disk.
        """
        if self._pool is None or self._closing:
            return defer.fail(StoreNotRunning("the store is not started, or closed"))
        d: Deferred[None] = Deferred()
        self._records.append((issued, d))
        if not self._recording:
            self._write_records()
        return d

    def _write_records(self) -> None:
        batch, self._records = self._records, []
        self._recording = True

        def written(_: object) -> None:
            for _issued, d in batch:
                d.callback(None)

        def failed(failure: Any) -> Any:
            if len(batch) == 1:
                batch[0][1].errback(failure)
                return None
            # One bad row (a duplicate serial) must not fail the others:
            # each on its own, as without grouping.
            alone = [self._run_now(self._insert_certificates, [issued]) for issued, _d in batch]
            for (_issued, d), result in zip(batch, alone):
                result.chainDeferred(d)
            return defer.DeferredList(alone)

        def next_batch(_: object) -> None:
            self._recording = False
            if self._records:
                self._write_records()
                return
            waiting, self._records_drained = self._records_drained, []
            for d in waiting:
                d.callback(None)

        self._run_now(self._insert_certificates, [issued for issued, _d in batch]).addCallbacks(
            written, failed
        ).addBoth(next_batch)

    def _insert_certificates(self, txn: Any, records: list[IssuedCertificate]) -> None:
        for issued in records:
            try:
                self._execute(
                    txn,
                    f"INSERT INTO certificates ({_CERT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        _serial_text(issued.serial),
                        issued.subject,
                        json.dumps(list(issued.sans)),
                        _time_text(issued.not_before),
                        _time_text(issued.not_after),
                        issued.public_key_sha256,
                        issued.handler,
                        issued.requester,
                        issued.der,
                        _time_text(issued.issued_at),
                        None if issued.revoked_at is None else _time_text(issued.revoked_at),
                        issued.revocation_reason,
                        None if issued.invalidity_date is None else _time_text(issued.invalidity_date),
                    ),
                )
            except Exception as e:
                if self._is_integrity_error(e):
                    raise DuplicateCertificate(f"serial {issued.serial:x} is already recorded") from e
                raise

    def _select_certificate(self, txn: Any, serial: int) -> IssuedCertificate | None:
        self._execute(
            txn,
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?",
            (_serial_text(serial),),
        )
        row = txn.fetchone()
        return None if row is None else _certificate_from_row(row)

    def get_certificate(self, serial: int) -> Deferred[IssuedCertificate | None]:
        return self._run(self._select_certificate, serial)

    def list_certificates(self, subject: str | None = None) -> Deferred[list[IssuedCertificate]]:
        def interaction(txn: Any) -> list[IssuedCertificate]:
            if subject is None:
                self._execute(
                    txn,
                    f"SELECT {_CERT_COLUMNS} FROM certificates"
                    " ORDER BY issued_at DESC, id DESC",
                )
            else:
                self._execute(
                    txn,
                    f"SELECT {_CERT_COLUMNS} FROM certificates WHERE subject = ?"
                    " ORDER BY issued_at DESC, id DESC",
                    (subject,),
                )
            return [_certificate_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def revoke_certificate(
        self,
        serial: int,
        reason: str = "unspecified",
        when: datetime | None = None,
        invalidity_date: datetime | None = None,
    ) -> Deferred[IssuedCertificate]:
        if reason not in REVOCATION_REASONS:
            return defer.fail(
                ValueError(
                    f"unknown revocation reason {reason!r};"
                    f" use one of {', '.join(sorted(REVOCATION_REASONS))}"
                )
            )
        try:
            at = self._now() if when is None else when
            revoked_at = _time_text(at)
            invalid_since = None if invalidity_date is None else _time_text(invalidity_date)
        except ValueError as e:
            return defer.fail(e)
        if invalidity_date is not None and invalidity_date > at:
            return defer.fail(
                ValueError(
                    f"the invalidity date {invalidity_date.isoformat()} is after the revocation"
                    f" ({at.isoformat()}); it says since when the key is suspect"
                )
            )

        def interaction(txn: Any) -> IssuedCertificate:
            # "IS NULL": the first revocation's date and reason stand, which
            # is what every CRL already published says.
            self._execute(
                txn,
                "UPDATE certificates SET revoked_at = ?, revocation_reason = ?, invalidity_date = ?"
                " WHERE serial = ? AND revoked_at IS NULL",
                (revoked_at, reason, invalid_since, _serial_text(serial)),
            )
            issued = self._select_certificate(txn, serial)
            if issued is None:
                raise UnknownCertificate(f"no certificate with serial {_serial_text(serial)}")
            return issued

        return self._run(interaction)

    def is_revoked(self, serial: int) -> Deferred[bool]:
        def interaction(txn: Any) -> bool:
            self._execute(
                txn,
                "SELECT revoked_at FROM certificates WHERE serial = ?",
                (_serial_text(serial),),
            )
            row = txn.fetchone()
            return row is not None and row[0] is not None

        return self._run(interaction)

    def last_issued_for_subject(self, subject: str) -> Deferred[IssuedCertificate | None]:
        def interaction(txn: Any) -> IssuedCertificate | None:
            self._execute(
                txn,
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE subject = ?"
                " ORDER BY issued_at DESC, id DESC LIMIT 1",
                (subject,),
            )
            row = txn.fetchone()
            return None if row is None else _certificate_from_row(row)

        return self._run(interaction)

    def certificates_for_public_key(self, public_key_sha256: str) -> Deferred[list[IssuedCertificate]]:
        def interaction(txn: Any) -> list[IssuedCertificate]:
            self._execute(
                txn,
                f"SELECT {_CERT_COLUMNS} FROM certificates WHERE public_key_sha256 = ?"
                " ORDER BY issued_at DESC, id DESC",
                (public_key_sha256,),
            )
            return [_certificate_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def add_audit(self, at: datetime, operator: str, action: str, target: str, details: str) -> Deferred[None]:
        def interaction(txn: Any) -> None:
            self._execute(
                txn,
                "INSERT INTO audit (at, operator, action, target, details) VALUES (?, ?, ?, ?, ?)",
                (_time_text(at), operator, action, target, details),
            )

        return self._run(interaction)

    def list_audit(self, limit: int = 100) -> Deferred[list[AuditEntry]]:
        def interaction(txn: Any) -> list[AuditEntry]:
            self._execute(
                txn, "SELECT at, operator, action, target, details FROM audit ORDER BY id DESC LIMIT ?", (limit,)
            )
            rows = txn.fetchall()
            return [AuditEntry(_parse_time(r[0]), r[1], r[2], r[3], r[4]) for r in reversed(rows)]

        return self._run(interaction)

    def count_expiring(self, after: datetime, before: datetime) -> Deferred[int]:
        def interaction(txn: Any) -> int:
            self._execute(
                txn,
                "SELECT COUNT(*) FROM certificates"
                " WHERE revoked_at IS NULL AND not_after > ? AND not_after <= ?",
                (_time_text(after), _time_text(before)),
            )
            return int(txn.fetchone()[0])

        return self._run(interaction)

    def count_certificates(self) -> Deferred[int]:
        def interaction(txn: Any) -> int:
            self._execute(txn, "SELECT COUNT(*) FROM certificates")
            return int(txn.fetchone()[0])

        return self._run(interaction)

    # -- devices

    def add_device(self, device: Device) -> Deferred[None]:
        created_at = device.created_at if device.created_at is not None else self._now()

        def interaction(txn: Any) -> None:
            if device.factory_cert_sha256 is not None:
                # Asked first so the operator learns which device has it;
                # the unique index still guards against a racing writer.
                self._execute(
                    txn,
                    "SELECT device_id FROM devices WHERE factory_cert_sha256 = ?",
                    (device.factory_cert_sha256,),
                )
                row = txn.fetchone()
                if row is not None:
                    raise DuplicateFactoryCertificate(
                        f"the factory certificate is already registered to device {row[0]!r}"
                    )
            try:
                self._execute(
                    txn,
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        device.device_id,
                        device.password_hash,
                        1 if device.single_use else 0,  # INTEGER on both databases
                        _time_text(created_at),
                        None if device.consumed_at is None else _time_text(device.consumed_at),
                        device.factory_cert_sha256,
                        device.factory_cn,
                        # Pairs, not an object: a name may be registered twice (two DNS names).
                        json.dumps([list(pair) for pair in device.subject_values]) if device.subject_values else None,
                        json.dumps(dict(device.digest_ha1)) if device.digest_ha1 else None,
                    ),
                )
            except Exception as e:
                if self._is_integrity_error(e):
                    raise DuplicateDevice(f"device {device.device_id!r} is already registered") from e
                raise

        return self._run(interaction)

    def get_device(self, device_id: str) -> Deferred[Device | None]:
        def interaction(txn: Any) -> Device | None:
            self._execute(
                txn,
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?",
                (device_id,),
            )
            row = txn.fetchone()
            return None if row is None else _device_from_row(row)

        return self._run(interaction)

    def list_devices(self) -> Deferred[list[Device]]:
        def interaction(txn: Any) -> list[Device]:
            self._execute(txn, f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")
            return [_device_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def set_device_password(
        self, device_id: str, password_hash: str, digest_ha1: tuple[tuple[str, str], ...] = ()
    ) -> Deferred[bool]:
        def interaction(txn: Any) -> bool:
            self._execute(
                txn,
                "UPDATE devices SET password_hash = ?, digest_ha1 = ? WHERE device_id = ?",
                (password_hash, json.dumps(dict(digest_ha1)) if digest_ha1 else None, device_id),
            )
            return bool(txn.rowcount > 0)

        return self._run(interaction)

    def remove_device(self, device_id: str) -> Deferred[bool]:
        def interaction(txn: Any) -> bool:
            self._execute(txn, "DELETE FROM devices WHERE device_id = ?", (device_id,))
            return bool(txn.rowcount > 0)

        return self._run(interaction)

    def consume_device(self, device_id: str, when: datetime | None = None) -> Deferred[bool]:
        try:
            consumed_at = _time_text(self._now() if when is None else when)
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> bool:
            # One conditional UPDATE, not a SELECT then an UPDATE: of two
            # racing calls (even from two processes) exactly one matches.
            self._execute(
                txn,
                "UPDATE devices SET consumed_at = ?"
                " WHERE device_id = ? AND single_use = 1 AND consumed_at IS NULL",
                (consumed_at, device_id),
            )
            return bool(txn.rowcount == 1)

        return self._run(interaction)

    def release_device(self, device_id: str, consumed_at: datetime) -> Deferred[bool]:
        try:
            when = _time_text(consumed_at)
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> bool:
            # Only the claim this caller made (same timestamp) is undone.
            self._execute(
                txn,
                "UPDATE devices SET consumed_at = NULL WHERE device_id = ? AND consumed_at = ?",
                (device_id, when),
            )
            return bool(txn.rowcount == 1)

        return self._run(interaction)

    def get_device_by_factory_cert(self, fingerprint: str) -> Deferred[Device | None]:
        def interaction(txn: Any) -> Device | None:
            self._execute(
                txn,
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE factory_cert_sha256 = ?",
                (fingerprint.lower(),),
            )
            row = txn.fetchone()
            return None if row is None else _device_from_row(row)

        return self._run(interaction)

    # -- officer roles

    def add_officer_role(self, role: OfficerRole) -> Deferred[bool]:
        granted_at = role.granted_at if role.granted_at is not None else self._now()

        def interaction(txn: Any) -> bool:
            self._execute(
                txn,
                "SELECT 1 FROM officer_roles WHERE fingerprint = ? AND role = ?",
                (role.fingerprint, role.role),
            )
            if txn.fetchone() is not None:
                return False
            try:
                self._execute(
                    txn,
                    f"INSERT INTO officer_roles ({_OFFICER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        role.fingerprint,
                        role.role,
                        role.subject,
                        role.issuer,
                        _serial_text(role.serial),
                        _time_text(granted_at),
                    ),
                )
            except Exception as e:
                if self._is_integrity_error(e):
                    return False  # granted by another process meanwhile
                raise
            return True

        return self._run(interaction)

    def officer_roles(self, fingerprint: str) -> Deferred[tuple[str, ...]]:
        def interaction(txn: Any) -> tuple[str, ...]:
            self._execute(
                txn,
                "SELECT role FROM officer_roles WHERE fingerprint = ? ORDER BY role",
                (fingerprint.lower(),),
            )
            return tuple(row[0] for row in txn.fetchall())

        return self._run(interaction)

    def list_officer_roles(self) -> Deferred[list[OfficerRole]]:
        def interaction(txn: Any) -> list[OfficerRole]:
            self._execute(
                txn,
                f"SELECT {_OFFICER_COLUMNS} FROM officer_roles ORDER BY subject, fingerprint, role",
            )
            return [_officer_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def remove_officer_roles(self, fingerprint: str, role: str | None = None) -> Deferred[int]:
        def interaction(txn: Any) -> int:
            if role is None:
                self._execute(txn, "DELETE FROM officer_roles WHERE fingerprint = ?", (fingerprint.lower(),))
            else:
                self._execute(
                    txn,
                    "DELETE FROM officer_roles WHERE fingerprint = ? AND role = ?",
                    (fingerprint.lower(), role),
                )
            return int(txn.rowcount)

        return self._run(interaction)

    # -- approvals: every state change is one conditional UPDATE,
    # so of two racing callers (threads or processes) exactly one wins.

    def _select_approval(self, txn: Any, request_id: str) -> Approval | None:
        self._execute(
            txn, f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE request_id = ?", (request_id,)
        )
        row = txn.fetchone()
        return None if row is None else _approval_from_row(row)

    def _select_live_approval(self, txn: Any, key: tuple[str, str, str]) -> Approval | None:
        self._execute(
            txn,
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals"
            " WHERE handler = ? AND public_key_sha256 = ? AND subject = ?"
            " AND state IN ('pending', 'approved')",
            key,
        )
        row = txn.fetchone()
        return None if row is None else _approval_from_row(row)

    def add_approval(self, approval: Approval) -> Deferred[Approval]:
        def interaction(txn: Any) -> Approval:
            live = self._select_live_approval(txn, approval.key)
            if live is not None:
                return live
            self._execute(
                txn,
                f"INSERT INTO approvals ({_APPROVAL_COLUMNS})"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                _approval_params(approval),
            )
            return approval

        def lost_race(failure: Any) -> Any:
            # Another process inserted a live request for this key between
            # our SELECT and INSERT (the unique index refused ours): use it.
            if not self._is_integrity_error(failure.value):
                return failure
            d = self._run(self._select_live_approval, approval.key)
            return d.addCallback(lambda live: failure if live is None else live)

        return self._run(interaction).addErrback(lost_race)

    def find_approval(
        self, handler: str, public_key_sha256: str, subject: str
    ) -> Deferred[Approval | None]:
        def interaction(txn: Any) -> Approval | None:
            self._execute(
                txn,
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals"
                " WHERE handler = ? AND public_key_sha256 = ? AND subject = ?"
                " ORDER BY id DESC LIMIT 1",
                (handler, public_key_sha256, subject),
            )
            row = txn.fetchone()
            return None if row is None else _approval_from_row(row)

        return self._run(interaction)

    def get_approval(self, request_id: str) -> Deferred[Approval | None]:
        return self._run(self._select_approval, request_id)

    def list_approvals(self, state: str | None = None) -> Deferred[list[Approval]]:
        def interaction(txn: Any) -> list[Approval]:
            query = f"SELECT {_APPROVAL_COLUMNS} FROM approvals"
            params: tuple[str, ...] = ()
            if state is not None:
                query += " WHERE state = ?"
                params = (state,)
            self._execute(txn, query + " ORDER BY id DESC", params)
            return [_approval_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def set_approval_submitted(self, request_id: str, when: datetime | None) -> Deferred[None]:
        try:
            submitted_at = _optional_time_text(when)
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> None:
            self._execute(
                txn,
                "UPDATE approvals SET submitted_at = ? WHERE request_id = ?",
                (submitted_at, request_id),
            )

        return self._run(interaction)

    def decide_approval(
        self,
        request_id: str,
        state: str,
        reason: str | None,
        expires_at: datetime,
        when: datetime | None = None,
    ) -> Deferred[Approval | None]:
        if state not in ("approved", "rejected"):
            return defer.fail(ValueError(f"a decision is approved or rejected, not {state!r}"))
        try:
            decided_at = _time_text(self._now() if when is None else when)
            params = (state, reason, decided_at, _time_text(expires_at), request_id)
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> Approval | None:
            self._execute(
                txn,
                "UPDATE approvals SET state = ?, reason = ?, decided_at = ?, expires_at = ?"
                " WHERE request_id = ? AND state = 'pending'",
                params,
            )
            return self._select_approval(txn, request_id)

        return self._run(interaction)

    def expire_approval(self, request_id: str, when: datetime | None = None) -> Deferred[bool]:
        try:
            decided_at = _time_text(self._now() if when is None else when)
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> bool:
            self._execute(
                txn,
                "UPDATE approvals SET state = 'expired', decided_at = ?"
                " WHERE request_id = ? AND state IN ('pending', 'approved')",
                (decided_at, request_id),
            )
            return bool(txn.rowcount == 1)

        return self._run(interaction)

    def issue_approved(self, request_id: str, issued: IssuedCertificate) -> Deferred[bool]:
        def interaction(txn: Any) -> bool:
            self._execute(
                txn,
                "UPDATE approvals SET state = 'issued', serial = ?"
                " WHERE request_id = ? AND state = 'approved'",
                (_serial_text(issued.serial), request_id),
            )
            if txn.rowcount != 1:
                return False
            try:
                self._execute(
                    txn,
                    f"INSERT INTO certificates ({_CERT_COLUMNS})"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        _serial_text(issued.serial),
                        issued.subject,
                        json.dumps(list(issued.sans)),
                        _time_text(issued.not_before),
                        _time_text(issued.not_after),
                        issued.public_key_sha256,
                        issued.handler,
                        issued.requester,
                        issued.der,
                        _time_text(issued.issued_at),
                        _optional_time_text(issued.revoked_at),
                        issued.revocation_reason,
                        None if issued.invalidity_date is None else _time_text(issued.invalidity_date),
                    ),
                )
            except Exception as e:
                # Raising rolls the state change back with it.
                if self._is_integrity_error(e):
                    raise DuplicateCertificate(f"serial {issued.serial:x} is already recorded") from e
                raise
            return True

        return self._run(interaction)


class SQLiteStore(_SQLStore):
    """
    :class:`IStore` in one SQLite file, through one pooled connection
    (SQLite serialises writers anyway).  WAL journal so readers in other
    processes (the CLI) do not block the gateway; ``synchronous=FULL`` so a
    committed certificate survives a power cut.

    ``path`` must be a file: ``":memory:"`` would give every pool
    connection its own empty database.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        if path == ":memory:" or path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file path, not an in-memory database")
        super().__init__(reactor)
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    @staticmethod
    def _open(connection: Any) -> None:
        # Per connection: PRAGMAs are not stored in the file (except
        # journal_mode, which is set again harmlessly).
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    def _make_pool(self) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,  # the pool closes it from the reactor thread
            cp_min=1,
            cp_max=1,
            cp_openfun=self._open,
            cp_reactor=self._reactor,
            # A connection that failed is replaced by a new one for the next call.
            cp_reconnect=True,
        )
