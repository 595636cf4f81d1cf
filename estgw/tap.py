"""``twistd estgw``: options and the service tree.

The configuration is loaded and checked in ``postOptions`` so a bad file
stops twistd before anything listens, with the key and the reason.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.logger import Logger
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint
from zope.interface import implementer
from twisted.python import usage
from twisted.python.failure import Failure

from estgw import bootstrap, config as config_module, lagprobe, logs, workers
from estgw.approval.gateway import build_gates, load_approval_tls
from estgw.auth import device_portal, digest_nonce_counts, digest_secret
from estgw.ca import CAError
from estgw.ca.publish import keep_fresh, publish_site, published_cas
from estgw.config import Config, ConfigError
from estgw.enroll import Gateway
from estgw.revocation import build_checker
from estgw.metrics import metrics_site
from estgw.tls import server_context_factory, settings_of
from estgw.web import build_site


#: How often the store is looked at for revocations to put on the CRLs.
CRL_REFRESH_SECONDS = 60.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Serve EST (RFC 7030 / RFC 8951) over TLS as configured in est.properties."
    optParameters = [
        ["config", "c", "etc/est.properties", "The est.properties file."],
        ["port", "p", None, "Listen on this TCP port instead of server.port.", int],
        ["workers", "w", None, "Run this many worker processes instead of server.workers.", int],
        # Internal: a worker of estgw.workers serves the listening socket it inherited on this fd.
        ["worker-fd", None, None, "(internal) serve the inherited listening socket on this descriptor.", int],
        ["worker-number", None, 1, "(internal) which worker this is; worker 1 also serves publish.port and coaps.port.", int],
    ]

    def postOptions(self) -> None:
        try:
            loaded = config_module.load(self["config"])
            bootstrap.configured_trust_anchors(loaded)  # unreadable files stop start-up here
            load_approval_tls(loaded)  # so does a wrong idm.tls.password
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        if self["port"] is not None:
            if not 0 <= self["port"] <= 65535:
                raise usage.UsageError(f"--port: not a TCP port: {self['port']}")
            import attr

            loaded = attr.evolve(loaded, port=self["port"])
        if self["workers"] is not None:
            if not 1 <= self["workers"] <= 64:
                raise usage.UsageError(f"--workers: must be from 1 to 64, not {self['workers']}")
            if self["workers"] > 1 and loaded.metrics_port is not None:
                raise usage.UsageError(f"{loaded.source}: metrics.port: not available with --workers above 1")
            import attr

            loaded = attr.evolve(loaded, workers=self["workers"])
        self.loaded: Config = loaded


def _listen_now(endpoint: Any, factory: Any, number: int) -> Any:
    """Listen before the reactor runs (TCP endpoints answer at once)."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], Failure):
        reason = outcome[0].getErrorMessage() if outcome else "listening did not complete"
        raise SystemExit(f"estgw: cannot listen on port {number}: {reason}")
    return outcome[0]


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    """A listening socket inherited on descriptor ``fd`` (estgw.workers)."""

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd

    def listen(self, factory: Any) -> defer.Deferred:
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
        self, config: Config, reactor: Any = None, inherited_fd: int | None = None, side_listeners: bool = True
    ) -> None:
        # inherited_fd: a worker (estgw.workers) serves this listening socket.
        # side_listeners: publish.port and coaps.port, which only one worker binds.
        self.inherited_fd = inherited_fd
        self.side_listeners = side_listeners
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
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self.store = bootstrap.open_store(config, reactor)
        self.port: Any = None
        self.gateway: Gateway | None = None
        self.metrics_port: Any = None
        self.publish_port: Any = None
        self.published = published_cas(
            self.state.procedures, config.token_procedures, self.store, self.reactor,
            timedelta(hours=config.publish_crl_hours),
        )
        self._crl_refresh: Any = None
        self.coaps_port: Any = None
        self.ready: defer.Deferred = defer.Deferred()
        self.lag_probe = lagprobe.from_environment(reactor)

    def build_gateway(self) -> Gateway:
        return Gateway(
            config=self.config,
            store=self.store,
            procedures=self.state.procedures,
            ca_chain=self.state.ca.chain(),
            portal=device_portal(
                self.store, self.reactor, self.state.ca.chain(), digest_secret(self.config.state_directory),
                digest_nonce_counts(self.config.state_directory, self.reactor),
                issuers=self.state.issuers,
                password_cache_seconds=self.config.password_cache_seconds,
            ),
            reactor=self.reactor,
            revocation=self.revocation,
            approvals=build_gates(self.config, self.approval_tls, self.store, self.reactor),
            key_signer=(self.state.server_certificate, self.state.server_key, (self.state.ca.issuing,)),
        )

    def _context(self) -> Any:
        return server_context_factory(
            self.state.server_key,
            self.state.server_certificate,
            # After a root rollover, NewWithOld lets clients that trust only
            # the old root verify the new chain.
            [self.state.ca.issuing, *self.state.ca.new_with_old],
            self.state.trust_anchors,
            settings_of(self.config),
        )

    def _endpoint(self) -> Any:
        """TLS on server.port, or on the socket a supervisor handed down."""
        if self.inherited_fd is not None:
            endpoint: Any = _AdoptedEndpoint(self.reactor, self.inherited_fd)
        else:
            interface = self.config.interface
            tcp = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            endpoint = tcp(self.reactor, self.config.port, interface=interface)
        if self.config.proxy_protocol:
            # The PROXY header comes before the TLS handshake.
            endpoint = proxyEndpoint(endpoint)
        return wrapServerTLS(self._context(), endpoint)

    def _listen(self) -> Any:
        """Bind the port now, before the reactor runs, so a port in use
        stops twistd with a message and a non-zero status; accept nothing
        until the store is open (connections wait in the listen backlog)."""
        gateway = self.gateway = self.build_gateway()
        port = _listen_now(self._endpoint(), build_site(gateway), self.config.port)
        port.stopReading()
        if self.config.metrics_port is not None:
            endpoint = TCP4ServerEndpoint(
                self.reactor, self.config.metrics_port, interface=self.config.metrics_interface
            )
            self.metrics_port = _listen_now(endpoint, metrics_site(gateway.metrics), self.config.metrics_port)
        if self.config.publish_port is not None and self.side_listeners:
            interface = self.config.publish_interface
            tcp = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            self.publish_port = _listen_now(
                tcp(self.reactor, self.config.publish_port, interface=interface),
                publish_site(self.published),
                self.config.publish_port,
            )
        if self.config.coaps_port is not None and self.side_listeners:
            self.coaps_port = self._listen_coaps(gateway)
        return port

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
        try:
            port = listen_coaps(
                self.reactor, gateway, context, self.config.coaps_port, self.config.coaps_interface
            )
        except CannotListenError as e:
            raise SystemExit(f"estgw: cannot listen on UDP port {self.config.coaps_port} (coaps.port): {e.socketError}")
        port.stopReading()
        return port

    async def _open(self) -> None:
        await self.store.start()
        await self.gateway.portal.start()
        if self.publish_port is not None:
            # CRLs re-signed after revocations (also by `estgw cert revoke` in
            # another process) and before their nextUpdate.
            self._crl_refresh = keep_fresh(self.published, self.reactor)
            self._crl_refresh.start(CRL_REFRESH_SECONDS, now=True)
        self.port.startReading()
        if self.lag_probe is not None:
            self.lag_probe.start()
        if self.coaps_port is not None:
            self.coaps_port.startReading()
            self._log.info(
                "estgw serving EST over CoAPs at coaps://{host}:{port}/.well-known/est/",
                host=self.config.hostnames[0] if self.config.hostnames else "localhost",
                port=self.coaps_port.getHost().port,
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
        self.port = self._listen()
        super().startService()
        d = defer.Deferred.fromCoroutine(self._open())

        def failed(failure: Any) -> None:
            self._log.failure("estgw could not start", failure)
            if self.reactor.running:
                self.reactor.stop()

        d.addCallbacks(self.ready.callback, failed)

    async def _stop(self) -> None:
        probe, self.lag_probe = self.lag_probe, None
        if probe is not None:
            probe.stop()
        port, self.port = self.port, None  # stopping twice is harmless
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        coaps, self.coaps_port = self.coaps_port, None
        if coaps is not None:
            await defer.maybeDeferred(coaps.stopListening)
        metrics, self.metrics_port = self.metrics_port, None
        if metrics is not None:
            await defer.maybeDeferred(metrics.stopListening)
        publish, self.publish_port = self.publish_port, None
        if publish is not None:
            await defer.maybeDeferred(publish.stopListening)
        refresh, self._crl_refresh = self._crl_refresh, None
        if refresh is not None and refresh.running:
            refresh.stop()
        if self.gateway is not None:
            await self.gateway.portal.close()
        await self.store.close()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return defer.Deferred.fromCoroutine(self._stop())


def _supervisor(options: Options, reactor: Any) -> workers.Supervisor:
    config = options.loaded
    try:
        # The state is created once, here, not raced for by the workers.
        bootstrap.initialize(config, reactor)
        digest_secret(config.state_directory)
    except CAError as e:
        raise SystemExit(f"estgw: {config.source}: state.directory: {e}") from None
    except ConfigError as e:
        raise SystemExit(f"estgw: {e}") from None
    try:
        sock = workers.bind(config.interface, config.port)
    except OSError as e:
        raise SystemExit(f"estgw: cannot listen on port {config.port}: {e.strerror}") from None
    return workers.Supervisor(config, options["config"], sock, reactor)


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    config = options.loaded
    worker = options["worker-fd"] is not None
    # A worker's events go to its supervisor as JSON (twistd --logger).
    observer = None
    if not worker and logs.configured(config):
        try:
            observer = logs.human_observer(config)
        except OSError as e:
            raise SystemExit(f"estgw: log.file: cannot open {config.log_file}: {e.strerror}") from None
    top = logs.LoggingService(observer)
    if not worker and config.workers > 1:
        _supervisor(options, reactor).setServiceParent(top)
        return top
    try:
        gateway = GatewayService(
            config, reactor, inherited_fd=options["worker-fd"], side_listeners=options["worker-number"] == 1
        )
    except usage.UsageError as e:
        # twistd shows a traceback for errors raised here; the message is
        # what the operator needs, and the exit status is non-zero.
        raise SystemExit(f"estgw: {e}") from None
    gateway.setServiceParent(top)
    if worker:
        workers.watch_parent(gateway.reactor)
    return top
