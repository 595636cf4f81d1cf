"""``server.proxyProtocol``: the PROXY protocol header (HAProxy's, v1 or
v2) that a TCP load balancer sends before TLS, read by Twisted's
:class:`~twisted.protocols.haproxy.HAProxyProtocolWrapper`, with what a
gateway needs on top of it:

- the client the header names is counted against
  ``server.maxConnectionsPerClient`` as soon as the header is read
  (:class:`ClientLimits`), even when nothing follows it yet
  (a balancer sends the header alone when the client connects);
- that client's address has one spelling however the header wrote it
  (v2 headers give IPv6 addresses uncompressed), so one client is one
  count, one audit name and one Digest binding;
- a header that arrives in pieces is read whole (Twisted decides the
  version from the first segment alone and closes the connection when it
  is shorter than 8 or 16 bytes);
- ``PROXY UNKNOWN\r\n`` (v1 without addresses, which a balancer sends
  for its own health checks) is read as the spec says, "the receiver must
  ignore anything presented before the CRLF is found", like v2's LOCAL
  command: the connection is served and named by its TCP peer;
- a connection without a readable header is audited (``bad-proxy-header``)
  before Twisted closes it: a balancer that sends none leaves a trace.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
# The classes behind twisted.protocols.haproxy.proxyEndpoint, which the
# package does not re-export; tests/test_proxy_protocol.py pins what is
# used of them.
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import implementer

from estgw import limits

__all__ = ["ProxyProtocolEndpoint"]


class _CountedClient(ProtocolWrapper):
    """Counts its connection for the client its transport names, once that
    client is known: behind a PROXY protocol wrapper, when the header has
    been read (:meth:`count`, called by :class:`_ProxyHeader`) or at the
    first data after it, whichever comes first, before TLS sees a byte."""

    factory: "ClientLimits"
    host: str | None = None
    refused = False

    def count(self) -> bool:
        """Count the connection for its client, or close it when that client
        holds its cap already; False when it is (or was) refused.  Once per
        connection: later calls say what the first decided."""
        if self.host is not None or self.refused:
            return not self.refused
        transport: Any = self.transport
        host = limits.client_host(transport.getPeer())
        code, reason = limits.over_client_cap(self.factory.counts, self.factory.per_client, host)
        if code is not None:
            self.refused = True
            limits.refuse_connection(self.factory.refused, code, host, reason)
            transport.abortConnection()
            return False
        self.host = host
        self.factory.counts.client_opened(host)
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.count():
            super().dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.host is not None:
            self.factory.counts.client_closed(self.host)
            self.host = None
        super().connectionLost(reason)


class ClientLimits(WrappingFactory):
    """``server.maxConnectionsPerClient`` behind a PROXY protocol header
    (``server.proxyProtocol``): the client is the address the header names,
    so the connection is counted, or closed, once the header is read,
    inside the PROXY wrapper.  The total cap stays outside it, on the TCP
    connections (:class:`estgw.limits.ConnectionLimits` with
    ``clients_here`` False), sharing ``counts``."""

    protocol = _CountedClient

    def __init__(
        self, wrapped: Any, per_client: int, refused: limits.Counter | None, counts: limits.ConnectionCounts
    ) -> None:
        super().__init__(wrapped)
        self.per_client = per_client
        self.refused: limits.Counter = refused or (lambda code: None)
        self.counts = counts


# The PROXY protocol spec (haproxy.org proxy-protocol.txt): v2 headers
# start with this signature and are 16 bytes before their addresses; a v1
# line is at most 107 bytes with its CRLF.
_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED_PART = 16
_V1_START = b"PROXY "
_V1_MAX_LINE = 107
_V1_UNKNOWN = b"PROXY UNKNOWN"


def _held_enough(held: bytes) -> bool:
    """Whether ``held`` (a connection's first bytes) is enough for
    Twisted's header reader to decide on: a v2 header's fixed part, a whole
    v1 line, or what can be neither."""
    if _V2_SIGNATURE.startswith(held[:12]):
        return len(held) >= _V2_FIXED_PART
    if _V1_START.startswith(held[:6]):
        return b"\r\n" in held or len(held) >= _V1_MAX_LINE
    return True


def _unknown_read_as_twisted_reads_it(held: bytes) -> bytes:
    # Twisted's v1 parser wants a space after UNKNOWN; what follows it is
    # ignored in either case.
    line, crlf, rest = held.partition(b"\r\n")
    if crlf and line == _V1_UNKNOWN:
        return _V1_UNKNOWN + b" " + crlf + rest
    return held


class _ProxyHeader(HAProxyProtocolWrapper):
    factory: "_ProxyHeaderFactory"
    _held = b""

    def _header_read(self) -> bool:
        # Twisted keeps what the header said here; there is no public
        # accessor (getPeer falls back to the TCP peer until it is set).
        return self._proxyInfo is not None

    def dataReceived(self, data: bytes) -> None:
        before = self._header_read()
        if not before and self._parser is None:
            held = self._held + data
            if not _held_enough(held):
                self._held = held  # bounded: at most a v1 line
                return
            self._held = b""
            data = _unknown_read_as_twisted_reads_it(held)
        super().dataReceived(data)
        if before:
            return
        if self._header_read():
            counted = self.wrappedProtocol
            if isinstance(counted, _CountedClient):
                counted.count()
        elif getattr(self.transport, "disconnecting", False):
            self._audit_no_header()

    def _audit_no_header(self) -> None:
        host = limits.client_host(super().getPeer())
        limits.refuse_connection(self.factory.refused, "bad-proxy-header", host,
                                 "no PROXY protocol header (server.proxyProtocol)")

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._held:  # it left in the middle of its header
            self._held = b""
            self._audit_no_header()
        super().connectionLost(reason)

    def getPeer(self) -> Any:
        peer = super().getPeer()
        host = getattr(peer, "host", None)
        if isinstance(peer, (IPv4Address, IPv6Address)) and host is not None:
            canonical = limits.client_host(peer)
            if canonical != host:
                return type(peer)(peer.type, canonical, peer.port)
        return peer


class _ProxyHeaderFactory(HAProxyWrappingFactory):
    protocol = _ProxyHeader  # type: ignore[assignment]

    def __init__(self, wrapped: Any, refused: limits.Counter | None) -> None:
        super().__init__(wrapped)
        self.refused: limits.Counter = refused or (lambda code: None)


@implementer(IStreamServerEndpoint)
class ProxyProtocolEndpoint:
    """``endpoint`` whose connections start with a PROXY protocol header,
    each counted for the client it names under ``per_client``
    (``server.maxConnectionsPerClient``, in ``counts``); ``refused``
    counts refusals by reason code."""

    def __init__(self, endpoint: Any, per_client: int, refused: limits.Counter | None,
                 counts: limits.ConnectionCounts) -> None:
        self._endpoint = endpoint
        self._per_client = per_client
        self._refused = refused
        self._counts = counts

    def listen(self, factory: Any) -> Any:
        counted = ClientLimits(factory, self._per_client, self._refused, self._counts)
        return self._endpoint.listen(_ProxyHeaderFactory(counted, self._refused))
