"""EST over CoAPs (RFC 9148) end to end, with libcoap's coap-client as
the independent client, against a real gateway on 127.0.0.1.

Every refusal shows the CoAP code, the diagnostic payload, one audit log
line with the reason code, and that the store has no new certificate.
"""

from __future__ import annotations

import base64
import os
import shutil
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from estgw import protocol
from estgw.ca import IssueRequest, Profile
from estgw.coaps import coap
from estgw.testing import (
    COAP_CLIENT, TEST_CONFIG, CoAPResult, RunningGateway, cert_pem, key_pem, make_csr, name, new_key,
    run_coap_client, write,
)
from tests.test_auth import CLIENT_AUTH, FACTORY_CA

COAPS_CONFIG = TEST_CONFIG + """\
coaps.port = 0
coaps.interface = 127.0.0.1
handler.20.operation = simpleenroll
handler.20.format = estcoaps-simpleenroll-subjectmatch
handler.21.operation = cacerts
handler.21.transport = coaps
handler.22.operation = csrattrs
handler.22.transport = coaps
handler.22.csrattrs = ecPublicKey=secp384r1, ecdsa-with-SHA384
handler.23.operation = simplereenroll
handler.23.format = estcoaps-simplereenroll
handler.24.operation = simpleenroll
handler.24.label = coapsonly
handler.24.transport = coaps
handler.24.format = est-simpleenroll-subjectmatch
handler.25.operation = cacerts
handler.25.label = coapsonly
handler.25.transport = both
"""


def setUpModule() -> None:
    if shutil.which(COAP_CLIENT) is None:
        raise SkipTest(f"{COAP_CLIENT} is not installed (Debian: apt-get install libcoap3-bin)")


class CoAPsTests(TestCase):
    timeout = 120

    async def start(self) -> RunningGateway:
        self.events: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "estgw.audit":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        gateway = await RunningGateway.start(self, COAPS_CONFIG)
        self.gateway = gateway
        return gateway

    def credentials(self, common_name: str, issuer: Any = None) -> tuple[x509.Certificate, Any, str, str]:
        """A client certificate with clientAuth signed by the gateway's CA,
        its key, and both written as PEM files."""
        key = new_key()
        cert = self.gateway.service.state.ca.sign(
            IssueRequest(subject=name(common_name), public_key=key.public_key()),
            Profile(extended_key_usage=tuple(CLIENT_AUTH)),
        )
        directory = self.gateway.directory
        return (
            cert, key,
            write(os.path.join(directory, f"{common_name}.pem"), cert_pem(cert)),
            write(os.path.join(directory, f"{common_name}.key"), key_pem(key)),
        )

    async def coap(self, path: str, **kwargs: Any) -> CoAPResult:
        port = self.gateway.service.coaps_port.getHost().port
        return await run_coap_client(
            f"coaps://127.0.0.1:{port}{path}", self.gateway.ca_file, workdir=self.gateway.directory, **kwargs
        )

    async def refused(self, path: str, code: str, reason_code: str, reason: str, **kwargs: Any) -> CoAPResult:
        """Send a request that must be refused; check code, diagnostic,
        audit log and that nothing was issued."""
        before = await self.gateway.store.count_certificates()
        del self.events[:]
        result = await self.coap(path, **kwargs)
        self.assertEqual(result.code, code, result.log[-2000:])
        self.assertIn(reason, result.diagnostic)
        refused = [e for e in self.events if e.get("event") == "refused"]
        self.assertEqual([e["code"] for e in refused], [reason_code])
        self.assertEqual(refused[0]["status"], code)
        self.assertEqual([e for e in self.events if e.get("event") == "issued"], [])
        self.assertEqual(await self.gateway.store.count_certificates(), before)
        return result

    # -- cacerts --------------------------------------------------------------------------

    async def test_cacerts_blockwise(self) -> None:
        """crts with 64-byte blocks: coap-client fetches every Block2 block
        and reassembles the DER PKCS#7 certs-only of the whole chain."""
        gateway = await self.start()
        result = await self.coap("/.well-known/est/crts", block_size=64)
        self.assertEqual(result.code, "2.05")
        chain = pkcs7.load_der_pkcs7_certificates(result.payload)
        self.assertEqual(set(chain), set(gateway.service.state.ca.chain()))  # a SET OF: DER order
        blocks = len(result.payload) // 64 + 1
        self.assertIn(f"Block2:{blocks - 1}/_/64", result.log)  # the last block, M unset
        self.assertIn("Block2:1/M/64", result.log)
        self.assertIn("Content-Format:281", result.log)

    async def test_cacerts_long_name_and_label(self) -> None:
        """RFC 7030's long name works too, and a label served over both transports."""
        gateway = await self.start()
        for path in ("/.well-known/est/cacerts", "/.well-known/est/coapsonly/crts"):
            result = await self.coap(path)
            self.assertEqual(result.code, "2.05", path)
            self.assertEqual(set(pkcs7.load_der_pkcs7_certificates(result.payload)), set(gateway.service.state.ca.chain()))
        https = await gateway.curl("coapsonly/cacerts")
        self.assertEqual(https.status, 200)

    # -- enrollment -------------------------------------------------------------------------

    async def test_simpleenroll_with_client_certificate(self) -> None:
        """sen with the DTLS client certificate as identity: a 64-byte
        Block1 upload of the DER CSR, 2.04 with the certificate, recorded."""
        gateway = await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-7")
        new = new_key()
        csr = make_csr(new, "pump-7").public_bytes(Encoding.DER)
        before = await gateway.store.count_certificates()
        result = await self.coap(
            "/.well-known/est/sen", method="post", payload=csr, content_format=coap.PKCS10,
            cert=cert_file, key=key_file, block_size=64,
        )
        self.assertEqual(result.code, "2.04", result.log[-2000:])
        self.assertIn("Block1:1/M/64", result.log)
        (issued,) = pkcs7.load_der_pkcs7_certificates(result.payload)
        self.assertEqual(issued.subject, name("pump-7"))
        self.assertEqual(
            issued.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            new.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        )
        self.assertEqual(await gateway.store.count_certificates(), before + 1)
        record = await gateway.store.get_certificate(issued.serial_number)
        self.assertEqual(record.handler, "20")
        self.assertTrue(record.requester.startswith("cert:CN=pump-7#serial="))

    async def test_simpleenroll_accept_pkix_cert(self) -> None:
        """Accept: 287 returns the bare DER certificate (RFC 9148 §4.2)."""
        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-8")
        csr = make_csr(new_key(), "pump-8").public_bytes(Encoding.DER)
        result = await self.coap(
            "/.well-known/est/sen", method="post", payload=csr, content_format=coap.PKCS10,
            accept=coap.PKIX_CERT, cert=cert_file, key=key_file,
        )
        self.assertEqual(result.code, "2.04")
        self.assertEqual(x509.load_der_x509_certificate(result.payload).subject, name("pump-8"))

    async def test_simplereenroll(self) -> None:
        """sren renews with the certificate the gateway issued and recorded."""
        gateway = await self.start()
        _cert, key, cert_file, key_file = self.credentials("pump-9")
        csr = make_csr(key, "pump-9").public_bytes(Encoding.DER)
        first = await self.coap(
            "/.well-known/est/sen", method="post", payload=csr, content_format=coap.PKCS10,
            accept=coap.PKIX_CERT, cert=cert_file, key=key_file,
        )
        self.assertEqual(first.code, "2.04")
        issued = x509.load_der_x509_certificate(first.payload)
        issued_file = write(os.path.join(gateway.directory, "issued.pem"), cert_pem(issued))
        again = await self.coap(
            "/.well-known/est/sren", method="post", payload=make_csr(new_key(), "pump-9").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=issued_file, key=key_file,
        )
        self.assertEqual(again.code, "2.04", again.diagnostic)
        (renewed,) = pkcs7.load_der_pkcs7_certificates(again.payload)
        self.assertEqual(renewed.subject, name("pump-9"))
        self.assertNotEqual(renewed.serial_number, issued.serial_number)

    async def test_csrattrs(self) -> None:
        """att returns the DER CsrAttrs of the CoAPs handler (285)."""
        await self.start()
        result = await self.coap("/.well-known/est/att")
        self.assertEqual(result.code, "2.05")
        self.assertIn("Content-Format:285", result.log)
        attributes = protocol.decode_csrattrs(base64.b64encode(result.payload))  # DER, not base64, on the wire
        self.assertEqual(attributes, protocol.parse_csrattrs_setting("ecPublicKey=secp384r1, ecdsa-with-SHA384"))

    async def test_discovery(self) -> None:
        """/.well-known/core lists the CoAPs resources with RFC 9148 types."""
        await self.start()
        result = await self.coap("/.well-known/core")
        self.assertEqual(result.code, "2.05")
        links = result.payload.decode()
        for link in (
            '</.well-known/est/sen>;rt="ace.est.sen"', '</.well-known/est/crts>;rt="ace.est.crts"',
            '</.well-known/est/coapsonly/sen>;rt="ace.est.sen"', '</.well-known/est/sren>;rt="ace.est.sren"',
        ):
            self.assertIn(link, links)
        self.assertNotIn("/lab/", links)  # HTTPS-only handlers are not offered here

    # -- refusals ------------------------------------------------------------------------

    async def test_no_client_certificate(self) -> None:
        """sen without a client certificate: 4.03, nothing issued."""
        await self.start()
        csr = make_csr(new_key(), "pump-1").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/sen", "4.03", "client-certificate-required", "client certificate",
            method="post", payload=csr, content_format=coap.PKCS10,
        )

    async def test_wrong_subject(self) -> None:
        """A CSR for another subject than the client certificate's: 4.03."""
        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-2")
        csr = make_csr(new_key(), "pump-3").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/sen", "4.03", "subject-mismatch", "differs from the client certificate subject",
            method="post", payload=csr, content_format=coap.PKCS10, cert=cert_file, key=key_file,
        )

    async def test_untrusted_client_certificate(self) -> None:
        """A client certificate from an unknown CA gets through the DTLS
        handshake and is refused by the filter with OpenSSL's reason."""
        await self.start()
        foreign = FACTORY_CA.issue(self.gateway.directory, "stranger")
        csr = make_csr(foreign.key, "stranger").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/sen", "4.03", "client-certificate-untrusted", "not trusted",
            method="post", payload=csr, content_format=coap.PKCS10, cert=foreign.cert_path, key=foreign.key_path,
        )

    async def test_renewal_without_certificate(self) -> None:
        """sren without a client certificate: 4.03."""
        await self.start()
        csr = make_csr(new_key(), "pump-4").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/sren", "4.03", "client-certificate-required", "client certificate",
            method="post", payload=csr, content_format=coap.PKCS10,
        )

    async def test_wrong_content_format(self) -> None:
        """A CSR sent as text/plain (0): 4.15."""
        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-5")
        csr = make_csr(new_key(), "pump-5").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/sen", "4.15", "unsupported-media-type", "expected Content-Format 286",
            method="post", payload=csr, content_format=coap.TEXT_PLAIN, cert=cert_file, key=key_file,
        )

    async def test_not_a_csr(self) -> None:
        """A payload that is not a PKCS#10 request: 4.00."""
        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-6")
        await self.refused(
            "/.well-known/est/sen", "4.00", "bad-csr", "not a PKCS#10",
            method="post", payload=b"\x30\x03\x02\x01\x01", content_format=coap.PKCS10, cert=cert_file, key=key_file,
        )

    async def test_wrong_method(self) -> None:
        """GET on sen: 4.05."""
        await self.start()
        await self.refused("/.well-known/est/sen", "4.05", "method-not-allowed", "sen takes POST")

    async def test_https_only_handler(self) -> None:
        """A handler without transport coaps is not served over CoAPs (4.04),
        and a CoAPs-only handler not over HTTPS (404)."""
        gateway = await self.start()
        await self.refused(
            "/.well-known/est/lab/sen", "4.04", "operation-not-configured", "not served over CoAPs",
            method="post", payload=b"x", content_format=coap.PKCS10,
        )
        https = await gateway.curl("coapsonly/simpleenroll", data=b"x")
        self.assertEqual(https.status, 404)

    async def test_unknown_label(self) -> None:
        await self.start()
        await self.refused("/.well-known/est/nolabel/crts", "4.04", "unknown-label", "no CA label")

    async def test_not_acceptable(self) -> None:
        """Accept asking for a format the resource is not served as: 4.06."""
        await self.start()
        await self.refused("/.well-known/est/att", "4.06", "not-acceptable", "Content-Format 285", accept=coap.PKCS10)

    async def test_serverkeygen_not_offered(self) -> None:
        await self.start()
        await self.refused(
            "/.well-known/est/skg", "5.01", "not-implemented", "serverkeygen",
            method="post", payload=b"x", content_format=coap.PKCS10,
        )
