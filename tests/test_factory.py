"""Factory (authentication) certificates:
registration with the CLI (one device or a CSV file), enrollment with a
registered factory certificate over real TLS, and each refusal."""

from __future__ import annotations

import io
import ipaddress
import os
import sys
from typing import Any

from cryptography import x509
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from estgw import cli, factory
from estgw.config import ConfigError, from_string
from estgw.store import certificate_fingerprint
from estgw.testing import TEST_CONFIG, csr_pem, make_csr, name, new_key, run_process, write
from tests.test_auth import FACTORY_CA, SecurityTestCase, csr_for, gateway_certificate, run_cli


# Where the estgw package is, for a subprocess (trial runs in a temp directory).
_SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))


class FactoryEnrollmentTests(SecurityTestCase):
    """Handler 25 (label factory): factory certificate, subject values
    checked, no password.  26 (factorypw): password mandatory.  27
    (factoryany): subject values not checked."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        self.idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017", serial_number="SN17")

    async def register(self, *options: str, device_id: str = "pump-17", cert: Any = None) -> None:
        cert_path = (cert or self.idevid).cert_path
        await run_cli(self.gateway, "device", "add", device_id, "--factory-cert", cert_path, *options)

    async def enroll(self, label: str = "factory", csr: bytes | None = None, **curl: Any) -> Any:
        body = csr if csr is not None else csr_for("pump-17", serial_number="SN17")
        return await self.gateway.curl(f"{label}/simpleenroll", data=body, **{**self.idevid.curl, **curl})

    async def test_factory_certificate_enrollment(self) -> None:
        """A registered factory certificate and a CSR with the registered CN
        and subject values: a certificate, recorded for the device."""
        await self.register("--subject-value", "serialNumber=SN17")
        issued = await self.assertIssued(await self.enroll(), "factory:pump-17")
        self.assertEqual(issued.subject, "2.5.4.5=SN17,CN=pump-17")

    async def test_registered_cn(self) -> None:
        """--cn sets the commonName requests must carry instead of the id."""
        await self.register("--cn", "PUMP-17.example")
        result = await self.enroll(csr=csr_for("PUMP-17.example"))
        await self.assertIssued(result, "factory:pump-17")

    async def test_factory_certificate_without_eku(self) -> None:
        """An IDevID with no EKU extension (unrestricted, RFC 5280) enrolls."""
        self.idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017", ekus=(), serial_number="SN17")
        await self.register("--subject-value", "serialNumber=SN17")
        await self.assertIssued(await self.enroll(), "factory:pump-17")

    async def test_factory_certificate_restricted_to_other_eku(self) -> None:
        """An IDevID whose EKU names only serverAuth cannot authenticate a client."""
        from cryptography.x509.oid import ExtendedKeyUsageOID

        self.idevid = FACTORY_CA.issue(
            self.directory, "ACME-PUMP-0017", ekus=(ExtendedKeyUsageOID.SERVER_AUTH,), serial_number="SN17"
        )
        await self.register()
        result = await self.enroll()
        await self.assertRefused(result, 403, "client-certificate-not-client-auth", "Client Authentication")

    async def test_not_registered(self) -> None:
        """A trusted factory certificate that is not registered: 403."""
        result = await self.enroll()
        await self.assertRefused(result, 403, "factory-certificate-not-registered", "not a registered factory certificate")

    async def test_other_certificate_of_same_ca(self) -> None:
        """Another certificate of the same factory CA, same subject, is not
        the registered one (matched by fingerprint, not by name)."""
        await self.register()
        twin = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017", serial_number="SN17")
        result = await self.enroll(**twin.curl)
        await self.assertRefused(result, 403, "factory-certificate-not-registered", "not a registered")

    async def test_no_client_certificate(self) -> None:
        """No client certificate at all: 403 asking for the factory certificate."""
        await self.register()
        result = await self.gateway.curl("factory/simpleenroll", data=csr_for("pump-17", serial_number="SN17"))
        await self.assertRefused(result, 403, "factory-certificate-required", "registered factory certificate")

    async def test_gateway_certificate_is_not_a_factory_certificate(self) -> None:
        """A certificate of the gateway's own CA is not a factory certificate."""
        await self.register()
        own = gateway_certificate(self.gateway, self.directory, "pump-17")
        result = await self.enroll(**own.curl)
        await self.assertRefused(result, 403, "factory-certificate-not-registered", "not a registered")

    async def test_cn_mismatch(self) -> None:
        """A CSR whose CN is not the registered one: 403 naming both."""
        await self.register()
        result = await self.enroll(csr=csr_for("pump-18", serial_number="SN17"))
        await self.assertRefused(result, 403, "factory-cn-mismatch", "'pump-18' is not 'pump-17'")

    async def test_subject_value_mismatch(self) -> None:
        """A CSR with another serialNumber than registered: 403."""
        await self.register("--subject-value", "serialNumber=SN17")
        result = await self.enroll(csr=csr_for("pump-17", serial_number="SN99"))
        await self.assertRefused(result, 403, "subject-value-mismatch", "serialNumber ('SN99') is not the registered 'SN17'")

    async def test_subject_value_missing(self) -> None:
        """A registered IP the CSR does not carry: 403."""
        await self.register("--subject-value", "IP=10.0.0.17")
        result = await self.enroll(csr=csr_for("pump-17"))
        await self.assertRefused(result, 403, "subject-value-mismatch", "IP (none) is not the registered '10.0.0.17'")

    async def test_ip_subject_value_from_san(self) -> None:
        """A registered IP matches the CSR's iPAddress SAN."""
        await self.register("--subject-value", "IP=10.0.0.17")
        csr = csr_pem(make_csr(new_key(), name("pump-17"), sans=[x509.IPAddress(ipaddress.ip_address("10.0.0.17"))]))
        await self.assertIssued(await self.enroll(csr=csr), "factory:pump-17")

    async def test_empty_value_matches_anything(self) -> None:
        """An empty registered value matches a request without it."""
        await self.register("--subject-value", "serialNumber=")
        await self.assertIssued(await self.enroll(csr=csr_for("pump-17")), "factory:pump-17")

    async def test_subject_values_not_checked(self) -> None:
        """With enroll.check-subject-values = false a registered value need
        not be present; the CN is still checked."""
        await self.register("--subject-value", "serialNumber=SN17")
        result = await self.enroll("factoryany", csr=csr_for("pump-17"))
        await self.assertIssued(result, "factory:pump-17")

    async def test_subject_values_not_checked_still_registered_only(self) -> None:
        """enroll.check-subject-values = false does not widen what the
        device may be called: another serialNumber is not registered."""
        await self.register("--subject-value", "serialNumber=SN17")
        result = await self.enroll("factoryany", csr=csr_for("pump-17", serial_number="SN99"))
        await self.assertRefused(result, 403, "subject-not-registered", "serialNumber 'SN99' is not registered")

    async def test_mandatory_password_missing(self) -> None:
        """enroll.mandatorypassword = true: the certificate alone gets 401."""
        await self.register("--password", "pw17")
        result = await self.enroll("factorypw")
        await self.assertRefused(result, 401, "password-required", "needs the device password", bare=True)
        self.assertTrue(result.headers["www-authenticate"].startswith("Basic "))

    async def test_mandatory_password_wrong(self) -> None:
        """A wrong device password with the factory certificate: 401."""
        await self.register("--password", "pw17")
        result = await self.enroll("factorypw", user="pump-17:guess")
        await self.assertRefused(result, 401, "bad-credentials", "wrong password")

    async def test_mandatory_password_of_another_device(self) -> None:
        """The password of another device does not go with this factory
        certificate: 403."""
        await self.register("--password", "pw17")
        await run_cli(self.gateway, "device", "add", "pump-18", "--password", "pw18")
        result = await self.enroll("factorypw", user="pump-18:pw18")
        await self.assertRefused(result, 403, "factory-certificate-other-device", "registered to another device")

    async def test_mandatory_password_given(self) -> None:
        """Factory certificate plus the device's password: issued."""
        await self.register("--password", "pw17", "--subject-value", "serialNumber=SN17")
        await self.assertIssued(await self.enroll("factorypw", user="pump-17:pw17"), "factory:pump-17")

    async def test_single_use_factory_registration(self) -> None:
        """A single-use factory registration issues once."""
        await self.register("--single-use")
        await self.assertIssued(await self.enroll(csr=csr_for("pump-17")), "factory:pump-17")
        self.audit.events.clear()
        result = await self.enroll(csr=csr_for("pump-17"))
        await self.assertRefused(result, 403, "single-use-consumed", "already been used", before=1)


class DeviceRegistrationCLITests(SecurityTestCase):
    async def setUp(self) -> None:
        await self.setUpGateway()

    async def test_device_add_with_factory_cert(self) -> None:
        """device add stores the fingerprint, CN and subject values; list
        shows the kind of authentication."""
        idevid = FACTORY_CA.issue(self.directory, "X")
        await run_cli(
            self.gateway, "device", "add", "pump-17", "--factory-cert", idevid.cert_path, "--cn", "P17",
            "--subject-value", "serialnumber=SN17", "--subject-value", "ip=10.0.0.17",
        )
        device = await self.gateway.store.get_device_by_factory_cert(certificate_fingerprint(idevid.cert))
        self.assertEqual(
            (device.device_id, device.factory_cn, device.subject_values, device.password_hash),
            ("pump-17", "P17", (("serialNumber", "SN17"), ("IP", "10.0.0.17")), None),
        )
        listing = await run_cli(self.gateway, "device", "list")
        self.assertIn("factory", listing.splitlines()[1])

    async def test_device_add_errors(self) -> None:
        """Neither password nor certificate, a bad subject value, a factory
        certificate registered twice: errors that say why, nothing stored."""
        idevid = FACTORY_CA.issue(self.directory, "X")
        cases = [
            (["device", "add", "pump-17"], "--factory-cert"),
            (["device", "add", "pump-17", "--factory-cert", idevid.cert_path, "--subject-value", "colour=red"],
             "unknown subject value name"),
            (["device", "add", "pump-17", "--factory-cert", idevid.cert_path, "--subject-value", "IP=ten"],
             "not an IP address"),
            (["device", "add", "pump:17", "--password", "x"], "':'"),
        ]
        for argv, message in cases:
            with self.assertRaises(cli.CommandError) as caught:
                await run_cli(self.gateway, *argv)
            self.assertIn(message, str(caught.exception))
        self.assertEqual(await self.gateway.store.list_devices(), [])
        await run_cli(self.gateway, "device", "add", "pump-17", "--factory-cert", idevid.cert_path)
        with self.assertRaises(cli.CommandError) as caught:
            await run_cli(self.gateway, "device", "add", "pump-18", "--factory-cert", idevid.cert_path)
        self.assertIn("already registered to device 'pump-17'", str(caught.exception))


    async def test_device_add_with_names(self) -> None:
        """--subject-value and --san register what a password device may be
        called, in order, a kind twice included; device list shows them."""
        await run_cli(
            self.gateway, "device", "add", "pump-17", "--password", "s3cret",
            "--subject-value", "serialNumber=SN17", "--san", "DNS:pump-17.plant.example",
            "--san", "ip:10.0.0.17", "--san", "DNS:pump-17.backup.example", "--subject-value", "OU=",
        )
        device = await self.gateway.store.get_device("pump-17")
        self.assertEqual(device.subject_values, (
            ("serialNumber", "SN17"), ("OU", ""), ("DNS", "pump-17.plant.example"), ("IP", "10.0.0.17"),
            ("DNS", "pump-17.backup.example"),
        ))
        listing = await run_cli(self.gateway, "device", "list")
        self.assertIn("NAMES", listing.splitlines()[0])
        self.assertTrue(listing.splitlines()[1].endswith(
            "CN=pump-17, serialNumber=SN17, OU=(any), DNS:pump-17.plant.example, IP:10.0.0.17,"
            " DNS:pump-17.backup.example"
        ), listing)

    async def test_registered_names_are_names(self) -> None:
        """A registered value is checked as a name of its kind: each
        mistake is an error that says why, and nothing is stored."""
        cases = [
            (["--san", "DNS:bad_host.example"], "not a host name"),
            (["--san", "FTP:x"], "expected KIND:VALUE"),
            (["--san", "DNS:"], "empty"),
            (["--san", "URI:/relative"], "never a relative URI"),
            (["--san", "email:not an address"], "e-mail address"),
            (["--subject-value", "C=USA"], "two letters"),
            (["--subject-value", "serialNumber=SN@17"], "PrintableString"),
            (["--subject-value", "CN=other"], "the commonName is the device id"),
            (["--subject-value", "O=" + "x" * 65], "longer than 64"),
        ]
        for options, message in cases:
            with self.assertRaises(cli.CommandError, msg=options) as caught:
                await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret", *options)
            self.assertIn(message, str(caught.exception))
        # The id is the commonName: one no certificate could carry is refused.
        with self.assertRaises(cli.CommandError) as caught:
            await run_cli(self.gateway, "device", "add", "p" * 65, "--password", "s3cret")
        self.assertIn("longer than 64 characters; the device's commonName is its id", str(caught.exception))
        self.assertEqual(await self.gateway.store.list_devices(), [])

    async def test_import_sans_column(self) -> None:
        """The CSV sans column registers subjectAltNames; a bad one is
        reported with its line and the row is not imported."""
        path = write(os.path.join(self.directory, "sans.csv"), (
            "id,password,sans,subject_values\n"
            "pump-1,pw1,DNS:pump-1.plant.example;IP:10.0.0.1;URI:https://pump-1.plant.example/a%3Bb,O=Plant\n"
            "pump-2,pw2,DNS:*.example,\n"
        ).encode())
        stream, errors = io.StringIO(), io.StringIO()
        with self.assertRaises(cli.CommandError):
            await cli.run(reactor, ["--config", self.gateway.config_path, "device", "import", path], stream, errors)
        self.assertIn("line 3: the dNSName subjectAltName '*.example'", errors.getvalue())
        [device] = await self.gateway.store.list_devices()
        self.assertEqual(device.subject_values, (
            ("O", "Plant"), ("DNS", "pump-1.plant.example"), ("IP", "10.0.0.1"),
            ("URI", "https://pump-1.plant.example/a%3Bb"),
        ))
        body = csr_pem(make_csr(new_key(), name("pump-1", organization_name="Plant"),
                                sans=[x509.DNSName("pump-1.plant.example")]))
        result = await self.gateway.curl("simpleenroll", data=body, user="pump-1:pw1")
        self.assertEqual(result.status, 200, result.text)


class DeviceImportTests(SecurityTestCase):
    async def setUp(self) -> None:
        await self.setUpGateway()
        self.idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0020", serial_number="SN20")
        os.rename(self.idevid.cert_path, os.path.join(self.directory, "pump-20.pem"))
        self.csv = write(os.path.join(self.directory, "devices.csv"), (
            "id,password,factory_cert,cn,single_use,subject_values\n"
            "pump-1,pw1,,,no,\n"                                        # 2: good
            "pump-2,,,,no,\n"                                           # 3: no password, no cert
            "pump-20,,pump-20.pem,,yes,serialNumber=SN20;IP=10.0.0.20\n"  # 4: good
            "pump-3,pw3,,,maybe,\n"                                     # 5: bad single_use
            "\n"                                                        # 6: blank, skipped
            "pump-4,pw4,missing.pem,,no,\n"                             # 7: no such file
            "pump-1,pw1b,,,no,\n"                                       # 8: duplicate id
            "pump-5,pw5,,,no\n"                                         # 9: a field short
            '"pump-6","pw,6",,,yes,\n'                                  # 10: good, quoted comma
        ).encode())

    async def test_import_good_and_bad_rows(self) -> None:
        """Each bad row is reported with its line number and reason; the
        good rows are imported; a summary line; the command fails."""
        stream, errors = io.StringIO(), io.StringIO()
        with self.assertRaises(cli.CommandError) as caught:
            await cli.run(reactor, ["--config", self.gateway.config_path, "device", "import", self.csv], stream, errors)
        err = errors.getvalue().splitlines()
        self.assertIn("5 bad row(s)", str(caught.exception))
        self.assertEqual([line.split(":")[1] for line in err],
                         [f" {self.csv} line {n}" for n in (3, 5, 7, 8, 9)])
        self.assertIn("password, a factory certificate, or both", err[0])
        self.assertIn("single_use must be yes or no", err[1])
        self.assertIn("missing.pem", err[2])
        self.assertIn("device 'pump-1' is already on line 2", err[3])
        self.assertIn("expected 6 fields, found 5", err[4])
        self.assertEqual(stream.getvalue(), "imported 3 of 8 device(s); 0 already registered (left unchanged);"
                                            " 5 bad row(s) not imported\n")
        devices = {d.device_id: d for d in await self.gateway.store.list_devices()}
        self.assertEqual(sorted(devices), ["pump-1", "pump-20", "pump-6"])
        self.assertEqual(devices["pump-20"].subject_values, (("serialNumber", "SN20"), ("IP", "10.0.0.20")))
        self.assertTrue(devices["pump-20"].single_use)
        self.assertIsNone(devices["pump-20"].password_hash)
        self.assertIsNotNone(devices["pump-20"].factory_cert_sha256)

    async def test_imported_password_and_factory_work(self) -> None:
        """Imported devices enroll: pump-6 with its quoted password over
        Basic, pump-20 with its factory certificate."""
        with self.assertRaises(cli.CommandError):
            await run_cli(self.gateway, "device", "import", self.csv)
        result = await self.gateway.curl("simpleenroll", data=csr_for("pump-6"), user="pump-6:pw,6")
        self.assertEqual(result.status, 200, result.text)
        key_path = self.idevid.key_path
        address = x509.IPAddress(ipaddress.ip_address("10.0.0.20"))
        csr = csr_pem(make_csr(new_key(), name("pump-20", serial_number="SN20"), sans=[address]))
        result = await self.gateway.curl(
            "factory/simpleenroll", data=csr,
            cert=os.path.join(self.directory, "pump-20.pem"), key=key_path,
        )
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.gateway.store.count_certificates(), 2)

    async def test_exit_status(self) -> None:
        """The estgw command exits 1 after a file with a bad row; the rows'
        problems are on stderr, the summary on stdout."""
        result = await run_process(
            [sys.executable, "-m", "estgw.cli", "--config", self.gateway.config_path, "device", "import", self.csv],
            env={**os.environ, "PYTHONPATH": os.pathsep.join([_SOURCE_ROOT, os.environ.get("PYTHONPATH", "")])},
        )
        self.assertEqual(result.code, 1, result.stderr)
        self.assertIn(b" line 3: ", result.stderr)
        self.assertEqual(b"imported 3 of 8 device(s); 0 already registered (left unchanged);"
                         b" 5 bad row(s) not imported\n", result.stdout)
        self.assertIn(b"estgw: 5 bad row(s) in ", result.stderr)

    async def test_bad_header(self) -> None:
        """A header with an unknown column imports nothing."""
        bad = write(os.path.join(self.directory, "bad.csv"), b"id,passwd\npump-1,pw\n")
        with self.assertRaises(cli.CommandError) as caught:
            await run_cli(self.gateway, "device", "import", bad)
        self.assertIn("line 1", str(caught.exception))
        self.assertIn("unknown: passwd", str(caught.exception))
        self.assertEqual(await self.gateway.store.list_devices(), [])


class SubjectValueTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Names are matched without case and spelled canonically; IP
        values are normalised; an empty value is kept empty."""
        self.assertEqual(factory.parse_subject_value("SERIALNUMBER = SN1"), ("serialNumber", "SN1"))
        self.assertEqual(factory.parse_subject_value("ip=::FFFF:10.0.0.1"), ("IP", "::ffff:a00:1"))
        self.assertEqual(factory.parse_subject_value("OU="), ("OU", ""))
        self.assertEqual(factory.parse_subject_value("2.5.4.97=x"), ("2.5.4.97", "x"))
        for bad in ("serialNumber", "=x", "colour=red", "IP=ten"):
            self.assertRaises(ValueError, factory.parse_subject_value, bad)

    def test_mismatch(self) -> None:
        """The first registered value the request lacks is described."""
        subject = name("pump-17", serial_number="SN1", organization_name="Acme")
        sans = [x509.DNSName("pump-17.example")]
        self.assertIsNone(factory.subject_value_mismatch(
            [("serialNumber", "SN1"), ("O", "Acme"), ("DNS", "pump-17.example"), ("IP", "")], subject, sans))
        self.assertEqual(
            factory.subject_value_mismatch([("O", "Acme"), ("DNS", "other.example")], subject, sans),
            "the request's DNS ('pump-17.example') is not the registered 'other.example'",
        )


class FactoryConfigTests(SynchronousTestCase):
    PROCEDURE = (
        "tokenprocedure.2.name = F\n"
        "tokenprocedure.2.estenroll.use-authentication-cert = true\n"
    )
    HANDLER = "handler.20.operation = simpleenroll\nhandler.20.label = f\nhandler.20.tokenprocedure = F\n"

    def test_defaults(self) -> None:
        """use-authentication-cert off, mandatorypassword off and
        check-subject-values on unless set; the handler carries them."""
        config = from_string(TEST_CONFIG + self.PROCEDURE + self.HANDLER)
        procedure = config.token_procedures["F"]
        self.assertEqual((procedure.mandatory_password, procedure.check_subject_values), (False, True))
        settings = config.handler("f", "simpleenroll").factory
        self.assertEqual((settings.mandatory_password, settings.check_subject_values), (False, True))
        self.assertFalse(config.token_procedures["Test Procedure"].use_authentication_cert)
        self.assertIsNone(config.handler("", "simpleenroll").factory)

    def test_mandatory_password_needs_authtype(self) -> None:
        """mandatorypassword without authtype on the handler: an error
        naming the handler's authtype."""
        with self.assertRaises(ConfigError) as caught:
            from_string(TEST_CONFIG + self.PROCEDURE + "tokenprocedure.2.enroll.mandatorypassword = true\n" + self.HANDLER)
        self.assertEqual(caught.exception.key, "handler.20.authtype")

    def test_not_with_subject_match_or_officers(self) -> None:
        """A factory handler cannot use the subject-match format or be an
        officer handler."""
        for extra, key in (
            ("handler.20.format = est-simpleenroll-subjectmatch\n", "handler.20.format"),
            ("handler.20.requiredRoRoles = ra\n", "handler.20.requiredRoRoles"),
        ):
            with self.assertRaises(ConfigError) as caught:
                from_string(TEST_CONFIG + self.PROCEDURE + self.HANDLER + extra)
            self.assertEqual(caught.exception.key, key)

    def test_bad_boolean(self) -> None:
        """A value that is not a boolean names the key."""
        with self.assertRaises(ConfigError) as caught:
            from_string(TEST_CONFIG + self.PROCEDURE + "tokenprocedure.2.enroll.check-subject-values = maybe\n")
        self.assertEqual(caught.exception.key, "tokenprocedure.2.enroll.check-subject-values")
