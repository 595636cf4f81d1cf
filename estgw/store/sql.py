"""The SQL of every :class:`~estgw.store.IStore` backend.

:class:`_SQLStore` implements the interface once, over any DB-API driver
reached through an adbapi-like pool (``runInteraction``, ``start``,
``close``, ``dbapi``).  A backend module (:mod:`estgw.store.sqlite`,
:mod:`estgw.store.postgresql`) supplies the pool, the paramstyle, the DDL
words that differ, and the locks that SQLite does not need.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, ClassVar, Sequence, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from estgw.store import (
    DIGEST_NONCE_GRACE,
    DIGEST_NONCE_PURGE,
    MAX_DIGEST_NONCE,
    REVOCATION_REASONS,
    Approval,
    AuditEntry,
    CertificateFilter,
    CertificatePage,
    Device,
    DuplicateCertificate,
    DuplicateDevice,
    DuplicateFactoryCertificate,
    FAULT_OTHER,
    IssuedCertificate,
    IStore,
    NotLastIssued,
    OfficerRole,
    StoreNotEmpty,
    StoreNotRunning,
    StoreUnavailable,
    UnknownCertificate,
    UnsupportedSchemaVersion,
)
from estgw.store.migrations import MIGRATIONS, TABLE_KEYS
from estgw.serials import format_serial

_T = TypeVar("_T")

#: Bounds of certificate_page's ``limit``.
MAX_PAGE = 10000
#: At most this many serials in one grouped get_certificate query (well under
#: SQLite's and PostgreSQL's limits on bound parameters).
MAX_LOOKUPS = 500


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
# Where certificate_page's keyset columns sit after _CERT_COLUMNS.
_ISSUED_AT_INDEX = 9
_ID_INDEX = len(_CERT_COLUMNS.split(","))
_DEVICE_COLUMNS = (
    "device_id, password_hash, single_use, created_at, consumed_at,"
    " factory_cert_sha256, factory_cn, subject_values, digest_ha1"
)
_OFFICER_COLUMNS = "fingerprint, role, subject, issuer, serial, granted_at"


def _like_contains(text: str) -> str:
    """A LIKE pattern (with ``ESCAPE '!'``) for "contains ``text``"."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


def _filter_conditions(where: CertificateFilter, conditions: list[str], params: list[Any]) -> None:
    """The SQL of ``where`` (but its ``revoked=True``, which the caller
    writes as the partial index's condition), added to ``conditions``."""
    if where.subject_contains:
        conditions.append("(" + " OR ".join("subject LIKE ? ESCAPE '!'" for _ in where.subject_contains) + ")")
        params += [_like_contains(text) for text in where.subject_contains]
    if where.revoked is False:
        conditions.append("revoked_at IS NULL")
    if where.not_after_from is not None:
        conditions.append("not_after >= ?")
        params.append(_time_text(where.not_after_from))
    if where.not_after_before is not None:
        conditions.append("not_after < ?")
        params.append(_time_text(where.not_after_before))


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
        der=bytes(row[8]),  # whatever binary type the driver returns
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
        csr=bytes(row[5]),  # whatever binary type the driver returns
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


class _Grouped:
    """Calls that arrive while a group of them is in flight go together in
    the next group: the store's group commit and its grouped lookups.

    ``run(batch)`` gets the waiting ``(item, Deferred)`` pairs (at most
    ``most``), settles every Deferred and returns a Deferred that fires
    once it has; the next group starts then.
    """

    def __init__(
        self, run: Callable[[list[tuple[Any, Deferred[Any]]]], Deferred[Any]], most: int | None = None
    ) -> None:
        self._run = run
        self._most = most
        self._waiting: list[tuple[Any, Deferred[Any]]] = []
        self._busy = False
        self._drained: list[Deferred[None]] = []

    def add(self, item: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._waiting.append((item, d))
        if not self._busy:
            self._next()
        return d

    def drained(self) -> Deferred[None] | None:
        """Fires once every group in flight or waiting has run; None when idle."""
        if not self._busy:
            return None
        d: Deferred[None] = Deferred()
        self._drained.append(d)
        return d

    def _next(self) -> None:
        cut = len(self._waiting) if self._most is None else self._most
        batch, self._waiting = self._waiting[:cut], self._waiting[cut:]
        self._busy = True

        def ran(_: object) -> None:
            self._busy = False
            if self._waiting:
                self._next()
                return
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

        self._run(batch).addBoth(ran)


@implementer(IStore)
class _SQLStore:
    """
    IStore over any DB-API module through an adbapi-like pool.

    A subclass supplies :meth:`_make_pool` (an object with adbapi's
    ``start()``, ``close()``, ``runInteraction(f, *args)`` and ``dbapi``),
    and sets :attr:`paramstyle` and :attr:`ddl_words` where its database
    differs from SQLite, and :meth:`_lock_schema` / :meth:`_lock_subject`
    where concurrent transactions need an explicit lock (SQLite has one
    writer at a time and needs none).

    Integrity errors are recognised through the pool's ``dbapi`` module;
    binary values are turned into bytes whatever the driver returns.
    Migrations run under the schema lock, so several gateway processes
    starting at once apply each step once.
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
        # adbapi.ConnectionPool, or an object with the same four members.
        self._pool: Any = None
        self._closing = False
        # Deferreds that fire when each operation in flight ends: close()
        # waits for them in the reactor, because stopping the pool while
        # work is queued would block the reactor thread on a join until
        # the queue drained.
        self._in_flight: set[Deferred[None]] = set()
        # Group commit of record_certificate: waiting records, whether a
        # transaction of them is in flight, and who waits for both to end.
        self._records = _Grouped(self._write_records)
        # Grouped get_certificate: the same, for lookups by serial.
        self._lookups = _Grouped(self._look_up, MAX_LOOKUPS)

    # -- plumbing

    def _make_pool(self) -> Any:
        """The pool: ``start()``, ``close()``, ``runInteraction(f, *args)``
        (``f(cursor, *args)`` in one transaction, committed before the
        Deferred fires) and ``dbapi`` (the driver module, for its errors)."""
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

    def _lock_schema(self, txn: Any) -> None:
        """Serialise schema creation and migration across processes for
        the rest of ``txn`` (SQLite: its single writer lock suffices)."""

    def _lock_subject(self, txn: Any, subject: str) -> None:
        """Serialise, for the rest of ``txn``, the transactions that decide
        which certificate is the last issued for ``subject``."""

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
            raise StoreUnavailable(f"{self!r}: {error}", self._fault(error)) from error
        return failure

    def _fault(self, error: Exception) -> str:
        """:attr:`StoreUnavailable.fault` for the driver's ``error``: what
        failed, naming no file, host or user; each backend knows its codes."""
        return FAULT_OTHER

    def check_writable(self, seconds: float = 1.0) -> Deferred[None]:
        """See :meth:`IStore.check_writable`; each backend knows how."""
        raise NotImplementedError

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
        self._lock_schema(txn)
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
        self._lock_schema(txn)
        self._execute(txn, "UPDATE schema_version SET version = version WHERE id = 1")
        self._execute(txn, "SELECT version FROM schema_version WHERE id = 1")
        (current,) = txn.fetchone()
        if int(current) >= version:
            return  # another process applied it meanwhile
        for statement in statements:
            self._execute(txn, statement.format(**self.ddl_words))
        self._execute(txn, "UPDATE schema_version SET version = ? WHERE id = 1", (version,))
        self._log.info("applied store schema migration {version}", version=version)

    # -- copying a store (estgw store migrate)

    def copy_from_sqlite(self, path: str, batch: int = 1000) -> Deferred[dict[str, int]]:
        """
        Copy every table of the SQLite store file ``path`` (already at this
        schema version: start and close a SQLiteStore on it first) into
        this started, empty store, in one transaction: all or nothing.
        Rows keep their ids, so ties in issue order stay as they were.
        Returns the number of rows copied per table; StoreNotEmpty (nothing
        copied) if this store holds any row.  Memory holds one batch.
        """

        def interaction(txn: Any) -> dict[str, int]:
            for table in TABLE_KEYS:
                self._execute(txn, f"SELECT 1 FROM {table} LIMIT 1")
                if txn.fetchone() is not None:
                    raise StoreNotEmpty(
                        f"{self!r} already holds data (table {table} is not empty);"
                        f" a store is copied into an empty one only, and nothing was copied"
                    )
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            counts: dict[str, int] = {}
            try:
                for table, key in TABLE_KEYS.items():
                    cursor = source.execute(f"SELECT * FROM {table} ORDER BY {', '.join(key)}")
                    columns = [column[0] for column in cursor.description]
                    insert = self._sql(
                        f"INSERT INTO {table} ({', '.join(columns)})"
                        f" VALUES ({', '.join('?' for _ in columns)})"
                    )
                    counts[table] = 0
                    while True:
                        rows = cursor.fetchmany(batch)
                        if not rows:
                            break
                        txn.executemany(insert, rows)
                        counts[table] += len(rows)
            finally:
                source.close()
            self._after_copy(txn)
            return counts

        return self._run(interaction)

    def _after_copy(self, txn: Any) -> None:
        """Make ids generated from now on follow the copied ones (SQLite's
        AUTOINCREMENT does by itself)."""

    def close(self) -> Deferred[None]:
        if self._pool is None or self._closing:
            return defer.succeed(None)
        self._closing = True  # refuse new work; let work in flight finish
        waits = list(self._in_flight)
        for group in (self._records, self._lookups):  # and the work queued behind it
            drained = group.drained()
            if drained is not None:
                waits.append(drained)

        def close_pool(_: object) -> None:
            assert self._pool is not None
            self._pool.close()
            self._pool = None
            self._closing = False

        d: Deferred[None] = defer.DeferredList(waits).addCallback(close_pool)
        return d

    # -- certificates

    def _insert_certificate(self, txn: Any, issued: IssuedCertificate) -> None:
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
                    _optional_time_text(issued.invalidity_date),
                ),
            )
        except Exception as e:
            # Raising rolls back whatever the transaction did before.
            if self._is_integrity_error(e):
                raise DuplicateCertificate(f"serial {format_serial(issued.serial)} is already recorded") from e
            raise

    def record_certificate(self, issued: IssuedCertificate, renewing: int | None = None) -> Deferred[None]:
        """Record ``issued``; fires once it is committed.

        Group commit: records arriving while a commit is in flight are
        written together in the next transaction, so concurrent
        enrollments share one transaction and one fsync, and each
        Deferred still fires only after its own row is on disk.  A renewal
        under the last-issued rule (``renewing``) is checked and recorded
        in a transaction of its own, under the subject's lock.
        """
        if self._pool is None or self._closing:
            return defer.fail(StoreNotRunning("the store is not started, or closed"))
        if renewing is not None:
            return self._run(self._record_renewal, issued, renewing)
        return self._records.add(issued)

    def _write_records(self, batch: list[tuple[IssuedCertificate, Deferred[None]]]) -> Deferred[Any]:
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

        return self._run_now(self._insert_certificates, [issued for issued, _d in batch]).addCallbacks(
            written, failed
        )

    def _insert_certificates(self, txn: Any, records: list[IssuedCertificate]) -> None:
        for issued in records:
            self._insert_certificate(txn, issued)

    def _record_renewal(self, txn: Any, issued: IssuedCertificate, renewing: int) -> None:
        self._lock_subject(txn, issued.subject)
        # Inserting first also takes SQLite's write lock, so the check
        # below reads the latest committed state.
        self._insert_certificate(txn, issued)
        self._execute(
            txn,
            "SELECT serial FROM certificates WHERE subject = ? AND serial <> ?"
            " ORDER BY issued_at DESC, id DESC LIMIT 1",
            (issued.subject, _serial_text(issued.serial)),
        )
        row = txn.fetchone()
        if row is None or row[0] != _serial_text(renewing):
            raise NotLastIssued(
                f"certificate {_serial_text(renewing)} is no longer the last issued for {issued.subject}"
            )

    def certificate_page(
        self,
        after: tuple[str, int] | None = None,
        limit: int = 1000,
        subject: str | None = None,
        revoked_only: bool = False,
        where: CertificateFilter | None = None,
    ) -> Deferred[CertificatePage]:
        if not 1 <= limit <= MAX_PAGE:
            return defer.fail(ValueError(f"a page holds 1 to {MAX_PAGE} certificates, not {limit}"))
        conditions: list[str] = []
        params: list[Any] = []
        if subject is not None:
            conditions.append("subject = ?")
            params.append(subject)
        if revoked_only or (where is not None and where.revoked):
            # Written as the partial index's WHERE so the planner uses it.
            conditions.append("revoked_at IS NOT NULL")
        if where is not None:
            _filter_conditions(where, conditions, params)
        if after is not None:
            # Keyset paging: the position is the last row's (issued_at,
            # id).  "issued_at <= ?" bounds the index range scan on both
            # databases; the second term drops the few rows of that same
            # instant already shown.
            conditions.append("issued_at <= ? AND (issued_at < ? OR id < ?)")
            params += [after[0], after[0], int(after[1])]
        clause = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = (
            f"SELECT {_CERT_COLUMNS}, id FROM certificates{clause}"
            f" ORDER BY issued_at DESC, id DESC LIMIT {int(limit)}"
        )

        def interaction(txn: Any) -> CertificatePage:
            self._execute(txn, query, params)
            rows = txn.fetchall()
            certificates = [_certificate_from_row(row) for row in rows]
            last = rows[-1] if len(rows) == limit else None
            return CertificatePage(
                certificates, None if last is None else (last[_ISSUED_AT_INDEX], int(last[_ID_INDEX]))
            )

        return self._run(interaction)

    def _select_certificate(self, txn: Any, serial: int) -> IssuedCertificate | None:
        self._execute(
            txn,
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial = ?",
            (_serial_text(serial),),
        )
        row = txn.fetchone()
        return None if row is None else _certificate_from_row(row)

    def get_certificate(self, serial: int) -> Deferred[IssuedCertificate | None]:
        """The certificate recorded with ``serial``, or None.

        Grouped like record_certificate: lookups arriving while one query
        is in flight are answered together by the next one (one thread
        hop and one read for all of them, instead of one each).  Every
        lookup is still read after it was asked, so a revocation
        committed before the call, by any process, is seen.
        """
        if self._pool is None or self._closing:
            return defer.fail(StoreNotRunning("the store is not started, or closed"))
        return self._lookups.add(serial)

    def _look_up(self, batch: list[tuple[int, Deferred[IssuedCertificate | None]]]) -> Deferred[None]:
        def found(recorded: dict[int, IssuedCertificate]) -> None:
            for serial, d in batch:
                d.callback(recorded.get(serial))

        def failed(failure: Any) -> None:
            for _serial, d in batch:
                d.errback(failure)

        serials = sorted({serial for serial, _d in batch})
        return self._run_now(self._select_certificates, serials).addCallbacks(found, failed)

    def _select_certificates(self, txn: Any, serials: list[int]) -> dict[int, IssuedCertificate]:
        marks = ", ".join("?" * len(serials))
        self._execute(
            txn,
            f"SELECT {_CERT_COLUMNS} FROM certificates WHERE serial IN ({marks})",
            [_serial_text(serial) for serial in serials],
        )
        recorded = (_certificate_from_row(row) for row in txn.fetchall())
        return {issued.serial: issued for issued in recorded}

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
            self._insert_certificate(txn, issued)
            return True

        return self._run(interaction)

    # -- HTTP Digest nonce counts

    def use_digest_nonce(
        self, nonce: str, nc: int, expires_at: datetime, when: datetime | None = None
    ) -> Deferred[bool]:
        if not 1 <= nc <= 0xFFFFFFFF:
            return defer.fail(ValueError(f"a Digest nonce count is 1 to ffffffff, not {nc!r}"))
        if not 0 < len(nonce) <= MAX_DIGEST_NONCE:
            return defer.fail(ValueError(f"a Digest nonce has 1 to {MAX_DIGEST_NONCE} characters, not {len(nonce)}"))
        try:
            until = _time_text(expires_at)
            cut = _time_text((self._now() if when is None else when) - timedelta(seconds=DIGEST_NONCE_GRACE))
        except ValueError as e:
            return defer.fail(e)

        def interaction(txn: Any) -> bool:
            # Expired records first, a bounded number (oldest first, by the
            # index): a call adds one record at most and removes up to
            # DIGEST_NONCE_PURGE, so the table never grows past the live ones.
            self._execute(
                txn,
                "DELETE FROM digest_nonce WHERE nonce IN (SELECT nonce FROM digest_nonce"
                f" WHERE expires_at < ? ORDER BY expires_at LIMIT {int(DIGEST_NONCE_PURGE)})",
                (cut,),
            )
            # One statement decides, in the database: inserted (first use)
            # or raised to a higher count, one row; a count not higher,
            # none.  Of two uses of one count at once, PostgreSQL makes the
            # second wait for the first's row and then re-checks the
            # condition; SQLite has one writer at a time.
            self._execute(
                txn,
                "INSERT INTO digest_nonce (nonce, nc, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (nonce) DO UPDATE SET nc = excluded.nc WHERE excluded.nc > digest_nonce.nc",
                (nonce, nc, until),
            )
            return bool(txn.rowcount == 1)

        return self._run(interaction)
