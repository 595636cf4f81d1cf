"""Every input the request-path fuzzer (fuzz/request_path.py) ever found
failing, replayed through the same harness without atheris, and the fixes
they led to, checked on every twisted.web site estgw runs.

The harness replaces process-wide pieces (thread pools, the TLS peer
lookup), so it runs in a child process.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from estgw.testing import run_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(REPO, "fuzz", "request_path.py")
INPUTS = sorted(glob.glob(os.path.join(REPO, "tests", "fuzz_regressions", "*")))


def _harness_module():
    spec = importlib.util.spec_from_file_location("estgw_fuzz_request_path", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


harness = _harness_module()


class ReplayTests(unittest.TestCase):
    timeout = 300

    async def test_every_crasher_is_answered(self) -> None:
        """Each kept input gets an answer: no 5xx, no traceback, no hang."""
        self.assertTrue(INPUTS)
        result = await run_process([sys.executable, HARNESS, "--replay", *INPUTS, *self._seeds()])
        output = result.stdout.decode()
        self.assertEqual(result.code, 0, output + result.stderr.decode()[-3000:])
        self.assertEqual(output.count("\nok ") + output.startswith("ok "), len(INPUTS) + len(harness.SEEDS), output)

    def _seeds(self) -> list[str]:
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = []
        for i, seed in enumerate(harness.SEEDS):
            paths.append(os.path.join(directory, f"seed-{i}"))
            with open(paths[-1], "wb") as f:
                f.write(seed)
        return paths


class CheckTests(unittest.TestCase):
    """The harness's verdict fails what it should fail."""

    GOOD = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nno\r\n"

    def test_a_good_answer_passes(self) -> None:
        harness.check(b"GET / HTTP/1.1\r\n\r\n", self.GOOD, True, True, True, [])

    def test_a_500_fails(self) -> None:
        output = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 15\r\n\r\ninternal error\n"
        with self.assertRaisesRegex(harness.Violation, "500"):
            harness.check(b"GET / HTTP/1.1\r\n\r\n", output, True, True, True, [])

    def test_a_traceback_fails(self) -> None:
        output = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 10\r\n\r\nTraceback\n"
        with self.assertRaisesRegex(harness.Violation, "traceback"):
            harness.check(b"x", output, True, True, False, [])

    def test_a_logged_failure_fails(self) -> None:
        with self.assertRaisesRegex(harness.Violation, "escaped"):
            harness.check(b"x", self.GOOD, True, True, False, [{"isError": 1}])

    def test_a_hang_fails(self) -> None:
        with self.assertRaisesRegex(harness.Violation, "idle timeout"):
            harness.check(b"x", b"", False, False, False, [])
        with self.assertRaisesRegex(harness.Violation, "no answer"):
            harness.check(b"GET / HTTP/1.1\r\n\r\n", b"", True, False, True, [])

    def test_an_answer_to_head_has_no_body(self) -> None:
        output = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n" + self.GOOD
        self.assertEqual([status for status, _, _ in harness.responses(output)], [200, 404])


def _post(site, content_type: bytes, path: bytes = b"/") -> bytes:
    site.reactor = Clock()  # the idle timeout's delayed call
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nContent-Type: " + content_type
        + b"\r\nContent-Length: 3\r\n\r\nabc"
    )
    channel.connectionLost(None)
    return transport.value()


class FormParsingTests(unittest.TestCase):
    """A Content-Type that Python's email parser rejects (a line separator
    such as GS, NEL, VT or FF in it) made twisted.web raise out of
    dataReceived while parsing a form body: the connection was dropped
    without an answer.  No site of estgw parses forms."""

    VALUES = [b"multipart/form-data\x1dx", b"application/pkcs10;\x85x", b"text/plain\x0bx", b"a\x0cb", b"a\x1cb"]

    def _each_value(self, site, path: bytes = b"/") -> None:
        for value in self.VALUES:
            output = _post(site, value, path)
            self.assertRegex(output, rb"^HTTP/1\.1 [1-4]\d\d ", value)
            self.assertNotIn(b"<html", output.lower())
        # Nothing of twisted.web's own (deprecated) error pages is used.
        self.assertEqual(self.flushWarnings(), [])

    def test_est(self) -> None:
        from estgw.config import from_string
        from estgw.metrics import Metrics
        from estgw.testing import TEST_CONFIG
        from estgw.web import build_site

        # No CA or store is needed to refuse a path that is not EST.
        class _Gateway:
            config = from_string(TEST_CONFIG, base_dir=self.mktemp())
            metrics = Metrics()

        self._each_value(build_site(_Gateway()), b"/not-est")

    def test_metrics(self) -> None:
        from estgw.metrics import Metrics, metrics_site

        self._each_value(metrics_site(Metrics()), b"/metrics")

    def test_publish(self) -> None:
        from estgw.ca.publish import publish_site

        self._each_value(publish_site({}), b"/ocsp/x")

    def test_approval_service(self) -> None:
        from estgw.approval.service import build_site

        self._each_value(build_site(None, lambda request: None, None), b"/approval/requests/x")
