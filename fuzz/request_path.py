"""Fuzz the EST request path in-process: bytes in, one HTTP exchange out.

A real gateway (the state, CA, store, portal and twisted.web site that
``twistd estgw`` builds, from :data:`estgw.testing.TEST_CONFIG`) runs on
a :class:`twisted.internet.testing.MemoryReactorClock`; each input is fed
to a fresh :class:`twisted.web.http.HTTPChannel` over a
:class:`~twisted.internet.testing.StringTransport`, and the reactor's
queued work and clock are driven by hand, in bounded steps.  What must hold
for every input (:func:`check`):

- every response has a status line, and no status is a 5xx (except 501
  for ``fullcmc``, which this gateway does not offer, RFC 7030 §4.3);
- no response is one of twisted.web's HTML pages (every answer of
  estgw's is plain text, or an EST media type);
- no response carries a Python traceback, and nothing is logged as a
  failure (an exception that escaped a handler);
- nothing hangs: once the clock passes the idle timeout the connection
  is closed, and a complete request has been answered before that.

The thread pools (adbapi's, the reactor's) run their work at once on the
calling thread, so one input is one deterministic, synchronous run.

Run (a benchmark, not a CI step; see README.rst, "Hardening")::

    .venv/bin/pip install '.[fuzz]'
    .venv/bin/python fuzz/request_path.py -atheris_runs=1000000 fuzz/corpus

Any crash is written by libFuzzer as ``crash-<sha1>``; copy it to
``tests/fuzz_regressions/`` where ``tests/test_fuzz_regressions.py``
replays it through :func:`one_input` without atheris, as does::

    .venv/bin/python fuzz/request_path.py --replay tests/fuzz_regressions/*
"""

from __future__ import annotations

import base64
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable

# The estgw of this checkout, not an older installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import defer  # noqa: E402
from twisted.internet.address import IPv4Address  # noqa: E402
from twisted.internet.testing import MemoryReactorClock, StringTransport  # noqa: E402
from twisted.logger import globalLogBeginner, globalLogPublisher  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

#: A device the fuzzer can authenticate as (Basic, handler 2 and 6).
DEVICE = "fuzz-device"
PASSWORD = "fuzz-password"

#: Steps of queued reactor work per input: far more than any request needs.
MAX_STEPS = 10_000


class _SyncThreadPool:
    """A thread pool that runs each call at once, on the caller's thread."""

    started = True
    min = max = 1
    threads: list[Any] = []
    working: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def adjustPoolsize(self, *args: Any, **kwargs: Any) -> None:
        pass

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def callInThreadWithCallback(self, on_result: Callable[..., Any], f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class _Reactor(MemoryReactorClock):
    """A MemoryReactorClock whose thread work runs synchronously and whose
    ``callFromThread`` calls wait in a queue that :meth:`pump` drains."""

    def __init__(self) -> None:
        super().__init__()
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = []
        self.running = True
        self._pool = _SyncThreadPool()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.queue.append((f, args, kwargs))

    def callInThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def getThreadPool(self) -> _SyncThreadPool:
        return self._pool

    def callWhenRunning(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)

    def addSystemEventTrigger(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def removeSystemEventTrigger(self, *args: Any) -> None:
        pass

    def suggestThreadPoolSize(self, size: int) -> None:
        pass

    def pump(self, seconds: float = 0.0) -> int:
        """Run queued work and calls due within ``seconds``; the steps taken."""
        steps = 0
        deadline = self.seconds() + seconds
        while steps < MAX_STEPS:
            if self.queue:
                f, args, kwargs = self.queue.pop(0)
                f(*args, **kwargs)
            elif self.getDelayedCalls() and min(c.getTime() for c in self.getDelayedCalls()) <= deadline:
                due = min(c.getTime() for c in self.getDelayedCalls())
                self.advance(max(0.0, due - self.seconds()))
            else:
                break
            steps += 1
        return steps


class _Transport(StringTransport):
    """A StringTransport that, like a real one, lets a producer be
    unregistered twice (twisted.web does on a second loseConnection)."""

    def unregisterProducer(self) -> None:
        if self.producer is not None:
            super().unregisterProducer()


class Violation(AssertionError):
    """An input broke one of the properties in the module docstring."""


class Harness:
    """One gateway, built once; :meth:`exchange` runs one input through it."""

    def __init__(self, directory: str | None = None) -> None:
        from twisted.python import threadpool

        from estgw import config as config_module, passwords
        from estgw.store import Device
        from estgw.tap import GatewayService
        from estgw.tls import PeerInfo
        from estgw.testing import TEST_CONFIG, write
        from estgw.web import build_site

        # adbapi makes its own twisted.python.threadpool.ThreadPool: in this
        # process every one runs its work synchronously.
        threadpool.ThreadPool = _SyncThreadPool  # type: ignore[misc,assignment]
        # The cheapest scrypt cost (n=2, r=1) for the fuzzer's device and for
        # the dummy hash checked for unknown ones: the same code path, in
        # microseconds instead of tens of milliseconds.
        passwords._N, passwords._R = 2, 1
        cheap = passwords.hash_password(PASSWORD)
        passwords._dummy_hash = passwords.hash_password("estgw-dummy-password")
        passwords._N, passwords._R = 2**14, 8

        self.directory = directory or tempfile.mkdtemp(prefix="estgw-fuzz-", dir=_scratch())
        path = write(os.path.join(self.directory, "est.properties"), TEST_CONFIG.encode())
        self.config = config_module.load(path)
        # Past every deadline (idle, request head, body), a connection must be closed.
        self.idle_timeout = max(self.config.idle_timeout, self.config.header_timeout, self.config.body_timeout)
        self.reactor = _Reactor()
        self.reactor.advance(time.time())  # certificates and the store use the reactor's clock
        self.failures: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self._observe)
        globalLogBeginner.beginLoggingTo([], discardBuffer=True, redirectStandardIO=False)

        self.service = GatewayService(self.config, self.reactor)
        self.gateway = self.service.gateway = self.service.build_gateway()
        self.site = build_site(self.gateway)
        self.site.reactor = self.reactor
        self.site.callLater = self.reactor.callLater
        self._run(self.service.store.start())
        self._run(self.gateway.portal.start())
        self._run(self.service.store.add_device(Device(DEVICE, cheap)))
        # The TLS layer is not fuzzed here: each input chooses what it tells
        # the request path (no TLS, TLS without a client certificate, or a
        # verified client certificate this gateway issued).
        import estgw.web

        self.peer: Any = None
        estgw.web.peer_info = lambda request: self.peer
        self.peers = [PeerInfo(is_tls=False), PeerInfo(is_tls=True, tls_version="TLSv1.3")]
        self.peers.append(self._client_certificate_peer())
        self.failures.clear()

    def _client_certificate_peer(self) -> Any:
        from cryptography.hazmat.primitives.serialization import pkcs7

        self.peer = self.peers[1]
        csr = base64.encodebytes(_valid_csr_der())
        output, _, _ = self.exchange(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
            b"Authorization: Basic " + base64.b64encode(f"{DEVICE}:{PASSWORD}".encode()) + b"\r\n"
            b"Content-Type: application/pkcs10\r\nContent-Length: %d\r\n\r\n" % len(csr) + csr
        )
        status, _, body = responses(output)[0]
        if status != 200:
            raise RuntimeError(f"the fuzzer's device could not enroll: {output!r}")
        (leaf,) = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
        chain = tuple(self.service.state.ca.chain())
        from estgw.tls import PeerInfo

        return PeerInfo(is_tls=True, tls_version="TLSv1.3", certificate=leaf, chain=(leaf, *chain))

    def _observe(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.failures.append(event)

    def _run(self, d: defer.Deferred) -> Any:
        outcome: list[Any] = []
        d.addBoth(outcome.append)
        self.reactor.pump()
        if not outcome:
            raise RuntimeError("the gateway did not finish starting")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        return outcome[0]

    def exchange(self, request: bytes, chunks: int = 1, peer: int | None = None) -> tuple[bytes, bool, bool]:
        """Feed ``request`` (in ``chunks`` pieces) to a new connection; the
        bytes written back, whether the connection was closed within the idle
        timeout, and whether it was answered before that.  ``peer`` chooses
        one of :attr:`peers` (the current one when None)."""
        if peer is not None:
            self.peer = self.peers[peer % len(self.peers)]
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = _Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        channel.makeConnection(transport)
        size = max(1, -(-len(request) // max(1, chunks)))
        for start in range(0, len(request), size):
            if transport.disconnecting:
                break
            channel.dataReceived(request[start:start + size])
            self.reactor.pump()
        answered_before_timeout = bool(transport.value())
        self.reactor.pump(self.idle_timeout + 1)
        closed = bool(transport.disconnecting)
        if not closed:
            channel.connectionLost(Failure(ConnectionError("fuzz: closed by the harness")))
        else:
            channel.connectionLost(Failure(ConnectionError("fuzz: closed")))
        self.reactor.pump(self.idle_timeout + 1)
        return transport.value(), closed, answered_before_timeout


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ([^\r\n]*)\r\n")


def responses(output: bytes) -> list[tuple[int, bytes, bytes]]:
    """Split what the server wrote into (status, head, body) triples."""
    found = []
    rest = output
    while rest:
        match = _STATUS.match(rest)
        if match is None:
            raise Violation(f"not an HTTP response: {rest[:80]!r}")
        head, sep, tail = rest.partition(b"\r\n\r\n")
        if not sep:
            raise Violation(f"a response head without its end: {head[:200]!r}")
        length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
        if length is None:
            body, rest = tail, b""
        elif _STATUS.match(tail):
            # The answer to a HEAD: its Content-Length, and no body.
            body, rest = b"", tail
        else:
            n = int(length.group(1))
            body, rest = tail[:n], tail[n:]
        found.append((int(match.group(1)), head, body))
    return found


def check(request: bytes, output: bytes, closed: bool, answered: bool, complete: bool, failures: list[Any]) -> None:
    """Raise :class:`Violation` when one of the properties does not hold."""
    if failures:
        event = failures[0]
        failure = event.get("log_failure")
        detail = failure.getTraceback() if failure is not None else repr(event)
        raise Violation(f"an exception escaped while serving {request[:200]!r}:\n{detail}")
    if b"Traceback" in output:
        raise Violation(f"a traceback in the response to {request[:200]!r}")
    for status, head, body in responses(output):
        if status >= 500 and not (status == 501 and b"fullcmc" in body):
            raise Violation(f"{status} to {request[:200]!r}: {head!r} {body[:200]!r}")
        if b"<html" in body.lower() or b"text/html" in head.lower():
            raise Violation(f"one of twisted.web's HTML pages for {request[:200]!r}: {head!r} {body[:200]!r}")
    if not closed:
        raise Violation(f"the connection stayed open past the idle timeout: {request[:200]!r}")
    if complete and not answered:
        raise Violation(f"a complete request got no answer: {request[:200]!r}")


# -- turning fuzz bytes into requests ------------------------------------------------

_METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE", b"TRACE", b"CONNECT", b"get", b"PATCH"]
_PATHS = [
    b"/.well-known/est/cacerts", b"/.well-known/est/simpleenroll", b"/.well-known/est/simplereenroll",
    b"/.well-known/est/csrattrs", b"/.well-known/est/serverkeygen", b"/.well-known/est/fullcmc",
    b"/.well-known/est/lab/cacerts", b"/.well-known/est/lab/simpleenroll", b"/.well-known/est/lab/csrattrs",
    b"/.well-known/est/nolabel/cacerts", b"/", b"/.well-known/", b"*",
    b"https://localhost/.well-known/est/simpleenroll", b"/.well-known/est/%2e%2e/est/cacerts",
]
_CONTENT_TYPES = [b"application/pkcs10", b"application/pkcs10; charset=x", b"text/plain", b"multipart/form-data"]
_VALID_CSR: bytes | None = None


def _valid_csr_der() -> bytes:
    global _VALID_CSR
    if _VALID_CSR is None:
        from cryptography.hazmat.primitives.serialization import Encoding

        from estgw.testing import make_csr, new_key

        _VALID_CSR = make_csr(new_key("ec"), "fuzz-device").public_bytes(Encoding.DER)
    return _VALID_CSR


class _Reader:
    """Reads choices and byte strings off the front of a fuzz input."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def byte(self) -> int:
        if self.at >= len(self.data):
            return 0
        self.at += 1
        return self.data[self.at - 1]

    def pick(self, options: list[bytes]) -> bytes:
        return options[self.byte() % len(options)]

    def take(self, limit: int = 255) -> bytes:
        n = min(self.byte(), limit)
        piece = self.data[self.at:self.at + n]
        self.at += n
        return piece

    def rest(self) -> bytes:
        piece = self.data[self.at:]
        self.at = len(self.data)
        return piece


def build_request(data: bytes) -> tuple[bytes, bool, int, int]:
    """An HTTP request from fuzz bytes: (bytes, whether it is complete,
    chunks, peer: an index into :attr:`Harness.peers`).

    The first byte chooses: raw bytes as they are (incomplete as far as the
    harness knows), or a request put together from a method, path, headers
    and a body that is raw, base64 of raw bytes, or a valid CSR with some
    bytes changed, with a matching Content-Length or chunked encoding.
    """
    r = _Reader(data)
    mode = r.byte()
    chunks = 1 + r.byte() % 4
    peer = r.byte()
    if mode % 4 == 0:
        return r.rest(), False, chunks, peer
    method = r.pick(_METHODS) if r.byte() % 8 else r.take(16)
    path = r.pick(_PATHS)
    if r.byte() % 4 == 0:
        path += r.take(64)
    headers = [b"Host: localhost"]
    flags = r.byte()
    if flags & 1:
        headers.append(b"Authorization: Basic " + base64.b64encode(f"{DEVICE}:{PASSWORD}".encode()))
    if flags & 2:
        headers.append(b"Authorization: " + r.take(128))
    if flags & 4:
        headers.append(b"Content-Type: " + r.pick(_CONTENT_TYPES))
    if flags & 8:
        headers.append(r.take(64) + b": " + r.take(64))
    if flags & 16:
        headers.append(b"Content-Transfer-Encoding: " + (b"base64" if r.byte() % 2 else r.take(16)))
    kind = r.byte() % 4
    if kind == 0:
        body = r.rest()
    elif kind == 1:
        body = base64.b64encode(r.rest())
    else:
        csr = bytearray(_valid_csr_der())
        edits = r.rest()
        for i in range(0, len(edits) - 1, 2):
            csr[edits[i] * 7 % len(csr)] = edits[i + 1]
        body = base64.encodebytes(bytes(csr)) if kind == 2 else bytes(csr)
    if flags & 32:
        framed = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        headers.append(b"Transfer-Encoding: chunked")
    else:
        framed = body
        headers.append(b"Content-Length: %d" % len(body))
    head = method + b" " + path + b" HTTP/1.1\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    # A request whose own bytes contain CR or LF is not well-framed: the
    # server may wait for more, as it should.
    complete = all(b"\r" not in part and b"\n" not in part for part in (method, path, *headers))
    complete = complete and b" " not in method and b" " not in path[len(b"/"):] and bool(method)
    return head + framed, complete, chunks, peer


_harness: Harness | None = None


def harness() -> Harness:
    global _harness
    if _harness is None:
        import atexit
        import shutil

        directory = tempfile.mkdtemp(prefix="estgw-fuzz-", dir=_scratch())
        atexit.register(shutil.rmtree, directory, True)
        _harness = Harness(directory)
    return _harness


def one_input(data: bytes) -> None:
    """The fuzz target: raises :class:`Violation` for a bad outcome."""
    h = harness()
    request, complete, chunks, peer = build_request(data)
    h.failures.clear()
    output, closed, answered = h.exchange(request, chunks, peer)
    check(request, output, closed, answered, complete, h.failures)


def _scratch() -> str | None:
    # The store commits with synchronous=FULL: on tmpfs an fsync costs nothing.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


#: Starting points (in :func:`build_request`'s format): an enrollment with
#: Basic over TLS, a re-enrollment with a client certificate, cacerts,
#: csrattrs, serverkeygen, and a raw request.
SEEDS = [
    bytes([1, 0, 1, 1, 1, 1, 1, 5, 0, 2]),
    bytes([1, 0, 2, 1, 1, 2, 1, 4, 0, 2]),
    bytes([1, 0, 1, 1, 0, 0, 1, 0, 0]),
    bytes([1, 0, 1, 1, 0, 3, 1, 1, 0]),
    bytes([1, 0, 1, 1, 1, 4, 1, 5, 0, 2]),
    bytes([1, 0, 2, 1, 1, 7, 1, 4, 0, 3]),
    bytes([0, 0, 1]) + b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\n\r\n",
    # Framing faults (RFC 9112): two Host lines, obs-fold, a chunk size
    # past any body limit.
    bytes([0, 0, 1]) + b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nHost: x\r\n\r\n",
    bytes([0, 0, 1]) + b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: localhost\r\nX-A: 1\r\n 2\r\n\r\n",
    bytes([0, 0, 1]) + b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: localhost\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffffffffffff\r\n",
]


def replay(paths: list[str]) -> int:
    """Run each input file through :func:`one_input` (no atheris): 0 if all pass."""
    import shutil

    global _harness
    failed = 0
    directory = tempfile.mkdtemp(prefix="estgw-fuzz-", dir=_scratch())
    try:
        _harness = Harness(directory)
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            try:
                one_input(data)
            except Exception as e:
                failed += 1
                print(f"FAIL {os.path.basename(path)}: {type(e).__name__}: {e}")
            else:
                print(f"ok {os.path.basename(path)}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 1 if failed else 0


def main() -> None:
    if sys.argv[1:2] == ["--replay"]:
        sys.exit(replay(sys.argv[2:]))
    import atheris

    # Seed an empty corpus directory given on the command line.
    for argument in sys.argv[1:]:
        if not argument.startswith("-") and os.path.isdir(argument) and not os.listdir(argument):
            for i, seed in enumerate(SEEDS):
                with open(os.path.join(argument, f"seed-{i}"), "wb") as f:
                    f.write(seed)
    with atheris.instrument_imports():
        import estgw.auth  # noqa: F401
        import estgw.csrattrs  # noqa: F401
        import estgw.enroll  # noqa: F401
        import estgw.httpauth  # noqa: F401
        import estgw.names  # noqa: F401
        import estgw.policy  # noqa: F401
        import estgw.protocol  # noqa: F401
        import estgw.serverkeygen  # noqa: F401
        import estgw.tls  # noqa: F401
        import estgw.web  # noqa: F401
        import twisted.web.http  # noqa: F401
    harness()
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
