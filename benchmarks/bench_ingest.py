"""Throughput of each ingest stage and peak memory against recording length, on generated speech.

    python benchmarks/bench_ingest.py --minutes 1 3 --device cpu

Builds recordings of the given lengths by repeating the demo conversation (two voices, pauses, noise, tone), runs
each through `process_recording` in a fresh process (so peak memory is that recording's alone), and prints one JSON
line per recording: seconds per hour of audio for decode, VAD, ASR, speaker embeddings and DNSMOS (+ loudness and
writing), and the process's peak resident memory. `dnsmos_floor_per_audio_hour` is the least DNSMOS could cost with
its model on this machine, whatever the windows: the measured seconds per 9.01 s window times the recording's speech
seconds over 9.01 s (each second of speech scored once, nothing repeated). On a GPU node pass
`--device cuda --asr-model large-v3`.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from higgs_pipeline.paths import DEMO_DATA


def long_recording(path: Path, minutes: float) -> Path:
    """The demo conversation repeated to `minutes` of 16 kHz FLAC."""
    audio, rate = soundfile.read(str(DEMO_DATA / "recordings" / "conversation.ogg"), dtype="float32")
    repeats = int(np.ceil(minutes * 60 * rate / len(audio)))
    with soundfile.SoundFile(str(path), "w", rate, 1, format="FLAC") as out:  # written in pieces: flat memory here too
        for _ in range(repeats):
            out.write(audio)
    return path


def _timed(module, name: str, totals: dict[str, float]) -> None:
    function = getattr(module, name)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

    setattr(module, name, wrapper)


def _count_windows(dnsmos) -> list[int]:
    """A one-item list that counts the 9.01 s windows DNSMOS's model scores from now on."""
    count = [0]
    score = dnsmos._score_windows

    def counted(windows, windows_per_call):
        count[0] += len(windows)
        return score(windows, windows_per_call)

    dnsmos._score_windows = counted
    return count


def measure(path: Path, asr_model: str, device: str) -> dict:
    """Seconds spent per stage on one recording (models loaded beforehand, not counted)."""
    from higgs_pipeline.ingest import quality, recording, stages
    from higgs_pipeline.ingest.settings import IngestSettings
    from higgs_pipeline.speech import diarize, dnsmos, scoring

    settings = IngestSettings(asr_model=asr_model, device=device)
    scoring.load_whisper(asr_model, device)
    diarize.batch_embedder(settings.speaker_model, device)([np.zeros(16000, np.float32)])
    dnsmos.rate(np.full(16000, 0.1, np.float32))  # not silence: the ONNX sessions load
    windows = _count_windows(dnsmos)
    totals: dict[str, float] = {}
    for module, name in ((recording, "decode_open"), (stages, "find_speech"), (stages, "transcribe"),
                         (stages, "diarize_windows"), (quality.dnsmos, "rate_batch")):  # fmt: skip
        _timed(module, name, totals)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result = recording.process_recording(str(path), Path(out), settings)
    total = time.perf_counter() - started
    hours = result.duration_s / 3600
    names = {"decode_open": "decode", "find_speech": "vad", "transcribe": "asr", "diarize_windows": "embeddings",
             "rate_batch": "dnsmos"}  # fmt: skip
    per_hour = {names[k]: round(v / hours, 1) for k, v in totals.items()}
    per_hour["other"] = round((total - sum(totals.values())) / hours, 1)
    per_window = totals["rate_batch"] / max(windows[0], 1)
    # The least any choice of windows can cost with this model: every second of speech in exactly one window.
    floor = per_window * result.speech_seconds / (dnsmos.WINDOW_SAMPLES / dnsmos.DNSMOS_RATE) / hours
    return {
        "recording_minutes": round(result.duration_s / 60, 2),
        "status": result.status,
        "seconds_per_audio_hour": per_hour,
        "total_seconds_per_audio_hour": round(total / hours, 1),
        "dnsmos_windows": windows[0],
        "dnsmos_seconds_per_window": round(per_window, 3),
        "dnsmos_floor_per_audio_hour": round(floor, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # the child process: measure this file
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(args.one, args.asr_model, args.device)), flush=True)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        for minutes in args.minutes:
            path = long_recording(Path(scratch) / f"long-{minutes:g}.flac", minutes)
            child = [sys.executable, __file__, "--one", str(path)]
            subprocess.run([*child, "--asr-model", args.asr_model, "--device", args.device], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
