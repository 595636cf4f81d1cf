"""``twistd estgw``: options and the service tree.

The configuration is loaded and checked in ``postOptions`` so a bad file
stops twistd before anything listens, with the key and the reason.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from estgw import bootstrap, config as config_module
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
        self.loaded: Config = loaded


def _listen_now(endpoint: Any, factory: Any, number: int) -> Any:
    """Listen before the reactor runs (TCP endpoints answer at once)."""
    outcome: list[Any] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome or isinstance(outcome[0], Failure):
        reason = outcome[0].getErrorMessage() if outcome else "listening did not complete"
        raise SystemExit(f"estgw: cannot listen on port {number}: {reason}")
    return outcome[0]


class GatewayService(service.Service):
    """Opens the store, then listens; stops listening, then closes it."""

    _log = Logger()

    def __init__(self, config: Config, reactor: Any = None) -> None:
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
            ),
            reactor=self.reactor,
            revocation=self.revocation,
            approvals=build_gates(self.config, self.approval_tls, self.store, self.reactor),
            key_signer=(self.state.server_certificate, self.state.server_key, (self.state.ca.issuing,)),
        )

    def _endpoint(self) -> Any:
        interface = self.config.interface
        tcp = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
        context = server_context_factory(
            self.state.server_key,
            self.state.server_certificate,
            # After a root rollover, NewWithOld lets clients that trust only
            # the old root verify the new chain.
            [self.state.ca.issuing, *self.state.ca.new_with_old],
            self.state.trust_anchors,
            settings_of(self.config),
        )
        return wrapServerTLS(context, tcp(self.reactor, self.config.port, interface=interface))

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
        if self.config.publish_port is not None:
            interface = self.config.publish_interface
            tcp = TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint
            self.publish_port = _listen_now(
                tcp(self.reactor, self.config.publish_port, interface=interface),
                publish_site(self.published),
                self.config.publish_port,
            )
        if self.config.coaps_port is not None:
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


def makeService(options: Options, reactor: Any = None) -> service.MultiService:
    top = service.MultiService()
    try:
        gateway = GatewayService(options.loaded, reactor)
    except usage.UsageError as e:
        # twistd shows a traceback for errors raised here; the message is
        # what the operator needs, and the exit status is non-zero.
        raise SystemExit(f"estgw: {e}") from None
    gateway.setServiceParent(top)
    return top
