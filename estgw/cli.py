"""``estgw --config FILE <command>``: the operator's commands.

Each command opens the same store the daemon uses (SQLite allows both at
once) and prints one clear line per outcome; errors go to stderr with a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from typing import Any, Sequence

from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet import defer, task

from estgw import bootstrap, config as config_module
from estgw.ca import CAError
from estgw.config import Config, ConfigError
from estgw.passwords import hash_password
from estgw.store import REVOCATION_REASONS, Device, DuplicateDevice, IssuedCertificate, IStore, UnknownCertificate


class CommandError(Exception):
    """An operator mistake: printed as ``estgw: <message>``, exit status 1."""


def parse_serial(text: str) -> int:
    """Serials are shown in hex; accept that, with or without 0x or colons."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16)
    except ValueError:
        raise CommandError(f"not a serial number (hex expected): {text!r}") from None


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


# -- commands: each is async (options, config, store, out) -> None ----------


async def cmd_init(options: Any, config: Config, store: IStore, out: Any) -> None:
    out.write(f"state directory: {config.state_directory}\n")
    out.write(f"CA certificate:  {config.ca_certificate_path}\n")
    out.write(f"store:           {config.store_path}\n")


def _read_password(options: Any) -> str:
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
        raise CommandError("device add needs --password or --password-file")
    if not password:
        raise CommandError("the password is empty")
    return password


async def cmd_device_add(options: Any, config: Config, store: IStore, out: Any) -> None:
    device_id = options["id"]
    password = _read_password(options)
    device = Device(
        device_id=device_id,
        password_hash=hash_password(password),  # blocking is fine: no one else waits
        single_use=bool(options["single_use"]),
    )
    try:
        await store.add_device(device)
    except DuplicateDevice:
        raise CommandError(f"device {device_id!r} is already registered") from None
    out.write(f"registered device {device_id}\n")


async def cmd_device_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    devices = await store.list_devices()
    if not devices:
        out.write("no devices registered\n")
        return
    out.write(f"{'DEVICE':<32} {'AUTH':<10} {'SINGLE-USE':<10} {'REGISTERED':<20} CONSUMED\n")
    for d in devices:
        auth = "password" if d.password_hash else "-"
        single = "yes" if d.single_use else "no"
        out.write(f"{d.device_id:<32} {auth:<10} {single:<10} {_when(d.created_at):<20} {_when(d.consumed_at)}\n")


async def cmd_device_remove(options: Any, config: Config, store: IStore, out: Any) -> None:
    if not await store.remove_device(options["id"]):
        raise CommandError(f"no device {options['id']!r}")
    out.write(f"removed device {options['id']}\n")


def _status(c: IssuedCertificate) -> str:
    if c.revoked:
        return "revoked"
    if c.not_after < datetime.now(timezone.utc):
        return "expired"
    return "valid"


async def cmd_cert_list(options: Any, config: Config, store: IStore, out: Any) -> None:
    certs = await store.list_certificates(options["subject"])
    if not certs:
        out.write("no certificates issued\n")
        return
    out.write(f"{'SERIAL':<42} {'STATUS':<8} {'NOT AFTER':<20} {'SUBJECT':<40} REQUESTER\n")
    for c in certs:
        out.write(f"{c.serial:<42x} {_status(c):<8} {_when(c.not_after):<20} {c.subject:<40} {c.requester}\n")


async def _get(store: IStore, serial_text: str) -> IssuedCertificate:
    serial = parse_serial(serial_text)
    issued = await store.get_certificate(serial)
    if issued is None:
        raise CommandError(f"no certificate with serial {serial:x}")
    return issued


async def cmd_cert_show(options: Any, config: Config, store: IStore, out: Any) -> None:
    c = await _get(store, options["serial"])
    rows = [
        ("serial", f"{c.serial:x}"),
        ("subject", c.subject),
        ("subjectAltName", ", ".join(c.sans) or "-"),
        ("not before", _when(c.not_before)),
        ("not after", _when(c.not_after)),
        ("status", _status(c)),
        ("revoked at", _when(c.revoked_at)),
        ("revocation reason", c.revocation_reason or "-"),
        ("public key SHA-256", c.public_key_sha256),
        ("handler", c.handler),
        ("requester", c.requester),
        ("issued at", _when(c.issued_at)),
    ]
    for name, value in rows:
        out.write(f"{name + ':':<20} {value}\n")
    out.write(c.certificate.public_bytes(Encoding.PEM).decode("ascii"))


async def cmd_cert_revoke(options: Any, config: Config, store: IStore, out: Any) -> None:
    serial = parse_serial(options["serial"])
    try:
        issued = await store.revoke_certificate(serial, options["reason"])
    except UnknownCertificate:
        raise CommandError(f"no certificate with serial {serial:x}") from None
    out.write(f"revoked {serial:x} ({issued.subject}) at {_when(issued.revoked_at)}\n")


# -- argument parsing -------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="estgw", description="Operator commands of the estgw EST gateway."
    )
    parser.add_argument("-c", "--config", default="etc/est.properties", help="the est.properties file")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = commands.add_parser("init", help="create the CA, TLS credentials and store (idempotent)")
    init.set_defaults(run=cmd_init)

    device = commands.add_parser("device", help="pre-registered devices").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = device.add_parser("add", help="pre-register a device for HTTP authentication")
    add.add_argument("id")
    add.add_argument("--password", help="the password (visible in ps; prefer --password-file)")
    add.add_argument("--password-file", help="read the password from the first line of this file")
    add.add_argument("--single-use", action="store_true", help="consumed by the first certificate issued")
    add.set_defaults(run=cmd_device_add)
    device.add_parser("list", help="list pre-registered devices").set_defaults(run=cmd_device_list)
    remove = device.add_parser("remove", help="remove a pre-registered device")
    remove.add_argument("id")
    remove.set_defaults(run=cmd_device_remove)

    cert = commands.add_parser("cert", help="issued certificates").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    listing = cert.add_parser("list", help="list issued certificates, newest first")
    listing.add_argument("--subject", help="only this subject (RFC 4514 string)")
    listing.set_defaults(run=cmd_cert_list)
    show = cert.add_parser("show", help="show one certificate and its PEM")
    show.add_argument("serial", help="the serial number in hex")
    show.set_defaults(run=cmd_cert_show)
    revoke = cert.add_parser("revoke", help="revoke a certificate; refused from the next request on")
    revoke.add_argument("serial", help="the serial number in hex")
    revoke.add_argument(
        "--reason", default="unspecified", choices=sorted(REVOCATION_REASONS), help="RFC 5280 reason"
    )
    revoke.set_defaults(run=cmd_cert_revoke)
    return parser


async def run(reactor: Any, argv: Sequence[str], out: Any = sys.stdout) -> None:
    """Parse ``argv`` and run the command; raise CommandError on failure."""
    options = _parser().parse_args(list(argv))  # exits 2 with usage on a mistake
    try:
        config = config_module.load(options.config)
        bootstrap.initialize(config)
    except (ConfigError, CAError) as e:
        raise CommandError(str(e)) from None
    store = bootstrap.open_store(config, reactor)
    await store.start()
    try:
        await options.run(vars(options), config, store, out)
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)

    async def _main(reactor: Any) -> None:
        try:
            await run(reactor, arguments)
        except CommandError as e:
            sys.stderr.write(f"estgw: {e}\n")
            raise SystemExit(1)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(_main(reactor)))
