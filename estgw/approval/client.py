"""The gateway's client of an approval service (docs/approval-api.rst).

Two calls: :meth:`ApprovalClient.submit` (POST the request to
``idm.requestUrl``; idempotent, keyed by the gateway's request id) and
:meth:`ApprovalClient.status` (GET ``<requestUrl>/<request id>``).  The
HTTP client and the clock are parameters, so tests pass
``treq.testing.StubTreq`` and ``task.Clock``.

Whatever goes wrong (no connection, TLS failure, no answer within the
timeout, a 5xx, an answer that is not the documented JSON) is one
exception, :class:`ApprovalUnavailable`, with a short reason.  After a
failure the client backs off: calls within the backoff window fail at
once without touching the network, and the window doubles up to
``max_backoff`` so a service that is down is not hammered by every
device's retry.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any
from urllib.parse import quote

import attr
from OpenSSL import SSL
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["ApprovalClient", "ApprovalStatus", "ApprovalUnavailable", "Submission", "STATUSES"]

#: What a service may say about a request.
STATUSES = ("pending", "approved", "rejected", "expired")


class ApprovalUnavailable(Exception):
    """The approval service could not be asked, or gave no usable answer."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attr.s(frozen=True, auto_attribs=True)
class Submission:
    """What the gateway submits (the JSON body of the POST)."""

    request_id: str
    handler: str
    subject: str
    public_key_sha256: str
    requester: str
    csr_pem: str
    expires_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "requestId": self.request_id,
            "handler": self.handler,
            "subject": self.subject,
            "publicKeySha256": self.public_key_sha256,
            "requester": self.requester,
            "csr": self.csr_pem,
            "expiresAt": self.expires_at.isoformat(),
        }


@attr.s(frozen=True, auto_attribs=True)
class ApprovalStatus:
    """The service's answer: where a request stands."""

    request_id: str
    status: str  # one of STATUSES
    reason: str | None = None
    decided_by: str | None = None

    @classmethod
    def from_json(cls, data: Any, request_id: str) -> ApprovalStatus:
        """Parse a status object; ApprovalUnavailable when it is not one."""
        if not isinstance(data, dict):
            raise ApprovalUnavailable("the answer is not a JSON object")
        status = data.get("status")
        if status not in STATUSES:
            raise ApprovalUnavailable(f"the answer has no known status: {str(status)[:40]!r}")
        if data.get("requestId") != request_id:
            raise ApprovalUnavailable("the answer is about another request")
        reason = data.get("reason")
        decided_by = data.get("decidedBy")
        return cls(
            request_id=request_id,
            status=status,
            reason=reason if isinstance(reason, str) else None,
            decided_by=decided_by if isinstance(decided_by, str) else None,
        )


def describe_failure(error: BaseException) -> str:
    """A short reason for a failed HTTP exchange."""
    reasons = getattr(error, "reasons", None)  # ResponseFailed and its kin wrap failures
    if isinstance(reasons, list) and reasons and hasattr(reasons[0], "value"):
        return describe_failure(reasons[0].value)
    if isinstance(error, SSL.Error):
        # args[0]: [(library, function, reason), ...] from OpenSSL's error queue
        details = [str(e[-1]) for e in (error.args[0] if error.args else []) if isinstance(e, tuple)]
        return "TLS failure: " + ("; ".join(details) or "handshake failed")
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class ApprovalClient:
    """Submit to and poll one approval service URL."""

    _log = Logger()

    def __init__(
        self,
        request_url: str,
        http: Any,
        clock: Any,
        timeout: float = 10.0,
        max_backoff: float = 60.0,
        min_backoff: float = 1.0,
    ) -> None:
        self.request_url = request_url.rstrip("/")
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._min_backoff = min(min_backoff, max_backoff)
        self._max_backoff = max_backoff
        self._backoff = 0.0  # the current window; 0 when the last call worked
        self._retry_at = 0.0
        self._last_failure = ""

    def status_url(self, request_id: str) -> str:
        return f"{self.request_url}/{quote(request_id, safe='')}"

    # -- the two calls

    def submit(self, submission: Submission) -> Deferred[ApprovalStatus]:
        """POST the request; fires with its status (pending, or already decided)."""

        async def call() -> ApprovalStatus:
            code, body = await self._exchange("POST", self.request_url, submission.to_json())
            if code not in (200, 201):
                raise ApprovalUnavailable(_unexpected(code, body))
            return ApprovalStatus.from_json(_json(body), submission.request_id)

        return self._guarded(call)

    def status(self, request_id: str) -> Deferred[ApprovalStatus | None]:
        """GET the request's status; None when the service does not know it."""

        async def call() -> ApprovalStatus | None:
            code, body = await self._exchange("GET", self.status_url(request_id), None)
            if code == 404:
                return None
            if code != 200:
                raise ApprovalUnavailable(_unexpected(code, body))
            return ApprovalStatus.from_json(_json(body), request_id)

        return self._guarded(call)

    # -- plumbing

    def seconds_until_retry(self) -> float:
        return max(0.0, self._retry_at - self._clock.seconds())

    def _guarded(self, call: Any) -> Deferred[Any]:
        """Backoff before, timeout around, bookkeeping after one call."""
        wait = self.seconds_until_retry()
        if wait > 0:
            return defer.fail(
                ApprovalUnavailable(f"{self._last_failure} (not asking again for {wait:.0f} s)")
            )
        d = Deferred.fromCoroutine(call())
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(self._timeout, expire)

        def stop_timer(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        d.addCallbacks(self._worked, lambda failure: self._failed(failure, bool(timed_out)))
        return d

    def _worked(self, result: Any) -> Any:
        self._backoff = 0.0
        self._retry_at = 0.0
        return result

    def _failed(self, failure: Any, timed_out: bool) -> Any:
        # A cancelled request surfaces as CancelledError or wrapped in
        # ResponseNeverReceived, depending on how far it got.
        if timed_out:
            reason = f"no answer within {self._timeout:g} s"
        elif failure.check(ApprovalUnavailable):
            reason = failure.value.reason
        else:
            reason = describe_failure(failure.value)
        self._backoff = min(max(self._backoff * 2, self._min_backoff), self._max_backoff)
        self._retry_at = self._clock.seconds() + self._backoff
        self._last_failure = reason
        self._log.warn(
            "approval service {url} unavailable: {reason}; backing off {backoff:g} s",
            url=self.request_url,
            reason=reason,
            backoff=self._backoff,
        )
        raise ApprovalUnavailable(reason)

    async def _exchange(self, method: str, url: str, body: Any) -> tuple[int, bytes]:
        kwargs: dict[str, Any] = {"headers": {b"Accept": [b"application/json"]}}
        if body is not None:
            kwargs["json"] = body
        response = await self._http.request(method, url, **kwargs)
        return response.code, await response.content()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ApprovalUnavailable("the answer is not JSON") from None


def _unexpected(code: int, body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    try:
        error = json.loads(text).get("error")
        text = error if isinstance(error, str) else text
    except (ValueError, AttributeError):
        pass
    return f"HTTP {code}" + (f": {text[:120]}" if text else "")
