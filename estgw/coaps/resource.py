"""The EST-coaps resources (RFC 9148) on top of :mod:`estgw.coaps.dtls`.

``/.well-known/est[/<label>]/<operation>`` with RFC 9148's short names
(``crts``, ``sen``, ``sren``, ``att``, ``skg``/``skc``) and RFC 7030's long
ones.  A request is served by the handler bound to CoAPs for its label
and operation (``handler.<n>.transport = coaps`` or ``both``) through the
same filter, format, token procedure and store as over HTTPS
(:func:`estgw.enroll.enroll`); the DTLS client certificate is the
identity.  Payloads are DER (RFC 9148 §4, no base64).  A
:class:`~estgw.refusal.Refusal` becomes a CoAP error code with the reason
as diagnostic payload (RFC 7252 §5.5.2); a Retry-After becomes Max-Age
with 5.03 (RFC 9148 §4.7).  Responses larger than one block go out
block-wise (Block2), large requests come in block-wise (Block1, RFC 7959).
"""

from __future__ import annotations

import collections
import hashlib
import time
from typing import Any

import attr
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python.failure import Failure

from estgw import csrattrs, guard, protocol
from estgw.coaps import coap
from estgw.coaps.coap import Block, Message
from estgw.coaps.dtls import Session
from estgw.config import OPERATIONS
from estgw.enroll import Gateway, enroll
from estgw.escape import printable
from estgw.refusal import Refusal
from estgw.serverkeygen import PKCS8, serverkeygen_parts

_audit = Logger(namespace="estgw.audit")

# RFC 9148 §5.1 short names, and RFC 7030's long ones.
OPERATION_NAMES = {
    "crts": "cacerts",
    "sen": "simpleenroll",
    "sren": "simplereenroll",
    "att": "csrattrs",
    "skg": "serverkeygen",
    "skc": "serverkeygen",
    **{name: name for name in OPERATIONS},
}
SHORT_NAMES = {"cacerts": "crts", "simpleenroll": "sen", "simplereenroll": "sren", "csrattrs": "att", "serverkeygen": "skg"}
METHODS = {
    "cacerts": coap.GET,
    "csrattrs": coap.GET,
    "simpleenroll": coap.POST,
    "simplereenroll": coap.POST,
    "serverkeygen": coap.POST,
    "fullcmc": coap.POST,
}
# HTTP status of a Refusal -> CoAP response code (RFC 8075 §7 maps them
# the other way; 202 Pending becomes 5.03 + Max-Age, RFC 9148 §4.7).
STATUS_CODES = {
    202: coap.SERVICE_UNAVAILABLE,
    400: coap.BAD_REQUEST,
    401: coap.UNAUTHORIZED,
    403: coap.FORBIDDEN,
    404: coap.NOT_FOUND,
    405: coap.METHOD_NOT_ALLOWED,
    406: coap.NOT_ACCEPTABLE,
    409: coap.CONFLICT,
    413: coap.REQUEST_ENTITY_TOO_LARGE,
    415: coap.UNSUPPORTED_CONTENT_FORMAT,
    500: coap.INTERNAL_SERVER_ERROR,
    501: coap.NOT_IMPLEMENTED,
    503: coap.SERVICE_UNAVAILABLE,
}
# Refusals of the CoAP layer itself with a code of their own.
CODE_OVERRIDES = {
    "bad-option": coap.BAD_OPTION,
    "request-entity-incomplete": coap.REQUEST_ENTITY_INCOMPLETE,
}
DEFAULT_SZX = 6  # 1024-byte blocks: with DTLS and CoAP headers, one 1280-byte datagram
MAX_EXCHANGES = 32  # recent message IDs remembered per session (RFC 7252 §4.5)
MAX_BODIES = 4  # block-wise responses kept per session for their later blocks


def coap_code(refusal: Refusal) -> int:
    """The CoAP response code of ``refusal``."""
    if refusal.code in CODE_OVERRIDES:
        return CODE_OVERRIDES[refusal.code]
    return STATUS_CODES.get(refusal.status, coap.BAD_REQUEST if refusal.status < 500 else coap.INTERNAL_SERVER_ERROR)


@attr.s(frozen=True, auto_attribs=True)
class Reply:
    """A response before block-wise slicing."""

    code: int
    payload: bytes = b""
    content_format: int | None = None
    options: tuple[tuple[int, bytes], ...] = ()


class CoapRequest:
    """What the shared pipeline reads of a request (:mod:`estgw.auth`):
    no HTTP headers exist over CoAP, so no HTTP login either."""

    def __init__(self, session: Session, method: str, path: str) -> None:
        self.method = method.encode("ascii")
        self.uri = path.encode("utf-8")
        self.path = self.uri
        self._address = session.address

    def getHeader(self, name: bytes) -> None:
        return None

    def isSecure(self) -> bool:
        return True  # DTLS: what TLS-only rules (an unencrypted server key) ask

    def getClientAddress(self) -> Any:
        host, port = self._address[0], self._address[1]
        return (IPv6Address if ":" in host else IPv4Address)("UDP", host, port)


class ESTCoapServer:
    """EST-coaps on the sessions of a :class:`~estgw.coaps.dtls.DTLSServer`."""

    _log = Logger()

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._labels = {h.label for h in gateway.config.handlers} | {""}
        self._next_mid = int.from_bytes(hashlib.sha256(str(time.time()).encode()).digest()[:2], "big")

    # -- IDatagramApplication -------------------------------------------------

    def session_closed(self, session: Session) -> None:
        session.state.clear()

    def record_received(self, session: Session, data: bytes) -> None:
        if data and data[0] >> 6 != coap.VERSION:
            return  # RFC 7252 §3: a message of an unknown version is silently ignored
        try:
            message = coap.decode(data)
        except coap.MessageFormatError:
            # RFC 7252 §4.2/§4.3: a message that cannot be parsed is
            # rejected with RST when its Message ID can be read.
            if len(data) >= 4 and (data[0] >> 4) & 3 in (coap.CON, coap.NON):
                session.send(coap.encode(Message(coap.RST, coap.EMPTY, int.from_bytes(data[2:4], "big"))))
            return
        if message.type in (coap.ACK, coap.RST):
            return  # this server sends no confirmable messages
        if message.code == coap.EMPTY:  # a CoAP ping (RFC 7252 §4.3)
            session.send(coap.encode(coap.reset(message)))
            return
        if not message.is_request:
            session.send(coap.encode(coap.reset(message)))
            return
        # Duplicates are detected on the Message ID from this endpoint (one
        # DTLS session), whatever the token (RFC 7252 §4.5).
        exchanges: collections.OrderedDict[Any, Any] = session.state.setdefault("exchanges", collections.OrderedDict())
        if message.message_id in exchanges:
            token, answer = exchanges[message.message_id]
            if token != message.token:
                # Not a copy of the request we served: a reused Message ID.
                # Rejected, never served a second time.
                session.send(coap.encode(coap.reset(message)))
            elif answer is not None:
                # A retransmission: the same answer again (nothing while the
                # first copy is still being served).
                session.send(answer)
            return
        exchanges[message.message_id] = (message.token, None)
        while len(exchanges) > MAX_EXCHANGES:
            exchanges.popitem(last=False)
        screened = coap.screen_options(message)
        message = screened.message
        d = defer.Deferred.fromCoroutine(self._serve(session, message, screened))

        def failed(failure: Failure) -> None:
            # A bug, never bad input: bad input is a Refusal.
            self._log.failure("while serving a CoAP request from {address}", failure, address=session.address)
            self._send(session, message, Reply(coap.INTERNAL_SERVER_ERROR, b"internal error"))

        d.addErrback(failed)

    # -- one request ------------------------------------------------------------

    async def _serve(self, session: Session, message: Message, screened: coap.Screened) -> None:
        path = "/" + "/".join(message.uri_path)
        try:
            if screened.bad_option is not None:
                raise Refusal(400, "bad-option", screened.bad_option)
            if screened.malformed is not None:
                raise Refusal(400, "bad-request", screened.malformed)
            if message.uri_path == (".well-known", "core"):
                return self._send(session, message, self._discovery(message))
            label, operation, name = self._route(message)
            body = self._request_body(session, message, path)
            if body is None:
                return  # 2.31 Continue sent: more Block1 blocks to come
            block2 = self._block2(message)
            if block2 is not None and block2.num > 0:
                cached = session.state.get("bodies", {}).get(path)
                if cached is not None:
                    return self._send(session, message, cached)
            reply = await self._operation(session, message, label, operation, name, path, body)
        except Exception as error:
            # A failed store is 5.03 as over HTTPS; anything else not a
            # Refusal is a bug, answered 5.00 by the caller.
            refusal = guard.refusal_for(error, self._gateway.metrics, self._log, f"CoAP {printable(path)}")
            reply = self._refusal(session, message, path, refusal)
        self._send(session, message, reply)

    def _route(self, message: Message) -> tuple[str, str, str]:
        """(label, operation, the resource name as requested)."""
        segments = message.uri_path
        if segments[:2] != (".well-known", "est"):
            raise Refusal(404, "not-found", "no such resource: EST is served under /.well-known/est/")
        rest = segments[2:]
        if len(rest) == 1:
            label, name = "", rest[0]
        elif len(rest) == 2:
            label, name = rest
        else:
            raise Refusal(404, "not-found", "no such EST resource")
        if label not in self._labels:
            raise Refusal(404, "unknown-label", f"no CA label {label!r} here")
        operation = OPERATION_NAMES.get(name)
        if operation is None:
            raise Refusal(404, "unknown-operation", f"no EST operation {name!r}")
        if message.code != METHODS[operation]:
            method = coap.METHOD_NAMES[METHODS[operation]]
            raise Refusal(405, "method-not-allowed", f"{name} takes {method}")
        return label, operation, name

    def _request_body(self, session: Session, message: Message, path: str) -> bytes | None:
        """The whole request payload, assembled from Block1 blocks
        (RFC 7959 §2.5); None after answering 2.31 Continue."""
        limit = self._gateway.config.max_request_bytes
        announced = message.uint_option(coap.SIZE1)
        if announced is not None and announced > limit:
            # RFC 7959 §4: Size1 announces the whole size; refuse at once.
            session.state.get("uploads", {}).pop(path, None)
            raise Refusal(
                413, "body-too-large", f"the request body of {announced} bytes exceeds {limit} bytes", {"Size1": str(limit)}
            )
        raw = message.option(coap.BLOCK1)
        if raw is None:
            if len(message.payload) > limit:
                raise Refusal(413, "body-too-large", f"the request body exceeds {limit} bytes", {"Size1": str(limit)})
            return message.payload
        try:
            block = Block.decode(raw)
        except coap.MessageFormatError as e:
            raise Refusal(400, "bad-block-option", str(e)) from None
        uploads: dict[str, bytearray] = session.state.setdefault("uploads", {})
        if block.num == 0:
            uploads[path] = bytearray()
        buffer = uploads.get(path)
        if buffer is None or len(buffer) != block.offset:
            uploads.pop(path, None)
            raise Refusal(408, "request-entity-incomplete", "Block1 blocks out of order: send again from block 0")
        if block.more and len(message.payload) != block.size:
            uploads.pop(path, None)
            raise Refusal(400, "bad-block-option", "a Block1 block other than the last must fill the block size")
        if len(buffer) + len(message.payload) > limit:
            uploads.pop(path, None)
            raise Refusal(413, "body-too-large", f"the request body exceeds {limit} bytes", {"Size1": str(limit)})
        buffer += message.payload
        if block.more:
            self._send(session, message, Reply(coap.CONTINUE, options=((coap.BLOCK1, block.encode()),)))
            return None
        del uploads[path]
        session.state["block1"] = {message.message_id: block}
        return bytes(buffer)

    @staticmethod
    def _block2(message: Message) -> Block | None:
        raw = message.option(coap.BLOCK2)
        if raw is None:
            return None
        try:
            return Block.decode(raw)
        except coap.MessageFormatError as e:
            raise Refusal(400, "bad-block-option", str(e)) from None

    def _peer(self, session: Session) -> Any:
        assert session.peer is not None  # records arrive only after the handshake
        return session.peer

    async def _operation(
        self, session: Session, message: Message, label: str, operation: str, name: str, path: str, body: bytes
    ) -> Reply:
        accept = message.uint_option(coap.ACCEPT)
        handler = self._gateway.config.handler(label, operation, "coaps")
        if operation == "fullcmc":
            raise Refusal(501, "not-implemented", f"{operation} is not offered by this gateway")
        if handler is None:
            raise Refusal(404, "operation-not-configured", f"{operation} is not served over CoAPs here")
        peer = self._peer(session)
        request = CoapRequest(session, coap.METHOD_NAMES[message.code], path)
        if operation in ("cacerts", "csrattrs"):
            from estgw.auth import authenticate

            # filter public admits anyone; clientcert asks for a certificate.
            await authenticate(request, handler, peer, self._gateway.portal)
        if operation == "cacerts":
            # The same chain HTTPS serves under this label (its issuing CA,
            # both chains after a rollover).
            chain = self._gateway.cacerts(label)
            if accept == coap.PKIX_CERT and len(chain) == 1:
                return Reply(coap.CONTENT, _der(chain[0]), coap.PKIX_CERT)
            _acceptable(accept, coap.PKCS7_CERTS_ONLY)
            return Reply(coap.CONTENT, _certs_only(chain), coap.PKCS7_CERTS_ONLY)
        if operation == "csrattrs":
            _acceptable(accept, coap.CSRATTRS)
            from estgw.web import csr_attributes

            attributes = csr_attributes(self._gateway, label, handler, "coaps")
            if not attributes and handler.csr_template is None:
                return Reply(coap.CONTENT)  # nothing announced: no payload (HTTP's 204)
            body = csrattrs.encode_response(attributes, handler.csr_template)
            return Reply(coap.CONTENT, protocol.decode_base64_body(body), coap.CSRATTRS)
        content_format = message.uint_option(coap.CONTENT_FORMAT)
        if content_format not in (None, coap.PKCS10):
            raise Refusal(
                415, "unsupported-media-type",
                f"expected Content-Format {coap.PKCS10} (application/pkcs10), got {content_format}",
            )
        if body and body[:1] != b"\x30":
            # RFC 9148 §4: the CSR is DER; PEM and base64 are HTTPS forms.
            raise Refusal(
                400, "bad-csr",
                f"Content-Format {coap.PKCS10} is a DER PKCS#10 request; this payload is not DER"
                " (PEM and base64 are for HTTPS)",
            )
        if operation == "serverkeygen":
            return await self._serverkeygen(request, handler, peer, body, name, accept)
        # simpleenroll / simplereenroll
        if accept not in (None, coap.PKCS7_CERTS_ONLY, coap.PKIX_CERT):
            _acceptable(accept, coap.PKCS7_CERTS_ONLY)
        certificate = await enroll(self._gateway, handler, request, peer, body, protocol.PKCS10)
        self._gateway.metrics.certificate_issued(operation)
        if accept == coap.PKIX_CERT:
            return Reply(coap.CHANGED, _der(certificate), coap.PKIX_CERT)
        return Reply(coap.CHANGED, _certs_only([certificate]), coap.PKCS7_CERTS_ONLY)

    async def _serverkeygen(
        self, request: CoapRequest, handler: Any, peer: Any, body: bytes, name: str, accept: int | None
    ) -> Reply:
        """skg / skc (RFC 9148 §4.8): the private key (284 application/pkcs8,
        or 280 when encrypted to the client) and the certificate (skg: 281
        PKCS#7 certs-only, skc: 287 application/pkix-cert) in one
        multipart-core (62) payload, DER throughout."""
        _acceptable(accept, coap.MULTIPART_CORE)
        (media_type, key), certificate = await serverkeygen_parts(
            self._gateway, handler, request, peer, body, protocol.PKCS10
        )
        self._gateway.metrics.certificate_issued("serverkeygen")
        key_format = coap.PKCS8 if media_type == PKCS8 else coap.PKCS7_SERVER_GENERATED_KEY
        if name == "skc":
            cert_part = (coap.PKIX_CERT, _der(certificate))
        else:
            cert_part = (coap.PKCS7_CERTS_ONLY, _certs_only([certificate]))
        return Reply(coap.CHANGED, coap.multipart_core([(key_format, key), cert_part]), coap.MULTIPART_CORE)

    def _discovery(self, message: Message) -> Reply:
        """/.well-known/core (RFC 6690) listing what is served over CoAPs,
        with RFC 9148 §5.1's resource types."""
        if message.code != coap.GET:
            raise Refusal(405, "method-not-allowed", "core takes GET")
        links = []
        for handler in self._gateway.config.handlers:
            if "coaps" not in handler.transports or handler.operation not in SHORT_NAMES:
                continue
            label = f"{handler.label}/" if handler.label else ""
            shorts = ("skg", "skc") if handler.operation == "serverkeygen" else (SHORT_NAMES[handler.operation],)
            for short in shorts:
                links.append(f'</.well-known/est/{label}{short}>;rt="ace.est.{short}"')
        return Reply(coap.CONTENT, ",".join(links).encode("utf-8"), coap.LINK_FORMAT)

    def _refusal(self, session: Session, message: Message, path: str, refusal: Refusal) -> Reply:
        code_ = coap_code(refusal)
        peer = session.peer
        client = str(session.address[0])
        if peer is not None and peer.certificate is not None:
            client += f" ({printable(peer.certificate.subject.rfc4514_string())})"
        # A reason may quote what the client sent: one line in the log and the payload.
        reason = printable(refusal.reason)
        _audit.info(
            "{event} {method} {path} from {client}: {status} {code}: {reason}",
            method=coap.METHOD_NAMES.get(message.code, coap.code_text(message.code)),
            path=printable(path),
            client=client,
            status=coap.code_text(code_),
            code=refusal.code,
            reason=reason,
            event=refusal.event,
            transport="coaps",
        )
        options: list[tuple[int, bytes]] = []
        retry = refusal.headers.get("Retry-After")
        if retry is not None:
            options.append((coap.MAX_AGE, coap.encode_uint(int(retry))))
        size1 = refusal.headers.get("Size1")
        if size1 is not None:
            options.append((coap.SIZE1, coap.encode_uint(int(size1))))
        return Reply(code_, reason.encode("utf-8"), None, tuple(options))

    # -- sending ------------------------------------------------------------------

    def _send(self, session: Session, message: Message, reply: Reply) -> None:
        """Send ``reply`` to ``message``, Block2-sliced when it is larger
        than one block or the client asked for blocks (RFC 7959 §2.4)."""
        if session.closed:
            return
        options = list(reply.options)
        if reply.content_format is not None:
            options.append((coap.CONTENT_FORMAT, coap.encode_uint(reply.content_format)))
        payload = reply.payload
        requested = None
        try:
            requested = self._block2(message)
        except Refusal:
            pass
        szx = min(DEFAULT_SZX, requested.szx) if requested is not None else DEFAULT_SZX
        size = 1 << (szx + 4)
        if len(payload) > size or (requested is not None and requested.num > 0):
            path = "/" + "/".join(message.uri_path)
            bodies: dict[str, Reply] = session.state.setdefault("bodies", {})
            num = requested.num * (requested.size // size) if requested is not None else 0
            try:
                payload, block = coap.block_of(reply.payload, num, szx)
            except IndexError:
                reply, options = Reply(coap.BAD_OPTION, b"no such block: past the end of the response"), []
                payload, block = reply.payload, None
            if block is not None:
                options.append((coap.BLOCK2, block.encode()))
                options.append((coap.ETAG, hashlib.sha256(reply.payload).digest()[:8]))
                if num == 0:
                    options.append((coap.SIZE2, coap.encode_uint(len(reply.payload))))
                if block.more:
                    bodies[path] = reply
                    while len(bodies) > MAX_BODIES:
                        bodies.pop(next(iter(bodies)))
                else:
                    bodies.pop(path, None)
        block1 = session.state.get("block1", {}).pop(message.message_id, None)
        if block1 is not None:
            options.append((coap.BLOCK1, block1.encode()))
        if message.type == coap.CON:
            out = Message(coap.ACK, reply.code, message.message_id, message.token, tuple(options), payload)
        else:
            self._next_mid = (self._next_mid + 1) & 0xFFFF
            out = Message(coap.NON, reply.code, self._next_mid, message.token, tuple(options), payload)
        data = coap.encode(out)
        exchanges = session.state.get("exchanges")
        if exchanges is not None and exchanges.get(message.message_id, (None,))[0] == message.token:
            exchanges[message.message_id] = (message.token, data)
        session.send(data)


def _acceptable(accept: int | None, offered: int) -> None:
    if accept is not None and accept != offered:
        raise Refusal(406, "not-acceptable", f"this resource is served as Content-Format {offered}, not {accept}")


def _der(certificate: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return certificate.public_bytes(Encoding.DER)


def _certs_only(certificates: Any) -> bytes:
    """DER PKCS#7 certs-only: the HTTPS encoder's bytes, without base64."""
    return protocol.decode_base64_body(protocol.encode_certs_only(list(certificates)))


def listen_coaps(reactor: Any, gateway: Gateway, context: Any, port: int, interface: str = "") -> Any:
    """Listen for EST-coaps on UDP ``port`` (``reactor.listenUDP``); the
    listening port, whose ``protocol`` is the :class:`DTLSServer`."""
    from estgw.coaps.dtls import DTLSServer

    server = DTLSServer(context, ESTCoapServer(gateway), reactor)
    return reactor.listenUDP(port, server, interface=interface)
