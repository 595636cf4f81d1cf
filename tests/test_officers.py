"""Officer/RA clients: roles granted with the CLI,
handlers with requiredRoRoles, enrollment for other subjects over real
TLS, and every other check still applied to the officer's certificate."""

from __future__ import annotations

from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from estgw import cli
from estgw.config import ConfigError, from_string
from estgw.store import certificate_fingerprint
from estgw.testing import TEST_CONFIG
from tests.test_auth import FACTORY_CA, SecurityTestCase, csr_for, gateway_certificate, record, run_cli


class OfficerEnrollmentTests(SecurityTestCase):
    """Handlers 22/23 (label ra) require role "ra"; 24 (anyra) says none."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        self.officer = gateway_certificate(self.gateway, self.directory, "ra-1")
        await record(self.gateway, self.officer)
        self.before = 1

    async def grant(self, role: str = "ra") -> None:
        await run_cli(self.gateway, "officer", "add", "--cert", self.officer.cert_path, "--role", role, "--force")

    async def test_officer_enrolls_for_another_subject(self) -> None:
        """An officer with role ra enrolls for pump-17 on a subject-match
        format; the certificate names pump-17 and records the officer."""
        await self.grant()
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **self.officer.curl)
        self.assertEqual(result.status, 200, result.text)
        issued = await self.gateway.store.list_certificates()
        self.assertEqual(len(issued), 2)
        self.assertEqual(issued[0].subject, "CN=pump-17")
        self.assertEqual(
            issued[0].requester, f"officer:CN=ra-1#serial={self.officer.cert.serial_number:x};roles=ra"
        )

    async def test_officer_reenrolls_for_another_subject(self) -> None:
        """simplereenroll on an officer handler skips the subject match too."""
        await self.grant()
        result = await self.gateway.curl("ra/simplereenroll", data=csr_for("pump-18"), **self.officer.curl)
        self.assertEqual(result.status, 200, result.text)
        newest = (await self.gateway.store.list_certificates())[0]
        self.assertEqual((newest.subject, newest.requester.split("#")[0]), ("CN=pump-18", "officer:CN=ra-1"))

    async def test_officer_without_required_role(self) -> None:
        """A certificate holding another role (auditor) is refused: 403."""
        await self.grant("auditor")
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **self.officer.curl)
        await self.assertRefused(
            result, 403, "officer-role-required", "holds none of the officer roles ra", self.before
        )

    async def test_device_certificate_without_role(self) -> None:
        """An ordinary device certificate cannot use an officer handler,
        even for its own subject."""
        device = gateway_certificate(self.gateway, self.directory, "pump-17")
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **device.curl)
        await self.assertRefused(result, 403, "officer-role-required", "officer/RA clients", self.before)

    async def test_role_removed_takes_effect_at_once(self) -> None:
        """officer remove withdraws the role from the next request on."""
        await self.grant()
        await run_cli(self.gateway, "officer", "remove", "--cert", self.officer.cert_path, "--role", "ra")
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **self.officer.curl)
        await self.assertRefused(result, 403, "officer-role-required", "holds none", self.before)

    async def test_revoked_officer(self) -> None:
        """A revoked officer certificate is refused like any other."""
        await self.grant()
        await self.gateway.store.revoke_certificate(self.officer.cert.serial_number, "keyCompromise")
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **self.officer.curl)
        await self.assertRefused(result, 403, "client-certificate-revoked", "revoked", self.before)

    async def test_officer_without_client_auth(self) -> None:
        """An officer certificate without EKU clientAuth is refused (the
        role does not waive the check)."""
        officer = gateway_certificate(self.gateway, self.directory, "ra-2", ekus=(ExtendedKeyUsageOID.SERVER_AUTH,))
        await run_cli(self.gateway, "officer", "add", "--cert", officer.cert_path, "--role", "ra")
        result = await self.gateway.curl("ra/simpleenroll", data=csr_for("pump-17"), **officer.curl)
        await self.assertRefused(
            result, 403, "client-certificate-not-client-auth", "Client Authentication", self.before
        )

    async def test_officer_on_ordinary_handler(self) -> None:
        """On a handler without requiredRoRoles an officer is an ordinary
        client: renewing another subject is a subject mismatch."""
        await self.grant()
        result = await self.gateway.curl("simplereenroll", data=csr_for("pump-17"), **self.officer.curl)
        await self.assertRefused(result, 403, "subject-mismatch", "differs", self.before)

    async def test_none_accepts_gateway_certificates(self) -> None:
        """requiredRoRoles = none: any certificate of this gateway's CA
        enrolls for others, no role needed."""
        result = await self.gateway.curl("anyra/simpleenroll", data=csr_for("pump-17"), **self.officer.curl)
        self.assertEqual(result.status, 200, result.text)
        newest = (await self.gateway.store.list_certificates())[0]
        self.assertEqual(newest.requester, f"officer:CN=ra-1#serial={self.officer.cert.serial_number:x}")

    async def test_none_refuses_other_cas(self) -> None:
        """requiredRoRoles = none: a certificate of another trusted CA (the
        factory CA) is refused."""
        outsider = FACTORY_CA.issue(self.directory, "ra-3")
        result = await self.gateway.curl("anyra/simpleenroll", data=csr_for("pump-17"), **outsider.curl)
        await self.assertRefused(result, 403, "officer-role-required", "issued by this gateway's CA", self.before)


class OfficerCLITests(SecurityTestCase):
    async def setUp(self) -> None:
        await self.setUpGateway()
        self.officer = gateway_certificate(self.gateway, self.directory, "ra-1")

    async def test_add_list_remove(self) -> None:
        """officer add grants (once), list shows role, subject and
        fingerprint, remove by fingerprint withdraws."""
        fingerprint = certificate_fingerprint(self.officer.cert)
        out = await run_cli(self.gateway, "officer", "add", "--cert", self.officer.cert_path, "--role", "ra")
        self.assertIn(f"granted officer role ra to CN=ra-1 (SHA-256 {fingerprint})", out)
        out = await run_cli(self.gateway, "officer", "add", "--cert", self.officer.cert_path, "--role", "ra")
        self.assertIn("already holds officer role ra", out)
        await run_cli(self.gateway, "officer", "add", "--cert", self.officer.cert_path, "--role", "ops", "--force")
        self.assertEqual(await self.gateway.store.officer_roles(fingerprint), ("ops", "ra"))
        listing = (await run_cli(self.gateway, "officer", "list")).splitlines()
        self.assertEqual(len(listing), 3)
        self.assertTrue(listing[1].startswith("ops") and "CN=ra-1" in listing[1] and fingerprint in listing[1])
        out = await run_cli(self.gateway, "officer", "remove", "--fingerprint", fingerprint.upper())
        self.assertIn("withdrew 2 officer role(s)", out)
        self.assertEqual(await run_cli(self.gateway, "officer", "list"), "no officer roles granted\n")

    async def test_bad_role_name(self) -> None:
        """A role name with spaces, or "none", is refused."""
        for role in ("two words", "none"):
            with self.assertRaises(cli.CommandError):
                await run_cli(self.gateway, "officer", "add", "--cert", self.officer.cert_path, "--role", role, "--force")
        self.assertEqual(await self.gateway.store.list_officer_roles(), [])

    async def test_remove_unknown(self) -> None:
        """Removing a role nobody holds is an error that says so."""
        with self.assertRaises(cli.CommandError) as caught:
            await run_cli(self.gateway, "officer", "remove", "--cert", self.officer.cert_path)
        self.assertIn("holds no officer roles", str(caught.exception))

    async def test_not_a_certificate(self) -> None:
        """A file without a certificate is an error naming the file."""
        with self.assertRaises(cli.CommandError) as caught:
            await run_cli(self.gateway, "officer", "add", "--cert", self.officer.key_path, "--role", "ra")
        self.assertIn(self.officer.key_path, str(caught.exception))


class RequiredRoRolesConfigTests(SynchronousTestCase):
    BASE = TEST_CONFIG + "handler.20.operation = simpleenroll\nhandler.20.label = ra\n"

    def roles(self, value: str) -> object:
        return from_string(self.BASE + f"handler.20.requiredRoRoles = {value}\n").handler("ra", "simpleenroll").required_ro_roles

    def test_values(self) -> None:
        """Unset: not an officer handler; none: (); a list: the roles."""
        self.assertIsNone(from_string(self.BASE).handler("ra", "simpleenroll").required_ro_roles)
        self.assertEqual(self.roles("none"), ())
        self.assertEqual(self.roles("NONE"), ())
        self.assertEqual(self.roles("ra, east-ra,ra"), ("ra", "east-ra"))

    def test_errors(self) -> None:
        """none mixed with roles, an empty value, a bad name: errors that
        name the key."""
        for value in ("none, ra", "", "r a", "ra;x"):
            with self.assertRaises(ConfigError) as caught:
                self.roles(value)
            self.assertEqual(caught.exception.key, "handler.20.requiredRoRoles", value)

    def test_only_on_enrollment(self) -> None:
        """requiredRoRoles on cacerts is an error."""
        with self.assertRaises(ConfigError) as caught:
            from_string(TEST_CONFIG + "handler.1.requiredRoRoles = ra\n")
        self.assertEqual(caught.exception.key, "handler.1.requiredRoRoles")


class IssuedByTests(SynchronousTestCase):
    """officers.issued_by trusts the chain TLS verified only when it runs
    from the certificate straight to one of our issuing CAs."""

    def setUp(self) -> None:
        from estgw.ca import IssueRequest, Profile
        from estgw.ca.local import LocalCA
        from estgw.testing import new_key
        from cryptography import x509

        self.ours = LocalCA.load_or_create(self.mktemp(), "ours")
        # Same names, other keys: a look-alike CA.
        self.other = LocalCA.load_or_create(self.mktemp(), "ours")
        request = IssueRequest(x509.Name.from_rfc4514_string("CN=dev"), new_key().public_key())
        self.cert = self.ours.sign(request, Profile())
        self.forged = self.other.sign(request, Profile())

    def test_signature_checked_without_chain(self) -> None:
        from estgw.officers import issued_by

        self.assertTrue(issued_by(self.cert, [self.ours.issuing]))
        self.assertFalse(issued_by(self.forged, [self.ours.issuing]))

    def test_verified_chain_trusted_only_to_our_issuer(self) -> None:
        from estgw.officers import issued_by

        self.assertTrue(issued_by(self.cert, [self.ours.issuing], (self.cert, self.ours.issuing, self.ours.root)))
        # A chain through the look-alike CA (same subject name) proves nothing about ours.
        self.assertFalse(issued_by(self.forged, [self.ours.issuing], (self.forged, self.other.issuing)))
        # A chain naming our CA above another leaf does not vouch for this one.
        self.assertFalse(issued_by(self.forged, [self.ours.issuing], (self.cert, self.ours.issuing)))
