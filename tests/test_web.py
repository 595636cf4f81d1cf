"""Routing and the wire rules of against a real gateway and curl.

Every response is checked by :func:`assert_wire`: a Content-Length that
matches the body, never chunked, and a one-line plain-text reason on
every 4xx/5xx.
"""

from __future__ import annotations

import base64
import sys

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.trial.unittest import TestCase

from estgw.passwords import hash_password
from estgw.protocol import decode_certs_only, decode_csrattrs
from estgw.store import Device
from estgw.testing import TEST_CONFIG, HTTPResult, RunningGateway, csr_pem, make_csr, new_key, run_process, until

DEVICE, PASSWORD = "dev-1", "correct horse"
USER = f"{DEVICE}:{PASSWORD}"
PLAIN = "text/plain; charset=utf-8"


def spki(key_or_cert: object) -> bytes:
    public = key_or_cert.public_key()  # type: ignore[attr-defined]
    return public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


class WireTestCase(TestCase):
    """A gateway on the test config with one pre-registered device."""

    config_text = TEST_CONFIG

    async def start(self) -> RunningGateway:
        gateway = await RunningGateway.start(self, self.config_text)
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        return gateway

    def assert_wire(self, result: HTTPResult, status: int) -> None:
        self.assertEqual(result.status, status, (result.text, result.stderr))
        self.assertNotIn("transfer-encoding", result.headers)
        if status == 204:
            self.assertNotIn("content-length", result.headers)
            self.assertEqual(result.body, b"")
        else:
            self.assertEqual(result.headers.get("content-length"), str(len(result.body)))
        if status >= 400:
            self.assertEqual(result.headers.get("content-type"), PLAIN)
            text = result.text
            self.assertTrue(text.endswith("\n") and text.strip(), repr(text))
            self.assertNotIn("\n", text.strip(), "the reason is one line")
            self.assertNotIn("<", text, "plain text, not an HTML page")

    def assert_refused(self, result: HTTPResult, status: int, reason: str) -> None:
        self.assert_wire(result, status)
        self.assertIn(reason, result.text)

    async def assert_nothing_issued(self, gateway: RunningGateway) -> None:
        self.assertEqual(await gateway.store.count_certificates(), 0)

    def csr_der(self, key: object = None) -> tuple[object, bytes]:
        key = key or new_key()
        return key, make_csr(key, DEVICE).public_bytes(Encoding.DER)

    def assert_issued_for(self, result: HTTPResult, key: object) -> x509.Certificate:
        self.assert_wire(result, 200)
        self.assertEqual(result.headers["content-type"], "application/pkcs7-mime; smime-type=certs-only")
        (cert,) = decode_certs_only(result.body)
        self.assertEqual(spki(cert), spki(key))
        return cert


class RoutingTests(WireTestCase):
    async def test_unknown_label(self) -> None:
        """A CA label no handler uses is 404 naming the label."""
        gateway = await self.start()
        self.assert_refused(await gateway.curl("nolabel/cacerts"), 404, "no CA label 'nolabel'")

    async def test_unknown_operation(self) -> None:
        """A path segment that is no EST operation is 404, with or without a label."""
        gateway = await self.start()
        self.assert_refused(await gateway.curl("enroll"), 404, "no EST operation 'enroll'")
        self.assert_refused(await gateway.curl("lab/enroll"), 404, "no EST operation 'enroll'")

    async def test_operation_not_configured(self) -> None:
        """An EST operation without a handler under that label is 404."""
        gateway = await self.start()
        key, der = self.csr_der()
        result = await gateway.curl("lab/simplereenroll", base64.b64encode(der))
        self.assert_refused(result, 404, "simplereenroll is not served here")
        await self.assert_nothing_issued(gateway)

    async def test_paths_outside_est(self) -> None:
        """/, /.well-known, /.well-known/est, deeper EST paths and other
        paths are plain-text 404s, not twisted.web's HTML pages."""
        gateway = await self.start()
        for path in ("/", "/.well-known", "/.well-known/", "/.well-known/est",
                     "/.well-known/est/lab/cacerts/x", "/favicon.ico", "/a/b"):
            result = await gateway.curl(path)
            self.assert_wire(result, 404)

    async def test_method_not_allowed(self) -> None:
        """The wrong method is 405 with Allow naming the right one."""
        gateway = await self.start()
        result = await gateway.curl("simpleenroll")
        self.assert_refused(result, 405, "simpleenroll takes POST")
        self.assertEqual(result.headers["allow"], "POST")
        result = await gateway.curl("cacerts", b"x")
        self.assert_refused(result, 405, "cacerts takes GET")
        self.assertEqual(result.headers["allow"], "GET, HEAD")
        result = await gateway.curl("csrattrs", extra=["-X", "PUT"])
        self.assert_refused(result, 405, "csrattrs takes GET")

    async def test_fullcmc_not_implemented(self) -> None:
        """fullcmc is a clear 501, at the root and under a label."""
        gateway = await self.start()
        for path in ("fullcmc", "lab/fullcmc"):
            result = await gateway.curl(path, b"MIIB", user=USER)
            self.assert_refused(result, 501, "is not offered by this gateway")
        await self.assert_nothing_issued(gateway)

    async def test_head_cacerts(self) -> None:
        """HEAD on cacerts answers like GET, with the Content-Length of the body."""
        gateway = await self.start()
        full = await gateway.curl("cacerts")
        head = await gateway.curl("cacerts", extra=["-I"])
        self.assertEqual(head.status, 200)
        self.assertEqual(head.headers["content-length"], str(len(full.body)))
        self.assertNotIn("transfer-encoding", head.headers)


# An independent client: the stdlib's ssl, sending 16 KiB chunks until
# the server answers or closes; prints the status and the bytes it sent.
ENDLESS_CHUNKS = """
import select, socket, ssl
context = ssl.create_default_context(cafile={ca!r})
context.check_hostname = False
tls = context.wrap_socket(socket.create_connection(("127.0.0.1", {port}), timeout=20))
tls.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\\r\\nHost: x\\r\\n"
            b"Content-Type: application/pkcs10\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n")
chunk = b"4000\\r\\n" + b"A" * 0x4000 + b"\\r\\n"
sent = 0
while sent < 20_000_000:
    if tls.pending() or select.select([tls], [], [], 0)[0]:
        break
    try:
        tls.sendall(chunk)
    except OSError:
        break
    sent += len(chunk)
answer = b""
try:
    while b"\\r\\n" not in answer:
        data = tls.recv(4096)
        if not data:
            break
        answer += data
except OSError:
    pass
print(answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "none", sent)
"""


# Announces a body over the limit, sends none, reads until the server
# closes; prints the status and the seconds it took.
BIG_LENGTH = """
import socket, ssl, time
context = ssl.create_default_context(cafile={ca!r})
context.check_hostname = False
tls = context.wrap_socket(socket.create_connection(("127.0.0.1", {port}), timeout=40))
start = time.monotonic()
tls.sendall(b"POST /.well-known/est/simpleenroll HTTP/1.1\\r\\nHost: x\\r\\n"
            b"Content-Type: application/pkcs10\\r\\nContent-Length: 70000\\r\\n\\r\\n")
answer = b""
try:
    while True:
        data = tls.recv(4096)
        if not data:
            break
        answer += data
except (OSError, ssl.SSLError):
    pass
print(answer.split(b" ")[1].decode() if answer.startswith(b"HTTP/1.1 ") else "none", time.monotonic() - start)
"""


class BodyLimitTests(WireTestCase):
    config_text = TEST_CONFIG + "server.maxRequestBytes = 2048\n"

    async def test_body_too_large_with_content_length(self) -> None:
        """A body over server.maxRequestBytes, announced by Content-Length, is 413."""
        gateway = await self.start()
        result = await gateway.curl("simpleenroll", b"A" * 5000, user=USER)
        self.assert_refused(result, 413, "exceeds 2048 bytes")
        await self.assert_nothing_issued(gateway)

    async def test_body_too_large_chunked(self) -> None:
        """A chunked body that grows past the limit is 413 too."""
        gateway = await self.start()
        result = await gateway.curl(
            "simpleenroll", b"A" * 5000, user=USER, headers=["Transfer-Encoding: chunked"]
        )
        self.assert_refused(result, 413, "exceeds 2048 bytes")
        await self.assert_nothing_issued(gateway)

    async def test_endless_chunked_body_cut_off(self) -> None:
        """A client that streams a chunked body without end gets 413 as soon
        as the body passes the limit, and the connection is closed: it is
        not read to its end (up to 20 MB are offered here)."""
        gateway = await self.start()
        script = ENDLESS_CHUNKS.format(port=gateway.port, ca=gateway.ca_file)
        result = await run_process([sys.executable, "-c", script])
        status, sent = result.stdout.decode().split()
        # The 413, or (when the client was still sending as the server
        # closed) a reset that discarded it: cut off either way.
        self.assertIn(status, ("413", "none"), result.stderr)
        self.assertLess(int(sent), 20_000_000)  # before the end (socket buffers hold a few MB)
        await self.assert_nothing_issued(gateway)
        # The gateway's side of the connection ends too (on a busy machine
        # a moment after the client's process): nothing of it is left.
        await until(lambda: gateway.service.connection_counts.total == 0, 10, 0.05)
        self.assertEqual(gateway.service.connection_counts.total, 0)

    async def test_announced_body_too_large_closes_at_once(self) -> None:
        """Content-Length over the limit and no body sent: 413 at once, and
        the connection is closed within seconds even though the client
        never sends its TLS close_notify (it held a slot for the whole
        body timeout)."""
        gateway = await self.start()
        result = await run_process([sys.executable, "-c", BIG_LENGTH.format(port=gateway.port, ca=gateway.ca_file)])
        status, seconds = result.stdout.decode().split()
        self.assertEqual(status, "413", result.stderr)
        self.assertLess(float(seconds), 10.0)
        await self.assert_nothing_issued(gateway)

    async def test_body_within_limit(self) -> None:
        """A real CSR below the limit still enrolls (the limit is not off by one)."""
        gateway = await self.start()
        key, der = self.csr_der()
        self.assertLess(len(base64.b64encode(der)), 2048)
        self.assert_issued_for(await gateway.curl("simpleenroll", base64.b64encode(der), user=USER), key)


class RequestEncodingTests(WireTestCase):
    async def test_wrong_content_type(self) -> None:
        """A content type other than application/pkcs10 is 415 naming it."""
        gateway = await self.start()
        _key, der = self.csr_der()
        result = await gateway.curl("simpleenroll", base64.b64encode(der), content_type="text/plain", user=USER)
        self.assert_refused(result, 415, "expected application/pkcs10, got text/plain")
        await self.assert_nothing_issued(gateway)

    async def test_content_type_parameters_and_case(self) -> None:
        """application/PKCS10 with parameters is still PKCS#10."""
        gateway = await self.start()
        key, der = self.csr_der()
        result = await gateway.curl(
            "simpleenroll", base64.b64encode(der), content_type="Application/PKCS10; name=x.p10", user=USER
        )
        self.assert_issued_for(result, key)

    async def test_bad_base64(self) -> None:
        """A body that is not base64 is 400."""
        gateway = await self.start()
        result = await gateway.curl("simpleenroll", b"MII*not base64*", user=USER)
        self.assert_refused(result, 400, "request body is not valid base64")
        await self.assert_nothing_issued(gateway)

    async def test_not_a_csr(self) -> None:
        """Valid base64 of something that is no PKCS#10 is 400."""
        gateway = await self.start()
        result = await gateway.curl("simpleenroll", base64.b64encode(b"\x30\x03\x02\x01\x00 junk"), user=USER)
        self.assert_refused(result, 400, "not a PKCS#10 certification request")
        await self.assert_nothing_issued(gateway)

    async def test_empty_body(self) -> None:
        """An empty POST is 400."""
        gateway = await self.start()
        result = await gateway.curl("simpleenroll", b"", user=USER)
        self.assert_refused(result, 400, "request body is empty")
        await self.assert_nothing_issued(gateway)

    async def test_base64_layouts(self) -> None:
        """Base64 on one line, in 64-column LF lines, in 76-column CRLF lines
        with stray blanks, and without padding: all enroll."""
        gateway = await self.start()
        for layout in (
            lambda b: b,
            lambda b: b"\n".join(b[i:i + 64] for i in range(0, len(b), 64)) + b"\n",
            lambda b: b"  " + b"\r\n".join(b[i:i + 76] for i in range(0, len(b), 76)) + b" \r\n\t",
            lambda b: b.rstrip(b"="),
        ):
            key, der = self.csr_der()
            result = await gateway.curl("simpleenroll", layout(base64.b64encode(der)), user=USER)
            self.assert_issued_for(result, key)
        self.assertEqual(await gateway.store.count_certificates(), 4)

    async def test_pem_csr(self) -> None:
        """A PEM-armoured CSR (what `openssl req` writes) is accepted."""
        gateway = await self.start()
        key = new_key()
        result = await gateway.curl("simpleenroll", csr_pem(make_csr(key, DEVICE)), user=USER)
        self.assert_issued_for(result, key)

    async def test_content_transfer_encoding_ignored(self) -> None:
        """RFC 8951: any Content-Transfer-Encoding request header is ignored;
        the body is read as base64 whatever it says."""
        gateway = await self.start()
        for value in ("binary", "base64", "8bit"):
            key, der = self.csr_der()
            result = await gateway.curl(
                "simpleenroll", base64.b64encode(der), user=USER,
                headers=[f"Content-Transfer-Encoding: {value}"],
            )
            self.assert_issued_for(result, key)

    async def test_chunked_request_body(self) -> None:
        """A chunked request body is read whole."""
        gateway = await self.start()
        key, der = self.csr_der()
        result = await gateway.curl(
            "simpleenroll", base64.b64encode(der), user=USER, headers=["Transfer-Encoding: chunked"]
        )
        self.assert_issued_for(result, key)


class ResponseTests(WireTestCase):
    async def test_cacerts_chain(self) -> None:
        """cacerts: exactly application/pkcs7-mime, base64 in lines, the whole
        chain (issuing CA and root), also under a label."""
        gateway = await self.start()
        expected = {c.fingerprint(c.signature_hash_algorithm) for c in gateway.service.state.ca.chain()}
        for path in ("cacerts", "lab/cacerts"):
            result = await gateway.curl(path)
            self.assert_wire(result, 200)
            self.assertEqual(result.headers["content-type"], "application/pkcs7-mime")
            self.assertTrue(all(len(line) <= 64 for line in result.body.split(b"\n")))
            certs = decode_certs_only(result.body)
            self.assertEqual(len(certs), 2)
            self.assertEqual({c.fingerprint(c.signature_hash_algorithm) for c in certs}, expected)
        subjects = {c.subject.rfc4514_string() for c in certs}
        self.assertEqual(subjects, {"CN=estgw Root CA,O=estgw", "CN=estgw Issuing CA,O=estgw"})

    async def test_csrattrs(self) -> None:
        """csrattrs: application/csrattrs, base64 of the DER CsrAttrs of the
        handler's configured attributes."""
        gateway = await self.start()
        result = await gateway.curl("csrattrs")
        self.assert_wire(result, 200)
        self.assertEqual(result.headers["content-type"], "application/csrattrs")
        self.assertEqual(base64.b64decode(result.body)[:1], b"\x30")
        self.assertEqual(decode_csrattrs(result.body), gateway.config.handler("", "csrattrs").csrattrs)

    async def test_csrattrs_none_configured(self) -> None:
        """A csrattrs handler without attributes answers 204 No Content."""
        gateway = await self.start()
        self.assert_wire(await gateway.curl("lab/csrattrs"), 204)

    async def test_enroll_content_type(self) -> None:
        """simpleenroll answers exactly application/pkcs7-mime; smime-type=certs-only."""
        gateway = await self.start()
        key, der = self.csr_der()
        self.assert_issued_for(await gateway.curl("lab/simpleenroll", base64.b64encode(der), user=USER), key)


class HTTP10Tests(WireTestCase):
    async def test_http10_cacerts(self) -> None:
        """An HTTP/1.0 client (which offers ALPN http/1.0) gets a TLS
        connection and a complete response with Content-Length."""
        gateway = await self.start()
        result = await gateway.curl("cacerts", extra=["--http1.0"])
        self.assert_wire(result, 200)
        self.assertEqual(len(decode_certs_only(result.body)), 2)

    async def test_http10_enroll_and_refusal(self) -> None:
        """HTTP/1.0 POST enrolls, and an HTTP/1.0 refusal has its Content-Length."""
        gateway = await self.start()
        key, der = self.csr_der()
        result = await gateway.curl("simpleenroll", base64.b64encode(der), user=USER, extra=["--http1.0"])
        self.assert_issued_for(result, key)
        self.assert_refused(await gateway.curl("nolabel/cacerts", extra=["--http1.0"]), 404, "no CA label")
        self.assert_wire(await gateway.curl("lab/csrattrs", extra=["--http1.0"]), 204)


class ProtectedCacertsTests(WireTestCase):
    """A cacerts (or csrattrs) handler with filter clientcert serves only
    clients that present a trusted certificate, as its filter says."""

    config_text = TEST_CONFIG + """\
handler.30.operation = cacerts
handler.30.label = private
handler.30.filter = clientcert
handler.31.operation = csrattrs
handler.31.label = private
handler.31.filter = clientcert
"""

    async def test_certificate_required(self) -> None:
        """Without a client certificate: 403 client-certificate-required;
        with one of this gateway's: 200; the public label stays public."""
        from tests.test_auth import directory_for, gateway_certificate

        gateway = await self.start()
        for operation in ("cacerts", "csrattrs"):
            self.assert_refused(
                await gateway.curl(f"private/{operation}"), 403, "TLS client certificate issued by a trusted CA"
            )
        client = gateway_certificate(gateway, directory_for(self), "pump-17")
        result = await gateway.curl("private/cacerts", **client.curl)
        self.assert_wire(result, 200)
        self.assertTrue(decode_certs_only(result.body))
        self.assert_wire(await gateway.curl("cacerts"), 200)
