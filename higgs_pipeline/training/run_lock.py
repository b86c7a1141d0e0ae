"""One training per run folder: an exclusive `flock` on `<run dir>/.lock`, held by rank 0 for the whole run.

Two trainers in one folder would interleave checkpoints and metrics, and the later one would report the
earlier one's summary. The lock itself (a flock the kernel drops when its holder dies, the holder written into
the file) is `locks.FileLock`, the one the artifact store's run lock uses too.
"""

from __future__ import annotations

from pathlib import Path

from higgs_pipeline.locks import FileLock, LockBusy

LOCK_FILE = ".lock"


class RunFolderLocked(RuntimeError):
    """Another process trains in this run folder."""


class RunLock(FileLock):
    def __init__(self, run_dir: Path) -> None:
        """Take the folder's lock now, or raise RunFolderLocked naming the folder and its holder."""
        try:
            super().__init__(run_dir / LOCK_FILE, "training")
        except LockBusy as busy:
            raise RunFolderLocked(
                f"run folder {run_dir} is locked by another training ({busy.holder}): wait for it to finish or stop "
                f"it, or train into another --output-dir"
            ) from None

    def __enter__(self) -> RunLock:
        return self
