"""Log files that follow rotation (estgw.logfiles), on real files: a
rename or deletion, SIGHUP's reopen, copytruncate, and many threads
writing while the file is renamed and reopened under them."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from twisted.logger import Logger
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from estgw import audit, config as config_module, logfiles, logs


def lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class AppendFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "audit.jsonl")
        self.clock = _Clock()
        self.file = logfiles.AppendFile(self.path, clock=self.clock)
        self.addCleanup(self.file.close)

    def test_reopen_after_rename(self) -> None:
        """logrotate's rename + SIGHUP: lines before the reopen are in the
        renamed file, lines after it in a new file by the name, mode 0640."""
        self.file.write("one\n")
        os.rename(self.path, self.path + ".1")
        self.file.write("two\n")  # not reopened yet: the old file, as logrotate expects
        self.file.reopen()
        self.file.write("three\n")
        self.assertEqual(lines(self.path + ".1"), ["one", "two"])
        self.assertEqual(lines(self.path), ["three"])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640 & ~_umask())

    def test_follows_rename_and_delete_without_a_signal(self) -> None:
        """Without SIGHUP: within CHECK_SECONDS of a rename (or a deletion),
        the next line goes to a new file by the name."""
        self.file.write("one\n")
        os.rename(self.path, self.path + ".1")
        self.clock.now += logfiles.CHECK_SECONDS - 0.1
        self.file.write("two\n")
        self.assertFalse(os.path.exists(self.path))  # looked at no sooner than CHECK_SECONDS
        self.clock.now += 0.1
        self.file.write("three\n")
        self.assertEqual(lines(self.path + ".1"), ["one", "two"])
        self.assertEqual(lines(self.path), ["three"])
        os.unlink(self.path)
        self.clock.now += logfiles.CHECK_SECONDS
        self.file.write("four\n")
        self.assertEqual(lines(self.path), ["four"])

    def test_copytruncate(self) -> None:
        """logrotate's copytruncate: appends land at the new end (no hole
        of NUL bytes where the old content was)."""
        self.file.write("one\n" * 100)
        with open(self.path, "r+b") as f:
            f.truncate(0)
        self.file.write("two\n")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"two\n")

    def test_reopen_fails_keeps_the_old_file(self) -> None:
        """The name cannot be opened (here: a directory took its place):
        reopen raises, nothing written is lost, the old file stays in use."""
        self.file.write("one\n")
        os.rename(self.path, self.path + ".1")
        os.mkdir(self.path)
        e = self.assertRaises(OSError, self.file.reopen)
        self.assertIn("directory", e.strerror.lower())
        self.clock.now += logfiles.CHECK_SECONDS
        self.file.write("two\n")  # the follow check fails too: old file
        self.assertEqual(lines(self.path + ".1"), ["one", "two"])
        reopened, failed = logfiles.reopen_all()
        self.assertNotIn(self.path, reopened)
        self.assertEqual([f for f in failed if f.startswith(self.path + ":")], [f"{self.path}: Is a directory"])

    def test_reopen_all_and_close(self) -> None:
        """reopen_all reaches every open log file; a closed one leaves it."""
        reopened, _ = logfiles.reopen_all()
        self.assertIn(self.path, reopened)
        self.file.close()
        self.file.write("after close\n")  # ignored, no error
        reopened, _ = logfiles.reopen_all()
        self.assertNotIn(self.path, reopened)


class RecreatedFileTests(SynchronousTestCase):
    """A file made again by its name after a rotation is made like the
    rotated one: its permission bits exactly (whatever the umask: twistd's
    daemon runs under 077), its group, and, as root, its owner; a file
    found by the name (logrotate's ``create``) is used as it is."""

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        previous = os.umask(0o077)  # twistd's daemon umask
        self.addCleanup(os.umask, previous)

    def open(self, kind: str, path: str) -> Any:
        made: Any = (logfiles.AppendFile(path, mode=0o600) if kind == "append"
                     else logfiles.open_log_file(path, None, None))
        self.addCleanup(made.close)
        return made

    def test_mode_and_owner_kept(self) -> None:
        """After a rename and SIGHUP's reopen, after a rename followed
        without a signal, and (the human log) after its own size rotation."""
        owner = (4321, 4322) if os.geteuid() == 0 else (os.getuid(), os.getgid())
        for kind in ("append", "logfile"):
            for how in ("reopen", "follow", "rotate"):
                if how == "rotate" and kind == "append":
                    continue  # the audit file is never rotated by estgw
                path = os.path.join(self.directory, f"{kind}-{how}.log")
                log = self.open(kind, path)
                log._follower.check_seconds = 0  # look at every write
                log.write("one\n")
                os.chmod(path, 0o644)
                os.chown(path, *owner)
                log.write("two\n")  # the follow check notes the file's mode now
                if how == "rotate":
                    log.rotate()
                else:
                    os.rename(path, path + ".1")
                    if how == "reopen":
                        log.reopen()
                log.write("three\n")
                self.assertEqual(lines(path), ["three"], (kind, how))
                made = os.stat(path)
                self.assertEqual((made.st_mode & 0o777, made.st_uid, made.st_gid), (0o644, *owner), (kind, how))

    def test_a_file_created_by_logrotate_is_used_as_it_is(self) -> None:
        """logrotate's ``create 0600``: the new file keeps the mode it was given."""
        for kind in ("append", "logfile"):
            path = os.path.join(self.directory, f"{kind}.log")
            log = self.open(kind, path)
            os.chmod(path, 0o644)
            os.rename(path, path + ".1")
            with open(path, "w"):
                pass
            os.chmod(path, 0o600)
            log.reopen()
            log.write("after\n")
            self.assertEqual(lines(path), ["after"])
            self.assertEqual(os.stat(path).st_mode & 0o777, 0o600, kind)


class HangupMessageTests(SynchronousTestCase):
    """What SIGHUP says it did: which files it reopened, which it kept and why."""

    def test_summary(self) -> None:
        self.assertEqual(logfiles.hangup_summary(["/l/a.log"], []), "reopened /l/a.log")
        self.assertEqual(
            logfiles.hangup_summary(["/l/a.log"], ["/l/b.jsonl: Permission denied"]),
            "reopened /l/a.log; kept writing to the old file of /l/b.jsonl: Permission denied"
            " (cannot open the name again)",
        )
        self.assertEqual(
            logfiles.hangup_summary([], ["/l/a.log: Is a directory", "/l/b.jsonl: Is a directory"]),
            "kept writing to the old files of /l/a.log: Is a directory, /l/b.jsonl: Is a directory"
            " (cannot open the name again)",
        )
        self.assertEqual(logfiles.hangup_summary([], []), "no log file is open here; nothing to reopen")

    def test_none_could_be_reopened(self) -> None:
        """Neither of two files can be opened again: an error for each, and
        a summary that names both as kept, not "none open"."""
        from twisted.logger import capturedLogs, formatEvent

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = [os.path.join(directory, name) for name in ("est.log", "audit.jsonl")]
        self.patch(logfiles, "_open_files", [])  # only these two (other tests leave theirs open)
        files = [logfiles.open_log_file(paths[0], None, None), logfiles.AppendFile(paths[1])]
        for made in files:
            self.addCleanup(made.close)
        for path in paths:
            os.rename(path, path + ".1")
            os.mkdir(path)
        with capturedLogs() as events:
            logfiles.SignalService(reactor=object())._hangup()
        said = [formatEvent(e) for e in events if "SIGHUP" in e.get("log_format", "")]
        self.assertEqual(said[:2], [
            f"SIGHUP: cannot reopen the log file {path}: Is a directory; still writing to the old one"
            for path in paths
        ])
        self.assertEqual(said[2:], [
            f"SIGHUP: kept writing to the old files of {paths[0]}: Is a directory, {paths[1]}: Is a directory"
            " (cannot open the name again)"
        ])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class ConcurrentRotationTests(SynchronousTestCase):
    def test_no_line_lost_or_torn(self) -> None:
        """Eight threads write 2000 lines each while the main thread renames
        the file and reopens it 50 times: every line is in exactly one file,
        whole."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for kind in ("append", "logfile"):
            path = os.path.join(directory, f"{kind}.log")
            target: Any = (logfiles.AppendFile(path) if kind == "append"
                           else logfiles.open_log_file(path, None, None))
            self.addCleanup(target.close)
            start = threading.Event()

            def writer(number: int) -> None:
                start.wait(10)
                for i in range(2000):
                    target.write(f"{number:02d}-{i:05d}-" + "x" * 100 + "\n")

            workers = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
            for worker in workers:
                worker.start()
            start.set()
            for rotation in range(50):
                os.rename(path, f"{path}.{rotation}")
                target.reopen()
            for worker in workers:
                worker.join(60)
                self.assertFalse(worker.is_alive())
            seen: list[str] = []
            for name in os.listdir(directory):
                if name.startswith(f"{kind}.log"):
                    seen += lines(os.path.join(directory, name))
            self.assertEqual(len(seen), 8 * 2000, kind)
            self.assertEqual(len(set(seen)), 8 * 2000, kind)
            for line in seen:
                self.assertRegex(line, r"^\d\d-\d{5}-x{100}$")


class FollowingLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())

    def config(self, extra: str) -> config_module.Config:
        return config_module.from_string("log.file = est.log\n" + extra, base_dir=self.directory)

    def test_log_file_follows_rename_and_reopens(self) -> None:
        """log.file: a rename is followed (within CHECK_SECONDS) and reopen
        (SIGHUP) opens the name again; size rotation still works after."""
        log_file = logs.open_log_file(self.config("log.maxBytes = 4096\nlog.maxFiles = 2\n"))
        self.addCleanup(log_file.close)
        log_file._follower.check_seconds = 0  # look at every write
        path = os.path.join(self.directory, "est.log")
        log = Logger(namespace="estgw.test", observer=logs.human_observer(self.config(""), log_file=log_file))
        log.info("before")
        os.rename(path, path + "-rotated")
        log.info("after rename")
        self.assertIn("before", "".join(lines(path + "-rotated")))
        self.assertIn("after rename", "".join(lines(path)))
        os.rename(path, path + "-rotated-2")
        log_file.reopen()
        self.assertEqual(os.path.getsize(path), 0)
        for i in range(100):
            log.info("line {i} {padding}", i=i, padding="x" * 60)
        self.assertEqual(sorted(n for n in os.listdir(self.directory) if n.startswith("est.log.")),
                         ["est.log.1", "est.log.2"])

    def test_max_bytes_zero_never_rotates(self) -> None:
        """log.maxBytes = 0: estgw never rotates (logrotate does)."""
        loaded = self.config("log.maxBytes = 0\n")
        self.assertEqual(loaded.log_max_bytes, 0)
        log = Logger(namespace="estgw.test", observer=logs.human_observer(loaded))
        for i in range(200):
            log.info("line {i} {padding}", i=i, padding="x" * 100)
        self.assertEqual(os.listdir(self.directory), ["est.log"])
        self.assertGreater(os.path.getsize(os.path.join(self.directory, "est.log")), 20000)

    def test_copytruncate_resets_size(self) -> None:
        """After copytruncate, size rotation counts from the new, short file."""
        log_file = logs.open_log_file(self.config("log.maxBytes = 4096\n"))
        self.addCleanup(log_file.close)
        log_file._follower.check_seconds = 0
        path = os.path.join(self.directory, "est.log")
        log_file.write("x" * 4000 + "\n")
        os.truncate(path, 0)
        log_file.write("y\n")
        self.assertLess(log_file.size, 100)
        self.assertFalse(os.path.exists(path + ".1"))

    def test_bad_max_bytes(self) -> None:
        for value in ("100", "-1", "lots"):
            with self.assertRaises(config_module.ConfigError) as raised:
                self.config(f"log.maxBytes = {value}\n")
            self.assertIn("log.maxBytes", str(raised.exception))


class TwistdLogFileTests(SynchronousTestCase):
    """Which file twistd would log to, so estgw writes it instead."""

    def parse(self, *argv: str) -> Any:
        from twisted.scripts._twistd_unix import ServerOptions

        options = ServerOptions()
        options.parseOptions([*argv, "estgw", "--config", _config(self)])
        return options.subOptions

    def test_cases(self) -> None:
        self.assertEqual(logs.twistd_log_file(self.parse("--logfile", "/var/log/estgw.log")), "/var/log/estgw.log")
        self.assertEqual(logs.twistd_log_file(self.parse()), "twistd.log")  # a daemon's default
        self.assertIsNone(logs.twistd_log_file(self.parse("-n")))  # standard output
        self.assertIsNone(logs.twistd_log_file(self.parse("-n", "--logfile", "-")))
        self.assertIsNone(logs.twistd_log_file(self.parse("--syslog")))
        self.assertIsNone(logs.twistd_log_file(self.parse("--logger", "estgw.logs.worker_observer")))
        self.assertIsNone(logs.twistd_log_file(usage.Options()))  # not under twistd


def _config(testcase: SynchronousTestCase) -> str:
    directory = os.path.abspath(testcase.mktemp())
    os.makedirs(directory)
    path = os.path.join(directory, "est.properties")
    with open(path, "w", encoding="utf-8") as f:
        f.write("server.port = 0\nstate.directory = state\n")
    return path


class AuditFileTests(SynchronousTestCase):
    def test_audit_file_reopens(self) -> None:
        """log.audit.file: an audit line after a rename and reopen is a
        whole JSON object in the new file."""
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "audit.jsonl")
        observer = audit.start_audit_file(path)
        self.addCleanup(audit.stop_audit_file, observer)
        log = Logger(namespace=audit.NAMESPACE)
        log.info("issued serial {serial:x}", serial=1, event="issued")
        os.rename(path, path + ".1")
        self.assertIn(path, logfiles.reopen_all()[0])
        log.info("issued serial {serial:x}", serial=2, event="issued")
        self.assertEqual([json.loads(line)["serial"] for line in lines(path + ".1")], ["01"])
        self.assertEqual([json.loads(line)["serial"] for line in lines(path)], ["02"])


class LogDirectoryModeTests(SynchronousTestCase):
    """A log file's missing directories are made private: ``log.file =
    state/estgw.log`` (the shipped example) used to create the state
    directory 0755 before the gateway made it 0700, leaving the store (with
    its password hashes) readable by every user."""

    def test_missing_directories_are_0700_existing_ones_kept(self) -> None:
        import stat

        base = self.mktemp()
        os.mkdir(base)
        os.chmod(base, 0o755)
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        log = logfiles.open_log_file(os.path.join(base, "state", "logs", "estgw.log"), None, None)
        self.addCleanup(log.close)
        for directory in ("state", os.path.join("state", "logs")):
            self.assertEqual(stat.S_IMODE(os.stat(os.path.join(base, directory)).st_mode), 0o700, directory)
        self.assertEqual(stat.S_IMODE(os.stat(base).st_mode), 0o755)

    def test_gateway_state_directory_private_with_log_file_inside(self) -> None:
        """The whole start-up path: logs.human_observer then bootstrap."""
        import stat

        from estgw import bootstrap
        from estgw.testing import TEST_CONFIG

        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        config = config_module.from_string(
            TEST_CONFIG.replace("state.directory = state", f"state.directory = {base}/state")
            + f"\nlog.file = {base}/state/estgw.log\n"
        )
        observer_file = logs.open_log_file(config)
        self.addCleanup(observer_file.close)
        bootstrap.initialize(config)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(base, "state")).st_mode), 0o700)
