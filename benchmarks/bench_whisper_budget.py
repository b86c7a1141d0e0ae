"""Whisper's token budget (`speech.scoring.whisper_token_budget`) side by side with no budget, in one run: the
seconds each transcription takes and whether the transcript changes.

    .venv/bin/python benchmarks/bench_whisper_budget.py [--clips 8] [--asr-model tiny.en] [--device cpu]

Three kinds of audio: the demo corpus's speech (its transcripts must come out the same: the budget is there only
to end loops), a steady tone and white noise (what a collapsed model speaks: Whisper loops on them and retries
at every fallback temperature). Decoding settings are the pipeline's (`speech.scoring.whisper_decoding`); only
`max_new_tokens` differs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import command_line, machine, stamp  # noqa: E402
from bench_scoring import load_clips  # noqa: E402


def transcribe(model, audio16k: np.ndarray, budget: bool) -> tuple[str, float]:
    """The transcript and the seconds it took, with the pipeline's settings and its budget, or with the same
    settings and Whisper's own limit (faster-whisper's max_new_tokens None)."""
    from higgs_pipeline.speech.scoring import whisper_decoding

    options = whisper_decoding(audio16k) | ({} if budget else {"max_new_tokens": None})
    started = time.perf_counter()
    segments, _info = model.transcribe(audio16k, **options)
    text = " ".join(segment.text.strip() for segment in segments).strip()
    return text, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--asr-model", default="tiny.en")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from higgs_pipeline.speech.scoring import MODEL_RATE, load_whisper

    model = load_whisper(args.asr_model, args.device)
    rng = np.random.default_rng(0)
    seconds = np.arange(2 * MODEL_RATE) / MODEL_RATE
    audio = {f"speech_{i}": clip for i, (clip, _text) in enumerate(load_clips(args.clips))}
    audio["tone_2s"] = (0.3 * np.sin(2 * np.pi * 440 * seconds)).astype(np.float32)
    audio["noise_2s"] = (0.1 * rng.standard_normal(2 * MODEL_RATE)).astype(np.float32)
    transcribe(model, audio["speech_0"], budget=False)  # warm the model before any clock runs
    rows = []
    for name, clip in audio.items():
        free_text, free_s = transcribe(model, clip, budget=False)
        kept_text, kept_s = transcribe(model, clip, budget=True)
        rows.append(
            {
                "audio": name,
                "seconds_of_audio": round(len(clip) / MODEL_RATE, 2),
                "no_budget_s": round(free_s, 2),
                "budget_s": round(kept_s, 2),
                "speedup": round(free_s / kept_s, 2),
                "same_transcript": free_text == kept_text,
                "no_budget_text": free_text[:80],
                "budget_text": kept_text[:80],
            }
        )
    print(
        json.dumps(
            {
                "when": stamp(),
                "machine": machine(torch.device(args.device)),
                "command": command_line("benchmarks/bench_whisper_budget.py"),
                "asr_model": args.asr_model,
                "rows": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
