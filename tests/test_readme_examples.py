"""The README's example configurations, as pasted: each token procedure
kind's example starts, issues over real TLS, and its revocation is visible
through the published CRL and OCSP (openssl as the relying party).

Only the ports change (to free ones), so parallel test runs do not collide.
"""

from __future__ import annotations

import io
import os
import re
import subprocess

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from estgw import cli
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import RunningGateway, write

from .test_e2e import DEVICE, PASSWORD, Client, load_pem
from .test_publish import free_port

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")


def example(kind: str) -> str:
    """The literal block of README.rst that starts with ``# example: ca = <kind>``."""
    return literal_block(f"    # example: ca = {kind}")


def literal_block(first_line: str) -> str:
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index(first_line)
    block = []
    for line in lines[start:]:
        if line and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


class ReadmeExampleTests(TestCase):
    async def run_example(self, kind: str, label: str, prepare: object) -> None:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        prepare(directory)  # type: ignore[operator]
        publish = free_port()
        text = example(kind).replace("server.port = 8443", "server.port = 0")
        text = re.sub(r"\b8080\b", str(publish), text)
        gateway = RunningGateway(directory, text)
        await gateway.run()
        self.addCleanup(gateway.stop)
        await gateway.store.add_device(Device(DEVICE, hash_password(PASSWORD)))
        client = Client(self, gateway, "client")
        prefix = f"{label}/" if label else ""

        result = await gateway.curl(prefix + "cacerts")
        self.assertEqual(result.status, 200, result.text)
        chain = await client.certificates(result.body)
        _, csr = await client.key_and_csr()
        result = await gateway.curl(prefix + "simpleenroll", csr, user=f"{DEVICE}:{PASSWORD}")
        self.assertEqual(result.status, 200, result.text)
        pem = await client.certificates(result.body)
        await client.verify(pem, chain)
        (cert,) = load_pem(pem)
        issuer = next(c for c in load_pem(chain) if c.subject == cert.issuer)
        issuer_pem = write(client.path("issuer.pem"), issuer.public_bytes(Encoding.PEM))
        ocsp_url = re.search(r"ocsp\.url = (\S+)", text).group(1)  # type: ignore[union-attr]

        good = await client.openssl("ocsp", "-issuer", issuer_pem, "-cert", pem, "-CAfile", chain,
                                    "-url", ocsp_url, "-timeout", "20")
        self.assertIn(f"{pem}: good".encode(), good.stdout)
        await cli.run(reactor, ["--config", gateway.config_path, "cert", "revoke",
                                f"{cert.serial_number:x}", "--reason", "keyCompromise"], io.StringIO())
        revoked = await client.openssl("ocsp", "-issuer", issuer_pem, "-cert", pem, "-CAfile", chain,
                                       "-url", ocsp_url, "-timeout", "20")
        self.assertIn(f"{pem}: revoked".encode(), revoked.stdout)
        self.assertIn(b"Reason: keyCompromise", revoked.stdout)
        self.assertIn(b"Response verify OK", revoked.stderr + revoked.stdout)
        refused = await client.openssl("verify", "-crl_check", "-crl_download", "-CAfile", chain, pem, check=False)
        self.assertIn(b"certificate revoked", refused.stdout + refused.stderr)

    async def test_local(self) -> None:
        """The ca = local example (P-384 CA, keys encrypted with ca-passphrase.txt)."""

        def prepare(directory: str) -> None:
            write(os.path.join(directory, "ca-passphrase.txt"), b"a long passphrase\n")

        await self.run_example("local", "", prepare)

    async def test_file(self) -> None:
        """The ca = file example with an operator CA in operator/ made by the
        README's openssl commands, delegated OCSP responder."""

        def prepare(directory: str) -> None:
            operator = os.path.join(directory, "operator")
            os.makedirs(operator)
            script = literal_block("    echo 'a long passphrase' > passphrase.txt; chmod 600 passphrase.txt")
            result = subprocess.run(["sh", "-e", "-c", script], cwd=operator, capture_output=True, text=True)
            self.assertEqual(result.returncode, 0, result.stderr)

        await self.run_example("file", "operator", prepare)
