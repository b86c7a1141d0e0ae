"""A real two-speaker telephone call through `higgs-pipeline prepare`'s code: WER, label purity, speaker count.

    .venv/bin/python benchmarks/bench_real_call.py [--asr-model tiny.en] [--speaker-model resemblyzer]

The call is the 30 s sample that pyannote.audio ships in its wheel (`pyannote/audio/sample/`: sample.wav, a real
narrowband call between two women, with sample.rttm saying who speaks when and sample.stm the words). It is read
from the wheel file, never installed or committed: put the wheel in $HIGGS_PIPELINE_CACHE/real_call/ once with
`pip download --no-deps pyannote.audio==4.0.7 -d ~/.cache/higgs_pipeline/real_call` (an installed pyannote.audio
is found too). The call runs as shipped (16 kHz, nothing above 4 kHz: recorded through a phone line) and through a
harsher channel (sox: 300-3400 Hz, 8 kHz mu-law), each with `num_speakers=2` and with the count estimated.
Prints one JSON object per run.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile

SAMPLE_SHA256 = "c319b4abca767b124e41432d364fd7df006cb26bb79d09326c487d606a134e6e"  # same in pyannote.audio 3.3-4.0
SAMPLE_FILES = ("sample.wav", "sample.rttm", "sample.stm")
FETCH = "make test-deps (pip download --no-deps pyannote.audio==4.0.7 -d ~/.cache/higgs_pipeline/real_call)"
FRAME_S = 0.01  # purity is counted on 10 ms frames
NOISE_DBFS = -70.0


@dataclass(frozen=True)
class RealCall:
    wav: bytes
    turns: pd.DataFrame  # start_s, end_s, speaker (from the RTTM)
    transcript: str  # the STM's words in time order
    source: str


def cache_folder() -> Path:
    return Path(os.environ.get("HIGGS_PIPELINE_CACHE", Path.home() / ".cache" / "higgs_pipeline")) / "real_call"


def find_real_call() -> RealCall | None:
    """pyannote.audio's sample call from an installed pyannote.audio or a wheel in `cache_folder()`; None if neither."""
    spec = importlib.util.find_spec("pyannote.audio") if importlib.util.find_spec("pyannote") else None
    if spec and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "sample"
        if all((folder / name).is_file() for name in SAMPLE_FILES):
            return _real_call({name: (folder / name).read_bytes() for name in SAMPLE_FILES}, str(folder))
    for wheel in sorted(cache_folder().glob("pyannote_audio-*.whl"), reverse=True):
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            if all(f"pyannote/audio/sample/{name}" in names for name in SAMPLE_FILES):
                files = {name: archive.read(f"pyannote/audio/sample/{name}") for name in SAMPLE_FILES}
                return _real_call(files, str(wheel))
    return None


def _real_call(files: dict[str, bytes], source: str) -> RealCall:
    if hashlib.sha256(files["sample.wav"]).hexdigest() != SAMPLE_SHA256:
        raise ValueError(f"{source}: sample.wav is not the call these numbers were measured on (sha256 differs)")
    rows = [line.split() for line in files["sample.rttm"].decode().splitlines() if line.strip()]
    turns = pd.DataFrame(
        [(float(r[3]), float(r[3]) + float(r[4]), r[7]) for r in rows], columns=["start_s", "end_s", "speaker"]
    )
    stm = sorted(
        (float(parts[3]), " ".join(parts[5:]))
        for parts in (line.split() for line in files["sample.stm"].decode().splitlines())
        if parts
    )
    return RealCall(files["sample.wav"], turns, " ".join(text for _, text in stm), source)


def telephone_channel(source: Path, target: Path) -> Path:
    """A harsher phone line than the call's own: 300-3400 Hz, resampled to 8 kHz, mu-law (sox; -R: the same dither
    noise every run, since a fresh draw of it alone moves the labels)."""
    command = ["sox", "-R", str(source), "-r", "8000", "-e", "mu-law", str(target), "sinc", "300-3400"]
    subprocess.run(command, check=True)
    return target


def perturbed(source: Path, target: Path, seed: int) -> Path:
    """`source` plus white noise at -70 dBFS (37 dB under the call's speech; a quiet line): one draw of what a
    second recording of the same call would differ by."""
    audio, rate = soundfile.read(str(source), dtype="float64")
    noise = np.random.default_rng(seed).normal(0.0, 10 ** (NOISE_DBFS / 20), len(audio))
    soundfile.write(str(target), audio + noise, rate, subtype="FLOAT")
    return target


def label_purity(turns: pd.DataFrame, spans: pd.DataFrame) -> float:
    """Share of single-speaker reference seconds inside `spans` (start_s, end_s, local_speaker) whose label maps to
    the true speaker, under the label-to-speaker mapping that gets the most seconds right."""
    from scipy.optimize import linear_sum_assignment

    end = max(float(turns.end_s.max()), float(spans.end_s.max()) if len(spans) else 0.0)
    frames = (np.arange(int(np.ceil(end / FRAME_S))) + 0.5) * FRAME_S
    speakers = sorted(turns.speaker.unique())
    truth = np.zeros((len(speakers), len(frames)), dtype=bool)
    for start, stop, speaker in turns.itertuples(index=False):
        truth[speakers.index(speaker), (frames >= start) & (frames < stop)] = True
    single = truth.sum(axis=0) == 1  # overlapped speech has no one right label
    true_index = truth.argmax(axis=0)
    labels = np.full(len(frames), -1)
    for start, stop, label in spans[["start_s", "end_s", "local_speaker"]].itertuples(index=False):
        labels[(frames >= start) & (frames < stop)] = int(label)
    counted = single & (labels >= 0)
    if not counted.any():
        return float("nan")
    seconds = np.zeros((labels.max() + 1, len(speakers)))
    np.add.at(seconds, (labels[counted], true_index[counted]), FRAME_S)
    rows, columns = linear_sum_assignment(-seconds)
    return float(seconds[rows, columns].sum() / seconds.sum())


def window_spans(windows: pd.DataFrame) -> pd.DataFrame:
    """Windows overlap (1.5 s every 0.75 s): each moment takes the label of the window centred nearest to it."""
    windows = windows.sort_values("start_s")
    centers = ((windows.start_s + windows.end_s) / 2).to_numpy()
    middles = (centers[1:] + centers[:-1]) / 2
    start = np.maximum(windows.start_s.to_numpy(), np.concatenate([[-np.inf], middles]))
    end = np.minimum(windows.end_s.to_numpy(), np.concatenate([middles, [np.inf]]))
    spans = pd.DataFrame({"start_s": start, "end_s": end, "local_speaker": windows.local_speaker.to_numpy()})
    return spans[spans.end_s > spans.start_s]


def measure(call: RealCall, audio: Path, settings, num_speakers: int | None) -> dict:
    """One run of `process_recording` (the code of `higgs-pipeline prepare`) on `audio`, scored against the call."""
    from higgs_pipeline.ingest.recording import process_recording
    from higgs_pipeline.ingest.settings import RecordingOptions
    from higgs_pipeline.speech.scoring import word_error_rate

    with tempfile.TemporaryDirectory(prefix="real_call_") as out:
        started = time.perf_counter()
        result = process_recording(str(audio), Path(out), settings, RecordingOptions(num_speakers=num_speakers))
        seconds = time.perf_counter() - started
        if not result.folder:
            return {"status": result.status, "reason": result.reason, "detail": result.detail}
        folder = Path(out) / result.folder
        segments = pd.read_csv(folder / "segments.csv", keep_default_na=False).sort_values("start_s")
        words = pd.read_csv(folder / "words.csv", keep_default_na=False)
        windows = pd.read_csv(folder / "windows.csv")
    clips = segments[segments.reason == ""]
    return {
        "speakers": len(result.centroids),
        "speakers_in_clips": int(clips.local_speaker.nunique()),
        "wer_clips": round(word_error_rate(call.transcript, " ".join(clips.text)), 3),
        "wer_all_words": round(word_error_rate(call.transcript, " ".join(words.word)), 3),
        "purity_words": round(label_purity(call.turns, words), 3),
        "purity_windows": round(label_purity(call.turns, window_spans(windows)), 3),
        "purity_clips": round(label_purity(call.turns, clips), 3),
        "windows": len(windows),
        "speech_s": round(float(result.speech_seconds), 1),
        "clips": len(clips),
        "clip_seconds": round(float(clips.duration_s.sum()), 1),
        "rejected": segments[segments.reason != ""].reason.value_counts().to_dict(),
        "seconds": round(seconds, 1),
    }


def window_purity(call: RealCall, audio: Path, settings, num_speakers: int) -> float:
    """Label purity of the diarization stage alone (VAD, then speaker windows clustered: `prepare`'s own code)."""
    from higgs_pipeline.ingest import stages
    from higgs_pipeline.ingest.settings import RecordingOptions
    from higgs_pipeline.ingest.source import decode_recording, scratch_dir

    scratch = scratch_dir()
    try:
        decoded = decode_recording(str(audio), settings, scratch)
        regions = stages.find_speech(decoded.analysis, settings)
        options = RecordingOptions(num_speakers=num_speakers)
        windows, _ = stages.diarize_windows(decoded.analysis, regions, settings, options)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return label_purity(call.turns, window_spans(windows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--speaker-model", default="resemblyzer", help="resemblyzer or a WavLM x-vector name/folder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--draws", type=int, default=10, help="noise draws per channel for the diarization's spread")
    args = parser.parse_args()
    from higgs_pipeline.ingest.settings import IngestSettings

    call = find_real_call()
    if call is None:
        raise SystemExit(f"pyannote.audio's sample call not found: fetch its wheel once with `{FETCH}`")
    settings = IngestSettings(asr_model=args.asr_model, speaker_model=args.speaker_model, device=args.device)
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        shipped = scratch / "call.wav"
        shipped.write_bytes(call.wav)
        channels = {"as shipped": lambda audio: audio, "300-3400 Hz, 8 kHz mu-law": _phone(scratch)}
        for channel, line in channels.items():
            for num_speakers in (2, None):
                row = {"channel": channel, "num_speakers": num_speakers, "speaker_model": args.speaker_model}
                print(json.dumps(row | measure(call, line(shipped), settings, num_speakers)), flush=True)
        for channel, line in channels.items():
            purities = [
                window_purity(call, line(perturbed(shipped, scratch / f"draw{seed}.wav", seed)), settings, 2)
                for seed in range(args.draws)
            ]
            row = {"channel": channel, "num_speakers": 2, "speaker_model": args.speaker_model, "draws": args.draws}
            spread = {"min": min(purities), "median": float(np.median(purities)), "max": max(purities)}
            row |= {f"purity_windows_{key}": round(value, 3) for key, value in spread.items()}
            print(json.dumps(row | {"draws_at_least_0.8": sum(p >= 0.8 for p in purities)}), flush=True)


def _phone(scratch: Path):
    return lambda audio: telephone_channel(audio, scratch / f"{audio.stem}_8k.wav")


if __name__ == "__main__":
    main()
