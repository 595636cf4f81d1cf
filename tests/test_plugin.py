"""The twistd plugin and estgw.tap's options."""

from __future__ import annotations

import configparser
import os

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import tap
from estgw.testing import TEST_CONFIG, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PluginTests(SynchronousTestCase):
    def test_plugin_found(self) -> None:
        """getPlugins(IServiceMaker) finds the repo's plugin: tapname estgw,
        backed by the estgw.tap module, from twisted/plugins/estgw_plugin.py."""
        import twisted.plugins

        self.assertIn(os.path.join(REPO, "twisted", "plugins"), list(twisted.plugins.__path__))
        makers = [m for m in getPlugins(IServiceMaker) if m.tapname == "estgw"]
        self.assertEqual(len(makers), 1)
        (maker,) = makers
        self.assertEqual(maker.module, "estgw.tap")
        self.assertIs(maker.options, tap.Options)
        self.assertIs(maker.makeService, tap.makeService)
        self.assertIn("EST", maker.description)

    def test_plugin_file_imports_nothing_of_estgw(self) -> None:
        """The plugin file names estgw.tap as a string, so listing plugins
        never imports the gateway."""
        with open(os.path.join(REPO, "twisted", "plugins", "estgw_plugin.py")) as f:
            source = f.read()
        self.assertNotIn("import estgw", source)
        self.assertNotIn("from estgw", source)
        self.assertIn('"estgw.tap"', source)


class LayoutTests(SynchronousTestCase):
    """What makes a plain ``pip install .`` ship the plugin."""

    def read(self, name: str) -> str:
        with open(os.path.join(REPO, name)) as f:
            return f.read()

    def test_packages_listed_not_found(self) -> None:
        """setup.cfg lists twisted.plugins and every package under estgw/
        explicitly (find: would miss the plugin directory, and an unlisted
        subpackage would be missing from the installed gateway)."""
        parser = configparser.ConfigParser()
        parser.read_string(self.read("setup.cfg"))
        listed = set(parser["options"]["packages"].replace(",", " ").split())
        expected = {"twisted.plugins"}
        for directory, _dirs, files in [*os.walk(os.path.join(REPO, "estgw")), *os.walk(os.path.join(REPO, "fuzz"))]:
            if "__init__.py" in files:
                expected.add(os.path.relpath(directory, REPO).replace(os.sep, "."))
        self.assertEqual(listed, expected)

    def test_extras_offer_only_what_is_used(self) -> None:
        """Every optional dependency (extras other than test) is imported by
        some module of estgw (the bench extra: by a benchmark under bench/;
        the fuzz extra: by the fuzzer under fuzz/): an extra that does
        nothing is not offered."""
        import re

        parser = configparser.ConfigParser()
        parser.read_string(self.read("setup.cfg"))
        extras = parser["options.extras_require"] if parser.has_section("options.extras_require") else {}

        def sources_of(top: str) -> str:
            sources = ""
            for directory, _dirs, files in os.walk(os.path.join(REPO, top)):
                for name in files:
                    if name.endswith(".py"):
                        with open(os.path.join(directory, name), encoding="utf-8") as f:
                            sources += f.read()
            return sources

        for extra, requirements in extras.items():
            if extra == "test":
                continue
            sources = sources_of(extra if extra in ("bench", "fuzz") else "estgw")
            # One requirement a line, e.g. "psycopg[binary] >= 3.1".
            for requirement in filter(None, (line.strip() for line in requirements.splitlines())):
                module = re.split(r"[<>=!\[; ]", requirement)[0].replace("-binary", "").replace("-", "_")
                self.assertRegex(sources, rf"(?m)^\s*(import|from) {re.escape(module)}\b", f"{extra}: {requirement}")

    def test_version_has_one_home(self) -> None:
        """setup.cfg takes the version from estgw.__version__ (what --version says)."""
        parser = configparser.ConfigParser()
        parser.read_string(self.read("setup.cfg"))
        self.assertEqual(parser["metadata"]["version"], "attr: estgw.__version__")

    def test_no_init_in_twisted_namespace(self) -> None:
        """No __init__.py under twisted/: it would shadow the installed Twisted."""
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "__init__.py")))
        self.assertFalse(os.path.exists(os.path.join(REPO, "twisted", "plugins", "__init__.py")))

    def test_pyproject_is_build_system_only(self) -> None:
        """pyproject.toml holds only the build-system table; metadata is in setup.cfg."""
        tables = [line.strip() for line in self.read("pyproject.toml").splitlines() if line.startswith("[")]
        self.assertEqual(tables, ["[build-system]"])


class MakeServiceListensTests(TestCase):
    async def test_builds_gateway_service(self) -> None:
        """makeService creates the state, binds the port (before twistd
        daemonizes) without accepting yet, and returns a MultiService
        holding the (not yet started) gateway service and the signal
        handling service."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = write(os.path.join(directory, "est.properties"), TEST_CONFIG.encode())
        options = tap.Options()
        options.parseOptions(["--config", path])
        top = tap.makeService(options)
        # The gateway, and what takes SIGHUP (estgw.logfiles).
        self.assertEqual(sorted(type(child).__name__ for child in top), ["GatewayService", "SignalService"])
        (gateway,) = [child for child in top if isinstance(child, tap.GatewayService)]
        self.assertFalse(gateway.running)
        self.assertTrue(os.path.exists(options.loaded.ca_certificate_path))
        self.assertEqual([p.getHost().host for p in gateway.ports], ["127.0.0.1"])
        for port in gateway.ports:
            await port.stopListening()


class OptionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "est.properties")
        write(self.path, TEST_CONFIG.encode())

    def parse(self, *argv: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(["--config", self.path, *argv])
        return options

    def test_loads_config(self) -> None:
        """--config loads the file in postOptions; its port is used."""
        options = self.parse()
        self.assertEqual(options.loaded.source, self.path)
        self.assertEqual(options.loaded.port, 0)

    def test_port_overrides(self) -> None:
        """--port N (or -p N) overrides server.port."""
        self.assertEqual(self.parse("--port", "9443").loaded.port, 9443)
        self.assertEqual(self.parse("-p", "10443").loaded.port, 10443)

    def test_bad_port(self) -> None:
        """A --port that is no TCP port stops with one line naming the
        option, as a bad key does (not twistd's usage text)."""
        e = self.assertRaises(SystemExit, self.parse, "--port", "https")
        self.assertEqual(str(e), "estgw: --port: expected a whole number (digits 0-9), not 'https'")
        e = self.assertRaises(SystemExit, self.parse, "--port", "70000")
        self.assertEqual(str(e), "estgw: --port: not a TCP port: 70000")
        self.assertEqual(self.parse("--port", "0").loaded.port, 0)

    def test_workers_override_every_check(self) -> None:
        """--workers takes the place of server.workers before any check:
        --workers 1 serves a file with server.workers = 2 and metrics.port;
        --workers 2 with metrics.port in the file is refused in one line
        naming the option; the range is 1 to 64, as for the key."""
        write(self.path, TEST_CONFIG.encode() + b"server.workers = 2\nmetrics.port = 0\n")
        e = self.assertRaises(SystemExit, self.parse)
        self.assertEqual(str(e), f"estgw: {self.path}: metrics.port: not available with server.workers above 1")
        loaded = self.parse("--workers", "1").loaded
        self.assertEqual((loaded.workers, loaded.metrics_port), (1, 0))
        write(self.path, TEST_CONFIG.encode() + b"server.workers = 1\nmetrics.port = 0\n")
        e = self.assertRaises(SystemExit, self.parse, "--workers", "2")
        self.assertEqual(str(e), f"estgw: {self.path}: metrics.port: not available with --workers above 1")
        write(self.path, TEST_CONFIG.encode())
        for value, reason in (("0", "must be at least 1, not 0"), ("65", "must be at most 64, not 65"),
                              ("two", "expected a whole number (digits 0-9), not 'two'")):
            e = self.assertRaises(SystemExit, self.parse, "--workers", value)
            self.assertEqual(str(e), f"estgw: --workers: {reason}")
        self.assertEqual(self.parse("-w", "64").loaded.workers, 64)

    def test_bad_config_names_key(self) -> None:
        """A bad config stops with the file, the key and the reason (not a
        UsageError: twistd would print its usage text first)."""
        write(self.path, TEST_CONFIG.encode() + b"handler.2.qop = auth-int\n")
        e = self.assertRaises(SystemExit, self.parse)
        self.assertEqual(str(e), f"estgw: {self.path}: handler.2.qop: must be one of auth, not 'auth-int'")

    def test_missing_config(self) -> None:
        """A config file that is not there stops naming it."""
        os.remove(self.path)
        e = self.assertRaises(SystemExit, self.parse)
        self.assertIn(f"--config: cannot read {self.path}", str(e))

    def test_bad_trust_anchor_file(self) -> None:
        """A trust anchor file without a certificate is caught in option
        parsing, before any state is created."""
        write(os.path.join(self.directory, "bad.pem"), b"-----BEGIN CERTIFICATE-----\nxx\n")
        write(self.path, TEST_CONFIG.encode() + b"tls.trustAnchors = bad.pem\n")
        e = self.assertRaises(SystemExit, self.parse)
        self.assertIn("tls.trustAnchors: no PEM or DER certificate in", str(e))
        self.assertFalse(os.path.exists(os.path.join(self.directory, "state")))


class MakeServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "est.properties")

    def test_unusable_state_directory(self) -> None:
        """A state.directory that cannot be created ends twistd with a
        message naming the key (SystemExit, not a traceback)."""
        write(os.path.join(self.directory, "taken"), b"a file, not a directory")
        write(self.path, TEST_CONFIG.replace("state.directory = state", "state.directory = taken").encode())
        options = tap.Options()
        options.parseOptions(["--config", self.path])
        e = self.assertRaises(SystemExit, tap.makeService, options)
        self.assertIn("state.directory: cannot create", str(e.code))
