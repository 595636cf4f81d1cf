"""Soak: mixed valid and invalid traffic against the real daemon for a
bounded time, sampling its RSS and open file descriptors.

``--clients`` threads each pick, at random (seeded), one of:

=================  ==========================================================
enroll             simpleenroll, HTTP Basic, a fresh P-256 CSR (200)
renew              simplereenroll with the client's current certificate (200)
cacerts            GET cacerts (200)
csrattrs           GET csrattrs (200)
bad-csr            simpleenroll with a body that is not a CSR (400)
bad-auth           simpleenroll with a wrong password (401)
not-found          GET a path that is not EST (404)
close-mid-body     headers and half the announced body, then close
close-before-tls   TCP connect, then close before the TLS handshake
=================  ==========================================================

Every ``--interval`` seconds the daemon's VmRSS (``/proc/<pid>/status``)
and its open descriptors (``/proc/<pid>/fd``) are printed with the
request count.  At the end: the mean of the first quarter (warm-up) and
of the last quarter, and the change from the second quarter to the last
(what must stay flat once caches, pools and the store are warm).  Any
unexpected status is counted and printed.

Run (a benchmark, not a CI step; the README has figures)::

    .venv/bin/python bench/soak.py --minutes 10 --clients 4
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import Client, Daemon, certificates_of, csr_body, proc_sample  # noqa: E402

PASSWORD = "soak-password"
EXPECTED: dict[str, set[int | None]] = {
    "enroll": {200}, "renew": {200}, "cacerts": {200}, "csrattrs": {200, 204}, "bad-csr": {400},
    "bad-auth": {401}, "not-found": {404}, "close-mid-body": {None}, "close-before-tls": {None},
}
WEIGHTS = {
    "enroll": 3, "renew": 2, "cacerts": 3, "csrattrs": 2, "bad-csr": 2, "bad-auth": 2, "not-found": 1,
    "close-mid-body": 1, "close-before-tls": 1,
}


class Worker:
    """One client thread with its own device and certificate."""

    def __init__(self, daemon: Daemon, number: int, seed: int, counts: collections.Counter[str], lock: threading.Lock) -> None:
        self.daemon = daemon
        self.device = f"soak-{number}"
        self.random = random.Random(seed + number)
        self.counts = counts
        self.lock = lock
        self.unexpected: list[str] = []
        directory = os.path.join(daemon.directory, f"client-{number}")
        os.makedirs(directory, exist_ok=True)
        self.cert_file = os.path.join(directory, "cert.pem")
        self.key_file = os.path.join(directory, "key.pem")
        self.has_certificate = False

    def _enroll(self, client: Client, operation: str) -> tuple[int, bytes]:
        from cryptography.hazmat.primitives.serialization import Encoding

        from estgw.testing import csr_pem, key_pem, make_csr, new_key, write

        key = new_key("ec")
        body = csr_pem(make_csr(key, self.device)).replace(b"-----BEGIN CERTIFICATE REQUEST-----\n", b"")
        body = body.replace(b"-----END CERTIFICATE REQUEST-----\n", b"")
        user = f"{self.device}:{PASSWORD}" if operation == "simpleenroll" else None
        status, response = client.request("POST", operation, body, user=user)
        if status == 200:
            (certificate,) = certificates_of(response)
            write(self.key_file, key_pem(key))
            write(self.cert_file, certificate.public_bytes(Encoding.PEM))
            self.has_certificate = True
        return status, response

    def one(self, kind: str) -> int | None:
        client = Client(self.daemon, timeout=60)
        if kind == "enroll":
            return self._enroll(client, "simpleenroll")[0]
        if kind == "renew":
            if not self.has_certificate:
                return 200 if self._enroll(client, "simpleenroll")[0] == 200 else -1
            client.context.load_cert_chain(self.cert_file, self.key_file)
            return self._enroll(client, "simplereenroll")[0]
        if kind == "cacerts":
            return client.request("GET", "cacerts")[0]
        if kind == "csrattrs":
            return client.request("GET", "csrattrs")[0]
        if kind == "bad-csr":
            garbage = bytes(self.random.randrange(256) for _ in range(self.random.randrange(1, 400)))
            return client.request("POST", "simpleenroll", garbage, user=f"{self.device}:{PASSWORD}")[0]
        if kind == "bad-auth":
            return client.request("POST", "simpleenroll", csr_body(self.device), user=f"{self.device}:wrong")[0]
        if kind == "not-found":
            connection = client.connection()
            try:
                connection.request("GET", "/no/such/path")
                response = connection.getresponse()
                response.read()
                return response.status
            finally:
                connection.close()
        if kind == "close-mid-body":
            connection = client.connection()
            connection.putrequest("POST", "/.well-known/est/simpleenroll")
            connection.putheader("Content-Type", "application/pkcs10")
            connection.putheader("Content-Length", "2000")
            connection.endheaders()
            connection.send(b"MIIB" * 200)
            connection.close()
            return None
        if kind == "close-before-tls":
            socket.create_connection(("127.0.0.1", self.daemon.port), timeout=10).close()
            return None
        raise ValueError(kind)

    def run(self, until: float) -> None:
        kinds = list(WEIGHTS)
        weights = [WEIGHTS[k] for k in kinds]
        while time.monotonic() < until:
            kind = self.random.choices(kinds, weights)[0]
            try:
                status: Any = self.one(kind)
            except Exception as e:
                status = f"{type(e).__name__}: {e}"
            with self.lock:
                self.counts[kind] += 1
                if status not in EXPECTED[kind]:
                    self.counts["unexpected"] += 1
                    if len(self.unexpected) < 10:
                        self.unexpected.append(f"{kind}: {status}")


def soak(directory: str, minutes: float, clients: int, interval: float, seed: int, out: Any = sys.stdout) -> dict[str, Any]:
    daemon = Daemon(directory)
    for argv in (["init"], *(["device", "add", "--password", PASSWORD, f"soak-{n}"] for n in range(clients))):
        result = daemon.cli(*argv)
        if result.returncode:
            raise RuntimeError(f"estgw {' '.join(argv)}: {result.stderr.decode()}")
    daemon.start()
    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    samples: list[tuple[float, int, int, int]] = []
    started = time.monotonic()
    until = started + minutes * 60
    workers = [Worker(daemon, n, seed, counts, lock) for n in range(clients)]
    threads = [threading.Thread(target=w.run, args=(until,), daemon=True) for w in workers]
    print(f"{'seconds':>8} {'requests':>9} {'RSS KiB':>9} {'fds':>5}", file=out, flush=True)
    try:
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            time.sleep(min(interval, max(0.0, until - time.monotonic())))
            rss, fds = proc_sample(daemon.pid)
            elapsed = time.monotonic() - started
            total = sum(v for k, v in counts.items() if k != "unexpected")
            samples.append((elapsed, total, rss, fds))
            print(f"{elapsed:8.0f} {total:9d} {rss:9d} {fds:5d}", file=out, flush=True)
        for thread in threads:
            thread.join(120)
    finally:
        code = daemon.stop()
    quarter = max(1, len(samples) // 4)
    first, second, last = samples[:quarter], samples[quarter:2 * quarter], samples[-quarter:]

    def mean(rows: list[tuple[float, int, int, int]], column: int) -> float:
        return statistics.mean(r[column] for r in rows)

    summary: dict[str, Any] = {
        "requests": sum(v for k, v in counts.items() if k != "unexpected"),
        "counts": dict(counts),
        "unexpected": [u for w in workers for u in w.unexpected],
        "rss_first": mean(first, 2), "rss_second": mean(second, 2), "rss_last": mean(last, 2),
        "fds_first": mean(first, 3), "fds_second": mean(second, 3), "fds_last": mean(last, 3),
        "rss_max": max(s[2] for s in samples), "exit": code, "samples": samples,
    }
    print(
        f"\n{summary['requests']} requests in {minutes:g} min with {clients} clients: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
        file=out,
    )
    print(
        f"RSS KiB  first quarter {summary['rss_first']:.0f}, second {summary['rss_second']:.0f}, "
        f"last {summary['rss_last']:.0f} ({summary['rss_last'] - summary['rss_second']:+.0f} after warm-up), "
        f"max {summary['rss_max']}",
        file=out,
    )
    print(
        f"open fds first quarter {summary['fds_first']:.1f}, second {summary['fds_second']:.1f}, "
        f"last {summary['fds_last']:.1f}",
        file=out,
    )
    if summary["unexpected"]:
        print("unexpected: " + "; ".join(summary["unexpected"]), file=out)
    print(f"twistd exit status on SIGTERM: {code}", file=out, flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0, help="how long (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples (default 5)")
    parser.add_argument("--seed", type=int, default=7030)
    parser.add_argument("--directory", help="state directory (default: a new temporary one)")
    args = parser.parse_args()
    directory = args.directory or tempfile.mkdtemp(prefix="estgw-soak-")
    print(f"estgw soak in {directory}: {args.minutes:g} min, {args.clients} clients")
    summary = soak(directory, args.minutes, args.clients, args.interval, args.seed)
    sys.exit(1 if summary["unexpected"] else 0)


if __name__ == "__main__":
    main()
