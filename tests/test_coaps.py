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

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from estgw import protocol
from estgw.ca import IssueRequest, Profile
from estgw.coaps import coap
from estgw.coaps.resource import Reply, coap_code
from estgw.refusal import Refusal
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
handler.23.allowRenewalWithOldCertificates = true
handler.24.operation = simpleenroll
handler.24.label = coapsonly
handler.24.transport = coaps
handler.24.format = est-simpleenroll-subjectmatch
handler.25.operation = cacerts
handler.25.label = coapsonly
handler.25.transport = both
handler.26.operation = simpleenroll
handler.26.label = any
handler.26.format = estcoaps-simpleenroll
handler.27.operation = serverkeygen
handler.27.transport = coaps
handler.27.serverkeygen.allowUnencryptedKey = true
handler.28.operation = serverkeygen
handler.28.label = coapsonly
handler.28.transport = coaps
handler.29.operation = csrattrs
handler.29.label = coapsonly
handler.29.transport = coaps
handler.29.csrattrs.template = subject: CN ; key: ec-p384
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

    async def test_store_failure_is_5_03(self) -> None:
        """A store that cannot record over CoAPs: 5.03 with the reason in
        words, as over HTTPS (estgw.guard), nothing recorded; the next
        request is issued."""
        from twisted.internet import defer as _defer

        from estgw.store import StoreUnavailable

        gateway = await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-8")
        gw = gateway.service.gateway
        real = gw.store

        class NoRecord:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def record_certificate(self, issued: Any, renewing: Any = None) -> Any:
                return _defer.fail(StoreUnavailable("database is locked"))

        gw.store = NoRecord()
        try:
            result = await self.refused(
                "/.well-known/est/sen", "5.03", "store-unavailable", "cannot use its certificate store",
                method="post", payload=make_csr(new_key(), "pump-8").public_bytes(Encoding.DER),
                content_format=coap.PKCS10, cert=cert_file, key=key_file,
            )
            self.assertNotIn("locked", result.diagnostic)
        finally:
            gw.store = real
        again = await self.coap(
            "/.well-known/est/sen", method="post", payload=make_csr(new_key(), "pump-8").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=cert_file, key=key_file,
        )
        self.assertEqual(again.code, "2.04", again.log[-2000:])

    async def test_large_request_and_response_default_blocks(self) -> None:
        """An RSA-4096 enrollment without -b: the CSR and the PKCS#7
        answer are each over one datagram, so both go block-wise at the
        default 1024-byte blocks (Block1 by the client, Block2 by us)."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-4096")
        big = rsa.generate_private_key(65537, 4096)
        sans = [x509.DNSName(f"sensor-{n}.pump-4096.example") for n in range(8)]
        csr = make_csr(big, "pump-4096", sans).public_bytes(Encoding.DER)
        self.assertGreater(len(csr), 1024)
        result = await self.coap(
            "/.well-known/est/any/sen", method="post", payload=csr, content_format=coap.PKCS10,
            cert=cert_file, key=key_file,
        )
        self.assertEqual(result.code, "2.04", result.diagnostic)
        self.assertGreater(len(result.payload), 1024)
        self.assertIn("Block1:1/_/1024", result.log)
        self.assertIn("Block2:0/M/1024", result.log)
        self.assertIn("Block2:1/_/1024", result.log)
        (issued,) = pkcs7.load_der_pkcs7_certificates(result.payload)
        self.assertEqual(issued.public_key().key_size, 4096)

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

    async def test_csrattrs_template(self) -> None:
        """att under a label with an RFC 9908 template: the DER CsrAttrs
        carries the CertificationRequestInfoTemplate (decoded with
        pyasn1), and sen there refuses a CSR with another key type."""
        from pyasn1.codec.der import decoder
        from pyasn1_modules import rfc7030

        from estgw import rfc9908

        await self.start()
        result = await self.coap("/.well-known/est/coapsonly/att")
        self.assertEqual(result.code, "2.05")
        attrs, rest = decoder.decode(result.payload, asn1Spec=rfc7030.CsrAttrs())
        self.assertEqual(rest, b"")
        types = [a["attribute"]["attrType"] for a in attrs if a.getName() == "attribute"]
        self.assertIn(rfc9908.id_aa_certificationRequestInfoTemplate, types)
        _cert, _key, cert_file, key_file = self.credentials("pump-14")
        await self.refused(
            "/.well-known/est/coapsonly/sen", "4.03", "csr-template-key", "",
            method="post", payload=make_csr(new_key(), "pump-14").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=cert_file, key=key_file,
        )

    async def test_discovery(self) -> None:
        """/.well-known/core lists the CoAPs resources with RFC 9148 types."""
        await self.start()
        result = await self.coap("/.well-known/core")
        self.assertEqual(result.code, "2.05")
        links = result.payload.decode()
        for link in (
            '</.well-known/est/sen>;rt="ace.est.sen"', '</.well-known/est/crts>;rt="ace.est.crts"',
            '</.well-known/est/coapsonly/sen>;rt="ace.est.sen"', '</.well-known/est/sren>;rt="ace.est.sren"',
            '</.well-known/est/skg>;rt="ace.est.skg"', '</.well-known/est/skc>;rt="ace.est.skc"',
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

    async def issue_over_coaps(self, cert_file: str, key: Any, key_file: str, subject: str) -> tuple[x509.Certificate, str]:
        result = await self.coap(
            "/.well-known/est/sen", method="post", payload=make_csr(key, subject).public_bytes(Encoding.DER),
            content_format=coap.PKCS10, accept=coap.PKIX_CERT, cert=cert_file, key=key_file,
        )
        self.assertEqual(result.code, "2.04", result.diagnostic)
        issued = x509.load_der_x509_certificate(result.payload)
        return issued, write(os.path.join(self.gateway.directory, f"{issued.serial_number:x}.pem"), cert_pem(issued))

    async def test_revoked_client_certificate(self) -> None:
        """A certificate revoked in the store (estgw cert revoke) is refused
        over CoAPs from the next request on."""
        gateway = await self.start()
        _cert, key, cert_file, key_file = self.credentials("pump-10")
        issued, issued_file = await self.issue_over_coaps(cert_file, key, key_file, "pump-10")
        await gateway.store.revoke_certificate(issued.serial_number, "keyCompromise")
        await self.refused(
            "/.well-known/est/sren", "4.03", "client-certificate-revoked", "has been revoked",
            method="post", payload=make_csr(key, "pump-10").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=issued_file, key=key_file,
        )

    async def test_not_last_issued(self) -> None:
        """allowRenewalWithOldCertificates = true: an older certificate of
        the subject cannot renew over CoAPs either."""
        await self.start()
        _cert, key, cert_file, key_file = self.credentials("pump-11")
        _older, older_file = await self.issue_over_coaps(cert_file, key, key_file, "pump-11")
        await self.issue_over_coaps(older_file, key, key_file, "pump-11")  # the last issued renews
        await self.refused(
            "/.well-known/est/sren", "4.03", "not-last-issued-certificate", "issued last",
            method="post", payload=make_csr(key, "pump-11").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=older_file, key=key_file,
        )

    async def test_challenge_password(self) -> None:
        """A CSR with a challengePassword is refused (no channel binding here)."""
        from estgw import policy

        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-12")
        csr = make_csr(new_key(), "pump-12", attributes=[(policy.CHALLENGE_PASSWORD, b"letmein")])
        await self.refused(
            "/.well-known/est/sen", "4.03", "challenge-password-not-supported", "challengePassword",
            method="post", payload=csr.public_bytes(Encoding.DER), content_format=coap.PKCS10,
            cert=cert_file, key=key_file,
        )

    async def test_weak_key(self) -> None:
        """An RSA-1024 CSR: 4.00 csr-weak-key."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("pump-13")
        csr = make_csr(rsa.generate_private_key(65537, 1024), "pump-13")
        await self.refused(
            "/.well-known/est/sen", "4.00", "csr-weak-key", "at least 2048 bits",
            method="post", payload=csr.public_bytes(Encoding.DER), content_format=coap.PKCS10,
            cert=cert_file, key=key_file,
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

    async def test_control_characters_escaped(self) -> None:
        """A label with a newline and an escape sequence is one escaped
        line in the audit log and the diagnostic payload."""
        await self.start()
        result = await self.refused(
            "/.well-known/est/x%0Aforged%1B%5B2J/crts", "4.04", "unknown-label", "no CA label",
        )
        self.assertNotIn("\n", result.diagnostic.strip())
        self.assertNotIn("\x1b", result.diagnostic)
        (event,) = [e for e in self.events if e.get("event") == "refused"]
        self.assertNotIn("\n", event["path"] + event["reason"])
        self.assertIn("\\n", event["path"])

    async def test_not_acceptable(self) -> None:
        """Accept asking for a format the resource is not served as: 4.06."""
        await self.start()
        await self.refused("/.well-known/est/att", "4.06", "not-acceptable", "Content-Format 285", accept=coap.PKCS10)

    async def test_fullcmc_not_offered(self) -> None:
        await self.start()
        await self.refused(
            "/.well-known/est/fullcmc", "5.01", "not-implemented", "fullcmc",
            method="post", payload=b"x", content_format=coap.PKCS10,
        )

    # -- serverkeygen ---------------------------------------------------------------------

    async def serverkeygen(self, short: str, subject: str) -> tuple[list, CoAPResult]:
        _cert, _key, cert_file, key_file = self.credentials(subject)
        csr = make_csr(new_key(), subject).public_bytes(Encoding.DER)
        before = await self.gateway.store.count_certificates()
        result = await self.coap(
            f"/.well-known/est/{short}", method="post", payload=csr, content_format=coap.PKCS10,
            cert=cert_file, key=key_file,
        )
        self.assertEqual(result.code, "2.04", result.diagnostic)
        self.assertIn("Content-Format:62", result.log)
        self.assertEqual(await self.gateway.store.count_certificates(), before + 1)
        return cbor2.loads(result.payload), result

    def assert_key_matches(self, key_der: bytes, certificate: x509.Certificate) -> None:
        key = serialization.load_der_private_key(key_der, None)
        self.assertEqual(
            key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            certificate.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
        )

    async def test_skg(self) -> None:
        """skg: multipart-core (62) of the PKCS#8 key (284) and the PKCS#7
        certs-only (281), parsed with cbor2; key and certificate match."""
        await self.start()
        parts, _result = await self.serverkeygen("skg", "valve-1")
        self.assertEqual([parts[0], parts[2]], [coap.PKCS8, coap.PKCS7_CERTS_ONLY])
        (certificate,) = pkcs7.load_der_pkcs7_certificates(parts[3])
        self.assertEqual(certificate.subject, name("valve-1"))
        self.assert_key_matches(parts[1], certificate)

    async def test_skc(self) -> None:
        """skc: the certificate as application/pkix-cert (287)."""
        await self.start()
        parts, _result = await self.serverkeygen("skc", "valve-2")
        self.assertEqual([parts[0], parts[2]], [coap.PKCS8, coap.PKIX_CERT])
        certificate = x509.load_der_x509_certificate(parts[3])
        self.assertEqual(certificate.subject, name("valve-2"))
        self.assert_key_matches(parts[1], certificate)

    async def test_skg_unencrypted_key_not_allowed(self) -> None:
        """Without serverkeygen.allowUnencryptedKey the CSR must name a key
        to encrypt to: 4.00, nothing issued."""
        await self.start()
        _cert, _key, cert_file, key_file = self.credentials("valve-3")
        csr = make_csr(new_key(), "valve-3").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/coapsonly/skg", "4.00", "serverkeygen-encryption-required", "",
            method="post", payload=csr, content_format=coap.PKCS10, cert=cert_file, key=key_file,
        )

    async def test_skg_without_client_certificate(self) -> None:
        await self.start()
        csr = make_csr(new_key(), "valve-4").public_bytes(Encoding.DER)
        await self.refused(
            "/.well-known/est/skg", "4.03", "client-certificate-required", "client certificate",
            method="post", payload=csr, content_format=coap.PKCS10,
        )


class FakeSession:
    """What the CoAP layer uses of a DTLS session; sent records collected."""

    def __init__(self, peer: Any, address: tuple = ("127.0.0.1", 40000)) -> None:
        self.address = address
        self.peer = peer
        self.closed = False
        self.state: dict = {}
        self.sent: list[coap.Message] = []

    def send(self, data: bytes) -> None:
        self.sent.append(coap.decode(data))


class CoAPLayerTests(TestCase):
    """The CoAP layer on a real gateway, driven without DTLS: exchanges,
    block-wise transfer and the codes a client cannot easily provoke."""

    async def setUp(self) -> None:
        self.gateway = await RunningGateway.start(self, COAPS_CONFIG)
        self.server = self.gateway.service.coaps_port.protocol.application
        key = new_key()
        self.key = key
        self.cert = self.gateway.service.state.ca.sign(
            IssueRequest(subject=name("meter-1"), public_key=key.public_key()),
            Profile(extended_key_usage=tuple(CLIENT_AUTH)),
        )
        from estgw.tls import PeerInfo

        self.session = FakeSession(PeerInfo(is_tls=True, certificate=self.cert, chain=(self.cert,), tls_version="DTLSv1.2"))

    def request(self, path: str, code: int = coap.GET, mid: int = 1, payload: bytes = b"",
                options: tuple = (), type_: int = coap.CON) -> coap.Message:
        segments = [s for s in path.split("/") if s]
        return coap.Message(type_, code, mid, b"tk", coap.uri_path_options(segments) + tuple(options), payload)

    async def exchange(self, message: coap.Message) -> coap.Message:
        """Send ``message``; the response (waiting for the pipeline)."""
        before = len(self.session.sent)
        self.server.record_received(self.session, coap.encode(message))
        for _ in range(200):
            if len(self.session.sent) > before:
                return self.session.sent[-1]
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("no response")

    async def test_large_response_in_1024_byte_blocks(self) -> None:
        """A response over 1024 bytes goes out block-wise without being
        asked (RFC 7959 §2.4); later blocks come from the kept response."""
        reply = Reply(coap.CONTENT, bytes(range(256)) * 12, coap.PKCS7_CERTS_ONLY)  # 3072 bytes
        first = self.request("/.well-known/est/crts")
        self.server._send(self.session, first, reply)
        response = self.session.sent[-1]
        self.assertEqual(coap.Block.decode(response.option(coap.BLOCK2)), coap.Block(0, True, 6))
        self.assertEqual(response.uint_option(coap.SIZE2), 3072)
        self.assertEqual(response.payload, reply.payload[:1024])
        etag = response.option(coap.ETAG)
        payload = response.payload
        for num in (1, 2):
            block2 = ((coap.BLOCK2, coap.Block(num, False, 6).encode()),)
            response = await self.exchange(self.request("/.well-known/est/crts", mid=10 + num, options=block2))
            self.assertEqual(response.option(coap.ETAG), etag)
            payload += response.payload
        self.assertEqual(coap.Block.decode(response.option(coap.BLOCK2)), coap.Block(2, False, 6))
        self.assertEqual(payload, reply.payload)

    async def test_retransmitted_request_issues_once(self) -> None:
        """A CON enrollment sent again (the client's retransmissions,
        RFC 7252 §4.2) is served once: copies that arrive while it is
        served are ignored, a later copy gets the same answer again."""
        csr = make_csr(new_key(), "meter-1").public_bytes(Encoding.DER)
        message = self.request(
            "/.well-known/est/sen", coap.POST, mid=77, payload=csr,
            options=((coap.CONTENT_FORMAT, coap.encode_uint(coap.PKCS10)),),
        )
        before = await self.gateway.store.count_certificates()
        self.server.record_received(self.session, coap.encode(message))
        first = await self.exchange(message)  # a copy while the first is served
        self.assertEqual(first.code, coap.CHANGED)
        self.assertEqual(len(self.session.sent), 1)
        again = await self.exchange(message)  # a copy after: the kept answer
        self.assertEqual(again, first)
        self.assertEqual(await self.gateway.store.count_certificates(), before + 1)

    async def test_ping_and_malformed_get_reset(self) -> None:
        """An empty CON (CoAP ping) and an unparsable CON are answered RST."""
        self.server.record_received(self.session, coap.encode(coap.Message(coap.CON, coap.EMPTY, 5)))
        self.server.record_received(self.session, b"\x40\x01\x00\x06\xff")
        self.assertEqual([(m.type, m.message_id) for m in self.session.sent], [(coap.RST, 5), (coap.RST, 6)])

    async def test_unknown_critical_option(self) -> None:
        """An unknown critical option: 4.02 Bad Option (RFC 7252 §5.4.1)."""
        response = await self.exchange(self.request("/.well-known/est/crts", options=((9, b"x"),)))
        self.assertEqual(response.code, coap.BAD_OPTION)

    async def test_block1_out_of_order_and_too_large(self) -> None:
        """Block1 must start at 0 and continue in order (else 4.08), and
        stop at server.maxRequestBytes (4.13 with Size1); nothing issued."""
        before = await self.gateway.store.count_certificates()
        skipped = self.request(
            "/.well-known/est/sen", coap.POST, mid=2, payload=b"x" * 64,
            options=((coap.BLOCK1, coap.Block(3, True, 2).encode()),),
        )
        self.assertEqual((await self.exchange(skipped)).code, coap.REQUEST_ENTITY_INCOMPLETE)
        limit = self.gateway.config.max_request_bytes
        response = None
        for num in range(limit // 1024 + 1):
            block = self.request(
                "/.well-known/est/sen", coap.POST, mid=100 + num, payload=b"x" * 1024,
                options=((coap.BLOCK1, coap.Block(num, True, 6).encode()),),
            )
            response = await self.exchange(block)
            if response.code != coap.CONTINUE:
                break
        self.assertEqual(response.code, coap.REQUEST_ENTITY_TOO_LARGE)
        self.assertEqual(response.uint_option(coap.SIZE1), limit)
        self.assertEqual(await self.gateway.store.count_certificates(), before)

    async def test_pending_is_503_with_max_age(self) -> None:
        """A pending request (HTTP 202 + Retry-After) is 5.03 with Max-Age
        (RFC 9148 §4.7); every refusal status has its CoAP code."""
        from estgw.refusal import Pending

        message = self.request("/.well-known/est/sen", coap.POST)
        reply = self.server._refusal(self.session, message, "/.well-known/est/sen", Pending("approval-pending", "wait", 90))
        self.assertEqual((reply.code, reply.options), (coap.SERVICE_UNAVAILABLE, ((coap.MAX_AGE, coap.encode_uint(90)),)))
        for status, expected in ((400, "4.00"), (401, "4.01"), (403, "4.03"), (404, "4.04"), (405, "4.05"),
                                 (409, "4.09"), (413, "4.13"), (415, "4.15"), (501, "5.01"), (503, "5.03")):
            self.assertEqual(coap.code_text(coap_code(Refusal(status, "x", "y"))), expected)

    async def test_non_request_gets_non_response(self) -> None:
        """A NON request gets a NON response with its own message ID."""
        response = await self.exchange(self.request("/.well-known/est/crts", mid=300, type_=coap.NON))
        self.assertEqual((response.type, response.code, response.token), (coap.NON, coap.CONTENT, b"tk"))
        self.assertNotEqual(response.message_id, 300)
