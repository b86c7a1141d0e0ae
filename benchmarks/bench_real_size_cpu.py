"""The real-size path on a CPU, in bf16: one LoRA step of the 5.77B Higgs Audio v2 architecture (random bf16
weights, the `8xgpu` LoRA), the adapter saved as training saves it, then folded into the base in bf16 as
`export --dtype bfloat16` does; time and peak resident memory of each part.

Why: a user without a free GPU (or CI of a real-size change) must be able to take the real-size path at all; it
needs about 15 GiB of RAM. The step is bench_train_gpu.py's (the trainer's own pieces: HiggsTrainingModule,
objective.training_loss, AdamW, clipping), here with bf16 weights on the CPU and no autocast.

    .venv/bin/python benchmarks/bench_real_size_cpu.py [--checkpointing] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import _synthetic as synthetic  # benchmarks/ (this script's folder)
import torch
from bench_train_gpu import build, make_batches, model_config, train_step

from higgs_pipeline.training.config import profile


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpointing", action="store_true", help="decoder activation checkpointing")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    settings = profile("8xgpu")
    config = model_config("3b")
    specs = synthetic.sample_specs(1, config, settings.run.seed)
    codes = [synthetic.random_codes(s, config.audio_num_codebooks, config.audio_codebook_size, 0) for s in specs]
    (batch,) = make_batches(specs, codes, config, 1, settings)
    cpu = torch.device("cpu")
    result: dict[str, float] = {}

    started = time.perf_counter()
    bundle = build("3b", config, settings, cpu, args.checkpointing, False, dtype=torch.bfloat16)
    result["build_seconds"] = time.perf_counter() - started
    result["parameters_billion"] = sum(p.numel() for p in bundle.module.parameters()) / 1e9
    result["trainable_million"] = sum(p.numel() for p in bundle.trainable) / 1e6
    started = time.perf_counter()
    losses = train_step(bundle, batch.collated, cpu, settings)
    result["step_seconds"] = time.perf_counter() - started
    result["step_loss_finite"] = float(all(torch.isfinite(v).all() for v in losses.values() if torch.is_tensor(v)))
    result["peak_rss_gib_after_step"] = peak_rss_gib()
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        bundle.peft_model.save_pretrained(scratch)
        result["save_seconds"] = time.perf_counter() - started
        result["adapter_mb"] = sum(f.stat().st_size for f in Path(scratch).iterdir()) / 1e6
    del bundle.optimizer, bundle.trainable
    started = time.perf_counter()
    bundle.peft_model.merge_and_unload()
    result["merge_bf16_seconds"] = time.perf_counter() - started
    result["peak_rss_gib"] = peak_rss_gib()
    rounded = {k: round(v, 2) for k, v in result.items()}
    print(json.dumps(rounded) if args.json else "\n".join(f"{k}: {v}" for k, v in rounded.items()))


if __name__ == "__main__":
    main()
