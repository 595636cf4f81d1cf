"""serverkeygen (RFC 7030 §4.4) over real TLS with curl, read by independent parsers.

curl sends the request; Python's ``email`` package splits the
multipart/mixed answer; openssl reads the private key (``openssl pkey``),
decrypts the CMS EnvelopedData (``openssl cms -decrypt``) and the
certificate (``openssl pkcs7``), and the test checks that key and
certificate belong together.  Refusals show that nothing was issued.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
import re
import sys
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import ExtendedKeyUsageOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_modules import rfc5652, rfc5958
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import cms, keytypes
from estgw import config as config_module
from estgw.auth import Identity
from estgw.ca import IssueRequest, Profile
from estgw.config import ConfigError
from estgw.passwords import hash_password
from estgw.refusal import Refusal
from estgw.serverkeygen import ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, DECRYPT_KEY_IDENTIFIER, multipart_body, recipient
from estgw.store import Device
from estgw.testing import (
    TEST_CONFIG,
    HTTPResult,
    RunningGateway,
    _which,
    cert_pem,
    csr_pem,
    key_pem,
    make_csr,
    name,
    new_key,
    run_process,
    write,
)

KEYGEN_CONFIG = TEST_CONFIG + """\
handler.20.operation = serverkeygen
handler.20.authtype = Basic
handler.20.realm = test realm
handler.20.serverkeygen.allowUnencryptedKey = true
handler.21.operation = serverkeygen
handler.21.label = lab
handler.21.authtype = Basic
handler.21.realm = test realm
handler.21.serverkeygen.keyType = rsa-2048
handler.21.serverkeygen.sharedKeys = shared-keys.txt
handler.22.operation = serverkeygen
handler.22.label = ed
handler.22.serverkeygen.keyType = ed25519
handler.22.serverkeygen.allowUnencryptedKey = true
handler.23.operation = cacerts
handler.23.label = ed
"""
USER = "pump-17:s3cret"
KEK_ID, KEK = b"kek-1", bytes(range(32))  # test data: a shared AES-256 key


def parse_multipart(result: HTTPResult) -> list[tuple[str, dict[str, str], bytes]]:
    """(content type, parameters, decoded body) of each part, by Python's email package."""
    head = f"Content-Type: {result.headers['content-type']}\r\n\r\n".encode("latin-1")
    message = email.message_from_bytes(head + result.body, policy=email.policy.compat32)
    assert message.is_multipart(), result.headers
    parts = []
    for part in message.get_payload():
        params = {k.lower(): v for k, v in part.get_params()[1:]}
        parts.append((part.get_content_type(), params, part.get_payload(decode=True)))
    return parts


class ServerKeygenTests(TestCase):
    """The whole exchange against a real gateway."""

    async def start(self, config: str = KEYGEN_CONFIG) -> RunningGateway:
        self.events: list[dict] = []
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # The shared keys of handler.21, next to the configuration file.
        write(os.path.join(directory, "shared-keys.txt"), f"# id key\n{KEK_ID.hex()} {KEK.hex()}\n".encode())

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "estgw.audit":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        gateway = RunningGateway(directory, config)
        await gateway.run()
        self.addCleanup(gateway.stop)
        await gateway.store.add_device(Device(device_id="pump-17", password_hash=hash_password("s3cret")))
        self.directory = gateway.directory
        return gateway

    async def openssl(self, *args: str, stdin: bytes = b"") -> bytes:
        result = await run_process([_which("openssl"), *args], stdin=stdin)
        self.assertEqual(result.code, 0, (args, result.stderr))
        return result.stdout

    async def certificate_public_key(self, certs_only_der: bytes) -> bytes:
        pem = await self.openssl("pkcs7", "-inform", "DER", "-print_certs", stdin=certs_only_der)
        return await self.openssl("x509", "-pubkey", "-noout", stdin=pem)

    def rsa_client_certificate(self, gateway: RunningGateway, common_name: str = "pump-17", kind: str = "rsa2048") -> tuple[str, str, x509.Certificate]:
        key = new_key(kind)
        cert = gateway.service.state.ca.sign(
            IssueRequest(subject=name(common_name), public_key=key.public_key()),
            Profile(extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,)),
        )
        prefix = os.path.join(self.directory, f"client-{cert.serial_number:x}")
        return write(prefix + ".pem", cert_pem(cert)), write(prefix + ".key", key_pem(key)), cert

    def assert_no_secret_logged(self, *secrets: bytes) -> None:
        text = repr(self.events).encode()
        for secret in secrets:
            self.assertNotIn(base64.b64encode(secret)[:40], text)

    async def test_unencrypted_key_over_tls(self) -> None:
        """A device that logs in with its password gets a new P-256 key as
        application/pkcs8 and its certificate as certs-only: openssl reads
        both, the key's public half is the certificate's, the CSR's own key
        is not the one certified, and exactly one certificate is recorded."""
        gateway = await self.start()
        csr_key = new_key()
        result = await gateway.curl("serverkeygen", csr_pem(make_csr(csr_key, "pump-17")), user=USER)
        self.assertEqual(result.status, 200, result.text)
        self.assertTrue(result.headers["content-type"].startswith("multipart/mixed; boundary="))
        self.assertEqual(result.headers["cache-control"], "no-store")
        (key_type, _, key_der), (cert_type, cert_params, cert_der) = parse_multipart(result)
        self.assertEqual(key_type, "application/pkcs8")
        self.assertEqual((cert_type, cert_params), ("application/pkcs7-mime", {"smime-type": "certs-only"}))
        text = (await self.openssl("pkey", "-inform", "DER", "-text", "-noout", stdin=key_der)).decode()
        self.assertIn("NIST CURVE: P-256", text)
        key_public = await self.openssl("pkey", "-inform", "DER", "-pubout", stdin=key_der)
        self.assertEqual(key_public, await self.certificate_public_key(cert_der))
        csr_public = csr_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        self.assertNotEqual(key_public, csr_public)
        records = await gateway.store.list_certificates()
        self.assertEqual(len(records), 1)
        self.assertEqual(records[0].subject, "CN=pump-17")
        self.assertEqual(records[0].requester, "device:pump-17")
        self.assert_no_secret_logged(key_der)

    async def test_encrypted_to_client_certificate(self) -> None:
        """With AsymmetricDecryptKeyIdentifier naming the TLS client
        certificate's key, the RSA-2048 private key comes as
        smime-type=server-generated-key (RFC 7030 §4.4.2): an EnvelopedData
        that `openssl cms -decrypt` opens with the client's key, holding a
        SignedData that `openssl cms -verify` checks against the gateway's
        root CA, whose eContent (id-ct-KP-aKeyPackage) is an
        AsymmetricKeyPackage of one key; that key matches the certificate."""
        gateway = await self.start()
        cert_path, key_path, cert = self.rsa_client_certificate(gateway)
        ski = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        csr = x509.CertificateSigningRequestBuilder().subject_name(name("pump-17")).add_attribute(
            ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, ski, _tag=_ASN1Type.OctetString
        ).sign(new_key(), hashes.SHA256())
        result = await gateway.curl("lab/serverkeygen", csr_pem(csr), cert=cert_path, key=key_path)
        self.assertEqual(result.status, 200, result.text)
        (key_type, key_params, enveloped), (_, _, cert_der) = parse_multipart(result)
        self.assertEqual((key_type, key_params), ("application/pkcs7-mime", {"smime-type": "server-generated-key"}))
        printed = (await self.openssl("cms", "-cmsout", "-print", "-inform", "DER", stdin=enveloped)).decode()
        self.assertIn("pkcs7-envelopedData", printed)
        self.assertIn("aes-256-cbc", printed)
        self.assertIn("contentType: pkcs7-signedData", printed)
        signed = await self.openssl(
            "cms", "-decrypt", "-inform", "DER", "-binary", "-recip", cert_path, "-inkey", key_path, stdin=enveloped
        )
        # The decrypted content is a SignedData; openssl reads it as a ContentInfo.
        info = rfc5652.ContentInfo()
        info["contentType"] = rfc5652.id_signedData
        info["content"] = signed
        wrapped = der_encoder.encode(info)
        printed = (await self.openssl("cms", "-cmsout", "-print", "-inform", "DER", stdin=wrapped)).decode()
        self.assertIn("eContentType: undefined (2.16.840.1.101.2.1.2.78.5)", printed)
        package = await self.openssl(
            "cms", "-verify", "-inform", "DER", "-binary", "-purpose", "any", "-CAfile", gateway.ca_file, stdin=wrapped
        )
        keys, rest = der_decoder.decode(package, asn1Spec=rfc5958.AsymmetricKeyPackage())
        self.assertEqual((len(keys), rest), (1, b""))
        pkcs8 = der_encoder.encode(keys[0])
        text = (await self.openssl("pkey", "-inform", "DER", "-text", "-noout", stdin=pkcs8)).decode()
        self.assertIn("Private-Key: (2048 bit", text)
        key_public = await self.openssl("pkey", "-inform", "DER", "-pubout", stdin=pkcs8)
        self.assertEqual(key_public, await self.certificate_public_key(cert_der))
        self.assertEqual(await gateway.store.count_certificates(), 1)
        self.assert_no_secret_logged(pkcs8)

    async def test_encrypted_to_shared_key(self) -> None:
        """With DecryptKeyIdentifier naming a shared key of the handler, a
        device that logged in with its password gets the key in an
        EnvelopedData whose KEKRecipientInfo (AES-256 key wrap) `openssl cms
        -decrypt -secretkey -secretkeyid` opens; inside, the signed key
        package of the RSA key its certificate certifies."""
        gateway = await self.start()
        csr = x509.CertificateSigningRequestBuilder().subject_name(name("pump-17")).add_attribute(
            DECRYPT_KEY_IDENTIFIER, KEK_ID, _tag=_ASN1Type.OctetString
        ).sign(new_key(), hashes.SHA256())
        result = await gateway.curl("lab/serverkeygen", csr_pem(csr), user=USER)
        self.assertEqual(result.status, 200, result.text)
        (key_type, key_params, enveloped), (_, _, cert_der) = parse_multipart(result)
        self.assertEqual(key_params, {"smime-type": "server-generated-key"})
        printed = (await self.openssl("cms", "-cmsout", "-print", "-inform", "DER", stdin=enveloped)).decode()
        self.assertIn("d.kekri", printed)
        self.assertIn("id-aes256-wrap", printed)
        signed = await self.openssl(
            "cms", "-decrypt", "-inform", "DER", "-binary", "-secretkey", KEK.hex(), "-secretkeyid", KEK_ID.hex(),
            stdin=enveloped,
        )
        info = rfc5652.ContentInfo()
        info["contentType"] = rfc5652.id_signedData
        info["content"] = signed
        package = await self.openssl(
            "cms", "-verify", "-inform", "DER", "-binary", "-purpose", "any", "-CAfile", gateway.ca_file,
            stdin=der_encoder.encode(info),
        )
        keys, _ = der_decoder.decode(package, asn1Spec=rfc5958.AsymmetricKeyPackage())
        key_public = await self.openssl("pkey", "-inform", "DER", "-pubout", stdin=der_encoder.encode(keys[0]))
        self.assertEqual(key_public, await self.certificate_public_key(cert_der))
        wrong = await run_process(
            [_which("openssl"), "cms", "-decrypt", "-inform", "DER", "-binary",
             "-secretkey", bytes(32).hex(), "-secretkeyid", KEK_ID.hex()],
            stdin=enveloped,
        )
        self.assertNotEqual(wrong.code, 0)

    async def test_tampered_signature_fails_verification(self) -> None:
        """The SignedData signature covers the key package: openssl refuses
        it once a byte of the package changes (the check above can fail)."""
        gateway = await self.start()
        pkcs8 = key_pem(new_key())
        der = serialization.load_pem_private_key(pkcs8, None).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        signed = bytearray(cms.signed_key_package(
            der, gateway.service.state.server_certificate, gateway.service.state.server_key,
            (gateway.service.state.ca.issuing,),
        ))
        position = signed.find(der[-20:])
        self.assertGreater(position, 0)
        signed[position] ^= 0x01
        info = rfc5652.ContentInfo()
        info["contentType"] = rfc5652.id_signedData
        info["content"] = bytes(signed)
        result = await run_process(
            [_which("openssl"), "cms", "-verify", "-inform", "DER", "-binary", "-purpose", "any", "-CAfile", gateway.ca_file],
            stdin=der_encoder.encode(info),
        )
        self.assertNotEqual(result.code, 0)
        self.assertIn(b"verification failure", result.stderr.lower())

    async def test_csr_key_and_signature_ignored(self) -> None:
        """RFC 7030 §4.4.1: the server ignores the CSR's key and signature,
        so a CSR with a 1024-bit RSA key and a broken signature still gets
        an Ed25519 key (this handler's keyType) and its certificate."""
        gateway = await self.start()
        cert_path, key_path, _ = self.rsa_client_certificate(gateway)
        der = bytearray(make_csr(new_key("rsa1024"), "pump-17").public_bytes(serialization.Encoding.DER))
        der[-5] ^= 0x01
        result = await gateway.curl("ed/serverkeygen", bytes(der), cert=cert_path, key=key_path)
        self.assertEqual(result.status, 200, result.text)
        (_, _, key_der), (_, _, cert_der) = parse_multipart(result)
        self.assertIsInstance(serialization.load_der_private_key(key_der, None), ed25519.Ed25519PrivateKey)
        text = (await self.openssl("pkey", "-inform", "DER", "-text", "-noout", stdin=key_der)).decode()
        self.assertIn("ED25519", text)

    async def assert_refused(self, gateway: RunningGateway, result: HTTPResult, status: int, code: str, reason: str) -> None:
        self.assertEqual(result.status, status, result.text)
        refused = [e for e in self.events if e.get("event") == "refused"]
        self.assertEqual([e["code"] for e in refused][-1:], [code])
        self.assertIn(reason, refused[-1]["reason"])
        if code == "authentication-required":
            # A challenge to a request without credentials has no body.
            self.assertEqual((result.body, result.headers.get("content-length")), (b"", "0"))
        else:
            self.assertIn(reason, result.text)
            self.assertTrue(result.headers["content-type"].startswith("text/plain"))
        self.assertEqual([e for e in self.events if e.get("event") == "issued"], [])
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_refusals(self) -> None:
        """The simpleenroll checks hold on serverkeygen, and so do its own:
        no credentials, a wrong password, another device's name, a
        challengePassword; encryption required but not asked for; a key
        identifier that names no known key, an EC client key, a symmetric
        key identifier.  Each is refused and nothing is issued."""
        gateway = await self.start()
        rsa_cert, rsa_key, rsa_client = self.rsa_client_certificate(gateway)
        ec_cert, ec_key, ec_client = self.rsa_client_certificate(gateway, kind="ec")

        def asking(identifier_oid: x509.ObjectIdentifier, value: bytes) -> bytes:
            return csr_pem(
                x509.CertificateSigningRequestBuilder().subject_name(name("pump-17"))
                .add_attribute(identifier_oid, value, _tag=_ASN1Type.OctetString).sign(new_key(), hashes.SHA256())
            )

        def ski(cert: x509.Certificate) -> bytes:
            return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest

        plain = csr_pem(make_csr(new_key(), "pump-17"))
        cases: list[tuple[str, dict[str, Any], int, str, str]] = [
            ("serverkeygen", {"data": plain}, 401, "authentication-required", "pre-registered device"),
            ("serverkeygen", {"data": plain, "user": "pump-17:wrong"}, 401, "bad-credentials", "unknown device or wrong password"),
            ("serverkeygen", {"data": csr_pem(make_csr(new_key(), "pump-18")), "user": USER}, 403, "subject-not-registered", "registered device id"),
            ("serverkeygen", {"data": csr_pem(make_csr(new_key(), "pump-17", attributes=[(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"x")])), "user": USER},
             403, "challenge-password-not-supported", "challengePassword"),
            ("lab/serverkeygen", {"data": plain, "user": USER}, 400, "serverkeygen-encryption-required", "only encrypted"),
            ("lab/serverkeygen", {"data": asking(ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, b"\x01" * 20), "cert": rsa_cert, "key": rsa_key},
             400, "decrypt-key-unknown", "subjectKeyIdentifier of the TLS client certificate"),
            ("lab/serverkeygen", {"data": asking(ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, ski(rsa_client)), "user": USER},
             400, "decrypt-key-unknown", "names no key this gateway knows"),
            ("lab/serverkeygen", {"data": asking(ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, ski(ec_client)), "cert": ec_cert, "key": ec_key},
             400, "decrypt-key-unsupported", "RSA key only, not ec-p256"),
            ("serverkeygen", {"data": asking(DECRYPT_KEY_IDENTIFIER, b"kek-1"), "user": USER},
             400, "decrypt-key-unknown", "names no shared key of this endpoint"),
            ("lab/serverkeygen", {"data": asking(DECRYPT_KEY_IDENTIFIER, b"kek-9"), "user": USER},
             400, "decrypt-key-unknown", "names no shared key of this endpoint"),
            ("lab/serverkeygen", {"data": csr_pem(
                x509.CertificateSigningRequestBuilder().subject_name(name("pump-17"))
                .add_attribute(DECRYPT_KEY_IDENTIFIER, b"kek-1", _tag=_ASN1Type.OctetString)
                .add_attribute(ASYMMETRIC_DECRYPT_KEY_IDENTIFIER, ski(rsa_client), _tag=_ASN1Type.OctetString)
                .sign(new_key(), hashes.SHA256())), "cert": rsa_cert, "key": rsa_key},
             400, "decrypt-key-ambiguous", "name one"),
        ]
        for path, request, status, code, reason in cases:
            result = await gateway.curl(path, **request)
            await self.assert_refused(gateway, result, status, code, reason)

    async def test_single_use_never_gets_an_earlier_certificate(self) -> None:
        """A single-use device that enrolled with key K and then asks
        serverkeygen with a CSR of K is refused as consumed: it never gets
        K's certificate back next to a newly made private key."""
        gateway = await self.start()
        await gateway.store.add_device(
            Device(device_id="pump-18", password_hash=hash_password("s3cret"), single_use=True)
        )
        key = new_key()
        first = await gateway.curl("simpleenroll", csr_pem(make_csr(key, "pump-18")), user="pump-18:s3cret")
        self.assertEqual(first.status, 200, first.text)
        del self.events[:]
        result = await gateway.curl("serverkeygen", csr_pem(make_csr(key, "pump-18")), user="pump-18:s3cret")
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("already been used", result.text)
        self.assertEqual([e["code"] for e in self.events if e.get("event") == "refused"], ["single-use-consumed"])
        self.assertEqual(await gateway.store.count_certificates(), 1)

    async def test_subject_match_with_client_certificate(self) -> None:
        """As on simpleenroll, a client certificate may only ask for its
        own names (format est-simpleenroll-subjectmatch by default)."""
        gateway = await self.start()
        cert_path, key_path, _ = self.rsa_client_certificate(gateway)
        result = await gateway.curl("ed/serverkeygen", csr_pem(make_csr(new_key(), "pump-99")), cert=cert_path, key=key_path)
        await self.assert_refused(gateway, result, 403, "subject-mismatch", "differs from the client certificate subject")

    async def test_not_configured(self) -> None:
        """Under a label without a serverkeygen handler it is a 404."""
        gateway = await self.start(TEST_CONFIG)
        result = await gateway.curl("serverkeygen", csr_pem(make_csr(new_key(), "pump-17")), user=USER)
        self.assertEqual(result.status, 404, result.text)
        self.assertEqual(await gateway.store.count_certificates(), 0)


class ConfigTests(SynchronousTestCase):
    def config(self, extra: str) -> config_module.Config:
        return config_module.from_string(TEST_CONFIG + extra)

    def test_key_type_default_and_values(self) -> None:
        """keyType defaults to ec-p256, takes every listed type in any
        case, and names the allowed values when wrong."""
        handler = self.config("handler.20.operation = serverkeygen\n").handler("", "serverkeygen")
        self.assertEqual(handler.serverkeygen_key_type, "ec-p256")
        self.assertFalse(handler.serverkeygen_allow_unencrypted_key)
        self.assertEqual((handler.filter, handler.format, handler.token_procedure), ("device", "est-simpleenroll-subjectmatch", "Test Procedure"))
        for key_type in keytypes.KEY_TYPES:
            handler = self.config(f"handler.20.operation = serverkeygen\nhandler.20.serverkeygen.keyType = {key_type.upper()}\n").handler("", "serverkeygen")
            self.assertEqual(handler.serverkeygen_key_type, key_type)
        error = self.assertRaises(ConfigError, self.config, "handler.20.operation = serverkeygen\nhandler.20.serverkeygen.keyType = rsa-1024\n")
        self.assertEqual(error.key, "handler.20.serverkeygen.keyType")
        self.assertIn("ec-p256, ec-p384, rsa-2048", error.reason)

    def test_shared_keys_file(self) -> None:
        """sharedKeys: pairs of hex id and AES key; errors name the key and
        the line, never the key material."""
        directory = self.mktemp()
        os.makedirs(directory)

        def load(text: str | None) -> config_module.Config:
            if text is not None:
                write(os.path.join(directory, "keys.txt"), text.encode())
            return config_module.from_string(
                TEST_CONFIG + "handler.20.operation = serverkeygen\nhandler.20.serverkeygen.sharedKeys = keys.txt\n",
                base_dir=directory,
            )

        handler = load("# comment\n01 " + "11" * 16 + "\n\nabcd " + "22" * 32 + "  # trailing\n").handler("", "serverkeygen")
        self.assertEqual(dict(handler.serverkeygen_shared_keys), {b"\x01": b"\x11" * 16, b"\xab\xcd": b"\x22" * 32})
        self.assertNotIn("1111", repr(handler))
        for text, fragment in [
            ("01 " + "11" * 15 + "\n", "line 1: the key id is empty or the key is not 16, 24 or 32 bytes"),
            ("01\n", "line 1: expected KEY-ID KEY"),
            ("zz " + "11" * 16 + "\n", "line 1: expected KEY-ID KEY"),
            ("01 " + "11" * 16 + "\n01 " + "22" * 16 + "\n", "line 2: key id 01 is listed twice"),
            ("# nothing\n", "holds no keys"),
        ]:
            error = self.assertRaises(ConfigError, load, text)
            self.assertEqual(error.key, "handler.20.serverkeygen.sharedKeys")
            self.assertIn(fragment, error.reason)
            self.assertNotIn("2222", error.reason)
        os.remove(os.path.join(directory, "keys.txt"))
        error = self.assertRaises(ConfigError, load, None)
        self.assertIn("cannot read", error.reason)

    def test_keys_only_on_serverkeygen(self) -> None:
        """serverkeygen.* on another operation is an error naming the key."""
        for key in ("serverkeygen.keyType = ec-p384", "serverkeygen.allowUnencryptedKey = true", "serverkeygen.sharedKeys = k"):
            error = self.assertRaises(ConfigError, self.config, f"handler.2.{key}\n")
            self.assertEqual(error.key, "handler.2." + key.split(" ")[0])

    def test_reenroll_format_refused(self) -> None:
        """serverkeygen takes the enrollment formats, not est-simplereenroll."""
        error = self.assertRaises(
            ConfigError, self.config, "handler.20.operation = serverkeygen\nhandler.20.format = est-simplereenroll\n"
        )
        self.assertEqual(error.key, "handler.20.format")


class MultipartTests(SynchronousTestCase):
    def test_layout(self) -> None:
        """Each part has its type and base64 transfer encoding; lines end in
        CRLF; the closing delimiter ends the body."""
        body, content_type = multipart_body([("application/pkcs8", b"\x30\x00"), ("text/x", b"x" * 100)], "b1")
        self.assertEqual(content_type, "multipart/mixed; boundary=b1")
        self.assertTrue(body.startswith(b"--b1\r\nContent-Type: application/pkcs8\r\nContent-Transfer-Encoding: base64\r\n\r\nMAA=\r\n--b1\r\n"))
        self.assertTrue(body.endswith(b"\r\n--b1--\r\n"))
        self.assertNotIn(b"\n", body.replace(b"\r\n", b""))


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(section: str) -> list[str]:
    """The literal blocks (after '::') of one README section, dedented."""
    lines = open(os.path.join(REPO, "README.rst"), encoding="utf-8").read().split("\n")
    start = lines.index(section)
    end = next(i for i in range(start + 2, len(lines)) if lines[i].startswith("===") and i > start + 1) - 1
    blocks: list[str] = []
    i = start
    while i < end:
        if lines[i].rstrip().endswith("::") and not lines[i].lstrip().startswith(".."):
            i += 1
            block: list[str] = []
            while i < end and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            blocks.append("\n".join(block).strip() + "\n")
        else:
            i += 1
    return blocks


def shipped_config(extra: str = "") -> str:
    """etc/est.properties as shipped, on a free port of 127.0.0.1."""
    text = open(os.path.join(REPO, "etc", "est.properties"), encoding="utf-8").read()
    text = text.replace("\nserver.port = 8443\n", "\nserver.port = 0\n")
    text = re.sub(r"(?m)^server\.interface *=.*$", "server.interface = 127.0.0.1", text)
    assert "server.port = 0" in text and "server.interface = 127.0.0.1" in text
    return text + extra


class ReadmeExampleTests(TestCase):
    """The README's serverkeygen and csrattrs examples, run as written
    with bash against a gateway serving the shipped configuration."""

    async def run_blocks(self, gateway: RunningGateway, blocks: list[str]) -> str:
        workdir = os.path.join(gateway.directory, "client")
        os.makedirs(workdir)
        env = dict(os.environ, CA=gateway.ca_file, EST=f"https://127.0.0.1:{gateway.port}/.well-known/est")
        script = "set -euo pipefail\n" + "".join(blocks).replace(".venv/bin/python", sys.executable)
        result = await run_process([_which("bash"), "-c", script], env=env, path=workdir)
        self.assertEqual(result.code, 0, (result.stdout, result.stderr))
        return result.stdout.decode()

    async def test_serverkeygen_section(self) -> None:
        """Both examples: the plain key matches its certificate, and the
        encrypted one decrypts with openssl cms to the certified key."""
        gateway = await RunningGateway.start(self, shipped_config())
        await gateway.store.add_device(Device(device_id="pump-17", password_hash=hash_password("s3cret")))
        blocks = readme_blocks("Server-side key generation (serverkeygen)")
        self.assertEqual(len(blocks), 2)
        output = await self.run_blocks(gateway, blocks)
        self.assertIn("keygen.key.der application/pkcs8", output)
        self.assertIn("keygen.p7.der application/pkcs7-mime certs-only", output)
        self.assertIn("key and certificate match", output)
        self.assertIn("wrap.p7m application/pkcs7-mime server-generated-key", output)
        workdir = os.path.join(gateway.directory, "client")
        new_key = serialization.load_pem_private_key(open(os.path.join(workdir, "new.key"), "rb").read(), None)
        spki = new_key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        certified = [
            x509.load_der_x509_certificate(r.der).public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for r in await gateway.store.list_certificates()
        ]
        self.assertIn(spki, certified)
        self.assertEqual(await gateway.store.count_certificates(), 3)

    async def test_csrattrs_section(self) -> None:
        """The template line added to the shipped configuration is served:
        openssl asn1parse shows the template OID and its fields."""
        blocks = readme_blocks("CSR attributes and RFC 9908 templates")
        self.assertEqual(len(blocks), 2)
        setting = blocks[0].replace("\\\n", "")
        self.assertTrue(setting.startswith("handler.8.csrattrs.template = "))
        gateway = await RunningGateway.start(self, shipped_config(setting))
        output = await self.run_blocks(gateway, blocks[1:])
        self.assertIn(":1.2.840.113549.1.9.16.2.61", output)
        self.assertIn(":ACME", output)
        self.assertIn(":prime256v1", output)
        self.assertIn(":X509v3 Subject Alternative Name", output)


class RecipientTests(SynchronousTestCase):
    """serverkeygen.recipient, the one place that decides how the key travels."""

    def setUp(self) -> None:
        base = config_module.from_string(
            TEST_CONFIG + "handler.20.operation = serverkeygen\nhandler.20.serverkeygen.allowUnencryptedKey = true\n"
            "handler.21.operation = serverkeygen\nhandler.21.label = lab\n"
        )
        self.plain_ok = base.handler("", "serverkeygen")
        self.encrypted_only = base.handler("lab", "serverkeygen")

    def test_unencrypted_only_over_tls(self) -> None:
        """Plain PKCS#8 is allowed over TLS only, and only where the handler says so."""
        csr = make_csr(new_key(), "pump-17")
        device = Identity(kind="device", device_id="pump-17")
        self.assertIsNone(recipient(self.plain_ok, device, csr, secure=True))
        refusal = self.assertRaises(Refusal, recipient, self.plain_ok, device, csr, secure=False)
        self.assertEqual((refusal.status, refusal.code), (403, "serverkeygen-needs-tls"))
        refusal = self.assertRaises(Refusal, recipient, self.encrypted_only, device, csr, secure=True)
        self.assertEqual((refusal.status, refusal.code), (400, "serverkeygen-encryption-required"))
