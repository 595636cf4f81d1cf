"""``est.properties`` → frozen, typed configuration.

Every error names the key and the reason, and unknown keys are errors: a
typo must never silently switch a check off.  Nothing here knows Twisted
or HTTP; :func:`load` is called by ``twistd estgw`` and by the CLI, and
:func:`from_string` by tests.

Layout of the file (see ``etc/est.properties`` for the commented version):

* global keys (``server.*``, ``state.directory``, ``store.url``, ``ca.*``,
  ``tls.*``, ``allowRenewalWithOldCertificates``);
* ``tokenprocedure.<n>.*``: named CA profiles that handlers refer to;
* ``default.*``: handler keys applied to every handler that does not set
  them itself;
* ``handler.<n>.*``: one EST operation (and optional CA label) each.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import unquote, urlsplit

import attr

from estgw import keytypes, names
from estgw.ca.factory import KINDS
from estgw.ca.keys import KEY_TYPES, RSA_PADDINGS
from estgw.csrattrs import CsrTemplate, parse_template_setting
from estgw.properties import PropertiesError, parse_properties
from estgw.protocol import CsrAttr, parse_csrattrs_setting

OPERATIONS = (
    "cacerts",
    "simpleenroll",
    "simplereenroll",
    "csrattrs",
    "serverkeygen",
    "fullcmc",
)
# Operations that issue a certificate (serverkeygen for a key it makes).
ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll", "serverkeygen")

# Who may call a handler (see estgw.auth).
FILTERS = {
    "public": "anyone; for cacerts and csrattrs",
    "clientcert": "a TLS client certificate that chains to a trust anchor",
    "device": "a TLS client certificate, or HTTP auth of a pre-registered device",
    "registersimpleenroll-basic-idm-auth": (
        "HTTP auth of a pre-registered device, then operator approval"
    ),
}
# Which checks and rewrites apply to the request (see estgw.policy).
FORMATS = (
    "est-simpleenroll",
    "est-simpleenroll-subjectmatch",
    "est-simplereenroll",
    "est-simpleenroll-idm",
)
# The same formats for a handler bound to CoAPs, in the model product's
# naming (RFC 9148): estcoaps-<x> is est-<x> on a CoAPs handler.
COAPS_FORMAT_PREFIX = "estcoaps-"
COAPS_FORMATS = tuple(
    COAPS_FORMAT_PREFIX + name[len("est-"):] for name in FORMATS if name != "est-simpleenroll-idm"
)
# Where a handler is served: EST over HTTPS (RFC 7030), over CoAPs
# (RFC 9148, the coaps.* listener) or both.
TRANSPORTS = ("https", "coaps", "both")
DEFAULT_FILTER = {
    "cacerts": "public",
    "csrattrs": "public",
    "simpleenroll": "device",
    "simplereenroll": "clientcert",
    "serverkeygen": "device",
    "fullcmc": "device",
}


def default_format(operation: str, filter: str, procedure: "TokenProcedureConfig | None") -> str:
    """The format of an enrollment handler that names none: the strict one.

    A client certificate on simpleenroll may only ask for its own subject
    unless the handler says otherwise (est-simpleenroll) or the client is
    an officer; a factory certificate does not carry the request's subject,
    and approval handlers have their own format.
    """
    if operation == "simplereenroll":
        return "est-simplereenroll"
    if filter == "registersimpleenroll-basic-idm-auth":
        return "est-simpleenroll-idm"
    if procedure is not None and procedure.use_authentication_cert:
        return "est-simpleenroll"
    return "est-simpleenroll-subjectmatch"


# RFC 3986 §3.3 pchar, less pct-encoded: unreserved / sub-delims / ":" / "@".
_LABEL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@-]+\Z")
_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class ConfigError(ValueError):
    """The configuration cannot be used; ``key`` names where."""

    def __init__(self, key: str, reason: str, source: str = "") -> None:
        self.key = key
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {reason}")


# -- value parsers: each takes the raw string and raises ValueError -------


def _text(value: str) -> str:
    return value.strip()


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "on", "1"):
        return True
    if lowered in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, not {value!r}")


# -- numbers: every numeric key is read by these two ------------------------
#
# Python's int() and float() also take "1_0", "+5", "1e3", "inf" and digits
# of any script ("٥٠"): a value an operator cannot read the way the
# gateway does.  Only ASCII digits here, with a "-" so that the range
# check can say what a negative value should have been.
_WHOLE = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def whole_number(value: str) -> int:
    """A whole number written in ASCII decimal digits (``0042`` is 42),
    optionally negative; surrounding blanks are ignored.

    :raises ValueError: ``expected a whole number (digits 0-9), not '1_0'``.
    """
    text = value.strip()
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"expected a whole number (digits 0-9), not {text!r}")
    return int(text)


def decimal_number(value: str, what: str = "a number") -> float:
    """A number written in ASCII decimal digits with an optional fraction
    (``1``, ``0.5``, ``.5``), optionally negative; no exponent, ``inf`` or
    ``nan``.

    :raises ValueError: ``expected <what> (digits 0-9 and a '.'), not '1e3'``.
    """
    text = value.strip()
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"expected {what} (digits 0-9 and a '.'), not {text!r}")
    return float(text)


def _int_within(low: int, high: int | None = None, unit: str = "", zero: str = "") -> Callable[[str], int]:
    """A whole number from ``low`` to ``high`` (None: no upper bound); with
    ``zero``, 0 is allowed too and means that (``no cap``)."""

    def amount(number: int) -> str:
        # "1 day", "4096 bytes"
        return f"{number} {unit[:-1] if number == 1 else unit}" if unit else str(number)

    def parse(value: str) -> int:
        number = whole_number(value)
        if zero and number == 0:
            return 0
        if number < low:
            if zero:
                more = "or more" if low == 1 else f"or at least {amount(low)}"
                raise ValueError(f"must be 0 ({zero}) {more}, not {number}")
            raise ValueError(f"must be at least {amount(low)}, not {number}")
        if high is not None and number > high:
            raise ValueError(f"must be at most {amount(high)}, not {number}")
        return number

    return parse


_positive_int = _int_within(1)
_non_negative_int = _int_within(0)


def _port(value: str) -> int:
    # 0 asks the system for a free port (tests, several instances).
    number = _int_within(1, zero="a free port")(value)
    if number > 65535:
        raise ValueError(f"not a TCP port: {number}")
    return number


def _interface(value: str) -> str:
    """``localhost`` (127.0.0.1 and ::1), empty (every IPv4 address) or a
    comma-separated list of IP addresses (``::``: every address)."""
    text = value.strip()
    for item in (i.strip() for i in text.split(",")) if text else ():
        if item.lower() == "localhost":
            continue
        try:
            ipaddress.ip_address(item.removeprefix("[").removesuffix("]"))
        except ValueError:
            raise ValueError(f"not an IP address or 'localhost': {item!r}") from None
    return text


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _est_url(value: str) -> str:
    """An https URL of an EST server's base path (RFC 7030 3.2.2):
    ``/.well-known/est`` or ``/.well-known/est/<label>``."""
    text = value.strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme.lower() != "https" or not parts.hostname:
        raise ValueError(f"expected an https URL with a host, not {text!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"expected a URL without query or fragment, not {text!r}")
    path = parts.path
    base = "/.well-known/est"
    label = path[len(base) + 1:] if path.startswith(base + "/") else ""
    if path != base and not (label and _LABEL.match(label)):
        raise ValueError(f"expected the path {base} or {base}/<label>, not {path or '/'!r}")
    return text


def _hostnames(value: str) -> tuple[str, ...]:
    """Names for the gateway's TLS certificate: IP addresses or dNSNames
    (estgw.names rules, a wildcard allowed)."""
    items = _list(value)
    for item in items:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            try:
                names.check_dns_name(item)
            except names.BadName as e:
                raise ValueError(f"{e}: not an IP address either") from None
    return items


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        for option in allowed:
            if value.strip().lower() == option.lower():
                return option
        raise ValueError(
            f"must be one of {', '.join(allowed)}, not {value.strip()!r}"
        )

    return parse


def _label(value: str) -> str:
    """An RFC 7030 §3.2.2 CA label: one RFC 3986 path segment, kept decoded.

    Any pchar is allowed (``ca:1``, ``ra@site``, ``a+b``); a
    percent-encoded form is read as what it encodes (``ca%3A1`` is
    ``ca:1``), and requests are routed on the decoded form too.  Refused:
    characters a segment cannot hold, ``.`` and ``..`` (clients remove
    them before sending, RFC 3986 §5.2.4), and the name of an operation
    (RFC 7030 §3.2.2: the label cannot be one of the operation path
    segments).
    """
    label = value.strip()
    if not label:
        return label
    if _PERCENT.search(label):
        raise ValueError(f"'%' must start a percent-encoded octet (%XX): {label!r}")
    decoded = unquote(label, errors="replace")
    if not _LABEL.match(decoded):
        raise ValueError(
            f"not a valid URL path segment (RFC 3986 §3.3: letters, digits and - . _ ~ ! $ & ' ( ) * + , ; = : @): {label!r}"
        )
    if decoded in (".", ".."):
        raise ValueError(f"{label!r} is a dot-segment, which clients remove from paths before sending")
    if decoded.lower() in OPERATIONS:
        raise ValueError(f"{label!r} is the name of an EST operation (RFC 7030 §3.2.2)")
    return decoded


def _csrattrs(value: str) -> tuple[CsrAttr, ...]:
    return parse_csrattrs_setting(value)


def _seconds(value: str) -> float:
    number = decimal_number(value, "a number of seconds")
    if not 0 < number <= 86400:
        raise ValueError(f"must be more than 0 and at most 86400 seconds, not {number:g}")
    return number


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _hours(value: str) -> int:
    """A duration in hours, or with a unit: ``72``, ``72h``, ``30m``, ``2d``, ``90s``."""
    text = value.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    try:
        seconds = round(decimal_number(number) * (unit or 3600))
    except ValueError:
        raise ValueError(f"expected hours (or a number with s, m, h or d; digits 0-9), not {value.strip()!r}") from None
    if seconds < 1:
        raise ValueError(f"must be at least 1 second, not {value.strip()!r}")
    if seconds > 366 * 86400:
        raise ValueError(f"must be at most 366 days, not {value.strip()!r}")
    return seconds


def _nonempty(value: str) -> str:
    text = value.strip()
    if not text:
        raise ValueError("must not be empty (remove the line for the default)")
    return text


def _security_level(value: str) -> int:
    """An OpenSSL security level, 0 (anything) to 5 (256-bit)."""
    if value.strip() not in ("0", "1", "2", "3", "4", "5"):
        raise ValueError(f"expected an OpenSSL security level 0 to 5, not {value.strip()!r}")
    return int(value)


_workers = _int_within(1, 64)


def _limit_seconds(value: str) -> float:
    """A deadline a client must meet: 1 second to a day (less would fail
    requests on any real network, and 0 is not "off")."""
    number = decimal_number(value, "a number of seconds")
    if not 1 <= number <= 86400:
        raise ValueError(f"must be from 1 to 86400 seconds, not {number:g}")
    return number


# The request limits' bounds (README, Hardening): below them every normal
# EST request would be refused; above the upper ones what one connection
# holds while its request arrives is no longer small (an EST body is a
# CSR of a few KiB).
MIN_REQUEST_BYTES = 1024
MAX_REQUEST_BYTES = 1048576
MIN_HEADERS = 16
MAX_HEADERS = 1000
MIN_HEADER_BYTES = 1024
MAX_HEADER_BYTES = 65536
# No process holds more descriptors than Linux's fs.nr_open (by default
# 1048576), so no more connections can be open at once.
MAX_CONNECTIONS = 1048576
# Each overdue call holds one of its token procedure's threads (as many
# as ca.maxOverdue; estgw.ca.threads).
MAX_OVERDUE = 64


# 0: estgw never rotates log.file (logrotate does).
_log_bytes = _int_within(4096, 2**40, "bytes", zero="never rotate")


def _scrypt_n(value: str) -> int:
    number = _positive_int(value)
    if number & (number - 1) or not 2**10 <= number <= 2**20:
        raise ValueError(f"must be a power of two from 1024 to 1048576, not {number}")
    return number


_cache_seconds = _int_within(0, 3600, "seconds")


def _ocsp(value: str) -> str:
    """``off``, ``aia`` (the certificate's AuthorityInformationAccess) or a responder URL."""
    text = value.strip()
    if text.lower() in ("off", "aia"):
        return text.lower()
    scheme, _, rest = text.partition("://")
    if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ValueError(f"expected off, aia or an http(s) URL, not {text!r}")
    return text


def _url(value: str) -> str:
    """An http(s) or ldap URL with a host, as relying parties fetch it
    (RFC 5280 4.2.1.13, 4.2.2.1)."""
    text = value.strip()
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https", "ldap") or not parts.hostname:
        raise ValueError(f"expected an http, https or ldap URL with a host, not {text!r}")
    if any(c.isspace() for c in text):
        raise ValueError(f"a URL has no spaces: {text!r}")
    return text


_ROLE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


def role_name(value: str) -> str:
    """An officer role: letters, digits, ``_ . -``; ``none`` is reserved."""
    role = value.strip()
    if not _ROLE.match(role):
        raise ValueError(f"not a role name (letters, digits, _ . -): {role!r}")
    if role.lower() == "none":
        raise ValueError("'none' is not a role: it means no role is needed")
    return role


def _roles(value: str) -> tuple[str, ...]:
    """``none`` → () (any certificate of this gateway's CA), else role names."""
    items = _list(value)
    if [item.lower() for item in items] == ["none"]:
        return ()
    if not items:
        raise ValueError("expected none or a comma list of officer roles")
    if any(item.lower() == "none" for item in items):
        raise ValueError("none cannot be combined with roles")
    return tuple(dict.fromkeys(role_name(item) for item in items))


# -- the typed result ------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class FileCASettings:
    """Where one issuing CA of ``ca = file`` is: ``prefix`` is its keys'
    common part after ``tokenprocedure.<n>.`` (``file.`` or
    ``file.previous.<m>.``), for messages."""

    prefix: str
    certificate: str = ""
    chain: str = ""
    key: str = ""
    key_password_file: str = ""
    key_password_env: str = ""
    number: str = ""


@attr.s(frozen=True, auto_attribs=True)
class TokenProcedureConfig:
    """A CA profile (the product's "token procedure")."""

    key: str
    name: str
    ca: str = "local"
    validity_days: int = 365
    key_usage: str = "digitalSignature, keyEncipherment"
    extended_key_usage: str = "clientAuth"
    # Factory (authentication) certificates on simpleenroll.
    # mandatorypassword defaults to false: the factory key (an IDevID kept
    # in hardware) is the authenticator, the password an optional second
    # factor.  check-subject-values defaults to true: values an operator
    # registered are meant to be checked, and an empty one matches anything.
    use_authentication_cert: bool = False
    mandatory_password: bool = False
    check_subject_values: bool = True
    # Put into issued certificates: CRL distribution point and AIA.
    crl_url: str = ""
    ocsp_url: str = ""
    ca_issuers_url: str = ""
    # Who signs the OCSP responses of the publishing listener: the CA
    # itself, or a delegated responder certificate it issues (RFC 6960 4.2.2.2).
    ocsp_responder: str = "ca"
    # ca = file: the operator's issuing CA (paths resolved against the
    # config file's directory); the key's passphrase from a file or an
    # environment variable, never from the config itself.
    file_certificate: str = ""
    file_chain: str = ""
    file_key: str = ""
    file_key_password_file: str = ""
    file_key_password_env: str = ""
    # Earlier issuing CAs after a rollover (file.previous.<m>.*).
    file_previous: tuple[FileCASettings, ...] = ()

    @property
    def file_settings(self) -> FileCASettings:
        return FileCASettings(
            "file.", self.file_certificate, self.file_chain, self.file_key,
            self.file_key_password_file, self.file_key_password_env,
        )
    # ca = pkcs11: the issuing key in a PKCS#11 token, found by token and
    # key label; the PIN from a file; the issuing CA certificate and its
    # chain from files (paths resolved against the config file's directory).
    pkcs11_module: str = ""
    pkcs11_token: str = ""
    pkcs11_key_label: str = ""
    pkcs11_pin_file: str = ""
    pkcs11_certificate: str = ""
    pkcs11_chain: str = ""
    # ca = est: another EST server's base URL (…/.well-known/est[/label]),
    # the RA's PKCS#12 client token and the file holding its password, the
    # CA files that verify the upstream (empty: the system's trust store).
    est_url: str = ""
    est_token: str = ""
    est_token_password_file: str = ""
    est_trust_anchors: tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class FactoryAuthConfig:
    """What a simpleenroll handler demands of a factory certificate, taken
    from its token procedure's ``estenroll.*``/``enroll.*`` keys."""

    mandatory_password: bool = False
    check_subject_values: bool = True


@attr.s(frozen=True, auto_attribs=True)
class HandlerConfig:
    """One EST operation (and optional CA label) and how it is served."""

    id: str
    operation: str
    label: str = ""
    filter: str = ""
    format: str = ""
    token_procedure: str = ""
    authtype: str = ""
    realm: str | None = None
    qop: str = "auth"
    csrattrs: tuple[CsrAttr, ...] = ()
    # RFC 9908 template: on a csrattrs handler its own setting; on an
    # enrollment handler the one announced under the same CA label, which
    # its requests are checked against (estgw.csrattrs).
    csr_template: CsrTemplate | None = None
    # serverkeygen: the key type made, and whether the private key may be
    # returned without CMS encryption (TLS only).
    serverkeygen_key_type: str = ""
    serverkeygen_allow_unencrypted_key: bool = False
    # Shared AES keys a CSR may name with DecryptKeyIdentifier: the file
    # (resolved against the config file's directory) and its (id, key) pairs.
    serverkeygen_shared_keys_file: str = ""
    serverkeygen_shared_keys: tuple[tuple[bytes, bytes], ...] = attr.ib(default=(), repr=False)
    allow_renewal_with_old_certificates: bool = False
    # RFC 7030 §3.5 linking: the CSR's challengePassword must carry the
    # connection's tls-unique (TLS 1.2) or tls-exporter (TLS 1.3) value.
    channel_binding: bool = False
    # A SHA-1 CSR signature is accepted as proof of possession (older
    # routers sign no other way); off: refused as an unsupported algorithm.
    accept_sha1_csr_signature: bool = False
    # Officer/RA handler: None = not one; () = "none", any
    # certificate this gateway's CA issued; else the client certificate
    # must hold at least one of these roles (estgw officer add).
    required_ro_roles: tuple[str, ...] | None = None
    # Which client certificates count here: "local" (issued by this
    # gateway's CA) or "any" (also those of tls.trustAnchors CAs).
    client_certificate_issuers: str = ""
    # What a password or factory device may be called besides its id:
    # "registered" (only the names registered for it) or "any" (also any
    # other well-formed name; see estgw.policy.device_names).
    device_names: str = "registered"
    # Set (from the token procedure) when simpleenroll needs a registered
    # factory certificate.
    factory: FactoryAuthConfig | None = None
    # Manual approval (filter registersimpleenroll-basic-idm-auth):
    # the approval service's URL, the PKCS#12 client token (path resolved
    # against the config file's directory) and its password, the CA files
    # that verify the service (empty: the system's trust store).
    idm_request_url: str = ""
    idm_token: str = ""
    idm_password: str = attr.ib(default="", repr=False)
    idm_trust_anchors: tuple[str, ...] = ()
    idm_timeout: float = 10.0  # seconds per call to the service
    idm_retry_after: int = 60  # seconds, told to devices in Retry-After
    idm_pending_lifetime: int = 72 * 3600  # seconds an undecided request lives
    # "https", "coaps" or "both" (TRANSPORTS); empty: https.
    transport: str = ""

    @property
    def transports(self) -> tuple[str, ...]:
        if self.transport == "both":
            return ("https", "coaps")
        return (self.transport or "https",)

    @property
    def path(self) -> str:
        prefix = "/.well-known/est/"
        return prefix + (f"{self.label}/" if self.label else "") + self.operation


@attr.s(frozen=True, auto_attribs=True)
class Config:
    source: str  # the file it came from, for messages
    state_directory: str
    port: int = 8443
    interface: str = "localhost"
    hostnames: tuple[str, ...] = ()
    max_request_bytes: int = 65536
    store_url: str = "sqlite:estgw.sqlite"
    ca_name: str = "estgw"
    trust_anchor_files: tuple[str, ...] = ()
    # Revocation beyond the store (estgw.revocation): CRL files, what a
    # stale CRL means, and OCSP.
    crl_files: tuple[str, ...] = ()
    crl_stale: str = "hard"
    ocsp: str = "off"
    ocsp_timeout: float = 5.0
    ocsp_cache_seconds: int = 300
    # GET /metrics (Prometheus text) on its own plain-HTTP listener; None: off.
    metrics_port: int | None = None
    metrics_interface: str = "127.0.0.1"
    # Processes serving the one listening socket (estgw.workers).
    workers: int = 1
    # Every connection starts with a PROXY protocol header (v1 or v2) from
    # a TCP load balancer, naming the client.
    proxy_protocol: bool = False
    # The human log (estgw.logs): a file rotated by size, how many rotated
    # files are kept (0 bytes: never rotated by estgw), and the least level
    # written.  None: twistd's --logfile, which estgw writes the same way,
    # or standard output.
    log_file: str | None = None
    log_max_bytes: int = 10 * 1024 * 1024
    log_max_files: int = 10
    log_level: str = "info"
    # Password checks (estgw.passwords): the scrypt cost of new hashes and
    # how long a successful check is remembered (0: never).
    scrypt_n: int = 2**14
    password_cache_seconds: int = 60
    # estgw_certificates_expiring counts certificates expiring within this many days.
    metrics_expiring_days: int = 30
    ocsp_failure: str = "hard"
    # How long a consumed single-use registration may fetch again the
    # certificate its first enrollment got (same key): a device whose
    # connection dropped after issuing is not locked out.  0: never.
    single_use_refetch_seconds: int = 900
    # OpenSSL cipher list (TLS 1.2), TLS 1.3 suites, groups, security
    # level: empty strings take estgw.tls's defaults (checked at load).
    tls_ciphers: str = ""
    tls_ciphersuites: str = ""
    tls_groups: str = ""
    tls_security_level: int = 2
    # Keys: the local CA's (ca.keyType, only on creation) and the gateway's
    # TLS key (tls.keyType; None keeps what tls/server.key holds); how RSA
    # CA keys sign; the local CA keys' passphrase (file or environment).
    ca_key_type: str = "ec-p256"
    tls_key_type: str | None = None
    ca_rsa_padding: str = "pkcs1v15"
    ca_key_password_file: str = ""
    ca_key_password_env: str = ""
    # CRLs and OCSP for relying parties on their own plain-HTTP listener;
    # None: off.  CRLs are valid for publish_crl_hours and re-signed when
    # half of that is gone or a certificate was revoked.
    publish_port: int | None = None
    publish_interface: str = "127.0.0.1"
    publish_crl_hours: int = 24
    # EST over CoAPs (RFC 9148) on this UDP port; None: off.
    coaps_port: int | None = None
    coaps_interface: str = ""
    # Limits (README, Hardening): seconds for the request head from its
    # first byte, for the body after the head, and of silence on a kept-
    # alive connection; header fields (count, bytes with the request
    # line); open connections in all and per client IP address (0: no cap).
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 60.0
    max_headers: int = 100
    max_header_bytes: int = 16384
    max_connections: int = 1024
    max_connections_per_client: int = 64
    # Enrollments waiting for or inside a token procedure, and how long
    # one may take, before 503 + Retry-After.
    ca_max_queued: int = 32
    ca_timeout: float = 30.0
    # Calls of one token procedure still running past ca.timeout (each may
    # hold a pool thread) at which its new enrollments are refused at once.
    ca_max_overdue: int = 4
    # One JSON object per line for each issuance, refusal and operator
    # action (estgw.audit); "" = none.
    audit_file: str = ""
    token_procedures: Mapping[str, TokenProcedureConfig] = attr.Factory(dict)
    handlers: tuple[HandlerConfig, ...] = ()

    @property
    def ca_directory(self) -> str:
        return os.path.join(self.state_directory, "ca")

    @property
    def tls_directory(self) -> str:
        return os.path.join(self.state_directory, "tls")

    @property
    def store_path(self) -> str | None:
        """The SQLite file, relative to the state directory; None for a
        PostgreSQL store."""
        if not self.store_url.startswith("sqlite:"):
            return None
        path = self.store_url[len("sqlite:"):].strip()
        return os.path.join(self.state_directory, os.path.expanduser(path))

    @property
    def store_location(self) -> str:
        """``store.url`` with a SQLite path made absolute: what
        :func:`estgw.store.open_store` opens."""
        path = self.store_path
        return self.store_url if path is None else "sqlite:" + path

    @property
    def ca_certificate_path(self) -> str:
        return os.path.join(self.ca_directory, "root-ca.pem")

    @property
    def last_issued_rule(self) -> bool:
        """Whether only the certificate issued last for a subject may renew it.

        ``allowRenewalWithOldCertificates = true`` on any enrollment handler
        turns the rule on for the whole gateway: a subject has one
        last-issued certificate however it was obtained, so a holder of an
        older one must not get around the rule through another operation,
        label or filter (see :func:`estgw.policy.renews_own_subject`).
        """
        return any(
            h.allow_renewal_with_old_certificates for h in self.handlers if h.operation in ENROLL_OPERATIONS
        )

    def handler(self, label: str, operation: str, transport: str = "https") -> HandlerConfig | None:
        """The handler serving ``operation`` under ``label`` on ``transport``
        (``https`` or ``coaps``), or None."""
        for handler in self.handlers:
            if handler.label == label and handler.operation == operation and transport in handler.transports:
                return handler
        return None


# key → (attribute, parser) tables; a new setting is one row here.
_GLOBAL_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "server.port": ("port", _port),
    "server.interface": ("interface", _interface),
    "server.hostnames": ("hostnames", _hostnames),
    "server.maxRequestBytes": ("max_request_bytes", _int_within(MIN_REQUEST_BYTES, MAX_REQUEST_BYTES, "bytes")),
    "state.directory": ("state_directory", _text),
    "store.url": ("store_url", _text),
    "ca.name": ("ca_name", _text),
    "tls.trustAnchors": ("trust_anchor_files", _list),
    "tls.crls": ("crl_files", _list),
    "tls.crl.stale": ("crl_stale", _choice("hard", "soft")),
    "tls.ocsp": ("ocsp", _ocsp),
    "tls.ocsp.timeout": ("ocsp_timeout", _seconds),
    "tls.ocsp.cacheSeconds": ("ocsp_cache_seconds", _int_within(0, 86400, "seconds")),
    "tls.ocsp.failure": ("ocsp_failure", _choice("hard", "soft")),
    "singleUse.refetchSeconds": ("single_use_refetch_seconds", _int_within(0, 86400, "seconds")),
    "tls.ciphers": ("tls_ciphers", _nonempty),
    "tls.ciphersuites": ("tls_ciphersuites", _nonempty),
    "tls.groups": ("tls_groups", _nonempty),
    "tls.securityLevel": ("tls_security_level", _security_level),
    "server.headerTimeout": ("header_timeout", _limit_seconds),
    "server.bodyTimeout": ("body_timeout", _limit_seconds),
    "server.idleTimeout": ("idle_timeout", _limit_seconds),
    "server.maxHeaders": ("max_headers", _int_within(MIN_HEADERS, MAX_HEADERS)),
    "server.maxHeaderBytes": ("max_header_bytes", _int_within(MIN_HEADER_BYTES, MAX_HEADER_BYTES, "bytes")),
    "server.maxConnections": ("max_connections", _int_within(1, MAX_CONNECTIONS, zero="no cap")),
    "server.maxConnectionsPerClient": ("max_connections_per_client", _int_within(1, MAX_CONNECTIONS, zero="no cap")),
    "ca.maxQueued": ("ca_max_queued", _int_within(1, 65536)),
    "ca.timeout": ("ca_timeout", _seconds),
    "ca.maxOverdue": ("ca_max_overdue", _int_within(1, MAX_OVERDUE)),
    "log.audit.file": ("audit_file", _text),
    "metrics.port": ("metrics_port", _port),
    "metrics.interface": ("metrics_interface", _interface),
    "server.workers": ("workers", _workers),
    "server.proxyProtocol": ("proxy_protocol", _bool),
    "log.file": ("log_file", _nonempty),
    "log.maxBytes": ("log_max_bytes", _log_bytes),
    "log.maxFiles": ("log_max_files", _int_within(1, 1000)),
    "log.level": ("log_level", _choice("debug", "info", "warn", "error", "critical")),
    "auth.scrypt.n": ("scrypt_n", _scrypt_n),
    "auth.passwordCacheSeconds": ("password_cache_seconds", _cache_seconds),
    "ca.keyType": ("ca_key_type", _choice(*KEY_TYPES)),
    "tls.keyType": ("tls_key_type", _choice(*KEY_TYPES)),
    "ca.rsaPadding": ("ca_rsa_padding", _choice(*RSA_PADDINGS)),
    "ca.keyPasswordFile": ("ca_key_password_file", _text),
    "ca.keyPasswordEnv": ("ca_key_password_env", _text),
    "publish.port": ("publish_port", _port),
    "publish.interface": ("publish_interface", _interface),
    "publish.crl.nextUpdateHours": ("publish_crl_hours", _int_within(1, 8784, "hours")),
    "coaps.port": ("coaps_port", _port),
    "coaps.interface": ("coaps_interface", _text),
    "metrics.expiringDays": ("metrics_expiring_days", _int_within(1, 3660, "days")),
}
_TOKEN_PROCEDURE_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "name": ("name", _text),
    "ca": ("ca", _choice(*KINDS)),
    "validity.days": ("validity_days", _int_within(1, 36525, "days")),
    "keyusage": ("key_usage", _text),
    "extendedkeyusage": ("extended_key_usage", _text),
    "estenroll.use-authentication-cert": ("use_authentication_cert", _bool),
    "enroll.mandatorypassword": ("mandatory_password", _bool),
    "enroll.check-subject-values": ("check_subject_values", _bool),
    "crl.url": ("crl_url", _url),
    "ocsp.url": ("ocsp_url", _url),
    "caIssuers.url": ("ca_issuers_url", _url),
    "ocsp.responder": ("ocsp_responder", _choice("ca", "delegated")),
    "file.certificate": ("file_certificate", _text),
    "file.chain": ("file_chain", _text),
    "file.key": ("file_key", _text),
    "file.keyPasswordFile": ("file_key_password_file", _text),
    "file.keyPasswordEnv": ("file_key_password_env", _text),
    "pkcs11.module": ("pkcs11_module", _text),
    "pkcs11.token": ("pkcs11_token", _text),
    "pkcs11.keyLabel": ("pkcs11_key_label", _text),
    "pkcs11.pinFile": ("pkcs11_pin_file", _text),
    "pkcs11.certificate": ("pkcs11_certificate", _text),
    "pkcs11.chain": ("pkcs11_chain", _text),
    "est.url": ("est_url", _est_url),
    "est.token": ("est_token", _text),
    "est.tokenPasswordFile": ("est_token_password_file", _text),
    "est.trustAnchors": ("est_trust_anchors", _list),
}
# file.previous.<m>.<key>: an earlier issuing CA of ca = file (rollover).
_FILE_PREVIOUS = re.compile(r"^file\.previous\.([0-9]+)\.(certificate|chain|key|keyPasswordFile|keyPasswordEnv)\Z")
_FILE_SETTING_FIELDS = {
    "certificate": "certificate", "chain": "chain", "key": "key",
    "keyPasswordFile": "key_password_file", "keyPasswordEnv": "key_password_env",
}
# Keys that only mean something for one kind of token procedure.
_KIND_KEYS = {"file.": "file", "pkcs11.": "pkcs11", "est.": "est"}
# What the other kinds need (ca = file is checked in _check_kind).
_KIND_REQUIRED = {
    "pkcs11": ("pkcs11.module", "pkcs11.token", "pkcs11.keyLabel", "pkcs11.pinFile", "pkcs11.certificate"),
    "est": ("est.url", "est.token"),
}
# Paths: relative to the config file's directory, and must exist.
_TOKEN_PROCEDURE_FILES = {
    "file.certificate": "file_certificate",
    "file.chain": "file_chain",
    "file.key": "file_key",
    "file.keyPasswordFile": "file_key_password_file",
    "pkcs11.module": "pkcs11_module",
    "pkcs11.pinFile": "pkcs11_pin_file",
    "pkcs11.certificate": "pkcs11_certificate",
    "pkcs11.chain": "pkcs11_chain",
    "est.token": "est_token",
    "est.tokenPasswordFile": "est_token_password_file",
    "est.trustAnchors": "est_trust_anchors",
}
_HANDLER_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "operation": ("operation", _choice(*OPERATIONS)),
    "label": ("label", _label),
    "filter": ("filter", _choice(*FILTERS)),
    "format": ("format", _choice(*FORMATS, *COAPS_FORMATS)),
    "transport": ("transport", _choice(*TRANSPORTS)),
    "tokenprocedure": ("token_procedure", _text),
    "authtype": ("authtype", _choice("Basic", "Digest")),
    "realm": ("realm", lambda value: value.strip()),
    "qop": ("qop", _choice("auth")),
    "csrattrs": ("csrattrs", _csrattrs),
    "csrattrs.template": ("csr_template", parse_template_setting),
    "serverkeygen.keyType": ("serverkeygen_key_type", keytypes.parse_key_type),
    "serverkeygen.allowUnencryptedKey": ("serverkeygen_allow_unencrypted_key", _bool),
    "serverkeygen.sharedKeys": ("serverkeygen_shared_keys_file", _text),
    "allowRenewalWithOldCertificates": (
        "allow_renewal_with_old_certificates",
        _bool,
    ),
    "channelBinding": ("channel_binding", _bool),
    "acceptSha1CsrSignature": ("accept_sha1_csr_signature", _bool),
    "requiredRoRoles": ("required_ro_roles", _roles),
    "clientCertificateIssuers": ("client_certificate_issuers", _choice("local", "any")),
    "deviceNames": ("device_names", _choice("registered", "any")),
    "idm.requestUrl": ("idm_request_url", _text),
    "idm.tls.token": ("idm_token", _text),
    "idm.tls.password": ("idm_password", _text),
    "idm.tls.trustAnchors": ("idm_trust_anchors", _list),
    "idm.timeout": ("idm_timeout", _seconds),
    "idm.retryAfter": ("idm_retry_after", _int_within(1, 86400, "seconds")),
    "idm.pendingLifetime": ("idm_pending_lifetime", _hours),
}
# Handler keys that may also stand alone at the top level (as in the
# model product's est.properties) and then act like default.<key>.
_TOP_LEVEL_HANDLER_KEYS = ("allowRenewalWithOldCertificates",)

_NUMBERED = re.compile(r"^(handler|tokenprocedure)\.([0-9]+)\.(.+)\Z")


def default_hostnames() -> tuple[str, ...]:
    defaults = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    # A host name that is no dNSName (e.g. with '_') stays out of the certificate.
    if host and host not in defaults and names.is_host_name(host):
        defaults.append(host)
    return tuple(defaults)


def _parse(key: str, parser: Callable[[str], Any], value: str, source: str) -> Any:
    try:
        return parser(value)
    except ValueError as e:
        raise ConfigError(key, str(e), source) from None


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def from_string(text: str, source: str = "est.properties", base_dir: str = ".",
                options: Mapping[str, tuple[str, str]] | None = None) -> Config:
    """Parse the text of an est.properties file; relative paths are
    taken relative to ``base_dir``.

    ``options``: command-line options that take the place of a key, as
    ``{"server.workers": ("--workers", "2")}``: read by the key's own
    parser and applied before any check that involves the key, so that
    every check sees the value that will be used.  An error about such a
    value names the option.

    :raises ConfigError: naming the key (or option) and the reason.
    """
    try:
        raw = parse_properties(text)
    except PropertiesError as e:
        raise ConfigError("(syntax)", str(e), source) from None

    values = {key: value for key, (value, _line) in raw.items()}
    global_values: dict[str, Any] = {}
    defaults: dict[str, tuple[str, str]] = {}  # handler key -> (config key, value)
    numbered: dict[tuple[str, str], dict[str, str]] = {}

    for key, value in values.items():
        if key in _GLOBAL_KEYS:
            attribute, parser = _GLOBAL_KEYS[key]
            global_values[attribute] = _parse(key, parser, value, source)
        elif key in _TOP_LEVEL_HANDLER_KEYS:
            _set_default(defaults, key, key, value, source)
        elif key.startswith("default."):
            name = key[len("default."):]
            if name not in _HANDLER_KEYS or name in ("operation", "label"):
                raise ConfigError(key, "unknown handler key", source)
            _set_default(defaults, name, key, value, source)
        else:
            match = _NUMBERED.match(key)
            if match is None:
                raise ConfigError(key, "unknown key", source)
            kind, number, name = match.groups()
            numbered.setdefault((kind, number), {})[name] = value
    given: dict[str, str] = {}  # attribute -> the option that set it
    for key, (option, value) in (options or {}).items():
        attribute, parser = _GLOBAL_KEYS[key]
        global_values[attribute] = _parse(option, parser, value, "")
        given[attribute] = option

    procedures = [_resolve_procedure_files(p, base_dir, source) for p in _token_procedures(numbered, source)]
    handlers = _handlers(numbered, defaults, procedures, source)
    handlers = _announced_templates(handlers, source)
    _check_coaps_listener(handlers, global_values, source)
    handlers = tuple(_resolve_idm_files(h, base_dir, source) for h in handlers)
    handlers = tuple(_load_shared_keys(h, base_dir, source) for h in handlers)

    state = global_values.pop("state_directory", "state")
    global_values["trust_anchor_files"] = tuple(
        _resolve(base_dir, f) for f in global_values.get("trust_anchor_files", ())
    )
    for index, anchor in enumerate(global_values["trust_anchor_files"]):
        if not os.path.isfile(anchor):
            raise ConfigError("tls.trustAnchors", f"no such file: {anchor}", source)
    # Read and verified when the gateway starts (estgw.revocation), so that
    # `estgw crl write` can create a file named here.
    global_values["crl_files"] = tuple(
        _resolve(base_dir, f) for f in global_values.get("crl_files", ())
    )
    if global_values.get("log_file"):
        global_values["log_file"] = _resolve(base_dir, global_values["log_file"])
    if global_values.get("workers", 1) > 1 and global_values.get("metrics_port") is not None:
        # Each worker counts only what it served: one scrape would see one
        # worker's counters, and a counter must never go backwards.
        workers = given.get("workers", "server.workers")
        raise ConfigError("metrics.port", f"not available with {workers} above 1", source)
    if global_values.get("ca_key_password_file"):
        if global_values.get("ca_key_password_env"):
            raise ConfigError("ca.keyPasswordEnv", "ca.keyPasswordFile already names the passphrase", source)
        path = _resolve(base_dir, global_values["ca_key_password_file"])
        if not os.path.isfile(path):
            raise ConfigError("ca.keyPasswordFile", f"no such file: {path}", source)
        global_values["ca_key_password_file"] = path
    if global_values.get("audit_file"):
        global_values["audit_file"] = _resolve(base_dir, global_values["audit_file"])
    if not global_values.get("hostnames"):
        global_values["hostnames"] = default_hostnames()
    _check_tls(global_values, source)
    _check_store_url(global_values.get("store_url", "sqlite:estgw.sqlite"), source)
    return Config(
        source=source,
        state_directory=_resolve(base_dir, state),
        token_procedures={p.name: p for p in procedures},
        handlers=handlers,
        **global_values,
    )


def _check_store_url(url: str, source: str) -> None:
    """``sqlite:PATH`` or a PostgreSQL URL that libpq can read, with psycopg
    installed: checked at load so a typo stops start-up with the key."""
    from estgw.store import POSTGRESQL_SCHEMES, redact_url

    if url.startswith("sqlite:"):
        if not url[len("sqlite:"):].strip():
            raise ConfigError("store.url", "expected sqlite:PATH, with a path", source)
        return
    if not url.startswith(POSTGRESQL_SCHEMES):
        raise ConfigError(
            "store.url", f"expected sqlite:PATH or postgresql://..., not {redact_url(url)!r}", source
        )
    try:
        from psycopg import conninfo
    except ImportError:
        raise ConfigError(
            "store.url",
            "a postgresql:// store needs psycopg 3 and psycopg-pool: pip install 'estgw[postgresql]'",
            source,
        ) from None
    try:
        conninfo.conninfo_to_dict(url)
    except Exception as e:  # psycopg.ProgrammingError: libpq's reason
        reason = str(e).replace(url, redact_url(url))
        raise ConfigError("store.url", f"not a PostgreSQL URL libpq can read: {reason}", source) from None


def _check_coaps_listener(handlers: Sequence[HandlerConfig], values: Mapping[str, Any], source: str) -> None:
    """A handler bound to CoAPs needs the listener: without coaps.port it
    would silently serve nothing."""
    if values.get("coaps_port") is not None:
        return
    for handler in handlers:
        if "coaps" in handler.transports:
            raise ConfigError(
                "coaps.port",
                f"required: handler.{handler.id} is served over CoAPs (transport {handler.transport})",
                source,
            )


def _check_tls(values: Mapping[str, Any], source: str) -> None:
    """The tls.* cipher settings as OpenSSL reads them, so a bad name
    stops start-up with the key (estgw.tls has the defaults and checks)."""
    from estgw import tls

    settings = tls.settings_of(Config(source=source, state_directory="", **{
        k: v for k, v in values.items() if k.startswith("tls_")
    }))
    try:
        tls.check_tls_settings(settings)
    except tls.TLSSettingError as e:
        raise ConfigError(e.key, e.reason, source) from None


def _set_default(
    defaults: dict[str, tuple[str, str]], name: str, key: str, value: str, source: str
) -> None:
    if name in defaults:
        raise ConfigError(key, f"{defaults[name][0]} already sets it", source)
    # Checked here too, so a bad default is an error even where every
    # handler overrides it.
    _parse(key, _HANDLER_KEYS[name][1], value, source)
    defaults[name] = (key, value)


def _token_procedures(
    numbered: dict[tuple[str, str], dict[str, str]], source: str
) -> list[TokenProcedureConfig]:
    result: list[TokenProcedureConfig] = []
    seen: dict[str, str] = {}
    for (kind, number), keys in sorted(numbered.items(), key=lambda i: int(i[0][1])):
        if kind != "tokenprocedure":
            continue
        prefix = f"tokenprocedure.{number}."
        fields: dict[str, Any] = {}
        previous: dict[str, dict[str, str]] = {}
        for name, value in keys.items():
            earlier = _FILE_PREVIOUS.match(name)
            if earlier is not None:
                previous.setdefault(earlier.group(1), {})[_FILE_SETTING_FIELDS[earlier.group(2)]] = value.strip()
                continue
            if name not in _TOKEN_PROCEDURE_KEYS:
                raise ConfigError(prefix + name, "unknown token procedure key", source)
            attribute, parser = _TOKEN_PROCEDURE_KEYS[name]
            fields[attribute] = _parse(prefix + name, parser, value, source)
        if not fields.get("name"):
            raise ConfigError(prefix + "name", "required: the name handlers refer to", source)
        if fields["name"] in seen:
            raise ConfigError(
                prefix + "name",
                f"{fields['name']!r} is already the name of tokenprocedure.{seen[fields['name']]}",
                source,
            )
        seen[fields["name"]] = number
        fields["file_previous"] = tuple(
            FileCASettings(f"file.previous.{m}.", number=m, **previous[m]) for m in sorted(previous, key=int)
        )
        procedure = TokenProcedureConfig(key=number, **fields)
        _check_profile(procedure, prefix, source)
        _check_kind(procedure, keys, prefix, source)
        result.append(procedure)
    return result


def _check_kind(procedure: TokenProcedureConfig, keys: Mapping[str, str], prefix: str, source: str) -> None:
    for name in sorted(keys):
        for start, kind in _KIND_KEYS.items():
            if name.startswith(start) and procedure.ca != kind:
                raise ConfigError(prefix + name, f"only for ca = {kind}, not {procedure.ca}", source)
    if procedure.ca == "file":
        for settings in (procedure.file_settings, *procedure.file_previous):
            for name in ("certificate", "key"):
                if not getattr(settings, name):
                    raise ConfigError(prefix + settings.prefix + name, "required with ca = file", source)
            if settings.key_password_file and settings.key_password_env:
                raise ConfigError(
                    prefix + settings.prefix + "keyPasswordEnv",
                    f"{settings.prefix}keyPasswordFile already names the passphrase", source,
                )
    for name in _KIND_REQUIRED.get(procedure.ca, ()):
        if not keys.get(name, "").strip():
            raise ConfigError(prefix + name, f"required with ca = {procedure.ca}", source)


def _resolve_procedure_files(procedure: TokenProcedureConfig, base_dir: str, source: str) -> TokenProcedureConfig:
    changes: dict[str, Any] = {}
    for name, attribute in _TOKEN_PROCEDURE_FILES.items():
        value = getattr(procedure, attribute)
        if not value:
            continue
        # est.trustAnchors is a list of files, the others one file each.
        paths = [_resolve(base_dir, v) for v in (value if isinstance(value, tuple) else (value,))]
        for path in paths:
            if not os.path.isfile(path):
                raise ConfigError(f"tokenprocedure.{procedure.key}.{name}", f"no such file: {path}", source)
        changes[attribute] = tuple(paths) if isinstance(value, tuple) else paths[0]
    previous = []
    for settings in procedure.file_previous:
        resolved = {}
        for name in ("certificate", "chain", "key", "key_password_file"):
            value = getattr(settings, name)
            if not value:
                continue
            path = _resolve(base_dir, value)
            if not os.path.isfile(path):
                key = {"key_password_file": "keyPasswordFile"}.get(name, name)
                raise ConfigError(f"tokenprocedure.{procedure.key}.{settings.prefix}{key}", f"no such file: {path}", source)
            resolved[name] = path
        previous.append(attr.evolve(settings, **resolved))
    return attr.evolve(procedure, file_previous=tuple(previous), **changes)


def _check_profile(procedure: TokenProcedureConfig, prefix: str, source: str) -> None:
    # Build the CA profile once here so a bad key usage name stops start-up.
    from estgw.ca import Profile

    # One setting at a time, so the error names the key that is wrong.
    days = procedure.validity_days
    for key, usages, extended in (
        ("keyusage", procedure.key_usage, ""),
        ("extendedkeyusage", "", procedure.extended_key_usage),
    ):
        try:
            Profile.from_settings(days, usages, extended)
        except ValueError as e:
            raise ConfigError(prefix + key, str(e), source) from None


def _handlers(
    numbered: dict[tuple[str, str], dict[str, str]],
    defaults: Mapping[str, tuple[str, str]],
    procedures: list[TokenProcedureConfig],
    source: str,
) -> tuple[HandlerConfig, ...]:
    names = {p.name: p for p in procedures}
    result: list[HandlerConfig] = []
    routes: dict[tuple[str, str, str], str] = {}
    for (kind, number), keys in sorted(numbered.items(), key=lambda i: int(i[0][1])):
        if kind != "handler":
            continue
        prefix = f"handler.{number}."
        for name in keys:
            if name not in _HANDLER_KEYS:
                raise ConfigError(prefix + name, "unknown handler key", source)
        if "operation" not in keys:
            raise ConfigError(prefix + "operation", "required: which EST operation this handler serves", source)
        merged = {name: value for name, (_key, value) in defaults.items()}
        merged.update(keys)
        # Which line of the file each setting came from, for messages.
        origin = {name: prefix + name if name in keys else defaults[name][0] for name in merged}
        fields: dict[str, Any] = {}
        for name, value in merged.items():
            attribute, parser = _HANDLER_KEYS[name]
            fields[attribute] = _parse(origin[name], parser, value, source)
        handler = _complete_handler(
            HandlerConfig(id=number, **fields), keys, prefix, origin, names, source
        )
        for transport in handler.transports:
            route = (handler.label, handler.operation, transport)
            if route in routes:
                raise ConfigError(
                    prefix + "operation",
                    f"{handler.path} is already served by handler.{routes[route]}"
                    + (" over CoAPs" if transport == "coaps" else ""),
                    source,
                )
            routes[route] = number
        result.append(handler)
    return tuple(result)


def _complete_handler(
    handler: HandlerConfig,
    own_keys: Mapping[str, str],
    prefix: str,
    origin: Mapping[str, str],
    procedure_names: Mapping[str, TokenProcedureConfig],
    source: str,
) -> HandlerConfig:
    """Fill per-operation defaults and check keys that depend on each other."""

    def where(name: str) -> str:
        return origin.get(name, prefix + name)

    op = handler.operation
    enroll = op in ENROLL_OPERATIONS
    handler = _complete_transport(handler, where, source)
    changes: dict[str, Any] = {}
    if not handler.filter:
        changes["filter"] = DEFAULT_FILTER[op]
    handler = attr.evolve(handler, **changes)
    if enroll and not handler.format:
        procedure = procedure_names.get(handler.token_procedure)
        handler = attr.evolve(handler, format=default_format(op, handler.filter, procedure))
    handler = _complete_idm(handler, own_keys, where, source)

    for name in ("csrattrs", "csrattrs.template"):
        if op != "csrattrs" and name in own_keys:
            raise ConfigError(prefix + name, f"not used by {op}: csrattrs announces it for its CA label", source)
    for name in ("serverkeygen.keyType", "serverkeygen.allowUnencryptedKey", "serverkeygen.sharedKeys"):
        if op != "serverkeygen" and name in own_keys:
            raise ConfigError(prefix + name, f"only used by serverkeygen, not {op}", source)

    if not enroll:
        # Settings that mean nothing here are errors only when set on the
        # handler itself; the default section applies to all handlers.
        for name in (
            "format", "tokenprocedure", "authtype", "qop", "requiredRoRoles", "acceptSha1CsrSignature", "deviceNames",
        ):
            if name in own_keys:
                raise ConfigError(prefix + name, f"not used by {op}", source)
        handler = attr.evolve(
            handler, format="", token_procedure="", authtype="", realm=None, required_ro_roles=None,
            accept_sha1_csr_signature=False,
            client_certificate_issuers=handler.client_certificate_issuers or "any",
        )
        if handler.filter not in ("public", "clientcert") and op in ("cacerts", "csrattrs"):
            raise ConfigError(where("filter"), f"{op} takes filter public or clientcert", source)
        return handler

    if not handler.token_procedure:
        raise ConfigError(where("tokenprocedure"), f"required: which token procedure issues for {op}", source)
    if handler.token_procedure not in procedure_names:
        known = ", ".join(sorted(procedure_names)) or "none is defined"
        raise ConfigError(
            where("tokenprocedure"),
            f"no token procedure named {handler.token_procedure!r} (known: {known})",
            source,
        )
    if handler.authtype and handler.realm is None:
        raise ConfigError(prefix + "realm", "required when authtype is set (it may be empty)", source)
    if handler.filter == "public":
        raise ConfigError(where("filter"), f"{op} cannot be public", source)
    if handler.filter == "registersimpleenroll-basic-idm-auth" and op != "simpleenroll":
        raise ConfigError(where("filter"), "manual approval is only for simpleenroll", source)
    if handler.filter == "registersimpleenroll-basic-idm-auth" and not handler.authtype:
        raise ConfigError(where("authtype"), "required by filter registersimpleenroll-basic-idm-auth", source)
    if handler.filter == "registersimpleenroll-basic-idm-auth" and handler.required_ro_roles is not None:
        raise ConfigError(
            where("requiredRoRoles"),
            "filter registersimpleenroll-basic-idm-auth serves pre-registered devices, not officers",
            source,
        )
    if op == "simplereenroll" and handler.filter not in ("clientcert",):
        raise ConfigError(
            where("filter"),
            "simplereenroll is authenticated by the current certificate: use clientcert",
            source,
        )
    if op == "simplereenroll" and not handler.format == "est-simplereenroll":
        raise ConfigError(where("format"), "simplereenroll takes format est-simplereenroll", source)
    if op != "simplereenroll" and handler.format == "est-simplereenroll":
        raise ConfigError(where("format"), "est-simplereenroll is for simplereenroll", source)
    handler = _complete_authentication(
        handler, own_keys, where, procedure_names[handler.token_procedure], source
    )
    _check_coaps_handler(handler, where, source)
    if not handler.client_certificate_issuers:
        # A factory CA in tls.trustAnchors vouches for devices on the
        # handlers that check their registration (factory certificates,
        # officer roles), not for enrollment and renewal everywhere.
        foreign_ok = handler.factory is not None or handler.required_ro_roles is not None
        handler = attr.evolve(handler, client_certificate_issuers="any" if foreign_ok else "local")
    return handler


def _announced_templates(handlers: tuple[HandlerConfig, ...], source: str) -> tuple[HandlerConfig, ...]:
    """Give each enrollment handler the csrattrs template of its CA label
    (what its clients were told), and serverkeygen its key type: its own
    setting, else the template's key, else the default.  A serverkeygen key
    type that differs from the announced one is an error.

    The template is the label's, on every transport: a transport whose
    csrattrs handler sets none (or that has no csrattrs handler of the
    label) takes the one the label announces elsewhere, and its csrattrs
    handler announces it too.  Only when that is ambiguous (two different
    templates elsewhere) does start-up stop."""
    # What csrattrs announces per label and transport: over HTTPS and
    # over CoAPs a label may have its own csrattrs handler.
    announced = {
        (h.label, transport): h.csr_template
        for h in handlers if h.operation == "csrattrs" for transport in h.transports
    }
    by_label: dict[str, set[CsrTemplate]] = {}
    for (label, _transport), template in announced.items():
        if template is not None:
            by_label.setdefault(label, set()).add(template)

    def effective(handler: HandlerConfig, transport: str) -> CsrTemplate | None:
        own = announced.get((handler.label, transport))
        if own is not None:
            return own
        elsewhere = by_label.get(handler.label, set())
        if len(elsewhere) > 1:
            raise ConfigError(
                f"handler.{handler.id}.transport",
                f"csrattrs announces different templates for this CA label on other transports, and none"
                f" over {transport}: set csrattrs.template on a csrattrs handler of this label over {transport}",
                source,
            )
        return next(iter(elsewhere), None)

    result = []
    for handler in handlers:
        if handler.operation not in ENROLL_OPERATIONS:
            if handler.operation == "csrattrs":
                templates = {effective(handler, transport) for transport in handler.transports}
                if handler.csr_template is None and len(templates) == 1:
                    handler = attr.evolve(handler, csr_template=templates.pop())
                result.append(handler)
            else:
                result.append(attr.evolve(handler, csr_template=None))
            continue
        templates = {effective(handler, transport) for transport in handler.transports}
        if len(templates) > 1:
            raise ConfigError(
                f"handler.{handler.id}.transport",
                "csrattrs announces different templates over https and coaps here: give each transport"
                " its own enrollment handler",
                source,
            )
        template = templates.pop()
        handler = attr.evolve(handler, csr_template=template)
        if handler.operation == "serverkeygen":
            wanted = template.key_type if template is not None else None
            if handler.serverkeygen_key_type and wanted and handler.serverkeygen_key_type != wanted:
                raise ConfigError(
                    f"handler.{handler.id}.serverkeygen.keyType",
                    f"{handler.serverkeygen_key_type} differs from the key csrattrs announces here ({wanted})",
                    source,
                )
            key_type = handler.serverkeygen_key_type or wanted or keytypes.DEFAULT_KEY_TYPE
            handler = attr.evolve(handler, serverkeygen_key_type=key_type)
        result.append(handler)
    return tuple(result)


def _complete_transport(handler: HandlerConfig, where: Callable[[str], str], source: str) -> HandlerConfig:
    """transport defaults to https, or to coaps with an estcoaps- format,
    which then stands for its est- twin (the checks are the same)."""
    transport = handler.transport
    fmt = handler.format
    if fmt.startswith(COAPS_FORMAT_PREFIX):
        if transport == "https":
            raise ConfigError(
                where("format"), f"{fmt} is for a handler served over CoAPs (transport coaps or both)", source
            )
        transport = transport or "coaps"
        fmt = "est-" + fmt[len(COAPS_FORMAT_PREFIX):]
    return attr.evolve(handler, transport=transport or "https", format=fmt)


def _check_coaps_handler(handler: HandlerConfig, where: Callable[[str], str], source: str) -> None:
    """CoAP has no HTTP authentication: over CoAPs the DTLS client
    certificate is the only identity, so what needs a login is refused here."""
    if "coaps" not in handler.transports:
        return
    if handler.authtype:
        raise ConfigError(
            where("authtype"),
            f"HTTP {handler.authtype} authentication does not exist over CoAPs: use transport https"
            " for this handler (over CoAPs the DTLS client certificate authenticates)",
            source,
        )
    if handler.filter == IDM_FILTER:
        raise ConfigError(where("transport"), f"filter {IDM_FILTER} needs an HTTP login: transport https", source)


def _complete_authentication(
    handler: HandlerConfig,
    own_keys: Mapping[str, str],
    where: Callable[[str], str],
    procedure: TokenProcedureConfig,
    source: str,
) -> HandlerConfig:
    """qop, requiredRoRoles and the factory-certificate keys of the handler's
    token procedure, which depend on each other (see estgw.auth)."""
    if "qop" in own_keys and handler.authtype != "Digest":
        raise ConfigError(where("qop"), "only used with authtype Digest", source)
    if not (procedure.use_authentication_cert and handler.operation in ("simpleenroll", "serverkeygen")):
        return handler
    flag = f"tokenprocedure.{procedure.key}.estenroll.use-authentication-cert"
    if handler.required_ro_roles is not None:
        raise ConfigError(
            where("requiredRoRoles"), f"an officer/RA handler cannot also require factory certificates ({flag})", source
        )
    if handler.format == "est-simpleenroll-subjectmatch":
        raise ConfigError(
            where("format"),
            f"a factory certificate ({flag}) does not carry the subject of the request: use est-simpleenroll",
            source,
        )
    if procedure.mandatory_password and not handler.authtype:
        raise ConfigError(
            where("authtype"),
            f"required: tokenprocedure.{procedure.key}.enroll.mandatorypassword asks for the device password",
            source,
        )
    factory = FactoryAuthConfig(procedure.mandatory_password, procedure.check_subject_values)
    return attr.evolve(handler, factory=factory)


IDM_FILTER = "registersimpleenroll-basic-idm-auth"
_IDM_REQUIRED = ("idm.requestUrl", "idm.tls.token", "idm.tls.password")


def _complete_idm(
    handler: HandlerConfig, own_keys: Mapping[str, str], where: Callable[[str], str], source: str
) -> HandlerConfig:
    """The manual-approval keys: required with the IDM filter, errors elsewhere."""
    if handler.filter != IDM_FILTER:
        for name in _HANDLER_KEYS:
            if name.startswith("idm.") and name in own_keys:
                raise ConfigError(where(name), f"only used with filter {IDM_FILTER}", source)
        if handler.format == "est-simpleenroll-idm":
            # Without the filter nobody would approve: refuse rather than
            # let the operator believe approval is on.
            raise ConfigError(where("format"), f"est-simpleenroll-idm needs filter {IDM_FILTER}", source)
        # default.idm.* applies to approval handlers only.
        return attr.evolve(handler, idm_request_url="", idm_token="", idm_password="", idm_trust_anchors=())
    if handler.operation != "simpleenroll":
        raise ConfigError(where("filter"), "manual approval is only for simpleenroll", source)
    for name in _IDM_REQUIRED:
        attribute = _HANDLER_KEYS[name][0]
        if not getattr(handler, attribute):
            raise ConfigError(where(name), f"required by filter {IDM_FILTER}", source)
    url = urlsplit(handler.idm_request_url)
    if url.scheme != "https" or not url.hostname:
        raise ConfigError(
            where("idm.requestUrl"), f"expected an https:// URL, not {handler.idm_request_url!r}", source
        )
    return handler


def _resolve_idm_files(handler: HandlerConfig, base_dir: str, source: str) -> HandlerConfig:
    if handler.filter != IDM_FILTER:
        return handler
    prefix = f"handler.{handler.id}."
    token = _resolve(base_dir, handler.idm_token)
    if not os.path.isfile(token):
        raise ConfigError(prefix + "idm.tls.token", f"no such file: {token}", source)
    anchors = tuple(_resolve(base_dir, f) for f in handler.idm_trust_anchors)
    for anchor in anchors:
        if not os.path.isfile(anchor):
            raise ConfigError(prefix + "idm.tls.trustAnchors", f"no such file: {anchor}", source)
    return attr.evolve(handler, idm_token=token, idm_trust_anchors=anchors)


def _load_shared_keys(handler: HandlerConfig, base_dir: str, source: str) -> HandlerConfig:
    """Read ``serverkeygen.sharedKeys``: one ``KEY-ID KEY`` pair a line,
    both hexadecimal, the key an AES key of 16, 24 or 32 bytes; ``#``
    starts a comment.  Errors name the key and the line, never a key."""
    if handler.operation != "serverkeygen" or not handler.serverkeygen_shared_keys_file:
        return attr.evolve(handler, serverkeygen_shared_keys_file="", serverkeygen_shared_keys=())
    key = f"handler.{handler.id}.serverkeygen.sharedKeys"
    path = _resolve(base_dir, handler.serverkeygen_shared_keys_file)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(key, f"cannot read {path}: {e.strerror}", source) from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not a text file", source) from None
    pairs: dict[bytes, bytes] = {}
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        try:
            if len(fields) != 2:
                raise ValueError
            identifier, secret = bytes.fromhex(fields[0]), bytes.fromhex(fields[1])
        except ValueError:
            raise ConfigError(key, f"{path} line {number}: expected KEY-ID KEY, both hexadecimal", source) from None
        if not identifier or len(secret) not in (16, 24, 32):
            raise ConfigError(
                key, f"{path} line {number}: the key id is empty or the key is not 16, 24 or 32 bytes", source
            )
        if identifier in pairs:
            raise ConfigError(key, f"{path} line {number}: key id {fields[0]} is listed twice", source)
        pairs[identifier] = secret
    if not pairs:
        raise ConfigError(key, f"{path} holds no keys", source)
    return attr.evolve(handler, serverkeygen_shared_keys_file=path, serverkeygen_shared_keys=tuple(pairs.items()))


def load(path: str, options: Mapping[str, tuple[str, str]] | None = None) -> Config:
    """Read and check the configuration file at ``path``, with the
    command-line ``options`` in place of keys (see :func:`from_string`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    return from_string(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)), options=options)


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
