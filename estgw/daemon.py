"""Starting a twistd service so that every failure reaches the operator.

``twistd`` without ``-n`` forks before it starts the services and waits
for a word from its child; a child that ends with ``SystemExit`` from
``startService`` never sends it, and the parent waits forever.  So the
services of estgw bind their ports in ``makeService``, before twistd
forks, where ``SystemExit`` ends twistd at once with the message and
status 1; and what fails later ends the daemon with a non-zero status.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure


class StartError(Exception):
    """A start failure known before the reactor runs: the message says
    what and why (e.g. ``cannot listen on 127.0.0.1 port 8443: ...``)."""


def listen_addresses(interface: str) -> list[str]:
    """The addresses ``server.interface`` (or ``metrics.interface``) names.

    ``localhost``: both loopbacks, 127.0.0.1 and ::1; empty: every IPv4
    address; otherwise a comma-separated list of IPv4/IPv6 addresses
    (``::``: every address, IPv4 too where the system maps it).
    """
    addresses: list[str] = []
    for item in interface.split(","):
        item = item.strip()
        if item.lower() == "localhost":
            addresses += ["127.0.0.1", "::1"]
        elif item.startswith("[") and item.endswith("]"):
            addresses.append(item[1:-1])
        else:
            addresses.append(item)
    return list(dict.fromkeys(addresses)) or [""]


def _listen_now(endpoint: Any, factory: Any) -> Any:
    """Listen before the reactor runs (TCP endpoints answer at once)."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise StartError("listening did not complete")
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def listen_all(reactor: Any, interface: str, port: int, factory: Any,
               wrap: Any = None, what: str = "EST") -> list[Any]:
    """Bind ``port`` on every address of ``interface`` now; all on the
    same port number (the first one's when ``port`` is 0).

    ::1 that the system does not have (IPv6 off) is skipped when the
    name was ``localhost``; any other failure raises StartError naming
    the address, the port and the reason, after closing what was bound.
    """
    ports: list[Any] = []
    optional = {"::1"} if "localhost" in interface.lower() else set()
    try:
        for address in listen_addresses(interface):
            number = ports[0].getHost().port if ports else port
            tcp = TCP6ServerEndpoint if ":" in address else TCP4ServerEndpoint
            endpoint = tcp(reactor, number, interface=address)
            if wrap is not None:
                endpoint = wrap(endpoint)
            try:
                ports.append(_listen_now(endpoint, factory))
            except CannotListenError as e:
                if address in optional and ports and _unavailable(e):
                    continue
                shown = f"[{address}]" if ":" in address else (address or "every IPv4 address")
                reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
                raise StartError(f"cannot listen for {what} on {shown} port {number}: {reason}") from None
    except BaseException:
        for bound in ports:
            bound.stopListening()
        raise
    return ports


def _unavailable(error: CannotListenError) -> bool:
    return getattr(error.socketError, "errno", None) in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT)


def shown_address(address: Any) -> str:
    host = getattr(address, "host", "?")
    return f"[{host}]:{address.port}" if ":" in host else f"{host}:{address.port}"


def end_process_on_failure(ready: defer.Deferred[None], reactor: Any) -> None:
    """When ``ready`` fails once the reactor runs (after twistd detached),
    end the process with a non-zero status: SIGTERM to itself makes
    twistd stop the services, remove its pid file and exit by the signal."""

    def failed(failure: Failure) -> None:
        if reactor.running:
            os.kill(os.getpid(), signal.SIGTERM)

    ready.addErrback(failed)


