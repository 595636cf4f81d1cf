"""The operator CLI: ``estgw --config FILE <command>``."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import bootstrap, config as config_module
from estgw.ca import IssueRequest, Profile
from estgw.cli import CommandError, format_serial, parse_serial, run
from estgw.passwords import verify_password
from estgw.store import IssuedCertificate
from estgw.testing import TEST_CONFIG, name, new_key, run_process, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ParseSerialTests(SynchronousTestCase):
    def test_hex_spellings(self) -> None:
        """Serials are hex, with or without 0x, colons, blanks or upper case."""
        for text in ("1a2b", "0x1A2B", "1a:2b", " 1A:2B ", "0X1a2b"):
            self.assertEqual(parse_serial(text), 0x1A2B, text)

    def test_rejects_what_is_not_hex(self) -> None:
        """Signs, underscores, decimal-looking junk and empty text are refused."""
        for text in ("", "0x", "-1", "+a", "1_0", "xyz", "12 34", "0x-5"):
            e = self.assertRaises(CommandError, parse_serial, text)
            self.assertIn("not a serial number", str(e))


class CLITestCase(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = write(os.path.join(self.directory, "est.properties"), TEST_CONFIG.encode())
        self.config = config_module.load(self.config_path)

    async def cli(self, *argv: str) -> str:
        out = io.StringIO()
        await run(reactor, ["--config", self.config_path, *argv], out)
        return out.getvalue()

    async def fails(self, *argv: str) -> str:
        """Run a command that must fail; return its message."""
        try:
            await self.cli(*argv)
        except CommandError as e:
            return str(e)
        self.fail(f"{argv} did not fail")

    async def issue(self, common_name: str = "dev-1") -> x509.Certificate:
        """A certificate signed by the local CA and recorded as the gateway would."""
        state = bootstrap.initialize(self.config)
        cert = state.ca.sign(
            IssueRequest(name(common_name), new_key().public_key(), (x509.DNSName(common_name),)),
            Profile(),
        )
        store = bootstrap.open_store(self.config, reactor)
        await store.start()
        try:
            await store.record_certificate(IssuedCertificate.from_certificate(cert, "2", f"device:{common_name}"))
        finally:
            await store.close()
        return cert


class InitTests(CLITestCase):
    async def test_init_is_idempotent(self) -> None:
        """init creates the CA, TLS credentials and store; a second init
        keeps them (same root certificate) and says where they are."""
        first = await self.cli("init")
        with open(self.config.ca_certificate_path, "rb") as f:
            root = f.read()
        self.assertTrue(os.path.exists(self.config.store_path))
        self.assertTrue(os.path.exists(os.path.join(self.config.tls_directory, "server.pem")))
        second = await self.cli("init")
        self.assertEqual(first, second)
        self.assertIn(self.config.ca_certificate_path, second)
        self.assertIn(self.config.store_path, second)
        with open(self.config.ca_certificate_path, "rb") as f:
            self.assertEqual(f.read(), root)

    async def test_bad_config(self) -> None:
        """A bad config file is a CommandError naming the key."""
        write(self.config_path, TEST_CONFIG.encode() + b"server.prot = 1\n")
        message = await self.fails("init")
        self.assertIn("server.prot: unknown key", message)
        self.assertFalse(os.path.exists(self.config.state_directory))


class DeviceTests(CLITestCase):
    async def stored_hash(self, device_id: str) -> str | None:
        store = bootstrap.open_store(self.config, reactor)
        await store.start()
        try:
            device = await store.get_device(device_id)
        finally:
            await store.close()
        return None if device is None else device.password_hash

    async def test_add_list_remove(self) -> None:
        """device add registers a password device, list shows it, remove drops it."""
        self.assertEqual(await self.cli("device", "list"), "no devices registered\n")
        self.assertEqual(await self.cli("device", "add", "pump-1", "--password", "pw-1"), "registered device pump-1\n")
        listing = await self.cli("device", "list")
        self.assertIn("pump-1", listing)
        self.assertIn("password", listing)
        self.assertNotIn("pw-1", listing)
        self.assertTrue(verify_password("pw-1", await self.stored_hash("pump-1")))
        self.assertEqual(await self.cli("device", "remove", "pump-1"), "removed device pump-1\n")
        self.assertEqual(await self.cli("device", "list"), "no devices registered\n")

    async def test_password_file(self) -> None:
        """--password-file reads the first line, without its line break."""
        path = write(os.path.join(self.directory, "pw"), b"from file\r\nsecond line\n")
        await self.cli("device", "add", "pump-2", "--password-file", path)
        stored = await self.stored_hash("pump-2")
        self.assertTrue(verify_password("from file", stored))
        self.assertFalse(verify_password("from file\r", stored))

    async def test_duplicate(self) -> None:
        """Adding an id twice fails with a message; the first password stays."""
        await self.cli("device", "add", "pump-3", "--password", "one")
        message = await self.fails("device", "add", "pump-3", "--password", "two")
        self.assertEqual(message, "device 'pump-3' is already registered")
        self.assertTrue(verify_password("one", await self.stored_hash("pump-3")))

    async def test_password_mistakes(self) -> None:
        """Both password options, an empty password file and a missing one
        are errors that register nothing."""
        empty = write(os.path.join(self.directory, "empty"), b"\n")
        both = await self.fails("device", "add", "p", "--password", "x", "--password-file", empty)
        self.assertIn("not both", both)
        self.assertIn("the password is empty", await self.fails("device", "add", "p", "--password-file", empty))
        self.assertIn("the password is empty", await self.fails("device", "add", "p", "--password", ""))
        missing = os.path.join(self.directory, "missing")
        self.assertIn(f"cannot read {missing}", await self.fails("device", "add", "p", "--password-file", missing))
        self.assertIsNone(await self.stored_hash("p"))

    async def test_value_registered_twice(self) -> None:
        """A name registered twice (a host name in any case, a subject
        value) could be used twice: refused, nothing registered; the same
        in a CSV import, reported by line."""
        message = await self.fails(
            "device", "add", "bad-5", "--password", "x", "--san", "DNS:dup.example", "--san", "DNS:DUP.example"
        )
        self.assertIn("registered twice", message)
        message = await self.fails(
            "device", "add", "bad-6", "--password", "x",
            "--subject-value", "serialNumber=S1", "--subject-value", "serialNumber=S1",
        )
        self.assertIn("serialNumber='S1' is registered twice", message)
        self.assertIsNone(await self.stored_hash("bad-5"))
        self.assertIsNone(await self.stored_hash("bad-6"))
        csv_path = write(
            os.path.join(self.directory, "twice.csv"),
            b"id,password,subject_values\nbad-7,x,serialNumber=S1;serialNumber=S1\nok-1,y,\n",
        )
        out, err = io.StringIO(), io.StringIO()
        try:
            await run(reactor, ["--config", self.config_path, "device", "import", csv_path], out, err)
        except (CommandError, SystemExit):
            pass
        self.assertIn(f"{csv_path} line 2: ", err.getvalue())
        self.assertIsNone(await self.stored_hash("bad-7"))
        self.assertIsNotNone(await self.stored_hash("ok-1"))

    async def test_remove_unknown(self) -> None:
        """Removing an id nobody registered fails with a message."""
        self.assertEqual(await self.fails("device", "remove", "ghost"), "no device 'ghost'")


class CertTests(CLITestCase):
    async def test_list_and_show(self) -> None:
        """cert list shows serial, status, subject and requester; cert show
        takes the serial in any hex spelling and prints fields and PEM."""
        self.assertEqual(await self.cli("cert", "list"), "no certificates issued\n")
        cert = await self.issue("dev-9")
        serial = format_serial(cert.serial_number)
        listing = await self.cli("cert", "list")
        self.assertIn(serial, listing)
        self.assertIn("valid", listing)
        self.assertIn("CN=dev-9", listing)
        self.assertIn("device:dev-9", listing)
        colons = ":".join(serial[i:i + 2] for i in range(0, len(serial), 2))
        bare = f"{cert.serial_number:x}"  # lower case, no leading zero
        for spelling in (serial, "0x" + serial, colons, bare, "serial=" + serial, "000" + bare):
            shown = await self.cli("cert", "show", spelling)
            self.assertIn(f"serial:              {serial}\n", shown)
            self.assertIn("subjectAltName:      DNS:dev-9\n", shown)
            self.assertIn("status:              valid\n", shown)
            self.assertIn(cert.public_bytes(Encoding.PEM).decode(), shown)

    async def test_revoke(self) -> None:
        """cert revoke marks the certificate revoked, with its reason."""
        cert = await self.issue()
        serial = format_serial(cert.serial_number)
        out = await self.cli("cert", "revoke", serial.lower(), "--reason", "keyCompromise")
        self.assertTrue(out.startswith(f"revoked {serial} (CN=dev-1) at "), out)
        shown = await self.cli("cert", "show", serial)
        self.assertIn("status:              revoked\n", shown)
        self.assertIn("revocation reason:   keyCompromise\n", shown)
        self.assertIn("revoked", await self.cli("cert", "list"))
        # Revoking again changes nothing and says so; no second audit row.
        audit_before = await self.cli("audit", "list")
        message = await self.fails("cert", "revoke", serial, "--reason", "superseded")
        self.assertIn("is already revoked", message)
        self.assertIn("reason keyCompromise", message)
        self.assertEqual(await self.cli("audit", "list"), audit_before)

    async def test_crl_carries_reason_and_invalidity_date(self) -> None:
        """revoke --reason keyCompromise --invalidity-date, then crl write: the
        CRL entry carries the reason code and the invalidity date (RFC 5280
        5.3.1, 5.3.2), as openssl reads them; an unspecified reason is left
        out, as 5.3.1 asks."""
        compromised = await self.issue("dev-1")
        retired = await self.issue("dev-2")
        kept = await self.issue("dev-3")
        await self.cli(
            "cert", "revoke", f"{compromised.serial_number:x}",
            "--reason", "keyCompromise", "--invalidity-date", "2026-01-02T03:04:05Z",
        )
        await self.cli("cert", "revoke", f"{retired.serial_number:x}")
        out_file = os.path.join(self.directory, "out.crl")
        await self.cli("crl", "write", "--out", out_file)
        with open(out_file, "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
        entry = crl.get_revoked_certificate_by_serial_number(compromised.serial_number)
        assert entry is not None
        self.assertEqual(entry.extensions.get_extension_for_class(x509.CRLReason).value.reason,
                         x509.ReasonFlags.key_compromise)
        self.assertEqual(entry.extensions.get_extension_for_class(x509.InvalidityDate).value.invalidity_date_utc,
                         datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
        plain = crl.get_revoked_certificate_by_serial_number(retired.serial_number)
        assert plain is not None
        self.assertEqual(len(plain.extensions), 0)
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(kept.serial_number))
        text = subprocess.run(["openssl", "crl", "-noout", "-text", "-in", out_file],
                              capture_output=True, text=True, check=True).stdout
        self.assertIn("Key Compromise", text)
        self.assertIn("Invalidity Date", text)
        self.assertIn("Jan  2 03:04:05 2026 GMT", text)
        shown = await self.cli("cert", "show", f"{compromised.serial_number:x}")
        self.assertIn("invalidity date:     2026-01-02 03:04:05Z\n", shown)

    async def test_invalidity_date_mistakes(self) -> None:
        """An invalidity date after the revocation, or not a date, revokes nothing."""
        cert = await self.issue()
        serial = f"{cert.serial_number:x}"
        message = await self.fails("cert", "revoke", serial, "--invalidity-date", "2999-01-01")
        self.assertIn("is after the revocation", message)
        with self.assertRaises(SystemExit):
            await self.cli("cert", "revoke", serial, "--invalidity-date", "yesterday")
        self.assertIn("status:              valid\n", await self.cli("cert", "show", serial))

    async def test_unknown_and_bad_serials(self) -> None:
        """Unknown serials and non-hex text fail with a message."""
        await self.issue()
        self.assertEqual(await self.fails("cert", "show", "abc123"), "no certificate with serial ABC123")
        self.assertEqual(await self.fails("cert", "revoke", "0xABC123"), "no certificate with serial ABC123")
        self.assertEqual(await self.fails("cert", "revoke", "abc12"), "no certificate with serial 0ABC12")
        self.assertIn("not a serial number", await self.fails("cert", "revoke", "-5"))

    async def test_list_and_crl_read_pages(self) -> None:
        """
        cert list and crl write read the store in pages, never the whole
        table at once (list_certificates is not called), and crl write asks
        only for revoked rows; a listing of many pages is complete and in
        order.
        """
        from estgw.cli import format_serial
        from estgw.store import SQLiteStore

        certs = [await self.issue(f"dev-{i}") for i in range(5)]
        await self.cli("cert", "revoke", f"{certs[1].serial_number:x}")
        asked: list[tuple[int, bool]] = []
        original = SQLiteStore.certificate_page

        def page(store: Any, after: Any = None, limit: int = 1000, subject: Any = None,
                 revoked_only: bool = False, where: Any = None) -> Any:
            asked.append((limit, revoked_only))
            return original(store, after, 2 if limit == 1000 else limit, subject, revoked_only, where)

        def whole_table(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the whole table was read")

        self.patch(SQLiteStore, "certificate_page", page)
        self.patch(SQLiteStore, "list_certificates", whole_table)
        listing = await self.cli("cert", "list")
        self.assertEqual(
            [line.split()[0] for line in listing.splitlines()[1:]],
            [format_serial(c.serial_number) for c in reversed(certs)],
        )
        self.assertEqual(asked, [(1000, False)] * 3)  # pages of 2: 2 + 2 + 1
        asked.clear()
        self.assertIn("CRL of 1 revoked certificate(s)", await self.cli("crl", "write"))
        self.assertEqual(asked, [(1000, True)])


class ProcessTests(CLITestCase):
    """``python -m estgw.cli``: exit status and stderr as operators see them."""

    async def run_cli(self, *argv: str) -> tuple[int, str, str]:
        env = dict(os.environ, PYTHONPATH=REPO)
        result = await run_process(
            [sys.executable, "-m", "estgw.cli", "--config", self.config_path, *argv], env=env
        )
        return result.code, result.stdout.decode(), result.stderr.decode()

    async def test_exit_status(self) -> None:
        """Success exits 0; an operator mistake exits 1 with 'estgw: <message>'."""
        self.assertEqual(await self.run_cli("device", "add", "d", "--password", "p"), (0, "registered device d\n", ""))
        code, out, err = await self.run_cli("device", "add", "d", "--password", "p")
        self.assertEqual((code, out, err), (1, "", "estgw: device 'd' is already registered\n"))
        code, _out, err = await self.run_cli("cert", "show", "ff")
        self.assertEqual((code, err), (1, "estgw: no certificate with serial FF\n"))

    async def test_store_that_cannot_be_used(self) -> None:
        """A store that cannot be opened or migrated (here: written by a
        newer estgw) makes every store command exit 1 with one line, never
        a traceback."""
        import sqlite3

        self.assertEqual((await self.run_cli("device", "list"))[0], 0)
        with sqlite3.connect(self.config.store_path) as db:
            db.execute("UPDATE schema_version SET version = 99")
        for argv in (("cert", "list"), ("device", "list"), ("init",)):
            code, out, err = await self.run_cli(*argv)
            self.assertEqual((code, out), (1, ""), argv)
            self.assertTrue(err.startswith("estgw: the store cannot be used: "), err)
            self.assertIn("schema version 99", err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(err.count("\n"), 1, err)

    async def test_usage_errors(self) -> None:
        """An unknown command or revocation reason exits 2 with argparse's
        usage message, and revokes nothing."""
        code, _out, err = await self.run_cli("frobnicate")
        self.assertEqual(code, 2)
        self.assertIn("usage: estgw", err)
        cert = await self.issue()
        code, _out, err = await self.run_cli("cert", "revoke", f"{cert.serial_number:x}", "--reason", "lost")
        self.assertEqual(code, 2)
        self.assertIn("invalid choice: 'lost'", err)
        self.assertIn("valid", await self.cli("cert", "list"))

class OperatorToolTests(CLITestCase):
    """What makes the CLI behave like the tools sysadmins already use."""

    def setUp(self) -> None:
        super().setUp()
        text = TEST_CONFIG + (
            "handler.8.operation = simpleenroll\nhandler.8.label = ra\nhandler.8.requiredRoRoles = ra, auditor\n"
        )
        self.config_path = write(os.path.join(self.directory, "est.properties"), text.encode())
        self.config = config_module.load(self.config_path)

    async def run_cli(self, *argv: str, shell: str | None = None) -> tuple[int, str, str]:
        env = dict(os.environ, PYTHONPATH=REPO)
        command = [sys.executable, "-m", "estgw.cli", "--config", self.config_path, *argv]
        if shell is not None:  # e.g. "| head -n 1", with bash's pipefail
            import shlex

            command = ["/bin/bash", "-c", "set -o pipefail; " + shlex.join(command) + " " + shell]
        result = await run_process(command, env=env)
        return result.code, result.stdout.decode(), result.stderr.decode()

    async def test_no_traceback_on_numbers_or_output(self) -> None:
        """A number too large for a date or an interval exits 2, output that
        cannot be written exits 1: each with 'estgw: <reason>', never a
        traceback."""
        await self.issue()
        for argv in (("cert", "list", "--expires-within", "99999999999999"), ("crl", "write", "--days", "999999999")):
            code, _out, err = await self.run_cli(*argv)
            self.assertEqual(code, 2, err)
            self.assertTrue(err.startswith("estgw: a number is out of range"), err)
            self.assertNotIn("Traceback", err)
        if os.path.exists("/dev/full"):
            code, _out, err = await self.run_cli("cert", "list", shell="> /dev/full")
            self.assertEqual((code, err), (1, "estgw: No space left on device\n"))

    async def test_version(self) -> None:
        """estgw --version prints the version on stdout and exits 0."""
        import estgw

        self.assertEqual(await self.run_cli("--version"), (0, f"estgw {estgw.__version__}\n", ""))

    async def test_closed_pipe_is_quiet(self) -> None:
        """``estgw cert list | true``: the reader is gone before estgw writes;
        no BrokenPipeError traceback, exit status 141 as from cat."""
        for n in range(3):
            await self.issue(f"dev-{n}")
        code, out, err = await self.run_cli("cert", "list", shell="| true")
        self.assertEqual((code, err), (141, ""))
        code, out, err = await self.run_cli("cert", "list", "--json", shell="| head -c 10")
        self.assertEqual(err, "")
        self.assertEqual(len(out), 10)

    async def test_cert_list_filters(self) -> None:
        """--subject takes the DN or the bare commonName (exactly);
        --search a substring in any case; --status and --expires-within
        filter; --json gives the same records as a JSON array."""
        import json

        pump = await self.issue("pump-17")
        await self.issue("pump-170")
        other = await self.issue("valve-3")
        await self.cli("cert", "revoke", format_serial(other.serial_number))

        def serials(listing: str) -> set[str]:
            return {line.split()[0] for line in listing.splitlines()[1:]}

        self.assertEqual(serials(await self.cli("cert", "list", "--subject", "pump-17")),
                         {format_serial(pump.serial_number)})
        self.assertEqual(serials(await self.cli("cert", "list", "--subject", "CN=pump-17")),
                         {format_serial(pump.serial_number)})
        self.assertEqual(len(serials(await self.cli("cert", "list", "--search", "PUMP"))), 2)
        self.assertEqual(serials(await self.cli("cert", "list", "--status", "revoked")),
                         {format_serial(other.serial_number)})
        self.assertEqual(len(serials(await self.cli("cert", "list", "--status", "valid"))), 2)
        self.assertEqual(len(serials(await self.cli("cert", "list", "--status", "valid", "--status", "revoked"))), 3)
        # issue() uses the default profile: 365 days; revoked ones never count.
        self.assertEqual(len(serials(await self.cli("cert", "list", "--expires-within", "366"))), 2)
        self.assertEqual(await self.cli("cert", "list", "--expires-within", "364"), "no certificates match\n")
        self.assertEqual(await self.cli("cert", "list", "--subject", "nobody"), "no certificates match\n")
        records = json.loads(await self.cli("cert", "list", "--json", "--subject", "pump-17"))
        self.assertEqual(len(records), 1)
        self.assertEqual(records[0]["serial"], format_serial(pump.serial_number))
        self.assertEqual(records[0]["subject"], "CN=pump-17")
        self.assertEqual(records[0]["status"], "valid")
        self.assertEqual(json.loads(await self.cli("cert", "list", "--json", "--subject", "nobody")), [])
        # The store leaves out rows first (LIKE), the exact check decides:
        # an escaped comma, LIKE's wildcards and a prefix are plain text.
        comma = await self.issue("a,b")
        sale = await self.issue("50%_off!")
        self.assertEqual(serials(await self.cli("cert", "list", "--subject", "a,b")),
                         {format_serial(comma.serial_number)})
        self.assertEqual(serials(await self.cli("cert", "list", "--subject", "CN=a\\,b")),
                         {format_serial(comma.serial_number)})
        self.assertEqual(serials(await self.cli("cert", "list", "--subject", "50%_off!")),
                         {format_serial(sale.serial_number)})
        self.assertEqual(await self.cli("cert", "list", "--subject", "50%"), "no certificates match\n")
        self.assertEqual(await self.cli("cert", "list", "--subject", "pump-1%"), "no certificates match\n")
        self.assertEqual(len(serials(await self.cli("cert", "list", "--status", "expired"))), 0)
        self.assertEqual(len(serials(await self.cli("cert", "list", "--status", "valid", "--status", "expired"))), 4)
        # A commonName no certificate may hold (over 64 characters) is looked for row by row.
        self.assertEqual(await self.cli("cert", "list", "--subject", "x" * 65), "no certificates match\n")

    async def test_serial_as_openssl_prints_it(self) -> None:
        """cert list prints the serial as openssl x509 -serial does, and
        that text (or openssl's whole line) finds the certificate."""
        cert = await self.issue("dev-x")
        pem = write(os.path.join(self.directory, "dev-x.pem"), cert.public_bytes(Encoding.PEM))
        result = await run_process(["openssl", "x509", "-noout", "-serial", "-in", pem])
        printed = result.stdout.decode().strip()  # serial=0A1B...
        self.assertIn(printed.removeprefix("serial="), await self.cli("cert", "list"))
        self.assertIn("CN=dev-x", await self.cli("cert", "show", printed))
        self.assertEqual(format_serial(0x0A1B), "0A1B")

    async def test_device_and_officer_json(self) -> None:
        """device list --json and officer list --json are JSON arrays."""
        import json

        self.assertEqual(json.loads(await self.cli("device", "list", "--json")), [])
        await self.cli(
            "device", "add", "pump-1", "--password", "pw",
            "--subject-value", "serialNumber=SN1", "--san", "DNS:pump-1.plant.example",
        )
        (device,) = json.loads(await self.cli("device", "list", "--json"))
        self.assertEqual((device["id"], device["password"], device["singleUse"]), ("pump-1", True, False))
        self.assertEqual(
            device["registeredNames"],
            [{"name": "serialNumber", "value": "SN1"}, {"name": "DNS", "value": "pump-1.plant.example"}],
        )
        self.assertNotIn("hash", json.dumps(device).lower())
        self.assertEqual(json.loads(await self.cli("officer", "list", "--json")), [])

    async def test_unknown_role_refused(self) -> None:
        """officer add --role RAA (a typo) is refused naming the roles the
        handlers know; nothing is granted; --force grants it all the same."""
        cert = await self.issue("ra-1")
        pem = write(os.path.join(self.directory, "ra-1.pem"), cert.public_bytes(Encoding.PEM))
        message = await self.fails("officer", "add", "--cert", pem, "--role", "RAA")
        self.assertIn("no handler", message)
        self.assertIn("known roles: auditor, ra", message)
        self.assertEqual(await self.cli("officer", "list"), "no officer roles granted\n")
        self.assertIn("granted officer role ra ", await self.cli("officer", "add", "--cert", pem, "--role", "ra"))
        self.assertIn("granted officer role RAA ", await self.cli("officer", "add", "--cert", pem, "--role", "RAA", "--force"))

    async def test_import_twice(self) -> None:
        """Re-running an import reports the registered rows as such, on
        stderr, with a truthful summary and status 1; --skip-existing
        makes the re-run succeed; a bad row still fails it."""
        csv = write(os.path.join(self.directory, "devices.csv"),
                    b"id,password\npump-1,pw-1\npump-2,pw-2\n")
        code, out, err = await self.run_cli("device", "import", csv)
        self.assertEqual((code, out, err), (0, "imported 2 of 2 device(s); 0 already registered (left unchanged);"
                                                " 0 bad row(s) not imported\n", ""))
        code, out, err = await self.run_cli("device", "import", csv)
        self.assertEqual(code, 1)
        self.assertEqual(out, "imported 0 of 2 device(s); 2 already registered (left unchanged); 0 bad row(s) not imported\n")
        self.assertIn(f"estgw: {csv} line 2: device 'pump-1' is already registered (left unchanged)\n", err)
        self.assertIn("estgw: 2 device(s) already registered (--skip-existing accepts that;", err)
        self.assertNotIn("imported", err)
        code, out, err = await self.run_cli("device", "import", "--skip-existing", csv)
        self.assertEqual((code, err), (0, ""))
        write(csv, b"id,password\npump-1,pw-1\npump-3,pw-3\nbad:id,pw\n")
        code, out, err = await self.run_cli("device", "import", "--skip-existing", csv)
        self.assertEqual(code, 1)
        self.assertEqual(out, "imported 1 of 3 device(s); 1 already registered (left unchanged); 1 bad row(s) not imported\n")
        self.assertIn("line 4: device id 'bad:id' contains ':'", err)

    async def test_device_passwd(self) -> None:
        """device passwd replaces the password (and its Digest hashes); the
        old one stops working; an unknown id fails."""
        await self.cli("device", "add", "pump-1", "--password", "old-pw")
        new = write(os.path.join(self.directory, "new.txt"), b"new-pw\n")
        self.assertEqual(await self.cli("device", "passwd", "pump-1", "--password-file", new),
                         "changed the password of device pump-1\n")
        store = bootstrap.open_store(self.config, reactor)
        await store.start()
        try:
            device = await store.get_device("pump-1")
        finally:
            await store.close()
        self.assertTrue(verify_password("new-pw", device.password_hash))
        self.assertFalse(verify_password("old-pw", device.password_hash))
        self.assertEqual(await self.fails("device", "passwd", "ghost", "--password-file", new), "no device 'ghost'")
        self.assertIn("needs --password-file", await self.fails("device", "passwd", "pump-1"))

    async def test_device_passwd_factory_only(self) -> None:
        """A device registered with only a factory certificate gets no
        password login unless the operator asks for it (--add-password)."""
        from tests.test_auth import FACTORY_CA

        idevid = FACTORY_CA.issue(self.directory, "ACME-1")
        await self.cli("device", "add", "fac-1", "--factory-cert", idevid.cert_path)
        new = write(os.path.join(self.directory, "new.txt"), b"new-pw\n")
        self.assertIn("--add-password", await self.fails("device", "passwd", "fac-1", "--password-file", new))
        self.assertEqual(
            await self.cli("device", "passwd", "fac-1", "--password-file", new, "--add-password"),
            "added the password of device fac-1\n",
        )
