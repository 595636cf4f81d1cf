"""Who each filter admits, and renewal rules on every path, over real TLS.

Two matrices, each request sent with curl to a real gateway on
127.0.0.1:

* filters x identity kinds: every filter admits exactly the identities
  its documentation names; a refusal has its status, one audit line with
  its code and no certificate issued;
* ``allowRenewalWithOldCertificates = true``: a certificate older than
  the last one issued for its subject cannot renew it through any
  operation, label or filter.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from estgw import cli

from estgw.approval.testing import RunningApprovalService
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import RunningGateway, cert_pem, csr_pem, make_csr, new_key, write
from tests.test_auth import (
    FACTORY_CA,
    SECURITY_CONFIG,
    AuditLog,
    csr_for,
    directory_for,
    gateway_certificate,
    record,
    run_cli,
)

PASSWORD = "abcd1234"
DEVICE_HASH = hash_password("s3cret")

# Beside SECURITY_CONFIG's handlers: a plain clientcert simpleenroll, a
# clientcert simpleenroll that may ask for any subject, and manual
# approval (its URL, token and CA are filled in per test).
MATRIX_HANDLERS = """\
handler.41.operation = simpleenroll
handler.41.label = cc
handler.41.filter = clientcert
handler.42.operation = simpleenroll
handler.42.label = anysubject
handler.42.filter = clientcert
handler.42.format = est-simpleenroll
handler.40.operation = simpleenroll
handler.40.label = idm
handler.40.filter = registersimpleenroll-basic-idm-auth
handler.40.authtype = Basic
handler.40.realm = EST Realm
handler.40.idm.requestUrl = {url}
handler.40.idm.tls.token = {token}
handler.40.idm.tls.password = {password}
handler.40.idm.tls.trustAnchors = {ca}
handler.40.idm.retryAfter = 7
"""

IDENTITIES = ("none", "password", "own", "foreign", "factory", "officer")

# filter (the label that serves it) -> identity -> (status, code).  A 200
# is an issued certificate, a 202 a request handed to an operator.
EXPECTED: dict[str, dict[str, tuple[int, str]]] = {
    # filter clientcert: a TLS client certificate of this gateway's CA.
    "cc": {
        "none": (403, "client-certificate-required"),
        "password": (403, "client-certificate-required"),
        "own": (200, "issued"),
        "foreign": (403, "client-certificate-issuer-not-accepted"),
        "factory": (403, "client-certificate-issuer-not-accepted"),
        "officer": (403, "subject-mismatch"),
    },
    # filter device (default label): a client certificate of this
    # gateway's CA, or a pre-registered device's HTTP login.
    "": {
        "none": (401, "authentication-required"),
        "password": (200, "issued"),
        "own": (200, "issued"),
        "foreign": (403, "client-certificate-issuer-not-accepted"),
        "factory": (403, "client-certificate-issuer-not-accepted"),
        "officer": (403, "subject-mismatch"),
    },
    # filter registersimpleenroll-basic-idm-auth: a pre-registered
    # device's HTTP login, then an operator.  A certificate is no login.
    "idm": {
        "none": (401, "authentication-required"),
        "password": (202, "approval-pending"),
        "own": (401, "authentication-required"),
        "foreign": (401, "authentication-required"),
        "factory": (401, "authentication-required"),
        "officer": (401, "authentication-required"),
    },
    # requiredRoRoles = ra: an officer's certificate holding the role.
    "ra": {
        "none": (403, "client-certificate-required"),
        "password": (403, "client-certificate-required"),
        "own": (403, "officer-role-required"),
        "foreign": (403, "officer-role-required"),
        "factory": (403, "officer-role-required"),
        "officer": (200, "issued"),
    },
    # estenroll.use-authentication-cert: a registered factory certificate.
    "factory": {
        "none": (403, "factory-certificate-required"),
        "password": (403, "factory-certificate-required"),
        "own": (403, "factory-certificate-not-registered"),
        "foreign": (403, "factory-certificate-not-registered"),
        "factory": (200, "issued"),
        "officer": (403, "factory-certificate-not-registered"),
    },
}


class _Gateway(TestCase):
    timeout = 120

    async def start_gateway(self, extra: str = "") -> RunningGateway:
        self.audit = AuditLog(self)
        self.directory = directory_for(self)
        self.approval = await RunningApprovalService.start(self)
        token = self.approval.issue_gateway_token(os.path.join(self.directory, "ra.p12"), PASSWORD)
        anchor = write(os.path.join(self.directory, "factory-ca.pem"), cert_pem(FACTORY_CA.cert))
        config = SECURITY_CONFIG.format(factory_ca=anchor) + MATRIX_HANDLERS.format(
            url=self.approval.url, token=token, password=PASSWORD, ca=self.approval.ca_file
        )
        self.gateway = await RunningGateway.start(self, config + extra)
        return self.gateway

    async def send(self, path: str, identity: str, common_name: str = "pump-17") -> Any:
        request: dict[str, Any] = {"data": csr_for(common_name)}
        request.update(self.credentials[identity])
        return await self.gateway.curl(path, **request)

    async def assertOutcome(self, result: Any, status: int, code: str, what: str) -> None:
        """200: one certificate more; 202: none, pending; else the refusal
        code in one audit line, and no certificate."""
        self.assertEqual(result.status, status, f"{what}: {result.text}")
        if status == 200:
            self.assertEqual(self.audit.refused, [], what)
        elif status == 202:
            self.assertEqual(self.audit.issued, [], what)
            self.assertIn("awaits an operator", result.text, what)
        else:
            self.assertEqual(self.audit.refused, [code], what)
            self.assertEqual(self.audit.issued, [], what)


class FilterMatrixTests(_Gateway):
    """Each filter admits exactly the identities its documentation names."""

    async def setUp(self) -> None:
        await self.start_gateway()
        gw = self.gateway
        await gw.store.add_device(Device("pump-17", DEVICE_HASH))
        own = gateway_certificate(gw, self.directory, "pump-17")
        await record(gw, own)
        officer = gateway_certificate(gw, self.directory, "ra-1")
        await record(gw, officer)
        await run_cli(gw, "officer", "add", "--cert", officer.cert_path, "--role", "ra")
        factory = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017")
        await run_cli(gw, "device", "add", "pump-17-idevid", "--cn", "pump-17", "--factory-cert", factory.cert_path)
        foreign = FACTORY_CA.issue(self.directory, "pump-17")
        self.credentials: dict[str, dict[str, str]] = {
            "none": {},
            "password": {"user": "pump-17:s3cret"},
            "own": own.curl,
            "foreign": foreign.curl,
            "factory": factory.curl,
            "officer": officer.curl,
        }

    async def check_filter(self, label: str) -> None:
        path = f"{label}/simpleenroll" if label else "simpleenroll"
        for identity in IDENTITIES:
            status, code = EXPECTED[label][identity]
            self.audit.events.clear()
            before = await self.gateway.store.count_certificates()
            result = await self.send(path, identity)
            what = f"{path} as {identity}"
            await self.assertOutcome(result, status, code, what)
            after = await self.gateway.store.count_certificates()
            self.assertEqual(after - before, 1 if status == 200 else 0, what)

    async def test_clientcert(self) -> None:
        """filter clientcert: only a certificate of this gateway's CA, for its own subject."""
        await self.check_filter("cc")

    async def test_device(self) -> None:
        """filter device: a certificate of this gateway's CA or a registered device's password."""
        await self.check_filter("")

    async def test_approval(self) -> None:
        """filter registersimpleenroll-basic-idm-auth: only a registered
        device's password reaches an operator; a client certificate of
        this gateway (or any other) alone gets the login challenge."""
        before = await self.gateway.store.count_certificates()
        await self.check_filter("idm")
        self.assertEqual(await self.gateway.store.count_certificates(), before)

    async def test_officer(self) -> None:
        """requiredRoRoles = ra: only the certificate holding the role."""
        await self.check_filter("ra")

    async def test_factory(self) -> None:
        """estenroll.use-authentication-cert: only the registered factory certificate."""
        await self.check_filter("factory")

    async def test_operator_sees_what_would_be_issued(self) -> None:
        """`estgw approval list` shows the subject, every subjectAltName
        after the copy rules (here a dNSName copied from the CN) and the
        key type and size: the operator approves nothing unseen."""
        csr = csr_pem(make_csr(new_key("rsa2048"), "pump-17"))
        result = await self.gateway.curl("idm/simpleenroll", data=csr, user="pump-17:s3cret")
        self.assertEqual(result.status, 202, result.text)
        out = io.StringIO()
        await cli.run(reactor, ["approval", *self.approval.operator_options(), "list"], out)
        self.assertIn(
            "would issue: subject CN=pump-17; subjectAltNames DNS:pump-17; key RSA 2048", out.getvalue()
        )

    async def test_approval_challenge_names_login(self) -> None:
        """The approval filter's 401 to a certificate carries a Basic
        challenge: the device is told what would be accepted."""
        result = await self.send("idm/simpleenroll", "own")
        self.assertEqual(result.status, 401, result.text)
        self.assertEqual(result.headers.get("www-authenticate"), 'Basic realm="EST Realm"')


class RenewalOnEveryPathTests(_Gateway):
    """allowRenewalWithOldCertificates = true: certificate 1 of pump-17,
    older than certificate 2, renews pump-17 nowhere."""

    async def prepare(self, setting: str = "allowRenewalWithOldCertificates = true\n") -> None:
        await self.start_gateway(setting)
        gw = self.gateway
        self.old = gateway_certificate(gw, self.directory, "pump-17")
        await record(gw, self.old)
        self.new = gateway_certificate(gw, self.directory, "pump-17")
        await record(gw, self.new)
        await gw.store.add_device(Device("pump-17", DEVICE_HASH))
        await gw.store.add_device(Device("shared", hash_password("layer-pw")))
        officer = gateway_certificate(gw, self.directory, "ra-1")
        await record(gw, officer)
        await run_cli(gw, "officer", "add", "--cert", officer.cert_path, "--role", "ra")
        self.credentials = {
            "old": self.old.curl,
            "new": self.new.curl,
            "old+layer": {**self.old.curl, "user": "shared:layer-pw"},
            "password": {"user": "pump-17:s3cret"},
            "officer": officer.curl,
        }

    async def refused_everywhere(self) -> None:
        paths = [
            "simplereenroll", "simpleenroll", "lab/simpleenroll", "cc/simpleenroll",
            "anysubject/simpleenroll", "extra/simpleenroll",
        ]
        for path in paths:
            identity = "old+layer" if path.startswith("extra/") else "old"
            self.audit.events.clear()
            result = await self.send(path, identity)
            what = f"{path} with the older certificate"
            self.assertEqual(result.status, 403, f"{what}: {result.text}")
            self.assertIn("issued last for this subject", result.text)
            self.assertEqual(self.audit.refused, ["not-last-issued-certificate"], what)
            self.assertEqual(self.audit.issued, [], what)
        self.assertEqual(await self.gateway.store.count_certificates(), 3)  # old, new, officer
        last = await self.gateway.store.last_issued_for_subject("CN=pump-17")
        self.assertEqual(last.serial, self.new.cert.serial_number)

    async def test_old_certificate_refused_on_every_path(self) -> None:
        """simplereenroll, simpleenroll under every label and filter
        (subject match, any subject, extra HTTP layer): 403
        not-last-issued-certificate, and certificate 2 stays the last."""
        await self.prepare()
        await self.refused_everywhere()

    async def assertNotLast(self, path: str, identity: str, body: bytes) -> None:
        self.audit.events.clear()
        before = await self.gateway.store.count_certificates()
        result = await self.gateway.curl(path, data=body, **self.credentials[identity])
        what = f"{path} as {identity}"
        self.assertEqual(result.status, 403, f"{what}: {result.text}")
        self.assertEqual(self.audit.refused, ["not-last-issued-certificate"], what)
        self.assertEqual(self.audit.issued, [], what)
        self.assertEqual(await self.gateway.store.count_certificates(), before, what)

    async def test_respelt_subject_is_a_renewal(self) -> None:
        """Where a certificate may ask for any subject, its own name in
        another case, with extra space, or with an attribute added is
        still its own: the older certificate is refused."""
        await self.prepare()
        bodies = [
            csr_for("PUMP-17"), csr_for("Pump-17"), csr_for("pump-17 "), csr_for(" pump-17"),
            csr_for("pump-17", serial_number="X1"),
        ]
        for body in bodies:
            await self.assertNotLast("anysubject/simpleenroll", "old", body)

    async def test_officer_renewing_itself(self) -> None:
        """An officer asking for its own name renews itself: an older
        officer certificate holding the role is refused on the officer
        handlers (simpleenroll and simplereenroll), and the newest officer
        certificate still renews."""
        await self.prepare()
        gw = self.gateway
        old = gateway_certificate(gw, self.directory, "ra-1")
        await record(gw, old)
        new = gateway_certificate(gw, self.directory, "ra-1")
        await record(gw, new)
        for holder in (old, new):
            await run_cli(gw, "officer", "add", "--cert", holder.cert_path, "--role", "ra")
        self.credentials["old-officer"] = old.curl
        self.credentials["new-officer"] = new.curl
        for path in ("ra/simpleenroll", "ra/simplereenroll"):
            await self.assertNotLast(path, "old-officer", csr_for("ra-1"))
        result = await gw.curl("ra/simpleenroll", data=csr_for("ra-1"), **new.curl)
        self.assertEqual(result.status, 200, result.text)

    async def test_any_issuer_officer_handler(self) -> None:
        """requiredRoRoles = none admits any certificate of this gateway as
        an RA: an older device certificate asking for its own subject
        there is a renewal, and refused."""
        await self.prepare()
        await self.assertNotLast("anyra/simpleenroll", "old", csr_for("pump-17"))

    async def test_setting_on_one_handler_holds_everywhere(self) -> None:
        """The rule set only on the simplereenroll handler still holds on
        simpleenroll: a subject has one last-issued certificate."""
        await self.prepare("handler.3.allowRenewalWithOldCertificates = true\n")
        self.assertTrue(self.gateway.config.last_issued_rule)
        await self.refused_everywhere()

    async def test_newest_certificate_renews_through_simpleenroll(self) -> None:
        """Certificate 2 may renew through simpleenroll; the new one is then
        the last, and certificate 2 is refused next time."""
        await self.prepare()
        result = await self.send("simpleenroll", "new")
        self.assertEqual(result.status, 200, result.text)
        self.audit.events.clear()
        result = await self.send("simplereenroll", "new")
        self.assertEqual(result.status, 403, result.text)
        self.assertEqual(self.audit.refused, ["not-last-issued-certificate"])

    async def test_other_subject_is_no_renewal(self) -> None:
        """On a handler that lets a certificate ask for any subject, asking
        for another subject is not a renewal: the rule does not apply."""
        await self.prepare()
        result = await self.send("anysubject/simpleenroll", "old", common_name="pump-99")
        self.assertEqual(result.status, 200, result.text)

    async def test_password_and_officer_are_no_renewal(self) -> None:
        """A registered device's password and an officer acting for
        pump-17 are not certificate holders renewing: both are issued."""
        await self.prepare()
        result = await self.send("simpleenroll", "password")
        self.assertEqual(result.status, 200, result.text)
        result = await self.send("ra/simpleenroll", "officer")
        self.assertEqual(result.status, 200, result.text)

    async def test_rule_off_by_default(self) -> None:
        """Without the setting an older certificate may renew (the
        documented default)."""
        await self.prepare("")
        self.assertFalse(self.gateway.config.last_issued_rule)
        result = await self.send("simplereenroll", "old")
        self.assertEqual(result.status, 200, result.text)

