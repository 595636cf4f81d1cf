"""The real daemon (``twistd -n estgw``) and a blocking EST client, for the
crash-safety and soak benchmarks (and the test that runs the former).

Everything is local: the daemon listens on 127.0.0.1 only, with the shipped
est.properties in a fresh directory; clients use the stdlib ssl module and
trust the CA the daemon made.  Keys made here are test data.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "etc", "est.properties")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
READY = re.compile(rb"serving EST at https://[^:/]+:([0-9]+)/\.well-known/est/")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    # The repo root first, so twisted.plugins finds twisted/plugins/estgw_plugin.py.
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


class Daemon:
    """``twistd -n estgw`` on 127.0.0.1 in ``directory`` (shipped config)."""

    def __init__(self, directory: str, extra_config: str = "") -> None:
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.config = os.path.join(self.directory, "est.properties")
        if not os.path.exists(self.config):
            with open(SHIPPED) as f:
                text = re.sub(r"(?m)^server\.interface *=.*$", "server.interface = 127.0.0.1", f.read())
            with open(self.config, "w") as f:
                f.write(text + "\n" + extra_config)
        self.process: subprocess.Popen[bytes] | None = None
        self.output = b""
        self.port = 0

    @property
    def ca_file(self) -> str:
        return os.path.join(self.directory, "state", "ca", "root-ca.pem")

    @property
    def store_path(self) -> str:
        return os.path.join(self.directory, "state", "estgw.sqlite")

    def cli(self, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "estgw.cli", "--config", self.config, *args],
            input=stdin, capture_output=True, env=environment(), cwd=self.directory, timeout=120,
        )

    def start(self, timeout: float = 60.0) -> int:
        """Start and wait until it serves; the port."""
        self.output = b""
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "estgw", "--config", self.config, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment(), cwd=self.directory,
        )
        ready = threading.Event()
        process = self.process

        def read() -> None:
            assert process.stdout is not None
            for line in iter(process.stdout.readline, b""):
                self.output += line
                match = READY.search(line)
                if match:
                    self.port = int(match.group(1))
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"twistd did not start:\n{self.output.decode(errors='replace')}")
        return self.port

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


class Client:
    """One EST client over TLS (stdlib), trusting the daemon's CA."""

    def __init__(self, daemon: Daemon, timeout: float = 30.0) -> None:
        self.daemon = daemon
        self.timeout = timeout
        self.context = ssl.create_default_context(cafile=daemon.ca_file)

    def connection(self) -> http.client.HTTPSConnection:
        # By name: the server certificate carries "localhost"; the socket goes to 127.0.0.1.
        connection = http.client.HTTPSConnection(
            "localhost", self.daemon.port, context=self.context, timeout=self.timeout
        )
        connection.sock = self.context.wrap_socket(
            socket.create_connection(("127.0.0.1", self.daemon.port), timeout=self.timeout),
            server_hostname="localhost",
        )
        return connection

    def request(
        self, method: str, operation: str, body: bytes | None = None, user: str | None = None,
        content_type: str = "application/pkcs10",
    ) -> tuple[int, bytes]:
        headers = {"Host": "localhost"}
        if body is not None:
            headers["Content-Type"] = content_type
        if user is not None:
            headers["Authorization"] = "Basic " + base64.b64encode(user.encode()).decode()
        connection = self.connection()
        try:
            connection.request(method, f"/.well-known/est/{operation}", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def csr_body(common_name: str) -> bytes:
    """A base64 CSR for a fresh P-256 key (as RFC 7030 §4.2.1 sends it)."""
    from cryptography.hazmat.primitives.serialization import Encoding

    from estgw.testing import make_csr, new_key

    return base64.encodebytes(make_csr(new_key("ec"), common_name).public_bytes(Encoding.DER))


def certificates_of(body: bytes) -> list[Any]:
    """The certificates of a certs-only response body."""
    from estgw.protocol import decode_certs_only

    return decode_certs_only(body)


def proc_sample(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of ``pid``, from /proc."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))
