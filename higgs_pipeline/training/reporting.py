"""What rank 0 of a training run tells its reader: log lines (also streamed through Dagster Pipes), the metrics
JSONL, TensorBoard, a progress bar, `run.json` at the start and `summary.json` at the end.

The numbers come from every rank: `Tally` sums losses and token counts in one buffer so a single all_reduce
adds up every rank's share, and the log line reports the steps since the previous one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import psutil
import torch
import torch.distributed as dist
from tqdm import tqdm

from higgs_pipeline.files import write_atomic, write_json
from higgs_pipeline.models import loading
from higgs_pipeline.training.config import OptimSettings, TrainConfig
from higgs_pipeline.training.distributed import Distributed
from higgs_pipeline.training.lora import trainable_parameters
from higgs_pipeline.training.objective import LabelCounts, LossSums

if TYPE_CHECKING:
    from higgs_pipeline.training.resume import Progress
    from higgs_pipeline.training.train import Data, Parts

log = logging.getLogger("higgs_pipeline.training")

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RUN_FILE = "run.json"


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
        """One line appended to the metrics JSONL (a resumed run first cuts it back) and TensorBoard scalars."""
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
    write_atomic(str(path), "".join(line + "\n" for line in kept))


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


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return psutil.Process().memory_info().rss / 2**30


def prefixed(means: dict[str, float], prefix: str) -> dict[str, float]:
    renamed = {"total_loss": "loss"}
    return {f"{prefix}_{renamed.get(k, k)}": v for k, v in means.items()}


def effective_batch(config: TrainConfig, env: Distributed) -> int:
    return config.batch.per_device_batch_size * env.world_size * config.batch.grad_accum_steps


def describe(
    args: argparse.Namespace,
    config: TrainConfig,
    env: Distributed,
    run_dir: Path,
    parts: Parts,
    data: Data,
    progress: Progress,
    reporter: Reporter,
) -> None:
    """run.json (rank 0) and the opening log lines: what trains, on what, from where."""
    batch, run = config.batch, config.run
    counts_by_group = trainable_parameters(parts.peft_model)
    effective = effective_batch(config, env)
    if env.is_main:
        run_info = {
            "config": config.to_dict(),
            "profile": args.profile,
            "base_model": loading.describe(args.model),
            "world_size": env.world_size,
            "effective_batch_size": effective,
            "trainable_parameters": counts_by_group,
            "inputs": {"samples": args.samples, "split": args.split, "token_store": args.token_store},
        }
        write_json(str(run_dir / RUN_FILE), run_info)
    start = progress.start_step
    reporter.info(
        f"{'resuming at step ' + str(start) if start else 'starting'}: base model "
        f"{loading.describe(args.model)}, {env.world_size} x {run.device} ({run.backend}, {run.precision}), "
        f"effective batch {'up to ' * bool(batch.max_tokens_per_device)}{effective}, "
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


def log_window(
    tally: Tally,
    totals: Throughput,
    progress: Progress,
    optim: OptimSettings,
    env: Distributed,
    reporter: Reporter,
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


def write_summary(
    args: argparse.Namespace,
    config: TrainConfig,
    env: Distributed,
    run_dir: Path,
    peft_model: Any,
    progress: Progress,
    totals: Throughput,
    last_train: dict[str, float],
    last_validation: dict[str, float],
    last_adapter: Path,
    startup_seconds: float = math.nan,
) -> dict[str, Any]:
    """Rank 0: summary.json (written atomically), the numbers the asset reports. `startup_seconds`: launch to
    the first optimizer step of this process (NaN when it took none)."""
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
        "effective_batch_size": effective_batch(config, env),
        "token_budget": config.batch.max_tokens_per_device,
        "samples_per_step": totals.samples / trained_steps if trained_steps else math.nan,
        "tokens_per_second": totals.tokens / totals.seconds if totals.seconds else math.nan,
        "padding_efficiency": totals.tokens / totals.positions if totals.positions else math.nan,
        "trainable_parameters": trainable_parameters(peft_model),
        "base_model": loading.describe(args.model),
        "adapter_path": str(best_adapter if best_adapter.exists() else last_adapter),
        "last_adapter_path": str(last_adapter),
        "run_dir": str(run_dir),
        "metrics_path": str(run_dir / METRICS_FILE),
        "startup_seconds": startup_seconds,
    }
    write_json(str(run_dir / SUMMARY_FILE), summary)
    return summary
