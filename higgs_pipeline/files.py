"""Writing a user's and the pipeline's files so that nothing is ever half-written: every file goes to a unique
temporary name beside its target and is renamed onto it only once complete, every folder is filled under a
temporary name and swapped into place. A full disk, a killed run or two concurrent writers leave the previous
content (or nothing), never a partial file. The one place for that rule: the tables, JSON records, checkpoints,
WAVs and exported folders all go through these helpers.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import fsspec


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **options) -> Iterator[IO]:
    """Open a temporary file beside `path` for writing; rename it onto `path` only when the block completes.

    On an error the temporary file is removed and `path` keeps its previous content (or stays absent). Locally
    the rename is `os.replace` (atomic on one file system); on object stores it is a copy of the finished object.
    """
    fs, target = fsspec.core.url_to_fs(path)
    folder, name = target.rsplit("/", 1) if "/" in target else ("", target)
    temp = f"{folder}/.{name}.{uuid.uuid4().hex[:12]}.tmp" if folder else f".{name}.{uuid.uuid4().hex[:12]}.tmp"
    if folder:  # as fsspec.open does for a write: the target's folder is created
        fs.makedirs(folder, exist_ok=True)
    try:
        with fs.open(temp, mode, **options) as handle:
            yield handle
        if is_local_filesystem(fs):
            os.replace(temp, target)
        else:
            fs.mv(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            if fs.exists(temp):
                fs.rm(temp)
        raise


def protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    """The names `fs` answers to ("file", "local"; "s3", "s3a"): fsspec gives one string or a tuple."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local_filesystem(fs: fsspec.AbstractFileSystem) -> bool:
    """True for this machine's own file system, where a rename is atomic."""
    return "file" in protocols(fs)


def replace_dir(temporary: Path, final: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is swapped out, then removed."""
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def temporary_dir(final: Path) -> Path:
    path = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    path.mkdir(parents=True)
    return path


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block ends (then take effect as they would have): for a few renames that
    must happen all or none. Outside the main thread, where Python cannot handle signals, the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda got, _frame: received.append(got)) for number in _DEFERRED}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set from C, unknown here
        for number in dict.fromkeys(received):
            signal.raise_signal(number)


def write_atomic(path: str, data: bytes | str) -> str:
    """`data` (text is UTF-8) at `path`, local or fsspec URL, all or nothing."""
    with atomic_open(path, "wb") as handle:
        handle.write(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def write_json(path: str, document: Any, indent: int | None = 2) -> str:
    """`document` as JSON at `path`, all or nothing (a reader never sees half a document)."""
    return write_atomic(path, json.dumps(document, indent=indent, allow_nan=True) + "\n")


def is_utf8(text: str) -> bool:
    """Whether `text` can be written as UTF-8: a name read from argv or a file system in another encoding keeps its
    stray bytes as surrogates, which every table write would refuse after the work."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown_name(text: str) -> str:
    """`text` as any table or message can hold it: the stray bytes of a name that is not UTF-8 written as \\xNN."""
    return os.fsencode(text).decode("utf-8", "backslashreplace")
