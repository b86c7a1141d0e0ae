"""Benchmark of batched Whisper decoding (`Scorer.listen_batch`) against one clip at a time (`Scorer.listen`), in
the same run on the same clips, and whether the transcripts are identical.

    .venv/bin/python benchmarks/bench_whisper_batch.py                        # 32 clips, batch sizes 8 and 16, CPU
    .venv/bin/python benchmarks/bench_whisper_batch.py --clips 64 --device cuda --asr-model large-v3 --json

The clips are espeak-ng sentences (tests/audio_factory.py) in four voices, padded with silence to 4 or 5 s: in a
corpus sorted by length (as transcript_check sorts it) neighbours share Whisper's token budget, so batches are
full; this puts the clips in that state. Each mode runs once after a warm-up clip (the model is loaded first).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_clips(count: int, folder: Path) -> list[tuple[np.ndarray, int, str | None]]:
    from audio_factory import SENTENCES, VOICES, speech

    from higgs_pipeline.data.audio_io import decode

    clips = []
    for index in range(count):
        path = speech(folder / f"c{index}.wav", SENTENCES[index % len(SENTENCES)], voice=index % len(VOICES))
        wave, rate = decode(str(path))
        seconds = 4 if index % 2 else 5
        clips.append((np.pad(wave, ((0, 0), (0, max(0, seconds * rate - wave.shape[1])))), rate, None))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from higgs_pipeline.speech.scoring import Scorer

    scorer = Scorer(args.asr_model, device=args.device)
    scorer._asr_model()  # loaded before timing
    with tempfile.TemporaryDirectory(prefix="bench-whisper-batch-") as temp:
        clips = make_clips(args.clips, Path(temp))
    scorer.listen(*clips[0])  # warm-up
    start = time.perf_counter()
    one = [scorer.listen(wave, rate, language) for wave, rate, language in clips]
    results = {"one_at_a_time_s": time.perf_counter() - start}
    for size in args.batch_sizes:
        start = time.perf_counter()
        batched = scorer.listen_batch(clips, batch_size=size)
        seconds = time.perf_counter() - start
        results[f"batch_{size}_s"] = seconds
        results[f"batch_{size}_speedup"] = results["one_at_a_time_s"] / seconds
        results[f"batch_{size}_identical"] = sum(a == b for a, b in zip(one, batched, strict=True))
    results.update(
        clips=len(clips),
        audio_s=float(sum(wave.shape[1] / rate for wave, rate, _ in clips)),
        device=args.device,
        asr_model=args.asr_model,
        machine=f"{platform.platform()}, {os.cpu_count()} cores",
    )
    if args.json:
        print(json.dumps(results))
        return
    print(f"{len(clips)} clips, {results['audio_s']:.0f} s of audio, {args.asr_model} on {args.device}")
    print(f"one at a time: {results['one_at_a_time_s']:.1f} s")
    for size in args.batch_sizes:
        print(
            f"batch {size}: {results[f'batch_{size}_s']:.1f} s, {results[f'batch_{size}_speedup']:.2f}x, "
            f"identical transcripts {results[f'batch_{size}_identical']}/{len(clips)}"
        )


if __name__ == "__main__":
    main()
