"""Load benchmark of a real estgw daemon on 127.0.0.1.

Starts ``twistd -n estgw`` on a temporary copy of etc/est.properties,
pre-registers devices with the operator CLI, drives cacerts, csrattrs,
simpleenroll (HTTP Basic) and simplereenroll (TLS client certificate)
with a treq client over persistent connections, then measures the work
the daemon does off the reactor thread (signing, scrypt) against the cost
of a thread-pool round trip.  The machine may be shared and noisy: read
the ratios within one run, not absolute numbers across runs (see
bench/README.rst).  Exits 0 when the run completed, whatever the numbers.
"""

from __future__ import annotations

import argparse
import base64
import collections
import itertools
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Awaitable, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing estgw

import attr
import cryptography
import treq
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, error, protocol, ssl, task
from twisted.internet.threads import deferToThreadPool
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from estgw import config as config_module
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.passwords import hash_password, verify_password
from estgw.protocol import decode_certs_only
from estgw.testing import make_csr, new_key

HOST = "127.0.0.1"
PASSWORD = "bench-password"
MAX_DEVICES = 4
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0
SERVING = re.compile(rb"serving EST at https://\S+?:(\d+)/")
# Keys the copy overrides: listen on loopback only, keep all state in the temp directory.
OVERRIDES = {
    "server.interface": HOST,
    "state.directory": "state",
    "store.url": "sqlite:estgw.sqlite",
}


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="load time, split over the 4 operations")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight per operation")
    parser.add_argument("--count", type=int, default=20000, help="at most this many requests per operation")
    parser.add_argument("--samples", type=int, default=200, help="samples per micro measurement (scrypt: a tenth)")
    options = parser.parse_args(argv)
    if options.seconds <= 0 or options.concurrency < 1 or options.count < 1 or options.samples < 1:
        parser.error("--seconds, --concurrency, --count and --samples must be positive")
    return options


# -- setup: config copy, devices ------------------------------------------------


# Keys whose values are files, relative to the directory of est.properties:
# the copy lives elsewhere, so they are made absolute (e.g. an approval
# handler's PKCS#12 token, the CRL and trust anchor files).
PATH_KEYS = re.compile(
    r"\s*((?:tls\.trustAnchors|tls\.crls)|(?:handler\.\d+|default)\.idm\.tls\.(?:token|trustAnchors))\s*[=:]\s*(.*)$"
)


def _absolute_paths(line: str, base: str) -> str:
    match = PATH_KEYS.match(line)
    if match is None or not match.group(2).strip():
        return line
    paths = [os.path.join(base, os.path.expanduser(p.strip())) for p in match.group(2).split(",") if p.strip()]
    return f"{match.group(1)} = {', '.join(paths)}"


def write_config(directory: str) -> str:
    """etc/est.properties with OVERRIDES in place of its own values and
    its relative file names made absolute."""
    etc = os.path.join(REPO, "etc")
    with open(os.path.join(etc, "est.properties"), encoding="utf-8") as f:
        lines = [_absolute_paths(line, etc) for line in f.read().splitlines()]
    keys = "|".join(re.escape(k) for k in OVERRIDES)
    kept = [line for line in lines if not re.match(rf"\s*({keys})\s*[=:\s]", line)]
    kept += [f"{key} = {value}" for key, value in OVERRIDES.items()]
    path = os.path.join(directory, "est.properties")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
    return path


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=REPO)


def register_devices(config_path: str, count: int) -> list[str]:
    """Pre-register devices with the operator CLI (before the reactor runs)."""
    devices = [f"bench-device-{i}" for i in range(count)]
    for device in devices:
        done = subprocess.run(
            [sys.executable, "-c", "from estgw.cli import main; main()", "--config", config_path,
             "device", "add", device, "--password", PASSWORD],
            env=_environment(), capture_output=True, timeout=60,
        )
        if done.returncode != 0:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
            raise SystemExit(f"estgw device add {device} failed:\n" + "\n".join(tail))
    return devices


# -- the daemon -------------------------------------------------------------------


class Daemon(protocol.ProcessProtocol):
    """``twistd -n estgw`` as a child; ``port`` fires once it serves."""

    def __init__(self) -> None:
        self.port: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.tail: collections.deque[bytes] = collections.deque(maxlen=20)  # for start failures
        self._buffer = b""

    @classmethod
    def spawn(cls, reactor: Any, config_path: str) -> "Daemon":
        daemon = cls()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "estgw", "--config", config_path, "--port", "0"]
        reactor.spawnProcess(daemon, argv[0], argv, env=_environment(), path=os.path.dirname(config_path))
        return daemon

    def outReceived(self, data: bytes) -> None:
        # Always drained: the daemon logs every issued certificate.
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self.tail.append(line)
            found = SERVING.search(line)
            if found and not self.port.called:
                self.port.callback(int(found.group(1)))

    errReceived = outReceived

    def log_tail(self) -> str:
        return b"\n".join(self.tail).decode("utf-8", "replace")

    def processEnded(self, reason: Any) -> None:
        if not self.port.called:
            self.port.errback(RuntimeError(f"estgw exited before serving:\n{self.log_tail()}"))
        self.ended.callback(None)

    def peak_rss_kib(self) -> int | None:
        """VmHWM of the daemon (twistd -n does not fork: the child is it)."""
        if self.transport is None:
            return None
        try:
            with open(f"/proc/{self.transport.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except (OSError, TypeError):  # TypeError: pid is None once it ended
            pass
        return None

    def _signal(self, name: str) -> None:
        if not self.ended.called and self.transport is not None:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    async def stop(self, reactor: Any) -> None:
        """SIGTERM; SIGKILL when it has not ended STOP_TIMEOUT seconds later."""
        self._signal("TERM")
        kill = reactor.callLater(STOP_TIMEOUT, self._signal, "KILL")
        await self.ended
        if kill.active():
            kill.cancel()


# -- the client -------------------------------------------------------------------


@implementer(IPolicyForHTTPS)
class ClientPolicy:
    """Trust the gateway's local root CA; present a client certificate when given."""

    def __init__(self, root: x509.Certificate, key: Any = None, cert: x509.Certificate | None = None) -> None:
        self._trust = ssl.Certificate.loadPEM(root.public_bytes(serialization.Encoding.PEM))
        self._extra = {"privateKey": key, "certificate": cert} if cert is not None else {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trust, extraCertificateOptions=self._extra
        )


def http_client(reactor: Any, policy: ClientPolicy, size: int) -> tuple[treq.client.HTTPClient, HTTPConnectionPool]:
    # One pool per policy: the pool keys connections by host and port only,
    # so a shared one would reuse client-certificate connections for Basic.
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = size
    return treq.client.HTTPClient(Agent(reactor, contextFactory=policy, pool=pool)), pool


def csr_body(key: Any, common_name: str) -> bytes:
    csr = make_csr(key, common_name)
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def basic(device: str) -> str:
    return "Basic " + base64.b64encode(f"{device}:{PASSWORD}".encode()).decode("ascii")


Call = Callable[[], Awaitable[tuple[int, bytes]]]


def get(client: Any, url: str) -> Call:
    async def call() -> tuple[int, bytes]:
        response = await client.get(url, timeout=REQUEST_TIMEOUT)
        return response.code, await response.content()
    return call


def post(client: Any, url: str, body: bytes, authorization: str | None = None) -> Call:
    headers = {"Content-Type": "application/pkcs10"}
    if authorization is not None:
        headers["Authorization"] = authorization

    async def call() -> tuple[int, bytes]:
        response = await client.post(url, data=body, headers=headers, timeout=REQUEST_TIMEOUT)
        return response.code, await response.content()
    return call


# -- load -------------------------------------------------------------------------


@attr.s(auto_attribs=True)
class Result:
    operation: str
    latencies: list[float] = attr.Factory(list)  # seconds, successful requests
    errors: int = 0
    first_error: str = ""
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return len(self.latencies) + self.errors

    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[round(q * (len(ordered) - 1))] if ordered else float("nan")


async def run_operation(operation: str, call: Call, concurrency: int, count: int, seconds: float) -> Result:
    """``concurrency`` loops of ``call`` until ``count`` requests or ``seconds`` pass."""
    result = Result(operation)
    budget = iter(range(count))
    deadline = time.perf_counter() + seconds

    async def loop() -> None:
        while time.perf_counter() < deadline and next(budget, None) is not None:
            started = time.perf_counter()
            try:
                status, body = await call()
                failure = "" if status == 200 else f"HTTP {status}: {body[:200]!r}"
            except Exception as e:
                failure = repr(e)
            if failure:
                result.errors += 1
                result.first_error = result.first_error or failure
            else:
                result.latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(loop()) for _ in range(concurrency)])
    result.seconds = time.perf_counter() - started
    return result


async def load(reactor: Any, options: argparse.Namespace, port: int, root: x509.Certificate,
               devices: list[str]) -> list[Result]:
    base = f"https://{HOST}:{port}/.well-known/est/"
    plain, plain_pool = http_client(reactor, ClientPolicy(root), options.concurrency)
    pools = [plain_pool]
    try:
        # One enrollment first: its certificate authenticates the renewals.
        key = new_key("ec")
        status, body = await post(plain, base + "simpleenroll", csr_body(key, devices[0]), basic(devices[0]))()
        if status != 200:
            raise RuntimeError(f"setup simpleenroll failed: HTTP {status}: {body[:200]!r}")
        cert = decode_certs_only(body)[0]
        renewer, renewer_pool = http_client(reactor, ClientPolicy(root, key, cert), options.concurrency)
        pools.append(renewer_pool)
        # CSRs are made once: the client's CPU is the daemon's CPU too.
        enrollments = itertools.cycle(
            [post(plain, base + "simpleenroll", csr_body(new_key("ec"), d), basic(d)) for d in devices]
        )
        operations: list[tuple[str, Call]] = [
            ("cacerts", get(plain, base + "cacerts")),
            ("csrattrs", get(plain, base + "csrattrs")),
            ("simpleenroll (Basic)", lambda: next(enrollments)()),
            ("simplereenroll (cert)", post(renewer, base + "simplereenroll", csr_body(key, devices[0]))),
        ]
        share = options.seconds / len(operations)
        return [await run_operation(name, call, options.concurrency, options.count, share)
                for name, call in operations]
    finally:
        for pool in pools:
            await pool.closeCachedConnections()


# -- micro: what justifies the thread pool ----------------------------------------


def median_us(work: Callable[[], Any], samples: int) -> float:
    times = []
    for _ in range(samples):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1e6 * statistics.median(times)


async def micro(reactor: Any, config_path: str, samples: int) -> list[tuple[str, int, float]]:
    """(what, samples, µs median) rows; the first is the round trip.

    Signing and scrypt are timed inline on purpose: the daemon is gone and
    this reactor serves nothing, so only the measured call uses the CPU.
    """
    pool = reactor.getThreadPool()
    trips = []
    for _ in range(samples):
        started = time.perf_counter()
        await deferToThreadPool(reactor, pool, int)
        trips.append(time.perf_counter() - started)
    rows = [("deferToThreadPool round trip", samples, 1e6 * statistics.median(trips))]
    ca = LocalCA.load_or_create(config_module.load(config_path).ca_directory)
    for kind, label in (("ec", "EC P-256"), ("rsa2048", "RSA-2048")):
        request = IssueRequest(x509.Name.from_rfc4514_string("CN=bench"), new_key(kind).public_key())
        sign = lambda request=request: ca.sign(request, Profile())  # noqa: E731
        rows.append((f"LocalCA.sign, {label} CSR key", samples, median_us(sign, samples)))
    stored = hash_password(PASSWORD)
    check = lambda: verify_password(PASSWORD, stored)  # noqa: E731
    few = max(3, samples // 10)
    rows.append(("verify_password (scrypt)", few, median_us(check, few)))
    return rows


# -- report ------------------------------------------------------------------------


def print_load(results: list[Result], rss_kib: int | None) -> None:
    base = results[0].rate()
    print(f"{'operation':<22} {'requests':>8} {'errors':>6} {'seconds':>7} {'req/s':>8} "
          f"{'p50 ms':>7} {'p95 ms':>7} {'cost x cacerts':>14}")
    for r in results:
        cost = base / r.rate() if r.rate() else float("nan")
        print(f"{r.operation:<22} {r.requests:>8} {r.errors:>6} {r.seconds:>7.2f} {r.rate():>8.1f} "
              f"{r.percentile_ms(0.5):>7.1f} {r.percentile_ms(0.95):>7.1f} {cost:>14.1f}")
    for r in results:
        if r.first_error:
            print(f"  first error of {r.operation}: {r.first_error}")
    peak = f"{rss_kib / 1024:.1f} MiB" if rss_kib is not None else "unknown"
    print(f"daemon peak RSS (VmHWM): {peak}")


def print_micro(rows: list[tuple[str, int, float]]) -> None:
    trip = rows[0][2]
    print(f"{'work':<32} {'samples':>7} {'us median':>10} {'x round trip':>12}")
    for what, n, us in rows:
        print(f"{what:<32} {n:>7} {us:>10.1f} {us / trip:>12.1f}")


async def run(reactor: Any, options: argparse.Namespace, config_path: str, devices: list[str]) -> None:
    daemon = Daemon.spawn(reactor, config_path)
    try:
        try:
            port = await daemon.port.addTimeout(START_TIMEOUT, reactor)
        except defer.TimeoutError:
            raise RuntimeError(f"estgw did not serve within {START_TIMEOUT:g} s:\n{daemon.log_tail()}") from None
        with open(config_module.load(config_path).ca_certificate_path, "rb") as f:
            root = x509.load_pem_x509_certificate(f.read())
        results = await load(reactor, options, port, root, devices)
        rss = daemon.peak_rss_kib()
    finally:
        await daemon.stop(reactor)
    rows = await micro(reactor, config_path, options.samples)  # the daemon is gone: less noise

    print(f"estgw benchmark: {HOST}:{port}, {options.seconds:g} s over 4 operations, "
          f"concurrency {options.concurrency}, {len(devices)} devices, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, cryptography {cryptography.__version__}")
    print()
    print_load(results, rss)
    print()
    print_micro(rows)


def main(argv: list[str] | None = None) -> None:
    options = _arguments(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="estgw-bench-") as directory:
        config_path = write_config(directory)
        devices = register_devices(config_path, min(options.concurrency, MAX_DEVICES))
        task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor, options, config_path, devices)))


if __name__ == "__main__":
    main()
