"""Crash safety: SIGKILL the real daemon during enrollments (bench/crash_safety.py).

Every certificate a client received is in the store afterwards, the store
opens with integrity_check ok in WAL mode, and no row is half-written; the
store's connections commit with synchronous=FULL, so a committed (and so
possibly sent) certificate also survives a power cut, not only a kill.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sqlite3
import sys

from twisted.internet import threads
from twisted.trial import unittest

from estgw.testing import RunningGateway

_BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def _bench_module(name: str):
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)
    spec = importlib.util.spec_from_file_location(name, os.path.join(_BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


crash_safety = _bench_module("crash_safety")


class KillTests(unittest.TestCase):
    timeout = 600

    async def test_sigkill_during_enrollments_loses_nothing(self) -> None:
        """Two SIGKILLs with four clients enrolling; then a clean restart."""
        out = io.StringIO()
        directory = os.path.abspath(self.mktemp())
        summary = await threads.deferToThread(crash_safety.run, directory, 2, 4, 6, out)
        self.assertEqual(len(summary["rounds"]), 2, out.getvalue())
        # Each kill came after at least 6 certificates of its round, all in the store.
        self.assertGreaterEqual(summary["rounds"][-1]["received"], 12)
        # The enrollment after the restart was recorded too.
        self.assertEqual(summary["final"]["stored"], summary["rounds"][-1]["stored"] + 1)
        self.assertIn("all in the store", out.getvalue())


class CheckTests(unittest.TestCase):
    """The checks themselves find what they look for."""

    def setUp(self) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.serialization import Encoding
        import datetime

        from estgw.testing import name, new_key

        self.ca_key = new_key("ec")
        self.ca = (
            x509.CertificateBuilder().subject_name(name("ca")).issuer_name(name("ca"))
            .public_key(self.ca_key.public_key()).serial_number(1)
            .not_valid_before(datetime.datetime(2020, 1, 1)).not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(self.ca_key, hashes.SHA256())
        )
        self.leaf = (
            x509.CertificateBuilder().subject_name(name("leaf")).issuer_name(name("ca"))
            .public_key(new_key("ec").public_key()).serial_number(0xABC)
            .not_valid_before(datetime.datetime(2020, 1, 1)).not_valid_after(datetime.datetime(2040, 1, 1))
            .sign(self.ca_key, hashes.SHA256())
        )
        self.der = self.leaf.public_bytes(Encoding.DER)
        self.path = os.path.abspath(self.mktemp())
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("CREATE TABLE certificates (serial TEXT, der BLOB)")
        connection.commit()
        connection.close()

    def _insert(self, serial: str, der: bytes) -> None:
        connection = sqlite3.connect(self.path)
        connection.execute("INSERT INTO certificates VALUES (?, ?)", (serial, der))
        connection.commit()
        connection.close()

    def test_good(self) -> None:
        self._insert("abc", self.der)
        counts = crash_safety.check_store(self.path, {self.der: self.leaf}, self.ca)
        self.assertEqual(counts, {"stored": 1, "received": 1, "not_received": 0})

    def test_a_received_certificate_missing(self) -> None:
        with self.assertRaisesRegex(crash_safety.CrashSafetyError, "not in the store: abc"):
            crash_safety.check_store(self.path, {self.der: self.leaf}, self.ca)

    def test_a_truncated_certificate(self) -> None:
        self._insert("abc", self.der[:-10])
        with self.assertRaisesRegex(crash_safety.CrashSafetyError, "abc in the store is damaged"):
            crash_safety.check_store(self.path, {}, self.ca)

    def test_a_row_with_another_serial(self) -> None:
        self._insert("abd", self.der)
        with self.assertRaisesRegex(crash_safety.CrashSafetyError, "row serial abd"):
            crash_safety.check_store(self.path, {}, self.ca)

    def test_not_wal(self) -> None:
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA journal_mode=DELETE")
        connection.close()
        with self.assertRaisesRegex(crash_safety.CrashSafetyError, "journal_mode is delete"):
            crash_safety.check_store(self.path, {}, self.ca)


class PragmaTests(unittest.TestCase):
    async def test_store_connection_is_wal_and_synchronous_full(self) -> None:
        """synchronous=FULL in WAL mode: each commit is fsynced to the WAL
        before the certificate can be sent, so a power cut cannot take
        back a certificate a device already holds (with NORMAL it could;
        a process kill loses nothing either way)."""
        gateway = await RunningGateway.start(self)

        def pragmas(txn: object) -> tuple[str, int]:
            txn.execute("PRAGMA journal_mode")
            mode = txn.fetchone()[0]
            txn.execute("PRAGMA synchronous")
            return mode, txn.fetchone()[0]

        mode, synchronous = await gateway.store._run(pragmas)
        self.assertEqual((mode, synchronous), ("wal", 2))  # 2 is FULL
        # The mode is in the file: the CLI and any other reader see it too.
        with open(gateway.store.path, "rb") as f:
            header = f.read(20)
        self.assertEqual(header[18:20], b"\x02\x02")  # WAL read/write versions
