"""``estgw --config FILE <command>``: the operator's commands.

Each command opens the same store the daemon uses (SQLite allows both at
once).  Like the tools sysadmins already use: data (listings, ``--json``)
goes to stdout, errors and per-row problems to stderr as
``estgw: <reason>``; the exit status is 0 on success, 1 when the command
failed, 2 for a usage mistake, and 141 when the reader of stdout went
away (``estgw cert list | head``), silently.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any, Sequence

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from twisted.internet import defer, task

import estgw
from estgw import audit, bootstrap, config as config_module, device_import, factory, names, officers
from estgw.ca import CRL_FILE, CAError, ISigningCA
from estgw.ca import factory as ca_factory
from estgw.ca._files import load_certificate as load_cert, load_private_key as load_key
from estgw.ca.keys import KEY_TYPES, read_passphrase
from estgw.ca.publish import revoked_entries
from estgw.config import Config, ConfigError
from estgw.escape import printable
from estgw.serials import format_serial
from estgw.store import (
    REVOCATION_REASONS,
    CertificateFilter,
    DuplicateDevice,
    DuplicateFactoryCertificate,
    IssuedCertificate,
    IStore,
    SQLiteStore,
    StoreNotEmpty,
    StoreUnavailable,
    UnknownCertificate,
    UnsupportedSchemaVersion,
    certificate_fingerprint,
    iterate_certificates,
    open_store,
    redact_url,
)


_HEX = re.compile(r"[0-9a-f]+")


class CommandError(Exception):
    """An operator mistake: printed as ``estgw: <message>``, exit status 1."""


def parse_serial(text: str) -> int:
    """Serials in hex as openssl or ``cert list`` print them: any case,
    leading zeros, ``0x``, colons (``0a:1b``) or ``serial=`` allowed."""
    cleaned = text.strip().lower().removeprefix("serial=").removeprefix("0x").replace(":", "")
    # Hex digits only: int() alone would also take "-1", "+a" and "1_0".
    if not _HEX.fullmatch(cleaned):
        raise CommandError(f"not a serial number (hex expected): {text!r}")
    return int(cleaned, 16)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def _warn(options: Any, text: str) -> None:
    """A diagnostic line: stderr, never mixed into the data on stdout."""
    stream = options.get("stderr") or sys.stderr
    stream.write(f"estgw: {text}\n")


def _json(out: Any, items: list[dict[str, Any]]) -> None:
    out.write(json.dumps(items, indent=2) + "\n")


# -- commands: each is async (options, config, store, out) -> None ----------


async def cmd_init(options: Any, config: Config, store: IStore, out: Any) -> None:
    """Create what is missing and report it. Building every token
    procedure checks it: for ``ca = file`` that the key fits the
    certificate, that the certificate may sign certificates and that the
    chain reaches its root; for ``ca = pkcs11`` that the token and key are
    there; for ``ca = est`` the upstream's /cacerts is fetched now."""
    try:
        state = bootstrap.initialize(config)
    except (ConfigError, CAError) as e:
        raise CommandError(str(e)) from None
    if options["offline_root"]:
        try:
            state.ca.export_root_key(options["offline_root"], bootstrap.ca_passphrase(config), out)
        except CAError as e:
            raise CommandError(str(e)) from None
    out.write(f"state directory: {config.state_directory}\n")
    out.write(f"CA certificate:  {config.ca_certificate_path}\n")
    out.write(f"store:           {redact_url(config.store_location)}\n")
    if options["offline_root"]:
        where = "the PEM above" if options["offline_root"] == "-" else options["offline_root"]
        out.write(
            f"root key:        moved to {where}; keep it offline, "
            f"it is needed only to make the next issuing CA\n"
        )
    for name, procedure in state.procedures.items():
        kind = config.token_procedures[name].ca
        out.write(f"token procedure {name!r} (ca = {kind}): {await _procedure_state(procedure)}\n")


async def _procedure_state(procedure: Any) -> str:
    """One line on what a token procedure issues with, whatever its kind."""
    refresh = getattr(procedure, "refresh", None)
    chain = list(await refresh()) if refresh is not None else procedure.chain()
    if chain:
        where = f"upstream {procedure.url}, " if refresh is not None else ""
        return f"{where}issuing CA {chain[0].subject.rfc4514_string()}"
    if refresh is not None:
        reason = getattr(procedure, "last_error", None) or "no answer"
        return (f"upstream {procedure.url}: its CA certificates could not be fetched now ({reason}); "
                f"the gateway fetches them again when it runs")
    return "no CA certificate"


def read_password(options: Any) -> str | None:
    """--password or the first line of --password-file; None when neither."""
    if options["password"] is not None and options["password_file"] is not None:
        raise CommandError("give --password or --password-file, not both")
    if options["password_file"] is not None:
        try:
            with open(options["password_file"], encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise CommandError(f"cannot read {options['password_file']}: {e.strerror}") from None
    elif options["password"] is not None:
        password = options["password"]
    else:
        return None
    if not password:
        raise CommandError("the password is empty")
    return password


async def cmd_device_add(options: Any, config: Config, store: IStore, out: Any) -> None:
    device_id = options["id"]
    password = read_password(options)
    if password is None and options["factory_cert"] is None:
        raise CommandError("device add needs --password, --password-file or --factory-cert")
    try:
        registration = device_import.Registration(
            device_id=device_id,
            password=password,
            factory_cert=(
                None if options["factory_cert"] is None else factory.read_certificate(options["factory_cert"])
            ),
            factory_cn=options["cn"],
            subject_values=tuple(factory.parse_subject_value(v) for v in options["subject_value"] or ())
            + tuple(factory.parse_san(v) for v in options["san"] or ()),
            single_use=bool(options["single_use"]),
        )
        # Hashing blocks; fine here: no one else waits on this reactor.
        device = device_import.build_device(registration, device_import.digest_realms(config), config.scrypt_n)
        await store.add_device(device)
    except DuplicateFactoryCertificate as e:
        raise CommandError(str(e)) from None
    except DuplicateDevice:
        raise CommandError(f"device {device_id!r} is already registered") from None
    except ValueError as e:
        raise CommandError(str(e)) from None
    await audit.operator_action(store, audit.os_operator(), "device-add", device_id, _device_kind(device))
    out.write(f"registered device {printable(device_id)}\n")


async def cmd_device_import(options: Any, config: Config, store: IStore, out: Any) -> None:
    try:
        rows = device_import.read_csv(options["file"])
    except ValueError as e:
        raise CommandError(str(e)) from None
    result = await device_import.import_devices(store, rows, device_import.digest_realms(config), config.scrypt_n)
    if rows:
        await audit.operator_action(
            store, audit.os_operator(), "device-import", options["file"], device_import.describe(result, len(rows))
        )
    for line, reason in result.bad:
        _warn(options, f"{options['file']} line {line}: {printable(reason)}")
    if not options["skip_existing"]:
        for line, device_id in result.existing:
            _warn(options, f"{options['file']} line {line}: device {printable(repr(device_id))} is already registered (left unchanged)")
    out.write(device_import.describe(result, len(rows)) + "\n")
    problems = []
    if result.bad:
        problems.append(f"{len(result.bad)} bad row(s)")
    if result.existing and not options["skip_existing"]:
        problems.append(
            f"{len(result.existing)} device(s) already registered (--skip-existing accepts that;"
            " estgw device passwd changes a password)"
        )
    if problems:
        raise CommandError(f"{' and '.join(problems)} in {options['file']}")


async def cmd_device_passwd(options: Any, config: Config, store: IStore, out: Any) -> None:
    device_id = options["id"]
    password = read_password(options)
    if password is None:
        raise CommandError("device passwd needs --password-file (or --password)")
    registered = await store.get_device(device_id)
    if registered is None:
        raise CommandError(f"no device {device_id!r}")
    if registered.password_hash is None and not options["add_password"]:
        # A factory-certificate device gains a second way in: only on purpose.
        raise CommandError(
            f"device {device_id!r} has no password (it logs in with its factory certificate);"
            " give --add-password to add one"
        )
    # Hashing blocks; fine here: no one else waits on this reactor.
    device = device_import.build_device(
        device_import.Registration(device_id=device_id, password=password),
        device_import.digest_realms(config),
    )
    assert device.password_hash is not None
    if not await store.set_device_password(device_id, device.password_hash, device.digest_ha1):
        raise CommandError(f"no device {device_id!r}")
    what = "password changed" if registered.password_hash is not None else "password added"
    await audit.operator_action(store, audit.os_operator(), "device-passwd", device_id, what)
    out.write(f"{'changed' if registered.password_hash is not None else 'added'} the password of device {device_id}\n")


def _read_certificate(path: str) -> Any:
    try:
        return factory.read_certificate(path)
    except ValueError as e:
        raise CommandError(str(e)) from None


async def cmd_officer_add(options: Any, config: Config, store: IStore, out: Any) -> None:
    cert = _read_certificate(options["cert"])
    try:
        role = config_module.role_name(options["role"])
    except ValueError as e:
        raise CommandError(str(e)) from None
    known = known_roles(config)
    if role not in known and not options["force"]:
        named = ", ".join(sorted(known)) if known else "none (no handler sets requiredRoRoles)"
        raise CommandError(
            f"no handler in {config.source} names the role {role!r} in requiredRoRoles;"
            f" known roles: {named} (--force grants it all the same)"
        )
    grant = officers.role_grant(cert, role)
    if await store.add_officer_role(grant):
        await audit.operator_action(
            store, audit.os_operator(), "officer-add", grant.subject,
            f"role {role}, certificate SHA-256 {grant.fingerprint}",
        )
        out.write(f"granted officer role {role} to {printable(grant.subject)} (SHA-256 {grant.fingerprint})\n")
    else:
        out.write(f"{printable(grant.subject)} (SHA-256 {grant.fingerprint}) already holds officer role {role}\n")


def known_roles(config: Config) -> set[str]:
    """The officer roles some handler's requiredRoRoles names."""
    return {role for h in config.handlers for role in (h.required_ro_roles or ()) if role != "none"}


async def cmd_officer_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    grants = await store.list_officer_roles()
    if options["json"]:
        return _json(out, [
            {"role": g.role, "subject": g.subject, "issuer": g.issuer, "serial": format_serial(g.serial),
             "grantedAt": _iso(g.granted_at), "sha256": g.fingerprint}
            for g in grants
        ])
    if not grants:
        out.write("no officer roles granted\n")
        return
    out.write(f"{'ROLE':<16} {'SUBJECT':<40} {'SERIAL':<42} {'GRANTED':<20} SHA-256\n")
    for g in grants:
        out.write(
            f"{g.role:<16} {printable(g.subject):<40} {format_serial(g.serial):<42} {_when(g.granted_at):<20}"
            f" {g.fingerprint}\n"
        )


async def cmd_officer_remove(options: Any, config: Config, store: IStore, out: Any) -> None:
    if (options["cert"] is None) == (options["fingerprint"] is None):
        raise CommandError("officer remove needs --cert or --fingerprint (one of them)")
    if options["cert"] is not None:
        fingerprint = certificate_fingerprint(_read_certificate(options["cert"]))
    else:
        fingerprint = options["fingerprint"].strip().lower().replace(":", "")
    removed = await store.remove_officer_roles(fingerprint, options["role"])
    if not removed:
        what = f"role {options['role']}" if options["role"] else "officer roles"
        raise CommandError(f"the certificate with SHA-256 {fingerprint} holds no {what}")
    await audit.operator_action(
        store, audit.os_operator(), "officer-remove", f"certificate SHA-256 {fingerprint}",
        f"role {options['role']}" if options["role"] else "all roles",
    )
    out.write(f"withdrew {removed} officer role(s) from the certificate with SHA-256 {fingerprint}\n")


async def cmd_device_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    devices = await store.list_devices()
    if options["json"]:
        return _json(out, [
            {"id": d.device_id, "password": d.password_hash is not None,
             "factoryCertSha256": d.factory_cert_sha256, "commonName": d.expected_common_name,
             "singleUse": d.single_use, "registeredAt": _iso(d.created_at), "consumedAt": _iso(d.consumed_at),
             # What the device may be called besides its id: subject values
             # (name "serialNumber", ...) and SANs (name "DNS", "IP", ...).
             "registeredNames": [{"name": n, "value": v} for n, v in d.subject_values]}
            for d in devices
        ])
    if not devices:
        out.write("no devices registered\n")
        return
    out.write(f"{'DEVICE':<32} {'AUTH':<16} {'SINGLE-USE':<10} {'REGISTERED':<20} {'CONSUMED':<20} NAMES\n")
    for d in devices:
        auth = "+".join(
            kind for kind, present in (("password", d.password_hash), ("factory", d.factory_cert_sha256)) if present
        ) or "-"
        single = "yes" if d.single_use else "no"
        out.write(
            f"{printable(d.device_id):<32} {auth:<16} {single:<10} {_when(d.created_at):<20} {_when(d.consumed_at):<20}"
            f" {_registered_names(d)}\n"
        )


def _registered_names(device: Any) -> str:
    """``CN=id, serialNumber=SN1, DNS:pump-1.example``: what the device may
    be called; a value that is not plain printable text is shown escaped."""

    def text(value: str) -> str:
        return value if value.isprintable() and value.strip() == value and value else names.shown(value)

    parts = [f"CN={text(device.expected_common_name)}"]
    for name, value in device.subject_values:
        separator = ":" if name in factory.SAN_KINDS else "="
        parts.append(f"{name}{separator}{text(value) if value else '(any)'}")
    return ", ".join(parts)


async def cmd_device_remove(options: Any, config: Config, store: IStore, out: Any) -> None:
    if not await store.remove_device(options["id"]):
        raise CommandError(f"no device {options['id']!r}")
    await audit.operator_action(store, audit.os_operator(), "device-remove", options["id"])
    out.write(f"removed device {printable(options['id'])}\n")


def _device_kind(device: Any) -> str:
    """How a device authenticates, for the audit trail (never the secret)."""
    kinds = [kind for kind, present in (("password", device.password_hash), ("factory certificate", device.factory_cert_sha256)) if present]
    return " + ".join(kinds) + (", single use" if device.single_use else "")


def _status(c: IssuedCertificate) -> str:
    if c.revoked:
        return "revoked"
    if c.not_after < datetime.now(timezone.utc):
        return "expired"
    return "valid"


def _matches_subject(c: IssuedCertificate, wanted: str) -> bool:
    """The whole subject DN, or its commonName, exactly."""
    if c.subject == wanted:
        return True
    cn = c.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return any(a.value == wanted for a in cn)


def _cert_json(c: IssuedCertificate) -> dict[str, Any]:
    return {
        "serial": format_serial(c.serial), "subject": c.subject, "subjectAltNames": list(c.sans),
        "status": _status(c), "notBefore": _iso(c.not_before), "notAfter": _iso(c.not_after),
        "revokedAt": _iso(c.revoked_at), "revocationReason": c.revocation_reason,
        "handler": c.handler, "requester": c.requester, "issuedAt": _iso(c.issued_at),
    }


# How far the database's notAfter bounds are widened: a row near the
# moment of the listing is decided by the exact check, never left out.
_NOT_AFTER_MARGIN = timedelta(days=1)


def _subject_texts(wanted: str) -> tuple[str, ...]:
    """What the subject text contains wherever :func:`_matches_subject`
    holds: ``wanted`` itself (a whole DN), or the commonName ``wanted`` as
    ``rfc4514_string()`` writes it; () (no narrowing) when that cannot be
    written."""
    try:
        common_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted)]).rfc4514_string()
    except ValueError:
        return ()
    return (wanted, common_name)


def _listing_filter(options: Any, now: datetime, horizon: datetime | None) -> CertificateFilter:
    """What the store can leave out of a ``cert list``: never a row the
    exact check (``wanted`` in :func:`cmd_cert_list`) keeps, so that it
    scans the store rather than Python reading every row.  ``--search``
    stays with the exact check: Python's case folding is not SQL's."""
    statuses = set(options["status"] or ())
    revoked: bool | None = None
    start = end = None
    if horizon is not None:
        revoked, start, end = False, now - _NOT_AFTER_MARGIN, horizon + _NOT_AFTER_MARGIN
    elif statuses == {"revoked"}:
        revoked = True
    elif statuses and "revoked" not in statuses:
        revoked = False
        if statuses == {"valid"}:
            start = now - _NOT_AFTER_MARGIN
        elif statuses == {"expired"}:
            end = now + _NOT_AFTER_MARGIN
    subjects = () if options["subject"] is None else _subject_texts(options["subject"])
    return CertificateFilter(subjects, revoked, start, end)


async def cmd_cert_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    # Streamed page by page; the store leaves out what it can, the rest is
    # filtered row by row: memory stays flat however many were issued.
    now = datetime.now(timezone.utc)
    horizon = None if options["expires_within"] is None else now + timedelta(days=options["expires_within"])
    needle = None if options["search"] is None else options["search"].lower()

    def wanted(c: IssuedCertificate) -> bool:
        if options["subject"] is not None and not _matches_subject(c, options["subject"]):
            return False
        if needle is not None and not (needle in c.subject.lower() or any(needle in s.lower() for s in c.sans)):
            return False
        if options["status"] and _status(c) not in options["status"]:
            return False
        if horizon is not None and not (_status(c) == "valid" and c.not_after <= horizon):
            return False
        return True

    shown = 0
    async for c in iterate_certificates(store, where=_listing_filter(options, now, horizon)):
        if not wanted(c):
            continue
        if options["json"]:
            # The text json.dumps(list, indent=2) gives, one item at a time.
            item = json.dumps(_cert_json(c), indent=2).replace("\n", "\n  ")
            out.write(("[\n  " if not shown else ",\n  ") + item)
        else:
            if not shown:
                out.write(f"{'SERIAL':<42} {'STATUS':<8} {'NOT AFTER':<20} {'SUBJECT':<40} REQUESTER\n")
            out.write(
                f"{format_serial(c.serial):<42} {_status(c):<8} {_when(c.not_after):<20}"
                f" {printable(c.subject):<40} {printable(c.requester)}\n"
            )
        shown += 1
    if options["json"]:
        out.write("\n]\n" if shown else "[]\n")
    elif not shown:
        filtered = any(options[k] is not None for k in ("subject", "search", "expires_within")) or options["status"]
        out.write("no certificates match\n" if filtered else "no certificates issued\n")


async def _get(store: IStore, serial_text: str) -> IssuedCertificate:
    serial = parse_serial(serial_text)
    issued = await store.get_certificate(serial)
    if issued is None:
        raise CommandError(f"no certificate with serial {format_serial(serial)}")
    return issued


async def cmd_cert_show(options: Any, config: Config, store: IStore, out: Any) -> None:
    c = await _get(store, options["serial"])
    rows = [
        ("serial", format_serial(c.serial)),
        ("subject", c.subject),
        ("subjectAltName", ", ".join(c.sans) or "-"),
        ("not before", _when(c.not_before)),
        ("not after", _when(c.not_after)),
        ("status", _status(c)),
        ("revoked at", _when(c.revoked_at)),
        ("revocation reason", c.revocation_reason or "-"),
        ("invalidity date", _when(c.invalidity_date)),
        ("public key SHA-256", c.public_key_sha256),
        ("handler", c.handler),
        ("requester", c.requester),
        ("issued at", _when(c.issued_at)),
    ]
    for name, value in rows:
        # Subject, SANs and requester were chosen by the client.
        out.write(f"{name + ':':<20} {printable(value)}\n")
    out.write(c.certificate.public_bytes(Encoding.PEM).decode("ascii"))


async def cmd_cert_revoke(options: Any, config: Config, store: IStore, out: Any) -> None:
    serial = parse_serial(options["serial"])
    known = await store.get_certificate(serial)
    if known is not None and known.revoked:
        # Nothing changes: say so, and audit no revocation that did not happen.
        raise CommandError(
            f"{format_serial(serial)} is already revoked (at {_when(known.revoked_at)},"
            f" reason {known.revocation_reason or 'unspecified'})"
        )
    try:
        issued = await store.revoke_certificate(
            serial, options["reason"], invalidity_date=options["invalidity_date"]
        )
    except UnknownCertificate:
        raise CommandError(f"no certificate with serial {format_serial(serial)}") from None
    except ValueError as e:  # an unknown --reason, an invalidity date in the future
        raise CommandError(str(e)) from None
    await audit.operator_action(
        store, audit.os_operator(), "cert-revoke", f"serial {serial:x}",
        f"{issued.subject}, reason {issued.revocation_reason or 'unspecified'}",
    )
    out.write(
        f"revoked {format_serial(serial)} ({printable(issued.subject)}) at {_when(issued.revoked_at)}, "
        f"reason {issued.revocation_reason}\n"
    )


async def cmd_audit_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    """The latest operator actions from the store's audit table, oldest first."""
    entries = await store.list_audit(options["limit"])
    if not entries:
        out.write("no operator actions recorded\n")
        return
    out.write(f"{'WHEN':<20} {'OPERATOR':<24} {'ACTION':<18} {'TARGET':<40} DETAILS\n")
    for e in entries:
        out.write(f"{_when(e.at):<20} {e.operator:<24} {e.action:<18} {e.target:<40} {e.details}\n")


def _write_file_atomically(path: str, data: bytes) -> None:
    # A gateway reading the file (tls.crls) never sees half of it.
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".crl-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _signing_ca(config: Config, name: str | None) -> Any:
    """The local CA, or the CA that signs for token procedure ``name``
    (built alone: the other token procedures' CAs may be unavailable)."""
    if name is None:
        try:
            return bootstrap.local_ca(config)
        except (ConfigError, CAError) as e:
            raise CommandError(str(e)) from None
    if name not in config.token_procedures:
        known = ", ".join(sorted(config.token_procedures)) or "none is defined"
        raise CommandError(f"no token procedure named {name!r} (known: {known})")
    try:
        procedure = ca_factory.token_procedure(
            config.token_procedures[name], ca_factory.Context(config=config, local_ca=bootstrap.local_ca(config))
        )
    except (ConfigError, CAError) as e:
        raise CommandError(f"the CA of token procedure {name!r} cannot be used now: {e}") from None
    ca = getattr(procedure, "ca", None)
    if not ISigningCA.providedBy(ca):
        raise CommandError(f"token procedure {name!r} signs with no key this gateway holds")
    return ca


def _urls_without_ca(config: Config) -> list[str]:
    """The CRL and caIssuers URLs of the local CA's token procedures that
    lack ``{ca}``: after a rollover they would name the new CA's CRL and
    certificate in the earlier CA's certificates (RFC 5280 4.2.1.13)."""
    found = []
    for procedure in config.token_procedures.values():
        if procedure.ca != "local":
            continue
        for key, url in (("crl.url", procedure.crl_url), ("caIssuers.url", procedure.ca_issuers_url)):
            if url and "{ca}" not in url:
                found.append(f"tokenprocedure.{procedure.key}.{key} = {url}")
    return found


async def cmd_ca_rollover(options: Any, config: Config, store: IStore, out: Any) -> None:
    """RFC 7030 4.1.3: the local CA's next issuing CA (and root, with --root).
    Refused (without --force) while a CRL or caIssuers URL of the local CA
    lacks ``{ca}``."""
    unsafe = _urls_without_ca(config)
    if unsafe:
        text = (
            "these URLs lack {ca}, so after the rollover the certificates of the current issuing CA "
            "would point at the new CA's CRL or certificate (revocation checks fail): "
            + "; ".join(unsafe) + ". Put {ca} into them (e.g. .../crl/<name>/{ca}.crl, "
            ".../ca/<name>/{ca}.crt) and restart the gateway first"
        )
        if not options["force"]:
            raise CommandError(text + ", or give --force")
        _warn(options, "warning: " + text)
    try:
        passphrase = bootstrap.ca_passphrase(config)
        ca = bootstrap.local_ca(config)
    except (ConfigError, CAError) as e:
        raise CommandError(str(e)) from None
    # An offline root stays offline: a new root's key goes where the
    # operator says, never silently into the state directory.
    root_offline = not ca.root_key_online
    new_root_out = options["new_root_key_out"]
    if new_root_out and not options["root"]:
        raise CommandError("--new-root-key-out goes with --root")
    if options["root"] and root_offline and not new_root_out:
        raise CommandError(
            "the root key is offline: give --new-root-key-out FILE (or - to print it once) for the new "
            "root's key, so that it is kept offline too"
        )
    if new_root_out and new_root_out != "-" and os.path.exists(new_root_out):
        raise CommandError(f"{new_root_out} exists; the new root key is written only to a new file")
    try:
        root_key = None
        if options["root_key"]:
            root_key = load_key(options["root_key"], passphrase)
        issuing = None
        if options["certificate"] or options["key"]:
            if not (options["certificate"] and options["key"]):
                raise CommandError("--certificate and --key go together")
            key_passphrase = read_passphrase(options["key_password_file"] or "")
            issuing = (load_cert(options["certificate"]), load_key(options["key"], key_passphrase))
        if issuing is not None and options["root"]:
            raise CommandError("--root makes a new root; a new issuing CA from files must be issued by the current one")
        rolled = ca.rollover(
            name=config.ca_name, key_type=options["key_type"], passphrase=passphrase,
            new_root=options["root"], root_key=root_key, issuing=issuing,
        )
        if new_root_out:
            rolled.export_root_key(new_root_out, passphrase, out)
    except CAError as e:
        raise CommandError(str(e)) from None
    await audit.operator_action(
        store, audit.os_operator(), "ca-rollover", rolled.issuing.subject.rfc4514_string(),
        "new root and issuing CA" if options["root"] else "new issuing CA",
    )
    protection = "encrypted with ca.keyPasswordFile" if passphrase else "unencrypted: set ca.keyPasswordFile"
    directory = config.ca_directory
    out.write(f"new issuing CA:  {rolled.issuing.subject.rfc4514_string()} "
              f"(until {_when(rolled.issuing.not_valid_after_utc)})\n")
    out.write(f"its key:         {os.path.join(directory, 'issuing-ca.key')} ({protection})\n")
    for generation in rolled.previous:
        out.write(f"still serving:   {generation.issuing.subject.rfc4514_string()} "
                  f"(until {_when(generation.issuing.not_valid_after_utc)}; its certificates renew; "
                  f"its certificate and key: {generation.directory})\n")
    if options["root"]:
        out.write(f"new root:        {rolled.root.subject.rfc4514_string()}; cacerts carries both roots"
                  f" and the NewWithOld/OldWithNew link certificates\n")
        if new_root_out:
            where = "the PEM above" if new_root_out == "-" else os.path.abspath(new_root_out)
            out.write(f"new root key:    moved to {where}; keep it offline\n")
        else:
            out.write(f"new root key:    {os.path.join(directory, 'root-ca.key')} ({protection})\n")
    elif root_offline:
        out.write("root key:        still offline (given with --root-key; nothing of it was written)\n")
    out.write("restart the gateway to issue from the new CA\n")


def _invalidity_date(text: str) -> datetime:
    """ISO 8601, e.g. 2026-11-30 or 2026-11-30T08:15:00Z; no zone means UTC."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 date or time (2026-11-30, 2026-11-30T08:15:00Z): {text!r}"
        ) from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)


async def cmd_crl_write(options: Any, config: Config, store: IStore, out: Any) -> None:
    """The CRL of every certificate revoked in the store that the local CA
    (or --tokenprocedure's CA) issued, with reason codes and invalidity dates."""
    ca = _signing_ca(config, options["tokenprocedure"])
    revoked = await revoked_entries(store, ca)
    crl = ca.write_crl(revoked, next_update=timedelta(days=options["days"]))
    written = [os.path.join(ca.directory, CRL_FILE)]
    if options["out"]:
        encoding = Encoding.DER if options["der"] else Encoding.PEM
        try:
            _write_file_atomically(options["out"], crl.public_bytes(encoding))
        except OSError as e:
            raise CommandError(f"cannot write {options['out']}: {e.strerror}") from None
        written.append(options["out"])
    await audit.operator_action(
        store, audit.os_operator(), "crl-write", ", ".join(written), f"{len(crl)} revoked certificate(s)"
    )
    out.write(
        f"wrote CRL of {len(crl)} revoked certificate(s), next update "
        f"{_when(crl.next_update_utc)}, to {', '.join(written)}\n"
    )
    # After a rollover the earlier issuing CAs still answer for their certificates.
    for earlier in ca.issuers()[1:]:
        previous = earlier.write_crl(await revoked_entries(store, earlier), next_update=timedelta(days=options["days"]))
        out.write(
            f"wrote CRL of {len(previous)} revoked certificate(s) of the earlier issuing CA "
            f"{earlier.issuing.subject.rfc4514_string()} to {os.path.join(earlier.directory, CRL_FILE)}\n"
        )


async def cmd_store_migrate(options: Any, config: Config, store: IStore, out: Any) -> None:
    """Copy this gateway's SQLite store into the store at --to (e.g. a new
    PostgreSQL database), creating its schema first."""
    if config.store_path is None:
        raise CommandError(
            f"store migrate copies a SQLite store, and store.url is {redact_url(config.store_url)}"
        )
    target_url = options["to"]
    try:
        target = open_store(target_url)
    except ValueError as e:
        raise CommandError(f"--to: {e}") from None
    if isinstance(target, SQLiteStore) and os.path.abspath(target.path) == os.path.abspath(config.store_path):
        raise CommandError("--to names the store being copied")
    try:
        await target.start()  # creates or migrates the target's schema
    except Exception as e:
        raise CommandError(f"cannot open {redact_url(target_url)}: {e}") from None
    try:
        counts = await target.copy_from_sqlite(config.store_path)
        copied = ", ".join(f"{n} {table}" for table, n in counts.items())
        # In the copy's audit table, which goes on from the copied one.
        await audit.operator_action(
            target, audit.os_operator(), "store-migrate", redact_url(target_url),
            f"copied {copied} from {config.store_path}",
        )
    except StoreNotEmpty as e:
        raise CommandError(str(e)) from None
    finally:
        await target.close()
    if isinstance(target, SQLiteStore):
        # A relative --to is relative to where the command ran; in
        # est.properties, sqlite: paths are relative to the state directory.
        target_url = "sqlite:" + os.path.abspath(target.path)
    out.write(f"copied {copied} from {config.store_path} to {redact_url(target_url)}\n")
    out.write(f"to use it, set store.url = {redact_url(target_url)} in {config.source}\n")


# -- argument parsing -------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estgw", description="Operator commands of the estgw EST gateway."
    )
    parser.add_argument("-c", "--config", default="etc/est.properties", help="the est.properties file")
    parser.add_argument("--version", action="version", version=f"estgw {estgw.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init", help="create the CA, TLS credentials and store (idempotent); check the token procedures"
    )
    init.add_argument(
        "--offline-root", metavar="OUT.pem",
        help="move the local root CA's key to this new file, or print it once with '-' (encrypted"
        " with ca.keyPasswordFile when set), and keep only the issuing CA's key online",
    )
    init.set_defaults(run=cmd_init)

    device = commands.add_parser("device", help="pre-registered devices").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = device.add_parser(
        "add", help="pre-register a device: a password (HTTP Basic/Digest), a factory certificate, or both"
    )
    add.add_argument("id")
    add.add_argument("--password", help="the password (visible in ps; prefer --password-file)")
    add.add_argument("--password-file", help="read the password from the first line of this file")
    add.add_argument("--single-use", action="store_true", help="consumed by the first certificate issued")
    add.add_argument(
        "--factory-cert", metavar="FILE",
        help="the device's factory (authentication) certificate, PEM or DER, e.g. its IDevID",
    )
    add.add_argument("--cn", help="the commonName requests must carry (default: the device id)")
    add.add_argument(
        "--subject-value", action="append", metavar="NAME=VALUE",
        help="a subject value the device may carry (and, with a factory certificate and"
        " enroll.check-subject-values, must carry), e.g. serialNumber=SN17 (repeatable;"
        " an empty VALUE matches any one value)",
    )
    add.add_argument(
        "--san", action="append", metavar="KIND:VALUE",
        help="a subjectAltName the device may carry: DNS:name, IP:address, email:address or URI:uri"
        " (repeatable)",
    )
    add.set_defaults(run=cmd_device_add)
    importing = device.add_parser(
        "import",
        help="pre-register devices from a CSV file",
        description="CSV with a header row naming the columns "
        + ",".join(device_import.CSV_COLUMNS)
        + " (id required; any order). password may be empty when factory_cert (a file relative to"
        " the CSV) is given; cn defaults to the id; single_use is yes/no; subject_values are"
        " NAME=VALUE pairs and sans KIND:VALUE names, each separated by ';'. Each bad row is"
        " reported on stderr as 'FILE line N: reason' and skipped, and so is each row of a device"
        " already registered (left unchanged); the good rows are imported and counted on stdout."
        " The exit status is 1 if any row was bad or, without --skip-existing, already registered.",
    )
    importing.add_argument("file", help="the CSV file")
    importing.add_argument(
        "--skip-existing", action="store_true",
        help="devices already registered are left unchanged without counting as an error"
        " (re-running an import is then harmless)",
    )
    importing.set_defaults(run=cmd_device_import)
    passwd = device.add_parser("passwd", help="change a pre-registered device's password")
    passwd.add_argument("id")
    passwd.add_argument("--password-file", help="read the new password from the first line of this file")
    passwd.add_argument("--password", help="the new password (visible in ps; prefer --password-file)")
    passwd.add_argument(
        "--add-password", action="store_true",
        help="allow adding a password to a device that has none (a factory-certificate device)",
    )
    passwd.set_defaults(run=cmd_device_passwd)
    device_list = device.add_parser("list", help="list pre-registered devices")
    device_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    device_list.set_defaults(run=cmd_device_list)
    remove = device.add_parser("remove", help="remove a pre-registered device")
    remove.add_argument("id")
    remove.set_defaults(run=cmd_device_remove)

    officer = commands.add_parser("officer", help="officer/RA roles of client certificates").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    grant = officer.add_parser("add", help="grant an officer role to a certificate (see requiredRoRoles)")
    grant.add_argument("--cert", required=True, metavar="FILE", help="the officer's certificate, PEM or DER")
    grant.add_argument("--role", required=True, help="the role, e.g. ra: one a handler's requiredRoRoles names")
    grant.add_argument("--force", action="store_true", help="grant a role no handler names (yet)")
    grant.set_defaults(run=cmd_officer_add)
    officer_list = officer.add_parser("list", help="list officer roles")
    officer_list.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    officer_list.set_defaults(run=cmd_officer_list)
    withdraw = officer.add_parser("remove", help="withdraw officer roles from a certificate")
    withdraw.add_argument("--cert", metavar="FILE", help="the officer's certificate")
    withdraw.add_argument("--fingerprint", metavar="SHA256", help="its SHA-256, as officer list shows it")
    withdraw.add_argument("--role", help="only this role (default: all)")
    withdraw.set_defaults(run=cmd_officer_remove)

    cert = commands.add_parser("cert", help="issued certificates").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    listing = cert.add_parser("list", help="list issued certificates, newest first")
    listing.add_argument(
        "--subject", metavar="NAME",
        help="only this subject: the whole DN (CN=pump-17,O=Example) or its commonName (pump-17)",
    )
    listing.add_argument("--search", metavar="TEXT", help="subject or a subjectAltName contains TEXT (any case)")
    listing.add_argument(
        "--status", action="append", choices=("valid", "revoked", "expired"),
        help="only certificates in this state (repeatable)",
    )
    listing.add_argument(
        "--expires-within", type=_non_negative_days, metavar="DAYS",
        help="only valid certificates whose notAfter is at most DAYS days away",
    )
    listing.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    listing.set_defaults(run=cmd_cert_list)
    show = cert.add_parser("show", help="show one certificate and its PEM")
    show.add_argument("serial", help="the serial number in hex, as openssl prints it")
    show.set_defaults(run=cmd_cert_show)
    revoke = cert.add_parser("revoke", help="revoke a certificate; refused from the next request on")
    revoke.add_argument("serial", help="the serial number in hex")
    revoke.add_argument(
        "--reason", default="unspecified", choices=sorted(REVOCATION_REASONS), help="RFC 5280 reason"
    )
    revoke.add_argument(
        "--invalidity-date",
        type=_invalidity_date,
        help="since when the key is known or suspected to be compromised (ISO 8601, UTC"
        " unless a zone is given; RFC 5280 5.3.2); CRL entries and OCSP responses carry it",
    )
    revoke.set_defaults(run=cmd_cert_revoke)

    audit_list = commands.add_parser("audit", help="operator actions recorded in the store").add_subparsers(
        dest="action", metavar="ACTION", required=True
    ).add_parser("list", help="who did what, when: the latest operator actions, oldest first")
    audit_list.add_argument("--limit", type=_positive_count, default=100, help="how many (default 100)")
    audit_list.set_defaults(run=cmd_audit_list)

    crl = commands.add_parser("crl", help="certificate revocation lists").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    crl_write = crl.add_parser(
        "write", help="sign the local CA's CRL of the revoked certificates (ca/crl.pem), with reason codes"
    )
    crl_write.add_argument(
        "--tokenprocedure", metavar="NAME",
        help="the CRL of the CA that signs for this token procedure (default: the local CA)",
    )
    crl_write.add_argument("--out", help="also write it to this file (e.g. one named in tls.crls)")
    crl_write.add_argument("--der", action="store_true", help="write --out in DER instead of PEM")
    crl_write.add_argument(
        "--days", type=_positive_days, default=7, help="days until its nextUpdate (default 7)"
    )
    crl_write.set_defaults(run=cmd_crl_write)

    stores = commands.add_parser("store", help="the store itself").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    migrate = stores.add_parser(
        "migrate",
        help="copy this SQLite store (every table) into an empty store, e.g. PostgreSQL",
        description="Creates the target's schema, then copies every table of the SQLite store of"
        " store.url in one transaction; refuses a target that already holds data. Stop the gateways"
        " first, then point store.url at the target.",
    )
    migrate.add_argument(
        "--to", required=True, metavar="URL",
        help="the target store: postgresql://user@host/db (or sqlite:PATH)",
    )
    migrate.set_defaults(run=cmd_store_migrate)

    ca = commands.add_parser("ca", help="the local CA").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    rollover = ca.add_parser(
        "rollover",
        help="make the next issuing CA (RFC 7030 4.1.3); the current one keeps serving its certificates",
    )
    rollover.add_argument("--root", action="store_true",
                          help="roll the root too, with NewWithOld/OldWithNew link certificates")
    rollover.add_argument("--root-key", metavar="FILE",
                          help="the current root key, when it is offline (encrypted with ca.keyPasswordFile)")
    rollover.add_argument("--key-type", choices=KEY_TYPES,
                          help="key type of the new keys (default: that of the current issuing key)")
    rollover.add_argument("--certificate", metavar="FILE",
                          help="take this issuing CA certificate (issued by the current root) instead")
    rollover.add_argument("--key", metavar="FILE", help="its private key (PEM or DER)")
    rollover.add_argument("--key-password-file", metavar="FILE", help="the key's passphrase, when encrypted")
    rollover.add_argument("--new-root-key-out", metavar="OUT.pem",
                          help="with --root and an offline root: write the new root's key to this new file"
                               " (- prints it once) instead of the state directory")
    rollover.add_argument("--force", action="store_true",
                          help="roll over although a CRL or caIssuers URL of the local CA lacks {ca}")
    rollover.set_defaults(run=cmd_ca_rollover)

    # Talks to the approval service (its own config), not to this store.
    from estgw.approval import cli as approval_cli

    approval_cli.add_parser(commands)
    return parser


def _whole(text: str) -> int:
    # As in est.properties: ASCII digits only (int() also takes "1_0", "٥").
    try:
        return config_module.whole_number(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative_days(text: str) -> int:
    days = _whole(text)
    if days < 0:
        raise argparse.ArgumentTypeError(f"must be 0 days or more, not {days}")
    return days


def _positive_count(text: str) -> int:
    number = _whole(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def _positive_days(text: str) -> int:
    days = _whole(text)
    if days < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 day, not {days}")
    return days


async def run(reactor: Any, argv: Sequence[str], out: Any = None, err: Any = None) -> None:
    """Parse ``argv`` and run the command; raise CommandError on failure.
    Data goes to ``out`` (stdout), diagnostics to ``err`` (stderr)."""
    out = sys.stdout if out is None else out
    options = _parser().parse_args(list(argv))  # exits 2 with usage on a mistake
    options.stderr = sys.stderr if err is None else err
    if getattr(options, "standalone", None) is not None:
        await options.standalone(reactor, vars(options), out)
        return
    try:
        config = config_module.load(options.config)
        # The store alone: commands on devices, officers and certificates
        # work while a CA (a token, an upstream) is unavailable; those that
        # need a CA build it themselves and say when it cannot be used.
        bootstrap.prepare_state_directory(config)
    except (ConfigError, CAError) as e:
        raise CommandError(str(e)) from None
    store = bootstrap.open_store(config, reactor)
    try:
        await store.start()
    except (StoreUnavailable, UnsupportedSchemaVersion) as e:
        # Unreachable, no permission to create the schema, a newer schema:
        # the reason (no password: the store redacts its URL), not a traceback.
        raise CommandError(f"the store cannot be used: {e}") from None
    # Operator actions go to the same JSON audit file as the daemon's events.
    observer = audit.start_audit_file(config.audit_file) if config.audit_file else None
    try:
        await options.run(vars(options), config, store, out)
    except StoreUnavailable as e:
        raise CommandError(f"the store cannot be used: {e}") from None
    finally:
        if observer is not None:
            audit.stop_audit_file(observer)
        await store.close()


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        try:
            await run(reactor, arguments)
            sys.stdout.flush()
        except CommandError as e:
            sys.stderr.write(f"estgw: {printable(str(e))}\n")
            raise SystemExit(1)
        except BrokenPipeError:
            _stdout_gone()
        except OverflowError as e:
            # A number too large for a date or an interval (--days, --expires-within).
            sys.stderr.write(f"estgw: a number is out of range: {printable(str(e))}\n")
            raise SystemExit(2)
        except OSError as e:
            # Output that cannot be written (a full disk, /dev/full), a file
            # that cannot be read: the reason, never a traceback.
            sys.stderr.write(f"estgw: {printable(e.strerror or str(e))}\n")
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor)))


def _stdout_gone() -> None:
    """The reader of stdout left (``| head``): end quietly, as cat does,
    with 128 + SIGPIPE; nothing more may be written to the closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise SystemExit(128 + 13)


if __name__ == "__main__":
    main()
