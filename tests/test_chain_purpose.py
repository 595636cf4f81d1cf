"""The client chain must be fit for TLS client authentication, at every
depth, over real TLS with curl: a CA certificate of the chain not valid
for clientAuth, or a leaf whose keyUsage does not allow digitalSignature,
is refused (403 client-certificate-untrusted), and nothing is issued.
The leaf's extendedKeyUsage stays the gateway's own check."""

from __future__ import annotations

import datetime
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID
from twisted.trial.unittest import SynchronousTestCase

from estgw import tls
from estgw.ca import IssueRequest, Profile
from estgw.testing import cert_pem, key_pem, name, new_key, write
from estgw.testing import RunningGateway
from tests.test_auth import (
    CLIENT_AUTH,
    FACTORY_CA,
    SECURITY_CONFIG,
    AuditLog,
    Credentials,
    FactoryCA,
    SecurityTestCase,
    csr_for,
    directory_for,
    record,
    run_cli,
)

SERVER_AUTH = (ExtendedKeyUsageOID.SERVER_AUTH,)
UNTRUSTED = "client-certificate-untrusted"


def _usage(**allowed: bool) -> x509.KeyUsage:
    fields = dict.fromkeys(
        ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
         "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
        False,
    )
    fields.update(allowed)
    return x509.KeyUsage(**fields)


def _builder(subject: x509.Name, issuer: x509.Name, key: Any) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
    )


class RootCA(FactoryCA):
    """A device maker's root CA, which may have sub-CAs."""

    def __init__(self) -> None:
        super().__init__("Acme Root CA")
        self.cert = (
            _builder(self.cert.subject, self.cert.subject, self.key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
            .sign(self.key, hashes.SHA256())
        )


ROOT_CA = RootCA()


def sub_ca(ekus: Sequence[x509.ObjectIdentifier] | None) -> tuple[x509.Certificate, Any]:
    """A sub-CA of ROOT_CA, with the given EKU extension (None: without one)."""
    key = new_key()
    builder = (
        _builder(name("Acme Line 3 CA"), ROOT_CA.cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_usage(key_cert_sign=True, crl_sign=True), critical=True)
    )
    if ekus is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
    return builder.sign(ROOT_CA.key, hashes.SHA256()), key


def leaf(
    directory: str, common_name: str, issuer: x509.Certificate, issuer_key: Any,
    chain: Sequence[x509.Certificate] = (), usage: x509.KeyUsage | None = None,
) -> Credentials:
    """A client certificate (EKU clientAuth) whose PEM file carries ``chain`` after it."""
    key = new_key()
    builder = _builder(name(common_name), issuer.subject, key).add_extension(
        x509.ExtendedKeyUsage(list(CLIENT_AUTH)), critical=False
    )
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    cert = builder.sign(issuer_key, hashes.SHA256())
    prefix = f"{directory}/{common_name}-{cert.serial_number:x}"
    return Credentials(write(prefix + ".pem", cert_pem(cert, *chain)), write(prefix + ".key", key_pem(key)), cert, key)


class ChainPurposeTests(SecurityTestCase):
    """Registered factory certificates (handler 25, label factory) and the
    gateway's own certificates renewing (simplereenroll)."""

    async def setUp(self) -> None:
        # Both the factory CA and ROOT_CA are trust anchors.
        self.audit = AuditLog(self)
        anchors = directory_for(self)
        files = [write(f"{anchors}/{n}.pem", cert_pem(ca.cert)) for n, ca in (("factory", FACTORY_CA), ("root", ROOT_CA))]
        self.gateway = await RunningGateway.start(self, SECURITY_CONFIG.format(factory_ca=", ".join(files)))
        self.directory = directory_for(self)

    async def enroll_factory(self, credentials: Credentials) -> Any:
        own = write(credentials.cert_path[: -len(".pem")] + "-alone.pem", cert_pem(credentials.cert))
        await run_cli(self.gateway, "device", "add", "pump-17", "--factory-cert", own)
        return await self.gateway.curl("factory/simpleenroll", data=csr_for("pump-17"), **credentials.curl)

    async def test_sub_ca_server_auth_only_refused(self) -> None:
        """A leaf under a sub-CA whose EKU is serverAuth only: the chain is
        not fit for client authentication (403), nothing issued."""
        ca, ca_key = sub_ca(SERVER_AUTH)
        result = await self.enroll_factory(leaf(self.directory, "ACME-PUMP-0017", ca, ca_key, [ca]))
        await self.assertRefused(
            result, 403, UNTRUSTED, "(depth 1: a CA certificate of the chain is not valid for TLS client authentication)"
        )
        self.assertIn("certificate purpose", result.text)  # OpenSSL's words

    async def test_sub_ca_client_auth_accepted(self) -> None:
        """The same chain with a sub-CA whose EKU includes clientAuth, or
        that has no EKU at all, enrolls: only unfit CAs are refused."""
        for ekus in ((ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH), None):
            ca, ca_key = sub_ca(ekus)
            credentials = leaf(self.directory, "ACME-PUMP-0017", ca, ca_key, [ca])
            await self.gateway.store.remove_device("pump-17")
            result = await self.enroll_factory(credentials)
            self.assertEqual(result.status, 200, (ekus, result.text))
        self.assertEqual(await self.gateway.store.count_certificates(), 2)

    async def test_anchor_issued_leaf_key_encipherment_only_refused(self) -> None:
        """A leaf issued by a trust anchor with keyUsage keyEncipherment
        only cannot sign a TLS handshake as a client: 403, nothing issued."""
        credentials = leaf(
            self.directory, "ACME-PUMP-0017", FACTORY_CA.cert, FACTORY_CA.key, usage=_usage(key_encipherment=True)
        )
        result = await self.enroll_factory(credentials)
        await self.assertRefused(result, 403, UNTRUSTED, "keyUsage of the client certificate does not allow digitalSignature")

    async def test_key_agreement_only_refused(self) -> None:
        """keyAgreement alone (which OpenSSL would let pass) is refused too:
        the client authenticates by a signature, never by a fixed (EC)DH key."""
        credentials = leaf(
            self.directory, "ACME-PUMP-0017", FACTORY_CA.cert, FACTORY_CA.key, usage=_usage(key_agreement=True)
        )
        result = await self.enroll_factory(credentials)
        await self.assertRefused(result, 403, UNTRUSTED, "does not allow digitalSignature")

    async def test_digital_signature_accepted(self) -> None:
        """keyUsage digitalSignature (with keyAgreement beside it) is a client key: issued."""
        credentials = leaf(
            self.directory, "ACME-PUMP-0017", FACTORY_CA.cert, FACTORY_CA.key,
            usage=_usage(digital_signature=True, key_agreement=True),
        )
        result = await self.enroll_factory(credentials)
        await self.assertIssued(result, "factory:pump-17")

    async def test_own_certificate_key_encipherment_only_refused(self) -> None:
        """A certificate of the gateway's own CA (a token procedure that
        issued keyUsage keyEncipherment only) cannot renew: 403."""
        key = new_key("rsa2048")
        cert = self.gateway.service.state.ca.sign(
            IssueRequest(subject=name("pump-17"), public_key=key.public_key()),
            Profile(key_usage=frozenset({"key_encipherment"}), extended_key_usage=CLIENT_AUTH),
        )
        prefix = f"{self.directory}/own"
        credentials = Credentials(write(prefix + ".pem", cert_pem(cert)), write(prefix + ".key", key_pem(key)), cert, key)
        await record(self.gateway, credentials)
        result = await self.gateway.curl("simplereenroll", data=csr_for("pump-17"), **credentials.curl)
        await self.assertRefused(result, 403, UNTRUSTED, "does not allow digitalSignature", before=1)

    async def test_leaf_eku_left_to_the_gateway(self) -> None:
        """A leaf of the gateway's CA with EKU serverAuth only passes the TLS
        layer and is refused by the gateway's own EKU rule, with its own code."""
        key = new_key()
        cert = self.gateway.service.state.ca.sign(
            IssueRequest(subject=name("pump-17"), public_key=key.public_key()), Profile(extended_key_usage=SERVER_AUTH)
        )
        prefix = f"{self.directory}/server-only"
        credentials = Credentials(write(prefix + ".pem", cert_pem(cert)), write(prefix + ".key", key_pem(key)), cert, key)
        await record(self.gateway, credentials)
        result = await self.gateway.curl("simplereenroll", data=csr_for("pump-17"), **credentials.curl)
        await self.assertRefused(
            result, 403, "client-certificate-not-client-auth", "lacks the Client Authentication", before=1
        )


class LeafPurposeTests(SynchronousTestCase):
    """tls.leaf_purpose_problem, the rule for what OpenSSL cannot tell apart."""

    def certificate(self, *extensions: x509.ExtensionType) -> x509.Certificate:
        key = new_key()
        builder = _builder(name("pump-17"), FACTORY_CA.cert.subject, key)
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(FACTORY_CA.key, hashes.SHA256())

    def test_no_key_usage(self) -> None:
        """No keyUsage extension: unrestricted (RFC 5280 §4.2.1.3), even after
        OpenSSL's purpose error (then it was the EKU, the gateway's to judge)."""
        self.assertIsNone(tls.leaf_purpose_problem(self.certificate()))
        self.assertIsNone(tls.leaf_purpose_problem(self.certificate(), openssl_refused=True))

    def test_key_usage(self) -> None:
        """Only a keyUsage with digitalSignature is a client key."""
        self.assertIsNone(tls.leaf_purpose_problem(self.certificate(_usage(digital_signature=True))))
        for usage in (_usage(key_encipherment=True), _usage(key_agreement=True), _usage(content_commitment=True)):
            self.assertIn("digitalSignature", tls.leaf_purpose_problem(self.certificate(usage)) or "")

    def test_netscape_certificate_type(self) -> None:
        """With a Netscape certificate type extension, OpenSSL's purpose
        error stands (it may be that extension, not the EKU)."""
        netscape = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.16.840.1.113730.1.1"), b"\x03\x02\x05\x40")
        cert = self.certificate(netscape)
        self.assertIsNone(tls.leaf_purpose_problem(cert))
        self.assertIn("Netscape", tls.leaf_purpose_problem(cert, openssl_refused=True) or "")
