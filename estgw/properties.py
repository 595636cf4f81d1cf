"""A reader for Java-properties files (the syntax of ``est.properties``).

Only what the format defines: ``key = value``, ``key: value`` or
``key value``; ``#``/``!`` comments; a trailing backslash continues the
line; ``\\t``, ``\\n``, ``\\uXXXX`` and escaped separators in keys.  A key
given twice is an error here, unlike in Java, because the second line
silently winning has hidden more than one misconfiguration.
"""

from __future__ import annotations

import re
from typing import Iterator

_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f"}
_UNICODE = re.compile(r"\\u([0-9a-fA-F]{4})")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BLANK = " \t\f"  # what Java counts as white space in this format


class PropertiesError(ValueError):
    """A line of the file cannot be read."""


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    pending: list[str] = []
    start = 0
    # Only CR, LF and CRLF end a line (str.splitlines also splits on form
    # feeds and Unicode separators, which may sit inside a value).
    for number, raw in enumerate(_LINE_BREAK.split(text), 1):
        line = raw.lstrip(_BLANK)
        if not pending:
            start = number
            if not line or line[0] in "#!":
                continue
        # An odd number of backslashes at the very end continues the line.
        # As in Java, "\\ " at the end is an escaped space, not a
        # continuation: it must not swallow the next line.
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending.append(line[:-1])
            continue
        pending.append(line)
        yield start, "".join(pending)
        pending = []
    if pending:
        yield start, "".join(pending)


def _unescape(text: str, line: int) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        if i + 1 >= len(text):
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "u":
            match = _UNICODE.match(text, i)
            if match is None:
                raise PropertiesError(f"line {line}: malformed \\uXXXX escape")
            out.append(chr(int(match.group(1), 16)))
            i = match.end()
            continue
        out.append(_ESCAPES.get(nxt, nxt))
        i += 2
    return "".join(out)


def _split(line: str) -> tuple[str, str]:
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\":
            i += 2
            continue
        if char in "=:" or char in _BLANK:
            break
        i += 1
    key = line[:i]
    rest = line[i:].lstrip(_BLANK)
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip(_BLANK)
    return key, rest


def parse_properties(text: str) -> dict[str, tuple[str, int]]:
    """Return ``{key: (value, line number)}``; raise PropertiesError."""
    result: dict[str, tuple[str, int]] = {}
    for number, line in _logical_lines(text):
        raw_key, raw_value = _split(line)
        key = _unescape(raw_key, number)
        if not key:
            raise PropertiesError(f"line {number}: a value without a key")
        if key in result:
            raise PropertiesError(
                f"line {number}: {key} is already set on line {result[key][1]}"
            )
        result[key] = (_unescape(raw_value, number), number)
    return result
