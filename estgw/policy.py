"""Formats: the checks and rewrites applied to a PKCS#10 request.

Each check is a small pure function of a :class:`PolicyContext` that
raises :class:`Refusal` with a named code, or returns.  A format is an
ordered tuple of checks (:data:`FORMATS`); the enrollment pipeline runs
the handler's format, then :func:`issue_request` builds what the CA signs.
Checks that need the store (revocation, last issued) live in
:mod:`estgw.enroll`.

The SAN/CN copy rules are applied first, by
:func:`build_context`, so every check that compares names sees what
would be issued: a renewal of a certificate whose SAN was copied from
its CN must still match.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
from typing import Callable

import attr
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from estgw import factory, names
from estgw.auth import Identity
from estgw.csrattrs import csr_matches_template
from estgw.ca import IssueRequest
from estgw.config import HandlerConfig
from estgw.refusal import Refusal

MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)

UNSTRUCTURED_NAME = ObjectIdentifier("1.2.840.113549.1.9.2")
UNSTRUCTURED_ADDRESS = ObjectIdentifier("1.2.840.113549.1.9.8")
CHALLENGE_PASSWORD = AttributeOID.CHALLENGE_PASSWORD
CMC_RA = ObjectIdentifier("1.3.6.1.5.5.7.3.28")  # id-kp-cmcRA
ANY_EKU = ObjectIdentifier("2.5.29.37.0")
UB_COMMON_NAME = 64



@attr.s(frozen=True, auto_attribs=True)
class ChannelBinding:
    """The TLS channel binding of the connection a request came on."""

    kind: str  # "tls-unique" (TLS 1.2) or "tls-exporter" (TLS 1.3, RFC 9266)
    value: bytes


@attr.s(frozen=True, auto_attribs=True)
class PolicyContext:
    operation: str
    handler: HandlerConfig
    identity: Identity
    csr: x509.CertificateSigningRequest
    # What would be issued, after the SAN/CN copy rules.
    subject: x509.Name = attr.ib(factory=lambda: x509.Name([]))
    sans: tuple[x509.GeneralName, ...] = ()
    channel_binding: ChannelBinding | None = None


Check = Callable[[PolicyContext], None]


def _policy(code: str, reason: str) -> Refusal:
    return Refusal(403, code, reason)


# -- names: the SAN/CN copy rules ---------------------------------------------


def sans_of(item: x509.CertificateSigningRequest | x509.Certificate) -> list[x509.GeneralName]:
    try:
        return list(item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return []


def _text_attribute(csr: x509.CertificateSigningRequest, oid: ObjectIdentifier) -> str | None:
    """A PKCS#9 attribute, from the subject DN or from the CSR attributes."""
    in_subject = csr.subject.get_attributes_for_oid(oid)
    if in_subject:
        value = in_subject[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    try:
        raw = csr.attributes.get_attribute_for_oid(oid).value
    except x509.AttributeNotFound:
        return None
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)


def _name_as_san(text: str) -> x509.GeneralName | None:
    """A host name or address as a SAN; None when it is neither (e.g. "Jane Doe")."""
    text = text.strip()
    try:
        return x509.IPAddress(ipaddress.ip_address(text))
    except ValueError:
        pass
    host = text[:-1] if text.endswith(".") else text
    if names.is_host_name(host):
        return x509.DNSName(host)
    return None


def _copy_rules(
    subject: x509.Name,
    sans: list[x509.GeneralName],
    unstructured_name: str | None,
    unstructured_address: str | None,
) -> tuple[x509.Name, tuple[x509.GeneralName, ...]]:
    has_host_san = any(isinstance(n, (x509.DNSName, x509.IPAddress)) for n in sans)
    if not has_host_san:
        added: list[x509.GeneralName] = []
        source = unstructured_name
        common_names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if source is None and common_names and isinstance(common_names[0].value, str):
            source = common_names[0].value
        if source:
            name = _name_as_san(source)
            if name is not None:
                added.append(name)
        if unstructured_address:
            added.append(x509.IPAddress(ipaddress.ip_address(unstructured_address.strip())))
        sans = sans + [n for n in added if n not in sans]
    if not subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        # A dNSName may be 253 characters, a commonName only 64 (RFC 5280
        # ub-common-name): copy the first that fits, if any.
        dns = [
            n.value for n in sans
            if isinstance(n, x509.DNSName) and len(n.value) <= UB_COMMON_NAME and names.is_host_name(n.value)
        ]
        if dns:
            cn = x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COMMON_NAME, dns[0])])
            subject = x509.Name(list(subject.rdns) + [cn])
    return subject, tuple(sans)


def copied_names(csr: x509.CertificateSigningRequest) -> tuple[x509.Name, tuple[x509.GeneralName, ...]]:
    """With neither a dNSName nor an iPAddress SAN, dNSName comes
    from unstructuredName (else commonName) and iPAddress from
    unstructuredAddress; with no commonName, commonName comes from the
    dNSName.  SANs the request already has are left alone."""
    address = _text_attribute(csr, UNSTRUCTURED_ADDRESS)
    if address:
        try:
            ipaddress.ip_address(address.strip())
        except ValueError:
            raise Refusal(
                400, "csr-bad-unstructured-address",
                f"unstructuredAddress {address.strip()[:60]!r} is not an IP address",
            ) from None
    return _copy_rules(csr.subject, sans_of(csr), _text_attribute(csr, UNSTRUCTURED_NAME), address)


def certificate_names(cert: x509.Certificate) -> tuple[x509.Name, tuple[x509.GeneralName, ...]]:
    """The same rules applied to a certificate, so that a certificate some
    other CA issued without copying still matches a renewal of itself."""

    def subject_text(oid: ObjectIdentifier) -> str | None:
        values = cert.subject.get_attributes_for_oid(oid)
        return str(values[0].value) if values else None

    address = subject_text(UNSTRUCTURED_ADDRESS)
    if address:
        try:
            ipaddress.ip_address(address.strip())
        except ValueError:
            address = None
    return _copy_rules(cert.subject, sans_of(cert), subject_text(UNSTRUCTURED_NAME), address)


def build_context(
    operation: str,
    handler: HandlerConfig,
    identity: Identity,
    csr: x509.CertificateSigningRequest,
    channel_binding: ChannelBinding | None = None,
) -> PolicyContext:
    subject, sans = copied_names(csr)
    return PolicyContext(
        operation=operation, handler=handler, identity=identity, csr=csr,
        subject=subject, sans=sans, channel_binding=channel_binding,
    )


def _matching_form(value: object) -> str:
    """A name value as RFC 4518 compares it: case folded, insignificant
    space removed (leading, trailing, runs inside)."""
    return " ".join(str(value).split()).casefold()


def _common_names(name: x509.Name) -> set[str]:
    return {_matching_form(a.value) for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)}


def _same_name(a: x509.Name, b: x509.Name) -> bool:
    def form(name: x509.Name) -> list[tuple[str, str]]:
        return sorted((attribute.oid.dotted_string, _matching_form(attribute.value)) for attribute in name)

    return form(a) == form(b)


def renews_own_subject(ctx: PolicyContext) -> bool:
    """Whether the request is a certificate holder renewing its own subject.

    The one place that decides it, for every operation, label and filter:
    a client certificate (an officer's too: an officer asking for its own
    name renews itself) asking for the subject it already holds, after the
    SAN/CN copy rules and compared as RFC 4518 matches names (case and
    insignificant space ignored), or for a subject carrying its
    commonName.  Not a renewal: a password login, a registered factory
    certificate bootstrapping a device, a certificate asking for another
    name where its format allows that.  A simplereenroll always is one
    (its subject match guarantees it); a simpleenroll is one too, and
    gets the same renewal rules (RFC 7030 §4.2.2).
    """
    identity = ctx.identity
    if identity.kind != "certificate" or identity.certificate is None:
        return False
    held = certificate_names(identity.certificate)[0]
    if _same_name(held, ctx.subject):
        return True
    return bool(_common_names(held) & _common_names(ctx.subject))


# -- the checks ------------------------------------------------------------------


# Hashes a CSR signature may use: SHA-2 and SHA-3 (Ed25519/Ed448 name none).
STRONG_SIGNATURE_HASHES = (
    hashes.SHA224, hashes.SHA256, hashes.SHA384, hashes.SHA512,
    hashes.SHA3_224, hashes.SHA3_256, hashes.SHA3_384, hashes.SHA3_512,
)
_HASH_NAMES = {"sha1": "SHA-1", "md5": "MD5", "sha512-224": "SHA-512/224", "sha512-256": "SHA-512/256"}


def csr_signature_valid(ctx: PolicyContext) -> None:
    """Proof of possession: the CSR is signed by the key it carries, with
    an algorithm this gateway accepts.

    Refusals (400): ``csr-unsupported-signature-algorithm`` naming the
    algorithm when its hash is weak (SHA-1, MD5, ...) or unknown;
    ``csr-bad-signature`` when the signature does not verify.  A handler
    with ``acceptSha1CsrSignature = true`` accepts a SHA-1 signature as
    proof of possession (older routers cannot sign otherwise); the CA
    still signs the certificate with its own hash.  SHA-1 is verified
    here with the public key: cryptography's ``is_signature_valid``
    refuses it for ECDSA and RSA PKCS#1 v1.5.
    """
    if ctx.operation == "serverkeygen":
        return  # RFC 7030 §4.4.1: the server ignores the CSR's key and signature
    csr = ctx.csr
    try:
        algorithm = csr.signature_hash_algorithm
    except UnsupportedAlgorithm:  # an OID cryptography does not know
        raise _unsupported_signature(csr, None) from None
    if isinstance(algorithm, hashes.SHA1) and ctx.handler.accept_sha1_csr_signature:
        valid = _sha1_signature_verifies(csr)
    elif algorithm is not None and not isinstance(algorithm, STRONG_SIGNATURE_HASHES):
        raise _unsupported_signature(csr, algorithm)
    else:
        try:
            valid = csr.is_signature_valid
        except Exception:  # e.g. a key and signature of different kinds
            valid = False
    if not valid:
        raise Refusal(400, "csr-bad-signature", "the CSR signature does not verify")


def _unsupported_signature(csr: x509.CertificateSigningRequest, algorithm: hashes.HashAlgorithm | None) -> Refusal:
    oid = csr.signature_algorithm_oid
    name = oid._name if oid._name != "Unknown OID" else oid.dotted_string
    if algorithm is None:
        reason = f"the CSR signature algorithm {name} is not supported: sign it with SHA-256 or stronger"
    else:
        hash_name = _HASH_NAMES.get(algorithm.name, algorithm.name.upper())
        reason = f"the CSR is signed with {name} ({hash_name}), which is not accepted: sign it with SHA-256 or stronger"
    return Refusal(400, "csr-unsupported-signature-algorithm", reason)


def _sha1_signature_verifies(csr: x509.CertificateSigningRequest) -> bool:
    """Verify a SHA-1 CSR signature with the CSR's public key."""
    key = csr.public_key()
    signature, data = csr.signature, csr.tbs_certrequest_bytes
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA1()))
        elif isinstance(key, rsa.RSAPublicKey):
            # RSASSA-PSS carries its parameters; sha1WithRSAEncryption is PKCS#1 v1.5.
            parameters = csr.signature_algorithm_parameters
            key.verify(signature, data, parameters or padding.PKCS1v15(), hashes.SHA1())  # type: ignore[arg-type]
        else:
            return False
    except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
        return False
    return True


def key_acceptable(ctx: PolicyContext) -> None:
    """RSA of at least 2048 bits, NIST P-256/384/521, Ed25519 or Ed448."""
    if ctx.operation == "serverkeygen":
        return  # the server makes the key that is certified
    try:
        key = ctx.csr.public_key()
    except Exception:
        raise Refusal(400, "csr-unsupported-key", "the CSR public key type is not supported") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise Refusal(
                400, "csr-weak-key",
                f"RSA keys must be at least {MIN_RSA_BITS} bits, this one has {key.key_size}",
            )
        exponent = key.public_numbers().e
        if exponent < 65537 or exponent % 2 == 0:
            # Small exponents have a history of padding attacks (RFC 8017 §3.1 advice).
            raise Refusal(400, "csr-weak-key", f"RSA public exponent {exponent} is not accepted; use 65537")
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise Refusal(400, "csr-unsupported-curve", f"the curve {key.curve.name} is not accepted")
        return
    if isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        return
    raise Refusal(400, "csr-unsupported-key", "the CSR public key type is not supported")


def describe_public_key(key: object) -> str:
    """A public key as an operator reads it: ``RSA 2048``, ``EC secp256r1``,
    ``Ed25519``, ``Ed448``."""
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def has_subject(ctx: PolicyContext) -> None:
    """A certificate must name something: a subject or a SAN."""
    # After the copy rules: an unstructuredName alone is enough.
    if len(ctx.subject) == 0 and not ctx.sans:
        raise Refusal(400, "csr-no-subject", "the CSR has neither a subject nor a subjectAltName")


def subject_well_formed(ctx: PolicyContext) -> None:
    """Every subject attribute is a name in the sense of RFC 5280
    (:mod:`estgw.names`): ``400 csr-bad-subject`` naming it otherwise."""
    names.check_subject(ctx.subject)


def sans_well_formed(ctx: PolicyContext) -> None:
    """Every subjectAltName is well formed (:mod:`estgw.names`): no
    address range, no empty or malformed dNSName, ...: ``400 csr-bad-san``."""
    names.check_sans(ctx.sans)


def no_cmc_ra(ctx: PolicyContext) -> None:
    """The id-kp-cmcRA extended key usage is not used here."""
    try:
        ekus = ctx.csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if CMC_RA in ekus:
        raise _policy(
            "csr-requests-cmcra",
            "requests for the id-kp-cmcRA extended key usage are denied; RA clients use an officer certificate",
        )


def challenge_password(ctx: PolicyContext) -> None:
    """Denied by default; with channelBinding on, required and
    equal to the base64 tls-unique / tls-exporter value of this connection."""
    try:
        raw = ctx.csr.attributes.get_attribute_for_oid(CHALLENGE_PASSWORD).value
    except x509.AttributeNotFound:
        raw = None
    if not ctx.handler.channel_binding:
        if raw is not None:
            raise _policy(
                "challenge-password-not-supported",
                "challengePassword attribute not supported: remove it from the CSR",
            )
        return
    if raw is None:
        raise _policy(
            "channel-binding-missing",
            "this endpoint requires the TLS channel binding (RFC 7030 §3.5) in the challengePassword attribute",
        )
    binding = ctx.channel_binding
    if binding is None:
        raise _policy("channel-binding-unavailable", "the TLS connection offers no channel binding value")
    given = raw if isinstance(raw, bytes) else str(raw).encode("utf-8")
    expected = base64.b64encode(binding.value)
    if not hmac.compare_digest(given.strip(), expected):
        raise _policy(
            "channel-binding-mismatch",
            f"the challengePassword is not the {binding.kind} value of this TLS connection",
        )


def client_certificate_has_client_auth(ctx: PolicyContext) -> None:
    """A client certificate used to enroll carries id-kp-clientAuth."""
    cert = ctx.identity.certificate
    if cert is None or ctx.identity.kind == "device":
        return
    try:
        ekus = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        # A registered factory certificate (IDevID) often has no EKU at all,
        # which RFC 5280 reads as unrestricted; every other client
        # certificate must name clientAuth.
        if ctx.identity.kind == "factory":
            return
        ekus = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.CLIENT_AUTH not in ekus and ANY_EKU not in ekus:
        raise _policy(
            "client-certificate-not-client-auth",
            "the TLS client certificate lacks the Client Authentication extended key usage",
        )


def subject_matches_client_certificate(ctx: PolicyContext) -> None:
    """RFC 7030 §4.2.2: the request names the same subject and
    SANs as the client certificate.  Officer/RA identities are excepted."""
    if ctx.identity.acting_as_officer:
        return
    # A password login names no subject of its own: device_names
    # holds it to its registered id instead.
    if ctx.identity.kind == "device":
        return
    cert = ctx.identity.certificate
    if ctx.identity.kind not in ("certificate", "factory") or cert is None:
        raise Refusal(
            403, "client-certificate-required",
            "this operation is authenticated by the current certificate: present it as the TLS client certificate",
        )
    cert_subject, cert_sans = certificate_names(cert)
    if ctx.subject != cert_subject:
        raise _policy(
            "subject-mismatch",
            f"the CSR subject {ctx.subject.rfc4514_string()!r} differs from the client "
            f"certificate subject {cert.subject.rfc4514_string()!r}",
        )
    if set(ctx.sans) != set(cert_sans):
        raise _policy("san-mismatch", "the CSR subjectAltNames differ from those of the client certificate")


def factory_certificate_matches_request(ctx: PolicyContext) -> None:
    """On a handler whose token procedure uses factory certificates, the
    request comes from a registered factory certificate; what it may be
    called is :func:`device_names`' matter."""
    if ctx.handler.factory is None:
        return
    if ctx.identity.kind != "factory" or ctx.identity.registration is None:
        raise _policy("factory-certificate-required", "this endpoint needs a registered factory certificate")


def _own_common_name(ctx: PolicyContext, own: str) -> None:
    names_ = ctx.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    factory_login = ctx.identity.kind == "factory"
    code = "factory-cn-mismatch" if factory_login else "subject-not-registered"
    whose = "the one registered with the factory certificate" if factory_login else "the registered device id"
    # A second CN (another RDN, or a multi-valued one) would be the name
    # verifiers that read the last CN see.
    if len(names_) > 1:
        raise _policy(code, f"the CSR must carry exactly one commonName, {own!r}, {whose}")
    requested = factory.common_name(ctx.subject)
    if requested != own:
        if factory_login:
            raise _policy(code, f"the CSR commonName {requested!r} is not {own!r}, {whose}")
        raise _policy(code, f"the CSR commonName must be {whose} {own!r}")


def device_names(ctx: PolicyContext) -> None:
    """What a password or factory device may be called: its own id and
    the names registered for it, each registered value at most once.

    The id is the commonName (the device id, or the ``--cn`` registered
    with a factory certificate), exactly once, and the dNSName (or
    iPAddress) the SAN/CN copy rules make of it.  Every other subject
    attribute and subjectAltName must match a registered value
    (``device add --subject-value NAME=VALUE`` / ``--san KIND:VALUE``; an
    empty registered value matches any one value of its kind), and each
    registered value is used at most once.  ``deviceNames = any`` widens
    the rule to any other well-formed subject attribute, dNSName,
    iPAddress, rfc822Name or URI.  Never issued to a device: a
    directoryName, otherName or registeredID, or a wildcard dNSName that is
    not registered.  With a factory token procedure's
    ``enroll.check-subject-values = true`` the registered values must also
    be present.  Refusals: ``subject-not-registered`` /
    ``factory-cn-mismatch`` (the id), ``subject-value-mismatch`` (a required
    value missing), ``registered-value-repeated``, ``san-not-allowed``,
    ``subject-not-registered`` / ``san-not-registered`` (a name not
    registered), all 403.
    """
    identity = ctx.identity
    if identity.kind not in ("device", "factory"):
        return
    device = identity.registration
    own = device.expected_common_name if device is not None else identity.device_id
    registered = device.subject_values if device is not None else ()
    if own is None:
        raise _policy("subject-not-registered", "the request names no registered device")
    _own_common_name(ctx, own)
    settings = ctx.handler.factory
    if identity.kind == "factory" and settings is not None and settings.check_subject_values:
        mismatch = factory.subject_value_mismatch(registered, ctx.subject, ctx.sans)
        if mismatch is not None:
            raise _policy("subject-value-mismatch", mismatch)

    widened = ctx.handler.device_names == "any"
    unused = list(registered)
    used: list[tuple[str, str]] = []

    def claim(name: str, value: str) -> bool:
        # An exact registration first, then an empty (any-value) one.
        for wanted in (True, False):
            for index, (n, v) in enumerate(unused):
                if n == name and (factory.same_value(n, v, value) if wanted else not v):
                    used.append(unused.pop(index))
                    return True
        return False

    def repeated(name: str, value: str) -> bool:
        return any(n == name and (not v or factory.same_value(n, v, value)) for n, v in used)

    who = f"device {identity.device_id!r}"
    for attribute in ctx.subject:
        if attribute.oid == NameOID.COMMON_NAME:
            continue
        name = factory.registration_name(attribute.oid)
        value = str(attribute.value)
        if claim(name, value):
            continue
        described = f"{names.attribute_name(attribute.oid)} {names.shown(value)}"
        if repeated(name, value):
            raise _policy(
                "registered-value-repeated",
                f"the subject attribute {described} appears more than once; a registered value is issued once",
            )
        if not widened:
            raise _policy("subject-not-registered", f"the subject attribute {described} is not registered for {who}")

    own_san = _name_as_san(own)
    own_entry = factory.san_entry(own_san) if own_san is not None else None
    for san in ctx.sans:
        entry = factory.san_entry(san)
        if own_entry is not None and entry is not None and entry[0] == own_entry[0] \
                and factory.same_value(entry[0], own_entry[1], entry[1]):
            own_entry = None  # the id's own dNSName, once
            continue
        described = names.describe_general_name(san)
        if entry is None:
            raise _policy("san-not-allowed", f"a {type(san).__name__} subjectAltName ({described}) is not issued to a device")
        if claim(*entry):
            continue
        if repeated(*entry):
            raise _policy(
                "registered-value-repeated",
                f"the subjectAltName {described} appears more than once; a registered value is issued once",
            )
        if isinstance(san, x509.DNSName) and "*" in san.value:
            raise _policy(
                "san-not-allowed", f"a wildcard dNSName ({described}) is issued to a device only when registered for it"
            )
        if not widened:
            raise _policy("san-not-registered", f"the subjectAltName {described} is not registered for {who}")


_COMMON: tuple[Check, ...] = (
    csr_signature_valid,
    key_acceptable,
    has_subject,
    subject_well_formed,
    sans_well_formed,
    no_cmc_ra,
    challenge_password,
    client_certificate_has_client_auth,
    # On every format: follows the token procedure, not the format.
    factory_certificate_matches_request,
    # Every format: whatever the handler, a device is held to its names.
    device_names,
    csr_matches_template,
)

FORMATS: dict[str, tuple[Check, ...]] = {
    "est-simpleenroll": _COMMON,
    "est-simpleenroll-subjectmatch": _COMMON + (subject_matches_client_certificate,),
    "est-simplereenroll": _COMMON + (subject_matches_client_certificate,),
    "est-simpleenroll-idm": _COMMON,
}


def run_format(ctx: PolicyContext) -> None:
    for check in FORMATS[ctx.handler.format]:
        check(ctx)


def issue_request(ctx: PolicyContext) -> IssueRequest:
    """What the CA signs: the subject, key and SANs after the copy rules,
    each name in the encoding RFC 5280 asks for (:mod:`estgw.names`:
    UTF8String or the request's PrintableString for a DirectoryString,
    PrintableString for countryName and serialNumber, IA5String for
    emailAddress and domainComponent)."""
    return IssueRequest(
        subject=names.check_subject(ctx.subject),
        public_key=ctx.csr.public_key(),
        sans=names.check_sans(ctx.sans),
        csr=ctx.csr.public_bytes(Encoding.DER),
    )
