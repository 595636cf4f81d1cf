"""``server.proxyProtocol``: the PROXY protocol header (HAProxy's, v1 or
v2) that a TCP load balancer sends before TLS, read by Twisted's
:class:`~twisted.protocols.haproxy.HAProxyProtocolWrapper`, with what a
gateway needs on top of it:

- the client the header names is counted against
  ``server.maxConnectionsPerClient`` as soon as the header is read
  (:class:`estgw.limits.ClientLimits`), even when nothing follows it yet
  (a balancer sends the header alone when the client connects);
- that client's address has one spelling however the header wrote it
  (v2 headers give IPv6 addresses uncompressed), so one client is one
  count, one audit name and one Digest binding;
- a connection without a readable header is audited (``bad-proxy-header``)
  before Twisted closes it: a balancer that sends none leaves a trace.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IStreamServerEndpoint
# The classes behind twisted.protocols.haproxy.proxyEndpoint, which the
# package does not re-export; tests/test_proxy_protocol.py pins what is
# used of them.
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory
from zope.interface import implementer

from estgw import limits

__all__ = ["ProxyProtocolEndpoint"]


class _ProxyHeader(HAProxyProtocolWrapper):
    factory: "_ProxyHeaderFactory"

    def _header_read(self) -> bool:
        # Twisted keeps what the header said here; there is no public
        # accessor (getPeer falls back to the TCP peer until it is set).
        return self._proxyInfo is not None

    def dataReceived(self, data: bytes) -> None:
        before = self._header_read()
        super().dataReceived(data)
        if before:
            return
        if self._header_read():
            counted = self.wrappedProtocol
            if isinstance(counted, limits._CountedClient):
                counted.count()
        elif getattr(self.transport, "disconnecting", False):
            host = limits._host(super().getPeer())
            limits._refuse(self.factory.refused, "bad-proxy-header", host,
                           "no PROXY protocol header (server.proxyProtocol)")

    def getPeer(self) -> Any:
        peer = super().getPeer()
        host = getattr(peer, "host", None)
        if isinstance(peer, (IPv4Address, IPv6Address)) and host is not None:
            canonical = limits._host(peer)
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
    """``endpoint`` whose connections start with a PROXY protocol header;
    ``refused`` counts those without one (by reason code)."""

    def __init__(self, endpoint: Any, refused: limits.Counter | None = None) -> None:
        self._endpoint = endpoint
        self._refused = refused

    def listen(self, factory: Any) -> Any:
        return self._endpoint.listen(_ProxyHeaderFactory(factory, self._refused))
