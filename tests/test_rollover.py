"""CA rollover (RFC 7030 4.1.3): ``estgw ca rollover`` between two runs of
the real gateway; curl + openssl as the device and as the relying party."""

from __future__ import annotations

import io
import os
import subprocess
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from estgw import bootstrap, cli, config as config_module
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.config import ConfigError
from estgw.passwords import hash_password
from estgw.store import Device, IssuedCertificate
from estgw.testing import TEST_CONFIG, RunningGateway, _which, name, new_key, run_process, write

from .test_e2e import DEVICE, PASSWORD, Client, load_pem
from .test_pki import FILE_PROCEDURE, operator_ca
from .test_publish import free_port

NAME = "Test Procedure"


class RolloverTests(TestCase):
    async def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        self.publish = free_port()
        base = f"http://127.0.0.1:{self.publish}"
        quoted = quote(NAME, safe="")
        self.config_text = TEST_CONFIG + (
            f"publish.port = {self.publish}\npublish.interface = 127.0.0.1\n"
            # {ca}: each issuing CA's certificates name that CA's own CRL.
            f"tokenprocedure.1.crl.url = {base}/crl/{quoted}/{{ca}}.crl\n"
            f"tokenprocedure.1.ocsp.url = {base}/ocsp/{quoted}\n"
        )
        self.gateway = await self.start()

    async def start(self) -> RunningGateway:
        gateway = RunningGateway(self.directory, self.config_text)
        await gateway.run()
        self.addCleanup(self._stop, gateway)
        if await gateway.store.get_device(DEVICE) is None:
            await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        self.client = Client(self, gateway, f"client-{free_port()}")
        return gateway

    async def _stop(self, gateway: RunningGateway) -> None:
        if gateway.service.running:
            await gateway.stop()

    async def restart_after(self, *argv: str) -> str:
        await self.gateway.stop()
        out = io.StringIO()
        await cli.run(reactor, ["--config", self.gateway.config_path, "ca", "rollover", *argv], out)
        self.gateway = await self.start()
        return out.getvalue()

    async def enroll(self, cert: str | None = None, key: str | None = None) -> tuple[str, str, x509.Certificate]:
        device_key, csr = await self.client.key_and_csr()
        if cert:
            result = await self.gateway.curl("simplereenroll", csr, cert=cert, key=key)
        else:
            result = await self.gateway.curl("simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await self.client.certificates(result.body)
        return pem, device_key, load_pem(pem)[0]

    async def cacerts(self) -> tuple[str, list[x509.Certificate]]:
        result = await self.gateway.curl("cacerts")
        self.assertEqual(result.status, 200)
        pem = await self.client.certificates(result.body)
        return pem, load_pem(pem)

    async def test_rollover_while_running(self) -> None:
        """`ca rollover` while the gateway runs (before its restart): the
        running gateway's CRL of the old CA goes to the old CA's own place
        (previous/001/), never over the new CA's directory, and still lists
        a revocation made meanwhile."""
        _, _, old = await self.enroll()
        config = config_module.load(self.gateway.config_path)
        out = io.StringIO()
        await cli.run(reactor, ["--config", self.gateway.config_path, "ca", "rollover"], out)
        await cli.run(reactor, ["--config", self.gateway.config_path, "cert", "revoke",
                                f"{old.serial_number:x}", "--reason", "superseded"], io.StringIO())
        status, body = await self.get_crl()
        self.assertEqual(status, 200)
        crl = x509.load_der_x509_crl(body)
        self.assertEqual(crl.issuer, old.issuer)
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(old.serial_number))
        new_home = os.path.join(config.ca_directory, "crl.pem")
        if os.path.exists(new_home):
            with open(new_home, "rb") as f:
                self.assertNotEqual(x509.load_pem_x509_crl(f.read()).issuer, old.issuer)
        with open(os.path.join(config.ca_directory, "previous", "001", "crl.pem"), "rb") as f:
            kept = x509.load_pem_x509_crl(f.read())
        self.assertEqual(kept.issuer, old.issuer)
        self.assertIsNotNone(kept.get_revoked_certificate_by_serial_number(old.serial_number))

    async def get_crl(self) -> tuple[int, bytes]:
        out = self.client.path(f"crl-{free_port()}")
        url = f"http://127.0.0.1:{self.publish}/crl/{quote(NAME, safe='')}.crl"
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "-o", out, "-w", "%{http_code}", url])
        with open(out, "rb") as f:
            return int(result.stdout or b"0"), f.read()

    async def test_issuing_rollover(self) -> None:
        """After a rollover new certificates come from the new issuing CA;
        cacerts carries both issuing CAs; a certificate of the old one still
        renews (from the new one); revoking it shows on the old CA's CRL
        (at the URL in the certificate) and in OCSP."""
        old_pem, old_key, old = await self.enroll()
        _, before = await self.cacerts()
        out = await self.restart_after()
        self.assertIn("new issuing CA:  CN=estgw Issuing CA 2", out)
        self.assertIn("still serving:   CN=estgw Issuing CA", out)

        chain_pem, chain = await self.cacerts()
        self.assertEqual(len(chain), 3)  # new issuing, root, old issuing
        for cert in before:
            self.assertIn(cert, chain)
        new_pem, _, new = await self.enroll()
        self.assertNotEqual(new.issuer, old.issuer)
        self.assertEqual(new.issuer.rfc4514_string(), "CN=estgw Issuing CA 2,O=estgw")
        await self.client.verify(new_pem, chain_pem)
        await self.client.verify(old_pem, chain_pem)

        renewed_pem, _, renewed = await self.enroll(old_pem, old_key)
        self.assertEqual(renewed.issuer, new.issuer)
        self.assertEqual(renewed.subject, old.subject)

        await cli.run(reactor, ["--config", self.gateway.config_path, "cert", "revoke",
                                f"{old.serial_number:x}", "--reason", "superseded"], io.StringIO())
        refused = await self.client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain_pem,
                                            old_pem, check=False)
        self.assertIn(b"certificate revoked", refused.stdout + refused.stderr)
        fine = await self.client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain_pem, new_pem)
        self.assertIn(b": OK", fine.stdout)
        old_issuer = next(c for c in chain if c.subject == old.issuer)
        issuer_pem = write(self.client.path("old-issuer.pem"), old_issuer.public_bytes(Encoding.PEM))
        answer = await self.client.openssl(
            "ocsp", "-issuer", issuer_pem, "-cert", old_pem, "-CAfile", chain_pem,
            "-url", f"http://127.0.0.1:{self.publish}/ocsp/{quote(NAME, safe='')}", "-timeout", "20",
        )
        self.assertIn(f"{old_pem}: revoked".encode(), answer.stdout)
        self.assertIn(b"Reason: superseded", answer.stdout)

    async def test_root_rollover(self) -> None:
        """--root: a new root with NewWithOld and OldWithNew link
        certificates in cacerts; a client trusting only the old root still
        verifies the gateway's TLS certificate and the new device
        certificates; old certificates still renew."""
        old_root_pem = write(os.path.join(self.directory, "old-root.pem"),
                             open(self.gateway.ca_file, "rb").read())
        (old_root,) = load_pem(old_root_pem)
        old_pem, old_key, old = await self.enroll()
        out = await self.restart_after("--root")
        self.assertIn("new root:        CN=estgw Root CA 2", out)
        chain_pem, chain = await self.cacerts()
        (new_root,) = load_pem(self.gateway.ca_file)
        self.assertIn(old_root, chain)
        self.assertIn(new_root, chain)
        new_with_old = next(c for c in chain if c.subject == new_root.subject and c.issuer == old_root.subject)
        old_with_new = next(c for c in chain if c.subject == old_root.subject and c.issuer == new_root.subject)
        new_with_old.verify_directly_issued_by(old_root)
        old_with_new.verify_directly_issued_by(new_root)
        self.assertEqual(new_with_old.public_key(), new_root.public_key())
        self.assertEqual(old_with_new.public_key(), old_root.public_key())
        self.assertEqual(len(chain), 6)  # two roots, two links, two issuing CAs

        # A client that still trusts only the old root: TLS and the new certificates verify.
        body = os.path.join(self.directory, "cacerts.b64")
        result = await run_process([_which("curl"), "-sS", "--max-time", "20", "--cacert", old_root_pem,
                                    "-o", body, "-w", "%{http_code}", self.gateway.url("cacerts")])
        self.assertEqual(result.stdout, b"200", result.stderr)
        new_pem, _, new = await self.enroll()
        untrusted = write(os.path.join(self.directory, "untrusted.pem"),
                          b"".join(c.public_bytes(Encoding.PEM) for c in chain if c != old_root))
        verified = await self.client.openssl("verify", "-CAfile", old_root_pem, "-untrusted", untrusted, new_pem)
        self.assertIn(b": OK", verified.stdout)
        renewed_pem, _, renewed = await self.enroll(old_pem, old_key)
        self.assertEqual(renewed.issuer, new.issuer)


class RolloverCommandTests(TestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.config_path = write(os.path.join(self.directory, "est.properties"), TEST_CONFIG.encode())

    async def cli(self, *argv: str) -> str:
        out = io.StringIO()
        await cli.run(reactor, ["--config", self.config_path, *argv], out)
        return out.getvalue()

    async def fails(self, *argv: str) -> str:
        try:
            await self.cli(*argv)
        except cli.CommandError as e:
            return str(e)
        self.fail(f"{argv} did not fail")

    def ca(self) -> LocalCA:
        config = config_module.load(self.config_path)
        return LocalCA.load_or_create(config.ca_directory)

    async def test_offline_root_needs_root_key(self) -> None:
        """With the root key exported, rollover refuses without --root-key
        (and changes nothing) and works with it."""
        root_key = os.path.join(self.directory, "root.key")
        await self.cli("init", "--offline-root", root_key)
        issuing = self.ca().issuing
        self.assertIn("--root-key", await self.fails("ca", "rollover"))
        self.assertEqual(self.ca().issuing, issuing)
        await self.cli("ca", "rollover", "--root-key", root_key)
        ca = self.ca()
        self.assertNotEqual(ca.issuing, issuing)
        self.assertEqual([g.issuing for g in ca.previous], [issuing])
        self.assertFalse(ca.root_key_online)

    async def test_offline_root_stays_offline(self) -> None:
        """ca rollover --root with an offline root: refused without
        --new-root-key-out (nothing changes); with it the new root's key is
        written there (0600), not into the state directory, and the output
        says where every key went."""
        root_key = os.path.join(self.directory, "root.key")
        await self.cli("init", "--offline-root", root_key)
        ca_dir = config_module.load(self.config_path).ca_directory
        old_root = self.ca().root
        message = await self.fails("ca", "rollover", "--root", "--root-key", root_key)
        self.assertIn("--new-root-key-out", message)
        self.assertEqual(self.ca().root, old_root)
        new_key_path = os.path.join(self.directory, "new-root.key")
        out = await self.cli("ca", "rollover", "--root", "--root-key", root_key, "--new-root-key-out", new_key_path)
        ca = self.ca()
        self.assertNotEqual(ca.root, old_root)
        self.assertFalse(ca.root_key_online)
        self.assertFalse(os.path.exists(os.path.join(ca_dir, "root-ca.key")))
        self.assertEqual(os.stat(new_key_path).st_mode & 0o777, 0o600)
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        with open(new_key_path, "rb") as f:
            exported = load_pem_private_key(f.read(), None)
        self.assertEqual(exported.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
                         ca.root.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))
        self.assertIn(f"new root key:    moved to {new_key_path}", out)
        self.assertIn(f"its key:         {os.path.join(ca_dir, 'issuing-ca.key')} (unencrypted", out)
        # The exported key is what the next rollover needs.
        await self.cli("ca", "rollover", "--root-key", new_key_path)

    async def test_urls_without_ca_refused(self) -> None:
        """A CRL or caIssuers URL without {ca} would send the current CA's
        certificates to the new CA's CRL after a rollover: refused naming
        the keys (nothing changes); --force rolls over with a warning."""
        write(self.config_path, (TEST_CONFIG + "tokenprocedure.1.crl.url = http://127.0.0.1:1/crl/T.crl\n"
                                 "tokenprocedure.1.caIssuers.url = http://127.0.0.1:1/ca/T.crt\n").encode())
        await self.cli("init")
        issuing = self.ca().issuing
        message = await self.fails("ca", "rollover")
        self.assertIn("tokenprocedure.1.crl.url = http://127.0.0.1:1/crl/T.crl", message)
        self.assertIn("tokenprocedure.1.caIssuers.url", message)
        self.assertIn("--force", message)
        self.assertEqual(self.ca().issuing, issuing)
        err = io.StringIO()
        await cli.run(reactor, ["--config", self.config_path, "ca", "rollover", "--force"], io.StringIO(), err)
        self.assertIn("warning: these URLs lack {ca}", err.getvalue())
        self.assertNotEqual(self.ca().issuing, issuing)

    async def test_from_files(self) -> None:
        """--certificate/--key take an issuing CA the operator made (openssl,
        with the root key); one not issued by the root is refused."""
        await self.cli("init")
        ca_dir = config_module.load(self.config_path).ca_directory
        work = os.path.join(self.directory, "next")
        os.makedirs(work)

        def make(signer_cert: str, signer_key: str) -> None:
            run = lambda *a: subprocess.run(["openssl", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
            run("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", "next.key", "-subj", "/O=estgw/CN=Operator Issuing 2", "-out", "next.csr")
            write(os.path.join(work, "ext"), b"basicConstraints=critical,CA:TRUE,pathlen:0\n"
                                             b"keyUsage=critical,keyCertSign,cRLSign\n")
            run("x509", "-req", "-in", "next.csr", "-CA", signer_cert, "-CAkey", signer_key, "-days", "100",
                "-extfile", "ext", "-out", "next.pem")

        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", "stranger.key", "-subj", "/CN=Stranger", "-out", "stranger.pem"],
                       cwd=work, check=True, capture_output=True)
        make("stranger.pem", "stranger.key")
        message = await self.fails("ca", "rollover", "--certificate", os.path.join(work, "next.pem"),
                                   "--key", os.path.join(work, "next.key"))
        self.assertIn("is not issued by the root", message)
        make(os.path.join(ca_dir, "root-ca.pem"), os.path.join(ca_dir, "root-ca.key"))
        await self.cli("ca", "rollover", "--certificate", os.path.join(work, "next.pem"),
                       "--key", os.path.join(work, "next.key"))
        self.assertEqual(self.ca().issuing.subject.rfc4514_string(), "CN=Operator Issuing 2,O=estgw")

    async def test_crl_write_every_generation(self) -> None:
        """After a rollover `crl write` also re-signs the earlier issuing CA's
        CRL (in its previous/ directory), with its revoked certificates only."""
        await self.cli("init")
        config = config_module.load(self.config_path)
        old_cert = self.ca().sign(IssueRequest(name("old"), new_key().public_key()), Profile())
        await self.cli("ca", "rollover")
        store = bootstrap.open_store(config, reactor)
        await store.start()
        try:
            await store.record_certificate(IssuedCertificate.from_certificate(old_cert, "2", "device:old"))
        finally:
            await store.close()
        await self.cli("cert", "revoke", f"{old_cert.serial_number:x}", "--reason", "keyCompromise")
        out = await self.cli("crl", "write")
        self.assertIn("wrote CRL of 0 revoked certificate(s)", out)
        self.assertIn("wrote CRL of 1 revoked certificate(s) of the earlier issuing CA CN=estgw Issuing CA", out)
        (earlier,) = self.ca().previous
        with open(os.path.join(earlier.directory, "crl.pem"), "rb") as f:
            crl = x509.load_pem_x509_crl(f.read())
        self.assertEqual(crl.issuer, old_cert.issuer)
        self.assertTrue(crl.is_signature_valid(earlier.issuing.public_key()))
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(old_cert.serial_number))


class FileRolloverTests(TestCase):
    """ca = file: the operator points file.* at the next issuing CA and
    moves the previous one to file.previous.1.*."""

    async def test_previous_file_ca_still_served(self) -> None:
        """After the switch new certificates come from the new CA, cacerts
        under the label has both issuing CAs, a certificate of the previous
        one renews, and its revocation shows in OCSP and on its own CRL."""
        directory = os.path.abspath(self.mktemp())
        operator = operator_ca(os.path.join(directory, "operator"))
        publish = free_port()
        base = f"http://127.0.0.1:{publish}"
        text = TEST_CONFIG + FILE_PROCEDURE + (
            f"publish.port = {publish}\npublish.interface = 127.0.0.1\n"
            f"tokenprocedure.2.crl.url = {base}/crl/Operator%20CA/{{ca}}.crl\n"
            f"tokenprocedure.2.ocsp.url = {base}/ocsp/Operator%20CA\n"
        )
        gateway = RunningGateway(directory, text)
        await gateway.run()
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        client = Client(self, gateway, "client")
        old_key, csr = await client.key_and_csr()
        result = await gateway.curl("lab/simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        old_pem = await client.certificates(result.body)
        (old,) = load_pem(old_pem)
        await gateway.stop()

        subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", "issuing2.key", "-subj", "/O=Operator/CN=Operator Issuing 2",
                        "-out", "issuing2.csr"], cwd=operator, check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", "issuing2.csr", "-CA", "root.pem", "-CAkey", "root.key",
                        "-days", "20", "-out", "issuing2.pem", "-extfile", "ext.cnf"],
                       cwd=operator, check=True, capture_output=True)
        rolled = text.replace(
            "tokenprocedure.2.file.certificate = operator/issuing.pem\n",
            "tokenprocedure.2.file.certificate = operator/issuing2.pem\n"
            "tokenprocedure.2.file.previous.1.certificate = operator/issuing.pem\n",
        ).replace(
            "tokenprocedure.2.file.key = operator/issuing.key\n",
            "tokenprocedure.2.file.key = operator/issuing2.key\n"
            "tokenprocedure.2.file.previous.1.key = operator/issuing.key\n",
        ).replace(
            "tokenprocedure.2.file.keyPasswordFile = operator/passphrase.txt\n",
            "tokenprocedure.2.file.previous.1.keyPasswordFile = operator/passphrase.txt\n",
        )
        gateway = RunningGateway(directory, rolled)
        await gateway.run()
        self.addCleanup(gateway.stop)
        client = Client(self, gateway, "client2")
        result = await gateway.curl("lab/cacerts")
        chain_pem = await client.certificates(result.body)
        subjects = {c.subject.rfc4514_string() for c in load_pem(chain_pem)}
        self.assertEqual(subjects, {"CN=Operator Issuing,O=Operator", "CN=Operator Issuing 2,O=Operator",
                                    "CN=Operator Root,O=Operator"})
        _, csr = await client.key_and_csr()
        result = await gateway.curl("lab/simplereenroll", csr, cert=old_pem, key=old_key)
        self.assertEqual(result.status, 200, result.text)
        new_pem = await client.certificates(result.body)
        (new,) = load_pem(new_pem)
        self.assertEqual(new.issuer.rfc4514_string(), "CN=Operator Issuing 2,O=Operator")
        await client.verify(new_pem, chain_pem)

        await cli.run(reactor, ["--config", gateway.config_path, "cert", "revoke", f"{old.serial_number:x}",
                                "--reason", "keyCompromise"], io.StringIO())
        refused = await client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain_pem, old_pem,
                                       check=False)
        self.assertIn(b"certificate revoked", refused.stdout + refused.stderr)
        issuer_pem = os.path.join(operator, "issuing.pem")
        answer = await client.openssl("ocsp", "-issuer", issuer_pem, "-cert", old_pem, "-CAfile", chain_pem,
                                      "-url", f"{base}/ocsp/Operator%20CA", "-timeout", "20")
        self.assertIn(f"{old_pem}: revoked".encode(), answer.stdout)
        fine = await client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain_pem, new_pem)
        self.assertIn(b": OK", fine.stdout)

    def test_previous_settings_checked(self) -> None:
        """file.previous.<m>.* are checked like file.*: a missing key names it."""
        text = TEST_CONFIG + FILE_PROCEDURE + "tokenprocedure.2.file.previous.1.certificate = est.properties\n"
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        operator_ca(os.path.join(directory, "operator"))
        path = write(os.path.join(directory, "est.properties"), text.encode())
        e = self.assertRaises(ConfigError, config_module.load, path)
        self.assertIn("tokenprocedure.2.file.previous.1.key: required with ca = file", str(e))

