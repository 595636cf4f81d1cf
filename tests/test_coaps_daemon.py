"""The daemon with its CoAPs listener: ``twistd -n estgw`` on the shipped
etc/est.properties with the CoAPs lines uncommented, driven as the README's
"EST over CoAPs with coap-client" section does."""

from __future__ import annotations

import base64
import re
import shutil

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.serialization import pkcs7
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest

from estgw.coaps import coap
from estgw.protocol import decode_certs_only
from estgw.testing import COAP_CLIENT, cert_pem, key_pem, make_csr, name, new_key, run_coap_client, write
from tests.test_twistd import START_TIMEOUT, TwistdTestCase, _wait

COAPS_READY = re.compile(rb"serving EST over CoAPs at coaps://[^:/]+:([0-9]+)/\.well-known/est/")


def setUpModule() -> None:
    if shutil.which(COAP_CLIENT) is None:
        raise SkipTest(f"{COAP_CLIENT} is not installed (Debian: apt-get install libcoap3-bin)")


class CoAPsDaemonTests(TwistdTestCase):
    def enable_coaps(self, port: int = 0) -> None:
        """Uncomment the shipped CoAPs lines, as the README says."""
        with open(self.config) as f:
            text = f.read()
        text = text.replace("#coaps.port = 5684\n", f"coaps.port = {port}\n")
        text = text.replace("#coaps.interface =\n", "coaps.interface = 127.0.0.1\n")
        text, count = re.subn(r"(?m)^#(handler\.4[0-3]\.)", r"\1", text)
        self.assertEqual(count, 9)
        with open(self.config, "w") as f:
            f.write(text)

    async def coaps_port(self, daemon: object) -> int:
        for _ in range(int(START_TIMEOUT * 10)):
            match = COAPS_READY.search(daemon.output)  # type: ignore[attr-defined]
            if match:
                return int(match.group(1))
            await deferLater(reactor, 0.1, lambda: None)
        self.fail("no CoAPs listener")

    async def test_readme_flow(self) -> None:
        """crts block-wise, sen with the certificate a device got over
        HTTPS, sren answered as application/pkix-cert."""
        self.enable_coaps()
        daemon = await self.start()
        port = await self.coaps_port(daemon)
        ca = f"{self.directory}/state/ca/root-ca.pem"
        url = f"coaps://127.0.0.1:{port}/.well-known/est"

        added = await self.cli("device", "add", "pump-17", "--password", "s3cret")
        self.assertEqual(added.code, 0, added.stderr.decode())
        key = new_key()
        status, body = await self.curl(
            daemon.port, "simpleenroll", base64.b64encode(make_csr(key, "pump-17").public_bytes(Encoding.DER)),
            "pump-17:s3cret",
        )
        self.assertEqual(status, 200)
        (device,) = decode_certs_only(body)
        device_pem = write(f"{self.directory}/device.pem", cert_pem(device))
        device_key = write(f"{self.directory}/device.key", key_pem(key))

        cacerts = await run_coap_client(f"{url}/crts", ca, block_size=256, workdir=self.directory)
        self.assertEqual(cacerts.code, "2.05")
        self.assertIn("Block2:1/M/256", cacerts.log)
        _status, https_chain = await self.curl(daemon.port, "cacerts")
        self.assertEqual(set(pkcs7.load_der_pkcs7_certificates(cacerts.payload)), set(decode_certs_only(https_chain)))

        coap_key = new_key()
        enrolled = await run_coap_client(
            f"{url}/sen", ca, method="post", payload=make_csr(coap_key, "pump-17").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, cert=device_pem, key=device_key, workdir=self.directory,
        )
        self.assertEqual(enrolled.code, "2.04", enrolled.diagnostic)
        (coap_cert,) = pkcs7.load_der_pkcs7_certificates(enrolled.payload)
        self.assertEqual(coap_cert.subject, name("pump-17"))

        renewed = await run_coap_client(
            f"{url}/sren", ca, method="post", payload=make_csr(coap_key, "pump-17").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, accept=coap.PKIX_CERT,
            cert=write(f"{self.directory}/coap.pem", cert_pem(coap_cert)),
            key=write(f"{self.directory}/coap.key", key_pem(coap_key)), workdir=self.directory,
        )
        self.assertEqual(renewed.code, "2.04", renewed.diagnostic)
        self.assertEqual(x509.load_der_x509_certificate(renewed.payload).subject, name("pump-17"))

        refused = await run_coap_client(
            f"{url}/sen", ca, method="post", payload=make_csr(new_key(), "pump-17").public_bytes(Encoding.DER),
            content_format=coap.PKCS10, workdir=self.directory,
        )
        self.assertEqual(refused.code, "4.03")
        self.assertIn("a TLS client certificate issued by a trusted CA is required", refused.diagnostic)
        listed = await self.cli("cert", "list")
        rows = listed.stdout.decode().splitlines()[1:]
        self.assertEqual(len(rows), 3, listed.stdout.decode())  # HTTPS, sen, sren: nothing for the refusal

    async def test_udp_port_in_use(self) -> None:
        """A coaps.port another process holds stops twistd with the port,
        a non-zero status and no traceback."""
        from twisted.internet.protocol import DatagramProtocol

        holder = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        busy = holder.getHost().port
        self.enable_coaps(busy)
        daemon = self.spawn("--port", "0")
        code = await _wait(daemon.ended, START_TIMEOUT)
        output = daemon.output.decode()
        self.assertNotEqual(code, 0, output)
        self.assertIn(f"estgw: cannot listen on UDP port {busy} (coaps.port)", output)
        self.assertNotIn("Traceback", output)


