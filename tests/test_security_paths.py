"""Positive paths of the security checks over real TLS with curl + openssl."""

from __future__ import annotations

import ipaddress
import os

from cryptography import x509
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import TestCase

from estgw import policy, protocol
from estgw.testing import TEST_CONFIG, RunningGateway, csr_pem, make_csr, new_key, run_process, write
from estgw.passwords import hash_password
from estgw.store import Device
from tests.test_refusals import MATRIX_CONFIG, client_certificate


async def register(gateway: RunningGateway, names: tuple = ()) -> None:
    """pump-17 with password s3cret and these registered names."""
    await gateway.store.add_device(Device("pump-17", hash_password("s3cret"), subject_values=names))


def _sans(cert: x509.Certificate) -> list:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


class SecurityPathTests(TestCase):
    async def test_device_enroll_copies_names(self) -> None:
        """A device CSR with only a CN and an unstructuredAddress (an
        address registered for it) gets a certificate with dNSName and
        iPAddress SANs, verified by openssl."""
        gateway = await RunningGateway.start(self, MATRIX_CONFIG)
        await register(gateway, names=(("IP", "2001:db8::17"),))
        csr = make_csr(new_key(), "pump-17", attributes=[(policy.UNSTRUCTURED_ADDRESS, b"2001:db8::17")])
        result = await gateway.curl("simpleenroll", data=csr_pem(csr), user="pump-17:s3cret")
        self.assertEqual(result.status, 200, result.text)
        [cert] = protocol.decode_certs_only(result.body)
        self.assertEqual(
            set(_sans(cert)),
            {x509.DNSName("pump-17"), x509.IPAddress(ipaddress.ip_address("2001:db8::17"))},
        )
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        chain = await gateway.curl("cacerts")
        from estgw.testing import cert_pem

        ca = write(os.path.join(directory, "ca.pem"), cert_pem(*protocol.decode_certs_only(chain.body)))
        leaf = write(os.path.join(directory, "leaf.pem"), cert_pem(cert))
        verified = await run_process(["openssl", "verify", "-purpose", "sslclient", "-CAfile", ca, leaf])
        self.assertEqual(verified.code, 0, verified.stdout + verified.stderr)

    async def test_renewal_with_last_issued_certificate(self) -> None:
        """With allowRenewalWithOldCertificates = true the newest certificate
        of a subject still renews; the renewal then becomes the newest."""
        gateway = await RunningGateway.start(self, MATRIX_CONFIG)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        await client_certificate(gateway, directory, sans=(x509.DNSName("pump-17"),))
        cert_path, key_path, cert = await client_certificate(gateway, directory, sans=(x509.DNSName("pump-17"),))
        result = await gateway.curl(
            "strict/simplereenroll", data=csr_pem(make_csr(new_key(), "pump-17")), cert=cert_path, key=key_path
        )
        self.assertEqual(result.status, 200, result.text)
        [renewed] = protocol.decode_certs_only(result.body)
        last = await gateway.store.last_issued_for_subject("CN=pump-17")
        self.assertEqual(last.serial, renewed.serial_number)
        # The certificate that renewed is no longer the last one.
        again = await gateway.curl(
            "strict/simplereenroll", data=csr_pem(make_csr(new_key(), "pump-17")), cert=cert_path, key=key_path
        )
        self.assertEqual(again.status, 403)
        self.assertIn("issued last", again.text)

    async def test_renewal_with_old_certificate_when_rule_off(self) -> None:
        """With the rule off (the default, on every handler: it is
        gateway-wide) an older certificate of the subject renews."""
        gateway = await RunningGateway.start(self, TEST_CONFIG)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        old_cert, old_key, _ = await client_certificate(gateway, directory, sans=(x509.DNSName("pump-17"),))
        await client_certificate(gateway, directory, sans=(x509.DNSName("pump-17"),))
        result = await gateway.curl(
            "simplereenroll", data=csr_pem(make_csr(new_key(), "pump-17")), cert=old_cert, key=old_key
        )
        self.assertEqual(result.status, 200, result.text)

    async def test_csr_with_sans_keeps_them(self) -> None:
        """A CSR that has SANs (registered for the device) is issued with
        exactly those SANs."""
        gateway = await RunningGateway.start(self, MATRIX_CONFIG)
        await register(gateway, names=(("DNS", "pump-17.plant.example"), ("IP", "192.0.2.17")))
        sans = [x509.DNSName("pump-17.plant.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.17"))]
        csr = make_csr(new_key(), "pump-17", sans=sans)
        result = await gateway.curl("simpleenroll", data=csr_pem(csr), user="pump-17:s3cret")
        self.assertEqual(result.status, 200, result.text)
        [cert] = protocol.decode_certs_only(result.body)
        self.assertEqual(_sans(cert), sans)
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "pump-17")


class ForeignCertificateTests(TestCase):
    async def test_password_login_beside_a_foreign_certificate(self) -> None:
        """On a handler that takes only this gateway's certificates, a
        device that logs in with its password while its TLS stack also
        presents a factory certificate is served as the password device."""
        from tests.test_refusals import FULL_CONFIG, basic_csr, write_factory_files
        from tests.test_auth import FACTORY_CA

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        gateway = await RunningGateway.start(self, FULL_CONFIG.format(**write_factory_files(directory)))
        await register(gateway)
        idevid = FACTORY_CA.issue(directory, "ACME-PUMP-0017")
        result = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret", **idevid.curl)
        self.assertEqual(result.status, 200, result.text)
        [issued] = await gateway.store.list_certificates()
        self.assertEqual(issued.requester, "device:pump-17")
