"""estgw.names: what a name in a certificate may be (RFC 5280), as
property tests of the validators and examples of each refusal."""

from __future__ import annotations

import datetime
import ipaddress
import unicodedata
import warnings

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import given, settings, strategies as st
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2986, rfc5280
from twisted.trial.unittest import SynchronousTestCase

from estgw import names, protocol
from estgw.refusal import Refusal
from estgw.testing import make_csr, new_key

# The machine is shared: no per-example deadline.
settings.register_profile("estgw", deadline=None, max_examples=150)
settings.load_profile("estgw")

_KEY = new_key()

labels = st.from_regex(r"\A[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?\Z")
host_names = st.lists(labels, min_size=1, max_size=5).filter(lambda ls: not ls[-1].isdigit()).map(".".join)
# Anything a host name may not hold.
foreign_characters = st.characters(
    blacklist_characters="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-"
)
controls = st.characters(whitelist_categories=("Cc",))
texts = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=64).filter(
    lambda t: t.strip()
)
printable_texts = st.text(
    st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"),
    min_size=1, max_size=64,
).filter(lambda t: t.strip())
atext = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~-"), min_size=1, max_size=10
)
local_parts = st.lists(atext, min_size=1, max_size=3).map(".".join)
uri_paths = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABC0123456789-._~/?#@!$&'()*+,;=:"), max_size=40
)


def make_attribute(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type | None = None) -> x509.NameAttribute:
    """Built without cryptography's own checks (and their warnings): a
    device's CSR is not."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return x509.NameAttribute(oid, value, _type=kind, _validate=False)


def _insert(text: str, position: int, character: str) -> str:
    position %= len(text) + 1
    return text[:position] + character + text[position:]


def _round_trip(subject: x509.Name) -> x509.Name:
    """The name after a certificate with it was signed and parsed again."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(_KEY.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cryptography's byte count of a commonName
        return x509.load_der_x509_certificate(cert.public_bytes(serialization.Encoding.DER)).subject


class HostNameProperties(SynchronousTestCase):
    @given(host_names)
    def test_host_names_pass(self, host: str) -> None:
        """Every name of letter/digit/hyphen labels is a dNSName."""
        self.assertEqual(names.check_dns_name(host), host)
        self.assertTrue(names.is_host_name(host))

    @given(host_names, st.integers(min_value=0), foreign_characters)
    def test_any_other_character_refused(self, host: str, position: int, character: str) -> None:
        """One character outside letters, digits, '-' and '.' anywhere in a
        host name (NUL, space, '_', '*', non-ASCII, ...) is refused."""
        with self.assertRaises(names.BadName):
            names.check_dns_name(_insert(host, position, character))

    @given(st.lists(labels, min_size=2, max_size=4).filter(lambda ls: not ls[-1].isdigit()).map(".".join))
    def test_wildcard_rule(self, host: str) -> None:
        """'*.' followed by two or more labels is the one wildcard form;
        it is refused where wildcards are not allowed, and '*' anywhere
        else is refused."""
        wildcard = "*." + host
        self.assertEqual(names.check_dns_name(wildcard), wildcard)
        self.assertFalse(names.is_host_name(wildcard))
        for bad in ("*" + host, host.replace(".", ".*.", 1), "a*." + host, "*.*." + host):
            with self.assertRaises(names.BadName, msg=bad):
                names.check_dns_name(bad)

    @given(labels)
    def test_single_label_wildcard_refused(self, label: str) -> None:
        """'*.com' would stand for a whole top-level domain."""
        if not label.isdigit():
            with self.assertRaises(names.BadName):
                names.check_dns_name("*." + label)

    def test_examples(self) -> None:
        """The NUL-smuggling name of the review, a trailing dot, a 64-
        character label, an all-digit last label, 254 characters, an
        empty name: all refused, each value escaped in the message."""
        with self.assertRaises(names.BadName) as caught:
            names.check_dns_name("www.bank.example\0.devA")
        self.assertIn(r"'www.bank.example\x00.devA'", str(caught.exception))
        self.assertTrue(str(caught.exception).isprintable())
        for bad in ("pump-17.example.", "a" * 64 + ".example", "10.0.0.1", "-a.example", "a-.example",
                    ("a" * 60 + ".") * 5 + "example", "", "a..b"):
            with self.assertRaises(names.BadName, msg=bad):
                names.check_dns_name(bad)
        self.assertEqual(names.check_dns_name("xn--caf-dma.example"), "xn--caf-dma.example")


class TextProperties(SynchronousTestCase):
    @given(texts, st.integers(min_value=0), controls)
    def test_control_characters_refused(self, text: str, position: int, control: str) -> None:
        """A control character (NUL, ESC, DEL, C1 ...) anywhere in a subject
        value is refused, and the message shows it escaped."""
        value = _insert(text, position, control)
        attribute = make_attribute(NameOID.ORGANIZATION_NAME, value[:64])
        if control not in value[:64]:
            return
        with self.assertRaises(names.BadName) as caught:
            names.check_attribute(attribute)
        message = str(caught.exception)
        self.assertFalse(any(unicodedata.category(c) == "Cc" for c in message), message)

    @given(st.text(max_size=200), st.integers(min_value=1, max_value=80))
    def test_shown_is_one_printable_line(self, text: str, limit: int) -> None:
        """shown() never lets a control character or line break through."""
        result = names.shown(text, limit)
        self.assertTrue(result.isprintable(), result)
        self.assertNotIn("\n", result)


class AttributeProperties(SynchronousTestCase):
    @given(texts, st.sampled_from([_ASN1Type.UTF8String, _ASN1Type.BMPString, _ASN1Type.UniversalString]))
    def test_directory_string_becomes_utf8(self, text: str, kind: _ASN1Type) -> None:
        """A DirectoryString value of any string type comes out as
        UTF8String with the same value, and survives a certificate."""
        attribute = make_attribute(NameOID.COMMON_NAME, text, kind)
        checked = names.check_attribute(attribute)
        self.assertEqual((checked.value, checked._type), (text, _ASN1Type.UTF8String))
        [parsed] = _round_trip(x509.Name([checked]))
        self.assertEqual((parsed.value, parsed._type), (text, _ASN1Type.UTF8String))

    @given(printable_texts)
    def test_printable_string_kept(self, text: str) -> None:
        """A commonName the request sent as PrintableString stays one
        (RFC 5280 §4.1.2.4 lets renewals keep their encoding)."""
        attribute = make_attribute(NameOID.COMMON_NAME, text, _ASN1Type.PrintableString)
        self.assertEqual(names.check_attribute(attribute)._type, _ASN1Type.PrintableString)

    @given(printable_texts, st.sampled_from([_ASN1Type.UTF8String, _ASN1Type.BMPString, _ASN1Type.IA5String]))
    def test_serial_number_becomes_printable(self, text: str, kind: _ASN1Type) -> None:
        """serialNumber is emitted as PrintableString whatever string type
        it came in."""
        attribute = make_attribute(NameOID.SERIAL_NUMBER, text, kind)
        checked = names.check_attribute(attribute)
        self.assertEqual((checked.value, checked._type), (text, _ASN1Type.PrintableString))
        [parsed] = _round_trip(x509.Name([checked]))
        self.assertEqual(parsed._type, _ASN1Type.PrintableString)

    @given(texts.filter(lambda t: any(c not in names._PRINTABLE for c in t)))
    def test_serial_number_outside_printable_refused(self, text: str) -> None:
        """A serialNumber with a character PrintableString lacks ('@', 'é',
        '_' ...) is refused."""
        with self.assertRaises(names.BadName):
            names.check_attribute(make_attribute(NameOID.SERIAL_NUMBER, text))

    @given(st.text(st.characters(blacklist_categories=("Cs",)), max_size=4))  # a CSR never decodes to a surrogate
    def test_country_is_two_letters(self, text: str) -> None:
        """countryName passes exactly when it is two ASCII letters, and is
        then a PrintableString."""
        attribute = make_attribute(NameOID.COUNTRY_NAME, text, _ASN1Type.UTF8String)
        if len(text) == 2 and text.isascii() and text.isalpha():
            self.assertEqual(names.check_attribute(attribute)._type, _ASN1Type.PrintableString)
        else:
            self.assertRaises(names.BadName, names.check_attribute, attribute)

    @given(local_parts, host_names)
    def test_email_address_attribute_is_ia5(self, local: str, host: str) -> None:
        """emailAddress (and domainComponent) come out as IA5String."""
        address = f"{local}@{host}"
        if len(address) > 254 or len(local) > 64:
            return
        checked = names.check_attribute(make_attribute(NameOID.EMAIL_ADDRESS, address, _ASN1Type.UTF8String))
        self.assertEqual(checked._type, _ASN1Type.IA5String)
        label = host.split(".")[0]
        dc = names.check_attribute(make_attribute(NameOID.DOMAIN_COMPONENT, label, _ASN1Type.UTF8String))
        self.assertEqual(dc._type, _ASN1Type.IA5String)

    @given(st.sampled_from([(NameOID.COMMON_NAME, 64), (NameOID.ORGANIZATION_NAME, 64),
                            (NameOID.LOCALITY_NAME, 128), (NameOID.SERIAL_NUMBER, 64),
                            (NameOID.EMAIL_ADDRESS, 255)]), st.integers(min_value=1, max_value=40))
    def test_upper_bounds(self, bound: tuple, extra: int) -> None:
        """One character over the RFC 5280 Appendix A bound is refused."""
        oid, limit = bound
        value = ("a" * (limit + extra - len("@x.example")) + "@x.example") if oid == NameOID.EMAIL_ADDRESS else "a" * (limit + extra)
        with self.assertRaises(names.BadName) as caught:
            names.check_attribute(make_attribute(oid, value))
        self.assertIn(f"longer than {limit}", str(caught.exception))

    def test_non_string_types_refused(self) -> None:
        """A commonName encoded as OCTET STRING (or a time) is refused."""
        for kind in (_ASN1Type.OctetString, _ASN1Type.UTCTime, _ASN1Type.GeneralizedTime):
            attribute = make_attribute(NameOID.COMMON_NAME, "devA", kind)
            with self.assertRaises(names.BadName) as caught:
                names.check_attribute(attribute)
            self.assertIn("not as a character string", str(caught.exception))

    def test_unknown_attribute_type(self) -> None:
        """An attribute type without a known syntax keeps its string type
        and is held to ub-match (128) and the text rules."""
        oid = x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")
        attribute = make_attribute(oid, "x", _ASN1Type.IA5String)
        self.assertIs(names.check_attribute(attribute), attribute)
        self.assertRaises(names.BadName, names.check_attribute, x509.NameAttribute(oid, "x" * 129))


class GeneralNameProperties(SynchronousTestCase):
    @given(st.ip_addresses())
    def test_addresses_pass(self, address) -> None:
        """An IPv4 or IPv6 address (4 or 16 octets) is an iPAddress."""
        names.check_general_name(x509.IPAddress(address))

    @given(st.ip_addresses(), st.integers(min_value=0, max_value=128))
    def test_ranges_refused(self, address, prefix: int) -> None:
        """An address range (8 or 32 octets) is refused."""
        network = ipaddress.ip_network(f"{address}/{min(prefix, address.max_prefixlen)}", strict=False)
        with self.assertRaises(names.BadName):
            names.check_general_name(x509.IPAddress(network))

    @given(local_parts, host_names)
    def test_mailboxes_pass(self, local: str, host: str) -> None:
        """A dot-atom local part at a host name is an rfc822Name."""
        address = f"{local}@{host}"
        if len(address) <= 254 and len(local) <= 64:
            names.check_general_name(x509.RFC822Name(address))

    @given(local_parts, host_names, st.sampled_from(" \x00\n\"(),:;<>[\\]é"), st.integers(min_value=0))
    def test_mailbox_with_foreign_character_refused(self, local: str, host: str, character: str, position: int) -> None:
        """A space, control character, special or non-ASCII character in
        the local part is refused."""
        with self.assertRaises(names.BadName):
            names.check_email(f"{_insert(local, position, character)}@{host}")

    @given(st.sampled_from(["https", "coap", "urn", "spiffe"]), host_names, uri_paths)
    def test_uris_pass(self, scheme: str, host: str, path: str) -> None:
        """scheme://host/path of RFC 3986 characters is a URI."""
        path = path.split("#")[0]
        names.check_general_name(x509.UniformResourceIdentifier(f"{scheme}://{host}/{path}"))

    @given(host_names, uri_paths, st.sampled_from(" \x00\x7f\n<>\"{}|\\^`é"), st.integers(min_value=0))
    def test_uri_with_foreign_character_refused(self, host: str, path: str, character: str, position: int) -> None:
        """A character RFC 3986 does not allow (space, control, non-ASCII)
        is refused wherever it is."""
        uri = f"https://{host}/{path}"
        bad = uri[:8] + _insert(uri[8:], position, character)
        with self.assertRaises(names.BadName):
            names.check_uri(bad)

    def test_trailing_newline_refused(self) -> None:
        """A name that ends in a newline is refused: a pattern's ``$`` would
        match before it, ``\\Z`` does not."""
        for name in (
            x509.DNSName("pump-17\n"), x509.UniformResourceIdentifier("https://pump-17/\n"),
            x509.RFC822Name("pump\n@plant.example"),
        ):
            with self.assertRaises(names.BadName, msg=repr(name)):
                names.check_general_name(name)

    def test_uri_examples(self) -> None:
        """A relative URI, a scheme alone, a broken percent escape and an
        authority without a host are refused; a URN and an IP host pass."""
        for bad in ("/relative/path", "https:", "https://host/%zz", "https:///path", "https://bad_host/"):
            with self.assertRaises(names.BadName, msg=bad):
                names.check_uri(bad)
        for good in ("urn:uuid:0b8e7c3a-1d52-4a57-9c1b-0c5e2d6f1a11", "https://10.0.0.1:8443/x", "https://[2001:db8::1]/"):
            names.check_uri(good)

    def test_other_names(self) -> None:
        """An otherName is one well-formed DER value; a UPN is a UTF8String
        without control characters."""
        upn = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
        names.check_general_name(x509.OtherName(upn, b"\x0c\x0ba@b.example"))
        for bad in (b"\x0c\x03a\x00b", b"\x04\x01a", b"\x0c\x05ab", b"\x0c\x01a\x0c\x01b"):
            with self.assertRaises(names.BadName, msg=bad):
                names.check_general_name(x509.OtherName(upn, bad))
        names.check_general_name(x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x02\x01\x05"))

    def test_directory_name_held_to_subject_rules(self) -> None:
        """A directoryName's attributes are checked and re-encoded like the subject's."""
        bad = x509.DirectoryName(x509.Name([make_attribute(NameOID.COMMON_NAME, "a", _ASN1Type.OctetString)]))
        self.assertRaises(names.BadName, names.check_general_name, bad)
        good = x509.DirectoryName(x509.Name([make_attribute(NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String)]))
        [attribute] = names.check_general_name(good).value
        self.assertEqual(attribute._type, _ASN1Type.PrintableString)


# -- CSRs cryptography cannot represent ---------------------------------------------


def resigned_csr(key, value_der: bytes | None = None, san_der: bytes | None = None) -> bytes:
    """A CSR for CN=pump-17 (and DNS:pump-17) whose commonName value or
    subjectAltName extension value is replaced by these DER bytes, signed
    again by ``key``: what a hostile client can send."""
    csr = make_csr(key, "pump-17", sans=[x509.DNSName("pump-17")])
    request, _ = decoder.decode(csr.public_bytes(serialization.Encoding.DER), asn1Spec=rfc2986.CertificationRequest())
    info = request["certificationRequestInfo"]
    if value_der is not None:
        info["subject"][0][0][0]["value"] = univ.Any(value_der)
    if san_der is not None:
        attribute = info["attributes"][0]
        extensions, _ = decoder.decode(bytes(attribute["values"][0]), asn1Spec=rfc5280.Extensions())
        extensions[0]["extnValue"] = univ.OctetString(san_der)
        attribute["values"][0] = univ.Any(encoder.encode(extensions))
    signature = key.sign(encoder.encode(info), ec.ECDSA(hashes.SHA256()))
    request["signature"] = univ.BitString.fromOctetString(signature)
    return encoder.encode(request)


def general_names(*encoded: bytes) -> bytes:
    body = b"".join(encoded)
    return bytes([0x30, len(body)]) + body


class UnparsableNameTests(SynchronousTestCase):
    def refusal(self, der: bytes) -> Refusal:
        with self.assertRaises(Refusal) as caught:
            protocol.parse_csr(der, "application/pkcs10")
        return caught.exception

    def test_non_string_common_name(self) -> None:
        """A commonName encoded as INTEGER, SEQUENCE, BOOLEAN, BIT STRING
        or NULL: 400 csr-bad-subject naming the type, not bad-csr."""
        for value, kind in [(encoder.encode(univ.Integer(5)), "INTEGER"), (bytes.fromhex("3003020105"), "SEQUENCE"),
                            (bytes.fromhex("0101ff"), "BOOLEAN"), (bytes.fromhex("030200ff"), "BIT STRING"),
                            (bytes.fromhex("0500"), "NULL")]:
            refusal = self.refusal(resigned_csr(_KEY, value_der=value))
            self.assertEqual((refusal.status, refusal.code), (400, "csr-bad-subject"))
            self.assertIn(f"commonName is encoded as {kind}", refusal.reason)

    def test_undecodable_strings(self) -> None:
        """A UTF8String that is not UTF-8, an IA5String with 8-bit bytes."""
        for value in (bytes.fromhex("0c02c3ff"), bytes.fromhex("160261ff"), bytes.fromhex("1401e9")):
            refusal = self.refusal(resigned_csr(_KEY, value_der=value))
            self.assertEqual(refusal.code, "csr-bad-subject")
            self.assertIn("not a valid", refusal.reason)

    def test_bad_ip_address_lengths(self) -> None:
        """An iPAddress of 0, 5 or 17 octets: 400 csr-bad-san."""
        for octets in (b"", b"\x01\x02\x03\x04\x05", bytes(17)):
            refusal = self.refusal(resigned_csr(_KEY, san_der=general_names(bytes([0x87, len(octets)]) + octets)))
            self.assertEqual((refusal.status, refusal.code), (400, "csr-bad-san"))
            self.assertIn(f"has {len(octets)} octets", refusal.reason)

    def test_x400_address(self) -> None:
        """An x400Address SAN: 400 csr-bad-san."""
        refusal = self.refusal(resigned_csr(_KEY, san_der=general_names(b"\xa3\x02\x30\x00")))
        self.assertEqual(refusal.code, "csr-bad-san")
        self.assertIn("x400Address", refusal.reason)

    def test_garbage_is_still_bad_csr(self) -> None:
        """Bytes that are no CSR at all stay 400 bad-csr."""
        self.assertEqual(self.refusal(b"\x30\x03\x02\x01\x05").code, "bad-csr")


class SpoofingAndTypeTests(SynchronousTestCase):
    """Kinds a review found issued: display-changing characters, string
    types that are no DirectoryString or cannot hold their value, URIs
    with a password, labels that are not Punycode, a name twice."""

    def test_display_changing_characters_refused(self) -> None:
        """Bidirectional overrides and isolates, line and paragraph
        separators and a byte-order mark are refused in any text."""
        for character in ("\u202e", "\u202d", "\u2066", "\u200f", "\u2028", "\u2029", "\ufeff"):
            with self.assertRaises(names.BadName, msg=repr(character)):
                names.check_attribute(make_attribute(NameOID.COMMON_NAME, f"x{character}gnp.exe", _ASN1Type.UTF8String))

    def test_not_a_directory_string(self) -> None:
        """IA5String, VisibleString and NumericString are not
        DirectoryString choices (RFC 5280 §4.1.2.4): refused for CN and O."""
        for oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME):
            for kind in (_ASN1Type.IA5String, _ASN1Type.VisibleString, _ASN1Type.NumericString):
                with self.assertRaises(names.BadName, msg=f"{oid} {kind}"):
                    names.check_attribute(make_attribute(oid, "1234", kind))

    def test_value_must_fit_its_type(self) -> None:
        """A NumericString with letters, a PrintableString with '_': refused."""
        with self.assertRaises(names.BadName):
            names.check_attribute(make_attribute(NameOID.SERIAL_NUMBER, "pump-17", _ASN1Type.NumericString))
        with self.assertRaises(names.BadName):
            names.check_attribute(make_attribute(NameOID.COMMON_NAME, "pump_17", _ASN1Type.PrintableString))

    def test_uri_with_password_refused(self) -> None:
        """user:password in a URI's authority is refused; a user alone passes."""
        with self.assertRaises(names.BadName):
            names.check_uri("https://u:p@a.example/")
        names.check_uri("https://u@a.example/")

    def test_punycode_labels(self) -> None:
        """An xn-- label must decode as Punycode to a non-ASCII label."""
        names.check_dns_name("xn--bcher-kva.example")
        for bad in ("xn--zz.example", "xn--abc.example"):
            with self.assertRaises(names.BadName, msg=bad):
                names.check_dns_name(bad)

    def test_same_san_twice_refused(self) -> None:
        """A subjectAltName twice (a host name in any case) is 400 csr-bad-san."""
        from estgw.refusal import Refusal

        for twice in (
            [x509.DNSName("a.example"), x509.DNSName("A.example")],
            [x509.RFC822Name("a@b.example"), x509.RFC822Name("a@b.example")],
        ):
            with self.assertRaises(Refusal) as caught:
                names.check_sans(twice)
            self.assertEqual((caught.exception.status, caught.exception.code), (400, "csr-bad-san"))
            self.assertIn("appears twice", caught.exception.reason)

    def test_trailing_newline_refused(self) -> None:
        """A pattern's '$' matches before a final newline: every validator
        anchors at the very end, so 'x\\n' is never a name."""
        for check, value in (
            (names.check_uri, "https://a.example/x\n"),
            (names.check_email, "a@b.example\n"),
            (names.check_dns_name, "a.example\n"),
        ):
            with self.assertRaises(names.BadName, msg=repr(value)):
                check(value)
