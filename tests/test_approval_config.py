"""Manual-approval settings: handler.<n>.idm.* in est.properties, and
approval.properties of the reference service."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from estgw import config
from estgw.approval import config as approval_config
from estgw.config import ConfigError

# The example of with what a test needs around it.
PRODUCT_EXAMPLE = """\
tokenprocedure.1.name = EST Registration and Enroll Procedure
handler.3.operation = simpleenroll
handler.3.filter = registersimpleenroll-basic-idm-auth
handler.3.format = est-simpleenroll-idm
handler.3.tokenprocedure = EST Registration and Enroll Procedure
handler.3.authtype = Basic
handler.3.realm = EST Realm
handler.3.idm.requestUrl = https://localhost:8443/idm/ws/processes/enroll
handler.3.idm.tls.token = protocol-gateway-ra.p12
handler.3.idm.tls.password = abcd1234
"""
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HandlerKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        for name in ("protocol-gateway-ra.p12", "service-ca.pem"):
            with open(os.path.join(self.base, name), "wb") as f:
                f.write(b"-")

    def parse(self, text: str) -> config.Config:
        return config.from_string(text, base_dir=self.base)

    def error(self, text: str) -> ConfigError:
        return self.assertRaises(ConfigError, self.parse, text)

    def test_spec_example(self) -> None:
        """The approval handler of the product documentation parses; the token path is resolved against
        the config file's directory; the rest has defaults."""
        handler = self.parse(PRODUCT_EXAMPLE).handlers[0]
        self.assertEqual(handler.idm_request_url, "https://localhost:8443/idm/ws/processes/enroll")
        self.assertEqual(handler.idm_token, os.path.join(self.base, "protocol-gateway-ra.p12"))
        self.assertEqual(handler.idm_password, "abcd1234")
        self.assertEqual(
            (handler.idm_trust_anchors, handler.idm_timeout, handler.idm_retry_after, handler.idm_pending_lifetime),
            ((), 10.0, 60, 72 * 3600),
        )

    def test_password_not_in_repr(self) -> None:
        """The token password never shows in a repr (logs, tracebacks)."""
        self.assertNotIn("abcd1234", repr(self.parse(PRODUCT_EXAMPLE)))

    def test_optional_keys(self) -> None:
        """Trust anchors, timeout, Retry-After and lifetime (hours, or with
        a unit) are read."""
        handler = self.parse(
            PRODUCT_EXAMPLE
            + "handler.3.idm.tls.trustAnchors = service-ca.pem\n"
            + "handler.3.idm.timeout = 2.5\n"
            + "handler.3.idm.retryAfter = 30\n"
            + "handler.3.idm.pendingLifetime = 90m\n"
        ).handlers[0]
        self.assertEqual(handler.idm_trust_anchors, (os.path.join(self.base, "service-ca.pem"),))
        self.assertEqual((handler.idm_timeout, handler.idm_retry_after, handler.idm_pending_lifetime), (2.5, 30, 5400))
        for value, seconds in (("24", 86400), ("2d", 172800), ("45s", 45), ("0.5h", 1800)):
            text = PRODUCT_EXAMPLE + f"handler.3.idm.pendingLifetime = {value}\n"
            self.assertEqual(self.parse(text).handlers[0].idm_pending_lifetime, seconds)

    def test_required_with_filter(self) -> None:
        """The approval filter needs requestUrl, token and password; the
        error names the key."""
        for key in ("idm.requestUrl", "idm.tls.token", "idm.tls.password"):
            text = "\n".join(line for line in PRODUCT_EXAMPLE.splitlines() if f".{key} " not in line)
            e = self.error(text)
            self.assertEqual((e.key, e.reason), (f"handler.3.{key}", "required by filter registersimpleenroll-basic-idm-auth"))

    def test_bad_values(self) -> None:
        """Bad values are errors naming the key: plain http, a missing
        token file, bad durations."""
        cases = [
            ("handler.3.idm.requestUrl = http://localhost/idm", "handler.3.idm.requestUrl", "https://"),
            ("handler.3.idm.tls.token = nowhere.p12", "handler.3.idm.tls.token", "no such file"),
            ("handler.3.idm.tls.trustAnchors = nowhere.pem", "handler.3.idm.tls.trustAnchors", "no such file"),
            ("handler.3.idm.timeout = 0", "handler.3.idm.timeout", "more than 0"),
            ("handler.3.idm.retryAfter = soon", "handler.3.idm.retryAfter", "whole number"),
            ("handler.3.idm.pendingLifetime = 3 weeks", "handler.3.idm.pendingLifetime", "hours"),
            ("handler.3.idm.pendingLifetime = 0", "handler.3.idm.pendingLifetime", "at least 1 second"),
        ]
        for line, key, words in cases:
            name = line.split(" = ")[0]
            text = "\n".join(l for l in PRODUCT_EXAMPLE.splitlines() if not l.startswith(name + " ")) + "\n" + line
            e = self.error(text)
            self.assertEqual(e.key, key, line)
            self.assertIn(words, e.reason, line)

    def test_idm_keys_elsewhere_are_errors(self) -> None:
        """idm.* on a handler without the approval filter is an error, and
        the approval format without the filter too (no one would approve)."""
        plain = "tokenprocedure.1.name = P\nhandler.2.operation = simpleenroll\nhandler.2.tokenprocedure = P\n"
        e = self.error(plain + "handler.2.idm.retryAfter = 5\n")
        self.assertEqual(e.key, "handler.2.idm.retryAfter")
        e = self.error(plain + "handler.2.format = est-simpleenroll-idm\n")
        self.assertEqual(e.key, "handler.2.format")
        self.assertIn("needs filter registersimpleenroll-basic-idm-auth", e.reason)

    def test_defaults_apply_to_approval_handlers_only(self) -> None:
        """default.idm.* fills approval handlers and leaves others alone."""
        text = PRODUCT_EXAMPLE + (
            "default.idm.retryAfter = 11\n"
            "handler.2.operation = cacerts\n"
        )
        handlers = {h.id: h for h in self.parse(text).handlers}
        self.assertEqual(handlers["3"].idm_retry_after, 11)
        self.assertEqual(handlers["2"].idm_request_url, "")


class ServiceConfigTests(SynchronousTestCase):
    def test_shipped_file(self) -> None:
        """etc/approval.properties parses, and its URL is the request collection."""
        loaded = approval_config.load(os.path.join(ROOT, "etc", "approval.properties"))
        self.assertEqual(loaded.port, 8444)
        self.assertEqual(loaded.url, f"https://{loaded.hostnames[0]}:8444/approval/requests")
        self.assertEqual(loaded.state_directory, os.path.join(ROOT, "etc", "approval-state"))

    def test_unknown_key(self) -> None:
        """A typo is an error naming the key."""
        e = self.assertRaises(ConfigError, approval_config.from_string, "service.prot = 1\n")
        self.assertEqual((e.key, e.reason), ("service.prot", "unknown key"))

    def test_paths_and_cli(self) -> None:
        """Relative paths resolve against the file's directory; cli.url wins."""
        loaded = approval_config.from_string(
            "cli.url = https://a.example/approval/requests\ncli.certificate = alice.pem\n"
            "operator.trustAnchors = staff.pem, more.pem\n",
            base_dir="/etc/estgw",
        )
        self.assertEqual(loaded.url, "https://a.example/approval/requests")
        self.assertEqual(loaded.cli_certificate, "/etc/estgw/alice.pem")
        self.assertEqual(loaded.operator_trust_anchor_files, ("/etc/estgw/staff.pem", "/etc/estgw/more.pem"))

    def test_bad_port(self) -> None:
        """A port outside 0-65535 is an error naming service.port."""
        e = self.assertRaises(ConfigError, approval_config.from_string, "service.port = 70000\n")
        self.assertEqual(e.key, "service.port")
