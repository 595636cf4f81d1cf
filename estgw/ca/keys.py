"""Key types, the signature algorithm each key signs with, and key passphrases.

Names are those of ``ca.keyType`` / ``tls.keyType``; the signature
algorithm always follows the key (RFC 5758 for ECDSA, RFC 8410 for
Ed25519, RFC 4055 for RSASSA-PSS), so no setting can pair a key with a
hash it should not use.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

from estgw.ca import CAError, PrivateKey

#: ``ca.keyType`` / ``tls.keyType`` values; the first is the default.
KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
DEFAULT_KEY_TYPE = "ec-p256"
#: ``ca.rsaPadding`` values: how an RSA CA key signs.
RSA_PADDINGS: tuple[str, ...] = ("pkcs1v15", "pss")

_CURVES = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}


def new_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A fresh private key of ``key_type`` (one of :data:`KEY_TYPES`); ValueError otherwise."""
    if key_type in _CURVES:
        # EC P-256 is the default: an ECDSA signature costs tens of
        # microseconds against about a millisecond for RSA-2048, and every
        # TLS 1.2+ stack and EST client we target verifies it.
        return ec.generate_private_key(_CURVES[key_type]())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {key_type!r} (known: {', '.join(KEY_TYPES)})")


def key_type_of(key: Any) -> str | None:
    """The :data:`KEY_TYPES` name of a private or public key, or None for others."""
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        for name, curve in _CURVES.items():
            if isinstance(key.curve, curve):
                return name
        return None
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        name = f"rsa-{key.key_size}"
        return name if name in KEY_TYPES else None
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "ed25519"
    return None


def signature_hash(key: Any) -> hashes.HashAlgorithm | None:
    """The hash ``key`` signs with: None for EdDSA (the algorithm fixes it),
    SHA-384 for P-384, SHA-512 for P-521, SHA-256 otherwise."""
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size >= 521:
            return hashes.SHA512()
        if key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def sign_arguments(key: Any, rsa_padding: str = "pkcs1v15") -> dict[str, Any]:
    """Keyword arguments for cryptography's ``Builder.sign(key, **...)``:
    ``algorithm`` and, for RSA with ``rsa_padding = "pss"``, RSASSA-PSS
    with MGF1 and a salt as long as the hash (RFC 4055 §3.1)."""
    algorithm = signature_hash(key)
    arguments: dict[str, Any] = {"algorithm": algorithm}
    if isinstance(key, rsa.RSAPrivateKey) and rsa_padding == "pss":
        assert algorithm is not None
        arguments["rsa_padding"] = padding.PSS(
            mgf=padding.MGF1(algorithm), salt_length=padding.PSS.DIGEST_LENGTH
        )
    return arguments


def read_passphrase(path: str = "", environment: str = "") -> bytes | None:
    """The passphrase of an encrypted key: the first line of the file
    ``path``, else the value of the environment variable ``environment``,
    else None (the key is not encrypted). Raises CAError when the file
    cannot be read or the variable is unset or either is empty."""
    if path:
        try:
            with open(path, "rb") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise CAError(f"cannot read {path}: {e.strerror}") from None
        if not lines or not lines[0]:
            raise CAError(f"{path} is empty; its first line is the key's passphrase")
        return lines[0]
    if environment:
        value = os.environ.get(environment)
        if not value:
            raise CAError(f"the environment variable {environment} is unset or empty")
        return value.encode("utf-8")
    return None


def key_encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    """How to write a key at rest: encrypted PKCS#8 with ``passphrase``, else unencrypted."""
    if passphrase is None:
        return serialization.NoEncryption()
    return serialization.BestAvailableEncryption(passphrase)
