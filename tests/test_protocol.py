"""Tests for estgw.protocol: the EST wire format."""

from __future__ import annotations

import base64
import datetime
import random
import re
import shutil
import subprocess
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import (
    AttributeOID,
    ExtensionOID,
    NameOID,
    PublicKeyAlgorithmOID,
    SignatureAlgorithmOID,
)
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from estgw.protocol import (
    CERTS_ONLY,
    CSR_ATTRIBUTE_NAMES,
    CSRATTRS,
    PKCS7_MIME,
    PKCS10,
    CsrAttr,
    content_type_matches,
    decode_base64_body,
    decode_certs_only,
    decode_csrattrs,
    encode_certs_only,
    encode_csrattrs,
    parse_csr,
    parse_csrattrs_setting,
)
from estgw.refusal import Refusal

# The CsrAttrs example of RFC 7030 §4.5.2 (a real server's answer).  Its
# extensionRequest holding an OID is what RFC 9908 §3.2 rules out: old
# servers' answers still decode, this gateway never writes one.
RFC7030_CSRATTRS = (
    b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ"
    b"BgcrBgEBAQEWBggqhkjOPQQDAw=="
)
RFC7030_ATTRS = (
    CsrAttr("1.2.840.113549.1.9.7"),
    CsrAttr("1.2.840.10045.2.1", ("1.3.132.0.34",)),
    CsrAttr("1.2.840.113549.1.9.14", ("1.3.6.1.1.1.1.22",)),
    CsrAttr("1.2.840.10045.4.3.3"),
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_csr(cn: str = "device-1") -> x509.CertificateSigningRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(cn))
        .sign(key, hashes.SHA256())
    )


def make_chain() -> list[x509.Certificate]:
    """A leaf issued by a self-signed CA: [leaf, ca]."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    leaf_key = ec.generate_private_key(ec.SECP256R1())

    def build(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, ca: bool
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
            .sign(ca_key, hashes.SHA256())
        )

    return [
        build("Test Leaf", leaf_key, "Test Root CA", False),
        build("Test Root CA", ca_key, "Test Root CA", True),
    ]


def tlv(tag: int, content: bytes) -> bytes:
    """A short-form DER tag-length-value."""
    assert len(content) < 128
    return bytes([tag, len(content)]) + content


def der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(Encoding.DER)


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise SkipTest("openssl is not installed")
    return path


class RefusalAssertions(SynchronousTestCase):
    def assertRefused(
        self, status: int, code: str, f: Callable[..., object], *args: object
    ) -> Refusal:
        refusal: Refusal = self.assertRaises(Refusal, f, *args)
        self.assertEqual((refusal.status, refusal.code), (status, code))
        return refusal


class DecodeBase64BodyTests(RefusalAssertions):
    payload = bytes(range(256)) * 2

    def test_plain(self) -> None:
        """Base64 on one line with padding decodes."""
        self.assertEqual(
            decode_base64_body(base64.b64encode(self.payload)), self.payload
        )

    def test_crlf_lines(self) -> None:
        """64-column lines ending in CRLF (and a final CRLF) decode
        (RFC 8951 §3.2)."""
        text = base64.b64encode(self.payload)
        body = b"\r\n".join(text[i : i + 64] for i in range(0, len(text), 64))
        self.assertEqual(decode_base64_body(body + b"\r\n"), self.payload)

    def test_spaces_and_tabs_anywhere(self) -> None:
        """Spaces, tabs, CR and LF anywhere, even inside a quantum and
        before the padding, are ignored."""
        text = base64.b64encode(b"hello")  # aGVsbG8=
        body = b" \taG\r\nV s\tbG\n8 = \n"
        self.assertEqual(text, b"aGVsbG8=")
        self.assertEqual(decode_base64_body(body), b"hello")

    def test_missing_padding(self) -> None:
        """One or two missing '=' are tolerated."""
        self.assertEqual(decode_base64_body(b"aGVsbG8"), b"hello")
        self.assertEqual(decode_base64_body(b"aGVsbA"), b"hell")
        self.assertEqual(decode_base64_body(b"aGVsbA="), b"hell")

    def test_junk(self) -> None:
        """Characters outside the base64 alphabet (including the URL-safe
        alphabet and non-ASCII bytes) are refused as bad-base64."""
        for body in [
            b"!!!!",
            b"aGVs*bG8=",
            b"aGVs-_G8",
            b"aGVsbG8=\x00",
            "aGVsbG8=é".encode(),
            b"<html>",
        ]:
            refusal = self.assertRefused(400, "bad-base64", decode_base64_body, body)
            self.assertEqual(refusal.reason, "request body is not valid base64")

    def test_misplaced_padding(self) -> None:
        """Padding inside the data or more than two '=' is refused."""
        for body in [b"aGVs=bG8=", b"aGVsbA===", b"aGVsbA==aGVsbA==", b"=="]:
            self.assertRefused(400, "bad-base64", decode_base64_body, body)

    def test_impossible_length(self) -> None:
        """A length of 1 mod 4 cannot be base64 and is refused."""
        self.assertRefused(400, "bad-base64", decode_base64_body, b"aGVsb")

    def test_empty(self) -> None:
        """An empty or whitespace-only body is refused as empty-body."""
        for body in [b"", b"\r\n", b" \t "]:
            self.assertRefused(400, "empty-body", decode_base64_body, body)


class ContentTypeMatchesTests(SynchronousTestCase):
    def test_case_and_parameters_ignored(self) -> None:
        """Media types compare case-insensitively, ignoring parameters and
        surrounding spaces, on either side."""
        self.assertTrue(content_type_matches("application/pkcs10", PKCS10))
        self.assertTrue(
            content_type_matches(" Application/PKCS10 ; charset=utf-8", PKCS10)
        )
        self.assertTrue(content_type_matches(PKCS7_MIME, CERTS_ONLY))
        self.assertTrue(content_type_matches("application/CSRATTRS", CSRATTRS))

    def test_mismatch(self) -> None:
        """A missing header or a different media type does not match."""
        self.assertFalse(content_type_matches(None, PKCS10))
        self.assertFalse(content_type_matches("", PKCS10))
        self.assertFalse(content_type_matches("application/pkcs10x", PKCS10))
        self.assertFalse(
            content_type_matches("text/plain; x=application/pkcs10", PKCS10)
        )

    def test_response_types(self) -> None:
        """The response media types are exactly the strings of RFC 7030
        that clients compare literally."""
        self.assertEqual(CERTS_ONLY, "application/pkcs7-mime; smime-type=certs-only")
        self.assertEqual(PKCS7_MIME, "application/pkcs7-mime")
        self.assertEqual(CSRATTRS, "application/csrattrs")
        self.assertEqual(PKCS10, "application/pkcs10")


class ParseCsrTests(RefusalAssertions):
    def setUp(self) -> None:
        self.csr = make_csr()

    def test_base64(self) -> None:
        """The standard body, base64 DER with line breaks, parses."""
        body = base64.encodebytes(der(self.csr))
        self.assertEqual(der(parse_csr(body, PKCS10)), der(self.csr))

    def test_missing_content_type(self) -> None:
        """A missing or empty Content-Type is accepted (sloppy clients)."""
        body = base64.b64encode(der(self.csr))
        for content_type in [None, "", "  "]:
            self.assertEqual(der(parse_csr(body, content_type)), der(self.csr))

    def test_content_type_case_and_parameters(self) -> None:
        """application/pkcs10 in any case and with parameters is accepted."""
        body = base64.b64encode(der(self.csr))
        csr = parse_csr(body, "Application/PKCS10; charset=us-ascii")
        self.assertEqual(der(csr), der(self.csr))

    def test_legacy_x_pkcs10(self) -> None:
        """The pre-RFC 5967 name application/x-pkcs10 is accepted too."""
        body = base64.b64encode(der(self.csr))
        self.assertEqual(der(parse_csr(body, "application/x-pkcs10")), der(self.csr))

    def test_wrong_content_type(self) -> None:
        """Any other media type, including curl's default
        application/x-www-form-urlencoded, is a 415 naming what was sent."""
        body = base64.b64encode(der(self.csr))
        for content_type in [
            "application/x-www-form-urlencoded",
            "application/pkcs7-mime",
            "text/plain; charset=utf-8",
        ]:
            refusal = self.assertRefused(
                415, "unsupported-media-type", parse_csr, body, content_type
            )
            expected = content_type.split(";")[0]
            self.assertEqual(
                refusal.reason, f"expected application/pkcs10, got {expected}"
            )

    def test_wrong_content_type_reason_is_safe(self) -> None:
        """A hostile Content-Type is echoed as one short printable line."""
        refusal = self.assertRefused(
            415, "unsupported-media-type", parse_csr, b"x", "a/\r\nb" + "c" * 500
        )
        self.assertNotIn("\n", refusal.reason)
        self.assertNotIn("\r", refusal.reason)
        self.assertLess(len(refusal.reason), 150)

    def test_content_type_checked_first(self) -> None:
        """A wrong media type is a 415 even when the body is also bad."""
        self.assertRefused(415, "unsupported-media-type", parse_csr, b"", "text/html")

    def test_pem(self) -> None:
        """A PEM-armoured CSR ("CERTIFICATE REQUEST") parses, with LF or
        CRLF line endings."""
        pem = self.csr.public_bytes(Encoding.PEM)
        for body in [pem, pem.replace(b"\n", b"\r\n")]:
            self.assertEqual(der(parse_csr(body, PKCS10)), der(self.csr))

    def test_pem_new_certificate_request(self) -> None:
        """The older "NEW CERTIFICATE REQUEST" armour parses too."""
        pem = self.csr.public_bytes(Encoding.PEM).replace(
            b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST"
        )
        self.assertEqual(der(parse_csr(pem, None)), der(self.csr))

    def test_pem_with_leading_text(self) -> None:
        """Text before the PEM block (`openssl req -text` output) is
        ignored."""
        body = b"Certificate Request:\n    Data: ...\n" + self.csr.public_bytes(
            Encoding.PEM
        )
        self.assertEqual(der(parse_csr(body, PKCS10)), der(self.csr))

    def test_pem_of_something_else(self) -> None:
        """A PEM block that is not a certificate request is bad-csr."""
        cert = make_chain()[0].public_bytes(Encoding.PEM)
        self.assertRefused(400, "bad-csr", parse_csr, cert, PKCS10)

    def test_pem_with_bad_base64(self) -> None:
        """A CSR armour around junk is refused, not raised."""
        body = (
            b"-----BEGIN CERTIFICATE REQUEST-----\n!!\n"
            b"-----END CERTIFICATE REQUEST-----\n"
        )
        self.assertRefused(400, "bad-base64", parse_csr, body, PKCS10)

    def test_der(self) -> None:
        """Raw DER is accepted as a courtesy."""
        self.assertEqual(der(parse_csr(der(self.csr), PKCS10)), der(self.csr))

    def test_der_looking_junk(self) -> None:
        """Binary junk starting with 0x30 is bad-csr (not bad-base64)."""
        self.assertRefused(400, "bad-csr", parse_csr, b"\x30\x82\x01\x00\xff", PKCS10)
        self.assertRefused(400, "bad-csr", parse_csr, der(self.csr)[:-1], PKCS10)

    def test_base64_not_a_csr(self) -> None:
        """Valid base64 of something else (a certificate, text) is bad-csr
        with the documented reason."""
        cert = make_chain()[0].public_bytes(Encoding.DER)
        for payload in [cert, b"hello world"]:
            refusal = self.assertRefused(
                400, "bad-csr", parse_csr, base64.b64encode(payload), PKCS10
            )
            self.assertEqual(
                refusal.reason,
                "request body is not a PKCS#10 certification request",
            )

    def test_bad_base64(self) -> None:
        """A body that is neither PEM, DER nor base64 is bad-base64."""
        self.assertRefused(400, "bad-base64", parse_csr, b"csr=MIIB...", PKCS10)

    def test_empty(self) -> None:
        """An empty body is empty-body."""
        for body in [b"", b"\r\n"]:
            self.assertRefused(400, "empty-body", parse_csr, body, PKCS10)

    def test_signature_not_verified(self) -> None:
        """A CSR with a broken signature still parses: verifying it is a
        policy check's job, which must still see it as invalid."""
        data = bytearray(der(self.csr))
        data[-1] ^= 0x01
        csr = parse_csr(base64.b64encode(bytes(data)), PKCS10)
        self.assertFalse(csr.is_signature_valid)

    def test_unsupported_key_algorithm(self) -> None:
        """A CSR whose key algorithm cryptography does not know is refused
        as unsupported-algorithm rather than raising later."""
        ec_oid = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey
        data = der(self.csr)
        self.assertEqual(data.count(ec_oid), 1)
        data = data.replace(ec_oid, bytes.fromhex("06072a8648ce3d0209"))
        self.assertRefused(
            400, "unsupported-algorithm", parse_csr, base64.b64encode(data), PKCS10
        )

    def test_mangled_requests_are_refused(self) -> None:
        """Thousands of corrupted and truncated CSRs (raw and base64) give a
        Refusal or a CSR whose fields can all be read: never another
        exception."""
        rng = random.Random(7030)
        original = der(self.csr)
        for _ in range(3000):
            data = bytearray(original)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(1, len(data))]
            for body in [bytes(data), base64.b64encode(data)]:
                try:
                    csr = parse_csr(body, PKCS10)
                except Refusal as refusal:
                    self.assertIn(
                        refusal.code,
                        # A corrupted subject or SAN is named as such.
                        {"bad-csr", "bad-base64", "unsupported-algorithm", "csr-bad-subject", "csr-bad-san"},
                    )
                else:
                    csr.subject.rfc4514_string()
                    list(csr.extensions)
                    csr.public_key()
                    csr.is_signature_valid


class CertsOnlyTests(RefusalAssertions):
    def setUp(self) -> None:
        self.chain = make_chain()

    def test_round_trip(self) -> None:
        """A 2-certificate chain comes back whole and in order."""
        self.assertEqual(decode_certs_only(encode_certs_only(self.chain)), self.chain)

    def test_single(self) -> None:
        """A single certificate (an enroll response) round-trips."""
        self.assertEqual(
            decode_certs_only(encode_certs_only(self.chain[:1])), self.chain[:1]
        )

    def test_line_format(self) -> None:
        """The body is base64 in lines of at most 64 characters, each ending
        in LF, with no CR."""
        body = encode_certs_only(self.chain)
        self.assertNotIn(b"\r", body)
        self.assertTrue(body.endswith(b"\n"))
        lines = body.split(b"\n")[:-1]
        self.assertGreater(len(lines), 2)
        self.assertTrue(all(len(line) == 64 for line in lines[:-1]))
        self.assertTrue(0 < len(lines[-1]) <= 64)

    def test_openssl_reads_it(self) -> None:
        """`openssl base64 -d` then `openssl pkcs7 -inform DER -print_certs`
        read the body and print both subjects."""
        binary = openssl()
        decoded = subprocess.run(
            [binary, "base64", "-d"],
            input=encode_certs_only(self.chain),
            capture_output=True,
            check=True,
        ).stdout
        printed = subprocess.run(
            [binary, "pkcs7", "-inform", "DER", "-print_certs"],
            input=decoded,
            capture_output=True,
            check=True,
        ).stdout.decode()
        subjects = re.findall(r"^subject=.*CN ?= ?(.+)$", printed, re.MULTILINE)
        self.assertEqual(subjects, ["Test Leaf", "Test Root CA"])

    def test_decode_tolerates_crlf(self) -> None:
        """Decoding accepts CRLF line endings (other servers send them)."""
        body = encode_certs_only(self.chain).replace(b"\n", b"\r\n")
        self.assertEqual(decode_certs_only(body), self.chain)

    def test_decode_junk(self) -> None:
        """Base64 of something that is not PKCS#7 is bad-pkcs7; non-base64
        is bad-base64."""
        self.assertRefused(400, "bad-pkcs7", decode_certs_only, b"aGVsbG8=")
        cert = self.chain[0].public_bytes(Encoding.DER)
        self.assertRefused(400, "bad-pkcs7", decode_certs_only, base64.b64encode(cert))
        self.assertRefused(400, "bad-base64", decode_certs_only, b"%%%")


class ParseCsrattrsSettingTests(SynchronousTestCase):
    def test_example(self) -> None:
        """The documented example parses to bare OIDs and attributes."""
        self.assertEqual(
            parse_csrattrs_setting(
                "challengePassword, ecPublicKey=secp384r1, "
                "extensionRequest=subjectAltName, ecdsa-with-SHA384"
            ),
            (
                CsrAttr("1.2.840.113549.1.9.7"),
                CsrAttr("1.2.840.10045.2.1", ("1.3.132.0.34",)),
                CsrAttr("2.5.29.17"),
                CsrAttr("1.2.840.10045.4.3.3"),
            ),
        )

    def test_oids_names_case_and_lists(self) -> None:
        """Dotted OIDs and names mix freely, names match in any case, and
        '|' separates several values; spaces around tokens are ignored."""
        self.assertEqual(
            parse_csrattrs_setting(
                " 1.2.3.4 ,EXTENSIONREQUEST = macAddress | 2.5.29.15,"
                "2.999.1=commonName|2.5.4.3"
            ),
            (
                CsrAttr("1.2.3.4"),
                CsrAttr("1.3.6.1.1.1.1.22"),
                CsrAttr("2.5.29.15"),
                CsrAttr("2.999.1", ("2.5.4.3", "2.5.4.3")),
            ),
        )

    def test_extension_request_becomes_bare_oids(self) -> None:
        """extensionRequest=X|Y asks for extensions whose values the client
        chooses: RFC 9908 §3.2 lets the attribute hold only one Extensions
        value, so they are bare OIDs; without extensions it is an error, and
        an extension named twice (keyUsage, 2.5.29.15) is a duplicate."""
        self.assertEqual(
            parse_csrattrs_setting("extensionRequest=subjectAltName|keyUsage"),
            (CsrAttr("2.5.29.17"), CsrAttr("2.5.29.15")),
        )
        self.assertSettingError("extensionRequest", "name the extensions")
        self.assertSettingError("extensionRequest=keyUsage|2.5.29.15", "2.5.29.15 is listed twice")
        self.assertSettingError("keyUsage, extensionRequest=keyUsage", "listed twice")

    def test_empty(self) -> None:
        """An empty or blank setting means no attributes."""
        self.assertEqual(parse_csrattrs_setting(""), ())
        self.assertEqual(parse_csrattrs_setting("  "), ())

    def test_names_agree_with_cryptography(self) -> None:
        """The name table carries the same OIDs as cryptography's
        constants, where cryptography has them."""
        known = {
            "challengePassword": AttributeOID.CHALLENGE_PASSWORD,
            "unstructuredName": AttributeOID.UNSTRUCTURED_NAME,
            "ecPublicKey": PublicKeyAlgorithmOID.EC_PUBLIC_KEY,
            "rsaEncryption": PublicKeyAlgorithmOID.RSAES_PKCS1_v1_5,
            "secp256r1": ec.EllipticCurveOID.SECP256R1,
            "secp384r1": ec.EllipticCurveOID.SECP384R1,
            "secp521r1": ec.EllipticCurveOID.SECP521R1,
            "ecdsa-with-SHA256": SignatureAlgorithmOID.ECDSA_WITH_SHA256,
            "ecdsa-with-SHA384": SignatureAlgorithmOID.ECDSA_WITH_SHA384,
            "ecdsa-with-SHA512": SignatureAlgorithmOID.ECDSA_WITH_SHA512,
            "sha256WithRSAEncryption": SignatureAlgorithmOID.RSA_WITH_SHA256,
            "sha384WithRSAEncryption": SignatureAlgorithmOID.RSA_WITH_SHA384,
            "sha512WithRSAEncryption": SignatureAlgorithmOID.RSA_WITH_SHA512,
            "subjectAltName": ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
            "keyUsage": ExtensionOID.KEY_USAGE,
            "extKeyUsage": ExtensionOID.EXTENDED_KEY_USAGE,
            "commonName": NameOID.COMMON_NAME,
            "serialNumber": NameOID.SERIAL_NUMBER,
        }
        for name, oid in known.items():
            self.assertEqual(CSR_ATTRIBUTE_NAMES[name], oid.dotted_string, name)
        # Not in cryptography; from RFC 2985 and RFC 2307.
        self.assertEqual(
            CSR_ATTRIBUTE_NAMES["extensionRequest"], "1.2.840.113549.1.9.14"
        )
        self.assertEqual(
            CSR_ATTRIBUTE_NAMES["unstructuredAddress"], "1.2.840.113549.1.9.8"
        )
        self.assertEqual(CSR_ATTRIBUTE_NAMES["macAddress"], "1.3.6.1.1.1.1.22")

    def assertSettingError(self, text: str, *fragments: str) -> None:
        error = self.assertRaises(ValueError, parse_csrattrs_setting, text)
        for fragment in fragments:
            self.assertIn(fragment, str(error))

    def test_unknown_name(self) -> None:
        """An unknown attribute name is an error naming the item."""
        self.assertSettingError(
            "challengePassword, chalengePassword", "'chalengePassword'", "unknown name"
        )

    def test_unknown_value_name(self) -> None:
        """An unknown value name is an error naming the item and value."""
        self.assertSettingError(
            "ecPublicKey=secp384", "'ecPublicKey=secp384'", "'secp384'", "unknown name"
        )

    def test_malformed_oid(self) -> None:
        """Malformed dotted OIDs (one arc, empty arcs, leading zeros, first
        arc above 2, second arc above 39 under 0/1, letters) are errors
        naming the item, as attribute or as value."""
        for oid in [
            "1",
            "1.",
            "1..2",
            "1.2.",
            "1.02",
            "3.1",
            "1.40",
            "0.99",
            "1.2a",
            "1.-2",
        ]:
            self.assertSettingError(oid, f"'{oid}'", "malformed OID")
            self.assertSettingError(f"ecPublicKey={oid}", f"'{oid}'", "malformed OID")

    def test_empty_item(self) -> None:
        """An empty item (doubled or trailing comma) is an error."""
        for text in [
            "challengePassword,,ecPublicKey",
            "challengePassword,",
            ",keyUsage",
        ]:
            self.assertSettingError(text, "empty item")

    def test_missing_attribute(self) -> None:
        """An item with values but no attribute ('=secp384r1') is an
        error naming the item."""
        self.assertSettingError("=secp384r1", "'=secp384r1'", "missing")

    def test_empty_value(self) -> None:
        """'name=' or an empty slot in the '|' list is an error naming the
        item."""
        for item in [
            "ecPublicKey=",
            "ecPublicKey= ",
            "ecPublicKey=secp384r1||secp256r1",
            "ecPublicKey=|secp384r1",
        ]:
            self.assertSettingError(item, repr(item.strip()), "empty value")

    def test_equals_in_value(self) -> None:
        """A second '=' makes the value an unknown name, not a silent
        split."""
        self.assertSettingError(
            "ecPublicKey=secp384r1=x", "unknown name", "'secp384r1=x'"
        )

    def test_duplicate(self) -> None:
        """The same OID twice (by name and number) is an error naming it."""
        self.assertSettingError(
            "challengePassword, 1.2.840.113549.1.9.7",
            "'1.2.840.113549.1.9.7'",
            "listed twice",
        )


class CsrAttrsTests(RefusalAssertions):
    def test_csr_attr_validates(self) -> None:
        """A CsrAttr refuses a malformed OID at construction and stores
        values as a tuple."""
        self.assertRaises(ValueError, CsrAttr, "challengePassword")
        self.assertRaises(ValueError, CsrAttr, "1.2.3", ("x",))
        self.assertEqual(CsrAttr("1.2.3", ["1.2.4"]).values, ("1.2.4",))

    def test_rfc7030_example(self) -> None:
        """The RFC 7030 §4.5.2 example's bytes still decode (old servers),
        but its extensionRequest of OIDs is never encoded (RFC 9908 §3.2);
        its corrected form, macAddress as a bare OID, encodes."""
        self.assertEqual(decode_csrattrs(RFC7030_CSRATTRS), RFC7030_ATTRS)
        error = self.assertRaises(ValueError, encode_csrattrs, RFC7030_ATTRS)
        self.assertIn("one Extensions value", str(error))
        corrected = parse_csrattrs_setting(
            "challengePassword, ecPublicKey=secp384r1, extensionRequest=macAddress, ecdsa-with-SHA384"
        )
        self.assertEqual(
            decode_csrattrs(encode_csrattrs(corrected)),
            (
                CsrAttr("1.2.840.113549.1.9.7"),
                CsrAttr("1.2.840.10045.2.1", ("1.3.132.0.34",)),
                CsrAttr("1.3.6.1.1.1.1.22"),
                CsrAttr("1.2.840.10045.4.3.3"),
            ),
        )

    def test_round_trip(self) -> None:
        """A parsed setting survives encode then decode."""
        attrs = parse_csrattrs_setting(
            "challengePassword, ecPublicKey=secp384r1, "
            "extensionRequest=subjectAltName|macAddress, ecdsa-with-SHA384, 2.999.12345"
        )
        self.assertEqual(decode_csrattrs(encode_csrattrs(attrs)), attrs)

    def test_values_come_back_in_der_order(self) -> None:
        """Attribute values are a DER SET OF, so they come back sorted by
        their encoding, not in the configured order."""
        attrs = (CsrAttr("2.999.5", ("1.3.6.1.1.1.1.22", "2.5.29.17")),)
        self.assertEqual(
            decode_csrattrs(encode_csrattrs(attrs)),
            (CsrAttr("2.999.5", ("2.5.29.17", "1.3.6.1.1.1.1.22")),),
        )

    def test_empty(self) -> None:
        """The empty CsrAttrs is the DER 30 00 and decodes to ()."""
        self.assertEqual(encode_csrattrs(()), b"MAA=\n")
        self.assertEqual(decode_csrattrs(b"MAA="), ())

    def test_openssl_parses(self) -> None:
        """`openssl asn1parse -inform DER` parses the DER and sees every
        OID."""
        attrs = parse_csrattrs_setting(
            "challengePassword, ecPublicKey=secp384r1, extensionRequest=macAddress"
        )
        printed = subprocess.run(
            [openssl(), "asn1parse", "-inform", "DER"],
            input=base64.b64decode(encode_csrattrs(attrs)),
            capture_output=True,
            check=True,
        ).stdout.decode()
        objects = re.findall(r"OBJECT\s+:(.+?)\s*$", printed, re.MULTILINE)
        self.assertEqual(
            objects,
            [
                "challengePassword",
                "id-ecPublicKey",
                "secp384r1",
                "1.3.6.1.1.1.1.22",
            ],
        )

    def test_decode_junk(self) -> None:
        """Bodies that are not a CsrAttrs of OIDs are bad-csrattrs: not DER,
        trailing bytes, an attribute with no values, a value that is not
        an OID, a SEQUENCE OF something else."""
        ext_req = tlv(0x06, bytes.fromhex("2a864886f70d01090e"))
        integer = tlv(0x02, b"\x05")
        for data in [
            b"hello",
            tlv(0x30, b"") + b"\x00",  # trailing byte
            tlv(0x30, tlv(0x30, ext_req + tlv(0x31, b""))),  # no values
            tlv(0x30, tlv(0x30, ext_req + tlv(0x31, integer))),  # not an OID
            tlv(0x30, tlv(0x30, ext_req + tlv(0x31, integer))[:-1]),  # truncated
            tlv(0x30, integer),  # neither OID nor Attribute
        ]:
            body = base64.b64encode(data)
            self.assertRefused(400, "bad-csrattrs", decode_csrattrs, body)
        self.assertRefused(400, "bad-base64", decode_csrattrs, b"not base64!")
        self.assertRefused(400, "empty-body", decode_csrattrs, b"")

    def test_mangled_csrattrs_are_refused(self) -> None:
        """Corrupted and truncated CsrAttrs give a Refusal or a tuple of
        CsrAttr: never another exception."""
        rng = random.Random(8951)
        original = base64.b64decode(RFC7030_CSRATTRS)
        for _ in range(3000):
            data = bytearray(original)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.2:
                data = data[: rng.randrange(1, len(data))]
            try:
                result = decode_csrattrs(base64.b64encode(data))
            except Refusal as refusal:
                self.assertEqual(refusal.code, "bad-csrattrs")
            else:
                self.assertTrue(all(isinstance(a, CsrAttr) for a in result))
