"""The module DDP wraps: one forward = the Higgs forward on a collated batch + the objective's sums.

DDP only synchronises gradients of a forward that goes through the DDP wrapper; calling the inner Higgs model
and wrapping something else leaves every rank training its own copy. So the whole forward lives here, and the
trainer calls `DistributedDataParallel(HiggsTrainingModule(...))(**batch)`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from higgs_pipeline.models import loading
from higgs_pipeline.training.config import LoraSettings
from higgs_pipeline.training.lora import apply_lora
from higgs_pipeline.training.objective import LossSums, loss_sums

SUM_FIELDS = ("text_loss_sum", "text_correct", "text_count", "audio_loss_sum", "audio_correct", "audio_count")


PRECISIONS = ("fp32", "bf16")  # a run's `precision`: fp32 throughout, or a bf16 base under bf16 autocast


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype (and the base's dtype) of a `precision`; None for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    return torch.bfloat16 if precision == "bf16" else None


def base_dtype(precision: str) -> torch.dtype:
    """The dtype the base model is loaded in for a `precision` (training and the evaluation's loss pass alike)."""
    return autocast_dtype(precision) or torch.float32


def precision_of(module: HiggsTrainingModule) -> str:
    """The `precision` name of a module's autocast dtype (what a validation line records)."""
    return "fp32" if module.autocast_dtype is None else "bf16"


class HiggsTrainingModule(nn.Module):
    """(PEFT-wrapped) HiggsAudioModel -> loss sums and token counts, under bf16 autocast when asked.

    Float32 inputs (Whisper features) are cast to the base's dtype explicitly: autocast covers the matmuls but
    not every op the audio tower applies to its input.
    """

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def forward(self, **batch: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if self.autocast_dtype is not None and batch.get("audio_features") is not None:
            batch["audio_features"] = batch["audio_features"].to(self.autocast_dtype)
        device_type = batch["input_ids"].device.type
        autocast = (
            torch.autocast(device_type, dtype=self.autocast_dtype) if self.autocast_dtype is not None else nullcontext()
        )
        with autocast:
            outputs = self.model(**batch)
        sums = loss_sums(outputs, batch.get("label_audio_ids"))
        result = {name: getattr(sums, name) for name in SUM_FIELDS}
        # Non-pad positions of the merged sequence vs all positions: the padding efficiency.
        result["tokens"] = outputs.attention_mask.sum()
        result["positions"] = torch.tensor(outputs.attention_mask.numel(), device=outputs.attention_mask.device)
        return result


def sums_of(result: dict[str, torch.Tensor]) -> LossSums:
    return LossSums(*(result[name] for name in SUM_FIELDS))


def build_lora_model(model_name: str, lora: LoraSettings, precision: str, device: torch.device | str):
    """Base model in bf16 (GPU) or fp32 with LoRA applied (fp32 adapters), on `device`, in training mode."""
    base = loading.load_model(model_name, dtype=base_dtype(precision), device="cpu")
    # from_pretrained returns eval mode: the base's own dropout (attention_dropout) would stay off until the
    # first validation put everything in train mode, so steps before and after it would train differently.
    return apply_lora(base, lora).to(device).train()
