"""Full training checkpoints, written atomically, so a killed run (or a retried Dagster job) resumes exactly.

A checkpoint is a folder `checkpoints/step-00000020/` holding
- `adapter/`: the PEFT adapter at that step (usable on its own with PeftModel.from_pretrained);
- `trainer.pt`: trainable weights, optimizer, scheduler, step, sampler epoch/position, best validation
  loss and the RNG states of every rank.
It is written under a temporary name and renamed into place: a folder named `step-*` is always complete.
"""

from __future__ import annotations

import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

CHECKPOINTS = "checkpoints"
# What a finished run publishes to a remote artifact store (checkpoints stay where training ran).
PUBLISHED = ("best_adapter", "last_adapter", "tensorboard", "metrics.jsonl", "summary.json", "run.json")


def publish(run_dir: Path, remote: str) -> None:
    """Copy the run's outputs (not its checkpoints) to `remote` (any fsspec URL), file by file."""
    fs, _ = fsspec.core.url_to_fs(remote)
    for name in PUBLISHED:
        source = run_dir / name
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            fs.put_file(str(path), f"{remote}/{path.relative_to(run_dir).as_posix()}")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def replace_dir(temporary: Path, final: Path) -> None:
    """Move a fully written folder into place; an older folder of that name is swapped out, then removed."""
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(temporary, final)
    shutil.rmtree(old, ignore_errors=True)


def temporary_dir(final: Path) -> Path:
    path = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    path.mkdir(parents=True)
    return path


def save_adapter(peft_model, final: Path, extra_files: dict[str, str] | None = None) -> Path:
    """PEFT layout (adapter_config.json + adapter_model.safetensors), atomically."""
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_dir(final)
    peft_model.save_pretrained(str(temporary))
    for name, text in (extra_files or {}).items():
        (temporary / name).write_text(text)
    replace_dir(temporary, final)
    return final


def save_checkpoint(run_dir: Path, step: int, peft_model, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step` (rank 0 only) and drop all but the newest `keep`."""
    final = run_dir / CHECKPOINTS / f"step-{step:08d}"
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_dir(final)
    peft_model.save_pretrained(str(temporary / "adapter"))
    trainable = {n: p.detach().cpu() for n, p in peft_model.named_parameters() if p.requires_grad}
    torch.save({**state, "step": step, "trainable": trainable}, temporary / "trainer.pt")
    replace_dir(temporary, final)
    for stale in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    return sorted(folder.glob("step-*")) if folder.exists() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The whole trainer state of checkpoint `path`, trainable weights included (on CPU)."""
    # Our own file: it holds numpy RNG state, which the safe weights-only loader refuses.
    return torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)


def restore_trainable(state: dict[str, Any], peft_model, source: str) -> dict[str, Any]:
    """Trainable weights of a read checkpoint back into `peft_model`; returns the rest of the trainer state."""
    parameters = dict(peft_model.named_parameters())
    missing = sorted(set(state["trainable"]) - set(parameters))
    if missing:
        raise ValueError(f"checkpoint {source}: parameters {missing[:3]} are not in this model; wrong run dir?")
    rest = {key: value for key, value in state.items() if key != "trainable"}
    with torch.no_grad():
        for name, value in state["trainable"].items():
            parameters[name].copy_(value)
    return rest
