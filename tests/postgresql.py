"""A private PostgreSQL server for the tests, and a fresh database per test.

The server is the real thing: ``initdb`` and ``pg_ctl`` from the machine
(``PATH``, ``/usr/lib/postgresql/*/bin`` as Debian's ``postgresql``
package installs them, ``/usr/local/bin``), started once per test run in a
temporary directory, listening only on a unix socket in that directory,
and stopped when the run ends.  initdb refuses to run as root: as root,
the server runs as the ``postgres`` user.

``ESTGW_TEST_POSTGRESQL_URL`` (a superuser URL) points the tests at a
server of your own instead.  With neither, the PostgreSQL tests are
skipped, except under ``CI=true``, where a missing server is an error
(``.ci/run`` installs one).
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from typing import Any
from urllib.parse import quote

from twisted.internet import threads
from twisted.trial.unittest import SkipTest

ENV_URL = "ESTGW_TEST_POSTGRESQL_URL"

_server: dict[str, Any] = {}
_numbers = itertools.count(1)


def _find(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{program}"), key=_version_key)
    if candidates:
        return candidates[-1]
    local = f"/usr/local/bin/{program}"
    return local if os.path.exists(local) else None


def _version_key(path: str) -> tuple[int, ...]:
    version = path.split("/")[4]
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"PostgreSQL tests cannot run in CI: {reason}")
    raise SkipTest(f"no PostgreSQL server: {reason} (install Debian's postgresql, or set {ENV_URL})")


def _start() -> str:
    initdb, pg_ctl = _find("initdb"), _find("pg_ctl")
    if initdb is None or pg_ctl is None:
        _unavailable("initdb and pg_ctl not found")
    assert initdb is not None and pg_ctl is not None
    directory = tempfile.mkdtemp(prefix="estgw-pg-")
    data = os.path.join(directory, "data")
    prefix: list[str] = []
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            _unavailable("running as root and there is no postgres user to run the server as")
        os.chown(directory, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser") or next(
            (path for path in ("/usr/sbin/runuser", "/sbin/runuser") if os.path.exists(path)), None
        )
        if runuser is None:
            _unavailable("running as root and runuser (util-linux) is missing")
        prefix = [str(runuser), "-u", "postgres", "--"]
    run = lambda *argv: subprocess.run(  # noqa: E731
        prefix + list(argv), check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120
    )
    try:
        run(initdb, "-D", data, "-U", "estgw", "--auth=trust", "-E", "UTF8", "--no-sync")
        # Unix socket only, in our directory; no fsync: test data.
        options = f"-k {directory} -c listen_addresses='' -F -c max_connections=200"
        run(pg_ctl, "-D", data, "-l", os.path.join(directory, "log"), "-o", options, "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stdout.decode(errors='replace')}") from None

    def stop() -> None:
        subprocess.run(
            prefix + [pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )
        shutil.rmtree(directory, ignore_errors=True)

    atexit.register(stop)
    return f"postgresql://estgw@/postgres?host={quote(directory)}"


def server_url() -> str:
    """A superuser URL of the test server (started on first use)."""
    if "url" not in _server:
        try:
            import psycopg  # noqa: F401
        except ImportError:
            _unavailable("psycopg is not installed (pip install '.[postgresql]')")
        _server["url"] = os.environ.get(ENV_URL) or _start()
    return str(_server["url"])


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] if base.count("/") > 2 else base
    return f"{base}/{name}" + (f"?{query}" if query else "")


def _admin(sql: str) -> None:
    import psycopg

    with psycopg.connect(server_url(), autocommit=True) as connection:
        connection.execute(sql)


async def new_database(testcase: Any) -> str:
    """A URL of a new empty database, dropped when ``testcase`` ends."""
    server = server_url()  # skips, or fails under CI, when there is none
    name = f"estgw_test_{os.getpid()}_{next(_numbers)}"
    await threads.deferToThread(_admin, f"CREATE DATABASE {name}")
    testcase.addCleanup(threads.deferToThread, _admin, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    return _with_database(server, name)


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run ``sql`` on a connection of our own (not the store's); the rows."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        cursor = connection.execute(sql, params)
        return cursor.fetchall() if cursor.description else []
