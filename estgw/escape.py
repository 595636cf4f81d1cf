"""One line of printable text from a value a client chose.

Subjects, SANs, device ids, user names, URL paths and header values come
from devices.  Printed raw, a newline forges a log line or a CLI table
row, and an escape sequence rewrites the operator's terminal.  Every
place that prints or logs such a value passes it through
:func:`printable` (in a reason, a log field, a CLI cell).
"""

from __future__ import annotations

__all__ = ["printable"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(character: str) -> str:
    if character in _NAMED:
        return _NAMED[character]
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(value: object) -> str:
    """``value`` as text with every character that is not printable
    (``str.isprintable``: C0/C1 controls and DEL, line and paragraph
    separators, bidirectional and other format characters, unassigned
    code points, lone surrogates, spaces other than U+0020) written as a
    Python-style escape: ``\\n``, ``\\x1b``, ``\\u2028``.

    Bytes are decoded as UTF-8, undecodable bytes shown as ``\\xNN``.  A
    backslash is left as it is, so escaping twice changes nothing and
    RFC 4514 strings keep their own escapes; the result is one line.
    """
    if isinstance(value, bytes):
        text = value.decode("utf-8", "backslashreplace")
    else:
        text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)
