"""How estgw writes a certificate serial number: one spelling everywhere
(``cert list``, the human log, the JSON audit file), the one ``openssl
x509 -serial`` prints, so that a serial copied from one is found in the
others."""

from __future__ import annotations

__all__ = ["format_serial"]


def format_serial(serial: int) -> str:
    """A serial number as ``openssl x509 -serial`` prints it: upper-case
    hex, whole octets (so with its leading zero), e.g. ``0A1B``."""
    text = f"{serial:X}"
    return "0" + text if len(text) % 2 else text
