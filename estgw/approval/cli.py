"""``estgw approval ...``: the operator's side of manual approval.

Two kinds of command:

* ``list``, ``approve ID``, ``reject ID --reason TEXT`` talk HTTPS to an
  approval service and authenticate with the operator's client
  certificate (``--url``/``--cert``/``--key``/``--cacert``, else the
  ``cli.*`` keys of approval.properties, else the reference service on
  this machine with its default operator);
* ``init``, ``issue-gateway``, ``issue-operator`` run on the reference
  service's machine: they make its CAs and write a gateway's PKCS#12
  token (for ``idm.tls.token``) or an operator's certificate and key.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any
from urllib.parse import quote

from twisted.internet.defer import Deferred

from estgw.approval import config as config_module, pki
from estgw.approval.client import describe_failure
from estgw.approval.config import ServiceConfig
from estgw.approval.tls import (
    ClientCertificatePolicy,
    CredentialsError,
    https_client,
    load_certificates,
    load_pem_credentials,
)
from estgw.ca import CAError
from estgw.cli import CommandError, read_password
from estgw.serials import format_serial
from estgw.config import ConfigError
from estgw.escape import printable

__all__ = ["add_parser", "run"]

TIMEOUT = 30.0
_STATUSES = ("pending", "approved", "rejected", "expired", "all")


def _load_config(options: dict[str, Any]) -> ServiceConfig:
    try:
        return config_module.load(options["approval_config"])
    except ConfigError as e:
        raise CommandError(str(e)) from None


def _connection_settings(options: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    """(url, certificate file, key file, CA files) from options, then config."""
    given = [options["url"], options["cert"], options["key"], options["cacert"]]
    if all(given):
        return options["url"], options["cert"], options["key"], [options["cacert"]]
    config = _load_config(options)
    default_cert, default_key = pki.default_operator_paths(config)
    anchors = list(config.cli_trust_anchor_files) or [os.path.join(config.ca_directory, "root-ca.pem")]
    return (
        options["url"] or config.url,
        options["cert"] or config.cli_certificate or default_cert,
        options["key"] or config.cli_key or default_key,
        [options["cacert"]] if options["cacert"] else anchors,
    )


class _ServiceClient:
    """The operator's HTTPS client of the approval service."""

    def __init__(self, reactor: Any, options: dict[str, Any]) -> None:
        url, cert, key, ca_files = _connection_settings(options)
        try:
            credentials = load_pem_credentials(cert, key)
            anchors = [c for path in ca_files for c in load_certificates(path)]
        except CredentialsError as e:
            raise CommandError(str(e)) from None
        self.url = url.rstrip("/")
        self._reactor = reactor
        self._http = https_client(reactor, ClientCertificatePolicy(credentials, anchors), TIMEOUT)

    async def call(self, method: str, path: str = "", body: Any = None, params: Any = None) -> Any:
        url = self.url + path
        kwargs: dict[str, Any] = {"headers": {b"Accept": [b"application/json"]}}
        if body is not None:
            kwargs["json"] = body
        if params:
            kwargs["params"] = params
        try:
            d = Deferred.fromCoroutine(self._exchange(method, url, kwargs))
            d.addTimeout(TIMEOUT, self._reactor)
            code, data = await d
        except CommandError:
            raise
        except Exception as e:
            raise CommandError(f"cannot reach the approval service at {self.url}: {describe_failure(e)}") from None
        if code >= 300:
            error = data.get("error") if isinstance(data, dict) else None
            raise CommandError(f"the approval service answered {code}: {error or 'no reason given'}")
        return data

    async def _exchange(self, method: str, url: str, kwargs: dict[str, Any]) -> tuple[int, Any]:
        response = await self._http.request(method, url, **kwargs)
        content = await response.content()
        try:
            return response.code, json.loads(content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise CommandError(f"the approval service answered {response.code} with something that is not JSON") from None


def _short_time(text: str | None) -> str:
    if not text:
        return "-"
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M:%SZ")
    except ValueError:
        return text


def _one(request_id: str) -> str:
    return "/" + quote(request_id, safe="")


# -- commands over HTTPS ----------------------------------------------------------


async def cmd_list(reactor: Any, options: dict[str, Any], out: Any) -> None:
    client = _ServiceClient(reactor, options)
    data = await client.call("GET", params={"status": options["status"]})
    requests = data.get("requests", []) if isinstance(data, dict) else []
    if options.get("json"):
        out.write(json.dumps(requests, indent=2) + "\n")
        return
    if not requests:
        label = "" if options["status"] == "all" else options["status"] + " "
        out.write(f"no {label}requests\n")
        return
    out.write(f"{'ID':<38} {'STATUS':<9} {'CREATED':<20} {'SUBJECT':<32} {'REQUESTER':<24} REASON\n")
    for r in requests:
        out.write(
            f"{printable(r.get('requestId', '?')):<38} {printable(r.get('status', '?')):<9}"
            f" {printable(_short_time(r.get('createdAt'))):<20} {printable(r.get('subject', '?')):<32}"
            f" {printable(r.get('requester') or '-'):<24} {printable(r.get('reason') or '-')}\n"
        )
        # Everything that would be certified, so nothing is approved unseen.
        sans = r.get("subjectAltNames") or []
        out.write(
            f"    would issue: subject {printable(r.get('issuedSubject', r.get('subject', '?')))};"
            f" subjectAltNames {printable(', '.join(str(n) for n in sans)) if sans else 'none'};"
            f" key {printable(r.get('publicKey', '?'))}\n"
        )


async def cmd_approve(reactor: Any, options: dict[str, Any], out: Any) -> None:
    client = _ServiceClient(reactor, options)
    data = await client.call("POST", _one(options["id"]) + "/approve", {})
    out.write(f"approved {printable(data.get('requestId'))} ({printable(data.get('subject'))})\n")


async def cmd_reject(reactor: Any, options: dict[str, Any], out: Any) -> None:
    reason = " ".join((options["reason"] or "").split())
    if not reason:
        raise CommandError("reject needs a --reason: the device's operator sees it")
    client = _ServiceClient(reactor, options)
    data = await client.call("POST", _one(options["id"]) + "/reject", {"reason": reason})
    out.write(
        f"rejected {printable(data.get('requestId'))} ({printable(data.get('subject'))}):"
        f" {printable(data.get('reason'))}\n"
    )


# -- commands on the service's machine ------------------------------------------


def _local_pki(options: dict[str, Any]) -> tuple[ServiceConfig, pki.ServicePKI]:
    config = _load_config(options)
    try:
        return config, pki.initialize(config)
    except (CAError, ConfigError) as e:
        raise CommandError(str(e)) from None


async def cmd_init(reactor: Any, options: dict[str, Any], out: Any) -> None:
    config, state = _local_pki(options)
    certificate, key = pki.ensure_default_operator(config, state)
    out.write(f"state directory:        {config.state_directory}\n")
    out.write(f"service URL:            {config.url}\n")
    out.write(f"service CA (gateways' idm.tls.trustAnchors): {os.path.join(config.ca_directory, 'root-ca.pem')}\n")
    out.write(f"default operator:       {certificate} {key}\n")


def _password(options: dict[str, Any]) -> str:
    password = read_password(options)
    if password is None:
        raise CommandError("the token needs a password: --password or --password-file")
    return password


async def cmd_issue_gateway(reactor: Any, options: dict[str, Any], out: Any) -> None:
    password = _password(options)
    config, state = _local_pki(options)
    key, certificate = pki.issue_client(state.gateway_ca, options["name"], "gateways")
    try:
        pki.write_pkcs12(options["out"], key, certificate, state.gateway_ca, password)
    except OSError as e:
        raise CommandError(f"cannot write {options['out']}: {e.strerror}") from None
    gateway_config = options.get("config") or "etc/est.properties"
    out.write(
        f"wrote {options['out']}: {certificate.subject.rfc4514_string()}, serial {format_serial(certificate.serial_number)}\n"
        f"gateway settings for {gateway_config} (paths relative to its directory):\n"
        f"    idm.requestUrl = {config.url}\n"
        f"    idm.tls.token = {_relative_to(options['out'], gateway_config)}\n"
        f"    idm.tls.trustAnchors = {_relative_to(os.path.join(config.ca_directory, 'root-ca.pem'), gateway_config)}\n"
    )


def _relative_to(path: str, config_file: str) -> str:
    """``path`` as est.properties (``config_file``) reads it: relative to
    its directory when below it, else absolute."""
    base = os.path.dirname(os.path.abspath(config_file))
    relative = os.path.relpath(os.path.abspath(path), base)
    return os.path.abspath(path) if relative.startswith("..") else relative


async def cmd_issue_operator(reactor: Any, options: dict[str, Any], out: Any) -> None:
    config, state = _local_pki(options)
    name = options["name"]
    directory = options["out_dir"] or config.operators_directory
    certificate_path = os.path.join(directory, f"{name}.pem")
    key_path = os.path.join(directory, f"{name}.key")
    if os.path.exists(certificate_path) or os.path.exists(key_path):
        raise CommandError(f"{certificate_path} or {key_path} exists already; choose another name or --out-dir")
    key, certificate = pki.issue_client(state.operator_ca, name, "operators")
    try:
        pki.write_pem(certificate_path, key_path, key, certificate, state.operator_ca)
    except OSError as e:
        raise CommandError(f"cannot write in {directory}: {e.strerror}") from None
    out.write(f"wrote {certificate_path} and {key_path}: {certificate.subject.rfc4514_string()}\n")


# -- argument parsing ------------------------------------------------------------


async def run(reactor: Any, options: dict[str, Any], out: Any) -> None:
    await options["approval_action"](reactor, options, out)


def add_parser(commands: Any) -> None:
    """Add ``approval`` to the ``estgw`` command parser."""
    approval = commands.add_parser("approval", help="manual approval: pending requests, approval service certificates")
    approval.add_argument(
        "-C", "--approval-config", default="etc/approval.properties",
        help="the approval service's approval.properties (default etc/approval.properties)",
    )
    approval.add_argument("--url", help="the service's request URL (the gateways' idm.requestUrl)")
    approval.add_argument("--cert", help="the operator's certificate (PEM)")
    approval.add_argument("--key", help="the operator's private key (PEM)")
    approval.add_argument("--cacert", help="CA file that verifies the service's certificate")
    approval.set_defaults(standalone=run)
    actions = approval.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list requests (pending by default)")
    listing.add_argument("--status", choices=_STATUSES, default="pending")
    listing.add_argument("--json", action="store_true", help="the service's request objects as a JSON array")
    listing.set_defaults(approval_action=cmd_list)
    approve = actions.add_parser("approve", help="approve a pending request")
    approve.add_argument("id")
    approve.set_defaults(approval_action=cmd_approve)
    reject = actions.add_parser("reject", help="reject a pending request; the reason is shown to the device")
    reject.add_argument("id")
    reject.add_argument("--reason", required=True)
    reject.set_defaults(approval_action=cmd_reject)

    init = actions.add_parser("init", help="make the reference service's CAs and default operator (idempotent)")
    init.set_defaults(approval_action=cmd_init)
    gateway = actions.add_parser("issue-gateway", help="write a gateway's PKCS#12 token (idm.tls.token)")
    gateway.add_argument("out", help="the .p12 file to write")
    gateway.add_argument("--name", default="estgw-ra", help="the certificate's commonName (default estgw-ra)")
    gateway.add_argument("--password", help="the token's password (visible in ps; prefer --password-file)")
    gateway.add_argument("--password-file", help="read the password from the first line of this file")
    gateway.set_defaults(approval_action=cmd_issue_gateway)
    operator = actions.add_parser("issue-operator", help="write an operator's certificate and key (PEM)")
    operator.add_argument("name", help="the operator's name (commonName, file names)")
    operator.add_argument("--out-dir", help="where to write NAME.pem and NAME.key (default: the state's operators/)")
    operator.set_defaults(approval_action=cmd_issue_operator)
