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
- a v1 line and a v2 header's fixed part are judged by the spec before
  Twisted reads them (its v1 parser takes any text for an address and
  raises on some): what names a client is an IP address;
- a connection without a header, with one the spec does not allow, or
  that leaves in the middle of it, is audited once (``bad-proxy-header``,
  with the reason): a balancer that sends none leaves a trace.
"""

from __future__ import annotations

import ipaddress
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
_V1_ADDRESSES: dict[bytes, type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]] = {
    b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address,
}
_NO_HEADER = "no PROXY protocol header (server.proxyProtocol)"
_NOT_VALID = "the PROXY protocol header is not valid"


def _held_enough(held: bytes | bytearray) -> bool:
    """Whether ``held`` (a connection's first bytes) is enough to decide
    on: a whole v2 header (its fixed part says how long), a whole v1 line
    (or more bytes than one may have), or what can be neither."""
    if _V2_SIGNATURE.startswith(held[:12]):
        return len(held) >= _V2_FIXED_PART and len(held) >= _V2_FIXED_PART + int.from_bytes(held[14:16], "big")
    if _V1_START.startswith(held[:6]):
        return b"\r\n" in held or len(held) >= _V1_MAX_LINE
    return True


_V2_COMMANDS = (0x20, 0x21)  # version 2: LOCAL, PROXY
# AF_UNSPEC, then TCP and UDP over IPv4, IPv6 and UNIX sockets; "other
# values are unspecified and must not be emitted ... and must be rejected
# as invalid by receivers" (2.2).
_V2_FAMILIES = (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32)


def _v2_problem(held: bytes) -> str | None:
    """Why the v2 header's fixed part (``held``, at least 16 bytes) is
    not one the spec (2.2) allows; None when it is.  Twisted's reader
    takes a family byte the spec says to refuse."""
    if held[12] not in _V2_COMMANDS:
        return "the PROXY v2 header has no version 2 LOCAL or PROXY command"
    if held[13] not in _V2_FAMILIES:
        return f"the PROXY v2 header has an address family and protocol the spec does not define (0x{held[13]:02x})"
    return None


def _v1_problem(held: bytes) -> str | None:
    """Why the v1 line ``held`` starts with is not one the spec (2.1)
    allows; None when it is.  Twisted's parser takes any text for an
    address or port, and raises on some (a traceback, no audit): the line
    is judged here first, so what a client is named is an address."""
    if not held.startswith(_V1_START):
        return "the PROXY v1 header does not start with PROXY and a space"
    end = held.find(b"\r\n", 0, _V1_MAX_LINE)
    if end < 0:
        return f"the PROXY v1 header has no CRLF within {_V1_MAX_LINE} bytes"
    fields = held[:end].split(b" ")
    if fields[:2] == [b"PROXY", b"UNKNOWN"]:
        return None  # "the receiver must ignore anything presented before the CRLF"
    kind = _V1_ADDRESSES.get(fields[1]) if len(fields) == 6 and fields[0] == b"PROXY" else None
    if kind is None:
        return "the PROXY v1 header is not PROXY TCP4|TCP6|UNKNOWN with two addresses and two ports"
    for address in fields[2:4]:
        try:
            kind(address.decode("ascii"))
        except ValueError:  # UnicodeDecodeError too; a zone (%eth0) is refused below
            return f"the PROXY v1 header names no {fields[1].decode()} address"
        if b"%" in address:
            return f"the PROXY v1 header names no {fields[1].decode()} address"
    for port in fields[4:6]:
        if not port.isdigit() or port != str(int(port)).encode() or int(port) > 65535:
            return "the PROXY v1 header names no port (0 to 65535, in decimal)"
    return None


def _unknown_read_as_twisted_reads_it(held: bytes) -> bytes:
    # Twisted's v1 parser wants a space after UNKNOWN; what follows it is
    # ignored in either case.
    line, crlf, rest = held.partition(b"\r\n")
    if crlf and line == _V1_UNKNOWN:
        return _V1_UNKNOWN + b" " + crlf + rest
    return held


def _named_client(peer: Any) -> Any:
    """``peer`` (an address a header named) in the one spelling of its
    client: IPv6 compressed, an IPv4-mapped IPv6 address as the IPv4 one."""
    host = getattr(peer, "host", None)
    if not isinstance(peer, (IPv4Address, IPv6Address)) or host is None:
        return peer
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        return IPv4Address(peer.type, str(mapped), peer.port)
    if str(address) != host:
        return type(peer)(peer.type, str(address), peer.port)
    return peer


class _ProxyHeader(HAProxyProtocolWrapper):
    factory: "_ProxyHeaderFactory"
    _audited = False  # one bad-proxy-header line per connection
    _closed_here = False  # the gateway closed it (a timeout, a refusal), not the client

    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        # A connection's first bytes until they are a whole header; a v2
        # one may be 64 KiB trickled in byte by byte, so they are appended
        # in place (0.1 s of CPU for the worst, as Twisted's own reader).
        self._held = bytearray()

    def _header_read(self) -> bool:
        # Twisted keeps what the header said here; there is no public
        # accessor (getPeer falls back to the TCP peer until it is set).
        return self._proxyInfo is not None

    def dataReceived(self, data: bytes) -> None:
        if self._header_read():
            super().dataReceived(data)
            return
        if self._audited or self._closed_here:
            return  # being closed: what still comes is not read
        if self._parser is None:
            self._held += data
            v2 = self._held.startswith(_V2_SIGNATURE) and len(self._held) >= _V2_FIXED_PART
            problem = _v2_problem(bytes(self._held[:_V2_FIXED_PART])) if v2 else None
            if problem is None and not _held_enough(self._held):
                return  # bounded: a v1 line, or the length a v2 header gives
            held, self._held = bytes(self._held), bytearray()
            if problem is None and held.startswith(b"PROXY"):
                problem = _v1_problem(held)
            if problem is not None:
                self._refuse(problem)
                return
            data = _unknown_read_as_twisted_reads_it(held)
        try:
            super().dataReceived(data)
        except Exception:
            if self._header_read():
                raise  # from what follows the header, not the header
            self._refuse("the PROXY protocol header cannot be read")
            return
        if self._header_read():
            counted = self.wrappedProtocol
            if isinstance(counted, _CountedClient):
                counted.count()
        elif self._closed_here:  # Twisted refused what it read
            self._audit_bad_header(_NOT_VALID if self._parser is not None else _NO_HEADER)

    def _refuse(self, reason: str) -> None:
        self._audit_bad_header(reason)
        self.loseConnection()

    def _audit_bad_header(self, reason: str) -> None:
        if self._audited:
            return
        self._audited = True
        transport: Any = self.transport
        host = limits.client_host(transport.getPeer())
        limits.refuse_connection(self.factory.refused, "bad-proxy-header", host, reason)

    def loseConnection(self) -> None:
        self._closed_here = True
        super().loseConnection()

    def abortConnection(self) -> None:
        # ProtocolWrapper hands this to its transport through __getattr__.
        self._closed_here = True
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self._header_read() and (self._held or self._parser is not None) and not self._closed_here:
            self._audit_bad_header("the client left in the middle of its PROXY protocol header")
        self._held = bytearray()
        super().connectionLost(reason)

    def getPeer(self) -> Any:
        peer = super().getPeer()
        if not isinstance(peer, (IPv4Address, IPv6Address)):
            # A v2 header naming a UNIX socket: the balancer's own peer,
            # as for LOCAL and UNSPEC, rather than a path per client.
            transport: Any = self.transport
            return transport.getPeer()
        return _named_client(peer)


class _ProxyHeaderFactory(HAProxyWrappingFactory):
    protocol = _ProxyHeader

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
