"""HTTP Digest (qop=auth) for pre-registered devices: through curl over
real TLS, and the response checks twisted.cred leaves to us, unit-tested
with hand-made responses."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from estgw import auth, httpauth
from estgw.config import from_string
from estgw.passwords import hash_password
from estgw.refusal import Refusal
from estgw.store import Device, SQLiteStore
from estgw.testing import TEST_CONFIG, HTTPResult, RunningGateway, _which, run_process, write
from estgw.tls import PeerInfo
from tests import postgresql
from tests.test_auth import AuditLog, SecurityTestCase, csr_for, run_cli
from tests.test_twistd import TwistdTestCase

DIGEST_PATH = b"/.well-known/est/digest/simpleenroll"


class DigestOverTLSTests(SecurityTestCase):
    """curl --digest against handler 20 (authtype Digest, realm "digest realm")."""

    async def setUp(self) -> None:
        await self.setUpGateway()

    async def test_digest_success(self) -> None:
        """A device registered with the CLI enrolls with Digest: a 401
        challenge first, then the certificate, recorded for the device."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        await self.assertIssued(result, "device:pump-17")
        self.assertEqual(self.audit.refused, ["authentication-required"])

    async def test_digest_wrong_password(self) -> None:
        """A wrong password: 401 with a fresh Digest challenge, nothing issued."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:wrong", digest=True)
        await self.assertRefused(result, 401, "bad-credentials", "unknown device or wrong password", challenges=1)
        challenge = result.headers["www-authenticate"]
        self.assertTrue(challenge.startswith('Digest realm="digest realm", '), challenge)
        for part in ('qop="auth"', "algorithm=MD5", "nonce=", "opaque="):
            self.assertIn(part, challenge)

    async def test_digest_unknown_device(self) -> None:
        """An unknown device id: the same 401 as a wrong password."""
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("ghost"), user="ghost:s3cret", digest=True)
        await self.assertRefused(result, 401, "bad-credentials", "unknown device or wrong password", challenges=1)

    async def test_device_without_digest_hash(self) -> None:
        """A device registered without a hash for this realm cannot use
        Digest (401), and the operator is told to register it again."""
        warnings: list[dict] = []
        globalLogPublisher.addObserver(warnings.append)
        self.addCleanup(globalLogPublisher.removeObserver, warnings.append)
        await self.gateway.store.add_device(Device("pump-17", hash_password("s3cret")))
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        await self.assertRefused(result, 401, "bad-credentials", "unknown device or wrong password", challenges=1)
        told = [e for e in warnings if "no Digest hash" in e.get("log_format", "")]
        self.assertEqual([(e["device"], e["realm"]) for e in told], [("pump-17", "digest realm")])
        self.assertNotIn("s3cret", repr(told))

    async def test_basic_on_digest_handler(self) -> None:
        """Basic credentials sent to a Digest handler: 401 naming Digest."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret")
        await self.assertRefused(result, 401, "wrong-auth-scheme", "takes HTTP Digest authentication")

    async def test_replayed_response_refused(self) -> None:
        """The Authorization header of a successful Digest enrollment, sent
        again unchanged with another CSR: 401 digest-replayed with a fresh
        challenge marked stale=true, and no second certificate."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        first = await self.gateway.curl(
            "digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True, extra=["-v"]
        )
        await self.assertIssued(first, "device:pump-17")
        header = sent_authorization(first)
        self.audit.events.clear()
        replay = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), headers=[header])
        await self.assertRefused(replay, 401, "digest-replayed", "this Digest response was used before", before=1)
        challenge = replay.headers["www-authenticate"]
        self.assertTrue(challenge.startswith('Digest realm="digest realm", '), challenge)
        self.assertIn("stale=true", challenge)

    async def test_replayed_to_another_process(self) -> None:
        """A second gateway on the same state directory and store (as a
        second process would be) accepts the first one's challenges and
        refuses a response the first one accepted."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        with open(self.gateway.config_path) as f:
            other = RunningGateway(self.gateway.directory, f.read())
        await other.run()
        self.addCleanup(other.stop)
        first = await self.gateway.curl(
            "digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True, extra=["-v"]
        )
        await self.assertIssued(first, "device:pump-17")
        self.audit.events.clear()
        replay = await other.curl("digest/simpleenroll", data=csr_for("pump-17"), headers=[sent_authorization(first)])
        await self.assertRefused(replay, 401, "digest-replayed", "used before", before=1)
        self.audit.events.clear()
        again = await other.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        self.assertEqual(again.status, 200, again.text)
        self.assertEqual(await self.gateway.store.count_certificates(), 2)

    async def test_store_fails_recording_the_count(self) -> None:
        """The store cannot record the nonce count (the database fails
        under the write): 503 store-unavailable, as any store fault, and
        nothing issued; once the store is back, the same login works."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        path = self.gateway.store.path
        other = sqlite3.connect(path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("ALTER TABLE digest_nonce RENAME TO digest_nonce_away")
        failed = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        await self.assertRefused(failed, 503, "store-unavailable", "cannot use its certificate store", challenges=1)
        self.assertEqual(failed.headers["retry-after"], "30")
        self.flushLoggedErrors()
        other.execute("ALTER TABLE digest_nonce_away RENAME TO digest_nonce")
        self.audit.events.clear()
        again = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        await self.assertIssued(again, "device:pump-17")

    async def test_no_file_of_its_own(self) -> None:
        """The nonce counts are the store's: no other file in the state directory."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        await self.assertIssued(result, "device:pump-17")
        self.assertEqual(await self.gateway.store._run(_nonce_rows), 1)
        self.assertFalse(os.path.exists(os.path.join(self.gateway.config.state_directory, "digest-nonces.sqlite3")))

    async def test_registration_stores_realm_hashes(self) -> None:
        """device add stores H(A1) for each Digest realm of the config and
        for no other realm; the Basic hash is scrypt."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        device = await self.gateway.store.get_device("pump-17")
        expected = hashlib.md5(b"pump-17:digest realm:s3cret").hexdigest()
        self.assertEqual(device.digest_ha1, (("digest realm", expected),))
        self.assertTrue(device.password_hash.startswith("scrypt$"))
        self.assertNotIn("ha1", repr(device).lower())


def _nonce_rows(txn: object) -> int:
    txn.execute("SELECT COUNT(*) FROM digest_nonce")  # type: ignore[attr-defined]
    return int(txn.fetchone()[0])  # type: ignore[attr-defined]


class DigestAcrossGatewaysTests(SecurityTestCase):
    """Two gateways on one store, each with a state directory of its own:
    the second's a copy of the first's (the CA and the Digest key), as on
    two machines behind one load balancer.  Here the store is one SQLite
    file; :class:`PostgreSQLDigestAcrossGatewaysTests` runs the same on
    PostgreSQL."""

    async def store_url(self, directory: str) -> str:
        return "sqlite:" + os.path.join(directory, "shared.sqlite3")

    async def setUp(self) -> None:
        self.audit = AuditLog(self)
        base = os.path.abspath(self.mktemp())
        url = await self.store_url(base)
        self.gateways = []
        for name in ("a", "b"):
            state = os.path.join(base, name, "state")
            if name == "b":
                shutil.copytree(os.path.join(base, "a", "state"), state)
            config = TEST_CONFIG.replace("state.directory = state\n", f"state.directory = {state}\n") + (
                f"store.url = {url}\n"
                "handler.20.operation = simpleenroll\nhandler.20.label = digest\n"
                "handler.20.authtype = Digest\nhandler.20.realm = digest realm\n"
            )
            gateway = RunningGateway(os.path.join(base, name), config)
            await gateway.run()
            self.addCleanup(gateway.stop)
            self.gateways.append(gateway)
        self.gateway = self.gateways[0]  # the store the assertions count in
        ha1 = auth.digest_ha1("pump-17", "digest realm", "s3cret")
        await self.gateway.store.add_device(Device("pump-17", hash_password("s3cret"), digest_ha1={"digest realm": ha1}))

    async def test_replayed_to_the_other_gateway(self) -> None:
        """A response accepted by one gateway, replayed to the other (and to
        itself): 401 digest-replayed with stale=true and no certificate;
        a fresh login at the other gateway still enrolls."""
        one, other = self.gateways
        self.assertNotEqual(one.config.state_directory, other.config.state_directory)
        first = await one.curl(
            "digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True, extra=["-v"]
        )
        await self.assertIssued(first, "device:pump-17")
        header = sent_authorization(first)
        for gateway in (other, one, other):
            self.audit.events.clear()
            replay = await gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), headers=[header])
            await self.assertRefused(
                replay, 401, "digest-replayed", "this Digest response was used before (nonce count 00000001)", before=1
            )
            self.assertIn("stale=true", replay.headers["www-authenticate"])
        self.audit.events.clear()
        fresh = await other.curl("digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True)
        self.assertEqual(fresh.status, 200, fresh.text)
        self.assertEqual(await other.store.count_certificates(), 2)
        for gateway in self.gateways:
            self.assertFalse(os.path.exists(os.path.join(gateway.config.state_directory, "digest-nonces.sqlite3")))

    async def test_one_response_at_both_at_once(self) -> None:
        """The same response sent to both gateways at once, several times
        over: one certificate in all, every other answer digest-replayed."""
        one, other = self.gateways
        first = await one.curl(
            "digest/simpleenroll", data=csr_for("pump-17"), user="pump-17:s3cret", digest=True, extra=["-v"]
        )
        self.assertEqual(first.status, 200, first.text)
        # The next count on the same nonce: a new request, never sent before.
        header = sent_authorization(first)
        fields = dict(part.strip().split("=", 1) for part in header.split(" ", 2)[2].split(","))
        nonce, cnonce = fields["nonce"].strip('"'), fields["cnonce"].strip('"')
        ha1 = auth.digest_ha1("pump-17", "digest realm", "s3cret")
        ha2 = _md5(f"POST:{DIGEST_PATH.decode()}")
        digest = _md5(f"{ha1}:{nonce}:00000002:{cnonce}:auth:{ha2}")
        second = (
            header.replace("nc=00000001", "nc=00000002").replace(fields["response"], f'"{digest}"')
        )
        self.assertNotEqual(second, header)
        self.audit.events.clear()
        attempts = [
            defer.Deferred.fromCoroutine(gateway.curl("digest/simpleenroll", data=csr_for("pump-17"), headers=[second]))
            for gateway in (one, other) * 3
        ]
        results = await defer.gatherResults(attempts)
        self.assertEqual(sorted(r.status for r in results), [200, 401, 401, 401, 401, 401], [r.text for r in results])
        self.assertEqual(sorted(self.audit.refused), ["digest-replayed"] * 5)
        self.assertEqual(await one.store.count_certificates(), 2)


class PostgreSQLDigestAcrossGatewaysTests(DigestAcrossGatewaysTests):
    """The same with a PostgreSQL store (``store.url = postgresql://...``)."""

    async def store_url(self, directory: str) -> str:
        return await postgresql.new_database(self)


def sent_authorization(result: HTTPResult) -> str:
    """The last Authorization header curl -v sent."""
    sent = [line[2:] for line in result.stderr.decode("latin-1").splitlines() if line.lower().startswith("> authorization:")]
    assert sent, result.stderr
    return sent[-1].strip()


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class DigestResponseTests(TestCase):
    """auth.authenticate with hand-made Digest responses (DummyRequest)."""

    CONFIG = TEST_CONFIG + (
        "handler.20.operation = simpleenroll\nhandler.20.label = digest\n"
        "handler.20.authtype = Digest\nhandler.20.realm = r\n"
    )

    async def setUp(self) -> None:
        self.handler = from_string(self.CONFIG).handler("digest", "simpleenroll")
        self.store = SQLiteStore(os.path.abspath(self.mktemp()))
        await self.store.start()
        self.addCleanup(self.store.close)
        ha1 = auth.digest_ha1("pump-17", "r", "pw")
        await self.store.add_device(Device("pump-17", hash_password("pw"), digest_ha1={"r": ha1}))
        self.portal = auth.device_portal(self.store)
        self.peer = PeerInfo(is_tls=True)

    def request(self, authorization: str | None = None, uri: bytes = DIGEST_PATH) -> DummyRequest:
        request = DummyRequest([b"simpleenroll"])
        request.client = IPv4Address("TCP", "127.0.0.1", 40000)  # its __init__ drops client=
        request.method = b"POST"
        request.uri = uri
        if authorization is not None:
            request.requestHeaders.setRawHeaders(b"authorization", [authorization.encode()])
        return request

    def challenge(self) -> dict[str, str]:
        factory = self.portal.credential_factory(self.handler)
        fields = factory.getChallenge(self.request())
        return {k: v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}

    def response(self, password: str = "pw", uri: str = DIGEST_PATH.decode(), qop: bool = True,
                 algorithm: str = "MD5", challenge: dict[str, str] | None = None, nc: int = 1,
                 realm: str = "r", opaque: str | None = None) -> str:
        c = challenge or self.challenge()
        ha1, ha2 = _md5(f"pump-17:r:{password}"), _md5(f"POST:{uri}")
        if qop:
            digest = _md5(f"{ha1}:{c['nonce']}:{nc:08x}:0a4f113b:auth:{ha2}")
            extra = f', qop=auth, nc={nc:08x}, cnonce="0a4f113b"'
        else:  # RFC 2069 style
            digest = _md5(f"{ha1}:{c['nonce']}:{ha2}")
            extra = ""
        return (
            f'Digest username="pump-17", realm="{realm}", nonce="{c["nonce"]}", uri="{uri}", '
            f'response="{digest}", opaque="{opaque or c["opaque"]}", algorithm={algorithm}{extra}'
        )

    async def refusal(self, request: DummyRequest) -> Refusal:
        with self.assertRaises(Refusal) as caught:
            await auth.authenticate(request, self.handler, self.peer, self.portal)
        return caught.exception

    async def test_valid_response(self) -> None:
        """A correct qop=auth response authenticates the device."""
        identity = await auth.authenticate(self.request(self.response()), self.handler, self.peer, self.portal)
        self.assertEqual((identity.kind, identity.device_id), ("device", "pump-17"))

    async def test_no_qop(self) -> None:
        """A response without qop (RFC 2069) is refused though its digest is right."""
        refusal = await self.refusal(self.request(self.response(qop=False)))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-bad-response"))
        self.assertIn("qop=auth", refusal.reason)
        self.assertIn("WWW-Authenticate", refusal.headers)

    async def test_other_uri(self) -> None:
        """A response computed for another URI is refused."""
        other = "/.well-known/est/simpleenroll"
        refusal = await self.refusal(self.request(self.response(uri=other)))
        self.assertEqual((refusal.status, refusal.code, refusal.reason),
                         (401, "digest-bad-response", "the Digest response is for another URI"))

    async def test_other_algorithm(self) -> None:
        """A response claiming an algorithm other than MD5 is refused."""
        refusal = await self.refusal(self.request(self.response(algorithm="SHA")))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-bad-response"))

    async def test_replay_and_nonce_counts(self) -> None:
        """The same response twice: the second is 401 digest-replayed with
        stale=true; a higher nonce count on the same nonce is a new
        request and accepted; a lower one is a replay again."""
        c = self.challenge()
        header = self.response(challenge=c)
        await auth.authenticate(self.request(header), self.handler, self.peer, self.portal)
        refusal = await self.refusal(self.request(header))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-replayed"))
        self.assertIn("stale=true", refusal.headers["WWW-Authenticate"])
        identity = await auth.authenticate(self.request(self.response(challenge=c, nc=3)), self.handler, self.peer, self.portal)
        self.assertEqual(identity.device_id, "pump-17")
        refusal = await self.refusal(self.request(self.response(challenge=c, nc=2)))
        self.assertEqual(refusal.code, "digest-replayed")

    async def test_wrong_password_uses_no_count(self) -> None:
        """A wrong response does not use up the nonce count: the right
        one with the same nonce and nc still works."""
        c = self.challenge()
        refusal = await self.refusal(self.request(self.response(password="guess", challenge=c)))
        self.assertEqual(refusal.code, "bad-credentials")
        await auth.authenticate(self.request(self.response(challenge=c)), self.handler, self.peer, self.portal)

    async def test_stale_nonce(self) -> None:
        """A nonce older than its lifetime: 401 digest-nonce-stale, stale=true."""
        clock = task.Clock()
        clock.advance(1_800_000_000)
        self.portal = auth.device_portal(self.store, clock)
        header = self.response()
        clock.advance(httpauth.NONCE_LIFETIME + 1)
        refusal = await self.refusal(self.request(header))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-nonce-stale"))
        self.assertIn("stale=true", refusal.headers["WWW-Authenticate"])

    async def test_opaque_not_ours(self) -> None:
        """opaque="x-abc" (an internal error, 500, with twisted.cred's
        parser): 401 digest-nonce-invalid with a new challenge."""
        refusal = await self.refusal(self.request(self.response(opaque="x-abc")))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-nonce-invalid"))
        self.assertIn("opaque", refusal.reason)

    async def test_other_realm(self) -> None:
        """A response naming another realm than the handler's: digest-bad-response."""
        refusal = await self.refusal(self.request(self.response(realm="elsewhere")))
        self.assertEqual((refusal.status, refusal.code, refusal.reason),
                         (401, "digest-bad-response", "the Digest response is for another realm"))

    async def test_wrong_password(self) -> None:
        """A response made with another password: 401 bad-credentials."""
        refusal = await self.refusal(self.request(self.response(password="guess")))
        self.assertEqual((refusal.status, refusal.code), (401, "bad-credentials"))

    async def test_challenge_of_another_process(self) -> None:
        """A nonce this gateway did not make (e.g. the challenge of a process
        with another state directory) is refused with a new challenge."""
        stranger = auth.credential_factory(self.handler)
        fields = stranger.getChallenge(self.request())
        challenge = {k: v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}
        refusal = await self.refusal(self.request(self.response(challenge=challenge)))
        self.assertEqual((refusal.status, refusal.code), (401, "digest-nonce-invalid"))
        self.assertIn("not made by this gateway", refusal.reason)
        self.assertNotIn("stale", refusal.headers["WWW-Authenticate"])

    async def test_challenge_of_a_process_sharing_the_state(self) -> None:
        """Processes with the same state directory share the Digest key: a
        challenge made by one is answered to the other."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        secret = auth.digest_secret(directory)
        self.assertEqual(auth.digest_secret(directory), secret)
        self.assertEqual(os.stat(os.path.join(directory, auth.DIGEST_SECRET_FILE)).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(directory), [auth.DIGEST_SECRET_FILE])
        one = auth.device_portal(self.store, digest_secret=secret)
        other = auth.device_portal(self.store, digest_secret=secret)
        fields = one.credential_factory(self.handler).getChallenge(self.request())
        challenge = {k: v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}
        identity = await auth.authenticate(
            self.request(self.response(challenge=challenge)), self.handler, self.peer, other
        )
        self.assertEqual(identity.device_id, "pump-17")

    async def test_no_tls(self) -> None:
        """A correct response on a non-TLS channel: 403, never checked."""
        with self.assertRaises(Refusal) as caught:
            await auth.authenticate(self.request(self.response()), self.handler, PeerInfo(is_tls=False), self.portal)
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "http-auth-without-tls"))

    async def test_single_use_consumed(self) -> None:
        """Right Digest credentials of a consumed single-use device log in
        (its certificate may be sent again), and claiming the registration
        for a new certificate is refused: 403."""
        ha1 = auth.digest_ha1("once", "r", "pw")
        await self.store.add_device(Device("once", None, single_use=True, digest_ha1={"r": ha1}))
        await self.store.consume_device("once")
        c = self.challenge()
        ha2 = _md5(f"POST:{DIGEST_PATH.decode()}")
        digest = _md5(f"{ha1}:{c['nonce']}:00000001:0a4f113b:auth:{ha2}")
        header = (
            f'Digest username="once", realm="r", nonce="{c["nonce"]}", uri="{DIGEST_PATH.decode()}", '
            f'response="{digest}", opaque="{c["opaque"]}", qop=auth, nc=00000001, cnonce="0a4f113b"'
        )
        identity = await auth.authenticate(self.request(header), self.handler, self.peer, self.portal)
        self.assertIsNotNone(identity.registration.consumed_at)
        with self.assertRaises(Refusal) as caught:
            async with auth.single_use(self.store, identity):
                pass
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "single-use-consumed"))

    def test_ha1(self) -> None:
        """H(A1) is MD5 of id:realm:password, the password NFC-normalised."""
        self.assertEqual(auth.digest_ha1("d", "r", "pw"), hashlib.md5(b"d:r:pw").hexdigest())
        self.assertEqual(auth.digest_ha1("d", "r", "e\u0301"), auth.digest_ha1("d", "r", "\u00e9"))


class DigestAcrossDaemonsTests(TwistdTestCase):
    """Two real twistd daemons on one state directory, as several worker
    processes of one gateway would be."""

    async def test_replay_to_the_other_daemon(self) -> None:
        """A Digest response accepted by one daemon is refused by the other
        (401 digest-replayed), and a fresh login there works: the key is
        shared through the state directory, the nonce counts through the
        store."""
        with open(self.config, "a") as f:
            f.write("handler.90.operation = simpleenroll\nhandler.90.label = digest\n"
                    "handler.90.authtype = Digest\nhandler.90.realm = digest realm\n")
        one = await self.start()
        other = await self.start()
        added = await self.cli("device", "add", "pump-17", "--password", "s3cret")
        self.assertEqual(added.code, 0, added.stderr)
        ca = os.path.join(self.directory, "state", "ca", "root-ca.pem")
        request = write(os.path.join(self.directory, "csr.pem"), csr_for("pump-17"))

        async def curl(port: int, *options: str) -> tuple[int, bytes, bytes]:
            url = f"https://localhost:{port}/.well-known/est/digest/simpleenroll"
            result = await run_process([
                _which("curl"), "-sS", "-v", "--max-time", "20", "--cacert", ca, "-w", "\n%{http_code}",
                "-H", "Content-Type: application/pkcs10", "--data-binary", "@" + request, *options, url,
            ])
            body, _, status = result.stdout.rpartition(b"\n")
            return int(status or 0), body, result.stderr

        status, _, trace = await curl(one.port, "--digest", "-u", "pump-17:s3cret")
        self.assertEqual(status, 200, trace)
        header = sent_authorization(HTTPResult(status, {}, b"", trace))
        status, body, _ = await curl(other.port, "-H", header)
        self.assertEqual((status, body), (401, b"this Digest response was used before (nonce count 00000001):"
                                               b" answer the new challenge\n"))
        status, _, trace = await curl(other.port, "--digest", "-u", "pump-17:s3cret")
        self.assertEqual(status, 200, trace)
