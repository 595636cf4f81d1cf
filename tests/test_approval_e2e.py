"""Manual approval end to end: the reference approval service over TLS
on 127.0.0.1 (requiring the gateway's PKCS#12 client certificate), a real
gateway, curl as the device with HTTP Basic, the operator's CLI."""

from __future__ import annotations

import base64
import io
import os
import re
import sys
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, task
from twisted.python import usage
from twisted.trial.unittest import TestCase

from estgw import cli
from estgw.approval.pki import issue_client, write_pkcs12
from estgw.approval.testing import RunningApprovalService, idm_gateway_config
from estgw.ca import LocalCA
from estgw.passwords import hash_password
from estgw.protocol import CERTS_ONLY, decode_certs_only
from estgw.store import Device
from estgw.tap import Options
from estgw.testing import RunningGateway, make_csr, new_key, run_process, write
from tests.test_auth import AuditLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASSWORD = "abcd1234"
DEVICE = "pump-17"
SECRET = "s3cret-pump"
REQUEST_ID = re.compile(r"request ([0-9a-f-]{36})")
# One password hash for the module: scrypt is slow on purpose.
DEVICE_HASH = hash_password(SECRET)


class ApprovalFlowTests(TestCase):
    timeout = 60

    async def start(self, token: str | None = None, ca: str | None = None) -> None:
        """An approval service, a gateway whose handler 3 needs approval,
        a pre-registered device and its CSR."""
        self.approval = await RunningApprovalService.start(self)
        self.files = os.path.abspath(self.mktemp())
        os.makedirs(self.files)
        if token is None:
            token = self.approval.issue_gateway_token(os.path.join(self.files, "ra.p12"), PASSWORD)
        self.config_text = idm_gateway_config(self.approval.url, token, PASSWORD, ca or self.approval.ca_file)
        self.gateway = await RunningGateway.start(self, self.config_text)
        await self.gateway.store.add_device(Device(DEVICE, DEVICE_HASH))
        csr = make_csr(new_key(), DEVICE)
        self.body = base64.b64encode(csr.public_bytes(Encoding.DER))

    def enroll(self) -> Any:
        return self.gateway.curl("simpleenroll", data=self.body, user=f"{DEVICE}:{SECRET}")

    async def operator(self, *argv: str) -> str:
        """`estgw approval ...` in this process, as the service's operator."""
        from twisted.internet import reactor

        out = io.StringIO()
        await cli.run(reactor, ["approval", *self.approval.operator_options(), *argv], out)
        return out.getvalue()

    async def operator_process(self, *argv: str) -> Any:
        """The same through the installed entry point, as a separate process."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        program = [sys.executable, "-c", "from estgw.cli import main; main()"]
        return await run_process(program + ["approval", *self.approval.operator_options(), *argv], env=env)

    async def pending(self) -> str:
        """The device's POST is answered 202 + Retry-After; returns the request id."""
        result = await self.enroll()
        self.assertEqual(result.status, 202, result.text)
        self.assertEqual(result.headers.get("retry-after"), "7")
        match = REQUEST_ID.search(result.text)
        self.assertIsNotNone(match, result.text)
        return match.group(1)  # type: ignore[union-attr]

    async def assert_certificate_verifies(self, body: bytes) -> bytes:
        """The enrollment answer holds a certificate for the device that
        `openssl verify` accepts against the gateway's cacerts."""
        (leaf,) = decode_certs_only(body)
        self.assertEqual(leaf.subject.rfc4514_string(), f"CN={DEVICE}")
        chain = await self.gateway.curl("cacerts")
        cacerts = decode_certs_only(chain.body)
        (root,) = [c for c in cacerts if c.subject == c.issuer]
        (issuing,) = [c for c in cacerts if c.subject != c.issuer]
        leaf_file = write(os.path.join(self.files, "leaf.pem"), leaf.public_bytes(Encoding.PEM))
        root_file = write(os.path.join(self.files, "root.pem"), root.public_bytes(Encoding.PEM))
        issuing_file = write(os.path.join(self.files, "issuing.pem"), issuing.public_bytes(Encoding.PEM))
        result = await run_process(
            ["/usr/bin/env", "openssl", "verify", "-CAfile", root_file, "-untrusted", issuing_file, leaf_file]
        )
        self.assertEqual((result.code, result.stdout.strip()), (0, f"{leaf_file}: OK".encode()), result.stderr)
        return leaf.public_bytes(Encoding.DER)

    async def test_approved_through_cli(self) -> None:
        """202 until the operator approves with `estgw approval approve`;
        the device's retry then gets a certificate that verifies against
        cacerts, issued once."""
        await self.start()
        request_id = await self.pending()
        self.assertEqual(await self.gateway.store.count_certificates(), 0)
        listing = await self.operator_process("list")
        self.assertEqual(listing.code, 0, listing.stderr)
        self.assertIn(request_id, listing.stdout.decode())
        self.assertIn("CN=pump-17", listing.stdout.decode())
        self.assertIn("device:pump-17", listing.stdout.decode())
        self.assertEqual(await self.pending(), request_id)  # still pending: same request
        approved = await self.operator_process("approve", request_id)
        self.assertEqual((approved.code, approved.stdout.decode()), (0, f"approved {request_id} (CN=pump-17)\n"))
        result = await self.enroll()
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(result.headers["content-type"], CERTS_ONLY)
        await self.assert_certificate_verifies(result.body)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)
        self.assertIn("no pending requests", await self.operator("list"))

    async def test_rejected_through_cli(self) -> None:
        """After `estgw approval reject ID --reason`, the device's retries
        are refused 403 with that reason, and nothing is issued."""
        await self.start()
        request_id = await self.pending()
        out = await self.operator("reject", request_id, "--reason", "unknown serial number")
        self.assertEqual(out, f"rejected {request_id} (CN=pump-17): unknown serial number\n")
        for _ in range(2):
            result = await self.enroll()
            self.assertEqual(result.status, 403)
            self.assertEqual(result.text, "an operator rejected the request: unknown serial number\n")
        self.assertEqual(await self.gateway.store.count_certificates(), 0)
        with self.assertRaises(cli.CommandError) as caught:
            await self.operator("approve", request_id)
        self.assertIn("409", str(caught.exception))
        self.assertIn("already rejected", str(caught.exception))

    async def test_gateway_restart_in_the_middle(self) -> None:
        """The gateway stops after the 202; the operator approves while it
        is down; a new gateway on the same directory issues on the retry,
        and sends the same certificate after a second restart."""
        await self.start()
        request_id = await self.pending()
        await self.gateway.stop()
        await self.operator("approve", request_id)
        await self.gateway.run()
        first = await self.enroll()
        self.assertEqual(first.status, 200, first.text)
        der = await self.assert_certificate_verifies(first.body)
        await self.gateway.stop()
        await self.gateway.run()
        again = await self.enroll()
        self.assertEqual(again.status, 200, again.text)
        self.assertEqual(decode_certs_only(again.body)[0].public_bytes(Encoding.DER), der)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)

    async def test_concurrent_retries_issue_one(self) -> None:
        """Two retries at once after approval both get the certificate, and
        only one is issued."""
        await self.start()
        await self.operator("approve", await self.pending())
        first, second = await defer.gatherResults([defer.ensureDeferred(self.enroll()) for _ in range(2)])
        self.assertEqual((first.status, second.status), (200, 200), (first.text, second.text))
        self.assertEqual(first.body, second.body)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)

    async def test_service_down_then_back(self) -> None:
        """With the approval service down the device gets 503 + Retry-After
        and a reason; when it is back, the request reaches it exactly once."""
        await self.start()
        port = self.approval.port
        await self.approval.stop()
        result = await self.enroll()
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.headers.get("retry-after"), "7")
        self.assertIn("the approval service is unavailable", result.text)
        self.assertIn("is kept: retry later", result.text)
        self.assertEqual(await self.gateway.store.count_certificates(), 0)
        await self.approval.run(port)
        from twisted.internet import reactor

        await task.deferLater(reactor, 1.1, lambda: None)  # the client's first backoff
        request_id = await self.pending()
        self.assertEqual(await self.pending(), request_id)
        listing = await self.operator("list", "--status", "all")
        self.assertEqual(listing.count("device:pump-17"), 1, listing)  # one request
        self.assertIn(request_id, listing)

    async def test_service_refuses_foreign_token(self) -> None:
        """The service requires a client certificate from its gateway CA: a
        token from another CA fails the TLS handshake (device: 503), an
        operator's certificate may not submit (503 naming the 403), and the
        service records nothing."""
        await self.start()
        foreign_ca = LocalCA.load_or_create(os.path.join(self.files, "foreign-ca"), "foreign")
        key, certificate = issue_client(foreign_ca, "estgw-ra", "gateways")
        foreign = os.path.join(self.files, "foreign.p12")
        write_pkcs12(foreign, key, certificate, foreign_ca, PASSWORD)
        operator_token = self.approval.issue_operator_token(os.path.join(self.files, "op.p12"), PASSWORD)
        audit = AuditLog(self)
        for token, words in ((foreign, "TLS failure: tlsv1 alert unknown ca"), (operator_token, "HTTP 403: this needs a gateway certificate")):
            self.config_text = idm_gateway_config(self.approval.url, token, PASSWORD, self.approval.ca_file)
            self.gateway = await RunningGateway.start(self, self.config_text)
            await self.gateway.store.add_device(Device(DEVICE, DEVICE_HASH))
            result = await self.enroll()
            self.assertEqual(result.status, 503, result.text)
            # The device learns what it can act on; the operator's log has the cause.
            self.assertIn("the approval service is unavailable", result.text)
            self.assertNotIn(words, result.text)
            self.assertIn(words, audit.causes("approval-service-unavailable")[-1])
            self.assertEqual(await self.gateway.store.count_certificates(), 0)
        self.assertIn("no requests", await self.operator("list", "--status", "all"))
        no_certificate = await run_process(
            ["/usr/bin/env", "curl", "-sS", "--cacert", self.approval.ca_file, self.approval.url]
        )
        self.assertNotEqual(no_certificate.code, 0)

    async def test_service_certificate_verified(self) -> None:
        """A gateway that does not trust the service's CA does not talk to
        it: the device gets 503, the log the TLS reason."""
        other_ca = LocalCA.load_or_create(os.path.abspath(self.mktemp()), "other")
        other = write(os.path.abspath(self.mktemp()), other_ca.root.public_bytes(Encoding.PEM))
        audit = AuditLog(self)
        await self.start(ca=other)
        result = await self.enroll()
        self.assertEqual(result.status, 503, result.text)
        self.assertNotIn("TLS failure", result.text)
        self.assertIn("TLS failure: certificate verify failed", audit.causes("approval-service-unavailable")[-1])
        self.assertIn("no requests", await self.operator("list", "--status", "all"))


class TokenPasswordTests(TestCase):
    timeout = 60

    async def prepare(self) -> str:
        self.approval = await RunningApprovalService.start(self)
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        token = self.approval.issue_gateway_token(os.path.join(self.directory, "ra.p12"), PASSWORD)
        text = idm_gateway_config(self.approval.url, token, "not-the-password", self.approval.ca_file)
        return write(os.path.join(self.directory, "est.properties"), text.encode())

    async def test_wrong_password_stops_start(self) -> None:
        """A wrong idm.tls.password stops start-up before anything listens:
        twistd's options and the service both fail naming the key."""
        path = await self.prepare()
        with self.assertRaises(SystemExit) as caught:  # not a usage error: no usage text
            Options().parseOptions(["--config", path])
        message = str(caught.exception)
        self.assertIn("handler.3.idm.tls.password", message)
        self.assertIn("wrong password", message)
        self.assertNotIn("not-the-password", message)
        gateway = RunningGateway(os.path.join(self.directory, "gw"), open(path).read())
        with self.assertRaises(usage.UsageError) as caught:
            await gateway.run()
        self.assertIn("handler.3.idm.tls.password", str(caught.exception))
        self.assertIsNone(gateway.service)

    async def test_twistd_exits_with_message(self) -> None:
        """`twistd -n estgw` with a wrong token password exits non-zero and
        says which key and why."""
        path = await self.prepare()
        env = dict(os.environ, PYTHONPATH=ROOT)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        result = await run_process(
            [twistd, "-n", "--pidfile=", "estgw", "--config", path], env=env, path=self.directory
        )
        output = (result.stdout + result.stderr).decode()
        self.assertNotEqual(result.code, 0, output)
        self.assertIn("handler.3.idm.tls.password: cannot open", output)
        self.assertIn("wrong password", output)
        self.assertNotIn("not-the-password", output)
