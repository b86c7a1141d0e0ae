"""Benchmark of the quality scorers on the demo clips: ASR and speaker-encoder throughput in audio seconds per
wall-clock second (above 1.0 = faster than real time), plus the one-off model load time.

    .venv/bin/python benchmarks/bench_scoring.py                          # embedded tiny.en + Resemblyzer, CPU
    .venv/bin/python benchmarks/bench_scoring.py --clips 12 --json
    python benchmarks/bench_scoring.py --asr-model large-v3 --speaker-model microsoft/wavlm-base-plus-sv \\
        --device cuda                                                      # a GPU node with those weights

Nothing is stubbed: the clips are the demo corpus's espeak-ng speech (data/demo), decoded as the pipeline decodes
them; decoding and resampling to 16 kHz happen before the clock starts, so the numbers are the models' own. The
ASR decodes with beam size 5, as `Scorer.transcribe` does for every score. The mean WER of the demo transcripts is
printed too, so a faster setting that hears worse is visible beside its speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, machine, stamp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "manifest.csv"


def load_clips(count: int) -> list[tuple[np.ndarray, str]]:
    """The first `count` demo clips as 16 kHz mono, with their transcripts."""
    from higgs_pipeline.data.audio_io import decode
    from higgs_pipeline.speech.scoring import to_model_audio

    with DEMO.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:count]
    return [(to_model_audio(*decode(str(DEMO.parent / row["audio_path"]))), row["text"]) for row in rows]


def timed(function, *args) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args)
    return time.perf_counter() - start, value


def run(args: argparse.Namespace) -> dict:
    import torch

    from higgs_pipeline.speech import scoring

    clips = load_clips(args.clips)
    audio_s = sum(len(wave) for wave, _ in clips) / scoring.MODEL_RATE
    scorer = scoring.Scorer(args.asr_model, args.speaker_model, args.device)
    load_s, _ = timed(scorer.load)
    rate = scoring.MODEL_RATE
    asr_s, hypotheses = timed(lambda: [scorer.transcribe(wave, rate) for wave, _ in clips])
    speaker_s, _ = timed(lambda: [scorer.embed(wave, rate) for wave, _ in clips])
    wers = [scoring.word_error_rate(text, hyp) for (_, text), hyp in zip(clips, hypotheses, strict=True)]
    return {
        "date": stamp(),
        "machine": machine(torch.device(scorer.device)),
        "command": command_line("benchmarks/bench_scoring.py"),
        "asr_model": args.asr_model,
        "speaker_model": args.speaker_model,
        "device": scorer.device,
        "clips": len(clips),
        "audio_seconds": round(audio_s, 2),
        "models_load_s": round(load_s, 2),
        "asr_audio_s_per_s": round(audio_s / asr_s, 2),
        "speaker_audio_s_per_s": round(audio_s / speaker_s, 2),
        "demo_wer_mean": round(float(np.mean(wers)), 3),
    }


def markdown(result: dict) -> str:
    return "\n".join(
        [
            f"### Quality scorers ({result['asr_model']} + {result['speaker_model']}, {result['device']}), "
            f"{result['date']}",
            f"- Machine: {result['machine']}",
            f"- Command: `{result['command']}`",
            f"- {result['clips']} demo clips, {result['audio_seconds']} s of audio",
            f"- ASR: {result['asr_audio_s_per_s']} audio s per s; mean WER on the demo {result['demo_wer_mean']}",
            f"- Speaker encoder: {result['speaker_audio_s_per_s']} audio s per s",
            f"- Loading both models, once per process: {result['models_load_s']} s",
        ]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--speaker-model", default="resemblyzer")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clips", type=int, default=48, help="how many demo clips (the demo has 48)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args()
    if args.clips < 1:
        parser.error(f"--clips {args.clips}: need at least 1")
    result = run(args)
    print(json.dumps(result) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
