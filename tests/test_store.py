"""Tests for estgw.store: real SQLite files, a real PostgreSQL server, real
certificates.

The tests of the interface run against both backends: each class below
runs on SQLite, and its ``PostgreSQL...`` twin (at the end) runs the same
tests on a PostgreSQL database of its own (tests/postgresql.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import sqlite3
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID
from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from estgw.passwords import hash_password
from estgw.store.migrations import TABLE_KEYS
from tests import postgresql
from estgw.store import (
    DIGEST_NONCE_GRACE,
    DIGEST_NONCE_PURGE,
    MAX_DIGEST_NONCE,
    FAULT_FULL,
    FAULT_LOCKED,
    FAULT_OTHER,
    FAULT_READ_ONLY,
    FAULT_UNREACHABLE,
    MIGRATIONS,
    Approval,
    CertificateFilter,
    CertificatePage,
    Device,
    NotLastIssued,
    iterate_certificates,
    open_store,
    redact_url,
    DuplicateCertificate,
    DuplicateDevice,
    IssuedCertificate,
    IStore,
    SQLiteStore,
    StoreNotRunning,
    StoreUnavailable,
    UnknownCertificate,
    UnsupportedSchemaVersion,
    _SQLStore,
)

UTC = timezone.utc
T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)

# One issuer key for the module: EC keys are cheap, but there is no need
# to make one per certificate.
_ISSUER_KEY = ec.generate_private_key(ec.SECP256R1())
_ISSUER = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "estgw test CA")])


def make_certificate(
    cn: str = "pump-17",
    serial: int | None = None,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A certificate for ``cn`` signed by the module's test issuer."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.COMMON_NAME, cn),
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
                ]
            )
        )
        .issuer_name(_ISSUER)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number() if serial is None else serial)
        .not_valid_before(T0)
        .not_valid_after(T0 + timedelta(days=365))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_ISSUER_KEY, hashes.SHA256())


def issued(
    cn: str = "pump-17",
    serial: int | None = None,
    issued_at: datetime = T0,
    handler: str = "1",
) -> IssuedCertificate:
    return IssuedCertificate.from_certificate(
        make_certificate(cn, serial), handler, f"device:{cn}", issued_at
    )


class _ClockedReactor:
    """The real reactor, but with a fixed seconds(): the store's "now"."""

    def __init__(self, now: datetime) -> None:
        from twisted.internet import reactor

        self._reactor = reactor
        self._now = now.timestamp()

    def seconds(self) -> float:
        return self._now

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


class StoreTestCase(unittest.TestCase):
    """Runs on SQLite; :class:`OnPostgreSQL` moves a subclass to PostgreSQL."""

    store_class: type[_SQLStore] = SQLiteStore
    database_error: type[Exception] = sqlite3.Error

    def setUp(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        self.path = os.path.join(base, "state.sqlite")

    async def location(self) -> str:
        """What the store class opens: the file (or, on PostgreSQL, the URL)."""
        return self.path

    async def open_store(self, cls: type[_SQLStore] | None = None, **kwargs: Any) -> Any:
        """A started store on self.location(), closed when the test ends."""
        store = (cls or self.store_class)(await self.location(), **kwargs)
        await store.start()
        self.addCleanup(store.close)
        return store

    def on_disk(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read (or change) the database with a connection of our own, not the store's."""
        connection = sqlite3.connect(self.path)
        try:
            rows = connection.execute(query, params).fetchall()
            connection.commit()
            return rows
        finally:
            connection.close()

    def table_exists(self, name: str) -> bool:
        return bool(self.on_disk("SELECT name FROM sqlite_master WHERE name = ?", (name,)))


class OnPostgreSQL:
    """Mixed in before a StoreTestCase subclass: the same tests on a fresh
    PostgreSQL database."""

    _url: str | None = None

    @property
    def store_class(self) -> Any:  # type: ignore[override]
        from estgw.store.postgresql import PostgreSQLStore

        return PostgreSQLStore

    @property
    def database_error(self) -> Any:  # type: ignore[override]
        import psycopg

        return psycopg.Error

    async def location(self) -> str:
        if self._url is None:
            self._url = await postgresql.new_database(self)
        return self._url

    def on_disk(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._url is not None
        return postgresql.query(self._url, query.replace("?", "%s"), params)

    def table_exists(self, name: str) -> bool:
        return bool(self.on_disk("SELECT table_name FROM information_schema.tables WHERE table_name = ?", (name,)))


class CertificateTests(StoreTestCase):
    async def test_round_trip(self) -> None:
        """
        A certificate made by cryptography is recorded and read back equal,
        field by field, with its DER intact.
        """
        cert = make_certificate(
            sans=[
                x509.DNSName("pump-17.example"),
                x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
                x509.RFC822Name("ops@example.com"),
                x509.UniformResourceIdentifier("urn:dev:pump-17"),
            ]
        )
        record = IssuedCertificate.from_certificate(cert, "1", "device:pump-17", T0)
        store = await self.open_store()
        await store.record_certificate(record)
        got = await store.get_certificate(cert.serial_number)
        self.assertEqual(got, record)
        self.assertEqual(got.certificate, cert)
        self.assertFalse(got.revoked)
        self.assertEqual(await store.count_certificates(), 1)

    def test_from_certificate(self) -> None:
        """
        from_certificate reads subject, SANs in certificate order with their
        type prefixes, UTC validity and the SPKI SHA-256.
        """
        cert = make_certificate(
            "meter-1",
            sans=[
                x509.UniformResourceIdentifier("urn:x"),
                x509.DNSName("b.example"),
                x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
                x509.DNSName("a.example"),
                x509.RFC822Name("m@example.com"),
            ],
        )
        record = IssuedCertificate.from_certificate(cert, "2", "cert:CN=ra", T0)
        self.assertEqual(record.subject, "O=Example,CN=meter-1")
        self.assertEqual(
            record.sans,
            ("URI:urn:x", "DNS:b.example", "IP:2001:db8::1", "DNS:a.example", "email:m@example.com"),
        )
        self.assertEqual(record.not_before, T0)
        self.assertEqual(record.not_after, T0 + timedelta(days=365))
        self.assertEqual(record.not_before.utcoffset(), timedelta(0))
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        self.assertEqual(record.public_key_sha256, hashlib.sha256(spki).hexdigest())
        self.assertEqual((record.handler, record.requester, record.issued_at), ("2", "cert:CN=ra", T0))
        self.assertEqual(record.der, cert.public_bytes(Encoding.DER))

    def test_from_certificate_without_sans_and_default_issued_at(self) -> None:
        """
        No SAN extension gives an empty tuple; issued_at defaults to now in
        UTC.
        """
        before = datetime.now(UTC)
        record = IssuedCertificate.from_certificate(make_certificate(), "1", "device:x")
        self.assertEqual(record.sans, ())
        self.assertTrue(before <= record.issued_at <= datetime.now(UTC))

    def test_naive_datetimes_refused(self) -> None:
        """
        A naive datetime is refused rather than stored as if it were UTC.
        """
        record = issued()
        with self.assertRaises(ValueError):
            attr.evolve(record, issued_at=datetime(2025, 1, 1))
        with self.assertRaises(ValueError):
            Device("d", None, created_at=datetime(2025, 1, 1))

    async def test_twenty_octet_serial(self) -> None:
        """
        A 159-bit serial (20 DER octets, the RFC 5280 maximum) survives the
        round trip, is stored as hex text, and can be revoked and checked.
        """
        serial = (1 << 158) | int.from_bytes(os.urandom(19), "big")
        cert = make_certificate(serial=serial)
        self.assertEqual(serial.bit_length(), 159)  # 20 octets, no sign padding
        store = await self.open_store()
        await store.record_certificate(IssuedCertificate.from_certificate(cert, "1", "device:x", T0))
        got = await store.get_certificate(serial)
        self.assertEqual(got.serial, serial)
        self.assertEqual(got.certificate.serial_number, serial)
        self.assertEqual(self.on_disk("SELECT serial FROM certificates"), [(format(serial, "x"),)])
        self.assertFalse(await store.is_revoked(serial))
        await store.revoke_certificate(serial, "keyCompromise", T0)
        self.assertTrue(await store.is_revoked(serial))
        # A serial differing only in its low bit is another certificate.
        self.assertIsNone(await store.get_certificate(serial ^ 1))

    async def test_get_unknown(self) -> None:
        """get_certificate of a serial never recorded is None."""
        store = await self.open_store()
        self.assertIsNone(await store.get_certificate(12345))

    async def test_duplicate_serial(self) -> None:
        """
        Recording a serial twice fails with DuplicateCertificate and keeps
        the first record.
        """
        store = await self.open_store()
        first = issued("a", serial=77)
        await store.record_certificate(first)
        with self.assertRaises(DuplicateCertificate):
            await store.record_certificate(issued("b", serial=77))
        self.assertEqual(await store.get_certificate(77), first)
        self.assertEqual(await store.count_certificates(), 1)

    async def test_list_newest_first(self) -> None:
        """
        list_certificates orders by issued_at, newest first, whatever the
        insertion order.
        """
        store = await self.open_store()
        middle = issued("a", issued_at=T0 + timedelta(hours=1))
        oldest = issued("b", issued_at=T0)
        newest = issued("c", issued_at=T0 + timedelta(hours=2))
        for record in (middle, oldest, newest):
            await store.record_certificate(record)
        self.assertEqual(await store.list_certificates(), [newest, middle, oldest])

    async def test_list_by_subject(self) -> None:
        """
        list_certificates(subject) returns only that subject's certificates,
        newest first; an unknown subject gives an empty list.
        """
        store = await self.open_store()
        a1 = issued("a", issued_at=T0)
        b1 = issued("b", issued_at=T0 + timedelta(minutes=1))
        a2 = issued("a", issued_at=T0 + timedelta(minutes=2))
        for record in (a1, b1, a2):
            await store.record_certificate(record)
        self.assertEqual(await store.list_certificates("O=Example,CN=a"), [a2, a1])
        self.assertEqual(await store.list_certificates("O=Example,CN=b"), [b1])
        self.assertEqual(await store.list_certificates("CN=nobody"), [])
        self.assertEqual(await store.count_certificates(), 3)

    async def test_revoke(self) -> None:
        """
        revoke_certificate marks the certificate with date and reason,
        returns it, and is_revoked then says so; others stay unrevoked.
        """
        store = await self.open_store()
        target, other = issued("a", serial=1), issued("b", serial=2)
        await store.record_certificate(target)
        await store.record_certificate(other)
        when = T0 + timedelta(days=3)
        revoked = await store.revoke_certificate(1, "keyCompromise", when)
        self.assertEqual((revoked.serial, revoked.revoked_at, revoked.revocation_reason), (1, when, "keyCompromise"))
        self.assertTrue(revoked.revoked)
        self.assertTrue(await store.is_revoked(1))
        self.assertFalse(await store.is_revoked(2))
        self.assertEqual(await store.get_certificate(1), revoked)

    async def test_revoke_defaults(self) -> None:
        """
        Without arguments the reason is "unspecified" and the date is the
        reactor's now.
        """
        now = T0 + timedelta(days=10, microseconds=123)
        store = await self.open_store(reactor=_ClockedReactor(now))
        await store.record_certificate(issued(serial=5))
        revoked = await store.revoke_certificate(5)
        self.assertEqual((revoked.revoked_at, revoked.revocation_reason), (now, "unspecified"))

    async def test_revoke_unknown(self) -> None:
        """Revoking a serial that was never issued fails with UnknownCertificate."""
        store = await self.open_store()
        with self.assertRaises(UnknownCertificate):
            await store.revoke_certificate(999)
        self.assertFalse(await store.is_revoked(999))

    async def test_revoke_twice_keeps_first(self) -> None:
        """A second revocation keeps the first date and reason."""
        store = await self.open_store()
        await store.record_certificate(issued(serial=3))
        first = await store.revoke_certificate(3, "superseded", T0 + timedelta(days=1))
        second = await store.revoke_certificate(3, "keyCompromise", T0 + timedelta(days=2))
        self.assertEqual(second, first)
        self.assertEqual(second.revoked_at, T0 + timedelta(days=1))
        self.assertEqual(second.revocation_reason, "superseded")

    async def test_revoke_bad_reason(self) -> None:
        """
        A reason that is not an RFC 5280 CRLReason name is refused and
        nothing is revoked.
        """
        store = await self.open_store()
        await store.record_certificate(issued(serial=4))
        with self.assertRaises(ValueError):
            await store.revoke_certificate(4, "lost it")
        with self.assertRaises(ValueError):
            await store.revoke_certificate(4, "removeFromCRL")
        self.assertFalse(await store.is_revoked(4))

    async def test_is_revoked_unknown_and_negative(self) -> None:
        """
        is_revoked is False for a serial never issued here, including a
        negative one from a malformed foreign certificate.
        """
        store = await self.open_store()
        await store.record_certificate(issued(serial=0x10))
        await store.revoke_certificate(0x10)
        self.assertFalse(await store.is_revoked(0x11))
        self.assertFalse(await store.is_revoked(-0x10))

    async def test_last_issued_by_issued_at(self) -> None:
        """
        last_issued_for_subject picks the latest issued_at, even when it
        was recorded before an older one.
        """
        store = await self.open_store()
        newer = issued("a", issued_at=T0 + timedelta(days=1))
        older = issued("a", issued_at=T0)
        await store.record_certificate(newer)
        await store.record_certificate(older)
        await store.record_certificate(issued("b", issued_at=T0 + timedelta(days=5)))
        self.assertEqual(await store.last_issued_for_subject("O=Example,CN=a"), newer)

    async def test_last_issued_ties_by_insertion(self) -> None:
        """
        With equal issued_at, the certificate recorded last wins, whatever
        the serial numbers.
        """
        store = await self.open_store()
        first = issued("a", serial=900, issued_at=T0)
        second = issued("a", serial=100, issued_at=T0)
        await store.record_certificate(first)
        await store.record_certificate(second)
        self.assertEqual(await store.last_issued_for_subject("O=Example,CN=a"), second)
        self.assertEqual(await store.list_certificates("O=Example,CN=a"), [second, first])
        self.assertEqual(await store.list_certificates(), [second, first])

    async def test_last_issued_none(self) -> None:
        """last_issued_for_subject of a subject never seen is None."""
        store = await self.open_store()
        await store.record_certificate(issued("a"))
        self.assertIsNone(await store.last_issued_for_subject("O=Example,CN=b"))


class DeviceTests(StoreTestCase):
    async def test_add_and_get(self) -> None:
        """
        A device is read back as added; created_at, when not given, is the
        reactor's now.
        """
        now = T0 + timedelta(seconds=42)
        store = await self.open_store(reactor=_ClockedReactor(now))
        password_hash = hash_password("s3cret")
        await store.add_device(Device("pump-17", password_hash, single_use=True))
        got = await store.get_device("pump-17")
        self.assertEqual(got, Device("pump-17", password_hash, True, now, None))
        self.assertIsNone(await store.get_device("pump-18"))

    async def test_add_keeps_given_fields(self) -> None:
        """A device with no password and explicit dates is stored as given."""
        store = await self.open_store()
        device = Device("factory-1", None, False, T0, T0 + timedelta(hours=1))
        await store.add_device(device)
        self.assertEqual(await store.get_device("factory-1"), device)

    async def test_duplicate(self) -> None:
        """
        Adding an id twice fails with DuplicateDevice and keeps the first
        registration.
        """
        store = await self.open_store()
        first = Device("pump-17", "hash-1", created_at=T0)
        await store.add_device(first)
        with self.assertRaises(DuplicateDevice):
            await store.add_device(Device("pump-17", "hash-2", created_at=T0))
        self.assertEqual(await store.get_device("pump-17"), first)

    async def test_list(self) -> None:
        """list_devices returns every device, ordered by id."""
        store = await self.open_store()
        for device_id in ("c", "a", "b"):
            await store.add_device(Device(device_id, None, created_at=T0))
        self.assertEqual([d.device_id for d in await store.list_devices()], ["a", "b", "c"])

    async def test_remove(self) -> None:
        """remove_device is True once, then False; the device is gone."""
        store = await self.open_store()
        await store.add_device(Device("a", None, created_at=T0))
        await store.add_device(Device("b", None, created_at=T0))
        self.assertTrue(await store.remove_device("a"))
        self.assertFalse(await store.remove_device("a"))
        self.assertIsNone(await store.get_device("a"))
        self.assertEqual([d.device_id for d in await store.list_devices()], ["b"])

    async def test_consume_once(self) -> None:
        """
        consume_device is True the first time, sets consumed_at, and is
        False afterwards without moving the date.
        """
        store = await self.open_store()
        await store.add_device(Device("one-shot", "h", single_use=True, created_at=T0))
        when = T0 + timedelta(minutes=5)
        self.assertTrue(await store.consume_device("one-shot", when))
        self.assertFalse(await store.consume_device("one-shot", when + timedelta(minutes=1)))
        self.assertEqual((await store.get_device("one-shot")).consumed_at, when)

    async def test_consume_race(self) -> None:
        """
        Two consume calls fired before either is awaited: exactly one wins.
        """
        store = await self.open_store()
        await store.add_device(Device("one-shot", "h", single_use=True, created_at=T0))
        results = await defer.gatherResults(
            [store.consume_device("one-shot"), store.consume_device("one-shot")]
        )
        self.assertEqual(sorted(results), [False, True])

    async def test_consume_race_two_stores(self) -> None:
        """
        Two stores (two connections, as two gateway processes would have)
        on one file racing to consume: exactly one wins.
        """
        store = await self.open_store()
        other = await self.open_store()
        await store.add_device(Device("one-shot", "h", single_use=True, created_at=T0))
        calls = [s.consume_device("one-shot") for _ in range(5) for s in (store, other)]
        results = await defer.gatherResults(calls)
        self.assertEqual(results.count(True), 1)

    async def test_consume_not_single_use_or_unknown(self) -> None:
        """
        A device that is not single-use is never consumed, and an unknown
        id is not either.
        """
        store = await self.open_store()
        await store.add_device(Device("multi", "h", single_use=False, created_at=T0))
        self.assertFalse(await store.consume_device("multi"))
        self.assertIsNone((await store.get_device("multi")).consumed_at)
        self.assertFalse(await store.consume_device("nobody"))


class SchemaTests(StoreTestCase):
    async def test_version_persists(self) -> None:
        """
        A new file gets the newest schema version in a single row;
        reopening applies no migration again and the version stays.
        """
        newest = MIGRATIONS[-1][0]
        store = self.store_class(await self.location())
        await store.start()
        await store.close()
        self.assertEqual(self.on_disk("SELECT id, version FROM schema_version"), [(1, newest)])
        store = await self.open_store()
        self.assertEqual(await store.count_certificates(), 0)
        self.assertEqual(self.on_disk("SELECT id, version FROM schema_version"), [(1, newest)])
        self.assertEqual(SQLiteStore.SCHEMA_VERSION, MIGRATIONS[-1][0])

    async def test_concurrent_starts(self) -> None:
        """
        Four stores (as four gateway processes) started at once on a new
        database: every start succeeds, each migration is applied once,
        and all four work on the one schema.
        """
        location = await self.location()
        stores = [self.store_class(location) for _ in range(4)]
        for store in stores:
            self.addCleanup(store.close)
        await defer.gatherResults([store.start() for store in stores])
        self.assertEqual(self.on_disk("SELECT id, version FROM schema_version"), [(1, MIGRATIONS[-1][0])])
        await stores[0].record_certificate(issued(serial=1))
        self.assertEqual([await s.count_certificates() for s in stores], [1, 1, 1, 1])

    async def test_too_new_version_refused(self) -> None:
        """
        A file written by a newer estgw (higher schema version) refuses to
        open with a clear exception and leaves the file as it was.
        """
        store = self.store_class(await self.location())
        await store.start()
        await store.close()
        self.on_disk("UPDATE schema_version SET version = 99")
        store = self.store_class(await self.location())
        with self.assertRaises(UnsupportedSchemaVersion) as caught:
            await store.start()
        self.assertIn("99", str(caught.exception))
        self.assertIn("upgrade estgw", str(caught.exception))
        self.assertEqual(self.on_disk("SELECT version FROM schema_version"), [(99,)])
        # The failed start released its pool: the store refuses work.
        with self.assertRaises(StoreNotRunning):
            await store.count_certificates()

    async def test_migrates_older_database(self) -> None:
        """
        A file of the current version opened by code that knows one more
        version is migrated, keeping its data.
        """
        following = self.store_class.SCHEMA_VERSION + 1
        store = self.store_class(await self.location())
        await store.start()
        await store.record_certificate(issued(serial=8))
        await store.close()

        class NextStore(self.store_class):  # type: ignore[name-defined,misc]
            SCHEMA_VERSION = following
            migrations = MIGRATIONS + [(following, ["CREATE TABLE pending (id TEXT PRIMARY KEY)"])]

        store = await self.open_store(NextStore)
        self.assertEqual(self.on_disk("SELECT version FROM schema_version"), [(following,)])
        self.assertEqual(self.on_disk("SELECT COUNT(*) FROM pending"), [(0,)])
        self.assertEqual((await store.get_certificate(8)).serial, 8)

    async def test_failed_migration_rolls_back(self) -> None:
        """
        A migration step that fails half-way leaves neither its first
        statements nor a version bump behind; the file still opens.
        """
        store = self.store_class(await self.location())
        await store.start()
        await store.close()

        current = self.store_class.SCHEMA_VERSION

        class BrokenStore(self.store_class):  # type: ignore[name-defined,misc]
            SCHEMA_VERSION = current + 1
            migrations = MIGRATIONS + [
                (current + 1, ["CREATE TABLE half (id TEXT)", "CREATE TABLE certificates (x TEXT)"])
            ]

        with self.assertRaises(StoreUnavailable) as caught:
            await BrokenStore(await self.location()).start()
        self.assertIsInstance(caught.exception.__cause__, self.database_error)
        self.assertEqual(self.on_disk("SELECT version FROM schema_version"), [(current,)])
        self.assertFalse(self.table_exists("half"))
        store = await self.open_store()
        self.assertEqual(await store.count_certificates(), 0)

class LifecycleTests(StoreTestCase):
    async def test_provides_istore(self) -> None:
        """The store provides every method of IStore."""
        store = await self.open_store()
        self.assertTrue(verifyObject(IStore, store))

    async def test_not_started_or_closed(self) -> None:
        """
        Operations before start() and after close() fail with
        StoreNotRunning; closing twice is harmless.
        """
        store = self.store_class(await self.location())
        with self.assertRaises(StoreNotRunning):
            await store.get_device("x")
        await store.start()
        await store.close()
        await store.close()
        with self.assertRaises(StoreNotRunning):
            await store.count_certificates()

    async def test_close_waits_for_work_in_flight(self) -> None:
        """
        close() called while a write is running lets it commit before the
        pool stops, and fires only after it.
        """
        store = self.store_class(await self.location())
        await store.start()
        write = store.record_certificate(issued(serial=11))
        closed = store.close()
        # close() waits in the reactor rather than joining the pool thread
        # (which would block the reactor until the queue drained).
        self.assertNoResult(closed)
        await write
        await closed
        self.assertEqual(self.on_disk("SELECT serial FROM certificates"), [("b",)])

    async def test_committed_before_deferred_fires(self) -> None:
        """
        Once a write's Deferred fires, another connection already sees the
        row: it is committed, not waiting in an open transaction.
        """
        store = await self.open_store()
        await store.record_certificate(issued(serial=0xABC))
        await store.add_device(Device("d", None, created_at=T0))
        self.assertEqual(self.on_disk("SELECT serial FROM certificates"), [("abc",)])
        self.assertEqual(self.on_disk("SELECT device_id FROM devices"), [("d",)])

    async def test_survives_reopen(self) -> None:
        """
        Certificates, revocations and devices written by one store are all
        there for the next store opened on the same file.
        """
        store = self.store_class(await self.location())
        await store.start()
        record = issued(serial=0xFEED)
        await store.record_certificate(record)
        revoked = await store.revoke_certificate(0xFEED, "superseded", T0 + timedelta(days=1))
        device = Device("pump-17", hash_password("pw"), True, T0)
        await store.add_device(device)
        await store.consume_device("pump-17", T0 + timedelta(hours=1))
        await store.close()

        store = await self.open_store()
        self.assertEqual(await store.get_certificate(0xFEED), revoked)
        self.assertTrue(await store.is_revoked(0xFEED))
        self.assertEqual(await store.list_certificates(), [revoked])
        got = await store.get_device("pump-17")
        self.assertEqual(got.password_hash, device.password_hash)
        self.assertEqual(got.consumed_at, T0 + timedelta(hours=1))


class SQLiteTests(StoreTestCase):
    """What only the SQLite backend has."""

    def test_memory_path_refused(self) -> None:
        """":memory:" cannot back a pool (one database per connection)."""
        with self.assertRaises(ValueError):
            SQLiteStore(":memory:")

    async def test_connection_pragmas(self) -> None:
        """
        The store's connection runs in WAL mode with synchronous=FULL and
        foreign keys enforced.
        """
        store = await self.open_store()

        def pragmas(txn: Any) -> list[Any]:
            values = []
            for name in ("journal_mode", "synchronous", "foreign_keys"):
                txn.execute(f"PRAGMA {name}")
                values.append(txn.fetchone()[0])
            return values

        self.assertEqual(await store._run(pragmas), ["wal", 2, 1])

    def test_paramstyle_isolated(self) -> None:
        """
        Queries are written with "?" and rewritten in one place for a
        driver using the "format" paramstyle (psycopg).
        """

        class FormatStore(SQLiteStore):
            paramstyle = "format"

        query = "SELECT 1 FROM devices WHERE device_id = ? AND consumed_at IS NULL"
        self.assertEqual(SQLiteStore(self.path)._sql(query), query)
        self.assertEqual(
            FormatStore(self.path)._sql(query),
            "SELECT 1 FROM devices WHERE device_id = %s AND consumed_at IS NULL",
        )


class PagingTests(StoreTestCase):
    async def fill(self, store: Any) -> list[IssuedCertificate]:
        """23 certificates of 3 subjects, some at the same instant, some
        revoked; returned newest first as list_certificates orders them."""
        for i in range(23):
            # Ties: every third instant is shared by two certificates.
            record = issued(f"s{i % 3}", issued_at=T0 + timedelta(seconds=i // 2))
            await store.record_certificate(record)
            if i % 4 == 1:
                await store.revoke_certificate(record.serial, "superseded", T0 + timedelta(days=1))
        return await store.list_certificates()

    async def pages(self, store: Any, limit: int, **kwargs: Any) -> list[CertificatePage]:
        pages, after = [], None
        for _ in range(100):  # bounded
            page = await store.certificate_page(after, limit, **kwargs)
            pages.append(page)
            if page.after is None:
                return pages
            after = page.after
        self.fail("paging did not end")

    async def test_pages_follow_list_order(self) -> None:
        """
        Pages of 5 read every certificate exactly once, in list_certificates'
        order (newest first, ties by insertion), each page at most 5.
        """
        store = await self.open_store()
        every = await self.fill(store)
        pages = await self.pages(store, 5)
        self.assertEqual([c for page in pages for c in page.certificates], every)
        self.assertEqual([len(page.certificates) for page in pages], [5, 5, 5, 5, 3])
        self.assertIsNone(pages[-1].after)

    async def test_exact_multiple_ends_with_empty_page(self) -> None:
        """A last full page is followed by an empty one that ends the listing."""
        store = await self.open_store()
        for i in range(4):
            await store.record_certificate(issued(f"x{i}", issued_at=T0 + timedelta(seconds=i)))
        pages = await self.pages(store, 2)
        self.assertEqual([len(page.certificates) for page in pages], [2, 2, 0])

    async def test_revoked_only_and_subject(self) -> None:
        """
        revoked_only pages hold only revoked certificates, subject pages
        only that subject's, both in list order.
        """
        store = await self.open_store()
        every = await self.fill(store)
        revoked = [c for page in await self.pages(store, 2, revoked_only=True) for c in page.certificates]
        self.assertEqual(revoked, [c for c in every if c.revoked])
        self.assertEqual(len(revoked), 6)
        s1 = [c for page in await self.pages(store, 3, subject="O=Example,CN=s1") for c in page.certificates]
        self.assertEqual(s1, [c for c in every if c.subject == "O=Example,CN=s1"])
        both = [
            c for page in await self.pages(store, 3, subject="O=Example,CN=s1", revoked_only=True)
            for c in page.certificates
        ]
        self.assertEqual(both, [c for c in every if c.subject == "O=Example,CN=s1" and c.revoked])

    async def test_iterate_certificates(self) -> None:
        """iterate_certificates yields what list_certificates returns, page by page."""
        store = await self.open_store()
        every = await self.fill(store)
        got = [c async for c in iterate_certificates(store, page_size=4)]
        self.assertEqual(got, every)
        got = [c async for c in iterate_certificates(store, revoked_only=True, page_size=4)]
        self.assertEqual(got, [c for c in every if c.revoked])

    async def test_filter_is_decided_by_the_database(self) -> None:
        """A CertificateFilter's conditions are checked by the database as
        it walks the rows: one page of 10 holds the one match even when
        30 newer rows do not match; LIKE's wildcards and the escape
        character in the text are plain characters; every condition
        holds at once."""
        store = await self.open_store()
        odd = issued("50%_off!", issued_at=T0)
        await store.record_certificate(odd)
        for i in range(30):
            await store.record_certificate(issued(f"5000off{i}", issued_at=T0 + timedelta(seconds=1 + i)))

        async def every(where: CertificateFilter, limit: int = 10) -> list[IssuedCertificate]:
            return [c for page in await self.pages(store, limit, where=where) for c in page.certificates]

        (first,) = (await store.certificate_page(None, 10, where=CertificateFilter(("CN=50%_off!",)))).certificates
        self.assertEqual(first, odd)
        # Only odd's subject holds a '%' or '!'; an unescaped '%' would match all 31.
        self.assertEqual(await every(CertificateFilter(("%",))), [odd])
        self.assertEqual(await every(CertificateFilter(("0%_",))), [odd])
        self.assertEqual(await every(CertificateFilter(("!",))), [odd])
        # off1 and off10-19, off2 and off20-29
        self.assertEqual(len(await every(CertificateFilter(("off2", "off1")))), 22)
        await store.revoke_certificate(odd.serial, "superseded", T0 + timedelta(days=1))
        self.assertEqual([c.serial for c in await every(CertificateFilter(revoked=True))], [odd.serial])
        self.assertEqual(len(await every(CertificateFilter(revoked=False))), 30)
        self.assertEqual(await every(CertificateFilter(("50%",), revoked=False)), [])
        # notAfter is T0 + 365 days for all: the bounds take all or none.
        end = T0 + timedelta(days=365)
        self.assertEqual(len(await every(CertificateFilter(not_after_from=end))), 31)
        self.assertEqual(await every(CertificateFilter(not_after_from=end + timedelta(microseconds=1))), [])
        self.assertEqual(len(await every(CertificateFilter(not_after_before=end + timedelta(microseconds=1)))), 31)
        self.assertEqual(await every(CertificateFilter(not_after_before=end)), [])
        got = [c async for c in iterate_certificates(store, page_size=4, where=CertificateFilter(("off1",)))]
        self.assertEqual(len(got), 11)

    async def test_page_size_bounds(self) -> None:
        """A page of 0 or of more than 10000 certificates is refused."""
        store = await self.open_store()
        for limit in (0, -1, 10001):
            with self.assertRaises(ValueError):
                await store.certificate_page(None, limit)


class RenewalTests(StoreTestCase):
    async def test_renewing_the_last_issued(self) -> None:
        """
        record_certificate(renewing=serial) records when serial is the
        subject's last issued certificate, and refuses (recording nothing)
        once a newer one exists.
        """
        store = await self.open_store()
        first = issued("a", issued_at=T0)
        await store.record_certificate(first)
        await store.record_certificate(issued("b", issued_at=T0 + timedelta(seconds=1)))
        second = issued("a", issued_at=T0 + timedelta(seconds=2))
        await store.record_certificate(second, renewing=first.serial)
        third = issued("a", issued_at=T0 + timedelta(seconds=3))
        with self.assertRaises(NotLastIssued):
            await store.record_certificate(third, renewing=first.serial)
        self.assertIsNone(await store.get_certificate(third.serial))
        self.assertEqual(await store.last_issued_for_subject("O=Example,CN=a"), second)
        with self.assertRaises(NotLastIssued):  # a subject with no record
            await store.record_certificate(issued("c"), renewing=first.serial)
        self.assertEqual(await store.count_certificates(), 3)

    async def test_concurrent_renewals_one_wins(self) -> None:
        """
        Ten renewals with the same certificate through two stores (two
        connections or pools, as two gateway processes have) at once:
        exactly one is recorded.
        """
        store = await self.open_store()
        other = await self.open_store()
        old = issued("a", issued_at=T0)
        await store.record_certificate(old)
        attempts = [
            s.record_certificate(issued("a", issued_at=T0 + timedelta(seconds=1)), renewing=old.serial)
            for _ in range(5)
            for s in (store, other)
        ]
        results = await defer.DeferredList(attempts, consumeErrors=True)
        wins = [ok for ok, _ in results if ok]
        self.assertEqual(len(wins), 1)
        for ok, value in results:
            if not ok:
                value.trap(NotLastIssued)
        self.assertEqual(await store.count_certificates(), 2)


class _Recording:
    """Mixed into a store class: remembers every query it runs."""

    recorded: list[tuple[str, tuple[Any, ...]]] = []

    def _execute(self, txn: Any, query: str, params: Any = ()) -> Any:
        self.recorded.append((query, tuple(params)))
        return super()._execute(txn, query, params)  # type: ignore[misc]


class IndexTests(StoreTestCase):
    async def per_request_queries(self) -> tuple[Any, list[tuple[str, tuple[Any, ...]]]]:
        """Every query the enrollment path runs (revocation, last-issued,
        refetch, single use, factory certificate, officer roles, approvals,
        recording), as the store really runs them."""
        recording = type("Recording", (_Recording, self.store_class), {})
        store = await self.open_store(recording)
        old = issued("a", issued_at=T0)
        await store.record_certificate(old)
        await store.add_device(Device("d", "h", single_use=True, created_at=T0, factory_cert_sha256="ab" * 32))
        approval = Approval(
            "r1", "1", old.public_key_sha256, old.subject, "device:d", b"csr", T0, T0 + timedelta(days=1)
        )
        store.recorded = []  # from here on: only the queries below
        await store.is_revoked(old.serial)
        await store.last_issued_for_subject(old.subject)
        await store.certificates_for_public_key(old.public_key_sha256)
        await store.get_device("d")
        await store.get_device_by_factory_cert("ab" * 32)
        when = T0 + timedelta(hours=1)
        await store.consume_device("d", when)
        await store.release_device("d", when)
        await store.officer_roles("cd" * 32)
        await store.add_approval(approval)
        await store.find_approval(*approval.key)
        await store.get_approval("r1")
        await store.decide_approval("r1", "approved", None, T0 + timedelta(days=2))
        await store.issue_approved("r1", issued("a", issued_at=T0 + timedelta(seconds=1)))
        await store.record_certificate(issued("a", issued_at=T0 + timedelta(seconds=2)))
        last = await store.last_issued_for_subject(old.subject)
        await store.record_certificate(issued("a", issued_at=T0 + timedelta(seconds=3)), renewing=last.serial)
        await store.revoke_certificate(old.serial)
        page = await store.certificate_page(None, 1, revoked_only=True)
        await store.certificate_page(page.after, 1, revoked_only=True)
        page = await store.certificate_page(None, 1)
        await store.certificate_page(page.after, 1)
        page = await store.certificate_page(None, 1, subject=old.subject)
        await store.certificate_page(page.after, 1, subject=old.subject)
        await store.use_digest_nonce("n", 1, T0, when=T0)
        queries = [
            (q, p) for q, p in store.recorded
            if q.lstrip().split()[0].upper() in ("SELECT", "UPDATE", "DELETE") and "pg_advisory" not in q
        ]
        return store, queries

    async def plan(self, store: Any, query: str, params: tuple[Any, ...]) -> str:
        def explain(txn: Any) -> str:
            store._execute(txn, "EXPLAIN QUERY PLAN " + query, params)
            return "\n".join(str(row[-1]) for row in txn.fetchall())

        return await store._run(explain)

    async def test_every_per_request_query_uses_an_index(self) -> None:
        """
        No query of the enrollment path, nor a page of a listing, scans a
        table or sorts: each is an index lookup or range, so its cost does
        not grow with the number of certificates (EXPLAIN).
        """
        store, queries = await self.per_request_queries()
        self.assertGreater(len(queries), 20)
        for query, params in queries:
            plan = await self.plan(store, query, params)
            self.assertNotRegex(
                plan, r"\bSCAN (certificates|devices|officer_roles|approvals|digest_nonce)\b(?! USING)", f"{query}\n{plan}"
            )
            self.assertNotIn("TEMP B-TREE", plan, f"{query}\n{plan}")
            if "FROM certificates" in query and "revoked_at IS NOT NULL" in query:
                self.assertIn("certificates_revoked", plan)


class MigrateTableTests(StoreTestCase):
    async def test_every_table_has_a_key(self) -> None:
        """
        Every table the migrations create (but the version row) is listed
        in TABLE_KEYS, which `estgw store migrate` copies.
        """
        await self.open_store()
        tables = {
            row[0] for row in self.on_disk("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not row[0].startswith("sqlite_")
        }
        self.assertEqual(tables - {"schema_version"}, set(TABLE_KEYS))


class DigestNonceTests(StoreTestCase):
    """use_digest_nonce: the HTTP Digest replay rule (RFC 7616 §3.4),
    decided by the database."""

    async def test_counts(self) -> None:
        """The first use of a nonce is accepted; a higher count is, and a
        count not higher than the highest seen (the same or lower) is
        refused; other nonces are their own; the largest count nc can
        spell (ffffffff) is recorded."""
        store = await self.open_store(reactor=_ClockedReactor(T0))
        until = T0 + timedelta(minutes=15)
        use = lambda nonce, nc: store.use_digest_nonce(nonce, nc, until)  # noqa: E731
        answers = [await use("a", 1), await use("a", 1), await use("a", 3), await use("a", 2), await use("a", 3),
                   await use("b", 1), await use("a", 4), await use("b", 1)]
        self.assertEqual(answers, [True, False, True, False, False, True, True, False])
        self.assertTrue(await use("c", 0xFFFFFFFF))
        self.assertFalse(await use("c", 0xFFFFFFFF))
        rows = sorted(tuple(row) for row in self.on_disk("SELECT nonce, nc FROM digest_nonce"))
        self.assertEqual(rows, [("a", 4), ("b", 1), ("c", 0xFFFFFFFF)])

    async def test_bad_arguments(self) -> None:
        """A count outside 1..ffffffff, an empty or over-long nonce, a naive
        expiry: ValueError, nothing recorded."""
        store = await self.open_store(reactor=_ClockedReactor(T0))
        until = T0 + timedelta(minutes=15)
        for nonce, nc, expires in [
            ("a", 0, until), ("a", -1, until), ("a", 0x1_0000_0000, until),
            ("", 1, until), ("x" * (MAX_DIGEST_NONCE + 1), 1, until), ("a", 1, until.replace(tzinfo=None)),
        ]:
            with self.assertRaises(ValueError):
                await store.use_digest_nonce(nonce, nc, expires)
        self.assertEqual(self.on_disk("SELECT COUNT(*) FROM digest_nonce"), [(0,)])
        self.assertTrue(await store.use_digest_nonce("x" * MAX_DIGEST_NONCE, 1, until))

    async def test_expired_records_removed(self) -> None:
        """A record is kept past its expiry for DIGEST_NONCE_GRACE seconds
        (and still refuses a replay then); after that each call removes
        at most DIGEST_NONCE_PURGE of them, oldest first, until none is
        left; records not expired stay."""
        store = await self.open_store(reactor=_ClockedReactor(T0))
        total = 2 * DIGEST_NONCE_PURGE + 5
        for number in range(total):
            self.assertTrue(await store.use_digest_nonce(f"old-{number:03d}", 1, T0 + timedelta(seconds=number)))
        live = T0 + timedelta(days=1)
        self.assertTrue(await store.use_digest_nonce("live", 1, live))

        def left() -> list[str]:
            return sorted(row[0] for row in self.on_disk("SELECT nonce FROM digest_nonce"))

        # Expired, but within the grace: kept, and a replay is refused.
        within = T0 + timedelta(seconds=DIGEST_NONCE_GRACE - 1)
        self.assertFalse(await store.use_digest_nonce("old-000", 1, T0, when=within))
        self.assertEqual(len(left()), total + 1)
        # Past the grace of them all: one bounded batch per call, oldest first.
        after = T0 + timedelta(seconds=total + DIGEST_NONCE_GRACE + 1)
        self.assertTrue(await store.use_digest_nonce("new-1", 1, live, when=after))
        self.assertEqual([n for n in left() if n.startswith("old-")][0], f"old-{DIGEST_NONCE_PURGE:03d}")
        self.assertEqual(len(left()), total + 2 - DIGEST_NONCE_PURGE)
        for number in range(2, 5):
            await store.use_digest_nonce(f"new-{number}", 1, live, when=after)
        self.assertEqual(left(), ["live", "new-1", "new-2", "new-3", "new-4"])

    async def test_one_count_once_across_stores(self) -> None:
        """Two store objects on one database (as two processes or machines
        have) use the same (nonce, nc) at once, many times over: exactly
        one use of each is accepted."""
        one = await self.open_store(reactor=_ClockedReactor(T0))
        other = await self.open_store(reactor=_ClockedReactor(T0))
        until = T0 + timedelta(minutes=15)
        uses = []
        for number in range(20):
            for store in (one, other, other, one):
                uses.append((number, store.use_digest_nonce(f"n-{number}", 1 + number % 2, until)))
        answers = await defer.gatherResults([d for _, d in uses])
        accepted: dict[int, int] = {}
        for (number, _), answer in zip(uses, answers):
            accepted[number] = accepted.get(number, 0) + int(answer)
        self.assertEqual(accepted, {number: 1 for number in range(20)})
        self.assertFalse(await one.use_digest_nonce("n-3", 2, until))
        self.assertTrue(await other.use_digest_nonce("n-3", 3, until))
        self.assertFalse(await one.use_digest_nonce("n-3", 3, until))

    async def test_copied_by_migrate(self) -> None:
        """`estgw store migrate` copies the records: a response used before
        the move is still refused after it."""
        source_path = os.path.join(os.path.dirname(self.path), "source.sqlite")
        source = SQLiteStore(source_path, reactor=_ClockedReactor(T0))
        await source.start()
        until = T0 + timedelta(minutes=15)
        self.assertTrue(await source.use_digest_nonce("moved", 5, until))
        await source.close()
        target = await self.open_store(reactor=_ClockedReactor(T0))
        copied = await target.copy_from_sqlite(source_path)
        self.assertEqual(copied["digest_nonce"], 1)
        self.assertFalse(await target.use_digest_nonce("moved", 5, until))
        self.assertTrue(await target.use_digest_nonce("moved", 6, until))


class OpenStoreTests(unittest.TestCase):
    def test_sqlite_url(self) -> None:
        """sqlite:PATH opens a SQLite store on PATH; an empty path is refused."""
        store = open_store("sqlite:/tmp/x.sqlite")
        self.assertIsInstance(store, SQLiteStore)
        self.assertEqual(store.path, "/tmp/x.sqlite")
        with self.assertRaises(ValueError):
            open_store("sqlite:  ")

    def test_postgresql_url(self) -> None:
        """postgresql:// and postgres:// open a PostgreSQL store."""
        from estgw.store.postgresql import PostgreSQLStore

        for url in ("postgresql://u@db.example/estgw", "postgres://u@db.example/estgw"):
            store = open_store(url)
            self.assertIsInstance(store, PostgreSQLStore)
            self.assertEqual(store.url, url)

    def test_other_urls_refused(self) -> None:
        """Other schemes are refused with the accepted forms, and no password."""
        for url in ("mysql://u:pw@h/db", "estgw.sqlite", "", "postgresql:/x"):
            with self.assertRaises(ValueError) as caught:
                open_store(url)
            self.assertIn("sqlite:PATH or postgresql://", str(caught.exception))
            self.assertNotIn("pw@", str(caught.exception))

    def test_redact_url(self) -> None:
        """A password in a URL, in its user part or its query, is never shown."""
        self.assertEqual(
            redact_url("postgresql://estgw:s3cret@db.example:5432/estgw"),
            "postgresql://estgw:***@db.example:5432/estgw",
        )
        self.assertEqual(
            redact_url("postgresql:///estgw?host=/run/pg&password=s3cret&sslmode=require"),
            "postgresql:///estgw?host=/run/pg&password=***&sslmode=require",
        )
        self.assertEqual(redact_url("postgresql://db/estgw"), "postgresql://db/estgw")
        self.assertEqual(redact_url("sqlite:state.sqlite"), "sqlite:state.sqlite")
        from estgw.store.postgresql import PostgreSQLStore

        self.assertNotIn("s3cret", repr(PostgreSQLStore("postgresql://u:s3cret@h/db")))


class GroupCommitTests(StoreTestCase):
    """record_certificate: concurrent records share transactions, and each
    fires only once its own row is committed."""

    async def counting_store(self) -> tuple[Any, list[int]]:
        store = await self.open_store()
        sizes: list[int] = []
        real = store._insert_certificates

        def insert(txn: Any, records: list[IssuedCertificate]) -> None:
            sizes.append(len(records))
            real(txn, records)

        store._insert_certificates = insert
        return store, sizes

    async def test_concurrent_records_grouped_and_committed_first(self) -> None:
        store, sizes = await self.counting_store()
        records = [issued(f"pump-{i}", serial=0x1000 + i) for i in range(20)]
        seen_on_disk: list[bool] = []

        def committed(_: object, serial: int) -> None:
            rows = self.on_disk("SELECT count(*) FROM certificates WHERE serial = ?", (f"{serial:x}",))
            seen_on_disk.append(rows[0][0] == 1)

        await defer.gatherResults([
            store.record_certificate(r).addCallback(committed, r.serial) for r in records
        ])
        self.assertEqual(seen_on_disk, [True] * 20)
        self.assertEqual(sum(sizes), 20)
        self.assertLess(len(sizes), 20)  # grouped: fewer transactions than records
        self.assertEqual(sizes[0], 1)  # the first does not wait for company

    async def test_duplicate_fails_alone(self) -> None:
        store, sizes = await self.counting_store()
        await store.record_certificate(issued("pump-0", serial=0x2000))
        results = await defer.DeferredList([
            store.record_certificate(issued("pump-1", serial=0x2001)),
            store.record_certificate(issued("pump-2", serial=0x2000)),  # duplicate
            store.record_certificate(issued("pump-3", serial=0x2003)),
        ], consumeErrors=True)
        self.assertEqual([ok for ok, _ in results], [True, False, True])
        results[1][1].trap(DuplicateCertificate)
        on_disk = self.on_disk("SELECT serial FROM certificates ORDER BY serial")
        self.assertEqual(on_disk, [("2000",), ("2001",), ("2003",)])

    async def test_close_writes_what_was_accepted(self) -> None:
        store = self.store_class(await self.location())
        await store.start()
        pending = [store.record_certificate(issued(f"pump-{i}", serial=0x3000 + i)) for i in range(5)]
        await store.close()
        await defer.gatherResults(pending)
        self.assertEqual(self.on_disk("SELECT count(*) FROM certificates"), [(5,)])
        with self.assertRaises(StoreNotRunning):
            await store.record_certificate(issued("late", serial=0x3100))


class GroupedLookupTests(StoreTestCase):
    """get_certificate: concurrent lookups share queries, each answered
    with its own certificate (or None), and each read after it was asked."""

    async def counting_store(self) -> tuple[Any, list[list[int]]]:
        store = await self.open_store()
        queries: list[list[int]] = []
        real = store._select_certificates

        def select(txn: Any, serials: list[int]) -> Any:
            queries.append(list(serials))
            return real(txn, serials)

        store._select_certificates = select
        return store, queries

    async def test_concurrent_lookups_grouped_each_gets_its_own(self) -> None:
        store, queries = await self.counting_store()
        for i in range(10):
            await store.record_certificate(issued(f"pump-{i}", serial=0x4000 + i))
        asked = [0x4000 + i for i in range(10)] + [0x4003, 0x4999, 0x4007]
        answers = await defer.gatherResults([store.get_certificate(s) for s in asked])
        self.assertEqual(
            [None if a is None else (a.serial, a.subject) for a in answers],
            [(0x4000 + i, f"O=Example,CN=pump-{i}") for i in range(10)]
            + [(0x4003, "O=Example,CN=pump-3"), None, (0x4007, "O=Example,CN=pump-7")],
        )
        self.assertEqual(sorted(set(sum(queries, []))), sorted(set(asked)))
        self.assertTrue(all(len(q) == len(set(q)) for q in queries))  # a serial once per query
        self.assertLess(len(queries), len(asked))  # grouped
        self.assertEqual(queries[0], [0x4000])  # the first does not wait for company

    async def test_revocation_committed_before_the_call_is_seen(self) -> None:
        store, _queries = await self.counting_store()
        await store.record_certificate(issued("pump-1", serial=0x4100))
        await store.record_certificate(issued("pump-2", serial=0x4101))
        other = await self.open_store()  # another gateway process on the same store
        self.assertFalse((await store.get_certificate(0x4101)).revoked)
        first = store.get_certificate(0x4100)  # in flight while the other revokes
        await other.revoke_certificate(0x4101)
        second = await store.get_certificate(0x4101)  # asked after the revocation
        await first
        self.assertTrue(second.revoked)

    async def test_a_failed_query_fails_every_lookup_of_its_group(self) -> None:
        store, _queries = await self.counting_store()

        def broken(txn: Any, serials: list[int]) -> Any:
            raise self.database_error("disk I/O error")

        store._select_certificates = broken
        results = await defer.DeferredList(
            [store.get_certificate(s) for s in (1, 2, 3)], consumeErrors=True
        )
        for ok, failure in results:
            self.assertFalse(ok)
            failure.trap(StoreUnavailable)
        store._select_certificates = type(store)._select_certificates.__get__(store)
        self.assertIsNone(await store.get_certificate(4))  # the next group runs

    async def test_close_answers_what_was_asked(self) -> None:
        store = self.store_class(await self.location())
        await store.start()
        await store.record_certificate(issued("pump-0", serial=0x4200))
        pending = [store.get_certificate(0x4200) for _ in range(5)]
        await store.close()
        answers = await defer.gatherResults(pending)
        self.assertEqual([a.serial for a in answers], [0x4200] * 5)
        with self.assertRaises(StoreNotRunning):
            await store.get_certificate(0x4200)


# -- the same tests on PostgreSQL ---------------------------------------------


class PostgreSQLCertificateTests(OnPostgreSQL, CertificateTests):
    pass


class PostgreSQLDeviceTests(OnPostgreSQL, DeviceTests):
    pass


class PostgreSQLSchemaTests(OnPostgreSQL, SchemaTests):
    pass


class PostgreSQLLifecycleTests(OnPostgreSQL, LifecycleTests):
    pass


class PostgreSQLPagingTests(OnPostgreSQL, PagingTests):
    pass


class PostgreSQLRenewalTests(OnPostgreSQL, RenewalTests):
    pass


class PostgreSQLIndexTests(OnPostgreSQL, IndexTests):
    async def plan(self, store: Any, query: str, params: tuple[Any, ...]) -> str:
        def explain(txn: Any) -> str:
            # Small tables make a sequential scan and a sort cheapest:
            # forbid both, so the plan shows whether an index could serve
            # the query and its order (a disabled step is still used when
            # nothing else can do it).
            store._execute(txn, "SET LOCAL enable_seqscan = off")
            store._execute(txn, "SET LOCAL enable_sort = off")
            store._execute(txn, "EXPLAIN " + query, params)
            return "\n".join(row[0] for row in txn.fetchall())

        return await store._run(explain)

    async def test_every_per_request_query_uses_an_index(self) -> None:
        """
        The same queries on PostgreSQL: with sequential scans disabled,
        none needs one (no index could serve it) and none sorts.
        """
        store, queries = await self.per_request_queries()
        self.assertGreater(len(queries), 20)
        for query, params in queries:
            plan = await self.plan(store, query, params)
            # (Which of two indexes serves the revoked pages depends on
            # the table's statistics: bench/store_growth.py shows it at scale.)
            self.assertNotIn("Seq Scan", plan, f"{query}\n{plan}")
            self.assertNotRegex(plan, r"\bSort\b", f"{query}\n{plan}")


class PostgreSQLDigestNonceTests(OnPostgreSQL, DigestNonceTests):
    pass


class PostgreSQLMigrateTableTests(OnPostgreSQL, MigrateTableTests):
    async def test_every_table_has_a_key(self) -> None:
        """The same on PostgreSQL's catalogue."""
        await self.open_store()
        tables = {
            row[0] for row in self.on_disk(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
        self.assertEqual(tables - {"schema_version"}, set(TABLE_KEYS))


class FaultTests(unittest.SynchronousTestCase):
    """StoreUnavailable.fault: what failed, in words naming no file, host,
    user or database, from each backend's own error codes."""

    def sqlite_error(self, path: str, *statements: str, uri: bool = False) -> sqlite3.Error:
        try:
            connection = sqlite3.connect(path, uri=uri, timeout=0, isolation_level=None)
        except sqlite3.Error as e:
            return e
        try:
            for statement in statements:
                connection.execute(statement)
        except sqlite3.Error as e:
            return e
        finally:
            connection.close()
        raise AssertionError(f"no error from {statements}")

    def test_sqlite(self) -> None:
        """Real errors of SQLite: locked, read-only, cannot open, not a
        database, anything else."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "state.sqlite")
        store = SQLiteStore(path)
        holder = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(holder.close)
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        locked = self.sqlite_error(path, "BEGIN IMMEDIATE")
        holder.execute("ROLLBACK")
        read_only = self.sqlite_error(f"file:{path}?mode=ro", "INSERT INTO t VALUES (1)", uri=True)
        cannot_open = self.sqlite_error(f"file:{directory}/missing/x.sqlite?mode=rw", "SELECT 1", uri=True)
        garbage = os.path.join(directory, "garbage.sqlite")
        with open(garbage, "wb") as f:
            f.write(b"not a database " * 100)
        damaged = self.sqlite_error(garbage, "SELECT * FROM sqlite_master")
        other = self.sqlite_error(path, "SELECT nothing FROM nowhere")
        for error, fault in (
            (locked, FAULT_LOCKED), (read_only, FAULT_READ_ONLY),
            (cannot_open, "the database file cannot be opened"), (damaged, "the database file is damaged"),
            (other, FAULT_OTHER),
        ):
            self.assertEqual(store._fault(error), fault, error)
            self.assertNotIn(directory, fault)

    def test_postgresql(self) -> None:
        """psycopg's errors by SQLSTATE (or its class); libpq's own (no
        connection) have none."""
        import psycopg
        from psycopg import errors

        from estgw.store.postgresql import PostgreSQLStore

        store = PostgreSQLStore("postgresql://estgw@db.example/pki")
        for error, fault in (
            (errors.LockNotAvailable(), FAULT_LOCKED),
            (errors.ReadOnlySqlTransaction(), FAULT_READ_ONLY),
            (errors.DiskFull(), FAULT_FULL),
            (errors.OutOfMemory(), "the database server is out of resources"),
            (errors.AdminShutdown(), "the database server is shutting down or starting"),
            (errors.InvalidPassword(), "the database refused the login"),
            (psycopg.OperationalError("connection to server at db.example failed"), FAULT_UNREACHABLE),
            (errors.UndefinedTable(), FAULT_OTHER),
        ):
            self.assertEqual(store._fault(error), fault, error)


class PostgreSQLConnectionTests(unittest.TestCase):
    async def test_no_server(self) -> None:
        """
        A store whose server does not answer fails to start within its
        connect timeout, with libpq's reason, and refuses work after.
        """
        from estgw.store.postgresql import PostgreSQLStore

        postgresql.server_url()  # skip where the PostgreSQL tests cannot run
        directory = tempfile.mkdtemp()  # short: a socket path has at most 107 bytes
        self.addCleanup(os.rmdir, directory)
        store = PostgreSQLStore(f"postgresql://estgw@/estgw?host={directory}", connect_timeout=1)
        import psycopg

        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        with self.assertRaises(StoreUnavailable) as caught:
            await store.start()
        self.assertIsInstance(caught.exception.__cause__, psycopg.OperationalError)
        self.assertIn("cannot connect to the PostgreSQL store", str(caught.exception))
        self.assertIn(directory, str(caught.exception))
        # What /health/ready may show: what failed, not where.
        self.assertEqual(caught.exception.fault, FAULT_UNREACHABLE)
        with self.assertRaises(StoreNotRunning):
            await store.count_certificates()
        # The pool's own complaints went to the gateway's log, naming the reason.
        pool_lines = [e for e in logged if "PostgreSQL connection pool" in e.get("log_format", "")]
        self.assertTrue(pool_lines)
        self.assertIn(directory, pool_lines[0]["reason"])

    async def test_connections_lost_while_idle(self) -> None:
        """
        When the server drops every connection (a restart, a failover),
        the next calls get new ones and succeed: a connection that died
        idle in the pool is replaced before anything ran on it.
        """
        url = await postgresql.new_database(self)
        from estgw.store.postgresql import PostgreSQLStore

        store = PostgreSQLStore(url, pool_size=3)
        await store.start()
        self.addCleanup(store.close)
        # Fill the pool: three calls at once hold three connections.
        await defer.gatherResults([store.count_certificates() for _ in range(3)])
        dropped = postgresql.query(
            postgresql.server_url(),
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'estgw' AND datname = %s",
            (url.split("?")[0].rsplit("/", 1)[1],),
        )
        self.assertGreaterEqual(len(dropped), 2, dropped)
        await store.record_certificate(issued(serial=0x51))
        self.assertEqual([await store.count_certificates() for _ in range(4)], [1] * 4)


class PostgreSQLGroupCommitTests(OnPostgreSQL, GroupCommitTests):
    pass


class PostgreSQLGroupedLookupTests(OnPostgreSQL, GroupedLookupTests):
    pass

