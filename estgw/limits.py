"""What one client may hold of the gateway: connections, time, header size,
and the server's memory.

* :class:`ConnectionLimits` wraps the listening factory of every TCP
  listener, outside TLS, so a connection over ``server.maxConnections``
  (all clients) or ``server.maxConnectionsPerClient`` (one IP address) is
  closed before a handshake costs anything.  The EST and the publishing
  (CRL/OCSP) listener each count their own connections under these caps,
  and the metrics and health listener has its own cap,
  :data:`METRICS_CONNECTIONS`: a flood of one listener never starves
  another (nor ``/health``).  :func:`ensure_descriptors` makes sure at
  start that the process may open that many descriptors, so the caps act
  before the system's limit (EMFILE) does.
* :class:`LimitedChannel` is the HTTP/1.1 channel of every listener (EST,
  metrics and health, CRL/OCSP publishing, the approval service): the
  request head must arrive within ``server.headerTimeout`` seconds of its
  first byte and the body within ``server.bodyTimeout`` seconds of the
  head, however the bytes trickle in (the idle timeout alone is reset by
  every byte, so a client sending one byte every few seconds would hold
  its connection for ever); at most ``server.maxHeaders`` header lines of
  ``server.maxHeaderBytes`` bytes in all (request line included), else
  400 and the connection is closed (RFC 9112 §2.3, twisted.web's checks
  with our numbers).  It answers pipelined requests (RFC 9112 §9.3.2) only
  as fast as the client reads the answers: see
  :meth:`LimitedChannel.pauseProducing`.  A connection silent for
  ``server.idleTimeout`` seconds, or whose client reads nothing of what
  it was sent for that long, is closed.

Both count what they turn away in :mod:`estgw.metrics` and write one
line to the audit log (RFC 9110 §15.5.9: 408 for a request not received
in time).
"""

from __future__ import annotations

import ipaddress
import re
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


def client_host(address: Any) -> str:
    """The client of ``address`` as counted and logged: an IP address in
    its one canonical spelling (``2001:db8::5``, however it was written)."""
    host = str(getattr(address, "host", address))
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


class ConnectionCounts:
    """Open connections in all and by client address, shared by every
    listening address of one service (IPv4 and IPv6)."""

    def __init__(self) -> None:
        self.total = 0
        self.by_client: dict[str, int] = {}

    def opened(self, host: str | None) -> None:
        """One more connection, and one more of ``host`` (None: the
        client is counted elsewhere, see :class:`estgw.proxied.ClientLimits`)."""
        self.total += 1
        if host is not None:
            self.client_opened(host)

    def closed(self, host: str | None) -> None:
        self.total -= 1
        if host is not None:
            self.client_closed(host)

    def client_opened(self, host: str) -> None:
        self.by_client[host] = self.by_client.get(host, 0) + 1

    def client_closed(self, host: str) -> None:
        left = self.by_client.get(host, 1) - 1
        if left > 0:
            self.by_client[host] = left
        else:
            self.by_client.pop(host, None)


TOTAL_WHERE = "in all (server.maxConnections)"


class ConnectionLimits(WrappingFactory):
    """Closes connections beyond ``total`` open ones, or beyond
    ``per_client`` from one IP address; ``0`` means no limit.

    ``total_where`` says in the refusal what ``total`` counts and where it
    comes from (in a worker process: its share of the key)."""

    protocol = ProtocolWrapper
    _log = Logger()

    def __init__(
        self, wrapped: Any, total: int, per_client: int, refused: Counter | None = None,
        counts: ConnectionCounts | None = None, total_where: str = TOTAL_WHERE,
        clients_here: bool = True,
    ) -> None:
        super().__init__(wrapped)
        self.total = total
        self.per_client = per_client
        self.total_where = total_where
        self._refused = refused or (lambda code: None)
        self.counts = counts if counts is not None else ConnectionCounts()
        # False behind a PROXY header: the TCP peer is the load balancer,
        # and estgw.proxied.ClientLimits counts the client the header names.
        self.clients_here = clients_here
        self._hosts: dict[Any, str | None] = {}

    def buildProtocol(self, addr: IAddress | None) -> Any:
        host = client_host(addr)
        code = reason = None
        if self.total and self.counts.total >= self.total:
            code = "too-many-connections"
            reason = f"open connections: at most {self.total} {self.total_where}"
        elif self.clients_here:
            code, reason = over_client_cap(self.counts, self.per_client, host)
        if code is not None:
            refuse_connection(self._refused, code, host, reason)
            return None  # the listening port closes the socket at once
        protocol = super().buildProtocol(addr)
        self._hosts[protocol] = host if self.clients_here else None
        return protocol

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        if p in self._hosts:
            self.counts.opened(self._hosts[p])

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if p in self._hosts:
            self.counts.closed(self._hosts.pop(p))


def over_client_cap(counts: ConnectionCounts, per_client: int, host: str) -> tuple[str | None, str | None]:
    if per_client and counts.by_client.get(host, 0) >= per_client:
        return (
            "too-many-connections-per-client",
            f"open connections: at most {per_client} per client address (server.maxConnectionsPerClient)",
        )
    return None, None


def refuse_connection(refused: Counter, code: str, host: str, reason: str | None) -> None:
    refused(code)
    # No HTTP status: the connection is closed before any request.
    _audit.info(
        "{event} connection from {client}: {code}: {reason}",
        event="refused", code=code, client=host, reason=reason,
    )


@implementer(IStreamServerEndpoint)
class LimitedEndpoint:
    """A server endpoint whose factories are wrapped in :class:`ConnectionLimits`."""

    def __init__(
        self, endpoint: Any, total: int, per_client: int, refused: Counter | None = None,
        counts: ConnectionCounts | None = None, total_where: str = TOTAL_WHERE,
        clients_here: bool = True,
    ) -> None:
        self._endpoint = endpoint
        self._total = total
        self._per_client = per_client
        self._refused = refused
        self._counts = counts
        self._total_where = total_where
        self._clients_here = clients_here
        self.limits: ConnectionLimits | None = None

    def listen(self, factory: Any) -> Any:
        self.limits = ConnectionLimits(
            factory, self._total, self._per_client, self._refused, self._counts, self._total_where,
            self._clients_here,
        )
        return self._endpoint.listen(self.limits)


#: Connections the metrics and health listener (metrics.port) takes, on
#: its own count: scrapers and probes are few, and a flood of the EST or
#: publishing port must not make /health/live fail.
METRICS_CONNECTIONS = 16

#: Descriptors a gateway process holds besides its connections: the
#: listening sockets, the store (SQLite's database, journal and shared
#: memory files per pooled connection), the log and audit files, the
#: reactor's epoll and waker, a worker's pipes to its supervisor, and
#: outgoing connections (OCSP, the approval service, an upstream EST CA).
#: An idle gateway holds about 25 (``tests/test_descriptors.py``).
RESERVED_DESCRIPTORS = 128


def default_caps() -> tuple[int, int]:
    """``server.maxConnections`` and ``server.maxConnectionsPerClient`` by
    default, for a listener without a configuration of its own (the
    reference approval service)."""
    from estgw.config import Config

    config = Config(source="", state_directory="")
    return config.max_connections, config.max_connections_per_client


def per_process(total: int, workers: int) -> int:
    """One worker's share of a gateway-wide cap (``server.maxConnections``,
    ``ca.maxQueued``) when ``workers`` processes serve: ``total`` divided,
    rounded up, so that all of them together hold at most ``total +
    workers - 1``; 0 (no cap) stays 0."""
    return -(-total // max(1, workers)) if total else 0


def descriptors_needed(connections: int, publish: bool, metrics: bool) -> int:
    """File descriptors one gateway process needs for ``connections``
    capped connections on the EST listener, as many again on the
    publishing listener when ``publish``, the metrics listener's
    :data:`METRICS_CONNECTIONS` when ``metrics``, and
    :data:`RESERVED_DESCRIPTORS`."""
    return connections * (2 if publish else 1) + (METRICS_CONNECTIONS if metrics else 0) + RESERVED_DESCRIPTORS


def ensure_descriptors(
    total: int, workers: int = 1, publish: bool = False, metrics: bool = False, key: str = "server.maxConnections",
    settable: bool = True,
) -> tuple[int, int] | None:
    """Make sure each gateway process may open the descriptors its share of
    ``total`` connections (``server.maxConnections``, over ``workers``
    processes: :func:`per_process`) needs on its listeners
    (:func:`descriptors_needed`): raise this process's soft
    ``RLIMIT_NOFILE`` towards its hard one if it is lower; processes it
    starts (the workers) inherit it.  ``total`` 0 (no cap): nothing to
    ensure.

    :returns: ``(before, after)`` when the soft limit was raised, else None.
    :raises ValueError: the hard limit is too low, with a message naming
        ``key`` (where ``total`` comes from; when not ``settable``, a fixed
        cap, the advice is only to raise the limit), the limit and what to do: a cap that
        cannot act before the system's limit would be a false promise, and
        at EMFILE every listener fails at once.
    """
    if not total:
        return None
    import resource

    workers = max(1, workers)
    connections = per_process(total, workers)
    needed = descriptors_needed(connections, publish, metrics)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard != resource.RLIM_INFINITY and hard < needed:
        listeners = 2 if publish else 1
        fits = (hard - (needed - connections * listeners)) // listeners * workers
        parts = [f"{connections} connections" + (" on each of publish.port and server.port" if publish else "")]
        if metrics:
            parts.append(f"{METRICS_CONNECTIONS} on metrics.port")
        parts.append(f"{RESERVED_DESCRIPTORS} for the store, logs and listening sockets")
        share = f" ({connections} in each of {workers} workers)" if workers > 1 else ""
        advice = f"lower {key} to at most {fits}" if fits > 0 else f"lower {key}"
        fix = f"{advice}, or raise the limit" if settable else "raise the limit"
        raise ValueError(
            f"{key}{f' = {total}' if settable else f' of {total}'}{share} needs {needed} file descriptors"
            f" per process ({', '.join(parts)}), but the process may open at most {hard}"
            f" (RLIMIT_NOFILE, ulimit -n): {fix} (systemd: LimitNOFILE=)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return soft, needed


#: The reason phrase of each status code: RFC 9110 §15, and RFC 6585 for
#: 428, 429, 431 and 511.  twisted.web's table has none for 429 or 431
#: and RFC 2616's older phrases for 408, 413, 414, 416 and 504.
REASON_PHRASES: dict[int, bytes] = {
    100: b"Continue", 101: b"Switching Protocols",
    200: b"OK", 201: b"Created", 202: b"Accepted", 203: b"Non-Authoritative Information",
    204: b"No Content", 205: b"Reset Content", 206: b"Partial Content",
    300: b"Multiple Choices", 301: b"Moved Permanently", 302: b"Found", 303: b"See Other",
    304: b"Not Modified", 305: b"Use Proxy", 307: b"Temporary Redirect", 308: b"Permanent Redirect",
    400: b"Bad Request", 401: b"Unauthorized", 402: b"Payment Required", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 406: b"Not Acceptable",
    407: b"Proxy Authentication Required", 408: b"Request Timeout", 409: b"Conflict", 410: b"Gone",
    411: b"Length Required", 412: b"Precondition Failed", 413: b"Content Too Large",
    414: b"URI Too Long", 415: b"Unsupported Media Type", 416: b"Range Not Satisfiable",
    417: b"Expectation Failed", 421: b"Misdirected Request", 422: b"Unprocessable Content",
    426: b"Upgrade Required", 428: b"Precondition Required", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout", 505: b"HTTP Version Not Supported",
    511: b"Network Authentication Required",
}


def reason_phrase(status: int) -> bytes:
    """The reason phrase of ``status`` (:data:`REASON_PHRASES`); empty for
    a code no RFC names, which RFC 9112 §4 allows (``HTTP/1.1 499 ``)."""
    return REASON_PHRASES.get(status, b"")


class LimitedChannel(http.HTTPChannel):
    """An HTTPChannel with deadlines for the request head and body, the
    idle timeout audited, answers to pipelined requests paced by the client
    reading them, and RFC 9110 reason phrases.

    Class attributes are set per site by :func:`channel_factory`.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    metrics: Any = None  # estgw.metrics.Metrics
    _log = Logger()

    # After a refusal or the idle timeout closes the connection: how long
    # the client has to read the rest of what it was sent (a TLS close
    # waits for the client's close_notify, which a client that does not
    # read never sends), then it is cut off.
    refusal_abort_seconds = 5
    abortTimeout = refusal_abort_seconds  # twisted.web's grace after its idle timeout

    def refused(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.refusal(code)

    _deadline: Any = None

    def dataReceived(self, data: bytes) -> None:
        if (data or self._buffer) and self.line_mode and not self._handlingRequest and not self.paused \
                and self._deadline is None:
            # The first byte of a request head starts its clock (or, after a
            # pause, the first moment its bytes are parsed again).
            self._deadline = self.callLater(self.header_timeout, lambda: self._too_slow("header-timeout"))
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def pauseProducing(self) -> None:
        """The transport holds more unsent bytes than it takes at once (its
        buffer, 64 KiB): the client is not reading, or not as fast as it
        asks.  Read nothing more from it and answer none of the pipelined
        requests already read until it has taken them
        (:meth:`resumeProducing`).

        twisted.web stops reading only between requests and goes on
        answering the requests it has already read, so a client that
        pipelines thousands of requests and never reads would grow the
        unsent answers without bound.  Here one connection holds at most
        the transport's buffer (twice over TLS, whose small writes are
        gathered first) plus one answer, and one read of input (64 KiB).
        """
        super().pauseProducing()
        self.paused = True  # basic.LineReceiver parses nothing more of its buffer
        self._networkProducer.pauseProducing()  # also while a request is being answered
        if self.line_mode and not self._handlingRequest:
            # A head waiting here is waiting for the client, not the other
            # way round: its deadline starts again when it is parsed.
            self._cancel_deadline()

    def resumeProducing(self) -> None:
        """The transport sent everything it held: the client is reading.
        Read again and answer the requests read meanwhile, in order."""
        self.paused = False
        super().resumeProducing()
        self.resetTimeout()  # it took what it was sent: not idle
        if not self._handlingRequest and self.transport is not None:
            self.dataReceived(b"")

    #: Requests answered on this connection (counted once written).
    _answered = 0

    def requestDone(self, request: Any) -> None:
        self._answered += 1
        super().requestDone(request)

    def loseConnection(self) -> None:
        """Close after what was written (``Connection: close``, HTTP/1.0,
        a refusal).  Over TLS the close waits for the client's close_notify,
        which a client may never send: it is cut off after
        ``server.idleTimeout`` seconds (at least :attr:`refusal_abort_seconds`)
        instead of holding its connection slot for ever."""
        if self._abortingCall is None and self.transport is not None:
            grace = max(self._savedTimeOut or self.timeOut or 0, self.refusal_abort_seconds)
            self._abortingCall = self.callLater(grace, self.forceAbortClient)
        super().loseConnection()

    def _between_requests(self) -> bool:
        """Every request read was answered and the answers taken, and no
        byte of a next request has come: a kept-alive connection at rest."""
        return bool(
            self.line_mode and not self._handlingRequest and not self.requests
            and not self._buffer and not self._dataBuffer and self._receivedHeaderSize == 0
            and not self._waitingForTransport
        )

    def timeoutConnection(self) -> None:
        """``server.idleTimeout`` seconds without a byte from the client,
        or without it taking any of the answers it was sent (a write that
        does not progress is no activity): close.  A client that had its
        requests answered and then simply left its kept-alive connection
        at rest did nothing wrong: a debug line only.  Anything else (no
        complete request ever, a request half-sent, answers left unread)
        is a refusal: one audit line, counted.  A connection whose answers
        wait unsent is aborted at once, since an orderly close would wait
        for the client to read them."""
        stalled = self._waitingForTransport
        if self._answered and self._between_requests():
            self._log.debug(
                "closed the connection from {client}, idle for {seconds:g} seconds after {count} answered requests",
                client=client_host(self.getPeer()), seconds=self.timeOut, count=self._answered,
            )
        else:
            if stalled:
                reason = f"the client read none of its responses for {self.timeOut:g} seconds"
            elif self._answered:
                reason = f"the connection was idle for {self.timeOut:g} seconds with a request half-sent"
            else:
                # The TLS handshake (and a PROXY header) may have trickled
                # in meanwhile: what is certain is that no request came.
                reason = f"no request was received within {self.timeOut:g} seconds"
            self.refused("idle-timeout")
            _audit.info(
                "{event} connection from {client}: {code}: {reason}",
                event="refused", code="idle-timeout", client=client_host(self.getPeer()), reason=reason,
            )
        self._cancel_deadline()
        if stalled:
            self.forceAbortClient()
        else:
            super().timeoutConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        # RFC 9110's phrase, whatever twisted.web's table has.
        super().writeHeaders(version, code, reason_phrase(int(code)), headers)

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
        self.reject(400, "line-too-long", f"a request or header line is longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web answers a bare 400 for every malformed head; say why,
        # and 431 (RFC 6585 §5) where it is our header limits.
        if self._receivedHeaderSize > self.totalHeadersSize:
            self.reject(431, "header-too-large", f"the request head exceeds {self.totalHeadersSize} bytes")
        elif self._receivedHeaderCount > self.maxHeaders:
            self.reject(431, "too-many-headers", f"the request has more than {self.maxHeaders} header fields")
        else:
            self.reject(400, "bad-request-head", "the request line or a header field is malformed")

    def reject(self, status: int, code: str, reason: str) -> None:
        """Refuse what the client sent outside any request: counted, one
        audit line, then :meth:`close_with`."""
        self.refused(code)
        _audit.info(
            "{event} connection from {client}: {status} {code}: {reason}",
            event="refused", code=code, client=client_host(self.getPeer()), status=status, reason=reason,
        )
        self.close_with(status, reason)

    # -- framing (RFC 9112) that twisted.web lets through ------------------

    def lineReceived(self, line: bytes) -> None:
        if line[:1] in (b" ", b"\t"):
            # RFC 9112 §5.2: obs-fold (a field line continued on the next
            # line) is obsolete; twisted.web would join it to the field
            # above.  A proxy in front may read it otherwise: refuse.
            # (Whitespace before the request line or the first field,
            # §2.2, is refused the same way.)
            self.reject(
                400, "bad-request-head",
                "a header field line starts with whitespace (obsolete line folding, RFC 9112 §5.2)",
            )
            return
        super().lineReceived(line)

    #: Fields estgw reads as one value: a request with two of them is
    #: ambiguous (which one did a proxy in front act on?), so it is
    #: refused (RFC 9112 §3.2 for Host, RFC 9110 §5.3).  Content-Length
    #: and Transfer-Encoding twisted.web refuses itself, Authorization
    #: estgw.httpauth.
    SINGLE_FIELDS = (b"host", b"content-type")

    def headerReceived(self, line: bytes) -> bool:
        name = line.split(b":", 1)[0].lower()
        if name in self.SINGLE_FIELDS and self.requests and self.requests[-1].requestHeaders.hasHeader(name):
            field = "Host" if name == b"host" else "Content-Type"
            self.reject(400, "bad-request-head", f"the request has more than one {field} header field (RFC 9112 §3.2)")
            return False
        ok: bool = super().headerReceived(line)
        if ok and name == b"host" and not _HOST.fullmatch(self.requests[-1].requestHeaders.getRawHeaders(b"host")[-1]):
            self.reject(400, "bad-request-head", "the Host header field is not a host name or address with an optional port (RFC 9112 §3.2)")
            return False
        return ok

    def allHeadersReceived(self) -> None:
        request = self.requests[-1] if self.requests else None
        if request is not None and self._version == b"HTTP/1.1" and not request.requestHeaders.hasHeader(b"host"):
            self.reject(400, "bad-request-head", "an HTTP/1.1 request must have a Host header field (RFC 9112 §3.2)")
            return
        self._cancel_deadline()
        super().allHeadersReceived()
        if self.length != 0 and self.transport is not None and not self._handlingRequest:
            self._deadline = self.callLater(self.body_timeout, lambda: self._too_slow("body-timeout"))

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        ok: bool = super()._maybeChooseTransferDecoder(header, data)
        decoder = self._transferDecoder
        limit = getattr(self.requests[-1], "max_body", None) if self.requests else None
        if ok and type(decoder) is http._ChunkedTransferDecoder and limit is not None:
            self._transferDecoder = _BoundedChunkedDecoder(
                decoder.dataCallback, decoder.finishCallback, limit, self.requests[-1], self
            )
        return ok

    def close_with(self, status: int, reason: str) -> None:
        """Answer ``status`` with the one-line ``reason`` outside any
        request, drop further input, and close: cut off after
        :attr:`refusal_abort_seconds` if the client does not close."""
        body = (reason + "\n").encode("utf-8")
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nConnection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\n\r\n" % (status, reason_phrase(status), len(body)) + body
        )
        # Stop reading; close once written, abort if the client does not read.
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        self.lineReceived = lambda line: None  # type: ignore[method-assign]
        # Refused at the end of its head: the request is not served.
        self.allContentReceived = lambda: None  # type: ignore[method-assign]
        self.setTimeout(None)
        self._cancel_deadline()
        self._abortingCall = self.callLater(self.refusal_abort_seconds, self.forceAbortClient)
        self.loseConnection()

    def _too_slow(self, code: str) -> None:
        self._deadline = None
        part = "head" if code == "header-timeout" else "body"
        seconds = self.header_timeout if code == "header-timeout" else self.body_timeout
        peer = self.transport.getPeer() if self.transport is not None else None
        reason = f"the request {part} was not received within {seconds:g} seconds"
        self.refused(code)
        _audit.info(
            "{event} connection from {client}: {status} {code}: {reason}",
            event="refused", code=code, client=client_host(peer), status=408, reason=reason,
        )
        self.close_with(408, reason)


# RFC 9112 §3.2: Host = uri-host [ ":" port ] (RFC 3986 §3.2.2: an
# IP-literal in brackets, or a reg-name, which covers IPv4 addresses);
# empty where the target has no authority.
_HOST = re.compile(rb"(?:\[[A-Za-z0-9._~!$&'()*+,;=:-]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]*)(?::[0-9]*)?")


class _BoundedChunkedDecoder(http._ChunkedTransferDecoder):
    """A chunked request body (RFC 9112 §7.1) refused as soon as its chunk
    sizes announce more than the request's ``max_body`` bytes (413, by
    :meth:`estgw.web.LimitedRequest.too_large`), rather than when that
    much has arrived: a chunk size of ``ffffffffffffffff`` is refused at
    once, not after ``server.bodyTimeout``.  A malformed chunk is 400
    with what is wrong (twisted.web says only that the head is bad)."""

    def __init__(self, data: Any, finish: Any, limit: int, request: Any, channel: "LimitedChannel") -> None:
        super().__init__(data, finish)
        self._limit = limit
        self._request = request
        self._channel = channel
        self._announced = 0

    def dataReceived(self, data: bytes) -> None:
        try:
            super().dataReceived(data)
        except http._MalformedChunkedDataError as e:
            self._discard()
            self._channel.reject(400, "bad-chunked-body", f"the chunked request body is malformed: {e}")

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        self._announced += self.length
        if self._announced > self._limit:
            self._discard()
            self._request.too_large()
            return False
        return True

    def _discard(self) -> None:
        self.state = "DISCARD"
        del self._buffer[:]

    def _dataReceived_DISCARD(self) -> bool:
        del self._buffer[:]
        return False


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


def limit_site(site: Any, config: Any = None, metrics: Any = None) -> Any:
    """Apply the request limits to any twisted.web Site of this package
    (the metrics listener, the approval service): the ``server.*`` values
    of ``config``, or the defaults; what they turn away is counted in
    ``metrics`` (an :class:`estgw.metrics.Metrics`), if given."""
    if config is None:
        from estgw.config import Config

        config = Config(source="", state_directory="")
    site.timeOut = config.idle_timeout
    site.protocol = channel_factory(
        config.header_timeout, config.body_timeout, config.max_headers, config.max_header_bytes, metrics
    )
    return site

