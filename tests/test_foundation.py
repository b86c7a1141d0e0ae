"""The base: definitions load, the demo checkpoints behave like the released ones, the demo data decodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from boson_multimodal.data_types import AudioContent, ChatMLSample, Message
from conftest import REPO_ROOT

from higgs_pipeline.data.audio_io import decode
from higgs_pipeline.models.demo import DEMO_NOTE, demo_checkpoints, is_demo, model_config
from higgs_pipeline.paths import DEMO_MANIFEST
from higgs_pipeline.training.samples import AudioInput, build_dataset_sample, forward_kwargs, make_collator


def test_definitions_load_in_process():
    from higgs_pipeline.definitions import defs

    definitions = defs()
    assert definitions.resolve_all_asset_keys() is not None
    assert "artifacts" in definitions.resources and "checkpoints" in definitions.resources


@pytest.mark.slow  # a fresh interpreter loads the code location
def test_loading_the_code_location_leaves_the_model_libraries_to_the_runs():
    """`dg check defs`, the UI's code server and every run's process load the definitions; transformers, PEFT and
    matplotlib load only when an asset that needs them runs."""
    program = (
        "import sys; import higgs_pipeline.definitions as d; d.defs(); "
        "print(sorted(m for m in ('transformers', 'peft', 'matplotlib') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout


def test_demo_checkpoints_are_labelled_and_released_layout():
    paths = demo_checkpoints()
    assert is_demo(paths.model) and is_demo(paths.audio_tokenizer)
    assert json.loads((paths.model / "DEMO_MODEL.json").read_text())["note"] == DEMO_NOTE
    config = json.loads((paths.model / "config.json").read_text())
    assert config["demo_model_note"] == DEMO_NOTE
    # Same architecture family as bosonai/higgs-audio-v2-generation-3B-base.
    assert config["audio_adapter_type"] == "dual_ffn_fast_forward"
    assert config["audio_num_codebooks"] == 8 and config["audio_codebook_size"] == 1024
    assert (config["audio_stream_bos_id"], config["audio_stream_eos_id"]) == (1024, 1025)
    assert config["use_delay_pattern"] and config["encode_audio_in_tokens"] and config["skip_audio_tower"]
    assert config["pad_token_id"] < config["text_config"]["vocab_size"]
    assert (paths.model / "model.safetensors").exists() and (paths.model / "tokenizer.json").exists()
    assert {p.name for p in paths.audio_tokenizer.iterdir()} >= {"config.json", "model.pth"}


BUILD_ON_THREE_THREADS = """
import torch
torch.set_num_threads(3)
from higgs_pipeline.models.demo import demo_checkpoints
paths = demo_checkpoints()
print(paths.model, paths.audio_tokenizer, sep="\\n")
"""


@pytest.mark.slow  # builds the demo checkpoints a second time, from scratch
def test_demo_build_is_deterministic(tmp_path):
    """A second build from the same configs, in another cache and another process with another thread count,
    gives bit-identical weights (the codebooks' k-means depends on the thread count unless the build pins it)."""
    from safetensors.torch import load_file

    first = demo_checkpoints()
    env = {**os.environ, "HIGGS_PIPELINE_CACHE": str(tmp_path), "OMP_NUM_THREADS": "3"}
    built = subprocess.run(
        [sys.executable, "-c", BUILD_ON_THREE_THREADS], env=env, capture_output=True, text=True, check=True
    )
    model, audio_tokenizer = (Path(line) for line in built.stdout.split())
    assert model != first.model and model.is_relative_to(tmp_path)
    a, b = load_file(first.model / "model.safetensors"), load_file(model / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta = torch.load(first.audio_tokenizer / "model.pth")
    tb = torch.load(audio_tokenizer / "model.pth")
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


def test_text_tokenizer_has_special_tokens(text_tokenizer, demo_model):
    config = demo_model.config
    ids = text_tokenizer.convert_tokens_to_ids
    assert ids("<|AUDIO|>") == config.audio_in_token_idx
    assert ids("<|AUDIO_OUT|>") == config.audio_out_token_idx
    assert ids("<|audio_out_bos|>") == config.audio_out_bos_token_id
    assert ids("<|audio_eos|>") == config.audio_eos_token_id
    for token in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        assert len(text_tokenizer.encode(token, add_special_tokens=False)) == 1
    text = "Ünïcode and plain words survive a round trip."
    assert text_tokenizer.decode(text_tokenizer.encode(text, add_special_tokens=False)) == text


def test_real_size_smoke_config_keeps_the_3b_shapes_and_takes_ids_from_the_tokenizer(text_tokenizer):
    """benchmarks/smoke_8xgpu.py's checkpoint: the 3B layout's shapes (embedding rows included), its special
    tokens pointing into the demo tokenizer, and labelled as random weights."""
    layout = json.loads((REPO_ROOT / "higgs_pipeline/models/configs/higgs_audio_v2_3b_layout.json").read_text())
    config = model_config("higgs_audio_v2_3b_layout.json", text_tokenizer, keep_vocab_size=True)
    assert config.text_config.vocab_size == layout["text_config"]["vocab_size"] == 128256
    assert config.text_config.hidden_size == layout["text_config"]["hidden_size"]
    assert config.text_config.num_hidden_layers == layout["text_config"]["num_hidden_layers"]
    assert config.audio_dual_ffn_layers == layout["audio_dual_ffn_layers"]
    assert config.audio_out_token_idx == text_tokenizer.convert_tokens_to_ids("<|AUDIO_OUT|>") < len(text_tokenizer)
    assert config.demo_model_note == DEMO_NOTE
    small = model_config("higgs_audio_v2_3b_layout.json", text_tokenizer)
    assert small.text_config.vocab_size == len(text_tokenizer)


def _demo_clip(index: int = 0) -> tuple[torch.Tensor, int]:
    manifest = pd.read_csv(DEMO_MANIFEST)
    wave, rate = decode(str(DEMO_MANIFEST.parent / manifest.audio_path[index]))
    return torch.from_numpy(wave.mean(0)), rate


def test_audio_tokenizer_encodes_25_codes_per_second_and_decodes_24khz(audio_tokenizer):
    wave, rate = _demo_clip()
    seconds = wave.shape[-1] / rate
    codes = audio_tokenizer.encode(wave.numpy(), sr=rate)
    assert codes.shape[0] == 8
    assert abs(codes.shape[1] - 25 * seconds) <= 2
    assert int(codes.max()) < 1024 and int(codes.min()) >= 0
    assert audio_tokenizer.sampling_rate == 24000 and audio_tokenizer.tps == 25
    audio = audio_tokenizer.decode(codes.unsqueeze(0))
    assert audio.shape[-1] == codes.shape[1] * 24000 // 25
    assert np.isfinite(audio).all()


def _tts_sample(text: str) -> ChatMLSample:
    return ChatMLSample(
        messages=[
            Message("system", "Generate audio following instruction."),
            Message("user", text),
            Message("assistant", AudioContent(audio_url="clip.wav")),
        ]
    )


def test_model_forward_returns_audio_logits_with_audio_labels(demo_model, text_tokenizer, audio_tokenizer):
    wave, rate = _demo_clip()
    codes = audio_tokenizer.encode(wave.numpy(), sr=rate)
    sample = build_dataset_sample(_tts_sample("hello there"), [AudioInput(codes)], text_tokenizer)
    collator = make_collator(demo_model.config)
    batch = collator([sample])
    with torch.no_grad():
        out = demo_model(**forward_kwargs(batch, "cpu"))
    frames = codes.shape[1] + 2 + 7  # stream bos/eos and the 7 delay-pattern columns
    assert batch.audio_out_ids.shape == (8, frames)
    assert out.audio_logits.shape == (frames, 8, 1026)
    assert out.logits.shape[:2] == out.expanded_labels.shape
    assert out.logits.shape[-1] == demo_model.config.text_config.vocab_size
    assert torch.isfinite(out.audio_logits).all()
    assert out.audio_logits.dtype == torch.float32


def test_whisper_tower_variant_runs(tmp_path, text_tokenizer, audio_tokenizer):
    """The audio-tower variant (Whisper features for user audio) builds, loads and runs from its config."""
    from boson_multimodal.model.higgs_audio import HiggsAudioConfig, HiggsAudioModel

    config = HiggsAudioConfig.from_pretrained(demo_checkpoints().model)
    config.skip_audio_tower = False
    config.encode_whisper_embed = True
    torch.manual_seed(0)
    HiggsAudioModel(config).save_pretrained(tmp_path)
    model = HiggsAudioModel.from_pretrained(tmp_path).eval()
    assert model.audio_tower is not None
    wave, rate = _demo_clip(1)
    codes = audio_tokenizer.encode(wave.numpy(), sr=rate)
    chatml = ChatMLSample(
        messages=[
            Message("user", ["Repeat this:", AudioContent(audio_url="in.wav")]),
            Message("assistant", AudioContent(audio_url="out.wav")),
        ]
    )
    sample = build_dataset_sample(chatml, [AudioInput(codes, wave, rate), AudioInput(codes)], text_tokenizer)
    batch = make_collator(model.config)([sample])
    assert batch.audio_features is not None and batch.audio_features.shape[0] == 1
    with torch.no_grad():
        out = model(**forward_kwargs(batch, "cpu"))
    assert out.audio_logits.shape[1:] == (8, 1026)
    assert torch.isfinite(out.logits).all()


def test_demo_manifest_parses_and_every_file_decodes():
    manifest = pd.read_csv(DEMO_MANIFEST)
    assert list(manifest.columns[:3]) == ["audio_path", "text", "speaker"]
    speakers = manifest.speaker.str.lower().str.split().str.join(" ")
    assert speakers.nunique() >= 4 and speakers.value_counts().min() >= 10
    formats = set()
    for row in manifest.itertuples():
        path = DEMO_MANIFEST.parent / row.audio_path
        wave, rate = decode(str(path))
        seconds = wave.shape[-1] / rate
        assert 1.0 <= seconds <= 6.0, f"{row.audio_path}: {seconds:.2f}s"
        assert np.abs(wave).max() > 0.01, f"{row.audio_path} is silent"
        formats.add((path.suffix, rate, wave.shape[0]))
    assert {f[0] for f in formats} >= {".wav", ".flac", ".mp3"}
    assert len({f[1] for f in formats}) >= 3 and {f[2] for f in formats} == {1, 2}


@pytest.mark.parametrize("field", ["text", "speaker"])
def test_demo_manifest_has_no_empty_fields(field):
    manifest = pd.read_csv(DEMO_MANIFEST, keep_default_na=False)
    assert (manifest[field].str.strip() != "").all()
