"""Quality stage: per clip candidate, DNSMOS (naturalness and background), ASR confidence, speaking rate, clipping
and speaker purity; a candidate below a threshold is rejected with the reason, and loudness normalisation of the
clips that pass."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from higgs_pipeline.ingest.cut import Candidate
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.ingest.source import PcmFile
from higgs_pipeline.speech import dnsmos
from higgs_pipeline.speech.words import Word

PEAK_CEILING_DBFS = -1.0  # loudness normalisation never pushes a clip's peak above this
CLIPPED_LEVEL = 0.999
# Clips read and rated per `dnsmos.rate_batch` call: a long recording's clips are never all in memory (32 clips of
# at most 30 s: ~60 MB of 16 kHz audio).
RATE_BATCH = 32

# Clip reject reasons, in the order they are checked, with their meaning.
CLIP_REASONS = {
    "too_short": "shorter than min_seconds between its sentence ends or pauses",
    "too_long": "a single word longer than max_seconds (the ASR's timing failed there)",
    "mixed_speakers": "fewer than min_speaker_purity of its speech windows belong to its speaker",
    "low_asr_confidence": "mean Whisper word probability below min_asr_confidence",
    "speaking_rate": "words per second outside min/max_words_per_second",
    "clipping": "more than max_clipped_fraction of its samples at full scale",
    "low_quality": "DNSMOS OVRL below min_dnsmos (noise, distortion, not speech)",
}


@dataclass(frozen=True)
class ClipQuality:
    dnsmos_ovrl: float
    dnsmos_sig: float
    dnsmos_bak: float
    asr_confidence: float
    words_per_second: float
    clipped_fraction: float
    speaker_purity: float


def speaker_purity(candidate: Candidate, starts: np.ndarray, ends: np.ndarray, labels: np.ndarray) -> float:
    """Share of the speech windows lying mostly inside the clip that carry the clip's speaker (1.0 with none).

    `starts` and `ends` ascend (windows in time order): a sorted search finds the windows near the clip.
    """
    first = int(np.searchsorted(ends, candidate.start_s, side="right"))
    last = max(int(np.searchsorted(starts, candidate.end_s, side="left")), first)
    near_starts, near_ends = starts[first:last], ends[first:last]
    overlap = np.minimum(near_ends, candidate.end_s) - np.maximum(near_starts, candidate.start_s)
    inside = labels[first:last][overlap >= 0.5 * (near_ends - near_starts)]
    return float(np.mean(inside == candidate.speaker)) if inside.size else 1.0


def rate_candidates(analysis: PcmFile, candidates: Sequence[Candidate]) -> list[dnsmos.Dnsmos | None]:
    """DNSMOS of each candidate not already rejected (None for a rejected one), from the 16 kHz analysis audio:
    RATE_BATCH clips per batched rating, so only one batch's audio is in memory at a time."""
    ratings: list[dnsmos.Dnsmos | None] = [None] * len(candidates)
    rated = [index for index, candidate in enumerate(candidates) if not candidate.reason]
    for first in range(0, len(rated), RATE_BATCH):
        batch = rated[first : first + RATE_BATCH]
        audios = [analysis.read(candidates[k].start_s, candidates[k].end_s) for k in batch]
        for k, rating in zip(batch, dnsmos.rate_batch(audios), strict=True):
            ratings[k] = rating
    return ratings


def measure(
    candidate: Candidate, words: Sequence[Word], rating: dnsmos.Dnsmos, clip_audio: np.ndarray, purity: float
) -> ClipQuality:
    """The candidate's quality numbers; `rating` is its DNSMOS (`rate_candidates`)."""
    mine = words[candidate.first : candidate.last + 1]
    duration = max(candidate.end_s - candidate.start_s, 1e-6)
    return ClipQuality(
        dnsmos_ovrl=rating.ovrl,
        dnsmos_sig=rating.sig,
        dnsmos_bak=rating.bak,
        asr_confidence=float(np.mean([word.probability for word in mine])),
        words_per_second=len(mine) / duration,
        clipped_fraction=float(np.mean(np.abs(clip_audio) >= CLIPPED_LEVEL)) if clip_audio.size else 0.0,
        speaker_purity=purity,
    )


def reject_reason(quality: ClipQuality, settings: IngestSettings) -> tuple[str, str]:
    """(reason, detail) of the first failed check, ("", "") for a clip that passes."""
    rate = quality.words_per_second
    checks = (
        (
            "mixed_speakers",
            quality.speaker_purity < settings.min_speaker_purity,
            f"purity {quality.speaker_purity:.2f}",
        ),
        (
            "low_asr_confidence",
            quality.asr_confidence < settings.min_asr_confidence,
            f"confidence {quality.asr_confidence:.2f}",
        ),
        (
            "speaking_rate",
            not settings.min_words_per_second <= rate <= settings.max_words_per_second,
            f"{rate:.2f} words/s",
        ),
        (
            "clipping",
            quality.clipped_fraction > settings.max_clipped_fraction,
            f"{quality.clipped_fraction:.4f} clipped",
        ),
        ("low_quality", not quality.dnsmos_ovrl >= settings.min_dnsmos, f"DNSMOS OVRL {quality.dnsmos_ovrl:.2f}"),
    )
    return next(((reason, detail) for reason, failed, detail in checks if failed), ("", ""))


def normalize_loudness(audio: np.ndarray, rate: int, target_lufs: float) -> np.ndarray:
    """The clip at `target_lufs` integrated loudness (pyloudnorm, ITU-R BS.1770), peak held at -1 dBFS."""
    import pyloudnorm

    audio = np.asarray(audio, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyloudnorm warns on clipping: the ceiling below handles it
        loudness = pyloudnorm.Meter(rate).integrated_loudness(audio) if audio.size >= int(0.4 * rate) else -math.inf
        if math.isfinite(loudness):
            audio = pyloudnorm.normalize.loudness(audio, loudness, target_lufs)
    peak = float(np.abs(audio).max(initial=0.0))
    ceiling = 10 ** (PEAK_CEILING_DBFS / 20)
    if peak > ceiling:
        audio = audio * (ceiling / peak)
    return audio.astype(np.float32)
