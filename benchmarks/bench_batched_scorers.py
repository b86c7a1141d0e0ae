"""DNSMOS and speaker embeddings batched against one clip at a time, and DNSMOS's window rule against speechmos's.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_batched_scorers.py [--rounds 2]

The clips: the real call (pyannote.audio's sample, see bench_real_call.py) and the demo conversation and monologue,
each cut into consecutive clips of 2-15 s, 75 s of audio in all. In one run, over the same clips:
- DNSMOS by speechmos's rule (its `DNSMOS.__call__`: a short clip doubled past 9.01 s, then 9.01 s windows every
  1 s), by our rule one clip at a time (`dnsmos.rate`), and by our rule batched (`dnsmos.rate_batch`, 8 windows
  per ONNX call);
- speaker embeddings of the diarizer's 1.5 s windows over those clips, one window at a time (a batch of one)
  and batched (`diarize.batch_embedder`);
- how far our OVRL is from speechmos's `run` (mean and max |diff|): on the real call cut into overlapping 2-15 s
  clips, on the demo recordings' clips, and on the demo speakers' clips.
Each timing is the fastest of `--rounds` rounds. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_real_call  # noqa: E402

from higgs_pipeline.data.audio_io import decode  # noqa: E402
from higgs_pipeline.paths import DEMO_DATA  # noqa: E402
from higgs_pipeline.speech import diarize, dnsmos  # noqa: E402
from higgs_pipeline.speech.scoring import to_model_audio  # noqa: E402

RATE = dnsmos.DNSMOS_RATE
CLIP_SECONDS = (2, 5, 9, 15, 3, 7, 12, 4)  # cycled: lengths on both sides of one 9.01 s window
BATCHED_WINDOWS = 8  # DNSMOS windows per ONNX call when batched (`rate_batch`'s default is one)


def cut(audio: np.ndarray) -> list[np.ndarray]:
    """Consecutive clips of CLIP_SECONDS (cycled; a length that no longer fits is passed over) from `audio`'s start."""
    clips, start, k, misses = [], 0, 0, 0
    while misses < len(CLIP_SECONDS):
        length = CLIP_SECONDS[k % len(CLIP_SECONDS)] * RATE
        k += 1
        if start + length > len(audio):
            misses += 1
            continue
        clips.append(audio[start : start + length])
        start, misses = start + length, 0
    return clips


def real_call() -> np.ndarray:
    call = bench_real_call.find_real_call()
    if call is None:
        raise SystemExit(f"the real call is missing: {bench_real_call.FETCH}")
    return to_model_audio(*decode(call.wav))


def overlapping_clips(audio: np.ndarray) -> list[np.ndarray]:
    """Clips of 2-15 s starting every 5 s: many more real-speech clips than the call's 30 s cut once."""
    return [
        audio[start : start + seconds * RATE]
        for seconds in (2, 4, 6, 9, 12, 15)
        for start in range(0, len(audio) - seconds * RATE + 1, 5 * RATE)
    ]


def demo_recordings() -> list[np.ndarray]:
    names = ("conversation.ogg", "monologue.mp3")
    return [to_model_audio(*decode(str(DEMO_DATA / "recordings" / name))) for name in names]


def demo_speaker_clips() -> list[np.ndarray]:
    return [to_model_audio(*decode(str(path))) for path in sorted((DEMO_DATA / "audio").glob("spk_*/*_00[1-6].*"))]


def fastest(function: Callable[[], object], rounds: int) -> tuple[float, object]:
    best, result = np.inf, None
    for _ in range(rounds):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def speechmos_rule(clips: list[np.ndarray]) -> list[dict]:
    """speechmos's own windows (`DNSMOS.__call__`), on our sessions so the threads match."""
    model = dnsmos._model()
    return [model(np.clip(clip, -1.0, 1.0), RATE, False) for clip in clips]


def ovrl_shift(clips: list[np.ndarray]) -> dict:
    """|our OVRL - speechmos.dnsmos.run's OVRL| over the clips (speechmos's `run`, its own sessions)."""
    from speechmos import dnsmos as speechmos

    ours = np.asarray([rating.ovrl for rating in dnsmos.rate_batch(clips)])
    theirs = np.asarray([float(speechmos.run(np.clip(clip, -1.0, 1.0), RATE)["ovrl_mos"]) for clip in clips])
    return {
        "clips": len(clips),
        "mean_abs_ovrl_diff": float(np.abs(ours - theirs).mean()),
        "max_abs_ovrl_diff": float(np.abs(ours - theirs).max()),
        "mean_signed_ovrl_diff": float((ours - theirs).mean()),
        "mean_ovrl_speechmos": float(theirs.mean()),
    }


def windows_of(clips: list[np.ndarray]) -> list[np.ndarray]:
    """The diarizer's speech windows (1.5 s every 0.75 s) over each clip, as ingest embeds them."""
    settings = diarize.DiarizeSettings()
    out = []
    for clip in clips:
        for start, end in diarize.speech_windows([(0.0, len(clip) / RATE)], settings):
            out.append(clip[int(start * RATE) : int(end * RATE)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    call = real_call()
    real = cut(call)
    clips = real + [clip for recording in demo_recordings() for clip in cut(recording)]
    seconds = sum(len(clip) for clip in clips) / RATE
    dnsmos.rate(clips[0])  # models loaded before any timing
    embed_many = diarize.batch_embedder()

    def embed_one(window: np.ndarray) -> np.ndarray:
        return embed_many([window])[0]

    windows = windows_of(clips)
    embed_one(windows[0])

    old_s, _ = fastest(lambda: speechmos_rule(clips), args.rounds)
    one_s, alone = fastest(lambda: [dnsmos.rate(clip) for clip in clips], args.rounds)
    batch_s, together = fastest(lambda: dnsmos.rate_batch(clips, windows_per_call=BATCHED_WINDOWS), args.rounds)
    embed_one_s, single = fastest(lambda: np.stack([embed_one(window) for window in windows]), args.rounds)
    embed_batch_s, batched = fastest(lambda: embed_many(windows), args.rounds)
    windows_count = {
        "speechmos_rule": sum(speechmos_windows(clip.size) for clip in clips),
        "ours": sum(len(dnsmos.window_starts(clip.size)) for clip in clips),
    }
    batched_diff = max(
        max(abs(a.sig - b.sig), abs(a.bak - b.bak), abs(a.ovrl - b.ovrl), abs(a.p808 - b.p808))
        for a, b in zip(alone, together, strict=True)
    )
    per_hour = 3600 / seconds
    result = {
        "clips": len(clips),
        "audio_s": round(seconds, 1),
        "dnsmos_windows": windows_count,
        "dnsmos_s": {"speechmos_rule": old_s, "ours_one_at_a_time": one_s, "ours_batched": batch_s},
        "dnsmos_speedup": {
            "ours_one_at_a_time": old_s / one_s,
            "ours_batched": old_s / batch_s,
            "batched_vs_one_at_a_time": one_s / batch_s,
        },
        "dnsmos_batched_max_diff": batched_diff,
        "embedding_windows": len(windows),
        "embeddings_s": {"one_at_a_time": embed_one_s, "batched": embed_batch_s},
        "embeddings_speedup": embed_one_s / embed_batch_s,
        "embeddings_max_diff": float(np.abs(single - batched).max()),
        "seconds_per_audio_hour": {
            "dnsmos_speechmos_rule": old_s * per_hour,
            "dnsmos_ours_one_at_a_time": one_s * per_hour,
            "dnsmos_ours_batched": batch_s * per_hour,
            "embeddings_one_at_a_time": embed_one_s * per_hour,
            "embeddings_batched": embed_batch_s * per_hour,
        },
        "ovrl_vs_speechmos_run": {
            "real_call": ovrl_shift(overlapping_clips(call)),
            "demo_recordings": ovrl_shift(clips[len(real) :]),
            "demo_speakers": ovrl_shift(demo_speaker_clips()),
        },
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
    }
    print(json.dumps(_rounded(result), indent=1), flush=True)
    return 0


def speechmos_windows(samples: int) -> int:
    """Windows speechmos scores for a clip: doubled until it reaches 9.01 s, then one every second."""
    while samples < dnsmos.WINDOW_SAMPLES:
        samples *= 2
    return int(np.floor(samples / RATE) - 9.01) + 1


def _rounded(value: object) -> object:
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rounded(item) for item in value]
    if isinstance(value, float) and abs(value) >= 1e-3:
        return round(value, 3)
    return value


if __name__ == "__main__":
    sys.exit(main())
