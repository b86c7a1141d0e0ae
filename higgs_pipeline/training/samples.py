"""From a ChatML sample and its cached audio codes to the model's batch, with boson_multimodal's own parts.

`prepare_chatml_sample` makes the text tokens and text labels, `ChatMLDatasetSample` holds one sample and
`HiggsAudioSampleCollator` makes the batch (bos/eos and the delay pattern, audio labels, padding). Two
collator facts shape this module:
- it mutates the samples it is given (audio-out text labels set to -100 in place), so a fresh
  `ChatMLDatasetSample` is built for every batch, never cached;
- it indexes waveforms by audio-IN order, so waveforms are given for user/system clips only.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from boson_multimodal.data_collator.higgs_audio_collator import HiggsAudioBatchInput, HiggsAudioSampleCollator
from boson_multimodal.data_types import ChatMLSample
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample, prepare_chatml_sample

from higgs_pipeline.data.records import SampleRecord, TokenStore

# Fields of HiggsAudioBatchInput that HiggsAudioModel.forward takes (the collator also returns `reward`,
# which the forward ignores, and never a `labels` kwarg: the forward computes no loss).
FORWARD_FIELDS = (
    "input_ids",
    "attention_mask",
    "audio_features",
    "audio_feature_attention_mask",
    "audio_in_ids",
    "audio_in_ids_start",
    "audio_out_ids",
    "audio_out_ids_start",
    "audio_out_ids_start_group_loc",
    "label_ids",
    "label_audio_ids",
)


@dataclass(frozen=True)
class AudioInput:
    """One audio content of a sample: its codes `[codebooks, frames]` and, for the Whisper tower, its wave."""

    codes: torch.Tensor
    waveform: torch.Tensor | None = None
    sample_rate: int | None = None


def build_dataset_sample(chatml: ChatMLSample, audio: list[AudioInput], tokenizer) -> ChatMLDatasetSample:
    """Tokenize one ChatML sample and attach its audio codes in the order of its audio contents."""
    input_tokens, label_tokens, audio_contents, _ = prepare_chatml_sample(chatml, tokenizer)
    if input_tokens is None:
        raise ValueError("prepare_chatml_sample could not tokenize the sample (see its log above)")
    if len(audio_contents) != len(audio):
        raise ValueError(f"sample has {len(audio_contents)} audio contents but {len(audio)} audio inputs")
    codes = [item.codes.long() for item in audio]
    starts = torch.tensor([0] + [c.shape[1] for c in codes[:-1]], dtype=torch.long).cumsum(0)
    concat = torch.cat(codes, dim=1) if codes else torch.zeros((0, 0), dtype=torch.long)
    # Waveforms only for clips the model hears (user/system turns), in their order.
    roles = _audio_roles(chatml)
    waves = [(a.waveform, a.sample_rate) for a, role in zip(audio, roles, strict=True) if role != "assistant"]
    waves = [(w, sr) for w, sr in waves if w is not None]
    wave_lengths = [int(w.shape[-1]) for w, _ in waves]
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_tokens, dtype=torch.long),
        label_ids=torch.tensor(label_tokens, dtype=torch.long),
        audio_ids_concat=concat,
        audio_ids_start=starts if codes else torch.zeros(0, dtype=torch.long),
        audio_waveforms_concat=torch.cat([w.float() for w, _ in waves]) if waves else torch.zeros(0),
        audio_waveforms_start=torch.tensor([0] + wave_lengths[:-1], dtype=torch.long).cumsum(0)
        if waves
        else torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.tensor([sr for _, sr in waves], dtype=torch.float32),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


def dataset_sample_for(record: SampleRecord, store: TokenStore, tokenizer) -> ChatMLDatasetSample:
    """A fresh ChatMLDatasetSample for a stored record, its codes read from the token store by clip hash."""
    audio = [AudioInput(store.get(clip["clip_hash"])) for clip in record.audio]
    return build_dataset_sample(record.to_chatml(), audio, tokenizer)


def _audio_roles(chatml: ChatMLSample) -> list[str]:
    roles = []
    for message in chatml.messages:
        contents = message.content if isinstance(message.content, list) else [message.content]
        roles += [message.role for c in contents if getattr(c, "type", None) == "audio"]
    return roles


def make_collator(model_config: Any, whisper_feature_extractor: Any | None = None) -> HiggsAudioSampleCollator:
    """The collator configured from the checkpoint's own config (delay pattern, audio-in tokens, Whisper)."""
    uses_whisper = bool(model_config.encode_whisper_embed) and not model_config.skip_audio_tower
    if uses_whisper and whisper_feature_extractor is None:
        from transformers import WhisperFeatureExtractor

        whisper_feature_extractor = WhisperFeatureExtractor(feature_size=model_config.audio_encoder_config.num_mel_bins)
    return HiggsAudioSampleCollator(
        whisper_processor=SimpleNamespace(feature_extractor=whisper_feature_extractor) if uses_whisper else None,
        encode_whisper_embed=uses_whisper,
        audio_in_token_id=model_config.audio_in_token_idx,
        audio_out_token_id=model_config.audio_out_token_idx,
        audio_stream_bos_id=model_config.audio_stream_bos_id,
        audio_stream_eos_id=model_config.audio_stream_eos_id,
        pad_token_id=model_config.pad_token_id,
        return_audio_in_tokens=bool(model_config.encode_audio_in_tokens),
        use_delay_pattern=bool(model_config.use_delay_pattern),
        audio_num_codebooks=model_config.audio_num_codebooks,
        round_to=8,
    )


def forward_kwargs(batch: HiggsAudioBatchInput, device: torch.device | str) -> dict[str, torch.Tensor | None]:
    """The batch as keyword arguments of HiggsAudioModel.forward, moved to `device`."""
    kwargs = {}
    for name in FORWARD_FIELDS:
        value = getattr(batch, name)
        kwargs[name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
    return kwargs
