"""A DTLS 1.2 server on a Twisted UDP port (RFC 6347, RFC 7925 profile).

One pyOpenSSL :class:`~OpenSSL.SSL.Connection` with memory BIOs per peer
address.  A peer gets one only after the cookie exchange
(``DTLSv1_listen``, RFC 6347 §4.2.1): a ClientHello from a spoofed
address is answered with a HelloVerifyRequest and leaves no state.  The
number of sessions is bounded (the least recently active one makes room)
and idle sessions expire; handshake flights are retransmitted on
OpenSSL's DTLS timer.  DTLS 1.3 is not offered: OpenSSL has no DTLS 1.3.

Application data goes to an :class:`IDatagramApplication` one record at
a time; what it sends back is one record per call.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any, Callable, Protocol, Sequence

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from estgw import tls

DTLS1_2_VERSION = 0xFEFD  # OpenSSL's DTLS1_2_VERSION
_HANDSHAKE = 22  # DTLS record content type of a ClientHello
_RECORD_HEADER = 13  # type, version, epoch, sequence number, length
DEFAULT_MTU = 1280  # IPv6 minimum link MTU: no IP fragmentation anywhere
MAX_DATAGRAM = 65535


class IDatagramApplication(Protocol):
    """What runs on top of the DTLS sessions (the CoAP layer)."""

    def record_received(self, session: "Session", data: bytes) -> None:
        """One decrypted DTLS record's payload from ``session``."""

    def session_closed(self, session: "Session") -> None:
        """``session`` ended (expiry, eviction, alert, close_notify)."""


def dtls_context(
    private_key: Any,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    trust_anchors: Sequence[x509.Certificate],
    settings: tls.TLSSettings | None = None,
) -> SSL.Context:
    """The server's DTLS context: our key and chain; a client certificate
    requested, optional at the DTLS layer and checked against
    ``trust_anchors`` the way :mod:`estgw.tls` checks it for HTTPS (a
    failure is recorded, and refused by the filter with its reason)."""
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    # Memory BIOs cannot report the path MTU: we set it per connection.
    context.set_options(SSL.OP_NO_QUERY_MTU | SSL.OP_NO_TICKET)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.use_certificate(certificate)
    context.use_privatekey(private_key)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.check_privatekey()
    store = context.get_cert_store()
    assert store is not None
    for anchor in trust_anchors:
        store.add_cert(crypto.X509.from_cryptography(anchor))
    context.set_verify(SSL.VERIFY_PEER, tls._record_verify_result)
    tls.apply_tls_settings(context, settings or tls.TLSSettings())
    return context


def _is_initial_client_hello(data: bytes) -> bool:
    """A handshake record of epoch 0 carrying a ClientHello (type 1)."""
    return len(data) > _RECORD_HEADER and data[0] == _HANDSHAKE and data[3:5] == b"\x00\x00" and data[13] == 1


def split_records(data: bytes) -> list[bytes]:
    """The DTLS records in ``data`` (a memory BIO's output, which runs
    records of several datagrams together)."""
    records = []
    at = 0
    while at + _RECORD_HEADER <= len(data):
        length = int.from_bytes(data[at + 11:at + 13], "big")
        end = at + _RECORD_HEADER + length
        records.append(data[at:end])
        at = end
    if at < len(data):  # never from OpenSSL; kept rather than lost
        records.append(data[at:])
    return records


def pack_datagrams(records: Sequence[bytes], mtu: int) -> list[bytes]:
    """Records packed into datagrams of at most ``mtu`` bytes where they
    fit (RFC 6347 §4.1.1 allows several records in one datagram)."""
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


class Session:
    """One DTLS association with one peer address."""

    _log = Logger()

    def __init__(self, server: "DTLSServer", address: tuple[Any, ...], connection: SSL.Connection) -> None:
        self.server = server
        self.address = address
        self.connection = connection
        self.established = False
        self.closed = False
        self.peer: tls.PeerInfo | None = None  # set once the handshake is done
        self.state: dict[str, Any] = {}  # the application's per-session state
        self._retransmit: Any = None
        self._idle: Any = None

    def send(self, data: bytes) -> None:
        """Send ``data`` as one DTLS record."""
        if self.closed:
            return
        try:
            self.connection.send(data)
        except SSL.Error:
            self.server._drop(self, "send failed")
            return
        self.server._flush(self)

    def _touch(self) -> None:
        timeout = self.server.idle_timeout
        if self._idle is None or not self._idle.active():
            self._idle = self.server.reactor.callLater(timeout, self.server._expire, self)
        else:
            self._idle.reset(timeout)

    def _arm_retransmission(self) -> None:
        if self._retransmit is not None and self._retransmit.active():
            self._retransmit.cancel()
        self._retransmit = None
        if self.established or self.closed:
            return
        delay = self.connection.DTLSv1_get_timeout()
        if delay is not None:
            self._retransmit = self.server.reactor.callLater(max(delay, 0.01), self._retransmit_flight)

    def _retransmit_flight(self) -> None:
        self._retransmit = None
        try:
            self.connection.DTLSv1_handle_timeout()
        except SSL.Error:
            self.server._drop(self, "handshake timed out")
            return
        self.server._flush(self)
        self._arm_retransmission()

    def _cancel_timers(self) -> None:
        for call in (self._retransmit, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._retransmit = self._idle = None


class DTLSServer(DatagramProtocol):
    """Serves DTLS on a UDP port; pass it to ``reactor.listenUDP``.

    :param context: from :func:`dtls_context`.
    :param application: receives each session's records.
    :param max_sessions: at most this many DTLS sessions at once.
    :param idle_timeout: seconds without a datagram before a session ends.
    :param mtu: largest datagram sent, in bytes (IP and UDP headers not counted).
    """

    _log = Logger()

    def __init__(
        self,
        context: SSL.Context,
        application: IDatagramApplication,
        reactor: Any = None,
        max_sessions: int = 1000,
        idle_timeout: float = 300.0,
        mtu: int = DEFAULT_MTU,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.context = context
        self.application = application
        self.reactor = reactor
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self.mtu = mtu
        self.sessions: dict[tuple[Any, ...], Session] = {}  # least recently active first
        # Cookies are HMACs of the peer's address under a key of this
        # process (RFC 6347 §4.2.1): checking one needs no stored state.
        self._cookie_key = os.urandom(32)
        context.set_cookie_generate_callback(self._make_cookie)
        context.set_cookie_verify_callback(self._check_cookie)

    # -- cookies -------------------------------------------------------------

    def _cookie_for(self, address: Any) -> bytes:
        text = repr(tuple(address)).encode("utf-8")
        return hmac.new(self._cookie_key, text, hashlib.sha256).digest()[:16]

    def _make_cookie(self, connection: SSL.Connection) -> bytes:
        return self._cookie_for(connection.get_app_data())

    def _check_cookie(self, connection: SSL.Connection, cookie: bytes) -> bool:
        return hmac.compare_digest(cookie, self._cookie_for(connection.get_app_data()))

    # -- datagrams -------------------------------------------------------------

    def datagramReceived(self, data: bytes, address: Any) -> None:
        session = self.sessions.get(address)
        if session is None:
            self._listen(data, address)
            return
        if session.established and _is_initial_client_hello(data):
            # The peer lost its session and starts again from the same
            # address (a device restarted on a fixed port): a new association
            # replaces the old once its cookie checks (RFC 6347 §4.2.8).
            self._listen(data, address)
            return
        # Most recently active last: eviction takes the first.
        del self.sessions[address]
        self.sessions[address] = session
        session._touch()
        self._feed(session, data)

    def _listen(self, data: bytes, address: Any) -> None:
        """A datagram from an address without a session: only a
        ClientHello with a valid cookie makes one."""
        if not data or data[0] != _HANDSHAKE:
            return
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(address)
        connection.set_accept_state()
        connection.set_ciphertext_mtu(self.mtu)
        try:
            connection.bio_write(data)
            connection.DTLSv1_listen()
        except SSL.WantReadError:
            # No (valid) cookie yet: HelloVerifyRequest out, state dropped.
            self._send_pending(connection, address)
            return
        except SSL.Error:
            return
        previous = self.sessions.get(address)
        if previous is not None:
            self._drop(previous, "replaced by a new handshake from the same address")
        while len(self.sessions) >= self.max_sessions:
            oldest = next(iter(self.sessions.values()))
            self._drop(oldest, "session limit reached; the least recently active makes room")
        session = Session(self, address, connection)
        self.sessions[address] = session
        session._touch()
        self._advance(session)

    def _feed(self, session: Session, data: bytes) -> None:
        try:
            session.connection.bio_write(data)
        except SSL.Error:
            self._drop(session, "unreadable datagram")
            return
        self._advance(session)

    def _advance(self, session: Session) -> None:
        """Run the handshake on, or read application records."""
        connection = session.connection
        if not session.established:
            try:
                connection.do_handshake()
            except SSL.WantReadError:
                self._flush(session)
                session._arm_retransmission()
                return
            except SSL.Error as e:
                self._flush(session)  # the alert, if any
                self._drop(session, f"handshake failed: {e}")
                return
            session.established = True
            session.peer = tls.connection_peer_info(connection)
            session._arm_retransmission()
            self._flush(session)
        while not session.closed:
            try:
                record = connection.recv(MAX_DATAGRAM)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._flush(session)
                self._drop(session, "closed by the peer")
                return
            except SSL.Error:
                self._flush(session)
                self._drop(session, "DTLS error")
                return
            try:
                self.application.record_received(session, record)
            except Exception:
                self._log.failure("while handling a record from {address}", address=session.address)
        self._flush(session)

    def _send_pending(self, connection: SSL.Connection, address: Any) -> None:
        out = b""
        while True:
            try:
                chunk = connection.bio_read(MAX_DATAGRAM)
            except SSL.WantReadError:
                break
            if not chunk:
                break
            out += chunk
        if out and self.transport is not None:
            for datagram in pack_datagrams(split_records(out), self.mtu):
                self.transport.write(datagram, address)

    def _flush(self, session: Session) -> None:
        self._send_pending(session.connection, session.address)

    # -- ending sessions ------------------------------------------------------

    def _expire(self, session: Session) -> None:
        session._idle = None
        self.close(session, "idle")

    def close(self, session: Session, why: str) -> None:
        """End ``session`` with a close_notify alert."""
        if session.closed:
            return
        try:
            session.connection.shutdown()
        except SSL.Error:
            pass
        self._flush(session)
        self._drop(session, why)

    def _drop(self, session: Session, why: str) -> None:
        if session.closed:
            return
        session.closed = True
        session._cancel_timers()
        if self.sessions.get(session.address) is session:
            del self.sessions[session.address]
        self._log.debug("DTLS session with {address} ended: {why}", address=session.address, why=why)
        self.application.session_closed(session)

    def stopProtocol(self) -> None:
        for session in list(self.sessions.values()):
            session._cancel_timers()
            session.closed = True
            self.application.session_closed(session)
        self.sessions.clear()
