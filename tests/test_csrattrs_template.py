"""RFC 9908 CSR attribute templates: what csrattrs announces, and that it holds.

The csrattrs answer is fetched with curl over real TLS and decoded with
pyasn1 against the RFC 9908 ASN.1 module (:mod:`estgw.rfc9908`) and
pyasn1-modules' RFC 7030 / RFC 5280 / RFC 8017 modules, field by field;
openssl's DER parser reads it too.  Enrollment under the same CA label is
then held to what was announced.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import subprocess
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.type import char, univ
from pyasn1_modules import rfc5280, rfc7030, rfc8017
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from estgw import config as config_module
from estgw import csrattrs, rfc9908
from estgw.config import ConfigError
from estgw.passwords import hash_password
from estgw.store import Device
from estgw.testing import TEST_CONFIG, RunningGateway, _which, csr_pem, new_key

TEMPLATE_CONFIG = TEST_CONFIG + """\
handler.30.operation = csrattrs
handler.30.label = acme
handler.30.csrattrs = ecdsa-with-SHA384
handler.30.csrattrs.template = subject: CN, O=ACME, OU ; key: ec-p384 ; extensions: subjectAltName, keyUsage!
handler.31.operation = simpleenroll
handler.31.label = acme
handler.31.authtype = Basic
handler.31.realm = test realm
handler.31.deviceNames = any
handler.32.operation = serverkeygen
handler.32.label = acme
handler.32.authtype = Basic
handler.32.realm = test realm
handler.32.serverkeygen.allowUnencryptedKey = true
handler.32.deviceNames = any
handler.40.operation = csrattrs
handler.40.label = fixed
handler.40.csrattrs.template = subject: CN=pump-17, C=DE ; key: rsa-3072 ; \\
    extensions: subjectAltName=DNS:pump-17.example|IP:10.0.0.17, extKeyUsage=clientAuth
handler.41.operation = simpleenroll
handler.41.label = fixed
handler.41.authtype = Basic
handler.41.realm = test realm
handler.41.deviceNames = any
"""
USER = "pump-17:s3cret"
# deviceNames = any: a password device may carry the subject attributes and
# names the templates ask for without registering each.

ID_TEMPLATE = "1.2.840.113549.1.9.16.2.61"
ID_EXT_TEMPLATE = "1.2.840.113549.1.9.16.2.62"
ID_EXT_REQ = "1.2.840.113549.1.9.14"


def decode(body: bytes) -> list[Any]:
    """The AttrOrOID items of a base64 csrattrs body, decoded strictly."""
    der = base64.b64decode(body)
    seq, rest = der_decoder.decode(der, asn1Spec=rfc7030.CsrAttrs())
    assert rest == b""
    return list(seq)


def bare_oids(items: list[Any]) -> list[str]:
    return [str(item["oid"]) for item in items if item.getName() == "oid"]


def attributes(items: list[Any]) -> dict[str, list[bytes]]:
    found: dict[str, list[bytes]] = {}
    for item in items:
        if item.getName() == "attribute":
            attribute = item["attribute"]
            oid = str(attribute["attrType"])
            assert oid not in found, f"{oid} twice"
            found[oid] = [bytes(v) for v in attribute["attrValues"]]
    return found


def strict(der: bytes, spec: Any) -> Any:
    value, rest = der_decoder.decode(der, asn1Spec=spec)
    assert rest == b"", rest
    return value


def template_of(items: list[Any]) -> Any:
    values = attributes(items)[ID_TEMPLATE]
    assert len(values) == 1
    return strict(values[0], rfc9908.CertificationRequestInfoTemplate())


def template_attributes(template: Any) -> dict[str, list[bytes]]:
    return {str(a["type"]): [bytes(v) for v in a["values"]] for a in template["attributes"]}


class AnnouncementTests(TestCase):
    """csrattrs over TLS, decoded field by field."""

    async def fetch(self, path: str) -> list[Any]:
        gateway = await RunningGateway.start(self, TEMPLATE_CONFIG)
        result = await gateway.curl(path)
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(result.headers["content-type"], "application/csrattrs")
        # openssl's own DER parser reads it too.
        parsed = subprocess.run(
            [_which("openssl"), "asn1parse", "-inform", "DER"],
            input=base64.b64decode(result.body), capture_output=True,
        )
        self.assertEqual(parsed.returncode, 0, parsed.stderr)
        return decode(result.body)

    async def test_template_with_client_chosen_values(self) -> None:
        """acme: version v1; subject CN (no value), O fixed to 'ACME' as a
        UTF8String, OU (no value); subjectPKInfo [0] with ecPublicKey and
        secp384r1 and no key; one id-aa-extensionReqTemplate (values left
        to the client) holding subjectAltName and a critical keyUsage, no
        extensionRequest beside it.  The RFC 9908 §3.2 form is served
        alongside: the configured OID, the subject attribute types, the
        extension OIDs and ecPublicKey with the curve."""
        items = await self.fetch("acme/csrattrs")
        template = template_of(items)
        self.assertEqual(int(template["version"]), 0)
        rdns = template["subject"]["rdnSequence"]
        self.assertEqual([len(rdn) for rdn in rdns], [1, 1, 1])
        singles = [rdn[0] for rdn in rdns]
        self.assertEqual([str(s["type"]) for s in singles], ["2.5.4.3", "2.5.4.10", "2.5.4.11"])
        self.assertEqual([s["value"].isValue for s in singles], [False, True, False])
        self.assertEqual(str(strict(bytes(singles[1]["value"]), char.UTF8String())), "ACME")
        spki = template["subjectPKInfo"]
        self.assertEqual(str(spki["algorithm"]["algorithm"]), "1.2.840.10045.2.1")
        self.assertEqual(str(strict(bytes(spki["algorithm"]["parameters"]), univ.ObjectIdentifier())), "1.3.132.0.34")
        self.assertFalse(spki["subjectPublicKey"].isValue)
        attrs = template_attributes(template)
        self.assertEqual(list(attrs), [ID_EXT_TEMPLATE])
        self.assertEqual(len(attrs[ID_EXT_TEMPLATE]), 1)
        extensions = strict(attrs[ID_EXT_TEMPLATE][0], rfc9908.ExtensionReqTemplate())
        self.assertEqual([str(e["extnID"]) for e in extensions], ["2.5.29.17", "2.5.29.15"])
        self.assertEqual([bool(e["critical"]) for e in extensions], [False, True])
        self.assertEqual([e["extnValue"].isValue for e in extensions], [False, False])

        self.assertEqual(
            bare_oids(items),
            ["1.2.840.10045.4.3.3", "2.5.4.3", "2.5.4.10", "2.5.4.11", "2.5.29.17", "2.5.29.15"],
        )
        legacy = attributes(items)
        self.assertEqual(sorted(legacy), sorted(["1.2.840.10045.2.1", ID_TEMPLATE]))
        self.assertEqual(
            [str(strict(v, univ.ObjectIdentifier())) for v in legacy["1.2.840.10045.2.1"]], ["1.3.132.0.34"]
        )

    async def test_template_with_fixed_values(self) -> None:
        """fixed: CN fixed to 'pump-17' and C to 'DE' (a PrintableString);
        subjectPKInfo rsaEncryption with NULL parameters and a placeholder
        RSAPublicKey whose modulus has 3072 bits; every extension value is
        fixed, so the template carries one extensionRequest (never the
        template form beside it) holding exactly one Extensions: the SAN
        dNSName and iPAddress and extKeyUsage clientAuth.  Alongside, the
        §3.2 form: rsaEncryption with the INTEGER 3072, and one
        extensionRequest attribute whose single value is an Extensions
        (RFC 9908 §3.2), never a SET of OIDs."""
        items = await self.fetch("fixed/csrattrs")
        template = template_of(items)
        singles = [rdn[0] for rdn in template["subject"]["rdnSequence"]]
        self.assertEqual(str(strict(bytes(singles[0]["value"]), char.UTF8String())), "pump-17")
        self.assertEqual(str(strict(bytes(singles[1]["value"]), char.PrintableString())), "DE")
        spki = template["subjectPKInfo"]
        self.assertEqual(str(spki["algorithm"]["algorithm"]), "1.2.840.113549.1.1.1")
        strict(bytes(spki["algorithm"]["parameters"]), univ.Null())
        placeholder = strict(spki["subjectPublicKey"].asOctets(), rfc8017.RSAPublicKey())
        self.assertEqual(int(placeholder["modulus"]).bit_length(), 3072)
        attrs = template_attributes(template)
        self.assertEqual(list(attrs), [ID_EXT_REQ])

        def check_extensions(values: list[bytes]) -> None:
            self.assertEqual(len(values), 1)
            extensions = strict(values[0], rfc5280.Extensions())
            self.assertEqual([str(e["extnID"]) for e in extensions], ["2.5.29.17", "2.5.29.37"])
            names = strict(bytes(extensions[0]["extnValue"]), rfc5280.GeneralNames())
            self.assertEqual(str(names[0]["dNSName"]), "pump-17.example")
            self.assertEqual(ipaddress.ip_address(bytes(names[1]["iPAddress"])), ipaddress.ip_address("10.0.0.17"))
            usages = strict(bytes(extensions[1]["extnValue"]), rfc5280.ExtKeyUsageSyntax())
            self.assertEqual([str(u) for u in usages], ["1.3.6.1.5.5.7.3.2"])

        check_extensions(attrs[ID_EXT_REQ])
        legacy = attributes(items)
        self.assertEqual(sorted(legacy), sorted(["1.2.840.113549.1.1.1", ID_EXT_REQ, ID_TEMPLATE]))
        self.assertEqual([int(strict(v, univ.Integer())) for v in legacy["1.2.840.113549.1.1.1"]], [3072])
        check_extensions(legacy[ID_EXT_REQ])
        self.assertEqual(bare_oids(items), ["2.5.4.3", "2.5.4.6"])


def request(
    key: Any = None,
    subject: dict[str, str] | None = None,
    sans: tuple[x509.GeneralName, ...] = (x509.DNSName("pump-17"),),
    key_usage: bool = True,
    eku: bool = False,
    key_usage_critical: bool = True,
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP384R1())
    fields = {"CN": "pump-17", "O": "ACME", "OU": "pumps"} if subject is None else subject
    oids = {"CN": NameOID.COMMON_NAME, "O": NameOID.ORGANIZATION_NAME, "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "C": NameOID.COUNTRY_NAME}
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(oids[k], v) for k, v in fields.items()])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    if key_usage:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=key_usage_critical
        )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return csr_pem(builder.sign(key, hashes.SHA384()))


class EnforcementTests(TestCase):
    """Requests under a label are held to its template, on every enroll
    operation: refused with a reason naming what is missing, nothing issued."""

    async def start(self) -> RunningGateway:
        self.events: list[dict] = []

        def observe(event: dict) -> None:
            if event.get("log_namespace") == "estgw.audit":
                self.events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        gateway = await RunningGateway.start(self, TEMPLATE_CONFIG)
        await gateway.store.add_device(Device(device_id="pump-17", password_hash=hash_password("s3cret")))
        return gateway

    async def test_matching_requests_issue(self) -> None:
        """A CSR with every announced part is issued on simpleenroll; on
        serverkeygen the key made is the announced P-384 one."""
        gateway = await self.start()
        result = await gateway.curl("acme/simpleenroll", request(), user=USER)
        self.assertEqual(result.status, 200, result.text)
        result = await gateway.curl("acme/serverkeygen", request(key=new_key()), user=USER)
        self.assertEqual(result.status, 200, result.text)
        self.assertIn(b"Content-Type: application/pkcs8", result.body)
        self.assertEqual(gateway.config.handler("acme", "serverkeygen").serverkeygen_key_type, "ec-p384")
        result = await gateway.curl(
            "fixed/simpleenroll",
            request(new_key("rsa3072"), {"CN": "pump-17", "C": "DE"},
                    (x509.DNSName("pump-17.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17"))), False, True),
            user=USER,
        )
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await gateway.store.count_certificates(), 3)

    async def test_refusals(self) -> None:
        """Missing OU, O not the fixed 'ACME', a P-256 key, no keyUsage, no
        SAN, another SAN than the fixed one, a 2048-bit key where 3072 is
        announced, and a CSR without OU on serverkeygen."""
        gateway = await self.start()
        p256 = ec.generate_private_key(ec.SECP256R1())
        cases = [
            ("acme/simpleenroll", request(subject={"CN": "pump-17", "O": "ACME"}), "csr-template-subject", "lacks organizationalUnitName"),
            ("acme/simpleenroll", request(subject={"CN": "pump-17", "O": "Other", "OU": "x"}), "csr-template-subject", "organizationName must be 'ACME'"),
            ("acme/simpleenroll", request(key=p256), "csr-template-key", "the CSR key is ec-p256; csrattrs announces ec-p384"),
            ("acme/simpleenroll", request(key_usage=False), "csr-template-extension", "lacks keyUsage"),
            ("acme/serverkeygen", request(subject={"CN": "pump-17", "O": "ACME"}), "csr-template-subject", "lacks organizationalUnitName"),
            ("fixed/simpleenroll", request(new_key("rsa3072"), {"CN": "pump-17", "C": "DE"}, (x509.DNSName("other.example"),), False, True),
             "csr-template-extension", "subjectAltName differs"),
            ("fixed/simpleenroll", request(new_key("rsa2048"), {"CN": "pump-17", "C": "DE"},
                                           (x509.DNSName("pump-17.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17"))), False, True),
             "csr-template-key", "rsa-2048; csrattrs announces rsa-3072"),
            ("fixed/simpleenroll", request(new_key("rsa3072"), {"CN": "pump-17", "C": "DE"},
                                           (x509.DNSName("pump-17.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17"))), False, False),
             "csr-template-extension", "lacks extendedKeyUsage"),
        ]
        for path, body, code, reason in cases:
            del self.events[:]
            result = await gateway.curl(path, body, user=USER)
            self.assertEqual(result.status, 403, (path, result.text))
            self.assertIn(reason, result.text)
            self.assertEqual([e["code"] for e in self.events if e.get("event") == "refused"], [code])
            self.assertEqual([e for e in self.events if e.get("event") == "issued"], [])
        self.assertEqual(await gateway.store.count_certificates(), 0)


    async def test_critical_marker_enforced(self) -> None:
        """'keyUsage!' is announced critical: a CSR whose keyUsage is not
        marked critical is refused on simpleenroll and serverkeygen."""
        gateway = await self.start()
        for path in ("acme/simpleenroll", "acme/serverkeygen"):
            del self.events[:]
            result = await gateway.curl(path, request(key_usage_critical=False), user=USER)
            self.assertEqual(result.status, 403, (path, result.text))
            self.assertIn("keyUsage is not marked critical", result.text)
            self.assertEqual([e["code"] for e in self.events if e.get("event") == "refused"], ["csr-template-extension"])
            self.assertEqual([e for e in self.events if e.get("event") == "issued"], [])
        self.assertEqual(await gateway.store.count_certificates(), 0)

    async def test_fixed_san_compares_host_names_without_case(self) -> None:
        """A fixed dNSName matches in any letter case (RFC 4343); another
        name is still refused."""
        gateway = await self.start()
        sans = (x509.DNSName("PUMP-17.Example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17")))
        result = await gateway.curl(
            "fixed/simpleenroll", request(new_key("rsa3072"), {"CN": "pump-17", "C": "DE"}, sans, False, True), user=USER
        )
        self.assertEqual(result.status, 200, result.text)
        self.assertEqual(await gateway.store.count_certificates(), 1)
        sans = (x509.DNSName("PUMP-18.Example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17")))
        result = await gateway.curl(
            "fixed/simpleenroll", request(new_key("rsa3072"), {"CN": "pump-17", "C": "DE"}, sans, False, True), user=USER
        )
        self.assertEqual(result.status, 403, result.text)
        self.assertIn("subjectAltName differs", result.text)
        self.assertEqual(await gateway.store.count_certificates(), 1)


class SettingTests(SynchronousTestCase):
    def test_parse(self) -> None:
        """Sections in any order and case; names, long names and OIDs;
        '!' marks a critical extension."""
        template = csrattrs.parse_template_setting(
            " EXTENSIONS: keyUsage!=digitalSignature, 2.999.1=der:0500 ; key: RSA-4096; subject: commonName, 2.5.4.5=SN1 "
        )
        assert template is not None
        self.assertEqual(template.key_type, "rsa-4096")
        self.assertEqual(
            [(r.oid.dotted_string, r.value) for r in template.subject], [("2.5.4.3", None), ("2.5.4.5", "SN1")]
        )
        self.assertEqual(
            [(r.oid.dotted_string, r.critical, r.der) for r in template.extensions],
            [("2.5.29.15", True, x509.KeyUsage(True, False, False, False, False, False, False, False, False).public_bytes()),
             ("2.999.1", False, b"\x05\x00")],
        )
        self.assertIsNone(csrattrs.parse_template_setting("  "))

    def test_errors_name_the_key(self) -> None:
        """A bad template stops start-up with the key and what is wrong."""
        for text, fragment in [
            ("subject CN", "expected a section"),
            ("subject: CN; subject: O", "given twice"),
            ("key: ec-p999", "ec-p256, ec-p384"),
            ("subject: XX", "unknown name 'XX'"),
            ("subject: C=DEU", "two letters"),
            ("extensions: subjectAltName=mail:x", "DNS:, IP:, URI: or email:"),
            ("extensions: subjectAltName=IP:hall", "not an IP address"),
            ("extensions: keyUsage=flying", "unknown key usage"),
            ("extensions: 2.999.1=05", "der:HEX"),
            ("extensions: keyUsage, 2.5.29.15", "listed twice"),
            ("extensions: subjectAltName=DNS:bad..name, 2.999.1=der:0500", "'bad..name' is not a host name"),
            ("extensions: subjectAltName=DNS:a.example|DNS:A.example", "appears twice"),
            ("extensions: subjectAltName=email:nobody", "not an e-mail address"),
            ("extensions: subjectAltName=URI:relative/path", "no scheme"),
            ("extensions: 2.999.1=der:05", "not a well-formed DER value"),
            ("extensions: 2.999.1=der:05000500", "more than one DER value"),
            ("extensions: 2.999.1=der:0101ff00", "more than one DER value"),
            ("extensions: 2.999.1=der:0381020000", "is BER, not DER"),
            ("subject: O=A\u202eB", "changes how the name is displayed"),
            ("extensions: ", "empty"),
        ]:
            error = self.assertRaises(
                ConfigError, config_module.from_string,
                TEST_CONFIG + f"handler.30.operation = csrattrs\nhandler.30.label = x\nhandler.30.csrattrs.template = {text}\n",
            )
            self.assertEqual(error.key, "handler.30.csrattrs.template", text)
            self.assertIn(fragment, error.reason, text)

    def test_only_on_csrattrs(self) -> None:
        """csrattrs.template on another operation is an error."""
        error = self.assertRaises(
            ConfigError, config_module.from_string, TEST_CONFIG + "handler.2.csrattrs.template = key: ec-p256\n"
        )
        self.assertEqual(error.key, "handler.2.csrattrs.template")

    def test_serverkeygen_key_follows_template(self) -> None:
        """A serverkeygen handler without keyType makes the announced key;
        one whose keyType differs is an error naming it; enrollment
        handlers of other labels are not held to the template."""
        base = TEST_CONFIG + (
            "handler.30.operation = csrattrs\nhandler.30.label = x\nhandler.30.csrattrs.template = key: rsa-3072\n"
            "handler.31.operation = serverkeygen\nhandler.31.label = x\n"
        )
        config = config_module.from_string(base)
        self.assertEqual(config.handler("x", "serverkeygen").serverkeygen_key_type, "rsa-3072")
        self.assertEqual(config.handler("x", "serverkeygen").csr_template.key_type, "rsa-3072")
        self.assertIsNone(config.handler("", "simpleenroll").csr_template)
        error = self.assertRaises(
            ConfigError, config_module.from_string, base + "handler.31.serverkeygen.keyType = ec-p256\n"
        )
        self.assertEqual(error.key, "handler.31.serverkeygen.keyType")
        self.assertIn("rsa-3072", error.reason)

    def test_only_a_template_is_not_204(self) -> None:
        """A csrattrs handler with only a template answers it (the §3.2 form
        included), not 204."""
        body = csrattrs.encode_response((), csrattrs.parse_template_setting("key: ed25519"))
        items = decode(body)
        self.assertEqual(bare_oids(items), ["1.3.101.112"])
        template = template_of(items)
        self.assertEqual(str(template["subjectPKInfo"]["algorithm"]["algorithm"]), "1.3.101.112")
        self.assertFalse(template["subjectPKInfo"]["algorithm"]["parameters"].isValue)
        self.assertFalse(template["subject"].isValue)
        self.assertEqual(len(template["attributes"]), 0)
        self.assertTrue(os.path.exists(_which("openssl")))
