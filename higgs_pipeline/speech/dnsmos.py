"""Naturalness as a listener would rate it, without a listener: Microsoft's DNSMOS (P.835 SIG/BAK/OVRL and P.808).

The ONNX models ship inside the `speechmos` wheel, so this runs offline. DNSMOS scores windows of 9.01 s of 16 kHz
audio; a clip's score is the mean over its windows of the P.835 polynomial fit (speechmos's fit, unchanged). Scores
are on the 1..5 MOS scale: clean read speech lands around 3-3.5 OVRL, noise and silence well below.

The windows are ours, not speechmos's: each clip is scored on the fewest windows that cover it (a clip of one window or
less repeated to fill exactly one; a longer one ceil(L / 9.01 s) windows spread evenly from its start to its end);
`rate_batch` rates many clips in one pass. speechmos instead doubles a short clip until it passes 9.01 s and hops by
1 s, so it pays int(L - 9.01) + 1 windows (a 6 s clip: 3; a 20 s clip: 11) for the same audio (5.4 times as many over
2-15 s clips). The numbers moved, with no direction: OVRL differs from speechmos's `run` by 0.035 on average and at most
0.14 on a real call cut into 30 overlapping 2-15 s clips, by 0.02 on average and at most 0.08 on the demo's clips
(`benchmarks/bench_batched_scorers.py`). Compare DNSMOS numbers only with numbers made by this module. `rate_batch` can
put many windows in one ONNX call (`windows_per_call`) with the same numbers; on a CPU that is not faster (the model's
work grows with the windows) and costs memory, so by default each call holds one window (MAX_BATCH_WINDOWS): the fewer
windows are the saving.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from higgs_pipeline.devices import math_threads

DNSMOS_RATE = 16_000  # the models' only input rate
WINDOW_SAMPLES = int(9.01 * DNSMOS_RATE)  # 144160: the primary model's fixed input, ['N', 144160]
# P.808 hears the window less its last 10 ms (speechmos's `audio_seg[:-160]`): its mel input is ['N', 900, 120].
_P808_TRIM = 160
# Windows per ONNX call by default. The primary model's activations take ~140 MiB of peak memory per window in a call
# (measured: 1 window +65 MiB over the loaded models, 8 windows +1.2 GiB, 32 windows +4.6 GiB; ingest's peak 1.4 GiB
# with 1, 2.0 GiB with 4) and on a CPU a batch is no faster per window than one window alone
# (benchmarks/bench_batched_scorers.py): one at a time keeps memory low, however long the clip or many the clips.
MAX_BATCH_WINDOWS = 1
# Below this many samples (10 ms) there is nothing to rate.
MIN_SAMPLES = 160
# Peak below this is silence (the manifest's `silent` rule, ScreeningRules.silence_dbfs): rated the scale's floor,
# 1, on every axis. The models rate digital silence about 1.8 OVRL, above ingest's 1.5 noise floor, and a
# collapsed model's silent take must not score better than its noise.
SILENCE_DBFS = -60.0
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Dnsmos:
    sig: float  # speech signal quality (P.835 SIG)
    bak: float  # background noise (P.835 BAK; higher = quieter background)
    ovrl: float  # overall quality (P.835 OVRL): the one number to compare
    p808: float  # P.808 overall MOS

    @classmethod
    def missing(cls) -> Dnsmos:
        return cls(math.nan, math.nan, math.nan, math.nan)


@cache
def _model() -> Any:
    """speechmos's DNSMOS, its two ONNX sessions on `math_threads()` threads: speechmos builds them with
    onnxruntime's defaults (a spinning thread per core, whatever else the process runs beside them)."""
    import onnxruntime as ort
    from speechmos import dnsmos

    folder = os.path.join(os.path.dirname(dnsmos.__file__), "dnsmos_models")
    primary, p808 = os.path.join(folder, "sig_bak_ovr.onnx"), os.path.join(folder, "model_v8.onnx")
    model = dnsmos.DNSMOS(primary, p808)
    options = ort.SessionOptions()
    options.intra_op_num_threads = math_threads()
    options.inter_op_num_threads = 1
    # The two sessions (speechmos is pinned in uv.lock), rebuilt with the options.
    model.onnx_sess = ort.InferenceSession(primary, options)
    model.p808_onnx_sess = ort.InferenceSession(p808, options)
    return model


def window_starts(samples: int) -> list[int]:
    """Start of each 9.01 s window scoring a clip of `samples` (after a short clip is repeated to one window): the
    fewest windows that cover it, the first at its start, the last ending at its end, the rest evenly between."""
    if samples <= WINDOW_SAMPLES:
        return [0]
    count = math.ceil(samples / WINDOW_SAMPLES)
    return np.linspace(0, samples - WINDOW_SAMPLES, count).round().astype(int).tolist()


def _windows(audio: np.ndarray) -> np.ndarray:
    """The clip's windows, (count, WINDOW_SAMPLES); a clip shorter than a window is repeated to fill exactly one."""
    if audio.size < WINDOW_SAMPLES:
        audio = np.resize(audio, WINDOW_SAMPLES)  # np.resize repeats the clip
    return np.stack([audio[start : start + WINDOW_SAMPLES] for start in window_starts(audio.size)])


def rate(audio16k: np.ndarray) -> Dnsmos:
    """DNSMOS of mono 16 kHz float audio; NaN scores for a clip too short or not finite to rate; 1 for silence."""
    return rate_batch([audio16k])[0]


def rate_batch(clips: Sequence[np.ndarray], windows_per_call: int = MAX_BATCH_WINDOWS) -> list[Dnsmos]:
    """`rate` of each clip, the windows of many clips scored together, `windows_per_call` per ONNX call."""
    ratings: list[Dnsmos | None] = [None] * len(clips)
    windows: list[np.ndarray] = []  # each rated clip's windows, in clip order
    owners: list[int] = []  # the clip each group of windows belongs to
    for index, clip in enumerate(clips):
        audio = np.asarray(clip, dtype=np.float32).ravel()
        if audio.size < MIN_SAMPLES or not np.isfinite(audio).all():
            ratings[index] = Dnsmos.missing()
            continue
        audio = np.clip(audio, -1.0, 1.0)
        if np.abs(audio).max() < 10 ** (SILENCE_DBFS / 20):
            ratings[index] = Dnsmos(1.0, 1.0, 1.0, 1.0)
            continue
        windows.append(_windows(audio))
        owners.append(index)
    if windows:
        counts = [len(group) for group in windows]
        scores = _score_windows(np.concatenate(windows), windows_per_call)
        for index, per_window in zip(owners, np.split(scores, np.cumsum(counts)[:-1]), strict=True):
            sig, bak, ovrl, p808 = per_window.mean(axis=0)
            ratings[index] = Dnsmos(sig=float(sig), bak=float(bak), ovrl=float(ovrl), p808=float(p808))
    return ratings  # type: ignore[return-value]  # every entry is set above


def _score_windows(windows: np.ndarray, windows_per_call: int) -> np.ndarray:
    """(count, 4): SIG, BAK, OVRL after speechmos's polynomial fit, and P.808, for each 9.01 s window."""
    model = _model()
    rows = []
    for first in range(0, len(windows), windows_per_call):
        batch = windows[first : first + windows_per_call]
        # speechmos's mel, one window at a time: its dB scale is relative to each window's own peak.
        mels = np.stack([model.audio_melspec(audio=window[:-_P808_TRIM]) for window in batch]).astype(np.float32)
        with _LOCK:  # one pair of ONNX sessions per process, shared by the threads that score
            raw = model.onnx_sess.run(None, {"input_1": batch})[0]
            p808 = model.p808_onnx_sess.run(None, {"input_1": mels})[0][:, 0]
        sig, bak, ovrl = model.get_polyfit_val(raw[:, 0], raw[:, 1], raw[:, 2], False)
        rows.append(np.stack([sig, bak, ovrl, p808], axis=1).astype(np.float64))
    return np.concatenate(rows)
