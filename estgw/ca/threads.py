"""The threads of one token procedure's CA: a hung CA holds only those.

A signature with a large RSA key and every call into an HSM block, so
they run on a thread.  On the reactor's pool (10 threads, which also
check passwords and generate serverkeygen keys) a CA that hangs would
take a thread per enrollment until ``ca.maxOverdue`` trips, and every
enrollment admitted before ``ca.timeout`` first ran out (up to
``ca.maxQueued``) would be one: with 10 of them the pool, and with it
every password check, is gone for good.  So each token procedure signs
(certificates, its CRLs, OCSP responses) on its own pool of
``ca.maxOverdue`` threads: the most a hung CA can hold is the number of
calls after which its enrollments are refused at once
(:class:`estgw.guard.CAGuard`); calls queued behind them time out as
``ca-timeout`` without a thread; nothing else waits for them.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class CAThreads:
    """At most ``size`` threads for the blocking calls of token procedure
    ``name``; started at first use (loading a configuration starts
    nothing), stopped by :meth:`stop` or when the reactor shuts down."""

    def __init__(self, reactor: Any, name: str, size: int) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.name = name
        self.size = size
        self.pool: ThreadPool | None = None

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """``f(*args)`` on one of these threads; the Deferred fires in the
        reactor thread with its result or failure."""
        if self.pool is None:
            self.pool = ThreadPool(minthreads=0, maxthreads=self.size, name=f"estgw-ca-{self.name}")
            self.pool.start()
            self._reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return deferToThreadPool(self._reactor, self.pool, f, *args)

    def stop(self) -> None:
        """Stop the threads once their calls return (a call that hangs
        holds the process's exit as it would on any pool); a later
        :meth:`run` starts new ones."""
        pool, self.pool = self.pool, None
        if pool is not None and pool.started:
            pool.stop()


def threads_of(procedure: Any) -> CAThreads | None:
    """The :class:`CAThreads` of a token procedure, if it has any."""
    threads = getattr(procedure, "threads", None)
    return threads if isinstance(threads, CAThreads) else None
