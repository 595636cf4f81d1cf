"""Pre-registering devices: one (``estgw device add``) or many from CSV
(``estgw device import``).

A registration has a password (HTTP Basic/Digest), a factory certificate,
or both.  Only hashes of the password are stored: scrypt for
Basic, and for every Digest realm of the configuration the realm-bound
H(A1) Digest needs (see :func:`estgw.auth.digest_ha1`); a device
registered before a Digest realm was configured must be registered again
to use it.

The CSV file has a header row naming its columns, in any order::

    id,password,factory_cert,cn,single_use,subject_values,sans
    pump-17,s3cret,,,no,,
    pump-18,,certs/pump-18-idevid.pem,PUMP-18,yes,serialNumber=SN18,DNS:pump-18.plant.example;IP:10.0.0.18

- ``id`` (required): the device id (HTTP user name; no ``:``);
- ``password``: may be empty when ``factory_cert`` is given;
- ``factory_cert``: a PEM or DER file, relative to the CSV file's directory;
- ``cn``: the commonName requests must carry (empty: the device id);
- ``single_use``: yes/no, true/false, 1/0 (empty: no);
- ``subject_values``: ``NAME=VALUE`` pairs separated by ``;`` (see
  :mod:`estgw.factory`; an empty VALUE matches anything);
- ``sans``: subjectAltNames the device may carry, ``KIND:VALUE``
  (``DNS``, ``IP``, ``email``, ``URI``) separated by ``;`` (percent-encode
  a ``;`` in a URI).

Registered names are what a device may be called besides its id (see
:func:`estgw.policy.device_names`); each is checked as a name here.

Rows are checked one by one; a bad row is reported with its line number
and the good rows are imported all the same.  The file holds passwords in
clear: delete it once imported.
"""

from __future__ import annotations

import csv
import os
from typing import Iterable, Sequence

import attr
from cryptography import x509
from cryptography.x509.oid import NameOID

from estgw import factory, names
from estgw.auth import digest_ha1
from estgw.config import Config
from estgw.passwords import DEFAULT_N, hash_password
from estgw.store import Device, DuplicateDevice, DuplicateFactoryCertificate, IStore, certificate_fingerprint

__all__ = [
    "Registration",
    "digest_realms",
    "check_device_id",
    "build_device",
    "read_csv",
    "ImportResult",
    "import_devices",
    "CSV_COLUMNS",
]

CSV_COLUMNS = ("id", "password", "factory_cert", "cn", "single_use", "subject_values", "sans")
_TRUE = ("yes", "true", "1", "on")
_FALSE = ("no", "false", "0", "off", "")


@attr.s(frozen=True, auto_attribs=True)
class Registration:
    """What an operator asks to register for one device."""

    device_id: str
    password: str | None = attr.ib(default=None, repr=False)
    factory_cert: x509.Certificate | None = None
    factory_cn: str | None = None
    subject_values: tuple[tuple[str, str], ...] = ()
    single_use: bool = False


def digest_realms(config: Config) -> tuple[str, ...]:
    """The realms of the handlers that take HTTP Digest."""
    return tuple(sorted({h.realm or "" for h in config.handlers if h.authtype == "Digest"}))


def check_device_id(text: str) -> str:
    """A device id: 1-128 printable characters, no ``:`` (HTTP Basic ends
    the user name at the first colon), no surrounding spaces."""
    if not text or len(text) > 128:
        raise ValueError("a device id has 1 to 128 characters")
    if text != text.strip() or not text.isprintable():
        raise ValueError(f"device id {text!r} has surrounding spaces or control characters")
    if ":" in text:
        raise ValueError(f"device id {text!r} contains ':', which HTTP Basic cannot carry")
    return text


def check_registration(registration: Registration) -> Registration:
    check_device_id(registration.device_id)
    if registration.password is None and registration.factory_cert is None:
        raise ValueError("give a password, a factory certificate, or both")
    if registration.password is not None and not registration.password:
        raise ValueError("the password is empty")
    if registration.factory_cert is None and registration.factory_cn:
        raise ValueError("a commonName other than the device id needs a factory certificate")
    # The id (or --cn) is the commonName of every certificate the device gets.
    common_name = registration.factory_cn or registration.device_id
    try:
        names.check_value(NameOID.COMMON_NAME, common_name)
    except names.BadName as e:
        raise ValueError(f"{e}; the device's commonName is its id or --cn") from None
    # Each registered value may be used once: registered twice it could
    # be used twice (a duplicated serialNumber, the same dNSName twice).
    seen: list[tuple[str, str]] = []
    for name, value in registration.subject_values:
        if any(n == name and factory.same_value(n, v, value) for n, v in seen if v and value):
            separator = ":" if name in factory.SAN_KINDS else "="
            raise ValueError(f"{name}{separator}{names.shown(value)} is registered twice")
        seen.append((name, value))
    return registration


def build_device(registration: Registration, realms: Iterable[str], scrypt_n: int = DEFAULT_N) -> Device:
    """The store record: hashes only (scrypt cost ``scrypt_n``, from
    ``auth.scrypt.n``).  Blocks for the scrypt hash (tens of
    milliseconds): for the CLI, not for the reactor thread of a server."""
    check_registration(registration)
    password = registration.password
    return Device(
        device_id=registration.device_id,
        password_hash=None if password is None else hash_password(password, scrypt_n),
        single_use=registration.single_use,
        factory_cert_sha256=(
            None if registration.factory_cert is None else certificate_fingerprint(registration.factory_cert)
        ),
        factory_cn=registration.factory_cn or None,
        subject_values=registration.subject_values,
        digest_ha1=(
            () if password is None
            else tuple((realm, digest_ha1(registration.device_id, realm, password)) for realm in realms)
        ),
    )


# -- CSV --------------------------------------------------------------------------


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"single_use must be yes or no, not {text!r}")


def _subject_values(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(factory.parse_subject_value(item) for item in text.split(";") if item.strip())


def _sans(text: str) -> tuple[tuple[str, str], ...]:
    return tuple(factory.parse_san(item) for item in text.split(";") if item.strip())


def _row(fields: dict[str, str], base_dir: str) -> Registration:
    cert_path = fields.get("factory_cert", "").strip()
    cert = factory.read_certificate(os.path.join(base_dir, cert_path)) if cert_path else None
    password = fields.get("password", "")
    return check_registration(
        Registration(
            device_id=fields.get("id", "").strip(),
            password=password if password else None,
            factory_cert=cert,
            factory_cn=fields.get("cn", "").strip() or None,
            subject_values=_subject_values(fields.get("subject_values", "")) + _sans(fields.get("sans", "")),
            single_use=_bool(fields.get("single_use", "")),
        )
    )


def read_csv(path: str) -> list[tuple[int, Registration | ValueError]]:
    """(line number, registration or what is wrong with that row) for every
    data row.  ValueError for a file that cannot be read or whose header
    is wrong: then no row can be trusted."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    reader = csv.reader(lines)
    try:
        header = [name.strip().lower() for name in next(reader)]
    except StopIteration:
        raise ValueError(f"{path} is empty: expected a header row ({','.join(CSV_COLUMNS)})") from None
    unknown = [name for name in header if name not in CSV_COLUMNS]
    if unknown or "id" not in header or len(set(header)) != len(header):
        raise ValueError(
            f"{path} line 1: the header must name the columns {','.join(CSV_COLUMNS)}"
            " (id required, each at most once, any order)"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
        )
    base_dir = os.path.dirname(os.path.abspath(path))
    rows: list[tuple[int, Registration | ValueError]] = []
    line = reader.line_num + 1
    for values in reader:
        start, line = line, reader.line_num + 1
        if not any(value.strip() for value in values):
            continue  # blank line
        if len(values) != len(header):
            rows.append((start, ValueError(f"expected {len(header)} fields, found {len(values)}")))
            continue
        try:
            rows.append((start, _row(dict(zip(header, values)), base_dir)))
        except ValueError as e:
            rows.append((start, e))
    return rows


@attr.s(auto_attribs=True)
class ImportResult:
    imported: list[str] = attr.Factory(list)
    bad: list[tuple[int, str]] = attr.Factory(list)  # (line, reason)
    existing: list[tuple[int, str]] = attr.Factory(list)  # (line, device id) already registered


async def import_devices(
    store: IStore,
    rows: Sequence[tuple[int, Registration | ValueError]],
    realms: Sequence[str],
    scrypt_n: int = DEFAULT_N,
) -> ImportResult:
    """Register every good row; collect the bad ones and the devices
    already registered (left as they are) with their line numbers."""
    result = ImportResult()
    seen: dict[str, int] = {}
    for line, row in rows:
        if isinstance(row, ValueError):
            result.bad.append((line, str(row)))
            continue
        if row.device_id in seen:  # a mistake in the file, not a re-run
            result.bad.append((line, f"device {row.device_id!r} is already on line {seen[row.device_id]}"))
            continue
        seen[row.device_id] = line
        try:
            await store.add_device(build_device(row, realms, scrypt_n))
        except DuplicateFactoryCertificate as e:
            result.bad.append((line, str(e)))
        except DuplicateDevice:
            result.existing.append((line, row.device_id))
        except ValueError as e:
            result.bad.append((line, str(e)))
        else:
            result.imported.append(row.device_id)
    return result


def describe(result: ImportResult, total: int) -> str:
    return (
        f"imported {len(result.imported)} of {total} device(s);"
        f" {len(result.existing)} already registered (left unchanged);"
        f" {len(result.bad)} bad row(s) not imported"
    )
