"""docs/approval-api.rst "Running it on one machine", run as written on a
copy of a fresh clone: both daemons really daemonized by twistd, the
operator CLI, curl and openssl."""

from __future__ import annotations

import os
import socket
import sys

from cryptography import x509
from twisted.trial.unittest import TestCase

from estgw.testing import run_process
from tests.test_readme import literal_blocks, git_status, repository_copy
from tests.test_twistd import REPO, _alive, _sleep, _wait, environment

DOC = os.path.join(REPO, "docs", "approval-api.rst")
SECTION = "Running it on one machine"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _replace(path: str, old: str, new: str) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert old in text, (path, old)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, new))


class ApprovalWalkthroughTests(TestCase):
    timeout = 240

    async def test_walkthrough_as_written(self) -> None:
        """Every command succeeds in order (bash -e): the device gets 202,
        the operator approves the listed request, the retry gets its
        certificate, both daemons stop; git then shows only the one edit
        the walk-through asks for (no key or state left unignored)."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        # Free ports instead of 8443/8444, which may be taken on this machine.
        gateway_port, service_port = _free_port(), _free_port()

        def other_ports(directory: str) -> None:
            etc = os.path.join(directory, "etc")
            _replace(os.path.join(etc, "est.properties"), "server.port = 8443", f"server.port = {gateway_port}")
            _replace(os.path.join(etc, "est.properties"), "localhost:8444", f"localhost:{service_port}")
            _replace(os.path.join(etc, "approval.properties"), "service.port = 8444", f"service.port = {service_port}")

        await repository_copy(directory, other_ports)
        with open(DOC, encoding="utf-8") as f:
            (walkthrough,) = literal_blocks(f.read(), SECTION)[:1]
        self.addCleanup(self._kill_daemons, directory)
        request_id = (
            "$(.venv/bin/estgw approval -C etc/approval.properties list --json | "
            f"{sys.executable} -c 'import json, sys; print(json.load(sys.stdin)[0][\"requestId\"])')"
        )
        script = "\n".join(line for line in walkthrough if not line.lstrip().startswith("#"))
        script = script.replace("localhost:8443", f"localhost:{gateway_port}").replace("REQUEST-ID", request_id)
        env = dict(environment(), PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        result = await _wait(run_process(["/bin/bash", "-e", "-c", script], env=env, path=directory), 180)
        output = result.stdout.decode()
        self.assertEqual(result.code, 0, output + result.stderr.decode())

        lines = output.splitlines()
        self.assertIn("202", lines)
        self.assertTrue(any(line.startswith("the request awaits an operator's approval (request ") for line in lines))
        self.assertTrue(any(line.startswith("approved ") and line.endswith("(CN=pump-18)") for line in lines))
        self.assertIn("200", lines)
        self.assertIn("    idm.tls.token = protocol-gateway-ra.p12", lines)
        self.assertIn("    idm.tls.trustAnchors = approval-state/ca/root-ca.pem", lines)
        with open(os.path.join(directory, "demo", "pump-18.pem"), "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(certificate.subject.rfc4514_string(), "CN=pump-18")

        for name in ("estgw.pid", "approval.pid"):  # step 8 stopped them
            for _ in range(100):
                if not os.path.exists(os.path.join(directory, "demo", name)):
                    break
                await _sleep(0.1)
            self.assertFalse(os.path.exists(os.path.join(directory, "demo", name)), name)
        self.assertEqual(await git_status(directory), [" M etc/est.properties"])

    async def _kill_daemons(self, directory: str) -> None:
        for name in ("estgw.pid", "approval.pid"):
            path = os.path.join(directory, "demo", name)
            if not os.path.exists(path):
                continue
            with open(path) as f:
                pid = int(f.read())
            if _alive(pid):
                os.kill(pid, 15)
            for _ in range(100):
                if not _alive(pid):
                    break
                await _sleep(0.1)
