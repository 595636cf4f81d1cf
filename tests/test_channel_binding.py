"""RFC 7030 §3.5 linking: the challengePassword carries the TLS channel
binding of the connection the CSR is sent on (tls-unique on TLS 1.2,
RFC 9266 tls-exporter on TLS 1.3).  curl cannot put a value of its own
connection into the CSR, so this client is pyOpenSSL on a thread."""

from __future__ import annotations

import base64
import socket
import struct

from OpenSSL import SSL
from twisted.internet import threads
from twisted.trial.unittest import TestCase

from estgw import policy, protocol
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import TEST_CONFIG, RunningGateway, csr_pem, make_csr, new_key

CONFIG = TEST_CONFIG + """\
handler.10.operation = simpleenroll
handler.10.label = bound
handler.10.authtype = Basic
handler.10.realm = bound
handler.10.channelBinding = true
handler.11.operation = csrattrs
handler.11.label = bound
"""


def enroll_with_binding(port: int, ca_file: str, version: int, tamper: bool = False) -> tuple[int, bytes]:
    """Blocking: handshake, read the binding, send a CSR carrying it."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.load_verify_locations(ca_file)
    context.set_verify(SSL.VERIFY_PEER, lambda *args: args[-1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    # pyOpenSSL needs a blocking socket; SO_RCVTIMEO still bounds each read.
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    try:
        return _exchange(SSL.Connection(context, sock), version, tamper)
    finally:
        sock.close()


def _exchange(connection: SSL.Connection, version: int, tamper: bool) -> tuple[int, bytes]:
    connection.set_connect_state()
    connection.set_tlsext_host_name(b"localhost")
    connection.do_handshake()
    if version == SSL.TLS1_3_VERSION:
        binding = connection.export_keying_material(b"EXPORTER-Channel-Binding", 32, b"")
    else:
        binding = connection.get_finished()  # the client's own Finished
    if tamper:
        binding = bytes([binding[0] ^ 1]) + binding[1:]
    csr = make_csr(new_key(), "pump-17", attributes=[(policy.CHALLENGE_PASSWORD, base64.b64encode(binding))])
    body = csr_pem(csr)
    auth = base64.b64encode(b"pump-17:s3cret").decode()
    head = (
        "POST /.well-known/est/bound/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Basic {auth}\r\nContent-Type: application/pkcs10\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    connection.sendall(head.encode() + body)
    response = b""
    while True:
        try:
            chunk = connection.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            break
        if not chunk:
            break
        response += chunk
    connection.close()
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1]


class ChannelBindingTests(TestCase):
    async def start(self) -> RunningGateway:
        gateway = await RunningGateway.start(self, CONFIG)
        await gateway.store.add_device(Device(device_id="pump-17", password_hash=hash_password("s3cret")))
        return gateway

    async def test_tls12_tls_unique(self) -> None:
        """On TLS 1.2 a CSR carrying the connection's tls-unique is issued."""
        gateway = await self.start()
        status, body = await threads.deferToThread(
            enroll_with_binding, gateway.port, gateway.ca_file, SSL.TLS1_2_VERSION
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(len(protocol.decode_certs_only(body)), 1)
        self.assertEqual(await gateway.store.count_certificates(), 1)

    async def test_tls13_tls_exporter(self) -> None:
        """On TLS 1.3 a CSR carrying the RFC 9266 tls-exporter value is issued."""
        gateway = await self.start()
        status, body = await threads.deferToThread(
            enroll_with_binding, gateway.port, gateway.ca_file, SSL.TLS1_3_VERSION
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(await gateway.store.count_certificates(), 1)

    async def test_binding_of_another_connection(self) -> None:
        """A value that is not this connection's binding is refused."""
        gateway = await self.start()
        status, body = await threads.deferToThread(
            enroll_with_binding, gateway.port, gateway.ca_file, SSL.TLS1_2_VERSION, True
        )
        self.assertEqual(status, 403)
        self.assertIn(b"not the tls-unique value", body)
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_csrattrs_announce_challenge_password(self) -> None:
        """csrattrs under a label with channel binding lists challengePassword;
        without it, the same csrattrs handler is empty (204)."""
        gateway = await self.start()
        result = await gateway.curl("bound/csrattrs")
        self.assertEqual(result.status, 200)
        oids = [a.oid for a in protocol.decode_csrattrs(result.body)]
        self.assertEqual(oids, [policy.CHALLENGE_PASSWORD.dotted_string])
        plain = await gateway.curl("lab/csrattrs")
        self.assertEqual(plain.status, 204)
