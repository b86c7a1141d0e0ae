"""Whether a training run starts fresh, is already finished, or resumes a checkpoint, and how it resumes.

Rank 0 alone reads the run folder and decides; every other rank follows its decision, with rank 0's
checkpoint sent as bytes: the pods of a multi-node job need not share a disk, and ranks that each looked at
their own would disagree on whether (and from where) to resume.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from higgs_pipeline.training import checkpoint
from higgs_pipeline.training.checkpoint import StoredState
from higgs_pipeline.training.config import TrainConfig
from higgs_pipeline.training.distributed import Distributed, broadcast_bytes
from higgs_pipeline.training.reporting import SUMMARY_FILE
from higgs_pipeline.training.run_lock import RunLock

if TYPE_CHECKING:
    from higgs_pipeline.training.train import Parts


@dataclass
class Decision:
    """Whether this run starts "fresh", is already "finished" (with its summary) or resumes a checkpoint."""

    kind: str
    summary: dict[str, Any] | None = None
    checkpoint: str | None = None
    state: dict[str, Any] | None = None


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


def decide(args: argparse.Namespace, run_dir: Path, env: Distributed, max_steps: int) -> tuple[Decision, Any]:
    """Rank 0 locks the run folder and decides; every rank follows, with rank 0's checkpoint sent as bytes.

    Returns (Decision, the lock on rank 0 or None).
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


def restore(decision: Decision, parts: Parts, config: TrainConfig, env: Distributed) -> Progress:
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
