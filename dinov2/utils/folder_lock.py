"""One writer per folder: an exclusive `flock` on a lock file inside it, held for the life of a job.

Training (`<run>/run.lock`), `panopticon embed` and `panopticon predict` (`<output>/.panopticon.lock`) use it. The
holder writes its host, pid, start time and command into the file. The kernel drops the lock when the process
dies, however it dies (SIGKILL included), so:

- lock held by a live process -> another job is refused before it writes anything (`FolderLockedError`, naming
  the holder);
- lock free but the file still names a holder -> that job died without releasing it (a stale lock): taken over,
  and `describe_previous` names the previous holder for the caller's warning;
- a job that ends normally empties the file and releases the lock.

A process that already holds a folder's lock may ask for it again (`hold`): the second request is a no-op, since
`flock` on a second descriptor of the same file would refuse the process its own lock. `flock` works on local
file systems and on NFSv4/Lustre mounts that support POSIX locks. Imports the standard library only.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import os
import socket
from typing import Any, Dict, Iterator, Optional


class FolderLockedError(RuntimeError):
    """Another live job holds the folder."""


_HELD: Dict[str, "FolderLock"] = {}  # lock file (absolute) -> the lock this process holds on it


class FolderLock:
    """Exclusive lock on `folder` via `folder/lock_file` (`acquire` / `release`; released by the kernel when the
    process dies). `job` names the kind of job in messages ('training job', 'panopticon embed')."""

    def __init__(self, folder: str, lock_file: str, job: str):
        self.folder, self.job = folder, job
        self.path = os.path.join(folder, lock_file)
        self._fd: Optional[int] = None
        self.previous: Optional[Dict[str, Any]] = None  # holder recorded in a stale lock that was taken over

    @staticmethod
    def _read(fd: int) -> str:
        os.lseek(fd, 0, os.SEEK_SET)
        chunks = []
        while True:
            b = os.read(fd, 65536)
            if not b:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(b)

    def acquire(self) -> "FolderLock":
        """Take the lock or raise `FolderLockedError` naming the live holder. Sets `previous` when a stale lock
        was taken over."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd).strip() or "holder not recorded yet"
            os.close(fd)
            raise FolderLockedError(
                f"folder {self.folder} is in use by another {self.job} ({holder}, lock file {self.path}); wait for "
                "it to end, stop it, or choose another output folder") from None
        old = self._read(fd).strip()
        if old:
            try:
                self.previous = json.loads(old)
            except ValueError:
                self.previous = {"raw": old}
        info = {"host": socket.gethostname(), "pid": os.getpid(), "job": self.job,
                "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        _HELD[os.path.abspath(self.path)] = self
        atexit.register(self.release)
        return self

    def close_in_child(self) -> None:
        """In a forked child (data-loader worker): close the inherited descriptor without unlocking, so that the
        lock lives exactly as long as the process that took it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        _HELD.pop(os.path.abspath(self.path), None)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file and unlock it (idempotent)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
        _HELD.pop(os.path.abspath(self.path), None)
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        atexit.unregister(self.release)

    def describe_previous(self) -> str:
        """One line about the stale holder that was taken over ('' if none)."""
        p = self.previous
        if not p:
            return ""
        if "raw" in p:
            return f"took over a stale lock {self.path} ({p['raw'][:200]!r})"
        return (f"took over a stale lock {self.path}: its job (host {p.get('host')}, pid {p.get('pid')}, started "
                f"{p.get('start_time')}) is no longer running")


def held_lock(folder: str, lock_file: str) -> Optional[FolderLock]:
    """The lock this process holds on `folder/lock_file`, if any."""
    return _HELD.get(os.path.abspath(os.path.join(folder, lock_file)))


@contextlib.contextmanager
def hold(folder: str, lock_file: str, job: str) -> Iterator[FolderLock]:
    """Hold the folder's lock for the block (re-entrant within one process: an inner request is a no-op)."""
    mine = held_lock(folder, lock_file)
    if mine is not None:
        yield mine
        return
    lock = FolderLock(folder, lock_file, job).acquire()
    try:
        yield lock
    finally:
        lock.release()
