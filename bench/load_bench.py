"""Enrollment load: N simulated devices against the real daemon.

Each device has its own key and certificate.  Modes:

``device``
    simplereenroll with the device's certificate over a NEW mutual-TLS
    connection per enrollment (a fleet renewing);
``ra``
    simplereenroll over one keep-alive connection per client (an RA or a
    device that stays connected);
``basic``
    simpleenroll with HTTP Basic over a new connection per enrollment,
    each enrollment by a device not seen before in the run (one password
    check each) until the registered devices run out;
``basic-retry``
    simpleenroll with HTTP Basic by the same few devices again and again
    (a retrying device: the verification cache).

The daemon (``twistd -n estgw``, optionally ``--workers N``) is started by
the benchmark on a temporary state directory; the server CPU per
enrollment is read from ``/proc`` (user + system time of the daemon's
processes, summed), so the figure holds on a busy machine.  The load runs
in separate client processes (blocking sockets, one thread per simulated
device) so the client's overhead is not the server's; their TLS is
pyOpenSSL by default (the OpenSSL of the cryptography wheel, whose
handshake costs the client about a third less CPU than Python's ``ssl``
over the system OpenSSL 3.0, leaving more of the shared CPUs to the
daemon; ``--client-tls ssl`` for the latter).  The load generator's own
CPU per enrollment is printed below the table.

On one machine the load generator and the daemon compete for the same
cores, caches and wake-ups.  ``--server-cpus 0 --client-cpus 1`` keeps
them apart (CPU affinity, inherited by the daemon's threads and workers),
as a load generator on another machine would be.  ``--repeat K`` runs
every ``--workers`` value in turn K times and prints the medians: the
figures of a shared machine drift over minutes, comparisons should not.

Prints one table and writes a PNG plot (``--plot``) of throughput and p99
against concurrency.
"""

from __future__ import annotations

import argparse
import base64
import csv
import glob
import json
import multiprocessing
import os
import platform
import re
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"
PASSWORD = "bench-password"
SERVING = re.compile(r"serving EST at https://\S+?:(\d+)/")
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
TICK = os.sysconf("SC_CLK_TCK")
MODES = ("device", "ra", "basic", "basic-retry")
KEY_TYPES = ("ec-p256", "rsa-2048")


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="32", help="comma-separated device counts in flight (32)")
    parser.add_argument("--workers", default="1", help="comma-separated server.workers values to compare (1)")
    parser.add_argument("--modes", default="device", help=f"comma-separated, of {', '.join(MODES)} (device)")
    parser.add_argument("--count", type=int, default=3000, help="at most this many enrollments per run (3000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="at most this long per run (15)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds: every --workers value in turn, this many times, and the medians (1)")
    parser.add_argument("--warmup", type=int, default=100, help="enrollments before each run, not counted (100)")
    parser.add_argument("--ca-key", choices=KEY_TYPES, default="ec-p256", help="ca.keyType (ec-p256)")
    parser.add_argument("--tls-key", choices=KEY_TYPES, default="ec-p256", help="tls.keyType (ec-p256)")
    parser.add_argument("--device-key", choices=KEY_TYPES, default="ec-p256", help="device keys (ec-p256)")
    parser.add_argument("--basic-devices", type=int, default=200,
                        help="devices registered per concurrency for the basic mode, one password check each (200)")
    parser.add_argument("--clients", type=int, default=2, help="load generator processes (2)")
    parser.add_argument("--client-tls", choices=("pyopenssl", "ssl"), default="pyopenssl",
                        help="the devices' TLS: pyOpenSSL (cryptography's OpenSSL, the lighter client)"
                             " or Python's ssl module (the system OpenSSL) (pyopenssl)")
    parser.add_argument("--server-cpus", default="", metavar="LIST",
                        help="CPUs the daemon (and its workers and threads) may run on, e.g. 0; default any")
    parser.add_argument("--client-cpus", default="", metavar="LIST",
                        help="CPUs the load generator may run on, e.g. 1: kept off the daemon's, the load"
                             " generator no longer takes CPU time, caches and wake-ups from it; default any")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an est.properties override for the daemon (repeatable)")
    parser.add_argument("--plot", default="", help="write the PNG plot here")
    parser.add_argument("--json", default="", help="write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon log)")
    parser.add_argument("--target", default="", metavar="HOST:PORT",
                        help="drive this running daemon instead of starting one (needs --config)")
    parser.add_argument("--config", default="", help="with --target: the running daemon's est.properties "
                        "(devices are registered with it, its CA certificate is trusted)")
    parser.add_argument("--pid", type=int, default=0,
                        help="with --target: the daemon's (or supervisor's) pid, for its CPU time and RSS")
    parser.add_argument("--lag-file", default="", help="with --target: the daemon's ESTGW_LAG_PROBE file")
    options = parser.parse_args(argv)
    options.concurrency = [int(c) for c in options.concurrency.split(",")]
    options.workers = [int(w) for w in options.workers.split(",")]
    options.modes = options.modes.split(",")
    for which in ("server_cpus", "client_cpus"):
        text = getattr(options, which)
        try:
            cpus = {int(c) for c in text.split(",")} if text else None
        except ValueError:
            parser.error(f"--{which.replace('_', '-')}: not CPU numbers: {text!r}")
        if cpus and not cpus <= os.sched_getaffinity(0):
            parser.error(f"--{which.replace('_', '-')}: this machine's CPUs are {sorted(os.sched_getaffinity(0))}")
        setattr(options, which, cpus)
    for mode in options.modes:
        if mode not in MODES:
            parser.error(f"--modes: unknown mode {mode!r}")
    if options.target and not options.config:
        parser.error("--target needs --config")
    if options.target:
        host, _, port = options.target.rpartition(":")
        options.target = (host or HOST, int(port))
        options.workers = [0]  # whatever the running daemon has
    if (min(options.concurrency) < 1 or min(options.workers) < (0 if options.target else 1) or options.count < 1
            or options.seconds <= 0 or options.repeat < 1):
        parser.error("--concurrency, --workers, --count, --seconds and --repeat must be positive")
    return options


# -- setup ------------------------------------------------------------------------


def _estgw_keys() -> set[str]:
    sys.path.insert(0, REPO)
    from estgw import config

    return set(config._GLOBAL_KEYS)


def write_config(directory: str, options: argparse.Namespace, workers: int) -> tuple[str, list[str]]:
    """etc/est.properties with the bench's values; notes on what fell back."""
    known = _estgw_keys()
    notes = []
    overrides = {"server.interface": HOST, "state.directory": os.path.join(directory, "state")}
    for key, value in (("ca.keyType", options.ca_key), ("tls.keyType", options.tls_key)):
        if key in known:
            overrides[key] = value
        elif value != "ec-p256":
            notes.append(f"{key} is not a key of this estgw: its default (ec-p256) is used")
    if "server.workers" in known:
        overrides["server.workers"] = str(workers)
    elif workers != 1:
        raise SystemExit("this estgw has no server.workers")
    for item in options.set:
        key, _, value = item.partition("=")
        overrides[key.strip()] = value.strip()
    with open(os.path.join(REPO, "etc", "est.properties"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    keys = "|".join(re.escape(k) for k in overrides)
    kept = [line for line in lines if not re.match(rf"\s*({keys})\s*[=:\s]", line)]
    kept += [f"{key} = {value}" for key, value in overrides.items()]
    path = os.path.join(directory, "est.properties")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(kept) + "\n")
    return path, notes


def _estgw(config_path: str, *args: str) -> None:
    done = subprocess.run([sys.executable, "-c", "from estgw.cli import main; main()", "--config", config_path,
                           *args], env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"estgw {' '.join(args)} failed:\n{done.stderr.decode(errors='replace')[-2000:]}")


def register(config_path: str, directory: str, names: list[str]) -> None:
    path = os.path.join(directory, "devices.csv")
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "password"])
        writer.writerows([name, PASSWORD] for name in names)
    _estgw(config_path, "device", "import", path)
    os.unlink(path)


def new_key(kind: str) -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if kind == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def csr_body(key: Any, name: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
           .sign(key, hashes.SHA256()))
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


def key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem_from_pkcs7(body: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs7

    certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
    return certs[0].public_bytes(serialization.Encoding.PEM)


# -- the daemon -------------------------------------------------------------------


def _stat_fields(path: str) -> list[str] | None:
    """The fields of a /proc/PID/stat file after the command name (None:
    the process is gone)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


class Daemon:
    """``twistd -n estgw`` with its log in a file."""

    def __init__(self, config_path: str, directory: str, workers: int, cpus: set[int] | None = None) -> None:
        self.log_path = os.path.join(directory, f"daemon-{workers}.log")
        self.lag_path = os.path.join(directory, f"lag-{workers}.txt")
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "estgw", "--config", config_path, "--port", "0"]
        env = dict(os.environ, PYTHONPATH=REPO, ESTGW_LAG_PROBE=self.lag_path)
        self.log = open(self.log_path, "wb")
        # Set in the child before exec: its threads and worker processes inherit it.
        pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self.process = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                        cwd=directory, preexec_fn=pin)
        self.pid = self.process.pid
        self.host = HOST
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                found = SERVING.search(f.read())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"estgw did not serve:\n{self.tail()}")

    def tail(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-20:])

    def pids(self) -> list[int]:
        """The daemon and its worker processes."""
        found = [self.pid] if self.pid else []
        for stat in glob.glob("/proc/[0-9]*/stat"):
            fields = _stat_fields(stat)
            if fields is not None and self.pid and int(fields[1]) == self.pid:
                found.append(int(stat.split("/")[2]))
        return found

    def cpu_seconds(self) -> float:
        """User + system time of the daemon, its live workers and its reaped ones."""
        total = 0
        for pid in self.pids():
            fields = _stat_fields(f"/proc/{pid}/stat")
            if fields is None:
                continue
            # utime stime cutime cstime: fields 14-17 of proc(5), 12-15 after the name
            total += sum(int(v) for v in fields[11:13])
            if pid == self.pid:
                total += sum(int(v) for v in fields[13:15])
        return total / TICK if self.pid else float("nan")

    def cpu_by_process(self) -> dict[int, tuple[float, float]]:
        """pid -> (user, system) CPU seconds of the daemon and its live workers."""
        times = {}
        for pid in self.pids():
            fields = _stat_fields(f"/proc/{pid}/stat")
            if fields is not None:
                times[pid] = (int(fields[11]) / TICK, int(fields[12]) / TICK)
        return times

    def peak_rss_mib(self) -> tuple[float, float]:
        """(largest VmHWM of one process, sum of VmHWM) in MiB."""
        peaks = []
        for pid in self.pids():
            try:
                with open(f"/proc/{pid}/status", encoding="ascii") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks.append(int(line.split()[1]) / 1024)
            except OSError:
                pass
        return (max(peaks), sum(peaks)) if peaks else (float("nan"), float("nan"))

    def lag_ms(self, since: float, until: float) -> float:
        """Largest reactor lag the probe saw between two wall-clock times."""
        worst = 0.0
        try:
            with open(self.lag_path, encoding="ascii") as f:
                for line in f:
                    when, _pid, lag = line.split()
                    if since <= float(when) <= until + 1.5:
                        worst = max(worst, float(lag))
        except OSError:
            return float("nan")
        return worst

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Targeted(Daemon):
    """A daemon already running (``--target``): nothing is started or stopped."""

    def __init__(self, host: str, port: int, pid: int, lag_path: str) -> None:
        self.host, self.port, self.pid, self.lag_path = host, port, pid, lag_path

    def stop(self) -> None:
        pass


# -- the load generator (client processes) ----------------------------------------


def _context(root: str, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(root)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def _request(path: str, body: bytes, authorization: str | None, keep_alive: bool) -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: est", "Content-Type: application/pkcs10",
            f"Content-Length: {len(body)}"]
    if authorization:
        head.append(f"Authorization: {authorization}")
    if not keep_alive:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("ascii") + body


def _response(stream: Any) -> tuple[int, bytes]:
    status = stream.readline()
    if not status:
        raise ConnectionError("connection closed before a response")
    code = int(status.split()[1])
    length = 0
    while True:
        line = stream.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return code, stream.read(length) if length else b""


class _TLSReader:
    """readline/read over a pyOpenSSL connection, as ``makefile("rb")`` gives."""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._buffer = b""

    def _fill(self) -> bool:
        from OpenSSL import SSL

        try:
            data = self._connection.recv(65536)
        except (SSL.ZeroReturnError, SSL.SysCallError):
            return False
        self._buffer += data
        return bool(data)

    def readline(self) -> bytes:
        while b"\n" not in self._buffer:
            if not self._fill():
                line, self._buffer = self._buffer, b""
                return line
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and self._fill():
            pass
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data


def _fast_context(root: str, cert: str | None, key: str | None) -> Any:
    from OpenSSL import SSL

    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.load_verify_locations(root)
    context.set_verify(SSL.VERIFY_PEER)
    if cert is not None and key is not None:
        context.use_certificate_chain_file(cert)
        context.use_privatekey_file(key)
    return context


class Connection:
    def __init__(self, context: ssl.SSLContext, port: int, host: str = HOST) -> None:
        raw = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # The gateway's certificate names localhost, not 127.0.0.1's name.
        # Any: FastConnection keeps a pyOpenSSL connection and its reader here.
        self.sock: Any = context.wrap_socket(raw, server_hostname="localhost" if host == HOST else host)
        self.stream: Any = self.sock.makefile("rb")

    def post(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        return _response(self.stream)

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


class FastConnection(Connection):
    """The device side through pyOpenSSL: the OpenSSL of the cryptography
    wheel (4.x), whose handshake costs the client about half of what the
    system OpenSSL 3.0 behind Python's ``ssl`` costs, so more of the
    shared CPUs are left to the daemon.  Verifies the gateway's chain
    against the CA (the name is not checked: the benchmark knows whom it
    talks to)."""

    def __init__(self, context: Any, port: int, host: str = HOST) -> None:
        from OpenSSL import SSL

        raw = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # pyOpenSSL needs a blocking socket; the kernel keeps the timeout.
        raw.settimeout(None)
        limit = struct.pack("ll", int(REQUEST_TIMEOUT), 0)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.sock = SSL.Connection(context, raw)
        self.sock.set_tlsext_host_name(b"localhost")
        self.sock.set_connect_state()
        self.sock.do_handshake()
        self.raw = raw
        self.stream = _TLSReader(self.sock)

    def close(self) -> None:
        self.raw.close()


def client_process(job: dict[str, Any], out: Any) -> None:
    """Runs ``job["threads"]`` simulated devices; sends back latencies and errors."""
    if job.get("cpus"):
        os.sched_setaffinity(0, set(job["cpus"]))
    from OpenSSL.SSL import Error as TLSError
    port, mode = job["port"], job["mode"]
    started = time.time()
    deadline = started + job["seconds"]
    budget = iter(range(job["count"]))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def device(spec: dict[str, Any]) -> None:
        cert = spec.get("cert")
        fast = job.get("client_tls", "pyopenssl") == "pyopenssl"
        context = (_fast_context if fast else _context)(job["root"], cert, spec.get("key"))
        connect = FastConnection if fast else Connection
        basic = mode.startswith("basic")
        path = "/.well-known/est/simpleenroll" if basic else "/.well-known/est/simplereenroll"
        keep = mode == "ra"
        requests = [_request(path, body, auth, keep) for body, auth in spec["requests"]]
        connection = None
        n = 0
        while time.time() < deadline:
            with lock:
                if next(budget, None) is None:
                    break
            started = time.perf_counter()
            try:
                if connection is None:
                    connection = connect(context, port, job["host"])
                code, body = connection.post(requests[n % len(requests)])
                n += 1
                failure = "" if code == 200 else f"HTTP {code}: {body[:160]!r}"
                if not keep:
                    connection.close()
                    connection = None
            except (OSError, ValueError, TLSError) as e:
                failure = repr(e)
                if connection is not None:
                    connection.close()
                connection = None
            elapsed = time.perf_counter() - started
            with lock:
                if failure:
                    errors.append(failure)
                else:
                    latencies.append(elapsed)
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=device, args=(spec,)) for spec in job["devices"]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    used = os.times()
    out.send((latencies, errors, started, time.time(), used.user + used.system))
    out.close()


def run_load(port: int, root: str, mode: str, devices: list[dict[str, Any]], clients: int,
             count: int, seconds: float, host: str = HOST,
             client_tls: str = "pyopenssl",
             client_cpus: set[int] | None = None) -> tuple[list[float], list[str], float, float]:
    """Spread ``devices`` over ``clients`` processes; (latencies, errors, wall
    seconds, the client processes' CPU seconds)."""
    clients = max(1, min(clients, len(devices)))
    per = [devices[i::clients] for i in range(clients)]
    counts = [count // clients + (1 if i < count % clients else 0) for i in range(clients)]
    # spawn, not fork: the parent ran ssl in threads, and a forked child
    # can inherit a lock another thread held (OpenSSL then hangs).
    context = multiprocessing.get_context("spawn")
    pipes, processes = [], []
    for share, n in zip(per, counts):
        job = {"port": port, "host": host, "root": root, "mode": mode, "devices": share, "count": n,
               "seconds": seconds, "client_tls": client_tls, "cpus": sorted(client_cpus or ())}
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=client_process, args=(job, send))
        process.start()
        send.close()
        pipes.append(receive)
        processes.append(process)
    latencies: list[float] = []
    errors: list[str] = []
    starts, ends = [], []
    cpu = 0.0
    for receive in pipes:
        got_latencies, got_errors, start, end, got_cpu = receive.recv()
        cpu += got_cpu
        latencies += got_latencies
        errors += got_errors
        starts.append(start)
        ends.append(end)
    # From the first client's start: process start-up is not load time.
    wall = max(ends) - min(starts)
    for process in processes:
        process.join()
    return latencies, errors, wall, cpu


# -- one run ----------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return 1000 * ordered[round(q * (len(ordered) - 1))] if ordered else float("nan")


def enroll_devices(port: int, root: str, directory: str, names: list[str], kind: str,
                   host: str = HOST) -> list[dict[str, Any]]:
    """Each device's first certificate, by simpleenroll with Basic (not timed)."""
    specs: list[dict[str, Any]] = []
    authorization = {n: "Basic " + base64.b64encode(f"{n}:{PASSWORD}".encode()).decode() for n in names}
    context = _context(root, None, None)
    lock = threading.Lock()
    todo = list(names)

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                name = todo.pop()
            key = new_key(kind)
            body = csr_body(key, name)
            connection = Connection(context, port, host)
            try:
                code, answer = connection.post(_request("/.well-known/est/simpleenroll", body,
                                                        authorization[name], False))
            finally:
                connection.close()
            if code != 200:
                raise SystemExit(f"setup enrollment of {name} failed: HTTP {code} {answer[:200]!r}")
            cert_path = os.path.join(directory, f"{name}.pem")
            key_path = os.path.join(directory, f"{name}.key")
            with open(cert_path, "wb") as f:
                f.write(cert_pem_from_pkcs7(answer))
            with open(key_path, "wb") as f:
                f.write(key_pem(key))
            with lock:
                specs.append({"name": name, "cert": cert_path, "key": key_path,
                              "requests": [(body, None)]})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(specs, key=lambda s: s["name"])


def basic_specs(names: list[str], threads: int, kind: str) -> list[dict[str, Any]]:
    """Basic-mode devices: thread i cycles through every threads-th name."""
    key = new_key(kind)  # the key does not matter to the password check
    requests = [(csr_body(key, n), "Basic " + base64.b64encode(f"{n}:{PASSWORD}".encode()).decode())
                for n in names]
    return [{"requests": requests[i::threads]} for i in range(threads) if requests[i::threads]]


def _ca_certificate(config_path: str) -> str:
    sys.path.insert(0, REPO)
    from estgw import config

    return config.load(config_path).ca_certificate_path


def measure(options: argparse.Namespace, directory: str, workers: int) -> list[dict[str, Any]]:
    most = max(options.concurrency)
    # Names of this run: a targeted daemon may know earlier runs' devices.
    prefix = f"bench-{os.getpid()}" if options.target else "bench"
    device_names = [f"{prefix}-{i}" for i in range(most)]
    # One set of basic devices per concurrency: a device seen in an earlier
    # run of the same daemon would hit the password cache, not scrypt.
    basic_names = [f"{prefix}-basic-{i}" for i in range(options.basic_devices * len(options.concurrency))]
    notes: list[str] = []
    if options.target:
        config_path = options.config
        first = not hasattr(options, "enrolled")
    else:
        config_path, notes = write_config(directory, options, workers)
        first = not os.path.exists(os.path.join(directory, "state"))
    if first:
        register(config_path, directory, device_names + basic_names)
    daemon: Daemon
    if options.target:
        host, port = options.target  # (host, port), from _arguments
        daemon = Targeted(host, port, options.pid, options.lag_file)
    else:
        daemon = Daemon(config_path, directory, workers, options.server_cpus)
    rows = []
    try:
        root = _ca_certificate(config_path)
        keys = os.path.join(directory, "keys")
        os.makedirs(keys, exist_ok=True)
        if first:
            options.enrolled = enroll_devices(daemon.port, root, keys, device_names, options.device_key,
                                              daemon.host)
        for note in notes:
            print("note:", note, file=sys.stderr)
        for mode in options.modes:
            for concurrency in options.concurrency:
                if mode == "basic":
                    k = options.concurrency.index(concurrency)
                    fresh = basic_names[k * options.basic_devices:(k + 1) * options.basic_devices]
                    devices = basic_specs(fresh, concurrency, options.device_key)
                    count = min(options.count, len(fresh))
                elif mode == "basic-retry":
                    devices = basic_specs(device_names[:concurrency], concurrency, options.device_key)
                    count = options.count
                else:
                    devices = options.enrolled[:concurrency]
                    count = options.count
                if mode != "basic" and options.warmup:
                    run_load(daemon.port, root, mode, devices, options.clients, options.warmup, options.seconds,
                             daemon.host, options.client_tls, options.client_cpus)
                cpu0, t0, split0 = daemon.cpu_seconds(), time.time(), daemon.cpu_by_process()
                latencies, errors, wall, client_cpu = run_load(daemon.port, root, mode, devices, options.clients,
                                                   count, options.seconds, daemon.host, options.client_tls,
                                                   options.client_cpus)
                cpu = daemon.cpu_seconds() - cpu0
                done = len(latencies)
                split = _split_ms(split0, daemon.cpu_by_process(), daemon.pid, done)
                rows.append({
                    "workers": workers, "mode": mode, "concurrency": concurrency, "enrollments": done,
                    "errors": len(errors), "first_error": errors[0] if errors else "",
                    "rate": done / wall if wall else 0.0,
                    "p50": percentile_ms(latencies, 0.5), "p90": percentile_ms(latencies, 0.9),
                    "p99": percentile_ms(latencies, 0.99),
                    "cpu_ms": 1000 * cpu / done if done else float("nan"),
                    "lag_ms": daemon.lag_ms(t0, time.time()),
                    "client_cpu_ms": 1000 * client_cpu / done if done else float("nan"),
                    "cpu_split": split,
                })
                print(format_row(rows[-1]), file=sys.stderr)
        rows_rss = daemon.peak_rss_mib()
        for row in rows:
            row["rss_max"], row["rss_sum"] = rows_rss
    finally:
        daemon.stop()
    return rows


def _split_ms(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], main_pid: int,
              done: int) -> str:
    """Each server process's user+system CPU ms per enrollment over a run,
    e.g. ``main 0.10+0.02 w1 1.2+0.3``: where the CPU goes."""
    if not done:
        return ""
    parts = []
    for n, pid in enumerate(sorted(after, key=lambda p: (p != main_pid, p))):
        user = after[pid][0] - before.get(pid, (0.0, 0.0))[0]
        system = after[pid][1] - before.get(pid, (0.0, 0.0))[1]
        name = "main" if pid == main_pid else f"w{n}"
        parts.append(f"{name} {1000 * user / done:.2f}+{1000 * system / done:.2f}")
    return " ".join(parts)


# -- report -----------------------------------------------------------------------

HEADER = (f"{'workers':>7} {'mode':<11} {'conc':>4} {'enroll':>6} {'errors':>6} {'enroll/s':>8} "
          f"{'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'CPU ms/enr':>10} {'max lag ms':>10}")


def format_row(r: dict[str, Any]) -> str:
    return (f"{r['workers']:>7} {r['mode']:<11} {r['concurrency']:>4} {r['enrollments']:>6} {r['errors']:>6} "
            f"{r['rate']:>8.1f} {r['p50']:>7.1f} {r['p90']:>7.1f} {r['p99']:>7.1f} {r['cpu_ms']:>10.2f} "
            f"{r['lag_ms']:>10.1f}")


def medians(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workers, mode, concurrency): the median of each figure
    over the rounds (the errors summed, the lag the largest)."""
    groups: dict[tuple[int, str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["workers"], row["mode"], row["concurrency"]), []).append(row)
    out = []
    for same in groups.values():
        merged = dict(same[0])
        for key in ("enrollments", "rate", "p50", "p90", "p99", "cpu_ms", "client_cpu_ms"):
            merged[key] = statistics.median(r[key] for r in same)
        merged["errors"] = sum(r["errors"] for r in same)
        merged["lag_ms"] = max(r["lag_ms"] for r in same)
        out.append(merged)
    return out


def plot(rows: list[dict[str, Any]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["workers"], row["mode"]), []).append(row)
    for (workers, mode), points in sorted(series.items()):
        points.sort(key=lambda r: r["concurrency"])
        x = [r["concurrency"] for r in points]
        label = f"{mode}, {workers} worker{'s' if workers > 1 else ''}"
        left.plot(x, [r["rate"] for r in points], marker="o", label=label)
        right.plot(x, [r["p99"] for r in points], marker="o", label=label)
    left.set(xlabel="concurrent devices", ylabel="enrollments/s", title="throughput")
    right.set(xlabel="concurrent devices", ylabel="ms", title="p99 latency", yscale="log")
    for axis in (left, right):
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    options = _arguments(sys.argv[1:] if argv is None else argv)
    directory = tempfile.mkdtemp(prefix="estgw-load-")
    rows: list[dict[str, Any]] = []
    try:
        # Rounds in turn (1, 2, 1, 2 workers...): on a shared machine the
        # CPU figure drifts over minutes, and the comparison must not.
        for _round in range(options.repeat):
            for workers in options.workers:
                # One state directory for every run: the same CA and devices.
                rows += measure(options, directory, workers)
    finally:
        if options.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            subprocess.run(["rm", "-rf", directory], check=False)
    import cryptography

    title = (f"estgw load: CA {options.ca_key}, TLS {options.tls_key}, devices {options.device_key}; "
             f"{os.cpu_count()} CPUs, Python {platform.python_version()}, "
             f"cryptography {cryptography.__version__}, {options.clients} client processes ({options.client_tls})"
             + (f"; daemon on CPU {','.join(map(str, sorted(options.server_cpus)))}" if options.server_cpus else "")
             + (f"; load generator on CPU {','.join(map(str, sorted(options.client_cpus)))}"
                if options.client_cpus else ""))
    print(title)
    print(HEADER)
    for row in rows:
        print(format_row(row))
    if options.repeat > 1:
        print(f"medians of {options.repeat} rounds:")
        for row in medians(rows):
            print(format_row(row))
    for workers in options.workers:
        row = next(r for r in rows if r["workers"] == workers)
        print(f"daemon peak RSS (VmHWM), {workers} worker(s): {row['rss_max']:.1f} MiB largest process, "
              f"{row['rss_sum']:.1f} MiB all processes")
    print("server CPU ms per enrollment by process, user+system: "
          + "; ".join(f"{r['workers']}/{r['mode']}/{r['concurrency']} {r['cpu_split']}" for r in rows))
    shared = not (options.server_cpus and options.client_cpus and not options.server_cpus & options.client_cpus)
    print("load generator CPU ms per enrollment"
          + (" (its processes share the CPUs with the daemon): " if shared else ": ")
          + ", ".join(f"{r['workers']}/{r['mode']}/{r['concurrency']} {r['client_cpu_ms']:.2f}" for r in rows))
    for row in rows:
        if row["first_error"]:
            print(f"first error, {row['mode']} at {row['concurrency']}: {row['first_error']}")
    if options.plot:
        plot(rows, options.plot, title)
        print(f"plot: {options.plot}")
    if options.json:
        with open(options.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
