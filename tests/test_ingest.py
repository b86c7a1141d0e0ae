"""Recordings in: the `prepare` command on generated speech (two espeak-ng voices, pauses, noise, a tone) and on
every kind of bad recording, run once per module; the assertions read that one output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from audio_factory import corrupt, empty, tone, truncated
from recording_factory import MONOLOGUE, TALK_A, TALK_B, write_lying_wav, write_recording

from higgs_pipeline.cli import main
from higgs_pipeline.data.manifest import read_manifest
from higgs_pipeline.data.screening import ScreeningRules, screen_manifest
from higgs_pipeline.ingest.recording import process_recording
from higgs_pipeline.ingest.settings import IngestSettings, RecordingOptions
from higgs_pipeline.speech.scoring import word_error_rate

GOOD = {"monologue.mp3": MONOLOGUE, "talk_a.wav": TALK_A, "talk_b.ogg": TALK_B}
BAD = {
    "zero.wav": "empty_audio",
    "corrupt.wav": "undecodable",
    "cut.flac": "truncated",
    "lying.wav": "truncated",
    "silence.wav": "silent",
    "tone.wav": "no_speech",
    "long.wav": "too_long",
    "escape.wav": "path_outside_folder",
    "pipe.wav": "not_a_regular_file",
}
MAX_RECORDING_S = 40.0


def _bad_recordings(folder: Path, outside: Path, good: Path) -> None:
    empty(folder / "zero.wav")
    corrupt(folder / "corrupt.wav")
    truncated(folder / "cut.flac", good, keep=0.4)
    write_lying_wav(folder / "lying.wav")
    tone(folder / "silence.wav", 3.0, gain_db=-90)
    tone(folder / "tone.wav", 4.0, gain_db=-10)
    tone(folder / "long.wav", MAX_RECORDING_S + 5, gain_db=-10)
    tone(outside / "elsewhere.wav", 3.0)
    (folder / "escape.wav").symlink_to(outside / "elsewhere.wav")
    os.mkfifo(folder / "pipe.wav")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ingest")
    folder, outside = root / "recordings", root / "outside"
    folder.mkdir()
    outside.mkdir()
    spoken = {name: write_recording(folder / name, parts) for name, parts in GOOD.items()}
    flac = folder / "source.flac"
    write_recording(flac, MONOLOGUE)
    _bad_recordings(folder, outside, flac)
    flac.unlink()
    out = root / "out"
    paths = [str(folder / name) for name in (*GOOD, *BAD)]
    args = ["prepare", *paths, "--out", str(out), "--json", "--device", "cpu"]
    code, printed = _run([*args, "--max-recording-seconds", str(MAX_RECORDING_S)])
    assert code == 0
    return {"folder": folder, "out": out, "spoken": spoken, "summary": json.loads(printed), "argv": args}


def _run(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(argv)
    return code, buffer.getvalue()


def _manifest(prepared) -> pd.DataFrame:
    return pd.read_csv(prepared["out"] / "manifest.csv", keep_default_na=False)


def test_summary_counts_every_recording(prepared):
    summary = prepared["summary"]
    assert summary["recordings"] == len(GOOD) + len(BAD)
    assert summary["recordings_rejected"] == len(BAD)
    assert summary["clips"] == len(_manifest(prepared)) >= 8
    assert summary["speakers"] == 2
    assert 20 < summary["speech_seconds"] < 60


def test_every_bad_recording_has_its_reason(prepared):
    rejected = pd.read_csv(prepared["out"] / "rejected_recordings.csv", keep_default_na=False)
    reasons = {Path(row.recording).name: row.reason for row in rejected.itertuples()}
    assert reasons == BAD
    assert (rejected["detail"] != "").all()
    assert not any(Path(name).name in BAD for name in _manifest(prepared)["source_recording"])


def test_transcripts_match_what_was_said(prepared):
    """Clips are decoded with the speech around them, so their text is as good as the same model over the whole
    file (each region decoded alone lost context: WER 0.32 against 0.07 on a two-voice conversation)."""
    from higgs_pipeline.data.audio_io import decode
    from higgs_pipeline.speech.scoring import to_model_audio
    from higgs_pipeline.speech.words import joined_text, transcribe_words

    manifest = _manifest(prepared)
    said_all, heard_all, whole_all = [], [], []
    for name, turns in prepared["spoken"].items():
        clips = manifest[manifest["source_recording"].str.endswith(name)].sort_values("start_s")
        said = " ".join(text for _voice, text in turns)
        heard = " ".join(clips["text"])
        assert word_error_rate(said, heard) < 0.15, (name, heard)
        whole = joined_text(transcribe_words(to_model_audio(*decode(str(prepared["folder"] / name)))))
        said_all, heard_all, whole_all = [*said_all, said], [*heard_all, heard], [*whole_all, whole]
    # Pooled over the recordings: one word of one 20-word recording is already 0.05.
    said, heard, whole = (" ".join(texts) for texts in (said_all, heard_all, whole_all))
    assert word_error_rate(said, heard) <= word_error_rate(said, whole) + 0.03, (heard, whole)


def test_voices_are_separated_and_the_same_across_recordings(prepared):
    manifest = _manifest(prepared)
    label_of_voice: dict[int, set[str]] = {0: set(), 1: set()}
    for name, turns in prepared["spoken"].items():
        clips = manifest[manifest["source_recording"].str.endswith(name)].sort_values("start_s")
        assert len(clips) == len(turns), (name, clips["text"].tolist())  # one clip per turn: a turn is a sentence
        for (voice, _text), speaker in zip(turns, clips["speaker"], strict=True):
            label_of_voice[voice].add(speaker)
    assert len(label_of_voice[0]) == 1 and len(label_of_voice[1]) == 1
    assert label_of_voice[0] != label_of_voice[1]


def test_clips_are_cut_between_words_within_limits_and_normalised(prepared):
    import pyloudnorm
    import soundfile

    manifest = _manifest(prepared)
    assert ((manifest["end_s"] - manifest["start_s"]).between(1.0, 20.0 + 0.3)).all()
    for row in manifest.itertuples():
        audio, rate = soundfile.read(prepared["out"] / row.audio_path)
        assert abs(len(audio) / rate - (row.end_s - row.start_s)) < 0.01
        assert abs(pyloudnorm.Meter(rate).integrated_loudness(audio) - (-20.0)) < 1.0
        assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-3
    assert {"dnsmos_ovrl", "asr_confidence", "words_per_second", "clipped_fraction", "speaker_purity"} <= set(manifest)


def test_every_segment_accounted_for(prepared):
    segments = pd.read_csv(prepared["out"] / "segments.csv", keep_default_na=False)
    accepted = segments[segments["reason"] == ""]
    assert len(accepted) == len(_manifest(prepared))
    assert set(segments["reason"]) <= {"", "too_short", "too_long", "mixed_speakers", "low_asr_confidence",
                                       "speaking_rate", "clipping", "low_quality"}  # fmt: skip
    words = sum(len(pd.read_csv(f)) for f in (prepared["out"] / "clips").glob("*/words.csv"))
    assert segments["words"].astype(int).sum() == words


def test_raw_audio_manifest_screening_accepts_the_output(prepared):
    manifest = read_manifest(str(prepared["out"] / "manifest.csv"))
    screening = screen_manifest(manifest, ScreeningRules())
    assert len(screening.rejected) == 0, screening.rejected[["reason", "detail"]].to_dict("records")
    assert len(screening.accepted) == len(_manifest(prepared))


def test_a_rerun_reuses_unchanged_recordings(prepared, monkeypatch):
    """An unchanged recording's result is found from its bytes' hash: nothing is decoded, computed or rewritten."""
    from higgs_pipeline.ingest import recording

    def decode_open(*_args, **_kwargs):
        raise AssertionError("a recording whose result is cached was decoded")

    monkeypatch.setattr(recording, "decode_open", decode_open)
    folders = sorted((prepared["out"] / "clips").iterdir())
    clips = sorted((prepared["out"] / "clips").rglob("*.flac"))
    stamps = [path.stat().st_mtime_ns for path in clips]
    good = [str(prepared["folder"] / name) for name in GOOD]
    code, printed = _run(["prepare", *good, "--out", str(prepared["out"]), "--json"])
    summary = json.loads(printed)
    assert code == 0 and summary["clips"] == prepared["summary"]["clips"] and summary["recordings_reused"] == 3
    assert sorted((prepared["out"] / "clips").iterdir()) == folders  # nothing computed again
    assert [path.stat().st_mtime_ns for path in clips] == stamps  # not rewritten


def test_nothing_usable_exits_2_and_leaves_no_output(prepared, tmp_path, capsys):
    out = tmp_path / "never"
    code = main(
        ["prepare", str(prepared["folder"] / "zero.wav"), str(prepared["folder"] / "tone.wav"), "--out", str(out)]
    )
    assert code == 2
    assert "zero.wav: empty_audio" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_usage_errors_are_one_line(prepared, tmp_path, capsys):
    talk = str(prepared["folder"] / "talk_a.wav")
    assert main(["prepare", talk, "--out", str(tmp_path / "x"), "--language", "de"]) == 2
    assert "does not cover language 'de'" in capsys.readouterr().err
    assert main(["prepare", talk, "--out", str(tmp_path / "x"), "--max-seconds", "45"]) == 2
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["prepare", talk, "--out", str(tmp_path / "busy")]) == 2
    assert "other files" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device", "tpu"], "device 'tpu': use auto, cpu, cuda or cuda:N"),
        (["--target-lufs", "nan"], "target_lufs nan: give a finite number"),
        (["--min-dnsmos", "nan"], "min_dnsmos nan: give a finite number"),
        (["--max-recording-seconds", "nan"], "max_recording_seconds nan: give a finite number"),
        (["--max-recording-seconds", "inf"], "max_recording_seconds inf: give a finite number"),
        (["--dialogue-turns", "-1"], "dialogue_turns -1: give 0 (no dialogues) or more"),
        (["--max-recording-bytes", "0"], "max_recording_bytes must be positive"),
        (["--asr-model", "tiny.enn"], "Invalid model size 'tiny.enn'"),
        (["--speaker-model", "/no/such/wavlm"], "a model cannot be loaded"),
        (["--speaker-model", "resemblizer"], "speaker model 'resemblizer': neither 'resemblyzer' (embedded)"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, capsys, flags, message):
    """Every flag is checked (NaN, infinity, negatives, unknown device, a model that cannot be loaded) before a
    recording is read: one line, exit 2, no output folder."""
    out = tmp_path / "out"
    assert main(["prepare", str(tmp_path / "never_read.wav"), "--out", str(out), *flags]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1, error
    assert not out.exists()


def test_prepare_flags_and_recording_clips_config_share_one_definition():
    """Each setting has one default and help for its flag and its config field: the tuned ones (ingest/settings.py's
    KNOBS), what is known of the recordings (OPTION_HELP), and the models and device (the `scorers` resource's)."""
    import argparse

    from higgs_pipeline.commands import prepare as prepare_command
    from higgs_pipeline.defs.recording_clips import RecordingClipsConfig
    from higgs_pipeline.defs.resources import QualityScorers
    from higgs_pipeline.ingest.settings import KNOBS, OPTION_HELP, knob_help

    parser = argparse.ArgumentParser()
    prepare_command.register(parser.add_subparsers())
    flags = {action.dest: action for action in parser._subparsers._group_actions[0].choices["prepare"]._actions}
    for knob in KNOBS:
        field = RecordingClipsConfig.model_fields[knob.name]
        assert flags[knob.name].default == field.default == getattr(IngestSettings(), knob.name), knob.name
        assert flags[knob.name].help == field.description == knob_help(knob), knob.name
    # What is known of the recordings: one help; unknown is a flag left out, or the field's empty default.
    for name, help_text in OPTION_HELP.items():
        field = RecordingClipsConfig.model_fields[name]
        assert flags[name].default is None and not field.default and field.description.startswith(help_text), name
        assert flags[name].help == help_text, name
    # The models and the device: the `scorers` resource's defaults and help, which recording_clips runs with.
    for name in ("asr_model", "speaker_model", "device"):
        field = QualityScorers.model_fields[name]
        assert flags[name].default == field.default, name
        assert flags[name].help.rstrip(".") in field.description, name


def test_speaker_count_is_honoured_or_refused(prepared, tmp_path):
    settings = IngestSettings()
    talk = str(prepared["folder"] / "talk_b.ogg")
    one = process_recording(talk, tmp_path, settings, RecordingOptions(num_speakers=1))
    assert one.status == "accepted" and len(one.centroids) == 1
    segments = pd.read_csv(tmp_path / one.folder / "segments.csv")
    assert set(segments["local_speaker"]) == {0}
    many = process_recording(talk, tmp_path, settings, RecordingOptions(num_speakers=9))
    assert (many.status, many.reason) == ("rejected", "too_many_speakers")
    german = process_recording(talk, tmp_path, settings, RecordingOptions(language="de"))
    assert (german.status, german.reason) == ("rejected", "unsupported_language")


MEMORY_PROBE = """
import resource, sys
from pathlib import Path
from higgs_pipeline.ingest.settings import IngestSettings
from higgs_pipeline.ingest.source import decode_recording
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = decode_recording(sys.argv[1], IngestSettings(), Path(sys.argv[2]))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(decoded.duration_s, decoded.analysis.frames, (after - before) / 1024)
"""


def test_decoding_streams_in_flat_memory(tmp_path):
    """6 minutes of 48 kHz stereo (132 MB as float32) decode with a peak growth of a few MB: it is never whole."""
    import subprocess
    import sys

    import soundfile

    path = tmp_path / "long.wav"
    rng = np.random.default_rng(0)
    block = (rng.standard_normal((48000 * 10, 2)) * 0.1).astype(np.float32)
    with soundfile.SoundFile(str(path), "w", 48000, 2, subtype="PCM_16") as out:
        for _ in range(36):
            out.write(block)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(path), str(scratch)], capture_output=True, text=True, check=True
    )
    duration, frames, growth_mib = (float(value) for value in done.stdout.split())
    assert duration == pytest.approx(360.0) and frames == pytest.approx(360 * 16000, abs=64)
    assert growth_mib < 60, f"peak memory grew {growth_mib:.0f} MiB while decoding"
