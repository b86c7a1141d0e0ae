"""Smoke test of the `8xgpu` training profile: the real `lora_adapter` asset on every GPU of this node.

Why: the profile's own settings (2 samples per device x 8 accumulation steps, bf16 autocast over a frozen bf16
base, nccl, 4 DataLoader workers, pinned memory, persistent workers, fused AdamW) run only on GPUs, so the CPU
test suite never exercises them together. This materializes the chain raw_audio_manifest -> ... ->
lora_adapter in-process with Dagster, exactly as a user's run would (the asset launches torchrun through Pipes),
on the demo speech in data/ and a checkpoint with the 3B model's exact shapes and random weights: the
released checkpoint cannot be downloaded where this project is built. The text tokenizer is the demo's (the
checkpoint's special-token ids point into it; its 128,256-row embedding and text head keep the real shapes) and
the audio codes come from the demo audio tokenizer (the same 8 x 1024 codebook layout). Nothing it prints
is a quality number: the weights are random.

On a GPU node (through the device tool), from the repository root:

    python benchmarks/smoke_8xgpu.py --write-docs [--steps 4] [--nproc 8]

On CPU, the same asset and profile with only device/backend/precision switched (cpu, gloo, fp32), on the tiny
DEMO model and 2 processes: a check of the plumbing, not of the GPU settings:

    .venv/bin/python benchmarks/smoke_8xgpu.py --cpu-dry-run

It passes when the run ends with every step trained, finite losses, the world size and effective batch the
profile promises, and a published adapter; it exits 1 (and says why) otherwise. The 3B checkpoint is built once
into $HIGGS_PIPELINE_CACHE/smoke/ (about 11.5 GB of disk) and data artifacts are kept there too, so a re-run
goes straight to training. Every rank loads the base model on the host before moving it to its GPU: 8 ranks need
about 8 x 11.5 GB of host memory at once.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import dagster as dg
import torch
from _report import NO_GPU, command_line, machine, stamp
from _report import append_entry as append_to_docs

from higgs_pipeline.defs.chatml_samples import chatml_samples
from higgs_pipeline.defs.lora_adapter import lora_adapter
from higgs_pipeline.defs.raw_audio_manifest import raw_audio_manifest
from higgs_pipeline.defs.resources import ArtifactStore, HiggsCheckpoints
from higgs_pipeline.defs.tokenized_audio import tokenized_audio
from higgs_pipeline.defs.train_val_split import train_val_split
from higgs_pipeline.evaluation.plots import read_metrics
from higgs_pipeline.models import demo, loading
from higgs_pipeline.training.config import profile

SECTION = "## 8xgpu profile smoke test"
SECTION_INTRO = (
    "`benchmarks/smoke_8xgpu.py`: the `lora_adapter` asset with the `8xgpu` profile on every GPU of one node, "
    "materialized with the data chain on the demo speech, on a checkpoint with the 3B model's shapes and random "
    "weights (DEMO: no quality claim). It checks that the profile runs end to end and records its step time, "
    "throughput and memory."
)
LAYOUT_3B = "higgs_audio_v2_3b_layout.json"
CPU_SWITCHES = ["run.device=cpu", "run.backend=gloo", "run.precision=fp32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps, 2 or more (step 1 is warm-up)")
    parser.add_argument("--nproc", type=int, default=0, help="processes (default: every visible GPU; 2 on CPU)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="tiny DEMO model, cpu/gloo/fp32, 2 processes")
    parser.add_argument("--write-docs", action="store_true", help="append a dated entry to docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.nproc < 0:
        parser.error(f"--steps must be >= 2 and --nproc >= 0 (got {args.steps}, {args.nproc})")
    if not args.cpu_dry_run and torch.cuda.is_available() and args.nproc > torch.cuda.device_count():
        parser.error(f"--nproc {args.nproc}: this node has {torch.cuda.device_count()} GPUs")
    return args


def smoke_root() -> Path:
    root = demo.cache_root() / "smoke"
    root.mkdir(parents=True, exist_ok=True)
    return root


def real_size_checkpoint() -> Path:
    """The 3B layout with random bf16 weights and the demo text tokenizer, built once on the GPU (named after
    what it is built from, so a changed layout or builder is never served from an old build)."""
    target = smoke_root() / f"higgs-audio-v2-3b-layout-random-{demo.layout_digest(LAYOUT_3B)}"
    if not target.exists():
        for stale in smoke_root().glob("higgs-audio-v2-3b-layout-random-*"):
            shutil.rmtree(stale, ignore_errors=True)  # older builds and staging folders of crashed ones: 11 GB each
        print(f"building the 3B-layout checkpoint (random weights) into {target} ...", flush=True)
        demo.build_random_checkpoint(
            target,
            LAYOUT_3B,
            demo.build_text_tokenizer(),
            what="HiggsAudioModel with the 3B checkpoint's shapes, random weights (smoke test)",
            keep_vocab_size=True,
            device="cuda",
            dtype=torch.bfloat16,
        )
    return target


def lora_adapter_config(nproc: int, steps: int, cpu: bool) -> dict:
    """lora_adapter's run config: the 8xgpu profile, shortened to `steps` (validated and saved at the last)."""
    overrides = [f"run.eval_every={steps}", f"run.checkpoint_every={steps}", "run.log_every=1", "warmup_steps=1"]
    if cpu:
        overrides += CPU_SWITCHES
    return {"profile": "8xgpu", "nproc_per_node": nproc, "max_steps": steps, "overrides": overrides}


def materialize(model: str, config: dict) -> tuple[dict, dict[str, float]]:
    """The data chain + lora_adapter in one in-process run; (lora_adapter's metadata, its step's event times)."""
    run_config = {"ops": {"lora_adapter": {"config": config}}}
    resources = {
        "artifacts": ArtifactStore(root=str(smoke_root() / "artifacts")),
        "checkpoints": HiggsCheckpoints(model=model, audio_tokenizer=loading.DEMO),
    }
    assets = [raw_audio_manifest, chatml_samples, tokenized_audio, train_val_split, lora_adapter]
    # A finished run of the same data and settings would be found and not trained again: start from none.
    runs = smoke_root() / "artifacts" / "lora_adapter"
    shutil.rmtree(runs, ignore_errors=True)
    if runs.exists():
        raise RuntimeError(f"could not remove {runs}: an earlier run there would be reported instead of a new one")
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize(assets, resources=resources, run_config=run_config, instance=instance)
    (event,) = [e for e in result.get_asset_materialization_events() if e.asset_key == dg.AssetKey("lora_adapter")]
    metadata = {key: value.value for key, value in event.materialization.metadata.items()}
    return metadata, _step_events(instance, result.run_id, "lora_adapter")


def _step_events(instance: dg.DagsterInstance, run_id: str, step_key: str) -> dict[str, float]:
    """{event type: time} of one step (the last of each type), from the run's event log."""
    return {
        entry.dagster_event.event_type_value: entry.timestamp
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None and entry.step_key == step_key
    }


def verdict(metadata: dict, rows: list[dict], events: dict[str, float], nproc: int, steps: int) -> list[str]:
    """What is wrong with the run (empty when it passed)."""
    settings = profile("8xgpu").batch  # the CPU dry run switches device/backend/precision only
    expected_batch = settings.per_device_batch_size * nproc * settings.grad_accum_steps
    problems = []
    if "STEP_UP_FOR_RETRY" in events or "STEP_RESTARTED" in events:
        problems.append("lora_adapter failed at least once and succeeded on a retry: see the run's logs")
    if metadata.get("steps") != steps:
        problems.append(f"trained {metadata.get('steps')} steps, asked for {steps}")
    if metadata.get("world_size") != nproc:
        problems.append(f"world size {metadata.get('world_size')}, expected {nproc}")
    if metadata.get("effective_batch_size") != expected_batch:
        problems.append(f"effective batch {metadata.get('effective_batch_size')}, expected {expected_batch}")
    train = [row for row in rows if "train_loss" in row]
    losses = [row["train_loss"] for row in train] + [row["val_loss"] for row in rows if "val_loss" in row]
    if len(train) != steps or not losses or not all(math.isfinite(loss) for loss in losses):
        problems.append(f"{len(train)} logged steps of {steps}, losses {losses}")
    if not metadata.get("adapter_path"):
        problems.append("no adapter_path in the asset's metadata")
    return problems


def report(metadata: dict, rows: list[dict], events: dict[str, float], nproc: int, device: torch.device) -> str:
    train = [row for row in rows if "train_loss" in row]
    timed = train[1:]  # step 1 includes CUDA/NCCL warm-up and the workers' start
    if not timed:
        return "No steps after the first were logged: nothing to report (see the verdict)."

    def mean(key: str) -> float:
        return sum(row[key] for row in timed) / len(timed)

    seconds = events.get("STEP_SUCCESS", math.nan) - events.get("STEP_START", math.nan)
    memory = max(row["memory_gb"] for row in train)
    memory_label = "rank 0 peak allocated GPU GiB" if device.type == "cuda" else "rank 0 peak RSS GiB"
    val_loss = metadata.get("val_loss", math.nan)
    lines = [
        "| processes | effective batch | steps | lora_adapter step s | mean tokens/s, steps 2+ | mean samples/s, "
        f"steps 2+ | padding eff. | {memory_label} | last train loss | val loss |",
        "|" + " --- |" * 10,
        f"| {nproc} | {metadata.get('effective_batch_size')} | {metadata.get('steps')} | {seconds:.0f} | "
        f"{mean('tokens_per_second'):,.0f} | {mean('samples_per_second'):.2f} | {mean('padding_efficiency'):.3f} | "
        f"{memory:.1f} | {train[-1]['train_loss']:.3f} | {val_loss:.3f} |",
        "",
        f"Base model: {metadata.get('base_model')}. Losses of random weights: no quality claim. The demo set holds "
        "fewer samples than a few steps draw, so loaders restart an epoch every step or two: the rates describe the "
        "profile's plumbing, not a steady state (bench_train_gpu.py measures that).",
    ]
    return "\n".join(lines)


def record(what: str, outcome: str, device: torch.device, gpus: int, body: str) -> None:
    entry = f"### {stamp()}: {what}, {outcome}\n\n- machine: {machine(device, gpus)}\n"
    entry += f"- command: `{command_line('benchmarks/smoke_8xgpu.py')}`\n{body}"
    append_to_docs(SECTION, SECTION_INTRO, entry)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_dry_run:
        print(f"{NO_GPU}: the smoke test was not run (use --cpu-dry-run to check the plumbing on CPU).")
        if args.write_docs:
            record(f"not run ({NO_GPU})", "no result", torch.device("cpu"), 0, "- result: none; run it on a GPU node.")
        return 0
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    nproc = args.nproc or (2 if args.cpu_dry_run else torch.cuda.device_count())
    what = "CPU dry run (tiny DEMO model; cpu/gloo/fp32 switched in)" if args.cpu_dry_run else "8xgpu profile"
    config = lora_adapter_config(nproc, args.steps, cpu=args.cpu_dry_run)
    body = f"- run config: `{json.dumps({'lora_adapter': config})}`\n"
    started = time.perf_counter()
    try:
        model = loading.DEMO if args.cpu_dry_run else str(real_size_checkpoint())
        metadata, events = materialize(model, config)
    except Exception as error:
        if args.write_docs:
            record(what, f"FAILED: {type(error).__name__}", device, 0 if args.cpu_dry_run else nproc, body)
        raise
    rows = read_metrics(str(metadata["metrics_path"]))
    problems = verdict(metadata, rows, events, nproc, args.steps)
    outcome = "FAILED: " + "; ".join(problems) if problems else "passed"
    print(f"smoke test {outcome} ({time.perf_counter() - started:.0f} s in all)")
    text = report(metadata, rows, events, nproc, device)
    print(text)
    if args.write_docs:
        record(what, outcome, device, 0 if args.cpu_dry_run else nproc, f"{body}\n{text}\n")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
