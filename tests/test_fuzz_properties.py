"""Property tests (hypothesis) for the wire layer not covered elsewhere.

Whatever bytes a client sends as a CSR body (base64, PEM or DER) or as a
CsrAttrs, the decoders either return a value or raise a :class:`Refusal`
with a 4xx status and a reason, never another exception (which would be
a 500); what they encode they decode back unchanged.  Whatever text an
operator writes in est.properties, loading it either gives a
configuration or a :class:`ConfigError` naming a key, never another
exception (a traceback instead of a message at start-up).

The numeric keys of est.properties take ASCII digits only.  On every
listener, RFC 9112 framing faults (a repeated or missing Host, obs-fold,
any chunk-size line) are refused at once with 400 or 413.

The Authorization header parsers are fuzzed in tests/test_httpauth.py,
names in tests/test_names.py; the whole request path in fuzz/ (atheris)
and tests/test_fuzz_regressions.py.
"""

from __future__ import annotations

import base64
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from twisted.trial import unittest

from estgw import config, csrattrs, protocol
from estgw.config import ConfigError
from estgw.properties import PropertiesError, parse_properties
from estgw.refusal import Refusal
from estgw.testing import TEST_CONFIG, make_csr, new_key

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_KEY = new_key("ec")
_CSR = make_csr(
    _KEY, "fuzz.example", sans=[x509.DNSName("fuzz.example"), x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]
)
_DER = _CSR.public_bytes(Encoding.DER)
_PEM = _CSR.public_bytes(Encoding.PEM)
_B64 = protocol.encode_base64(_DER)


def _refused_well(test: unittest.TestCase, refusal: Refusal) -> None:
    test.assertTrue(400 <= refusal.status < 500, refusal)
    test.assertTrue(refusal.code and refusal.reason.strip(), refusal)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    out = bytearray(data)
    for position, value in edits:
        out[position % len(out)] = value
    return bytes(out[:cut] if cut is not None else out)


_edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=6)
_cuts = st.one_of(st.none(), st.integers(0, len(_DER)))
_content_types = st.one_of(
    st.none(),
    st.sampled_from(["", "application/pkcs10", "APPLICATION/PKCS10; charset=us-ascii", "application/x-pkcs10", "text/plain"]),
    st.text(max_size=40),
)
# Whitespace as clients put it: LF or CRLF line breaks, spaces, tabs.
_whitespace = st.sampled_from([b"", b"\n", b"\r\n", b" ", b"\t", b"\r\n  "])


def _spread(text: bytes, gaps: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(text)
    for position, gap in sorted(gaps, reverse=True):
        at = position % (len(out) + 1)
        out[at:at] = gap
    return bytes(out)


class Base64Tests(unittest.TestCase):
    @FUZZ
    @given(st.binary(max_size=400))
    def test_any_body_decodes_or_is_refused(self, body: bytes) -> None:
        try:
            protocol.decode_base64_body(body)
        except Refusal as refusal:
            _refused_well(self, refusal)

    @FUZZ
    @given(st.binary(min_size=1, max_size=300), st.lists(st.tuples(st.integers(0, 1000), _whitespace), max_size=8), st.booleans())
    def test_round_trip_through_whitespace_and_missing_padding(self, der: bytes, gaps: list[tuple[int, bytes]], strip: bool) -> None:
        text = protocol.encode_base64(der)
        if strip:
            text = text.rstrip(b"\n").rstrip(b"=")
        self.assertEqual(protocol.decode_base64_body(_spread(text, gaps)), der)


class CsrDecodingTests(unittest.TestCase):
    def test_each_encoding_gives_the_same_request(self) -> None:
        for body in (_B64, _PEM, _DER, _B64.replace(b"\n", b"\r\n"), b"\n" + _PEM + b"\n"):
            self.assertEqual(protocol.parse_csr(body, "application/pkcs10").public_bytes(Encoding.DER), _DER)

    @FUZZ
    @given(st.binary(max_size=600), _content_types)
    def test_any_body_is_a_request_or_a_refusal(self, body: bytes, content_type: str | None) -> None:
        try:
            protocol.parse_csr(body, content_type)
        except Refusal as refusal:
            _refused_well(self, refusal)

    @FUZZ
    @given(st.sampled_from(["der", "base64", "pem"]), _edits, _cuts, _content_types)
    def test_a_damaged_request_is_a_request_or_a_refusal(
        self, encoding: str, edits: list[tuple[int, int]], cut: int | None, content_type: str | None
    ) -> None:
        """Mutations of a valid CSR reach deep into the DER decoder: every
        field cryptography parses lazily is read in parse_csr, so none can
        fail later, in a policy check."""
        der = _mutate(_DER, edits, cut)
        assume(der)
        body = {
            "der": der,
            "base64": protocol.encode_base64(der),
            "pem": b"-----BEGIN CERTIFICATE REQUEST-----\n" + protocol.encode_base64(der) + b"-----END CERTIFICATE REQUEST-----\n",
        }[encoding]
        try:
            csr = protocol.parse_csr(body, content_type)
        except Refusal as refusal:
            _refused_well(self, refusal)
            return
        # What parsed can be read whole, as the policy checks do.
        csr.subject.rfc4514_string()
        for extension in csr.extensions:
            extension.value
        csr.is_signature_valid

    @FUZZ
    @given(st.binary(max_size=200), st.binary(max_size=200))
    def test_pem_armour_around_anything(self, before: bytes, inside: bytes) -> None:
        body = before + b"-----BEGIN CERTIFICATE REQUEST-----\n" + inside + b"\n-----END CERTIFICATE REQUEST-----\n"
        try:
            protocol.parse_csr(body, None)
        except Refusal as refusal:
            _refused_well(self, refusal)


# Dotted OIDs DER can carry: first arc 0..2, second 0..39 below 2.
_oids = st.builds(
    lambda first, second, rest: ".".join(map(str, (first, second if first < 2 else second * 7, *rest))),
    st.integers(0, 2), st.integers(0, 39), st.lists(st.integers(0, 2**64), max_size=6),
)
_EXTENSION_REQUEST = "1.2.840.113549.1.9.14"


class CsrAttrsTests(unittest.TestCase):
    @FUZZ
    @given(st.lists(st.tuples(_oids, st.lists(_oids, max_size=3)), max_size=8))
    def test_encode_then_decode_gives_the_same_attributes(self, items: list[tuple[str, list[str]]]) -> None:
        assume(all(oid != _EXTENSION_REQUEST for oid, _ in items))
        attributes = tuple(protocol.CsrAttr(oid, tuple(values)) for oid, values in items)
        encoded = protocol.encode_csrattrs(attributes)
        decoded = protocol.decode_csrattrs(encoded)
        # attrValues is a SET OF: DER puts its values in encoding order.
        self.assertEqual(
            [(a.oid, sorted(a.values)) for a in decoded], [(a.oid, sorted(a.values)) for a in attributes]
        )
        self.assertEqual(protocol.encode_csrattrs(decoded), encoded)
        # The response as csrattrs sends it (no template) is the same bytes.
        self.assertEqual(csrattrs.encode_response(attributes, None), protocol.encode_csrattrs(attributes))

    @FUZZ
    @given(st.binary(max_size=400))
    def test_any_body_decodes_or_is_refused(self, data: bytes) -> None:
        for body in (data, protocol.encode_base64(data) if data else b""):
            try:
                protocol.decode_csrattrs(body)
            except Refusal as refusal:
                _refused_well(self, refusal)

    @FUZZ
    @given(st.lists(st.tuples(_oids, st.lists(_oids, max_size=2)), min_size=1, max_size=4), _edits)
    def test_damaged_attributes_decode_or_are_refused(self, items: list[tuple[str, list[str]]], edits: list[tuple[int, int]]) -> None:
        assume(all(oid != _EXTENSION_REQUEST for oid, _ in items))
        der = base64.b64decode(protocol.encode_csrattrs(tuple(protocol.CsrAttr(o, tuple(v)) for o, v in items)))
        try:
            protocol.decode_csrattrs(protocol.encode_base64(_mutate(der, edits, None)))
        except Refusal as refusal:
            _refused_well(self, refusal)

    @FUZZ
    @given(st.text(max_size=120))
    def test_the_csrattrs_setting_parses_or_names_the_item(self, text: str) -> None:
        try:
            protocol.parse_csrattrs_setting(text)
        except ValueError as e:
            self.assertTrue(str(e))

    @FUZZ
    @given(st.text(max_size=160))
    def test_the_template_setting_parses_or_names_the_item(self, text: str) -> None:
        try:
            template = csrattrs.parse_template_setting(text)
        except ValueError as e:
            self.assertTrue(str(e))
            return
        if template is not None:
            csrattrs.template_der(template)


# Keys est.properties knows, so that generated files get past "unknown key".
_KEYS = [
    "server.port", "server.interface", "server.hostnames", "server.maxRequestBytes", "state.directory",
    "store.url", "tls.ciphers", "tls.ciphersuites", "tls.groups", "tls.keyType", "tls.securityLevel",
    "tls.trustAnchors", "tls.crls", "tls.crl.stale", "tls.ocsp", "tls.ocsp.timeout", "tls.ocsp.failure",
    "tls.ocsp.cacheSeconds", "ca.name", "ca.keyType", "ca.rsaPadding", "metrics.port", "metrics.interface",
    "publish.port", "publish.interface", "publish.crl.nextUpdateHours", "coaps.port", "coaps.interface",
    "idm.requestUrl", "idm.timeout", "idm.retryAfter", "idm.pendingLifetime", "serverkeygen.keyType",
    "serverkeygen.allowUnencryptedKey", "default.tokenprocedure", "enroll.mandatorypassword",
    "allowRenewalWithOldCertificates",
    "tokenprocedure.1.name", "tokenprocedure.1.validity.days", "tokenprocedure.2.name",
    "tokenprocedure.2.validity.days", "tokenprocedure.1.kind", "tokenprocedure.1.crl.url",
    "handler.1.operation", "handler.1.label", "handler.1.authtype", "handler.1.realm", "handler.1.csrattrs",
    "handler.1.csrattrs.template", "handler.2.operation", "handler.2.label", "handler.2.authtype",
    "handler.2.tokenprocedure", "handler.2.csrattrs", "handler.9.operation", "handler.x.operation",
]
_values = st.one_of(
    st.sampled_from(["", "0", "-1", "65536", "1e9", "99999999999999999999", "yes", "true", "Basic", "Digest",
                     "simpleenroll", "cacerts", "csrattrs", "serverkeygen", "Test Procedure", "lab", "::1",
                     "127.0.0.1", "ec", "rsa2048", "none", "*", "\\", "\\u00e9", "a,,b", "file:x", "sqlite:"]),
    st.text(max_size=30),
)


class PropertiesTests(unittest.TestCase):
    @FUZZ
    @given(st.text(max_size=400))
    def test_any_text_parses_or_names_the_line(self, text: str) -> None:
        try:
            parse_properties(text)
        except PropertiesError as e:
            self.assertTrue(str(e))

    @FUZZ
    @given(st.text(alphabet=st.sampled_from(list("ab=:\\ \t\n\r!#u0e9fx")), max_size=120))
    def test_escapes_and_continuations(self, text: str) -> None:
        try:
            parse_properties(text)
        except PropertiesError as e:
            self.assertTrue(str(e))


class ConfigTests(unittest.TestCase):
    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def _load(self, text: str) -> None:
        try:
            config.from_string(text, source="fuzz.properties", base_dir=self.base)
        except ConfigError as e:
            self.assertTrue(e.key and e.reason, e)

    @FUZZ
    @given(st.text(max_size=400))
    def test_any_text_loads_or_names_the_key(self, text: str) -> None:
        self._load(text)

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(_KEYS), _values), max_size=6), st.booleans())
    def test_known_keys_with_any_values(self, changes: list[tuple[str, str]], replace: bool) -> None:
        """The test configuration with keys set (again) to fuzzed values:
        every value parser reached, each must name its key."""
        lines = TEST_CONFIG.splitlines()
        for key, value in changes:
            if replace:
                lines = [line for line in lines if not line.startswith(key + " ")]
            lines.append(f"{key} = {value}".replace("\n", " "))
        self._load("\n".join(lines) + "\n")


# -- numbers in est.properties ----------------------------------------------------

_NUMERIC = [
    (key, parse) for key, (_attribute, parse) in config._GLOBAL_KEYS.items()
    if key.startswith(("server.max", "server.header", "server.body", "server.idle", "ca.max", "ca.timeout", "log.max"))
]


class NumberTests(unittest.TestCase):
    @FUZZ
    @given(st.sampled_from(_NUMERIC), st.text(max_size=12))
    def test_a_numeric_value_is_ascii_digits_or_refused(self, key_parse: tuple[str, object], text: str) -> None:
        """Whatever text a numeric key is given, it is accepted only when
        written in ASCII digits (with at most one '.'), and then it reads
        as Python reads those digits; anything else is a ValueError with
        a reason."""
        key, parse = key_parse
        try:
            value = parse(text)  # type: ignore[operator]
        except ValueError as e:
            self.assertTrue(str(e))
            return
        written = text.strip()
        self.assertRegex(written, r"\A[0-9]*\.?[0-9]*\Z", key)
        self.assertEqual(value, float(written) if "." in written else int(written), key)


# -- HTTP/1.1 framing on every listener ------------------------------------------------

def _sites() -> list[tuple[str, object, bytes, int]]:
    """(name, site, a path that takes a body, its body limit) of every
    twisted.web site estgw runs, as tests/test_fuzz_regressions.py builds them."""
    from estgw.approval.service import MAX_BODY, build_site as approval_site
    from estgw.ca.publish import MAX_OCSP_REQUEST, publish_site
    from estgw.metrics import METRICS_MAX_BODY, Metrics, metrics_site
    from estgw.web import build_site

    class _Gateway:
        config = config.from_string(TEST_CONFIG, base_dir=os.path.abspath("fuzz-state"))
        metrics = Metrics()

    return [
        ("est", build_site(_Gateway()), b"/not-est", _Gateway.config.max_request_bytes),
        ("metrics", metrics_site(Metrics()), b"/metrics", METRICS_MAX_BODY),
        ("publish", publish_site({}), b"/ocsp/x", MAX_OCSP_REQUEST),
        ("approval", approval_site(None, lambda request: None, None), b"/approval/requests/x", MAX_BODY),
    ]


_SITES = _sites()


def _exchange(site: object, data: bytes) -> tuple[bytes, bool]:
    """Feed ``data`` to a new connection of ``site`` without letting any
    time pass: what it answered at once, and whether it closed."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    site.reactor = Clock()  # type: ignore[attr-defined]
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    channel = site.buildProtocol(peer)  # type: ignore[attr-defined]
    transport = StringTransport(peerAddress=peer)
    channel.makeConnection(transport)
    channel.dataReceived(data)
    output, closed = transport.value(), transport.disconnecting
    channel.connectionLost(None)
    return output, closed


def _status(output: bytes) -> int:
    return int(output[9:12]) if output.startswith(b"HTTP/1.1 ") else 0


_field_names = st.sampled_from([b"Host", b"host", b"HOST", b"Content-Type", b"content-type", b"X-Other", b"Accept"])
_field_values = st.binary(max_size=20).filter(lambda v: b"\r" not in v and b"\n" not in v and b"\0" not in v)


class FramingTests(unittest.TestCase):
    """RFC 9112 framing faults are refused at once, on every listener."""

    @FUZZ
    @given(st.sampled_from(_SITES), st.lists(st.tuples(_field_names, _field_values), max_size=6),
           st.integers(0, 6), st.sampled_from([b" ", b"\t", b"  \t"]))
    def test_repeated_host_and_folded_lines(self, site: tuple, fields: list[tuple[bytes, bytes]],
                                            fold_at: int, fold: bytes) -> None:
        """A request with two Host (or Content-Type) field lines, no Host
        at all, or a line folded onto the next (obs-fold) is answered 400
        at once and the connection closed; one Host and no fold is not
        refused for that."""
        name, built, path, _limit = site
        fields = [(b"Host", b"localhost")] + fields
        lines = [n + b": " + v.strip(b" \t") for n, v in fields]
        folded = fold_at < len(lines) and fold_at > 0
        if folded:
            lines.insert(fold_at, fold + b"continued")
        data = b"GET " + path + b" HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        output, closed = _exchange(built, data)
        counts = {n.lower(): sum(1 for m, _ in fields if m.lower() == n.lower()) for n, _ in fields}
        faulty = folded or counts.get(b"host", 0) != 1 or counts.get(b"content-type", 0) > 1
        if faulty:
            self.assertEqual(_status(output), 400, (name, data, output))
            self.assertTrue(closed, name)
        else:
            self.assertNotIn(b"RFC 9112", output, (name, data))

    @FUZZ
    @given(st.sampled_from(_SITES), st.one_of(
        st.integers(0, 2**128).map(lambda n: b"%x" % n),
        st.integers(0, 2**128).map(lambda n: b"%X" % n),
        st.binary(max_size=40).filter(lambda b: b"\r\n" not in b and b";" not in b),
    ))
    def test_any_chunk_size(self, site: tuple, size: bytes) -> None:
        """A chunk-size line (RFC 9112 §7.1) is refused at once: 413 when
        it announces more than the listener's body limit, 400 when it is
        not a hexadecimal number; a size within the limit waits for its
        data (nothing answered yet)."""
        name, built, path, limit = site
        data = (b"POST " + path + b" HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                + size + b"\r\n")
        output, closed = _exchange(built, data)
        parsed = int(size, 16) if size and all(c in b"0123456789abcdefABCDEF" for c in size) else None
        if parsed is None:
            self.assertEqual(_status(output), 400, (name, size, output))
            self.assertTrue(closed)
        elif parsed > limit:
            self.assertEqual(_status(output), 413, (name, size, output))
            self.assertTrue(closed)
        elif parsed > 0:
            self.assertEqual(output, b"", (name, size))
