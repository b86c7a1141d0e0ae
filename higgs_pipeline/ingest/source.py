"""Decode stage: open a recording by the manifest probe's rules, refuse what is too long from its header, and
stream it block by block into two scratch files of mono float32 (16 kHz for the speech models, and the clip rate
for the clips), so that memory stays flat however long the recording is.

Every refusal is a `RecordingRejected` with one of the probe's reasons (`missing_file`, `not_a_regular_file`,
`file_too_large`, `empty_audio`, `undecodable`, `truncated`, `non_finite_samples`, `too_long`) or
`path_outside_folder` / `silent`.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import fsspec
import numpy as np
import pandas as pd
import soundfile

from higgs_pipeline.data.hashing import sha256_of_stream
from higgs_pipeline.data.manifest import resolve_audio_paths
from higgs_pipeline.data.probe import ClipRefusedError, header_shortfall, open_local_file, short_error
from higgs_pipeline.ingest.settings import MAX_CLIP_RATE, IngestSettings
from higgs_pipeline.speech.scoring import MODEL_RATE

BLOCK_FRAMES = 1 << 16
SILENCE_DBFS = -60.0  # as raw_audio_manifest: a recording whose peak stays below this holds nothing to hear


class RecordingRejected(Exception):
    """A recording that yields no clips: `reason` says why in one word, `detail` in a sentence."""

    def __init__(self, reason: str, detail: str, content_hash: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail
        self.content_hash = content_hash  # of the bytes refused, when they were read: a changed file is known so


class PcmFile:
    """Mono float32 samples in a headerless scratch file; windows are read on demand, never the whole file."""

    def __init__(self, path: Path, rate: int) -> None:
        self.path, self.rate = path, rate

    @property
    def frames(self) -> int:
        return self.path.stat().st_size // 4

    def read(self, start_s: float, end_s: float) -> np.ndarray:
        first = max(0, int(round(start_s * self.rate)))
        last = min(self.frames, int(round(end_s * self.rate)))
        if last <= first:
            return np.zeros(0, dtype=np.float32)
        return np.fromfile(self.path, dtype=np.float32, count=last - first, offset=first * 4)


@dataclass(frozen=True)
class DecodedRecording:
    content_hash: str  # sha256 of the file's bytes
    sample_rate: int
    channels: int
    duration_s: float
    peak_dbfs: float
    analysis: PcmFile  # 16 kHz, for VAD, ASR, speaker embeddings and DNSMOS
    clip_audio: PcmFile  # min(source rate, 24 kHz), what the clips are cut from


def check_inside(path: str, folder: str) -> None:
    """The recording must lie inside `folder` once links are followed (the manifest's containment rule)."""
    local = "://" not in path or path.startswith("file://")
    target = os.path.abspath(path.removeprefix("file://")) if local else path
    _resolved, outside = resolve_audio_paths(posixpath.join(folder, "recordings"), pd.Series([target]))
    if bool(outside.iloc[0]):
        raise RecordingRejected("path_outside_folder", f"{path} leads outside {folder} (a link or '..')")


def localize(uri: str, scratch: Path, max_bytes: int) -> str:
    """A local path for `uri`: itself, or an object store's file copied into `scratch` (size checked first)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri.removeprefix("file://")
    fs, path = fsspec.core.url_to_fs(uri)
    fs.invalidate_cache(path)  # a listing cached in this process (the sensor's) may predate a change or deletion
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise RecordingRejected("missing_file", f"{uri} not found") from None
    if info.get("type") != "file":
        raise RecordingRejected("not_a_regular_file", f"{uri} is a {info.get('type', 'non-file')}")
    if int(info.get("size") or 0) > max_bytes:
        raise RecordingRejected("file_too_large", f"{info.get('size')} bytes > max_recording_bytes {max_bytes}")
    local = scratch / ("download" + Path(path).suffix)
    try:
        fs.get(path, str(local))
    except FileNotFoundError:  # deleted since it was measured
        raise RecordingRejected("missing_file", f"{uri} not found") from None
    return str(local)


@contextlib.contextmanager
def open_recording(path: str, settings: IngestSettings) -> Iterator[tuple[BinaryIO, str]]:
    """(open file, sha256 of its bytes) of a local recording, after the probe's open rules and the header's length
    check: the hash its cached result is keyed by is known before a sample is decoded, and decoding then reads the
    very bytes that were hashed (the same handle). Raises RecordingRejected for anything unusable."""
    try:
        handle = open_local_file(path, settings.max_recording_bytes, "recording", "max_recording_bytes")
    except ClipRefusedError as refused:
        raise RecordingRejected(refused.reason, refused.detail) from None
    except FileNotFoundError:
        raise RecordingRejected("missing_file", f"{path} not found") from None
    except OSError as error:
        raise RecordingRejected("missing_file", f"cannot read {path}: {error.strerror or error}") from None
    with handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise RecordingRejected("empty_audio", "file has 0 bytes", sha256_of_stream(handle))
        try:
            with _open_sound(handle) as header:  # the length check comes before a byte is hashed or decoded
                _check_header(header, settings)
        except RecordingRejected as refused:
            if refused.reason != "too_long":  # bytes that are no audio: hashed, so new bytes are known as new
                handle.seek(0)
                refused.content_hash = sha256_of_stream(handle)
            raise
        handle.seek(0)
        content_hash = sha256_of_stream(handle)
        handle.seek(0)
        yield handle, content_hash


def decode_open(handle: BinaryIO, content_hash: str, settings: IngestSettings, scratch: Path) -> DecodedRecording:
    """Stream an opened recording (`open_recording`) into scratch PCM files."""
    with _open_sound(handle) as sound:
        return _stream(sound, content_hash, settings, scratch)


def decode_recording(path: str, settings: IngestSettings, scratch: Path) -> DecodedRecording:
    """Stream a local recording into scratch PCM files; raises RecordingRejected for anything unusable."""
    with open_recording(path, settings) as (handle, content_hash):
        return decode_open(handle, content_hash, settings, scratch)


def _open_sound(handle) -> soundfile.SoundFile:
    try:
        return soundfile.SoundFile(handle)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        raise RecordingRejected("undecodable", f"not a readable audio file: {short_error(error)}") from None


def _check_header(sound: soundfile.SoundFile, settings: IngestSettings) -> None:
    rate, channels, declared = sound.samplerate, sound.channels, sound.frames
    if rate <= 0 or channels <= 0:
        raise RecordingRejected("undecodable", f"header declares {rate} Hz and {channels} channels")
    if declared / rate > settings.max_recording_seconds:
        detail = f"header says {declared / rate:.0f} s > max_recording_seconds {settings.max_recording_seconds:g}"
        raise RecordingRejected("too_long", detail + " (not decoded)")


def _stream(sound: soundfile.SoundFile, content_hash: str, settings: IngestSettings, scratch: Path) -> DecodedRecording:
    import soxr

    rate, declared = sound.samplerate, sound.frames
    clip_rate = min(rate, MAX_CLIP_RATE)
    analysis, clips = PcmFile(scratch / "analysis.f32", MODEL_RATE), PcmFile(scratch / "clips.f32", clip_rate)
    to_model = soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32")
    to_clip = soxr.ResampleStream(rate, clip_rate, 1, dtype="float32") if clip_rate != rate else None
    frames, peak = 0, 0.0
    with analysis.path.open("wb") as model_out, clips.path.open("wb") as clip_out:
        try:
            for block in sound.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True):
                mono = np.ascontiguousarray(block.mean(axis=1), dtype=np.float32)
                if not np.isfinite(mono).all():
                    first = (frames + int(np.flatnonzero(~np.isfinite(mono))[0])) / rate
                    raise RecordingRejected(
                        "non_finite_samples", f"NaN or infinite sample values (first at {first:.3f} s)"
                    )
                frames += len(mono)
                if frames / rate > settings.max_recording_seconds:  # a header that understated the length
                    raise RecordingRejected(
                        "too_long", f"longer than max_recording_seconds {settings.max_recording_seconds:g}"
                    )
                peak = max(peak, float(np.abs(block).max(initial=0.0)))
                model_out.write(to_model.resample_chunk(mono).tobytes())
                clip_out.write((to_clip.resample_chunk(mono) if to_clip else mono).tobytes())
            model_out.write(to_model.resample_chunk(np.zeros(0, np.float32), last=True).tobytes())
            if to_clip:
                clip_out.write(to_clip.resample_chunk(np.zeros(0, np.float32), last=True).tobytes())
        except (soundfile.LibsndfileError, RuntimeError) as error:
            raise RecordingRejected(
                "truncated", f"decoding failed part-way (truncated or corrupt): {short_error(error)}"
            ) from None
    if frames == 0:
        raise RecordingRejected("empty_audio", "no audio samples")
    shortfall = header_shortfall(sound.extra_info, sound.format, declared, frames)
    if shortfall:
        raise RecordingRejected("truncated", shortfall)
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    if peak_dbfs < SILENCE_DBFS:
        raise RecordingRejected("silent", f"peak {peak_dbfs:.1f} dBFS < {SILENCE_DBFS:g} dBFS")
    return DecodedRecording(content_hash, rate, sound.channels, frames / rate, peak_dbfs, analysis, clips)


def scratch_dir(parent: str | None = None) -> Path:
    """A private scratch folder for one recording's PCM files (removed by the caller)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix="higgs-ingest-", dir=parent or os.environ.get("HIGGS_INGEST_SCRATCH")))
