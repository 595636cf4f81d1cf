"""The store's pending approvals (schema version 3): real SQLite files, and
the same tests on a real PostgreSQL server (PostgreSQLApprovalStoreTests)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from estgw.approval.gate import request_key
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.store import Approval, IssuedCertificate, SQLiteStore
from estgw.testing import make_csr, new_key
from tests import postgresql

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def approval(request_id: str, subject: str = "pump-17", key: object = None) -> Approval:
    csr = make_csr(key or new_key(), subject)
    handler, digest, subject_text = request_key("3", csr)
    return Approval(
        request_id=request_id,
        handler=handler,
        public_key_sha256=digest,
        subject=subject_text,
        requester=f"device:{subject}",
        csr=csr.public_bytes(Encoding.DER),
        created_at=T0,
        expires_at=T0 + timedelta(hours=72),
    )


class ApprovalStoreTests(TestCase):
    store_class: Any = SQLiteStore

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "estgw.sqlite")

    async def location(self) -> str:
        return self.path

    async def open_store(self) -> Any:
        store = self.store_class(await self.location())
        await store.start()
        self.addCleanup(store.close)
        return store

    def issued(self, subject: str = "pump-17") -> IssuedCertificate:
        ca = LocalCA.load_or_create(os.path.join(self.directory, "ca"), "t")
        key = new_key()
        cert = ca.sign(IssueRequest(make_csr(key, subject).subject, key.public_key()), Profile())
        return IssuedCertificate.from_certificate(cert, "3", f"device:{subject}", T0)

    async def test_round_trip_and_durable(self) -> None:
        """A pending approval reads back field for field after a reopen."""
        store = await self.open_store()
        row = approval("req-1")
        self.assertEqual(await store.add_approval(row), row)
        await store.close()
        store = await self.open_store()
        self.assertEqual(await store.get_approval("req-1"), row)
        self.assertEqual(await store.find_approval(*row.key), row)
        self.assertIsNone(await store.find_approval("3", row.public_key_sha256, "CN=other"))

    async def test_one_live_request_per_key(self) -> None:
        """Adding a second request for a key with a live one returns the
        live one and records nothing; after it ends, a new one is added."""
        store = await self.open_store()
        key = new_key()
        first = await store.add_approval(approval("req-1", key=key))
        again = await store.add_approval(approval("req-2", key=key))
        self.assertEqual(again.request_id, "req-1")
        self.assertEqual(len(await store.list_approvals()), 1)
        self.assertTrue(await store.expire_approval(first.request_id, T0))
        self.assertEqual((await store.add_approval(approval("req-3", key=key))).request_id, "req-3")
        self.assertEqual((await store.find_approval(*first.key)).request_id, "req-3")

    async def test_two_connections_race_to_add(self) -> None:
        """Two store connections adding a request for the same key at once
        end with one row, and both get it."""
        store_a, store_b = await self.open_store(), await self.open_store()
        key = new_key()
        a = store_a.add_approval(approval("req-a", key=key))
        b = store_b.add_approval(approval("req-b", key=key))
        got_a, got_b = await a, await b
        self.assertEqual(got_a.request_id, got_b.request_id)
        self.assertEqual(len(await store_a.list_approvals()), 1)

    async def test_decisions_only_from_pending(self) -> None:
        """A decision applies to a pending request only; a later one leaves
        the first decision as it was."""
        store = await self.open_store()
        await store.add_approval(approval("req-1"))
        later = T0 + timedelta(hours=1)
        decided = await store.decide_approval("req-1", "rejected", "no", T0 + timedelta(days=3), later)
        self.assertEqual((decided.state, decided.reason, decided.decided_at), ("rejected", "no", later))
        again = await store.decide_approval("req-1", "approved", None, T0 + timedelta(days=9), later)
        self.assertEqual((again.state, again.reason, again.expires_at), ("rejected", "no", T0 + timedelta(days=3)))
        self.assertFalse(await store.expire_approval("req-1", later))
        with self.assertRaises(ValueError):
            await store.decide_approval("req-1", "issued", None, later, later)
        self.assertIsNone(await store.decide_approval("req-9", "approved", None, later, later))

    async def test_issue_approved_once(self) -> None:
        """issue_approved moves approved -> issued and records the
        certificate in one step, for one caller only; an unapproved request
        records nothing."""
        store = await self.open_store()
        await store.add_approval(approval("req-1"))
        issued = self.issued()
        self.assertFalse(await store.issue_approved("req-1", issued))  # still pending
        self.assertEqual(await store.count_certificates(), 0)
        await store.decide_approval("req-1", "approved", None, T0 + timedelta(days=3), T0)
        self.assertTrue(await store.issue_approved("req-1", issued))
        self.assertFalse(await store.issue_approved("req-1", self.issued()))
        self.assertEqual(await store.count_certificates(), 1)
        row = await store.get_approval("req-1")
        self.assertEqual((row.state, row.serial), ("issued", issued.serial))
        self.assertEqual([r.request_id for r in await store.list_approvals("issued")], ["req-1"])

    async def test_two_connections_race_to_issue(self) -> None:
        """Six issue_approved calls for one approved request, through two
        stores at once (as two gateway processes retrying): one records its
        certificate, the others record nothing."""
        store_a, store_b = await self.open_store(), await self.open_store()
        await store_a.add_approval(approval("req-1"))
        await store_a.decide_approval("req-1", "approved", None, T0 + timedelta(days=3), T0)
        candidates = [self.issued() for _ in range(6)]
        results = await defer.gatherResults(
            [(store_a, store_b)[i % 2].issue_approved("req-1", c) for i, c in enumerate(candidates)]
        )
        self.assertEqual(sorted(results), [False] * 5 + [True])
        self.assertEqual(await store_b.count_certificates(), 1)
        winner = candidates[results.index(True)]
        self.assertEqual((await store_b.get_approval("req-1")).serial, winner.serial)

    async def test_submission_recorded(self) -> None:
        """The submission time is recorded, and can be cleared again."""
        store = await self.open_store()
        await store.add_approval(approval("req-1"))
        await store.set_approval_submitted("req-1", T0)
        self.assertEqual((await store.get_approval("req-1")).submitted_at, T0)
        await store.set_approval_submitted("req-1", None)
        self.assertIsNone((await store.get_approval("req-1")).submitted_at)


class PostgreSQLApprovalStoreTests(ApprovalStoreTests):
    """The same on a fresh PostgreSQL database: two stores are two pools, as
    two gateway processes have."""

    _url: str | None = None

    @property
    def store_class(self) -> Any:  # type: ignore[override]
        from estgw.store.postgresql import PostgreSQLStore

        return PostgreSQLStore

    async def location(self) -> str:
        if self._url is None:
            self._url = await postgresql.new_database(self)
        return self._url

