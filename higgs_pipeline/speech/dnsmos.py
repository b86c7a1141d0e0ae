"""Naturalness as a listener would rate it, without a listener: Microsoft's DNSMOS (P.835 SIG/BAK/OVRL and P.808).

The ONNX models ship inside the `speechmos` wheel, so this runs offline. DNSMOS scores 9.01 s windows of 16 kHz
audio, hopping by a second; a shorter clip is repeated to fill one window (speechmos's own rule). Scores are on the
1..5 MOS scale: clean read speech lands around 3-3.5 OVRL, noise and silence well below.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from higgs_pipeline.devices import math_threads

DNSMOS_RATE = 16_000  # the models' only input rate
# Below this many samples (10 ms) there is nothing to rate: speechmos would repeat the clip almost forever.
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
    # The two sessions its __call__ runs (speechmos is pinned in uv.lock), rebuilt with the options.
    model.onnx_sess = ort.InferenceSession(primary, options)
    model.p808_onnx_sess = ort.InferenceSession(p808, options)
    return model


def rate(audio16k: np.ndarray) -> Dnsmos:
    """DNSMOS of mono 16 kHz float audio; NaN scores for a clip too short or not finite to rate; 1 for silence."""
    audio = np.asarray(audio16k, dtype=np.float32).ravel()
    if audio.size < MIN_SAMPLES or not np.isfinite(audio).all():
        return Dnsmos.missing()
    audio = np.clip(audio, -1.0, 1.0)
    if np.abs(audio).max() < 10 ** (SILENCE_DBFS / 20):
        return Dnsmos(1.0, 1.0, 1.0, 1.0)
    with _LOCK:  # one ONNX session per process, shared by the threads that score
        scores = _model()(audio, DNSMOS_RATE, False)
    return Dnsmos(
        sig=float(scores["sig_mos"]),
        bak=float(scores["bak_mos"]),
        ovrl=float(scores["ovrl_mos"]),
        p808=float(scores["p808_mos"]),
    )
