"""``twistd estgw-approval``: the reference approval service.

The configuration is loaded and checked in ``postOptions``; the
service's CAs and certificates are made (or loaded) and its port bound in
``makeService``, before twistd daemonizes, so a bad file or a port in use
stops twistd with the reason and a non-zero status.

When twistd would write its log to a file (``--logfile``, or
``twistd.log`` of a daemon), the service writes it itself, as
``twistd estgw`` does: rotated at 10 MiB keeping 10 files, reopened on
SIGHUP and after a rename (:mod:`estgw.logfiles`).
"""

from __future__ import annotations

from typing import Any

from twisted.application import service
from twisted.logger import Logger, textFileLogObserver
from twisted.python import usage

from estgw import limits, logfiles, logs

from estgw.approval import config as config_module
from estgw.approval.config import ServiceConfig
from estgw.approval.service import ApprovalService
from estgw.config import ConfigError
from estgw.daemon import StartError, end_process_on_failure


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve the estgw approval API (docs/approval-api.rst) over HTTPS with"
        " client certificates, as configured in approval.properties."
    )
    optParameters = [
        ["config", "c", "etc/approval.properties", "The approval.properties file."],
        # Read by service.port's own parser (config.from_string).
        ["port", "p", None, "Listen on this TCP port instead of service.port (0: a free port)."],
    ]

    def postOptions(self) -> None:
        options = {"service.port": ("--port", self["port"])} if self["port"] is not None else {}
        try:
            loaded = config_module.load(self["config"], options)
        except ConfigError as e:
            # Not a usage error: twistd would print its usage text before it.
            raise SystemExit(f"estgw-approval: {e}") from None
        self.loaded: ServiceConfig = loaded


#: Rotation of the log file the service writes (log.file's defaults).
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_MAX_FILES = 10


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    path = logs.twistd_log_file(options)
    log_file = None
    if path is not None:
        try:
            log_file = logfiles.open_log_file(path, LOG_MAX_BYTES, LOG_MAX_FILES)
        except OSError as e:
            raise SystemExit(f"estgw-approval: --logfile: cannot open {path}: {e.strerror}") from None
    target: Any = log_file
    top = logs.LoggingService(textFileLogObserver(target) if target is not None else None)
    logfiles.SignalService(reactor, rotate=log_file.rotate if log_file is not None else None).setServiceParent(top)
    try:
        raised = limits.ensure_descriptors(
            limits.default_caps()[0], key="the approval service's connection cap", settable=False
        )
    except ValueError as e:
        raise SystemExit(f"estgw-approval: {e}") from None
    if raised is not None:
        Logger(namespace="estgw.approval").info(
            "raised the open files limit (RLIMIT_NOFILE) from {before} to {after} for its connection cap",
            before=raised[0], after=raised[1],
        )
    try:
        approval = ApprovalService(options.loaded, reactor)
        approval.bind()  # before twistd daemonizes: see estgw.daemon
    except (usage.UsageError, StartError) as e:
        raise SystemExit(f"estgw-approval: {e}") from None
    end_process_on_failure(approval.ready, approval.reactor)
    approval.setServiceParent(top)
    return top
