"""LoRA training of Higgs Audio v2: one entry point for plain `torchrun` and the Dagster `lora_adapter` asset.

    torchrun --nproc_per_node=2 --standalone -m higgs_pipeline.training.train \\
        --samples samples.jsonl --split split.json --token-store TOKENS --tokenizer-id ID \\
        --model demo --output-dir runs/x --profile demo [--set optim.max_steps=20 ...] [--resume]

Setup, loop, eval, checkpoint, in that order. What makes it correct:
- the forward goes through DDP (HiggsTrainingModule), so gradients are all-reduced; `no_sync` skips that on
  non-boundary micro-steps of an accumulation window;
- the loss of every micro-batch is its share of one token-weighted mean over the whole effective batch (label
  counts of the window are all_reduced first), so N ranks x batch b train exactly like 1 rank x batch N*b;
- validation runs on all ranks over the whole split and all_reduces loss sums, not means;
- checkpoints hold everything a killed run needs to continue as if it had not stopped.
Launched by Dagster Pipes (its env vars are set), rank 0 streams logs and reports the materialization.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from higgs_pipeline.launch.pipes_messages import pipes_message_writer
from higgs_pipeline.models import loading
from higgs_pipeline.training import checkpoint
from higgs_pipeline.training.config import OptimSettings, TrainConfig, parse_overrides, profile
from higgs_pipeline.training.data import (
    DistributedLengthBucketSampler,
    RecordDataset,
    load_split,
    make_loader,
    sequence_lengths,
    validation_batches,
)
from higgs_pipeline.training.lora import trainable_parameters
from higgs_pipeline.training.module import HiggsTrainingModule, build_lora_model, sums_of
from higgs_pipeline.training.objective import LabelCounts, LossSums, label_counts, training_loss
from higgs_pipeline.training.samples import forward_kwargs, make_collator

log = logging.getLogger("higgs_pipeline.training")

# Exit status of --stop-after-step: a deliberate crash, for tests of resume and of Dagster's retry.
STOP_EXIT_CODE = 75
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="records JSONL written by chatml_samples")
    parser.add_argument("--split", required=True, help="split.json written by train_val_split")
    parser.add_argument("--token-store", required=True, help="TokenStore root written by tokenized_audio")
    parser.add_argument("--tokenizer-id", required=True, help="audio tokenizer id the codes are stored under")
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
        "--debug-save-rank-params", action="store_true", help="debug: each rank saves its trainable weights"
    )
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(config: TrainConfig) -> Distributed:
    """Process group from torchrun's env vars; a 1-process group when run without torchrun (same code path)."""
    if config.run.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("profile wants run.device=cuda but no GPU is visible: use --profile demo or a GPU node")
    if "RANK" in os.environ:
        dist.init_process_group(config.run.backend)
    else:
        dist.init_process_group(config.run.backend, store=dist.HashStore(), rank=0, world_size=1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if config.run.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # torchrun defaults every process to 1 thread; share the cores instead.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(config.run.cpu_threads or max(1, (os.cpu_count() or 1) // local_world))
        device = torch.device("cpu")
    return Distributed(dist.get_rank(), local_rank, dist.get_world_size(), device)


def lr_multiplier(optim: OptimSettings):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""

    def multiplier(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        progress = min(1.0, (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps))
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


class Reporter:
    """Rank 0's outputs: log lines (also streamed through Pipes), metrics JSONL, TensorBoard, a progress bar."""

    def __init__(self, run_dir: Path, active: bool, pipes: Any, start_step: int, max_steps: int) -> None:
        self.active, self.pipes = active, pipes
        self.metrics_path = run_dir / METRICS_FILE
        self.board = self.progress = None
        if not active:
            return
        from torch.utils.tensorboard import SummaryWriter

        _truncate_metrics(self.metrics_path, start_step)
        # purge_step drops events a killed run logged after its last checkpoint.
        self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step or None)
        self.progress = tqdm(total=max_steps, initial=start_step, desc="train", mininterval=2.0, file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.active:
            return
        log.info(message)
        if self.pipes is not None:
            self.pipes.log.info(message)

    def metrics(self, record: dict[str, Any], prefix: str) -> None:
        if not self.active:
            return
        with self.metrics_path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self.board.add_scalar(f"{prefix}/{key}", value, record["step"])
        self.board.flush()

    def close(self) -> None:
        if self.active:
            self.board.close()
            self.progress.close()


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only lines up to the checkpoint a resumed run starts from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step]
    temporary = path.with_suffix(".tmp")
    temporary.write_text("".join(line + "\n" for line in kept))
    os.replace(temporary, path)


def micro_batches(loader, sampler: DistributedLengthBucketSampler, epoch: int, position: int):
    """Endless (epoch, position after this batch, batch), epochs chained; starts at a resume position."""
    while True:
        sampler.set_epoch(epoch, position)
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


@torch.no_grad()
def evaluate(module: HiggsTrainingModule, loader, device: torch.device, codebooks: int) -> LossSums:
    """Loss sums over this rank's share of the validation split, all_reduced: exact means over the whole split."""
    module.eval()
    total = torch.zeros(3 + 3 * codebooks, dtype=torch.float64, device=device)
    for batch in loader:
        total += sums_of(module(**forward_kwargs(batch, device))).as_vector().to(device)
    dist.all_reduce(total)
    module.train()
    return LossSums.from_vector(total.cpu())


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def prefixed(means: dict[str, float], prefix: str) -> dict[str, float]:
    renamed = {"total_loss": "loss"}
    return {f"{prefix}_{renamed.get(k, k)}": v for k, v in means.items()}


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Data-loader workers are forked after the text tokenizer ran; its own thread pool must stay off.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    is_main = int(os.environ.get("RANK", 0)) == 0
    launched_by_pipes = is_main and PipesEnvVarParamsLoader().is_dagster_pipes_process()
    pipes_context = open_dagster_pipes(message_writer=pipes_message_writer()) if launched_by_pipes else None
    with pipes_context or nullcontext() as pipes:
        summary = train(args, pipes)
        if is_main and args.publish_to:
            # Where the training node's disk is not the artifact store (a pod, a remote bucket): hand the
            # outputs over from the node that wrote them.
            checkpoint.publish(Path(args.output_dir), args.publish_to)
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


def resume_decision(args: argparse.Namespace, run_dir: Path, max_steps: int) -> tuple[str, Any]:
    """Rank 0's view of the run directory: ("fresh", None), ("finished", summary) or ("resume", checkpoint).

    A checkpoint travels whole (trainable weights, optimizer, RNG of every rank), so ranks on other nodes
    resume from rank 0's disk.
    """
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        return "fresh", None
    if not args.resume:
        raise RuntimeError(f"{run_dir} already has checkpoint {latest.name}: pass --resume or use a new --output-dir")
    if (run_dir / SUMMARY_FILE).exists():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if summary["steps"] >= max_steps:
            return "finished", summary
    return "resume", {"path": str(latest), "state": checkpoint.read_checkpoint(latest)}


def train(args: argparse.Namespace, pipes: Any = None) -> dict[str, Any]:
    config = profile(args.profile, parse_overrides(args.set))
    env = setup_distributed(config)
    try:
        return _train(args, config, env, pipes)
    finally:
        dist.destroy_process_group()


def _train(args: argparse.Namespace, config: TrainConfig, env: Distributed, pipes: Any) -> dict[str, Any]:
    run_dir = Path(args.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    optim, batch_settings, run = config.optim, config.batch, config.run
    # Rank 0 decides and every rank follows: the pods of a multi-node job need not share a disk, and ranks that
    # each looked at their own would disagree on whether (and from where) to resume.
    decision: list[Any] = [None]
    if env.is_main:
        try:
            decision = [resume_decision(args, run_dir, optim.max_steps)]
        except Exception as error:  # every rank must hear of it, or ranks on other nodes wait in the broadcast
            decision = [("error", f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(decision, src=0)
    kind, resumed = decision.pop()
    if kind == "error":
        raise RuntimeError(f"rank 0 could not decide whether to resume: {resumed}")
    if kind == "finished":
        log.info("run in %s already finished at step %d: nothing to train", run_dir, resumed["steps"])
        return resumed if env.is_main else {}

    # Same seed on every rank: identical LoRA initialisation (DDP also broadcasts rank 0's weights).
    torch.manual_seed(run.seed)
    text_tokenizer = loading.load_text_tokenizer(args.model)
    peft_model = build_lora_model(args.model, config.lora, run.precision, env.device)
    model_config = peft_model.get_base_model().config
    codebooks = model_config.audio_num_codebooks
    module = HiggsTrainingModule(peft_model, torch.bfloat16 if run.precision == "bf16" else None)
    cuda = env.device.type == "cuda"
    ddp = DistributedDataParallel(module, device_ids=[env.local_rank] if cuda else None, broadcast_buffers=False)
    trainable = [p for p in ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay, fused=cuda
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(optim))

    collator = make_collator(model_config)
    train_records, validation_records = load_split(args.samples, args.split)
    train_set = RecordDataset(train_records, args.token_store, args.tokenizer_id, text_tokenizer)
    validation_set = RecordDataset(validation_records, args.token_store, args.tokenizer_id, text_tokenizer)
    sampler = DistributedLengthBucketSampler(
        sequence_lengths(train_set, model_config),
        batch_settings.per_device_batch_size,
        env.world_size,
        env.rank,
        seed=run.seed,
        bucket_batches=batch_settings.bucket_batches,
        max_tokens=batch_settings.max_tokens_per_device,
    )
    loader_options = {
        "num_workers": batch_settings.num_workers,
        "pin_memory": batch_settings.pin_memory and cuda,
        "persistent_workers": batch_settings.persistent_workers,
    }
    loader = make_loader(train_set, sampler, collator, **loader_options)
    validation_plan = validation_batches(
        sequence_lengths(validation_set, model_config) if len(validation_set) else [],
        batch_settings.validation_batch_size,
        env.world_size,
        env.rank,
    )
    validation_loader = make_loader(validation_set, validation_plan, collator, **loader_options)

    state: dict[str, Any] = {"epoch": 0, "position": 0, "best_val_loss": math.inf, "best": None}
    start_step = 0
    if kind == "resume":
        saved = checkpoint.restore_trainable(resumed.pop("state"), peft_model, resumed["path"])
        if saved["world_size"] != env.world_size:
            raise RuntimeError(
                f"{resumed['path']} was written by {saved['world_size']} processes; resume with the same world size "
                f"(nodes x --nproc_per_node = {saved['world_size']}): the batch plan and effective batch depend on it"
            )
        if saved["config"] != config.to_dict():
            raise RuntimeError(f"{run_dir} was trained with another config: resume with the same one or a new dir")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"][env.rank])
        start_step = saved["step"]
        state = {key: saved[key] for key in state}
        del saved  # the optimizer holds its own copy now; the broadcast one would stay on every rank all run
    else:
        # Dropout differs per rank, like the data does.
        torch.manual_seed(run.seed + env.rank)

    reporter = Reporter(run_dir, env.is_main, pipes, start_step, optim.max_steps)
    effective_batch = batch_settings.per_device_batch_size * env.world_size * batch_settings.grad_accum_steps
    counts_by_group = trainable_parameters(peft_model)
    if env.is_main:
        run_info = {
            "config": config.to_dict(),
            "profile": args.profile,
            "base_model": loading.describe(args.model),
            "world_size": env.world_size,
            "effective_batch_size": effective_batch,
            "trainable_parameters": counts_by_group,
            "inputs": {"samples": args.samples, "split": args.split, "token_store": args.token_store},
        }
        (run_dir / "run.json").write_text(json.dumps(run_info, indent=2))
    reporter.info(
        f"{'resuming at step ' + str(start_step) if start_step else 'starting'}: base model "
        f"{loading.describe(args.model)}, {env.world_size} x {run.device} ({run.backend}, {run.precision}), "
        f"effective batch {'up to ' * bool(batch_settings.max_tokens_per_device)}{effective_batch}, "
        f"{len(train_set)} train / {len(validation_set)} validation samples"
    )
    if batch_settings.max_tokens_per_device:
        reporter.info(
            f"token budget {batch_settings.max_tokens_per_device} padded positions per device batch (at most "
            f"{batch_settings.per_device_batch_size} samples): {len(sampler)} micro-batches per rank in epoch 0"
            + (f"; {sampler.over_budget()} samples exceed it and train alone" if sampler.over_budget() else "")
        )
    reporter.info("trainable parameters per group: " + ", ".join(f"{k}={v:,}" for k, v in counts_by_group.items()))

    stream = micro_batches(loader, sampler, state["epoch"], state["position"])
    step = start_step
    # Loss sums, then non-pad positions, all positions and samples since the last log line.
    interval = torch.zeros(3 + 3 * codebooks + 3, dtype=torch.float64, device=env.device)
    run_tokens = torch.zeros(3, dtype=torch.float64, device=env.device)  # non-pad, all positions, samples
    mismatch = torch.zeros((), dtype=torch.bool, device=env.device)
    interval_seconds = train_seconds = 0.0
    interval_steps = 0
    last_train: dict[str, float] = {}
    validation_result: dict[str, float] = {}
    while step < optim.max_steps:
        started = time.perf_counter()
        window = [next(stream) for _ in range(batch_settings.grad_accum_steps)]
        counts = [label_counts(b.label_ids, b.label_audio_ids, codebooks) for _, _, b in window]
        window_counts = sum(counts[1:], counts[0]).as_vector().to(env.device)
        dist.all_reduce(window_counts)
        window_counts = LabelCounts.from_vector(window_counts)
        learning_rate = scheduler.get_last_lr()[0]
        for index, (_, _, batch) in enumerate(window):
            boundary = index == len(window) - 1
            with nullcontext() if boundary else ddp.no_sync():
                result = ddp(**forward_kwargs(batch, env.device))
                sums = sums_of(result)
                loss = training_loss(sums, optim.text_weight, optim.audio_weight, window_counts) * env.world_size
                loss.backward()
            expected = counts[index]
            mismatch |= (sums.text_count.double() != expected.text.to(env.device)) | (
                sums.audio_count.double() != expected.audio.to(env.device)
            ).any()
            samples = torch.tensor([batch.input_ids.shape[0]], dtype=torch.float64, device=env.device)
            token_counts = torch.stack([result["tokens"], result["positions"]]).double()
            interval += torch.cat([sums.as_vector(), token_counts, samples])
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        state["epoch"], state["position"] = window[-1][0], window[-1][1]
        if cuda:
            torch.cuda.synchronize(env.device)
        interval_seconds += time.perf_counter() - started
        interval_steps += 1
        if reporter.progress is not None:
            reporter.progress.update(1)

        if step % run.log_every == 0 or step == optim.max_steps:
            dist.all_reduce(interval)
            if mismatch.item():
                raise RuntimeError(
                    "label counts from the batch differ from the forward's: the loss normalisation would be wrong "
                    "(a sample whose first label is not -100?)"
                )
            sums = LossSums.from_vector(interval[: 3 + 3 * codebooks].cpu())
            tokens, positions, samples = interval[3 + 3 * codebooks :].tolist()
            run_tokens += torch.tensor([tokens, positions, samples], dtype=torch.float64, device=env.device)
            train_seconds += interval_seconds
            seconds = interval_seconds
            last_train = prefixed(sums.means(optim.text_weight, optim.audio_weight), "train")
            record = {
                "step": step,
                "epoch": state["epoch"],
                **last_train,
                "learning_rate": learning_rate,
                "grad_norm": float(grad_norm),
                "tokens_per_second": tokens / seconds,
                "samples_per_second": samples / seconds,
                # Varies from step to step under a token budget (batch.max_tokens_per_device).
                "samples_per_step": samples / interval_steps,
                "padding_efficiency": tokens / positions,
                "memory_gb": memory_gb(env.device),
            }
            reporter.metrics(record, "train")
            if reporter.progress is not None:
                reporter.progress.set_postfix(loss=f"{record['train_loss']:.4f}", tokens_s=f"{tokens / seconds:.0f}")
            interval.zero_()
            interval_seconds = 0.0
            interval_steps = 0

        if len(validation_set) and (step % run.eval_every == 0 or step == optim.max_steps):
            means = evaluate(module, validation_loader, env.device, codebooks).means(
                optim.text_weight, optim.audio_weight
            )
            validation_result = {"step": step, **prefixed(means, "val")}
            reporter.metrics(validation_result, "val")
            reporter.info(
                f"step {step}: val_loss {means['total_loss']:.4f} (text {means['text_loss']:.4f}, "
                f"audio {means['audio_loss']:.4f}, audio accuracy {means['audio_accuracy']:.3f})"
            )
            if means["total_loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["best"] = means["total_loss"], validation_result
                if env.is_main:
                    checkpoint.save_adapter(
                        peft_model, run_dir / "best_adapter", {"validation.json": json.dumps(validation_result)}
                    )

        if step % run.checkpoint_every == 0 or step == optim.max_steps:
            rng_states: list[Any] = [None] * env.world_size
            dist.all_gather_object(rng_states, checkpoint.rng_state())
            if env.is_main:
                saved_state = {
                    **state,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng_states,
                    "config": config.to_dict(),
                    "world_size": env.world_size,
                }
                path = checkpoint.save_checkpoint(run_dir, step, peft_model, saved_state, run.keep_checkpoints)
                reporter.info(f"step {step}: checkpoint {path}")
            dist.barrier()

        if args.stop_after_step == step:
            reporter.info(f"--stop-after-step {step}: exiting with status {STOP_EXIT_CODE} as a crash would")
            reporter.close()
            logging.shutdown()
            dist.barrier()
            os._exit(STOP_EXIT_CODE)

    if args.debug_save_rank_params:
        debug_dir = run_dir / "rank_params"
        debug_dir.mkdir(exist_ok=True)
        trained = {n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}
        torch.save(trained, debug_dir / f"rank{env.rank}.pt")

    summary: dict[str, Any] = {}
    if env.is_main:
        last_adapter = checkpoint.save_adapter(peft_model, run_dir / "last_adapter")
        best_adapter = run_dir / "best_adapter"
        tokens, positions, samples = run_tokens.tolist()
        # val_* describe the adapter that is handed on: the best by validation loss.
        best = state["best"] or {}
        summary = {
            "train_loss": last_train.get("train_loss", math.nan),
            "train_text_loss": last_train.get("train_text_loss", math.nan),
            "train_audio_loss": last_train.get("train_audio_loss", math.nan),
            "val_loss": best.get("val_loss", math.nan),
            "val_text_loss": best.get("val_text_loss", math.nan),
            "val_audio_loss": best.get("val_audio_loss", math.nan),
            "val_audio_accuracy": best.get("val_audio_accuracy", math.nan),
            "best_step": best.get("step", step),
            "final_val_loss": validation_result.get("val_loss", math.nan),
            "steps": step,
            "world_size": env.world_size,
            # Under a token budget effective_batch_size is the most a step can hold; samples_per_step is the mean.
            "effective_batch_size": effective_batch,
            "token_budget": batch_settings.max_tokens_per_device,
            "samples_per_step": samples / (step - start_step) if step > start_step else math.nan,
            "tokens_per_second": tokens / train_seconds if train_seconds else math.nan,
            "padding_efficiency": tokens / positions if positions else math.nan,
            "trainable_parameters": counts_by_group,
            "base_model": loading.describe(args.model),
            "adapter_path": str(best_adapter if best_adapter.exists() else last_adapter),
            "last_adapter_path": str(last_adapter),
            "run_dir": str(run_dir),
            "metrics_path": str(reporter.metrics_path),
        }
        temporary = run_dir / (SUMMARY_FILE + ".tmp")
        temporary.write_text(json.dumps(summary, indent=2))
        os.replace(temporary, run_dir / SUMMARY_FILE)
        reporter.info(f"done at step {step}: adapter {summary['adapter_path']} (val_loss {summary['val_loss']:.4f})")
    reporter.close()
    dist.barrier()
    return summary


if __name__ == "__main__":
    main()
