"""Names over real TLS with curl: what is not a name is refused for every
kind of identity (400 csr-bad-subject / csr-bad-san, the value escaped),
what a password or factory device may be called (its id and its
registered names), and what is issued parses with openssl in the
encoding RFC 5280 asks for."""

from __future__ import annotations

import base64
import ipaddress
import os
import unicodedata
from typing import Any, Awaitable, Callable

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from pyasn1.codec.der import encoder
from pyasn1.type import univ
from twisted.trial.unittest import SynchronousTestCase

from estgw import protocol
from estgw.testing import csr_pem, make_csr, new_key, run_process, write
from tests.test_auth import FACTORY_CA, SecurityTestCase, gateway_certificate, record, run_cli
from tests.test_names import general_names, make_attribute, resigned_csr

UPN = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

# Handlers of SECURITY_CONFIG plus a password handler and a factory
# handler that widen what a device may be called.
WIDENED = """\
handler.40.operation = simpleenroll
handler.40.label = anynames
handler.40.authtype = Basic
handler.40.realm = any names
handler.40.deviceNames = any
handler.41.operation = simpleenroll
handler.41.label = factoryanynames
handler.41.tokenprocedure = Factory Procedure
handler.41.deviceNames = any
"""


def subject(*attributes: tuple[x509.ObjectIdentifier, str] | tuple[x509.ObjectIdentifier, str, _ASN1Type]) -> x509.Name:
    """One RDN per attribute, in order; a third item gives the string type."""
    return x509.Name([make_attribute(*a) for a in attributes])


def csr(name: x509.Name, sans: list[x509.GeneralName] = ()) -> bytes:
    return csr_pem(make_csr(new_key(), name, sans=sans))


def pump(*more: Any) -> x509.Name:
    return subject((NameOID.COMMON_NAME, "pump-17"), *more)


def no_raw_controls(text: str) -> bool:
    return not any(unicodedata.category(c) == "Cc" for c in text.rstrip("\n"))


# -- not names, for every identity ------------------------------------------------------

BAD_NAMES: dict[str, tuple[Callable[[], bytes], str, str]] = {
    # name: (CSR body, code, text the reason must hold)
    "dns_name_with_nul": (
        lambda: csr(pump(), [x509.DNSName("www.bank.example\0.devA")]),
        "csr-bad-san", r"'www.bank.example\x00.devA' is not a host name",
    ),
    "common_name_octet_string": (
        lambda: csr(subject((NameOID.COMMON_NAME, "pump-17", _ASN1Type.OctetString))),
        "csr-bad-subject", "commonName is encoded as OctetString, not as a character string",
    ),
    "common_name_integer": (
        lambda: resigned_csr(new_key(), value_der=encoder.encode(univ.Integer(17))),
        "csr-bad-subject", "commonName is encoded as INTEGER",
    ),
    "ip_address_of_five_octets": (
        lambda: resigned_csr(new_key(), san_der=general_names(b"\x87\x05\x0a\x00\x00\x11\x01")),
        "csr-bad-san", "has 5 octets",
    ),
    "organization_forging_a_log_line": (
        lambda: csr(pump((NameOID.ORGANIZATION_NAME, "x\x1b[2J\nFORGED issued serial 1"))),
        "csr-bad-subject", r"'x\x1b[2J\nFORGED issued serial 1' contains the control character U+001B",
    ),
    "country_of_three_letters": (
        lambda: csr(pump((NameOID.COUNTRY_NAME, "USA"))),
        "csr-bad-subject", "countryName must be two letters",
    ),
    "serial_number_not_printable": (
        lambda: csr(pump((NameOID.SERIAL_NUMBER, "SN_17@x", _ASN1Type.UTF8String))),
        "csr-bad-subject", "a PrintableString cannot hold",
    ),
    "wildcard_in_the_middle": (
        lambda: csr(pump(), [x509.DNSName("pump.*.plant.example")]),
        "csr-bad-san", "only be the whole leftmost label",
    ),
    "relative_uri": (
        lambda: csr(pump(), [x509.UniformResourceIdentifier("/admin")]),
        "csr-bad-san", "never a relative URI",
    ),
}


async def password_device(test: "BadNameTests") -> dict[str, Any]:
    await run_cli(test.gateway, "device", "add", "pump-17", "--password", "s3cret")
    return {"path": "simpleenroll", "user": "pump-17:s3cret"}


async def factory_device(test: "BadNameTests") -> dict[str, Any]:
    idevid = FACTORY_CA.issue(test.directory, "ACME-PUMP-0017")
    await run_cli(test.gateway, "device", "add", "pump-17", "--factory-cert", idevid.cert_path)
    return {"path": "factory/simpleenroll", **idevid.curl}


async def client_certificate(test: "BadNameTests") -> dict[str, Any]:
    own = gateway_certificate(test.gateway, test.directory, "pump-17")
    await record(test.gateway, own)
    return {"path": "simplereenroll", **own.curl}


async def officer(test: "BadNameTests") -> dict[str, Any]:
    ra = gateway_certificate(test.gateway, test.directory, "ra-1")
    await record(test.gateway, ra)
    await run_cli(test.gateway, "officer", "add", "--cert", ra.cert_path, "--role", "ra")
    return {"path": "ra/simpleenroll", **ra.curl}


IDENTITIES: dict[str, Callable[["BadNameTests"], Awaitable[dict[str, Any]]]] = {
    "password_device": password_device,
    "factory_device": factory_device,
    "client_certificate": client_certificate,
    "officer": officer,
}


class BadNameTests(SecurityTestCase):
    """Every kind of identity × every kind of name that is not one: 400,
    the code, the value escaped (no raw control character in the body),
    one audit line, nothing issued."""

    async def check(self, identity: str, bad: str) -> None:
        await self.setUpGateway()
        request = await IDENTITIES[identity](self)
        before = await self.gateway.store.count_certificates()
        body, code, reason = BAD_NAMES[bad]
        self.audit.events.clear()
        path = request.pop("path")
        result = await self.gateway.curl(path, data=body(), **request)
        await self.assertRefused(result, 400, code, reason, before)
        self.assertTrue(no_raw_controls(result.text), repr(result.text))


def _make_bad_name_test(identity: str, bad: str) -> Callable[[BadNameTests], Awaitable[None]]:
    async def test(self: BadNameTests) -> None:
        await self.check(identity, bad)

    test.__name__ = f"test_{identity}_{bad}"
    test.__doc__ = f"{identity}: a CSR with {bad.replace('_', ' ')} is 400 {BAD_NAMES[bad][1]}, nothing issued."
    return test


for _identity in IDENTITIES:
    for _bad in BAD_NAMES:
        setattr(BadNameTests, f"test_{_identity}_{_bad}", _make_bad_name_test(_identity, _bad))


# -- what a device may be called ------------------------------------------------------------


class PasswordDeviceNameTests(SecurityTestCase):
    """Handler 2: a password device gets its id and its registered names."""

    async def setUp(self) -> None:
        await self.setUpGateway(WIDENED)

    async def register(self, *options: str) -> None:
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret", *options)

    async def enroll(self, body: bytes, label: str = "") -> Any:
        return await self.gateway.curl(f"{label}simpleenroll", data=body, user="pump-17:s3cret")

    async def test_unregistered_host_names_refused(self) -> None:
        """DNS:www.bank.example, DNS:localhost and IP:127.0.0.1 beside
        CN=pump-17 were issued: now 403 san-not-registered."""
        await self.register()
        for san in (x509.DNSName("www.bank.example"), x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
            self.audit.events.clear()
            result = await self.enroll(csr(pump(), [x509.DNSName("pump-17"), san]))
            await self.assertRefused(result, 403, "san-not-registered", "is not registered for device 'pump-17'")

    async def test_unregistered_subject_attributes_refused(self) -> None:
        """O=estgw, OU=officers, serialNumber=... beside CN=pump-17: 403."""
        await self.register()
        for attribute in ((NameOID.ORGANIZATION_NAME, "estgw"), (NameOID.ORGANIZATIONAL_UNIT_NAME, "officers"),
                          (NameOID.SERIAL_NUMBER, "4711")):
            self.audit.events.clear()
            result = await self.enroll(csr(pump(attribute)))
            await self.assertRefused(result, 403, "subject-not-registered", "is not registered for device 'pump-17'")

    async def test_registered_names_issued(self) -> None:
        """With --subject-value and --san registered, the device gets
        exactly those names (any subset of them, in the CSR's order)."""
        await self.register("--subject-value", "serialNumber=SN17", "--subject-value", "O=Plant 4",
                            "--san", "DNS:pump-17.plant.example", "--san", "IP:10.0.0.17",
                            "--san", "DNS:pump-17.backup.example")
        sans = [x509.DNSName("pump-17.plant.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.17")),
                x509.DNSName("pump-17.backup.example")]
        result = await self.enroll(csr(pump((NameOID.SERIAL_NUMBER, "SN17"), (NameOID.ORGANIZATION_NAME, "Plant 4")), sans))
        issued = await self.assertIssued(result, "device:pump-17")
        self.assertEqual(issued.subject, "O=Plant 4,2.5.4.5=SN17,CN=pump-17")
        self.assertEqual(issued.sans, ("DNS:pump-17.plant.example", "IP:10.0.0.17", "DNS:pump-17.backup.example"))
        result = await self.enroll(csr(pump(), [x509.DNSName("pump-17"), x509.IPAddress(ipaddress.ip_address("10.0.0.17"))]))
        self.assertEqual(result.status, 200, result.text)

    async def test_registered_value_repeated(self) -> None:
        """A registered serialNumber (or dNSName) twice: 403
        registered-value-repeated."""
        await self.register("--subject-value", "serialNumber=SN17", "--san", "DNS:pump-17.plant.example")
        result = await self.enroll(csr(pump((NameOID.SERIAL_NUMBER, "SN17"), (NameOID.SERIAL_NUMBER, "SN17"))))
        await self.assertRefused(result, 403, "registered-value-repeated", "serialNumber 'SN17' appears more than once")
        self.audit.events.clear()
        # The same subjectAltName twice is malformed for any identity.
        twice = [x509.DNSName("pump-17.plant.example"), x509.DNSName("PUMP-17.plant.example")]
        result = await self.enroll(csr(pump(), twice))
        await self.assertRefused(result, 400, "csr-bad-san", "appears twice")

    async def test_any_value_registration_used_once(self) -> None:
        """An empty registered value admits one value of its kind, once."""
        await self.register("--subject-value", "serialNumber=")
        result = await self.enroll(csr(pump((NameOID.SERIAL_NUMBER, "SN99"), (NameOID.SERIAL_NUMBER, "SN98"))))
        await self.assertRefused(result, 403, "registered-value-repeated", "appears more than once")
        await self.assertIssued(await self.enroll(csr(pump((NameOID.SERIAL_NUMBER, "SN99")))), "device:pump-17")

    async def test_wildcard_only_when_registered(self) -> None:
        """A wildcard dNSName is refused (san-not-allowed) unless this very
        wildcard is registered; then it is issued."""
        await self.register("--san", "DNS:*.pump-17.plant.example")
        result = await self.enroll(csr(pump(), [x509.DNSName("*.plant.example")]))
        await self.assertRefused(result, 403, "san-not-allowed", "only when registered")
        result = await self.enroll(csr(pump(), [x509.DNSName("*.pump-17.plant.example")]))
        issued = await self.assertIssued(result, "device:pump-17")
        self.assertEqual(issued.sans, ("DNS:*.pump-17.plant.example",))

    async def test_device_names_any_widens(self) -> None:
        """deviceNames = any: other well-formed names are issued too; the
        CN stays the id, and wildcards, directoryNames and otherNames are
        still refused."""
        await self.register()
        body = csr(pump((NameOID.ORGANIZATION_NAME, "Example")), [x509.DNSName("pump-17.example"),
                                                               x509.RFC822Name("ops@plant.example")])
        await self.assertIssued(await self.enroll(body, "anynames/"), "device:pump-17")
        refusals = [
            (csr(subject((NameOID.COMMON_NAME, "pump-18"))), "subject-not-registered", "registered device id"),
            (csr(pump(), [x509.DNSName("*.plant.example")]), "san-not-allowed", "wildcard"),
            (csr(pump(), [x509.DirectoryName(pump())]), "san-not-allowed", "DirectoryName"),
            (csr(pump(), [x509.OtherName(UPN, b"\x0c\x10admin@plant.test")]), "san-not-allowed", "OtherName"),
        ]
        for body, code, reason in refusals:
            self.audit.events.clear()
            await self.assertRefused(await self.enroll(body, "anynames/"), 403, code, reason, before=1)


class FactoryDeviceNameTests(SecurityTestCase):
    """Handler 25 (label factory): the same rule for a factory certificate."""

    async def setUp(self) -> None:
        await self.setUpGateway(WIDENED)
        self.idevid = FACTORY_CA.issue(self.directory, "ACME-PUMP-0017")
        await run_cli(self.gateway, "device", "add", "pump-17", "--factory-cert", self.idevid.cert_path,
                      "--subject-value", "serialNumber=SN17")

    async def enroll(self, body: bytes, label: str = "factory") -> Any:
        return await self.gateway.curl(f"{label}/simpleenroll", data=body, **self.idevid.curl)

    async def test_names_never_issued_to_a_device(self) -> None:
        """A wildcard dNSName, a UPN otherName and a directoryName equal to
        the CA's name: 403 san-not-allowed, also with deviceNames = any."""
        chain = protocol.decode_certs_only((await self.gateway.curl("cacerts")).body)
        ca_name = chain[0].subject
        for label in ("factory", "factoryanynames"):
            for san, reason in ((x509.DNSName("*.plant.example"), "wildcard"),
                                (x509.OtherName(UPN, b"\x0c\x10admin@plant.test"), "OtherName"),
                                (x509.DirectoryName(ca_name), "DirectoryName")):
                self.audit.events.clear()
                result = await self.enroll(csr(pump((NameOID.SERIAL_NUMBER, "SN17")), [san]), label)
                await self.assertRefused(result, 403, "san-not-allowed", reason)

    async def test_registered_serial_number_repeated(self) -> None:
        """The registered serialNumber twice: 403 registered-value-repeated."""
        body = csr(pump((NameOID.SERIAL_NUMBER, "SN17"), (NameOID.SERIAL_NUMBER, "SN17")))
        await self.assertRefused(await self.enroll(body), 403, "registered-value-repeated", "appears more than once")

    async def test_unregistered_name_refused(self) -> None:
        """A dNSName that is not registered: 403 san-not-registered; with
        deviceNames = any it is issued."""
        body = csr(pump((NameOID.SERIAL_NUMBER, "SN17")), [x509.DNSName("www.bank.example")])
        await self.assertRefused(await self.enroll(body), 403, "san-not-registered", "DNS:'www.bank.example'")
        await self.assertIssued(await self.enroll(body, "factoryanynames"), "factory:pump-17")


# -- what is issued parses, in RFC 5280's encoding ---------------------------------------------------


class IssuedEncodingTests(SecurityTestCase):
    """The certificate and its PKCS#7 parse with openssl; every name is in
    the encoding RFC 5280 asks for, whatever the CSR used."""

    async def openssl_text(self, body: bytes) -> str:
        p7 = write(os.path.join(self.directory, "issued.p7"), base64.b64decode(body))
        certs = await run_process(["openssl", "pkcs7", "-inform", "DER", "-in", p7, "-print_certs"])
        self.assertEqual(certs.code, 0, certs.stderr)
        text = await run_process(["openssl", "x509", "-noout", "-text", "-nameopt", "RFC2253,show_type"],
                                 stdin=certs.stdout)
        self.assertEqual(text.code, 0, text.stderr)
        return text.stdout.decode("utf-8", "replace")

    async def test_password_device_encodings(self) -> None:
        """C and serialNumber sent as UTF8String come out PrintableString,
        emailAddress and DC as IA5String, a BMPString O as UTF8String, a
        PrintableString CN stays PrintableString."""
        await self.setUpGateway()
        await run_cli(self.gateway, "device", "add", "pump-17", "--password", "s3cret",
                      "--subject-value", "C=DE", "--subject-value", "serialNumber=SN17",
                      "--subject-value", "O=Müller Pumpen", "--subject-value", "emailAddress=ops@plant.example",
                      "--subject-value", "DC=plant", "--san", "URI:coap://pump-17.plant.example/est",
                      "--san", "IP:2001:db8::17", "--san", "email:pump-17@plant.example")
        name = subject(
            (NameOID.DOMAIN_COMPONENT, "plant", _ASN1Type.UTF8String),
            (NameOID.COUNTRY_NAME, "DE", _ASN1Type.UTF8String),
            (NameOID.ORGANIZATION_NAME, "Müller Pumpen", _ASN1Type.BMPString),
            (NameOID.SERIAL_NUMBER, "SN17", _ASN1Type.UTF8String),
            (NameOID.EMAIL_ADDRESS, "ops@plant.example", _ASN1Type.UTF8String),
            (NameOID.COMMON_NAME, "pump-17", _ASN1Type.PrintableString),
        )
        sans = [x509.UniformResourceIdentifier("coap://pump-17.plant.example/est"),
                x509.IPAddress(ipaddress.ip_address("2001:db8::17")), x509.RFC822Name("pump-17@plant.example")]
        result = await self.gateway.curl("simpleenroll", data=csr(name, sans), user="pump-17:s3cret")
        self.assertEqual(result.status, 200, result.text)
        [cert] = protocol.decode_certs_only(result.body)
        types = {a.oid: a._type for a in cert.subject}
        self.assertEqual(types, {
            NameOID.DOMAIN_COMPONENT: _ASN1Type.IA5String,
            NameOID.COUNTRY_NAME: _ASN1Type.PrintableString,
            NameOID.ORGANIZATION_NAME: _ASN1Type.UTF8String,
            NameOID.SERIAL_NUMBER: _ASN1Type.PrintableString,
            NameOID.EMAIL_ADDRESS: _ASN1Type.IA5String,
            NameOID.COMMON_NAME: _ASN1Type.PrintableString,
        })
        text = await self.openssl_text(result.body)
        for shown in ("DC=IA5STRING:plant", "C=PRINTABLESTRING:DE", "serialNumber=PRINTABLESTRING:SN17",
                      "CN=PRINTABLESTRING:pump-17", "URI:coap://pump-17.plant.example/est",
                      "IP Address:2001:DB8:0:0:0:0:0:17", "email:pump-17@plant.example"):
            self.assertIn(shown, text)

    async def test_officer_bmp_common_name(self) -> None:
        """An RA enrolls a subject whose CN is a BMPString with non-ASCII
        letters: issued as UTF8String, and openssl reads it."""
        await self.setUpGateway()
        ra = gateway_certificate(self.gateway, self.directory, "ra-1")
        await run_cli(self.gateway, "officer", "add", "--cert", ra.cert_path, "--role", "ra")
        name = subject((NameOID.COMMON_NAME, "Zähler 17", _ASN1Type.BMPString))
        result = await self.gateway.curl("ra/simpleenroll", data=csr(name, [x509.DNSName("zaehler-17.example")]), **ra.curl)
        self.assertEqual(result.status, 200, result.text)
        [cert] = protocol.decode_certs_only(result.body)
        [cn] = cert.subject
        self.assertEqual((cn.value, cn._type), ("Zähler 17", _ASN1Type.UTF8String))
        self.assertIn("CN=UTF8STRING:Z", await self.openssl_text(result.body))


class DeviceNamesConfigTests(SynchronousTestCase):
    def test_setting(self) -> None:
        """deviceNames is registered (default) or any, on enrollment
        handlers only; anything else stops the gateway with the key."""
        from estgw.config import ConfigError, from_string
        from estgw.testing import TEST_CONFIG

        handlers = {h.id: h for h in from_string(TEST_CONFIG + "handler.6.deviceNames = any\n").handlers}
        self.assertEqual((handlers["2"].device_names, handlers["6"].device_names), ("registered", "any"))
        for extra, key in (("handler.2.deviceNames = all\n", "handler.2.deviceNames"),
                           ("handler.1.deviceNames = any\n", "handler.1.deviceNames")):
            with self.assertRaises(ConfigError) as caught:
                from_string(TEST_CONFIG + extra)
            self.assertIn(key, str(caught.exception))

    def test_server_hostnames_are_names(self) -> None:
        """server.hostnames, which go into the gateway's own TLS
        certificate, are host names or IP addresses: a space or a NUL in
        one stops the gateway with the key."""
        from estgw.config import ConfigError, from_string
        from estgw.testing import TEST_CONFIG

        good = TEST_CONFIG.replace("server.hostnames = localhost, 127.0.0.1", "server.hostnames = est.example, ::1")
        self.assertEqual(from_string(good).hostnames, ("est.example", "::1"))
        for bad in ("est example", "est.example\\u0000x", "-est.example"):
            text = TEST_CONFIG.replace("server.hostnames = localhost, 127.0.0.1", f"server.hostnames = {bad}")
            with self.assertRaises(ConfigError) as caught:
                from_string(text)
            self.assertIn("server.hostnames", str(caught.exception))
