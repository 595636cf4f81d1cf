"""The README's curl + openssl walk-through, run as written against the
real daemon (``twistd -n estgw --config etc/est.properties``, as ``make
run`` starts it) in a copy of the repository's layout."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from typing import Any

from cryptography import x509

from estgw.testing import run_process
from tests.test_twistd import REPO, Daemon, TwistdTestCase, _wait, environment

README = os.path.join(REPO, "README.rst")
SECTION = "Enroll and re-enroll a device with curl and openssl"


def literal_blocks(text: str, section: str) -> list[list[str]]:
    """The ``::`` literal blocks of one README section, dedented."""
    start = text.index(section + "\n")
    end = re.compile(r"^\S.*\n[=]+\n", re.M).search(text, start + len(section) + 1 + len(section) + 1)
    body = text[start:end.start() if end else len(text)].splitlines()
    blocks: list[list[str]] = []
    i = 0
    while i < len(body):
        if body[i].rstrip().endswith("::"):
            i += 1
            block: list[str] = []
            while i < len(body) and (not body[i].strip() or body[i].startswith("    ")):
                block.append(body[i][4:])
                i += 1
            while block and not block[-1].strip():
                block.pop()
            while block and not block[0].strip():
                block.pop(0)
            blocks.append(block)
        else:
            i += 1
    return blocks


GIT = ["git", "-c", "user.name=estgw test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]


def _executable(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, stat.S_IRWXU)


async def repository_copy(directory: str, adapt: Any = None) -> None:
    """What a fresh clone holds that the walk-throughs use (etc/, the
    .gitignore), committed to a new git repository (after ``adapt(directory)``
    where given, e.g. other ports), and .venv/bin/estgw and .venv/bin/twistd
    running this checkout's code."""
    shutil.copytree(os.path.join(REPO, "etc"), os.path.join(directory, "etc"), dirs_exist_ok=True)
    if adapt is not None:
        adapt(directory)
    shutil.copy(os.path.join(REPO, ".gitignore"), directory)
    os.makedirs(os.path.join(directory, ".venv", "bin"))
    _executable(os.path.join(directory, ".venv", "bin", "estgw"),
                f"#!/bin/sh\nexec {sys.executable} -m estgw.cli \"$@\"\n")
    _executable(os.path.join(directory, ".venv", "bin", "twistd"),
                f"#!/bin/sh\nexec {sys.executable} -c 'from twisted.scripts.twistd import run; run()' \"$@\"\n")
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clone"]):
        done = await run_process(GIT + argv, path=directory)
        assert done.code == 0, done


async def git_status(directory: str) -> list[str]:
    """``git status --porcelain``: what a walk-through left that git would
    show (untracked and not ignored, or changed)."""
    done = await run_process(GIT + ["status", "--porcelain", "--untracked-files=all"], path=directory)
    assert done.code == 0, done
    return done.stdout.decode().splitlines()


class ReadmeWalkthroughTests(TwistdTestCase):
    async def setUp(self) -> None:
        super().setUp()
        os.unlink(self.config)
        await repository_copy(self.directory)
        self.config = os.path.join(self.directory, "etc", "est.properties")

    async def test_walkthrough_as_written(self) -> None:
        """Every command of the walk-through succeeds in order (bash -e):
        the device is registered, enrolls and renews; then the refusal
        example prints exactly what the README says it prints, and issues
        nothing."""
        with open(README, encoding="utf-8") as f:
            walkthrough, refusal = literal_blocks(f.read(), SECTION)[:2]
        self.assertTrue(all(line.startswith(("$ ", "curl: ", "unknown")) for line in refusal), refusal)
        commands = [line[2:] for line in refusal if line.startswith("$ ")]
        expected = [line for line in refusal if not line.startswith("$ ")]

        daemon = Daemon()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "estgw", "--config", "etc/est.properties", "--port", "0"]
        from twisted.internet import reactor

        reactor.spawnProcess(daemon, argv[0], argv, env=environment(), path=self.directory)
        self.addCleanup(self._stop, daemon)
        port = await daemon.ready()

        script = "\n".join(walkthrough + ["echo '--- refusal ---'", "exec 2>&1"] + commands)
        script = script.replace("localhost:8443", f"localhost:{port}")
        env = dict(environment(), PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        result = await _wait(run_process(["/bin/bash", "-e", "-c", script], env=env, path=self.directory), 120)
        output = result.stdout.decode()
        self.assertEqual(result.code, 0, output + result.stderr.decode())
        self.assertIn("demo/device.pem: OK", output)
        self.assertEqual(output.split("--- refusal ---\n", 1)[1].splitlines(), expected)

        with open(os.path.join(self.directory, "demo", "device.pem"), "rb") as f:
            renewed = x509.load_pem_x509_certificate(f.read())
        self.assertEqual(renewed.subject.rfc4514_string(), "CN=pump-17")
        listed = await self.cli("cert", "list", "--json")
        records = json.loads(listed.stdout)
        self.assertEqual(len(records), 2, "enroll + renew; the refused request issued nothing")
        self.assertEqual(records[0]["serial"], f"{renewed.serial_number:X}".zfill(len(records[0]["serial"])))
        self.assertEqual(await git_status(self.directory), [], "keys and state are ignored by git")
