"""bench/enroll_bench.py's copy of etc/est.properties."""

from __future__ import annotations

import importlib.util
import os
import shutil

from twisted.trial.unittest import SynchronousTestCase

from estgw import config as config_module
from tests.test_twistd import REPO


def _bench_module() -> object:
    spec = importlib.util.spec_from_file_location("enroll_bench", os.path.join(REPO, "bench", "enroll_bench.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WriteConfigTests(SynchronousTestCase):
    def test_relative_files_stay_found(self) -> None:
        """With the approval handler on (and CRL / trust anchor files), the
        copy in another directory names the same files as the original:
        the benchmark no longer stops on 'no such file'."""
        bench = _bench_module()
        repo = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(repo, "etc"))
        with open(os.path.join(REPO, "etc", "est.properties"), encoding="utf-8") as f:
            text = f.read().replace("#handler.30.", "handler.30.")
        text += "tls.crls = a.crl, sub/b.crl\n"
        with open(os.path.join(repo, "etc", "est.properties"), "w", encoding="utf-8") as f:
            f.write(text)
        # config.load checks that the files exist (their contents are checked at start).
        for name in ("protocol-gateway-ra.p12", "approval-state/ca/root-ca.pem", "a.crl", "sub/b.crl"):
            os.makedirs(os.path.dirname(os.path.join(repo, "etc", name)), exist_ok=True)
            open(os.path.join(repo, "etc", name), "w").close()
        original = config_module.load(os.path.join(repo, "etc", "est.properties"))
        bench.REPO = repo  # type: ignore[attr-defined]
        elsewhere = os.path.abspath(self.mktemp())
        os.makedirs(elsewhere)
        copy = config_module.load(bench.write_config(elsewhere))  # type: ignore[attr-defined]
        (handler,) = [h for h in copy.handlers if h.idm_token]
        (expected,) = [h for h in original.handlers if h.idm_token]
        self.assertEqual(handler.idm_token, os.path.join(repo, "etc", "protocol-gateway-ra.p12"))
        self.assertEqual(handler.idm_token, expected.idm_token)
        self.assertEqual(handler.idm_trust_anchors, expected.idm_trust_anchors)
        self.assertEqual(copy.crl_files, original.crl_files)
        self.assertEqual(copy.interface, "127.0.0.1")
        self.assertEqual(copy.state_directory, os.path.join(elsewhere, "state"))
        shutil.rmtree(elsewhere)
