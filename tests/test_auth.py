"""Filters over real TLS: HTTP auth as an extra layer on top of a client
certificate, single-use pre-registrations, HTTP auth refused without TLS.

The helpers here (a factory CA, certificates of the gateway's CA, a
gateway whose config has every security handler, an audit log capture)
are shared by test_digest, test_officers and test_factory.
"""

from __future__ import annotations

import datetime
import io
import os
from typing import Any, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from estgw import auth, cli
from estgw.ca import IssueRequest, Profile
from estgw.config import ConfigError, from_string
from estgw.passwords import hash_password
from estgw.protocol import decode_certs_only
from estgw.refusal import Refusal
from estgw.store import Device, IssuedCertificate, SQLiteStore
from estgw.testing import (
    TEST_CONFIG,
    HTTPResult,
    RunningGateway,
    cert_pem,
    csr_pem,
    key_pem,
    make_csr,
    name,
    new_key,
    run_process,
    write,
)
from estgw.web import build_site

# Handlers 1-7 are TEST_CONFIG's: handler 2 (simpleenroll) takes Basic
# from pre-registered devices or a client certificate.
SECURITY_CONFIG = TEST_CONFIG + """\
tls.trustAnchors = {factory_ca}
tokenprocedure.2.name = Factory Procedure
tokenprocedure.2.validity.days = 30
tokenprocedure.2.estenroll.use-authentication-cert = true
tokenprocedure.2.enroll.mandatorypassword = false
tokenprocedure.2.enroll.check-subject-values = true
tokenprocedure.3.name = Factory Password Procedure
tokenprocedure.3.estenroll.use-authentication-cert = true
tokenprocedure.3.enroll.mandatorypassword = true
tokenprocedure.4.name = Factory Unchecked Procedure
tokenprocedure.4.estenroll.use-authentication-cert = true
tokenprocedure.4.enroll.check-subject-values = false
handler.20.operation = simpleenroll
handler.20.label = digest
handler.20.authtype = Digest
handler.20.realm = digest realm
handler.21.operation = simpleenroll
handler.21.label = extra
handler.21.filter = clientcert
handler.21.authtype = Basic
handler.21.realm = extra
handler.22.operation = simpleenroll
handler.22.label = ra
handler.22.format = est-simpleenroll-subjectmatch
handler.22.requiredRoRoles = ra
handler.23.operation = simplereenroll
handler.23.label = ra
handler.23.requiredRoRoles = ra
handler.24.operation = simpleenroll
handler.24.label = anyra
handler.24.requiredRoRoles = none
handler.25.operation = simpleenroll
handler.25.label = factory
handler.25.tokenprocedure = Factory Procedure
handler.26.operation = simpleenroll
handler.26.label = factorypw
handler.26.tokenprocedure = Factory Password Procedure
handler.26.authtype = Basic
handler.26.realm = factory
handler.27.operation = simpleenroll
handler.27.label = factoryany
handler.27.tokenprocedure = Factory Unchecked Procedure
handler.28.operation = simpleenroll
handler.28.label = extradigest
handler.28.filter = clientcert
handler.28.authtype = Digest
handler.28.realm = digest realm
"""

CLIENT_AUTH = (ExtendedKeyUsageOID.CLIENT_AUTH,)


@attr.s(frozen=True, auto_attribs=True)
class Credentials:
    cert_path: str
    key_path: str
    cert: x509.Certificate
    key: Any = attr.ib(repr=False)

    @property
    def curl(self) -> dict[str, str]:
        return {"cert": self.cert_path, "key": self.key_path}


def _save(directory: str, cert: x509.Certificate, key: Any) -> Credentials:
    prefix = os.path.join(directory, f"cert-{cert.serial_number:x}")
    return Credentials(write(prefix + ".pem", cert_pem(cert)), write(prefix + ".key", key_pem(key)), cert, key)


class FactoryCA:
    """A device maker's CA: issues factory certificates (IDevIDs)."""

    def __init__(self, common_name: str = "Acme Factory CA") -> None:
        self.key = new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = name(common_name, organization_name="Acme")
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue(self, directory: str, common_name: str, ekus: Sequence[x509.ObjectIdentifier] = CLIENT_AUTH,
              **attributes: str) -> Credentials:
        key = new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder().subject_name(name(common_name, **attributes))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
        )
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        return _save(directory, builder.sign(self.key, hashes.SHA256()), key)


FACTORY_CA = FactoryCA()


def gateway_certificate(gateway: RunningGateway, directory: str, common_name: str,
                        ekus: Sequence[x509.ObjectIdentifier] = CLIENT_AUTH) -> Credentials:
    """A certificate signed by the gateway's own issuing CA."""
    key = new_key()
    cert = gateway.service.state.ca.sign(
        IssueRequest(subject=name(common_name), public_key=key.public_key()),
        Profile(extended_key_usage=tuple(ekus)),
    )
    return _save(directory, cert, key)


async def record(gateway: RunningGateway, credentials: Credentials) -> None:
    await gateway.store.record_certificate(
        IssuedCertificate.from_certificate(credentials.cert, "test", "test")
    )


def directory_for(testcase: TestCase) -> str:
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    return directory


async def start_gateway(testcase: TestCase, extra: str = "") -> RunningGateway:
    """A gateway with every security handler; the factory CA is trusted."""
    anchor = write(os.path.join(directory_for(testcase), "factory-ca.pem"), cert_pem(FACTORY_CA.cert))
    return await RunningGateway.start(testcase, SECURITY_CONFIG.format(factory_ca=anchor) + extra)


async def run_cli(gateway: RunningGateway, *argv: str) -> str:
    """``estgw --config <gateway's> ARGV`` in this process; its output."""
    out = io.StringIO()
    await cli.run(reactor, ["--config", gateway.config_path, *argv], out)
    return out.getvalue()


class AuditLog:
    """Collects estgw.audit events while a test runs."""

    def __init__(self, testcase: TestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self._observe)
        testcase.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict) -> None:
        if event.get("log_namespace") == "estgw.audit":
            self.events.append(event)

    @property
    def refused(self) -> list[str]:
        return [e["code"] for e in self.events if e.get("event") == "refused"]

    @property
    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.events if e.get("event") == "refused"]

    @property
    def issued(self) -> list[dict]:
        return [e for e in self.events if e.get("event") == "issued"]

    def causes(self, event: str) -> list[str]:
        """The ``why`` of each audit event named ``event``."""
        return [str(e.get("why", "")) for e in self.events if e.get("event") == event]


def csr_for(common_name: str, key: Any = None, **attributes: str) -> bytes:
    return csr_pem(make_csr(key or new_key(), name(common_name, **attributes)))


class SecurityTestCase(TestCase):
    """Refusal assertions shared by the security tests."""

    async def setUpGateway(self, extra: str = "") -> RunningGateway:
        self.audit = AuditLog(self)
        self.gateway = await start_gateway(self, extra)
        self.directory = directory_for(self)
        return self.gateway

    async def assertRefused(
        self, result: HTTPResult, status: int, code: str, reason: str, before: int = 0,
        challenges: int = 0, bare: bool = False,
    ) -> None:
        """Status, reason text, one audit line with the code (after
        ``challenges`` 401s that asked curl for Digest credentials), and
        no certificate issued.  ``bare``: a 401 challenge to a request
        without credentials, whose body is empty and whose reason is only
        in the audit line."""
        self.assertEqual(result.status, status, result.text)
        if bare:
            self.assertEqual((result.body, result.headers.get("content-length")), (b"", "0"))
        else:
            self.assertIn(reason, result.text)
            self.assertTrue(result.headers.get("content-type", "").startswith("text/plain"))
        self.assertEqual(self.audit.refused, ["authentication-required"] * challenges + [code])
        self.assertIn(reason, self.audit.reasons[-1])
        self.assertEqual(self.audit.issued, [])
        self.assertEqual(await self.gateway.store.count_certificates(), before)

    async def assertIssued(self, result: HTTPResult, requester_prefix: str) -> IssuedCertificate:
        self.assertEqual(result.status, 200, result.text)
        issued = await self.gateway.store.list_certificates()
        self.assertEqual(len(issued), 1)
        self.assertTrue(issued[0].requester.startswith(requester_prefix), issued[0].requester)
        return issued[0]


# -- extra layer -----------------------------------------------------------------------


class ExtraLayerTests(SecurityTestCase):
    """filter clientcert + authtype: HTTP auth on top of a certificate."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        await run_cli(self.gateway, "device", "add", "shared", "--password", "layer-pw")
        self.client = gateway_certificate(self.gateway, self.directory, "pump-17")

    async def test_certificate_and_password(self) -> None:
        """A valid client certificate plus the right HTTP Basic password
        enrolls; the certificate, not the HTTP user, is the requester."""
        result = await self.gateway.curl(
            "extra/simpleenroll", data=csr_for("pump-17"), user="shared:layer-pw", **self.client.curl
        )
        await self.assertIssued(result, "cert:CN=pump-17")

    async def test_password_without_certificate(self) -> None:
        """The right password alone is not enough: a client certificate
        is still required (403), nothing issued."""
        result = await self.gateway.curl("extra/simpleenroll", data=csr_for("pump-17"), user="shared:layer-pw")
        await self.assertRefused(result, 403, "client-certificate-required", "TLS client certificate")

    async def test_certificate_without_password(self) -> None:
        """A certificate alone gets 401 with a Basic challenge."""
        result = await self.gateway.curl("extra/simpleenroll", data=csr_for("pump-17"), **self.client.curl)
        await self.assertRefused(result, 401, "authentication-required", "also needs HTTP Basic", bare=True)
        self.assertEqual(result.headers["www-authenticate"], 'Basic realm="extra"')

    async def test_certificate_and_wrong_password(self) -> None:
        """A certificate with a wrong password gets 401, nothing issued."""
        result = await self.gateway.curl(
            "extra/simpleenroll", data=csr_for("pump-17"), user="shared:wrong", **self.client.curl
        )
        await self.assertRefused(result, 401, "bad-credentials", "unknown device or wrong password")

    async def test_digest_extra_layer(self) -> None:
        """Digest works as the extra layer too (challenge, then success)."""
        result = await self.gateway.curl(
            "extradigest/simpleenroll", data=csr_for("pump-17"), user="shared:layer-pw", digest=True,
            **self.client.curl,
        )
        await self.assertIssued(result, "cert:CN=pump-17")

    async def test_untrusted_certificate_and_password(self) -> None:
        """A certificate from an unknown CA does not count, whatever the password."""
        stranger = FactoryCA("Stranger CA").issue(self.directory, "pump-17")
        result = await self.gateway.curl(
            "extra/simpleenroll", data=csr_for("pump-17"), user="shared:layer-pw", **stranger.curl
        )
        await self.assertRefused(result, 403, "client-certificate-untrusted", "not trusted")


# -- single use ----------------------------------------------------------------------------


class SingleUseTests(SecurityTestCase):
    """A single-use pre-registration issues one certificate at most."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "once", "--single-use")

    async def test_consumed_by_first_issue(self) -> None:
        """The first enrollment issues and consumes the registration; the
        second, with the same right password, is refused (403)."""
        first = await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), user="pump-17:once")
        await self.assertIssued(first, "device:pump-17")
        self.assertIsNotNone((await self.gateway.store.get_device("pump-17")).consumed_at)
        self.audit.events.clear()
        second = await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), user="pump-17:once")
        await self.assertRefused(second, 403, "single-use-consumed", "already been used", before=1)

    async def test_consumed_registration_wrong_password(self) -> None:
        """Once consumed, a wrong password still reads as a wrong password:
        the state of a registration is told only to its owner."""
        await self.gateway.store.consume_device("pump-17")
        result = await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), user="pump-17:guess")
        await self.assertRefused(result, 401, "bad-credentials", "unknown device or wrong password")

    async def test_concurrent_enrollments_issue_one(self) -> None:
        """Four enrollments sent at once with one single-use password: one
        certificate, the others refused as consumed."""
        results = await defer.gatherResults([
            defer.ensureDeferred(
                self.gateway.curl("simpleenroll", data=csr_for("pump-17"), user="pump-17:once")
            )
            for _ in range(4)
        ])
        self.assertEqual(sorted(r.status for r in results), [200, 403, 403, 403], [r.text for r in results])
        self.assertEqual(await self.gateway.store.count_certificates(), 1)
        self.assertEqual(sorted(self.audit.refused), ["single-use-consumed"] * 3)

    async def test_extra_layer_single_use(self) -> None:
        """A single-use password used as the extra layer is consumed too."""
        client = gateway_certificate(self.gateway, self.directory, "pump-17")
        first = await self.gateway.curl(
            "extra/simpleenroll", data=csr_for("pump-17"), user="pump-17:once", **client.curl
        )
        await self.assertIssued(first, "cert:CN=pump-17")
        self.audit.events.clear()
        second = await self.gateway.curl(
            "extra/simpleenroll", data=csr_for("pump-17"), user="pump-17:once", **client.curl
        )
        await self.assertRefused(second, 403, "single-use-consumed", "already been used", before=1)


class SingleUseClaimTests(TestCase):
    """auth.single_use against a real store, without HTTP."""

    async def setUp(self) -> None:
        self.store = SQLiteStore(os.path.abspath(self.mktemp()))
        await self.store.start()
        self.addCleanup(self.store.close)
        await self.store.add_device(Device("pump-17", hash_password("pw"), single_use=True))
        self.device = await self.store.get_device("pump-17")
        self.identity = auth.Identity(kind="device", device_id="pump-17", registration=self.device)

    async def test_failed_issue_releases_the_claim(self) -> None:
        """When issuing fails after the claim, the registration is usable again."""
        with self.assertRaises(RuntimeError):
            async with auth.single_use(self.store, self.identity):
                self.assertIsNotNone((await self.store.get_device("pump-17")).consumed_at)
                raise RuntimeError("CA unavailable")
        self.assertIsNone((await self.store.get_device("pump-17")).consumed_at)
        async with auth.single_use(self.store, self.identity):
            pass
        self.assertIsNotNone((await self.store.get_device("pump-17")).consumed_at)

    async def test_second_claim_refused(self) -> None:
        """A claim on a consumed registration raises the consumed refusal."""
        async with auth.single_use(self.store, self.identity):
            pass
        with self.assertRaises(Refusal) as caught:
            async with auth.single_use(self.store, self.identity):
                self.fail("the body must not run")
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "single-use-consumed"))

    async def test_reusable_registration_not_claimed(self) -> None:
        """A device that is not single-use is never marked consumed."""
        await self.store.add_device(Device("multi", hash_password("pw")))
        identity = auth.Identity(kind="device", device_id="multi", registration=await self.store.get_device("multi"))
        for _ in range(2):
            async with auth.single_use(self.store, identity):
                pass
        self.assertIsNone((await self.store.get_device("multi")).consumed_at)


# -- no HTTP auth without TLS ------------------------------------------------------------------


class PlainHTTPTests(SecurityTestCase):
    """The same EST resource served over plain TCP never accepts HTTP auth."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret")
        site = build_site(self.gateway.service.build_gateway())
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}/.well-known/est/"

    async def plain_curl(self, path: str, *options: str) -> HTTPResult:
        body = write(os.path.join(self.directory, "csr.pem"), csr_for("pump-17"))
        head = os.path.join(self.directory, "headers")
        result = await run_process([
            "/usr/bin/env", "curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}", "-D", head,
            "-H", "Content-Type: application/pkcs10", "--data-binary", "@" + body, *options, self.url + path,
        ])
        text, _, status = result.stdout.rpartition(b"\n")
        with open(head, "rb") as f:
            lines = f.read().decode("latin-1").splitlines()
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
        return HTTPResult(int(status or 0), headers, text, result.stderr)

    async def test_basic_over_plain_http(self) -> None:
        """Right Basic credentials over plain HTTP: 403, nothing issued."""
        result = await self.plain_curl("simpleenroll", "--basic", "-u", "pump-17:s3cret")
        await self.assertRefused(result, 403, "http-auth-without-tls", "only over TLS")

    async def test_digest_over_plain_http(self) -> None:
        """Digest over plain HTTP is refused before any challenge is sent."""
        result = await self.plain_curl("digest/simpleenroll", "--digest", "-u", "pump-17:s3cret")
        await self.assertRefused(result, 403, "http-auth-without-tls", "only over TLS")


# -- configuration ---------------------------------------------------------------------------


class AuthConfigTests(TestCase):
    """The handler keys of HTTP auth are checked at start."""

    def test_qop_only_with_digest(self) -> None:
        """qop on a Basic handler is an error naming the key."""
        with self.assertRaises(ConfigError) as caught:
            from_string(TEST_CONFIG + "handler.2.qop = auth\n")
        self.assertEqual(caught.exception.key, "handler.2.qop")

    def test_qop_values(self) -> None:
        """qop takes only auth (auth-int is not offered)."""
        base = TEST_CONFIG + "handler.20.operation = simpleenroll\nhandler.20.label = d\nhandler.20.authtype = Digest\nhandler.20.realm = r\n"
        self.assertEqual(from_string(base + "handler.20.qop = auth\n").handler("d", "simpleenroll").qop, "auth")
        with self.assertRaises(ConfigError) as caught:
            from_string(base + "handler.20.qop = auth-int\n")
        self.assertEqual(caught.exception.key, "handler.20.qop")

    def test_realm_required_with_authtype(self) -> None:
        """authtype without realm is an error; an empty realm is fine."""
        base = TEST_CONFIG + "handler.20.operation = simpleenroll\nhandler.20.label = d\nhandler.20.authtype = Digest\n"
        with self.assertRaises(ConfigError) as caught:
            from_string(base)
        self.assertEqual(caught.exception.key, "handler.20.realm")
        self.assertEqual(from_string(base + "handler.20.realm =\n").handler("d", "simpleenroll").realm, "")


class SingleUseRefetchTests(SecurityTestCase):
    """A consumed single-use registration may fetch again, with the same
    key and within singleUse.refetchSeconds, the certificate it was
    issued (its connection may have dropped before the response)."""

    async def start(self, extra: str = "") -> None:
        await self.setUpGateway(extra)
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "once", "--single-use")
        self.key = new_key()
        first = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:once")
        self.first = await self.assertIssued(first, "device:pump-17")
        self.audit.events.clear()

    async def test_same_key_gets_same_certificate(self) -> None:
        """Same password, a new CSR for the same key: 200 with the same
        certificate, nothing new issued, one audit line "reissued"."""
        await self.start()
        again = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:once")
        self.assertEqual(again.status, 200, again.text)
        (certificate,) = decode_certs_only(again.body)
        self.assertEqual(certificate.serial_number, self.first.serial)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)
        self.assertEqual([e["event"] for e in self.audit.events], ["reissued"])

    async def test_other_key_refused(self) -> None:
        """Another key is a second certificate: 403 single-use-consumed."""
        await self.start()
        other = await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), user="pump-17:once")
        await self.assertRefused(other, 403, "single-use-consumed", "already been used", before=1)

    async def test_wrong_password_refused(self) -> None:
        """The same key without the password is no refetch: 401."""
        await self.start()
        other = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:guess")
        await self.assertRefused(other, 401, "bad-credentials", "wrong password", before=1)

    async def test_revoked_certificate_not_sent_again(self) -> None:
        """A certificate revoked since is not sent again: 403."""
        await self.start()
        await self.gateway.store.revoke_certificate(self.first.serial)
        again = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:once")
        await self.assertRefused(again, 403, "single-use-consumed", "already been used", before=1)

    async def test_window_closed(self) -> None:
        """singleUse.refetchSeconds = 0 turns it off: the same key is refused."""
        await self.start("singleUse.refetchSeconds = 0\n")
        again = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:once")
        await self.assertRefused(again, 403, "single-use-consumed", "already been used", before=1)

    async def test_window_elapsed(self) -> None:
        """A registration consumed longer ago than the window: refused."""
        await self.start("singleUse.refetchSeconds = 60\n")
        device = await self.gateway.store.get_device("pump-17")
        await self.gateway.store.release_device("pump-17", device.consumed_at)
        long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=120)
        self.assertTrue(await self.gateway.store.consume_device("pump-17", long_ago))
        again = await self.gateway.curl("simpleenroll", data=csr_for("pump-17", self.key), user="pump-17:once")
        await self.assertRefused(again, 403, "single-use-consumed", "already been used", before=1)
