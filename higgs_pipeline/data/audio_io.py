"""Decoding audio files. soundfile (libsndfile, shipped in its wheel) reads wav, flac, ogg and mp3 with no
system library; torchaudio 2.9's `load` needs torchcodec and FFmpeg, which a fresh machine lacks."""

from __future__ import annotations

import io

import numpy as np
import soundfile
import torch
import torchaudio


def decode(data: bytes | str) -> tuple[np.ndarray, int]:
    """Audio as float32 `[channels, samples]` and its sample rate, from bytes or a local path."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    wave, rate = soundfile.read(source, dtype="float32", always_2d=True)
    return np.ascontiguousarray(wave.T), int(rate)


def encode_wav(waveform: np.ndarray, sample_rate: int) -> bytes:
    """16-bit PCM WAV bytes (`[samples]` or `[samples, channels]`): what every clip the pipeline writes is."""
    buffer = io.BytesIO()
    soundfile.write(buffer, np.asarray(waveform, dtype=np.float32), sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def to_mono(wave: np.ndarray, rate: int, target_rate: int | None = None) -> torch.Tensor:
    """Mono float32 tensor, resampled with torchaudio when `target_rate` differs."""
    mono = torch.from_numpy(wave.mean(axis=0) if wave.ndim == 2 else wave)
    if target_rate is not None and target_rate != rate:
        mono = torchaudio.functional.resample(mono, rate, target_rate)
    return mono
