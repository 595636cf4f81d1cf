"""The audit trail: JSON lines in log.audit.file, operator actions in the
store, refused logins named, and no secret in any log."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import audit, cli
from estgw.approval.testing import RunningApprovalService, idm_gateway_config
from estgw.config import from_string
from estgw.testing import TEST_CONFIG, RunningGateway, make_csr, new_key
from tests import softhsm
from tests.test_auth import FACTORY_CA, csr_for, directory_for, run_cli, start_gateway
from tests.test_refusals import basic_csr


class EveryLog:
    """Every log event of this process while a test runs, as the human
    log shows it and as JSON with all its fields."""

    def __init__(self, testcase: TestCase) -> None:
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict) -> None:
        self.lines.append(formatEvent(event))
        try:
            self.lines.append(eventAsJSON(event))
        except Exception:  # an unserialisable field: its repr still counts
            self.lines.append(repr(event))
        failure = event.get("log_failure")
        if failure is not None:
            self.lines.append(failure.getTraceback())


def json_lines(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines]


class SecretsTests(TestCase):
    timeout = 120

    async def test_no_secret_in_any_log(self) -> None:
        """Basic, Digest, factory certificate + password and an approval
        handler (PKCS#12 token password), each with a right and a wrong
        secret: no password, token password or private key appears in the
        log, the audit file, a response body or the CLI's output."""
        logs = EveryLog(self)
        seen: list[str] = []  # response bodies and CLI output
        secrets = [
            "basic-Secret-1", "basic-Wrong-2", "digest-Secret-3", "digest-Wrong-4",
            "factory-Secret-5", "factory-Wrong-6", "token-Secret-7", "approval-Secret-8", "approval-Wrong-9",
        ]

        async def cli_of(gateway: RunningGateway, *argv: str) -> None:
            seen.append(await run_cli(gateway, *argv))

        # Basic, Digest and factory certificate + password on one gateway.
        directory = directory_for(self)
        audit_file = os.path.join(directory, "audit.jsonl")
        gateway = await start_gateway(self, f"log.audit.file = {audit_file}\n")
        await cli_of(gateway, "device", "add", "pump-17", "--password", "basic-Secret-1")
        await cli_of(gateway, "device", "add", "pump-18", "--password", "digest-Secret-3")
        idevid = FACTORY_CA.issue(directory, "ACME-PUMP-0019", serial_number="SN19")
        await cli_of(
            gateway, "device", "add", "pump-19", "--factory-cert", idevid.cert_path, "--password", "factory-Secret-5",
            "--subject-value", "serialNumber=SN19",
        )
        for user, label, digest, status in [
            ("pump-17:basic-Wrong-2", "", False, 401),
            ("pump-17:basic-Secret-1", "", False, 200),
            ("pump-18:digest-Wrong-4", "digest", True, 401),
            ("pump-18:digest-Secret-3", "digest", True, 200),
        ]:
            common_name = user.split(":")[0]
            path = f"{label}/simpleenroll" if label else "simpleenroll"
            result = await gateway.curl(path, data=basic_csr(common_name), user=user, digest=digest)
            self.assertEqual(result.status, status, (user, result.text))
            seen.append(result.text)
        for password, status in (("factory-Wrong-6", 401), ("factory-Secret-5", 200)):
            result = await gateway.curl(
                "factorypw/simpleenroll", data=csr_for("pump-19", serial_number="SN19"),
                user=f"pump-19:{password}", **idevid.curl,
            )
            self.assertEqual(result.status, status, result.text)
            seen.append(result.text)

        # Manual approval: the gateway opens its PKCS#12 token with a password.
        approval = await RunningApprovalService.start(self)
        token = approval.issue_gateway_token(os.path.join(directory, "ra.p12"), "token-Secret-7")
        approval_audit = os.path.join(directory, "approval-audit.jsonl")
        config = idm_gateway_config(approval.url, token, "token-Secret-7", approval.ca_file)
        second = await RunningGateway.start(self, config + f"log.audit.file = {approval_audit}\n")
        await cli_of(second, "device", "add", "pump-20", "--password", "approval-Secret-8")
        csr = make_csr(new_key(), "pump-20")
        body = base64.b64encode(csr.public_bytes(Encoding.DER))
        wrong = await second.curl("simpleenroll", data=body, user="pump-20:approval-Wrong-9")
        self.assertEqual(wrong.status, 401, wrong.text)
        pending = await second.curl("simpleenroll", data=body, user="pump-20:approval-Secret-8")
        self.assertEqual(pending.status, 202, pending.text)
        request_id = re.search(r"request ([0-9a-f-]{36})", pending.text).group(1)  # type: ignore[union-attr]
        out = io.StringIO()
        await cli.run(reactor, ["approval", *approval.operator_options(), "approve", request_id], out)
        seen.append(out.getvalue())
        # The service audits the decision with the operator's name.
        self.assertTrue(
            any('"action": "approval-approve"' in line and '"operator"' in line for line in logs.lines)
        )
        issued = await second.curl("simpleenroll", data=body, user="pump-20:approval-Secret-8")
        self.assertEqual(issued.status, 200, issued.text)
        seen += [wrong.text, pending.text, issued.text]

        files = [open(path, encoding="utf-8").read() for path in (audit_file, approval_audit)]
        everything = logs.lines + seen + files
        # The secrets as sent: plain, and inside a Basic Authorization header.
        needles = secrets + [
            base64.b64encode(f"{user}:{password}".encode()).decode()
            for user, password in [
                ("pump-17", "basic-Secret-1"), ("pump-17", "basic-Wrong-2"), ("pump-19", "factory-Secret-5"),
                ("pump-20", "approval-Secret-8"), ("pump-20", "approval-Wrong-9"),
            ]
        ] + ["PRIVATE KEY"]
        for needle in needles:
            for text in everything:
                self.assertNotIn(needle, text, f"{needle!r} appears in: {text[:400]}")
        # The audit trail is there.  (Both gateways run in this process, so
        # the second file also has what the first gateway logged after it opened.)
        def who(path: str, event: str) -> set[str]:
            return {line.get("requester", "") for line in json_lines(path) if line["event"] == event}

        self.assertEqual(
            who(audit_file, "issued") - {"device:pump-20"}, {"device:pump-17", "device:pump-18", "factory:pump-19"}
        )
        self.assertLessEqual({"device:pump-17", "device:pump-18", "device:pump-19"}, who(audit_file, "refused"))
        self.assertEqual(who(approval_audit, "issued"), {"device:pump-20"})
        self.assertIn("device:pump-20", who(approval_audit, "refused"))


class AuditFileTests(TestCase):
    async def test_issuance_and_refusal_as_json_lines(self) -> None:
        """Each issuance and refusal is one JSON object per line with time,
        event, handler, requester, subject, serial or code, and client; a
        refused login names the device id tried, control characters and
        all, escaped."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        audit_file = os.path.join(directory, "audit.jsonl")
        logs = EveryLog(self)
        gateway = await RunningGateway.start(self, TEST_CONFIG + f"log.audit.file = {audit_file}\n")
        await run_cli(gateway, "device", "add", "pump-17", "--password", "pw-17")
        # Control characters in a device id are refused as malformed before
        # any login; quotes and backslashes reach the audit trail.
        refused = await gateway.curl("simpleenroll", data=basic_csr(), user="ghost\"x\\y:pw")
        self.assertEqual(refused.status, 401)
        issued = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:pw-17")
        self.assertEqual(issued.status, 200)
        [certificate] = await gateway.store.list_certificates()

        lines = json_lines(audit_file)
        by_event = {line["event"]: line for line in lines if line["event"] in ("refused", "issued")}
        refusal = by_event["refused"]
        self.assertEqual(refusal["code"], "bad-credentials")
        self.assertEqual(refusal["status"], 401)
        self.assertEqual(refusal["requester"], 'device:ghost"x\\y')
        self.assertEqual(refusal["handler"], "2")
        self.assertEqual(refusal["subject"] if "subject" in refusal else None, None)  # refused before the CSR
        self.assertTrue(refusal["client"].startswith("127.0.0.1"))
        self.assertIn("+00:00", refusal["time"])
        issuance = by_event["issued"]
        # As cert list and openssl print it, so that one grep finds both.
        from estgw.serials import format_serial

        self.assertEqual(issuance["serial"], format_serial(certificate.serial))
        self.assertIn(f"issued serial {format_serial(certificate.serial)} ", "\n".join(logs.lines))
        self.assertEqual(issuance["subject"], "CN=pump-17")
        self.assertEqual(issuance["requester"], "device:pump-17")
        self.assertEqual(issuance["handler"], "2")
        self.assertEqual(issuance["client"], "127.0.0.1")
        human = [line for line in logs.lines if "bad-credentials" in line and not line.startswith("{")]
        self.assertIn("requester 'device:ghost\"x\\y'", human[0])

    async def test_operator_actions(self) -> None:
        """Device add/remove, officer add/remove, revoke and CRL write are
        rows of the store's audit table (who, what, when) and JSON lines."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        audit_file = os.path.join(directory, "audit.jsonl")
        gateway = await RunningGateway.start(self, TEST_CONFIG + f"log.audit.file = {audit_file}\n")
        await run_cli(gateway, "device", "add", "pump-17", "--password", "op-secret-1")
        result = await gateway.curl("simpleenroll", data=basic_csr(), user="pump-17:op-secret-1")
        self.assertEqual(result.status, 200)
        [certificate] = await gateway.store.list_certificates()
        serial = format(certificate.serial, "x")
        cert_file = os.path.join(directory, "officer.pem")
        with open(cert_file, "wb") as f:
            f.write(certificate.certificate.public_bytes(Encoding.PEM))
        await run_cli(gateway, "officer", "add", "--cert", cert_file, "--role", "ra", "--force")
        await run_cli(gateway, "officer", "remove", "--cert", cert_file)
        await run_cli(gateway, "cert", "revoke", serial, "--reason", "keyCompromise")
        await run_cli(gateway, "crl", "write")
        await run_cli(gateway, "device", "remove", "pump-17")

        entries = await gateway.store.list_audit()
        actions = [e.action for e in entries]
        self.assertEqual(
            actions, ["device-add", "officer-add", "officer-remove", "cert-revoke", "crl-write", "device-remove"]
        )
        operator = audit.os_operator()
        self.assertTrue(all(e.operator == operator for e in entries))
        self.assertIn(serial, entries[3].target)
        self.assertIn("keyCompromise", entries[3].details)
        self.assertEqual(entries[0].target, "pump-17")
        self.assertEqual(entries[0].details, "password")
        listing = await run_cli(gateway, "audit", "list")
        self.assertEqual([line.split()[3] for line in listing.splitlines()[1:]], actions)
        self.assertIn(operator, listing)
        lines = [line for line in json_lines(audit_file) if line["event"] == "operator"]
        self.assertEqual([line["action"] for line in lines], actions)
        self.assertTrue(all(line["operator"] == operator for line in lines))
        self.assertNotIn("op-secret-1", open(audit_file, encoding="utf-8").read())


class AuditConfigTests(SynchronousTestCase):
    def test_path_relative_to_config(self) -> None:
        """log.audit.file is taken relative to the configuration file."""
        config = from_string(TEST_CONFIG + "log.audit.file = log/audit.jsonl\n", base_dir="/etc/estgw")
        self.assertEqual(config.audit_file, "/etc/estgw/log/audit.jsonl")
        self.assertEqual(from_string(TEST_CONFIG).audit_file, "")


class HsmPinTests(TestCase):
    """A PKCS#11 token's PIN (pkcs11.pinFile) appears in no log, whether
    the token accepts it or a wrong one stops the start."""

    skip = softhsm.skip_reason()
    timeout = 120

    async def test_pin_in_no_log(self) -> None:
        """Enroll through a SoftHSM2-backed token procedure, then try to
        start with a wrong PIN: neither PIN is in the log, the audit file
        or the start-up error."""
        from tests.test_pkcs11 import _Keys, hsm_config
        from tests.test_twistd import START_TIMEOUT, TWISTD, Daemon, _wait, environment

        logs = EveryLog(self)
        directory = os.path.abspath(self.mktemp())
        token, label, files = _Keys.get("ec-p256", os.path.join(directory, "keys"))
        certificate, chain = os.path.join(files, "issuing.pem"), os.path.join(files, "chain.pem")
        audit_file = os.path.join(directory, "audit.jsonl")
        gateway = await RunningGateway.start(self, hsm_config(
            certificate, chain, softhsm.shared().pin_file, token, label, extra=f"log.audit.file = {audit_file}\n",
        ))
        await run_cli(gateway, "device", "add", "pump-1", "--password", "hsm-device-pw")
        result = await gateway.curl("simpleenroll", data=basic_csr("pump-1"), user="pump-1:hsm-device-pw")
        self.assertEqual(result.status, 200, result.text)

        # A wrong PIN, in the real daemon: it stops with a message.
        wrong_pin = "9876-not-the-pin"
        wrong_file = os.path.join(directory, "wrong-pin")
        with open(wrong_file, "w") as f:
            f.write(wrong_pin + "\n")
        config_file = os.path.join(directory, "wrong.properties")
        with open(config_file, "w") as f:
            f.write(hsm_config(certificate, chain, wrong_file, token, label))
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", "estgw", "--config", config_file, "--port", "0"]
        env = {**environment(), "SOFTHSM2_CONF": softhsm.shared().conf}
        reactor.spawnProcess(daemon, argv[0], argv, env=env, path=directory)
        self.addCleanup(daemon.stop)
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIn("the PIN was rejected", output)

        with open(audit_file, encoding="utf-8") as f:
            everything = logs.lines + [f.read(), output, result.text]
        for secret in (softhsm.PIN, wrong_pin, "hsm-device-pw"):
            for text in everything:
                self.assertNotIn(secret, text, f"{secret!r} appears in: {text[:400]}")
