"""The codec worker (tokenized_audio's heavy part, `python -m higgs_pipeline.workers.codec`) under torchrun with 1
and with N processes, back to back on the same clips: wall time of each whole job (process start, tokenizer load,
encoding, parts written), the speed-up, and a check that the merged codes are identical.

    .venv/bin/python benchmarks/bench_data_ranks.py --clips 200                 # this machine: 1 vs 2 processes, CPU
    python benchmarks/bench_data_ranks.py --clips 20000 --nproc 8 --pairing whole_machine \
        --tokenizer bosonai/higgs-audio-v2-tokenizer                           # a GPU node: 1 vs 8 GPUs

Two pairings, each 1 process against N: `whole_machine` lets every job use every core (on a CPU the one process
takes them all as torch threads, so N processes add no cores, only their start-up), `core_per_rank` gives a job of
N processes N cores, one per rank (the CPU's stand-in for a node, where each rank holds one GPU: the measure of
how the work divides).

The clips are generated: voice-like noise under a syllable envelope, 0.5-1 s, every one a different length (no two
share an encoder batch, the codec's worst case), at 16 kHz. The load average is printed before and after: on a
shared machine the ratio is only as good as the cores the two runs got.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile

from higgs_pipeline import devices
from higgs_pipeline.data.hashing import digest_of_lines, sha256_hex
from higgs_pipeline.data.tables import write_parquet
from higgs_pipeline.workers.codec import CODEC_MODULE
from higgs_pipeline.workers.shards import merge_parts

PAIRINGS = {"whole_machine": ("whole_machine",), "core_per_rank": ("core_per_rank",)}
PAIRINGS["both"] = PAIRINGS["whole_machine"] + PAIRINGS["core_per_rank"]


def make_clips(folder: Path, count: int, seed: int = 0) -> pd.DataFrame:
    """`count` WAV clips of distinct lengths and their clips table (clip_hash, audio_uri, duration_s)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rate, rows = 16000, []
    lengths = rng.choice(np.arange(rate // 2, rate), size=count, replace=False)
    for i, length in enumerate(lengths):
        t = np.arange(length) / rate
        envelope = 0.25 + 0.2 * np.sin(2 * np.pi * rng.uniform(2, 5) * t) ** 2
        wave = envelope * (0.6 * np.sin(2 * np.pi * rng.uniform(120, 300) * t) + 0.4 * rng.standard_normal(length))
        path = folder / f"clip_{i:05d}.wav"
        soundfile.write(path, wave.astype(np.float32), rate, subtype="PCM_16")
        rows.append((sha256_hex(path.read_bytes()), str(path), length / rate))
    return pd.DataFrame(rows, columns=["clip_hash", "audio_uri", "duration_s"])


def run_job(clips_path: Path, out: Path, nproc: int, tokenizer: str, cores: set[int] | None) -> float:
    """Wall seconds of the whole torchrun job; with `cores`, the job may run only on those (its ranks share them)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    command += ["-m", CODEC_MODULE, "--clips", str(clips_path), "--tokenizer", tokenizer, "--out", str(out)]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # the worker shares cores
    pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=pin)
    if result.returncode != 0:
        sys.exit(f"codec worker with {nproc} processes failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def fingerprint(table: pd.DataFrame) -> str:
    """One hash over every clip's codes in clip-hash order."""
    return digest_of_lines(f"{h}:{c.hex()}" for h, c in zip(table["clip_hash"], table["codes"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (one per GPU on a node)")
    parser.add_argument("--tokenizer", default="demo")
    parser.add_argument(
        "--pairing",
        choices=sorted(PAIRINGS),
        default="both",
        help="whole_machine: every job may use every core (one process takes them all as threads); core_per_rank: "
        "a job of N processes runs on N cores, one per rank, as each rank holds one GPU on a node",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-data-ranks-") as scratch:
        work = Path(scratch)
        clips = make_clips(work / "clips", args.clips)
        write_parquet(clips, str(work / "clips.parquet"))
        load_before = os.getloadavg()[0]
        seconds, prints = {}, {}
        for pairing in PAIRINGS[args.pairing]:
            for nproc in (1, args.nproc):
                out = work / f"out-{pairing}-{nproc}"
                cores = set(range(nproc)) if pairing == "core_per_rank" else None
                seconds[pairing, nproc] = run_job(work / "clips.parquet", out, nproc, args.tokenizer, cores)
                parts = [str(out / f"part-{rank}-of-{nproc}.parquet") for rank in range(nproc)]
                prints[pairing, nproc] = fingerprint(merge_parts(parts))
        load_after = os.getloadavg()[0]
    result: dict = {
        "clips": args.clips,
        "audio_seconds": round(float(clips["duration_s"].sum()), 1),
        "tokenizer": args.tokenizer,
    }
    for pairing in PAIRINGS[args.pairing]:
        result[pairing] = {
            "seconds_1": round(seconds[pairing, 1], 1),
            f"seconds_{args.nproc}": round(seconds[pairing, args.nproc], 1),
            "speedup": round(seconds[pairing, 1] / seconds[pairing, args.nproc], 2),
        }
    result |= {
        "codes_identical": len(set(prints.values())) == 1,
        "load_before": round(load_before, 2),
        "load_after": round(load_after, 2),
        "cores": devices.usable_cores(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>16}: {value}")
    if not result["codes_identical"]:
        sys.exit("the codes differ between the runs")


if __name__ == "__main__":
    main()
