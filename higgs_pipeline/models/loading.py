"""One way to load a Higgs Audio v2 model, its text tokenizer and its audio tokenizer.

The embedded demo checkpoints and the released ones (a hub id or a local folder) go through the same calls:
`HiggsAudioModel.from_pretrained`, `AutoTokenizer.from_pretrained` and boson_multimodal's
`load_higgs_audio_tokenizer`. The only demo-specific step is resolving the name "demo" to the built folder.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch

from higgs_pipeline.models.demo import DEMO_NOTE, demo_checkpoints, is_demo, offline_hub_cache

DEMO = "demo"
RELEASED_MODEL = "bosonai/higgs-audio-v2-generation-3B-base"
RELEASED_AUDIO_TOKENIZER = "bosonai/higgs-audio-v2-tokenizer"

log = logging.getLogger(__name__)


def resolve_model(name_or_path: str) -> str:
    """ "demo" -> the built tiny model folder; anything else (hub id or folder) is passed through."""
    return str(demo_checkpoints().model) if name_or_path == DEMO else name_or_path


def resolve_audio_tokenizer(name_or_path: str) -> str:
    """ "demo" -> the built tiny audio tokenizer folder; anything else is passed through."""
    return str(demo_checkpoints().audio_tokenizer) if name_or_path == DEMO else name_or_path


def is_demo_model(name_or_path: str) -> bool:
    """True for "demo" and for any folder the demo builder marked (a model, a tokenizer or a merged model):
    the one test behind every "demo model, random weights" label. Builds nothing."""
    return name_or_path == DEMO or is_demo(name_or_path)


def describe(name_or_path: str) -> str:
    """A label for logs and metadata that never lets a demo checkpoint pass for a real one."""
    return f"{name_or_path} ({DEMO_NOTE})" if is_demo_model(name_or_path) else name_or_path


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """HiggsAudioModel exactly as the checkpoint configures it (delay pattern, audio tower, ... untouched)."""
    from boson_multimodal.model.higgs_audio import HiggsAudioModel

    path = resolve_model(name_or_path)
    if is_demo(path):
        log.warning("Loading %s from %s", DEMO_NOTE, path)
    model = HiggsAudioModel.from_pretrained(path, torch_dtype=dtype)
    return model.to(device)


def load_text_tokenizer(name_or_path: str):
    """The text tokenizer shipped in the model folder (as in the released checkpoint)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(name_or_path))


def load_audio_tokenizer(name_or_path: str, device: str | torch.device = "cpu"):
    """boson_multimodal's HiggsAudioTokenizer through its own loader.

    For the demo tokenizer the loader's hub lookup of bosonai/hubert_base is answered from the demo's own
    offline cache entry.
    """
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import load_higgs_audio_tokenizer

    path = resolve_audio_tokenizer(name_or_path)
    demo = is_demo(path)
    if demo:
        log.warning("Loading audio tokenizer: %s from %s", DEMO_NOTE, path)
    context = offline_hub_cache(demo_checkpoints().hub_cache) if demo else nullcontext()
    with context:
        return load_higgs_audio_tokenizer(path, device=str(device))


def tokenizer_id(name_or_path: str) -> str:
    """A stable identifier of the audio tokenizer, used to key cached codes."""
    path = Path(resolve_audio_tokenizer(name_or_path))
    if path.exists():
        return f"{path.parent.name}/{path.name}" if is_demo(path) else str(path)
    return name_or_path
