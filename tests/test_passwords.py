"""Tests for estgw.passwords."""

from __future__ import annotations

import base64
import threading
import unicodedata

from twisted.trial import unittest

from estgw import passwords
from estgw.passwords import check_password_in_thread, hash_password, verify_password


class HashTests(unittest.SynchronousTestCase):
    def test_format(self) -> None:
        """
        The encoding is scrypt$16384$8$1$<salt>$<hash>, with a 16-byte salt
        in base64.
        """
        parts = hash_password("s3cret").split("$")
        self.assertEqual(parts[:4], ["scrypt", "16384", "8", "1"])
        self.assertEqual(len(parts), 6)
        self.assertEqual(len(base64.b64decode(parts[4], validate=True)), 16)
        self.assertEqual(len(base64.b64decode(parts[5], validate=True)), 32)

    def test_verify_right(self) -> None:
        """The password that was hashed verifies."""
        self.assertTrue(verify_password("s3cret", hash_password("s3cret")))

    def test_verify_wrong(self) -> None:
        """Another password, or a prefix or case change of it, does not."""
        encoded = hash_password("s3cret")
        for wrong in ("s3cre", "S3cret", "s3cret ", "", "x"):
            self.assertFalse(verify_password(wrong, encoded), wrong)

    def test_verify_malformed(self) -> None:
        """
        A malformed, truncated, foreign or missing hash is False, not an
        exception.
        """
        good = hash_password("pw")
        scheme, n, r, p, salt, digest = good.split("$")
        malformed = [
            "",
            "pw",
            "scrypt$",
            good + "$",
            good[:-8],  # truncated digest: a prefix of the right one
            "$".join(["bcrypt", n, r, p, salt, digest]),
            "$".join([scheme, "16383", r, p, salt, digest]),  # n not a power of 2
            "$".join([scheme, "1", r, p, salt, digest]),
            "$".join([scheme, "-16384", r, p, salt, digest]),
            "$".join([scheme, "+16384", r, p, salt, digest]),
            "$".join([scheme, "2147483648", r, p, salt, digest]),  # absurd cost
            "$".join([scheme, n, "0", p, salt, digest]),
            "$".join([scheme, n, r, "x", salt, digest]),
            "$".join([scheme, n, r, p, "!!not base64!!", digest]),
            "$".join([scheme, n, r, p, salt, digest + "@"]),
            "$".join([scheme, n, r, p, "", digest]),
            "$2b$12$abcdefghijklmnopqrstuuFq6L3yGZ9Fq8P1i5RkZk0gGy2m3nXG",
        ]
        for encoded in malformed:
            self.assertFalse(verify_password("pw", encoded), encoded)
        self.assertFalse(verify_password("pw", None))

    def test_two_hashes_differ(self) -> None:
        """
        Two hashes of one password differ (fresh salt each time) and both
        verify.
        """
        first, second = hash_password("same"), hash_password("same")
        self.assertNotEqual(first, second)
        self.assertNotEqual(first.split("$")[4], second.split("$")[4])
        self.assertTrue(verify_password("same", first))
        self.assertTrue(verify_password("same", second))

    def test_empty_password_refused(self) -> None:
        """An empty password cannot be hashed (it would admit anyone)."""
        self.assertRaises(ValueError, hash_password, "")

    def test_bytes_and_str(self) -> None:
        """
        A password given as UTF-8 bytes (as twisted.cred passes it) is the
        same as the str; bytes that are not UTF-8 are False.
        """
        encoded = hash_password("grüße")
        self.assertTrue(verify_password("grüße".encode("utf-8"), encoded))
        self.assertTrue(verify_password("grüße", hash_password("grüße".encode("utf-8"))))
        self.assertFalse(verify_password(b"gr\xfc\xdfe", encoded))

    def test_unicode_normalised(self) -> None:
        """Composed and decomposed spellings of one password match."""
        composed = unicodedata.normalize("NFC", "café")
        decomposed = unicodedata.normalize("NFD", "café")
        self.assertNotEqual(composed, decomposed)
        self.assertTrue(verify_password(decomposed, hash_password(composed)))

    def test_other_cost_parameters_verify(self) -> None:
        """
        A hash made with other (bounded) scrypt parameters still verifies,
        so the cost can be changed without invalidating stored hashes.
        """
        import hashlib

        salt = b"0123456789abcdef"
        digest = hashlib.scrypt(b"pw", salt=salt, n=2**12, r=4, p=2, dklen=32)
        encoded = "scrypt$4096$4$2$" + base64.b64encode(salt).decode() + "$" + base64.b64encode(digest).decode()
        self.assertTrue(verify_password("pw", encoded))
        self.assertFalse(verify_password("px", encoded))


class ThreadTests(unittest.TestCase):
    async def test_in_thread_right_and_wrong(self) -> None:
        """check_password_in_thread gives the verify_password answer."""
        encoded = hash_password("s3cret")
        self.assertTrue(await check_password_in_thread("s3cret", encoded))
        self.assertFalse(await check_password_in_thread("wrong", encoded))
        self.assertFalse(await check_password_in_thread("s3cret", "garbage"))

    async def test_in_thread_no_hash(self) -> None:
        """
        With no hash (unknown device) the answer is False, after a real
        scrypt run so that timing does not reveal unknown ids.
        """
        calls: list[str | None] = []
        real = passwords.verify_password

        def spy(password: str | bytes, encoded: str | None) -> bool:
            calls.append(encoded)
            return real(password, encoded)

        self.patch(passwords, "verify_password", spy)
        self.assertFalse(await check_password_in_thread("anything", None))
        self.assertEqual(len(calls), 1)
        self.assertTrue(calls[0] is not None and calls[0].startswith("scrypt$"))

    async def test_runs_off_the_reactor_thread(self) -> None:
        """The scrypt work runs in a pool thread, not the reactor thread."""
        threads: list[threading.Thread] = []
        real = passwords.verify_password

        def spy(password: str | bytes, encoded: str | None) -> bool:
            threads.append(threading.current_thread())
            return real(password, encoded)

        self.patch(passwords, "verify_password", spy)
        await check_password_in_thread("pw", hash_password("pw"))
        self.assertEqual(len(threads), 1)
        self.assertIsNot(threads[0], threading.current_thread())
