"""The refusal matrix: every refusal over real TLS with curl as the client.

Each row sets up one bad request, sends it with curl to a real gateway on
127.0.0.1, and asserts the status, the reason text, exactly one audit log
line with the reason code, and that the store holds no new certificate.

Refusals that need a gateway-wide setting of their own (a stale CRL,
OCSP, an approval service) are in tests/test_revocation.py and
tests/test_approval_*.py with the same assertions; wire-level refusals
(404, 405, 413, 415, bad base64) are in tests/test_web.py.
"""

from __future__ import annotations

import datetime
import atexit
import os
import shutil
import tempfile
from typing import Any, Awaitable, Callable

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from estgw import policy
from estgw.ca import IssueRequest, Profile
from estgw.passwords import hash_password
from estgw.store import Device, IssuedCertificate
from tests.test_auth import FACTORY_CA, SECURITY_CONFIG, gateway_certificate, run_cli
from estgw.testing import TEST_CONFIG, RunningGateway, cert_pem, csr_pem, key_pem, make_csr, name, new_key, write

_MATRIX_FILES = tempfile.mkdtemp(prefix="estgw-matrix-")
atexit.register(shutil.rmtree, _MATRIX_FILES, True)  # leave nothing in the temporary directory
REVOKED_IDEVID = FACTORY_CA.issue(_MATRIX_FILES, "ACME-PUMP-0066")

MATRIX_CONFIG = TEST_CONFIG + """\
handler.10.operation = simpleenroll
handler.10.label = bound
handler.10.authtype = Basic
handler.10.realm = bound
handler.10.channelBinding = true
handler.11.operation = simplereenroll
handler.11.label = strict
handler.11.allowRenewalWithOldCertificates = true
handler.12.operation = serverkeygen
handler.12.authtype = Basic
handler.12.realm = test realm
handler.13.operation = csrattrs
handler.13.label = tmpl
handler.13.csrattrs.template = subject: CN, O=ACME ; key: ec-p256
handler.14.operation = simpleenroll
handler.14.label = tmpl
handler.14.authtype = Basic
handler.14.realm = test realm
handler.14.deviceNames = any
handler.15.operation = serverkeygen
handler.15.label = tmpl
handler.15.authtype = Basic
handler.15.realm = test realm
handler.15.serverkeygen.allowUnencryptedKey = true
handler.15.deviceNames = any
"""


# The matrix gateway also serves every handler of the security tests
# (Digest, extra layer, RA, factory certificates) and loads a CRL of the
# factory CA that lists REVOKED_IDEVID.
FULL_CONFIG = SECURITY_CONFIG + MATRIX_CONFIG[len(TEST_CONFIG):] + "tls.crls = {factory_crl}\n"


@attr.s(auto_attribs=True)
class Case:
    path: str
    status: int
    code: str
    reason: str
    setup: Callable[[RunningGateway, str], Awaitable[dict[str, Any]]]
    header: str | None = None  # a response header that must be present
    challenges: int = 0  # 401 rounds that ask curl for Digest credentials first
    # A 401 challenge to a request without credentials: empty body, the
    # reason only in the audit log.
    bare: bool = False


def write_factory_files(directory: str) -> dict[str, str]:
    """The factory CA's certificate, and its CRL revoking REVOKED_IDEVID."""
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(FACTORY_CA.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=7))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(REVOKED_IDEVID.cert.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1)).build()
        )
        .sign(FACTORY_CA.key, hashes.SHA256())
    )
    return {
        "factory_ca": write(os.path.join(directory, "factory-ca.pem"), cert_pem(FACTORY_CA.cert)),
        "factory_crl": write(os.path.join(directory, "factory.crl"), crl.public_bytes(serialization.Encoding.PEM)),
    }


async def register(gateway: RunningGateway, device_id: str = "pump-17", password: str = "s3cret") -> None:
    await gateway.store.add_device(Device(device_id=device_id, password_hash=hash_password(password)))


async def client_certificate(
    gateway: RunningGateway,
    directory: str,
    common_name: str = "pump-17",
    ekus: tuple = (ExtendedKeyUsageOID.CLIENT_AUTH,),
    sans: tuple = (),
    record: bool = True,
) -> tuple[str, str, x509.Certificate]:
    """A certificate from the gateway's own CA, recorded as issued."""
    key = new_key()
    cert = gateway.service.state.ca.sign(
        IssueRequest(subject=name(common_name), public_key=key.public_key(), sans=tuple(sans)),
        Profile(extended_key_usage=tuple(ekus)),
    )
    if record:
        await gateway.store.record_certificate(IssuedCertificate.from_certificate(cert, "test", "test"))
    prefix = os.path.join(directory, f"{common_name}-{cert.serial_number:x}")
    cert_path = write(prefix + ".pem", cert_pem(cert))
    key_path = write(prefix + ".key", key_pem(key))
    return cert_path, key_path, cert


def _key_for(cert_path: str) -> Any:
    with open(cert_path[: -len(".pem")] + ".key", "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def basic_csr(common_name: str = "pump-17", **kwargs: Any) -> bytes:
    return csr_pem(make_csr(new_key(), common_name, **kwargs))


# -- rows ---------------------------------------------------------------------------


async def unknown_device(gw, d):
    return {"data": basic_csr(), "user": "ghost:s3cret"}


async def wrong_password(gw, d):
    await register(gw)
    return {"data": basic_csr(), "user": "pump-17:wrong"}


async def no_credentials(gw, d):
    return {"data": basic_csr()}


async def untrusted_certificate(gw, d):
    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name("pump-17")).issuer_name(name("pump-17"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return {"data": basic_csr(), "cert": write(f"{d}/self.pem", cert_pem(cert)), "key": write(f"{d}/self.key", key_pem(key))}


async def reenroll_without_certificate(gw, d):
    return {"data": basic_csr()}


async def revoked_certificate(gw, d):
    cert_path, key_path, cert = await client_certificate(gw, d)
    await gw.store.revoke_certificate(cert.serial_number, "keyCompromise")
    return {"data": csr_pem(make_csr(_key_for(cert_path), "pump-17")), "cert": cert_path, "key": key_path}


async def no_client_auth_eku(gw, d):
    cert_path, key_path, _ = await client_certificate(gw, d, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,))
    return {"data": basic_csr(), "cert": cert_path, "key": key_path}


async def subject_mismatch(gw, d):
    cert_path, key_path, _ = await client_certificate(gw, d)
    return {"data": basic_csr("pump-18"), "cert": cert_path, "key": key_path}


async def san_mismatch(gw, d):
    cert_path, key_path, _ = await client_certificate(gw, d, sans=(x509.DNSName("pump-17"),))
    return {"data": basic_csr(sans=[x509.DNSName("pump-17"), x509.DNSName("other.example")]), "cert": cert_path, "key": key_path}


async def not_last_issued(gw, d):
    old_cert, old_key, _ = await client_certificate(gw, d, sans=(x509.DNSName("pump-17"),))
    # A later certificate for the same subject makes the first one old.
    await client_certificate(gw, d, sans=(x509.DNSName("pump-17"),))
    return {"data": basic_csr(), "cert": old_cert, "key": old_key}


async def malformed_subject(gw, d):
    await register(gw)
    from cryptography.x509.oid import NameOID

    subject = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "USA", _validate=False),
        x509.NameAttribute(NameOID.COMMON_NAME, "pump-17"),
    ])
    return {"data": csr_pem(make_csr(new_key(), subject)), "user": "pump-17:s3cret"}


async def foreign_certificate(gw, d):
    idevid = FACTORY_CA.issue(d, "pump-17")
    return {"data": basic_csr(), **idevid.curl}


async def certificate_enrolls_other_subject(gw, d):
    cert_path, key_path, _ = await client_certificate(gw, d)
    return {"data": basic_csr("pump-18"), "cert": cert_path, "key": key_path}


async def device_wrong_subject(gw, d):
    await register(gw)
    return {"data": basic_csr("pump-18"), "user": "pump-17:s3cret"}


async def bad_signature(gw, d):
    await register(gw)
    der = bytearray(make_csr(new_key(), "pump-17").public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    return {"data": bytes(der), "user": "pump-17:s3cret", "content_type": "application/pkcs10"}


async def weak_key(gw, d):
    await register(gw)
    return {"data": csr_pem(make_csr(new_key("rsa1024"), "pump-17")), "user": "pump-17:s3cret"}


async def unknown_curve(gw, d):
    await register(gw)
    return {"data": csr_pem(make_csr(ec.generate_private_key(ec.SECP256K1()), "pump-17")), "user": "pump-17:s3cret"}


async def no_subject(gw, d):
    cert_path, key_path, _ = await client_certificate(gw, d)
    return {"data": csr_pem(make_csr(new_key(), x509.Name([]))), "cert": cert_path, "key": key_path}


async def cmc_ra(gw, d):
    await register(gw)
    csr = make_csr(new_key(), "pump-17", extensions=[(x509.ExtendedKeyUsage([policy.CMC_RA]), False)])
    return {"data": csr_pem(csr), "user": "pump-17:s3cret"}


async def challenge_password(gw, d):
    await register(gw)
    csr = make_csr(new_key(), "pump-17", attributes=[(policy.CHALLENGE_PASSWORD, b"letmein")])
    return {"data": csr_pem(csr), "user": "pump-17:s3cret"}


async def bad_unstructured_address(gw, d):
    await register(gw)
    csr = make_csr(new_key(), "pump-17", attributes=[(policy.UNSTRUCTURED_ADDRESS, b"hall 4")])
    return {"data": csr_pem(csr), "user": "pump-17:s3cret"}


async def binding_missing(gw, d):
    await register(gw)
    return {"data": basic_csr(), "user": "pump-17:s3cret"}


async def binding_wrong(gw, d):
    await register(gw)
    csr = make_csr(new_key(), "pump-17", attributes=[(policy.CHALLENGE_PASSWORD, b"AAAAAAAAAAAAAAAA")])
    return {"data": csr_pem(csr), "user": "pump-17:s3cret"}


async def officer_without_role(gw, d):
    own = gateway_certificate(gw, d, "ra-7")
    return {"data": basic_csr("pump-99"), **own.curl}


async def officer_without_role_registered(gw, d):
    own = gateway_certificate(gw, d, "ra-7")
    await run_cli(gw, "officer", "add", "--cert", own.cert_path, "--role", "auditor", "--force")
    return {"data": basic_csr("pump-99"), **own.curl}


async def digest_wrong_password(gw, d):
    await run_cli(gw, "device", "add", "pump-17", "--password", "s3cret")
    return {"data": basic_csr(), "user": "pump-17:wrong", "digest": True}


async def extra_layer_without_certificate(gw, d):
    await run_cli(gw, "device", "add", "pump-17", "--password", "s3cret")
    return {"data": basic_csr(), "user": "pump-17:s3cret"}


async def extra_layer_wrong_password(gw, d):
    await run_cli(gw, "device", "add", "pump-17", "--password", "s3cret")
    own = gateway_certificate(gw, d, "pump-17")
    return {"data": basic_csr(), "user": "pump-17:wrong", **own.curl}


async def single_use_consumed(gw, d):
    await run_cli(gw, "device", "add", "pump-17", "--password", "s3cret", "--single-use")
    first = await gw.curl("simpleenroll", data=basic_csr(), user="pump-17:s3cret")
    assert first.status == 200, first.text
    return {"data": basic_csr(), "user": "pump-17:s3cret"}


async def factory_not_registered(gw, d):
    idevid = FACTORY_CA.issue(d, "ACME-PUMP-0017")
    return {"data": basic_csr(), **idevid.curl}


async def factory_cn_mismatch(gw, d):
    idevid = FACTORY_CA.issue(d, "ACME-PUMP-0017")
    await run_cli(gw, "device", "add", "pump-17", "--factory-cert", idevid.cert_path)
    return {"data": basic_csr("pump-18"), **idevid.curl}


async def factory_subject_value_mismatch(gw, d):
    idevid = FACTORY_CA.issue(d, "ACME-PUMP-0017")
    await run_cli(gw, "device", "add", "pump-17", "--factory-cert", idevid.cert_path,
                  "--subject-value", "serialNumber=SN17")
    return {"data": csr_pem(make_csr(new_key(), name("pump-17", serial_number="SN99"))), **idevid.curl}


async def factory_password_missing(gw, d):
    idevid = FACTORY_CA.issue(d, "ACME-PUMP-0017")
    await run_cli(gw, "device", "add", "pump-17", "--factory-cert", idevid.cert_path, "--password", "s3cret")
    return {"data": basic_csr(), **idevid.curl}


async def on_factory_crl(gw, d):
    await run_cli(gw, "device", "add", "pump-17", "--factory-cert", REVOKED_IDEVID.cert_path)
    return {"data": basic_csr(), **REVOKED_IDEVID.curl}


async def template_subject_missing(gw, d):
    await register(gw)
    return {"data": basic_csr(), "user": "pump-17:s3cret"}


async def template_key_wrong(gw, d):
    await register(gw)
    subject = name("pump-17", organization_name="ACME")
    return {"data": csr_pem(make_csr(new_key("rsa2048"), subject)), "user": "pump-17:s3cret"}


async def keygen_encryption_not_asked(gw, d):
    await register(gw)
    return {"data": basic_csr(), "user": "pump-17:s3cret"}


MATRIX: dict[str, Case] = {
    "unknown_device": Case("simpleenroll", 401, "bad-credentials", "unknown device or wrong password", unknown_device, "www-authenticate"),
    "wrong_password": Case("simpleenroll", 401, "bad-credentials", "unknown device or wrong password", wrong_password, "www-authenticate"),
    "no_credentials": Case("simpleenroll", 401, "authentication-required", "pre-registered device", no_credentials, "www-authenticate", bare=True),
    "untrusted_certificate": Case("simpleenroll", 403, "client-certificate-untrusted", "not trusted", untrusted_certificate),
    "reenroll_without_certificate": Case("simplereenroll", 403, "client-certificate-required", "client certificate", reenroll_without_certificate),
    "revoked_certificate": Case("simplereenroll", 403, "client-certificate-revoked", "revoked", revoked_certificate),
    "no_client_auth_eku": Case("simplereenroll", 403, "client-certificate-not-client-auth", "Client Authentication", no_client_auth_eku),
    "subject_mismatch": Case("simplereenroll", 403, "subject-mismatch", "differs from the client certificate subject", subject_mismatch),
    "san_mismatch": Case("simplereenroll", 403, "san-mismatch", "subjectAltNames differ", san_mismatch),
    "not_last_issued": Case("strict/simplereenroll", 403, "not-last-issued-certificate", "issued last", not_last_issued),
    "malformed_subject": Case("simpleenroll", 400, "csr-bad-subject", "countryName must be two letters", malformed_subject),
    "foreign_certificate": Case("simpleenroll", 403, "client-certificate-issuer-not-accepted", "issued by this gateway's CA only", foreign_certificate),
    "foreign_certificate_renews": Case("simplereenroll", 403, "client-certificate-issuer-not-accepted", "issued by this gateway's CA only", foreign_certificate),
    "certificate_enrolls_other_subject": Case("simpleenroll", 403, "subject-mismatch", "differs from the client certificate subject", certificate_enrolls_other_subject),
    "device_wrong_subject": Case("simpleenroll", 403, "subject-not-registered", "registered device id", device_wrong_subject),
    "bad_signature": Case("simpleenroll", 400, "csr-bad-signature", "signature does not verify", bad_signature),
    "weak_key": Case("simpleenroll", 400, "csr-weak-key", "at least 2048 bits", weak_key),
    "unknown_curve": Case("simpleenroll", 400, "csr-unsupported-curve", "secp256k1", unknown_curve),
    "no_subject": Case("simplereenroll", 400, "csr-no-subject", "neither a subject nor a subjectAltName", no_subject),
    "cmc_ra": Case("simpleenroll", 403, "csr-requests-cmcra", "id-kp-cmcRA", cmc_ra),
    "challenge_password": Case("simpleenroll", 403, "challenge-password-not-supported", "challengePassword attribute not supported", challenge_password),
    "bad_unstructured_address": Case("simpleenroll", 400, "csr-bad-unstructured-address", "not an IP address", bad_unstructured_address),
    "binding_missing": Case("bound/simpleenroll", 403, "channel-binding-missing", "channel binding", binding_missing),
    "binding_wrong": Case("bound/simpleenroll", 403, "channel-binding-mismatch", "tls-", binding_wrong),
    "officer_without_role": Case("ra/simpleenroll", 403, "officer-role-required", "officer roles ra", officer_without_role),
    "officer_other_role": Case("ra/simpleenroll", 403, "officer-role-required", "officer roles ra", officer_without_role_registered),
    "digest_wrong_password": Case("digest/simpleenroll", 401, "bad-credentials", "unknown device or wrong password", digest_wrong_password, "www-authenticate", challenges=1),
    "extra_layer_without_certificate": Case("extra/simpleenroll", 403, "client-certificate-required", "client certificate", extra_layer_without_certificate),
    "extra_layer_wrong_password": Case("extra/simpleenroll", 401, "bad-credentials", "wrong password", extra_layer_wrong_password, "www-authenticate"),
    "single_use_consumed": Case("simpleenroll", 403, "single-use-consumed", "already been used", single_use_consumed),
    "factory_not_registered": Case("factory/simpleenroll", 403, "factory-certificate-not-registered", "not a registered factory certificate", factory_not_registered),
    "factory_cn_mismatch": Case("factory/simpleenroll", 403, "factory-cn-mismatch", "'pump-18' is not 'pump-17'", factory_cn_mismatch),
    "factory_subject_value_mismatch": Case("factory/simpleenroll", 403, "subject-value-mismatch", "serialNumber", factory_subject_value_mismatch),
    "factory_password_missing": Case("factorypw/simpleenroll", 401, "password-required", "password", factory_password_missing, "www-authenticate", bare=True),
    "serverkeygen_no_credentials": Case("serverkeygen", 401, "authentication-required", "pre-registered device", no_credentials, "www-authenticate", bare=True),
    "serverkeygen_wrong_subject": Case("serverkeygen", 403, "subject-not-registered", "registered device id", device_wrong_subject),
    "serverkeygen_encryption_required": Case("serverkeygen", 400, "serverkeygen-encryption-required", "only encrypted", keygen_encryption_not_asked),
    "serverkeygen_revoked_certificate": Case("serverkeygen", 403, "client-certificate-revoked", "revoked", revoked_certificate),
    "template_subject_missing": Case("tmpl/simpleenroll", 403, "csr-template-subject", "lacks organizationName", template_subject_missing),
    "template_key_wrong": Case("tmpl/simpleenroll", 403, "csr-template-key", "rsa-2048; csrattrs announces ec-p256", template_key_wrong),
    "template_on_serverkeygen": Case("tmpl/serverkeygen", 403, "csr-template-subject", "lacks organizationName", template_subject_missing),
    "on_factory_crl": Case("factory/simpleenroll", 403, "client-certificate-revoked", "certificate revocation list", on_factory_crl),
}


class RefusalMatrixTests(TestCase):
    """One test per row of MATRIX (generated below)."""

    async def check(self, case: Case) -> None:
        events: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "estgw.audit":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        gateway = await RunningGateway.start(self, FULL_CONFIG.format(**write_factory_files(directory)))
        request = await case.setup(gateway, directory)
        before = await gateway.store.count_certificates()
        del events[:]  # only what the request under test causes
        result = await gateway.curl(case.path, **request)
        self.assertEqual(result.status, case.status, result.text)
        if case.bare:
            self.assertEqual((result.body, result.headers.get("content-length")), (b"", "0"))
        else:
            self.assertIn(case.reason, result.text)
            self.assertTrue(result.headers.get("content-type", "").startswith("text/plain"))
        if case.header:
            self.assertIn(case.header, result.headers)
        refused = [e for e in events if e.get("event") == "refused"]
        self.assertEqual([e["code"] for e in refused], ["authentication-required"] * case.challenges + [case.code])
        self.assertIn(case.reason, refused[-1]["reason"])
        issued = [e for e in events if e.get("event") == "issued"]
        self.assertEqual(issued, [])
        self.assertEqual(await gateway.store.count_certificates(), before)


def _make_test(case_name: str, case: Case) -> Callable[[RefusalMatrixTests], Awaitable[None]]:
    async def test(self: RefusalMatrixTests) -> None:
        await self.check(case)

    test.__name__ = f"test_{case_name}"
    test.__doc__ = f"{case.path}: {case.status} {case.code}, nothing issued."
    return test


for _name, _case in MATRIX.items():
    setattr(RefusalMatrixTests, f"test_{_name}", _make_test(_name, _case))
