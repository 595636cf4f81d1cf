"""An issuing CA whose key lives in a PKCS#11 token (``tokenprocedure.<n>.ca = pkcs11``).

The gateway holds the issuing CA certificate and its chain (files); the
private key stays in the token (an HSM, or SoftHSM2 for tests) and every
signature is made there through the token's PKCS#11 module
(python-pkcs11).  The key is looked up by label and never read out.

cryptography signs certificates only with keys it holds itself, so a
certificate is made in three steps: cryptography builds it, signed with
a throw-away key of the same algorithm so that its TBSCertificate names
the right signature algorithm (RFC 5280 4.1.2.3); the token signs those
TBSCertificate bytes; the Certificate (RFC 5280 4.1.1) is assembled from
the TBSCertificate, the algorithm and the token's signature, and
verified with the issuing CA's public key before it is returned.

Supported keys: RSA (PKCS#1 v1.5, CKM_SHA256_RSA_PKCS and its SHA-384/512
kin: the token hashes) and EC (ECDSA: the digest is made here and signed
with CKM_ECDSA, whose raw r||s result is DER-encoded as RFC 5480 /
RFC 3279 2.2.3 ask).  The hash is the one the embedded CA would use for
a key of that type and size.

PKCS#11 sessions are not safe to share between threads, and a login
belongs to the whole process: one logged-in session per token, used
under a lock, on the token procedure's own threads (estgw.ca.threads), so
the reactor never waits for the token and a hung token holds no thread
of the reactor's pool.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any, NoReturn, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2560, rfc5280
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from estgw.ca import CAError, CASettingError, IssueRequest, ISigningCA, ITokenProcedure, Profile
from estgw.ca._files import _read, _utc, read_secret_file
from estgw.ca._der import _basic_response, _der_sequence, _signature_algorithm_der, assemble_ocsp_response, with_responses
from estgw.ca.signing import SigningCA
from estgw.ca.threads import CAThreads

__all__ = ["Pkcs11CA", "Pkcs11TokenProcedure", "open_token_key", "token_procedure"]

#: Text a CKR_* failure is reported with, for the codes an operator meets.
_HINTS = {
    "PinIncorrect": "the PIN was rejected",
    "PinLocked": "the PIN is locked (too many wrong PINs); unlock it with the token's SO PIN",
    "PinExpired": "the PIN has expired; set a new one",
    "PinLenRange": "the PIN has a length the token does not accept",
    "TokenNotPresent": "the token is not present",
}

# One loaded module per path: C_Initialize runs once per process.
_modules: dict[str, Any] = {}
_modules_lock = threading.Lock()


def _module(path: str) -> Any:
    import pkcs11

    with _modules_lock:
        if path not in _modules:
            try:
                _modules[path] = pkcs11.lib(path)
            except pkcs11.PKCS11Error as e:
                raise CASettingError("pkcs11.module", f"cannot load PKCS#11 module {path}: {e}") from None
        return _modules[path]


def _describe(error: Exception) -> str:
    name = type(error).__name__
    text = str(error).strip()
    return _HINTS.get(name) or (f"{name}: {text}" if text else name)


class _Login:
    """The one logged-in session this process has with a token.

    PKCS#11 logins belong to the application, not to a session, and a
    session must not be used by two threads at once: every token
    procedure on the same token shares this session and its lock.
    """

    def __init__(self, lib: Any, token_label: str, session: Any, pin: str) -> None:
        self.lib = lib
        self.token_label = token_label
        self.session = session
        self.pin = pin
        self.lock = threading.Lock()
        #: Counts sessions opened: key handles of an older one are void.
        self.generation = 0

    def reopen(self) -> None:
        """A new logged-in session after the old one was lost (token
        reinserted, HSM restarted).  Call with :attr:`lock` held; raises
        PKCS11Error when the token cannot be reached."""
        import pkcs11

        try:
            self.session.close()
        except pkcs11.PKCS11Error:
            pass  # it is gone already
        token = self.lib.get_token(token_label=self.token_label)
        try:
            self.session = token.open(user_pin=self.pin)
        except pkcs11.UserAlreadyLoggedIn:
            self.session = token.open()
        self.generation += 1


_logins: dict[tuple[str, str], _Login] = {}


def _login(lib: Any, module: str, token_label: str, pin: str) -> _Login:
    import pkcs11

    with _modules_lock:
        login = _logins.get((module, token_label))
        if login is not None:
            if login.pin != pin:
                raise CASettingError(
                    "pkcs11.pinFile",
                    f"token {token_label!r} is already in use here with another PIN; "
                    f"token procedures on one token must use the same PIN"
                )
            return login
        try:
            token = lib.get_token(token_label=token_label)
        except pkcs11.NoSuchToken:
            # SoftHSM and many HSMs show a free slot whose token has no label yet.
            labels = sorted({slot.get_token().label.strip() or "(unlabelled)"
                             for slot in lib.get_slots(token_present=True)})
            raise CASettingError(
                "pkcs11.token",
                f"no token labelled {token_label!r} in {module} (present: {', '.join(labels) or 'none'})",
            ) from None
        except pkcs11.MultipleTokensReturned:
            raise CASettingError("pkcs11.token", f"more than one token is labelled {token_label!r} in {module}") from None
        except pkcs11.PKCS11Error as e:
            raise CASettingError("pkcs11.token", f"token {token_label!r}: {_describe(e)}") from None
        try:
            session = token.open(user_pin=pin)
        except pkcs11.PKCS11Error as e:
            raise CASettingError("pkcs11.pinFile", f"cannot log in to token {token_label!r}: {_describe(e)}") from None
        login = _logins[(module, token_label)] = _Login(lib, token_label, session, pin)
        return login


def _find_key(login: _Login, key_label: str) -> Any:
    from pkcs11 import ObjectClass

    return login.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)


#: What a lost session looks like: reopen it once and sign again.
_SESSION_LOST = (
    "SessionHandleInvalid", "SessionClosed", "TokenNotPresent", "DeviceRemoved", "UserNotLoggedIn",
    "DeviceError",
)


def open_token_key(module: str, token_label: str, key_label: str, pin: str) -> tuple[Any, Any]:
    """Log in to the token labelled ``token_label`` and find the private key ``key_label``.

    Returns (login, private key object); ``login.lock`` must be held while
    the key is used.  Raises CAError saying which of module, token, PIN or
    key is at fault.
    """
    import pkcs11
    from pkcs11 import ObjectClass

    login = _login(_module(module), module, token_label, pin)
    with login.lock:
        try:
            key = _find_key(login, key_label)
        except pkcs11.NoSuchKey:
            raise CASettingError("pkcs11.keyLabel", f"token {token_label!r} holds no private key labelled {key_label!r}") from None
        except pkcs11.MultipleObjectsReturned:
            raise CASettingError(
                "pkcs11.keyLabel", f"token {token_label!r} holds more than one private key labelled {key_label!r}"
            ) from None
        except pkcs11.PKCS11Error as e:
            raise CASettingError("pkcs11.keyLabel", f"token {token_label!r}, key {key_label!r}: {_describe(e)}") from None
    return login, key


# --- certificates signed outside cryptography ---------------------------


def responder_key_hash(certificate: x509.Certificate) -> bytes:
    """RFC 6960 4.2.1 KeyHash: SHA-1 of the subjectPublicKey BIT STRING's value."""
    decoded, _ = der_decoder.decode(certificate.public_bytes(serialization.Encoding.DER), asn1Spec=rfc5280.Certificate())
    digest = hashes.Hash(hashes.SHA1())
    digest.update(decoded["tbsCertificate"]["subjectPublicKeyInfo"]["subjectPublicKey"].asOctets())
    return digest.finalize()


def with_responder_key(tbs: bytes, key_hash: bytes) -> bytes:
    """ResponseData ``tbs`` (RFC 6960 4.2.1) naming the responder by ``key_hash``."""
    data, _ = der_decoder.decode(tbs, asn1Spec=rfc2560.ResponseData())
    responder = data["responderID"]
    responder["byKey"] = responder["byKey"].clone(key_hash)
    return bytes(der_encoder.encode(data))


def assemble_certificate(tbs: bytes, algorithm: bytes, signature: bytes) -> x509.Certificate:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm,
    signatureValue BIT STRING } (RFC 5280 4.1.1) from DER parts."""
    value = bytes(der_encoder.encode(univ.BitString.fromOctetString(signature)))
    return x509.load_der_x509_certificate(_der_sequence(tbs + algorithm + value))


class _Scheme:
    """How the token signs for one kind of issuing key.

    The draft certificate is signed with a throw-away key of the same type
    (and curve), so the signature algorithm it names is the one the shared
    signing code picks for such a key; the token then signs with that same
    hash.  An RSA draft key is 1024 bits whatever the issuing key's size:
    the algorithm identifier does not depend on it, and the draft's
    signature, thrown away, then costs a fifth of a 2048-bit one.
    """

    _RSA_MECHANISMS = {"sha256": "SHA256_RSA_PKCS", "sha384": "SHA384_RSA_PKCS", "sha512": "SHA512_RSA_PKCS"}

    def __init__(self, public_key: Any) -> None:
        self.public_key = public_key
        if isinstance(public_key, rsa.RSAPublicKey):
            self.draft_key: Any = rsa.generate_private_key(65537, 1024)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            self.draft_key = ec.generate_private_key(public_key.curve)
        else:
            raise CAError(
                f"the issuing CA's key is {type(public_key).__name__}; a PKCS#11 issuing key must be RSA or EC"
            )
        self._algorithms: dict[str, bytes] = {}

    def algorithm(self, draft: Any) -> bytes:
        """The DER signatureAlgorithm of ``draft`` (cached by its kind and OID)."""
        key = f"{type(draft).__name__}:{draft.signature_algorithm_oid.dotted_string}"
        if key not in self._algorithms:
            self._algorithms[key] = _signature_algorithm_der(draft)
        return self._algorithms[key]

    def sign_in_token(self, key: Any, data: bytes, hash: hashes.HashAlgorithm) -> bytes:
        """A signature of ``data`` as X.509 carries it: PKCS#1 v1.5 bytes, or an ECDSA-Sig-Value."""
        from pkcs11 import Mechanism

        if isinstance(self.public_key, rsa.RSAPublicKey):
            name = self._RSA_MECHANISMS.get(hash.name)
            if name is None:
                raise CAError(f"no PKCS#11 RSA mechanism for {hash.name}")
            return bytes(key.sign(data, mechanism=getattr(Mechanism, name)))  # the token hashes
        from pkcs11.util.ec import encode_ecdsa_signature

        digest = hashes.Hash(hash)
        digest.update(data)
        raw = bytes(key.sign(digest.finalize(), mechanism=Mechanism.ECDSA))
        return bytes(encode_ecdsa_signature(raw))

    def verify(self, signature: bytes, data: bytes, hash: hashes.HashAlgorithm) -> None:
        """Raise InvalidSignature unless ``signature`` is the issuing key's over ``data``."""
        if isinstance(self.public_key, rsa.RSAPublicKey):
            self.public_key.verify(signature, data, padding.PKCS1v15(), hash)
        else:
            self.public_key.verify(signature, data, ec.ECDSA(hash))


@implementer(ISigningCA)
class Pkcs11CA(SigningCA):
    """An issuing CA certificate (and its chain) whose key is in a PKCS#11 token.

    Everything it signs (certificates, CRLs, OCSP responses: see
    :class:`~estgw.ca.signing.SigningCA`) is signed in the token, through
    :meth:`_signed`.  Synchronous and waiting for the token: call it off
    the reactor thread (see :class:`Pkcs11TokenProcedure`).  ``directory``
    is the gateway's own directory for this CA (its CRL).
    """

    def __init__(
        self,
        issuing: x509.Certificate,
        chain: list[x509.Certificate],
        login: Any,
        key: Any,
        where: str = "the token",
        directory: str = "",
    ) -> None:
        self.directory = directory
        self._stand_in: x509.Certificate | None = None
        self.issuing = issuing
        self._chain = [issuing] + [c for c in chain if c != issuing]
        self._key = key
        from pkcs11 import Attribute, KeyType

        self._key_label = key[Attribute.LABEL]
        self._login = login
        self._generation = login.generation
        self._lock = login.lock
        self._scheme = _Scheme(issuing.public_key())
        # A key that does not belong to the certificate stops start-up,
        # not the first enrollment.
        expected = KeyType.RSA if isinstance(issuing.public_key(), rsa.RSAPublicKey) else KeyType.EC
        if key.key_type != expected:
            raise CASettingError(
                "pkcs11.certificate",
                f"the private key in {where} does not belong to the issuing CA certificate "
                f"(the token's key is {key.key_type.name}, the certificate's {expected.name})",
            )
        probe = b"estgw: does the token key belong to the issuing CA certificate?"
        try:
            self._scheme.verify(self._token_sign(probe, hashes.SHA256()), probe, hashes.SHA256())
        except InvalidSignature:
            raise CASettingError(
                "pkcs11.certificate", f"the private key in {where} does not belong to the issuing CA certificate"
            ) from None
        if not _may_issue(issuing):
            raise CASettingError(
                "pkcs11.certificate",
                f"the issuing CA certificate {issuing.subject.rfc4514_string()} is not a CA "
                f"certificate allowed to sign certificates (basicConstraints cA, keyUsage keyCertSign)"
            )

    def chain(self) -> list[x509.Certificate]:
        """[issuing, ..., root]: what cacerts returns."""
        return list(self._chain)

    def _token_sign(self, data: bytes, hash: hashes.HashAlgorithm) -> bytes:
        import pkcs11

        with self._lock:  # one session, one thread at a time
            try:
                if self._generation != self._login.generation:
                    self._refind_key()
                return self._scheme.sign_in_token(self._key, data, hash)
            except pkcs11.PKCS11Error as e:
                if type(e).__name__ not in _SESSION_LOST:
                    raise CAError(f"the token could not sign: {_describe(e)}") from None
            # The session is gone: log in again once, then sign or fail.
            try:
                self._login.reopen()
                self._refind_key()
                return self._scheme.sign_in_token(self._key, data, hash)
            except pkcs11.PKCS11Error as e:
                raise CAError(f"the token could not sign: {_describe(e)}") from None

    def _refind_key(self) -> None:
        self._key = _find_key(self._login, self._key_label)
        self._generation = self._login.generation

    def issuers(self) -> list[SigningCA]:
        return [self]

    def sign_ocsp(self, builder: Any, more: Sequence[bytes] = ()) -> Any:
        """An OCSP response signed in the token as the CA itself (RFC 6960
        4.2.2.2).  cryptography wants the responder certificate to match
        the key it signs with: the draft names a stand-in of the issuing
        CA with the throw-away key, and :meth:`_signed` puts the issuing
        key's hash back before the token signs."""
        from cryptography.x509 import ocsp

        if self._stand_in is None:
            now = datetime.now(timezone.utc)
            self._stand_in = (
                x509.CertificateBuilder().subject_name(self.issuing.subject).issuer_name(self.issuing.subject)
                .public_key(self._issuing_key.public_key()).serial_number(1)
                .not_valid_before(now).not_valid_after(now + timedelta(days=1))
                .sign(self._issuing_key, hashes.SHA256())
            )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, self._stand_in)
        return self._signed(builder, ocsp_response=True, more=more)

    def _signed(self, builder: Any, ocsp_response: bool = False, more: Sequence[bytes] = ()) -> Any:
        """Build with the throw-away key, then sign the to-be-signed bytes in
        the token and put that signature in; verified with the issuing CA's
        public key before it is returned (CAError when the token fails)."""
        draft = SigningCA._signed(self, builder, ocsp_response)
        hash = draft.signature_hash_algorithm
        if hash is None:  # pragma: no cover - RSA and ECDSA always name one
            raise CAError("the draft names no hash algorithm")
        algorithm = self._scheme.algorithm(draft)
        if isinstance(draft, x509.Certificate):
            tbs = draft.tbs_certificate_bytes
            signed: Any = assemble_certificate(tbs, algorithm, self._token_sign(tbs, hash))
        elif isinstance(draft, x509.CertificateRevocationList):
            tbs = draft.tbs_certlist_bytes
            signed = x509.load_der_x509_crl(_der_sequence(
                tbs + algorithm + bytes(der_encoder.encode(univ.BitString.fromOctetString(self._token_sign(tbs, hash))))
            ))
        else:
            # Named by the issuing key's hash, not the draft key's.
            tbs = with_responses(with_responder_key(draft.tbs_response_bytes, responder_key_hash(self.issuing)), more)
            signed = assemble_ocsp_response(draft, tbs, algorithm, self._token_sign(tbs, hash))
        try:
            self._scheme.verify(signed.signature, tbs, hash)
        except InvalidSignature as e:
            raise CAError("the token's signature does not verify with the issuing CA certificate") from e
        return signed


    # What the embedded CA's sign() uses of its instance: the issuing
    # certificate, the key it signs the draft with (the throw-away one:
    # never hand this object to code that signs something it keeps, such
    # as a CRL), the RSA padding and the authority key identifier.
    rsa_padding = "pkcs1v15"

    @property  # the draft key, never a key of the CA
    def _issuing_key(self) -> Any:  # type: ignore[override]
        return self._scheme.draft_key

    @property
    def signs_quickly(self) -> bool:
        """Never: a call into the token may wait on it (a busy or hung
        HSM), so it is never made on the reactor thread."""
        return False

    def authority_key_identifier(self) -> x509.AuthorityKeyIdentifier:
        try:
            ski = self.issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        except x509.ExtensionNotFound:
            ski = x509.SubjectKeyIdentifier.from_public_key(self.issuing.public_key())
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)

    _authority_key_identifier = authority_key_identifier

    @property
    def key_id(self) -> str:
        """Hex of the issuing CA's key identifier (``{ca}`` in profile URLs)."""
        return self.authority_key_identifier().key_identifier.hex()  # type: ignore[union-attr]


def _may_issue(certificate: x509.Certificate) -> bool:
    try:
        if not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return certificate.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True  # RFC 5280 4.2.1.3: without keyUsage every use is allowed


#: Seconds told to devices in Retry-After when the token cannot sign.
RETRY_AFTER = 60


@implementer(ITokenProcedure)
class Pkcs11TokenProcedure:
    """Issue with a :class:`Pkcs11CA` under one :class:`Profile`, on the procedure's own threads."""

    _log = Logger()

    def __init__(
        self, name: str, ca: Pkcs11CA, profile: Profile, reactor: Any = None, threads: CAThreads | None = None
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.name = name
        self.ca = ca
        self.profile = profile
        self._reactor = reactor
        # Every token call runs here, not on the reactor's pool (estgw.ca.threads).
        self.threads = threads if threads is not None else CAThreads(reactor, name, 4)

    def __repr__(self) -> str:
        return f"<Pkcs11TokenProcedure {self.name!r}>"

    def issue(self, request: IssueRequest) -> "Deferred[x509.Certificate]":
        """Sign in the token on a pool thread; the Deferred fires in the reactor thread.

        A token that cannot sign (gone, even after logging in again) is a
        503 Refusal with Retry-After for the device: nothing was issued.
        """
        signing = self.threads.run(self.ca.sign, request, self.profile)
        return signing.addErrback(self._unavailable)

    def _unavailable(self, failure: Failure) -> NoReturn:
        from estgw.refusal import Refusal

        failure.trap(CAError)
        self._log.error("token procedure {name}: {error}", name=self.name, error=str(failure.value))
        raise Refusal(
            503, "ca-unavailable", "the CA cannot sign now; try again later", {"Retry-After": str(RETRY_AFTER)}
        )

    def chain(self) -> list[x509.Certificate]:
        return self.ca.chain()

    def issuers(self) -> list[SigningCA]:
        """The CA whose CRL and OCSP answers the publishing listener serves."""
        return self.ca.issuers()


def _certificates(path: str, key: str) -> list[x509.Certificate]:
    try:
        data = _read(path)
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except (ValueError, CAError) as e:
        raise CASettingError(key, f"no PEM or DER certificate in {path} ({e})") from None


def token_procedure(procedure: Any, context: Any) -> Pkcs11TokenProcedure:
    """``tokenprocedure.<n>.ca = pkcs11`` (see :mod:`estgw.ca.factory`):
    logs in and checks key and certificate now, so that a wrong PIN or a
    missing key stops start-up; CASettingError names the setting."""
    from estgw.ca.factory import ca_threads, profile_of

    certificates = _certificates(procedure.pkcs11_certificate, "pkcs11.certificate")
    chain = _certificates(procedure.pkcs11_chain, "pkcs11.chain") if procedure.pkcs11_chain else []
    pin = read_secret_file(procedure.pkcs11_pin_file, "pkcs11.pinFile", "the token's user PIN")
    login, key = open_token_key(procedure.pkcs11_module, procedure.pkcs11_token, procedure.pkcs11_key_label, pin)
    where = f"token {procedure.pkcs11_token!r} (key {procedure.pkcs11_key_label!r})"
    from estgw.ca._files import _ensure_directory
    from estgw.ca.file import state_directory

    directory = state_directory(context.config, procedure.name)
    _ensure_directory(directory)
    ca = Pkcs11CA(certificates[0], certificates[1:] + chain, login, key, where, directory)
    return Pkcs11TokenProcedure(
        procedure.name, ca, profile_of(procedure), reactor=context.reactor, threads=ca_threads(procedure, context)
    )
