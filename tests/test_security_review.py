"""Requests an attacker would send to get more than their own name
certified, over real TLS with curl: each is refused with its status and
reason, one audit line, and no certificate in the store."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from estgw import policy
from estgw.testing import csr_pem, make_csr, name, new_key
from tests.test_auth import FACTORY_CA, SecurityTestCase, run_cli
from tests.test_refusals import register

CN = NameOID.COMMON_NAME


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(CN, value)


def _rdns(*rdns: list[x509.NameAttribute]) -> x509.Name:
    return x509.Name([x509.RelativeDistinguishedName(rdn) for rdn in rdns])


class PasswordDeviceNameTests(SecurityTestCase):
    """A device that logged in with a password gets its own id certified,
    and nothing that names someone else."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        await register(self.gateway)

    def enroll(self, subject: x509.Name, sans: list[x509.GeneralName] = ()) -> object:  # type: ignore[assignment]
        csr = make_csr(new_key(), subject, sans=sans)
        return self.gateway.curl("simpleenroll", data=csr_pem(csr), user="pump-17:s3cret")

    async def test_second_common_name_refused(self) -> None:
        """CN=pump-17 plus a second CN=pump-18 RDN: verifiers that read
        the last CN would see pump-18, so only one commonName is allowed."""
        result = await self.enroll(_rdns([_cn("pump-17")], [_cn("pump-18")]))
        await self.assertRefused(result, 403, "subject-not-registered", "exactly one commonName")

    async def test_multi_valued_common_name_refused(self) -> None:
        """A multi-valued RDN CN=pump-17+CN=pump-18 is refused the same way."""
        result = await self.enroll(_rdns([_cn("pump-17"), _cn("pump-18")]))
        await self.assertRefused(result, 403, "subject-not-registered", "exactly one commonName")

    async def test_san_of_another_kind_refused(self) -> None:
        """Directory-name and otherName (e.g. a Microsoft UPN) SANs are
        never issued to a device; URI and e-mail SANs only when registered
        for it: 403 either way."""
        upn = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
        kinds = [
            (x509.UniformResourceIdentifier("spiffe://plant.example/admin"), "san-not-registered", "not registered"),
            (x509.RFC822Name("admin@plant.example"), "san-not-registered", "not registered"),
            (x509.DirectoryName(name("pump-18")), "san-not-allowed", "DirectoryName subjectAltName"),
            (x509.OtherName(upn, b"\x0c\x10admin@plant.test"), "san-not-allowed", "OtherName subjectAltName"),
        ]
        for san, code, reason in kinds:
            self.audit.events.clear()
            result = await self.enroll(name("pump-17"), [san])
            await self.assertRefused(result, 403, code, reason)

    async def test_wildcard_dns_name_refused(self) -> None:
        """A wildcard dNSName would stand for every host of a domain: 403."""
        result = await self.enroll(name("pump-17"), [x509.DNSName("*.plant.example")])
        await self.assertRefused(result, 403, "san-not-allowed", "wildcard")

    async def test_address_range_refused(self) -> None:
        """An iPAddress SAN of 8 or 32 octets is an address range (the
        name-constraints form), never valid in a certificate: 400."""
        network = x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))
        result = await self.enroll(name("pump-17"), [network])
        await self.assertRefused(result, 400, "csr-bad-san", "10.0.0.0/8")

    async def test_long_dns_name_without_common_name(self) -> None:
        """No commonName and a dNSName longer than a commonName may be (64):
        nothing is copied, so the password device is refused as naming no
        registered id (this was an internal error, 500)."""
        result = await self.enroll(x509.Name([]), [x509.DNSName("a" * 40 + "." + "b" * 30 + ".plant.example")])
        await self.assertRefused(result, 403, "subject-not-registered", "registered device id")


class FactoryNameTests(SecurityTestCase):
    """Handler 25 (label factory): a registered factory certificate."""

    async def test_second_common_name_refused(self) -> None:
        """The registered CN plus a second CN of another device is refused."""
        await self.setUpGateway()
        idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017")
        await run_cli(self.gateway, "device", "add", "pump-17", "--factory-cert", idevid.cert_path)
        csr = make_csr(new_key(), _rdns([_cn("pump-17")], [_cn("pump-18")]))
        result = await self.gateway.curl("factory/simpleenroll", data=csr_pem(csr), **idevid.curl)
        await self.assertRefused(result, 403, "factory-cn-mismatch", "exactly one commonName")


class CopyRuleLimitTests(SynchronousTestCase):
    def test_long_dns_name_not_copied_to_common_name(self) -> None:
        """A dNSName too long for a commonName (ub-common-name, 64) is not
        copied into the subject; a later one that fits is."""
        long_name = x509.DNSName("a" * 70 + ".example")
        csr = make_csr(new_key(), x509.Name([]), sans=[long_name])
        subject, sans = policy.copied_names(csr)
        self.assertEqual(subject, x509.Name([]))
        self.assertEqual(sans, (long_name,))
        csr = make_csr(new_key(), x509.Name([]), sans=[long_name, x509.DNSName("pump-17.example")])
        subject, _ = policy.copied_names(csr)
        self.assertEqual(subject, name("pump-17.example"))

    def test_empty_dns_name_refused(self) -> None:
        """An empty dNSName is not copied into the commonName (that was an
        internal error, 500) and the request is refused: 400 csr-bad-san."""
        from estgw.auth import Identity
        from estgw.config import HandlerConfig
        from estgw.refusal import Refusal

        handler = HandlerConfig(id="2", operation="simpleenroll", format="est-simpleenroll", token_procedure="p")
        csr = make_csr(new_key(), x509.Name([]), sans=[x509.DNSName("")])
        ctx = policy.build_context("simpleenroll", handler, Identity(kind="device", device_id="pump-17"), csr)
        self.assertEqual(ctx.subject, x509.Name([]))
        with self.assertRaises(Refusal) as caught:
            policy.sans_well_formed(ctx)
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "csr-bad-san"))
        self.assertIn("dNSName subjectAltName is empty", caught.exception.reason)
