"""Every kind of certificate and CRL estgw produces passes pkilint's
RFC 5280 linters with no ERROR (or FATAL) finding.

The kinds: the local root and issuing CA, the gateway's TLS server
certificate, device certificates from simpleenroll (EC and RSA keys,
DNS and IP subjectAltNames, a serialNumber attribute) and simplereenroll,
the approval service's CAs, server, gateway and operator certificates,
and the CRL of ``estgw crl write`` with revoked entries; and every kind of
OCSP response the publishing listener signs passes the RFC 6960 linters.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from pkilint import loader, pkix
from pkilint.pkix import certificate as pkix_certificate, crl as pkix_crl, extension, name
from pkilint.pkix import ocsp as pkilint_ocsp
from pkilint.validation import ValidationFindingSeverity
from twisted.trial.unittest import TestCase

from estgw.approval import pki
from estgw.approval.testing import RunningApprovalService
from estgw.protocol import decode_certs_only
from estgw.testing import TEST_CONFIG, RunningGateway, csr_pem, make_csr, new_key, write
from tests.test_auth import run_cli
from tests.test_e2e import load_pem
from tests.test_publish import LOCAL, OPERATOR, _Publishing, _two_cert_request

_CERTIFICATES = pkix_certificate.create_pkix_certificate_validator_container(
    pkix_certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS),
    [
        pkix_certificate.create_issuer_validator_container([]),
        pkix_certificate.create_validity_validator_container(),
        pkix_certificate.create_subject_validator_container([]),
        pkix_certificate.create_extensions_validator_container([]),
        pkix_certificate.create_spki_validator_container([]),
    ],
)
_CRLS = pkix_crl.create_pkix_crl_validator_container(
    [
        pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
        pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
    ],
    [
        pkix_crl.create_issuer_validator_container([]),
        pkix_crl.create_validity_validator_container([]),
        pkix_crl.create_extensions_validator_container([]),
    ],
)


def errors(kind: str, der: bytes, label: str) -> str:
    """pkilint's ERROR and FATAL findings for one document, as text ('' if none)."""
    if kind == "certificate":
        document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, label)
        results = _CERTIFICATES.validate(document.root)
    else:
        document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, label)
        results = _CRLS.validate(document.root)
    lines = [
        f"{label}: {found.finding.code} ({found.finding.severity.name}): {found.message}"
        for result in results
        for found in result.finding_descriptions
        if found.finding.severity <= ValidationFindingSeverity.ERROR and not _single_label_name(found)
    ]
    return "\n".join(lines)


def _single_label_name(found: Any) -> bool:
    """pkilint wants a dot in every dNSName; RFC 5280 §4.2.1.6 takes RFC
    1034's preferred name syntax, where one label ("localhost", a device's
    host name "pump-17") is a domain name.  That finding alone is not an error."""
    return (
        found.finding.code == "pkix.invalid_domain_name_syntax"
        and "." not in (found.message or "").split(":", 1)[-1]
    )


class PkilintTests(TestCase):
    timeout = 120

    async def test_everything_estgw_issues(self) -> None:
        """No ERROR or FATAL finding on any kind of certificate or CRL."""
        documents: list[tuple[str, bytes, str]] = []

        def add(label: str, cert: x509.Certificate) -> None:
            documents.append(("certificate", cert.public_bytes(Encoding.DER), label))

        gateway = await RunningGateway.start(self, TEST_CONFIG)
        state = gateway.service.state
        add("root CA", state.ca.root)
        add("issuing CA", state.ca.issuing)
        add("TLS server certificate", state.server_certificate)

        await run_cli(
            gateway, "device", "add", "pump-17", "--password", "s3cret",
            "--san", "DNS:pump-17.plant.example", "--san", "IP:192.0.2.17",
        )
        issued: list[tuple[Any, x509.Certificate]] = []
        for label, key, sans in [
            ("EC device", new_key("ec"), [x509.DNSName("pump-17")]),
            ("RSA device", new_key("rsa2048"), [x509.DNSName("pump-17.plant.example"),
                                                x509.IPAddress(ipaddress.ip_address("192.0.2.17"))]),
        ]:
            result = await gateway.curl(
                "simpleenroll", data=csr_pem(make_csr(key, "pump-17", sans=sans)), user="pump-17:s3cret"
            )
            self.assertEqual(result.status, 200, result.text)
            [cert] = decode_certs_only(result.body)
            add(label, cert)
            issued.append((key, cert))

        # simplereenroll with the EC device's certificate.
        key, cert = issued[0]
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        from estgw.testing import cert_pem, key_pem

        cert_file = write(os.path.join(directory, "device.pem"), cert_pem(cert))
        key_file = write(os.path.join(directory, "device.key"), key_pem(key))
        renewed = await gateway.curl(
            "simplereenroll", data=csr_pem(make_csr(key, "pump-17", sans=[x509.DNSName("pump-17")])),
            cert=cert_file, key=key_file,
        )
        self.assertEqual(renewed.status, 200, renewed.text)
        add("renewed device", decode_certs_only(renewed.body)[0])

        # A CRL with revoked entries, as `estgw crl write` makes it.
        await run_cli(gateway, "cert", "revoke", format(issued[1][1].serial_number, "x"), "--reason", "keyCompromise")
        await run_cli(gateway, "cert", "revoke", format(cert.serial_number, "x"))
        crl_file = os.path.join(directory, "crl.der")
        await run_cli(gateway, "crl", "write", "--out", crl_file, "--der")
        with open(crl_file, "rb") as f:
            documents.append(("crl", f.read(), "CRL of the issuing CA"))

        # The approval service's PKI.
        approval = await RunningApprovalService.start(self)
        service_pki = approval.service.pki
        for label, ca in (("server", service_pki.server_ca), ("gateway", service_pki.gateway_ca),
                          ("operator", service_pki.operator_ca)):
            add(f"approval {label} root CA", ca.root)
            add(f"approval {label} issuing CA", ca.issuing)
        add("approval service TLS certificate", service_pki.server_certificate)
        add("approval gateway token", pki.issue_client(service_pki.gateway_ca, "estgw-ra", "gateways")[1])
        add("approval operator certificate", pki.issue_client(service_pki.operator_ca, "alice", "operators")[1])

        findings = [errors(kind, der, label) for kind, der, label in documents]
        self.assertFalse("".join(findings), "".join(findings))
        self.assertEqual(len(documents), 16)


_OCSP_RESPONSES = pkilint_ocsp.create_pkix_ocsp_response_validator_container(
    [
        pkilint_ocsp.create_response_decoder(),
        pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
        pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
    ],
    [],
)


def ocsp_errors(der: bytes, label: str) -> str:
    """pkilint's RFC 6960 ERROR and FATAL findings for one OCSP response."""
    document = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, label)
    return "\n".join(
        f"{label}: {found.finding.code} ({found.finding.severity.name}): {found.message}"
        for result in _OCSP_RESPONSES.validate(document.root)
        for found in result.finding_descriptions
        if found.finding.severity <= ValidationFindingSeverity.ERROR
    )


class OcspLintTests(_Publishing):
    """Every kind of OCSP response the publishing listener signs (RFC 6960):
    good, revoked with a reason, several certificates in one response,
    signed by the CA and by a delegated responder; and the responder
    certificate itself under the RFC 5280 linters."""

    responder = "delegated"
    timeout = 120

    async def post(self, name: str, request: bytes) -> bytes:
        path = write(self.client.path(f"req-{abs(hash(request))}"), request)
        status, body = await self.get(
            self.base("ocsp", name), "-H", "Content-Type: application/ocsp-request", "--data-binary", "@" + path
        )
        self.assertEqual(status, 200)
        return body

    async def test_every_kind_of_response(self) -> None:
        """No ERROR or FATAL finding on any OCSP response."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509 import ocsp

        _, good = await self.enroll()
        _, revoked = await self.enroll()
        await self.revoke(revoked, "--reason", "keyCompromise")
        issuing = self.gateway.service.state.ca.issuing
        responses: list[tuple[str, bytes]] = []
        for label, cert in (("good", good), ("revoked", revoked)):
            request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuing, hashes.SHA1()).build()
            responses.append((f"{label} (CA-signed)", await self.post(LOCAL, request.public_bytes(Encoding.DER))))
        responses.append(
            ("two certificates", await self.post(LOCAL, _two_cert_request((good, issuing), (revoked, issuing))))
        )
        _, lab = await self.enroll("lab")
        (operator_issuing,) = load_pem(os.path.join(self.operator, "issuing.pem"))
        request = ocsp.OCSPRequestBuilder().add_certificate(lab, operator_issuing, hashes.SHA1()).build()
        delegated = await self.post(OPERATOR, request.public_bytes(Encoding.DER))
        responses.append(("delegated responder", delegated))
        found = [ocsp_errors(der, label) for label, der in responses]
        (responder,) = ocsp.load_der_ocsp_response(delegated).certificates
        found.append(errors("certificate", responder.public_bytes(Encoding.DER), "OCSP responder certificate"))
        self.assertEqual([f for f in found if f], [])
