"""The one exception every check raises to turn a request away.

A :class:`Refusal` carries the HTTP status, a stable machine-readable
``code`` (used in the audit log and metrics) and the one-line ``reason``
the client sees in the response body.  The web layer turns it into a
response in exactly one place (:mod:`estgw.web`).
"""

from __future__ import annotations

from typing import Mapping


class Refusal(Exception):
    """A request was refused; nothing is issued."""

    event = "refused"  # the audit log's word for it

    def __init__(
        self,
        status: int,
        code: str,
        reason: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status, code, reason)
        self.status = status
        self.code = code
        self.reason = reason
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r}, {self.reason!r})"

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.reason}"


class Pending(Refusal):
    """Not refused, not yet granted: 202 + Retry-After (an operator must
    approve first, RFC 7030 §4.2.3).  Logged as pending, not refused."""

    event = "pending"

    def __init__(self, code: str, reason: str, retry_after: int) -> None:
        super().__init__(202, code, reason, {"Retry-After": str(int(retry_after))})
        self.retry_after = int(retry_after)


def bad_request(code: str, reason: str) -> Refusal:
    return Refusal(400, code, reason)


def forbidden(code: str, reason: str) -> Refusal:
    return Refusal(403, code, reason)
