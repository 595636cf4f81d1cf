"""The CoAP message codec and block options (RFC 7252 §3, RFC 7959 §2.2)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from estgw.coaps import coap
from estgw.coaps.coap import Block, Message, MessageFormatError


class MessageTests(SynchronousTestCase):
    def test_rfc7252_example(self) -> None:
        """A GET with Uri-Path "temperature" and a 2-byte token encodes as
        RFC 7252 Appendix A's bytes, and decodes back."""
        message = Message(coap.CON, coap.GET, 0x7D34, b"\x20\x01", coap.uri_path_options(["temperature"]))
        data = coap.encode(message)
        self.assertEqual(data, bytes.fromhex("42017d342001") + bytes([0xBB]) + b"temperature")
        self.assertEqual(coap.decode(data), message)

    def test_extended_deltas_and_lengths(self) -> None:
        """Option deltas and lengths of 13..268 and 269.. use the 1- and
        2-byte extensions, repeated options keep their order, and the
        payload follows the 0xFF marker."""
        options = (
            (coap.URI_PATH, b"a" * 12), (coap.URI_PATH, b"b" * 13), (coap.URI_PATH, b"c" * 300),
            (coap.SIZE1, coap.encode_uint(70000)), (2000, b""),
        )
        message = Message(coap.NON, coap.POST, 1, b"12345678", options, b"\x00payload")
        decoded = coap.decode(coap.encode(message))
        self.assertEqual(decoded, message)
        self.assertEqual(decoded.uri_path, ("a" * 12, "b" * 13, "c" * 300))
        self.assertEqual(decoded.uint_option(coap.SIZE1), 70000)

    def test_options_sorted_on_encode(self) -> None:
        message = Message(coap.ACK, coap.CONTENT, 9, b"", ((coap.CONTENT_FORMAT, b"\x01\x19"), (coap.ETAG, b"x")))
        self.assertEqual(
            [n for n, _ in coap.decode(coap.encode(message)).options], [coap.ETAG, coap.CONTENT_FORMAT]
        )

    def test_malformed(self) -> None:
        """Each malformation of RFC 7252 §3 is a MessageFormatError."""
        cases = {
            "short": b"\x40\x01\x00",
            "version 2": b"\x80\x01\x00\x01",
            "token length 9": b"\x49\x01\x00\x01" + b"t" * 9,
            "truncated token": b"\x44\x01\x00\x01tt",
            "marker without payload": b"\x40\x01\x00\x01\xff",
            "delta nibble 15": b"\x40\x01\x00\x01\xf1x",
            "length nibble 15": b"\x40\x01\x00\x01\x1f",
            "truncated option value": b"\x40\x01\x00\x01\xb5ab",
            "truncated extended delta": b"\x40\x01\x00\x01\xd0",
            "empty message with token": b"\x41\x00\x00\x01t",
        }
        for label, data in cases.items():
            with self.assertRaises(MessageFormatError, msg=label):
                coap.decode(data)

    def test_uri_path_not_utf8(self) -> None:
        """A Uri-Path that is not UTF-8 never raises where it is read; the
        screening names it for a 4.00."""
        message = coap.decode(coap.encode(Message(coap.CON, coap.GET, 1, b"", ((coap.URI_PATH, b"\xff"),))))
        self.assertEqual(message.uri_path, ("\ufffd",))
        self.assertEqual(coap.screen_options(message).malformed, "the 11 (Uri-Path) option is not UTF-8")

    def test_screen_options(self) -> None:
        """RFC 7252 §5.4: unknown, out-of-range and repeated non-repeatable
        options are unrecognised; critical ones are named (the first),
        elective ones dropped; repeatable ones and the first of the others kept."""
        options = (
            (coap.URI_PATH, b"a"), (coap.URI_PATH, b"b"),
            (coap.CONTENT_FORMAT, b"\0\0\0\0\x01"),  # elective, too long: dropped
            (coap.SIZE1, coap.encode_uint(10)), (coap.SIZE1, coap.encode_uint(20)),  # elective repeat: first kept
            (2050, b"x"),  # unknown elective: dropped
        )
        screened = coap.screen_options(Message(coap.CON, coap.POST, 1, b"", options))
        self.assertEqual(screened.bad_option, None)
        self.assertEqual(
            screened.message.options,
            ((coap.URI_PATH, b"a"), (coap.URI_PATH, b"b"), (coap.SIZE1, coap.encode_uint(10))),
        )
        for critical, reason in (
            (((coap.ACCEPT, b"\0\0\0\0\x01"),), "17 (Accept) has a 5-byte value"),
            (((coap.BLOCK1, b"\x08"), (coap.BLOCK1, b"\x18")), "27 (Block1) is given more than once"),
            (((coap.IF_NONE_MATCH, b"x"),), "5 (If-None-Match) has a 1-byte value"),
            (((coap.URI_HOST, b""),), "3 (Uri-Host) has a 0-byte value"),
            (((coap.PROXY_URI, b"coap://x"),), "35 (Proxy-Uri) is not supported"),
            (((9, b""),), "critical option 9 is not supported"),
        ):
            screened = coap.screen_options(Message(coap.CON, coap.GET, 1, b"", critical))
            self.assertIn(reason, screened.bad_option or "")

    def test_code_text(self) -> None:
        self.assertEqual(
            [coap.code_text(c) for c in (coap.CONTENT, coap.FORBIDDEN, coap.UNSUPPORTED_CONTENT_FORMAT, coap.CONTINUE)],
            ["2.05", "4.03", "4.15", "2.31"],
        )

    def test_content_formats(self) -> None:
        """The numbers IANA registered for RFC 9148 and RFC 8710."""
        self.assertEqual(
            (coap.PKCS7_SERVER_GENERATED_KEY, coap.PKCS7_CERTS_ONLY, coap.PKCS8, coap.CSRATTRS, coap.PKCS10,
             coap.PKIX_CERT, coap.MULTIPART_CORE),
            (280, 281, 284, 285, 286, 287, 62),
        )


class BlockTests(SynchronousTestCase):
    def test_roundtrip(self) -> None:
        for block in (Block(0, False, 0), Block(1, True, 6), Block(4095, True, 2), Block(2**20 - 1, False, 6)):
            self.assertEqual(Block.decode(block.encode()), block)
        self.assertEqual(Block(0, False, 0).encode(), b"")  # uint 0 is empty
        self.assertEqual(Block(1, True, 2).size, 64)
        self.assertEqual(Block(3, False, 2).offset, 192)

    def test_reserved_szx_and_length(self) -> None:
        with self.assertRaises(MessageFormatError):
            Block.decode(b"\x07")
        with self.assertRaises(MessageFormatError):
            Block.decode(b"\x01\x02\x03\x04")

    def test_block_of(self) -> None:
        body = bytes(range(256)) * 4 + b"tail"  # 1028 bytes
        first, block = coap.block_of(body, 0, 6)
        self.assertEqual((first, block), (body[:1024], Block(0, True, 6)))
        last, block = coap.block_of(body, 1, 6)
        self.assertEqual((last, block), (b"tail", Block(1, False, 6)))
        with self.assertRaises(IndexError):
            coap.block_of(body, 2, 6)
        self.assertEqual(coap.block_of(b"", 0, 6), (b"", Block(0, False, 6)))
        self.assertEqual(coap.szx_for(1024), 6)
        self.assertEqual(coap.szx_for(100), 2)


class MultipartCoreTests(SynchronousTestCase):
    def test_read_by_cbor2(self) -> None:
        """An independent CBOR parser reads the array (RFC 8710 §2),
        with representations of every length class."""
        import cbor2

        parts = [(coap.PKCS8, b"k" * 23), (coap.PKCS7_CERTS_ONLY, b"c" * 300), (coap.TEXT_PLAIN, b"t" * 70000)]
        self.assertEqual(cbor2.loads(coap.multipart_core(parts)), [v for part in parts for v in part])
