"""Each ingest stage on its own: the cut rules on hand-made word timings, clustering and cross-recording speaker
matching on hand-made embeddings, and the VAD on generated speech, tone and silence."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from higgs_pipeline.ingest.cut import cut
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.speech.diarize import DiarizeSettings, TooManySpeakersError, cluster, speech_windows
from higgs_pipeline.speech.words import Word

SETTINGS = IngestSettings(min_seconds=1.0, max_seconds=4.0)


def _words(spec: str, start: float = 0.0, length: float = 0.3, gap: float = 0.05) -> list[Word]:
    """Words of `spec` ("a b. c" ...), each `length` s, `gap` s apart; "|" between words is a 0.6 s pause."""
    words, t = [], start
    for token in spec.split():
        if token == "|":
            t += 0.6
            continue
        words.append(Word(t, t + length, " " + token, 0.9))
        t += length + gap
    return words


def test_clips_end_at_sentence_ends_and_cover_every_word_once():
    words = _words("one two three four. five six seven eight.")
    candidates = cut(words, [0] * len(words), SETTINGS)
    assert [(c.first, c.last) for c in candidates] == [(0, 3), (4, 7)]
    assert all(c.reason == "" for c in candidates)
    assert candidates[0].end_s <= candidates[1].start_s  # padding never reaches into the next word
    assert words[3].end <= candidates[0].end_s and candidates[1].start_s <= words[4].start


def test_a_speaker_change_always_cuts_even_mid_sentence():
    words = _words("one two three four five six seven eight")
    speakers = [0, 0, 0, 0, 1, 1, 1, 1]
    candidates = cut(words, speakers, SETTINGS)
    assert [(c.first, c.last, c.speaker) for c in candidates] == [(0, 3, 0), (4, 7, 1)]


def test_long_speech_is_cut_at_its_widest_pause_below_max_seconds():
    words = _words("a b c d e f g | h i j k l m n")  # 14 words, ~5.2 s, no sentence end
    candidates = cut(words, [0] * len(words), SETTINGS)
    assert all(c.end_s - c.start_s <= SETTINGS.max_seconds + 2 * SETTINGS.edge_pad_s for c in candidates)
    assert candidates[0].last == 6  # at the pause, not inside a word
    assert sum(c.last - c.first + 1 for c in candidates) == len(words)


def test_a_lone_short_sentence_is_rejected_too_short():
    words = _words("yes.", start=0.0) + _words("a b c d e f.", start=3.0)  # 2.6 s silence: a forced cut
    candidates = cut(words, [0] * len(words), SETTINGS)
    assert [c.reason for c in candidates] == ["too_short", ""]


def _two_voices(count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.eye(2, 32)
    points = np.concatenate([centres[0] + 0.05 * rng.standard_normal((count, 32)),
                             centres[1] + 0.05 * rng.standard_normal((count, 32))])  # fmt: skip
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def test_clustering_finds_two_voices_and_honours_a_given_count():
    embeddings = _two_voices(10)
    durations = np.full(20, 1.5)
    labels = cluster(embeddings, durations, DiarizeSettings())
    assert labels.tolist() == [0] * 10 + [1] * 10
    assert len(set(cluster(embeddings, durations, DiarizeSettings(), num_speakers=2).tolist())) == 2
    assert set(cluster(embeddings, durations, DiarizeSettings(), num_speakers=1).tolist()) == {0}
    with pytest.raises(TooManySpeakersError):
        cluster(embeddings, durations, DiarizeSettings(), num_speakers=25)  # more than the windows
    with pytest.raises(TooManySpeakersError, match="2 s or more"):
        cluster(embeddings, durations, DiarizeSettings(), num_speakers=8)  # splits voices into slivers


def _voices(count: int, windows: int, seed: int = 0) -> np.ndarray:
    """`windows` unit embeddings around each of `count` random directions, voice by voice, cosine ~0.7 to the centre."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((count, 64))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    noise = rng.standard_normal((count * windows, 64)) * 0.13
    points = np.repeat(centres, windows, axis=0) + noise
    return points / np.linalg.norm(points, axis=1, keepdims=True)


@pytest.mark.parametrize("voices", [1, 3, 4, 6])
def test_spectral_clustering_counts_voices_by_the_eigengap(voices):
    embeddings = _voices(voices, 12)
    labels = cluster(embeddings, np.full(len(embeddings), 1.5), DiarizeSettings())
    assert len(set(labels.tolist())) == voices
    assert all(len(set(labels[k * 12 : (k + 1) * 12].tolist())) == 1 for k in range(voices))  # each voice whole


def test_a_given_count_splits_by_the_same_spectral_embedding():
    embeddings = _voices(3, 12, seed=1)
    labels = cluster(embeddings, np.full(len(embeddings), 1.5), DiarizeSettings(), num_speakers=3)
    assert labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    again = cluster(embeddings, np.full(len(embeddings), 1.5), DiarizeSettings(), num_speakers=3)
    assert again.tolist() == labels.tolist()  # a fixed seed: the same labels every run


def test_asr_spans_hold_neighbouring_regions_up_to_one_whisper_window():
    from higgs_pipeline.ingest.stages import asr_spans

    regions = pd.DataFrame({"start_s": [0.0, 5.0, 12.0, 30.0, 61.0], "end_s": [4.0, 11.0, 25.0, 58.0, 63.0]})
    spans = asr_spans(regions, 28.0)
    assert spans == [[(0.0, 4.0), (5.0, 11.0), (12.0, 25.0)], [(30.0, 58.0)], [(61.0, 63.0)]]


def test_words_of_a_joined_span_land_at_their_time_in_the_recording():
    from higgs_pipeline.ingest import stages

    span, lengths = [(10.0, 12.0), (20.0, 21.0)], [2.0, 1.0]  # joined: 0-2 s, gap 2-2.3 s, 2.3-3.3 s
    found = [
        Word(0.5, 1.0, " a", 0.9),
        Word(1.9, 2.35, " b", 0.9),
        Word(2.05, 2.05, " c", 0.9),
        Word(2.2, 2.5, " d", 0.9),
        Word(2.5, 3.2, " e", 0.9),
    ]
    moved = stages._to_recording_time(found, span, lengths)
    # "b" is mostly in the first region, "d" in the second, "c" (in the gap) nearest the first: none spans the 8 s
    expected = [(10.5, 11.0), (11.9, 12.0), (12.0, 12.0), (20.0, 20.2), (20.2, 20.9)]
    assert [(w.start, w.end) for w in moved] == pytest.approx(expected)


def test_speech_windows_cover_each_region():
    windows = speech_windows([(0.0, 4.0), (5.0, 5.3), (6.0, 7.0)], DiarizeSettings())
    assert windows[0] == (0.0, 1.5) and windows[-2][1] == 4.0 and windows[-1] == (6.0, 7.0)
    assert all(not (5.0 <= start < 5.3) for start, _ in windows)  # a 0.3 s region is too short to embed


def test_vad_hears_speech_and_not_tone_or_silence(tmp_path):
    import soundfile
    from audio_factory import speech

    from higgs_pipeline.speech.vad import speech_regions

    audio, _ = soundfile.read(speech(tmp_path / "s.wav", "Please close the window before you leave."), dtype="float32")
    padded = np.concatenate([np.zeros(16000, np.float32), audio, np.zeros(16000, np.float32)])
    regions = speech_regions(padded)
    assert len(regions) >= 1 and regions[0][0] >= 0.7 and regions[-1][1] <= len(padded) / 16000 - 0.5
    t = np.arange(48000) / 16000
    assert speech_regions((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)) == []
    assert speech_regions(np.zeros(48000, np.float32)) == []


def test_limits_that_would_refuse_every_recording_are_refused_themselves():
    for bad in (0, -1):
        with pytest.raises(ValueError, match=f"max_recording_bytes must be positive, got {bad}"):
            IngestSettings(max_recording_bytes=bad)
    with pytest.raises(ValueError, match="max_recording_seconds must be positive"):
        IngestSettings(max_recording_seconds=0)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"min_asr_confidence": 1.2}, "min_asr_confidence 1.2: give a value from 0 to 1"),
        ({"min_speaker_purity": -0.1}, "min_speaker_purity -0.1: give a value from 0 to 1"),
        ({"max_clipped_fraction": 2.0}, "max_clipped_fraction 2: give a value from 0 to 1"),
        ({"speaker_match_threshold": 1.5}, "speaker_match_threshold 1.5: give a value from -1 to 1"),
        ({"edge_pad_s": -0.1}, "edge_pad_s -0.1: give a value from 0 to inf"),
        ({"min_asr_logprob": 0.5}, "min_asr_logprob 0.5: give a value from -inf to 0"),
        ({"target_lufs": 3.0}, "target_lufs 3: give a value from -70 to 0"),
        ({"min_words_per_second": 7.0}, "min_words_per_second must be below max_words_per_second"),
        ({"pause_s": 2.0}, "pause_s at most max_gap_s"),
    ],
)
def test_every_bounded_setting_is_refused_outside_its_range(fields, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        IngestSettings(**fields)


def test_words_and_clips_find_their_windows_by_sorted_search_as_all_pairs_would():
    """The sorted searches agree with comparing every word and clip with every window."""
    from higgs_pipeline.ingest.cut import Candidate
    from higgs_pipeline.ingest.quality import speaker_purity
    from higgs_pipeline.ingest.stages import speakers_of_words

    rng = np.random.default_rng(0)
    regions = [(0.0, 6.2), (7.0, 7.4), (8.0, 8.9), (12.0, 20.5)]
    windows = pd.DataFrame(speech_windows(regions, DiarizeSettings()), columns=["start_s", "end_s"])
    windows["local_speaker"] = rng.integers(0, 3, len(windows))
    starts, ends, labels = (windows[c].to_numpy() for c in ("start_s", "end_s", "local_speaker"))
    centers = (starts + ends) / 2
    for _ in range(200):
        a = float(rng.uniform(0, 22))
        word = Word(a, a + float(rng.choice([0.0, rng.uniform(0, 1)])), " x", 0.9)
        overlap = np.minimum(ends, word.end) - np.maximum(starts, word.start)
        middle = (word.start + word.end) / 2
        ties = np.flatnonzero(overlap >= overlap.max() - 1e-6) if overlap.max() > 0 else np.arange(len(starts))
        expected = labels[ties[np.argmin(np.abs(centers[ties] - middle))]]
        assert speakers_of_words([word], windows)[0] == expected
        clip = Candidate(0, 0, a, a + float(rng.uniform(0, 6)), int(rng.integers(0, 3)))
        inside = np.minimum(ends, clip.end_s) - np.maximum(starts, clip.start_s) >= 0.5 * (ends - starts)
        purity = float(np.mean(labels[inside] == clip.speaker)) if inside.any() else 1.0
        assert speaker_purity(clip, starts, ends, labels) == purity
