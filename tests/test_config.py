"""est.properties → Config: the shipped file, defaults, and every error."""

import os

from twisted.trial.unittest import SynchronousTestCase

from estgw import config
from estgw.config import ConfigError, from_string, load
from estgw.protocol import CsrAttr

HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(os.path.dirname(HERE), "etc", "est.properties")

# The smallest useful configuration: one procedure, one enroll handler.
BARE = """\
tokenprocedure.1.name = P
handler.1.operation = simpleenroll
"""
BASE = BARE + "handler.1.tokenprocedure = P\n"


class ShippedConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = load(SHIPPED)

    def test_loads_with_ten_handlers(self) -> None:
        """etc/est.properties loads and defines handlers 1..10 in order."""
        self.assertEqual([h.id for h in self.config.handlers], [str(n) for n in range(1, 11)])

    def test_serves_five_operations_twice(self) -> None:
        """Every operation but fullcmc at /.well-known/est/ and under 'devices'."""
        paths = sorted(h.path for h in self.config.handlers)
        expected = sorted(
            f"/.well-known/est/{label}{op}"
            for label in ("", "devices/")
            for op in ("cacerts", "simpleenroll", "simplereenroll", "csrattrs", "serverkeygen")
        )
        self.assertEqual(paths, expected)

    def test_listener_and_state(self) -> None:
        """Port 8443, the default host names, and state next to the file."""
        self.assertEqual(self.config.port, 8443)
        self.assertEqual(self.config.interface, "localhost")
        self.assertIn("localhost", self.config.hostnames)
        self.assertIn("127.0.0.1", self.config.hostnames)
        self.assertEqual(self.config.state_directory, os.path.join(os.path.dirname(SHIPPED), "state"))
        self.assertEqual(self.config.max_request_bytes, 65536)

    def test_enroll_handlers(self) -> None:
        """simpleenroll: device filter with Basic; simplereenroll: clientcert;
        both through the one token procedure from default.tokenprocedure."""
        enroll = self.config.handler("", "simpleenroll")
        reenroll = self.config.handler("devices", "simplereenroll")
        assert enroll is not None and reenroll is not None
        self.assertEqual((enroll.filter, enroll.authtype, enroll.realm), ("device", "Basic", "estgw"))
        self.assertEqual((reenroll.filter, reenroll.format), ("clientcert", "est-simplereenroll"))
        self.assertEqual(enroll.token_procedure, "EST Enroll Procedure")
        self.assertEqual(reenroll.token_procedure, "EST Enroll Procedure")
        self.assertFalse(reenroll.allow_renewal_with_old_certificates)

    def test_token_procedure(self) -> None:
        """The procedure issues for a year with clientAuth."""
        procedure = self.config.token_procedures["EST Enroll Procedure"]
        self.assertEqual(procedure.validity_days, 365)
        self.assertEqual(procedure.extended_key_usage, "clientAuth")

    def test_csrattrs(self) -> None:
        """handler.4.csrattrs becomes OIDs; cacerts handlers carry none."""
        attrs = self.config.handler("", "csrattrs").csrattrs
        self.assertEqual(attrs[0], CsrAttr("1.2.840.10045.2.1", ("1.2.840.10045.3.1.7",)))
        self.assertEqual(len(attrs), 3)
        self.assertEqual(self.config.handler("", "cacerts").csrattrs, ())


class DefaultsTests(SynchronousTestCase):
    def test_operation_defaults(self) -> None:
        """Filters and formats default per operation; non-enroll handlers
        drop enroll-only defaults."""
        c = from_string(
            BARE
            + "default.tokenprocedure = P\n"
            "handler.2.operation = simplereenroll\n"
            "handler.3.operation = cacerts\n"
            "handler.4.operation = csrattrs\n"
        )
        h1, h2, h3, h4 = c.handlers
        self.assertEqual((h1.filter, h1.format), ("device", "est-simpleenroll-subjectmatch"))
        self.assertEqual((h2.filter, h2.format), ("clientcert", "est-simplereenroll"))
        self.assertEqual((h3.filter, h3.token_procedure), ("public", ""))
        self.assertEqual((h4.filter, h4.csrattrs), ("public", ()))

    def test_simpleenroll_default_format_follows_the_handler(self) -> None:
        """simpleenroll defaults to the strict subject match, except where
        the client cannot carry the subject: a factory-certificate
        procedure (est-simpleenroll) or manual approval (its own format)."""
        c = from_string(
            "tokenprocedure.1.name = P\n"
            "tokenprocedure.2.name = F\n"
            "tokenprocedure.2.estenroll.use-authentication-cert = true\n"
            "handler.1.operation = simpleenroll\nhandler.1.tokenprocedure = P\n"
            "handler.2.operation = simpleenroll\nhandler.2.label = f\nhandler.2.tokenprocedure = F\n"
            "handler.3.operation = simpleenroll\nhandler.3.label = e\nhandler.3.tokenprocedure = P\n"
            "handler.3.format = est-simpleenroll\n"
        )
        self.assertEqual(
            [h.format for h in c.handlers],
            ["est-simpleenroll-subjectmatch", "est-simpleenroll", "est-simpleenroll"],
        )

    def test_handler_overrides_default(self) -> None:
        """A handler's own key wins over default.<key>."""
        c = from_string(
            "tokenprocedure.1.name = P\ntokenprocedure.2.name = Q\n"
            "default.tokenprocedure = P\n"
            "handler.1.operation = simpleenroll\n"
            "handler.2.operation = simpleenroll\nhandler.2.label = x\n"
            "handler.2.tokenprocedure = Q\n"
        )
        self.assertEqual([h.token_procedure for h in c.handlers], ["P", "Q"])

    def test_top_level_allow_renewal(self) -> None:
        """allowRenewalWithOldCertificates at the top level applies to every
        handler, in the product's (reversed) meaning: true turns the check on."""
        c = from_string(BASE + "allowRenewalWithOldCertificates = true\n")
        self.assertTrue(c.handlers[0].allow_renewal_with_old_certificates)

    def test_case_insensitive_choices(self) -> None:
        """Choice values match in any case and come out canonical."""
        c = from_string(BASE + "handler.1.authtype = basic\nhandler.1.realm =\n")
        self.assertEqual(c.handlers[0].authtype, "Basic")
        self.assertEqual(c.handlers[0].realm, "")

    def test_booleans(self) -> None:
        """true/yes/on/1 and false/no/off/0 are booleans."""
        for text, expected in (("yes", True), ("ON", True), ("1", True), ("no", False), ("Off", False), ("0", False)):
            c = from_string(BASE + f"handler.1.allowRenewalWithOldCertificates = {text}\n")
            self.assertEqual(c.handlers[0].allow_renewal_with_old_certificates, expected, text)

    def test_port_zero_and_hostnames(self) -> None:
        """Port 0 asks for a free port; server.hostnames is a comma list."""
        c = from_string(BASE + "server.port = 0\nserver.hostnames = a.example, 192.0.2.1\n")
        self.assertEqual(c.port, 0)
        self.assertEqual(c.hostnames, ("a.example", "192.0.2.1"))

    def test_handler_numbers_sort_numerically(self) -> None:
        """handler.10 comes after handler.9, not after handler.1."""
        text = "".join(f"handler.{n}.operation = cacerts\nhandler.{n}.label = l{n}\n" for n in (10, 9, 1))
        self.assertEqual([h.id for h in from_string(text).handlers], ["1", "9", "10"])


class PathTests(SynchronousTestCase):
    def test_relative_paths_follow_the_config_file(self) -> None:
        """state.directory and tls.trustAnchors are relative to the file's
        directory; the SQLite file is relative to the state directory."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "anchors"))
        with open(os.path.join(directory, "anchors", "f.pem"), "w") as f:
            f.write("x")
        path = os.path.join(directory, "est.properties")
        with open(path, "w") as f:
            f.write(BASE + "state.directory = var/st\n"
                    "tls.trustAnchors = anchors/f.pem\nstore.url = sqlite:db/x.sqlite\n")
        c = load(path)
        self.assertEqual(c.state_directory, os.path.join(directory, "var", "st"))
        self.assertEqual(c.trust_anchor_files, (os.path.join(directory, "anchors", "f.pem"),))
        self.assertEqual(c.store_path, os.path.join(directory, "var", "st", "db", "x.sqlite"))
        self.assertEqual(c.ca_certificate_path, os.path.join(directory, "var", "st", "ca", "root-ca.pem"))
        self.assertEqual(c.source, path)

    def test_absolute_paths_stay(self) -> None:
        """An absolute state.directory or store path is used as written."""
        c = from_string(BASE + "state.directory = /srv/est\n"
                        "store.url = sqlite:/var/lib/e.sqlite\n", base_dir="/etc")
        self.assertEqual(c.state_directory, "/srv/est")
        self.assertEqual(c.store_path, "/var/lib/e.sqlite")
        self.assertEqual(c.store_location, "sqlite:/var/lib/e.sqlite")

    def test_unreadable_file(self) -> None:
        """A missing config file is an error naming --config and the path."""
        missing = os.path.abspath(self.mktemp())
        e = self.assertRaises(ConfigError, load, missing)
        self.assertEqual(e.key, "--config")
        self.assertIn(missing, e.reason)


class ErrorTests(SynchronousTestCase):
    """Every ConfigError names the key (as written in the file) and why."""

    def error(self, text: str, key: str, reason: str) -> ConfigError:
        e = self.assertRaises(ConfigError, from_string, text, "test.properties", os.path.abspath(self.mktemp()))
        self.assertEqual(e.key, key, str(e))
        self.assertIn(reason, e.reason)
        self.assertEqual(str(e), f"test.properties: {key}: {e.reason}")
        return e

    # -- syntax and names --------------------------------------------------

    def test_syntax_error(self) -> None:
        """A properties syntax error (here a duplicate key) is reported with the line."""
        self.error(BASE + "handler.1.operation = cacerts\n", "(syntax)", "line 4")

    def test_unknown_key(self) -> None:
        """A misspelt global key is an error, not ignored."""
        self.error(BASE + "server.prot = 1\n", "server.prot", "unknown key")

    def test_unknown_numbered_kind(self) -> None:
        """Numbered keys other than handler/tokenprocedure are unknown."""
        self.error(BASE + "handlers.1.operation = cacerts\n", "handlers.1.operation", "unknown key")

    def test_unknown_handler_key(self) -> None:
        """A misspelt handler key is an error naming it."""
        self.error(BASE + "handler.1.authype = Basic\n", "handler.1.authype", "unknown handler key")

    def test_unknown_token_procedure_key(self) -> None:
        """A misspelt token procedure key is an error naming it."""
        self.error(BASE + "tokenprocedure.1.validity = 3\n", "tokenprocedure.1.validity", "unknown token procedure key")

    def test_unknown_default_key(self) -> None:
        """default.<x> must be a handler key."""
        self.error(BASE + "default.colour = red\n", "default.colour", "unknown handler key")

    def test_default_operation_or_label(self) -> None:
        """operation and label identify a handler: they have no default."""
        self.error(BASE + "default.operation = cacerts\n", "default.operation", "unknown handler key")
        self.error(BASE + "default.label = x\n", "default.label", "unknown handler key")

    # -- values --------------------------------------------------------------

    def test_bad_port(self) -> None:
        """server.port must be a number within 0..65535."""
        self.error(BASE + "server.port = https\n", "server.port", "whole number")
        self.error(BASE + "server.port = 65536\n", "server.port", "not a TCP port")
        self.error(BASE + "server.port = -1\n", "server.port", "must be 0 (a free port) or more, not -1")

    def test_bad_max_request_bytes(self) -> None:
        """server.maxRequestBytes must be at least 1024 (a CSR must fit)."""
        self.error(BASE + "server.maxRequestBytes = 0\n", "server.maxRequestBytes", "must be at least 1024 bytes, not 0")

    def test_bad_bool(self) -> None:
        """A boolean key takes true/false (and yes/no, on/off, 1/0) only."""
        self.error(BASE + "handler.1.allowRenewalWithOldCertificates = maybe\n",
                   "handler.1.allowRenewalWithOldCertificates", "expected true or false")

    def test_bad_top_level_bool_names_its_own_key(self) -> None:
        """The top-level allowRenewalWithOldCertificates is named as written,
        and checked even when every handler sets its own value."""
        self.error(BASE + "handler.1.allowRenewalWithOldCertificates = true\n"
                   "allowRenewalWithOldCertificates = sure\n",
                   "allowRenewalWithOldCertificates", "expected true or false")

    def test_bad_default_value_checked_without_handlers(self) -> None:
        """A bad default.* value is an error even if no handler uses it."""
        self.error("default.authtype = NTLM\n", "default.authtype", "must be one of Basic, Digest")

    def test_default_set_twice(self) -> None:
        """The top-level and default. spellings of one setting cannot both be set."""
        self.error(BASE + "default.allowRenewalWithOldCertificates = true\nallowRenewalWithOldCertificates = false\n",
                   "allowRenewalWithOldCertificates", "already sets it")

    def test_bad_operation(self) -> None:
        """handler.<n>.operation must be an EST operation."""
        self.error(BASE + "handler.2.operation = enroll\n", "handler.2.operation", "must be one of")

    def test_bad_label(self) -> None:
        """A CA label is one URL path segment."""
        self.error(BASE + "handler.2.operation = cacerts\nhandler.2.label = a/b\n",
                   "handler.2.label", "not a valid URL path segment")

    def test_bad_filter_and_format(self) -> None:
        """filter and format take known names only."""
        self.error(BASE + "handler.1.filter = anyone\n", "handler.1.filter", "must be one of")
        self.error(BASE + "handler.1.format = pkcs10\n", "handler.1.format", "must be one of")

    def test_bad_authtype_and_qop(self) -> None:
        """authtype is Basic or Digest; qop is only auth."""
        self.error(BASE + "handler.1.authtype = NTLM\n", "handler.1.authtype", "must be one of Basic, Digest")
        self.error(BASE + "handler.1.qop = auth-int\n", "handler.1.qop", "must be one of auth")

    def test_bad_csrattrs(self) -> None:
        """An unknown attribute name or malformed OID in csrattrs is an error."""
        self.error("handler.1.operation = csrattrs\nhandler.1.csrattrs = fooBar\n",
                   "handler.1.csrattrs", "unknown name 'fooBar'")
        self.error("handler.1.operation = csrattrs\nhandler.1.csrattrs = 1.2.03\n",
                   "handler.1.csrattrs", "malformed OID")
        self.error("handler.1.operation = csrattrs\nhandler.1.csrattrs = commonName, commonName\n",
                   "handler.1.csrattrs", "listed twice")

    # -- token procedures ---------------------------------------------------------

    def test_token_procedure_without_name(self) -> None:
        """A token procedure needs a name handlers refer to."""
        self.error("tokenprocedure.1.validity.days = 3\n", "tokenprocedure.1.name", "required")

    def test_token_procedure_name_twice(self) -> None:
        """Two procedures cannot share a name."""
        self.error("tokenprocedure.1.name = P\ntokenprocedure.2.name = P\n",
                   "tokenprocedure.2.name", "already the name of tokenprocedure.1")

    def test_bad_validity(self) -> None:
        """validity.days is a positive number."""
        self.error(BASE + "tokenprocedure.1.validity.days = 0\n", "tokenprocedure.1.validity.days", "at least 1")

    def test_bad_ca(self) -> None:
        """Only the local CA exists so far."""
        self.error(BASE + "tokenprocedure.1.ca = remote\n", "tokenprocedure.1.ca", "must be one of local")

    def test_bad_key_usage(self) -> None:
        """An unknown key usage names the keyusage key."""
        self.error(BASE + "tokenprocedure.1.keyusage = digitalSignature, extendedKeyUsage\n",
                   "tokenprocedure.1.keyusage", "unknown key usage 'extendedKeyUsage'")

    def test_bad_extended_key_usage(self) -> None:
        """An unknown extended key usage names the extendedkeyusage key."""
        self.error(BASE + "tokenprocedure.1.extendedkeyusage = clientAuth, keyEncipherment\n",
                   "tokenprocedure.1.extendedkeyusage", "unknown extended key usage 'keyEncipherment'")

    # -- handlers --------------------------------------------------------------

    def test_missing_operation(self) -> None:
        """Every handler names its operation."""
        self.error(BASE + "handler.2.label = x\n", "handler.2.operation", "required")

    def test_duplicate_route(self) -> None:
        """Two handlers cannot serve the same label and operation."""
        self.error("handler.1.operation = cacerts\nhandler.2.operation = cacerts\n",
                   "handler.2.operation", "/.well-known/est/cacerts is already served by handler.1")

    def test_missing_token_procedure(self) -> None:
        """An enroll handler needs a token procedure."""
        self.error(BARE, "handler.1.tokenprocedure", "required")

    def test_unknown_token_procedure(self) -> None:
        """A token procedure name must be defined; the known ones are listed."""
        self.error(BARE + "handler.1.tokenprocedure = Q\n", "handler.1.tokenprocedure", "no token procedure named 'Q' (known: P)")

    def test_unknown_default_token_procedure_names_default_key(self) -> None:
        """A typo in default.tokenprocedure is reported at default.tokenprocedure,
        the key the file actually has."""
        self.error(BARE + "default.tokenprocedure = Q\n", "default.tokenprocedure", "no token procedure named 'Q'")

    def test_authtype_without_realm(self) -> None:
        """authtype needs a realm line (which may be empty)."""
        self.error(BASE + "handler.1.authtype = Basic\n",
                   "handler.1.realm", "required when authtype is set")

    def test_enroll_cannot_be_public(self) -> None:
        """simpleenroll with filter public is refused."""
        self.error(BASE + "handler.1.filter = public\n",
                   "handler.1.filter", "cannot be public")

    def test_reenroll_with_filter_device(self) -> None:
        """simplereenroll is authenticated by the current certificate only."""
        self.error("tokenprocedure.1.name = P\nhandler.1.operation = simplereenroll\n"
                   "handler.1.tokenprocedure = P\nhandler.1.filter = device\n",
                   "handler.1.filter", "use clientcert")

    def test_reenroll_with_enroll_format(self) -> None:
        """simplereenroll takes the reenroll format only, and vice versa."""
        self.error("tokenprocedure.1.name = P\nhandler.1.operation = simplereenroll\n"
                   "handler.1.tokenprocedure = P\nhandler.1.format = est-simpleenroll\n",
                   "handler.1.format", "simplereenroll takes format est-simplereenroll")
        self.error(BASE + "handler.1.format = est-simplereenroll\n",
                   "handler.1.format", "est-simplereenroll is for simplereenroll")

    def test_approval_filter_only_for_simpleenroll(self) -> None:
        """The manual-approval filter cannot guard simplereenroll."""
        self.error("tokenprocedure.1.name = P\nhandler.1.operation = simplereenroll\nhandler.1.tokenprocedure = P\n"
                   "handler.1.filter = registersimpleenroll-basic-idm-auth\nhandler.1.authtype = Basic\n"
                   "handler.1.realm = r\n",
                   "handler.1.filter", "only for simpleenroll")

    def test_enroll_keys_on_cacerts(self) -> None:
        """format, tokenprocedure, authtype and csrattrs on a handler that
        does not use them are errors (a misplaced line)."""
        for key, value in (("format", "est-simpleenroll"), ("tokenprocedure", "P"),
                           ("authtype", "Basic"), ("csrattrs", "commonName")):
            self.error(f"tokenprocedure.1.name = P\nhandler.1.operation = cacerts\nhandler.1.{key} = {value}\n",
                       f"handler.1.{key}", "not used by cacerts")

    def test_cacerts_filter(self) -> None:
        """cacerts/csrattrs are public or clientcert."""
        self.error("handler.1.operation = csrattrs\nhandler.1.filter = device\n",
                   "handler.1.filter", "takes filter public or clientcert")

    def test_default_filter_error_names_default_key(self) -> None:
        """A default filter that does not fit a handler is reported at default.filter."""
        self.error("default.filter = device\nhandler.1.operation = cacerts\n",
                   "default.filter", "takes filter public or clientcert")

    # -- global checks --------------------------------------------------------------

    def test_missing_trust_anchor_file(self) -> None:
        """A tls.trustAnchors file that does not exist stops loading."""
        e = self.error(BASE + "tls.trustAnchors = factory.pem\n",
                       "tls.trustAnchors", "no such file")
        self.assertIn("factory.pem", e.reason)

    def test_bad_store_url(self) -> None:
        """store.url must be sqlite:PATH or a PostgreSQL URL libpq reads;
        the refusal never shows a password."""
        self.error(BASE + "store.url = sqlite:\n",
                   "store.url", "expected sqlite:PATH")
        e = self.error(BASE + "store.url = mysql://estgw:s3cret@db/est\n",
                       "store.url", "expected sqlite:PATH or postgresql://")
        self.assertNotIn("s3cret", str(e))
        e = self.error(BASE + "store.url = postgresql://estgw:s3cret@db/est?nosuchparam=1\n",
                       "store.url", "not a PostgreSQL URL libpq can read")
        self.assertIn("nosuchparam", e.reason)
        self.assertNotIn("s3cret", str(e))

    def test_postgresql_store_url(self) -> None:
        """A PostgreSQL URL is taken as written: no SQLite path, opened as is."""
        for url in ("postgresql://estgw@db.example:5432/estgw", "postgres:///estgw?host=/run/postgresql"):
            c = from_string(BASE + f"store.url = {url}\n", base_dir="/etc")
            self.assertIsNone(c.store_path)
            self.assertEqual(c.store_location, url)


class HelperTests(SynchronousTestCase):
    def test_default_hostnames(self) -> None:
        """localhost and both loopback addresses are always named."""
        names = config.default_hostnames()
        self.assertEqual(names[:3], ("localhost", "127.0.0.1", "::1"))

    def test_is_ip_address(self) -> None:
        """IP literals are told apart from host names."""
        self.assertTrue(config.is_ip_address("::1"))
        self.assertTrue(config.is_ip_address("192.0.2.1"))
        self.assertFalse(config.is_ip_address("localhost"))


class TrailingNewlineTests(SynchronousTestCase):
    """A pattern's ``$`` also matches before a final newline: names that
    end in one are refused all the same."""

    def test_label_with_encoded_newline(self) -> None:
        with self.assertRaises(ValueError):
            config._label("lab%0A")


def _numeric_keys() -> list[tuple[str, str, str]]:
    """Every key of the tables whose value is a number, as (key as written
    in a file, a value it accepts, what the file needs besides): found by
    asking each parser, so a key added later is covered too."""
    found = []
    tables = [
        (config._GLOBAL_KEYS, "{}", ""),
        (config._TOKEN_PROCEDURE_KEYS, "tokenprocedure.1.{}", ""),
        (config._HANDLER_KEYS, "handler.1.{}", ""),
    ]
    for table, written, _extra in tables:
        for key, (_attribute, parse) in table.items():
            for text in ("5", "30", "2048", "4096", "16384", "72"):
                try:
                    value = parse(text)
                except Exception:
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    found.append((written.format(key), text, parse))
                    break
    return found


class NumberTests(SynchronousTestCase):
    """Every numeric key is read one way: ASCII digits (and a '.' where a
    fraction makes sense), with its bounds in the message."""

    def test_every_numeric_key_takes_only_ascii_digits(self) -> None:
        """'1_0', '+5', Arabic-Indic or fullwidth digits, '1e3', 'inf' and
        '0x10' are refused for every numeric key with a reason that says
        what is expected; the plain value is accepted."""
        keys = _numeric_keys()
        # The limits at least, and the keys of handlers and procedures.
        names = {key for key, _, _ in keys}
        for expected in ("server.maxConnections", "server.maxConnectionsPerClient", "server.headerTimeout",
                         "ca.maxOverdue", "server.port", "tokenprocedure.1.validity.days",
                         "handler.1.idm.retryAfter", "handler.1.idm.pendingLifetime", "log.maxBytes"):
            self.assertIn(expected, names)
        arabic = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
        fullwidth = str.maketrans("0123456789", "０１２３４５６７８９")
        for key, text, parse in keys:
            self.assertIsNotNone(parse(text))
            for bad in (text[0] + "_" + text[1:] if len(text) > 1 else "0_" + text,
                        "+" + text, text.translate(arabic), text.translate(fullwidth), "1e3", "inf", "nan", "0x10"):
                with self.assertRaises(ValueError, msg=f"{key} = {bad}") as caught:
                    parse(bad)
                self.assertRegex(str(caught.exception), r"digits 0-9|security level|must be", f"{key} = {bad}")

    def test_from_a_file(self) -> None:
        """The same through a whole file: the key is named."""
        self.error(BASE + "server.maxConnections = 1_0\n", "server.maxConnections",
                   "expected a whole number (digits 0-9), not '1_0'")
        self.error(BASE + "server.maxConnectionsPerClient = ٥٠\n", "server.maxConnectionsPerClient",
                   "expected a whole number (digits 0-9), not '٥٠'")
        self.error(BASE + "server.idleTimeout = 6_0\n", "server.idleTimeout",
                   "expected a number of seconds (digits 0-9 and a '.'), not '6_0'")
        self.error(BASE + "tokenprocedure.1.validity.days = ３０\n", "tokenprocedure.1.validity.days",
                   "expected a whole number (digits 0-9)")

    def test_zero_means_no_cap(self) -> None:
        """The connection caps: 0 (however written) is no cap, a negative
        value is refused naming 0 as allowed."""
        for key, attribute in (("server.maxConnections", "max_connections"),
                               ("server.maxConnectionsPerClient", "max_connections_per_client")):
            for zero in ("0", "00", " 000 "):
                self.assertEqual(getattr(from_string(BASE + f"{key} = {zero}\n"), attribute), 0)
            self.error(BASE + f"{key} = -1\n", key, "must be 0 (no cap) or more, not -1")
            self.assertEqual(getattr(from_string(BASE + f"{key} = 0050\n"), attribute), 50)
        self.error(BASE + "server.port = -1\n", "server.port", "must be 0 (a free port) or more, not -1")
        self.error(BASE + "log.maxBytes = 100\n", "log.maxBytes", "must be 0 (never rotate) or at least 4096 bytes, not 100")

    def test_upper_bounds(self) -> None:
        """Values no server can use are refused with the bound: more header
        fields or body bytes than one connection should hold, more
        connections than a process can have descriptors, a validity
        or lifetime past what the dates can hold."""
        for key, value, reason in [
            ("server.maxHeaders", "100000000", "must be at most 1000, not 100000000"),
            ("server.maxRequestBytes", "1048577", "must be at most 1048576 bytes, not 1048577"),
            ("server.maxConnections", "1048577", "must be at most 1048576, not 1048577"),
            ("server.maxConnectionsPerClient", "1048577", "must be at most 1048576, not 1048577"),
            ("ca.maxOverdue", "65", "must be at most 64, not 65"),
            ("ca.maxQueued", "65537", "must be at most 65536, not 65537"),
            ("tokenprocedure.1.validity.days", "99999999999", "must be at most 36525 days"),
            ("handler.1.idm.pendingLifetime", "99999999999d", "must be at most 366 days"),
            ("handler.1.idm.retryAfter", "86401", "must be at most 86400 seconds"),
            ("publish.crl.nextUpdateHours", "8785", "must be at most 8784 hours"),
            ("log.maxFiles", "1001", "must be at most 1000"),
        ]:
            self.error(BASE + f"{key} = {value}\n", key, reason)
        config_ = from_string(BASE + "server.maxHeaders = 1000\nserver.maxRequestBytes = 1048576\nca.maxOverdue = 64\n")
        self.assertEqual((config_.max_headers, config_.max_request_bytes, config_.ca_max_overdue), (1000, 1048576, 64))

    def error(self, text: str, key: str, reason: str) -> ConfigError:
        e = self.assertRaises(ConfigError, from_string, text, "test.properties", os.path.abspath(self.mktemp()))
        self.assertEqual(e.key, key, str(e))
        self.assertIn(reason, e.reason)
        return e
