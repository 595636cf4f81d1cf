"""The reference approval service's HTTP contract (docs/approval-api.rst),
through StubTreq with the caller's role injected, on a real SQLite store."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from treq.testing import StubTreq
from twisted.internet import task
from twisted.trial.unittest import TestCase

from estgw.approval.service import Caller, ServiceStore, build_site
from estgw.testing import make_csr, new_key

BASE = "https://approval.test/approval/requests"
START = 1_750_000_000.0


def identify(request: Any) -> Caller | None:
    """Tests say who calls in a header; the service reads the TLS chain."""
    header = request.getHeader(b"x-test-caller")
    if header is None:
        return None
    role, _, name = header.decode().partition(":")
    return Caller(role, name)


GATEWAY = {b"X-Test-Caller": [b"gateway:CN=gw-1"]}
OTHER_GATEWAY = {b"X-Test-Caller": [b"gateway:CN=gw-2"]}
OPERATOR = {b"X-Test-Caller": [b"operator:CN=alice"]}


def submission(request_id: str = "req-00000001", subject: str = "pump-17", key: Any = None) -> dict[str, Any]:
    csr = make_csr(key or new_key(), subject)
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return {
        "requestId": request_id,
        "handler": "3",
        "subject": csr.subject.rfc4514_string(),
        "publicKeySha256": hashlib.sha256(spki).hexdigest(),
        "requester": f"device:{subject}",
        "csr": csr.public_bytes(Encoding.PEM).decode(),
        "expiresAt": "2025-06-16T00:00:00Z",  # START + about a day
    }


class ServiceContractTests(TestCase):
    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.path = os.path.join(directory, "approval.sqlite")
        self.clock = task.Clock()
        self.clock.advance(START)
        await self.open()

    async def open(self) -> None:
        from twisted.internet import reactor

        self.store = ServiceStore(self.path, reactor)
        await self.store.start()
        self.addCleanup(self.store.close)
        self.stub = StubTreq(build_site(self.store, identify, self.clock).resource)

    async def call(self, method: str, url: str, headers: Any, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        """One request: (status, JSON body)."""
        if body is not None:
            kwargs["json"] = body
        response = await self.pumped(self.stub.request(method, url, headers=headers, **kwargs))
        self.location = response.headers.getRawHeaders(b"location")
        return response.code, json.loads(await self.pumped(self.stub.content(response)))

    async def pumped(self, d: Any) -> Any:
        """Pump StubTreq until ``d`` fires, while the store's thread works (bounded)."""
        from twisted.internet import reactor

        fired: list[bool] = []
        d.addBoth(lambda result: fired.append(True) or result)
        for _ in range(500):
            self.stub.flush()
            if fired:
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        return await d

    @property
    def first(self) -> dict[str, Any]:
        if not hasattr(self, "_first"):
            self._first = submission()
        return self._first

    async def test_resubmit_is_deduplicated(self) -> None:
        """A submission is 201 with a Location; the identical submission
        again is 200 with the same status, and still one request."""
        code, body = await self.call("POST", BASE, GATEWAY, self.first)
        self.assertEqual((code, body["requestId"], body["status"]), (201, "req-00000001", "pending"))
        self.assertEqual(self.location, [b"/approval/requests/req-00000001"])
        code, again = await self.call("POST", BASE, GATEWAY, self.first)
        self.assertEqual((code, again["status"]), (200, "pending"))
        self.assertEqual(len(await self.store.list()), 1)

    async def test_same_id_other_contents(self) -> None:
        """A known request id with another CSR is 409, not a silent merge."""
        await self.call("POST", BASE, GATEWAY, self.first)
        code, body = await self.call("POST", BASE, GATEWAY, submission(subject="pump-18"))
        self.assertEqual(code, 409)
        self.assertIn("other contents", body["error"])

    async def test_submission_must_fit_its_csr(self) -> None:
        """A public key hash or subject that is not the CSR's is 400; so is
        a body that is not JSON, and a short request id."""
        wrong_hash = dict(self.first, publicKeySha256="00" * 32)
        wrong_subject = dict(self.first, subject="CN=someone-else")
        short_id = dict(self.first, requestId="x")
        for body, words in ((wrong_hash, "publicKeySha256"), (wrong_subject, "subject"), (short_id, "requestId")):
            code, answer = await self.call("POST", BASE, GATEWAY, body)
            self.assertEqual(code, 400)
            self.assertIn(words, answer["error"])
        code, answer = await self.call("POST", BASE, GATEWAY, None, data=b"{nope")
        self.assertEqual((code, answer["error"]), (400, "the body is not JSON"))
        self.assertEqual(await self.store.list(), [])

    async def test_roles(self) -> None:
        """No certificate: 403; a gateway may not list or decide; an
        operator may not submit."""
        code, _ = await self.call("GET", BASE, {})
        self.assertEqual(code, 403)
        await self.call("POST", BASE, GATEWAY, self.first)
        for method, url in (("GET", BASE), ("POST", BASE + "/req-00000001/approve")):
            code, body = await self.call(method, url, GATEWAY, {})
            self.assertEqual(code, 403)
            self.assertIn("operator certificate", body["error"])
        code, body = await self.call("POST", BASE, OPERATOR, submission("req-00000002"))
        self.assertEqual(code, 403)
        self.assertEqual(len(await self.store.list()), 1)

    async def test_gateway_sees_only_its_own(self) -> None:
        """Another gateway asking for a request id it did not submit gets 404."""
        await self.call("POST", BASE, GATEWAY, self.first)
        code, _ = await self.call("GET", BASE + "/req-00000001", OTHER_GATEWAY)
        self.assertEqual(code, 404)
        code, body = await self.call("GET", BASE + "/req-00000001", GATEWAY)
        self.assertEqual((code, body["status"]), (200, "pending"))
        self.assertNotIn("csr", body)

    async def test_operator_approves(self) -> None:
        """An operator lists pending requests and approves one; the gateway
        then reads approved with the operator's name; a second decision is 409."""
        await self.call("POST", BASE, GATEWAY, self.first)
        code, listing = await self.call("GET", BASE, OPERATOR)
        self.assertEqual(code, 200)
        (entry,) = listing["requests"]
        self.assertEqual((entry["subject"], entry["requester"], entry["gateway"]), ("CN=pump-17", "device:pump-17", "CN=gw-1"))
        code, body = await self.call("POST", BASE + "/req-00000001/approve", OPERATOR, {})
        self.assertEqual((code, body["status"], body["decidedBy"]), (200, "approved", "CN=alice"))
        code, body = await self.call("GET", BASE + "/req-00000001", GATEWAY)
        self.assertEqual((body["status"], body["decidedBy"], body["reason"]), ("approved", "CN=alice", None))
        code, body = await self.call("POST", BASE + "/req-00000001/reject", OPERATOR, {"reason": "late"})
        self.assertEqual(code, 409)
        self.assertIn("already approved", body["error"])
        self.assertEqual((await self.call("GET", BASE, OPERATOR))[1]["requests"], [])

    async def test_operator_rejects_with_reason(self) -> None:
        """A rejection needs a reason, which the gateway then reads."""
        await self.call("POST", BASE, GATEWAY, self.first)
        code, body = await self.call("POST", BASE + "/req-00000001/reject", OPERATOR, {})
        self.assertEqual(code, 400)
        self.assertIn("reason", body["error"])
        code, body = await self.call("POST", BASE + "/req-00000001/reject", OPERATOR, {"reason": "not ours"})
        self.assertEqual((code, body["status"]), (200, "rejected"))
        code, body = await self.call("GET", BASE + "/req-00000001", GATEWAY)
        self.assertEqual((body["status"], body["reason"]), ("rejected", "not ours"))

    async def test_unknown_request(self) -> None:
        """Deciding or reading an unknown id is 404."""
        code, _ = await self.call("POST", BASE + "/req-00000404/approve", OPERATOR, {})
        self.assertEqual(code, 404)
        code, _ = await self.call("GET", BASE + "/req-00000404", OPERATOR)
        self.assertEqual(code, 404)

    async def test_expiry(self) -> None:
        """Past the gateway's expiresAt a request reads as expired and can
        no longer be approved."""
        await self.call("POST", BASE, GATEWAY, self.first)
        self.clock.advance(2 * 86400)
        code, body = await self.call("GET", BASE + "/req-00000001", GATEWAY)
        self.assertEqual(body["status"], "expired")
        code, body = await self.call("POST", BASE + "/req-00000001/approve", OPERATOR, {})
        self.assertEqual(code, 409)
        self.assertIn("already expired", body["error"])
        code, listing = await self.call("GET", BASE, OPERATOR, params={"status": "expired"})
        self.assertEqual([r["requestId"] for r in listing["requests"]], ["req-00000001"])

    async def test_durable(self) -> None:
        """Requests and decisions survive a restart of the service."""
        await self.call("POST", BASE, GATEWAY, self.first)
        await self.call("POST", BASE + "/req-00000001/approve", OPERATOR, {})
        self.store.close()
        await self.open()
        code, body = await self.call("GET", BASE + "/req-00000001", GATEWAY)
        self.assertEqual((code, body["status"]), (200, "approved"))
