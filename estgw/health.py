"""``GET /health/live`` and ``GET /health/ready`` for load balancers and
orchestrators.

* live: 200 ``live`` whenever the process answers HTTP at all (a process
  that does not answer is dead or wedged: restart it).
* ready: 200 ``ready`` when the store answers a query and could take a
  write (no other process holds its write lock, it is not read-only),
  and every token procedure's CA certificate is within its validity and
  its CA is not hung (``ca.maxOverdue``), each within ``READY_TIMEOUT``
  seconds; else 503 with one line per failed check and ``Retry-After``,
  so a load balancer sends devices elsewhere.  Also 503 while the gateway
  starts or stops.  The write check's outcome is kept for
  ``WRITE_CHECK_CACHE`` seconds (:func:`cached`), so frequent probes do
  not add load.

Both are plain text with a Content-Length, take GET (and HEAD), need no
client certificate, and say nothing secret.  They are served on the EST
listener and, when ``metrics.port`` is set, on the metrics listener.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Callable, Coroutine, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from twisted.web.server import Request

from estgw.escape import printable
from estgw.plaintext import TEXT, Branch, Leaf, respond, text

#: Seconds each readiness check may take before it counts as failed.
READY_TIMEOUT = 5.0
#: Retry-After (seconds) of a 503 readiness answer: shorter than the 30 s
#: of a refused enrollment (estgw.guard), as a probe is sent every few
#: seconds and readiness returns as soon as the fault clears.
RETRY_AFTER = 5
#: Seconds the store's write check waits for another connection's lock.
WRITE_CHECK_SECONDS = 1.0
#: Seconds a write check's outcome is reused for later probes.
WRITE_CHECK_CACHE = 2.0

Check = Callable[[], Coroutine[Any, Any, None]]


class NotReady(Exception):
    """A readiness check failed.  ``shown`` says what, for the answer
    anyone may read (never a file name, URL, host, user or exception);
    ``detail`` says it for the log (default: ``shown``)."""

    def __init__(self, shown: str, detail: str | None = None) -> None:
        super().__init__(shown)
        self.shown = shown
        self.detail = detail or shown


_NOT_FOUND = "no such resource: /health/live and /health/ready are served here"
#: Health answers are never cached: each says how things are now.
_NO_STORE = {"Cache-Control": "no-store"}


class _Check(Leaf):
    """GET and HEAD; any other method is a plain-text 405 with Allow."""

    takes = "health checks take GET or HEAD"
    not_found = _NOT_FOUND


class _Live(_Check):

    def render_GET(self, request: Request) -> Any:
        text(request, 200, "live", _NO_STORE)
        return server.NOT_DONE_YET


class _Ready(_Check):
    _log = Logger(namespace="estgw.health")

    def __init__(self, checks: Callable[[], Mapping[str, Check]], reactor: Any) -> None:
        super().__init__()
        self._checks = checks
        self._reactor = reactor

    async def _one(self, check: Check) -> tuple[str, str] | None:
        """None when ``check`` passes, else (what the answer says, what the log says)."""
        try:
            d: defer.Deferred[None] = defer.Deferred.fromCoroutine(check())
            await d.addTimeout(READY_TIMEOUT, self._reactor)
        except defer.TimeoutError:
            return (f"no answer within {READY_TIMEOUT:g} seconds",) * 2
        except NotReady as e:
            return e.shown, e.detail
        except Exception as e:
            # Not one the check words for everyone: its text may name a file or a host.
            return "failed (the log says why)", f"{type(e).__name__}: {e}"
        return None

    async def _evaluate(self) -> list[tuple[str, str]]:
        checks = self._checks()
        if not checks:
            return [("gateway: not started, or stopping",) * 2]
        names = list(checks)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._one(checks[name])) for name in names]
        )
        return [(f"{name}: {why[0]}", f"{name}: {why[1]}") for name, why in zip(names, results) if why is not None]

    def render_GET(self, request: Request) -> Any:
        d = defer.ensureDeferred(self._evaluate())

        def done(failures: list[tuple[str, str]]) -> None:
            if failures:
                self._log.warn("not ready: {failures}", failures="; ".join(detail for _, detail in failures))
                respond(request, 503, "".join(line + "\n" for line in ["not ready"] + [
                    printable(shown) for shown, _ in failures]).encode("utf-8"), TEXT,
                    {"Retry-After": str(RETRY_AFTER), **_NO_STORE})
            else:
                text(request, 200, "ready", _NO_STORE)

        d.addCallback(done)
        d.addErrback(lambda f: self._log.failure("readiness check failed", f))
        return server.NOT_DONE_YET


def health_resource(checks: Callable[[], Mapping[str, Check]], reactor: Any) -> resource.Resource:
    """The ``health`` node: ``live`` and ``ready`` children.

    ``checks()`` returns the readiness checks to run now (name → coroutine
    function that raises when not ready); an empty mapping means not ready.
    """
    health = Branch(_NOT_FOUND)
    health.putChild(b"live", _Live())
    health.putChild(b"ready", _Ready(checks, reactor))
    return health


def cached(check: Check, seconds: float, clock: Any) -> Check:
    """``check``, run at most once per ``seconds`` (``clock.seconds()``):
    probes within that time share its outcome, success or failure, and
    probes during a run wait for that run.  A failed outcome is the
    exception ``check`` raised, raised again to each probe."""
    state: dict[str, Any] = {"at": None, "why": None, "running": None}

    async def once() -> None:
        try:
            await check()
            state["why"] = None
        except Exception as e:
            state["why"] = e
        finally:
            state["at"] = clock.seconds()
            state["running"] = None

    async def run() -> None:
        if state["running"] is None and (state["at"] is None or clock.seconds() - state["at"] >= seconds):
            d = defer.ensureDeferred(once())
            if not d.called:
                state["running"] = d
        running = state["running"]
        if running is not None:
            # Each probe waits on its own Deferred: one that gives up
            # (READY_TIMEOUT cancels it) does not cancel the shared run.
            waiter: defer.Deferred[None] = defer.Deferred()

            def wake(result: Any) -> Any:
                if not waiter.called:
                    waiter.callback(None)
                return result

            running.addBoth(wake)
            await waiter
        if state["why"] is not None:
            # Each probe's own traceback, not one growing with every raise.
            raise state["why"].with_traceback(None)

    return run


def certificate_in_validity(certificate: Any, now: datetime | None = None) -> None:
    """Raise ValueError when ``certificate`` is not valid at ``now``."""
    now = now or datetime.now(timezone.utc)
    if now < certificate.not_valid_before_utc:
        raise ValueError(f"the CA certificate {certificate.subject.rfc4514_string()} is not valid yet")
    if now > certificate.not_valid_after_utc:
        raise ValueError(f"the CA certificate {certificate.subject.rfc4514_string()} has expired")
