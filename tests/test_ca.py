"""Tests for estgw.ca: the embedded local CA and its token procedure."""

from __future__ import annotations

import ipaddress
import os
import shutil
import stat
import subprocess
import threading
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from estgw.ca import (
    CA_FILES,
    CRL_FILE,
    ISSUING_CERT,
    ISSUING_KEY,
    ROOT_CERT,
    ROOT_KEY,
    SERVER_CERT,
    SERVER_KEY,
    CAError,
    IssueRequest,
    ITokenProcedure,
    LocalCA,
    LocalTokenProcedure,
    Profile,
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ec_request(cn: str = "device-1", sans: tuple[x509.GeneralName, ...] = ()) -> IssueRequest:
    key = ec.generate_private_key(ec.SECP256R1())
    return IssueRequest(_name(cn), key.public_key(), sans)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _ext(cert: x509.Certificate, cls: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(cls)


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        raise SkipTest("openssl is not installed")
    return path


class _CAMixin:
    """A fresh CA in a temporary directory for each test."""

    def setUp(self) -> None:
        self.base = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.base)
        self.cadir = os.path.join(self.base, "ca")
        self.ca = LocalCA.load_or_create(self.cadir)

    def openssl_verify(self, leaf: x509.Certificate, *args: str) -> subprocess.CompletedProcess:
        """Run openssl verify on ``leaf`` against this CA's chain."""
        openssl = _openssl()
        paths = {}
        for label, cert in (("root", self.ca.root), ("issuing", self.ca.issuing), ("leaf", leaf)):
            paths[label] = os.path.join(self.base, label + ".pem")
            with open(paths[label], "wb") as f:
                f.write(_pem(cert))
        return subprocess.run(
            [openssl, "verify", "-CAfile", paths["root"], "-untrusted", paths["issuing"], *args,
             paths["leaf"]],
            capture_output=True, text=True, timeout=60,
        )


class LoadOrCreateTests(_CAMixin, SynchronousTestCase):
    """LocalCA.load_or_create: files, permissions, reloading, broken directories."""

    def test_reload_identical(self) -> None:
        """A second load_or_create on the same directory returns the same root and issuing certificates."""
        again = LocalCA.load_or_create(self.cadir)
        self.assertEqual(again.root, self.ca.root)
        self.assertEqual(again.issuing, self.ca.issuing)
        self.assertEqual(again.chain(), self.ca.chain())

    def test_reloaded_ca_signs(self) -> None:
        """A reloaded CA signs with the issuing key that the stored issuing certificate names."""
        again = LocalCA.load_or_create(self.cadir)
        leaf = again.sign(_ec_request(), Profile())
        leaf.verify_directly_issued_by(self.ca.issuing)

    def test_files_and_permissions(self) -> None:
        """The directory is 0700, keys are 0600 unencrypted PKCS#8 PEM, certificates PEM."""
        self.assertEqual(stat.S_IMODE(os.stat(self.cadir).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(self.cadir)), sorted(CA_FILES))
        for key_file in (ROOT_KEY, ISSUING_KEY):
            path = os.path.join(self.cadir, key_file)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600, key_file)
            with open(path, "rb") as f:
                data = f.read()
            self.assertTrue(data.startswith(b"-----BEGIN PRIVATE KEY-----"), key_file)
            serialization.load_pem_private_key(data, password=None)
        for cert_file in (ROOT_CERT, ISSUING_CERT):
            with open(os.path.join(self.cadir, cert_file), "rb") as f:
                x509.load_pem_x509_certificate(f.read())

    def test_directory_mode_despite_umask(self) -> None:
        """A permissive umask does not loosen the 0700 CA directory or the 0600 keys."""
        old = os.umask(0)
        try:
            LocalCA.load_or_create(os.path.join(self.base, "other"))
        finally:
            os.umask(old)
        other = os.path.join(self.base, "other")
        self.assertEqual(stat.S_IMODE(os.stat(other).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(other, ROOT_KEY)).st_mode), 0o600)

    def test_half_present_names_file(self) -> None:
        """Removing any one of the four files makes load_or_create raise CAError naming it."""
        for missing in CA_FILES:
            directory = os.path.join(self.base, "half-" + missing)
            shutil.copytree(self.cadir, directory)
            os.unlink(os.path.join(directory, missing))
            e = self.assertRaises(CAError, LocalCA.load_or_create, directory)
            self.assertIn(missing, str(e))
            self.assertEqual(len(os.listdir(directory)), 3, "nothing must be recreated")

    def test_mismatched_key(self) -> None:
        """An issuing key that does not belong to the issuing certificate is a CAError naming the key file."""
        shutil.copy(os.path.join(self.cadir, ROOT_KEY), os.path.join(self.cadir, ISSUING_KEY))
        e = self.assertRaises(CAError, LocalCA.load_or_create, self.cadir)
        self.assertIn(ISSUING_KEY, str(e))

    def test_issuing_not_from_root(self) -> None:
        """An issuing CA pair from another CA directory is refused: the chain would not verify."""
        other = LocalCA.load_or_create(os.path.join(self.base, "other"))
        for f in (ISSUING_CERT, ISSUING_KEY):
            shutil.copy(os.path.join(other.directory, f), os.path.join(self.cadir, f))
        e = self.assertRaises(CAError, LocalCA.load_or_create, self.cadir)
        self.assertIn("not issued by", str(e))

    def test_garbage_file(self) -> None:
        """A file that does not parse is a CAError naming it."""
        with open(os.path.join(self.cadir, ROOT_CERT), "wb") as f:
            f.write(b"not a certificate")
        e = self.assertRaises(CAError, LocalCA.load_or_create, self.cadir)
        self.assertIn(ROOT_CERT, str(e))

    def test_path_is_a_file(self) -> None:
        """A CA path that is a regular file is a CAError, not a traceback from os."""
        path = os.path.join(self.base, "file")
        open(path, "w").close()
        self.assertRaises(CAError, LocalCA.load_or_create, path)

    def test_name_too_long(self) -> None:
        """A CA name that makes a common name over 64 characters is a CAError and writes nothing."""
        directory = os.path.join(self.base, "long")
        self.assertRaises(CAError, LocalCA.load_or_create, directory, "x" * 60)
        self.assertEqual(os.listdir(directory), [])


class CACertificateTests(_CAMixin, SynchronousTestCase):
    """The root and issuing certificates carry what RFC 5280 verifiers require."""

    def test_subjects(self) -> None:
        """Subjects are CN=<name> Root CA / CN=<name> Issuing CA with O=estgw; the root is self-issued."""
        ca = LocalCA.load_or_create(os.path.join(self.base, "acme"), name="acme")
        cn = lambda c: c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value  # noqa: E731
        org = lambda c: c.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value  # noqa: E731
        self.assertEqual(cn(ca.root), "acme Root CA")
        self.assertEqual(cn(ca.issuing), "acme Issuing CA")
        self.assertEqual(org(ca.root), "estgw")
        self.assertEqual(org(ca.issuing), "estgw")
        self.assertEqual(ca.root.issuer, ca.root.subject)
        self.assertEqual(ca.issuing.issuer, ca.root.subject)

    def test_keys_are_p256(self) -> None:
        """Both CA keys are EC P-256."""
        for cert in self.ca.chain():
            key = cert.public_key()
            self.assertIsInstance(key, ec.EllipticCurvePublicKey)
            self.assertEqual(key.curve.name, "secp256r1")

    def test_basic_constraints_and_key_usage(self) -> None:
        """Root: CA without path length; issuing: CA with path length 0; both keyCertSign+cRLSign, critical."""
        root_bc = _ext(self.ca.root, x509.BasicConstraints)
        issuing_bc = _ext(self.ca.issuing, x509.BasicConstraints)
        self.assertTrue(root_bc.critical and issuing_bc.critical)
        self.assertTrue(root_bc.value.ca)
        self.assertIsNone(root_bc.value.path_length)
        self.assertTrue(issuing_bc.value.ca)
        self.assertEqual(issuing_bc.value.path_length, 0)
        for cert in self.ca.chain():
            ku = _ext(cert, x509.KeyUsage)
            self.assertTrue(ku.critical)
            self.assertTrue(ku.value.key_cert_sign and ku.value.crl_sign)
            self.assertFalse(ku.value.digital_signature)

    def test_key_identifiers(self) -> None:
        """Both carry SKI and AKI; the issuing AKI is the root SKI, the root's AKI its own SKI."""
        root_ski = _ext(self.ca.root, x509.SubjectKeyIdentifier).value.digest
        issuing_ski = _ext(self.ca.issuing, x509.SubjectKeyIdentifier).value.digest
        self.assertEqual(_ext(self.ca.root, x509.AuthorityKeyIdentifier).value.key_identifier, root_ski)
        self.assertEqual(_ext(self.ca.issuing, x509.AuthorityKeyIdentifier).value.key_identifier, root_ski)
        self.assertNotEqual(root_ski, issuing_ski)

    def test_validity(self) -> None:
        """The root is valid about 20 years and the issuing CA about 10, both starting just before now."""
        now = datetime.now(timezone.utc)
        for cert, years in ((self.ca.root, 20), (self.ca.issuing, 10)):
            self.assertLessEqual(cert.not_valid_before_utc, now)
            self.assertGreater(cert.not_valid_before_utc, now - timedelta(minutes=10))
            span = cert.not_valid_after_utc - cert.not_valid_before_utc
            self.assertLess(abs(span.days / 365.25 - years), 0.01)

    def test_chain_order(self) -> None:
        """chain() is [issuing, root]."""
        self.assertEqual(self.ca.chain(), [self.ca.issuing, self.ca.root])

    def test_issuing_signed_by_root(self) -> None:
        """The issuing certificate's signature verifies with the root key, and the root's with its own."""
        self.ca.issuing.verify_directly_issued_by(self.ca.root)
        self.ca.root.verify_directly_issued_by(self.ca.root)


class SignTests(_CAMixin, SynchronousTestCase):
    """LocalCA.sign: the end-entity certificates."""

    def test_leaf_verifies_with_cryptography(self) -> None:
        """A default-profile leaf verifies as a TLS client against root with the issuing CA as intermediate.

        cryptography's verifier insists on a SAN; the policy module (the SAN/CN copy rules) always supplies one.
        """
        leaf = self.ca.sign(_ec_request(sans=(x509.DNSName("device-1"),)), Profile())
        verifier = PolicyBuilder().store(Store([self.ca.root])).build_client_verifier()
        verified = verifier.verify(leaf, [self.ca.issuing])
        self.assertEqual(verified.chain, [leaf, self.ca.issuing, self.ca.root])

    def test_leaf_verifies_with_openssl(self) -> None:
        """openssl verify accepts the leaf for sslclient, and only through the issuing CA."""
        leaf = self.ca.sign(_ec_request(), Profile())
        result = self.openssl_verify(leaf, "-purpose", "sslclient")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn(": OK", result.stdout)

    def test_openssl_rejects_leaf_of_other_ca(self) -> None:
        """openssl verify fails for a leaf of another CA: the positive test above means something."""
        other = LocalCA.load_or_create(os.path.join(self.base, "other"))
        result = self.openssl_verify(other.sign(_ec_request(), Profile()))
        self.assertNotEqual(result.returncode, 0)

    def test_basic_fields(self) -> None:
        """Subject, issuer, public key, SHA-256, cA=FALSE critical, SKI of the key and AKI of the issuing CA."""
        request = _ec_request("device-7")
        leaf = self.ca.sign(request, Profile())
        self.assertEqual(leaf.subject, request.subject)
        self.assertEqual(leaf.issuer, self.ca.issuing.subject)
        self.assertEqual(leaf.public_key(), request.public_key)
        self.assertEqual(leaf.signature_hash_algorithm.name, "sha256")
        bc = _ext(leaf, x509.BasicConstraints)
        self.assertTrue(bc.critical)
        self.assertFalse(bc.value.ca)
        self.assertEqual(_ext(leaf, x509.SubjectKeyIdentifier).value,
                         x509.SubjectKeyIdentifier.from_public_key(request.public_key))
        self.assertEqual(_ext(leaf, x509.AuthorityKeyIdentifier).value.key_identifier,
                         _ext(self.ca.issuing, x509.SubjectKeyIdentifier).value.digest)

    def test_default_profile(self) -> None:
        """The default profile gives 365 days, digitalSignature+keyEncipherment critical
        (keyEncipherment for RSA keys only), EKU clientAuth."""
        now = datetime(2030, 1, 1, tzinfo=timezone.utc)
        leaf = self.ca.sign(_ec_request(), Profile(), now=now)
        self.assertEqual(leaf.not_valid_after_utc, now + timedelta(days=365))
        ku = _ext(leaf, x509.KeyUsage)
        self.assertTrue(ku.critical)
        self.assertTrue(ku.value.digital_signature)
        self.assertFalse(ku.value.content_commitment or ku.value.key_cert_sign)
        self.assertEqual(list(_ext(leaf, x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.CLIENT_AUTH])
        # An EC key cannot encipher (RFC 8813 §3): the profile's keyEncipherment
        # is left out for it, and kept for an RSA key.
        self.assertFalse(ku.value.key_encipherment or ku.value.data_encipherment)
        rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rsa_leaf = self.ca.sign(IssueRequest(_name("device-2"), rsa_key.public_key()), Profile(), now=now)
        self.assertTrue(_ext(rsa_leaf, x509.KeyUsage).value.key_encipherment)

    def test_profile_in_certificate(self) -> None:
        """A profile from settings shows in the certificate: validity, each key usage bit, each EKU."""
        profile = Profile.from_settings(
            30, "digitalSignature,nonRepudiation,keyAgreement,encipherOnly",
            "clientAuth, emailProtection, 1.3.6.1.4.1.99999.1")
        now = datetime(2030, 6, 1, tzinfo=timezone.utc)
        leaf = self.ca.sign(_ec_request(), profile, now=now)
        self.assertEqual(leaf.not_valid_after_utc, now + timedelta(days=30))
        ku = _ext(leaf, x509.KeyUsage).value
        self.assertEqual(
            (ku.digital_signature, ku.content_commitment, ku.key_encipherment, ku.data_encipherment,
             ku.key_agreement, ku.key_cert_sign, ku.crl_sign, ku.encipher_only, ku.decipher_only),
            (True, True, False, False, True, False, False, True, False))
        self.assertEqual(
            list(_ext(leaf, x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION,
             x509.ObjectIdentifier("1.3.6.1.4.1.99999.1")])

    def test_empty_profile_omits_extensions(self) -> None:
        """An empty key usage or EKU list leaves the extension out rather than writing an empty one."""
        leaf = self.ca.sign(_ec_request(), Profile(key_usage=frozenset(), extended_key_usage=()))
        self.assertRaises(x509.ExtensionNotFound, _ext, leaf, x509.KeyUsage)
        self.assertRaises(x509.ExtensionNotFound, _ext, leaf, x509.ExtendedKeyUsage)

    def test_not_before_backdated(self) -> None:
        """notBefore is five minutes before now, for devices whose clocks run behind."""
        now = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
        leaf = self.ca.sign(_ec_request(), Profile(), now=now)
        self.assertEqual(leaf.not_valid_before_utc, now - timedelta(minutes=5))

    def test_naive_now_is_utc(self) -> None:
        """A naive ``now`` is taken as UTC, as cryptography does."""
        leaf = self.ca.sign(_ec_request(), Profile(), now=datetime(2030, 1, 1, 12, 0))
        self.assertEqual(leaf.not_valid_before_utc, datetime(2030, 1, 1, 11, 55, tzinfo=timezone.utc))

    def test_validity_clipped_to_issuing_ca(self) -> None:
        """A leaf never outlives the issuing CA: notAfter is clipped to it."""
        end = self.ca.issuing.not_valid_after_utc
        leaf = self.ca.sign(_ec_request(), Profile(), now=end - timedelta(days=10))
        self.assertEqual(leaf.not_valid_after_utc, end)

    def test_expired_issuing_ca(self) -> None:
        """After the issuing CA's end nothing is signed: CAError says it expired."""
        end = self.ca.issuing.not_valid_after_utc
        e = self.assertRaises(CAError, self.ca.sign, _ec_request(), Profile(), end + timedelta(seconds=1))
        self.assertIn("expired", str(e))

    def test_serials_random_distinct_small(self) -> None:
        """50 serials are distinct, positive, at most 20 octets, and spread over the whole 159-bit range."""
        request = _ec_request()
        serials = [self.ca.sign(request, Profile()).serial_number for _ in range(50)]
        self.assertEqual(len(set(serials)), 50)
        for serial in serials:
            self.assertGreater(serial, 0)
            # DER INTEGER content octets: a leading 0 byte is added when the top bit is set.
            self.assertLessEqual(serial.bit_length() // 8 + 1, 20)
        # Not a counter: at least one in 50 random 159-bit numbers exceeds 2**150 (p ~ 1 - 2**-450).
        self.assertTrue(any(s.bit_length() > 150 for s in serials))
        self.assertNotIn(self.ca.issuing.serial_number, serials)

    def test_san_non_critical_with_subject(self) -> None:
        """SANs are copied from the request and non-critical when there is a subject."""
        sans = (x509.DNSName("dev.example"), x509.IPAddress(ipaddress.ip_address("10.0.0.1")))
        leaf = self.ca.sign(_ec_request(sans=sans), Profile())
        san = _ext(leaf, x509.SubjectAlternativeName)
        self.assertFalse(san.critical)
        self.assertEqual(list(san.value), list(sans))

    def test_san_critical_without_subject(self) -> None:
        """With an empty subject the SAN is critical (RFC 5280 4.2.1.6)."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.ca.sign(IssueRequest(x509.Name([]), key.public_key(), (x509.DNSName("d.example"),)),
                            Profile())
        self.assertTrue(_ext(leaf, x509.SubjectAlternativeName).critical)

    def test_no_san_no_extension(self) -> None:
        """A request without SANs gives a certificate without a SAN extension."""
        leaf = self.ca.sign(_ec_request(), Profile())
        self.assertRaises(x509.ExtensionNotFound, _ext, leaf, x509.SubjectAlternativeName)

    def test_no_subject_no_san_refused(self) -> None:
        """No subject and no SAN would be an invalid certificate: ValueError, nothing signed."""
        key = ec.generate_private_key(ec.SECP256R1())
        self.assertRaises(ValueError, self.ca.sign, IssueRequest(x509.Name([]), key.public_key()), Profile())

    def test_rsa_and_ec_and_ed25519_keys(self) -> None:
        """RSA-2048, EC P-384 and Ed25519 request keys are certified and the leaves verify."""
        keys = [rsa.generate_private_key(65537, 2048).public_key(),
                ec.generate_private_key(ec.SECP384R1()).public_key(),
                ed25519.Ed25519PrivateKey.generate().public_key()]
        for key in keys:
            leaf = self.ca.sign(IssueRequest(_name("k"), key), Profile())
            self.assertEqual(leaf.public_key(), key)
            leaf.verify_directly_issued_by(self.ca.issuing)
            result = self.openssl_verify(leaf, "-purpose", "sslclient")
            self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_rsa_leaf_verifies_with_cryptography(self) -> None:
        """An RSA-2048 client leaf verifies with cryptography's client verifier."""
        key = rsa.generate_private_key(65537, 2048).public_key()
        leaf = self.ca.sign(IssueRequest(_name("rsa-device"), key, (x509.DNSName("rsa-device"),)), Profile())
        verifier = PolicyBuilder().store(Store([self.ca.root])).build_client_verifier()
        verifier.verify(leaf, [self.ca.issuing])


class ServerCredentialsTests(_CAMixin, SynchronousTestCase):
    """LocalCA.server_credentials: the gateway's own TLS certificate."""

    hosts = ["localhost", "127.0.0.1", "::1"]

    def setUp(self) -> None:
        super().setUp()
        self.tlsdir = os.path.join(self.base, "tls")

    def test_names(self) -> None:
        """DNS names become dNSName SANs, addresses iPAddress SANs; CN is the first name; EKU serverAuth."""
        key, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        self.assertEqual(cert.public_key(), key.public_key())
        san = _ext(cert, x509.SubjectAlternativeName).value
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(san.get_values_for_type(x509.IPAddress),
                         [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")])
        self.assertEqual(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "localhost")
        self.assertEqual(list(_ext(cert, x509.ExtendedKeyUsage).value), [ExtendedKeyUsageOID.SERVER_AUTH])
        self.assertTrue(_ext(cert, x509.KeyUsage).value.digital_signature)

    def test_verifies_as_server(self) -> None:
        """cryptography's server verifier accepts the certificate for localhost, 127.0.0.1 and ::1."""
        _, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        builder = PolicyBuilder().store(Store([self.ca.root]))
        subjects = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1"))]
        for subject in subjects:
            chain = builder.build_server_verifier(subject).verify(cert, [self.ca.issuing])
            self.assertEqual(chain[-1], self.ca.root)

    def test_rejected_for_other_name(self) -> None:
        """The server verifier refuses a name the certificate does not carry."""
        _, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        verifier = PolicyBuilder().store(Store([self.ca.root])).build_server_verifier(
            x509.DNSName("example.com"))
        self.assertRaises(Exception, verifier.verify, cert, [self.ca.issuing])

    def test_openssl_sslserver(self) -> None:
        """openssl verify accepts it for sslserver with hostname and IP checks."""
        _, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        result = self.openssl_verify(cert, "-purpose", "sslserver", "-verify_hostname", "localhost",
                                     "-verify_ip", "127.0.0.1")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_files(self) -> None:
        """server.key (0600, PKCS#8) and server.pem are written in a 0700 directory and match what is returned."""
        key, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        self.assertEqual(stat.S_IMODE(os.stat(self.tlsdir).st_mode), 0o700)
        key_path = os.path.join(self.tlsdir, SERVER_KEY)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        with open(key_path, "rb") as f:
            stored = serialization.load_pem_private_key(f.read(), password=None)
        self.assertEqual(stored.public_key(), key.public_key())
        with open(os.path.join(self.tlsdir, SERVER_CERT), "rb") as f:
            self.assertEqual(x509.load_pem_x509_certificate(f.read()), cert)

    def test_reused(self) -> None:
        """A second call with the same names, or a subset, returns the stored certificate unchanged."""
        _, first = self.ca.server_credentials(self.tlsdir, self.hosts)
        _, again = self.ca.server_credentials(self.tlsdir, self.hosts)
        _, subset = self.ca.server_credentials(self.tlsdir, ["LOCALHOST"])
        self.assertEqual(again, first)
        self.assertEqual(subset, first)

    def test_reissued_when_name_added(self) -> None:
        """Adding a hostname reissues the certificate (new serial, new name) with the same key."""
        key1, first = self.ca.server_credentials(self.tlsdir, self.hosts)
        key2, second = self.ca.server_credentials(self.tlsdir, self.hosts + ["est.example"])
        self.assertNotEqual(second.serial_number, first.serial_number)
        self.assertEqual(key2.public_key(), key1.public_key())
        self.assertIn("est.example", _ext(second, x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName))
        _, third = self.ca.server_credentials(self.tlsdir, self.hosts + ["est.example"])
        self.assertEqual(third, second)

    def test_reissued_near_expiry(self) -> None:
        """A certificate within 30 days of its end is replaced."""
        now = datetime.now(timezone.utc)
        _, first = self.ca.server_credentials(self.tlsdir, self.hosts, now=now)
        _, later = self.ca.server_credentials(self.tlsdir, self.hosts, now=now + timedelta(days=340))
        self.assertNotEqual(later.serial_number, first.serial_number)

    def test_reissued_for_new_ca(self) -> None:
        """A certificate from another CA (the CA directory was recreated) is replaced by one from this CA."""
        other = LocalCA.load_or_create(os.path.join(self.base, "other"))
        _, foreign = other.server_credentials(self.tlsdir, self.hosts)
        _, cert = self.ca.server_credentials(self.tlsdir, self.hosts)
        self.assertNotEqual(cert, foreign)
        cert.verify_directly_issued_by(self.ca.issuing)

    def test_operator_rsa_key_kept(self) -> None:
        """An RSA key the operator put in server.key is used, with keyEncipherment added for it."""
        os.makedirs(self.tlsdir)
        key = rsa.generate_private_key(65537, 2048)
        with open(os.path.join(self.tlsdir, SERVER_KEY), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        got, cert = self.ca.server_credentials(self.tlsdir, ["localhost"])
        self.assertEqual(cert.public_key(), key.public_key())
        self.assertTrue(_ext(cert, x509.KeyUsage).value.key_encipherment)

    def test_long_hostname(self) -> None:
        """A first hostname too long for a CN leaves the subject empty and makes the SAN critical."""
        host = "a" * 60 + ".example"
        _, cert = self.ca.server_credentials(self.tlsdir, [host])
        self.assertEqual(len(cert.subject), 0)
        self.assertTrue(_ext(cert, x509.SubjectAlternativeName).critical)

    def test_no_hostnames(self) -> None:
        """An empty hostname list is a ValueError."""
        self.assertRaises(ValueError, self.ca.server_credentials, self.tlsdir, [])


class CRLTests(_CAMixin, SynchronousTestCase):
    """LocalCA.write_crl."""

    def test_crl(self) -> None:
        """The CRL is signed by the issuing CA, lists the serials with their dates and is written to crl.pem."""
        now = datetime(2030, 1, 1, tzinfo=timezone.utc)
        revoked = [(1234, now - timedelta(days=1)), (5678, now - timedelta(hours=1))]
        crl = self.ca.write_crl(revoked, timedelta(days=2), now=now)
        self.assertTrue(crl.is_signature_valid(self.ca.issuing.public_key()))
        self.assertEqual(crl.issuer, self.ca.issuing.subject)
        self.assertEqual(crl.last_update_utc, now)
        self.assertEqual(crl.next_update_utc, now + timedelta(days=2))
        self.assertEqual(crl.get_revoked_certificate_by_serial_number(1234).revocation_date_utc,
                         now - timedelta(days=1))
        self.assertIsNotNone(crl.get_revoked_certificate_by_serial_number(5678))
        self.assertIsNone(crl.get_revoked_certificate_by_serial_number(9))
        with open(os.path.join(self.cadir, CRL_FILE), "rb") as f:
            self.assertEqual(x509.load_pem_x509_crl(f.read()), crl)

    def test_crl_number_increases(self) -> None:
        """Each CRL's number is larger than the last, even when written in the same second."""
        now = datetime(2030, 1, 1, tzinfo=timezone.utc)
        numbers = [
            self.ca.write_crl([], now=now).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            for _ in range(3)
        ]
        self.assertEqual(numbers, sorted(set(numbers)))

    def test_crl_openssl(self) -> None:
        """openssl crl -verify accepts the CRL with the issuing CA certificate."""
        openssl = _openssl()
        crl = self.ca.write_crl([(42, datetime.now(timezone.utc))])
        issuing = os.path.join(self.base, "issuing.pem")
        with open(issuing, "wb") as f:
            f.write(_pem(self.ca.issuing))
        result = subprocess.run([openssl, "crl", "-noout", "-in", os.path.join(self.cadir, CRL_FILE),
                                 "-CAfile", issuing], capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("verify OK", result.stdout + result.stderr)
        self.assertEqual(len(crl), 1)


class ProfileTests(SynchronousTestCase):
    """Profile and Profile.from_settings."""

    def test_from_settings(self) -> None:
        """Names map to KeyUsage fields and EKU OIDs, with spaces and letter case forgiven."""
        profile = Profile.from_settings(
            90, " digitalSignature , KeyEncipherment,cRLSign,", "serverAuth,clientauth,OCSPSigning,1.2.3.4")
        self.assertEqual(profile.validity, timedelta(days=90))
        self.assertEqual(profile.key_usage, frozenset({"digital_signature", "key_encipherment", "crl_sign"}))
        self.assertEqual(profile.extended_key_usage,
                         (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH,
                          ExtendedKeyUsageOID.OCSP_SIGNING, x509.ObjectIdentifier("1.2.3.4")))

    def test_all_names(self) -> None:
        """Every documented key usage and EKU name is accepted."""
        profile = Profile.from_settings(
            1, "digitalSignature,nonRepudiation,keyEncipherment,dataEncipherment,keyAgreement,"
               "cRLSign,encipherOnly,decipherOnly",
            "clientAuth,serverAuth,codeSigning,emailProtection,timeStamping,OCSPSigning")
        self.assertEqual(len(profile.key_usage), 8)
        self.assertEqual(len(profile.extended_key_usage), 6)

    def test_empty_strings(self) -> None:
        """Empty settings give no key usage and no EKU."""
        profile = Profile.from_settings(1, "", " ")
        self.assertEqual(profile.key_usage, frozenset())
        self.assertEqual(profile.extended_key_usage, ())

    def test_unknown_key_usage(self) -> None:
        """An unknown key usage name is a ValueError naming it."""
        e = self.assertRaises(ValueError, Profile.from_settings, 1, "digitalSignature,digitalSignatur", "")
        self.assertIn("'digitalSignatur'", str(e))

    def test_unknown_eku(self) -> None:
        """An unknown EKU name (or a malformed OID) is a ValueError naming it."""
        for bad in ("clientAuthentication", "1.2.x", "3.1", "1"):
            e = self.assertRaises(ValueError, Profile.from_settings, 1, "", "clientAuth," + bad)
            self.assertIn(repr(bad), str(e))

    def test_validity_days(self) -> None:
        """validity_days below 1 is a ValueError."""
        for days in (0, -5):
            e = self.assertRaises(ValueError, Profile.from_settings, days, "", "")
            self.assertIn(str(days), str(e))

    def test_key_cert_sign_refused(self) -> None:
        """keyCertSign cannot go into an end-entity certificate (cA=FALSE): ValueError."""
        e = self.assertRaises(ValueError, Profile.from_settings, 1, "keyCertSign", "")
        self.assertIn("keyCertSign", str(e))

    def test_encipher_only_needs_key_agreement(self) -> None:
        """encipherOnly or decipherOnly without keyAgreement is a ValueError (RFC 5280 4.2.1.3)."""
        for name in ("encipherOnly", "decipherOnly"):
            e = self.assertRaises(ValueError, Profile.from_settings, 1, "digitalSignature," + name, "")
            self.assertIn(name, str(e))

    def test_direct_construction_checked(self) -> None:
        """Profile itself checks its fields: unknown KeyUsage field, non-positive validity."""
        self.assertRaises(ValueError, Profile, key_usage=frozenset({"digitalSignature"}))
        self.assertRaises(ValueError, Profile, validity=timedelta(0))

    def test_duplicate_eku_dropped(self) -> None:
        """A repeated EKU appears once, in first-seen order."""
        profile = Profile.from_settings(1, "", "clientAuth,serverAuth,clientAuth")
        self.assertEqual(profile.extended_key_usage,
                         (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH))


class LocalTokenProcedureTests(_CAMixin, TestCase):
    """LocalTokenProcedure: the Deferred path, on the real reactor's thread pool."""

    def test_provides_interface(self) -> None:
        """LocalTokenProcedure provides ITokenProcedure and passes its name and chain through."""
        procedure = LocalTokenProcedure("EST Enroll", self.ca, Profile())
        self.assertTrue(verifyObject(ITokenProcedure, procedure))
        self.assertEqual(procedure.name, "EST Enroll")
        self.assertEqual(procedure.chain(), [self.ca.issuing, self.ca.root])

    def _issue_recording_thread(self, ca: LocalCA) -> tuple[Deferred[x509.Certificate], list, IssueRequest]:
        threads = []
        original = ca.sign

        def sign(*args, **kwargs):  # type: ignore[no-untyped-def]
            threads.append(threading.current_thread())
            return original(*args, **kwargs)

        copy = LocalCA(ca.directory, ca.root, ca.issuing, ca._issuing_key)
        object.__setattr__(copy, "sign", sign)  # frozen attrs: instance override for the test
        procedure = LocalTokenProcedure("p", copy, Profile(), reactor=reactor)
        request = _ec_request("threaded")
        d = procedure.issue(request)
        self.assertIsInstance(d, Deferred)
        return d, threads, request

    def test_issue_ec_on_reactor_thread(self) -> Deferred[None]:
        """An EC CA signs at once, on the calling (reactor) thread: cheaper than a thread hop."""
        self.assertTrue(self.ca.signs_quickly)
        self.assertTrue(LocalCA.load_or_create(self.mktemp(), "rsa", key_type="rsa-2048").signs_quickly)
        d, threads, request = self._issue_recording_thread(self.ca)

        def check(cert: x509.Certificate) -> None:
            self.assertEqual(cert.subject, request.subject)
            cert.verify_directly_issued_by(self.ca.issuing)
            self.assertEqual(threads, [threading.main_thread()])

        self.assertTrue(d.called)
        return d.addCallback(check)

    def test_issue_rsa_off_reactor_thread(self) -> Deferred[None]:
        """An RSA-3072 CA signs on a pool thread: milliseconds would stall the reactor."""
        ca = LocalCA.load_or_create(self.mktemp(), "rsa", key_type="rsa-3072")
        self.assertFalse(ca.signs_quickly)
        d, threads, request = self._issue_recording_thread(ca)

        def check(cert: x509.Certificate) -> None:
            self.assertEqual(cert.subject, request.subject)
            cert.verify_directly_issued_by(ca.issuing)
            self.assertEqual(len(threads), 1)
            self.assertIsNot(threads[0], threading.main_thread())

        return d.addCallback(check)

    def test_issue_failure(self) -> Deferred[None]:
        """A signing error reaches the Deferred's errback, not the reactor thread."""
        procedure = LocalTokenProcedure("p", self.ca, Profile())
        key = ec.generate_private_key(ec.SECP256R1())
        d = procedure.issue(IssueRequest(x509.Name([]), key.public_key()))
        return self.assertFailure(d, ValueError)  # type: ignore[return-value]
