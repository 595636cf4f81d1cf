"""``server.workers`` / ``twistd estgw --workers N``: N processes, one socket.

The supervisor (the process twistd started) binds the listening sockets
(one per address of ``server.interface``), creates the state (CA, TLS
credentials, Digest key) once, and runs N worker processes.  Each worker
is ``twistd -n estgw --worker-fds 3[,4...] --worker-number N`` with the
sockets as its file descriptors 3 and on: it adopts them
(``reactor.adoptStreamPort``) and serves as a single process would,
on the same state directory and store.  The kernel hands each new
connection to one of the workers waiting in ``accept``.  Worker 1 alone
also serves ``publish.port`` and ``coaps.port`` (one socket each);
``metrics.port`` is refused with more than one worker, since each worker
counts only what it served.

Each worker reports on a pipe (``--worker-ready-fd``) that it serves, or
why it could not start.  A worker that ends before it ever served (the
store cannot be opened or migrated, a key cannot be read...) ends the
supervisor as a start failure ends a single process: every worker is
stopped, the reason is logged and the supervisor ends with a non-zero
status (:func:`estgw.daemon.end_process_on_failure`) rather than starting
workers that cannot serve forever.  The supervisor says it serves once
every worker does.  A worker that exits after it served is started again
(after a delay that grows while workers keep dying young); so is its
successor if that one cannot start (the cause may pass: a database
restarting), while the other workers serve on.

SIGHUP to the supervisor reopens its log files and goes on to every
worker, which reopens its own (``log.audit.file``; :mod:`estgw.logfiles`);
a worker ignores SIGHUP from its first instruction until it handles it.
A worker ignores SIGUSR1 (from ``systemctl kill -s USR1``, which signals
every process of the unit): its log is the supervisor's, which rotates
it.  Stopping the
supervisor (SIGTERM, SIGINT) sends SIGTERM to every worker, waits for them
(SIGKILL after :data:`STOP_TIMEOUT` seconds) and exits.  A worker also
stops when its standard input, a pipe from the supervisor, closes: a
supervisor killed outright leaves no workers behind.

Workers log their events as JSON lines to a pipe, which the supervisor
reads every :data:`DRAIN_INTERVAL` seconds into the one human log
(:mod:`estgw.logs`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from typing import Any

import attr
from twisted.application import service
from twisted.internet import defer, error, main, protocol, task
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from estgw import limits, logs
from estgw.config import Config
from estgw.daemon import StartError, listen_addresses

__all__ = ["Supervisor", "bind", "report_failure", "report_start", "watch_parent", "STOP_TIMEOUT"]

STOP_TIMEOUT = 10.0
#: Seconds between two reads of the workers' log pipes: how late a
#: worker's line may reach the log.
DRAIN_INTERVAL = 0.1
_PIPE_BYTES = 1 << 20
_RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that lived this long was healthy: its successor starts at once.
_HEALTHY_SECONDS = 30.0
_BACKLOG = 1024
# What a worker writes on its ready pipe: _READY once it serves, or
# _FAILED and the reason when it could not start (report_start).
_READY = b"ready\n"
_FAILED = b"failed "
_REPORT_BYTES = 1024


def share_of(config: Config) -> Config:
    """What one of ``config.workers`` worker processes may hold of the
    gateway-wide limits: its share of ``server.maxConnections`` and of
    ``ca.maxQueued``, each divided and rounded up
    (:func:`estgw.limits.per_process`), so that all workers
    together hold at most the value plus ``workers - 1``.  A worker gets
    no more than its share even while the others are idle: the kernel,
    not estgw, picks the worker of each connection.
    ``server.maxConnectionsPerClient`` is not divided (one client's
    connections may all reach one worker): each worker applies it, so one
    address may hold up to ``workers`` times it."""
    n = config.workers
    return attr.evolve(
        config,
        max_connections=limits.per_process(config.max_connections, n),
        ca_max_queued=limits.per_process(config.ca_max_queued, n),
    )


def _bind_one(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and address != "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    # Each worker polls it; accept must not block the one that lost the race.
    sock.setblocking(False)
    return sock


def bind(interface: str, port: int) -> list[socket.socket]:
    """The listening sockets the workers share: one per address of
    ``server.interface`` (as :func:`estgw.daemon.listen_addresses` reads
    it), all on the same port (the first one's when ``port`` is 0).

    :raises StartError: naming the address, the port and the reason.
    """
    sockets: list[socket.socket] = []
    optional = {"::1"} if "localhost" in interface.lower() else set()
    try:
        for address in listen_addresses(interface):
            number = sockets[0].getsockname()[1] if sockets else port
            try:
                sockets.append(_bind_one(address, number))
            except OSError as e:
                if address in optional and sockets and e.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                    continue
                shown = f"[{address}]" if ":" in address else (address or "every IPv4 address")
                raise StartError(f"cannot listen for EST on {shown} port {number}: {e.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _Worker:
    def __init__(self, number: int) -> None:
        self.number = number
        self.process: Any = None
        self.started = 0.0
        self.failures = 0  # deaths in a row, each before _HEALTHY_SECONDS
        self.ready = False  # this process reported that it serves
        self.served = False  # one of this worker's processes ever did
        self.report = b""  # what this process wrote on its ready pipe
        self.ended: defer.Deferred[None] | None = None
        self.output: _WorkerOutput | None = None


class _WorkerOutput:
    """A worker's standard output and error: one pipe that the supervisor
    empties every :data:`DRAIN_INTERVAL` seconds rather than as each line
    arrives.  A worker writes one line per enrollment; waking the
    supervisor for each cost more CPU than writing the line.  Lines a
    worker wrote before it died stay in the pipe and are still read."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        try:
            # Room for far more than one interval's lines, so that a worker
            # never waits for the supervisor to read.
            fcntl.fcntl(self.read_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size: the default (64 KiB)
        self.rest = b""

    def spawned(self) -> None:
        """The worker holds the write end now; the supervisor must not."""
        os.close(self.write_fd)

    def drain(self) -> list[bytes]:
        """Every whole line written so far (a runaway line is cut)."""
        chunks = [self.rest]
        while True:
            try:
                data = os.read(self.read_fd, _PIPE_BYTES)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        *lines, self.rest = b"".join(chunks).split(b"\n")
        if len(self.rest) >= 1 << 20:
            lines.append(self.rest)
            self.rest = b""
        return lines

    def close(self) -> list[bytes]:
        """The last lines, the unterminated one too; the pipe is closed."""
        lines = self.drain()
        if self.rest:
            lines.append(self.rest)
            self.rest = b""
        os.close(self.read_fd)
        return lines


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: "Supervisor", worker: _Worker) -> None:
        self.supervisor = supervisor
        self.worker = worker

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == self.supervisor.ready_fd:
            self.worker.report = (self.worker.report + data)[:_REPORT_BYTES]
            if self.worker.report.startswith(_READY) and not self.worker.ready:
                self.supervisor._ready(self.worker)

    def processEnded(self, reason: Any) -> None:
        self.supervisor._ended(self.worker, reason)


class Supervisor(service.Service):
    """Runs ``config.workers`` worker processes on one listening socket."""

    _log = Logger()

    def __init__(self, config: Config, config_path: str, sockets: list[socket.socket], reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.config_path = os.path.abspath(config_path)
        self.sockets = sockets
        self.reactor = reactor
        self.workers = [_Worker(n) for n in range(1, config.workers + 1)]
        self._stopping = False
        self._draining: task.LoopingCall | None = None
        self._pending: dict[int, Any] = {}
        #: The worker's end of its ready pipe: after the sockets.
        self.ready_fd = 3 + len(sockets)
        #: Fires once every worker serves; fails (StartError) when a worker
        #: ends before it ever served.
        self.ready: defer.Deferred[None] = defer.Deferred()

    def _command(self) -> list[str]:
        # SIGHUP and SIGUSR1 ignored at once: one sent while the worker
        # starts up must not end it (estgw.logfiles.SignalService handles
        # SIGHUP later; SIGUSR1 stays ignored, the log being the supervisor's).
        return [sys.executable, "-c",
                "import signal; signal.signal(signal.SIGHUP, signal.SIG_IGN); "
                "signal.signal(signal.SIGUSR1, signal.SIG_IGN); "
                "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "--logger=estgw.logs.worker_observer",
                "estgw", "--config", self.config_path, "--workers", str(len(self.workers)),
                "--worker-fds", ",".join(str(3 + i) for i in range(len(self.sockets))),
                "--worker-ready-fd", str(self.ready_fd)]

    def _arguments(self, worker: _Worker) -> list[str]:
        return self._command() + ["--worker-number", str(worker.number)]

    def _spawn(self, worker: _Worker) -> None:
        self._pending.pop(worker.number, None)
        if self._stopping:
            return
        argv = self._arguments(worker)
        env = dict(os.environ, **{logs.WORKER_LEVEL_VARIABLE: logs.worker_level(self.config)})
        worker.ended = defer.Deferred()
        worker.started = self.reactor.seconds()
        worker.ready, worker.report = False, b""
        output = _WorkerOutput(worker.number)
        try:
            worker.process = self.reactor.spawnProcess(
                _WorkerProtocol(self, worker), argv[0], argv, env=env,
                childFDs={0: "w", 1: output.write_fd, 2: output.write_fd,
                          **{3 + i: s.fileno() for i, s in enumerate(self.sockets)}, self.ready_fd: "r"},
            )
        except BaseException:
            output.spawned()
            output.close()
            raise
        output.spawned()
        worker.output = output
        self._log.info("started worker {number} (pid {pid})", number=worker.number, pid=worker.process.pid)

    def _drain(self) -> None:
        """Publish what every worker wrote since the last drain, in the
        order of the lines' times.  Never raises: the drain must go on, or
        the workers would block once their pipes are full."""
        try:
            lines = [(line, w.number) for w in self.workers if w.output is not None for line in w.output.drain()]
            logs.publish_worker_lines(lines)
        except Exception:
            self._log.failure("could not relay the workers' log lines")

    def _ended(self, worker: _Worker, reason: Any) -> None:
        self._drain()
        if worker.output is not None:
            logs.publish_worker_lines([(line, worker.number) for line in worker.output.close()])
            worker.output = None
        ended, worker.ended, worker.process = worker.ended, None, None
        if ended is not None:
            ended.callback(None)
        if self._stopping:
            return
        if not worker.served:
            self._start_failed(worker, reason)
            return
        lived = self.reactor.seconds() - worker.started
        worker.failures = 0 if lived >= _HEALTHY_SECONDS else worker.failures + 1
        delay = _RESTART_DELAYS[min(worker.failures, len(_RESTART_DELAYS)) - 1] if worker.failures else 0.0
        self._log.error(
            "worker {number} ended ({reason}) after {lived:.1f} s; starting it again in {delay:g} s",
            number=worker.number, reason=self._why(worker, reason), lived=lived, delay=delay,
        )
        self._pending[worker.number] = self.reactor.callLater(delay, self._spawn, worker)

    def _ready(self, worker: _Worker) -> None:
        worker.ready = True
        first = not worker.served
        worker.served = True
        if first and all(w.served for w in self.workers) and not self.ready.called:
            self._drain()  # the workers' own lines first
            self._log.info(
                "estgw serving EST at https://{host}:{port}/.well-known/est/ with {n} worker processes ;"
                " CA certificate (trust anchor for clients): {ca}",
                host=self.config.hostnames[0] if self.config.hostnames else "localhost",
                port=self.sockets[0].getsockname()[1], n=len(self.workers), ca=self.config.ca_certificate_path,
            )
            self.ready.callback(None)

    @staticmethod
    def _why(worker: _Worker, reason: Any) -> str:
        """Why ``worker``'s process ended: the reason it reported, if it
        could not start, else how it ended (exit status or signal)."""
        report = worker.report
        if report.startswith(_FAILED):
            why = report[len(_FAILED):].decode("utf-8", "replace").strip()
            if why:
                return why
        return str(reason.getErrorMessage())

    def _start_failed(self, worker: _Worker, reason: Any) -> None:
        """``worker`` ended before it ever served: what a single process
        does on a start failure, the supervisor does for all."""
        why = self._why(worker, reason)
        self._log.error("estgw could not start: worker {number} failed to start: {why}; stopping every worker",
                        number=worker.number, why=why)
        if not self.ready.called:
            self.ready.errback(StartError(f"worker {worker.number} failed to start: {why}"))

    def startService(self) -> None:
        super().startService()
        self._draining = task.LoopingCall(self._drain)
        self._draining.clock = self.reactor
        self._draining.start(DRAIN_INTERVAL, now=False)
        for worker in self.workers:
            self._spawn(worker)

    async def _stop(self) -> None:
        self._stopping = True
        for call in self._pending.values():
            if call.active():
                call.cancel()
        self._pending.clear()
        waits = []
        for worker in self.workers:
            if worker.process is not None and worker.ended is not None:
                waits.append(worker.ended)
                self._signal(worker, "TERM")
        kill = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)
        await defer.DeferredList(waits)
        if kill.active():
            kill.cancel()
        if self._draining is not None and self._draining.running:
            self._draining.stop()
        self._drain()
        for sock in self.sockets:
            sock.close()

    def _signal(self, worker: _Worker, name: str) -> None:
        if worker.process is not None:
            try:
                worker.process.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def hangup(self) -> None:
        """Send SIGHUP on to every running worker (they reopen their log files)."""
        for worker in self.workers:
            self._signal(worker, "HUP")

    def _kill_all(self) -> None:
        for worker in self.workers:
            self._signal(worker, "KILL")

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


@implementer(IReadDescriptor)
class _ParentPipe:
    """Standard input of a worker: EOF means the supervisor is gone."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason: Any) -> None:
        self.reactor.removeReader(self)
        if self.reactor.running:
            Logger().warn("the supervisor is gone: worker {pid} stops", pid=os.getpid())
            self.reactor.stop()


def _tell(fd: int, line: bytes) -> None:
    try:
        os.write(fd, line[:_REPORT_BYTES])  # a pipe takes this much at once
    except OSError:
        pass  # the supervisor is gone: watch_parent stops this worker
    finally:
        os.close(fd)


def report_failure(fd: int, reason: str) -> None:
    """Tell the supervisor on descriptor ``fd`` (its ready pipe) why this
    worker could not start (one line); then close ``fd``."""
    _tell(fd, _FAILED + " ".join(reason.split()).encode("utf-8", "replace") + b"\n")


def report_start(ready: defer.Deferred[None], fd: int) -> None:
    """Tell the supervisor on descriptor ``fd`` (its ready pipe) that this
    worker serves, once ``ready`` fires, or why it could not start when
    ``ready`` fails (:func:`report_failure`; the failure is passed on)."""

    def served(result: None) -> None:
        _tell(fd, _READY)

    def failed(failure: Any) -> Any:
        report_failure(fd, failure.getErrorMessage() or failure.type.__name__)
        return failure

    ready.addCallbacks(served, failed)


def watch_parent(reactor: Any) -> None:
    """Stop this worker's reactor when the supervisor's pipe closes."""
    reactor.addReader(_ParentPipe(reactor))
