"""LoRA training of Higgs Audio v2: one entry point for plain `torchrun` and the Dagster `lora_adapter` asset.

    torchrun --nproc_per_node=2 --standalone -m higgs_pipeline.training.train \\
        --samples samples.jsonl --split split.json --token-store TOKENS --tokenizer-id ID \\
        --model demo --output-dir runs/x --profile demo [--set optim.max_steps=20 ...] [--resume]

Setup, loop, eval, checkpoint, in that order (`_run` reads as that list). What makes it correct:
- the forward goes through DDP (HiggsTrainingModule), so gradients are all-reduced; `no_sync` skips that on
  non-boundary micro-steps of an accumulation window;
- the loss of every micro-batch is its share of one token-weighted mean over the whole effective batch (label
  counts of the window are all_reduced first), so N ranks x batch b train exactly like 1 rank x batch N*b;
- validation runs on all ranks over the whole split and all_reduces loss sums, not means;
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
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import safetensors.torch
import torch
import torch.distributed as dist
from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from higgs_pipeline.launch.pipes_messages import pipes_message_writer
from higgs_pipeline.launch.torchrun import die_with_agent
from higgs_pipeline.models import loading
from higgs_pipeline.training import candidates, checkpoint
from higgs_pipeline.training.checkpoint import StoredState
from higgs_pipeline.training.config import OptimSettings, TrainConfig, parse_overrides, profile
from higgs_pipeline.training.data import (
    DistributedLengthBucketSampler,
    RecordDataset,
    load_split,
    make_loader,
    sequence_lengths,
    validation_batches,
)
from higgs_pipeline.training.distributed import Distributed, all_gather_bytes, broadcast_bytes, setup_distributed
from higgs_pipeline.training.lora import trainable_parameters
from higgs_pipeline.training.module import HiggsTrainingModule, build_lora_model, sums_of
from higgs_pipeline.training.objective import LabelCounts, LossSums, label_counts, training_loss
from higgs_pipeline.training.run_lock import RunLock
from higgs_pipeline.training.samples import forward_kwargs, make_collator

log = logging.getLogger("higgs_pipeline.training")

# Exit status of --stop-after-step: a deliberate crash, for tests of resume and of Dagster's retry.
STOP_EXIT_CODE = 75
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RANK_PARAMS_DIR = "rank_params"


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
        "--debug-save-rank-params",
        action="store_true",
        help=f"debug: each rank saves its trainable weights to {RANK_PARAMS_DIR}/rank<N>.safetensors",
    )
    return parser.parse_args(argv)


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

    def advance(self) -> None:
        if self.progress is not None:
            self.progress.update(1)

    def show(self, **postfix: str) -> None:
        """Numbers beside the progress bar."""
        if self.progress is not None:
            self.progress.set_postfix(**postfix)

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
    total = torch.zeros(LossSums.vector_size(codebooks), dtype=torch.float64, device=device)
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
    decision, lock = _decide(args, run_dir, env, config.optim.max_steps)
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
class Decision:
    """Whether this run starts "fresh", is already "finished" (with its summary) or resumes a checkpoint."""

    kind: str
    summary: dict[str, Any] | None = None
    checkpoint: str | None = None
    state: dict[str, Any] | None = None


def _decide(args: argparse.Namespace, run_dir: Path, env: Distributed, max_steps: int):
    """Rank 0 locks the run folder and decides; every rank follows, with rank 0's checkpoint sent as bytes.

    The pods of a multi-node job need not share a disk, and ranks that each looked at their own would disagree
    on whether (and from where) to resume. Returns (Decision, the lock on rank 0 or None).
    """
    header: dict[str, Any] = {}
    stored, lock, decision = None, None, None
    if env.is_main:
        try:
            lock = RunLock(run_dir)
            decision, stored = _rank0_decision(args, run_dir, max_steps)
            header = {"kind": decision.kind, "summary": decision.summary, "checkpoint": decision.checkpoint}
        except Exception as error:  # every rank must hear of it, or ranks on other nodes wait in the broadcast
            header = {"kind": "error", "message": f"{type(error).__name__}: {error}"}
            if lock is not None:
                lock.release()
    header = json.loads(broadcast_bytes(json.dumps(header).encode() if env.is_main else None, env))
    if header["kind"] == "error":
        raise RuntimeError(f"rank 0 could not decide whether to resume: {header['message']}")
    if header["kind"] == "resume":
        state_json = broadcast_bytes(stored.state_json if env.is_main else None, env)
        tensors = broadcast_bytes(stored.tensors if env.is_main else None, env)
        if not env.is_main:
            state = StoredState(state_json, tensors, header["checkpoint"]).load()
            decision = Decision("resume", checkpoint=header["checkpoint"], state=state)
    return decision or Decision(header["kind"], header["summary"], header["checkpoint"]), lock


def _rank0_decision(args: argparse.Namespace, run_dir: Path, max_steps: int) -> tuple[Decision, StoredState | None]:
    """Rank 0's view of the run directory; a checkpoint is read (and checked) here, before anything trains."""
    latest = checkpoint.latest_checkpoint(run_dir)
    if latest is None:
        return Decision("fresh"), None
    if not args.resume:
        raise RuntimeError(f"{run_dir} already has checkpoint {latest.name}: pass --resume or use a new --output-dir")
    if (run_dir / SUMMARY_FILE).exists():
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
        if summary["steps"] >= max_steps:
            return Decision("finished", summary=summary), None
    stored = checkpoint.read_checkpoint(latest)
    return Decision("resume", checkpoint=str(latest), state=stored.load()), stored


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
    module = HiggsTrainingModule(peft_model, torch.bfloat16 if run.precision == "bf16" else None)
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
    train_set: RecordDataset
    validation_set: RecordDataset
    sampler: DistributedLengthBucketSampler
    loader: Any
    validation_loader: Any


def _data(args: argparse.Namespace, config: TrainConfig, env: Distributed, model_config) -> Data:
    """This rank's length-bucketed share of the train split and of the validation split."""
    batch = config.batch
    text_tokenizer = loading.load_text_tokenizer(args.model)
    collator = make_collator(model_config)
    train_records, validation_records = load_split(args.samples, args.split)
    train_set = RecordDataset(train_records, args.token_store, args.tokenizer_id, text_tokenizer)
    validation_set = RecordDataset(validation_records, args.token_store, args.tokenizer_id, text_tokenizer)
    sampler = DistributedLengthBucketSampler(
        sequence_lengths(train_set, model_config),
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
        sequence_lengths(validation_set, model_config) if len(validation_set) else [],
        batch.validation_batch_size,
        env.world_size,
        env.rank,
    )
    return Data(
        train_set,
        validation_set,
        sampler,
        make_loader(train_set, sampler, collator, **loader_options),
        make_loader(validation_set, validation_plan, collator, **loader_options),
    )


@dataclass
class Progress:
    """Where training stands; everything here but `start_step` is saved in a checkpoint."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_val_loss: float = math.inf
    best: dict[str, Any] | None = None
    start_step: int = 0

    def saved(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "best_val_loss": self.best_val_loss, "best": self.best}


def _restore(decision: Decision, parts: Parts, config: TrainConfig, env: Distributed) -> Progress:
    """A resumed run's weights, optimizer, schedule, sampler position and RNG; a fresh run's per-rank seed."""
    if decision.kind != "resume":
        torch.manual_seed(config.run.seed + env.rank)  # dropout differs per rank, like the data does
        return Progress()
    source = decision.checkpoint
    saved = checkpoint.restore_trainable(decision.state, parts.peft_model, source)
    decision.state = None  # the optimizer holds its own copy now; this one would stay on every rank all run
    if saved["world_size"] != env.world_size:
        raise RuntimeError(
            f"{source} was written by {saved['world_size']} processes; resume with the same world size "
            f"(nodes x --nproc_per_node = {saved['world_size']}): the batch plan and effective batch depend on it"
        )
    if saved["config"] != config.to_dict():
        raise RuntimeError(f"{source} was trained with another config: resume with the same one or a new dir")
    parts.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    checkpoint.set_rng_state(saved["rng"][env.rank])
    kept = {key: saved[key] for key in ("epoch", "position", "best_val_loss", "best")}
    return Progress(step=saved["step"], start_step=saved["step"], **kept)


def _run(
    args: argparse.Namespace, config: TrainConfig, env: Distributed, pipes: Any, run_dir: Path, decision: Decision
) -> dict[str, Any]:
    """Setup, then the loop: step, log, validate, checkpoint; then the summary."""
    optim, run = config.optim, config.run
    parts = _build(args, config, env)
    data = _data(args, config, env, parts.model_config)
    progress = _restore(decision, parts, config, env)
    reporter = Reporter(run_dir, env.is_main, pipes, progress.start_step, optim.max_steps)
    _describe(args, config, env, run_dir, parts, data, progress, reporter)

    stream = micro_batches(data.loader, data.sampler, progress.epoch, progress.position)
    tally, totals = Tally(parts.codebooks, env.device), Throughput()
    last_train: dict[str, float] = {}
    last_validation: dict[str, float] = {}
    while progress.step < optim.max_steps:
        grad_norm, learning_rate = _train_step(stream, parts, config, env, tally, progress)
        reporter.advance()
        final = progress.step == optim.max_steps
        if progress.step % run.log_every == 0 or final:
            totals, last_train = _log(tally, totals, progress, optim, env, reporter, grad_norm, learning_rate)
        if len(data.validation_set) and (progress.step % run.eval_every == 0 or final):
            last_validation = _validate(parts, data, optim, env, run_dir, progress, reporter)
        if progress.step % run.checkpoint_every == 0 or final:
            _checkpoint(parts, config, env, run_dir, progress, reporter)
        if args.stop_after_step == progress.step:
            _crash(progress.step, reporter)

    if args.debug_save_rank_params:
        folder = run_dir / RANK_PARAMS_DIR
        folder.mkdir(exist_ok=True)
        safetensors.torch.save_file(
            checkpoint.trainable_weights(parts.peft_model), folder / f"rank{env.rank}.safetensors"
        )
    summary = {}
    if env.is_main:
        summary = _summary(args, config, env, run_dir, parts, progress, totals, last_train, last_validation)
        reporter.info(
            f"done at step {progress.step}: adapter {summary['adapter_path']} (val_loss {summary['val_loss']:.4f})"
        )
    reporter.close()
    dist.barrier()
    return summary


def _effective_batch(config: TrainConfig, env: Distributed) -> int:
    return config.batch.per_device_batch_size * env.world_size * config.batch.grad_accum_steps


def _describe(args, config: TrainConfig, env: Distributed, run_dir: Path, parts: Parts, data: Data, progress, reporter):
    """run.json (rank 0) and the opening log lines: what trains, on what, from where."""
    batch, run = config.batch, config.run
    counts_by_group = trainable_parameters(parts.peft_model)
    effective_batch = _effective_batch(config, env)
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
    start = progress.start_step
    reporter.info(
        f"{'resuming at step ' + str(start) if start else 'starting'}: base model "
        f"{loading.describe(args.model)}, {env.world_size} x {run.device} ({run.backend}, {run.precision}), "
        f"effective batch {'up to ' * bool(batch.max_tokens_per_device)}{effective_batch}, "
        f"{len(data.train_set)} train / {len(data.validation_set)} validation samples"
    )
    if batch.max_tokens_per_device:
        over = data.sampler.over_budget()
        reporter.info(
            f"token budget {batch.max_tokens_per_device} padded positions per device batch (at most "
            f"{batch.per_device_batch_size} samples): {len(data.sampler)} micro-batches per rank in epoch 0"
            + (f"; {over} samples exceed it and train alone" if over else "")
        )
    reporter.info("trainable parameters per group: " + ", ".join(f"{k}={v:,}" for k, v in counts_by_group.items()))


class Throughput(NamedTuple):
    """Non-pad positions, all positions, samples and the seconds they took."""

    tokens: float = 0.0
    positions: float = 0.0
    samples: float = 0.0
    seconds: float = 0.0

    def __add__(self, other: Throughput) -> Throughput:  # type: ignore[override]
        return Throughput(*(a + b for a, b in zip(self, other, strict=True)))


class Tally:
    """What the next log line reports, summed since the previous one.

    Loss sums and the token counts share one float64 buffer (named views into it), so a single all_reduce adds
    up every rank's share of both.
    """

    def __init__(self, codebooks: int, device: torch.device) -> None:
        size = LossSums.vector_size(codebooks)
        self.buffer = torch.zeros(size + 3, dtype=torch.float64, device=device)
        self.losses, self.counts = self.buffer[:size], self.buffer[size:]  # counts: tokens, positions, samples
        self.label_mismatch = torch.zeros((), dtype=torch.bool, device=device)
        self.seconds, self.steps = 0.0, 0

    def add(self, sums: LossSums, result: dict[str, torch.Tensor], samples: int, expected: LabelCounts) -> None:
        device = self.buffer.device
        self.losses += sums.as_vector()
        samples_count = torch.tensor(float(samples), dtype=torch.float64, device=device)
        self.counts += torch.stack([result["tokens"].double(), result["positions"].double(), samples_count])
        text_differs = sums.text_count.double() != expected.text.to(device)
        self.label_mismatch |= text_differs | (sums.audio_count.double() != expected.audio.to(device)).any()

    def reduce(self) -> tuple[LossSums, Throughput, int]:
        """Every rank's sums added up, and the optimizer steps they cover; the next window starts empty."""
        dist.all_reduce(self.buffer)
        if self.label_mismatch.item():
            raise RuntimeError(
                "label counts from the batch differ from the forward's: the loss normalisation would be wrong "
                "(a sample whose first label is not -100?)"
            )
        sums = LossSums.from_vector(self.losses.cpu().clone())
        throughput, steps = Throughput(*self.counts.tolist(), self.seconds), self.steps
        self.buffer.zero_()
        self.seconds, self.steps = 0.0, 0
        return sums, throughput, steps


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


def _log(
    tally: Tally,
    totals: Throughput,
    progress: Progress,
    optim: OptimSettings,
    env: Distributed,
    reporter,
    grad_norm: torch.Tensor,
    learning_rate: float,
) -> tuple[Throughput, dict[str, float]]:
    """A train metrics line over the steps since the last one; returns the run totals and the line's losses."""
    sums, window, steps = tally.reduce()
    train_means = prefixed(sums.means(optim.text_weight, optim.audio_weight), "train")
    record = {
        "step": progress.step,
        "epoch": progress.epoch,
        **train_means,
        "learning_rate": learning_rate,
        "grad_norm": float(grad_norm),
        "tokens_per_second": window.tokens / window.seconds,
        "samples_per_second": window.samples / window.seconds,
        # Varies from step to step under a token budget (batch.max_tokens_per_device).
        "samples_per_step": window.samples / steps,
        "padding_efficiency": window.tokens / window.positions,
        "memory_gb": memory_gb(env.device),
    }
    reporter.metrics(record, "train")
    reporter.show(loss=f"{record['train_loss']:.4f}", tokens_s=f"{window.tokens / window.seconds:.0f}")
    return totals + window, train_means


def _validate(
    parts: Parts, data: Data, optim: OptimSettings, env: Distributed, run_dir: Path, progress: Progress, reporter
) -> dict[str, float]:
    """Validation loss over the whole split; a new best is saved as best_adapter. Returns the metrics line."""
    sums = evaluate(parts.module, data.validation_loader, env.device, parts.codebooks)
    means = sums.means(optim.text_weight, optim.audio_weight)
    result = {"step": progress.step, **prefixed(means, "val")}
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


def _summary(
    args,
    config: TrainConfig,
    env: Distributed,
    run_dir: Path,
    parts: Parts,
    progress: Progress,
    totals: Throughput,
    last_train: dict[str, float],
    last_validation: dict[str, float],
) -> dict[str, Any]:
    """Rank 0: the last adapter and summary.json (written atomically), the numbers the asset reports."""
    last_adapter = checkpoint.save_adapter(parts.peft_model, run_dir / "last_adapter")
    best_adapter = run_dir / "best_adapter"
    step, trained_steps = progress.step, progress.step - progress.start_step
    # val_* describe the adapter that is handed on: the best by validation loss.
    best = progress.best or {}
    summary = {
        "train_loss": last_train.get("train_loss", math.nan),
        "train_text_loss": last_train.get("train_text_loss", math.nan),
        "train_audio_loss": last_train.get("train_audio_loss", math.nan),
        "val_loss": best.get("val_loss", math.nan),
        "val_text_loss": best.get("val_text_loss", math.nan),
        "val_audio_loss": best.get("val_audio_loss", math.nan),
        "val_audio_accuracy": best.get("val_audio_accuracy", math.nan),
        "best_step": best.get("step", step),
        "final_val_loss": last_validation.get("val_loss", math.nan),
        "steps": step,
        "world_size": env.world_size,
        # Under a token budget effective_batch_size is the most a step can hold; samples_per_step is the mean.
        "effective_batch_size": _effective_batch(config, env),
        "token_budget": config.batch.max_tokens_per_device,
        "samples_per_step": totals.samples / trained_steps if trained_steps else math.nan,
        "tokens_per_second": totals.tokens / totals.seconds if totals.seconds else math.nan,
        "padding_efficiency": totals.tokens / totals.positions if totals.positions else math.nan,
        "trainable_parameters": trainable_parameters(parts.peft_model),
        "base_model": loading.describe(args.model),
        "adapter_path": str(best_adapter if best_adapter.exists() else last_adapter),
        "last_adapter_path": str(last_adapter),
        "run_dir": str(run_dir),
        "metrics_path": str(run_dir / METRICS_FILE),
    }
    temporary = run_dir / (SUMMARY_FILE + ".tmp")
    temporary.write_text(json.dumps(summary, indent=2))
    os.replace(temporary, run_dir / SUMMARY_FILE)
    return summary


if __name__ == "__main__":
    main()
