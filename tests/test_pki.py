"""Token procedures in front of a real PKI: an operator's CA from files,
key types, keys encrypted at rest, an offline root.

The operator's CA is made with the openssl command line, as an operator
would have made it, so nothing here depends on estgw's own CA code; the
client side is curl + openssl (see tests/test_e2e.py).
"""

from __future__ import annotations

import io
import os
import subprocess
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from estgw import bootstrap, cli, config as config_module
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.ca.keys import KEY_TYPES
from estgw.config import ConfigError
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import TEST_CONFIG, RunningGateway, name, new_key, write

from .test_e2e import DEVICE, PASSWORD, Client, load_pem
from . import test_twistd
from .test_twistd import START_TIMEOUT, TwistdTestCase, _wait

PASSPHRASE = "operator pass phrase"
_PEM = Encoding.PEM

FILE_PROCEDURE = """\
tokenprocedure.2.name = Operator CA
tokenprocedure.2.ca = file
tokenprocedure.2.validity.days = 10
tokenprocedure.2.file.certificate = operator/issuing.pem
tokenprocedure.2.file.chain = operator/root.pem
tokenprocedure.2.file.key = operator/issuing.key
tokenprocedure.2.file.keyPasswordFile = operator/passphrase.txt
handler.6.tokenprocedure = Operator CA
handler.8.operation = simplereenroll
handler.8.label = lab
handler.8.tokenprocedure = Operator CA
"""


def openssl(directory: str, *args: str) -> str:
    result = subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {result.stderr}")
    return result.stdout


def operator_ca(directory: str, issuing_ext: str = "", encrypted: bool = True) -> str:
    """An RSA root and a P-384 issuing CA made with openssl; the issuing
    key encrypted with PASSPHRASE. Returns the directory."""
    os.makedirs(directory, exist_ok=True)
    write(os.path.join(directory, "passphrase.txt"), PASSPHRASE.encode() + b"\n")
    openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "root.key",
            "-subj", "/O=Operator/CN=Operator Root", "-days", "30", "-out", "root.pem",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    protect = ["-aes-256-cbc", "-pass", "file:passphrase.txt"] if encrypted else []
    openssl(directory, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
            *protect, "-out", "issuing.key")
    openssl(directory, "req", "-new", "-key", "issuing.key", "-passin", "file:passphrase.txt",
            "-subj", "/O=Operator/CN=Operator Issuing", "-out", "issuing.csr")
    write(os.path.join(directory, "ext.cnf"), (issuing_ext or (
        "basicConstraints=critical,CA:TRUE,pathlen:0\n"
        "keyUsage=critical,keyCertSign,cRLSign\n"
    )).encode() + b"subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl(directory, "x509", "-req", "-in", "issuing.csr", "-CA", "root.pem", "-CAkey", "root.key",
            "-days", "20", "-out", "issuing.pem", "-extfile", "ext.cnf")
    return directory


class FileCAGatewayTests(TestCase):
    """ca = file behind the real gateway over real TLS."""

    async def setUp(self) -> None:
        directory = os.path.abspath(self.mktemp())
        self.operator = operator_ca(os.path.join(directory, "operator"))
        self.gateway = RunningGateway(directory, TEST_CONFIG + FILE_PROCEDURE)
        await self.gateway.run()
        self.addCleanup(self.gateway.stop)
        await self.gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        self.client = Client(self, self.gateway, "client")

    async def test_issues_serves_chain_and_renews(self) -> None:
        """cacerts under the label returns the operator's chain (issuing CA,
        root); the device enrolls there, openssl verifies the certificate
        against that chain and the operator's root alone; its signature is
        ECDSA with SHA-384 (the P-384 key's hash); it renews with that
        certificate as TLS client certificate. The unlabelled cacerts stays
        the local CA's."""
        result = await self.gateway.curl("lab/cacerts")
        self.assertEqual(result.status, 200, result.text)
        chain_pem = await self.client.certificates(result.body)
        chain = load_pem(chain_pem)
        (issuing,) = load_pem(os.path.join(self.operator, "issuing.pem"))
        (root,) = load_pem(os.path.join(self.operator, "root.pem"))
        self.assertEqual(chain, [issuing, root])
        local = load_pem(await self.client.cacerts())
        self.assertNotIn(issuing, local)

        key, csr = await self.client.key_and_csr()
        result = await self.gateway.curl("lab/simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        await self.client.verify(pem, chain_pem)
        verified = await self.client.openssl(
            "verify", "-CAfile", os.path.join(self.operator, "root.pem"),
            "-untrusted", os.path.join(self.operator, "issuing.pem"), pem,
        )
        self.assertIn(b": OK", verified.stdout)
        (cert,) = load_pem(pem)
        self.assertEqual(cert.issuer, issuing.subject)
        self.assertIsInstance(cert.signature_hash_algorithm, hashes.SHA384)
        self.assertIsNotNone(await self.gateway.store.get_certificate(cert.serial_number))

        _, renew_csr = await self.client.key_and_csr()
        result = await self.gateway.curl("lab/simplereenroll", renew_csr, cert=pem, key=key)
        self.assertEqual(result.status, 200, result.text)
        (renewed,) = load_pem(await self.client.certificates(result.body))
        self.assertEqual(renewed.issuer, issuing.subject)
        self.assertEqual(renewed.subject, cert.subject)

    async def test_revoked_file_ca_certificate_refused(self) -> None:
        """A certificate of the file CA revoked in the store cannot renew:
        403 client-certificate-revoked, and nothing more is issued."""
        key, csr = await self.client.key_and_csr()
        result = await self.gateway.curl("lab/simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        (cert,) = load_pem(pem)
        await self.gateway.store.revoke_certificate(cert.serial_number, "keyCompromise")
        _, renew_csr = await self.client.key_and_csr()
        result = await self.gateway.curl("lab/simplereenroll", renew_csr, cert=pem, key=key)
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("revoked", result.text)
        self.assertEqual(await self.gateway.store.count_certificates(), 1)


class FileCASettingTests(TestCase):
    """Every wrong ca = file setting stops the start naming the key."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.operator = operator_ca(os.path.join(self.directory, "operator"))

    def load(self, extra: str = "", procedure: str = FILE_PROCEDURE) -> Any:
        path = write(os.path.join(self.directory, "est.properties"), (TEST_CONFIG + procedure + extra).encode())
        return bootstrap.initialize(config_module.load(path))

    def refused(self, key: str, reason: str, extra: str = "", procedure: str = FILE_PROCEDURE) -> None:
        e = self.assertRaises(ConfigError, self.load, extra, procedure)
        self.assertIn(f"{key}: ", str(e))
        self.assertIn(reason, str(e))

    def test_loads(self) -> None:
        """The good files load; the procedure's chain is the operator's."""
        state = self.load()
        chain = state.procedures["Operator CA"].chain()
        self.assertEqual([c.subject.rfc4514_string() for c in chain],
                         ["CN=Operator Issuing,O=Operator", "CN=Operator Root,O=Operator"])
        self.assertIn(chain[0], state.issuers)
        self.assertIn(chain[1], state.trust_anchors)

    def test_wrong_passphrase(self) -> None:
        write(os.path.join(self.operator, "passphrase.txt"), b"not it\n")
        self.refused("tokenprocedure.2.file.keyPasswordFile", "does not decrypt")

    def test_missing_passphrase(self) -> None:
        procedure = FILE_PROCEDURE.replace("tokenprocedure.2.file.keyPasswordFile", "#")
        self.refused("tokenprocedure.2.file.keyPasswordFile", "is encrypted", procedure=procedure)

    def test_passphrase_from_environment(self) -> None:
        """file.keyPasswordEnv names a variable holding the passphrase; unset, it is an error."""
        procedure = FILE_PROCEDURE.replace(
            "tokenprocedure.2.file.keyPasswordFile = operator/passphrase.txt",
            "tokenprocedure.2.file.keyPasswordEnv = ESTGW_TEST_CA_PASSPHRASE",
        )
        self.refused("tokenprocedure.2.file.keyPasswordEnv", "unset", procedure=procedure)
        os.environ["ESTGW_TEST_CA_PASSPHRASE"] = PASSPHRASE
        self.addCleanup(os.environ.pop, "ESTGW_TEST_CA_PASSPHRASE")
        self.assertIn("Operator CA", self.load(procedure=procedure).procedures)

    def test_key_of_another_certificate(self) -> None:
        openssl(self.operator, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", "other.key")
        procedure = FILE_PROCEDURE.replace("operator/issuing.key", "operator/other.key").replace(
            "tokenprocedure.2.file.keyPasswordFile = operator/passphrase.txt", "")
        self.refused("tokenprocedure.2.file.key", "is not the key of", procedure=procedure)

    def test_not_a_ca_certificate(self) -> None:
        """A certificate without cA, or with a key usage lacking keyCertSign, may not sign certificates."""
        for ext, reason in (
            ("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n", "is not a CA certificate"),
            ("basicConstraints=critical,CA:TRUE\nkeyUsage=critical,cRLSign\n", "lacks keyCertSign"),
        ):
            operator_ca(self.operator, ext)
            self.refused("tokenprocedure.2.file.certificate", reason)

    def test_chain_not_reaching_root(self) -> None:
        """A chain that does not reach a root, or holds a stranger, names file.chain."""
        procedure = FILE_PROCEDURE.replace("tokenprocedure.2.file.chain = operator/root.pem\n", "")
        self.refused("tokenprocedure.2.file.chain", "is not in it", procedure=procedure)
        operator_ca(os.path.join(self.directory, "other"))
        procedure = FILE_PROCEDURE.replace("operator/root.pem", "other/root.pem")
        self.refused("tokenprocedure.2.file.chain", "is not on the path", procedure=procedure)

    def test_file_keys_need_ca_file(self) -> None:
        """file.* keys on a local token procedure, and a file CA without its key, are errors."""
        procedure = FILE_PROCEDURE.replace("tokenprocedure.2.ca = file", "tokenprocedure.2.ca = local")
        self.refused("tokenprocedure.2.file.certificate", "only for ca = file, not local", procedure=procedure)
        procedure = FILE_PROCEDURE.replace("tokenprocedure.2.file.key = operator/issuing.key\n", "")
        self.refused("tokenprocedure.2.file.key", "required with ca = file", procedure=procedure)
        procedure = FILE_PROCEDURE.replace("operator/issuing.pem", "operator/missing.pem")
        self.refused("tokenprocedure.2.file.certificate", "no such file", procedure=procedure)

    async def test_init_checks_and_reports(self) -> None:
        """estgw init names each token procedure and its issuing CA; with a
        mismatched key it fails naming file.key."""
        path = write(os.path.join(self.directory, "est.properties"), (TEST_CONFIG + FILE_PROCEDURE).encode())
        out = io.StringIO()
        await cli.run(reactor, ["--config", path, "init"], out)
        self.assertIn("token procedure 'Operator CA' (ca = file): issuing CA CN=Operator Issuing,O=Operator",
                      out.getvalue())
        openssl(self.operator, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384",
                "-aes-256-cbc", "-pass", "file:passphrase.txt", "-out", "issuing.key")
        try:
            await cli.run(reactor, ["--config", path, "init"], io.StringIO())
        except cli.CommandError as e:
            self.assertIn("tokenprocedure.2.file.key: ", str(e))
            self.assertIn("is not the key of", str(e))
        else:
            self.fail("init accepted a key of another certificate")


_KEY_CLASSES = {
    "ec-p256": (ec.EllipticCurvePrivateKey, hashes.SHA256),
    "ec-p384": (ec.EllipticCurvePrivateKey, hashes.SHA384),
    "rsa-2048": (rsa.RSAPrivateKey, hashes.SHA256),
    "rsa-3072": (rsa.RSAPrivateKey, hashes.SHA256),
    "rsa-4096": (rsa.RSAPrivateKey, hashes.SHA256),
    "ed25519": (ed25519.Ed25519PrivateKey, type(None)),
}


class KeyTypeTests(TestCase):
    def test_every_key_type(self) -> None:
        """ca.keyType: each type makes root and issuing keys of that type;
        certificates and CRLs are signed with the algorithm that follows
        the key, and openssl verifies the chain."""
        base = os.path.abspath(self.mktemp())
        for key_type in KEY_TYPES:
            directory = os.path.join(base, key_type)
            ca = LocalCA.load_or_create(directory, key_type=key_type)
            key_class, hash_class = _KEY_CLASSES[key_type]
            self.assertIsInstance(ca._issuing_key, key_class, key_type)
            if key_type.startswith("rsa-"):
                self.assertEqual(ca._issuing_key.key_size, int(key_type[4:]))
            leaf = ca.sign(IssueRequest(name("dev"), new_key().public_key()), Profile())
            for signed in (leaf, ca.issuing, ca.root, ca.write_crl([(1, leaf.not_valid_before_utc)])):
                self.assertIsInstance(signed.signature_hash_algorithm, hash_class, key_type)
            pem = write(os.path.join(directory, "leaf.pem"), leaf.public_bytes(_PEM))
            chain = write(os.path.join(directory, "chain.pem"), b"".join(c.public_bytes(_PEM) for c in ca.chain()))
            self.assertIn(": OK", openssl(directory, "verify", "-CAfile", chain, pem))

    def test_rsa_pss(self) -> None:
        """ca.rsaPadding = pss signs certificates and CRLs with RSASSA-PSS; openssl verifies them."""
        directory = os.path.abspath(self.mktemp())
        ca = LocalCA.load_or_create(directory, key_type="rsa-2048", rsa_padding="pss")
        leaf = ca.sign(IssueRequest(name("dev"), new_key().public_key()), Profile())
        pem = write(os.path.join(directory, "leaf.pem"), leaf.public_bytes(_PEM))
        chain = write(os.path.join(directory, "chain.pem"), b"".join(c.public_bytes(_PEM) for c in ca.chain()))
        self.assertIn("rsassaPss", openssl(directory, "x509", "-in", pem, "-noout", "-text"))
        self.assertIn(": OK", openssl(directory, "verify", "-CAfile", chain, pem))
        ca.write_crl([])
        self.assertIn("verify OK", openssl(directory, "crl", "-in", "crl.pem", "-CAfile", chain, "-noout")
                      + _stderr(directory, "crl", "-in", "crl.pem", "-CAfile", chain, "-noout"))

    def test_bad_key_type_names_the_key(self) -> None:
        """An unknown ca.keyType, tls.keyType or ca.rsaPadding is a ConfigError naming it."""
        for line, key in (("ca.keyType = rsa-1024", "ca.keyType"), ("tls.keyType = p256", "tls.keyType"),
                          ("ca.rsaPadding = oaep", "ca.rsaPadding")):
            e = self.assertRaises(ConfigError, config_module.from_string, TEST_CONFIG + line + "\n")
            self.assertIn(f"{key}: must be one of", str(e))


def _stderr(directory: str, *args: str) -> str:
    return subprocess.run(["openssl", *args], cwd=directory, capture_output=True, text=True).stderr



class KeyTypeGatewayTests(TestCase):
    async def test_rsa_pss_ca_and_p384_tls(self) -> None:
        """A gateway with an RSA-3072 PSS-signing CA and a P-384 TLS key:
        curl connects, a device enrolls, openssl verifies what it got."""
        gateway = await RunningGateway.start(
            self, TEST_CONFIG + "ca.keyType = rsa-3072\nca.rsaPadding = pss\ntls.keyType = ec-p384\n"
        )
        self.assertIsInstance(gateway.service.state.server_key, ec.EllipticCurvePrivateKey)
        self.assertEqual(gateway.service.state.server_key.curve.name, "secp384r1")
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        client = Client(self, gateway, "client")
        chain = await client.cacerts()
        _, csr = await client.key_and_csr()
        result = await gateway.curl("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await client.certificates(result.body)
        await client.verify(pem, chain)
        text = (await client.openssl("x509", "-in", pem, "-noout", "-text")).stdout
        self.assertIn(b"rsassaPss", text)

    async def test_ed25519_tls_key(self) -> None:
        """tls.keyType = ed25519: curl (OpenSSL) completes the handshake and fetches cacerts."""
        gateway = await RunningGateway.start(self, TEST_CONFIG + "tls.keyType = ed25519\n")
        self.assertIsInstance(gateway.service.state.server_key, ed25519.Ed25519PrivateKey)
        result = await gateway.curl("cacerts")
        self.assertEqual(result.status, 200, result.stderr)


class EncryptedLocalCATests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        write(os.path.join(self.directory, "ca-pass"), b"local ca secret\n")

    def config(self, extra: str = "ca.keyPasswordFile = ca-pass\n") -> Any:
        path = write(os.path.join(self.directory, "est.properties"), (TEST_CONFIG + extra).encode())
        return config_module.load(path)

    def test_keys_encrypted_at_rest(self) -> None:
        """ca.keyPasswordFile: both CA keys are written as encrypted PKCS#8
        and load again with it; a wrong or missing passphrase is a
        ConfigError naming the key."""
        state = bootstrap.initialize(self.config())
        for name_ in ("root-ca.key", "issuing-ca.key"):
            with open(os.path.join(state.ca.directory, name_), "rb") as f:
                self.assertTrue(f.read().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        again = bootstrap.initialize(self.config())
        self.assertEqual(again.ca.issuing, state.ca.issuing)
        write(os.path.join(self.directory, "ca-pass"), b"wrong\n")
        e = self.assertRaises(ConfigError, bootstrap.initialize, self.config())
        self.assertIn("ca.keyPasswordFile: ", str(e))
        self.assertIn("does not decrypt", str(e))
        e = self.assertRaises(ConfigError, bootstrap.initialize, self.config(""))
        self.assertIn("ca.keyPasswordFile: ", str(e))
        self.assertIn("is encrypted", str(e))

    async def test_offline_root(self) -> None:
        """estgw init --offline-root OUT moves the root key out (encrypted
        with ca.keyPasswordFile): the CA directory keeps only the issuing
        key, the gateway still loads and issues, a second export fails."""
        path = write(os.path.join(self.directory, "est.properties"),
                     (TEST_CONFIG + "ca.keyPasswordFile = ca-pass\n").encode())
        out_file = os.path.join(self.directory, "root-offline.pem")
        out = io.StringIO()
        await cli.run(reactor, ["--config", path, "init", "--offline-root", out_file], out)
        self.assertIn("root key:        moved to", out.getvalue())
        config = config_module.load(path)
        self.assertFalse(os.path.exists(os.path.join(config.ca_directory, "root-ca.key")))
        self.assertEqual(os.stat(out_file).st_mode & 0o777, 0o600)
        with open(out_file, "rb") as f:
            exported = f.read()
        self.assertTrue(exported.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----"))
        openssl(self.directory, "pkey", "-in", out_file, "-passin", "file:ca-pass", "-noout")
        state = bootstrap.initialize(config)
        self.assertFalse(state.ca.root_key_online)
        leaf = state.ca.sign(IssueRequest(name("dev"), new_key().public_key()), Profile())
        leaf.verify_directly_issued_by(state.ca.issuing)
        try:
            await cli.run(reactor, ["--config", path, "init", "--offline-root", out_file + ".2"], io.StringIO())
        except cli.CommandError as e:
            self.assertIn("already exported", str(e))
        else:
            self.fail("a second export succeeded")
        self.assertFalse(os.path.exists(out_file + ".2"))

    async def test_offline_root_printed(self) -> None:
        """--offline-root - prints the root key once (unencrypted without a
        passphrase setting) and removes it from the CA directory."""
        path = write(os.path.join(self.directory, "est.properties"), TEST_CONFIG.encode())
        out = io.StringIO()
        await cli.run(reactor, ["--config", path, "init", "--offline-root", "-"], out)
        printed = out.getvalue()
        self.assertIn("-----BEGIN PRIVATE KEY-----", printed)
        self.assertIn("root key:        moved to the PEM above", printed)
        config = config_module.load(path)
        self.assertFalse(os.path.exists(os.path.join(config.ca_directory, "root-ca.key")))
        key = serialization.load_pem_private_key(printed[printed.index("-----BEGIN"):].encode(), None)
        with open(config.ca_certificate_path, "rb") as f:
            root = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(key.public_key(), root.public_key())


class DaemonRefusesTests(TwistdTestCase):
    """The real twistd stops with the key named, for the new settings."""

    assert_refuses_to_start = test_twistd.BadConfigTests.assert_refuses_to_start
    assert_only_the_error = test_twistd.BadConfigTests.assert_only_the_error
    append = test_twistd.BadConfigTests.append

    async def test_bad_key_type(self) -> None:
        """An unknown ca.keyType stops twistd before anything is created."""
        self.append("ca.keyType = rsa-1024\n")
        await self.assert_refuses_to_start("ca.keyType", "must be one of")

    async def test_file_ca_wrong_passphrase(self) -> None:
        """A file CA whose passphrase does not decrypt its key stops twistd
        (exit status non-zero, no listener, no traceback) naming the key."""
        operator_ca(os.path.join(self.directory, "operator"))
        write(os.path.join(self.directory, "operator", "passphrase.txt"), b"wrong\n")
        self.append(FILE_PROCEDURE.replace("tokenprocedure.2.", "tokenprocedure.9.").split("handler.6")[0])
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIsNone(daemon.port, "it must not listen")
        self.assertIn(f"{self.config}: tokenprocedure.9.file.keyPasswordFile: ", output)
        self.assertIn("does not decrypt", output)
        self.assertNotIn("Traceback", output)
