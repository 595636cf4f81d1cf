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

from estgw import keytypes
from estgw.ca import CAError, PrivateKey
# ca.keyType / tls.keyType take the key type names of estgw.keytypes.
from estgw.keytypes import DEFAULT_KEY_TYPE, KEY_TYPES, key_type_of

__all__ = [
    "DEFAULT_KEY_TYPE", "KEY_TYPES", "RSA_PADDINGS", "key_type_of", "new_key", "signature_hash",
    "sign_arguments", "read_passphrase", "key_encryption",
]

#: ``ca.rsaPadding`` values: how an RSA CA key signs.
RSA_PADDINGS: tuple[str, ...] = ("pkcs1v15", "pss")


def new_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A fresh private key of ``key_type`` (one of :data:`KEY_TYPES`); ValueError otherwise."""
    # EC P-256 is the default: an ECDSA signature costs tens of
    # microseconds against about a millisecond for RSA-2048, and every
    # TLS 1.2+ stack and EST client we target verifies it.
    return keytypes.generate(key_type)


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
