"""Speaker counts found without being told, and speech the ASR model does not cover, on generated conversations:
espeak-ng voices taking turns (benchmarks/bench_speaker_count.py builds them and measures the same on real speech),
run through `prepare`'s own stages."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from audio_factory import require_tools
from conftest import REPO_ROOT
from recording_factory import write_recording

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


SHORT_TALKS = {
    "two turns": ((1, "Our neighbours have a very friendly dog."), (0, "My sister moved to a small town.")),
    "three turns": ((0, "Please pass the salt."), (1, "Here you are, it is right here."), (0, "Thank you very much.")),
}
SHORT_MONOLOGUES = {
    "one sentence": ((0, "The library closes early on Sundays."),),
    "two sentences": (
        (1, "The kettle is boiling, so I will make some tea."),
        (1, "The library closes early on Sundays."),
    ),
}


@pytest.mark.parametrize("name", [*SHORT_TALKS, *SHORT_MONOLOGUES])
def test_short_recordings_are_counted_right(tmp_path, name):
    """Two voices of 2-3 s each (4-7 windows) were counted as one: a graph of 6 windows keeping 6 neighbours each is
    complete. One voice stays one."""
    require_tools()
    parts = SHORT_TALKS.get(name) or SHORT_MONOLOGUES[name]
    write_recording(tmp_path / "short.wav", parts)
    windows = _load("bench_speaker_count").diarized(tmp_path / "short.wav", IngestSettings(), None)
    voices = {voice for voice, _text in parts}
    assert windows.local_speaker.nunique() == len(voices), windows
    labels = windows.local_speaker.to_numpy()
    if parts[0][0] != parts[-1][0]:  # the first and the last turn are different voices: so are their windows
        assert labels[0] != labels[-1], labels


def test_speech_in_a_language_the_model_does_not_cover_is_refused_not_transcribed(tmp_path):
    """German into the English-only tiny.en came out as English words at ~0.48 probability (over the clip floor);
    its decoding log-probability (-1.05 here; English -0.2 to -0.55) tells the language apart."""
    require_tools()
    audio = _load("bench_transcripts").german(tmp_path / "german.wav")
    result = process_recording(str(audio), tmp_path / "out", IngestSettings())
    assert (result.status, result.reason) == ("rejected", "unsupported_language"), result
    assert "tiny.en" in result.detail and "log-probability" in result.detail
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written for it
