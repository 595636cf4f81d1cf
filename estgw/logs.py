"""The human log: where it goes, how it rotates, what level it keeps.

``log.file`` names a file rotated at ``log.maxBytes`` (0: never, for
logrotate) with at most ``log.maxFiles`` rotated files kept (``FILE.1``
newest); it follows rotation by others and reopens on SIGHUP
(:mod:`estgw.logfiles`).  ``log.level`` drops events below it (``warn``
leaves out the per-request lines).  The ``estgw.audit`` lines (one per
issuance or refusal) are the audit trail and stay at ``info`` unless the
JSON audit file keeps that trail.

twistd asks the application for an :class:`ILogObserver` before it picks
its own: :class:`LoggingService` hands it one when any ``log.*`` key is
set or twistd would write its log to a file (``--logfile``, or
``twistd.log`` of a daemon): estgw then writes that file itself, as it
writes ``log.file``, so that it too reopens after a rotation.  twistd's
own observer is left for standard output, ``--syslog`` and ``--logger``.

Worker processes (:mod:`estgw.workers`) write their events as JSON lines
to standard output, already filtered by level and formatted; the
supervisor publishes them into its own log (:func:`worker_observer`,
:func:`publish_worker_lines`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogPublisher,
    textFileLogObserver,
)
from estgw.config import Config
from estgw.logfiles import FollowingLogFile, open_log_file as _open_log_file

__all__ = [
    "configured", "human_observer", "open_log_file", "twistd_log_file", "LoggingService", "worker_observer",
    "publish_worker_lines",
]

#: The level a worker filters at, handed down by the supervisor.
WORKER_LEVEL_VARIABLE = "ESTGW_WORKER_LOG_LEVEL"


def configured(config: Config) -> bool:
    """Whether estgw, not twistd, makes the log observer."""
    return config.log_file is not None or config.log_level != "info"


#: The namespace of the per-request audit lines (issued, refused).
AUDIT_NAMESPACE = "estgw.audit"


def _audit_kept_elsewhere(config: Config) -> bool:
    # The JSON audit file (log.audit.file) is the audit trail when set;
    # otherwise the estgw.audit lines of the human log are, and log.level
    # must not drop them.
    return bool(config.audit_file)


def _level_filter(observer: Any, level: str, keep_audit: bool = True) -> Any:
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    if keep_audit:
        predicate.setLogLevelForNamespace(AUDIT_NAMESPACE, min(LogLevel.info, LogLevel.levelWithName(level)))
    return FilteringLogObserver(observer, [predicate])


def twistd_log_file(options: Any) -> str | None:
    """The file twistd would write its log to for ``options`` (a twistd
    plugin's options, whose ``parent`` holds twistd's): ``--logfile``, or
    ``twistd.log`` for a daemon without one; None for standard output,
    ``--syslog`` or ``--logger``, and outside twistd."""
    parent = getattr(options, "parent", None)
    if parent is None or not hasattr(parent, "get"):
        return None
    if parent.get("syslog") or parent.get("logger"):
        return None
    name = parent.get("logfile")
    if name == "-":
        return None
    if not name:
        return None if parent.get("nodaemon") else "twistd.log"
    return str(name)


def open_log_file(config: Config, path: str | None = None) -> FollowingLogFile:
    """``path`` (``log.file`` when None), opened for appending, rotating at
    ``log.maxBytes`` (0: never) keeping ``log.maxFiles`` rotated files.

    :raises OSError: the file or its directory cannot be written.
    """
    path = path or config.log_file
    assert path is not None
    return _open_log_file(path, config.log_max_bytes or None, config.log_max_files)


def human_observer(config: Config, stream: IO[str] | None = None, log_file: Any = None) -> Any:
    """The text log as configured: ``log_file``, else ``log.file`` (rotated),
    else ``stream`` (standard output when None), keeping events at
    ``log.level`` and above."""
    if log_file is not None:
        target: Any = log_file
    elif config.log_file is not None:
        target = open_log_file(config)
    else:
        target = stream or sys.stdout
    return _level_filter(textFileLogObserver(target), config.log_level, not _audit_kept_elsewhere(config))


class LoggingService(service.MultiService):
    """The top service of ``twistd estgw``: gives the application its log
    observer as it is attached (twistd reads it right after)."""

    def __init__(self, observer: Any = None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.observer is not None and hasattr(parent, "setComponent"):
            parent.setComponent(ILogObserver, self.observer)


def worker_level(config: Config) -> str:
    """What :func:`worker_observer` reads from :data:`WORKER_LEVEL_VARIABLE`."""
    return config.log_level + (",audit-elsewhere" if _audit_kept_elsewhere(config) else "")


def _worker_line(event: dict[str, Any]) -> str:
    """One event as a worker writes it for the supervisor: a JSON object
    of its time (``t``), level (``l``), namespace (``n``), system (``s``,
    when set) and text (``m``), formatted here as a single process would
    format it (a format specification such as ``{serial:x}`` applied, a
    failure's traceback appended)."""
    level = event.get("log_level")
    record = {
        "t": event.get("log_time") or time.time(),
        "l": getattr(level, "name", "info"),
        "n": event.get("log_namespace") or "-",
        "m": eventAsText(event, includeTimestamp=False, includeSystem=False),
    }
    if event.get("log_system"):
        record["s"] = str(event["log_system"])
    return json.dumps(record) + "\n"


def worker_observer() -> Any:
    """twistd ``--logger`` of a worker: :func:`_worker_line` lines on
    standard output, filtered at the level the supervisor handed down."""
    level, _, keep_audit = os.environ.get(WORKER_LEVEL_VARIABLE, "info").partition(",")
    return _level_filter(FileLogObserver(sys.stdout, _worker_line), level, keep_audit != "audit-elsewhere")


def _worker_event(line: bytes, worker: int, now: float) -> dict[str, Any] | None:
    text = line.decode("utf-8", "replace").rstrip("\r\n")
    if not text:
        return None
    try:
        record = json.loads(text)
        level = LogLevel.levelWithName(record["l"])
        event = {"log_format": "{log_text}", "log_text": str(record["m"]), "log_level": level,
                 "log_namespace": str(record["n"]), "log_time": float(record["t"])}
        own = record.get("s") or f"{event['log_namespace']}#{level.name}"
    except Exception:  # RecursionError, OverflowError... as well as ValueError
        # Not a worker's event: text printed before logging started (a
        # traceback) is an error line.
        event = {"log_format": "{line}", "line": text, "log_level": LogLevel.error,
                 "log_namespace": "estgw.workers", "log_time": now}
        own = f"estgw.workers#{LogLevel.error.name}"
    # "[w2 estgw.audit#info]": which worker, then what twistd would show.
    event["log_system"] = f"w{worker} {own}"
    return event


def publish_worker_lines(lines: list[tuple[bytes, int]]) -> None:
    """Publish lines workers wrote, each with its worker's number, into
    this process's log, in the order of their times.

    A worker's event keeps its level, namespace and time; anything else
    (a traceback printed before logging started) is logged as an error.
    """
    now = time.time()
    events = [e for e in (_worker_event(line, worker, now) for line, worker in lines) if e is not None]
    events.sort(key=lambda e: e["log_time"])
    for event in events:
        globalLogPublisher(event)
