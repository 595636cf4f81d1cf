"""Log files that follow the operator's log rotation, and the signals that
say a rotation happened.

Every file estgw writes a log to (``log.file``, twistd's ``--logfile``
when estgw writes it, ``log.audit.file``) is opened for appending
(``O_APPEND``), and is opened again by its name

* on SIGHUP (:class:`SignalService`: logrotate's ``postrotate``), and
* when estgw finds, at most once every :data:`CHECK_SECONDS` as it
  writes, that the name now leads to another file or to none (the file
  was renamed or deleted).

So logrotate's rename-and-create works with or without ``postrotate kill
-HUP``, and ``copytruncate`` works too (appends land at the new end).  The
new file is opened before the old one is closed, under the lock every
write takes: each line is written whole to the old file or to the new
one, and a file that cannot be opened again leaves the old one in use.

SIGUSR1 rotates the human log at once, by its own size-based rotation
(``FILE.1``...), as twistd does for its ``--logfile``.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
import time
from typing import Any, BinaryIO, Callable, cast

from twisted.application import service
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.logfile import LogFile

__all__ = ["AppendFile", "FollowingLogFile", "SignalService", "hangup_summary", "reopen_all", "CHECK_SECONDS"]

#: Seconds between two looks at whether a log file's name still leads to it.
CHECK_SECONDS = 1.0

# Every log file open in this process, for SIGHUP.
_open_files: list[Any] = []
_open_lock = threading.Lock()


def _register(log_file: Any) -> None:
    with _open_lock:
        _open_files.append(log_file)


def _unregister(log_file: Any) -> None:
    with _open_lock:
        if log_file in _open_files:
            _open_files.remove(log_file)


_APPEND = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)


def _open_append(path: str, mode: int) -> int:
    return os.open(path, _APPEND | os.O_CREAT, mode)


def _open_like(path: str, like: os.stat_result) -> int:
    """Open ``path`` for appending, in place of the file ``like`` describes
    (renamed or deleted by a rotation).

    A file made here gets ``like``'s permission bits exactly (the daemon's
    umask, 077 under twistd, takes none away) and its group, and, when
    estgw runs as root, its owner: whoever could read the rotated file can
    read the new one.  Where the system refuses a change (a group the user
    is not in), the file keeps what it got.  A file found by the name
    (logrotate's ``create``) is used as it is.
    """
    mode = stat.S_IMODE(like.st_mode) & 0o777
    for _ in range(3):  # bounded: another process may create or delete the name meanwhile
        try:
            fd = os.open(path, _APPEND | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            try:
                return os.open(path, _APPEND)
            except FileNotFoundError:
                continue
        try:
            os.fchmod(fd, mode)
            made = os.fstat(fd)
            owner = like.st_uid if os.geteuid() == 0 else -1
            if made.st_gid != like.st_gid or (owner != -1 and made.st_uid != owner):
                os.fchown(fd, owner, like.st_gid)
        except OSError:
            pass  # not allowed: the new file is still written to
        return fd
    return _open_append(path, mode)


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


class _Follower:
    """When to look whether ``path`` still names the file open on ``fd``."""

    check_seconds = CHECK_SECONDS

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._checked = clock()

    def due(self) -> bool:
        """Whether CHECK_SECONDS passed since the last look (which is now)."""
        now = self._clock()
        if now - self._checked < self.check_seconds:
            return False
        self._checked = now
        return True

    @staticmethod
    def moved(path: str, identity: tuple[int, int]) -> bool:
        """Whether ``path`` was renamed or deleted away from ``identity``."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell (a directory we may not search): keep writing
        return (st.st_dev, st.st_ino) != identity


class AppendFile:
    """A text file opened for appending (created with ``mode``), written one
    whole line per :meth:`write`, that follows rotation (module doc).

    :raises OSError: from the constructor when ``path`` cannot be opened.
    """

    def __init__(self, path: str, mode: int = 0o640, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = os.path.abspath(path)
        self._mode = mode
        self._lock = threading.RLock()
        self._follower = _Follower(clock)
        self._fd = _open_append(self.path, mode)
        self._identity = _identity(self._fd)
        self.closed = False
        _register(self)

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        with self._lock:
            if self.closed:
                return
            if self._follower.due() and self._follower.moved(self.path, self._identity):
                try:
                    self._reopen()
                except OSError:
                    pass  # keep the old file; looked at again in CHECK_SECONDS
            # One write(2) with O_APPEND: the whole line lands at the end,
            # even among other processes appending to the same file.
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def flush(self) -> None:
        """Every :meth:`write` has reached the file already."""

    def _reopen(self) -> None:
        fd = _open_like(self.path, os.fstat(self._fd))
        old, self._fd = self._fd, fd
        self._identity = _identity(fd)
        os.close(old)

    def reopen(self) -> None:
        """Open ``path`` again (after a rotation); the old file stays in use
        if that fails.  :raises OSError: naming why."""
        with self._lock:
            if not self.closed:
                self._reopen()

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                os.close(self._fd)
        _unregister(self)


class FollowingLogFile(LogFile):
    """:class:`twisted.python.logfile.LogFile` (rotated by size at
    ``rotateLength`` bytes, None: never, keeping ``maxRotatedFiles``) that
    appends and follows rotation by others (module doc)."""

    # rotate is synchronized by LogFile already, with the same per-object lock.
    synchronized = ["write", "reopen"]

    def __init__(self, name: str, directory: str, rotateLength: int | None = 1000000,
                 defaultMode: int | None = None, maxRotatedFiles: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._follower = _Follower(clock)
        super().__init__(name, directory, rotateLength, defaultMode, maxRotatedFiles)
        _register(self)

    def _openFile(self) -> None:
        # The file it replaces (a rename by others, or by rotate()): the
        # new one is made like it (:func:`_open_like`).
        like: os.stat_result | None = getattr(self, "_stat", None)
        self.closed = False
        if like is None:
            fd = _open_append(self.path, 0o666 if self.defaultMode is None else self.defaultMode)
        else:
            fd = _open_like(self.path, like)
        self._file = cast(BinaryIO, os.fdopen(fd, "ab", 0))
        self._stat = os.fstat(fd)
        self._identity = (self._stat.st_dev, self._stat.st_ino)
        self.size = self._stat.st_size

    def write(self, data: Any) -> None:
        if self._follower.due():
            if self._follower.moved(self.path, self._identity):
                try:
                    self._reopen()
                except OSError:
                    pass  # keep the old file; looked at again in CHECK_SECONDS
            # The size the next rotation goes by: after copytruncate the
            # file is shorter than what was written to it.  And its mode
            # and owner now, for a file that replaces it.
            self._stat = os.fstat(self._file.fileno())
            self.size = self._stat.st_size
        super().write(data)

    def _reopen(self) -> None:
        old = self._file
        self._stat = os.fstat(old.fileno())
        try:
            self._openFile()
        except OSError:
            self._file = old
            raise
        old.close()

    def reopen(self) -> None:
        """Open ``path`` again; the old file stays in use if that fails.
        :raises OSError: naming why."""
        if not self.closed:
            self._reopen()

    def close(self) -> None:
        _unregister(self)
        super().close()


threadable.synchronize(FollowingLogFile)


def open_log_file(path: str, max_bytes: int | None, max_files: int | None) -> FollowingLogFile:
    """``path`` (made absolute) for appending, rotated at ``max_bytes`` (None:
    never) keeping ``max_files`` rotated files (None: all).

    :raises OSError: the file or its directory cannot be written.
    """
    directory, name = os.path.split(os.path.abspath(path))
    make_private_directories(directory)
    return FollowingLogFile(name, directory, rotateLength=max_bytes, maxRotatedFiles=max_files)


def make_private_directories(directory: str) -> None:
    """Create ``directory`` and its missing parents with mode 0700 each (a
    log file often sits in the state directory, which holds the store: it
    must not become readable by others because the log made it first).
    Directories that exist are left as they are.

    :raises OSError: a directory cannot be created.
    """
    missing = []
    while directory and not os.path.isdir(directory):
        missing.append(directory)
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    for each in reversed(missing):
        try:
            os.mkdir(each, 0o700)
        except FileExistsError:
            pass  # made meanwhile (another worker)
        else:
            os.chmod(each, 0o700)  # mkdir's mode is subject to the umask


def reopen_all() -> tuple[list[str], list[str]]:
    """Open every log file of this process again: (paths reopened, one
    "path: reason" per file that could not be, which stays in use)."""
    with _open_lock:
        files = list(_open_files)
    reopened, failed = [], []
    for log_file in files:
        try:
            log_file.reopen()
        except OSError as e:
            failed.append(f"{log_file.path}: {e.strerror or e}")
        else:
            reopened.append(log_file.path)
    return reopened, failed


def hangup_summary(reopened: list[str], failed: list[str]) -> str:
    """What a SIGHUP did, in one line: the files reopened, and those kept
    open (the old file still written to) with why (:func:`reopen_all`)."""
    if not reopened and not failed:
        return "no log file is open here; nothing to reopen"
    parts = []
    if reopened:
        parts.append("reopened " + ", ".join(reopened))
    if failed:
        files = "the old file" if len(failed) == 1 else "the old files"
        parts.append(f"kept writing to {files} of " + ", ".join(failed) + " (cannot open the name again)")
    return "; ".join(parts)


class SignalService(service.Service):
    """What ``twistd estgw`` (and ``estgw-approval``) do on a signal, instead of
    dying, SIGHUP's default:

    * SIGHUP: :func:`reopen_all`, then each of ``on_hangup`` (the supervisor
      of ``server.workers`` sends SIGHUP on to its workers).  Nothing else
      is reloaded: the configuration needs a restart.
    * SIGUSR1: rotate the human log now with ``rotate``; ignored without
      it (the log goes to standard output, or, in a worker of
      ``server.workers``, to the supervisor, which rotates it).

    The handlers only schedule the work on the reactor thread
    (``callFromThread``), so a signal that arrives in the middle of a write
    never runs a reopen inside it.  Installed in :meth:`startService` (the
    main thread), the previous handlers restored in :meth:`stopService`.
    """

    _log = Logger()

    def __init__(self, reactor: Any = None, on_hangup: list[Callable[[], None]] | None = None,
                 rotate: Callable[[], None] | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.on_hangup = list(on_hangup or [])
        self._rotate = rotate
        self._previous: dict[int, Any] = {}

    def startService(self) -> None:
        super().startService()
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        wanted: dict[int, Any] = {signal.SIGHUP: self._handler(self._hangup)}
        # SIGUSR1's default action ends the process: never leave it at that.
        wanted[signal.SIGUSR1] = signal.SIG_IGN if self._rotate is None else self._handler(self._rotate_now)
        for number, action in wanted.items():
            self._previous[number] = signal.signal(number, action)

    def _handler(self, action: Callable[[], None]) -> Callable[[int, Any], None]:
        def handle(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(action)

        return handle

    def stopService(self) -> Any:
        for number, previous in self._previous.items():
            signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
        return super().stopService()

    def _hangup(self) -> None:
        reopened, failed = reopen_all()
        for why in failed:
            self._log.error("SIGHUP: cannot reopen the log file {why}; still writing to the old one", why=why)
        self._log.info("SIGHUP: {summary}", summary=hangup_summary(reopened, failed))
        for action in self.on_hangup:
            action()

    def _rotate_now(self) -> None:
        assert self._rotate is not None
        self._rotate()
        self._log.info("SIGUSR1: log rotated")
