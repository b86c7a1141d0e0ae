"""Trainer start-up and memory against corpus size, on a synthetic corpus in the real formats.

    .venv/bin/python benchmarks/bench_corpus_scale.py --samples 1000000 [--json] [--nproc 2] [--no-lengths-table]

Builds, in a scratch folder: a token store (random codes [8, 25-150 frames] per clip, one clip per sample, in
shards with the Parquet index, through `TokenStore.writer`), a samples.jsonl of TTS samples (texts from 200
sentences), the lengths table `train_val_split` writes (`training/data.py::sample_lengths`' columns, the text
token counts from the demo text tokenizer) and a 95/5 split.json. Then launches the real trainer with torchrun
(demo model and profile, `--nproc` gloo ranks on the CPU) and stops it right after its first optimizer step.
Reports `startup_seconds` (the trainer's own number: rank 0's process start to the end of its first optimizer
step) and `peak_rss_mb` (the largest resident set of any process of the run: the biggest rank).
`--no-lengths-table` launches the trainer without `--lengths`: each rank then parses and tokenizes every sample
itself (what every rank did before the table), for a side-by-side ratio at a size where that finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message

from higgs_pipeline.data.hashing import digest
from higgs_pipeline.data.records import SampleRecord
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.data.token_store import TokenStore
from higgs_pipeline.models import loading
from higgs_pipeline.training.data import LENGTH_COLUMNS, length_parts

TOKENIZER_ID = "bench-random-codes"
CODEBOOKS = 8
SENTENCES = 200
STARTUP_LINE = re.compile(r"first optimizer step done ([0-9.]+) s after launch")


def sentences(rng: np.random.Generator) -> list[str]:
    words = "the a quiet river runs past old stone houses while children laugh and birds sing in morning light".split()
    return [" ".join(rng.choice(words, rng.integers(4, 30))).capitalize() + "." for _ in range(SENTENCES)]


def build_corpus(folder: Path, samples: int, seed: int = 0) -> dict[str, str]:
    """The four inputs of the trainer, as the data chain writes them; their paths."""
    rng = np.random.default_rng(seed)
    texts = sentences(rng)
    frames = rng.integers(25, 151, samples)
    clip_hashes = [digest("clip", str(i)) for i in range(samples)]
    store = TokenStore(str(folder / "tokens"), TOKENIZER_ID)
    chunk = 50_000
    with store.writer() as writer:
        for begin in range(0, samples, chunk):
            sizes = frames[begin : begin + chunk] * CODEBOOKS
            flat = rng.integers(0, 1024, int(sizes.sum()), dtype=np.int16)
            for i, (start, size) in enumerate(zip(np.cumsum(sizes) - sizes, sizes, strict=True)):
                writer.add(clip_hashes[begin + i], flat[start : start + size].reshape(CODEBOOKS, -1))

    text_tokenizer = loading.load_text_tokenizer(loading.DEMO)
    templates = [asdict(tts_sample(text, "audio.wav")) for text in texts]
    text_tokens = [
        length_parts(SampleRecord("t", "tts", "s", chatml, [{"clip_hash": "0" * 64}]), lambda _: 0, text_tokenizer)[0]
        for chatml in templates
    ]
    text_of = rng.integers(0, SENTENCES, samples)
    samples_path = folder / "samples.jsonl"
    offsets = np.zeros(samples, dtype=np.int64)
    position = 0
    with open(samples_path, "wb") as out:
        for i in range(samples):
            record = {
                "sample_id": f"tts-{i:08d}",
                "kind": "tts",
                "speaker": f"spk_{i % 97:02d}",
                "chatml": templates[text_of[i]],
                "audio": [{"clip_hash": clip_hashes[i], "audio_path": f"audio/{i:08d}.wav"}],
            }
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            offsets[i] = position
            position += out.write(line)
    ids = [f"tts-{i:08d}" for i in range(samples)]
    lengths = pd.DataFrame(
        {
            "sample_id": ids,
            "offset": offsets,
            "text_tokens": np.asarray(text_tokens, dtype=np.int64)[text_of],
            "audio_out_frames": frames.astype(np.int64),
            "audio_out_clips": np.ones(samples, dtype=np.int64),
            "audio_in_frames": np.zeros(samples, dtype=np.int64),
            "audio_in_clips": np.zeros(samples, dtype=np.int64),
        },
        columns=list(LENGTH_COLUMNS),
    )
    lengths_path = folder / "sample_lengths.parquet"
    write_parquet(lengths, str(lengths_path))
    split_path = folder / "split.json"
    split_path.write_text(json.dumps({"train": [s for i, s in enumerate(ids) if i % 20], "validation": ids[::20]}))
    return {
        "samples": str(samples_path),
        "split": str(split_path),
        "lengths": str(lengths_path),
        "token_store": str(folder / "tokens"),
    }


def tts_sample(text: str, audio_url: str) -> ChatMLSample:
    return ChatMLSample(
        messages=[
            Message("system", "Generate audio following instruction."),
            Message("user", text),
            Message("assistant", AudioContent(audio_url=audio_url)),
        ]
    )


def measure_startup(corpus: dict[str, str], run_dir: Path, nproc: int, use_lengths: bool) -> dict[str, float]:
    """The trainer to its first optimizer step (then stopped): its start-up seconds and the biggest process."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "higgs_pipeline.training.train",
        "--samples", corpus["samples"], "--split", corpus["split"],
        "--token-store", corpus["token_store"], "--tokenizer-id", TOKENIZER_ID,
        "--model", loading.DEMO, "--profile", "demo", "--output-dir", str(run_dir),
        "--set", "max_steps=2", "--set", "eval_every=1000", "--set", "checkpoint_every=1000",
        "--stop-after-step", "1",
    ]  # fmt: skip
    if use_lengths:
        command += ["--lengths", corpus["lengths"]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - started
    found = STARTUP_LINE.search(done.stdout + done.stderr)
    if found is None:
        sys.exit(f"the trainer never reached its first step (exit {done.returncode}):\n{done.stderr[-4000:]}")
    # Linux: the largest resident set of any waited-for descendant (torchrun waits for its ranks), in KiB.
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"startup_seconds": float(found.group(1)), "peak_rss_mb": peak_kib / 1024.0, "launch_wall_seconds": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, required=True, help="samples (and clips) in the synthetic corpus")
    parser.add_argument("--nproc", type=int, default=2, help="trainer ranks (gloo, CPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--no-lengths-table", action="store_true", help="ranks compute the lengths themselves")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    if args.samples < 40:
        sys.exit(f"--samples {args.samples}: need at least 40 (2 validation samples, a batch per rank)")
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        folder = Path(scratch)
        started = time.perf_counter()
        corpus = build_corpus(folder / "corpus", args.samples)
        built = time.perf_counter() - started
        result = measure_startup(corpus, folder / "run", args.nproc, not args.no_lengths_table)
    report = {
        "samples": args.samples,
        **result,
        "nproc": args.nproc,
        "lengths_table": not args.no_lengths_table,
        "corpus_build_seconds": built,
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
