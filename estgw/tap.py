"""``twistd estgw``: options and the service tree.

The configuration is loaded and checked in ``postOptions``, and
``makeService`` creates the state and binds the listening ports, so every
start failure that can be known before the reactor runs (a bad file, an
unreadable key, a port in use) stops twistd with the key or port and the
reason and a non-zero status, before it daemonizes: the terminal that ran
``twistd estgw`` sees it, and no pid file is left behind.  A failure
after that (the store does not open) is logged and ends the process with
a non-zero status.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import wrapServerTLS
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from estgw import audit, bootstrap, collector, config as config_module, lagprobe, limits, logfiles, logs, workers
from estgw.approval.gateway import build_gates, load_approval_tls
from estgw.auth import device_portal, digest_secret
from estgw.ca import CAError
from estgw.ca.publish import keep_fresh, publish_site, published_cas
from estgw.ca.threads import threads_of
from estgw.config import Config, ConfigError
from estgw.daemon import StartError, _listen_now, end_process_on_failure, listen_all, shown_address
from estgw.enroll import Gateway
from estgw.guard import answer_within
from estgw.health import (
    WRITE_CHECK_CACHE,
    WRITE_CHECK_SECONDS,
    Check,
    NotReady,
    cached,
    certificate_in_validity,
    health_resource,
)
from estgw.limits import ConnectionCounts, LimitedEndpoint
from estgw.proxied import ProxyProtocolEndpoint
from estgw.revocation import build_checker
from estgw.store import StoreUnavailable
from estgw.metrics import Metrics, metrics_site
from estgw.tls import server_context_factory, settings_of
from estgw.web import build_site


#: How often the store is looked at for revocations to put on the CRLs.
CRL_REFRESH_SECONDS = 60.0
# How long stopping waits for a CRL signature in progress (seconds).
STOP_WAIT_SECONDS = 5.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Serve EST (RFC 7030 / RFC 8951) over TLS as configured in est.properties."
    optParameters = [
        ["config", "c", "etc/est.properties", "The est.properties file."],
        # --port and --workers are read by their keys' own parsers, in place
        # of the keys (config.from_string): every check sees them.
        ["port", "p", None, "Listen on this TCP port instead of server.port (0: a free port)."],
        ["workers", "w", None, "Run this many worker processes (1 to 64) instead of server.workers."],
        # Internal: a worker of estgw.workers serves the listening sockets it inherited.
        ["worker-fds", None, None, "(internal) serve the inherited listening sockets on these descriptors."],
        ["worker-number", None, 1, "(internal) which worker this is; worker 1 also serves publish.port and coaps.port.", config_module.whole_number],
        ["worker-ready-fd", None, None, "(internal) report on this descriptor that this worker serves, or why it could not start.", config_module.whole_number],
    ]

    def postOptions(self) -> None:
        options = {key: (f"--{name}", self[name])
                   for key, name in (("server.port", "port"), ("server.workers", "workers"))
                   if self[name] is not None}
        try:
            loaded = config_module.load(self["config"], options)
            bootstrap.configured_trust_anchors(loaded)  # unreadable files stop start-up here
            load_approval_tls(loaded)  # so does a wrong idm.tls.password
        except ConfigError as e:
            # Not a usage error: twistd would print its whole usage text
            # before it.  The message names the file and the key, or the option.
            raise SystemExit(f"estgw: {e}") from None
        if self["worker-fds"] is not None:
            try:
                self["worker-fds"] = [config_module.whole_number(fd) for fd in self["worker-fds"].split(",")]
            except ValueError:
                raise usage.UsageError(f"--worker-fds: not descriptor numbers: {self['worker-fds']}") from None
        self.loaded: Config = loaded


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    """A listening socket inherited on descriptor ``fd`` (estgw.workers)."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: Any) -> defer.Deferred[Any]:
        probe = socket.socket(fileno=os.dup(self.fd))
        family = probe.family
        probe.close()
        port = self.reactor.adoptStreamPort(self.fd, family, factory)
        os.close(self.fd)  # adoptStreamPort serves its own duplicate
        return defer.succeed(port)


class GatewayService(service.Service):
    """Opens the store, then listens; stops listening, then closes it."""

    _log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        inherited_fds: list[int] | None = None,
        side_listeners: bool = True,
        settle_gc: bool = False,
        workers: int = 1,
    ) -> None:
        # inherited_fds: a worker (estgw.workers) serves these listening sockets.
        # workers: this is one of that many worker processes, whose config
        # holds its share of the caps (workers.share_of).
        # side_listeners: publish.port and coaps.port, which only one worker binds.
        # settle_gc: this service is the process's (twistd's), not one of
        # several in a test run: tune the garbage collector once it is ready.
        self.inherited_fds = inherited_fds
        self.workers = workers
        self.side_listeners = side_listeners
        self.settle_gc = settle_gc
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.reactor = reactor
        try:
            self.state = bootstrap.initialize(config, reactor)
        except CAError as e:
            raise usage.UsageError(f"{config.source}: state.directory: {e}") from None
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        try:
            # CRLs are verified now: a bad one stops start with the key and the reason.
            self.revocation = build_checker(
                config, self.state.trust_anchors, self.state.issuers, reactor
            )
            # PKCS#12 tokens of approval handlers, opened before listening.
            self.approval_tls = load_approval_tls(config)
            bootstrap.check_store(config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.store = bootstrap.open_store(config, reactor)
        self.ports: list[Any] = []
        self.metrics_ports: list[Any] = []
        self.publish_ports: list[Any] = []
        self.gateway: Gateway | None = None
        self.connection_counts = ConnectionCounts()
        self.publish_connection_counts = ConnectionCounts()
        self.metrics_connection_counts = ConnectionCounts()
        self._serving = False
        self.audit_observer: audit.AuditFileObserver | None = None
        self.published = published_cas(
            self.state.procedures, config.token_procedures, self.store, self.reactor,
            timedelta(hours=config.publish_crl_hours),
            # Half the CA's threads at most: enrollments keep the rest.
            timeout=config.ca_timeout, max_signing=max(1, config.ca_max_overdue // 2),
        )
        self._crl_refresh: Any = None
        self._crl_refresh_ended: defer.Deferred[Any] | None = None
        self.coaps_port: Any = None
        self.ready: defer.Deferred[None] = defer.Deferred()
        self.lag_probe = lagprobe.from_environment(reactor)
        # The store's write check, shared by the probes of WRITE_CHECK_CACHE seconds.
        async def store_writable() -> None:
            await self.store.check_writable(WRITE_CHECK_SECONDS)

        self._store_writable = cached(store_writable, WRITE_CHECK_CACHE, reactor)

    @property
    def port(self) -> Any:
        """The first EST listening port (None before bind or after stop)."""
        return self.ports[0] if self.ports else None

    def build_gateway(self) -> Gateway:
        gateway = Gateway(
            config=self.config,
            store=self.store,
            procedures=self.state.procedures,
            ca_chain=self.state.ca.chain(),
            portal=device_portal(
                # The used Digest nonce counts are the store's: a response
                # is accepted once by all the gateways sharing it.
                self.store, self.reactor, self.state.ca.chain(), digest_secret(self.config.state_directory),
                issuers=self.state.issuers,
                password_cache_seconds=self.config.password_cache_seconds,
            ),
            reactor=self.reactor,
            revocation=self.revocation,
            approvals=build_gates(self.config, self.approval_tls, self.store, self.reactor),
            key_signer=(self.state.server_certificate, self.state.server_key, (self.state.ca.issuing,)),
            metrics=Metrics(self.config.metrics_expiring_days),
        )
        # Thread pools are looked up when scraped: the store's exists once it started.
        pools = {
            "reactor": lambda: self.reactor.getThreadPool() if hasattr(self.reactor, "getThreadPool") else None,
            "store": lambda: getattr(getattr(self.store, "_pool", None), "threadpool", None),
        }
        gateway.metrics.watch(self.store, gateway.ca_guard, pools, self.reactor)
        return gateway

    def _wrap_tls(self, endpoint: Any) -> Any:
        context = server_context_factory(
            self.state.server_key,
            self.state.server_certificate,
            # After a root rollover, NewWithOld lets clients that trust only
            # the old root verify the new chain.
            [self.state.ca.issuing, *self.state.ca.new_with_old],
            self.state.trust_anchors,
            settings_of(self.config),
        )
        # Connection caps outside TLS: a refused connection costs no handshake.
        if self.config.proxy_protocol:
            # The PROXY header comes before the TLS handshake.  The total
            # cap counts TCP connections as they are accepted; the client
            # of the per-client cap is the one the header names, counted
            # once the header is read.
            return wrapServerTLS(context, ProxyProtocolEndpoint(
                self._capped(endpoint, clients_here=False), self.config.max_connections_per_client,
                self.refused_connection, self.connection_counts,
            ))
        return wrapServerTLS(context, self._capped(endpoint))

    def _capped(self, endpoint: Any, counts: ConnectionCounts | None = None, listener: str = "",
                clients_here: bool = True) -> Any:
        """``endpoint`` under the connection caps, server.maxConnections and
        server.maxConnectionsPerClient (unless ``clients_here`` is False:
        :class:`estgw.proxied.ClientLimits` counts them), counted over every
        address of one listener: the EST listener's count (the default) or
        the publishing listener's own, so that neither can starve the other."""
        where = "in all" + listener
        if self.workers > 1:
            where = f"in this worker process{listener} (server.maxConnections over {self.workers} workers)"
        else:
            where += " (server.maxConnections)"
        return LimitedEndpoint(
            endpoint, self.config.max_connections, self.config.max_connections_per_client,
            self.refused_connection, self.connection_counts if counts is None else counts, where, clients_here,
        )

    def _capped_publish(self, endpoint: Any) -> Any:
        return self._capped(endpoint, self.publish_connection_counts, " on the publishing listener")

    def _capped_metrics(self, endpoint: Any) -> Any:
        """The metrics and health listener's own cap (limits.METRICS_CONNECTIONS),
        so that a flood of the other listeners never starves /health."""
        # One address may hold half of them at most, so that one client
        # cannot take /health from the others.
        per_client = limits.METRICS_CONNECTIONS // 2
        if self.config.max_connections_per_client:
            per_client = min(per_client, self.config.max_connections_per_client)
        return LimitedEndpoint(
            endpoint, limits.METRICS_CONNECTIONS, per_client,
            self.refused_connection, self.metrics_connection_counts, "on the metrics listener",
        )

    def refused_connection(self, code: str) -> None:
        if self.gateway is not None:
            self.gateway.metrics.refusal(code)

    def readiness_checks(self) -> Mapping[str, Check]:
        """What ``/health/ready`` asks; nothing (not ready) unless serving:
        the store answers a read and could take a write; every token
        procedure's CA certificate is valid and its CA not hung."""
        if not self._serving or self.gateway is None:
            return {}
        procedures = self.gateway.procedures
        guard = self.gateway.ca_guard
        writable = self._store_writable

        async def store() -> None:
            # What failed, in words naming no file, host or user; the log
            # gets the store's own message.
            try:
                await self.store.get_certificate(0)
                await writable()
            except StoreUnavailable as e:
                raise NotReady(e.fault, str(e)) from None

        async def ca() -> None:
            # Token procedure names and CA subjects: public (cacerts, the
            # publishing URLs).
            for name, procedure in procedures.items():
                chain = procedure.chain()
                if not chain:
                    raise NotReady(f"token procedure {name}: its CA certificates are not known yet")
                try:
                    certificate_in_validity(chain[0])
                except ValueError as e:
                    raise NotReady(str(e)) from None
            hung = [why for why in map(guard.unavailable, procedures) if why is not None]
            if hung:
                raise NotReady("; ".join(hung))

        return {"store": store, "ca": ca}

    def bind(self) -> None:
        """Bind the EST (and metrics, publish, CoAPs) ports now, before the reactor runs,
        so a port in use stops twistd before it daemonizes; accept
        nothing until the store is open (connections wait in the listen
        backlog).  StartError names the address, the port and the reason."""
        if self.ports:
            return
        self.gateway = gateway = self.build_gateway()
        health = health_resource(self.readiness_checks, self.reactor)
        site = build_site(gateway)
        site.resource.putChild(b"health", health)
        if self.inherited_fds is not None:
            self.ports = [
                _listen_now(self._wrap_tls(_AdoptedEndpoint(self.reactor, fd)), site) for fd in self.inherited_fds
            ]
        else:
            self.ports = listen_all(
                self.reactor, self.config.interface, self.config.port, site, self._wrap_tls
            )
        for port in self.ports:
            port.stopReading()
        try:
            if self.config.metrics_port is not None:
                operations = metrics_site(gateway.metrics, self.config)
                operations.resource.putChild(b"health", health)
                self.metrics_ports = listen_all(
                    self.reactor, self.config.metrics_interface, self.config.metrics_port,
                    operations, self._capped_metrics, what="metrics",
                )
            if self.config.publish_port is not None and self.side_listeners:
                self.publish_ports = listen_all(
                    self.reactor, self.config.publish_interface, self.config.publish_port,
                    # Relying parties may be anywhere: the same request limits.
                    publish_site(self.published, self.config, gateway.metrics),
                    self._capped_publish, what="CRL publishing",
                )
            if self.config.coaps_port is not None and self.side_listeners:
                self.coaps_port = self._listen_coaps(gateway)
        except BaseException:
            for port in self.ports + self.metrics_ports + self.publish_ports:
                port.stopListening()
            self.ports, self.metrics_ports, self.publish_ports = [], [], []
            raise

    def _listen_coaps(self, gateway: Gateway) -> Any:
        """EST over CoAPs (RFC 9148) on coaps.port; reads nothing until the store is open."""
        from twisted.internet.error import CannotListenError

        from estgw.coaps.dtls import dtls_context
        from estgw.coaps.resource import listen_coaps

        context = dtls_context(
            self.state.server_key,
            self.state.server_certificate,
            [self.state.ca.issuing, *self.state.ca.new_with_old],  # as the TLS listener sends it
            self.state.trust_anchors,
            settings_of(self.config),
        )
        assert self.config.coaps_port is not None
        try:
            port = listen_coaps(
                self.reactor, gateway, context, self.config.coaps_port, self.config.coaps_interface
            )
        except CannotListenError as e:
            reason = getattr(e.socketError, "strerror", None) or str(e.socketError)
            raise StartError(f"cannot listen on UDP port {self.config.coaps_port} (coaps.port): {reason}") from None
        port.stopReading()
        return port

    async def _open(self) -> None:
        await self.store.start()
        assert self.gateway is not None
        await self.gateway.portal.start()
        if self.publish_ports:
            # CRLs re-signed after revocations (also by `estgw cert revoke` in
            # another process) and before their nextUpdate.
            self._crl_refresh = keep_fresh(self.published, self.reactor)
            self._crl_refresh_ended = self._crl_refresh.start(CRL_REFRESH_SECONDS, now=True)
        if self.settle_gc:
            collector.settle()
        for port in self.ports:
            port.startReading()
        if self.lag_probe is not None:
            self.lag_probe.start()
        if self.coaps_port is not None:
            self.coaps_port.startReading()
            self._log.info(
                "estgw serving EST over CoAPs at coaps://{host}:{port}/.well-known/est/",
                host=self.config.hostnames[0] if self.config.hostnames else "localhost",
                port=self.coaps_port.getHost().port,
            )
        self._serving = True
        self._log.info(
            "listening on {addresses}",
            addresses=", ".join(
                shown_address(p.getHost()) for p in self.ports + self.metrics_ports + self.publish_ports
            ),
        )
        host = self.config.hostnames[0] if self.config.hostnames else "localhost"
        self._log.info(
            "estgw serving EST at https://{host}:{port}/.well-known/est/ ; "
            "CA certificate (trust anchor for clients): {ca}",
            host=host,
            port=self.port.getHost().port,
            ca=self.config.ca_certificate_path,
        )

    def startService(self) -> None:
        if self.config.audit_file and self.audit_observer is None:
            try:
                self.audit_observer = audit.start_audit_file(self.config.audit_file)
            except OSError as e:
                raise StartError(f"log.audit.file: cannot open {self.config.audit_file}: {e.strerror}") from None
        self.bind()
        super().startService()
        d = defer.Deferred.fromCoroutine(self._open())

        def failed(failure: Any) -> Any:
            self._log.failure("estgw could not start", failure)
            return failure

        d.addErrback(failed)
        d.chainDeferred(self.ready)

    async def _stop(self) -> None:
        self._serving = False  # /health/ready says 503 from now on
        probe, self.lag_probe = self.lag_probe, None
        if probe is not None:
            probe.stop()
        ports, self.ports = self.ports, []  # stopping twice is harmless
        metrics, self.metrics_ports = self.metrics_ports, []
        publish, self.publish_ports = self.publish_ports, []
        for port in ports + metrics + publish:
            await defer.maybeDeferred(port.stopListening)
        coaps, self.coaps_port = self.coaps_port, None
        if coaps is not None:
            await defer.maybeDeferred(coaps.stopListening)
        refresh, self._crl_refresh = self._crl_refresh, None
        if refresh is not None and refresh.running:
            refresh.stop()
        ended, self._crl_refresh_ended = self._crl_refresh_ended, None
        if ended is not None:
            # A CRL being signed (the first one starts with the service) is
            # let finish, so its file is written whole and no CA call is
            # left behind; a CA that hangs holds the stop only so long.
            try:
                await answer_within(self.reactor, STOP_WAIT_SECONDS, ended)
            except defer.TimeoutError:
                self._log.warn("stopping while a CRL is still being signed (waited {seconds:g} s)",
                               seconds=STOP_WAIT_SECONDS)
        if self.gateway is not None:
            await self.gateway.portal.close()
        for procedure in self.state.procedures.values():
            threads = threads_of(procedure)
            if threads is not None:
                threads.stop()
        await self.store.close()
        observer, self.audit_observer = self.audit_observer, None
        if observer is not None:
            audit.stop_audit_file(observer)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


def _supervisor(options: Options, reactor: Any) -> workers.Supervisor:
    config = options.loaded
    try:
        # The state is created once, here, not raced for by the workers.
        bootstrap.initialize(config, reactor)
        bootstrap.check_store(config)
        digest_secret(config.state_directory)
    except CAError as e:
        raise SystemExit(f"estgw: {config.source}: state.directory: {e}") from None
    except ConfigError as e:
        raise SystemExit(f"estgw: {e}") from None
    try:
        sockets = workers.bind(config.interface, config.port)
    except StartError as e:
        raise SystemExit(f"estgw: {e}") from None
    return workers.Supervisor(config, options["config"], sockets, reactor)


_log = Logger()


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    try:
        return _make_service(options, reactor)
    except SystemExit as e:
        if options["worker-fds"] is not None and options["worker-ready-fd"] is not None:
            # The supervisor's own log line then says why.
            workers.report_failure(options["worker-ready-fd"], str(e.code).removeprefix("estgw: "))
        raise


def _make_service(options: Options, reactor: Any) -> service.MultiService:
    config = options.loaded
    worker = options["worker-fds"] is not None
    # A worker's events go to its supervisor as JSON (twistd --logger).
    # Otherwise estgw writes the human log itself whenever it goes to a
    # file (log.file, else twistd's --logfile), so that it reopens after
    # a rotation (estgw.logfiles).
    observer = None
    log_file = None
    if not worker:
        path = config.log_file or logs.twistd_log_file(options)
        if path is not None:
            try:
                log_file = logs.open_log_file(config, path)
            except OSError as e:
                key = "log.file" if config.log_file else "--logfile"
                raise SystemExit(f"estgw: {key}: cannot open {path}: {e.strerror}") from None
        if log_file is not None or logs.configured(config):
            observer = logs.human_observer(config, log_file=log_file)
    top = logs.LoggingService(observer)
    # SIGHUP reopens the log files (and goes on to the workers); SIGUSR1
    # rotates the human log as twistd does for its --logfile.
    signals = logfiles.SignalService(reactor, rotate=log_file.rotate if log_file is not None else None)
    signals.setServiceParent(top)
    try:
        # Before any listener exists: a cap the system's descriptor limit
        # would beat is refused here, with the numbers.
        raised = limits.ensure_descriptors(
            config.max_connections, config.workers, config.publish_port is not None, config.metrics_port is not None
        )
    except ValueError as e:
        raise SystemExit(f"estgw: {config.source}: {e}") from None
    if raised is not None and not worker:
        _log.info(
            "raised the open files limit (RLIMIT_NOFILE) from {before} to {after} for server.maxConnections",
            before=raised[0], after=raised[1],
        )
    if not worker and config.workers > 1:
        supervisor = _supervisor(options, reactor)
        signals.on_hangup.append(supervisor.hangup)
        # A worker that could not start ends the supervisor, as a start
        # failure ends a single process.
        end_process_on_failure(supervisor.ready, supervisor.reactor)
        supervisor.setServiceParent(top)
        return top
    try:
        gateway = GatewayService(
            workers.share_of(config) if worker else config, reactor, inherited_fds=options["worker-fds"],
            side_listeners=options["worker-number"] == 1, settle_gc=True, workers=config.workers if worker else 1,
        )
        gateway.bind()
    except (usage.UsageError, StartError) as e:
        # twistd shows a traceback for errors raised here; the message is
        # what the operator needs, and the exit status is non-zero.
        raise SystemExit(f"estgw: {e}") from None
    if worker and options["worker-ready-fd"] is not None:
        # Before end_process_on_failure, which ends the failure's chain.
        workers.report_start(gateway.ready, options["worker-ready-fd"])
    end_process_on_failure(gateway.ready, gateway.reactor)
    gateway.setServiceParent(top)
    if worker:
        workers.watch_parent(gateway.reactor)
    return top
