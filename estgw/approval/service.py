"""The reference approval service: ``twistd estgw-approval``.

HTTPS only, and every client presents a certificate: gateways (chaining
to a gateway trust anchor) submit requests and read their status;
operators (chaining to an operator trust anchor) list requests and
approve or reject them.  Requests are kept in SQLite (through adbapi, off
the reactor thread) and deduplicated by the gateway's request id, so a
gateway that submits again after a timeout never creates a second one.
The HTTP + JSON contract is ``docs/approval-api.rst``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.enterprise import adbapi
from twisted.internet import defer, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import wrapServerTLS
from twisted.internet.ssl import TLSVersion
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.server import Request

from estgw import limits
from estgw.approval import pki
from estgw.approval.config import REQUEST_PATH, ServiceConfig
from estgw.ca import CAError
from estgw import policy
from estgw.config import ConfigError
from estgw.daemon import listen_all
from estgw.escape import printable
from estgw.plaintext import Branch, allow, spoken
from estgw.store.sqlite import enable_wal
from estgw.refusal import Refusal
from estgw.store import general_name_text

__all__ = [
    "Caller",
    "ServiceRequest",
    "ServiceStore",
    "RequestsResource",
    "Roles",
    "ApprovalService",
    "build_site",
]

MAX_BODY = 256 * 1024  # a CSR is a few KiB
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._~-]{8,128}\Z")
_REASON_LIMIT = 1000


def _now(clock: Any) -> datetime:
    return datetime.fromtimestamp(clock.seconds(), timezone.utc)


def _time_text(when: datetime) -> str:
    return when.astimezone(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse_time(text: str) -> datetime:
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.utcoffset() is None:
        raise ValueError(f"a time zone is required: {text!r}")
    return parsed.astimezone(timezone.utc)


# -- who is calling ----------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class Caller:
    role: str  # "gateway" | "operator"
    name: str  # the client certificate's subject


@attr.s(frozen=True, auto_attribs=True)
class Roles:
    """Role by trust anchor: the self-signed end of the verified chain."""

    gateway: frozenset[bytes]
    operator: frozenset[bytes]

    @classmethod
    def from_anchors(
        cls, gateway: Sequence[x509.Certificate], operator: Sequence[x509.Certificate]
    ) -> Roles:
        def ders(certs: Sequence[x509.Certificate]) -> frozenset[bytes]:
            return frozenset(c.public_bytes(Encoding.DER) for c in certs)

        return cls(ders(gateway), ders(operator))

    def caller(self, chain: Sequence[x509.Certificate]) -> Caller | None:
        if not chain:
            return None
        anchor = chain[-1].public_bytes(Encoding.DER)
        name = chain[0].subject.rfc4514_string()
        if anchor in self.operator:
            return Caller("operator", name)
        if anchor in self.gateway:
            return Caller("gateway", name)
        return None


def verified_chain(request: Request) -> list[x509.Certificate]:
    """The client's chain as TLS verified it (leaf first), or []."""
    transport = getattr(request.channel, "transport", None)
    handle = transport.getHandle() if transport is not None and hasattr(transport, "getHandle") else None
    if not isinstance(handle, SSL.Connection):
        return []
    return [c.to_cryptography() for c in handle.get_verified_chain() or []]


# Operator decisions, as audit events (estgw.audit).
_audit = Logger(namespace="estgw.audit")


# -- the store ---------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@attr.s(frozen=True, auto_attribs=True)
class ServiceRequest:
    request_id: str
    gateway: str
    handler: str
    subject: str
    sans: tuple[str, ...]
    public_key_sha256: str
    requester: str
    csr: str  # PEM
    status: str
    created_at: datetime
    expires_at: datetime | None = None
    reason: str | None = None
    decided_by: str | None = None
    decided_at: datetime | None = None

    def effective_status(self, now: datetime) -> str:
        if self.status == "pending" and self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return self.status

    def to_json(self, now: datetime, full: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "requestId": self.request_id,
            "status": self.effective_status(now),
            "reason": self.reason,
            "decidedBy": self.decided_by,
            "decidedAt": None if self.decided_at is None else _time_text(self.decided_at),
            "createdAt": _time_text(self.created_at),
            "expiresAt": None if self.expires_at is None else _time_text(self.expires_at),
        }
        if full:
            issued_subject, sans, key = would_issue(x509.load_pem_x509_csr(self.csr.encode("ascii")))
            data.update(
                gateway=self.gateway,
                handler=self.handler,
                subject=self.subject,
                issuedSubject=issued_subject,
                subjectAltNames=list(sans),
                publicKey=key,
                publicKeySha256=self.public_key_sha256,
                requester=self.requester,
                csr=self.csr,
            )
        return data


_COLUMNS = (
    "request_id, gateway, handler, subject, sans, public_key_sha256, requester, csr,"
    " status, created_at, expires_at, reason, decided_by, decided_at"
)


def _optional_time(when: datetime | None) -> str | None:
    return None if when is None else _time_text(when)


def _from_row(row: Sequence[Any]) -> ServiceRequest:
    return ServiceRequest(
        request_id=row[0],
        gateway=row[1],
        handler=row[2],
        subject=row[3],
        sans=tuple(json.loads(row[4])),
        public_key_sha256=row[5],
        requester=row[6],
        csr=row[7],
        status=row[8],
        created_at=_parse_time(row[9]),
        expires_at=None if row[10] is None else _parse_time(row[10]),
        reason=row[11],
        decided_by=row[12],
        decided_at=None if row[13] is None else _parse_time(row[13]),
    )


class ServiceStore:
    """The service's requests in one SQLite file (one pooled connection,
    so every interaction is serialised)."""

    _SCHEMA: ClassVar[str] = """
        CREATE TABLE IF NOT EXISTS requests (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id TEXT NOT NULL UNIQUE,
            gateway TEXT NOT NULL,
            handler TEXT NOT NULL,
            subject TEXT NOT NULL,
            sans TEXT NOT NULL,
            public_key_sha256 TEXT NOT NULL,
            requester TEXT NOT NULL,
            csr TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT,
            reason TEXT,
            decided_by TEXT,
            decided_at TEXT
        )
    """

    def __init__(self, path: str, reactor: Any) -> None:
        self.path = path
        self._reactor = reactor
        self._pool: adbapi.ConnectionPool | None = None

    @staticmethod
    def _open(connection: Any) -> None:
        cursor = connection.cursor()
        enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")  # a decision survives a power cut
        cursor.close()

    async def start(self) -> None:
        self._pool = adbapi.ConnectionPool(
            "sqlite3", self.path, check_same_thread=False, cp_min=1, cp_max=1,
            cp_openfun=self._open, cp_reactor=self._reactor,
        )
        self._pool.start()
        await self._pool.runOperation(self._SCHEMA)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _run(self, interaction: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if self._pool is None:
            return defer.fail(RuntimeError("the store is not started"))
        return self._pool.runInteraction(interaction, *args)

    @staticmethod
    def _select(txn: Any, request_id: str) -> ServiceRequest | None:
        txn.execute(f"SELECT {_COLUMNS} FROM requests WHERE request_id = ?", (request_id,))
        row = txn.fetchone()
        return None if row is None else _from_row(row)

    def submit(self, new: ServiceRequest) -> Deferred[tuple[ServiceRequest, bool]]:
        """Record ``new``, or return the request with its id: (request, created)."""

        def interaction(txn: Any) -> tuple[ServiceRequest, bool]:
            existing = self._select(txn, new.request_id)
            if existing is not None:
                if existing.csr.strip() != new.csr.strip() or existing.gateway != new.gateway:
                    raise ApiError(409, f"request {new.request_id} exists with other contents")
                return existing, False
            txn.execute(
                f"INSERT INTO requests ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    new.request_id, new.gateway, new.handler, new.subject, json.dumps(list(new.sans)),
                    new.public_key_sha256, new.requester, new.csr, new.status,
                    _time_text(new.created_at), _optional_time(new.expires_at), new.reason,
                    new.decided_by, _optional_time(new.decided_at),
                ),
            )
            return new, True

        return self._run(interaction)

    def get(self, request_id: str) -> Deferred[ServiceRequest | None]:
        return self._run(self._select, request_id)

    def list(self) -> Deferred[list[ServiceRequest]]:
        def interaction(txn: Any) -> list[ServiceRequest]:
            txn.execute(f"SELECT {_COLUMNS} FROM requests ORDER BY seq")
            return [_from_row(row) for row in txn.fetchall()]

        return self._run(interaction)

    def decide(
        self, request_id: str, status: str, reason: str | None, operator: str, now: datetime
    ) -> Deferred[ServiceRequest]:
        """pending -> approved | rejected; ApiError 404 / 409 otherwise."""

        def interaction(txn: Any) -> ServiceRequest:
            existing = self._select(txn, request_id)
            if existing is None:
                raise ApiError(404, f"no request {request_id}")
            current = existing.effective_status(now)
            if current != "pending":
                raise ApiError(409, f"request {request_id} is already {current}")
            txn.execute(
                "UPDATE requests SET status = ?, reason = ?, decided_by = ?, decided_at = ?"
                " WHERE request_id = ? AND status = 'pending'",
                (status, reason, operator, _time_text(now), request_id),
            )
            decided = self._select(txn, request_id)
            assert decided is not None
            return decided

        return self._run(interaction)


# -- the HTTP resource --------------------------------------------------------


def _send_json(request: Request, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
    data = json.dumps(body, indent=1).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Content-Length", str(len(data)).encode("ascii"))
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("ascii"), value.encode("utf-8"))
    request.write(data)
    request.finish()


def _read_json(request: Request) -> Any:
    if getattr(request, "body_too_large", False):  # estgw.web.LimitedRequest: 413 was answered
        raise ApiError(413, f"the body exceeds {MAX_BODY} bytes")
    data = request.content.read(MAX_BODY + 1) if request.content is not None else b""
    if len(data) > MAX_BODY:
        raise ApiError(413, f"the body exceeds {MAX_BODY} bytes")
    if not data.strip():
        return {}
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the body is not JSON") from None


def _string(data: dict[str, Any], name: str, required: bool = True) -> str:
    value = data.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError(400, f"{name}: a non-empty string is required")
    return value


def would_issue(csr: x509.CertificateSigningRequest) -> tuple[str, tuple[str, ...], str]:
    """What the gateway would certify for ``csr``: the subject and every
    subjectAltName after its SAN/CN copy rules, and the key type and size,
    so an operator approves exactly what will be signed."""
    try:
        subject, names = policy.copied_names(csr)
    except Refusal:  # the gateway refuses such a CSR before submitting it
        subject, names = csr.subject, tuple(policy.sans_of(csr))
    try:
        key = policy.describe_public_key(csr.public_key())
    except Exception:  # a key type cryptography cannot load
        key = "unsupported"
    return subject.rfc4514_string(), tuple(general_name_text(n) for n in names), key


def _parse_submission(data: Any, gateway: str, now: datetime) -> ServiceRequest:
    """Check a submission against its own CSR; ApiError 400 if it does not fit."""
    if not isinstance(data, dict):
        raise ApiError(400, "a JSON object is required")
    request_id = _string(data, "requestId")
    if not _REQUEST_ID.match(request_id):
        raise ApiError(400, "requestId: 8 to 128 of A-Z a-z 0-9 . _ ~ -")
    try:
        csr = x509.load_pem_x509_csr(_string(data, "csr").encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise ApiError(400, "csr: not a PEM certification request") from None
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    if _string(data, "publicKeySha256").lower() != hashlib.sha256(spki).hexdigest():
        raise ApiError(400, "publicKeySha256 does not match the CSR's public key")
    if _string(data, "subject") != csr.subject.rfc4514_string():
        raise ApiError(400, "subject does not match the CSR's subject")
    _subject, sans, _key = would_issue(csr)
    expires = _string(data, "expiresAt", required=False)
    try:
        expires_at = _parse_time(expires) if expires else None
    except ValueError:
        raise ApiError(400, "expiresAt: an ISO 8601 time with a time zone is required") from None
    return ServiceRequest(
        request_id=request_id,
        gateway=gateway,
        handler=_string(data, "handler", required=False),
        subject=csr.subject.rfc4514_string(),
        sans=sans,
        public_key_sha256=hashlib.sha256(spki).hexdigest(),
        requester=_string(data, "requester", required=False),
        csr=csr.public_bytes(Encoding.PEM).decode("ascii"),
        status="pending",
        created_at=now,
        expires_at=expires_at,
    )


_LIST_FILTERS = ("pending", "approved", "rejected", "expired", "all")


def _methods(segments: list[str]) -> tuple[bytes, ...] | None:
    """What the resource below ``/approval/requests`` at ``segments`` takes
    (HEAD wherever GET), or None: there is none."""
    if not segments:
        return (b"GET", b"HEAD", b"POST")  # list, submit
    if len(segments) == 1:
        return (b"GET", b"HEAD")  # status
    if len(segments) == 2 and segments[1] in ("approve", "reject"):
        return (b"POST",)
    return None


class RequestsResource(resource.Resource):
    """``/approval/requests[/<id>[/approve|/reject]]`` (docs/approval-api.rst)."""

    isLeaf = True
    _log = Logger()

    def __init__(self, store: ServiceStore, identify: Callable[[Request], Caller | None], clock: Any) -> None:
        super().__init__()
        self._store = store
        self._identify = identify
        self._clock = clock

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self._serve(request))

        def failed(failure: Failure) -> None:
            self._log.failure("while serving {path}", failure, path=printable(request.path))
            if not request.finished and not request._disconnected:
                _send_json(request, 500, {"error": "internal error"})

        d.addErrback(failed)
        return server.NOT_DONE_YET

    async def _serve(self, request: Request) -> None:
        headers: dict[str, str] = {}
        try:
            segments = [s.decode("utf-8", "replace") for s in request.postpath or [] if s]
            # What is there, and what it takes, before who asks: the same for everyone.
            methods = _methods(segments)
            if methods is None:
                raise ApiError(404, "no such resource")
            if request.method not in methods:
                raise ApiError(405, f"{printable(request.path.decode('latin-1'))} takes {spoken(methods)}",
                               allow(methods))
            caller = self._identify(request)
            if caller is None:
                raise ApiError(403, "a gateway or operator client certificate is required")
            status, body = await self._route(request, segments, caller, headers)
        except ApiError as e:
            status, body = e.status, {"error": e.message}
            headers.update(e.headers)
        if not request.finished and not request._disconnected:
            _send_json(request, status, body, headers)

    async def _route(
        self, request: Request, segments: list[str], caller: Caller, headers: dict[str, str]
    ) -> tuple[int, Any]:
        """``segments`` names a resource that takes ``request.method`` (:func:`_methods`)."""
        if not segments:
            if request.method == b"POST":
                return await self._submit(request, self._require(caller, "gateway"), headers)
            return await self._list(request, self._require(caller, "operator"))
        if len(segments) == 1:
            return await self._status(segments[0], caller)
        return await self._decide(request, self._require(caller, "operator"), segments[0], segments[1])

    @staticmethod
    def _require(caller: Caller, role: str) -> Caller:
        if caller.role != role:
            raise ApiError(403, f"this needs a {role} certificate; {caller.name} is a {caller.role}")
        return caller

    async def _submit(self, request: Request, caller: Caller, headers: dict[str, str]) -> tuple[int, Any]:
        now = _now(self._clock)
        new = _parse_submission(_read_json(request), caller.name, now)
        record, created = await self._store.submit(new)
        headers["Location"] = f"{REQUEST_PATH}/{record.request_id}"
        if created:
            self._log.info(
                "request {request_id} for {subject} submitted by {gateway} for {requester}",
                request_id=printable(record.request_id), subject=printable(record.subject),
                gateway=printable(caller.name), requester=printable(record.requester),
            )
        return (201 if created else 200), record.to_json(now)

    async def _status(self, request_id: str, caller: Caller) -> tuple[int, Any]:
        record = await self._store.get(request_id)
        # A gateway sees only what it submitted; others' ids are unknown to it.
        if record is None or (caller.role == "gateway" and record.gateway != caller.name):
            raise ApiError(404, f"no request {request_id}")
        now = _now(self._clock)
        return 200, record.to_json(now, full=caller.role == "operator")

    async def _list(self, request: Request, caller: Caller) -> tuple[int, Any]:
        args: dict[bytes, list[bytes]] = request.args or {}
        wanted = (args.get(b"status") or [b"pending"])[0].decode("utf-8", "replace")
        if wanted not in _LIST_FILTERS:
            raise ApiError(400, f"status: one of {', '.join(_LIST_FILTERS)}")
        now = _now(self._clock)
        records = [
            r for r in await self._store.list() if wanted == "all" or r.effective_status(now) == wanted
        ]
        return 200, {"requests": [r.to_json(now, full=True) for r in records]}

    async def _decide(self, request: Request, caller: Caller, request_id: str, action: str) -> tuple[int, Any]:
        data = _read_json(request)
        if not isinstance(data, dict):
            raise ApiError(400, "a JSON object is required")
        reason: str | None = _string(data, "reason", required=action == "reject").strip() or None
        if reason is not None:
            reason = " ".join(reason.split())[:_REASON_LIMIT]
        status = "approved" if action == "approve" else "rejected"
        now = _now(self._clock)
        record = await self._store.decide(request_id, status, reason, caller.name, now)
        # An operator action: in the audit namespace, with who and what.
        _audit.info(
            "request {request_id} for {subject} {status} by {operator}{because}",
            request_id=printable(request_id), subject=printable(record.subject), status=status,
            operator=printable(caller.name), because=f": {printable(reason)}" if reason else "",
            event="operator", action=f"approval-{action}", target=f"approval request {printable(request_id)}",
        )
        return 200, record.to_json(now, full=True)


def build_site(store: ServiceStore, identify: Callable[[Request], Caller | None], clock: Any) -> server.Site:
    from estgw.web import limited_site

    # Outside the API, plain-text 404s like the gateway's listeners.
    root = Branch(f"no such resource: the approval API is {REQUEST_PATH}")
    approval = Branch(root.reason)
    root.putChild(b"approval", approval)
    approval.putChild(b"requests", RequestsResource(store, identify, clock))
    # The same request limits as the gateway's own listeners (their
    # defaults), no form parsing: decisions are JSON.
    return limited_site(root, MAX_BODY)


# -- the service ----------------------------------------------------------------


def server_context(state: pki.ServicePKI) -> ssl.CertificateOptions:
    """TLS 1.2+, and a client certificate chaining to a gateway or an
    operator trust anchor is required by the handshake itself."""
    return ssl.CertificateOptions(
        privateKey=state.server_key,
        certificate=state.server_certificate,  # type: ignore[arg-type]  # Twisted's hints name only pyOpenSSL's types
        extraCertChain=[state.server_ca.issuing],  # type: ignore[list-item]
        verify=True,
        caCerts=[crypto.X509.from_cryptography(c) for c in state.client_trust],
        requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2,
        enableSessions=False,
    )


class ApprovalService(service.Service):
    """Opens the store, then listens; stops listening, then closes it."""

    _log = Logger()

    def __init__(self, config: ServiceConfig, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        try:
            self.pki = pki.initialize(config)
            pki.ensure_default_operator(config, self.pki)
        except CAError as e:
            raise usage.UsageError(f"{config.source}: state.directory: {e}") from None
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.store = ServiceStore(config.store_path, reactor)
        self.roles = Roles.from_anchors(self.pki.gateway_anchors, self.pki.operator_anchors)
        self.ports: list[Any] = []
        self.ready: Deferred[None] = Deferred()

    def identify(self, request: Request) -> Caller | None:
        return self.roles.caller(verified_chain(request))

    def bind(self) -> None:
        """Bind the port now, before the reactor runs (and before twistd
        daemonizes); accept nothing until the store is open.  StartError
        names the address, the port and the reason."""
        if self.ports:
            return
        # The connection caps of the gateway's listeners, with their defaults.
        counts = limits.ConnectionCounts()
        caps = limits.default_caps()
        self.ports = listen_all(
            self.reactor, self.config.interface, self.config.port,
            build_site(self.store, self.identify, self.reactor),
            lambda endpoint: wrapServerTLS(server_context(self.pki), limits.LimitedEndpoint(endpoint, *caps, counts=counts)),
            what="the approval service",
        )
        for port in self.ports:
            port.stopReading()

    @property
    def port(self) -> Any:
        return self.ports[0] if self.ports else None

    async def _start(self) -> None:
        await self.store.start()
        for port in self.ports:
            port.startReading()
        self._log.info(
            "estgw-approval serving {url} ; gateways trust {ca}",
            url=self.config.url.replace(f":{self.config.port}/", f":{self.port.getHost().port}/"),
            ca=self.pki.server_ca.directory + "/root-ca.pem",
        )

    def startService(self) -> None:
        self.bind()
        super().startService()
        d = Deferred.fromCoroutine(self._start())

        def failed(failure: Failure) -> Failure:
            self._log.failure("estgw-approval could not start", failure)
            return failure

        d.addErrback(failed)
        d.chainDeferred(self.ready)

    async def _stop(self) -> None:
        ports, self.ports = self.ports, []
        for port in ports:
            await defer.maybeDeferred(port.stopListening)
        self.store.close()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())
