"""Faults of the CA and the store become 503 + Retry-After, never a 500.

* :class:`CAGuard` runs every token procedure call: at most ``ca.maxQueued``
  enrollments wait for or are inside the CA at once (beyond: 503
  ``ca-busy``), each gets ``ca.timeout`` seconds (beyond: 503
  ``ca-timeout``), and a CA that raises gives 503 ``ca-unavailable``.
  A call past ``ca.timeout`` keeps running (a thread in an HSM call
  cannot be stopped); once ``ca.maxOverdue`` of one token procedure's
  calls do, its new enrollments are 503 ``ca-unavailable`` at once, and
  ``/health/ready`` says why (:meth:`CAGuard.unavailable`), until they
  return.
* :func:`as_refusal` maps a failed store (:class:`StoreUnavailable`) to 503
  ``store-unavailable``.

The device is told what failed, in words, never an exception class or a
message of ours meant for the operator (that goes to the log).  Nothing
is recorded when any of these happen: the certificate is recorded after
the CA answered and sent only once recorded (RFC 7030 §4.2.3, 503 with
Retry-After for a server that cannot answer now).
"""

from __future__ import annotations

from typing import Any, Callable

from cryptography import x509
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from estgw.refusal import Refusal
from estgw.store import StoreUnavailable
from estgw.serials import format_serial

# Seconds a device is told to wait after a CA or store fault.
RETRY_AFTER_SECONDS = 30

_log = Logger(namespace="estgw.guard")


def _unavailable(code: str, reason: str) -> Refusal:
    return Refusal(503, code, reason, {"Retry-After": str(RETRY_AFTER_SECONDS)})


def store_refusal() -> Refusal:
    return _unavailable(
        "store-unavailable", "the gateway cannot use its certificate store just now; nothing was issued: retry later"
    )


def as_refusal(error: BaseException) -> Refusal | None:
    """The refusal for a fault outside the request, or None for a bug."""
    if isinstance(error, StoreUnavailable):
        return store_refusal()
    return None


def refusal_for(error: BaseException, metrics: Any, log: Any, where: str) -> Refusal:
    """What a request that failed with ``error`` is answered, on any
    transport: a Refusal as it is, a store fault as 503 (counted and logged
    once, naming ``where``), counted by code when it is a refusal.
    :raises: ``error`` itself when it is a bug (answered 500 / 5.00)."""
    refusal = error if isinstance(error, Refusal) else as_refusal(error)
    if refusal is None:
        raise error
    if not isinstance(error, Refusal):
        metrics.store_error()
        log.error("store unavailable while serving {where}: {why}", where=where, why=str(error))
    if refusal.event == "refused":
        metrics.refusal(refusal.code)
    return refusal


class CAGuard:
    """Bounds and times every call to a token procedure (see module doc).

    ``error`` is called with ``busy``, ``timeout``, ``overdue`` or ``error``
    for each fault (estgw.metrics).  ``in_flight`` counts enrollments not
    yet answered; ``overdue`` (token procedure name -> count) the calls
    still running although their enrollment was answered ``ca-timeout``.
    """

    def __init__(
        self, max_queued: int, timeout: float, clock: Any, error: Callable[[str], None] | None = None,
        max_overdue: int = 4,
    ) -> None:
        self.max_queued = max_queued
        self.timeout = timeout
        self.max_overdue = max_overdue
        self._clock = clock
        self._error = error or (lambda kind: None)
        self.in_flight = 0
        self.overdue: dict[str, int] = {}

    def unavailable(self, procedure: str) -> str | None:
        """Why ``procedure`` takes no new enrollments now (for the log and
        ``/health/ready``), or None: ``ca.maxOverdue`` of its calls still
        run past ``ca.timeout``, each perhaps holding a thread, so more
        would only pile up behind a CA that does not answer."""
        count = self.overdue.get(procedure, 0)
        if count < self.max_overdue:
            return None
        return (
            f"token procedure {procedure}: {count} calls to the CA still run past ca.timeout"
            f" ({self.timeout:g} s; ca.maxOverdue = {self.max_overdue}); enrollments refused until they return"
        )

    async def issue(self, issue: Callable[[], Any], procedure: str = "") -> x509.Certificate:
        """Run ``issue()`` (a token procedure's ``issue(request)``, which
        returns a Deferred or a coroutine) under the limits; raise Refusal 503."""
        if self.in_flight >= self.max_queued:
            self._error("busy")
            _log.warn(
                "token procedure {procedure}: {count} enrollments already wait for the CA (ca.maxQueued)",
                procedure=procedure, count=self.in_flight,
            )
            raise _unavailable("ca-busy", "the CA has too many requests waiting; retry later")
        why = self.unavailable(procedure)
        if why is not None:
            self._error("overdue")
            _log.warn("{why}", why=why)
            raise _unavailable(
                "ca-unavailable", "the CA has not answered earlier requests; nothing was issued: retry later"
            )
        self.in_flight += 1
        try:
            return await self._call(issue, procedure)
        except Refusal:
            raise
        except defer.TimeoutError:
            self._error("timeout")
            _log.warn(
                "token procedure {procedure} did not answer within {seconds:g} s (ca.timeout)",
                procedure=procedure, seconds=self.timeout,
            )
            raise _unavailable(
                "ca-timeout", f"the CA did not answer within {self.timeout:g} seconds; retry later"
            ) from None
        except StoreUnavailable:
            raise
        except Exception as e:
            self._error("error")
            _log.error(
                "token procedure {procedure} failed: {why}", procedure=procedure, why=f"{type(e).__name__}: {e}"
            )
            raise _unavailable("ca-unavailable", "the CA cannot issue certificates just now; retry later") from None
        finally:
            self.in_flight -= 1

    def _call(self, issue: Callable[[], Any], procedure: str) -> defer.Deferred[Any]:
        """``issue()``'s outcome, or TimeoutError after ``timeout`` seconds
        (:func:`answer_within`).  A call past the timeout counts as overdue
        until it returns; what it returns then is dropped (nothing was
        recorded, so nothing is sent)."""
        started = self._clock.seconds()

        def expired() -> None:
            self.overdue[procedure] = self.overdue.get(procedure, 0) + 1

        def returned_late(outcome: Any) -> None:
            left = self.overdue.get(procedure, 1) - 1
            if left > 0:
                self.overdue[procedure] = left
            else:
                self.overdue.pop(procedure, None)
            serial = getattr(outcome, "serial_number", None)
            _log.warn(
                "token procedure {procedure} returned {seconds:.1f} s after it was called, past ca.timeout:"
                " {what} dropped, nothing recorded or sent",
                procedure=procedure, seconds=self._clock.seconds() - started,
                what=f"certificate serial {format_serial(serial)}" if serial is not None else "its answer",
            )

        return answer_within(self._clock, self.timeout, defer.maybeDeferred(issue), expired, returned_late)


def answer_within(
    clock: Any,
    seconds: float,
    running: defer.Deferred[Any],
    expired: Callable[[], None] | None = None,
    returned_late: Callable[[Any], None] | None = None,
) -> defer.Deferred[Any]:
    """A Deferred with ``running``'s outcome, or :class:`defer.TimeoutError`
    once ``seconds`` have passed on ``clock``.

    ``running`` is not cancelled then: no signature in a thread or call
    into an HSM can be stopped, and cancelling its Deferred would only hide
    that it still runs.  ``expired()`` is called when the time runs out,
    ``returned_late(outcome)`` when ``running`` ends after that; its
    outcome (a failure too) is consumed there.  Every CA call with a
    deadline (enrollments, the publishing listener's signatures) goes
    through here.
    """
    answer: defer.Deferred[Any] = defer.Deferred()
    late = False

    def expire() -> None:
        nonlocal late
        late = True
        if expired is not None:
            expired()
        answer.errback(defer.TimeoutError(f"{seconds:g} s"))

    timer = clock.callLater(seconds, expire)

    def returned(outcome: Any) -> None:
        if late:
            if returned_late is not None:
                returned_late(outcome)
            return None
        if timer.active():  # a test's reactor clean-up may have cancelled it
            timer.cancel()
        if isinstance(outcome, Failure):
            answer.errback(outcome)
        else:
            answer.callback(outcome)
        return None

    running.addBoth(returned)
    return answer
