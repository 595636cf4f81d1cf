"""Several gateways on one PostgreSQL store, and the CLI on PostgreSQL.

Two real gateways (two GatewayServices, each with its own store and
connection pool, as two processes or machines have), sharing one CA (the
state directory) and one PostgreSQL database, with curl as the devices.
The store-backed rules must hold across them: a single-use registration
issues once, the last-issued rule and revocations are seen by both at
once.  The server is a private one (tests/postgresql.py).
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from estgw import cli, config as config_module
from estgw.passwords import hash_password
from estgw.store import (
    FAULT_LOCKED,
    FAULT_READ_ONLY,
    Approval,
    Device,
    OfficerRole,
    SQLiteStore,
    StoreUnavailable,
    open_store,
)
from estgw.store.migrations import MIGRATIONS
from estgw.testing import (
    TEST_CONFIG,
    HTTPResult,
    RunningGateway,
    _which,
    cert_pem,
    key_pem,
    make_csr,
    new_key,
    run_process,
    write,
)
from estgw.protocol import decode_certs_only
from tests import postgresql
from tests.test_twistd import TwistdTestCase
from tests.test_store import T0, issued

PASSWORD = "s3cret pass"


def config_text(state: str, url: str) -> str:
    return TEST_CONFIG.replace("state.directory = state\n", f"state.directory = {state}\n") + (
        f"store.url = {url}\n"
        # true turns the last-issued rule ON (the model product's name).
        "handler.3.allowRenewalWithOldCertificates = true\n"
    )


def certificate_of(result: HTTPResult) -> x509.Certificate:
    (cert,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(result.body))
    return cert


class TwoGatewaysTests(TestCase):
    async def setUp(self) -> None:
        self.url = await postgresql.new_database(self)
        base = os.path.abspath(self.mktemp())
        state = os.path.join(base, "state")  # one CA for both, as a shared volume or a copy would give
        self.a = RunningGateway(os.path.join(base, "a"), config_text(state, self.url))
        await self.a.run()
        self.addCleanup(self.a.stop)
        self.b = RunningGateway(os.path.join(base, "b"), config_text(state, self.url))
        await self.b.run()
        self.addCleanup(self.b.stop)
        self.files = os.path.join(base, "files")
        os.makedirs(self.files)
        self.serial = 0

    def csr(self, common_name: str) -> tuple[str, bytes]:
        """A new key (its PEM file) and a base64 CSR for ``common_name``."""
        key = new_key()
        self.serial += 1
        path = write(os.path.join(self.files, f"key-{self.serial}.pem"), key_pem(key))
        der = make_csr(key, common_name).public_bytes(encoding=Encoding.DER)
        return path, base64.b64encode(der)

    def save(self, cert: x509.Certificate) -> str:
        self.serial += 1
        return write(os.path.join(self.files, f"cert-{self.serial}.pem"), cert_pem(cert))

    async def enroll_with_password(self, gateway: RunningGateway, device: str) -> tuple[str, str]:
        key, csr = self.csr(device)
        result = await gateway.curl("simpleenroll", csr, user=f"{device}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        return self.save(certificate_of(result)), key

    def test_both_on_one_database(self) -> None:
        """Both gateways really use the one PostgreSQL store."""
        self.assertEqual(repr(self.a.store), repr(self.b.store))
        self.assertIn("PostgreSQLStore", repr(self.a.store))
        self.assertIsNot(self.a.store, self.b.store)

    async def test_single_use_issues_once_across_gateways(self) -> None:
        """
        Six enrollments with one single-use registration, three at each
        gateway, all at once: one certificate, five refusals as consumed,
        and the store holds one record.
        """
        await self.a.store.add_device(Device("once", hash_password(PASSWORD), single_use=True))
        attempts = []
        for gateway in (self.a, self.b) * 3:
            _, csr = self.csr("once")
            attempts.append(defer.Deferred.fromCoroutine(gateway.curl("simpleenroll", csr, user=f"once:{PASSWORD}")))
        results = await defer.gatherResults(attempts)
        self.assertEqual(sorted(r.status for r in results), [200, 403, 403, 403, 403, 403], [r.text for r in results])
        for r in results:
            if r.status == 403:
                self.assertIn("already been used", r.text)
        self.assertEqual(await self.b.store.count_certificates(), 1)
        self.assertIsNotNone((await self.b.store.get_device("once")).consumed_at)

    async def test_last_issued_rule_across_gateways(self) -> None:
        """
        A renewal at one gateway makes the older certificate unusable for
        renewal at the other at once; then six concurrent renewals with
        the newest certificate, three at each gateway, record exactly one
        new certificate, and the others are refused.
        """
        await self.a.store.add_device(Device("dev-1", hash_password(PASSWORD)))
        first, first_key = await self.enroll_with_password(self.a, "dev-1")
        second_key, csr = self.csr("dev-1")
        renewed = await self.b.curl("simplereenroll", csr, cert=first, key=first_key)
        self.assertEqual(renewed.status, 200, renewed.text)
        second = self.save(certificate_of(renewed))
        _, csr = self.csr("dev-1")
        stale = await self.a.curl("simplereenroll", csr, cert=first, key=first_key)
        self.assertEqual(stale.status, 403, stale.text)
        self.assertIn("a newer one exists", stale.text)
        self.assertEqual(await self.a.store.count_certificates(), 2)

        attempts = []
        for gateway in (self.a, self.b) * 3:
            _, csr = self.csr("dev-1")
            attempts.append(defer.Deferred.fromCoroutine(gateway.curl("simplereenroll", csr, cert=second, key=second_key)))
        results = await defer.gatherResults(attempts)
        self.assertEqual(sorted(r.status for r in results), [200, 403, 403, 403, 403, 403], [r.text for r in results])
        for r in results:
            if r.status == 403:
                self.assertIn("a newer one exists", r.text)
        self.assertEqual(await self.b.store.count_certificates(), 3)
        (winner,) = [certificate_of(r) for r in results if r.status == 200]
        for gateway in (self.a, self.b):
            last = await gateway.store.last_issued_for_subject("CN=dev-1")
            self.assertEqual(last.serial, winner.serial_number)

    async def test_revocation_seen_by_the_other_gateway(self) -> None:
        """
        A certificate revoked through one gateway's store is refused by the
        other on its next request, with no restart and nothing issued.
        """
        await self.a.store.add_device(Device("dev-2", hash_password(PASSWORD)))
        cert, key = await self.enroll_with_password(self.b, "dev-2")
        with open(cert, "rb") as f:
            serial = x509.load_pem_x509_certificate(f.read()).serial_number
        await self.a.store.revoke_certificate(serial, "keyCompromise")
        _, csr = self.csr("dev-2")
        result = await self.b.curl("simplereenroll", csr, cert=cert, key=key)
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("revoked", result.text)
        self.assertEqual(await self.b.store.count_certificates(), 1)


class ReadinessTests(TestCase):
    """/health/ready asks PostgreSQL whether it could take a write now."""

    async def setUp(self) -> None:
        self.url = await postgresql.new_database(self)
        base = os.path.abspath(self.mktemp())
        self.gateway = RunningGateway(os.path.join(base, "a"), config_text(os.path.join(base, "state"), self.url))
        await self.gateway.run()
        self.addCleanup(self.gateway.stop)

    async def ready(self) -> HTTPResult:
        return await self.gateway.curl("/health/ready")

    async def test_table_locked_by_another_session(self) -> None:
        """Another session holds an EXCLUSIVE lock on the certificates table
        (an INSERT would wait for it): 503 saying so, naming no host, user
        or database (the log has them); ready again once it lets go."""
        import psycopg

        self.assertEqual((await self.ready()).status, 200)
        other = await threads.deferToThread(psycopg.connect, self.url)
        self.addCleanup(other.close)
        await threads.deferToThread(other.execute, "LOCK TABLE certificates IN EXCLUSIVE MODE")
        try:
            self.assertIsNone(await self.gateway.store.get_certificate(0))  # reads still pass
            await task.deferLater(reactor, 2.0, lambda: None)  # the cached outcome expires
            result = await self.ready()
        finally:
            await threads.deferToThread(other.rollback)
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.text, f"not ready\nstore: {FAULT_LOCKED}\n")
        self.assertNotIn("estgw", result.text)  # the user, the database
        await task.deferLater(reactor, 2.0, lambda: None)
        self.assertEqual((await self.ready()).status, 200)

    async def test_read_only_database(self) -> None:
        """The database turned read-only (as a standby after a failover is):
        once the store's connections are replaced, 503 "takes no writes"."""
        (database,) = postgresql.query(self.url, "SELECT current_database()")[0]
        postgresql.query(self.url, f"ALTER DATABASE {database} SET default_transaction_read_only = on")
        postgresql.query(
            self.url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'estgw'",
        )
        result = await self.ready()
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.text, f"not ready\nstore: {FAULT_READ_ONLY}\n")
        self.assertNotIn(database, result.text)
        # Enrollments fail there too: the readiness answer is the truth.
        with self.assertRaises(StoreUnavailable):
            await self.gateway.store.add_audit(T0, "os:test", "probe", "nothing", "")


class CLITests(TestCase):
    """`estgw init` and `estgw store migrate` with a PostgreSQL store."""

    async def setUp(self) -> None:
        self.url = await postgresql.new_database(self)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    def write_config(self, url: str) -> str:
        return write(os.path.join(self.directory, "est.properties"), config_text("state", url).encode())

    async def cli(self, config: str, *argv: str) -> str:
        out = io.StringIO()
        await cli.run(reactor, ["--config", config, *argv], out)
        return out.getvalue()

    async def test_check_store_reaches_the_server(self) -> None:
        """
        The start-up check (before twistd detaches) passes for a reachable
        PostgreSQL store and names store.url with libpq's reason, and no
        password, for one that is not.
        """
        from estgw import bootstrap
        from estgw.config import ConfigError

        bootstrap.check_store(config_module.load(self.write_config(self.url)))
        nowhere = tempfile.mkdtemp()  # short: a socket path has at most 107 bytes
        self.addCleanup(os.rmdir, nowhere)
        config = config_module.load(self.write_config(f"postgresql://estgw:s3cret@/estgw?host={nowhere}"))
        with self.assertRaises(ConfigError) as caught:
            bootstrap.check_store(config)
        self.assertEqual(caught.exception.key, "store.url")
        self.assertIn("cannot connect to the PostgreSQL server", str(caught.exception))
        self.assertIn(nowhere, str(caught.exception))
        self.assertNotIn("s3cret", str(caught.exception))

    async def test_init_creates_the_schema(self) -> None:
        """
        `estgw init` with store.url = postgresql://... creates the schema at
        the newest version, and says which store, without a password.
        """
        url = self.url.replace("estgw@", "estgw:not-needed@")  # trust auth ignores it
        output = await self.cli(self.write_config(url), "init")
        self.assertIn("store:           postgresql://estgw:***@", output)
        self.assertNotIn("not-needed", output)
        self.assertEqual(postgresql.query(self.url, "SELECT version FROM schema_version"), [(MIGRATIONS[-1][0],)])
        # init again: idempotent.
        self.assertEqual(await self.cli(self.write_config(url), "init"), output)

    async def fill_sqlite(self, path: str) -> dict[str, Any]:
        """A SQLite store with a row in every table; what was written."""
        store = SQLiteStore(path)
        await store.start()
        try:
            records = [issued("a", issued_at=T0), issued("a", serial=5, issued_at=T0), issued("b", issued_at=T0)]
            for record in records:
                await store.record_certificate(record)
            revoked = await store.revoke_certificate(records[2].serial, "superseded", T0 + timedelta(days=1))
            device = Device("pump-1", hash_password("pw"), True, T0, factory_cert_sha256="ab" * 32,
                            subject_values=(("DNS", "pump-1.example"),))
            await store.add_device(device)
            role = OfficerRole("cd" * 32, "ra", "CN=ra", "CN=ca", 7, T0)
            await store.add_officer_role(role)
            approval = Approval("req-1", "2", "ef" * 32, "CN=c", "device:c", b"\x30\x00", T0, T0 + timedelta(days=1))
            await store.add_approval(approval)
            return {
                "certificates": await store.list_certificates(),
                "revoked": revoked,
                "device": device,
                "role": role,
                "approval": approval,
            }
        finally:
            await store.close()

    async def test_migrate_copies_every_table(self) -> None:
        """
        `estgw store migrate --to postgresql://...` copies certificates
        (revocations, issue order with ties), devices, officer roles and
        approvals; the copy reads back equal, and new rows follow the
        copied ones.
        """
        config = self.write_config("sqlite:estgw.sqlite")
        await self.cli(config, "init")
        loaded = config_module.load(config)
        wrote = await self.fill_sqlite(loaded.store_path)
        output = await self.cli(config, "store", "migrate", "--to", self.url)
        self.assertIn("copied 3 certificates, 1 devices, 1 officer_roles, 1 approvals, ", output)
        self.assertIn(f"set store.url = {self.url}", output)

        target = open_store(self.url)
        await target.start()
        self.addCleanup(target.close)
        self.assertEqual(await target.list_certificates(), wrote["certificates"])
        self.assertEqual(await target.get_certificate(wrote["revoked"].serial), wrote["revoked"])
        self.assertEqual(await target.get_device("pump-1"), wrote["device"])
        self.assertEqual(await target.get_device_by_factory_cert("ab" * 32), wrote["device"])
        self.assertEqual(await target.list_officer_roles(), [wrote["role"]])
        self.assertEqual(await target.get_approval("req-1"), wrote["approval"])
        # The audit trail goes on in the copy, with the migration itself last.
        (last,) = (await target.list_audit(1))
        self.assertEqual((last.action, last.target), ("store-migrate", self.url))
        self.assertIn("copied 3 certificates", last.details)
        # Ids go on after the copied ones: a new certificate is the newest.
        newer = issued("a", issued_at=T0)
        await target.record_certificate(newer)
        self.assertEqual((await target.last_issued_for_subject("O=Example,CN=a")).serial, newer.serial)

    async def test_migrate_refuses_a_non_empty_target(self) -> None:
        """
        A second migrate into the same database is refused, naming the
        reason, and changes nothing there.
        """
        config = self.write_config("sqlite:estgw.sqlite")
        await self.cli(config, "init")
        await self.fill_sqlite(config_module.load(config).store_path)
        await self.cli(config, "store", "migrate", "--to", self.url)
        with self.assertRaises(cli.CommandError) as caught:
            await self.cli(config, "store", "migrate", "--to", self.url)
        self.assertIn("already holds data", str(caught.exception))
        self.assertIn("nothing was copied", str(caught.exception))
        self.assertEqual(postgresql.query(self.url, "SELECT COUNT(*) FROM certificates"), [(3,)])

    async def test_migrate_needs_a_sqlite_source_and_a_good_target(self) -> None:
        """
        migrate from a PostgreSQL store, to a URL of no known kind, or onto
        the store itself, is refused with the reason.
        """
        config = self.write_config(self.url)
        with self.assertRaises(cli.CommandError) as caught:
            await self.cli(config, "store", "migrate", "--to", "sqlite:copy.sqlite")
        self.assertIn("copies a SQLite store", str(caught.exception))
        config = self.write_config("sqlite:estgw.sqlite")
        with self.assertRaises(cli.CommandError) as caught:
            await self.cli(config, "store", "migrate", "--to", "mysql://db/x")
        self.assertIn("--to: expected sqlite:PATH or postgresql://", str(caught.exception))
        path = config_module.load(config).store_path
        with self.assertRaises(cli.CommandError) as caught:
            await self.cli(config, "store", "migrate", "--to", f"sqlite:{path}")
        self.assertIn("names the store being copied", str(caught.exception))

    async def test_migrate_to_sqlite(self) -> None:
        """The copy works into any store kind: here a second SQLite file."""
        config = self.write_config("sqlite:estgw.sqlite")
        await self.cli(config, "init")
        wrote = await self.fill_sqlite(config_module.load(config).store_path)
        copy = os.path.join(self.directory, "copy.sqlite")
        await self.cli(config, "store", "migrate", "--to", f"sqlite:{copy}")
        target = SQLiteStore(copy)
        await target.start()
        self.addCleanup(target.close)
        self.assertEqual(await target.list_certificates(), wrote["certificates"])
        self.assertEqual(await target.list_officer_roles(), [wrote["role"]])

        # A relative --to is where the command runs; the advice names it
        # absolutely (est.properties would read it from the state directory).
        output = await self.cli(config, "store", "migrate", "--to", "sqlite:relative-copy.sqlite")
        self.addCleanup(os.remove, os.path.abspath("relative-copy.sqlite"))
        self.assertIn(f"set store.url = sqlite:{os.path.abspath('relative-copy.sqlite')} in ", output)


class DaemonsTests(TwistdTestCase):
    """Two real ``twistd estgw`` processes on one PostgreSQL database."""

    async def test_two_daemons_single_use_and_revocation(self) -> None:
        """
        After `estgw init` (CA, TLS, schema), two daemons serve from one
        state directory and one database: six concurrent enrollments with
        one single-use registration, three at each, issue one certificate;
        a certificate revoked with the CLI is refused by both at once.
        """
        url = await postgresql.new_database(self)
        with open(self.config, "a") as f:
            f.write(f"\nstore.url = {url}\n")
        with open(self.config) as f:
            text = f.read()
        self.assertEqual(text.count("store.url = "), 2)
        # A key given twice is an error: keep only ours.
        with open(self.config, "w") as f:
            f.write(text.replace("store.url = sqlite:estgw.sqlite\n", "", 1))
        init = await self.cli("init")
        self.assertEqual(init.code, 0, init.stderr.decode())
        first, second = self.spawn("--port", "0"), self.spawn("--port", "0")
        await defer.gatherResults([first.ready(), second.ready()])
        added = await self.cli("device", "add", "once", "--password", "pw", "--single-use")
        self.assertEqual(added.code, 0, added.stderr.decode())

        def enroll(port: int) -> defer.Deferred:
            # Files of its own per request (the shared helper's would collide).
            directory = tempfile.mkdtemp(dir=self.directory)
            body, request = os.path.join(directory, "body"), os.path.join(directory, "request")
            csr = make_csr(new_key(), "once").public_bytes(Encoding.DER)
            write(request, base64.b64encode(csr))
            argv = [
                _which("curl"), "-sS", "--max-time", "20", "-o", body, "-w", "%{http_code}",
                "--cacert", os.path.join(self.directory, "state", "ca", "root-ca.pem"),
                "--basic", "-u", "once:pw", "-H", "Content-Type: application/pkcs10",
                "--data-binary", "@" + request, f"https://localhost:{port}/.well-known/est/simpleenroll",
            ]

            async def run() -> tuple[int, bytes]:
                result = await run_process(argv)
                with open(body, "rb") as f:
                    return int(result.stdout or b"0"), f.read()

            return defer.Deferred.fromCoroutine(run())

        results = await defer.gatherResults([enroll(d.port) for d in (first, second) * 3])
        self.assertEqual(sorted(status for status, _ in results), [200, 403, 403, 403, 403, 403])
        (body,) = [body for status, body in results if status == 200]
        (cert,) = decode_certs_only(body)
        listed = await self.cli("cert", "list")
        self.assertEqual(listed.stdout.count(b"device:once"), 1, listed.stdout)

        revoked = await self.cli("cert", "revoke", f"{cert.serial_number:x}")
        self.assertEqual(revoked.code, 0, revoked.stderr.decode())
        crl = await self.cli("crl", "write")
        self.assertIn(b"wrote CRL of 1 revoked certificate(s)", crl.stdout)
        self.assertEqual(postgresql.query(url, "SELECT COUNT(*) FROM certificates WHERE revoked_at IS NOT NULL"), [(1,)])
        for daemon in (first, second):
            self.assertIn(b"serving EST at", daemon.output)

