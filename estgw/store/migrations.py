"""The schema: one list of migrations that every backend applies.

:data:`MIGRATIONS` lists ``(version, [sql...])`` steps, each applied in its
own transaction together with the bump of the single-row ``schema_version``
table (:meth:`estgw.store.sql._SQLStore.start`).  To change the schema,
append a step; never edit one that has shipped.

The SQL is a portable subset that SQLite and PostgreSQL both run: values
as TEXT (timestamps as fixed-width ISO 8601 UTC, serials as hex, SANs as
a JSON list), booleans as 0/1 INTEGER, partial indexes.  The few DDL words
that differ are ``{placeholders}`` filled from the backend's ``ddl_words``.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """
            CREATE TABLE certificates (
                id {autoincrement_primary_key},
                serial TEXT NOT NULL UNIQUE,
                subject TEXT NOT NULL,
                sans TEXT NOT NULL,
                not_before TEXT NOT NULL,
                not_after TEXT NOT NULL,
                public_key_sha256 TEXT NOT NULL,
                handler TEXT NOT NULL,
                requester TEXT NOT NULL,
                der {blob} NOT NULL,
                issued_at TEXT NOT NULL,
                revoked_at TEXT,
                revocation_reason TEXT
            )
            """,
            # Leading subject: serves lookups by subject, and the ordering
            # of last_issued_for_subject without a sort.
            "CREATE INDEX certificates_subject ON certificates (subject, issued_at, id)",
            # For "is this key already certified?" checks (rekey policy).
            "CREATE INDEX certificates_public_key ON certificates (public_key_sha256)",
            """
            CREATE TABLE devices (
                device_id TEXT PRIMARY KEY,
                password_hash TEXT,
                single_use INTEGER NOT NULL,
                created_at TEXT NOT NULL,
                consumed_at TEXT
            )
            """,
        ],
    ),
    (
        2,
        [
            # Factory (authentication) certificates: the SHA-256 of the DER,
            # the commonName a CSR must carry, expected subject values
            # (JSON object) and per-realm HTTP Digest H(A1) (JSON object).
            "ALTER TABLE devices ADD COLUMN factory_cert_sha256 TEXT",
            "ALTER TABLE devices ADD COLUMN factory_cn TEXT",
            "ALTER TABLE devices ADD COLUMN subject_values TEXT",
            "ALTER TABLE devices ADD COLUMN digest_ha1 TEXT",
            # NULLs do not collide in a unique index (SQLite, PostgreSQL).
            "CREATE UNIQUE INDEX devices_factory_cert ON devices (factory_cert_sha256)",
            # Officer/RA roles, keyed by the SHA-256 of the certificate's DER.
            """
            CREATE TABLE officer_roles (
                fingerprint TEXT NOT NULL,
                role TEXT NOT NULL,
                subject TEXT NOT NULL,
                issuer TEXT NOT NULL,
                serial TEXT NOT NULL,
                granted_at TEXT NOT NULL,
                PRIMARY KEY (fingerprint, role)
            )
            """,
        ],
    ),
    (
        3,
        [
            # Requests waiting for an operator's approval.
            """
            CREATE TABLE approvals (
                id {autoincrement_primary_key},
                request_id TEXT NOT NULL UNIQUE,
                handler TEXT NOT NULL,
                public_key_sha256 TEXT NOT NULL,
                subject TEXT NOT NULL,
                requester TEXT NOT NULL,
                csr {blob} NOT NULL,
                state TEXT NOT NULL,
                created_at TEXT NOT NULL,
                expires_at TEXT NOT NULL,
                submitted_at TEXT,
                decided_at TEXT,
                reason TEXT,
                serial TEXT
            )
            """,
            # Retries find their request by key, newest first.
            "CREATE INDEX approvals_key ON approvals (handler, public_key_sha256, subject, id)",
            # One live request per key, even with several gateway processes.
            "CREATE UNIQUE INDEX approvals_live ON approvals (handler, public_key_sha256, subject)"
            " WHERE state IN ('pending', 'approved')",
        ],
    ),
    (
        4,
        [
            # RFC 5280 5.3.2 invalidity date of a revocation, for CRLs and OCSP.
            "ALTER TABLE certificates ADD COLUMN invalidity_date TEXT",
        ],
    ),
    (
        5,
        [
            # Operator actions (estgw.audit.operator_action): who, what, when.
            """
            CREATE TABLE audit (
                id {autoincrement_primary_key},
                at TEXT NOT NULL,
                operator TEXT NOT NULL,
                action TEXT NOT NULL,
                target TEXT NOT NULL,
                details TEXT NOT NULL
            )
            """,
        ],
    ),
    (
        6,
        [
            # `estgw cert list` pages newest first by (issued_at, id)
            # without sorting the table.
            "CREATE INDEX certificates_issued ON certificates (issued_at, id)",
            # `estgw crl write` reads only the revoked rows, in the same
            # order: a partial index holds only them.
            "CREATE INDEX certificates_revoked ON certificates (issued_at, id)"
            " WHERE revoked_at IS NOT NULL",
            # Certificates of one key newest first (the single-use refetch)
            # straight from the index, without a sort.
            "DROP INDEX certificates_public_key",
            "CREATE INDEX certificates_public_key ON certificates (public_key_sha256, issued_at, id)",
        ],
    ),
    (
        7,
        [
            # HTTP Digest replay protection (RFC 7616 §3.4): the highest
            # nonce count a correct response used with each nonce, kept
            # until the nonce expires.  In the store, so that every gateway
            # process and machine on it refuses a response used once.  nc
            # goes up to 2**32 - 1: BIGINT, since PostgreSQL's INTEGER is
            # 32-bit signed.
            """
            CREATE TABLE digest_nonce (
                nonce TEXT PRIMARY KEY,
                nc BIGINT NOT NULL,
                expires_at TEXT NOT NULL
            )
            """,
            # The removal of expired records reads them oldest first.
            "CREATE INDEX digest_nonce_expires ON digest_nonce (expires_at)",
        ],
    ),
]

#: Every table of the schema and the columns that order its rows: how
#: `estgw store migrate` pages through a store (keyset, not OFFSET), and
#: the list of what it copies.  A table added by a migration goes here too
#: (a test checks that every table of the schema is listed).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "certificates": ("id",),
    "devices": ("device_id",),
    "officer_roles": ("fingerprint", "role"),
    "approvals": ("id",),
    "audit": ("id",),
    "digest_nonce": ("nonce",),
}

#: Tables whose ``id`` the database assigns: copied ids are kept (so the
#: insertion order that breaks ties survives), and the backend moves its
#: id generator past them.
GENERATED_IDS: tuple[str, ...] = ("certificates", "approvals", "audit")
