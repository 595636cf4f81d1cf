"""Test helpers for manual approval, for estgw's tests and anyone wiring
a gateway to an approval service.

* :class:`FakeApprovalService`: the contract of docs/approval-api.rst in
  memory, as a twisted.web resource for ``treq.testing.StubTreq``, with
  switches for the faults a real service has (5xx, garbage, no answer);
* :class:`RunningApprovalService`: the real reference service over TLS on
  127.0.0.1 with a fresh state directory, plus the gateway token and the
  operator credentials it trusts;
* :func:`idm_gateway_config`: est.properties text for a gateway with one
  approval handler pointing at such a service.

Keys made here are test data.
"""

from __future__ import annotations

import json
import os
from typing import Any

import attr
from twisted.internet import defer
from twisted.web import resource, server

from estgw.approval import config as config_module, pki
from estgw.approval.service import ApprovalService

__all__ = ["FakeApprovalService", "RunningApprovalService", "idm_gateway_config"]


class FakeApprovalService(resource.Resource):
    """An in-memory approval service at any URL path ending in the
    collection; ``mode`` switches its behaviour:

    ``ok`` (the contract), ``error`` (503 to everything), ``garbage`` (200
    with a body that is not JSON), ``hang`` (never answers).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.mode = "ok"
        self.requests: dict[str, dict[str, Any]] = {}  # request id -> submission + status
        self.calls: list[tuple[str, str]] = []  # (method, path) of every request seen
        self.submissions = 0  # POSTs that created a request
        self.hanging: list[Any] = []

    def decide(self, request_id: str, status: str, reason: str | None = None, by: str = "CN=tester") -> None:
        entry = self.requests[request_id]
        entry.update(status=status, reason=reason, decidedBy=by)

    def forget(self, request_id: str) -> None:
        del self.requests[request_id]

    def render(self, request: Any) -> Any:
        self.calls.append((request.method.decode(), request.path.decode()))
        if self.mode == "hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        if self.mode == "error":
            request.setResponseCode(503)
            return b'{"error": "maintenance"}'
        if self.mode == "garbage":
            return b"<html>not what you wanted</html>"
        request.setHeader(b"Content-Type", b"application/json")
        segments = [s.decode() for s in request.postpath if s]
        if request.method == b"POST":
            return self._submit(request)
        if request.method == b"GET" and segments:
            entry = self.requests.get(segments[-1])
            if entry is None:
                request.setResponseCode(404)
                return b'{"error": "no such request"}'
            return self._status(entry)
        request.setResponseCode(405)
        return b'{"error": "not here"}'

    def _submit(self, request: Any) -> bytes:
        body = json.loads(request.content.read())
        entry = self.requests.get(body["requestId"])
        if entry is None:
            entry = dict(body, status="pending", reason=None, decidedBy=None)
            self.requests[body["requestId"]] = entry
            self.submissions += 1
            request.setResponseCode(201)
        return self._status(entry)

    @staticmethod
    def _status(entry: dict[str, Any]) -> bytes:
        keys = ("requestId", "status", "reason", "decidedBy")
        return json.dumps({k: entry.get(k) for k in keys}).encode()


SERVICE_CONFIG = """\
service.port = {port}
service.interface = 127.0.0.1
service.hostnames = 127.0.0.1, localhost
state.directory = state
"""


@attr.s(auto_attribs=True)
class RunningApprovalService:
    """The reference approval service on 127.0.0.1 with its own state."""

    directory: str
    reactor: Any = None
    service: Any = None
    port: int = 0

    @classmethod
    async def start(cls, testcase: Any, reactor: Any = None) -> RunningApprovalService:
        """Start one for a trial TestCase; it stops in the test's cleanup."""
        running = cls(os.path.abspath(testcase.mktemp()), reactor)
        os.makedirs(running.directory)
        await running.run()
        testcase.addCleanup(running.stop)
        return running

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "approval.properties")

    async def run(self, port: int = 0) -> None:
        """Start (again); ``port`` 0: a free one."""
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(SERVICE_CONFIG.format(port=port))
        self.config = config_module.load(self.config_path)
        self.service = ApprovalService(self.config, self.reactor)
        self.service.startService()
        await self.service.ready
        self.port = self.service.port.getHost().port

    def stop(self) -> defer.Deferred[None]:
        if self.service is None or not self.service.running:
            return defer.succeed(None)
        return self.service.stopService()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}{config_module.REQUEST_PATH}"

    @property
    def ca_file(self) -> str:
        """What gateways name in idm.tls.trustAnchors."""
        return os.path.join(self.config.ca_directory, "root-ca.pem")

    @property
    def operator(self) -> tuple[str, str]:
        """The default operator's certificate and key files."""
        return pki.default_operator_paths(self.config)

    def operator_options(self) -> list[str]:
        """``estgw approval`` options that reach this service as its operator."""
        certificate, key = self.operator
        return ["--url", self.url, "--cert", certificate, "--key", key, "--cacert", self.ca_file]

    def issue_gateway_token(self, path: str, password: str, name: str = "estgw-ra") -> str:
        """A PKCS#12 token this service accepts from a gateway."""
        key, certificate = pki.issue_client(self.service.pki.gateway_ca, name, "gateways")
        pki.write_pkcs12(path, key, certificate, self.service.pki.gateway_ca, password)
        return path

    def issue_operator_token(self, path: str, password: str, name: str = "not-a-gateway") -> str:
        """A PKCS#12 token with an *operator* certificate: not one a gateway may use."""
        key, certificate = pki.issue_client(self.service.pki.operator_ca, name, "operators")
        pki.write_pkcs12(path, key, certificate, self.service.pki.operator_ca, password)
        return path


GATEWAY_CONFIG = """\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
tokenprocedure.1.name = EST Registration and Enroll Procedure
tokenprocedure.1.validity.days = 30
handler.1.operation = cacerts
handler.3.operation = simpleenroll
handler.3.filter = registersimpleenroll-basic-idm-auth
handler.3.format = est-simpleenroll-idm
handler.3.tokenprocedure = EST Registration and Enroll Procedure
handler.3.authtype = Basic
handler.3.realm = EST Realm
handler.3.idm.requestUrl = {url}
handler.3.idm.tls.token = {token}
handler.3.idm.tls.password = {password}
handler.3.idm.tls.trustAnchors = {ca}
handler.3.idm.retryAfter = {retry_after}
handler.3.idm.timeout = {timeout}
"""


def idm_gateway_config(
    url: str, token: str, password: str, ca: str, retry_after: int = 7, timeout: float = 5
) -> str:
    """est.properties text: cacerts, and simpleenroll with manual approval (handler 3)."""
    return GATEWAY_CONFIG.format(
        url=url, token=token, password=password, ca=ca, retry_after=retry_after, timeout=timeout
    )
