"""Adapters and artifact stores for the synthesis and export tests, made with the training code's own parts.

A freshly initialised LoRA has B = 0 and changes nothing; these adapters get random B weights, so the merged
model differs from its base and a round-trip test can tell a merge from a no-op.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from higgs_pipeline.models.loading import load_model
from higgs_pipeline.serving.adapters import adapter_sha256, pointer_path
from higgs_pipeline.training.checkpoint import save_adapter
from higgs_pipeline.training.config import LoraSettings
from higgs_pipeline.training.lora import apply_lora


def make_adapter(folder: Path, seed: int = 0, scale: float = 0.05) -> Path:
    """A LoRA adapter of the demo model (all three decoder groups) with random B weights, saved as training does."""
    torch.manual_seed(seed)
    model = apply_lora(load_model("demo"), LoraSettings(rank=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, scale)
    return save_adapter(model, folder)


def promote(artifacts_root: Path, adapter: Path) -> Path:
    """Write production_adapter's pointer naming `adapter`, as that asset writes it."""
    path = Path(pointer_path(str(artifacts_root)))
    path.parent.mkdir(parents=True, exist_ok=True)
    pointer = {"adapter_path": str(adapter), "base_model": "demo (demo model, random weights)"}
    path.write_text(json.dumps(pointer | {"adapter_sha256": adapter_sha256(str(adapter))}))
    return path


def write_tiny_wavlm(folder: Path) -> Path:
    """A tiny random-weight WavLMForXVector checkpoint with its feature extractor (16 kHz) in `folder`: the WavLM
    speaker-model code path offline, not its quality (24-dimensional x-vectors)."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    config = WavLMConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32),
        conv_stride=(5, 4),
        conv_kernel=(10, 4),
        num_conv_pos_embeddings=16,
        tdnn_dim=(32, 32),
        tdnn_kernel=(3, 1),
        tdnn_dilation=(1, 1),
        xvector_output_dim=24,
    )
    WavLMForXVector(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16_000, return_attention_mask=True).save_pretrained(folder)
    return folder
