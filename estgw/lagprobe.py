"""Reactor lag probe for benchmarks (``ESTGW_LAG_PROBE=FILE``).

A timer due every 10 ms notes how late it runs: the lateness is how long
the reactor thread was busy with something else (a stall).  Once a second
the largest lateness of that second is appended to FILE as
``<unix time> <pid> <milliseconds>``; several processes may share FILE.
Off unless the environment variable is set.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import task

VARIABLE = "ESTGW_LAG_PROBE"
_INTERVAL = 0.010


class LagProbe:
    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self._path = path
        self._worst = 0.0
        self._due = 0.0
        self._reported = time.time()
        self._call = task.LoopingCall(self._tick)
        self._call.clock = reactor

    def start(self) -> None:
        self._due = time.perf_counter() + _INTERVAL
        self._call.start(_INTERVAL, now=False)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()
        self._report(time.time())

    def _tick(self) -> None:
        now = time.perf_counter()
        self._worst = max(self._worst, now - self._due)
        self._due = now + _INTERVAL
        wall = time.time()
        if wall - self._reported >= 1.0:
            self._report(wall)

    def _report(self, wall: float) -> None:
        with open(self._path, "a", encoding="ascii") as f:
            f.write(f"{wall:.3f} {os.getpid()} {1000 * self._worst:.1f}\n")
        self._worst = 0.0
        self._reported = wall


def from_environment(reactor: Any) -> LagProbe | None:
    path = os.environ.get(VARIABLE)
    return LagProbe(reactor, path) if path else None
