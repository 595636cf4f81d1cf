"""estgw.httpauth: the Authorization header read strictly, Digest nonces
and nonce counts.  Property tests (hypothesis) fuzz the parsers: whatever
the bytes, the outcome is credentials or MalformedCredentials (or, for
Digest, a nonce refusal), never another exception."""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from hypothesis import given, settings, strategies as st
from twisted.cred import credentials
from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from estgw import httpauth
from estgw.httpauth import (
    BasicCredentialFactory,
    DigestCredentialFactory,
    InvalidNonce,
    MalformedCredentials,
    StaleNonce,
    StoreNonceCounts,
    parse_authorization,
)
from estgw.store import SQLiteStore
from tests.test_auth import SecurityTestCase, csr_for
from tests.test_refusals import register

FUZZ = settings(max_examples=300, deadline=None)
URI = "/.well-known/est/digest/simpleenroll"
TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"

tokens = st.text(alphabet=TCHARS, min_size=1, max_size=12)
quotable = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from('"\\ \t'), max_size=20
)


def request(host: str = "127.0.0.1", headers: list[bytes] | None = None) -> DummyRequest:
    r = DummyRequest([b"simpleenroll"])
    r.client = IPv4Address("TCP", host, 40000)
    r.method = b"POST"
    r.uri = URI.encode()
    if headers is not None:
        r.requestHeaders.setRawHeaders(b"authorization", headers)
    return r


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class ParseTests(SynchronousTestCase):
    def malformed(self, header: bytes) -> str:
        with self.assertRaises(MalformedCredentials) as caught:
            parse_authorization(header)
        reason = caught.exception.reason
        self.assertNotIn("\n", reason)
        return reason

    def test_examples(self) -> None:
        """token68, parameters with quoted-pairs and empty list elements, a scheme alone."""
        self.assertEqual(parse_authorization(b"Basic dXNlcjpwYXNz"), httpauth.Authorization("basic", "dXNlcjpwYXNz"))
        parsed = parse_authorization(b'DIGEST username="a\\"b" ,, realm=r,nc=00000001 ,')
        self.assertEqual(parsed.scheme, "digest")
        self.assertEqual(dict(parsed.params), {"username": 'a"b', "realm": "r", "nc": "00000001"})
        self.assertTrue(parse_authorization(b"Digest").empty)

    def test_malformed_examples(self) -> None:
        """Each malformed shape gets its own reason."""
        cases = {
            b"": "does not start with an authentication scheme",
            b"   ": "does not start with an authentication scheme",
            b'"Basic" abc': "does not start with an authentication scheme",
            b"Basic\tabc": "not a space",
            b"Digest a=b c=d": "expected ','",
            b'Digest a="b': "not closed",
            b"Digest a": None,  # token68: the factory refuses it
            b"Digest a=b, a=c": "given twice",
            b"Digest A=b, a=c": "given twice",
            b"Digest a=, b=c": "has no value",
            b"Digest =b": "expected a parameter name",
            b"Digest a b": "has no '=' and value",
            b'Digest a="\xff"': "not UTF-8",
            b"Basic abc\r\nX-Forged: 1": "control character",
            b"Basic abc\x00": "control character",
            b"Basic \x1b[2J": "control character",
            b"Basic " + b"A" * 5000: "longer than 4096 bytes",
        }
        for header, reason in cases.items():
            if reason is None:
                parse_authorization(header)
            else:
                self.assertIn(reason, self.malformed(header), header)

    @FUZZ
    @given(st.binary(max_size=600))
    def test_any_bytes(self, header: bytes) -> None:
        """Any bytes: parsed, or MalformedCredentials with a one-line reason."""
        try:
            parsed = parse_authorization(header)
        except MalformedCredentials as e:
            self.assertTrue(e.reason.isprintable(), e.reason)
        else:
            self.assertEqual(parsed.scheme, parsed.scheme.lower())

    @FUZZ
    @given(tokens, st.dictionaries(tokens.map(str.lower), st.one_of(tokens, quotable), min_size=1, max_size=6), st.booleans())
    def test_round_trip(self, scheme: str, params: dict[str, str], spaces: bool) -> None:
        """Parameters written as tokens or quoted strings are read back exactly."""
        sep = " , " if spaces else ","
        header = scheme + " " + sep.join(f"{k}={_quote(v) if v == '' or set(v) - set(TCHARS) else v}" for k, v in params.items())
        parsed = parse_authorization(header.encode("utf-8"))
        self.assertEqual((parsed.scheme, dict(parsed.params)), (scheme.lower(), params))

    def test_one_header(self) -> None:
        """Two Authorization headers are refused, not the last one taken."""
        with self.assertRaises(MalformedCredentials) as caught:
            httpauth.authorization_header(request(headers=[b"Basic YTpi", b"Basic YzpkCg=="]))
        self.assertIn("2 Authorization headers", caught.exception.reason)
        self.assertEqual(httpauth.authorization_header(request(headers=[b"Basic  YTpi "])), (b"Basic", b" YTpi"))
        for header in (b"Basic\tYTpi", b'"Basic" YTpi', b"Basic YTpi\x7f"):
            with self.assertRaises(MalformedCredentials):
                httpauth.authorization_header(request(headers=[header]))


class BasicTests(SynchronousTestCase):
    factory = BasicCredentialFactory(b"r")

    def decode(self, response: bytes) -> Any:
        return self.factory.decode(response, request())

    def malformed(self, response: bytes) -> str:
        with self.assertRaises(MalformedCredentials) as caught:
            self.decode(response)
        return caught.exception.reason

    def test_valid(self) -> None:
        """RFC 7617: base64 of id:password, UTF-8; padding may be left off."""
        creds = self.decode(base64.b64encode("pump-17:pä:ss".encode()))
        self.assertEqual((creds.username, creds.password), (b"pump-17", "pä:ss".encode()))
        creds = self.decode(b"YTpi")  # a:b
        self.assertEqual(creds.username, b"a")
        self.assertEqual(self.decode(base64.b64encode(b"ab:c").rstrip(b"=")).password, b"c")

    def test_malformed(self) -> None:
        """Bad base64, no colon, not UTF-8, control characters, empty id, no credentials."""
        b64 = base64.b64encode
        cases = {
            b"!!!": "not one base64 value",
            b"ab cd": "not one base64 value",
            b"a\x1bb": "control character",
            b"abcde": "not base64",
            b"a-b_": "not base64",
            b64(b"nocolon"): "no ':'",
            b64(b"\xff\xfe:pw"): "device id is not UTF-8",
            b64(b"pump:\xff"): "password is not UTF-8",
            b64(b"pump\n17:pw"): "device id contains a control character",
            b64(b"pump:p\x1bw"): "password contains a control character",
            b64(b":pw"): "empty device id",
            b"": "no credentials after the scheme Basic",
            b"realm=x": "not one base64 value",
        }
        for response, reason in cases.items():
            self.assertIn(reason, self.malformed(response), response)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_any_bytes(self, response: bytes) -> None:
        """Any bytes after "Basic ": credentials or MalformedCredentials."""
        try:
            creds = self.decode(response)
        except MalformedCredentials:
            return
        self.assertTrue(credentials.IUsernamePassword.providedBy(creds))

    @FUZZ
    @given(st.binary(max_size=100))
    def test_any_decoded_bytes(self, decoded: bytes) -> None:
        """Any bytes, base64-encoded: the same."""
        try:
            creds = self.decode(base64.b64encode(decoded))
        except MalformedCredentials:
            return
        self.assertEqual(creds.username + b":" + creds.password, decoded)


class DigestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_800_000_000)
        self.factory = DigestCredentialFactory(b"r", b"k" * 32, self.clock.seconds)

    def challenge(self, host: str = "127.0.0.1") -> dict[str, str]:
        return {k: v.decode() for k, v in self.factory.getChallenge(request(host)).items()}

    def response(self, challenge: dict[str, str] | None = None, **override: str) -> dict[str, str]:
        c = challenge or self.challenge()
        fields = {
            "username": "pump-17", "realm": "r", "nonce": c["nonce"], "uri": URI, "qop": "auth",
            "nc": "00000001", "cnonce": "0a4f113b", "opaque": c["opaque"], "algorithm": "MD5",
        }
        ha1, ha2 = _md5("pump-17:r:pw"), _md5(f"POST:{URI}")
        fields["response"] = _md5(f"{ha1}:{fields['nonce']}:00000001:0a4f113b:auth:{ha2}")
        fields.update(override)
        return {k: v for k, v in fields.items() if v is not None}

    def header(self, fields: dict[str, str]) -> bytes:
        return ", ".join(f"{k}={_quote(v)}" for k, v in fields.items()).encode()

    def decode(self, fields: dict[str, str], host: str = "127.0.0.1") -> httpauth.DigestResponse:
        return self.factory.decode(self.header(fields), request(host))

    def test_valid(self) -> None:
        """A response to our challenge decodes, and its hash checks with H(A1)."""
        creds = self.decode(self.response())
        self.assertEqual((creds.username, creds.nc), (b"pump-17", 1))
        self.assertTrue(creds.checkHash(_md5("pump-17:r:pw").encode()))
        self.assertFalse(creds.checkHash(_md5("pump-17:r:guess").encode()))
        self.assertEqual(creds.expires_at, self.clock.seconds() + httpauth.NONCE_LIFETIME)

    def test_missing_or_odd_fields(self) -> None:
        """Each missing or ill-formed field is MalformedCredentials with its name."""
        cases = {
            "username": ({"username": None}, "no username"),
            "nonce": ({"nonce": None}, "no nonce"),
            "uri": ({"uri": None}, "no uri"),
            "response": ({"response": None}, "no response"),
            "realm": ({"realm": None}, "no realm"),
            "short response": ({"response": "abc"}, "not 32 hexadecimal digits"),
            "nc": ({"nc": "1"}, "nonce count nc"),
            "nc zero": ({"nc": "00000000"}, "nonce count nc"),
            "nc not hex": ({"nc": "0000000g"}, "nonce count nc"),
            "no cnonce": ({"cnonce": None}, "no cnonce"),
            "userhash": ({"userhash": "true"}, "userhash"),
            "control": ({"username": "pump\x1b[2J"}, "control character"),
        }
        for what, (override, reason) in cases.items():
            with self.assertRaises(MalformedCredentials, msg=what) as caught:
                self.decode(self.response(**override))
            self.assertIn(reason, caught.exception.reason, what)

    def test_opaque_not_ours(self) -> None:
        """opaque="x-abc" (a 500 in twisted.cred's parser) is a nonce refusal."""
        with self.assertRaises(InvalidNonce):
            self.decode(self.response(opaque="x-abc"))

    def test_nonce_not_ours(self) -> None:
        """A forged nonce, another key's nonce, another client's nonce, a nonce from the future."""
        other = DigestCredentialFactory(b"r", b"x" * 32, self.clock.seconds)
        theirs = {k: v.decode() for k, v in other.getChallenge(request()).items()}
        when, random, mac = self.challenge()["nonce"].split("-")
        for nonce in ("abc", "x-abc", f"{when}-{random}-{'0' * 64}", theirs["nonce"], f"{when}-{random}-{mac}-"):
            with self.assertRaises(InvalidNonce, msg=nonce):
                self.decode(self.response(nonce=nonce))
        with self.assertRaises(InvalidNonce):
            self.decode(self.response(), host="127.0.0.2")
        future = DigestCredentialFactory(b"r", b"k" * 32, lambda: self.clock.seconds() + 60)
        with self.assertRaises(InvalidNonce):
            self.decode(self.response(challenge={k: v.decode() for k, v in future.getChallenge(request()).items()}))

    def test_stale(self) -> None:
        """Our nonce after NONCE_LIFETIME seconds: StaleNonce."""
        fields = self.response()
        self.clock.advance(httpauth.NONCE_LIFETIME)
        self.decode(fields)
        self.clock.advance(1)
        with self.assertRaises(StaleNonce):
            self.decode(fields)

    @FUZZ
    @given(st.binary(max_size=600))
    def test_any_bytes(self, response: bytes) -> None:
        """Any bytes after "Digest ": a refusal of the expected kinds only."""
        try:
            self.factory.decode(response, request())
        except (MalformedCredentials, InvalidNonce, StaleNonce):
            pass

    @FUZZ
    @given(st.dictionaries(
        st.sampled_from(["username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce", "opaque",
                         "algorithm", "userhash", "username*", "stale"]),
        st.one_of(st.text(max_size=40), st.sampled_from(["00000001", "auth", "MD5", "0" * 32, "x-abc"])),
        max_size=13,
    ), st.booleans())
    def test_any_fields(self, override: dict[str, str], keep_nonce: bool) -> None:
        """Digest fields with any values over a real response: decoded or refused, never an error."""
        fields = self.response()
        fields.update(override)
        if keep_nonce:
            fields["nonce"] = self.response()["nonce"]
        try:
            creds = self.decode(fields)
        except (MalformedCredentials, InvalidNonce, StaleNonce):
            return
        creds.checkHash(b"0" * 32)  # computing the hash never fails either


class StoreNonceCountTests(TestCase):
    """The nonce counts the gateway uses: its store's."""

    async def test_in_the_store(self) -> None:
        """A count used through one StoreNonceCounts is refused through
        another on the same store file (as another process's would be); a
        higher one is accepted; the record keeps the nonce's expiry, in
        the store's spelling of times."""
        path = os.path.abspath(self.mktemp())
        stores = [SQLiteStore(path), SQLiteStore(path)]
        for store in stores:
            await store.start()
            self.addCleanup(store.close)
        one, other = (StoreNonceCounts(store) for store in stores)
        expires = 4102444800.0  # 2100-01-01
        self.assertTrue(await one.use("n", 1, expires))
        self.assertFalse(await other.use("n", 1, expires))
        self.assertTrue(await other.use("n", 2, expires))
        self.assertFalse(await one.use("n", 2, expires))

        def rows(txn: Any) -> Any:
            txn.execute("SELECT nonce, nc, expires_at FROM digest_nonce")
            return txn.fetchall()

        self.assertEqual(await stores[0]._run(rows), [("n", 2, "2100-01-01T00:00:00.000000+00:00")])


# -- over real TLS, curl as the client ------------------------------------------------------

DIGEST_URI = "/.well-known/est/digest/simpleenroll"
_b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731


class MalformedOverTLSTests(SecurityTestCase):
    """Malformed Authorization headers sent by curl to the Basic handler
    (label "") and the Digest handler (label digest): each a 401 with a
    fresh challenge, its reason code and reason, one audit line, and no
    certificate; never a 500."""

    async def setUp(self) -> None:
        await self.setUpGateway()
        await register(self.gateway)  # pump-17 / s3cret
        self.failures: list[dict] = []
        observer = lambda e: self.failures.append(e) if e.get("log_failure") or e.get("isError") else None  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    async def check(self, path: str, header: str, status: int, code: str, reason: str, scheme: str) -> None:
        self.audit.events.clear()
        result = await self.gateway.curl(path, data=csr_for("pump-17"), headers=[f"Authorization: {header}"])
        await self.assertRefused(result, status, code, reason)
        self.assertTrue(result.headers["www-authenticate"].startswith(scheme + " "), result.headers)
        self.assertEqual(self.failures, [])

    async def test_basic(self) -> None:
        """Bad base64, no colon, non-UTF-8 id or password, a scheme alone,
        another scheme, an over-long value."""
        cases = [
            ("Basic !!!", "malformed-credentials", "not one base64 value"),
            ("Basic ab=cd", "malformed-credentials", "not one base64 value"),
            ("Basic abcde", "malformed-credentials", "not base64"),
            ("Basic " + _b64(b"pump-17"), "malformed-credentials", "no ':' between the device id and the password"),
            ("Basic " + _b64(b"pump-17:s3cr\xffet"), "malformed-credentials", "the password is not UTF-8"),
            ("Basic " + _b64(b"\xffpump:s3cret"), "malformed-credentials", "the device id is not UTF-8"),
            ("Basic " + _b64(b"pump-17:s3\x1bcret"), "malformed-credentials", "control character"),
            ("Basic", "malformed-credentials", "no credentials after the scheme Basic"),
            ("Basic    ", "malformed-credentials", "no credentials after the scheme Basic"),
            ("Basic realm=x, user=y", "malformed-credentials", "not one base64 value"),
            ("Bearer eyJhbGciOiJub25lIn0", "wrong-auth-scheme", "this endpoint takes HTTP Basic authentication"),
            ('Digest username="pump-17"', "wrong-auth-scheme", "this endpoint takes HTTP Basic authentication"),
            ("Basic " + "QUFB" * 1100, "malformed-credentials", "longer than 4096 bytes"),
        ]
        for header, code, reason in cases:
            await self.check("simpleenroll", header, 401, code, reason, "Basic")

    async def test_digest(self) -> None:
        """The opaque value twisted.cred could not decode (a 500 before),
        missing and odd fields, a scheme alone, a token instead of
        parameters, an unclosed quote, a parameter given twice."""
        response = "0" * 32
        base = f'username="pump-17", realm="digest realm", uri="{DIGEST_URI}", response="{response}", qop=auth, nc=00000001, cnonce="c"'
        cases = [
            (f'Digest {base}, nonce="abc", opaque="x-abc"', "digest-nonce-invalid", "not made by this gateway"),
            (f'Digest {base}, nonce="1-2-3", opaque="x-abc"', "digest-nonce-invalid", "not made by this gateway"),
            ("Digest", "malformed-credentials", "no credentials after the scheme Digest"),
            ("Digest dXNlcjpwYXNz", "malformed-credentials", "parameters, not one token"),
            ('Digest username="pump-17"', "malformed-credentials", "has no realm"),
            ('Digest username="pump-17, realm=r', "malformed-credentials", "not closed"),
            (f'Digest {base}, nonce="a", nonce="b"', "malformed-credentials", "'nonce' is given twice"),
            (f'Digest {base.replace("00000001", "1")}, nonce="a"', "malformed-credentials", "nonce count nc"),
            ('Digest username="pump-17" realm="digest realm"', "malformed-credentials", "expected ','"),
            ("Digest ,,, ,", "malformed-credentials", "no credentials after the scheme Digest"),
            ("Basic cHVtcC0xNzpzM2NyZXQ=", "wrong-auth-scheme", "this endpoint takes HTTP Digest authentication"),
            ("Digest " + "x=y, " * 900, "malformed-credentials", "longer than 4096 bytes"),
        ]
        for header, code, reason in cases:
            await self.check("digest/simpleenroll", header, 401, code, reason, "Digest")

    async def test_not_utf8(self) -> None:
        """A raw byte that is not UTF-8 in a quoted value: 401 malformed-credentials."""
        # curl sends the argument's bytes as they are.
        await self.check("digest/simpleenroll", 'Digest username="pump\udcff17", realm="r"', 401,
                         "malformed-credentials", "the value of username is not UTF-8", "Digest")

    async def test_empty_header(self) -> None:
        """An empty Authorization header counts as none: the bare 401
        challenge (authentication-required), nothing issued."""
        result = await self.gateway.curl("simpleenroll", data=csr_for("pump-17"), headers=["Authorization;"])
        self.assertEqual(result.status, 401)
        self.assertEqual(result.headers["www-authenticate"], 'Basic realm="test realm"')
        self.assertEqual(self.audit.refused, ["authentication-required"])
        self.assertEqual(await self.gateway.store.count_certificates(), 0)

    async def test_header_line_too_long(self) -> None:
        """An Authorization header past the 16 KiB line limit
        (server.maxHeaderBytes): 400 at once (it hung until the idle timeout
        over TLS), nothing issued; a whole head past the limit: 431 (RFC
        6585 §5).  Each is one audit line."""
        for headers, status in (
            (["Authorization: Basic " + "A" * 20000], 400),
            (["X-A: " + "A" * 9000, "Authorization: Basic " + "A" * 9000], 431),
        ):
            result = await self.gateway.curl(
                "simpleenroll", data=csr_for("pump-17"), headers=headers, extra=["--max-time", "10"]
            )
            self.assertEqual(result.status, status, result.stderr)
        self.assertEqual(self.audit.refused, ["line-too-long", "header-too-large"])
        self.assertEqual(await self.gateway.store.count_certificates(), 0)
        self.assertEqual(self.failures, [])
