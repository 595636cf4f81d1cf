"""The CoAPs configuration keys: coaps.port, coaps.interface,
handler.<n>.transport and the estcoaps- formats."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from estgw.config import ConfigError, from_string

BASE = """\
tokenprocedure.1.name = P
default.tokenprocedure = P
"""


class CoAPsConfigTests(SynchronousTestCase):
    def error(self, text: str, key: str, reason: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            from_string(BASE + text)
        self.assertEqual(caught.exception.key, key)
        self.assertIn(reason, caught.exception.reason)

    def test_off_by_default(self) -> None:
        """Without coaps.port there is no listener and handlers are HTTPS."""
        config = from_string(BASE + "handler.1.operation = cacerts\n")
        self.assertIsNone(config.coaps_port)
        self.assertEqual(config.handlers[0].transports, ("https",))
        self.assertIsNotNone(config.handler("", "cacerts", "https"))
        self.assertIsNone(config.handler("", "cacerts", "coaps"))

    def test_listener_and_transports(self) -> None:
        config = from_string(BASE + """\
coaps.port = 5684
coaps.interface = 127.0.0.1
handler.1.operation = cacerts
handler.1.transport = both
handler.2.operation = simpleenroll
handler.2.authtype = Basic
handler.2.realm = r
handler.3.operation = simpleenroll
handler.3.transport = coaps
""")
        self.assertEqual((config.coaps_port, config.coaps_interface), (5684, "127.0.0.1"))
        self.assertEqual(config.handler("", "cacerts", "coaps"), config.handler("", "cacerts", "https"))
        self.assertEqual(config.handler("", "simpleenroll", "https").id, "2")
        self.assertEqual(config.handler("", "simpleenroll", "coaps").id, "3")
        self.assertEqual(config.handler("", "simpleenroll", "coaps").format, "est-simpleenroll-subjectmatch")

    def test_estcoaps_formats(self) -> None:
        """estcoaps-<x> is est-<x> on a handler bound to CoAPs: it sets
        the transport to coaps when none is given."""
        config = from_string(BASE + """\
coaps.port = 5684
handler.1.operation = simpleenroll
handler.1.format = estcoaps-simpleenroll
handler.2.operation = simplereenroll
handler.2.format = estcoaps-simplereenroll
handler.2.transport = both
handler.3.operation = simpleenroll
handler.3.label = x
handler.3.format = estcoaps-simpleenroll-subjectmatch
""")
        self.assertEqual(
            [(h.format, h.transport) for h in config.handlers],
            [("est-simpleenroll", "coaps"), ("est-simplereenroll", "both"), ("est-simpleenroll-subjectmatch", "coaps")],
        )

    def test_errors(self) -> None:
        """Each impossible combination names its key."""
        self.error("handler.1.operation = cacerts\nhandler.1.transport = udp\n", "handler.1.transport", "udp")
        self.error("handler.1.operation = cacerts\nhandler.1.transport = coaps\n", "coaps.port", "handler.1")
        self.error(
            "coaps.port = 5684\nhandler.1.operation = simpleenroll\nhandler.1.transport = https\n"
            "handler.1.format = estcoaps-simpleenroll\n",
            "handler.1.format", "CoAPs",
        )
        self.error(
            "coaps.port = 5684\nhandler.1.operation = simpleenroll\nhandler.1.transport = both\n"
            "handler.1.authtype = Basic\nhandler.1.realm = r\n",
            "handler.1.authtype", "does not exist over CoAPs",
        )
        self.error(
            "coaps.port = 5684\nhandler.1.operation = cacerts\nhandler.1.transport = both\n"
            "handler.2.operation = cacerts\nhandler.2.transport = coaps\n",
            "handler.2.operation", "already served by handler.1 over CoAPs",
        )
        self.error("coaps.port = 70000\n", "coaps.port", "")
        self.error("handler.1.operation = simpleenroll\nhandler.1.format = estcoaps-simpleenroll-idm\n",
                   "handler.1.format", "")

    def test_templates_per_transport(self) -> None:
        """csrattrs may differ per transport; an enrollment handler served
        on both must not face two different templates."""
        config = from_string(BASE + """\
coaps.port = 5684
handler.1.operation = csrattrs
handler.1.csrattrs.template = key: ec-p256
handler.2.operation = csrattrs
handler.2.transport = coaps
handler.2.csrattrs.template = key: ec-p384
handler.3.operation = simpleenroll
handler.4.operation = simpleenroll
handler.4.transport = coaps
""")
        self.assertEqual(config.handler("", "simpleenroll", "https").csr_template.key_type, "ec-p256")
        self.assertEqual(config.handler("", "simpleenroll", "coaps").csr_template.key_type, "ec-p384")
        self.error(
            "coaps.port = 5684\nhandler.1.operation = csrattrs\nhandler.1.csrattrs.template = key: ec-p256\n"
            "handler.2.operation = csrattrs\nhandler.2.transport = coaps\n"
            "handler.2.csrattrs.template = key: ec-p384\nhandler.3.operation = simpleenroll\n"
            "handler.3.transport = both\n",
            "handler.3.transport", "different templates",
        )

    def test_label_template_on_every_transport(self) -> None:
        """A template announced on one transport binds the label's
        enrollment handlers on the other too, and a csrattrs handler
        there without one announces it; handlers of other labels stay free."""
        config = from_string(BASE + """\
coaps.port = 5684
handler.1.operation = csrattrs
handler.1.label = devices
handler.1.csrattrs.template = subject: CN, O=ACME ; key: ec-p256
handler.2.operation = csrattrs
handler.2.label = devices
handler.2.transport = coaps
handler.3.operation = simpleenroll
handler.3.label = devices
handler.3.transport = coaps
handler.4.operation = serverkeygen
handler.4.label = devices
handler.4.transport = coaps
handler.5.operation = simplereenroll
handler.5.label = devices
handler.5.transport = both
handler.6.operation = simpleenroll
handler.6.transport = coaps
""")
        announced = config.handler("devices", "csrattrs", "https").csr_template
        self.assertEqual(announced.key_type, "ec-p256")
        self.assertEqual(config.handler("devices", "csrattrs", "coaps").csr_template, announced)
        for operation in ("simpleenroll", "serverkeygen", "simplereenroll"):
            self.assertEqual(config.handler("devices", operation, "coaps").csr_template, announced, operation)
        self.assertEqual(config.handler("devices", "serverkeygen", "coaps").serverkeygen_key_type, "ec-p256")
        self.assertIsNone(config.handler("", "simpleenroll", "coaps").csr_template)
