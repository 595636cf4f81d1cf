"""The DTLS server (estgw.coaps.dtls) driven in memory by a pyOpenSSL
DTLS client: cookie exchange, sessions, limits, expiry, retransmission."""

from __future__ import annotations

from typing import Any

from OpenSSL import SSL, crypto
from twisted.internet.task import Clock
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw.coaps import dtls
from tests.test_auth import FactoryCA

CA = FactoryCA("DTLS Test CA")
OTHER_CA = FactoryCA("Unknown CA")
_HANDSHAKE, _ALERT, _APPLICATION = 22, 21, 23
_HELLO_VERIFY_REQUEST = 3


class FakeTransport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def write(self, data: bytes, address: Any) -> None:
        self.sent.append((data, address))


class Application:
    def __init__(self) -> None:
        self.records: list[tuple[Any, bytes]] = []
        self.closed: list[Any] = []

    def record_received(self, session: dtls.Session, data: bytes) -> None:
        self.records.append((session.address, data))
        session.send(b"echo:" + data)

    def session_closed(self, session: dtls.Session) -> None:
        self.closed.append(session.address)


def _drain(connection: SSL.Connection) -> bytes:
    out = b""
    while True:
        try:
            chunk = connection.bio_read(65535)
        except SSL.WantReadError:
            return out
        if not chunk:
            return out
        out += chunk


class DTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        directory = self.mktemp()
        import os

        os.makedirs(directory)
        server = CA.issue(directory, "localhost", ekus=())
        self.clock = Clock()
        self.transport = FakeTransport()
        self.application = Application()
        self.directory = directory
        context = dtls.dtls_context(server.key, server.cert, [], [CA.cert])
        self.server = dtls.DTLSServer(context, self.application, self.clock, max_sessions=2, idle_timeout=60)
        self.server.makeConnection(self.transport)

    def client(self, credentials: Any = None) -> SSL.Connection:
        context = SSL.Context(SSL.DTLS_METHOD)
        context.get_cert_store().add_cert(crypto.X509.from_cryptography(CA.cert))
        context.set_verify(SSL.VERIFY_PEER, lambda conn, cert, errno, depth, ok: bool(ok))
        if credentials is not None:
            context.use_certificate(credentials.cert)
            context.use_privatekey(credentials.key)
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        return connection

    def flight(self, client: SSL.Connection, address: Any) -> list[bytes]:
        """One client flight to the server; what the server sent back."""
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        data = _drain(client)
        self.transport.sent.clear()
        if data:
            self.server.datagramReceived(data, address)
        replies = [d for d, a in self.transport.sent if a == address]
        self.transport.sent.clear()
        return replies

    def handshake(self, client: SSL.Connection, address: Any) -> dtls.Session:
        for _ in range(8):
            replies = self.flight(client, address)
            for reply in replies:
                client.bio_write(reply)
            session = self.server.sessions.get(address)
            if session is not None and session.established:
                try:
                    client.do_handshake()
                except SSL.WantReadError:
                    continue
                return session
        self.fail("no handshake")

    def test_cookie_exchange_keeps_no_state(self) -> None:
        """A first ClientHello is answered with a HelloVerifyRequest
        (RFC 6347 §4.2.1) and creates no session: a spoofed source
        address costs the server no memory."""
        client = self.client()
        (reply,) = self.flight(client, ("192.0.2.1", 5000))
        self.assertEqual((reply[0], reply[13]), (_HANDSHAKE, _HELLO_VERIFY_REQUEST))
        self.assertEqual(self.server.sessions, {})

    def test_cookie_bound_to_address(self) -> None:
        """A ClientHello carrying a cookie made for another address gets
        another HelloVerifyRequest, not a session."""
        client = self.client()
        (reply,) = self.flight(client, ("192.0.2.1", 5000))
        client.bio_write(reply)
        (again,) = self.flight(client, ("192.0.2.2", 5000))
        self.assertEqual(again[13], _HELLO_VERIFY_REQUEST)
        self.assertEqual(self.server.sessions, {})

    def test_handshake_with_client_certificate(self) -> None:
        """After the handshake the session knows the verified client
        certificate, and application records go both ways."""
        credentials = CA.issue(self.directory, "device-1")
        client = self.client(credentials)
        address = ("127.0.0.1", 4000)
        session = self.handshake(client, address)
        self.assertEqual(session.peer.certificate, credentials.cert)
        self.assertIsNone(session.peer.untrusted_reason)
        self.assertEqual(session.peer.tls_version, "DTLSv1.2")
        client.send(b"hello")
        self.server.datagramReceived(_drain(client), address)
        self.assertEqual(self.application.records, [(address, b"hello")])
        client.bio_write(self.transport.sent[-1][0])
        self.assertEqual(client.recv(100), b"echo:hello")

    def test_untrusted_client_certificate_recorded(self) -> None:
        """A certificate of an unknown CA does not end the handshake; the
        session reports it untrusted with OpenSSL's reason."""
        client = self.client(OTHER_CA.issue(self.directory, "stranger"))
        session = self.handshake(client, ("127.0.0.1", 4001))
        self.assertIsNone(session.peer.certificate)
        self.assertIn("issuer", session.peer.untrusted_reason)

    def test_session_limit(self) -> None:
        """With max_sessions = 2 a third peer makes room by ending the
        least recently active session."""
        addresses = [("127.0.0.1", 4100 + i) for i in range(3)]
        first = self.client()
        self.handshake(first, addresses[0])
        self.handshake(self.client(), addresses[1])
        first.send(b"still here")  # the first is now the most recently active
        self.server.datagramReceived(_drain(first), addresses[0])
        self.handshake(self.client(), addresses[2])
        self.assertEqual(set(self.server.sessions), {addresses[0], addresses[2]})
        self.assertEqual(self.application.closed, [addresses[1]])

    def half_open(self, address: Any) -> None:
        """The cookie exchange, then the ClientHello with the cookie, then
        nothing: a handshake the server must keep until it times out."""
        client = self.client()
        (verify,) = self.flight(client, address)
        client.bio_write(verify)
        self.assertTrue(self.flight(client, address))  # ServerHello .. ServerHelloDone

    def test_half_open_handshakes_never_evict_sessions(self) -> None:
        """One host opening many handshakes (cookie answered, then silence)
        fills only the handshake bound, whose oldest makes room; the
        authenticated session and an anonymous one both stay and are served."""
        self.server.max_handshakes = 3
        credentials = CA.issue(self.directory, "device-1")
        legit = self.client(credentials)
        address = ("127.0.0.1", 4000)
        self.handshake(legit, address)
        anonymous = self.client()
        self.handshake(anonymous, ("127.0.0.1", 4001))
        for port in range(20000, 20050):
            self.half_open(("127.0.0.1", port))
        self.assertEqual(set(self.server.sessions), {address, ("127.0.0.1", 4001)})
        self.assertEqual(set(self.server.handshakes), {("127.0.0.1", p) for p in (20047, 20048, 20049)})
        self.assertNotIn(address, self.application.closed)
        self.assertEqual(len(self.application.closed), 47)  # half-open ones only
        self.transport.sent.clear()
        legit.send(b"still served")
        self.server.datagramReceived(_drain(legit), address)
        self.assertEqual(self.application.records, [(address, b"still served")])
        legit.bio_write(self.transport.sent[-1][0])
        self.assertEqual(legit.recv(100), b"echo:still served")

    def test_half_open_handshake_times_out(self) -> None:
        """A handshake not finished within handshake_timeout is dropped;
        established sessions run on their idle timeout instead."""
        self.server.handshake_timeout = 10
        self.handshake(self.client(), ("127.0.0.1", 4002))
        self.half_open(("127.0.0.1", 4003))
        self.assertIn(("127.0.0.1", 4003), self.server.handshakes)
        self.clock.advance(9)
        self.assertIn(("127.0.0.1", 4003), self.server.handshakes)
        self.clock.advance(2)
        self.assertEqual(self.server.handshakes, {})
        self.assertIn(("127.0.0.1", 4002), self.server.sessions)
        self.assertEqual(self.application.closed, [("127.0.0.1", 4003)])

    def test_session_limit_spares_authenticated_sessions(self) -> None:
        """At max_sessions a finished handshake displaces the least recently
        active session without a client certificate before any with one,
        even a more recently active one."""
        authenticated = ("127.0.0.1", 4010)
        self.handshake(self.client(CA.issue(self.directory, "device-2")), authenticated)
        anonymous = ("127.0.0.1", 4011)
        self.handshake(self.client(), anonymous)  # more recently active than the authenticated one
        self.handshake(self.client(), ("127.0.0.1", 4012))
        self.assertEqual(set(self.server.sessions), {authenticated, ("127.0.0.1", 4012)})
        self.assertEqual(self.application.closed, [anonymous])

    def test_new_handshake_from_same_address(self) -> None:
        """A peer that lost its session handshakes again from the same
        address: the new association replaces the old (RFC 6347 §4.2.8),
        and only once its cookie checks."""
        address = ("127.0.0.1", 5684)
        old = self.handshake(self.client(), address)
        client = self.client()
        (verify,) = self.flight(client, address)
        self.assertEqual(verify[13], _HELLO_VERIFY_REQUEST)
        self.assertIs(self.server.sessions[address], old)  # a bare ClientHello replaces nothing
        client.bio_write(verify)
        new = self.handshake(client, address)
        self.assertIsNot(new, old)
        self.assertTrue(old.closed)
        self.assertEqual(self.application.closed, [address])
        client.send(b"again")
        self.server.datagramReceived(_drain(client), address)
        self.assertEqual(self.application.records, [(address, b"again")])

    def test_idle_expiry(self) -> None:
        """A session idle for idle_timeout seconds ends with close_notify."""
        address = ("127.0.0.1", 4200)
        self.handshake(self.client(), address)
        self.clock.advance(59)
        self.assertIn(address, self.server.sessions)
        self.transport.sent.clear()
        self.clock.advance(2)
        self.assertNotIn(address, self.server.sessions)
        self.assertEqual(self.application.closed, [address])
        self.assertEqual([d[0] for d, a in self.transport.sent], [_ALERT])

    def test_datagrams_respect_mtu(self) -> None:
        """Records are packed into datagrams no larger than the MTU."""
        records = [bytes([_HANDSHAKE]) + b"\xfe\xfd" + b"\x00" * 8 + (n).to_bytes(2, "big") + b"x" * n
                   for n in (500, 500, 300, 1200)]
        self.assertEqual(dtls.split_records(b"".join(records)), records)
        datagrams = dtls.pack_datagrams(records, 1280)
        self.assertEqual([len(d) for d in datagrams], [1026, 313, 1213])

    def test_non_handshake_from_unknown_peer_ignored(self) -> None:
        self.server.datagramReceived(bytes([_APPLICATION]) + b"\xfe\xfd" + b"\x00" * 20, ("127.0.0.1", 4400))
        self.assertEqual((self.transport.sent, self.server.sessions), ([], {}))


class RetransmissionTests(TestCase):
    """OpenSSL's DTLS timer runs on the wall clock, so this one waits."""

    async def test_retransmission(self) -> None:
        """A server flight the client never got is sent again on
        OpenSSL's DTLS timer (RFC 6347 §4.2.4; first after one second)."""
        from twisted.internet import reactor

        helper = DTLSTests("test_idle_expiry")  # its fixtures, not its test
        helper.setUp()
        helper.server.reactor = reactor
        self.addCleanup(helper.server.stopProtocol)
        client = helper.client()
        address = ("127.0.0.1", 4300)
        (verify,) = helper.flight(client, address)
        client.bio_write(verify)
        flight = helper.flight(client, address)  # ServerHello .. ServerHelloDone: lost
        self.assertTrue(flight)
        self.assertEqual(helper.transport.sent, [])
        await deferLater(reactor, 1.5, lambda: None)
        resent = [d for d, a in helper.transport.sent if a == address]
        self.assertTrue(resent)
        self.assertEqual(resent[0][0], _HANDSHAKE)
        self.assertEqual(len(b"".join(resent)), len(b"".join(flight)))  # the same flight, new record numbers
