"""LoRA training of Higgs Audio v2: one entry point for plain `torchrun` and the Dagster `lora_adapter` asset.

    torchrun --nproc_per_node=2 --standalone -m higgs_pipeline.training.train \\
        --samples samples.jsonl --split split.json --token-store TOKENS --tokenizer-id ID \\
        --model demo --output-dir runs/x --profile demo [--set optim.max_steps=20 ...] [--resume]

It reads top to bottom: the entry (`main`, `train`), setup (`_build`, `_data`), the loop (`_run`, `_train_step`),
validation and checkpoints. Resume decisions live in `resume.py`, what rank 0 reports in `reporting.py`.
What makes it correct:
- the forward goes through DDP (HiggsTrainingModule), so gradients are all-reduced; `no_sync` skips that on
  non-boundary micro-steps of an accumulation window;
- the loss of every micro-batch is its share of one token-weighted mean over the whole effective batch (label
  counts of the window are all_reduced first), so N ranks x batch b train exactly like 1 rank x batch N*b;
- validation runs on all ranks over a fixed hash-chosen subset of the split (`run.max_validation_samples`) and
  all_reduces loss sums, not means;
- checkpoints hold everything a killed run needs to continue as if it had not stopped, and are read without
  pickle; rank 0 holds the run folder's lock for the whole run.
Launched by Dagster Pipes (its env vars are set), rank 0 streams logs and reports the materialization.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import safetensors.torch
import torch
import torch.distributed as dist
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
from torch.nn.parallel import DistributedDataParallel

from higgs_pipeline.data.records import TokenStore
from higgs_pipeline.data.split import ids_sha256, validation_subset
from higgs_pipeline.data.tables import read_parquet
from higgs_pipeline.launch.pipes_messages import pipes_message_writer
from higgs_pipeline.launch.torchrun import die_with_agent
from higgs_pipeline.models import loading
from higgs_pipeline.training import candidates, checkpoint
from higgs_pipeline.training.config import OptimSettings, TrainConfig, parse_overrides, profile
from higgs_pipeline.training.data import (
    LENGTH_COLUMNS,
    DistributedLengthBucketSampler,
    LazySampleDataset,
    make_loader,
    merged_lengths,
    sample_lengths,
    split_rows,
    validation_batches,
)
from higgs_pipeline.training.distributed import Distributed, all_gather_bytes, setup_distributed
from higgs_pipeline.training.module import HiggsTrainingModule, autocast_dtype, build_lora_model, precision_of, sums_of
from higgs_pipeline.training.objective import LabelCounts, LossSums, label_counts, training_loss
from higgs_pipeline.training.reporting import (
    SUMMARY_FILE,
    Reporter,
    Tally,
    Throughput,
    describe,
    log_window,
    prefixed,
    write_summary,
)
from higgs_pipeline.training.resume import Decision, Progress, decide, restore
from higgs_pipeline.training.samples import forward_kwargs, make_collator

log = logging.getLogger("higgs_pipeline.training")

# Exit status of --stop-after-step: a deliberate crash, for tests of resume and of Dagster's retry.
STOP_EXIT_CODE = 75
RANK_PARAMS_DIR = "rank_params"
# What other modules import from the entry point.
__all__ = ["STOP_EXIT_CODE", "SUMMARY_FILE", "main", "parse_args", "train"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="records JSONL written by chatml_samples")
    parser.add_argument("--split", required=True, help="split.json written by train_val_split")
    parser.add_argument("--token-store", required=True, help="TokenStore root written by tokenized_audio")
    parser.add_argument("--tokenizer-id", required=True, help="audio tokenizer id the codes are stored under")
    parser.add_argument(
        "--lengths",
        default=None,
        help="sample lengths table written by train_val_split (without it, each rank computes it from the samples)",
    )
    parser.add_argument("--model", default=loading.DEMO, help="'demo', a hub id or a local checkpoint folder")
    parser.add_argument("--output-dir", required=True, help="run directory (local): checkpoints, adapters, logs")
    parser.add_argument("--profile", default="demo", help="demo | 8xgpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint, if any")
    parser.add_argument(
        "--publish-to", default=None, help="fsspec URL (e.g. s3://...) rank 0 copies the finished run's outputs to"
    )
    parser.add_argument("--stop-after-step", type=int, default=None, help="debug: crash after this step")
    parser.add_argument(
        "--debug-save-rank-params",
        action="store_true",
        help=f"debug: each rank saves its trainable weights to {RANK_PARAMS_DIR}/rank<N>.safetensors",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    die_with_agent()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Data-loader workers are forked after the text tokenizer ran; its own thread pool must stay off.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", 0)) == 0
    launched_by_pipes = is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process()
    pipes_context = open_dagster_pipes(message_writer=pipes_message_writer()) if launched_by_pipes else None
    with pipes_context or nullcontext() as pipes:
        summary = train(args, pipes)
        if pipes is not None:
            pipes.report_asset_materialization(metadata=pipes_metadata(summary))


def pipes_metadata(summary: dict[str, Any]) -> dict[str, Any]:
    metadata = {}
    for key, value in summary.items():
        if key.endswith("_path") or key == "run_dir":
            metadata[key] = {"raw_value": value, "type": "path"}
        elif isinstance(value, float) and not math.isfinite(value):
            continue
        elif isinstance(value, dict | list):
            metadata[key] = {"raw_value": value, "type": "json"}
        else:
            metadata[key] = value
    return metadata


def train(args: argparse.Namespace, pipes: Any = None) -> dict[str, Any]:
    config = profile(args.profile, parse_overrides(args.set))
    env = setup_distributed(config)
    try:
        return _train(args, config, env, pipes)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, config: TrainConfig, env: Distributed, pipes: Any) -> dict[str, Any]:
    """Lock the run folder, decide whether to resume, train (unless finished), publish; rank 0's summary."""
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    decision, lock = decide(args, run_dir, env, config.optim.max_steps)
    with lock or nullcontext():
        if decision.kind == "finished":
            log.info("run in %s already finished at step %d: nothing to train", run_dir, decision.summary["steps"])
            summary = decision.summary if env.is_main else {}
        else:
            summary = _run(args, config, env, pipes, run_dir, decision)
        if env.is_main and args.publish_to:
            # Where the training node's disk is not the artifact store (a pod, a remote bucket): hand the
            # outputs over from the node that wrote them.
            checkpoint.publish(run_dir, args.publish_to)
    return summary


@dataclass
class Parts:
    """The model and what updates it."""

    peft_model: Any
    module: HiggsTrainingModule
    ddp: DistributedDataParallel
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def model_config(self):
        return self.peft_model.get_base_model().config

    @property
    def codebooks(self) -> int:
        return self.model_config.audio_num_codebooks


def _build(args: argparse.Namespace, config: TrainConfig, env: Distributed) -> Parts:
    """LoRA model in DDP, AdamW over its trainable weights, warmup + cosine schedule."""
    optim, run = config.optim, config.run
    # Same seed on every rank: identical LoRA initialisation (DDP also broadcasts rank 0's weights).
    torch.manual_seed(run.seed)
    peft_model = build_lora_model(args.model, config.lora, run.precision, env.device)
    module = HiggsTrainingModule(peft_model, autocast_dtype(run.precision))
    cuda = env.device.type == "cuda"
    ddp = DistributedDataParallel(module, device_ids=[env.local_rank] if cuda else None, broadcast_buffers=False)
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay, fused=cuda
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(optim))
    return Parts(peft_model, module, ddp, trainable, optimizer, scheduler)


@dataclass
class Data:
    train_set: LazySampleDataset
    validation_set: LazySampleDataset
    validation_ids: list[str]  # the validation subset's sample ids, in the loader's order
    sampler: DistributedLengthBucketSampler
    loader: Any
    validation_loader: Any


def _data(args: argparse.Namespace, config: TrainConfig, env: Distributed, model_config) -> Data:
    """This rank's length-bucketed share of the train split and of the validation split. Lengths come from the
    lengths table and samples are read lazily by byte offset, so start-up and memory stay flat in corpus size."""
    batch = config.batch
    text_tokenizer = loading.load_text_tokenizer(args.model)
    collator = make_collator(model_config)
    # One index per rank, loaded before the loaders fork their workers: they share its pages.
    store = TokenStore(args.token_store, args.tokenizer_id)
    store.lookup()
    if args.lengths:
        table = read_parquet(args.lengths, columns=LENGTH_COLUMNS)
    else:
        table = sample_lengths(args.samples, store.frames, text_tokenizer)
    train_rows, validation_rows = split_rows(table, args.split)
    validation_ids = table["sample_id"].to_numpy()[validation_rows]
    chosen = validation_subset(validation_ids.tolist(), config.run.max_validation_samples)
    validation_rows, validation_ids = validation_rows[chosen], validation_ids[chosen].tolist()
    lengths, offsets = merged_lengths(table, model_config), table["offset"].to_numpy()
    del table  # the sample ids: only the rows' offsets and lengths (and the validated ids) are kept

    def dataset(rows) -> LazySampleDataset:
        return LazySampleDataset(args.samples, offsets[rows], store, text_tokenizer)

    train_set, validation_set = dataset(train_rows), dataset(validation_rows)
    sampler = DistributedLengthBucketSampler(
        lengths[train_rows],
        batch.per_device_batch_size,
        env.world_size,
        env.rank,
        seed=config.run.seed,
        bucket_batches=batch.bucket_batches,
        max_tokens=batch.max_tokens_per_device,
    )
    loader_options = {
        "num_workers": batch.num_workers,
        "pin_memory": batch.pin_memory and env.device.type == "cuda",
        "persistent_workers": batch.persistent_workers,
    }
    validation_plan = validation_batches(
        lengths[validation_rows].tolist(), batch.validation_batch_size, env.world_size, env.rank
    )
    return Data(
        train_set,
        validation_set,
        validation_ids,
        sampler,
        make_loader(train_set, sampler, collator, **loader_options),
        make_loader(validation_set, validation_plan, collator, **loader_options),
    )


def _run(
    args: argparse.Namespace, config: TrainConfig, env: Distributed, pipes: Any, run_dir: Path, decision: Decision
) -> dict[str, Any]:
    """Setup, then the loop: step, log, validate, checkpoint; then the summary."""
    optim, run = config.optim, config.run
    parts = _build(args, config, env)
    data = _data(args, config, env, parts.model_config)
    progress = restore(decision, parts, config, env)
    reporter = Reporter(run_dir, env.is_main, pipes, progress.start_step, optim.max_steps)
    describe(args, config, env, run_dir, parts, data, progress, reporter)

    stream = micro_batches(data.loader, data.sampler, progress.epoch, progress.position)
    tally, totals = Tally(parts.codebooks, env.device), Throughput()
    last_train: dict[str, float] = {}
    last_validation: dict[str, float] = {}
    startup_seconds = math.nan
    while progress.step < optim.max_steps:
        grad_norm, learning_rate = _train_step(stream, parts, config, env, tally, progress)
        if math.isnan(startup_seconds):
            startup_seconds = seconds_since_launch()
            reporter.info(f"first optimizer step done {startup_seconds:.1f} s after launch")
        reporter.advance()
        final = progress.step == optim.max_steps
        if progress.step % run.log_every == 0 or final:
            totals, last_train = log_window(tally, totals, progress, optim, env, reporter, grad_norm, learning_rate)
        if len(data.validation_set) and (progress.step % run.eval_every == 0 or final):
            last_validation = _validate(parts, data, optim, env, run_dir, progress, reporter)
        if progress.step % run.checkpoint_every == 0 or final:
            _checkpoint(parts, config, env, run_dir, progress, reporter)
        if args.stop_after_step == progress.step:
            _crash(progress.step, reporter)

    if args.debug_save_rank_params:
        _save_rank_params(parts, env, run_dir)
    summary = {}
    if env.is_main:
        last_adapter = checkpoint.save_adapter(parts.peft_model, run_dir / "last_adapter")
        summary = write_summary(
            args,
            config,
            env,
            run_dir,
            parts.peft_model,
            progress,
            totals,
            last_train,
            last_validation,
            last_adapter,
            startup_seconds,
        )
        reporter.info(
            f"done at step {progress.step}: adapter {summary['adapter_path']} (val_loss {summary['val_loss']:.4f})"
        )
    reporter.close()
    dist.barrier()
    return summary


def seconds_since_launch() -> float:
    """Wall seconds since this process started (the interpreter's launch, imports included)."""
    return time.time() - psutil.Process().create_time()


def _train_step(stream, parts: Parts, config: TrainConfig, env: Distributed, tally: Tally, progress: Progress):
    """One optimizer step over `grad_accum_steps` micro-batches; returns (gradient norm, learning rate used)."""
    optim, codebooks = config.optim, parts.codebooks
    started = time.perf_counter()
    window = [next(stream) for _ in range(config.batch.grad_accum_steps)]
    counts = [label_counts(b.label_ids, b.label_audio_ids, codebooks) for _, _, b in window]
    # Every micro-batch's loss is its share of one mean over the labels of the whole window, on all ranks.
    window_counts = sum(counts[1:], counts[0]).as_vector().to(env.device)
    dist.all_reduce(window_counts)
    window_counts = LabelCounts.from_vector(window_counts)
    learning_rate = parts.scheduler.get_last_lr()[0]
    for index, (_, _, batch) in enumerate(window):
        boundary = index == len(window) - 1
        with nullcontext() if boundary else parts.ddp.no_sync():
            result = parts.ddp(**forward_kwargs(batch, env.device))
            sums = sums_of(result)
            loss = training_loss(sums, optim.text_weight, optim.audio_weight, window_counts) * env.world_size
            loss.backward()
        tally.add(sums, result, batch.input_ids.shape[0], counts[index])
    grad_norm = torch.nn.utils.clip_grad_norm_(parts.trainable, optim.max_grad_norm)
    parts.optimizer.step()
    parts.scheduler.step()
    parts.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.epoch, progress.position = window[-1][0], window[-1][1]
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    tally.seconds += time.perf_counter() - started
    tally.steps += 1
    return grad_norm, learning_rate


def micro_batches(loader, sampler: DistributedLengthBucketSampler, epoch: int, position: int):
    """Endless (epoch, position after this batch, batch), epochs chained; starts at a resume position."""
    while True:
        sampler.set_epoch(epoch, position)
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


def lr_multiplier(optim: OptimSettings):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""

    def multiplier(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


@torch.no_grad()
def evaluate(module: HiggsTrainingModule, loader, device: torch.device, codebooks: int) -> LossSums:
    """Loss sums over this rank's share of the validation split, all_reduced: exact means over the whole split."""
    module.eval()
    total = torch.zeros(LossSums.vector_size(codebooks), dtype=torch.float64, device=device)
    for batch in loader:
        total += sums_of(module(**forward_kwargs(batch, device))).as_vector().to(device)
    dist.all_reduce(total)
    module.train()
    return LossSums.from_vector(total.cpu())


def _validate(
    parts: Parts, data: Data, optim: OptimSettings, env: Distributed, run_dir: Path, progress: Progress, reporter
) -> dict[str, Any]:
    """Validation loss over the validation subset; a new best is saved as best_adapter. Returns the metrics line.

    The line records what was measured, so `adapter_evaluation` can reuse it instead of measuring again: how many
    samples (`val_samples`), which (`val_ids_sha256`, `data.split.ids_sha256`), in what precision
    (`val_precision`: "bf16" weights and autocast, or "fp32") and the exact loss sums (`val_sums`,
    `LossSums.as_vector`), from which any weighting's means follow.
    """
    sums = evaluate(parts.module, data.validation_loader, env.device, parts.codebooks)
    means = sums.means(optim.text_weight, optim.audio_weight)
    ids = data.validation_ids
    result = {
        "step": progress.step,
        **prefixed(means, "val"),
        "val_samples": len(ids),
        "val_ids_sha256": ids_sha256(ids),
        "val_precision": precision_of(parts.module),
        "val_sums": sums.as_vector().tolist(),
    }
    reporter.metrics(result, "val")
    reporter.info(
        f"step {progress.step}: val_loss {means['total_loss']:.4f} (text {means['text_loss']:.4f}, "
        f"audio {means['audio_loss']:.4f}, audio accuracy {means['audio_accuracy']:.3f})"
    )
    if means["total_loss"] < progress.best_val_loss:
        progress.best_val_loss, progress.best = means["total_loss"], result
        if env.is_main:
            extra = {"validation.json": json.dumps(result)}
            checkpoint.save_adapter(parts.peft_model, run_dir / "best_adapter", extra)
    if env.is_main:  # every evaluation point is heard later (adapter_evaluation), not only the best by loss
        candidates.save_candidate(parts.peft_model, run_dir, result, (progress.best or {}).get("step"))
    return result


def _checkpoint(parts: Parts, config: TrainConfig, env: Distributed, run_dir: Path, progress: Progress, reporter):
    """Everything a resumed run needs, the RNG of every rank included; rank 0 writes it."""
    rng_states = [json.loads(state) for state in all_gather_bytes(json.dumps(checkpoint.rng_state()).encode(), env)]
    if env.is_main:
        state = {
            **progress.saved(),
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "rng": rng_states,
            "config": config.to_dict(),
            "world_size": env.world_size,
        }
        path = checkpoint.save_checkpoint(run_dir, progress.step, parts.peft_model, state, config.run.keep_checkpoints)
        reporter.info(f"step {progress.step}: checkpoint {path}")
        candidates.thin_candidates(run_dir, config.run.keep_candidates)
    dist.barrier()


def _crash(step: int, reporter: Reporter) -> None:
    """--stop-after-step: die as a killed run would, after the step's checkpoint (if any) is written."""
    reporter.info(f"--stop-after-step {step}: exiting with status {STOP_EXIT_CODE} as a crash would")
    reporter.close()
    logging.shutdown()
    dist.barrier()
    os._exit(STOP_EXIT_CODE)


def _save_rank_params(parts: Parts, env: Distributed, run_dir: Path) -> None:
    """--debug-save-rank-params: this rank's trainable weights, for a test that every rank holds the same."""
    folder = run_dir / RANK_PARAMS_DIR
    folder.mkdir(exist_ok=True)
    safetensors.torch.save_file(checkpoint.trainable_weights(parts.peft_model), folder / f"rank{env.rank}.safetensors")


if __name__ == "__main__":
    main()
