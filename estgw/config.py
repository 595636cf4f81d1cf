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
from typing import Any, Callable, Mapping

import attr

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
ENROLL_OPERATIONS = ("simpleenroll", "simplereenroll")

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
DEFAULT_FILTER = {
    "cacerts": "public",
    "csrattrs": "public",
    "simpleenroll": "device",
    "simplereenroll": "clientcert",
    "serverkeygen": "device",
    "fullcmc": "device",
}
DEFAULT_FORMAT = {
    "simpleenroll": "est-simpleenroll",
    "simplereenroll": "est-simplereenroll",
}

_LABEL = re.compile(r"^[A-Za-z0-9_.~-]+$")  # one RFC 7030 §3.2.2 path segment


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


def _positive_int(value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, not {value!r}") from None
    if number < 1:
        raise ValueError(f"must be at least 1, not {number}")
    return number


def _port(value: str) -> int:
    # 0 asks the system for a free port (tests, several instances).
    number = 0 if value.strip() == "0" else _positive_int(value)
    if number > 65535:
        raise ValueError(f"not a TCP port: {number}")
    return number


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


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
    label = value.strip()
    if label and not _LABEL.match(label):
        raise ValueError(f"not a valid URL path segment: {label!r}")
    return label


def _csrattrs(value: str) -> tuple[CsrAttr, ...]:
    return parse_csrattrs_setting(value)


# -- the typed result ------------------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class TokenProcedureConfig:
    """A CA profile (the product's "token procedure")."""

    key: str
    name: str
    ca: str = "local"
    validity_days: int = 365
    key_usage: str = "digitalSignature, keyEncipherment"
    extended_key_usage: str = "clientAuth"


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
    allow_renewal_with_old_certificates: bool = False
    # RFC 7030 §3.5 linking: the CSR's challengePassword must carry the
    # connection's tls-unique (TLS 1.2) or tls-exporter (TLS 1.3) value.
    channel_binding: bool = False

    @property
    def path(self) -> str:
        prefix = "/.well-known/est/"
        return prefix + (f"{self.label}/" if self.label else "") + self.operation


@attr.s(frozen=True, auto_attribs=True)
class Config:
    source: str  # the file it came from, for messages
    state_directory: str
    port: int = 8443
    interface: str = ""
    hostnames: tuple[str, ...] = ()
    max_request_bytes: int = 65536
    store_url: str = "sqlite:estgw.sqlite"
    ca_name: str = "estgw"
    trust_anchor_files: tuple[str, ...] = ()
    token_procedures: Mapping[str, TokenProcedureConfig] = attr.Factory(dict)
    handlers: tuple[HandlerConfig, ...] = ()

    @property
    def ca_directory(self) -> str:
        return os.path.join(self.state_directory, "ca")

    @property
    def tls_directory(self) -> str:
        return os.path.join(self.state_directory, "tls")

    @property
    def store_path(self) -> str:
        """The SQLite file; relative to the state directory."""
        path = self.store_url[len("sqlite:"):].strip()
        return os.path.join(self.state_directory, os.path.expanduser(path))

    @property
    def ca_certificate_path(self) -> str:
        return os.path.join(self.ca_directory, "root-ca.pem")

    def handler(self, label: str, operation: str) -> HandlerConfig | None:
        for handler in self.handlers:
            if handler.label == label and handler.operation == operation:
                return handler
        return None


# key → (attribute, parser) tables; a new setting is one row here.
_GLOBAL_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "server.port": ("port", _port),
    "server.interface": ("interface", _text),
    "server.hostnames": ("hostnames", _list),
    "server.maxRequestBytes": ("max_request_bytes", _positive_int),
    "state.directory": ("state_directory", _text),
    "store.url": ("store_url", _text),
    "ca.name": ("ca_name", _text),
    "tls.trustAnchors": ("trust_anchor_files", _list),
}
_TOKEN_PROCEDURE_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "name": ("name", _text),
    "ca": ("ca", _choice("local")),
    "validity.days": ("validity_days", _positive_int),
    "keyusage": ("key_usage", _text),
    "extendedkeyusage": ("extended_key_usage", _text),
}
_HANDLER_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "operation": ("operation", _choice(*OPERATIONS)),
    "label": ("label", _label),
    "filter": ("filter", _choice(*FILTERS)),
    "format": ("format", _choice(*FORMATS)),
    "tokenprocedure": ("token_procedure", _text),
    "authtype": ("authtype", _choice("Basic", "Digest")),
    "realm": ("realm", lambda value: value.strip()),
    "qop": ("qop", _choice("auth")),
    "csrattrs": ("csrattrs", _csrattrs),
    "allowRenewalWithOldCertificates": (
        "allow_renewal_with_old_certificates",
        _bool,
    ),
    "channelBinding": ("channel_binding", _bool),
}
# Handler keys that may also stand alone at the top level (as in the
# model product's est.properties) and then act like default.<key>.
_TOP_LEVEL_HANDLER_KEYS = ("allowRenewalWithOldCertificates",)

_NUMBERED = re.compile(r"^(handler|tokenprocedure)\.([0-9]+)\.(.+)$")


def default_hostnames() -> tuple[str, ...]:
    names = ["localhost", "127.0.0.1", "::1"]
    host = socket.gethostname()
    if host and host not in names:
        names.append(host)
    return tuple(names)


def _parse(key: str, parser: Callable[[str], Any], value: str, source: str) -> Any:
    try:
        return parser(value)
    except ValueError as e:
        raise ConfigError(key, str(e), source) from None


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def from_string(text: str, source: str = "est.properties", base_dir: str = ".") -> Config:
    """Parse the text of an est.properties file; relative paths are
    taken relative to ``base_dir``."""
    try:
        raw = parse_properties(text)
    except PropertiesError as e:
        raise ConfigError("(syntax)", str(e), source) from None

    values = {key: value for key, (value, _line) in raw.items()}
    global_values: dict[str, Any] = {}
    defaults: dict[str, str] = {}
    numbered: dict[tuple[str, str], dict[str, str]] = {}

    for key, value in values.items():
        if key in _GLOBAL_KEYS:
            attribute, parser = _GLOBAL_KEYS[key]
            global_values[attribute] = _parse(key, parser, value, source)
        elif key in _TOP_LEVEL_HANDLER_KEYS:
            defaults.setdefault(key, value)
        elif key.startswith("default."):
            name = key[len("default."):]
            if name not in _HANDLER_KEYS or name in ("operation", "label"):
                raise ConfigError(key, "unknown handler key", source)
            defaults[name] = value
        else:
            match = _NUMBERED.match(key)
            if match is None:
                raise ConfigError(key, "unknown key", source)
            kind, number, name = match.groups()
            numbered.setdefault((kind, number), {})[name] = value

    procedures = _token_procedures(numbered, source)
    handlers = _handlers(numbered, defaults, procedures, source)

    state = global_values.pop("state_directory", "state")
    global_values["trust_anchor_files"] = tuple(
        _resolve(base_dir, f) for f in global_values.get("trust_anchor_files", ())
    )
    for index, anchor in enumerate(global_values["trust_anchor_files"]):
        if not os.path.isfile(anchor):
            raise ConfigError("tls.trustAnchors", f"no such file: {anchor}", source)
    if not global_values.get("hostnames"):
        global_values["hostnames"] = default_hostnames()
    store_url = global_values.get("store_url", "sqlite:estgw.sqlite")
    if not store_url.startswith("sqlite:") or not store_url[len("sqlite:"):].strip():
        raise ConfigError("store.url", f"expected sqlite:PATH, not {store_url!r}", source)
    return Config(
        source=source,
        state_directory=_resolve(base_dir, state),
        token_procedures={p.name: p for p in procedures},
        handlers=handlers,
        **global_values,
    )


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
        for name, value in keys.items():
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
        procedure = TokenProcedureConfig(key=number, **fields)
        _check_profile(procedure, prefix, source)
        result.append(procedure)
    return result


def _check_profile(procedure: TokenProcedureConfig, prefix: str, source: str) -> None:
    # Build the CA profile once here so a bad key usage name stops start-up.
    from estgw.ca import Profile

    try:
        Profile.from_settings(
            procedure.validity_days, procedure.key_usage, procedure.extended_key_usage
        )
    except ValueError as e:
        text = str(e)
        key = "extendedkeyusage" if "extended" in text.lower() or "eku" in text.lower() else "keyusage"
        raise ConfigError(prefix + key, text, source) from None


def _handlers(
    numbered: dict[tuple[str, str], dict[str, str]],
    defaults: Mapping[str, str],
    procedures: list[TokenProcedureConfig],
    source: str,
) -> tuple[HandlerConfig, ...]:
    names = {p.name for p in procedures}
    result: list[HandlerConfig] = []
    routes: dict[tuple[str, str], str] = {}
    for (kind, number), keys in sorted(numbered.items(), key=lambda i: int(i[0][1])):
        if kind != "handler":
            continue
        prefix = f"handler.{number}."
        for name in keys:
            if name not in _HANDLER_KEYS:
                raise ConfigError(prefix + name, "unknown handler key", source)
        if "operation" not in keys:
            raise ConfigError(prefix + "operation", "required: which EST operation this handler serves", source)
        merged = {**{k: v for k, v in defaults.items()}, **keys}
        fields: dict[str, Any] = {}
        for name, value in merged.items():
            attribute, parser = _HANDLER_KEYS[name]
            where = (prefix + name) if name in keys else f"default.{name}"
            fields[attribute] = _parse(where, parser, value, source)
        handler = _complete_handler(HandlerConfig(id=number, **fields), keys, prefix, names, source)
        route = (handler.label, handler.operation)
        if route in routes:
            raise ConfigError(
                prefix + "operation",
                f"{handler.path} is already served by handler.{routes[route]}",
                source,
            )
        routes[route] = number
        result.append(handler)
    return tuple(result)


def _complete_handler(
    handler: HandlerConfig,
    own_keys: Mapping[str, str],
    prefix: str,
    procedure_names: set[str],
    source: str,
) -> HandlerConfig:
    """Fill per-operation defaults and check keys that depend on each other."""
    op = handler.operation
    enroll = op in ENROLL_OPERATIONS
    changes: dict[str, Any] = {}
    if not handler.filter:
        changes["filter"] = DEFAULT_FILTER[op]
    if enroll and not handler.format:
        changes["format"] = DEFAULT_FORMAT[op]
    handler = attr.evolve(handler, **changes)

    if not enroll:
        # Settings that mean nothing here are errors only when set on the
        # handler itself; the default section applies to all handlers.
        for name in ("format", "tokenprocedure", "authtype"):
            if name in own_keys:
                raise ConfigError(prefix + name, f"not used by {op}", source)
        handler = attr.evolve(handler, format="", token_procedure="", authtype="", realm=None)
        if op != "csrattrs" and "csrattrs" in own_keys:
            raise ConfigError(prefix + "csrattrs", f"not used by {op}", source)
        if handler.filter not in ("public", "clientcert") and op in ("cacerts", "csrattrs"):
            raise ConfigError(prefix + "filter", f"{op} takes filter public or clientcert", source)
        return handler

    if not handler.token_procedure:
        raise ConfigError(prefix + "tokenprocedure", f"required: which token procedure issues for {op}", source)
    if handler.token_procedure not in procedure_names:
        known = ", ".join(sorted(procedure_names)) or "none is defined"
        raise ConfigError(
            prefix + "tokenprocedure",
            f"no token procedure named {handler.token_procedure!r} (known: {known})",
            source,
        )
    if handler.authtype and handler.realm is None:
        raise ConfigError(prefix + "realm", "required when authtype is set (it may be empty)", source)
    if handler.filter == "public":
        raise ConfigError(prefix + "filter", f"{op} cannot be public", source)
    if handler.filter == "registersimpleenroll-basic-idm-auth" and op != "simpleenroll":
        raise ConfigError(prefix + "filter", "manual approval is only for simpleenroll", source)
    if handler.filter == "registersimpleenroll-basic-idm-auth" and not handler.authtype:
        raise ConfigError(prefix + "authtype", "required by filter registersimpleenroll-basic-idm-auth", source)
    if op == "simplereenroll" and handler.filter not in ("clientcert",):
        raise ConfigError(
            prefix + "filter",
            "simplereenroll is authenticated by the current certificate: use clientcert",
            source,
        )
    if op == "simplereenroll" and not handler.format == "est-simplereenroll":
        raise ConfigError(prefix + "format", "simplereenroll takes format est-simplereenroll", source)
    if op == "simpleenroll" and handler.format == "est-simplereenroll":
        raise ConfigError(prefix + "format", "est-simplereenroll is for simplereenroll", source)
    return handler


def load(path: str) -> Config:
    """Read and check the configuration file at ``path``."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    return from_string(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
