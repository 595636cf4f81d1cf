"""auth.scrypt.n and auth.passwordCacheSeconds: the cost of new password
hashes, and successful checks remembered for a retrying device."""

from __future__ import annotations

import os

from twisted.cred import credentials, error
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial import unittest

from estgw import auth, config as config_module
from estgw.config import ConfigError
from estgw.device_import import Registration, build_device
from estgw.passwords import VerificationCache, hash_password, verify_password
from estgw.store import SQLiteStore


class CostTests(unittest.SynchronousTestCase):
    def test_cost_in_the_hash(self) -> None:
        """A hash made with another N carries it and verifies; one made
        with the default keeps verifying whatever N new hashes use."""
        cheap = hash_password("s3cret", 1024)
        self.assertEqual(cheap.split("$")[:4], ["scrypt", "1024", "8", "1"])
        self.assertTrue(verify_password("s3cret", cheap))
        self.assertFalse(verify_password("s3cre", cheap))
        self.assertTrue(verify_password("s3cret", hash_password("s3cret")))

    def test_bad_cost_refused(self) -> None:
        for n in (1000, 512, 2**21, 0):
            with self.assertRaises(ValueError):
                hash_password("s3cret", n)

    def test_registration_uses_configured_cost(self) -> None:
        device = build_device(Registration(device_id="pump-1", password="pw"), (), 2048)
        assert device.password_hash is not None
        self.assertTrue(device.password_hash.startswith("scrypt$2048$8$1$"))

    def test_config_keys(self) -> None:
        loaded = config_module.from_string("auth.scrypt.n = 32768\nauth.passwordCacheSeconds = 0\n")
        self.assertEqual((loaded.scrypt_n, loaded.password_cache_seconds), (32768, 0))
        defaults = config_module.from_string("")
        self.assertEqual((defaults.scrypt_n, defaults.password_cache_seconds), (2**14, 60))
        for text, key in (
            ("auth.scrypt.n = 20000", "auth.scrypt.n"),
            ("auth.scrypt.n = 512", "auth.scrypt.n"),
            ("auth.passwordCacheSeconds = -1", "auth.passwordCacheSeconds"),
            ("auth.passwordCacheSeconds = 7200", "auth.passwordCacheSeconds"),
        ):
            with self.assertRaises(ConfigError) as raised:
                config_module.from_string(text + "\n")
            self.assertIn(key, str(raised.exception))


class VerificationCacheTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = VerificationCache(60, self.clock.seconds)
        self.encoded = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$" + "A" * 43 + "="

    def test_remembered_until_expiry(self) -> None:
        self.assertFalse(self.cache.known("pump-1", b"pw", self.encoded))
        self.cache.remember("pump-1", b"pw", self.encoded)
        self.assertTrue(self.cache.known("pump-1", b"pw", self.encoded))
        self.assertTrue(self.cache.known("pump-1", "pw", self.encoded))  # str and bytes alike
        self.clock.advance(59.9)
        self.assertTrue(self.cache.known("pump-1", b"pw", self.encoded))
        self.clock.advance(0.2)
        self.assertFalse(self.cache.known("pump-1", b"pw", self.encoded))

    def test_other_password_device_or_hash_not_known(self) -> None:
        """Another password, another device, a changed stored hash (new
        password or new registration) or no hash (removed): not known."""
        self.cache.remember("pump-1", b"pw", self.encoded)
        self.assertFalse(self.cache.known("pump-1", b"pw2", self.encoded))
        self.assertFalse(self.cache.known("pump-2", b"pw", self.encoded))
        self.assertFalse(self.cache.known("pump-1", b"pw", self.encoded.replace("c2Fs", "c2Ft")))
        self.assertFalse(self.cache.known("pump-1", b"pw", None))
        # Field boundaries count: id "pump-1p" with password "w" is another pair.
        self.assertFalse(self.cache.known("pump-1p", b"w", self.encoded))

    def test_password_not_kept(self) -> None:
        self.cache.remember("pump-1", b"a-distinctive-password", self.encoded)
        for entry in self.cache._expiry:
            self.assertNotIn(b"a-distinctive-password", entry)
            self.assertEqual(len(entry), 32)

    def test_off_at_zero(self) -> None:
        cache = VerificationCache(0, self.clock.seconds)
        cache.remember("pump-1", b"pw", self.encoded)
        self.assertFalse(cache.known("pump-1", b"pw", self.encoded))

    def test_bounded(self) -> None:
        cache = VerificationCache(60, self.clock.seconds, size=3)
        for i in range(10):
            cache.remember(f"pump-{i}", b"pw", self.encoded)
            self.clock.advance(1)
        self.assertEqual(len(cache._expiry), 3)
        self.assertTrue(cache.known("pump-9", b"pw", self.encoded))
        self.assertFalse(cache.known("pump-0", b"pw", self.encoded))


class CheckerCacheTests(unittest.TestCase):
    """The device checker with a cache, on a real store: scrypt runs once
    for a retrying device, every time for a wrong password, and again
    after the registration changes."""

    async def setUp(self) -> None:
        self.store = SQLiteStore(os.path.join(self.mktemp() + ".sqlite"), reactor=reactor)
        await self.store.start()
        self.addCleanup(self.store.close)
        self.checks = 0
        real = auth.check_password_in_thread

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.checks += 1
            return real(*args, **kwargs)

        self.patch(auth, "check_password_in_thread", counting)
        self.portal = auth.device_portal(self.store, reactor, password_cache_seconds=60)
        self.checker = self.portal.checkers[credentials.IUsernamePassword]

    async def register(self, password: str) -> None:
        await self.store.add_device(build_device(Registration(device_id="pump-1", password=password), (), 1024))

    async def login(self, password: bytes) -> bytes:
        return await self.checker.requestAvatarId(credentials.UsernamePassword(b"pump-1", password))

    async def test_retry_pays_once(self) -> None:
        await self.register("pw")
        self.assertEqual(await self.login(b"pw"), b"pump-1")
        self.assertEqual(await self.login(b"pw"), b"pump-1")
        self.assertEqual(self.checks, 1)

    async def test_wrong_password_always_checked(self) -> None:
        await self.register("pw")
        await self.login(b"pw")
        for _ in range(2):
            with self.assertRaises(error.UnauthorizedLogin):
                await self.login(b"wrong")
        self.assertEqual(self.checks, 3)

    async def test_changed_or_removed_registration(self) -> None:
        await self.register("old")
        await self.login(b"old")
        await self.store.remove_device("pump-1")
        with self.assertRaises(error.UnauthorizedLogin):
            await self.login(b"old")  # removed: refused though remembered
        await self.register("new")
        with self.assertRaises(error.UnauthorizedLogin):
            await self.login(b"old")  # the old password no longer works
        self.assertEqual(await self.login(b"new"), b"pump-1")
        self.assertEqual(self.checks, 4)

    async def test_off_without_setting(self) -> None:
        checker = auth.device_portal(self.store, reactor).checkers[credentials.IUsernamePassword]
        await self.register("pw")
        for _ in range(2):
            await checker.requestAvatarId(credentials.UsernamePassword(b"pump-1", b"pw"))
        self.assertEqual(self.checks, 2)


