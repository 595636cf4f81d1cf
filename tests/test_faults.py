"""Faults injected into the CA and the store, over real TLS with curl.

Each fault gives the device 503 with Retry-After and a reason in words
(never a Python exception name), records nothing, sends no certificate,
and the next request after the fault is served normally.
"""

from __future__ import annotations

import re
import sqlite3
import threading
from typing import Any

from twisted.internet import defer, reactor, task, threads
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw.ca import IssueRequest, Profile
from estgw.guard import CAGuard
from estgw.refusal import Refusal
from estgw.store import SQLiteStore, StoreUnavailable
from estgw.testing import TEST_CONFIG, HTTPResult, RunningGateway, name, new_key, until
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


class _HangingInThread:
    """A token procedure whose signature hangs in a reactor pool thread, as
    a PKCS#11 call stuck in an HSM does, until ``release`` is set."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.release = threading.Event()
        self.calls = 0

    def issue(self, request: Any) -> Any:
        self.calls += 1

        def sign() -> Any:
            self.release.wait(60)  # bounded: the test sets it
            return self.real.ca.sign(request, self.real.profile)

        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), sign)

    def chain(self) -> list:
        return self.real.chain()


async def _until(predicate: Any, seconds: float = 20.0) -> None:
    await until(predicate, seconds, 0.05)


class HungCATests(FaultTestCase):
    """Calls that outlive ca.timeout are counted per token procedure; at
    ca.maxOverdue that procedure takes no new enrollments until they return."""

    config = TEST_CONFIG + (
        "ca.timeout = 0.5\nca.maxOverdue = 2\n"
        "tokenprocedure.2.name = Lab Procedure\nhandler.6.tokenprocedure = Lab Procedure\n"
    )

    async def test_hung_ca_refused_at_once_and_not_ready(self) -> None:
        """Two calls hung in pool threads: each enrollment gets 503
        ca-timeout; the third gets 503 ca-unavailable without calling the CA
        (no third thread taken), /health/ready names the procedure, another
        token procedure keeps issuing.  When the calls return, their
        certificates are dropped (nothing recorded), and the procedure and
        readiness are back."""
        hanging = _HangingInThread(self.real_procedure)
        self.addCleanup(hanging.release.set)
        self.gw.procedures[self.procedure_name] = hanging
        for _ in range(2):
            await self.assertUnavailable(await self.enroll(), "ca-timeout", "did not answer within 0.5 seconds")
        self.assertEqual(self.gw.ca_guard.overdue, {self.procedure_name: 2})
        self.assertEqual(self.gw.ca_guard.in_flight, 0)

        result = await self.enroll()
        await self.assertUnavailable(result, "ca-unavailable", "has not answered earlier requests")
        self.assertEqual(hanging.calls, 2)  # refused before the CA was called
        self.assertIn(b'estgw_ca_overdue 2.0', self.gw.metrics.render())
        self.assertIn(b'estgw_ca_errors_total{kind="overdue"} 1.0', self.gw.metrics.render())

        ready = await self.gateway.curl("/health/ready")
        self.assertEqual(ready.status, 503, ready.text)
        self.assertIn("ca: token procedure Test Procedure: 2 calls to the CA still run past ca.timeout", ready.text)
        self.assertIn("retry-after", ready.headers)

        # The other token procedure is not held up.
        lab = await self.gateway.curl("lab/simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(lab.status, 200, lab.text)
        self.assertEqual(await self.count_on_disk(), 1)

        hanging.release.set()
        await _until(lambda: not self.gw.ca_guard.overdue)
        self.assertEqual(await self.count_on_disk(), 1)  # the late certificates were not recorded
        self.assertEqual(len(self.audit.issued), 1)
        ready = await self.gateway.curl("/health/ready")
        self.assertEqual((ready.status, ready.text), (200, "ready\n"))
        result = await self.enroll()  # the same (slow, now free) procedure issues again
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.count_on_disk(), 2)


class _HungSigner:
    """The real CA, made slow (so it signs on a thread, as an RSA-4096 key
    or an HSM does) and hung until ``release`` is set."""

    signs_quickly = False

    def __init__(self, real: Any) -> None:
        self.real = real
        self.release = threading.Event()
        self.entered = 0

    def sign(self, request: Any, profile: Any) -> Any:
        self.entered += 1
        self.release.wait(60)  # bounded: the test sets it
        return self.real.sign(request, profile)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class HungCAThreadTests(FaultTestCase):
    """A hung CA holds only its token procedure's own threads (ca.maxOverdue
    of them), never the reactor's pool that checks passwords."""

    config = TEST_CONFIG + (
        "ca.timeout = 2\nca.maxOverdue = 2\n"
        "tokenprocedure.2.name = Lab Procedure\nhandler.6.tokenprocedure = Lab Procedure\n"
    )

    async def test_more_hung_calls_than_the_reactor_has_threads(self) -> None:
        """Twelve enrollments (more than the reactor pool's ten threads)
        reach a hung CA at once: each is 503 ca-timeout, at most
        ca.maxOverdue threads enter the CA, and meanwhile a device never
        seen before (its password checked on the reactor's pool) enrolls
        with the other token procedure.  Once released, nothing late is
        recorded and the procedure issues again."""
        from tests.test_auth import run_cli

        hung = _HungSigner(self.real_procedure.ca)
        self.addCleanup(hung.release.set)
        self.real_procedure.ca = hung
        await run_cli(self.gateway, "device", "add", "pump-18", "--password", "other-secret")
        results = await defer.gatherResults([defer.ensureDeferred(self.enroll()) for _ in range(12)])
        for result in results:
            self.assertEqual(result.status, 503, result.text)
        self.assertEqual(sorted(set(self.audit.refused)), ["ca-timeout"])
        self.assertEqual(hung.entered, 2)
        pool = self.real_procedure.threads.pool
        self.assertEqual((pool.name, pool.max), ("estgw-ca-Test Procedure", 2))
        self.assertLessEqual(len(pool.threads), 2)

        lab = await self.gateway.curl("lab/simpleenroll", data=basic_csr("pump-18"), user="pump-18:other-secret")
        self.assertEqual(lab.status, 200, lab.text)
        result = await self.enroll()
        self.assertEqual(result.status, 503, result.text)
        self.assertIn("has not answered earlier requests", result.text)
        self.assertEqual(hung.entered, 2)  # refused without calling the CA

        hung.release.set()
        await _until(lambda: not self.gw.ca_guard.overdue)
        self.assertEqual(await self.count_on_disk(), 1)  # none of the late ones recorded
        self.real_procedure.ca = hung.real
        result = await self.enroll()
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.count_on_disk(), 2)


class CAGuardTests(SynchronousTestCase):
    """CAGuard's counting, on a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.errors: list[str] = []
        self.guard = CAGuard(10, 5.0, self.clock, self.errors.append, max_overdue=2)

    def issue(self, call: Any, procedure: str = "A") -> defer.Deferred:
        return defer.ensureDeferred(self.guard.issue(call, procedure))

    def test_overdue_until_returned(self) -> None:
        """A call past the timeout is answered ca-timeout and counted until
        its Deferred fires; a late result (or failure) is dropped."""
        calls = [defer.Deferred(), defer.Deferred()]
        answers = [self.issue(lambda d=d: d) for d in calls]
        self.clock.advance(5)
        for answer in answers:
            self.assertEqual(self.failureResultOf(answer, Refusal).value.code, "ca-timeout")
        self.assertEqual(self.guard.overdue, {"A": 2})
        self.assertIsNotNone(self.guard.unavailable("A"))
        self.assertIsNone(self.guard.unavailable("B"))
        # At the limit: refused at once, the CA not called.
        called = []
        refused = self.issue(lambda: called.append(1))
        self.assertEqual(self.failureResultOf(refused, Refusal).value.code, "ca-unavailable")
        self.assertEqual(called, [])
        # Another token procedure is not held up.
        self.assertEqual(self.successResultOf(self.issue(lambda: "certificate", "B")), "certificate")
        calls[0].callback("late certificate")
        self.assertEqual(self.guard.overdue, {"A": 1})
        calls[1].errback(RuntimeError("late failure"))
        self.assertEqual(self.guard.overdue, {})
        self.assertEqual(self.successResultOf(self.issue(lambda: "certificate")), "certificate")
        self.assertEqual(self.errors, ["timeout", "timeout", "overdue"])

    def test_answer_in_time_is_not_overdue(self) -> None:
        """A call that answers before the timeout cancels its timer."""
        call: defer.Deferred = defer.Deferred()
        answer = self.issue(lambda: call)
        self.clock.advance(4.9)
        call.callback("certificate")
        self.assertEqual(self.successResultOf(answer), "certificate")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.guard.overdue, self.guard.in_flight), ({}, 0))

    def test_failure_in_time(self) -> None:
        """A CA that fails in time: ca-unavailable, not counted overdue."""
        answer = self.issue(lambda: defer.fail(OSError(5, "Input/output error")))
        self.assertEqual(self.failureResultOf(answer, Refusal).value.code, "ca-unavailable")
        self.assertEqual((self.guard.overdue, self.errors), ({}, ["error"]))
        self.flushLoggedErrors()


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
