"""Synthetic TTS data and random real-size models for bench_train_gpu.py (benchmark helper, not pipeline code).

The real checkpoints cannot be downloaded where this project is developed, and a throughput benchmark needs only
the right shapes: TTS samples of realistic length built as boson_multimodal ChatMLDatasetSample objects with the
model config's own audio token ids, waveforms of the samples' length for the naive on-the-fly tokenizer, and a
HiggsAudioTokenizer of the released architecture (HuBERT-base-shaped semantic model) with random weights.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from boson_multimodal.dataset.chatml_dataset import ChatMLDatasetSample

from higgs_pipeline.models.demo import CONFIG_DIR, _build_hubert, offline_hub_cache

IGNORE_INDEX = -100
CODES_PER_SECOND = 25
TEXT_TOKENS = (30, 60)  # system + user text tokens per sample
AUDIO_SECONDS = (4.0, 12.0)
SYSTEM_TOKENS = 8  # of the TEXT_TOKENS, the system prompt's share
HEADER_TOKENS = 4  # <|start_header_id|> role <|end_header_id|> "\n\n", as the Llama-3 template tokenizes it

# The released bosonai/higgs-audio-v2-tokenizer's architecture (weights are random here).
REAL_AUDIO_TOKENIZER = json.loads((CONFIG_DIR / "higgs_audio_v2_tokenizer_layout.json").read_text())
# HuBERT-base's architecture (bosonai/hubert_base is a HuBERT base): 12 layers, 768 hidden, 3072 FFN, 7 convs of 512.
HUBERT_BASE = {
    "model_type": "hubert",
    "architectures": ["HubertModel"],
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "conv_dim": [512] * 7,
    "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
    "feat_extract_norm": "group",
    "do_stable_layer_norm": False,
}


@dataclass(frozen=True)
class SampleSpec:
    """One synthetic TTS sample: its prompt text ids (system, user) and how long its audio is."""

    index: int
    system_ids: tuple[int, ...]
    user_ids: tuple[int, ...]
    seconds: float


def sample_specs(count: int, config, seed: int) -> list[SampleSpec]:
    """`count` TTS samples with 30-60 text tokens and 4-12 s of audio, text ids that are no special token."""
    generator = torch.Generator().manual_seed(seed)
    pool = ordinary_token_ids(config)
    specs = []
    for index in range(count):
        text = int(torch.randint(TEXT_TOKENS[0], TEXT_TOKENS[1] + 1, (1,), generator=generator))
        ids = pool[torch.randint(len(pool), (text,), generator=generator)].tolist()
        low, high = AUDIO_SECONDS
        seconds = low + (high - low) * float(torch.rand((), generator=generator))
        specs.append(SampleSpec(index, tuple(ids[:SYSTEM_TOKENS]), tuple(ids[SYSTEM_TOKENS:]), seconds))
    return specs


def ordinary_token_ids(config) -> torch.Tensor:
    """Ids from the middle of the vocabulary, minus every id the config gives a role (audio, pad, bos, eos)."""
    vocab = config.text_config.vocab_size
    special = {
        config.audio_in_token_idx,
        config.audio_out_token_idx,
        config.audio_out_bos_token_id,
        config.audio_eos_token_id,
        config.pad_token_id,
        config.text_config.bos_token_id,
        config.text_config.eos_token_id,
    }
    ids = torch.arange(vocab // 8, vocab * 7 // 8)
    return ids[~torch.isin(ids, torch.tensor(sorted(special)))]


def frames_of(spec: SampleSpec) -> int:
    return max(1, round(spec.seconds * CODES_PER_SECOND))


def random_codes(spec: SampleSpec, codebooks: int, codebook_size: int, seed: int) -> torch.Tensor:
    """Codes `[codebooks, frames]` uniform in [0, codebook_size), as a trained tokenizer's would be shaped."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + spec.index)
    return torch.randint(codebook_size, (codebooks, frames_of(spec)), generator=generator)


def waveform(spec: SampleSpec, sample_rate: int) -> torch.Tensor:
    """Mono float32 of the sample's duration: a chirp over noise (speech-like level, not silence)."""
    generator = torch.Generator().manual_seed(10_000 + spec.index)
    length = int(spec.seconds * sample_rate)
    t = torch.arange(length, dtype=torch.float64) / sample_rate
    start, end = 100.0 + 50 * (spec.index % 7), 2000.0
    phase = 2 * math.pi * (start * t + (end - start) * t**2 / (2 * spec.seconds))
    noise = torch.randn(length, generator=generator, dtype=torch.float64)
    return (0.3 * torch.sin(phase) + 0.05 * noise).float()


def prompt_and_labels(spec: SampleSpec, config) -> tuple[list[int], list[int]]:
    """input_ids and label_ids in prepare_chatml_sample's TTS layout: system, user, assistant audio.

    Labels are -100 on the whole prompt and on the assistant header; the assistant's
    <|audio_out_bos|><|AUDIO_OUT|><|audio_eos|><|eot_id|> are labelled, as prepare_chatml_sample labels them.
    Header and eot ids are arbitrary ordinary ids (only the audio ids have a meaning to the model and collator).
    """
    pool = ordinary_token_ids(config)
    header, eot = pool[:HEADER_TOKENS].tolist(), int(pool[HEADER_TOKENS])
    prompt = [config.text_config.bos_token_id, *header, *spec.system_ids, eot, *header, *spec.user_ids, eot, *header]
    answer = [config.audio_out_bos_token_id, config.audio_out_token_idx, config.audio_eos_token_id, eot]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def dataset_sample(spec: SampleSpec, codes: torch.Tensor, config) -> ChatMLDatasetSample:
    """A fresh ChatMLDatasetSample (the collator mutates samples: build one per batch, never reuse)."""
    input_ids, label_ids = prompt_and_labels(spec, config)
    return ChatMLDatasetSample(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        label_ids=torch.tensor(label_ids, dtype=torch.long),
        audio_ids_concat=codes.long(),
        audio_ids_start=torch.zeros(1, dtype=torch.long),
        # TTS: the only audio is the assistant's output, so no waveform for the (skipped) Whisper tower.
        audio_waveforms_concat=torch.zeros(0),
        audio_waveforms_start=torch.zeros(0, dtype=torch.long),
        audio_sample_rate=torch.zeros(0, dtype=torch.float32),
        audio_speaker_indices=torch.zeros(0, dtype=torch.long),
    )


def merged_length(spec: SampleSpec, frames: int, config) -> int:
    """Unpadded merged sequence length: text tokens, minus the <|AUDIO_OUT|> placeholder, plus its audio columns
    (frames + stream bos/eos + the delay pattern's extra columns), the same count training/data.py buckets by."""
    delay = config.audio_num_codebooks - 1 if config.use_delay_pattern else 0
    input_ids, _ = prompt_and_labels(spec, config)
    return len(input_ids) - 1 + frames + 2 + delay


def real_size_audio_tokenizer(scratch: Path, device: str):
    """HiggsAudioTokenizer with the released architecture and random weights, its HuBERT-base-shaped semantic
    model resolved offline from `scratch` (the same hub-cache trick the demo tokenizer uses)."""
    from boson_multimodal.audio_processing.higgs_audio_tokenizer import HiggsAudioTokenizer

    spec_path = scratch / "hubert_base_layout.json"
    spec_path.write_text(json.dumps(HUBERT_BASE))
    hub_cache = scratch / "hf-hub"
    _build_hubert(hub_cache, spec_name=spec_path)
    with offline_hub_cache(hub_cache):
        codec = HiggsAudioTokenizer(**REAL_AUDIO_TOKENIZER, device=device)
    return codec.to(device).eval()
