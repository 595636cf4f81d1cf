"""The PostgreSQL backend: one database shared by several gateway processes
or machines (``store.url = postgresql://...``).

psycopg 3 connections from a :class:`psycopg_pool.ConnectionPool`, used in
a Twisted thread pool of the same size, so no query runs on the reactor
thread.  Transactions run at READ COMMITTED; the rules that must hold
across processes rest on what the database decides:

- serials: the UNIQUE constraint (and random serials, so it never fires);
- single-use registrations, approvals: one conditional UPDATE each, which
  PostgreSQL re-checks on the locked row, so exactly one caller matches;
- the last-issued rule: ``record_certificate(renewing=...)`` holds a
  transaction-scoped advisory lock on the subject while it checks;
- schema migrations: a transaction-scoped advisory lock, so processes
  starting together apply each step once.

A transaction that fails with a serialization failure or a deadlock is run
again (it did nothing), a few times.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable, ClassVar, TypeVar

import psycopg
import psycopg_pool
from psycopg import errors, pq
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from estgw.store import (
    FAULT_FULL,
    FAULT_LOCKED,
    FAULT_OTHER,
    FAULT_READ_ONLY,
    FAULT_UNREACHABLE,
    StoreUnavailable,
    redact_url,
)
from estgw.store.migrations import GENERATED_IDS
from estgw.store.sql import _SQLStore

_T = TypeVar("_T")

#: pg_advisory_xact_lock keys: the schema (one bigint key) and subjects
#: (two int4 keys: this class, hashtext(subject)); the two forms never
#: collide in PostgreSQL's lock space.
_SCHEMA_LOCK = 0x6573_7467_7363_6D61  # "estgscma"
_SUBJECT_LOCK_CLASS = 0x6573_7473  # "ests"

#: How often a transaction that lost a serialization race is run again.
RETRIES = 5


class _PoolLogToTwisted(logging.Handler):
    """psycopg_pool reports connection failures through the standard
    library's logging: hand them to the gateway's log (and so off stderr)."""

    _log = Logger(namespace="estgw.store.postgresql")

    def emit(self, record: logging.LogRecord) -> None:
        level = self._log.warn if record.levelno >= logging.WARNING else self._log.debug
        level("PostgreSQL connection pool: {reason}", reason=record.getMessage())


def _route_pool_log() -> None:
    pool_logger = logging.getLogger("psycopg.pool")
    if not any(isinstance(h, _PoolLogToTwisted) for h in pool_logger.handlers):
        pool_logger.addHandler(_PoolLogToTwisted())


class _StaleConnection(Exception):
    """A pooled connection failed before its first statement ran."""

    def __init__(self, error: psycopg.OperationalError) -> None:
        super().__init__(str(error))
        self.error = error


class _CountingCursor:
    """A cursor that counts the statements that succeeded on it."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.executed = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        result = self._cursor.execute(*args, **kwargs)
        self.executed += 1
        return result

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        result = self._cursor.executemany(*args, **kwargs)
        self.executed += 1
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


#: What failed, naming no host, user or database, by SQLSTATE or its class.
_FAULTS = {
    "55P03": FAULT_LOCKED,  # lock_not_available (lock_timeout)
    "40P01": FAULT_LOCKED,  # deadlock_detected
    "25006": FAULT_READ_ONLY,  # read_only_sql_transaction
    "53100": FAULT_FULL,  # disk_full
    "53": "the database server is out of resources",
    "08": FAULT_UNREACHABLE,  # connection exception
    "57": "the database server is shutting down or starting",  # operator intervention
    "28": "the database refused the login",  # invalid authorization specification
    "3D": "the database does not exist",  # invalid catalog name
}


class _PsycopgPool:
    """The part of adbapi's ConnectionPool that :class:`_SQLStore` uses,
    over psycopg_pool: ``runInteraction(f, *args)`` runs ``f(cursor,
    *args)`` in one transaction in a pool thread and commits it (or rolls
    it back when ``f`` raises) before the Deferred fires."""

    dbapi = psycopg

    def __init__(self, conninfo: str, reactor: Any, size: int, connect_timeout: float) -> None:
        self._reactor = reactor
        self._size = size
        self._conninfo = conninfo
        self._connect_timeout = connect_timeout
        self._threads = ThreadPool(minthreads=0, maxthreads=size, name="estgw-postgresql")
        self._pool = psycopg_pool.ConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            open=False,
            timeout=connect_timeout,
            name="estgw",
            kwargs={"application_name": "estgw", "connect_timeout": max(1, int(connect_timeout))},
        )

    def start(self) -> None:
        _route_pool_log()
        self._threads.start()
        # Connections are made by the pool's own workers: nothing waits here.
        self._pool.open(wait=False)

    def close(self) -> None:
        self._threads.stop()
        self._pool.close()

    def runInteraction(self, interaction: Callable[..., _T], *args: Any) -> Deferred[_T]:
        return deferToThreadPool(self._reactor, self._threads, self._transact, interaction, *args)

    def _transact(self, interaction: Callable[..., _T], *args: Any) -> _T:
        stale = 0
        attempt = 0
        while True:
            try:
                return self._once(interaction, *args)
            except (errors.SerializationFailure, errors.DeadlockDetected):
                attempt += 1
                if attempt > RETRIES:
                    raise
                time.sleep(random.uniform(0.001, 0.01) * attempt)
            except _StaleConnection as e:
                # Every pooled connection may have died with the server
                # (a restart, a failover): try each, then a new one.
                stale += 1
                if stale > self._size:
                    raise e.error from None

    def _getconn(self) -> Any:
        try:
            return self._pool.getconn()
        except psycopg_pool.PoolTimeout as e:
            # The pool says only that it waited: ask libpq why.
            try:
                psycopg.connect(self._conninfo, connect_timeout=max(1, int(self._connect_timeout))).close()
            except psycopg.Error as reason:
                raise psycopg.OperationalError(f"cannot connect to the PostgreSQL store: {reason}") from e
            raise

    def _once(self, interaction: Callable[..., _T], *args: Any) -> _T:
        connection = self._getconn()
        try:
            cursor = _CountingCursor(connection.cursor())
            try:
                try:
                    result = interaction(cursor, *args)
                finally:
                    cursor.close()
                if connection.info.transaction_status == pq.TransactionStatus.INERROR:
                    # A statement failed and the interaction handled it
                    # (e.g. a duplicate it reports as False): nothing to keep.
                    connection.rollback()
                else:
                    connection.commit()
            except psycopg.OperationalError as e:
                if connection.broken and cursor.executed == 0:
                    # It died while idle in the pool; nothing was done.
                    raise _StaleConnection(e) from e
                if not connection.closed:
                    connection.rollback()
                raise
            except BaseException:
                if not connection.closed:
                    connection.rollback()
                raise
            return result
        finally:
            # A broken connection is discarded here, and replaced.
            self._pool.putconn(connection)


class PostgreSQLStore(_SQLStore):
    """
    :class:`~estgw.store.IStore` in a PostgreSQL database.

    ``url`` is a libpq connection URI (``postgresql://user@host/db``,
    ``?host=/dir`` for a unix socket directory); ``pool_size`` connections
    at most per process.  The schema is created or migrated by
    :meth:`start` with the same migrations as SQLite.
    """

    paramstyle: ClassVar[str] = "format"
    ddl_words: ClassVar[dict[str, str]] = {
        "blob": "BYTEA",
        # BY DEFAULT: `estgw store migrate` copies ids as they were.
        "autoincrement_primary_key": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    }

    def __init__(self, url: str, reactor: Any = None, pool_size: int = 4, connect_timeout: float = 10.0) -> None:
        super().__init__(reactor)
        self.url = url
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout

    def __repr__(self) -> str:
        # Never the password.
        return f"PostgreSQLStore({redact_url(self.url)!r})"

    def _fault(self, error: Exception) -> str:
        # By SQLSTATE (PostgreSQL's appendix A), or its class (two characters).
        state = getattr(error, "sqlstate", None) or ""
        if state in _FAULTS:
            return _FAULTS[state]
        if state[:2] in _FAULTS:
            return _FAULTS[state[:2]]
        if not state and isinstance(error, psycopg.OperationalError):
            return FAULT_UNREACHABLE  # libpq's own: no connection, or it broke
        return FAULT_OTHER

    def _make_pool(self) -> Any:
        return _PsycopgPool(self.url, self._reactor, self.pool_size, self.connect_timeout)

    def check_writable(self, seconds: float = 1.0) -> Deferred[None]:
        """In a transaction of a pooled connection: fail when it is
        read-only (a standby after a failover, ``default_transaction_read_only``),
        else take the lock an INSERT into ``certificates`` takes (ROW
        EXCLUSIVE), waiting at most ``seconds`` for others' locks (``LOCK
        TABLE ... IN EXCLUSIVE MODE``, a long ``ALTER TABLE``)."""
        milliseconds = max(1, int(seconds * 1000))

        def probe(txn: Any) -> None:
            self._execute(txn, f"SET LOCAL lock_timeout = {milliseconds}")
            self._execute(txn, "SELECT current_setting('transaction_read_only')")
            (read_only,) = txn.fetchone()
            if read_only == "on":
                raise StoreUnavailable(
                    f"{self!r}: the database takes no writes (read-only transaction)", FAULT_READ_ONLY
                )
            self._execute(txn, "LOCK TABLE certificates IN ROW EXCLUSIVE MODE")

        return self._run(probe)

    def _lock_schema(self, txn: Any) -> None:
        self._execute(txn, "SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))

    def _lock_subject(self, txn: Any, subject: str) -> None:
        self._execute(txn, "SELECT pg_advisory_xact_lock(?, hashtext(?))", (_SUBJECT_LOCK_CLASS, subject))

    def _after_copy(self, txn: Any) -> None:
        # Copied rows kept their ids; new rows must be numbered after them.
        for table in GENERATED_IDS:
            self._execute(
                txn,
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)",
            )
