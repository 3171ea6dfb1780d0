"""`<run>/run.lock`: one training job per run folder.

The main rank holds an exclusive `flock` on `run.lock` for the life of the job and writes its host, pid and start
time into it. The kernel drops the lock when the process dies, however it dies (SIGKILL included), so:

- lock held by a live process -> a second job is refused before it writes anything (`RunFolderLockedError`);
- lock free but the file still names a holder -> that job died without releasing it (a stale lock): taken over,
  with a warning naming the previous holder;
- a job that ends normally empties the file and releases the lock.

`flock` works on local file systems and on NFSv4/Lustre mounts that support POSIX locks.
"""
from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
from typing import Any, Dict, Optional

LOCK_FILE = "run.lock"


class RunFolderLockedError(RuntimeError):
    """Another live job holds the run folder."""


class RunLock:
    """Exclusive lock on a run folder (`acquire` / `release`; released by the kernel when the process dies)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
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

    def acquire(self) -> "RunLock":
        """Take the lock or raise `RunFolderLockedError` naming the live holder. Sets `previous` when a stale
        lock was taken over."""
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._read(fd).strip() or "holder not recorded yet"
            os.close(fd)
            raise RunFolderLockedError(
                f"run folder {os.path.dirname(self.path)} is in use by another training job ({holder}, lock file "
                f"{self.path}); wait for it to end, stop it, or choose another --output-dir") from None
        old = self._read(fd).strip()
        if old:
            try:
                self.previous = json.loads(old)
            except ValueError:
                self.previous = {"raw": old}
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "start_time": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(info) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        atexit.register(self.release)
        return self

    def close_in_child(self) -> None:
        """In a forked child (data-loader worker): close the inherited descriptor without unlocking, so that the
        lock lives exactly as long as the process that took it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file and unlock it (idempotent)."""
        if self._fd is None:
            return
        import fcntl

        fd, self._fd = self._fd, None
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
