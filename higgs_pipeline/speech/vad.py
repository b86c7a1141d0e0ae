"""Voice activity detection with the Silero VAD model that faster-whisper ships (`assets/silero_vad_v6.onnx`,
ONNX, offline): where in 16 kHz audio someone speaks. Tone, noise and silence come out as no speech."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from higgs_pipeline.speech.scoring import MODEL_RATE


@dataclass(frozen=True)
class VadSettings:
    threshold: float = 0.5  # Silero's speech probability above which a frame is speech
    min_speech_ms: int = 250  # shorter bursts (a click, a cough) are not speech
    min_silence_ms: int = 300  # a pause this long ends a speech region
    pad_ms: int = 100  # kept around each region so that word onsets and tails are not clipped
    max_region_s: float = 28.0  # Silero splits longer speech at its quietest point: one ASR window per region


def speech_regions(audio16k: np.ndarray, settings: VadSettings | None = None) -> list[tuple[float, float]]:
    """(start_s, end_s) of every speech region in mono 16 kHz float audio, in order."""
    settings = settings or VadSettings()
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    audio = np.ascontiguousarray(audio16k, dtype=np.float32)
    if audio.size < MODEL_RATE // 10:
        return []
    options = VadOptions(
        threshold=settings.threshold,
        min_speech_duration_ms=settings.min_speech_ms,
        min_silence_duration_ms=settings.min_silence_ms,
        speech_pad_ms=settings.pad_ms,
        max_speech_duration_s=settings.max_region_s,
    )
    return [(item["start"] / MODEL_RATE, item["end"] / MODEL_RATE) for item in get_speech_timestamps(audio, options)]
