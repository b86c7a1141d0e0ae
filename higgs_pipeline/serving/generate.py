"""Speech from a Higgs Audio v2 checkpoint, through boson_multimodal's own serving path.

`HiggsAudioServeEngine` is what the released model is served with: it builds the prompt with
`prepare_chatml_sample`, generates with `HiggsAudioModel.generate` (static KV caches, repetition-aware
sampling), reverts the delay pattern and decodes the codes with the audio tokenizer. It loads a checkpoint
folder, so the caller merges the adapter into its base first (`serving.merge.merge_adapter`).

The prompt is the one the model was trained on (`data/chatml.py`): the system message with its scene, then for
voice cloning the reference transcript as a user turn and the reference audio as an assistant turn, then the
text to say as the last user turn.
"""

from __future__ import annotations

import base64
import copy
import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message, TextContent

from higgs_pipeline.data.audio_io import encode_wav
from higgs_pipeline.data.chatml import DEFAULT_SCENE
from higgs_pipeline.data.chatml import system_prompt as scene_system_prompt
from higgs_pipeline.data.records import SampleRecord
from higgs_pipeline.devices import resolve_device as torch_device
from higgs_pipeline.models.demo import demo_checkpoints, is_demo, offline_hub_cache
from higgs_pipeline.models.loading import resolve_audio_tokenizer

if TYPE_CHECKING:
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

log = logging.getLogger(__name__)
# boson's default stop strings plus the audio end: only the audio is wanted, and what the model says after it
# (text, or a second audio segment that boson then splices onto the first) is not part of the answer.
STOP_STRINGS = ["<|end_of_text|>", "<|eot_id|>", "<|audio_eos|>"]


@dataclass(frozen=True)
class GeneratedClip:
    sample_id: str
    prompt_text: str
    waveform: np.ndarray  # float32 [samples], mono
    sample_rate: int
    audio_frames: int
    # The model emitted its audio end before max_new_tokens (False: the clip was cut off at the limit).
    finished: bool

    @property
    def duration_s(self) -> float:
        return self.waveform.size / self.sample_rate

    def wav_bytes(self) -> bytes:
        return encode_wav(self.waveform, self.sample_rate)


@dataclass(frozen=True)
class VoiceReference:
    """A clip of the voice to clone and its transcript (the model hears the pair as an earlier turn)."""

    audio_path: str  # a LOCAL audio file (callers copy remote clips to a scratch folder first)
    text: str


def open_engine(model_dir: str, audio_tokenizer: str, device: str) -> HiggsAudioServeEngine:
    """boson's serve engine on a checkpoint folder (float32 on CPU, bfloat16 on a GPU).

    `audio_tokenizer` is "demo", a hub id or a folder; the demo tokenizer's HuBERT lookup is answered from the
    demo's own offline hub cache.
    """
    from boson_multimodal.serve.serve_engine import HiggsAudioServeEngine

    device = torch_device(device)
    tokenizer_dir = resolve_audio_tokenizer(audio_tokenizer)
    offline = offline_hub_cache(demo_checkpoints().hub_cache) if is_demo(tokenizer_dir) else nullcontext()
    with offline:
        engine = HiggsAudioServeEngine(
            model_dir,
            tokenizer_dir,
            device=device,
            torch_dtype=torch.float32 if device == "cpu" else torch.bfloat16,
        )
    _decode_empty_as_silence(engine.audio_tokenizer)
    return engine


def _decode_empty_as_silence(audio_tokenizer) -> None:
    """A model that ends its audio inside the codebook delay pattern leaves zero frames, which the codec's
    convolutions cannot decode (boson's engine then raises from deep inside torch). Such a take is silence: one
    frame of zeros, so it is scored (and counted) as a silent take instead of failing the whole command or run."""
    decode = audio_tokenizer.decode

    def decode_or_silence(vq_code: torch.Tensor):
        if vq_code.shape[-1] == 0:
            return np.zeros((1, 1, int(audio_tokenizer.hop_length)), dtype=np.float32)
        return decode(vq_code)

    audio_tokenizer.decode = decode_or_silence


def speech_prompt(
    text: str,
    reference: VoiceReference | None = None,
    system_prompt: str | None = None,
    history: Sequence[GeneratedClip] = (),
) -> ChatMLSample:
    """The ChatML conversation that asks for `text`: system, [reference turn], [earlier turns], the text.

    `history` holds clips generated earlier in the same piece (long-form generation): each becomes a user turn
    with its text and an assistant turn with its audio, so the next chunk continues in the same voice and pace.
    """
    messages = [Message("system", system_prompt or scene_system_prompt(DEFAULT_SCENE))]
    if reference is not None:
        messages += [
            Message("user", TextContent(reference.text)),
            Message("assistant", AudioContent(audio_url=reference.audio_path)),
        ]
    for clip in history:
        audio = base64.b64encode(clip.wav_bytes()).decode("ascii")
        messages += [
            Message("user", TextContent(clip.prompt_text)),
            Message("assistant", AudioContent(audio_url="", raw_audio=audio)),
        ]
    messages.append(Message("user", TextContent(text)))
    return ChatMLSample(messages=messages)


def generate_speech(
    engine: HiggsAudioServeEngine,
    text: str,
    reference: VoiceReference | None = None,
    *,
    seed: int,
    temperature: float,
    max_new_tokens: int,
    sample_id: str = "",
    system_prompt: str | None = None,
    history: Sequence[GeneratedClip] = (),
) -> GeneratedClip:
    """`text` spoken by the engine's model (in the reference's voice when given), audio generation forced."""
    if not text.strip():
        raise ValueError(f"sample {sample_id or '(unnamed)'}: the text to speak is empty")
    prompt = speech_prompt(text, reference, system_prompt, history)
    return _generate(engine, prompt, text, sample_id, seed, temperature, max_new_tokens)


def _generate(
    engine: HiggsAudioServeEngine,
    prompt: ChatMLSample,
    text: str,
    sample_id: str,
    seed: int,
    temperature: float,
    max_new_tokens: int,
) -> GeneratedClip:
    response = engine.generate(
        copy.deepcopy(prompt),  # the collator mutates what it is given
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        force_audio_gen=True,
        seed=seed,
        stop_strings=STOP_STRINGS,
    )
    if response.audio is None:
        raise RuntimeError(f"sample {sample_id or '(unnamed)'}: the model generated no audio tokens")
    audio_end = engine.model.config.audio_eos_token_id
    return GeneratedClip(
        sample_id=sample_id,
        prompt_text=text,
        waveform=np.asarray(response.audio, dtype=np.float32),
        sample_rate=int(response.sampling_rate),
        audio_frames=int(response.generated_audio_tokens.shape[-1]),
        finished=bool(np.any(np.asarray(response.generated_text_tokens) == audio_end)),
    )


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
    fixed seed). The prompts are the records' own conversations, as they were trained."""
    engine = open_engine(model_dir, audio_tokenizer_dir, device)
    clips = []
    for index, record in enumerate(prompts):
        log.info("generating clip %d/%d (sample %s)", index + 1, len(prompts), record.sample_id)
        prompt = prompt_of(record)
        clips.append(_generate(engine, prompt, _text_of(prompt), record.sample_id, seed, temperature, max_new_tokens))
    return clips
