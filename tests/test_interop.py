"""What real EST clients send and expect, over real TLS on 127.0.0.1.

- a 401 challenge to a request without credentials has an empty body
  (Java clients close it unread), refused credentials keep their reason;
- CA labels are RFC 3986 path segments (``ca:1``), routed decoded;
- the request-target: absolute-form accepted, empty segments and
  dot-segments normalised everywhere;
- SHA-1 / MD5 / unknown CSR signature algorithms refused by name, SHA-1
  accepted where a handler says so;
- the TLS cipher, group and security-level settings, with the RFC 7925
  CCM_8 suite.

Clients are curl, openssl and raw TLS sockets; every refusal shows its
status, its audit line and that nothing was issued.
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.threads import deferToThread
from twisted.web.http_headers import Headers
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import tls
from estgw.approval.testing import RunningApprovalService, idm_gateway_config
from estgw.config import ConfigError, from_string
from estgw.passwords import hash_password
from estgw.protocol import decode_certs_only
from estgw.store import Device
from estgw.web import origin_path
from estgw.testing import TEST_CONFIG, HTTPResult, RunningGateway, csr_pem, make_csr, new_key, run_process, write
from tests.test_auth import FACTORY_CA, SECURITY_CONFIG, AuditLog, gateway_certificate, run_cli
from tests.test_twistd import START_TIMEOUT, TwistdTestCase, _wait

PASSWORD_HASH = hash_password("s3cret")  # scrypt is slow on purpose: once per module


async def register(gateway: RunningGateway, device_id: str = "pump-17") -> None:
    await gateway.store.add_device(Device(device_id=device_id, password_hash=PASSWORD_HASH))


def basic_csr(common_name: str = "pump-17") -> bytes:
    return csr_pem(make_csr(new_key(), common_name))


def raw_tls(port: int, ca_file: str, data: bytes, timeout: float = 15) -> bytes:
    """Send ``data`` over one TLS connection to 127.0.0.1:``port`` and read
    until the server closes it (blocking: run it in a thread)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
        with context.wrap_socket(plain) as connection:
            connection.sendall(data)
            received = b""
            while len(received) < 1 << 20:
                chunk = connection.recv(65536)
                if not chunk:
                    break
                received += chunk
    return received


def responses(stream: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split an HTTP/1.1 response stream by Content-Length, as a client
    that trusts the framing does."""
    result = []
    while stream:
        head, separator, rest = stream.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"not an HTTP response: {stream[:80]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        result.append((status, headers, rest[:length]))
        stream = rest[length:]
    return result


class RefusalAssertions:
    audit: AuditLog
    gateway: RunningGateway

    async def assertBareChallenge(self, result: HTTPResult, code: str, reason: str, scheme: str) -> None:
        """401, a challenge, no body at all; the reason is in the audit
        line; nothing issued."""
        self.assertEqual(result.status, 401, result.text)  # type: ignore[attr-defined]
        self.assertEqual((result.body, result.headers.get("content-length")), (b"", "0"))  # type: ignore[attr-defined]
        self.assertNotIn("content-type", result.headers)  # type: ignore[attr-defined]
        self.assertTrue(result.headers["www-authenticate"].startswith(scheme + " "))  # type: ignore[attr-defined]
        self.assertEqual(self.audit.refused[-1], code)  # type: ignore[attr-defined]
        self.assertIn(reason, self.audit.reasons[-1])  # type: ignore[attr-defined]
        self.assertEqual(self.audit.issued, [])  # type: ignore[attr-defined]
        self.assertEqual(await self.gateway.store.count_certificates(), 0)  # type: ignore[attr-defined]

    async def assertReasonBody(self, result: HTTPResult, status: int, code: str, reason: str) -> None:
        self.assertEqual(result.status, status, result.text)  # type: ignore[attr-defined]
        self.assertIn(reason, result.text)  # type: ignore[attr-defined]
        self.assertEqual(result.headers["content-length"], str(len(result.body)))  # type: ignore[attr-defined]
        self.assertEqual(self.audit.refused[-1], code)  # type: ignore[attr-defined]
        self.assertEqual(self.audit.issued, [])  # type: ignore[attr-defined]
        self.assertEqual(await self.gateway.store.count_certificates(), 0)  # type: ignore[attr-defined]


# -- 401 challenges ------------------------------------------------------------------


class ChallengeBodyTests(RefusalAssertions, TestCase):
    """Every path that challenges: Basic, Digest, the extra layer, the
    factory password, under the root and under a label."""

    async def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        anchor = write(os.path.join(self.directory, "factory-ca.pem"), FACTORY_CA.cert.public_bytes(Encoding.PEM))
        self.audit = AuditLog(self)
        self.gateway = await RunningGateway.start(self, SECURITY_CONFIG.format(factory_ca=anchor))

    async def test_basic_without_credentials(self) -> None:
        """Basic, at the root and under a label: an empty 401 challenge."""
        for path in ("simpleenroll", "lab/simpleenroll"):
            result = await self.gateway.curl(path, data=basic_csr())
            await self.assertBareChallenge(result, "authentication-required", "pre-registered device", "Basic")

    async def test_digest_without_credentials(self) -> None:
        """Digest: an empty 401 with a Digest challenge."""
        result = await self.gateway.curl("digest/simpleenroll", data=basic_csr())
        await self.assertBareChallenge(result, "authentication-required", "pre-registered device", "Digest")

    async def test_extra_layer_without_credentials(self) -> None:
        """A client certificate on a handler that also needs Basic: empty 401."""
        own = gateway_certificate(self.gateway, self.directory, "pump-17")
        result = await self.gateway.curl("extra/simpleenroll", data=basic_csr(), **own.curl)
        await self.assertBareChallenge(result, "authentication-required", "also needs HTTP Basic", "Basic")

    async def test_factory_password_without_credentials(self) -> None:
        """A factory certificate where the device password is needed too: empty 401."""
        idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017")
        await run_cli(self.gateway, "device", "add", "pump-17", "--factory-cert", idevid.cert_path,
                      "--password", "s3cret")
        result = await self.gateway.curl("factorypw/simpleenroll", data=basic_csr(), **idevid.curl)
        await self.assertBareChallenge(result, "password-required", "needs the device password", "Basic")

    async def test_refused_credentials_keep_their_reason(self) -> None:
        """Credentials sent and refused: 401 with the one-line reason (Basic,
        and Digest after its empty first challenge); the wrong scheme too."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:wrong")
        await self.assertReasonBody(result, 401, "bad-credentials", "unknown device or wrong password")
        result = await self.gateway.curl("digest/simpleenroll", data=basic_csr(), user="pump-17:wrong", digest=True)
        await self.assertReasonBody(result, 401, "bad-credentials", "unknown device or wrong password")
        self.assertEqual(self.audit.refused[-2:], ["authentication-required", "bad-credentials"])
        result = await self.gateway.curl("digest/simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        await self.assertReasonBody(result, 401, "wrong-auth-scheme", "takes HTTP Digest authentication")

    async def test_digest_login_after_empty_challenge(self) -> None:
        """curl --digest reads the empty challenge and logs in."""
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        result = await self.gateway.curl("digest/simpleenroll", data=basic_csr(), user="pump-17:s3cret", digest=True)
        self.assertEqual(result.status, 200, result.text)

    async def test_keep_alive_client_that_skips_the_body(self) -> None:
        """On one keep-alive connection a challenge and the next request:
        the stream holds exactly the empty 401 and then the 200, so a
        client that never reads a 401's body stays in step."""
        csr = basic_csr()
        requests = (
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n%s"
            b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ) % (len(csr), csr)
        stream = await deferToThread(raw_tls, self.gateway.port, self.gateway.ca_file, requests)
        (first, second) = responses(stream)
        self.assertEqual((first[0], first[2]), (401, b""))
        self.assertIn("www-authenticate", first[1])
        self.assertEqual(second[0], 200)
        self.assertEqual(len(decode_certs_only(second[2])), 2)


class ApprovalChallengeTests(RefusalAssertions, TestCase):
    timeout = 60

    async def test_approval_filter_without_credentials(self) -> None:
        """The approval filter's challenge is empty too, and nothing reaches
        the approval service."""
        approval = await RunningApprovalService.start(self)
        files = os.path.abspath(self.mktemp())
        os.makedirs(files)
        token = approval.issue_gateway_token(os.path.join(files, "ra.p12"), "abcd1234")
        self.audit = AuditLog(self)
        self.gateway = await RunningGateway.start(
            self, idm_gateway_config(approval.url, token, "abcd1234", approval.ca_file)
        )
        result = await self.gateway.curl("simpleenroll", data=basic_csr())
        await self.assertBareChallenge(result, "authentication-required", "pre-registered device", "Basic")
        self.assertEqual(await self.gateway.store.list_approvals(), [])


# -- CA labels -----------------------------------------------------------------------


def label_config(label: str) -> str:
    return TEST_CONFIG + f"handler.9.operation = cacerts\nhandler.9.label = {label}\n"


class LabelConfigTests(SynchronousTestCase):
    def label_of(self, label: str) -> str:
        (found,) = [h for h in from_string(label_config(label), base_dir="/tmp").handlers if h.id == "9"]
        return found.label

    def refused(self, label: str, reason: str) -> None:
        e = self.assertRaises(ConfigError, from_string, label_config(label), base_dir="/tmp")
        self.assertEqual(e.key, "handler.9.label")
        self.assertIn(reason, e.reason)

    def test_rfc3986_segments(self) -> None:
        """':', '@' and the sub-delims are allowed in a label, as RFC 3986
        path segments allow them; a percent-encoded label is kept decoded."""
        for label in ("ca:1", "ra@site-2", "a!$&'()*+,;=b", "x~y_z.1"):
            self.assertEqual(self.label_of(label), label)
        self.assertEqual(self.label_of("ca%3A1"), "ca:1")
        self.assertEqual(self.label_of("ca%3a1"), "ca:1")

    def test_dot_segments(self) -> None:
        """'.' and '..' (also percent-encoded) are refused: clients remove them."""
        for label in (".", "..", "%2E", "%2e%2E"):
            self.refused(label, "dot-segment")

    def test_operation_names(self) -> None:
        """A label cannot be an operation path segment (RFC 7030 §3.2.2)."""
        for label in ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen", "fullcmc", "CACerts"):
            self.refused(label, "name of an EST operation")

    def test_not_segments(self) -> None:
        """A '/', a space, a non-ASCII letter or a stray '%' is no segment."""
        for label in ("a/b", "a%2Fb", "a b", "é", "%C3%A9", "%FF"):
            self.refused(label, "not a valid URL path segment")
        for label in ("100%", "x%zz"):
            self.refused(label, "percent-encoded octet")


class LabelRoutingTests(TestCase):
    async def test_colon_label_served(self) -> None:
        """A handler under ``ca:1`` serves ``ca:1``, ``ca%3A1`` and
        ``ca%3a1`` alike (curl, a real listener); enrollment works there."""
        config = TEST_CONFIG + (
            "handler.9.operation = cacerts\nhandler.9.label = ca:1\n"
            "handler.10.operation = simpleenroll\nhandler.10.label = ca%3A1\n"
            "handler.10.authtype = Basic\nhandler.10.realm = r\n"
        )
        gateway = await RunningGateway.start(self, config)
        bodies = set()
        for label in ("ca:1", "ca%3A1", "ca%3a1"):
            result = await gateway.curl(f"{label}/cacerts", extra=["--path-as-is"])
            self.assertEqual(result.status, 200, f"{label}: {result.text}")
            bodies.add(result.body)
        self.assertEqual(len(bodies), 1)
        await register(gateway)
        result = await gateway.curl("ca%3A1/simpleenroll", data=basic_csr(), user="pump-17:s3cret")
        self.assertEqual(result.status, 200, result.text)
        result = await gateway.curl("ca:2/cacerts")
        self.assertEqual((result.status, result.text), (404, "no CA label 'ca:2' here\n"))

    async def test_sub_delims_label_served(self) -> None:
        """A label with '@' and sub-delims is reached spelt out and
        percent-encoded ('+' is not a space in a path)."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "handler.9.operation = cacerts\nhandler.9.label = ra@site+1;v=2\n"
        )
        for label in ("ra@site+1;v=2", "ra%40site%2B1%3Bv%3D2"):
            result = await gateway.curl(f"{label}/cacerts", extra=["--path-as-is"])
            self.assertEqual(result.status, 200, f"{label}: {result.text}")
        result = await gateway.curl("ra@site%201;v=2/cacerts", extra=["--path-as-is"])
        self.assertEqual(result.status, 404)


class LabelDaemonTests(TwistdTestCase):
    async def test_twistd_serves_colon_label(self) -> None:
        """``label = ca:1`` in the shipped configuration: twistd starts and
        serves it."""
        with open(self.config, "a") as f:
            f.write("handler.40.operation = cacerts\nhandler.40.label = ca:1\n")
        daemon = await self.start()
        status, body = await self.curl(daemon.port, "ca:1/cacerts")
        self.assertEqual(status, 200, body)
        self.assertEqual(len(decode_certs_only(body)), 2)

    async def test_twistd_refuses_operation_label(self) -> None:
        """``label = cacerts`` stops twistd with the key and the reason."""
        with open(self.config, "a") as f:
            f.write("handler.40.operation = cacerts\nhandler.40.label = cacerts\n")
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        self.assertNotEqual(code, 0)
        self.assertIn(f"{self.config}: handler.40.label: 'cacerts' is the name of an EST operation",
                      daemon.output.decode())


# -- the request-target ----------------------------------------------------------------


class OriginPathTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """What each request-target is routed on (the query is already
        split off by twisted.web)."""
        for target, path in (
            (b"https://h:8443/.well-known/est/cacerts", b"/.well-known/est/cacerts"),
            (b"HTTP://h", b"/"),
            (b"https://user@h:1//a//b/", b"/a/b"),
            (b"/a/./b/../../../c", b"/c"),
            (b"/a/%2e%2E/b", b"/b"),
            (b"/a%2Fb/%2e/c", b"/a%2Fb/c"),
            (b"*", b"*"),
            (b"ftp://h/x", b"ftp://h/x"),
        ):
            self.assertEqual(origin_path(target), path, target)

    def test_absolute_form_host(self) -> None:
        """The authority of an absolute-form target replaces Host (RFC 9112
        §3.2.2: the server MUST ignore the received Host)."""
        headers = Headers({b"host": [b"wrong.example"]})
        origin_path(b"https://est.example:8443/.well-known/est/cacerts", headers)
        self.assertEqual(headers.getRawHeaders(b"host"), [b"est.example:8443"])
        headers = Headers({b"host": [b"est.example"]})
        origin_path(b"/.well-known/est/cacerts", headers)
        self.assertEqual(headers.getRawHeaders(b"host"), [b"est.example"])


class RequestTargetTests(TestCase):
    async def setUp(self) -> None:
        self.audit = AuditLog(self)
        self.gateway = await RunningGateway.start(self)
        self.cacerts = (await self.gateway.curl("cacerts")).body
        self.assertEqual(len(decode_certs_only(self.cacerts)), 2)

    async def get(self, path: str) -> HTTPResult:
        return await self.gateway.curl(path, extra=["--path-as-is"])

    async def test_empty_and_dot_segments_normalised(self) -> None:
        """Empty segments anywhere and dot-segments (also %2E) lead to the
        same resource, sent as is by curl --path-as-is."""
        for path in (
            "//.well-known/est/cacerts",
            "/.well-known/est//cacerts",
            "/.well-known//est/cacerts/",
            "///.well-known///est///lab///cacerts",
            "/.well-known/est/./cacerts",
            "/.well-known/est/lab/../cacerts",
            "/x/../.well-known/est/cacerts",
            "/../.well-known/est/cacerts",
            "/.well-known/est/lab/%2E%2E/cacerts",
            "/.well-known/est/%63acerts",
            "/%2Ewell-known/est/cacerts",
        ):
            result = await self.get(path)
            self.assertEqual((result.status, result.body), (200, self.cacerts), path)

    async def test_still_not_found(self) -> None:
        """Normalising never invents a path: an encoded '/' stays inside
        its segment (one segment, no such operation), '..' climbs out of
        /.well-known/est/."""
        for path, code in (
            ("/.well-known/est/lab%2Fcacerts", "unknown-operation"),
            ("/.well-known/est/../cacerts", None),
            ("//cacerts", None),
        ):
            result = await self.get(path)
            self.assertEqual(result.status, 404, path)
            if code:
                self.assertEqual(self.audit.refused[-1], code)

    async def test_absolute_form(self) -> None:
        """``GET https://host:port/.well-known/est/cacerts HTTP/1.1`` over a
        raw TLS socket is served (RFC 9112 §3.2.2), with empty segments
        and a label too; a POST in absolute-form enrolls."""
        base = f"https://127.0.0.1:{self.gateway.port}"
        for target in (f"{base}/.well-known/est/cacerts", f"HTTPS://localhost:1{'//.well-known/est/lab/cacerts'}"):
            request = f"GET {target} HTTP/1.1\r\nHost: wrong.example\r\nConnection: close\r\n\r\n".encode()
            stream = await deferToThread(raw_tls, self.gateway.port, self.gateway.ca_file, request)
            ((status, headers, body),) = responses(stream)
            self.assertEqual((status, base64.b64decode(body)), (200, base64.b64decode(self.cacerts)), target)
        await register(self.gateway)
        csr = basic_csr()
        request = (
            f"POST {base}/.well-known/est/simpleenroll HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Basic {base64.b64encode(b'pump-17:s3cret').decode()}\r\n"
            f"Content-Type: application/pkcs10\r\nContent-Length: {len(csr)}\r\nConnection: close\r\n\r\n"
        ).encode() + csr
        stream = await deferToThread(raw_tls, self.gateway.port, self.gateway.ca_file, request)
        ((status, headers, body),) = responses(stream)
        self.assertEqual(status, 200, body)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)

    async def test_curl_request_target(self) -> None:
        """curl --request-target sends absolute-form; it is served."""
        target = f"https://127.0.0.1:{self.gateway.port}/.well-known/est//cacerts"
        result = await self.gateway.curl("cacerts", extra=["--request-target", target])
        self.assertEqual((result.status, result.body), (200, self.cacerts))


# -- CSR signature algorithms --------------------------------------------------------

SHA1_CONFIG = TEST_CONFIG + """\
handler.10.operation = simpleenroll
handler.10.label = legacy
handler.10.authtype = Basic
handler.10.realm = legacy
handler.10.acceptSha1CsrSignature = true
"""


class SignatureAlgorithmTests(RefusalAssertions, TestCase):
    """openssl req as the client signs CSRs with SHA-1, MD5, RSA-PSS/SHA-1."""

    timeout = 120

    async def setUp(self) -> None:
        self.audit = AuditLog(self)
        self.gateway = await RunningGateway.start(self, SHA1_CONFIG)
        await register(self.gateway)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)

    async def openssl_csr(self, *options: str, key: str = "ec") -> bytes:
        """``openssl req -new`` with a new key and ``options`` (e.g. -sha1)."""
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key == "ec" else ["-newkey", "rsa:2048"]
        out = os.path.join(self.directory, f"req-{len(os.listdir(self.directory))}.csr")
        result = await run_process([
            "/usr/bin/env", "openssl", "req", "-new", *newkey, "-nodes", "-keyout", out + ".key",
            "-subj", "/CN=pump-17", *options, "-out", out,
        ])
        self.assertEqual(result.code, 0, result.stderr)
        with open(out, "rb") as f:
            return f.read()

    async def enroll(self, csr: bytes, path: str = "simpleenroll") -> HTTPResult:
        return await self.gateway.curl(path, data=csr, user="pump-17:s3cret")

    async def test_sha1_refused_by_default(self) -> None:
        """ECDSA, RSA and RSA-PSS signatures with SHA-1: 400 naming the
        algorithm, not csr-bad-signature; nothing issued."""
        for options, key, name in (
            (("-sha1",), "ec", "ecdsa-with-SHA1 (SHA-1)"),
            (("-sha1",), "rsa", "sha1WithRSAEncryption (SHA-1)"),
            (("-sha1", "-sigopt", "rsa_padding_mode:pss"), "rsa", "rsassaPss (SHA-1)"),
        ):
            result = await self.enroll(await self.openssl_csr(*options, key=key))
            await self.assertReasonBody(result, 400, "csr-unsupported-signature-algorithm", name)
            self.assertIn("sign it with SHA-256 or stronger", result.text)

    async def test_md5_refused_everywhere(self) -> None:
        """MD5 is refused by name, also where SHA-1 is accepted."""
        csr = await self.openssl_csr("-md5", key="rsa")
        for path in ("simpleenroll", "legacy/simpleenroll"):
            result = await self.enroll(csr, path)
            await self.assertReasonBody(result, 400, "csr-unsupported-signature-algorithm",
                                        "md5WithRSAEncryption (MD5)")

    async def test_unknown_signature_algorithm(self) -> None:
        """A signature OID nobody knows: 400 naming the OID."""
        der = make_csr(new_key(), "pump-17").public_bytes(Encoding.DER)
        ecdsa_sha256 = bytes.fromhex("06082a8648ce3d040302")
        self.assertEqual(der.count(ecdsa_sha256), 1)
        der = der.replace(ecdsa_sha256, bytes.fromhex("06082a8648ce3d04037f"))
        result = await self.enroll(base64.b64encode(der))
        await self.assertReasonBody(result, 400, "csr-unsupported-signature-algorithm", "1.2.840.10045.4.3.127")

    async def test_sha1_accepted_where_configured(self) -> None:
        """acceptSha1CsrSignature = true: SHA-1 CSRs (ECDSA, RSA, RSA-PSS)
        are proof of possession; the certificate is signed with SHA-256."""
        for options, key in ((("-sha1",), "ec"), (("-sha1",), "rsa"),
                             (("-sha1", "-sigopt", "rsa_padding_mode:pss"), "rsa")):
            csr = x509.load_pem_x509_csr(await self.openssl_csr(*options, key=key))
            self.assertIsInstance(csr.signature_hash_algorithm, hashes.SHA1)
            result = await self.enroll(csr_pem(csr), "legacy/simpleenroll")
            self.assertEqual(result.status, 200, result.text)
            (certificate,) = decode_certs_only(result.body)
            self.assertIsInstance(certificate.signature_hash_algorithm, hashes.SHA256)
            self.assertEqual(certificate.public_key(), csr.public_key())
        self.assertEqual(await self.gateway.store.count_certificates(), 3)

    async def test_sha1_signature_still_verified(self) -> None:
        """Where SHA-1 is accepted, a SHA-1 signature that does not verify
        is still csr-bad-signature (ECDSA and RSA)."""
        for key in ("ec", "rsa"):
            pem = await self.openssl_csr("-sha1", key=key)
            der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(Encoding.DER))
            der[-5] ^= 0x01  # inside the signature
            result = await self.enroll(base64.b64encode(bytes(der)), "legacy/simpleenroll")
            await self.assertReasonBody(result, 400, "csr-bad-signature", "does not verify")


class SignatureSettingConfigTests(SynchronousTestCase):
    def test_default_off_and_default_key(self) -> None:
        """Off unless set; default.acceptSha1CsrSignature sets it for every
        enrollment handler; cacerts and csrattrs handlers never carry it."""
        config = from_string(TEST_CONFIG, base_dir="/tmp")
        self.assertFalse(any(h.accept_sha1_csr_signature for h in config.handlers))
        config = from_string(TEST_CONFIG + "default.acceptSha1CsrSignature = true\n", base_dir="/tmp")
        self.assertEqual(
            {h.operation: h.accept_sha1_csr_signature for h in config.handlers},
            {"cacerts": False, "csrattrs": False, "simpleenroll": True, "simplereenroll": True},
        )

    def test_errors(self) -> None:
        """Not a boolean, or set on a cacerts handler: an error with the key."""
        e = self.assertRaises(ConfigError, from_string, TEST_CONFIG + "handler.2.acceptSha1CsrSignature = yes please\n")
        self.assertEqual(e.key, "handler.2.acceptSha1CsrSignature")
        e = self.assertRaises(ConfigError, from_string, TEST_CONFIG + "handler.1.acceptSha1CsrSignature = true\n")
        self.assertEqual((e.key, e.reason), ("handler.1.acceptSha1CsrSignature", "not used by cacerts"))


# -- TLS settings ----------------------------------------------------------------------

CCM8_CONFIG = TEST_CONFIG + f"""\
tls.ciphers = {tls.DEFAULT_CIPHERS}:ECDHE-ECDSA-AES128-CCM8
tls.ciphersuites = {tls.DEFAULT_CIPHERSUITES}:TLS_AES_128_CCM_8_SHA256
tls.securityLevel = 0
"""


class TLSSettingsTests(TestCase):
    timeout = 120

    async def s_client(self, gateway: RunningGateway, *options: str) -> str:
        result = await run_process([
            "/usr/bin/env", "openssl", "s_client", "-connect", f"127.0.0.1:{gateway.port}",
            "-CAfile", gateway.ca_file, *options,
        ])
        return (result.stdout + result.stderr).decode("utf-8", "replace")

    def assertCipher(self, output: str, cipher: str) -> None:
        self.assertRegex(output, rf"New, TLSv1\.[23], Cipher is {re.escape(cipher)}\n")
        self.assertIn("Verify return code: 0 (ok)", output)

    def assertNoHandshake(self, output: str) -> None:
        self.assertIn("Cipher is (NONE)", output)
        self.assertRegex(output, r"handshake failure|no shared cipher|no suitable")

    async def test_ccm8_off_by_default(self) -> None:
        """The default refuses a client that offers only CCM_8 (TLS 1.2 and
        1.3) and serves one that offers AES-GCM."""
        gateway = await RunningGateway.start(self)
        self.assertNoHandshake(await self.s_client(gateway, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-CCM8"))
        self.assertNoHandshake(await self.s_client(gateway, "-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256"))
        self.assertCipher(await self.s_client(gateway, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"),
                          "ECDHE-ECDSA-AES128-GCM-SHA256")

    async def test_ccm8_when_enabled(self) -> None:
        """tls.ciphers with CCM_8 and tls.securityLevel = 0: an RFC 7925
        client offering only TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8 completes
        the handshake (the gateway's key is P-256) and enrolls over it;
        a client offering more still gets AES-GCM (server preference)."""
        gateway = await RunningGateway.start(self, CCM8_CONFIG)
        self.assertCipher(await self.s_client(gateway, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-CCM8"),
                          "ECDHE-ECDSA-AES128-CCM8")
        self.assertCipher(await self.s_client(gateway, "-tls1_3", "-ciphersuites", "TLS_AES_128_CCM_8_SHA256"),
                          "TLS_AES_128_CCM_8_SHA256")
        self.assertCipher(await self.s_client(gateway, "-tls1_2"), "ECDHE-ECDSA-AES256-GCM-SHA384")
        await register(gateway)
        result = await gateway.curl(
            "simpleenroll", data=basic_csr(), user="pump-17:s3cret",
            extra=["--tls-max", "1.2", "--ciphers", "ECDHE-ECDSA-AES128-CCM8"],
        )
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await gateway.store.count_certificates(), 1)

    async def test_ciphers_and_groups_restrict(self) -> None:
        """tls.ciphers and tls.groups are what the gateway offers: a cipher
        or group left out fails the handshake."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + (
            "tls.ciphers = ECDHE-ECDSA-AES256-GCM-SHA384\n"
            "tls.ciphersuites = TLS_AES_256_GCM_SHA384\n"
            "tls.groups = P-384\n"
        ))
        self.assertNoHandshake(await self.s_client(gateway, "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"))
        self.assertNoHandshake(await self.s_client(gateway, "-tls1_3", "-ciphersuites", "TLS_AES_128_GCM_SHA256"))
        self.assertNoHandshake(await self.s_client(gateway, "-groups", "P-256"))
        output = await self.s_client(gateway, "-tls1_3", "-groups", "P-384")
        self.assertCipher(output, "TLS_AES_256_GCM_SHA384")
        self.assertRegex(output, r"(Server|Peer) Temp Key: ECDH, (P-384|secp384r1)")

    async def test_default_groups(self) -> None:
        """By default X25519, P-256 and P-384 all work (CertificateOptions
        alone offered P-256 only)."""
        gateway = await RunningGateway.start(self)
        for group in ("X25519", "P-256", "P-384"):
            output = await self.s_client(gateway, "-groups", group)
            self.assertCipher(output, "TLS_AES_256_GCM_SHA384")


class TLSSettingsConfigTests(SynchronousTestCase):
    def error(self, text: str, key: str, reason: str) -> None:
        e = self.assertRaises(ConfigError, from_string, TEST_CONFIG + text, base_dir="/tmp")
        self.assertEqual(e.key, key, str(e))
        self.assertIn(reason, e.reason)

    def test_defaults(self) -> None:
        """No tls.* cipher keys: the documented defaults, level 2, no CCM_8."""
        settings = tls.settings_of(from_string(TEST_CONFIG, base_dir="/tmp"))
        self.assertEqual(settings, tls.TLSSettings())
        self.assertEqual(settings.security_level, 2)
        self.assertNotIn("ECDHE-ECDSA-AES128-CCM8", tls._tls12_ciphers(settings.ciphers))
        self.assertIn("ECDHE-ECDSA-AES128-CCM", tls._tls12_ciphers(settings.ciphers))
        self.assertTrue(settings.groups.endswith("X25519:P-256:P-384:P-521"))

    def test_bad_values(self) -> None:
        """Unknown names (which OpenSSL itself would skip), empty values,
        @SECLEVEL in the cipher list, a level out of range: errors with the key."""
        self.error("tls.ciphers = ECDHE+AESGCM:ECDHE-ECDSA-AES128-GMC\n", "tls.ciphers", "no cipher or cipher group 'ECDHE-ECDSA-AES128-GMC'")
        self.error("tls.ciphers = \n", "tls.ciphers", "must not be empty")
        self.error("tls.ciphers = !aNULL\n", "tls.ciphers", "selects no cipher")
        self.error("tls.ciphers = DEFAULT:@SECLEVEL=0\n", "tls.ciphers", "tls.securityLevel")
        self.error("tls.ciphersuites = TLS_AES_128_GCM_SHA256:TLS_AES_128_GMC_SHA256\n", "tls.ciphersuites", "'TLS_AES_128_GMC_SHA256'")
        self.error("tls.groups = P-256:P-257\n", "tls.groups", "no group 'P-257'")
        self.error("tls.securityLevel = 6\n", "tls.securityLevel", "0 to 5")
        self.error("tls.securityLevel = two\n", "tls.securityLevel", "0 to 5")

    def test_ccm8_needs_level_zero(self) -> None:
        """A CCM_8 suite named at a level OpenSSL forbids it at is an error
        that says the level it needs, not a silently dead setting."""
        self.error("tls.ciphers = ECDHE+AESGCM:ECDHE-ECDSA-AES128-CCM8\n", "tls.ciphers",
                   "ECDHE-ECDSA-AES128-CCM8 cannot be used at tls.securityLevel 2 (it is usable up to tls.securityLevel 0)")
        self.error("tls.ciphersuites = TLS_AES_128_CCM_8_SHA256\n", "tls.ciphersuites", "tls.securityLevel 0")
        self.error("tls.ciphers = ECDHE+AESGCM:!AESCCM8:ECDHE-ECDSA-AES128-CCM8\ntls.securityLevel = 0\n",
                   "tls.ciphers", "ECDHE-ECDSA-AES128-CCM8 is named but an exclusion (!) in the list removes it")
        from_string(CCM8_CONFIG, base_dir="/tmp")


class TLSSettingsDaemonTests(TwistdTestCase):
    async def test_bad_cipher_stops_twistd(self) -> None:
        """A misspelt cipher stops twistd before it listens, naming the key."""
        with open(self.config, "a") as f:
            f.write("tls.ciphers = ECDHE-ECDSA-AES128-CCM9\n")
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0)
        self.assertIsNone(daemon.port)
        self.assertIn(f"{self.config}: tls.ciphers: OpenSSL knows no cipher or cipher group 'ECDHE-ECDSA-AES128-CCM9'", output)
        self.assertNotIn("Traceback", output)
