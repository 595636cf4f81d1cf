"""Revocation of client certificates: the store, CRL files and OCSP.

Unit tests drive :mod:`estgw.revocation` with a Clock, StubTreq and a
synchronous stand-in for the thread pool; the end-to-end tests run a real
gateway on 127.0.0.1, a real OCSP responder (a twisted.web resource whose
answers are signed with cryptography's OCSPResponseBuilder) and real curl.
"""

from __future__ import annotations

import base64
import io
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID
from treq.testing import StubTreq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server

from estgw import bootstrap, cli
from estgw import config as config_module
from estgw.ca import IssueRequest, LocalCA, Profile
from estgw.config import ConfigError
from estgw.refusal import Refusal
from estgw.revocation import (
    CRLError,
    CRLFile,
    OCSPChecker,
    RevocationChecker,
    build_checker,
    load_crl,
)
from estgw.store import IssuedCertificate
from estgw.testing import RunningGateway, cert_pem, key_pem, make_csr, new_key, write

UTC = timezone.utc


# -- certificates, CRLs and an OCSP responder made at test time ---------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def make_ca(common_name: str, key: Any = None, issuer: tuple[Any, x509.Certificate] | None = None,
            crl_sign: bool = True) -> tuple[Any, x509.Certificate]:
    """A CA certificate: self-signed, or issued by ``issuer`` (key, cert)."""
    key = key or new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    signer_key, issuer_name = (key, subject) if issuer is None else (issuer[0], issuer[1].subject)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, crl_sign, False, False), critical=True
        )
        .sign(signer_key, hashes.SHA256())
    )
    return key, cert


def make_leaf(
    ca: tuple[Any, x509.Certificate],
    common_name: str,
    ocsp_url: str | None = None,
    eku: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
) -> tuple[Any, x509.Certificate]:
    """An end-entity certificate for ``common_name`` with a DNS SAN, issued by ``ca``."""
    key = new_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca[1].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(f"{common_name}.example")]), critical=False
        )
        .add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    )
    if ocsp_url is not None:
        builder = builder.add_extension(
            x509.AuthorityInformationAccess([
                x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(ocsp_url))
            ]),
            critical=False,
        )
    return key, builder.sign(ca[0], hashes.SHA256())


def make_crl(
    ca: tuple[Any, x509.Certificate],
    revoked: Sequence[int] = (),
    next_update: timedelta = timedelta(days=1),
    number: int = 1,
    last_update: timedelta = timedelta(hours=-1),
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca``; ``next_update`` and ``last_update`` are relative to now."""
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca[1].subject)
        .last_update(now + last_update)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now - timedelta(minutes=5)).build()
        )
    return builder.sign(ca[0], hashes.SHA256())


def crl_bytes(crl: x509.CertificateRevocationList, der: bool = False) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)


def make_responder_cert(ca: tuple[Any, x509.Certificate], ocsp_signing: bool = True) -> tuple[Any, x509.Certificate]:
    eku = (ExtendedKeyUsageOID.OCSP_SIGNING,) if ocsp_signing else (ExtendedKeyUsageOID.CLIENT_AUTH,)
    return make_leaf(ca, "OCSP Responder", eku=eku)


class OCSPResponder(resource.Resource):
    """A small OCSP responder (RFC 6960 over HTTP POST) for one CA.

    ``status`` maps serial numbers to good/revoked/unknown (default good);
    answers are signed by the CA or by ``signer`` (key, cert).
    """

    isLeaf = True

    def __init__(self, ca: tuple[Any, x509.Certificate], now: Callable[[], datetime] = _now) -> None:
        super().__init__()
        self.ca = ca
        self.signer: tuple[Any, x509.Certificate] = ca
        self.now = now
        self.status: dict[int, ocsp.OCSPCertStatus] = {}
        self.requests: list[ocsp.OCSPRequest] = []
        self.content_types: list[bytes | None] = []
        self.next_update: timedelta | None = timedelta(hours=1)
        self.this_update = timedelta(minutes=-1)
        self.answer: bytes | None = None  # a fixed body instead of an OCSP answer
        self.http_status = 200
        self.hang = False  # never answer
        self.trickle = False  # send headers and a few bytes, then nothing
        self.about_serial: int | None = None  # answer about another serial
        self.send_signer_certificate = True  # include a delegated signer's certificate
        self.tamper = False  # flip a bit of the signature

    def render_POST(self, request: Any) -> Any:
        self.content_types.append(request.getHeader(b"content-type"))
        if self.hang:
            return server.NOT_DONE_YET
        if self.trickle:
            request.write(b"0")
            return server.NOT_DONE_YET
        request.setResponseCode(self.http_status)
        request.setHeader(b"content-type", b"application/ocsp-response")
        if self.answer is not None:
            return self.answer
        ocsp_request = ocsp.load_der_ocsp_request(request.content.read())
        self.requests.append(ocsp_request)
        return self.respond(ocsp_request)

    def respond(self, req: ocsp.OCSPRequest) -> bytes:
        serial = self.about_serial if self.about_serial is not None else req.serial_number
        status = self.status.get(serial, ocsp.OCSPCertStatus.GOOD)
        now = self.now()
        revoked = status == ocsp.OCSPCertStatus.REVOKED
        builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
            req.issuer_name_hash,
            req.issuer_key_hash,
            serial,
            req.hash_algorithm,
            status,
            now + self.this_update,
            None if self.next_update is None else now + self.next_update,
            now - timedelta(hours=2) if revoked else None,
            None,
        )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self.signer[1])
        if self.signer is not self.ca and self.send_signer_certificate:
            builder = builder.certificates([self.signer[1]])
        der = builder.sign(self.signer[0], hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if self.tamper:  # without certificates the signature ends the answer
            der = der[:-1] + bytes([der[-1] ^ 1])
        return der


def _run(d: Any) -> defer.Deferred:
    return defer.Deferred.fromCoroutine(d)


def _synchronously(f: Callable[..., Any], *args: Any) -> defer.Deferred:
    return defer.maybeDeferred(f, *args)


# -- unit: CRL files -----------------------------------------------------------------


class CRLLoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca("Factory CA")
        self.directory = self.mktemp()
        os.makedirs(self.directory)

    def path(self, name: str, data: bytes) -> str:
        return write(os.path.join(self.directory, name), data)

    def test_pem_and_der_load_and_verify(self) -> None:
        """A CRL in PEM or DER loads, and its signer is the anchor named as its issuer."""
        crl = make_crl(self.ca, [5])
        for der in (False, True):
            loaded = load_crl(self.path(f"f{der}.crl", crl_bytes(crl, der)), [make_ca("Other")[1], self.ca[1]])
            self.assertEqual(loaded.signer, self.ca[1])
            self.assertIsNotNone(loaded.crl.get_revoked_certificate_by_serial_number(5))

    def test_no_anchor_for_issuer(self) -> None:
        """A CRL whose issuer is no trust anchor cannot be used."""
        path = self.path("x.crl", crl_bytes(make_crl(self.ca)))
        e = self.assertRaises(CRLError, load_crl, path, [make_ca("Other")[1]])
        self.assertIn("no trust anchor is its issuer", str(e))

    def test_bad_signature(self) -> None:
        """A CRL signed by another key under the anchor's name is refused."""
        impostor = make_ca("Factory CA")  # same subject, another key
        path = self.path("x.crl", crl_bytes(make_crl(impostor)))
        e = self.assertRaises(CRLError, load_crl, path, [self.ca[1]])
        self.assertIn("signature does not verify", str(e))

    def test_anchor_without_crl_sign(self) -> None:
        """An anchor whose key usage lacks cRLSign cannot vouch for a CRL."""
        ca = make_ca("No CRL CA", crl_sign=False)
        path = self.path("x.crl", crl_bytes(make_crl(ca)))
        e = self.assertRaises(CRLError, load_crl, path, [ca[1]])
        self.assertIn("cRLSign", str(e))

    def test_not_a_crl(self) -> None:
        """Garbage and unreadable files say what is wrong."""
        e = self.assertRaises(CRLError, load_crl, self.path("x.crl", b"hello"), [self.ca[1]])
        self.assertIn("not a CRL", str(e))
        e = self.assertRaises(CRLError, load_crl, os.path.join(self.directory, "missing"), [self.ca[1]])
        self.assertIn("cannot read it", str(e))


def _config(directory: str, text: str) -> config_module.Config:
    return config_module.from_string("state.directory = state\n" + text, base_dir=directory)


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """Without settings: no CRLs, OCSP off, and hard failures when configured."""
        c = _config(".", "")
        self.assertEqual(
            (c.crl_files, c.crl_stale, c.ocsp, c.ocsp_timeout, c.ocsp_cache_seconds, c.ocsp_failure),
            ((), "hard", "off", 5.0, 300, "hard"),
        )

    def test_values(self) -> None:
        """Every key parses; CRL paths are relative to the config file."""
        c = _config("/etc/estgw", (
            "tls.crls = a.crl, /abs/b.crl\ntls.crl.stale = soft\ntls.ocsp = http://ocsp.example/x\n"
            "tls.ocsp.timeout = 2.5\ntls.ocsp.cacheSeconds = 0\ntls.ocsp.failure = soft\n"
        ))
        self.assertEqual(c.crl_files, ("/etc/estgw/a.crl", "/abs/b.crl"))
        self.assertEqual(
            (c.crl_stale, c.ocsp, c.ocsp_timeout, c.ocsp_cache_seconds, c.ocsp_failure),
            ("soft", "http://ocsp.example/x", 2.5, 0, "soft"),
        )
        self.assertEqual(_config(".", "tls.ocsp = AIA").ocsp, "aia")

    def test_bad_values_name_the_key(self) -> None:
        """A wrong value is a ConfigError naming its key."""
        for line, key in [
            ("tls.crl.stale = maybe", "tls.crl.stale"),
            ("tls.ocsp = ftp://x", "tls.ocsp"),
            ("tls.ocsp = on", "tls.ocsp"),
            ("tls.ocsp.timeout = 0", "tls.ocsp.timeout"),
            ("tls.ocsp.cacheSeconds = -1", "tls.ocsp.cacheSeconds"),
            ("tls.ocsp.failure = never", "tls.ocsp.failure"),
        ]:
            e = self.assertRaises(ConfigError, _config, ".", line)
            self.assertEqual(e.key, key, line)


class BuildCheckerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.ca = make_ca("Factory CA")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.clock = Clock()
        self.clock.advance(time.time())

    def test_bad_crl_is_config_error(self) -> None:
        """A CRL that does not verify, or is missing, stops start with key tls.crls and the reason."""
        write(os.path.join(self.directory, "bad.crl"), crl_bytes(make_crl(make_ca("Factory CA"))))
        for name, reason in (("bad.crl", "signature does not verify"), ("missing.crl", "cannot read it")):
            config = _config(self.directory, f"tls.crls = {name}")
            e = self.assertRaises(ConfigError, build_checker, config, [self.ca[1]], (), self.clock)
            self.assertEqual(e.key, "tls.crls")
            self.assertIn(reason, e.reason)
            self.assertIn(name, e.reason)

    def test_builds_what_is_configured(self) -> None:
        """CRLs and OCSP are set up only where configured."""
        write(os.path.join(self.directory, "f.crl"), crl_bytes(make_crl(self.ca)))
        checker = build_checker(
            _config(self.directory, "tls.crls = f.crl\ntls.ocsp = aia"), [self.ca[1]], (), self.clock, http=object()
        )
        self.assertEqual([c.path for c in checker.crls], [os.path.join(self.directory, "f.crl")])
        self.assertIsNotNone(checker.ocsp)
        checker = build_checker(_config(self.directory, ""), [self.ca[1]], (), self.clock)
        self.assertEqual((checker.crls, checker.ocsp), ((), None))


class CRLCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = make_ca("Factory Root")
        self.ca = make_ca("Factory CA", issuer=self.root)
        self.key, self.cert = make_leaf(self.ca, "device-1")
        self.chain = (self.cert, self.ca[1], self.root[1])
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.clock = Clock()
        self.clock.advance(time.time())

    def checker(self, *crls: x509.CertificateRevocationList, stale: str = "hard") -> RevocationChecker:
        files = []
        for index, crl in enumerate(crls):
            path = write(os.path.join(self.directory, f"{index}.crl"), crl_bytes(crl))
            files.append(CRLFile(load_crl(path, [self.root[1], self.ca[1]]), [self.root[1], self.ca[1]], _synchronously))
        return RevocationChecker(files, None, stale, self.clock)

    def check(self, checker: RevocationChecker, chain: Sequence[x509.Certificate] | None = None) -> Any:
        chain = self.chain if chain is None else chain
        return self.successResultOf(_run(checker.check(self.cert, chain)).addErrback(lambda f: f.value))

    def test_listed_certificate_refused(self) -> None:
        """A certificate on its issuer's CRL is refused with client-certificate-revoked."""
        refusal = self.check(self.checker(make_crl(self.ca, [self.cert.serial_number])))
        self.assertIsInstance(refusal, Refusal)
        self.assertEqual((refusal.status, refusal.code), (403, "client-certificate-revoked"))
        self.assertIn("revocation list", refusal.reason)

    def test_unlisted_certificate_accepted(self) -> None:
        """A certificate its issuer's CRL does not list passes."""
        self.assertIsNone(self.check(self.checker(make_crl(self.ca, [self.cert.serial_number + 1]))))

    def test_other_issuers_crl_not_applied(self) -> None:
        """The same serial on another CA's CRL means nothing for this certificate."""
        self.assertIsNone(self.check(self.checker(make_crl(self.root, [self.cert.serial_number]))))

    def test_revoked_intermediate_refused(self) -> None:
        """A CA certificate of the chain on the root's CRL refuses its leaves."""
        refusal = self.check(self.checker(make_crl(self.root, [self.ca[1].serial_number])))
        self.assertEqual(refusal.code, "client-certificate-revoked")
        self.assertIn("Factory CA", refusal.reason)

    def test_without_chain_matched_by_issuer_name(self) -> None:
        """Without a verified chain the CRL is found by the certificate's issuer name."""
        refusal = self.check(self.checker(make_crl(self.ca, [self.cert.serial_number])), chain=())
        self.assertEqual(refusal.code, "client-certificate-revoked")

    def test_stale_hard_refuses(self) -> None:
        """A CRL past nextUpdate refuses with 503 crl-stale and Retry-After under hard."""
        refusal = self.check(self.checker(make_crl(self.ca, next_update=timedelta(minutes=-1))))
        self.assertEqual((refusal.status, refusal.code), (503, "crl-stale"))
        self.assertIn("out of date", refusal.reason)
        self.assertIn("Retry-After", refusal.headers)

    def test_stale_soft_accepts_with_one_warning(self) -> None:
        """Under soft a stale CRL accepts what it does not list, warning once per CRL."""
        checker = self.checker(make_crl(self.ca, next_update=timedelta(minutes=-1)), stale="soft")
        with capturedLogs() as events:
            self.assertIsNone(self.check(checker))
            self.assertIsNone(self.check(checker))
        warnings = [e for e in events if "stale" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)

    def test_stale_crl_still_revokes(self) -> None:
        """A listing in a stale CRL is still a revocation (even under soft)."""
        checker = self.checker(
            make_crl(self.ca, [self.cert.serial_number], next_update=timedelta(minutes=-1)), stale="soft"
        )
        self.assertEqual(self.check(checker).code, "client-certificate-revoked")

    def test_staleness_follows_the_clock(self) -> None:
        """A CRL becomes stale when the clock passes its nextUpdate."""
        checker = self.checker(make_crl(self.ca, next_update=timedelta(minutes=10)))
        self.assertIsNone(self.check(checker))
        self.clock.advance(11 * 60)
        self.assertEqual(self.check(checker).code, "crl-stale")

    def test_reloaded_when_file_changes(self) -> None:
        """A rewritten CRL file is used from the next check on."""
        checker = self.checker(make_crl(self.ca, [], number=1))
        self.assertIsNone(self.check(checker))
        write(checker.crls[0].path, crl_bytes(make_crl(self.ca, [self.cert.serial_number], number=2), der=True))
        self.assertEqual(self.check(checker).code, "client-certificate-revoked")

    def test_failed_reload_keeps_old_crl(self) -> None:
        """A broken, badly signed, older or deleted replacement is logged and the old CRL kept."""
        checker = self.checker(make_crl(self.ca, [self.cert.serial_number], number=5))
        path = checker.crls[0].path
        replacements: list[bytes | None] = [
            b"garbage",
            crl_bytes(make_crl(make_ca("Factory CA"), number=6)),  # another key
            crl_bytes(make_crl(self.ca, [], number=4)),  # older: would un-revoke
            None,  # deleted
        ]
        for data in replacements:
            if data is None:
                os.unlink(path)
            else:
                write(path, data)
            with capturedLogs() as events:
                self.assertEqual(self.check(checker).code, "client-certificate-revoked", data)
                self.check(checker)  # the same broken state is not read or logged again
            errors = [e for e in events if "keeping the CRL loaded before" in e.get("log_format", "")]
            self.assertEqual(len(errors), 1, data)


# -- unit: OCSP --------------------------------------------------------------------


class OCSPCheckTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(time.time())
        self.ca = make_ca("Factory CA")
        self.key, self.cert = make_leaf(self.ca, "device-1", ocsp_url="http://ocsp.example/")
        self.responder = OCSPResponder(self.ca, now=lambda: datetime.fromtimestamp(self.clock.seconds(), UTC))
        self.http = StubTreq(self.responder)

    def checker(self, mode: str = "aia", **kwargs: Any) -> OCSPChecker:
        return OCSPChecker(mode, self.http, self.clock, **kwargs)

    def check(self, checker: OCSPChecker, cert: x509.Certificate | None = None) -> Any:
        cert = cert or self.cert
        d = _run(checker.check(cert, (cert, self.ca[1])))
        self.http.flush()
        return self.successResultOf(d.addErrback(lambda f: f.value))

    def assertUnavailable(self, checker: OCSPChecker, why: str) -> None:
        with capturedLogs() as events:
            refusal = self.check(checker)
        self.assertIsInstance(refusal, Refusal)
        self.assertEqual((refusal.status, refusal.code), (503, "ocsp-unavailable"))
        self.assertIn("Retry-After", refusal.headers)
        self.assertTrue(any(why in str(e.get("why")) for e in events), [e.get("why") for e in events])

    def test_good(self) -> None:
        """A good answer signed by the issuer accepts; the request was a real OCSP POST about the cert."""
        self.assertIsNone(self.check(self.checker()))
        self.assertEqual(self.responder.content_types, [b"application/ocsp-request"])
        self.assertEqual(self.responder.requests[0].serial_number, self.cert.serial_number)

    def test_revoked(self) -> None:
        """A revoked answer refuses with 403 client-certificate-revoked."""
        self.responder.status[self.cert.serial_number] = ocsp.OCSPCertStatus.REVOKED
        refusal = self.check(self.checker())
        self.assertEqual((refusal.status, refusal.code), (403, "client-certificate-revoked"))
        self.assertIn("OCSP", refusal.reason)

    def test_configured_url(self) -> None:
        """With a URL the responder is asked even about certificates without AIA."""
        _key, plain = make_leaf(self.ca, "device-2")
        self.assertIsNone(self.check(self.checker("http://127.0.0.1/ocsp"), plain))
        self.assertEqual(len(self.responder.requests), 1)

    def test_aia_without_responder_not_asked(self) -> None:
        """Under aia a certificate that names no responder is not checked."""
        _key, plain = make_leaf(self.ca, "device-2")
        self.assertIsNone(self.check(self.checker(), plain))
        self.assertEqual(self.responder.requests, [])

    def test_own_ca_left_to_store(self) -> None:
        """Certificates of the gateway's own issuing CA are not sent to OCSP."""
        self.assertIsNone(self.check(self.checker("http://127.0.0.1/", own_issuers=[self.ca[1]])))
        self.assertEqual(self.responder.requests, [])

    def test_cache(self) -> None:
        """An answer is reused for cacheSeconds, then asked again."""
        checker = self.checker(cache_seconds=300)
        self.check(checker)
        self.clock.advance(299)
        self.check(checker)
        self.assertEqual(len(self.responder.requests), 1)
        self.clock.advance(2)
        self.check(checker)
        self.assertEqual(len(self.responder.requests), 2)

    def test_cache_bounded_by_next_update(self) -> None:
        """An answer is not reused past its own nextUpdate."""
        self.responder.next_update = timedelta(seconds=60)
        checker = self.checker(cache_seconds=300)
        self.check(checker)
        self.clock.advance(59)
        self.check(checker)
        self.assertEqual(len(self.responder.requests), 1)
        self.clock.advance(2)
        self.check(checker)
        self.assertEqual(len(self.responder.requests), 2)

    def test_cache_is_bounded(self) -> None:
        """The cache holds at most MAX_OCSP_CACHE_ENTRIES answers, dropping the least recently used."""
        from estgw import revocation

        self.patch(revocation, "MAX_OCSP_CACHE_ENTRIES", 2)
        checker = self.checker()
        certs = [self.cert] + [make_leaf(self.ca, f"d{i}", ocsp_url="http://ocsp.example/")[1] for i in range(2)]
        self.check(checker, certs[0])
        self.check(checker, certs[1])
        self.check(checker, certs[0])  # a hit: now the most recently used
        self.check(checker, certs[2])  # evicts certs[1]
        self.assertEqual(len(self.responder.requests), 3)
        self.check(checker, certs[0])
        self.assertEqual(len(self.responder.requests), 3)
        self.check(checker, certs[1])
        self.assertEqual(len(self.responder.requests), 4)

    def test_cache_off(self) -> None:
        """cacheSeconds = 0 asks on every check."""
        checker = self.checker(cache_seconds=0)
        self.check(checker)
        self.check(checker)
        self.assertEqual(len(self.responder.requests), 2)

    def test_revoked_answer_cached(self) -> None:
        """A revoked answer is cached too: no second question, still refused."""
        self.responder.status[self.cert.serial_number] = ocsp.OCSPCertStatus.REVOKED
        checker = self.checker()
        self.check(checker)
        self.assertEqual(self.check(checker).code, "client-certificate-revoked")
        self.assertEqual(len(self.responder.requests), 1)

    def test_timeout_hard_and_soft(self) -> None:
        """A responder that does not answer within the timeout: hard refuses, soft accepts."""
        self.responder.hang = True
        for failure, expected in (("hard", "ocsp-unavailable"), ("soft", None)):
            d = _run(self.checker(timeout=5, failure=failure).check(self.cert, (self.cert, self.ca[1])))
            d.addErrback(lambda f: f.value)
            self.assertNoResult(d)
            self.clock.advance(4.9)
            self.assertNoResult(d)
            self.clock.advance(0.2)
            result = self.successResultOf(d)
            self.assertEqual(getattr(result, "code", None), expected)

    def test_timeout_while_reading_body(self) -> None:
        """A responder that starts an answer and stalls times out, and its connection is dropped."""
        self.responder.trickle = True
        d = _run(self.checker(timeout=5).check(self.cert, (self.cert, self.ca[1])))
        d.addErrback(lambda f: f.value)
        self.http.flush()
        self.assertNoResult(d)
        pumps = list(self.http._agent._pumps)
        self.assertEqual([p.clientIO.disconnected for p in pumps], [False])
        self.clock.advance(5.1)
        self.assertEqual(self.successResultOf(d).code, "ocsp-unavailable")
        self.http.flush()
        self.assertEqual([p.clientIO.disconnected for p in pumps], [True])

    def test_unusable_answers(self) -> None:
        """Garbage, HTTP errors, unsuccessful status, wrong cert, stale or future answers fail (hard)."""
        cases: list[tuple[Callable[[], None], str]] = [
            (lambda: setattr(self.responder, "answer", b"not ocsp"), "not an OCSP response"),
            (lambda: setattr(self.responder, "answer", b"0" * (64 * 1024 + 1)), "larger than"),
            (lambda: setattr(self.responder, "http_status", 500), "HTTP 500"),
            (
                lambda: setattr(
                    self.responder, "answer",
                    ocsp.OCSPResponseBuilder.build_unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
                    .public_bytes(serialization.Encoding.DER),
                ),
                "TRY_LATER",
            ),
            (lambda: setattr(self.responder, "about_serial", 12345), "not about this certificate"),
            (lambda: setattr(self.responder, "next_update", timedelta(hours=-1)), "out of date"),
            (lambda: setattr(self.responder, "this_update", timedelta(hours=1)), "in the future"),
            (lambda: self.responder.status.__setitem__(self.cert.serial_number, ocsp.OCSPCertStatus.UNKNOWN),
             "does not know"),
        ]
        for setup, why in cases:
            self.setUp()
            setup()
            self.assertUnavailable(self.checker(), why)

    def test_soft_failure_accepts_and_warns(self) -> None:
        """Under soft an unusable answer accepts, with a warning naming the reason."""
        self.responder.answer = b"not ocsp"
        with capturedLogs() as events:
            self.assertIsNone(self.check(self.checker(failure="soft")))
        self.assertTrue(any("accepted" in str(e.get("outcome")) for e in events))

    def test_signed_by_stranger(self) -> None:
        """An answer from a responder that is neither the issuer nor sends a certificate fails."""
        self.responder.signer = make_responder_cert(self.ca)
        self.responder.send_signer_certificate = False
        self.assertUnavailable(self.checker(), "neither the CA nor a responder")

    def test_bad_signature(self) -> None:
        """An answer naming the issuer whose signature does not verify fails."""
        self.responder.tamper = True
        self.assertUnavailable(self.checker(), "signature does not verify")

    def test_delegated_responder(self) -> None:
        """A responder certificate from the issuer with id-kp-OCSPSigning may sign answers."""
        self.responder.signer = make_responder_cert(self.ca)
        self.responder.status[self.cert.serial_number] = ocsp.OCSPCertStatus.REVOKED
        self.assertEqual(self.check(self.checker()).code, "client-certificate-revoked")

    def test_delegated_without_ocsp_signing(self) -> None:
        """A certificate from the issuer without id-kp-OCSPSigning may not sign answers."""
        self.responder.signer = make_responder_cert(self.ca, ocsp_signing=False)
        self.assertUnavailable(self.checker(), "id-kp-OCSPSigning")

    def test_delegated_by_another_ca(self) -> None:
        """A responder certificate with OCSPSigning from another CA may not sign answers."""
        other = make_ca("Factory CA")  # even under the same name
        self.responder.signer = make_responder_cert(other)
        self.assertUnavailable(self.checker(), "not issued by")


# -- end to end: a real gateway, curl, and a real OCSP responder ------------------------------

BASE_CONFIG = """\
server.port = 0
server.interface = 127.0.0.1
server.hostnames = localhost, 127.0.0.1
state.directory = state
tokenprocedure.1.name = Test Procedure
tokenprocedure.1.validity.days = 30
default.tokenprocedure = Test Procedure
handler.1.operation = simpleenroll
handler.1.filter = clientcert
handler.1.format = est-simpleenroll-subjectmatch
handler.1.clientCertificateIssuers = any
handler.2.operation = simplereenroll
"""
FACTORY = "tls.trustAnchors = factory-ca.pem\n"


def _csr_body(key: Any, cert: x509.Certificate) -> bytes:
    """A base64 PKCS#10 with the subject and SANs of ``cert``."""
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    csr = make_csr(key, cert.subject, list(sans))
    return base64.b64encode(csr.public_bytes(serialization.Encoding.DER))


class EndToEndTests(TestCase):
    """Each refusal over real TLS: status, reason, and no certificate issued."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.factory = make_ca("Factory CA")
        write(os.path.join(self.directory, "factory-ca.pem"), cert_pem(self.factory[1]))

    async def start(self, extra: str) -> RunningGateway:
        gateway = RunningGateway(self.directory, BASE_CONFIG + extra)
        await gateway.run()
        self.addCleanup(gateway.stop)
        return gateway

    def client(self, key: Any, cert: x509.Certificate) -> tuple[str, str]:
        name = f"client-{cert.serial_number:x}"
        return (
            write(os.path.join(self.directory, name + ".pem"), cert_pem(cert)),
            write(os.path.join(self.directory, name + ".key"), key_pem(key)),
        )

    async def enroll(
        self, gateway: RunningGateway, key: Any, cert: x509.Certificate, operation: str = "simpleenroll"
    ) -> Any:
        cert_file, key_file = self.client(key, cert)
        return await gateway.curl(operation, data=_csr_body(key, cert), cert=cert_file, key=key_file)

    async def assertRefused(
        self, gateway: RunningGateway, result: Any, status: int, reason: str, before: int
    ) -> None:
        self.assertEqual(result.status, status, result.text + result.stderr.decode())
        self.assertIn(reason, result.text)
        self.assertEqual(await gateway.store.count_certificates(), before)

    async def assertIssued(self, gateway: RunningGateway, result: Any, before: int) -> None:
        self.assertEqual(result.status, 200, result.text + result.stderr.decode())
        self.assertEqual(await gateway.store.count_certificates(), before + 1)

    def own_certificate(self, ca: LocalCA, common_name: str) -> tuple[Any, x509.Certificate]:
        key = new_key()
        request = IssueRequest(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            key.public_key(),
            (x509.DNSName(f"{common_name}.example"),),
        )
        return key, ca.sign(request, Profile.from_settings(30, "digitalSignature", "clientAuth"))

    async def test_store_revocation_without_restart(self) -> None:
        """`estgw cert revoke` on a running gateway refuses the certificate's next renewal."""
        gateway = await self.start("")
        key, cert = self.own_certificate(gateway.service.state.ca, "device-1")
        await gateway.store.record_certificate(IssuedCertificate.from_certificate(cert, "test", "test"))
        await self.assertIssued(gateway, await self.enroll(gateway, key, cert, "simplereenroll"), 1)

        out = io.StringIO()
        await cli.run(reactor, ["--config", gateway.config_path, "cert", "revoke", f"{cert.serial_number:x}"], out)
        self.assertIn("revoked", out.getvalue())
        result = await self.enroll(gateway, key, cert, "simplereenroll")
        await self.assertRefused(gateway, result, 403, "the TLS client certificate has been revoked", 2)

    async def test_own_crl_reloaded_while_running(self) -> None:
        """A CRL of the local CA (written by `estgw crl write`, then rewritten) is re-read while serving."""
        await cli.run(reactor, ["--config", write(os.path.join(self.directory, "est.properties"),
                                                  (BASE_CONFIG + "tls.crls = state/ca/crl.pem\n").encode()),
                                "crl", "write"], io.StringIO())
        gateway = await self.start("tls.crls = state/ca/crl.pem\n")
        ca = gateway.service.state.ca
        key, cert = self.own_certificate(ca, "device-1")
        await gateway.store.record_certificate(IssuedCertificate.from_certificate(cert, "test", "test"))
        await self.assertIssued(gateway, await self.enroll(gateway, key, cert, "simplereenroll"), 1)

        ca.write_crl([(cert.serial_number, _now())])  # a CRL listing it; the store knows nothing
        result = await self.enroll(gateway, key, cert, "simplereenroll")
        await self.assertRefused(gateway, result, 403, "on its CA's certificate revocation list", 2)

    async def test_factory_certificate_on_crl(self) -> None:
        """A factory certificate its CA's CRL lists is refused; an unlisted one enrolls."""
        revoked = make_leaf(self.factory, "device-1")
        fine = make_leaf(self.factory, "device-2")
        write(os.path.join(self.directory, "factory.crl"),
              crl_bytes(make_crl(self.factory, [revoked[1].serial_number]), der=True))
        gateway = await self.start(FACTORY + "tls.crls = factory.crl\n")
        result = await self.enroll(gateway, *revoked)
        await self.assertRefused(gateway, result, 403, "on its CA's certificate revocation list", 0)
        await self.assertIssued(gateway, await self.enroll(gateway, *fine), 0)

    async def test_stale_crl_hard(self) -> None:
        """Under tls.crl.stale = hard a stale CRL refuses with 503 and Retry-After."""
        write(os.path.join(self.directory, "factory.crl"),
              crl_bytes(make_crl(self.factory, next_update=timedelta(minutes=-5))))
        gateway = await self.start(FACTORY + "tls.crls = factory.crl\ntls.crl.stale = hard\n")
        result = await self.enroll(gateway, *make_leaf(self.factory, "device-1"))
        await self.assertRefused(gateway, result, 503, "certificate revocation list of 'CN=Factory CA' is out of date", 0)
        self.assertEqual(result.headers.get("retry-after"), "300")

    async def test_stale_crl_soft(self) -> None:
        """Under tls.crl.stale = soft a stale CRL accepts certificates it does not list."""
        write(os.path.join(self.directory, "factory.crl"),
              crl_bytes(make_crl(self.factory, next_update=timedelta(minutes=-5))))
        gateway = await self.start(FACTORY + "tls.crls = factory.crl\ntls.crl.stale = soft\n")
        await self.assertIssued(gateway, await self.enroll(gateway, *make_leaf(self.factory, "device-1")), 0)

    async def listen_responder(self) -> tuple[OCSPResponder, str]:
        responder = OCSPResponder(self.factory)
        port = reactor.listenTCP(0, server.Site(responder), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return responder, f"http://127.0.0.1:{port.getHost().port}/ocsp"

    async def test_ocsp_good_and_revoked(self) -> None:
        """Through the responder in AIA: good enrolls, revoked is refused with 403."""
        responder, url = await self.listen_responder()
        good = make_leaf(self.factory, "device-1", ocsp_url=url)
        revoked = make_leaf(self.factory, "device-2", ocsp_url=url)
        responder.status[revoked[1].serial_number] = ocsp.OCSPCertStatus.REVOKED
        gateway = await self.start(FACTORY + "tls.ocsp = aia\n")
        await self.assertIssued(gateway, await self.enroll(gateway, *good), 0)
        result = await self.enroll(gateway, *revoked)
        await self.assertRefused(gateway, result, 403, "has been revoked (OCSP)", 1)
        self.assertEqual(len(responder.requests), 2)

    async def closed_port_url(self) -> str:
        port = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        return f"http://127.0.0.1:{number}/ocsp"

    async def test_ocsp_unreachable_hard(self) -> None:
        """Under tls.ocsp.failure = hard an unreachable responder refuses with 503."""
        url = await self.closed_port_url()
        gateway = await self.start(FACTORY + f"tls.ocsp = {url}\ntls.ocsp.failure = hard\ntls.ocsp.timeout = 3\n")
        result = await self.enroll(gateway, *make_leaf(self.factory, "device-1"))
        await self.assertRefused(gateway, result, 503, "cannot be checked now (OCSP)", 0)

    async def test_ocsp_unreachable_soft(self) -> None:
        """Under tls.ocsp.failure = soft an unreachable responder accepts."""
        url = await self.closed_port_url()
        gateway = await self.start(FACTORY + f"tls.ocsp = {url}\ntls.ocsp.failure = soft\ntls.ocsp.timeout = 3\n")
        await self.assertIssued(gateway, await self.enroll(gateway, *make_leaf(self.factory, "device-1")), 0)

    def test_bad_crl_stops_start(self) -> None:
        """A CRL signed by no trust anchor stops the gateway's start with tls.crls and the reason."""
        write(os.path.join(self.directory, "factory.crl"), crl_bytes(make_crl(make_ca("Unknown CA"))))
        gateway = RunningGateway(self.directory, BASE_CONFIG + FACTORY + "tls.crls = factory.crl\n")
        from estgw.tap import GatewayService

        e = self.assertRaises(usage.UsageError, GatewayService, gateway.config)
        self.assertIn("tls.crls", str(e))
        self.assertIn("no trust anchor is its issuer 'CN=Unknown CA'", str(e))


class CRLWriteCommandTests(TestCase):
    async def test_crl_write_lists_revoked(self) -> None:
        """`estgw crl write --out` signs a CRL of the store's revoked certificates with the local CA."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config_path = write(os.path.join(directory, "est.properties"), BASE_CONFIG.encode())
        config = config_module.load(config_path)
        state = bootstrap.initialize(config)
        store = bootstrap.open_store(config, reactor)
        await store.start()
        serials = []
        try:
            for name in ("a", "b"):
                key = new_key()
                cert = state.ca.sign(
                    IssueRequest(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key()),
                    Profile.from_settings(30, "digitalSignature", "clientAuth"),
                )
                await store.record_certificate(IssuedCertificate.from_certificate(cert, "t", "t"))
                serials.append(cert.serial_number)
            await store.revoke_certificate(serials[0], "keyCompromise")
        finally:
            await store.close()

        for flags in ([], ["--der"]):
            out_file = os.path.join(directory, "own.crl")
            out = io.StringIO()
            await cli.run(reactor, ["--config", config_path, "crl", "write", "--out", out_file, "--days", "2", *flags], out)
            self.assertIn("1 revoked certificate(s)", out.getvalue())
            loaded = load_crl(out_file, list(state.ca.chain()))
            self.assertEqual(loaded.signer, state.ca.issuing)
            self.assertIsNotNone(loaded.crl.get_revoked_certificate_by_serial_number(serials[0]))
            self.assertIsNone(loaded.crl.get_revoked_certificate_by_serial_number(serials[1]))
            self.assertAlmostEqual(
                (loaded.crl.next_update_utc - loaded.crl.last_update_utc).total_seconds(), 2 * 86400, delta=5
            )
            self.assertEqual(open(out_file, "rb").read().startswith(b"-----BEGIN"), not flags)
