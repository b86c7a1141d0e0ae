"""Activation checkpointing for the Higgs decoder layers, added from the project's side.

boson_multimodal's `HiggsAudioModel._forward_core` calls its decoder layers directly, with no checkpointing
branch, so `gradient_checkpointing_enable()` saves nothing there. Each layer's `forward` is replaced on the
instance (module names, state-dict keys and PEFT's targets are untouched) by one that recomputes the layer in
the backward pass instead of keeping its activations: the memory lever for the 5.77B model at 2 samples per GPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_decoder_layers(model: nn.Module) -> int:
    """Checkpoint every decoder layer of a (PEFT-wrapped) HiggsAudioModel; returns how many were wrapped."""
    layers = _decoder_layers(model)
    for layer in layers:
        if getattr(layer, "_higgs_checkpointed", False):
            continue
        layer.forward = functools.partial(_checkpointed_forward, layer.forward)
        layer._higgs_checkpointed = True
    return len(layers)


def _checkpointed_forward(original_forward, *args, **kwargs):
    # Only while training with gradients: generation and validation keep the plain (cache-friendly) forward.
    if not torch.is_grad_enabled() or kwargs.get("use_cache"):
        return original_forward(*args, **kwargs)
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, nn.ModuleList) and "audio_tower" not in name:
            return module
    raise ValueError("no decoder `layers` ModuleList found: is this a HiggsAudioModel?")
