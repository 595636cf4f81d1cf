"""The SQLite backend: one file, no server (``store.url = sqlite:PATH``)."""

from __future__ import annotations

import os
import pathlib
import sqlite3
import time
from typing import Any

from twisted.enterprise import adbapi

from twisted.internet.defer import Deferred

from estgw.store import FAULT_FULL, FAULT_LOCKED, FAULT_OTHER, FAULT_READ_ONLY
from estgw.store.sql import _SQLStore

#: SQLite's primary result codes (its extended codes start with them) and
#: what each says failed, naming no file.
_FAULTS = {
    "SQLITE_BUSY": FAULT_LOCKED,
    "SQLITE_LOCKED": FAULT_LOCKED,
    "SQLITE_READONLY": FAULT_READ_ONLY,
    "SQLITE_FULL": FAULT_FULL,
    "SQLITE_CANTOPEN": "the database file cannot be opened",
    "SQLITE_PERM": "the database file cannot be opened",
    "SQLITE_IOERR": "an I/O error on the database file",
    "SQLITE_CORRUPT": "the database file is damaged",
    "SQLITE_NOTADB": "the database file is damaged",
}


def enable_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL`` on a new connection.  The switch takes an
    exclusive lock that SQLite's busy timeout does not wait for, so
    processes opening one file at once retry (for up to five seconds, on
    the pool's thread) instead of failing to start.  Every SQLite file of
    estgw (store, approval service) opens this way."""
    for attempt in range(50):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == 49:
                raise
            time.sleep(0.1)


class SQLiteStore(_SQLStore):
    """
    :class:`IStore` in one SQLite file, through one pooled connection
    (SQLite serialises writers anyway).  WAL journal so readers in other
    processes (the CLI) do not block the gateway; ``synchronous=FULL`` so a
    committed certificate survives a power cut.

    ``path`` must be a file: ``":memory:"`` would give every pool
    connection its own empty database.
    """

    def __init__(self, path: str, reactor: Any = None) -> None:
        if path == ":memory:" or path.startswith("file::memory:"):
            raise ValueError("SQLiteStore needs a file path, not an in-memory database")
        super().__init__(reactor)
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    def _fault(self, error: Exception) -> str:
        name = getattr(error, "sqlite_errorname", None) or ""
        primary = "_".join(name.split("_")[:2])
        return _FAULTS.get(primary, FAULT_OTHER)

    @staticmethod
    def _open(connection: Any) -> None:
        # Per connection: PRAGMAs are not stored in the file (except
        # journal_mode, which is set again harmlessly).
        cursor = connection.cursor()
        enable_wal(cursor)
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    def _make_pool(self) -> adbapi.ConnectionPool:
        return adbapi.ConnectionPool(
            "sqlite3",
            self.path,
            check_same_thread=False,  # the pool closes it from the reactor thread
            cp_min=1,
            cp_max=1,
            cp_openfun=self._open,
            cp_reactor=self._reactor,
            # A connection that failed is replaced by a new one for the next call.
            cp_reconnect=True,
        )

    def check_writable(self, seconds: float = 1.0) -> Deferred[None]:
        """Take SQLite's write lock (``BEGIN IMMEDIATE``) on a connection of
        its own, waiting at most ``seconds`` for another connection's,
        and let it go: what a write would meet now.  Run in the store's
        thread, after the work queued there; the file must exist."""
        uri = pathlib.Path(os.path.abspath(self.path)).as_uri() + "?mode=rw"

        def probe(txn: Any) -> None:
            connection = sqlite3.connect(uri, uri=True, timeout=seconds, isolation_level=None)
            try:
                connection.execute("BEGIN IMMEDIATE")
                connection.execute("ROLLBACK")
            finally:
                connection.close()

        return self._run(probe)
