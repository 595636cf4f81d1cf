"""Revocation that relying parties can check: CRL distribution points and
AIA in issued certificates, and the publishing listener's CRLs and OCSP
responses, checked with openssl (crl, verify -crl_check, ocsp) and curl as
independent clients."""

from __future__ import annotations

import base64
import io
import os
import socket
from typing import Any
from urllib.parse import quote

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc2560
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from estgw import cli
from estgw.config import ConfigError, from_string
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import TEST_CONFIG, RunningGateway, _which, run_process, until, write

from .test_e2e import DEVICE, PASSWORD, Client, load_pem
from .test_pki import FILE_PROCEDURE, operator_ca

LOCAL = "Test Procedure"
OPERATOR = "Operator CA"


def free_port() -> int:
    # The URLs in issued certificates must name the listener's real port.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def publishing_config(port: int, responder: str = "ca") -> str:
    base = f"http://127.0.0.1:{port}"
    lines = [f"publish.port = {port}", "publish.interface = 127.0.0.1"]
    for number, name in (("1", LOCAL), ("2", OPERATOR)):
        quoted = quote(name, safe="")
        lines += [
            f"tokenprocedure.{number}.crl.url = {base}/crl/{quoted}.crl",
            f"tokenprocedure.{number}.ocsp.url = {base}/ocsp/{quoted}",
            f"tokenprocedure.{number}.caIssuers.url = {base}/ca/{quoted}.crt",
        ]
    lines.append(f"tokenprocedure.2.ocsp.responder = {responder}")
    return TEST_CONFIG + FILE_PROCEDURE + "\n".join(lines) + "\n"


class _Publishing(TestCase):
    responder = "ca"

    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        self.operator = operator_ca(os.path.join(directory, "operator"))
        self.publish = free_port()
        self.gateway = RunningGateway(directory, publishing_config(self.publish, self.responder))
        await self.gateway.run()
        self.addCleanup(self.gateway.stop)
        await self.gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        self.client = Client(self, self.gateway, "client")

    def base(self, kind: str, name: str) -> str:
        suffix = ".crl" if kind == "crl" else ""
        return f"http://127.0.0.1:{self.publish}/{kind}/{quote(name, safe='')}{suffix}"

    async def enroll(self, label: str = "") -> tuple[str, x509.Certificate]:
        _, csr = await self.client.key_and_csr()
        path = f"{label}/simpleenroll" if label else "simpleenroll"
        result = await self.gateway.curl(path, csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        return pem, load_pem(pem)[0]

    async def chain(self, label: str = "") -> str:
        result = await self.gateway.curl(f"{label}/cacerts" if label else "cacerts")
        self.assertEqual(result.status, 200)
        return await self.client.certificates(result.body)

    async def get(self, url: str, *extra: str) -> tuple[int, bytes]:
        out = self.client.path(f"get-{abs(hash(url + str(extra)))}")
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-o", out, "-w", "%{http_code}",
                                    *extra, url])
        with open(out, "rb") as f:
            return int(result.stdout or b"0"), f.read()

    async def revoke(self, cert: x509.Certificate, *options: str) -> None:
        # Through the operator CLI on the same store, as an operator would.
        await cli.run(reactor, ["--config", self.gateway.config_path, "cert", "revoke",
                                f"{cert.serial_number:x}", *options], io.StringIO())

    async def ocsp_status(self, name: str, issuer_pem: str, cert_pem: str | None, chain: str,
                          serial: int | None = None, more: tuple[str, ...] = ()) -> str:
        target = ["-cert", cert_pem] if cert_pem else ["-serial", hex(serial or 0)]
        for other in more:  # several certificates in one request (RFC 6960 4.1.1 requestList)
            target += ["-cert", other]
        result = await self.client.openssl(
            "ocsp", "-issuer", issuer_pem, *target, "-url", self.base("ocsp", name),
            "-CAfile", chain, "-resp_text", "-timeout", "20", check=False,
        )
        text = (result.stdout + result.stderr).decode()
        self.assertEqual(result.code, 0, text)
        self.assertIn("Response verify OK", text)
        self.assertNotIn("WARNING: no nonce", text)  # openssl sends one; it must come back
        return text

    def issuer_pem(self, chain_pem: str, leaf: x509.Certificate) -> str:
        issuing = self.issuer_of(chain_pem, leaf)
        return write(self.client.path(f"issuer-{issuing.serial_number:x}.pem"),
                     issuing.public_bytes(serialization.Encoding.PEM))

    def issuer_of(self, chain_pem: str, leaf: x509.Certificate) -> x509.Certificate:
        # cacerts is a SET OF certificates: find the issuer by name, not position.
        return next(c for c in load_pem(chain_pem) if c.subject == leaf.issuer)

    async def check_kind(self, name: str, label: str) -> None:
        """For one token procedure: the URLs are in its certificates; after
        a revocation the published CRL (fetched by curl, and by openssl
        from the CRL distribution point) and OCSP say so, with the reason."""
        chain = await self.chain(label)
        revoked_pem, revoked = await self.enroll(label)
        good_pem, good = await self.enroll(label)
        text = (await self.client.openssl("x509", "-in", good_pem, "-noout", "-text")).stdout.decode()
        self.assertIn(f"URI:{self.base('crl', name)}", text)
        self.assertIn(f"OCSP - URI:{self.base('ocsp', name)}", text)
        self.assertIn(f"CA Issuers - URI:http://127.0.0.1:{self.publish}/ca/{quote(name, safe='')}.crt", text)
        status, der = await self.get(f"http://127.0.0.1:{self.publish}/ca/{quote(name, safe='')}.crt")
        self.assertEqual(status, 200)
        self.assertEqual(x509.load_der_x509_certificate(der), self.issuer_of(chain, good))

        await self.revoke(revoked, "--reason", "keyCompromise", "--invalidity-date", "2026-01-02")
        status, der = await self.get(self.base("crl", name))
        self.assertEqual(status, 200)
        crl_file = write(self.client.path(f"{label or 'local'}.crl"), der)
        crl_text = (await self.client.openssl("crl", "-inform", "DER", "-in", crl_file, "-noout", "-text",
                                              "-CAfile", chain)).stdout.decode()
        self.assertIn("Key Compromise", crl_text)
        self.assertIn("Invalidity Date", crl_text)
        published = x509.load_der_x509_crl(der)
        self.assertIsNotNone(published.get_revoked_certificate_by_serial_number(revoked.serial_number))
        self.assertIsNone(published.get_revoked_certificate_by_serial_number(good.serial_number))
        crl_pem = write(crl_file + ".pem", x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM))
        refused = await self.client.openssl("verify", "-crl_check", "-CAfile", chain, "-CRLfile", crl_pem,
                                            revoked_pem, check=False)
        self.assertNotEqual(refused.code, 0)
        self.assertIn(b"certificate revoked", refused.stdout + refused.stderr)
        # openssl fetches the CRL itself from the distribution point in the certificate.
        fetched = await self.client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain, good_pem)
        self.assertIn(b": OK", fetched.stdout)
        refused = await self.client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain,
                                            revoked_pem, check=False)
        self.assertIn(b"certificate revoked", refused.stdout + refused.stderr)

        issuer = self.issuer_pem(chain, good)
        answer = await self.ocsp_status(name, issuer, revoked_pem, chain)
        self.assertIn(f"{revoked_pem}: revoked", answer)
        self.assertIn("Reason: keyCompromise", answer)
        self.assertIn(f"{good_pem}: good", await self.ocsp_status(name, issuer, good_pem, chain))
        self.assertIn(": unknown", await self.ocsp_status(name, issuer, None, chain, serial=0x1234567))
        # One request about two certificates: one signed answer about each.
        both = await self.ocsp_status(name, issuer, good_pem, chain, more=(revoked_pem,))
        self.assertIn(f"{good_pem}: good", both)
        self.assertIn(f"{revoked_pem}: revoked", both)

        # RFC 6960 A.1 GET: /ocsp/<name>/<URL-encoded base64 of the DER request>.
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(good, self.issuer_of(chain, good), hashes.SHA1())
            .add_extension(x509.OCSPNonce(b"0123456789abcdef"), critical=False)
            .build()
        )
        encoded = quote(base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode(), safe="")
        status, body = await self.get(self.base("ocsp", name) + "/" + encoded)
        self.assertEqual(status, 200)
        response = ocsp.load_der_ocsp_response(body)
        self.assertEqual(response.response_status, ocsp.OCSPResponseStatus.SUCCESSFUL)
        self.assertEqual(response.certificate_status, ocsp.OCSPCertStatus.GOOD)
        self.assertEqual(response.serial_number, good.serial_number)
        self.assertEqual(response.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce,
                         b"0123456789abcdef")



def _two_cert_request(*pairs: tuple[x509.Certificate, x509.Certificate]) -> bytes:
    """A DER OCSP request about each (certificate, issuer) of ``pairs``
    (cryptography's builder holds one)."""
    requests = []
    for cert, issuer in pairs:
        one = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
        decoded, _ = der_decoder.decode(one.public_bytes(serialization.Encoding.DER), asn1Spec=rfc2560.OCSPRequest())
        requests.append(decoded["tbsRequest"]["requestList"][0])
    decoded, _ = der_decoder.decode(ocsp.OCSPRequestBuilder().add_certificate(*pairs[0], hashes.SHA1()).build()
                                    .public_bytes(serialization.Encoding.DER), asn1Spec=rfc2560.OCSPRequest())
    for extra in requests[1:]:
        decoded["tbsRequest"]["requestList"].append(extra)
    return bytes(der_encoder.encode(decoded))


class PublishTests(_Publishing):
    async def test_local_ca(self) -> None:
        """ca = local: CRL, CRL distribution point and OCSP, checked by openssl."""
        await self.check_kind(LOCAL, "")

    async def test_file_ca(self) -> None:
        """ca = file: the same for the operator's CA; the CRL and the OCSP
        responses verify against the operator's chain."""
        await self.check_kind(OPERATOR, "lab")

    async def test_crl_resigned_on_revocation_only(self) -> None:
        """Fetching twice without a revocation returns the same CRL; a
        revocation (from the CLI, another process's view of the store)
        makes the next fetch a new CRL with a higher CRL number."""
        _, cert = await self.enroll()
        url = self.base("crl", LOCAL)
        _, first = await self.get(url)
        _, again = await self.get(url)
        self.assertEqual(first, again)
        await self.revoke(cert)
        _, after = await self.get(url)
        old, new = x509.load_der_x509_crl(first), x509.load_der_x509_crl(after)
        number = lambda crl: crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number  # noqa: E731
        self.assertGreater(number(new), number(old))
        self.assertIsNotNone(new.get_revoked_certificate_by_serial_number(cert.serial_number))
        self.assertIsNone(old.get_revoked_certificate_by_serial_number(cert.serial_number))

    async def test_request_limits(self) -> None:
        """The publishing listener has the EST listener's request limits."""
        await check_request_limits(self, self.client, self.publish, f"/ocsp/{quote(LOCAL, safe='')}")

    async def test_refusals(self) -> None:
        """Unknown names are 404; an OCSP POST of another media type is 415;
        a request that is not OCSP gets malformedRequest; a request about
        another CA gets unauthorized (RFC 6960 2.3). Nothing is signed for them."""
        status, _ = await self.get(f"http://127.0.0.1:{self.publish}/crl/Nobody.crl")
        self.assertEqual(status, 404)
        status, _ = await self.get(f"http://127.0.0.1:{self.publish}/ocsp/Nobody")
        self.assertEqual(status, 404)
        status, _ = await self.get(f"http://127.0.0.1:{self.publish}/crl/{quote(LOCAL)}")
        self.assertEqual(status, 404)
        url = self.base("ocsp", LOCAL)
        junk = write(self.client.path("junk"), b"not an OCSP request")
        status, _ = await self.get(url, "-H", "Content-Type: text/plain", "--data-binary", "@" + junk)
        self.assertEqual(status, 415)
        status, body = await self.get(url, "-H", "Content-Type: application/ocsp-request",
                                      "--data-binary", "@" + junk)
        self.assertEqual(status, 200)
        self.assertEqual(ocsp.load_der_ocsp_response(body).response_status,
                         ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        # A request asking about no certificate is malformed (RFC 6960 4.1.1), not a 500.
        empty = rfc2560.OCSPRequest()
        empty["tbsRequest"]["requestList"] = rfc2560.OCSPRequest.componentType["tbsRequest"].getType()[
            "requestList"].clone()
        nothing = write(self.client.path("nothing.req"), der_encoder.encode(empty))
        status, body = await self.get(url, "-H", "Content-Type: application/ocsp-request",
                                      "--data-binary", "@" + nothing)
        self.assertEqual(status, 200)
        self.assertEqual(ocsp.load_der_ocsp_response(body).response_status,
                         ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
        _, cert = await self.enroll("lab")  # the operator CA's certificate, asked of the local CA
        (operator_issuing,) = load_pem(os.path.join(self.operator, "issuing.pem"))
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, operator_issuing, hashes.SHA256()).build()
        other = write(self.client.path("other.req"), request.public_bytes(serialization.Encoding.DER))
        status, body = await self.get(url, "-H", "Content-Type: application/ocsp-request",
                                      "--data-binary", "@" + other)
        self.assertEqual(ocsp.load_der_ocsp_response(body).response_status,
                         ocsp.OCSPResponseStatus.UNAUTHORIZED)
        # Asking one responder about certificates of two CAs: unauthorized too.
        _, mine = await self.enroll()
        (local_issuing,) = [c for c in load_pem(await self.chain()) if c.subject == mine.issuer]
        mixed = _two_cert_request((mine, local_issuing), (cert, operator_issuing))
        path = write(self.client.path("mixed.req"), mixed)
        status, body = await self.get(url, "-H", "Content-Type: application/ocsp-request", "--data-binary", "@" + path)
        self.assertEqual((status, ocsp.load_der_ocsp_response(body).response_status),
                         (200, ocsp.OCSPResponseStatus.UNAUTHORIZED))


async def check_request_limits(testcase: TestCase, client: Any, port: int, post_path: str) -> None:
    """The EST listener's limits on the listener at ``port``, with curl: a
    request line over 16 KiB is 400, a Content-Length past the body limit
    is 413 at once (not after the body), each with a reply."""
    out = client.path(f"limits-{port}")
    base = f"http://127.0.0.1:{port}"
    result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-o", out, "-w", "%{http_code}",
                                f"{base}/{'a' * 17000}"])
    testcase.assertEqual(result.stdout, b"400", result.stderr)
    body = write(client.path("small.req"), b"0" * 100)
    result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-o", out, "-w", "%{http_code}",
                                "-H", "Content-Type: application/ocsp-request", "-H", "Content-Length: 999999999999",
                                "--data-binary", "@" + body, base + post_path])
    testcase.assertEqual(result.stdout, b"413", result.stderr)
    with open(out, "rb") as f:
        testcase.assertIn(b"exceeds", f.read())


class DelegatedResponderTests(_Publishing):
    """The same with tokenprocedure.2.ocsp.responder = delegated: the file
    CA's OCSP responses are signed by a responder certificate it issued
    (OCSPSigning, ocsp-nocheck), which openssl accepts."""

    responder = "delegated"

    async def test_responder_certificate(self) -> None:
        """The response carries the responder certificate, issued by the
        operator's issuing CA with OCSPSigning and ocsp-nocheck."""
        _, cert = await self.enroll("lab")
        (issuing,) = load_pem(os.path.join(self.operator, "issuing.pem"))
        request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuing, hashes.SHA1()).build()
        path = write(self.client.path("req"), request.public_bytes(serialization.Encoding.DER))
        status, body = await self.get(self.base("ocsp", OPERATOR), "-H", "Content-Type: application/ocsp-request",
                                      "--data-binary", "@" + path)
        response = ocsp.load_der_ocsp_response(body)
        (responder,) = response.certificates
        responder.verify_directly_issued_by(issuing)
        self.assertEqual(list(responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
                         [x509.oid.ExtendedKeyUsageOID.OCSP_SIGNING])
        responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
        self.assertEqual(response.certificate_status, ocsp.OCSPCertStatus.GOOD)

    async def test_file_ca(self) -> None:
        """openssl ocsp accepts the delegated responder's answers (and the CRL is unchanged)."""
        await self.check_kind(OPERATOR, "lab")


class PublishConfigTests(TestCase):
    def test_off_when_unset(self) -> None:
        """Without publish.port nothing listens for CRLs or OCSP."""
        self.assertIsNone(from_string(TEST_CONFIG).publish_port)

    def test_bad_values_name_the_key(self) -> None:
        for line, key in (
            ("publish.port = 70000", "publish.port"),
            ("publish.crl.nextUpdateHours = 0", "publish.crl.nextUpdateHours"),
            ("tokenprocedure.1.crl.url = not a url", "tokenprocedure.1.crl.url"),
            ("tokenprocedure.1.ocsp.url = ftp://host/x", "tokenprocedure.1.ocsp.url"),
            ("tokenprocedure.1.caIssuers.url = http:///x", "tokenprocedure.1.caIssuers.url"),
            ("tokenprocedure.1.ocsp.responder = someone", "tokenprocedure.1.ocsp.responder"),
        ):
            e = self.assertRaises(ConfigError, from_string, TEST_CONFIG + line + "\n")
            self.assertIn(f"{key}: ", str(e))


class StopWhileSigningTests(TestCase):
    async def test_stop_waits_for_the_first_crl(self) -> None:
        """The CRL the publishing listener signs as it starts is let finish
        when the gateway stops at once: its file is written whole and no
        CA call or deadline is left in the reactor (trial fails the test
        on a pending call)."""
        import threading

        from estgw.ca import publish
        from estgw.ca.signing import CRL_FILE

        reading = threading.Event()
        entries_of = publish.entries_of

        def slow(*args: Any) -> Any:
            reading.set()
            threading.Event().wait(1.0)  # a store slow to list its revocations, on a thread
            return entries_of(*args)

        self.patch(publish, "entries_of", slow)
        gateway = await RunningGateway.start(self, TEST_CONFIG + "publish.port = 0\n")
        [published] = {id(g): g for p in gateway.service.published.values() for g in p.generations}.values()
        crl_path = os.path.join(published.ca.home(), CRL_FILE)
        await until(reading.is_set, 10, 0.01)
        self.assertFalse(os.path.exists(crl_path))
        await gateway.stop()
        with open(crl_path, "rb") as f:
            x509.load_pem_x509_crl(f.read())
