"""Faults injected into the CA and the store, over real TLS with curl.

Each fault gives the device 503 with Retry-After and a reason in words
(never a Python exception name), records nothing, sends no certificate,
and the next request after the fault is served normally.
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from estgw.ca import IssueRequest, Profile
from estgw.store import SQLiteStore, StoreUnavailable
from estgw.testing import TEST_CONFIG, HTTPResult, RunningGateway, name, new_key
from tests.test_auth import AuditLog
from tests.test_refusals import basic_csr, register

_INTERNALS = re.compile(r"[A-Za-z]+(Error|Exception|Failure)\b|sqlite|Traceback|estgw\.")


class FaultTestCase(TestCase):
    config = TEST_CONFIG

    async def setUp(self) -> None:
        self.audit = AuditLog(self)
        self.gateway = await RunningGateway.start(self, self.config)
        await register(self.gateway)
        self.gw = self.gateway.service.gateway
        self.procedure_name = "Test Procedure"
        self.real_procedure = self.gw.procedures[self.procedure_name]

    def enroll(self) -> Any:
        return self.gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")

    async def assertUnavailable(self, result: HTTPResult, code: str, reason: str, before: int = 0) -> None:
        self.assertEqual(result.status, 503, result.text)
        self.assertTrue(result.headers.get("retry-after", "").isdigit(), result.headers)
        self.assertIn(reason, result.text)
        self.assertIsNone(_INTERNALS.search(result.text), result.text)
        self.assertNotIn(b"-----BEGIN", result.body)
        self.assertIn(code, self.audit.refused)
        self.assertEqual(self.audit.issued, [])
        self.assertEqual(await self.count_on_disk(), before)

    async def count_on_disk(self) -> int:
        """Certificates in the SQLite file, read by a store of our own."""
        store = SQLiteStore(self.gateway.config.store_path)
        await store.start()
        try:
            return await store.count_certificates()
        finally:
            await store.close()

    async def assertServedAfter(self) -> None:
        """The process is up and the next enrollment is issued and recorded."""
        result = await self.enroll()
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.count_on_disk(), 1)


class _Raising:
    def issue(self, request: Any) -> Any:
        raise RuntimeError("HSM slot 3 said CKR_DEVICE_ERROR")

    def chain(self) -> list:
        return []


class _Failing:
    def issue(self, request: Any) -> Any:
        return defer.fail(OSError(5, "Input/output error"))

    def chain(self) -> list:
        return []


class _Hanging:
    def __init__(self) -> None:
        self.calls: list[defer.Deferred] = []

    def issue(self, request: Any) -> Any:
        d: defer.Deferred = defer.Deferred()
        self.calls.append(d)
        return d

    def chain(self) -> list:
        return []


class CAFaultTests(FaultTestCase):
    config = TEST_CONFIG + "ca.timeout = 1\nca.maxQueued = 1\n"

    async def test_ca_raises(self) -> None:
        """A token procedure that raises (at once, or through its Deferred):
        503 ca-unavailable; the next request is issued."""
        for broken in (_Raising(), _Failing()):
            self.gw.procedures[self.procedure_name] = broken
            await self.assertUnavailable(await self.enroll(), "ca-unavailable", "the CA cannot issue")
        self.flushLoggedErrors(RuntimeError, OSError)
        self.gw.procedures[self.procedure_name] = self.real_procedure
        await self.assertServedAfter()

    async def test_ca_hangs(self) -> None:
        """A token procedure that never answers: 503 ca-timeout after
        ca.timeout seconds, and its slot is free again."""
        hanging = _Hanging()
        self.gw.procedures[self.procedure_name] = hanging
        started = reactor.seconds()
        await self.assertUnavailable(await self.enroll(), "ca-timeout", "did not answer within 1 seconds")
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(self.gw.ca_guard.in_flight, 0)
        self.gw.procedures[self.procedure_name] = self.real_procedure
        await self.assertServedAfter()

    async def test_queue_full(self) -> None:
        """With ca.maxQueued = 1 and one enrollment inside the CA, the next
        is 503 ca-busy at once; the first completes when the CA answers."""
        hanging = _Hanging()
        self.gw.procedures[self.procedure_name] = hanging
        first = defer.ensureDeferred(self.enroll())
        for _ in range(100):
            if hanging.calls:
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(hanging.calls), 1)
        await self.assertUnavailable(await self.enroll(), "ca-busy", "too many requests waiting")
        # The CA answers the first in time: it is issued and recorded.
        signed = self.real_procedure.ca.sign(
            IssueRequest(subject=name("pump-17"), public_key=new_key().public_key()), Profile()
        )
        hanging.calls[0].callback(signed)
        result = await first
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.count_on_disk(), 1)


class _StoreProxy:
    """An IStore that forwards to the real one, except ``record_certificate``."""

    def __init__(self, real: Any, error: BaseException) -> None:
        self._real = real
        self._error = error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def record_certificate(self, issued: Any, renewing: Any = None) -> Any:
        return defer.fail(self._error)


class StoreFaultTests(FaultTestCase):
    async def test_failing_store_wrapper(self) -> None:
        """A store that fails to record (as a lost PostgreSQL connection
        would): 503 store-unavailable, no certificate sent."""
        real = self.gw.store
        self.gw.store = _StoreProxy(real, StoreUnavailable("server closed the connection unexpectedly"))
        await self.assertUnavailable(await self.enroll(), "store-unavailable", "cannot use its certificate store")
        self.gw.store = real
        await self.assertServedAfter()

    async def test_read_only_file(self) -> None:
        """The store opened read-only (a real SQLite read-only connection
        on the same file): 503, nothing recorded."""

        class ReadOnly(SQLiteStore):
            def _make_pool(self) -> Any:
                from twisted.enterprise import adbapi

                return adbapi.ConnectionPool(
                    "sqlite3", f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                    cp_min=1, cp_max=1, cp_reactor=self._reactor,
                )

        read_only = ReadOnly(self.gateway.config.store_path)
        # The schema exists already: start the pool without migrating.
        read_only._pool = read_only._make_pool()
        read_only._pool.start()
        real = self.gw.store
        self.gw.store = read_only
        try:
            await self.assertUnavailable(await self.enroll(), "store-unavailable", "nothing was issued")
        finally:
            self.gw.store = real
            await read_only.close()
        await self.assertServedAfter()

    async def test_disk_full(self) -> None:
        """SQLite reports the disk full (the file may not grow past its
        pages, and they are full): 503, nothing recorded."""
        store = self.gw.store

        def cap(txn: Any) -> None:
            txn.execute("PRAGMA page_count")
            (pages,) = txn.fetchone()
            txn.execute(f"PRAGMA max_page_count = {pages + 2}")

        def filler(number: int, size: int) -> Any:
            # Rows in the certificates table itself, so its pages are full too.
            return lambda txn: txn.execute(
                "INSERT INTO certificates (serial, subject, sans, not_before, not_after,"
                " public_key_sha256, handler, requester, der, issued_at)"
                " VALUES (?, 'CN=filler', '[]', '', '', '', 'filler', 'filler', randomblob(?), '')",
                (f"filler-{number}", size),
            )

        await store._run(cap)
        number = 0
        for size in (2000, 200, 1):  # fill big gaps, then small ones
            for _ in range(200):
                number += 1
                try:
                    await store._run(filler(number, size))
                except StoreUnavailable as e:
                    self.assertIn("full", str(e))
                    break
            else:
                self.fail("the database never filled up")
        filled = await store.count_certificates()
        await self.assertUnavailable(await self.enroll(), "store-unavailable", "retry later", before=filled)

        def make_room(txn: Any) -> None:
            txn.execute("DELETE FROM certificates WHERE handler = 'filler'")
            txn.execute("PRAGMA max_page_count = 1073741823")

        await store._run(make_room)
        await self.assertServedAfter()

    async def test_locked(self) -> None:
        """Another process holds the write lock past SQLite's busy timeout: 503."""
        other = sqlite3.connect(self.gateway.config.store_path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        try:
            await self.assertUnavailable(await self.enroll(), "store-unavailable", "retry later")
        finally:
            other.execute("ROLLBACK")
            other.close()
        await self.assertServedAfter()

    async def test_connection_lost_between_requests(self) -> None:
        """The database connection is closed under the store between two
        requests: the store opens a new one and the next request is issued
        and recorded (a connection lost in the middle of recording is the
        wrapper test above)."""
        for connection in list(self.gw.store._pool.connections.values()):
            connection.close()
        await self.assertServedAfter()
        self.flushLoggedErrors(sqlite3.ProgrammingError)
