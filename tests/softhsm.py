"""A SoftHSM2 token store for tests: tokens, keys in them, and issuing CA
certificates for those keys signed by a test root.  Keys made here are
test data.

A PKCS#11 module reads its configuration once per process (C_Initialize),
so this process has one SoftHSM2 configuration (:func:`shared`), in a
temporary directory removed at exit; twistd subprocesses get it through
``SOFTHSM2_CONF`` in :meth:`SoftHSM.environment`.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import subprocess
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from estgw.testing import cert_pem, name, new_key, write

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
PIN = "4711-test"
SO_PIN = "0815-so"
#: The token :func:`shared` makes before anything loads the module.
TOKEN = "estgw-test"
#: The keys :func:`shared` makes in :data:`TOKEN`, labelled ``issuing-<kind>``.
KINDS = ("rsa-2048", "ec-p256", "ec-p384")
#: The token and key of README.rst's example (public key: ``public_keys["readme"]``).
README_TOKEN, README_KEY = "estgw-ca", "issuing-ca"


def module_path() -> str | None:
    for candidate in MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    return None


class SoftHSM:
    """SoftHSM2 tokens in one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(os.path.join(directory, "tokens"), exist_ok=True)
        self.conf = write(
            os.path.join(directory, "softhsm2.conf"),
            f"directories.tokendir = {directory}/tokens\nobjectstore.backend = file\nlog.level = ERROR\n".encode(),
        )
        self.module = module_path()
        self.pin_file = write(os.path.join(directory, "pin"), PIN.encode() + b"\n")
        self._tokens: set[str] = set()
        self.public_keys: dict[str, Any] = {}

    def environment(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": self.conf}

    def token(self, label: str) -> str:
        """Initialise a token labelled ``label`` (once) with the user PIN :data:`PIN`."""
        if label not in self._tokens:
            subprocess.run(
                ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
                env=self.environment(), check=True, capture_output=True, timeout=60,
            )
            self._tokens.add(label)
        return label

    def generate(self, token: str, label: str, kind: str) -> Any:
        """A key pair ``label`` ("rsa-2048", "ec-p256", "ec-p384") made inside ``token``;
        returns its public key as a cryptography object."""
        from pkcs11 import Attribute, KeyType
        from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

        from estgw.ca.pkcs11 import _module

        # SoftHSM2 reads its configuration and finds its tokens when the
        # module is loaded (once per process): the token comes first.
        self.token(token)
        os.environ["SOFTHSM2_CONF"] = self.conf
        assert self.module is not None
        with _module(self.module).get_token(token_label=token).open(user_pin=PIN, rw=True) as session:
            if kind.startswith("rsa-"):
                public, _ = session.generate_keypair(KeyType.RSA, int(kind[4:]), label=label, store=True)
                return rsa.RSAPublicNumbers(
                    int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
                    int.from_bytes(public[Attribute.MODULUS], "big"),
                ).public_key()
            curve = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}[kind]
            parameters = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(curve)}, local=True
            )
            public, _ = parameters.generate_keypair(label=label, store=True)
            return serialization.load_der_public_key(encode_ec_public_key(public))


_shared: SoftHSM | None = None


def shared() -> SoftHSM:
    """This process's SoftHSM2 (see the module docstring)."""
    global _shared
    if _shared is None:
        directory = tempfile.mkdtemp(prefix="estgw-softhsm-")
        atexit.register(shutil.rmtree, directory, True)
        _shared = SoftHSM(directory)
        _shared.token(TOKEN)
        _shared.token(README_TOKEN)
        for kind in KINDS:
            _shared.public_keys[kind] = _shared.generate(TOKEN, f"issuing-{kind}", kind)
        _shared.public_keys["readme"] = _shared.generate(README_TOKEN, README_KEY, "ec-p256")
    return _shared


def readme_example(marker: str) -> str:
    """The literal block of README.rst that follows the paragraph holding ``marker``."""
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.rst")
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    after = text[text.index(marker):]
    lines = after[after.index("::\n") + 3:].splitlines()
    block: list[str] = []
    for line in lines:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line[4:])
    return "\n".join(block).strip() + "\n"


def skip_reason() -> str | None:
    """Why PKCS#11 tests cannot run here, or None."""
    if module_path() is None or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (Debian package softhsm2; .ci/run installs it)"
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return "python-pkcs11 is not installed"
    return None


class TestRoot:
    """A root CA (software key) that certifies issuing CA keys held in tokens."""

    def __init__(self, common_name: str = "HSM Test Root CA") -> None:
        self.key = new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = name(common_name, organization_name="estgw tests")
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def issuing(self, public_key: Any, common_name: str, ca: bool = True) -> x509.Certificate:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder().subject_name(name(common_name, organization_name="estgw tests"))
            .issuer_name(self.cert.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=20))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
            .add_extension(
                x509.KeyUsage(not ca, False, False, False, False, ca, ca, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )

    def write_issuing(self, directory: str, public_key: Any, common_name: str) -> tuple[str, str]:
        """(issuing certificate file, chain file holding the root)."""
        cert = self.issuing(public_key, common_name)
        stem = os.path.join(directory, common_name.replace(" ", "-"))
        return write(stem + ".pem", cert_pem(cert)), write(stem + "-chain.pem", cert_pem(self.cert))
