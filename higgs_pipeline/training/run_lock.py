"""One training per run folder: an exclusive `flock` on `<run dir>/.lock`, held by rank 0 for the whole run.

Two trainers in one folder would interleave checkpoints and metrics, and the later one would report the
earlier one's summary. The kernel drops a flock when its holder dies (even by SIGKILL), so a crashed run never
leaves the folder locked; the file itself stays (deleting a lock file races with the next taker).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderLocked(RuntimeError):
    """Another process trains in this run folder."""


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        """Take the folder's lock now, or raise RunFolderLocked naming the folder and its holder."""
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
            self.release()
            raise RunFolderLocked(
                f"run folder {run_dir} is locked by another training ({holder}): wait for it to finish or stop "
                f"it, or train into another --output-dir"
            ) from None
        os.ftruncate(self._fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
