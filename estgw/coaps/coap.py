"""CoAP messages (RFC 7252 §3) and block-wise transfer options (RFC 7959).

A small codec: what EST over CoAPs needs, fully checked on the way in.
Malformed input raises :class:`MessageFormatError`; nothing here does I/O.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import attr

VERSION = 1

# Message types (RFC 7252 §3).
CON, NON, ACK, RST = 0, 1, 2, 3

# Method and response codes as (class << 5) | detail (RFC 7252 §12.1).
def code(klass: int, detail: int) -> int:
    return (klass << 5) | detail


EMPTY = 0
GET, POST, PUT, DELETE, FETCH = 1, 2, 3, 4, 5
METHOD_NAMES = {GET: "GET", POST: "POST", PUT: "PUT", DELETE: "DELETE", FETCH: "FETCH"}

CREATED = code(2, 1)
CHANGED = code(2, 4)
CONTENT = code(2, 5)
CONTINUE = code(2, 31)
BAD_REQUEST = code(4, 0)
UNAUTHORIZED = code(4, 1)
BAD_OPTION = code(4, 2)
FORBIDDEN = code(4, 3)
NOT_FOUND = code(4, 4)
METHOD_NOT_ALLOWED = code(4, 5)
NOT_ACCEPTABLE = code(4, 6)
REQUEST_ENTITY_INCOMPLETE = code(4, 8)
CONFLICT = code(4, 9)
REQUEST_ENTITY_TOO_LARGE = code(4, 13)
UNSUPPORTED_CONTENT_FORMAT = code(4, 15)
INTERNAL_SERVER_ERROR = code(5, 0)
NOT_IMPLEMENTED = code(5, 1)
SERVICE_UNAVAILABLE = code(5, 3)


def code_text(value: int) -> str:
    """``"4.03"`` for 131: the dotted form RFC 7252 §3 writes codes in."""
    return f"{value >> 5}.{value & 0x1F:02d}"


# Option numbers (RFC 7252 §5.10, RFC 7959 §2.1).
IF_MATCH = 1
URI_HOST = 3
ETAG = 4
IF_NONE_MATCH = 5
OBSERVE = 6
URI_PORT = 7
LOCATION_PATH = 8
URI_PATH = 11
CONTENT_FORMAT = 12
MAX_AGE = 14
URI_QUERY = 15
ACCEPT = 17
LOCATION_QUERY = 20
BLOCK2 = 23
BLOCK1 = 27
SIZE2 = 28
PROXY_URI = 35
PROXY_SCHEME = 39
SIZE1 = 60
# Options this server understands; an unknown critical (odd-numbered)
# option in a request is answered 4.02 (RFC 7252 §5.4.1).
KNOWN_OPTIONS = frozenset({
    IF_MATCH, URI_HOST, ETAG, IF_NONE_MATCH, OBSERVE, URI_PORT, URI_PATH, CONTENT_FORMAT,
    MAX_AGE, URI_QUERY, ACCEPT, BLOCK2, BLOCK1, SIZE2, SIZE1,
})

# Each option's value length in bytes (RFC 7252 §5.10, RFC 7959 §2.1,
# §4); a value outside it is treated as an unrecognised option (§5.4.3).
OPTION_LENGTHS = {
    IF_MATCH: (0, 8), URI_HOST: (1, 255), ETAG: (1, 8), IF_NONE_MATCH: (0, 0), OBSERVE: (0, 3),
    URI_PORT: (0, 2), URI_PATH: (0, 255), CONTENT_FORMAT: (0, 2), MAX_AGE: (0, 4), URI_QUERY: (0, 255),
    ACCEPT: (0, 2), BLOCK2: (0, 3), BLOCK1: (0, 3), SIZE2: (0, 4), SIZE1: (0, 4),
}
# Options that may occur more than once (RFC 7252 §5.10 "R"); another
# occurrence of any other is treated as unrecognised (§5.4.5).
REPEATABLE_OPTIONS = frozenset({IF_MATCH, ETAG, LOCATION_PATH, URI_PATH, URI_QUERY, LOCATION_QUERY})
OPTION_NAMES = {
    IF_MATCH: "If-Match", URI_HOST: "Uri-Host", ETAG: "ETag", IF_NONE_MATCH: "If-None-Match", OBSERVE: "Observe",
    URI_PORT: "Uri-Port", LOCATION_PATH: "Location-Path", URI_PATH: "Uri-Path", CONTENT_FORMAT: "Content-Format",
    MAX_AGE: "Max-Age", URI_QUERY: "Uri-Query", ACCEPT: "Accept", LOCATION_QUERY: "Location-Query",
    BLOCK2: "Block2", BLOCK1: "Block1", SIZE2: "Size2", PROXY_URI: "Proxy-Uri", PROXY_SCHEME: "Proxy-Scheme",
    SIZE1: "Size1",
}
# Options whose value is a string (RFC 7252 §3.2: UTF-8 Net-Unicode).
STRING_OPTIONS = frozenset({URI_HOST, LOCATION_PATH, URI_PATH, URI_QUERY, LOCATION_QUERY, PROXY_URI, PROXY_SCHEME})

# Content-Formats (IANA "CoAP Content-Formats"; RFC 9148 §8.3, RFC 8710).
TEXT_PLAIN = 0
LINK_FORMAT = 40
OCTET_STREAM = 42
MULTIPART_CORE = 62
PKCS7_SERVER_GENERATED_KEY = 280  # application/pkcs7-mime; smime-type=server-generated-key
PKCS7_CERTS_ONLY = 281  # application/pkcs7-mime; smime-type=certs-only
PKCS8 = 284  # application/pkcs8
CSRATTRS = 285  # application/csrattrs
PKCS10 = 286  # application/pkcs10
PKIX_CERT = 287  # application/pkix-cert


class MessageFormatError(ValueError):
    """The bytes are not a well-formed CoAP message (RFC 7252 §3, §4.2:
    such a message is rejected, or silently ignored)."""


@attr.s(frozen=True, auto_attribs=True)
class Message:
    """One CoAP message.  ``options`` are (number, value) pairs in any
    order; :func:`encode` sorts them, keeping repeated ones in order."""

    type: int
    code: int
    message_id: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        for n, value in self.options:
            if n == number:
                return value
        return None

    def options_of(self, number: int) -> list[bytes]:
        return [value for n, value in self.options if n == number]

    def uint_option(self, number: int) -> int | None:
        value = self.option(number)
        return None if value is None else decode_uint(value)

    @property
    def is_request(self) -> bool:
        return 1 <= self.code <= 31

    @property
    def uri_path(self) -> tuple[str, ...]:
        """The Uri-Path segments, decoded as UTF-8 (RFC 7252 §6.5); a
        byte that is not UTF-8 reads as U+FFFD (:func:`screen_options`
        refuses such a request before anything routes on it)."""
        return tuple(value.decode("utf-8", "replace") for value in self.options_of(URI_PATH))


def option_name(number: int) -> str:
    name = OPTION_NAMES.get(number)
    return f"{number} ({name})" if name else str(number)


@attr.s(frozen=True, auto_attribs=True)
class Screened:
    """A request after :func:`screen_options`: the options this server
    acts on, and why it must be refused (None when it need not be)."""

    message: Message
    bad_option: str | None = None  # an unrecognised critical option: 4.02
    malformed: str | None = None  # a string option that is not UTF-8: 4.00


def screen_options(message: Message) -> Screened:
    """Sort a request's options as RFC 7252 §5.4 does.  An option is
    unrecognised when this server does not know its number, when its value
    length is outside the option's range (§5.4.3), or when it repeats an
    option that is not repeatable (§5.4.5).  Unrecognised elective (even)
    options are dropped (§5.4.1); the first unrecognised critical (odd)
    option is named in ``bad_option``, for a 4.02 Bad Option.  A string
    option that is not UTF-8 is named in ``malformed`` (a 4.00)."""
    kept: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    bad: str | None = None
    malformed: str | None = None
    for number, value in message.options:
        problem = None
        if number not in KNOWN_OPTIONS:
            problem = f"critical option {option_name(number)} is not supported"
        elif number in seen and number not in REPEATABLE_OPTIONS:
            problem = f"critical option {option_name(number)} is given more than once; it is not repeatable"
        elif number in OPTION_LENGTHS and not OPTION_LENGTHS[number][0] <= len(value) <= OPTION_LENGTHS[number][1]:
            low, high = OPTION_LENGTHS[number]
            problem = (
                f"critical option {option_name(number)} has a {len(value)}-byte value;"
                f" RFC 7252 allows {low} to {high} bytes"
            )
        if problem is not None:
            if number & 1 and bad is None:
                bad = problem
            continue  # elective: ignored, as if absent
        seen.add(number)
        if number in STRING_OPTIONS and malformed is None:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                malformed = f"the {option_name(number)} option is not UTF-8"
        kept.append((number, value))
    return Screened(attr.evolve(message, options=tuple(kept)), bad, malformed)


def encode_uint(value: int) -> bytes:
    """The shortest big-endian form; 0 is empty (RFC 7252 §3.2)."""
    if value < 0:
        raise ValueError("option values are unsigned")
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def decode_uint(value: bytes) -> int:
    if len(value) > 4:
        raise MessageFormatError("a uint option is longer than 4 bytes")
    return int.from_bytes(value, "big")


def _extended(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes([value - 13])
    if value < 65805:
        return 14, (value - 269).to_bytes(2, "big")
    raise ValueError("option delta or length too large")


def encode(message: Message) -> bytes:
    """The bytes of ``message`` (RFC 7252 §3)."""
    if len(message.token) > 8:
        raise ValueError("a token is at most 8 bytes")
    out = bytearray([
        (VERSION << 6) | (message.type << 4) | len(message.token),
        message.code,
    ])
    out += message.message_id.to_bytes(2, "big")
    out += message.token
    previous = 0
    for number, value in sorted(message.options, key=lambda o: o[0]):  # stable: repeats keep order
        delta, delta_ext = _extended(number - previous)
        length, length_ext = _extended(len(value))
        out.append((delta << 4) | length)
        out += delta_ext + length_ext + value
        previous = number
    if message.payload:
        out.append(0xFF)
        out += message.payload
    return bytes(out)


def _read_extended(nibble: int, data: bytes, at: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, at
    if nibble == 13:
        if at + 1 > len(data):
            raise MessageFormatError("truncated option")
        return data[at] + 13, at + 1
    if nibble == 14:
        if at + 2 > len(data):
            raise MessageFormatError("truncated option")
        return int.from_bytes(data[at:at + 2], "big") + 269, at + 2
    raise MessageFormatError("reserved option nibble 15")


def decode(data: bytes) -> Message:
    """Parse one message.

    :raises MessageFormatError: wrong version, a token longer than 8
        bytes, truncated options, a payload marker with no payload, or
        an empty message with content (RFC 7252 §3, §4.1).
    """
    if len(data) < 4:
        raise MessageFormatError("shorter than the 4-byte header")
    version, type_, tkl = data[0] >> 6, (data[0] >> 4) & 3, data[0] & 0x0F
    if version != VERSION:
        raise MessageFormatError(f"CoAP version {version}")
    if tkl > 8:
        raise MessageFormatError("token length over 8")
    code_ = data[1]
    message_id = int.from_bytes(data[2:4], "big")
    if len(data) < 4 + tkl:
        raise MessageFormatError("truncated token")
    token = bytes(data[4:4 + tkl])
    at = 4 + tkl
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while at < len(data):
        if data[at] == 0xFF:
            payload = bytes(data[at + 1:])
            if not payload:
                raise MessageFormatError("payload marker followed by no payload")
            break
        delta, length = data[at] >> 4, data[at] & 0x0F
        at += 1
        delta, at = _read_extended(delta, data, at)
        length, at = _read_extended(length, data, at)
        if at + length > len(data):
            raise MessageFormatError("truncated option value")
        number += delta
        options.append((number, bytes(data[at:at + length])))
        at += length
    if code_ == EMPTY and (tkl or options or payload):
        raise MessageFormatError("an empty message carries nothing")
    return Message(type_, code_, message_id, token, tuple(options), payload)


# -- block-wise transfer (RFC 7959) ----------------------------------------------


@attr.s(frozen=True, auto_attribs=True)
class Block:
    """A Block1 or Block2 option value (RFC 7959 §2.2): block number,
    more flag and size exponent (size = 2 ** (szx + 4) bytes)."""

    num: int
    more: bool
    szx: int

    @property
    def size(self) -> int:
        return 1 << (self.szx + 4)

    @property
    def offset(self) -> int:
        return self.num * self.size

    def encode(self) -> bytes:
        return encode_uint((self.num << 4) | (int(self.more) << 3) | self.szx)

    @classmethod
    def decode(cls, value: bytes) -> "Block":
        if len(value) > 3:
            raise MessageFormatError("a block option is at most 3 bytes")
        raw = decode_uint(value)
        szx = raw & 7
        if szx == 7:  # reserved (BERT only over reliable transports)
            raise MessageFormatError("block size exponent 7 is reserved")
        return cls(raw >> 4, bool(raw & 8), szx)


def szx_for(size: int) -> int:
    """The largest block size exponent whose size fits in ``size`` bytes."""
    szx = 6
    while szx > 0 and (1 << (szx + 4)) > size:
        szx -= 1
    return szx


def block_of(body: bytes, num: int, szx: int) -> tuple[bytes, Block]:
    """Block ``num`` of ``body`` with size exponent ``szx``.

    :raises IndexError: ``num`` is past the end (a 4.02 to the client).
    """
    size = 1 << (szx + 4)
    start = num * size
    if start >= len(body) and not (num == 0 and not body):
        raise IndexError(num)
    chunk = body[start:start + size]
    return chunk, Block(num, start + size < len(body), szx)


def response(
    request: Message,
    code_: int,
    payload: bytes = b"",
    options: Iterable[tuple[int, bytes]] = (),
) -> Message:
    """The piggybacked (ACK) or separate (NON for a NON request) response
    to ``request`` (RFC 7252 §5.2)."""
    type_ = ACK if request.type == CON else NON
    return Message(type_, code_, request.message_id, request.token, tuple(options), payload)


def reset(message: Message) -> Message:
    return Message(RST, EMPTY, message.message_id)


def uri_path_options(path: Sequence[str]) -> tuple[tuple[int, bytes], ...]:
    return tuple((URI_PATH, segment.encode("utf-8")) for segment in path)


# -- multipart-core (RFC 8710) -----------------------------------------------------


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([(major << 5) | value])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if value < 1 << (8 * size):
            return bytes([(major << 5) | info]) + value.to_bytes(size, "big")
    raise ValueError("too large for CBOR")


def multipart_core(parts: Sequence[tuple[int, bytes]]) -> bytes:
    """application/multipart-core (Content-Format 62, RFC 8710 §2): a CBOR
    array of Content-Format (unsigned integer) and representation (byte
    string) pairs, in order."""
    out = bytearray(_cbor_head(4, 2 * len(parts)))
    for content_format, representation in parts:
        out += _cbor_head(0, content_format)
        out += _cbor_head(2, len(representation)) + representation
    return bytes(out)
