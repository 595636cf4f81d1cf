"""``tokenprocedure.<n>.ca = pkcs11``: the issuing key in a SoftHSM2 token.

Certificates issued end to end over real TLS (curl as the device,
openssl verifies them against what cacerts serves), RSA and EC keys,
signing off the reactor thread, and a real twistd that refuses to start
on a wrong PIN or a missing key.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import SignatureAlgorithmOID
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from estgw.ca import IssueRequest
from estgw.config import ConfigError, from_string
from estgw.passwords import hash_password
from estgw.protocol import decode_certs_only
from estgw.store import Device
from estgw.testing import RunningGateway, _which, cert_pem, name, new_key, run_process, write
from tests import softhsm
from tests.test_e2e import Client
from tests.test_twistd import START_TIMEOUT, TWISTD, Daemon, _wait, environment

SKIP = softhsm.skip_reason()
DEVICE, PASSWORD = "pump-1", "hsm pass 1"


def hsm_config(certificate: str, chain: str, pin_file: str, token: str, key_label: str, extra: str = "") -> str:
    return f"""\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
tokenprocedure.1.name = HSM Procedure
tokenprocedure.1.ca = pkcs11
tokenprocedure.1.validity.days = 30
tokenprocedure.1.pkcs11.module = {softhsm.module_path()}
tokenprocedure.1.pkcs11.token = {token}
tokenprocedure.1.pkcs11.keyLabel = {key_label}
tokenprocedure.1.pkcs11.pinFile = {pin_file}
tokenprocedure.1.pkcs11.certificate = {certificate}
tokenprocedure.1.pkcs11.chain = {chain}
default.tokenprocedure = HSM Procedure
handler.1.operation = cacerts
handler.2.operation = simpleenroll
handler.2.authtype = Basic
handler.2.realm = hsm
{extra}"""


class _Keys:
    """One token per test process, with an RSA-2048, a P-256 and a P-384 key."""

    made: dict[str, tuple[Any, x509.Certificate, str, str]] = {}
    root = None

    @classmethod
    def get(cls, kind: str, directory: str) -> tuple[str, str, str]:
        """(token label, key label, directory with issuing.pem + chain.pem) for ``kind``."""
        hsm = softhsm.shared()
        if cls.root is None:
            cls.root = softhsm.TestRoot()
        label = f"issuing-{kind}"
        if kind not in cls.made:
            public = hsm.public_keys[kind]
            cls.made[kind] = (public, cls.root.issuing(public, f"HSM {kind} Issuing CA"), "estgw-test", label)
        _public, issuing, token, label = cls.made[kind]
        os.makedirs(directory, exist_ok=True)
        write(os.path.join(directory, "issuing.pem"), cert_pem(issuing))
        write(os.path.join(directory, "chain.pem"), cert_pem(cls.root.cert))
        return token, label, directory


class Pkcs11TestCase(TestCase):
    skip = SKIP

    def files(self, kind: str) -> tuple[str, str, str, str]:
        directory = os.path.abspath(self.mktemp())
        token, label, directory = _Keys.get(kind, directory)
        return token, label, os.path.join(directory, "issuing.pem"), os.path.join(directory, "chain.pem")

    async def gateway(self, kind: str, **overrides: str) -> RunningGateway:
        token, label, certificate, chain = self.files(kind)
        settings = dict(
            certificate=certificate, chain=chain, pin_file=softhsm.shared().pin_file, token=token, key_label=label
        )
        settings.update(overrides)
        gateway = await RunningGateway.start(self, hsm_config(**settings))
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        return gateway


class IssueTests(Pkcs11TestCase):
    async def enroll_and_verify(self, kind: str, algorithm: x509.ObjectIdentifier | None) -> x509.Certificate:
        gateway = await self.gateway(kind)
        client = Client(self, gateway, "device")
        chain_pem = await client.cacerts()
        chain = x509.load_pem_x509_certificates(open(chain_pem, "rb").read())
        # PKCS#7 holds a SET OF certificates: their order is not kept.
        self.assertEqual(sorted(c.subject.rfc4514_string() for c in chain),
                         [f"O=estgw tests,CN=HSM Test Root CA", f"O=estgw tests,CN=HSM {kind} Issuing CA"])
        _key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        issued_pem = await client.certificates(result.body)
        await client.verify(issued_pem, chain_pem)  # openssl verify -purpose sslclient
        (issued,) = x509.load_pem_x509_certificates(open(issued_pem, "rb").read())
        if algorithm is not None:
            self.assertEqual(issued.signature_algorithm_oid, algorithm)
        self.assertEqual(issued.subject.rfc4514_string(), f"CN={DEVICE}")
        records = await gateway.store.list_certificates()
        self.assertEqual([r.serial for r in records], [issued.serial_number])
        return issued

    async def test_rsa_2048(self) -> None:
        """An RSA-2048 key in the token signs (sha256WithRSAEncryption);
        openssl verifies the certificate against cacerts' chain."""
        await self.enroll_and_verify("rsa-2048", SignatureAlgorithmOID.RSA_WITH_SHA256)

    async def test_ec_p256(self) -> None:
        """A P-256 key: the token's raw r||s becomes a DER ECDSA-Sig-Value
        that openssl accepts (ecdsa-with-SHA256)."""
        await self.enroll_and_verify("ec-p256", SignatureAlgorithmOID.ECDSA_WITH_SHA256)

    async def test_ec_p384(self) -> None:
        """A P-384 key: the token signs with the hash the certificate names."""
        issued = await self.enroll_and_verify("ec-p384", None)
        self.assertIn(
            issued.signature_algorithm_oid,
            (SignatureAlgorithmOID.ECDSA_WITH_SHA256, SignatureAlgorithmOID.ECDSA_WITH_SHA384),
        )

    async def test_signing_is_off_the_reactor_thread(self) -> None:
        """The token is used on a pool thread, never on the reactor's."""
        gateway = await self.gateway("ec-p256")
        procedure = gateway.service.state.procedures["HSM Procedure"]
        threads = []
        original = procedure.ca._token_sign

        def spy(data: bytes, hash: Any) -> bytes:
            threads.append(threading.current_thread())
            return original(data, hash)

        procedure.ca._token_sign = spy
        key = new_key()
        issued = await procedure.issue(IssueRequest(name("t-1"), key.public_key()))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.main_thread())
        issued.verify_directly_issued_by(procedure.chain()[0])

    async def test_lost_session_is_reopened(self) -> None:
        """The token's session disappears (an HSM restart closes it): the
        next certificate logs in again and is signed."""
        gateway = await self.gateway("ec-p256")
        procedure = gateway.service.state.procedures["HSM Procedure"]
        procedure.ca._login.session.close()
        issued = await procedure.issue(IssueRequest(name("after-loss"), new_key().public_key()))
        issued.verify_directly_issued_by(procedure.chain()[0])

    async def test_token_that_cannot_sign_is_503(self) -> None:
        """A token that stays unusable: 503 with Retry-After, nothing issued."""
        import pkcs11

        gateway = await self.gateway("ec-p256")
        procedure = gateway.service.state.procedures["HSM Procedure"]
        login = procedure.ca._login

        def unreachable() -> None:
            raise pkcs11.TokenNotPresent()

        login.reopen, original = unreachable, login.reopen
        self.addCleanup(setattr, login, "reopen", original)
        login.session.close()
        self.addCleanup(original)
        client = Client(self, gateway, "device")
        _key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 503, result.text)
        self.assertEqual(result.headers.get("retry-after"), "60")
        self.assertIn("the CA cannot sign now", result.text)
        self.assertEqual(await gateway.store.count_certificates(), 0)
        self.flushLoggedErrors()

    async def test_concurrent_signatures(self) -> None:
        """Twenty signatures at once over one session all verify."""
        gateway = await self.gateway("rsa-2048")
        procedure = gateway.service.state.procedures["HSM Procedure"]
        keys = [new_key() for _ in range(20)]
        issued = await defer.gatherResults(
            [procedure.issue(IssueRequest(name(f"c-{i}"), k.public_key())) for i, k in enumerate(keys)]
        )
        for certificate in issued:
            certificate.verify_directly_issued_by(procedure.chain()[0])
        self.assertEqual(len({c.serial_number for c in issued}), 20)


class ReadmeTests(Pkcs11TestCase):
    async def test_readme_example(self) -> None:
        """README.rst's ca = pkcs11 example, as written (listening on any
        free port, as --port 0 would): curl enrolls, openssl verifies."""
        import attr

        text = softhsm.readme_example("A complete configuration (``tests/test_pkcs11.py``")
        self.assertIn("tokenprocedure.1.ca = pkcs11", text)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "hsm"))
        hsm = softhsm.shared()
        self.files("ec-p256")  # makes the test root
        assert _Keys.root is not None
        issuing = _Keys.root.issuing(hsm.public_keys["readme"], "README Issuing CA")
        write(os.path.join(directory, "hsm", "issuing-ca.pem"), cert_pem(issuing))
        write(os.path.join(directory, "hsm", "root-ca.pem"), cert_pem(_Keys.root.cert))
        write(os.path.join(directory, "hsm", "pin"), softhsm.PIN.encode() + b"\n")
        gateway = RunningGateway(directory, text)
        gateway.config = attr.evolve(gateway.config, port=0, interface="127.0.0.1")
        await gateway.run()
        self.addCleanup(gateway.stop)
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


    async def test_readme_token_commands(self) -> None:
        """README.rst's commands that make a SoftHSM2 token, a key pair in it
        and the CA certificate of its public key, run by bash as written (on
        a token directory of their own): the certificate is a CA of the
        token's key, issued by the root, and the PIN file is 0600."""
        from tests.test_readme_examples import literal_block

        script = literal_block("    # example: pkcs11 token")
        self.assertIn("-force_pubkey", script)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "tokens"))
        conf = write(os.path.join(directory, "softhsm2.conf"),
                     f"directories.tokendir = {directory}/tokens\nobjectstore.backend = file\n".encode())
        env = dict(os.environ, SOFTHSM2_CONF=conf)
        done = await run_process(["bash", "-euo", "pipefail", "-c", script], env=env, path=directory)
        self.assertEqual(done.code, 0, done.stderr.decode())
        run = await run_process(["openssl", "verify", "-CAfile", "hsm/root-ca.pem", "hsm/issuing-ca.pem"],
                                path=directory)
        self.assertIn(b": OK", run.stdout, run.stderr)
        with open(os.path.join(directory, "hsm", "issuing-ca.pem"), "rb") as f:
            issuing = x509.load_pem_x509_certificate(f.read())
        with open(os.path.join(directory, "issuing-ca.pub.pem"), "rb") as f:
            token_key = f.read()
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        self.assertEqual(issuing.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), token_key)
        self.assertTrue(issuing.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        self.assertEqual(os.stat(os.path.join(directory, "hsm", "pin")).st_mode & 0o777, 0o600)


class StartTests(Pkcs11TestCase):
    """What stops the gateway from starting (in process; twistd below)."""

    def start_fails(self, reason: str, **overrides: str) -> None:
        from estgw.tap import GatewayService
        from twisted.python import usage

        token, label, certificate, chain = self.files("ec-p256")
        settings = dict(
            certificate=certificate, chain=chain, pin_file=softhsm.shared().pin_file, token=token, key_label=label
        )
        settings.update(overrides)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(os.path.join(directory, "est.properties"), hsm_config(**settings).encode())
        from estgw.config import load

        with self.assertRaises(usage.UsageError) as caught:
            GatewayService(load(path), reactor)
        self.assertIn(reason, str(caught.exception))

    def test_certificate_of_another_key(self) -> None:
        """A certificate that does not belong to the token's key is refused at start."""
        _token, _label, other, _chain = self.files("rsa-2048")
        self.start_fails("does not belong to the issuing CA certificate", certificate=other)

    def test_not_a_ca_certificate(self) -> None:
        """An end-entity certificate for the token key is not an issuing CA."""
        self.files("ec-p256")
        public = _Keys.made["ec-p256"][0]
        assert _Keys.root is not None
        leaf = _Keys.root.issuing(public, "not a CA", ca=False)
        path = write(os.path.abspath(self.mktemp()), cert_pem(leaf))
        self.start_fails("is not a CA certificate allowed to sign", certificate=path)

    def test_unknown_token(self) -> None:
        self.start_fails("no token labelled 'no-such-token'", token="no-such-token")

    def test_empty_pin_file(self) -> None:
        path = write(os.path.abspath(self.mktemp()), b"\n")
        self.start_fails("is empty; it must hold the token's user PIN", pin_file=path)


class ConfigTests(TestCase):
    def test_pkcs11_keys_need_ca_pkcs11(self) -> None:
        """pkcs11.* keys on another kind are an error naming the key."""
        with self.assertRaises(ConfigError) as caught:
            from_string("tokenprocedure.1.name = p\ntokenprocedure.1.pkcs11.token = t\n")
        self.assertEqual(caught.exception.key, "tokenprocedure.1.pkcs11.token")
        self.assertIn("only for ca = pkcs11, not local", caught.exception.reason)

    def test_required_keys(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_string("tokenprocedure.1.name = p\ntokenprocedure.1.ca = pkcs11\n")
        self.assertEqual(caught.exception.key, "tokenprocedure.1.pkcs11.module")
        self.assertIn("required with ca = pkcs11", caught.exception.reason)

    def test_missing_files(self) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        text = "".join(
            f"tokenprocedure.1.{k} = {v}\n"
            for k, v in (
                ("name", "p"), ("ca", "pkcs11"), ("pkcs11.module", "/no/such/module.so"),
                ("pkcs11.token", "t"), ("pkcs11.keyLabel", "k"), ("pkcs11.pinFile", "pin"),
                ("pkcs11.certificate", "c.pem"),
            )
        )
        with self.assertRaises(ConfigError) as caught:
            from_string(text, base_dir=directory)
        self.assertEqual(caught.exception.key, "tokenprocedure.1.pkcs11.module")
        self.assertIn("no such file: /no/such/module.so", caught.exception.reason)


class TwistdStartTests(Pkcs11TestCase):
    """The real daemon: a wrong PIN or a missing key stops it with a message."""

    async def refuses_to_start(self, key: str, reason: str, **overrides: str) -> None:
        token, label, certificate, chain = self.files("ec-p256")
        settings = dict(
            certificate=certificate, chain=chain, pin_file=softhsm.shared().pin_file, token=token, key_label=label
        )
        settings.update(overrides)
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        config = write(os.path.join(directory, "est.properties"), hsm_config(**settings).encode())
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", "estgw", "--config", config, "--port", "0"]
        env = {**environment(), "SOFTHSM2_CONF": softhsm.shared().conf}
        reactor.spawnProcess(daemon, argv[0], argv, env=env, path=directory)
        self.addCleanup(daemon.stop)
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIsNone(daemon.port, "it must not listen")
        self.assertIn(f"{config}: tokenprocedure.1.{key}: {reason}", output)
        self.assertNotIn("Traceback", output)

    async def test_wrong_pin(self) -> None:
        pin = write(os.path.abspath(self.mktemp()), b"0000\n")
        await self.refuses_to_start(
            "pkcs11.pinFile", "cannot log in to token 'estgw-test': the PIN was rejected", pin_file=pin
        )

    async def test_missing_key(self) -> None:
        await self.refuses_to_start(
            "pkcs11.keyLabel", "token 'estgw-test' holds no private key labelled 'no-such-key'",
            key_label="no-such-key",
        )

    async def test_starts_and_issues(self) -> None:
        """With the right PIN and key twistd serves, and curl enrolls."""
        token, label, certificate, chain = self.files("rsa-2048")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        config = write(
            os.path.join(directory, "est.properties"),
            hsm_config(certificate, chain, softhsm.shared().pin_file, token, label).encode(),
        )
        daemon = Daemon()
        argv = TWISTD + ["-n", "--pidfile=", "estgw", "--config", config, "--port", "0"]
        env = {**environment(), "SOFTHSM2_CONF": softhsm.shared().conf}
        reactor.spawnProcess(daemon, argv[0], argv, env=env, path=directory)
        self.addCleanup(daemon.stop)
        port = await daemon.ready()
        body = os.path.join(directory, "cacerts")
        result = await run_process([
            _which("curl"), "-sS", "--max-time", "20", "-o", body, "-w", "%{http_code}",
            "--cacert", os.path.join(directory, "state", "ca", "root-ca.pem"),
            f"https://127.0.0.1:{port}/.well-known/est/cacerts",
        ])
        self.assertEqual(result.stdout, b"200", result.stderr)
        chain_served = decode_certs_only(open(body, "rb").read())
        (issuing,) = [c for c in chain_served if c.subject.rfc4514_string().endswith("CN=HSM rsa-2048 Issuing CA")]
        self.assertIsInstance(issuing.public_key(), rsa.RSAPublicKey)
        self.assertEqual(len(chain_served), 2)


class HsmPublishTests(Pkcs11TestCase):
    """CRLs and OCSP responses of an HSM CA are signed in the token: the
    publishing listener serves them, and openssl checks a revoked and a
    good certificate against them (the checks of tests/test_publish.py)."""

    async def test_crl_and_ocsp_signed_in_the_token(self) -> None:
        from urllib.parse import quote

        from tests import test_e2e, test_publish

        # A P-256 CA answering OCSP itself; an RSA one through a delegated
        # responder certificate it issues (signed in the token too).
        for kind, responder in (("ec-p256", "ca"), ("rsa-2048", "delegated")):
            publish = test_publish.free_port()
            base = f"http://127.0.0.1:{publish}"
            name = quote("HSM Procedure", safe="")
            token, label, certificate, chain = self.files(kind)
            extra = "".join(
                f"{line}\n" for line in (
                    f"publish.port = {publish}", "publish.interface = 127.0.0.1",
                    f"tokenprocedure.1.crl.url = {base}/crl/{name}.crl",
                    f"tokenprocedure.1.ocsp.url = {base}/ocsp/{name}",
                    f"tokenprocedure.1.caIssuers.url = {base}/ca/{name}.crt",
                    f"tokenprocedure.1.ocsp.responder = {responder}",
                )
            )
            config = hsm_config(certificate, chain, softhsm.shared().pin_file, token, label, extra)
            gateway = RunningGateway(os.path.abspath(self.mktemp()), config)
            await gateway.run()
            publishing = test_publish._Publishing(methodName="run")
            publishing.gateway, publishing.publish = gateway, publish
            publishing.client = Client(self, gateway, "client")
            # _Publishing's assertions run on this test case.
            for method in ("assertEqual", "assertIn", "assertNotIn", "assertIsNone", "assertIsNotNone",
                           "assertNotEqual"):
                setattr(publishing, method, getattr(self, method))
            try:
                await gateway.store.add_device(Device(test_e2e.DEVICE, hash_password(test_e2e.PASSWORD)))
                await publishing.check_kind("HSM Procedure", "")
                signed = x509.load_pem_x509_crl(
                    open(os.path.join(gateway.config.state_directory, "tokenprocedures", name, "crl.pem"), "rb").read()
                )
                self.assertTrue(signed.is_signature_valid(_Keys.made[kind][1].public_key()))
            finally:
                await gateway.stop()

    async def _publishing_hsm(self, extra: str = "") -> tuple[RunningGateway, Client, str, str, str, str]:
        """A gateway signing with an EC key in SoftHSM and publishing its CRL
        and OCSP, and one device certificate it issued: (gateway, client,
        the certificate's PEM file, the publishing URL, the procedure's
        name quoted for URLs, the CA certificate file)."""
        from urllib.parse import quote

        from tests import test_publish

        publish = test_publish.free_port()
        token, label, certificate, chain = self.files("ec-p256")
        extra = f"publish.port = {publish}\npublish.interface = 127.0.0.1\n" + extra
        gateway = await RunningGateway.start(
            self, hsm_config(certificate, chain, softhsm.shared().pin_file, token, label, extra))
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        client = Client(self, gateway, "device")
        _key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        issued = await client.certificates(result.body)
        return gateway, client, issued, f"http://127.0.0.1:{publish}", quote("HSM Procedure", safe=""), certificate

    async def test_token_hung_while_publishing(self) -> None:
        """The token hangs while relying parties ask for OCSP answers (anyone
        may ask the publishing listener): each answer waits at most
        ca.timeout and is tryLater; past ca.maxOverdue // 2 signatures still
        running, at once and without queueing more work; enrollments keep
        their share of the CA's threads; once the token answers again, so
        does OCSP."""
        import time

        from twisted.internet.task import deferLater

        gateway, client, issued, base, name, certificate = await self._publishing_hsm(
            "ca.timeout = 2\nca.maxOverdue = 2\n")
        issuer = client.path("issuer.pem")
        write(issuer, cert_pem(x509.load_pem_x509_certificates(open(certificate, "rb").read())[0]))

        ca = gateway.service.state.procedures["HSM Procedure"].ca
        released = threading.Event()
        self.addCleanup(released.set)
        signed_ocsp = ca.sign_ocsp
        calls: list[float] = []

        def hung(*args: Any) -> Any:
            calls.append(time.monotonic())
            released.wait(30)
            return signed_ocsp(*args)

        ca.sign_ocsp = hung

        async def ask() -> tuple[str, float]:
            started = time.monotonic()
            answer = await client.openssl("ocsp", "-issuer", issuer, "-cert", issued, "-url", f"{base}/ocsp/{name}",
                                          "-noverify", "-resp_text", "-timeout", "20", check=False)
            return (answer.stdout + answer.stderr).decode(), time.monotonic() - started

        text, took = await ask()  # its signature hangs: tryLater after ca.timeout
        self.assertIn("Responder Error: trylater (3)", text)
        self.assertGreaterEqual(took, 1.5)
        text, took = await ask()  # one is still running (maxOverdue 2 // 2): tryLater at once
        self.assertIn("Responder Error: trylater (3)", text)
        self.assertLess(took, 1.5)
        self.assertEqual(len(calls), 1)  # no work queued behind the hung call
        # Enrollments keep the other thread of the CA.
        _key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        released.set()
        for _ in range(100):  # the hung call returns and frees its place
            if gateway.service.published["HSM Procedure"].generations[0]._signing_now == 0:
                break
            await deferLater(reactor, 0.05)
        text, _took = await ask()
        self.assertNotIn("trylater", text)
        self.assertIn("Cert Status: good", text)

    async def test_token_gone_while_publishing(self) -> None:
        """The token stops signing while the gateway runs: an OCSP request
        gets tryLater (unsigned, RFC 6960 2.3), the CRL signed before is
        still served, a first CRL that cannot be signed is 503 with
        Retry-After; never a 500, and no critical log event."""
        import pkcs11

        from twisted.logger import LogLevel, globalLogPublisher

        gateway, client, issued, base, name, certificate = await self._publishing_hsm()

        async def get(url: str) -> tuple[int, bytes, str]:
            out = client.path(f"get-{abs(hash(url))}")
            done = await run_process([_which("curl"), "-sS", "--max-time", "20", "-D", out + ".h", "-o", out,
                                      "-w", "%{http_code}", url])
            with open(out, "rb") as f, open(out + ".h") as h:
                return int(done.stdout or b"0"), f.read(), h.read().lower()

        status, before, _ = await get(f"{base}/crl/{name}.crl")
        self.assertEqual(status, 200)

        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        login = gateway.service.state.procedures["HSM Procedure"].ca._login

        def unreachable() -> None:
            raise pkcs11.TokenNotPresent()

        login.reopen, original = unreachable, login.reopen
        self.addCleanup(setattr, login, "reopen", original)
        login.session.close()
        self.addCleanup(original)

        issuer = client.path("issuer.pem")
        write(issuer, cert_pem(x509.load_pem_x509_certificates(open(certificate, "rb").read())[0]))
        answer = await client.openssl("ocsp", "-issuer", issuer, "-cert", issued, "-url", f"{base}/ocsp/{name}",
                                      "-resp_text", "-timeout", "20", check=False)
        text = (answer.stdout + answer.stderr).decode()
        self.assertIn("Responder Error: trylater (3)", text)
        self.assertNotIn("code=500", text)
        # The revocation is recorded; the CRL cannot be re-signed, so the last one is served.
        await gateway.store.revoke_certificate(
            x509.load_pem_x509_certificates(open(issued, "rb").read())[0].serial_number, "keyCompromise")
        status, during, _ = await get(f"{base}/crl/{name}.crl")
        self.assertEqual((status, during), (200, before))
        # With nothing cached (a new generation's first CRL), 503 with Retry-After.
        published = gateway.service.published["HSM Procedure"].generations[0]
        published._crl = None
        status, body, headers = await get(f"{base}/crl/{name}.crl")
        self.assertEqual(status, 503, body)
        self.assertIn("retry-after: 60", headers)
        self.assertEqual([e for e in events if e.get("log_level") == LogLevel.critical], [])
        self.flushLoggedErrors()


class TokenOutageCommandTests(Pkcs11TestCase):
    async def test_store_commands_work_while_the_token_is_gone(self) -> None:
        """With the token unavailable, the operator commands that only touch
        the store work (the revocation is recorded, for the CRL the gateway
        signs when the token is back); those that need the CA (init, crl
        write) say so in one line, exit 1, no traceback."""
        import sys

        gateway = await self.gateway("ec-p256")
        client = Client(self, gateway, "device")
        _key, csr = await client.key_and_csr(f"/CN={DEVICE}")
        result = await client.enroll("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        (record,) = await gateway.store.list_certificates()
        token, label, certificate, chain = self.files("ec-p256")
        outage = write(os.path.join(os.path.dirname(gateway.config_path), "outage.properties"),
                       hsm_config(certificate, chain, softhsm.shared().pin_file, "no-such-token", label).encode())

        async def estgw(*argv: str) -> tuple[int, str, str]:
            done = await run_process([sys.executable, "-m", "estgw.cli", "--config", outage, *argv], env=environment())
            return done.code, done.stdout.decode(), done.stderr.decode()

        code, out, err = await estgw("cert", "list")
        self.assertEqual(code, 0, err)
        self.assertIn(f"{record.serial:x}", out.lower().replace(":", ""))
        code, out, err = await estgw("cert", "revoke", f"{record.serial:x}", "--reason", "keyCompromise")
        self.assertEqual(code, 0, err)
        self.assertIn("revoked", out)
        self.assertIsNotNone((await gateway.store.get_certificate(record.serial)).revoked_at)
        code, out, err = await estgw("device", "add", "pump-9", "--password", "a long password 9")
        self.assertEqual(code, 0, err)
        self.assertIsNotNone(await gateway.store.get_device("pump-9"))
        for argv, says in (
            (("crl", "write", "--tokenprocedure", "HSM Procedure", "--out", os.path.join(client.path("x.crl"))),
             "the CA of token procedure 'HSM Procedure' cannot be used now"),
            (("init",), "no-such-token"),
        ):
            code, out, err = await estgw(*argv)
            self.assertEqual(code, 1, (argv, out, err))
            self.assertIn(says, err)
            self.assertNotIn("Traceback", err)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
        # SoftHSM's free slot has a token without a label: named, not an empty item.
        self.assertRegex(err, r"present: [^,)]")
        self.assertIn("(unlabelled)", err)
