"""Synthesis speed: real-time factor (generation wall time / seconds of audio) of `higgs-pipeline synthesize`.

    .venv/bin/python benchmarks/bench_synthesis.py [--part cpu|gpu] [--repeats 2] [--write-docs]

CPU part: the tiny DEMO model (random weights) with a LoRA adapter merged in, through the same library call the
command makes (`higgs_pipeline.synthesis.synthesize`): one sentence, a three-chunk text (each chunk hears the
previous one), and a voice-clone call. The random model never ends its audio, so every chunk runs to
--max-new-tokens: the audio length is fixed by the token budget and the factor measures the machinery.
GPU part: the real model when the node has it (`--model bosonai/higgs-audio-v2-generation-3B-base
--audio-tokenizer bosonai/higgs-audio-v2-tokenizer`), else the 3B layout with random weights that
smoke_8xgpu.py builds; with --adapter none (a merged adapter has the base's shapes, so the same speed).
"Generation" excludes merging and loading (reported apart as set-up); a factor below 1 is faster than real time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import DOCS, REPO, append_entry, command_line, machine, stamp

sys.path.insert(0, str(REPO / "tests"))
from voice_fixtures import make_adapter  # noqa: E402

from higgs_pipeline.models.demo import DEMO_NOTE  # noqa: E402
from higgs_pipeline.paths import DEMO_DATA  # noqa: E402
from higgs_pipeline.serving.synthesis import synthesize  # noqa: E402

SECTION = "## Synthesis real-time factor"
INTRO = (
    "`benchmarks/bench_synthesis.py`: generation wall time / seconds of audio produced by `higgs-pipeline "
    "synthesize` (merge and model loading excluded, reported as set-up). Below 1 is faster than real time."
)
SENTENCE = "Hello, this is a short test of the trained voice."
LONG = (
    "The quick brown fox jumps over the lazy dog near the quiet river bank today. "
    "Then it runs back home across the wide green field before the sun goes down. "
    "At night it sleeps in a warm dry den under the roots of an old tree. "
    "In the morning it wakes up early and goes out to look for something to eat."
)
REFERENCE = DEMO_DATA / "audio" / "spk_a" / "a_001.wav"
REFERENCE_TEXT = "A reference clip of the first demo speaker."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="runs per case; the median is reported")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="audio frames per chunk (25 per second)")
    parser.add_argument("--model", default=None, help="GPU part: the base model (default: the 3B random layout)")
    parser.add_argument("--audio-tokenizer", default="demo", help="GPU part: the audio tokenizer")
    parser.add_argument("--write-docs", action="store_true", help="append a dated entry to docs/benchmarks.md")
    return parser.parse_args(argv)


def cases(adapter: str, model: str | None) -> list[dict]:
    common = {"adapter": adapter, "model": model}
    clone = {"reference_audio": str(REFERENCE), "reference_text": REFERENCE_TEXT}
    return [
        {"name": "one sentence", "text": SENTENCE, **common},
        {"name": "4 sentences, 2 chunks", "text": LONG, **common},
        {"name": "voice clone, one sentence", "text": SENTENCE, **common, **clone},
    ]


def measure(case: dict, args: argparse.Namespace, device: str, scratch: Path, audio_tokenizer: str | None) -> dict:
    runs = []
    for repeat in range(args.repeats):
        options = {k: v for k, v in case.items() if k not in ("name", "text")}
        started = time.perf_counter()
        result = synthesize(
            case["text"],
            str(scratch / f"{repeat}.wav"),
            artifacts_root=str(scratch / "no-artifacts"),
            audio_tokenizer=audio_tokenizer,
            max_new_tokens=args.max_new_tokens,
            device=device,
            seed=repeat,
            overwrite=True,
            **options,
        )
        total = time.perf_counter() - started
        runs.append((result, total))
    factors = [result.real_time_factor for result, _ in runs]
    result, total = runs[factors.index(statistics.median_low(factors))]
    return {
        "case": case["name"],
        "chunks": result.chunks,
        "audio_s": result.duration_s,
        "generation_s": result.generation_s,
        "rtf": statistics.median(factors),
        "rtf_all": factors,
        "setup_s": total - result.generation_s,
        "demo": result.demo_model,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| case | chunks | audio s | generation s | real-time factor (median) | all runs | set-up s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        runs = ", ".join(f"{factor:.2f}" for factor in row["rtf_all"])
        lines.append(
            f"| {row['case']} | {row['chunks']} | {row['audio_s']:.2f} | {row['generation_s']:.2f} | "
            f"**{row['rtf']:.2f}** | {runs} | {row['setup_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if args.part == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("GPU part SKIPPED: needs a CUDA GPU; no result", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench_synthesis_") as scratch:
        if args.part == "cpu":
            adapter, model, audio_tokenizer = str(make_adapter(Path(scratch) / "adapter")), None, None
        else:
            adapter, audio_tokenizer = "none", args.audio_tokenizer
            model = args.model or str(_real_size_layout())
        rows = [measure(case, args, device, Path(scratch), audio_tokenizer) for case in cases(adapter, model)]
    load = open("/proc/loadavg").read().split()[0] if Path("/proc/loadavg").exists() else "unknown"
    body = table(rows)
    note = f"Model: {DEMO_NOTE} (its audio is noise; speed only)." if rows[0]["demo"] else f"Model: {model}."
    entry = (
        f"### {stamp()}: {args.part.upper()}, max_new_tokens {args.max_new_tokens}\n\n"
        f"- machine: {machine(torch.device(device))}; load average {load} at the end (shared machine)\n"
        f"- command: `{command_line('benchmarks/bench_synthesis.py')}`\n\n{body}\n\n{note}\n"
    )
    print(entry)
    if args.write_docs:
        append_entry(SECTION, INTRO, entry)
        print(f"appended to {DOCS}")
    return 0


def _real_size_layout() -> Path:
    from smoke_8xgpu import real_size_checkpoint

    return real_size_checkpoint()


if __name__ == "__main__":
    sys.exit(main())
