"""Probing audio files: does it exist, decode, how long, how loud, and what is its content hash.

Each distinct file is read once (bytes through fsspec, so local and s3:// alike), hashed (sha256 of the bytes:
the `clip_hash` that keys the token store) and decoded with `audio_io.decode`. Files are probed in a thread
pool: reading is I/O-bound and libsndfile and hashlib release the GIL.
"""

from __future__ import annotations

import io
import math
import os
import re
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import soundfile

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.hashing import sha256_hex

# libsndfile reports a WAV/AIFF data chunk longer than the file as "data : 128000 (should be 63960)".
_SHORT_DATA_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Containers whose header states the exact frame count; MP3/Ogg frame counts are estimates, so a shortfall
# there is not evidence of truncation (a cut MP3 is indistinguishable from a shorter one).
_EXACT_LENGTH_FORMATS = {"WAV", "WAVEX", "AIFF", "FLAC", "W64", "RF64", "CAF", "AU"}


@dataclass(frozen=True)
class ClipProbe:
    """What probing one file found. `reason` is "" for a usable file, else one of the file reject reasons."""

    uri: str
    reason: str = ""
    detail: str = ""
    clip_hash: str = ""
    frames: int = 0
    sample_rate: int = 0
    channels: int = 0
    duration_s: float = 0.0
    peak_dbfs: float = -math.inf


def probe_clip(uri: str, max_seconds: float | None = None) -> ClipProbe:
    """Probe one file; never raises for a bad file (the reason says what is wrong).

    A file whose header already says it is longer than `max_seconds` is not decoded (an hour-long recording
    would cost seconds and gigabytes only to be rejected).
    """
    protocol, _, rest = uri.partition("://")
    if rest.startswith("../") or rest == "..":
        return ClipProbe(uri, "missing_file", f"the path climbs above the {protocol} store's root")
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        data = fs.cat_file(path)
    except FileNotFoundError:
        return ClipProbe(uri, "missing_file", "audio file not found" + _spelling_hint(uri))
    except IsADirectoryError:
        return ClipProbe(uri, "missing_file", "audio path is a directory")
    except OSError as error:
        return ClipProbe(uri, "missing_file", f"cannot read audio file: {error}")
    except ValueError as error:  # fsspec: "Protocol not known"; a malformed URI. A missing fsspec backend
        # (ImportError) or missing credentials are set-up problems of the whole run: they propagate.
        return ClipProbe(uri, "missing_file", f"cannot open audio file: {error}")
    clip_hash = sha256_hex(data)
    if not data:
        return ClipProbe(uri, "empty_audio", "file has 0 bytes", clip_hash)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as header:
            declared, rate, channels, container = header.frames, header.samplerate, header.channels, header.format
            log = header.extra_info
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as error:
        return ClipProbe(uri, "undecodable", f"not a readable audio file: {_short(error)}", clip_hash)
    if max_seconds is not None and rate > 0 and declared / rate > max_seconds and container in _EXACT_LENGTH_FORMATS:
        return _probe(uri, "too_long", "", clip_hash, declared, rate, channels, -math.inf)
    try:
        wave, rate = decode(data)
    except (soundfile.LibsndfileError, RuntimeError) as error:
        reason = "truncated" if declared > 0 else "undecodable"
        return ClipProbe(uri, reason, f"decoding failed part-way (truncated or corrupt): {_short(error)}", clip_hash)
    frames = int(wave.shape[1])
    if frames == 0:
        return ClipProbe(uri, "empty_audio", "no audio samples", clip_hash, 0, rate, channels, 0.0)
    peak = float(np.max(np.abs(wave)))
    peak_dbfs = 20.0 * math.log10(peak) if peak > 0 else -math.inf
    short_chunk = _SHORT_DATA_CHUNK.search(log or "")
    if short_chunk and int(short_chunk.group(2)) < int(short_chunk.group(1)):
        detail = f"data chunk says {short_chunk.group(1)} bytes, file holds {short_chunk.group(2)}"
        return _probe(uri, "truncated", detail, clip_hash, frames, rate, channels, peak_dbfs)
    if container in _EXACT_LENGTH_FORMATS and frames < declared:
        detail = f"header says {declared} frames, decoded {frames}"
        return _probe(uri, "truncated", detail, clip_hash, frames, rate, channels, peak_dbfs)
    return _probe(uri, "", "", clip_hash, frames, rate, channels, peak_dbfs)


def _spelling_hint(uri: str) -> str:
    """Why a path a user can see may still not be found: a Windows separator, or another Unicode spelling of the
    same name (macOS writes decomposed accents: "e" + U+0301, where a manifest typed elsewhere has U+00E9)."""
    if "\\" in uri:
        return " (the path holds '\\': folders are separated by '/')"
    for form in ("NFC", "NFD"):
        variant = unicodedata.normalize(form, uri)
        if variant != uri and "://" not in uri and os.path.exists(variant):
            return f" (a file of that name exists spelled in Unicode {form}: write the path as it is on disk)"
    return ""


def _probe(uri, reason, detail, clip_hash, frames, rate, channels, peak_dbfs) -> ClipProbe:
    duration = frames / rate if rate else 0.0
    return ClipProbe(uri, reason, detail, clip_hash, int(frames), int(rate), int(channels), duration, peak_dbfs)


def _short(error: Exception) -> str:
    """libsndfile messages embed the repr of the BytesIO they read; keep only the part that says what failed."""
    text = str(error)
    return text.split(": ", 1)[1] if text.startswith("Error opening <") and ": " in text else text


def probe_clips(uris: Iterable[str], max_seconds: float | None = None, workers: int = 8) -> dict[str, ClipProbe]:
    """Probe each distinct URI once, `workers` at a time."""
    distinct = list(dict.fromkeys(u for u in uris if u))
    if workers <= 1 or len(distinct) <= 1:
        return {uri: probe_clip(uri, max_seconds) for uri in distinct}
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="probe") as pool:
        return dict(zip(distinct, pool.map(lambda uri: probe_clip(uri, max_seconds), distinct), strict=True))
