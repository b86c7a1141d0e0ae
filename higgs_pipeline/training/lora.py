"""LoRA on Higgs Audio v2 with PEFT: targets discovered from the model's own module names.

Two PEFT details decide what gets trained:
- no `task_type`: CAUSAL_LM wraps the model in PeftModelForCausalLM, which injects LM arguments (`labels`,
  `inputs_embeds`, ...) that HiggsAudioModel.forward does not take;
- `target_modules` is a regex, which PEFT full-matches against module names. A plain ["q_proj", ...] list is
  suffix-matched: it also wraps the Whisper tower's projections (`audio_tower.layers.N.self_attn.q_proj`), and
  "mlp.gate_proj" would match "audio_mlp.gate_proj" too. Anchoring on `layers.N.` of the decoder avoids both.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from higgs_pipeline.training.config import LoraSettings

log = logging.getLogger(__name__)

# The decoder's LoRA groups, as patterns on the module path after `layers.N.`.
LORA_GROUPS = {
    "attention": r"self_attn\.(q|k|v|o)_proj",
    "mlp": r"mlp\.(gate|up|down)_proj",
    "audio_mlp": r"audio_mlp\.(gate|up|down)_proj",
}
# Whole modules that can be trained in full (new languages, new voices): the audio codebook embeddings and
# the output heads of HiggsAudioDecoderProjector.
SAVABLE_MODULES = ("audio_codebook_embeddings", "audio_lm_head", "text_lm_head")


def target_regex(groups: tuple[str, ...] | list[str]) -> str:
    """The full-match regex over decoder module names for the chosen groups."""
    unknown = sorted(set(groups) - set(LORA_GROUPS))
    if unknown or not groups:
        raise ValueError(f"LoRA groups {unknown or list(groups)}: choose from {sorted(LORA_GROUPS)}")
    alternatives = "|".join(LORA_GROUPS[group] for group in groups)
    return rf"^layers\.\d+\.({alternatives})$"


def group_of(module_name: str) -> str | None:
    """Which LoRA group a (base or PEFT-wrapped) module name belongs to, if any."""
    match = re.search(r"(?:^|\.)layers\.\d+\.(.+?)(?:\.lora_\w+.*|\.base_layer.*)?$", module_name)
    if match is None:
        return None
    path = match.group(1)
    for group, pattern in LORA_GROUPS.items():
        if re.fullmatch(pattern, path):
            return group
    return None


def target_modules(model: torch.nn.Module, groups: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the Linear modules the regex selects; every chosen group must select at least one."""
    pattern = re.compile(target_regex(groups))
    names = [n for n, m in model.named_modules() if pattern.fullmatch(n) and isinstance(m, torch.nn.Linear)]
    found = Counter(group_of(name) for name in names)
    missing = [group for group in groups if found[group] == 0]
    if missing:
        raise ValueError(f"LoRA groups {missing} match no module of this model: drop them from lora.groups")
    return names


def apply_lora(model: torch.nn.Module, settings: LoraSettings) -> PeftModel:
    """Freeze the base, wrap the chosen modules with fp32 LoRA adapters (and fp32 copies of modules_to_save)."""
    names = target_modules(model, settings.groups)
    for name in settings.modules_to_save:
        if name not in SAVABLE_MODULES:
            raise ValueError(f"lora.modules_to_save: '{name}' is not one of {SAVABLE_MODULES}")
    model.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target_regex(settings.groups),
        modules_to_save=list(settings.modules_to_save) or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    if wrapped != set(names):
        raise RuntimeError(f"PEFT wrapped {sorted(wrapped ^ set(names))} differently from the discovered targets")
    # Trainable weights stay fp32 whatever the frozen base is (bf16 on GPU): updates smaller than bf16's
    # resolution would otherwise be lost.
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameter counts per LoRA group and per fully trained module, plus the total."""
    counts: Counter[str] = Counter()
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        saved = next((m for m in SAVABLE_MODULES if f"{m}.modules_to_save" in name), None)
        counts[saved or group_of(name) or "other"] += parameter.numel()
    counts["total"] = sum(counts.values())
    return dict(counts)


def load_adapter(base_model: torch.nn.Module, adapter_path: str, trainable: bool = False) -> PeftModel:
    """A saved adapter on a base model, with plain PEFT (what any consumer of the adapter would do).

    A local folder must hold adapter_model.safetensors: without it PEFT falls back to a pickled
    adapter_model.bin, and a file planted in an artifact store must never be unpickled.
    """
    folder = Path(adapter_path)
    if folder.is_dir() and not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        raise ValueError(
            f"adapter {adapter_path}: no {SAFETENSORS_WEIGHTS_NAME}; only safetensors adapters are loaded "
            f"(a pickled adapter_model.bin could run code): re-train or re-save the adapter with PEFT"
        )
    return PeftModel.from_pretrained(base_model, adapter_path, is_trainable=trainable)


def recorded_base(adapter_config: dict) -> str | None:
    """The base model PEFT recorded in an adapter's adapter_config.json, when it can be used on this machine.

    None when nothing is recorded, or when the record is a folder this machine lacks (an adapter trained
    elsewhere records that machine's folder, e.g. the demo's build cache): the caller's own base then names the
    same model here.
    """
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded or (os.path.isabs(recorded) and not os.path.isdir(recorded)):
        return None
    return recorded
