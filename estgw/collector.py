"""Garbage collector settings for the long-running gateway process.

CPython's cyclic collector walks every tracked object of a generation
each time it runs.  After start-up the gateway holds some 90 000
long-lived objects (modules, the CA, the configuration, Twisted's
machinery) that never become garbage; with the default thresholds
(700, 10, 10) they were walked again and again under load, costing
about a tenth of the CPU of an enrollment and, for a full collection,
a reactor stall of 50-70 ms.

:func:`settle` runs once the gateway is ready to serve: it collects,
then moves what survived into the permanent generation
(:func:`gc.freeze`), which no collection walks, and raises the
thresholds so that young collections are fewer.  Per-request garbage is
freed by reference counting (see ``tls.GatewayContextFactory`` for the
one reference cycle per connection that used to need the collector), so
what the collector still finds is small.
"""

from __future__ import annotations

import gc

#: (young, middle, old) thresholds, as gc.set_threshold takes them: a young
#: collection every 10 000 net allocations, a middle one every 20 of those.
THRESHOLDS = (10_000, 20, 20)


def settle() -> None:
    """Collect, freeze what survived start-up, and raise the thresholds.

    Call once per process, when start-up is over: objects created before
    are never collected afterwards (cyclic garbage among them would be
    kept), so the collection comes first.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
