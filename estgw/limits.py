"""What one client may hold of the gateway: connections, time, header size.

* :class:`ConnectionLimits` wraps the listening factory, outside TLS, so
  a connection over ``server.maxConnections`` (all clients) or
  ``server.maxConnectionsPerClient`` (one IP address) is closed before a
  handshake costs anything.
* :class:`LimitedChannel` is the HTTP/1.1 channel of the EST site: the
  request head must arrive within ``server.headerTimeout`` seconds of its
  first byte and the body within ``server.bodyTimeout`` seconds of the
  head, however the bytes trickle in (the idle timeout alone is reset by
  every byte, so a client sending one byte every few seconds would hold
  its connection for ever); at most ``server.maxHeaders`` header lines of
  ``server.maxHeaderBytes`` bytes in all (request line included), else
  400 and the connection is closed (RFC 9112 §2.3, twisted.web's checks
  with our numbers).

Both count what they turn away in :mod:`estgw.metrics` and write one
line to the audit log (RFC 9110 §15.5.9: 408 for a request not received
in time).
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.interfaces import IAddress, IStreamServerEndpoint
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.web import http
from zope.interface import implementer

_audit = Logger(namespace="estgw.audit")

# Called with a reason code for each connection or request turned away here.
Counter = Callable[[str], None]


def _host(address: Any) -> str:
    return str(getattr(address, "host", address))


class ConnectionCounts:
    """Open connections in all and by client address, shared by every
    listening address of one service (IPv4 and IPv6)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: dict[str, int] = {}

    def opened(self, host: str) -> None:
        self.total += 1
        self.by_client[host] = self.by_client.get(host, 0) + 1

    def closed(self, host: str) -> None:
        self.total -= 1
        left = self.by_client.get(host, 1) - 1
        if left > 0:
            self.by_client[host] = left
        else:
            self.by_client.pop(host, None)


class ConnectionLimits(WrappingFactory):
    """Closes connections beyond ``total`` open ones, or beyond
    ``per_client`` from one IP address; ``0`` means no limit."""

    protocol = ProtocolWrapper
    _log = Logger()

    def __init__(
        self, wrapped: Any, total: int, per_client: int, refused: Counter | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        super().__init__(wrapped)
        self.total = total
        self.per_client = per_client
        self._refused = refused or (lambda code: None)
        self.counts = counts if counts is not None else ConnectionCounts()
        self._hosts: dict[Any, str] = {}

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = _host(addr)
        code = None
        if self.total and self.counts.total >= self.total:
            code = "too-many-connections"
        elif self.per_client and self.counts.by_client.get(host, 0) >= self.per_client:
            code = "too-many-connections-from-client"
        if code is not None:
            self._refused(code)
            _audit.info(
                "{event} connection from {client}: {code}", event="refused", code=code, client=host,
                status=0,
            )
            return None  # the listening port closes the socket at once
        protocol = super().buildProtocol(addr)
        self._hosts[protocol] = host
        return protocol

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        host = self._hosts.get(p)
        if host is not None:
            self.counts.opened(host)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        host = self._hosts.pop(p, None)
        if host is not None:
            self.counts.closed(host)


@implementer(IStreamServerEndpoint)
class LimitedEndpoint:
    """A server endpoint whose factories are wrapped in :class:`ConnectionLimits`."""

    def __init__(
        self, endpoint: Any, total: int, per_client: int, refused: Counter | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._total = total
        self._per_client = per_client
        self._refused = refused
        self._counts = counts
        self.limits: ConnectionLimits | None = None

    def listen(self, factory: Any) -> Any:
        self.limits = ConnectionLimits(factory, self._total, self._per_client, self._refused, self._counts)
        return self._endpoint.listen(self.limits)


class LimitedChannel(http.HTTPChannel):
    """An HTTPChannel with deadlines for the request head and body.

    Class attributes are set per site by :func:`channel_factory`.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    metrics: Any = None  # estgw.metrics.Metrics

    def refused(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.refusal(code)

    _deadline: Any = None
    _in_head = False

    def dataReceived(self, data: bytes) -> None:
        if data and self.line_mode and not self._handlingRequest and self._deadline is None:
            # The first byte of a request head starts its clock.
            self._in_head = True
            self._deadline = self.callLater(self.header_timeout, lambda: self._too_slow("header-timeout"))
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        self._in_head = False
        super().allHeadersReceived()
        if self.length != 0 and self.transport is not None and not self._handlingRequest:
            self._deadline = self.callLater(self.body_timeout, lambda: self._too_slow("body-timeout"))

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        if self.metrics is not None and not getattr(self.transport, "_handshakeDone", True):
            self.metrics.tls_handshake_failure(handshake_failure_reason(reason.value))
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        deadline, self._deadline = self._deadline, None
        if deadline is not None and deadline.active():
            deadline.cancel()

    def lineLengthExceeded(self, line: bytes) -> None:
        # A request or header line over MAX_LENGTH (server.maxHeaderBytes,
        # e.g. a huge Authorization header).  twisted's default closes the
        # transport directly, which over TLS waits for this channel's
        # producer: the client hung until the idle timeout.
        reason = f"a request or header line is longer than {self.MAX_LENGTH} bytes"
        self.refused("line-too-long")
        _audit.info(
            "{event} connection from {client}: {status} {code}: {reason}",
            event="refused", code="line-too-long", client=_host(self.getPeer()), status=400, reason=reason,
        )
        self.close_with(400, reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web answers a bare 400 for every malformed head; say why,
        # and 431 (RFC 6585 §5) where it is our header limits.
        if self._receivedHeaderSize > self.totalHeadersSize:
            status, code, reason = 431, "header-too-large", f"the request head exceeds {self.totalHeadersSize} bytes"
        elif self._receivedHeaderCount > self.maxHeaders:
            status, code, reason = 431, "too-many-headers", f"the request has more than {self.maxHeaders} header fields"
        else:
            status, code, reason = 400, "bad-request-head", "the request line or a header field is malformed"
        self.refused(code)
        _audit.info(
            "{event} connection from {client}: {status} {code}: {reason}",
            event="refused", code=code, client=_host(self.getPeer()), status=status, reason=reason,
        )
        self.close_with(status, reason)

    # After a refusal that closes the connection: how long the client has
    # to read the answer (a TLS close waits for the client's close_notify,
    # which a client that does not read never sends), then it is cut off.
    refusal_abort_seconds = 5.0

    def close_with(self, status: int, reason: str) -> None:
        """Answer ``status`` with the one-line ``reason`` outside any
        request, drop further input, and close: cut off after
        :attr:`refusal_abort_seconds` if the client does not close."""
        body = (reason + "\n").encode("utf-8")
        phrase = http.RESPONSES.get(status, b"Error")
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, phrase, len(body)) + body
        )
        # Stop reading; close once written, abort if the client does not read.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
        self.setTimeout(None)
        self._cancel_deadline()
        self._abortingCall = self.callLater(self.refusal_abort_seconds, self.forceAbortClient)
        self.loseConnection()

    def _too_slow(self, code: str) -> None:
        self._deadline = None
        part = "head" if code == "header-timeout" else "body"
        seconds = self.header_timeout if code == "header-timeout" else self.body_timeout
        peer = self.transport.getPeer() if self.transport is not None else None
        self.refused(code)
        _audit.info(
            "{event} connection from {client}: {status} {code}: the request {part} took longer than {seconds:g} s",
            event="refused", code=code, client=_host(peer), status=408, part=part, seconds=seconds,
        )
        self.close_with(408, f"the request {part} was not received within {seconds:g} seconds")


def handshake_failure_reason(error: BaseException | None) -> str:
    """OpenSSL's reason for a failed handshake (``no shared cipher``,
    ``unsupported protocol``, ``http request``, ...), a bounded set of
    words fit for a metric label; ``closed`` when the client went away."""
    if isinstance(error, SSL.Error):
        for entry in error.args[0] if error.args and isinstance(error.args[0], list) else ():
            if isinstance(entry, tuple) and entry:
                return str(entry[-1])[:64]
        return "tls error"
    return "closed"


def channel_factory(
    header_timeout: float,
    body_timeout: float,
    max_headers: int,
    max_header_bytes: int,
    metrics: Any = None,
) -> type[LimitedChannel]:
    """A :class:`LimitedChannel` class with these limits."""
    return type(
        "LimitedChannel",
        (LimitedChannel,),
        {
            "header_timeout": header_timeout,
            "body_timeout": body_timeout,
            "maxHeaders": max_headers,
            "totalHeadersSize": max_header_bytes,
            # No single line may be longer than the whole head may be.
            "MAX_LENGTH": max_header_bytes,
            "metrics": metrics,
        },
    )


def limit_site(site: Any, config: Any = None) -> Any:
    """Apply the request limits to any twisted.web Site of this package
    (the metrics listener, the approval service): the ``server.*`` values
    of ``config``, or the defaults."""
    if config is None:
        from estgw.config import Config

        config = Config(source="", state_directory="")
    site.timeOut = config.idle_timeout
    site.protocol = channel_factory(
        config.header_timeout, config.body_timeout, config.max_headers, config.max_header_bytes
    )
    return site

