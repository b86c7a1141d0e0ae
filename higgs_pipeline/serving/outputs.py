"""Where a command writes: a new WAV or folder, replaced only when asked, written under a temporary name first."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from higgs_pipeline.serving.adapters import SynthesisError


def check_output_file(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.is_dir():
        raise SynthesisError(f"--out {out} is a folder; name a .wav file")
    if path.exists() and not overwrite:
        raise SynthesisError(f"--out {out} already exists; choose another name or pass --overwrite")
    return path


def check_output_folder(out: str, overwrite: bool) -> Path:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SynthesisError(f"--out {out} is a file; name a folder for the merged checkpoint")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise SynthesisError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    return path


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int, overwrite: bool) -> None:
    """16-bit WAV written under a temporary name and renamed, so a failure leaves no partial file."""
    import soundfile as sf

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.wav", dir=path.parent)
    os.close(handle)
    try:
        sf.write(temporary, waveform, sample_rate, format="WAV", subtype="PCM_16")
        if path.exists() and not overwrite:
            raise SynthesisError(f"--out {path} appeared while synthesizing; not overwritten (pass --overwrite)")
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
