"""Speaker counts found without being told, and speech the ASR model does not cover, on generated conversations:
espeak-ng voices taking turns (benchmarks/bench_speaker_count.py builds them and measures the same on real speech),
run through `prepare`'s own stages."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from audio_factory import require_tools
from conftest import REPO_ROOT

from higgs_pipeline.ingest.recording import process_recording
from higgs_pipeline.ingest.settings import IngestSettings


def _load(name: str):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize("voices", [2, 3, 4])
def test_the_speaker_count_is_found_without_being_given(tmp_path, voices):
    require_tools()
    bench = _load("bench_speaker_count")
    audio = tmp_path / "talk.wav"
    truth = bench.write_conversation(audio, bench.conversation(voices, 3))
    found = bench.score(truth, bench.diarized(audio, IngestSettings(), None))
    assert found["speakers"] == voices, found
    assert found["purity"] >= 0.9, found


def test_speech_in_a_language_the_model_does_not_cover_is_refused_not_transcribed(tmp_path):
    """German into the English-only tiny.en came out as English words at ~0.48 probability (over the clip floor);
    its decoding log-probability (-1.05 here; English -0.2 to -0.55) tells the language apart."""
    require_tools()
    audio = _load("bench_transcripts").german(tmp_path / "german.wav")
    result = process_recording(str(audio), tmp_path / "out", IngestSettings())
    assert (result.status, result.reason) == ("rejected", "unsupported_language"), result
    assert "tiny.en" in result.detail and "log-probability" in result.detail
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written for it
