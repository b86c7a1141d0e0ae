"""Batched scorers equal their one-at-a-time selves: DNSMOS over many clips' windows in one ONNX call, speaker
embeddings over many windows in one forward (Resemblyzer; WavLM for clips of one length); and DNSMOS's window rule."""

from __future__ import annotations

import numpy as np
import pytest
from voice_fixtures import write_tiny_wavlm

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.paths import DEMO_DATA
from higgs_pipeline.speech import diarize, dnsmos, scoring

RATE = dnsmos.DNSMOS_RATE


@pytest.fixture(scope="module")
def speech16k() -> np.ndarray:
    """About 40 s of the demo speakers' read speech, 16 kHz."""
    files = sorted((DEMO_DATA / "audio").glob("spk_*/*_00[1-4].*"))
    return np.concatenate([scoring.to_model_audio(*decode(str(path))) for path in files])


def test_each_clip_gets_the_fewest_windows_that_cover_it():
    window = dnsmos.WINDOW_SAMPLES
    counts = [len(dnsmos.window_starts(int(seconds * RATE))) for seconds in (3.0, 9.01, 20.0)]
    assert counts == [1, 1, 3]
    starts = dnsmos.window_starts(20 * RATE)
    assert starts[0] == 0 and starts[-1] + window == 20 * RATE  # from the clip's start to its end
    assert np.ptp(np.diff(starts)) <= 1  # evenly spread
    assert dnsmos._windows(np.ones(3 * RATE, dtype=np.float32)).shape == (1, window)  # repeated to exactly one


def test_rate_batch_equals_rate_of_each_clip(speech16k):
    clips = [
        speech16k[: 3 * RATE],
        speech16k[3 * RATE : 23 * RATE],  # three windows
        np.zeros(2 * RATE, dtype=np.float32),  # silence: the scale's floor
        speech16k[:100],  # too short to rate: NaN
    ]
    batched = dnsmos.rate_batch(clips, windows_per_call=8)  # every window in one ONNX call
    alone = [dnsmos.rate(clip) for clip in clips]  # a window per ONNX call
    assert batched[2] == dnsmos.Dnsmos(1.0, 1.0, 1.0, 1.0) and np.isnan(batched[3].ovrl)
    for together, single in zip(batched, alone, strict=True):
        assert np.allclose(
            [together.sig, together.bak, together.ovrl, together.p808],
            [single.sig, single.bak, single.ovrl, single.p808],
            atol=1e-6,
            equal_nan=True,
        )
    assert 2.0 < batched[1].ovrl < 4.5  # speech rated as speech, not as the silence floor


def _lengths_cut(audio: np.ndarray, seconds: list[float]) -> list[np.ndarray]:
    starts = np.cumsum([0] + [int(s * RATE) for s in seconds[:-1]])
    return [audio[start : start + int(s * RATE)] for start, s in zip(starts, seconds, strict=True)]


def test_batched_resemblyzer_equals_embed_utterance(speech16k):
    from resemblyzer import VoiceEncoder, preprocess_wav

    encoder = VoiceEncoder("cpu", verbose=False)
    clips = _lengths_cut(speech16k, [0.5, 1.5, 1.5, 3.0, 7.0]) + [np.zeros(RATE, dtype=np.float32)]

    def reference(audio16k: np.ndarray) -> np.ndarray:  # Resemblyzer's own path, one clip at a time
        trimmed = preprocess_wav(audio16k)
        return encoder.embed_utterance(trimmed if len(trimmed) >= RATE // 4 else audio16k)

    batched = diarize.batch_embedder("resemblyzer", "cpu")(clips)
    expected = np.stack([reference(clip) for clip in clips])
    assert batched.shape == expected.shape
    assert np.abs(batched - expected).max() < 1e-5
    assert float(batched[1] @ batched[3]) < 0.999  # different audio, different embeddings: the test can fail
    assert np.allclose(diarize.batch_embedder("resemblyzer", "cpu")([clips[3]])[0], batched[3], atol=1e-5)


def test_batched_wavlm_equals_one_at_a_time(tmp_path, speech16k):
    """A tiny random-weight WavLMForXVector (the code path, not its quality): clips of one length share a forward,
    a clip of another length runs alone, and every embedding equals the clip's own."""
    write_tiny_wavlm(tmp_path)
    clips = _lengths_cut(speech16k, [1.5, 1.5, 1.0, 1.5])
    batched = diarize.batch_embedder(str(tmp_path), "cpu")(clips)
    embed = diarize.batch_embedder(str(tmp_path), "cpu")
    alone = np.stack([embed([clip])[0] for clip in clips])
    assert batched.shape == (4, 24)
    assert np.abs(batched - alone).max() < 1e-5
