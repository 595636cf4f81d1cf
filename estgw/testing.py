"""Helpers for testing estgw and EST clients against it.

A :class:`RunningGateway` is a real gateway on 127.0.0.1 with a fresh
state directory, and :func:`run_process` runs ``curl`` or ``openssl``
without blocking the reactor the gateway runs on.  Device makers can use
the same pieces to test firmware scripts.  Keys made here are test data.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Any, Iterable, Mapping, Sequence

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import defer, protocol
from zope.interface import implementer

from estgw import config as config_module
from estgw.ca import ITokenProcedure

TEST_CONFIG = """\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
tokenprocedure.1.name = Test Procedure
tokenprocedure.1.validity.days = 30
default.tokenprocedure = Test Procedure
handler.1.operation = cacerts
handler.2.operation = simpleenroll
handler.2.authtype = Basic
handler.2.realm = test realm
handler.3.operation = simplereenroll
handler.4.operation = csrattrs
handler.4.csrattrs = ecPublicKey=secp256r1, ecdsa-with-SHA256
handler.5.operation = cacerts
handler.5.label = lab
handler.6.operation = simpleenroll
handler.6.label = lab
handler.6.authtype = Basic
handler.6.realm = test realm
handler.7.operation = csrattrs
handler.7.label = lab
"""


# -- keys, CSRs, files ----------------------------------------------------------


def new_key(kind: str = "ec") -> Any:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind.startswith("rsa"):
        bits = int(kind[3:] or 2048)
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    raise ValueError(kind)


def name(common_name: str | None = None, **attributes: str) -> x509.Name:
    parts = []
    if common_name is not None:
        parts.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    for attribute, value in attributes.items():
        parts.append(x509.NameAttribute(getattr(NameOID, attribute.upper()), value))
    return x509.Name(parts)


def make_csr(
    key: Any,
    subject: x509.Name | str | None,
    sans: Sequence[x509.GeneralName] = (),
    extensions: Iterable[tuple[x509.ExtensionType, bool]] = (),
    attributes: Iterable[tuple[x509.ObjectIdentifier, bytes]] = (),
) -> x509.CertificateSigningRequest:
    if isinstance(subject, str):
        subject = name(subject)
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    for oid, value in attributes:
        builder = builder.add_attribute(oid, value)
    return builder.sign(key, hashes.SHA256())


def csr_pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


# -- processes --------------------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class ProcessResult:
    code: int
    stdout: bytes
    stderr: bytes


class _Collect(protocol.ProcessProtocol):
    def __init__(self, stdin: bytes, done: defer.Deferred[ProcessResult]) -> None:
        self._stdin = stdin
        self._done = done
        self._out: list[bytes] = []
        self._err: list[bytes] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self._out.append(data)

    def errReceived(self, data: bytes) -> None:
        self._err.append(data)

    def processEnded(self, reason: Any) -> None:
        code = getattr(reason.value, "exitCode", None)
        self._done.callback(ProcessResult(code if code is not None else -1, b"".join(self._out), b"".join(self._err)))


def run_process(
    argv: Sequence[str],
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    path: str | None = None,
    reactor: Any = None,
) -> defer.Deferred[ProcessResult]:
    """Run a program without blocking the reactor; fires with ProcessResult."""
    if reactor is None:
        from twisted.internet import reactor
    done: defer.Deferred[ProcessResult] = defer.Deferred()
    environment = dict(os.environ if env is None else env)
    reactor.spawnProcess(_Collect(stdin, done), argv[0], list(argv), env=environment, path=path)
    return done


def _which(program: str) -> str:
    for directory in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep):
        candidate = os.path.join(directory, program)
        if os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(f"{program} is not installed")


@attr.s(frozen=True, auto_attribs=True)
class HTTPResult:
    status: int
    headers: Mapping[str, str]  # lower-case names; the last value wins
    body: bytes
    stderr: bytes = b""

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    # curl -D writes every response (e.g. 100 Continue first): keep the last.
    blocks = [b for b in raw.replace(b"\r\n", b"\n").split(b"\n\n") if b.strip()]
    for line in (blocks[-1] if blocks else b"").split(b"\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return headers


# -- a slow CA ------------------------------------------------------------------------


@implementer(ITokenProcedure)
class HeldTokenProcedure:
    """A token procedure (:class:`estgw.ca.ITokenProcedure`) that holds every
    request until :meth:`release`, then lets ``procedure`` issue: for
    testing what happens while a CA is slow (a client that gives up,
    requests that race).  ``called`` fires with the first request held."""

    def __init__(self, procedure: Any) -> None:
        self.name = procedure.name
        self._procedure = procedure
        self.called: defer.Deferred[Any] = defer.Deferred()
        self._waiting: list[defer.Deferred[None]] = []
        self._released = False

    def issue(self, request: Any) -> defer.Deferred[Any]:
        if not self.called.called:
            self.called.callback(request)
        if self._released:
            return self._procedure.issue(request)
        waiting: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiting)
        return waiting.addCallback(lambda _: self._procedure.issue(request))

    def release(self) -> None:
        self._released = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def chain(self) -> list[x509.Certificate]:
        return self._procedure.chain()


# -- waiting in tests ---------------------------------------------------------------------


async def until(predicate: Any, seconds: float = 30.0, interval: float = 0.1) -> None:
    """Poll ``predicate`` every ``interval`` seconds in the reactor until it
    holds; AssertionError after ``seconds``."""
    from twisted.internet import reactor, task

    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {predicate}")
        await task.deferLater(reactor, interval, lambda: None)


# -- a gateway in this process ----------------------------------------------------------


class RunningGateway:
    """A real gateway on 127.0.0.1:<free port> with its own state directory."""

    def __init__(self, directory: str, config_text: str = TEST_CONFIG) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.config_path = write(os.path.join(directory, "est.properties"), config_text.encode())
        self.config = config_module.load(self.config_path)
        self.service: Any = None
        self.port = 0

    @classmethod
    async def start(cls, testcase: Any, config_text: str = TEST_CONFIG, reactor: Any = None) -> "RunningGateway":
        """Start one for a trial TestCase; it stops in the test's cleanup."""
        gateway = cls(os.path.abspath(testcase.mktemp()), config_text)
        await gateway.run(reactor)
        testcase.addCleanup(gateway.stop)
        return gateway

    async def run(self, reactor: Any = None) -> None:
        from estgw.tap import GatewayService

        self.service = GatewayService(self.config, reactor)
        self.service.startService()
        await self.service.ready
        self.port = self.service.port.getHost().port

    def stop(self) -> defer.Deferred[None]:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        from twisted.internet import reactor, task

        await self.service.stopService()
        # A client that left just before the test ended: give the reactor
        # a moment to see its connection end, so that none of its timers
        # outlives the test (trial's clean-reactor check).  Bounded.
        for _ in range(60):
            if self.service.connection_counts.total == 0:
                return
            await task.deferLater(reactor, 0.05, lambda: None)

    @property
    def store(self) -> Any:
        return self.service.store

    @property
    def ca_file(self) -> str:
        return self.config.ca_certificate_path

    def url(self, path: str) -> str:
        if not path.startswith("/"):
            path = "/.well-known/est/" + path
        return f"https://127.0.0.1:{self.port}{path}"

    def path(self, filename: str) -> str:
        return os.path.join(self.directory, filename)

    async def curl(
        self,
        path: str,
        data: bytes | None = None,
        content_type: str | None = "application/pkcs10",
        cert: str | None = None,
        key: str | None = None,
        user: str | None = None,
        digest: bool = False,
        headers: Sequence[str] = (),
        extra: Sequence[str] = (),
    ) -> HTTPResult:
        """One request with the real curl; verifies the server with the CA."""
        workdir = tempfile.mkdtemp(dir=self.directory)
        body_file = os.path.join(workdir, "body")
        header_file = os.path.join(workdir, "headers")
        argv = [
            _which("curl"), "-sS", "--max-time", "30", "--cacert", self.ca_file,
            "-o", body_file, "-D", header_file, "-w", "%{http_code}",
        ]
        if cert:
            argv += ["--cert", cert]
        if key:
            argv += ["--key", key]
        if user is not None:
            argv += ["--digest" if digest else "--basic", "-u", user]
        for header in headers:
            argv += ["-H", header]
        if data is not None:
            if content_type is not None:
                argv += ["-H", f"Content-Type: {content_type}"]
            argv += ["--data-binary", "@" + write(os.path.join(workdir, "request"), data)]
        argv += list(extra) + [self.url(path)]
        result = await run_process(argv)
        try:
            status = int(result.stdout.strip() or b"0")
        except ValueError:
            status = 0
        body = open(body_file, "rb").read() if os.path.exists(body_file) else b""
        raw_headers = open(header_file, "rb").read() if os.path.exists(header_file) else b""
        return HTTPResult(status, _parse_headers(raw_headers), body, result.stderr)


# -- EST over CoAPs with libcoap's coap-client ----------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class CoAPResult:
    code: str  # "2.05", "4.03", ...; "" when no response came
    payload: bytes  # the whole (block-wise reassembled) response payload
    log: str  # coap-client's debug output: every PDU sent and received
    stderr: bytes = b""

    @property
    def diagnostic(self) -> str:
        """The diagnostic payload of an error response (RFC 7252 §5.5.2)."""
        text = self.stderr.decode("utf-8", "replace").strip()
        return text[len(self.code):].strip() if text.startswith(self.code) else text


COAP_CLIENT = "coap-client-openssl"  # libcoap built with OpenSSL (Debian libcoap3-bin)


async def run_coap_client(
    url: str,
    ca_file: str,
    method: str = "get",
    payload: bytes | None = None,
    content_format: int | None = None,
    accept: int | None = None,
    cert: str | None = None,
    key: str | None = None,
    block_size: int | None = None,
    workdir: str | None = None,
) -> CoAPResult:
    """One request with libcoap's ``coap-client-openssl`` over DTLS,
    verifying the server against ``ca_file``; optionally with a client
    certificate and a block size (``-b``: Block1 for the request, Block2
    asked for the response)."""
    workdir = tempfile.mkdtemp(dir=workdir)
    out = os.path.join(workdir, "response")
    argv = [_which(COAP_CLIENT), "-v", "7", "-B", "20", "-R", ca_file, "-m", method, "-o", out]
    if cert:
        argv += ["-c", cert]
    if key:
        argv += ["-j", key]
    if payload is not None:
        argv += ["-f", write(os.path.join(workdir, "request"), payload)]
    if content_format is not None:
        argv += ["-t", str(content_format)]
    if accept is not None:
        argv += ["-A", str(accept)]
    if block_size is not None:
        argv += ["-b", str(block_size)]
    result = await run_process(argv + [url])
    log = result.stdout.decode("utf-8", "replace")
    codes = re.findall(r"t:(?:ACK|NON|CON) c:([0-9]\.[0-9]{2}) ", log)
    body = open(out, "rb").read() if os.path.exists(out) else b""
    return CoAPResult(codes[-1] if codes else "", body, log, result.stderr)


def make_raw_csr(key: Any, common_name: str, attributes: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """A DER CSR signed by ``key`` (EC) whose attributes are exactly
    ``attributes``: (OID, the DER of each value), repeats and empty value
    sets included, for requests cryptography will not build."""
    from pyasn1.codec.der import decoder as der_decoder
    from pyasn1.codec.der import encoder as der_encoder
    from pyasn1.type import univ
    from pyasn1_modules import rfc2986

    def tlv(tag: int, body: bytes) -> bytes:
        n = len(body)
        length = bytes([n]) if n < 128 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
        return bytes([tag]) + length + body

    base = make_csr(key, common_name)
    request, _ = der_decoder.decode(base.public_bytes(serialization.Encoding.DER), asn1Spec=rfc2986.CertificationRequest())
    info = request["certificationRequestInfo"]
    # SET OF in DER order (X.690 §11.6), as a parser insists.
    encoded = b"".join(sorted(
        tlv(0x30, der_encoder.encode(univ.ObjectIdentifier(oid)) + tlv(0x31, b"".join(sorted(values))))
        for oid, values in attributes
    ))
    info_der = tlv(0x30, b"".join(der_encoder.encode(info[f]) for f in ("version", "subject", "subjectPKInfo")) + tlv(0xA0, encoded))
    signature = key.sign(info_der, ec.ECDSA(hashes.SHA256()))
    algorithm = bytes.fromhex("300a06082a8648ce3d040302")  # ecdsa-with-SHA256
    return tlv(0x30, info_der + algorithm + tlv(0x03, b"\x00" + signature))
