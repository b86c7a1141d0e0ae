"""Training step time on CPU: the tiny DEMO model (random weights) under torchrun, 1 vs 2 gloo processes.

    .venv/bin/python benchmarks/bench_train_cpu.py [--steps 40] [--write-docs]

Runs the real entry point (`python -m torch.distributed.run ... -m higgs_pipeline.training.train`) on the test
fixture data (8 TTS + 1 voice-clone demo samples), once per setting, and reads the trainer's own
metrics.jsonl: step time and throughput come from the timed training steps only (validation and checkpoints
excluded), without the first logging interval (warm-up). Numbers describe the machinery's overhead on this
machine, not Higgs Audio training speed: the model is tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from _report import DOCS, REPO, command_line, machine, stamp

# The training tests' data builder (records JSONL + TokenStore + split.json from demo clips): one way to do it.
sys.path.insert(0, str(REPO / "tests"))
from training_fixtures import build_training_fixture  # noqa: E402

SECTION = "## Training (CPU)"
# (processes, per-device batch, CPU threads per process): 2 processes vs 1 with the same per-device batch and
# with the same global batch, and 1 process on both cores (the trainer's default for a single CPU process).
SETTINGS = [(1, 2, 1), (2, 2, 1), (1, 4, 1), (1, 2, 2)]
LOG_EVERY = 5
READING = (
    "Reading: rows 2 and 3 have the same global batch, so their samples/s ratio is what DDP over gloo gains on "
    "this machine; the last row is one process on both cores, which loses to thread oversubscription whenever "
    "other jobs share the cores (see the load average). The tiny model makes every number overhead-bound."
)


def run(data, out: Path, nproc: int, batch: int, threads: int, steps: int) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    command += ["-m", "higgs_pipeline.training.train", "--model", "demo", "--profile", "demo"]
    command += ["--samples", data.samples_path, "--split", data.split_path, "--token-store", data.token_store_root]
    command += ["--tokenizer-id", data.tokenizer, "--output-dir", str(out)]
    for setting in (
        f"max_steps={steps}",
        f"per_device_batch_size={batch}",
        f"log_every={LOG_EVERY}",
        f"cpu_threads={threads}",
    ):
        command += ["--set", setting]
    command += ["--set", f"eval_every={steps}", "--set", f"checkpoint_every={steps}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"training with {nproc} processes failed:\n{done.stderr[-4000:]}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "train_loss" in x][1:]  # drop the warm-up interval
    global_batch = nproc * batch
    step_seconds = [global_batch / x["samples_per_second"] for x in train]
    return {
        "processes": nproc,
        "threads": threads,
        "per_device_batch": batch,
        "global_batch": global_batch,
        "step_ms": 1000 * statistics.median(step_seconds),
        "samples_per_s": statistics.median(x["samples_per_second"] for x in train),
        "tokens_per_s": statistics.median(x["tokens_per_second"] for x in train),
        "padding_efficiency": statistics.mean(x["padding_efficiency"] for x in train),
    }


def table(rows: list[dict]) -> str:
    columns = ["processes", "threads each", "per-device batch", "global batch", "step (ms)", "samples/s", "tokens/s"]
    lines = ["| " + " | ".join([*columns, "padding eff."]) + " |", "|" + " --- |" * (len(columns) + 1)]
    for r in rows:
        cells = [r["processes"], r["threads"], r["per_device_batch"], r["global_batch"], f"{r['step_ms']:.1f}"]
        cells += [f"{r['samples_per_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['padding_efficiency']:.3f}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def write_section(markdown: str) -> None:
    """Replace this benchmark's section of docs/benchmarks.md (other sections belong to other benchmarks)."""
    path = DOCS
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + markdown
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + markdown.rstrip("\n") + ("\n\n" + text[end + 1 :] if end >= 0 else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="settings are run interleaved this many times")
    parser.add_argument("--write-docs", action="store_true", help="update the section in docs/benchmarks.md")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as scratch:
        data = build_training_fixture(Path(scratch) / "data")
        rounds = [
            [run(data, Path(scratch) / f"run{r}-{i}", *setting, args.steps) for i, setting in enumerate(SETTINGS)]
            for r in range(args.rounds)
        ]
    # Best round per setting: on a shared machine, the least disturbed measurement is the closest to the truth.
    rows = [min(results, key=lambda row: row["step_ms"]) for results in zip(*rounds, strict=True)]
    load_after = os.getloadavg()
    result = table(rows)
    print(result)
    if args.write_docs:
        write_section(
            f"{SECTION}\n\n"
            f"Tiny DEMO model (random weights), fp32, gloo, demo profile; {args.steps} steps per setting, median "
            f"over logging intervals of {LOG_EVERY} steps after the first, best of {args.rounds} interleaved rounds."
            f" Step time is the global batch over samples/s of timed training steps only.\n\n"
            f"- date: {stamp()}\n- machine: {machine(torch.device('cpu'))}\n"
            f"- load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f}\n"
            f"- command: `{command_line('benchmarks/bench_train_cpu.py')}`\n\n"
            f"{result}\n\n{READING}\n"
        )


if __name__ == "__main__":
    main()
