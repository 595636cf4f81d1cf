"""Key types by name: what ``ca.keyType`` / ``tls.keyType`` create,
``serverkeygen.keyType`` generates and a ``csrattrs.template`` announces
(``key: ec-p256``).  The one list of them.

=========  ===========================================
name       key
=========  ===========================================
ec-p256    ECDSA on NIST P-256 (secp256r1), the default
ec-p384    ECDSA on NIST P-384 (secp384r1)
rsa-2048   RSA, 2048-bit modulus, exponent 65537
rsa-3072   RSA, 3072-bit modulus
rsa-4096   RSA, 4096-bit modulus
ed25519    Ed25519 (RFC 8410)
=========  ===========================================
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
DEFAULT_KEY_TYPE = "ec-p256"

_CURVES: dict[str, type[ec.EllipticCurve]] = {"ec-p256": ec.SECP256R1, "ec-p384": ec.SECP384R1}

# Public key algorithm and curve OIDs (RFC 5480, RFC 8410).
EC_PUBLIC_KEY = "1.2.840.10045.2.1"
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
ED25519 = "1.3.101.112"
CURVE_OIDS = {"ec-p256": "1.2.840.10045.3.1.7", "ec-p384": "1.3.132.0.34"}


def parse_key_type(value: str) -> str:
    """One of :data:`KEY_TYPES`, in any case.

    :raises ValueError: naming the allowed values.
    """
    name = value.strip().lower()
    if name not in KEY_TYPES:
        raise ValueError(f"must be one of {', '.join(KEY_TYPES)}, not {value.strip()!r}")
    return name


def rsa_bits(name: str) -> int | None:
    """The modulus size of an ``rsa-N`` key type, else None."""
    return int(name[len("rsa-"):]) if name.startswith("rsa-") else None


def generate(name: str) -> Any:
    """A new private key of the key type ``name``.  RSA takes up to a
    second or more: call it on a thread, never on the reactor."""
    if name in _CURVES:
        return ec.generate_private_key(_CURVES[name]())
    bits = rsa_bits(name)
    if bits is not None:
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if name == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key type {name!r}")


def key_type_of(key: Any) -> str | None:
    """The :data:`KEY_TYPES` name of a public or private key, or None when none fits."""
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        for name, curve in _CURVES.items():
            if isinstance(key.curve, curve):
                return name
        return None
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        name = f"rsa-{key.key_size}"
        return name if name in KEY_TYPES else None
    if isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey)):
        return "ed25519"
    return None


def describe(public_key: Any) -> str:
    """A short name of any public key, for reasons: ``ec-p521``, ``rsa-2050``."""
    known = key_type_of(public_key)
    if known is not None:
        return known
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return f"ec-{public_key.curve.name}"
    if isinstance(public_key, rsa.RSAPublicKey):
        return f"rsa-{public_key.key_size}"
    return type(public_key).__name__.replace("PublicKey", "").lower() or "unknown"
