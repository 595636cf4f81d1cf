"""What relying parties need to check revocation: CRLs and OCSP responses.

For the CAs whose keys the gateway holds (``local`` and ``file`` token
procedures), signed from the store's revocations: a CRL (RFC 5280 5) at
``/crl/<token procedure name, URL-encoded>.crl`` and an OCSP responder
(RFC 6960) at ``/ocsp/<same>`` on a plain-HTTP listener of its own
(``publish.port``).
"""

from __future__ import annotations

from typing import Any

from estgw.ca.signing import RevokedEntry, SigningCA


async def revoked_entries(store: Any, ca: SigningCA) -> list[RevokedEntry]:
    """The store's revoked certificates that ``ca`` issued, as CRL entries."""
    entries = []
    for issued in await store.list_certificates():
        if issued.revoked_at is None or not ca.issued(issued.certificate):
            continue
        entries.append(
            RevokedEntry(issued.serial, issued.revoked_at, issued.revocation_reason, issued.invalidity_date)
        )
    return entries
