"""`flock`s with a readable holder: one training per run folder (`training/run_lock.py`) and one run per artifact
store (`store_lock`, held by the `artifacts` resource for the whole run). A run of one `recording_clips` partition
holds the store's lock shared and its partition's own lock exclusively: partitions write disjoint folders, so they
run side by side, while every other run still has the store to itself.

The kernel drops a flock when its holder dies (even by SIGKILL), so a crashed run never leaves anything locked;
the lock file itself stays (deleting it races with the next taker). The holder (pid, host, time, and what holds
it) is written into the file, so a refused or waiting process can say who it waits for.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from higgs_pipeline.data.hashing import digest

# The lock file in a local artifact store's root.
STORE_LOCK_FILE = ".store.lock"


class LockBusy(RuntimeError):
    """Another process holds the lock; `holder` says which."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(f"{path} is held by {holder}")
        self.path, self.holder = path, holder


class FileLock:
    """A flock on `path`, taken at construction (blocking, or raising LockBusy when `wait` is False); exclusive,
    or `shared` with other shared holders (an exclusive taker then waits for all of them)."""

    def __init__(
        self,
        path: Path,
        what: str,
        wait: bool = False,
        on_wait: Callable[[str], None] | None = None,
        shared: bool = False,
    ) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            if not wait:
                self.release()
                raise LockBusy(path, holder) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(self._fd, mode)
        # Shared holders each write themselves: a waiting taker names the latest one (enough to find the runs).
        os.ftruncate(self._fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "what": what,
        }
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def holder(self) -> str:
        if self._fd is None:
            return "holder unknown"
        return os.pread(self._fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def store_lock_path(root: str) -> Path:
    """`<root>/.store.lock` for a local store; for an object store (no flock there) a file on this machine keyed
    by the store's URL, so runs on one machine still take turns."""
    if "://" not in root or root.startswith("file://"):
        folder = Path(root.removeprefix("file://"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder / STORE_LOCK_FILE
    from higgs_pipeline.models.demo import cache_root

    folder = cache_root() / "store-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{digest(root.rstrip('/'))[:24]}.lock"


def partition_lock_path(root: str, partition: str) -> Path:
    """The lock of one `recording_clips` partition of the store: beside the store's own lock file."""
    path = store_lock_path(root)
    return path.with_name(f"{path.name}.{digest(partition)[:16]}.partition")


@contextlib.contextmanager
def store_lock(
    root: str, what: str, log: Callable[[str], None] | None = None, partition: str | None = None
) -> Iterator[FileLock]:
    """Hold the artifact store's lock while the block runs; wait (saying for whom) while another run holds it.

    With `partition` (a run of one `recording_clips` partition), the store's lock is held shared and the
    partition's own lock (`partition_lock_path`) exclusively."""

    def waiting(holder: str) -> None:
        if log is not None:
            log(f"artifact store {root} is in use by another run ({holder}): waiting for it to finish")

    path = store_lock_path(root)
    with FileLock(path, what, wait=True, on_wait=waiting, shared=partition is not None) as lock:
        if partition is None:
            yield lock
            return
        own = partition_lock_path(root, partition)
        with FileLock(own, f"{what}, partition {partition}", wait=True, on_wait=waiting) as partition_lock:
            yield partition_lock
