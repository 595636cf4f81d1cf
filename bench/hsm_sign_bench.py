"""Signing rate of an issuing key in a PKCS#11 token against the embedded CA.

Makes a SoftHSM2 token in a temporary directory (``softhsm2-util``),
generates an RSA-2048 and a P-256 issuing key inside it, certifies them
with a throw-away root, and times what a token procedure does per
enrollment: :meth:`estgw.ca.pkcs11.Pkcs11CA.sign` (build, sign in the
token, assemble, verify) and, for comparison, :meth:`estgw.ca.LocalCA.sign`
(the embedded P-256 CA, key in memory).  One thread, one certificate at
a time: the token's session is used under a lock, so this is also the
ceiling of one gateway process per token.

Prints a table (signatures per second, ms per certificate) and exits 0.
The machine may be shared: compare rows within one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout without installing estgw

PIN = "1234-bench"


def _time(sign: Callable[[], Any], seconds: float) -> tuple[int, float, float]:
    """(certificates, per second, median ms) signing for about ``seconds``."""
    durations: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        sign()
        durations.append(time.perf_counter() - start)
    total = sum(durations)
    return len(durations), len(durations) / total, statistics.median(durations) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per row (default 3)")
    parser.add_argument("--module", default="/usr/lib/softhsm/libsofthsm2.so", help="SoftHSM2's PKCS#11 module")
    options = parser.parse_args(argv)
    if not os.path.exists(options.module) or shutil.which("softhsm2-util") is None:
        print("SoftHSM2 is not installed (Debian package softhsm2)", file=sys.stderr)
        return 1

    directory = tempfile.mkdtemp(prefix="estgw-sign-bench-")
    try:
        os.makedirs(os.path.join(directory, "tokens"))
        conf = os.path.join(directory, "softhsm2.conf")
        with open(conf, "w") as f:
            f.write(f"directories.tokendir = {directory}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n")
        os.environ["SOFTHSM2_CONF"] = conf  # before the module is loaded
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", PIN, "--so-pin", PIN],
            check=True, capture_output=True,
        )
        return _run(options, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(options: Any, directory: str) -> int:
    import cryptography
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from pkcs11 import Attribute, KeyType
    from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

    from estgw.ca import IssueRequest, LocalCA, Profile
    from estgw.ca.pkcs11 import Pkcs11CA, _module, open_token_key
    from estgw.testing import name

    local = LocalCA.load_or_create(os.path.join(directory, "local-ca"), "bench")
    token = _module(options.module).get_token(token_label="bench")
    publics: dict[str, Any] = {}
    with token.open(user_pin=PIN, rw=True) as session:
        public, _ = session.generate_keypair(KeyType.RSA, 2048, label="rsa-2048", store=True)
        publics["rsa-2048"] = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        ).public_key()
        parameters = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        public, _ = parameters.generate_keypair(label="ec-p256", store=True)
        publics["ec-p256"] = serialization.load_der_public_key(encode_ec_public_key(public))

    profile = Profile()
    device_key = ec.generate_private_key(ec.SECP256R1())
    request = IssueRequest(name("bench-device"), device_key.public_key(), (x509.DNSName("bench-device"),))
    rows = []
    for kind in ("rsa-2048", "ec-p256"):
        # The token's key certified as an issuing CA by the embedded root.
        issuing = _as_ca(local, publics[kind], kind)
        login, key = open_token_key(options.module, "bench", kind, PIN)
        ca = Pkcs11CA(issuing, [local.root], login, key, f"token bench (key {kind})")
        count, rate, median = _time(lambda: ca.sign(request, profile), options.seconds)
        rows.append((f"SoftHSM2 {kind} (PKCS#11)", count, rate, median))
    count, rate, median = _time(lambda: local.sign(request, profile), options.seconds)
    rows.append(("embedded CA ec-p256 (in memory)", count, rate, median))

    print(f"estgw hsm_sign_bench: {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}, cryptography {cryptography.__version__}, "
          f"python-pkcs11 {_version('python-pkcs11')}, {options.seconds:g} s per row")
    print(f"{'issuing key':34} {'certs':>7} {'certs/s':>9} {'ms/cert':>8}")
    for label, count, rate, median in rows:
        print(f"{label:34} {count:7d} {rate:9.0f} {median:8.2f}")
    return 0


def _version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


def _as_ca(local: Any, public_key: Any, kind: str) -> Any:
    """An issuing CA certificate for ``public_key``, signed by the embedded root."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from estgw.ca.local import ROOT_KEY

    with open(os.path.join(local.directory, ROOT_KEY), "rb") as f:
        root_key: Any = serialization.load_pem_private_key(f.read(), None)  # the root's EC or RSA key
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"bench {kind} issuing CA")]))
        .issuer_name(local.root.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )


if __name__ == "__main__":
    sys.exit(main())
