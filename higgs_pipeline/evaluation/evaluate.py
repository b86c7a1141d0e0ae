"""Validation losses of an adapter and of its base model, measured on the same batches in the same order.

Both passes use the training code's own parts (records -> `dataset_sample_for` -> `make_collator` ->
`forward_kwargs` -> `HiggsTrainingModule`, in the run's precision), so the numbers mean exactly what the training
log's `val_*` mean.
The base is the very same loaded model with the adapter switched off (`PeftModel.disable_adapter`), so the two
passes cannot differ in anything but the adapter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
import torch

from higgs_pipeline.data.records import SampleRecord, TokenStore, is_local
from higgs_pipeline.training.data import load_split
from higgs_pipeline.training.lora import recorded_base
from higgs_pipeline.training.module import HiggsTrainingModule, autocast_dtype, sums_of
from higgs_pipeline.training.objective import LossSums
from higgs_pipeline.training.samples import dataset_sample_for, forward_kwargs, make_collator

NUM_CODEBOOKS = 8
# The numbers recorded as metadata, under stable names so the UI's Plots tab draws them across runs.
RECORDED = ("text_loss", "text_accuracy", "audio_loss", "audio_accuracy", "total_loss") + tuple(
    f"audio_loss_cb{index}" for index in range(NUM_CODEBOOKS)
)


@dataclass(frozen=True)
class LossComparison:
    """`LossSums.means()` of the adapter and of the base model on the same validation batches."""

    adapter: dict[str, float]
    base: dict[str, float]
    samples: int

    @property
    def improvement(self) -> float:
        """How much lower the adapter's total validation loss is than the base model's (positive = better)."""
        return self.base["total_loss"] - self.adapter["total_loss"]

    def recorded(self) -> dict[str, float]:
        """`val_<name>` for the adapter, `base_val_<name>` for the base model, and `improvement`."""
        numbers = {f"val_{name}": self.adapter[name] for name in RECORDED}
        numbers |= {f"base_val_{name}": self.base[name] for name in RECORDED}
        numbers["improvement"] = self.improvement
        return numbers

    def per_codebook(self) -> list[dict[str, float | int]]:
        """One row per codebook: loss and accuracy of adapter and base."""
        return [
            {
                "codebook": index,
                "val_loss": self.adapter[f"audio_loss_cb{index}"],
                "base_val_loss": self.base[f"audio_loss_cb{index}"],
                "val_accuracy": self.adapter[f"audio_accuracy_cb{index}"],
                "base_val_accuracy": self.base[f"audio_accuracy_cb{index}"],
            }
            for index in range(NUM_CODEBOOKS)
        ]


def validation_records(samples_path: str, split_path: str) -> list[SampleRecord]:
    """The validation records in the split file's order (a fixed order: every evaluation sees the same batches)."""
    records = load_split(samples_path, split_path)[1]
    if not records:
        raise ValueError(f"split {split_path}: the validation split is empty; re-materialize train_val_split")
    return records


@torch.no_grad()
def validation_losses(
    model: torch.nn.Module,
    records: Sequence[SampleRecord],
    store: TokenStore,
    tokenizer,
    batch_size: int,
    device: str | torch.device,
    precision: str = "fp32",
) -> dict[str, float]:
    """Next-token losses summed over all validation batches, then averaged once (exact mean over the split)."""
    collator = make_collator(model.config)
    batches = validation_batches(records, batch_size)
    sums = [batch_loss_sums(model, collator, batch, store, tokenizer, device, precision) for batch in batches]
    return summed(sums).means()


def validation_batches(records: Sequence[SampleRecord], batch_size: int) -> list[Sequence[SampleRecord]]:
    """The records in slices of `batch_size`, in their order: the batches every pass (and every rank) measures."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [records[start : start + batch_size] for start in range(0, len(records), batch_size)]


@torch.no_grad()
def batch_loss_sums(
    model: torch.nn.Module,
    collator,
    records: Sequence[SampleRecord],
    store: TokenStore,
    tokenizer,
    device: str | torch.device,
    precision: str = "fp32",
) -> LossSums:
    """The loss sums of one validation batch (`make_collator(model.config)` as `collator`), through the module
    training validates with, in its `precision` (a bf16 one expects a bf16 model, as training loads it)."""
    # Fresh samples every pass: the collator mutates the samples it is given.
    batch = collator([dataset_sample_for(record, store, tokenizer) for record in records])
    return sums_of(HiggsTrainingModule(model, autocast_dtype(precision))(**forward_kwargs(batch, device)))


def summed(sums: Sequence[LossSums]) -> LossSums:
    """Batches' sums added in their order, in float64: the same numbers however the batches were shared out."""
    if not sums:
        raise ValueError("no validation records to evaluate")
    total = sums[0]
    for other in sums[1:]:
        total = total + other  # LossSums adds as float64 vectors
    return total


def compare_with_base(
    model, records: Sequence[SampleRecord], store: TokenStore, tokenizer, batch_size: int, device: str | torch.device
) -> LossComparison:
    """Losses of a PeftModel with its adapter on, and off (the base model), over the same batches."""
    model.eval()
    with model.disable_adapter():
        base = validation_losses(model, records, store, tokenizer, batch_size, device)
    adapter = validation_losses(model, records, store, tokenizer, batch_size, device)
    return LossComparison(adapter=adapter, base=base, samples=len(records))


def base_model_of(adapter_dir: str, fallback: str) -> str:
    """The base checkpoint PEFT recorded for the adapter, or `fallback` when that folder is not on this machine.

    An adapter trained on another machine records that machine's folder (the demo's build cache, a mounted
    checkpoint); the checkpoints resource then names the same model here.
    """
    with fsspec.open(f"{adapter_dir}/adapter_config.json", "r") as handle:
        return recorded_base(json.load(handle)) or fallback


def local_folder(path: str, scratch: str) -> str:
    """`path` itself when it is on this machine; else a copy under `scratch` (PEFT and the serve engine read
    local folders only)."""
    if is_local(path):
        return fsspec.core.url_to_fs(path)[1]
    fs, root = fsspec.core.url_to_fs(path)
    target = os.path.join(scratch, os.path.basename(root.rstrip("/")))
    fs.get(root.rstrip("/") + "/", target + "/", recursive=True)
    return target
