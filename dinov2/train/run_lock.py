"""`<run>/run.lock`: one training job per run folder — `dinov2.utils.folder_lock.FolderLock` on `run.lock`.

The main rank holds the lock for the life of the job; a second job is refused before it writes anything, a lock
left by a killed job is taken over with a warning (see `dinov2.utils.folder_lock`).
"""
from __future__ import annotations

from dinov2.utils.folder_lock import FolderLock, FolderLockedError

LOCK_FILE = "run.lock"
RunFolderLockedError = FolderLockedError  # the name training code and tests use


class RunLock(FolderLock):
    """Exclusive lock on a training run folder (`acquire` / `release`)."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir, LOCK_FILE, "training job")
