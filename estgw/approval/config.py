"""``approval.properties``: the reference approval service's settings,
and where ``estgw approval`` finds the service and the operator's
credentials.  Same syntax and rules as ``est.properties``: unknown keys
are errors, and every error names the key."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import attr

from estgw.config import ConfigError, default_hostnames, whole_number
from estgw.properties import PropertiesError, parse_properties

__all__ = ["ServiceConfig", "load", "from_string", "REQUEST_PATH"]

#: Where the reference service serves the contract's request collection.
REQUEST_PATH = "/approval/requests"


def _text(value: str) -> str:
    return value.strip()


def _list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def _port(value: str) -> int:
    number = whole_number(value)
    if not 0 <= number <= 65535:
        raise ValueError(f"not a TCP port: {number}")
    return number


@attr.s(frozen=True, auto_attribs=True)
class ServiceConfig:
    source: str
    state_directory: str
    port: int = 8444
    interface: str = ""
    hostnames: tuple[str, ...] = ()
    store_url: str = "sqlite:approval.sqlite"
    ca_name: str = "estgw-approval"
    # Client certificates chaining to these may submit (gateways) or
    # decide (operators); empty: the service's own gateway / operator CA.
    gateway_trust_anchor_files: tuple[str, ...] = ()
    operator_trust_anchor_files: tuple[str, ...] = ()
    # For `estgw approval`: the service URL and the operator's credentials;
    # empty: this service on this machine, with the default operator.
    cli_url: str = ""
    cli_certificate: str = ""
    cli_key: str = ""
    cli_trust_anchor_files: tuple[str, ...] = ()

    def _under(self, *parts: str) -> str:
        return os.path.join(self.state_directory, *parts)

    @property
    def ca_directory(self) -> str:
        return self._under("ca")

    @property
    def tls_directory(self) -> str:
        return self._under("tls")

    @property
    def gateway_ca_directory(self) -> str:
        return self._under("gateway-ca")

    @property
    def operator_ca_directory(self) -> str:
        return self._under("operator-ca")

    @property
    def operators_directory(self) -> str:
        return self._under("operators")

    @property
    def store_path(self) -> str:
        return self._under(os.path.expanduser(self.store_url[len("sqlite:"):].strip()))

    @property
    def url(self) -> str:
        """The request collection URL: ``idm.requestUrl`` for gateways."""
        if self.cli_url:
            return self.cli_url
        host = self.hostnames[0] if self.hostnames else "localhost"
        host = f"[{host}]" if ":" in host else host
        return f"https://{host}:{self.port}{REQUEST_PATH}"


_KEYS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "service.port": ("port", _port),
    "service.interface": ("interface", _text),
    "service.hostnames": ("hostnames", _list),
    "state.directory": ("state_directory", _text),
    "store.url": ("store_url", _text),
    "ca.name": ("ca_name", _text),
    "gateway.trustAnchors": ("gateway_trust_anchor_files", _list),
    "operator.trustAnchors": ("operator_trust_anchor_files", _list),
    "cli.url": ("cli_url", _text),
    "cli.certificate": ("cli_certificate", _text),
    "cli.key": ("cli_key", _text),
    "cli.trustAnchors": ("cli_trust_anchor_files", _list),
}
_PATH_KEYS = ("cli_certificate", "cli_key")
_PATH_LIST_KEYS = ("gateway_trust_anchor_files", "operator_trust_anchor_files", "cli_trust_anchor_files")


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def from_string(text: str, source: str = "approval.properties", base_dir: str = ".",
                options: Mapping[str, tuple[str, str]] | None = None) -> ServiceConfig:
    """Parse approval.properties text; relative paths are relative to ``base_dir``.
    ``options``: command-line options in place of keys, as
    ``{"service.port": ("--port", "0")}``, read by the key's parser; an
    error about one names the option.

    :raises ConfigError: naming the key (or option) and the reason.
    """
    try:
        raw = parse_properties(text)
    except PropertiesError as e:
        raise ConfigError("(syntax)", str(e), source) from None
    fields: dict[str, Any] = {}
    for key, (value, _line) in raw.items():
        if key not in _KEYS:
            raise ConfigError(key, "unknown key", source)
        attribute, parser = _KEYS[key]
        try:
            fields[attribute] = parser(value)
        except ValueError as e:
            raise ConfigError(key, str(e), source) from None
    for key, (option, value) in (options or {}).items():
        attribute, parser = _KEYS[key]
        try:
            fields[attribute] = parser(value)
        except ValueError as e:
            raise ConfigError(option, str(e)) from None
    for attribute in _PATH_KEYS:
        if fields.get(attribute):
            fields[attribute] = _resolve(base_dir, fields[attribute])
    for attribute in _PATH_LIST_KEYS:
        fields[attribute] = tuple(_resolve(base_dir, p) for p in fields.get(attribute, ()))
    store_url = fields.get("store_url", "sqlite:approval.sqlite")
    if not store_url.startswith("sqlite:") or not store_url[len("sqlite:"):].strip():
        raise ConfigError("store.url", f"expected sqlite:PATH, not {store_url!r}", source)
    if not fields.get("hostnames"):
        fields["hostnames"] = default_hostnames()
    state = fields.pop("state_directory", "approval-state")
    return ServiceConfig(source=source, state_directory=_resolve(base_dir, state), **fields)


def load(path: str, options: Mapping[str, tuple[str, str]] | None = None) -> ServiceConfig:
    """Read and check ``path``, with the command-line ``options`` in place
    of keys (see :func:`from_string`)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("--config", f"cannot read {path}: {e.strerror}") from None
    return from_string(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)), options=options)
