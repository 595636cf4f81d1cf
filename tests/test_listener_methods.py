"""Every method at every path of every HTTP listener, over real sockets on
127.0.0.1: the EST listener (TLS), the metrics and health listener, the
publishing listener (CRL, OCSP, CA certificates) and the reference
approval service (TLS with an operator's client certificate).

Whatever a client sends, the answer is framed by a Content-Length, below
500, and never one of twisted.web's HTML pages: a wrong method is 405 with
Allow and a one-line plain-text reason, a path that is not served is a
plain-text 404, input that cannot be read is a plain-text 4xx.  The only
5xx is 501 to ``POST .../fullcmc``, which this gateway does not offer
(RFC 7030 §4.3, README "Every refusal").
"""

from __future__ import annotations

import base64
import os
from typing import Any, Sequence
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from estgw.approval.testing import RunningApprovalService
from estgw.testing import TEST_CONFIG, RunningGateway, _which, run_process

METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE", b"CONNECT", b"FOO")
PROCEDURE = "Test Procedure"
#: Connections open at once while a listener is swept.
AT_ONCE = 8


class _Exchange(protocol.Protocol):
    """Sends one request and keeps everything until the server closes."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = b""
        self.closed: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.closed.callback(self.received)


class Answer:
    """One HTTP/1.1 response, split by its Content-Length."""

    def __init__(self, method: bytes, target: bytes, raw: bytes) -> None:
        self.method, self.target, self.raw = method, target, raw
        head, separator, rest = raw.partition(b"\r\n\r\n")
        if not separator:
            raise AssertionError(f"{self}: not an HTTP response: {raw[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ", 2)[1])
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            self.headers[key.strip().lower()] = value.strip()
        self.body = rest

    def __str__(self) -> str:
        return f"{self.method.decode()} {self.target.decode('latin-1')}"


async def exchange(endpoint: Any, method: bytes, target: bytes, body: bytes = b"") -> Answer:
    """``method target`` over a new connection to ``endpoint`` (with a body
    for the methods that usually carry one), read until the server closes;
    at most 20 s."""
    head = [b"%s %s HTTP/1.1" % (method, target), b"Host: 127.0.0.1", b"Connection: close"]
    if method not in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"CONNECT"):
        head.append(b"Content-Length: %d" % len(body))
    else:
        body = b""
    client = _Exchange(b"\r\n".join(head) + b"\r\n\r\n" + body)
    await connectProtocol(endpoint, client).addTimeout(10, reactor)
    raw = await client.closed.addTimeout(20, reactor)
    return Answer(method, target, raw)


class ListenerMethodTests(TestCase):
    """Every method at every path; what each listener answers."""

    timeout = 240

    def tcp(self, port: int) -> Any:
        return TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=10)

    async def sweep(self, endpoint: Any, targets: Sequence[bytes], json_under: bytes | None = None,
                    body: bytes = b"") -> list[Answer]:
        """Every method of METHODS at every target, AT_ONCE at a time; each
        answer checked (:meth:`assertWellFormed`)."""
        pending = [(method, target) for target in targets for method in METHODS]
        answers: list[Answer] = []
        while pending:
            batch, pending = pending[:AT_ONCE], pending[AT_ONCE:]
            answers += await defer.gatherResults(
                [defer.Deferred.fromCoroutine(exchange(endpoint, m, t, body)) for m, t in batch],
                consumeErrors=True,
            )
        problems = []
        for answer in answers:
            try:
                self.assertWellFormed(answer, json_under)
            except self.failureException as e:
                problems.append(str(e))
        if problems:
            self.fail(f"{len(problems)} of {len(answers)} answers:\n" + "\n".join(problems))
        return answers

    def assertWellFormed(self, answer: Answer, json_under: bytes | None = None) -> None:
        """Below 500 (but 501 to POST fullcmc), a Content-Length matching the
        body (none to HEAD), no HTML; an error is one plain-text line (JSON
        ``{"error": ...}`` below the approval API ``json_under``); a 405
        says what is allowed, and not the method used."""
        where = f"{answer}: {answer.status} {answer.headers} {answer.body[:300]!r}"
        fullcmc = answer.method == b"POST" and answer.target.endswith(b"/fullcmc")
        self.assertTrue(answer.status < 500 or (fullcmc and answer.status == 501), where)
        self.assertNotIn(b"<html", answer.body.lower(), where)
        self.assertNotIn("transfer-encoding", answer.headers, where)
        self.assertIn("content-length", answer.headers, where)
        if answer.method == b"HEAD":
            self.assertEqual(answer.body, b"", where)
        else:
            self.assertEqual(int(answer.headers["content-length"]), len(answer.body), where)
        if answer.status < 400 or (answer.status == 401 and not answer.body):
            return  # a success, or a bare 401 challenge (README "Every refusal")
        content_type = answer.headers.get("content-type", "")
        if json_under is not None and answer.target.startswith(json_under):
            self.assertEqual(content_type, "application/json", where)
        else:
            self.assertEqual(content_type, "text/plain; charset=utf-8", where)
            if answer.method != b"HEAD":
                self.assertRegex(answer.body.decode("utf-8"), r"\A[^\n]+\n\Z", where)
        if answer.status == 405:
            allowed = [m.strip().encode() for m in answer.headers.get("allow", "").split(",")]
            self.assertTrue(allowed and allowed != [b""], where)
            self.assertNotIn(answer.method, allowed, where)

    def assertStatuses(self, answers: Sequence[Answer], target: bytes, expected: dict[bytes, int]) -> None:
        """The status of each method in ``expected`` at ``target``."""
        got = {a.method: a.status for a in answers if a.target == target and a.method in expected}
        self.assertEqual(got, expected, target)

    async def test_gateway_listeners(self) -> None:
        """The EST, metrics and publishing listeners of one gateway."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "metrics.port = 0\npublish.port = 0\npublish.interface = 127.0.0.1\n"
        )
        metrics = self.tcp(gateway.service.metrics_ports[0].getHost().port)
        publish = self.tcp(gateway.service.publish_ports[0].getHost().port)
        with open(gateway.ca_file, "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        est = wrapClientTLS(optionsForClientTLS("localhost", trustRoot=anchor), self.tcp(gateway.port))

        health = [b"/health", b"/health/", b"/health/live", b"/health/ready", b"/health/live/x", b"/health/nope"]
        est_paths = [b"/", b"/nope", b"/.well-known", b"/.well-known/est", b"/.well-known/est/nope",
                     b"/.well-known/est/lab/cacerts", b"/.well-known/est/nolabel/cacerts", b"*",
                     b"127.0.0.1:443"] + [
            b"/.well-known/est/" + op for op in (b"cacerts", b"csrattrs", b"simpleenroll", b"simplereenroll",
                                                 b"serverkeygen", b"fullcmc")]
        answers = await self.sweep(est, est_paths + health)
        self.assertStatuses(answers, b"/.well-known/est/cacerts",
                            {b"GET": 200, b"HEAD": 200, b"POST": 405, b"FOO": 405, b"TRACE": 405})
        self.assertStatuses(answers, b"/.well-known/est/simpleenroll", {b"GET": 405, b"DELETE": 405})
        self.assertStatuses(answers, b"/health/ready", {b"GET": 200, b"HEAD": 200, b"DELETE": 405, b"FOO": 405})

        answers = await self.sweep(metrics, [b"/", b"/nope", b"/metrics", b"/metrics/", b"/metrics/x",
                                             b"127.0.0.1:80", b"*"] + health)
        self.assertStatuses(answers, b"/metrics", {
            b"GET": 200, b"HEAD": 200, b"POST": 405, b"DELETE": 405, b"FOO": 405, b"OPTIONS": 405,
            b"CONNECT": 405,
        })
        self.assertStatuses(answers, b"/metrics/x", {b"GET": 404})
        self.assertEqual(
            [a.headers["allow"] for a in answers if a.target == b"/metrics" and a.status == 405],
            ["GET, HEAD"] * 8,
        )
        self.assertStatuses(answers, b"/health/live", {b"GET": 200, b"PUT": 405})

        name = quote(PROCEDURE, safe="").encode()
        key_id = gateway.service.published[PROCEDURE].generations[0].ca.key_id.encode()
        request = quote(base64.b64encode(self.ocsp_request(gateway)), safe="").encode()
        answers = await self.sweep(publish, [
            b"/", b"/nope", b"/crl", b"/crl/", b"/crl/%s.crl" % name, b"/crl/%s/%s.crl" % (name, key_id),
            b"/crl/nope.crl", b"/crl/%s" % name, b"/ca", b"/ca/%s.crt" % name, b"/ca/%s/%s.crt" % (name, key_id),
            b"/ca/nope.crt", b"/ocsp", b"/ocsp/", b"/ocsp/%s" % name, b"/ocsp/%s/%s" % (name, request),
            b"/ocsp/%s/not-base64!" % name, b"/ocsp/nope", b"/ocsp/nope/%s" % request, b"127.0.0.1:80",
        ])
        for crl in (b"/crl/%s.crl" % name, b"/crl/%s/%s.crl" % (name, key_id)):
            self.assertStatuses(answers, crl, {b"GET": 200, b"HEAD": 200, b"POST": 405, b"FOO": 405})
        self.assertStatuses(answers, b"/ca/%s.crt" % name, {b"GET": 200, b"HEAD": 200, b"DELETE": 405})
        # An OCSP responder takes POST (of an OCSP request) and GET (of one in its path).
        self.assertStatuses(answers, b"/ocsp/%s" % name, {b"GET": 400, b"HEAD": 400, b"POST": 415, b"PUT": 405})
        self.assertStatuses(answers, b"/ocsp/%s/%s" % (name, request), {b"GET": 200, b"HEAD": 200, b"POST": 405})
        self.assertEqual(
            {a.headers["allow"] for a in answers if a.target == b"/ocsp/%s" % name and a.status == 405},
            {"GET, HEAD, POST"},
        )
        for answer in answers:
            if answer.status == 200 and answer.method == b"GET":
                self.assertIn(answer.headers["content-type"],
                              ("application/pkix-crl", "application/pkix-cert", "application/ocsp-response"))

    def ocsp_request(self, gateway: RunningGateway) -> bytes:
        """A DER OCSP request about the gateway's own TLS certificate."""
        with open(gateway.ca_file, "rb") as f:
            issuer = x509.load_pem_x509_certificate(f.read())
        subject = gateway.service.state.server_certificate
        request = ocsp.OCSPRequestBuilder().add_certificate(subject, issuer, hashes.SHA256()).build()
        return request.public_bytes(serialization.Encoding.DER)

    async def test_approval_service(self) -> None:
        """The reference approval service, as its operator: its JSON API
        below /approval/requests, plain text elsewhere."""
        service = await RunningApprovalService.start(self)
        certificate, key = service.operator
        with open(certificate, "rb") as f, open(key, "rb") as g:
            mine = {"certificate": x509.load_pem_x509_certificate(f.read()),
                    "privateKey": serialization.load_pem_private_key(g.read(), None)}
        with open(service.ca_file, "rb") as f:
            anchor = Certificate.loadPEM(f.read())
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trustRoot=anchor, extraCertificateOptions=mine), self.tcp(service.port)
        )
        base = b"/approval/requests"
        answers = await self.sweep(endpoint, [
            b"/", b"/nope", b"/approval", b"/approval/", b"/approval/nope", base, base + b"/",
            base + b"/req-00000001", base + b"/req-00000001/approve", base + b"/req-00000001/reject",
            base + b"/req-00000001/nope", base + b"/a/b/c/d", b"127.0.0.1:443",
        ], json_under=base, body=b"{}")
        self.assertStatuses(answers, base, {b"GET": 200, b"POST": 403, b"PUT": 405, b"FOO": 405})
        self.assertStatuses(answers, base + b"/req-00000001", {b"GET": 404, b"HEAD": 404, b"POST": 405})
        self.assertStatuses(answers, base + b"/req-00000001/approve", {b"POST": 404, b"GET": 405})
        allow = {(a.target, a.headers["allow"]) for a in answers if a.status == 405}
        self.assertEqual(allow, {
            (base, "GET, HEAD, POST"), (base + b"/", "GET, HEAD, POST"), (base + b"/req-00000001", "GET, HEAD"),
            (base + b"/req-00000001/approve", "POST"), (base + b"/req-00000001/reject", "POST"),
        })


class CurlTests(TestCase):
    """What a reviewer saw with curl, now."""

    async def curl(self, *argv: str) -> tuple[int, str, bytes]:
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-i", *argv])
        self.assertEqual(result.code, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        return int(head.split(b" ", 2)[1]), head.decode("latin-1").lower(), body

    async def test_metrics_and_publishing(self) -> None:
        """DELETE /metrics, FOO and POST on a CRL, GET /ocsp/<name>: plain
        text with a Content-Length, 405 with Allow or 400, never 501 or HTML."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "metrics.port = 0\npublish.port = 0\npublish.interface = 127.0.0.1\n"
        )
        metrics = f"http://127.0.0.1:{gateway.service.metrics_ports[0].getHost().port}"
        publish = f"http://127.0.0.1:{gateway.service.publish_ports[0].getHost().port}"
        name = quote(PROCEDURE, safe="")
        for argv, status, allow, reason in (
            (["-X", "DELETE", metrics + "/metrics"], 405, "get, head", b"/metrics takes GET or HEAD\n"),
            (["-X", "FOO", f"{publish}/crl/{name}.crl"], 405, "get, head", b"a CRL is fetched with GET or HEAD\n"),
            (["-X", "POST", f"{publish}/crl/{name}.crl"], 405, "get, head", b"a CRL is fetched with GET or HEAD\n"),
            ([f"{publish}/ocsp/{name}"], 400, None,
             b"an OCSP request is POSTed to /ocsp/<name>, or sent with GET as /ocsp/<name>/<base64 of it>\n"),
        ):
            got, head, body = await self.curl(*argv)
            self.assertEqual((got, body), (status, reason), argv)
            self.assertIn("content-type: text/plain; charset=utf-8", head)
            self.assertIn(f"content-length: {len(body)}", head)
            if allow is not None:
                self.assertIn(f"allow: {allow}\r\n", head)
