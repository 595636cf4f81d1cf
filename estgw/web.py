"""The EST resource tree: ``/.well-known/est[/<label>]/<operation>``.

One resource renders every operation: it finds the handler, runs it as a
coroutine, and turns the result or a :class:`Refusal` into a response in
one place, always with a Content-Length (HTTP/1.0 clients and devices
that cannot read chunked replies) and a plain-text reason on errors.
"""

from __future__ import annotations

import re
import time
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import Request
from twisted.web.http_headers import Headers
from urllib.parse import unquote_to_bytes as unquote  # what twisted.web.http uses

from estgw import audit, csrattrs, guard, limits, protocol
from estgw.config import OPERATIONS
from estgw.enroll import Gateway, enroll
from estgw.escape import printable
from estgw.plaintext import Branch, respond, text
from estgw.refusal import Refusal
from estgw.serverkeygen import serverkeygen
from estgw.tls import PeerInfo, peer_info

_audit = Logger(namespace="estgw.audit")

#: The status counted in the metrics for a request whose client closed the
#: connection before the response was written (nginx's convention).
CLIENT_CLOSED = 499

_METHODS = {
    "cacerts": b"GET",
    "csrattrs": b"GET",
    "simpleenroll": b"POST",
    "simplereenroll": b"POST",
    "serverkeygen": b"POST",
    "fullcmc": b"POST",
}


class LimitedRequest(server.Request):
    """A request that keeps at most ``max_body`` bytes of its body.

    Past the limit the rest is read and dropped, and the handler answers
    413, so a large upload cannot grow the process.
    """

    max_body = 65536
    body_too_large = False
    _log = Logger()

    def process(self) -> None:
        self.path = origin_path(self.path, self.requestHeaders)
        if self.path == b"*" and self.method != b"OPTIONS":
            # twisted.web's answer has no reason (RFC 9110 §7.1: "*" is
            # OPTIONS' own target, asking about the server as a whole).
            self.site = self.channel.site  # type: ignore[attr-defined]  # set by twisted.web.server.Site
            self.setHeader(b"Date", http.datetimeToString())
            text(self, 405, "the request-target * is for OPTIONS only", {"Allow": "OPTIONS"})
            return
        super().process()

    def processingFailed(self, reason: Failure) -> Failure:
        """A resource raised while it was looked up or rendered: a bug,
        logged; a plain-text 500, never twisted.web's HTML page."""
        self._log.failure("while serving {method} {path}", reason,
                          method=printable(self.method), path=printable(self.path))
        if self.startedWriting:
            # Too late for a status: a truncated answer must not look whole.
            if self.channel is not None:
                self.channel.loseConnection()
        else:
            text(self, 500, "internal error")
        return reason

    def gotLength(self, length: int | None) -> None:
        # Always in memory, as the body is at most max_body bytes
        # (server.maxRequestBytes, 1 MiB at most): twisted.web puts a
        # chunked body, or one over 100000 bytes, into a temporary file, a
        # descriptor and disk writes per connection the caps do not count.
        self.content = BytesIO()
        if length is not None and length > self.max_body:
            self.too_large()

    def handleContentChunk(self, data: bytes) -> None:
        if self.body_too_large:
            return
        assert self.content is not None  # set by gotLength
        if self.content.tell() + len(data) > self.max_body:
            self.content.seek(0)
            self.content.truncate()
            self.too_large()
            return
        super().handleContentChunk(data)

    def too_large(self) -> None:
        """Answer 413 at once and close the connection: a body past the
        limit (by Content-Length, by the chunk sizes announced, or as it
        arrives) is not read to its end, so a client streaming a chunked
        body without end cannot hold a connection open with it."""
        self.body_too_large = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:
            return
        reason = f"the request body exceeds {self.max_body} bytes"
        address = transport.getPeer()
        _audit.info(
            "{event} {method} {path} from {client}: {status} {code}: {reason}",
            method=printable(self.method), path=printable(self.uri), client=getattr(address, "host", "?"),
            status=413, code="body-too-large", reason=reason, event="refused",
        )
        close_with = getattr(self.channel, "close_with", None)
        if close_with is not None:  # estgw.limits.LimitedChannel: one way to close
            close_with(413, reason)
            return
        body = (reason + "\n").encode("ascii")
        transport.write(
            b"HTTP/1.1 413 %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % (limits.reason_phrase(413), len(body)) + body
        )
        transport.loseConnection()


_ABSOLUTE_FORM = re.compile(rb"^(?i:https?)://([^/?#]*)(.*)$", re.DOTALL)


def origin_path(target: bytes, headers: Headers | None = None) -> bytes:
    """The path a request is routed on, from its request-target (no query).

    - absolute-form (``https://host:port/p``, RFC 9112 §3.2.2) is accepted
      and routed on its path; its authority replaces the Host header, as
      a server MUST do;
    - empty segments are dropped (``//.well-known/est//cacerts`` is
      ``/.well-known/est/cacerts``), everywhere in the path, so one
      resource has one spelling however a client joins its URL parts;
    - dot-segments, also percent-encoded, are resolved as RFC 3986 §5.2.4
      says (never above the root).

    Segments stay percent-encoded: twisted.web decodes each one after
    splitting, so ``%2F`` inside a segment never becomes a separator.
    """
    match = _ABSOLUTE_FORM.match(target)
    if match is not None:
        authority, target = match.group(1), match.group(2) or b"/"
        if headers is not None and authority:
            headers.setRawHeaders(b"host", [authority.rpartition(b"@")[2]])
    if target == b"*" or not target.startswith(b"/"):
        return target  # asterisk-form, or nothing routable: left to twisted.web
    segments: list[bytes] = []
    for segment in target.split(b"/"):
        decoded = unquote(segment)
        if decoded in (b"", b"."):
            continue
        if decoded == b"..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return b"/" + b"/".join(segments)


def request_factory(max_body: int) -> type[LimitedRequest]:
    return type("LimitedRequest", (LimitedRequest,), {"max_body": max_body})


def _refuse(request: Request, refusal: Refusal, peer: PeerInfo | None) -> None:
    # A reason may quote what the client sent: one line in the log and the body.
    reason = printable(refusal.reason)
    request.audited = True  # type: ignore[attr-defined]
    noted = audit.noted(request)
    if "requester" not in noted and peer is not None and peer.certificate is not None:
        noted["requester"] = "cert:" + peer.certificate.subject.rfc4514_string()
    _audit.info(
        "{event} {method} {path} from {client}: {status} {code}: {reason}{who}",
        method=printable(request.method),
        path=printable(request.path),
        client=_client_name(request, peer),
        status=refusal.status,
        code=refusal.code,
        reason=reason,
        event=refusal.event,
        # Client-chosen text (a device id tried, a CSR subject), escaped for
        # the human log; the audit file's JSON escapes the fields themselves.
        who="".join(f" {key} '{printable(value)}'" for key, value in sorted(noted.items()) if key != "handler"),
        **noted,
    )
    if is_bare_challenge(request, refusal):
        return respond(request, refusal.status, b"", None, refusal.headers)
    text(request, refusal.status, reason, refusal.headers)


def is_bare_challenge(request: Request, refusal: Refusal) -> bool:
    """A 401 challenge to a request that sent no credentials goes out with
    an empty body (Content-Length: 0); the reason is in the audit log.

    Such a 401 is the first step of HTTP authentication, not an error, and
    some EST clients (Java ones among them) close the response without
    reading a body and then fail on the unread bytes.  A 401 to refused
    credentials keeps its one-line reason (RFC 9110 §15.5.2).
    """
    return refusal.status == 401 and not request.getHeader(b"authorization")


def _client_name(request: Request, peer: PeerInfo | None) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", "?")
    if peer is not None and peer.certificate is not None:
        return f"{host} ({printable(peer.certificate.subject.rfc4514_string())})"
    return str(host)


class ESTResource(resource.Resource):
    """Serves every EST path below ``/.well-known/est/``."""

    isLeaf = True
    _log = Logger()

    def __init__(self, gateway: Gateway) -> None:
        super().__init__()
        self._gateway = gateway
        labels = {h.label for h in gateway.config.handlers}
        self._labels = labels | {""}

    def render(self, request: Request) -> Any:
        started = time.monotonic()
        # Fires once the response is written, or with ConnectionLost when
        # the client closes first; either way the request is counted (the
        # latter as CLIENT_CLOSED) and the failure is consumed here.  The
        # work itself goes on: a certificate being issued is recorded, so
        # the device can fetch it again.
        request.notifyFinish().addBoth(self._finished, request, started)
        d = defer.Deferred.fromCoroutine(self._serve(request))

        def failed(failure: Failure) -> None:
            # A bug, never bad input: bad input is a Refusal.
            self._log.failure("while serving {path}", failure, path=printable(request.path))
            text(request, 500, "internal error")

        d.addErrback(failed)
        return server.NOT_DONE_YET

    def _finished(self, result: Any, request: Request, started: float) -> None:
        status = request.code
        if isinstance(result, Failure):
            status = CLIENT_CLOSED
            _audit.info(
                "{event} {method} {path} from {client}: the client closed the connection before the response",
                method=printable(request.method),
                path=printable(request.path),
                client=_client_name(request, None),
                event="client-closed",
            )
        self._gateway.metrics.response(self._operation_name(request), status, time.monotonic() - started)

    @staticmethod
    def _operation_name(request: Request) -> str:
        segments = [s for s in request.postpath or [] if s]
        name = segments[-1].decode("ascii", "replace") if segments else ""
        return name if name in OPERATIONS else "other"

    def _route(self, request: Request) -> tuple[str, str]:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or [] if s]
        if len(segments) == 1:
            label, operation = "", segments[0]
        elif len(segments) == 2:
            label, operation = segments
        else:
            raise Refusal(404, "not-found", "no such EST resource")
        if label not in self._labels:
            raise Refusal(404, "unknown-label", f"no CA label {label!r} here")
        if operation not in OPERATIONS:
            raise Refusal(404, "unknown-operation", f"no EST operation {operation!r}")
        allowed = _METHODS[operation]
        methods = (allowed, b"HEAD") if allowed == b"GET" else (allowed,)
        if request.method not in methods:
            raise Refusal(
                405, "method-not-allowed",
                f"{operation} takes {allowed.decode()}", {"Allow": b", ".join(methods).decode()},
            )
        return label, operation

    async def _serve(self, request: Request) -> None:
        peer: PeerInfo | None = None
        try:
            label, operation = self._route(request)
            peer = peer_info(request)
            await self._operation(request, label, operation, peer)
        except Exception as error:
            # Faults of the CA or the store: 503 and a reason; anything
            # else is a bug, answered 500 by render().
            refusal = guard.refusal_for(
                error, self._gateway.metrics, self._log, printable(request.path)
            )
            _refuse(request, refusal, peer)

    async def _operation(self, request: Request, label: str, operation: str, peer: PeerInfo) -> None:
        if operation == "fullcmc":
            raise Refusal(501, "not-implemented", f"{operation} is not offered by this gateway")
        handler = self._gateway.config.handler(label, operation)
        audit.note(request, handler=handler.id if handler is not None else None)
        if handler is None:
            raise Refusal(404, "operation-not-configured", f"{operation} is not served here")
        if getattr(request, "body_too_large", False):
            raise Refusal(
                413, "body-too-large",
                f"the request body exceeds {self._gateway.config.max_request_bytes} bytes",
            )
        if operation in ("cacerts", "csrattrs"):
            from estgw.auth import authenticate

            # filter public admits anyone; clientcert asks for a certificate.
            await authenticate(request, handler, peer, self._gateway.portal)
        if operation == "cacerts":
            body = protocol.encode_certs_only(self._gateway.cacerts(label))
            return self._send(request, body, protocol.PKCS7_MIME)
        if operation == "csrattrs":
            attributes = self._csr_attributes(label, handler)
            if not attributes and handler.csr_template is None:
                return respond(request, 204, b"", None)
            body = csrattrs.encode_response(attributes, handler.csr_template)
            return self._send(request, body, protocol.CSRATTRS)
        content_type = request.getHeader(b"content-type")
        body = request.content.read() if request.content is not None else b""
        if operation == "serverkeygen":
            multipart, multipart_type = await serverkeygen(
                self._gateway, handler, request, peer, body,
                content_type.decode("latin-1") if content_type else None,
            )
            self._gateway.metrics.certificate_issued(operation)
            request.audited = True  # type: ignore[attr-defined]
            if not (request.finished or request._disconnected):
                # Each part says its own Content-Transfer-Encoding.
                respond(request, 200, multipart, multipart_type, {"Cache-Control": "no-store"})
            return None
        certificate = await enroll(
            self._gateway, handler, request, peer, body,
            content_type.decode("latin-1") if content_type else None,
        )
        self._gateway.metrics.certificate_issued(operation)
        request.audited = True  # type: ignore[attr-defined]
        self._send(request, protocol.encode_certs_only([certificate]), protocol.CERTS_ONLY)

    def _csr_attributes(self, label: str, handler: Any) -> tuple[protocol.CsrAttr, ...]:
        return csr_attributes(self._gateway, label, handler)

    def _send(self, request: Request, body: bytes, content_type: str) -> None:
        respond(request, 200, body, content_type, {"Content-Transfer-Encoding": "base64"})


def csr_attributes(
    gateway: Gateway, label: str, handler: Any, transport: str = "https"
) -> tuple[protocol.CsrAttr, ...]:
    """What csrattrs announces under ``label`` on ``transport`` (``https``
    or ``coaps``): the configured attributes, plus challengePassword where
    an enrollment handler there wants the channel binding."""
    attributes = tuple(handler.csrattrs)
    wants_binding = any(
        h.channel_binding for h in gateway.config.handlers if h.label == label and transport in h.transports
    )
    challenge = protocol.CSR_ATTRIBUTE_NAMES["challengePassword"]
    if wants_binding and all(a.oid != challenge for a in attributes):
        attributes = (protocol.CsrAttr(challenge),) + attributes
    return attributes


_NOT_EST = "no such resource: EST is served under /.well-known/est/"


class _Site(server.Site):
    """One log line per request: a request whose ``estgw.audit`` line was
    written (an issuance or a refusal) gets no access-log line besides."""

    def log(self, request: http.Request) -> None:
        if not getattr(request, "audited", False):
            super().log(request)


def limited_site(root: resource.Resource, max_body: int, config: Any = None, metrics: Any = None) -> server.Site:
    """A Site for ``root`` with the request limits of every listener here:
    the ``server.*`` limits of ``config`` (estgw.limits: head and body
    deadlines, header count and size, idle timeout), a body over
    ``max_body`` bytes is 413 at once (by Content-Length, or as it
    arrives), no form parsing (see :func:`build_site`), and no traceback
    is shown; what the limits turn away is counted in ``metrics``."""
    site = server.Site(root, parsePOSTFormSubmission=False)
    site.requestFactory = request_factory(max_body)
    site.displayTracebacks = False
    return limits.limit_site(site, config, metrics)


def build_site(gateway: Gateway) -> server.Site:
    root = Branch(_NOT_EST)
    well_known = Branch(_NOT_EST)
    root.putChild(b".well-known", well_known)
    well_known.putChild(b"est", ESTResource(gateway))
    config = gateway.config
    # server.idleTimeout: twisted.web's default is twelve hours.  No form
    # parsing (set on the Site: Request.__init__ overrides a class
    # attribute): EST bodies are never forms, twisted.web's Content-Type
    # parse costs a tenth of an enrollment's reactor time, and it raises
    # out of dataReceived on some values (a dropped connection and a logged
    # traceback instead of an answer).
    site = _Site(root, timeout=config.idle_timeout, parsePOSTFormSubmission=False)
    # Site.protocol is typed as twisted.web's own channel factory; ours is an HTTPChannel too.
    site.protocol = limits.channel_factory(  # type: ignore[method-assign,assignment]
        config.header_timeout, config.body_timeout, config.max_headers, config.max_header_bytes,
        gateway.metrics,
    )
    site.requestFactory = request_factory(gateway.config.max_request_bytes)
    site.displayTracebacks = False
    return site
