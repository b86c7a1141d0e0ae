"""Real two-speaker telephone speech through `prepare`'s code: the 30 s call that pyannote.audio ships in
its wheel, with its reference turns and words. Neither the audio nor pyannote.audio is part of the project: the test
reads the wheel from the cache (benchmarks/bench_real_call.py says how to fetch it) and is skipped without it."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from conftest import REPO_ROOT

from higgs_pipeline.ingest.settings import IngestSettings

_spec = importlib.util.spec_from_file_location("bench_real_call", REPO_ROOT / "benchmarks" / "bench_real_call.py")
bench_real_call = sys.modules["bench_real_call"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench_real_call)
CALL = bench_real_call.find_real_call()

pytestmark = pytest.mark.skipif(
    CALL is None,
    reason=f"needs pyannote.audio's sample call (a real two-speaker phone call): {bench_real_call.FETCH}",
)


def test_a_real_phone_call_gives_exactly_two_speakers_with_pure_labels_and_its_words(tmp_path):
    """Measured 2026-12-03 (docs/benchmarks.md): 2 speakers, 94% of word seconds and 90% of window seconds under the
    right speaker, WER 0.14 of the accepted clips against the reference; the bounds leave room for Whisper's
    sampled fallback and the encoder's last bits."""
    audio = tmp_path / "call.wav"
    audio.write_bytes(CALL.wav)
    measured = bench_real_call.measure(CALL, audio, IngestSettings(), num_speakers=2)
    assert measured.get("speakers") == 2, measured
    assert measured["speakers_in_clips"] == 2, measured
    assert measured["purity_words"] >= 0.85, measured
    assert measured["purity_windows"] >= 0.8, measured
    assert measured["wer_clips"] <= 0.3, measured
