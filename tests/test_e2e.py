"""End to end: a real gateway on 127.0.0.1, curl + openssl as the EST client.

The client side never touches estgw code: openssl makes the keys and
CSRs, curl talks EST, openssl reads the PKCS#7 answers and verifies the
issued certificates against what cacerts returned.  Only the set-up
(pre-registering a device, revoking) and the checks of what was
recorded use the store directly.
"""

from __future__ import annotations

import os

from cryptography import x509
from twisted.trial.unittest import TestCase

from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import TEST_CONFIG, HTTPResult, ProcessResult, RunningGateway, _which, run_process

DEVICE, PASSWORD = "dev-1", "s3cret pass"
REALM = "test realm"


class Client:
    """One EST client's working directory, driven by openssl and curl."""

    def __init__(self, testcase: TestCase, gateway: RunningGateway, name: str) -> None:
        self.testcase = testcase
        self.gateway = gateway
        self.directory = os.path.join(gateway.directory, name)
        os.makedirs(self.directory)
        self._count = 0

    def path(self, filename: str) -> str:
        return os.path.join(self.directory, filename)

    def _fresh(self, stem: str) -> str:
        self._count += 1
        return self.path(f"{stem}-{self._count}")

    async def openssl(self, *args: str, check: bool = True) -> ProcessResult:
        result = await run_process([_which("openssl"), *args], path=self.directory)
        if check:
            self.testcase.assertEqual(result.code, 0, (args, result.stderr))
        return result

    async def key_and_csr(self, subject: str = f"/CN={DEVICE}", *addext: str) -> tuple[str, bytes]:
        """A new P-256 key and the base64 DER CSR for it, as a device script makes them."""
        key = self._fresh("key") + ".pem"
        der = self._fresh("csr") + ".der"
        await self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        extra: list[str] = []
        for ext in addext:
            extra += ["-addext", ext]
        await self.openssl("req", "-new", "-key", key, "-subj", subject, *extra, "-outform", "DER", "-out", der)
        b64 = der + ".b64"
        await self.openssl("base64", "-in", der, "-out", b64)
        with open(b64, "rb") as f:
            return key, f.read()

    async def self_signed(self, subject: str = f"/CN={DEVICE}") -> tuple[str, str]:
        key = self._fresh("rogue-key") + ".pem"
        cert = self._fresh("rogue-cert") + ".pem"
        await self.openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", cert, "-subj", subject, "-days", "2",
            "-addext", "extendedKeyUsage=clientAuth",
        )
        return cert, key

    async def certificates(self, body: bytes) -> str:
        """Decode a base64 PKCS#7 certs-only answer to a PEM file (openssl only)."""
        b64 = self._fresh("answer") + ".b64"
        with open(b64, "wb") as f:
            f.write(body)
        await self.openssl("base64", "-d", "-in", b64, "-out", b64 + ".der")
        pem = b64 + ".pem"
        await self.openssl("pkcs7", "-inform", "DER", "-in", b64 + ".der", "-print_certs", "-out", pem)
        return pem

    async def cacerts(self) -> str:
        result = await self.gateway.curl("cacerts")
        self.testcase.assertEqual(result.status, 200, result.text)
        return await self.certificates(result.body)

    async def enroll(self, operation: str, csr: bytes, **options: object) -> HTTPResult:
        return await self.gateway.curl(operation, csr, **options)  # type: ignore[arg-type]

    async def verify(self, cert_pem: str, chain_pem: str) -> None:
        """openssl verify of an issued certificate against the cacerts chain."""
        result = await self.openssl("verify", "-purpose", "sslclient", "-CAfile", chain_pem, cert_pem)
        self.testcase.assertIn(b": OK", result.stdout)


def load_pem(path: str) -> list[x509.Certificate]:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificates(f.read())


class E2ETestCase(TestCase):
    async def setUp(self) -> None:
        self.gateway = await RunningGateway.start(self)
        await self.gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        self.client = Client(self, self.gateway, "client")

    async def count(self) -> int:
        return await self.gateway.store.count_certificates()

    async def enroll_with_password(self) -> tuple[str, str]:
        """Basic-authenticated simpleenroll; returns (cert PEM path, key path)."""
        key, csr = await self.client.key_and_csr()
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        return await self.client.certificates(result.body), key

    def assert_refused(self, result: HTTPResult, status: int, reason: str) -> None:
        self.assertEqual(result.status, status, result.text)
        self.assertEqual(result.headers.get("content-type"), "text/plain; charset=utf-8")
        self.assertIn(reason, result.text)

    def assert_challenge(self, result: HTTPResult) -> None:
        self.assertEqual(result.headers.get("www-authenticate"), f'Basic realm="{REALM}"')


class OperationTests(E2ETestCase):
    async def test_cacerts(self) -> None:
        """openssl reads the cacerts answer: the issuing CA and the root,
        and the root is the CA file the gateway wrote."""
        chain = load_pem(await self.client.cacerts())
        self.assertEqual(len(chain), 2)
        (root,) = load_pem(self.gateway.ca_file)
        self.assertIn(root, chain)
        issuing = next(c for c in chain if c != root)
        self.assertEqual(issuing.issuer, root.subject)

    async def test_csrattrs(self) -> None:
        """openssl asn1parse reads the csrattrs answer as the configured OIDs."""
        result = await self.gateway.curl("csrattrs")
        self.assertEqual(result.status, 200)
        b64 = self.client.path("attrs.b64")
        with open(b64, "wb") as f:
            f.write(result.body)
        parsed = await self.client.openssl("asn1parse", "-inform", "PEM", "-in", b64)
        for name in (b"id-ecPublicKey", b"prime256v1", b"ecdsa-with-SHA256"):
            self.assertIn(name, parsed.stdout)

    async def test_enroll_with_basic(self) -> None:
        """A pre-registered device enrolls with HTTP Basic, with the names
        registered for it; the certificate verifies against the cacerts
        chain and is recorded as sent."""
        await self.gateway.store.remove_device(DEVICE)
        await self.gateway.store.add_device(Device(
            DEVICE, hash_password(PASSWORD),
            subject_values=(("O", "Example"), ("DNS", "dev-1.example"), ("IP", "192.0.2.7")),
        ))
        chain = await self.client.cacerts()
        key, csr = await self.client.key_and_csr(
            f"/CN={DEVICE}/O=Example", "subjectAltName=DNS:dev-1.example,IP:192.0.2.7"
        )
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(result.headers["content-type"], "application/pkcs7-mime; smime-type=certs-only")
        pem = await self.client.certificates(result.body)
        await self.client.verify(pem, chain)
        (cert,) = load_pem(pem)
        self.assertEqual(cert.subject.rfc4514_string(), f"O=Example,CN={DEVICE}")

        issued = await self.gateway.store.get_certificate(cert.serial_number)
        self.assertEqual(issued.requester, f"device:{DEVICE}")
        self.assertEqual(issued.handler, "2")
        self.assertEqual(issued.sans, ("DNS:dev-1.example", "IP:192.0.2.7"))
        self.assertEqual(issued.subject, cert.subject.rfc4514_string())
        self.assertEqual(issued.certificate, cert)
        self.assertEqual(await self.count(), 1)

    async def test_enroll_with_client_certificate(self) -> None:
        """A device holding a certificate of this CA enrolls with it, no password."""
        chain = await self.client.cacerts()
        client_pem, client_key = await self.enroll_with_password()
        (client_cert,) = load_pem(client_pem)
        key, csr = await self.client.key_and_csr()
        result = await self.client.enroll("simpleenroll", csr, cert=client_pem, key=client_key)
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        await self.client.verify(pem, chain)
        (cert,) = load_pem(pem)
        issued = await self.gateway.store.get_certificate(cert.serial_number)
        self.assertEqual(
            issued.requester, f"cert:CN={DEVICE}#serial={client_cert.serial_number:x}"
        )
        self.assertEqual(await self.count(), 2)

    async def test_reenroll(self) -> None:
        """simplereenroll with the issued certificate as TLS client
        certificate renews it: same subject, new key and serial."""
        chain = await self.client.cacerts()
        old_pem, old_key = await self.enroll_with_password()
        (old,) = load_pem(old_pem)
        key, csr = await self.client.key_and_csr()
        result = await self.client.enroll("simplereenroll", csr, cert=old_pem, key=old_key)
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        await self.client.verify(pem, chain)
        (new,) = load_pem(pem)
        self.assertEqual(new.subject, old.subject)
        self.assertNotEqual(new.serial_number, old.serial_number)
        self.assertNotEqual(new.public_key(), old.public_key())
        issued = await self.gateway.store.get_certificate(new.serial_number)
        self.assertEqual(issued.handler, "3")
        self.assertEqual(issued.sans, ("DNS:dev-1",))
        self.assertEqual(await self.count(), 2)


class RefusalTests(E2ETestCase):
    async def test_unknown_device(self) -> None:
        """Basic credentials of a device nobody registered: 401 + challenge."""
        _key, csr = await self.client.key_and_csr("/CN=stranger")
        result = await self.client.enroll("simpleenroll", csr, user=f"stranger:{PASSWORD}")
        self.assert_refused(result, 401, "unknown device or wrong password")
        self.assert_challenge(result)
        self.assertEqual(await self.count(), 0)

    async def test_wrong_password(self) -> None:
        """A registered device with the wrong password: 401 + challenge."""
        _key, csr = await self.client.key_and_csr()
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:not-it")
        self.assert_refused(result, 401, "unknown device or wrong password")
        self.assert_challenge(result)
        self.assertEqual(await self.count(), 0)

    async def test_no_credentials(self) -> None:
        """Neither a client certificate nor a password: 401 + challenge."""
        _key, csr = await self.client.key_and_csr()
        result = await self.client.enroll("simpleenroll", csr)
        # The challenge to a request without credentials has no body.
        self.assertEqual((result.status, result.body, result.headers.get("content-length")), (401, b"", "0"))
        self.assert_challenge(result)
        self.assertEqual(await self.count(), 0)

    async def test_reenroll_without_certificate(self) -> None:
        """simplereenroll with only a password (or nothing) is 403."""
        _key, csr = await self.client.key_and_csr()
        for options in ({}, {"user": f"{DEVICE}:{PASSWORD}"}):
            result = await self.client.enroll("simplereenroll", csr, **options)
            self.assert_refused(result, 403, "client certificate")
        self.assertEqual(await self.count(), 0)

    async def test_reenroll_other_subject(self) -> None:
        """simplereenroll for a subject other than the client certificate's is 403."""
        cert, key = await self.enroll_with_password()
        _key, csr = await self.client.key_and_csr("/CN=someone-else")
        result = await self.client.enroll("simplereenroll", csr, cert=cert, key=key)
        self.assert_refused(result, 403, "differs from the client certificate subject")
        self.assertEqual(await self.count(), 1)

    async def test_revoked_client_certificate(self) -> None:
        """A revoked certificate can neither renew nor enroll."""
        cert, key = await self.enroll_with_password()
        (issued,) = load_pem(cert)
        await self.gateway.store.revoke_certificate(issued.serial_number, "keyCompromise")
        _key, csr = await self.client.key_and_csr()
        for operation in ("simplereenroll", "simpleenroll"):
            result = await self.client.enroll(operation, csr, cert=cert, key=key)
            self.assert_refused(result, 403, "revoked")
        self.assertEqual(await self.count(), 1)

    async def test_untrusted_client_certificate(self) -> None:
        """A self-signed client certificate is refused (403), for renewal
        and for enrollment, even with a valid password alongside."""
        cert, key = await self.client.self_signed()
        _key, csr = await self.client.key_and_csr()
        for operation, user in (("simplereenroll", None), ("simpleenroll", None),
                                ("simpleenroll", f"{DEVICE}:{PASSWORD}")):
            result = await self.client.enroll(operation, csr, cert=cert, key=key, user=user)
            self.assert_refused(result, 403, "not trusted")
        self.assertEqual(await self.count(), 0)


class TLSTests(E2ETestCase):
    async def s_client(self, *args: str, brief: bool = True) -> ProcessResult:
        return await self.client.openssl(
            "s_client", "-connect", f"127.0.0.1:{self.gateway.port}", *(["-brief"] if brief else []),
            "-CAfile", self.gateway.ca_file, "-verify_return_error", *args, check=False,
        )

    async def test_tls_1_1_refused(self) -> None:
        """A client that offers only TLS 1.1 (allowed on its side) gets a
        protocol-version alert from the gateway."""
        result = await self.s_client("-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
        self.assertNotEqual(result.code, 0)
        self.assertIn(b"alert protocol version", result.stdout + result.stderr)

    async def test_tls_1_2_and_1_3(self) -> None:
        """TLS 1.2 and TLS 1.3 handshakes complete and verify."""
        for flag, name in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
            result = await self.s_client(flag)
            output = result.stdout + result.stderr
            self.assertEqual(result.code, 0, output.decode())
            self.assertIn(b"Protocol version: " + name, output)

    async def test_no_session_to_resume(self) -> None:
        """The gateway hands out neither session ids nor tickets: every
        connection is a full handshake, so the client certificate is
        verified on each one (the trust checks rely on it)."""
        result = await self.s_client("-tls1_2", brief=False)
        output = (result.stdout + result.stderr).decode()
        self.assertEqual(result.code, 0, output)
        self.assertIn("New, TLSv1.2", output)
        self.assertRegex(output, r"Session-ID: *\n")
        self.assertNotIn("TLS session ticket:", output)

    async def test_server_certificate_names(self) -> None:
        """The server certificate names localhost and 127.0.0.1, and a
        client checking another name fails (so the check is real)."""
        for args in (("-verify_hostname", "localhost"), ("-verify_ip", "127.0.0.1")):
            result = await self.s_client(*args)
            self.assertEqual(result.code, 0, (result.stdout + result.stderr).decode())
            self.assertIn(b"Verification: OK", result.stdout + result.stderr)
        result = await self.s_client("-verify_hostname", "other.example")
        self.assertNotEqual(result.code, 0)
        self.assertIn(b"hostname mismatch", result.stdout + result.stderr)


class TrustAnchorTests(TestCase):
    """tls.trustAnchors: client certificates of another CA (a device
    maker's factory CA) are verified too."""

    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.factory = os.path.join(directory, "factory")
        os.makedirs(self.factory)
        self.openssl_dir = directory
        await self.openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Factory CA", "-days", "2",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
        )
        with open(os.path.join(self.factory, "ext.cnf"), "w") as f:
            f.write("extendedKeyUsage = clientAuth\nbasicConstraints = CA:FALSE\n")
        await self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "dev.key")
        await self.openssl("req", "-new", "-key", "dev.key", "-subj", "/CN=factory-dev", "-out", "dev.csr")
        await self.openssl(
            "x509", "-req", "-in", "dev.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-set_serial", "4660",
            "-days", "1", "-extfile", "ext.cnf", "-out", "dev.pem",
        )
        # The label "lab" takes certificates of the factory CA; the root
        # handlers keep the default, this gateway's CA only.
        config = TEST_CONFIG + "tls.trustAnchors = factory/ca.pem\nhandler.6.clientCertificateIssuers = any\n"
        self.gateway = RunningGateway(directory, config)
        await self.gateway.run()
        self.addCleanup(self.gateway.stop)
        self.client = Client(self, self.gateway, "client")

    async def openssl(self, *args: str) -> None:
        result = await run_process([_which("openssl"), *args], path=self.factory)
        self.assertEqual(result.code, 0, result.stderr.decode())

    async def test_factory_certificate_refused_where_not_accepted(self) -> None:
        """By default an enrollment handler takes only this gateway's
        certificates: a trusted factory certificate gets 403 there, and
        nothing is issued."""
        _key, csr = await self.client.key_and_csr("/CN=factory-dev")
        result = await self.client.enroll(
            "simpleenroll", csr,
            cert=os.path.join(self.factory, "dev.pem"), key=os.path.join(self.factory, "dev.key"),
        )
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("issued by this gateway's CA only", result.text)
        self.assertEqual(await self.gateway.store.count_certificates(), 0)

    async def test_factory_certificate_enrolls(self) -> None:
        """A client certificate of a configured factory CA authenticates
        simpleenroll where clientCertificateIssuers = any; the requester
        recorded is that certificate."""
        _key, csr = await self.client.key_and_csr("/CN=factory-dev")
        result = await self.client.enroll(
            "lab/simpleenroll", csr,
            cert=os.path.join(self.factory, "dev.pem"), key=os.path.join(self.factory, "dev.key"),
        )
        self.assertEqual(result.status, 200, result.text)
        (cert,) = load_pem(await self.client.certificates(result.body))
        issued = await self.gateway.store.get_certificate(cert.serial_number)
        self.assertEqual(issued.requester, "cert:CN=factory-dev#serial=1234")
