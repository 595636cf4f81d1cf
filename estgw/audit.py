"""The audit trail as data: one JSON object per line, for a SIEM to tail.

Every issuance, refusal and operator action is logged once in the
``estgw.audit`` namespace of :mod:`twisted.logger` (the human log shows
it as text).  With ``log.audit.file`` set, :func:`start_audit_file` adds
an observer that writes each of those events to that file as one line of
JSON (twisted.logger's :func:`~twisted.logger.jsonFileLogObserver`, with
a newline instead of the RFC 7464 record separator so each line is one
object), with these keys where they apply::

    time      ISO 8601 UTC, e.g. "2026-11-30T05:37:58.123456+00:00"
    event     issued | refused | pending | reissued | approval-* | operator
    handler   handler id ("2")
    requester who asked: "device:pump-17", "cert:CN=..#serial=..", the
              device id tried on a refused login
    subject   the certificate's or CSR's subject (RFC 4514)
    serial    the certificate's serial as openssl prints it (estgw.serials)
    code      the refusal code (README, Every refusal); status its HTTP status
              (none for a connection closed without an answer: idle-timeout,
              too-many-connections, too-many-connections-per-client)
    reason    the refusal text the client saw
    client    the client's IP address (and certificate subject)
    operator  who did an operator action: "os:<user>" or an operator
              certificate; action and target say what
    message   the same line as the human log

Values that came from a client are kept as given: JSON escapes them.
Never a password, key, PIN or token password: nothing that carries one
is ever a field of an audit event.

The file is opened for appending and follows log rotation
(:mod:`estgw.logfiles`): SIGHUP, or a rename or deletion seen as it
writes, opens ``log.audit.file`` again; each line goes whole to the old
file or to the new one.

Operator actions are also rows of the store's ``audit`` table (see
:func:`operator_action`), so they survive log rotation.
"""

from __future__ import annotations

import getpass
import os
from datetime import datetime, timezone
from typing import Any

from twisted.logger import ILogObserver, Logger, formatEvent, globalLogPublisher, jsonFileLogObserver
from zope.interface import implementer

from estgw.escape import printable
from estgw.logfiles import AppendFile
from estgw.serials import format_serial

NAMESPACE = "estgw.audit"
FIELDS = (
    "event", "handler", "requester", "subject", "serial", "code", "status", "reason",
    "client", "method", "path", "operator", "action", "target", "details", "request_id",
)

_audit = Logger(namespace=NAMESPACE)


def _value(key: str, value: Any) -> Any:
    if key == "serial" and isinstance(value, int):
        return format_serial(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return str(value)


def record(event: dict[str, Any]) -> dict[str, Any] | None:
    """The audit record of a twisted.logger event, or None if it is not one."""
    if event.get("log_namespace") != NAMESPACE:
        return None
    when = datetime.fromtimestamp(event.get("log_time", 0), timezone.utc)
    result: dict[str, Any] = {"time": when.isoformat(timespec="microseconds")}
    for key in FIELDS:
        if key in event and event[key] not in (None, ""):
            result[key] = _value(key, event[key])
    result["message"] = formatEvent(event)
    return result


@implementer(ILogObserver)
class AuditFileObserver:
    """Writes the audit events it sees to ``file`` (an :class:`AppendFile`,
    or any text stream) as JSON lines, one ``write`` each."""

    path = ""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._json = jsonFileLogObserver(file, recordSeparator="")

    def __call__(self, event: dict[str, Any]) -> None:
        line = record(event)
        if line is not None:
            self._json(line)

    def close(self) -> None:
        self._file.close()


# path -> (observer, users): one observer per file in a process, so a CLI
# command run inside the daemon's process (tests) does not write twice.
_files: dict[str, tuple[AuditFileObserver, int]] = {}


def start_audit_file(path: str, publisher: Any = globalLogPublisher) -> AuditFileObserver:
    """Append audit events to ``path`` (created 0640) until :func:`stop_audit_file`."""
    path = os.path.abspath(path)
    if path in _files:
        observer, users = _files[path]
        _files[path] = (observer, users + 1)
        return observer
    observer = AuditFileObserver(AppendFile(path, 0o640))
    observer.path = path
    _files[path] = (observer, 1)
    publisher.addObserver(observer)
    return observer


def stop_audit_file(observer: AuditFileObserver, publisher: Any = globalLogPublisher) -> None:
    _, users = _files.get(observer.path, (observer, 1))
    if users > 1:
        _files[observer.path] = (observer, users - 1)
        return
    _files.pop(observer.path, None)
    publisher.removeObserver(observer)
    observer.close()


def os_operator() -> str:
    """Who runs an operator command: ``os:<login name>`` (sudo's caller too)."""
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid (containers)
        user = f"uid {os.getuid()}"
    caller = os.environ.get("SUDO_USER")
    return f"os:{user}" + (f" (sudo by {caller})" if caller and caller != user else "")


def note(request: Any, **fields: str | None) -> None:
    """Remember audit fields of a request as they become known (the device
    id a login tried, then who logged in, the CSR's subject, the handler),
    for the one audit line its refusal gets (estgw.web)."""
    noted = request.__dict__.setdefault("_estgw_audit", {})
    noted.update({key: value for key, value in fields.items() if value})


def noted(request: Any) -> dict[str, str]:
    return dict(getattr(request, "_estgw_audit", {}))


async def operator_action(store: Any, operator: str, action: str, target: str, details: str = "") -> None:
    """Record an operator action in the store's audit table, then log it."""
    when = datetime.now(timezone.utc)
    await store.add_audit(when, operator, action, target, details)
    # The human line shows operator-given text escaped (one line, no control
    # characters: a certificate subject can hold anything); the fields stay
    # as given for the JSON audit file, which escapes them itself.
    _audit.info(
        "{event}: {operator_text} {action} {target_text}{details_text}",
        event="operator", operator=operator, action=action, target=target, details=details,
        operator_text=printable(operator), target_text=printable(target),
        details_text=f" ({printable(details)})" if details else "",
    )
