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

#: Seconds each readiness check may take before it counts as failed.
READY_TIMEOUT = 5.0
#: Retry-After (seconds) of a 503 readiness answer.
RETRY_AFTER = 5
#: Seconds the store's write check waits for another connection's lock.
WRITE_CHECK_SECONDS = 1.0
#: Seconds a write check's outcome is reused for later probes.
WRITE_CHECK_CACHE = 2.0

Check = Callable[[], Coroutine[Any, Any, None]]


def _answer(request: Request, status: int, text: str, headers: Mapping[str, str] = {}) -> bytes:
    body = (text + "\n").encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
    for name, value in headers.items():
        request.setHeader(name.encode("ascii"), value.encode("ascii"))
    return body


class _NotFound(resource.Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _answer(request, 404, "no such resource: /health/live and /health/ready are served here")


class _GetOnly(resource.Resource):
    """GET and HEAD; any other method is a plain-text 405 with Allow, like
    every other refusal (twisted.web's own 405 page is HTML)."""

    isLeaf = True

    def render(self, request: Request) -> Any:
        if request.method not in (b"GET", b"HEAD"):
            return _answer(request, 405, "health checks take GET or HEAD", {"Allow": "GET, HEAD"})
        return super().render(request)


class _Live(_GetOnly):

    def render_GET(self, request: Request) -> bytes:
        if request.postpath:
            return _NotFound().render(request)
        return _answer(request, 200, "live")

    render_HEAD = render_GET


class _Ready(_GetOnly):
    isLeaf = True
    _log = Logger(namespace="estgw.health")

    def __init__(self, checks: Callable[[], Mapping[str, Check]], reactor: Any) -> None:
        super().__init__()
        self._checks = checks
        self._reactor = reactor

    async def _one(self, check: Check) -> str | None:
        try:
            d: defer.Deferred[None] = defer.Deferred.fromCoroutine(check())
            await d.addTimeout(READY_TIMEOUT, self._reactor)
        except defer.TimeoutError:
            return f"no answer within {READY_TIMEOUT:g} seconds"
        except Exception as e:
            return str(e) or type(e).__name__
        return None

    async def _evaluate(self) -> list[str]:
        checks = self._checks()
        if not checks:
            return ["gateway: not started, or stopping"]
        names = list(checks)
        results = await defer.gatherResults(
            [defer.ensureDeferred(self._one(checks[name])) for name in names]
        )
        return [f"{name}: {why}" for name, why in zip(names, results) if why is not None]

    def render_GET(self, request: Request) -> Any:
        if request.postpath:
            return _NotFound().render(request)
        d = defer.ensureDeferred(self._evaluate())

        def done(failures: list[str]) -> None:
            if request._disconnected:
                return
            if failures:
                self._log.warn("not ready: {failures}", failures="; ".join(failures))
                body = _answer(request, 503, "\n".join(["not ready"] + failures),
                               {"Retry-After": str(RETRY_AFTER)})
            else:
                body = _answer(request, 200, "ready")
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        d.addCallback(done)
        d.addErrback(lambda f: self._log.failure("readiness check failed", f))
        return server.NOT_DONE_YET

    render_HEAD = render_GET


class _Health(resource.Resource):
    def getChild(self, path: bytes, request: Request) -> resource.Resource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _NotFound().render(request)


def health_resource(checks: Callable[[], Mapping[str, Check]], reactor: Any) -> resource.Resource:
    """The ``health`` node: ``live`` and ``ready`` children.

    ``checks()`` returns the readiness checks to run now (name → coroutine
    function that raises when not ready); an empty mapping means not ready.
    """
    health = _Health()
    health.putChild(b"live", _Live())
    health.putChild(b"ready", _Ready(checks, reactor))
    return health


def cached(check: Check, seconds: float, clock: Any) -> Check:
    """``check``, run at most once per ``seconds`` (``clock.seconds()``):
    probes within that time share its outcome, success or failure, and
    probes during a run wait for that run."""
    state: dict[str, Any] = {"at": None, "why": None, "running": None}

    async def once() -> None:
        try:
            await check()
            state["why"] = None
        except Exception as e:
            state["why"] = str(e) or type(e).__name__
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
            raise RuntimeError(state["why"])

    return run


def certificate_in_validity(certificate: Any, now: datetime | None = None) -> None:
    """Raise ValueError when ``certificate`` is not valid at ``now``."""
    now = now or datetime.now(timezone.utc)
    if now < certificate.not_valid_before_utc:
        raise ValueError(f"the CA certificate {certificate.subject.rfc4514_string()} is not valid yet")
    if now > certificate.not_valid_after_utc:
        raise ValueError(f"the CA certificate {certificate.subject.rfc4514_string()} has expired")
