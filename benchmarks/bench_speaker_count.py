"""Speaker count and label purity of the diarization stage on recordings with a known number of voices.

    .venv/bin/python benchmarks/bench_speaker_count.py [--voices 2 3 4 6] [--method spectral]

Recordings: the real two-speaker phone call that pyannote.audio ships in its wheel (`bench_real_call.py` says
where it comes from), as shipped and through a harsher 8 kHz mu-law line, and espeak-ng conversations of 1, 2, 3, 4
and 6 voices (each voice a different espeak-ng voice, pitch and rate; turns in a fixed shuffled order, 0.6 s apart).
Each runs through `prepare`'s own stages (VAD, speaker windows, clustering) with the count estimated and with the
count given, and prints one JSON line: the count found and the label purity (share of single-speaker seconds whose
label maps to the true voice under the best mapping; `bench_real_call.label_purity`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile

RATE = 16_000
PAUSE_S = 0.6
# (espeak-ng voice, pitch 0-99, words per minute): as different from each other as espeak-ng's voices get
VOICES = (
    ("en-us+f3", 62, 150),
    ("en-gb", 38, 145),
    ("en-us+m7", 20, 165),
    ("en-gb-scotland+f4", 80, 140),
    ("en-029+m3", 50, 175),
    ("en-us+klatt", 45, 150),
)
SENTENCES = (
    "Good morning, did you sleep well last night?",
    "Not really, the wind kept me awake for hours.",
    "Shall we walk to the market after breakfast?",
    "Yes, we need bread and some fresh vegetables.",
    "The library closes early on Sundays.",
    "Then I will return my books on Saturday.",
    "Our neighbours have a very friendly dog.",
    "My sister moved to a small town by the sea.",
    "The train leaves every twenty minutes from the old station.",
    "We planted beans and carrots in the garden this spring.",
    "Please remember to lock the back door tonight.",
    "The meeting was moved to Thursday afternoon.",
)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


bench_real_call = sys.modules.get("bench_real_call") or _load(
    "bench_real_call", Path(__file__).with_name("bench_real_call.py")
)


def say(text: str, voice: int, scratch: Path) -> np.ndarray:
    """`text` in espeak-ng voice `voice` of VOICES, as 16 kHz mono float32."""
    name, pitch, speed = VOICES[voice]
    raw, resampled = scratch / "say.wav", scratch / "say16k.wav"
    subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", str(resampled)], check=True)
    audio, _ = soundfile.read(str(resampled), dtype="float32")
    return audio


def conversation(voices: int, turns_per_voice: int = 2, seed: int = 0) -> list[tuple[int, str]]:
    """(voice, sentence) turns: every voice `turns_per_voice` times, in a shuffled order with no voice twice running."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    pool = [voice for voice in range(voices) for _ in range(turns_per_voice)]
    while pool:
        allowed = [k for k, voice in enumerate(pool) if not order or voice != order[-1]] or list(range(len(pool)))
        order.append(pool.pop(int(rng.choice(allowed))))
    return [(voice, SENTENCES[k % len(SENTENCES)]) for k, voice in enumerate(order)]


def write_conversation(path: Path, turns: list[tuple[int, str]]) -> pd.DataFrame:
    """The turns spoken into `path` (16 kHz WAV); returns the truth: start_s, end_s, speaker per turn."""
    pieces, rows, t = [np.zeros(int(0.5 * RATE), np.float32)], [], 0.5
    with tempfile.TemporaryDirectory() as scratch:
        for voice, text in turns:
            audio = say(text, voice, Path(scratch))
            rows.append((t, t + len(audio) / RATE, f"voice{voice}"))
            pieces += [audio, np.zeros(int(PAUSE_S * RATE), np.float32)]
            t += len(audio) / RATE + PAUSE_S
    soundfile.write(str(path), np.concatenate(pieces), RATE, subtype="PCM_16")
    return pd.DataFrame(rows, columns=["start_s", "end_s", "speaker"])


def diarized(audio: Path, settings, num_speakers: int | None) -> pd.DataFrame:
    """Speaker windows of `audio` from `prepare`'s own stages (decode, VAD, windows, clustering)."""
    from higgs_pipeline.ingest import stages
    from higgs_pipeline.ingest.settings import RecordingOptions
    from higgs_pipeline.ingest.source import decode_recording, scratch_dir

    scratch = scratch_dir()
    try:
        decoded = decode_recording(str(audio), settings, scratch)
        regions = stages.find_speech(decoded.analysis, settings)
        windows, _ = stages.diarize_windows(
            decoded.analysis, regions, settings, RecordingOptions(num_speakers=num_speakers)
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return windows


def score(truth: pd.DataFrame, windows: pd.DataFrame) -> dict:
    """Count found and window label purity against the truth."""
    return {
        "speakers": int(windows.local_speaker.nunique()),
        "purity": round(bench_real_call.label_purity(truth, bench_real_call.window_spans(windows)), 3),
    }


def recordings(scratch: Path, voices: list[int]) -> dict[str, tuple[Path, pd.DataFrame]]:
    """name -> (audio, truth): the real call (where its wheel is found) and espeak-ng conversations."""
    out = {}
    call = bench_real_call.find_real_call()
    if call is not None:
        shipped = scratch / "call.wav"
        shipped.write_bytes(call.wav)
        out["real call (pyannote.audio sample), as shipped"] = (shipped, call.turns)
        harsh = bench_real_call.telephone_channel(shipped, scratch / "call_8k.wav")
        out["real call, 300-3400 Hz 8 kHz mu-law"] = (harsh, call.turns)
    for count in voices:
        path = scratch / f"voices{count}.wav"
        out[f"espeak-ng, {count} voices"] = (path, write_conversation(path, conversation(count, 3 if count > 1 else 6)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--voices", type=int, nargs="+", default=[1, 2, 3, 4, 6])
    parser.add_argument("--speaker-model", default="resemblyzer")
    args = parser.parse_args()
    from higgs_pipeline.ingest.settings import IngestSettings

    settings = IngestSettings(speaker_model=args.speaker_model)
    with tempfile.TemporaryDirectory() as scratch_name:
        for name, (audio, truth) in recordings(Path(scratch_name), args.voices).items():
            true_count = int(truth.speaker.nunique())
            row = {
                "recording": name,
                "true_speakers": true_count,
                "seconds": round(soundfile.info(str(audio)).duration),
            }
            started = time.perf_counter()
            estimated = score(truth, diarized(audio, settings, None))
            given = score(truth, diarized(audio, settings, true_count))
            row |= {"estimated": estimated, "count_given": given, "wall_s": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
