"""The format checks and the SAN/CN copy rules, as pure functions."""

from __future__ import annotations

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.trial.unittest import SynchronousTestCase

from estgw import policy
from estgw.auth import Identity
from estgw.config import HandlerConfig
from estgw.refusal import Refusal
from estgw.testing import make_csr, name, new_key

ENROLL = HandlerConfig(id="2", operation="simpleenroll", format="est-simpleenroll", token_procedure="p")
DEVICE = Identity(kind="device", device_id="pump-17")


def context(csr, handler=ENROLL, identity=DEVICE, binding=None) -> policy.PolicyContext:
    return policy.build_context(handler.operation, handler, identity, csr, binding)


def csr_with(subject, attributes=(), sans=()):
    return make_csr(new_key(), subject, sans=sans, attributes=attributes)


class CopyRuleTests(SynchronousTestCase):
    """The SAN/CN copy rules, one test per combination."""

    def test_unstructured_name_only(self) -> None:
        """unstructuredName (as a CSR attribute) becomes the dNSName, and the
        missing commonName is then copied from that dNSName."""
        csr = csr_with(x509.Name([]), attributes=[(policy.UNSTRUCTURED_NAME, b"pump-17.example")])
        ctx = context(csr)
        self.assertEqual(ctx.sans, (x509.DNSName("pump-17.example"),))
        self.assertEqual(ctx.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "pump-17.example")

    def test_unstructured_name_in_subject_wins_over_common_name(self) -> None:
        """unstructuredName in the subject DN is preferred to the commonName."""
        subject = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, "pump-17"),
            x509.NameAttribute(policy.UNSTRUCTURED_NAME, "pump-17.plant.example"),
        ])
        ctx = context(csr_with(subject))
        self.assertEqual(ctx.sans, (x509.DNSName("pump-17.plant.example"),))

    def test_common_name_only(self) -> None:
        """A host-name commonName becomes the dNSName; the subject is kept."""
        ctx = context(csr_with(name("pump-17")))
        self.assertEqual(ctx.sans, (x509.DNSName("pump-17"),))
        self.assertEqual(ctx.subject, name("pump-17"))

    def test_common_name_that_is_not_a_host_name(self) -> None:
        """A commonName like "Jane Doe" is no host name: no SAN is invented."""
        ctx = context(csr_with(name("Jane Doe")))
        self.assertEqual(ctx.sans, ())

    def test_unstructured_address_ipv4(self) -> None:
        """unstructuredAddress (IPv4) becomes the iPAddress SAN."""
        csr = csr_with(name("pump-17"), attributes=[(policy.UNSTRUCTURED_ADDRESS, b"192.0.2.17")])
        ctx = context(csr)
        self.assertIn(x509.IPAddress(ipaddress.ip_address("192.0.2.17")), ctx.sans)
        self.assertIn(x509.DNSName("pump-17"), ctx.sans)

    def test_unstructured_address_ipv6(self) -> None:
        """unstructuredAddress (IPv6) becomes the iPAddress SAN."""
        csr = csr_with(name("pump-17"), attributes=[(policy.UNSTRUCTURED_ADDRESS, b"2001:db8::17")])
        self.assertIn(x509.IPAddress(ipaddress.ip_address("2001:db8::17")), context(csr).sans)

    def test_unstructured_address_not_an_address(self) -> None:
        """An unstructuredAddress that is no IP address is refused, 400."""
        csr = csr_with(name("pump-17"), attributes=[(policy.UNSTRUCTURED_ADDRESS, b"building 4")])
        with self.assertRaises(Refusal) as caught:
            context(csr)
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "csr-bad-unstructured-address"))

    def test_sans_present_left_alone(self) -> None:
        """A CSR that already has a dNSName keeps exactly its SANs."""
        sans = [x509.DNSName("a.example"), x509.UniformResourceIdentifier("urn:dev:17")]
        csr = csr_with(name("pump-17"), sans=sans,
                       attributes=[(policy.UNSTRUCTURED_ADDRESS, b"192.0.2.17")])
        ctx = context(csr)
        self.assertEqual(ctx.sans, tuple(sans))

    def test_no_common_name_but_dns_name(self) -> None:
        """No commonName: it is copied from the first dNSName."""
        csr = csr_with(name(None, organization_name="ACME"), sans=[x509.DNSName("gw.example")])
        ctx = context(csr)
        self.assertEqual(ctx.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "gw.example")
        self.assertEqual(ctx.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value, "ACME")

    def test_issue_request_carries_rewritten_names(self) -> None:
        """What the CA signs is the rewritten subject and SANs."""
        ctx = context(csr_with(name("pump-17")))
        request = policy.issue_request(ctx)
        self.assertEqual(request.sans, (x509.DNSName("pump-17"),))
        self.assertEqual(request.subject, name("pump-17"))


def refusal_of(check, ctx) -> Refusal:
    try:
        check(ctx)
    except Refusal as refusal:
        return refusal
    raise AssertionError(f"{check.__name__} did not refuse")


class CheckTests(SynchronousTestCase):
    def test_bad_signature(self) -> None:
        """A CSR whose signature does not verify is refused, 400."""
        der = bytearray(make_csr(new_key(), "pump-17").public_bytes(serialization_der()))
        der[-5] ^= 0x01  # inside the signature
        csr = x509.load_der_x509_csr(bytes(der))
        refusal = refusal_of(policy.csr_signature_valid, context(csr))
        self.assertEqual((refusal.status, refusal.code), (400, "csr-bad-signature"))

    def test_weak_rsa_key(self) -> None:
        """RSA keys under 2048 bits are refused, with the size in the reason."""
        refusal = refusal_of(policy.key_acceptable, context(make_csr(new_key("rsa1024"), "pump-17")))
        self.assertEqual(refusal.code, "csr-weak-key")
        self.assertIn("1024", refusal.reason)

    def test_unknown_curve(self) -> None:
        """Curves outside P-256/384/521 are refused."""
        key = ec.generate_private_key(ec.SECP256K1())
        refusal = refusal_of(policy.key_acceptable, context(make_csr(key, "pump-17")))
        self.assertEqual(refusal.code, "csr-unsupported-curve")

    def test_good_keys(self) -> None:
        """RSA 2048 and P-384 keys pass."""
        policy.key_acceptable(context(make_csr(new_key("rsa2048"), "pump-17")))
        policy.key_acceptable(context(make_csr(ec.generate_private_key(ec.SECP384R1()), "pump-17")))

    def test_no_subject_no_san(self) -> None:
        """A CSR naming nothing is refused."""
        refusal = refusal_of(policy.has_subject, context(csr_with(x509.Name([]))))
        self.assertEqual(refusal.code, "csr-no-subject")

    def test_cmc_ra_requested(self) -> None:
        """A CSR asking for id-kp-cmcRA is refused, 403."""
        csr = make_csr(new_key(), "pump-17", extensions=[(x509.ExtendedKeyUsage([policy.CMC_RA]), False)])
        refusal = refusal_of(policy.no_cmc_ra, context(csr))
        self.assertEqual((refusal.status, refusal.code), (403, "csr-requests-cmcra"))

    def test_challenge_password_denied_by_default(self) -> None:
        """challengePassword is denied unless channel binding is on."""
        csr = csr_with(name("pump-17"), attributes=[(policy.CHALLENGE_PASSWORD, b"secret")])
        refusal = refusal_of(policy.challenge_password, context(csr))
        self.assertEqual(refusal.code, "challenge-password-not-supported")
        self.assertIn("challengePassword attribute not supported", refusal.reason)

    def test_channel_binding(self) -> None:
        """With channelBinding on: missing, wrong and right values."""
        import base64

        import attr

        handler = attr.evolve(ENROLL, channel_binding=True)
        binding = policy.ChannelBinding("tls-unique", b"\x01" * 12)
        missing = context(csr_with(name("pump-17")), handler, binding=binding)
        self.assertEqual(refusal_of(policy.challenge_password, missing).code, "channel-binding-missing")
        wrong = context(
            csr_with(name("pump-17"), attributes=[(policy.CHALLENGE_PASSWORD, b"AAAA")]), handler, binding=binding
        )
        self.assertEqual(refusal_of(policy.challenge_password, wrong).code, "channel-binding-mismatch")
        right = context(
            csr_with(name("pump-17"), attributes=[(policy.CHALLENGE_PASSWORD, base64.b64encode(b"\x01" * 12))]),
            handler, binding=binding,
        )
        policy.challenge_password(right)

    def test_client_auth_eku_required(self) -> None:
        """A client certificate without clientAuth cannot be used to enroll."""
        cert = self_signed("pump-17", [ExtendedKeyUsageOID.SERVER_AUTH])
        ctx = context(csr_with(name("pump-17")), identity=Identity(kind="certificate", certificate=cert))
        refusal = refusal_of(policy.client_certificate_has_client_auth, ctx)
        self.assertEqual(refusal.code, "client-certificate-not-client-auth")
        with_eku = self_signed("pump-17", [ExtendedKeyUsageOID.CLIENT_AUTH])
        policy.client_certificate_has_client_auth(
            context(csr_with(name("pump-17")), identity=Identity(kind="certificate", certificate=with_eku))
        )

    def test_subject_match(self) -> None:
        """Renewal must name the client certificate's subject and SANs;
        a certificate whose SAN was copied from its CN matches a CSR with
        only that CN."""
        cert = self_signed("pump-17", [ExtendedKeyUsageOID.CLIENT_AUTH], sans=[x509.DNSName("pump-17")])
        identity = Identity(kind="certificate", certificate=cert)
        policy.subject_matches_client_certificate(context(csr_with(name("pump-17")), identity=identity))
        other = context(csr_with(name("pump-18")), identity=identity)
        self.assertEqual(refusal_of(policy.subject_matches_client_certificate, other).code, "subject-mismatch")
        extra = context(csr_with(name("pump-17"), sans=[x509.DNSName("x.example")]), identity=identity)
        self.assertEqual(refusal_of(policy.subject_matches_client_certificate, extra).code, "san-mismatch")

    def test_subject_match_host_names_without_case(self) -> None:
        """Host names (and e-mail domains) compare without regard to letter
        case (RFC 4343); another name or another local part is still a mismatch."""
        cert = self_signed("pump-17", [ExtendedKeyUsageOID.CLIENT_AUTH],
                           sans=[x509.DNSName("pump-17.example"), x509.RFC822Name("ops@pump.example")])
        identity = Identity(kind="certificate", certificate=cert)
        upper = [x509.DNSName("PUMP-17.Example"), x509.RFC822Name("ops@PUMP.example")]
        policy.subject_matches_client_certificate(context(csr_with(name("pump-17"), sans=upper), identity=identity))
        for sans in ([x509.DNSName("pump-18.example"), x509.RFC822Name("ops@pump.example")],
                     [x509.DNSName("pump-17.example"), x509.RFC822Name("OPS@pump.example")]):
            ctx = context(csr_with(name("pump-17"), sans=sans), identity=identity)
            self.assertEqual(refusal_of(policy.subject_matches_client_certificate, ctx).code, "san-mismatch")

    def test_subject_match_applies_copy_rules_to_the_certificate(self) -> None:
        """A certificate issued without a SAN (by another CA, say) matches a
        CSR with the same CN: both sides get the copied dNSName."""
        cert = self_signed("pump-17", [ExtendedKeyUsageOID.CLIENT_AUTH])
        identity = Identity(kind="certificate", certificate=cert)
        policy.subject_matches_client_certificate(context(csr_with(name("pump-17")), identity=identity))

    def test_password_login_is_held_to_its_id_not_a_certificate(self) -> None:
        """With the subject-match format a password device is checked by
        device_names; the certificate match does not apply."""
        policy.subject_matches_client_certificate(context(csr_with(name("pump-17"))))

    def test_officer_skips_subject_match(self) -> None:
        """An officer acting for others is not held to its own subject."""
        cert = self_signed("ra-1", [ExtendedKeyUsageOID.CLIENT_AUTH])
        officer = Identity(kind="certificate", certificate=cert, officer_roles=("ra",), acting_as_officer=True)
        policy.subject_matches_client_certificate(context(csr_with(name("pump-99")), identity=officer))

    def test_device_names(self) -> None:
        """A password device gets certificates for its own id only; the
        dNSName of its id may be given in any letter case, once."""
        refusal = refusal_of(policy.device_names, context(csr_with(name("pump-18"))))
        self.assertEqual(refusal.code, "subject-not-registered")
        policy.device_names(context(csr_with(name("pump-17"))))
        policy.device_names(context(csr_with(name("pump-17"), sans=[x509.DNSName("PUMP-17")])))
        twice = context(csr_with(name("pump-17"), sans=[x509.DNSName("pump-17"), x509.DNSName("Pump-17")]))
        self.assertEqual(refusal_of(policy.device_names, twice).code, "san-not-registered")

    def test_every_format_checks_names(self) -> None:
        """Whatever the handler's format, names are checked as names and a
        device is held to its names: the rule cannot be left out by
        configuration."""
        for format_name, checks in policy.FORMATS.items():
            for check in (policy.subject_well_formed, policy.sans_well_formed, policy.device_names):
                self.assertIn(check, checks, format_name)


def serialization_der():
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def self_signed(cn, ekus, sans=()):
    import datetime

    key = new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(key, hashes.SHA256())


class BoundsTests(SynchronousTestCase):
    """What a client may name is at least well formed (RFC 5280 bounds)."""

    def attribute(self, oid, value):
        # Built without cryptography's own checks: a device's CSR is not.
        return x509.NameAttribute(oid, value, _validate=False)

    def refused(self, subject) -> Refusal:
        csr = make_csr(new_key(), x509.Name(subject))
        return refusal_of(policy.subject_well_formed, context(csr))

    def test_common_name_too_long(self) -> None:
        """A 300-character commonName is refused, 400."""
        refusal = self.refused([self.attribute(NameOID.COMMON_NAME, "x" * 300)])
        self.assertEqual((refusal.status, refusal.code), (400, "csr-bad-subject"))
        self.assertIn("longer than 64", refusal.reason)

    def test_country_of_three_letters(self) -> None:
        """countryName is two letters."""
        refusal = self.refused([self.attribute(NameOID.COUNTRY_NAME, "USA"), self.attribute(NameOID.COMMON_NAME, "a")])
        self.assertIn("two letters", refusal.reason)

    def test_empty_value(self) -> None:
        """An empty organizationName is refused."""
        refusal = self.refused([self.attribute(NameOID.ORGANIZATION_NAME, ""), self.attribute(NameOID.COMMON_NAME, "a")])
        self.assertIn("is empty", refusal.reason)

    def test_ordinary_subject_passes(self) -> None:
        """A usual device subject passes."""
        csr = make_csr(new_key(), name("pump-17", country_name="DE", organization_name="ACME"))
        policy.subject_well_formed(context(csr))

    def test_small_rsa_exponent(self) -> None:
        """An RSA key with public exponent 3 is refused."""
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=3, key_size=2048)
        refusal = refusal_of(policy.key_acceptable, context(make_csr(key, "pump-17")))
        self.assertEqual(refusal.code, "csr-weak-key")
        self.assertIn("exponent 3", refusal.reason)
