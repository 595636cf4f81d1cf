"""How estgw's store behaves as it grows: enrollment queries, cert list, crl write.

Fills a store (SQLite by default, or PostgreSQL) in stages up to N issued
certificates with direct batched inserts into the real schema (a real
certificate's DER in every row, two certificates per subject, 1 % of them
revoked), and at each stage measures:

- the store calls of one enrollment (revocation check, last-issued rule,
  single-use refetch lookup, device lookup, claim and release, recording
  the certificate with the last-issued check): median ms of the set,
  through the real store API and its thread hop;
- ``estgw cert list`` and ``estgw crl write`` run by the real CLI in a
  subprocess: time to the first line, total time, peak RSS (from wait4);
- which index serves each listing query (EXPLAIN).

Prints one table.  Exits 0 when the run completed, whatever the numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing estgw

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, task

from estgw.store import Device, IssuedCertificate, open_store
from estgw.testing import name

# Recent enough that the certificates are valid (and the revoked ones on
# the CRL) whenever the bench runs.
T0 = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=60)
BATCH = 10000
COLUMNS = (
    "serial, subject, sans, not_before, not_after, public_key_sha256,"
    " handler, requester, der, issued_at, revoked_at, revocation_reason"
)


def sample_der(ca_directory: str) -> bytes:
    """One real certificate (P-256, like the shipped config issues), signed
    by the local CA that ``estgw init`` made in ``ca_directory``: the
    revoked rows are then this CA's, and ``crl write`` lists them (each
    one's signature checked, as for a real store)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(os.path.join(ca_directory, "issuing-ca.pem"), "rb") as f:
        issuer = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(ca_directory, "issuing-ca.key"), "rb") as f:
        issuer_key = load_pem_private_key(f.read(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name("dev-0")).issuer_name(issuer.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(T0).not_valid_after(T0 + timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("dev-0")]), critical=False)
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(Encoding.DER)


def rows(start: int, stop: int, der: bytes) -> list[tuple[Any, ...]]:
    out = []
    for i in range(start, stop):
        device = f"dev-{i // 2}"
        issued_at = (T0 + timedelta(milliseconds=i)).isoformat(timespec="microseconds")
        revoked = i % 100 == 50
        out.append((
            format(random.getrandbits(63) | (1 << 63), "x"),
            f"CN={device}",
            f'["DNS:{device}"]',
            T0.isoformat(timespec="microseconds"),
            (T0 + timedelta(days=365)).isoformat(timespec="microseconds"),
            hashlib.sha256(i.to_bytes(8, "big")).hexdigest(),
            "2",
            f"device:{device}",
            der,
            issued_at,
            (T0 + timedelta(days=30)).isoformat(timespec="microseconds") if revoked else None,
            "superseded" if revoked else None,
        ))
    return out


def fill_sqlite(path: str, start: int, stop: int, der: bytes) -> None:
    import sqlite3

    connection = sqlite3.connect(path)
    connection.execute("PRAGMA synchronous=OFF")  # filling only; the gateway uses FULL
    for first in range(start, stop, BATCH):
        connection.executemany(
            f"INSERT INTO certificates ({COLUMNS}) VALUES ({', '.join('?' * 12)})",
            rows(first, min(first + BATCH, stop), der),
        )
        connection.commit()
    connection.close()


def fill_postgresql(url: str, start: int, stop: int, der: bytes) -> None:
    import psycopg

    with psycopg.connect(url) as connection:
        for first in range(start, stop, BATCH):
            with connection.cursor() as cursor:
                with cursor.copy(f"COPY certificates ({COLUMNS}) FROM STDIN") as copy:
                    for row in rows(first, min(first + BATCH, stop), der):
                        copy.write_row(row)
            connection.commit()
        connection.execute("ANALYZE certificates")
        connection.commit()


async def enrollment_queries(store: Any, size: int, rounds: int) -> tuple[float, float]:
    """Median ms of the store calls one renewal makes, for a random device
    of the table: (the reads, the committed writes).  The writes wait for
    an fsync each, so they show the disk more than the table size."""
    reads, writes = [], []
    for r in range(rounds):
        device = f"dev-{random.randrange(max(1, size // 2))}"
        subject = f"CN={device}"
        began = time.perf_counter()
        last = await store.last_issued_for_subject(subject)
        if last is not None:
            await store.is_revoked(last.serial)
        await store.get_device("bench-device")
        await store.certificates_for_public_key(hashlib.sha256(str(r).encode()).hexdigest())
        read = time.perf_counter()
        when = T0 + timedelta(seconds=r)
        await store.consume_device("bench-device", when)
        await store.release_device("bench-device", when)
        if last is not None:
            renewal = IssuedCertificate(
                serial=random.getrandbits(63) | (1 << 63), subject=subject, sans=(f"DNS:{device}",),
                not_before=T0, not_after=T0 + timedelta(days=365),
                public_key_sha256="00" * 32, handler="3", requester=f"cert:{subject}",
                der=last.der, issued_at=datetime.now(timezone.utc),
            )
            await store.record_certificate(renewal, renewing=last.serial)
        reads.append((read - began) * 1000)
        writes.append((time.perf_counter() - read) * 1000)
    return statistics.median(reads), statistics.median(writes)


async def plans(store: Any, postgresql: bool) -> dict[str, str]:
    """The index each listing page uses (the second page: the deep one)."""
    queries = {
        "cert list": "SELECT serial FROM certificates WHERE issued_at <= ? AND (issued_at < ? OR id < ?)"
                     " ORDER BY issued_at DESC, id DESC LIMIT 1000",
        "crl write": "SELECT serial FROM certificates WHERE revoked_at IS NOT NULL"
                     " AND issued_at <= ? AND (issued_at < ? OR id < ?)"
                     " ORDER BY issued_at DESC, id DESC LIMIT 1000",
    }
    middle = (T0 + timedelta(days=1)).isoformat(timespec="microseconds")
    found = {}
    for label, query in queries.items():
        def explain(txn: Any, query: str = query) -> str:
            store._execute(txn, ("EXPLAIN " if postgresql else "EXPLAIN QUERY PLAN ") + query, (middle, middle, 10**12))
            return " / ".join(str(row[-1] if not postgresql else row[0]).strip() for row in txn.fetchall())

        plan = await store._run(explain)
        index = [word for word in plan.replace("(", " ").split() if word.startswith("certificates_")]
        found[label] = index[0] if index else plan[:60]
    return found


def run_cli(config: str, argv: list[str]) -> tuple[float, float, float]:
    """(seconds to the first line, seconds in all, peak RSS MiB) of one
    estgw command, its output read and thrown away."""
    environment = dict(os.environ, PYTHONPATH=REPO)
    began = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "estgw.cli", "--config", config, *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    first_line = time.perf_counter() - began
    for _ in process.stdout:
        pass
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    total = time.perf_counter() - began
    if process.returncode != 0 or not first:
        raise SystemExit(f"estgw {' '.join(argv)} failed: {process.stderr.read().decode() if process.stderr else ''}")
    return first_line, total, usage.ru_maxrss / 1024  # KiB on Linux


async def main(reactor: Any, options: argparse.Namespace) -> None:
    directory = tempfile.mkdtemp(prefix="estgw-growth-")
    try:
        await run(reactor, options, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def run(reactor: Any, options: argparse.Namespace, directory: str) -> None:
    if options.postgresql:
        sys.path.insert(0, REPO)
        from tests import postgresql as test_server

        url = options.url or test_server.server_url()
        if not options.url:
            test_server._admin("DROP DATABASE IF EXISTS estgw_growth")
            test_server._admin("CREATE DATABASE estgw_growth")
            url = test_server._with_database(url, "estgw_growth")
        store_url = url
    else:
        store_url = "sqlite:" + os.path.join(directory, "state", "estgw.sqlite")
        os.makedirs(os.path.join(directory, "state"))
    config = os.path.join(directory, "est.properties")
    with open(config, "w") as f:
        f.write(f"state.directory = state\nstore.url = {store_url}\nserver.interface = 127.0.0.1\n"
                "tokenprocedure.1.name = Bench\ndefault.tokenprocedure = Bench\n"
                "handler.1.operation = simplereenroll\n")
    store = open_store(store_url, reactor)
    await store.start()
    await store.add_device(Device("bench-device", None, single_use=True, created_at=T0))
    # The local CA (and the schema) as an operator would make them.
    subprocess.run([sys.executable, "-m", "estgw.cli", "--config", config, "init"], check=True,
                   stdout=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=REPO))
    der = sample_der(os.path.join(directory, "state", "ca"))
    backend = "PostgreSQL" if options.postgresql else "SQLite"
    print(f"estgw store growth, {backend}; {os.cpu_count()} CPUs; figures of one run\n")
    header = (f"{'certificates':>12} {'fill s':>7} {'reads ms':>8} {'writes ms':>9} | {'cert list: 1st line s':>21}"
              f" {'all s':>6} {'RSS MiB':>7} | {'crl write s':>11} {'RSS MiB':>7} {'revoked':>7} | indexes")
    print(header)
    print("-" * len(header))
    filled = 0
    for size in options.stages:
        began = time.perf_counter()
        await store.close()  # the bench writes directly; the store reopens after
        if options.postgresql:
            fill_postgresql(store_url, filled, size, der)
        else:
            fill_sqlite(store_url[len("sqlite:"):], filled, size, der)
        fill = time.perf_counter() - began
        filled = size
        store = open_store(store_url, reactor)
        await store.start()
        reads_ms, writes_ms = await enrollment_queries(store, size, options.rounds)
        indexes = await plans(store, options.postgresql)
        first, total, rss = run_cli(config, ["cert", "list"])
        _, crl_total, crl_rss = run_cli(config, ["crl", "write", "--out", os.path.join(directory, "crl.pem")])
        with open(os.path.join(directory, "crl.pem"), "rb") as f:
            revoked = len(x509.load_pem_x509_crl(f.read()))
        print(f"{size:>12,} {fill:>7.1f} {reads_ms:>8.2f} {writes_ms:>9.2f} | {first:>21.2f} {total:>6.1f} {rss:>7.0f} |"
              f" {crl_total:>11.1f} {crl_rss:>7.0f} {revoked:>7,} | "
              + ", ".join(f"{k}: {v}" for k, v in indexes.items()), flush=True)
    await store.close()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10_000, 100_000, 1_000_000],
                        help="store sizes to measure at, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--rounds", type=int, default=200, help="enrollment query sets timed per stage")
    parser.add_argument("--postgresql", action="store_true",
                        help="a PostgreSQL store: --url, or a private server as the tests start one")
    parser.add_argument("--url", help="postgresql://... of an empty database to fill (with --postgresql)")
    options = parser.parse_args(argv)
    if options.stages != sorted(options.stages):
        parser.error("--stages must grow")
    return options


if __name__ == "__main__":
    arguments = parse(sys.argv[1:])
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
