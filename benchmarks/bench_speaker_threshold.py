"""Calibrate the cosine above which two recordings' voices are one person (`ingest/registry.py` MATCH_THRESHOLDS).

What the registry compares is one voice's centroid in one recording against a registered voice's centroid, so the
pairs here are centroids of several seconds of speech: Resemblyzer's `embed_utterance` (the unit-norm mean of its
1.6 s partial embeddings, the same kind of mean the diarizer's windows make).
- espeak-ng: 8 voices x 3 "recordings" of different sentences; same-voice pairs are the same voice in two
  recordings, different-voice pairs are two voices.
- the real call (pyannote.audio's sample, see bench_real_call.py): each speaker's reference turns split into two
  halves (odd and even turns) and also through a harsher telephone channel; same-speaker pairs are halves and
  channels of one speaker, different-speaker pairs the two speakers.

Prints the cosine ranges and the equal-error threshold (false splits as often as false merges) of each set.
Run: `.venv/bin/python benchmarks/bench_speaker_threshold.py`
"""

from __future__ import annotations

import importlib.util
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile

HERE = Path(__file__).resolve().parent
RATE = 16_000
# (espeak voice, pitch, words per minute): the demo's two voices and six more
VOICES = (
    ("en-us+f3", 62, 150),
    ("en-gb", 38, 145),
    ("en-us", 50, 160),
    ("en-gb-scotland", 45, 150),
    ("en-us+m3", 30, 140),
    ("en-gb-x-rp+f2", 70, 155),
    ("en-029", 55, 150),
    ("en-us-nyc+m1", 40, 165),
)
SENTENCES = (
    ("The kettle is boiling, so I will make some tea.", "My sister moved to a small town by the sea."),
    ("The library closes early on Sundays.", "We planted beans and carrots in the garden this spring."),
    ("The train leaves every twenty minutes from the old station.", "Our neighbours have a very friendly dog."),
)


def say(text: str, voice: tuple[str, int, int], folder: Path) -> np.ndarray:
    name, pitch, speed = voice
    raw, resampled = folder / "say.wav", folder / "say16k.wav"
    subprocess.run(["espeak-ng", "-v", name, "-p", str(pitch), "-s", str(speed), "-w", str(raw), text], check=True)
    subprocess.run(["sox", str(raw), "-r", str(RATE), "-c", "1", str(resampled)], check=True)
    audio, _ = soundfile.read(str(resampled), dtype="float32")
    return audio


def pair_cosines(centroids: dict[tuple, np.ndarray]) -> tuple[list[float], list[float]]:
    """(same-speaker cosines, different-speaker cosines) over every pair of centroids keyed (speaker, take)."""
    same, different = [], []
    for (a, va), (b, vb) in itertools.combinations(centroids.items(), 2):
        (same if a[0] == b[0] else different).append(float(va @ vb))
    return same, different


def espeak_centroids(embed, folder: Path) -> dict[tuple, np.ndarray]:
    return {
        (v, take): embed(np.concatenate([say(text, voice, folder) for text in texts]))
        for v, voice in enumerate(VOICES)
        for take, texts in enumerate(SENTENCES)
    }


def real_call_centroids(embed, folder: Path) -> dict[tuple, np.ndarray] | None:
    spec = importlib.util.spec_from_file_location("bench_real_call", HERE / "bench_real_call.py")
    module = sys.modules["bench_real_call"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    call = module.find_real_call()
    if call is None:
        return None
    source = folder / "call.wav"
    source.write_bytes(call.wav)
    phone = module.telephone_channel(source, folder / "phone.wav")
    centroids = {}
    for channel, path in (("line", source), ("phone", phone)):
        audio, rate = soundfile.read(str(path), dtype="float32")
        if rate != RATE:
            subprocess.run(
                ["sox", str(path), "-r", str(RATE), "-e", "floating-point", str(folder / "r.wav")], check=True
            )
            audio, rate = soundfile.read(str(folder / "r.wav"), dtype="float32")
        for speaker, turns in call.turns.sort_values("start_s").groupby("speaker"):
            for half in (0, 1):
                spans = turns.iloc[half::2]
                bounds = zip(spans["start_s"], spans["end_s"], strict=True)
                pieces = [audio[int(s * rate) : int(e * rate)] for s, e in bounds]
                centroids[(speaker, f"{channel}{half}")] = embed(np.concatenate(pieces))
    return centroids


def equal_error(same: list[float], different: list[float]) -> tuple[float, float]:
    """(threshold, error rate) where false merges (different >= t) and false splits (same < t) are closest."""
    candidates = sorted(set(same) | set(different))
    rates = [(np.mean(np.array(same) < t), np.mean(np.array(different) >= t), t) for t in candidates]
    split, merge, threshold = min(rates, key=lambda r: (abs(r[0] - r[1]), r[0] + r[1]))
    return threshold, (split + merge) / 2


def describe(name: str, same: list[float], different: list[float]) -> None:
    from higgs_pipeline.ingest.registry import MATCH_THRESHOLDS

    threshold, rate = equal_error(same, different)
    chosen = MATCH_THRESHOLDS["resemblyzer"]
    merges, splits = sum(c >= chosen for c in different), sum(c < chosen for c in same)
    print(
        f"{name}: equal error rate {rate:.3f} at cosine {threshold:.3f}; at the registry's {chosen:.2f}: "
        f"false merges {merges}/{len(different)}, false splits {splits}/{len(same)}"
    )
    print(
        f"{name}: same-speaker pairs {len(same)} cosine {min(same):.3f}..{max(same):.3f} (mean {np.mean(same):.3f}); "
        f"different-speaker pairs {len(different)} cosine {min(different):.3f}..{max(different):.3f} "
        f"(mean {np.mean(different):.3f}); gap {min(same) - max(different):+.3f}"
    )


def pipeline_cosines(folder: Path) -> list[tuple[str, str, float]]:
    """The cosines the registry really compares: the demo recordings' centroids as `prepare` computes them (mean of
    1.5 s windows per diarized voice), every pair across the two recordings."""
    from higgs_pipeline.ingest.recording import process_recording
    from higgs_pipeline.ingest.settings import IngestSettings

    voices = []
    for name in ("monologue.mp3", "conversation.ogg"):
        source = HERE.parent / "data" / "demo" / "recordings" / name
        result = process_recording(str(source), folder / "clips", IngestSettings(), name=name)
        voices += [(f"{name}:{local}", np.asarray(c) / np.linalg.norm(c)) for local, c in enumerate(result.centroids)]
    return [(a, b, float(va @ vb)) for (a, va), (b, vb) in itertools.combinations(voices, 2) if a[:5] != b[:5]]


def main() -> None:
    from higgs_pipeline.speech.scoring import load_speaker

    model = load_speaker("resemblyzer", "cpu")

    def embed(audio: np.ndarray) -> np.ndarray:
        vector = np.asarray(model(audio), dtype=np.float64).ravel()
        return vector / np.linalg.norm(vector)

    with tempfile.TemporaryDirectory() as scratch:
        espeak = espeak_centroids(embed, Path(scratch))
        same, different = pair_cosines(espeak)
        describe("espeak-ng, 8 voices x 3 takes", same, different)
        call = real_call_centroids(embed, Path(scratch))
        print("pipeline centroids of the demo recordings (one voice in the monologue, two in the conversation):")
        for a, b, cosine in pipeline_cosines(Path(scratch)):
            print(f"  {a} / {b}: {cosine:.3f}")
    if call is None:
        print("real call not found: pyannote.audio's wheel is not in the cache (see bench_real_call.FETCH)")
        return
    call_same, call_different = pair_cosines(call)
    describe("real call, 2 speakers x (2 halves x 2 channels)", call_same, call_different)
    for channel in ("line", "phone"):
        one = {key: value for key, value in call.items() if key[1].startswith(channel)}
        describe(f"real call, {channel} only", *pair_cosines(one))
    describe("espeak-ng and the real call together", same + call_same, different + call_different)
    print("closest different-voice espeak pairs:")
    centroids = espeak
    ranked = sorted(
        (
            (float(va @ vb), VOICES[a[0]][0], VOICES[b[0]][0])
            for (a, va), (b, vb) in itertools.combinations(centroids.items(), 2)
            if a[0] != b[0]
        ),
        reverse=True,
    )
    for cosine, a, b in ranked[:4]:
        print(f"  {a} / {b}: {cosine:.3f}")


if __name__ == "__main__":
    main()
