"""Audio for a few fixed validation prompts, through boson_multimodal's own serving path.

`HiggsAudioServeEngine` is what the released model is served with: it builds the prompt with
`prepare_chatml_sample`, generates with `HiggsAudioModel.generate` (static KV caches, repetition-aware
sampling), reverts the delay pattern and decodes the codes with the audio tokenizer. It loads a checkpoint
folder, so the caller merges the adapter into its base first (`training.export.merge_and_export`).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch
from boson_multimodal.data_types import ChatMLSample

from higgs_pipeline.data.records import SampleRecord
from higgs_pipeline.models.demo import demo_checkpoints, is_demo, offline_hub_cache


@dataclass(frozen=True)
class GeneratedClip:
    sample_id: str
    prompt_text: str
    waveform: np.ndarray  # float32 [samples], mono
    sample_rate: int
    audio_frames: int

    def wav_bytes(self) -> bytes:
        buffer = io.BytesIO()
        sf.write(buffer, self.waveform, self.sample_rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()


def generation_prompts(records: Sequence[SampleRecord], count: int) -> list[SampleRecord]:
    """The first `count` text-to-speech validation records (split order, so the same prompts every time).

    Voice-clone prompts carry a reference clip that the serve engine reads with librosa from a local path,
    which an s3:// corpus cannot give it; text-only prompts work everywhere.
    """
    return [record for record in records if record.kind == "tts"][:count]


def prompt_of(record: SampleRecord) -> ChatMLSample:
    """The record's conversation without its final assistant audio turn: what the model is asked to say."""
    sample = record.to_chatml()
    messages = list(sample.messages)
    while messages and messages[-1].role == "assistant":
        messages.pop()
    if not messages:
        raise ValueError(f"sample {record.sample_id}: no prompt left once the assistant turn is removed")
    return ChatMLSample(messages=messages)


def _text_of(sample: ChatMLSample) -> str:
    user = [m for m in sample.messages if m.role == "user"]
    content = user[-1].content if user else ""
    parts = content if isinstance(content, list) else [content]
    return " ".join(p if isinstance(p, str) else getattr(p, "text", "") or "" for p in parts).strip()


def generate_clips(
    model_dir: str,
    audio_tokenizer_dir: str,
    prompts: Sequence[SampleRecord],
    max_new_tokens: int,
    temperature: float,
    seed: int,
    device: str,
) -> list[GeneratedClip]:
    """One clip per prompt from the checkpoint in `model_dir` (weights and text tokenizer; audio generation forced,
    fixed seed)."""
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    # The demo audio tokenizer's loader looks up its HuBERT on the hub; the demo answers from its own cache.
    offline = offline_hub_cache(demo_checkpoints().hub_cache) if is_demo(audio_tokenizer_dir) else nullcontext()
    with offline:
        engine = HiggsAudioServeEngine(
            model_dir,
            audio_tokenizer_dir,
            device=device,
            torch_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
        )
    clips = []
    for record in prompts:
        prompt = prompt_of(record)
        response = engine.generate(
            copy.deepcopy(prompt),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            force_audio_gen=True,
            seed=seed,
        )
        if response.audio is None:
            raise RuntimeError(f"sample {record.sample_id}: the model generated no audio tokens")
        clips.append(
            GeneratedClip(
                sample_id=record.sample_id,
                prompt_text=_text_of(prompt),
                waveform=np.asarray(response.audio, dtype=np.float32),
                sample_rate=int(response.sampling_rate),
                audio_frames=int(response.generated_audio_tokens.shape[-1]),
            )
        )
    return clips
