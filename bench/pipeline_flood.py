"""A client that pipelines requests and never reads the responses, and the
daemon's RSS under it.

``flood`` opens one connection (TLS with the stdlib ssl module, or plain
TCP), writes ``count`` copies of one request head back to back without
reading a byte, and then waits, still without reading, until the server
closes the connection or ``seconds`` have passed.  Run as a script it
either is that client (``client``: one JSON line with what it saw, for the
tests) or drives the real daemon (``rss``: the shipped est.properties in a
temporary directory, ``twistd -n estgw`` on 127.0.0.1, the daemon's VmRSS
before, during and after the floods)::

    .venv/bin/python bench/pipeline_flood.py rss --connections 4 --count 20000
    .venv/bin/python bench/pipeline_flood.py client --port 8443 --cafile ca.pem

Everything is local (127.0.0.1); keys made here are test data.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import socket
import ssl
import sys
import tempfile
import threading
import time
from typing import Any

HEAD = "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the server closed (FIN or RST) ``sock``, without reading it."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP | select.POLLERR | select.POLLHUP)
    return any(events & (select.POLLRDHUP | select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def flood(
    port: int,
    cafile: str | None = None,
    path: str = "/.well-known/est/cacerts",
    count: int = 20000,
    seconds: float = 30.0,
    host: str = "127.0.0.1",
    read: bool = False,
) -> dict[str, Any]:
    """Pipeline ``count`` GETs of ``path`` on one connection to
    ``host:port`` (TLS when ``cafile`` is given) and read nothing (or,
    with ``read``, read every response to its end and count them).

    :returns: ``sent`` bytes of requests the server's socket accepted,
        ``all_sent``, ``closed_after`` seconds from the last byte sent to the
        server's close (None: still open after ``seconds``), ``how`` it
        closed (``fin``, ``reset``, or None), ``received`` bytes (with
        ``read``) and ``responses`` (status lines seen, with ``read``).
    """
    raw = socket.create_connection((host, port), timeout=10)
    sock: socket.socket = raw
    if cafile is not None:
        context = ssl.create_default_context(cafile=cafile)
        sock = context.wrap_socket(raw, server_hostname="localhost")
    payload = HEAD.format(path=path).encode("ascii") * count
    sock.setblocking(False)
    sent = 0
    received = bytearray()
    how: str | None = None
    deadline = time.monotonic() + seconds
    last_sent = time.monotonic()
    try:
        while sent < len(payload) and time.monotonic() < deadline:
            readable = [sock] if read else []
            r, w, _ = select.select(readable, [sock], [], 0.2)
            if r:
                try:
                    received += sock.recv(65536)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    pass
            if w:
                try:
                    sent += sock.send(payload[sent:sent + 16384])
                    last_sent = time.monotonic()
                except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                    pass
                except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                    how = "reset"  # an SSLError here: the server is gone mid-record
                    break
            if not w and _peer_closed(sock):
                break
        closed_at = None
        while how is None and time.monotonic() < deadline:
            if read:
                r, _, _ = select.select([sock], [], [], 0.2)
                if r:
                    try:
                        chunk = sock.recv(65536)
                    except (ssl.SSLWantReadError, BlockingIOError):
                        continue
                    except (ConnectionResetError, ssl.SSLError):
                        how = "reset"
                        break
                    if not chunk:
                        how = "fin"
                        break
                    received += chunk
                    if received.count(b"HTTP/1.1 ") >= count and received.endswith(b"\n"):
                        break
            elif _peer_closed(sock):
                how = "closed"
                break
            else:
                time.sleep(0.05)
        if how is not None:
            closed_at = time.monotonic()
        if how == "closed":
            # Tell a reset (the server aborted) from an orderly close.
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            how = "reset" if error == errno.ECONNRESET else "fin"
    finally:
        sock.close()
    return {
        "sent": sent,
        "all_sent": sent == len(payload),
        "closed_after": None if closed_at is None else round(closed_at - last_sent, 3),
        "how": how,
        "received": len(received),
        "responses": bytes(received).count(b"HTTP/1.1 "),
    }


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_rss(connections: int, count: int, seconds: float, idle_timeout: int) -> None:
    """The real daemon under ``connections`` floods at once; prints its
    VmRSS (MiB) before, at the peak while they last, and after."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from daemon import Daemon  # bench/daemon.py

    directory = tempfile.mkdtemp(prefix="estgw-flood-")
    daemon = Daemon(directory, f"server.idleTimeout = {idle_timeout}\n")
    daemon.start()
    try:
        flood(daemon.port, daemon.ca_file, count=1, seconds=5, read=True)  # warm up
        time.sleep(1)
        before = _rss_kib(daemon.pid)
        results: list[dict[str, Any]] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(flood(daemon.port, daemon.ca_file, count=count, seconds=seconds))
            )
            for _ in range(connections)
        ]
        peak = before
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, _rss_kib(daemon.pid))
            time.sleep(0.1)
        time.sleep(1)
        after = _rss_kib(daemon.pid)
        check = flood(daemon.port, daemon.ca_file, count=10, seconds=10, read=True)
    finally:
        daemon.stop()
    print(f"connections {connections} x {count} pipelined GET /.well-known/est/cacerts, never read")
    print(f"server.idleTimeout {idle_timeout} s")
    for result in results:
        print(f"  client: {json.dumps(result)}")
    print(f"daemon VmRSS MiB: before {before / 1024:.1f}  peak {peak / 1024:.1f}  after {after / 1024:.1f}")
    print(f"a reading client afterwards: {check['responses']} of 10 responses")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    client = sub.add_parser("client", help="one flood; prints a JSON line")
    client.add_argument("--port", type=int, required=True)
    client.add_argument("--cafile", help="TLS, trusting this CA (else plain TCP)")
    client.add_argument("--path", default="/.well-known/est/cacerts")
    client.add_argument("--count", type=int, default=20000)
    client.add_argument("--seconds", type=float, default=30.0)
    client.add_argument("--read", action="store_true", help="read every response (a well-behaved client)")
    rss = sub.add_parser("rss", help="the real daemon's RSS under floods")
    rss.add_argument("--connections", type=int, default=4)
    rss.add_argument("--count", type=int, default=20000)
    rss.add_argument("--seconds", type=float, default=40.0)
    rss.add_argument("--idle-timeout", type=int, default=10)
    args = parser.parse_args(argv)
    if args.command == "client":
        result = flood(args.port, args.cafile, args.path, args.count, args.seconds, read=args.read)
        print(json.dumps(result), flush=True)
    else:
        measure_rss(args.connections, args.count, args.seconds, args.idle_timeout)


if __name__ == "__main__":
    main()
