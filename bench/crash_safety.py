"""Crash safety: SIGKILL the gateway in the middle of enrollments, restart it,
and check that nothing a client received is missing and nothing is half-written.

Each round starts the real daemon (``twistd -n estgw``, TLS on 127.0.0.1),
runs ``--clients`` concurrent EST clients enrolling as fast as they can
(stdlib ssl, HTTP Basic), and kills the daemon with SIGKILL once
``--kill-after`` certificates have been received in that round, with
requests still in flight.  After each kill, before any restart:

- the SQLite store opens, ``PRAGMA integrity_check`` says ``ok``, and the
  file is in WAL mode;
- every certificate any client received (each 200 response, parsed) is
  in the store, byte for byte;
- every certificate in the store parses, is signed by the issuing CA and
  has the serial its row says (nothing half-written).

Certificates in the store that no client received (issued and recorded,
then the connection died) are counted: the device can fetch them again
and nothing was lost.  After the last round the daemon starts once more,
serves an enrollment, ``estgw cert show`` finds a certificate received
before a kill, and the daemon stops cleanly on SIGTERM.

Run (a benchmark; tests/test_crash_safety.py runs a short one)::

    .venv/bin/python bench/crash_safety.py --rounds 5 --clients 8 --kill-after 20
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from daemon import Client, Daemon, certificates_of, csr_body  # noqa: E402

DEVICE = "crash-device"
PASSWORD = "crash-password"


class CrashSafetyError(AssertionError):
    pass


def check_store(path: str, received: dict[bytes, Any], issuing: Any) -> dict[str, int]:
    """The checks after a kill (see the module docstring); counts."""
    from cryptography import x509

    connection = sqlite3.connect(path, timeout=30)
    try:
        integrity = connection.execute("PRAGMA integrity_check").fetchall()
        if integrity != [("ok",)]:
            raise CrashSafetyError(f"integrity_check: {integrity}")
        mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        if mode.lower() != "wal":
            raise CrashSafetyError(f"journal_mode is {mode}, not wal")
        rows = connection.execute("SELECT serial, der FROM certificates").fetchall()
    finally:
        connection.close()
    stored: set[bytes] = set()
    for serial, der in rows:
        der = bytes(der)
        try:
            certificate = x509.load_der_x509_certificate(der)
            certificate.verify_directly_issued_by(issuing)
        except Exception as e:
            raise CrashSafetyError(f"certificate {serial} in the store is damaged: {e!r}") from None
        if int(serial, 16) != certificate.serial_number:
            raise CrashSafetyError(f"row serial {serial} holds certificate {certificate.serial_number:x}")
        stored.add(der)
    missing = [c for der, c in received.items() if der not in stored]
    if missing:
        raise CrashSafetyError(
            f"{len(missing)} certificates clients received are not in the store: "
            + ", ".join(f"{c.serial_number:x}" for c in missing[:5])
        )
    return {"stored": len(stored), "received": len(received), "not_received": len(stored - set(received))}


def run(directory: str, rounds: int = 3, clients: int = 4, kill_after: int = 10, out: Any = sys.stdout) -> dict[str, Any]:
    """Run the benchmark in ``directory``; a summary, or CrashSafetyError."""
    daemon = Daemon(directory)
    result = daemon.cli("init")
    if result.returncode:
        raise RuntimeError(f"estgw init: {result.stderr.decode()}")
    result = daemon.cli("device", "add", "--password", PASSWORD, DEVICE)
    if result.returncode:
        raise RuntimeError(f"estgw device add: {result.stderr.decode()}")
    received: dict[bytes, Any] = {}
    lock = threading.Lock()
    totals = {"requests": 0, "errors": 0, "refused": 0}
    issuing: Any = None
    summary: dict[str, Any] = {"rounds": []}
    phase = random.Random(7030)
    for number in range(1, rounds + 1):
        daemon.start()
        client = Client(daemon, timeout=30)
        status, body = client.request("GET", "cacerts")
        if status != 200:
            raise CrashSafetyError(f"cacerts: {status}")
        chain = certificates_of(body)
        in_round = [0]
        stop = threading.Event()

        def enroll_loop() -> None:
            nonlocal issuing
            while not stop.is_set():
                try:
                    status, body = client.request("POST", "simpleenroll", csr_body(DEVICE), user=f"{DEVICE}:{PASSWORD}")
                except (OSError, ConnectionError, Exception):
                    with lock:
                        totals["errors"] += 1
                    if stop.is_set():
                        return
                    time.sleep(0.05)
                    continue
                with lock:
                    totals["requests"] += 1
                    if status != 200:
                        totals["refused"] += 1
                        continue
                    (certificate,) = certificates_of(body)
                    received[certificate.public_bytes(_DER)] = certificate
                    in_round[0] += 1
                    if issuing is None:
                        issuing = next(c for c in chain if c.subject == certificate.issuer)

        threads = [threading.Thread(target=enroll_loop, daemon=True) for _ in range(clients)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        deadline = started + 300
        while in_round[0] < kill_after and time.monotonic() < deadline:
            time.sleep(0.01)
        # A varying moment, so kills land in every phase of a request
        # (authentication, signing, commit, writing the response).
        time.sleep(phase.uniform(0, 0.5))
        daemon.kill()  # requests are in flight: every client is in a loop
        stop.set()
        for thread in threads:
            thread.join(60)
        if in_round[0] < kill_after:
            raise CrashSafetyError(f"round {number}: only {in_round[0]} enrollments in 300 s\n{daemon.output.decode()}")
        counts = check_store(daemon.store_path, received, issuing)
        line = (
            f"round {number}: killed at {in_round[0]} certificates in {time.monotonic() - started:.1f} s; "
            f"store {counts['stored']} (received {counts['received']}, issued but not received "
            f"{counts['not_received']}); integrity ok, WAL"
        )
        print(line, file=out, flush=True)
        summary["rounds"].append(counts)
    # After the last kill: it starts, serves, knows the old certificates, stops cleanly.
    daemon.start()
    try:
        client = Client(daemon)
        status, body = client.request("POST", "simpleenroll", csr_body(DEVICE), user=f"{DEVICE}:{PASSWORD}")
        if status != 200:
            raise CrashSafetyError(f"after the restart: {status} {body!r}")
        first = next(iter(received.values()))
        shown = daemon.cli("cert", "show", f"{first.serial_number:x}")
        if shown.returncode or f"{first.serial_number:x}" not in shown.stdout.decode().lower():
            raise CrashSafetyError(f"estgw cert show {first.serial_number:x}: {shown.stdout!r} {shown.stderr!r}")
    finally:
        code = daemon.stop()
    if code not in (0, -15):  # twistd ends on SIGTERM by re-raising it once stopped
        raise CrashSafetyError(f"twistd exited {code} on SIGTERM:\n{daemon.output.decode()}")
    counts = check_store(daemon.store_path, received, issuing)
    summary.update(totals, final=counts)
    print(
        f"total: {totals['requests']} responses, {len(received)} certificates received, all in the store; "
        f"{totals['errors']} requests cut off by the kills; {totals['refused']} refused",
        file=out, flush=True,
    )
    return summary


from cryptography.hazmat.primitives.serialization import Encoding as _Encoding  # noqa: E402

_DER = _Encoding.DER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="kills (default 3)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--kill-after", type=int, default=10, help="certificates per round before the kill (default 10)")
    parser.add_argument("--directory", help="state directory (default: a new temporary one)")
    args = parser.parse_args()
    directory = args.directory or tempfile.mkdtemp(prefix="estgw-crash-")
    print(f"estgw crash safety in {directory}: {args.rounds} rounds, {args.clients} clients, kill after {args.kill_after}")
    try:
        run(directory, args.rounds, args.clients, args.kill_after)
    except CrashSafetyError as e:
        print(f"FAILED: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
