"""``tokenprocedure.<n>.ca = est``: a second estgw as the upstream CA.

The downstream gateway is an RA: it checks the device (curl, Basic), then
forwards the request over TLS with the RA's client certificate (PKCS#12)
to the upstream's officer handler (requiredRoRoles = ra).  openssl
verifies what the upstream issued against the cacerts the downstream
serves.  A small stub upstream shows 202 and broken answers.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, pkcs12
from twisted.internet import defer, reactor
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web import resource, server
from twisted.trial.unittest import TestCase

from estgw.ca import IssueRequest, Profile
from estgw.config import ConfigError, from_string
from estgw.passwords import hash_password
from estgw.protocol import encode_certs_only
from estgw.store import Device
from estgw.testing import RunningGateway, cert_pem, make_csr, name, new_key, run_process, write
from estgw.tls import server_context_factory
from tests.test_auth import gateway_certificate, run_cli
from tests.test_e2e import Client

DEVICE, PASSWORD = "pump-7", "ra pass 7"
RA_PASSWORD = "p12 secret"

UPSTREAM_CONFIG = """\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
ca.name = upstream
tokenprocedure.1.name = Upstream CA
tokenprocedure.1.validity.days = 30
default.tokenprocedure = Upstream CA
handler.1.operation = cacerts
handler.1.label = ra
handler.2.operation = simpleenroll
handler.2.label = ra
handler.2.filter = clientcert
handler.2.requiredRoRoles = ra
"""

DOWNSTREAM_CONFIG = """\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
ca.name = downstream
tls.trustAnchors = {client_anchors}
tokenprocedure.1.name = Upstream EST
tokenprocedure.1.ca = est
tokenprocedure.1.est.url = {url}
tokenprocedure.1.est.token = {token}
tokenprocedure.1.est.tokenPasswordFile = {password_file}
tokenprocedure.1.est.trustAnchors = {anchors}
default.tokenprocedure = Upstream EST
handler.1.operation = cacerts
handler.2.operation = simpleenroll
handler.2.authtype = Basic
handler.2.realm = devices
handler.3.operation = simplereenroll
handler.3.clientCertificateIssuers = any
"""


def ra_token(upstream: RunningGateway, directory: str) -> tuple[str, str, Any]:
    """A PKCS#12 RA token issued by the upstream's CA, and its password file."""
    credentials = gateway_certificate(upstream, directory, "ra-gateway")
    data = pkcs12.serialize_key_and_certificates(
        b"ra", credentials.key, credentials.cert, None, BestAvailableEncryption(RA_PASSWORD.encode())
    )
    token = write(os.path.join(directory, "ra.p12"), data)
    password_file = write(os.path.join(directory, "ra.pass"), RA_PASSWORD.encode() + b"\n")
    return token, password_file, credentials


class UpstreamTestCase(TestCase):
    async def start_upstream(self) -> RunningGateway:
        self.upstream = await RunningGateway.start(self, UPSTREAM_CONFIG)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.token, self.password_file, self.ra = ra_token(self.upstream, self.directory)
        cert_path = write(os.path.join(self.directory, "ra.pem"), cert_pem(self.ra.cert))
        await run_cli(self.upstream, "officer", "add", "--cert", cert_path, "--role", "ra")
        return self.upstream

    async def start_downstream(self, url: str, anchors: str | None = None) -> RunningGateway:
        # Devices renew with what the upstream issued: its CAs are trusted.
        client_anchors = write(
            os.path.join(self.directory, "upstream-cas.pem"), cert_pem(*self.upstream.service.state.ca.chain())
        )
        text = DOWNSTREAM_CONFIG.format(
            url=url, token=self.token, password_file=self.password_file,
            anchors=anchors or self.upstream.ca_file, client_anchors=client_anchors,
        )
        self.downstream = await RunningGateway.start(self, text)
        await self.downstream.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        self.procedure = self.downstream.service.state.procedures["Upstream EST"]
        await self.procedure.refresh()  # the first cacerts fetch, started at start-up
        self.client = Client(self, self.downstream, "device")
        return self.downstream

    async def counts(self) -> tuple[int, int]:
        return (
            await self.upstream.store.count_certificates(),
            await self.downstream.store.count_certificates(),
        )


class EndToEndTests(UpstreamTestCase):
    async def setUp(self) -> None:
        await self.start_upstream()
        await self.start_downstream(self.upstream.url("ra"))

    async def test_enroll_through_upstream(self) -> None:
        """curl enrolls at the downstream; the upstream issues (recording the
        RA as requester); the downstream records the same certificate;
        openssl verifies it against the downstream's cacerts, which is the
        upstream's chain."""
        chain_pem = await self.client.cacerts()
        chain = x509.load_pem_x509_certificates(open(chain_pem, "rb").read())
        self.assertEqual(set(chain), set(self.upstream.service.state.ca.chain()))
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        issued_pem = await self.client.certificates(result.body)
        await self.client.verify(issued_pem, chain_pem)
        (issued,) = x509.load_pem_x509_certificates(open(issued_pem, "rb").read())
        self.assertEqual(issued.issuer, self.upstream.service.state.ca.issuing.subject)
        upstream_records = await self.upstream.store.list_certificates()
        downstream_records = await self.downstream.store.list_certificates()
        self.assertEqual([r.serial for r in upstream_records], [issued.serial_number])
        self.assertEqual([r.serial for r in downstream_records], [issued.serial_number])
        self.assertTrue(upstream_records[0].requester.startswith("officer:CN=ra-gateway"))
        self.assertEqual(downstream_records[0].requester, f"device:{DEVICE}")

    async def test_renew_through_upstream(self) -> None:
        """The device renews with the certificate the upstream issued
        (simplereenroll, TLS client certificate): the upstream issues a
        second one.  Once that first certificate is revoked here it renews
        nothing: 403, no new certificate on either side."""
        key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        cert_path = await self.client.certificates(result.body)
        _new_key, renewal = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simplereenroll", renewal, cert=cert_path, key=key)
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await self.counts(), (2, 2))
        (first,) = x509.load_pem_x509_certificates(open(cert_path, "rb").read())
        await self.downstream.store.revoke_certificate(first.serial_number, "keyCompromise")
        _again_key, again = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simplereenroll", again, cert=cert_path, key=key)
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("the TLS client certificate has been revoked", result.text)
        self.assertEqual(await self.counts(), (2, 2))

    async def test_own_checks_run_before_forwarding(self) -> None:
        """A request the downstream's own checks refuse never reaches the
        upstream: a wrong password (401) and another device's subject (403)."""
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:wrong")
        self.assertEqual(result.status, 401, result.text)
        _key, other = await self.client.key_and_csr("/CN=someone-else")
        result = await self.client.enroll("simpleenroll", other, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 403, result.text)
        self.assertEqual(await self.counts(), (0, 0))

    async def test_upstream_refusal_passed_back(self) -> None:
        """The upstream withdraws the RA's role: its 403 and reason text
        reach the device; nothing is issued on either side."""
        cert_path = os.path.join(self.directory, "ra.pem")
        await run_cli(self.upstream, "officer", "remove", "--cert", cert_path, "--role", "ra")
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("the upstream CA refused the request:", result.text)
        self.assertIn("officer roles ra", result.text)
        self.assertEqual(await self.counts(), (0, 0))


class ReadmeTests(UpstreamTestCase):
    async def test_readme_example(self) -> None:
        """README.rst's ca = est example loads as written; with its URL
        pointed at a second estgw (and any free port) curl enrolls
        through it and openssl verifies the certificate."""
        import shutil

        import attr

        from tests.softhsm import readme_example

        await self.start_upstream()
        text = readme_example("A complete configuration (``tests/test_upstream.py``")
        self.assertIn("tokenprocedure.1.ca = est", text)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "ra"))
        shutil.copy(self.token, os.path.join(directory, "ra", "ra.p12"))
        shutil.copy(self.password_file, os.path.join(directory, "ra", "ra.pass"))
        shutil.copy(self.upstream.ca_file, os.path.join(directory, "ra", "upstream-root.pem"))
        write(os.path.join(directory, "ra", "upstream-cas.pem"), cert_pem(*self.upstream.service.state.ca.chain()))
        gateway = RunningGateway(directory, text)
        procedure = gateway.config.token_procedures["Upstream CA"]
        self.assertEqual(procedure.est_url, "https://ca.example.net:8443/.well-known/est/ra")
        gateway.config = attr.evolve(
            gateway.config, port=0, interface="127.0.0.1",
            token_procedures={"Upstream CA": attr.evolve(procedure, est_url=self.upstream.url("ra"))},
        )
        await gateway.run()
        self.addCleanup(gateway.stop)
        await gateway.service.state.procedures["Upstream CA"].refresh()
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        client = Client(self, gateway, "device")
        chain_pem = await client.cacerts()
        key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        cert_path = await client.certificates(result.body)
        await client.verify(cert_path, chain_pem)
        _renewed_key, renewal = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simplereenroll", renewal, cert=cert_path, key=key)
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await gateway.store.count_certificates(), 2)


class TrustTests(UpstreamTestCase):
    async def test_upstream_not_trusted(self) -> None:
        """An upstream whose certificate the trust anchors do not vouch for
        is not talked to: 503, and cacerts is 503 until it is known."""
        await self.start_upstream()
        other = await RunningGateway.start(self, UPSTREAM_CONFIG)  # another CA
        await self.start_downstream(self.upstream.url("ra"), anchors=other.ca_file)
        result = await self.downstream.curl("cacerts")
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.headers.get("retry-after"), "30")
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 503, result.text)
        self.assertIn("TLS failure", result.text)
        self.assertEqual(await self.counts(), (0, 0))


class StubUpstream(resource.Resource):
    """An EST server that answers what the test says, and records requests."""

    isLeaf = True

    def __init__(self, ca: Any) -> None:
        super().__init__()
        self.ca = ca
        self.requests: list[bytes] = []
        self.answers: list[Any] = []  # callables (request, body) -> bytes, or a Deferred-returning one

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/pkcs7-mime")
        return encode_certs_only(self.ca.chain())

    def render_POST(self, request: Any) -> Any:
        body = request.content.read()
        self.requests.append(body)
        answer = self.answers.pop(0)
        result = answer(request, body)
        if isinstance(result, defer.Deferred):
            def finish(data: bytes) -> None:
                request.write(data)
                request.finish()

            result.addCallback(finish)
            return server.NOT_DONE_YET
        return result


class TrackingSite(server.Site):
    """A Site that knows its open connections, so a test can close them."""

    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.connections: set[Any] = set()

    def buildProtocol(self, addr: Any) -> Any:
        protocol = super().buildProtocol(addr)
        site = self
        lost = protocol.connectionLost

        def connection_lost(reason: Any) -> None:
            site.connections.discard(protocol)
            lost(reason)

        protocol.connectionLost = connection_lost
        self.connections.add(protocol)
        return protocol


class StubTests(UpstreamTestCase):
    async def setUp(self) -> None:
        await self.start_upstream()
        ca = self.upstream.service.state.ca
        key, cert = ca.server_credentials(os.path.join(self.directory, "stub-tls"), ["127.0.0.1"])
        self.stub = StubUpstream(ca)
        options = server_context_factory(key, cert, [ca.issuing], ca.chain())
        self.site = TrackingSite(self.stub)
        endpoint = SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1")
        self.port = await endpoint.listen(self.site)
        self.addCleanup(self.stop_stub)
        port_number = self.port.getHost().port
        await self.start_downstream(f"https://127.0.0.1:{port_number}/.well-known/est")

    async def stop_stub(self) -> None:
        """Stop listening and wait (bounded) until every connection is gone."""
        await defer.maybeDeferred(self.port.stopListening)
        for connection in list(self.site.connections):
            transport = getattr(connection, "transport", None)
            if transport is None:  # built, never connected
                self.site.connections.discard(connection)
            else:
                transport.loseConnection()
        for _ in range(500):
            if not self.site.connections:
                return
            await deferLater(0.01)

    def issue_for(self, body: bytes) -> bytes:
        import base64

        csr = x509.load_der_x509_csr(base64.b64decode(body))
        cert = self.upstream.service.state.ca.sign(IssueRequest(csr.subject, csr.public_key()), Profile())
        return encode_certs_only([cert])

    async def test_202_then_issued_once(self) -> None:
        """The upstream says 202 (Retry-After 7): the device gets 202 with
        Retry-After 7 and nothing is recorded; its retry forwards the
        identical request and gets the certificate; one record."""
        def pending(request: Any, body: bytes) -> bytes:
            request.setResponseCode(202)
            request.setHeader(b"retry-after", b"7")
            return b"waiting for an operator"

        def issued(request: Any, body: bytes) -> bytes:
            request.setHeader(b"content-type", b"application/pkcs7-mime; smime-type=certs-only")
            return self.issue_for(body)

        self.stub.answers = [pending, issued]
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        first = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(first.status, 202, first.text)
        self.assertEqual(first.headers.get("retry-after"), "7")
        self.assertIn("waiting for an operator", first.text)
        self.assertEqual(await self.downstream.store.count_certificates(), 0)
        second = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(second.status, 200, second.text)
        self.assertEqual(len(self.stub.requests), 2)
        self.assertEqual(self.stub.requests[0], self.stub.requests[1])
        self.assertEqual(await self.downstream.store.count_certificates(), 1)

    async def test_identical_requests_share_one_upstream_call(self) -> None:
        """Two identical requests at once (a device retrying while the first
        is on its way): one upstream call, both get the same certificate."""
        gate: defer.Deferred = defer.Deferred()

        def slow(request: Any, body: bytes) -> defer.Deferred:
            return gate.addCallback(lambda _: self.issue_for(body))

        self.stub.answers = [slow]
        key = new_key()
        csr = make_csr(key, DEVICE).public_bytes(Encoding.DER)
        request = IssueRequest(name(DEVICE), key.public_key(), csr=csr)
        first = self.procedure.issue(request)
        second = self.procedure.issue(request)
        for _ in range(1000):
            if self.stub.requests:
                break
            await deferLater(0.01)
        gate.callback(None)
        one, two = await defer.gatherResults([first, second])
        self.assertEqual(one, two)
        self.assertEqual(len(self.stub.requests), 1)

    async def test_identical_requests_over_tls(self) -> None:
        """A device sends its request again while the first is still with the
        upstream (curl twice at once): one upstream call, both get the same
        certificate, and it is recorded once."""
        gate: defer.Deferred = defer.Deferred()

        def slow(request: Any, body: bytes) -> defer.Deferred:
            return gate.addCallback(lambda _: self.issue_for(body))

        self.stub.answers = [slow]
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        first = defer.Deferred.fromCoroutine(self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}"))
        for _ in range(1000):
            if self.stub.requests:
                break
            await deferLater(0.01)
        second = defer.Deferred.fromCoroutine(self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}"))
        for _ in range(1000):  # until the second waits on the first's upstream call
            if [len(w) for w in self.procedure._in_flight.values()] == [2]:
                break
            await deferLater(0.01)
        gate.callback(None)
        one, two = await defer.gatherResults([first, second])
        self.assertEqual((one.status, two.status), (200, 200), (one.text, two.text))
        self.assertEqual(one.body, two.body)
        self.assertEqual(len(self.stub.requests), 1)
        self.assertEqual(await self.downstream.store.count_certificates(), 1)

    async def test_upstream_answers_again_with_the_same_certificate(self) -> None:
        """An upstream that answers a repeated request with the certificate it
        issued before: the device gets it again, nothing new is recorded."""
        answer: list[bytes] = []

        def once(request: Any, body: bytes) -> bytes:
            if not answer:
                answer.append(self.issue_for(body))
            return answer[0]

        self.stub.answers = [once, once]
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        first = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        second = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual((first.status, second.status), (200, 200), (first.text, second.text))
        self.assertEqual(first.body, second.body)
        self.assertEqual(len(self.stub.requests), 2)
        self.assertEqual(await self.downstream.store.count_certificates(), 1)

    async def test_answer_for_another_key(self) -> None:
        """An upstream answer that certifies another key is not delivered: 502, nothing recorded."""
        def wrong(request: Any, body: bytes) -> bytes:
            other = new_key()
            cert = self.upstream.service.state.ca.sign(IssueRequest(name(DEVICE), other.public_key()), Profile())
            return encode_certs_only([cert])

        self.stub.answers = [wrong]
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 502, result.text)
        self.assertIn("no certificate for the request's key", result.text)
        self.assertEqual(await self.downstream.store.count_certificates(), 0)

    async def refused_502(self, reason: str) -> None:
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 502, result.text)
        self.assertIn(reason, result.text)
        self.assertEqual(await self.downstream.store.count_certificates(), 0)

    def upstream_certificate(self, body: bytes, **changes: Any) -> bytes:
        """What the stub upstream answers: a certificate for the request's
        key, signed by the upstream's CA, made as ``changes`` say."""
        import base64
        from datetime import datetime, timedelta, timezone

        from cryptography.hazmat.primitives import hashes

        csr = x509.load_der_x509_csr(base64.b64decode(body))
        ca = self.upstream.service.state.ca
        now = datetime.now(timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.issuing.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(changes.get("not_before", now - timedelta(minutes=1)))
            .not_valid_after(changes.get("not_after", now + timedelta(days=30)))
        )
        for extension in changes.get("extensions", []):
            builder = builder.add_extension(extension, critical=True)
        return encode_certs_only([builder.sign(ca._issuing_key, hashes.SHA256())])

    async def test_not_an_end_entity_certificate(self) -> None:
        """An upstream answer for the request's key that is a CA certificate,
        may sign certificates, or is not valid now is not delivered: 502,
        nothing recorded."""
        from datetime import datetime, timedelta, timezone

        now = datetime.now(timezone.utc)
        usage = dict(digital_signature=True, content_commitment=False, key_encipherment=False,
                     data_encipherment=False, key_agreement=False, crl_sign=False,
                     encipher_only=False, decipher_only=False)
        for changes, reason in (
            (dict(extensions=[x509.BasicConstraints(ca=True, path_length=None)]), "basicConstraints cA TRUE"),
            (dict(extensions=[x509.KeyUsage(key_cert_sign=True, **usage)]), "allows signing certificates"),
            (dict(not_before=now - timedelta(days=60), not_after=now - timedelta(days=1)), "it expired"),
            (dict(not_before=now + timedelta(days=1)), "it is not valid before"),
        ):
            self.stub.answers = [lambda request, body, changes=changes: self.upstream_certificate(body, **changes)]
            await self.refused_502(reason)

    async def test_answer_too_large(self) -> None:
        """An upstream answer over MAX_ANSWER bytes (with Content-Length, or
        chunked) is dropped unread: 502, nothing recorded."""
        from estgw.ca.upstream import MAX_ANSWER

        def declared(request: Any, body: bytes) -> bytes:
            return b"x" * (MAX_ANSWER + 1)

        def chunked(request: Any, body: bytes) -> Any:
            for _ in range(MAX_ANSWER // 65536 + 2):
                request.write(b"x" * 65536)
            request.finish()
            return server.NOT_DONE_YET

        for answer in (declared, chunked):
            self.stub.answers = [answer]
            await self.refused_502(f"larger than {MAX_ANSWER} bytes")

    async def test_upstream_goes_away(self) -> None:
        """The upstream stops: enrollment is 503 with Retry-After and nothing
        is recorded; the cached cacerts is still served."""
        chain_pem = await self.client.cacerts()
        await self.stop_stub()
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.headers.get("retry-after"), "60")
        self.assertIn("the upstream CA cannot be reached", result.text)
        self.assertEqual(self.stub.requests, [])
        self.assertEqual(await self.downstream.store.count_certificates(), 0)
        self.assertEqual(open(await self.client.cacerts(), "rb").read(), open(chain_pem, "rb").read())

    async def test_upstream_server_error(self) -> None:
        """A 500 from the upstream is 503 with Retry-After for the device."""
        def broken(request: Any, body: bytes) -> bytes:
            request.setResponseCode(500)
            return b"database down"

        self.stub.answers = [broken]
        _key, csr = await self.client.key_and_csr(f"/CN={DEVICE}")
        result = await self.client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 503, result.text)
        self.assertIn("answered 500 (database down)", result.text)
        self.assertEqual(result.headers.get("retry-after"), "60")
        self.assertEqual(await self.downstream.store.count_certificates(), 0)


def deferLater(seconds: float) -> defer.Deferred:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class ConfigTests(TestCase):
    def test_url_must_be_an_est_base(self) -> None:
        for url, reason in (
            ("http://ca.example/.well-known/est", "expected an https URL"),
            ("https://ca.example/est", "expected the path /.well-known/est"),
            ("https://ca.example/.well-known/est/a/b", "expected the path"),
            ("https://ca.example/.well-known/est?x=1", "without query"),
        ):
            with self.assertRaises(ConfigError) as caught:
                from_string(f"tokenprocedure.1.name = p\ntokenprocedure.1.ca = est\ntokenprocedure.1.est.url = {url}\n")
            self.assertEqual(caught.exception.key, "tokenprocedure.1.est.url")
            self.assertIn(reason, caught.exception.reason)

    def test_token_required(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_string("tokenprocedure.1.name = p\ntokenprocedure.1.ca = est\n"
                        "tokenprocedure.1.est.url = https://ca.example/.well-known/est/ra\n")
        self.assertEqual(caught.exception.key, "tokenprocedure.1.est.token")

    def test_est_keys_need_ca_est(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_string("tokenprocedure.1.name = p\ntokenprocedure.1.est.url = https://ca.example/.well-known/est\n")
        self.assertIn("only for ca = est, not local", caught.exception.reason)


class StartTests(UpstreamTestCase):
    async def test_wrong_token_password_stops_start(self) -> None:
        """A PKCS#12 password that does not open the token stops start-up, naming the key."""
        from twisted.python import usage

        from estgw.config import load
        from estgw.tap import GatewayService

        await self.start_upstream()
        write(self.password_file, b"not it\n")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(os.path.join(directory, "est.properties"), DOWNSTREAM_CONFIG.format(
            url=self.upstream.url("ra"), token=self.token, password_file=self.password_file,
            anchors=self.upstream.ca_file, client_anchors=self.upstream.ca_file,
        ).encode())
        with self.assertRaises(usage.UsageError) as caught:
            GatewayService(load(path), reactor)
        self.assertIn("tokenprocedure.1.est.tokenPasswordFile: cannot open", str(caught.exception))



class _FakeResponse:
    def __init__(self, code: int, body: bytes) -> None:
        from twisted.web.http_headers import Headers

        self.code = code
        self.headers = Headers()
        self._body = body

    @property
    def length(self) -> int:
        return len(self._body)

    def deliverBody(self, protocol: Any) -> None:
        from twisted.internet.testing import StringTransport
        from twisted.web.client import ResponseDone
        from twisted.python.failure import Failure

        protocol.makeConnection(StringTransport())
        protocol.dataReceived(self._body)
        protocol.connectionLost(Failure(ResponseDone()))


class _FakeHTTP:
    """Answers GET /cacerts from a list; records the URLs asked."""

    def __init__(self, answers: list[tuple[int, bytes]]) -> None:
        self.answers = answers
        self.urls: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> defer.Deferred:
        self.urls.append(url)
        code, body = self.answers.pop(0)
        return defer.succeed(_FakeResponse(code, body))


class CacertsRefreshTests(TestCase):
    def test_fetched_on_use_and_refreshed_when_stale(self) -> None:
        """chain() starts a fetch when none succeeded yet, keeps the answer
        for CACERTS_REFRESH seconds, then fetches again; a failed fetch
        keeps the last good chain and is retried after CACERTS_RETRY."""
        from twisted.internet.task import Clock

        from estgw.ca import LocalCA
        from estgw.ca.upstream import CACERTS_REFRESH, CACERTS_RETRY, UpstreamEST

        first = LocalCA.load_or_create(os.path.abspath(self.mktemp()), "first")
        second = LocalCA.load_or_create(os.path.abspath(self.mktemp()), "second")
        http = _FakeHTTP([
            (200, encode_certs_only(first.chain())),
            (503, b"busy"),
            (200, encode_certs_only(second.chain())),
        ])
        clock = Clock()
        upstream = UpstreamEST("u", "https://ca.example/.well-known/est/ra", http, clock)
        # The first use fetches (here the fake answers at once).
        self.assertEqual(upstream.chain(), [first.issuing, first.root])
        self.assertEqual(upstream.chain(), [first.issuing, first.root])
        clock.advance(CACERTS_REFRESH - 1)
        upstream.chain()
        self.assertEqual(len(http.urls), 1)
        clock.advance(1)
        self.assertEqual(upstream.chain(), [first.issuing, first.root])  # 503: the old one stays
        self.assertEqual(len(http.urls), 2)
        clock.advance(CACERTS_RETRY - 1)
        upstream.chain()
        self.assertEqual(len(http.urls), 2)
        clock.advance(1)
        upstream.chain()
        self.assertEqual(upstream.chain(), [second.issuing, second.root])
        self.assertEqual(http.urls, ["https://ca.example/.well-known/est/ra/cacerts"] * 3)


class InitTests(UpstreamTestCase):
    async def test_init_reports_the_upstream(self) -> None:
        """``estgw init`` with a ca = est token procedure fetches the
        upstream's /cacerts and names its issuing CA; with the upstream
        unreachable it says so plainly and succeeds (the gateway fetches
        again when it runs): no traceback either way."""
        import sys

        from tests.test_publish import free_port
        from tests.test_twistd import environment

        await self.start_upstream()
        client_anchors = write(os.path.join(self.directory, "upstream-cas.pem"),
                               cert_pem(*self.upstream.service.state.ca.chain()))
        closed = free_port()
        for url, says in (
            (f"https://127.0.0.1:{self.upstream.port}/.well-known/est/ra",
             "issuing CA " + self.upstream.service.state.ca.issuing.subject.rfc4514_string()),
            (f"https://127.0.0.1:{closed}/.well-known/est",
             "its CA certificates could not be fetched now ("),
        ):
            directory = os.path.abspath(self.mktemp())
            os.makedirs(directory)
            config = write(os.path.join(directory, "est.properties"), DOWNSTREAM_CONFIG.format(
                url=url, token=self.token, password_file=self.password_file, anchors=self.upstream.ca_file,
                client_anchors=client_anchors,
            ).encode())
            done = await run_process([sys.executable, "-m", "estgw.cli", "--config", config, "init"],
                                     env=environment())
            out, err = done.stdout.decode(), done.stderr.decode()
            self.assertEqual(done.code, 0, err)
            self.assertIn(f"token procedure 'Upstream EST' (ca = est): upstream {url}", out)
            self.assertIn(says, out)
            self.assertNotIn("Traceback", out + err)
