"""Where a command may write, the one place for the rule: a new path, or (asked with --overwrite) what the command
itself wrote before; never a link, a device, a FIFO or a socket (as root, replacing /dev/null with a WAV would
break the machine), never the adapter, its base or the artifact store the command reads. Every check runs before
anything is generated, and again just before the rename, since the path may change while the model works.
Files are written through `files.py` (a temporary name, renamed once complete, the umask's mode).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from higgs_pipeline.data.probe import file_kind
from higgs_pipeline.files import atomic_open, temporary_dir
from higgs_pipeline.serving.adapters import SynthesisError

# What a command may replace in an existing folder: None when the folder is its own to replace, else why not.
OwnedCheck = Callable[[Path], str | None]
NOT_A_FILE_OR_NEW = "outputs are written only to regular files or new paths"


@dataclass(frozen=True)
class Protected:
    """A folder no output may be, contain or lie inside (`exempt`: a subfolder that is the command's own)."""

    name: str  # "the adapter", "the base model", "the artifact store"
    path: str
    exempt: str | None = None


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as error:  # ENOTDIR: a parent is a file; ENAMETOOLONG; ELOOP
        raise SynthesisError(f"{path}: cannot be used as an output ({error.strerror or error})") from None


def _refuse_special(flag: str, out: str, st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise SynthesisError(f"{flag} {out} is a symbolic link; name the real path ({NOT_A_FILE_OR_NEW})")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise SynthesisError(
            f"{flag} {out}: not_a_regular_file: it is a {file_kind(st.st_mode)}, never replaced ({NOT_A_FILE_OR_NEW})"
        )


def _guarded(out: str, flag: str, protected: Sequence[Protected]) -> os.stat_result | None:
    """The output's own stat (None: a new path), after refusing links, nodes and protected folders."""
    st = _lstat(Path(out))
    if st is not None:
        _refuse_special(flag, out, st)
    check_not_protected(Path(out), flag, protected)
    return st


def check_output_file(out: str, overwrite: bool, flag: str = "--out", protected: Sequence[Protected] = ()) -> Path:
    """`out` as a file to write: new, or an existing regular file with --overwrite."""
    path, st = Path(out), _guarded(out, flag, protected)
    if st is None:
        return path
    if stat.S_ISDIR(st.st_mode):
        raise SynthesisError(f"{flag} {out} is a folder; name a .wav file")
    if not overwrite:
        raise SynthesisError(f"{flag} {out} already exists; choose another name or pass --overwrite")
    return path


def check_output_folder(
    out: str, overwrite: bool, owned: OwnedCheck, flag: str = "--out", protected: Sequence[Protected] = ()
) -> Path:
    """`out` as a folder to write: new or empty, or with --overwrite one `owned` says the command may replace."""
    path, st = Path(out), _guarded(out, flag, protected)
    if st is None:
        return path
    if not stat.S_ISDIR(st.st_mode):
        raise SynthesisError(f"{flag} {out} is a file; name a folder")
    if not any(path.iterdir()):
        return path
    if not overwrite:
        raise SynthesisError(f"{flag} {out} exists and is not empty; choose another folder or pass --overwrite")
    problem = owned(path)
    if problem:
        raise SynthesisError(f"{flag} {out}: {problem}; --overwrite replaces only what this command wrote there")
    return path


def check_not_protected(path: Path, flag: str, protected: Iterable[Protected]) -> None:
    """Refuse an output that is, contains or lies inside a protected folder (compared as real paths)."""
    real = Path(os.path.realpath(path))
    for folder in protected:
        guarded = Path(os.path.realpath(folder.path))
        if folder.exempt and Path(os.path.realpath(folder.exempt)) in real.parents:
            continue
        if real == guarded or guarded in real.parents:
            raise SynthesisError(f"{flag} {path} lies inside {folder.name} ({folder.path}); write somewhere else")
        if real in guarded.parents:
            raise SynthesisError(f"{flag} {path} contains {folder.name} ({folder.path}); write somewhere else")


def local_folders(candidates: Iterable[Protected]) -> list[Protected]:
    """The candidates that are folders on this machine (a hub id or an s3:// store cannot be written over)."""
    return [c for c in candidates if c.path and "://" not in c.path and os.path.isdir(c.path)]


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int, overwrite: bool, flag: str = "--out") -> None:
    """16-bit WAV written under a temporary name and renamed, so a failure leaves no partial file; the path is
    checked again just before the rename (it may have appeared, or turned into a link, while generating)."""
    with staged_wav(path, waveform, sample_rate, overwrite, flag):
        pass


@contextlib.contextmanager
def staged_wav(
    path: Path, waveform: np.ndarray, sample_rate: int, overwrite: bool, flag: str = "--out"
) -> Iterator[None]:
    """`write_wav` with the rename held until the block completes: what the block writes besides (a dialogue's turn
    files) and the WAV land together, and an error in the block leaves `path` as it was."""
    from higgs_pipeline.data.audio_io import encode_wav

    data = encode_wav(waveform, sample_rate)
    in_block = False  # an OSError from the caller's block is the caller's to name, not this WAV's
    try:
        with atomic_open(str(path), "wb") as handle:
            handle.write(data)
            try:
                check_output_file(str(path), overwrite, flag)
            except SynthesisError as error:
                raise SynthesisError(f"{error} (the path changed while synthesizing; nothing written)") from None
            in_block = True
            yield
            in_block = False
    except OSError as error:
        if in_block:
            raise
        raise SynthesisError(f"{flag} {path}: cannot be written ({error.strerror or error})") from None


# The per-turn WAVs a dialogue writes: turn_001_SPEAKER0.wav, ...
TURN_FILE = re.compile(r"turn_\d{3,}_SPEAKER\d+\.wav")


def turn_file_name(index: int, tag: str) -> str:
    return f"turn_{index + 1:03d}_{tag}.wav"


def own_turn_files(folder: Path) -> str | None:
    """A turns folder may receive new turn files when every entry named like one is a regular file (the others,
    a user's own files, are never touched)."""
    for entry in folder.iterdir():
        if TURN_FILE.fullmatch(entry.name):
            st = os.lstat(entry)
            if not stat.S_ISREG(st.st_mode):
                return f"{entry.name} is a {'symbolic link' if stat.S_ISLNK(st.st_mode) else file_kind(st.st_mode)}"
    return None


def write_turns(folder: Path, turns: Sequence[tuple[str, np.ndarray, int]], flag: str = "--turns-dir") -> None:
    """Each turn's WAV (tag, waveform, rate) in `folder`: a new folder is filled under a temporary name and renamed
    into place; in an existing one only turn files are written, and earlier turn files not in this set removed."""
    names = [turn_file_name(index, tag) for index, (tag, _, _) in enumerate(turns)]
    if not folder.exists():
        staging = temporary_dir(folder)
        try:
            for name, (_, waveform, rate) in zip(names, turns, strict=True):
                write_wav(staging / name, waveform, rate, overwrite=False, flag=flag)
            os.rename(staging, folder)  # fails, never replaces, if a non-empty folder appeared meanwhile
        except OSError as error:
            raise SynthesisError(f"{flag} {folder}: cannot be written ({error.strerror or error})") from None
        finally:
            if staging.exists():
                for leftover in staging.iterdir():
                    leftover.unlink()
                staging.rmdir()
        return
    problem = own_turn_files(folder)
    if problem:
        raise SynthesisError(f"{flag} {folder}: {problem} (the path changed while synthesizing; nothing written)")
    for name, (_, waveform, rate) in zip(names, turns, strict=True):
        write_wav(folder / name, waveform, rate, overwrite=True, flag=flag)
    for entry in folder.iterdir():
        if TURN_FILE.fullmatch(entry.name) and entry.name not in names and stat.S_ISREG(os.lstat(entry).st_mode):
            entry.unlink()
